r"""The calibrated parameters and their priors.

A parameter with a `{nominal, prior: [low, high], unknown: true}` entry in the configs is sampled as
$u \sim \mathcal N(0, 1)$ truncated to $[-3, 3]$ (`calibration.prior_truncation_sd`) and mapped to its
value by

$$ \theta = g^{-1}\big(\tfrac12 (g(\mathrm{low}) + g(\mathrm{high})) + \tfrac14 (g(\mathrm{high}) - g(\mathrm{low}))\, u\big), $$

with $g = \log$ (or logit for fractions, `scale: logit`): the prior range is the central 95% of a
normal on that scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import jax
from numpyro.distributions import transforms
from omegaconf import DictConfig

from vpop import parameters
from vpop.catalogue import ConfigError


@dataclass(frozen=True)
class CalibratedParameter:
    """A population parameter with a prior, sampled on the unconstrained scale u (see the module)."""

    config_path: str
    low: float
    high: float
    logit: bool  # fractions (`scale: logit` in the config) live on the logit scale, the rest on the log scale
    truncation_sd: float = 3.0  # the prior is truncated at +-this many SD of u

    @property
    def site(self) -> str:
        return "u:" + self.config_path

    @property
    def transform(self) -> transforms.Transform:
        """u -> value: numpyro's affine map onto the log (logit) scale, then exp (sigmoid)."""
        to_value = transforms.SigmoidTransform() if self.logit else transforms.ExpTransform()
        lo, hi = to_value.inv(self.low), to_value.inv(self.high)
        return transforms.ComposeTransform([transforms.AffineTransform(0.5 * (lo + hi), 0.25 * (hi - lo)), to_value])

    def constrain(self, u: jax.Array) -> jax.Array:
        return self.transform(u)


def calibrated_parameters(paths: list[str], truncation_sd: float = 3.0, model: DictConfig | None = None,
                          priors: Mapping[str, Sequence[float]] | None = None) -> list[CalibratedParameter]:
    """The parameters at config paths, each checked to be an unknown (`unknown: true`) with a prior
    (`model.*` priors read from `model`, default the shipped model). `priors` (`calibration.priors`)
    replaces the configs' [low, high] of some of them for this calibration only."""
    priors = dict(priors or {})
    stray = sorted(set(priors) - set(paths))
    if stray:
        raise ConfigError(f"calibration.priors: {stray} not among calibration.parameters; allowed: {', '.join(paths)}")
    out = []
    for path in paths:
        entry = parameters.config_entry(path, model)
        if not (isinstance(entry, DictConfig) and entry.get("unknown", False)):
            raise ConfigError(f"calibration.parameters: '{path}' has a published value; only "
                              "{nominal, prior, unknown: true} entries are calibrated")
        scale = entry.get("scale", "log")
        if scale not in ("log", "logit"):
            raise ConfigError(f"'{path}'.scale must be log or logit, got {scale!r}")
        prior = priors.get(path, entry.prior)
        try:
            low, high = (float(x) for x in prior)
        except (TypeError, ValueError):  # not two numbers
            low = high = float("nan")
        if not (0 < low < high and (scale == "log" or high < 1)):
            where = f"calibration.priors['{path}']" if path in priors else f"'{path}'.prior"
            raise ConfigError(f"{where} must be [low, high] with 0 < low < high{' < 1' if scale == 'logit' else ''}, "
                              f"got {list(prior)}")
        out.append(CalibratedParameter(path, low, high, logit=scale == "logit", truncation_sd=truncation_sd))
    return out


def constrain_all(calibrated: list[CalibratedParameter], u: jax.Array) -> dict[str, jax.Array]:
    """Parameter values by config path from the unconstrained vector u (prior N(0, I))."""
    return {p.config_path: p.constrain(u[i]) for i, p in enumerate(calibrated)}
