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

from vpop.store import DATASET, PatientStore  # noqa: E402
from vpop.trial import MAIN_ENDPOINTS, SAMPLE_PATIENTS, TrialResult  # noqa: E402

OUTPUT_FILES = ("summary.csv", "comparisons.csv")
FIGURES = ("crs_by_dose.png", "time_courses.png", "waterfall.png", "forest.png")
MAX_DOSES_SHOWN = 8


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
        figs = staging / "figures"
        figs.mkdir()
        crs_by_dose(result, figs / "crs_by_dose.png")
        time_courses(result, figs / "time_courses.png")
        waterfall(result, figs / "waterfall.png")
        forest(result, figs / "forest.png")
        written = []
        dataset = staging / DATASET if result.patients is not None else result.dataset
        for source, target in [*((staging / f, out / f) for f in (*OUTPUT_FILES, "figures")), (dataset, out / DATASET)]:
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            shutil.move(str(source), target)
            written.append(target)
        if result.dataset is not None:  # the checkpoint has become the result
            shutil.rmtree(result.dataset.parent, ignore_errors=True)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _colors(n):
    return plt.get_cmap("tab10")(np.arange(n) % 10)


def crs_by_dose(result: TrialResult, path: Path) -> None:
    """CRS incidence (any grade, and grade >= 2) starting after each administration, per arm."""
    s = result.summary.set_index(["arm", "endpoint"])["estimate"]
    arms = list(result.arms)
    fig, axes = plt.subplots(len(arms), 1, figsize=(9, 2.6 * len(arms)), squeeze=False)
    for ax, arm, color in zip(axes[:, 0], arms, _colors(len(arms))):
        labels = result.dose_labels[arm][:MAX_DOSES_SHOWN]
        x = np.arange(len(labels))
        any_ = [s.get((arm, f"crs_any_dose{k + 1}"), 0.0) for k in x]
        g2 = [s.get((arm, f"crs_grade2plus_dose{k + 1}"), 0.0) for k in x]
        ax.bar(x, any_, color=color, alpha=0.45, label="any grade")
        ax.bar(x, g2, color=color, label="grade ≥ 2")
        for xi, v in zip(x, any_):
            ax.text(xi, v + 0.5, f"{v:.0f}%", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel("patients with CRS (%)")
        ax.set_title(f"{arm}: CRS starting after each administration", fontsize=10)
        ax.set_ylim(0, max(10.0, 1.2 * max(any_, default=0.0)))
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def time_courses(result: TrialResult, path: Path) -> None:
    """Median and 90% band over patients of drug, IL-6 signalling, activated T cells and tumour."""
    panels = [
        ("drug_ng_ml", "bispecific in plasma (ng/mL)", True),
        ("il6_signalling_pg_ml", "IL-6 signalling (pg/mL)", True),
        ("activated_t_cells_1e9", "activated T cells (1e9)", True),
        ("malignant_percent_of_baseline", "malignant burden (% of baseline)", False),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, label, log) in zip(axes.ravel(), panels):
        top = max((np.max(c[key]) for c in result.time_courses.values() if c), default=1.0)
        floor = top * 1e-4 if log else -np.inf  # log axes show four decades below the highest band
        for (arm, course), color in zip(result.time_courses.items(), _colors(len(result.time_courses))):
            if not course:
                continue
            lo, med, hi = (np.maximum(x, floor) for x in course[key])
            ax.fill_between(course["day"], lo, hi, color=color, alpha=0.2, lw=0)
            ax.plot(course["day"], med, color=color, label=arm, lw=1.4)
        ax.set_yscale("log" if log else "linear")
        ax.set_xlabel("day")
        ax.set_title(label, fontsize=10)
    axes[0, 0].legend(fontsize=8, frameon=False)
    fig.suptitle("median and 5-95% band over virtual patients", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def waterfall(result: TrialResult, path: Path) -> None:
    """Best change of tumour burden (SPD for lymphoma) per patient, sorted, per arm (draw 0, first
    SAMPLE_PATIENTS patients)."""
    p = result.sample
    arms = list(result.arms)
    fig, axes = plt.subplots(1, len(arms), figsize=(4.5 * len(arms), 3.4), squeeze=False, sharey=True)
    colors = {"CR": "#1b7837", "PR": "#7fbf7b", "SD": "#bababa", "PD": "#d6604d"}
    for ax, arm in zip(axes[0], arms):
        g = p[p.arm == arm].sort_values("best_change_percent", ascending=False)
        ax.bar(np.arange(len(g)), g.best_change_percent.clip(upper=100), color=[colors[r] for r in g.best_response], width=1.0)
        ax.axhline(-50, color="k", lw=0.6, ls="--")
        ax.set_title(arm, fontsize=10)
        ax.set_xlabel("patients" if len(g) < SAMPLE_PATIENTS else f"first {SAMPLE_PATIENTS} patients")
        ax.set_xticks([])
    axes[0, 0].set_ylabel("best change from baseline (%)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    axes[0, -1].legend(handles, list(colors), fontsize=8, frameon=False, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def forest(result: TrialResult, path: Path) -> None:
    """Paired differences of the main endpoints against the reference arm, with 95% intervals."""
    c = result.comparisons[result.comparisons.endpoint.isin(MAIN_ENDPOINTS)]
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(c), 1) + 1.2))
    if c.empty:
        ax.text(0.5, 0.5, "single arm: no comparison", ha="center", va="center")
        ax.set_axis_off()
    else:
        labels = [f"{r.endpoint}: {r.arm} vs {r.reference_arm}" for r in c.itertuples()]
        y = np.arange(len(c))[::-1]
        ax.errorbar(c.difference, y, xerr=[c.difference - c.lower, c.upper - c.difference], fmt="o", color="k", capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_xlabel("difference (percentage points, 95% interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(summary: pd.DataFrame, endpoints=MAIN_ENDPOINTS) -> str:
    """The main endpoints of summary.csv as a markdown table (for READMEs and reports)."""
    s = summary[summary.endpoint.isin(endpoints)]
    lines = ["| arm | endpoint | estimate % | 95% interval | n |", "|---|---|---|---|---|"]
    for r in s.itertuples():
        lines.append(f"| {r.arm} | {r.endpoint} | {r.estimate:.1f} | {r.lower:.1f}-{r.upper:.1f} | {r.n} |")
    return "\n".join(lines)
