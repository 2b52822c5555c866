"""When CRS starts after each dose, and where it would start under a monitoring policy.

Clinics hospitalise or monitor patients for a window after the doses that carry most CRS (the labels:
24 h after epcoritamab's first full dose, 48 h after each teclistamab step-up dose). Two tables answer
what such a policy misses:

- onsets.csv, per arm and dose (and all doses pooled): the patients whose CRS starts after the dose,
  the share of those onsets within 24, 48 and 72 h of the administration, the median and quartiles
  of the onset time and of the episode's duration (hours at grade >= 1, `endpoints.episode_days`), beside
  the published medians where there are (vpop/data/onsets.csv; one given in whole days is the top of the
  day it names, with that day's first hour beside it: `published_onsets`);
- monitoring.csv, per arm and monitoring policy (W hours after each of the first m doses, or after dose m
  only, for W = 24, 48, 72 h and m up to 4): the share of all CRS onsets that start outside monitoring
  (at home), and the share of patients with at least one such onset.

Onset is the time from the administration to the first moment the grade-1 criterion is met in the dose
period (`vpop.endpoints`; a running episode is not counted again at the next dose). Counts are added
chunk by chunk, per posterior draw, as in `statistics.EndpointCounts`; intervals pool the draws.
"""

from __future__ import annotations

from collections import defaultdict
from importlib import resources

import numpy as np
import pandas as pd

from vpop import endpoints
from vpop.simulate import Arm
from vpop.targets import cohort_arm
from vpop.trial.statistics import pooled_interval

WINDOWS_HOURS = (24, 48, 72)  # monitoring windows after a dose (labels hospitalise for 24 or 48 h)
POLICY_DOSES = 4  # policies monitor after the first 1..4 doses (the step-up doses and the first full dose)
BIN_HOURS = 0.25  # resolution of the onset-time histogram behind the medians


def onset_hours(table: pd.DataFrame, dose: int) -> np.ndarray:
    """Hours from administration `dose` (1-based) to the onset of CRS starting after it (NaN: none)."""
    return 24.0 * table[f"crs_onset_day_dose{dose}"].to_numpy(dtype=float, na_value=np.nan)


def episode_hours(table: pd.DataFrame, doses: int) -> np.ndarray:
    """[n, doses] hours at grade >= 1 of the CRS episode starting after each dose (NaN: none starts)."""
    grades, days = (table[[f"{name}_dose{k + 1}" for k in range(doses)]].to_numpy(dtype=float, na_value=np.nan)
                    for name in ("crs_grade", "crs_duration_day"))
    return 24.0 * endpoints.episode_days(np.nan_to_num(grades), days)


def published_onsets(path=None) -> pd.DataFrame:
    """Published median onset times and episode durations (vpop/data/onsets.csv: the published cohort as
    an arm, as in targets.csv; dose or 'all'; hours; source), with the earliest hour each median can be
    (`onset_lower_hours`, `duration_lower_hours`): a figure in whole days counts started days, so d days
    is a median in (24(d - 1), 24 d] hours; a figure in hours is itself. `path`: another table of the same
    columns (default the shipped one)."""
    with (open(path) if path is not None else resources.files("vpop.data").joinpath("onsets.csv").open()) as f:
        table = pd.read_csv(f, comment="#", dtype={"dose": str})
    for what in ("onset", "duration"):
        unit = table[f"{what}_reported_in"]
        if not unit.dropna().isin(["hours", "days"]).all():
            raise ValueError(f"onsets.csv: {what}_reported_in must be 'hours' or 'days', not {sorted(set(unit.dropna()))}")
        unitless = table[f"median_{what}_hours"].notna() & unit.isna()
        if unitless.any():
            raise ValueError(f"onsets.csv: rows {list(table.index[unitless])} give median_{what}_hours "
                             f"without {what}_reported_in ('hours' or 'days')")
        table[f"{what}_lower_hours"] = table[f"median_{what}_hours"] - np.where(unit == "days", 24.0, 0.0)
    return table


def published_text(lower_hours, upper_hours) -> str:
    """A published median as its source words it: '27 h', or '2 days (24-48 h)' for one in whole days; '-'
    without one."""
    if pd.isna(upper_hours):
        return "-"
    if lower_hours == upper_hours:
        return f"{upper_hours:.0f} h"
    return f"{upper_hours / 24:.0f} days ({lower_hours:.0f}-{upper_hours:.0f} h)"


