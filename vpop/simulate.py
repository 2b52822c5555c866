"""Simulate an arm's virtual patients in chunks: covariates -> parameters -> solver -> reductions.

`prepare_arm` does the host work once per arm (configs, regimen, grid); `simulate_arm` runs chunks
of patients through two jitted kernels (covariate sampling and simulation), so a patient's result
depends only on (seed, patient id), never on the chunk size.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, OmegaConf

from vpop import catalogue, endpoints, parameters, population, regimen
from vpop.catalogue import ConfigError
from vpop.model import solver
from vpop.model.system import Params

log = logging.getLogger("vpop")


@dataclass(frozen=True)
class Arm:
    """An arm of a trial: a bispecific by a route on a regimen, with co-medications, in a population."""

    name: str
    drug: str
    route: str
    population: str
    regimen: Any  # a configs/regimen name or an inline regimen mapping
    premedication: Any = None  # a configs/premedication name, an inline mapping, or None
    prophylaxis: Any = None  # a configs/prophylaxis name, an inline mapping, or None
    delay: Any = None  # a hold and restart {after_dose, days, restart_from} (`regimen.apply_delay`), or None


class ArmInputs(NamedTuple):
    """The traced (array) inputs of the kernels for one arm."""

    typical: Params
    omegas: jax.Array
    pk_covariates: parameters.PKCovariates
    physiology: population.Physiology
    covariate_params: jax.Array
    schedule: solver.Schedule


@dataclass(frozen=True)
class Recheck:
    """Patients whose CRS grades came within `margin` of a threshold (`endpoints.grade_margin`, log
    units of the index) are simulated again on `schedule`, the arm's grid with its step sizes divided
    by `model.solver.recheck_refine`, and keep that result (`PendingChunk.result`)."""

    margin: float
    schedule: solver.Schedule
    batches: list[int] = field(default_factory=list, compare=False)  # batch sizes compiled so far (`batch`)

    def batch(self, n: int) -> int:
        """The batch to recheck n patients in: the smallest size used before that holds them without
        more than doubling them, else a new one with a quarter of headroom (`recheck_batch`), so a run
        whose chunks or posterior draws recheck somewhat different numbers compiles the finer kernel
        once or twice per arm rather than for every count (the worked example's 40 arm-draws at margin
        0.05: 144 s simulating with a size per count, 92 s so, 44 s without the recheck)."""
        fits = [b for b in self.batches if n <= b <= 2 * max(n, RECHECK_MIN_BATCH)]
        if fits:
            return min(fits)
        self.batches.append(recheck_batch(n + n // 4))
        return self.batches[-1]


@dataclass
class PreparedArm:
    arm: Arm
    compiled: regimen.CompiledRegimen
    population: DictConfig
    inputs: ArmInputs
    variability_paths: tuple[str, ...]
    covariate_kinds: tuple[str, ...]
    recheck: Recheck | None = None


def prepare_arm(arm: Arm, model: DictConfig | None = None, horizon_days: float | None = None,
                assessment_every_days: float | None = None, overrides: dict[str, float] | None = None) -> PreparedArm:
    """Everything host-side for one arm; raises ConfigError naming the field on bad input.
    `overrides` set parameter values by config path (a posterior draw, see `parameters.with_overrides`)."""
    model = model if model is not None else catalogue.load("model", "default")
    # A refined grid is the arm's, shared by every posterior draw: its pilot sees the grid's settings
    # but not a draw's parameter values.
    grid_model = parameters.with_overrides(model, "model", None, {k: v for k, v in (overrides or {}).items()
                                                                   if k.startswith("model.solver.")})
    model = parameters.with_overrides(model, "model", None, overrides)
    for switch in ("rescue", "hold_until_resolved"):
        if model.crs[switch] not in (0, 1):
            raise ConfigError(f"model.crs.{switch} must be 0 (off) or 1 (on), got {model.crs[switch]!r}")
    if not isinstance(model.crs.rescue_grade1_hours, (int, float)) or model.crs.rescue_grade1_hours < 0:
        raise ConfigError(f"model.crs.rescue_grade1_hours must be a number of hours >= 0 (0: off), got {model.crs.rescue_grade1_hours!r}")
    where = f"arms.{arm.name}"
    if not isinstance(arm.population, str):
        raise ConfigError(f"{where}.population must be a configs/population name; allowed: {', '.join(catalogue.available('population'))}")
    pop = parameters.with_overrides(population.load(arm.population), "population", arm.population, overrides)
    compiled = regimen.compile_arm(arm.regimen, arm.drug, arm.route, arm.premedication, arm.prophylaxis,
                                   horizon_days, assessment_every_days, where, float(pop.response.assessment_every_days),
                                   arm.delay)
    spec = parameters.ParameterScope(arm.drug, arm.route, arm.population)
    typical = parameters.typical_params(spec, model, overrides)
    typical = typical._replace(first_dose_day=jnp.asarray(compiled.periods[0].day, parameters._float()))
    var = parameters.variability(spec, overrides)
    cov_model = population.covariate_model(pop)
    f = parameters._float()
    inputs = ArmInputs(
        typical=typical,
        omegas=jnp.asarray(var.omegas, f),
        pk_covariates=parameters.PKCovariates(*(jnp.asarray(x, f) for x in parameters.pk_covariates(arm.drug))),
        physiology=population.Physiology(*(jnp.asarray(x, f) for x in population.physiology(model, pop))),
        covariate_params=jnp.asarray(cov_model.params, f),
        schedule=regimen.build_schedule(compiled, model.solver),
    )
    if model.solver.get("error_tolerance") is not None:
        inputs = inputs._replace(schedule=_refined_schedule(arm, grid_model, horizon_days, assessment_every_days))
    return PreparedArm(arm, compiled, pop, inputs, var.paths, cov_model.kinds, _recheck(compiled, grid_model.solver))


def refined_grid(solver_cfg: DictConfig, factor: float) -> DictConfig:
    """`model.solver` with its three step sizes (first step, fine and coarse largest steps) divided by
    `factor`: the uniform refinement that converges (see README, Performance), used by the grade
    recheck and by the benchmarks' finer grids."""
    return OmegaConf.merge(solver_cfg, {k: float(solver_cfg[k]) / factor for k in ("first_step_hours", "fine_max_step_days", "max_step_days")})


