"""Output files of a trial: patients.parquet/, summary.csv, comparisons.csv and figures/*.png.

Everything is written into a temporary folder first and moved into place only when complete, so a
failed run never leaves files that look like results. A streamed trial's patient dataset is moved
(renamed) in last from its checkpoint folder.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from vpop import endpoints  # noqa: E402
from vpop.store import DATASET, PatientStore  # noqa: E402
from vpop.trial import MAIN_ENDPOINTS, SAMPLE_PATIENTS, TrialResult  # noqa: E402

OUTPUT_FILES = ("summary.csv", "comparisons.csv", "doses.csv", "onsets.csv", "monitoring.csv")
FIGURES = ("crs_by_dose.png", "crs_onsets.png", "time_courses.png", "waterfall.png", "forest.png")
# and crs_after_restart.png when an arm holds and restarts treatment (a `delay`), versus_published.png when an
# arm is a published cohort (summary.csv `published`)
DOSE_COLUMNS = ["arm", "role", "drug", "dose", "cycle", "day", "hour", "day_from_start", "amount", "unit", "route",
                "duration_days", "label"]


def write_outputs(result: TrialResult, out_dir: str | Path) -> list[Path]:
    """Write every output file; returns their paths. Atomic per file set: all or nothing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".vpop-", dir=out))
    try:
        if result.patients is not None:  # an in-memory trial: the same dataset layout, one part per arm and draw
            store = PatientStore(staging)
            for (arm, draw), rows in result.patients.groupby(["arm", "draw"], sort=False):
                store.write(arm, int(draw), 0, rows)
        result.summary.to_csv(staging / "summary.csv", index=False, float_format="%.3f")
        result.comparisons.to_csv(staging / "comparisons.csv", index=False, float_format="%.3f")
        dose_table(result).to_csv(staging / "doses.csv", index=False)
        result.onsets.to_csv(staging / "onsets.csv", index=False, float_format="%.3f")
        result.monitoring.to_csv(staging / "monitoring.csv", index=False, float_format="%.3f")
        figs = staging / "figures"
        figs.mkdir()
        crs_by_dose(result, figs / "crs_by_dose.png")
        crs_onsets(result, figs / "crs_onsets.png")
        time_courses(result, figs / "time_courses.png")
        waterfall(result, figs / "waterfall.png")
        forest(result, figs / "forest.png")
        if any(a.delay is not None for a in result.arms.values()):
            crs_after_restart(result, figs / "crs_after_restart.png")
        if result.summary.published.notna().any():
            versus_published(result, figs / "versus_published.png")
        written = []
        dataset = staging / DATASET if result.patients is not None else result.dataset
        for source, target in [*((staging / f, out / f) for f in (*OUTPUT_FILES, "figures")), (dataset, out / DATASET)]:
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            shutil.move(str(source), target)
            written.append(target)
        if result.dataset is not None:  # the checkpoint has become the result
            shutil.rmtree(result.dataset.parent, ignore_errors=True)
            result.dataset = out / DATASET
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _colors(n):
    return plt.get_cmap("tab10")(np.arange(n) % 10)


def dose_table(result: TrialResult) -> pd.DataFrame:
    """doses.csv: every administration of every arm (bispecific doses numbered as in the per-dose
    endpoints, pretreatment, premedication and prophylaxis), with its calendar."""
    rows = []
    for arm, admins in result.administrations.items():
        number = {id(a): k + 1 for k, a in enumerate(result.periods[arm])}
        for a in admins:
            rows.append((arm, a.role, a.drug, number.get(id(a), pd.NA), a.cycle, a.cycle_day, a.hour, a.day, a.amount, a.unit,
                         a.route, a.duration_days, a.label))
    table = pd.DataFrame(rows, columns=DOSE_COLUMNS)
    table["dose"] = table["dose"].astype("Int64")
    return table


