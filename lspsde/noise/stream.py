r"""Non-stationary data: online SGD on a data stream whose law drifts over training time.

The theory assumes a fixed objective and a stationary gradient noise (Assumption 1); Section 7.5
names non-stationary data as outside its scope. Here every step draws a fresh minibatch from
the law at that step, $(x_i, y_i) \sim P_t$, and $G(\theta, u) = \nabla_\theta \frac1B
\sum_i \ell(F_\theta(x_i), y_i)$ with the objective's network $F$ and loss $\ell$
([`StreamNoise`][]). The law is a [`DataStream`][] of three strategy pieces:

- inputs $x = m_t + s_t\,\xi$, $\xi \sim N(0, I)$: [`GaussianInputs`][], or
  [`CovariateShift`][] (one input law before a given step, another from it on);
- a teacher $y = W_t x$: [`LinearTeacher`][], or [`RotatingTeacher`][] ($W_t = W R(\omega t)$,
  the rotation by angle $\omega t$ in a plane of the input space);
- the label-noise level $\varsigma_t$ (a number or a [`Piecewise`][] schedule):
  $y \leftarrow y + \varsigma_t\,\zeta$, $\zeta \sim N(0, I)$.

The draws $u = (\xi, \zeta)$ are standard normal innovations, as for the Gaussian models, so
the profile's $\sigma^u_t$ is the sensitivity of the step to the driving randomness. The step
$t$ reaches the model through [`StreamNoise.at_time`][] (the learning system binds it before
every draw and step); counter keys are unchanged, so path $p$ is the same whatever the
chunking. Drift scheduled at or past the horizon is refused before compilation.

For a linear student of the linear teacher, $\theta^*(t) = W_t$ ([`DataStream.minimizer`][]):
the tracking error $\|\theta^t - W_t\|^2$ is what a drift study measures, beside the
objective's loss on its own (fixed) data.
"""

import abc
from collections.abc import Sequence
import itertools
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree
import numpy as np

from .._checks import check_positive, check_positive_int, check_real_scalar
from ..objectives import AbstractObjective, SupervisedLoss
from .base import AbstractNoise, Assumption1

__all__ = [
    "AbstractInputs",
    "AbstractTeacher",
    "CovariateShift",
    "DataStream",
    "GaussianInputs",
    "LinearTeacher",
    "Piecewise",
    "RotatingTeacher",
    "StreamNoise",
]


def _step_int(name: str, value: object) -> int:
    return check_positive_int(name, value, minimum=0, fix="It is a training step t >= 0.")


class Piecewise(eqx.Module):
    r"""A level that changes at given steps: ``values[k]`` on $b_{k-1} \le t < b_k$ (``values``
    one longer than the increasing step ``boundaries``), e.g. label noise 0.1, then 0.5 from step
    500: ``Piecewise([0.1, 0.5], [500])``."""

    values: Float[Array, " k"]
    boundaries: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, values: "ArrayLike | Sequence[float]", boundaries: "Sequence[int]" = ()):
        values = np.asarray(values, dtype=float).reshape(-1)
        boundaries = tuple(_step_int("boundaries", b) for b in boundaries)
        if len(values) != len(boundaries) + 1:
            raise ValueError(
                f"`values` needs one entry more than `boundaries` (a level before the first "
                f"boundary and after each), got {len(values)} values and {len(boundaries)} "
                "boundaries."
            )
        if any(b1 >= b2 for b1, b2 in itertools.pairwise(boundaries)):
            raise ValueError(f"`boundaries` must increase strictly, got {boundaries}.")
        check_positive("values", values, allow_zero=True, fix="A noise level is >= 0.")
        self.values = jnp.asarray(values)
        self.boundaries = boundaries

    def __call__(self, t: ArrayLike) -> Float[Array, ""]:
        if not self.boundaries:
            return self.values[0]
        k = jnp.searchsorted(jnp.asarray(self.boundaries), t, side="right")
        return self.values[k]


def _level(name: str, value: "float | Piecewise") -> Piecewise:
    if isinstance(value, Piecewise):
        return value
    check_real_scalar(name, value)
    return Piecewise([value])


