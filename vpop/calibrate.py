r"""Bayesian calibration of population parameters to published response and CRS rates (NumPyro).

Each published result is a binomial observation, $k \sim \mathrm{Binomial}(n, \bar p_j(\theta))$,
where $\bar p_j$ is the model's rate over a fixed virtual cohort for that trial (common random
numbers: the same patients at every $\theta$). The rate is the one the trial runner reports, in
expectation: the same simulation (rescue on), the same grading and onset periods, with each
patient's 0/1 endpoint replaced by its expectation over the patient effect that decides it (CRS
susceptibility, response-assessment effect; see `vpop.endpoints`). So the calibration fits the trial
runner's model, not a smoothed cousin of it. Response and any-grade CRS rates are smooth in the
parameters; with rescue on, grade >= 2 and >= 3 CRS rates are counts (steps of 1/patients), since
the rescue history fixes them (`vpop.endpoints`); the emulator smooths over the steps (B06, 0 or 1
of 96 virtual patients at posterior draws, emulated at 0.3-1.7%).
Priors come from the `{nominal, prior: [low, high], unknown: true}` entries of the configs: normal
on the log scale (logit scale for fractions) with the prior range as its central 95%, truncated at +-3 SD. Validation
targets are simulated from the posterior but never enter the likelihood.

Two samplers, chosen by `calibration.method`:
- `simulator`: NUTS differentiates through the simulator itself. Exact but slow on a CPU (a gradient
  over every cohort costs seconds and NUTS needs ~10^4 of them); a patient's rescue history can
  change between nearby parameters, which makes the rates piecewise smooth.
- `emulator` (default): the simulator's smooth rates at a few hundred parameter sets (forward runs
  only, batched) fit a Gaussian-process emulator of logit(rate) against the parameters; NUTS runs on it
  in seconds. Later design rounds concentrate new simulations where the latest posterior lies. The
  emulator's error is reported per target (`emulator.csv`), and every predictive check (`ppc.csv`,
  validation) is simulated with the real simulator at posterior draws, never emulated.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from vpop import catalogue, endpoints, parameters, population
from vpop import targets as published
from vpop.catalogue import ConfigError
from vpop.model import VERSION as model_version
from vpop.simulate import Arm, prepare_arm, sample_covariates, simulate_stacked, stack_arms

log = logging.getLogger("vpop")
EMULATED_RATE_FLOOR = 1e-3
NUTS_STATS = ("potential_energy", "energy", "num_steps", "adapt_state.step_size", "accept_prob", "diverging")
# Convergence the diagnostics must meet, else a warning (Vehtari et al. 2021 Bayesian Anal 16:667: R-hat < 1.01,
# bulk and tail ESS > 400 for four chains).
RHAT_MAX = 1.01
ESS_MIN = 400


@dataclass(frozen=True)
class CalibratedParameter:
    """A population parameter with a prior, sampled on an unconstrained scale u ~ N(0, 1) truncated to [-3, 3]."""

    config_path: str
    low: float
    high: float
    logit: bool  # fractions (`scale: logit` in the config) live on the logit scale, the rest on the log scale
    truncation_sd: float = 3.0  # the prior is truncated at +-this many SD of u (calibration.prior_truncation_sd)

    @property
    def site(self) -> str:
        return "u:" + self.config_path

    def _scale(self, x):
        return jnp.log(x / (1 - x)) if self.logit else jnp.log(x)

    def constrain(self, u):
        lo, hi = self._scale(self.low), self._scale(self.high)
        v = 0.5 * (lo + hi) + 0.25 * (hi - lo) * u  # prior range = central 95%
        return jax.nn.sigmoid(v) if self.logit else jnp.exp(v)


def calibrated_parameters(paths: list[str], truncation_sd: float = 3.0) -> list[CalibratedParameter]:
    out = []
    for path in paths:
        entry = parameters.config_entry(path)
        if not (isinstance(entry, DictConfig) and entry.get("unknown", False)):
            raise ConfigError(f"calibration.parameters: '{path}' has a published value; only "
                              "{nominal, prior, unknown: true} entries are calibrated")
        low, high = (float(x) for x in entry.prior)
        scale = entry.get("scale", "log")
        if scale not in ("log", "logit"):
            raise ConfigError(f"'{path}'.scale must be log or logit, got {scale!r}")
        out.append(CalibratedParameter(path, low, high, logit=scale == "logit", truncation_sd=truncation_sd))
    return out


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
    omega_crs: float  # SD of the patients' log CRS susceptibility (epsilon)
    omega_response: float  # SD of the patients' response-assessment effect (delta)


@dataclass
class Problem:
    """Targets, cohorts and parameters, with the batched simulation of all cohorts at once."""

    targets: pd.DataFrame
    cohorts: list[Cohort]
    parameters: list[CalibratedParameter]
    patients: int
    seed: int
    inputs: object = None
    variability_paths: tuple = ()
    covariates: object = None
    ids: object = None
    _typicals: list = field(default_factory=list)

    def __post_init__(self):
        self.inputs, self.variability_paths = stack_arms([c.prepared for c in self.cohorts])
        self.ids = jnp.arange(self.patients)
        covs = [sample_covariates(c.prepared.inputs.covariate_params, self.ids, jnp.asarray(self.seed), c.prepared.covariate_kinds)
                for c in self.cohorts]
        self.covariates = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *covs)
        self._typicals = [jax.tree_util.tree_map(lambda x, i=i: x[i], self.inputs.typical) for i in range(len(self.cohorts))]

    @functools.cached_property
    def design_logits(self):
        """Jitted: logit(rate) of every target at one unconstrained parameter vector u. Rates within
        0.1% of 0 or 1 are clipped there: no published rate lies that close, and the huge logits of a
        cohort with no events would otherwise dominate the emulator's fit."""

        def logits(u):
            r = self.rates(constrain_all(self, u))
            return jnp.stack([jax.scipy.special.logit(jnp.clip(r[t], EMULATED_RATE_FLOOR, 1 - EMULATED_RATE_FLOOR))
                              for t in self.targets.id])

        return jax.jit(logits)

    def rates(self, values: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Smooth predicted rate (0-1) of every target (the expectation of the trial runner's 0/1
        endpoint over its virtual cohort), for calibrated values by config path."""
        return {t: jnp.mean(p) for t, p in self.patient_rates(values).items()}

    def patient_rates(self, values: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Per target, each virtual patient's expected 0/1 endpoint ([patients])."""
        typicals = [parameters.substitute(typ, cohort.paths, values) for cohort, typ in zip(self.cohorts, self._typicals)]
        inputs = self.inputs._replace(typical=jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *typicals))
        red = simulate_stacked(inputs, self.covariates, self.ids, jnp.asarray(self.seed), self.variability_paths)
        out = {}
        for i, cohort in enumerate(self.cohorts):
            r = jax.tree_util.tree_map(lambda x, i=i: x[i], red)
            cov = jax.tree_util.tree_map(lambda x, i=i: x[i], self.covariates)
            probs = self._patient_probabilities(r, cov, cohort, typicals[i])
            for t in cohort.targets.itertuples():
                family, k = published.endpoint_family(t.endpoint), published.dose_number(t.endpoint)
                if k is None:
                    out[t.id] = probs[t.endpoint]
                elif family == "crs_first_at_dose":
                    out[t.id] = probs[family](k)
                else:
                    out[t.id] = probs[family][:, k - 1]
        return out

    def _patient_probabilities(self, red, cov, cohort: Cohort, typ) -> dict[str, jax.Array]:
        """Each patient's expected 0/1 endpoints of the trial runner: CRS over the susceptibility
        consistent with the patient's rescue history, response over the assessment effect
        (`vpop.endpoints`). Per-dose CRS comes as [patients, periods]."""
        lo, hi = endpoints.rescue_interval(red.crs_index_peak, red.toci_rescue, red.dex_rescue, red.crs_log_susceptibility,
                                           typ.crs.rescue)
        out = endpoints.crs_probabilities(red.crs_index_peak, red.crs_index_at_dose, cohort.omega_crs, lo, hi)
        out["crs_first_at_dose"] = lambda k: endpoints.first_crs_probability(red.crs_index_peak, k, cohort.omega_crs, lo, hi)
        # Stacked cohorts share padded assessment lists; padded slots stay NaN (never assessed).
        margins = endpoints.response_margins(cohort.kind, red.malignant_fraction_at, red.marrow_malignant_fraction_at,
                                             cov.tumour_volume_ml, cov.marrow_malignant_percent, cohort.cr_residual_volume_ml, xp=jnp)
        return {**out, **endpoints.response_probabilities(margins, cohort.omega_response)}


