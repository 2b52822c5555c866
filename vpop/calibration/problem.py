r"""The calibration problem: the published targets, one virtual cohort per trial behind them, and
each target's rate as the expectation of the trial runner's 0/1 endpoint over its cohort.

A cohort is a fixed set of virtual patients (common random numbers: the same patients at every
parameter value). Cohorts of similar grid length are stacked and simulated in one device call
(`simulate.length_groups`, as a trial shares kernels between its arms): one stack of all cohorts
would pad every cohort to the longest grid. The rate of target $j$ is

$$ \bar p_j(\theta) = \frac1N \sum_{i=1}^N \mathbb E\big[y_{ij} \mid \text{patient } i, \theta\big], $$

where $y_{ij}$ is the trial runner's endpoint (the same simulation, rescue on, the same grading and
onset periods) and the expectation is over the patient effect that decides it: CRS susceptibility
consistent with the patient's rescue history, the response-assessment effect (`vpop.endpoints`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from vpop import catalogue, endpoints, parameters, population, posterior
from vpop import targets as published
from vpop.calibration.priors import CalibratedParameter, calibrated_parameters, constrain_all
from vpop.catalogue import ConfigError
from vpop.simulate import Arm, cohort_covariates, length_groups, prepare_arm, simulate_stacked, stack_arms

# Rates within 0.1% of 0 or 1 are clipped there before the logit the emulator models: no published
# rate lies that close, and the huge logits of a cohort with no events would dominate the fit.
EMULATED_RATE_FLOOR = 1e-3


@dataclass
class Cohort:
    """One simulated trial population: the virtual cohort behind one or more targets."""

    arm: Arm
    horizon_days: float
    prepared: object
    targets: pd.DataFrame
    paths: dict[str, str]  # config path -> Params path for the calibrated parameters that concern it
    kind: str
    cr_residual_volume_ml: float
    omega_response: float  # SD of the patients' response-assessment effect (delta)
    occasions: bool = False  # the susceptibility varies between dose periods (occasion_share calibrated or > 0)


class Stack(NamedTuple):
    """Cohorts simulated together: their indices, their kernel inputs stacked (`simulate.stack_arms`),
    the random-effect paths and the stacked covariates."""

    cohorts: list[int]
    inputs: object
    paths: tuple[str, ...]
    covariates: object


def _by_target(probs: dict, targets: pd.DataFrame) -> dict[str, jax.Array]:
    """Each target's [patients] expectation from a cohort's endpoint probabilities."""
    out = {}
    for t in targets.itertuples():
        family, k = published.endpoint_family(t.endpoint), published.dose_number(t.endpoint)
        if k is None:
            out[t.id] = probs[t.endpoint]
        elif callable(probs[family]):  # first CRS at dose k or later; CRS starting after dose k or later
            out[t.id] = probs[family](k)
        else:
            out[t.id] = probs[family][:, k - 1]
    return out


@dataclass
class Problem:
    """Targets, cohorts and parameters, with the batched simulation of the cohorts (one stack per group
    of similar grid length)."""

    targets: pd.DataFrame
    cohorts: list[Cohort]
    parameters: list[CalibratedParameter]
    patients: int
    seed: int
    model: DictConfig | None = None  # the model config the cohorts were prepared with
    fixed: dict = field(default_factory=dict)  # base-posterior medians held fixed (`calibration.extends`)
    stacks: list = field(init=False)  # `Stack`s: cohorts of similar grid length, one compiled kernel each
    ids: jax.Array = field(init=False)

    def __post_init__(self):
        model = self.model if self.model is not None else catalogue.load("model", "default")
        prepared = [c.prepared for c in self.cohorts]
        self.ids = jnp.arange(self.patients)
        self.stacks = []
        for group in length_groups(prepared, float(model.solver.shared_shape_growth)):
            inputs, paths = stack_arms([prepared[i] for i in group])
            covs = [cohort_covariates(prepared[i].inputs.covariate_params, self.ids, jnp.asarray(self.seed), prepared[i].covariate_kinds)
                    for i in group]
            self.stacks.append(Stack(group, inputs, paths, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *covs)))

    @functools.cached_property
    def rates_at(self):
        """Jitted: the rate (0-1) of every target, in `targets` order, at one unconstrained parameter
        vector u. One compiled kernel serves the design and the prior and posterior predictive runs."""

        def rates(u):
            r = self.target_rates(constrain_all(self.parameters, u))
            return jnp.stack([r[t] for t in self.targets.id])

        return jax.jit(rates)

    def rates_over(self, u: np.ndarray) -> np.ndarray:
        """[rows, targets] rates at each row of u, one `rates_at` call per row, each waited for.
        Measured on the 2-core CPU: vmapping 8 parameter sets on top of the stacked cohorts ran ~10x
        slower per simulation, and queueing all sets at once (JAX dispatches asynchronously) ~5x slower."""
        return np.stack([np.asarray(self.rates_at(jnp.asarray(ui))) for ui in np.asarray(u)])

    def target_rates(self, values: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Predicted rate (0-1) of every target (the expectation of the trial runner's 0/1 endpoint
        over its virtual cohort), for calibrated values by config path."""
        return {t: jnp.mean(p) for t, p in self.patient_expectations(values).items()}

    def patient_expectations(self, values: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Per target, each virtual patient's expected 0/1 endpoint ([patients])."""
        out = {}
        for stack in self.stacks:
            typicals = [parameters.substitute(self.cohorts[i].prepared.inputs.typical, self.cohorts[i].paths, values)
                        for i in stack.cohorts]
            inputs = stack.inputs._replace(typical=jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *typicals))
            red = simulate_stacked(inputs, stack.covariates, self.ids, jnp.asarray(self.seed), stack.paths)
            for j, (i, typical) in enumerate(zip(stack.cohorts, typicals)):
                r, cov = (jax.tree_util.tree_map(lambda x, j=j: x[j], tree) for tree in (red, stack.covariates))
                out.update(_by_target(self._patient_probabilities(r, cov, self.cohorts[i], typical), self.cohorts[i].targets))
        return out

    def _patient_probabilities(self, red, cov, cohort: Cohort, typ) -> dict[str, jax.Array]:
        """Each patient's expected 0/1 endpoints of the trial runner: CRS over the susceptibility
        consistent with the patient's rescue history, response over the assessment effect
        (`vpop.endpoints`). Per-dose CRS comes as [patients, periods]. `typ` is the cohort's typical
        parameters at the values tried, so the susceptibility's spread omega (`crs.susceptibility_sd`)
        is traced: the patients' susceptibilities and the expectation over them move with it."""
        omega_crs = typ.crs.susceptibility_sd
        history = (red.crs_index_peak, red.toci_rescue, red.dex_rescue, red.crs_log_susceptibility, typ.crs.rescue)
        if cohort.occasions:
            lo, hi = endpoints.rescue_bounds(*history)
            out = endpoints.occasion_crs_probabilities(red.crs_index_peak, red.crs_index_at_dose, omega_crs,
                                                       typ.crs.occasion_share, lo, hi)
        else:  # one susceptibility for the whole course: the exact interval probabilities
            lo, hi = endpoints.rescue_interval(*history)
            hold_lo, hold_hi = endpoints.hold_interval(red.crs_index_at_dose, red.held_index_min, red.crs_hold_day,
                                                       red.crs_log_susceptibility[..., 0], typ.crs.hold_until_resolved)
            lo, hi = jnp.maximum(lo, hold_lo), jnp.minimum(hi, hold_hi)
            out = endpoints.crs_probabilities(red.crs_index_peak, red.crs_index_at_dose, omega_crs, lo, hi)
        # Stacked cohorts share padded assessment lists; padded slots stay NaN (never assessed).
        margins = endpoints.response_margins(cohort.kind, red.malignant_fraction_at, red.marrow_malignant_fraction_at,
                                             cov.tumour_volume_ml, cov.marrow_malignant_percent, cohort.cr_residual_volume_ml, xp=jnp)
        return {**out, **endpoints.response_probabilities(margins, cohort.omega_response)}