class AbstractInputs(eqx.Module):
    r"""An input law $x = T_t(\xi)$ with $\xi \sim N(0, I_d)$."""

    dim: eqx.AbstractVar[int]

    @abc.abstractmethod
    def transform(self, t: ArrayLike, xi: Float[Array, "n d"]) -> Float[Array, "n d"]:
        r"""$x$ at step ``t`` from the innovations $\xi$."""

    def change_steps(self) -> tuple[int, ...]:
        """The steps at which the law changes (none for a stationary law)."""
        return ()

    def moments(self, t: ArrayLike) -> tuple[Float[Array, " d"], Float[Array, "d d"]]:
        r"""The mean $\mathbb{E}x$ and covariance $\operatorname{Cov}x$ of the inputs at step
        ``t``. The default reads them off the transform, exactly when it is affine in $\xi$:
        $T_t(0)$ and $JJ^\top$ with $J = \partial T_t/\partial\xi$ (override for a law that is
        not)."""
        f = lambda xi: self.transform(t, xi[None, :])[0]
        zero = jnp.zeros(self.dim)
        jac = jax.jacfwd(f)(zero)
        return f(zero), jac @ jac.T


class GaussianInputs(AbstractInputs):
    r"""$x = m + s\,\xi$: mean ``mean`` (a vector, or 0 with ``dim``) and scale ``scale``."""

    mean: Float[Array, " d"]
    scale: Float[Array, ""]
    dim: int = eqx.field(static=True)

    def __init__(self, dim: int | None = None, *, mean: ArrayLike | None = None, scale=1.0):
        if mean is None:
            if dim is None:
                raise ValueError("Give `dim` (the input dimension) or a `mean` vector.")
            dim = check_positive_int("dim", dim)
            mean = np.zeros(dim)
        mean = np.asarray(mean, dtype=float)
        if mean.ndim != 1 or (dim is not None and mean.shape != (dim,)):
            raise ValueError(f"`mean` must be a vector of length `dim`={dim}, got {mean.shape}.")
        check_real_scalar("scale", scale)
        check_positive("scale", scale, fix="The input scale is > 0.")
        self.mean, self.scale, self.dim = jnp.asarray(mean), jnp.asarray(scale, float), len(mean)

    def transform(self, t: ArrayLike, xi: Float[Array, "n d"]) -> Float[Array, "n d"]:
        return self.mean[None, :] + self.scale * xi

    def moments(self, t: ArrayLike) -> tuple[Float[Array, " d"], Float[Array, "d d"]]:
        return self.mean, self.scale**2 * jnp.eye(self.dim)


class CovariateShift(AbstractInputs):
    r"""``before`` for $t <$ ``at_step``, ``after`` from ``at_step`` on (the same innovations
    $\xi$ pass through either law, so the shift is the only change)."""

    before: AbstractInputs
    after: AbstractInputs
    at_step: int = eqx.field(static=True)
    dim: int = eqx.field(static=True)

    def __init__(self, before: AbstractInputs, after: AbstractInputs, at_step: int):
        if not (isinstance(before, AbstractInputs) and isinstance(after, AbstractInputs)):
            raise TypeError("`before` and `after` must be input laws, e.g. GaussianInputs(d).")
        if before.dim != after.dim:
            raise ValueError(
                f"The input dimension cannot change at the shift: {before.dim} -> {after.dim}."
            )
        self.before, self.after, self.at_step = before, after, _step_int("at_step", at_step)
        self.dim = before.dim

    def transform(self, t: ArrayLike, xi: Float[Array, "n d"]) -> Float[Array, "n d"]:
        return jnp.where(
            t < self.at_step, self.before.transform(t, xi), self.after.transform(t, xi)
        )

    def change_steps(self) -> tuple[int, ...]:
        return (self.at_step, *self.before.change_steps(), *self.after.change_steps())

    def moments(self, t: ArrayLike) -> tuple[Float[Array, " d"], Float[Array, "d d"]]:
        before, after = self.before.moments(t), self.after.moments(t)
        return jax.tree.map(lambda b, a: jnp.where(t < self.at_step, b, a), before, after)


class AbstractTeacher(eqx.Module):
    r"""A labelling $x \mapsto W_t x$."""

    @abc.abstractmethod
    def weights(self, t: ArrayLike) -> Float[Array, "d_out d_in"]:
        r"""$W_t$."""

    def change_steps(self) -> tuple[int, ...]:
        return ()


