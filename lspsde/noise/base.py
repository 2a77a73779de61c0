r"""The noise-model interface: [`AbstractNoise`][], its declaration of Assumption 1
([`Assumption1`][]), and exact gradients ([`NoNoise`][])."""

import abc
import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree
import lineax as lx

from ..objectives import AbstractObjective
from .helpers import as_float_array, flat_size, no_diffusion_error, scaled_identity

__all__ = ["AbstractNoise", "Assumption1", "NoNoise"]


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
    magnitude: ClassVar[str | None] = "scale"
    """The field that sets this model's noise level (``None``: no such field, e.g. data-driven
    noise); [`matched`][] rescales it."""

    @property
    def tail_index(self) -> float:
        r"""The tail index $\alpha$ of the noise, $P(\|G - \nabla\mathcal{L}\| > x) \sim
        x^{-\alpha}$: ``inf`` for light (Gaussian) tails, NaN where it is not known in advance
        (e.g. noise from the data). Heavy-tailed models override it."""
        return math.inf if self.gaussian_draws else math.nan

    def matched(
        self, objective: AbstractObjective, theta: PyTree[Array], variance: float
    ) -> "AbstractNoise":
        r"""This model at the noise level $\mathbb{E}[\|G - \nabla\mathcal{L}(\theta)\|^2]
        = $ ``variance`` at ``theta`` (to compare noise models at one level, as the
        ``noise_ablation`` study does).

        The default rescales the field named by ``magnitude`` (``scale``) by
        $\sqrt{\text{variance}/v}$, $v$ = [`variance`][] at ``theta``: exact for any model
        whose variance is proportional to the square of its magnitude, so a new additive model
        gets it for free. A model without a magnitude field (``magnitude = None``) is returned
        unchanged. Models whose variance is infinite, or not quadratic in the magnitude,
        override it.

        **Raises:** ``ValueError`` when the variance at ``theta`` is not finite and positive.
        """
        if self.magnitude is None:
            return self
        target = float(variance)
        current = float(self.variance(objective, theta))
        if not (math.isfinite(target) and target >= 0):
            raise ValueError(f"`variance` must be finite and >= 0, got {variance!r}.")
        if not (math.isfinite(current) and current > 0):
            raise ValueError(
                f"{type(self).__name__} has variance {current} at theta, so it cannot be "
                f"matched to {target:g} by rescaling `{self.magnitude}`; override `matched` "
                "(heavy tails: match the Gaussian limit)."
            )
        old = getattr(self, self.magnitude)
        return eqx.tree_at(
            lambda n: getattr(n, self.magnitude), self, old * math.sqrt(target / current)
        )

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
            raise no_diffusion_error(type(self).__name__, "covariance() is None")
        q, V = jnp.linalg.eigh(0.5 * (cov + cov.T))
        return lx.MatrixLinearOperator(V * jnp.sqrt(jnp.maximum(q, 0.0))[None, :])

    def at_time(self, t: ArrayLike) -> "AbstractNoise":
        r"""This model at training step ``t``. Stationary models (all but the data streams of
        ``lspsde.noise.stream``) return themselves; a non-stationary model returns itself bound
        to ``t``, so that its ``sample`` and ``gradient`` see the step. The learning system
        binds the time before every draw and step."""
        return self

    def check_horizon(self, n_steps: int) -> None:
        r"""Check, before anything compiles, that this model fits a run of ``n_steps`` steps
        (a drift scheduled past the horizon is refused by the non-stationary models)."""

    def check_objective(self, objective: AbstractObjective) -> None:
        r"""Check that this model can draw gradients of ``objective`` at all (its kind, its
        data's shapes), before anything is traced: the engine runs it first, so a model that
        needs a finite sum or a supervised loss says so instead of failing inside a step.

        **Raises:** ``TypeError``/``ValueError`` naming the mismatch and the fix.
        """
        if not isinstance(objective, AbstractObjective):
            raise TypeError(
                f"`objective` must be an AbstractObjective, got {type(objective).__name__}."
            )

    def check(self, objective: AbstractObjective, theta0: PyTree[Array]) -> None:
        r"""Check, without compiling, that this model fits ``objective`` and ``theta0``
        (after [`check_objective`][], which it calls).

        **Raises:** ``ValueError``/``TypeError`` naming the mismatch and the fix.
        """
        self.check_objective(objective)
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

    magnitude: ClassVar[str | None] = None

    def sample(self, key: PRNGKeyArray, theta: PyTree[Array]) -> PyTree[Array]:
        return self.zero(theta)

    def gradient(
        self, objective: AbstractObjective, theta: PyTree[Array], u: PyTree[Array]
    ) -> PyTree[Array]:
        return jax.tree.map(jnp.add, objective.gradient(theta), u)

    def covariance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, "d d"]:
        d = flat_size(theta)
        return jnp.zeros((d, d))

    def variance(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, ""]:
        return jnp.asarray(0.0)

    def assumption1(self, objective: AbstractObjective) -> Assumption1:
        return Assumption1(
            True, as_float_array(0.0), as_float_array(0.0), "exact gradients: no noise"
        )

    def is_additive(self) -> bool:
        return True

    def diffusion(
        self, objective: AbstractObjective, theta: PyTree[Array]
    ) -> lx.AbstractLinearOperator:
        return scaled_identity(theta, 0.0)
