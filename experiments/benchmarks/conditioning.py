"""Which dose periods' IL-6 peaks are ill-conditioned in the model itself, and whether vpop's
integration error concentrates there (the accuracy issue's max-error goal).

    python experiments/benchmarks/conditioning.py --n 200 --out experiments/benchmarks/results

The yardstick arm of peer.py (the same export, patients, output points and reference: libroadrunner
at rtol 1e-9, CRS rescue off). Each listed parameter is raised by 0.1% for every patient and the arm
re-solved at rtol 1e-9; a period's elasticity is

    kappa = max over the parameters of |log(peak_nudged / peak)| / log(1.001),

the relative change of its IL-6 peak per relative change of a parameter. Where a dose releases
only what its engagement exceeds over the primed level (a small difference of large numbers) kappa
is large, and so is the effect of any small error the integrator carries into the dose. vpop's
error (default grid, float32) is then binned by kappa. Writes conditioning.md and conditioning.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import _problem, roadrunner_run  # noqa: E402  (the peer benchmark's export and reference)
from yardstick import BASELINE_PEAK_PG_ML, _prepare  # noqa: E402

NUDGE = 1.001
PARAMETERS = (  # the primed level's two numbers, the tumour's engagement and a PK number, by export name
    "cytokines_priming_rate_per_day",
    "cytokines_priming_margin",
    "cytokines_tumour_reach",
    "bispecific_pk_cl_l_per_day",
)
BINS = (0.0, 1.0, 10.0, 100.0, np.inf)


def _vpop_peaks(n: int) -> np.ndarray:
    from vpop.simulate import simulate_arm

    return np.asarray(simulate_arm(_prepare(rescue=False), n, seed=0, chunk_size=n).reductions["peak_il6_signalling_pg_ml"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out", default="experiments/benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    vpop = _vpop_peaks(args.n)  # float32, before the export switches this process to float64
    sbml, names, values, times, period, periods = _problem(args.n)
    unknown = [p for p in PARAMETERS if p not in names]
    if unknown:
        raise SystemExit(f"not in the export: {unknown}; parameters are named like {names[:5]}")
    ref = roadrunner_run((sbml, names, values, times, period, periods), 1e-9, 2)["peaks"]
    elasticity = {}
    for name in PARAMETERS:
        print(f"{name} x {NUDGE} ...", flush=True)
        nudged = values.copy()
        nudged[:, names.index(name)] *= NUDGE
        peaks = roadrunner_run((sbml, names, nudged, times, period, periods), 1e-9, 2)["peaks"]
        elasticity[name] = np.abs(np.log(peaks / ref)) / np.log(NUDGE)

    keep = (ref > BASELINE_PEAK_PG_ML) & np.isfinite(ref) & np.isfinite(vpop)
    kappa = np.nanmax(np.stack([e for e in elasticity.values()]), axis=0)[keep]
    error = np.abs(np.log(np.maximum(vpop[keep], 1e-9) / ref[keep]))
    rows = []
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        sel = (kappa >= lo) & (kappa < hi)
        if sel.any():
            e = error[sel]
            rows.append(dict(kappa=f"{lo:g}-{hi:g}", periods=int(sel.sum()), median=float(np.median(e)),
                             p99=float(np.percentile(e, 99)), max=float(e.max()), error_over_kappa_max=float((e / kappa[sel]).max())))
    order = np.argsort(error)[::-1][:10]
    patient, dose = np.nonzero(keep)
    worst = [dict(patient=int(patient[i]), period=int(dose[i]) + 1, reference_pg_ml=float(ref[keep][i]),
                  vpop_pg_ml=float(vpop[keep][i]), error=float(error[i]), kappa=float(kappa[i]),
                  **{k: float(v[keep][i]) for k, v in elasticity.items()}) for i in order]
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    spearman = float(np.corrcoef(rank(kappa), rank(error))[0, 1])

    lines = [f"IL-6 peak elasticity kappa (max over {', '.join(PARAMETERS)}; each raised 0.1%, libroadrunner rtol 1e-9) "
             f"and vpop's default-grid error, {args.n} yardstick patients, {int(keep.sum())} dose periods with a reference "
             f"peak above {BASELINE_PEAK_PG_ML:g} pg/mL, rescue off. Spearman(kappa, error) = {spearman:.2f}.", "",
             "| kappa | periods | vpop error median | p99 | max | max of error / kappa |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['kappa']} | {r['periods']} | {r['median']:.4f} | {r['p99']:.3f} | {r['max']:.3f} | {r['error_over_kappa_max']:.4f} |" for r in rows]
    lines += ["", "The ten largest vpop errors:", "", "| patient | period | reference pg/mL | vpop pg/mL | error | kappa |", "|---|---|---|---|---|---|"]
    lines += [f"| {w['patient']} | {w['period']} | {w['reference_pg_ml']:.1f} | {w['vpop_pg_ml']:.1f} | {w['error']:.3f} | {w['kappa']:.1f} |" for w in worst]
    (out / "conditioning.md").write_text("\n".join(lines) + "\n")
    (out / "conditioning.json").write_text(json.dumps(dict(n=args.n, spearman=spearman, bins=rows, worst=worst), indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
