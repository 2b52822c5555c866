"""Regimens: dose lists in cycles -> concrete administrations -> the dense `Schedule` the solver scans.

A regimen (named in `configs/regimen/` or written inline in an experiment) is

    cycle_days: 21
    cycles: 8
    doses:                                  # day is 1-based within the cycle
      - {cycle: 1, day: 1, amount: 1, unit: mg}
      - {cycles: "3-8", day: 1, amount: 30, unit: mg}
      - {cycle: 1, day: 1, duration_days: 7, amount: 9, unit: ug/day}       # continuous infusion
      - {cycle: 1, day: 1, drug: obinutuzumab, amount: 1000, unit: mg}      # pretreatment
    then:                                   # optional further block, e.g. a maintenance phase with
      cycle_days: 14                        # its own cycle length; cycle numbers continue (9, 10, ...)
      cycles: 4
      doses: [{cycles: "9-12", day: 1, amount: 30, unit: mg}]

Time zero is cycle 1 day 1. Each administration of the bispecific starts a dose period (split step-up
doses and infusion-rate steps included). Premedication and prophylaxis are placed relative to those
administrations. The time grid is fine after every administration and coarse in between (see
`vpop.model.solver` for why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from vpop import catalogue, parameters, schema
from vpop.catalogue import ConfigError
from vpop.model.solver import INPUT_CHANNELS, Schedule, Steps

BOLUS_UNITS = {  # unit -> (mg, mg per kg, mg per m2) per unit amount
    "mg": (1.0, 0.0, 0.0),
    "ug": (1e-3, 0.0, 0.0),
    "mg/kg": (0.0, 1.0, 0.0),
    "ug/kg": (0.0, 1e-3, 0.0),
    "mg/m2": (0.0, 0.0, 1.0),
    "ug/m2": (0.0, 0.0, 1e-3),
}
RATE_UNITS = {  # continuous-infusion unit -> (mg/day, mg/day per kg, mg/day per m2) per unit amount
    "mg/day": (1.0, 0.0, 0.0),
    "ug/day": (1e-3, 0.0, 0.0),
    "mg/kg/day": (0.0, 1.0, 0.0),
    "ug/kg/day": (0.0, 1e-3, 0.0),
    "mg/m2/day": (0.0, 0.0, 1.0),
    "ug/m2/day": (0.0, 0.0, 1e-3),
}
# (drug kind, route) -> input channel
_CHANNEL = {
    ("bispecific", "iv"): "drugs.bispecific.central",
    ("bispecific", "civ"): "drugs.bispecific.central",
    ("bispecific", "sc"): "drugs.bispecific.depot",
    ("tocilizumab", "iv"): "drugs.tocilizumab.central",
    ("dexamethasone", "iv"): "drugs.dexamethasone.central",
    ("dexamethasone", "oral"): "drugs.dexamethasone.depot",
    ("anti_cd20", "iv"): "drugs.anti_cd20.central",
}


ROLES = ("bispecific", "pretreatment", "premedication", "prophylaxis")


@dataclass(frozen=True)
class Administration:
    """One concrete dose of one drug."""

    day: float  # days from cycle 1 day 1 (hour included)
    drug_kind: str  # bispecific | tocilizumab | dexamethasone | anti_cd20
    route: str
    amount: float
    unit: str
    cycle: int = 0
    duration_days: float = 0.0  # 0: bolus; > 0: infusion over this time
    max_mg: float = math.inf
    label: str = ""
    drug: str = ""  # the drug's config name
    cycle_day: float = 1.0  # 1-based day within the cycle, as written in the regimen
    hour: float = 0.0  # hour of that day
    role: str = "bispecific"  # one of ROLES
    dose_number: int = 0  # the bispecific: its 1-based place in the regimen as written (a dose repeated after a delay keeps it)

    @property
    def continuous(self) -> bool:
        return self.unit in RATE_UNITS

    def mg_for(self, weight_kg: float, bsa_m2: float) -> float:
        """The amount in mg (mg/day for infusions) for a patient of this weight and BSA, capped at max_mg."""
        flat, per_kg, per_m2 = (RATE_UNITS if self.continuous else BOLUS_UNITS)[self.unit]
        return min(self.amount * (flat + per_kg * weight_kg + per_m2 * bsa_m2), self.max_mg)


@dataclass
class CompiledRegimen:
    """Administrations of an arm, sorted, with the bispecific's ones marking dose periods."""

    administrations: list[Administration]
    horizon_day: float
    assessment_days: list[float]
    restart_period: int | None = None  # 0-based dose period in which treatment resumes after a delay
    periods: list[Administration] = field(init=False)

    def __post_init__(self):
        self.administrations.sort(key=lambda a: a.day)
        self.periods = [a for a in self.administrations if a.drug_kind == "bispecific"]


