"""`vpop-calibrate`'s work: prior predictive, emulator design, NUTS, posterior predictive, files."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig

from vpop.calibration.design import load_design, save_design, sequential_design
from vpop.calibration.diagnostics import figures, ppc_table, warn_convergence
from vpop.calibration.emulator import EmulatorFitError
from vpop.calibration.problem import build_problem
from vpop.calibration.sampling import nuts, predict, thin
from vpop.catalogue import ConfigError
from vpop.model import VERSION as model_version
from vpop.posterior import extend

log = logging.getLogger("vpop")


def run(cfg: DictConfig, out_dir: Path, progress: bool = False, model: DictConfig | None = None) -> dict[str, Path]:
    """Calibrate and write posterior.nc, diagnostics.csv, ppc.csv and figures/ into out_dir. `cfg` is
    the `calibration` group, `model` the `model` group (default the shipped configs/model/default.yaml)."""
    from vpop.posterior import arviz

    az = arviz()
    started = time.perf_counter()
    method = str(cfg.method)
    if method not in ("emulator", "simulator"):
        raise ConfigError(f"calibration.method must be emulator or simulator, got {method!r}")
    fit_problem = build_problem(cfg, roles=("calibration",), model=model)
    full_problem = build_problem(cfg, roles=("calibration", "validation"), model=model)
    saved = cfg.emulator.get("design") if method == "emulator" else None
    design = load_design(saved, fit_problem, cfg) if saved else None  # checked before any simulation
    key = jax.random.PRNGKey(int(cfg.seed))
    k_prior, k_emul, k_mcmc, k_post = jax.random.split(key, 4)

    def stage(what: str) -> None:
        log.info("%s (%.0f s so far)", what, time.perf_counter() - started)

    stage(f"prior predictive: {cfg.prior_predictive_draws} draws x {len(full_problem.cohorts)} cohorts")
    prior_rates = predict(full_problem, None, int(cfg.prior_predictive_draws), k_prior)
    if method == "emulator":
        stage(f"emulator design: {cfg.emulator.rounds} rounds x {cfg.emulator.design_points} parameter sets"
              if design is None else f"emulator design: {len(design[0])} parameter sets reused from {saved}")
    try:
        emulator, emulator_error, design_u, design_y = (sequential_design(fit_problem, cfg, k_emul, progress, design)
                                                        if method == "emulator" else (None, None, None, None))
    except EmulatorFitError as err:
        if err.design is None:
            raise
        path = save_design(Path(out_dir) / "design.npz", *err.design, fit_problem, cfg)
        raise EmulatorFitError(f"{err}. The {len(err.design[0])} simulated parameter sets are saved in {path}: rerun with "
                               f"calibration.emulator.design={path} and other emulator settings (fit_steps, refit_steps, "
                               "learning_rate, fit_points) or more rounds, without simulating them again") from err
    stage(f"NUTS: {cfg.chains} chains x ({cfg.warmup} warmup + {cfg.samples} samples)")
    mcmc = nuts(fit_problem, cfg, k_mcmc, emulator, progress)
    samples = mcmc.get_samples()
    thinned = thin(samples, int(cfg.posterior_predictive_draws))
    stage(f"posterior predictive (simulator): {len(next(iter(thinned.values())))} draws")
    post_rates = predict(full_problem, thinned, 0, k_post)  # the real simulator, also for the fitted targets
    seconds = time.perf_counter() - started

    names = [p.config_path for p in fit_problem.parameters]
    idata = inference_data(mcmc, names, full_problem, prior_rates, post_rates, cfg, seconds)
    summary = az.summary(idata, var_names=names, kind="all", round_to="none")
    summary.insert(0, "parameter", summary.index)
    summary["divergences"] = int(np.asarray(idata.sample_stats.diverging).sum())
    warn_convergence(summary)
    ppc = ppc_table(full_problem.targets, post_rates, int(cfg.seed))
    if emulator is not None:  # how far the emulator was from the simulator at the posterior draws
        u = np.stack([np.asarray(thinned[p.site]) for p in fit_problem.parameters], axis=1)
        emulated = jax.nn.sigmoid(jax.vmap(emulator.logits)(jnp.asarray(u)))
        gap = {t: 100 * float(np.mean(np.abs(np.asarray(emulated[:, i]) - post_rates[t]))) for i, t in enumerate(emulator.target_ids)}
        ppc["emulator_gap_percent"] = ppc.target.map(gap)
    prior_ppc = ppc_table(full_problem.targets, prior_rates, int(cfg.seed))

    # With `extends`, posterior.nc is the base posterior with the new parameters' draws joined to it.
    written = extend(str(cfg.extends), idata, int(cfg.seed)) if cfg.get("extends") else idata
    files = _write(out_dir, written, summary, ppc, prior_ppc, emulator_error, design_u, design_y, fit_problem, cfg)
    figures(idata, names, ppc, prior_ppc, Path(out_dir) / "figures")
    return files


def inference_data(mcmc, names: list[str], problem, prior_rates: dict, post_rates: dict, cfg: DictConfig, seconds: float):
    """ArviZ InferenceData of a calibration: the posterior by config path (the sampler's u-scale
    dropped), NUTS sample_stats, observed counts, and the prior and posterior predictive rates
    (posterior predictive counts drawn for a trial of each target's size)."""
    import xarray as xr

    from vpop.posterior import arviz

    idata = arviz().from_numpyro(mcmc)
    idata.posterior = idata.posterior[names]
    rng = np.random.default_rng(int(cfg.seed))
    pp = {t.id: (("chain", "draw"), rng.binomial(int(t.n), np.clip(post_rates[t.id], 0, 1))[None, :])
          for t in problem.targets.itertuples()}
    pp_rates = {f"rate:{t}": (("chain", "draw"), v[None, :]) for t, v in post_rates.items()}
    idata.add_groups(posterior_predictive=xr.Dataset({**pp, **pp_rates}),
                     prior_predictive=xr.Dataset({f"rate:{t}": (("chain", "draw"), v[None, :]) for t, v in prior_rates.items()}))
    idata.attrs.update(targets=str(cfg.targets), patients_per_cohort=int(cfg.patients_per_cohort), method=str(cfg.method),
                       wall_seconds=float(seconds), model_version=model_version)
    return idata


def _write(out_dir, idata, summary, ppc, prior_ppc, emulator_error, design_u, design_y, fit_problem, cfg) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = dict(posterior=out_dir / "posterior.nc", diagnostics=out_dir / "diagnostics.csv", ppc=out_dir / "ppc.csv",
                 prior_ppc=out_dir / "prior_ppc.csv")
    idata.to_netcdf(files["posterior"])
    summary.to_csv(files["diagnostics"], index=False)
    ppc.to_csv(files["ppc"], index=False, float_format="%.3f")
    prior_ppc.to_csv(files["prior_ppc"], index=False, float_format="%.3f")
    if emulator_error is not None:
        files["emulator"] = out_dir / "emulator.csv"
        emulator_error.to_csv(files["emulator"], index=False, float_format="%.4f")
        files["design"] = save_design(out_dir / "design.npz", design_u, design_y, fit_problem, cfg)  # reusable: emulator.design
    return files
