r"""Heavy-tailed noise models: i.i.d. Student-$t$ and symmetric $\alpha$-stable entries.

Both follow the isotropic normalisation of ``IsotropicGaussian``, $G = \nabla\mathcal{L} +
(\sigma/\sqrt d)\,u$ ([`additive_gradient`][lspsde.noise.additive_gradient]), with standard
draws $u$ built from [`open_uniform`][lspsde.noise.open_uniform]. Where the variance is
infinite, [`covariance`][lspsde.noise.AbstractNoise.covariance] is ``None``, Assumption 1 fails,
and there is no diffusion limit.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree
import lineax as lx

from .._custom_types import ScalarLike
from ..objectives import AbstractObjective
from .base import AbstractNoise, Assumption1
from .helpers import (
    additive_gradient,
    as_float_array,
    check_in_interval,
    check_positive,
    concrete_scalar,
    flat_size,
    iid_like,
    moment_or_none,
    no_diffusion_error,
    open_uniform,
    scaled_identity,
)

__all__ = ["AlphaStableNoise", "StudentTNoise"]


class StudentTNoise(AbstractNoise):
    r"""$G = \nabla\mathcal{L}(\theta) + (\sigma/\sqrt d)\,T$, $T$ i.i.d. Student-$t_\nu$ entries.

    $u = T$ (shape of $\theta$). Symmetric;
    the mean is 0 for $\nu > 1$ and does not exist for $\nu \le 1$ ($\nu = 1$: Cauchy). For
    $\nu > 2$, $\Sigma = \frac{\sigma^2}{d}\frac{\nu}{\nu-2}I$ and
    $\mathbb{E}\|G - \nabla\mathcal{L}\|^2 = \sigma^2\nu/(\nu-2)$: Assumption 1 holds with
    $\sigma_0^2 = \sigma^2\nu/(\nu-2)$, $\sigma_1 = 0$, but the tails are polynomial
    ($P(|T| > x) \sim x^{-\nu}$; moments of order $\ge \nu$ are infinite). For $\nu \le 2$ the
    variance is infinite and Assumption 1 fails. The $1/\sqrt d$ matches [`IsotropicGaussian`][]:
    as $\nu\to\infty$ this is ``IsotropicGaussian(scale)``.

    Sampling: Bailey's polar method (exact, Math. Comp. 62, 1994) with the point of the unit
    disc drawn directly, $T = \cos(2\pi U_2)\sqrt{\nu(U_1^{-2/\nu} - 1)}$,
    $U_1, U_2 \sim U(0, 1)$: two uniforms and no loop. ``numpyro.distributions.StudentT``
    draws $Z/\sqrt{V/\nu}$ with $V \sim \chi^2_\nu$ through ``jax.random.gamma``, a rejection
    sampler in a ``while_loop`` that costs seconds to compile and, under ``vmap``, runs every
    lane until the slowest accepts; the law is the same (tested against ``scipy.stats.t``).

    **Arguments:** `scale` $\sigma \ge 0$, `df` $\nu > 0$.
    """

    scale: Float[Array, ""]
    df: Float[Array, ""]

    def __init__(self, scale: ScalarLike, df: ScalarLike):
        check_positive("scale", scale, allow_zero=True, fix="Use scale >= 0.")
        check_positive("df", df, fix="Student-t degrees of freedom must be > 0.")
        self.scale, self.df = as_float_array(scale), as_float_array(df)

    def sample(self, key: PRNGKeyArray, theta: PyTree[Array]) -> PyTree[Array]:
        return iid_like(self._standard_t, key, theta)

    def _standard_t(self, key: PRNGKeyArray, shape: tuple[int, ...]) -> Array:
        k1, k2 = jax.random.split(key)
        u1 = open_uniform(k1, shape)
        u2 = jax.random.uniform(k2, shape)
        # U1^(-2/nu) - 1 = expm1(-(2/nu) log U1): accurate for large nu.
        return jnp.cos(2 * jnp.pi * u2) * jnp.sqrt(self.df * jnp.expm1(-2 / self.df * jnp.log(u1)))

    def gradient(
        self, objective: AbstractObjective, theta: PyTree[Array], u: PyTree[Array]
    ) -> PyTree[Array]:
        return additive_gradient(objective, theta, u, self.scale)

    def covariance(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> Float[Array, "d d"] | None:
        d = flat_size(theta)
        ratio = self.df / jnp.where(self.df > 2, self.df - 2, 1.0)
        return moment_or_none(self.df > 2, self.scale**2 / d * ratio * jnp.eye(d))

    def variance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, ""]:
        ratio = self.df / jnp.where(self.df > 2, self.df - 2, 1.0)
        return jnp.where(self.df > 2, self.scale**2 * ratio, jnp.inf)

    @property
    def tail_index(self) -> float:
        """$\\nu$ (``df``): $P(|X| > x) \\sim x^{-\\nu}$."""
        return float(self.df)

    def matched(
        self, objective: AbstractObjective, theta: PyTree[Array], variance: float
    ) -> "StudentTNoise":
        r"""Matched to ``variance``: exactly where it is finite ($\nu > 2$: scale
        $\sqrt{\text{variance}\,(\nu - 2)/\nu}$); for $\nu \le 2$, where it is infinite, the
        scale whose Gaussian limit ($\nu \to \infty$) has that variance,
        $\sqrt{\text{variance}}$."""
        if float(self.df) > 2:
            return super().matched(objective, theta, variance)
        return eqx.tree_at(lambda n: n.scale, self, as_float_array(math.sqrt(float(variance))))

    def assumption1(self, objective: AbstractObjective) -> Assumption1:
        df = concrete_scalar(self.df)
        if df is None:
            return Assumption1(None, None, None, "unknown: df is traced; call outside jit/vmap")
        if df <= 1:
            return Assumption1(
                False, None, None, "no mean (Student-t with df <= 1): G is not unbiased"
            )
        if df <= 2:
            return Assumption1(False, None, None, "infinite variance (Student-t with df <= 2)")
        s0 = self.scale * jnp.sqrt(self.df / (self.df - 2))
        return Assumption1(
            True,
            s0,
            as_float_array(0.0),
            f"exact, but heavy tails: moments of order >= df = {df:g} infinite",
        )

    def is_additive(self) -> bool:
        return True

    def diffusion(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> lx.AbstractLinearOperator:
        r"""$B = \sigma\sqrt{\nu/(\nu - 2)}\,I/\sqrt d$ (the Gaussian with $\Sigma$; $\nu > 2$)."""
        df = concrete_scalar(self.df)
        if df is not None and df <= 2:
            raise no_diffusion_error(f"StudentTNoise(df={df:g})", "df <= 2: infinite variance")
        ratio = self.df / jnp.where(self.df > 2, self.df - 2, jnp.nan)
        return scaled_identity(theta, self.scale * jnp.sqrt(ratio / flat_size(theta)))


class AlphaStableNoise(AbstractNoise):
    r"""$G = \nabla\mathcal{L}(\theta) + (\sigma/\sqrt d)\,S$, $S$ i.i.d. symmetric
    $\alpha$-stable entries with $\mathbb{E}\,e^{itS} = e^{-|t|^\alpha}$.

    So each entry $X$ of $G - \nabla\mathcal{L}$ has $\mathbb{E}\cos(tX) =
    \exp(-|\sigma t/\sqrt d|^\alpha)$, $P(|X| > x) \sim x^{-\alpha}$. $u = S$ (shape of
    $\theta$). For $\alpha < 2$ the variance is infinite (Assumption 1 fails); for $\alpha \le 1$
    the mean does not exist either ($\alpha = 1$: Cauchy). $\alpha = 2$ is Gaussian with
    $S \sim N(0, 2)$: ``IsotropicGaussian(sqrt(2) * scale)``.

    Sampling: Chambers–Mallows–Stuck, $S = \frac{\sin\alpha V}{(\cos V)^{1/\alpha}}
    \left(\frac{\cos((1-\alpha)V)}{W}\right)^{(1-\alpha)/\alpha}$, $V \sim U(-\pi/2, \pi/2)$,
    $W \sim \operatorname{Exp}(1)$ — written here because NumPyro 0.22 has no stable
    distribution (only ``Levy``, the totally skewed $\alpha = 1/2$ case).

    **Arguments:** `scale` $\sigma \ge 0$, `alpha` $\in (0, 2]$.
    """

    scale: Float[Array, ""]
    alpha: Float[Array, ""]

    def __init__(self, scale: ScalarLike, alpha: ScalarLike):
        check_positive("scale", scale, allow_zero=True, fix="Use scale >= 0.")
        check_in_interval(
            "alpha", alpha, 0.0, 2.0, closed_high=True, fix="A stable index lies in (0, 2]."
        )
        self.scale, self.alpha = as_float_array(scale), as_float_array(alpha)

    def _standard_stable(self, key: PRNGKeyArray, shape: tuple[int, ...]) -> Array:
        kv, kw = jax.random.split(key)
        a = self.alpha
        v = jnp.pi * (open_uniform(kv, shape) - 0.5)  # inside (-pi/2, pi/2): cos v > 0
        w = -jnp.log(open_uniform(kw, shape))
        return jnp.sin(a * v) / jnp.cos(v) ** (1 / a) * (jnp.cos((1 - a) * v) / w) ** ((1 - a) / a)

    def sample(self, key: PRNGKeyArray, theta: PyTree[Array]) -> PyTree[Array]:
        return iid_like(self._standard_stable, key, theta)

    def gradient(
        self, objective: AbstractObjective, theta: PyTree[Array], u: PyTree[Array]
    ) -> PyTree[Array]:
        return additive_gradient(objective, theta, u, self.scale)

    def covariance(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> Float[Array, "d d"] | None:
        d = flat_size(theta)
        return moment_or_none(self.alpha == 2, 2 * self.scale**2 / d * jnp.eye(d))

    def variance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, ""]:
        return jnp.where(self.alpha == 2, 2 * self.scale**2, jnp.inf)

    @property
    def tail_index(self) -> float:
        r"""$\alpha$ for $\alpha < 2$; ``inf`` at $\alpha = 2$ (Gaussian)."""
        return math.inf if float(self.alpha) == 2 else float(self.alpha)

    def matched(
        self, objective: AbstractObjective, theta: PyTree[Array], variance: float
    ) -> "AlphaStableNoise":
        r"""Matched to ``variance``: exactly at $\alpha = 2$; for $\alpha < 2$ (infinite
        variance) the scale at which the $\alpha = 2$ law has that variance,
        $\sqrt{\text{variance}/2}$."""
        if float(self.alpha) == 2:
            return super().matched(objective, theta, variance)
        scale = as_float_array(math.sqrt(float(variance) / 2))
        return eqx.tree_at(lambda n: n.scale, self, scale)

    def assumption1(self, objective: AbstractObjective) -> Assumption1:
        a = concrete_scalar(self.alpha)
        if a is None:
            return Assumption1(None, None, None, "unknown: alpha is traced; call outside jit/vmap")
        if a <= 1:
            return Assumption1(False, None, None, "no mean (alpha-stable, alpha <= 1): G is biased")
        if a < 2:
            return Assumption1(False, None, None, "infinite variance (alpha-stable, alpha < 2)")
        return Assumption1(
            True, jnp.sqrt(2.0) * self.scale, as_float_array(0.0), "exact: alpha = 2 Gaussian"
        )

    def is_additive(self) -> bool:
        return True

    def diffusion(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> lx.AbstractLinearOperator:
        r"""$B = \sqrt2\,\sigma I/\sqrt d$ for $\alpha = 2$; no diffusion for $\alpha < 2$."""
        a = concrete_scalar(self.alpha)
        if a is not None and a < 2:
            raise no_diffusion_error(
                f"AlphaStableNoise(alpha={a:g})", "alpha < 2: infinite variance"
            )
        scale = jnp.where(self.alpha == 2, jnp.sqrt(2.0) * self.scale, jnp.nan)
        return scaled_identity(theta, scale / math.sqrt(flat_size(theta)))
