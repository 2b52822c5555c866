"""From configs to parameter pytrees: typical values, priors of unknowns, and one patient's values.

Config numbers are plain numbers (known, with their source beside them in the YAML) or
`{nominal: x, prior: [low, high], unknown: true}` (not published: `nominal` is used with
`posterior=none`; calibration gives it a normal prior on the log scale, or the logit scale for
fractions, whose central 95% is `prior`). `typical_params` assembles the
population-typical `Params` of one arm (drug + route + population) as scalar leaves;
`individual_params` turns them into one patient's `Params` from covariates and random effects.
Everything after `typical_params` is pure JAX, so it runs inside the vmapped simulation.
"""

from __future__ import annotations

import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from omegaconf import DictConfig, OmegaConf

from vpop import catalogue, endpoints
from vpop import schema
from vpop.catalogue import ConfigError
from vpop.model import cells, cytokines, engagement, pk, supportive
from vpop.model.compartments import ByCompartment
from vpop.model.system import Params, PatientCovariates

ROUTES = ("iv", "sc", "civ", "oral")
# Engaged antigens. Normal B cells carry CD20 and CD19 (B-cell aplasia); BCMA and GPRC5D sit on plasma
# cells, DLL3 on neuroendocrine tumour cells and gp100 (presented by HLA-A*02:01) on melanoma cells
# and melanocytes, none of them on the modelled normal B cells.
TARGETS = ("CD20", "CD19", "BCMA", "GPRC5D", "DLL3", "gp100")
DRUG_KINDS = ("bispecific", "tocilizumab", "dexamethasone", "anti_cd20")


def value(node: Any, field: str = "") -> float:
    """The number a config entry stands for (the nominal value of an unknown)."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    if isinstance(node, (dict, DictConfig)) and "nominal" in node:
        return float(node["nominal"])
    raise ConfigError(f"{field}: expected a number or {{nominal, prior, unknown}}, got {node!r}")


def _get(cfg: DictConfig, key: str, where: str, default: Any = None) -> float:
    if key not in cfg:
        if default is not None:
            return float(default)
        raise ConfigError(f"{where}.{key} is missing")
    return value(cfg[key], f"{where}.{key}")


def _check_keys(cfg: DictConfig, allowed: set[str], where: str) -> None:
    schema.refuse_unknown(cfg.keys(), sorted(allowed), where)


def _fill(cls, cfg: DictConfig, where: str, **computed):
    """Build NamedTuple `cls` from cfg entries named like its fields (plus computed ones)."""
    kwargs = {}
    for f in cls._fields:
        kwargs[f] = computed[f] if f in computed else _get(cfg, f, where)
    return cls(**{k: v if isinstance(v, ByCompartment) else jnp.asarray(v, dtype=_float()) for k, v in kwargs.items()})


def _float():
    return jnp.result_type(float)


# ---------------------------------------------------------------------------------------------
# Drugs
# ---------------------------------------------------------------------------------------------

_PK_DEFAULTS = dict(
    cl_decay_l_per_day=0.0,
    cl_decay_rate_per_day=0.0,
    q_l_per_day=0.0,
    v2_l=1.0,
    vmax_mg_per_day=0.0,
    km_mg_per_l=1.0,
    tmdd_rtot_mg_per_l=0.0,
    tmdd_kss_mg_per_l=1.0,
    tmdd_kint_per_day=0.0,
)
_ROUTE_KEYS = {"infusion_hours", "ka_per_day", "bioavailability"}


def load_drug(name: str, field: str = "drug") -> DictConfig:
    cfg = catalogue.load("drug", name, field)
    kind = cfg.get("kind")
    if kind not in DRUG_KINDS:
        raise ConfigError(f"drug {name}: kind must be one of {DRUG_KINDS}, got {kind!r}")
    return cfg


def check_route(drug: DictConfig, route: str, field: str = "route") -> None:
    if route not in ROUTES:
        raise ConfigError(f"{field}: unknown route '{route}'; allowed: {', '.join(ROUTES)}")
    routes = list(drug.get("routes", {}).keys())
    if route not in routes:
        raise ConfigError(f"{field}: drug {drug.name} has no parameters for route '{route}'; allowed: {', '.join(routes)}")


def pk_params(drug: DictConfig, route: str) -> pk.PKParams:
    """Typical PK parameters of a drug given by `route` (absorption from the route block)."""
    where = f"drug/{drug.name}.pk"
    pkc = drug.pk
    allowed = set(pk.PKParams._fields) - {"ka_per_day", "bioavailability"}
    _check_keys(pkc, allowed, where)
    route_cfg = drug.routes.get(route) or {}
    _check_keys(OmegaConf.create(route_cfg), _ROUTE_KEYS, f"drug/{drug.name}.routes.{route}")
    ka = _get(route_cfg, "ka_per_day", f"drug/{drug.name}.routes.{route}", default=1.0)
    f = _get(route_cfg, "bioavailability", f"drug/{drug.name}.routes.{route}", default=1.0)
    vals = {k: _get(pkc, k, where, _PK_DEFAULTS.get(k)) for k in allowed}
    return pk.PKParams(**{k: jnp.asarray(v, _float()) for k, v in {**vals, "ka_per_day": ka, "bioavailability": f}.items()})


# ---------------------------------------------------------------------------------------------
# Typical parameters of an arm
# ---------------------------------------------------------------------------------------------


class ParameterScope(NamedTuple):
    """The configs an arm's parameters come from: its drug (and route) and its population, over the
    model's defaults (`typical_params`, `params_path`)."""

    drug: str
    route: str
    population: str


