"""Named configs (drugs, regimens, populations, premedications, prophylaxes) looked up by name.

Arms name their drug, regimen and population; several arms may name different ones, so these are
read by name from the config groups rather than chosen once through Hydra's defaults list. The
search path is the package's own `configs/` first, then any user folders (`--config-dir`), so a
user's folder can add new entries or shadow shipped ones.
"""

from __future__ import annotations

import copy
import functools
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

GROUPS = ("drug", "regimen", "population", "premedication", "prophylaxis", "model", "experiment")

_user_dirs: list[Path] = []


class ConfigError(ValueError):
    """A config names something that does not exist or has a value outside what is allowed."""


def add_search_dir(path: str | Path) -> None:
    """Look in this folder (with the same group sub-folders) before the shipped configs."""
    p = Path(path).expanduser().resolve()
    if p not in _user_dirs:
        _user_dirs.insert(0, p)


def shipped_configs():
    """The shipped `configs/` folder: `vpop.configs` once installed, `../configs` in a source checkout.

    A wheel maps `configs/` to the `vpop.configs` package; running from the repository root
    (`python -m pytest`) imports the checkout's `vpop/`, which has no `configs` sub-package.
    """
    try:
        return resources.files("vpop.configs")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "configs"


def hydra_config_path() -> str:
    """`config_path` for `hydra.main`/`initialize_config_*`: the package when installed, else the folder."""
    try:
        resources.files("vpop.configs")
        return "pkg://vpop.configs"
    except ModuleNotFoundError:
        return str(shipped_configs())


def _roots() -> list:
    return [*_user_dirs, shipped_configs()]


def available(group: str) -> list[str]:
    names: set[str] = set()
    for root in _roots():
        folder = root / group
        if folder.is_dir():
            names.update(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))
    return sorted(names)


@functools.lru_cache(maxsize=256)
def _parse(path: str, mtime_ns: int) -> DictConfig:
    """A config file parsed once per version of it (an arm reads its drug and population several
    times; parsing is ~4x the cost of a copy)."""
    cfg = OmegaConf.create(Path(path).read_text())
    cfg.pop("defaults", None)  # Hydra-only key in shipped option files
    return cfg


def load(group: str, name: str, field: str | None = None) -> DictConfig:
    """The config `group/name.yaml`; a missing name raises ConfigError listing the allowed ones."""
    if group not in GROUPS:
        raise ConfigError(f"unknown config group '{group}'; allowed: {', '.join(GROUPS)}")
    for root in _roots():
        path = root / group / f"{name}.yaml"
        if path.is_file():
            return copy.deepcopy(_parse(str(path), path.stat().st_mtime_ns))  # a copy: callers merge into it
    where = f"{field}: " if field else ""
    raise ConfigError(f"{where}unknown {group} '{name}'; allowed: {', '.join(available(group)) or '(none)'}")
