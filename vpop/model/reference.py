"""The same model integrated by a generic adaptive ODE solver (diffrax), for reference solutions.

`ode_step` advances the state over one grid step with a diffrax solver and step-size controller;
pass it as `step=` to `solver.simulate_patient` to get the same `Reductions` as the exponential
integrator. With float64 enabled (`jax.config.update("jax_enable_x64", True)`), a tight tolerance
and a refined grid (`solver.refine`, so that peaks are sampled finely) it is the accuracy reference of the
benchmark; at ordinary tolerances it is the "plain diffrax vmap" peer.
"""

from __future__ import annotations

import diffrax
import jax

from vpop.model import system
from vpop.model.solver import INPUT_CHANNELS, add_at


def ode_step(solver=None, rtol: float = 1e-6, atol: float = 1e-9, max_steps: int = 10_000):
    """A `step` for `solver.simulate_patient` that solves the ODE over the step with diffrax
    (Kvaerno5, an implicit solver for stiff systems, by default). Steps must have dt > 0."""
    solver = solver if solver is not None else diffrax.Kvaerno5()
    controller = diffrax.PIDController(rtol=rtol, atol=atol)

    def step(t, h, y, infusion_mg_per_day, p):
        def field(t, y, args):
            dy = system.vector_field(t, y, p)
            for i, path in enumerate(INPUT_CHANNELS):
                if path.startswith("drugs."):
                    dy = add_at(dy, path, infusion_mg_per_day[i])
            return dy

        sol = diffrax.diffeqsolve(diffrax.ODETerm(field), solver, t0=t, t1=t + h, dt0=None, y0=y,
                                  stepsize_controller=controller, max_steps=max_steps)
        return jax.tree_util.tree_map(lambda x: x[-1], sol.ys)

    return step
