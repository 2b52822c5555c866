r"""The whole patient: state, parameters and the coupled right-hand side.

`rates(t, y, p)` returns production $P$ and first-order loss $L$ for every state, so that
$\dot y = P - L \odot y$ (with $P, L \ge 0$) plus the dosing inputs; `vector_field` gives
$\dot y$ for generic ODE solvers (the float64 reference and the benchmark peers). The state splits
into the drugs (`drug_rates`, which depend on nothing else) and the host they act on (`host_rates`).

Time $t$ is in days from the first administration of the regimen (cycle 1 day 1).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from vpop import endpoints
from vpop.model import cells as cells_mod
from vpop.model import cytokines as cyto
from vpop.model import engagement as eng
from vpop.model import pk
from vpop.model import supportive as sup
from vpop.model.compartments import ByCompartment


class Drugs(NamedTuple):
    """Amounts (mg) of every drug on board."""

    bispecific: pk.DrugAmounts
    tocilizumab: pk.DrugAmounts
    dexamethasone: pk.DrugAmounts
    anti_cd20: pk.DrugAmounts


class Host(NamedTuple):
    """The patient's cells, cytokines and co-medication effects: everything the drugs act on."""

    cells: cells_mod.Cells
    cytokines: cyto.Cytokines
    supportive: sup.SupportiveState


class State(NamedTuple):
    drugs: Drugs
    host: Host


class PatientCovariates(NamedTuple):
    """What dosing needs to know about the patient."""

    weight_kg: Array
    bsa_m2: Array


class Params(NamedTuple):
    """Everything one patient's simulation needs (scalar leaves; `ByCompartment` groups four)."""

    bispecific_pk: pk.PKParams
    engagement: eng.EngagementParams
    tocilizumab_pk: pk.PKParams
    dexamethasone_pk: pk.PKParams
    anti_cd20_pk: pk.PKParams
    supportive: sup.SupportiveParams
    tcells: cells_mod.TCellParams
    bcells: cells_mod.BCellParams
    malignant: cells_mod.MalignantParams
    cytokines: cyto.CytokineParams
    body: cells_mod.Body
    crs: endpoints.CRSParams
    response: endpoints.ResponseParams
    patient: PatientCovariates
    first_dose_day: Array  # day of the first bispecific administration (clearance-decay origin)


def initial_state(p: Params) -> State:
    """The untreated patient at rest: T and B cells at baseline, cytokines at baseline, no drug."""
    dtype = p.body.volume_ml.blood.dtype
    zero = pk.zero_amounts(dtype)
    drugs = Drugs(zero, zero, zero, zero)
    body = p.body
    none = body.t_baseline * 0.0
    cells = cells_mod.Cells(
        t_resting=body.t_baseline,
        t_active=none,
        t_post=none,
        b_normal=body.b_baseline,
        malignant=body.malignant_baseline * (1.0 - p.malignant.refractory_fraction),
        refractory=body.malignant_baseline.total() * p.malignant.refractory_fraction,
    )
    return State(drugs, Host(cells, cyto.baseline(p.cytokines), sup.SupportiveState(none.blood)))


class Observables(NamedTuple):
    """Quantities derived from the state that endpoints and reductions use."""

    bispecific_ng_ml: Array  # free plasma concentration of the bispecific
    il6_signalling_pg_ml: Array
    il6_serum_pg_ml: Array
    ifng_pg_ml: Array
    myeloid_output_pg_ml: Array  # O: the myeloid pyrogens on the IL-6 scale (see `cytokines.myeloid_output`)
    t_blood: Array  # total blood T cells, 1e9
    b_blood: Array  # normal blood B cells, 1e9
    malignant_total: Array  # malignant cells of both clones in all compartments, 1e9
    marrow_malignant: Array  # malignant cells of both clones in the marrow, 1e9


def observe(y: State, p: Params) -> Observables:
    c, d = y.host.cells, y.drugs
    conc = pk.free_concentration(d.bispecific, p.bispecific_pk)
    m0 = p.body.malignant_baseline  # the refractory clone sits where the burden was at the start
    marrow_share = m0.marrow / jnp.maximum(m0.total(), 1e-12)
    theta = sup.il6_receptor_free_fraction(pk.free_concentration(d.tocilizumab, p.tocilizumab_pk), p.supportive)
    return Observables(
        bispecific_ng_ml=1000.0 * conc,
        il6_signalling_pg_ml=cyto.il6_signalling(y.host.cytokines, theta),
        il6_serum_pg_ml=y.host.cytokines.il6_pg_ml,
        ifng_pg_ml=y.host.cytokines.ifng_pg_ml,
        myeloid_output_pg_ml=cyto.myeloid_output(y.host.cytokines, p.cytokines),
        t_blood=c.t_resting.blood + c.t_active.blood + c.t_post.blood,
        b_blood=c.b_normal.blood,
        malignant_total=c.malignant.total() + c.refractory,
        marrow_malignant=c.malignant.marrow + c.refractory * marrow_share,
    )


