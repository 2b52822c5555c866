"""Virtual patients: reproducibility, chunk independence, digital twins."""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from vpop import population
from vpop.catalogue import ConfigError
from vpop.simulate import Arm, common_shape, prepare_arm, simulate_arm, simulate_ids

ARM = Arm("a", "mosunetuzumab", "iv", "fl_rr", "mosunetuzumab_fl_iv")


@pytest.fixture(scope="module")
def prepared():
    return prepare_arm(ARM, horizon_days=42)


def test_same_seed_same_patients_in_one_batch_or_in_chunks(prepared):
    whole = simulate_arm(prepared, 96, seed=7, chunk_size=96)
    chunked = simulate_arm(prepared, 96, seed=7, chunk_size=40)
    again = simulate_arm(prepared, 96, seed=7, chunk_size=96)
    for name in whole.reductions:
        np.testing.assert_array_equal(whole.reductions[name], again.reductions[name])
        np.testing.assert_allclose(whole.reductions[name], chunked.reductions[name], rtol=1e-6, atol=1e-9)
    for name in whole.covariates:
        np.testing.assert_array_equal(whole.covariates[name], chunked.covariates[name])


def test_other_seed_other_patients(prepared):
    """Seeds give independent patients: no patient of seed 2 repeats one of seed 1, not even shifted
    by one id (a key derived as seed + id would do that), and their weights are uncorrelated."""
    import jax.numpy as jnp

    from vpop.simulate import cohort_covariates

    def weights(seed, ids):
        cov = cohort_covariates(prepared.inputs.covariate_params, jnp.asarray(ids), jnp.asarray(seed), prepared.covariate_kinds)
        return np.asarray(cov.weight_kg)

    ids = np.arange(400)
    one, two = weights(1, ids), weights(2, ids)
    assert len(np.intersect1d(one, two)) == 0 and len(np.intersect1d(one, weights(2, ids + 1))) == 0
    assert abs(np.corrcoef(one, two)[0, 1]) < 0.15  # 400 independent pairs: SD of r ~0.05
    np.testing.assert_array_equal(one, weights(1, ids))


def test_patient_is_the_same_in_every_arm():
    sc, iv = common_shape([prepare_arm(Arm("sc", "mosunetuzumab", "sc", "fl_rr", "mosunetuzumab_fl_sc"), horizon_days=21),
                           prepare_arm(ARM, horizon_days=21)])  # one kernel for both, as in a trial
    a = simulate_arm(sc, 30, seed=4, chunk_size=30)
    b = simulate_arm(iv, 30, seed=4, chunk_size=30)
    for name in a.covariates:
        np.testing.assert_array_equal(a.covariates[name], b.covariates[name])


def test_covariates_follow_their_distributions(prepared):
    cov = simulate_arm(prepared, 2000, seed=0, chunk_size=40).covariates  # the chunked kernel of the test above
    assert np.median(cov["weight_kg"]) == pytest.approx(78, rel=0.05)
    assert np.mean(cov["age_years"]) == pytest.approx(60, abs=1.5)
    assert 0.75 < np.mean(cov["b_cells_per_ul"] < 70) < 0.9  # anti-CD20 B-cell aplasia ~80%
    assert np.all((cov["bsa_m2"] > 1.2) & (cov["bsa_m2"] < 2.8))


def test_digital_twins_one_patient_per_row(tmp_path, prepared, caplog):
    rows = pd.DataFrame({"weight_kg": [50.0, 120.0], "tumour_volume_ml": [10.0, 400.0], "cd8_t_cells_per_ul": [100.0, 600.0]})
    path = tmp_path / "twins.csv"
    rows.to_csv(path, index=False)
    # A missing covariate column is an error naming it, unless filling was asked for ...
    with pytest.raises(ConfigError, match=r"lacks column\(s\) \['age_years', 'female', 'height_cm'"):
        population.read_twins(path)
    with caplog.at_level("INFO", logger="vpop"):
        table = population.read_twins(path, fill="median")
    assert "age_years" in caplog.text and "filled" in caplog.text  # ... and then the log says which
    twins = population.twins_covariates(table, prepared.population)
    res = simulate_ids(prepared, np.arange(2), seed=0, chunk_size=40, twins=twins)  # padded to a kernel compiled above
    np.testing.assert_allclose(res.covariates["weight_kg"], [50.0, 120.0])
    np.testing.assert_allclose(res.covariates["tumour_volume_ml"], [10.0, 400.0])
    np.testing.assert_allclose(res.covariates["age_years"], [60.0, 60.0])  # the population median


