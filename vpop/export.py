r"""SBML and Antimony export of one patient of one arm, generated from the model's own code.

The right-hand side is not written twice: `system.vector_field` and `system.observe` are traced to
a jaxpr for one patient (every leaf a scalar), and each equation of it becomes one line of infix
maths. A state $y_i$ (named by its path, `host_cytokines_il6_pg_ml`) gets the rate rule

$$ \dot y_i = P_i(t, y) - L_i(t, y)\, y_i + u_i(t), $$

with the infusion input $u_i$ of its dosing channel; a parameter (named by its path,
`bispecific_pk_cl_l_per_day`) is a constant holding the patient's value. Dosing comes from the same
per-step inputs the solver uses (`solver.patient_inputs`: caps, bioavailability, weight- and
BSA-based amounts): a bolus is an event adding to its state, an infusion an event setting its rate.
Time is in days from cycle 1 day 1.

The in-simulation CRS rescue, when the patient's `crs.rescue` is on, becomes state-triggered events
with the solver's rules (`solver._decide_rescue`): once per dose period, when the vascular drive
crosses the patient's grade-2 threshold, $s\,(\mathrm{IL6}\theta + \phi_V O) \ge \theta_2$,
tocilizumab starts `rescue_delay_hours` later over its infusion time, and likewise dexamethasone at
grade 3. The solver locates the crossing linearly within its step, the SBML solver exactly.

Not exported: the per-period reductions, which are read from the exported observables
(`il6_signalling_pg_ml`, `malignant_total`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from vpop import endpoints
from vpop.model import system
from vpop.model.solver import _NEVER_DAY, INPUT_CHANNELS, Schedule, patient_inputs, rescue_doses_mg
from vpop.model.system import Params


@dataclass
class Event:
    """Assignments made when `trigger` (infix, boolean) turns true."""

    trigger: str
    assignments: list[tuple[str, str]]  # (variable, infix of its new value)


@dataclass
class Model:
    """One patient's equations and dosing, ready to write: every name is a valid SBML id."""

    states: dict[str, float]  # name -> initial value
    parameters: dict[str, float]  # name -> value
    assignments: list[tuple[str, str]]  # (name, infix) in evaluation order
    rates: dict[str, str]  # state name -> infix dy/dt (infusion included)
    observables: dict[str, str]  # name -> infix
    events: list[Event]  # dosing (time-triggered) and, with rescue, CRS-triggered
    t0: float
    notes: str


def leaf_names(tree, prefix: str = "") -> list[str]:
    """Path names of a pytree's leaves: `drugs.bispecific.central` -> `drugs_bispecific_central`."""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [prefix + "_".join(str(getattr(k, "name", getattr(k, "idx", k))) for k in path) for path, _ in paths]


# ---------------------------------------------------------------------------------------------
# jaxpr -> infix (the subset of primitives the model uses; anything else raises naming it)
# ---------------------------------------------------------------------------------------------

# Primitive -> infix (SBML Level 3 formula syntax, which Antimony shares), arguments in order.
_INFIX = {
    "add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})", "div": "({0} / {1})", "neg": "(-{0})",
    "gt": "({0} > {1})", "lt": "({0} < {1})", "ge": "({0} >= {1})", "le": "({0} <= {1})", "eq": "({0} == {1})",
    "ne": "({0} != {1})", "max": "piecewise({0}, {0} > {1}, {1})", "min": "piecewise({0}, {0} < {1}, {1})",
    "exp": "exp({0})", "sqrt": "sqrt({0})", "abs": "abs({0})", "log": "ln({0})", "log1p": "ln(1 + {0})",
    "logistic": "(1 / (1 + exp(-{0})))", "pow": "({0})^({1})",
    "select_n": "piecewise({2}, {0}, {1})",  # select_n(which, case0, case1): case1 where `which` holds
}


def _number(x) -> str:
    v = float(np.asarray(x))
    if math.isinf(v):
        return "INF" if v > 0 else "-INF"
    return repr(v)