def build_problem(cfg: DictConfig, roles: tuple[str, ...] = ("calibration", "validation")) -> Problem:
    """One virtual cohort per arm and horizon of the targets of the given roles."""
    targets = published.load(cfg.targets)
    if cfg.get("only_targets"):
        unknown = sorted(set(cfg.only_targets) - set(targets.id))
        if unknown:
            raise ConfigError(f"calibration.only_targets: unknown target(s) {unknown}; allowed: {', '.join(targets.id)}")
        targets = targets[targets.id.isin(list(cfg.only_targets))]
    targets = targets[targets.role.isin(roles)].copy()
    if cfg.get("horizon_days"):
        targets["horizon_days"] = np.minimum(targets.horizon_days.astype(float), float(cfg.horizon_days))
    params = calibrated_parameters(list(cfg.parameters), float(cfg.prior_truncation_sd))
    model = catalogue.load("model", "default")
    keys = ["drug", "population", "regimen", "route", "premedication", "prophylaxis", "horizon_days"]
    cohorts = []
    for key, group in targets.groupby(keys, sort=False, dropna=False):
        spec = dict(zip(keys, key))
        arm = Arm(f"{spec['drug']}_{spec['population']}_{spec['regimen']}", spec["drug"], spec["route"], spec["population"],
                  spec["regimen"], _none(spec["premedication"]), _none(spec["prophylaxis"]))
        prepared = prepare_arm(arm, model, float(spec["horizon_days"]))
        arm_spec = parameters.ArmSpec(arm.drug, arm.route, arm.population)
        paths = parameters.parameter_paths([p.config_path for p in params], arm_spec)
        response = population.load(arm.population).response
        cohorts.append(Cohort(arm, float(spec["horizon_days"]), prepared, group, paths, str(response.kind),
                              float(response.get("cr_residual_volume_ml", 0.0)), _omega(prepared, "crs.susceptibility"),
                              _omega(prepared, "response.assessment_bias")))
    return Problem(targets, cohorts, params, int(cfg.patients_per_cohort), int(cfg.seed))