def _parse_cycles(spec, where: str, first: int, last: int) -> list[int]:
    """Cycle numbers from 3, "3-8" or "1,3-5", checked to lie in first..last."""
    if isinstance(spec, int):
        cycles = [spec]
    else:
        text = str(spec).replace(" ", "")
        cycles = []
        try:
            for part in text.split(","):
                lo, _, hi = part.partition("-")
                cycles.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ConfigError(f"{where}: expected a number, \"3-8\" or \"1,3-5\", got {spec!r}") from None
    bad = [c for c in cycles if not first <= c <= last]
    if bad:
        raise ConfigError(f"{where}: {bad[0]} is outside the allowed {first}-{last}")
    return cycles


def load_regimen(spec: str | DictConfig | dict, field_name: str = "regimen") -> DictConfig:
    cfg = catalogue.load("regimen", spec, field_name) if isinstance(spec, str) else OmegaConf.create(spec)
    _check_block(cfg, field_name)
    return cfg


def _check_block(cfg: DictConfig, field_name: str) -> None:
    schema.check(cfg, schema.Regimen, field_name)
    if not (isinstance(cfg.cycle_days, (int, float)) and cfg.cycle_days > 0):
        raise ConfigError(f"{field_name}.cycle_days must be a positive number of days, got {cfg.cycle_days!r}")
    if not (isinstance(cfg.cycles, int) and cfg.cycles > 0):
        raise ConfigError(f"{field_name}.cycles must be a positive whole number, got {cfg.cycles!r}")
    if not isinstance(cfg.doses, (list, ListConfig)) or len(cfg.doses) == 0:
        raise ConfigError(f"{field_name}.doses must be a non-empty list of doses")
    if cfg.get("then") is not None:
        _check_block(cfg.then, f"{field_name}.then")


def blocks(regimen: DictConfig) -> list[tuple[DictConfig, int, float]]:
    """The regimen's blocks with the number of cycles and days that come before each."""
    out, cycles_before, days_before, block = [], 0, 0.0, regimen
    while block is not None:
        out.append((block, cycles_before, days_before))
        cycles_before += block.cycles
        days_before += block.cycles * block.cycle_days
        block = block.get("then")
    return out


def regimen_days(regimen: DictConfig) -> float:
    block, _, before = blocks(regimen)[-1]
    return before + block.cycles * block.cycle_days


def _drug_kind(name: str | None, bispecific: DictConfig, where: str) -> tuple[str, DictConfig]:
    if name is None or name == bispecific.name:
        return "bispecific", bispecific
    drug = parameters.load_drug(name, where)
    if drug.kind == "bispecific":
        raise ConfigError(f"{where}: an arm has one bispecific ({bispecific.name}); {name} is another bispecific")
    return drug.kind, drug


def expand_doses(regimen: DictConfig, bispecific: DictConfig, route: str, where: str = "regimen") -> list[Administration]:
    """The regimen's dose lists (all blocks) as concrete administrations, validated."""
    out = []
    path = where
    for block, cycles_before, days_before in blocks(regimen):
        out += _expand_block(block, cycles_before, days_before, bispecific, route, path)
        path += ".then"
    return out


