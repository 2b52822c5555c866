"""Virtual patients: covariates from disease-specific distributions or from a digital-twin CSV, and
each patient's parameters.

Each patient's randomness comes from `fold_in(PRNGKey(seed), patient_id)`, so a patient is the same
whatever the chunk size, device count or arm (arms of a trial share their patients). Covariate
distributions live in `configs/population/<name>.yaml`:

    covariates:
      age_years: {dist: normal, mean: 60, sd: 11, low: 29, high: 90}
      weight_kg: {dist: lognormal, median: 77, cv: 0.2}
      b_cells_per_ul: {dist: lognormal_mixture, fraction_low: 0.8, median_low: 5, median_high: 150, cv: 1.0}
      prior_car_t: {dist: bernoulli, p: 0.3}
      female: {dist: constant, value: 0}
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.special
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from vpop import catalogue, endpoints, parameters
from vpop.catalogue import ConfigError
from vpop.model import cells
from vpop.model.compartments import ByCompartment
from vpop.model.system import Params, PatientCovariates

log = logging.getLogger("vpop")
DISTRIBUTIONS = ("normal", "lognormal", "lognormal_mixture", "bernoulli", "constant")
LOCATIONS = ("tumour", "marrow")
SUSCEPTIBILITY_STREAM = "crs.susceptibility"  # the random-effect stream of the CRS susceptibility (`crs_susceptibility`)


class Covariates(NamedTuple):
    """One patient's covariates (a batch when leaves carry a leading axis)."""

    age_years: jax.Array
    female: jax.Array  # 1 female, 0 male
    weight_kg: jax.Array
    height_cm: jax.Array
    tumour_volume_ml: jax.Array  # lymphoma burden (0 for leukaemia and myeloma)
    marrow_malignant_percent: jax.Array  # ALL blasts or myeloma plasma cells in marrow (0 for lymphoma)
    cd8_t_cells_per_ul: jax.Array  # blood CD8+ T cells, the effector pool of the model
    b_cells_per_ul: jax.Array  # blood CD19+ B cells
    prior_anti_cd20: jax.Array  # 1 if exposed to an anti-CD20 antibody before
    prior_car_t: jax.Array  # 1 if relapsed after CAR-T

    @property
    def bsa_m2(self):
        return parameters.mosteller_bsa_m2(self.height_cm, self.weight_kg)


COVARIATES = Covariates._fields
_BOUNDS = {  # plausible ranges, used to reject bad twin CSV rows
    "age_years": (0, 120),
    "female": (0, 1),
    "weight_kg": (2, 400),
    "height_cm": (40, 250),
    "tumour_volume_ml": (0, 5000),
    "marrow_malignant_percent": (0, 100),
    "cd8_t_cells_per_ul": (0, 1e5),
    "b_cells_per_ul": (0, 1e6),
    "prior_anti_cd20": (0, 1),
    "prior_car_t": (0, 1),
}


def load(name: str) -> DictConfig:
    pop = catalogue.load("population", name, "population")
    missing = [c for c in COVARIATES if c not in pop.covariates]
    if missing:
        raise ConfigError(f"population/{name}.covariates lacks {missing}; every population needs {list(COVARIATES)}")
    for cname, spec in pop.covariates.items():
        if cname not in COVARIATES:
            raise ConfigError(f"population/{name}.covariates.{cname}: unknown covariate; allowed: {', '.join(COVARIATES)}")
        if spec.get("dist") not in DISTRIBUTIONS:
            raise ConfigError(f"population/{name}.covariates.{cname}.dist must be one of {DISTRIBUTIONS}, got {spec.get('dist')!r}")
    every = pop.get("response", {}).get("assessment_every_days")
    if isinstance(every, bool) or not isinstance(every, (int, float)) or not every > 0:
        raise ConfigError(f"population/{name}.response.assessment_every_days must be a positive number of days "
                          f"(how often response is assessed), got {every!r}")
    if SUSCEPTIBILITY_STREAM in (pop.get("variability") or {}):
        raise ConfigError(f"population/{name}.variability.{SUSCEPTIBILITY_STREAM}: the spread of the CRS susceptibility is no "
                          "longer a population's variability entry; set model.crs.susceptibility_sd instead (a calibrated "
                          "model parameter, the SD of log susceptibility between patients) and remove this entry")
    loc = pop.malignant.get("location")
    if loc not in LOCATIONS:
        raise ConfigError(f"population/{name}.malignant.location must be one of {LOCATIONS}, got {loc!r}")
    return pop


def _sigma(cv: float) -> float:
    return math.sqrt(math.log1p(cv * cv))


