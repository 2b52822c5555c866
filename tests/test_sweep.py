"""Sweeps: a grid multirun through the submitit local launcher, the Optuna objective, launcher configs."""

import importlib.util
import os
import subprocess
import sys

import pandas as pd
import pytest

from vpop import sweep
from vpop.catalogue import ConfigError

SPEC = {"minimise": "crs_grade2plus", "arm": "candidate", "no_worse_than": "orr", "margin_pp": 5}


def _cli(*args, cwd, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "vpop.cli", *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_grid_sweep_through_submitit_local_gathers_every_job(tmp_path):
    sweep_dir = tmp_path / "sweep"
    run = _cli("-m", "hydra/launcher=submitit_local", "+experiment=stepup_grid", "step_up.dose1_mg=0.5,2",
               "population.n=30", "posterior=none", "draws=1", "horizon_days=21", "trajectories=0",
               f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (sweep_dir / "0" / "summary.csv").is_file() and (sweep_dir / "1" / "summary.csv").is_file()

    s = pd.read_csv(sweep_dir / "sweep_summary.csv")
    assert list(s.columns) == ["job", "step_up.dose1_mg", "arm", "endpoint", "estimate", "lower", "upper", "n"]
    assert set(s.job) == {0, 1}
    assert dict(s.groupby("job")["step_up.dose1_mg"].first()) == {0: 0.5, 1: 2}
    cand = s[s.arm == "candidate"]
    assert cand.estimate.between(0, 100).all()
    assert ((cand.lower <= cand.estimate) & (cand.estimate <= cand.upper)).all()
    # The same patients in both jobs, so a larger step-up dose 1 can only add CRS after dose 1.
    after_dose1 = cand.set_index(["step_up.dose1_mg", "endpoint"]).estimate
    for endpoint in ("crs_any_dose1", "crs_grade2plus_dose1"):
        assert after_dose1[(2, endpoint)] >= after_dose1[(0.5, endpoint)]

    jobs = pd.read_csv(sweep_dir / "sweep_jobs.csv")
    assert list(jobs.status) == ["ok", "ok"] and jobs.overrides.str.contains("step_up.dose1_mg=").all()
    assert (sweep_dir / "sweep_main_endpoints.png").stat().st_size > 10_000


def test_gather_lists_jobs_without_summary_as_missing(tmp_path, caplog):
    for job, dose in (("0", "0.5"), ("1", "2")):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- +experiment=stepup_grid\n- step_up.dose1_mg={dose}\n")
    summary(arms={"approved": (60, 20), "candidate": (58, 10)}).to_csv(tmp_path / "0" / "summary.csv", index=False)
    (tmp_path / ".submitit" / "1" / ".hydra").mkdir(parents=True)  # submitit's folder is never a job
    (tmp_path / ".submitit" / "1" / ".hydra" / "overrides.yaml").write_text("[]\n")
    with caplog.at_level("WARNING", logger="vpop.sweep"):
        written = sweep.write_sweep_outputs(tmp_path)
    assert [p.name for p in written] == ["sweep_summary.csv", "sweep_jobs.csv", "sweep_main_endpoints.png"]
    jobs = pd.read_csv(tmp_path / "sweep_jobs.csv")
    assert list(jobs.job) == [0, 1] and list(jobs.status) == ["ok", "missing"]
    assert "step_up.dose1_mg=2" in caplog.text
    s = pd.read_csv(tmp_path / "sweep_summary.csv")
    assert set(s.job) == {0} and "experiment" not in s.columns  # only keys that differ become columns


def summary(arms):
    """A summary.csv-shaped table: {arm: (orr %, crs_grade2plus %)}."""
    rows = []
    for arm, (orr, crs2) in arms.items():
        rows += [{"arm": arm, "endpoint": "orr", "estimate": orr, "lower": orr - 5, "upper": orr + 5, "n": 100},
                 {"arm": arm, "endpoint": "crs_grade2plus", "estimate": crs2, "lower": crs2 - 4, "upper": crs2 + 4, "n": 100}]
    return pd.DataFrame(rows)


def test_objective_is_the_rate_when_feasible_and_ranks_infeasible_designs_last():
    reference = {"approved": (60, 20)}
    feasible_high_crs = sweep.objective(summary({**reference, "candidate": (56, 95)}), SPEC, "approved")
    feasible_low_crs = sweep.objective(summary({**reference, "candidate": (70, 5)}), SPEC, "approved")
    infeasible_low_crs = sweep.objective(summary({**reference, "candidate": (54, 0)}), SPEC, "approved")
    far_infeasible = sweep.objective(summary({**reference, "candidate": (30, 0)}), SPEC, "approved")
    assert feasible_low_crs == 5 and feasible_high_crs == 95  # within the 5 pp margin: no penalty
    assert infeasible_low_crs == pytest.approx(0 + 100 + 1)  # 1 pp below 60 - 5
    assert feasible_low_crs < feasible_high_crs < infeasible_low_crs < far_infeasible


def test_objective_spec_takes_the_reference_arm_from_the_experiment():
    experiment = {"reference_arm": "approved", "arms": {"approved": {}, "candidate": {}}}
    spec = sweep.objective_spec(SPEC, experiment)
    assert spec["reference_arm"] == "approved"
    assert sweep.objective(summary({"approved": (60, 20), "candidate": (60, 12)}), spec) == 12


@pytest.mark.parametrize("change, message", [
    ({"arm": "cand"}, "objective.arm 'cand' is not an arm; allowed: approved, candidate"),
    ({"arm": "approved"}, "objective.arm 'approved' is the reference arm it is compared with; allowed: candidate"),
    ({"minimise": "crs3"}, "objective.minimise 'crs3' is not an endpoint; allowed: crs_grade2plus, orr"),
    ({"no_worse_than": "pfs"}, "objective.no_worse_than 'pfs' is not an endpoint; allowed: crs_grade2plus, orr"),
    ({"margin_pp": -1}, "objective.margin_pp must be a number of percentage points >= 0"),
    ({"margin_pp": None}, "objective.margin_pp is missing"),
    ({"maximise": "orr"}, "objective: unknown key(s) ['maximise']; did you mean 'minimise'? allowed: minimise, arm, no_worse_than, margin_pp, reference_arm"),
])
def test_objective_errors_name_the_field_and_allowed_values(change, message):
    with pytest.raises(ConfigError) as err:
        sweep.objective(summary({"approved": (60, 20), "candidate": (60, 12)}), {**SPEC, **change}, "approved")
    assert message in str(err.value)


def test_objective_spec_checks_arms_before_simulating():
    with pytest.raises(ConfigError, match="objective.arm 'cand' is not an arm; allowed: approved, candidate"):
        sweep.objective_spec({**SPEC, "arm": "cand"}, {"arms": {"approved": {}, "candidate": {}}})


def test_slurm_launcher_config_composes_without_submitting(tmp_path):
    run = _cli("hydra/launcher=vpop_slurm", "+experiment=stepup_grid", "hydra.launcher.partition=gpu",
               "hydra.launcher.account=lab", "--cfg", "hydra", cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in out
    for line in ("gpus_per_node: 1", "tasks_per_node: 1", "partition: gpu", "account: lab",
                 "- export XLA_PYTHON_CLIENT_PREALLOCATE=false", "_target_: vpop.sweep.GatherSweep"):
        assert line in out, line
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
                    reason="needs the optuna extra (hydra-optuna-sweeper)")
def test_optuna_experiment_composes_with_its_sweeper_and_objective(tmp_path):
    run = _cli("+experiment=optimise_stepup", "--cfg", "all", cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    for line in ("_target_: hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", "direction: minimize",
                 "step_up.dose1_mg: choice(", "minimise: crs_grade2plus", "no_worse_than: orr"):
        assert line in run.stdout, line