class LinearTeacher(AbstractTeacher):
    r"""A fixed teacher $W_t = W$ (shape ``(d_out, d_in)``)."""

    weight: Float[Array, "d_out d_in"]

    def __init__(self, weight: ArrayLike):
        weight = jnp.asarray(weight, dtype=float)
        if weight.ndim != 2:
            raise ValueError(f"`weight` must be a (d_out, d_in) matrix, got {weight.shape}.")
        self.weight = weight

    def weights(self, t: ArrayLike) -> Float[Array, "d_out d_in"]:
        return self.weight


class RotatingTeacher(AbstractTeacher):
    r"""$W_t = W R(\omega t)$, $R(\phi)$ the rotation by $\phi$ in the plane of input
    coordinates ``plane = (i, j)``: the teacher turns at ``rate`` $\omega$ radians per step,
    so $\|W_t - W_0\|_F$ grows like $2|\sin(\omega t / 2)|\,\|W P\|_F$ ($P$ the projection on
    the plane) while every $W_t$ keeps the singular values of $W$."""

    weight: Float[Array, "d_out d_in"]
    rate: Float[Array, ""]
    plane: tuple[int, int] = eqx.field(static=True)

    def __init__(self, weight: ArrayLike, rate: float, plane: tuple[int, int] = (0, 1)):
        weight = jnp.asarray(weight, dtype=float)
        if weight.ndim != 2 or weight.shape[1] < 2:
            raise ValueError(
                f"`weight` must be a (d_out, d_in) matrix with d_in >= 2 (a plane to rotate "
                f"in), got {weight.shape}."
            )
        check_real_scalar("rate", rate)
        i, j = (int(p) for p in plane)
        if not (0 <= i < weight.shape[1] and 0 <= j < weight.shape[1] and i != j):
            raise ValueError(
                f"`plane` must be two different input coordinates in [0, {weight.shape[1]}), got "
                f"{plane}."
            )
        self.weight, self.rate, self.plane = weight, jnp.asarray(rate, float), (i, j)

    def weights(self, t: ArrayLike) -> Float[Array, "d_out d_in"]:
        phi = self.rate * jnp.asarray(t, self.rate.dtype)
        c, s = jnp.cos(phi), jnp.sin(phi)
        i, j = self.plane
        wi, wj = self.weight[:, i], self.weight[:, j]
        # (W R)[:, i] = c w_i + s w_j, (W R)[:, j] = -s w_i + c w_j: a rotation of the plane
        return self.weight.at[:, i].set(c * wi + s * wj).at[:, j].set(c * wj - s * wi)


class DataStream(eqx.Module):
    r"""The law $P_t$ of $(x, y)$: ``inputs``, ``teacher`` and the label noise
    ``label_noise`` (a number or a [`Piecewise`][] level): $x = T_t(\xi)$,
    $y = W_t x + \varsigma_t\zeta$."""

    inputs: AbstractInputs
    teacher: AbstractTeacher
    label_noise: Piecewise

    def __init__(
        self,
        inputs: AbstractInputs,
        teacher: AbstractTeacher,
        label_noise: "float | Piecewise" = 0.0,
    ):
        if not isinstance(inputs, AbstractInputs):
            raise TypeError(f"`inputs` must be an input law, got {type(inputs).__name__}.")
        if not isinstance(teacher, AbstractTeacher):
            raise TypeError(f"`teacher` must be a teacher, got {type(teacher).__name__}.")
        d_in = teacher.weights(0).shape[1]
        if d_in != inputs.dim:
            raise ValueError(
                f"The teacher takes inputs of dimension {d_in} but the input law draws "
                f"{inputs.dim}."
            )
        self.inputs, self.teacher = inputs, teacher
        self.label_noise = _level("label_noise", label_noise)

    @property
    def shapes(self) -> tuple[int, int]:
        """``(d_in, d_out)``."""
        d_out, d_in = self.teacher.weights(0).shape
        return d_in, d_out

    def data(
        self, t: ArrayLike, xi: Float[Array, "n d_in"], zeta: Float[Array, "n d_out"]
    ) -> tuple[Float[Array, "n d_in"], Float[Array, "n d_out"]]:
        r"""$(x, y)$ at step ``t`` from the innovations $(\xi, \zeta)$."""
        x = self.inputs.transform(t, xi)
        return x, x @ self.teacher.weights(t).T + self.label_noise(t) * zeta

    def minimizer(self, t: ArrayLike) -> Float[Array, "d_out d_in"]:
        r"""$W_t$: the minimiser of the population loss at step ``t`` for a linear student."""
        return self.teacher.weights(t)

    def change_steps(self) -> tuple[int, ...]:
        """Every step at which the law is scheduled to change."""
        return (
            *self.inputs.change_steps(),
            *self.teacher.change_steps(),
            *self.label_noise.boundaries,
        )


