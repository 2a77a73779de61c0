r"""Matrix-free operator norms and extreme eigenvalues.

The Learning Stability Profile needs operator 2-norms $\|J\|_2 = \sigma_1(J)$ of Jacobian blocks
$J = \partial f / \partial x$ of learning maps, and the extreme Hessian eigenvalues $\mu, L$ of
objectives. Both are computed here from matrix-vector products only, so that networks with
$10^6$ parameters never materialise a $10^6 \times 10^6$ matrix: memory is
$O(n \cdot \text{max\_steps})$.

**Algorithms.**

- ``method="lanczos"`` (default): Golub–Kahan–Lanczos bidiagonalisation (Golub & Kahan 1965;
  Golub & Van Loan, *Matrix Computations*, 4th ed., §10.4) with full reorthogonalisation
  (classical Gram–Schmidt applied twice, "twice is enough") against preallocated bases
  $U \in \mathbb{R}^{k \times m}$, $V \in \mathbb{R}^{k \times n}$. After $j$ steps
  $A V_j = U_j B_j$ with $B_j$ upper bidiagonal; $\sigma_1(B_j) \uparrow \sigma_1(A)$.
- ``method="power"``: power iteration on $A^\top A$ (Golub & Van Loan §7.3.1). Its error decays
  like $(\sigma_2 / \sigma_1)^{2j}$, against roughly $\exp(-4 j \sqrt{\gamma})$,
  $\gamma = (\sigma_1^2 - \sigma_2^2)/(\sigma_2^2 - \sigma_n^2)$, for Lanczos (Kaniel–Paige–Saad
  bound): with clustered top singular values Lanczos needs far fewer products.
- :func:`extreme_eigenvalues`: symmetric Lanczos tridiagonalisation with full
  reorthogonalisation (Golub & Van Loan §10.1) for $\lambda_{\min}$ and $\lambda_{\max}$.

**Stopping rules.** Lanczos (both kinds) has converged when the Ritz estimate changed by at most
``rtol`` (relative) over the last step *and* the Ritz residual bound is at most ``rtol`` (relative
to $\sigma_1^2$, resp. the spectral radius), the ARPACK / irlba criterion. A residual $r$
guarantees an exact eigenvalue within $r$ of the Ritz value (Weyl / Bauer–Fike for symmetric
matrices), so a plateau of the Ritz value inside a cluster, or on a lower singular value when
``v0`` is nearly orthogonal to the top one, is not mistaken for convergence (a test on the change
alone, or on $r \le \sqrt{\text{rtol}}$ via Kato–Temple, was measured to stop with errors up to
$4 \cdot 10^{-3}$ at ``rtol=1e-6`` on flat spectra). Power iteration converges too slowly for a
residual test: it stops when the estimated remaining error of its geometrically converging
Rayleigh quotients (Aitken: $\delta_j \rho / (1 - \rho)$, $\rho = \delta_j / \delta_{j-1}$)
is below ``rtol`` and the residual is below $\sqrt{\text{rtol}}$ — a heuristic, which can still
stop early on a plateau. Both have also converged, exactly, when the Krylov space is exhausted (a
new Lanczos vector has norm at the rounding level $\varepsilon \sqrt{n}$ times the running norm
estimate). Non-convergence is reported in ``converged`` (like lineax's result codes), never
raised; ``residual`` is always recomputed a posteriori from extra products.

**The small problem, per step.** The Ritz value comes from bisection on Sturm counts of the
(padded) tridiagonal — for Golub–Kahan the zero-diagonal "perfect shuffle" form of $B_j$, whose
eigenvalues are $\pm\sigma_i(B_j)$, so small singular values keep full accuracy — and the last
entry of its eigenvector, needed for the Ritz residual $\beta_j |x_j|$ (Paige), from one step of
inverse iteration with a definite shift (LDL^T without pivoting). Both are short ``lax.scan``s in
pure XLA: a LAPACK ``svd``/``eigh`` per step was measured at 25–40 ms on a busy 2-core CPU (BLAS
thread contention) against ~0.1 ms, and batches poorly under ``vmap``. The Ritz vector itself is
formed once, after the loop, from one small dense ``eigh``.

**Why not lineax.** ``lineax.JacobianLinearOperator.mv`` re-linearises at every product and its
transpose goes through ``jax.vjp``; here the map is linearised once with ``jax.linearize`` and
transposed with ``jax.linear_transpose``, so every product reuses the stored linearisation. This is
simpler and faster for the iterative loop, so lineax is not used.

**Compilation.** Every public function is wrapped in ``eqx.filter_jit`` with the callables as
static arguments (as ``diffrax.diffeqsolve`` does with vector fields): calling again with the same
function object and the same shapes reuses the compiled program. Pass the same function object to
benefit; arrays closed over by that function are compile-time constants.

All functions are ``jit``- and ``vmap``-able (``lax.while_loop``, static shapes); under ``vmap``
the loop runs until every batch member has stopped, with finished members frozen.
"""

from collections.abc import Callable
import math

import equinox as eqx
import jax
from jax import lax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree
import numpy as np

from ._checks import check_callable, check_in_interval, check_positive_int

