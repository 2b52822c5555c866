"""Trials: contract files, paired arms, interval coverage, config errors, the CLI."""

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from vpop import catalogue, report, trial
from vpop.trial.statistics import pooled_interval
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
    assert list(summary.columns) == ["arm", "endpoint", "estimate", "lower", "upper", "n", "support", "cycle", "day", "hour",
                                     "amount", "unit", "published", "published_lower", "published_upper", "published_n",
                                     "published_targets", "published_horizon_days"]
    assert list(comparisons.columns) == ["endpoint", "arm", "reference_arm", "difference", "lower", "upper",
                                         "reference_endpoint", "dose", "reference_dose"]
    names = set(summary.endpoint)
    assert {"orr", "cr", "crs_any", "crs_grade2plus", "crs_grade3plus", "crs_any_dose1", "crs_any_dose2", "toci_rescue"} <= names
    assert len(patients) == 2 * 120 and {"arm", "draw", "patient_id"} <= set(patients.columns)
    assert ((summary.lower <= summary.estimate) & (summary.estimate <= summary.upper)).all()
    assert summary.estimate.between(0, 100).all()
    assert set(comparisons.arm) == {"sc"} and set(comparisons.reference_arm) == {"iv"}
    for fig in report.FIGURES:
        assert (tmp_path / "figures" / fig).stat().st_size > 10_000
    # Every per-dose endpoint carries its calendar; the patient rows name each dose.
    per_dose = summary[summary.endpoint.str.contains("_dose")].set_index(["arm", "endpoint"])
    assert per_dose.loc[("iv", "crs_any_dose3"), ["cycle", "day", "amount", "unit"]].tolist() == [1, 15, 60, "mg"]
    assert per_dose.loc[("sc", "crs_any_dose2"), ["cycle", "day", "amount", "unit"]].tolist() == [1, 8, 45, "mg"]
    assert set(patients[patients.arm == "iv"].dose3) == {"C1D15 60 mg"}
    # Recurrent CRS: CRS starting after two or more doses, read from the per-dose grades; counted in summary.csv.
    starts = (patients.filter(regex=r"^crs_grade_dose\d+$").astype(float).fillna(0) >= 1).sum(axis=1)
    np.testing.assert_array_equal(patients.crs_recurrent.to_numpy(bool), (starts >= 2).to_numpy())
    assert 0 < patients.crs_recurrent.mean() < patients.crs_any.mean() and "crs_recurrent" in names
    doses = pd.read_csv(tmp_path / "doses.csv")
    assert list(doses[(doses.arm == "iv") & (doses.role == "bispecific")].amount) == [1, 2, 60, 60]


def test_published_rates_stand_beside_an_arm_that_is_a_published_cohort():
    """Only an arm given exactly as a published cohort (regimen, premedication, prophylaxis, delay)
    gets its published rates; targets of one endpoint from two trials are pooled."""
    from vpop import targets

    table = targets.load()
    tec = Arm("tec", "teclistamab", "sc", "mm_rr", "teclistamab_mm", "dexamethasone_16mg_step_up")
    rates = targets.published_rates(table, tec).set_index("endpoint")
    assert rates.loc["crs_any", ["published_n", "published_targets"]].tolist() == [165, "T07"]
    assert rates.loc["crs_any", "published"] == pytest.approx(100 * 119 / 165)
    assert rates.loc["crs_any", "published_lower"] < rates.loc["crs_any", "published"] < rates.loc["crs_any", "published_upper"]
    blin = Arm("b", "blinatumomab", "civ", "b_all_rr", "blinatumomab_all", "dexamethasone_20mg_each_step")
    cr = targets.published_rates(table, blin).set_index("endpoint").loc["cr"]
    assert (cr.published_targets, cr.published_n, cr.published) == ("B01;B02", 189 + 271, pytest.approx(100 * (81 + 92) / 460))
    for other in (replace(tec, premedication=None), replace(tec, prophylaxis="tocilizumab_before_dose2"),
                  replace(tec, delay={"after_dose": 10, "days": 28})):
        assert targets.published_rates(table, other).empty
    restart = targets.published_rates(table, replace(tec, delay={"after_dose": 10, "days": 42}))
    assert restart.endpoint.tolist() == ["crs_any_dose11"] and restart.published_targets.tolist() == ["R01"]


