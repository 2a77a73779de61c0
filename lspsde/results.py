r"""``to_datatree``: one free function from lspsde result objects to ArviZ 1.x ``DataTree``\ s.

As lineax's ``linearise``/``materialise``, a ``functools.singledispatch`` function on the type of
its argument: JAX kernels return arrays and small result objects, and conversion to
``xarray.DataTree`` happens once, at the boundary (named sample dim ``path`` for ensembles,
``step`` for saved training steps, the configuration in the root's ``attrs``). Register further
types with ``@lspsde.to_datatree.register``.

| type | groups |
|---|---|
| [`Ensemble`][lspsde.Ensemble] | ``/trajectory``, ``/final``, ``/energy``, ``/loss``, ``/status`` |
| [`ExponentDistribution`][lspsde.distributions.ExponentDistribution] | ``/exponents``, ``/profile``, ``/final``, ``/status`` |
| [`StabilityProfile`][lspsde.StabilityProfile] | ``/profile`` (dim ``step``), ``/exponents`` |
| [`StabilityExponents`][lspsde.StabilityExponents] | ``/exponents`` |
| ``RecursionFit`` | ``/posterior``, ... (``arviz_base.from_numpyro``) |
| ``Dissipation`` | ``/dissipation`` |
"""  # noqa: E501

import functools
from typing import Any

import numpy as np

from ._simulate import Ensemble, add_cf_attrs
from .distributions import _CF as _PROFILE_CF
from .distributions import ExponentDistribution
from .energy import Dissipation, RecursionFit
from .exponents import StabilityExponents, stability_exponents
from .profile import DEPTH_BLOCKS, TIME_BLOCKS, StabilityProfile

__all__ = ["to_datatree"]

_CF = {  # CF (long_name, units) of the profile, exponents and dissipation trees
    **_PROFILE_CF,
    "alpha_x": ("depth exponent (1/L) log ||dX_L/dX_0||_2 at the saved step", "1/layer"),
    "alpha_x_sup": ("sup-form depth exponent (1/L) log sup_{0<=k<=L} ||dX_k/dX_0||_2", "1/layer"),
    "gamma": ("largest dissipation rate consistent with every observed step", "1"),
    "violating_fraction": ("fraction of steps violating the dissipation inequality", "1"),
    "n_steps_used": ("number of observed steps with a positive norm", "1"),
}


@functools.singledispatch
def to_datatree(obj: Any, **kwargs: Any):
    r"""Convert an lspsde result object to an ArviZ 1.x ``xarray.DataTree``.

    **Arguments:**

    - `obj`: an ``Ensemble`` (from ``simulate``), an ``ExponentDistribution`` (from
      ``exponent_distribution``), a ``StabilityProfile`` (from ``learning_profile``), a
      ``StabilityExponents``, a ``RecursionFit`` (from ``fit_recursion``) or a
      ``Dissipation`` (from ``dissipation_rate``).
    - `**kwargs`: passed to the type's conversion; ``attrs`` (a dict merged into the root's
      attributes) is accepted by all but ``RecursionFit``.

    **Returns:** an ``xarray.DataTree`` (see the module docstring for the groups).

    **Raises:** ``TypeError`` for any other type, naming the supported ones.
    """
    supported = ", ".join(sorted(t.__name__ for t in to_datatree.registry if t is not object))
    raise TypeError(
        f"to_datatree does not know how to convert a {type(obj).__name__}; supported types: "
        f"{supported}. Register a conversion with `@lspsde.to_datatree.register`."
    )


def _tree(groups: dict, attrs: dict):
    import xarray as xr

    return add_cf_attrs(xr.DataTree.from_dict({"/": xr.Dataset(attrs=attrs), **groups}), _CF)


@to_datatree.register
def _(obj: Ensemble, *, attrs: dict | None = None):
    return obj.to_datatree(attrs=attrs)


@to_datatree.register
def _(obj: ExponentDistribution, *, attrs: dict | None = None):
    return obj.to_datatree(attrs=attrs)


@to_datatree.register
def _(obj: RecursionFit):
    return obj.to_datatree()


def _exponents_dataset(ex: StabilityExponents, steps: np.ndarray | None = None):
    import xarray as xr

    data = {}
    for name in ("alpha_theta", "alpha_theta_sup", "alpha_u", "alpha_x", "alpha_x_sup"):
        value = getattr(ex, name)
        if value is not None:
            value = np.asarray(value)  # alpha_x, alpha_x_sup: one value per saved step
            data[name] = (("step",) if value.ndim == 1 else (), value)
    per_step = any(dims for dims, _ in data.values())
    return xr.Dataset(data, coords={"step": steps} if per_step and steps is not None else {})


@to_datatree.register
def _(obj: StabilityExponents, *, attrs: dict | None = None):
    return _tree({"/exponents": _exponents_dataset(obj)}, {"created_by": "lspsde", **(attrs or {})})


@to_datatree.register
def _(obj: StabilityProfile, *, attrs: dict | None = None):
    import xarray as xr

    if np.ndim(obj.sigma_theta) != 1:
        raise ValueError(
            f"This StabilityProfile is batched (sigma_theta has shape "
            f"{np.shape(obj.sigma_theta)}); convert one profile, or use "
            "`exponent_distribution(...).to_datatree()` for an ensemble of profiles."
        )
    steps = np.asarray(obj.steps)
    data = {}
    for name in TIME_BLOCKS:
        value = getattr(obj, name)
        if value is not None:
            data[name] = (("step",), np.asarray(value))
    for name in DEPTH_BLOCKS:
        value = getattr(obj, name)
        if value is not None:
            data[name] = (("step", "layer"), np.asarray(value))
    coords: dict[str, Any] = {"step": steps}
    if obj.sigma_x is not None:
        coords["layer"] = np.arange(obj.depth)
    config = {
        "n_steps": obj.n_steps,
        "depth": obj.depth,
        "converged": int(bool(obj.converged)),  # netCDF has no boolean attributes
        "created_by": "lspsde.learning_profile",
        **(attrs or {}),
    }
    groups = {
        "/profile": xr.Dataset(data, coords=coords),
        "/exponents": _exponents_dataset(stability_exponents(obj), steps),
    }
    return _tree(groups, config)


@to_datatree.register
def _(obj: Dissipation, *, attrs: dict | None = None):
    import xarray as xr

    ds = xr.Dataset(
        {
            "gamma": np.asarray(obj.gamma),
            "violating_fraction": np.asarray(obj.violating_fraction),
            "n_steps_used": np.asarray(obj.n_steps_used),
        }
    )
    return _tree({"/dissipation": ds}, {"created_by": "lspsde.dissipation_rate", **(attrs or {})})
