"""Validation of the arguments of ``lspsde.lipschitz`` (runs before tracing).

Shapes and dtypes are static and always checked; values (finiteness, symmetry of a covariance)
only when they are concrete, as everywhere in lspsde (``lspsde._checks``).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import (
    _concrete_array,
    check_in_interval,
    check_positive,
    check_real_scalar,
    check_symmetric,
)

_ON_DEGENERATE = ("raise", "fallback")


def check_matrix(name: str, value: Any) -> jax.Array:
    """``value`` as a real floating array of shape ``(..., m, n)``, ``m, n >= 1``, finite when
    concrete."""
    if isinstance(value, str | bytes | bool) or value is None:
        raise TypeError(f"`{name}` must be a matrix (an array), got {value!r}.")
    try:
        dtype = jnp.result_type(value)
    except TypeError as err:
        raise TypeError(
            f"`{name}` must be a matrix (a JAX or NumPy array), got {type(value).__name__}."
        ) from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must have a real floating dtype, got {dtype}; cast it, e.g. "
            f"`jnp.asarray({name}, dtype=float)`"
            + (
                " (the singular values of a complex matrix are not treated here)."
                if jnp.issubdtype(dtype, jnp.complexfloating)
                else "."
            )
        )
    shape = tuple(np.shape(value))
    if len(shape) < 2:
        raise ValueError(
            f"`{name}` must be a matrix of shape (m, n) (or a batch of shape (..., m, n)), got "
            f"shape {shape}. A weight vector w is the matrix w[None, :] (or w[:, None])."
        )
    if 0 in shape:
        raise ValueError(
            f"`{name}` has zero size (shape {shape}): a layer without weights has no spectral "
            "norm. Drop it from the list of layers (its Lipschitz factor is not defined)."
        )
    value = jnp.asarray(value)
    arr = _concrete_array(value)
    if arr is not None and not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))
        raise ValueError(
            f"`{name}` is not finite: {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} NaN or "
            f"inf, the first at index {tuple(int(i) for i in bad[0])} (value "
            f"{arr[tuple(bad[0])]}). Check the step that produced it (a diverged SGD step?)."
        )
    return value


def check_same_shape(name: str, value: jax.Array, ref_name: str, ref: jax.Array) -> None:
    if value.shape != ref.shape:
        raise ValueError(
            f"`{name}` has shape {tuple(value.shape)} but `{ref_name}` has shape "
            f"{tuple(ref.shape)}; they must match (a perturbation, gradient or noise sample of "
            f"`{ref_name}` is a matrix of the same shape)."
        )


def check_gap_tol(gap_tol: Any) -> None:
    if gap_tol is None:
        return
    if isinstance(gap_tol, bool) or np.ndim(gap_tol) != 0:
        raise TypeError(f"`gap_tol` must be a real scalar in [0, 1) or None, got {gap_tol!r}.")
    check_in_interval(
        "gap_tol",
        gap_tol,
        0.0,
        1.0,
        closed_low=True,
        fix="It is the relative gap (sigma1 - sigma2) / sigma1 below which the top singular "
        "value counts as degenerate; None is sqrt(eps) of the dtype.",
    )


def check_on_degenerate(on_degenerate: Any) -> None:
    if not isinstance(on_degenerate, str) or on_degenerate not in _ON_DEGENERATE:
        raise ValueError(
            f"Unknown `on_degenerate` {on_degenerate!r}; choose one of {_ON_DEGENERATE}."
        )


def check_covariance(cov: Any, m: int, n: int, dtype: Any) -> jax.Array:
    """A per-entry variance (scalar, >= 0) or an ``(m n, m n)`` symmetric PSD covariance of the
    row-major ``vec(E) = E.reshape(-1)``."""
    if isinstance(cov, str | bytes | bool) or cov is None:
        raise TypeError(f"`cov` must be a scalar variance or a covariance matrix, got {cov!r}.")
    try:
        cdtype = jnp.result_type(cov)
    except TypeError as err:
        raise TypeError(f"`cov` must be an array or a number, got {type(cov).__name__}.") from err
    if not (jnp.issubdtype(cdtype, jnp.floating) or jnp.issubdtype(cdtype, jnp.integer)):
        raise TypeError(f"`cov` must be real, got dtype {cdtype}.")
    shape = tuple(np.shape(cov))
    d = m * n
    if shape not in ((), (d, d)):
        raise ValueError(
            f"`cov` must be a scalar (the variance s^2 of i.i.d. entries) or the ({d}, {d}) "
            f"covariance of vec(E) = E.reshape(-1) (row-major) for a ({m}, {n}) matrix, got "
            f"shape {shape}. For independent entries with variances V (shape ({m}, {n})) pass "
            "`jnp.diag(V.reshape(-1))`."
        )
    cov = jnp.asarray(cov, dtype=dtype)
    arr = _concrete_array(cov)
    if arr is None:
        return cov
    if not np.all(np.isfinite(arr)):
        raise ValueError("`cov` is not finite (it holds NaN or inf).")
    if arr.ndim == 0:
        if arr < 0:
            raise ValueError(f"`cov` is a variance and must be >= 0, got {float(arr)}.")
        return cov
    check_symmetric("cov", arr)
    lam_min = float(np.linalg.eigvalsh(0.5 * (arr + arr.T))[0])
    tol = float(np.sqrt(np.finfo(arr.dtype).eps) * max(1.0, np.max(np.abs(arr))))
    if lam_min < -tol:
        raise ValueError(
            f"`cov` is not positive semi-definite (smallest eigenvalue {lam_min:.3g}); a "
            "covariance is. Build it as L @ L.T."
        )
    return cov


def check_eta(eta: Any) -> None:
    check_real_scalar("eta", eta)
    check_positive("eta", eta, fix="It is the SGD step size in W' = W - eta (G + xi).")
