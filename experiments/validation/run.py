"""Validation report: what the shipped posterior predicts for results the calibration never saw.

    python experiments/validation/run.py --out DIR [--posterior default] [--patients 1000] [--draws 40]

Writes DIR/validation.csv (every target, validation and calibration, and every published comparison:
observed with its exact binomial 95% interval, predicted with its 95% posterior predictive interval
for a trial of the published size), DIR/per_dose.csv (CRS by dose period against every published
per-dose rate), DIR/dose_periods.csv (CRS by dose period for every approved regimen),
DIR/sensitivity.csv (PRCC over posterior draws), DIR/mae.csv (each mean absolute error beside the ones the
model would score against trials it generated itself: sampling error alone, and posterior predictive),
DIR/onsets.csv (median time from a dose to the onset of CRS and median episode, against every published
median in vpop/data/onsets.csv, counted as the trial runner's onsets.csv counts them), DIR/report.md and
DIR/figures/*.png.

Predictions use the trial runner itself (hard 0/1 endpoints, in-simulation rescue on), not the
smoothed rates the calibration fitted, so calibration targets are re-checked here as well.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from scipy import stats
from tqdm import tqdm

from vpop import catalogue, parameters, posterior
from vpop import targets as published
from vpop.simulate import Arm, prepare_arm
from vpop.trial import TrialSettings, arms_from_config, run_trial
from vpop.trial.monitoring import published_gap_hours, published_onsets, published_text

HERE = Path(__file__).resolve().parent
COLUMNS = ["target", "endpoint", "role", "observed", "observed_lower", "observed_upper", "predicted", "lower", "upper"]
REPLICATES = 400  # binomial trials per posterior draw for predictive intervals
MAE_REPLICATES = 4000  # replicated sets of published trials for the sampling error of a mean absolute error
ONSET_HORIZON_DAYS = 84.0  # a published onset cohort with no CRS target to share a simulation with runs this long


class Simulator:
    """Per-draw patient tables of arms, cached by arm definition (targets share cohorts)."""

    def __init__(self, draws: list[dict], patients: int, seed: int, bar: tqdm):
        self.draws, self.patients, self.seed, self.bar = draws, patients, seed, bar
        self.cache: dict[str, pd.DataFrame] = {}
        self.onsets: dict[str, pd.DataFrame] = {}  # the same key: the trial's onsets.csv rows of the arm

    @staticmethod
    def _key(arm: Arm, horizon_days: float | None) -> str:
        return repr((arm.drug, arm.route, arm.population, arm.regimen, arm.premedication, arm.prophylaxis, arm.delay, horizon_days))

    def prefetch(self, requests: list[tuple[Arm, float | None]]) -> None:
        """Simulate the arms of each horizon in one trial, so arms of similar grid length share
        compiled kernels (`simulate.share_compilation`; every patient row is as in a trial of its own)."""
        by_horizon: dict = {}
        for arm, horizon in requests:
            by_horizon.setdefault(horizon, {}).setdefault(self._key(arm, horizon), arm)
        for horizon, arms in by_horizon.items():
            named = {f"c{i}": replace(arm, name=f"c{i}") for i, arm in enumerate(arms.values())}
            settings = TrialSettings(n=self.patients, seed=self.seed, horizon_days=horizon, trajectories=0)
            result = run_trial(named, next(iter(named)), settings, draws=self.draws)
            for key, name in zip(arms, named):
                self.cache[key] = result.patients[result.patients.arm == name].reset_index(drop=True)
                self.onsets[key] = result.onsets[result.onsets.arm == name].reset_index(drop=True)
                self.bar.update(1)

    def run(self, arm: Arm, horizon_days: float | None = None) -> pd.DataFrame:
        key = self._key(arm, horizon_days)
        if key not in self.cache:
            settings = TrialSettings(n=self.patients, seed=self.seed, horizon_days=horizon_days, trajectories=0)
            result = run_trial({arm.name: arm}, arm.name, settings, draws=self.draws)
            self.cache[key], self.onsets[key] = result.patients, result.onsets
            self.bar.update(1)
        return self.cache[key]

    def onsets_of(self, arm: Arm, horizon_days: float | None = None) -> pd.DataFrame:
        """The arm's onsets.csv rows (`vpop.trial.monitoring`), simulated if not yet."""
        self.run(arm, horizon_days)
        return self.onsets[self._key(arm, horizon_days)]


def per_draw_rate(patients: pd.DataFrame, endpoint: str) -> np.ndarray:
    return published.patient_outcomes(patients, endpoint).groupby(patients.draw).mean().to_numpy(float)