class _Writer:
    """Turns jaxpr equations into infix expressions; values used more than once get a name of their own."""

    def __init__(self):
        self.assignments: list[tuple[str, str]] = []
        self.count = 0

    def expressions(self, jaxpr, inputs: list[str], consts=()) -> list[str]:
        """Infix of a jaxpr's outputs, given infix of its inputs (and the values of its constants)."""
        env: dict = {}

        def read(v):
            return _number(v.val) if isinstance(v, jcore.Literal) else env[v]

        for var, value in zip(jaxpr.constvars, consts):
            env[var] = _number(value)
        for var, expr in zip(jaxpr.invars, inputs, strict=True):
            env[var] = expr
        uses: dict = {}
        for eqn in jaxpr.eqns:
            for v in eqn.invars:
                if not isinstance(v, jcore.Literal):
                    uses[v] = uses.get(v, 0) + 1
        for v in jaxpr.outvars:
            if not isinstance(v, jcore.Literal):
                uses[v] = uses.get(v, 0) + 1
        for eqn in jaxpr.eqns:
            args = [read(v) for v in eqn.invars]
            outs = self._apply(eqn, args)
            for var, expr in zip(eqn.outvars, outs):
                boolean = var.aval.dtype == np.bool_
                if uses.get(var, 0) > 1 and not boolean and not _is_atom(expr):
                    self.count += 1
                    name = f"x{self.count}"
                    self.assignments.append((name, expr))
                    expr = name
                env[var] = expr
        return [read(v) for v in jaxpr.outvars]

    def _apply(self, eqn, a: list[str]) -> list[str]:
        name = eqn.primitive.name
        if name == "select_n" and len(a) != 3:
            raise NotImplementedError("select_n with more than two cases")
        if name in _INFIX:
            return [_INFIX[name].format(*a)]
        if name == "integer_pow":
            return [f"({a[0]})^{int(eqn.params['y'])}"]
        if name == "convert_element_type":
            if eqn.invars[0].aval.dtype == np.bool_:
                return [f"piecewise(1, {a[0]}, 0)"]
            return a
        if name in ("copy", "copy_p"):
            return a
        if name in ("jit", "pjit", "closed_call", "core_call"):
            inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
            if hasattr(inner, "consts"):  # a closed jaxpr
                return self.expressions(inner.jaxpr, a, inner.consts)
            return self.expressions(inner, a)
        raise NotImplementedError(f"primitive '{name}' has no SBML translation in vpop.export")


def _is_atom(expr: str) -> bool:
    return expr.replace("_", "").replace(".", "").replace("-", "").isalnum()


def _trace(fn, t, y, p):
    ys, p_leaves = jax.tree_util.tree_leaves(y), jax.tree_util.tree_leaves(p)
    y_def, p_def = jax.tree_util.tree_structure(y), jax.tree_util.tree_structure(p)

    def flat(t, ys, ps):
        return jax.tree_util.tree_leaves(fn(t, jax.tree_util.tree_unflatten(y_def, ys), jax.tree_util.tree_unflatten(p_def, ps)))

    return jax.make_jaxpr(flat)(t, ys, p_leaves)


# ---------------------------------------------------------------------------------------------
# One patient of one arm
# ---------------------------------------------------------------------------------------------


def patient_model(p: Params, schedule: Schedule, notes: str = "") -> Model:
    """The equations of patient `p` (one patient's parameters: scalar leaves, but the CRS
    susceptibility may be one per dose period) and the dosing of `schedule` as events."""
    # The CRS susceptibility of each dose period (`population.occasion_susceptibility`): the first
    # period's as the parameter, the others set by the rescue's events at each period's start.
    susceptibility = np.broadcast_to(np.asarray(p.crs.susceptibility), np.shape(schedule.period_start_day))
    p = p._replace(crs=p.crs._replace(susceptibility=jnp.asarray(susceptibility[0])))
    y0 = system.initial_state(p)
    state_names = leaf_names(y0)
    param_names = leaf_names(p)
    if len(set(state_names) | set(param_names)) != len(state_names) + len(param_names):
        raise ValueError("state and parameter names collide")
    writer = _Writer()
    inputs = ["time", *state_names, *param_names]

    field = _trace(lambda t, y, p: system.vector_field(t, y, p), 0.0, y0, p)
    derivatives = writer.expressions(field.jaxpr, inputs, field.consts)
    observed = _trace(lambda t, y, p: system.observe(y, p), 0.0, y0, p)
    obs_values = writer.expressions(observed.jaxpr, inputs, observed.consts)

    channels = {path: path.replace(".", "_") for path in INPUT_CHANNELS}
    events = _dosing_events(p, schedule, channels)
    # infusion_<state>: rates the regimen (and, with rescue, the CRS treatment) sets by events
    infused = {v for e in events for v, _ in e.assignments if v.startswith("infusion_")}
    parameters = {n: float(np.asarray(v)) for n, v in zip(param_names, jax.tree_util.tree_leaves(p))}
    if float(np.asarray(p.crs.rescue)) > 0:
        rescue_parameters, rescue_events = _rescue_events(p, schedule, channels, writer, param_names, susceptibility)
        parameters.update(rescue_parameters)
        events += rescue_events
        infused |= {v for e in rescue_events for v, _ in e.assignments if v.startswith("infusion_")}
    rates = {name: f"{expr} + infusion_{name}" if f"infusion_{name}" in infused else expr
             for name, expr in zip(state_names, derivatives)}
    parameters.update({n: 0.0 for n in sorted(infused)})
    t0 = float(np.asarray(schedule.steps.t_start)[0])
    return Model(states={n: float(np.asarray(v)) for n, v in zip(state_names, jax.tree_util.tree_leaves(y0))},
                 parameters=parameters, assignments=writer.assignments, rates=rates,
                 observables=dict(zip(system.Observables._fields, obs_values)), events=events, t0=t0, notes=notes)


