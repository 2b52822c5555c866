"""Hydra multiruns: gather a sweep's trial summaries, and the objective an Optuna sweep minimises.

`GatherSweep` is a Hydra callback (registered in configs/trial.yaml). When a multirun ends it reads
every job's `summary.csv` and `.hydra/overrides.yaml` under the sweep dir and writes there:

- `sweep_summary.csv`: one row per (job, arm, endpoint): job, one column per swept override key (the
  keys whose values differ between jobs, values as given on the command line), arm, endpoint,
  estimate, lower, upper, n;
- `sweep_jobs.csv`: job, overrides, status (ok | missing: no summary.csv, the job failed), output_dir;
- `sweep_main_endpoints.png`: estimate and 95% interval of the main endpoints per job and arm.

A sweep that stopped early (Hydra's basic sweeper raises on the first failed batch, before the
callback) can be gathered afterwards: `python -m vpop.sweep SWEEP_DIR`.

`objective()` turns one job's summary into the number an Optuna sweep minimises: a rate of the
candidate arm, penalised when another endpoint falls below the reference arm's by more than a margin.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vpop import schema
from vpop.catalogue import ConfigError

log = logging.getLogger("vpop.sweep")

SUMMARY_COLUMNS = ("arm", "endpoint", "estimate", "lower", "upper", "n")
PLOT_ENDPOINTS = ("orr", "cr", "crs_any", "crs_grade2plus")
TABLE_ENDPOINTS = ("orr", "crs_grade2plus")
# Rates are percentages, so a feasible objective is at most 100: adding this to an infeasible point
# ranks it behind every feasible one whatever the sampler proposes.
INFEASIBLE_PENALTY = 100.0


# ---------------------------------------------------------------------------------------------
# Gathering a sweep


def find_jobs(sweep_dir: Path) -> list[Path]:
    """Job folders under the sweep dir: those holding `.hydra/overrides.yaml`, in job order.

    Found by their Hydra record rather than from `hydra.sweep.subdir`, which may be any pattern
    (e.g. `${hydra.job.override_dirname}`) and cannot be resolved once the jobs are gone.
    """
    jobs = []
    for f in sweep_dir.rglob("overrides.yaml"):
        job = f.parent.parent
        rel = job.relative_to(sweep_dir)
        if f.parent.name == ".hydra" and job != sweep_dir and not any(p.startswith(".") for p in rel.parts):
            jobs.append(job)  # hidden folders (.submitit, .hydra) are never jobs
    return sorted(jobs, key=lambda j: _natural_key(j.relative_to(sweep_dir).as_posix()))


def _natural_key(s: str) -> list:
    """'10' after '9': job numbers sort as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def parse_override(text: str) -> tuple[str, str | None]:
    """('step_up.dose1_mg', '0.5') from 'step_up.dose1_mg=0.5'; '+', '++' and '~' prefixes dropped."""
    key, sep, value = text.partition("=")
    return key.lstrip("+~"), (value if sep else None)


def read_overrides(job_dir: Path) -> list[str]:
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    return [str(o) for o in overrides]


def swept_keys(overrides: Mapping[str, Mapping[str, str | None]]) -> list[str]:
    """Override keys whose value is not the same in every job (absent counts as a value)."""
    keys: list[str] = []
    for per_job in overrides.values():
        keys += [k for k in per_job if k not in keys]
    return [k for k in keys if len({per_job.get(k, "<absent>") for per_job in overrides.values()}) > 1]


