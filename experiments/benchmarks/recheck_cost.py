"""Wall-clock cost of the grade recheck (`model.solver.recheck_margin`) on the yardstick workload
(mosunetuzumab IV 1/2/60/60/30 mg q21d, 126 days, R/R FL, CRS rescue on as in a trial).

    python experiments/benchmarks/recheck_cost.py --n 20000 --repeats 3 --out experiments/benchmarks/results

Each setting first runs the whole workload once (timed apart: it compiles the kernel and the recheck's
kernel for each batch size it meets), then the settings are run in turn, `--repeats` times each, so
drift of the machine's speed falls on all of them. Reports patients/s
(median over the repeats), the share of patients rechecked and the compile time. Writes
recheck_cost.md and recheck_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from yardstick import REGIMEN  # noqa: E402  (the yardstick's arm)

MARGINS = (None, 0.02, 0.05, 0.1)


def _prepared(margin):
    from omegaconf import OmegaConf

    from vpop import catalogue
    from vpop.simulate import Arm, prepare_arm

    model = OmegaConf.merge(catalogue.load("model", "default"), {"solver": {"recheck_margin": margin}})
    return prepare_arm(Arm("yardstick", "mosunetuzumab", "iv", "fl_rr", REGIMEN), model)


def study(n: int, chunk: int, repeats: int) -> dict:
    from vpop.simulate import simulate_arm

    prepared, compile_s = {}, {}
    for m in MARGINS:
        prepared[m] = _prepared(m)
        t0 = time.perf_counter()
        simulate_arm(prepared[m], n, seed=0, chunk_size=chunk)
        compile_s[m] = time.perf_counter() - t0
    runs = {m: [] for m in MARGINS}
    rechecked = {}
    for _ in range(repeats):
        for m in MARGINS:
            t0 = time.perf_counter()
            red = simulate_arm(prepared[m], n, seed=0, chunk_size=chunk).reductions
            runs[m].append(n / (time.perf_counter() - t0))
            rechecked[m] = float(100 * red["grid_rechecked"].mean()) if m is not None else 0.0
    base = float(np.median(runs[None]))
    return dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count()), n=n, chunk=chunk, repeats=repeats,
                settings=[dict(recheck_margin=m, patients_per_s=float(np.median(runs[m])), all_patients_per_s=runs[m],
                               relative_throughput=float(np.median(runs[m])) / base, rechecked_percent=rechecked[m],
                               first_run_s=compile_s[m]) for m in MARGINS])


def table(res: dict) -> str:
    lines = [f"Yardstick arm (mosunetuzumab IV, 126 days, rescue on), {res['n']:,} patients in chunks of {res['chunk']:,}, "
             f"median of {res['repeats']} alternated runs; {res['machine']['platform']}, {res['machine']['cpus']} CPUs.", "",
             "| recheck_margin | patients rechecked | patients/s | throughput | first run (compiles what the settings above had not), s |", "|---|---|---|---|---|"]
    for s in res["settings"]:
        m = "null (off)" if s["recheck_margin"] is None else f"{s['recheck_margin']:g}"
        lines.append(f"| {m} | {s['rechecked_percent']:.1f}% | {s['patients_per_s']:,.0f} | {100 * s['relative_throughput']:.0f}% | "
                     f"{s['first_run_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--chunk", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("experiments/benchmarks/results"))
    args = ap.parse_args()
    res = study(args.n, args.chunk, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recheck_cost.json").write_text(json.dumps(res, indent=2))
    (args.out / "recheck_cost.md").write_text(table(res))
    print(table(res))


if __name__ == "__main__":
    main()