def stream(seed: int, *names: str) -> np.random.Generator:
    """A random stream of its own for each row (target, comparison, dose period), so that a change to
    one target's rates leaves every other row's intervals as they were (numpy's binomial sampler
    consumes a number of variates that depends on p)."""
    return np.random.default_rng([seed, *(zlib.crc32(name.encode()) for name in names)])


def predictive(rates: np.ndarray, n: int, rng) -> np.ndarray:
    """Rates a trial of n patients would report, over posterior draws (rates: one per draw)."""
    return rng.binomial(n, np.repeat(rates, REPLICATES)) / n


def sampling_mae(rates: list[np.ndarray], n: list[int], rng: np.random.Generator, replicates: int = MAE_REPLICATES,
                 posterior: bool = True) -> np.ndarray:
    r"""Mean absolute errors the model would score against published trials it generated itself.

    Rows $i$ (targets) have per-draw rates $r_{id}$, mean $\bar r_i$, and published sizes $n_i$. A replicate
    lets each row's trial report $y_i \sim \mathrm{Bin}(n_i, \rho_i) / n_i$ and scores
    $\frac1m \sum_i |y_i - \bar r_i|$. With `posterior`, $\rho_i = r_{id}$ for one posterior draw $d$ shared by
    all rows (a posterior predictive check of the error); without, $\rho_i = \bar r_i$: a model exactly
    right with its parameters known, whose error is the sampling error of trials of these sizes alone.
    Rows of one cohort (dose periods) are drawn independently here, which their shared patients are not.
    """
    r = np.stack(rates)  # rows x draws
    mean = r.mean(axis=1, keepdims=True)
    sizes = np.asarray(n)[:, None]
    rho = r[:, rng.integers(r.shape[1], size=replicates)] if posterior else np.broadcast_to(mean, (len(r), replicates))
    return np.abs(rng.binomial(sizes, rho) / sizes - mean).mean(axis=0)


def mae_table(table: pd.DataFrame, per: pd.DataFrame, rates: dict[str, np.ndarray], seed: int) -> pd.DataFrame:
    """Each reported mean absolute error (calibration and validation targets, each regimen's published dose
    periods) beside `sampling_mae`: the sampling error alone (`floor_*`: median and central 95%) and the
    posterior predictive error (`predictive_*`), with the share of its replicates at least as large as the
    published trials' error (small: a miss beyond what sampling and the posterior's uncertainty explain)."""
    scopes = [(f"{role} targets", table[table.role == role].target) for role in ("calibration", "validation")]
    scopes += [(f"{reg}: published dose periods", d.target[d.target != ""]) for reg, d in per.groupby("regimen", sort=False)]
    rows = []
    by_target = table.set_index("target")
    for scope, ids in scopes:
        ids = list(ids)
        row = dict(scope=scope, rates=len(ids), mae=float(by_target.loc[ids, "abs_error"].mean()))
        for name, with_posterior in (("floor", False), ("predictive", True)):
            sampled = sampling_mae([rates[i] for i in ids], by_target.loc[ids, "n"].astype(int).tolist(), stream(seed, scope, name),
                                   posterior=with_posterior)
            row |= {f"{name}_mae": float(np.median(sampled)), f"{name}_lower": float(np.percentile(sampled, 2.5)),
                    f"{name}_upper": float(np.percentile(sampled, 97.5))}
            if with_posterior:
                row["predictive_share_at_least"] = float((sampled >= row["mae"]).mean())
        rows.append(row)
    return pd.DataFrame(rows)


def targets_table(targets: pd.DataFrame, sim: Simulator, seed: int) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    rows, rates = [], {}
    for t in targets.itertuples():
        r = per_draw_rate(sim.run(published.cohort_arm(t), float(t.horizon_days)), t.endpoint)
        rates[t.id] = r
        pred = predictive(r, int(t.n), stream(seed, t.id))
        lo, hi = published.exact_interval(int(t.k), int(t.n))
        rows.append(dict(target=t.id, endpoint=t.endpoint, role=t.role, observed=t.k / t.n, observed_lower=lo, observed_upper=hi,
                         predicted=r.mean(), lower=np.percentile(pred, 2.5), upper=np.percentile(pred, 97.5),
                         drug=t.drug, population=t.population, route=t.route, n=int(t.n), trial=t.trial))
    return pd.DataFrame(rows), rates


