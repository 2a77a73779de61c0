"""Comparing a discrete flow with its limit: weak and strong errors between two ensembles,
and the fitted convergence order."""

from collections.abc import Sequence
import functools
from typing import NamedTuple

import jax
from jaxtyping import ArrayLike
import numpy as np
import optimistix as optx

from .._simulate import Ensemble, masked_mean


class ErrorCurve(NamedTuple):
    """An error between two ensembles at each saved step, with its Monte Carlo uncertainty."""

    steps: np.ndarray
    """The saved steps $k$ (time $k\\eta$)."""
    difference: np.ndarray
    """Weak: $\\mathbb{E}f(\\theta_k) - \\mathbb{E}f(\\Theta_{k\\eta})$; strong:
    $\\mathbb{E}\\|\\theta_k - \\Theta_{k\\eta}\\|$."""
    se: np.ndarray
    """Its standard error."""
    valid: np.ndarray
    """False where a path of either ensemble has diverged by that step: the limit does not
    describe a diverging flow, and these points must not enter an order fit."""

    @property
    def error(self) -> np.ndarray:
        return np.abs(self.difference)


def _values(ens: Ensemble, f) -> np.ndarray:
    if isinstance(f, str):
        v = getattr(ens, f, None)
        if f not in ("energy", "loss") or v is None:
            raise ValueError(
                f"f={f!r}: use 'energy' (needs a known minimiser), 'loss', or a callable of theta."
            )
        return np.asarray(v)
    if ens.theta is None:
        raise ValueError("A callable f needs the trajectories: simulate with save='trajectory'.")
    return np.asarray(jax.vmap(jax.vmap(f))(ens.theta))


def _check_pair(discrete: Ensemble, limit: Ensemble) -> None:
    if not (isinstance(discrete, Ensemble) and isinstance(limit, Ensemble)):
        raise TypeError("Compare two lspsde.Ensemble results (from lspsde.simulate).")
    if np.shape(discrete.steps) != np.shape(limit.steps) or not np.array_equal(
        discrete.steps, limit.steps
    ):
        raise ValueError(
            "The two ensembles are saved at different steps; simulate both with the same "
            "n_steps and save_every (step k of SGD and of its limit are then at time k * eta)."
        )


def weak_error(
    discrete: Ensemble, limit: Ensemble, f="energy", *, paired: bool = True
) -> ErrorCurve:
    r"""$\mathbb{E}f(\theta_k) - \mathbb{E}f(\Theta_{k\eta})$ at every saved step, with its
    standard error, over the paths alive in both ensembles.

    **Arguments:**

    - `discrete`, `limit`: ensembles from ``simulate`` with the same ``n_steps`` and
      ``save_every`` (e.g. ``SGD(eta)`` and ``SGDLimit(eta)``).
    - `f`: ``"energy"`` ($\|\theta - \theta^*\|^2$), ``"loss"``, or a callable of $\theta$.
    - `paired`: the two ensembles were run with the same key and ``n_paths``, so path $p$ of
      each is driven by the same Brownian path (noise models with ``gaussian_draws``). The
      standard error then comes from the per-path differences, typically far smaller than
      that of two independent means. Use ``paired=False`` for independent ensembles.
    """
    _check_pair(discrete, limit)
    a, b = _values(discrete, f), _values(limit, f)
    alive_a, alive_b = np.asarray(discrete.alive()), np.asarray(limit.alive())
    if paired:
        if a.shape[0] != b.shape[0]:
            raise ValueError("paired=True needs the same n_paths in both ensembles.")
        mean, se = map(np.asarray, masked_mean(a - b, alive_a & alive_b))
    else:
        (ma, sa), (mb, sb) = masked_mean(a, alive_a), masked_mean(b, alive_b)
        mean, se = np.asarray(ma - mb), np.sqrt(np.asarray(sa) ** 2 + np.asarray(sb) ** 2)
    valid = alive_a.all(axis=0) & alive_b.all(axis=0)
    return ErrorCurve(np.asarray(discrete.steps), mean, se, valid)


def strong_error(discrete: Ensemble, limit: Ensemble) -> ErrorCurve:
    r"""$\mathbb{E}\|\theta_k - \Theta_{k\eta}\|$ over paths driven by the same noise (same key,
    same ``n_paths``, a noise model with ``gaussian_draws``), with its standard error."""
    _check_pair(discrete, limit)
    if discrete.theta is None or limit.theta is None:
        raise ValueError("The strong error needs trajectories: simulate with save='trajectory'.")
    if discrete.n_paths != limit.n_paths:
        raise ValueError("The strong error pairs paths: use the same n_paths and key in both.")
    diff = jax.tree.map(lambda x, y: np.asarray(x) - np.asarray(y), discrete.theta, limit.theta)
    sq = sum(
        np.sum(leaf.reshape(*leaf.shape[:2], -1) ** 2, axis=-1) for leaf in jax.tree.leaves(diff)
    )
    alive_a, alive_b = np.asarray(discrete.alive()), np.asarray(limit.alive())
    mean, se = map(np.asarray, masked_mean(np.sqrt(sq), alive_a & alive_b))
    valid = alive_a.all(axis=0) & alive_b.all(axis=0)
    return ErrorCurve(np.asarray(discrete.steps), mean, se, valid)


