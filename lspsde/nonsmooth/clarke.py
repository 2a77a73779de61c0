r"""Clarke generalised Jacobian norms of piecewise-linear maps (Section 6.2, Definition 6.1).

For a locally Lipschitz $f$ the Clarke generalised Jacobian $\partial_C f(x)$ is the convex
hull of the limits of Jacobians at nearby differentiable points; [`generalized_jacobian_norm`][]
returns $\sup_{V \in \partial_C f(x)}\|V\|_2$, while ``jax.jacobian`` returns one element (at a
ReLU kink, the one with slope 0).

**How ``fn`` is given.** A kink cannot be found in an arbitrary Python function, so ``fn`` is a
*chain*: a sequence of pieces applied in order, each

- an [`Affine`][] map $z \mapsto Wz + b$;
- an [`Elementwise`][] non-linearity (``"relu"``, ``"leaky_relu"``, ``"hard_tanh"``,
  ``"clip"``, ``"soft_threshold"``): its Jacobian is diagonal, any slope between the one-sided
  slopes at a coordinate within ``tol`` of a kink;
- a [`MaxPool`][] (maxima over groups of coordinates): row $j$ of its Jacobian selects the
  maximiser of group $j$; at a tie (entries within ``tol`` of the group's maximum) it is any
  convex combination of the tied selections, so the Clarke Jacobian is the convex hull of the
  selection matrices;
- a projection onto a convex set, given as the constraint itself: ``Box(lower, upper)``
  (coordinatewise clipping, as ``"clip"`` with bounds per coordinate), ``Ball(center,
  radius)``: the identity inside, $(r/\|z-c\|)(I - uu^\top)$ outside ($u = (z - c)/\|z-c\|$),
  the hull $\{I - s\,uu^\top : s \in [0, 1]\}$ of both on the sphere ($|\|z - c\| - r| \le$
  ``tol``); ``Simplex(radius)``: $P(z) = \max(z - \tau, 0)$ is piecewise linear, with Jacobian
  $I_S - \mathbf 1_S\mathbf 1_S^\top/|S|$ on its support $S$, and at coordinates within ``tol``
  of the threshold $\tau$ the hull over the supports $S \cup A$, $A$ any subset of them.

Along the chain $V = J_K M_K \cdots J_1 M_1$ (times the trailing affine map), $M_k$ the product
of the affine maps before non-affine piece $k$ and $J_k$ in that piece's set. $\|V\|_2$ is
convex in each $J_k$ separately ($V$ is affine in each), so its supremum over the product of
the pieces' sets is attained at a combination of their extreme points: the *vertices* (for an
elementwise piece with $n$ kinks the $2^n$ corners of the box of slopes, for a max-pool the
choices of one tied index per tied group, two for a ball on its sphere, $2^n$ supports for a
simplex with $n$ coordinates at the threshold). While their number is at most
$2^\text{max\_kinks}$ they are enumerated.

**Exact or a bound.** The chain-rule set contains $\partial_C f(x)$ and equals it (Clarke's
chain rule with a surjective inner derivative) when every kink sits in one piece and the
linear functionals that locate its kinks (the kinked coordinates; the differences of tied
entries of a max-pool; the normal $u$ of a ball; $z_i - \frac1{|S|}\sum_S z_j$ of a simplex),
composed with the Jacobian of the chain before it, are linearly independent (e.g.
``Affine(W)`` then ``relu`` with $W$ of full row rank): then ``exact=True``. Otherwise ``value``
is a certified upper bound (``exact=False``): the enumerated chain-rule supremum, or, past the
cap, the product bound $\|M_\text{tail}\|_2\prod_k\sup_{J_k}\|J_k M_k\|_2$, each factor the
piece's own supremum where its vertices are few enough, else a closed-form bound
($\|\operatorname{diag}(c)M_k\|_2$ with $c$ the largest absolute slope of each coordinate; for a
max-pool $\min(\sqrt{c_\max}\,\|M_k\|_2, (\sum_j \max_{i\in T_j}\|M_{k,i}\|^2)^{1/2})$, $c_\max$
the most groups an input belongs to; $\|M_k\|_2$ for a projection onto a ball or simplex,
whose Clarke Jacobians are orthogonal projections or contractions). Away from kinks both
coincide with the classical norm (Lemma A.1). Coordinates within ``tol`` of a kink count as
kinks (the value is then that of the kink, robust to rounding); ``tol=0`` counts exact kinks
only.
"""

