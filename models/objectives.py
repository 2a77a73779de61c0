r"""Convex objectives with known $\mu$, $L$ and minimiser $\theta^*$ (Assumption 1), and data.

| objective | $\mathcal{L}(\theta)$ | $\mu$ | $L$ |
|---|---|---|---|
| [`Quadratic`][models.objectives.Quadratic] | $\frac12(\theta-\theta^*)^\top H(\theta-\theta^*)$ | $\lambda_{\min}(H)$ | $\lambda_{\max}(H)$ (exact) |
| [`LeastSquares`][models.objectives.LeastSquares] | $\frac1{2n}\|A\theta - b\|^2$ | $\sigma_{\min}(A)^2/n$ | $\sigma_{\max}(A)^2/n$ (exact) |
| [`LogisticRegression`][models.objectives.LogisticRegression] | $\frac1n\sum_i \log(1 + e^{-s_i x_i^\top\theta}) + \frac{\lambda}{2}\|\theta\|^2$ | $\lambda$ | $\lambda + \lambda_{\max}(X^\top X)/(4n)$ (global bounds) |
"""  # noqa: E501

import functools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray
import numpy as np
import optimistix as optx

from lspsde._checks import _concrete_array, check_positive, check_positive_int, check_symmetric
from lspsde._custom_types import ScalarLike
from lspsde.objectives import AbstractObjective
from lspsde.representation import Feedforward

from .mlp import mlp

__all__ = [
    "LeastSquares",
    "LogisticRegression",
    "Quadratic",
    "RegressionData",
    "TeacherStudentData",
    "synthetic_regression",
    "teacher_student",
]


class _KnownConstants(AbstractObjective):
    r"""An objective whose minimiser $\theta^*$, $\mu$ and $L$ are fields set at construction."""

    theta_star: eqx.AbstractVar[Float[Array, " d"]]
    mu: eqx.AbstractVar[Float[Array, ""]]
    L: eqx.AbstractVar[Float[Array, ""]]

    def minimizer(self) -> Float[Array, " d"]:
        return self.theta_star

    def strong_convexity(self) -> Float[Array, ""]:
        return self.mu

    def smoothness(self) -> Float[Array, ""]:
        return self.L


class Quadratic(_KnownConstants):
    r"""$\mathcal{L}(\theta) = \frac12 (\theta - \theta^*)^\top H (\theta - \theta^*)$.

    $\nabla^2\mathcal{L} = H$ everywhere, so $\mu = \lambda_{\min}(H)$ and
    $L = \lambda_{\max}(H)$ are exact (computed with ``eigvalsh`` at construction).

    **Arguments:**

    - `hessian`: $H$, symmetric positive definite, shape ``(d, d)`` (symmetrised as
      $\frac12(H + H^\top)$ after the check, to absorb rounding).
    - `minimizer`: $\theta^*$, shape ``(d,)``.

    **Raises:** ``ValueError`` if (concrete) $H$ is not symmetric or not positive definite.
    """

    hessian: Float[Array, "d d"]
    theta_star: Float[Array, " d"]
    mu: Float[Array, ""]
    L: Float[Array, ""]

    def __init__(self, hessian: Float[ArrayLike, "d d"], minimizer: Float[ArrayLike, " d"]):
        H = jnp.asarray(hessian, dtype=float)
        theta_star = jnp.asarray(minimizer, dtype=float)
        if H.ndim != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"`hessian` must be a square (d, d) matrix, got shape {H.shape}.")
        if theta_star.shape != H.shape[:1]:
            raise ValueError(
                f"`minimizer` must have shape ({H.shape[0]},) to match the Hessian, got "
                f"{theta_star.shape}."
            )
        check_symmetric("hessian", H)
        H = 0.5 * (H + H.T)
        eigs = jnp.linalg.eigvalsh(H)
        lam_min = _concrete_array(eigs[0])
        if lam_min is not None and not lam_min > 0:
            raise ValueError(
                f"`hessian` is not positive definite: lambda_min(H) = {float(lam_min):.6g} <= 0, "
                "so the quadratic is not strongly convex (mu = lambda_min(H) must be > 0, "
                "Assumption 1). Add a multiple of the identity, or use a positive definite H."
            )
        self.hessian, self.theta_star = H, theta_star
        self.mu, self.L = eigs[0], eigs[-1]

    def loss(self, theta: Float[Array, " d"]) -> Float[Array, ""]:
        e = theta - self.theta_star
        return 0.5 * e @ (self.hessian @ e)

    def gradient(self, theta: Float[Array, " d"]) -> Float[Array, " d"]:
        return self.hessian @ (theta - self.theta_star)


