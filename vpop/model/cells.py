r"""Cell populations: T cells (resting, activated, post-activated), normal B cells and malignant cells.

Each population is a `ByCompartment` value (blood, lymphoid tissue, bone marrow, tumour), in
units of 1e9 cells. Blood exchanges cells with each tissue $c$:

$$ J_c = k\,\frac{V_{blood}}{V^{ref}_c}\,\Big(g\,K_c\,\frac{V_c}{V_{blood}} N_{blood} - N_c\Big) $$

so that at rest the tissue concentration is $K_c$ times the blood concentration. With
$V^{ref}_c = V_c$ this is Hosseini's exchange; for the tumour, $V^{ref}$ is Hosseini's reference
tumour (100 mL), so cells leave a tumour at a fixed per-cell rate and enter in proportion to its size
(rather than leaving a small tumour at a rate that grows without bound as it shrinks). For T cells the
blood-to-tissue term carries the post-dose margination factor $g = 1 + f_{drug} m(t)$, $m$ a pulse
set by each administration that decays with a 1-day half-life (Hosseini 2020).

T cells (Hosseini 2020): resting $R$ and post-activated $P$ cells are activated at rate
$\alpha_c$ (see `engagement`); activated cells $A$ give rise to post-activated daughters at rate
$f_{prolif} k_{prolif}$, die at $k_{apop}(1 + f_{AICD} A/A_{ref})$ (activation-induced cell death)
and traffic with their own partition $f_{Tap} K_c$. Resting cells return to their baseline by a
homeostatic source in blood $k_{gen} R^0_{blood}(1 - T_{blood}/T^0_{blood})_+^2$ and apoptosis
above baseline.

Normal B cells regrow towards their own baseline, $k_{regen} B^0 (1 - B/B^0)_+$, and are killed at
$\kappa_c$. Malignant cells come in two clones. The susceptible clone $M$ grows logistically,
$k_{grow} M (1 - M/(\phi (1-f) M^0))$, is killed at $\kappa_c$ scaled by a disease-specific
susceptibility (and by an anti-CD20 antibody where present), and, for leukaemia, exchanges between
marrow and blood. The refractory clone $R$, a share $f$ of the patient's burden $M^0$ at the start,
grows alike, $k_{grow} R (1 - R/(\phi f M^0_{tot}))$, and is neither engaged nor killed: cells that
lack the target or escape T-cell killing (antigen-negative clones, a protective niche). It is one
total, distributed over the compartments as the burden was at the start. It caps how deep a
response can go (a patient with $f$ above the PR or CR bar cannot reach it at any exposure) and
regrows as the antigen-negative relapses seen after CD20, CD19 and BCMA engagers do.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import Array

from vpop.model.compartments import ByCompartment, cmap, maximum

_TINY = 1e-12


class Cells(NamedTuple):
    """Cell numbers per compartment, 1e9 cells."""

    t_resting: ByCompartment
    t_active: ByCompartment
    t_post: ByCompartment
    b_normal: ByCompartment
    malignant: ByCompartment  # the susceptible clone
    refractory: Array  # the refractory clone, all compartments together (see the module docstring)


class TCellParams(NamedTuple):
    k_activation_per_day: Array  # kTact
    k_prolif_per_day: Array  # kTprolif
    prolif_factor: Array  # fTaprolif
    k_apop_active_per_day: Array  # kTaapop
    aicd_factor: Array  # fAICD
    apop_post_factor: Array  # fTa0apop
    apop_resting_factor: Array  # fTrapop
    deactivation_factor: Array  # fTadeact
    k_homeostasis_per_day: Array  # kTgen
    k_exit_resting_per_day: Array  # kTrexit
    k_exit_active_per_day: Array  # kTaexit
    active_partition_factor: Array  # fTap
    partition: ByCompartment  # tissue:blood concentration ratio of resting T cells (blood 1)
    margination_factor: Array  # fdrug
    margination_half_life_day: Array  # tinjhalf


class BCellParams(NamedTuple):
    k_regen_per_day: Array  # kBprolif
    k_traffic_per_day: Array  # blood-tissue exchange rate
    partition: ByCompartment  # tissue:blood concentration ratio (tumour 0)


class MalignantParams(NamedTuple):
    k_growth_per_day: Array  # net growth rate of the malignant clone
    kill_factor: Array  # susceptibility to T-cell killing relative to normal B cells (microenvironment)
    capacity_fold: Array  # carrying capacity as a multiple of the baseline burden
    k_traffic_per_day: Array  # marrow-blood exchange of leukaemic blasts (0 for solid tumours)
    blood_partition: Array  # marrow:blood blast concentration ratio at rest
    refractory_fraction: Array  # f: the refractory clone's share of the burden at the start (typical: the median)
    refractory_logit_sd: Array  # SD of logit f between patients (population.individual_params draws each f)


class Body(NamedTuple):
    """One patient's physiology and baseline (set-point) cell numbers."""

    volume_ml: ByCompartment
    exchange_volume_ml: ByCompartment  # V_ref of blood-tissue exchange (the volume, or a reference tumour)
    t_baseline: ByCompartment  # resting T cells at rest, 1e9
    b_baseline: ByCompartment  # normal B cells at rest, 1e9
    malignant_baseline: ByCompartment  # malignant cells at treatment start (both clones), 1e9