class CovariateModel(NamedTuple):
    """Covariate distributions as jit-friendly data: a distribution name per covariate (static)
    and four numbers each (traced), in `COVARIATES` order."""

    kinds: tuple[str, ...]
    params: np.ndarray  # [n_covariates, 4]


def covariate_model(pop: DictConfig) -> CovariateModel:
    kinds, rows = [], []
    for c in COVARIATES:
        s = pop.covariates[c]
        w = f"population/{pop.name}.covariates.{c}"
        try:
            if s.dist == "normal":
                row = (s.mean, s.sd, s.get("low", -np.inf), s.get("high", np.inf))
            elif s.dist == "lognormal":
                row = (s.median, _sigma(s.cv), s.get("low", 0.0), s.get("high", np.inf))
            elif s.dist == "lognormal_mixture":
                row = (s.median_low, s.median_high, s.fraction_low, _sigma(s.cv))
            elif s.dist == "bernoulli":
                row = (s.p, 0.0, 0.0, 0.0)
            else:
                row = (s.value, 0.0, 0.0, 0.0)
        except Exception as err:  # noqa: BLE001 - a missing field of the distribution
            raise ConfigError(f"{w}: {s.dist} needs other fields ({err})") from err
        kinds.append(str(s.dist))
        rows.append([float(x) for x in row])
    return CovariateModel(tuple(kinds), np.asarray(rows))


def _draw(kind: str, a, key: jax.Array) -> jax.Array:
    f = parameters._float()
    z = parameters.standard_normal(key)
    if kind == "normal":
        return jnp.clip(a[0] + a[1] * z, a[2], a[3])
    if kind == "lognormal":
        return jnp.clip(a[0] * jnp.exp(a[1] * z), a[2], a[3])
    if kind == "lognormal_mixture":
        low = parameters.standard_uniform(jax.random.fold_in(key, 1)) < a[2]
        return jnp.where(low, a[0], a[1]) * jnp.exp(a[3] * z)
    if kind == "bernoulli":
        return (parameters.standard_uniform(key) < a[0]).astype(f)
    return a[0] + 0.0 * z  # constant


def sample_covariates(kinds: tuple[str, ...], params: jax.Array, key: jax.Array) -> Covariates:
    """One patient's covariates (key: the patient's). Pure JAX; `kinds` is static."""
    draws = [_draw(k, params[i], jax.random.fold_in(key, parameters.stream_id("covariate." + c)))
             for i, (k, c) in enumerate(zip(kinds, COVARIATES))]
    return Covariates(*draws)


def patient_key(seed: int, patient_id) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), patient_id)


TWIN_FILL = ("none", "median")


def read_twins(path: str | Path, fill: str = "none") -> pd.DataFrame:
    """Digital twins: one virtual patient per CSV row, covariate columns named as in `COVARIATES`,
    plus an optional `patient_id` column whose values label the output rows (default: 0..n-1).

    Every covariate column is required unless `fill="median"`: then a missing column takes each
    arm's population median (its typical value), and the columns filled are logged.
    """
    if fill not in TWIN_FILL:
        raise ConfigError(f"twins_fill must be one of {', '.join(TWIN_FILL)}, got {fill!r}")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"twins: no such file {path}")
    try:
        df = pd.read_csv(path)
    except Exception as err:  # noqa: BLE001 - report any parse failure as a config error
        raise ConfigError(f"twins: {path} is not a readable CSV ({err})") from err
    if df.empty:
        raise ConfigError(f"twins: {path} has no rows")
    unknown = [c for c in df.columns if c not in COVARIATES and c != "patient_id"]
    if unknown:
        raise ConfigError(f"twins: {path}: unknown column(s) {unknown}; allowed: patient_id, {', '.join(COVARIATES)}")
    missing = [c for c in COVARIATES if c not in df.columns]
    if missing and fill == "none":
        raise ConfigError(f"twins: {path} lacks column(s) {missing}; every covariate is needed ({', '.join(COVARIATES)}), "
                          "or pass twins_fill=median to take each population's median for the missing ones")
    if missing:
        log.info("twins: columns %s filled with each arm's population median (twins_fill=median)", ", ".join(missing))
    if "patient_id" in df.columns:
        ids = df["patient_id"]
        if ids.isna().any() or ids.duplicated().any():
            bad = ids[ids.isna() | ids.duplicated()].iloc[0]
            raise ConfigError(f"twins: {path}: patient_id must be unique and present in every row; {bad!r} is not")
    for col in df.columns:
        if col == "patient_id":
            continue
        vals = pd.to_numeric(df[col], errors="coerce")
        bad = vals.isna() | (vals < _BOUNDS[col][0]) | (vals > _BOUNDS[col][1])
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            lo, hi = _BOUNDS[col]
            raise ConfigError(f"twins: {path}: column {col} row {row + 1} has {df[col].iloc[row]!r}; expected a number in [{lo}, {hi}]")
        df[col] = vals.astype(float)
    return df