def crs_by_dose(result: TrialResult, path: Path) -> None:
    """CRS incidence (any grade, and grade >= 2) starting after each administration, per arm, with
    95% intervals; every administration of the arm is shown."""
    s = result.summary.set_index(["arm", "endpoint"])
    arms = list(result.arms)
    widest = max(len(result.periods[a]) for a in arms)
    fig, axes = plt.subplots(len(arms), 1, figsize=(max(9.0, 0.42 * widest + 2), 2.8 * len(arms)), squeeze=False)
    for ax, arm, color in zip(axes[:, 0], arms, _colors(len(arms))):
        labels = [a.label for a in result.periods[arm]]
        x = np.arange(len(labels))
        for name, offset, alpha, text in (("crs_any", -0.2, 0.45, "any grade"), ("crs_grade2plus", 0.2, 1.0, "grade ≥ 2")):
            rows = [s.loc[(arm, f"{name}_dose{k + 1}")] if (arm, f"{name}_dose{k + 1}") in s.index else None for k in x]
            est = np.array([r.estimate if r is not None else 0.0 for r in rows])
            lo = np.array([r.lower if r is not None else 0.0 for r in rows])
            hi = np.array([r.upper if r is not None else 0.0 for r in rows])
            ax.bar(x + offset, est, width=0.4, color=color, alpha=alpha, label=f"{text} (95% interval)")
            # With posterior draws the estimate (mean of the draws' rates) can sit just outside the pooled interval.
            yerr = [np.maximum(est - lo, 0.0), np.maximum(hi - est, 0.0)]
            ax.errorbar(x + offset, est, yerr=yerr, fmt="none", ecolor="k", elinewidth=0.7, capsize=1.5)
            if name == "crs_any":
                for xi, v, h in zip(x, est, hi):
                    ax.text(xi + offset, h + 0.8, f"{v:.0f}", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(x, labels, fontsize=7, rotation=45 if len(labels) > 10 else 0, ha="right" if len(labels) > 10 else "center")
        ax.set_ylabel("patients with CRS (%)")
        ax.set_title(f"{arm}: CRS starting after each administration (all {len(labels)})", fontsize=10)
        ax.set_ylim(0, max(10.0, 1.15 * max(s.loc[arm].upper.max() if arm in s.index.get_level_values(0) else 0.0, 1.0)))
        ax.set_xlim(-0.7, len(labels) - 0.3)
        ax.legend(fontsize=7, frameon=False, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def crs_after_restart(result: TrialResult, path: Path) -> None:
    """Per arm with a delay: patients whose CRS starts after treatment resumes (any grade and grade
    >= 2, 95% intervals), labelled with the hold, how it restarts and the arm's CRS over the whole run."""
    s = result.summary.set_index(["arm", "endpoint"])
    arms = [a for a in result.arms if result.arms[a].delay is not None]
    fig, ax = plt.subplots(figsize=(8.0, 0.55 * len(arms) + 1.6))
    y = np.arange(len(arms))[::-1]
    top = 5.0
    for j, (name, text, color) in enumerate((("crs_any_after_restart", "any grade", "tab:red"),
                                             ("crs_grade2plus_after_restart", "grade ≥ 2", "darkred"))):
        rows = [s.loc[(a, name)] for a in arms]
        est, hi = np.array([r.estimate for r in rows]), np.array([r.upper for r in rows])
        offset = 0.18 * (1 - 2 * j)
        ax.barh(y + offset, est, height=0.34, color=color, label=f"{text} (95% interval)")
        ax.errorbar(est, y + offset, xerr=[np.maximum(est - [r.lower for r in rows], 0), np.maximum(hi - est, 0)],
                    fmt="none", ecolor="k", elinewidth=0.7, capsize=1.5)
        for yi, v, h in zip(y, est, hi):
            ax.text(h + 0.1, yi + offset, f"{v:.1f}", va="center", fontsize=6.5)
        top = max(top, 1.25 * hi.max())

    def held(arm):
        d = result.arms[arm].delay
        resumed = result.periods[arm][d["after_dose"]]  # the first administration after the hold
        return (f"{arm}: {d['days']:g} d after dose {d['after_dose']},\nresumes with dose {resumed.dose_number} "
                f"(whole run: CRS {s.loc[(arm, 'crs_any')].estimate:.0f}%)")

    ax.set_yticks(y, [held(a) for a in arms], fontsize=7)
    ax.set_xlim(0, top)
    ax.set_xlabel("patients whose CRS starts after the restart (%)")
    ax.set_title("CRS when treatment resumes after a delay", fontsize=10)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def versus_published(result: TrialResult, path: Path) -> None:
    """Every rate of an arm that is a published cohort beside the published one: the model's estimate
    with its 95% interval (dot) and the published k/n with its exact 95% interval (diamond), grouped
    by arm, with the target ids."""
    rows = result.summary[result.summary.published.notna()].reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(8.5, 0.28 * len(rows) + 1.4))
    y = np.arange(len(rows))[::-1].astype(float)
    for arm, color in zip(rows.arm.unique(), _colors(rows.arm.nunique())):
        m = (rows.arm == arm).to_numpy()
        r = rows[m]
        ax.errorbar(r.estimate, y[m] + 0.12, xerr=[np.maximum(r.estimate - r.lower, 0), np.maximum(r.upper - r.estimate, 0)],
                    fmt="o", color=color, ms=4, capsize=2, label=f"{arm} (model)")
        ax.errorbar(r.published, y[m] - 0.12, xerr=[r.published - r.published_lower, r.published_upper - r.published],
                    fmt="D", color=color, mfc="white", ms=4, capsize=2, elinewidth=0.8)
    ax.set_yticks(y, [f"{r.arm}: {r.endpoint} ({r.published_targets})" for r in rows.itertuples()], fontsize=6.5)
    ax.set_xlim(0, 100)
    ax.set_xlabel("patients (%): model (dot) and published (diamond), 95% intervals")
    ax.set_title("the model against the published cohorts", fontsize=10)
    ax.grid(axis="x", lw=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def crs_onsets(result: TrialResult, path: Path) -> None:
    """When CRS starts after each dose: patients with an onset within 24 h, 24-48 h, 48-72 h and later
    (stacked, % of patients), the median onset above each bar and, on the right axis, the model's median
    onset (dot) and episode (median hours at grade >= 1, square) beside the published medians (blue)
    where there are, a median published in whole days with a bar down to that day's first hour; the last
    position pools all doses, as the labels mostly report them. Doses after
    which under 0.5% of patients start CRS are left out."""
    from vpop.trial.monitoring import WINDOWS_HOURS

    arms = list(result.arms)
    fig, axes = plt.subplots(len(arms), 1, figsize=(11.0, 2.9 * len(arms)), squeeze=False)
    edges = [0, *WINDOWS_HOURS, None]
    shades = plt.get_cmap("Reds")(np.linspace(0.85, 0.3, len(edges) - 1))
    for ax, arm in zip(axes[:, 0], arms):
        t = result.onsets[(result.onsets.arm == arm) & (result.onsets.dose != "all")]
        t = t[t.onsets_per_100_patients >= 0.5]
        pooled = result.onsets[(result.onsets.arm == arm) & (result.onsets.dose == "all")]
        x = np.arange(len(t))
        total = t.onsets_per_100_patients.to_numpy()
        within = [np.zeros(len(t))] + [np.nan_to_num(t[f"within_{w}h_percent"].to_numpy()) / 100 * total for w in WINDOWS_HOURS] + [total]
        for j, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
            label = f"{a}-{b} h" if b is not None else f"> {a} h"
            ax.bar(x, within[j + 1] - within[j], bottom=within[j], color=shades[j], width=0.6, label=f"onset {label}")
        for xi, h, m in zip(x, total, t.median_onset_hours):
            ax.text(xi, h + 0.5, f"{m:.0f} h", ha="center", va="bottom", fontsize=6.5)
        ax2 = ax.twinx()
        xs = np.append(x, len(t))  # the doses, then all doses pooled
        both = pd.concat([t, pooled])
        ax2.plot(xs, both.median_onset_hours, "o", color="k", ms=3, label="median onset (model)")
        ax2.plot(xs, both.median_duration_hours, "s", color="0.45", ms=3, label="median episode (model)")
        for what, marker, label in (("onset", dict(marker="D", color="tab:blue", ms=5), "median onset (published)"),
                                    ("duration", dict(marker="s", mfc="none", mec="tab:blue", ms=7), "median episode (published)")):
            lower, upper = both[f"published_{what}_lower_hours"].to_numpy(), both[f"published_median_{what}_hours"].to_numpy()
            ax2.plot(xs, upper, ls="none", label=label, **marker)
            days = lower < upper  # a median in whole days: the hours of that day
            ax2.vlines(xs[days], lower[days], upper[days], color="tab:blue", lw=3, alpha=0.4,
                       label="published in whole days: that day's hours" if what == "onset" else None)
        ax.axvline(len(t) - 0.5, color="0.8", lw=0.8)
        ax2.set_ylabel("median onset, episode (h)", fontsize=8)
        shown = [*both.median_onset_hours, *both.published_median_onset_hours, *both.median_duration_hours,
                 *both.published_median_duration_hours, 1.0]
        ax2.set_ylim(0, max(96.0, 1.1 * np.nanmax(shown)))
        ax.set_xticks(xs, [*t.label, "all doses"], fontsize=7, rotation=45 if len(t) > 8 else 0, ha="right" if len(t) > 8 else "center")
        ax.set_ylabel("patients with CRS starting (%)", fontsize=8)
        ax.set_ylim(0, max(5.0, 1.15 * (total.max() if len(total) else 0.0)))
        ax.set_title(f"{arm}: when CRS starts after each dose", fontsize=10)
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=6.5, frameon=False, loc="upper left", bbox_to_anchor=(1.07, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def time_courses(result: TrialResult, path: Path) -> None:
    """Median and 90% band over patients of drug, IL-6 signalling, activated T cells and tumour.
    On log axes a curve starts where its values become positive (no drug is drawn before the first
    dose); the axis shows four decades below the highest band."""
    panels = [
        ("drug_ng_ml", "bispecific in plasma (ng/mL)", True),
        ("il6_signalling_pg_ml", "IL-6 signalling (pg/mL)", True),
        ("activated_t_cells_1e9", "activated T cells (1e9)", True),
        ("malignant_percent_of_baseline", "malignant burden (% of baseline)", False),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, label, log) in zip(axes.ravel(), panels):
        top = max((np.max(c[key]) for c in result.time_courses.values() if c), default=1.0)
        for (arm, course), color in zip(result.time_courses.items(), _colors(len(result.time_courses))):
            if not course:
                continue
            lo, med, hi = (np.where(x > 0, x, np.nan) if log else x for x in course[key])
            if log:  # the band's floor: where the 5th percentile is still zero, draw from the axis' bottom
                lo = np.where(np.isnan(lo) & ~np.isnan(hi), top * 1e-4, lo)
            ax.fill_between(course["day"], lo, hi, color=color, alpha=0.2, lw=0)
            ax.plot(course["day"], med, color=color, label=arm, lw=1.4)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(bottom=top * 1e-4, top=top * 2)
        ax.set_xlabel("day")
        ax.set_title(label, fontsize=10)
    axes[0, 0].legend(fontsize=8, frameon=False)
    fig.suptitle("median and 5-95% band over virtual patients", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Per response kind: (column, y label, reference lines as (value, label)).
_WATERFALL = {
    "lymphoma": ("best_change_percent", "best change of SPD from baseline (%)", [(-50, "PR: -50% SPD")]),
    "myeloma": ("best_change_percent", "best change of malignant burden (%)", [(-50, "PR: -50%"), (-99, "CR: -99%")]),
    "solid": ("best_change_percent", "best change of the sum of diameters (%)", [(-30, "PR: -30%"), (20, "PD: +20%")]),
    "leukaemia": ("best_marrow_blast_percent", "lowest marrow blasts (%)", [(endpoints.LEUKAEMIA_CR_BLAST_PERCENT, "CR/CRh: blasts < 5%")]),
}


def waterfall(result: TrialResult, path: Path) -> None:
    """Best response per patient, sorted, per arm (draw 0, first SAMPLE_PATIENTS patients): change of
    SPD (lymphoma), sum of diameters (solid), malignant burden (myeloma), or the lowest marrow blast percentage (leukaemia),
    with the response criterion drawn."""
    p = result.sample
    arms = list(result.arms)
    fig, axes = plt.subplots(1, len(arms), figsize=(4.5 * len(arms), 3.8), squeeze=False)
    colors = {"CR": "#1b7837", "PR": "#7fbf7b", "SD": "#bababa", "PD": "#d6604d"}
    for ax, arm in zip(axes[0], arms):
        column, ylabel, lines = _WATERFALL[result.response_kinds[arm]]
        g = p[p.arm == arm].sort_values(column, ascending=False)
        ax.bar(np.arange(len(g)), g[column].clip(upper=100), color=[colors[r] for r in g.best_response], width=1.0)
        for value, text in lines:
            ax.axhline(value, color="k", lw=0.6, ls="--")
            ax.text(len(g) * 0.99, value, text, fontsize=7, ha="right", va="bottom")
        ax.set_title(arm, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlabel("patients" if len(g) < SAMPLE_PATIENTS else f"first {SAMPLE_PATIENTS} patients")
        ax.set_xticks([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, list(colors), fontsize=8, frameon=False, loc="upper center", ncol=4, title="best response",
               title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def forest(result: TrialResult, path: Path) -> None:
    """Paired differences of the main endpoints against the reference arm, with 95% intervals;
    differences resting on an extrapolated rate (no published target, see summary.csv `support`)
    are drawn hollow and marked."""
    c = result.comparisons[result.comparisons.endpoint.isin(MAIN_ENDPOINTS)].reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * max(len(c), 1) + 1.4))
    if c.empty:
        ax.text(0.5, 0.5, "single arm: no comparison", ha="center", va="center")
        ax.set_axis_off()
    else:
        support = result.summary.set_index(["arm", "endpoint"])["support"]
        extrapolated = np.array([support.get((r.arm, r.endpoint)) == "extrapolated" or support.get((r.reference_arm, r.endpoint)) == "extrapolated"
                                 for r in c.itertuples()])
        labels = [f"{r.endpoint}: {r.arm} vs {r.reference_arm}" + (" (extrapolated)" if e else "") for r, e in zip(c.itertuples(), extrapolated)]
        y = np.arange(len(c))[::-1]
        for mask, face in ((~extrapolated, "k"), (extrapolated, "white")):
            if mask.any():
                d = c[mask]
                xerr = [np.maximum(d.difference - d.lower, 0.0), np.maximum(d.upper - d.difference, 0.0)]
                ax.errorbar(d.difference, y[mask], xerr=xerr, fmt="o", color="k", mfc=face, capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_xlabel("difference (percentage points, 95% interval)")
        if extrapolated.any():
            ax.set_title("hollow: no published target for this drug, route, population and endpoint", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(summary: pd.DataFrame, shown=MAIN_ENDPOINTS) -> str:
    """The main endpoints of summary.csv as a markdown table (for READMEs and reports)."""
    s = summary[summary.endpoint.isin(shown)]
    lines = ["| arm | endpoint | estimate % | 95% interval | n | support |", "|---|---|---|---|---|---|"]
    for r in s.itertuples():
        lines.append(f"| {r.arm} | {r.endpoint} | {r.estimate:.1f} | {r.lower:.1f}-{r.upper:.1f} | {r.n} | {getattr(r, 'support', '')} |")
    return "\n".join(lines)
