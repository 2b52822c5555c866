r"""A Gaussian-process emulator of the calibration's rates, cheap enough for NUTS.

Simulating every cohort costs ~0.5 s per parameter set on a CPU, and NUTS needs ~10^4 gradients;
the emulator, fitted on a few hundred simulated sets (`design`), answers in microseconds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.optim import Adam


# Shortest length scale (unconstrained prior scale, SD 1): a target that varies over less than a tenth
# of a prior SD is Monte Carlo noise (rescue histories that flip between nearby sets), not a response
# to the parameter. Unbounded, such a fit shrank the scale until the Gaussian process was not finite
# (mosunetuzumab's T17 against the occasion share alone: ell 0.009 after 100 Adam steps, NaN at 400).
LOG_ELL_MIN = float(np.log(0.1))


def shortest(log_ell):
    """Length scales held at or above `LOG_ELL_MIN` (no gradient below it)."""
    return jnp.maximum(log_ell, LOG_ELL_MIN)


class EmulatorFitError(RuntimeError):
    """A Gaussian-process fit that is not finite; `design` holds the (u, y) it was fitted on, when known."""

    design: tuple[np.ndarray, np.ndarray] | None = None


class Emulator:
    r"""Gaussian-process emulator of logit(rate) of every target against the unconstrained parameters.

    One GP per target, squared-exponential kernel with a length scale per parameter (ARD) over the
    parameters that concern the target's cohort only (`relevant`: the shared model parameters and its
    own drug's and population's), a linear mean and a small noise term for the Monte Carlo wiggle
    left by a finite cohort:

    $$ y_t(u) \sim \mathcal{GP}\big(a_t + b_t^\top u_t,\; s_t^2 \exp(-\tfrac12 \textstyle\sum_{k \in t} (u_k - u'_k)^2/\ell_{tk}^2) + \sigma_t^2\delta\big). $$

    Hyperparameters maximise the marginal likelihood (numpyro's Adam, all targets at once under
    vmap) on the last `fit_points` design points (the cost grows with the cube of the points; the
    latest rounds lie where the posterior is), starting from the prior's width or from the previous
    round's fit (`start`, so a refit needs fewer steps), or are taken from another emulator (`hyper`); the
    emulator is then the posterior mean over all points, smooth and cheap to differentiate for NUTS.
    With a few hundred design points it interpolates far better than a small neural network.
    """

    def __init__(self, target_ids: list[str], u: np.ndarray, logits: np.ndarray, relevant: np.ndarray | None = None, *,
                 steps: int, learning_rate: float, fit_points: int, hyper: dict | None = None, start: dict | None = None):
        self.target_ids = list(target_ids)
        x = jnp.asarray(u, jnp.float32)
        self.x = x
        n, d = x.shape
        mask = jnp.ones((len(self.target_ids), d), jnp.float32) if relevant is None else jnp.asarray(relevant, jnp.float32)
        self.y_mean, self.y_scale = logits.mean(0), logits.std(0) + 1e-3
        y = jnp.asarray((logits - self.y_mean) / self.y_scale, jnp.float32).T  # (targets, points)
        optimiser = Adam(learning_rate)

        def gram(h, xm):
            amp, noise = jnp.exp(h["log_amp"]), jnp.exp(h["log_noise"]) + 1e-4
            z = xm / jnp.exp(shortest(h["log_ell"]))
            sq = jnp.sum(z * z, -1)
            # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b: an (n, n) matmul instead of an (n, n, d) difference
            # tensor (a 150-step fit of 40 targets on 384 of 1,024 points: 51 s instead of 76 s, 2 CPU cores).
            dist2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)
            # Jitter relative to the amplitude keeps the Cholesky finite in float32 when a target sits at its
            # floor at nearly every design point (a few outliers then pull the amplitude up by orders).
            return amp * jnp.exp(-0.5 * dist2) + (noise + 1e-4 * amp) * jnp.eye(len(xm))

        def residual(yt, xm):
            design = jnp.concatenate([jnp.ones((len(xm), 1)), xm], axis=1)
            beta = jnp.linalg.lstsq(design, yt)[0]  # linear mean by least squares; the GP models the rest
            return beta, yt - design @ beta

        def fit_hyper(yt, m, h0):
            xm = (x * m)[-fit_points:]  # parameters that do not concern the target drop out of kernel and mean
            _, r = residual(yt[-fit_points:], xm)

            def nll(h):
                chol = jnp.linalg.cholesky(gram(h, xm))
                a = jax.scipy.linalg.cho_solve((chol, True), r)
                prior = 0.5 * jnp.sum(m * (h["log_ell"] - jnp.log(1.5)) ** 2)  # weak: length scales near the prior's width
                return 0.5 * r @ a + jnp.sum(jnp.log(jnp.diag(chol))) + prior

            def step(state, _):
                _, grads = jax.value_and_grad(nll)(optimiser.get_params(state))
                return optimiser.update(grads, state), None

            state, _ = jax.lax.scan(step, optimiser.init(h0), None, length=steps)
            return optimiser.get_params(state)

        def condition(yt, m, h):
            xm = x * m
            beta, r = residual(yt, xm)
            alpha = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(gram(h, xm)), True), r)
            return dict(beta=beta, alpha=alpha, log_ell=shortest(h["log_ell"]), log_amp=h["log_amp"], log_noise=h["log_noise"], mask=m)

        if hyper is None:
            if start is None:  # length scales at the prior's width, amplitude at the residual variance
                start = dict(log_ell=jnp.full((len(self.target_ids), d), jnp.log(1.5)),
                             log_amp=jnp.log(jnp.var(y, axis=1) + 1e-3), log_noise=jnp.full(len(self.target_ids), jnp.log(1e-2)))
            start = {k: start[k] for k in ("log_ell", "log_amp", "log_noise")}
            hyper = jax.jit(jax.vmap(fit_hyper))(y, mask, start)
        hyper = {k: hyper[k] for k in ("log_ell", "log_amp", "log_noise")}
        self.gp = jax.jit(jax.vmap(condition))(y, mask, hyper)
        failed = [t for t, ok in zip(self.target_ids, np.isfinite(np.asarray(self.gp["alpha"])).all(1)) if not ok]
        if failed:  # say which, rather than let NUTS fail later on a NaN rate
            raise EmulatorFitError(f"Gaussian-process fit not finite for targets {failed} (see Emulator)")
        # Design points on each target's length scales, and their squared norms, for `logits`.
        self._z = x[None, :, :] * (self.gp["mask"] / jnp.exp(self.gp["log_ell"]))[:, None, :]  # (targets, points, d)
        self._z_sq = jnp.sum(self._z * self._z, -1)

    def logits(self, u: jax.Array) -> jax.Array:
        """Emulated logit(rate) of every target at one parameter vector u (unconstrained scale)."""
        g = self.gp
        um = u[None, :] * g["mask"]
        uz = um / jnp.exp(g["log_ell"])
        # Squared distances by one contraction, as in `gram` (half the cost of NUTS on the emulator).
        dist2 = jnp.maximum(jnp.sum(uz * uz, -1)[:, None] + self._z_sq - 2.0 * jnp.einsum("tnd,td->tn", self._z, uz), 0.0)
        k = jnp.exp(g["log_amp"])[:, None] * jnp.exp(-0.5 * dist2)  # (targets, points)
        mean = g["beta"][:, 0] + jnp.sum(g["beta"][:, 1:] * um, -1) + jnp.sum(k * g["alpha"], -1)
        return mean * self.y_scale + self.y_mean

    def target_rates(self, u: jax.Array) -> dict[str, jax.Array]:
        z = jax.nn.sigmoid(self.logits(u))
        return {t: z[i] for i, t in enumerate(self.target_ids)}
