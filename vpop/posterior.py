"""Posterior draws as parameter overrides for the trial runner.

A posterior (ArviZ InferenceData written by `vpop-calibrate`) holds draws of population parameters
named by config path ('model.cytokines.k_il6_myeloid_pg_ml_per_day', 'drug.glofitamab.engagement.
kd_kill_ng_ml', ...). Each draw becomes a dict of overrides for `simulate.prepare_arm`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from vpop.catalogue import ConfigError

DEFAULT = "default"


def default_path() -> Path:
    return Path(str(resources.files("vpop.data") / "posterior_default.nc"))


def load(posterior: str):
    """The InferenceData of `default` (the shipped calibration) or of a path."""
    import arviz as az

    path = default_path() if posterior == DEFAULT else Path(posterior)
    if not path.is_file():
        where = "the shipped default posterior is missing from the installation" if posterior == DEFAULT else f"no such file {path}"
        raise ConfigError(f"posterior '{posterior}': {where}; allowed: default, none or a path to a posterior.nc")
    try:
        idata = az.from_netcdf(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file
        raise ConfigError(f"posterior '{posterior}': {path} is not an ArviZ InferenceData file ({err})") from err
    if "posterior" not in idata.groups():
        raise ConfigError(f"posterior '{posterior}': {path} has no posterior group")
    return idata


def draws(posterior: str | None, n_draws: int, seed: int = 0) -> list[dict[str, float]]:
    """`n_draws` override dicts picked evenly from the posterior; `none` gives the nominal values."""
    if not isinstance(n_draws, int) or n_draws <= 0:
        raise ConfigError(f"draws must be a positive whole number, got {n_draws!r}")
    if posterior in (None, "none"):
        return [{}]
    post = load(str(posterior)).posterior
    names = [v for v in post.data_vars if "." in v]
    flat = {v: np.asarray(post[v]).reshape(-1) for v in names}
    total = len(next(iter(flat.values())))
    rng = np.random.default_rng(seed)
    idx = rng.permutation(total)[:n_draws] if n_draws <= total else rng.integers(0, total, n_draws)
    return [{v: float(flat[v][i]) for v in names} for i in idx]