def _omega(prepared, path: str) -> float:
    """The SD of the log of a parameter's random effect in an arm (the population's `variability`)."""
    paths = list(prepared.variability_paths)
    if path not in paths:
        raise ConfigError(f"population/{prepared.arm.population}.variability must give {path}: the endpoints integrate over it")
    return float(prepared.inputs.omegas[paths.index(path)])


def _none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) or x == "none" else x


def constrain_all(problem: Problem, u: jax.Array) -> dict[str, jax.Array]:
    """Parameter values by config path from the unconstrained vector u (prior N(0, I))."""
    return {p.config_path: p.constrain(u[i]) for i, p in enumerate(problem.parameters)}


def numpyro_model(problem: Problem, fit: bool = True, emulator: "Emulator | None" = None):
    """Priors on the calibrated parameters, smooth rates for every target (simulated, or from an
    emulator of the simulator), binomial likelihood for the calibration targets (`fit=False` leaves
    the observations out: predictive runs)."""
    import numpyro
    import numpyro.distributions as dist

    # Truncated: beyond the first design round's reach an emulator only extrapolates (its linear
    # mean can make a far corner look like a perfect fit), so the posterior may not go there.
    u = jnp.stack([numpyro.sample(prm.site, dist.TruncatedNormal(0.0, 1.0, low=-prm.truncation_sd, high=prm.truncation_sd))
                   for prm in problem.parameters])
    values = constrain_all(problem, u)
    for name, v in values.items():
        numpyro.deterministic(name, v)
    rates = emulator.rates(u) if emulator is not None else problem.rates(values)
    for t in problem.targets.itertuples():
        rate = numpyro.deterministic("rate:" + t.id, jnp.clip(rates[t.id], 1e-6, 1 - 1e-6))
        if t.role == "calibration":
            n, k = published.likelihood_counts(t)
            numpyro.sample(t.id, dist.Binomial(n, probs=rate), obs=k if fit else None)