@jax.jit
def _least_squares_setup(A: Array, b: Array) -> tuple[Array, Array]:
    return jnp.linalg.svd(A, compute_uv=False), jnp.linalg.lstsq(A, b)[0]


class LeastSquares(_KnownConstants):
    r"""$\mathcal{L}(\theta) = \frac{1}{2n}\|A\theta - b\|^2$, $\nabla^2\mathcal{L} = A^\top A/n$.

    $\theta^*$ is the least-squares solution (``lstsq``); $\mu = \sigma_{\min}(A)^2/n$ and
    $L = \sigma_{\max}(A)^2/n$ are exact (singular values of $A$, more accurate than the
    eigenvalues of $A^\top A$).

    **Arguments:** `A` (shape ``(n, d)``, full column rank), `b` (shape ``(n,)``).

    **Raises:** ``ValueError`` if (concrete) $A$ is rank deficient: then $\mu = 0$.
    """

    A: Float[Array, "n d"]
    b: Float[Array, " n"]
    theta_star: Float[Array, " d"]
    mu: Float[Array, ""]
    L: Float[Array, ""]

    def __init__(self, A: Float[ArrayLike, "n d"], b: Float[ArrayLike, " n"]):
        A, b = jnp.asarray(A, dtype=float), jnp.asarray(b, dtype=float)
        if A.ndim != 2 or b.shape != A.shape[:1]:
            raise ValueError(
                f"`A` must be (n, d) and `b` (n,), got shapes {A.shape} and {b.shape}."
            )
        n, d = A.shape
        s, theta_star = _least_squares_setup(A, b)
        sc = _concrete_array(s)
        if sc is not None:
            tol = sc[0] * max(n, d) * np.finfo(sc.dtype).eps if sc.size else 0.0
            rank = int(np.sum(sc > tol))
            if rank < d:
                raise ValueError(
                    f"`A` has rank {rank} < d = {d} columns: A^T A / n is singular, so mu = 0 "
                    "and the objective is not strongly convex (Assumption 1). Use n >= d "
                    "linearly independent rows, drop dependent columns, or add a ridge term."
                )
        self.A, self.b = A, b
        self.theta_star = theta_star
        self.mu, self.L = s[-1] ** 2 / n, s[0] ** 2 / n

    def loss(self, theta: Float[Array, " d"]) -> Float[Array, ""]:
        r = self.A @ theta - self.b
        return 0.5 * (r @ r) / self.A.shape[0]

    def gradient(self, theta: Float[Array, " d"]) -> Float[Array, " d"]:
        return self.A.T @ (self.A @ theta - self.b) / self.A.shape[0]

    @property
    def n_examples(self) -> int:
        """$n$: the loss is the mean of ``per_example_loss`` over $i < n$ (minibatch noise)."""
        return self.A.shape[0]

    def per_example_loss(
        self, theta: Float[Array, " d"], i: Int[ArrayLike, ""]
    ) -> Float[Array, ""]:
        r"""$\ell_i(\theta) = \frac12 (a_i^\top\theta - b_i)^2$."""
        return 0.5 * (self.A[i] @ theta - self.b[i]) ** 2


def _logistic_loss(theta: Array, args: tuple[Array, Array, Array]) -> Array:
    X, s, l2 = args
    return jnp.mean(jax.nn.softplus(-s * (X @ theta))) + 0.5 * l2 * (theta @ theta)


def _logistic_grad(theta: Array, args: tuple[Array, Array, Array]) -> Array:
    return jax.grad(_logistic_loss)(theta, args)


