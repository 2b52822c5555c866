"""Per-patient IL-6 peak error of vpop's time grids on several regimens: the default grid, the grid
refined by error control on a pilot cohort (`model.solver.error_tolerance`, `vpop.simulate.refine_schedule`)
at several tolerances, the default grid refined 2x and 4x uniformly, and the default grid with a grade
recheck (`model.solver.recheck_margin`: the patients near a CRS grade threshold simulated again 4x finer).

    python experiments/benchmarks/grid_error.py --n 250 --variants --out experiments/benchmarks/results

Five label regimens (IV, SC, continuous infusion, split doses), 84 days, CRS rescue off (a rescue is a
discontinuity of the model, not an integration error), the same patients on every grid. Reference:
vpop's own integrator in float64 on the default grid refined 16x (checked against 32x). Throughput is
relative to the default grid's, from the steps (one step costs the same on every grid; the yardstick
measures it). Beside the IL-6 peaks, the share of patients whose highest CRS grade, or the grade of the
CRS after any dose, differs from the reference's. `--variants` adds the default grid with one of its settings changed at a time.
Writes grid_error.md and grid_error.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from yardstick import BASELINE_PEAK_PG_ML, peak_log_errors  # noqa: E402  (the errors the other benchmarks report)

ARMS = {  # name: drug, route, population, regimen, premedication
    "mosunetuzumab IV, FL": ("mosunetuzumab", "iv", "fl_rr", "mosunetuzumab_fl_iv", "dexamethasone_20mg"),
    "epcoritamab SC, LBCL": ("epcoritamab", "sc", "dlbcl_rr", "epcoritamab_dlbcl", "epcoritamab_corticosteroid"),
    "odronextamab IV split doses, LBCL": ("odronextamab", "iv", "dlbcl_rr", "odronextamab_dlbcl", "dexamethasone_10mg_cycle1"),
    "blinatumomab continuous infusion, ALL": ("blinatumomab", "civ", "b_all_rr", "blinatumomab_all", "dexamethasone_20mg_each_step"),
    "teclistamab SC, MM": ("teclistamab", "sc", "mm_rr", "teclistamab_mm", "dexamethasone_16mg_step_up"),
}
HORIZON_DAYS = 84
GRIDS = {  # label: `model.solver` settings over configs/model/default.yaml's; `scale` multiplies its step sizes
    "default": {},
    "refined, tolerance 0.01": {"error_tolerance": 0.01},
    "refined, tolerance 0.003": {"error_tolerance": 0.003},
    "refined, tolerance 0.001": {"error_tolerance": 0.001},
    "default refined 2x": {"scale": 0.5},
    "default refined 4x": {"scale": 0.25},
    "default, grade recheck 0.02": {"recheck_margin": 0.02},
    "default, grade recheck 0.05": {"recheck_margin": 0.05},
    "default, grade recheck 0.1": {"recheck_margin": 0.1},
}
# --variants: one setting of the default grid changed at a time. The default grid's errors partly
# cancel (a first-dose error that shrinks with the first step against others), so refining one part
# of it can raise the error; these show by how much.
VARIANTS = {
    "first step 0.25 h": {"first_step_hours": 0.25},
    "first step 0.125 h": {"first_step_hours": 0.125},
    "step growth 1.2": {"step_growth": 1.2},
    "fine steps <= 4 h": {"fine_max_step_days": 1 / 6},
    "fine steps <= 1.5 h": {"fine_max_step_days": 0.0625},
    "fine window 6 days": {"fine_window_days": 6},
    "coarse steps <= 0.35 days": {"max_step_days": 0.35},
    "coarse steps <= 0.25 days": {"max_step_days": 0.25},
}


def _peaks(settings: dict, n: int) -> dict[str, np.ndarray]:
    """IL-6 signalling peak per patient and dose period and highest CRS grade per patient of every
    arm, and each arm's steps and grid preparation time (the pilot's, for a refined grid)."""
    from omegaconf import OmegaConf

    from vpop import catalogue
    from vpop.simulate import Arm, prepare_arm, refined_grid, simulate_arm

    settings = dict(settings)
    scale = settings.pop("scale", 1.0)
    model = catalogue.load("model", "default")
    solver = refined_grid(OmegaConf.merge(model.solver, {"error_tolerance": None}, settings), 1 / scale)
    model = OmegaConf.merge(model, {"solver": solver})
    rescue_off = {"model.crs.rescue": 0}
    out = {}
    for name, (drug, route, pop, regimen, premed) in ARMS.items():
        t0 = time.perf_counter()
        prepared = prepare_arm(Arm("a", drug, route, pop, regimen, premed), model, horizon_days=HORIZON_DAYS, overrides=rescue_off)
        out[name + " prepare_s"] = np.asarray([time.perf_counter() - t0])
        red = simulate_arm(prepared, n, seed=0, chunk_size=n).reductions
        out[name] = np.asarray(red["peak_il6_signalling_pg_ml"], float)
        out[name + " grade"] = np.asarray(red["crs_max_grade"], float)
        out[name + " period grades"] = np.asarray(red["crs_grade"], float)
        steps = (np.asarray(prepared.inputs.schedule.steps.dt) > 0).sum()
        if prepared.recheck is not None:  # the rechecked patients' second run, per patient on average
            out[name + " rechecked"] = np.asarray([red["grid_rechecked"].mean()])
            steps = steps + red["grid_rechecked"].mean() * (np.asarray(prepared.recheck.schedule.steps.dt) > 0).sum()
        out[name + " steps"] = np.asarray([steps])
    return out


def _worker(grids: list, n: int, x64: bool, path: str) -> None:
    if x64:
        import jax

        jax.config.update("jax_enable_x64", True)
    np.savez(path, **{f"{k}@{i}": v for i, settings in enumerate(grids) for k, v in _peaks(settings, n).items()})


def _run(grids: list, n: int, x64: bool) -> list[dict[str, np.ndarray]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "peaks.npz")
        subprocess.run([sys.executable, __file__, "--worker", json.dumps([grids, n, x64, path])], check=True)
        saved = dict(np.load(path))
    return [{k.rsplit("@", 1)[0]: v for k, v in saved.items() if k.endswith(f"@{i}")} for i in range(len(grids))]


def _stats(run: dict, ref: dict, arms) -> dict:
    """`yardstick.peak_log_errors` of a grid's peaks against the reference's (periods above baseline),
    pooled over `arms`, and the share of patients whose highest CRS grade differs from the reference's."""
    x, y = (np.concatenate([r[a].ravel() for a in arms]) for r in (run, ref))
    grades = [np.concatenate([r[a + " grade"] for a in arms]) for r in (run, ref)]
    period_differs = np.concatenate([(run[a + " period grades"] != ref[a + " period grades"]).any(axis=1) for a in arms])
    rechecked = [run[a + " rechecked"][0] for a in arms if a + " rechecked" in run]
    return {**{k: v for k, v in peak_log_errors(x, y).items() if k != "periods"},
            "grade_differs_percent": float(100 * np.mean(grades[0] != grades[1])),
            "period_grade_differs_percent": float(100 * np.mean(period_differs)),
            **({"rechecked_percent": float(100 * np.mean(rechecked))} if rechecked else {})}


