"""Streamed trials at scale: the yardstick workload (configs/experiment/yardstick.yaml) through the
whole `vpop-trial` app, patients streamed chunk by chunk to patients.parquet/.

    python experiments/benchmarks/streaming.py --sizes 10000 100000 1000000 --out experiments/benchmarks/results
    python experiments/benchmarks/streaming.py --sizes 10000000 --chunk-size 200000 --tag gpu   # on a GPU node

Each size runs in its own process (posterior=none, one draw, no time-course figure), so the peak
resident memory (ru_maxrss of that child) is that run's alone. Writes streaming[_TAG].csv
(n, wall_s, patients_per_s from the app's own log line, peak_rss_mb, dataset_mb, device) and
streaming[_TAG].png (peak memory and wall time against N).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

RATE = re.compile(r"simulated (\d+) patient-arm-draws in ([\d.]+) s \(([\d.,]+) patients/s")
DEVICES = re.compile(r"on (\d+) (\w+) device\(s\)")


def run_one(n: int, chunk_size: int, workdir: Path) -> dict:
    """One `vpop-trial` process; returns its wall time, throughput and peak RSS."""
    out = workdir / f"n{n}"
    cmd = [sys.executable, "-m", "vpop.cli", "+experiment=yardstick", f"population.n={n}", "posterior=none", "draws=1",
           "trajectories=0", f"chunk_size={chunk_size}", "progress=false", f"checkpoint_dir={workdir / 'checkpoints'}",
           f"hydra.run.dir={out}"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"vpop-trial failed for n={n}:\n{log[-3000:]}")
    rate, devices = RATE.search(log), DEVICES.search(log)
    size = sum(f.stat().st_size for f in (out / "patients.parquet").rglob("*.parquet"))
    return {"n": n, "chunk_size": chunk_size, "wall_s": round(wall, 1), "simulate_s": float(rate.group(2)),
            "patients_per_s": float(rate.group(3).replace(",", "")), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "dataset_mb": round(size / 2**20, 1), "device": f"{devices.group(1)} x {devices.group(2)}"}


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(df.n, df.peak_rss_mb, "o-", color="k")
    a.set_xscale("log")
    a.set_ylim(0, 1.3 * df.peak_rss_mb.max())
    a.set_xlabel("virtual patients (N)")
    a.set_ylabel("peak resident memory (MB)")
    a.set_title("host memory, streamed", fontsize=10)
    b.plot(df.n, df.wall_s, "o-", color="tab:blue", label="whole run")
    b.set_xscale("log")
    b.set_ylim(0, 1.15 * df.wall_s.max())
    b.set_xlabel("virtual patients (N)")
    b.set_ylabel("wall time (s); patients/s incl. compile")
    for r in df.itertuples():
        b.annotate(f"{r.patients_per_s:,}/s", (r.n, r.wall_s), textcoords="offset points", xytext=(-10, 6), fontsize=8)
    b.set_title(f"yardstick, {df.device.iloc[0]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--chunk-size", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--tag", default="", help="suffix of the output files (e.g. gpu)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vpop-stream-") as tmp:
        for n in args.sizes:
            rows.append(run_one(n, args.chunk_size, Path(tmp)))
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "streaming" + (f"_{args.tag}" if args.tag else "")
    df.to_csv(args.out / f"{stem}.csv", index=False)
    plot(df, args.out / f"{stem}.png")
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