__all__ = [
    "EigResult",
    "NormResult",
    "dense_hessian_extreme_eigenvalues",
    "dense_jacobian_norm",
    "extreme_eigenvalues",
    "hessian_extreme_eigenvalues",
    "jacobian_norm",
    "operator_norm",
]

_METHODS = ("lanczos", "power")
_HIGHEST = lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Results


class NormResult(eqx.Module):
    r"""Estimate of the operator 2-norm $\|A\|_2 = \sigma_1(A)$.

    **Fields:**

    - `value`: the estimate of $\sigma_1(A)$ (a lower bound up to rounding, for both methods).
    - `vector`: unit right singular vector estimate $v$ (flat, shape `(n,)`).
    - `n_steps`: iterations used; each costs one product with $A$ and one with $A^\top$.
    - `converged`: whether the stopping rule (module docstring) was met.
    - `residual`: relative residual $\|A^\top A v - s^2 v\| / s^2$, recomputed a posteriori
      ($0$ for the zero operator). A residual $r$ guarantees an eigenvalue of $A^\top A$ within
      $r s^2$ of $s^2$.
    """

    value: Float[Array, ""]
    vector: Float[Array, " n"]
    n_steps: Int[Array, ""]
    converged: Bool[Array, ""]
    residual: Float[Array, ""]


class EigResult(eqx.Module):
    r"""Extreme eigenvalues $\lambda_{\min}, \lambda_{\max}$ of a symmetric operator $H$.

    **Fields:**

    - `lambda_min`, `lambda_max`: the Ritz-value estimates (they lie inside
      $[\lambda_{\min}(H), \lambda_{\max}(H)]$ up to rounding).
    - `vector_min`, `vector_max`: the corresponding unit Ritz vectors (flat, shape `(n,)`).
    - `n_steps`: Lanczos steps used (one product with $H$ each).
    - `converged`: whether the stopping rule (module docstring) was met for both ends.
    - `residual_min`, `residual_max`: $\|H v - \lambda v\| / \max(|\lambda_{\min}|,
      |\lambda_{\max}|)$, recomputed a posteriori (relative to the spectral radius estimate, so
      the accuracy of a $\lambda_{\min}$ much smaller than $\lambda_{\max}$ is absolute, not
      relative).
    """

    lambda_min: Float[Array, ""]
    lambda_max: Float[Array, ""]
    vector_min: Float[Array, " n"]
    vector_max: Float[Array, " n"]
    n_steps: Int[Array, ""]
    converged: Bool[Array, ""]
    residual_min: Float[Array, ""]
    residual_max: Float[Array, ""]


# --------------------------------------------------------------------------------------------
# Validation (runs before tracing)


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


def _flat_function(f, x):
    """Flatten ``x`` and ``f(x)``: returns ``(f_flat, x_flat)`` on 1-D vectors of one dtype."""
    x_flat, unravel = ravel_pytree(x)

    def f_flat(z):
        return ravel_pytree(f(unravel(z)))[0].astype(x_flat.dtype)

    return f_flat, x_flat


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


def _default_v0(key, n, dtype):
    """Unit starting vector: normal from ``key``, or a fixed hash-based vector if ``None``.

    The fixed vector hashes the index (murmur3 finaliser) to uniform entries in [-1/2, 1/2): it
    is as generic as a random draw for Krylov purposes, deterministic, and costs one fused
    integer kernel, where a threefry draw adds ~0.5 s of XLA compile time per shape on CPU.
    """
    if key is None:
        h = lax.iota(jnp.uint32, n) * np.uint32(0x9E3779B9) + np.uint32(0x7F4A7C15)
        h = (h ^ (h >> 16)) * np.uint32(0x85EBCA6B)
        h = (h ^ (h >> 13)) * np.uint32(0xC2B2AE35)
        h = h ^ (h >> 16)
        v = (h >> 8).astype(dtype) * (2.0**-24) - 0.5
    else:
        v = jax.random.normal(key, (n,), dtype=dtype)
    return v / jnp.linalg.norm(v)


# --------------------------------------------------------------------------------------------
# Kernels (traced)


def _reorthogonalise(basis, w):
    """Classical Gram–Schmidt twice against the rows of ``basis`` (unused rows are zero)."""
    for _ in range(2):
        w = w - jnp.matmul(jnp.matmul(basis, w, precision=_HIGHEST), basis, precision=_HIGHEST)
    return w


def _bidiagonal(alphas, betas, j):
    """Upper-bidiagonal $B_{j+1}$ padded with zeros to the preallocated size."""
    k = alphas.shape[0]
    sup = jnp.where(jnp.arange(k - 1) < j, betas[: k - 1], 0)
    return jnp.diag(alphas) + jnp.diag(sup, 1)


def _golub_kahan_offdiag(alphas, betas, j):
    r"""Off-diagonal $(\alpha_1, \beta_1, \alpha_2, \dots, \alpha_{j+1}, 0, \dots)$.

    The symmetric tridiagonal matrix with zero diagonal and this off-diagonal is the perfect
    shuffle of $[[0, B^\top], [B, 0]]$ (Golub & Kahan 1965): its eigenvalues are
    $\pm\sigma_i(B)$ (and zeros from the padding), its eigenvector for $+\sigma$ is
    $(y_1, x_1, y_2, x_2, \dots) / \sqrt 2$ with $B y = \sigma x$.
    """
    k = alphas.shape[0]
    sup = jnp.where(jnp.arange(k) < j, betas, 0)
    return jnp.stack([alphas, sup], axis=1).reshape(2 * k)[:-1]