@eqx.filter_jit
def _logistic_minimiser(X: Array, s: Array, l2: Array) -> Array:
    # BFGS (line search: globally convergent on this strongly convex problem) stalls near
    # |grad| ~ 1e-9 on its Cauchy criterion; a few Newton steps on grad = 0 (the Hessian is
    # SPD) then reach machine precision quadratically.
    args = (X, s, l2)
    y0 = jnp.zeros(X.shape[1], X.dtype)
    rough = optx.minimise(
        _logistic_loss, optx.BFGS(rtol=1e-8, atol=1e-8), y0, args, max_steps=10_000
    )
    fine = optx.root_find(
        _logistic_grad, optx.Newton(rtol=1e-13, atol=1e-13), rough.value, args, max_steps=100
    )
    return fine.value


class LogisticRegression(_KnownConstants):
    r"""$\mathcal{L}(\theta) = \frac1n\sum_i \log(1 + e^{-s_i x_i^\top\theta}) +
    \frac{\lambda}{2}\|\theta\|^2$ with labels $s_i \in \{-1, 1\}$.

    $\nabla^2\mathcal{L}(\theta) = \frac1n X^\top \operatorname{diag}(p_i(1-p_i)) X + \lambda I$
    with $p_i(1 - p_i) \in (0, \tfrac14]$, so the *global* constants of Assumption 1 are
    $\mu = \lambda$ (``strong_convexity()``, a lower bound, approached far from the data) and
    $L = \lambda + \lambda_{\max}(X^\top X)/(4n)$ (``smoothness()``, an upper bound, attained
    only where every margin is 0). Use ``lspsde.constants.objective_constants`` for local values.
    $\theta^*$ is computed at construction with optimistix (BFGS, then Newton on
    $\nabla\mathcal{L} = 0$), to machine precision.

    **Arguments:**

    - `X`: features, shape ``(n, d)``.
    - `y`: labels in $\{0, 1\}$ or $\{-1, 1\}$, shape ``(n,)``.
    - `l2`: the ridge coefficient $\lambda > 0$ (it is what makes $\mu > 0$).
    """

    X: Float[Array, "n d"]
    s: Float[Array, " n"]
    l2: Float[Array, ""]
    theta_star: Float[Array, " d"]
    mu: Float[Array, ""]
    L: Float[Array, ""]

    def __init__(self, X: Float[ArrayLike, "n d"], y: ArrayLike, l2: ScalarLike):
        check_positive(
            "l2",
            l2,
            fix="The ridge l2 > 0 is what makes logistic regression strongly convex (mu = l2).",
        )
        X, y = jnp.asarray(X, dtype=float), jnp.asarray(y)
        if X.ndim != 2 or y.shape != X.shape[:1]:
            raise ValueError(f"`X` must be (n, d) and `y` (n,), got {X.shape} and {y.shape}.")
        yc = _concrete_array(y)
        if yc is not None:
            values = set(np.unique(yc).tolist())
            if values <= {0.0, 1.0}:
                y = 2.0 * y - 1.0
            elif not values <= {-1.0, 1.0}:
                raise ValueError(
                    f"Labels must all be in {{0, 1}} or all in {{-1, 1}}, got values "
                    f"{sorted(values)[:6]}."
                )
        self.X, self.s = X, jnp.asarray(y, dtype=float)
        self.l2 = jnp.asarray(l2, dtype=float)
        n = X.shape[0]
        self.mu = self.l2
        self.L = self.l2 + jnp.linalg.svd(X, compute_uv=False)[0] ** 2 / (4.0 * n)
        self.theta_star = _logistic_minimiser(self.X, self.s, self.l2)

    def loss(self, theta: Float[Array, " d"]) -> Float[Array, ""]:
        return _logistic_loss(theta, (self.X, self.s, self.l2))

    @property
    def n_examples(self) -> int:
        """$n$: the loss is the mean of ``per_example_loss`` over $i < n$ (minibatch noise)."""
        return self.X.shape[0]

    def per_example_loss(
        self, theta: Float[Array, " d"], i: Int[ArrayLike, ""]
    ) -> Float[Array, ""]:
        r"""$\log(1 + e^{-s_i x_i^\top\theta}) + \frac{\lambda}{2}\|\theta\|^2$ (the ridge in
        every term, so that the mean is the objective)."""
        return jax.nn.softplus(-self.s[i] * (self.X[i] @ theta)) + 0.5 * self.l2 * (theta @ theta)


