r"""Supportive and co-medications: their pharmacodynamics (their PK is `vpop.model.pk`).

- Tocilizumab blocks the IL-6 receptor. With plasma concentration $C$ and dissociation constant
  $K_d$, the free-receptor fraction is $\theta = 1/(1 + C/K_d)$ (equilibrium, one site).
- Dexamethasone inhibits cytokine production, $I = I_{max} C_e/(IC_{50} + C_e)$, and barely T-cell
  killing (Brandl 2007): a separate, small $I^{kill}_{max}$. It acts through an effect compartment,
  $\dot C_e = k (C - C_e)$ (nM), because glucocorticoid effects on gene expression outlast the
  ~4 h plasma half-life by days: $k = k_{e0}$, or, with an onset rate $k_{on} > 0$, $k = k_{on}$ while
  $C > C_e$ (the effect builds as fast as the receptor fills) and $k_{e0}$ while it wanes.
- An anti-CD20 antibody (obinutuzumab pretreatment) kills CD20+ cells directly,
  $k\, C/(EC_{50} + C)$, fastest in blood.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import Array

from vpop.model.compartments import ByCompartment


class SupportiveState(NamedTuple):
    """Pharmacodynamic state of the co-medications."""

    dexamethasone_effect_nm: Array  # C_e: effect-site dexamethasone


class SupportiveParams(NamedTuple):
    tocilizumab_kd_mg_per_l: Array  # IL-6R dissociation constant, as mg/L of tocilizumab
    dexamethasone_mw_g_per_mol: Array
    dexamethasone_ke0_per_day: Array  # k_e0 of the effect compartment (its rate while the effect wanes)
    dexamethasone_onset_per_day: Array  # k_on: its rate while plasma is above the effect site; 0: k_e0
    dexamethasone_ic50_nm: Array  # of the effect-site concentration
    dexamethasone_imax_cytokine: Array
    dexamethasone_imax_kill: Array
    anti_cd20_k_kill_per_day: ByCompartment  # maximal killing of CD20+ cells per compartment
    anti_cd20_ec50_mg_per_l: Array
    anti_cd20_binds_malignant: Array  # 1 if the malignant cells are CD20+


def il6_receptor_free_fraction(tocilizumab_mg_per_l: Array, p: SupportiveParams) -> Array:
    return 1.0 / (1.0 + tocilizumab_mg_per_l / p.tocilizumab_kd_mg_per_l)


def dexamethasone_nm(dexamethasone_mg_per_l: Array, p: SupportiveParams) -> Array:
    return dexamethasone_mg_per_l * 1e6 / p.dexamethasone_mw_g_per_mol


def dexamethasone_inhibition(state: SupportiveState, p: SupportiveParams) -> tuple[Array, Array]:
    """Fractional inhibition of (cytokine production, T-cell killing) by effect-site dexamethasone."""
    c = state.dexamethasone_effect_nm
    occupancy = c / (p.dexamethasone_ic50_nm + c)
    return p.dexamethasone_imax_cytokine * occupancy, p.dexamethasone_imax_kill * occupancy


def rates(state: SupportiveState, dexamethasone_mg_per_l: Array, p: SupportiveParams) -> tuple[SupportiveState, SupportiveState]:
    """Production (nM/day) and loss (1/day) of the effect-site dexamethasone."""
    plasma = dexamethasone_nm(dexamethasone_mg_per_l, p)
    by_direction = jnp.where(plasma > state.dexamethasone_effect_nm, p.dexamethasone_onset_per_day, p.dexamethasone_ke0_per_day)
    k = jnp.where(p.dexamethasone_onset_per_day > 0.0, by_direction, p.dexamethasone_ke0_per_day)
    k = jnp.broadcast_to(k, jnp.shape(state.dexamethasone_effect_nm))
    return SupportiveState(k * plasma), SupportiveState(k)


def anti_cd20_kill(anti_cd20_mg_per_l: Array, p: SupportiveParams) -> tuple[ByCompartment, ByCompartment]:
    """Per-day killing of (normal B cells, malignant cells) by an anti-CD20 antibody."""
    k = p.anti_cd20_k_kill_per_day * (anti_cd20_mg_per_l / (p.anti_cd20_ec50_mg_per_l + anti_cd20_mg_per_l))
    return k, k * p.anti_cd20_binds_malignant
