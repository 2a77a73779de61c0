r"""Representation flows over depth: $X_{k+1} = f_k(X_k; \theta_k)$, $k = 0, \dots, L-1$.

A representation flow is the depth direction of a learning system (paper, Section 2). It acts on
*one* sample $X_0 \in \mathbb{R}^{d}$; batches are handled by ``jax.vmap`` in the callers. Its
parameters $\theta = (\theta_0, \dots, \theta_{L-1})$ are the inexact array leaves of the module,
so ``eqx.partition(flow, eqx.is_inexact_array)`` splits $\theta$ from the structure.
"""

import abc
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from ._checks import check_positive

ACTIVATIONS: dict[str, tuple[Callable[[Array], Array], float]] = {
    # name: (function, Lipschitz constant)
    "relu": (jax.nn.relu, 1.0),
    "tanh": (jnp.tanh, 1.0),
    "identity": (lambda x: x, 1.0),
    "leaky_relu": (lambda x: jax.nn.leaky_relu(x, 0.1), 1.0),
    "hard_tanh": (jax.nn.hard_tanh, 1.0),
    "sigmoid": (jax.nn.sigmoid, 0.25),
    "gelu": (jax.nn.gelu, 1.129),  # max |gelu'| = 1.1289...
}


def activation_lipschitz(name: str) -> float:
    """Lipschitz constant of a named activation (1 for those covered by Theorem 4.1)."""
    return ACTIVATIONS[_check_activation(name)][1]


def _check_activation(name: str) -> str:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(
            f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}, or wrap a custom "
            "layer in `LayerSequence`."
        )
    return name


class AbstractRepresentationFlow(eqx.Module):
    r"""A depth-indexed map $X_{k+1} = f_k(X_k; \theta_k)$.

    Subclasses implement [`depth`][] and [`layer`][]; ``k`` is a Python ``int`` so layers may have
    different shapes.
    """

    @property
    @abc.abstractmethod
    def depth(self) -> int:
        """The number of layers $L$."""

    @abc.abstractmethod
    def layer(self, k: int, x: Array) -> Array:
        r"""Apply layer $f_k$ to one sample $X_k$."""

    def __call__(self, x: Array) -> Array:
        """The network output $X_L = F_\theta(X_0)$ for one sample."""
        for k in range(self.depth):
            x = self.layer(k, x)
        return x

    def trajectory(self, x: Array) -> tuple[Array, ...]:
        """All representations $(X_0, X_1, \\dots, X_L)$ of one sample."""
        xs = [x]
        for k in range(self.depth):
            xs.append(self.layer(k, xs[-1]))
        return tuple(xs)


class Feedforward(AbstractRepresentationFlow):
    r"""Feedforward network $X_{k+1} = \sigma(W_k X_k + b_k)$ (Section 4.1, Theorem 4.1).

    **Arguments:**

    - `weights`: the matrices $W_k$, shapes ``(n_{k+1}, n_k)``.
    - `biases`: the vectors $b_k$, shapes ``(n_{k+1},)``.
    - `activation`: a name from ``lspsde.representation.ACTIVATIONS``. ``"relu"``, ``"tanh"``,
      ``"leaky_relu"``, ``"hard_tanh"`` and ``"identity"`` are 1-Lipschitz, as Theorem 4.1 needs.
    - `final_activation`: whether $\sigma$ is applied after the last layer too (default ``True``,
      as in the paper, where every layer is $\sigma(W x + b)$).
    """

    weights: tuple[Float[Array, "out in"], ...]
    biases: tuple[Float[Array, " out"], ...]
    activation: str = eqx.field(static=True, default="relu")
    final_activation: bool = eqx.field(static=True, default=True)

    def __init__(
        self,
        weights: Sequence[Float[ArrayLike, "out in"]],
        biases: Sequence[Float[ArrayLike, " out"]] | None = None,
        activation: str = "relu",
        final_activation: bool = True,
    ):
        weights = tuple(jnp.asarray(w) for w in weights)
        if len(weights) == 0:
            raise ValueError("`weights` is empty: a feedforward flow needs depth L >= 1.")
        for k, w in enumerate(weights):
            if w.ndim != 2:
                raise ValueError(
                    f"weights[{k}] must be a matrix (n_out, n_in), got shape {w.shape}."
                )
            if k > 0 and w.shape[1] != weights[k - 1].shape[0]:
                raise ValueError(
                    f"weights[{k}] has {w.shape[1]} input columns but weights[{k - 1}] has "
                    f"{weights[k - 1].shape[0]} output rows; consecutive layers must chain."
                )
        if biases is None:
            biases = tuple(jnp.zeros(w.shape[0], w.dtype) for w in weights)
        biases = tuple(jnp.asarray(b) for b in biases)
        if len(biases) != len(weights):
            raise ValueError(f"Got {len(weights)} weights but {len(biases)} biases; give one each.")
        for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
            if b.shape != (w.shape[0],):
                raise ValueError(
                    f"biases[{k}] has shape {b.shape}, expected ({w.shape[0]},) to match "
                    f"weights[{k}]."
                )
        self.weights = weights
        self.biases = biases
        self.activation = _check_activation(activation)
        self.final_activation = final_activation

    @property
    def depth(self) -> int:
        return len(self.weights)

    @property
    def widths(self) -> tuple[int, ...]:
        """$(n_0, n_1, \\dots, n_L)$."""
        return (self.weights[0].shape[1], *(w.shape[0] for w in self.weights))

    def layer(self, k: int, x: Array) -> Array:
        pre = self.weights[k] @ x + self.biases[k]
        if k == self.depth - 1 and not self.final_activation:
            return pre
        return ACTIVATIONS[self.activation][0](pre)