def _eigenvalues_by_bisection(diag, off, indices):
    r"""Eigenvalues number ``indices`` (ascending; a static tuple) of a symmetric tridiagonal.

    Bisection on Sturm counts (Golub & Van Loan §8.4.1; LAPACK ``dlaebz``): the number of
    negative ratios $q_i = (d_i - x) - e_{i-1}^2 / q_{i-1}$ is the number of eigenvalues below
    $x$. A fixed number of halvings of the Gershgorin interval reaches absolute accuracy
    $O(\varepsilon \|T\|)$; all wanted eigenvalues are bisected together. Pure XLA (no LAPACK
    call per iteration): cheap under ``vmap`` and immune to BLAS thread contention. Written out
    rather than calling ``jax.scipy.linalg.eigh_tridiagonal``, which unrolls its recurrence and
    doubles the compile time of the Lanczos loop.
    """
    dtype = diag.dtype
    finfo = jnp.finfo(dtype)
    zero = jnp.zeros((1,), dtype)
    e2 = jnp.concatenate([zero, off**2])
    e_abs = jnp.abs(off)
    radius = jnp.concatenate([e_abs, zero]) + jnp.concatenate([zero, e_abs])
    hi = jnp.max(diag + radius)
    lo = jnp.min(diag - radius)
    pivmin = float(finfo.tiny) * jnp.maximum(1, jnp.max(e2))
    slack = 4 * float(finfo.eps) * jnp.maximum(jnp.abs(hi), jnp.abs(lo)) + pivmin
    wanted = jnp.asarray(indices)
    lo = jnp.full(wanted.shape, lo - slack)
    hi = jnp.full(wanted.shape, hi + slack)

    def count_below(x):
        def step(q, inputs):
            d, e2_i = inputs
            q = (d - x) - e2_i / q
            q = jnp.where(jnp.abs(q) <= pivmin, -pivmin, q)
            return q, q < 0

        _, negative = lax.scan(step, jnp.ones(x.shape, dtype), (diag, e2))
        return jnp.sum(negative, axis=0)

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        right = count_below(mid) > wanted  # the wanted eigenvalue lies below mid
        return jnp.where(right, lo, mid), jnp.where(right, mid, hi)

    lo, hi = lax.fori_loop(0, finfo.nmant + 4, halve, (lo, hi))
    return 0.5 * (lo + hi)


def _definite_tridiagonal_solve(diag, off, rhs):
    """Solve $T z = b$ for positive definite symmetric tridiagonal $T$ (LDL^T, two scans).

    ``diag``, ``rhs``: shape ``(m, r)``, ``off``: ``(m - 1, r)`` for ``r`` independent systems.
    Without pivoting, which is backward stable for definite matrices (Golub & Van Loan §4.3.6).
    Tiny pivots from rounding are floored, as in LAPACK's perturbed inverse iteration.
    """
    dtype = diag.dtype
    floor = float(jnp.finfo(dtype).tiny / jnp.finfo(dtype).eps)
    zero = jnp.zeros((1, diag.shape[1]), dtype)
    e_prev = jnp.concatenate([zero, off])

    def forward(carry, inputs):
        p_prev, y_prev = carry
        d, e, b = inputs
        ratio = e / p_prev
        p = d - ratio * e
        p = jnp.where(jnp.abs(p) < floor, floor, p)
        y = b - ratio * y_prev
        return (p, y), (p, y)

    _, (pivots, ys) = lax.scan(forward, (jnp.ones_like(zero[0]), zero[0]), (diag, e_prev, rhs))
    e_next = jnp.concatenate([off, zero])

    def backward(z_next, inputs):
        p, e, y = inputs
        z = (y - e * z_next) / p
        return z, z

    _, z = lax.scan(backward, zero[0], (pivots, e_next, ys), reverse=True)
    return z


def _last_components(diag, off, thetas, largest, j):
    r"""$|z_j|$, $z$ the unit eigenvector of the leading $(j+1)$ block for its eigenvalue $\theta$.

    Vectorised over ``thetas`` (shape ``(r,)``), each the largest (``largest[i]`` true, a static
    tuple) or smallest eigenvalue of that block. One step of inverse iteration with the shift
    moved $16 \varepsilon \|T\|$ outside the spectrum, so that the shifted matrix is definite
    and LDL^T needs no pivoting; the other eigenvectors are damped by $16 \varepsilon \|T\| /
    \text{gap}$, so Ritz residuals $\beta_j |z_j|$ (Paige) are resolved down to the rounding
    level. (The closed form $z_j^2 = \chi_{j-1}(\theta) / \chi_j'(\theta)$ through Sturm ratios
    loses half the digits: it stalls at $\sqrt\varepsilon$, measured.)
    """
    dtype = diag.dtype
    m = diag.shape[0]
    idx = jnp.arange(m)
    active = (idx <= j)[:, None]
    e = jnp.where(idx[: m - 1] < j, off, 0)
    norm = jnp.max(jnp.abs(jnp.where(active[:, 0], diag, 0))) + 2 * jnp.max(jnp.abs(e), initial=0)
    sign = jnp.asarray([1 if up else -1 for up in largest], dtype)
    shift = thetas + sign * 16 * float(jnp.finfo(dtype).eps) * norm
    # sign * (shift - T) is positive definite.
    d = jnp.where(active, sign[None, :] * (shift[None, :] - diag[:, None]), 1)
    e = -sign[None, :] * e[:, None]
    # A fixed generic start: not orthogonal to any particular eigenvector.
    start = 1 + 0.5 * jnp.sin(1.618 * idx.astype(dtype) + 0.7)
    z = jnp.where(
        active, _definite_tridiagonal_solve(d, e, jnp.where(active, start[:, None], 0)), 0
    )
    nz = jnp.linalg.norm(z, axis=0)
    return jnp.abs(z[j]) / jnp.where(nz > 0, nz, 1)


