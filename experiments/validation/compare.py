"""Two validation reports side by side: is a candidate posterior better than the shipped one?

    python experiments/validation/run.py --out BASE --draws 10 --patients 400
    python experiments/validation/run.py --out NEW --posterior PATH/posterior.nc --draws 10 --patients 400
    python experiments/validation/compare.py BASE NEW [--out comparison.md] [--moved 1.5]

Both reports must come from the same settings (seed, draws, patients), so that the patients and the
posterior draws' order match and only the posterior differs. Writes markdown: the mean absolute error
(percentage points) and the count of targets whose predictive interval overlaps the observed one, by
role (calibration targets were fitted, validation targets never were) and by kind (CRS or response),
then every target whose prediction moved by more than --moved points, and, where both reports have
onsets.csv, the median onset and episode of each published cohort beside the published medians and
how far each lies outside them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from vpop.trial.monitoring import published_gap_hours, published_text

ROLES = ("calibration", "validation")


def _read(folder: Path) -> pd.DataFrame:
    path = folder / "validation.csv"
    if not path.is_file():
        sys.exit(f"{path}: no such file (the --out folder of experiments/validation/run.py)")
    table = pd.read_csv(path)
    return table[table.role.isin(ROLES)].set_index("target")


def summary(base: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """MAE (pp) and overlapping targets by role and kind, base against new."""
    rows = []
    for role in ROLES:
        for kind in ("all", "CRS", "response"):
            keep = base.role == role
            if kind != "all":
                keep &= base.endpoint.str.startswith("crs") == (kind == "CRS")
            b, n = base[keep], new.loc[base.index[keep]]
            rows.append({"role": role, "targets": kind, "n": int(keep.sum()),
                         "MAE base (pp)": round(100 * b.abs_error.mean(), 2), "MAE new (pp)": round(100 * n.abs_error.mean(), 2),
                         "overlapping base": int(b.overlap.sum()), "overlapping new": int(n.overlap.sum())})
    return pd.DataFrame(rows)


def moved(base: pd.DataFrame, new: pd.DataFrame, threshold_pp: float) -> pd.DataFrame:
    """Targets whose predicted rate moved by more than `threshold_pp` points, with which is closer."""
    table = pd.DataFrame({"role": base.role, "drug": base.drug, "endpoint": base.endpoint,
                          "observed": 100 * base.observed, "base": 100 * base.predicted, "new": 100 * new.predicted,
                          "overlap base": base.overlap, "overlap new": new.overlap})
    table["closer"] = ((table.new - table.observed).abs() < (table.base - table.observed).abs()).map({True: "new", False: "base"})
    return table[(table.new - table.base).abs() > threshold_pp].round(1)


def onsets(base_folder: Path, new_folder: Path) -> pd.DataFrame | None:
    """Median onset and episode (hours) of each published cohort, base against new, and how far each lies
    outside the published median's interval (`gap`, hours, 0 inside: a median published in whole days is
    the hours of that day, read from whichever report has `published_*_lower_hours`, since 0.29.1; an
    older pair is compared with the figure itself). None where either report predates onsets.csv."""
    paths = [folder / "onsets.csv" for folder in (base_folder, new_folder)]
    if not all(p.is_file() for p in paths):
        return None
    keys = ["drug", "regimen", "dose"]
    b, n = (pd.read_csv(p, dtype={"dose": str}).set_index(keys) for p in paths)
    columns = {"after": b.label}
    for what, name in (("onset", "onset"), ("duration", "episode")):
        upper = b[f"published_median_{what}_hours"]
        lower = next((t[f"published_{what}_lower_hours"].reindex(b.index) for t in (n, b)
                      if f"published_{what}_lower_hours" in t), upper)
        base, new = b[f"median_{what}_hours"], n[f"median_{what}_hours"].reindex(b.index)
        columns |= {f"{name} base": base, f"{name} new": new,
                    f"{name} published": [published_text(lo, up) for lo, up in zip(lower, upper)],
                    f"{name} gap base": published_gap_hours(base, lower, upper),
                    f"{name} gap new": published_gap_hours(new, lower, upper)}
    return pd.DataFrame(columns, index=b.index).round(1)


def _markdown(table: pd.DataFrame) -> str:
    rows = [[str(i) for i in table.reset_index().columns]] + [[str(v) for v in r] for r in table.reset_index().itertuples(index=False)]
    return "\n".join(["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, help="the reference report's folder (e.g. the shipped posterior's)")
    parser.add_argument("new", type=Path, help="the candidate's report folder")
    parser.add_argument("--moved", type=float, default=1.5, help="list targets that moved by more than this (pp)")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    base, new = _read(args.base), _read(args.new)
    if set(base.index) != set(new.index):
        sys.exit(f"the reports hold different targets: only in base {sorted(set(base.index) - set(new.index))}, "
                 f"only in new {sorted(set(new.index) - set(base.index))}")
    text = (f"# {args.new} against {args.base}\n\n{_markdown(summary(base, new).set_index('role'))}\n\n"
            f"Targets that moved by more than {args.moved:g} points (rates in %):\n\n"
            f"{_markdown(moved(base, new, args.moved))}\n")
    hours = onsets(args.base, args.new)
    if hours is not None:
        text += f"\nMedian hours from a dose to the onset of CRS, and of the episodes (onsets.csv):\n\n{_markdown(hours)}\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
