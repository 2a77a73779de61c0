r"""Sampling noise from data: random Hessians ([`CurvatureNoise`][]) and minibatches
([`MinibatchNoise`][]).

$u$ is an array of integer indices, so $\partial G/\partial u$ (the $\sigma^u_t$ block) is not
defined for these models. Their variance is quadratic in $e = \theta - \theta^*$ when the
per-example gradients are affine, and [`frontier_constants`][lspsde.noise.frontier_constants]
turns that quadratic into Assumption 1's $(\sigma_0, \sigma_1)$.
"""

import math
from typing import ClassVar

import equinox as eqx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree
import lineax as lx
import numpy as np

from .._custom_types import ScalarLike
from ..objectives import AbstractObjective
from .base import AbstractNoise, Assumption1
from .helpers import (
    check_positive_int,
    concrete_scalar,
    flat_minimizer,
    frontier_constants,
    no_minimizer_error,
)

__all__ = ["CurvatureNoise", "MinibatchNoise"]


def _check_data_size(batch_size: int, data_size: int) -> tuple[int, int]:
    batch_size = check_positive_int("batch_size", batch_size)
    data_size = check_positive_int("data_size", data_size)
    if batch_size > data_size:
        raise ValueError(
            f"`batch_size` = {batch_size} exceeds `data_size` = {data_size}; a batch drawn "
            "without replacement cannot be larger than the data set. Use batch_size <= data_size."
        )
    return batch_size, data_size