def published_gap_hours(model_hours, lower_hours, upper_hours):
    """How far the model's median lies outside the published one's interval [lower, upper] (hours; 0 inside,
    negative: earlier, positive: later, NaN without a published figure)."""
    model, lower, upper = (np.asarray(x, float) for x in (model_hours, lower_hours, upper_hours))
    return np.where(np.isnan(upper), np.nan, np.minimum(model - lower, 0.0) + np.maximum(model - upper, 0.0))


def published_for(arm: Arm, published: pd.DataFrame) -> pd.DataFrame:
    """The rows of `published_onsets` whose cohort is exactly this arm (drug, route, population, regimen,
    premedication, prophylaxis and delay, compared as `targets.published_rates` does), by dose."""
    same = [cohort_arm(row, arm.name) == arm for row in published.itertuples()]
    return published[same].set_index("dose")


class OnsetCounts:
    """Per arm, draw and dose: patients, CRS onsets, onsets within each window and a histogram of onset
    hours; per arm, draw and policy (W hours after each of the first m doses): onsets and patients
    with an onset outside monitoring."""

    def __init__(self, periods: dict[str, list]):
        self.periods = periods
        self.patients = defaultdict(lambda: defaultdict(int))  # arm -> draw -> patients
        self.onsets = defaultdict(lambda: defaultdict(lambda: np.zeros(1 + len(WINDOWS_HOURS))))  # (arm, dose) -> draw -> [all, within W...]
        self.histogram = defaultdict(lambda: np.zeros(0))  # (arm, dose) -> onset hours' counts per BIN_HOURS, draws pooled
        self.durations = defaultdict(lambda: np.zeros(0))  # (arm, dose) -> episode hours' counts per BIN_HOURS, draws pooled
        self.policies = {arm: policies(len(p)) for arm, p in periods.items()}
        self.home = defaultdict(lambda: defaultdict(lambda: np.zeros(2)))  # (arm, policy) -> draw -> [onsets, patients] at home

    def add(self, draw: int, tables: dict[str, pd.DataFrame]) -> None:
        for arm, t in tables.items():
            self.patients[arm][draw] += len(t)
            hours = np.stack([onset_hours(t, k + 1) for k in range(len(self.periods[arm]))], axis=1)  # [n, doses]
            started = ~np.isnan(hours)
            lasting = episode_hours(t, hours.shape[1])
            for k in range(hours.shape[1]):
                h = hours[started[:, k], k]
                self.onsets[arm, k][draw] += [len(h), *(np.sum(h <= w) for w in WINDOWS_HOURS)]
                self.histogram[arm, k] = _binned(self.histogram[arm, k], h)
                self.durations[arm, k] = _binned(self.durations[arm, k], lasting[~np.isnan(lasting[:, k]), k])
            names, limits = self._limits(arm, hours.shape[1])
            at_home = started & ~(np.nan_to_num(hours, nan=np.inf) <= limits[:, None, :])  # [policy, n, doses]
            for name, onsets, patients in zip(names, np.count_nonzero(at_home, axis=(1, 2)), np.count_nonzero(at_home.any(axis=2), axis=1)):
                self.home[arm, name][draw] += [onsets, patients]

    def _limits(self, arm: str, n_doses: int) -> tuple[list[str], np.ndarray]:
        """Each policy's name and the hours after each dose it watches ([policy, dose]; -inf: not watched)."""
        names = [name for name, _ in self.policies[arm]]
        limits = np.full((len(names), n_doses), -np.inf)
        for row, (_, watch) in zip(limits, self.policies[arm]):
            row[:len(watch)] = [w if w > 0 else -np.inf for w in watch]
        return names, limits

    def onsets_table(self, arms: dict[str, Arm], seed: int = 0) -> pd.DataFrame:
        """onsets.csv; `arms` by name, to find the published medians of the arms that are a published cohort."""
        rng = np.random.default_rng(seed)
        published = published_onsets()
        rows = []
        for arm, periods in self.periods.items():
            reported_by_dose = published_for(arms[arm], published)
            draws = sorted(self.patients[arm])
            n = np.array([self.patients[arm][d] for d in draws], float)
            doses = [(str(k + 1), periods[k].label, [k]) for k in range(len(periods))]
            for dose, label, ks in [*doses, ("all", "all doses", list(range(len(periods))))]:
                counts = sum(np.array([self.onsets[arm, k][d] for d in draws]) for k in ks)
                hist = _pooled([self.histogram[arm, k] for k in ks])
                row = {"arm": arm, "dose": dose, "label": label, "patients": int(n[0]),
                       "onsets_per_100_patients": 100 * float(np.mean(counts[:, 0] / n))}
                for j, w in enumerate(WINDOWS_HOURS):
                    est, lo, hi = pooled_interval(counts[:, 1 + j], counts[:, 0], rng) if counts[:, 0].sum() else (np.nan,) * 3
                    row |= {f"within_{w}h_percent": 100 * est, f"within_{w}h_lower": 100 * lo, f"within_{w}h_upper": 100 * hi}
                q25, q50, q75 = _quantiles(hist, (0.25, 0.5, 0.75))
                d25, d50, d75 = _quantiles(_pooled([self.durations[arm, k] for k in ks]), (0.25, 0.5, 0.75))
                reported = reported_by_dose.loc[dose] if dose in reported_by_dose.index else pd.Series(dtype=object)
                row |= {"median_onset_hours": q50, "onset_q25_hours": q25, "onset_q75_hours": q75,
                        "median_duration_hours": d50, "duration_q25_hours": d25, "duration_q75_hours": d75,
                        "published_median_onset_hours": float(reported.get("median_onset_hours", np.nan)),
                        "published_onset_lower_hours": float(reported.get("onset_lower_hours", np.nan)),
                        "published_median_duration_hours": float(reported.get("median_duration_hours", np.nan)),
                        "published_duration_lower_hours": float(reported.get("duration_lower_hours", np.nan)),
                        "published_source": reported.get("source", "")}
                rows.append(row)
        return pd.DataFrame(rows)

    def monitoring_table(self, seed: int = 0) -> pd.DataFrame:
        """monitoring.csv: per arm and policy, CRS onsets starting outside monitoring (% of all onsets)
        and patients with at least one such onset (% of patients)."""
        rng = np.random.default_rng(seed + 1)
        rows = []
        for arm, periods in self.periods.items():
            draws = sorted(self.patients[arm])
            n = np.array([self.patients[arm][d] for d in draws], float)
            onsets = sum(np.array([self.onsets[arm, k][d][0] for d in draws]) for k in range(len(periods)))
            for name, watch in self.policies[arm]:
                home = np.array([self.home[arm, name][d] for d in draws])
                share = pooled_interval(home[:, 0], onsets, rng) if onsets.sum() else (np.nan,) * 3
                patients = pooled_interval(home[:, 1], n, rng)
                rows.append({"arm": arm, "policy": name, "hours_after_dose": "/".join(f"{w:g}" for w in watch),
                             "home_onsets_percent": 100 * share[0], "home_onsets_lower": 100 * share[1],
                             "home_onsets_upper": 100 * share[2], "home_patients_percent": 100 * patients[0],
                             "home_patients_lower": 100 * patients[1], "home_patients_upper": 100 * patients[2]})
        return pd.DataFrame(rows)


