"""The performance yardstick (DESIGN.md section 8): mosunetuzumab IV 1/2/60/60/30 mg q21d for 6 cycles
(126 days) in R/R FL, all endpoints reduced on device.

    python experiments/benchmarks/yardstick.py --sizes 1000 10000 100000 --out experiments/benchmarks/results

measures, each in its own process (so peak memory is that run's):
  vpop      patients/s after compilation, compile time, peak host RSS (and peak device memory on GPU)
  reference float64 diffrax Kvaerno5 (rtol 1e-8) on a 4x refined grid: the accuracy yardstick
  diffrax   a plain diffrax vmap with an adaptive solver (Kvaerno5, float64) at several tolerances
and writes results.json and results.md (a table) with per-patient accuracy of peak IL-6 signalling
(every dose period) and tumour nadir against the reference. The CPU peer a QSP modeller would use,
libroadrunner on vpop's SBML export, is benchmarked in peer.py. (A scipy solve_ivp loop over the jitted
right-hand side used to stand here: it timed Python dispatching one JAX call per right-hand-side
evaluation, not a solver.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REGIMEN = {
    "cycle_days": 21,
    "cycles": 6,
    "doses": [
        {"cycle": 1, "day": 1, "amount": 1, "unit": "mg"},
        {"cycle": 1, "day": 8, "amount": 2, "unit": "mg"},
        {"cycle": 1, "day": 15, "amount": 60, "unit": "mg"},
        {"cycle": 2, "day": 1, "amount": 60, "unit": "mg"},
        {"cycles": "3-6", "day": 1, "amount": 30, "unit": "mg"},
    ],
}
ACCURACY_KEYS = ("peak_il6_signalling_pg_ml", "malignant_nadir_fraction")


# A finer time grid than the default (configs/model/default.yaml, solver), for accuracy on a par
# with the adaptive solvers.
FINE_GRID = {"model.solver.first_step_hours": 0.25, "model.solver.step_growth": 1.15, "model.solver.fine_max_step_days": 0.05,
             "model.solver.max_step_days": 0.125}


def _prepare(rescue: bool = True, fine: bool = False, tolerance: float | None = None):
    """The yardstick arm, on the default grid, the fine grid, or the default grid regridded at an
    error tolerance (`model.solver.error_tolerance`). Accuracy runs switch the in-simulation CRS rescue
    off: whether a patient near a grade threshold gets tocilizumab is a discontinuity of the model, not
    an integration error."""
    from omegaconf import OmegaConf

    from vpop import catalogue
    from vpop.simulate import Arm, prepare_arm

    model = OmegaConf.merge(catalogue.load("model", "default"), {"solver": {"error_tolerance": tolerance}})
    overrides = {**({} if rescue else {"model.crs.rescue": 0}), **(FINE_GRID if fine else {})}
    return prepare_arm(Arm("yardstick", "mosunetuzumab", "iv", "fl_rr", REGIMEN), model, overrides=overrides)


def _patients(prepared, ids, seed=0):
    """Covariates and parameters of patients `ids` (batched)."""
    import jax
    import jax.numpy as jnp

    from vpop.simulate import _patient_params, cohort_covariates

    ids = jnp.asarray(ids)
    cov = cohort_covariates(prepared.inputs.covariate_params, ids, jnp.asarray(seed), prepared.covariate_kinds)
    return jax.jit(jax.vmap(lambda c, i: _patient_params(prepared.inputs, c, i, jnp.asarray(seed), prepared.variability_paths)))(cov, ids)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _device_peak_mb():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**20 or None


def worker_vpop(n: int, chunk: int, save: str | None, fine: bool = False) -> dict:
    import jax

    from vpop.simulate import simulate_arm

    prepared = _prepare(rescue=save is None, fine=fine)
    chunk = min(chunk, n)
    t0 = time.perf_counter()
    simulate_arm(prepared, chunk, seed=0, chunk_size=chunk)  # compiles
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = simulate_arm(prepared, n, seed=0, chunk_size=chunk)
    run_s = time.perf_counter() - t0
    if save:
        np.savez(save, **{k: res.reductions[k] for k in ACCURACY_KEYS})
    return dict(method="vpop (fine grid)" if fine else "vpop", n=n, chunk=chunk, compile_s=compile_s, run_s=run_s, patients_per_s=n / run_s,
                peak_rss_mb=_peak_rss_mb(), device_peak_mb=_device_peak_mb(), device=str(jax.devices()[0]),
                steps=int((np.asarray(prepared.inputs.schedule.steps.dt) > 0).sum()))


def worker_reference(n: int, save: str) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from vpop.model import reference, solver

    prepared = _prepare(rescue=False)
    fine = solver.refine(prepared.inputs.schedule, 4)
    fine = fine._replace(steps=jax.tree_util.tree_map(jnp.asarray, fine.steps))
    step = reference.ode_step(rtol=1e-8, atol=1e-12)
    run = jax.jit(jax.vmap(lambda p: solver.simulate_patient(p, fine, step=step)))
    params = _patients(prepared, np.arange(n))
    t0 = time.perf_counter()
    red = jax.block_until_ready(run(params))
    total_s = time.perf_counter() - t0
    np.savez(save, **{k: np.asarray(getattr(red, k)) for k in ACCURACY_KEYS})
    return dict(method="reference", n=n, total_s=total_s, peak_rss_mb=_peak_rss_mb())


def worker_diffrax(n: int, rtol: float, save: str) -> dict:
    """The plain diffrax way: vmap over patients of adaptive Kvaerno5 solves from one dosing event
    to the next, saving the state at the grid points (float64: Kvaerno5 in float32 stalls on this
    stiff system). One compiled solve inside a scan over the dosing segments."""
    import diffrax
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from vpop.model import solver, system

    prepared = _prepare(rescue=False)
    sched = solver.refine(prepared.inputs.schedule, 1)
    steps = sched.steps
    segs = _segments(steps)
    t_end = steps.t_start + steps.dt
    width = max(b - a for a, b in segs)
    seg_t0 = jnp.asarray([steps.t_start[a] for a, _ in segs])
    seg_ts = jnp.asarray([np.concatenate([t_end[a:b], np.full(width - (b - a), t_end[b - 1])]) for a, b in segs])
    seg_first = jnp.asarray([a for a, _ in segs])
    valid = np.concatenate([np.arange(width) < (b - a) for a, b in segs])
    controller = diffrax.PIDController(rtol=rtol, atol=rtol * 1e-4)
    used = jax.tree_util.tree_map(jnp.asarray, steps)

    def patient(p):
        def segment(y, xs):
            t0, ts, a = xs
            step_a = jax.tree_util.tree_map(lambda x: x[a], used)
            bolus, rate = solver.patient_inputs(step_a, p)
            for i, path in enumerate(solver.INPUT_CHANNELS):
                y = solver.add_at(y, path, bolus[i])

            def field(t, y, args):
                dy = system.vector_field(t, y, p)
                for i, path in enumerate(solver.INPUT_CHANNELS):
                    if path.startswith("drugs."):
                        dy = solver.add_at(dy, path, rate[i])
                return dy

            sol = diffrax.diffeqsolve(diffrax.ODETerm(field), diffrax.Kvaerno5(), t0=t0, t1=ts[-1], dt0=None, y0=y,
                                      saveat=diffrax.SaveAt(ts=ts), stepsize_controller=controller, max_steps=100_000)
            return jax.tree_util.tree_map(lambda x: x[-1], sol.ys), sol.ys

        _, ys = jax.lax.scan(segment, system.initial_state(p), (seg_t0, seg_ts, seg_first))
        traj = jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:])[valid], ys)
        return _fold(p, sched, traj)

    run = jax.jit(jax.vmap(patient))
    params = _patients(prepared, np.arange(n))
    t0 = time.perf_counter()
    jax.block_until_ready(run(params))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    red = jax.block_until_ready(run(params))
    run_s = time.perf_counter() - t0
    np.savez(save, **{k: np.asarray(getattr(red, k)) for k in ACCURACY_KEYS})
    return dict(method=f"diffrax vmap Kvaerno5 float64 rtol {rtol:g}", n=n, compile_s=compile_s - run_s, run_s=run_s,
                patients_per_s=n / run_s, peak_rss_mb=_peak_rss_mb())


def _fold(p, sched, traj):
    """Reductions from the states at the grid points (drug concentration at step starts taken from the
    previous grid point; only the IL-6 peaks and nadir are compared, not the AUC)."""
    import jax
    import jax.numpy as jnp

    from vpop.model import solver, system

    base = system.observe(system.initial_state(p), p)
    used = jax.tree_util.tree_map(jnp.asarray, sched.steps)

    def f(carry, xs):
        red, z_start = carry
        step, y = xs
        obs = system.observe(y, p)
        z = solver.crs_index(obs, p)
        return (solver.fold_reductions(red, 0.0, z_start, z, obs, step, solver.Dosing.on_schedule(step, sched.period_start_day), base, p), z), None

    (red, _), _ = jax.lax.scan(f, (solver.init_reductions(sched, p, base.t_blood.dtype), solver.crs_index(base, p)), (used, traj))
    return red


def _segments(steps) -> list[tuple[int, int]]:
    """[first, last) step ranges between dosing events (a bolus or a change of infusion rate)."""
    bolus = (steps.bolus_mg + steps.bolus_mg_per_kg + steps.bolus_mg_per_m2).any(axis=1)
    rates = np.concatenate([steps.rate_mg_per_day, steps.rate_mg_per_day_per_kg, steps.rate_mg_per_day_per_m2], axis=1)
    changed = np.concatenate([[True], (rates[1:] != rates[:-1]).any(axis=1)])
    starts = np.flatnonzero(bolus | changed)
    return [(int(a), int(b)) for a, b in zip(starts, [*starts[1:], len(steps.dt)])]


def _run_worker(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


BASELINE_PEAK_PG_ML = 3.0  # twice baseline IL-6 signalling: below it a period's peak is baseline, its error meaningless


def peak_log_errors(x: np.ndarray, y: np.ndarray) -> dict:
    """|log(peak / reference peak)| of IL-6 signalling over the dose periods whose reference peak is
    above BASELINE_PEAK_PG_ML (periods where either is NaN, a failed solve, are left out): how many,
    median, p90, p99 and max."""
    keep = (y > BASELINE_PEAK_PG_ML) & np.isfinite(x) & np.isfinite(y)
    err = np.abs(np.log(np.maximum(x[keep], 1e-9) / y[keep]))
    stats = dict(median=np.median, p90=lambda e: np.percentile(e, 90), p99=lambda e: np.percentile(e, 99), max=np.max)
    return dict(periods=int(keep.sum()), **{k: float(f(err)) if keep.any() else float("nan") for k, f in stats.items()})


def accuracy(candidate: str, ref: str) -> dict:
    """Per-patient error against the reference on the patients both solved: the IL-6 peak errors
    (`peak_log_errors`); tumour: whether the nadir falls below the PR threshold (volume x 0.354, SPD
    halved) in both, and |nadir difference|."""
    a, r = np.load(candidate), np.load(ref)
    n = min(len(a[ACCURACY_KEYS[0]]), len(r[ACCURACY_KEYS[0]]))
    il6 = peak_log_errors(a["peak_il6_signalling_pg_ml"][:n], r["peak_il6_signalling_pg_ml"][:n])
    nx, ny = a["malignant_nadir_fraction"][:n], r["malignant_nadir_fraction"][:n]
    return dict(
        patients=int(n),
        il6_periods=il6["periods"],
        **{f"il6_log_error_{k}": il6[k] for k in ("median", "p90", "p99", "max")},
        nadir_abs_error_median=float(np.nanmedian(np.abs(nx - ny))),  # NaN: a patient the reference failed on
        response_agreement=float(np.mean(((nx <= 0.354) == (ny <= 0.354))[np.isfinite(nx) & np.isfinite(ny)])),
    )


def _save(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--chunk", type=int, default=10_000, help="patients per chunk for vpop")
    ap.add_argument("--accuracy-n", type=int, default=20, help="patients solved by the float64 reference")
    ap.add_argument("--diffrax-n", type=int, default=100)
    ap.add_argument("--diffrax-rtol", type=float, nargs="+", default=[1e-2, 1e-3])
    ap.add_argument("--out", default="experiments/benchmarks/results")
    ap.add_argument("--reuse-reference", action="store_true", help="reuse arrays/reference.npz from an earlier run")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        kind, *rest = args.worker
        fn = {"vpop": lambda n, c, s=None: worker_vpop(int(n), int(c), s), "vpop_fine": lambda n, c, s=None: worker_vpop(int(n), int(c), s, True),
              "reference": lambda n, s: worker_reference(int(n), s),
              "diffrax": lambda n, r, s: worker_diffrax(int(n), float(r), s)}[kind]
        print(json.dumps(fn(*rest)))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "arrays"
    tmp.mkdir(exist_ok=True)
    results = dict(machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                                python=platform.python_version()), runs=[])
    ref = str(tmp / "reference.npz")
    if args.reuse_reference and Path(ref).exists():
        results["runs"].append(dict(method="reference", n=len(np.load(ref)[ACCURACY_KEYS[0]]), total_s=float("nan"), peak_rss_mb=float("nan")))
    else:
        print("reference (float64) ...", flush=True)
        results["runs"].append(_run_worker("reference", str(args.accuracy_n), ref))
    acc_file = str(tmp / "vpop_accuracy.npz")
    _run_worker("vpop", str(args.accuracy_n), str(args.accuracy_n), acc_file)
    results["vpop_accuracy"] = accuracy(acc_file, ref)
    for n in args.sizes:
        print(f"vpop N={n} ...", flush=True)
        results["runs"].append(_run_worker("vpop", str(n), str(args.chunk)))
        _save(results, out)
    print("vpop, fine grid ...", flush=True)
    fine_file = str(tmp / "vpop_fine.npz")
    _run_worker("vpop_fine", str(args.accuracy_n), str(args.accuracy_n), fine_file)
    r = _run_worker("vpop_fine", str(args.sizes[1] if len(args.sizes) > 1 else args.sizes[0]), str(args.chunk))
    r["accuracy"] = accuracy(fine_file, ref)
    results["runs"].append(r)
    _save(results, out)
    for rtol in args.diffrax_rtol:
        print(f"diffrax rtol={rtol} ...", flush=True)
        f = str(tmp / f"diffrax_{rtol:g}.npz")
        r = _run_worker("diffrax", str(args.diffrax_n), str(rtol), f)
        r["accuracy"] = accuracy(f, ref)
        results["runs"].append(r)
        _save(results, out)
    print(table(results))


def table(results: dict) -> str:
    acc = results.get("vpop_accuracy")
    lines = [f"Machine: {results['machine']['platform']}, {results['machine']['cpus']} CPUs", "",
             "| method | N | patients/s | compile s | peak RSS MB | IL-6 peak log-error median / p90 | response class agreement |",
             "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        if r["method"] == "reference":
            continue
        a = r.get("accuracy", acc if r["method"] == "vpop" else None)
        steps = f" ({r['steps']} steps)" if "steps" in r else ""
        il6 = f"{a['il6_log_error_median']:.3f} / {a['il6_log_error_p90']:.3f}" if a else ""
        resp = f"{100 * a['response_agreement']:.0f}%" if a else ""
        lines.append(f"| {r['method']}{steps} | {r['n']:,} | {r['patients_per_s']:,.1f} | {r.get('compile_s', float('nan')):.1f} | "
                     f"{r['peak_rss_mb']:,.0f} | {il6} | {resp} |")
    ref = next(r for r in results["runs"] if r["method"] == "reference")
    lines.append("")
    lines.append(f"Accuracy against a float64 diffrax Kvaerno5 solution (rtol 1e-8, 4x refined grid) of {ref['n']} patients, "
                 "in-simulation CRS rescue off. vpop accuracy measured on the same patients.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
