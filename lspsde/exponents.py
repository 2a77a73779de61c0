r"""Finite-horizon stability exponents (Section 2, Proposition 2.1, Definition 6.2).

The paper defines, e.g., the forward exponent as

$$\alpha_x = \limsup_{L,T\to\infty} \frac{1}{L+T}\log \sup_{0\le k\le L,\,0\le t\le T}
\|\partial_{Z_{0,0}} X_{k,t}\|.$$

Two finite-horizon versions are computed here, because they differ:

- the **sup exponent** (the definition as written): $\frac1H \log \sup_{0 \le n \le H} \|J_n\|$.
  Since $J_0 = I$ has norm 1, it is never negative; it measures boundedness (Proposition 2.1:
  $\alpha \le 0$ iff the sensitivities stay bounded);
- the **growth rate** $\frac1H \log \|J_H\|$ (what the proofs of Theorems 4.1 and 4.3 bound:
  "taking logarithmic growth rates"). This is the quantity compared with $\log\rho$ and
  $\frac12 \log(1 - 2hm + h^2 M_g^2)$; it can be negative.

The per-layer or per-step growth rates are $\log \sigma_k$; their mean over the horizon bounds the
growth rate from above (submultiplicativity).
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from .profile import StabilityProfile


def growth_rate(norm: Float[ArrayLike, "..."], horizon: ArrayLike) -> Float[Array, "..."]:
    r"""$\frac{1}{H} \log \|J_H\|$: the finite-horizon logarithmic growth rate."""
    return jnp.log(jnp.asarray(norm)) / jnp.asarray(horizon)


def sup_exponent(norms: Float[ArrayLike, "... H"], *, include_identity: bool = True) -> Array:
    r"""$\frac1H \log \sup_{0\le n\le H}\|J_n\|$ over the last axis (the paper's definition).

    With ``include_identity`` (default) the $n = 0$ term $\|J_0\| = \|I\| = 1$ is included, as in
    the definition; the result is then $\ge 0$.
    """
    norms = jnp.asarray(norms)
    sup = jnp.max(norms, axis=-1)
    if include_identity:
        sup = jnp.maximum(sup, 1.0)
    return jnp.log(sup) / norms.shape[-1]


def mean_log_norm(norms: Float[ArrayLike, "... H"]) -> Float[Array, "..."]:
    r"""$\frac1H\sum_n \log \sigma_n$: the average one-step growth, an upper bound on the rate."""
    return jnp.mean(jnp.log(jnp.asarray(norms)), axis=-1)


class StabilityExponents(eqx.Module):
    r"""Finite-horizon exponents of a [`StabilityProfile`][lspsde.profile.StabilityProfile].

    - ``alpha_x``: depth growth rate $\frac1L\log\|\partial X_L/\partial X_0\|$ at each saved step.
    - ``alpha_x_sup``: the same with the paper's $\sup_k$ (never negative).
    - ``alpha_theta``: $\frac1T\log\|\partial\theta^T/\partial\theta^0\|$.
    - ``alpha_theta_sup``: $\frac1T\log\sup_t\|\partial\theta^t/\partial\theta^0\|$ (saved steps).
    - ``alpha_u``: $\frac1T\log\sup_t\|\partial\theta^t/\partial u^{0:t}\|$ (bounded temporal
      sensitivity, Theorem 5.2(3), gives $\alpha_u \to 0^-$ or below).
    """

    alpha_x: Float[Array, " T"] | None
    alpha_x_sup: Float[Array, " T"] | None
    alpha_theta: Float[Array, ""]
    alpha_theta_sup: Float[Array, ""]
    alpha_u: Float[Array, ""] | None


def stability_exponents(profile: StabilityProfile) -> StabilityExponents:
    """Finite-horizon exponents from a profile (see the module docstring for the two kinds).

    The time exponents come from the profile's log-domain cumulative norms, so they are right
    however far the norms are beyond the floating-point range; NaN where a norm could not be
    computed (the profile's ``converged`` is then false)."""
    T = profile.n_steps
    alpha_x = alpha_x_sup = None
    if profile.cum_x is not None:
        alpha_x = growth_rate(profile.cum_x[:, -1], profile.depth)
        alpha_x_sup = sup_exponent(profile.cum_x)
    return StabilityExponents(
        alpha_x=alpha_x,
        alpha_x_sup=alpha_x_sup,
        alpha_theta=profile.log_cum_theta[-1] / T,
        alpha_theta_sup=jnp.maximum(jnp.max(profile.log_cum_theta), 0.0) / T,
        alpha_u=None if profile.log_cum_u is None else jnp.max(profile.log_cum_u) / T,
    )