def gather(sweep_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(sweep summary, job table, swept keys) of the sweep dir; no file is written."""
    root = Path(sweep_dir)
    jobs = find_jobs(root)
    if not jobs:
        raise FileNotFoundError(f"no Hydra job folders (with .hydra/overrides.yaml) under {root}")
    ids = [j.relative_to(root).as_posix() for j in jobs]
    raw = {i: read_overrides(j) for i, j in zip(ids, jobs)}
    parsed = {i: dict(parse_override(o) for o in raw[i]) for i in ids}
    keys = swept_keys(parsed)
    frames, rows = [], []
    for i, job in zip(ids, jobs):
        path = job / "summary.csv"
        rows.append({"job": i, "overrides": " ".join(raw[i]), "status": "ok" if path.is_file() else "missing",
                     "output_dir": str(job.resolve())})
        if path.is_file():
            frames.append(_job_summary(path, i, {k: parsed[i].get(k) for k in keys}))
    columns = ["job", *keys, *SUMMARY_COLUMNS]
    summary = pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)
    return summary, pd.DataFrame(rows, columns=["job", "overrides", "status", "output_dir"]), keys


def _job_summary(path: Path, job: str, values: Mapping[str, str | None]) -> pd.DataFrame:
    s = pd.read_csv(path)
    missing = [c for c in SUMMARY_COLUMNS if c not in s.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; summary.csv has {list(s.columns)}")
    return s[list(SUMMARY_COLUMNS)].assign(job=job, **values)


def _interval(r) -> str:
    return f"{r.estimate:.1f} ({r.lower:.1f}-{r.upper:.1f})"


def markdown_table(summary: pd.DataFrame, keys: list[str], endpoints=TABLE_ENDPOINTS) -> str:
    """Per job and arm: the swept values and each endpoint as 'estimate (lower-upper)' in %."""
    s = summary[summary.endpoint.isin(endpoints)]
    head = ["job", *keys, "arm", *(f"{e} %" for e in endpoints)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (job, arm), g in s.groupby(["job", "arm"], sort=False):
        by_endpoint = {r.endpoint: _interval(r) for r in g.itertuples()}
        first = g.iloc[0]
        cells = [str(job), *(str(first[k]) for k in keys), str(arm), *(by_endpoint.get(e, "-") for e in endpoints)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def job_labels(summary: pd.DataFrame, keys: list[str]) -> dict[str, str]:
    """'dose1_mg=0.5, target_mg=30' per job: last part of each key when those are unambiguous."""
    short = [k.rsplit(".", 1)[-1] for k in keys]
    names = short if len(set(short)) == len(short) else keys
    labels = {}
    for job, g in summary.groupby("job", sort=False):
        first = g.iloc[0]
        labels[job] = ", ".join(f"{n}={first[k]}" for n, k in zip(names, keys)) or f"job {job}"
    return labels


def plot_main_endpoints(summary: pd.DataFrame, keys: list[str], path: Path, endpoints=PLOT_ENDPOINTS) -> None:
    """Dot-and-whisker chart: one panel per endpoint (2 per row), one row group per job, arms side by side."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state in the Hydra process

    endpoints = [e for e in endpoints if e in set(summary.endpoint)] or sorted(set(summary.endpoint))[:4]
    jobs = list(dict.fromkeys(summary.job))
    arms = list(dict.fromkeys(summary.arm))
    labels = job_labels(summary, keys)
    spread = 0.6 / len(arms)  # arms of one job within +-0.3 of its row
    ncols = min(2, len(endpoints))
    nrows = -(-len(endpoints) // ncols)
    panel_height = 0.18 * len(jobs) * (len(arms) + 1) + 1.1
    fig = Figure(figsize=(4.2 * ncols + 0.07 * max(len(t) for t in labels.values()) + 0.8, panel_height * nrows))
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax, endpoint in zip(axes, endpoints):
        s = summary[summary.endpoint == endpoint].set_index(["job", "arm"])
        for a, arm in enumerate(arms):
            rows = [(j, s.loc[(j, arm)]) for j in jobs if (j, arm) in s.index]
            if not rows:
                continue
            y = [-jobs.index(j) - (a - (len(arms) - 1) / 2) * spread for j, _ in rows]  # first arm on top
            est = [r.estimate for _, r in rows]
            err = [[r.estimate - r.lower for _, r in rows], [r.upper - r.estimate for _, r in rows]]
            ax.errorbar(est, y, xerr=err, fmt="o", ms=4, capsize=2, color=f"C{a}", label=arm)
        for k in range(1, len(jobs)):
            ax.axhline(-k + 0.5, color="0.85", lw=0.6)
        ax.set_title(endpoint, fontsize=10)
        ax.set_xlabel("% (95% interval)", fontsize=8)
        ax.set_xlim(-2, 102)
        ax.set_yticks([-k for k in range(len(jobs))], [labels[j] for j in jobs], fontsize=8)
        ax.set_ylim(-len(jobs) + 0.5, 0.5)
    for ax in axes[len(endpoints):]:
        ax.set_axis_off()
    handles, names = axes[0].get_legend_handles_labels()
    height = fig.get_figheight()
    fig.legend(handles, names, loc="upper center", ncol=len(names), fontsize=8, frameon=False)  # above, off the data
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))
    fig.savefig(path, dpi=120)


def write_sweep_outputs(sweep_dir: str | Path) -> list[Path]:
    """Gather the sweep into sweep_summary.csv, sweep_jobs.csv and sweep_main_endpoints.png."""
    root = Path(sweep_dir)
    summary, jobs, keys = gather(root)
    written = [root / "sweep_summary.csv", root / "sweep_jobs.csv"]
    summary.to_csv(written[0], index=False, float_format="%.3f")
    jobs.to_csv(written[1], index=False)
    missing = jobs[jobs.status == "missing"]
    if not missing.empty:
        log.warning("%d of %d job(s) wrote no summary.csv (failed or unfinished): %s", len(missing), len(jobs),
                    "; ".join(f"{r.job} [{r.overrides}]" for r in missing.itertuples()))
    if not summary.empty:
        written.append(root / "sweep_main_endpoints.png")
        plot_main_endpoints(summary, keys, written[-1])
        log.info("sweep of %d job(s), swept: %s\n%s", len(jobs), ", ".join(keys) or "(nothing differs)",
                 markdown_table(summary, keys))
    log.info("wrote %s", ", ".join(str(p) for p in written))
    return written