def comparisons_table(spec, targets: pd.DataFrame, rates: dict[str, np.ndarray], seed: int) -> pd.DataFrame:
    """Published differences (arm minus reference): observed from two independent binomials
    (Jeffreys posteriors), predicted from the same posterior draws in both arms."""
    by_id = targets.set_index("id")
    rows = []
    for c in spec:
        for endpoint, arm_id in c.arm.items():
            ref_id = c.reference[endpoint]
            a, b = by_id.loc[arm_id], by_id.loc[ref_id]
            rng = stream(seed, c.name, arm_id, ref_id)
            obs = [rng.beta(x.k + 0.5, x.n - x.k + 0.5, 20_000) for x in (a, b)]
            pred = predictive(rates[arm_id], int(a.n), rng) - predictive(rates[ref_id], int(b.n), rng)
            rows.append(dict(target=f"{c.name} ({arm_id} - {ref_id})", endpoint=f"{endpoint} difference", role="comparison",
                             observed=a.k / a.n - b.k / b.n, observed_lower=np.percentile(obs[0] - obs[1], 2.5),
                             observed_upper=np.percentile(obs[0] - obs[1], 97.5), predicted=(rates[arm_id] - rates[ref_id]).mean(),
                             lower=np.percentile(pred, 2.5), upper=np.percentile(pred, 97.5)))
    return pd.DataFrame(rows)


def experiments_table(spec, sim: Simulator) -> pd.DataFrame:
    """Predicted-only paired differences of shipped experiments (posterior 95% interval of the
    difference in the virtual cohort)."""
    rows = []
    for e in spec:
        arms, ref = arms_from_config(catalogue.load("experiment", e.experiment).experiment)
        base = sim.run(arms[ref])
        for name, arm in arms.items():
            if name == ref:
                continue
            other = sim.run(arm)
            for endpoint in e.endpoints:
                d = per_draw_rate(other, endpoint) - per_draw_rate(base, endpoint)
                rows.append(dict(target=f"{e.name} ({name} - {ref})", endpoint=f"{endpoint} difference", role="prediction",
                                 observed=np.nan, observed_lower=np.nan, observed_upper=np.nan, predicted=d.mean(),
                                 lower=np.percentile(d, 2.5), upper=np.percentile(d, 97.5)))
    return pd.DataFrame(rows)


def dose_period_table(spec, sim: Simulator) -> pd.DataFrame:
    """CRS (any grade) starting in each dose period of every approved regimen, with where it peaks."""
    rows = []
    for reg, a in spec.items():
        route = catalogue.load("regimen", reg).route
        patients = sim.run(Arm(reg, a.drug, route, a.population, reg, a.premedication, None))
        periods = prepare_arm(Arm(reg, a.drug, route, a.population, reg, a.premedication, None), horizon_days=None).compiled.periods
        amounts = np.array([p.amount for p in periods])
        at_full = np.isclose(amounts, float(a.full_dose), rtol=1e-3)
        if not at_full.any():
            raise ValueError(f"approved_regimens.{reg}.full_dose: {a.full_dose} is not a dose of the regimen; doses: {sorted(set(amounts))}")
        full = int(np.argmax(at_full))  # first administration at the target dose
        rates = [per_draw_rate(patients, f"crs_any_dose{k + 1}") for k in range(len(periods))]
        peak = int(np.argmax([r.mean() for r in rates]))
        for k, (p, r) in enumerate(zip(periods, rates)):
            rows.append(dict(regimen=reg, drug=a.drug, period=k + 1, dose=p.label, amount=p.amount, unit=p.unit,
                             crs_any=r.mean(), lower=np.percentile(r, 2.5), upper=np.percentile(r, 97.5),
                             step_up_fold=float(a.full_dose) / amounts[0], first_full_dose_period=full + 1, peak_period=peak + 1))
    return pd.DataFrame(rows)


def per_dose_table(targets: pd.DataFrame, sim: Simulator, seed: int) -> pd.DataFrame:
    """Model against published CRS by dose period, for every regimen with per-dose targets: every
    period of the regimen (published value where there is one), the model's rate with its 95%
    posterior interval and the predictive interval of a trial of the published size."""
    per = targets[targets.endpoint.str.startswith("crs_any_dose")]
    rows = []
    for _, group in per.groupby(list(published.COHORT), dropna=False, sort=False):
        t = group.iloc[0]
        arm = published.cohort_arm(t)
        patients = sim.run(arm, float(t.horizon_days))
        periods = prepare_arm(arm, horizon_days=float(t.horizon_days)).compiled.periods
        by_dose = {int(r.endpoint.rsplit("dose", 1)[1]): r for r in group.itertuples()}
        for k, a in enumerate(periods, start=1):
            r = per_draw_rate(patients, f"crs_any_dose{k}")
            obs = by_dose.get(k)
            row = dict(drug=t.drug, regimen=cohort_name(t), period=k, dose=a.label, predicted=r.mean(), lower=np.percentile(r, 2.5),
                       upper=np.percentile(r, 97.5), target=obs.id if obs else "", role=obs.role if obs else "",
                       recalled="recalled" in str(obs.note) if obs else False)
            if obs:
                lo, hi = published.exact_interval(int(obs.k), int(obs.n))
                pred = predictive(r, int(obs.n), stream(seed, obs.id, "per dose"))
                row.update(observed=obs.k / obs.n, observed_lower=lo, observed_upper=hi, predictive_lower=np.percentile(pred, 2.5),
                           predictive_upper=np.percentile(pred, 97.5))
            rows.append(row)
    return pd.DataFrame(rows)