def _by_compartment(blood, lymphoid, marrow, tumour) -> ByCompartment:
    return ByCompartment(*(jnp.asarray(x, _float()) for x in (blood, lymphoid, marrow, tumour)))


def with_overrides(cfg: DictConfig, scope: str, name: str | None, overrides: dict[str, float] | None) -> DictConfig:
    """A copy of cfg with the overrides addressed to it set. Keys are 'model.<path>',
    'drug.<name>.<path>' or 'population.<name>.<path>' (how posterior draws address parameters)."""
    if not overrides:
        return cfg
    cfg = cfg.copy()
    for key, val in overrides.items():
        parts = key.split(".")
        if parts[0] != scope or (name is not None and (len(parts) < 2 or parts[1] != name)):
            continue
        path = ".".join(parts[1:] if name is None else parts[2:])
        if OmegaConf.select(cfg, path) is None:
            raise ConfigError(f"override '{key}': no such parameter in {scope}{'/' + name if name else ''}")
        OmegaConf.update(cfg, path, float(val), merge=False)
    return cfg


def _engagement_params(arm: ParameterScope, drug: DictConfig, model: DictConfig, dis: DictConfig) -> engagement.EngagementParams:
    """The drug's engagement (its values over the model's defaults) against the population's cells."""
    target = drug.get("target")
    if target not in TARGETS:
        raise ConfigError(f"drug/{arm.drug}.target must be one of {TARGETS}, got {target!r}")
    eng_cfg = OmegaConf.merge(model.engagement, drug.get("engagement", {}))
    return _fill(
        engagement.EngagementParams,
        eng_cfg,
        f"drug/{arm.drug}.engagement",
        binds_normal_b=1.0 if target in ("CD20", "CD19") else 0.0,
        binds_malignant=value(dis.get("antigens", {}).get(target, 0.0), f"population/{arm.population}.malignant.antigens.{target}"),
        partition=_by_compartment(1.0, value(eng_cfg.partition_lymphoid), value(eng_cfg.partition_marrow), value(eng_cfg.partition_tumour)),
    )