class OrderFit(NamedTuple):
    r"""A fitted convergence order: $|e(h)| \approx C h^p$."""

    order: float
    """$p$ (NaN when fewer than three points qualify)."""
    se: float
    """Its standard error (scaled by the fit's residual scatter)."""
    ci: tuple[float, float]
    """A ``level`` confidence interval for $p$ (Student-t with $n - 2$ degrees of freedom)."""
    constant: float
    """$C$."""
    used: np.ndarray
    """Which points entered the fit."""
    note: str
    """Why points were left out, in words (empty if none was)."""


@functools.lru_cache(maxsize=64)
def _t_quantile(q: float, df: int) -> float:
    r"""The Student-t quantile, by bisection on $F(t) = 1 - \frac12 I_{\nu/(\nu+t^2)}(\nu/2,
    1/2)$ (NumPyro's ``StudentT.icdf`` needs TensorFlow Probability for ``betaincinv``)."""

    def cdf_gap(t, _):
        tail = 0.5 * jax.scipy.special.betainc(df / 2, 0.5, df / (df + t**2))
        return 1.0 - tail - q

    sol = optx.root_find(cdf_gap, optx.Bisection(rtol=1e-10, atol=1e-10), 1.0,
                         options={"lower": 0.0, "upper": 1e4})  # fmt: skip
    return float(sol.value)


def convergence_order(
    h: "ArrayLike | Sequence[float]",
    error: "ArrayLike | Sequence[float]",
    se: "ArrayLike | Sequence[float] | None" = None,
    valid: "ArrayLike | Sequence[bool] | None" = None,
    *,
    level: float = 0.95,
) -> OrderFit:
    r"""Fit $\log|e| = \log C + p\log h$ by weighted least squares.

    Points are left out, and the note says so, where the error is not finite, where ``valid``
    is False (e.g. a diverging discrete flow, or a step past $\eta_{\max}$: the limit does not
    describe it, and fitting through it would be wrong), and where the error is not resolved
    from zero by its Monte Carlo uncertainty ($|e| < 2\,\mathrm{se}$). Weights are the inverse
    variances of $\log|e|$ by the delta method ($\mathrm{se}/|e|$); the order's standard error is
    scaled by the residual scatter, so a pre-asymptotic curve widens the interval instead of
    hiding.
    """
    h, e = np.asarray(h, dtype=float), np.abs(np.asarray(error, dtype=float))
    if h.shape != e.shape or h.ndim != 1:
        raise ValueError(f"`h` and `error` must be 1-D of equal length, got {h.shape}, {e.shape}.")
    if not np.all(h > 0):
        raise ValueError(f"Step sizes `h` must be > 0, got {h}.")
    s = None if se is None else np.asarray(se, dtype=float)
    ok = np.isfinite(e) & (e > 0)
    notes = []
    if valid is not None:
        v = np.asarray(valid, dtype=bool)
        if (~v & ok).any():
            notes.append(
                f"{int((~v & ok).sum())} point(s) where the flow diverged or the limit fails"
            )
        ok &= v
    if s is not None:
        unresolved = ok & ~(e > 2 * s)
        if unresolved.any():
            notes.append(f"{int(unresolved.sum())} point(s) not resolved from Monte Carlo noise")
        ok &= ~unresolved
    if (~np.isfinite(np.asarray(error, dtype=float))).any():
        notes.append("non-finite errors")
    if ok.sum() < 3:
        notes.append(f"only {int(ok.sum())} usable point(s): no order fitted")
        return OrderFit(np.nan, np.nan, (np.nan, np.nan), np.nan, ok, "; ".join(notes))
    x, y = np.log(h[ok]), np.log(e[ok])
    w = None if s is None else e[ok] / np.maximum(s[ok], 1e-300)
    if w is not None:
        w = np.minimum(w, 1e6)  # an exact (zero-se) point should not take all the weight
    (p, c), cov = np.polyfit(x, y, 1, w=w, cov="unscaled" if ok.sum() == 2 else True)
    p_se = float(np.sqrt(cov[0, 0]))
    t = _t_quantile(0.5 + level / 2, int(ok.sum()) - 2)
    ci = (float(p - t * p_se), float(p + t * p_se))
    return OrderFit(float(p), p_se, ci, float(np.exp(c)), ok, "; ".join(notes))