def _dosing_events(p: Params, schedule: Schedule, channels: dict[str, str]) -> list[Event]:
    """Boluses (added to their state) and infusion rates (set on change) from the solver's own
    per-step inputs, at the steps' start days."""
    steps = jax.tree_util.tree_map(np.asarray, schedule.steps)
    events, current = [], {}
    for k in range(len(steps.dt)):
        if steps.dt[k] <= 0:
            continue
        step = jax.tree_util.tree_map(lambda x, k=k: x[k], steps)
        bolus, rate = (np.asarray(x) for x in patient_inputs(step, p))
        t = float(step.t_start)
        for i, path in enumerate(INPUT_CHANNELS):
            state = channels[path]
            if bolus[i] != 0.0:
                events.append(Event(f"time >= {_number(t)}", [(state, f"{state} + {_number(bolus[i])}")]))
            if path.startswith("drugs.") and rate[i] != current.get(state, 0.0):
                events.append(Event(f"time >= {_number(t)}", [(f"infusion_{state}", _number(rate[i]))]))
                current[state] = rate[i]
    return events


def _rescue_events(p: Params, schedule: Schedule, channels: dict[str, str], writer: _Writer,
                   param_names: list[str], susceptibility: np.ndarray) -> tuple[dict[str, float], list[Event]]:
    """Parameters and events of the CRS rescue (see the module docstring). Per drug: `<drug>_decided`
    (1 once decided in this dose period; reset at each period's start, 1 before the first, as the
    solver treats no rescue before treatment), `<drug>_start_day` and `<drug>_end_day` of its
    administration, given as the rate `infusion_<state>` or, over 0 hours, as a bolus. The doses and
    the grade margins are traced from the solver's and the endpoints' own functions. Where the
    susceptibility varies between dose periods ([P] `susceptibility`), each period's start sets
    `crs_susceptibility` to its own."""
    def traced(fn, observed: dict[str, float]) -> list[str]:  # infix of fn(observed values, p)
        jaxpr = _trace(lambda t, obs, q: fn(*obs, q), 0.0, tuple(observed.values()), p)
        return writer.expressions(jaxpr.jaxpr, ["time", *observed, *param_names], jaxpr.consts)

    def margin(il6, myeloid, q, grade):  # z_g + epsilon of endpoints.crs_index: >= 0 from grade g on
        return (jnp.log(endpoints.vascular_drive(il6, myeloid, q.crs)) + jnp.log(q.crs.susceptibility)
                - endpoints.log_threshold(q.crs, grade))

    toci_mg, dex_mg = traced(rescue_doses_mg, {})
    observed = {"il6_signalling_pg_ml": 1.0, "myeloid_output_pg_ml": 1.0}
    drugs = [("rescue_tocilizumab", "drugs.tocilizumab.central", toci_mg, 2, "crs_rescue_tocilizumab_infusion_hours"),
             ("rescue_dexamethasone", "drugs.dexamethasone.central", dex_mg, 3, "crs_rescue_dexamethasone_infusion_hours")]
    values = dict(zip(param_names, (float(np.asarray(v)) for v in jax.tree_util.tree_leaves(p))))
    parameters, events = {}, []
    for name, path, mg, grade, hours in drugs:
        state = channels[path]
        decided, start, end = f"{name}_decided", f"{name}_start_day", f"{name}_end_day"
        parameters.update({decided: 1.0, start: _NEVER_DAY})  # _NEVER_DAY: not under way
        (above,) = traced(lambda il6, myeloid, q, g=grade: margin(il6, myeloid, q, g), observed)
        events.append(Event(f"({above} >= 0) && ({decided} < 0.5)", [(decided, "1"), (start, "time + crs_rescue_delay_hours / 24")]))
        if values[hours] > 0:
            parameters[end] = _NEVER_DAY
            events.append(Event(f"time >= {start}", [(f"infusion_{state}", f"{mg} * 24 / {hours}"), (end, f"time + {hours} / 24")]))
            events.append(Event(f"time >= {end}", [(f"infusion_{state}", "0")]))
        else:
            events.append(Event(f"time >= {start}", [(state, f"{state} + {mg}")]))
    starts = {}  # period start day -> its susceptibility (the first period of a day: padded periods repeat days)
    for t, s in zip(np.asarray(schedule.period_start_day).tolist(), susceptibility.tolist()):
        starts.setdefault(float(t), s)
    varies = len(set(susceptibility.tolist())) > 1
    events += [Event(f"time >= {_number(t)}", [(f"{name}_decided", "0") for name, *_ in drugs]
                     + ([("crs_susceptibility", _number(s))] if varies else [])) for t, s in sorted(starts.items())]
    return parameters, events


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