def _recheck(compiled: regimen.CompiledRegimen, cfg: DictConfig) -> Recheck | None:
    """The arm's grade recheck (`Recheck`) from `model.solver.recheck_margin` (null: none) and
    `recheck_refine`, or a ConfigError naming the field."""
    margin, refine = cfg.get("recheck_margin"), cfg.get("recheck_refine")
    if margin is None:
        return None
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin <= 1:
        raise ConfigError(f"model.solver.recheck_margin must be null or a number in (0, 1] (log units of the CRS index), "
                          f"e.g. 0.05; got {margin!r}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 2:
        raise ConfigError(f"model.solver.recheck_refine must be a whole number >= 2, e.g. 4; got {refine!r}")
    return Recheck(float(margin), regimen.build_schedule(compiled, refined_grid(cfg, refine)))


# Grids refined by error control, by arm and model config: a trial prepares an arm once per posterior
# draw, and every draw must share the arm's grid (the draws are stacked on one schedule).
_REFINED: dict[str, solver.Schedule] = {}
PILOT_SEED = 7919  # the pilot cohort's own seed, so an arm's grid does not depend on the trial's seed
REFINE_ROUNDS = 2
MAX_SPLIT = 16  # the most sub-steps one step is split into in a round
MERGE_BELOW = 1 / 16  # two steps join below this share of the tolerance (the joined step's error is ~8x theirs)


def _refined_schedule(arm: Arm, model: DictConfig, horizon_days, assessment_every_days) -> solver.Schedule:
    """The arm's schedule refined at `model.solver.error_tolerance` on a pilot of the arm at the
    config's nominal parameters (not a posterior draw's), computed once per arm and config."""
    cfg = model.solver
    tolerance, pilot = cfg.error_tolerance, cfg.pilot_patients
    if not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise ConfigError(f"model.solver.error_tolerance must be null or a number in (0, 1), e.g. 0.01; got {tolerance!r}")
    if not isinstance(pilot, int) or pilot < 1:
        raise ConfigError(f"model.solver.pilot_patients must be a positive integer; got {pilot!r}")
    key = repr((arm, horizon_days, assessment_every_days, OmegaConf.to_yaml(model)))
    if key not in _REFINED:
        plain = OmegaConf.merge(model, {"solver": {"error_tolerance": None}})
        pilot_arm = prepare_arm(arm, plain, horizon_days, assessment_every_days)
        t0 = time.perf_counter()
        _REFINED[key] = refine_schedule(pilot_arm, float(tolerance), pilot, int(cfg.grid_bucket))
        log.info("arm %s: grid regridded at error tolerance %g on %d pilot patients, %d -> %d steps (%.0f s)", arm.name,
                 tolerance, pilot, int((np.asarray(pilot_arm.inputs.schedule.steps.dt) > 0).sum()),
                 int((np.asarray(_REFINED[key].steps.dt) > 0).sum()), time.perf_counter() - t0)
    return _REFINED[key]


def refine_schedule(prepared: PreparedArm, tolerance: float, pilot_patients: int, bucket: int) -> solver.Schedule:
    r"""The arm's schedule regridded by a pilot cohort's local error estimate (`solver.local_errors`,
    relative): a step of estimated error $e$ above `tolerance` is split into
    $\lceil (e/\mathrm{tol})^{1/3} \rceil$ equal sub-steps (at most `MAX_SPLIT`), since the local error of
    the second-order scheme goes as $h^3$; two neighbouring steps both below tolerance x `MERGE_BELOW`
    are joined where nothing happens between them (`solver.mergeable`). The estimate is repeated on
    the new grid (`REFINE_ROUNDS` rounds). The pilot is patients 0 .. n-1 of the arm at `PILOT_SEED`;
    every patient then shares the grid, at fixed-grid speed."""
    ids = np.arange(pilot_patients)
    covariates = _covariates_for(prepared, ids, PILOT_SEED)
    schedule = prepared.inputs.schedule
    f = parameters._float()
    for _ in range(REFINE_ROUNDS):
        errors = np.asarray(_pilot_errors(prepared.inputs._replace(schedule=schedule), covariates, jnp.asarray(ids),
                                          jnp.asarray(PILOT_SEED), prepared.variability_paths))
        split = np.clip(np.ceil((errors / tolerance) ** (1 / 3) - 1e-6), 1, MAX_SPLIT).astype(int)
        small = errors < tolerance * MERGE_BELOW
        candidate = solver.mergeable(schedule) & small & np.concatenate([small[1:], [False]])
        pair = np.zeros_like(candidate)
        k = 0
        while k < len(pair) - 1:  # non-overlapping pairs, from the left
            pair[k] = candidate[k]
            k += 2 if pair[k] else 1
        if (split == 1).all() and not pair.any():
            break
        absorbed = np.concatenate([[False], pair[:-1]])
        split = split[~absorbed & (np.asarray(schedule.steps.dt) > 0)]
        fine = solver.refine(solver.merge(schedule, pair), split)
        steps = solver.Steps(*(jnp.asarray(x, f if x.dtype.kind == "f" else jnp.int32) for x in fine.steps))
        n_steps = steps.dt.shape[0]
        schedule = pad_schedule(schedule._replace(steps=steps), -(-n_steps // bucket) * bucket,
                                schedule.period_start_day.shape[0], schedule.assessment_day.shape[0])
    return schedule


@partial(jax.jit, static_argnames=("paths",))
def _pilot_errors(inputs: ArmInputs, covariates: population.Covariates, ids: jax.Array, seed: jax.Array,
                  paths: tuple[str, ...]) -> jax.Array:
    """`solver.local_errors` of every step of the schedule, the largest over the pilot patients `ids`."""

    def one(cov, i):
        return solver.local_errors(_patient_params(inputs, cov, i, seed, paths), inputs.schedule)

    return jnp.max(jax.vmap(one)(covariates, ids), axis=0)


@partial(jax.jit, static_argnames=("kinds",))
def cohort_covariates(covariate_params: jax.Array, ids: jax.Array, seed: jax.Array, kinds: tuple[str, ...]) -> population.Covariates:
    """Covariates of patients `ids` (vmapped)."""
    return jax.vmap(lambda i: population.sample_covariates(kinds, covariate_params, population.patient_key(seed, i)))(ids)


def n_periods(schedule: solver.Schedule) -> int:
    """The schedule's number of dose periods (static: a shape)."""
    return schedule.period_start_day.shape[-1]


def _patient_params(inputs: ArmInputs, cov, patient_id, seed, paths) -> Params:
    key = population.patient_key(seed, patient_id)
    return population.individual_params(inputs.typical, cov, inputs.physiology, inputs.pk_covariates, paths, inputs.omegas, key,
                                        n_periods(inputs.schedule))


@partial(jax.jit, static_argnames=("paths",))
def simulate_chunk(inputs: ArmInputs, covariates: population.Covariates, ids: jax.Array, seed: jax.Array,
                   paths: tuple[str, ...]) -> solver.Reductions:
    """Reductions of patients `ids` with the given covariates (vmapped, reduced on device)."""

    def one(cov, i):
        return solver.simulate_patient(_patient_params(inputs, cov, i, seed, paths), inputs.schedule)

    return jax.vmap(one)(covariates, ids)


@partial(jax.jit, static_argnames=("paths",))
def simulate_draws_chunk(inputs: ArmInputs, covariates: population.Covariates, ids: jax.Array, seed: jax.Array,
                         paths: tuple[str, ...]) -> solver.Reductions:
    """Reductions [draws, patients, ...] of patients `ids` under posterior draws stacked on the leading
    axis of `inputs.typical`: a draw changes only the typical parameters, so the patients' covariates,
    random effects and the schedule are shared by every draw."""

    def draw(typical):
        return simulate_chunk(inputs._replace(typical=typical), covariates, ids, seed, paths)

    return jax.vmap(draw)(inputs.typical)


@partial(jax.jit, static_argnames=("paths",))
def trajectories_chunk(inputs: ArmInputs, covariates: population.Covariates, ids: jax.Array, seed: jax.Array,
                       paths: tuple[str, ...]):
    """The state at every grid point for a (small) set of patients: (State with [n, K] leaves, Params)."""

    def one(cov, i):
        p = _patient_params(inputs, cov, i, seed, paths)
        _, traj = solver.simulate_patient(p, inputs.schedule, trajectory=True)
        return traj, p

    return jax.vmap(one)(covariates, ids)


@dataclass
class ArmResult:
    """Per-patient covariates and reductions of one arm, as numpy arrays with a leading patient axis."""

    arm: Arm
    patient_id: np.ndarray
    covariates: dict[str, np.ndarray]
    reductions: dict[str, np.ndarray]
    period_start_day: np.ndarray
    assessment_day: np.ndarray


def _covariates_for(prepared: PreparedArm, ids, seed: int, twins=None) -> population.Covariates:
    if twins is not None:
        return jax.tree_util.tree_map(lambda x: x[np.asarray(ids)], twins)
    return cohort_covariates(prepared.inputs.covariate_params, jnp.asarray(ids), jnp.asarray(seed), prepared.covariate_kinds)


def patient_sharding() -> jax.sharding.NamedSharding:
    """Patients split along their leading axis over every local device (one device: no split)."""
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("patients",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("patients"))


def padded_chunk_size(chunk_size: int) -> int:
    """The chunk size rounded up to a multiple of the device count, so every device gets equal work."""
    n_dev = jax.local_device_count()
    return -(-chunk_size // n_dev) * n_dev


RECHECK_MIN_BATCH = 16  # smallest batch of a grade recheck


def recheck_batch(n: int) -> int:
    """The batch a grade recheck of n patients runs in: the smallest of 1, 1.25, 1.5 or 1.75 times a
    power of two that holds them (at least `RECHECK_MIN_BATCH`). A run's chunks recheck similar
    numbers, so it compiles the finer kernel for one or two sizes, and at most a fifth of the batch
    is padding (powers of two alone left up to half: at margins 0.02 / 0.05 / 0.1 the yardstick ran at
    68 / 54 / 40% of its throughput without the recheck; with these sizes, and `Recheck.batch`'s
    headroom, 69 / 57 / 44%; experiments/benchmarks/recheck_cost.py)."""
    if n <= RECHECK_MIN_BATCH:
        return RECHECK_MIN_BATCH
    octave = 1 << (int(n - 1).bit_length() - 1)  # the largest power of two below n
    return next(octave * q // 4 for q in (5, 6, 7, 8) if octave * q // 4 >= n)


class PendingChunk(NamedTuple):
    """A chunk handed to the device(s). JAX dispatches asynchronously, so the device computes while
    the host goes on (say, writing the previous chunk); `result()` waits for it and fetches it."""

    prepared: PreparedArm
    ids: np.ndarray
    reductions: solver.Reductions  # device arrays, padded to the chunk size
    covariates: population.Covariates
    seed: int = 0

    def result(self) -> ArmResult:
        """The patients' results (padding rows dropped; so are the dose periods and assessments a
        schedule padded to a shared shape added, `common_shape`). With a grade recheck (`Recheck`),
        the patients near a grade threshold are simulated again on the finer grid first."""
        take = len(self.ids)
        red, cov = jax.tree_util.tree_map(lambda x: np.asarray(x)[:take], (self.reductions, self.covariates))
        cov_dict = dict(cov._asdict(), bsa_m2=np.asarray(cov.bsa_m2))
        red = self._periods_only(red)
        if self.prepared.recheck is not None:
            red = self._rechecked(red)
        schedule = self.prepared.inputs.schedule
        n_p, n_a = len(self.prepared.compiled.periods), len(self.prepared.compiled.assessment_days)
        return ArmResult(self.prepared.arm, self.ids, cov_dict, red,
                         np.asarray(schedule.period_start_day)[:n_p], np.asarray(schedule.assessment_day)[:n_a])

    def _periods_only(self, red: solver.Reductions) -> dict[str, np.ndarray]:
        n_p, n_a = len(self.prepared.compiled.periods), len(self.prepared.compiled.assessment_days)
        return {k: v[:, :n_a] if k.endswith("_at") else v[:, :n_p] if v.ndim > 1 else v for k, v in red._asdict().items()}

    def _rechecked(self, red: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`red` with the rows of patients within the recheck margin replaced by their simulation on
        the recheck grid, and `grid_rechecked` (1: replaced), in a batch of `Recheck.batch` patients."""
        check = self.prepared.recheck
        red = {k: np.array(v) for k, v in red.items()}  # writable copies (views of device buffers are not)
        margin = endpoints.grade_margin(red["crs_index_peak"], red["crs_index_at_dose"], red["crs_log_susceptibility"])
        rows = np.flatnonzero(margin < check.margin)
        red["grid_rechecked"] = np.zeros(len(self.ids), red["crs_max_grade"].dtype)
        if rows.size == 0:
            return red
        size = check.batch(rows.size)
        padded = np.concatenate([rows, np.full(size - rows.size, rows[-1])])
        cov = jax.tree_util.tree_map(lambda x: x[jnp.asarray(padded)], self.covariates)
        inputs = self.prepared.inputs._replace(schedule=check.schedule)
        fine = simulate_chunk(inputs, cov, jnp.asarray(self.ids[padded]), jnp.asarray(self.seed), self.prepared.variability_paths)
        fine = self._periods_only(jax.tree_util.tree_map(lambda x: np.asarray(x)[:rows.size], fine))
        for k, v in fine.items():
            red[k][rows] = v
        red["grid_rechecked"][rows] = 1
        log.debug("arm %s: %d of %d patients within %g of a CRS grade threshold simulated again on the recheck grid",
                  self.prepared.arm.name, rows.size, len(self.ids), check.margin)
        return red


def _device_batch(prepared: PreparedArm, ids: np.ndarray, seed: int, chunk_size: int | None, twins):
    """Patient ids and covariates on the device(s), padded (repeating the last id) to `chunk_size`
    rounded up to a multiple of the device count, so every chunk of a run reuses one compilation."""
    size = padded_chunk_size(max(chunk_size or len(ids), len(ids)))
    padded = np.concatenate([ids, np.full(size - len(ids), ids[-1])])
    sharding = patient_sharding()
    return (jax.device_put(jnp.asarray(padded), sharding),
            jax.device_put(_covariates_for(prepared, padded, seed, twins), sharding))


def dispatch_ids(prepared: PreparedArm, ids: np.ndarray, seed: int = 0, chunk_size: int | None = None,
                 twins: population.Covariates | None = None) -> PendingChunk:
    """Start simulating the patients `ids` in one device call, split over all local devices
    (padded, `_device_batch`; padding rows are dropped by `result()`)."""
    ids = np.asarray(ids)
    dev_ids, cov = _device_batch(prepared, ids, seed, chunk_size, twins)
    red = simulate_chunk(prepared.inputs, cov, dev_ids, jnp.asarray(seed), prepared.variability_paths)
    return PendingChunk(prepared, ids, red, cov, seed)


def dispatch_draws(draws: list[PreparedArm], ids: np.ndarray, seed: int = 0, chunk_size: int | None = None,
                   twins: population.Covariates | None = None, block: int | None = None) -> list[PendingChunk]:
    """Start simulating the patients `ids` under several posterior draws of one arm (`draws`: the arm
    prepared per draw, `trial.prepare_draws`) in one device call, draws stacked on a leading axis.

    Patients are padded as in `dispatch_ids`, draws to `block` (repeating the last), so every call of a
    run reuses one compilation. Grades and responses equal a call per draw (block 1, `dispatch_ids`);
    continuous values agree to float32 rounding (XLA vectorises stacked typical parameters differently).
    """
    block = max(block or len(draws), len(draws))
    if block == 1:  # one draw per call: the single-draw kernel, shared with `simulate_arm`
        return [dispatch_ids(draws[0], ids, seed, chunk_size, twins)]
    ids = np.asarray(ids)
    dev_ids, cov = _device_batch(draws[0], ids, seed, chunk_size, twins)
    stacked = draws + [draws[-1]] * (block - len(draws))
    inputs = draws[0].inputs._replace(typical=jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *(d.inputs.typical for d in stacked)))
    red = simulate_draws_chunk(inputs, cov, dev_ids, jnp.asarray(seed), draws[0].variability_paths)
    return [PendingChunk(d, ids, jax.tree_util.tree_map(lambda x: x[j], red), cov, seed) for j, d in enumerate(draws)]


def simulate_ids(prepared: PreparedArm, ids: np.ndarray, seed: int = 0, chunk_size: int | None = None,
                 twins: population.Covariates | None = None) -> ArmResult:
    """Simulate the patients `ids` in one device call (see `dispatch_ids`) and wait for the result."""
    return dispatch_ids(prepared, ids, seed, chunk_size, twins).result()


def check_sizes(n, chunk_size) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
        raise ConfigError(f"population.n must be a positive whole number of patients, got {n!r}")
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ConfigError(f"chunk_size must be a positive whole number, got {chunk_size!r}")


def simulate_arm(prepared: PreparedArm, n: int, seed: int = 0, chunk_size: int = 10_000,
                 twins: population.Covariates | None = None, progress=None) -> ArmResult:
    """Simulate patients 0..n-1 in chunks, in memory; `progress(k)` is called with the patients done per chunk."""
    check_sizes(n, chunk_size)
    parts = []
    for start in range(0, n, chunk_size):
        parts.append(simulate_ids(prepared, np.arange(start, min(start + chunk_size, n)), seed, min(chunk_size, n), twins))
        if progress is not None:
            progress(len(parts[-1].patient_id))
    def join(field):
        return {k: np.concatenate([getattr(p, field)[k] for p in parts]) for k in getattr(parts[0], field)}

    return ArmResult(prepared.arm, np.arange(n), join("covariates"), join("reductions"), parts[0].period_start_day,
                     parts[0].assessment_day)


def simulate_trajectories(prepared: PreparedArm, ids, seed: int = 0, twins: population.Covariates | None = None):
    """Time courses of patients `ids`: (grid days [K+1], State with [n, K+1] leaves from t0, Params)."""
    ids = np.asarray(ids)
    cov = _covariates_for(prepared, ids, seed, twins)
    traj, params = trajectories_chunk(prepared.inputs, cov, jnp.asarray(ids), jnp.asarray(seed), prepared.variability_paths)
    y0 = jax.vmap(solver.system.initial_state)(params)
    states = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[:, None], b], axis=1), y0, traj)
    steps = prepared.inputs.schedule.steps
    times = np.concatenate([[float(steps.t_start[0])], np.asarray(steps.t_start + steps.dt)])
    return times, states, params


def pad_schedule(schedule: solver.Schedule, k: int, n_periods: int, n_assessments: int) -> solver.Schedule:
    """The schedule padded to k steps (dt = 0), n_periods and n_assessments, so arms can be stacked."""
    s = schedule.steps
    extra = k - s.dt.shape[0]

    def pad(x, value):
        return jnp.concatenate([x, jnp.full((extra, *x.shape[1:]), value, x.dtype)]) if extra else x

    steps = solver.Steps(
        t_start=pad(s.t_start, s.t_start[-1] + s.dt[-1]), dt=pad(s.dt, 0.0), bolus_mg=pad(s.bolus_mg, 0.0),
        bolus_mg_per_kg=pad(s.bolus_mg_per_kg, 0.0), bolus_mg_per_m2=pad(s.bolus_mg_per_m2, 0.0),
        bolus_cap_mg=pad(s.bolus_cap_mg, jnp.inf), rate_mg_per_day=pad(s.rate_mg_per_day, 0.0),
        rate_mg_per_day_per_kg=pad(s.rate_mg_per_day_per_kg, 0.0), rate_mg_per_day_per_m2=pad(s.rate_mg_per_day_per_m2, 0.0),
        period=pad(s.period, s.period[-1]), assessment=pad(s.assessment, -1),
    )

    def pad_to(x, n):
        return jnp.concatenate([x, jnp.full((n - x.shape[0],), x[-1], x.dtype)]) if n > x.shape[0] else x

    return solver.Schedule(steps, pad_to(schedule.period_start_day, n_periods), pad_to(schedule.assessment_day, n_assessments),
                           pad_to(schedule.period_holdable, n_periods))


def common_shape(prepared: list[PreparedArm]) -> list[PreparedArm]:
    """The arms with their schedules padded to one shape (steps, dose periods, assessments) and their
    random effects on the union of their parameters (omega 0 where an arm has none; each parameter
    draws from its own named stream, so the others are unchanged), so one compiled kernel serves them
    all. Padding steps (dt = 0) change no state; `PendingChunk.result` drops padded periods."""
    paths = tuple(dict.fromkeys(p for arm in prepared for p in arm.variability_paths))
    k = max(a.inputs.schedule.steps.dt.shape[0] for a in prepared)
    n_p = max(a.inputs.schedule.period_start_day.shape[0] for a in prepared)
    n_a = max(a.inputs.schedule.assessment_day.shape[0] for a in prepared)
    f = parameters._float()
    out = []
    for a in prepared:
        omega = dict(zip(a.variability_paths, np.asarray(a.inputs.omegas)))
        inputs = a.inputs._replace(omegas=jnp.asarray([omega.get(p, 0.0) for p in paths], f),
                                   schedule=pad_schedule(a.inputs.schedule, k, n_p, n_a))
        out.append(replace(a, inputs=inputs, variability_paths=paths))
    return out


def length_groups(prepared: list[PreparedArm], growth: float) -> list[list[int]]:
    """Indices of `prepared` grouped by grid length: in order of steps, an arm joins the group while
    its steps are at most `growth` times the group's shortest. Padded to one shape (`common_shape`),
    a group shares one compiled kernel; a padding step costs as much as a real one."""
    steps = [a.inputs.schedule.steps.dt.shape[0] for a in prepared]
    groups: list[list[int]] = []
    for i in sorted(range(len(prepared)), key=steps.__getitem__):
        if groups and steps[i] <= growth * steps[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def share_compilation(arms: dict[str, PreparedArm], growth: float) -> dict[str, PreparedArm]:
    """Arms grouped by grid length (`length_groups`), each group padded to one shape (`common_shape`),
    so a trial compiles one kernel per group instead of one per arm, at the cost of the padding steps."""
    names, prepared = list(arms), list(arms.values())
    out = {}
    for group in length_groups(prepared, growth):
        out.update(zip([names[i] for i in group], common_shape([prepared[i] for i in group])))
    return {name: out[name] for name in arms}


def stack_arms(prepared: list[PreparedArm]) -> tuple[ArmInputs, tuple[str, ...]]:
    """The arms' kernel inputs stacked on a leading axis (`common_shape`), for one batched
    simulation of all arms."""
    shared = common_shape(prepared)
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *(a.inputs for a in shared)), shared[0].variability_paths


def simulate_stacked(inputs: ArmInputs, covariates: population.Covariates, ids: jax.Array, seed, paths) -> solver.Reductions:
    """Reductions [arms, patients, ...] for stacked arms (see `stack_arms`); covariates are [arms, patients].
    Not jitted here: it is traced inside the caller's jit (calibration)."""
    def arm(inp, cov):
        return jax.vmap(lambda c, i: solver.simulate_patient(_patient_params(inp, c, i, seed, paths), inp.schedule))(cov, ids)

    return jax.vmap(arm)(inputs, covariates)
