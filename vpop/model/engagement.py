r"""T-cell engagement by a bispecific: activation propensity and target-cell killing (Hosseini 2020).

Per-compartment quantities are `ByCompartment` values (blood, lymphoid tissue, bone marrow, tumour).
Cell numbers are in units of 1e9 cells, drug concentrations in ng/mL.

Activation of resting (and post-activated) T cells, per day,

$$ \alpha_c = k_{act}\, V_{mT}\, f_c\, \frac{\rho_c^S}{K_{mBT}^S + \rho_c^S}\, \frac{C_c^n}{K_{act}^n + C_c^n} $$

with $\rho_c$ the target-to-T-cell ratio and $f_c = 1$ in blood, $f_{Tact}$ in tissues. Killing of a
target cell, per day,

$$ \kappa_c = k_{kill}\, g_c\, V_{mB}\, \frac{e_c^{m}}{(h_c K_{mTB})^{m} + e_c^{m}}\, \frac{C_c}{K_{kill} + C_c} $$

with $e_c$ the activated-T-to-target ratio, $g_c = 1$ in blood and $f_{Bkill}$ in tissues, and
$h_c = 1$ in blood and $f_{KmTB}$ in tissues (tissues are not well stirred).

The engaged, cytokine-secreting activated T cells are $A_c$ times the same two saturations as
activation; `engaged_fraction` returns that product.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from vpop.model.compartments import ByCompartment, cmap

_TINY = 1e-12


class EngagementParams(NamedTuple):
    """Potency of one bispecific on T-cell activation and target killing (Hosseini 2020 form)."""

    kd_activation_ng_ml: Array  # drug concentration of half-maximal activation (KdrugactT)
    hill_activation: Array  # Hill coefficient on drug for activation (ndrugactT)
    kd_kill_ng_ml: Array  # drug concentration of half-maximal killing (KdrugB)
    vmax_activation: Array  # VmT
    km_target_per_t: Array  # target:T ratio of half-maximal activation (KmBT_act)
    hill_target: Array  # S
    tissue_activation_factor: Array  # fTact
    vmax_kill: Array  # VmB
    km_effector_per_target: Array  # activated-T:target ratio of half-maximal killing (KmTB_kill)
    hill_kill: Array  # nkill
    k_kill_per_day: Array  # kBkill
    tissue_kill_factor: Array  # fBkill
    tissue_km_factor: Array  # fKmTB_kill
    binds_normal_b: Array  # 1 if normal B cells carry the target (CD20, CD19), else 0
    binds_malignant: Array  # 1 if the malignant cells carry the target
    normal_tissue_targets: Array  # 1e9 normal non-B cells carrying the target (tebentafusp: gp100+ melanocytes), see `targets`
    partition: ByCompartment  # tissue:plasma drug concentration ratio Kp (blood 1)


def log_of(x) -> ByCompartment:
    """Elementwise log, floored at a tiny positive number (so that empty compartments stay finite)."""
    return cmap(lambda v: jnp.log(jnp.maximum(v, _TINY)), x)


def hill_log(log_x, n):
    """x^n / (1 + x^n) from log x: one exponential, finite gradients everywhere."""
    return cmap(lambda lx: jax.nn.sigmoid(n * lx), log_x) if isinstance(log_x, ByCompartment) else jax.nn.sigmoid(n * log_x)


def compartment_concentration_ng_ml(plasma_mg_per_l: Array, p: EngagementParams) -> ByCompartment:
    """Free drug concentration in each compartment, ng/mL."""
    return p.partition * (1000.0 * plasma_mg_per_l)


def targets(normal_b: ByCompartment, malignant: ByCompartment, p: EngagementParams) -> ByCompartment:
    """Target-bearing cells per compartment (1e9 cells): normal B cells, malignant cells and normal
    tissue cells outside the B lineage that carry the target (tebentafusp's gp100+ skin melanocytes).
    The model has no skin: those cells sit in the lymphoid compartment, its one normal tissue with
    resident T cells, as a constant pool. They engage T cells
    (activation, cytokine release) but their loss is not followed: skin melanocytes fall only partly on
    treatment (Hassel et al. J Invest Dermatol 2024, PMID 39019150)."""
    normal_tissue = ByCompartment(0.0, p.normal_tissue_targets, 0.0, 0.0)
    return normal_b * p.binds_normal_b + malignant * p.binds_malignant + normal_tissue


def occupancy(log_conc: ByCompartment, p: EngagementParams) -> ByCompartment:
    """Drug saturation of activation, $C^n/(K_{act}^n + C^n)$, from log concentration (ng/mL); computed
    once per step and shared by activation and the primed levels' forgetting (`cytokines.rates`)."""
    return hill_log(log_conc - jnp.log(p.kd_activation_ng_ml), p.hill_activation)


def engaged_fraction(drug_occupancy: ByCompartment, log_target: ByCompartment, log_t_available: ByCompartment,
                     p: EngagementParams) -> ByCompartment:
    """Drug occupancy (`occupancy`) x target-availability saturation shared by activation and secretion
    (target and T-cell arguments are logs of cell numbers: the Hill function is computed in log space)."""
    ratio = log_target - log_t_available - jnp.log(p.km_target_per_t)
    return hill_log(ratio, p.hill_target) * drug_occupancy


def activation_rate(engaged: ByCompartment, k_activation_per_day: Array, p: EngagementParams) -> ByCompartment:
    """Per-day activation rate of resting and post-activated T cells."""
    tissue = ByCompartment.blood_and_tissues(1.0, p.tissue_activation_factor)
    return engaged * tissue * (k_activation_per_day * p.vmax_activation)


def kill_rate(conc_ng_ml: ByCompartment, log_t_active: ByCompartment, log_target: ByCompartment,
              p: EngagementParams) -> ByCompartment:
    """Per-day killing rate of each target-bearing cell."""
    log_km = ByCompartment.blood_and_tissues(jnp.log(p.km_effector_per_target), jnp.log(p.km_effector_per_target * p.tissue_km_factor))
    saturation = hill_log(log_t_active - log_target - log_km, p.hill_kill)
    drug = conc_ng_ml / (conc_ng_ml + p.kd_kill_ng_ml)
    tissue = ByCompartment.blood_and_tissues(1.0, p.tissue_kill_factor)
    return saturation * drug * tissue * (p.k_kill_per_day * p.vmax_kill)
