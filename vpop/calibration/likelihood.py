r"""The NumPyro model of a calibration: priors, predicted rates, binomial likelihood.

$$ u \sim \mathcal N(0, I)\ \text{truncated}, \qquad \theta = T(u), \qquad k_j \sim \mathrm{Binomial}\big(n_j, \bar p_j(\theta)\big) $$

for every calibration target $j$ ($T$: `priors`; $\bar p_j$: `problem`, or its emulator). Validation
targets get a predicted rate but no observation: they never enter the likelihood.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from vpop import targets as published
from vpop.calibration.priors import constrain_all
from vpop.calibration.problem import Problem


def numpyro_model(problem: Problem, fit: bool = True, emulator=None):
    """Priors on the calibrated parameters, the rate of every target (simulated, or from an
    `emulator.Emulator` of the simulator), binomial likelihood for the calibration targets (`fit=False`
    leaves the observations out: predictive runs)."""
    # Truncated: beyond the first design round's reach an emulator only extrapolates (its linear
    # mean can make a far corner look like a perfect fit), so the posterior may not go there.
    u = jnp.stack([numpyro.sample(prm.site, dist.TruncatedNormal(0.0, 1.0, low=-prm.truncation_sd, high=prm.truncation_sd))
                   for prm in problem.parameters])
    values = constrain_all(problem.parameters, u)
    for name, v in values.items():
        numpyro.deterministic(name, v)
    rates = emulator.target_rates(u) if emulator is not None else problem.target_rates(values)
    for t in problem.targets.itertuples():
        rate = numpyro.deterministic("rate:" + t.id, jnp.clip(rates[t.id], 1e-6, 1 - 1e-6))
        if t.role == "calibration":
            n, k = published.likelihood_counts(t)
            numpyro.sample(t.id, dist.Binomial(n, probs=rate), obs=k if fit else None)