def _expand_block(regimen: DictConfig, cycles_before: int, days_before: float, bispecific: DictConfig, route: str,
                  where: str) -> list[Administration]:
    out = []
    first, last = cycles_before + 1, cycles_before + regimen.cycles
    for i, dose in enumerate(regimen.doses):
        w = f"{where}.doses[{i}]"
        schema.check(dose, schema.Dose, w)
        if ("cycle" in dose) == ("cycles" in dose):
            raise ConfigError(f"{w}: give exactly one of 'cycle' (a number) or 'cycles' (a range like \"3-8\")")
        key = "cycle" if "cycle" in dose else "cycles"
        cycles = _parse_cycles(dose[key], f"{w}.{key}", first, last)
        day = dose.get("day")
        if not isinstance(day, (int, float)) or not 1 <= day <= regimen.cycle_days:
            raise ConfigError(f"{w}.day must be a day within the cycle, 1-{regimen.cycle_days}, got {day!r}")
        amount = dose.get("amount")
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not amount > 0:
            raise ConfigError(f"{w}.amount must be a positive number, got {amount!r}")
        kind, drug = _drug_kind(dose.get("drug"), bispecific, f"{w}.drug")
        unit = dose.get("unit")
        dose_route = dose.get("route", route if kind == "bispecific" else next(iter(drug.routes.keys())))
        if unit in RATE_UNITS:
            if dose_route != "civ" and kind == "bispecific":
                dose_route = "civ"
            if "duration_days" not in dose or not dose.duration_days > 0:
                raise ConfigError(f"{w}: a continuous infusion ({unit}) needs duration_days > 0")
            duration = float(dose.duration_days)
        elif unit in BOLUS_UNITS:
            if dose_route == "civ":
                raise ConfigError(f"{w}.unit: route civ takes a rate unit ({', '.join(RATE_UNITS)}), got '{unit}'")
            hours = dose.get("infusion_hours", (drug.routes.get(dose_route) or {}).get("infusion_hours", 0.0))
            duration = float(hours) / 24.0 if dose_route == "iv" else 0.0
        else:
            raise ConfigError(f"{w}.unit: unknown unit {unit!r}; allowed: {', '.join([*BOLUS_UNITS, *RATE_UNITS])}")
        parameters.check_route(drug, dose_route, f"{w}.route")
        if (kind, dose_route) not in _CHANNEL:
            raise ConfigError(f"{w}.route: {drug.name} cannot be given by '{dose_route}'")
        if duration and "max_mg" in dose:  # the solver caps boluses only (Steps.bolus_cap_mg)
            raise ConfigError(f"{w}.max_mg: a cap applies to a bolus only; this dose is infused over {duration * 24:g} h "
                              "(give infusion_hours: 0 to model it as a bolus, or leave the cap out)")
        hour = float(dose.get("hour", 0.0))
        for c in cycles:
            t = days_before + (c - first) * regimen.cycle_days + (day - 1) + hour / 24.0
            end = days_before + (c - first + 1) * regimen.cycle_days
            if duration and t + duration > end + 1e-9 and kind == "bispecific" and unit in RATE_UNITS:
                raise ConfigError(f"{w}: the infusion of {duration} days from day {day} runs past the end of cycle {c}")
            out.append(
                Administration(
                    day=t,
                    drug_kind=kind,
                    route=dose_route,
                    amount=float(amount),
                    unit=str(unit),
                    cycle=c,
                    duration_days=duration,
                    max_mg=float(dose.get("max_mg", math.inf)),
                    label=f"C{c}D{day:g} {amount:g} {unit}" + ("" if kind == "bispecific" else f" {drug.name}"),
                    drug=str(drug.name),
                    cycle_day=float(day),
                    hour=hour,
                    role="bispecific" if kind == "bispecific" else "pretreatment",
                )
            )
    return out