def _supportive_params(sc: DictConfig, toci: DictConfig, dex: DictConfig, dis: DictConfig) -> supportive.SupportiveParams:
    """Tocilizumab, dexamethasone and anti-CD20 pretreatment effects (`model.supportive`)."""
    kill_blood = value(sc.anti_cd20_k_kill_blood_per_day)
    kill_tissue = value(sc.anti_cd20_k_kill_tissue_per_day)
    return _fill(
        supportive.SupportiveParams,
        sc,
        "model.supportive",
        tocilizumab_kd_mg_per_l=value(sc.tocilizumab_kd_nm) * value(toci.molecular_weight_kda) / 1000.0,
        dexamethasone_mw_g_per_mol=value(dex.molecular_weight_kda) * 1000.0,
        anti_cd20_k_kill_per_day=_by_compartment(kill_blood, kill_tissue, kill_tissue, kill_tissue),
        # Most relapsed/refractory lymphomas are refractory to anti-CD20 antibodies: the population says
        # how much of the antibody's killing of normal B cells still reaches its malignant cells.
        anti_cd20_binds_malignant=value(dis.get("antigens", {}).get("CD20", 0.0)) * value(dis.get("anti_cd20_sensitivity", 1.0)),
    )


def typical_params(arm: ParameterScope, model: DictConfig | None = None, overrides: dict[str, float] | None = None) -> Params:
    """Population-typical parameters of one arm (scalar leaves); `overrides` set config values
    (see `with_overrides`)."""
    model = with_overrides(model if model is not None else catalogue.load("model", "default"), "model", None, overrides)
    drug = with_overrides(load_drug(arm.drug), "drug", arm.drug, overrides)
    if drug.kind != "bispecific":
        raise ConfigError(f"drug: {arm.drug} is a {drug.kind}, not a bispecific antibody")
    check_route(drug, arm.route)
    pop = with_overrides(catalogue.load("population", arm.population, "population"), "population", arm.population, overrides)
    dis = pop.malignant

    eng = _engagement_params(arm, drug, model, dis)
    tc = model.tcells
    infiltration = value(dis.t_cell_infiltration, f"population/{arm.population}.malignant.t_cell_infiltration")
    tcells = _fill(
        cells.TCellParams,
        tc,
        "model.tcells",
        partition=_by_compartment(1.0, value(tc.partition_lymphoid), value(tc.partition_marrow), infiltration),
    )
    bc = model.bcells
    bcells = _fill(cells.BCellParams, bc, "model.bcells", partition=_by_compartment(1.0, value(bc.partition_lymphoid), value(bc.partition_marrow), 0.0))
    # The refractory clone's spread between patients is shared (model.malignant) unless a population sets its own.
    malignant = _fill(cells.MalignantParams, OmegaConf.merge(model.get("malignant") or {}, dis), f"population/{arm.population}.malignant")

    # A population may set its own values of cytokine parameters (e.g. a smaller myeloid pool).
    cyto = _fill(cytokines.CytokineParams, OmegaConf.merge(model.cytokines, pop.get("cytokines") or {}), "model.cytokines")

    toci, dex, cd20 = load_drug("tocilizumab"), load_drug("dexamethasone"), load_drug("obinutuzumab")
    sup = _supportive_params(model.supportive, toci, dex, dis)
    # Body and baselines come from each patient's covariates (population.individual_params).
    zero = jnp.zeros((), _float())
    z = ByCompartment.full(zero)
    body = cells.Body(volume_ml=z, exchange_volume_ml=z, t_baseline=z, b_baseline=z, malignant_baseline=z)
    return Params(
        bispecific_pk=pk_params(drug, arm.route),
        engagement=eng,
        tocilizumab_pk=pk_params(toci, "iv"),
        dexamethasone_pk=pk_params(dex, "oral"),  # depot doses are oral; IV doses enter central
        anti_cd20_pk=pk_params(cd20, "iv"),
        supportive=sup,
        tcells=tcells,
        bcells=bcells,
        malignant=malignant,
        cytokines=cyto,
        body=body,
        crs=_fill(endpoints.CRSParams, model.crs, "model.crs"),
        response=_fill(endpoints.ResponseParams, model.response, "model.response"),
        patient=PatientCovariates(weight_kg=zero, bsa_m2=zero),
        first_dose_day=zero,
    )


# ---------------------------------------------------------------------------------------------
# Paths into parameter pytrees (for variability and calibration)
# ---------------------------------------------------------------------------------------------


def get_path(tree, path: str):
    for part in path.split("."):
        if not hasattr(tree, part):
            raise ConfigError(f"'{path}': no parameter '{part}'; allowed: {', '.join(tree._fields)}")
        tree = getattr(tree, part)
    return tree


