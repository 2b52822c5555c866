"""The emulator's design: parameter sets simulated in rounds, each new round where the latest
emulator's posterior lies, and reusable across runs (`design.npz`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from vpop.calibration.emulator import Emulator, EmulatorFitError
from vpop.calibration.problem import EMULATED_RATE_FLOOR, Problem
from vpop.calibration.sampling import nuts
from vpop import catalogue
from vpop.catalogue import ConfigError
from vpop.model import VERSION as model_version
from vpop.store import run_key

log = logging.getLogger("vpop")


def relevance(problem: "Problem") -> np.ndarray:
    """[targets, parameters]: 1 where a calibrated parameter concerns the target's cohort."""
    rows = []
    for cohort in problem.cohorts:
        row = [1.0 if p.config_path in cohort.paths else 0.0 for p in problem.parameters]
        rows += [row] * len(cohort.targets)
    order = [t for c in problem.cohorts for t in c.targets.id]
    by_id = dict(zip(order, rows))
    return np.asarray([by_id[t] for t in problem.targets.id])


def simulate_design(problem: Problem, u: np.ndarray) -> np.ndarray:
    """logit(rate) of every target of `problem` at each row of u (forward simulator runs), clipped at
    `EMULATED_RATE_FLOOR` (what the emulator models)."""
    rates = np.clip(problem.rates_over(u), EMULATED_RATE_FLOOR, 1 - EMULATED_RATE_FLOOR)
    return np.log(rates / (1 - rates))


def design_identity(problem: Problem, cfg: DictConfig) -> dict[str, np.ndarray]:
    """What a saved design must agree on to be reused: the model version and a digest of the model's
    numbers (the app's `model` group, overrides included; not the nominals of the calibrated ones,
    which the design sets), the fitted parameters (unconstrained scale), the targets (logit scale, in
    this order), the virtual cohorts (patients, seed, horizon cap; -1 for none) and, with
    `calibration.extends`, the base posterior's medians, and with `calibration.priors` every prior range."""
    model = (problem.model if problem.model is not None else catalogue.load("model", "default")).copy()
    for p in problem.parameters:
        if p.config_path.startswith("model."):
            OmegaConf.update(model, p.config_path.removeprefix("model.") + ".nominal", None)
    base = {"base_medians": np.asarray(run_key([repr(sorted(problem.fixed.items()))]))} if problem.fixed else {}
    if cfg.get("priors"):  # u means another value under another prior
        base["priors"] = np.asarray([[p.low, p.high] for p in problem.parameters])
    return {**base, "model_version": np.asarray(model_version),
            "model_config": np.asarray(run_key([OmegaConf.to_yaml(model, sort_keys=True)])),
            "parameters": np.asarray([p.config_path for p in problem.parameters]),
            "targets": np.asarray(list(problem.targets.id)),
            "cohorts": np.asarray([int(cfg.patients_per_cohort), int(cfg.seed),
                                   -1 if cfg.horizon_days is None else int(cfg.horizon_days)])}


def save_design(path: str | Path, u: np.ndarray, y: np.ndarray, problem: Problem, cfg: DictConfig) -> Path:
    """Write a design (parameter sets u, simulated target logits y) with its identity, for
    `calibration.emulator.design` (`load_design`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, u=u, y=y, **design_identity(problem, cfg))
    return path


def load_design(path: str | Path, problem: Problem, cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    """A design saved by an earlier calibration (design.npz): its parameter sets u and simulated
    target logits y, refused unless it was made for this model version, parameters, targets and cohorts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"calibration.emulator.design: no file {path}")
    saved = np.load(path)
    for name, want in design_identity(problem, cfg).items():
        have = saved[name] if name in saved else np.asarray("missing")
        if have.shape != want.shape or not np.all(have == want):
            raise ConfigError(f"calibration.emulator.design: {path} was made for other {name} "
                              f"({have.tolist()}; this calibration: {want.tolist()})")
    return saved["u"], saved["y"]