def policies(doses: int) -> list[tuple[str, tuple[float, ...]]]:
    """Monitoring policies as hours watched after each of the first doses (0: not watched): W hours
    after each of doses 1..m, and after dose m only, for every window W and m up to POLICY_DOSES."""
    out = []
    for w in WINDOWS_HOURS:
        for m in range(1, min(POLICY_DOSES, doses) + 1):
            out.append((f"{w} h after each of doses 1-{m}" if m > 1 else f"{w} h after dose 1", (w,) * m))
            if m > 1:
                out.append((f"{w} h after dose {m} only", (0,) * (m - 1) + (w,)))
    return out


def _binned(histogram: np.ndarray, hours: np.ndarray) -> np.ndarray:
    """A histogram (counts per BIN_HOURS from zero) with `hours` added."""
    return _pooled([histogram, np.bincount((hours / BIN_HOURS).astype(int))])


def _pooled(histograms: list[np.ndarray]) -> np.ndarray:
    """Sum of histograms of different lengths (same bins from zero)."""
    size = max((len(h) for h in histograms), default=0)
    return sum((np.pad(h, (0, size - len(h))) for h in histograms), np.zeros(size))


def _quantiles(hist: np.ndarray, qs) -> list[float]:
    """Quantiles (hours) of a histogram in BIN_HOURS bins, interpolated within the bin."""
    total = hist.sum()
    if total == 0:
        return [np.nan] * len(qs)
    cum = np.cumsum(hist)
    out = []
    for q in qs:
        i = int(np.searchsorted(cum, q * total))
        below = cum[i - 1] if i > 0 else 0.0
        out.append(BIN_HOURS * (i + (q * total - below) / hist[i]))
    return out