from collections.abc import Callable, Sequence
import itertools
import math
from typing import Any, NamedTuple

import equinox as eqx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float
import numpy as np

from .._checks import check_positive, check_positive_int, check_real_scalar
from .constraints import Ball, Box, Simplex, _like
from .regularizers import L1, L2, AbstractRegularizer, ElasticNet

__all__ = [
    "Affine",
    "Elementwise",
    "GeneralizedJacobianNorm",
    "MaxPool",
    "generalized_jacobian_norm",
    "prox_chain",
]

KINDS = ("relu", "leaky_relu", "hard_tanh", "clip", "soft_threshold")
SUPPORTED = (
    f"Affine(W, b), Elementwise(kind) with kind in {KINDS}, MaxPool(groups), and the "
    "projections Box(lower, upper), Ball(center, radius), Simplex(radius)"
)
_CHUNK_ENTRIES = 2**24  # vertices are batched so that one batch holds about this many floats


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


def _groups(groups: Any) -> tuple[tuple[int, ...], ...]:
    fix = (
        "Give `groups` as a sequence of non-empty index lists (or an integer array (m, w)), "
        "e.g. MaxPool([[0, 1], [2, 3]]) or MaxPool.windows(n, size, stride)."
    )
    if isinstance(groups, str | bytes) or not hasattr(groups, "__len__") or len(groups) == 0:
        raise ValueError(f"MaxPool needs at least one group, got {groups!r}. {fix}")
    out = []
    for j, g in enumerate(groups):
        a = np.asarray(g)
        if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(
                f"MaxPool group {j} must be a non-empty list of integer indices, got {g!r}. {fix}"
            )
        if np.any(a < 0):
            raise ValueError(f"MaxPool group {j} has negative indices {a[a < 0].tolist()}.")
        if np.unique(a).size != a.size:
            raise ValueError(
                f"MaxPool group {j} repeats an index ({a.tolist()}): list each input once."
            )
        out.append(tuple(int(i) for i in a))
    return tuple(out)


class MaxPool(eqx.Module):
    r"""Maxima over groups of coordinates: $y_j = \max_{i \in G_j} z_i$ (max-pooling).

    Off ties the Jacobian's row $j$ is the selection $e_{i^*_j}^\top$ of the maximiser; where
    entries of a group tie (within ``tol`` of its maximum, the set $T_j$) the Clarke Jacobian is
    the convex hull of the selection matrices, row $j$ in $\operatorname{conv}\{e_i^\top : i
    \in T_j\}$ (``jax.jacobian`` returns the average of the tied selections).

    **Arguments:** `groups`: the index sets $G_j$, a sequence of non-empty lists of distinct
    input indices (ragged allowed; groups may overlap, e.g. sliding windows), or an integer
    array ``(m, w)``. [`MaxPool.windows`][] builds 1-D windows; a 2-D pooling is the same with
    row-major flattened indices.

    **Raises:** ``ValueError`` for an empty group, a repeated or negative index (an index past
    the input's size is reported when the chain is evaluated).
    """

    groups: tuple[tuple[int, ...], ...] = eqx.field(static=True)

    def __init__(self, groups: Any):
        self.groups = _groups(groups)

    @classmethod
    def windows(cls, n: int, size: int, stride: int | None = None) -> "MaxPool":
        """Windows ``[s, s + size)`` of an input of size `n`, ``s = 0, stride, ...`` (default
        `stride` = `size`: non-overlapping)."""
        n = check_positive_int("n", n)
        size = check_positive_int("size", size)
        stride = size if stride is None else check_positive_int("stride", stride)
        if size > n:
            raise ValueError(f"Window size {size} exceeds the input size n = {n}.")
        return cls([list(range(s, s + size)) for s in range(0, n - size + 1, stride)])

    @property
    def size_in(self) -> int:
        """The smallest input size the groups index into."""
        return 1 + max(max(g) for g in self.groups)

    def _index(self) -> np.ndarray:
        """The groups as a rectangular array, short groups padded with their first index (a
        repeated entry does not change a maximum)."""
        w = max(len(g) for g in self.groups)
        return np.asarray([list(g) + [g[0]] * (w - len(g)) for g in self.groups])

    def __call__(self, z: Float[Array, " n"]) -> Float[Array, " m"]:
        return jnp.max(z[self._index()], axis=1)


