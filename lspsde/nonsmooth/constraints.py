r"""Convex constraint sets $C$ with their Euclidean projections $P_C$ (projected flows).

A constraint is a regulariser (``lspsde.nonsmooth.regularizers``): its indicator
$\iota_C$ ($0$ on $C$, $+\infty$ off it), whose prox is the projection for every step,
$\operatorname{prox}_{\eta\iota_C} = P_C$. So a constraint goes into ``ProximalGradient`` as
well as ``ProjectedGradient``. Projections are firmly non-expansive.

[`Box`][] acts leaf by leaf (coordinatewise clipping); [`Ball`][] and [`Simplex`][] act on
the whole parameter vector: every leaf flattened and concatenated in pytree order.
"""

import abc

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, PyTree
import numpy as np

from .._checks import _concrete_array, check_positive, check_real_scalar
from .regularizers import AbstractRegularizer, tree_sum

__all__ = ["AbstractConstraint", "Ball", "Box", "Simplex"]


def _floats(tree: PyTree[ArrayLike]) -> PyTree[Array]:
    return jax.tree.map(lambda a: jnp.asarray(a, dtype=float), tree)


def _like(param: PyTree[Array], x: PyTree[Array]) -> PyTree[Array]:
    """``param`` as a pytree of ``x``'s structure: one array is used for every leaf."""
    if isinstance(param, jax.Array):
        return jax.tree.map(lambda _: param, x)
    return param


def _tol(x: Array) -> Array:
    """Feasibility tolerance: sqrt(eps) of ``x``'s dtype (a projection lands on the boundary
    up to rounding)."""
    return jnp.sqrt(jnp.finfo(x.dtype).eps)


class AbstractConstraint(AbstractRegularizer):
    r"""A nonempty closed convex set $C$: [`project`][] is $P_C$, [`value`][] is $\iota_C$."""

    @abc.abstractmethod
    def project(self, x: PyTree[Array]) -> PyTree[Array]:
        r"""$P_C(x) = \operatorname*{arg\,min}_{z \in C}\|z - x\|$."""

    @abc.abstractmethod
    def contains(self, x: PyTree[Array]) -> Bool[Array, ""]:
        r"""$x \in C$, to a relative tolerance $\sqrt{\epsilon}$ of the dtype."""

    def prox(self, x: PyTree[Array], step: ArrayLike) -> PyTree[Array]:
        return self.project(x)

    def value(self, x: PyTree[Array]) -> Float[Array, ""]:
        r"""$\iota_C(x)$: 0 on $C$ (to the tolerance of [`contains`][]), $+\infty$ off it."""
        return jnp.where(self.contains(x), 0.0, jnp.inf)


class Box(AbstractConstraint):
    r"""$C = \{x : \ell \le x \le u\}$ coordinatewise; $P_C(x) = \operatorname{clip}(x, \ell, u)$.

    **Arguments:** `lower`, `upper`: $\ell$ and $u$, each one number, an array broadcast
    against every leaf, or a pytree of the parameters' structure; $\pm\infty$ for a one-sided
    box.

    **Raises:** ``ValueError`` for an empty box ($\ell_i > u_i$ somewhere) or NaN bounds.
    """

    lower: PyTree[Float[Array, "..."]]
    upper: PyTree[Float[Array, "..."]]

    def __init__(self, lower: PyTree[ArrayLike], upper: PyTree[ArrayLike]):
        lower, upper = _floats(lower), _floats(upper)
        lo = jax.tree.map(_concrete_array, lower)
        hi = jax.tree.map(_concrete_array, upper)
        if all(a is not None for a in jax.tree.leaves(lo) + jax.tree.leaves(hi)):
            lo_leaves, hi_leaves = jax.tree.leaves(lo), jax.tree.leaves(hi)
            if len(lo_leaves) == 1:
                lo_leaves = lo_leaves * len(hi_leaves)
            if len(hi_leaves) == 1:
                hi_leaves = hi_leaves * len(lo_leaves)
            if len(lo_leaves) != len(hi_leaves):
                raise ValueError(
                    f"`lower` has {len(lo_leaves)} leaves and `upper` {len(hi_leaves)}: give "
                    "each one array, or pytrees of the same structure."
                )
            for i, (a, b) in enumerate(zip(lo_leaves, hi_leaves, strict=True)):
                if np.isnan(a).any() or np.isnan(b).any():
                    raise ValueError(f"Box bounds must not be NaN (leaf {i}): use -inf/inf.")
                try:
                    empty = np.broadcast_to(a > b, np.broadcast_shapes(a.shape, b.shape))
                except ValueError as err:
                    raise ValueError(
                        f"Box bounds of leaf {i} do not broadcast: lower {a.shape}, upper "
                        f"{b.shape}."
                    ) from err
                if empty.any():
                    where = np.argwhere(empty)[:3].tolist()
                    la, ub = np.broadcast_arrays(a, b)
                    raise ValueError(
                        f"Box(lower, upper) is empty: lower > upper at leaf {i}, index "
                        f"{where} (lower {la[empty][:3].tolist()}, upper "
                        f"{ub[empty][:3].tolist()}). Swap the bounds or make lower <= upper "
                        "everywhere."
                    )
        self.lower, self.upper = lower, upper

    def project(self, x: PyTree[Array]) -> PyTree[Array]:
        return jax.tree.map(jnp.clip, x, _like(self.lower, x), _like(self.upper, x))

    def contains(self, x: PyTree[Array]) -> Bool[Array, ""]:
        def inside(a, lo, hi):
            tol = _tol(a) * jnp.maximum(1.0, jnp.abs(a))
            return jnp.all((a >= lo - tol) & (a <= hi + tol))

        leaves = jax.tree.leaves(
            jax.tree.map(inside, x, _like(self.lower, x), _like(self.upper, x))
        )
        return jnp.all(jnp.stack(leaves))


