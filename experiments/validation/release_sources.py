r"""Where each dose's cytokine release comes from: per compartment and dose period, the release rate
$\tilde\alpha_c$ at its peak against the primed level $H_c$ at the dose, the drug's occupancy and the
engageable T cells there, and the release integral $\int s\,dt$ with the IL-6 signalling peak.

    python experiments/validation/release_sources.py --arms epcoritamab_lbcl teclistamab --patients 100 --days 42

Arms are the `class_label_regimens` experiment's (every approved engager at its label regimen), at
the configs' nominals (the shipped posterior's medians), without posterior draws. Release needs
$\tilde\alpha_c > (1 + \delta) H_c$ (`vpop.model.cytokines`), so a dose whose peak rate does not
clear its primed level by the margin starts no CRS, whatever the patient's susceptibility. Prints
markdown; `--out FILE` also writes it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from vpop import catalogue
from vpop.model import cytokines as cyto
from vpop.model import system
from vpop.simulate import prepare_arm, simulate_trajectories
from vpop.trial.arms import arms_from_config


def label_arms() -> dict:
    return arms_from_config(catalogue.load("experiment", "class_label_regimens").experiment)[0]


def _at_time(y: system.State, p: system.Params):
    """Per compartment (release rate, primed level, engageable T cells, occupancy), the drive s and
    IL-6 signalling, at one state."""
    e = system.engagement(y.drugs, y.host.cells, p)
    c = y.host.cells
    engageable = c.t_resting + c.t_post
    primed = y.host.cytokines.primed
    per = {k: (getattr(e.release, k), getattr(primed, k), getattr(engageable, k), getattr(e.occupancy, k))
           for k in e.release._fields}
    drive = cyto.release_drive(e.release, engageable, primed, p.cytokines)
    return per, drive, system.observe(y, p).il6_signalling_pg_ml


def release_sources(arm, patients: int, days: float) -> str:
    """A markdown table of one arm's release by compartment and dose period (cohort means)."""
    prepared = prepare_arm(arm, horizon_days=days)
    times, states, params = simulate_trajectories(prepared, np.arange(patients))
    per, drive, il6 = jax.vmap(jax.vmap(_at_time, in_axes=(0, None)))(states, params)
    drive, il6 = np.asarray(drive), np.asarray(il6)
    starts = [float(p.day) for p in prepared.compiled.periods if float(p.day) < times[-1]]
    ends = starts[1:] + [float(times[-1])]
    labels = [p.label for p in prepared.compiled.periods][:len(starts)]
    used = [k for k, v in per.items() if float(np.asarray(v[0]).max()) * float(np.asarray(v[2]).max()) > 1e-9]
    head = ["dose", *(f"{k}: rate / H (occupancy, T 1e9)" for k in used), "release integral", "IL-6 signalling peak, median (p90) pg/mL"]
    rows = [f"**{arm.name}** ({arm.drug}, {arm.population}; {patients} patients at the nominals)", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, t0, t1 in zip(labels, starts, ends):
        inside = (times >= t0) & (times < t1)
        at_dose = int(np.searchsorted(times, t0))
        cells = []
        for k in used:
            rate, primed, engageable, occupancy = (np.asarray(x) for x in per[k])
            cells.append(f"{rate[:, inside].max(1).mean():.3g} / {primed[:, at_dose].mean():.3g} "
                         f"({occupancy[:, inside].max(1).mean():.2f}, {engageable[:, at_dose].mean():.2g})")
        step = (times[1:] > t0) & (times[1:] <= t1)
        integral = (drive[:, 1:][:, step] * np.diff(times)[step]).sum(1)
        peak = il6[:, inside].max(1)
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {integral.mean():.3g} | {np.median(peak):.3g} ({np.percentile(peak, 90):.3g}) |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> None:
    arms = label_arms()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", nargs="+", default=["epcoritamab_lbcl", "teclistamab", "talquetamab_biweekly"],
                    help=f"arms of class_label_regimens: {', '.join(arms)}")
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--days", type=float, default=42.0)
    ap.add_argument("--out", help="also write the tables to this markdown file")
    args = ap.parse_args(argv)
    unknown = [a for a in args.arms if a not in arms]
    if unknown:
        ap.error(f"--arms: unknown {', '.join(unknown)}; allowed: {', '.join(arms)}")
    if args.patients < 1 or args.days <= 0:
        ap.error("--patients must be >= 1 and --days > 0")
    text = "\n".join(release_sources(arms[a], args.patients, args.days) for a in args.arms)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
