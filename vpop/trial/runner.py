"""The trial runner: every arm for every posterior draw on the same virtual patients, chunk by
chunk, streamed to a parquet dataset or kept in memory, counted into the summary and comparisons."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from vpop import catalogue, population
from vpop import targets as published
from vpop.simulate import Arm, PreparedArm, check_sizes, dispatch_draws, simulate_trajectories
from vpop.store import PatientStore, run_key
from vpop.trial.arms import TrialSettings, prepare_draws, response_kind
from vpop.trial.monitoring import OnsetCounts
from vpop.trial.statistics import EndpointCounts, annotate_summary
from vpop.trial.table import patient_table

log = logging.getLogger("vpop")

SAMPLE_PATIENTS = 2000  # first patients of draw 0 kept in memory per arm, for per-patient figures


@dataclass
class TrialResult:
    """A finished trial. `patients` holds every row when run in memory; a streamed run leaves them in
    the parquet dataset at `dataset` and keeps only `sample` (draw 0, first SAMPLE_PATIENTS per arm)."""

    arms: dict[str, Arm]
    reference_arm: str
    summary: pd.DataFrame
    comparisons: pd.DataFrame
    periods: dict[str, list]  # per arm, its administrations of the bispecific (regimen.Administration), in order
    administrations: dict[str, list]  # per arm, every administration (co-medications too)
    response_kinds: dict[str, str]  # per arm: lymphoma | leukaemia | myeloma | solid
    sample: pd.DataFrame
    onsets: pd.DataFrame  # onsets.csv: when CRS starts after each dose (`vpop.trial.monitoring`)
    monitoring: pd.DataFrame  # monitoring.csv: CRS onsets outside a monitoring policy
    patients: pd.DataFrame | None = None
    dataset: Path | None = None
    time_courses: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def patient_rows(self, columns: list[str] | None = None) -> pd.DataFrame:
        """Every patient row (all arms and draws), from memory or read from the streamed parquet
        dataset; `columns` reads only those."""
        if self.patients is not None:
            return self.patients if columns is None else self.patients[columns]
        return pd.read_parquet(self.dataset, columns=columns)


def _time_course_bands(prepared: PreparedArm, ids, seed: int, twins=None) -> dict[str, np.ndarray]:
    """Median and 5-95% band of the figure time courses over the given patients."""
    from vpop.model import system

    times, states, params = simulate_trajectories(prepared, ids, seed, twins)
    expand = jax.tree_util.tree_map(lambda x: np.asarray(x)[:, None], params)
    obs = system.observe(states, expand)
    cells = states.host.cells
    series = {
        "drug_ng_ml": np.asarray(obs.bispecific_ng_ml),
        "il6_signalling_pg_ml": np.asarray(obs.il6_signalling_pg_ml),
        "activated_t_cells_1e9": np.asarray(cells.t_active.total()),
        "malignant_percent_of_baseline": 100 * np.asarray(obs.malignant_total) / np.maximum(np.asarray(obs.malignant_total)[:, :1], 1e-12),
    }
    keep = np.concatenate([[True], np.diff(times) > 0])
    out = {"day": times[keep]}
    for k, v in series.items():
        q = np.percentile(v[:, keep], [5, 50, 95], axis=0)
        out[k] = q
    return out


def trial_key(prepared: list[dict[str, PreparedArm]], settings: TrialSettings, n: int, twins: pd.DataFrame | None) -> str:
    """Digest of everything the patient rows depend on: the kernels' inputs of every arm and draw,
    the population's response rules, n, seed, chunk size, digital twins and the vpop version. A run
    resumes only into chunks written under the same key."""
    try:
        code = version("vpop")
    except PackageNotFoundError:  # a source tree that was never installed
        code = "unversioned"
    parts: list[Any] = [code, n, settings.seed, settings.chunk_size]
    for by_arm in prepared:
        for name, p in by_arm.items():
            parts += [name, p.variability_paths, p.covariate_kinds, OmegaConf.to_yaml(p.population),
                      [a.label for a in p.compiled.periods], *jax.tree_util.tree_leaves(p.inputs)]
    if twins is not None:
        parts += [twins.to_csv(index=False)]
    return run_key(parts)


def _draw_tables(by_arm: dict[str, PreparedArm], pending: dict, d: int, c: int, store: PatientStore | None,
                 n_doses: int, labels, restarts: bool) -> tuple[dict[str, pd.DataFrame], list[bool]]:
    """Every arm's patient rows of draw d, chunk c: tabulated from the device's result (`pending`, by
    arm) and written to the store, or read back from it where the chunk was resumed (pending None);
    and, per arm, whether it was resumed."""
    tables, from_disk = {}, []
    for name, p in by_arm.items():
        from_disk.append(pending[name] is None)
        if from_disk[-1]:
            tables[name] = store.read(name, d, c)
        else:
            tables[name] = patient_table(p, pending[name].result(), d, n_doses, labels, restarts)
            if store is not None:
                store.write(name, d, c, tables[name])
    return tables, from_disk


def _open_store(checkpoint_dir, arms, prepared, settings: TrialSettings, n: int, twins, resume: bool) -> PatientStore:
    """The run's chunk store under checkpoint_dir/<trial key>/ (emptied unless resuming)."""
    store = PatientStore(Path(checkpoint_dir) / trial_key(prepared, settings, n, twins))
    if not resume:
        store.clear()
    store.open({"arms": {k: vars(a) for k, a in arms.items()}, "n": n, "seed": settings.seed,
                "chunk_size": settings.chunk_size, "draws": len(prepared)})
    return store


