"""Pharmacokinetics against closed forms and conservation of drug mass."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import doses, patient

from vpop.model import pk, reference, solver


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
    fine = reference.refine(schedule, 4)
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