def sequential_design(problem: Problem, cfg: DictConfig, key, progress: bool, design: tuple[np.ndarray, np.ndarray] | None = None
             ) -> tuple[Emulator, pd.DataFrame, np.ndarray, np.ndarray]:
    """Sequential design: a prior-wide first round, then each round simulated around the posterior
    of the emulator fitted so far (where a posterior far in the prior's tail would otherwise be
    extrapolated). Returns the emulator on all rounds, its hold-out error per target (every
    fifth set of the last round left out of a refit) and the design (u, y). A given design (of an
    earlier run, `load_design`) is used instead of simulating its rounds, and continued with more
    rounds when `rounds` exceeds the rounds it holds."""
    d = len(problem.parameters)
    ids = list(problem.targets.id)
    rng = np.random.default_rng(int(cfg.seed))
    m = int(cfg.emulator.design_points)
    rounds = int(cfg.emulator.rounds)
    if rounds < 1:
        raise ConfigError(f"calibration.emulator.rounds must be >= 1, got {rounds}")
    relevant = relevance(problem)

    def fit(u, y, hyper=None, start=None):
        steps = cfg.emulator.fit_steps if start is None else cfg.emulator.refit_steps
        return Emulator(ids, u, y, relevant, steps=int(steps), learning_rate=float(cfg.emulator.learning_rate),
                        fit_points=int(cfg.emulator.fit_points), hyper=hyper, start=start)

    started = time.perf_counter()
    if design is not None:
        u, y = design
        done = len(u) // m
        if done * m != len(u):
            raise ConfigError(f"calibration.emulator.design holds {len(u)} sets, not whole rounds of design_points={m}")
        offset = done - 1  # the saved rounds count as the first
        rounds = max(rounds - offset, 1)
    else:
        offset = 0
        u = rng.normal(0.0, float(cfg.emulator.design_scale), size=(m, d))
        y = simulate_design(problem, u)
        log.info("design round 1 of %d simulated (%.0f s)", rounds, time.perf_counter() - started)
    emulator = None
    try:
        for r, key_r in enumerate(jax.random.split(key, rounds - 1), start=2):
            emulator = fit(u, y, start=None if emulator is None else emulator.gp)
            s = nuts(problem, cfg, key_r, emulator, progress, samples=int(cfg.emulator.round_samples),
                     warmup=int(cfg.emulator.round_warmup), chains=int(cfg.emulator.round_chains)).get_samples()
            draws = np.stack([np.asarray(s[p.site]) for p in problem.parameters], axis=1)
            u_new = draws[rng.integers(0, len(draws), m)] + rng.normal(0.0, float(cfg.emulator.round_jitter), size=(m, d))
            u, y = np.concatenate([u, u_new]), np.concatenate([y, simulate_design(problem, u_new)])
            log.info("design round %d of %d simulated (%.0f s)", r + offset, rounds + offset, time.perf_counter() - started)
        final = fit(u, y, start=None if emulator is None else emulator.gp)
    except EmulatorFitError as err:  # the simulations so far are kept for a rerun (`run`)
        err.design = (u, y)
        raise
    held = np.zeros(len(u), bool)
    held[len(u) - m::5] = True  # every fifth set of the last round, predicted from the rest (same hyperparameters)
    check = fit(u[~held], y[~held], final.gp)
    pred = np.asarray(jax.vmap(check.logits)(jnp.asarray(u[held])))
    gap = np.abs(jax.nn.sigmoid(pred) - jax.nn.sigmoid(y[held]))
    err = pd.DataFrame({
        "target": ids,
        "logit_rmse": np.sqrt(np.mean((pred - y[held]) ** 2, axis=0)),
        "rate_abs_error_percent_median": 100 * np.median(gap, axis=0),
        "rate_abs_error_percent_max": 100 * np.max(gap, axis=0),
        "design_points": len(u),
    })
    return final, err, u, y