def run_trial(arms: dict[str, Arm], reference_arm: str, settings: TrialSettings, model: DictConfig | None = None,
              draws: list[dict[str, float]] | None = None, twins: pd.DataFrame | None = None,
              progress: Callable[..., None] | None = None, checkpoint_dir: str | Path | None = None,
              resume: bool = True, prepared: list[dict[str, PreparedArm]] | None = None) -> TrialResult:
    """Simulate every arm for every posterior draw on the same virtual patients, chunk by chunk.

    draws: parameter values by config path per posterior draw (see `vpop.posterior`); None is one draw of the
    nominal parameters. twins: a digital-twin table (one patient per row, covariate columns complete
    or filled, see `population.read_twins`; a `patient_id` column labels the output rows) instead of
    sampling. checkpoint_dir: None keeps every patient row in memory (`result.patients`); a folder
    streams them chunk by chunk to a parquet dataset under checkpoint_dir/<trial key>/ so host memory
    stays bounded whatever n is, and a rerun of a killed run (same key) skips the chunks already written
    (`resume=False` starts afresh). progress(k, resumed=False) is called per chunk with its patients.
    prepared: the arms already prepared for every draw (`prepare_draws`), e.g. by a validation pass.
    """
    model = model if model is not None else catalogue.load("model", "default")
    draws = draws or [{}]
    prepared = prepared if prepared is not None else prepare_draws(arms, settings, model, draws)
    n = len(twins) if twins is not None else settings.n
    labels = population.twin_ids(twins) if twins is not None else None
    check_sizes(n, settings.chunk_size)
    chunk = min(settings.chunk_size, n)
    n_doses = max(len(p.compiled.periods) for p in prepared[0].values())
    restarts = any(p.compiled.restart_period is not None for p in prepared[0].values())
    store = None if checkpoint_dir is None else _open_store(checkpoint_dir, arms, prepared, settings, n, twins, resume)
    periods = {name: p.compiled.periods for name, p in prepared[0].items()}
    counts = EndpointCounts(list(arms), reference_arm, periods)
    onsets = OnsetCounts(periods)
    kept, sample, resumed = [], [], 0  # kept: ((draw, chunk), rows) in memory; sample: draw 0's first SAMPLE_PATIENTS patients per arm, for figures
    twin_cov = [{name: population.twins_covariates(twins, p.population) for name, p in by_arm.items()} if twins is not None else {}
                for by_arm in prepared]
    # Draws of an arm share one device call up to chunk_size patient simulations (small n, many draws),
    # in blocks of equal size, so the last call is not padded with repeated draws.
    calls = -(-len(prepared) // max(1, settings.chunk_size // chunk))
    block = -(-len(prepared) // calls)
    jobs = [(range(b, min(b + block, len(prepared))), c, start)
            for b in range(0, len(prepared), block) for c, start in enumerate(range(0, n, chunk))]

    def launch(draws, c, start):
        """Dispatch the job's arms and draws that are not on disk yet (None: resume from disk)."""
        ids = np.arange(start, min(start + chunk, n))
        pending = {}
        for name in arms:
            todo = [d for d in draws if store is None or not store.has(name, d, c)]
            runs = dispatch_draws([prepared[d][name] for d in todo], ids, settings.seed, chunk,
                                  twin_cov[todo[0]].get(name), block) if todo else []
            pending[name] = {d: None for d in draws} | dict(zip(todo, runs))
        return pending

    # One job ahead: the device simulates job i + 1 while the host tabulates job i and the store's
    # writer threads write it.
    ahead = launch(*jobs[0])
    try:
        for i, (draws, c, start) in enumerate(jobs):
            pending, ahead = ahead, launch(*jobs[i + 1]) if i + 1 < len(jobs) else None
            for d in draws:
                tables, from_disk = _draw_tables(prepared[d], {name: runs[d] for name, runs in pending.items()}, d, c,
                                                 store, n_doses, labels, restarts)
                kept += [((d, c), t) for t in tables.values()] if store is None else []
                resumed += sum(from_disk)
                for done in from_disk if progress is not None else []:
                    progress(min(chunk, n - start), resumed=done)
                counts.add(d, tables)
                onsets.add(d, tables)
                if d == 0 and start < SAMPLE_PATIENTS:
                    sample += [t.iloc[:SAMPLE_PATIENTS - start] for t in tables.values()]
    except BaseException:
        if store is not None:  # let the parts already handed over reach the disk whole, for a resume
            with contextlib.suppress(Exception):
                store.close()
        raise
    if store is not None:
        store.finish()
    if resumed:
        log.info("resumed %d of %d chunks from %s", resumed, len(prepared) * -(-n // chunk) * len(arms), store.root)
    courses = {name: _time_course_bands(p, np.arange(min(settings.trajectories, n)), settings.seed,
                                        population.twins_covariates(twins, p.population) if twins is not None else None)
               for name, p in prepared[0].items()} if settings.trajectories > 0 else {}
    summary = annotate_summary(counts.summary(settings.seed), arms, periods, published.load())
    return TrialResult(arms, reference_arm, summary, counts.comparisons(settings.seed), periods,
                       {name: p.compiled.administrations for name, p in prepared[0].items()},
                       {name: response_kind(p) for name, p in prepared[0].items()},
                       pd.concat(sample, ignore_index=True),
                       onsets.onsets_table(arms, settings.seed),
                       onsets.monitoring_table(settings.seed),
                       patients=pd.concat([t for _, t in sorted(kept, key=lambda k: k[0])], ignore_index=True) if store is None else None,
                       dataset=store.dataset if store is not None else None, time_courses=courses)
