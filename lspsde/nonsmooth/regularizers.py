r"""Convex regularisers $R$ with their proximal operators (Section 6, proximal flows).

$$\operatorname{prox}_{\eta R}(x) = \operatorname*{arg\,min}_z\;
R(z) + \tfrac{1}{2\eta}\|z - x\|^2.$$

Every regulariser acts on a pytree of parameters. The separable ones here ([`L1`][], [`L2`][],
[`ElasticNet`][]) act leaf by leaf and coordinate by coordinate, and their values sum over all
leaves. A convex constraint (``lspsde.nonsmooth.constraints``) is a regulariser too: its
indicator, whose prox is the projection. A proximal operator is firmly non-expansive,
$\|Px - Py\|^2 \le \langle Px - Py, x - y\rangle$, so its Clarke Jacobians have norm at most 1.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PyTree
import numpy as np

from .._checks import check_positive, check_real_scalar

__all__ = ["L1", "L2", "AbstractRegularizer", "ElasticNet", "check_weight", "tree_sum"]


def check_weight(name: str, value: ArrayLike, who: str) -> Float[Array, ""]:
    """A regularisation weight: one real number >= 0 (a grid of weights is a sweep)."""
    if np.ndim(value) != 0:
        raise ValueError(
            f"`{name}` of {who} must be one real number, got shape {np.shape(value)}. To run "
            "a grid of weights, sweep them: `lspsde.Sweep.of(lambda w: ..., weights, "
            f'name="{name}")`.'
        )
    check_real_scalar(name, value)
    check_positive(
        name,
        value,
        allow_zero=True,
        fix=f"A regularisation weight must be >= 0 ({who} with weight 0 is no regularisation).",
    )
    return jnp.asarray(value, dtype=float)


def tree_sum(fn, x: PyTree[Array]) -> Float[Array, ""]:
    """``sum(fn(leaf).sum() for leaf in x)``."""
    return jnp.sum(jnp.stack([jnp.sum(fn(leaf)) for leaf in jax.tree.leaves(x)]))


def _soft_threshold(x: Array, tau: Array) -> Array:
    return jnp.sign(x) * jnp.maximum(jnp.abs(x) - tau, 0.0)


class AbstractRegularizer(eqx.Module):
    r"""A proper, lower-semicontinuous convex $R$ with a proximal operator."""

    @abc.abstractmethod
    def prox(self, x: PyTree[Array], step: ArrayLike) -> PyTree[Array]:
        r"""$\operatorname{prox}_{\eta R}(x)$ for the step $\eta$ = ``step`` > 0."""

    @abc.abstractmethod
    def value(self, x: PyTree[Array]) -> Float[Array, ""]:
        r"""$R(x)$ ($+\infty$ outside the domain)."""

    def check(self, theta: PyTree[Array]) -> None:
        """Check, before anything is compiled, that the regulariser fits parameters like
        ``theta`` (its arrays broadcast against every leaf, its pytrees match)."""
        try:
            out = eqx.filter_eval_shape(self.prox, theta, 1.0)
        except Exception as err:
            raise ValueError(
                f"{type(self).__name__} does not fit the parameters "
                f"{jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), theta)}: "
                f"{err}\nGive its arrays one value (a scalar), the shape of every leaf, or a "
                "pytree of the parameters' structure."
            ) from err
        if jax.tree.structure(out) != jax.tree.structure(theta) or any(
            a.shape != np.shape(b)
            for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(theta), strict=True)
        ):
            raise ValueError(
                f"{type(self).__name__}.prox changes the parameters' shapes: give its arrays "
                "one value (a scalar), the shape of every leaf, or the parameters' structure."
            )


class L1(AbstractRegularizer):
    r"""$R(x) = \lambda\|x\|_1$, summed over every coordinate of every leaf (the lasso).

    Its prox is soft-thresholding, $\operatorname{prox}_{\eta R}(x)_i =
    \operatorname{sign}(x_i)\max(|x_i| - \eta\lambda, 0)$, coordinate by coordinate.

    **Arguments:** `weight`: $\lambda \ge 0$, one real number (an array field: sweepable).
    """

    weight: Float[Array, ""]

    def __init__(self, weight: ArrayLike):
        self.weight = check_weight("weight", weight, "L1")

    def prox(self, x: PyTree[Array], step: ArrayLike) -> PyTree[Array]:
        return jax.tree.map(lambda a: _soft_threshold(a, step * self.weight), x)

    def value(self, x: PyTree[Array]) -> Float[Array, ""]:
        return self.weight * tree_sum(jnp.abs, x)


class L2(AbstractRegularizer):
    r"""$R(x) = \frac{\lambda}{2}\|x\|_2^2$: the *squared* norm with a factor ½ (ridge, weight
    decay), summed over every leaf; not the norm $\|x\|_2$.

    Its prox is the shrinkage $x / (1 + \eta\lambda)$.

    **Arguments:** `weight`: $\lambda \ge 0$, one real number.
    """

    weight: Float[Array, ""]

    def __init__(self, weight: ArrayLike):
        self.weight = check_weight("weight", weight, "L2")

    def prox(self, x: PyTree[Array], step: ArrayLike) -> PyTree[Array]:
        return jax.tree.map(lambda a: a / (1.0 + step * self.weight), x)

    def value(self, x: PyTree[Array]) -> Float[Array, ""]:
        return 0.5 * self.weight * tree_sum(jnp.square, x)


class ElasticNet(AbstractRegularizer):
    r"""$R(x) = \lambda_1\|x\|_1 + \frac{\lambda_2}{2}\|x\|_2^2$ (squared norm, as [`L2`][]).

    Its prox is soft-thresholding then shrinkage, $S_{\eta\lambda_1}(x) / (1 + \eta\lambda_2)$.

    **Arguments:** `l1`: $\lambda_1 \ge 0$; `l2`: $\lambda_2 \ge 0$ (real numbers).
    """

    l1: Float[Array, ""]
    l2: Float[Array, ""]

    def __init__(self, l1: ArrayLike, l2: ArrayLike):
        self.l1 = check_weight("l1", l1, "ElasticNet")
        self.l2 = check_weight("l2", l2, "ElasticNet")

    def prox(self, x: PyTree[Array], step: ArrayLike) -> PyTree[Array]:
        return jax.tree.map(
            lambda a: _soft_threshold(a, step * self.l1) / (1.0 + step * self.l2), x
        )

    def value(self, x: PyTree[Array]) -> Float[Array, ""]:
        return self.l1 * tree_sum(jnp.abs, x) + 0.5 * self.l2 * tree_sum(jnp.square, x)