class CurvatureNoise(AbstractNoise):
    r"""Multiplicative noise from random Hessians: least squares with sampled rows.

    For $\mathcal{L}(\theta) = \frac1{2n}\|A\theta - b\|^2$ with rows $a_i$, draw $B$ row indices
    $i_1..i_B$ uniformly *with* replacement ($u$, shape ``(B,)``) and set
    $G = \frac1B\sum_j a_{i_j}(a_{i_j}^\top\theta - b_{i_j})
    = \frac1B\sum_j (a_{i_j}a_{i_j}^\top\,\theta - a_{i_j}b_{i_j})$: a random Hessian
    $a a^\top$ (mean $H = A^\top A/n$) acting on $\theta$, so the noise grows with $\theta$.
    $\mathbb{E}\,G = \frac1n A^\top(A\theta - b) = \nabla\mathcal{L}$: unbiased.

    **Variance.** With $g_i = a_i r_i$, $r_i(\theta) = a_i^\top\theta - b_i$, one row has
    $v(\theta) = \frac1n\sum_i\|a_i\|^2 r_i^2 - \|\nabla\mathcal{L}\|^2$ and a batch $v/B$;
    $\Sigma(\theta) = \frac1B[\frac1n\sum_i r_i^2 a_i a_i^\top - \nabla\mathcal{L}
    \nabla\mathcal{L}^\top]$. Put $e = \theta - \theta^*$, $r_i^* = r_i(\theta^*)$ (so
    $r_i = r_i^* + a_i^\top e$, $\nabla\mathcal{L} = He$, $\sum_i a_i r_i^* = 0$). Then

    $$v = v_0 + 2c^\top e + e^\top Q e,\quad v_0 = \tfrac1n\textstyle\sum_i\|a_i\|^2 r_i^{*2},
    \quad c = \tfrac1n\sum_i\|a_i\|^2 r_i^* a_i,\quad Q = M - H^2,$$

    with $M = \frac1n\sum_i\|a_i\|^2 a_ia_i^\top$ the fourth-moment matrix ($Q \succeq 0$: it is
    the covariance of the random Hessian acting on $e$). $v_0 = v(\theta^*)$.

    **Constants.** If $c = 0$ (e.g. interpolation, $r^* = 0$), $\sigma_0^2 = v_0/B$,
    $\sigma_1^2 = \lambda_{\max}(Q)/B$ are exact. In general the cross term makes the bound a
    trade-off: for any $\sigma_1^2 > \lambda_{\max}(Q)/B$ the smallest valid
    $\sigma_0^2 = [v_0 + c^\top(B\sigma_1^2 I - Q)^{-1}c]/B$ (attained: equality at one $e$).
    [`assumption1`][] takes $\sigma_1^2 = 2\lambda_{\max}(Q)/B$ (Young's inequality with weight
    1, which also gives $\sigma_0^2 \le 2v_0/B$) unless `sigma1` is passed: an upper bound, tight
    on that frontier.

    $u$ is an integer array: $\partial G / \partial u$ (the $\sigma^u_t$ block) is not defined.

    **Arguments:** `batch_size` $B \ge 1$; `data_size` $n$, the number of rows of $A$ (needed to
    draw indices before the objective is seen; checked against it).

    **Objective:** anything with arrays ``A`` (n, d) and ``b`` (n,) and loss
    $\frac1{2n}\|A\theta - b\|^2$, e.g. ``models.LeastSquares``; $\theta$ a vector (d,).
    """

    magnitude: ClassVar[str | None] = None  # the noise is the data's
    batch_size: int = eqx.field(static=True)
    data_size: int = eqx.field(static=True)

    def __init__(self, batch_size: int, data_size: int):
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.data_size = check_positive_int("data_size", data_size)

    def _data(self, objective: AbstractObjective) -> tuple[Array, Array]:
        A, b = getattr(objective, "A", None), getattr(objective, "b", None)
        if not (hasattr(A, "ndim") and hasattr(b, "ndim") and A.ndim == 2 and b.ndim == 1):
            raise TypeError(
                f"CurvatureNoise samples rows of a least-squares objective, with arrays `A` (n, d)"
                f" and `b` (n,); {type(objective).__name__} has none. Use models.LeastSquares, "
                "or MinibatchNoise for other finite sums."
            )
        if A.shape[0] != self.data_size:
            raise ValueError(
                f"CurvatureNoise(data_size={self.data_size}) but the objective has "
                f"{A.shape[0]} rows; use data_size={A.shape[0]}."
            )
        return A, b

    def _fit(self, objective: AbstractObjective, theta: PyTree[Array]) -> tuple[Array, Array]:
        A, b = self._data(objective)
        if not isinstance(theta, jax.Array | np.ndarray) or theta.shape != (A.shape[1],):
            raise ValueError(
                f"CurvatureNoise needs theta of shape ({A.shape[1]},), got "
                f"{jax.tree.map(jnp.shape, theta)}."
            )
        return A, b

    def sample(self, key: PRNGKeyArray, theta: PyTree[Array]) -> Int[Array, " batch"]:
        return jax.random.randint(key, (self.batch_size,), 0, self.data_size)

    def zero(self, theta: PyTree[Array]) -> Int[Array, " batch"]:
        r"""No draw gives $G = \nabla\mathcal{L}$: rows $0..B-1$, a valid draw."""
        return jnp.arange(self.batch_size) % self.data_size

    def gradient(
        self, objective: AbstractObjective, theta: Float[Array, " d"], u: Int[Array, " batch"]
    ) -> Float[Array, " d"]:
        A, b = self._fit(objective, theta)
        rows = A[u]
        return rows.T @ (rows @ theta - b[u]) / self.batch_size

    def covariance(
        self, objective: AbstractObjective, theta: Float[Array, " d"]
    ) -> Float[Array, "d d"]:
        A, b = self._fit(objective, theta)
        r = A @ theta - b
        g = A.T @ r / A.shape[0]
        M2 = (A * (r**2)[:, None]).T @ A / A.shape[0]
        return (M2 - jnp.outer(g, g)) / self.batch_size

    def variance(self, objective: AbstractObjective, theta: Float[Array, " d"]) -> Float[Array, ""]:
        A, b = self._fit(objective, theta)
        r = A @ theta - b
        g = A.T @ r / A.shape[0]
        return (jnp.mean(jnp.sum(A**2, axis=1) * r**2) - g @ g) / self.batch_size

    def diffusion(
        self, objective: AbstractObjective, theta: Float[Array, " d"]
    ) -> lx.AbstractLinearOperator:
        r"""$B = [g_i - \bar g]_{i \le n} / \sqrt{Bn}$, $g_i = a_i r_i$ ($d \times n$, $m = n$):
        $BB^\top = \frac1{Bn}\sum_i (g_i - \bar g)(g_i - \bar g)^\top = \Sigma(\theta)$."""
        A, b = self._fit(objective, theta)
        per_row = A * (A @ theta - b)[:, None]
        D = per_row - jnp.mean(per_row, axis=0, keepdims=True)
        return lx.MatrixLinearOperator(D.T / math.sqrt(self.batch_size * A.shape[0]))

    def moments(self, objective: AbstractObjective) -> tuple[Array, Array, Array]:
        r"""$(v_0, c, Q)$ of one row: $v(\theta^* + e) = v_0 + 2c^\top e + e^\top Q e$."""
        A, b = self._data(objective)
        theta_star = flat_minimizer(objective, A[0], "CurvatureNoise.assumption1")
        n = A.shape[0]
        r, sq = A @ theta_star - b, jnp.sum(A**2, axis=1)
        H = A.T @ A / n
        g = A.T @ r / n  # = 0 up to rounding
        v0 = jnp.mean(sq * r**2) - g @ g
        c = A.T @ (sq * r) / n - H @ g
        Q = (A * sq[:, None]).T @ A / n - H @ H
        return v0, c, 0.5 * (Q + Q.T)

    def assumption1(
        self, objective: AbstractObjective, *, sigma1: ScalarLike | None = None
    ) -> Assumption1:
        v0, c, Q = self.moments(objective)
        s0, s1 = frontier_constants(v0, c, Q, 1.0 / self.batch_size, sigma1)
        return Assumption1(True, s0, s1, "upper bound: smallest sigma0 for this sigma1 (frontier)")

    def check_objective(self, objective: AbstractObjective) -> None:
        super().check_objective(objective)
        self._data(objective)

    def check(self, objective: AbstractObjective, theta0: PyTree[Array]) -> None:
        self._fit(objective, theta0)
        super().check(objective, theta0)


