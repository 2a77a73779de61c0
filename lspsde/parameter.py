r"""Parameter flows over training time: $\theta^{t+1} = \mathcal{A}_t(\theta^t, u^t)$ (Section 5).

A parameter flow is the update rule given a (stochastic) gradient $G$; where that gradient comes
from is the noise model's business (``lspsde.noise``). Stochastic, proximal and projected
updates are further subclasses of [`AbstractParameterFlow`][].
"""

import abc
from typing import TYPE_CHECKING

import equinox as eqx
import jax
from jaxtyping import Array, ArrayLike, PRNGKeyArray, PyTree

from .schedules import AbstractSchedule, as_schedule

if TYPE_CHECKING:
    from .noise import AbstractNoise
    from .objectives import AbstractObjective


class AbstractParameterFlow(eqx.Module):
    r"""An update rule $\theta^{t+1} = \mathcal{A}_t(\theta^t; G)$ given a gradient $G$.

    A learning system calls a flow through [`draw`][] (the randomness $u^t$ of one step) and
    [`step`][] ($\theta^{t+1}$ from $\theta^t$ and $u^t$). For a discrete update these are the
    noise model's draw and ``self(t, theta, noise.gradient(objective, theta, u))``; a
    continuous-time limit (``lspsde.SGDLimit``) overrides both, drawing Brownian increments and
    integrating over one step's worth of time.
    """

    @abc.abstractmethod
    def __call__(self, t: ArrayLike, theta: PyTree[Array], grad: PyTree[Array]) -> PyTree[Array]:
        r"""One step at time ``t`` from $\theta^t$ with gradient $G$."""

    def draw(
        self,
        objective: "AbstractObjective",
        noise: "AbstractNoise",
        key: PRNGKeyArray,
        theta: PyTree[Array],
    ) -> PyTree:
        r"""$u^t$ for one step, from the step's own key."""
        return noise.sample(key, theta)

    def step(
        self,
        objective: "AbstractObjective",
        noise: "AbstractNoise",
        t: ArrayLike,
        theta: PyTree[Array],
        u: PyTree,
    ) -> PyTree[Array]:
        r"""$\theta^{t+1} = \mathcal{A}_t(\theta^t, u^t)$."""
        return self(t, theta, noise.gradient(objective, theta, u))

    def check(
        self, objective: "AbstractObjective", noise: "AbstractNoise", theta0: PyTree[Array]
    ) -> None:
        r"""Check, before anything is compiled, that this flow fits the objective and noise."""


class SGD(AbstractParameterFlow):
    r"""(Stochastic) gradient descent $\theta^{t+1} = \theta^t - \eta_t G(\theta^t, u^t)$
    (eq. 5.1).

    The stochastic gradient $G$ comes from the noise model: exact gradients (``NoNoise``, the
    default of a ``LearningSystem``) give full-batch gradient descent; ``GaussianNoise``,
    minibatch sampling, ... give SGD. For piecewise-smooth objectives (``jnp.abs``, ``relu``,
    ``max``) ``jax.grad`` returns one element of the Clarke subdifferential at a kink, so the
    same update is the (stochastic) subgradient method of Section 6; decreasing steps
    (``RobbinsMonro``) are then the usual choice. ``GradientDescent`` and ``SubgradientMethod``
    are other names of this one class.

    **Arguments:**

    - `step_size`: one real number $\eta > 0$ (a constant schedule, Theorem 5.2) or an
      ``lspsde.schedules.AbstractSchedule`` such as ``RobbinsMonro(c, t0, p)`` (Theorem 5.3).
      An array of step sizes is refused: a grid of values is an ``lspsde.Sweep``.
    """

    step_size: AbstractSchedule

    def __init__(self, step_size: "float | Array | AbstractSchedule"):
        self.step_size = as_schedule(step_size)

    def __call__(self, t: ArrayLike, theta: PyTree[Array], grad: PyTree[Array]) -> PyTree[Array]:
        eta = self.step_size(t)
        return jax.tree.map(lambda p, g: p - eta * g, theta, grad)


GradientDescent = SGD
"""Full-batch gradient descent: [`SGD`][] (with the default exact-gradient noise)."""

SubgradientMethod = SGD
"""The (stochastic) subgradient method of Section 6: [`SGD`][] (``jax.grad`` picks a Clarke
subgradient at kinks)."""
