"""What a calibration reports: convergence checks, predictive tables and figures."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("vpop")
# Convergence the diagnostics must meet, else a warning (Vehtari et al. 2021 Bayesian Anal 16:667: R-hat < 1.01,
# bulk and tail ESS > 400 for four chains).
RHAT_MAX = 1.01
ESS_MIN = 400


def warn_convergence(summary: pd.DataFrame) -> list[str]:
    """Log a warning for every convergence diagnostic outside its bound (R-hat, bulk/tail ESS,
    divergences); returns the messages."""
    msgs = [f"{r.parameter}: R-hat {r.r_hat:.3f} > {RHAT_MAX}" for r in summary.itertuples() if r.r_hat > RHAT_MAX]
    msgs += [f"{r.parameter}: {kind} ESS {getattr(r, kind):.0f} < {ESS_MIN}" for r in summary.itertuples()
             for kind in ("ess_bulk", "ess_tail") if getattr(r, kind) < ESS_MIN]
    if len(summary) and summary.divergences.iloc[0] > 0:
        msgs.append(f"{int(summary.divergences.iloc[0])} divergent transitions")
    for m in msgs:
        log.warning("calibration not converged: %s (more warmup, samples or chains; see diagnostics.csv)", m)
    return msgs


def ppc_table(targets: pd.DataFrame, rates: dict[str, np.ndarray], seed: int = 0) -> pd.DataFrame:
    """ppc.csv: observed and posterior-predictive rates (%) with 95% intervals of a trial of size n."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in targets.itertuples():
        r = rates[t.id]
        k_rep = rng.binomial(int(t.n), np.clip(r, 0, 1)[:, None], size=(len(r), 20)).ravel() / t.n
        rows.append(dict(target=t.id, endpoint=t.endpoint, role=t.role, observed=100 * t.k / t.n,
                         predicted_mean=100 * float(np.mean(r)), lower=100 * float(np.percentile(k_rep, 2.5)),
                         upper=100 * float(np.percentile(k_rep, 97.5)), n=int(t.n), drug=t.drug, population=t.population))
    return pd.DataFrame(rows)


def figures(idata, names: list[str], ppc: pd.DataFrame, prior_ppc: pd.DataFrame, folder: Path) -> None:
    import matplotlib

    from vpop.posterior import arviz

    az = arviz()

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    short = {n: n.split(".", 1)[1] if n.startswith("model.") else n for n in names}
    axes = az.plot_rank(idata, var_names=names, kind="vlines", figsize=(10, 2.0 * len(names)))
    plt.gcf().tight_layout()
    plt.savefig(folder / "rank.png", dpi=100)
    plt.close("all")
    key = names[: min(4, len(names))]
    if len(key) >= 2:  # a pair plot needs two parameters; a one-parameter fit has its rank plot
        az.plot_pair(idata, var_names=key, kind="kde" if idata.posterior.sizes["draw"] > 20 else "scatter", figsize=(9, 9),
                     labeller=az.labels.MapLabeller(var_name_map=short))
        plt.savefig(folder / "pairs.png", dpi=100)
        plt.close("all")
    del axes

    fig, ax = plt.subplots(figsize=(8, 0.32 * len(ppc) + 1.5))
    y = np.arange(len(ppc))[::-1]
    for frame, offset, color, label in ((prior_ppc, 0.18, "#bbbbbb", "prior predictive"), (ppc, 0.0, "#1f77b4", "posterior predictive")):
        below = np.clip(frame.predicted_mean - frame.lower, 0, None)  # a skewed predictive can put the mean outside
        above = np.clip(frame.upper - frame.predicted_mean, 0, None)
        ax.errorbar(frame.predicted_mean, y + offset, xerr=[below, above],
                    fmt="o", ms=3, color=color, capsize=2, label=label)
    val = ppc.role == "validation"
    ax.scatter(ppc.observed[~val], y[~val], marker="D", color="k", zorder=3, label="observed (calibration)")
    ax.scatter(ppc.observed[val], y[val], marker="*", s=90, color="#d62728", zorder=3, label="observed (validation, not fitted)")
    ax.set_yticks(y, [f"{r.target} {r.drug} {r.endpoint}" for r in ppc.itertuples()], fontsize=7)
    ax.set_xlabel("rate (%) with 95% predictive interval for a trial of the published size")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / "ppc.png", dpi=110)
    plt.close(fig)