def build_problem(cfg: DictConfig, roles: tuple[str, ...] = ("calibration", "validation"),
                  model: DictConfig | None = None) -> Problem:
    """One virtual cohort per arm and horizon of the targets of the given roles, simulated with
    `model` (the `model` group of the calibration app; default the shipped configs/model/default.yaml)."""
    targets = published.load(cfg.targets)
    moved = set(cfg.get("fit_targets") or [])
    validation = set(targets.id[targets.role == "validation"])
    if moved - validation:
        raise ConfigError(f"calibration.fit_targets: {sorted(moved - validation)} are not validation targets; "
                          f"allowed: {', '.join(sorted(validation))}")
    if cfg.get("only_targets") and moved - set(cfg.only_targets):
        raise ConfigError(f"calibration.fit_targets: {sorted(moved - set(cfg.only_targets))} not in calibration.only_targets")
    targets.loc[targets.id.isin(moved), "role"] = "calibration"  # into the likelihood, for this run only
    if cfg.get("only_targets"):
        unknown = sorted(set(cfg.only_targets) - set(targets.id))
        if unknown:
            raise ConfigError(f"calibration.only_targets: unknown target(s) {unknown}; allowed: {', '.join(targets.id)}")
        targets = targets[targets.id.isin(list(cfg.only_targets))]
    targets = targets[targets.role.isin(roles)].copy()
    if cfg.get("horizon_days"):
        targets["horizon_days"] = np.minimum(targets.horizon_days.astype(float), float(cfg.horizon_days))
    model = model if model is not None else catalogue.load("model", "default")
    params = calibrated_parameters(list(cfg.parameters), float(cfg.prior_truncation_sd), model, cfg.get("priors"))
    fixed = base_medians(cfg, params)
    cohorts = []
    for _, group in targets.groupby(list(published.COHORT), sort=False, dropna=False):
        t = group.iloc[0]
        arm = published.cohort_arm(t, f"{t.drug}_{t.population}_{t.regimen}")
        prepared = prepare_arm(arm, model, float(t.horizon_days))
        scope = parameters.ParameterScope(arm.drug, arm.route, arm.population)
        if fixed:  # the base posterior's parameters held at their medians
            typical = parameters.substitute(prepared.inputs.typical, parameters.parameter_paths(fixed, scope), fixed)
            prepared = replace(prepared, inputs=prepared.inputs._replace(typical=typical))
        paths = parameters.parameter_paths([p.config_path for p in params], scope)
        response = population.load(arm.population).response
        occasions = "crs.occasion_share" in paths.values() or float(prepared.inputs.typical.crs.occasion_share) > 0
        if float(prepared.inputs.typical.crs.rescue_grade1_hours) > 0:
            raise ConfigError("model.crs.rescue_grade1_hours: the calibration's expectation over the susceptibility holds the "
                              "rescues at grades 2 and 3 only, not tocilizumab for a lasting fever; set it to 0 to calibrate")
        if occasions and float(prepared.inputs.typical.crs.hold_until_resolved) > 0:
            raise ConfigError("model.crs.hold_until_resolved: dose holds are integrated over one susceptibility per "
                              "patient only; set model.crs.occasion_share to 0 and leave it out of calibration.parameters, "
                              "or hold_until_resolved to 0")
        cohorts.append(Cohort(arm, float(t.horizon_days), prepared, group, paths, str(response.kind),
                              float(response.get("cr_residual_volume_ml", 0.0)), _omega(prepared, "response.assessment_bias"),
                              occasions))
    return Problem(targets, cohorts, params, int(cfg.patients_per_cohort), int(cfg.seed), model, fixed)


def base_medians(cfg: DictConfig, params: list[CalibratedParameter]) -> dict[str, float]:
    """With `calibration.extends` (a posterior: `default` or a path), the medians of its parameters
    other than the fitted ones, which the cohorts hold fixed while only `calibration.parameters` are
    fitted (a fitted parameter already in it is fitted again, and its draws replaced). Without it,
    nothing: every parameter not fitted stays at its nominal."""
    if not cfg.get("extends"):
        return {}
    base = posterior.load(str(cfg.extends))
    fitted = {p.config_path for p in params}
    return {v: float(np.median(np.asarray(base[v]))) for v in base.data_vars if "." in v and v not in fitted}


def _omega(prepared, path: str) -> float:
    """The SD of the log of a parameter's random effect in an arm (the population's `variability`)."""
    paths = list(prepared.variability_paths)
    if path not in paths:
        raise ConfigError(f"population/{prepared.arm.population}.variability must give {path}: the endpoints integrate over it")
    return float(prepared.inputs.omegas[paths.index(path)])
