"""In-silico trials: arms x posterior draws x virtual patients -> per-patient table, summary, comparisons.

All arms simulate the same virtual patients (same seed and patient ids: a paired design), so
differences between arms are paired. Rates are in percent with 95% intervals that carry both the
finite virtual cohort (a Jeffreys interval per draw) and, with `draws > 1`, parameter uncertainty
from the posterior (draws pooled).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from scipy import stats

from vpop import catalogue, endpoints, parameters, population
from vpop import targets as published
from vpop.catalogue import ConfigError
from vpop.simulate import Arm, PreparedArm, check_sizes, dispatch_ids, prepare_arm, simulate_trajectories
from vpop.store import PatientStore, run_key

log = logging.getLogger("vpop")

ARM_KEYS = {"drug", "route", "population", "regimen", "premedication", "prophylaxis", "description"}
SUMMARY_COLUMNS = ["arm", "endpoint", "estimate", "lower", "upper", "n"]
COMPARISON_COLUMNS = ["endpoint", "arm", "reference_arm", "difference", "lower", "upper", "reference_endpoint", "dose", "reference_dose"]
MAIN_ENDPOINTS = ("orr", "cr", "crs_any", "crs_grade2plus", "crs_grade3plus", "toci_rescue")
SAMPLE_PATIENTS = 2000  # first patients of draw 0 kept in memory per arm, for per-patient figures
B_CELL_DEPLETION_FRACTION = 0.1  # blood B cells below 10% of baseline at any time [G]


@dataclass
class TrialSettings:
    n: int = 1000
    seed: int = 0
    chunk_size: int = 10_000
    horizon_days: float | None = None
    assessment_every_days: float | None = None
    trajectories: int = 100  # patients per arm whose time courses feed the figures


@dataclass
class TrialResult:
    """A finished trial. `patients` holds every row when run in memory; a streamed run leaves them in
    the parquet dataset at `dataset` and keeps only `sample` (draw 0, first SAMPLE_PATIENTS per arm)."""

    arms: dict[str, Arm]
    reference_arm: str
    summary: pd.DataFrame
    comparisons: pd.DataFrame
    periods: dict[str, list]  # per arm, its administrations of the bispecific (regimen.Administration), in order
    administrations: dict[str, list]  # per arm, every administration (co-medications too)
    response_kinds: dict[str, str]  # per arm: lymphoma | leukaemia | myeloma
    sample: pd.DataFrame
    patients: pd.DataFrame | None = None
    dataset: Path | None = None
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
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", str(name)):
            raise ConfigError(f"{where}: arm names may use letters, digits and _ . + - only (they name folders of patients.parquet)")
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


def response_margins(prepared: PreparedArm, red: dict, cov: dict) -> endpoints.ResponseMargins:
    """The response margins of an arm's patients (see `endpoints.response_margins`)."""
    residual = float(prepared.population.response.get("cr_residual_volume_ml", 0.0))
    return endpoints.response_margins(response_kind(prepared), red["malignant_fraction_at"], red["marrow_malignant_fraction_at"],
                                      cov["tumour_volume_ml"], cov["marrow_malignant_percent"], residual)


def response_kind(prepared: PreparedArm) -> str:
    """How the arm's population responds: lymphoma (SPD), leukaemia (marrow blasts) or myeloma."""
    kind = prepared.population.get("response", {}).get("kind", "lymphoma")
    if kind not in endpoints.RESPONSE_KINDS:
        raise ConfigError(f"population/{prepared.arm.population}.response.kind must be one of {endpoints.RESPONSE_KINDS}")
    return str(kind)


PER_DOSE_VALUES = ("peak_il6_signalling_pg_ml", "peak_il6_serum_pg_ml", "cmax_ng_ml", "auc_ng_day_ml")


