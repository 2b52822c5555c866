"""The error-controlled time grid (`model.solver.error_tolerance`): regridding keeps every dose,
infusion and assessment, the refined grid is closer to a fine reference than the default one, and
every posterior draw of an arm shares it."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import doses
from omegaconf import OmegaConf

from vpop import catalogue
from vpop.catalogue import ConfigError
from vpop.model import solver
from vpop.simulate import Arm, common_shape, prepare_arm, simulate_arm


def _numpy(steps):
    s = jax.tree_util.tree_map(np.asarray, steps)
    return jax.tree_util.tree_map(lambda x: x[s.dt > 0], s)


def _inputs(steps):
    """Per channel: total bolus, and total infused (rate x dt), for each of the three dose units."""
    s = _numpy(steps)
    bolus = [getattr(s, f).sum(axis=0) for f in ("bolus_mg", "bolus_mg_per_kg", "bolus_mg_per_m2")]
    infused = [(getattr(s, f) * s.dt[:, None]).sum(axis=0) for f in ("rate_mg_per_day", "rate_mg_per_day_per_kg", "rate_mg_per_day_per_m2")]
    return np.concatenate(bolus + infused)


def _check_same_course(before, after):
    a, b = _numpy(before.steps), _numpy(after.steps)
    np.testing.assert_allclose(b.t_start[1:], (b.t_start + b.dt)[:-1], atol=1e-5)  # contiguous (float32 days)
    assert b.t_start[0] == a.t_start[0] and b.t_start[-1] + b.dt[-1] == pytest.approx(a.t_start[-1] + a.dt[-1], abs=1e-5)
    np.testing.assert_allclose(_inputs(after.steps), _inputs(before.steps), rtol=1e-5)  # float32 step lengths
    # each assessment still ends the step that ends at its day, and each step keeps its dose period
    np.testing.assert_allclose((b.t_start + b.dt)[b.assessment >= 0], (a.t_start + a.dt)[a.assessment >= 0], atol=1e-5)
    assert list(b.assessment[b.assessment >= 0]) == list(a.assessment[a.assessment >= 0])
    mid = b.t_start + b.dt / 2
    np.testing.assert_array_equal(b.period, a.period[np.searchsorted(a.t_start, mid) - 1])


def test_splitting_and_joining_steps_keeps_every_dose_infusion_and_assessment():
    """Blinatumomab's continuous infusion (rate steps) with premedication boluses and assessments."""
    prepared = prepare_arm(Arm("b", "blinatumomab", "civ", "b_all_rr", "blinatumomab_all", "dexamethasone_20mg_each_step"),
                           horizon_days=84)
    schedule = prepared.inputs.schedule
    k = int(schedule.steps.dt.shape[0])
    split = np.random.default_rng(0).integers(1, 5, k)
    _check_same_course(schedule, solver.refine(schedule, split))
    can = solver.mergeable(schedule)
    assert 0.3 * k < can.sum() < k  # most steps can join, not those before a dose or ending in an assessment
    pair = can & ~np.concatenate([[False], can[:-1]])  # non-overlapping pairs
    merged = solver.merge(schedule, pair)
    _check_same_course(schedule, merged)
    assert len(merged.steps.dt) == int((np.asarray(schedule.steps.dt) > 0).sum()) - int(pair.sum())


def test_refined_grid_is_closer_to_a_fine_reference_and_shared_by_every_draw():
    reg = doses((1, 1, 1, "mg"), (1, 8, 2, "mg"), cycle_days=21)  # mosunetuzumab IV, 2 h and 4 h infusions
    arm = Arm("m", "mosunetuzumab", "iv", "fl_rr", reg, "dexamethasone_20mg")
    base = OmegaConf.merge(catalogue.load("model", "default"), {"crs": {"rescue": 0}})
    refined_model = OmegaConf.merge(base, {"solver": {"error_tolerance": 0.01}})
    default = prepare_arm(arm, base, horizon_days=14)
    refined = prepare_arm(arm, refined_model, horizon_days=14)
    draw = prepare_arm(arm, refined_model, horizon_days=14, overrides={"model.cytokines.priming_margin": 0.3})
    assert draw.inputs.schedule is refined.inputs.schedule  # a draw's parameters do not move the grid
    d_steps, r_steps = _numpy(default.inputs.schedule.steps), _numpy(refined.inputs.schedule.steps)
    bolus = r_steps.t_start[np.any(r_steps.bolus_mg > 0, axis=1)]  # doses, premedication included, still start steps
    np.testing.assert_allclose(bolus, d_steps.t_start[np.any(d_steps.bolus_mg > 0, axis=1)])
    assert len(r_steps.dt) > len(d_steps.dt)

    fine = solver.refine(default.inputs.schedule, 16)
    fine = fine._replace(steps=jax.tree_util.tree_map(jnp.asarray, fine.steps))
    reference = replace(default, inputs=default.inputs._replace(schedule=fine))

    def peaks(prepared):
        return np.asarray(simulate_arm(prepared, 12, seed=3, chunk_size=12).reductions["peak_il6_signalling_pg_ml"])

    ref = peaks(reference)
    keep = ref > 3.0
    # The default grid padded to the refined one's length (padding steps change no state): one kernel.
    err_default = np.abs(np.log(peaks(common_shape([default, refined])[0])[keep] / ref[keep]))
    err_refined = np.abs(np.log(peaks(refined)[keep] / ref[keep]))
    assert keep.sum() >= 10
    # Three corrector passes (0.17.0) left the default grid 3x closer than two did, so the refined grid
    # gains less at the median (0.0047 against 0.0098 here; two passes: under 0.3x).
    assert np.median(err_refined) < 0.6 * np.median(err_default)
    assert err_refined.mean() < 0.6 * err_default.mean()
    # At the 0.24.0 nominals the default grid's worst period here is 0.044 and the refined grid's 0.038
    # (0.23.0's: 0.085 and 0.038): the worst case only has to get no worse.
    assert err_refined.max() <= err_default.max()


@pytest.mark.parametrize("value", [0, 1.5, "fine"])
def test_a_bad_error_tolerance_is_refused_naming_the_field(value):
    model = OmegaConf.merge(catalogue.load("model", "default"), {"solver": {"error_tolerance": value}})
    with pytest.raises(ConfigError, match="model.solver.error_tolerance must be null or a number in"):
        prepare_arm(Arm("m", "mosunetuzumab", "iv", "fl_rr", "mosunetuzumab_fl_iv"), model)
