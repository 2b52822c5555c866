"""Regimen compilation: what a written regimen expands to (days, amounts, caps, co-medications), the
solver's time grid, and the errors of what a regimen leaves unsaid. Host-side only: nothing compiles."""

import numpy as np
import pytest
from conftest import doses
from omegaconf import OmegaConf

from vpop import catalogue, parameters, regimen
from vpop.catalogue import ConfigError


def _compile(reg, premedication=None, prophylaxis=None, drug="mosunetuzumab", route="iv", **kw):
    kw.setdefault("population_assessment_every_days", 42.0)
    return regimen.compile_arm(reg, drug, route, premedication, prophylaxis, **kw)


def _days(admins, role="bispecific"):
    return [round(a.day, 6) for a in admins if a.role == role]


def test_a_cycle_range_gives_one_dose_per_cycle_on_its_day():
    reg = {"cycle_days": 21, "cycles": 8, "doses": [{"cycle": 1, "day": 1, "amount": 1, "unit": "mg"},
                                                   {"cycles": "3-5,8", "day": 2, "amount": 30, "unit": "mg"}]}
    periods = _compile(reg).periods
    assert [a.cycle for a in periods] == [1, 3, 4, 5, 8]
    # day k of cycle c is (c - 1) x cycle_days + (k - 1) days from cycle 1 day 1
    assert [a.day for a in periods] == [0.0, 43.0, 64.0, 85.0, 148.0]
    assert [a.label for a in periods] == ["C1D1 1 mg", *(f"C{c}D2 30 mg" for c in (3, 4, 5, 8))]


def test_a_then_block_continues_cycles_and_days_with_its_own_cycle_length():
    reg = {"cycle_days": 21, "cycles": 2, "doses": [{"cycles": "1-2", "day": 1, "amount": 60, "unit": "mg"}],
           "then": {"cycle_days": 14, "cycles": 3, "doses": [{"cycles": "3-5", "day": 8, "amount": 30, "unit": "mg"}]}}
    compiled = _compile(reg)
    assert [a.cycle for a in compiled.periods] == [1, 2, 3, 4, 5]
    assert [a.day for a in compiled.periods] == [0.0, 21.0, 42 + 7.0, 56 + 7.0, 70 + 7.0]
    assert compiled.horizon_day == 2 * 21 + 3 * 14
    with pytest.raises(ConfigError, match=r"regimen.then.doses\[0\].cycles: 2 is outside the allowed 3-5"):
        _compile({**reg, "then": {**reg["then"], "doses": [{"cycles": "2-3", "day": 1, "amount": 30, "unit": "mg"}]}})


def test_an_hour_moves_the_dose_within_its_day():
    compiled = _compile(doses((1, 1, 1, "mg"), (1, 2, 2, "mg", {"hour": 18}), cycle_days=21))
    late = compiled.periods[1]
    assert late.day == pytest.approx(1.0 + 18 / 24) and late.cycle_day == 2 and late.hour == 18


def test_weight_and_bsa_doses_scale_and_max_mg_caps_them():
    capped = {"max_mg": 100, "infusion_hours": 0}
    compiled = _compile(doses((1, 1, 1, "mg/kg", capped), (1, 8, 2, "mg/m2"), (1, 15, 500, "ug"), cycle_days=21))
    per_kg, per_m2, flat = compiled.periods
    assert per_kg.mg_for(70.0, 1.8) == pytest.approx(70.0)
    assert per_kg.mg_for(130.0, 2.4) == pytest.approx(100.0)  # 130 mg capped at max_mg
    assert per_m2.mg_for(70.0, 1.8) == pytest.approx(3.6) and per_m2.mg_for(100.0, 2.2) == pytest.approx(4.4)
    assert flat.mg_for(50.0, 1.5) == pytest.approx(0.5)
    # The cap reaches the solver: the bolus channel of that dose carries it.
    schedule = regimen.build_schedule(compiled, catalogue.load("model", "default").solver)
    caps = np.asarray(schedule.steps.bolus_cap_mg)
    assert np.isclose(caps, 100.0).sum() == 1
    # An infused dose cannot be capped (the solver caps boluses): refused rather than ignored.
    with pytest.raises(ConfigError, match=r"doses\[0\].max_mg: a cap applies to a bolus only; this dose is infused over 4 h"):
        _compile(doses((1, 1, 1, "mg/kg", {"max_mg": 100}), cycle_days=21))