def test_digital_twins_keep_the_users_patient_ids(tmp_path):
    from vpop import trial

    cols = {c: [1.0, 1.0, 1.0] for c in population.COVARIATES}
    cols.update(weight_kg=[60.0, 70.0, 80.0], height_cm=[170.0] * 3, age_years=[50.0] * 3, tumour_volume_ml=[50.0] * 3,
                cd8_t_cells_per_ul=[300.0] * 3, b_cells_per_ul=[5.0] * 3, female=[0.0] * 3, marrow_malignant_percent=[0.0] * 3,
                prior_car_t=[0.0] * 3)
    path = tmp_path / "twins.csv"
    pd.DataFrame({"patient_id": ["UK-017", "UK-002", "DE-311"], **cols}).to_csv(path, index=False)
    arms, ref = trial.arms_from_config({"arms": {"a": {"drug": "mosunetuzumab", "route": "iv", "population": "fl_rr",
                                                       "regimen": "mosunetuzumab_fl_iv"}}})
    result = trial.run_trial(arms, ref, trial.TrialSettings(horizon_days=7, trajectories=0), twins=population.read_twins(path))
    assert list(result.patients.patient_id) == ["UK-017", "UK-002", "DE-311"]
    np.testing.assert_allclose(result.patients.weight_kg, [60.0, 70.0, 80.0])
    dup = tmp_path / "dup.csv"
    pd.DataFrame({"patient_id": ["A", "A", "B"], **cols}).to_csv(dup, index=False)
    with pytest.raises(ConfigError, match="patient_id must be unique"):
        population.read_twins(dup)


@pytest.mark.parametrize(
    "content, message",
    [
        ("weight_kg,shoe_size\n70,42\n", "unknown column(s) ['shoe_size']"),
        ("weight_kg\nheavy\n", "column weight_kg row 1"),
        ("weight_kg\n-3\n", "expected a number in [2, 400]"),
        ("weight_kg\n", "has no rows"),
    ],
)
def test_malformed_twin_csv_is_rejected_with_the_column_named(tmp_path, content, message):
    path = tmp_path / "twins.csv"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        population.read_twins(path, fill="median")
    assert message in str(err.value)


def test_refractory_share_is_logit_normal_around_the_typical_share():
    """Each patient's refractory share: logit f_i = logit f + sd z_i, from the patient's own stream
    (so the same patient has the same share in every arm and chunk)."""
    import jax
    from vpop.model.cells import MalignantParams

    typical = MalignantParams(**{k: jnp.asarray(v) for k, v in dict(
        k_growth_per_day=0.01, kill_factor=0.5, capacity_fold=10.0, k_traffic_per_day=0.0, blood_partition=0.0,
        refractory_fraction=0.004, refractory_logit_sd=3.0).items()})
    keys = jax.vmap(lambda i: population.patient_key(7, i))(jnp.arange(4000))
    f = np.asarray(jax.vmap(lambda k: population.refractory_share(typical, k).refractory_fraction)(keys))
    logit = np.log(f) - np.log1p(-f)
    assert np.median(f) == pytest.approx(0.004, rel=0.1)
    assert np.std(logit) == pytest.approx(3.0, rel=0.05)
    again = np.asarray(jax.vmap(lambda k: population.refractory_share(typical, k).refractory_fraction)(keys[:10]))
    assert np.array_equal(again, f[:10])
    assert np.all(np.asarray(population.refractory_share(typical._replace(refractory_logit_sd=jnp.asarray(0.0)), keys[0]).refractory_fraction)
                  == pytest.approx(0.004))
    # A typical share of 0 (the shipped default) stays exactly 0 for every patient: one susceptible clone.
    off = typical._replace(refractory_fraction=jnp.asarray(0.0))
    assert not np.any(np.asarray(jax.vmap(lambda k: population.refractory_share(off, k).refractory_fraction)(keys)))


def test_occasion_share_redraws_part_of_the_crs_susceptibility_at_each_dose():
    """log s_ik = sqrt(1 - rho) eps_i + sqrt(rho) omega xi_ik: every period keeps the spread omega, two
    periods correlate by 1 - rho, the same patient key gives the same draws, and rho = 0 leaves the
    patient's one susceptibility in every period."""
    import jax

    from vpop.endpoints import CRSParams

    omega, n_periods = 0.8, 6
    typical = CRSParams(**{f: jnp.asarray(1.0) for f in CRSParams._fields})._replace(occasion_share=jnp.asarray(0.4),
                                                                                     susceptibility_sd=jnp.asarray(omega))
    keys = jax.vmap(lambda i: population.patient_key(5, i))(jnp.arange(20_000))
    eps = jax.vmap(lambda k: omega * jax.random.normal(jax.random.fold_in(k, 99)))(keys)

    def draw(share, keys, eps):
        crs = typical._replace(occasion_share=jnp.asarray(share))
        return np.log(np.asarray(jax.vmap(lambda k, e: population.occasion_susceptibility(
            crs._replace(susceptibility=jnp.exp(e)), typical, k, n_periods).susceptibility)(keys, eps)))

    log_s = draw(0.4, keys, eps)
    assert log_s.shape == (20_000, n_periods)
    assert np.std(log_s, axis=0) == pytest.approx(np.full(n_periods, omega), rel=0.03)
    assert np.corrcoef(log_s[:, 0], log_s[:, 3])[0, 1] == pytest.approx(0.6, abs=0.03)
    assert np.corrcoef(log_s[:, 0], np.asarray(eps))[0, 1] == pytest.approx(np.sqrt(0.6), abs=0.03)
    np.testing.assert_array_equal(draw(0.4, keys[:5], eps[:5]), log_s[:5])
    np.testing.assert_array_equal(draw(0.0, keys[:5], eps[:5]), np.repeat(np.log(np.asarray(jnp.exp(eps[:5])))[:, None], n_periods, 1))


