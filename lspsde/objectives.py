r"""Objectives $\mathcal{L}(\theta)$ driving the parameter flow.

Concrete convex objectives with known constants (quadratics, least squares, logistic
regression) live in ``models.objectives``; this module holds the base class and the supervised
loss of a representation flow, whose parameters $\theta$ are the network's arrays.
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .representation import AbstractRepresentationFlow


class AbstractObjective(eqx.Module):
    r"""A differentiable objective $\mathcal{L}(\theta)$ over a parameter pytree $\theta$.

    Subclasses implement [`loss`][]. Where they are known in closed form, subclasses also
    override [`minimizer`][], [`strong_convexity`][] ($\mu$) and [`smoothness`][] ($L$), which
    ``lspsde.theory`` uses to draw the predictions of Section 5 next to measurements.
    """

    @abc.abstractmethod
    def loss(self, theta: PyTree[Array]) -> Float[Array, ""]:
        r"""$\mathcal{L}(\theta)$."""

    def gradient(self, theta: PyTree[Array]) -> PyTree[Array]:
        r"""$\nabla \mathcal{L}(\theta)$ (reverse mode by default)."""
        return jax.grad(self.loss)(theta)

    def minimizer(self) -> PyTree[Array] | None:
        r"""$\theta^*$ if known, else ``None``."""
        return None

    def strong_convexity(self) -> Float[Array, ""] | None:
        r"""$\mu$ if known, else ``None``."""
        return None

    def smoothness(self) -> Float[Array, ""] | None:
        r"""$L$ (Lipschitz constant of $\nabla\mathcal{L}$) if known, else ``None``."""
        return None


def _mse(pred: Array, target: Array) -> Array:
    return 0.5 * jnp.sum((pred - target) ** 2)


LOSSES: dict[str, Callable[[Array, Array], Array]] = {"mse": _mse}


class SupervisedLoss(AbstractObjective):
    r"""$\mathcal{L}(\theta) = \frac{1}{n}\sum_i \ell(F_\theta(x_i), y_i)$ of a network.

    $\theta$ is the pytree of the network's inexact arrays, as returned by
    [`lspsde.parameters`][]; the network's structure is kept from the template.

    **Arguments:**

    - `network`: the representation flow (a template: its arrays are replaced by $\theta$).
    - `inputs`: the inputs $x_i$, shape ``(n, d_0)``.
    - `targets`: the targets $y_i$, shape ``(n, d_L)``.
    - `loss_fn`: ``"mse"`` ($\frac12\|F_\theta(x) - y\|^2$) or a callable ``(pred, y) -> scalar``.
    """

    structure: AbstractRepresentationFlow
    inputs: Float[Array, "n d_in"]
    targets: Float[Array, "n d_out"]
    loss_fn: Callable[[Array, Array], Array] = eqx.field(static=True)

    def __init__(
        self,
        network: AbstractRepresentationFlow,
        inputs: Float[Array, "n d_in"],
        targets: Float[Array, "n d_out"],
        loss_fn: str | Callable[[Array, Array], Array] = "mse",
    ):
        if not isinstance(network, AbstractRepresentationFlow):
            raise TypeError(
                f"`network` must be a representation flow, got {type(network).__name__}; wrap an "
                "Equinox model with `lspsde.representation.from_equinox`."
            )
        inputs, targets = jnp.asarray(inputs), jnp.asarray(targets)
        if inputs.ndim != 2 or targets.ndim != 2 or inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"`inputs` and `targets` must be (n, d_in) and (n, d_out) with the same n, got "
                f"{inputs.shape} and {targets.shape}."
            )
        out = jax.eval_shape(jax.vmap(network), inputs)
        if out.shape != targets.shape:
            raise ValueError(
                f"The network maps inputs {inputs.shape} to {out.shape}, but `targets` has shape "
                f"{targets.shape}; make the last layer's width match the targets."
            )
        if isinstance(loss_fn, str):
            if loss_fn not in LOSSES:
                raise ValueError(f"Unknown loss {loss_fn!r}; choose one of {sorted(LOSSES)}.")
            loss_fn = LOSSES[loss_fn]
        self.structure = eqx.filter(network, eqx.is_inexact_array, inverse=True)
        self.inputs = inputs
        self.targets = targets
        self.loss_fn = loss_fn

    def network(self, theta: PyTree[Array]) -> AbstractRepresentationFlow:
        r"""The representation flow with parameters $\theta$."""
        return eqx.combine(theta, self.structure)

    def loss(self, theta: PyTree[Array]) -> Float[Array, ""]:
        net = self.network(theta)
        preds = jax.vmap(net)(self.inputs)
        return jnp.mean(jax.vmap(self.loss_fn)(preds, self.targets))


def parameters(model: eqx.Module) -> PyTree[Array]:
    r"""The parameters $\theta$ of a model: its inexact arrays (other leaves become ``None``)."""
    return eqx.filter(model, eqx.is_inexact_array)
