"""Mechanistic behaviour the model must show, on paired virtual patients (nominal parameters, which
configs/ sets to the shipped calibration's posterior medians)."""

import jax
import numpy as np
import pytest
from conftest import doses

from vpop.model import pk, solver, system
from vpop.simulate import Arm, common_shape, prepare_arm, simulate_arm, simulate_trajectories
from vpop.trial import patient_table

N = 300
MOSUNETUZUMAB_C1_C2 = doses((1, 1, 1, "mg"), (1, 8, 2, "mg"), (1, 15, 60, "mg"), (2, 1, 60, "mg"), cycle_days=21, cycles=2)


def _run(*arms, n=N, horizon=None, seed=3):
    """Reductions of the same patients in each arm (one dict per arm; a single dict for one arm).
    The arms are padded to one shape (`common_shape`, as the trial runner does), so one compiled
    kernel serves them all."""
    prepared = common_shape([prepare_arm(arm, horizon_days=horizon) for arm in arms])
    out = [simulate_arm(p, n, seed=seed, chunk_size=n).reductions for p in prepared]
    return out[0] if len(out) == 1 else out


def _starts(red, k):
    """Share of patients whose CRS starts after administration k (0-based)."""
    return float(np.mean(red["crs_grade"][:, k] >= 1))


# Posteriors from 0.13.0 to 0.28 missed this at their medians (a strict expected failure until
# 0.29.0): in follicular lymphoma the second 60 mg, a week after the first, still started 6.3% new CRS
# without premedication (label: < 3% per repeated full dose). 0.29.0's posterior, fitted under the
# secretion delay, meets it.
def test_a_repeated_full_dose_gives_little_new_crs():
    """60 mg on C1D15 and again on C2D1: the second meets T cells primed by the first (labels: < 3%
    new CRS per repeated full dose), although drug, targets and T cells are all still there."""
    red = _run(Arm("mosun", "mosunetuzumab", "iv", "fl_rr", MOSUNETUZUMAB_C1_C2))
    assert _starts(red, 2) > 0.1
    assert _starts(red, 3) < 0.05
    first, repeat = red["peak_il6_signalling_pg_ml"][:, 2], red["peak_il6_signalling_pg_ml"][:, 3]
    responders = first > 3 * 1.47  # an IL-6 response to the first 60 mg at all (baseline 1.47 pg/mL)
    assert responders.sum() > 30 and np.median(repeat[responders] / first[responders]) < 0.5
    assert np.median(red["cmax_ng_ml"][:, 3] / red["cmax_ng_ml"][:, 2]) > 1.0  # not for want of drug


def test_three_weekly_doses_of_a_short_lived_drug_give_little_new_crs():
    """Glofitamab (t1/2 ~ 1 week) falls between its 3-weekly 30 mg doses, so engagement in a tumour
    rises again at each dose to about the level met before: only a rise beyond the primed level by its
    margin releases (label: CRS ~3% at C3D1 and later, after 55/34/28% at the first three doses)."""
    red = _run(Arm("glofit", "glofitamab", "iv", "dlbcl_rr", "glofitamab_dlbcl", "glofitamab_glucocorticoid"),
               n=200, horizon=84)  # periods: glofitamab 2.5 / 10 / 30 / 30 / 30 mg (C1D8 ... C4D1)
    assert _starts(red, 0) > 0.1
    assert max(_starts(red, 3), _starts(red, 4)) < 0.05  # C3D1, C4D1


def test_a_restart_after_a_long_gap_primes_again():
    """Mosunetuzumab's step-up and two 60 mg doses, then treatment held and resumed with 60 mg 3 weeks
    or ~6 months after the last dose (a `delay`): the primed level is forgotten off drug (tau_P ~
    months), so CRS returns at the late restart; the patient table counts it as CRS after the restart."""
    hold = lambda days: dict(after_dose=4, days=days, restart_from=4)  # noqa: E731 - the 60 mg given again
    soon, late = common_shape([prepare_arm(Arm("soon", "mosunetuzumab", "iv", "fl_rr", MOSUNETUZUMAB_C1_C2, delay=hold(21))),
                               prepare_arm(Arm("late", "mosunetuzumab", "iv", "fl_rr", MOSUNETUZUMAB_C1_C2, delay=hold(180)))])
    assert soon.compiled.restart_period == late.compiled.restart_period == 4
    r_soon, r_late = (simulate_arm(p, 200, seed=3, chunk_size=200) for p in (soon, late))
    for k in range(4):  # the same patients and the same doses before the hold
        assert _starts(r_soon.reductions, k) == pytest.approx(_starts(r_late.reductions, k))
    assert _starts(r_late.reductions, 4) > 2 * _starts(r_soon.reductions, 4) + 0.02
    assert _starts(r_late.reductions, 4) > 0.3 * _starts(r_late.reductions, 2)  # vs the first 60 mg
    table = patient_table(late, r_late, draw=0)
    assert table.crs_any_after_restart.mean() == pytest.approx(_starts(r_late.reductions, 4))