def _finite_sum(objective: AbstractObjective, data_size: int) -> None:
    n = getattr(objective, "n_examples", None)
    if not callable(getattr(objective, "per_example_loss", None)) or not isinstance(n, int):
        raise TypeError(
            f"MinibatchNoise needs a finite-sum objective L = (1/n) sum_i l_i with an int "
            f"attribute `n_examples` and a method `per_example_loss(theta, i)` (i a scalar "
            f"integer index); {type(objective).__name__} lacks them. Add both to the objective, "
            "or use CurvatureNoise (least squares) / GaussianNoise instead."
        )
    if n != data_size:
        raise ValueError(
            f"MinibatchNoise(data_size={data_size}) but the objective has n_examples = {n}; "
            f"use data_size={n}."
        )


@eqx.filter_jit
def _affine_moments(objective: AbstractObjective, n: int) -> tuple[Array, Array, Array, Array]:
    """``MinibatchNoise.moments``: one pass over the examples, O(d^2) memory."""
    flat_star, unravel = ravel_pytree(objective.minimizer())
    loss = lambda x, i: objective.per_example_loss(unravel(x), i)
    grad, hess = jax.grad(loss), jax.hessian(loss)
    delta = 1.0 + jnp.abs(flat_star)
    idx = jnp.arange(n)
    g_star = jax.vmap(grad, in_axes=(None, 0))(flat_star, idx)
    g_star = g_star - jnp.mean(g_star, axis=0, keepdims=True)  # g_i* - grad L(theta*)

    def body(carry, i):
        sumH, sumH2, sumHg, dev, scale = carry
        Hi, gi = hess(flat_star, i), grad(flat_star, i)
        off = grad(flat_star + delta, i) - gi - Hi @ delta
        return (
            sumH + Hi,
            sumH2 + Hi @ Hi,
            sumHg + Hi @ g_star[i],
            jnp.maximum(dev, jnp.max(jnp.abs(off))),
            jnp.maximum(scale, jnp.max(jnp.abs(gi)) + jnp.max(jnp.abs(Hi @ delta))),
        ), None

    d, dt = flat_star.size, flat_star.dtype
    zero = jnp.zeros((d, d), dt)
    init = (zero, zero, jnp.zeros(d, dt), jnp.zeros((), dt), jnp.zeros((), dt))
    (sumH, sumH2, sumHg, dev, scale), _ = jax.lax.scan(body, init, idx)
    H = sumH / n
    Q = sumH2 / n - H @ H
    c = sumHg / n  # (1/n) sum_i (H_i - H) g_i* = (1/n) sum_i H_i g_i*, as sum_i g_i* = 0
    v0 = jnp.mean(jnp.sum(g_star**2, axis=1))
    return v0, c, 0.5 * (Q + Q.T), dev / jnp.maximum(scale, 1.0)


