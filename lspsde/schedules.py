r"""Step-size schedules $\eta_t$ for parameter flows (Section 5)."""

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from ._checks import check_in_interval, check_positive, check_real_scalar


class AbstractSchedule(eqx.Module):
    r"""A step-size schedule $t \mapsto \eta_t > 0$."""

    @abc.abstractmethod
    def __call__(self, t: ArrayLike) -> Float[Array, ""]:
        r"""The step size $\eta_t$ at (integer) step ``t``."""


class Constant(AbstractSchedule):
    r"""$\eta_t \equiv \eta$ (Theorem 5.2)."""

    value: Float[Array, ""]

    def __init__(self, value: float | Array):
        check_real_scalar("step_size", value)
        check_positive("step_size", value, fix="Use a step size eta > 0.")
        self.value = jnp.asarray(value, dtype=float)

    def __call__(self, t: ArrayLike) -> Float[Array, ""]:
        return self.value


class RobbinsMonro(AbstractSchedule):
    r"""$\eta_t = c / (t + t_0)^p$ with $p \in (1/2, 1]$ (Theorem 5.3).

    For $p \in (1/2, 1]$, $\sum_t \eta_t = \infty$ and $\sum_t \eta_t^2 < \infty$: the
    Robbins–Monro conditions of Theorem 5.3. Other exponents are rejected.
    """

    c: Float[Array, ""]
    t0: Float[Array, ""]
    p: Float[Array, ""]

    def __init__(self, c: float | Array, t0: float | Array = 1.0, p: float | Array = 1.0):
        check_positive("c", c, fix="The schedule c / (t + t0)^p needs c > 0.")
        check_positive("t0", t0, fix="Use t0 > 0 so that eta_0 = c / t0^p is finite.")
        check_in_interval(
            "p",
            p,
            0.5,
            1.0,
            closed_high=True,
            fix="Robbins-Monro needs sum eta_t = inf and sum eta_t^2 < inf, i.e. p in (1/2, 1].",
        )
        self.c = jnp.asarray(c, dtype=float)
        self.t0 = jnp.asarray(t0, dtype=float)
        self.p = jnp.asarray(p, dtype=float)

    def __call__(self, t: ArrayLike) -> Float[Array, ""]:
        return self.c / (jnp.asarray(t, dtype=self.c.dtype) + self.t0) ** self.p


def as_schedule(step_size: "float | Array | AbstractSchedule") -> AbstractSchedule:
    """A number means a constant schedule; a schedule is returned as is."""
    if isinstance(step_size, AbstractSchedule):
        return step_size
    return Constant(step_size)
