r"""Pure-JAX kernels on one matrix (the public functions ``vmap`` them over leading axes).

Everything starts from a full SVD $W = U \operatorname{diag}(s) V^\top$, $U \in O(m)$,
$V \in O(n)$, $s \in \mathbb{R}^r$, $r = \min(m, n)$. No kernel divides by zero: every
denominator goes through :func:`_safe_inv`, and the results that would need one (a degenerate or
zero top singular value) are replaced by NaN, or by the one-sided fallback, where ``degenerate``.
"""

import math

import jax
from jax import lax
import jax.numpy as jnp

from ..linalg.krylov import _HIGHEST


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


def _safe_inv(x):
    """``1 / x`` where ``x > 0``, else ``1`` (the caller masks those entries)."""
    return 1 / jnp.where(x > 0, x, 1)


def svd(W):
    U, s, Vt = jnp.linalg.svd(W, full_matrices=True)
    return U, s, Vt.T


def default_gap_tol(dtype):
    return math.sqrt(float(jnp.finfo(dtype).eps))


def gap_and_flag(s, gap_tol):
    r"""$\sigma_1 - \sigma_2$ ($\sigma_2 := 0$ when $r = 1$) and whether it is at most
    ``gap_tol`` $\sigma_1$ (or $\sigma_1 = 0$; NaN counts as degenerate)."""
    s1 = s[0]
    s2 = s[1] if s.shape[0] > 1 else jnp.zeros((), s.dtype)
    gap = s1 - s2
    degenerate = ~(gap > gap_tol * s1) | ~(s1 > 0)
    return gap, degenerate


def projections(U, V, E):
    r"""$a_j = u_j^\top E v_1$ ($j < m$) and $b_k = u_1^\top E v_k$ ($k < n$); $a_0 = b_0$."""
    a = _mm(U.T, _mm(E, V[:, 0]))
    b = _mm(V.T, _mm(E.T, U[:, 0]))
    return a, b


def second_coefficient(s, a, b):
    r"""$\sum_{j \ge 2} \frac{(a_j + b_j)^2}{4(\sigma_1 - \sigma_j)}
    + \frac{(a_j - b_j)^2}{4(\sigma_1 + \sigma_j)} + \frac{\sum_{k > r} a_k^2 + b_k^2}{2\sigma_1}$
    (unmasked: garbage, never inf, where degenerate)."""
    r = s.shape[0]
    s1 = s[0]
    aj, bj = a[1:r], b[1:r]
    pairs = jnp.sum((aj + bj) ** 2 * _safe_inv(s1 - s[1:]) + (aj - bj) ** 2 * _safe_inv(s1 + s[1:]))
    null = jnp.sum(a[r:] ** 2) + jnp.sum(b[r:] ** 2)
    return pairs / 4 + null * _safe_inv(s1) / 2


def directional_first(U, s, V, E, gap_tol):
    r"""One-sided derivative $\lim_{\varepsilon \downarrow 0} (\sigma_1(W + \varepsilon E) -
    \sigma_1(W)) / \varepsilon$: $\lambda_{\max}(\operatorname{sym}(U_c^\top E V_c))$ over the top
    cluster $c = \{j : \sigma_1 - \sigma_j \le \text{gap\_tol}\, \sigma_1\}$, and
    $\sigma_1(E)$ when $W = 0$."""
    r = s.shape[0]
    s1 = s[0]

    def cluster():
        M = _mm(U[:, :r].T, _mm(E, V[:, :r]))
        S = (M + M.T) / 2
        inside = (s1 - s) <= gap_tol * s1
        # Off-cluster rows/columns are replaced by -c I with c > ||S||_2, so they never win.
        c = 2 * jnp.sqrt(jnp.sum(S**2)) + 1
        both = inside[:, None] & inside[None, :]
        masked = jnp.where(both, S, 0) - jnp.diag(jnp.where(inside, 0, c))
        return jnp.linalg.eigvalsh(masked)[-1]

    def zero_matrix():
        return jnp.linalg.svd(E, compute_uv=False)[0]

    return lax.cond(s1 > 0, cluster, zero_matrix)


def first_coefficient(U, s, V, a, E, degenerate, gap_tol):
    return lax.cond(degenerate, lambda: directional_first(U, s, V, E, gap_tol), lambda: a[0])


def hessian_factors(U, s, V):
    r"""$(g, w)$ with $\frac12 \nabla^2 \sigma_1 = \sum_k w_k g_k g_k^\top$ on row-major
    $\operatorname{vec}$: $m + n - 2$ rank-one terms (the other eigenvectors of the dilation)."""
    m, n, r = U.shape[0], V.shape[0], s.shape[0]
    u1, v1 = U[:, 0], V[:, 0]
    A = U.T[:, :, None] * v1[None, None, :]  # A[j] = u_j v1^T
    B = u1[None, :, None] * V.T[:, None, :]  # B[k] = u1 v_k^T
    g = jnp.concatenate(
        [(A[1:r] + B[1:r]) / 2, (A[1:r] - B[1:r]) / 2, A[r:] / math.sqrt(2), B[r:] / math.sqrt(2)]
    ).reshape(m + n - 2, m * n)
    s1 = s[0]
    inv_s1 = jnp.full((m + n - 2 * r,), _safe_inv(s1))
    w = jnp.concatenate([_safe_inv(s1 - s[1:]), _safe_inv(s1 + s[1:]), inv_s1])
    return g, w


def expected_isotropic(s, m, n):
    r"""$\sum_{j \ge 2} \sigma_1 / (\sigma_1^2 - \sigma_j^2) + (m + n - 2r) / (2 \sigma_1)$, the
    mean of the second coefficient per unit entry variance (each term as
    $\frac12 [1/(\sigma_1 - \sigma_j) + 1/(\sigma_1 + \sigma_j)]$, accurate for close pairs)."""
    r = s.shape[0]
    s1 = s[0]
    pairs = jnp.sum(_safe_inv(s1 - s[1:]) + _safe_inv(s1 + s[1:])) / 2
    return pairs + (m + n - 2 * r) * _safe_inv(s1) / 2


def expected_second(U, s, V, cov):
    r"""$\mathbb{E}[\text{second}(E)] = \operatorname{tr}(Q \Sigma)$ for $\operatorname{vec} E
    \sim N(0, \Sigma)$; ``cov`` is $\Sigma$ or a scalar $s^2$ ($\Sigma = s^2 I$)."""
    m, n = U.shape[0], V.shape[0]
    if cov.ndim == 0:
        return cov * expected_isotropic(s, m, n)
    g, w = hessian_factors(U, s, V)
    return jnp.sum(w * jnp.sum(_mm(g, cov) * g, axis=1))


def jacobian_variance(U, V, cov):
    r"""$g_1^\top \Sigma g_1$, $g_1 = \operatorname{vec}(u_1 v_1^\top)$: the variance of
    $u_1^\top E v_1$."""
    if cov.ndim == 0:
        return cov
    g1 = jnp.outer(U[:, 0], V[:, 0]).reshape(-1)
    return _mm(g1, _mm(cov, g1))


def over_batch(fn, n_batch, in_axes):
    """``fn`` vmapped ``n_batch`` times over the leading axis of the arguments marked 0."""
    for _ in range(n_batch):
        fn = jax.vmap(fn, in_axes=in_axes)
    return fn