def twin_ids(df: pd.DataFrame) -> np.ndarray:
    """The ids written for the twins' rows: their `patient_id` column, else 0..n-1."""
    return df["patient_id"].to_numpy() if "patient_id" in df.columns else np.arange(len(df))


def twins_covariates(df: pd.DataFrame, pop: DictConfig) -> Covariates:
    """Batched covariates from a twin table; covariates it lacks (only with twins_fill=median) take
    the population's typical value."""
    n = len(df)
    cols = {}
    for c in COVARIATES:
        if c in df.columns:
            cols[c] = jnp.asarray(df[c].to_numpy(), parameters._float())
        else:
            cols[c] = jnp.full((n,), typical_covariate(pop.covariates[c]), parameters._float())
    return Covariates(**cols)


def typical_covariate(spec: DictConfig) -> float:
    if spec.dist == "normal":
        return float(spec.mean)
    if spec.dist == "lognormal":
        return float(spec.median)
    if spec.dist == "lognormal_mixture":
        return float(spec.median_low if spec.fraction_low >= 0.5 else spec.median_high)
    if spec.dist == "bernoulli":
        return float(spec.p >= 0.5)
    return float(spec.value)


class Physiology(NamedTuple):
    """Population constants that turn covariates into compartments."""

    blood_volume_ml: float
    lymphoid_volume_ml: float
    marrow_volume_ml: float
    reference_tumour_volume_ml: float  # exchange scale of the tumour compartment
    tumour_density_1e9_per_ml: float  # malignant cells per mL of tumour
    marrow_cells_1e9: float  # nucleated marrow cells
    malignant_in_tumour: float  # 1: lymphoma (tumour compartment); 0: marrow disease


def physiology(model: DictConfig, pop: DictConfig) -> Physiology:
    b = model.body
    m = pop.malignant
    in_tumour = m.location == "tumour"
    return Physiology(
        float(b.blood_volume_ml),
        float(b.lymphoid_volume_ml),
        float(b.marrow_volume_ml),
        float(b.reference_tumour_volume_ml),
        float(m.get("density_cells_per_ml", 0.0)) / 1e9,
        float(m.get("marrow_cells_per_ml", 0.0)) * float(b.marrow_volume_ml) / 1e9,
        1.0 if in_tumour else 0.0,
    )


def refractory_share(mp: cells.MalignantParams, key: jax.Array) -> cells.MalignantParams:
    r"""The patient's refractory share $f_i$: logit-normal around the typical share,
    $\mathrm{logit} f_i = \mathrm{logit} f + \sigma z_i$, $z_i \sim N(0, 1)$ from its own stream.
    A typical share of 0 (a population whose share is not fitted: ALL, SCLC, uveal melanoma) stays
    exactly 0: one susceptible clone."""
    z = parameters.standard_normal(jax.random.fold_in(key, parameters.stream_id("malignant.refractory_fraction")))
    f = jnp.clip(mp.refractory_fraction, 1e-9, 1.0 - 1e-9)  # finite logit (f = 0 is restored below)
    share = jax.nn.sigmoid(jax.scipy.special.logit(f) + mp.refractory_logit_sd * z)
    return mp._replace(refractory_fraction=jnp.where(mp.refractory_fraction > 0, share, 0.0))


def crs_susceptibility(crs: endpoints.CRSParams, key: jax.Array) -> endpoints.CRSParams:
    r"""The patient's CRS susceptibility $s_i = s\,e^{\omega z_i}$, $z_i \sim N(0, 1)$, with $\omega$ =
    `susceptibility_sd` (a calibrated model parameter). `key` is the patient's random-effects key, and
    $z_i$ comes from the stream `apply_variability` gave `crs.susceptibility` when $\omega$ was a
    population's variability entry, by the same arithmetic: the patients are the same bit for bit."""
    z = parameters.standard_normal(jax.random.fold_in(key, parameters.stream_id(SUSCEPTIBILITY_STREAM)))
    return crs._replace(susceptibility=crs.susceptibility * jnp.exp(crs.susceptibility_sd * z))