def drug_rates(t: Array, d: Drugs, p: Params) -> tuple[Drugs, Drugs]:
    """Production and loss of the drug amounts. Drugs act on the body but not the reverse, so the
    solver integrates them first, on finer sub-steps."""
    # The bispecific's clearance decays from its own first dose; the co-medications' clocks start at
    # cycle 1 day 1 (obinutuzumab pretreatment is given then).
    prod_bs, loss_bs = pk.rates(d.bispecific, p.bispecific_pk, t - p.first_dose_day)
    prod_toci, loss_toci = pk.rates(d.tocilizumab, p.tocilizumab_pk, t)
    prod_dex, loss_dex = pk.rates(d.dexamethasone, p.dexamethasone_pk, t)
    prod_cd20, loss_cd20 = pk.rates(d.anti_cd20, p.anti_cd20_pk, t)
    return Drugs(prod_bs, prod_toci, prod_dex, prod_cd20), Drugs(loss_bs, loss_toci, loss_dex, loss_cd20)


class Engagement(NamedTuple):
    """How the bispecific on board engages T cells, per compartment."""

    conc_ng_ml: ByCompartment  # free drug concentration
    occupancy: ByCompartment  # drug saturation of activation, 0..1 (`engagement.occupancy`)
    log_target: ByCompartment  # log of the target-bearing cells (1e9)
    activation: ByCompartment  # alpha_c (1/day)
    release: ByCompartment  # alpha_c at concentration / phi (1/day): what releases, and what the primed levels H_c follow


def engagement(d: Drugs, c: cells_mod.Cells, p: Params) -> Engagement:
    r"""Drug occupancy, targets, the activation rate $\alpha_c$ of each compartment (`vpop.model.engagement`)
    and the release rate $\tilde\alpha_c$, the same rate at $1/\varphi$ of the drug concentration
    (`vpop.model.cytokines`)."""
    e = p.engagement
    plasma = pk.free_concentration(d.bispecific, p.bispecific_pk)
    log_conc = eng.log_of(e.partition) + jnp.log(jnp.maximum(1000.0 * plasma, 1e-12))
    log_target = eng.log_of(eng.targets(c.b_normal, c.malignant, e))
    log_t_available = eng.log_of(c.t_resting + c.t_post)

    def rate_at(log_c):  # occupancy at log concentration log_c and the per-cell rate it drives
        occupancy = eng.occupancy(log_c, e)
        engaged = eng.engaged_fraction(occupancy, log_target, log_t_available, e)
        return occupancy, eng.activation_rate(engaged, p.tcells.k_activation_per_day, e)

    occupancy, activation = rate_at(log_conc)
    _, release = rate_at(log_conc - jnp.log(p.cytokines.release_potency_fold))
    return Engagement(eng.compartment_concentration_ng_ml(plasma, e), occupancy, log_target, activation, release)


def host_rates(d: Drugs, b: Host, p: Params) -> tuple[Host, Host]:
    """Production and loss of cells and cytokines given the drugs on board."""
    theta = sup.il6_receptor_free_fraction(pk.free_concentration(d.tocilizumab, p.tocilizumab_pk), p.supportive)
    dex_cytokine, dex_kill = sup.dexamethasone_inhibition(b.supportive, p.supportive)
    cd20_normal, cd20_malignant = sup.anti_cd20_kill(pk.free_concentration(d.anti_cd20, p.anti_cd20_pk), p.supportive)

    c = b.cells
    e = p.engagement
    engaged = engagement(d, c, p)
    occupancy, activation = engaged.occupancy, engaged.activation
    kill = eng.kill_rate(engaged.conc_ng_ml, eng.log_of(c.t_active), engaged.log_target, e) * (1.0 - dex_kill)

    prod_cells, loss_cells = cells_mod.rates(
        c,
        activation,
        kill * e.binds_normal_b + cd20_normal,
        kill * e.binds_malignant * p.malignant.kill_factor + cd20_malignant,
        b.cytokines.margination,
        p.tcells,
        p.bcells,
        p.malignant,
        p.body,
    )

    # Cytokines follow engagement beyond what the T cells have already met, not the standing activated pool.
    drive = cyto.release_drive(engaged.release, c.t_resting + c.t_post, b.cytokines.primed, p.cytokines)
    drug_free = 1.0 - occupancy.blood  # the primed levels are forgotten only off drug
    prod_cyto, loss_cyto = cyto.rates(b.cytokines, drive, engaged.release, drug_free, theta, dex_cytokine,
                                      p.tcells.margination_half_life_day, p.cytokines)
    prod_sup, loss_sup = sup.rates(b.supportive, pk.free_concentration(d.dexamethasone, p.dexamethasone_pk), p.supportive)
    return Host(prod_cells, prod_cyto, prod_sup), Host(loss_cells, loss_cyto, loss_sup)


def rates(t: Array, y: State, p: Params) -> tuple[State, State]:
    """Production and loss of every state at time t (days)."""
    prod_d, loss_d = drug_rates(t, y.drugs, p)
    prod_h, loss_h = host_rates(y.drugs, y.host, p)
    return State(prod_d, prod_h), State(loss_d, loss_h)


def vector_field(t: Array, y: State, p: Params) -> State:
    """dy/dt without dosing inputs, for generic ODE solvers."""
    production, loss = rates(t, y, p)
    return jax.tree_util.tree_map(lambda pr, lo, x: pr - lo * x, production, loss, y)
