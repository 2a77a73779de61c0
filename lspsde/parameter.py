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


class GradientDescent(AbstractParameterFlow):
    r"""$\theta^{t+1} = \theta^t - \eta_t G$ (eq. 5.1): full-batch gradient descent with the
    default noise model, SGD with a stochastic one.

    **Arguments:**

    - `step_size`: a number $\eta > 0$ (constant schedule) or an
      ``lspsde.schedules.AbstractSchedule`` such as ``RobbinsMonro``.
    """

    step_size: AbstractSchedule

    def __init__(self, step_size: "float | Array | AbstractSchedule"):
        self.step_size = as_schedule(step_size)

    def __call__(self, t: ArrayLike, theta: PyTree[Array], grad: PyTree[Array]) -> PyTree[Array]:
        return _descent(self.step_size, t, theta, grad)


def _descent(step_size: AbstractSchedule, t: ArrayLike, theta, grad):
    eta = step_size(t)
    return jax.tree.map(lambda p, g: p - eta * g, theta, grad)


class SGD(AbstractParameterFlow):
    r"""Stochastic gradient descent $\theta^{t+1} = \theta^t - \eta_t G(\theta^t, u^t)$ (eq. 5.1).

    The update rule is that of [`GradientDescent`][]; the stochastic gradient $G$ comes from the
    noise model (``lspsde.GaussianNoise``, minibatch sampling, ...). Use a number for a constant
    step (Theorem 5.2) or ``RobbinsMonro(c, t0, p)`` for decreasing steps (Theorem 5.3).
    """

    step_size: AbstractSchedule

    def __init__(self, step_size: "float | Array | AbstractSchedule"):
        self.step_size = as_schedule(step_size)

    def __call__(self, t: ArrayLike, theta: PyTree[Array], grad: PyTree[Array]) -> PyTree[Array]:
        return _descent(self.step_size, t, theta, grad)


class SubgradientMethod(AbstractParameterFlow):
    r"""The (stochastic) subgradient method $\theta^{t+1} = \theta^t - \eta_t g^t$,
    $g^t \in \partial_C \mathcal{L}(\theta^t)$ + noise (Section 6).

    For piecewise-smooth objectives built from ``jnp.abs``, ``relu``, ``max`` and the like,
    ``jax.grad`` returns one element of the Clarke subdifferential at a kink (the convention of
    each primitive), which is what this update uses. Decreasing steps (``RobbinsMonro``) are the
    usual choice: with a constant step the iterates only reach a neighbourhood of the minimiser.
    """

    step_size: AbstractSchedule

    def __init__(self, step_size: "float | Array | AbstractSchedule"):
        self.step_size = as_schedule(step_size)

    def __call__(self, t: ArrayLike, theta: PyTree[Array], grad: PyTree[Array]) -> PyTree[Array]:
        return _descent(self.step_size, t, theta, grad)
