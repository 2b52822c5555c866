"""The validation report regenerates end to end (tiny population) with its contract columns."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vpop import posterior
from vpop import targets as published

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "validation" / "run.py"


@pytest.fixture(scope="module")
def validation():
    spec = importlib.util.spec_from_file_location("validation_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prcc_finds_monotone_and_irrelevant_inputs(validation):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = np.exp(x[:, 0]) - 0.5 * x[:, 1] ** 3 + 0.05 * rng.normal(size=200)
    r = validation.prcc(x, y)
    assert r[0] > 0.7 and r[1] < -0.7 and abs(r[2]) < 0.2  # signs and sizes; the third input is noise


def test_a_targets_rates_leave_the_other_targets_intervals_alone(validation):
    """Each row's predictive interval has its own random stream: refitting one drug (new rates for its
    targets) must not move the intervals of the others, whatever their order in targets.csv."""
    import numpy as np

    targets = published.load("targets")
    rows = targets[targets.endpoint.isin(["crs_any", "orr"])].head(4)

    class Fixed:  # a simulator whose cohorts have given per-patient 0/1 endpoints, 2 draws x 50 patients
        def __init__(self, rate_of):
            self.rate_of = rate_of

        def run(self, arm, horizon_days=None):
            p = self.rate_of(arm.drug)
            hits = np.arange(50) < round(50 * p)
            return pd.DataFrame({"draw": np.repeat([0, 1], 50), "crs_any": np.tile(hits, 2), "orr": np.tile(hits, 2)})

    first = rows.drug.iloc[0]
    before, _ = validation.targets_table(rows, Fixed(lambda drug: 0.3), seed=0)
    after, _ = validation.targets_table(rows, Fixed(lambda drug: 0.9 if drug == first else 0.3), seed=0)
    moved = (before.lower != after.lower) | (before.upper != after.upper)
    assert moved[rows.drug.to_numpy() == first].all()
    assert not moved[rows.drug.to_numpy() != first].any()


@pytest.mark.slow  # ~5 min on 2 CPU cores (about 20 arms, each its own compilation): python -m pytest -m slow
def test_report_on_a_tiny_population(validation, tmp_path):
    if not posterior.default_path().is_file():
        pytest.fail("the shipped posterior vpop/data/posterior_default.nc is missing")
    out = tmp_path / "report"
    # Its own process, as a user runs it (and so its ~20 compiled kernels leave this one alone).
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--patients", "12", "--draws", "2", "--sensitivity-draws", "8"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    table = pd.read_csv(out / "validation.csv")
    assert list(table.columns[:9]) == validation.COLUMNS
    targets = published.load("targets")
    assert set(targets.id[targets.role == "validation"]) <= set(table.target)
    assert {"validation", "calibration", "comparison", "prediction"} <= set(table.role)
    inside = table.dropna(subset=["predicted"])
    assert ((inside.lower <= inside.predicted + 1e-9) & (inside.predicted <= inside.upper + 1e-9)).all()
    doses = pd.read_csv(out / "dose_periods.csv")
    assert {"regimen", "period", "crs_any", "peak_period", "step_up_fold"} <= set(doses.columns)
    sens = pd.read_csv(out / "sensitivity.csv")
    assert set(sens.endpoint) == {"crs_grade2plus", "orr"}
    report = (out / "report.md").read_text()
    n_val = int((targets.role == "validation").sum())
    assert f"Mean absolute error over the {n_val} validation rates" in report
    per = pd.read_csv(out / "per_dose.csv")
    assert {"regimen", "period", "dose", "predicted", "lower", "upper", "observed", "target", "role", "recalled"} <= set(per.columns)
    assert {"T09", "T10", "T11"} <= set(per.target.dropna())  # teclistamab's published step-up doses
    assert (out / "figures" / "per_dose.png").stat().st_size > 0
    for fig in ("validation.png", "crs_by_dose_period.png", "sensitivity.png"):
        assert (out / "figures" / fig).stat().st_size > 0
    assert not (tmp_path / "report.partial").exists()


def test_compare_sets_two_reports_side_by_side(tmp_path):
    """experiments/validation/compare.py: MAE and overlap by role and kind, and the targets that moved."""
    spec = importlib.util.spec_from_file_location("validation_compare", SCRIPT.parent / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    rows = dict(target=["A", "B", "C"], endpoint=["crs_any", "orr", "crs_any"], role=["calibration", "calibration", "validation"],
                drug="x", observed=[0.30, 0.50, 0.20])
    base = pd.DataFrame(rows | dict(predicted=[0.40, 0.52, 0.25], abs_error=[0.10, 0.02, 0.05], overlap=[False, True, True]))
    new = pd.DataFrame(rows | dict(predicted=[0.33, 0.52, 0.35], abs_error=[0.03, 0.02, 0.15], overlap=[True, True, False]))
    for name, table in (("base", base), ("new", new)):
        (tmp_path / name).mkdir()
        table.to_csv(tmp_path / name / "validation.csv", index=False)
    b, n = compare._read(tmp_path / "base"), compare._read(tmp_path / "new")
    s = compare.summary(b, n).set_index(["role", "targets"])
    assert s.loc[("calibration", "all"), ["MAE base (pp)", "MAE new (pp)"]].tolist() == [6.0, 2.5]
    assert s.loc[("calibration", "CRS"), ["overlapping base", "overlapping new"]].tolist() == [0, 1]
    assert s.loc[("validation", "all"), "MAE new (pp)"] == 15.0
    moved = compare.moved(b, n, threshold_pp=1.5)
    assert list(moved.index) == ["A", "C"] and list(moved.closer) == ["new", "base"]
    new.iloc[:2].to_csv(tmp_path / "new" / "validation.csv", index=False)
    with pytest.raises(SystemExit, match="only in base"):
        compare.main([str(tmp_path / "base"), str(tmp_path / "new")])


def test_release_sources_trace_a_first_dose_against_an_unprimed_compartment():
    """experiments/validation/release_sources.py: one row per dose in the horizon; teclistamab's first
    dose meets a marrow never exposed (primed level ~0) and releases, and each step-up's peak rate
    exceeds the primed level it meets."""
    spec = importlib.util.spec_from_file_location("release_sources", SCRIPT.parent / "release_sources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.main(["--arms", "no_such_arm"])
    table = module.release_sources(module.label_arms()["teclistamab"], patients=4, days=8.0)
    rows = [r for r in table.splitlines() if r.startswith("| C")]
    assert [r.split(" | ")[0] for r in rows] == ["| C1D1 0.06 mg/kg", "| C1D4 0.3 mg/kg", "| C1D7 1.5 mg/kg"]
    marrow = [r.split(" | ")[1].split(" (")[0].split(" / ") for r in rows]
    rate, primed = (np.array([float(m[i]) for m in marrow]) for i in (0, 1))
    assert primed[0] < 1e-9 < rate[0] and (rate > primed).all()
    assert all(float(r.split(" | ")[2]) > 0 for r in rows)  # each step-up releases
