"""The patient table: one row per virtual patient with covariates, per-dose CRS and exposure,
response and every binary endpoint (the contract of patients.parquet)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from vpop import endpoints
from vpop.simulate import PreparedArm
from vpop.trial.arms import response_kind

MAIN_ENDPOINTS = ("orr", "cr", "crs_any", "crs_grade2plus", "crs_grade3plus", "toci_rescue")
# CRS starting in any dose period from the restart after a delay on (written when an arm has a delay).
RESTART_ENDPOINTS = ("crs_any_after_restart", "crs_grade2plus_after_restart")


def response_margins(prepared: PreparedArm, red: dict, cov: dict) -> endpoints.ResponseMargins:
    """The response margins of an arm's patients (see `endpoints.response_margins`)."""
    residual = float(prepared.population.response.get("cr_residual_volume_ml", 0.0))
    return endpoints.response_margins(response_kind(prepared), red["malignant_fraction_at"], red["marrow_malignant_fraction_at"],
                                      cov["tumour_volume_ml"], cov["marrow_malignant_percent"], residual)


PER_DOSE_VALUES = ("peak_il6_signalling_pg_ml", "peak_il6_serum_pg_ml", "cmax_ng_ml", "auc_ng_day_ml")


def repeated_string(value: str | None, n: int):
    """A `string` column holding `value` (None: null) n times, built in Arrow (zero-copy into pandas'
    default Arrow-backed strings): a list of n Python strings, `pd.array([value] * n)`, made the dose
    labels a third of the table's host time."""
    if value is None:
        return pd.array(pa.nulls(n, pa.large_string()), dtype="string")
    codes = pa.array(np.zeros(n, np.int32))
    return pd.array(pa.DictionaryArray.from_arrays(codes, pa.array([value], pa.large_string())).cast(pa.large_string()), dtype="string")


def missing_column(kind: str, n: int):
    """An all-null column of a dose period the arm does not have (int, bool, float or str)."""
    if kind == "str":
        return repeated_string(None, n)
    if kind == "float":
        return np.full(n, np.nan, np.float32)
    values = np.zeros(n, np.int64 if kind == "int" else bool)
    return (pd.arrays.IntegerArray if kind == "int" else pd.arrays.BooleanArray)(values, np.ones(n, bool))