def onset_table(targets: pd.DataFrame, sim: Simulator) -> pd.DataFrame:
    """Every published median onset and episode duration (vpop/data/onsets.csv) beside the model's, from
    the trial runner's own onsets.csv of that cohort: draws pooled, interquartile ranges over patients.
    A cohort that is also a CRS target's is read from that target's simulation (its longest horizon)."""
    rows = []
    for row in published_onsets().itertuples():
        arm = published.cohort_arm(row, "onsets")
        horizons = [float(t.horizon_days) for t in targets.itertuples()
                    if t.endpoint.startswith("crs") and published.cohort_arm(t, arm.name) == arm]
        horizon = max(horizons, default=ONSET_HORIZON_DAYS)
        model = sim.onsets_of(arm, horizon).set_index("dose").loc[str(row.dose)]
        out = {"drug": row.drug, "regimen": row.regimen, "dose": row.dose, "label": model.label,
               "horizon_days": horizon, "onsets_per_100_patients": model.onsets_per_100_patients}
        for what in ("onset", "duration"):
            lower, upper = getattr(row, f"{what}_lower_hours"), getattr(row, f"median_{what}_hours")
            out |= {**{c: model[c] for c in (f"median_{what}_hours", f"{what}_q25_hours", f"{what}_q75_hours")},
                    f"published_{what}_lower_hours": lower, f"published_median_{what}_hours": upper,
                    f"{what}_gap_hours": float(published_gap_hours(model[f"median_{what}_hours"], lower, upper))}
        rows.append(out | {"source": row.source})
    return pd.DataFrame(rows)


