"""Published targets (`vpop/data/targets.csv`) and how much evidence stands behind a simulated rate.

Each row of targets.csv is one published result: a drug by a route on a regimen in a population, an
endpoint, k of n patients, its role and its citation. Roles: `calibration` (in the likelihood),
`validation` (predicted, never fitted), `excluded` (kept with the reason it cannot be simulated).

`support` grades a trial's rate by the targets behind it: `calibrated` when a calibration target
exists for the same drug, route, population and endpoint (per-dose endpoints match any per-dose target
of that kind), `validated` when only a validation target does, else `extrapolated`.

An optional column `delay` holds treatment and restarts it (`regimen.apply_delay`), written as
`after_dose=10 days=42` (and optionally `restart_from=2`); per-dose endpoints then count the doses
as given, the restart dose included.

An optional column `likelihood_n` gives a calibration target less weight than its cohort size: the
likelihood then counts round(k * likelihood_n / n) of likelihood_n, the same rate with the wider
interval of a smaller trial. It is for rates known only approximately (a figure recalled from a label
and not seen in a stored copy); the note says why.
"""

from __future__ import annotations

import re
from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from vpop import endpoints
from vpop.catalogue import ConfigError
from vpop.simulate import Arm

ROLES = ("calibration", "validation", "excluded")
COLUMNS = ("id", "drug", "population", "regimen", "route", "premedication", "prophylaxis", "horizon_days",
           "endpoint", "n", "k", "role", "trial", "citation", "note")
SUPPORT = ("calibrated", "validated", "extrapolated")
# The columns that define a target's virtual cohort (targets sharing them share one cohort).
COHORT = ("drug", "population", "regimen", "route", "premedication", "prophylaxis", "horizon_days", "delay")
DELAY_PATTERN = re.compile(r"after_dose=([0-9]+) days=([0-9.]+)(?: restart_from=([0-9]+))?")
# Endpoints a target may name: the overall rates, and CRS starting after the k-th administration.
# And the share of patients whose first CRS starts at dose k or later (the labels' "first CRS at a later dose"),
# and of those with a CRS starting after dose k or any later one ("CRS following the third dose or later"),
# or after two or more doses ("recurrent CRS").
ENDPOINT_PATTERN = re.compile(r"(orr|cr|crs_any|crs_grade2plus|crs_grade3plus|crs_recurrent)|(crs_any|crs_grade2plus)_dose[1-9][0-9]*"
                              r"|crs_first_at_dose[1-9][0-9]*plus|(crs_any|crs_grade2plus)_from_dose[1-9][0-9]*")