def test_support_says_which_rates_rest_on_published_targets(small_trial):
    support = small_trial.summary.set_index(["arm", "endpoint"]).support
    assert support[("iv", "crs_any")] == "calibrated"  # T03: mosunetuzumab IV in R/R FL
    assert support[("iv", "orr")] == "calibrated"  # T01
    assert support[("sc", "crs_any")] == "validated"  # V01: the SC cohort is predicted, never fitted
    assert support[("sc", "orr")] == "validated"  # V31: SC response, predicted
    assert support[("sc", "crs_grade2plus")] == "extrapolated"  # no SC grade >= 2 target
    assert support[("iv", "b_cell_depletion")] == "extrapolated"


def test_a_run_on_the_shipped_posterior_names_the_options_it_was_not_fitted_under():
    """Dose holds and tocilizumab for a lasting fever are off in the shipped fit: a run that turns one on
    over the shipped posterior is told which (the app logs it); one on another posterior is not."""
    from omegaconf import OmegaConf

    from vpop.cli import settings_outside_the_shipped_fit

    model = catalogue.load("model", "default")
    cfg = OmegaConf.create({"posterior": "default", "model": model})
    assert settings_outside_the_shipped_fit(cfg) == ""
    cfg.model.crs.rescue_grade1_hours = 24
    assert settings_outside_the_shipped_fit(cfg) == "model.crs.rescue_grade1_hours=24"
    cfg.model.crs.hold_until_resolved = 1
    assert settings_outside_the_shipped_fit(cfg) == "model.crs.hold_until_resolved=1, model.crs.rescue_grade1_hours=24"
    cfg.posterior = "my_fit/posterior.nc"
    assert settings_outside_the_shipped_fit(cfg) == ""


def test_per_dose_comparisons_pair_the_same_calendar_day():
    """Arm doses on days 1, 8, 15 against a reference dosed on days 1, 15: C1D8 has no counterpart,
    and C1D15 (the arm's dose 3) is compared with the reference's dose 2, as the row says."""
    from vpop.regimen import Administration

    def periods(days, amounts):
        return [Administration(d - 1.0, "bispecific", "iv", a, "mg", 1, label=f"C1D{d} {a} mg", cycle_day=d)
                for d, a in zip(days, amounts)]

    cal = {"ref": periods([1, 15], [60, 60]), "step": periods([1, 8, 15], [1, 2, 60])}
    counts = trial.EndpointCounts(["ref", "step"], "ref", cal)
    n = 40
    rng = np.random.default_rng(0)
    ref = pd.DataFrame({"patient_id": np.arange(n), "crs_any_dose1": rng.random(n) < 0.6, "crs_any_dose2": rng.random(n) < 0.1,
                        "crs_any_dose3": pd.array([pd.NA] * n, dtype="boolean")})  # tables share columns; absent doses are null
    step = pd.DataFrame({"patient_id": np.arange(n), "crs_any_dose1": rng.random(n) < 0.05, "crs_any_dose2": rng.random(n) < 0.05,
                         "crs_any_dose3": rng.random(n) < 0.3})
    for t in (ref, step):
        for c in trial.MAIN_ENDPOINTS + ("crs_recurrent", "progression", "b_cell_depletion"):
            t[c] = False
    counts.add(0, {"ref": ref, "step": step})
    c = counts.comparisons().set_index("endpoint")
    assert "crs_any_dose2" not in c.index  # C1D8: the reference has no dose that day
    row = c.loc["crs_any_dose3"]
    assert (row.reference_endpoint, row.dose, row.reference_dose) == ("crs_any_dose2", "C1D15 60 mg", "C1D15 60 mg")
    expected = 100 * (step.crs_any_dose3.mean() - ref.crs_any_dose2.mean())
    assert row.difference == pytest.approx(expected)