class Emulator:
    r"""Gaussian-process emulator of logit(rate) of every target against the unconstrained parameters.

    One GP per target, squared-exponential kernel with a length scale per parameter (ARD) over the
    parameters that concern the target's cohort only (`relevant`: the shared model parameters and its
    own drug's and population's), a linear mean and a small noise term for the Monte Carlo wiggle
    left by a finite cohort:

    $$ y_t(u) \sim \mathcal{GP}\big(a_t + b_t^\top u_t,\; s_t^2 \exp(-\tfrac12 \textstyle\sum_{k \in t} (u_k - u'_k)^2/\ell_{tk}^2) + \sigma_t^2\delta\big). $$

    Hyperparameters maximise the marginal likelihood (numpyro's Adam, all targets at once under
    vmap) on the last `fit_points` design points (the cost grows with the cube of the points; the
    latest rounds lie where the posterior is), starting from the prior's width or from the previous
    round's fit (`start`, so a refit needs fewer steps), or are taken from another emulator (`hyper`); the
    emulator is then the posterior mean over all points, smooth and cheap to differentiate for NUTS.
    With a few hundred design points it interpolates far better than a small neural network.
    """

    def __init__(self, target_ids: list[str], u: np.ndarray, logits: np.ndarray, relevant: np.ndarray | None = None,
                 steps: int = 400, learning_rate: float = 0.05, fit_points: int = 384, hyper: dict | None = None,
                 start: dict | None = None):
        from numpyro.optim import Adam

        self.target_ids = list(target_ids)
        x = jnp.asarray(u, jnp.float32)
        self.x = x
        n, d = x.shape
        mask = jnp.ones((len(self.target_ids), d), jnp.float32) if relevant is None else jnp.asarray(relevant, jnp.float32)
        self.y_mean, self.y_scale = logits.mean(0), logits.std(0) + 1e-3
        y = jnp.asarray((logits - self.y_mean) / self.y_scale, jnp.float32).T  # (targets, points)
        optimiser = Adam(learning_rate)

        def gram(h, xm):
            amp, noise = jnp.exp(h["log_amp"]), jnp.exp(h["log_noise"]) + 1e-4
            z = xm / jnp.exp(h["log_ell"])
            sq = jnp.sum(z * z, -1)
            # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b: an (n, n) matmul instead of an (n, n, d) difference
            # tensor (a 150-step fit of 40 targets on 384 of 1,024 points: 51 s instead of 76 s, 2 CPU cores).
            dist2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)
            # Jitter relative to the amplitude keeps the Cholesky finite in float32 when a target sits at its
            # floor at nearly every design point (a few outliers then pull the amplitude up by orders).
            return amp * jnp.exp(-0.5 * dist2) + (noise + 1e-4 * amp) * jnp.eye(len(xm))

        def residual(yt, xm):
            design = jnp.concatenate([jnp.ones((len(xm), 1)), xm], axis=1)
            beta = jnp.linalg.lstsq(design, yt)[0]  # linear mean by least squares; the GP models the rest
            return beta, yt - design @ beta

        def fit_hyper(yt, m, h0):
            xm = (x * m)[-fit_points:]  # parameters that do not concern the target drop out of kernel and mean
            _, r = residual(yt[-fit_points:], xm)

            def nll(h):
                chol = jnp.linalg.cholesky(gram(h, xm))
                a = jax.scipy.linalg.cho_solve((chol, True), r)
                prior = 0.5 * jnp.sum(m * (h["log_ell"] - jnp.log(1.5)) ** 2)  # weak: length scales near the prior's width
                return 0.5 * r @ a + jnp.sum(jnp.log(jnp.diag(chol))) + prior

            def step(state, _):
                _, grads = jax.value_and_grad(nll)(optimiser.get_params(state))
                return optimiser.update(grads, state), None

            state, _ = jax.lax.scan(step, optimiser.init(h0), None, length=steps)
            return optimiser.get_params(state)

        def condition(yt, m, h):
            xm = x * m
            beta, r = residual(yt, xm)
            alpha = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(gram(h, xm)), True), r)
            return dict(beta=beta, alpha=alpha, log_ell=h["log_ell"], log_amp=h["log_amp"], log_noise=h["log_noise"], mask=m)

        if hyper is None:
            if start is None:  # length scales at the prior's width, amplitude at the residual variance
                start = dict(log_ell=jnp.full((len(self.target_ids), d), jnp.log(1.5)),
                             log_amp=jnp.log(jnp.var(y, axis=1) + 1e-3), log_noise=jnp.full(len(self.target_ids), jnp.log(1e-2)))
            start = {k: start[k] for k in ("log_ell", "log_amp", "log_noise")}
            hyper = jax.jit(jax.vmap(fit_hyper))(y, mask, start)
        hyper = {k: hyper[k] for k in ("log_ell", "log_amp", "log_noise")}
        self.gp = jax.jit(jax.vmap(condition))(y, mask, hyper)
        failed = [t for t, ok in zip(self.target_ids, np.isfinite(np.asarray(self.gp["alpha"])).all(1)) if not ok]
        if failed:  # say which, rather than let NUTS fail later on a NaN rate
            raise RuntimeError(f"Gaussian-process fit not finite for targets {failed} (see Emulator)")
        # Design points on each target's length scales, and their squared norms, for `logits`.
        self._z = x[None, :, :] * (self.gp["mask"] / jnp.exp(self.gp["log_ell"]))[:, None, :]  # (targets, points, d)
        self._z_sq = jnp.sum(self._z * self._z, -1)

    def logits(self, u: jax.Array) -> jax.Array:
        """Emulated logit(rate) of every target at one parameter vector u (unconstrained scale)."""
        g = self.gp
        um = u[None, :] * g["mask"]
        uz = um / jnp.exp(g["log_ell"])
        # Squared distances by one contraction, as in `gram` (half the cost of NUTS on the emulator).
        dist2 = jnp.maximum(jnp.sum(uz * uz, -1)[:, None] + self._z_sq - 2.0 * jnp.einsum("tnd,td->tn", self._z, uz), 0.0)
        k = jnp.exp(g["log_amp"])[:, None] * jnp.exp(-0.5 * dist2)  # (targets, points)
        mean = g["beta"][:, 0] + jnp.sum(g["beta"][:, 1:] * um, -1) + jnp.sum(k * g["alpha"], -1)
        return mean * self.y_scale + self.y_mean

    def rates(self, u: jax.Array) -> dict[str, jax.Array]:
        z = jax.nn.sigmoid(self.logits(u))
        return {t: z[i] for i, t in enumerate(self.target_ids)}


