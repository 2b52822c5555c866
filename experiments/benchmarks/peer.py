"""vpop against the simulator QSP modellers use: libroadrunner (LLVM-compiled SBML, CVODE) running vpop's
own SBML export of the yardstick arm (mosunetuzumab IV 1/2/60/60/30 mg q21d, 6 cycles, R/R FL).

    python experiments/benchmarks/peer.py --n 200 --out experiments/benchmarks/results

Per method: patients/s (after compilation or model loading), CVODE failures, and the per-patient IL-6
peak error of every dose period (|log(peak / reference peak)|: median, p90, p99, max) against a reference:
libroadrunner at rtol 1e-9 on the same export, read at the default grid refined 4x (tests/test_export.py
shows the export reproduces vpop's float64 equations within 1e-6). The in-simulation CRS rescue is off
in both (the export carries it, as state-triggered events, since 0.15.0; this benchmark predates that).
The peer loads the model once per process and sets each patient's parameters and states by index
(`setGlobalParameterValues`), the way a modeller runs a population in it, in 1 and 2 processes. vpop runs at its default grid, at the finer grid of yardstick.py and regridded at error
tolerances (model.solver.error_tolerance, the pilot's time counted as compilation), at --vpop-n patients.
Writes peer.json, peer.md and peer.png (patients/s against p99 error).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from yardstick import _patients, _prepare, peak_log_errors  # noqa: E402  (the same arm, patients and errors)

REFINE = 4  # output points: the default grid refined 4x (as the yardstick's diffrax reference)


def _problem(n: int):
    """The export (one SBML model), each patient's values by name, the output times and the dose
    period of each output point after the first."""
    import jax

    jax.config.update("jax_enable_x64", True)
    from vpop import export
    from vpop.model import solver, system
    from vpop.model.solver import INPUT_CHANNELS, add_at, patient_inputs

    prepared = _prepare(rescue=False)
    sched = prepared.inputs.schedule
    steps = jax.tree_util.tree_map(np.asarray, sched.steps)
    if np.any(steps.bolus_mg_per_kg) or np.any(steps.bolus_mg_per_m2) or np.any(steps.rate_mg_per_day_per_kg):
        raise SystemExit("the peer sets parameters per patient: dosing must not depend on weight or BSA")
    params = _patients(prepared, np.arange(n))
    # One CRS susceptibility per dose period ([n, P], population.occasion_susceptibility): the peer sets a
    # patient's values once, so every period's must be the same (model.crs.occasion_share 0, the default).
    s = np.asarray(params.crs.susceptibility)
    if not np.all(s == s[:, :1]):
        raise SystemExit("the peer sets parameters per patient: the CRS susceptibility must not vary between dose periods")
    params = params._replace(crs=params.crs._replace(susceptibility=params.crs.susceptibility[:, 0]))
    one = jax.tree_util.tree_map(lambda x: x[0], params)
    sbml = export.to_sbml(export.patient_model(one, sched, "vpop benchmark: yardstick arm"))
    names = export.leaf_names(one) + export.leaf_names(system.initial_state(one))
    # libroadrunner fires the events at the start time when it resets, before a patient's states are
    # set, so the states set are those just after the first step's doses (the solver's own inputs).
    first = jax.tree_util.tree_map(lambda x: x[0], sched.steps)
    bolus, _ = patient_inputs(first, one)
    y0 = jax.vmap(system.initial_state)(params)
    for i, path in enumerate(INPUT_CHANNELS):
        y0 = add_at(y0, path, bolus[i])
    values = np.concatenate([np.stack([np.asarray(x, float) for x in jax.tree_util.tree_leaves(params)], axis=1),
                             np.stack([np.asarray(x, float) for x in jax.tree_util.tree_leaves(y0)], axis=1)], axis=1)
    fine = jax.tree_util.tree_map(np.asarray, solver.refine(sched, REFINE).steps)
    times = np.concatenate([[fine.t_start[0]], fine.t_start + fine.dt])
    return sbml, names, values, times, fine.period, len(np.asarray(sched.period_start_day))


def _solve(args) -> tuple[float, float, np.ndarray, np.ndarray]:
    """One process: load the model (timed apart), then every patient: its values set, simulated, and
    the per-period IL-6 peaks and the tumour nadir read from the output points."""
    sbml, names, values, times, period, periods, rtol = args
    import roadrunner

    t0 = time.perf_counter()
    rr = roadrunner.RoadRunner(sbml)
    load_s = time.perf_counter() - t0
    rr.integrator.relative_tolerance = rtol
    # States fall to 1e-8 and below (activated T cells before a dose, circulating tumour cells); an
    # absolute tolerance tied to rtol (rtol * 1e-4) let CVODE fail on most patients.
    rr.integrator.absolute_tolerance = min(1e-12, rtol * 1e-6)
    rr.integrator.max_steps = 1_000_000
    rr.timeCourseSelections = ["il6_signalling_pg_ml", "malignant_total"]
    peaks, nadirs = np.zeros((len(values), periods)), np.ones(len(values))
    t0 = time.perf_counter()
    ids = list(rr.model.getGlobalParameterIds())
    where = np.array([ids.index(n) for n in names], dtype=np.int32)
    for i, row in enumerate(values):
        rr.resetAll()  # time, events and every value back to the file's; then this patient's values
        rr.model.setGlobalParameterValues(where, row)
        try:
            out = rr.simulate(times=list(times))
        except RuntimeError as err:  # CVODE gave up: the patient counts as failed, its peaks NaN
            print(f"patient {i}: {str(err).splitlines()[0][:160]}", flush=True)
            peaks[i], nadirs[i] = np.nan, np.nan
            continue
        il6, tumour = np.asarray(out[1:, 0]), np.asarray(out[:, 1])
        for k in range(periods):
            if (period == k).any():
                peaks[i, k] = il6[period == k].max()
        nadirs[i] = min(1.0, float((tumour[1:] / tumour[0]).min()))
    return load_s, time.perf_counter() - t0, peaks, nadirs


def roadrunner_run(problem, rtol: float, processes: int) -> dict:
    sbml, names, values, times, period, periods = problem
    parts = np.array_split(values, processes)
    args = [(sbml, names, part, times, period, periods, rtol) for part in parts]
    t0 = time.perf_counter()
    if processes == 1:
        results = [_solve(args[0])]
    else:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            results = pool.map(_solve, args)
    wall = time.perf_counter() - t0
    load = max(r[0] for r in results)
    peaks = np.concatenate([r[2] for r in results])
    return dict(method=f"libroadrunner, {processes} process{'es' if processes > 1 else ''}, rtol {rtol:g}", n=len(values),
                load_s=load, run_s=wall - load, patients_per_s=len(values) / (wall - load),
                failed=int(np.isnan(peaks[:, 0]).sum()), peaks=peaks, nadirs=np.concatenate([r[3] for r in results]))


def vpop_run(n: int, grid: str | float, throughput_n: list[int]) -> list[dict]:
    """vpop (float32; grid "default", "fine" or an error tolerance: the default grid regridded on a
    pilot, its preparation counted with the compilation): the reductions of the same n patients, and
    patients/s at each of throughput_n patients after compilation (chunks of 10,000)."""
    from vpop.simulate import simulate_arm

    t0 = time.perf_counter()
    prepared = _prepare(rescue=False, fine=grid == "fine", tolerance=None if isinstance(grid, str) else grid)
    prepare_s = time.perf_counter() - t0
    red = simulate_arm(prepared, n, seed=0, chunk_size=n).reductions
    steps = int((np.asarray(prepared.inputs.schedule.steps.dt) > 0).sum())
    label = f"{grid} grid" if isinstance(grid, str) else f"grid regridded at tolerance {grid:g}"
    rows, compile_s = [], {}
    for size in throughput_n:
        chunk = min(size, 10_000)
        if chunk not in compile_s:  # compile this chunk size first: the first call's time less a run's
            t0 = time.perf_counter()
            simulate_arm(prepared, chunk, seed=1, chunk_size=chunk)
            first_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            simulate_arm(prepared, chunk, seed=1, chunk_size=chunk)
            compile_s[chunk] = prepare_s + first_s - (time.perf_counter() - t0)
        t0 = time.perf_counter()
        simulate_arm(prepared, size, seed=0, chunk_size=chunk)
        run_s = time.perf_counter() - t0
        rows.append(dict(method=f"vpop, {label} ({steps} steps)", n=size, run_s=run_s,
                         load_s=compile_s[chunk], patients_per_s=size / run_s, failed=0,
                         peaks=red["peak_il6_signalling_pg_ml"], nadirs=red["malignant_nadir_fraction"]))
    return rows


def accuracy(run: dict, ref: dict) -> dict:
    """The IL-6 peak errors (`yardstick.peak_log_errors`; patients a method failed on are left out)
    and |nadir - reference nadir| on the reference's patients."""
    n = len(ref["peaks"])
    return dict(**peak_log_errors(run["peaks"][:n], ref["peaks"]),
                nadir_abs_error_median=float(np.nanmedian(np.abs(run["nadirs"][:n] - ref["nadirs"]))))


