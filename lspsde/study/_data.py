r"""A study's dataset, described: every variable and coordinate with CF ``long_name`` and
``units``, and Monte Carlo estimates as ``mean``/``lower``/``upper`` triplets.

A study's ``run`` fills a [`Variables`][] and returns ``Variables.dataset(...)``; the builder
refuses a variable without a long name or units, so a result file always describes itself::

    v = Variables()
    v.add("diverged_fraction", ("eta",), frac, "fraction of paths that diverged", "1")
    v.estimate("stationary_level", ("eta",), stats, "tail mean of ||theta - theta*||^2", "1",
               bounds="stationary")  # stationary_level, stationary_lower, stationary_upper
    ds = v.dataset(coords={"eta": (etas, "step size eta", "1")}, attrs={...})

``stats`` is what the Monte Carlo helpers return (``_mc.path_mean``: a mapping with ``mean``,
``lower`` and ``upper``), one per grid point, or a mapping of arrays.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from lspsde._simulate import flag_attrs

__all__ = ["Variables", "missing_cf", "stack", "stack_estimates"]


def stack(values: Sequence[Any], shape: tuple[int, ...] | None = None) -> np.ndarray:
    """One array from one value (a number or an array) per grid point, the grid points in C
    order of ``shape`` (default: a 1-D grid): shape ``(*shape, *value_shape)``."""
    out = np.stack([np.asarray(v) for v in values])
    return out if shape is None else out.reshape((*shape, *out.shape[1:]))


def stack_estimates(
    stats: Sequence[Mapping[str, Any]], shape: tuple[int, ...] | None = None
) -> dict[str, np.ndarray]:
    """``{"mean", "lower", "upper"}`` float arrays from one estimate mapping per grid point (in
    C order of ``shape``; default: a 1-D grid); each part a number or an array (a curve)."""
    return {
        part: stack([np.asarray(s[part], dtype=float) for s in stats], shape)
        for part in ("mean", "lower", "upper")
    }


def _check_cf(name: str, long_name: str, units: str) -> None:
    if not isinstance(long_name, str) or not long_name.strip():
        raise ValueError(f"Study variable {name!r} needs a CF long_name (a non-empty string).")
    if not isinstance(units, str) or not units.strip():
        raise ValueError(
            f"Study variable {name!r} needs CF units (a non-empty string; '1' for a "
            "dimensionless number)."
        )


class Variables:
    """The data variables of one study's dataset, each with CF ``long_name`` and ``units``."""

    def __init__(self) -> None:
        self._vars: dict[str, tuple[tuple[str, ...], np.ndarray, dict[str, Any]]] = {}

    def add(
        self,
        name: str,
        dims: Sequence[str],
        values: Any,
        long_name: str,
        units: str = "1",
        *,
        flag_meanings: tuple[str, str] | None = None,
        **attrs: Any,
    ) -> None:
        """One variable ``name`` over ``dims`` (``units = "1"``: a dimensionless number, CF's
        convention). A boolean variable also gets CF ``flag_values``/``flag_meanings``:
        `flag_meanings` names false and true in one word each (default
        ``("not_<name>", "<name>")``)."""
        _check_cf(name, long_name, units)
        if name in self._vars:
            raise ValueError(f"Study variable {name!r} is added twice.")
        values = np.asarray(values)
        if values.dtype == bool:
            attrs = {**attrs, **flag_attrs(name, flag_meanings)}
        elif flag_meanings is not None:
            raise ValueError(
                f"flag_meanings is for boolean variables; {name!r} has dtype {values.dtype}."
            )
        self._vars[name] = (
            tuple(dims),
            values,
            {**attrs, "long_name": long_name, "units": units},
        )

    def estimate(
        self,
        name: str,
        dims: Sequence[str],
        stats: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        long_name: str,
        units: str = "1",
        *,
        bounds: str | None = None,
        level: float | None = None,
        interval: str = "Monte Carlo interval",
    ) -> None:
        """A Monte Carlo estimate: ``name`` (the mean) and its interval ends
        ``<bounds>_lower`` and ``<bounds>_upper`` (``bounds`` defaults to ``name``).

        `stats` is a mapping with ``mean``, ``lower`` and ``upper`` arrays, or a sequence of
        such mappings of floats, one per grid point (reshaped to the grid's shape, known from
        the length of ``dims`` only when it is 1-D: pass arrays for a larger grid). `level`,
        when given, is stored as the bounds' ``confidence_level``; `interval` names the kind
        of interval in their long names (a simultaneous band, a posterior interval...).
        """
        if not isinstance(stats, Mapping):
            stats = stack_estimates(stats)
        stem = bounds or name
        extra = {} if level is None else {"confidence_level": float(level)}
        self.add(name, dims, stats["mean"], long_name, units)
        for end in ("lower", "upper"):
            self.add(
                f"{stem}_{end}",
                dims,
                stats[end],
                f"{long_name}: {end} end of the {interval}",
                units,
                **extra,
            )

    def mean_energy(self, dims: Sequence[str], band: Any, *, level: float, interval: str) -> None:
        """The Monte Carlo curve of ``||theta^t - theta*||^2`` that the Section-5 studies share:
        ``mean_energy`` and its band ``energy_lower``/``energy_upper`` (an [`estimate`][])."""
        self.estimate(
            "mean_energy",
            dims,
            band,
            "MC mean of ||theta^t - theta*||^2",
            bounds="energy",
            level=level,
            interval=interval,
        )

    def dataset(
        self,
        coords: Mapping[str, tuple[Any, str, str]],
        attrs: Mapping[str, Any] | None = None,
    ) -> xr.Dataset:
        """The dataset, with ``coords`` given as ``{name: (values, long_name, units)}``."""
        coord_vars = {}
        for name, (values, long_name, units) in coords.items():
            _check_cf(name, long_name, units)
            coord_vars[name] = xr.Variable(
                (name,), np.asarray(values), {"long_name": long_name, "units": units}
            )
        ds = xr.Dataset(
            {k: xr.Variable(*v) for k, v in self._vars.items()},
            coords=coord_vars,
            attrs=dict(attrs or {}),
        )
        return ds


def missing_cf(ds: xr.Dataset) -> list[str]:
    """The names of the variables and coordinates of ``ds`` without ``long_name`` or
    ``units``, or booleans without ``flag_meanings`` (empty when the dataset describes
    itself)."""
    return [
        str(name)
        for name, var in ds.variables.items()
        if not var.attrs.get("long_name")
        or not var.attrs.get("units")
        or (var.dtype == bool and not var.attrs.get("flag_meanings"))
    ]