def relevance(problem: "Problem") -> np.ndarray:
    """[targets, parameters]: 1 where a calibrated parameter concerns the target's cohort."""
    rows = []
    for cohort in problem.cohorts:
        row = [1.0 if p.config_path in cohort.paths else 0.0 for p in problem.parameters]
        rows += [row] * len(cohort.targets)
    order = [t for c in problem.cohorts for t in c.targets.id]
    by_id = dict(zip(order, rows))
    return np.asarray([by_id[t] for t in problem.targets.id])


def simulate_design(problem: Problem, u: np.ndarray) -> np.ndarray:
    """logit(rate) of every target of `problem` at each row of u (forward simulator runs)."""
    # One parameter set per device call, waited for: every cohort's patients are already one batch.
    # Measured on the 2-core CPU: vmapping 8 parameter sets on top of the stacked cohorts ran ~10x
    # slower per simulation, and queueing all sets at once (JAX dispatches asynchronously) ~5x slower.
    return np.stack([np.asarray(problem.design_logits(jnp.asarray(ui))) for ui in u])


# ---------------------------------------------------------------------------------------------
# Running a calibration: prior predictive, NUTS, posterior predictive, diagnostics, files
# ---------------------------------------------------------------------------------------------


def _predict(problem: Problem, samples: dict | None, n: int, key) -> dict[str, np.ndarray]:
    """Rates of every target under prior (samples None) or posterior samples, one draw at a time."""
    from numpyro.infer import Predictive

    kw = dict(posterior_samples=samples) if samples is not None else dict(num_samples=n)
    pred = Predictive(numpyro_model, return_sites=[f"rate:{i}" for i in problem.targets.id], parallel=False, **kw)
    out = pred(key, problem, fit=False)
    return {k.removeprefix("rate:"): np.asarray(v) for k, v in out.items()}


def _thin(samples: dict, n: int) -> dict:
    total = next(iter(samples.values())).shape[0]
    idx = np.linspace(0, total - 1, min(n, total)).astype(int)
    return {k: v[idx] for k, v in samples.items()}