def onsets_markdown(onsets: pd.DataFrame) -> str:
    def hours(median, q25, q75):
        return "-" if pd.isna(median) else f"{median:.0f} h ({q25:.0f}-{q75:.0f})"

    def gap(x):
        return "" if pd.isna(x) else "inside" if x == 0 else f"{x:+.0f} h"

    lines = ["| drug | regimen | after | onset, model (IQR) | onset, published | model - published | "
             "episode, model (IQR) | episode, published | model - published |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in onsets.itertuples():
        lines.append(f"| {r.drug} | {r.regimen} | {r.label} | {hours(r.median_onset_hours, r.onset_q25_hours, r.onset_q75_hours)} | "
                     f"{published_text(r.published_onset_lower_hours, r.published_median_onset_hours)} | {gap(r.onset_gap_hours)} | "
                     f"{hours(r.median_duration_hours, r.duration_q25_hours, r.duration_q75_hours)} | "
                     f"{published_text(r.published_duration_lower_hours, r.published_median_duration_hours)} | {gap(r.duration_gap_hours)} |")
    return "\n".join(lines)


def prcc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Partial rank correlation of y with each column of x, the other columns regressed out."""
    rx = np.apply_along_axis(stats.rankdata, 0, x)
    ry = stats.rankdata(y)
    out = []
    for j in range(x.shape[1]):
        others = np.column_stack([np.ones(len(y)), np.delete(rx, j, axis=1)])
        res_x = rx[:, j] - others @ np.linalg.lstsq(others, rx[:, j], rcond=None)[0]
        res_y = ry - others @ np.linalg.lstsq(others, ry, rcond=None)[0]
        denom = np.sqrt((res_x @ res_x) * (res_y @ res_y))
        out.append(float(res_x @ res_y / denom) if denom > 0 else np.nan)
    return np.array(out)


def sensitivity_table(spec, draws: list[dict], patients: int, seed: int, bar) -> pd.DataFrame:
    a = spec.arm
    sim = Simulator(draws, patients, seed, bar)
    table = sim.run(Arm("sensitivity", a.drug, a.route, a.population, a.regimen, a.premedication, None))
    # Only the parameters that enter this arm: another drug's potency cannot move it, and each one
    # kept costs the partial correlations a degree of freedom (40 draws, 31 parameters leave 8).
    names = sorted(parameters.parameter_paths(draws[0], parameters.ParameterScope(a.drug, a.route, a.population)))
    x = np.array([[d[n] for n in names] for d in draws])
    rows = []
    for endpoint in spec.endpoints:
        y = per_draw_rate(table, endpoint)
        for name, value in zip(names, prcc(x, y) if np.all(np.isfinite(y)) and y.std() > 0 else [np.nan] * len(names)):
            rows.append(dict(endpoint=endpoint, parameter=name, prcc=value, rate_mean=y.mean(), rate_sd=y.std()))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Figures and report
# ---------------------------------------------------------------------------------------------


PER_DOSE_SHOWN = 10  # periods per regimen in the per-dose figure (the rest are repeated full doses; see the table)


def cohort_name(target) -> str:
    """The regimen's name, and its delay where the cohort restarts after one (a cohort of its own)."""
    return target.regimen if pd.isna(target.delay) else f"{target.regimen}, restarted ({target.delay})"


def shown(periods: pd.DataFrame) -> pd.DataFrame:
    """The first PER_DOSE_SHOWN periods of a regimen, and any later one with a published rate."""
    return periods[(periods.period <= PER_DOSE_SHOWN) | (periods.target != "")]


def per_dose_figure(per: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regs = list(dict.fromkeys(per.regimen))
    fig, axes = plt.subplots(len(regs), 1, figsize=(9, 2.5 * len(regs) + 0.6), squeeze=False)
    for ax, reg in zip(axes[:, 0], regs):
        d = shown(per[per.regimen == reg])
        x = np.arange(len(d)) + 1.0  # shown periods side by side (a restart cohort skips to its published dose)
        at = dict(zip(d.period, x))
        ax.bar(x, 100 * d.predicted, color="#9ecae1", label="model (95% posterior interval)")
        ax.errorbar(x, 100 * d.predicted, yerr=[100 * np.clip(d.predicted - d.lower, 0, None), 100 * np.clip(d.upper - d.predicted, 0, None)],
                    fmt="none", ecolor="#08519c", capsize=2)
        pub = d[d.target != ""]
        for role, recalled, style in (("calibration", False, dict(fmt="D", color="k", mfc="k", label="published, calibration")),
                                      ("calibration", True, dict(fmt="D", color="k", mfc="white",
                                                                 label="recalled (not seen in a source), calibration at reduced weight")),
                                      ("validation", False, dict(fmt="D", color="#d62728", mfc="#d62728", label="published, validation")),
                                      ("validation", True, dict(fmt="D", color="#d62728", mfc="white", label="recalled (not seen in a source), validation"))):
            q = pub[(pub.role == role) & (pub.recalled == recalled)]
            if len(q):
                ax.errorbar(q.period.map(at) + 0.15, 100 * q.observed, yerr=[100 * (q.observed - q.observed_lower), 100 * (q.observed_upper - q.observed)],
                            ms=5, capsize=2, **style)
        mae = 100 * np.mean(np.abs(pub.observed - pub.predicted)) if len(pub) else np.nan
        ax.set_xticks(x, d.dose, fontsize=7, rotation=20)
        ax.set_ylabel("CRS starting (%)", fontsize=8)
        ax.set_title(f"{reg} ({d.drug.iloc[0]}): mean absolute error over published periods {mae:.1f} pp", fontsize=9)
        ax.set_ylim(0, 100)
    handles, labels = [], []
    for ax in axes[:, 0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.5 * len(regs) + 0.6)))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def onsets_figure(onsets: pd.DataFrame, path: Path) -> None:
    """Two panels, onset and episode: the model's median hours with their interquartile range against the
    published median, per published cohort (log scale: the misses are folds); a median published in whole
    days is drawn as the hours of that day (`monitoring.published_onsets`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r.drug}, {r.regimen.removeprefix(r.drug + '_')}: {r.label}" for r in onsets.itertuples()]
    y = np.arange(len(onsets))[::-1].astype(float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(onsets) + 1.4), sharey=True)
    for ax, (what, title) in zip(axes, (("onset", "hours from the dose to the onset of CRS"),
                                        ("duration", "hours of the episode at grade >= 1"))):
        median, q25, q75 = onsets[f"median_{what}_hours"], onsets[f"{what}_q25_hours"], onsets[f"{what}_q75_hours"]
        ax.errorbar(median, y, xerr=[median - q25, q75 - median], fmt="o", color="#08519c", capsize=3,
                    label="model: median and interquartile range", zorder=3)
        lower, upper = onsets[f"published_{what}_lower_hours"], onsets[f"published_median_{what}_hours"]
        exact = lower == upper
        ax.plot(upper[exact], y[exact], "D", color="#d62728", label="published median (hours)")
        ax.hlines(y[~exact], lower[~exact], upper[~exact], color="#d62728", lw=5, alpha=0.45, zorder=1,
                  label="published median (whole days: the hours of that day)")
        ax.set_xscale("log")
        ax.set_xlim(0.5, 300)
        ax.set_xticks([1, 3, 12, 24, 48, 120], ["1", "3", "12", "24", "48", "120"])
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, names, fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (0.45 * len(onsets) + 1.4)))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figures(table: pd.DataFrame, doses: pd.DataFrame, sens: pd.DataFrame, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    rows = table[table.role.isin(["validation", "calibration", "comparison"])].reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
    y = np.arange(len(rows))[::-1]
    for role, color in (("calibration", "#1f77b4"), ("validation", "#d62728"), ("comparison", "#9467bd")):
        r = rows[rows.role == role]
        ax.errorbar(100 * r.predicted, y[r.index] + 0.15, xerr=[100 * np.clip(r.predicted - r.lower, 0, None), 100 * np.clip(r.upper - r.predicted, 0, None)],
                    fmt="o", ms=3, color=color, capsize=2, label=f"predicted, {role} (95% predictive)")
    ax.errorbar(100 * rows.observed, y - 0.15, xerr=[100 * (rows.observed - rows.observed_lower), 100 * (rows.observed_upper - rows.observed)],
                fmt="D", ms=3, color="k", capsize=2, label="observed (95% exact)")
    ax.set_yticks(y, [f"{r.role[:5]}  {r.target}  {r.endpoint}" for r in rows.itertuples()], fontsize=6)
    ax.axvline(0, color="#999", lw=0.5)
    ax.set_xlabel("rate or difference (%)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(folder / "validation.png", dpi=110)
    plt.close(fig)

    regs = list(dict.fromkeys(doses.regimen))
    fig, axes = plt.subplots(len(regs), 1, figsize=(8, 1.5 * len(regs) + 0.5), squeeze=False)
    for ax, reg in zip(axes[:, 0], regs):
        d = doses[doses.regimen == reg].head(8)
        ax.bar(d.period, 100 * d.crs_any, yerr=[100 * (d.crs_any - d.lower), 100 * (d.upper - d.crs_any)], color="#ff7f0e", capsize=2)
        ax.set_xticks(d.period, d.dose, fontsize=6)
        ax.set_ylabel("CRS %", fontsize=7)
        ax.set_title(f"{reg}: step-up fold {d.step_up_fold.iloc[0]:g}, peak at period {d.peak_period.iloc[0]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "crs_by_dose_period.png", dpi=110)
    plt.close(fig)

    eps = list(dict.fromkeys(sens.endpoint))
    fig, axes = plt.subplots(1, len(eps), figsize=(5 * len(eps), 0.35 * sens.parameter.nunique() + 1.5), squeeze=False, sharey=True)
    for ax, ep in zip(axes[0], eps):
        s = sens[sens.endpoint == ep]
        ax.barh(s.parameter.str.replace("population.", "").str.replace("model.", ""), s.prcc, color="#2ca02c")
        ax.axvline(0, color="k", lw=0.5)
        ax.set_xlim(-1, 1)
        ax.set_title(f"PRCC with {ep}", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(folder / "sensitivity.png", dpi=110)
    plt.close(fig)


def _pct(x: float) -> str:
    return "" if pd.isna(x) else f"{100 * x:.1f}"


def per_dose_markdown(per: pd.DataFrame, maes: pd.DataFrame) -> str:
    lines = []
    for reg, d in per.groupby("regimen", sort=False):
        pub = d[d.target != ""]
        mae = 100 * np.mean(np.abs(pub.observed - pub.predicted))
        later = d[d.period > pub.period.max()]
        head = (f"**{reg}** ({d.drug.iloc[0]}): mean absolute error {mae:.1f} pp over {len(pub)} published periods "
                f"(model-generated trials: {sampling_note(maes, f'{reg}: published dose periods')})")
        lines += [head + (f"; later doses: at most {100 * later.predicted.max():.1f}% new CRS per dose" if len(later) else ""), "",
                  "| period | dose | published % (95% CI) | source | model % (95% PI) | abs. error |", "|---|---|---|---|---|---|"]
        for r in shown(d).itertuples():
            if r.target:
                kind = f"{r.target} {r.role}" + (", recalled" if r.recalled else "")
                obs = f"{_pct(r.observed)} ({_pct(r.observed_lower)}-{_pct(r.observed_upper)})"
                err = _pct(abs(r.observed - r.predicted))
            else:
                kind, obs, err = "", "", ""
            lines.append(f"| {r.period} | {r.dose} | {obs} | {kind} | {_pct(r.predicted)} ({_pct(r.lower)}-{_pct(r.upper)}) | {err} |")
        lines.append("")
    return "\n".join(lines)


def sampling_note(maes: pd.DataFrame, scope: str) -> str:
    """'sampling alone 3.3 pp (95% 2.9-3.8); predictive 4.3 pp (3.3-10.1), 57% of replicates as large' for one
    row of `mae_table`."""
    m = maes.set_index("scope").loc[scope]
    return (f"sampling alone {_pct(m.floor_mae)} pp ({_pct(m.floor_lower)}-{_pct(m.floor_upper)}); "
            f"posterior predictive {_pct(m.predictive_mae)} pp ({_pct(m.predictive_lower)}-{_pct(m.predictive_upper)}), "
            f"{100 * m.predictive_share_at_least:.0f}% of its replicates as large")


def markdown(table: pd.DataFrame, doses: pd.DataFrame, sens: pd.DataFrame, meta: dict, per: pd.DataFrame, maes: pd.DataFrame,
             onsets: pd.DataFrame) -> str:
    def rows(frame):
        out = ["| target | endpoint | role | observed (95% CI) | predicted (95% PI) | abs. error | overlap |", "|---|---|---|---|---|---|---|"]
        for r in frame.itertuples():
            obs = f"{_pct(r.observed)} ({_pct(r.observed_lower)}-{_pct(r.observed_upper)})" if not pd.isna(r.observed) else "not published"
            err = _pct(abs(r.observed - r.predicted)) if not pd.isna(r.observed) else ""
            ov = ("yes" if r.overlap else "**no**") if not pd.isna(r.observed) else ""
            out.append(f"| {r.target} | {r.endpoint} | {r.role} | {obs} | {_pct(r.predicted)} ({_pct(r.lower)}-{_pct(r.upper)}) | {err} | {ov} |")
        return "\n".join(out)

    val = table[table.role == "validation"]
    mae = float(np.mean(np.abs(val.observed - val.predicted))) if len(val) else float("nan")
    cal = table[table.role == "calibration"]
    peaks = doses.groupby("regimen").first()
    dose_lines = ["| regimen | step-up fold (full / first dose) | first full dose at period | CRS peaks at period | peak CRS % | peak at |",
                  "|---|---|---|---|---|---|"]
    for reg, r in peaks.iterrows():
        pk = doses[(doses.regimen == reg) & (doses.period == r.peak_period)].iloc[0]
        where = ("step-up dose 1" if r.peak_period == 1 else "first full dose" if r.peak_period == r.first_full_dose_period
                 else "another step-up dose" if r.peak_period < r.first_full_dose_period else "a later full dose")
        dose_lines.append(f"| {reg} | {r.step_up_fold:.3g} | {r.first_full_dose_period} | {r.peak_period} ({pk.dose}) | {_pct(pk.crs_any)} | {where} |")
    top = sens.reindex(sens.prcc.abs().sort_values(ascending=False).index).groupby("endpoint").head(3)
    sens_lines = [f"- {r.endpoint}: {r.parameter} PRCC {r.prcc:+.2f}" for r in top.itertuples()]
    return f"""# vpop validation report

