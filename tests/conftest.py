"""Shared helpers: one patient's parameters and a compiled schedule for an inline regimen."""

from __future__ import annotations

import os

# Most of a cold run is XLA compiling the solver (one kernel per regimen shape); the suite's
# populations are small, so a cheaper LLVM pass pipeline is the better trade here: a mechanism
# test ran cold in 38 s instead of 58 s (2-core CPU). Set before JAX starts its backend, and
# inherited by the CLI, sweep and memory tests' subprocesses. Not for users' runs.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from vpop import catalogue, regimen  # noqa: E402
from vpop.simulate import Arm, _patient_params, prepare_arm, cohort_covariates  # noqa: E402


def doses(*entries, cycle_days=28, cycles=1):
    """An inline regimen from (cycle, day, amount, unit[, extra]) tuples."""
    out = []
    for e in entries:
        d = {"cycle": e[0], "day": e[1], "amount": e[2], "unit": e[3]}
        if len(e) > 4:
            d.update(e[4])
        out.append(d)
    return {"cycle_days": cycle_days, "cycles": cycles, "doses": out}


def patient(drug, route, population, reg, patient_id=0, seed=0, **arm_kw):
    """(Params of one virtual patient, the arm's Schedule, the prepared arm)."""
    prepared = prepare_arm(Arm("test", drug, route, population, reg, **arm_kw))
    ids = jnp.asarray([patient_id])
    cov = cohort_covariates(prepared.inputs.covariate_params, ids, jnp.asarray(seed), prepared.covariate_kinds)
    cov0 = jax.tree_util.tree_map(lambda x: x[0], cov)
    p = _patient_params(prepared.inputs, cov0, patient_id, jnp.asarray(seed), prepared.variability_paths)
    return p, prepared.inputs.schedule, prepared


def schedule_for(reg, drug="mosunetuzumab", route="iv", solver=None, **kw):
    compiled = regimen.compile_arm(reg, drug, route, population_assessment_every_days=42.0, **kw)
    return regimen.build_schedule(compiled, solver or catalogue.load("model", "default").solver)


@pytest.fixture(scope="session")
def model_cfg():
    return catalogue.load("model", "default")


def pytest_configure(config):
    # Most of the suite's time is XLA compiling the solver, and many tests (and both xdist workers)
    # compile the same kernels: share them through JAX's on-disk compilation cache for this run.
    # The directory lives in pytest's cache folder, so a later run on the same machine reuses it.
    jax.config.update("jax_compilation_cache_dir", str(config.rootpath / ".pytest_cache" / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
