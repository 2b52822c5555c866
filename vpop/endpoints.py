r"""Clinical endpoints from simulated patients: CRS grades per dose period, rescue, tumour response.

CRS (on device, inside the simulation). A latent severity

$$ z(t) = \log \mathrm{IL6sig}(t) + w_{IFN} \log\frac{\mathrm{IFN}(t)}{\mathrm{IFN}_0} + \log s_i $$

combines IL-6 signalling (pg/mL), IFN-g above its baseline and the patient's susceptibility $s_i$
(log-normal between patients). ASTCT grade $g$ is reached when $z$ crosses $\log \theta_g$ with
$\theta_1 < \theta_2 = f_2\theta_1 < \theta_3 = f_3\theta_2 < \theta_4 = f_4\theta_3$; the grade of a
dose period is that of its largest $z$ (CRS starting after the k-th administration). Onset is the
first crossing of $\theta_1$ after the administration, duration the time spent above it. Rescue
happens in the simulation, so it changes the rest of the trajectory: reaching grade 2 gives
tocilizumab 8 mg/kg (at most 800 mg), grade 3 adds dexamethasone, once each per dose period.

Response (on the host, from the burden recorded at the assessment days):
- lymphoma: SPD ~ volume^(2/3); PR at >= 50% decrease from baseline, CR when the residual volume is
  below a threshold, PD at >= 50% increase from nadir (Cheson 2007, as in the pivotal trials; Lugano
  2014 judges progression lesion by lesion, which one tumour compartment cannot); best overall
  response is the best before progression;
- leukaemia: CR/CRh when marrow blasts fall below 5% (counts are not modelled, so CR and CRh are one);
- myeloma: PR at >= 50% and CR at >= 99% reduction of the malignant burden (an M-protein proxy).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import Array

RESPONSES = ("CR", "PR", "SD", "PD")
RESPONSE_KINDS = ("lymphoma", "leukaemia", "myeloma")

# Response criteria (shared by the 0/1 endpoints here and the smooth rates of `vpop.calibrate`).
LYMPHOMA_PR_SPD_FRACTION = 0.5  # PR: SPD <= 50% of baseline (Cheson 2007 J Clin Oncol 25:579)
LYMPHOMA_PD_SPD_FOLD = 1.5  # PD: SPD >= 150% of nadir (Cheson 2007)
LEUKAEMIA_CR_BLAST_PERCENT = 5.0  # CR/CRh: marrow blasts < 5% (Topp 2015 Lancet Oncol 16:57; Kantarjian 2017 NEJM 376:836)
LEUKAEMIA_PD_BLAST_FOLD = 1.25  # PD: blasts >= 125% of baseline [G]
MYELOMA_PR_BURDEN_FRACTION = 0.5  # PR: >= 50% reduction (IMWG, Kumar 2016 Lancet Oncol 17:e328)
MYELOMA_CR_BURDEN_FRACTION = 0.01  # CR proxy: >= 99% reduction of the malignant pool [G]
MYELOMA_PD_BURDEN_FOLD = 1.25  # PD: >= 25% increase from nadir (IMWG)
# PD also needs an absolute rise (IMWG asks >= 0.5 g/dL of M-protein besides the 25%): here a rise of at
# least 5% of the baseline burden [G], so that regrowth from a (near-)zero nadir is not progression.
MYELOMA_PD_MIN_RISE_FRACTION = 0.05


def spd_fraction(volume_fraction):
    """SPD relative to baseline from tumour volume relative to baseline (SPD ~ volume^(2/3))."""
    return volume_fraction ** (2.0 / 3.0)


def marrow_blast_percent(marrow_fraction, baseline_percent, xp=np):
    """Marrow blasts (%) when the blasts are `marrow_fraction` of their baseline `baseline_percent`
    (normal marrow cells held at their baseline). `xp` is numpy or jax.numpy."""
    b0 = baseline_percent / 100.0
    frac = b0 * marrow_fraction
    return 100.0 * frac / xp.maximum(frac + 1.0 - b0, 1e-12)


class CRSParams(NamedTuple):
    grade1_il6_signalling_pg_ml: Array  # theta_1 at typical susceptibility and baseline IFN-g
    grade2_fold: Array  # theta_2 / theta_1
    grade3_fold: Array
    grade4_fold: Array
    ifng_weight: Array  # w_IFN
    susceptibility: Array  # s_i, 1 for the typical patient (log-normal variability)
    rescue: Array  # 1: treat CRS in the simulation (tocilizumab at grade 2, dexamethasone at grade 3)
    rescue_tocilizumab_mg_per_kg: Array
    rescue_tocilizumab_max_mg: Array
    rescue_dexamethasone_mg: Array


def log_thresholds(p: CRSParams) -> Array:
    """[4] log theta_g for grades 1-4."""
    steps = jnp.stack([jnp.log(p.grade1_il6_signalling_pg_ml), jnp.log(p.grade2_fold), jnp.log(p.grade3_fold), jnp.log(p.grade4_fold)])
    return jnp.cumsum(steps)


def severity(il6_signalling_pg_ml: Array, ifng_pg_ml: Array, ifng_baseline_pg_ml: Array, p: CRSParams) -> Array:
    """Latent CRS severity z (log pg/mL scale)."""
    return (jnp.log(jnp.maximum(il6_signalling_pg_ml, 1e-6)) + p.ifng_weight * jnp.log(jnp.maximum(ifng_pg_ml / ifng_baseline_pg_ml, 1.0))
            + jnp.log(p.susceptibility))


def grade(z: Array, p: CRSParams) -> Array:
    """ASTCT grade 0-4 for severity z (works on any shape of z)."""
    return jnp.sum(z[..., None] >= log_thresholds(p), axis=-1)


# ---------------------------------------------------------------------------------------------
# Host side: response and the endpoint table
# ---------------------------------------------------------------------------------------------


def lymphoma_response(burden_at: np.ndarray, baseline_volume_ml: np.ndarray, cr_residual_volume_ml: float):
    """Best overall response per patient from burden/baseline at the assessments ([n, A]).

    Returns (best response as an index into RESPONSES, day index of first progression or -1)."""
    spd = spd_fraction(np.maximum(burden_at, 0.0))
    nadir = np.minimum.accumulate(np.concatenate([np.ones((len(spd), 1)), spd], axis=1), axis=1)[:, :-1]
    volume = burden_at * baseline_volume_ml[:, None]
    # Progression needs a measurable lesion again (above the CR residual), not just regrowth from nadir.
    progressed = (spd >= LYMPHOMA_PD_SPD_FOLD * nadir) & (volume > cr_residual_volume_ml)
    first_pd = np.where(progressed.any(axis=1), progressed.argmax(axis=1), -1)
    level = np.where(volume <= cr_residual_volume_ml, 0, np.where(spd <= LYMPHOMA_PR_SPD_FRACTION, 1, np.where(progressed, 3, 2)))
    before_pd = np.arange(spd.shape[1])[None, :] < np.where(first_pd < 0, spd.shape[1], first_pd)[:, None]
    best = np.where(before_pd, level, 3).min(axis=1)
    return best, first_pd


def leukaemia_response(marrow_fraction_at: np.ndarray, baseline_percent: np.ndarray):
    """CR/CRh (index 0) when marrow blasts fall below 5%; else SD, or PD if blasts rise by 25%."""
    blasts = marrow_blast_percent(marrow_fraction_at, baseline_percent[:, None])
    cr = (blasts < LEUKAEMIA_CR_BLAST_PERCENT).any(axis=1)
    progressed = blasts >= np.minimum(baseline_percent[:, None] * LEUKAEMIA_PD_BLAST_FOLD, 100.0)
    first_pd = np.where(progressed.any(axis=1), progressed.argmax(axis=1), -1)
    best = np.where(cr, 0, np.where(first_pd >= 0, 3, 2))
    return best, first_pd


def myeloma_response(burden_at: np.ndarray):
    """CR at >= 99%, PR at >= 50% reduction of the malignant burden; PD at >= 25% above nadir and a
    rise of at least `MYELOMA_PD_MIN_RISE_FRACTION` of baseline (a patient at zero burden is in CR,
    not progressing)."""
    nadir = np.minimum.accumulate(np.concatenate([np.ones((len(burden_at), 1)), burden_at], axis=1), axis=1)[:, :-1]
    progressed = (burden_at >= MYELOMA_PD_BURDEN_FOLD * nadir) & (burden_at - nadir >= MYELOMA_PD_MIN_RISE_FRACTION)
    first_pd = np.where(progressed.any(axis=1), progressed.argmax(axis=1), -1)
    level = np.where(burden_at <= MYELOMA_CR_BURDEN_FRACTION, 0, np.where(burden_at <= MYELOMA_PR_BURDEN_FRACTION, 1, np.where(progressed, 3, 2)))
    before_pd = np.arange(burden_at.shape[1])[None, :] < np.where(first_pd < 0, burden_at.shape[1], first_pd)[:, None]
    return np.where(before_pd, level, 3).min(axis=1), first_pd