class MinibatchNoise(AbstractNoise):
    r"""True sampling noise: the mean gradient over a random minibatch of a finite data set.

    The objective must be a finite sum $\mathcal{L} = \frac1n\sum_i\ell_i$ exposing
    ``n_examples`` ($n$, an int) and ``per_example_loss(theta, i)`` ($\ell_i(\theta)$ for a
    scalar integer index $i$). Each step draws a uniformly random subset of $B$ distinct
    indices (sampling *without* replacement within a step, via ``jax.random.choice(...,
    replace=False)``; steps are independent, not epochs), $u$ = the index array (shape
    ``(B,)``), and $G = \frac1B\sum_{i \in u}\nabla\ell_i(\theta)$.

    **Variance** (finite-population correction). With $g_i = \nabla\ell_i(\theta)$,
    $\bar g = \nabla\mathcal{L}$ and $S^2 = \frac1{n-1}\sum_i(g_i - \bar g)(g_i - \bar g)^\top$,
    $\Sigma(\theta) = \frac{1 - B/n}{B}S^2 = \kappa\,\frac1n\sum_i(g_i-\bar g)(g_i-\bar g)^\top$,
    $\kappa = \frac{n - B}{B(n-1)}$ ($\Sigma = 0$ for $B = n$).

    **Constants.** If every $\nabla\ell_i$ is affine (quadratic losses, e.g. least squares
    $\ell_i = \frac12(a_i^\top\theta - b_i)^2$), $g_i = g_i^* + H_ie$ with $e = \theta-\theta^*$,
    $g_i^* = \nabla\ell_i(\theta^*)$, $H_i = \nabla^2\ell_i$, $H = \frac1n\sum H_i$, so
    $\operatorname{tr}\Sigma = \kappa(v_0 + 2c^\top e + e^\top Qe)$ with
    $v_0 = \frac1n\sum\|g_i^*\|^2$, $c = \frac1n\sum(H_i - H)g_i^*$, $Q = \frac1n\sum(H_i-H)^2$
    (for least squares: $c = \frac1n\sum\|a_i\|^2r_i^*a_i$, $Q = M - H^2$, as for
    [`CurvatureNoise`][] with $1/B$ replaced by $\kappa$). [`assumption1`][] then returns the
    frontier constants ($\sigma_1^2 = 2\kappa\lambda_{\max}(Q)$ unless `sigma1` is passed,
    $\sigma_0^2 = \kappa v_0 + \kappa^2c^\top(\sigma_1^2I - \kappa Q)^{-1}c$), after checking
    numerically (concrete inputs, relative tolerance $\sqrt{\epsilon}$) that each $\nabla\ell_i$
    at $\theta^* + \delta$, $\delta = 1 + |\theta^*|$, equals its affine prediction (a necessary
    condition, not a proof); otherwise ``holds=None``. Cost: $n$ per-example Hessians, $O(d^2)$
    memory.

    $u$ is an integer array: $\partial G / \partial u$ (the $\sigma^u_t$ block) is not defined.

    **Arguments:** `batch_size` $B$, `data_size` $n$ ($1 \le B \le n$, checked at construction).
    """

    magnitude: ClassVar[str | None] = None  # the noise is the data's
    batch_size: int = eqx.field(static=True)
    data_size: int = eqx.field(static=True)

    def __init__(self, batch_size: int, data_size: int):
        self.batch_size, self.data_size = _check_data_size(batch_size, data_size)

    @property
    def kappa(self) -> float:
        r"""$\kappa = (n - B)/(B(n - 1))$: $\Sigma = \kappa\cdot$ (population covariance)."""
        n, B = self.data_size, self.batch_size
        return 0.0 if B == n else (n - B) / (B * (n - 1))

    def sample(self, key: PRNGKeyArray, theta: PyTree[Array]) -> Int[Array, " batch"]:
        return jax.random.choice(key, self.data_size, (self.batch_size,), replace=False)

    def zero(self, theta: PyTree[Array]) -> Int[Array, " batch"]:
        r"""No draw gives $G = \nabla\mathcal{L}$ unless $B = n$: examples $0..B-1$."""
        return jnp.arange(self.batch_size)

    def _per_example(
        self, objective: AbstractObjective, theta: PyTree[Array], idx: Array
    ) -> PyTree[Array]:
        _finite_sum(objective, self.data_size)
        return jax.vmap(jax.grad(objective.per_example_loss), in_axes=(None, 0))(theta, idx)

    def gradient(
        self, objective: AbstractObjective, theta: PyTree[Array], u: Int[Array, " batch"]
    ) -> PyTree[Array]:
        return jax.tree.map(lambda g: jnp.mean(g, axis=0), self._per_example(objective, theta, u))

    def _centred(self, objective: AbstractObjective, theta: PyTree[Array]) -> Array:
        grads = self._per_example(objective, theta, jnp.arange(self.data_size))
        flat = jax.vmap(lambda g: ravel_pytree(g)[0])(grads)
        return flat - jnp.mean(flat, axis=0, keepdims=True)

    def covariance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, "d d"]:
        D = self._centred(objective, theta)
        return self.kappa * D.T @ D / self.data_size

    def variance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, ""]:
        D = self._centred(objective, theta)
        return self.kappa * jnp.sum(D**2) / self.data_size

    def diffusion(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> lx.AbstractLinearOperator:
        r"""$B = \sqrt{\kappa/n}\,[g_i - \bar g]_{i \le n}$ ($d \times n$, $m = n$): the
        covariance estimated from the whole data set, $BB^\top = \Sigma(\theta)$ exactly."""
        D = self._centred(objective, theta)
        return lx.MatrixLinearOperator(math.sqrt(self.kappa / self.data_size) * D.T)

    def moments(self, objective: AbstractObjective) -> tuple[Array, Array, Array, Array]:
        r"""$(v_0, c, Q)$ of the affine-gradient model at $\theta^*$, and the largest relative
        deviation of the per-example gradients at $\theta^* + \delta$ from it (0 if affine)."""
        _finite_sum(objective, self.data_size)
        if objective.minimizer() is None:
            raise no_minimizer_error(objective, "MinibatchNoise.assumption1")
        return _affine_moments(objective, self.data_size)

    def assumption1(
        self, objective: AbstractObjective, *, sigma1: ScalarLike | None = None
    ) -> Assumption1:
        v0, c, Q, dev = self.moments(objective)
        dev_c = concrete_scalar(dev)
        if dev_c is None:
            return Assumption1(None, None, None, "unknown: call assumption1 outside jit/vmap")
        if dev_c > math.sqrt(np.finfo(np.asarray(dev).dtype).eps):
            return Assumption1(
                None,
                None,
                None,
                "unknown: per-example gradients are not affine, so the minibatch variance is no "
                "quadratic in theta - theta*; use variance() along the trajectory",
            )
        s0, s1 = frontier_constants(v0, c, Q, self.kappa, sigma1)
        return Assumption1(True, s0, s1, "upper bound: smallest sigma0 for this sigma1 (frontier)")

    def check_objective(self, objective: AbstractObjective) -> None:
        super().check_objective(objective)
        _finite_sum(objective, self.data_size)