class _Exchange(NamedTuple):
    to_tissue: ByCompartment  # per blood cell, towards each tissue (blood entry unused)
    back: ByCompartment  # per tissue cell, back to blood (blood entry unused)

    def loss(self) -> ByCompartment:
        """Per-cell loss: blood loses to every tissue, each tissue returns to blood."""
        return self.back._replace(blood=self.to_tissue.tissues)

    def production(self, n: ByCompartment) -> ByCompartment:
        """Inflow: blood gains every tissue's return, each tissue its share of blood."""
        inflow = self.to_tissue * n.blood
        return inflow._replace(blood=(self.back * n).tissues)


def _exchange(k, partition: ByCompartment, margination, body: Body) -> _Exchange:
    vol, ref = body.volume_ml, body.exchange_volume_ml
    return _Exchange(to_tissue=partition * vol / ref * (k * margination), back=(vol.blood * k) / ref)


def rates(
    cells: Cells,
    activation: ByCompartment,
    kill_normal_b: ByCompartment,
    kill_malignant: ByCompartment,
    margination: Array,
    tp: TCellParams,
    bp: BCellParams,
    mp: MalignantParams,
    body: Body,
) -> tuple[Cells, Cells]:
    """Production (1e9 cells/day) and loss (1/day) of every cell population.

    activation: per-day activation rate of resting T cells (see `engagement`);
    kill_normal_b, kill_malignant: per-day killing rates of each cell type;
    margination: the post-dose pulse m(t).
    """
    # Resting and post-activated T cells traffic alike (with margination); activated cells with
    # their own partition.
    ex_r = _exchange(tp.k_exit_resting_per_day, tp.partition, 1.0 + tp.margination_factor * margination, body)
    ex_a = _exchange(tp.k_exit_active_per_day, tp.partition * tp.active_partition_factor, 1.0, body)
    r, a, post = cells.t_resting, cells.t_active, cells.t_post
    t_ref = maximum(body.t_baseline, _TINY)
    t_blood = r.blood + a.blood + post.blood
    homeostasis = tp.k_homeostasis_per_day * body.t_baseline.blood * jnp.maximum(1.0 - t_blood / t_ref.blood, 0.0) ** 2
    resting_excess = cmap(lambda x, ref: jnp.maximum(1.0 - ref / jnp.maximum(x, _TINY), 0.0), r, t_ref) * (
        tp.apop_resting_factor * tp.k_apop_active_per_day
    )
    deactivation = tp.deactivation_factor * tp.k_activation_per_day
    p_r = ex_r.production(r) + a * deactivation
    p_r = p_r._replace(blood=p_r.blood + homeostasis)
    l_r = ex_r.loss() + activation + resting_excess
    p_a = ex_a.production(a) + activation * (r + post)
    l_a = ex_a.loss() + (a / t_ref * tp.aicd_factor + 1.0) * tp.k_apop_active_per_day + deactivation
    p_p = ex_r.production(post) + a * (tp.prolif_factor * tp.k_prolif_per_day)
    l_p = ex_r.loss() + activation + tp.apop_post_factor * tp.k_apop_active_per_day

    # Normal B cells: regrowth to their own baseline, exchange, killing.
    b = cells.b_normal
    ex_b = _exchange(bp.k_traffic_per_day, bp.partition, 1.0, body)
    regrowth = cmap(lambda x, x0: x0 * jnp.maximum(1.0 - x / jnp.maximum(x0, _TINY), 0.0), b, body.b_baseline)
    p_b = ex_b.production(b) + regrowth * bp.k_regen_per_day
    l_b = ex_b.loss() + kill_normal_b

    # Malignant cells: logistic growth in place, marrow<->blood exchange for leukaemia, killing of the
    # susceptible clone; each clone is capped at capacity_fold times its own start.
    m = cells.malignant
    capacity = maximum(body.malignant_baseline * ((1.0 - mp.refractory_fraction) * mp.capacity_fold), _TINY)
    marrow_to_blood = mp.k_traffic_per_day
    blood_to_marrow = mp.k_traffic_per_day * mp.blood_partition * body.volume_ml.marrow / body.volume_ml.blood
    zero = jnp.zeros_like(m.blood)
    traffic_loss = ByCompartment(blood_to_marrow, zero, marrow_to_blood, zero)
    traffic_in = ByCompartment(marrow_to_blood * m.marrow, zero, blood_to_marrow * m.blood, zero)
    p_m = m * mp.k_growth_per_day + traffic_in
    l_m = m / capacity * mp.k_growth_per_day + kill_malignant + traffic_loss

    refractory_capacity = jnp.maximum(body.malignant_baseline.total() * mp.refractory_fraction * mp.capacity_fold, _TINY)
    p_res = cells.refractory * mp.k_growth_per_day
    l_res = cells.refractory / refractory_capacity * mp.k_growth_per_day

    production = Cells(p_r, p_a, p_p, p_b, p_m, p_res)
    loss = Cells(l_r, l_a, l_p, l_b, l_m, l_res)
    return production, loss