def set_path(tree, path: str, new):
    head, _, rest = path.partition(".")
    if not hasattr(tree, head):
        raise ConfigError(f"'{path}': no parameter '{head}'; allowed: {', '.join(tree._fields)}")
    return tree._replace(**{head: set_path(getattr(tree, head), rest, new) if rest else new})


def stream_id(name: str) -> int:
    """A stable 31-bit id for a random-effect name, so a patient's effect does not depend on which
    other effects an arm has (paired arms with different drugs still share their patients)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


class Variability(NamedTuple):
    """Log-normal inter-individual variability: parameter paths and their SD of the log."""

    paths: tuple[str, ...]
    omegas: tuple[float, ...]


def variability(arm: ParameterScope, overrides: dict[str, float] | None = None) -> Variability:
    """Random effects of an arm: the drug's PK (bispecific_pk.*) and the population's (any path)."""
    drug = with_overrides(load_drug(arm.drug), "drug", arm.drug, overrides)
    pop = with_overrides(catalogue.load("population", arm.population, "population"), "population", arm.population, overrides)
    entries = {f"bispecific_pk.{k}": value(v) for k, v in (drug.get("variability") or {}).items()}
    entries.update({k: value(v) for k, v in (pop.get("variability") or {}).items()})
    template = typical_params(arm)
    for path in entries:
        get_path(template, path)  # raises a ConfigError naming the bad path
    return Variability(tuple(entries), tuple(entries.values()))


def mosteller_bsa_m2(height_cm, weight_kg):
    return jnp.sqrt(height_cm * weight_kg / 3600.0)


class PKCovariates(NamedTuple):
    """Covariate model of a drug's PK: theta x (weight/ref)^a x (BSA/ref)^b, and clearance times
    `cl_female_factor` in women."""

    reference_weight_kg: float
    reference_bsa_m2: float
    cl_weight_exponent: float
    v1_weight_exponent: float
    v2_weight_exponent: float
    q_weight_exponent: float
    cl_bsa_exponent: float
    cl_female_factor: float


def pk_covariates(drug_name: str) -> PKCovariates:
    drug = load_drug(drug_name)
    cov = drug.get("covariates") or {}
    _check_keys(OmegaConf.create(cov), set(PKCovariates._fields), f"drug/{drug_name}.covariates")
    given = {f: float(value(cov[f])) for f in PKCovariates._fields if f in cov}
    exponents = {f: given.get(f, 0.0) for f in PKCovariates._fields if f.endswith("_exponent")}  # absent: no effect
    references = {}
    for ref, covariate in (("reference_weight_kg", "_weight_exponent"), ("reference_bsa_m2", "_bsa_exponent")):
        used = [f for f, a in exponents.items() if f.endswith(covariate) and a != 0.0]
        if used and ref not in given:
            raise ConfigError(f"drug/{drug_name}.covariates.{ref} is missing: {', '.join(used)} scale by it "
                              "(the population PK model's reference value)")
        references[ref] = given.get(ref, 1.0)  # 1.0 when unused: x ** 0 is 1 whatever the reference
    return PKCovariates(**references, **exponents, cl_female_factor=given.get("cl_female_factor", 1.0))


def apply_pk_covariates(p: pk.PKParams, cov: PKCovariates, weight_kg, bsa_m2, female) -> pk.PKParams:
    w = weight_kg / cov.reference_weight_kg
    b = bsa_m2 / cov.reference_bsa_m2
    cl_factor = w**cov.cl_weight_exponent * b**cov.cl_bsa_exponent * jnp.where(female > 0.5, cov.cl_female_factor, 1.0)
    return p._replace(
        cl_l_per_day=p.cl_l_per_day * cl_factor,
        cl_decay_l_per_day=p.cl_decay_l_per_day * cl_factor,
        v1_l=p.v1_l * w**cov.v1_weight_exponent,
        v2_l=p.v2_l * w**cov.v2_weight_exponent,
        q_l_per_day=p.q_l_per_day * w**cov.q_weight_exponent,
    )


def standard_normal(key: jax.Array) -> jax.Array:
    """N(0, 1) drawn in float32 whatever the precision, so float64 runs see the same patients."""
    return jax.random.normal(key, dtype=jnp.float32).astype(_float())


def standard_uniform(key: jax.Array) -> jax.Array:
    return jax.random.uniform(key, dtype=jnp.float32).astype(_float())


def apply_variability(p: Params, paths: tuple[str, ...], omegas, key: jax.Array) -> Params:
    """Multiply each parameter in `paths` by exp(omega * z), z ~ N(0, 1) from its own named stream."""
    for i, path in enumerate(paths):
        z = standard_normal(jax.random.fold_in(key, stream_id(path)))
        p = set_path(p, path, get_path(p, path) * jnp.exp(omegas[i] * z))
    return p


# ---------------------------------------------------------------------------------------------
# Calibrated parameters: config paths <-> parameter-pytree paths
# ---------------------------------------------------------------------------------------------

def params_path(config_path: str, arm: ParameterScope) -> str | None:
    """Where a config value lives in an arm's `Params` ('model.crs.grade2_fold' -> 'crs.grade2_fold');
    None when it does not concern the arm (another drug's potency, another population's kill, a
    model value the arm's drug or population sets for itself)."""
    scope, *rest = config_path.split(".")
    if scope == "model":
        group, name = rest[0], ".".join(rest[1:])
        # Shadowed: typical_params merges the drug's engagement and the population's cytokines over the model's.
        own = (load_drug(arm.drug).get("engagement") if group == "engagement" else
               catalogue.load("population", arm.population, "population").get(group) if group in ("cytokines", "malignant") else None)
        if own is not None and OmegaConf.select(own, name) is not None:
            return None
        if group in ("crs", "cytokines", "malignant", "tcells", "bcells", "engagement", "supportive", "response"):
            return f"{group}.{name}"
    elif scope == "population":
        name, group, field = rest[0], rest[1], ".".join(rest[2:])
        if name != arm.population:
            return None
        if group in ("malignant", "cytokines"):
            return f"{group}.{field}"
    elif scope == "drug":
        name, group, field = rest[0], rest[1], rest[2:]
        if name != arm.drug:
            return None
        if group == "engagement":
            return f"engagement.{'.'.join(field)}"
        if group == "pk":
            return f"bispecific_pk.{'.'.join(field)}"
        if group == "routes":
            return f"bispecific_pk.{field[1]}" if field[0] == arm.route else None
    raise ConfigError(f"'{config_path}' cannot be calibrated: only model.(crs|cytokines|malignant|tcells|bcells|engagement|supportive|response).*, "
                      "population.<name>.(malignant|cytokines).* and drug.<name>.(engagement|pk|routes.<route>).* map to parameters")


def parameter_paths(config_paths, arm: ParameterScope) -> dict[str, str]:
    """Config path -> `Params` path of the values that concern the arm (`params_path`)."""
    return {c: pp for c in config_paths if (pp := params_path(c, arm)) is not None}


def substitute(typical: Params, paths: dict[str, str], values: dict[str, Any]) -> Params:
    """`typical` with values by config path set at their `Params` paths (`parameter_paths`): how a
    posterior draw, or a point the calibration tries, becomes an arm's parameters. Pure; traceable."""
    for config_path, path in paths.items():
        typical = set_path(typical, path, jnp.asarray(values[config_path], get_path(typical, path).dtype))
    return typical


def config_entry(config_path: str, model: DictConfig | None = None) -> Any:
    """The raw config entry at a path like 'drug.mosunetuzumab.routes.sc.ka_per_day' (`model.*`
    paths in `model`, default the shipped configs/model/default.yaml)."""
    scope, *rest = config_path.split(".")
    if scope == "model":
        cfg, path = model if model is not None else catalogue.load("model", "default"), rest
    elif scope in ("drug", "population"):
        cfg, path = catalogue.load(scope, rest[0], scope), rest[1:]
    else:
        raise ConfigError(f"'{config_path}': the first part must be model, drug or population")
    node = OmegaConf.select(cfg, ".".join(path))
    if node is None:
        raise ConfigError(f"'{config_path}': no such config entry")
    return node
