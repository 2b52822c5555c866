"""Posterior draws as parameter values for the trial runner.

A posterior (ArviZ InferenceData written by `vpop-calibrate`) holds draws of population parameters
named by config path ('model.cytokines.priming_margin', 'drug.glofitamab.engagement.kd_kill_ng_ml',
...). Each draw becomes a dict {config path: value} that `trial.prepare_draws` substitutes into
every arm's typical parameters (`parameters.substitute`, the calibration's mechanism).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from vpop.catalogue import ConfigError
from vpop.model import VERSION as model_version

DEFAULT = "default"


def default_path() -> Path:
    return Path(str(resources.files("vpop.data") / "posterior_default.nc"))


def arviz():
    """The arviz module, imported without its notices about a coming refactor."""
    import logging
    import warnings

    logging.getLogger("arviz.preview").setLevel(logging.WARNING)  # "arviz_base not installed" notices
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    return az


def path_of(posterior: str) -> Path:
    """The file of `default` (the shipped calibration) or of a path."""
    return default_path() if posterior == DEFAULT else Path(posterior)


def load(posterior: str):
    """The posterior group (an xarray Dataset of draws by config path) of `default` (the shipped
    calibration) or of a path, refused unless fitted under this model version. Only that group and
    the file's attributes are read: the predictive groups hold hundreds of variables, and reading the
    whole InferenceData took ~4 s per run."""
    import xarray as xr

    path = path_of(posterior)
    if not path.is_file():
        where = "the shipped default posterior is missing from the installation" if posterior == DEFAULT else f"no such file {path}"
        raise ConfigError(f"posterior '{posterior}': {where}; allowed: default, none or a path to a posterior.nc")
    try:
        with xr.open_dataset(path) as root:
            attrs = dict(root.attrs)
    except Exception as err:  # noqa: BLE001 - any unreadable file
        raise ConfigError(f"posterior '{posterior}': {path} is not an ArviZ InferenceData file ({err})") from err
    try:
        with xr.open_dataset(path, group="posterior") as group:
            draws = group.load()
    except Exception:  # noqa: BLE001 - netCDF backends raise differently for a missing group
        raise ConfigError(f"posterior '{posterior}': {path} has no posterior group") from None
    fitted = attrs.get("model_version")
    if fitted != model_version:
        raise ConfigError(
            f"posterior '{posterior}': fitted under model version {fitted or 'older than 0.6'}, this vpop runs model "
            f"{model_version}, whose parameters mean something else (README 'Changes to contracts'); recalibrate "
            "with vpop-calibrate, or use posterior=default or posterior=none")
    return draws


def draws(posterior: str | None, n_draws: int, seed: int = 0) -> list[dict[str, float]]:
    """`n_draws` value dicts, distinct draws of the posterior picked at random (without
    replacement); `none` gives the nominal values (one draw, whatever `n_draws`)."""
    if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws <= 0:
        raise ConfigError(f"draws must be a positive whole number, got {n_draws!r}")
    if posterior in (None, "none"):
        return [{}]
    post = load(str(posterior))
    names = [v for v in post.data_vars if "." in v]
    flat = {v: np.asarray(post[v]).reshape(-1) for v in names}
    total = len(next(iter(flat.values())))
    if n_draws > total:
        raise ConfigError(f"draws={n_draws}: posterior '{posterior}' holds {total} draws; allowed: 1-{total}")
    idx = np.random.default_rng(seed).permutation(total)[:n_draws]
    return [{v: float(flat[v][i]) for v in names} for i in idx]


def with_settings(draws: list[dict[str, float]], settings: list[str]) -> list[dict[str, float]]:
    """The draws with model settings that no posterior holds added to each (`PATH=NUMBER`, e.g.
    `model.crs.hold_until_resolved=1`), for scripts that evaluate a posterior under another model
    setting; ConfigError names a malformed one."""
    fixed = {}
    for s in settings:
        path, _, value = s.partition("=")
        try:
            fixed[path.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--set {s!r}: expected a config path and a number, e.g. model.crs.hold_until_resolved=1") from None
        if "." not in path or not path.startswith(("model.", "drug.", "population.")):
            raise ConfigError(f"--set {s!r}: the path must start with model., drug. or population.")
    return [{**d, **fixed} for d in draws]


def extend(base: str, addition, seed: int = 0):
    """The InferenceData of posterior `base` (`default` or a path) with the posterior draws of
    `addition` (a calibration of some parameters with the base's others held at their medians,
    `calibration.extends`) joined to it: every base draw gets one draw of the added parameters, picked
    at random (without replacement where the addition has enough), replacing the base's draws of any
    it already had. The base's other groups are kept, and the addition's predictive rates are added
    beside them where the draw counts agree (replacing the base's rates of the same targets).

    The joint draws treat the new parameters as independent of the shared ones given the data; that
    holds as far as the new targets barely inform the shared mechanism (they are left out of its fit)."""
    import xarray as xr

    az = arviz()
    load(base)  # refuses a missing file or another model version
    out = az.from_netcdf(path_of(base))
    out.posterior.load()
    shape = (out.posterior.sizes["chain"], out.posterior.sizes["draw"])
    new = [v for v in addition.posterior.data_vars if "." in v]
    flat = {v: np.asarray(addition.posterior[v]).reshape(-1) for v in new}
    total = len(next(iter(flat.values())))
    need = shape[0] * shape[1]
    rng = np.random.default_rng(seed)
    idx = rng.permutation(total)[:need] if total >= need else rng.integers(0, total, need)
    out.posterior = out.posterior.assign({v: (("chain", "draw"), flat[v][idx].reshape(shape)) for v in new})
    for group in ("posterior_predictive", "prior_predictive"):
        if group in out.groups() and group in addition.groups():
            mine, theirs = getattr(out, group), getattr(addition, group)
            if dict(mine.sizes) == dict(theirs.sizes):
                setattr(out, group, xr.merge([mine.drop_vars([v for v in theirs.data_vars if v in mine]), theirs]))
    out.posterior.attrs.update(extended_with=", ".join(new))
    return out
