"""Bad input gets an error that names the field and the allowed values."""

import pytest
from conftest import doses
from omegaconf import OmegaConf

from vpop import catalogue, regimen
from vpop.catalogue import ConfigError
from vpop.simulate import Arm, prepare_arm, simulate_arm

GOOD = doses((1, 1, 1, "mg"), cycle_days=21)


def _error(**arm):
    spec = dict(name="a", drug="mosunetuzumab", route="iv", population="fl_rr", regimen=GOOD)
    spec.update(arm)
    with pytest.raises(ConfigError) as err:
        prepare_arm(Arm(**spec))
    return str(err.value)


def test_unknown_drug_lists_the_catalogue():
    msg = _error(drug="rituximab")
    assert "drug" in msg and "unknown drug 'rituximab'" in msg
    assert "mosunetuzumab" in msg and "teclistamab" in msg


def test_route_the_drug_has_no_parameters_for():
    msg = _error(drug="glofitamab", route="sc")
    assert "route" in msg and "no parameters for route 'sc'" in msg and "allowed: iv" in msg


def test_unknown_route():
    assert "allowed: iv, sc, civ, oral" in _error(route="intrathecal")


@pytest.mark.parametrize("amount", [0, -5])
def test_zero_or_negative_dose(amount):
    msg = _error(regimen=doses((1, 1, amount, "mg"), cycle_days=21))
    assert "regimen.doses[0].amount must be a positive number" in msg


def test_dose_day_outside_the_cycle():
    msg = _error(regimen=doses((1, 22, 1, "mg"), cycle_days=21))
    assert "regimen.doses[0].day must be a day within the cycle, 1-21" in msg


def test_dose_cycle_outside_the_regimen():
    msg = _error(regimen=doses((3, 1, 1, "mg"), cycle_days=21, cycles=2))
    assert "doses[0].cycle: 3 is outside the allowed 1-2" in msg


def test_unknown_unit_lists_units():
    msg = _error(regimen=doses((1, 1, 1, "tablespoons"), cycle_days=21))
    assert "unknown unit 'tablespoons'" in msg and "mg/kg" in msg and "ug/m2/day" in msg


def test_unknown_population():
    msg = _error(population="martians")
    assert "unknown population 'martians'" in msg and "fl_rr" in msg


def test_unknown_regimen_key():
    reg = dict(GOOD, cycle_length=21)
    assert "unknown key(s) ['cycle_length']" in _error(regimen=reg)


def test_infusion_past_end_of_cycle():
    reg = doses((1, 20, 28, "ug/day", {"duration_days": 7}), cycle_days=21)
    msg = _error(drug="blinatumomab", route="civ", population="b_all_rr", regimen=reg)
    assert "runs past the end of cycle 1" in msg


@pytest.mark.parametrize("n", [0, -1, 2.5])
def test_non_positive_population_size(n):
    prepared = prepare_arm(Arm("a", "mosunetuzumab", "iv", "fl_rr", GOOD), horizon_days=7)
    with pytest.raises(ConfigError, match="population.n must be a positive whole number"):
        simulate_arm(prepared, n)


def test_named_regimens_of_the_catalogue_compile():
    for name, drug, route in [
        ("mosunetuzumab_fl_iv", "mosunetuzumab", "iv"),
        ("mosunetuzumab_fl_sc", "mosunetuzumab", "sc"),
        ("glofitamab_dlbcl", "glofitamab", "iv"),
        ("epcoritamab_dlbcl", "epcoritamab", "sc"),
        ("epcoritamab_fl", "epcoritamab", "sc"),
        ("odronextamab_dlbcl", "odronextamab", "iv"),
        ("odronextamab_fl", "odronextamab", "iv"),
        ("blinatumomab_all", "blinatumomab", "civ"),
        ("blinatumomab_dlbcl", "blinatumomab", "civ"),
        ("teclistamab_mm", "teclistamab", "sc"),
    ]:
        compiled = regimen.compile_arm(name, drug, route, population_assessment_every_days=42.0)
        assert compiled.periods, name


