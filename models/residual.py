r"""Residual blocks $g$ with *known* constants $(m, M_g)$ of assumption (4.2).

The residual layer is $X_{k+1} = X_k + h\,g_k(X_k)$ (eq. 4.1) with $G_k = \partial g_k/\partial x$
satisfying $\tfrac12(G_k + G_k^\top) \preceq -mI$ and $\|G_k\|_2 \le M_g$ (eq. 4.2).

- [`LinearDissipativeBlock`][models.residual.LinearDissipativeBlock]: $g(x) = Ax + b$ with
  $A = -mI + K$, $K$ skew-symmetric. $A$ is normal, $\operatorname{sym}(A) = -mI$ and
  $\|A\|_2 = \sqrt{m^2 + \|K\|_2^2} = M_g$ exactly, and
  $\|I + hA\|_2^2 = (1 - hm)^2 + h^2\|K\|_2^2 = 1 - 2hm + h^2M_g^2$: Lemma 4.2 is *attained*.
  For even ``dim`` the constructor gives $K^\top K = \kappa^2 I$, so
  $(I + hA)^\top(I + hA) = c_x(h)^2 I$: every layer is $c_x(h)$ times an orthogonal matrix and
  *any* stack of such blocks, independent or not, has $\|\partial X_L/\partial X_0\|_2 =
  c_x(h)^L$ exactly (Theorem 4.3 attained at every depth). For odd ``dim`` $K$ has a null
  direction (gain $|1 - hm| < c_x(h)$ there); with independent blocks the bound is still attained
  for depth $<$ dim and generically strict from depth $\ge$ dim on.
- [`NonlinearDissipativeBlock`][models.residual.NonlinearDissipativeBlock]:
  $g(x) = Ax - c\,W^\top\tanh(Wx + a) + b$ with $W \in \mathbb{R}^{r \times d}$, $r < d$, $c \ge 0$.
  $G(x) = A - cW^\top D(x) W$, $D = \operatorname{diag}(\operatorname{sech}^2) \in (0, 1]$, so
  $\operatorname{sym}G = -mI - cW^\top DW \preceq -mI$, with $\lambda_{\max} = -m$ exactly
  (a null vector of $W$ exists as $r < d$): $m$ is exact. $M_g = \sqrt{m^2 + \|K\|_2^2} +
  c\|W\|_2^2$ is a valid but conservative bound (triangle inequality).

The skew part is read as $\tfrac12(K - K^\top)$ inside the block, so the structure (and the
constants) survive any update of the array $K$, e.g. by training.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray
import numpy as np

from lspsde._checks import _concrete_array, check_in_interval, check_positive, check_positive_int
from lspsde._custom_types import ScalarLike
from lspsde.representation import Residual

from .mlp import _haar

__all__ = [
    "LinearDissipativeBlock",
    "NonlinearDissipativeBlock",
    "linear_dissipative_block",
    "nonlinear_dissipative_block",
    "random_skew",
    "residual_network",
    "residual_network_constants",
]


def _skew(K: Array) -> Array:
    return 0.5 * (K - K.T)


@jax.jit
def _spectral_norm(M: Array) -> Array:
    return jnp.linalg.svd(M, compute_uv=False)[0]


@jax.jit
def _linear_M_g(m: Array, K: Array) -> Array:
    r"""$\|-mI + K\|_2 = \sqrt{m^2 + \|K\|_2^2}$ for skew $K$ ($-mI + K$ is normal)."""
    return jnp.sqrt(m**2 + _spectral_norm(_skew(K)) ** 2)


def _check_square(name: str, M: Array) -> None:
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"`{name}` must be a square (d, d) matrix, got shape {M.shape}.")


class LinearDissipativeBlock(eqx.Module):
    r"""$g(x) = Ax + b$, $A = -mI + K$, $K$ skew: the extremal block of Lemma 4.2.

    **Fields:** `m` ($m$), `K` (read through its skew part), `b` (the bias).

    **Properties:** `A`; `M_g` $= \|A\|_2 = \sqrt{m^2 + \|K\|_2^2}$ (exact); `kappa`
    $= \|K\|_2$.
    """

    m: Float[Array, ""]
    K: Float[Array, "d d"]
    b: Float[Array, " d"]

    def __init__(
        self,
        m: ScalarLike,
        K: Float[ArrayLike, "d d"],
        b: Float[ArrayLike, " d"] | None = None,
    ):
        check_positive("m", m, fix="The block must be dissipative, m > 0 (eq. 4.2).")
        K = jnp.asarray(K, dtype=float)
        _check_square("K", K)
        b = jnp.zeros(K.shape[0]) if b is None else jnp.asarray(b, dtype=float)
        if b.shape != K.shape[:1]:
            raise ValueError(f"`b` must have shape ({K.shape[0]},) to match K, got {b.shape}.")
        self.m = jnp.asarray(m, dtype=float)
        self.K = K
        self.b = b

    @property
    def A(self) -> Float[Array, "d d"]:
        return -self.m * jnp.eye(self.K.shape[0]) + _skew(self.K)

    @property
    def kappa(self) -> Float[Array, ""]:
        return _spectral_norm(_skew(self.K))

    @property
    def M_g(self) -> Float[Array, ""]:
        return _linear_M_g(self.m, self.K)

    def __call__(self, x: Float[Array, " d"]) -> Float[Array, " d"]:
        return -self.m * x + _skew(self.K) @ x + self.b


class NonlinearDissipativeBlock(eqx.Module):
    r"""$g(x) = Ax - c\,W^\top\tanh(Wx + a) + b$, $A = -mI + K$: dissipative, $m$ exact.

    **Fields:** `m`, `K` (skew part used), `W` (shape ``(r, d)``, $r < d$), `a` (inner bias,
    ``(r,)``), `c` ($\ge 0$), `b` (bias, ``(d,)``).

    **Properties:** `M_g` $= \sqrt{m^2 + \|K\|_2^2} + c\|W\|_2^2$, a valid but *conservative*
    bound on $\sup_x \|G(x)\|_2$ (the two terms are bounded separately).
    """

    m: Float[Array, ""]
    K: Float[Array, "d d"]
    W: Float[Array, "r d"]
    a: Float[Array, " r"]
    c: Float[Array, ""]
    b: Float[Array, " d"]

    def __init__(
        self,
        m: ScalarLike,
        K: Float[ArrayLike, "d d"],
        W: Float[ArrayLike, "r d"],
        c: ScalarLike,
        a: Float[ArrayLike, " r"] | None = None,
        b: Float[ArrayLike, " d"] | None = None,
    ):
        check_positive("m", m, fix="The block must be dissipative, m > 0 (eq. 4.2).")
        check_positive(
            "c", c, allow_zero=True, fix="c >= 0 keeps -c W^T D W negative semidefinite."
        )
        K, W = jnp.asarray(K, dtype=float), jnp.asarray(W, dtype=float)
        _check_square("K", K)
        d = K.shape[0]
        if W.ndim != 2 or W.shape[1] != d or not 1 <= W.shape[0] < d:
            raise ValueError(
                f"`W` must have shape (r, {d}) with 1 <= r < {d}, got {W.shape}; r < d makes "
                "lambda_max(sym G) = -m exactly (W has a null vector)."
            )
        a = jnp.zeros(W.shape[0]) if a is None else jnp.asarray(a, dtype=float)
        b = jnp.zeros(d) if b is None else jnp.asarray(b, dtype=float)
        if a.shape != W.shape[:1] or b.shape != (d,):
            raise ValueError(
                f"`a` must have shape ({W.shape[0]},) and `b` shape ({d},), got {a.shape} and "
                f"{b.shape}."
            )
        self.m = jnp.asarray(m, dtype=float)
        self.K, self.W, self.a, self.b = K, W, a, b
        self.c = jnp.asarray(c, dtype=float)

    @property
    def A(self) -> Float[Array, "d d"]:
        return -self.m * jnp.eye(self.K.shape[0]) + _skew(self.K)

    @property
    def M_g(self) -> Float[Array, ""]:
        return _linear_M_g(self.m, self.K) + self.c * _spectral_norm(self.W) ** 2

    def __call__(self, x: Float[Array, " d"]) -> Float[Array, " d"]:
        inner = jnp.tanh(self.W @ x + self.a)
        return -self.m * x + _skew(self.K) @ x - self.c * (self.W.T @ inner) + self.b


def random_skew(key: PRNGKeyArray, dim: int, kappa: ScalarLike) -> Float[Array, "d d"]:
    r"""$K = Q\,\operatorname{blockdiag}(\kappa J, \dots, \kappa J[, 0])\,Q^\top$,
    $J = \begin{pmatrix}0 & 1\\ -1 & 0\end{pmatrix}$, $Q$ Haar-orthogonal.

    Exactly skew (re-symmetrised as $\tfrac12(K - K^\top)$); every eigenvalue is $\pm i\kappa$
    (one $0$ for odd ``dim``), so $\|K\|_2 = \kappa$ up to rounding.
    """
    dim = check_positive_int("dim", dim)
    check_positive("kappa", kappa, allow_zero=True, fix="kappa = ||K||_2 must be >= 0.")
    return _random_skew(key, dim, jnp.asarray(kappa, dtype=float))


def _skew_from_gaussian(z: Array, dim: int, kappa: Array) -> Array:
    q = _haar(z, (dim, dim))
    upper = jnp.where(jnp.arange(dim - 1) % 2 == 0, kappa, 0.0)  # pairs (0,1), (2,3), ...
    B = jnp.diag(upper, k=1) - jnp.diag(upper, k=-1)
    return _skew(q @ B @ q.T)


@functools.partial(jax.jit, static_argnums=1)
def _random_skew(key: PRNGKeyArray, dim: int, kappa: Array) -> Array:
    return _skew_from_gaussian(jax.random.normal(key, (dim, dim)), dim, kappa)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _block_arrays(
    key: PRNGKeyArray, dim: int, rank: int, kappa: Array, bias_std: Array, inner_bias_std: Array
) -> tuple[Array, Array, Array, Array]:
    """(K, W, a, b) of a block from one Gaussian draw (one compile per (dim, rank))."""
    sizes = (dim * dim, rank * dim, rank, dim)
    z = jax.random.normal(key, (sum(sizes),))
    zk, zw, za, zb = jnp.split(z, np.cumsum(sizes)[:-1].tolist())
    K = _skew_from_gaussian(zk.reshape(dim, dim), dim, kappa)
    W = _haar(zw.reshape(dim, rank), (rank, dim)) if rank > 0 else jnp.zeros((0, dim))
    return K, W, inner_bias_std * za, bias_std * zb


def _check_constants(m: ScalarLike, M_g: ScalarLike) -> float:
    check_positive("m", m, fix="The block must be dissipative, m > 0 (eq. 4.2).")
    check_positive("M_g", M_g, fix="M_g bounds ||G||_2 (eq. 4.2); use M_g > 0.")
    m_c, M_c = _concrete_array(m), _concrete_array(M_g)
    if m_c is None or M_c is None:
        raise TypeError("`m` and `M_g` must be concrete numbers to build a block.")
    m_c, M_c = float(m_c), float(M_c)
    if m_c > M_c:
        raise ValueError(
            f"m = {m_c} exceeds M_g = {M_c}: v^T G v >= -||G||_2 for unit v, so a block with "
            "sym(G) <= -m I and ||G||_2 <= M_g needs m <= M_g."
        )
    return float(np.sqrt(M_c**2 - m_c**2))


def linear_dissipative_block(
    key: PRNGKeyArray, dim: int, m: ScalarLike, M_g: ScalarLike, *, bias_std: ScalarLike = 0.0
) -> LinearDissipativeBlock:
    r"""A [`LinearDissipativeBlock`][models.residual.LinearDissipativeBlock] with exactly
    $\operatorname{sym}(A) = -mI$ and $\|A\|_2 = M_g$ ($\kappa = \sqrt{M_g^2 - m^2}$).

    **Arguments:** `key`; `dim` $\ge 1$; `m` $> 0$; `M_g \ge m` (for ``dim = 1``, $K = 0$ so
    $M_g = m$); `bias_std` (bias $b \sim \mathcal{N}(0, \text{bias\_std}^2 I)$).
    """
    dim = check_positive_int("dim", dim)
    kappa = _check_constants(m, M_g)
    if dim == 1 and kappa > 0:
        raise ValueError(
            f"dim = 1 admits no skew part (K = 0), so M_g = m; got m = {m}, M_g = {M_g}. "
            "Use dim >= 2 or M_g = m."
        )
    check_positive("bias_std", bias_std, allow_zero=True, fix="Use bias_std >= 0.")
    K, _, _, b = _block_arrays(key, dim, 0, jnp.asarray(kappa), jnp.asarray(bias_std, float), 0.0)
    return LinearDissipativeBlock(m, K, b)


def nonlinear_dissipative_block(
    key: PRNGKeyArray,
    dim: int,
    m: ScalarLike,
    M_g: ScalarLike,
    *,
    rank: int | None = None,
    nonlinear_fraction: ScalarLike = 0.5,
    bias_std: ScalarLike = 0.0,
    inner_bias_std: ScalarLike = 0.0,
) -> NonlinearDissipativeBlock:
    r"""A [`NonlinearDissipativeBlock`][models.residual.NonlinearDissipativeBlock] with exact $m$
    and bound ``.M_g`` equal to `M_g`.

    The budget $M_g - m$ is split: $c = f\,(M_g - m)$ with $W$ having orthonormal rows
    ($\|W\|_2 = 1$), and $\|K\|_2 = \kappa$ with $\sqrt{m^2 + \kappa^2} = M_g - c$.

    **Arguments:** `key`; `dim` $\ge 2$; `m` $> 0$; `M_g \ge m`; `rank` $r \in [1, d)$
    (default $\max(1, d/2)$); `nonlinear_fraction` $f \in [0, 1]$; `bias_std`,
    `inner_bias_std` (Gaussian biases $b$ and $a$).
    """
    dim = check_positive_int("dim", dim, minimum=2, fix="The nonlinear block needs r < dim.")
    _check_constants(m, M_g)
    rank = max(1, dim // 2) if rank is None else rank
    rank = check_positive_int("rank", rank)
    if rank >= dim:
        raise ValueError(f"`rank` must be < dim = {dim}, got {rank}; r < d makes m exact.")
    check_in_interval(
        "nonlinear_fraction",
        nonlinear_fraction,
        0.0,
        1.0,
        closed_low=True,
        closed_high=True,
        fix="It is the share of M_g - m given to the tanh part.",
    )
    check_positive("bias_std", bias_std, allow_zero=True, fix="Use bias_std >= 0.")
    check_positive("inner_bias_std", inner_bias_std, allow_zero=True, fix="Use >= 0.")
    m, M_g = float(m), float(M_g)
    c = nonlinear_fraction * (M_g - m)
    kappa = float(np.sqrt(max((M_g - c) ** 2 - m**2, 0.0)))
    K, W, a, b = _block_arrays(
        key,
        dim,
        rank,
        jnp.asarray(kappa),
        jnp.asarray(bias_std, float),
        jnp.asarray(inner_bias_std, float),
    )
    return NonlinearDissipativeBlock(m, K, W, c, a=a, b=b)


def residual_network(
    key: PRNGKeyArray,
    dim: int,
    depth: int,
    h: ScalarLike,
    m: ScalarLike,
    M_g: ScalarLike,
    *,
    kind: str = "linear",
    shared: bool = False,
    **block_kwargs: object,
) -> Residual:
    r"""A residual network $X_{k+1} = X_k + h\,g_k(X_k)$ of `depth` dissipative blocks (eq. 4.1).

    **Arguments:**

    - `key`: PRNG key; block $k$ uses an independent subkey (all blocks use the same one when
      `shared`, so every layer is the same map and, for linear blocks,
      $\|\partial X_L/\partial X_0\|_2 = c_x(h)^L$ exactly: $(I + hA)$ is normal).
    - `dim`, `m`, `M_g`: as in the block constructors; every block satisfies (4.2) with them.
    - `depth`: the number of blocks $L \ge 1$.
    - `h`: the step $h > 0$.
    - `kind`: ``"linear"`` or ``"nonlinear"``.
    - `block_kwargs`: passed to the block constructor.

    **Returns:** a [`Residual`][lspsde.representation.Residual].
    """
    depth = check_positive_int("depth", depth)
    makers = {"linear": linear_dissipative_block, "nonlinear": nonlinear_dissipative_block}
    if kind not in makers:
        raise ValueError(f"Unknown kind {kind!r}; use 'linear' or 'nonlinear'.")
    keys = [key] * depth if shared else list(jax.random.split(key, depth))
    blocks = [makers[kind](k, dim, m, M_g, **block_kwargs) for k in keys]
    return Residual(blocks, h)


def residual_network_constants(net: Residual) -> tuple[Float[Array, ""], Float[Array, ""]]:
    r"""$(\min_k m_k, \max_k M_{g,k})$: constants for which (4.2) holds for every block of `net`."""
    if not isinstance(net, Residual):
        raise TypeError(f"`net` must be an lspsde Residual, got {type(net).__name__}.")
    for k, g in enumerate(net.blocks):
        if not (hasattr(g, "m") and hasattr(g, "M_g")):
            raise TypeError(
                f"blocks[{k}] ({type(g).__name__}) has no known constants `.m`, `.M_g`; estimate "
                "them with `lspsde.constants.residual_block_constants`."
            )
    ms = jnp.stack([jnp.asarray(g.m) for g in net.blocks])
    Ms = jnp.stack([jnp.asarray(g.M_g) for g in net.blocks])
    return jnp.min(ms), jnp.max(Ms)