def _small_tail(delta, delta_prev, sigma, j, rtol, eps):
    """Has a monotone sequence of estimates with last increments ``delta_prev, delta`` settled?

    The estimates (Rayleigh quotients, Ritz values) increase towards the limit; if the increments
    shrink geometrically, delta_j ~ rho^j, the remaining error is about delta rho / (1 - rho)
    with rho = delta / delta_prev (Aitken). A plain "delta < rtol" test stops far too early when
    the increments shrink slowly (sigma_2 / sigma_1 close to 1). Increments at the rounding level
    count as settled. ``j`` is the 0-based index of the current step.
    """
    rho = delta / jnp.where(delta_prev > 0, delta_prev, 1)
    tail = delta * rho / jnp.where(rho < 1, 1 - rho, 1)
    small_tail = (j > 1) & (rho < 1) & (tail <= rtol * sigma)
    stagnant = (j > 0) & (delta <= 4 * eps * sigma)
    return small_tail | stagnant


def _golub_kahan(mv, rmv, v0, k, rtol):
    dtype = v0.dtype
    n = v0.shape[0]
    m = jax.eval_shape(mv, v0).shape[0]
    eps = float(jnp.finfo(dtype).eps)
    breakdown = eps * math.sqrt(max(n, m))
    v1 = v0 / jnp.linalg.norm(v0)
    zero = jnp.zeros((), dtype)

    init = dict(
        j=jnp.array(0, jnp.int32),
        U=jnp.zeros((k, m), dtype),
        V=jnp.zeros((k, n), dtype).at[0].set(v1),
        u_prev=jnp.zeros((m,), dtype),
        beta_prev=zero,
        alphas=jnp.zeros((k,), dtype),
        betas=jnp.zeros((k,), dtype),
        scale=zero,
        sigma=zero,
        done=jnp.array(False),
        nonfinite=jnp.array(False),
    )

    def cond(c):
        return (c["j"] < k) & ~c["done"]

    def body(c):
        j, U, V = c["j"], c["U"], c["V"]
        v = V[j]
        # u_j = A v_j - beta_{j-1} u_{j-1}, reorthogonalised against U.
        u = _reorthogonalise(U, mv(v) - c["beta_prev"] * c["u_prev"])
        alpha = jnp.linalg.norm(u)
        nonfinite = c["nonfinite"] | ~jnp.isfinite(alpha)
        scale = jnp.maximum(c["scale"], alpha)
        ok_a = alpha > breakdown * scale
        alpha = jnp.where(ok_a, alpha, 0)
        u = jnp.where(ok_a, u / jnp.where(ok_a, alpha, 1), 0)
        U = U.at[j].set(u)
        # v_{j+1} = A^T u_j - alpha_j v_j, reorthogonalised against V.
        w = _reorthogonalise(V, rmv(u) - alpha * v)
        beta = jnp.linalg.norm(w)
        nonfinite = nonfinite | ~jnp.isfinite(beta)
        scale = jnp.maximum(scale, beta)
        ok_b = ok_a & (beta > breakdown * scale)
        beta = jnp.where(ok_b, beta, 0)
        w = jnp.where(ok_b, w / jnp.where(ok_b, beta, 1), 0)
        V = V.at[j + 1].set(w, mode="drop")
        alphas = c["alphas"].at[j].set(alpha)
        betas = c["betas"].at[j].set(beta)
        # Ritz value sigma = sigma_1(B_{j+1}) by bisection on the Golub-Kahan tridiagonal; the
        # Ritz residual A^T A (V y) - sigma^2 V y = sigma beta_j x_j v_{j+1} (x = B y / sigma) needs
        # only the last entry x_j of the left singular vector (= sqrt(2) z_{2j+1}).
        off = _golub_kahan_offdiag(alphas, betas, j)
        zero_diag = jnp.zeros((2 * k,), dtype)
        sigma = jnp.maximum(_eigenvalues_by_bisection(zero_diag, off, (2 * k - 1,))[0], 0)
        safe = jnp.where(sigma > 0, sigma, 1)
        x_j = math.sqrt(2) * _last_components(zero_diag, off, sigma[None], (True,), 2 * j + 1)[0]
        ritz_res = beta * x_j / safe  # relative to sigma^2
        exhausted = ~ok_b
        delta = jnp.abs(sigma - c["sigma"])
        done = exhausted | nonfinite | ((delta <= rtol * sigma) & (ritz_res <= rtol))
        return dict(
            j=j + 1,
            U=U,
            V=V,
            u_prev=u,
            beta_prev=beta,
            alphas=alphas,
            betas=betas,
            scale=scale,
            sigma=sigma,
            done=done,
            nonfinite=nonfinite,
        )

    c = lax.while_loop(cond, body, init)
    # Right singular vector of B once, from the top eigenvector of B^T B (one small eigh).
    B = _bidiagonal(c["alphas"], c["betas"], c["j"] - 1)
    y = jnp.linalg.eigh(jnp.matmul(B.T, B, precision=_HIGHEST))[1][:, -1]
    v = jnp.matmul(y, c["V"], precision=_HIGHEST)
    nv = jnp.linalg.norm(v)
    # sigma = 0 (zero operator): the singular vector is arbitrary; return the start vector.
    v = jnp.where(nv > 0.5, v / jnp.where(nv > 0.5, nv, 1), v1)
    # A non-finite Jacobian-vector product (an overflowing map) is NaN, never a finite norm.
    sigma = jnp.where(c["nonfinite"], jnp.nan, c["sigma"])
    return sigma, v, c["j"], c["done"] & ~c["nonfinite"]


