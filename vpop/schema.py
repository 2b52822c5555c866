"""What users write, as dataclasses: the keys each block of an experiment may hold, which of them are
required and what kind of value each takes. `check` reads a block against its schema, so every
block's errors read alike: the field's path, the allowed keys (with the nearest one to a typo) and
the kind of value expected. What a value must mean (a day within the cycle, a known drug) is
checked where it is used (`vpop.regimen`, `vpop.trial.arms`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from typing import Any, Union

from omegaconf import DictConfig, ListConfig

from vpop.catalogue import ConfigError

Number = Union[int, float]
Cycles = Union[int, str]  # 3, "3-8" or "1,3-5"
Named = Any  # a config name or an inline mapping


@dataclass(frozen=True)
class Experiment:
    arms: dict
    reference_arm: str | None = None  # default: the first arm
    description: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class Arm:
    drug: str
    population: str
    regimen: Named
    route: str | None = None  # iv | sc | civ; default: the regimen's
    premedication: Named = None
    prophylaxis: Named = None
    delay: dict | None = None  # a hold and restart (`Delay`)
    description: str | None = None


@dataclass(frozen=True)
class Delay:
    after_dose: int  # treatment stops after the after_dose-th administration given (1-based)
    days: Number  # from that administration (an infusion: its end) to the restart
    restart_from: int | None = None  # the regimen's administration given first on restart; default the next one


@dataclass(frozen=True)
class Regimen:
    cycle_days: Number
    cycles: int
    doses: list
    then: dict | None = None  # a following block with its own cycle length, numbered on
    assessment_every_days: Number | None = None
    route: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class Dose:
    day: Number  # 1-based day within the cycle
    amount: Number
    unit: str
    cycle: int | None = None  # exactly one of cycle and cycles
    cycles: Cycles | None = None
    hour: Number = 0.0
    drug: str | None = None  # default: the arm's bispecific
    route: str | None = None
    duration_days: Number | None = None  # continuous infusions
    infusion_hours: Number | None = None
    max_mg: Number | None = None


@dataclass(frozen=True)
class Premedication:
    drug: str
    amount: Number
    unit: str
    hours_before: Number  # before each selected administration
    route: str = "iv"
    administrations: Cycles | None = None
    cycles: Cycles | None = None
    days_after: list | None = None
    description: str | None = None


@dataclass(frozen=True)
class Prophylaxis:
    drug: str
    amount: Number
    unit: str
    hours_before: Number  # before the administration it precedes
    before_dose: int = 1
    max_mg: Number | None = None
    description: str | None = None


@dataclass(frozen=True)
class Objective:
    minimise: str
    arm: str
    no_worse_than: str
    margin_pp: Number
    reference_arm: str | None = None


_KINDS = {int: "a whole number", float: "a number", str: "text", bool: "true or false", list: "a list", dict: "a mapping"}


def fields(schema) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def required(schema) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def check(node: DictConfig | dict, schema, where: str) -> None:
    """Refuse unknown keys (naming the nearest allowed one), missing required keys and values of the
    wrong kind, in that order; the message starts with the field's path `where`."""
    keys = [str(k) for k in node.keys()]
    refuse_unknown(keys, fields(schema), where)
    for key in required(schema):
        if key not in keys or node[key] is None:
            raise ConfigError(f"{where}.{key} is missing")
    hints = typing.get_type_hints(schema)
    for key in keys:
        kinds = _accepted(hints[key])
        value = node[key]
        if value is None or kinds is None or _is(value, kinds):
            continue
        shown = [k for k in kinds if not (k is int and float in kinds)]  # a whole number is a number
        expected = " or ".join(dict.fromkeys(_KINDS[k] for k in shown))
        raise ConfigError(f"{where}.{key} must be {expected}, got {value!r}")


def refuse_unknown(keys, allowed, where: str) -> None:
    """Refuse keys outside `allowed`, naming the nearest allowed key to the first of them."""
    allowed = list(allowed)
    unknown = sorted(set(map(str, keys)) - set(allowed))
    if unknown:
        near = difflib.get_close_matches(unknown[0], allowed, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ConfigError(f"{where}: unknown key(s) {unknown}; {hint}allowed: {', '.join(allowed)}")


def _accepted(hint) -> tuple[type, ...] | None:
    """The plain types a hint accepts (None: anything)."""
    if hint is Any:
        return None
    args = typing.get_args(hint)
    if not args:
        return (hint,)
    out = []
    for a in args:
        if a is type(None):
            continue
        sub = _accepted(a)
        if sub is None:
            return None
        out += sub
    return tuple(out)


def _is(value, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # YAML's true is not a number
        return bool in kinds
    if isinstance(value, (int, float)):
        return (float in kinds and math.isfinite(value)) or (int in kinds and isinstance(value, int))
    if isinstance(value, (list, ListConfig)):
        return list in kinds
    if isinstance(value, (dict, DictConfig)):
        return dict in kinds
    return isinstance(value, kinds)