def speedup(rows: list[dict]) -> list[str]:
    """Each vpop row against the fastest peer run at least as accurate (p99 error no larger)."""
    peers = [r for r in rows if r["method"].startswith("libroadrunner")]
    lines = []
    for r in rows:
        if r["method"].startswith("vpop"):
            match = [q for q in peers if q["accuracy"]["p99"] <= r["accuracy"]["p99"]]
            if match:
                q = max(match, key=lambda q: q["patients_per_s"])
                lines.append(f"- {r['method']}, N = {r['n']:,}: {r['patients_per_s'] / q['patients_per_s']:,.0f}x "
                             f"{q['method']} (p99 {r['accuracy']['p99']:.4f} vs {q['accuracy']['p99']:.4f})")
    return lines


def table(rows: list[dict], n: int, ref: dict) -> str:
    lines = [f"Machine: {platform.platform()}, {os.cpu_count()} CPUs", "",
             "| method | N | patients/s | load or compile s | CVODE failures | IL-6 peak log error median / p90 / p99 / max |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        a = r["accuracy"]
        lines.append(f"| {r['method']} | {r['n']:,} | {r['patients_per_s']:,.1f} | {r['load_s']:.1f} | {r['failed']} | "
                     f"{a['median']:.4f} / {a['p90']:.4f} / {a['p99']:.4f} / {a['max']:.4f} |")
    lines += ["", f"IL-6 peak error over every dose period with a reference peak above 3 pg/mL, of the first {n} patients "
              f"(vpop: the same patients), against libroadrunner at rtol 1e-9, atol 1e-15 on the same export, read at "
              f"the default grid refined 4x; CRS rescue off. The reference failed on {ref['failed']} of {n} patients; "
              "they and the patients a method failed on are left out of its errors.", "",
              "Speed-up at matched accuracy (against the fastest libroadrunner run at least as accurate):", *speedup(rows)]
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], path: Path) -> None:
    """Patients/s against p99 IL-6 peak error: every libroadrunner run, and vpop at its largest N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    largest = {}
    for r in rows:
        if r["method"].startswith("vpop") and r["n"] >= largest.get(r["method"], {"n": 0})["n"]:
            largest[r["method"]] = r
    shown = [*largest.values(), *(r for r in rows if not r["method"].startswith("vpop"))]
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for r in shown:
        vpop = r["method"].startswith("vpop")
        x, y = r["accuracy"]["p99"], r["patients_per_s"]
        ax.scatter(x, y, marker="o" if vpop else "s", color="C0" if vpop else "C3", zorder=3)
        text = (r["method"].replace("grid regridded at tolerance", "tolerance") if vpop else
                r["method"].replace("libroadrunner, ", "").replace(" processes", " proc").replace(" process", " proc"))
        if vpop:  # the 4x finer grid sits next to a regridded one: its label goes below, on the right
            offset, align = ((5, -10), "left") if "fine" in text else ((-6, 5), "right")
        else:
            offset, align = ((5, 4), "left") if "2 proc" in text else ((5, -10), "left")
        ax.annotate(text, (x, y), fontsize=7, xytext=offset, textcoords="offset points", ha=align)
    ax.set(xscale="log", yscale="log", xlim=(2e-5, 3.0), xlabel="IL-6 peak |log error|, p99 over dose periods",
           ylabel="patients/s", title=f"yardstick arm, {os.cpu_count()} CPU cores: vpop (blue, its largest N) vs libroadrunner (red)")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="patients solved by every method (accuracy, peer speed)")
    ap.add_argument("--vpop-n", type=int, nargs="+", default=[10_000, 100_000], help="patients for vpop's throughput")
    ap.add_argument("--rtol", type=float, nargs="+", default=[1e-6, 1e-4, 1e-3, 1e-2])
    ap.add_argument("--tolerance", type=float, nargs="*", default=[0.01, 0.003, 0.001],
                    help="vpop's error tolerances of the regridded grid (model.solver.error_tolerance)")
    ap.add_argument("--out", default="experiments/benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for grid in ("default", "fine", *args.tolerance):  # float32, before the export switches this process to float64
        print(f"vpop ({grid} grid) ...", flush=True)
        rows += vpop_run(args.n, grid, args.vpop_n)
    problem = _problem(args.n)
    print("reference: libroadrunner rtol 1e-9 ...", flush=True)
    ref = roadrunner_run(problem, 1e-9, 2)
    for rtol in args.rtol:
        for processes in (1, 2):
            print(f"libroadrunner rtol {rtol:g}, {processes} process(es) ...", flush=True)
            rows.append(roadrunner_run(problem, rtol, processes))
    for r in rows:
        r["accuracy"] = accuracy(r, ref)
    (out / "peer.md").write_text(table(rows, args.n, ref))
    figure(rows, out / "peer.png")
    keep = ("method", "n", "load_s", "run_s", "patients_per_s", "failed", "accuracy")
    (out / "peer.json").write_text(json.dumps(dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
                                                   reference=dict(method=ref["method"], n=ref["n"], failed=ref["failed"]),
                                                   runs=[{k: r[k] for k in keep if k in r} for r in rows]), indent=2))
    print(table(rows, args.n, ref))


if __name__ == "__main__":
    main()
