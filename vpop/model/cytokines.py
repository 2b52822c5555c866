r"""The cytokine cascade behind cytokine release syndrome (CRS).

Serum cytokines are in pg/mL. Engaged activated T cells (see `engagement.engaged_fraction`), in
units of 1e9 cells, give the T-cell release signal

$$ s(t) = s_0(t)\,(1 - D_{max} D)\,(1 - I_{dex}), \qquad s_0 = \sum_c w_c A_c \epsilon_c $$

with $w_c$ the systemic reach of each compartment, $D$ a priming/desensitisation state and
$I_{dex}$ the dexamethasone inhibition. Then

$$
\begin{aligned}
\dot{\mathrm{IFN}} &= \sigma_{IFN} + k_{IFN}\, s - k^{el}_{IFN}\,\mathrm{IFN},\qquad
\dot{\mathrm{TNF}} = \sigma_{TNF} + k_{TNF}\, s - k^{el}_{TNF}\,\mathrm{TNF} \\
\dot M &= k_M\, \zeta\, (h_{IFN} + h_{TNF})\,(1 - M) - k^{off}_M M,
  \qquad \zeta = \frac{1}{1 + \mathrm{IL10}/IC_{50,10}} \\
\dot{\mathrm{IL6}} &= \sigma_6 + k_{6T}\, s + k_{6M}\, M (1 - I_{dex})
  - (k^{el}_{6} + k^{R}_{6}\, \theta)\,\mathrm{IL6} \\
\dot{\mathrm{IL10}} &= \sigma_{10} + k_{10}(s + k_{10M} M) - k^{el}_{10}\mathrm{IL10} \\
\dot D &= k_D \frac{s_0}{s_{50} + s_0}(1 - D) - D/\tau_D
\end{aligned}
$$

$M$ is myeloid (monocyte/macrophage) activation, driven by the T-cell cytokines IFN-g and TNF-a
(Li 2019 Sci Transl Med 11:eaax8861) through saturating terms of each one's excess over baseline,
$h_x = u^n/(1 + u^n)$ with $u = (x - x_0)_+/EC_{50,x}$: the myeloid amplification of the T-cell
signal, switch-like ($n = 2$) so that small cytokine excesses do not keep monocytes active.
$\theta$ is the fraction of IL-6 receptor free of tocilizumab. IL-6 *signalling*
$\mathrm{IL6}\cdot\theta$ is what drives CRS; serum IL-6 rises under tocilizumab because
receptor-mediated clearance $k^R_6\theta$ is lost.
$s_0$ is $s$ before desensitisation and dexamethasone. Baseline levels set the basal sources
$\sigma_x$ so that the untreated patient is at rest.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import Array

from vpop.model.compartments import ByCompartment


class Cytokines(NamedTuple):
    """Systemic cytokine state of one patient."""

    il6_pg_ml: Array
    ifng_pg_ml: Array
    tnfa_pg_ml: Array
    il10_pg_ml: Array
    myeloid_activation: Array  # fraction of the myeloid pool activated, 0..1
    desensitisation: Array  # priming/desensitisation state D, 0..1
    margination: Array  # post-administration trafficking pulse m(t), one unit per administration


class CytokineParams(NamedTuple):
    baseline_il6_pg_ml: Array
    baseline_ifng_pg_ml: Array
    baseline_tnfa_pg_ml: Array
    baseline_il10_pg_ml: Array
    k_el_il6_per_day: Array  # total IL-6 elimination with all receptors free (t1/2 ~20 min)
    il6_receptor_clearance_fraction: Array  # share of that elimination that is receptor-mediated
    k_el_ifng_per_day: Array
    k_el_tnfa_per_day: Array
    k_el_il10_per_day: Array
    k_ifng_pg_ml_per_day: Array  # IFN-g release per 1e9 engaged activated T cells
    k_tnfa_pg_ml_per_day: Array
    k_il6_t_pg_ml_per_day: Array  # direct T-cell IL-6 release per unit signal
    k_il6_myeloid_pg_ml_per_day: Array  # IL-6 release by fully activated myeloid cells
    k_il10_pg_ml_per_day: Array
    il10_myeloid_factor: Array
    k_myeloid_on_per_day: Array
    k_myeloid_off_per_day: Array
    ec50_ifng_pg_ml: Array
    myeloid_hill: Array  # steepness of myeloid activation by IFN-g and TNF-a excess
    ec50_tnfa_pg_ml: Array
    ic50_il10_pg_ml: Array
    tissue_reach: ByCompartment  # systemic reach w_c of release in each compartment (blood 1)
    k_desensitisation_per_day: Array
    desensitisation_ec50_1e9_cells: Array  # s_50
    desensitisation_max: Array  # D_max: largest fractional loss of release
    desensitisation_recovery_day: Array  # tau_D


def baseline(p: CytokineParams) -> Cytokines:
    z = jnp.zeros_like(p.baseline_il6_pg_ml)
    return Cytokines(p.baseline_il6_pg_ml, p.baseline_ifng_pg_ml, p.baseline_tnfa_pg_ml, p.baseline_il10_pg_ml, z, z, z)


def il6_signalling(c: Cytokines, receptor_free: Array) -> Array:
    """IL-6 signalling (pg/mL of receptor-accessible IL-6): serum IL-6 x free-receptor fraction."""
    return c.il6_pg_ml * receptor_free


def t_cell_signal(engaged_active: ByCompartment, p: CytokineParams) -> Array:
    """Engaged activated T cells (1e9), weighted by the systemic reach of each compartment."""
    return (engaged_active * p.tissue_reach).total()


def _excess_hill(x: Array, x0: Array, ec50: Array, n: Array) -> Array:
    excess = jnp.maximum(x - x0, 0.0) / ec50
    excess_n = jnp.exp(n * jnp.log(jnp.maximum(excess, 1e-12)))
    return excess_n / (1.0 + excess_n)


def rates(
    c: Cytokines,
    signal: Array,
    receptor_free: Array,
    dex_inhibition: Array,
    margination_half_life_day: Array,
    p: CytokineParams,
) -> tuple[Cytokines, Cytokines]:
    """Production (units/day) and loss (1/day) of the cytokine states; signal is $s_0$."""
    release = signal * (1.0 - p.desensitisation_max * c.desensitisation) * (1.0 - dex_inhibition)
    k6_receptor = p.k_el_il6_per_day * p.il6_receptor_clearance_fraction
    k6_other = p.k_el_il6_per_day - k6_receptor
    # Myeloid cells are driven by each T-cell cytokine's excess over its baseline, so the untreated
    # patient is at rest with the myeloid pool inactive.
    drive_m = _excess_hill(c.ifng_pg_ml, p.baseline_ifng_pg_ml, p.ec50_ifng_pg_ml, p.myeloid_hill) + _excess_hill(
        c.tnfa_pg_ml, p.baseline_tnfa_pg_ml, p.ec50_tnfa_pg_ml, p.myeloid_hill
    )
    on = p.k_myeloid_on_per_day * drive_m / (1.0 + c.il10_pg_ml / p.ic50_il10_pg_ml)
    desens_drive = p.k_desensitisation_per_day * signal / (p.desensitisation_ec50_1e9_cells + signal)

    production = Cytokines(
        il6_pg_ml=p.k_el_il6_per_day * p.baseline_il6_pg_ml
        + p.k_il6_t_pg_ml_per_day * release
        + p.k_il6_myeloid_pg_ml_per_day * c.myeloid_activation * (1.0 - dex_inhibition),
        ifng_pg_ml=p.k_el_ifng_per_day * p.baseline_ifng_pg_ml + p.k_ifng_pg_ml_per_day * release,
        tnfa_pg_ml=p.k_el_tnfa_per_day * p.baseline_tnfa_pg_ml + p.k_tnfa_pg_ml_per_day * release,
        il10_pg_ml=p.k_el_il10_per_day * p.baseline_il10_pg_ml
        + p.k_il10_pg_ml_per_day * (release + p.il10_myeloid_factor * c.myeloid_activation),
        myeloid_activation=on,
        desensitisation=desens_drive,
        margination=jnp.zeros_like(c.margination),
    )
    loss = Cytokines(
        il6_pg_ml=k6_other + k6_receptor * receptor_free,
        ifng_pg_ml=jnp.broadcast_to(p.k_el_ifng_per_day, jnp.shape(c.ifng_pg_ml)),
        tnfa_pg_ml=jnp.broadcast_to(p.k_el_tnfa_per_day, jnp.shape(c.tnfa_pg_ml)),
        il10_pg_ml=jnp.broadcast_to(p.k_el_il10_per_day, jnp.shape(c.il10_pg_ml)),
        myeloid_activation=on + p.k_myeloid_off_per_day,
        desensitisation=desens_drive + 1.0 / p.desensitisation_recovery_day,
        margination=jnp.broadcast_to(jnp.log(2.0) / margination_half_life_day, jnp.shape(c.margination)),
    )
    return production, loss
