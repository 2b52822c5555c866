"""Trials: contract files, paired arms, interval coverage, config errors, the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vpop import report, trial
from vpop.catalogue import ConfigError
from vpop.simulate import Arm, prepare_arm, simulate_arm

SHORT = {"cycle_days": 21, "cycles": 2, "doses": [
    {"cycle": 1, "day": 1, "amount": 1, "unit": "mg"},
    {"cycle": 1, "day": 8, "amount": 2, "unit": "mg"},
    {"cycle": 1, "day": 15, "amount": 60, "unit": "mg"},
    {"cycle": 2, "day": 1, "amount": 60, "unit": "mg"}]}
EXPERIMENT = {"reference_arm": "iv", "arms": {
    "iv": {"drug": "mosunetuzumab", "route": "iv", "population": "fl_rr", "regimen": SHORT},
    "sc": {"drug": "mosunetuzumab", "route": "sc", "population": "fl_rr", "regimen": "mosunetuzumab_fl_sc"}}}


@pytest.fixture(scope="module")
def small_trial():
    arms, ref = trial.arms_from_config(EXPERIMENT)
    return trial.run_trial(arms, ref, trial.TrialSettings(n=120, seed=3, horizon_days=42, trajectories=10))


def test_arms_share_their_patients(small_trial):
    p = small_trial.patients
    iv, sc = p[p.arm == "iv"].set_index("patient_id"), p[p.arm == "sc"].set_index("patient_id")
    for c in ("weight_kg", "age_years", "tumour_volume_ml", "cd8_t_cells_per_ul", "b_cells_per_ul"):
        pd.testing.assert_series_equal(iv[c], sc[c])


def test_contract_columns_and_endpoint_names(small_trial, tmp_path):
    report.write_outputs(small_trial, tmp_path)
    summary = pd.read_csv(tmp_path / "summary.csv")
    comparisons = pd.read_csv(tmp_path / "comparisons.csv")
    patients = pd.read_parquet(tmp_path / "patients.parquet")
    assert list(summary.columns) == ["arm", "endpoint", "estimate", "lower", "upper", "n"]
    assert list(comparisons.columns) == ["endpoint", "arm", "reference_arm", "difference", "lower", "upper"]
    names = set(summary.endpoint)
    assert {"orr", "cr", "crs_any", "crs_grade2plus", "crs_grade3plus", "crs_any_dose1", "crs_any_dose2", "toci_rescue"} <= names
    assert len(patients) == 2 * 120 and {"arm", "draw", "patient_id"} <= set(patients.columns)
    assert ((summary.lower <= summary.estimate) & (summary.estimate <= summary.upper)).all()
    assert summary.estimate.between(0, 100).all()
    assert set(comparisons.arm) == {"sc"} and set(comparisons.reference_arm) == {"iv"}
    for fig in report.FIGURES:
        assert (tmp_path / "figures" / fig).stat().st_size > 10_000


def test_paired_difference_matches_the_arm_rates(small_trial):
    s = small_trial.summary.set_index(["arm", "endpoint"]).estimate
    c = small_trial.comparisons.set_index("endpoint").difference
    for e in ("crs_any", "orr"):
        assert c[e] == pytest.approx(s[("sc", e)] - s[("iv", e)], abs=1e-9)


def test_interval_coverage_against_a_large_virtual_cohort():
    """95% intervals of small trials cover the rate of a 20,000-patient cohort ~95% of the time."""
    prepared = prepare_arm(Arm("iv", "mosunetuzumab", "iv", "fl_rr", SHORT), horizon_days=21)
    big = simulate_arm(prepared, 20_000, seed=100, chunk_size=200).reductions
    truth = np.mean(big["crs_grade"].max(axis=1) >= 1)
    covered = []
    for rep in range(100):
        k = int(np.sum(simulate_arm(prepared, 200, seed=rep, chunk_size=200).reductions["crs_grade"].max(axis=1) >= 1))
        _, lo, hi = trial._pooled_interval(np.asarray([k]), 200, np.random.default_rng(0))
        covered.append(lo <= truth <= hi)
    assert 0.88 <= np.mean(covered) <= 1.0


def test_paired_difference_interval_coverage():
    rng = np.random.default_rng(1)
    covered = []
    for rep in range(400):  # correlated binary pairs with a known difference of 0.1
        u = rng.random(300)
        a, b = u < 0.4, u < 0.5
        df = pd.DataFrame({"arm": ["a"] * 300 + ["b"] * 300, "draw": 0, "patient_id": np.tile(np.arange(300), 2),
                           "orr": np.concatenate([a, b])})
        c = trial.compare(df, "a").set_index("endpoint").loc["orr"]
        covered.append(c.lower <= 10.0 <= c.upper)
    assert 0.90 <= np.mean(covered) <= 0.99  # true coverage of this interval here: 94.3% (20,000 replicates)


@pytest.mark.parametrize("experiment, message", [
    ({"arms": {}}, "experiment.arms is missing or empty"),
    ({"arms": {"a": {"drug": "mosunetuzumab", "population": "fl_rr"}}}, "experiment.arms.a.regimen is missing"),
    ({"arms": {"a": {"drug": "mosunetuzumab", "population": "fl_rr", "regimen": SHORT, "dose": 3}}},
     "experiment.arms.a: unknown key(s) ['dose']"),
    ({"reference_arm": "b", "arms": {"a": {"drug": "mosunetuzumab", "route": "iv", "population": "fl_rr", "regimen": SHORT}}},
     "experiment.reference_arm 'b' is not an arm; allowed: a"),
    ({"arms": {"a/b": {"drug": "mosunetuzumab", "route": "iv", "population": "fl_rr", "regimen": SHORT}}},
     "arm names may use letters, digits and _ . + - only"),
    ({"arms": {"a": {"drug": "mosunetuzumab", "population": "fl_rr", "regimen": SHORT}}}, "experiment.arms.a.route is missing"),
])
def test_experiment_errors_name_the_field(experiment, message):
    with pytest.raises(ConfigError) as err:
        trial.arms_from_config(experiment)
    assert message in str(err.value)


def test_outputs_are_all_or_nothing(small_trial, tmp_path, monkeypatch):
    def broken(*args, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "forest", broken)
    with pytest.raises(RuntimeError):
        report.write_outputs(small_trial, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


USER_EXPERIMENT = """# @package _global_
experiment:
  reference_arm: step
  arms:
    step:
      drug: mosunetuzumab
      route: iv
      population: fl_rr
      regimen:
        cycle_days: 21
        cycles: 1
        doses:
          - {cycle: 1, day: 1, amount: 1, unit: mg}
          - {cycle: 1, day: 8, amount: 2, unit: mg}
          - {cycle: 1, day: 15, amount: 60, unit: mg}
      premedication: dexamethasone_20mg
      prophylaxis: {drug: tocilizumab, amount: 8, unit: mg/kg, before_dose: 1, hours_before: 4}
    flat:
      drug: mosunetuzumab
      route: iv
      population: fl_rr
      regimen: {cycle_days: 21, cycles: 1, doses: [{cycle: 1, day: 15, amount: 60, unit: mg}]}
      premedication: none
