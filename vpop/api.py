"""vpop from Python (notebooks, scripts): the trial app's composition and run, without a shell.

    import vpop
    result = vpop.run_experiment("mosunetuzumab_iv_vs_sc", overrides=["population.n=500"])
    result.summary                      # summary.csv as a DataFrame
    result.patient_rows(["arm", "crs_any"])   # patient rows, read from the streamed dataset

The overrides are the command line's (`vpop-trial --help`), composed by Hydra from the same configs,
checked by the same plan and simulated by the same runner, so a result equals the CLI's for the same
overrides.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from vpop import catalogue, cli, report
from vpop.catalogue import ConfigError
from vpop.trial import TrialResult


def compose_trial(experiment: str, overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> DictConfig:
    """The config `vpop-trial +experiment=EXPERIMENT OVERRIDES...` runs (with `--config-dir
    config_dir`: experiments, drugs, regimens and populations of your own folder)."""
    args = [f"+experiment={experiment}", *overrides]
    if config_dir is not None:
        folder = Path(config_dir).resolve()
        if not folder.is_dir():
            raise ConfigError(f"config_dir: no folder {folder}")
        catalogue.add_search_dir(folder)
        args.append(f"hydra.searchpath=[file://{folder}]")
    with initialize_config_dir(config_dir=str(catalogue.shipped_configs()), version_base="1.3", job_name="vpop_api"):
        cfg = compose(config_name="trial", overrides=args, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # `${hydra:runtime.cwd}` and the experiment's name resolve as in the app
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_experiment(experiment: str, overrides: Sequence[str] = (), out_dir: str | Path | None = None,
                   config_dir: str | Path | None = None) -> TrialResult:
    """Run an in-silico trial as `vpop-trial +experiment=EXPERIMENT OVERRIDES...` would.

    Returns the `TrialResult`: `summary` and `comparisons` (the CSVs' tables), `sample` (draw 0's
    first patients) and `patient_rows()` (every row, read lazily from the parquet dataset the run
    streamed to `checkpoint_dir`). out_dir: also write every output file and figure there, as the
    CLI does. Bad input raises `ConfigError` naming the field, before any simulation.
    """
    cfg = compose_trial(experiment, overrides, config_dir)
    if cfg.dry_run:
        raise ConfigError("dry_run=true: a dry run returns no result; use vpop-trial ... dry_run=true to print the calendar")
    result = cli.simulate(cfg, cli.experiment_keys(experiment))
    if out_dir is not None:
        report.write_outputs(result, out_dir)
    return result