@pytest.mark.parametrize("dose, message", [
    ({"amout": 1}, r"regimen.doses\[0\]: unknown key\(s\) \['amout'\]; did you mean 'amount'\? allowed: day, amount, unit"),
    ({"day": "monday"}, r"regimen.doses\[0\].day must be a number, got 'monday'"),
    ({"amount": True}, r"regimen.doses\[0\].amount must be a number, got True"),
    ({"cycles": 2.5, "cycle": None}, r"regimen.doses\[0\].cycles must be a whole number or text, got 2.5"),
])
def test_a_dose_is_read_against_its_schema(dose, message):
    """Every block (arm, regimen, dose, premedication, prophylaxis, objective) is checked by one
    schema reader: unknown keys with the nearest allowed one, then missing keys, then kinds of value."""
    base = {"cycle": 1, "day": 1, "amount": 1, "unit": "mg"}
    entry = {k: v for k, v in {**base, **dose}.items() if v is not None}
    if "amout" in dose:
        del entry["amount"]
    with pytest.raises(ConfigError, match=message):
        prepare_arm(Arm("a", "mosunetuzumab", "iv", "fl_rr", {"cycle_days": 21, "cycles": 3, "doses": [entry]}))


def test_premedication_and_prophylaxis_blocks_name_their_fields():
    premed = {"drug": "dexamethasone", "amount": 20, "unit": "mg", "hours_before": 1, "administration": "1-3"}
    msg = _error(premedication=premed)
    assert "arms.a.premedication: unknown key(s) ['administration']; did you mean 'administrations'?" in msg
    toci = {"drug": "tocilizumab", "amount": 8, "unit": "mg/kg", "hours_before": 4, "before_dose": "first"}
    assert "arms.a.prophylaxis.before_dose must be a whole number, got 'first'" in _error(prophylaxis=toci)


def test_a_population_variability_entry_for_the_crs_susceptibility_is_refused(tmp_path, monkeypatch):
    """The susceptibility's spread is the model's `crs.susceptibility_sd` (calibrated) since it left the
    populations: a user's population that still gives it as a variability entry is refused before any
    work, naming the entry and what to set instead (rather than drawing a second random effect on top)."""
    from omegaconf import OmegaConf

    from vpop import catalogue

    old = catalogue.load("population", "fl_rr")
    assert "crs.susceptibility" not in old.variability
    old.variability["crs.susceptibility"] = 0.8
    (tmp_path / "population").mkdir()
    (tmp_path / "population" / "fl_rr_old.yaml").write_text(OmegaConf.to_yaml(old))
    monkeypatch.setattr(catalogue, "_user_dirs", [tmp_path.resolve(), *catalogue._user_dirs])
    msg = _error(population="fl_rr_old")
    assert "population/fl_rr_old.variability.crs.susceptibility" in msg and "model.crs.susceptibility_sd" in msg


def test_crs_switches_take_0_or_1_and_holds_are_not_exported(tmp_path):
    """`model.crs.rescue` and `hold_until_resolved` are switches: another value is refused naming the
    field; the SBML export refuses dose holds (its regimen is timed events) and tocilizumab for a lasting
    fever (`rescue_grade1_hours`, hours >= 0) before writing anything, and the calibration refuses the latter."""
    from vpop import calibration, export

    arm = Arm("a", "mosunetuzumab", "iv", "fl_rr", GOOD)
    with pytest.raises(ConfigError, match=r"model.crs.hold_until_resolved must be 0 \(off\) or 1 \(on\), got 2"):
        prepare_arm(arm, overrides={"model.crs.hold_until_resolved": 2.0})
    held = prepare_arm(arm, overrides={"model.crs.hold_until_resolved": 1.0})
    with pytest.raises(ConfigError, match="model.crs.hold_until_resolved: dose holds for CRS are not exported"):
        export.write_arm(held, "typical", 0, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"model.crs.rescue_grade1_hours must be a number of hours >= 0 \(0: off\), got -1"):
        prepare_arm(arm, overrides={"model.crs.rescue_grade1_hours": -1.0})
    lasting = prepare_arm(arm, overrides={"model.crs.rescue_grade1_hours": 24.0})
    with pytest.raises(ConfigError, match="model.crs.rescue_grade1_hours: tocilizumab for a lasting fever is not exported"):
        export.write_arm(lasting, "typical", 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model = catalogue.load("model", "default")
    model.crs.rescue_grade1_hours = 24
    cfg = OmegaConf.create({"targets": "targets", "only_targets": ["T03"], "horizon_days": 14, "patients_per_cohort": 2, "seed": 0,
                            "prior_truncation_sd": 3.0, "parameters": ["model.crs.grade1_pg_ml"]})
    with pytest.raises(ConfigError, match="model.crs.rescue_grade1_hours: the calibration's expectation"):
        calibration.build_problem(cfg, model=model)