class GeneralizedJacobianNorm(eqx.Module):
    r"""The result of [`generalized_jacobian_norm`][].

    - `value`: $\sup_{V\in\partial_C f(x)}\|V\|_2$ (``exact``) or a certified upper bound.
    - `exact`: whether the extreme points of the (exact) Clarke set were enumerated.
    - `autodiff`: $\|\,$``jax.jacobian(f)(x)``$\,\|_2$, the element JAX picks.
    - `n_kinks`: the non-smooth coordinates within ``tol`` of a kink, over the whole chain
      (for a max-pool the tied groups, for a ball 1 on its sphere, for a simplex the
      coordinates at the threshold).
    - `n_vertices`: the combinations of the pieces' extreme points (enumerated while at most
      $2^\text{max\_kinks}$; 1 without kinks).
    """

    value: Float[Array, ""]
    exact: bool = eqx.field(static=True)
    autodiff: Float[Array, ""]
    n_kinks: int = eqx.field(static=True)
    n_vertices: int = eqx.field(static=True, default=1)


class _Lin(NamedTuple):
    """One non-affine piece linearised at its input: the number of its vertices and how to
    build them (a pytree with a leading vertex axis; one vertex where smooth; built only when
    they are few enough to enumerate), how a vertex acts on a matrix, a closed-form bound on
    the supremum over the set composed with a matrix, and the kink functionals (rows; their
    independence after the chain before the piece makes the chain rule exact; ``None``: no
    certificate)."""

    n_vertices: int
    build: Callable[[], Any]
    apply: Callable[[Any, Array], Array]
    bound: Callable[[Array], Array]
    functionals: np.ndarray | None
    n_kinks: int

    def vertex(self, i: int) -> Any:
        return jax.tree.map(lambda a: a[i], self.build())


def _diagonal_lin(d, at, lo, hi) -> _Lin:
    """An elementwise piece: diagonal Jacobians, the box of slopes at the kinked coordinates."""
    d, at, lo, hi = (np.asarray(a, dtype=float) for a in (d, at, lo, hi))
    idx = np.flatnonzero(at)

    def build():
        picks = np.asarray(list(itertools.product((False, True), repeat=idx.size)))
        D = np.tile(d, (picks.shape[0], 1))
        D[:, idx] = np.where(picks, hi[idx], lo[idx])
        return jnp.asarray(D)

    c = np.where(at, np.maximum(np.abs(lo), np.abs(hi)), np.abs(d))
    return _Lin(
        n_vertices=2**idx.size,
        build=build,
        apply=lambda v, M: v[:, None] * M,
        bound=lambda M: jnp.linalg.norm(jnp.asarray(c)[:, None] * M, 2),
        functionals=np.eye(d.size)[idx],
        n_kinks=int(idx.size),
    )


def _vector(value: Any, n: int, what: str) -> np.ndarray:
    """A parameter of a projection used as a chain piece: one number or an array ``(n,)``."""
    leaves = jax.tree.leaves(value)
    a = np.asarray(leaves[0], dtype=float) if len(leaves) == 1 else None
    if a is None or a.shape not in ((), (n,)):
        shape = None if a is None else a.shape
        raise ValueError(
            f"As a chain piece, {what} acts on a vector of size {n}: give it as one number or "
            f"an array of shape ({n},), got {shape if shape is not None else type(value).__name__}."
        )
    return np.broadcast_to(a, (n,))


def _box_lin(p: Box, z: np.ndarray, tol: float) -> _Lin:
    lo = _vector(p.lower, z.size, "Box's `lower`")
    hi = _vector(p.upper, z.size, "Box's `upper`")
    flat = lo == hi  # a degenerate coordinate: constant, slope 0 everywhere
    d = np.where((z > lo) & (z < hi), 1.0, 0.0)
    at = ~flat & ((np.abs(z - lo) <= tol) | (np.abs(z - hi) <= tol))
    return _diagonal_lin(d, at, np.zeros(z.size), np.ones(z.size))


def _ball_lin(p: Ball, z: np.ndarray, tol: float) -> _Lin:
    c = _vector(p.center, z.size, "Ball's `center`")
    r = float(p.radius)
    d = z - c
    n = float(np.linalg.norm(d))
    u = d / n if n > 0 else np.zeros(z.size)
    kink = r > 0 and abs(n - r) <= tol
    if r == 0:  # a point: the projection is constant
        ab = [(0.0, 0.0)]
    elif kink:  # on the sphere: the hull of the inside (I) and outside (I - uu^T) limits
        ab = [(1.0, 0.0), (1.0, 1.0)]
    elif n < r:
        ab = [(1.0, 0.0)]
    else:
        ab = [(r / n, 1.0)]
    uj = jnp.asarray(u)
    alpha, beta = (jnp.asarray([v[i] for v in ab], dtype=float) for i in (0, 1))
    return _Lin(
        n_vertices=len(ab),
        build=lambda: (alpha, beta),
        apply=lambda v, M: v[0] * (M - v[1] * uj[:, None] * (uj @ M)[None, :]),
        bound=lambda M: jnp.linalg.norm(M, 2),
        functionals=u[None] if kink else np.zeros((0, z.size)),
        n_kinks=int(kink),
    )


