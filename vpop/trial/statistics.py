"""Rates and paired differences with 95% intervals, from per-draw event counts added chunk by chunk."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd
from scipy import stats

from vpop import targets as published
from vpop.simulate import Arm
from vpop.trial.table import endpoint_columns

SUMMARY_COLUMNS = ["arm", "endpoint", "estimate", "lower", "upper", "n"]
COMPARISON_COLUMNS = ["endpoint", "arm", "reference_arm", "difference", "lower", "upper", "reference_endpoint", "dose", "reference_dose"]


def pooled_interval(k: np.ndarray, n, rng: np.random.Generator, samples: int = 4000) -> tuple[float, float, float]:
    """Estimate and 95% interval of a rate (fraction) from per-draw event counts k out of n (one n
    for all draws, or one per draw; draws with n = 0 are left out)."""
    k = np.asarray(k, float)
    n = np.broadcast_to(np.asarray(n, float), k.shape)
    k, n = k[n > 0], n[n > 0]
    if len(k) == 1:
        lo, hi = stats.beta.ppf([0.025, 0.975], k[0] + 0.5, n[0] - k[0] + 0.5)
        return k[0] / n[0], (0.0 if k[0] == 0 else lo), (1.0 if k[0] == n[0] else hi)
    m = samples // len(k) + 1
    draws = rng.beta(np.repeat(k + 0.5, m), np.repeat(n - k + 0.5, m))
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
                est, lo, hi = pooled_interval(counts[:, 0], n, rng)
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
    from the published targets), for per-dose endpoints the dose's cycle, day, hour, amount and unit, and
    where the arm is a published cohort the published rate beside the model's (`targets.published_rates`)."""
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
    observed = pd.concat([published.published_rates(targets, arm).assign(arm=name) for name, arm in arms.items()])
    out = pd.concat([out, calendar], axis=1).merge(observed, on=["arm", "endpoint"], how="left")
    out["published_n"] = out["published_n"].astype("Int64")
    return out


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