def test_cytokines_follow_new_engagement_not_the_activated_pool():
    """A week after the second 60 mg dose activated T cells are still far above baseline and drug is
    on board, but few are newly engaged: IL-6 signalling is back near baseline."""
    prepared = prepare_arm(Arm("mosun", "mosunetuzumab", "iv", "fl_rr", MOSUNETUZUMAB_C1_C2), horizon_days=42)
    times, states, params = simulate_trajectories(prepared, np.arange(40), seed=3)
    expand = jax.tree_util.tree_map(lambda x: np.asarray(x)[:, None], params)
    obs = system.observe(states, expand)
    day = np.searchsorted(times, 28.0)  # C2D1 is day 21
    active = np.asarray(states.host.cells.t_active.total())
    assert np.median(active[:, day] / np.maximum(active[:, 1], 1e-9)) > 10
    assert np.median(np.asarray(obs.bispecific_ng_ml)[:, day]) > 1000
    assert np.median(np.asarray(obs.il6_signalling_pg_ml)[:, day]) < 2 * 1.47


def test_tocilizumab_prophylaxis_removes_most_grade_2_but_leaves_some_grade_1():
    base, toci = _run(Arm("none", "teclistamab", "sc", "mm_rr", "teclistamab_mm", "dexamethasone_16mg_step_up"),
                      Arm("toci", "teclistamab", "sc", "mm_rr", "teclistamab_mm", "dexamethasone_16mg_step_up",
                          "tocilizumab_before_dose1"), horizon=21)
    any_base, any_toci = np.mean(base["crs_max_grade"] >= 1), np.mean(toci["crs_max_grade"] >= 1)
    g2_base, g2_toci = np.mean(base["crs_max_grade"] >= 2), np.mean(toci["crs_max_grade"] >= 2)
    assert g2_base > 0.08 and g2_toci < 0.25 * g2_base
    # Fever from IL-1b/TNF-a remains: the published prophylaxis cohorts keep 10-19% with CRS against
    # 72% without (MajesTEC-1), a ratio of 0.14-0.27.
    assert any_toci > 0.1 * any_base
    assert np.mean(toci["crs_max_grade"][toci["crs_max_grade"] >= 1] == 1) > 0.8


def test_dexamethasone_acts_longer_than_its_plasma_half_life():
    reg = doses((1, 1, 1, "mg"), cycle_days=7)
    prepared = prepare_arm(Arm("dex", "mosunetuzumab", "iv", "fl_rr", reg, premedication="dexamethasone_20mg"))
    times, states, params = simulate_trajectories(prepared, np.arange(2))
    plasma = np.asarray(states.drugs.dexamethasone.central)[0]
    effect = np.asarray(states.host.supportive.dexamethasone_effect_nm)[0]
    day1 = np.searchsorted(times, 1.0)  # ~25 h after the dose (given 1 h before day 0)
    assert plasma[day1] < 0.05 * plasma.max()  # plasma t1/2 ~4 h: gone
    assert effect[day1] > 0.6 * effect.max()  # effect site t1/2 ~45 h: mostly still there