def patient_table(prepared: PreparedArm, result, draw: int, n_doses: int | None = None,
                  patient_labels: np.ndarray | None = None, restarts: bool | None = None) -> pd.DataFrame:
    """One row per patient: covariates, per-dose-period CRS and exposure, response and endpoints.

    n_doses: per-dose columns to write (default: the arm's own); doses the arm does not have are
    null, so arms with different schedules share one table layout (one parquet schema).
    `dose<k>` names the k-th administration by its calendar ("C1D15 60 mg").
    patient_labels: the ids written for internal ids 0..n-1 (digital twins keep the user's ids).
    restarts: write the restart columns (`RESTART_ENDPOINTS`, null for an arm without a delay; default:
    when this arm has a delay), so the arms of one trial share one layout.
    """
    red, cov = result.reductions, result.covariates
    n, n_periods = red["crs_grade"].shape
    n_doses = n_periods if n_doses is None else n_doses
    ids = result.patient_id if patient_labels is None else np.asarray(patient_labels)[result.patient_id]
    cols: dict[str, Any] = {"arm": prepared.arm.name, "draw": draw, "patient_id": ids, **cov}
    grades = red["crs_grade"]
    missing = {kind: missing_column(kind, n) for kind in ("int", "bool", "float", "str")} if n_doses > n_periods or restarts else {}
    periods = prepared.compiled.periods
    for k in range(n_doses):
        d = f"_dose{k + 1}"
        if k >= n_periods:
            cols[f"dose{k + 1}"] = missing["str"]
            cols["crs_grade" + d] = missing["int"]
            cols["crs_onset_day" + d] = cols["crs_duration_day" + d] = cols["crs_hold_day" + d] = missing["float"]
            cols["toci_rescue" + d] = missing["bool"]
            for name in PER_DOSE_VALUES:
                cols[name + d] = missing["float"]
            continue
        cols[f"dose{k + 1}"] = repeated_string(periods[k].label, n)
        cols["crs_grade" + d] = grades[:, k].astype(int)
        cols["crs_onset_day" + d] = np.where(red["crs_onset_day"][:, k] >= 0, red["crs_onset_day"][:, k], np.nan)
        cols["crs_duration_day" + d] = red["crs_duration_day"][:, k]
        # Days the administration was held for CRS (model.crs.hold_until_resolved; 0 on schedule, NaN: never given).
        cols["crs_hold_day" + d] = np.where(red["crs_hold_day"][:, k] >= 0, red["crs_hold_day"][:, k], np.nan)
        cols["toci_rescue" + d] = red["toci_rescue"][:, k] > 0
        for name in PER_DOSE_VALUES:
            cols[name + d] = red[name][:, k]
    kind = response_kind(prepared)
    margins = response_margins(prepared, red, cov)
    delta = red["assessment_log_bias"]
    best = endpoints.best_response(margins, delta)
    first_pd = np.where(margins.progressed, margins.first_pd, -1)
    # Best change as assessed: the smallest burden before progression, read through the assessment effect.
    best_fraction = np.exp(margins.best_log + delta)
    best_change = endpoints.measured_fraction(kind, best_fraction) - 1.0
    blasts = (endpoints.marrow_blast_percent(best_fraction, cov["marrow_malignant_percent"]) if kind == "leukaemia"
              else np.full(n, np.nan))
    days = result.assessment_day
    worst = red["crs_max_grade"]
    cols.update(
        best_response=np.asarray(endpoints.RESPONSES)[best],
        best_change_percent=100.0 * best_change,
        best_marrow_blast_percent=blasts,  # leukaemia only (CR/CRh below 5%)
        refractory_percent=100.0 * red["refractory_share"],  # the burden no exposure clears, at the start
        progression_day=np.where(first_pd >= 0, days[np.maximum(first_pd, 0)], np.nan),
        crs_max_grade=worst.astype(int),
        crs_first_dose=endpoints.first_crs_dose(grades),  # administration after which the first CRS starts (0: none)
        orr=best <= 1,
        cr=best == 0,
        crs_any=worst >= 1,
        crs_grade2plus=worst >= 2,
        crs_grade3plus=worst >= 3,
        crs_recurrent=endpoints.recurrent_crs(grades),  # CRS starting after two or more doses
        toci_rescue=red["toci_rescue"].max(axis=1) > 0,
        progression=first_pd >= 0,
        b_cell_depletion=red["blood_b_min_fraction"] < endpoints.B_CELL_DEPLETION_FRACTION,
    )
    if "grid_rechecked" in red:  # a grade recheck ran (model.solver.recheck_margin): whose grades come from its grid
        cols["grid_rechecked"] = red["grid_rechecked"] > 0
    restart = prepared.compiled.restart_period
    if restarts or (restarts is None and restart is not None):
        for name, g in zip(RESTART_ENDPOINTS, (1, 2)):
            cols[name] = endpoints.crs_from_dose(grades, restart + 1, g) if restart is not None else missing["bool"]
    for k in range(n_doses):
        cols[f"crs_any_dose{k + 1}"] = grades[:, k] >= 1 if k < n_periods else missing["bool"]
        cols[f"crs_grade2plus_dose{k + 1}"] = grades[:, k] >= 2 if k < n_periods else missing["bool"]
    return pd.DataFrame(cols)


def endpoint_names(n_doses: int, restarts: bool = False) -> list[str]:
    """Every binary endpoint of an arm with `n_doses` dose periods (and a delay: `restarts`), main
    endpoints first: the columns summary.csv counts and an objective may name."""
    doses = range(1, n_doses + 1)
    return [*MAIN_ENDPOINTS, *(RESTART_ENDPOINTS if restarts else ()), "crs_recurrent", "progression", "b_cell_depletion",
            *(f"crs_any_dose{k}" for k in doses), *(f"crs_grade2plus_dose{k}" for k in doses)]


def endpoint_columns(df: pd.DataFrame) -> list[str]:
    """The binary endpoint columns of a patient table (`endpoint_names` of its layout)."""
    return endpoint_names(sum(c.startswith("crs_any_dose") for c in df.columns), RESTART_ENDPOINTS[0] in df.columns)