"""


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "vpop.cli", *args], cwd=cwd, capture_output=True, text=True, env=env)


def test_cli_runs_a_user_experiment_from_its_own_folder(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(USER_EXPERIMENT)
    out = tmp_path / "out"
    run = _cli("--config-dir", str(tmp_path), "+experiment=mine", "population.n=40", "trajectories=5", f"hydra.run.dir={out}",
               cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary.arm) == {"step", "flat"}
    assert (out / "figures" / "crs_by_dose.png").exists()
    # By default the shipped posterior is propagated: 20 draws, each a full re-simulation.
    patients = pd.read_parquet(out / "patients.parquet")
    assert patients.draw.nunique() == 20 and len(patients) == 2 * 20 * 40
    # Off a terminal there is no progress bar, only the closing throughput line.
    assert "%|" not in run.stderr and "patients/s" in run.stderr + run.stdout
    assert not list((tmp_path / "outputs" / ".checkpoints").glob("*/patients.parquet"))  # the checkpoint became the result


def test_cli_bad_config_exits_with_the_field_named_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    run = _cli("+experiment=mosunetuzumab_iv_vs_sc", "experiment.arms.iv.drug=rituximab", f"hydra.run.dir={out}", cwd=tmp_path)
    assert run.returncode == 2
    assert "unknown drug 'rituximab'" in run.stderr + run.stdout
    assert not (out / "summary.csv").exists()


def test_cli_without_experiment_lists_them(tmp_path):
    run = _cli(f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert run.returncode == 2
    assert "mosunetuzumab_iv_vs_sc" in run.stderr + run.stdout


def test_shipped_experiments_are_valid():
    import yaml

    folder = Path(__file__).resolve().parents[1] / "configs" / "experiment"
    for f in folder.glob("*.yaml"):
        arms, ref = trial.arms_from_config(yaml.safe_load(f.read_text())["experiment"])
        assert ref in arms
        for arm in arms.values():
            prepare_arm(arm, horizon_days=21)
