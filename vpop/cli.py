"""Command-line apps (Hydra): `vpop-trial` runs an in-silico trial, `vpop-calibrate` a calibration.

A trial is planned before anything is simulated or written: every override, arm, dose, posterior
draw, digital twin and objective is checked first (`plan`), so bad input stops the run with one line
on stderr (exit status 2) and the output folder Hydra made for it is removed again.
"""

from __future__ import annotations

import difflib
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from vpop import catalogue, posterior, report
from vpop.catalogue import ConfigError
from vpop.population import TWIN_FILL
from vpop.simulate import Arm, PreparedArm, check_sizes
from vpop.trial import MAIN_ENDPOINTS, TrialResult, TrialSettings, arms_from_config, prepare_draws, run_trial
from vpop.trial.table import endpoint_names

log = logging.getLogger("vpop")

# vpop-trial's own overrides, one line each (`vpop-trial --help`); the keys of configs/trial.yaml.
OVERRIDES = {
    "+experiment": ("NAME", "the trial to run (configs/experiment/NAME.yaml, or your own with --config-dir DIR)"),
    "population.n": ("1000", "virtual patients per arm (the same patients in every arm)"),
    "seed": ("0", "whole number 0-4294967295: patient p of seed s is the same in every run, chunking and device count"),
    "posterior": ("default", "default (the shipped calibration), a path to a posterior.nc, or none (nominal values, one draw)"),
    "draws": ("20", "posterior draws propagated into the intervals, at most as many as the posterior holds"),
    "chunk_size": ("10000", "patients per device call; host memory grows with it, not with population.n"),
    "checkpoint_dir": ("outputs/.checkpoints", "where chunks stream while a run is in progress"),
    "resume": ("true", "a rerun with the same inputs skips the chunks already written; false starts afresh"),
    "horizon_days": ("null", "simulated days (null: the regimen's length)"),
    "assessment_every_days": ("null", "days between response assessments (null: the regimen's, else the population's)"),
    "trajectories": ("100", "patients per arm whose time courses feed figures/time_courses.png (0: none)"),
    "twins": ("null", "CSV of real patients' covariates, one virtual patient per row (optional patient_id column)"),
    "twins_fill": ("none", "none: every covariate column is required; median: missing columns take each population's median"),
    "progress": ("auto", "auto (a patients/s bar on a terminal), true or false"),
    "objective": ("null", "{minimise, arm, no_worse_than, margin_pp}: the value an Optuna sweep minimises"),
    "dry_run": ("false", "true: check everything and print each arm's dose calendar, simulate nothing"),
    "model.GROUP.KEY": ("VALUE", "any number of configs/model/default.yaml, e.g. model.cytokines.k_el_il6_per_day=40 "
                        "or model.solver.max_step_days=0.25 (sweep with -m); a calibrated one needs posterior=none"),
}
SEED_MAX = 2**32 - 1  # JAX keys are 32-bit: seed 2**32 would give seed 0's patients


def _use_user_config_dirs() -> None:
    """Named drugs, regimens and populations are also looked up in --config-dir folders."""
    for source in HydraConfig.get().runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            catalogue.add_search_dir(source.path)


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


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
        log.info("simulated %d patient-arm-draws in %.1f s (%s patients/s, compilation included)",
                 self.simulated, seconds, _rate(self.simulated / max(seconds, 1e-9)))


# ---------------------------------------------------------------------------------------------
# Planning: every check before any work
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """A checked trial: what `run_trial` needs, with every arm compiled for every draw."""

    arms: dict[str, Arm]
    reference_arm: str
    settings: TrialSettings
    draws: list[dict[str, float]]
    twins: object  # a twin DataFrame or None
    prepared: list[dict[str, PreparedArm]]
    objective: dict | None


def check_keys(cfg: DictConfig, experiment_keys=()) -> None:
    """Reject top-level keys vpop does not know (a typo like `+populaton.n=20` would else be
    ignored), naming the nearest valid key. `experiment_keys`: top-level keys the experiment file
    itself defines (e.g. `step_up` of the step-up grid)."""
    allowed = {k.lstrip("+").split(".")[0] for k in OVERRIDES} | set(experiment_keys) | {"hydra"}
    for key in cfg:
        if key not in allowed:
            raise ConfigError(f"unknown key '{key}': {_did_you_mean(str(key), allowed)}allowed: {', '.join(sorted(allowed - {'hydra'}))}")
    extra = set(cfg.get("population") or {}) - {"n"}
    if extra:
        raise ConfigError(f"population: unknown key(s) {sorted(extra)}; allowed: n (arms name their population)")


