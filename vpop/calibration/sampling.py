"""NUTS on the calibration's model (simulator or emulator), and predictive runs of the simulator."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import MCMC, NUTS, Predictive
from numpyro.infer.util import log_density
from omegaconf import DictConfig

from vpop.calibration.emulator import Emulator
from vpop.calibration.likelihood import RATE_CLIP, numpyro_model, unconstrained_prior
from vpop.calibration.problem import Problem

# Kept for ArviZ's sample_stats: energy (az.bfmi, az.plot_energy), step size, tree depth, acceptance.
NUTS_STATS = ("potential_energy", "energy", "num_steps", "adapt_state.step_size", "accept_prob", "diverging")


def starting_points(problem: Problem, emulator: Emulator, chains: int, jitter: float, key) -> dict[str, jax.Array]:
    """One starting point per chain: the design point with the highest emulated log posterior, plus
    N(0, jitter^2) per chain on the unconstrained scale. Rates pinned near 0 or 1 leave flat plateaus
    where NUTS, started at random, can stall far from the data; the design already holds points near
    the posterior (`start_jitter` in the calibration config says why not the best few points)."""

    def score(ui):
        params = {prm.site: ui[i] for i, prm in enumerate(problem.parameters)}
        return log_density(numpyro_model, (problem,), {"emulator": emulator}, params)[0]

    bound = 0.95 * jnp.asarray([prm.truncation_sd for prm in problem.parameters])
    u = jnp.clip(jnp.asarray(emulator.x), -bound, bound)  # inside the prior's support
    best = u[jnp.argmax(jax.jit(lambda x: jax.lax.map(score, x))(u))]
    start = jnp.clip(best + jitter * jax.random.normal(key, (chains, len(best))), -bound, bound)
    if chains == 1:
        start = start[0]
    return {prm.site: start[..., i] for i, prm in enumerate(problem.parameters)}


def nuts(problem: Problem, cfg: DictConfig, key, emulator: Emulator | None, progress: bool, samples: int | None = None,
         warmup: int | None = None, chains: int | None = None):
    kernel = NUTS(numpyro_model, target_accept_prob=float(cfg.target_accept), max_tree_depth=int(cfg.max_tree_depth),
                  dense_mass=True)
    chains = int(chains or cfg.chains)
    mcmc = MCMC(kernel, num_warmup=int(warmup or cfg.warmup), num_samples=int(samples or cfg.samples), num_chains=chains,
                chain_method=str(cfg.chain_method), progress_bar=progress)
    key, k_init = jax.random.split(key)
    init = (starting_points(problem, emulator, chains, float(cfg.start_jitter), k_init)
            if emulator is not None else None)
    mcmc.run(key, problem, emulator=emulator, init_params=init, extra_fields=NUTS_STATS)
    return mcmc


def predict(problem: Problem, samples: dict | None, n: int, key) -> dict[str, np.ndarray]:
    """Simulated rates of every target under `n` prior draws (samples None) or under posterior
    samples, one draw per call of `problem.rates_at` (prior and posterior share its kernel)."""
    if samples is None:
        samples = Predictive(unconstrained_prior, num_samples=n)(key, problem)
    u = np.stack([np.asarray(samples[prm.site]) for prm in problem.parameters], axis=1)
    rates = np.clip(problem.rates_over(u), RATE_CLIP, 1 - RATE_CLIP)  # as numpyro_model's rate sites
    return {t: rates[:, j] for j, t in enumerate(problem.targets.id)}


def thin(samples: dict, n: int) -> dict:
    total = next(iter(samples.values())).shape[0]
    idx = np.linspace(0, total - 1, min(n, total)).astype(int)
    return {k: v[idx] for k, v in samples.items()}