def _co_medication(spec, group: str, block, where: str) -> tuple[DictConfig, DictConfig] | None:
    """A premedication or prophylaxis block (named in `group`, or inline) checked against its schema,
    and its drug; None for none."""
    if spec in (None, "none"):
        return None
    cfg = catalogue.load(group, spec, where) if isinstance(spec, str) else OmegaConf.create(spec)
    schema.check(cfg, block, where)
    drug = parameters.load_drug(cfg.drug, f"{where}.drug")
    if cfg.unit not in BOLUS_UNITS:
        raise ConfigError(f"{where}.unit: unknown unit {cfg.unit!r}; allowed: {', '.join(BOLUS_UNITS)}")
    return cfg, drug


def _premedication(spec, periods: list[Administration], where: str) -> list[Administration]:
    given = _co_medication(spec, "premedication", schema.Premedication, where)
    if given is None:
        return []
    cfg, drug = given
    route = cfg.get("route", "iv")
    if (drug.kind, route) not in _CHANNEL:
        raise ConfigError(f"{where}.route: {cfg.drug} cannot be given by '{route}'")
    # Administrations are selected by their place in the regimen as written (`dose_number`), so a
    # step-up dose repeated after a delay is premedicated as the first one was. A selection may name
    # more administrations or cycles than a (short) regimen has.
    chosen = periods
    if "administrations" in cfg:
        numbers = set(_parse_cycles(cfg.administrations, f"{where}.administrations", 1, 10**6))
        chosen = [a for a in chosen if a.dose_number in numbers]
    if "cycles" in cfg:
        cyc = set(_parse_cycles(cfg.cycles, f"{where}.cycles", 1, 10**6))
        chosen = [a for a in chosen if a.cycle in cyc]
    out = []
    for a in chosen:
        for offset in [-_hours_before(cfg, where) / 24.0, *[float(d) for d in cfg.get("days_after", [])]]:
            out.append(Administration(a.day + offset, drug.kind, route, float(cfg.amount), cfg.unit, a.cycle,
                                      label=f"{cfg.drug} {cfg.amount:g} {cfg.unit}", drug=str(cfg.drug), role="premedication",
                                      **_calendar(a, offset)))
    return out


def _prophylaxis(spec, periods: list[Administration], where: str) -> list[Administration]:
    given = _co_medication(spec, "prophylaxis", schema.Prophylaxis, where)
    if given is None:
        return []
    cfg, drug = given
    k = cfg.get("before_dose", 1)
    planned = max(a.dose_number for a in periods)
    if not isinstance(k, int) or not 1 <= k <= planned:
        raise ConfigError(f"{where}.before_dose must be an administration number 1-{planned}, got {k!r}")
    a = next(a for a in periods if a.dose_number == k)  # before its first administration
    t = a.day - _hours_before(cfg, where) / 24.0
    return [Administration(t, drug.kind, "iv", float(cfg.amount), cfg.unit, a.cycle, max_mg=float(cfg.get("max_mg", math.inf)),
                           label=f"{cfg.drug} prophylaxis {cfg.amount:g} {cfg.unit}", drug=str(cfg.drug), role="prophylaxis",
                           **_calendar(a, t - a.day))]


def _hours_before(cfg: DictConfig, where: str) -> float:
    """How many hours before its administration a co-medication is given: the labels differ (e.g.
    dexamethasone 1 h before mosunetuzumab, tocilizumab 4 h before teclistamab in its prophylaxis
    cohort), so every premedication and prophylaxis says so."""
    h = float(cfg.hours_before)  # required by the schema
    if h < 0:
        raise ConfigError(f"{where}.hours_before must be hours (>= 0) before the administration, got {h:g}")
    return h


