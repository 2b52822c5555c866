"""How representative is a calibration cohort? Every target's rate at a posterior's medians (the
shipped one by default), on the calibration's own virtual cohort (the first `--patients` ids of its seed)
and on `--blocks` cohorts of that size drawn after it (the same seed, consecutive ids), so the first
block is the cohort the calibration fitted and the pooled blocks approximate the population rate the
trial runner reports.

    python experiments/calibration/cohort_size.py --patients 96 --blocks 8 --out experiments/calibration/results_cohort_size
    python experiments/calibration/cohort_size.py --posterior PATH/posterior.nc --out DIR   # another posterior

A fixed cohort (common random numbers) makes the rates smooth in the parameters, but its rates differ
from the population's by its sampling error, the same at every parameter value: a bias the fit absorbs
into the parameters. Validation targets are reported beside the calibration targets (never fitted).
Writes cohort_size.csv (per target: role, observed, first block, pooled, block SD, the first block's
bias) and cohort_size.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from vpop import calibration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=96, help="patients per cohort (the calibration's patients_per_cohort)")
    ap.add_argument("--blocks", type=int, default=8, help="cohorts of that size pooled for the population rate")
    ap.add_argument("--seed", type=int, default=0, help="the calibration's seed")
    ap.add_argument("--posterior", default="default", help="default, or a path to a posterior.nc")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.patients < 1 or args.blocks < 2:
        ap.error("--patients must be >= 1 and --blocks >= 2")

    # No parameter fitted: every one at the posterior's median (the prior truncation, required, is unused).
    cfg = OmegaConf.create({"targets": "targets", "only_targets": None, "horizon_days": None, "seed": args.seed,
                            "patients_per_cohort": args.patients * args.blocks, "prior_truncation_sd": 3.0,
                            "extends": args.posterior, "parameters": []})
    started = time.perf_counter()
    problem = calibration.build_problem(cfg, roles=("calibration", "validation"))
    expected = jax.jit(lambda: problem.patient_expectations({}))()
    seconds = time.perf_counter() - started

    rows = []
    for t in problem.targets.itertuples():
        blocks = 100 * np.asarray(expected[t.id]).reshape(args.blocks, args.patients).mean(axis=1)
        rows.append(dict(target=t.id, role=t.role, drug=t.drug, population=t.population, endpoint=t.endpoint, n=int(t.n),
                         observed_percent=100 * t.k / t.n, first_block_percent=blocks[0], pooled_percent=blocks.mean(),
                         block_sd_percent=blocks.std(ddof=1), first_block_bias_percent=blocks[0] - blocks.mean()))
    d = pd.DataFrame(rows)
    d["first_block_error_percent"] = (d.first_block_percent - d.observed_percent).abs()
    d["pooled_error_percent"] = (d.pooled_percent - d.observed_percent).abs()
    args.out.mkdir(parents=True, exist_ok=True)
    d.to_csv(args.out / "cohort_size.csv", index=False, float_format="%.3f")
    cal, val = d[d.role == "calibration"], d[d.role == "validation"]
    worst = cal.reindex(cal.first_block_bias_percent.abs().sort_values(ascending=False).index).head(10)
    lines = [
        f"Targets at the medians of posterior `{args.posterior}`: the calibration's cohort (ids 0-{args.patients - 1}, "
        f"seed {args.seed}) against {args.blocks} cohorts of {args.patients} pooled ({args.patients * args.blocks} patients). "
        f"{seconds:.0f} s (compilation included).",
        "",
        f"| | calibration ({len(cal)}) | validation ({len(val)}) |",
        "|---|---|---|",
        f"| mean absolute error against observed, the calibration's cohort | {cal.first_block_error_percent.mean():.2f} pp | "
        f"{val.first_block_error_percent.mean():.2f} pp |",
        f"| mean absolute error against observed, pooled | {cal.pooled_error_percent.mean():.2f} pp | {val.pooled_error_percent.mean():.2f} pp |",
        f"| mean absolute bias of the calibration's cohort (first block - pooled) | {cal.first_block_bias_percent.abs().mean():.2f} pp | "
        f"{val.first_block_bias_percent.abs().mean():.2f} pp |",
        f"| largest absolute bias | {cal.first_block_bias_percent.abs().max():.2f} pp | {val.first_block_bias_percent.abs().max():.2f} pp |",
        f"| mean SD of a cohort's rate across the {args.blocks} blocks | {cal.block_sd_percent.mean():.2f} pp | {val.block_sd_percent.mean():.2f} pp |",
        "",
        "The ten largest biases among the calibration targets:",
        "",
        "| target | drug | endpoint | observed % | calibration's cohort % | pooled % | block SD pp |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r.target} | {r.drug} | {r.endpoint} | {r.observed_percent:.1f} | {r.first_block_percent:.1f} | {r.pooled_percent:.1f} | "
          f"{r.block_sd_percent:.1f} |" for r in worst.itertuples()],
    ]
    (args.out / "cohort_size.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
