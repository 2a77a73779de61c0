r"""Clarke generalised Jacobian norms of piecewise-linear maps (Section 6.2, Definition 6.1).

For a locally Lipschitz $f$ the Clarke generalised Jacobian $\partial_C f(x)$ is the convex
hull of the limits of Jacobians at nearby differentiable points; [`generalized_jacobian_norm`][]
returns $\sup_{V \in \partial_C f(x)}\|V\|_2$, while ``jax.jacobian`` returns one element (at a
ReLU kink, the one with slope 0).

**How ``fn`` is given.** A kink cannot be found in an arbitrary Python function, so ``fn`` is a
*chain*: a sequence of pieces applied in order, each an [`Affine`][] map $z \mapsto Wz + b$ or an
[`Elementwise`][] non-linearity (``"relu"``, ``"leaky_relu"``, ``"hard_tanh"``, ``"clip"``,
``"soft_threshold"``). Along the chain, $V = D_K M_K \cdots D_1 M_1$ (times the trailing affine
map), $M_k$ the product of the affine maps before non-linearity $k$ and $D_k$ diagonal: the slope
at every smooth coordinate, and any value between the one-sided slopes at a coordinate within
``tol`` of a kink. $\|V\|_2$ is convex in each $d_i$ separately ($V$ is affine in each), so its
supremum over that box of slopes is attained at a vertex: with ``n_kinks <= max_kinks`` the
$2^{n_\text{kinks}}$ vertices are enumerated.

**Exact or a bound.** The chain-rule set contains $\partial_C f(x)$ and equals it (Clarke's
chain rule with a surjective inner derivative) when every kink sits in one non-linearity and
the rows of the Jacobian of the chain before it that belong to the kinked coordinates are
linearly independent (e.g. ``Affine(W)`` then ``relu`` with $W$ of full row rank): then
``exact=True``. Otherwise ``value`` is a certified upper bound (``exact=False``): the enumerated
chain-rule supremum, or, past ``max_kinks``, the product bound
$\|M_\text{tail}\|_2\prod_k\|\operatorname{diag}(c_k) M_k\|_2$ with $c_k$ the largest absolute
slope of each coordinate. Away from kinks both coincide with the classical norm (Lemma A.1).
Coordinates within ``tol`` of a kink count as kinks (the value is then that of the kink, robust
to rounding); ``tol=0`` counts exact kinks only.
"""

from collections.abc import Sequence
import itertools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float
import numpy as np

from .._checks import check_positive, check_positive_int, check_real_scalar

__all__ = ["Affine", "Elementwise", "GeneralizedJacobianNorm", "generalized_jacobian_norm"]

KINDS = ("relu", "leaky_relu", "hard_tanh", "clip", "soft_threshold")
SUPPORTED = f"Affine(W, b) and Elementwise(kind) with kind in {KINDS}"


class Affine(eqx.Module):
    r"""$z \mapsto Wz + b$; `W` of shape ``(m, n)``, `b` of shape ``(m,)`` (default 0)."""

    W: Float[Array, "m n"]
    b: Float[Array, " m"]

    def __init__(self, W: ArrayLike, b: ArrayLike | None = None):
        self.W = jnp.asarray(W, dtype=float)
        if self.W.ndim != 2:
            raise ValueError(f"`W` must be a matrix (m, n), got shape {self.W.shape}.")
        self.b = jnp.zeros(self.W.shape[0]) if b is None else jnp.asarray(b, dtype=float)
        if self.b.shape != self.W.shape[:1]:
            raise ValueError(f"`b` must have shape ({self.W.shape[0]},), got {self.b.shape}.")

    def __call__(self, z: Float[Array, " n"]) -> Float[Array, " m"]:
        return self.W @ z + self.b