def test_premedication_selects_administrations_and_cycles_and_repeats_days_after():
    reg = doses((1, 1, 1, "mg"), (1, 8, 2, "mg"), (1, 15, 60, "mg"), (2, 1, 60, "mg"), (3, 1, 30, "mg"), cycle_days=21, cycles=3)
    premed = {"drug": "dexamethasone", "amount": 20, "unit": "mg", "hours_before": 1, "administrations": "2-4",
              "cycles": "1-2", "days_after": [1, 2]}
    compiled = _compile(reg, premedication=premed)
    before = 1 / 24
    expected = sorted(d + off for d in (7.0, 14.0, 21.0) for off in (-before, 1.0, 2.0))
    assert _days(compiled.administrations, "premedication") == [round(x, 6) for x in expected]
    first = next(a for a in compiled.administrations if a.role == "premedication")
    assert (first.cycle, first.cycle_day, first.hour) == (1, 8, -1.0)  # 1 h before C1D8 is C1D8 at hour -1


@pytest.mark.parametrize("reg", ["odronextamab_dlbcl", "odronextamab_fl"])
def test_odronextamab_premedication_covers_the_split_doses_and_the_first_two_full_doses(reg):
    """Its label premedicates "each dose in Cycle 1 and Cycle 2, Days 1 and 8": the first full dose
    (C2D1) went without dexamethasone until 0.20.0, and in the model that dose then started most of
    the excess CRS once the effect compartment wanes within a day."""
    compiled = _compile(OmegaConf.to_container(catalogue.load("regimen", reg)),
                        OmegaConf.to_container(catalogue.load("premedication", "odronextamab_dexamethasone")),
                        drug="odronextamab")
    doses_days = _days(compiled.administrations)
    first_eight = [a for a in compiled.administrations if a.role == "bispecific"][:8]
    assert [(a.cycle, a.cycle_day) for a in first_eight][-2:] == [(2, 1), (2, 8)]
    assert _days(compiled.administrations, "premedication") == [round(d - 1 / 24, 6) for d in doses_days[:8]]


def test_prophylaxis_precedes_the_named_dose_and_is_capped():
    reg = doses((1, 1, 0.06, "mg/kg"), (1, 3, 0.3, "mg/kg"), (1, 5, 1.5, "mg/kg"), cycle_days=7)
    toci = {"drug": "tocilizumab", "amount": 8, "unit": "mg/kg", "max_mg": 800, "before_dose": 2, "hours_before": 4}
    compiled = _compile(reg, prophylaxis=toci, drug="teclistamab", route="sc")
    (dose,) = [a for a in compiled.administrations if a.role == "prophylaxis"]
    assert dose.day == pytest.approx(2.0 - 4 / 24) and dose.mg_for(120.0, 2.3) == 800.0
    with pytest.raises(ConfigError, match="before_dose must be an administration number 1-3, got 4"):
        _compile(reg, prophylaxis={**toci, "before_dose": 4}, drug="teclistamab", route="sc")


TECLISTAMAB = doses((1, 1, 0.06, "mg/kg"), (1, 4, 0.3, "mg/kg"), (1, 7, 1.5, "mg/kg"), (2, 7, 1.5, "mg/kg"),
                   (3, 7, 1.5, "mg/kg"), (4, 7, 1.5, "mg/kg"), cycle_days=7, cycles=4)  # days 0, 3, 6, 13, 20, 27
STEP_UP_PREMEDICATION = {"drug": "dexamethasone", "amount": 16, "unit": "mg", "hours_before": 2, "administrations": "1-3"}


