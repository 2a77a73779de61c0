r"""Parameter flows over training time: $\theta^{t+1} = \mathcal{A}_t(\theta^t, u^t)$ (Section 5).

A parameter flow is the update rule given a (stochastic) gradient $G$; where that gradient comes
from is the noise model's business (``lspsde.noise``). Stochastic, proximal and projected
updates are further subclasses of [`AbstractParameterFlow`][].
"""

import abc

import equinox as eqx
import jax
from jaxtyping import Array, ArrayLike, PyTree

from .schedules import AbstractSchedule, as_schedule


class AbstractParameterFlow(eqx.Module):
    r"""An update rule $\theta^{t+1} = \mathcal{A}_t(\theta^t; G)$ given a gradient $G$."""

    @abc.abstractmethod
    def __call__(self, t: ArrayLike, theta: PyTree[Array], grad: PyTree[Array]) -> PyTree[Array]:
        r"""One step at time ``t`` from $\theta^t$ with gradient $G$."""


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
        eta = self.step_size(t)
        return jax.tree.map(lambda p, g: p - eta * g, theta, grad)