def _calendar(anchor: Administration, offset_days: float) -> dict:
    """Day within the cycle and hour of a dose `offset_days` from the anchor administration: whole
    days move the day, the rest the hour (1 h before a C1D1 dose is C1D1 at hour -1)."""
    days = math.trunc(offset_days + math.copysign(1e-9, offset_days))
    return dict(cycle_day=anchor.cycle_day + days, hour=round(anchor.hour + (offset_days - days) * 24.0, 6))


def compile_arm(regimen, drug_name: str, route: str, premedication=None, prophylaxis=None,
                horizon_days: float | None = None, assessment_every_days: float | None = None,
                where: str = "arm", population_assessment_every_days: float | None = None,
                delay=None) -> CompiledRegimen:
    """All administrations of an arm (bispecific, pretreatment, premedication, prophylaxis), and its
    response assessment days: every `assessment_every_days` (a run's override), else the regimen's
    own `assessment_every_days`, else the population's (`response.assessment_every_days`). A `delay`
    (`schema.Delay`) holds treatment and restarts it (`apply_delay`); the default horizon then
    extends by as much as the last dose moved."""
    drug = parameters.load_drug(drug_name, f"{where}.drug")
    parameters.check_route(drug, route, f"{where}.route")
    reg = load_regimen(regimen, f"{where}.regimen")
    admins = expand_doses(reg, drug, route, f"{where}.regimen")
    planned = sorted((a for a in admins if a.drug_kind == "bispecific"), key=lambda a: a.day)
    if not planned:
        raise ConfigError(f"{where}.regimen: no dose of {drug_name}")
    admins = [a for a in admins if a.drug_kind != "bispecific"] + [replace(a, dose_number=k) for k, a in enumerate(planned, 1)]
    admins, restart = apply_delay(delay, admins, f"{where}.delay")
    periods = sorted((a for a in admins if a.drug_kind == "bispecific"), key=lambda a: a.day)
    admins += _premedication(premedication, periods, f"{where}.premedication")
    admins += _prophylaxis(prophylaxis, periods, f"{where}.prophylaxis")
    moved = periods[-1].day - planned[-1].day  # how far a delay pushed the last dose
    horizon = float(horizon_days if horizon_days is not None else regimen_days(reg) + moved)
    if not horizon > 0:
        raise ConfigError(f"{where}: horizon_days must be positive, got {horizon}")
    every = assessment_every_days or reg.get("assessment_every_days") or population_assessment_every_days
    if not every:
        raise ConfigError(f"{where}: no response assessment interval: give assessment_every_days (the run's, the "
                          "regimen's or the population's response.assessment_every_days)")
    every = float(every)
    assessments = [float(d) for d in np.arange(every, horizon + 1e-9, every)]
    if not assessments or assessments[-1] < horizon - 1e-9:
        assessments.append(horizon)
    if periods[0].day >= horizon:
        raise ConfigError(f"{where}: horizon_days={horizon:g} ends before the first dose of {drug_name} (day {periods[0].day + 1:g})")
    admins = [a for a in admins if a.day < horizon]
    if restart is not None and periods[restart].day >= horizon:
        raise ConfigError(f"{where}: horizon_days={horizon:g} ends before the restart on day {periods[restart].day + 1:g}")
    return CompiledRegimen(admins, horizon, assessments, restart)