def test_a_delay_resumes_the_schedule_later_with_its_spacing():
    """Held after the 4th dose (day 13) for 8 weeks: the 5th dose comes 56 days after the 4th, the 6th
    a week after it, and the default horizon grows by as much as the last dose moved."""
    plain = _compile(TECLISTAMAB, drug="teclistamab", route="sc")
    held = _compile(TECLISTAMAB, drug="teclistamab", route="sc", delay={"after_dose": 4, "days": 56})
    assert _days(held.periods) == [0.0, 3.0, 6.0, 13.0, 69.0, 76.0]
    assert [a.dose_number for a in held.periods] == [1, 2, 3, 4, 5, 6]
    assert held.restart_period == 4 and plain.restart_period is None
    assert held.horizon_day == plain.horizon_day + (76.0 - 27.0)
    assert held.periods[4].label == "restart day 70 1.5 mg/kg (dose 5)"


def test_a_restart_repeats_the_step_up_with_its_premedication():
    """Restarting at step-up dose 2 (the label's rule after a 29-56 day delay) gives 0.3 mg/kg, then
    1.5 mg/kg 3 days later, each premedicated as the first time; doses after the first treatment dose
    are not premedicated, the first time or after the restart."""
    held = _compile(TECLISTAMAB, STEP_UP_PREMEDICATION, drug="teclistamab", route="sc",
                    delay={"after_dose": 6, "days": 42, "restart_from": 2})
    assert _days(held.periods) == [0.0, 3.0, 6.0, 13.0, 20.0, 27.0, 69.0, 72.0, 79.0, 86.0, 93.0]
    assert [a.amount for a in held.periods[6:]] == [0.3, 1.5, 1.5, 1.5, 1.5]
    assert [a.dose_number for a in held.periods[6:]] == [2, 3, 4, 5, 6]
    two_hours = 2 / 24
    assert _days(held.administrations, "premedication") == [round(d - two_hours, 6) for d in (0.0, 3.0, 6.0, 69.0, 72.0)]


@pytest.mark.parametrize("delay, message", [
    ({"after_dose": 7, "days": 28}, r"arm.delay.after_dose must be an administration number 1-6, got 7"),
    ({"after_dose": 3, "days": 28, "restart_from": 5}, r"arm.delay.restart_from must be an administration number 1-4"),
    ({"after_dose": 3, "days": 0}, r"arm.delay.days must be a positive number of days from dose 3 to the restart, got 0"),
    ({"after_dose": 3, "days": 28, "restart": 1}, r"arm.delay: unknown key\(s\) \['restart'\]; did you mean 'restart_from'"),
])
def test_a_delay_that_cannot_be_given_is_refused(delay, message):
    with pytest.raises(ConfigError, match=message):
        _compile(TECLISTAMAB, drug="teclistamab", route="sc", delay=delay)


@pytest.mark.parametrize("field", ["premedication", "prophylaxis"])
def test_a_co_medication_without_its_timing_is_refused(field):
    spec = ({"drug": "dexamethasone", "amount": 20, "unit": "mg"} if field == "premedication"
            else {"drug": "tocilizumab", "amount": 8, "unit": "mg/kg", "before_dose": 1})
    with pytest.raises(ConfigError, match=rf"arm.{field}.hours_before is missing"):
        _compile(doses((1, 1, 1, "mg"), cycle_days=21), **{field: spec})


def test_assessment_days_come_from_the_run_the_regimen_or_the_population():
    reg = doses((1, 1, 1, "mg"), cycle_days=21, cycles=4)  # 84 days
    assert _compile(reg).assessment_days == [42.0, 84.0]  # the population's interval
    assert _compile({**reg, "assessment_every_days": 28}).assessment_days == [28.0, 56.0, 84.0]  # the regimen's
    assert _compile({**reg, "assessment_every_days": 28}, assessment_every_days=30).assessment_days == [30.0, 60.0, 84.0]
    with pytest.raises(ConfigError, match="no response assessment interval"):
        _compile(reg, population_assessment_every_days=None)


