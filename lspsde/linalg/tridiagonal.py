"""The small problem per step (see ``lspsde.linalg``): eigenvalues of a symmetric
tridiagonal by bisection on Sturm counts, and the last entries of its eigenvectors by one
step of inverse iteration, in pure XLA."""

from jax import lax
import jax.numpy as jnp


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