def ppc_table(targets: pd.DataFrame, rates: dict[str, np.ndarray], seed: int = 0) -> pd.DataFrame:
    """ppc.csv: observed and posterior-predictive rates (%) with 95% intervals of a trial of size n."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in targets.itertuples():
        r = rates[t.id]
        k_rep = rng.binomial(int(t.n), np.clip(r, 0, 1)[:, None], size=(len(r), 20)).ravel() / t.n
        rows.append(dict(target=t.id, endpoint=t.endpoint, role=t.role, observed=100 * t.k / t.n,
                         predicted_mean=100 * float(np.mean(r)), lower=100 * float(np.percentile(k_rep, 2.5)),
                         upper=100 * float(np.percentile(k_rep, 97.5)), n=int(t.n), drug=t.drug, population=t.population))
    return pd.DataFrame(rows)


def _starting_points(problem: Problem, emulator: Emulator, chains: int, jitter: float, key) -> dict[str, jax.Array]:
    """One starting point per chain: the design point with the highest emulated log posterior, plus
    N(0, jitter^2) per chain on the unconstrained scale. Rates pinned near 0 or 1 leave flat plateaus
    where NUTS, started at random, can stall far from the data; the design already holds points near
    the posterior (`start_jitter` in the calibration config says why not the best few points)."""
    from numpyro.infer.util import log_density

    def score(ui):
        params = {prm.site: ui[i] for i, prm in enumerate(problem.parameters)}
        return log_density(numpyro_model, (problem,), {"emulator": emulator}, params)[0]

    bound = 0.95 * jnp.asarray([prm.truncation_sd for prm in problem.parameters])
    u = jnp.clip(jnp.asarray(emulator.x), -bound, bound)  # inside the prior's support
    best = u[jnp.argmax(jax.jit(lambda x: jax.lax.map(score, x))(u))]
    start = jnp.clip(best + jitter * jax.random.normal(key, (chains, len(best))), -bound, bound)
    if chains == 1:
        start = start[0]
    return {prm.site: start[..., i] for i, prm in enumerate(problem.parameters)}


def _nuts(problem: Problem, cfg: DictConfig, key, emulator: Emulator | None, progress: bool, samples: int | None = None,
          warmup: int | None = None, chains: int | None = None):
    from numpyro.infer import MCMC, NUTS

    kernel = NUTS(numpyro_model, target_accept_prob=float(cfg.target_accept), max_tree_depth=int(cfg.max_tree_depth),
                  dense_mass=True)
    chains = int(chains or cfg.chains)
    mcmc = MCMC(kernel, num_warmup=int(warmup or cfg.warmup), num_samples=int(samples or cfg.samples), num_chains=chains,
                chain_method=str(cfg.chain_method), progress_bar=progress)
    key, k_init = jax.random.split(key)
    init = (_starting_points(problem, emulator, chains, float(cfg.start_jitter), k_init)
            if emulator is not None else None)
    # Kept for ArviZ's sample_stats: energy (az.bfmi, az.plot_energy), step size, tree depth, acceptance.
    mcmc.run(key, problem, emulator=emulator, init_params=init, extra_fields=NUTS_STATS)
    return mcmc


def _design_identity(problem: Problem, cfg: DictConfig) -> dict[str, np.ndarray]:
    """What a saved design must agree on to be reused: the model version, the fitted parameters
    (unconstrained scale), the targets (logit scale, in this order) and the virtual cohorts (patients,
    seed, horizon cap; -1 for none)."""
    return {"model_version": np.asarray(model_version), "parameters": np.asarray([p.config_path for p in problem.parameters]),
            "targets": np.asarray(list(problem.targets.id)),
            "cohorts": np.asarray([int(cfg.patients_per_cohort), int(cfg.seed),
                                   -1 if cfg.horizon_days is None else int(cfg.horizon_days)])}


def load_design(path: str | Path, problem: Problem, cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    """A design saved by an earlier calibration (design.npz): its parameter sets u and simulated
    target logits y, refused unless it was made for this model version, parameters, targets and cohorts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"calibration.emulator.design: no file {path}")
    saved = np.load(path)
    for name, want in _design_identity(problem, cfg).items():
        have = saved[name] if name in saved else np.asarray("missing")
        if have.shape != want.shape or not np.all(have == want):
            raise ConfigError(f"calibration.emulator.design: {path} was made for other {name} "
                              f"({have.tolist()}; this calibration: {want.tolist()})")
    return saved["u"], saved["y"]


def _emulate(problem: Problem, cfg: DictConfig, key, progress: bool, design: tuple[np.ndarray, np.ndarray] | None = None
             ) -> tuple[Emulator, pd.DataFrame, np.ndarray, np.ndarray]:
    """Sequential design: a prior-wide first round, then each round simulated around the posterior
    of the emulator fitted so far (where a posterior far in the prior's tail would otherwise be
    extrapolated). Returns the emulator on all rounds, its hold-out error per target (every
    fifth set of the last round left out of a refit) and the design (u, y). A given design (of an
    earlier run, `load_design`) is used instead of simulating one."""
    d = len(problem.parameters)
    ids = list(problem.targets.id)
    rng = np.random.default_rng(int(cfg.seed))
    m = int(cfg.emulator.design_points)
    rounds = int(cfg.emulator.rounds)
    if rounds < 1:
        raise ConfigError(f"calibration.emulator.rounds must be >= 1, got {rounds}")
    relevant = relevance(problem)

    def fit(u, y, hyper=None, start=None):
        steps = cfg.emulator.fit_steps if start is None else cfg.emulator.refit_steps
        return Emulator(ids, u, y, relevant, int(steps), float(cfg.emulator.learning_rate),
                        int(cfg.emulator.fit_points), hyper, start)

    started = time.perf_counter()
    if design is not None:
        u, y = design
        rounds = 1
    else:
        u = rng.normal(0.0, float(cfg.emulator.design_scale), size=(m, d))
        y = simulate_design(problem, u)
        log.info("design round 1 of %d simulated (%.0f s)", rounds, time.perf_counter() - started)
    emulator = None
    for r, key_r in enumerate(jax.random.split(key, rounds - 1), start=2):
        emulator = fit(u, y, start=None if emulator is None else emulator.gp)
        s = _nuts(problem, cfg, key_r, emulator, progress, samples=int(cfg.emulator.round_samples),
                  warmup=int(cfg.emulator.round_warmup), chains=int(cfg.emulator.round_chains)).get_samples()
        draws = np.stack([np.asarray(s[p.site]) for p in problem.parameters], axis=1)
        u_new = draws[rng.integers(0, len(draws), m)] + rng.normal(0.0, float(cfg.emulator.round_jitter), size=(m, d))
        u, y = np.concatenate([u, u_new]), np.concatenate([y, simulate_design(problem, u_new)])
        log.info("design round %d of %d simulated (%.0f s)", r, rounds, time.perf_counter() - started)
    final = fit(u, y, start=None if emulator is None else emulator.gp)
    held = np.zeros(len(u), bool)
    held[len(u) - m::5] = True  # every fifth set of the last round, predicted from the rest (same hyperparameters)
    check = fit(u[~held], y[~held], final.gp)
    pred = np.asarray(jax.vmap(check.logits)(jnp.asarray(u[held])))
    gap = np.abs(jax.nn.sigmoid(pred) - jax.nn.sigmoid(y[held]))
    err = pd.DataFrame({
        "target": ids,
        "logit_rmse": np.sqrt(np.mean((pred - y[held]) ** 2, axis=0)),
        "rate_abs_error_percent_median": 100 * np.median(gap, axis=0),
        "rate_abs_error_percent_max": 100 * np.max(gap, axis=0),
        "design_points": len(u),
    })
    return final, err, u, y