class GatherSweep(Callback):
    """Hydra callback: gather the sweep's summaries when a multirun ends (never for a single run)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_sweep_outputs(config.hydra.sweep.dir)


# ---------------------------------------------------------------------------------------------
# Objective for the Optuna sweeper


def objective_spec(objective: Mapping | DictConfig, experiment: Mapping | DictConfig | None = None) -> dict:
    """The `objective:` block as a plain dict with `reference_arm` added, checked before simulating.

    The reference arm, unless the block names one, is the experiment's (its `reference_arm`, else its
    first arm, as for a trial).
    Arm names are checked here; endpoint names only once a summary exists (`objective()`).
    """
    spec = OmegaConf.to_container(objective, resolve=True) if isinstance(objective, DictConfig) else dict(objective)
    schema.check(spec, schema.Objective, "objective")
    margin = spec["margin_pp"]
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ConfigError(f"objective.margin_pp must be a number of percentage points >= 0, got {margin!r}")
    if experiment is not None:
        arms = [str(a) for a in experiment["arms"]]
        spec.setdefault("reference_arm", str(experiment.get("reference_arm") or arms[0]))
        if spec["reference_arm"] not in arms:
            raise ConfigError(f"objective.reference_arm '{spec['reference_arm']}' is not an arm; allowed: {', '.join(arms)}")
        _check_arm(spec["arm"], arms, spec["reference_arm"])
    return spec


def _check_arm(arm: str, arms: list[str], reference_arm: str) -> None:
    if arm not in arms:
        raise ConfigError(f"objective.arm '{arm}' is not an arm; allowed: {', '.join(arms)}")
    if arm == reference_arm:
        others = [a for a in arms if a != reference_arm]
        raise ConfigError(f"objective.arm '{arm}' is the reference arm it is compared with; allowed: "
                          f"{', '.join(others) or '(none: add a candidate arm)'}")


def objective(summary: pd.DataFrame, spec: Mapping | DictConfig, reference_arm: str | None = None) -> float:
    """The value to minimise for one trial: the candidate's `minimise` rate (%) plus a penalty.

    Feasible when the candidate's `no_worse_than` rate is at least the reference arm's minus
    `margin_pp`; otherwise 100 + the shortfall (pp) is added, so every infeasible design ranks behind
    every feasible one and, among infeasible designs, the nearer to feasible ranks first.
    `reference_arm` defaults to spec['reference_arm'] (set by `objective_spec` from the experiment).
    """
    spec = objective_spec(spec)
    reference = reference_arm or spec.get("reference_arm")
    if reference is None:
        raise ConfigError("objective: no reference arm; pass reference_arm or set objective.reference_arm")
    arms = sorted(set(summary.arm))
    if reference not in arms:
        raise ConfigError(f"objective: reference arm '{reference}' is not in the summary; arms: {', '.join(arms)}")
    _check_arm(spec["arm"], arms, reference)
    endpoints = sorted(set(summary.endpoint))
    for field in ("minimise", "no_worse_than"):
        if spec[field] not in endpoints:
            raise ConfigError(f"objective.{field} '{spec[field]}' is not an endpoint; allowed: {', '.join(endpoints)}")
    rate = _estimate(summary, spec["arm"], spec["minimise"])
    shortfall = (_estimate(summary, reference, spec["no_worse_than"]) - spec["margin_pp"]) - _estimate(
        summary, spec["arm"], spec["no_worse_than"])
    return float(rate + (INFEASIBLE_PENALTY + shortfall if shortfall > 0 else 0.0))


def _estimate(summary: pd.DataFrame, arm: str, endpoint: str) -> float:
    rows = summary[(summary.arm == arm) & (summary.endpoint == endpoint)]
    value = float(rows.estimate.iloc[0])
    if not math.isfinite(value):  # e.g. no patient evaluable: no number to rank a design by
        raise ValueError(f"summary: {endpoint} of arm '{arm}' is {value}; the objective needs a finite rate")
    return value


if __name__ == "__main__":  # python -m vpop.sweep SWEEP_DIR: gather a sweep after the fact
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(sys.argv) != 2:
        sys.exit("usage: python -m vpop.sweep SWEEP_DIR")
    write_sweep_outputs(sys.argv[1])