def test_dexamethasone_onset_rate_builds_the_effect_within_hours_and_keeps_its_slow_offset():
    """With `dexamethasone_onset_per_day` the effect site fills at that rate while plasma is above it and
    empties at k_e0 as before: premedication given 1 h before a dose acts at the dose, and still lasts."""
    reg = doses((1, 1, 1, "mg"), cycle_days=7)
    arm = Arm("dex", "mosunetuzumab", "iv", "fl_rr", reg, premedication="dexamethasone_20mg")
    effects = []
    for onset in (0.0, 24.0):  # 0: k_e0 both ways (the shipped model); 24/day: t1/2 ~40 min
        prepared = prepare_arm(arm, horizon_days=3, overrides={"model.supportive.dexamethasone_onset_per_day": onset})
        times, states, _ = simulate_trajectories(prepared, np.arange(1))
        effects.append(np.asarray(states.host.supportive.dexamethasone_effect_nm)[0])
        plasma = np.asarray(states.drugs.dexamethasone.central)[0]
    slow, fast = effects
    at_dose = np.searchsorted(times, 0.0)  # the bispecific's first dose, 1 h after dexamethasone
    day1 = np.searchsorted(times, 1.0)
    assert fast[at_dose] > 10 * slow[at_dose]
    assert fast[day1] > 0.6 * fast.max()  # wanes at k_e0 (t1/2 ~45 h) as before
    assert np.all(np.diff(fast[day1:]) <= 1e-6 * fast.max())  # plasma gone: only waning from here
    assert plasma[day1] < 0.05 * plasma.max()


def test_step_up_lowers_il6_signalling_peak_at_first_60_mg():
    step = doses((1, 1, 1, "mg"), (1, 8, 2, "mg"), (1, 15, 60, "mg"), cycle_days=21)
    flat = doses((1, 15, 60, "mg"), cycle_days=21)
    r_step, r_flat = _run(Arm("step", "mosunetuzumab", "iv", "fl_rr", step), Arm("flat", "mosunetuzumab", "iv", "fl_rr", flat))
    baseline = 1.47  # pg/mL (configs/model/default.yaml)
    excess_step = r_step["peak_il6_signalling_pg_ml"][:, 2] - baseline  # third administration, 60 mg
    excess_flat = r_flat["peak_il6_signalling_pg_ml"][:, 0] - baseline
    responders = excess_flat > 5.0  # patients with an IL-6 response to 60 mg at all
    assert responders.sum() > 50
    assert np.median(excess_step[responders] / excess_flat[responders]) < 0.8
    assert np.mean(excess_step[responders] < excess_flat[responders]) > 0.75
    # ... and fewer patients have CRS after the first 60 mg.
    assert np.mean(r_step["crs_grade"][:, 2] >= 1) < np.mean(r_flat["crs_grade"][:, 0] >= 1)


def test_sc_gives_lower_later_cmax_than_the_same_iv_dose():
    reg = doses((1, 1, 45, "mg"), cycle_days=21)
    iv = prepare_arm(Arm("iv", "mosunetuzumab", "iv", "fl_rr", reg))
    sc = prepare_arm(Arm("sc", "mosunetuzumab", "sc", "fl_rr", reg))
    ids = np.arange(20)
    t_iv, s_iv, p_iv = simulate_trajectories(iv, ids)
    t_sc, s_sc, p_sc = simulate_trajectories(sc, ids)
    c_iv = np.asarray(pk.free_concentration(s_iv.drugs.bispecific, _expand(p_iv.bispecific_pk)))
    c_sc = np.asarray(pk.free_concentration(s_sc.drugs.bispecific, _expand(p_sc.bispecific_pk)))
    assert np.all(c_sc.max(axis=1) < 0.7 * c_iv.max(axis=1))
    assert np.all(t_sc[c_sc.argmax(axis=1)] > t_iv[c_iv.argmax(axis=1)] + 1.0)


def _expand(tree):
    """Patient-level parameters broadcast against [n, K] trajectories."""
    import jax

    return jax.tree_util.tree_map(lambda x: np.asarray(x)[:, None], tree)


def test_tocilizumab_blunts_il6_signalling_while_serum_il6_rises():
    base, toci = _run(Arm("none", "teclistamab", "sc", "mm_rr", "teclistamab_mm"),
                      Arm("toci", "teclistamab", "sc", "mm_rr", "teclistamab_mm", prophylaxis="tocilizumab_before_dose1"), horizon=21)
    first = slice(0, 1)
    assert np.median(toci["peak_il6_signalling_pg_ml"][:, first] / base["peak_il6_signalling_pg_ml"][:, first]) < 0.2
    assert np.median(toci["peak_il6_serum_pg_ml"][:, first] / base["peak_il6_serum_pg_ml"][:, first]) > 1.5