class Elementwise(eqx.Module):
    r"""A piecewise-linear non-linearity applied coordinate by coordinate.

    - ``"relu"``: $\max(z, 0)$, kink at 0 (slopes 0 and 1).
    - ``"leaky_relu"``: $z$ for $z \ge 0$, `slope` $\cdot z$ below (kink at 0; default 0.01).
    - ``"hard_tanh"``: ``"clip"`` with `lower` = -1, `upper` = 1.
    - ``"clip"``: $\min(\max(z, \ell), u)$, kinks at `lower` < `upper` (slopes 0 and 1; the
      projection onto a box).
    - ``"soft_threshold"``: $\operatorname{sign}(z)\max(|z| - \tau, 0)$, kinks at
      $\pm$`threshold` (the prox of $\tau\|\cdot\|_1$).
    """

    kind: str = eqx.field(static=True)
    slope: Float[Array, ""]
    lower: Float[Array, ""]
    upper: Float[Array, ""]
    threshold: Float[Array, ""]

    def __init__(
        self,
        kind: str,
        *,
        slope: ArrayLike = 0.01,
        lower: ArrayLike = -1.0,
        upper: ArrayLike = 1.0,
        threshold: ArrayLike = 1.0,
    ):
        if kind not in KINDS:
            raise ValueError(f"Unknown elementwise kind {kind!r}; supported: {KINDS}.")
        for name, v in (("slope", slope), ("lower", lower), ("upper", upper)):
            check_real_scalar(name, v)
        check_positive("threshold", threshold, allow_zero=True, fix="Use a threshold >= 0.")
        if kind == "hard_tanh":
            lower, upper = -1.0, 1.0
        if kind == "clip" and not float(lower) < float(upper):
            raise ValueError(
                f"Elementwise('clip') needs lower < upper, got lower={float(lower)}, "
                f"upper={float(upper)} (equal bounds make a constant map: use an Affine)."
            )
        self.kind = kind
        self.slope, self.lower, self.upper, self.threshold = (
            jnp.asarray(v, dtype=float) for v in (slope, lower, upper, threshold)
        )

    def __call__(self, z: Float[Array, " n"]) -> Float[Array, " n"]:
        if self.kind == "relu":
            return jax.nn.relu(z)
        if self.kind == "leaky_relu":
            return jnp.where(z >= 0, z, self.slope * z)
        if self.kind == "soft_threshold":
            return jnp.sign(z) * jnp.maximum(jnp.abs(z) - self.threshold, 0.0)
        return jnp.clip(z, self.lower, self.upper)

    def slopes(
        self, z: Float[Array, " n"], tol: float
    ) -> tuple[Float[Array, " n"], Bool[Array, " n"], Float[Array, " n"], Float[Array, " n"]]:
        """``(slope, at_kink, low, high)``: the derivative off the kinks, whether each coordinate
        is within ``tol`` of a kink, and the one-sided slopes there."""
        one, zero = jnp.ones_like(z), jnp.zeros_like(z)
        if self.kind in ("relu", "leaky_relu"):
            below = zero if self.kind == "relu" else self.slope * one
            return jnp.where(z > 0, one, below), jnp.abs(z) <= tol, below, one
        if self.kind == "soft_threshold":
            at = jnp.abs(jnp.abs(z) - self.threshold) <= tol
            return jnp.where(jnp.abs(z) > self.threshold, one, zero), at, zero, one
        at = (jnp.abs(z - self.lower) <= tol) | (jnp.abs(z - self.upper) <= tol)
        return jnp.where((z > self.lower) & (z < self.upper), one, zero), at, zero, one


class GeneralizedJacobianNorm(eqx.Module):
    r"""The result of [`generalized_jacobian_norm`][].

    - `value`: $\sup_{V\in\partial_C f(x)}\|V\|_2$ (``exact``) or a certified upper bound.
    - `exact`: whether the extreme points of the (exact) Clarke set were enumerated.
    - `autodiff`: $\|\,$``jax.jacobian(f)(x)``$\,\|_2$, the element JAX picks.
    - `n_kinks`: the coordinates within ``tol`` of a kink, over the whole chain.
    """

    value: Float[Array, ""]
    exact: bool = eqx.field(static=True)
    autodiff: Float[Array, ""]
    n_kinks: int = eqx.field(static=True)


def _pieces(fn: object) -> list:
    pieces = list(fn) if isinstance(fn, Sequence) else [fn]
    bad = [p for p in pieces if not isinstance(p, Affine | Elementwise)]
    if bad or not pieces:
        raise TypeError(
            "generalized_jacobian_norm needs `fn` as a chain (a sequence of pieces applied in "
            f"order) of {SUPPORTED}; got {[type(p).__name__ for p in bad] or 'an empty chain'}. "
            "The kinks of an arbitrary function cannot be classified."
        )
    return pieces