class Ball(AbstractConstraint):
    r"""$C = \{x : \|x - c\|_2 \le r\}$, the norm over the whole parameter vector (all leaves);
    $P_C(x) = c + (x - c)\min(1, r / \|x - c\|_2)$.

    **Arguments:** `center`: $c$, one number (every coordinate), an array broadcast against
    every leaf, or a pytree of the parameters' structure; `radius`: $r \ge 0$, one number.

    **Raises:** ``ValueError`` for a negative (or non-finite) radius.
    """

    center: PyTree[Float[Array, "..."]]
    radius: Float[Array, ""]

    def __init__(self, center: PyTree[ArrayLike] = 0.0, radius: ArrayLike = 1.0):
        if np.ndim(radius) != 0:
            raise ValueError(f"`radius` must be one real number, got shape {np.shape(radius)}.")
        check_real_scalar("radius", radius)
        check_positive("radius", radius, allow_zero=True, fix="A ball needs a radius r >= 0.")
        self.center = _floats(center)
        self.radius = jnp.asarray(radius, dtype=float)

    def _offset(self, x: PyTree[Array]) -> tuple[PyTree[Array], Array]:
        d = jax.tree.map(jnp.subtract, x, _like(self.center, x))
        return d, jnp.sqrt(tree_sum(jnp.square, d))

    def project(self, x: PyTree[Array]) -> PyTree[Array]:
        d, n = self._offset(x)
        outside = n > self.radius
        scale = jnp.where(outside, self.radius / jnp.where(outside, n, 1.0), 1.0)
        return jax.tree.map(lambda c, a: c + scale * a, _like(self.center, x), d)

    def contains(self, x: PyTree[Array]) -> Bool[Array, ""]:
        _, n = self._offset(x)
        return n <= self.radius * (1.0 + _tol(n)) + _tol(n)


class Simplex(AbstractConstraint):
    r"""$C = \{x : x_i \ge 0, \sum_i x_i = r\}$ over the whole parameter vector (all leaves
    flattened and concatenated), $r = 1$ the probability simplex.

    $P_C$ is the sort-based projection (Held, Wolfe & Crowder 1974; Duchi et al. 2008):
    $P_C(x) = \max(x - \tau, 0)$ with $\tau = (\sum_{j \le \rho} u_j - r)/\rho$, $u$ the
    coordinates sorted in decreasing order and $\rho = \max\{j : u_j > (\sum_{i\le j} u_i -
    r)/j\}$; $O(d\log d)$.

    **Arguments:** `radius`: $r > 0$ (default 1).
    """

    radius: Float[Array, ""]

    def __init__(self, radius: ArrayLike = 1.0):
        if np.ndim(radius) != 0:
            raise ValueError(f"`radius` must be one real number, got shape {np.shape(radius)}.")
        check_real_scalar("radius", radius)
        check_positive("radius", radius, fix="The simplex sum x_i = r needs r > 0.")
        self.radius = jnp.asarray(radius, dtype=float)

    def project(self, x: PyTree[Array]) -> PyTree[Array]:
        v, unravel = ravel_pytree(x)
        u = jnp.sort(v)[::-1]
        css = jnp.cumsum(u) - self.radius
        j = jnp.arange(1, v.size + 1, dtype=v.dtype)
        rho = jnp.sum(u * j > css)  # the condition holds on a prefix; rho >= 1
        tau = css[rho - 1] / rho.astype(v.dtype)
        return unravel(jnp.maximum(v - tau, 0.0))

    def contains(self, x: PyTree[Array]) -> Bool[Array, ""]:
        v, _ = ravel_pytree(x)
        tol = _tol(v) * jnp.maximum(1.0, self.radius)
        return jnp.all(v >= -tol) & (jnp.abs(jnp.sum(v) - self.radius) <= tol * v.size)
