"""Checks of user input that run before anything is traced.

Every message names the offending value and says how to fix it. Values that are traced (inside
``jit``/``vmap``) cannot be checked here and are passed through unchanged; such values are checked
where they are used with ``eqx.error_if`` or reported as result codes.
"""

from collections.abc import Callable
import math
from typing import Any

import jax
import numpy as np


def _concrete(value: Any) -> float | None:
    """Return ``value`` as a Python float if it is concrete and scalar, else ``None``."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        arr = np.asarray(value)
    except Exception:
        return None
    if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number):
        return None
    return float(arr)


def _concrete_array(value: Any) -> np.ndarray | None:
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value, dtype=float)
    except Exception:
        return None


def check_positive(name: str, value: Any, *, fix: str = "", allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless every concrete entry of ``value`` is finite and > 0 (or >= 0)."""
    arr = _concrete_array(value)
    if arr is None:
        return
    bad = ~np.isfinite(arr) | ((arr < 0) if allow_zero else (arr <= 0))
    if np.any(bad):
        shown = arr if arr.ndim == 0 else arr[bad][:5]
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(
            f"`{name}` must be finite and {kind}, got {shown!r}." + (f" {fix}" if fix else "")
        )


def check_positive_int(name: str, value: Any, *, minimum: int = 1, fix: str = "") -> int:
    """Return ``value`` as an ``int`` after checking it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"`{name}` must be a Python int, got {value!r} of type {type(value).__name__}."
            + (f" {fix}" if fix else "")
        )
    if value < minimum:
        raise ValueError(
            f"`{name}` must be >= {minimum}, got {value}." + (f" {fix}" if fix else "")
        )
    return int(value)


def check_in_interval(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    closed_low: bool = False,
    closed_high: bool = False,
    fix: str = "",
) -> None:
    """Raise ``ValueError`` unless concrete ``value`` lies in the interval (bounds as flagged)."""
    arr = _concrete_array(value)
    if arr is None:
        return
    ok_low = arr >= low if closed_low else arr > low
    ok_high = arr <= high if closed_high else arr < high
    ok = ok_low & ok_high & np.isfinite(arr)
    if not np.all(ok):
        lb = "[" if closed_low else "("
        rb = "]" if closed_high else ")"
        raise ValueError(
            f"`{name}` must lie in {lb}{low}, {high}{rb}, got {arr!r}." + (f" {fix}" if fix else "")
        )


def check_callable(name: str, value: Any) -> None:
    if not isinstance(value, Callable):
        raise TypeError(f"`{name}` must be callable, got {value!r} of type {type(value).__name__}.")


def is_finite_number(value: Any) -> bool:
    v = _concrete(value)
    return v is not None and math.isfinite(v)


def symmetry_tolerance(M: np.ndarray) -> float:
    """Asymmetry allowed in a symmetric input: sqrt(eps) relative to the largest entry (a
    float32 Hessian from ``jax.hessian`` is symmetric to about 1e-7, not to 1e-12)."""
    return float(np.sqrt(np.finfo(M.dtype).eps) * max(1.0, np.max(np.abs(M), initial=0.0)))


def check_symmetric(name: str, M: Any) -> None:
    """Raise ``ValueError`` if concrete ``M`` is not symmetric to ``symmetry_tolerance``."""
    Mc = _concrete_array(M)
    if Mc is None:
        return
    Mc = np.asarray(M)
    asym = float(np.max(np.abs(Mc - Mc.T), initial=0.0))
    if asym > symmetry_tolerance(Mc):
        raise ValueError(
            f"`{name}` is not symmetric (max |H - H^T| = {asym:.3g}); a Hessian is "
            "symmetric. Pass (H + H^T) / 2 if the asymmetry is intended to be dropped."
        )


def check_real_scalar(name: str, value: Any) -> None:
    """A hyperparameter must be one real number (concrete or traced), not a string, a boolean,
    a complex number or an array: a grid of values is a sweep."""
    dtype = getattr(value, "dtype", None)
    bad_type = isinstance(value, str | bytes | bool | complex) or (
        dtype is not None
        and (np.issubdtype(dtype, np.complexfloating) or np.issubdtype(dtype, np.bool_))
    )
    if bad_type or not isinstance(value, int | float | jax.Array | np.ndarray | np.number):
        raise TypeError(
            f"`{name}` must be a real number, got {value!r} of type {type(value).__name__}."
        )
    if np.ndim(value) != 0:
        raise ValueError(
            f"`{name}` must be a scalar, got shape {np.shape(value)}. To run a grid of values, "
            "sweep them, e.g. `lspsde.Sweep.of(lambda v: lspsde.SGD(v), values, "
            f'name="{name}")` with the module you are building (one compiled program, common '
            "random numbers); a step size is one number per step, not one per coordinate."
        )