def patient_table(prepared: PreparedArm, result, draw: int, n_doses: int | None = None,
                  patient_labels: np.ndarray | None = None) -> pd.DataFrame:
    """One row per patient: covariates, per-dose-period CRS and exposure, response and endpoints.

    n_doses: per-dose columns to write (default: the arm's own); doses the arm does not have are
    null, so arms with different schedules share one table layout (one parquet schema).
    `dose<k>` names the k-th administration by its calendar ("C1D15 60 mg").
    patient_labels: the ids written for internal ids 0..n-1 (digital twins keep the user's ids).
    """
    red, cov = result.reductions, result.covariates
    n, n_periods = red["crs_grade"].shape
    n_doses = n_periods if n_doses is None else n_doses
    ids = result.patient_id if patient_labels is None else np.asarray(patient_labels)[result.patient_id]
    cols: dict[str, Any] = {"arm": prepared.arm.name, "draw": draw, "patient_id": ids, **cov}
    grades = red["crs_grade"]
    missing = {"int": pd.array([pd.NA] * n, dtype="Int64"), "bool": pd.array([pd.NA] * n, dtype="boolean"),
               "float": np.full(n, np.nan, np.float32), "str": pd.array([pd.NA] * n, dtype="string")}
    periods = prepared.compiled.periods
    for k in range(n_doses):
        d = f"_dose{k + 1}"
        if k >= n_periods:
            cols[f"dose{k + 1}"] = missing["str"]
            cols["crs_grade" + d] = missing["int"]
            cols["crs_onset_day" + d] = cols["crs_duration_day" + d] = missing["float"]
            cols["toci_rescue" + d] = missing["bool"]
            for name in PER_DOSE_VALUES:
                cols[name + d] = missing["float"]
            continue
        cols[f"dose{k + 1}"] = pd.array([periods[k].label] * n, dtype="string")
        cols["crs_grade" + d] = grades[:, k].astype(int)
        cols["crs_onset_day" + d] = np.where(red["crs_onset_day"][:, k] >= 0, red["crs_onset_day"][:, k], np.nan)
        cols["crs_duration_day" + d] = red["crs_duration_day"][:, k]
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
    best_change = (endpoints.spd_fraction(best_fraction) if kind == "lymphoma" else best_fraction) - 1.0
    blasts = (endpoints.marrow_blast_percent(best_fraction, cov["marrow_malignant_percent"]) if kind == "leukaemia"
              else np.full(n, np.nan))
    days = result.assessment_day
    worst = red["crs_max_grade"]
    cols.update(
        best_response=np.asarray(endpoints.RESPONSES)[best],
        best_change_percent=100.0 * best_change,
        best_marrow_blast_percent=blasts,  # leukaemia only (CR/CRh below 5%)
        progression_day=np.where(first_pd >= 0, days[np.maximum(first_pd, 0)], np.nan),
        crs_max_grade=worst.astype(int),
        crs_first_dose=endpoints.first_crs_dose(grades),  # administration after which the first CRS starts (0: none)
        orr=best <= 1,
        cr=best == 0,
        crs_any=worst >= 1,
        crs_grade2plus=worst >= 2,
        crs_grade3plus=worst >= 3,
        toci_rescue=red["toci_rescue"].max(axis=1) > 0,
        progression=first_pd >= 0,
        b_cell_depletion=red["blood_b_min_fraction"] < B_CELL_DEPLETION_FRACTION,
    )
    for k in range(n_doses):
        cols[f"crs_any_dose{k + 1}"] = grades[:, k] >= 1 if k < n_periods else missing["bool"]
        cols[f"crs_grade2plus_dose{k + 1}"] = grades[:, k] >= 2 if k < n_periods else missing["bool"]
    return pd.DataFrame(cols)


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


def paired_doses(periods: list, reference_periods: list) -> dict[int, int]:
    """Dose k of an arm -> dose j of the reference arm given at the same time (day and hour from
    cycle 1 day 1); doses with no counterpart are left out, so per-dose comparisons never pair
    different days of the calendar."""
    at = {round(a.day, 6): j for j, a in enumerate(reference_periods)}
    return {k: at[round(a.day, 6)] for k, a in enumerate(periods) if round(a.day, 6) in at}