def test_dexamethasone_lowers_cytokine_peaks_but_barely_tumour_kill():
    reg = "mosunetuzumab_fl_iv"
    base, dex = _run(Arm("none", "mosunetuzumab", "iv", "fl_rr", reg),
                     Arm("dex", "mosunetuzumab", "iv", "fl_rr", reg, premedication="dexamethasone_20mg"), horizon=63)
    ratio = dex["peak_il6_signalling_pg_ml"][:, 2] / base["peak_il6_signalling_pg_ml"][:, 2]
    assert np.median(ratio) < 0.9
    # Tumour burden after 9 weeks: the same in paired patients to within a few percent of baseline.
    change = dex["malignant_fraction_at"][:, -1] - base["malignant_fraction_at"][:, -1]
    assert np.median(np.abs(change)) < 0.03


def test_blinatumomab_28_ug_per_day_reaches_label_steady_state():
    arm = Arm("blin", "blinatumomab", "civ", "b_all_rr", "blinatumomab_all")
    r = _run(arm, n=2000, horizon=28)
    css_pg_ml = 1000.0 * r["cmax_ng_ml"][:, 1]  # period 2: 28 ug/day from day 8
    # Blincyto label: mean Css 616 (SD 537) pg/mL at 28 ug/day.
    assert css_pg_ml.mean() == pytest.approx(616, rel=0.15)


@pytest.fixture(scope="module")
def mosunetuzumab_63_days():
    """The label's mosunetuzumab IV regimen with premedication over 9 weeks: 1,000 patients' reductions
    and the first 25 patients' time courses (the same patients: seed 11)."""
    arm = Arm("a", "mosunetuzumab", "iv", "fl_rr", "mosunetuzumab_fl_iv", premedication="dexamethasone_20mg")
    prepared = prepare_arm(arm, horizon_days=63)
    red = simulate_arm(prepared, 1000, seed=11, chunk_size=1000).reductions
    return prepared, red, simulate_trajectories(prepared, np.arange(25), seed=11)


def test_outputs_finite_and_states_non_negative_for_random_patients(mosunetuzumab_63_days):
    _, red, (_, states, _) = mosunetuzumab_63_days
    for name, value in red.items():
        assert np.all(np.isfinite(value)), name
    import jax

    leaves = jax.tree_util.tree_leaves(states)
    assert all(np.all(np.asarray(x) >= 0) for x in leaves)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)


def test_reductions_match_trajectory(mosunetuzumab_63_days):
    prepared, red, (times, states, params) = mosunetuzumab_63_days
    obs = solver.system.observe(states, _expand(params))
    start = prepared.compiled.periods[2].day
    end = prepared.compiled.periods[3].day
    window = (times > start) & (times <= end + 1e-9)
    assert np.allclose(np.asarray(obs.il6_signalling_pg_ml)[:, window].max(axis=1), red["peak_il6_signalling_pg_ml"][:25, 2], rtol=1e-5)


def test_the_refractory_clone_escapes_killing_and_regrows():
    """Epcoritamab weekly in follicular lymphoma kills the susceptible clone deeply, but each patient's
    refractory share (drawn logit-normal) is neither engaged nor killed: it follows its own logistic
    growth exactly, so the burden never falls below it and a patient whose share has outgrown the CR
    bar cannot reach CR at any exposure."""
    arm = Arm("epco", "epcoritamab", "sc", "fl_rr", "epcoritamab_fl", premedication="epcoritamab_corticosteroid")
    prepared = prepare_arm(arm, horizon_days=168)  # the shipped calibration: median share 0.24%, logit SD 5.7
    assert 1e-4 < float(prepared.inputs.typical.malignant.refractory_fraction) < 0.05
    times, states, params = simulate_trajectories(prepared, np.arange(40), seed=3)
    p = _expand(params)
    obs = system.observe(states, p)
    f = np.asarray(params.malignant.refractory_fraction)
    assert f.min() < 1e-3 < 0.05 < f.max()  # the shares differ between patients
    m0 = np.asarray(params.body.malignant_baseline.total())[:, None]
    k = np.asarray(params.malignant.k_growth_per_day)[:, None]
    r0, cap = f[:, None] * m0, f[:, None] * m0 * np.asarray(params.malignant.capacity_fold)[:, None]
    growth = np.exp(k * (times - times[0])[None, :])
    logistic = cap * r0 * growth / (cap + r0 * (growth - 1.0))
    assert np.allclose(np.asarray(states.host.cells.refractory), logistic, rtol=2e-3)
    burden = np.asarray(obs.malignant_total) / m0
    susceptible = np.asarray(states.host.cells.malignant.total()) / m0
    assert np.median(susceptible[:, -1]) < 1e-3  # the drug clears the susceptible clone ...
    assert np.all(burden >= logistic / m0 * (1 - 1e-4))  # ... never the refractory one
    late = f * np.exp(np.asarray(params.malignant.k_growth_per_day) * 140) > 0.2  # outgrew any response bar
    assert late.any() and np.all(burden[late, -1] > 0.2)