def _did_you_mean(key: str, allowed, prefix: str = "") -> str:
    """"did you mean '<nearest allowed key>'? " (empty when none is close)."""
    near = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f"did you mean '{prefix}{near[0]}'? " if near else ""


def _settings(cfg: DictConfig) -> TrialSettings:
    seed = cfg.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed must be a whole number 0-{SEED_MAX}, got {seed!r}")
    trajectories = cfg.trajectories
    if isinstance(trajectories, bool) or not isinstance(trajectories, int) or trajectories < 0:
        raise ConfigError(f"trajectories must be a whole number >= 0, got {trajectories!r}")
    if cfg.progress not in ("auto", True, False):
        raise ConfigError(f"progress must be auto, true or false, got {cfg.progress!r}")
    if not isinstance(cfg.resume, bool):
        raise ConfigError(f"resume must be true or false, got {cfg.resume!r}")
    if cfg.twins_fill not in TWIN_FILL:
        raise ConfigError(f"twins_fill must be one of {', '.join(TWIN_FILL)}, got {cfg.twins_fill!r}")
    for key in ("horizon_days", "assessment_every_days"):
        v = cfg[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise ConfigError(f"{key} must be a positive number of days or null, got {v!r}")
    settings = TrialSettings(n=cfg.population.n, seed=seed, chunk_size=cfg.chunk_size, horizon_days=cfg.horizon_days,
                             assessment_every_days=cfg.assessment_every_days, trajectories=trajectories)
    check_sizes(settings.n, settings.chunk_size)
    return settings


def trial_endpoints(prepared: PreparedArm) -> list[str]:
    """Every endpoint of summary.csv for one arm (what an objective may name)."""
    return endpoint_names(len(prepared.compiled.periods), prepared.compiled.restart_period is not None)


def plan(cfg: DictConfig, experiment_keys=()) -> Plan:
    """Check every input and compile every arm for every posterior draw; nothing is simulated or written."""
    from vpop import sweep

    check_keys(cfg, experiment_keys)
    try:
        experiment = cfg.experiment
    except MissingMandatoryValue:
        raise ConfigError(f"no experiment: add +experiment=NAME; available: {', '.join(catalogue.available('experiment'))}") from None
    arms, reference_arm = arms_from_config(experiment)
    settings = _settings(cfg)
    objective = sweep.objective_spec(cfg.objective, experiment) if cfg.get("objective") is not None else None
    if cfg.posterior in (None, "none") and cfg.draws != 1:
        log.info("posterior=none: one draw of the nominal parameters (draws=%s does not apply)", cfg.draws)
    draws = posterior.draws(cfg.posterior, cfg.draws, cfg.seed)
    twins = None
    if cfg.twins:
        from vpop.population import read_twins

        twins = read_twins(cfg.twins, cfg.twins_fill)
        check_sizes(len(twins), settings.chunk_size)
    model = _plain(cfg.model)
    _check_model_overrides(model, draws[0])
    prepared = prepare_draws(arms, settings, model, draws)
    if objective is not None:
        for field, arm in (("minimise", objective["arm"]), ("no_worse_than", objective["arm"]),
                           ("no_worse_than", objective["reference_arm"])):
            allowed = trial_endpoints(prepared[0][arm])
            if objective[field] not in allowed:
                raise ConfigError(f"objective.{field} '{objective[field]}' is not an endpoint of arm {arm}; allowed: {', '.join(allowed)}")
    return Plan(arms, reference_arm, settings, draws, twins, prepared, objective)


def _leaves(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, DictConfig):
        return {k: v for key in node for k, v in _leaves(node[key], f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def _plain(model: DictConfig) -> DictConfig:
    """The composed `model` group as a plain config (not a node of the app's): drug files merge into it."""
    return OmegaConf.create(OmegaConf.to_container(model, resolve=True))


def _check_model_overrides(model: DictConfig, draw: dict[str, float] | None = None) -> None:
    """A model key the shipped model does not have (a typo added with +model...) is refused with the
    nearest one, and so is a changed number a posterior draw would set again."""
    shipped, given = _leaves(catalogue.load("model", "default")), _leaves(model)
    for key in given:
        if key not in shipped:
            raise ConfigError(f"model.{key}: no such model number; {_did_you_mean(key, shipped, 'model.')}allowed: "
                              "the keys of configs/model/default.yaml")
    changed = [f"model.{k}" for k, v in given.items() if shipped[k] != v]
    clash = sorted({c for c in draw or {} for k in changed if k == c or k.startswith(c + ".")})
    if clash:
        raise ConfigError(f"{', '.join(clash)}: calibrated, so each posterior draw sets it; add posterior=none "
                          "to run your value (one draw of the nominal parameters)")


def dose_calendar(p: Plan) -> str:
    """Each arm's compiled administrations, as a dry run prints them."""
    lines = []
    for name, prepared in p.prepared[0].items():
        pop = prepared.population.covariates
        weight, height = _typical(pop.weight_kg), _typical(pop.height_cm)
        bsa = (weight * height / 3600.0) ** 0.5
        arm = p.arms[name]
        lines.append(f"arm {name}: {arm.drug} {arm.route} in {arm.population} (mg for the population's typical "
                     f"{weight:g} kg, {bsa:.2f} m2)")
        # cycle/day/hour as the regimen writes them (a dose resumed after a delay keeps its own); t: days from C1D1
        lines.append(f"  {'role':<14}{'drug':<15}{'cycle':>5}{'day':>5}{'hour':>6}{'t (d)':>8}{'amount':>10} {'unit':<10}"
                     f"{'mg':>9} route")
        for a in prepared.compiled.administrations:
            mg = a.mg_for(weight, bsa)
            unit = a.unit + (f" x {a.duration_days:g} d" if a.continuous else "")
            lines.append(f"  {a.role:<14}{a.drug:<15}{a.cycle:>5}{a.cycle_day:>5g}{a.hour:>6g}{a.day:>8.2f}{a.amount:>10g} "
                         f"{unit:<10}{mg:>9.4g} {a.route}")
        restart = prepared.compiled.restart_period
        if restart is not None:
            resumed = prepared.compiled.periods[restart]
            lines.append(f"  treatment held after administration {restart}; resumed on t = {resumed.day:g} d with the "
                         f"regimen's dose {resumed.dose_number} (dose period {restart + 1})")
        lines.append(f"  {len(prepared.compiled.periods)} administrations of {arm.drug} (dose periods); horizon "
                     f"{prepared.compiled.horizon_day:g} days; assessments on days "
                     f"{', '.join(f'{d:g}' for d in prepared.compiled.assessment_days)}")
    return "\n".join(lines)


def _typical(spec) -> float:
    from vpop.population import typical_covariate

    return typical_covariate(spec)


# ---------------------------------------------------------------------------------------------
# vpop-trial
# ---------------------------------------------------------------------------------------------


def simulate(cfg: DictConfig, experiment_keys=()) -> TrialResult | None:
    """Plan and simulate a composed trial config (None for a dry run, which prints the dose calendar)."""
    p = plan(cfg, experiment_keys)
    if cfg.dry_run:
        print(dose_calendar(p))
        return None
    import jax

    devices = jax.local_devices()
    n = len(p.twins) if p.twins is not None else p.settings.n
    log.info("%d arm(s) x %d draw(s) x %d patients on %d %s device(s), chunks of %d", len(p.arms), len(p.draws), n,
             len(devices), devices[0].platform, p.settings.chunk_size)
    progress = Progress(cfg.progress, n * len(p.arms) * len(p.draws))
    try:
        return run_trial(p.arms, p.reference_arm, p.settings, draws=p.draws, twins=p.twins, progress=progress,
                         checkpoint_dir=cfg.checkpoint_dir, resume=cfg.resume, prepared=p.prepared)
    finally:
        progress.close()


def run(cfg: DictConfig, out_dir: Path, experiment_keys=()) -> list[Path]:
    """The trial app without Hydra's wrapping (used by tests): plan, simulate, write."""
    result = simulate(cfg, experiment_keys)
    if result is None:
        return []
    written = report.write_outputs(result, out_dir)
    log.info("wrote %s", ", ".join(str(f) for f in written))
    log.info("main endpoints:\n%s", report.markdown_table(result.summary))
    extrapolated = result.summary[(result.summary.support == "extrapolated") & result.summary.endpoint.isin(MAIN_ENDPOINTS)]
    if len(extrapolated):
        log.warning("no published target behind these rates (extrapolated; see summary.csv support): %s",
                    ", ".join(f"{r.arm}/{r.endpoint}" for r in extrapolated.itertuples()))
    unfitted = settings_outside_the_shipped_fit(cfg)
    if unfitted:
        log.warning("the shipped posterior was fitted with doses on schedule and tocilizumab at grade >= 2 only: the CRS "
                    "rates marked 'calibrated' or 'validated' were fitted and checked without %s (README: Validation)", unfitted)
    return written


# Model options off in the shipped fit (configs/model/default.yaml) that change who is treated or dosed when.
SHIPPED_OFF = ("hold_until_resolved", "rescue_grade1_hours")


def settings_outside_the_shipped_fit(cfg: DictConfig) -> str:
    """The `model.crs` options of SHIPPED_OFF turned on in a run on the shipped posterior, as 'path=value, ...'
    ('' when none: a posterior of one's own may have been fitted under them)."""
    if str(cfg.get("posterior")) != "default":
        return ""
    return ", ".join(f"model.crs.{k}={cfg.model.crs[k]}" for k in SHIPPED_OFF if cfg.model.crs[k])


def _discard_run_dir(out_dir: Path) -> None:
    """Remove what Hydra wrote for a run that stopped before producing anything (.hydra/ and the job
    log), then the run folder and its parents below the working directory while they are empty."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:  # a sweep's job folders stay, so the gather sees the failure
        return
    shutil.rmtree(out_dir / ".hydra", ignore_errors=True)
    (out_dir / f"{HydraConfig.get().job.name}.log").unlink(missing_ok=True)
    cwd = Path.cwd().resolve()
    folder = out_dir.resolve()
    while True:
        try:
            folder.rmdir()  # only if empty
        except OSError:
            break
        folder = folder.parent
        if folder == cwd or cwd not in folder.parents:
            break


def _in_run_dir(app: str, work):
    """Run an app's work in its Hydra run folder, with the user's --config-dir folders searched; bad
    input (a ConfigError) prints one line on stderr, removes the folder and exits with status 2."""
    _use_user_config_dirs()
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no "TPU not found" on CPU
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return out_dir, work(out_dir)
    except ConfigError as err:
        _discard_run_dir(out_dir)
        print(f"{app}: error: {err}", file=sys.stderr)
        sys.exit(2)


def _chosen_experiment_keys() -> list[str]:
    return experiment_keys(HydraConfig.get().runtime.choices.get("experiment"))


def experiment_keys(name: str | None) -> list[str]:
    """Top-level keys of an experiment file (an `# @package _global_` file may add its own)."""
    if not name:
        return []
    try:
        return [str(k) for k in catalogue.load("experiment", name)]
    except ConfigError:
        return []


@hydra.main(version_base="1.3", config_path=catalogue.hydra_config_path(), config_name="trial")
def _trial_app(cfg: DictConfig) -> float | None:
    import pandas as pd

    from vpop import sweep

    out_dir, written = _in_run_dir("vpop-trial", lambda out: run(cfg, out, _chosen_experiment_keys()))
    if not written:  # a dry run
        _discard_run_dir(out_dir)
        return None
    if cfg.get("objective") is None:
        return None
    spec = sweep.objective_spec(cfg.objective, cfg.experiment)
    # run() returns paths, not results: the objective reads the summary.csv it wrote.
    value = sweep.objective(pd.read_csv(out_dir / "summary.csv"), spec)
    log.info("objective (%s of %s, %s no worse than %s - %g pp): %.3f", spec["minimise"], spec["arm"],
             spec["no_worse_than"], spec["reference_arm"], spec["margin_pp"], value)
    return value


def trial_help() -> str:
    width = max(len(k) + len(v[0]) + 1 for k, v in OVERRIDES.items())
    lines = ["vpop-trial: an in-silico trial of T-cell-engaging bispecific antibodies",
             "",
             "  vpop-trial +experiment=NAME [KEY=VALUE ...]",
             "  vpop-trial +experiment=NAME dry_run=true          check it and print the dose calendar",
             "  vpop-trial -m +experiment=NAME KEY=A,B ...        a sweep: one trial per combination",
             "  vpop-trial --config-dir DIR +experiment=MINE      experiments, drugs, regimens, populations of your own",
             "",
             "Overrides (default):"]
    lines += [f"  {f'{k}={v[0]}':<{width}}  {v[1]}" for k, v in OVERRIDES.items()]
    lines += ["",
              f"Experiments: {', '.join(catalogue.available('experiment'))}",
              "Outputs: outputs/<experiment>/<date_time>/ (patients.parquet/, summary.csv, comparisons.csv, doses.csv, onsets.csv, monitoring.csv, figures/)",
              "Hydra's own options: vpop-trial --hydra-help"]
    return "\n".join(lines)


def trial() -> float | None:
    """vpop-trial +experiment=NAME [population.n=N seed=S posterior=default draws=D chunk_size=C ...]

    Returns the objective value (what an Optuna sweep minimises, vpop/sweep.py) when `objective` is
    set, else None.
    """
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(trial_help())
        return None
    return _trial_app()


# ---------------------------------------------------------------------------------------------
# vpop-calibrate
# ---------------------------------------------------------------------------------------------


@hydra.main(version_base="1.3", config_path=catalogue.hydra_config_path(), config_name="calibrate")
def calibrate(cfg: DictConfig) -> None:
    """vpop-calibrate [calibration.samples=N calibration.chains=C calibration.patients_per_cohort=P model.GROUP.KEY=V ...]"""
    from vpop import calibration

    def work(out_dir: Path):
        if cfg.progress not in ("auto", True, False):
            raise ConfigError(f"progress must be auto, true or false, got {cfg.progress!r}")
        show = sys.stderr.isatty() if cfg.progress == "auto" else cfg.progress
        model = _plain(cfg.model)
        _check_model_overrides(model)
        return calibration.run(cfg.calibration, out_dir, progress=show, model=model)

    _, files = _in_run_dir("vpop-calibrate", work)
    log.info("wrote %s", ", ".join(str(p) for p in files.values()))


# ---------------------------------------------------------------------------------------------
# vpop-export
# ---------------------------------------------------------------------------------------------

EXPORT_KEYS = ("arm", "patients", "draw")


def run_export(cfg: DictConfig, out_dir: Path, experiment_keys=()) -> list[Path]:
    """The export app without Hydra's wrapping: plan the trial (every check), then write the chosen
    arm's patients as SBML and Antimony (`vpop.export`)."""
    from omegaconf import open_dict

    from vpop import export

    export.require_libsbml()  # before any work
    draw = cfg.draw
    if isinstance(draw, bool) or not isinstance(draw, int) or draw < 0:
        raise ConfigError(f"draw must be a whole number >= 0, got {draw!r}")
    which = cfg.patients
    if which != "typical":
        ids = list(which) if not isinstance(which, (str, int)) else None
        if not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ConfigError(f"patients must be typical or a list of patient ids >= 0 (e.g. [0,1]), got {which!r}")
        which = ids
    with open_dict(cfg):
        cfg.draws = 1 if cfg.posterior in (None, "none") else draw + 1  # draw k is the same for any count above k
    p = plan(cfg, [*experiment_keys, *EXPORT_KEYS])
    arm = cfg.arm if cfg.arm is not None else p.reference_arm
    if arm not in p.arms:
        raise ConfigError(f"arm '{arm}' is not an arm of the experiment; allowed: {', '.join(p.arms)}")
    return export.write_arm(p.prepared[min(draw, len(p.prepared) - 1)][arm], which, cfg.seed, out_dir, draw)


@hydra.main(version_base="1.3", config_path=catalogue.hydra_config_path(), config_name="export")
def _export_app(cfg: DictConfig) -> None:
    _, written = _in_run_dir("vpop-export", lambda out: run_export(cfg, out, _chosen_experiment_keys()))
    log.info("wrote %s", ", ".join(str(f) for f in written))


def export() -> None:
    """vpop-export +experiment=NAME [arm=ARM patients=typical|[ids] draw=K ...]: SBML and Antimony of an arm's patients."""
    _export_app()


if __name__ == "__main__":  # pragma: no cover
    {"calibrate": calibrate, "export": export}.get(sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1] in ("calibrate", "export")
                                                   else "", trial)()
