"""Talquetamab's apparent one-compartment PK, fitted to the label's exposure (configs/drug/talquetamab.yaml).

The published population PK model (Gong 2025 Clin Pharmacol Ther 118:954) is available here only as
its abstract: t1/2 7.56 days at the first dose and 12.2 days at steady state. Those fix CL/V at the
first dose and at steady state; V/F, ka and the rate at which clearance falls are fitted to the label's
Cmax and AUCtau after the 1st and 7th weekly 0.4 mg/kg dose and its Tmax (geometric means from the
label's mean and SD), for a 74-kg patient on the weekly step-up schedule (0.01, 0.06, 0.4 mg/kg on days
1, 4, 7). Prints the fitted values and the residuals.

    python experiments/pk/talquetamab_label_fit.py
"""

import numpy as np
from scipy.optimize import least_squares

from vpop import targets

WEIGHT_KG = 74.0  # the typical patient (Talvey is dosed by weight) [G]
STEP_DAY = 0.005
DOSE_DAYS_MG_PER_KG = {0.0: 0.01, 3.0: 0.06, **{6.0 + 7 * k: 0.4 for k in range(7)}}  # the label's weekly schedule
PUBLISHED = targets.exposure().typical  # vpop/data/exposure.csv, with sources
HALF_LIFE_FIRST_DAY, HALF_LIFE_SS_DAY = PUBLISHED["talquetamab_half_life_first"], PUBLISHED["talquetamab_half_life_ss"]
LABEL = {  # ng/mL, ng.day/mL and day
    "cmax_dose1": PUBLISHED["talquetamab_cmax_dose1"], "auc_dose1": PUBLISHED["talquetamab_auc_dose1"] / 24,
    "cmax_dose7": PUBLISHED["talquetamab_cmax_dose7"], "auc_dose7": PUBLISHED["talquetamab_auc_dose7"] / 24,
    "tmax_dose1_day": PUBLISHED["talquetamab_tmax_dose1"],
}


def exposure(v_l, ka_per_day, decay_per_day):
    """Label metrics of the model: exact exponential steps for absorption and elimination."""
    k_ss, k_first = np.log(2) / HALF_LIFE_SS_DAY, np.log(2) / HALF_LIFE_FIRST_DAY
    cl_ss, cl_extra = k_ss * v_l, (k_first - k_ss) * v_l
    t = np.arange(int(round(55 / STEP_DAY)) + 1) * STEP_DAY
    doses = {int(round(d / STEP_DAY)): a * WEIGHT_KG for d, a in DOSE_DAYS_MG_PER_KG.items()}
    depot = central = 0.0
    conc = np.empty_like(t)
    decay_ka = np.exp(-ka_per_day * STEP_DAY)
    for i, ti in enumerate(t):
        depot += doses.get(i, 0.0)
        conc[i] = central / v_l * 1000.0
        k = (cl_ss + cl_extra * np.exp(-decay_per_day * ti)) / v_l
        absorbed, depot = depot * (1 - decay_ka), depot * decay_ka
        e = np.exp(-k * STEP_DAY)
        central = central * e + absorbed * (1 - e) / (k * STEP_DAY)

    def window(start):
        keep = (t >= start - 1e-9) & (t <= start + 7 + 1e-9)
        return t[keep], conc[keep]

    t1, c1 = window(6.0)
    t7, c7 = window(48.0)
    metrics = {"cmax_dose1": c1.max(), "auc_dose1": np.trapezoid(c1, t1), "cmax_dose7": c7.max(),
               "auc_dose7": np.trapezoid(c7, t7), "tmax_dose1_day": t1[c1.argmax()] - 6.0}
    return metrics, {"cl_l_per_day": cl_ss, "cl_decay_l_per_day": cl_extra, "cl_decay_rate_per_day": decay_per_day,
                     "v1_l": v_l, "ka_per_day": ka_per_day}


def main():
    def residuals(log_theta):
        metrics, _ = exposure(*np.exp(log_theta))
        return [np.log(metrics[k] / LABEL[k]) for k in LABEL]

    fit = least_squares(residuals, np.log([10.0, 0.3, 0.05]), diff_step=1e-3)
    metrics, params = exposure(*np.exp(fit.x))
    print("parameters:", {k: round(float(v), 4) for k, v in params.items()})
    for k in LABEL:
        print(f"{k:15s} label {LABEL[k]:10.1f}  model {metrics[k]:10.1f}  ({100 * (metrics[k] / LABEL[k] - 1):+.0f}%)")


if __name__ == "__main__":
    main()
