r"""Update noise $u^t$ and the stochastic gradient $G(\theta, u)$ (Section 5, eq. 5.1).

A noise model draws $u^t$ from a key and says how it enters the gradient oracle. Keeping the
noise source apart from the update rule (as diffrax keeps drift, diffusion and the Brownian
path apart) lets the same model feed the discrete update and, later, its continuous-time limit
through [`AbstractNoise.covariance`][] $\Sigma(\theta)$. Keys are derived per step with
``jax.random.fold_in(key, t)``, so a path does not depend on how a run is chunked.

$u$ is the *driving* randomness (standard innovations, or data indices), not the realised
perturbation: state dependence lives in $G(\theta, u)$, so that $\partial G/\partial\theta$ at
fixed $u$ is the Lipschitz constant $L_G$ of (5.2), and $\partial G / \partial u$ gives $L^G_u$.

Every model declares the noise half of Assumption 1,
$\mathbb{E}[G \mid \theta] = \nabla\mathcal{L}(\theta)$ and
$\mathbb{E}[\|G - \nabla\mathcal{L}(\theta)\|^2 \mid \theta] \le \sigma_0^2 +
\sigma_1^2\|\theta - \theta^*\|^2$, through [`AbstractNoise.assumption1`][].

| model | $u$ | $\mathbb{E}\|G - \nabla\mathcal{L}\|^2$ | Assumption 1 |
|---|---|---|---|
| [`NoNoise`][] | $0$ | $0$ | $\sigma_0 = \sigma_1 = 0$ |
| [`IsotropicGaussian`][] | $\xi \sim N(0, I)$ | $\sigma^2$ | $\sigma_0 = \sigma$, $\sigma_1 = 0$ |
| [`AnisotropicGaussian`][] | $\xi \sim N(0, I)$ | $\operatorname{tr}CC^\top$ | $\sigma_0^2 = \operatorname{tr}\Sigma$ |
| [`GaussianNoise`][] | $(\xi_0, \xi_1)$ | $\sigma_0^2 + \sigma_1^2\|\theta-\theta^*\|^2$ | exact |
| [`CurvatureNoise`][] | row indices | quadratic in $\theta - \theta^*$ | frontier (see class) |
| [`MinibatchNoise`][] | example indices | finite-population formula | frontier if quadratic |
| [`StudentTNoise`][] | $t_\nu$ draws | $\sigma^2\nu/(\nu-2)$ or $\infty$ | fails for $\nu \le 2$ |
| [`AlphaStableNoise`][] | $S\alpha S$ draws | $\infty$ for $\alpha < 2$ | fails for $\alpha < 2$ |

Parameters $\theta$ may be pytrees; covariances are over ``jax.flatten_util.ravel_pytree``'s
flat order, and $d$ is the total number of entries.
"""  # noqa: E501

import abc
import math
from typing import Any, ClassVar

import equinox as eqx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, PyTree
import lineax as lx
import numpy as np

from ._checks import (
    _concrete,
    _concrete_array,
    check_in_interval,
    check_positive,
    check_positive_int,
)
from ._custom_types import ScalarLike
from .objectives import AbstractObjective

__all__ = [
    "AbstractNoise",
    "AlphaStableNoise",
    "AnisotropicGaussian",
    "Assumption1",
    "CurvatureNoise",
    "GaussianNoise",
    "IsotropicGaussian",
    "MinibatchNoise",
    "NoNoise",
    "StudentTNoise",
]


# ------------------------------------------------------------------------------------------
# Declarations and helpers
# ------------------------------------------------------------------------------------------


class Assumption1(eqx.Module):
    r"""What a noise model guarantees about the noise half of Assumption 1 (Section 5).

    - `holds`: ``True`` (unbiased, and the variance bound holds with the constants below),
      ``False`` (it fails: see `reason`), or ``None`` (unknown: see `reason`).
    - `sigma0`, `sigma1`: constants with $\mathbb{E}\|G - \nabla\mathcal{L}\|^2 \le \sigma_0^2 +
      \sigma_1^2\|\theta - \theta^*\|^2$ (``None`` unless `holds`).
    - `reason`: one line, saying whether the constants are exact or an upper bound, or why the
      assumption fails.
    """

    holds: bool | None = eqx.field(static=True)
    sigma0: Float[Array, ""] | None
    sigma1: Float[Array, ""] | None
    reason: str = eqx.field(static=True)


def _f(x: Any) -> Array:
    return jnp.asarray(x, dtype=float)


def _standard(sampler: Any, key: PRNGKeyArray, theta: PyTree[Array]) -> PyTree[Array]:
    """Draw ``sampler(key, (d,))`` i.i.d. per entry, in the shape and dtype of ``theta``."""
    flat, unravel = ravel_pytree(theta)
    return unravel(jnp.asarray(sampler(key, flat.shape), dtype=flat.dtype))


def _plus(grad: PyTree[Array], perturbation: Array) -> PyTree[Array]:
    """``grad + perturbation`` with the flat ``perturbation`` cast to the gradient's dtype."""
    flat, unravel = ravel_pytree(grad)
    return unravel(flat + perturbation.astype(flat.dtype))


def _isotropic_gradient(
    objective: AbstractObjective, theta: PyTree[Array], u: PyTree[Array], scale: Array
) -> PyTree[Array]:
    r"""$\nabla\mathcal{L}(\theta) + (\text{scale}/\sqrt{d})\,u$: the i.i.d.-per-entry models."""
    z = ravel_pytree(u)[0]
    return _plus(objective.gradient(theta), scale / math.sqrt(z.size) * z)


