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

    def init(self, theta0: PyTree[Array]) -> PyTree[Array]:
        r"""The state the engine carries, from $\theta^0$: $\theta^0$ itself for a flow
        without optimiser state (a [`FlowState`][] for an [`AbstractStatefulFlow`][])."""
        return theta0

    def params(self, state: PyTree[Array]) -> PyTree[Array]:
        r"""$\theta^t$ from the carried state (the inverse of [`init`][]'s embedding)."""
        return state

    def differentiated(self, state: PyTree[Array]) -> PyTree[bool]:
        r"""Which leaves of the carried state are the dynamical state that the profile's
        $\sigma^\theta_t$ and $\alpha_\theta$ differentiate (an ``eqx.partition`` filter of
        ``state``'s structure): every floating leaf by default. The others (an integer step
        count, a held hyperparameter) keep their values along the path."""
        return jax.tree.map(eqx.is_inexact_array, state)


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


class FlowState(eqx.Module):
    r"""The joint state $(\theta^t, s^t)$ of a flow with optimiser state $s^t$ (a momentum
    buffer, Adam's moments and step count, ...): what the ensemble engine carries from step to
    step for an [`AbstractStatefulFlow`][]. Every consumer of a trajectory reads $\theta^t$
    (``theta``); the Jacobian blocks of the profile differentiate the whole state (its floating
    leaves: an integer step count has no derivative; see
    [`AbstractParameterFlow.differentiated`][])."""

    theta: PyTree[Array]
    opt_state: PyTree[Array]


class AbstractStatefulFlow(AbstractParameterFlow):
    r"""An update rule with an optimiser state, $(\theta^{t+1}, s^{t+1}) =
    \mathcal{A}_t(\theta^t, s^t; G(\theta^t, u^t))$.

    The state that ``simulate``, the learning profile and ``exponent_distribution`` carry is the
    [`FlowState`][] ``(theta, opt_state)``, built by [`init`][] from $\theta^0$. So the
    profile's $\sigma^\theta_t$ and the exponent $\alpha_\theta$ are norms of the Jacobian of
    the *full* step with respect to the full state (for heavy ball on a quadratic, the
    companion matrix), and the noise, loss, energy and divergence rule read $\theta^t$.
    Subclasses implement [`init_opt_state`][] and [`__call__`][] on a ``FlowState``.
    """

    @abc.abstractmethod
    def init_opt_state(self, theta0: PyTree[Array]) -> PyTree[Array]:
        r"""$s^0$ from $\theta^0$."""

    @abc.abstractmethod
    def __call__(self, t: ArrayLike, state: FlowState, grad: PyTree[Array]) -> FlowState:
        r"""One step at time ``t`` from $(\theta^t, s^t)$ with the gradient $G$ at
        $\theta^t$."""

    def init(self, theta0: PyTree[Array]) -> FlowState:
        return FlowState(theta0, self.init_opt_state(theta0))

    def params(self, state: FlowState) -> PyTree[Array]:
        return state.theta

    def draw(self, objective, noise, key, state: FlowState) -> PyTree:
        return noise.sample(key, state.theta)

    def step(self, objective, noise, t, state: FlowState, u) -> FlowState:
        return self(t, state, noise.gradient(objective, state.theta, u))
