"""Extreme eigenvalues, matrix-free: :func:`extreme_eigenvalues` of a symmetric linear map
and :func:`hessian_extreme_eigenvalues` of the Hessian of a loss."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree
import numpy as np

from .._checks import check_callable
from ._checks import (
    _check_float_pytree,
    _check_function_output,
    _check_linear_map,
    _check_max_steps,
    _check_rtol,
    _check_v0,
)
from .krylov import _flat_function, default_v0
from .lanczos import _lanczos
from .results import EigResult


def _extreme_eigenvalues_impl(hvp, v0, max_steps, rtol):
    return _lanczos(hvp, v0, min(max_steps, v0.shape[0]), rtol)


_extreme_eigenvalues_jit = eqx.filter_jit(_extreme_eigenvalues_impl)


def _hessian_impl(loss, theta, max_steps, rtol, key):
    loss_flat, theta_flat = _flat_function(loss, theta)
    # Forward-over-reverse: linearise the gradient once; each HVP is then one JVP.
    _, hvp = jax.linearize(jax.grad(lambda z: loss_flat(z)[0]), theta_flat)
    v0 = default_v0(key, theta_flat.shape[0], theta_flat.dtype)
    return _lanczos(hvp, v0, min(max_steps, theta_flat.shape[0]), rtol)


_hessian_jit = eqx.filter_jit(_hessian_impl)


def extreme_eigenvalues(
    hvp: Callable[[Float[Array, " n"]], Float[Array, " n"]],
    v0: Float[Array, " n"] | Float[np.ndarray, " n"],
    *,
    max_steps: int = 64,
    rtol: float | Float[ArrayLike, ""] = 1e-6,
) -> EigResult:
    r"""Smallest and largest eigenvalue of a symmetric linear map, by Lanczos.

    Symmetric Lanczos tridiagonalisation $H Q_j = Q_j T_j + \beta_j q_{j+1} e_j^\top$ with full
    reorthogonalisation (Golub & Van Loan §10.1); the extreme eigenvalues of $T_j$ are the
    estimates. Tolerances are relative to the spectral radius estimate
    $\max(|\lambda_{\min}|, |\lambda_{\max}|)$.

    **Arguments:**

    - `hvp`: symmetric linear map $\mathbb{R}^n \to \mathbb{R}^n$ on flat vectors (symmetry is
      assumed, not checked).
    - `v0`: nonzero starting vector of shape `(n,)`; its dtype is used throughout.
    - `max_steps`: Krylov dimension cap, clipped to `n`.
    - `rtol`: relative tolerance in $(0, 1)$.

    **Returns:**

    An :class:`EigResult`.

    **Raises:**

    `ValueError`/`TypeError` before tracing, as :func:`operator_norm`; also if `hvp` does not map
    shape `(n,)` to `(n,)`.
    """
    _check_max_steps(max_steps)
    _check_rtol(rtol)
    _check_v0(v0)
    v0 = jnp.asarray(v0)
    _check_linear_map("hvp", hvp, v0, expected_shape=v0.shape)
    return _extreme_eigenvalues_jit(hvp, v0, max_steps, rtol)


def hessian_extreme_eigenvalues(
    loss: Callable[[PyTree[Array]], Float[Array, ""]],
    theta: PyTree[Float[ArrayLike, "..."]],
    *,
    max_steps: int = 64,
    rtol: float | Float[ArrayLike, ""] = 1e-6,
    key: PRNGKeyArray | None = None,
) -> EigResult:
    r"""Extreme eigenvalues of $\nabla^2 \ell(\theta)$, matrix-free.

    Hessian-vector products are forward-over-reverse (`jax.linearize` of `jax.grad`, i.e. the
    `jax.jvp` of the gradient with the linearisation stored once), fed to
    :func:`extreme_eigenvalues`. For a convex objective, `lambda_min` and `lambda_max` estimate
    the local strong convexity $\mu$ and smoothness $L$; note that the accuracy of
    `lambda_min` is relative to $L$, not to $\mu$.

    **Arguments:**

    - `loss`: scalar function of a pytree of floating arrays.
    - `theta`: the point (pytree).
    - `max_steps`, `rtol`: as in :func:`extreme_eigenvalues`.
    - `key`: PRNG key for a normal random start; `None` (default): the fixed deterministic
      pseudo-random start of :func:`jacobian_norm`.

    **Returns:**

    An :class:`EigResult` with flat vectors.
    """
    check_callable("loss", loss)
    _check_max_steps(max_steps)
    _check_rtol(rtol)
    _check_float_pytree("theta", theta)
    _check_function_output("loss", loss, theta, scalar=True)
    return _hessian_jit(loss, theta, max_steps, rtol, key)
