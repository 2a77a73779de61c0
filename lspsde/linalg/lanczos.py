"""Symmetric Lanczos tridiagonalisation for the extreme eigenvalues of a symmetric map."""

import math

from jax import lax
import jax.numpy as jnp

from .krylov import _HIGHEST, _reorthogonalise
from .results import EigResult
from .tridiagonal import _eigenvalues_by_bisection, _last_components


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
