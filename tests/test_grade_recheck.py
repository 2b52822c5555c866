"""The grade recheck (`model.solver.recheck_margin`): a patient whose CRS grades came close to a
threshold is simulated again on a 4x finer grid in the same run and keeps that result; every other
patient is untouched, and the grades move towards the converged ones."""

import numpy as np
import pytest
from omegaconf import OmegaConf

from vpop import catalogue, endpoints
from vpop.catalogue import ConfigError
from vpop.simulate import RECHECK_MIN_BATCH, Arm, prepare_arm, recheck_batch, refined_grid, simulate_arm
from vpop.trial.table import patient_table

# Split step-up doses: the label regimen whose grades the default grid flips most often (grid_error.md).
ARM = Arm("odron", "odronextamab", "iv", "dlbcl_rr", "odronextamab_dlbcl", "dexamethasone_10mg_cycle1")
N, HORIZON_DAYS = 160, 42
RESCUE_OFF = {"model.crs.rescue": 0}


def _model(**solver):
    return OmegaConf.merge(catalogue.load("model", "default"), {"solver": solver})


@pytest.fixture(scope="module")
def runs():
    base = _model()
    fine = OmegaConf.merge(base, {"solver": refined_grid(base.solver, 4)})
    out = {}
    for name, model in (("default", base), ("recheck", _model(recheck_margin=0.05)), ("fine", fine)):
        prepared = prepare_arm(ARM, model, horizon_days=HORIZON_DAYS, overrides=RESCUE_OFF)
        result = simulate_arm(prepared, N, seed=0, chunk_size=N)
        out[name] = result.reductions
        out[name + " table"] = patient_table(prepared, result, draw=0)
    return out


def test_only_patients_near_a_threshold_are_rechecked_and_they_get_the_fine_grids_result(runs):
    default, recheck, fine = runs["default"], runs["recheck"], runs["fine"]
    flagged = recheck["grid_rechecked"] > 0
    margin = endpoints.grade_margin(default["crs_index_peak"], default["crs_index_at_dose"], default["crs_log_susceptibility"])
    np.testing.assert_array_equal(flagged, margin < 0.05)
    assert 0 < flagged.sum() < N / 2
    for key in ("crs_grade", "crs_max_grade", "peak_il6_signalling_pg_ml", "malignant_fraction_at"):
        np.testing.assert_array_equal(recheck[key][~flagged], default[key][~flagged])
        np.testing.assert_allclose(recheck[key][flagged], fine[key][flagged], rtol=1e-5)
    # the patient table says whose grades come from the recheck's grid (and has no such column without one)
    np.testing.assert_array_equal(runs["recheck table"]["grid_rechecked"], flagged)
    assert "grid_rechecked" not in runs["default table"]


def test_the_recheck_brings_the_grades_closer_to_the_fine_grids(runs):
    def differing(run):  # patients with any dose's CRS grade unlike the fine grid's
        return int((run["crs_grade"] != runs["fine"]["crs_grade"]).any(axis=1).sum())

    assert differing(runs["default"]) >= 3  # the default grid flips some grades at this size
    assert 3 * differing(runs["recheck"]) <= differing(runs["default"])  # measured: 7 -> 1 patients


@pytest.mark.parametrize("settings, field", [({"recheck_margin": 0}, "recheck_margin"), ({"recheck_margin": "tight"}, "recheck_margin"),
                                             ({"recheck_margin": True}, "recheck_margin"),
                                             ({"recheck_margin": 0.05, "recheck_refine": 1}, "recheck_refine")])
def test_a_bad_recheck_setting_is_refused_naming_the_field(settings, field):
    with pytest.raises(ConfigError, match=f"model.solver.{field} must be"):
        prepare_arm(ARM, _model(**settings), horizon_days=HORIZON_DAYS)


def test_a_recheck_batch_holds_its_patients_with_at_most_a_fifth_of_padding():
    sizes = [recheck_batch(n) for n in range(1, 5000)]
    assert all(s >= n for n, s in zip(range(1, 5000), sizes))
    assert all((s - n) / s <= 0.2 for n, s in zip(range(RECHECK_MIN_BATCH + 1, 5000), sizes[RECHECK_MIN_BATCH:]))
    assert len(set(sizes[1000:2000])) <= 5  # few sizes, so few compilations
