"""Pharmacokinetics against closed forms, conservation of drug mass and published exposure."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import doses, patient

from vpop import catalogue, parameters, targets
from vpop.model import pk, solver
from vpop.simulate import Arm, _patient_params, cohort_covariates, prepare_arm


def _conc_course(p, schedule):
    _, traj = solver.simulate_patient(p, schedule, trajectory=True)
    t_end = np.asarray(schedule.steps.t_start + schedule.steps.dt)
    return t_end, traj


def test_iv_bolus_matches_two_compartment_closed_form():
    reg = doses((1, 1, 10, "mg", {"infusion_hours": 0}), cycle_days=42)
    p, schedule, _ = patient("glofitamab", "iv", "dlbcl_rr", reg)
    t, traj = _conc_course(p, schedule)
    c = np.asarray(pk.total_concentration(traj.drugs.bispecific, p.bispecific_pk))

    q = p.bispecific_pk
    k10, k12, k21 = float(q.cl_l_per_day / q.v1_l), float(q.q_l_per_day / q.v1_l), float(q.q_l_per_day / q.v2_l)
    s, prod = k10 + k12 + k21, k10 * k21
    alpha, beta = (s + np.sqrt(s * s - 4 * prod)) / 2, (s - np.sqrt(s * s - 4 * prod)) / 2
    c0 = 10.0 / float(q.v1_l)
    exact = c0 * ((alpha - k21) * np.exp(-alpha * t) + (k21 - beta) * np.exp(-beta * t)) / (alpha - beta)

    keep = (np.asarray(schedule.steps.dt) > 0) & (exact > 0.01 * c0)
    rel = np.abs(c[keep] - exact[keep]) / exact[keep]
    assert rel.max() < 5e-3, rel.max()  # 2 drug sub-steps on 0.5-day steps: ~0.2% drift over 6 weeks


def test_sc_auc_equals_bioavailable_dose_over_clearance():
    reg = doses((1, 1, 1.0, "mg/kg"), cycle_days=300)
    p, schedule, _ = patient("teclistamab", "sc", "mm_rr", reg)
    # Constant clearance, so that AUC = F * dose / CL holds exactly.
    p = p._replace(bispecific_pk=p.bispecific_pk._replace(cl_decay_l_per_day=jnp.zeros(())))
    red = solver.simulate_patient(p, schedule)
    auc = float(np.sum(red.auc_ng_day_ml))  # ng*day/mL
    dose_mg = float(p.patient.weight_kg) * 1.0
    expected = float(p.bispecific_pk.bioavailability) * dose_mg / float(p.bispecific_pk.cl_l_per_day) * 1000.0
    assert abs(auc / expected - 1.0) < 0.01


def _mass_balance_error(drug, route, population, reg):
    p, schedule, prepared = patient(drug, route, population, reg)
    fine = solver.refine(schedule, 4)
    fine = fine._replace(steps=jax.tree_util.tree_map(jnp.asarray, fine.steps))
    _, traj = solver.simulate_patient(p, fine, trajectory=True)
    t = np.concatenate([[float(fine.steps.t_start[0])], np.asarray(fine.steps.t_start + fine.steps.dt)])
    a = traj.drugs.bispecific
    amounts = np.asarray(a.depot + a.central + a.peripheral)
    since_first = t[1:] - float(p.first_dose_day)
    rate = np.asarray(jax.vmap(lambda d, c, pp, s: pk.elimination_rate(pk.DrugAmounts(d, c, pp), p.bispecific_pk, s))(
        a.depot, a.central, a.peripheral, jnp.asarray(since_first)))
    rate = np.concatenate([[0.0], rate])
    eliminated = np.concatenate([[0.0], np.cumsum(0.5 * np.diff(t) * (rate[1:] + rate[:-1]))])
    f = float(p.bispecific_pk.bioavailability) if route == "sc" else 1.0
    given = f * sum(adm.amount for adm in prepared.compiled.periods)  # all doses in mg here
    return np.abs(amounts + eliminated[1:] - given)[-1] / given, np.max(np.abs(amounts + eliminated[1:])) / given


def test_drug_mass_balance_with_time_varying_clearance():
    reg = doses((1, 1, 1, "mg"), (1, 8, 2, "mg"), (1, 15, 60, "mg"), cycle_days=42)
    end_error, worst = _mass_balance_error("mosunetuzumab", "iv", "fl_rr", reg)
    assert end_error < 0.01
    assert worst < 1.01


def test_drug_mass_balance_with_target_mediated_disposition():
    reg = doses((1, 1, 0.16, "mg"), (1, 8, 0.8, "mg"), (1, 15, 48, "mg"), cycle_days=42)
    end_error, worst = _mass_balance_error("epcoritamab", "sc", "dlbcl_rr", reg)
    assert end_error < 0.01
    assert worst < 1.01


def test_rates_have_finite_derivatives_before_a_drug_is_given():
    """Calibration differentiates through every drug's PK, including drugs still at zero (tocilizumab
    before a rescue): the loss rate's derivative there must be finite, else one infusion starting
    within a step turned the whole log-density gradient into NaN (the 0.15.0 CI failure)."""
    reg = doses((1, 1, 60, "mg"), cycle_days=7)
    p, _, _ = patient("mosunetuzumab", "iv", "fl_rr", reg)
    zero = pk.DrugAmounts(*(jnp.zeros(()),) * 3)
    for q in (p.tocilizumab_pk, p.bispecific_pk, p.dexamethasone_pk):
        grad = jax.grad(lambda a, q=q: jnp.sum(jnp.stack(pk.rates(a, q, jnp.asarray(1.0))[1])))(zero)
        assert all(np.isfinite(float(g)) for g in grad), grad
    # An infusion into an empty compartment over a step: the amount at its end is differentiable in the
    # rate, with the derivative of a first-order loss L over h, (1 - e^{-Lh}) / L.
    h = 0.5
    _, loss = pk.rates(zero, p.tocilizumab_pk, jnp.asarray(1.0))

    def end_amount(rate):
        prod, loss = pk.rates(zero, p.tocilizumab_pk, jnp.asarray(1.0))
        return solver._predict(h, zero.central, prod.central + rate, loss.central)
    lh = float(loss.central) * h
    assert float(jax.grad(end_amount)(jnp.asarray(100.0))) == pytest.approx(h * -np.expm1(-lh) / lh, rel=1e-4)


# --- The engagers added in 0.11.0, against their published exposure -----------------------------

def _typical_course(drug, route, population, reg, weight_kg):
    """(days, total ng/mL) of the typical patient of a drug's PK model at a given weight, on a grid
    refined 4x (so a peak is resolved within ~0.01 day)."""
    p, schedule, prepared = patient(drug, route, population, reg)
    p = p._replace(bispecific_pk=prepared.inputs.typical.bispecific_pk,
                   patient=p.patient._replace(weight_kg=jnp.asarray(weight_kg, p.patient.weight_kg.dtype)))
    fine = solver.refine(schedule, 4)
    fine = fine._replace(steps=jax.tree_util.tree_map(jnp.asarray, fine.steps))
    _, traj = solver.simulate_patient(p, fine, trajectory=True)
    t = np.asarray(fine.steps.t_start + fine.steps.dt)
    return t, 1000.0 * np.asarray(pk.total_concentration(traj.drugs.bispecific, p.bispecific_pk))


def test_tarlatamab_matches_the_label_exposure():
    """Q and Vp come from the published t1/2 and the label's Vss, not from concentrations, so the
    label's geometric means (vpop/data/exposure.csv) test them: Cmax of the first 10 mg dose, and Cmax
    and Ctrough at steady state (10 mg every 2 weeks). Measured: 2,926, 3,425, 556 against 2,900, 3,400, 495."""
    published = targets.exposure().typical
    reg = doses((1, 1, 1, "mg"), (1, 8, 10, "mg"), (1, 15, 10, "mg"), (2, 1, 10, "mg"), (2, 15, 10, "mg"),
                (3, 1, 10, "mg"), cycle_days=28, cycles=3)
    t, c = _typical_course("tarlatamab", "iv", "sclc_2l", reg, 73.0)
    between = lambda a, b: (t >= a) & (t < b)  # noqa: E731
    assert abs(c[between(7, 8)].max() / published["tarlatamab_cmax_first_10mg"] - 1) < 0.1
    assert abs(c[between(42, 43)].max() / published["tarlatamab_cmax_ss"] - 1) < 0.1
    assert abs(c[between(55.9, 56)].max() / published["tarlatamab_ctrough_ss"] - 1) < 0.2


def test_tebentafusp_matches_the_label_exposure():
    """One compartment from the label's CL and V: Cmax after 68 ug within the label's range, and a
    week's AUC after it equal to dose / CL (no accumulation at t1/2 ~20 h)."""
    cmax = targets.exposure().loc["tebentafusp_cmax_68ug"]
    reg = doses((1, 1, 20, "ug"), (2, 1, 30, "ug"), (3, 1, 68, "ug"), cycle_days=7, cycles=4)
    t, c = _typical_course("tebentafusp", "iv", "um_metastatic", reg, 78.0)
    week3 = (t >= 14) & (t <= 21)
    assert cmax.low <= c[week3].max() <= cmax.high
    p = catalogue.load("drug", "tebentafusp")
    auc_ng_day_ml = np.trapezoid(c[week3], t[week3])
    assert abs(auc_ng_day_ml / (68.0 / float(p.pk.cl_l_per_day)) - 1) < 0.02