def test_tebentafusp_releases_cytokines_from_skin_melanocytes_whatever_the_metastases_size():
    """gp100 sits on skin melanocytes as well as on the liver metastases (Hassel 2024: the rash is T
    cells recruited to them). That pool does not scale with the tumour, so tebentafusp's first-dose
    release no longer rests on the metastases' size: patients with the smallest metastases react
    (IMCgp100-202: CRS in 89%), where without the melanocytes few of them would."""
    arm = Arm("teb", "tebentafusp", "iv", "um_metastatic", "tebentafusp_um")
    with_skin = prepare_arm(arm, horizon_days=28)
    assert float(with_skin.inputs.typical.engagement.normal_tissue_targets) > 0.0
    without = prepare_arm(arm, horizon_days=28, overrides={"drug.tebentafusp.engagement.normal_tissue_targets": 0.0})
    runs = [simulate_arm(p, 200, seed=3, chunk_size=200) for p in common_shape([with_skin, without])]
    volume = runs[0].covariates["tumour_volume_ml"]
    small = volume < np.quantile(volume, 0.25)
    peak, peak0 = (r.reductions["peak_il6_signalling_pg_ml"][:, 0] for r in runs)
    assert np.median(peak[small] / peak0[small]) > 3.0
    crs, crs0 = (r.reductions["crs_grade"][:, 0] >= 1 for r in runs)
    assert crs[small].mean() > 0.7 and crs0[small].mean() < 0.5
    log_v = np.log(volume)  # the release follows the tumour less
    assert np.corrcoef(log_v, np.log(peak))[0, 1] < np.corrcoef(log_v, np.log(peak0))[0, 1] - 0.2


def test_a_susceptibility_drawn_anew_at_each_dose_spreads_crs_over_more_patients():
    """With part of the CRS susceptibility drawn anew at each administration (`crs.occasion_share`),
    teclistamab's step-up doses each start about as much CRS (each period's susceptibility keeps its
    spread) but in less overlapping patients, so more patients have CRS at all (MajesTEC-1: 42 / 36 /
    25% after the three step-up doses and 72% overall, where one susceptibility for the course gives
    ~60%). The repeated full doses still start almost none."""
    arm = Arm("tec", "teclistamab", "sc", "mm_rr", "teclistamab_mm", "dexamethasone_16mg_step_up")
    runs = [simulate_arm(p, N, seed=3, chunk_size=N).reductions for p in common_shape(
        [prepare_arm(arm, horizon_days=56, overrides={"model.crs.occasion_share": share}) for share in (0.0, 0.6)])]
    once, by_dose = ((r["crs_grade"] >= 1) for r in runs)
    assert by_dose.any(axis=1).mean() > once.any(axis=1).mean() + 0.04
    assert abs(by_dose[:, 0].mean() - once[:, 0].mean()) < 0.05  # the first dose: the same spread
    assert by_dose[:, 3:].mean(axis=0).max() < 0.03  # weekly 1.5 mg/kg from day 8 on
    assert not np.array_equal(runs[1]["crs_log_susceptibility"][:, 0], runs[1]["crs_log_susceptibility"][:, 1])
    np.testing.assert_array_equal(runs[0]["crs_log_susceptibility"][:, 0], runs[0]["crs_log_susceptibility"][:, 1])



