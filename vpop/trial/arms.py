"""An experiment's arms: read and checked from the `experiment:` block, then prepared for every
posterior draw (configs read once, regimen compiled, schedule built; a draw substituted into the
parameters)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from omegaconf import DictConfig, OmegaConf

from vpop import catalogue, endpoints, parameters, schema
from vpop.catalogue import ConfigError
from vpop.simulate import Arm, PreparedArm, prepare_arm, share_compilation

@dataclass
class TrialSettings:
    n: int = 1000
    seed: int = 0
    chunk_size: int = 10_000
    horizon_days: float | None = None
    assessment_every_days: float | None = None
    trajectories: int = 100  # patients per arm whose time courses feed the figures


def arms_from_config(experiment: DictConfig | dict) -> tuple[dict[str, Arm], str]:
    """Arms and reference arm of an `experiment:` block; errors name the field and allowed values."""
    exp = OmegaConf.create(experiment) if not isinstance(experiment, DictConfig) else experiment
    if "arms" not in exp or not exp.arms:
        raise ConfigError("experiment.arms is missing or empty: give at least one arm")
    schema.check(exp, schema.Experiment, "experiment")
    arms = {}
    for name, a in exp.arms.items():
        where = f"experiment.arms.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", str(name)):
            raise ConfigError(f"{where}: arm names may use letters, digits and _ . + - only (they name folders of patients.parquet)")
        schema.check(a, schema.Arm, where)
        reg = a.regimen if isinstance(a.regimen, str) else OmegaConf.to_container(a.regimen, resolve=True)
        route = a.get("route") or (catalogue.load("regimen", reg, f"{where}.regimen").get("route") if isinstance(reg, str) else reg.get("route"))
        if route is None:
            raise ConfigError(f"{where}.route is missing (iv, sc or civ) and the regimen names none")

        def plain(x):
            return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig) else x

        arms[str(name)] = Arm(str(name), str(a.drug), str(route), str(a.population), reg,
                              plain(a.get("premedication")), plain(a.get("prophylaxis")), plain(a.get("delay")))
    ref = exp.get("reference_arm") or next(iter(arms))
    if ref not in arms:
        raise ConfigError(f"experiment.reference_arm '{ref}' is not an arm; allowed: {', '.join(arms)}")
    return arms, str(ref)


def response_kind(prepared: PreparedArm) -> str:
    """How the arm's population responds: lymphoma (SPD), leukaemia (marrow blasts), myeloma or solid (RECIST)."""
    kind = prepared.population.get("response", {}).get("kind", "lymphoma")
    if kind not in endpoints.RESPONSE_KINDS:
        raise ConfigError(f"population/{prepared.arm.population}.response.kind must be one of {endpoints.RESPONSE_KINDS}")
    return str(kind)


def prepare_draws(arms: dict[str, Arm], settings: TrialSettings, model: DictConfig,
                  draws: list[dict[str, float]]) -> list[dict[str, PreparedArm]]:
    """Every arm prepared once (configs read and checked, regimen compiled, schedule built: a draw
    cannot change them; arms of similar grid length padded to one shape, `share_compilation`), then
    each posterior draw substituted into its typical parameters by the calibration's mechanism
    (`parameters.substitute`)."""
    out = [{} for _ in draws]
    bases = share_compilation({name: prepare_arm(arm, model, settings.horizon_days, settings.assessment_every_days)
                               for name, arm in arms.items()}, float(model.solver.shared_shape_growth))
    for name, arm in arms.items():
        base = bases[name]
        spec = parameters.ParameterScope(arm.drug, arm.route, arm.population)
        paths = parameters.parameter_paths(draws[0], spec)  # every draw of a posterior names the same parameters
        for by_arm, values in zip(out, draws):
            typical = parameters.substitute(base.inputs.typical, paths, values)
            by_arm[name] = replace(base, inputs=base.inputs._replace(typical=typical))
    return out