def load(name_or_path: str = "targets") -> pd.DataFrame:
    """Published targets: `vpop/data/<name>.csv` or a CSV path (columns as in `COLUMNS`)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = resources.files("vpop.data") / f"{name_or_path}.csv"
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except FileNotFoundError:
        raise ConfigError(f"calibration.targets: no such targets file '{name_or_path}'") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"targets {path}: missing column(s) {missing}; needed: {', '.join(COLUMNS)}")
    bad = df[~df.role.isin(ROLES)]
    if len(bad):
        raise ConfigError(f"targets {path}: role of {bad.id.iloc[0]} is {bad.role.iloc[0]!r}; allowed: {', '.join(ROLES)}")
    used = df[df.role != "excluded"]
    bad = used[~used.endpoint.map(lambda e: bool(ENDPOINT_PATTERN.fullmatch(str(e))))]
    if len(bad):
        raise ConfigError(f"targets {path}: endpoint of {bad.id.iloc[0]} is {bad.endpoint.iloc[0]!r}; allowed: orr, cr, "
                          "crs_any, crs_grade2plus, crs_grade3plus, crs_recurrent, crs_any_dose<k>, crs_grade2plus_dose<k>, crs_first_at_dose<k>plus, "
                          "crs_any_from_dose<k>, crs_grade2plus_from_dose<k>")
    if ((used.k < 0) | (used.k > used.n)).any():
        raise ConfigError(f"targets {path}: every k must lie in 0..n")
    if "likelihood_n" in df.columns:
        lik = pd.to_numeric(df.likelihood_n, errors="coerce")
        bad = df[df.likelihood_n.notna() & ~((lik >= 1) & (lik <= df.n))]
        if len(bad):
            raise ConfigError(f"targets {path}: likelihood_n of {bad.id.iloc[0]} must be empty or a whole number in 1..n")
    if "delay" not in df.columns:
        df["delay"] = None
    bad = df[df.delay.notna() & ~df.delay.map(lambda d: bool(DELAY_PATTERN.fullmatch(str(d))))]
    if len(bad):
        raise ConfigError(f"targets {path}: delay of {bad.id.iloc[0]} is {bad.delay.iloc[0]!r}; expected empty or "
                          "'after_dose=<k> days=<d>' with an optional ' restart_from=<j>'")
    if df.id.duplicated().any():
        raise ConfigError(f"targets {path}: duplicate id {df.id[df.id.duplicated()].iloc[0]}")
    return df


def likelihood_counts(target) -> tuple[int, int]:
    """(n, k) the likelihood counts for a target row: its own, or scaled to `likelihood_n` when given."""
    n_lik = getattr(target, "likelihood_n", None)
    if n_lik is None or pd.isna(n_lik):
        return int(target.n), int(target.k)
    return int(n_lik), int(round(target.k * int(n_lik) / target.n))


def endpoint_family(endpoint: str) -> str:
    """'crs_any_dose3' -> 'crs_any_dose', 'crs_first_at_dose4plus' -> 'crs_first_at_dose',
    'crs_any_from_dose3' -> 'crs_any_from_dose'; overall endpoints are their own family."""
    return re.sub(r"_dose[0-9]+(plus)?$", "_dose", endpoint)


def dose_number(endpoint: str) -> int | None:
    """'crs_any_dose3' -> 3, 'crs_first_at_dose4plus' -> 4 (1-based administration); None for an
    overall endpoint."""
    m = re.search(r"_dose([0-9]+)(plus)?$", endpoint)
    return int(m.group(1)) if m else None


def per_dose_values(patients: pd.DataFrame, name: str) -> np.ndarray:
    """[patients, doses] of a per-dose column family of a trial's patient table (`crs_grade`,
    `crs_duration_day`, `toci_rescue`, ...: `<name>_dose1`, `<name>_dose2`, ...), doses an arm does not
    have as 0."""
    cols = sorted((c for c in patients if re.fullmatch(rf"{name}_dose[0-9]+", c)), key=lambda c: int(c.rsplit("_dose", 1)[1]))
    return patients[cols].astype(float).fillna(0.0).to_numpy()


def patient_outcomes(patients: pd.DataFrame, endpoint: str) -> pd.Series:
    """Each patient row's 0/1 outcome (float; NaN where the arm has no such dose) of an endpoint a target
    may name, from a trial's patient table: its column, or derived from the per-dose CRS grades by
    `vpop.endpoints` (`crs_first_at_dose<k>plus`, `crs_any_from_dose<k>`, `crs_grade2plus_from_dose<k>`)."""
    family, k = endpoint_family(endpoint), dose_number(endpoint)
    if family == "crs_first_at_dose":
        return (patients.crs_first_dose >= k).astype(float)
    if family in ("crs_any_from_dose", "crs_grade2plus_from_dose"):
        grades = per_dose_values(patients, "crs_grade")
        grade = 2 if family == "crs_grade2plus_from_dose" else 1
        return pd.Series(endpoints.crs_from_dose(grades, k, grade).astype(float), index=patients.index)
    if endpoint not in patients:
        raise KeyError(f"endpoint {endpoint!r} not simulated for this arm")
    return patients[endpoint].astype(float)


def support(targets: pd.DataFrame, drug: str, route: str, population: str, endpoint: str) -> str:
    """`calibrated`, `validated` or `extrapolated`: the published evidence behind one simulated rate."""
    family = endpoint_family(endpoint)
    rows = targets[(targets.drug == drug) & (targets.route == route) & (targets.population == population)
                   & (targets.endpoint.map(endpoint_family) == family)]
    roles = set(rows.role)
    return "calibrated" if "calibration" in roles else "validated" if "validation" in roles else "extrapolated"


def cohort_arm(target, name: str | None = None) -> Arm:
    """The arm of a target's virtual cohort (a row of targets.csv)."""
    none = lambda v: None if v is None or (isinstance(v, float) and pd.isna(v)) or v == "none" else v  # noqa: E731
    delay = none(getattr(target, "delay", None))
    if delay is not None:
        after, days, restart = DELAY_PATTERN.fullmatch(str(delay)).groups()
        delay = {"after_dose": int(after), "days": float(days), **({"restart_from": int(restart)} if restart else {})}
    return Arm(name or str(target.id), str(target.drug), str(target.route), str(target.population), target.regimen,
               none(target.premedication), none(target.prophylaxis), delay)


def exact_interval(k: int, n: int) -> tuple[float, float]:
    """Clopper-Pearson 95% interval of an observed k of n."""
    from scipy import stats

    lo = 0.0 if k == 0 else stats.beta.ppf(0.025, k, n - k + 1)
    hi = 1.0 if k == n else stats.beta.ppf(0.975, k + 1, n - k)
    return float(lo), float(hi)


def exposure() -> pd.DataFrame:
    """Published PK exposure (`vpop/data/exposure.csv`) by id, with `typical`: the value a typical
    patient should show (a published mean with SD read as a geometric mean, mean / sqrt(1 + CV^2))."""
    df = pd.read_csv(resources.files("vpop.data") / "exposure.csv", comment="#").set_index("id")
    df["typical"] = df.value.where(df.statistic != "mean", df.value / (1.0 + (df.sd / df.value) ** 2) ** 0.5)
    return df


PUBLISHED_COLUMNS = ("published", "published_lower", "published_upper", "published_n", "published_targets", "published_horizon_days")


def published_rates(targets: pd.DataFrame, arm: Arm) -> pd.DataFrame:
    """The published rates of exactly this arm's cohort (drug, route, population, regimen by name,
    premedication, prophylaxis and delay; the horizon may differ), by endpoint: `published` (%) with its
    exact 95% interval, the patients, the target ids and the targets' horizon. Targets of one endpoint
    from several trials are pooled (k and n summed)."""
    same = lambda t: replace(cohort_arm(t), name=arm.name) == arm  # noqa: E731
    rows = targets[(targets.role != "excluded") & targets.drug.eq(arm.drug)]
    rows = rows[[same(t) for t in rows.itertuples()]] if len(rows) else rows
    out = []
    for endpoint, g in rows.groupby("endpoint", sort=False):
        k, n = int(g.k.sum()), int(g.n.sum())
        lo, hi = exact_interval(k, n)
        out.append((endpoint, 100 * k / n, 100 * lo, 100 * hi, n, ";".join(g.id), "/".join(f"{h:g}" for h in g.horizon_days.unique())))
    return pd.DataFrame(out, columns=["endpoint", *PUBLISHED_COLUMNS])
