"""The host's share of a streamed trial: what each patient row costs after the device has simulated it.

    python experiments/benchmarks/host_rows.py --n 100000 --chunks 8 --out experiments/benchmarks/results

A streamed run (`vpop-trial ... checkpoint_dir=...`) hands each chunk's device result to the host, which
builds the patient table (`trial.table.patient_table`), counts its endpoints (`statistics.EndpointCounts`)
and CRS onsets (`monitoring.OnsetCounts`) and writes a parquet part (`store.PatientStore`). On the
2-core CPU the device work dominates; on a GPU the host did (0.23.0 on an H200: ~10 us per row against
~2.5 us of device time). This measures the host alone, on one real chunk of the yardstick arm simulated
once: each step's time per row (best of 3), then the host pipeline's rows/s over `--chunks` copies of the
chunk with 0, 1, 2 and 4 writer threads (the runner's own loop: tables and counts in the main thread,
parts handed to the store's writers). Writes host_rows.csv and host_rows.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import open_dict

from vpop.api import compose_trial
from vpop.cli import plan
from vpop.simulate import dispatch_ids
from vpop.store import PatientStore
from vpop.trial.monitoring import OnsetCounts
from vpop.trial.statistics import EndpointCounts
from vpop.trial.table import patient_table


def best_of(f, repeats: int = 3) -> float:
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="patients in the chunk")
    ap.add_argument("--chunks", type=int, default=8, help="chunks through the host pipeline per writer setting")
    ap.add_argument("--writers", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    cfg = compose_trial("yardstick")
    with open_dict(cfg):
        cfg.population.n, cfg.chunk_size, cfg.posterior, cfg.draws = args.n, args.n, "none", 1
    arm = plan(cfg).prepared[0]["iv"]
    start = time.perf_counter()
    result = dispatch_ids(arm, np.arange(args.n), 0, args.n).result()
    simulate_s = time.perf_counter() - start
    periods = {"iv": arm.compiled.periods}
    n_doses = len(arm.compiled.periods)
    table = patient_table(arm, result, 0, n_doses, None, False)
    scratch = Path(tempfile.mkdtemp(prefix="vpop-host-rows-"))

    steps = {
        "patient table": lambda: patient_table(arm, result, 0, n_doses, None, False),
        "endpoint counts": lambda: EndpointCounts(["iv"], "iv", periods).add(0, {"iv": table}),
        "onset counts": lambda: OnsetCounts(periods).add(0, {"iv": table}),
        "parquet part": lambda: PatientStore(scratch / "steps").write("iv", 0, 0, table),
    }
    rows = [{"what": name, "us_per_row": 1e6 * best_of(f) / args.n} for name, f in steps.items()]

    def pipeline(writers: int) -> float:
        store = PatientStore(scratch / f"w{writers}", writers=writers)
        counts, onsets = EndpointCounts(["iv"], "iv", periods), OnsetCounts(periods)
        start = time.perf_counter()
        for c in range(args.chunks):
            t = patient_table(arm, result, 0, n_doses, None, False)
            store.write("iv", 0, c, t)
            counts.add(0, {"iv": t})
            onsets.add(0, {"iv": t})
        store.finish()
        return args.chunks * args.n / (time.perf_counter() - start)

    for w in args.writers:
        rate = pipeline(w)
        rows.append({"what": f"host pipeline, {w} writer threads", "us_per_row": 1e6 / rate, "rows_per_s": rate})
    df = pd.DataFrame(rows).reindex(columns=["what", "us_per_row", "rows_per_s"])
    df["n"], df["cpus"] = args.n, os.cpu_count()
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "host_rows.csv", index=False, float_format="%.3f")
    lines = [f"Host cost per patient row of the yardstick arm ({args.n:,} patients per chunk, {n_doses} dose periods, "
             f"{os.cpu_count()} CPUs; the chunk simulated once in {simulate_s:.1f} s, compilation included).", "",
             "| step | us per row | rows/s |", "|---|---|---|"]
    lines += [f"| {r.what} | {r.us_per_row:.2f} | {'' if pd.isna(r.rows_per_s) else f'{r.rows_per_s:,.0f}'} |"
              for r in df.itertuples()]
    (args.out / "host_rows.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