class EndpointCounts:
    """Per-draw event counts of every binary endpoint, added chunk by chunk.

    Counts are all that summary.csv and comparisons.csv need, so a trial's tables never have to be
    in memory at once: per arm and draw, k events among the patients with a value; per arm against
    the reference arm, the discordant pairs n10 (arm yes, reference no) and n01 and the pairs with
    both values. Per-dose endpoints are paired with the reference arm's dose on the same calendar
    day (`paired_doses`); `periods` gives each arm's administrations (None: pair dose k with dose k).
    """

    def __init__(self, arms: list[str], reference_arm: str, periods: dict[str, list] | None = None):
        self.arms, self.reference_arm = list(arms), reference_arm
        self.periods = periods
        self.columns: list[str] | None = None
        self.rows = defaultdict(lambda: defaultdict(int))  # arm -> draw -> patients
        self.events = defaultdict(lambda: defaultdict(lambda: np.zeros(2)))  # (arm, col) -> draw -> [k, valued]
        self.pairs = defaultdict(lambda: defaultdict(lambda: np.zeros(3)))  # (arm, col) -> draw -> [n10, n01, pairs]

    def reference_column(self, arm: str, column: str) -> str | None:
        """The reference arm's column a column of `arm` is compared with (None: no counterpart)."""
        if self.periods is None or "_dose" not in column:
            return column
        kind, k = column.rsplit("_dose", 1)
        j = paired_doses(self.periods[arm], self.periods[self.reference_arm]).get(int(k) - 1)
        return None if j is None else f"{kind}_dose{j + 1}"

    def add(self, draw: int, tables: dict[str, pd.DataFrame]) -> None:
        """Count one chunk: the same patients (same order) in every arm's table."""
        if self.columns is None:
            first = next(iter(tables.values()))
            self.columns = [c for c in endpoint_columns(first) if c in first.columns]
        ref = tables.get(self.reference_arm)
        as_float = {arm: {c: t[c].to_numpy(dtype=float, na_value=np.nan) for c in self.columns} for arm, t in tables.items()}
        for arm, t in tables.items():
            self.rows[arm][draw] += len(t)
            for c, v in as_float[arm].items():
                valued = ~np.isnan(v)
                self.events[arm, c][draw] += (np.sum(v[valued]), np.sum(valued))
            if ref is None or arm == self.reference_arm:
                continue
            if not np.array_equal(t["patient_id"].to_numpy(), ref["patient_id"].to_numpy()):
                raise ValueError(f"arm {arm} and the reference arm hold different patients in this chunk")
            for c, v in as_float[arm].items():
                r = self.reference_column(arm, c)
                if r is None:
                    continue
                diff = v - as_float[self.reference_arm][r]
                diff = diff[~np.isnan(diff)]
                self.pairs[arm, c][draw] += (np.sum(diff > 0), np.sum(diff < 0), len(diff))

    def summary(self, seed: int = 0) -> pd.DataFrame:
        """summary.csv: rate (%) of every binary endpoint per arm with its 95% interval."""
        rng = np.random.default_rng(seed)
        rows = []
        for arm in self.arms:
            draws = sorted(self.rows[arm])
            n = self.rows[arm][draws[0]]
            for c in self.columns or []:
                counts = np.array([self.events[arm, c][d] for d in draws])
                if counts[:, 1].sum() == 0:  # a dose this arm does not have
                    continue
                est, lo, hi = _pooled_interval(counts[:, 0], n, rng)
                rows.append((arm, c, 100 * est, 100 * lo, 100 * hi, n))
        return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)

    def comparisons(self, seed: int = 0) -> pd.DataFrame:
        """comparisons.csv: paired differences (percentage points) of every arm against the reference."""
        rng = np.random.default_rng(seed + 1)
        rows = []
        for arm in self.arms:
            if arm == self.reference_arm:
                continue
            for c in self.columns or []:
                per_draw = np.array([self.pairs[arm, c][d] for d in sorted(self.pairs[arm, c])]).reshape(-1, 3)
                per_draw = per_draw[per_draw[:, 2] > 0]
                if len(per_draw) == 0:
                    continue
                n10, n01, pairs = per_draw.T
                mean = (n10 - n01) / pairs
                # Agresti-Min interval for a paired difference of proportions: half a pair added to each
                # of the four cells (keeps ~95% coverage for rare and strongly paired events).
                n10, n01, n = n10 + 0.5, n01 + 0.5, pairs + 2.0
                centre = (n10 - n01) / n
                se = np.sqrt(np.maximum((n10 + n01) - (n10 - n01) ** 2 / n, 0.0)) / n
                if len(mean) == 1:
                    lo, hi = centre[0] - 1.96 * se[0], centre[0] + 1.96 * se[0]
                else:
                    sims = rng.normal(np.repeat(centre, 1000), np.repeat(se, 1000))
                    lo, hi = np.percentile(sims, [2.5, 97.5])
                rows.append((c, arm, self.reference_arm, 100 * mean.mean(), 100 * lo, 100 * hi, self.reference_column(arm, c),
                             *self._dose_labels(arm, c)))
        return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)

    def _dose_labels(self, arm: str, column: str) -> tuple[str, str]:
        """Calendar labels of the two doses a per-dose comparison pairs ('' for overall endpoints)."""
        if self.periods is None or "_dose" not in column:
            return "", ""
        k = int(column.rsplit("_dose", 1)[1]) - 1
        j = int(self.reference_column(arm, column).rsplit("_dose", 1)[1]) - 1
        return self.periods[arm][k].label, self.periods[self.reference_arm][j].label