def test_the_paired_design_narrows_the_difference_interval(small_trial):
    """The arms share their patients, so a patient's CRS under IV and SC go together; the paired
    interval of the difference uses that and is narrower than one for two independent cohorts of
    the same rates (Wald, unpaired), while its estimate is the difference of the arm rates."""
    s = small_trial.summary.set_index(["arm", "endpoint"])
    c = small_trial.comparisons.set_index("endpoint").loc["crs_any"]
    p_iv, p_sc, n = s.loc[("iv", "crs_any"), "estimate"] / 100, s.loc[("sc", "crs_any"), "estimate"] / 100, 120
    assert c.difference == pytest.approx(100 * (p_sc - p_iv), abs=1e-9)
    unpaired = 2 * 1.96 * 100 * np.sqrt(p_iv * (1 - p_iv) / n + p_sc * (1 - p_sc) / n)
    assert c.upper - c.lower < 0.8 * unpaired, (c.upper - c.lower, unpaired)


def test_interval_coverage_against_a_large_virtual_cohort():
    """95% intervals of small trials cover the rate of a 20,000-patient cohort ~95% of the time. The
    100 trials of 200 are that cohort's consecutive patients: each is 1% of it, so sharing patients
    with the truth hardly helps them cover it."""
    prepared = prepare_arm(Arm("iv", "mosunetuzumab", "iv", "fl_rr", SHORT), horizon_days=21)
    crs = simulate_arm(prepared, 20_000, seed=100, chunk_size=2_000).reductions["crs_grade"].max(axis=1) >= 1
    truth = np.mean(crs)
    covered = []
    for trial_crs in crs.reshape(100, 200):
        _, lo, hi = pooled_interval(np.asarray([int(trial_crs.sum())]), 200, np.random.default_rng(0))
        covered.append(lo <= truth <= hi)
    assert 0.88 <= np.mean(covered) <= 1.0


# One arm per drug and population of the shipped posterior's parameters (host-side work only).
POSTERIOR_ARMS = [Arm("mosun_iv", "mosunetuzumab", "iv", "fl_rr", "mosunetuzumab_fl_iv", "dexamethasone_20mg"),
                  Arm("mosun_sc", "mosunetuzumab", "sc", "dlbcl_post_cart", "mosunetuzumab_fl_sc", "dexamethasone_20mg"),
                  Arm("glofit", "glofitamab", "iv", "dlbcl_rr", "glofitamab_dlbcl", "glofitamab_glucocorticoid"),
                  Arm("epco", "epcoritamab", "sc", "dlbcl_rr", "epcoritamab_dlbcl", "epcoritamab_corticosteroid"),
                  Arm("odro", "odronextamab", "iv", "dlbcl_post_cart", "odronextamab_dlbcl", "dexamethasone_10mg_cycle1"),
                  Arm("blin", "blinatumomab", "civ", "b_all_rr", "blinatumomab_all", "dexamethasone_20mg_each_step"),
                  Arm("tec", "teclistamab", "sc", "mm_rr", "teclistamab_mm", "dexamethasone_16mg_step_up")]


