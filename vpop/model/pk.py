r"""Drug pharmacokinetics: one two-compartment model serves every drug in the catalogue.

Amounts are in mg, volumes in L, time in days, so concentrations come out in mg/L (= ug/mL).

The model has an absorption depot (SC or oral), a central and a peripheral compartment:

$$
\begin{aligned}
\dot A_d &= -k_a A_d \\
\dot A_c &= k_a A_d + r(t) - \mathrm{CL}(t)\,C - \frac{V_{max} C}{K_m + C} - k_{int} R_C V_1 - Q (C - A_p/V_2) \\
\dot A_p &= Q (C - A_p/V_2)
\end{aligned}
$$

with $r(t)$ an IV infusion rate, a clearance that decays with time since the first dose,
$\mathrm{CL}(t) = \mathrm{CL}_{ss} + \Delta\mathrm{CL}\, e^{-k_{\Delta}(t - t_0)}$ (mosunetuzumab,
teclistamab), optional Michaelis-Menten elimination (tocilizumab) and optional quasi-steady-state
target-mediated disposition (epcoritamab): with total concentration $C_{tot} = A_c/V_1$ and
constant total target $R_{tot}$, the complex is

$$ R_C = \frac{2 R_{tot} C_{tot}}{s + \sqrt{s^2 - 4 R_{tot} C_{tot}}}, \quad s = C_{tot} + R_{tot} + K_{SS}, $$

the free concentration $C = C_{tot} - R_C$ (this form has no cancellation and gives $R_C = 0$
exactly when $R_{tot} = 0$). Bioavailability is applied when a dose enters the depot.

Every right-hand side in `vpop.model` is written as production minus first-order loss,
$\dot y = P - L\,y$ with $P, L \ge 0$, which the solver integrates with positivity by
construction (see `vpop.model.solver`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import Array


class PKParams(NamedTuple):
    """Population-PK parameters of one drug (typical values, or one patient's after variability)."""

    cl_l_per_day: Array  # linear clearance at steady state
    cl_decay_l_per_day: Array  # extra clearance at the first dose, decaying with time (0: none)
    cl_decay_rate_per_day: Array  # rate of that decay (ln 2 / transition half-life)
    v1_l: Array  # central volume
    v2_l: Array  # peripheral volume
    q_l_per_day: Array  # inter-compartmental clearance (0: one-compartment)
    ka_per_day: Array  # first-order absorption from the depot
    bioavailability: Array  # fraction of a depot dose that is absorbed
    vmax_mg_per_day: Array  # Michaelis-Menten elimination capacity (0: none)
    km_mg_per_l: Array  # Michaelis-Menten constant
    tmdd_rtot_mg_per_l: Array  # QSS-TMDD total target, in drug-equivalent mg/L (0: none)
    tmdd_kss_mg_per_l: Array  # QSS constant
    tmdd_kint_per_day: Array  # internalisation rate of the drug-target complex


class DrugAmounts(NamedTuple):
    """Drug amounts (mg) in the absorption depot, central and peripheral compartments."""

    depot: Array
    central: Array
    peripheral: Array


def zero_amounts(dtype=None) -> DrugAmounts:
    z = jnp.zeros((), dtype)
    return DrugAmounts(z, z, z)


def total_concentration(amounts: DrugAmounts, p: PKParams) -> Array:
    """Total (free + target-bound) central concentration, mg/L."""
    return amounts.central / p.v1_l


def free_concentration(amounts: DrugAmounts, p: PKParams) -> Array:
    """Free central (plasma) concentration, mg/L, under QSS target binding."""
    c_tot = total_concentration(amounts, p)
    return c_tot - _complex(c_tot, p)


def _complex(c_tot: Array, p: PKParams) -> Array:
    r = p.tmdd_rtot_mg_per_l
    s = c_tot + r + p.tmdd_kss_mg_per_l
    disc = jnp.maximum(s * s - 4.0 * r * c_tot, 0.0)
    return 2.0 * r * c_tot / jnp.maximum(s + jnp.sqrt(disc), 1e-30)


def clearance(p: PKParams, days_since_first_dose: Array) -> Array:
    """Linear clearance (L/day), decaying from CLss + dCL towards CLss after the first dose."""
    t = jnp.maximum(days_since_first_dose, 0.0)
    return p.cl_l_per_day + p.cl_decay_l_per_day * jnp.exp(-p.cl_decay_rate_per_day * t)


def elimination_rate(amounts: DrugAmounts, p: PKParams, days_since_first_dose: Array) -> Array:
    """Rate at which drug leaves the body (mg/day): linear, saturable and target-mediated."""
    c_tot = total_concentration(amounts, p)
    rc = _complex(c_tot, p)
    c = c_tot - rc
    linear = clearance(p, days_since_first_dose) * c
    saturable = p.vmax_mg_per_day * c / (p.km_mg_per_l + c)
    return linear + saturable + p.tmdd_kint_per_day * rc * p.v1_l


def rates(amounts: DrugAmounts, p: PKParams, days_since_first_dose: Array) -> tuple[DrugAmounts, DrugAmounts]:
    """Production (mg/day) and first-order loss (1/day) of each amount. Infusions enter as inputs."""
    c_tot = total_concentration(amounts, p)
    rc = _complex(c_tot, p)
    c = c_tot - rc
    # Divide by a safe denominator, not max(c_tot, tiny): at c_tot = 0 (a drug not yet given) the
    # unused branch's derivative would overflow in float32 and turn every gradient into NaN.
    present = c_tot > 0
    free_fraction = jnp.where(present, c / jnp.where(present, c_tot, 1.0), 1.0)
    cl = clearance(p, days_since_first_dose)
    # Loss of the central amount per mg present: free drug leaves by clearance, saturable
    # elimination and distribution; bound drug by internalisation.
    central_loss = (
        (cl + p.q_l_per_day + p.vmax_mg_per_day / (p.km_mg_per_l + c)) * free_fraction / p.v1_l
        + p.tmdd_kint_per_day * (1.0 - free_fraction)
    )
    production = DrugAmounts(
        depot=jnp.zeros_like(amounts.depot),
        central=p.ka_per_day * amounts.depot + p.q_l_per_day * amounts.peripheral / p.v2_l,
        peripheral=p.q_l_per_day * c,
    )
    loss = DrugAmounts(
        depot=jnp.broadcast_to(p.ka_per_day, jnp.shape(amounts.depot)),
        central=central_loss,
        peripheral=jnp.broadcast_to(p.q_l_per_day / p.v2_l, jnp.shape(amounts.peripheral)),
    )
    return production, loss
