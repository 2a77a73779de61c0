r"""Cumulative sensitivities in the log domain: $\log\|\partial\theta^t/\partial\theta^0\|_2$ and
$\log\|\partial\theta^t/\partial u^{0:t}\|_2$ along a realised trajectory.

The cumulative Jacobian is a product of $t$ one-step Jacobians,
$\partial\theta^t/\partial\theta^0 = A_{t-1} \cdots A_0$, $A_s = \partial\mathcal{A}_s/\partial
\theta(\theta^s, u^s)$. Its norm grows or decays like $e^{\alpha t}$: GD with $\eta = 1.5$ on
$\operatorname{diag}(0.5, 1, 2)$ reaches $2^{600} \approx 4\cdot 10^{180}$ at $t = 600$, beyond
which a product in floating point overflows (and a contracting one underflows to 0). So the
tangent is propagated step by step and **renormalised** after every step, its logarithmic
scale accumulated apart: the same idea as the QR (Benettin) method of ``lyapunov_spectrum``.

A product $v \mapsto J v$ therefore returns a unit vector $w$ and a log-scale $c$ with
$J v = e^{c} w$. The Krylov solvers of ``lspsde.linalg`` (Golub–Kahan, power iteration) and the
dense SVD then run on the *rescaled* operator $\tilde J = e^{-S} J$, where $S = \log\|J v_0\|$
for the solver's starting vector $v_0$, so that every product is of order one: the answer is
$\log\|J\|_2 = S + \log\|\tilde J\|_2$, right whether the system contracts or explodes, at any
horizon. A value that cannot be computed (a non-finite trajectory or Jacobian) is NaN with
``converged=False``; $-\infty$ arises only when the Jacobian is exactly zero (a step that maps
every neighbour to one point), never from overflow or underflow.

For the temporal block $J_u v = \sum_{s<t} A_{t-1}\cdots A_{s+1} B_s v_s$
($B_s = \partial\mathcal{A}_s/\partial u$) the forward recursion $w \leftarrow A_s w + B_s v_s$
is carried as $e^{c} w$: the two terms are normalised apart and added at the larger of their two
scales, and the transpose returns each $B_s^\top \lambda_{s+1}$ with its own log-scale.

Each product costs one JVP (or VJP) of the one-step map per step up to $t$, linearising the step
afresh (the tangent cannot be carried through a stored linearisation of the whole $t$-step map
without overflowing it).
"""

from collections.abc import Callable

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PyTree

from .linalg.krylov import default_v0
from .linalg.norms import operator_norm_impl

__all__ = ["log_cumulative_norms"]


def _normalise(z: Array) -> tuple[Array, Array]:
    """``(z / ||z||, log ||z||)``; a zero ``z`` stays zero with log-scale ``-inf``. The norm is
    taken of ``z / max|z|``, so that entries past the square root of the float range (where
    ``sum(z**2)`` would overflow) are still normalised exactly."""
    top = jnp.max(jnp.abs(z))
    safe = jnp.where(top > 0, top, 1)
    y = z / safe
    n = jnp.linalg.norm(y)
    return y / jnp.where(n > 0, n, 1), jnp.log(top) + jnp.log(n)


def _log_norm(mv, rmv, n: int, dtype, method: str, max_steps: int, rtol: float):
    r"""$\log\|J\|_2$ from log-domain products ``mv(v) -> (w, c)``, ``rmv(y) -> (w, c)`` with
    $Jv = e^c w$ (see the module docstring)."""
    v0 = default_v0(None, n, dtype)
    _, S = mv(v0)
    S = jnp.where(jnp.isfinite(S), S, 0.0)  # J v0 = 0 (or a non-finite J: NaN follows anyway)
    scaled = lambda f: lambda x: (lambda w, c: jnp.exp(c - S) * w)(*f(x))
    if method == "dense":
        J = jax.vmap(scaled(mv), out_axes=1)(jnp.eye(n, dtype=dtype))
        sigma, ok = jnp.linalg.svd(J, compute_uv=False)[0], jnp.array(True)
    else:
        res = operator_norm_impl(scaled(mv), scaled(rmv), v0, method, max_steps, rtol)
        sigma, ok = res.value, res.converged
    log_sigma = S + jnp.log(sigma)
    nan = jnp.isnan(log_sigma) | (log_sigma == jnp.inf)
    return jnp.where(nan, jnp.nan, log_sigma), ok & ~nan


