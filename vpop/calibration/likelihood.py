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

RATE_CLIP = 1e-6  # rates kept this far inside (0, 1): at exactly 0 or 1 any other count has likelihood 0


def unconstrained_prior(problem: Problem):
    """u, one N(0, 1) sample site per calibrated parameter, truncated at its `truncation_sd`."""
    # Truncated: beyond the first design round's reach an emulator only extrapolates (its linear
    # mean can make a far corner look like a perfect fit), so the posterior may not go there.
    return jnp.stack([numpyro.sample(prm.site, dist.TruncatedNormal(0.0, 1.0, low=-prm.truncation_sd, high=prm.truncation_sd))
                      for prm in problem.parameters])


def numpyro_model(problem: Problem, fit: bool = True, emulator=None):
    """Priors on the calibrated parameters, the rate of every target (simulated, or from an
    `emulator.Emulator` of the simulator), binomial likelihood for the calibration targets (`fit=False`
    leaves the observations out: predictive runs)."""
    u = unconstrained_prior(problem)
    values = constrain_all(problem.parameters, u)
    for name, v in values.items():
        numpyro.deterministic(name, v)
    rates = emulator.target_rates(u) if emulator is not None else problem.target_rates(values)
    for t in problem.targets.itertuples():
        rate = numpyro.deterministic("rate:" + t.id, jnp.clip(rates[t.id], RATE_CLIP, 1 - RATE_CLIP))
        if t.role == "calibration":
            n, k = published.likelihood_counts(t)
            numpyro.sample(t.id, dist.Binomial(n, probs=rate), obs=k if fit else None)
