"""The neural-ODE limit of residual networks, and the residual network that is its explicit
Euler discretisation."""

from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array

from .._checks import check_positive, check_positive_int
from ..representation import AbstractRepresentationFlow, Residual
from ._common import _check_ode_solver, _solve_adaptive


class NeuralODE(AbstractRepresentationFlow):
    r"""The neural ODE $dX/ds = g(s, X)$ on $[0, S]$, seen at $L$ equally spaced depths: layer
    $k$ is the flow map from $s_k = kS/L$ to $s_{k+1}$, so profiles and exponents of the
    continuous-depth limit are measured with the same tools as those of a residual network.

    The residual network $X_{k+1} = X_k + h\,g(kh, X_k)$ with $h = S/L$
    ([`euler_residual`][]) is its explicit Euler discretisation (paper, Section 4.2); as
    $h \to 0$ it converges to this flow with error $O(h)$.

    **Arguments:**

    - `vector_field`: $g(s, x)$, a callable (an ``eqx.Module`` whose arrays are the
      parameters, or a function).
    - `horizon`: the depth $S > 0$.
    - `n_layers`: $L$, how many flow maps the depth is cut into (default 1).
    - `solver`, `stepsize_controller`, `adjoint`, `max_steps`: the diffrax integration;
      defaults ``Tsit5``, ``PIDController(rtol=1e-8, atol=1e-10)``, ``DirectAdjoint`` (JVPs and
      VJPs both work, as the Jacobian profiles need).
    """

    vector_field: Callable
    horizon: float = eqx.field(static=True)
    n_layers: int = eqx.field(static=True)
    solver: dfx.AbstractSolver
    stepsize_controller: dfx.AbstractStepSizeController
    adjoint: dfx.AbstractAdjoint
    max_steps: int = eqx.field(static=True)

    def __init__(
        self,
        vector_field: Callable,
        horizon: float,
        n_layers: int = 1,
        solver: dfx.AbstractSolver | None = None,
        stepsize_controller: dfx.AbstractStepSizeController | None = None,
        adjoint: dfx.AbstractAdjoint | None = None,
        max_steps: int = 4096,
    ):
        if not callable(vector_field):
            raise TypeError(
                f"`vector_field` must be callable (s, x) -> dx/ds, got {vector_field!r}."
            )
        check_positive("horizon", horizon, fix="The depth S of the neural ODE must be > 0.")
        self.vector_field = vector_field
        self.horizon = float(horizon)
        self.n_layers = check_positive_int("n_layers", n_layers)
        self.solver = dfx.Tsit5() if solver is None else solver
        _check_ode_solver(self.solver, "NeuralODE")
        if stepsize_controller is None:
            stepsize_controller = dfx.PIDController(rtol=1e-8, atol=1e-10)
        self.stepsize_controller = stepsize_controller
        self.adjoint = dfx.DirectAdjoint() if adjoint is None else adjoint
        self.max_steps = check_positive_int("max_steps", max_steps)

    @property
    def depth(self) -> int:
        return self.n_layers

    def layer(self, k: int, x: Array) -> Array:
        h = self.horizon / self.n_layers
        terms = dfx.ODETerm(lambda s, y, args: self.vector_field(s, y))
        return _solve_adaptive(
            terms, self.solver, self.stepsize_controller, jnp.asarray(k * h, dtype=x.dtype),
            h, x, self.max_steps, None, self.adjoint,
        )  # fmt: skip


class _Slice(eqx.Module):
    """$x \\mapsto g(s_k, x)$: one block of an Euler residual network."""

    vector_field: Callable
    s: float = eqx.field(static=True)

    def __call__(self, x: Array) -> Array:
        return self.vector_field(self.s, x)


def euler_residual(vector_field: Callable, horizon: float, depth: int) -> Residual:
    r"""The residual network $X_{k+1} = X_k + h\,g(kh, X_k)$, $h = S/L$: explicit Euler for
    [`NeuralODE`][] ``(vector_field, horizon)`` with ``depth`` steps (shares its parameters)."""
    check_positive("horizon", horizon, fix="The depth S must be > 0.")
    depth = check_positive_int("depth", depth)
    h = float(horizon) / depth
    return Residual([_Slice(vector_field, k * h) for k in range(depth)], h)