def test_every_shipped_population_says_how_often_response_is_assessed(tmp_path, monkeypatch):
    from vpop import population

    for name in catalogue.available("population"):
        assert population.load(name).response.assessment_every_days > 0, name
    bad = catalogue.load("population", "fl_rr")
    del bad.response["assessment_every_days"]
    (tmp_path / "population").mkdir()
    (tmp_path / "population" / "nowhen.yaml").write_text(OmegaConf.to_yaml(bad))
    monkeypatch.setattr(catalogue, "_user_dirs", [tmp_path.resolve(), *catalogue._user_dirs])
    with pytest.raises(ConfigError, match="population/nowhen.response.assessment_every_days must be a positive number"):
        population.load("nowhen")


def test_a_pk_covariate_exponent_needs_its_reference_value(monkeypatch):
    mosun = parameters.load_drug("mosunetuzumab")
    cov = parameters.pk_covariates("mosunetuzumab")
    assert cov.reference_weight_kg == 78.0 and cov.cl_weight_exponent == pytest.approx(0.549)
    assert cov.cl_bsa_exponent == 0.0  # absent: no effect, whatever the (unused) BSA reference
    broken = mosun.copy()
    del broken.covariates["reference_weight_kg"]
    monkeypatch.setattr(parameters, "load_drug", lambda name, *a: broken)
    with pytest.raises(ConfigError, match="drug/mosunetuzumab.covariates.reference_weight_kg is missing: cl_weight_exponent"):
        parameters.pk_covariates("mosunetuzumab")


def test_time_grid_resolves_every_dose_and_coarsens_between_them():
    solver = catalogue.load("model", "default").solver
    events, anchors, horizon = [0.0, 7.0, 7.5], [3.3, 42.0], 60.0
    grid = regimen.time_grid(events, anchors, 0.0, horizon, solver)
    steps = np.diff(grid)
    assert grid[0] == 0.0 and grid[-1] == horizon and np.all(steps > 0)
    for t in [*events, *anchors]:
        assert np.min(np.abs(grid - t)) < 1e-9, t  # doses, infusion ends and assessments are grid points
    first = float(solver.first_step_hours) / 24
    for t in events:  # the step after a dose starts small
        assert steps[np.argmin(np.abs(grid - t))] == pytest.approx(first)
    since = np.asarray([min((s - e for e in events if e <= s + 1e-12), default=np.inf) for s in grid[:-1]])
    inside = since < float(solver.fine_window_days)
    assert steps[inside].max() <= float(solver.fine_max_step_days) + 1e-9  # fine for days after a dose
    assert steps.max() <= float(solver.max_step_days) + 1e-9
    assert steps[~inside].max() == pytest.approx(float(solver.max_step_days))  # and coarse between doses


def test_every_dose_starts_a_step_of_its_own_period_when_premedication_precedes_it():
    """Teclistamab's step-up doses come 2 h after dexamethasone: the steps growing from the premedication
    land 0.3 min short of the dose, and that point, not the dose's, must give way (before 0.9.0 the dose
    fell inside a step of the previous period, so no CRS index was recorded at the dose and a running
    episode counted as new CRS after it)."""
    from vpop.simulate import Arm, prepare_arm

    prepared = prepare_arm(Arm("t", "teclistamab", "sc", "mm_rr", "teclistamab_mm", premedication="dexamethasone_16mg_step_up"))
    s = prepared.inputs.schedule
    t_start, period = np.asarray(s.steps.t_start), np.asarray(s.steps.period)
    for k, day in enumerate(np.asarray(s.period_start_day)):
        assert np.any((np.abs(t_start - day) < 1e-6) & (period == k)), f"dose {k + 1} (day {day}) starts no step"
    dt = np.asarray(s.steps.dt)
    assert dt[dt > 0].min() >= regimen.MIN_STEP_DAYS
