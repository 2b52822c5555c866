"""Recurrent CRS in the myeloma step-up regimens: how many patients have more than one CRS episode, how
long the episodes last, and whether tocilizumab for the first episode lowers recurrence, against what
MajesTEC-1 and the Talvey label published.

    python experiments/validation/recurrence.py --out experiments/validation/results [--draws 20] [--patients 500]

Simulates the cohorts of the recurrent-CRS targets (V33 teclistamab, N39 talquetamab; targets.csv) with
the trial runner at posterior draws (rescue on: tocilizumab at grade >= 2) and writes recurrence.md and
recurrence.csv. An episode is CRS starting after a dose; one still running at the next dose is the same
episode (the labels count onsets). Per draw, then the median and 2.5-97.5 percentiles over draws:
- `recurrent`: the target's endpoint (`crs_recurrent`: CRS starting after two or more doses);
- `episodes_per_patient_with_crs`: mean number of episodes among patients with any;
- `running_at_next_dose`: patients at grade >= 1 in a dose period without a new start (an episode
  carried over a dose);
- `days_at_grade1_per_patient`: median time at grade >= 1 over the course, among patients with CRS;
- `recurrent_after_tocilizumab_first` / `_without`: among patients with CRS, the share with another
  episode later, split by whether the first episode got tocilizumab (in its period: at grade >= 2, or
  for a fever lasting `--set model.crs.rescue_grade1_hours=D` hours), beside MajesTEC-1's split
  (recurrence_published.csv, with its source); tocilizumab there was the investigators' choice, given
  at grade 1 too, not a grade-2 rule.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from vpop import endpoints, posterior
from vpop import targets as published
from vpop.trial import TrialSettings, run_trial

TARGETS = ("V33", "N39")
# Published statistics beside the targets' own rates, with their sources.
PUBLISHED = Path(__file__).with_name("recurrence_published.csv")


def episode_statistics(patients: pd.DataFrame) -> dict[str, float]:
    """The statistics above for one draw's patient rows."""
    grades, days, toci = (published.per_dose_values(patients, n) for n in ("crs_grade", "crs_duration_day", "toci_rescue"))
    starts = (grades >= 1).sum(axis=1)
    crs = starts >= 1
    first = endpoints.first_crs_dose(grades)
    toci_first = crs & (toci[np.arange(len(first)), np.maximum(first, 1) - 1] > 0)
    again = starts >= 2
    return {
        "crs_any": float(crs.mean()),
        "recurrent": float(endpoints.recurrent_crs(grades).mean()),
        "episodes_per_patient_with_crs": float(starts[crs].mean()) if crs.any() else np.nan,
        "running_at_next_dose": float(((days > 0) & (grades == 0)).any(axis=1).mean()),
        "days_at_grade1_per_patient": float(np.median(days.sum(axis=1)[crs])) if crs.any() else np.nan,
        "tocilizumab_for_first_episode": float(toci_first[crs].mean()) if crs.any() else np.nan,
        "recurrent_after_tocilizumab_first": float(again[toci_first].mean()) if toci_first.any() else np.nan,
        "recurrent_after_tocilizumab_first_without": float(again[crs & ~toci_first].mean()) if (crs & ~toci_first).any() else np.nan,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--posterior", default="default", help="default, or a path to a posterior.nc")
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--patients", type=int, default=500, help="virtual patients per draw")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="PATH=NUMBER",
                    help="a model setting for every draw, e.g. model.crs.hold_until_resolved=1 (repeatable)")
    args = ap.parse_args(argv)
    for name in ("draws", "patients"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    draws = posterior.with_settings(posterior.draws(args.posterior, args.draws, args.seed), args.set)
    targets = published.load("targets").set_index("id")
    reported = pd.read_csv(PUBLISHED).set_index(["target", "statistic"]).published
    rows = []
    for tid in TARGETS:
        t = targets.loc[tid]
        arm = published.cohort_arm(t, tid)
        settings = TrialSettings(n=args.patients, seed=args.seed, horizon_days=float(t.horizon_days), trajectories=0)
        patients = run_trial({arm.name: arm}, arm.name, settings, draws=draws).patients
        stats = pd.DataFrame([episode_statistics(d) for _, d in patients.groupby("draw")])
        for stat, values in stats.items():
            rows.append(dict(target=tid, drug=t.drug, regimen=t.regimen, statistic=stat, median=values.median(),
                             lower=values.quantile(0.025), upper=values.quantile(0.975),
                             published=t.k / t.n if stat == "recurrent" else reported.get((tid, stat), np.nan)))
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "recurrence.csv", index=False, float_format="%.4f")
    lines = [f"Recurrent CRS (posterior `{args.posterior}`, {args.draws} draws x {args.patients} patients, seed {args.seed}, "
             "rescue on); median over draws (2.5-97.5 percentiles). Days at grade >= 1: median over patients with CRS.", "",
             "| target | drug | statistic | model | published |", "|---|---|---|---|---|"]
    for r in table.itertuples():
        pct = r.statistic not in ("episodes_per_patient_with_crs", "days_at_grade1_per_patient")
        fmt = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.2f}")
        published_cell = fmt(r.published) if np.isfinite(r.published) else ""
        lines.append(f"| {r.target} | {r.drug} | {r.statistic} | {fmt(r.median)} ({fmt(r.lower)}-{fmt(r.upper)}) | {published_cell} |")
    (args.out / "recurrence.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