def _simplex_threshold(v: np.ndarray, r: float) -> float:
    """tau of P(v) = max(v - tau, 0) (the sort-based rule of ``Simplex.project``)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - r
    j = np.arange(1, v.size + 1)
    rho = int(np.sum(u * j > css))
    return float(css[rho - 1] / rho)


def _simplex_lin(p: Simplex, z: np.ndarray, tol: float) -> _Lin:
    tau = _simplex_threshold(z, float(p.radius))
    at = np.abs(z - tau) <= tol
    strict = (z > tau) & ~at
    idx = np.flatnonzero(at)

    def build():
        masks = []
        for pick in itertools.product((False, True), repeat=idx.size):
            m = strict.copy()
            m[idx[np.asarray(pick, dtype=bool)]] = True
            if m.any():  # the support is never empty (sum P(z) = r > 0)
                masks.append(m)
        return jnp.asarray(np.asarray(masks), dtype=float)

    s = strict.sum()
    functionals = np.eye(z.size)[idx] - strict[None] / s if s else None

    def apply(m, M):
        return m[:, None] * (M - (m @ M)[None, :] / jnp.sum(m))

    return _Lin(
        n_vertices=2**idx.size - (0 if strict.any() else 1),
        build=build,
        apply=apply,
        bound=lambda M: jnp.linalg.norm(M, 2),
        functionals=functionals,
        n_kinks=int(idx.size),
    )


def _maxpool_lin(p: MaxPool, z: np.ndarray, tol: float) -> _Lin:
    ties = []
    for g in p.groups:
        vals = z[list(g)]
        top = vals.max()
        ties.append([i for i, v in zip(g, vals, strict=True) if v >= top - tol])
    tied = [j for j, t in enumerate(ties) if len(t) > 1]
    base = np.asarray([t[0] for t in ties])

    def build():
        sels = []
        for choice in itertools.product(*(ties[j] for j in tied)):
            s = base.copy()
            s[tied] = choice
            sels.append(s)
        return jnp.asarray(np.asarray(sels))

    rows = [np.eye(z.size)[i] - np.eye(z.size)[ties[j][0]] for j in tied for i in ties[j][1:]]
    counts = np.zeros(z.size)
    for g in p.groups:
        counts[list(g)] += 1
    cmax = float(counts.max())

    def bound(M):
        norms = jnp.sum(M**2, axis=1)
        frob = jnp.sqrt(sum(jnp.max(norms[jnp.asarray(t)]) for t in ties))
        return jnp.minimum(math.sqrt(cmax) * jnp.linalg.norm(M, 2), frob)

    return _Lin(
        n_vertices=math.prod(len(ties[j]) for j in tied),
        build=build,
        apply=lambda s, M: M[s],
        bound=bound,
        functionals=np.asarray(rows).reshape(-1, z.size),
        n_kinks=len(tied),
    )


def _linearize(p: Any, z: Array, tol: float, i: int) -> _Lin:
    zn = np.asarray(z, dtype=float)
    if isinstance(p, Elementwise):
        return _diagonal_lin(*p.slopes(z, tol))
    if isinstance(p, MaxPool):
        if p.size_in > z.size:
            raise ValueError(
                f"Piece {i} (MaxPool) indexes input {p.size_in - 1}, but its input has size "
                f"{z.size}."
            )
        return _maxpool_lin(p, zn, tol)
    if isinstance(p, Box):
        return _box_lin(p, zn, tol)
    if isinstance(p, Ball):
        return _ball_lin(p, zn, tol)
    return _simplex_lin(p, zn, tol)


def _apply_piece(p: Any, z: Array) -> Array:
    if isinstance(p, Box):
        lo = jnp.asarray(_vector(p.lower, z.size, "Box's `lower`"))
        hi = jnp.asarray(_vector(p.upper, z.size, "Box's `upper`"))
        return jnp.clip(z, lo, hi)
    if isinstance(p, Ball):
        _vector(p.center, z.size, "Ball's `center`")
        return p.project(z)
    if isinstance(p, Simplex):
        return p.project(z)
    return p(z)


def _pieces(fn: object) -> list:
    pieces = list(fn) if isinstance(fn, Sequence) else [fn]
    bad = [
        p
        for p in pieces
        if not isinstance(p, Affine | Elementwise | MaxPool | Box | Ball | Simplex)
    ]
    if bad or not pieces:
        raise TypeError(
            "generalized_jacobian_norm needs `fn` as a chain (a sequence of pieces applied in "
            f"order) of {SUPPORTED}; got {[type(p).__name__ for p in bad] or 'an empty chain'}. "
            "The kinks of an arbitrary function cannot be classified."
        )
    return pieces


def _norms(segments, tail, combos, n_in) -> Array:
    """``||tail J_K M_K ... J_1 M_1||_2`` for every combination of vertices (batched)."""

    def one(vs):
        J = jnp.eye(n_in)
        for (Mk, lin), v in zip(segments, vs, strict=True):
            J = lin.apply(v, Mk @ J)
        return jnp.linalg.norm(tail @ J, 2)

    width = max([n_in, tail.shape[0], *(Mk.shape[0] for Mk, _ in segments)])
    n = jax.tree.leaves(combos)[0].shape[0]
    batch = max(1, _CHUNK_ENTRIES // (width * n_in * (len(segments) + 1)))
    out = [
        jax.vmap(one)(jax.tree.map(lambda a, s=s: a[s : s + batch], combos))
        for s in range(0, n, batch)
    ]
    return jnp.concatenate(out)


def generalized_jacobian_norm(
    fn: Any,
    x: Float[ArrayLike, " n"],
    *,
    tol: float | int = 1e-9,
    max_kinks: int = 16,
) -> GeneralizedJacobianNorm:
    r"""$\sup_{V \in \partial_C f(x)}\|V\|_2$ for a chain $f$ of affine maps and piecewise-linear
    pieces (see the module docstring for the method and when it is exact).

    **Arguments:**

    - `fn`: the chain (a sequence of [`Affine`][], [`Elementwise`][], [`MaxPool`][] pieces and
      the projections ``Box``, ``Ball``, ``Simplex``, or one piece), e.g.
      ``[Affine(W, b), Elementwise("relu")]`` for $\mathrm{relu}(Wx+b)$ or
      ``[Affine(I - eta * H, eta * g), Ball(c, r)]`` for a projected gradient step.
    - `x`: the point, shape ``(n,)`` (concrete: the kinks are counted eagerly).
    - `tol`: coordinates within ``tol`` of a kink count as kinks ($\ge 0$).
    - `max_kinks`: enumerate the vertices while there are at most $2^\text{max\_kinks}$
      combinations of them (``max_kinks`` two-sided kinks); past it, the product bound
      (``exact=False``).

    **Raises:** ``TypeError`` for a piece that is not supported (the message lists those that
    are); ``ValueError`` for a negative or non-finite ``tol``, a negative ``max_kinks``, shapes
    that do not chain, or a projection whose parameters do not fit its input vector.
    """
    pieces = _pieces(fn)
    check_real_scalar("tol", tol)
    check_positive("tol", tol, allow_zero=True, fix="Use tol >= 0 (0: exact kinks only).")
    tol = float(tol)
    max_kinks = check_positive_int("max_kinks", max_kinks, minimum=0)
    x = jnp.asarray(x, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"`x` must be a vector (n,), got shape {x.shape}.")
    z, M = x, jnp.eye(x.size)
    segments: list[tuple[Array, _Lin]] = []  # (M_k, linearisation) of each non-affine piece
    for i, p in enumerate(pieces):
        if isinstance(p, Affine):
            if p.W.shape[1] != z.size:
                raise ValueError(
                    f"Piece {i} (Affine) expects inputs of size {p.W.shape[1]}, gets {z.size}."
                )
            M = p.W @ M
            z = p(z)
            continue
        segments.append((M, _linearize(p, z, tol, i)))
        z = _apply_piece(p, z)
        M = jnp.eye(z.size)
    tail = M

    def chain(v):
        for p in pieces:
            v = _apply_piece(p, v)
        return v

    autodiff = jnp.linalg.norm(jax.jacobian(chain)(x), 2)
    n_kinks = sum(lin.n_kinks for _, lin in segments)
    n_vertices = math.prod(lin.n_vertices for _, lin in segments)
    if n_kinks == 0:
        value = _norms(segments, tail, [lin.build() for _, lin in segments], x.size)[0]
        return GeneralizedJacobianNorm(value, True, autodiff, 0, 1)
    cap = 2**max_kinks
    if n_vertices > cap:
        bound = jnp.linalg.norm(tail, 2)
        for Mk, lin in segments:
            if lin.n_vertices <= cap:  # this piece's own supremum, by its vertices
                norm = lambda v, lin=lin, Mk=Mk: jnp.linalg.norm(lin.apply(v, Mk), 2)
                sup = jnp.max(jax.vmap(norm)(lin.build()))
            else:
                sup = lin.bound(Mk)
            bound = bound * sup
        return GeneralizedJacobianNorm(bound, False, autodiff, n_kinks, n_vertices)
    shape = [lin.n_vertices for _, lin in segments]
    index = np.unravel_index(np.arange(n_vertices), shape)
    combos = [
        jax.tree.map(lambda a, ix=ix: a[ix], lin.build())
        for (_, lin), ix in zip(segments, index, strict=True)
    ]
    value = jnp.max(_norms(segments, tail, combos, x.size))
    kinked = [k for k, (_, lin) in enumerate(segments) if lin.n_kinks]
    exact = False
    if len(kinked) == 1 and segments[kinked[0]][1].functionals is not None:
        (k,) = kinked
        before = jnp.eye(x.size)
        for Mj, lin in segments[:k]:  # smooth pieces: their one vertex
            before = lin.apply(lin.vertex(0), Mj @ before)
        Mk, lin = segments[k]
        rows = lin.functionals @ np.asarray(Mk @ before)
        exact = bool(np.linalg.matrix_rank(rows) == rows.shape[0])
    return GeneralizedJacobianNorm(value, exact, autodiff, n_kinks, n_vertices)


def _flat_param(param: Any, like: Any) -> Array:
    """A constraint's parameter (one number, an array broadcast against every leaf, or a pytree
    of the parameters' structure) as one vector over the flattened parameters."""
    leaves = jax.tree.map(
        lambda q, a: jnp.broadcast_to(jnp.asarray(q, dtype=float), jnp.shape(a)),
        _like(param, like),
        like,
    )
    return ravel_pytree(leaves)[0]