def generalized_jacobian_norm(
    fn: Any,
    x: Float[ArrayLike, " n"],
    *,
    tol: float | int = 1e-9,
    max_kinks: int = 16,
) -> GeneralizedJacobianNorm:
    r"""$\sup_{V \in \partial_C f(x)}\|V\|_2$ for a chain $f$ of affine maps and piecewise-linear
    non-linearities (see the module docstring for the method and when it is exact).

    **Arguments:**

    - `fn`: the chain (a sequence of [`Affine`][] and [`Elementwise`][] pieces, or one piece),
      e.g. ``[Affine(W, b), Elementwise("relu")]`` for $\mathrm{relu}(Wx+b)$.
    - `x`: the point, shape ``(n,)`` (concrete: the kinks are counted eagerly).
    - `tol`: coordinates within ``tol`` of a kink count as kinks ($\ge 0$).
    - `max_kinks`: enumerate the $2^{n_\text{kinks}}$ vertices up to this many kinks; past it,
      the product bound (``exact=False``).

    **Raises:** ``TypeError`` for a piece that is not supported (the message lists those that
    are); ``ValueError`` for a negative or non-finite ``tol``, a negative ``max_kinks``, or
    shapes that do not chain.
    """
    pieces = _pieces(fn)
    check_real_scalar("tol", tol)
    check_positive("tol", tol, allow_zero=True, fix="Use tol >= 0 (0: exact kinks only).")
    max_kinks = check_positive_int("max_kinks", max_kinks, minimum=0)
    x = jnp.asarray(x, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"`x` must be a vector (n,), got shape {x.shape}.")
    z, M = x, jnp.eye(x.size)
    segments = []  # (M_k, slope, at_kink, low, high) for each non-linearity
    for i, p in enumerate(pieces):
        if isinstance(p, Affine):
            if p.W.shape[1] != z.size:
                raise ValueError(
                    f"Piece {i} (Affine) expects inputs of size {p.W.shape[1]}, gets {z.size}."
                )
            M = p.W @ M
        else:
            segments.append((M, *p.slopes(z, tol)))
            M = jnp.eye(z.size)
        z = p(z)
    tail = M

    def chain(v):
        for p in pieces:
            v = p(v)
        return v

    autodiff = jnp.linalg.norm(jax.jacobian(chain)(x), 2)

    def jacobian(ds):
        J = jnp.eye(x.size)
        for (Mk, *_), d in zip(segments, ds, strict=True):
            J = d[:, None] * (Mk @ J)
        return tail @ J

    kinked = [np.flatnonzero(np.asarray(at)) for _, _, at, _, _ in segments]
    n_kinks = int(sum(k.size for k in kinked))
    if n_kinks == 0:
        value = jnp.linalg.norm(jacobian([s[1] for s in segments]), 2)
        return GeneralizedJacobianNorm(value, True, autodiff, 0)
    if n_kinks > max_kinks:
        bound = jnp.linalg.norm(tail, 2)
        for Mk, d, at, lo, hi in segments:
            c = jnp.where(at, jnp.maximum(jnp.abs(lo), jnp.abs(hi)), jnp.abs(d))
            bound = bound * jnp.linalg.norm(c[:, None] * Mk, 2)
        return GeneralizedJacobianNorm(bound, False, autodiff, n_kinks)
    vertices = jnp.asarray(list(itertools.product((False, True), repeat=n_kinks)))
    ds, col = [], 0
    for (_, d, _, lo, hi), idx in zip(segments, kinked, strict=True):
        pick = vertices[:, col : col + idx.size]
        ds.append(
            jnp.tile(d, (vertices.shape[0], 1)).at[:, idx].set(jnp.where(pick, hi[idx], lo[idx]))
        )
        col += idx.size
    value = jnp.max(jax.vmap(lambda *d: jnp.linalg.norm(jacobian(d), 2))(*ds))
    layers = [k for k, idx in enumerate(kinked) if idx.size]
    exact = False
    if len(layers) == 1:  # one kinked non-linearity: exact if its kinked input rows are independent
        (k,) = layers
        before = jnp.eye(x.size)
        for Mk, d, *_ in segments[:k]:
            before = d[:, None] * (Mk @ before)
        rows = np.asarray(segments[k][0] @ before)[kinked[k]]
        exact = bool(np.linalg.matrix_rank(rows) == kinked[k].size)
    return GeneralizedJacobianNorm(value, exact, autodiff, n_kinks)