def run(cfg: DictConfig, out_dir: Path, progress: bool = False) -> dict[str, Path]:
    """Calibrate and write posterior.nc, diagnostics.csv, ppc.csv and figures/ into out_dir."""

    import xarray as xr

    from vpop.posterior import arviz

    az = arviz()

    started = time.perf_counter()
    method = str(cfg.method)
    if method not in ("emulator", "simulator"):
        raise ConfigError(f"calibration.method must be emulator or simulator, got {method!r}")
    fit_problem = build_problem(cfg, roles=("calibration",))
    full_problem = build_problem(cfg, roles=("calibration", "validation"))
    saved = cfg.emulator.get("design") if method == "emulator" else None
    design = load_design(saved, fit_problem, cfg) if saved else None  # checked before any simulation
    key = jax.random.PRNGKey(int(cfg.seed))
    k_prior, k_emul, k_mcmc, k_post = jax.random.split(key, 4)

    def stage(what: str) -> None:
        log.info("%s (%.0f s so far)", what, time.perf_counter() - started)

    stage(f"prior predictive: {cfg.prior_predictive_draws} draws x {len(full_problem.cohorts)} cohorts")
    prior_rates = _predict(full_problem, None, int(cfg.prior_predictive_draws), k_prior)
    if method == "emulator":
        stage(f"emulator design: {cfg.emulator.rounds} rounds x {cfg.emulator.design_points} parameter sets"
              if design is None else f"emulator design: {len(design[0])} parameter sets reused from {saved}")
    emulator, emulator_error, design_u, design_y = (_emulate(fit_problem, cfg, k_emul, progress, design)
                                                    if method == "emulator" else (None, None, None, None))
    stage(f"NUTS: {cfg.chains} chains x ({cfg.warmup} warmup + {cfg.samples} samples)")
    mcmc = _nuts(fit_problem, cfg, k_mcmc, emulator, progress)
    samples = mcmc.get_samples()
    thinned = _thin(samples, int(cfg.posterior_predictive_draws))
    stage(f"posterior predictive (simulator): {len(next(iter(thinned.values())))} draws")
    post_rates = _predict(full_problem, thinned, 0, k_post)  # the real simulator, also for the fitted targets
    seconds = time.perf_counter() - started

    names = [p.config_path for p in fit_problem.parameters]
    idata = az.from_numpyro(mcmc)
    idata.posterior = idata.posterior[names]  # the parameters by config path (the sampler's u-scale dropped)
    rng = np.random.default_rng(int(cfg.seed))
    pp = {t.id: (("chain", "draw"), rng.binomial(int(t.n), np.clip(post_rates[t.id], 0, 1))[None, :])
          for t in full_problem.targets.itertuples()}
    pp_rates = {f"rate:{t}": (("chain", "draw"), v[None, :]) for t, v in post_rates.items()}
    idata.add_groups(posterior_predictive=xr.Dataset({**pp, **pp_rates}),
                     prior_predictive=xr.Dataset({f"rate:{t}": (("chain", "draw"), v[None, :]) for t, v in prior_rates.items()}))
    idata.attrs.update(targets=str(cfg.targets), patients_per_cohort=int(cfg.patients_per_cohort), method=method,
                       wall_seconds=float(seconds), model_version=model_version)

    summary = az.summary(idata, var_names=names, kind="all", round_to="none")
    summary.insert(0, "parameter", summary.index)
    summary["divergences"] = int(np.asarray(idata.sample_stats.diverging).sum())
    warn_convergence(summary)
    ppc = ppc_table(full_problem.targets, post_rates, int(cfg.seed))
    if emulator is not None:  # how far the emulator was from the simulator at the posterior draws
        u = np.stack([np.asarray(thinned[p.site]) for p in fit_problem.parameters], axis=1)
        emulated = jax.nn.sigmoid(jax.vmap(emulator.logits)(jnp.asarray(u)))
        gap = {t: 100 * float(np.mean(np.abs(np.asarray(emulated[:, i]) - post_rates[t]))) for i, t in enumerate(emulator.target_ids)}
        ppc["emulator_gap_percent"] = ppc.target.map(gap)
    prior_ppc = ppc_table(full_problem.targets, prior_rates, int(cfg.seed))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = dict(posterior=out_dir / "posterior.nc", diagnostics=out_dir / "diagnostics.csv", ppc=out_dir / "ppc.csv",
                 prior_ppc=out_dir / "prior_ppc.csv")
    idata.to_netcdf(files["posterior"])
    summary.to_csv(files["diagnostics"], index=False)
    ppc.to_csv(files["ppc"], index=False, float_format="%.3f")
    prior_ppc.to_csv(files["prior_ppc"], index=False, float_format="%.3f")
    if emulator_error is not None:
        files["emulator"] = out_dir / "emulator.csv"
        emulator_error.to_csv(files["emulator"], index=False, float_format="%.4f")
        files["design"] = out_dir / "design.npz"  # reusable with emulator.design=<this file>
        np.savez(files["design"], u=design_u, y=design_y, **_design_identity(fit_problem, cfg))
    figures(idata, names, ppc, prior_ppc, out_dir / "figures")
    return files


