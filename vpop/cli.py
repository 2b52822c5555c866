"""Command-line apps (Hydra): `vpop-trial` runs an in-silico trial."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from vpop import catalogue, posterior, report
from vpop.catalogue import ConfigError
from vpop.trial import TrialSettings, arms_from_config, run_trial

log = logging.getLogger("vpop")


def _use_user_config_dirs() -> None:
    """Named drugs, regimens and populations are also looked up in --config-dir folders."""
    for source in HydraConfig.get().runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            catalogue.add_search_dir(source.path)


class Progress:
    """A patients/s bar on stderr (quiet off a terminal with progress=auto) and a closing log line.
    Chunks resumed from a checkpoint advance the bar without counting towards the rate."""

    def __init__(self, enabled, total: int):
        from tqdm import tqdm

        show = sys.stderr.isatty() if enabled == "auto" else bool(enabled)
        self.bar = tqdm(total=total, unit="patient", unit_scale=True, disable=not show, smoothing=0.1, dynamic_ncols=True)
        self.simulated = 0
        self.start = time.perf_counter()

    def __call__(self, k: int, resumed: bool = False) -> None:
        if not resumed:
            self.simulated += k
        elif not self.bar.disable:  # a disabled tqdm keeps no counters
            self.bar.initial += k  # tqdm's rate is (n - initial) / elapsed
        self.bar.update(k)

    def close(self) -> None:
        self.bar.close()
        seconds = time.perf_counter() - self.start
        log.info("simulated %d patient-arm-draws in %.1f s (%.0f patients/s, compilation included)",
                 self.simulated, seconds, self.simulated / max(seconds, 1e-9))


def _settings(cfg: DictConfig) -> TrialSettings:
    return TrialSettings(
        n=cfg.population.n,
        seed=cfg.seed,
        draws=cfg.draws,
        chunk_size=cfg.chunk_size,
        horizon_days=cfg.horizon_days,
        assessment_every_days=cfg.assessment_every_days,
        trajectories=cfg.trajectories,
    )


def run(cfg: DictConfig, out_dir: Path) -> list[Path]:
    """The trial app without Hydra's wrapping (used by tests)."""
    try:
        experiment = cfg.experiment
    except MissingMandatoryValue:
        raise ConfigError(f"no experiment: add +experiment=NAME; available: {', '.join(catalogue.available('experiment'))}") from None
    arms, reference_arm = arms_from_config(experiment)
    settings = _settings(cfg)
    if not isinstance(settings.n, int) or settings.n <= 0:
        raise ConfigError(f"population.n must be a positive whole number of patients, got {settings.n!r}")
    draws = posterior.draws(cfg.posterior, cfg.draws, cfg.seed)
    twins = None
    if cfg.twins:
        from vpop.population import read_twins

        twins = read_twins(cfg.twins)
    n = len(twins) if twins is not None else settings.n
    import jax

    devices = jax.local_devices()
    log.info("%d arm(s) x %d draw(s) x %d patients on %d %s device(s), chunks of %d", len(arms), len(draws), n,
             len(devices), devices[0].platform, settings.chunk_size)
    progress = Progress(cfg.progress, n * len(arms) * len(draws))
    try:
        result = run_trial(arms, reference_arm, settings, draws=draws, twins=twins, progress=progress,
                           checkpoint_dir=cfg.checkpoint_dir, resume=cfg.resume)
    finally:
        progress.close()
    written = report.write_outputs(result, out_dir)
    log.info("wrote %s", ", ".join(str(p) for p in written))
    log.info("main endpoints:\n%s", report.markdown_table(result.summary))
    return written


@hydra.main(version_base="1.3", config_path=catalogue.hydra_config_path(), config_name="trial")
def trial(cfg: DictConfig) -> float | None:
    """vpop-trial +experiment=NAME [population.n=N seed=S posterior=default draws=D chunk_size=C ...]

    Returns the objective value (what an Optuna sweep minimises, vpop/sweep.py) when `objective` is
    set, else None.
    """
    import pandas as pd

    from vpop import sweep

    _use_user_config_dirs()
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no "TPU not found" on CPU
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        spec = None
        if cfg.get("objective") is not None:  # checked before simulating; a missing experiment is run()'s to report
            spec = sweep.objective_spec(cfg.objective, None if OmegaConf.is_missing(cfg, "experiment") else cfg.experiment)
        run(cfg, out_dir)
        if spec is None:
            return None
        # run() returns paths, not results: the objective reads the summary.csv it wrote.
        value = sweep.objective(pd.read_csv(out_dir / "summary.csv"), spec)
        log.info("objective (%s of %s, %s no worse than %s - %g pp): %.3f", spec["minimise"], spec["arm"],
                 spec["no_worse_than"], spec["reference_arm"], spec["margin_pp"], value)
        return value
    except ConfigError as err:
        log.error("%s", err)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=catalogue.hydra_config_path(), config_name="calibrate")
def calibrate(cfg: DictConfig) -> None:
    """vpop-calibrate [calibration.samples=N calibration.chains=C calibration.patients_per_cohort=P ...]"""
    from vpop import calibrate as cal

    _use_user_config_dirs()
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    try:
        show = sys.stderr.isatty() if cfg.progress == "auto" else bool(cfg.progress)
        files = cal.run(cfg.calibration, Path(HydraConfig.get().runtime.output_dir), progress=show)
    except ConfigError as err:
        log.error("%s", err)
        sys.exit(2)
    log.info("wrote %s", ", ".join(str(p) for p in files.values()))


if __name__ == "__main__":  # pragma: no cover
    {"calibrate": calibrate}.get(sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1] == "calibrate" else "", trial)()