def _power(mv, rmv, v0, max_steps, rtol):
    dtype = v0.dtype
    n = v0.shape[0]
    eps = float(jnp.finfo(dtype).eps)
    sqrt_rtol = jnp.sqrt(jnp.asarray(rtol, dtype))
    zero = jnp.zeros((), dtype)
    v1 = v0 / jnp.linalg.norm(v0)
    init = dict(
        j=jnp.array(0, jnp.int32),
        v=v1,
        v_next=v1,
        sigma=zero,
        delta=zero,
        done=jnp.array(False),
    )

    def cond(c):
        return (c["j"] < max_steps) & ~c["done"]

    def body(c):
        v = c["v_next"]
        w = rmv(mv(v))
        theta = jnp.vdot(v, w)  # = ||A v||^2, the Rayleigh quotient of A^T A
        sigma = jnp.sqrt(jnp.maximum(theta, 0))
        safe = jnp.where(theta > 0, theta, 1)
        res = jnp.linalg.norm(w - theta * v) / safe
        # theta = 0: v is in the null space (zero operator); res ~ eps: exact eigenvector.
        exact = (theta <= 0) | (res <= eps * math.sqrt(n))
        delta = jnp.abs(sigma - c["sigma"])
        done = exact | (
            _small_tail(delta, c["delta"], sigma, c["j"], rtol, eps) & (res <= sqrt_rtol)
        )
        nw = jnp.linalg.norm(w)
        v_next = jnp.where(nw > 0, w / jnp.where(nw > 0, nw, 1), v)
        return dict(j=c["j"] + 1, v=v, v_next=v_next, sigma=sigma, delta=delta, done=done)

    c = lax.while_loop(cond, body, init)
    return c["sigma"], c["v"], c["j"], c["done"]


def _norm_result(mv, rmv, sigma, v, n_steps, converged):
    w = rmv(mv(v))
    s2 = sigma**2
    residual = jnp.linalg.norm(w - s2 * v) / jnp.where(s2 > 0, s2, 1)
    return NormResult(
        value=sigma, vector=v, n_steps=n_steps, converged=converged, residual=residual
    )


def _operator_norm_impl(mv, rmv, v0, method, max_steps, rtol):
    if rmv is None:
        transpose = jax.linear_transpose(mv, jax.ShapeDtypeStruct(v0.shape, v0.dtype))

        def rmv(u):
            return transpose(u)[0]

    if method == "lanczos":
        k = min(max_steps, v0.shape[0])
        sigma, v, j, done = _golub_kahan(mv, rmv, v0, k, rtol)
    else:
        sigma, v, j, done = _power(mv, rmv, v0, max_steps, rtol)
    return _norm_result(mv, rmv, sigma, v, j, done)


_operator_norm_jit = eqx.filter_jit(_operator_norm_impl)


def _padded_tridiagonal(alphas, betas, j, fill):
    """Diagonal and off-diagonal of $T_{j+1}$, unused diagonal entries set to ``fill``."""
    k = alphas.shape[0]
    idx = jnp.arange(k)
    diag = jnp.where(idx <= j, alphas, fill)
    off = jnp.where(idx[: k - 1] < j, betas[: k - 1], 0)
    return diag, off