def prox_chain(regularizer: AbstractRegularizer, step: Any, like: Any) -> list:
    r"""$\operatorname{prox}_{\eta R}$ as chain pieces acting on the flattened parameter vector
    (the leaves of `like` concatenated in pytree order, as ``jax.flatten_util.ravel_pytree``),
    so that ``generalized_jacobian_norm([Affine(J, c), *prox_chain(R, eta, theta)], x)`` is
    $\sup\|V\|_2$ over the Clarke Jacobian of a proximal step with gradient-step Jacobian $J$.

    - ``L1(lam)``: ``Elementwise("soft_threshold", threshold=eta * lam)``;
    - ``L2(lam)``: ``Affine(I / (1 + eta * lam))``;
    - ``ElasticNet(l1, l2)``: soft-thresholding at $\eta\lambda_1$, then
      ``Affine(I / (1 + eta * l2))``;
    - ``Box``, ``Ball``, ``Simplex``: the projection, its bounds or centre flattened like the
      parameters (the prox of an indicator is the projection for every step).

    **Raises:** ``TypeError`` for a regulariser whose prox is not one of these (its kinks
    cannot be classified).
    """
    n = ravel_pytree(like)[0].size
    eta = jnp.asarray(step, dtype=float)
    if isinstance(regularizer, L1):
        return [Elementwise("soft_threshold", threshold=eta * regularizer.weight)]
    if isinstance(regularizer, L2):
        return [Affine(jnp.eye(n) / (1.0 + eta * regularizer.weight))]
    if isinstance(regularizer, ElasticNet):
        return [
            Elementwise("soft_threshold", threshold=eta * regularizer.l1),
            Affine(jnp.eye(n) / (1.0 + eta * regularizer.l2)),
        ]
    if isinstance(regularizer, Box):
        return [Box(_flat_param(regularizer.lower, like), _flat_param(regularizer.upper, like))]
    if isinstance(regularizer, Ball):
        return [Ball(_flat_param(regularizer.center, like), regularizer.radius)]
    if isinstance(regularizer, Simplex):
        return [regularizer]
    raise TypeError(
        f"The Clarke Jacobian of the prox of {type(regularizer).__name__} cannot be "
        "classified; supported: L1, L2, ElasticNet and the constraints Box, Ball, Simplex."
    )