class Residual(AbstractRepresentationFlow):
    r"""Residual network $X_{k+1} = X_k + h\, g_k(X_k; \theta_k)$ (Section 4.2, eq. 4.1).

    **Arguments:**

    - `blocks`: the residual functions $g_k$, each a callable (usually an ``eqx.Module``) mapping
      ``x -> g_k(x)`` of the same shape.
    - `step_size`: the step $h > 0$, an array field so a sweep over $h$ can be ``vmap``-ed.
    """

    blocks: tuple[Callable[[Array], Array], ...]
    step_size: Float[Array, ""]

    def __init__(self, blocks: Sequence[Callable[[Array], Array]], step_size: float | Array):
        blocks = tuple(blocks)
        if len(blocks) == 0:
            raise ValueError("`blocks` is empty: a residual flow needs depth L >= 1.")
        for k, g in enumerate(blocks):
            if not callable(g):
                raise TypeError(f"blocks[{k}] must be callable x -> g(x), got {type(g).__name__}.")
        check_positive("step_size", step_size, fix="The residual step h must be > 0 (eq. 4.1).")
        self.blocks = blocks
        self.step_size = jnp.asarray(step_size, dtype=float)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def layer(self, k: int, x: Array) -> Array:
        return x + self.step_size * self.blocks[k](x)


class LayerSequence(AbstractRepresentationFlow):
    """Any model given as a sequence of layers $X_{k+1} = f_k(X_k)$, each a callable.

    Build one from an Equinox model with [`from_equinox`][lspsde.representation.from_equinox].
    """

    layers: tuple[Callable[[Array], Array], ...]

    def __init__(self, layers: Sequence[Callable[[Array], Array]]):
        layers = tuple(layers)
        if len(layers) == 0:
            raise ValueError("`layers` is empty: give at least one layer.")
        for k, f in enumerate(layers):
            if not callable(f):
                raise TypeError(f"layers[{k}] must be callable, got {type(f).__name__}.")
        self.layers = layers

    @property
    def depth(self) -> int:
        return len(self.layers)

    def layer(self, k: int, x: Array) -> Array:
        return self.layers[k](x)


class _Activated(eqx.Module):
    linear: eqx.nn.Linear
    activation: Callable[[Array], Array] = eqx.field(static=True)

    def __call__(self, x: Array) -> Array:
        return self.activation(self.linear(x))


def from_equinox(model: eqx.Module) -> LayerSequence:
    """Split an Equinox model into a [`LayerSequence`][lspsde.representation.LayerSequence].

    Supported: ``eqx.nn.Sequential`` (its layers, in order; a ``Lambda`` activation layer counts
    as a layer of its own) and ``eqx.nn.MLP`` (each layer is ``activation(Linear(x))``, the last
    one with ``final_activation``). Anything else: pass its layers to ``LayerSequence`` yourself.
    """
    if isinstance(model, eqx.nn.Sequential):
        return LayerSequence(model.layers)
    if isinstance(model, eqx.nn.MLP):
        n = len(model.layers)
        layers = [
            _Activated(lin, model.final_activation if k == n - 1 else model.activation)
            for k, lin in enumerate(model.layers)
        ]
        return LayerSequence(layers)
    raise TypeError(
        f"Cannot split a {type(model).__name__} into layers automatically; build "
        "`LayerSequence([layer_0, layer_1, ...])` from its layers."
    )
