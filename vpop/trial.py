"""In-silico trials: arms x posterior draws x virtual patients -> per-patient table, summary, comparisons.

All arms simulate the same virtual patients (same seed and patient ids: a paired design), so
differences between arms are paired. Rates are in percent with 95% intervals that carry both the
finite virtual cohort (a Jeffreys interval per draw) and, with `draws > 1`, parameter uncertainty
from the posterior (draws pooled).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from scipy import stats

from vpop import catalogue, endpoints, population
from vpop.catalogue import ConfigError
from vpop.simulate import Arm, PreparedArm, prepare_arm, simulate_arm, simulate_trajectories

ARM_KEYS = {"drug", "route", "population", "regimen", "premedication", "prophylaxis", "description"}
SUMMARY_COLUMNS = ["arm", "endpoint", "estimate", "lower", "upper", "n"]
COMPARISON_COLUMNS = ["endpoint", "arm", "reference_arm", "difference", "lower", "upper"]
MAIN_ENDPOINTS = ("orr", "cr", "crs_any", "crs_grade2plus", "crs_grade3plus", "toci_rescue")


@dataclass
class TrialSettings:
    n: int = 1000
    seed: int = 0
    draws: int = 1
    chunk_size: int = 10_000
    horizon_days: float | None = None
    assessment_every_days: float | None = None
    trajectories: int = 100  # patients per arm whose time courses feed the figures


@dataclass
class TrialResult:
    arms: dict[str, Arm]
    reference_arm: str
    patients: pd.DataFrame
    summary: pd.DataFrame
    comparisons: pd.DataFrame
    dose_labels: dict[str, list[str]]
    time_courses: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def arms_from_config(experiment: DictConfig | dict) -> tuple[dict[str, Arm], str]:
    """Arms and reference arm of an `experiment:` block; errors name the field and allowed values."""
    exp = OmegaConf.create(experiment) if not isinstance(experiment, DictConfig) else experiment
    extra = set(exp.keys()) - {"arms", "reference_arm", "description", "name"}
    if extra:
        raise ConfigError(f"experiment: unknown key(s) {sorted(extra)}; allowed: arms, reference_arm, description, name")
    if "arms" not in exp or not exp.arms:
        raise ConfigError("experiment.arms is missing or empty: give at least one arm")
    arms = {}
    for name, a in exp.arms.items():
        where = f"experiment.arms.{name}"
        extra = set(a.keys()) - ARM_KEYS
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {sorted(extra)}; allowed: {sorted(ARM_KEYS)}")
        for required in ("drug", "population", "regimen"):
            if required not in a:
                raise ConfigError(f"{where}.{required} is missing")
        reg = a.regimen if isinstance(a.regimen, str) else OmegaConf.to_container(a.regimen, resolve=True)
        route = a.get("route") or (catalogue.load("regimen", reg, f"{where}.regimen").get("route") if isinstance(reg, str) else reg.get("route"))
        if route is None:
            raise ConfigError(f"{where}.route is missing (iv, sc or civ) and the regimen names none")

        def plain(x):
            return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig) else x

        arms[str(name)] = Arm(str(name), str(a.drug), str(route), str(a.population), reg,
                              plain(a.get("premedication")), plain(a.get("prophylaxis")))
    ref = exp.get("reference_arm") or next(iter(arms))
    if ref not in arms:
        raise ConfigError(f"experiment.reference_arm '{ref}' is not an arm; allowed: {', '.join(arms)}")
    return arms, str(ref)


def patient_table(prepared: PreparedArm, result, draw: int) -> pd.DataFrame:
    """One row per patient: covariates, per-dose-period CRS and exposure, response and endpoints."""
    red, cov = result.reductions, result.covariates
    n, n_periods = red["crs_grade"].shape
    cols: dict[str, Any] = {"arm": prepared.arm.name, "draw": draw, "patient_id": result.patient_id, **cov}
    grades = red["crs_grade"]
    for k in range(n_periods):
        d = f"_dose{k + 1}"
        cols["crs_grade" + d] = grades[:, k].astype(int)
        cols["crs_onset_day" + d] = np.where(red["crs_onset_day"][:, k] >= 0, red["crs_onset_day"][:, k], np.nan)
        cols["crs_duration_day" + d] = red["crs_duration_day"][:, k]
        cols["toci_rescue" + d] = red["toci_rescue"][:, k] > 0
        for name in ("peak_il6_signalling_pg_ml", "peak_il6_serum_pg_ml", "cmax_ng_ml", "auc_ng_day_ml"):
            cols[name + d] = red[name][:, k]
    kind = prepared.population.get("response", {}).get("kind", "lymphoma")
    if kind not in endpoints.RESPONSE_KINDS:
        raise ConfigError(f"population/{prepared.arm.population}.response.kind must be one of {endpoints.RESPONSE_KINDS}")
    if kind == "lymphoma":
        residual = float(prepared.population.response.cr_residual_volume_ml)
        best, first_pd = endpoints.lymphoma_response(red["malignant_fraction_at"], cov["tumour_volume_ml"], residual)
        best_change = red["malignant_fraction_at"].min(axis=1) ** (2.0 / 3.0) - 1.0  # SPD change at best assessment
    elif kind == "leukaemia":
        best, first_pd = endpoints.leukaemia_response(red["marrow_malignant_fraction_at"], cov["marrow_malignant_percent"])
        best_change = red["marrow_malignant_fraction_at"].min(axis=1) - 1.0
    else:
        best, first_pd = endpoints.myeloma_response(red["malignant_fraction_at"])
        best_change = red["malignant_fraction_at"].min(axis=1) - 1.0
    days = result.assessment_day
    worst = grades.max(axis=1)
    cols.update(
        best_response=np.asarray(endpoints.RESPONSES)[best],
        best_change_percent=100.0 * best_change,
        progression_day=np.where(first_pd >= 0, days[np.maximum(first_pd, 0)], np.nan),
        crs_max_grade=worst.astype(int),
        orr=best <= 1,
        cr=best == 0,
        crs_any=worst >= 1,
        crs_grade2plus=worst >= 2,
        crs_grade3plus=worst >= 3,
        toci_rescue=red["toci_rescue"].max(axis=1) > 0,
        progression=first_pd >= 0,
        b_cell_depletion=red["blood_b_min_fraction"] < 0.1,
    )
    for k in range(n_periods):
        cols[f"crs_any_dose{k + 1}"] = grades[:, k] >= 1
        cols[f"crs_grade2plus_dose{k + 1}"] = grades[:, k] >= 2
    df = pd.DataFrame(cols)
    return df


def endpoint_columns(df: pd.DataFrame) -> list[str]:
    """The binary endpoint columns, main endpoints first."""
    per_dose = sorted((c for c in df.columns if c.startswith(("crs_any_dose", "crs_grade2plus_dose"))),
                      key=lambda c: (c.startswith("crs_grade2plus"), int(c.rsplit("dose", 1)[1])))
    return [*MAIN_ENDPOINTS, "progression", "b_cell_depletion", *per_dose]


def _pooled_interval(k: np.ndarray, n: int, rng: np.random.Generator, samples: int = 4000) -> tuple[float, float, float]:
    """Estimate and 95% interval of a rate (fraction) from per-draw event counts k out of n."""
    k = np.asarray(k, float)
    if len(k) == 1:
        lo, hi = stats.beta.ppf([0.025, 0.975], k[0] + 0.5, n - k[0] + 0.5)
        return k[0] / n, (0.0 if k[0] == 0 else lo), (1.0 if k[0] == n else hi)
    draws = rng.beta(np.repeat(k + 0.5, samples // len(k) + 1), np.repeat(n - k + 0.5, samples // len(k) + 1))
    return float(np.mean(k / n)), *np.percentile(draws, [2.5, 97.5])


def summarise(patients: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """summary.csv: rate (%) of every binary endpoint per arm with its 95% interval."""
    rng = np.random.default_rng(seed)
    rows = []
    cols = [c for c in endpoint_columns(patients) if c in patients.columns]
    for arm, g in patients.groupby("arm", sort=False):
        n = int(g.groupby("draw").size().iloc[0])
        for col in cols:
            if g[col].isna().all():
                continue
            k = g.groupby("draw")[col].sum().to_numpy()
            est, lo, hi = _pooled_interval(k, n, rng)
            rows.append((arm, col, 100 * est, 100 * lo, 100 * hi, n))
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def compare(patients: pd.DataFrame, reference_arm: str, seed: int = 0) -> pd.DataFrame:
    """comparisons.csv: paired differences (percentage points) of every arm against the reference."""
    rng = np.random.default_rng(seed + 1)
    rows = []
    cols = [c for c in endpoint_columns(patients) if c in patients.columns]
    ref = patients[patients.arm == reference_arm].set_index(["draw", "patient_id"])
    for arm, g in patients.groupby("arm", sort=False):
        if arm == reference_arm:
            continue
        g = g.set_index(["draw", "patient_id"])
        for col in cols:
            if col not in ref or g[col].isna().all() or ref[col].isna().all():
                continue
            diff = (g[col].astype(float) - ref[col].astype(float)).dropna()
            by_draw = diff.groupby(level="draw")
            mean = by_draw.mean().to_numpy()
            # Agresti-Min interval for a paired difference of proportions: half a pair added to each
            # of the four cells (keeps ~95% coverage for rare and strongly paired events).
            n10 = (diff > 0).groupby(level="draw").sum().to_numpy() + 0.5
            n01 = (diff < 0).groupby(level="draw").sum().to_numpy() + 0.5
            n = by_draw.size().to_numpy() + 2.0
            centre = (n10 - n01) / n
            se = np.sqrt(np.maximum((n10 + n01) - (n10 - n01) ** 2 / n, 0.0)) / n
            if len(mean) == 1:
                lo, hi = centre[0] - 1.96 * se[0], centre[0] + 1.96 * se[0]
            else:
                sims = rng.normal(np.repeat(centre, 1000), np.repeat(se, 1000))
                lo, hi = np.percentile(sims, [2.5, 97.5])
            rows.append((col, arm, reference_arm, 100 * mean.mean(), 100 * lo, 100 * hi))
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def _time_course_bands(prepared: PreparedArm, ids, seed: int, twins=None) -> dict[str, np.ndarray]:
    """Median and 5-95% band of the figure time courses over the given patients."""
    import jax

    from vpop.model import system

    times, states, params = simulate_trajectories(prepared, ids, seed, twins)
    expand = jax.tree_util.tree_map(lambda x: np.asarray(x)[:, None], params)
    obs = system.observe(states, expand)
    cells = states.host.cells
    series = {
        "drug_ng_ml": np.asarray(obs.bispecific_ng_ml),
        "il6_signalling_pg_ml": np.asarray(obs.il6_signalling_pg_ml),
        "activated_t_cells_1e9": np.asarray(cells.t_active.total()),
        "malignant_percent_of_baseline": 100 * np.asarray(obs.malignant_total) / np.maximum(np.asarray(obs.malignant_total)[:, :1], 1e-12),
    }
    keep = np.concatenate([[True], np.diff(times) > 0])
    out = {"day": times[keep]}
    for k, v in series.items():
        q = np.percentile(v[:, keep], [5, 50, 95], axis=0)
        out[k] = q
    return out


def run_trial(arms: dict[str, Arm], reference_arm: str, settings: TrialSettings, model: DictConfig | None = None,
              draws: list[dict[str, float]] | None = None, twins: pd.DataFrame | None = None,
              progress: Callable[[int], None] | None = None) -> TrialResult:
    """Simulate every arm for every posterior draw on the same virtual patients.

    draws: config overrides per posterior draw (see `vpop.posterior`); None is one draw of the
    nominal parameters. twins: a digital-twin table (one patient per row) instead of sampling.
    """
    model = model if model is not None else catalogue.load("model", "default")
    draws = draws or [{}]
    tables, dose_labels, courses = [], {}, {}
    for d, overrides in enumerate(draws):
        for name, arm in arms.items():
            prepared = prepare_arm(arm, model, settings.horizon_days, settings.assessment_every_days, overrides=overrides)
            twin_cov = population.twins_covariates(twins, prepared.population) if twins is not None else None
            n = len(twins) if twins is not None else settings.n
            result = simulate_arm(prepared, n, settings.seed, settings.chunk_size, twins=twin_cov, progress=progress)
            tables.append(patient_table(prepared, result, d))
            if d == 0:
                dose_labels[name] = [a.label for a in prepared.compiled.periods]
                if settings.trajectories > 0:
                    ids = np.arange(min(settings.trajectories, n))
                    courses[name] = _time_course_bands(prepared, ids, settings.seed, twin_cov)
    patients = pd.concat(tables, ignore_index=True)
    return TrialResult(arms, reference_arm, patients, summarise(patients, settings.seed), compare(patients, reference_arm, settings.seed),
                       dose_labels, courses)