Posterior: `{meta['posterior']}` ({meta['draws']} draws{meta['settings']}), {meta['patients']} virtual patients per arm and draw,
seed {meta['seed']}, {meta['seconds']:.0f} s. Predictions come from the trial runner (0/1 endpoints, rescue on);
predictive intervals are for a trial of the published size. Validation targets never entered the likelihood.

**Mean absolute error over the {len(val)} validation rates: {_pct(mae)} percentage points**
({int(val.overlap.sum())} of {len(val)} predictive intervals overlap the observed 95% interval;
calibration targets re-checked: {int(cal.overlap.sum())} of {len(cal)} overlap, mean absolute error {_pct(cal.abs_error.mean())} pp).

A model exactly right would not score zero: published trials of these sizes scatter around the true
rates. Trials replicated from the model itself, each rate as a trial of its published size reports it,
give the mean absolute error of sampling alone (the model's mean rates as the truth) and its posterior
predictive error (one posterior draw for all targets per replicate); median (central 95%), mae.csv.
Validation: {sampling_note(maes, "validation targets")}. Calibration: {sampling_note(maes, "calibration targets")}
(the fit has seen these targets, so their error can fall below sampling alone).

![validation](figures/validation.png)

## CRS by dose period against the published rates

{per_dose_markdown(per, maes)}
![CRS per dose](figures/per_dose.png)

## When CRS starts and how long an episode lasts

Median hours from the administration to the onset of CRS starting after it, and median hours at
grade >= 1 of those episodes (interquartile range over patients, draws pooled; onsets.csv), beside
the published medians (vpop/data/onsets.csv, with sources). "all doses" pools every dose of the
simulated horizon (`horizon_days` in onsets.csv). A median published in whole days counts started
days: "2 days" is a median between 24 and 48 h (the same labels' durations range from 1 day, where
episodes under a day occur), so the model is compared with that interval; "model - published" is
its distance outside it (onsets.csv `onset_gap_hours`, `duration_gap_hours`).

{onsets_markdown(onsets)}

![CRS onsets and episodes](figures/onsets.png)

## Validation targets and published comparisons

{rows(table[table.role.isin(['validation', 'comparison'])])}

## Predicted comparisons without a published counterpart

{rows(table[table.role == 'prediction'])}

## CRS by dose period of the approved regimens

{chr(10).join(dose_lines)}

![CRS by dose period](figures/crs_by_dose_period.png)

## Calibration targets, re-simulated with hard endpoints

{rows(cal)}

## Global sensitivity over the posterior (PRCC, {meta['sensitivity_draws']} draws)

{chr(10).join(sens_lines)}

![sensitivity](figures/sensitivity.png)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--posterior", default="default", help="default, or a path to a posterior.nc")
    parser.add_argument("--patients", type=int, default=1000, help="virtual patients per arm and draw")
    parser.add_argument("--draws", type=int, default=40, help="posterior draws")
    parser.add_argument("--sensitivity-draws", type=int, default=120, help="posterior draws for the PRCC")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="PATH=NUMBER",
                        help="a model setting for every draw, e.g. model.crs.hold_until_resolved=1 (repeatable)")
    args = parser.parse_args(argv)
    for name in ("patients", "draws", "sensitivity_draws"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive whole number, got {getattr(args, name)}")
    started = time.perf_counter()
    spec = OmegaConf.load(HERE / "comparisons.yaml")
    draws = posterior.with_settings(posterior.draws(args.posterior, args.draws, args.seed), args.set)
    targets = published.load("targets")
    targets = targets[targets.role.isin(["calibration", "validation"])]
    n_arms = targets.groupby(list(published.COHORT), dropna=False).ngroups
    n_arms += 2 * len(spec.experiments) + len(spec.approved_regimens) + 1
    with tqdm(total=n_arms, unit="arm", disable=not sys.stderr.isatty()) as bar:
        sim = Simulator(draws, args.patients, args.seed, bar)
        sim.prefetch([(published.cohort_arm(t), float(t.horizon_days)) for t in targets.itertuples()])
        table, rates = targets_table(targets, sim, args.seed)
        table = pd.concat([table, comparisons_table(spec.comparisons, targets, rates, args.seed), experiments_table(spec.experiments, sim)],
                          ignore_index=True)
        doses = dose_period_table(spec.approved_regimens, sim)
        per = per_dose_table(targets, sim, args.seed)
        onsets = onset_table(targets, sim)
        sens = sensitivity_table(spec.sensitivity, posterior.with_settings(posterior.draws(args.posterior, args.sensitivity_draws, args.seed + 1), args.set),
                                 args.patients, args.seed, bar)
    table["abs_error"] = (table.observed - table.predicted).abs()
    overlap = (table.lower <= table.observed_upper) & (table.observed_lower <= table.upper)
    table["overlap"] = overlap.astype(object).where(table.observed.notna(), None)  # empty where nothing was published
    maes = mae_table(table, per, rates, args.seed)

    out = args.out
    staging = out.with_name(out.name + ".partial")  # written whole, then moved into place
    staging.mkdir(parents=True, exist_ok=True)
    table[COLUMNS + [c for c in table.columns if c not in COLUMNS]].to_csv(staging / "validation.csv", index=False, float_format="%.4f")
    doses.to_csv(staging / "dose_periods.csv", index=False, float_format="%.4f")
    per.to_csv(staging / "per_dose.csv", index=False, float_format="%.4f")
    sens.to_csv(staging / "sensitivity.csv", index=False, float_format="%.4f")
    maes.to_csv(staging / "mae.csv", index=False, float_format="%.4f")
    onsets.to_csv(staging / "onsets.csv", index=False, float_format="%.2f")
    figures(table, doses, sens, staging / "figures")
    per_dose_figure(per, staging / "figures" / "per_dose.png")
    onsets_figure(onsets, staging / "figures" / "onsets.png")
    meta = dict(posterior=args.posterior, draws=len(draws), patients=args.patients, seed=args.seed,
                settings="".join(f", {s}" for s in args.set),
                sensitivity_draws=args.sensitivity_draws, seconds=time.perf_counter() - started)
    (staging / "report.md").write_text(markdown(table, doses, sens, meta, per, maes, onsets))
    out.mkdir(parents=True, exist_ok=True)
    for f in staging.rglob("*"):
        if f.is_file():
            dest = out / f.relative_to(staging)
            dest.parent.mkdir(parents=True, exist_ok=True)
            f.replace(dest)
    for d in sorted(staging.rglob("*"), reverse=True):
        d.rmdir()
    staging.rmdir()
    print(f"wrote {out / 'report.md'} ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
