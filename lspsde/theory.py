r"""The closed-form stability laws of Sections 4–5 (their constants are measured from a model by
``lspsde.constants``).

Every study puts a *predicted* value from here beside a *measured* one. The formulas, with the
paper's symbols:

| quantity | formula | source |
|---|---|---|
| feedforward Jacobian bound | $\rho^L$ | Theorem 4.1 |
| feedforward exponent bound | $\alpha_x \le \log\rho$ | Theorem 4.1 |
| residual one-step factor | $c_x(h) = \sqrt{1 - 2hm + h^2 M_g^2}$ | Lemma 4.2, Theorem 4.3 |
| residual exponent bound | $\alpha_x \le \frac12\log(1 - 2hm + h^2M_g^2)$ | Theorem 4.3 |
| residual CFL step | $h_{\max} = 2m / M_g^2$ | eq. (4.3), Corollary 4.4 |
| SGD mean-square factor | $q(\eta) = 1 - 2\eta\mu + \eta^2(L^2 + \sigma_1^2)$ | Theorem 5.2 |
| SGD step limit | $\eta_{\max} = 2\mu / (L^2 + \sigma_1^2)$ | eq. (5.4) |
| SGD exponent bound | $\log q$ (mean square), $\frac12 \log q$ (norm) | Theorem 5.2(2), below |
| SGD mean-square bound | $q^t m_0 + \eta^2\sigma_0^2 (1 - q^t)/(1 - q)$ | Theorem 5.2(1) iterated |
| Robbins–Monro | $\sum\eta_t = \infty$, $\sum \eta_t^2 < \infty$ | Theorem 5.3 |
| Robbins–Monro rate, $p = 1$ | $tm_t \to \sum_i c^2\sigma_0^2/(d(2c\lambda_i - 1))$ | Theorem 5.3 |
| Robbins–Monro rate, $p < 1$ | $m_t/\eta_t \to \sum_i \sigma_0^2/(2d\lambda_i)$ | Theorem 5.3 |
| mean-field depth exponent | $\frac12\log\chi_1$ ([`mean_field`][]) | Poole et al. (2016) |

**A correction to Theorem 5.2(2).** The paper defines $\alpha_\theta$ through the operator norm
of the sensitivity $\partial\theta^t/\partial\theta^0$ (Section 2), and states
$\alpha_\theta \le \log q(\eta)$. For the norm this is false: for gradient descent on a quadratic
with Hessian eigenvalues $\lambda \in [\mu, L]$, $\partial\theta^t/\partial\theta^0 =
(I - \eta H)^t$ has norm $\max_\lambda |1 - \eta\lambda|^t$, and
$(1 - \eta\lambda)^2 = 1 - 2\eta\lambda + \eta^2\lambda^2 \le q(\eta)$, so the norm exponent is
$\le \frac12 \log q(\eta)$, with equality when $\mu = L$ and $\sigma_1 = 0$ (then
$q = (1 - \eta\mu)^2$). Example: $\mu = L = 1$, $\sigma_1 = 0$, $\eta = 1/2$ gives $q = 1/4$,
$\log q = -1.386$, but the exact exponent is $\log(1/2) = -0.693 > \log q$. The rate
$\log q(\eta)$ is the right one for the *mean-square energy* $\mathbb{E}\|\theta^t - \theta^*\|^2$
(a squared norm), which is what the proof of Theorem 5.2 controls.
[`sgd_exponent_bound`][lspsde.theory.sgd_exponent_bound] returns either, by ``energy=``.

Every function takes Python numbers or JAX arrays (broadcast together), returns a JAX array, and
is ``jit``/``vmap`` friendly (no Python branching on traced values). Concrete inputs are checked
before tracing; traced inputs pass through unchecked.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Real
import numpy as np

from ._checks import _concrete_array, check_positive, check_positive_int
from .mean_field import MeanField, mean_field

__all__ = [
    "MeanField",
    "feedforward_exponent_bound",
    "feedforward_jacobian_bound",
    "mean_field",
    "residual_contraction",
    "residual_exponent_bound",
    "residual_optimal_step",
    "residual_step_max",
    "robbins_monro_conditions",
    "robbins_monro_limit",
    "robbins_monro_mean_square",
    "robbins_monro_rate",
    "sgd_contraction",
    "sgd_exponent_bound",
    "sgd_mean_square_bound",
    "sgd_optimal_step",
    "sgd_stationary_level",
    "sgd_step_max",
]

RealLike = Real[ArrayLike, "..."]


def _f(x: RealLike) -> Array:
    return jnp.asarray(x, dtype=float)


def _check_le(small: str, a: RealLike, big: str, b: RealLike, why: str) -> None:
    """Raise unless concrete ``a <= b`` everywhere (after broadcasting).

    A relative slack of 1e-12 lets through estimates of equal constants (e.g. ``m = M_g`` for
    ``G = -mI``) that rounding put one ulp apart.
    """
    aa, bb = _concrete_array(a), _concrete_array(b)
    if aa is None or bb is None:
        return
    try:
        bad = aa > bb * (1.0 + 1e-12)
    except ValueError as err:  # shapes do not broadcast
        raise ValueError(
            f"`{small}` (shape {aa.shape}) and `{big}` (shape {bb.shape}) do not broadcast."
        ) from err
    if np.any(bad):
        first = np.argwhere(np.atleast_1d(bad))[0]
        ab, bb_ = np.broadcast_arrays(np.atleast_1d(aa), np.atleast_1d(bb))
        raise ValueError(
            f"`{small}` = {ab[tuple(first)]!r} exceeds `{big}` = {bb_[tuple(first)]!r}. {why}"
        )


_WHY_M = (
    "Inconsistent constants: v^T G v >= -||G||_2 >= -M_g for unit v, so dissipativity "
    "sym(G) <= -m I and ||G||_2 <= M_g can only hold together when m <= M_g (eq. 4.2). "
    "Estimate both from the same block, e.g. with `lspsde.constants.residual_block_constants`."
)
_WHY_MU = (
    "Inconsistent constants: a mu-strongly convex, L-smooth objective has Hessian eigenvalues in "
    "[mu, L], so mu <= L (Assumption 1). Estimate both, e.g. with "
    "`lspsde.constants.objective_constants`."
)


def _check_residual(h: RealLike | None, m: RealLike, M_g: RealLike) -> None:
    if h is not None:
        check_positive("h", h, fix="The residual step size h must be > 0 (eq. 4.1).")
    check_positive(
        "m", m, fix="Theorem 4.3 needs a uniformly dissipative block, m > 0 in eq. (4.2)."
    )
    check_positive("M_g", M_g, fix="M_g bounds ||G_k||_2 (eq. 4.2); it must be > 0.")
    _check_le("m", m, "M_g", M_g, _WHY_M)


def _check_sgd(eta: RealLike | None, mu: RealLike, L: RealLike, sigma1: RealLike) -> None:
    if eta is not None:
        check_positive("eta", eta, fix="The learning rate eta must be > 0 (eq. 5.1).")
    check_positive("mu", mu, fix="Assumption 1 needs a mu-strongly convex objective, mu > 0.")
    check_positive("L", L, fix="L is the smoothness constant of Assumption 1; it must be > 0.")
    check_positive(
        "sigma1",
        sigma1,
        allow_zero=True,
        fix="sigma1^2 is a variance coefficient (Assumption 1); use sigma1 >= 0.",
    )
    _check_le("mu", mu, "L", L, _WHY_MU)


# --------------------------------------------------------------------------------------------
# Section 4.1: feedforward networks
# --------------------------------------------------------------------------------------------


def feedforward_jacobian_bound(rho: RealLike, depth: RealLike) -> Float[Array, "..."]:
    r"""$\sup_x \|JF_\theta(x)\|_2 \le \rho^L$ for $\|W_k\|_2 \le \rho$ (Theorem 4.1).

    Holds for any $\rho > 0$ with a 1-Lipschitz activation; it is a contraction when $\rho < 1$.
    Attained when every $W_k$ is $\rho$ times an isometry and the activation acts as the
    identity on the trajectory (e.g. ``"identity"``, or ReLU with positive pre-activations).

    **Arguments:**

    - `rho`: the layerwise bound $\rho$ on $\|W_k\|_2$, $> 0$.
    - `depth`: the number of layers $L \ge 0$.

    **Returns:** $\rho^L$.
    """
    check_positive("rho", rho, fix="rho bounds the spectral norms ||W_k||_2; use rho > 0.")
    check_positive("depth", depth, allow_zero=True, fix="The depth L must be >= 0.")
    return _f(rho) ** _f(depth)


def feedforward_exponent_bound(rho: RealLike) -> Float[Array, "..."]:
    r"""$\alpha_x \le \log\rho$ (Theorem 4.1); negative exactly when $\rho < 1$.

    **Arguments:**

    - `rho`: the layerwise bound $\rho \ge \|W_k\|_2$, $> 0$.

    **Returns:** $\log\rho$.
    """
    check_positive("rho", rho, fix="rho bounds the spectral norms ||W_k||_2; use rho > 0.")
    return jnp.log(_f(rho))


# --------------------------------------------------------------------------------------------
# Section 4.2: residual networks
# --------------------------------------------------------------------------------------------


def residual_contraction(h: RealLike, m: RealLike, M_g: RealLike) -> Float[Array, "..."]:
    r"""$c_x(h) = \sqrt{1 - 2hm + h^2 M_g^2}$, the one-step residual factor (Lemma 4.2, Thm 4.3).

    Under (4.2), $\|I + hG_k(x)\|_2 \le c_x(h)$ for every $h > 0$ (inside or beyond
    $h_{\max}$). The bound is sharp over the class (4.2): a normal $G = -mI + K$, $K$ skew with
    $\|K\|_2 = \sqrt{M_g^2 - m^2}$, attains it (``models.LinearDissipativeBlock``), and when
    $K^\top K = \kappa^2 I$ each layer is $c_x(h)$ times an orthogonal matrix, so the depth-$L$
    bound $c_x(h)^L$ of Theorem 4.3 is attained too. Since $m \le M_g$, the radicand is
    $\ge (1 - hM_g)^2 \ge 0$.

    **Arguments:**

    - `h`: the residual step $h > 0$.
    - `m`: the dissipativity constant $m > 0$ of (4.2).
    - `M_g`: the Jacobian bound $M_g \ge m$ of (4.2).

    **Returns:** $c_x(h)$.

    **Raises:** ``ValueError`` for concrete $h \le 0$, $m \le 0$, $M_g \le 0$ or $m > M_g$.
    """
    _check_residual(h, m, M_g)
    h, m, M_g = _f(h), _f(m), _f(M_g)
    return jnp.sqrt(1.0 - 2.0 * h * m + h**2 * M_g**2)


def residual_exponent_bound(h: RealLike, m: RealLike, M_g: RealLike) -> Float[Array, "..."]:
    r"""$\alpha_x \le \frac12 \log(1 - 2hm + h^2 M_g^2) = \log c_x(h)$ (Theorem 4.3).

    Negative exactly when $0 < h < h_{\max} = 2m/M_g^2$; the bound still holds (and is
    $\ge 0$) beyond. It is $-\infty$ in the degenerate case $m = M_g$, $h = 1/M_g$, where
    $I + hG = 0$ for $G = -M_g I$.

    **Arguments:** as [`residual_contraction`][lspsde.theory.residual_contraction].

    **Returns:** $\frac12\log(1 - 2hm + h^2M_g^2)$.
    """
    _check_residual(h, m, M_g)
    h, m, M_g = _f(h), _f(m), _f(M_g)
    return 0.5 * jnp.log(1.0 - 2.0 * h * m + h**2 * M_g**2)


def residual_step_max(m: RealLike, M_g: RealLike) -> Float[Array, "..."]:
    r"""$h_{\max} = 2m / M_g^2$, the CFL-type step limit (eq. 4.3, Corollary 4.4).

    $c_x(h) < 1$ if and only if $0 < h < h_{\max}$; $c_x(h_{\max}) = 1$.

    **Arguments:**

    - `m`: the dissipativity constant $m > 0$ of (4.2).
    - `M_g`: the Jacobian bound $M_g \ge m$ of (4.2).

    **Returns:** $2m/M_g^2$.
    """
    _check_residual(None, m, M_g)
    return 2.0 * _f(m) / _f(M_g) ** 2


def residual_optimal_step(m: RealLike, M_g: RealLike) -> Float[Array, "..."]:
    r"""$h^\star = m / M_g^2 = h_{\max}/2$, the minimiser of $c_x(h)$, where
    $c_x(h^\star)^2 = 1 - m^2/M_g^2$ (Theorem 4.3).

    **Arguments:** as [`residual_step_max`][lspsde.theory.residual_step_max].
    """
    _check_residual(None, m, M_g)
    return _f(m) / _f(M_g) ** 2


# --------------------------------------------------------------------------------------------
# Section 5: stochastic gradient methods
# --------------------------------------------------------------------------------------------


def sgd_contraction(
    eta: RealLike, mu: RealLike, L: RealLike, sigma1: RealLike
) -> Float[Array, "..."]:
    r"""$q(\eta) = 1 - 2\eta\mu + \eta^2(L^2 + \sigma_1^2)$ (Theorem 5.2, recursion 5.3).

    The factor of the mean-square recursion
    $\mathbb{E}\|\theta^{t+1} - \theta^*\|^2 \le q(\eta)\,\mathbb{E}\|\theta^t - \theta^*\|^2 +
    \eta^2\sigma_0^2$. It lies in $[0, 1)$ for $0 < \eta < \eta_{\max}$. (Theorem 5.2 says
    $0 < q$; in fact $q \ge (1 - \eta\mu)^2 \ge 0$ with $q = 0$ when $\mu = L$, $\sigma_1 = 0$,
    $\eta = 1/\mu$.)

    **Arguments:**

    - `eta`: the constant learning rate $\eta > 0$.
    - `mu`: the strong-convexity constant $\mu > 0$.
    - `L`: the smoothness constant $L \ge \mu$.
    - `sigma1`: the state-dependent noise coefficient $\sigma_1 \ge 0$ of Assumption 1.

    **Returns:** $q(\eta)$.

    **Raises:** ``ValueError`` for concrete $\eta \le 0$, $\mu \le 0$, $L \le 0$,
    $\sigma_1 < 0$ or $\mu > L$.
    """
    _check_sgd(eta, mu, L, sigma1)
    eta, mu, L, sigma1 = _f(eta), _f(mu), _f(L), _f(sigma1)
    return 1.0 - 2.0 * eta * mu + eta**2 * (L**2 + sigma1**2)


def sgd_step_max(mu: RealLike, L: RealLike, sigma1: RealLike) -> Float[Array, "..."]:
    r"""$\eta_{\max} = 2\mu / (L^2 + \sigma_1^2)$ (eq. 5.4): $q(\eta) < 1$ iff
    $0 < \eta < \eta_{\max}$, and $q(\eta_{\max}) = 1$.

    **Arguments:** as [`sgd_contraction`][lspsde.theory.sgd_contraction], without `eta`.
    """
    _check_sgd(None, mu, L, sigma1)
    mu, L, sigma1 = _f(mu), _f(L), _f(sigma1)
    return 2.0 * mu / (L**2 + sigma1**2)


def sgd_optimal_step(mu: RealLike, L: RealLike, sigma1: RealLike) -> Float[Array, "..."]:
    r"""$\eta^\star = \mu/(L^2 + \sigma_1^2) = \eta_{\max}/2$, the minimiser of $q(\eta)$, where
    $q(\eta^\star) = 1 - \mu^2/(L^2 + \sigma_1^2)$ (Theorem 5.2).

    **Arguments:** as [`sgd_step_max`][lspsde.theory.sgd_step_max].
    """
    _check_sgd(None, mu, L, sigma1)
    mu, L, sigma1 = _f(mu), _f(L), _f(sigma1)
    return mu / (L**2 + sigma1**2)


def sgd_exponent_bound(
    eta: RealLike,
    mu: RealLike,
    L: RealLike,
    sigma1: RealLike,
    *,
    energy: str = "mean_square",
) -> Float[Array, "..."]:
    r"""The bound on the parametric exponent $\alpha_\theta$ of Theorem 5.2(2), corrected for norms.

    - ``energy="mean_square"`` (default): $\log q(\eta)$, as Theorem 5.2(2) states. This is the
      per-step decay rate of the mean-square energy $\mathbb{E}\|\theta^t - \theta^*\|^2$
      (Theorem 5.2(1) with $\sigma_0 = 0$): a rate for a *squared* norm.
    - ``energy="norm"``: $\frac12 \log q(\eta)$, the rate for the operator norm
      $\|\partial\theta^t/\partial\theta^0\|$, which is how Section 2 defines $\alpha_\theta$.

    Theorem 5.2(2) as stated ($\alpha_\theta \le \log q$ for the norm exponent) is **false**:
    for gradient descent on a quadratic with Hessian spectrum in $[\mu, L]$ the sensitivity is
    $(I - \eta H)^t$, whose norm decays at rate $\max_\lambda |1 - \eta\lambda| \le
    q(\eta)^{1/2}$, with equality for $\mu = L$, $\sigma_1 = 0$ (where $q = (1-\eta\mu)^2$).
    With $\mu = L = 1$, $\sigma_1 = 0$, $\eta = 1/2$: $q = 1/4$, $\log q = -1.386$, yet the
    exact norm exponent is $\log(1/2) = -0.693$. The bound $\frac12\log q$ holds and is attained.
    For the stochastic case $\frac12\log q$ is the rate of the root-mean-square error
    $(\mathbb{E}\|\theta^t - \theta^*\|^2)^{1/2}$ when $\sigma_0 = 0$; for coupled trajectories
    it needs the variance bound of Assumption 1 between pairs of points.

    Both bounds hold for every $\eta > 0$; they are negative exactly when $\eta < \eta_{\max}$.

    **Arguments:** as [`sgd_contraction`][lspsde.theory.sgd_contraction], plus

    - `energy`: ``"mean_square"`` ($\log q$) or ``"norm"`` ($\frac12\log q$).
    """
    if energy not in ("mean_square", "norm"):
        raise ValueError(
            f"Unknown energy {energy!r}; use 'mean_square' (log q, the rate of "
            "E||theta - theta*||^2) or 'norm' (1/2 log q, the rate of ||d theta^t / d theta^0||)."
        )
    log_q = jnp.log(sgd_contraction(eta, mu, L, sigma1))
    return log_q if energy == "mean_square" else 0.5 * log_q


def sgd_stationary_level(
    eta: RealLike, mu: RealLike, L: RealLike, sigma0: RealLike, sigma1: RealLike
) -> Float[Array, "..."]:
    r"""$m_\infty = \eta^2\sigma_0^2 / (1 - q(\eta))$, the noise floor of Theorem 5.2(1).

    The fixed point of $m_{t+1} = q\,m_t + \eta^2\sigma_0^2$, to which the bound on
    $\mathbb{E}\|\theta^t - \theta^*\|^2$ converges for $\eta < \eta_{\max}$. Where
    $q(\eta) \ge 1$ there is no stationary level and ``inf`` is returned (divergence is data).

    **Arguments:** as [`sgd_contraction`][lspsde.theory.sgd_contraction], plus

    - `sigma0`: the additive noise level $\sigma_0 \ge 0$ of Assumption 1.
    """
    check_positive(
        "sigma0",
        sigma0,
        allow_zero=True,
        fix="sigma0^2 is a variance (Assumption 1); use sigma0 >= 0.",
    )
    q = sgd_contraction(eta, mu, L, sigma1)
    gap = 1.0 - q
    level = _f(eta) ** 2 * _f(sigma0) ** 2 / jnp.where(gap > 0, gap, 1.0)
    return jnp.where(gap > 0, level, jnp.inf)


def _geometric(q: Array, t: Array) -> tuple[Array, Array]:
    """``(q**t, sum_{s<t} q**s)``, accurate for ``q`` near 1 (``expm1``/``log1p``)."""
    d = q - 1.0
    is_one = d == 0
    t_log_q = jnp.where(t == 0, 0.0, t * jnp.log1p(jnp.where(is_one, 0.0, d)))
    q_t = jnp.exp(t_log_q)
    geom = jnp.where(is_one, t, jnp.expm1(t_log_q) / jnp.where(is_one, 1.0, d))
    return q_t, geom


def sgd_mean_square_bound(
    t: RealLike,
    m0: RealLike,
    eta: RealLike,
    mu: RealLike,
    L: RealLike,
    sigma0: RealLike,
    sigma1: RealLike,
) -> Float[Array, "..."]:
    r"""$\mathbb{E}\|\theta^t - \theta^*\|^2 \le q^t m_0 + \eta^2\sigma_0^2 \frac{1-q^t}{1-q}$.

    Theorem 5.2(1) iterated $t$ times from $m_0 = \mathbb{E}\|\theta^0 - \theta^*\|^2$ (at
    $q = 1$ the sum is $t\,\eta^2\sigma_0^2$). Valid for every $\eta > 0$; it converges to
    [`sgd_stationary_level`][lspsde.theory.sgd_stationary_level] when $\eta < \eta_{\max}$.

    **Arguments:**

    - `t`: the step count $t \ge 0$ (broadcasts: pass ``jnp.arange(T + 1)`` for a curve).
    - `m0`: the initial mean-square error $m_0 \ge 0$.
    - others as [`sgd_stationary_level`][lspsde.theory.sgd_stationary_level].
    """
    check_positive("t", t, allow_zero=True, fix="t counts SGD steps; use t >= 0.")
    check_positive(
        "m0", m0, allow_zero=True, fix="m0 = E||theta^0 - theta*||^2 is >= 0 by definition."
    )
    check_positive(
        "sigma0",
        sigma0,
        allow_zero=True,
        fix="sigma0^2 is a variance (Assumption 1); use sigma0 >= 0.",
    )
    q = sgd_contraction(eta, mu, L, sigma1)
    q_t, geom = _geometric(q, _f(t))
    return q_t * _f(m0) + _f(eta) ** 2 * _f(sigma0) ** 2 * geom


def robbins_monro_conditions(p: RealLike) -> Bool[Array, "..."]:
    r"""Whether $\eta_t = c/(t + t_0)^p$ satisfies the conditions of Theorem 5.3.

    $\sum_t \eta_t = \infty$ iff $p \le 1$ and $\sum_t \eta_t^2 < \infty$ iff $p > 1/2$
    (integral test), so both hold iff $p \in (1/2, 1]$. Independent of $c, t_0 > 0$.

    **Arguments:**

    - `p`: the decay exponent (any finite real).

    **Returns:** a boolean array, ``True`` where $p \in (1/2, 1]$.
    """
    arr = _concrete_array(p)
    if arr is not None and not np.all(np.isfinite(arr)):
        raise ValueError(f"`p` must be finite, got {arr!r}; the schedule is c / (t + t0)^p.")
    p = _f(p)
    return (p > 0.5) & (p <= 1.0)


def _check_robbins_monro(c: RealLike, p: RealLike) -> None:
    check_positive("c", c, fix="The schedule eta_t = c / (t + t0)^p needs c > 0.")
    arr = _concrete_array(p)
    if arr is not None and not np.all(np.isfinite(arr) & (arr > 0) & (arr <= 1)):
        raise ValueError(
            f"`p` must lie in (0, 1], got {arr!r}: for p > 1 the steps are summable and SGD "
            "stops short of theta*, so E||theta^t - theta*||^2 has no rate to 0."
        )


def robbins_monro_rate(c: RealLike, mu: RealLike, p: RealLike = 1.0) -> Float[Array, "..."]:
    r"""The exponent $r$ in $\mathbb{E}\|\theta^t - \theta^*\|^2 \asymp t^{-r}$ for SGD with
    $\eta_t = c/(t + t_0)^p$ on a $\mu$-strongly convex quadratic with additive noise
    $\sigma_0 > 0$ (Theorem 5.3, made quantitative).

    $$r = \begin{cases} p, & 0 < p < 1,\\ \min(1, 2c\mu), & p = 1.\end{cases}$$

    For $p < 1$ the energy tracks the step, $\mathbb{E}\|e_t\|^2 \sim K\eta_t$
    ([`robbins_monro_limit`][lspsde.theory.robbins_monro_limit]). For $p = 1$ the slowest
    eigen-direction $\lambda = \mu$ contracts like $\prod_s(1 - c\mu/s)^2 \sim t^{-2c\mu}$ and the
    noise feeds it at rate $\eta_t^2 \sim t^{-2}$: when $2c\mu > 1$ the noise wins and
    $\mathbb{E}\|e_t\|^2 \sim K c/t$; when $2c\mu < 1$ the energy decays only like
    $t^{-2c\mu}$, *slower* than $1/t$, whatever the noise (and from any start); at
    $2c\mu = 1$ it is $t^{-1}\log t$ (returned as $r = 1$). Theorem 5.3 gives convergence, not
    the rate: with $c < 1/(2\mu)$ it still holds, but arbitrarily slowly as $c \to 0$.

    Without noise ($\sigma_0 = 0$) and $p < 1$ the decay is faster than any power,
    $\exp(-2c\mu\,t^{1-p}/(1-p))$; this function assumes $\sigma_0 > 0$ (and, for $p = 1$, that
    the noise or the start excites the $\mu$ direction).

    **Arguments:**

    - `c`: the schedule constant $c > 0$.
    - `mu`: the smallest Hessian eigenvalue (strong convexity) $\mu > 0$.
    - `p`: the decay exponent, $0 < p \le 1$.

    **Returns:** $r$.
    """
    _check_robbins_monro(c, p)
    check_positive("mu", mu, fix="Theorem 5.3 needs a mu-strongly convex objective, mu > 0.")
    c, mu, p = _f(c), _f(mu), _f(p)
    return jnp.where(p < 1.0, p, jnp.minimum(1.0, 2.0 * c * mu))


def robbins_monro_limit(
    c: RealLike,
    eigenvalues: Real[ArrayLike, "*batch d"],
    sigma0: RealLike,
    p: RealLike = 1.0,
) -> Float[Array, "..."]:
    r"""$K = \lim_{t\to\infty} \mathbb{E}\|\theta^t - \theta^*\|^2 / \eta_t$ for SGD with
    $\eta_t = c/(t + t_0)^p$ on a quadratic with isotropic additive noise (Theorem 5.3's rate).

    $$K = \sum_{i=1}^d \frac{\sigma_0^2/d}{2\lambda_i - \mathbb{1}[p = 1]/c}, \qquad
    \text{so for } p = 1:\quad t\,\mathbb{E}\|\theta^t - \theta^*\|^2 \to cK
    = \sum_i \frac{c^2\sigma_0^2/d}{2c\lambda_i - 1}\quad (2c\mu > 1),$$

    and for $p < 1$: $\mathbb{E}\|\theta^t - \theta^*\|^2 \sim \eta_t\sum_i
    \sigma_0^2/(2d\lambda_i)$. ``inf`` where $p = 1$ and $2c\lambda_i \le 1$ for some $i$: there
    is no $1/t$ rate ([`robbins_monro_rate`][lspsde.theory.robbins_monro_rate]).

    **Derivation.** In the eigenbasis of $H$, with noise of covariance
    $(\sigma_0^2 + \sigma_1^2\|e\|^2)I/d$ (``GaussianNoise``, ``IsotropicGaussian``), the second
    moments $m_{i,t} = \mathbb{E}(e_t)_i^2$ obey exactly
    $m_{i,t+1} = (1 - \eta_t\lambda_i)^2 m_{i,t} + \eta_t^2(\sigma_0^2 + \sigma_1^2 m_t)/d$
    ([`robbins_monro_mean_square`][lspsde.theory.robbins_monro_mean_square]). Put
    $m_{i,t} = \eta_t x_{i,t}$ and $n = t + t_0$; then $\eta_{t+1}/\eta_t = 1 - p/n + O(n^{-2})$
    and
    $x_{i,t+1} = x_{i,t} - \eta_t\big(2\lambda_i - \eta_t\lambda_i^2 - \tfrac{p}{n\eta_t}\big)
    x_{i,t} + \eta_t\,\sigma_0^2/d + O(\eta_t^2)$, a stochastic-approximation recursion whose
    limit (Chung's lemma) is $x_i = (\sigma_0^2/d)/(2\lambda_i - \lim p/(n\eta_t))$, with
    $p/(n\eta_t) = p\,n^{p-1}/c \to 0$ for $p < 1$ and $= 1/c$ for $p = 1$. The
    state-dependent part $\sigma_1^2 m_t\eta_t^2 = O(\eta_t^3)$ does not enter $K$: $\sigma_1$
    changes the transient, not the limit. The finite-$t$ corrections are relative
    $O(\eta_t + n^{p-1})$ (for $p = 1$: $O(1/t)$, plus $t^{1-2c\mu}$ from the start).

    **Arguments:**

    - `c`: the schedule constant $c > 0$.
    - `eigenvalues`: the Hessian eigenvalues $\lambda_i > 0$ along the last axis (length $d$).
    - `sigma0`: the additive noise level, $\mathbb{E}\|\xi\|^2 = \sigma_0^2$ (per coordinate
      $\sigma_0^2/d$); for an anisotropic covariance use its diagonal in the eigenbasis of $H$
      in place of $\sigma_0^2/d$ termwise.
    - `p`: the decay exponent, $0 < p \le 1$ (Theorem 5.3 needs $p > 1/2$ for almost-sure
      convergence; the mean-square limit holds for every $p \in (0, 1]$).

    **Returns:** $K$, the limit of $\mathbb{E}\|\theta^t - \theta^*\|^2/\eta_t$ (multiply by $c$
    for the limit of $t\,\mathbb{E}\|\theta^t - \theta^*\|^2$ when $p = 1$).
    """
    _check_robbins_monro(c, p)
    check_positive("eigenvalues", eigenvalues, fix="A strongly convex quadratic has H > 0.")
    check_positive("sigma0", sigma0, allow_zero=True, fix="sigma0 is a noise level, >= 0.")
    lam = _f(eigenvalues)
    if lam.ndim == 0:
        raise ValueError("`eigenvalues` must have a last axis of length d >= 1, got a scalar.")
    d = lam.shape[-1]
    c, sigma0, p = _f(c), _f(sigma0), _f(p)
    batch = jnp.broadcast_shapes(c.shape, sigma0.shape, p.shape, lam.shape[:-1])
    lam = jnp.broadcast_to(lam, (*batch, d))
    c, s2, p = (jnp.broadcast_to(x, batch)[..., None] for x in (c, sigma0**2 / d, p))
    gap = 2.0 * lam - jnp.where(p == 1.0, 1.0 / c, 0.0)
    per_direction = jnp.where(gap > 0, s2 / jnp.where(gap > 0, gap, 1.0), jnp.inf)
    return jnp.sum(per_direction, axis=-1)


def robbins_monro_mean_square(
    hessian: Real[ArrayLike, "d d"],
    e0: Real[ArrayLike, " d"],
    c: RealLike,
    t0: RealLike,
    p: RealLike,
    sigma0: RealLike,
    sigma1: RealLike,
    n_steps: int,
) -> Float[Array, " step"]:
    r"""Exact $m_t = \mathbb{E}\|\theta^t - \theta^*\|^2$, $t = 0..T$, for SGD with
    $\eta_t = c/(t + t_0)^p$ on $\frac12 e^\top He$ with ``GaussianNoise(sigma0, sigma1)``.

    With $H = V\Lambda V^\top$ and $m_{i,t} = \mathbb{E}(V^\top e_t)_i^2$, isotropic noise of
    covariance $(\sigma_0^2 + \sigma_1^2\|e_t\|^2)I/d$ keeps the diagonal of the second moment
    in the eigenbasis closed:

    $$m_{i,t+1} = (1 - \eta_t\lambda_i)^2 m_{i,t} + \frac{\eta_t^2}{d}\big(\sigma_0^2 +
    \sigma_1^2 m_t\big), \qquad m_{i,0} = (V^\top e_0)_i^2, \qquad m_t = \textstyle\sum_i m_{i,t}.$$

    No approximation: the time-varying analogue of
    [`lspsde.quadratic_mean_square`][lspsde.energy.quadratic_mean_square] (which it equals for
    $p \to 0$, $\eta_t \equiv c$), in $O(d)$ per step, so $10^6$ steps take well under a second.

    **Arguments:** the Hessian $H$ (symmetric positive definite, ``(d, d)``), the initial error
    $e_0 = \theta^0 - \theta^*$ (``(d,)``), the schedule $(c, t_0, p)$ with $c, t_0 > 0$,
    $0 < p \le 1$, the noise levels $\sigma_0, \sigma_1 \ge 0$, and the horizon $T$ = `n_steps`.

    **Returns:** $m_0, \dots, m_T$, shape ``(n_steps + 1,)``.
    """
    _check_robbins_monro(c, p)
    check_positive("t0", t0, fix="Use t0 > 0 so that eta_0 = c / t0^p is finite.")
    for name, value in (("sigma0", sigma0), ("sigma1", sigma1)):
        check_positive(name, value, allow_zero=True, fix="Noise levels are >= 0.")
    n_steps = check_positive_int("n_steps", n_steps)
    H, e0 = _f(hessian), _f(e0)
    d = e0.shape[0]
    if e0.ndim != 1 or H.shape != (d, d):
        raise ValueError(f"`hessian` must be (d, d) and `e0` (d,), got {H.shape} and {e0.shape}.")
    lam, V = jnp.linalg.eigh(0.5 * (H + H.T))
    return _robbins_monro_scan(
        lam, (V.T @ e0) ** 2, _f(c), _f(t0), _f(p), _f(sigma0), _f(sigma1), n_steps
    )


@eqx.filter_jit
def _robbins_monro_scan(lam, m0, c, t0, p, sigma0, sigma1, n_steps):
    d = lam.shape[0]

    def body(m, t):
        eta = c / (t + t0) ** p
        m = (1.0 - eta * lam) ** 2 * m + eta**2 * (sigma0**2 + sigma1**2 * jnp.sum(m)) / d
        return m, jnp.sum(m)

    _, ms = jax.lax.scan(body, m0, jnp.arange(n_steps, dtype=lam.dtype))
    return jnp.concatenate([jnp.sum(m0)[None], ms])