def test_blood_reach_weighs_the_release_of_the_first_step_up_dose_in_lymphoma_only():
    """Release by T cells engaging in blood counts with the reach w_B (`cytokines.blood_reach`). A CD20
    engager's first step-up dose meets targets in blood (B cells, circulating lymphoma cells) and clears
    them, so a lower w_B lowers mosunetuzumab's IL-6 peak and CRS after 1 mg and hardly moves the later
    doses, which engage in tissue and tumour. BCMA's targets sit in the marrow: teclistamab's CRS does
    not depend on w_B at all."""
    def by_reach(arm, horizon):
        return [simulate_arm(p, N, seed=3, chunk_size=N).reductions for p in common_shape(
            [prepare_arm(arm, horizon_days=horizon, overrides={"model.cytokines.blood_reach": w}) for w in (1.0, 0.1)])]

    full, low = by_reach(Arm("mosun", "mosunetuzumab", "iv", "fl_rr", MOSUNETUZUMAB_C1_C2), 21)  # 1 / 2 / 60 mg
    ratio = np.median(low["peak_il6_signalling_pg_ml"] / full["peak_il6_signalling_pg_ml"], axis=0)
    assert ratio[0] < 0.92 and ratio[1:].min() > 0.97
    assert _starts(full, 0) - _starts(low, 0) > 0.03
    assert abs(_starts(full, 2) - _starts(low, 2)) < 0.03
    full, low = by_reach(Arm("tec", "teclistamab", "sc", "mm_rr", "teclistamab_mm", "dexamethasone_16mg_step_up"), 10)
    np.testing.assert_allclose(full["peak_il6_signalling_pg_ml"], low["peak_il6_signalling_pg_ml"], rtol=1e-3)


def test_a_release_potency_fold_moves_crs_to_the_larger_step_up_doses():
    """Release needs phi x the drug that activation needs (`cytokines.release_potency_fold`). With
    phi = 1 talquetamab's 0.4 mg/kg step-up already saturates engagement in the marrow, so 0.8 mg/kg
    three days later starts no new CRS (the label: 12% after the first 0.8 mg/kg of the 2-weekly
    schedule); with phi = 10 the doubling still raises release, while the first, smallest step-up
    dose releases less."""
    arm = Arm("talq", "talquetamab", "sc", "mm_rr", "talquetamab_mm_biweekly", "dexamethasone_16mg_four_step_up")
    one, ten = (simulate_arm(p, N, seed=3, chunk_size=N).reductions for p in common_shape(
        [prepare_arm(arm, horizon_days=14, overrides={"model.cytokines.release_potency_fold": phi}) for phi in (1.0, 10.0)]))
    assert _starts(one, 3) < 0.02 and _starts(ten, 3) > _starts(one, 3) + 0.04
    assert _starts(ten, 0) < _starts(one, 0) - 0.05
    peak = "peak_il6_signalling_pg_ml"
    assert np.median(ten[peak][:, 3] / one[peak][:, 3]) > 1.2


def test_a_secretion_delay_postpones_the_cytokines_not_the_killing():
    """With `cytokines.secretion_delay_day` engaged T cells secrete cytokines through two stages of mean
    tau_S/2 (made anew, hours after contact) while killing stays immediate (pre-formed granules). The
    same release is secreted later: IFN-g (linear in the release) peaks later after mosunetuzumab's
    1 mg, its area over baseline is kept, and the cells, which do not depend on the cytokines, are
    untouched (the in-simulation rescue is off: its dexamethasone would act at other times)."""
    arm = Arm("mosun", "mosunetuzumab", "iv", "fl_rr", MOSUNETUZUMAB_C1_C2)
    runs = []
    for tau in (0.0, 0.5):
        prepared = prepare_arm(arm, horizon_days=6,  # before the 2 mg dose
                               overrides={"model.cytokines.secretion_delay_day": tau, "model.crs.rescue": 0})
        times, states, params = simulate_trajectories(prepared, np.arange(40), seed=3)
        runs.append(states)
    now, later = runs
    ifn_now, ifn_later = (np.asarray(s.host.cytokines.ifng_pg_ml) for s in runs)
    peak_shift_h = 24 * (times[ifn_later.argmax(axis=1)] - times[ifn_now.argmax(axis=1)])
    assert np.median(peak_shift_h) > 6
    baseline = np.asarray(params.cytokines.baseline_ifng_pg_ml)[:, None]
    area = [np.trapezoid(x - baseline, times, axis=1) for x in (ifn_now, ifn_later)]
    np.testing.assert_allclose(area[1], area[0], rtol=0.05)
    np.testing.assert_allclose(np.asarray(later.host.cells.b_normal.blood), np.asarray(now.host.cells.b_normal.blood),
                               rtol=1e-4, atol=1e-9)
