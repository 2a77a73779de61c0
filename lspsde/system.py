r"""The learning system and its joint one-step map $\Phi_t$ (Section 2).

The joint state is $S^t = (X_0^t, \dots, X_L^t, \theta^t)$: the representations of a fixed set
of probe inputs $X_0$ under the current parameters, and the parameters. One step of the learning
map is

$$\theta^{t+1} = \mathcal{A}_t(\theta^t, u^t), \qquad
X_{k+1}^{t+1} = f_k(X_k^{t+1}; \theta^{t+1}),$$

with $\mathcal{A}_t(\theta, u) = $ ``update(t, theta, noise.gradient(objective, theta, u))`` for a
discrete update (``update.step``; a continuous-time limit integrates over one step instead).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree

from .noise import AbstractNoise, NoNoise
from .objectives import AbstractObjective
from .parameter import AbstractParameterFlow
from .representation import AbstractRepresentationFlow


class LearningState(eqx.Module):
    r"""$S^t = (X_0^t, \dots, X_L^t, \theta^t)$; ``xs`` is empty without a representation.
    ``theta`` is the flow's carried state: $\theta^t$ itself, or a ``FlowState`` $(\theta^t,
    s^t)$ for a flow with optimiser state (``lspsde.HeavyBall``, ``lspsde.Optax``)."""

    xs: tuple[Array, ...]
    theta: PyTree[Array]


class LearningSystem(eqx.Module):
    r"""A coupled representation–parameter learning system.

    **Arguments:**

    - `objective`: the objective $\mathcal{L}(\theta)$.
    - `update`: the parameter flow, e.g. ``GradientDescent(step_size=0.1)``.
    - `noise`: the update-noise model (default: exact gradients, ``NoNoise()``).
    - `representation`: optional representation flow whose parameters are $\theta$ (a template:
      its arrays are replaced by $\theta$). Needed for the depth blocks $\sigma^x_{k,t}$.
    - `probes`: the inputs $X_0$ whose representations are tracked, shape ``(n, d_0)``.
    """

    objective: AbstractObjective
    update: AbstractParameterFlow
    noise: AbstractNoise = NoNoise()
    representation: AbstractRepresentationFlow | None = None
    probes: Float[Array, "n d_in"] | None = None

    def __check_init__(self):
        if not isinstance(self.objective, AbstractObjective):
            raise TypeError(
                f"`objective` must be an AbstractObjective, got {type(self.objective).__name__}."
            )
        if not isinstance(self.update, AbstractParameterFlow):
            raise TypeError(
                f"`update` must be an AbstractParameterFlow (e.g. GradientDescent), got "
                f"{type(self.update).__name__}."
            )
        if not isinstance(self.noise, AbstractNoise):
            raise TypeError(f"`noise` must be an AbstractNoise, got {type(self.noise).__name__}.")
        if (self.representation is None) != (self.probes is None):
            raise ValueError(
                "Give both `representation` and `probes` (the inputs whose representations are "
                "tracked), or neither."
            )

    def network(self, theta: PyTree[Array]) -> AbstractRepresentationFlow:
        r"""The representation flow with parameters $\theta$."""
        if self.representation is None:
            raise ValueError("This learning system has no `representation`.")
        structure = eqx.filter(self.representation, eqx.is_inexact_array, inverse=True)
        return eqx.combine(theta, structure)

    def parameter_map(self, t: ArrayLike, theta: PyTree[Array], u: PyTree[Array]) -> PyTree[Array]:
        r"""$\mathcal{A}_t(\theta, u)$ (``update.step``), on the carried state (``theta``
        itself, or a ``FlowState`` for a flow with optimiser state: see [`init_state`][])."""
        return self.update.step(self.objective, self.noise.at_time(t), t, theta, u)

    def init_state(self, theta0: PyTree[Array]) -> PyTree[Array]:
        r"""The state the parameter flow carries from $\theta^0$: $\theta^0$ itself, or
        ``FlowState(theta0, s0)`` for a flow with optimiser state (``update.init``)."""
        return self.update.init(theta0)

    def params(self, state: PyTree[Array]) -> PyTree[Array]:
        r"""$\theta^t$ from the carried state (``update.params``)."""
        return self.update.params(state)

    def representations(self, theta: PyTree[Array]) -> tuple[Array, ...]:
        r"""$(X_0, \dots, X_L)$ of the probes under $\theta$, each batched over probes."""
        if self.representation is None:
            return ()
        return jax.vmap(self.network(theta).trajectory)(self.probes)

    def init(self, theta0: PyTree[Array]) -> LearningState:
        r"""$S^0$ from $\theta^0$."""
        return LearningState(self.representations(theta0), self.init_state(theta0))

    def step(self, t: ArrayLike, state: LearningState, u: PyTree[Array]) -> LearningState:
        r"""The joint one-step map $S^{t+1} = \Phi_t(S^t; u^t)$."""
        theta = self.parameter_map(t, state.theta, u)
        return LearningState(self.representations(self.params(theta)), theta)

    def noise_at(self, key: PRNGKeyArray, t: ArrayLike, theta: PyTree[Array]) -> PyTree[Array]:
        r"""$u^t$, drawn from ``fold_in(key, t)`` so that it depends only on ``(key, t)``."""
        noise = self.noise.at_time(t)
        return self.update.draw(self.objective, noise, jax.random.fold_in(key, t), theta)


def parameter_trajectory(
    system: LearningSystem,
    theta0: PyTree[Array],
    *,
    key: PRNGKeyArray,
    n_steps: int,
) -> tuple[PyTree[Array], PyTree[Array]]:
    r"""Iterate $\theta^{t+1} = \mathcal{A}_t(\theta^t, u^t)$ for ``n_steps`` steps, the
    draws $u^t$ from ``fold_in(key, t)``.

    **Returns:** ``(thetas, us)``: the carried states $\theta^0..\theta^T$ stacked on a leading
    axis of size ``n_steps + 1`` (for a flow with optimiser state, a stacked ``FlowState``:
    ``system.params`` gives $\theta$), and the draws $u^0..u^{T-1}$ (leading axis ``n_steps``).
    """

    def body(theta, t):
        u = system.noise_at(key, t, theta)
        return system.parameter_map(t, theta, u), (theta, u)

    last, (thetas, us) = jax.lax.scan(body, system.init_state(theta0), jnp.arange(n_steps))
    thetas = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), thetas, last)
    return thetas, us
