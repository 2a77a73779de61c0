"""Operator norms, matrix-free: :func:`operator_norm` of a linear map given by products and
:func:`jacobian_norm` of the Jacobian of a function."""

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
    _check_method,
    _check_rtol,
    _check_v0,
)
from .golub_kahan import _golub_kahan
from .krylov import _flat_function, default_v0
from .power import _power
from .results import NormResult


def _norm_result(mv, rmv, sigma, v, n_steps, converged):
    w = rmv(mv(v))
    s2 = sigma**2
    residual = jnp.linalg.norm(w - s2 * v) / jnp.where(s2 > 0, s2, 1)
    return NormResult(
        value=sigma, vector=v, n_steps=n_steps, converged=converged, residual=residual
    )


def operator_norm_impl(mv, rmv, v0, method, max_steps, rtol):
    if rmv is None:
        transpose = jax.linear_transpose(mv, jax.ShapeDtypeStruct(v0.shape, v0.dtype))

        def rmv(u):
            return transpose(u)[0]

    if method == "lanczos":
        k = min(max_steps, v0.shape[0])
        sigma, v, j, done = _golub_kahan(mv, rmv, v0, k, rtol)
    else:
        sigma, v, j, done = _power(mv, rmv, v0, max_steps, rtol)
    return _norm_result(mv, rmv, sigma, v, j, done)


_operator_norm_jit = eqx.filter_jit(operator_norm_impl)


def _jacobian_norm_impl(f, x, method, max_steps, rtol, v0, key):
    f_flat, x_flat = _flat_function(f, x)
    _, lin = jax.linearize(f_flat, x_flat)
    transpose = jax.linear_transpose(lin, x_flat)

    def rmv(u):
        return transpose(u)[0]

    if v0 is None:
        v0 = default_v0(key, x_flat.shape[0], x_flat.dtype)
    return operator_norm_impl(lin, rmv, v0.astype(x_flat.dtype), method, max_steps, rtol)


_jacobian_norm_jit = eqx.filter_jit(_jacobian_norm_impl)


def operator_norm(
    mv: Callable[[Float[Array, " n"]], Float[Array, " m"]],
    v0: Float[Array, " n"] | Float[np.ndarray, " n"],
    *,
    rmv: Callable[[Float[Array, " m"]], Float[Array, " n"]] | None = None,
    method: str = "lanczos",
    max_steps: int = 64,
    rtol: float | Float[ArrayLike, ""] = 1e-6,
) -> NormResult:
    r"""Operator 2-norm $\|A\|_2 = \sigma_1(A)$ of a linear map given only by products.

    Golub–Kahan–Lanczos bidiagonalisation (Golub & Kahan 1965; Golub & Van Loan §10.4) with full
    reorthogonalisation, or power iteration on $A^\top A$. See the module docstring for the
    stopping rule.

    **Arguments:**

    - `mv`: the linear map $v \mapsto A v$, $\mathbb{R}^n \to \mathbb{R}^m$, on flat vectors of
      `v0`'s dtype.
    - `v0`: nonzero starting vector, shape `(n,)`; its dtype is used throughout (float32 and
      float64 both work). A random normal vector is the safe choice: a `v0` orthogonal to the top
      right singular vector can only find a smaller singular value.
    - `rmv`: the transpose $u \mapsto A^\top u$; if `None`, `jax.linear_transpose(mv, v0)`.
    - `method`: `"lanczos"` (default) or `"power"`.
    - `max_steps`: iteration cap; Lanczos preallocates `(min(max_steps, n), n)` and
      `(min(max_steps, n), m)` bases and clips `max_steps` to `n` (the Krylov space is then
      exhausted and the answer exact).
    - `rtol`: relative tolerance in $(0, 1)$.

    **Returns:**

    A :class:`NormResult`; non-convergence is `converged=False`, never an exception. The zero
    operator gives `value=0`, `converged=True`, no NaN.

    **Raises:**

    `ValueError`/`TypeError`, before tracing, for an unknown `method`, `max_steps` not an int
    >= 1, `rtol` outside $(0, 1)$, `v0` not a nonzero 1-D floating array, or `mv`/`rmv` not
    returning 1-D vectors of `v0`'s dtype.
    """
    _check_method(method)
    _check_max_steps(max_steps)
    _check_rtol(rtol)
    _check_v0(v0)
    v0 = jnp.asarray(v0)
    out = _check_linear_map("mv", mv, v0)
    if rmv is not None:
        _check_linear_map("rmv", rmv, out, expected_shape=v0.shape)
    return _operator_norm_jit(mv, rmv, v0, method, max_steps, rtol)


def jacobian_norm(
    f: Callable[[PyTree[Array]], PyTree[Array]],
    x: PyTree[Float[ArrayLike, "..."]],
    *,
    method: str = "lanczos",
    max_steps: int = 64,
    rtol: float | Float[ArrayLike, ""] = 1e-6,
    v0: Float[Array, " n"] | None = None,
    key: PRNGKeyArray | None = None,
) -> NormResult:
    r"""$\|\partial f / \partial x\,(x)\|_2$, matrix-free.

    $f$ is linearised once at $x$ (`jax.linearize`), transposed with `jax.linear_transpose`, and
    both pytrees are flattened with `jax.flatten_util.ravel_pytree`, so the iteration of
    :func:`operator_norm` runs on flat vectors. The Jacobian is never materialised: memory is
    $O(n \cdot \text{max\_steps})$ plus the linearisation's residuals.

    **Arguments:**

    - `f`: function from a pytree of floating arrays to a pytree of floating arrays.
    - `x`: the point (pytree); its flattened dtype is used throughout.
    - `method`, `max_steps`, `rtol`: as in :func:`operator_norm`.
    - `v0`: flat starting vector of shape `(n,)`, `n` the total size of `x`. Default: a normal
      vector drawn from `key`, or, if `key` is `None`, a fixed deterministic pseudo-random
      vector (an index hash; cheaper to compile than `jax.random`).
    - `key`: PRNG key for the default `v0`.

    **Returns:**

    A :class:`NormResult` whose `vector` is flat (unflatten with `ravel_pytree(x)[1]`).

    **Raises:**

    As :func:`operator_norm`; also `TypeError` for non-floating leaves of `x` or of `f(x)`.
    """
    check_callable("f", f)
    _check_method(method)
    _check_max_steps(max_steps)
    _check_rtol(rtol)
    _check_float_pytree("x", x)
    _check_function_output("f", f, x)
    if v0 is not None:
        _check_v0(v0)
        n = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(x))
        if v0.shape[0] != n:
            raise ValueError(
                f"`v0` has length {v0.shape[0]} but `x` has {n} entries in total; pass a flat "
                "vector of that length (see `jax.flatten_util.ravel_pytree`)."
            )
    return _jacobian_norm_jit(f, x, method, max_steps, rtol, v0, key)