def to_antimony(m: Model, name: str = "vpop_patient") -> str:
    """The model in Antimony (readable, and loadable by tellurium or the antimony package)."""
    lines = [f"model {name}()", "  // " + m.notes.replace("\n", "\n  // "), "  // states (t0 = day %g)" % m.t0]
    lines += [f"  {n} = {_number(v)}" for n, v in m.states.items()]
    lines += ["  // parameters"] + [f"  {n} = {_number(v)}" for n, v in m.parameters.items()]
    lines += ["  // intermediate values"] + [f"  {n} := {e}" for n, e in m.assignments]
    lines += ["  // observables"] + [f"  {n} := {e}" for n, e in m.observables.items()]
    lines += ["  // rate rules"] + [f"  {n}' = {e}" for n, e in m.rates.items()]
    lines += ["  // dosing and CRS rescue"] + [
        f"  E{k}: at ({e.trigger}), t0=false: " + ", ".join(f"{var} = {value}" for var, value in e.assignments)
        for k, e in enumerate(m.events)]
    lines.append("end")
    return "\n".join(lines) + "\n"


def require_libsbml():
    """python-libsbml, or an error saying how to install it."""
    try:
        import libsbml
    except ImportError:
        from vpop.catalogue import ConfigError

        raise ConfigError("SBML export needs python-libsbml: pip install 'vpop[export]'") from None
    return libsbml


def to_sbml(m: Model, name: str = "vpop_patient") -> str:
    """The model as SBML Level 3 Version 2 (written with libsbml): states and parameters as SBML
    parameters, rate rules, assignment rules and events (dosing, and the CRS rescue when on)."""
    libsbml = require_libsbml()

    doc = libsbml.SBMLDocument(3, 2)
    model = doc.createModel()
    model.setId(name)
    model.setTimeUnits("dimensionless")
    model.setNotes(f'<body xmlns="http://www.w3.org/1999/xhtml"><p>{_xml(m.notes)}</p></body>')

    def parameter(pid: str, value: float | None, constant: bool):
        prm = model.createParameter()
        _ok(prm.setId(pid), pid)
        if value is not None:
            prm.setValue(value)
        prm.setConstant(constant)

    def math(expr: str, where: str):
        ast = libsbml.parseL3Formula(expr)
        if ast is None:
            raise ValueError(f"{where}: libsbml could not parse {expr[:200]!r}: {libsbml.getLastParseL3Error()}")
        return ast

    for n, v in m.states.items():
        parameter(n, v, False)
    assigned = {var for e in m.events for var, _ in e.assignments}
    for n, v in m.parameters.items():
        parameter(n, v, n not in assigned)
    for n, e in [*m.assignments, *m.observables.items()]:
        parameter(n, None, False)
        rule = model.createAssignmentRule()
        rule.setVariable(n)
        rule.setMath(math(e, n))
    for n, e in m.rates.items():
        rule = model.createRateRule()
        rule.setVariable(n)
        rule.setMath(math(e, n))
    for k, e in enumerate(m.events):
        event = model.createEvent()
        event.setId(f"E{k}")
        event.setUseValuesFromTriggerTime(True)
        trigger = event.createTrigger()
        trigger.setInitialValue(False)  # a dose at the start day is given at the start
        trigger.setPersistent(True)
        trigger.setMath(math(e.trigger, f"E{k}"))
        for var, value in e.assignments:
            assign = event.createEventAssignment()
            assign.setVariable(var)
            assign.setMath(math(value, f"E{k}"))
    if doc.getNumErrors(libsbml.LIBSBML_SEV_ERROR):
        raise ValueError(doc.getErrorLog().toString())
    return libsbml.writeSBMLToString(doc)