def test_a_posterior_draw_substituted_into_the_parameters_equals_the_configs_rewritten_by_it():
    """Arms are prepared once per trial and each draw substituted into their typical parameters (the
    calibration's mechanism); the result must be what rewriting the configs with the draw and
    preparing the arm afresh gives, leaf for leaf, for every parameter of the shipped posterior."""
    import jax

    from vpop import catalogue, posterior

    draws = posterior.draws("default", 2, seed=3)
    arms = {a.name: a for a in POSTERIOR_ARMS}
    settings = trial.TrialSettings(n=10)
    prepared = trial.prepare_draws(arms, settings, catalogue.load("model", "default"), draws)
    for values, by_arm in zip(draws, prepared):
        for name, arm in arms.items():
            fresh = prepare_arm(arm, None, settings.horizon_days, settings.assessment_every_days, overrides=values)
            # The trial pads schedules to shared shapes (share_compilation); the parameters are the arm's.
            for a, b in zip(jax.tree_util.tree_leaves(fresh.inputs.typical), jax.tree_util.tree_leaves(by_arm[name].inputs.typical), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert prepared[0]["tec"].inputs.typical.crs.grade1_pg_ml != prepared[1]["tec"].inputs.typical.crs.grade1_pg_ml


def test_a_model_value_an_arm_sets_for_itself_does_not_reach_it():
    """A population's own cytokine value (ALL's myeloid capacity) shadows the model's: a draw of the
    model's value must not overwrite it, and the population's own path must."""
    from vpop import parameters

    all_arm, fl_arm = parameters.ParameterScope("blinatumomab", "civ", "b_all_rr"), parameters.ParameterScope("mosunetuzumab", "iv", "fl_rr")
    assert parameters.params_path("model.cytokines.myeloid_capacity", all_arm) is None
    assert parameters.params_path("model.cytokines.myeloid_capacity", fl_arm) == "cytokines.myeloid_capacity"
    assert parameters.params_path("population.b_all_rr.cytokines.myeloid_capacity", all_arm) == "cytokines.myeloid_capacity"


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
    import jax

    # The suite's compilation cache (conftest), so the subprocess and this process share kernels.
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
    return subprocess.run([sys.executable, "-m", "vpop.cli", *args], cwd=cwd, capture_output=True, text=True, env=env)


def test_cli_runs_a_user_experiment_from_its_own_folder(tmp_path, monkeypatch):
    # run_experiment(config_dir=...) adds the folder to this process's search path; undone after the test
    # (else later tests list its `mine` experiment among the shipped ones).
    monkeypatch.setattr(catalogue, "_user_dirs", [])
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(USER_EXPERIMENT)
    out = tmp_path / "out"
    run = _cli("--config-dir", str(tmp_path), "+experiment=mine", "population.n=40", "trajectories=5", "draws=3",
               f"hydra.run.dir={out}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary.arm) == {"step", "flat"}
    assert (out / "figures" / "crs_by_dose.png").exists()
    # The shipped posterior is propagated (3 draws here, 20 by default), each draw a full re-simulation.
    patients = pd.read_parquet(out / "patients.parquet")
    assert patients.draw.nunique() == 3 and len(patients) == 2 * 3 * 40
    # Off a terminal there is no progress bar, only the closing throughput line.
    assert "%|" not in run.stderr and "patients/s" in run.stderr + run.stdout
    assert not list((tmp_path / "outputs" / ".checkpoints").glob("*/patients.parquet"))  # the checkpoint became the result

    # The Python API composes and runs the same trial: the same summary, the same patient rows.
    import vpop

    result = vpop.run_experiment("mine", ["population.n=40", "trajectories=5", "draws=3",
                                          f"checkpoint_dir={tmp_path / 'api_checkpoints'}"], tmp_path / "api", config_dir=tmp_path)
    for table in ("summary.csv", "comparisons.csv"):
        assert (tmp_path / "api" / table).read_text() == (out / table).read_text(), table
    rows = result.patient_rows(["arm", "draw", "patient_id", "crs_any"])
    assert list(rows.columns) == ["arm", "draw", "patient_id", "crs_any"] and len(rows) == 2 * 3 * 40
    with pytest.raises(ConfigError, match="unknown key 'populaton'"):
        vpop.run_experiment("mine", ["+populaton.n=40"], config_dir=tmp_path)


@pytest.mark.parametrize("args, message", [
    (["+experiment=mosunetuzumab_iv_vs_sc", "experiment.arms.iv.drug=rituximab"], "unknown drug 'rituximab'"),
    (["+experiment=mosunetuzumab_iv_vs_sc", "seed=-1"], "seed must be a whole number 0-4294967295, got -1"),
    ([], "no experiment: add +experiment=NAME; available: blinatumomab_ramp"),
])
def test_cli_bad_input_says_one_line_on_stderr_and_leaves_no_folder(tmp_path, args, message):
    run = _cli(*args, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"vpop-trial: error: {run.stderr.strip().split('error: ', 1)[1]}"]
    assert message in run.stderr and run.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no outputs/<experiment>/<time>/, not even Hydra's .hydra/ and log


def test_calibrate_cli_refuses_a_bad_progress_setting_before_any_work(tmp_path):
    """`progress=off` used to read as true in vpop-calibrate (any non-empty string); it is refused as
    vpop-trial refuses it, in one line, leaving no run folder."""
    run = _cli("calibrate", "calibration=tiny", "progress=off", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["vpop-calibrate: error: progress must be auto, true or false, got 'off'"]
    assert list(tmp_path.iterdir()) == []


def test_cli_dry_run_prints_the_dose_calendar_and_simulates_nothing(tmp_path):
    run = _cli("+experiment=teclistamab_tocilizumab_prophylaxis", "dry_run=true", "draws=1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    arm = lines.index(next(x for x in lines if x.startswith("arm before_dose1:")))
    toci = next(x for x in lines[arm:] if x.split()[:2] == ["prophylaxis", "tocilizumab"])
    assert toci.split()[2:8] == ["1", "1", "-4", "-0.17", "8", "mg/kg"]  # C1D1, 4 h before step-up dose 1
    assert "552" in toci  # mg for the typical 69 kg patient
    first = next(x for x in lines[arm:] if x.split()[:2] == ["bispecific", "teclistamab"])
    assert first.split()[2:8] == ["1", "1", "0", "0.00", "0.06", "mg/kg"]
    assert "simulated" not in run.stderr + run.stdout and list(tmp_path.iterdir()) == []


def test_help_lists_every_override():
    from vpop import cli

    text = cli.trial_help()
    for key in cli.OVERRIDES:
        assert f"  {key}=" in text
    assert "mosunetuzumab_iv_vs_sc" in text


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    from vpop import catalogue

    with initialize_config_dir(config_dir=str(catalogue.shipped_configs()), version_base="1.3"):
        return compose(config_name="trial", overrides=list(overrides))


@pytest.mark.parametrize("overrides, message", [
    (["seed=abc"], "seed must be a whole number 0-4294967295, got 'abc'"),
    (["seed=4294967296"], "seed must be a whole number 0-4294967295"),
    (["+populaton.n=20"], "unknown key 'populaton': did you mean 'population'?"),
    (["+population.nn=20"], "population: unknown key(s) ['nn']; allowed: n"),
    (["draws=100000"], "draws=100000: posterior 'default' holds"),
    (["twins_fill=mean"], "twins_fill must be one of none, median, got 'mean'"),
    (["+objective={minimise: crs_gradetwo, arm: sc, no_worse_than: orr, margin_pp: 5}"],
     "objective.minimise 'crs_gradetwo' is not an endpoint of arm sc; allowed: orr, cr,"),
    (["+objective={minimise: crs_any_dose11, arm: sc, no_worse_than: orr, margin_pp: 5}"], "crs_any_dose10, crs_grade2plus_dose1"),
])
def test_bad_overrides_are_refused_before_any_simulation(overrides, message):
    from vpop import cli

    cfg = _compose("+experiment=mosunetuzumab_iv_vs_sc", "draws=2", *overrides)
    with pytest.raises(ConfigError) as err:
        cli.plan(cfg)
    assert message in str(err.value)


def test_model_and_solver_numbers_are_overridden_from_the_command_line():
    """The model is a Hydra group of the trial app: any model or solver number can be set (or swept
    with -m) from the command line and reaches every arm; a calibrated one a posterior draw would set
    again is refused, naming it."""
    from vpop import cli

    base = cli.plan(_compose("+experiment=mosunetuzumab_iv_vs_sc", "posterior=none")).prepared[0]["iv"].inputs
    mine = cli.plan(_compose("+experiment=mosunetuzumab_iv_vs_sc", "posterior=none", "model.cytokines.k_el_il6_per_day=40",
                             "model.solver.max_step_days=0.25")).prepared[0]["iv"].inputs
    assert float(mine.typical.cytokines.k_el_il6_per_day) == 40.0 != float(base.typical.cytokines.k_el_il6_per_day)
    assert np.count_nonzero(np.asarray(mine.schedule.steps.dt)) > np.count_nonzero(np.asarray(base.schedule.steps.dt))
    calibrated = _compose("+experiment=mosunetuzumab_iv_vs_sc", "draws=2", "model.cytokines.priming_margin.nominal=0.5")
    with pytest.raises(ConfigError, match=r"model.cytokines.priming_margin: calibrated.*posterior=none"):
        cli.plan(calibrated)
    p = cli.plan(_compose("+experiment=mosunetuzumab_iv_vs_sc", "posterior=none", "model.cytokines.priming_margin.nominal=0.5"))
    assert float(p.prepared[0]["iv"].inputs.typical.cytokines.priming_margin) == 0.5
    with pytest.raises(ConfigError, match=r"model.cytokines.k_el_il6_per_dy: no such model number; did you mean 'model.cytokines.k_el_il6_per_day'\?"):
        cli.plan(_compose("+experiment=mosunetuzumab_iv_vs_sc", "posterior=none", "+model.cytokines.k_el_il6_per_dy=40"))


def test_experiment_files_may_add_their_own_top_level_keys():
    from vpop import cli

    cfg = _compose("+experiment=stepup_grid", "posterior=none", "step_up.dose1_mg=0.5")
    p = cli.plan(cfg, experiment_keys=["experiment", "step_up"])
    assert p.prepared[0]["candidate"].compiled.periods[0].amount == 0.5
    with pytest.raises(ConfigError, match="unknown key 'step_up'"):
        cli.plan(cfg)  # a key no experiment file defines is a typo


def test_shipped_experiments_are_valid():
    """Every shipped experiment composes through Hydra as `vpop-trial +experiment=NAME` does and passes
    the whole plan (keys, arms, regimens, posterior draws, objective), without simulating."""
    from vpop import catalogue, cli

    for name in catalogue.available("experiment"):
        p = cli.plan(_compose(f"+experiment={name}", "draws=2"), cli.experiment_keys(name))
        assert p.reference_arm in p.arms and len(p.prepared) == 2, name
        for by_arm in p.prepared:
            for prepared in by_arm.values():
                assert prepared.compiled.periods and prepared.compiled.assessment_days, name


def test_arms_padded_to_a_shared_shape_give_the_same_patients():
    """share_compilation pads arms of similar grid length to one shape (padding steps, dose periods
    and assessments; random effects on the union of parameters, omega 0 where an arm has none), so
    a trial compiles one kernel for them; every patient's results must be those of the arm alone
    (mosunetuzumab and glofitamab: other grid lengths, dose counts and random-effect parameters)."""
    from vpop.simulate import dispatch_ids, share_compilation

    arms = {a.name: prepare_arm(a, horizon_days=days) for a, days in ((POSTERIOR_ARMS[0], 21), (POSTERIOR_ARMS[2], 35))}
    shared = share_compilation(arms, growth=10.0)
    shapes = {(p.inputs.schedule.steps.dt.shape, p.inputs.schedule.period_start_day.shape, p.variability_paths) for p in shared.values()}
    assert len(shapes) == 1 and len({p.inputs.schedule.steps.dt.shape for p in arms.values()}) > 1
    for name in arms:
        alone, padded = (dispatch_ids(p, np.arange(12), seed=4).result() for p in (arms[name], shared[name]))
        assert padded.reductions.keys() == alone.reductions.keys()
        for key, value in alone.reductions.items():
            np.testing.assert_array_equal(padded.reductions[key], value, err_msg=f"{name} {key}")
        np.testing.assert_array_equal(padded.period_start_day, alone.period_start_day)
    separate = share_compilation(arms, growth=1.0)  # no two arms this different share a shape
    assert all(separate[n].inputs.schedule.steps.dt.shape == arms[n].inputs.schedule.steps.dt.shape for n in arms)
