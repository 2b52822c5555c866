r"""Clinical endpoints: CRS grades per dose period, rescue, tumour response. One definition of each,
used by the solver (rescue), the trial runner (0/1 endpoints) and the calibration (their expectation).

CRS. Two drives on the IL-6 scale (pg/mL), from IL-6 signalling $S = \mathrm{IL6}\cdot\theta$ and the
myeloid output $O$ that tocilizumab does not block (IL-1b and TNF-a, see `vpop.model.cytokines`):

$$ F = S + \phi_F\, O \quad\text{(fever: several mediators)}, \qquad
   V = S + \phi_V\, O \quad\text{(vascular: mostly IL-6)}. $$

ASTCT grade $\ge 1$ (fever) when $\log F + \varepsilon \ge \log\theta_1$ (or grade $\ge 2$ is reached),
grade $\ge g$ for $g = 2, 3, 4$ when $\log V + \varepsilon \ge \log\theta_g$, with
$\theta_g = f_g\theta_{g-1}$ and $\varepsilon = \log s_i \sim N(0, \omega^2)$ the patient's CRS
susceptibility ($\omega$ = `susceptibility_sd`, a calibrated model parameter): one for the whole course, or with `occasion_share` $\rho > 0$ one per dose period,
$\varepsilon_k$, correlated $1 - \rho$ between periods (`population.occasion_susceptibility`). In terms of the indices $z_1 = \max(\log F/\theta_1, \log V/\theta_2)$ and
$z_g = \log V/\theta_g$, a patient is at grade $\ge g$ when $z_g + \varepsilon \ge 0$.

CRS *starting* in dose period $k$ (the labels' "CRS following dose $k$"): with $m_{gk}$ the largest
$z_g$ in the period and $s_{gk}$ its value at the administration, CRS starts in period $k$ when
$m_{1k} + \varepsilon_k \ge 0 > s_{1k} + \varepsilon_{k-1}$ (an episode of the period before, at that
period's susceptibility, still running at the dose is not a new one), and its grade is the highest reached in the
period: grade $\ge g$ when $m_{gk} + \varepsilon_k \ge 0$. Overall, a patient has CRS of grade
$\ge g$ when $m_{gk} + \varepsilon_k \ge 0$ in some period (one $\varepsilon$: $\max_k m_{gk} +
\varepsilon \ge 0$). The trial runner evaluates these at the patient's own
$\varepsilon$; the calibration integrates $\varepsilon$ out ($P = \Phi(b/\omega) - \Phi(a/\omega)$ for
the interval $[a, b)$; with $\rho > 0$, `occasion_crs_probabilities`), so its rate is the expectation
of the trial's 0/1 endpoint. Rescue happens in the simulation (tocilizumab 8 mg/kg, at most 800 mg, at grade $\ge 2$;
dexamethasone too at grade $\ge 3$; once each per period, each starting a clinical delay after its
grade's onset, `rescue_delay_hours`, whatever the solver's grid), so the trajectory depends on $\varepsilon$
through the rescue history; the expectation is then taken over the $\varepsilon$ consistent with the
patient's rescue history (`rescue_bounds`, per period), which leaves only the timing of a rescue within its
period unaccounted for. Tocilizumab for a fever that lasts (`rescue_grade1_hours` > 0, an option off in
the shipped model) depends on how long the index stays above the patient's threshold, which these bounds
do not hold, so the calibration refuses it. The grades that trigger a rescue are then fixed by it: with rescue on, a
patient's grade >= 2 (tocilizumab given or not) and grade >= 3 (dexamethasone) expectations are 0 or
1, so those cohort rates are counts that move in steps of 1/patients, not smoothly. A smooth
expectation would need each patient's trajectory without the rescue too; integrating over all
$\varepsilon$ on the rescued trajectory instead is biased (measured at the 0.7.0 medians, 1,000
patients: mosunetuzumab IV grade >= 2 -4.0 and grade >= 3 +8.0, teclistamab grade >= 2 -6.1
percentage points). Dose holds (`crs.hold_until_resolved`: an administration due during CRS given
once it resolves) make the trajectory depend on $\varepsilon$ the same way, and bound it the same way
(`hold_interval`); a held administration's period starts where it is given.

Response (from the burden recorded at the assessment days). Progression (PD) is judged on the
modelled burden; the response level on the *assessed* burden $b\,e^{\delta}$, with $\delta$ the
patient's assessment effect ($\delta \sim N(0, \omega_b^2)$: how a modelled burden reads as measured
response). Best overall response is the best before progression, so with $b^*$ the smallest burden
at the assessments before the first PD, a response needs $\delta \le \log(c / b^*)$ for the
criterion's threshold $c$: the trial counts it at the patient's $\delta$, the calibration takes
$\Phi(\log(c/b^*)/\omega_b)$.
- lymphoma: SPD ~ volume^(2/3); PR at SPD <= 50% of baseline, CR when the residual volume is below a
  threshold, PD at >= 50% increase of SPD from nadir with a measurable lesion (Cheson 2007, as in the
  pivotal trials; Lugano 2014 judges lesion by lesion, which one tumour compartment cannot);
- leukaemia: CR/CRh when marrow blasts fall below 5% (counts are not modelled, so CR and CRh are one);
- myeloma: PR at >= 50% and CR at >= 99% reduction of the malignant burden (an M-protein proxy);
- solid (RECIST 1.1, Eisenhauer 2009 Eur J Cancer 45:228): the sum of target-lesion diameters ~
  volume^(1/3); PR at >= 30% decrease, CR when the residual volume is below a threshold (lesions
  gone), PD at >= 20% increase of the sum from its nadir with a measurable lesion.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.stats as jstats
import numpy as np
from jax import Array

RESPONSES = ("CR", "PR", "SD", "PD")
RESPONSE_KINDS = ("lymphoma", "leukaemia", "myeloma", "solid")
GRADES = 4  # ASTCT grades 1-4

# Response criteria (shared by the trial's 0/1 endpoints and the calibration's expectations).
LYMPHOMA_PR_SPD_FRACTION = 0.5  # PR: SPD <= 50% of baseline (Cheson 2007 J Clin Oncol 25:579)
LYMPHOMA_PD_SPD_FOLD = 1.5  # PD: SPD >= 150% of nadir (Cheson 2007)
LEUKAEMIA_CR_BLAST_PERCENT = 5.0  # CR/CRh: marrow blasts < 5% (Topp 2015 Lancet Oncol 16:57; Kantarjian 2017 NEJM 376:836)
LEUKAEMIA_PD_BLAST_FOLD = 1.25  # PD: blasts >= 125% of baseline [G]
MYELOMA_PR_BURDEN_FRACTION = 0.5  # PR: >= 50% reduction (IMWG, Kumar 2016 Lancet Oncol 17:e328)
MYELOMA_CR_BURDEN_FRACTION = 0.01  # CR proxy: >= 99% reduction of the malignant pool [G]
MYELOMA_PD_BURDEN_FOLD = 1.25  # PD: >= 25% increase from nadir (IMWG)
SOLID_PR_DIAMETER_FRACTION = 0.7  # PR: sum of diameters >= 30% below baseline (RECIST 1.1, Eisenhauer 2009)
SOLID_PD_DIAMETER_FOLD = 1.2  # PD: sum of diameters >= 120% of nadir (RECIST 1.1)
B_CELL_DEPLETION_FRACTION = 0.1  # B-cell depletion: blood B cells below 10% of baseline at any time [G]
# PD also needs an absolute rise (IMWG asks >= 0.5 g/dL of M-protein besides the 25%): here a rise of at
# least 5% of the baseline burden [G], so that regrowth from a (near-)zero nadir is not progression.
MYELOMA_PD_MIN_RISE_FRACTION = 0.05


def spd_fraction(volume_fraction):
    """SPD relative to baseline from tumour volume relative to baseline (SPD ~ volume^(2/3))."""
    return volume_fraction ** (2.0 / 3.0)


def diameter_fraction(volume_fraction):
    """Sum of lesion diameters relative to baseline from tumour volume relative to baseline
    (diameter ~ volume^(1/3); RECIST's measure)."""
    return volume_fraction ** (1.0 / 3.0)


def measured_fraction(kind: str, volume_fraction):
    """What the response criteria of `kind` read from a burden relative to baseline: SPD (lymphoma),
    the sum of diameters (solid), the burden itself (myeloma; leukaemia reads marrow blasts instead)."""
    return {"lymphoma": spd_fraction, "solid": diameter_fraction}.get(kind, lambda v: v)(volume_fraction)


def marrow_blast_percent(marrow_fraction, baseline_percent, xp=np):
    """Marrow blasts (%) when the blasts are `marrow_fraction` of their baseline `baseline_percent`
    (normal marrow cells held at their baseline). `xp` is numpy or jax.numpy."""
    b0 = baseline_percent / 100.0
    frac = b0 * marrow_fraction
    return 100.0 * frac / xp.maximum(frac + 1.0 - b0, 1e-12)


# ---------------------------------------------------------------------------------------------
# CRS
# ---------------------------------------------------------------------------------------------


class CRSParams(NamedTuple):
    grade1_pg_ml: Array  # theta_1: fever drive F of grade 1 at typical susceptibility (IL-6 scale, pg/mL)
    grade2_fold: Array  # theta_2 / theta_1 (theta_2 on the vascular drive V)
    grade3_fold: Array
    grade4_fold: Array
    fever_other_weight: Array  # phi_F: weight of the myeloid output O in the fever drive
    vascular_other_weight: Array  # phi_V: its weight in the vascular drive
    susceptibility: Array  # s_i = e^epsilon, 1 for the typical patient (log-normal variability); [P] per dose period in a patient
    susceptibility_sd: Array  # omega: SD of epsilon = log s_i between patients (calibrated; the expectations integrate over it)
    occasion_share: Array  # rho: share of the variance of epsilon drawn anew at each administration (0: one epsilon per patient)
    rescue: Array  # 1: treat CRS in the simulation (tocilizumab at grade 2, dexamethasone at grade 3)
    rescue_tocilizumab_mg_per_kg: Array
    rescue_tocilizumab_max_mg: Array
    rescue_dexamethasone_mg: Array
    rescue_delay_hours: Array  # onset of grade 2 (3) to the start of tocilizumab (dexamethasone)
    rescue_tocilizumab_infusion_hours: Array
    rescue_dexamethasone_infusion_hours: Array  # 0: given at once
    hold_until_resolved: Array  # 1: a dose due during CRS (grade >= 1) is held until it resolves (the labels' rule)
    rescue_grade1_hours: Array  # tocilizumab too for a fever (grade 1) lasting this many hours (0: at grade >= 2 only)


class ResponseParams(NamedTuple):
    assessment_bias: Array  # e^delta: how the patient's modelled burden reads as assessed (1 typical; log-normal)


def log_threshold(p: CRSParams, grade: int) -> Array:
    """log theta_g of one grade (1-4): the grade-1 threshold times the folds up to grade g (scalar
    maths, so that the SBML export traces it for its rescue triggers)."""
    folds = (p.grade2_fold, p.grade3_fold, p.grade4_fold)[: grade - 1]
    log_theta = jnp.log(p.grade1_pg_ml)
    for fold in folds:
        log_theta = log_theta + jnp.log(fold)
    return log_theta


def log_thresholds(p: CRSParams) -> Array:
    """[4] log theta_g for grades 1-4."""
    return jnp.stack([log_threshold(p, g) for g in (1, 2, 3, 4)])


def vascular_drive(il6_signalling_pg_ml: Array, myeloid_output_pg_ml: Array, p: CRSParams) -> Array:
    """V = IL6 theta + phi_V O (pg/mL): the drive of grades >= 2 (fever's F weighs O by phi_F)."""
    return il6_signalling_pg_ml + p.vascular_other_weight * myeloid_output_pg_ml


def crs_index(il6_signalling_pg_ml: Array, myeloid_output_pg_ml: Array, p: CRSParams) -> Array:
    """[..., 4] indices z_g (susceptibility not included): grade >= g when z_g + epsilon >= 0."""
    fever = il6_signalling_pg_ml + p.fever_other_weight * myeloid_output_pg_ml
    vascular = vascular_drive(il6_signalling_pg_ml, myeloid_output_pg_ml, p)
    log_theta = log_thresholds(p)
    log_v = jnp.log(jnp.maximum(vascular, 1e-12))
    z_vascular = log_v[..., None] - log_theta[1:]
    z_fever = jnp.log(jnp.maximum(fever, 1e-12)) - log_theta[0]
    return jnp.concatenate([jnp.maximum(z_fever, z_vascular[..., 0])[..., None], z_vascular], axis=-1)


def grade_now(z: Array, epsilon: Array) -> Array:
    """ASTCT grade 0-4 at indices z [..., 4] and susceptibility epsilon (the indices are nested)."""
    return jnp.sum(z + epsilon[..., None] >= 0.0, axis=-1)


def per_period(epsilon: Array, peak: Array) -> Array:
    """epsilon [..., P], the susceptibility in each dose period, for peaks [..., P, 4]: a per-patient
    epsilon [...] holds in every period."""
    epsilon = jnp.asarray(epsilon)
    e = epsilon[..., None] if epsilon.ndim < peak.ndim - 1 else epsilon
    return jnp.broadcast_to(e, jnp.broadcast_shapes(e.shape, peak.shape[:-1]))


def previous_period(epsilon: Array) -> Array:
    """[..., P]: the susceptibility of the period before each (the first period's own for the first)."""
    return jnp.concatenate([epsilon[..., :1], epsilon[..., :-1]], axis=-1)


def started(peak: Array, at_dose: Array, epsilon: Array) -> Array:
    """[..., P]: CRS starts in period k (peak indices m and indices at the dose s, [..., P, 4]): the
    period's peak reaches grade 1 at its susceptibility, and no episode of the period before (at
    that period's susceptibility) still runs at the administration."""
    e = per_period(epsilon, peak)
    return (peak[..., 0] + e >= 0.0) & (at_dose[..., 0] + previous_period(e) < 0.0)


def period_grades(peak: Array, at_dose: Array, epsilon: Array) -> Array:
    """[..., P] grade of the CRS starting in each period: the highest grade it reaches in the period
    (0 when no CRS starts there)."""
    return jnp.where(started(peak, at_dose, epsilon), grade_now(peak, per_period(epsilon, peak)), 0)


def highest_grade(peak: Array, epsilon: Array) -> Array:
    """[...]: the highest ASTCT grade over the course (peaks [..., P, 4])."""
    return jnp.max(grade_now(peak, per_period(epsilon, peak)), axis=-1)


def grade_margin(peak, at_dose, epsilon):
    r"""[...]: how close the patient's CRS grades came to a threshold, in the index's log units:
    $\min_{k,g} |m_{kg} + \epsilon_k|$ over the period peaks $m$ [..., P, 4] and the grade-1 index at
    each dose $s_{k1}$ (against the period before's $\epsilon_{k-1}$, the onset rule, `started`).
    Every grade, onset and rescue decision of the course is one of these comparisons, so an error in
    the indices smaller than the margin changes none of them. numpy in, numpy out (a per-patient
    check on the host, `vpop.simulate`)."""
    peak, at_dose = np.asarray(peak), np.asarray(at_dose)
    e = np.asarray(per_period(epsilon, peak))
    peaks = np.abs(peak + e[..., None]).min(axis=(-2, -1))
    doses = np.abs(at_dose[..., 0] + np.asarray(previous_period(e))).min(axis=-1)
    return np.minimum(peaks, doses)


def rescue_bounds(peak: Array, toci: Array, dex: Array, epsilon: Array, rescue_on: Array) -> tuple[Array, Array]:
    """Per period ([..., P] each), the susceptibilities epsilon_k that give this patient's rescue
    history ([..., P] peaks [..., P, 4] and rescue flags): tocilizumab in period k iff z_2 + epsilon_k
    >= 0 there, dexamethasone iff z_3 + epsilon_k >= 0. Returns (lo, hi); the patient's own epsilon_k
    always lies inside."""
    inf = jnp.asarray(jnp.inf, peak.dtype)
    e = per_period(epsilon, peak)
    lo, hi = -inf, inf
    for g, given in ((1, toci), (2, dex)):
        bound = -peak[..., g]
        lo = jnp.maximum(lo, jnp.where(given > 0, bound, -inf))
        hi = jnp.minimum(hi, jnp.where(given > 0, inf, bound))
    on = jnp.asarray(rescue_on)[..., None] > 0
    return jnp.where(on, jnp.minimum(lo, e), -inf), jnp.where(on, jnp.maximum(hi, e + 1e-6), inf)


def rescue_interval(peak: Array, toci: Array, dex: Array, epsilon: Array, rescue_on: Array) -> tuple[Array, Array]:
    """The one susceptibility epsilon (the same in every period, `occasion_share` 0) that gives this
    patient's rescue history: the intersection of the periods' `rescue_bounds`. Returns (lo, hi)."""
    lo, hi = rescue_bounds(peak, toci, dex, epsilon, rescue_on)
    return jnp.max(lo, axis=-1), jnp.min(hi, axis=-1)


# `held_index_min` of an administration that was never held: above any index a hold is made at.
NOT_HELD_INDEX = 100.0


def hold_interval(at_dose: Array, held_index_min: Array, crs_hold_day: Array, epsilon: Array, hold_on: Array) -> tuple[Array, Array]:
    """The one susceptibility epsilon (`occasion_share` 0) that gives this patient's dose holds
    (`crs.hold_until_resolved`, `vpop.model.solver`): an administration held while the grade-1 index
    was z needs z + epsilon >= 0 (`held_index_min`: its smallest such z), one given after the first
    needs the index at it below the threshold, at_dose[k, 0] + epsilon < 0 (it would have been held
    otherwise). From the indices at the doses [..., P, 4], per-period holds and delays [..., P]; returns
    (lo, hi), unbounded with holds off. The patient's own epsilon always lies inside."""
    inf = jnp.asarray(jnp.inf, at_dose.dtype)
    e = jnp.asarray(epsilon)
    given_later = (crs_hold_day >= 0) & (jnp.arange(crs_hold_day.shape[-1]) > 0)
    lo = jnp.max(jnp.where(held_index_min < NOT_HELD_INDEX, -held_index_min, -inf), axis=-1)
    hi = jnp.min(jnp.where(given_later, -at_dose[..., 0], inf), axis=-1)
    on = jnp.asarray(hold_on) > 0
    return jnp.where(on, jnp.minimum(lo, e), -inf), jnp.where(on, jnp.maximum(hi, e + 1e-6), inf)


def interval_probability(a: Array, b: Array, omega: Array, lo: Array, hi: Array) -> Array:
    """P(a <= epsilon < b | lo <= epsilon < hi) for epsilon ~ N(0, omega^2)."""
    cdf = jstats.norm.cdf
    top, bottom = jnp.minimum(b, hi), jnp.maximum(a, lo)
    mass = jnp.maximum(cdf(top / omega) - cdf(bottom / omega), 0.0)
    return mass / jnp.maximum(cdf(hi / omega) - cdf(lo / omega), 1e-12)


def first_crs_probability(peak: Array, k: int, omega: Array, lo: Array, hi: Array) -> Array:
    """Expectation over epsilon of "the patient's first CRS starts at administration k (1-based) or
    later": no CRS through period k - 1 (epsilon < -max m_1), some after (epsilon >= -max m_1 later)."""
    inf = jnp.asarray(jnp.inf, peak.dtype)
    before = jnp.max(peak[..., : k - 1, 0], axis=-1) if k > 1 else -inf
    after = jnp.max(peak[..., k - 1:, 0], axis=-1)
    return interval_probability(-after, -before, omega, lo, hi)


def first_crs_dose(grades: np.ndarray) -> np.ndarray:
    """1-based administration after which each patient's first CRS starts (0: none), from [n, P] grades."""
    started = grades >= 1
    return np.where(started.any(axis=-1), started.argmax(axis=-1) + 1, 0)


def crs_from_dose(grades, k: int, grade: int = 1):
    """[...]: a CRS of grade >= `grade` starts after administration k (1-based) or a later one (the
    labels' "CRS following the third dose or later"), from [..., P] period grades; numpy or jax."""
    return (grades[..., k - 1:] >= grade).any(axis=-1)


def recurrent_crs(grades):
    """[...]: CRS starts after two or more administrations (the labels' "recurrent CRS": more than one
    episode; one still running at a dose is one episode), from [..., P] period grades; numpy or jax."""
    return (grades >= 1).sum(axis=-1) >= 2


def episode_days(grades: np.ndarray, days: np.ndarray) -> np.ndarray:
    """[n, P] days at grade >= 1 of the CRS episode starting after each administration (NaN where none
    starts), from [n, P] period grades and each period's days at grade >= 1: the days of its own period and
    of the following ones it runs into without a new start. A period's days belong to the latest episode
    started by then, so an episode that ends in the period where the next starts lends it its tail; an
    episode still running at the end of the horizon is cut there."""
    started = grades >= 1
    episode = np.cumsum(started, axis=-1)  # the episode each period's days belong to (0: before the first)
    n, periods = grades.shape
    totals = np.zeros((n, periods + 1))
    np.add.at(totals, (np.repeat(np.arange(n)[:, None], periods, axis=1), episode), np.nan_to_num(days))
    return np.where(started, np.take_along_axis(totals, episode, axis=-1), np.nan)


def _at_least(lower: Array, upper: Array, times: int, omega: Array, lo: Array, hi: Array) -> Array:
    r"""P(epsilon lies in at least `times` of the intervals $[l_j, u_j)$ | lo <= epsilon < hi) for epsilon ~
    N(0, omega^2), per patient (bounds [..., P]). The intervals' ends cut the line into segments on each of
    which the number of intervals holding epsilon is constant; the probability is the normal mass of the
    segments where it reaches `times`."""
    cdf = jstats.norm.cdf
    e = lambda x: jnp.asarray(x)[..., None]  # noqa: E731 - per-segment broadcast of patient scalars
    cuts = jnp.sort(jnp.concatenate([lower, upper], axis=-1), axis=-1)  # [..., 2P]
    count = jnp.sum((lower[..., None, :] <= cuts[..., :, None]) & (cuts[..., :, None] < upper[..., None, :]), axis=-1)
    left = jnp.clip(cuts[..., :-1], e(lo), e(hi))
    right = jnp.clip(cuts[..., 1:], e(lo), e(hi))
    mass = jnp.maximum(cdf(right / e(omega)) - cdf(left / e(omega)), 0.0)
    return jnp.sum(jnp.where(count[..., :-1] >= times, mass, 0.0), axis=-1) / jnp.maximum(cdf(hi / omega) - cdf(lo / omega), 1e-12)


def from_dose_probability(peak: Array, at_dose: Array, k: int, g: int, omega: Array, lo: Array, hi: Array) -> Array:
    r"""Expectation over one susceptibility $\varepsilon$ (per patient) of `crs_from_dose` at grade $g + 1$.
    A CRS of that grade starts in period $j$ when $\varepsilon \in [-m_{gj}, -s_{1j})$ (`started`; the
    grade-$g$ index never exceeds grade 1's), so the event is $\varepsilon$ in at least one of these
    intervals over $j \ge k$ (their union, which the sum over periods would overcount), within the
    rescue bounds $[l, h)$."""
    return _at_least(-peak[..., k - 1:, g], -at_dose[..., k - 1:, 0], 1, omega, lo, hi)


def recurrent_probability(peak: Array, at_dose: Array, omega: Array, lo: Array, hi: Array) -> Array:
    """Expectation over one susceptibility (per patient) of `recurrent_crs`: epsilon in at least two of
    the periods' start intervals (`from_dose_probability`)."""
    return _at_least(-peak[..., 0], -at_dose[..., 0], 2, omega, lo, hi)


def crs_probabilities(peak: Array, at_dose: Array, omega: Array, lo: Array, hi: Array) -> dict:
    """Expectation over epsilon of the trial's CRS endpoints (per patient): overall any / grade >= 2 /
    grade >= 3 and recurrent, per period any and grade >= 2 ([P] arrays), and as functions of the
    administration k: first CRS at k or later, CRS (grade >= 2) starting after k or later."""
    inf = jnp.asarray(jnp.inf, peak.dtype)
    worst = jnp.max(peak, axis=-2)  # [4]: the largest index over all periods
    out = {name: interval_probability(-worst[..., g], inf, omega, lo, hi)
           for g, name in enumerate(("crs_any", "crs_grade2plus", "crs_grade3plus"))}
    e = lambda x: jnp.asarray(x)[..., None]  # noqa: E731 - per-period broadcast of patient scalars
    for g, name in ((0, "crs_any_dose"), (1, "crs_grade2plus_dose")):
        out[name] = interval_probability(-peak[..., g], -at_dose[..., 0], e(omega), e(lo), e(hi))
    out["crs_recurrent"] = recurrent_probability(peak, at_dose, omega, lo, hi)
    out["crs_first_at_dose"] = lambda k: first_crs_probability(peak, k, omega, lo, hi)
    out["crs_any_from_dose"], out["crs_grade2plus_from_dose"] = (
        (lambda k, g=g: from_dose_probability(peak, at_dose, k, g, omega, lo, hi)) for g in (0, 1))
    return out


# The quadrature over the persistent part of epsilon (`occasion_crs_probabilities`): its nodes, and
# how far beyond the rescue bounds (in SDs) it looks; at 128 the rates lie within 0.03 pp per patient
# of a 16,384-node one at share 0.27, 1.1 pp at 0.05.
OCCASION_NODES = 128
OCCASION_RANGE_SD = 6.0


def occasion_crs_probabilities(peak: Array, at_dose: Array, omega: Array, share: Array, lo: Array, hi: Array,
                               nodes: int = OCCASION_NODES) -> dict[str, Array]:
    r"""`crs_probabilities` when the susceptibility varies between dose periods (`occasion_share`
    $\rho > 0$, `population.occasion_susceptibility`): $\varepsilon_k = a + b_k$ with the persistent
    part $a \sim N(0, (1-\rho)\,\omega^2)$ and each period's own $b_k \sim N(0, \rho\,\omega^2)$,
    every $\varepsilon_k$ within its period's rescue bounds $[l_k, h_k)$ (`rescue_bounds`, [..., P]).
    Given $a$ the periods are independent, so each endpoint is a product over periods of normal
    interval probabilities $Q_k(x, y \mid a) = P(\max(x, l_k) \le \varepsilon_k < \min(y, h_k) \mid a)$,

    $$ P(E) = \frac{\sum_j \prod_k Q_k(E_k \mid a_j)}{\sum_j \prod_k Q_k(-\infty, \infty \mid a_j)}, $$

    by the midpoint rule with `nodes` points $a_j$ (weights $\propto \phi(a_j)$) over the range where the
    rescue bounds leave $a$ any mass: within 6 of each period's own SDs of every bound and 6 SDs of
    $a$'s own spread. A patient with a narrow rescue history then gets the nodes where its
    susceptibility can be (equal-probability nodes over all of $a$: errors of tens of points in such
    patients). CRS starting in period $k \ge 2$ involves two periods: $\varepsilon_k \ge -m_{1k}$ and
    $\varepsilon_{k-1} < -s_{1k}$ (`started`)."""
    cdf = jstats.norm.cdf
    inf = jnp.asarray(jnp.inf, peak.dtype)
    sd_a = jnp.asarray(jnp.sqrt(1.0 - share) * omega)[..., None]  # [..., 1]
    sd = jnp.asarray(jnp.sqrt(share) * omega)[..., None, None]
    reach = OCCASION_RANGE_SD
    a_low = jnp.maximum(jnp.max(lo, axis=-1, keepdims=True) - reach * sd[..., 0], -reach * sd_a)  # [..., 1]
    a_high = jnp.maximum(jnp.minimum(jnp.min(hi, axis=-1, keepdims=True) + reach * sd[..., 0], reach * sd_a), a_low + 1e-6)
    a = a_low + (a_high - a_low) * (jnp.arange(nodes, dtype=peak.dtype) + 0.5) / nodes  # [..., J]
    log_weight = -0.5 * (a / sd_a) ** 2
    a = a[..., :, None]  # [..., J, 1]
    lo_, hi_ = lo[..., None, :], hi[..., None, :]  # [..., 1, P]

    def log_mass(x, y, lower=lo_, upper=hi_):  # log Q_k(x, y | a_j), [..., J, P]
        top, bottom = jnp.minimum(y, upper), jnp.maximum(x, lower)
        return jnp.log(jnp.maximum(cdf((top - a) / sd) - cdf((bottom - a) / sd), 1e-30))

    def at(x):  # a per-period bound [..., P] against the nodes
        return x[..., None, :]

    box = log_mass(-inf, inf)  # [..., J, P]
    total = log_weight + jnp.sum(box, axis=-1)  # [..., J]
    norm = jax.nn.logsumexp(total, axis=-1)

    def expect(log_terms):  # [..., J] -> probability
        return jnp.exp(jax.nn.logsumexp(log_terms, axis=-1) - norm)

    def none_reach(g, periods=None):  # P(no period in `periods` reaches grade g + 1)
        quiet = log_mass(-inf, at(-peak[..., g]))
        if periods is not None:
            quiet = jnp.where(periods, quiet, box)
        return expect(log_weight + jnp.sum(quiet, axis=-1))

    out = {name: 1.0 - none_reach(g) for g, name in enumerate(("crs_any", "crs_grade2plus", "crs_grade3plus"))}
    first = jnp.arange(peak.shape[-2]) == 0
    previous_box = previous_period(box)
    # The period before each, at that period's bounds: no episode of it still running at the dose.
    still = log_mass(-inf, at(-at_dose[..., 0]), previous_period(lo)[..., None, :], previous_period(hi)[..., None, :])
    for g, name in ((0, "crs_any_dose"), (1, "crs_grade2plus_dose")):
        later = total[..., None] - box - previous_box + log_mass(at(-peak[..., g]), inf) + still
        same = total[..., None] - box + log_mass(at(-peak[..., g]), at(-at_dose[..., 0]))
        terms = jnp.where(first, same, later)  # [..., J, P]
        out[name] = jnp.exp(jax.nn.logsumexp(terms, axis=-2) - norm[..., None])

    def first_at(k):  # first CRS at administration k (1-based) or later
        before = jnp.arange(peak.shape[-2]) < k - 1
        return none_reach(0, before) - none_reach(0)

    out["crs_first_at_dose"] = first_at

    def period_mass(j, x, y):  # P(x <= eps_j < y | a, eps_j within period j's rescue bounds), [..., J]; x, y [..., 1]
        one = slice(j, j + 1)
        return jnp.exp(log_mass(x[..., None, :], y[..., None, :], lo_[..., one], hi_[..., one]) - box[..., one])[..., 0]

    def start_counts(g, k):
        """Given a ([..., J]): the probabilities of 0, 1 and >= 2 CRS starts of grade >= g + 1 in the
        periods from administration k (1-based) on. A chain over those periods whose state is the count
        so far and whether the last period's episode (if any) has ended by the next dose (eps_j <
        -s_{1,j+1}), which decides whether the next period can start one (`started`)."""
        periods = peak.shape[-2]
        threshold = lambda j: -peak[..., j:j + 1, g]  # noqa: E731 - eps_j at or above it: grade g + 1 in period j
        inf_ = jnp.full_like(threshold(0), jnp.inf)
        next_dose = lambda j: -at_dose[..., j + 1:j + 2, 0] if j + 1 < periods else inf_  # noqa: E731
        zero = jnp.zeros_like(a[..., 0])
        if k == 1:  # the first period has no period before: a start between its threshold and its index at the dose
            m, s, c = threshold(0), -at_dose[..., 0:1, 0], next_dose(0)
            ended = [period_mass(0, -inf_, jnp.minimum(m, c)) + period_mass(0, s, c), period_mass(0, m, jnp.minimum(s, c)), zero]
            running = [period_mass(0, c, m) + period_mass(0, jnp.maximum(s, c), inf_), period_mass(0, jnp.maximum(m, c), s), zero]
        else:
            c = -at_dose[..., k - 1:k, 0]
            ended, running = [period_mass(k - 2, -inf_, c), zero, zero], [period_mass(k - 2, c, inf_), zero, zero]
        for j in range(max(k - 1, 1), periods):
            m, c = threshold(j), next_dose(j)
            quiet = (period_mass(j, -inf_, jnp.minimum(m, c)), period_mass(j, c, m))  # after an ended episode: no start; to (ended, running)
            new = (period_mass(j, m, c), period_mass(j, jnp.maximum(m, c), inf_))  # a start
            carried = (period_mass(j, -inf_, c), period_mass(j, c, inf_))  # after a running one: no start

            def to(i):  # the counts 0, 1, >= 2 landing in state i (0: ended by the next dose, 1: running)
                started = [0.0, ended[0] * new[i], (ended[1] + ended[2]) * new[i]]
                return [ended[n] * quiet[i] + running[n] * carried[i] + started[n] for n in range(3)]

            ended, running = to(0), to(1)
        return [x + y for x, y in zip(ended, running)]

    def expect_given_a(values):  # [..., J] conditional probabilities -> their expectation over a
        return jnp.sum(jnp.exp(total - norm[..., None]) * values, axis=-1)

    def from_dose(g):
        return lambda k: 1.0 - expect_given_a(start_counts(g, k)[0])

    out["crs_any_from_dose"], out["crs_grade2plus_from_dose"] = from_dose(0), from_dose(1)
    out["crs_recurrent"] = expect_given_a(start_counts(0, 1)[2])
    return out


# ---------------------------------------------------------------------------------------------
# Response
# ---------------------------------------------------------------------------------------------


def _first_true(flags, xp):
    """Index of the first True along the last axis, or the axis length."""
    n = flags.shape[-1]
    return xp.where(xp.any(flags, axis=-1), xp.argmax(flags, axis=-1), n)


def _best_log(values, first, xp):
    """log of the smallest value at the assessments before index `first` (the first assessment's when
    progression came first; unassessed slots are inf)."""
    idx = xp.arange(values.shape[-1])
    best = xp.min(xp.where(idx < xp.maximum(first, 1)[..., None], values, xp.inf), axis=-1)
    return xp.log(xp.maximum(best, 1e-30))


class ResponseMargins(NamedTuple):
    """Per patient: log margins r of each criterion (a response when delta <= r), the log of the best
    modelled burden b* (before progression; the first assessment's if progression came first), and the
    index of the first progression (the number of assessments when none)."""

    orr: object
    cr: object
    best_log: object
    first_pd: object
    progressed: object


def response_margins(kind: str, burden_at, marrow_fraction_at, baseline_volume_ml, baseline_blast_percent,
                     cr_residual_volume_ml: float, xp=np) -> ResponseMargins:
    """Response margins from the burden relative to baseline at the assessments ([..., A]; NaN where a
    slot was never assessed). `xp` is numpy (trial runner) or jax.numpy (calibration)."""
    if kind == "leukaemia":
        frac = xp.where(xp.isnan(marrow_fraction_at), 1.0, marrow_fraction_at)
        blasts = marrow_blast_percent(frac, baseline_blast_percent[..., None], xp)
        progressed = ~xp.isnan(marrow_fraction_at) & (blasts >= xp.minimum(baseline_blast_percent[..., None] * LEUKAEMIA_PD_BLAST_FOLD, 100.0))
        first = _first_true(progressed, xp)
        best = _best_log(xp.where(xp.isnan(marrow_fraction_at), xp.inf, marrow_fraction_at), first, xp)
        b0 = baseline_blast_percent / 100.0
        cr_fraction = LEUKAEMIA_CR_BLAST_PERCENT / 100.0 * (1.0 - b0) / xp.maximum(b0 * (1.0 - LEUKAEMIA_CR_BLAST_PERCENT / 100.0), 1e-12)
        r = xp.log(cr_fraction) - best
        return ResponseMargins(r, r, best, first, first < burden_at.shape[-1])
    assessed = ~xp.isnan(burden_at)
    b = xp.where(assessed, xp.maximum(burden_at, 0.0), 1.0)
    if kind in ("lymphoma", "solid"):  # lesions measured by SPD (volume^2/3) or by diameters (volume^1/3)
        measured = measured_fraction(kind, b)
        nadir = xp.concatenate([xp.ones_like(measured[..., :1]), measured[..., :-1]], axis=-1)
        nadir = _cummin(nadir, xp)
        measurable = b * baseline_volume_ml[..., None] > cr_residual_volume_ml
        # PR threshold on the measure, and the power that turns the measure back into volume.
        pd_fold, pr_measured, to_volume = ((LYMPHOMA_PD_SPD_FOLD, LYMPHOMA_PR_SPD_FRACTION, 1.5) if kind == "lymphoma"
                                           else (SOLID_PD_DIAMETER_FOLD, SOLID_PR_DIAMETER_FRACTION, 3.0))
        progressed = assessed & (measured >= pd_fold * nadir) & measurable
        pr, cr = pr_measured ** to_volume, cr_residual_volume_ml / xp.maximum(baseline_volume_ml, 1e-12)
    else:
        nadir = _cummin(xp.concatenate([xp.ones_like(b[..., :1]), b[..., :-1]], axis=-1), xp)
        progressed = assessed & (b >= MYELOMA_PD_BURDEN_FOLD * nadir) & (b - nadir >= MYELOMA_PD_MIN_RISE_FRACTION)
        pr, cr = MYELOMA_PR_BURDEN_FRACTION, MYELOMA_CR_BURDEN_FRACTION
    first = _first_true(progressed, xp)
    best = _best_log(xp.where(assessed, b, xp.inf), first, xp)
    # A CR is a response: where the CR residual is the easier bar (a baseline tumour of a few mL), it
    # sets the ORR margin too, as `best_response` counts it.
    return ResponseMargins(xp.log(xp.maximum(pr, cr)) - best, xp.log(cr) - best, best, first, first < burden_at.shape[-1])


def _cummin(x, xp):
    if xp is np:
        return np.minimum.accumulate(x, axis=-1)
    import jax

    return jax.lax.cummin(x, axis=x.ndim - 1)


def best_response(m: ResponseMargins, delta) -> np.ndarray:
    """Index into RESPONSES per patient at assessment effects delta (host side): the best response at
    the assessments before progression, PD when progression came at the first assessment."""
    before_pd = m.first_pd > 0
    return np.where(before_pd & (m.cr >= delta), 0, np.where(before_pd & (m.orr >= delta), 1, np.where(before_pd, 2, 3)))


def response_probabilities(m: ResponseMargins, omega) -> dict[str, Array]:
    """Expectation over delta ~ N(0, omega^2) of the trial's ORR and CR (calibration)."""
    before_pd = m.first_pd > 0
    return {"orr": jnp.where(before_pd, jstats.norm.cdf(m.orr / omega), 0.0),
            "cr": jnp.where(before_pd, jstats.norm.cdf(m.cr / omega), 0.0)}