def _ok(code: int, what: str) -> None:
    import libsbml

    if code != libsbml.LIBSBML_OPERATION_SUCCESS:
        raise ValueError(f"libsbml refused {what!r}: {libsbml.OperationReturnValue_toString(code)}")


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ---------------------------------------------------------------------------------------------
# An arm's patients, written to files (vpop-export)
# ---------------------------------------------------------------------------------------------


def patients(prepared, which, seed: int) -> list[tuple[str, Params]]:
    """(label, parameters) of an arm's patients: `typical` (the population's typical covariates, no
    random effects) or patient ids of a trial with this seed (the same patients as in the trial)."""
    import jax.numpy as jnp
    import pandas as pd

    from vpop import population
    from vpop.simulate import _patient_params, cohort_covariates, n_periods

    inputs = prepared.inputs
    if which == "typical":
        cov = population.twins_covariates(pd.DataFrame(index=[0]), prepared.population)
        cov0 = jax.tree_util.tree_map(lambda x: x[0], cov)
        crs = inputs.typical.crs
        no_effects = inputs.typical._replace(crs=crs._replace(susceptibility_sd=0.0 * crs.susceptibility_sd))
        p = population.individual_params(no_effects, cov0, inputs.physiology, inputs.pk_covariates,
                                         prepared.variability_paths, 0.0 * inputs.omegas, population.patient_key(jnp.asarray(seed), 0),
                                         n_periods(inputs.schedule))
        # The model's spread stays a parameter of the export (unused by its equations), as in a patient's.
        return [("typical", p._replace(crs=p.crs._replace(susceptibility_sd=crs.susceptibility_sd)))]
    ids = jnp.asarray([int(i) for i in which])
    cov = cohort_covariates(inputs.covariate_params, ids, jnp.asarray(seed), prepared.covariate_kinds)
    return [(f"patient{int(i)}", _patient_params(inputs, jax.tree_util.tree_map(lambda x, k=k: x[k], cov), i, jnp.asarray(seed),
                                                 prepared.variability_paths)) for k, i in enumerate(ids)]


def write_arm(prepared, which, seed: int, out_dir, draw: int = 0) -> list:
    """SBML (`<arm>_<patient>.xml`) and Antimony (`.ant`) of an arm's patients into out_dir."""
    from pathlib import Path

    from vpop.catalogue import ConfigError

    if float(np.asarray(prepared.inputs.typical.crs.hold_until_resolved)) > 0:
        raise ConfigError("model.crs.hold_until_resolved: dose holds for CRS are not exported (the regimen is written as "
                          "timed events); export with model.crs.hold_until_resolved=0")
    if float(np.asarray(prepared.inputs.typical.crs.rescue_grade1_hours)) > 0:
        raise ConfigError("model.crs.rescue_grade1_hours: tocilizumab for a lasting fever is not exported (the exported rescue "
                          "is triggered at grade 2 and 3); export with model.crs.rescue_grade1_hours=0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for label, p in patients(prepared, which, seed):
        arm = prepared.arm
        notes = (f"vpop {_version()} export: arm {arm.name} ({arm.drug} {arm.route} in {arm.population}), {label}, seed {seed}, "
                 f"posterior draw {draw}. Time in days from cycle 1 day 1; drug amounts in mg, cells in 1e9, cytokines in "
                 "pg/mL; names are parameter and state paths of vpop (units as in vpop/model). CRS rescue "
                 + ("exported as events (rescue_* parameters)." if float(np.asarray(p.crs.rescue)) > 0 else "off."))
        model = patient_model(p, prepared.inputs.schedule, notes)
        name = f"{arm.name}_{label}"
        for suffix, text in (("xml", to_sbml(model, _sbml_id(name))), ("ant", to_antimony(model, _sbml_id(name)))):
            path = out / f"{name}.{suffix}"
            path.write_text(text)
            written.append(path)
    return written


def _sbml_id(name: str) -> str:
    ident = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return ident if ident[0].isalpha() else "m_" + ident


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vpop")
    except PackageNotFoundError:
        return "unversioned"