def _open_uniform(key: PRNGKeyArray, shape: tuple[int, ...]) -> Array:
    r"""$U(0, 1)$ on the midpoints $(k + \frac12)\,2^{-m}$ of JAX's uniform grid ($m$ mantissa
    bits): never 0 or 1, and each value stands for its own cell of probability $2^{-m}$.

    A draw on $[\text{tiny}, 1)$ puts the mass $2^{-23}$ (float32) of the first cell on
    $U = 10^{-38}$: Student-t samples of $7.6\cdot 10^{12}$ where the next value is about 350,
    and an $\alpha$-stable angle $-\pi/2$ that rounds past $-\pi/2$ (NaN).
    """
    dtype = jax.dtypes.canonicalize_dtype(float)
    half_cell = 2.0 ** -(jnp.finfo(dtype).nmant + 1)
    return jax.random.uniform(key, shape, dtype) + jnp.asarray(half_cell, dtype)


def _size(theta: PyTree[Array]) -> int:
    return ravel_pytree(theta)[0].size


def _safe_norm(x: Array) -> Array:
    """$\\|x\\|$ with derivative 0 (a Clarke subgradient) at $x = 0$, not NaN."""
    sq = jnp.sum(x * x)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _finite_or_none(finite: Array, value: Array) -> Array | None:
    """``value`` where the moment exists, else ``None`` (or ``inf`` entries if traced)."""
    if isinstance(finite, jax.core.Tracer):
        return jnp.where(finite, value, jnp.inf)
    return value if bool(finite) else None


def _flat_dtype(theta: PyTree[Array]) -> tuple[int, Any]:
    flat = ravel_pytree(theta)[0]
    return flat.size, flat.dtype


def _scaled_identity(theta: PyTree[Array], scale: Array) -> lx.AbstractLinearOperator:
    r"""$B = s I_d$ over the flat parameters, as a diagonal operator."""
    d, dtype = _flat_dtype(theta)
    return lx.DiagonalLinearOperator(jnp.full((d,), scale, dtype=dtype))


def _no_diffusion(model: str, why: str) -> ValueError:
    return ValueError(
        f"{model} has no covariance ({why}), so SGD with it has no diffusion (SDE) limit: the "
        "small-step limit of heavy-tailed SGD is a Levy-driven equation, which lspsde does not "
        "integrate. Use a finite-variance model (StudentTNoise with df > 2, a Gaussian model) "
        "for continuous-time limits."
    )


_HAS_MINIMIZER = (
    "Objectives with a known minimiser: models.Quadratic, models.LeastSquares, "
    "models.LogisticRegression (or override `minimizer()` in your objective)."
)


def _no_minimizer(objective: AbstractObjective, who: str) -> ValueError:
    return ValueError(
        f"{who} needs the minimiser theta*, but {type(objective).__name__}.minimizer() is "
        f"None. {_HAS_MINIMIZER} GaussianNoise(sigma0=..., sigma1=0) needs no minimiser."
    )


def _minimizer(objective: AbstractObjective, theta: PyTree[Array], who: str) -> Array:
    """The flat $\\theta^*$ of ``objective``, checked against ``theta``; raises if unknown."""
    theta_star = objective.minimizer()
    if theta_star is None:
        raise _no_minimizer(objective, who)
    flat_star, flat = ravel_pytree(theta_star)[0], ravel_pytree(theta)[0]
    if flat_star.shape != flat.shape:
        raise ValueError(
            f"{type(objective).__name__}.minimizer() has {flat_star.size} entries but theta has "
            f"{flat.size}; pass a theta of the objective's shape."
        )
    return flat_star


def _frontier(
    v0: Array, c: Array, Q: Array, kappa: float, sigma1: ScalarLike | None
) -> tuple[Array, Array]:
    r"""Smallest $\sigma_0$ for a given $\sigma_1$ with $\kappa(v_0 + 2c^\top e + e^\top Q e)
    \le \sigma_0^2 + \sigma_1^2\|e\|^2$ for all $e$ (default: $\sigma_1^2 =
    2\kappa\lambda_{\max}(Q)$).

    $\sigma_0^2 = \kappa v_0 + \max_e[2\kappa c^\top e - e^\top(\sigma_1^2 I - \kappa Q)e]
    = \kappa v_0 + \kappa^2 c^\top(\sigma_1^2 I - \kappa Q)^{-1}c$, attained at
    $e = \kappa(\sigma_1^2 I - \kappa Q)^{-1}c$.
    """
    q, V = jnp.linalg.eigh(Q)
    lam = jnp.maximum(q[-1], 0.0)
    if sigma1 is None:
        s = 2.0 * kappa * lam
    else:
        check_positive("sigma1", sigma1, allow_zero=True, fix="Use sigma1 >= 0.")
        s = _f(sigma1) ** 2
        sc, lc = _concrete(s), _concrete(kappa * lam)
        if sc is not None and lc is not None and lc > 0 and not sc > lc * (1 + 1e-12):
            raise ValueError(
                f"sigma1^2 = {sc:.6g} is not above kappa * lambda_max(Q) = {lc:.6g}, the infimum "
                "of admissible sigma1^2 (the variance grows like that along the top eigenvector "
                "of Q); pass a larger `sigma1`, or None for 2 * kappa * lambda_max(Q)."
            )
    w2 = (V.T @ c) ** 2
    gap = s - kappa * q
    pos = gap > 0
    extra = jnp.sum(jnp.where(pos, kappa**2 * w2 / jnp.where(pos, gap, 1.0), 0.0))
    return jnp.sqrt(kappa * v0 + extra), jnp.sqrt(s)


# ------------------------------------------------------------------------------------------
# Base class and exact gradients
# ------------------------------------------------------------------------------------------