def annotate_summary(summary: pd.DataFrame, arms: dict[str, Arm], periods: dict[str, list], targets: pd.DataFrame) -> pd.DataFrame:
    """summary.csv's evidence and calendar columns: `support` (calibrated | validated | extrapolated,
    from the published targets), and for per-dose endpoints the dose's cycle, day, hour, amount and unit."""
    out = summary.copy()
    out["support"] = [published.support(targets, arms[r.arm].drug, arms[r.arm].route, arms[r.arm].population, r.endpoint)
                      for r in summary.itertuples()]
    cal = []
    for r in summary.itertuples():
        if "_dose" in r.endpoint:
            a = periods[r.arm][int(r.endpoint.rsplit("_dose", 1)[1]) - 1]
            cal.append((a.cycle, a.cycle_day, a.hour, a.amount, a.unit))
        else:
            cal.append((pd.NA, np.nan, np.nan, np.nan, ""))
    calendar = pd.DataFrame(cal, columns=["cycle", "day", "hour", "amount", "unit"], index=out.index)
    calendar["cycle"] = calendar["cycle"].astype("Int64")
    return pd.concat([out, calendar], axis=1)


def count_endpoints(patients: pd.DataFrame, reference_arm: str | None = None) -> EndpointCounts:
    """EndpointCounts of a whole in-memory patient table (rows paired across arms by patient_id)."""
    arms = list(dict.fromkeys(patients["arm"]))
    counts = EndpointCounts(arms, reference_arm or arms[0])
    for draw, g in patients.groupby("draw", sort=True):
        counts.add(int(draw), {arm: t.sort_values("patient_id") for arm, t in g.groupby("arm", sort=False)})
    return counts


def compare(patients: pd.DataFrame, reference_arm: str, seed: int = 0) -> pd.DataFrame:
    """comparisons.csv of an in-memory patient table."""
    return count_endpoints(patients, reference_arm).comparisons(seed)


def _time_course_bands(prepared: PreparedArm, ids, seed: int, twins=None) -> dict[str, np.ndarray]:
    """Median and 5-95% band of the figure time courses over the given patients."""
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


def prepare_draws(arms: dict[str, Arm], settings: TrialSettings, model: DictConfig,
                  draws: list[dict[str, float]]) -> list[dict[str, PreparedArm]]:
    """Every arm prepared once (configs read and checked, regimen compiled, schedule built: a draw
    cannot change them), then each posterior draw substituted into its typical parameters by the
    calibration's mechanism (`parameters.substitute`)."""
    out = [{} for _ in draws]
    for name, arm in arms.items():
        base = prepare_arm(arm, model, settings.horizon_days, settings.assessment_every_days)
        spec = parameters.ArmSpec(arm.drug, arm.route, arm.population)
        paths = parameters.parameter_paths(draws[0], spec)  # every draw of a posterior names the same parameters
        for by_arm, values in zip(out, draws):
            typical = parameters.substitute(base.inputs.typical, paths, values)
            by_arm[name] = replace(base, inputs=base.inputs._replace(typical=typical))
    return out


def trial_key(prepared: list[dict[str, PreparedArm]], settings: TrialSettings, n: int, twins: pd.DataFrame | None) -> str:
    """Digest of everything the patient rows depend on: the kernels' inputs of every arm and draw,
    the population's response rules, n, seed, chunk size, digital twins and the vpop version. A run
    resumes only into chunks written under the same key."""
    try:
        code = version("vpop")
    except PackageNotFoundError:  # a source tree that was never installed
        code = "unversioned"
    parts: list[Any] = [code, n, settings.seed, settings.chunk_size]
    for by_arm in prepared:
        for name, p in by_arm.items():
            parts += [name, p.variability_paths, p.covariate_kinds, OmegaConf.to_yaml(p.population),
                      [a.label for a in p.compiled.periods], *jax.tree_util.tree_leaves(p.inputs)]
    if twins is not None:
        parts += [twins.to_csv(index=False)]
    return run_key(parts)


