r"""Proximal and projected gradient flows: parameter flows with a non-smooth step (Section 6).

$$\theta^{t+1} = \operatorname{prox}_{\eta_t R}\big(\theta^t - \eta_t G(\theta^t, u^t)\big),
\qquad \theta^{t+1} = P_C\big(\theta^t - \eta_t G(\theta^t, u^t)\big).$$

They are ordinary ``lspsde.AbstractParameterFlow`` s, so they go wherever ``lspsde.SGD`` goes:
``lspsde.simulate`` with any noise model (exact gradients give proximal / projected gradient
descent, a noisy $G$ the stochastic versions), ``lspsde.Sweep`` over step sizes or weights (all
hyperparameters are array fields), ``lspsde.learning_profile`` and
``lspsde.exponent_distribution``. The profile differentiates through the prox: soft-thresholding
and clipping have derivative 0 or 1 off their kinks (JAX takes one of them at a kink), so
$\sigma^\theta_t = \|D_t(I - \eta_t\nabla^2\mathcal{L})\|_2$ with $D_t$ the prox's Jacobian,
$\|D_t\|_2 \le 1$ (firm non-expansiveness). On a convex $L$-smooth loss, $\eta \le 2/L$ gives
$\sigma^\theta_t \le 1$, and $\eta < 2/L$ makes $\Phi = \mathcal{L} + R$ nonincreasing:
$\Phi(\theta^{t+1}) \le \Phi(\theta^t) - (1/\eta - L/2)\|\theta^{t+1} - \theta^t\|^2$ for exact
gradients.
"""

import abc

import equinox as eqx
import jax
from jaxtyping import Array, ArrayLike, Float, PyTree

from ..noise import AbstractNoise
from ..objectives import AbstractObjective
from ..parameter import AbstractParameterFlow
from ..schedules import AbstractSchedule, as_schedule
from .constraints import AbstractConstraint
from .regularizers import AbstractRegularizer

__all__ = ["AbstractProximalFlow", "ProjectedGradient", "ProximalGradient"]


class AbstractProximalFlow(AbstractParameterFlow):
    r"""$\theta^{t+1} = \operatorname{prox}_{\eta_t R}(\theta^t - \eta_t G)$ for the convex
    term $R$ of [`term`][] (a regulariser, or a constraint's indicator)."""

    step_size: eqx.AbstractVar[AbstractSchedule]

    @abc.abstractmethod
    def term(self) -> AbstractRegularizer:
        r"""The non-smooth term $R$ whose prox follows the gradient step."""

    def __call__(self, t: ArrayLike, theta: PyTree[Array], grad: PyTree[Array]) -> PyTree[Array]:
        eta = self.step_size(t)
        return self.term().prox(jax.tree.map(lambda p, g: p - eta * g, theta, grad), eta)

    def check(
        self, objective: AbstractObjective, noise: AbstractNoise, theta0: PyTree[Array]
    ) -> None:
        self.term().check(theta0)

    def energy(self, objective: AbstractObjective, theta: PyTree[Array]) -> Float[Array, ""]:
        r"""$\Phi(\theta) = \mathcal{L}(\theta) + R(\theta)$, the variational energy of the flow
        ($+\infty$ off a constraint set)."""
        return objective.loss(theta) + self.term().value(theta)


class ProximalGradient(AbstractProximalFlow):
    r"""(Stochastic) proximal gradient $\theta^{t+1} = \operatorname{prox}_{\eta_t R}(\theta^t -
    \eta_t G)$ (ISTA for the lasso).

    **Arguments:**

    - `step_size`: $\eta > 0$ or a schedule, exactly as for ``lspsde.SGD`` (an array of step
      sizes is refused: a grid is an ``lspsde.Sweep``).
    - `regularizer`: $R$: ``L1``, ``L2``, ``ElasticNet``, or a constraint (``Box``, ``Ball``,
      ``Simplex``: the indicator, whose prox is the projection).
    """

    step_size: AbstractSchedule
    regularizer: AbstractRegularizer

    def __init__(
        self, step_size: "float | Array | AbstractSchedule", regularizer: AbstractRegularizer
    ):
        if not isinstance(regularizer, AbstractRegularizer):
            raise TypeError(
                "`regularizer` must be an lspsde regulariser (L1, L2, ElasticNet, or a "
                f"constraint Box, Ball, Simplex), got {type(regularizer).__name__}."
            )
        self.step_size = as_schedule(step_size)
        self.regularizer = regularizer

    def term(self) -> AbstractRegularizer:
        return self.regularizer


class ProjectedGradient(AbstractProximalFlow):
    r"""(Stochastic) projected gradient $\theta^{t+1} = P_C(\theta^t - \eta_t G)$.

    The same flow as ``ProximalGradient(step_size, constraint)``; every iterate after the
    first step lies in $C$, whatever the noise.

    **Arguments:**

    - `step_size`: $\eta > 0$ or a schedule, as for ``lspsde.SGD``.
    - `constraint`: $C$: ``Box``, ``Ball`` or ``Simplex``.
    """

    step_size: AbstractSchedule
    constraint: AbstractConstraint

    def __init__(
        self, step_size: "float | Array | AbstractSchedule", constraint: AbstractConstraint
    ):
        if not isinstance(constraint, AbstractConstraint):
            raise TypeError(
                "`constraint` must be an lspsde constraint (Box, Ball or Simplex), got "
                f"{type(constraint).__name__}; a regulariser goes into ProximalGradient."
            )
        self.step_size = as_schedule(step_size)
        self.constraint = constraint

    def term(self) -> AbstractConstraint:
        return self.constraint