def test_crs_susceptibility_is_drawn_as_when_it_was_a_population_random_effect(prepared):
    """At the spread every population had through 0.22.0 (`model.crs.susceptibility_sd` 0.8; the
    fitted 0.603 ships since 0.23.0) a patient's CRS susceptibility is the one drawn when the spread
    was each population's variability entry, bit for bit: the same stream of the patient's
    random-effects key and the same arithmetic, s exp(omega z)."""
    import jax

    from vpop import parameters
    from vpop.simulate import _patient_params, cohort_covariates

    f = parameters._float()
    typical = prepared.inputs.typical
    inputs = prepared.inputs._replace(typical=typical._replace(crs=typical.crs._replace(susceptibility_sd=jnp.asarray(0.8, f))))
    assert "crs.susceptibility" not in prepared.variability_paths
    for seed in (0, 3):
        ids = jnp.asarray([0, 1, 17, 4242])
        cov = cohort_covariates(inputs.covariate_params, ids, jnp.asarray(seed), prepared.covariate_kinds)
        for k, i in enumerate(ids):
            p = _patient_params(inputs, jax.tree_util.tree_map(lambda x, k=k: x[k], cov), i, jnp.asarray(seed), prepared.variability_paths)
            re_key = jax.random.fold_in(population.patient_key(jnp.asarray(seed), i), parameters.stream_id("random_effects"))
            z = parameters.standard_normal(jax.random.fold_in(re_key, parameters.stream_id("crs.susceptibility")))
            old = inputs.typical.crs.susceptibility * jnp.exp(jnp.asarray([0.8], f)[0] * z)
            s = np.asarray(p.crs.susceptibility)
            assert s.shape == (len(prepared.compiled.periods),)  # occasion_share 0: the one value in every period
            np.testing.assert_array_equal(s, np.full(s.shape, np.asarray(old)))


def test_susceptibility_sd_sets_the_spread_of_log_susceptibility():
    """`model.crs.susceptibility_sd` is the SD of log s_i between patients: 0.4 halves the spread of
    0.8, on the same patients (common random numbers), and the typical patient stays at s = 1."""
    import jax

    from vpop.simulate import _patient_params, cohort_covariates

    def log_s(sd):
        arm = prepare_arm(ARM, horizon_days=42, overrides={"model.crs.susceptibility_sd": sd})
        ids = jnp.arange(4000)
        cov = cohort_covariates(arm.inputs.covariate_params, ids, jnp.asarray(1), arm.covariate_kinds)
        one = lambda c, i: _patient_params(arm.inputs, c, i, jnp.asarray(1), arm.variability_paths).crs.susceptibility[0]  # noqa: E731
        return np.log(np.asarray(jax.jit(jax.vmap(one))(cov, ids)))

    wide, narrow = log_s(0.8), log_s(0.4)
    assert np.std(wide) == pytest.approx(0.8, rel=0.05) and np.std(narrow) == pytest.approx(0.4, rel=0.05)
    assert np.std(narrow) / np.std(wide) == pytest.approx(0.5, rel=0.05)
    assert abs(np.median(narrow)) < 0.05
    np.testing.assert_allclose(narrow, wide / 2, atol=1e-5)  # the same z of each patient


def test_sclc_sets_its_own_dll3_negative_share_over_the_shared_spread():
    """SCLC's DLL3-negative share (median 0.262, logit SD 3.21, from SP347 staining) is its own: the
    posterior's shared spread `model.malignant.refractory_logit_sd` does not reach it, and drawn over
    many patients the share puts DLL3 on >= 50% of cells in ~63% and on >= 25% in ~75% of them, the
    midpoints of the staining review it was set from."""
    from vpop.parameters import ParameterScope, params_path

    sclc, fl = ParameterScope("tarlatamab", "iv", "sclc_2l"), ParameterScope("mosunetuzumab", "iv", "fl_rr")
    assert params_path("model.malignant.refractory_logit_sd", sclc) is None
    assert params_path("model.malignant.refractory_logit_sd", fl) == "malignant.refractory_logit_sd"
    prepared = prepare_arm(Arm("t", "tarlatamab", "iv", "sclc_2l", "tarlatamab_sclc"), horizon_days=7)
    m = prepared.inputs.typical.malignant
    assert np.isclose(float(m.refractory_fraction), 0.262) and np.isclose(float(m.refractory_logit_sd), 3.21)
    keys = jax.random.split(jax.random.PRNGKey(0), 20_000)
    share = np.asarray(jax.vmap(lambda k: population.refractory_share(m, k).refractory_fraction)(keys))
    assert abs(np.mean(share <= 0.5) - 0.6265) < 0.015 and abs(np.mean(share <= 0.75) - 0.747) < 0.015
