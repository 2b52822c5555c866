"""The GPU check (issue 14, part 4) in one process tree, sized for a short device lease:

    python experiments/benchmarks/gpu.py --out DIR [--sizes 100000 1000000] [--stream 10000000]

1. throughput: the yardstick (experiments/benchmarks/yardstick.py) at each size, float32, one chunk
   per device call of `--chunk` patients: patients/s after compilation, compile s, peak device memory;
   and float64 at the first size;
2. accuracy: vpop's default grid in float32 and float64 on the first `--accuracy-n` yardstick patients
   (CRS rescue off), their per-period peak IL-6 signalling saved, and their log error against
   `--reference` (median, p90, p99, max): libroadrunner at rtol 1e-9 on vpop's SBML export, the
   reference of experiments/benchmarks/peer.py, computed on the host beforehand
   (`--make-reference N PATH`, a few minutes on 2 cores for 1,000 patients) and carried;
3. the host's share of a streamed run (experiments/benchmarks/host_rows.py) on a chunk of `--host-rows`
   patients: each host step's time per row and the host pipeline's rows/s with 0, 1, 2 and 4 writer
   threads, the ceiling a streamed run meets once the device is faster;
4. the streamed run through the app (`vpop-trial +experiment=yardstick`, experiments/benchmarks/streaming.py)
   at `--stream` patients;
5. calibration with simulator gradients: one value-and-gradient of the calibration's log density
   through the simulator for every calibration cohort (configs/calibration/default.yaml), compile
   and per-call seconds, the cost that decides whether NUTS can run on the simulator itself. The 19
   cohorts are padded to one grid shape (`--gradient-growth`, default inf: one kernel), since padding
   costs a device little and compilation is what cut 0.22.0's attempt short (2-core CPU, 0.26.1:
   compile 110 s and 14.1 s per gradient with one kernel, 311 s and 9.6 s with the trial's four).

Each step appends to DIR/gpu.json as it finishes, so a lease that runs out keeps what was measured.
Every step runs in its own process (peak memories are that step's alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from yardstick import accuracy  # noqa: E402  (one definition of the accuracy measures)


def _worker(args: list[str], x64: bool = False, timeout_s: float | None = None) -> dict:
    env = {**os.environ, **({"JAX_ENABLE_X64": "1"} if x64 else {})}
    out = subprocess.run([sys.executable, str(HERE / "yardstick.py"), "--worker", *args], capture_output=True, text=True,
                         env=env, check=False, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gradient_timing(growth: float, repeats: int = 3) -> dict:
    """Seconds to compile and to evaluate one value-and-gradient of the calibration log density
    through the simulator (all calibration cohorts of the shipped calibration settings), the cohorts
    grouped by grid length at `growth` (`model.solver.shared_shape_growth`; inf: one kernel)."""
    import jax
    from numpyro.infer.util import potential_energy
    from omegaconf import OmegaConf

    from vpop import catalogue
    from vpop.calibration import build_problem
    from vpop.calibration.likelihood import numpyro_model

    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "configs" / "calibration" / "default.yaml")
    model = catalogue.load("model", "default")
    model.solver.shared_shape_growth = growth
    problem = build_problem(cfg, roles=("calibration",), model=model)
    u = {p.site: jax.numpy.asarray(0.0) for p in problem.parameters}
    energy = jax.jit(jax.value_and_grad(lambda z: potential_energy(numpyro_model, (problem,), {}, z)))
    t0 = time.perf_counter()
    jax.block_until_ready(energy(u))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(energy(u))
        times.append(time.perf_counter() - t0)
    return dict(cohorts=len(problem.cohorts), kernels=len(problem.stacks), patients_per_cohort=int(cfg.patients_per_cohort),
                parameters=len(problem.parameters), compile_s=compile_s, seconds_per_gradient=float(np.median(times)),
                device=str(jax.devices()[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--chunk", type=int, default=1_000_000, help="patients per device call")
    ap.add_argument("--accuracy-n", type=int, default=1000)
    ap.add_argument("--reference", help="npz of the reference peaks (--make-reference); without it arrays are only saved")
    ap.add_argument("--make-reference", nargs=2, metavar=("N", "PATH"),
                    help="on the host: solve the first N yardstick patients in libroadrunner (rtol 1e-9) and save to PATH")
    ap.add_argument("--gradient-timeout", type=float, default=300, help="seconds the gradient step may take (0: skip it)")
    ap.add_argument("--gradient-growth", type=float, default=float("inf"),
                    help="cohorts padded to one grid shape while their lengths differ by at most this factor (inf: one kernel)")
    ap.add_argument("--host-rows", type=int, default=1_000_000, help="patients of the host-share chunk (0: skip)")
    ap.add_argument("--stream", type=int, default=10_000_000, help="patients of the streamed app run (0: skip)")
    ap.add_argument("--stream-chunk", type=int, default=1_000_000)
    ap.add_argument("--gradient-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gradient_worker:
        print(json.dumps(gradient_timing(args.gradient_growth)))
        return
    if args.make_reference:
        make_reference(int(args.make_reference[0]), args.make_reference[1])
        return

    out = Path(args.out)
    arrays = out / "arrays"
    arrays.mkdir(parents=True, exist_ok=True)
    results: dict = {"steps": []}

    def record(step: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # keep going: a lease is short, later steps still count
            value = {"error": str(exc)[-2000:]}
        results["steps"].append({"step": step, "wall_s": time.perf_counter() - t0, **value})
        (out / "gpu.json").write_text(json.dumps(results, indent=2))
        print(step, json.dumps(value), flush=True)

    for n in args.sizes:
        record(f"yardstick float32 N={n}", lambda n=n: _worker(["vpop", str(n), str(min(n, args.chunk))]))
    record(f"yardstick float64 N={args.sizes[0]}", lambda: _worker(["vpop", str(args.sizes[0]), str(min(args.sizes[0], args.chunk))], x64=True))

    n_acc = str(args.accuracy_n)
    for name, x64 in (("float32", False), ("float64", True)):
        path = str(arrays / f"vpop_{name}.npz")
        record(f"accuracy {name}", lambda path=path, x64=x64: {
            **_worker(["vpop", n_acc, n_acc, path], x64=x64),
            **({"accuracy": accuracy(path, args.reference)} if args.reference else {})})

    if args.host_rows:
        def host_rows():
            cmd = [sys.executable, str(HERE / "host_rows.py"), "--n", str(args.host_rows), "--chunks", "4", "--out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(proc.stdout[-1500:] + proc.stderr[-1500:])
            import pandas as pd

            rows = pd.read_csv(out / "host_rows.csv")
            return {"host_rows": rows.astype(object).where(rows.notna(), None).to_dict("records")}  # null, not NaN, in gpu.json

        record(f"host share N={args.host_rows}", host_rows)

    if args.stream:
        def stream():
            cmd = [sys.executable, str(HERE / "streaming.py"), "--sizes", str(args.stream), "--chunk-size", str(args.stream_chunk),
                   "--tag", "gpu", "--out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(proc.stdout[-1500:] + proc.stderr[-1500:])
            import pandas as pd

            return pd.read_csv(out / "streaming_gpu.csv").iloc[-1].to_dict()

        record(f"streamed app run N={args.stream}", stream)

    # Last: compiling the gradient through every calibration cohort is the step whose time is hardest to
    # foresee (2-core CPU: 110 s with one kernel, 226-311 s with four).
    def gradient():
        proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--gradient-worker",
                               "--gradient-growth", str(args.gradient_growth)], capture_output=True, text=True,
                              timeout=args.gradient_timeout)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        return json.loads(proc.stdout.strip().splitlines()[-1])

    if args.gradient_timeout > 0:
        record("simulator gradient (calibration)", gradient)


def make_reference(n: int, path: str) -> None:
    """The accuracy reference on the host: the first `n` yardstick patients (CRS rescue off) in
    libroadrunner at rtol 1e-9 on vpop's SBML export (peer.py's reference), 2 processes."""
    from peer import _problem, roadrunner_run

    ref = roadrunner_run(_problem(n), 1e-9, 2)
    np.savez(path, peak_il6_signalling_pg_ml=ref["peaks"], malignant_nadir_fraction=ref["nadirs"])
    print(json.dumps({k: ref[k] for k in ("method", "n", "run_s", "failed")}))

if __name__ == "__main__":
    main()
