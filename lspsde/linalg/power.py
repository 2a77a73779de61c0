r"""Power iteration on $A^\top A$ for $\sigma_1(A)$ (``method="power"``)."""

import math

from jax import lax
import jax.numpy as jnp


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