class StreamNoise(AbstractNoise):
    r"""Online SGD on a [`DataStream`][]: each step draws ``batch_size`` fresh examples from
    $P_t$ and $G = \nabla_\theta\frac1B\sum_i\ell(F_\theta(x_i), y_i)$, with the network $F$ and
    loss $\ell$ of the objective (an ``lspsde.SupervisedLoss``: its own inputs and targets are
    the fixed data the recorded loss is measured on, e.g. a probe set).

    The gradient's mean drifts with $t$ (unbiased for the population loss at $t$, not for the
    objective's): Assumption 1 does not apply, and ``assumption1`` says so.

    **Arguments:** `stream`, `batch_size` $B \ge 1$; `t` is bound by the learning system
    ([`at_time`][]).
    """

    magnitude: ClassVar[str | None] = None

    stream: DataStream
    batch_size: int = eqx.field(static=True)
    t: Array

    def __init__(self, stream: DataStream, batch_size: int, t: ArrayLike = 0):
        if not isinstance(stream, DataStream):
            raise TypeError(f"`stream` must be an lspsde DataStream, got {type(stream).__name__}.")
        self.stream = stream
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.t = jnp.asarray(t)

    def at_time(self, t: ArrayLike) -> "StreamNoise":
        return eqx.tree_at(lambda m: m.t, self, jnp.asarray(t))

    def sample(self, key: PRNGKeyArray, theta: PyTree[Array]) -> dict[str, Array]:
        d_in, d_out = self.stream.shapes
        kx, ky = jax.random.split(key)
        dtype = jnp.result_type(*jax.tree.leaves(theta))
        return {
            "xi": jax.random.normal(kx, (self.batch_size, d_in), dtype),
            "zeta": jax.random.normal(ky, (self.batch_size, d_out), dtype),
        }

    def gradient(
        self, objective: AbstractObjective, theta: PyTree[Array], u: dict[str, Array]
    ) -> PyTree[Array]:
        x, y = self.stream.data(self.t, u["xi"], u["zeta"])

        def batch_loss(th):
            preds = jax.vmap(objective.network(th))(x)
            return jnp.mean(jax.vmap(objective.loss_fn)(preds, y))

        return jax.grad(batch_loss)(theta)

    def covariance(self, objective: AbstractObjective, theta: PyTree[Array]) -> None:
        return None  # the law of G changes with t: no fixed covariance

    def assumption1(self, objective: AbstractObjective) -> Assumption1:
        return Assumption1(
            False,
            None,
            None,
            "non-stationary data: E[G] is the gradient of the population loss at step t, which "
            "drifts; the objective is not fixed (outside the theory, Section 7.5)",
        )

    def check_horizon(self, n_steps: int) -> None:
        late = [s for s in self.stream.change_steps() if s >= n_steps]
        if late:
            raise ValueError(
                f"The data stream is scheduled to change at step(s) {late}, at or past the "
                f"horizon n_steps={n_steps}: the drift would never happen in this run. Run at "
                f"least {max(late) + 1} steps, or schedule the change earlier."
            )

    def check_objective(self, objective: AbstractObjective) -> None:
        if not isinstance(objective, SupervisedLoss):
            raise TypeError(
                f"StreamNoise needs an lspsde.SupervisedLoss (its network and loss are applied "
                f"to the streamed data), got {type(objective).__name__}."
            )
        d_in, d_out = self.stream.shapes
        if objective.inputs.shape[1] != d_in or objective.targets.shape[1] != d_out:
            raise ValueError(
                f"The stream draws (x, y) of dimensions ({d_in}, {d_out}), but the objective's "
                f"network maps {objective.inputs.shape[1]} -> {objective.targets.shape[1]}; "
                "make the stream's teacher the shape (d_out, d_in) of the network."
            )
