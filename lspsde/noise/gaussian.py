r"""Gaussian noise models: $G = \nabla\mathcal{L}(\theta) + B(\theta)\xi$, $\xi \sim N(0, I)$.

All three set ``gaussian_draws = True``: the SDE limit of SGD with them is driven by the very
normal draws SGD uses, so the two can be coupled path by path.
"""

import math
from typing import ClassVar

import equinox as eqx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree
import lineax as lx

from .._checks import _concrete_array
from .._custom_types import ScalarLike
from ..objectives import AbstractObjective
from .base import AbstractNoise, Assumption1
from .helpers import (
    add_flat,
    additive_gradient,
    as_float_array,
    check_positive,
    concrete_scalar,
    flat_dtype,
    flat_minimizer,
    flat_size,
    safe_norm,
    scaled_identity,
    standard_normal_like,
)

__all__ = ["AnisotropicGaussian", "GaussianNoise", "IsotropicGaussian"]


class IsotropicGaussian(AbstractNoise):
    r"""$G = \nabla\mathcal{L}(\theta) + \sigma\xi$, $\xi \sim N(0, I_d/d)$: total variance
    $\mathbb{E}\|G - \nabla\mathcal{L}\|^2 = \sigma^2$ exactly, whatever $d$.

    Normalisation: $u \sim N(0, I_d)$ (shape of $\theta$) and $G = \nabla\mathcal{L} +
    (\sigma/\sqrt d)\,u$, so each entry has standard deviation $\sigma/\sqrt d$ and
    $\Sigma = (\sigma^2/d) I$. Assumption 1 holds with $\sigma_0 = \sigma$, $\sigma_1 = 0$.

    **Arguments:** `scale` $\sigma \ge 0$.
    """

    scale: Float[Array, ""]
    gaussian_draws: ClassVar[bool] = True

    def __init__(self, scale: ScalarLike):
        check_positive("scale", scale, allow_zero=True, fix="scale is a standard deviation.")
        self.scale = as_float_array(scale)

    def sample(self, key: PRNGKeyArray, theta: PyTree[Array]) -> PyTree[Array]:
        return standard_normal_like(key, theta)

    def gradient(
        self, objective: AbstractObjective, theta: PyTree[Array], u: PyTree[Array]
    ) -> PyTree[Array]:
        return additive_gradient(objective, theta, u, self.scale)

    def covariance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, "d d"]:
        d = flat_size(theta)
        return self.scale**2 / d * jnp.eye(d)

    def variance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, ""]:
        return self.scale**2

    def assumption1(self, objective: AbstractObjective) -> Assumption1:
        return Assumption1(
            True, self.scale, as_float_array(0.0), "exact: additive Gaussian, variance scale^2"
        )

    def is_additive(self) -> bool:
        return True

    def diffusion(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> lx.AbstractLinearOperator:
        return scaled_identity(theta, self.scale / math.sqrt(flat_size(theta)))


class AnisotropicGaussian(AbstractNoise):
    r"""$G = \nabla\mathcal{L}(\theta) + C\xi$, $\xi \sim N(0, I_d)$: $\Sigma = CC^\top$.

    `scale` is either the matrix $C$, shape ``(d, d)``, or a vector $s$ of per-entry standard
    deviations, shape ``(d,)`` ($C = \operatorname{diag}(s)$). $u = \xi$ has the shape of
    $\theta$. Assumption 1 holds with $\sigma_0^2 = \operatorname{tr}\Sigma = \|C\|_F^2$,
    $\sigma_1 = 0$, exactly. Build from a covariance with [`from_covariance`][].

    **Raises:** ``ValueError`` for a scale that is not ``(d,)`` or ``(d, d)``, negative standard
    deviations, or (in `sample`/`check`) a $d$ that differs from $\theta$'s size.
    """

    scale: Float[Array, " d"] | Float[Array, "d d"]
    gaussian_draws: ClassVar[bool] = True

    def __init__(self, scale: ArrayLike):
        scale = as_float_array(scale)
        if scale.ndim not in (1, 2) or (scale.ndim == 2 and scale.shape[0] != scale.shape[1]):
            raise ValueError(
                f"`scale` must be a vector of standard deviations (d,) or a square matrix C "
                f"(d, d) with Sigma = C C^T, got shape {scale.shape}."
            )
        if scale.ndim == 1:
            check_positive("scale", scale, allow_zero=True, fix="Standard deviations are >= 0.")
        self.scale = scale

    @classmethod
    def from_covariance(cls, covariance: ArrayLike) -> "AnisotropicGaussian":
        r"""The model with $\Sigma$ = `covariance` (symmetric positive semidefinite, ``(d, d)``);
        $C = V\Lambda^{1/2}$ from its eigendecomposition."""
        S = as_float_array(covariance)
        if S.ndim != 2 or S.shape[0] != S.shape[1]:
            raise ValueError(f"`covariance` must be (d, d), got shape {S.shape}.")
        q, V = jnp.linalg.eigh(0.5 * (S + S.T))
        qc = _concrete_array(q)
        if qc is not None and qc.size and qc[0] < -1e-10 * max(1.0, abs(qc[-1])):
            raise ValueError(
                f"`covariance` is not positive semidefinite (smallest eigenvalue {qc[0]:.3g})."
            )
        return cls(V * jnp.sqrt(jnp.maximum(q, 0.0))[None, :])

    def _fit(self, theta: PyTree[Array]) -> int:
        d = flat_size(theta)
        if self.scale.shape[0] != d:
            raise ValueError(
                f"AnisotropicGaussian has dimension {self.scale.shape[0]} (scale shape "
                f"{self.scale.shape}) but theta has {d} entries; give a scale of shape ({d},) or "
                f"({d}, {d}) (flat order of jax.flatten_util.ravel_pytree(theta))."
            )
        return d

    def _matrix(self) -> Array:
        return self.scale if self.scale.ndim == 2 else jnp.diag(self.scale)

    def sample(self, key: PRNGKeyArray, theta: PyTree[Array]) -> PyTree[Array]:
        self._fit(theta)
        return standard_normal_like(key, theta)

    def gradient(
        self, objective: AbstractObjective, theta: PyTree[Array], u: PyTree[Array]
    ) -> PyTree[Array]:
        self._fit(theta)
        z = ravel_pytree(u)[0]
        pert = self.scale @ z if self.scale.ndim == 2 else self.scale * z
        return add_flat(objective.gradient(theta), pert)

    def covariance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, "d d"]:
        self._fit(theta)
        C = self._matrix()
        return C @ C.T

    def variance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, ""]:
        self._fit(theta)
        return jnp.sum(self.scale**2)

    def assumption1(self, objective: AbstractObjective) -> Assumption1:
        return Assumption1(
            True,
            jnp.sqrt(jnp.sum(self.scale**2)),
            as_float_array(0.0),
            "exact: sigma0^2 = tr Sigma",
        )

    def is_additive(self) -> bool:
        return True

    def diffusion(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> lx.AbstractLinearOperator:
        self._fit(theta)
        dtype = flat_dtype(theta)
        if self.scale.ndim == 1:
            return lx.DiagonalLinearOperator(self.scale.astype(dtype))
        return lx.MatrixLinearOperator(self.scale.astype(dtype))

    def check(self, objective: AbstractObjective, theta0: PyTree[Array]) -> None:
        self._fit(theta0)
        super().check(objective, theta0)


class GaussianNoise(AbstractNoise):
    r"""The noise of Assumption 1 with equality: $G = \nabla\mathcal{L}(\theta) + \sigma_0\xi_0 +
    \sigma_1\|\theta - \theta^*\|\xi_1$, with $\xi_0, \xi_1 \sim N(0, I_d/d)$ independent.

    Then $\mathbb{E}[G \mid \theta] = \nabla\mathcal{L}(\theta)$ and
    $\mathbb{E}\|G - \nabla\mathcal{L}\|^2 = \sigma_0^2 + \sigma_1^2\|\theta - \theta^*\|^2$
    exactly, $\Sigma(\theta) = (\sigma_0^2 + \sigma_1^2\|\theta-\theta^*\|^2) I_d / d$.
    $u = (z_0, z_1)$, two standard normal draws in the shape of $\theta$ ($\xi_k = z_k/\sqrt d$).
    At $\theta = \theta^*$ the derivative of $\|\theta - \theta^*\|$ is taken as 0.

    $\theta^*$ comes from ``objective.minimizer()``. With $\sigma_1 = 0$ (a concrete zero at
    construction: the static field ``state_dependent`` is then ``False``) no minimiser is needed.

    **Naming.** Every other model calls its magnitude `scale`; this one has two, and they are
    the constants $\sigma_0, \sigma_1$ of Assumption 1 itself (Section 5), which it attains with
    equality: the arguments carry the paper's names, as [`Assumption1`][] does.

    **Arguments:** `sigma0` $\ge 0$, `sigma1` $\ge 0$.

    **Raises:** ``ValueError`` for negative constants, or when $\sigma_1 \ne 0$ and the
    objective has no minimiser (in `check`, or when `gradient` is traced).
    """

    sigma0: Float[Array, ""]
    sigma1: Float[Array, ""]
    state_dependent: bool = eqx.field(static=True)
    magnitude: ClassVar[str | None] = "sigma0"
    gaussian_draws: ClassVar[bool] = True

    def __init__(self, sigma0: ScalarLike, sigma1: ScalarLike = 0.0):
        for name, value in (("sigma0", sigma0), ("sigma1", sigma1)):
            check_positive(name, value, allow_zero=True, fix="Assumption 1 needs sigma >= 0.")
        self.sigma0, self.sigma1 = as_float_array(sigma0), as_float_array(sigma1)
        self.state_dependent = concrete_scalar(sigma1) != 0.0

    def _error(self, objective: AbstractObjective, theta: PyTree[Array]) -> Array:
        r"""$\|\theta - \theta^*\|$ (0 when not state dependent)."""
        if not self.state_dependent:
            return jnp.asarray(0.0)
        flat = ravel_pytree(theta)[0]
        return safe_norm(flat - flat_minimizer(objective, theta, "GaussianNoise with sigma1 != 0"))

    def sample(self, key: PRNGKeyArray, theta: PyTree[Array]) -> tuple[PyTree[Array], ...]:
        flat, unravel = ravel_pytree(theta)
        d = flat.size
        if self.state_dependent:
            # One flat draw of 2d normals, halved: on CPU one call of size 2d cost about a
            # quarter of two calls of size d at small d. The barrier keeps XLA from fusing the
            # whole normal transform into the update, which made small-d steps ~2x slower
            # (bench_limits.py).
            z = jax.random.normal(key, (2 * d,), dtype=flat.dtype)
            z = jax.lax.optimization_barrier(z)
            return unravel(z[:d]), unravel(z[d:])
        # sigma1 = 0: G uses z0 alone. Threefry's counters are per element (JAX's default
        # `jax_threefry_partitionable`), so normal(key, (d,)) is the first half of
        # normal(key, (2d,)): u is the same as above, bit for bit. z1, drawn on its own, is
        # then dead code wherever only G is needed (SGD) and XLA drops it: one normal vector a
        # step, as IsotropicGaussian, instead of two behind the barrier (which made simulate
        # ~1.9x the hand-written scan at d = 16, 1.5x at d = 1,000: benchmarks/bench_noise.py).
        # The SDE limit still gets both halves (m = 2d), at 3d normals a step instead of 2d.
        z0 = jax.lax.optimization_barrier(jax.random.normal(key, (d,), dtype=flat.dtype))
        z1 = jax.random.normal(key, (2 * d,), dtype=flat.dtype)[d:]
        return unravel(z0), unravel(z1)

    def zero(self, theta: PyTree[Array]) -> tuple[PyTree[Array], ...]:
        return super().zero(theta), super().zero(theta)

    def gradient(
        self, objective: AbstractObjective, theta: PyTree[Array], u: tuple[PyTree[Array], ...]
    ) -> PyTree[Array]:
        z0, z1 = ravel_pytree(u[0])[0], ravel_pytree(u[1])[0]
        pert = self.sigma0 * z0
        if self.state_dependent:
            pert = pert + self.sigma1 * self._error(objective, theta) * z1
        return add_flat(objective.gradient(theta), pert / math.sqrt(z0.size))

    def variance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, ""]:
        return self.sigma0**2 + self.sigma1**2 * self._error(objective, theta) ** 2

    def covariance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, "d d"]:
        d = flat_size(theta)
        return self.variance(objective, theta) / d * jnp.eye(d)

    def matched(
        self, objective: AbstractObjective, theta: PyTree[Array], variance: float
    ) -> "GaussianNoise":
        r"""The model with $\sigma_0$ set so that $\sigma_0^2 + \sigma_1^2\|\theta -
        \theta^*\|^2 = $ ``variance`` at ``theta`` ($\sigma_1$ kept).

        **Raises:** ``ValueError`` when the $\sigma_1$ part alone exceeds ``variance``."""
        state = float(self.variance(objective, theta)) - float(self.sigma0) ** 2
        if not state <= float(variance):
            raise ValueError(
                f"GaussianNoise(sigma1={float(self.sigma1):g}) alone has variance {state:g} at "
                f"theta, above the target {float(variance):g}: lower sigma1."
            )
        return eqx.tree_at(
            lambda n: n.sigma0, self, as_float_array(math.sqrt(float(variance) - state))
        )

    def assumption1(self, objective: AbstractObjective) -> Assumption1:
        return Assumption1(
            True, self.sigma0, self.sigma1, "exact: E||G - grad||^2 = sigma0^2 + sigma1^2 ||e||^2"
        )

    def is_additive(self) -> bool:
        return not self.state_dependent

    def diffusion(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> lx.AbstractLinearOperator:
        r"""$B(\theta) w = (\sigma_0 w_0 + \sigma_1\|\theta - \theta^*\| w_1)/\sqrt d$ for
        $w = (w_0, w_1)$, $m = 2d$: the two draws of [`sample`][] in ``ravel_pytree`` order."""
        d, dtype = flat_size(theta), flat_dtype(theta)
        level = self.sigma1 * self._error(objective, theta)

        def mv(w):
            return (self.sigma0 * w[:d] + level * w[d:]) / math.sqrt(d)

        return lx.FunctionLinearOperator(mv, jax.ShapeDtypeStruct((2 * d,), dtype))

    def check(self, objective: AbstractObjective, theta0: PyTree[Array]) -> None:
        self._error(objective, theta0)
        super().check(objective, theta0)