def log_cumulative_norms(
    step: Callable,
    thetas: PyTree[Float[Array, "T1 ..."]],
    us: PyTree[Array],
    t: Array,
    *,
    method: str,
    max_steps: int,
    rtol: float,
    with_u: bool,
) -> tuple[Array, Bool[Array, ""], Array, Bool[Array, ""]]:
    r"""$\log\|\partial\theta^t/\partial\theta^0\|_2$ and, with ``with_u``,
    $\log\|\partial\theta^t/\partial u^{0:t}\|_2$ along the trajectory ``thetas`` ($\theta^0..
    \theta^T$) driven by the draws ``us`` ($u^0..u^{T-1}$), with $\theta^{s+1}$ =
    ``step(s, theta_s, u_s)``.

    ``t`` may be traced; steps $s \ge t$ are skipped (masked), so one program serves every
    saved step. ``method`` is ``"lanczos"``, ``"power"`` or ``"dense"``.

    **Returns:** ``(log_cum_theta, converged_theta, log_cum_u, converged_u)`` (the last two
    ``-inf``/``True`` at $t = 0$, NaN/``True`` placeholders without ``with_u``).
    """
    theta_template = jax.tree.map(lambda a: a[0], thetas)
    _, unravel_theta = ravel_pytree(theta_template)
    flat_thetas = jax.vmap(lambda th: ravel_pytree(th)[0])(thetas)
    n_steps = flat_thetas.shape[0] - 1
    d = flat_thetas.shape[1]
    dtype = flat_thetas.dtype
    u_at = lambda s: jax.tree.map(lambda a: a[s], us)

    def flat_step(s, th, u):
        return ravel_pytree(step(s, unravel_theta(th), u))[0].astype(dtype)

    forward_steps = jnp.arange(n_steps)
    backward_steps = forward_steps[::-1]

    # --- d theta^t / d theta^0 -----------------------------------------------------------------
    def mv_theta(v):
        def body(carry, s):
            w, c = carry
            _, jw = jax.jvp(lambda th: flat_step(s, th, u_at(s)), (flat_thetas[s],), (w,))
            wn, dc = _normalise(jw)
            on = s < t
            return (jnp.where(on, wn, w), jnp.where(on, c + dc, c)), None

        w0, c0 = _normalise(v)
        return jax.lax.scan(body, (w0, c0), forward_steps)[0]

    def rmv_theta(y):
        def body(carry, s):
            lam, c = carry
            _, vjp = jax.vjp(lambda th: flat_step(s, th, u_at(s)), flat_thetas[s])
            ln, dc = _normalise(vjp(lam)[0])
            on = s < t
            return (jnp.where(on, ln, lam), jnp.where(on, c + dc, c)), None

        l0, c0 = _normalise(y)
        return jax.lax.scan(body, (l0, c0), backward_steps)[0]

    log_th, ok_th = _log_norm(mv_theta, rmv_theta, d, dtype, method, max_steps, rtol)
    if not with_u:
        return log_th, ok_th, jnp.full((), jnp.nan, dtype), jnp.array(True)
    _, unravel_u = ravel_pytree(u_at(0))
    flat_us = jax.vmap(lambda u: ravel_pytree(u)[0])(us)
    m = flat_us.shape[1]
    flat_step_u = lambda s, th, u: flat_step(s, th, unravel_u(u))

    # --- d theta^t / d u^{0:t} -----------------------------------------------------------------
    def mv_u(v):
        vs = v.reshape(n_steps, m)

        def body(carry, s):
            w, c = carry
            # A_s (e^c w) + B_s v_s with the two terms normalised apart and added at the
            # larger scale: neither can overflow, and a vanishing e^c never flushes to zero
            # (clamping the scale at 1 would lose everything below e^-745).
            _, lin = jax.linearize(lambda th, u: flat_step_u(s, th, u), flat_thetas[s], flat_us[s])
            wa, ca = _normalise(lin(w, jnp.zeros(m, dtype)))
            wb, cb = _normalise(lin(jnp.zeros(d, dtype), vs[s]))
            ca = c + ca
            top = jnp.maximum(ca, cb)
            top = jnp.where(jnp.isfinite(top), top, 0.0)
            wn, dc = _normalise(jnp.exp(ca - top) * wa + jnp.exp(cb - top) * wb)
            on = s < t
            return (jnp.where(on, wn, w), jnp.where(on, top + dc, c)), None

        init = (jnp.zeros(d, dtype), jnp.full((), -jnp.inf, dtype))
        return jax.lax.scan(body, init, forward_steps)[0]

    def rmv_u(y):
        def body(carry, s):
            lam, c = carry
            _, vjp = jax.vjp(lambda th, u: flat_step_u(s, th, u), flat_thetas[s], flat_us[s])
            g_th, g_u = vjp(lam)
            gu, cu = _normalise(g_u)
            ln, dc = _normalise(g_th)
            on = s < t
            out = (jnp.where(on, gu, 0.0), jnp.where(on, c + cu, -jnp.inf))
            return (jnp.where(on, ln, lam), jnp.where(on, c + dc, c)), out

        l0, c0 = _normalise(y)
        _, (gus, cs) = jax.lax.scan(body, (l0, c0), backward_steps)
        gus, cs = gus[::-1], cs[::-1]  # back to s = 0..T-1
        top = jnp.max(cs)
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        w, c = _normalise((jnp.exp(cs - top)[:, None] * gus).reshape(-1))
        return w, c + top

    log_u, ok_u = _log_norm(mv_u, rmv_u, n_steps * m, dtype, method, max_steps, rtol)
    log_u = jnp.where(t == 0, -jnp.inf, log_u)
    return log_th, ok_th, log_u, ok_u | (t == 0)
