r"""The cytokine cascade behind cytokine release syndrome (CRS), driven by new engagement.

Serum cytokines are in pg/mL. Cytokines are released when T cells are engaged *beyond what they have
already met*. In compartment $c$ (blood, lymphoid tissue, marrow, tumour) the engageable T cells
$R_c + P_c$ (resting and post-activated, 1e9) are activated at the per-cell rate $\alpha_c$ (1/day, see
`engagement.activation_rate`: drug occupancy x target availability). Releasing cytokines takes more
drug than activation does: $\tilde\alpha_c$ is the same rate with the drug concentration divided by the
release potency fold $\varphi \ge 1$ (T cells are killed by targets at 1e-12-1e-15 M antigen but make
IFN-g only above about 1e-9 M, with 20-50% of their receptors triggered: Valitutti et al. 1996 J Exp Med
183:1917). With $\varphi = 1$ (the default through 0.24) $\tilde\alpha_c = \alpha_c$; with $\varphi > 1$
a dose that saturates activation can still raise release, so CRS moves to the later, larger step-up
doses. $H_c$ is the primed level, the highest release rate the compartment's T cells have recently met:
it follows a rising $\tilde\alpha_c$ at rate $k_P$ and is forgotten with time constant $\tau_P$ only
while the drug is off board ($u_B$ is the drug's occupancy in blood, the drug factor of $\alpha$),

$$ \dot H_c = k_P\, (\tilde\alpha_c - H_c)_+ - (1 - u_B)\, H_c/\tau_P . $$

Only engagement beyond the primed level by more than a margin $\delta$ releases, weighted by the systemic
reach $w_c$ of each compartment (release in blood $w_B$, in lymphoid tissue and marrow $w_T$, in a tumour
$w_M$; each calibrated, $w_B$ = 1 through 0.23):

$$ s(t) = (1 - I_{dex}) \sum_c w_c\, (R_c + P_c)\, \big(\tilde\alpha_c - (1 + \delta) H_c\big)_+ . $$

The margin is the tuned activation threshold: a T cell adapted to a level of stimulation responds to
a relative rise above it, not to the level itself (Grossman & Singer 1996 PNAS 93:14747). Without it
the primed level, which follows $\alpha$ at the slow rate $k_P$, stayed 10-40% below the brief
post-infusion peaks of 3-weekly doses, and each of those peaks released again (0.6.0: 12% new CRS at
mosunetuzumab's second 60 mg, 7.5-9.7% at every glofitamab dose from C3D1; labels: single digits and
about 3%).

So what a dose releases follows how far its exposure exceeds the highest met before (CRS review, seed
002): a step-up dose releases its increment over the previous step, a repeated identical dose little
(its peak meets a primed level not forgotten while drug is on board), a standing exposure (T cells
trafficking into a tumour that holds drug) only until the primed level has reached it, and after
a treatment-free gap $\gg \tau_P$ a dose primes again as a first one (tolerance to continued stimulation
is reversed by treatment-free intervals: Philipp 2022 Blood 140:1104, doi:10.1182/blood.2022015956). The
gate on $u_B$ keeps the memory while drug is on board: forgotten at a constant rate, the primed level
fell below the brief post-infusion peaks of $\alpha$ between 3-weekly doses, and as tumour T cells
expanded each repeated dose released more (0.5.0: 5-10% new CRS per later mosunetuzumab dose). With released $s$:

$$
\begin{aligned}
\dot{\mathrm{IFN}} &= \sigma_{IFN} + k_{IFN}\, s - k^{el}_{IFN}\,\mathrm{IFN},\qquad
\dot{\mathrm{TNF}} = \sigma_{TNF} + k_{TNF}\, s - k^{el}_{TNF}\,\mathrm{TNF} \\
\dot M &= k_M\, \zeta\, (h_{IFN} + h_{TNF})\,(1 - M) - k^{off}_M M,
  \qquad \zeta = \frac{1}{1 + \mathrm{IL10}/IC_{50,10}} \\
\dot{\mathrm{IL6}} &= \sigma_6 + k_{6T}\, s + k_{6M}\, \mu M (1 - I_{dex})
  - (k^{el}_{6} + k^{R}_{6}\, \theta)\,\mathrm{IL6} \\
\dot{\mathrm{IL10}} &= \sigma_{10} + k_{10}(s + k_{10M} M) - k^{el}_{10}\mathrm{IL10}
\end{aligned}
$$

$M$ is myeloid (monocyte/macrophage) activation and $\mu$ the size of the myeloid pool relative to
normal (below 1 where the marrow has failed, as in relapsed ALL), driven by the T-cell cytokines IFN-g and TNF-a
(Li 2019 Sci Transl Med 11:eaax8861) through switch-like terms of each one's excess over baseline,
$h_x = u^n/(1 + u^n)$ with $u = (x - x_0)_+/EC_{50,x}$. $\theta$ is the fraction of IL-6 receptor free
of tocilizumab: IL-6 *signalling* $\mathrm{IL6}\cdot\theta$ falls under tocilizumab while serum IL-6
rises, because receptor-mediated clearance $k^R_6\theta$ is lost. Activated myeloid cells also make
the other pyrogens (IL-1b, and TNF-a with it); their output is expressed on the IL-6 scale as
$O = k_{6M} \mu M / k^{el}_6$ (pg/mL), which tocilizumab does not touch (see `vpop.endpoints`). Baseline
levels set the basal sources $\sigma_x$ so that the untreated patient is at rest.

Secretion delay. Killing uses the T cell's pre-formed granules, released within minutes of contact;
cytokines are made anew, so an engaged T cell secretes them hours later (granzyme B is secreted within
10 min of effector-target contact, most within 3-4 h, IFN-g most by 24 h, and brefeldin A, which blocks
new secretion through the Golgi, abrogates IFN-g but not granzyme B: Shafer-Weaver 2004 J Transl Med
2:31). With a secretion delay $\tau_S > 0$ the released drive passes through two stages of mean
$\tau_S/2$ each, committed $Q_1$ and secreting $Q_2$ (1e9 cells/day), and $Q_2$ replaces $s$ above:

$$ \dot Q_1 = \tfrac{2}{\tau_S}\big((1 - I_{dex})\, s - Q_1\big), \qquad
   \dot Q_2 = \tfrac{2}{\tau_S}\,(Q_1 - Q_2) . $$

Dexamethasone acts at commitment, where the model puts cytokine production (Brandl 2007: it lowers
cytokine release, not killing). $\tau_S = 0$ (0.28 and before)
secretes at once; 0.5 day puts 12% of a step in engagement into secretion by 3.5 h and 91% by 24 h.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import Array

from vpop.model.compartments import ByCompartment, cmap

SECRETION_STAGES = 2  # the states `committed` and `secreting`: two first-order stages, a gamma-distributed delay


class Cytokines(NamedTuple):
    """Systemic cytokine state of one patient."""

    il6_pg_ml: Array
    ifng_pg_ml: Array
    tnfa_pg_ml: Array
    il10_pg_ml: Array
    myeloid_activation: Array  # fraction of the myeloid pool activated, 0..1
    primed: ByCompartment  # H_c (1/day): the T-cell release rate already met; 0 in a patient never exposed
    margination: Array  # post-administration trafficking pulse m(t), one unit per administration
    committed: Array  # Q_1 (1e9 cells/day): release committed but not yet secreted (secretion delay)
    secreting: Array  # Q_2 (1e9 cells/day): the release being secreted now, when the delay is on


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
    k_ifng_pg_ml_per_day: Array  # IFN-g release per unit of released drive s (1e9 cells/day)
    k_tnfa_pg_ml_per_day: Array
    k_il6_t_pg_ml_per_day: Array  # direct T-cell IL-6 release per unit of released drive s
    k_il6_myeloid_pg_ml_per_day: Array  # IL-6 release by fully activated myeloid cells
    myeloid_capacity: Array  # the patient's myeloid pool relative to normal (1; lower when the marrow has failed)
    k_il10_pg_ml_per_day: Array
    il10_myeloid_factor: Array
    k_myeloid_on_per_day: Array
    k_myeloid_off_per_day: Array
    ec50_ifng_pg_ml: Array
    myeloid_hill: Array  # steepness of myeloid activation by IFN-g and TNF-a excess
    ec50_tnfa_pg_ml: Array
    ic50_il10_pg_ml: Array
    blood_reach: Array  # systemic reach w_B of release by T cells meeting their targets in blood
    tissue_reach: Array  # systemic reach w of release in lymphoid tissue and marrow
    tumour_reach: Array  # systemic reach of release in a solid tumour (lymphoma masses)
    priming_rate_per_day: Array  # k_P: how fast the primed levels follow a rising activation rate
    priming_memory_day: Array  # tau_P: time constant with which the primed level is forgotten
    priming_margin: Array  # delta: relative rise over the primed level below which engagement releases nothing
    release_potency_fold: Array  # phi: cytokine release needs phi x the drug concentration that activation does
    secretion_delay_day: Array  # tau_S: mean delay from engagement to cytokine secretion (two stages); 0 secretes at once


def baseline(p: CytokineParams) -> Cytokines:
    z = jnp.zeros_like(p.baseline_il6_pg_ml)
    return Cytokines(p.baseline_il6_pg_ml, p.baseline_ifng_pg_ml, p.baseline_tnfa_pg_ml, p.baseline_il10_pg_ml, z,
                     ByCompartment.full(z), z, z, z)


def il6_signalling(c: Cytokines, receptor_free: Array) -> Array:
    """IL-6 signalling (pg/mL of receptor-accessible IL-6): serum IL-6 x free-receptor fraction."""
    return c.il6_pg_ml * receptor_free


def myeloid_output(c: Cytokines, p: CytokineParams) -> Array:
    """The activated myeloid pool's cytokine output on the IL-6 scale, O = k_6M mu M / k_el_6 (pg/mL):
    a proxy of IL-1b and myeloid TNF-a, which tocilizumab does not block."""
    return p.k_il6_myeloid_pg_ml_per_day * p.myeloid_capacity * c.myeloid_activation / p.k_el_il6_per_day


def release_drive(activation: ByCompartment, engageable: ByCompartment, primed: ByCompartment, p: CytokineParams) -> Array:
    r"""$\sum_c w_c (R_c + P_c)(\tilde\alpha_c - (1 + \delta) H_c)_+$ (1e9 cells/day): engagement beyond the
    primed level by more than the margin, weighted by each compartment's systemic reach (dexamethasone
    not yet applied)."""
    threshold = 1.0 + p.priming_margin
    excess = engageable * cmap(lambda a, h: jnp.maximum(a - threshold * h, 0.0), activation, primed)
    return p.blood_reach * excess.blood + p.tissue_reach * (excess.lymphoid + excess.marrow) + p.tumour_reach * excess.tumour


def _excess_hill(x: Array, x0: Array, ec50: Array, n: Array) -> Array:
    excess = jnp.maximum(x - x0, 0.0) / ec50
    excess_n = jnp.exp(n * jnp.log(jnp.maximum(excess, 1e-12)))
    return excess_n / (1.0 + excess_n)


def rates(
    c: Cytokines,
    drive: Array,
    activation: ByCompartment,
    drug_free: Array,
    receptor_free: Array,
    dex_inhibition: Array,
    margination_half_life_day: Array,
    p: CytokineParams,
) -> tuple[Cytokines, Cytokines]:
    r"""Production (units/day) and loss (1/day) of the cytokine states; `drive` is `release_drive`, and
    `activation` the per-cell release rates $\tilde\alpha_c$ the primed levels follow, `drug_free` is
    $1 - u_B$, the gate on their forgetting."""
    rising = cmap(lambda a, h: (a > h).astype(a.dtype), activation, c.primed)  # H follows alpha up only
    committing = drive * (1.0 - dex_inhibition)
    delayed = p.secretion_delay_day > 0.0
    k_stage = SECRETION_STAGES / jnp.where(delayed, p.secretion_delay_day, 1.0)  # per day; unused without the delay
    release = jnp.where(delayed, c.secreting, committing)
    k6_receptor = p.k_el_il6_per_day * p.il6_receptor_clearance_fraction
    k6_other = p.k_el_il6_per_day - k6_receptor
    # Myeloid cells are driven by each T-cell cytokine's excess over its baseline, so the untreated
    # patient is at rest with the myeloid pool inactive.
    drive_m = _excess_hill(c.ifng_pg_ml, p.baseline_ifng_pg_ml, p.ec50_ifng_pg_ml, p.myeloid_hill) + _excess_hill(
        c.tnfa_pg_ml, p.baseline_tnfa_pg_ml, p.ec50_tnfa_pg_ml, p.myeloid_hill
    )
    on = p.k_myeloid_on_per_day * drive_m / (1.0 + c.il10_pg_ml / p.ic50_il10_pg_ml)

    production = Cytokines(
        il6_pg_ml=p.k_el_il6_per_day * p.baseline_il6_pg_ml
        + p.k_il6_t_pg_ml_per_day * release
        + p.k_il6_myeloid_pg_ml_per_day * p.myeloid_capacity * c.myeloid_activation * (1.0 - dex_inhibition),
        ifng_pg_ml=p.k_el_ifng_per_day * p.baseline_ifng_pg_ml + p.k_ifng_pg_ml_per_day * release,
        tnfa_pg_ml=p.k_el_tnfa_per_day * p.baseline_tnfa_pg_ml + p.k_tnfa_pg_ml_per_day * release,
        il10_pg_ml=p.k_el_il10_per_day * p.baseline_il10_pg_ml
        + p.k_il10_pg_ml_per_day * (release + p.il10_myeloid_factor * p.myeloid_capacity * c.myeloid_activation),
        myeloid_activation=on,
        primed=rising * activation * p.priming_rate_per_day,
        margination=jnp.zeros_like(c.margination),
        committed=k_stage * committing,
        secreting=k_stage * c.committed,
    )
    loss = Cytokines(
        il6_pg_ml=k6_other + k6_receptor * receptor_free,
        ifng_pg_ml=jnp.broadcast_to(p.k_el_ifng_per_day, jnp.shape(c.ifng_pg_ml)),
        tnfa_pg_ml=jnp.broadcast_to(p.k_el_tnfa_per_day, jnp.shape(c.tnfa_pg_ml)),
        il10_pg_ml=jnp.broadcast_to(p.k_el_il10_per_day, jnp.shape(c.il10_pg_ml)),
        myeloid_activation=on + p.k_myeloid_off_per_day,
        primed=rising * p.priming_rate_per_day + drug_free / p.priming_memory_day,
        margination=jnp.broadcast_to(jnp.log(2.0) / margination_half_life_day, jnp.shape(c.margination)),
        committed=jnp.broadcast_to(k_stage, jnp.shape(c.committed)),
        secreting=jnp.broadcast_to(k_stage, jnp.shape(c.secreting)),
    )
    return production, loss