def apply_delay(spec, admins: list[Administration], where: str = "delay") -> tuple[list[Administration], int | None]:
    r"""Hold treatment after the `after_dose`-th administration of the bispecific and restart it
    `days` later (from that dose's start, or an infusion's end) with the regimen's administration
    `restart_from` (default: the next one; a smaller number repeats the step-up from there). The
    administrations from `restart_from` on keep their planned spacing: with $t_j$ the planned days,
    $t_r$ the held dose and $j_0$ = `restart_from`, dose $j \ge j_0$ is given on
    $t_r + \mathrm{days} + (t_j - t_{j_0})$. Returns the administrations and the 0-based dose period of
    the restart (None without a delay). Co-medications are placed afterwards, by dose number."""
    if spec in (None, "none"):
        return admins, None
    cfg = OmegaConf.create(spec) if not isinstance(spec, DictConfig) else spec
    schema.check(cfg, schema.Delay, where)
    planned = sorted((a for a in admins if a.drug_kind == "bispecific"), key=lambda a: a.day)
    n, k = len(planned), cfg.after_dose
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(f"{where}.after_dose must be an administration number 1-{n}, got {k!r}")
    j0 = cfg.get("restart_from") or k + 1
    if not isinstance(j0, int) or not 1 <= j0 <= min(k + 1, n):
        raise ConfigError(f"{where}.restart_from must be an administration number 1-{min(k + 1, n)} (<= after_dose + 1: "
                          f"a restart repeats doses or resumes with the next one), got {j0!r}")
    held = planned[k - 1]
    if not (isinstance(cfg.days, (int, float)) and cfg.days > 0):
        raise ConfigError(f"{where}.days must be a positive number of days from dose {k} to the restart, got {cfg.days!r}")
    restart_day = held.day + held.duration_days + float(cfg.days)
    later = [a for a in admins if a.drug_kind != "bispecific" and a.day > held.day]
    if later:
        raise ConfigError(f"{where}: {later[0].label} comes after the hold; a delay moves doses of the bispecific only")
    kept = [a for a in admins if a.drug_kind != "bispecific" or a.dose_number <= k]
    resumed = []
    for a in planned[j0 - 1:]:
        day = restart_day + a.day - planned[j0 - 1].day
        calendar = f"day {math.floor(day) + 1:g}" + (f" {a.hour:g}h" if a.hour else "")
        label = f"{'restart ' if not resumed else ''}{calendar} {a.amount:g} {a.unit} (dose {a.dose_number})"
        resumed.append(replace(a, day=day, label=label))
    return kept + resumed, k


# Shortest grid step (one minute). A point the step growth would place closer than this to the next
# dose, infusion end or assessment is left out rather than the dose's own point: dropping the dose's
# point put teclistamab's step-up doses (after premedication 2 h before) inside a step of the previous
# dose period, so no CRS index was recorded at those doses and a running episode counted as new CRS.
MIN_STEP_DAYS = 1.0 / 1440.0


def time_grid(events: list[float], anchors: list[float], t0: float, horizon: float, solver: DictConfig) -> np.ndarray:
    """Grid points from t0 to the horizon. After each event the step starts at `first_step_hours`
    and grows geometrically (`step_growth`) up to `fine_max_step_days`, which it keeps until
    `fine_window_days` after the event (cytokines and T cells move in hours after a dose), then
    grows on to `max_step_days` (tumour and B cells move over weeks). Anchors (infusion ends,
    assessment days) are grid points too."""
    first = float(solver.first_step_hours) / 24.0
    growth, fine_max = float(solver.step_growth), float(solver.fine_max_step_days)
    window, coarse_max = float(solver.fine_window_days), float(solver.max_step_days)
    stops = np.unique(np.asarray([t0, horizon, *events, *anchors]))
    stops = stops[(stops >= t0) & (stops <= horizon)]
    events = np.asarray(sorted(events))
    points = [stops]
    for a, b in zip(stops[:-1], stops[1:]):
        before = events[events <= a + 1e-12]
        since = a - before[-1] if len(before) else np.inf  # days since the last event at a
        t, h = a, first if since < 1e-12 else None
        while True:
            if h is None:  # continuing: the step the grid would have reached by now
                h = min(first * growth ** max(math.log(max(since, first) / first, growth), 0), fine_max) if since < window else coarse_max
            t += h
            if t >= b - MIN_STEP_DAYS:  # a remainder under a minute joins this step: the stop b stays a grid point
                break
            points.append(np.asarray([t]))
            since_now = since + (t - a)
            h = min(h * growth, fine_max if since_now < window else coarse_max)
    grid = np.unique(np.concatenate(points))
    keep = np.concatenate([[True], np.diff(grid) > MIN_STEP_DAYS])  # stops within a minute of each other
    return grid[keep]