def test_talquetamab_reproduces_the_label_exposure_it_was_fitted_to():
    """The apparent one-compartment model was fitted outside vpop (experiments/pk/talquetamab_label_fit.py)
    to the label's Cmax and AUCtau after the 1st and 7th weekly 0.4 mg/kg dose (as geometric means);
    vpop's solver must reproduce that fit (-9%, -2%, +16%, -7%), within 20%. A check of the
    implementation, not of the model."""
    published = targets.exposure().typical
    steps = [(1, 1, 0.01, "mg/kg"), (1, 4, 0.06, "mg/kg")] + [(c, 7, 0.4, "mg/kg") for c in range(1, 8)]
    t, c = _typical_course("talquetamab", "sc", "mm_rr", doses(*steps, cycle_days=7, cycles=8), 74.0)
    for start, dose in ((6, "dose1"), (48, "dose7")):
        w = (t >= start) & (t <= start + 7.001)
        assert abs(c[w].max() / published[f"talquetamab_cmax_{dose}"] - 1) < 0.2
        auc_ng_h_ml = 24.0 * np.trapezoid(c[w], t[w])
        assert abs(auc_ng_h_ml / published[f"talquetamab_auc_{dose}"] - 1) < 0.2


def test_elranatamab_free_peak_after_the_first_step_up_dose_matches_the_population():
    """Hibma 2026 (vpop/data/exposure.csv): geometric mean free elranatamab peak after the 12 mg step-up
    dose 212 ng/mL (CV 90%); the day-4 trough is that peak. vpop's model (the paper's PK with sBCMA
    binding as quasi-steady-state TMDD, women's lower clearance, the paper's IIV) over 300 virtual MM
    patients: within 20% (measured 232 ng/mL over 400 patients)."""
    prepared = prepare_arm(Arm("elranatamab", "elranatamab", "sc", "mm_rr", doses((1, 1, 12, "mg"), (1, 4, 32, "mg"))))
    ids = jnp.arange(300)
    cov = cohort_covariates(prepared.inputs.covariate_params, ids, jnp.asarray(0), prepared.covariate_kinds)
    schedule = prepared.inputs.schedule
    t = np.asarray(schedule.steps.t_start + schedule.steps.dt)
    first_interval = jnp.asarray((t > 0) & (t <= 3.0))

    def free_peak(i, c):
        p = _patient_params(prepared.inputs, c, i, jnp.asarray(0), prepared.variability_paths)
        _, traj = solver.simulate_patient(p, schedule, trajectory=True)
        free = 1000.0 * pk.free_concentration(traj.drugs.bispecific, p.bispecific_pk)
        return jnp.max(jnp.where(first_interval, free, 0.0))

    peaks = np.asarray(jax.jit(jax.vmap(free_peak))(ids, cov))
    published = targets.exposure().typical["elranatamab_free_peak_12mg"]
    assert abs(np.exp(np.mean(np.log(peaks))) / published - 1) < 0.2


def test_female_clearance_factor_lowers_clearance_in_women_only():
    cov = parameters.pk_covariates("elranatamab")
    p = pk.PKParams(*(jnp.asarray(1.0) for _ in pk.PKParams._fields))
    men = parameters.apply_pk_covariates(p, cov, jnp.asarray(71.45), jnp.asarray(1.8), jnp.asarray(0.0))
    women = parameters.apply_pk_covariates(p, cov, jnp.asarray(71.45), jnp.asarray(1.8), jnp.asarray(1.0))
    assert float(men.cl_l_per_day) == 1.0
    assert abs(float(women.cl_l_per_day) - 0.508) < 1e-6
    assert float(women.v1_l) == float(men.v1_l)
