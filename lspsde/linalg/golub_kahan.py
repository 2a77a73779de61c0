r"""Golub–Kahan–Lanczos bidiagonalisation for $\sigma_1(A)$ (``method="lanczos"``)."""

import math

import jax
from jax import lax
import jax.numpy as jnp

from .krylov import _HIGHEST, _reorthogonalise
from .tridiagonal import _eigenvalues_by_bisection, _last_components


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