def run_trial(arms: dict[str, Arm], reference_arm: str, settings: TrialSettings, model: DictConfig | None = None,
              draws: list[dict[str, float]] | None = None, twins: pd.DataFrame | None = None,
              progress: Callable[..., None] | None = None, checkpoint_dir: str | Path | None = None,
              resume: bool = True, prepared: list[dict[str, PreparedArm]] | None = None) -> TrialResult:
    """Simulate every arm for every posterior draw on the same virtual patients, chunk by chunk.

    draws: parameter values by config path per posterior draw (see `vpop.posterior`); None is one draw of the
    nominal parameters. twins: a digital-twin table (one patient per row, covariate columns complete
    or filled, see `population.read_twins`; a `patient_id` column labels the output rows) instead of
    sampling. checkpoint_dir: None keeps every patient row in memory (`result.patients`); a folder
    streams them chunk by chunk to a parquet dataset under checkpoint_dir/<trial key>/ so host memory
    stays bounded whatever n is, and a rerun of a killed run (same key) skips the chunks already written
    (`resume=False` starts afresh). progress(k, resumed=False) is called per chunk with its patients.
    prepared: the arms already prepared for every draw (`prepare_draws`), e.g. by a validation pass.
    """
    model = model if model is not None else catalogue.load("model", "default")
    draws = draws or [{}]
    prepared = prepared if prepared is not None else prepare_draws(arms, settings, model, draws)
    n = len(twins) if twins is not None else settings.n
    labels = population.twin_ids(twins) if twins is not None else None
    check_sizes(n, settings.chunk_size)
    chunk = min(settings.chunk_size, n)
    n_doses = max(len(p.compiled.periods) for p in prepared[0].values())
    store = None
    if checkpoint_dir is not None:
        store = PatientStore(Path(checkpoint_dir) / trial_key(prepared, settings, n, twins))
        if not resume:
            store.clear()
        store.open({"arms": {k: vars(a) for k, a in arms.items()}, "n": n, "seed": settings.seed,
                        "chunk_size": settings.chunk_size, "draws": len(draws)})
    periods = {name: p.compiled.periods for name, p in prepared[0].items()}
    counts = EndpointCounts(list(arms), reference_arm, periods)
    kept, sample, resumed = [], [], 0  # sample: draw 0's first SAMPLE_PATIENTS patients per arm, for figures
    twin_cov = [{name: population.twins_covariates(twins, p.population) for name, p in by_arm.items()} if twins is not None else {}
                for by_arm in prepared]
    chunks = [(d, c, start) for d in range(len(prepared)) for c, start in enumerate(range(0, n, chunk))]

    def launch(d, c, start):
        """Dispatch the chunk's arms that are not on disk yet (None: resume from disk)."""
        ids = np.arange(start, min(start + chunk, n))
        return {name: None if store is not None and store.has(name, d, c) else
                dispatch_ids(p, ids, settings.seed, chunk, twin_cov[d].get(name)) for name, p in prepared[d].items()}

    # One chunk ahead: the device simulates chunk i + 1 while the host tabulates and writes chunk i.
    ahead = launch(*chunks[0])
    for i, (d, c, start) in enumerate(chunks):
        pending, ahead = ahead, launch(*chunks[i + 1]) if i + 1 < len(chunks) else None
        size = min(chunk, n - start)
        tables = {}
        for name, p in prepared[d].items():
            done = pending[name] is None
            if done:
                tables[name] = store.read(name, d, c)
                resumed += 1
            else:
                tables[name] = patient_table(p, pending[name].result(), d, n_doses, labels)
                if store is None:
                    kept.append(tables[name])
                else:
                    store.write(name, d, c, tables[name])
            if progress is not None:
                progress(size, resumed=done)
        counts.add(d, tables)
        if d == 0 and start < SAMPLE_PATIENTS:
            sample += [t.iloc[:SAMPLE_PATIENTS - start] for t in tables.values()]
    if store is not None:
        store.finish()
    if resumed:
        log.info("resumed %d of %d chunks from %s", resumed, len(chunks) * len(arms), store.root)
    courses = {}
    if settings.trajectories > 0:
        for name, p in prepared[0].items():
            twin_cov = population.twins_covariates(twins, p.population) if twins is not None else None
            courses[name] = _time_course_bands(p, np.arange(min(settings.trajectories, n)), settings.seed, twin_cov)
    summary = annotate_summary(counts.summary(settings.seed), arms, periods, published.load())
    return TrialResult(arms, reference_arm, summary, counts.comparisons(settings.seed), periods,
                       {name: p.compiled.administrations for name, p in prepared[0].items()},
                       {name: response_kind(p) for name, p in prepared[0].items()},
                       pd.concat(sample, ignore_index=True),
                       patients=pd.concat(kept, ignore_index=True) if store is None else None,
                       dataset=store.dataset if store is not None else None, time_courses=courses)