@eqx.filter_jit
def _teacher_arrays(
    teacher: Feedforward, key: PRNGKeyArray, n: int, noise_std: Array
) -> tuple[Array, Array]:
    d_in, d_out = teacher.widths[0], teacher.widths[-1]
    z = jax.random.normal(key, (n * (d_in + d_out),))
    inputs = z[: n * d_in].reshape(n, d_in)
    noise = z[n * d_in :].reshape(n, d_out)
    return inputs, jax.vmap(teacher)(inputs) + noise_std * noise


class RegressionData(NamedTuple):
    """``(X, y, theta_true)``, as returned by `synthetic_regression`."""

    X: Float[Array, "n d"]
    y: Float[Array, " n"]
    theta_true: Float[Array, " d"]


class TeacherStudentData(NamedTuple):
    """``(inputs, targets, teacher)`` of [`teacher_student`][models.objectives.teacher_student]."""

    inputs: Float[Array, "n d_in"]
    targets: Float[Array, "n d_out"]
    teacher: Feedforward


def synthetic_regression(
    key: PRNGKeyArray, n: int, d: int, noise_std: ScalarLike = 0.1
) -> RegressionData:
    r"""Linear-Gaussian data $y = X\theta_{\rm true} + \varepsilon$, $X_{ij}, \theta_{{\rm true},j}
    \sim \mathcal{N}(0, 1)$, $\varepsilon \sim \mathcal{N}(0, \text{noise\_std}^2 I)$.

    Feed ``LeastSquares(X, y)``; for $n \ge d$ $X$ has full column rank with probability one.
    """
    n, d = check_positive_int("n", n), check_positive_int("d", d)
    check_positive("noise_std", noise_std, allow_zero=True, fix="Use noise_std >= 0.")
    X, y, theta = _regression_arrays(key, n, d, jnp.asarray(noise_std, float))
    return RegressionData(X, y, theta)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _regression_arrays(
    key: PRNGKeyArray, n: int, d: int, noise_std: Array
) -> tuple[Array, Array, Array]:
    z = jax.random.normal(key, (n * d + d + n,))  # one draw: one threefry kernel to compile
    X, theta, eps = z[: n * d].reshape(n, d), z[n * d : n * d + d], z[n * d + d :]
    return X, X @ theta + noise_std * eps, theta


def teacher_student(
    key: PRNGKeyArray,
    n: int,
    d_in: int,
    d_out: int,
    *,
    hidden: tuple[int, ...] = (32,),
    activation: str = "tanh",
    init: str = "gaussian",
    sigma_w: ScalarLike = 1.0,
    rho: ScalarLike = 1.0,
    noise_std: ScalarLike = 0.0,
) -> TeacherStudentData:
    r"""Inputs $x_i \sim \mathcal{N}(0, I_{d_{\rm in}})$ labelled by a random teacher MLP
    $(d_{\rm in} \to \text{hidden} \to d_{\rm out})$ (linear last layer), plus Gaussian noise.

    **Returns:** ``(inputs, targets, teacher)``; fit a student with
    ``lspsde.objectives.SupervisedLoss(student, inputs, targets)``.
    """
    n = check_positive_int("n", n)
    check_positive("noise_std", noise_std, allow_zero=True, fix="Use noise_std >= 0.")
    kt, kx = jax.random.split(key)
    teacher = mlp(
        kt,
        (d_in, *hidden, d_out),
        activation=activation,
        init=init,
        sigma_w=sigma_w,
        rho=rho,
        final_activation=False,
    )
    inputs, targets = _teacher_arrays(teacher, kx, n, jnp.asarray(noise_std, float))
    return TeacherStudentData(inputs, targets, teacher)