def _lanczos(hvp, v0, k, rtol):
    dtype = v0.dtype
    n = v0.shape[0]
    eps = float(jnp.finfo(dtype).eps)
    tiny = float(jnp.finfo(dtype).tiny)
    breakdown = eps * math.sqrt(n)
    zero = jnp.zeros((), dtype)
    q1 = v0 / jnp.linalg.norm(v0)
    init = dict(
        j=jnp.array(0, jnp.int32),
        Q=jnp.zeros((k, n), dtype).at[0].set(q1),
        q_prev=jnp.zeros((n,), dtype),
        beta_prev=zero,
        alphas=jnp.zeros((k,), dtype),
        betas=jnp.zeros((k,), dtype),
        scale=zero,
        lam_min=zero,
        lam_max=zero,
        done=jnp.array(False),
    )

    def cond(c):
        return (c["j"] < k) & ~c["done"]

    def body(c):
        j, Q = c["j"], c["Q"]
        q = Q[j]
        w = hvp(q)
        alpha = jnp.vdot(q, w)
        w = _reorthogonalise(Q, w - alpha * q - c["beta_prev"] * c["q_prev"])
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(c["scale"], jnp.maximum(jnp.abs(alpha), beta))
        ok = beta > breakdown * scale
        beta = jnp.where(ok, beta, 0)
        q_next = jnp.where(ok, w / jnp.where(ok, beta, 1), 0)
        Q = Q.at[j + 1].set(q_next, mode="drop")
        alphas = c["alphas"].at[j].set(alpha)
        betas = c["betas"].at[j].set(beta)
        # Extreme eigenvalues of T_{j+1} by bisection. The padding alpha_1 lies inside
        # [theta_min, theta_max] (Cauchy interlacing with T_1 = alpha_1), so it changes neither.
        diag, off = _padded_tridiagonal(alphas, betas, j, alphas[0])
        lam_min, lam_max = _eigenvalues_by_bisection(diag, off, (0, k - 1))
        spread = jnp.maximum(jnp.abs(lam_min), jnp.abs(lam_max))
        # Ritz residuals H Q z - theta Q z = beta_j z_j q_{j+1}.
        z_j = _last_components(alphas, off, jnp.stack([lam_min, lam_max]), (False, True), j)
        res_min, res_max = beta * z_j[0], beta * z_j[1]
        small_change = (jnp.abs(lam_min - c["lam_min"]) <= rtol * spread) & (
            jnp.abs(lam_max - c["lam_max"]) <= rtol * spread
        )
        small_res = jnp.maximum(res_min, res_max) <= rtol * spread
        done = ~ok | (small_change & small_res & (j > 0))
        return dict(
            j=j + 1,
            Q=Q,
            q_prev=q,
            beta_prev=beta,
            alphas=alphas,
            betas=betas,
            scale=scale,
            lam_min=lam_min,
            lam_max=lam_max,
            done=done,
        )

    c = lax.while_loop(cond, body, init)

    # Ritz vectors once, from a small dense eigh. Here unused diagonal entries get a value above
    # the Gershgorin bound of T_J, so the J active eigenpairs are exactly the J smallest and no
    # padded eigenvector can tie with an active one.
    last = c["j"] - 1
    _, off = _padded_tridiagonal(c["alphas"], c["betas"], last, 0)
    gersh = jnp.max(jnp.abs(c["alphas"])) + 2 * jnp.max(jnp.abs(off), initial=0)
    diag, off = _padded_tridiagonal(c["alphas"], c["betas"], last, 2 * gersh + tiny)
    _, evecs = jnp.linalg.eigh(jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1))

    def ritz_vector(z):
        v = jnp.matmul(z, c["Q"], precision=_HIGHEST)
        nv = jnp.linalg.norm(v)
        return jnp.where(nv > 0.5, v / jnp.where(nv > 0.5, nv, 1), q1)

    v_min, v_max = ritz_vector(evecs[:, 0]), ritz_vector(evecs[:, last])
    lam_min, lam_max = c["lam_min"], c["lam_max"]
    spread = jnp.maximum(jnp.abs(lam_min), jnp.abs(lam_max))
    safe = jnp.where(spread > 0, spread, 1)
    return EigResult(
        lambda_min=lam_min,
        lambda_max=lam_max,
        vector_min=v_min,
        vector_max=v_max,
        n_steps=c["j"],
        # A non-finite operator (an overflowing Hessian) stops the loop with NaN Ritz values:
        # never report that as converged.
        converged=c["done"] & jnp.isfinite(lam_min) & jnp.isfinite(lam_max),
        residual_min=jnp.linalg.norm(hvp(v_min) - lam_min * v_min) / safe,
        residual_max=jnp.linalg.norm(hvp(v_max) - lam_max * v_max) / safe,
    )


def _extreme_eigenvalues_impl(hvp, v0, max_steps, rtol):
    return _lanczos(hvp, v0, min(max_steps, v0.shape[0]), rtol)


_extreme_eigenvalues_jit = eqx.filter_jit(_extreme_eigenvalues_impl)


def _jacobian_norm_impl(f, x, method, max_steps, rtol, v0, key):
    f_flat, x_flat = _flat_function(f, x)
    _, lin = jax.linearize(f_flat, x_flat)
    transpose = jax.linear_transpose(lin, x_flat)

    def rmv(u):
        return transpose(u)[0]

    if v0 is None:
        v0 = _default_v0(key, x_flat.shape[0], x_flat.dtype)
    return _operator_norm_impl(lin, rmv, v0.astype(x_flat.dtype), method, max_steps, rtol)


_jacobian_norm_jit = eqx.filter_jit(_jacobian_norm_impl)


def _hessian_impl(loss, theta, max_steps, rtol, key):
    loss_flat, theta_flat = _flat_function(loss, theta)
    # Forward-over-reverse: linearise the gradient once; each HVP is then one JVP.
    _, hvp = jax.linearize(jax.grad(lambda z: loss_flat(z)[0]), theta_flat)
    v0 = _default_v0(key, theta_flat.shape[0], theta_flat.dtype)
    return _lanczos(hvp, v0, min(max_steps, theta_flat.shape[0]), rtol)