def warn_convergence(summary: pd.DataFrame) -> list[str]:
    """Log a warning for every convergence diagnostic outside its bound (R-hat, bulk/tail ESS,
    divergences); returns the messages."""
    msgs = [f"{r.parameter}: R-hat {r.r_hat:.3f} > {RHAT_MAX}" for r in summary.itertuples() if r.r_hat > RHAT_MAX]
    msgs += [f"{r.parameter}: {kind} ESS {getattr(r, kind):.0f} < {ESS_MIN}" for r in summary.itertuples()
             for kind in ("ess_bulk", "ess_tail") if getattr(r, kind) < ESS_MIN]
    if len(summary) and summary.divergences.iloc[0] > 0:
        msgs.append(f"{int(summary.divergences.iloc[0])} divergent transitions")
    for m in msgs:
        log.warning("calibration not converged: %s (more warmup, samples or chains; see diagnostics.csv)", m)
    return msgs


def figures(idata, names: list[str], ppc: pd.DataFrame, prior_ppc: pd.DataFrame, folder: Path) -> None:
    import matplotlib

    from vpop.posterior import arviz

    az = arviz()

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    short = {n: n.split(".", 1)[1] if n.startswith("model.") else n for n in names}
    axes = az.plot_rank(idata, var_names=names, kind="vlines", figsize=(10, 2.0 * len(names)))
    plt.gcf().tight_layout()
    plt.savefig(folder / "rank.png", dpi=100)
    plt.close("all")
    key = names[: min(4, len(names))]
    az.plot_pair(idata, var_names=key, kind="kde" if idata.posterior.sizes["draw"] > 20 else "scatter", figsize=(9, 9),
                 labeller=az.labels.MapLabeller(var_name_map=short))
    plt.savefig(folder / "pairs.png", dpi=100)
    plt.close("all")
    del axes

    fig, ax = plt.subplots(figsize=(8, 0.32 * len(ppc) + 1.5))
    y = np.arange(len(ppc))[::-1]
    for frame, offset, color, label in ((prior_ppc, 0.18, "#bbbbbb", "prior predictive"), (ppc, 0.0, "#1f77b4", "posterior predictive")):
        below = np.clip(frame.predicted_mean - frame.lower, 0, None)  # a skewed predictive can put the mean outside
        above = np.clip(frame.upper - frame.predicted_mean, 0, None)
        ax.errorbar(frame.predicted_mean, y + offset, xerr=[below, above],
                    fmt="o", ms=3, color=color, capsize=2, label=label)
    val = ppc.role == "validation"
    ax.scatter(ppc.observed[~val], y[~val], marker="D", color="k", zorder=3, label="observed (calibration)")
    ax.scatter(ppc.observed[val], y[val], marker="*", s=90, color="#d62728", zorder=3, label="observed (validation, not fitted)")
    ax.set_yticks(y, [f"{r.target} {r.drug} {r.endpoint}" for r in ppc.itertuples()], fontsize=7)
    ax.set_xlabel("rate (%) with 95% predictive interval for a trial of the published size")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / "ppc.png", dpi=110)
    plt.close(fig)