class AbstractNoise(eqx.Module):
    r"""A noise model: the law of $u^t$ and the stochastic gradient $G(\theta, u)$.

    Subclasses implement [`sample`][] and [`gradient`][], and declare their theory through
    [`covariance`][] ($\Sigma(\theta) = \operatorname{Cov}[G \mid \theta]$, for the SDE limit),
    [`variance`][] ($\operatorname{tr}\Sigma(\theta)$) and [`assumption1`][]. [`check`][] runs
    before anything is compiled.

    For continuous-time limits (``lspsde.SGDLimit``) a model also gives a factor
    [`diffusion`][] $B(\theta)$, $BB^\top = \Sigma(\theta)$, and says whether it is additive
    ([`is_additive`][]). A model with ``gaussian_draws = True`` promises that $u \sim N(0, I)$
    and $G(\theta, u) = \nabla\mathcal{L}(\theta) + B(\theta)\,\mathrm{ravel}(u)$ exactly: its
    SDE limit is then driven by the very draws SGD uses, so the two can be coupled path by path.
    """

    gaussian_draws: ClassVar[bool] = False

    @abc.abstractmethod
    def sample(self, key: PRNGKeyArray, theta: PyTree[Array]) -> PyTree[Array]:
        r"""Draw $u^t$ (given the current $\theta^t$, for state-dependent models)."""

    @abc.abstractmethod
    def gradient(
        self, objective: AbstractObjective, theta: PyTree[Array], u: PyTree[Array]
    ) -> PyTree[Array]:
        r"""The stochastic gradient $G(\theta, u)$."""

    def zero(self, theta: PyTree[Array]) -> PyTree[Array]:
        r"""The neutral draw $u = 0$ (the point at which $\partial_u$ blocks are evaluated)."""
        return jax.tree.map(jnp.zeros_like, theta)

    def covariance(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> Float[Array, "d d"] | None:
        r"""$\Sigma(\theta) = \mathbb{E}[(G - \nabla\mathcal{L})(G - \nabla\mathcal{L})^\top \mid
        \theta]$ over the flat parameter vector; ``None`` where it does not exist."""
        raise NotImplementedError(f"{type(self).__name__} does not declare its covariance.")

    def variance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, ""]:
        r"""$\mathbb{E}[\|G - \nabla\mathcal{L}(\theta)\|^2 \mid \theta] = \operatorname{tr}
        \Sigma(\theta)$ (``inf`` where infinite)."""
        cov = self.covariance(objective, theta)
        return jnp.asarray(jnp.inf) if cov is None else jnp.trace(cov)

    def assumption1(self, objective: AbstractObjective) -> Assumption1:
        r"""The noise half of Assumption 1 for this model on ``objective``."""
        return Assumption1(None, None, None, f"{type(self).__name__} declares nothing.")

    def is_additive(self) -> bool:
        r"""Whether $\Sigma$ (so the SDE's diffusion) does not depend on $\theta$ (concrete)."""
        return False

    def diffusion(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> lx.AbstractLinearOperator:
        r"""A factor $B(\theta)$ of the covariance, $B B^\top = \Sigma(\theta)$: a linear
        operator from a flat Brownian increment, shape ``(m,)``, to the flat parameters, ``(d,)``.

        The diffusion of the SDE limit of SGD is $\sqrt\eta\,B(\Theta)$. This default takes
        $B = V\Lambda^{1/2}$ from the eigendecomposition of [`covariance`][] ($m = d$, cost
        $O(d^3)$ per evaluation); models override it with a cheaper exact factor.

        **Raises:** ``ValueError`` when the covariance does not exist.
        """
        cov = self.covariance(objective, theta)
        if cov is None:
            raise _no_diffusion(type(self).__name__, "covariance() is None")
        q, V = jnp.linalg.eigh(0.5 * (cov + cov.T))
        return lx.MatrixLinearOperator(V * jnp.sqrt(jnp.maximum(q, 0.0))[None, :])

    def check(self, objective: AbstractObjective, theta0: PyTree[Array]) -> None:
        r"""Check, without compiling, that this model fits ``objective`` and ``theta0``.

        **Raises:** ``ValueError``/``TypeError`` naming the mismatch and the fix.
        """
        if not isinstance(objective, AbstractObjective):
            raise TypeError(
                f"`objective` must be an AbstractObjective, got {type(objective).__name__}."
            )
        u = jax.eval_shape(self.sample, jax.random.key(0), theta0)
        out = jax.eval_shape(self.gradient, objective, theta0, u)
        inp = jax.eval_shape(lambda th: th, theta0)
        if jax.tree.structure(out) != jax.tree.structure(inp) or any(
            a.shape != b.shape
            for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(inp), strict=True)
        ):
            raise ValueError(
                f"{type(self).__name__}.gradient does not return theta's shape; check that "
                "`theta0` matches the objective."
            )