_hessian_jit = eqx.filter_jit(_hessian_impl)


# --------------------------------------------------------------------------------------------
# Public API


def operator_norm(
    mv: Callable[[Float[Array, " n"]], Float[Array, " m"]],
    v0: Float[Array, " n"] | Float[np.ndarray, " n"],
    *,
    rmv: Callable[[Float[Array, " m"]], Float[Array, " n"]] | None = None,
    method: str = "lanczos",
    max_steps: int = 64,
    rtol: float | Float[ArrayLike, ""] = 1e-6,
) -> NormResult:
    r"""Operator 2-norm $\|A\|_2 = \sigma_1(A)$ of a linear map given only by products.

    Golub–Kahan–Lanczos bidiagonalisation (Golub & Kahan 1965; Golub & Van Loan §10.4) with full
    reorthogonalisation, or power iteration on $A^\top A$. See the module docstring for the
    stopping rule.

    **Arguments:**

    - `mv`: the linear map $v \mapsto A v$, $\mathbb{R}^n \to \mathbb{R}^m$, on flat vectors of
      `v0`'s dtype.
    - `v0`: nonzero starting vector, shape `(n,)`; its dtype is used throughout (float32 and
      float64 both work). A random normal vector is the safe choice: a `v0` orthogonal to the top
      right singular vector can only find a smaller singular value.
    - `rmv`: the transpose $u \mapsto A^\top u$; if `None`, `jax.linear_transpose(mv, v0)`.
    - `method`: `"lanczos"` (default) or `"power"`.
    - `max_steps`: iteration cap; Lanczos preallocates `(min(max_steps, n), n)` and
      `(min(max_steps, n), m)` bases and clips `max_steps` to `n` (the Krylov space is then
      exhausted and the answer exact).
    - `rtol`: relative tolerance in $(0, 1)$.

    **Returns:**

    A :class:`NormResult`; non-convergence is `converged=False`, never an exception. The zero
    operator gives `value=0`, `converged=True`, no NaN.

    **Raises:**

    `ValueError`/`TypeError`, before tracing, for an unknown `method`, `max_steps` not an int
    >= 1, `rtol` outside $(0, 1)$, `v0` not a nonzero 1-D floating array, or `mv`/`rmv` not
    returning 1-D vectors of `v0`'s dtype.
    """
    _check_method(method)
    _check_max_steps(max_steps)
    _check_rtol(rtol)
    _check_v0(v0)
    v0 = jnp.asarray(v0)
    out = _check_linear_map("mv", mv, v0)
    if rmv is not None:
        _check_linear_map("rmv", rmv, out, expected_shape=v0.shape)
    return _operator_norm_jit(mv, rmv, v0, method, max_steps, rtol)


def jacobian_norm(
    f: Callable[[PyTree[Array]], PyTree[Array]],
    x: PyTree[Float[ArrayLike, "..."]],
    *,
    method: str = "lanczos",
    max_steps: int = 64,
    rtol: float | Float[ArrayLike, ""] = 1e-6,
    v0: Float[Array, " n"] | None = None,
    key: PRNGKeyArray | None = None,
) -> NormResult:
    r"""$\|\partial f / \partial x\,(x)\|_2$, matrix-free.

    $f$ is linearised once at $x$ (`jax.linearize`), transposed with `jax.linear_transpose`, and
    both pytrees are flattened with `jax.flatten_util.ravel_pytree`, so the iteration of
    :func:`operator_norm` runs on flat vectors. The Jacobian is never materialised: memory is
    $O(n \cdot \text{max\_steps})$ plus the linearisation's residuals.

    **Arguments:**

    - `f`: function from a pytree of floating arrays to a pytree of floating arrays.
    - `x`: the point (pytree); its flattened dtype is used throughout.
    - `method`, `max_steps`, `rtol`: as in :func:`operator_norm`.
    - `v0`: flat starting vector of shape `(n,)`, `n` the total size of `x`. Default: a normal
      vector drawn from `key`, or, if `key` is `None`, a fixed deterministic pseudo-random
      vector (an index hash; cheaper to compile than `jax.random`).
    - `key`: PRNG key for the default `v0`.

    **Returns:**

    A :class:`NormResult` whose `vector` is flat (unflatten with `ravel_pytree(x)[1]`).

    **Raises:**

    As :func:`operator_norm`; also `TypeError` for non-floating leaves of `x` or of `f(x)`.
    """
    check_callable("f", f)
    _check_method(method)
    _check_max_steps(max_steps)
    _check_rtol(rtol)
    _check_float_pytree("x", x)
    _check_function_output("f", f, x)
    if v0 is not None:
        _check_v0(v0)
        n = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(x))
        if v0.shape[0] != n:
            raise ValueError(
                f"`v0` has length {v0.shape[0]} but `x` has {n} entries in total; pass a flat "
                "vector of that length (see `jax.flatten_util.ravel_pytree`)."
            )
    return _jacobian_norm_jit(f, x, method, max_steps, rtol, v0, key)


