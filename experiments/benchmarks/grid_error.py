"""Per-patient IL-6 peak error of vpop's fixed grid on several regimens, and whether a Richardson
estimate (the default grid against one 2x coarser) finds the patients to re-simulate on a finer grid
(the accuracy issue's item 3).

    python experiments/benchmarks/grid_error.py --n 250 --out experiments/benchmarks/results

Five label regimens (IV, SC, continuous infusion, split doses), 84 days, CRS rescue off (a rescue is a
discontinuity of the model, not an integration error), the same patients on every grid. Reference:
vpop's own integrator in float64 on the default grid refined 16x (checked against 32x). Writes
grid_error.md and grid_error.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
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
COARSE, FINE = 2.0, 0.25  # grid scales of the estimate and of the refinement
TOLERANCES = (0.01, 0.02, 0.05)


def _peaks(scale: float, n: int) -> dict[str, np.ndarray]:
    """IL-6 signalling peak per patient and dose period of every arm, the grid's step sizes x scale."""
    from vpop import catalogue
    from vpop.simulate import Arm, prepare_arm, simulate_arm

    solver = catalogue.load("model", "default").solver  # the shipped grid, its step sizes scaled
    grid = {f"model.solver.{k}": float(solver[k]) * scale for k in ("first_step_hours", "fine_max_step_days", "max_step_days")}
    grid["model.crs.rescue"] = 0
    out = {}
    for name, (drug, route, pop, regimen, premed) in ARMS.items():
        prepared = prepare_arm(Arm("a", drug, route, pop, regimen, premed), horizon_days=HORIZON_DAYS, overrides=grid)
        red = simulate_arm(prepared, n, seed=0, chunk_size=n).reductions
        out[name] = np.asarray(red["peak_il6_signalling_pg_ml"], float)
        out[name + " steps"] = np.asarray([(np.asarray(prepared.inputs.schedule.steps.dt) > 0).sum()])
    return out


def _worker(scales: list[float], n: int, x64: bool, path: str) -> None:
    if x64:
        import jax

        jax.config.update("jax_enable_x64", True)
    np.savez(path, **{f"{k}@{s:g}": v for s in scales for k, v in _peaks(s, n).items()})


def _run(scales, n, x64) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "peaks.npz")
        subprocess.run([sys.executable, __file__, "--worker", json.dumps([scales, n, x64, path])], check=True)
        return dict(np.load(path))


def _stats(x: np.ndarray, reference: np.ndarray) -> dict:
    """`yardstick.peak_log_errors` of x against the reference (periods above baseline)."""
    return {k: v for k, v in peak_log_errors(x, reference).items() if k != "periods"}


def _log_error(x, y):
    return np.abs(np.log(np.maximum(x, 1e-9) / np.maximum(y, 1e-9)))


def study(n: int) -> dict:
    from scipy.stats import spearmanr

    ref = _run([1 / 16, 1 / 32], n, True)
    run = _run([COARSE, 1.0, FINE], n, False)
    rows, flags, errs = {}, {t: [] for t in TOLERANCES}, {t: [] for t in TOLERANCES}
    for name in ARMS:
        r, r32 = ref[f"{name}@0.0625"], ref[f"{name}@0.03125"]
        keep = r > BASELINE_PEAK_PG_ML
        default, coarse, fine = (run[f"{name}@{s:g}"] for s in (1.0, COARSE, FINE))
        err, err_fine = _log_error(default, r), _log_error(fine, r)
        # Richardson for a second-order scheme: error(h) ~ (y_h - y_2h) / (2^2 - 1)
        estimate = np.where(keep | (default > BASELINE_PEAK_PG_ML), _log_error(default, coarse) / 3.0, 0.0)
        rows[name] = dict(periods=int(keep.sum()), steps={s: int(run[f"{name} steps@{s:g}"][0]) for s in (COARSE, 1.0, FINE)},
                          reference_16x_vs_32x=_stats(r, r32), default=_stats(default, r),
                          fine=_stats(fine, r), spearman_estimate_error=float(spearmanr(estimate[keep], err[keep])[0]))
        for t in TOLERANCES:
            flagged = estimate.max(axis=1) > t
            flags[t].append(flagged)
            errs[t].append(np.where(flagged[:, None], err_fine, err)[keep])
    refined = {}
    for t in TOLERANCES:
        share = float(np.mean(np.concatenate(flags[t])))
        # cost relative to the default grid: the coarse run, then the flagged patients on the fine grid
        cost = np.mean([(v["steps"][1.0] + v["steps"][COARSE] + share * v["steps"][FINE]) / v["steps"][1.0] for v in rows.values()])
        e = np.concatenate(errs[t])
        refined[str(t)] = dict(flagged_patients=share, relative_throughput=float(1.0 / cost), median=float(np.median(e)),
                               p90=float(np.percentile(e, 90)), p99=float(np.percentile(e, 99)), max=float(e.max()))
    return dict(n_per_arm=n, horizon_days=HORIZON_DAYS, arms=rows, refined=refined)


def table(res: dict) -> str:
    lines = [f"IL-6 signalling peak log error per dose period (reference peak > {BASELINE_PEAK_PG_ML:g} pg/mL), "
             f"{res['n_per_arm']} patients per arm, {res['horizon_days']} days, rescue off; reference: float64 on the "
             "default grid refined 16x.", "",
             "| arm | periods | steps (2x coarse / default / 4x fine) | reference 16x vs 32x max | default median / p90 / p99 / max | "
             "4x fine median / p90 / p99 / max | Spearman (estimate, error) |", "|---|---|---|---|---|---|---|"]
    for name, r in res["arms"].items():
        d, f = r["default"], r["fine"]
        lines.append(f"| {name} | {r['periods']} | {r['steps'][COARSE]} / {r['steps'][1.0]} / {r['steps'][FINE]} | "
                     f"{r['reference_16x_vs_32x']['max']:.4f} | {d['median']:.3f} / {d['p90']:.3f} / {d['p99']:.3f} / {d['max']:.2f} | "
                     f"{f['median']:.4f} / {f['p90']:.3f} / {f['p99']:.3f} / {f['max']:.2f} | {r['spearman_estimate_error']:.2f} |")
    lines += ["", "Re-simulating on the 4x fine grid every patient whose estimate exceeds a tolerance in any period:", "",
              "| tolerance | patients flagged | throughput vs default grid | error median / p90 / p99 / max |", "|---|---|---|---|"]
    for t, r in res["refined"].items():
        lines.append(f"| {t} | {100 * r['flagged_patients']:.1f}% | {100 * r['relative_throughput']:.0f}% | "
                     f"{r['median']:.4f} / {r['p90']:.3f} / {r['p99']:.3f} / {r['max']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=250, help="patients per arm")
    ap.add_argument("--out", type=Path, default=Path("experiments/benchmarks/results"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(*json.loads(args.worker))
        return
    res = study(args.n)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grid_error.json").write_text(json.dumps(res, indent=2, default=str))
    (args.out / "grid_error.md").write_text(table(res))
    print(table(res))


if __name__ == "__main__":
    main()