class NoNoise(AbstractNoise):
    r"""Exact gradients: $G(\theta, u) = \nabla\mathcal{L}(\theta) + u$ with $u^t = 0$.

    $u$ is an additive perturbation of the gradient, so the update sensitivity
    $\partial \mathcal{A}_t / \partial u = -\eta_t I$ is still defined: $\sigma^u_t = \eta_t$.
    """

    def sample(self, key: PRNGKeyArray, theta: PyTree[Array]) -> PyTree[Array]:
        return self.zero(theta)

    def gradient(
        self, objective: AbstractObjective, theta: PyTree[Array], u: PyTree[Array]
    ) -> PyTree[Array]:
        return jax.tree.map(jnp.add, objective.gradient(theta), u)

    def covariance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, "d d"]:
        d = _size(theta)
        return jnp.zeros((d, d))

    def variance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, ""]:
        return jnp.asarray(0.0)

    def assumption1(self, objective: AbstractObjective) -> Assumption1:
        return Assumption1(True, _f(0.0), _f(0.0), "exact gradients: no noise")

    def is_additive(self) -> bool:
        return True

    def diffusion(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> lx.AbstractLinearOperator:
        return _scaled_identity(theta, 0.0)


# ------------------------------------------------------------------------------------------
# Gaussian models
# ------------------------------------------------------------------------------------------


class IsotropicGaussian(AbstractNoise):
    r"""$G = \nabla\mathcal{L}(\theta) + \sigma\xi$, $\xi \sim N(0, I_d/d)$: total variance
    $\mathbb{E}\|G - \nabla\mathcal{L}\|^2 = \sigma^2$ exactly, whatever $d$.

    Normalisation: $u \sim N(0, I_d)$ (shape of $\theta$) and $G = \nabla\mathcal{L} +
    (\sigma/\sqrt d)\,u$, so each entry has standard deviation $\sigma/\sqrt d$ and
    $\Sigma = (\sigma^2/d) I$. Assumption 1 holds with $\sigma_0 = \sigma$, $\sigma_1 = 0$.

    **Arguments:** `sigma` $\ge 0$.
    """

    sigma: Float[Array, ""]
    gaussian_draws: ClassVar[bool] = True

    def __init__(self, sigma: ScalarLike):
        check_positive("sigma", sigma, allow_zero=True, fix="sigma is a standard deviation.")
        self.sigma = _f(sigma)

    def sample(self, key: PRNGKeyArray, theta: PyTree[Array]) -> PyTree[Array]:
        return _standard(jax.random.normal, key, theta)

    def gradient(
        self, objective: AbstractObjective, theta: PyTree[Array], u: PyTree[Array]
    ) -> PyTree[Array]:
        return _isotropic_gradient(objective, theta, u, self.sigma)

    def covariance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, "d d"]:
        d = _size(theta)
        return self.sigma**2 / d * jnp.eye(d)

    def variance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, ""]:
        return self.sigma**2

    def assumption1(self, objective: AbstractObjective) -> Assumption1:
        return Assumption1(True, self.sigma, _f(0.0), "exact: additive Gaussian, variance sigma^2")

    def is_additive(self) -> bool:
        return True

    def diffusion(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> lx.AbstractLinearOperator:
        return _scaled_identity(theta, self.sigma / math.sqrt(_size(theta)))


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
        scale = _f(scale)
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
        S = _f(covariance)
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
        d = _size(theta)
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
        return _standard(jax.random.normal, key, theta)

    def gradient(
        self, objective: AbstractObjective, theta: PyTree[Array], u: PyTree[Array]
    ) -> PyTree[Array]:
        self._fit(theta)
        z = ravel_pytree(u)[0]
        pert = self.scale @ z if self.scale.ndim == 2 else self.scale * z
        return _plus(objective.gradient(theta), pert)

    def covariance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, "d d"]:
        self._fit(theta)
        C = self._matrix()
        return C @ C.T

    def variance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, ""]:
        self._fit(theta)
        return jnp.sum(self.scale**2)

    def assumption1(self, objective: AbstractObjective) -> Assumption1:
        return Assumption1(
            True, jnp.sqrt(jnp.sum(self.scale**2)), _f(0.0), "exact: sigma0^2 = tr Sigma"
        )

    def is_additive(self) -> bool:
        return True

    def diffusion(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> lx.AbstractLinearOperator:
        self._fit(theta)
        dtype = _flat_dtype(theta)[1]
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

    **Arguments:** `sigma0` $\ge 0$, `sigma1` $\ge 0$.

    **Raises:** ``ValueError`` for negative constants, or when $\sigma_1 \ne 0$ and the
    objective has no minimiser (in `check`, or when `gradient` is traced).
    """

    sigma0: Float[Array, ""]
    sigma1: Float[Array, ""]
    state_dependent: bool = eqx.field(static=True)
    gaussian_draws: ClassVar[bool] = True

    def __init__(self, sigma0: ScalarLike, sigma1: ScalarLike = 0.0):
        for name, value in (("sigma0", sigma0), ("sigma1", sigma1)):
            check_positive(name, value, allow_zero=True, fix="Assumption 1 needs sigma >= 0.")
        self.sigma0, self.sigma1 = _f(sigma0), _f(sigma1)
        self.state_dependent = _concrete(sigma1) != 0.0

    def _error(self, objective: AbstractObjective, theta: PyTree[Array]) -> Array:
        r"""$\|\theta - \theta^*\|$ (0 when not state dependent)."""
        if not self.state_dependent:
            return jnp.asarray(0.0)
        flat = ravel_pytree(theta)[0]
        return _safe_norm(flat - _minimizer(objective, theta, "GaussianNoise with sigma1 != 0"))

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
        return _plus(objective.gradient(theta), pert / math.sqrt(z0.size))

    def variance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, ""]:
        return self.sigma0**2 + self.sigma1**2 * self._error(objective, theta) ** 2

    def covariance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, "d d"]:
        d = _size(theta)
        return self.variance(objective, theta) / d * jnp.eye(d)

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
        d, dtype = _flat_dtype(theta)
        level = self.sigma1 * self._error(objective, theta)

        def mv(w):
            return (self.sigma0 * w[:d] + level * w[d:]) / math.sqrt(d)

        return lx.FunctionLinearOperator(mv, jax.ShapeDtypeStruct((2 * d,), dtype))

    def check(self, objective: AbstractObjective, theta0: PyTree[Array]) -> None:
        self._error(objective, theta0)
        super().check(objective, theta0)


# ------------------------------------------------------------------------------------------
# Sampling noise from data: random Hessians and minibatches
# ------------------------------------------------------------------------------------------


def _check_data_size(batch_size: int, data_size: int) -> tuple[int, int]:
    batch_size = check_positive_int("batch_size", batch_size)
    data_size = check_positive_int("data_size", data_size)
    if batch_size > data_size:
        raise ValueError(
            f"`batch_size` = {batch_size} exceeds `data_size` = {data_size}; a batch drawn "
            "without replacement cannot be larger than the data set. Use batch_size <= data_size."
        )
    return batch_size, data_size


class CurvatureNoise(AbstractNoise):
    r"""Multiplicative noise from random Hessians: least squares with sampled rows.

    For $\mathcal{L}(\theta) = \frac1{2n}\|A\theta - b\|^2$ with rows $a_i$, draw $B$ row indices
    $i_1..i_B$ uniformly *with* replacement ($u$, shape ``(B,)``) and set
    $G = \frac1B\sum_j a_{i_j}(a_{i_j}^\top\theta - b_{i_j})
    = \frac1B\sum_j (a_{i_j}a_{i_j}^\top\,\theta - a_{i_j}b_{i_j})$: a random Hessian
    $a a^\top$ (mean $H = A^\top A/n$) acting on $\theta$, so the noise grows with $\theta$.
    $\mathbb{E}\,G = \frac1n A^\top(A\theta - b) = \nabla\mathcal{L}$: unbiased.

    **Variance.** With $g_i = a_i r_i$, $r_i(\theta) = a_i^\top\theta - b_i$, one row has
    $v(\theta) = \frac1n\sum_i\|a_i\|^2 r_i^2 - \|\nabla\mathcal{L}\|^2$ and a batch $v/B$;
    $\Sigma(\theta) = \frac1B[\frac1n\sum_i r_i^2 a_i a_i^\top - \nabla\mathcal{L}
    \nabla\mathcal{L}^\top]$. Put $e = \theta - \theta^*$, $r_i^* = r_i(\theta^*)$ (so
    $r_i = r_i^* + a_i^\top e$, $\nabla\mathcal{L} = He$, $\sum_i a_i r_i^* = 0$). Then

    $$v = v_0 + 2c^\top e + e^\top Q e,\quad v_0 = \tfrac1n\textstyle\sum_i\|a_i\|^2 r_i^{*2},
    \quad c = \tfrac1n\sum_i\|a_i\|^2 r_i^* a_i,\quad Q = M - H^2,$$

    with $M = \frac1n\sum_i\|a_i\|^2 a_ia_i^\top$ the fourth-moment matrix ($Q \succeq 0$: it is
    the covariance of the random Hessian acting on $e$). $v_0 = v(\theta^*)$.

    **Constants.** If $c = 0$ (e.g. interpolation, $r^* = 0$), $\sigma_0^2 = v_0/B$,
    $\sigma_1^2 = \lambda_{\max}(Q)/B$ are exact. In general the cross term makes the bound a
    trade-off: for any $\sigma_1^2 > \lambda_{\max}(Q)/B$ the smallest valid
    $\sigma_0^2 = [v_0 + c^\top(B\sigma_1^2 I - Q)^{-1}c]/B$ (attained: equality at one $e$).
    [`assumption1`][] takes $\sigma_1^2 = 2\lambda_{\max}(Q)/B$ (Young's inequality with weight
    1, which also gives $\sigma_0^2 \le 2v_0/B$) unless `sigma1` is passed: an upper bound, tight
    on that frontier.

    $u$ is an integer array: $\partial G / \partial u$ (the $\sigma^u_t$ block) is not defined.

    **Arguments:** `batch_size` $B \ge 1$; `data_size` $n$, the number of rows of $A$ (needed to
    draw indices before the objective is seen; checked against it).

    **Objective:** anything with arrays ``A`` (n, d) and ``b`` (n,) and loss
    $\frac1{2n}\|A\theta - b\|^2$, e.g. ``models.LeastSquares``; $\theta$ a vector (d,).
    """

    batch_size: int = eqx.field(static=True)
    data_size: int = eqx.field(static=True)

    def __init__(self, batch_size: int, data_size: int):
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.data_size = check_positive_int("data_size", data_size)

    def _data(self, objective: AbstractObjective) -> tuple[Array, Array]:
        A, b = getattr(objective, "A", None), getattr(objective, "b", None)
        if not (hasattr(A, "ndim") and hasattr(b, "ndim") and A.ndim == 2 and b.ndim == 1):
            raise TypeError(
                f"CurvatureNoise samples rows of a least-squares objective, with arrays `A` (n, d)"
                f" and `b` (n,); {type(objective).__name__} has none. Use models.LeastSquares, "
                "or MinibatchNoise for other finite sums."
            )
        if A.shape[0] != self.data_size:
            raise ValueError(
                f"CurvatureNoise(data_size={self.data_size}) but the objective has "
                f"{A.shape[0]} rows; use data_size={A.shape[0]}."
            )
        return A, b

    def _fit(self, objective: AbstractObjective, theta: PyTree[Array]) -> tuple[Array, Array]:
        A, b = self._data(objective)
        if not isinstance(theta, jax.Array | np.ndarray) or theta.shape != (A.shape[1],):
            raise ValueError(
                f"CurvatureNoise needs theta of shape ({A.shape[1]},), got "
                f"{jax.tree.map(jnp.shape, theta)}."
            )
        return A, b

    def sample(self, key: PRNGKeyArray, theta: PyTree[Array]) -> Int[Array, " batch"]:
        return jax.random.randint(key, (self.batch_size,), 0, self.data_size)

    def zero(self, theta: PyTree[Array]) -> Int[Array, " batch"]:
        r"""No draw gives $G = \nabla\mathcal{L}$: rows $0..B-1$, a valid draw."""
        return jnp.arange(self.batch_size) % self.data_size

    def gradient(
        self, objective: AbstractObjective, theta: Float[Array, " d"], u: Int[Array, " batch"]
    ) -> Float[Array, " d"]:
        A, b = self._fit(objective, theta)
        rows = A[u]
        return rows.T @ (rows @ theta - b[u]) / self.batch_size

    def covariance(
        self, objective: AbstractObjective, theta: Float[Array, " d"]
    ) -> Float[Array, "d d"]:
        A, b = self._fit(objective, theta)
        r = A @ theta - b
        g = A.T @ r / A.shape[0]
        M2 = (A * (r**2)[:, None]).T @ A / A.shape[0]
        return (M2 - jnp.outer(g, g)) / self.batch_size

    def variance(self, objective: AbstractObjective, theta: Float[Array, " d"]) -> Float[Array, ""]:
        A, b = self._fit(objective, theta)
        r = A @ theta - b
        g = A.T @ r / A.shape[0]
        return (jnp.mean(jnp.sum(A**2, axis=1) * r**2) - g @ g) / self.batch_size

    def diffusion(
        self, objective: AbstractObjective, theta: Float[Array, " d"]
    ) -> lx.AbstractLinearOperator:
        r"""$B = [g_i - \bar g]_{i \le n} / \sqrt{Bn}$, $g_i = a_i r_i$ ($d \times n$, $m = n$):
        $BB^\top = \frac1{Bn}\sum_i (g_i - \bar g)(g_i - \bar g)^\top = \Sigma(\theta)$."""
        A, b = self._fit(objective, theta)
        per_row = A * (A @ theta - b)[:, None]
        D = per_row - jnp.mean(per_row, axis=0, keepdims=True)
        return lx.MatrixLinearOperator(D.T / math.sqrt(self.batch_size * A.shape[0]))

    def moments(self, objective: AbstractObjective) -> tuple[Array, Array, Array]:
        r"""$(v_0, c, Q)$ of one row: $v(\theta^* + e) = v_0 + 2c^\top e + e^\top Q e$."""
        A, b = self._data(objective)
        theta_star = _minimizer(objective, A[0], "CurvatureNoise.assumption1")
        n = A.shape[0]
        r, sq = A @ theta_star - b, jnp.sum(A**2, axis=1)
        H = A.T @ A / n
        g = A.T @ r / n  # = 0 up to rounding
        v0 = jnp.mean(sq * r**2) - g @ g
        c = A.T @ (sq * r) / n - H @ g
        Q = (A * sq[:, None]).T @ A / n - H @ H
        return v0, c, 0.5 * (Q + Q.T)

    def assumption1(
        self, objective: AbstractObjective, *, sigma1: ScalarLike | None = None
    ) -> Assumption1:
        v0, c, Q = self.moments(objective)
        s0, s1 = _frontier(v0, c, Q, 1.0 / self.batch_size, sigma1)
        return Assumption1(True, s0, s1, "upper bound: smallest sigma0 for this sigma1 (frontier)")

    def check(self, objective: AbstractObjective, theta0: PyTree[Array]) -> None:
        self._fit(objective, theta0)
        super().check(objective, theta0)


def _finite_sum(objective: AbstractObjective, data_size: int) -> None:
    n = getattr(objective, "n_examples", None)
    if not callable(getattr(objective, "per_example_loss", None)) or not isinstance(n, int):
        raise TypeError(
            f"MinibatchNoise needs a finite-sum objective L = (1/n) sum_i l_i with an int "
            f"attribute `n_examples` and a method `per_example_loss(theta, i)` (i a scalar "
            f"integer index); {type(objective).__name__} lacks them. Add both to the objective, "
            "or use CurvatureNoise (least squares) / GaussianNoise instead."
        )
    if n != data_size:
        raise ValueError(
            f"MinibatchNoise(data_size={data_size}) but the objective has n_examples = {n}; "
            f"use data_size={n}."
        )


@eqx.filter_jit
def _affine_moments(objective: AbstractObjective, n: int) -> tuple[Array, Array, Array, Array]:
    """``MinibatchNoise.moments``: one pass over the examples, O(d^2) memory."""
    flat_star, unravel = ravel_pytree(objective.minimizer())
    loss = lambda x, i: objective.per_example_loss(unravel(x), i)
    grad, hess = jax.grad(loss), jax.hessian(loss)
    delta = 1.0 + jnp.abs(flat_star)
    idx = jnp.arange(n)
    g_star = jax.vmap(grad, in_axes=(None, 0))(flat_star, idx)
    g_star = g_star - jnp.mean(g_star, axis=0, keepdims=True)  # g_i* - grad L(theta*)

    def body(carry, i):
        sumH, sumH2, sumHg, dev, scale = carry
        Hi, gi = hess(flat_star, i), grad(flat_star, i)
        off = grad(flat_star + delta, i) - gi - Hi @ delta
        return (
            sumH + Hi,
            sumH2 + Hi @ Hi,
            sumHg + Hi @ g_star[i],
            jnp.maximum(dev, jnp.max(jnp.abs(off))),
            jnp.maximum(scale, jnp.max(jnp.abs(gi)) + jnp.max(jnp.abs(Hi @ delta))),
        ), None

    d, dt = flat_star.size, flat_star.dtype
    zero = jnp.zeros((d, d), dt)
    init = (zero, zero, jnp.zeros(d, dt), jnp.zeros((), dt), jnp.zeros((), dt))
    (sumH, sumH2, sumHg, dev, scale), _ = jax.lax.scan(body, init, idx)
    H = sumH / n
    Q = sumH2 / n - H @ H
    c = sumHg / n  # (1/n) sum_i (H_i - H) g_i* = (1/n) sum_i H_i g_i*, as sum_i g_i* = 0
    v0 = jnp.mean(jnp.sum(g_star**2, axis=1))
    return v0, c, 0.5 * (Q + Q.T), dev / jnp.maximum(scale, 1.0)


class MinibatchNoise(AbstractNoise):
    r"""True sampling noise: the mean gradient over a random minibatch of a finite data set.

    The objective must be a finite sum $\mathcal{L} = \frac1n\sum_i\ell_i$ exposing
    ``n_examples`` ($n$, an int) and ``per_example_loss(theta, i)`` ($\ell_i(\theta)$ for a
    scalar integer index $i$). Each step draws a uniformly random subset of $B$ distinct
    indices (sampling *without* replacement within a step, via ``jax.random.choice(...,
    replace=False)``; steps are independent, not epochs), $u$ = the index array (shape
    ``(B,)``), and $G = \frac1B\sum_{i \in u}\nabla\ell_i(\theta)$.

    **Variance** (finite-population correction). With $g_i = \nabla\ell_i(\theta)$,
    $\bar g = \nabla\mathcal{L}$ and $S^2 = \frac1{n-1}\sum_i(g_i - \bar g)(g_i - \bar g)^\top$,
    $\Sigma(\theta) = \frac{1 - B/n}{B}S^2 = \kappa\,\frac1n\sum_i(g_i-\bar g)(g_i-\bar g)^\top$,
    $\kappa = \frac{n - B}{B(n-1)}$ ($\Sigma = 0$ for $B = n$).

    **Constants.** If every $\nabla\ell_i$ is affine (quadratic losses, e.g. least squares
    $\ell_i = \frac12(a_i^\top\theta - b_i)^2$), $g_i = g_i^* + H_ie$ with $e = \theta-\theta^*$,
    $g_i^* = \nabla\ell_i(\theta^*)$, $H_i = \nabla^2\ell_i$, $H = \frac1n\sum H_i$, so
    $\operatorname{tr}\Sigma = \kappa(v_0 + 2c^\top e + e^\top Qe)$ with
    $v_0 = \frac1n\sum\|g_i^*\|^2$, $c = \frac1n\sum(H_i - H)g_i^*$, $Q = \frac1n\sum(H_i-H)^2$
    (for least squares: $c = \frac1n\sum\|a_i\|^2r_i^*a_i$, $Q = M - H^2$, as for
    [`CurvatureNoise`][] with $1/B$ replaced by $\kappa$). [`assumption1`][] then returns the
    frontier constants ($\sigma_1^2 = 2\kappa\lambda_{\max}(Q)$ unless `sigma1` is passed,
    $\sigma_0^2 = \kappa v_0 + \kappa^2c^\top(\sigma_1^2I - \kappa Q)^{-1}c$), after checking
    numerically (concrete inputs, relative tolerance $\sqrt{\epsilon}$) that each $\nabla\ell_i$
    at $\theta^* + \delta$, $\delta = 1 + |\theta^*|$, equals its affine prediction (a necessary
    condition, not a proof); otherwise ``holds=None``. Cost: $n$ per-example Hessians, $O(d^2)$
    memory.

    $u$ is an integer array: $\partial G / \partial u$ (the $\sigma^u_t$ block) is not defined.

    **Arguments:** `batch_size` $B$, `data_size` $n$ ($1 \le B \le n$, checked at construction).
    """

    batch_size: int = eqx.field(static=True)
    data_size: int = eqx.field(static=True)

    def __init__(self, batch_size: int, data_size: int):
        self.batch_size, self.data_size = _check_data_size(batch_size, data_size)

    @property
    def kappa(self) -> float:
        r"""$\kappa = (n - B)/(B(n - 1))$: $\Sigma = \kappa\cdot$ (population covariance)."""
        n, B = self.data_size, self.batch_size
        return 0.0 if B == n else (n - B) / (B * (n - 1))

    def sample(self, key: PRNGKeyArray, theta: PyTree[Array]) -> Int[Array, " batch"]:
        return jax.random.choice(key, self.data_size, (self.batch_size,), replace=False)

    def zero(self, theta: PyTree[Array]) -> Int[Array, " batch"]:
        r"""No draw gives $G = \nabla\mathcal{L}$ unless $B = n$: examples $0..B-1$."""
        return jnp.arange(self.batch_size)

    def _per_example(self, objective: AbstractObjective, theta: PyTree[Array], idx: Array) -> Array:
        _finite_sum(objective, self.data_size)
        return jax.vmap(jax.grad(objective.per_example_loss), in_axes=(None, 0))(theta, idx)

    def gradient(
        self, objective: AbstractObjective, theta: PyTree[Array], u: Int[Array, " batch"]
    ) -> PyTree[Array]:
        return jax.tree.map(lambda g: jnp.mean(g, axis=0), self._per_example(objective, theta, u))

    def _centred(self, objective: AbstractObjective, theta: PyTree[Array]) -> Array:
        grads = self._per_example(objective, theta, jnp.arange(self.data_size))
        flat = jax.vmap(lambda g: ravel_pytree(g)[0])(grads)
        return flat - jnp.mean(flat, axis=0, keepdims=True)

    def covariance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, "d d"]:
        D = self._centred(objective, theta)
        return self.kappa * D.T @ D / self.data_size

    def variance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, ""]:
        D = self._centred(objective, theta)
        return self.kappa * jnp.sum(D**2) / self.data_size

    def diffusion(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> lx.AbstractLinearOperator:
        r"""$B = \sqrt{\kappa/n}\,[g_i - \bar g]_{i \le n}$ ($d \times n$, $m = n$): the
        covariance estimated from the whole data set, $BB^\top = \Sigma(\theta)$ exactly."""
        D = self._centred(objective, theta)
        return lx.MatrixLinearOperator(math.sqrt(self.kappa / self.data_size) * D.T)

    def moments(self, objective: AbstractObjective) -> tuple[Array, Array, Array, Array]:
        r"""$(v_0, c, Q)$ of the affine-gradient model at $\theta^*$, and the largest relative
        deviation of the per-example gradients at $\theta^* + \delta$ from it (0 if affine)."""
        _finite_sum(objective, self.data_size)
        if objective.minimizer() is None:
            raise _no_minimizer(objective, "MinibatchNoise.assumption1")
        return _affine_moments(objective, self.data_size)

    def assumption1(
        self, objective: AbstractObjective, *, sigma1: ScalarLike | None = None
    ) -> Assumption1:
        v0, c, Q, dev = self.moments(objective)
        dev_c = _concrete(dev)
        if dev_c is None:
            return Assumption1(None, None, None, "unknown: call assumption1 outside jit/vmap")
        if dev_c > math.sqrt(np.finfo(np.asarray(dev).dtype).eps):
            return Assumption1(
                None,
                None,
                None,
                "unknown: per-example gradients are not affine, so the minibatch variance is no "
                "quadratic in theta - theta*; use variance() along the trajectory",
            )
        s0, s1 = _frontier(v0, c, Q, self.kappa, sigma1)
        return Assumption1(True, s0, s1, "upper bound: smallest sigma0 for this sigma1 (frontier)")

    def check(self, objective: AbstractObjective, theta0: PyTree[Array]) -> None:
        _finite_sum(objective, self.data_size)
        super().check(objective, theta0)


# ------------------------------------------------------------------------------------------
# Heavy tails
# ------------------------------------------------------------------------------------------


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
        self.scale, self.df = _f(scale), _f(df)

    def sample(self, key: PRNGKeyArray, theta: PyTree[Array]) -> PyTree[Array]:
        return _standard(self._standard_t, key, theta)

    def _standard_t(self, key: PRNGKeyArray, shape: tuple[int, ...]) -> Array:
        k1, k2 = jax.random.split(key)
        u1 = _open_uniform(k1, shape)
        u2 = jax.random.uniform(k2, shape)
        # U1^(-2/nu) - 1 = expm1(-(2/nu) log U1): accurate for large nu.
        return jnp.cos(2 * jnp.pi * u2) * jnp.sqrt(self.df * jnp.expm1(-2 / self.df * jnp.log(u1)))

    def gradient(
        self, objective: AbstractObjective, theta: PyTree[Array], u: PyTree[Array]
    ) -> PyTree[Array]:
        return _isotropic_gradient(objective, theta, u, self.scale)

    def covariance(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> Float[Array, "d d"] | None:
        d = _size(theta)
        ratio = self.df / jnp.where(self.df > 2, self.df - 2, 1.0)
        return _finite_or_none(self.df > 2, self.scale**2 / d * ratio * jnp.eye(d))

    def variance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, ""]:
        ratio = self.df / jnp.where(self.df > 2, self.df - 2, 1.0)
        return jnp.where(self.df > 2, self.scale**2 * ratio, jnp.inf)

    def assumption1(self, objective: AbstractObjective) -> Assumption1:
        df = _concrete(self.df)
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
            True, s0, _f(0.0), f"exact, but heavy tails: moments of order >= df = {df:g} infinite"
        )

    def is_additive(self) -> bool:
        return True

    def diffusion(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> lx.AbstractLinearOperator:
        r"""$B = \sigma\sqrt{\nu/(\nu - 2)}\,I/\sqrt d$ (the Gaussian with $\Sigma$; $\nu > 2$)."""
        df = _concrete(self.df)
        if df is not None and df <= 2:
            raise _no_diffusion(f"StudentTNoise(df={df:g})", "df <= 2: infinite variance")
        ratio = self.df / jnp.where(self.df > 2, self.df - 2, jnp.nan)
        return _scaled_identity(theta, self.scale * jnp.sqrt(ratio / _size(theta)))


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
        self.scale, self.alpha = _f(scale), _f(alpha)

    def _standard_stable(self, key: PRNGKeyArray, shape: tuple[int, ...]) -> Array:
        kv, kw = jax.random.split(key)
        a = self.alpha
        v = jnp.pi * (_open_uniform(kv, shape) - 0.5)  # inside (-pi/2, pi/2): cos v > 0
        w = -jnp.log(_open_uniform(kw, shape))
        return jnp.sin(a * v) / jnp.cos(v) ** (1 / a) * (jnp.cos((1 - a) * v) / w) ** ((1 - a) / a)

    def sample(self, key: PRNGKeyArray, theta: PyTree[Array]) -> PyTree[Array]:
        return _standard(self._standard_stable, key, theta)

    def gradient(
        self, objective: AbstractObjective, theta: PyTree[Array], u: PyTree[Array]
    ) -> PyTree[Array]:
        return _isotropic_gradient(objective, theta, u, self.scale)

    def covariance(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> Float[Array, "d d"] | None:
        d = _size(theta)
        return _finite_or_none(self.alpha == 2, 2 * self.scale**2 / d * jnp.eye(d))

    def variance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, ""]:
        return jnp.where(self.alpha == 2, 2 * self.scale**2, jnp.inf)

    def assumption1(self, objective: AbstractObjective) -> Assumption1:
        a = _concrete(self.alpha)
        if a is None:
            return Assumption1(None, None, None, "unknown: alpha is traced; call outside jit/vmap")
        if a <= 1:
            return Assumption1(False, None, None, "no mean (alpha-stable, alpha <= 1): G is biased")
        if a < 2:
            return Assumption1(False, None, None, "infinite variance (alpha-stable, alpha < 2)")
        return Assumption1(True, jnp.sqrt(2.0) * self.scale, _f(0.0), "exact: alpha = 2 Gaussian")

    def is_additive(self) -> bool:
        return True

    def diffusion(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> lx.AbstractLinearOperator:
        r"""$B = \sqrt2\,\sigma I/\sqrt d$ for $\alpha = 2$; no diffusion for $\alpha < 2$."""
        a = _concrete(self.alpha)
        if a is not None and a < 2:
            raise _no_diffusion(f"AlphaStableNoise(alpha={a:g})", "alpha < 2: infinite variance")
        scale = jnp.where(self.alpha == 2, jnp.sqrt(2.0) * self.scale, jnp.nan)
        return _scaled_identity(theta, scale / math.sqrt(_size(theta)))
