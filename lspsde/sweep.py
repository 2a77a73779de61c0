r"""Sweeps: a grid of parameter flows or noise models run as one compiled program.

A [`Sweep`][] is a batch of modules of one type (step sizes, noise levels, schedules), every
array field carrying a leading grid axis. Passed to [`lspsde.simulate`][] in place of the
update or the noise model, the grid becomes a ``lax.map`` (``vmap``-ed ``batch_size`` grid
points at a time) around the path ``vmap``, inside one program: the whole grid compiles once,
whatever its size and values, and the result carries the grid as a leading named dimension.

**Common random numbers.** Path $p$ draws its noise from ``fold_in(key, p)`` at every grid
point, so the paths of two grid points differ only by the swept hyperparameter: differences
between grid points have far less Monte Carlo noise than independent runs would, and path $p$
at grid point $g$ is bit for bit the path $p$ of a plain ``simulate`` with the $g$-th module.
"""

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array
import numpy as np

from ._checks import check_positive_int

__all__ = ["Sweep"]


def _stack(modules: Sequence[eqx.Module]) -> eqx.Module:
    arrays = [eqx.filter(m, eqx.is_array) for m in modules]
    statics = [eqx.filter(m, eqx.is_array, inverse=True) for m in modules]
    structure = jax.tree.structure(arrays[0])
    for i, (a, s) in enumerate(zip(arrays, statics, strict=True)):
        if type(modules[i]) is not type(modules[0]):
            raise TypeError(
                f"A sweep holds modules of one type: element 0 is {type(modules[0]).__name__}, "
                f"element {i} is {type(modules[i]).__name__}."
            )
        if jax.tree.structure(a) != structure or not eqx.tree_equal(s, statics[0]):
            fields = [
                f.name
                for f in dataclasses.fields(modules[0])
                if not eqx.tree_equal(getattr(modules[i], f.name), getattr(modules[0], f.name))
                and not eqx.is_array(getattr(modules[0], f.name))
            ]
            raise ValueError(
                f"Element {i} of the sweep differs from element 0 in more than its array "
                f"values: in {fields or 'its structure'} (a static setting such as a solver, "
                "a count or a flag derived from a value, e.g. GaussianNoise's state_dependent "
                "= sigma1 != 0). A sweep varies array fields only: run such grid points as "
                "separate sweeps."
            )
        for leaf, first in zip(jax.tree.leaves(a), jax.tree.leaves(arrays[0]), strict=True):
            if leaf.shape != first.shape or leaf.dtype != first.dtype:
                raise ValueError(
                    f"Element {i} of the sweep has an array of shape/dtype "
                    f"{leaf.dtype}{list(leaf.shape)} where element 0 has "
                    f"{first.dtype}{list(first.shape)}."
                )
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *arrays)
    return eqx.combine(stacked, statics[0])


class Sweep(eqx.Module):
    r"""A grid of parameter flows or noise models, run by ``simulate`` as one program.

    **Arguments:**

    - `modules`: a list of modules of one type that differ only in their array fields (e.g.
      ``[lspsde.SGD(eta) for eta in etas]``; each is built, and so checked, by its own
      constructor), or one batched module whose array fields all carry a leading grid axis
      (e.g. ``eqx.filter_vmap(lspsde.SGD)(etas)``; built under ``vmap``, its constructor saw
      traced values and could not check them).
    - `name`: the grid dimension's name in the result (default ``"grid"``).
    - `values`: the coordinate values along the grid (default ``0, 1, ..., n-1``), e.g. the
      step sizes.
    - `batch_size`: grid points vectorised together (``vmap``) inside the compiled
      ``lax.map`` over the grid. Default ``None``: one at a time, so that every grid point
      runs the very program of a plain call and equals it bit for bit. A larger batch
      vectorises across the grid as well (worth it when there are few paths); XLA may then
      round reductions differently, so results can differ from plain calls in the last ulp.

    [`Sweep.of`][] builds the list from a constructor and values.

    **Raises:** ``TypeError``/``ValueError`` for an empty list, modules of different types or
    structures, array fields without a common leading axis, or ``values`` of the wrong length.
    """

    module: eqx.Module
    name: str = eqx.field(static=True)
    values: Array
    batch_size: int | None = eqx.field(static=True)

    def __init__(
        self,
        modules: "Sequence[eqx.Module] | eqx.Module",
        *,
        name: str = "grid",
        values: Any = None,
        batch_size: int | None = None,
    ):
        if isinstance(modules, eqx.Module):
            leaves = jax.tree.leaves(eqx.filter(modules, eqx.is_array))
            sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
            if not leaves or len(sizes) != 1 or None in sizes:
                raise ValueError(
                    f"A batched {type(modules).__name__} needs every array field to have the "
                    f"same leading grid axis; got shapes "
                    f"{[tuple(leaf.shape) for leaf in leaves]}. Build it with "
                    "`eqx.filter_vmap(Constructor)(values)`, or pass a list of modules."
                )
            module, size = modules, sizes.pop()
        else:
            modules = list(modules)
            if not modules:
                raise ValueError("A sweep needs at least one module.")
            if not all(isinstance(m, eqx.Module) for m in modules):
                raise TypeError(
                    "A sweep is a list of equinox modules (flows or noise models), got "
                    f"{[type(m).__name__ for m in modules]}."
                )
            module, size = _stack(modules), len(modules)
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"`name` must be an identifier (a dimension name), got {name!r}.")
        values = np.arange(size) if values is None else np.asarray(values)
        if values.ndim != 1 or values.shape[0] != size:
            raise ValueError(
                f"`values` must be one coordinate per grid point ({size}), got shape "
                f"{values.shape}."
            )
        if batch_size is not None:
            batch_size = check_positive_int(
                "batch_size", batch_size, fix="Or None (one at a time)."
            )
        self.module = module
        self.name = name
        self.values = jnp.asarray(values)
        self.batch_size = batch_size

    @classmethod
    def of(
        cls,
        constructor: Callable[[Any], eqx.Module],
        values: Any,
        *,
        name: str,
        batch_size: int | None = None,
    ) -> "Sweep":
        """``Sweep([constructor(v) for v in values], name=name, values=values)``: e.g.
        ``Sweep.of(lspsde.SGD, etas, name="step_size")``; every module is checked as built."""
        values = np.asarray(values)
        if values.ndim != 1:
            raise ValueError(f"`values` must be one-dimensional, got shape {values.shape}.")
        modules = [constructor(v) for v in values]
        return cls(modules, name=name, values=values, batch_size=batch_size)

    @property
    def size(self) -> int:
        """The number of grid points."""
        return int(self.values.shape[0])

    def at(self, i: int) -> eqx.Module:
        """The module at grid point ``i``."""
        arrays, static = eqx.partition(self.module, eqx.is_array)
        return eqx.combine(jax.tree.map(lambda x: x[i], arrays), static)
