"""Posterior draws as parameter overrides for the trial runner.

A posterior (ArviZ InferenceData written by `vpop-calibrate`) holds draws of population parameters
named by config path ('model.cytokines.k_il6_myeloid_pg_ml_per_day', 'drug.mosunetuzumab.engagement.
kd_activation_ng_ml', ...). Each draw becomes a dict of overrides for `simulate.prepare_arm`.
"""

from __future__ import annotations

from vpop.catalogue import ConfigError


def draws(posterior: str | None, n_draws: int, seed: int = 0) -> list[dict[str, float]]:
    """`n_draws` override dicts: `none` gives the nominal parameters (one draw)."""
    if not isinstance(n_draws, int) or n_draws <= 0:
        raise ConfigError(f"draws must be a positive whole number, got {n_draws!r}")
    if posterior in (None, "none"):
        return [{}]
    raise ConfigError(f"posterior '{posterior}': no calibrated posterior is available yet; allowed: none")
