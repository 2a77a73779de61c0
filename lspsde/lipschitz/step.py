r"""One SGD step $W' = W - \eta (G + \xi)$ of one weight matrix, split into the three driving
terms of $\sigma_1$ (Luo et al. 2025) and a residual: :func:`spectral_step_decomposition`."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

from . import _kernels as K
from ._checks import (
    check_covariance,
    check_eta,
    check_matrix,
    check_on_degenerate,
    check_same_shape,
)
from .expansion import prepare_gap_tol, raise_if_degenerate


class SpectralStep(eqx.Module):
    r"""$\sigma_1(W') - \sigma_1(W) = \text{drift} + \text{noise} + \text{second\_order} +
    \text{residual}$, $\text{residual} = O(\eta^3)$ (package docstring, §6).

    **Fields** (shapes: the batch shape of `W`, or `()`):

    - `sigma1`, `sigma1_next`: $\sigma_1(W)$ and $\sigma_1(W')$ (exact SVDs).
    - `observed`: $\sigma_1(W') - \sigma_1(W)$.
    - `drift`: $-\eta\, u_1^\top G v_1$, the gradient projected on $\nabla\sigma_1$.
    - `noise`: $-\eta\, u_1^\top \xi v_1$, the noise projected on $\nabla\sigma_1$.
    - `second_order`: $\eta^2\, \text{second}(G + \xi)$, the realised Hessian term.
    - `first_order`: $\eta$ times the one-sided derivative of $\sigma_1$ along $-(G + \xi)$:
      `drift + noise` where simple, the fallback of the package docstring (§4) where
      `degenerate`.
    - `ito`: $\eta^2 \operatorname{tr}(\Sigma Q) = \frac{\eta^2}{2}\operatorname{tr}(\Sigma
      \nabla^2\sigma_1)$, the mean of the noise-noise part of `second_order` (the Itô term).
    - `expected_second_order`: $\eta^2\,\text{second}(G) +$ `ito`, the mean of `second_order`
      over $\xi$ (the cross term $2\eta^2 G^\top Q \xi$ has mean zero).
    - `predicted_mean`: `drift + expected_second_order`, the mean of `observed` over $\xi$ up
      to $O(\eta^3)$.
    - `noise_variance`: $\eta^2 \operatorname{vec}(u_1 v_1^\top)^\top \Sigma
      \operatorname{vec}(u_1 v_1^\top)$, the variance of `noise` (the SDE's diffusion).
    - `residual`: `observed - drift - noise - second_order` where simple, `observed -
      first_order` where `degenerate`.
    - `gap`, `degenerate`: as in :class:`TopSingularExpansion`.

    `ito`, `expected_second_order`, `predicted_mean` and `noise_variance` need the noise law and
    are NaN without `noise_cov`; all second-order fields are NaN where `degenerate`.
    """

    sigma1: Float[Array, "*batch"]
    sigma1_next: Float[Array, "*batch"]
    observed: Float[Array, "*batch"]
    drift: Float[Array, "*batch"]
    noise: Float[Array, "*batch"]
    second_order: Float[Array, "*batch"]
    first_order: Float[Array, "*batch"]
    ito: Float[Array, "*batch"]
    expected_second_order: Float[Array, "*batch"]
    predicted_mean: Float[Array, "*batch"]
    noise_variance: Float[Array, "*batch"]
    residual: Float[Array, "*batch"]
    gap: Float[Array, "*batch"]
    degenerate: Bool[Array, "*batch"]


def _step_one(W, G, xi, eta, cov, gap_tol):
    U, s, V = K.svd(W)
    gap, degenerate = K.gap_and_flag(s, gap_tol)
    D = G + xi
    a_G, b_G = K.projections(U, V, G)
    a_D, b_D = K.projections(U, V, D)
    a_xi = a_D[0] - a_G[0]
    sigma1_next = jnp.linalg.svd(W - eta * D, compute_uv=False)[0]
    observed = sigma1_next - s[0]
    nan = jnp.full((), jnp.nan, W.dtype)

    def masked(x):
        return jnp.where(degenerate, nan, x)

    drift = masked(-eta * a_G[0])
    noise = masked(-eta * a_xi)
    first_order = eta * K.first_coefficient(U, s, V, -a_D, -D, degenerate, gap_tol)
    second_order = masked(eta**2 * K.second_coefficient(s, a_D, b_D))
    second_G = eta**2 * K.second_coefficient(s, a_G, b_G)
    if cov is None:
        ito = variance = nan
    else:
        ito = masked(eta**2 * K.expected_second(U, s, V, cov))
        variance = masked(eta**2 * K.jacobian_variance(U, V, cov))
    expected = masked(second_G + ito)
    residual = jnp.where(
        degenerate, observed - first_order, observed - drift - noise - second_order
    )
    return SpectralStep(
        sigma1=s[0],
        sigma1_next=sigma1_next,
        observed=observed,
        drift=drift,
        noise=noise,
        second_order=second_order,
        first_order=first_order,
        ito=ito,
        expected_second_order=expected,
        predicted_mean=drift + expected,
        noise_variance=variance,
        residual=residual,
        gap=gap,
        degenerate=degenerate,
    )


@eqx.filter_jit
def _step(W, G, xi, eta, cov, gap_tol):
    fn = K.over_batch(_step_one, W.ndim - 2, (0, 0, 0, None, None, None))
    return fn(W, G, xi, eta, cov, gap_tol)


def spectral_step_decomposition(
    W: ArrayLike,
    grad: ArrayLike,
    noise: ArrayLike,
    eta: float | Float[ArrayLike, ""],
    *,
    noise_cov: float | ArrayLike | None = None,
    gap_tol: float | Float[ArrayLike, ""] | None = None,
    on_degenerate: str = "raise",
) -> SpectralStep:
    r"""The change of $\sigma_1$ over one step $W' = W - \eta(G + \xi)$, term by term.

    $$\sigma_1(W') - \sigma_1(W) = \underbrace{-\eta\,u_1^\top G v_1}_{\text{drift}}
    \underbrace{-\,\eta\,u_1^\top \xi v_1}_{\text{noise}} + \underbrace{\eta^2\,
    \text{second}(G + \xi)}_{\text{second\_order}} + O(\eta^3),$$

    with `second` the exact coefficient of :func:`top_singular_expansion` at $W$ in the
    direction $G + \xi$. With the noise law $\xi \sim N(0, \Sigma)$ (`noise_cov`), also its mean
    $\mathbb{E}_\xi[\text{second\_order}] = \eta^2[\text{second}(G) + \operatorname{tr}(\Sigma
    Q)]$, whose noise part is the Itô term $\frac{\eta^2}{2}\operatorname{tr}(\Sigma\,
    \nabla^2\sigma_1)$ (package docstring, §5–6).

    **Arguments:**

    - `W`: the weight matrix `(m, n)` before the step, or a batch `(..., m, n)`.
    - `grad`: the mean gradient $G$, same shape.
    - `noise`: the gradient-noise sample $\xi$, same shape (the step uses $G + \xi$).
    - `eta`: the step size $\eta > 0$ (a real scalar, may be traced).
    - `noise_cov`: the law of $\xi$: a per-entry variance $s^2$ or the `(m n, m n)` covariance
      of `noise.reshape(-1)`, as in :func:`expected_second_order`; `None`: the mean fields are
      NaN.
    - `gap_tol`, `on_degenerate`: as in :func:`top_singular_expansion`.

    **Returns:** a :class:`SpectralStep`.

    **Raises:** as :func:`top_singular_expansion`, for each matrix argument by name, and for
    `eta` not a positive real scalar or a malformed `noise_cov`.
    """
    W = check_matrix("W", W)
    G = check_matrix("grad", grad)
    xi = check_matrix("noise", noise)
    check_same_shape("grad", G, "W", W)
    check_same_shape("noise", xi, "W", W)
    check_eta(eta)
    check_on_degenerate(on_degenerate)
    dtype = jnp.result_type(W, G, xi)
    W, G, xi = W.astype(dtype), G.astype(dtype), xi.astype(dtype)
    m, n = W.shape[-2:]
    cov = None if noise_cov is None else check_covariance(noise_cov, m, n, dtype)
    tol = prepare_gap_tol(gap_tol, dtype)
    out = _step(W, G, xi, jnp.asarray(eta, dtype), cov, tol)
    if on_degenerate == "raise":
        raise_if_degenerate(out.sigma1, out.gap, out.degenerate, tol, "spectral_step_decomposition")
    return out