def build_schedule(compiled: CompiledRegimen, solver: DictConfig) -> Schedule:
    """Dense per-step arrays for the solver, padded to a multiple of solver.grid_bucket steps."""
    admins = compiled.administrations
    t0 = min(0.0, min(a.day for a in admins))
    events = sorted({a.day for a in admins})
    horizon = compiled.horizon_day
    ends = sorted({min(a.day + a.duration_days, horizon) for a in admins if a.duration_days > 0})
    grid = time_grid(events, [*ends, *compiled.assessment_days], t0, horizon, solver)
    k = len(grid) - 1
    bucket = int(solver.grid_bucket)
    k_pad = int(math.ceil(k / bucket) * bucket)
    c = len(INPUT_CHANNELS)
    bolus = np.zeros((3, k_pad, c))
    rate = np.zeros((3, k_pad, c))
    cap = np.full((k_pad, c), np.inf)

    def at(t):  # grid index of an event time: every event time must be a grid point
        i = int(np.argmin(np.abs(grid - t)))
        if abs(grid[i] - t) > 1e-9:  # snapping would move the dose into another step (and dose period)
            raise AssertionError(f"administration at day {t:g} is not a grid point (nearest {grid[i]:g})")
        return i

    for a in admins:
        ch = INPUT_CHANNELS.index(_CHANNEL[(a.drug_kind, a.route)])
        i = at(a.day)
        if a.continuous or a.duration_days > 0:
            per = RATE_UNITS[a.unit] if a.continuous else BOLUS_UNITS[a.unit]
            scale = a.amount if a.continuous else a.amount / a.duration_days
            j = at(min(a.day + a.duration_days, horizon))  # an infusion may outlast the horizon
            for u in range(3):
                rate[u, i:j, ch] += per[u] * scale
        else:
            per = BOLUS_UNITS[a.unit]
            for u in range(3):
                bolus[u, i, ch] += per[u] * a.amount
            cap[i, ch] = min(cap[i, ch], a.max_mg)
        if a.drug_kind == "bispecific":
            bolus[0, i, INPUT_CHANNELS.index("host.cytokines.margination")] += 1.0

    period_start = np.asarray([a.day for a in compiled.periods])
    t_start = np.concatenate([grid[:-1], np.full(k_pad - k, grid[-1])])
    dt = np.concatenate([np.diff(grid), np.zeros(k_pad - k)])
    period = np.searchsorted(period_start, t_start + 1e-9, side="right") - 1
    assess = np.full(k_pad, -1)
    for j, d in enumerate(compiled.assessment_days):
        assess[at(d) - 1] = j
    f = parameters._float()
    steps = Steps(
        t_start=jnp.asarray(t_start, f),
        dt=jnp.asarray(dt, f),
        bolus_mg=jnp.asarray(bolus[0], f),
        bolus_mg_per_kg=jnp.asarray(bolus[1], f),
        bolus_mg_per_m2=jnp.asarray(bolus[2], f),
        bolus_cap_mg=jnp.asarray(cap, f),
        rate_mg_per_day=jnp.asarray(rate[0], f),
        rate_mg_per_day_per_kg=jnp.asarray(rate[1], f),
        rate_mg_per_day_per_m2=jnp.asarray(rate[2], f),
        period=jnp.asarray(period, jnp.int32),
        assessment=jnp.asarray(assess, jnp.int32),
    )
    holdable = jnp.asarray([not a.continuous for a in compiled.periods], bool)
    return Schedule(steps, jnp.asarray(period_start, f), jnp.asarray(compiled.assessment_days, f), holdable)