def dense_jacobian_norm(
    f: Callable[[PyTree[Array]], PyTree[Array]], x: PyTree[Float[ArrayLike, "..."]]
) -> Float[Array, ""]:
    r"""Exact $\|\partial f/\partial x\,(x)\|_2$ by materialising the Jacobian.

    `jax.jacfwd` of the flattened map gives the $(m, n)$ matrix $J$; the result is its largest
    singular value. Memory $O(mn)$: for small systems and cross-checks only.

    **Arguments:**

    - `f`, `x`: as in :func:`jacobian_norm`.

    **Returns:**

    The scalar $\sigma_1(J)$.
    """
    check_callable("f", f)
    _check_float_pytree("x", x)
    _check_function_output("f", f, x)
    f_flat, x_flat = _flat_function(f, x)
    J = jax.jacfwd(f_flat)(x_flat)
    return jnp.linalg.svd(J, compute_uv=False)[0]


def extreme_eigenvalues(
    hvp: Callable[[Float[Array, " n"]], Float[Array, " n"]],
    v0: Float[Array, " n"] | Float[np.ndarray, " n"],
    *,
    max_steps: int = 64,
    rtol: float | Float[ArrayLike, ""] = 1e-6,
) -> EigResult:
    r"""Smallest and largest eigenvalue of a symmetric linear map, by Lanczos.

    Symmetric Lanczos tridiagonalisation $H Q_j = Q_j T_j + \beta_j q_{j+1} e_j^\top$ with full
    reorthogonalisation (Golub & Van Loan §10.1); the extreme eigenvalues of $T_j$ are the
    estimates. Tolerances are relative to the spectral radius estimate
    $\max(|\lambda_{\min}|, |\lambda_{\max}|)$.

    **Arguments:**

    - `hvp`: symmetric linear map $\mathbb{R}^n \to \mathbb{R}^n$ on flat vectors (symmetry is
      assumed, not checked).
    - `v0`: nonzero starting vector of shape `(n,)`; its dtype is used throughout.
    - `max_steps`: Krylov dimension cap, clipped to `n`.
    - `rtol`: relative tolerance in $(0, 1)$.

    **Returns:**

    An :class:`EigResult`.

    **Raises:**

    `ValueError`/`TypeError` before tracing, as :func:`operator_norm`; also if `hvp` does not map
    shape `(n,)` to `(n,)`.
    """
    _check_max_steps(max_steps)
    _check_rtol(rtol)
    _check_v0(v0)
    v0 = jnp.asarray(v0)
    _check_linear_map("hvp", hvp, v0, expected_shape=v0.shape)
    return _extreme_eigenvalues_jit(hvp, v0, max_steps, rtol)


def hessian_extreme_eigenvalues(
    loss: Callable[[PyTree[Array]], Float[Array, ""]],
    theta: PyTree[Float[ArrayLike, "..."]],
    *,
    max_steps: int = 64,
    rtol: float | Float[ArrayLike, ""] = 1e-6,
    key: PRNGKeyArray | None = None,
) -> EigResult:
    r"""Extreme eigenvalues of $\nabla^2 \ell(\theta)$, matrix-free.

    Hessian-vector products are forward-over-reverse (`jax.linearize` of `jax.grad`, i.e. the
    `jax.jvp` of the gradient with the linearisation stored once), fed to
    :func:`extreme_eigenvalues`. For a convex objective, `lambda_min` and `lambda_max` estimate
    the local strong convexity $\mu$ and smoothness $L$; note that the accuracy of
    `lambda_min` is relative to $L$, not to $\mu$.

    **Arguments:**

    - `loss`: scalar function of a pytree of floating arrays.
    - `theta`: the point (pytree).
    - `max_steps`, `rtol`: as in :func:`extreme_eigenvalues`.
    - `key`: PRNG key for a normal random start; `None` (default): the fixed deterministic
      pseudo-random start of :func:`jacobian_norm`.

    **Returns:**

    An :class:`EigResult` with flat vectors.
    """
    check_callable("loss", loss)
    _check_max_steps(max_steps)
    _check_rtol(rtol)
    _check_float_pytree("theta", theta)
    _check_function_output("loss", loss, theta, scalar=True)
    return _hessian_jit(loss, theta, max_steps, rtol, key)


def dense_hessian_extreme_eigenvalues(
    loss: Callable[[PyTree[Array]], Float[Array, ""]], theta: PyTree[Float[ArrayLike, "..."]]
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    r"""Exact $(\lambda_{\min}, \lambda_{\max})$ of $\nabla^2 \ell(\theta)$ via `jax.hessian`.

    **Arguments:**

    - `loss`, `theta`: as in :func:`hessian_extreme_eigenvalues`.

    **Returns:**

    `(lambda_min, lambda_max)` from `eigvalsh` of the symmetrised dense Hessian ($O(n^2)$ memory).
    """
    check_callable("loss", loss)
    _check_float_pytree("theta", theta)
    _check_function_output("loss", loss, theta, scalar=True)
    loss_flat, theta_flat = _flat_function(loss, theta)
    H = jax.hessian(lambda z: loss_flat(z)[0])(theta_flat)
    w = jnp.linalg.eigvalsh(0.5 * (H + H.T))
    return w[0], w[-1]