def study(n: int, grids: dict) -> dict:
    ref, ref32 = _run([{"scale": 1 / 16}, {"scale": 1 / 32}], n, True)
    # One process per grid: compiled kernels pile up in a process (17 grids x 5 arms ran out of memory).
    runs = {g: _run([settings], n, False)[0] for g, settings in grids.items()}
    default_steps = sum(float(runs["default"][f"{a} steps"][0]) for a in ARMS)
    res = dict(n_per_arm=n, horizon_days=HORIZON_DAYS, arms={}, grids={})
    for name in ARMS:
        res["arms"][name] = dict(periods=int((ref[name] > BASELINE_PEAK_PG_ML).sum()),
                                 reference_16x_vs_32x=_stats(ref, ref32, [name]),
                                 grids={g: dict(steps=float(run[f"{name} steps"][0]), **_stats(run, ref, [name])) for g, run in runs.items()})
    for g, run in runs.items():
        steps = sum(float(run[f"{a} steps"][0]) for a in ARMS)
        res["grids"][g] = dict(steps=steps, relative_throughput=default_steps / steps,
                               prepare_s=float(sum(run[f"{a} prepare_s"][0] for a in ARMS)), **_stats(run, ref, ARMS))
    return res


def table(res: dict) -> str:
    lines = [f"IL-6 signalling peak log error per dose period (reference peak > {BASELINE_PEAK_PG_ML:g} pg/mL), "
             f"{res['n_per_arm']} patients per arm, {res['horizon_days']} days, rescue off; reference: float64 on the "
             "default grid refined 16x. Refined grids: `model.solver.error_tolerance`, designed on a pilot of 16 other "
             "patients of the arm.", "",
             "All five arms pooled (throughput relative to the default grid, from the steps; preparation: the pilots' "
             "compilation and runs, all arms, in one process):", "",
             "| grid | steps | throughput | preparation s | median | p90 | p99 | max | highest CRS grade differs, % of patients "
             "| a dose's CRS grade differs, % of patients | rechecked, % of patients |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g, r in res["grids"].items():
        rechecked = f"{r['rechecked_percent']:.1f}" if "rechecked_percent" in r else "-"
        lines.append(f"| {g} | {r['steps']:.0f} | {100 * r['relative_throughput']:.0f}% | {r['prepare_s']:.0f} | {r['median']:.4f} | "
                     f"{r['p90']:.3f} | {r['p99']:.3f} | {r['max']:.2f} | {r['grade_differs_percent']:.1f} | "
                     f"{r['period_grade_differs_percent']:.1f} | {rechecked} |")
    lines += ["", "CRS grades (rescue off) against the reference's: each patient's highest over the course, and the grade of "
              "the CRS starting after each dose (any dose differing counts the patient). A grade recheck "
              "(`model.solver.recheck_margin`) simulates the patients whose grades came within the margin of a threshold "
              "again on the default grid refined 4x; its steps count that second run per patient on average.", "",
              "By arm (steps; median / p90 / p99 / max; highest CRS grade differs, % of patients):", "",
              "| arm | periods | 16x vs 32x max | " + " | ".join(res["grids"]) + " |", "|---|---|---|" + "---|" * len(res["grids"])]
    for name, r in res["arms"].items():
        cells = [f"{c['steps']:.0f}; {c['median']:.4f} / {c['p90']:.3f} / {c['p99']:.3f} / {c['max']:.2f}; {c['grade_differs_percent']:.1f}%"
                 for c in r["grids"].values()]
        lines.append(f"| {name} | {r['periods']} | {r['reference_16x_vs_32x']['max']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=250, help="patients per arm")
    ap.add_argument("--out", type=Path, default=Path("experiments/benchmarks/results"))
    ap.add_argument("--variants", action="store_true", help="also the default grid with one setting changed at a time")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(*json.loads(args.worker))
        return
    res = study(args.n, {**GRIDS, **(VARIANTS if args.variants else {})})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grid_error.json").write_text(json.dumps(res, indent=2, default=str))
    (args.out / "grid_error.md").write_text(table(res))
    print(table(res))


if __name__ == "__main__":
    main()
