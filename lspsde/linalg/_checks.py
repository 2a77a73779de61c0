"""Validation of the arguments of ``lspsde.linalg`` (runs before tracing)."""

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_callable, check_in_interval, check_positive_int

_METHODS = ("lanczos", "power")


def _check_method(method):
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"Unknown `method` {method!r}; choose one of {_METHODS}.")


def _check_max_steps(max_steps):
    check_positive_int(
        "max_steps", max_steps, fix="Pass a Python int >= 1 (the Krylov dimension / iterations)."
    )


def _check_rtol(rtol):
    if isinstance(rtol, bool) or not (
        isinstance(rtol, int | float | np.number) or (hasattr(rtol, "shape") and rtol.shape == ())
    ):
        raise TypeError(f"`rtol` must be a real scalar in (0, 1), got {rtol!r}.")
    check_in_interval("rtol", rtol, 0.0, 1.0, fix="Use e.g. rtol=1e-6 (float64) or 1e-4 (float32).")


def _check_v0(v0, name="v0"):
    if not hasattr(v0, "shape") or not hasattr(v0, "dtype"):
        raise TypeError(f"`{name}` must be a JAX or NumPy array, got {type(v0).__name__}.")
    if v0.ndim != 1:
        raise ValueError(
            f"`{name}` must be a flat 1-D vector of shape (n,), got shape {tuple(v0.shape)}. "
            "Flatten it first (e.g. `jax.flatten_util.ravel_pytree`) and make `mv` act on flat "
            "vectors."
        )
    if not jnp.issubdtype(v0.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must have a real floating dtype, got {v0.dtype}. Cast it, e.g. "
            f"`{name}.astype(jnp.float64)`."
        )
    if v0.shape[0] == 0:
        raise ValueError(f"`{name}` must be non-empty, got shape {tuple(v0.shape)}.")
    if not isinstance(v0, jax.core.Tracer):
        arr = np.asarray(v0)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"`{name}` must be finite; it contains NaN or inf.")
        if not np.any(arr != 0):
            raise ValueError(
                f"`{name}` is the zero vector; the Krylov space it spans is empty. Pass a "
                "nonzero (e.g. random normal) starting vector."
            )


def _check_linear_map(name, fn, v, expected_shape=None):
    """``fn(v)`` must be a flat floating vector of ``v``'s dtype (checked with eval_shape)."""
    check_callable(name, fn)
    out = jax.eval_shape(fn, v)
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise TypeError(
            f"`{name}` must return a single flat array, got a pytree {out}. Flatten the output "
            "(e.g. `jax.flatten_util.ravel_pytree`) or use `jacobian_norm`, which does."
        )
    if len(out.shape) != 1:
        raise ValueError(
            f"`{name}` must return a 1-D vector, got shape {out.shape} for input shape "
            f"{tuple(v.shape)}. Reshape the output to (m,) inside `{name}`."
        )
    if expected_shape is not None and out.shape != expected_shape:
        raise ValueError(
            f"`{name}` must return shape {expected_shape} (the input shape of `mv`), got "
            f"{out.shape}. Check that it is the transpose of `mv`."
        )
    if out.dtype != v.dtype:
        raise TypeError(
            f"`{name}` returns dtype {out.dtype} but acts on dtype {v.dtype}; cast its output "
            f"with `.astype({v.dtype})` (or pass `v0` in {out.dtype})."
        )
    return out


def _check_float_pytree(name, tree):
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"`{name}` has no array leaves; nothing to differentiate.")
    for leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            dtype = np.asarray(leaf).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"Every leaf of `{name}` must have a real floating dtype, got {dtype}. Cast "
                "integer leaves to float, or close over them in the function instead."
            )


def _check_function_output(name, f, x, *, scalar=False):
    out = jax.eval_shape(f, x)
    leaves = jax.tree_util.tree_leaves(out)
    if not leaves:
        raise ValueError(f"`{name}` returned no arrays.")
    for leaf in leaves:
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"`{name}` must return floating arrays, got dtype {leaf.dtype}.")
    if scalar and not (len(leaves) == 1 and leaves[0].shape == ()):
        raise ValueError(
            f"`{name}` must return a scalar, got {out}. Reduce it (e.g. `.sum()` or `.mean()`)."
        )