def occasion_susceptibility(crs: endpoints.CRSParams, typical: endpoints.CRSParams, key: jax.Array,
                            n_periods: int) -> endpoints.CRSParams:
    r"""The patient's CRS susceptibility in each of `n_periods` dose periods (inter-occasion
    variability). With $\varepsilon_i = \log s_i - \log s$ the patient's effect (SD $\omega$ =
    `susceptibility_sd`) and $\rho$ = `occasion_share`,

    $$ \log s_{ik} = \log s + \sqrt{1-\rho}\,\varepsilon_i + \sqrt{\rho}\,\omega\,\xi_{ik},
       \qquad \xi_{ik} \sim N(0, 1), $$

    a fresh $\xi_{ik}$ at each administration (its own stream): each period's susceptibility keeps
    the spread $\omega$, two periods' correlate by $1 - \rho$. $\rho = 0$ keeps $s_i$ in every
    period, exactly."""
    xi = jax.vmap(lambda k: parameters.standard_normal(jax.random.fold_in(key, k)))(jnp.arange(n_periods))
    log_typical = jnp.log(typical.susceptibility)
    log_s = (log_typical + jnp.sqrt(1.0 - crs.occasion_share) * (jnp.log(crs.susceptibility) - log_typical)
             + jnp.sqrt(crs.occasion_share) * crs.susceptibility_sd * xi)
    s = jnp.where(crs.occasion_share > 0, jnp.exp(log_s), jnp.broadcast_to(crs.susceptibility, (n_periods,)))
    return crs._replace(susceptibility=s.astype(crs.susceptibility.dtype))


def individual_params(typical: Params, cov: Covariates, phys: Physiology, pk_cov: parameters.PKCovariates,
                      paths: tuple[str, ...], omegas: jax.Array, key: jax.Array, n_periods: int) -> Params:
    """One patient's parameters: compartments and baselines from covariates, PK covariate effects,
    log-normal random effects (`paths`, `omegas`: the drug's and population's `variability`), the CRS
    susceptibility (spread `typical.crs.susceptibility_sd`) of each of `n_periods` dose periods and the
    refractory share. Pure JAX; vmapped over patients."""
    f = parameters._float()
    random_effects = jax.random.fold_in(key, parameters.stream_id("random_effects"))
    p = parameters.apply_variability(typical, paths, omegas, random_effects)
    p = p._replace(malignant=refractory_share(p.malignant, key),
                   crs=occasion_susceptibility(crs_susceptibility(p.crs, random_effects), typical.crs,
                                               jax.random.fold_in(key, parameters.stream_id("crs.occasion")), n_periods))
    bsa = cov.bsa_m2
    p = p._replace(
        bispecific_pk=parameters.apply_pk_covariates(p.bispecific_pk, pk_cov, cov.weight_kg, bsa, cov.female),
        patient=PatientCovariates(weight_kg=cov.weight_kg, bsa_m2=bsa),
    )
    tumour_ml = jnp.maximum(cov.tumour_volume_ml, 1.0)  # keeps the (empty) tumour compartment finite
    volume = ByCompartment(jnp.asarray(phys.blood_volume_ml, f), jnp.asarray(phys.lymphoid_volume_ml, f),
                           jnp.asarray(phys.marrow_volume_ml, f), tumour_ml)
    # Blood counts per uL x blood volume in uL, in 1e9 cells; tissues hold partition x blood concentration.
    t_blood = cov.cd8_t_cells_per_ul * phys.blood_volume_ml * 1e3 / 1e9
    b_blood = cov.b_cells_per_ul * phys.blood_volume_ml * 1e3 / 1e9
    conc_ratio = volume / phys.blood_volume_ml
    marrow_malignant = cov.marrow_malignant_percent / 100.0 * phys.marrow_cells_1e9 * (1.0 - phys.malignant_in_tumour)
    blood_partition = p.malignant.blood_partition
    blood_malignant = jnp.where(blood_partition > 0, marrow_malignant / jnp.maximum(blood_partition, 1e-12) / conc_ratio.marrow, 0.0)
    tumour_cells = phys.malignant_in_tumour * cov.tumour_volume_ml * phys.tumour_density_1e9_per_ml
    body = cells.Body(
        volume_ml=volume,
        exchange_volume_ml=volume._replace(tumour=jnp.asarray(phys.reference_tumour_volume_ml, f)),
        t_baseline=p.tcells.partition * conc_ratio * t_blood,
        b_baseline=p.bcells.partition * conc_ratio * b_blood,
        malignant_baseline=ByCompartment(blood_malignant, jnp.zeros((), f), marrow_malignant, tumour_cells),
    )
    return p._replace(body=body)
