"""What the continuous limits share: their checked settings, the base class, the drift,
solver checks, and the fixed-step and adaptive solves over one step."""

import math

import diffrax as dfx
import equinox as eqx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PyTree

from .._checks import _concrete, check_positive, check_positive_int, check_real_scalar
from .._custom_types import ScalarLike
from ..objectives import AbstractObjective
from ..parameter import AbstractParameterFlow
from ..schedules import AbstractSchedule, Constant

DEFAULT_SUBSTEPS = 32
"""Sub-steps per SGD step of a fixed-step limit when ``dt`` is not given: $\\delta = \\eta/32$."""


def _constant_step(step_size: "ScalarLike | AbstractSchedule", who: str) -> Float[Array, ""]:
    if isinstance(step_size, AbstractSchedule):
        if not isinstance(step_size, Constant):
            raise ValueError(
                f"{who} needs a constant step size (the time unit t = k * step_size), got "
                f"{type(step_size).__name__}; compare decreasing-step SGD with the limit at "
                "each constant step instead."
            )
        return step_size.value
    check_real_scalar("step_size", step_size)
    check_positive("step_size", step_size, fix="The step size eta (time per step) must be > 0.")
    return jnp.asarray(step_size, dtype=float)


def _substeps(step_size: Array, dt: float | None, who: str, given: object = None) -> int:
    if dt is None:
        return DEFAULT_SUBSTEPS
    check_positive("dt", dt, fix="dt is the integration step inside one step of the flow.")
    eta = _concrete(step_size) if not isinstance(given, int | float) else float(given)
    if eta is None:
        raise ValueError(f"{who}(dt=...) needs a concrete step_size to count sub-steps.")
    ratio = eta / dt
    # step_size may have been rounded to float32: a ratio within 1e-5 of an integer is that
    # integer (dt = eta / n gives n sub-steps in any precision).
    nearest = round(ratio)
    if nearest >= 1 and abs(ratio - nearest) <= 1e-5 * ratio:
        return int(nearest)
    if ratio < 1:
        raise ValueError(
            f"dt={dt:g} is larger than the horizon of one step, step_size={eta:g}: each step "
            f"integrates over [k * step_size, (k + 1) * step_size]. Use dt <= {eta:g} (the "
            "sub-step count is ceil(step_size / dt))."
        )
    return math.ceil(ratio)


def _settings(who: str, step_size, order, dt, max_steps, adjoint, n_substeps=None) -> tuple:
    """The checked settings every limit shares: ``(step_size, order, dt, n_substeps, max_steps,
    adjoint)``. A static ``n_substeps`` stands in for ``dt`` (``dt = step_size / n_substeps``)
    and needs no concrete step size, so that limits can be swept and traced."""
    eta = _constant_step(step_size, who)
    if order not in (1, 2):
        raise ValueError(f"`order` must be 1 or 2, got {order!r}.")
    if n_substeps is not None:
        if dt is not None:
            raise ValueError(
                f"{who}: give `dt` or `n_substeps` (dt = step_size / n_substeps), not both."
            )
        n = check_positive_int("n_substeps", n_substeps, fix="Use at least one sub-step.")
        max_steps = check_positive_int("max_steps", max_steps)
        return eta, order, None, n, max_steps, dfx.DirectAdjoint() if adjoint is None else adjoint
    dt = None if dt is None else float(dt)
    n = _substeps(eta, dt, who, step_size)
    max_steps = check_positive_int("max_steps", max_steps)
    return eta, order, dt, n, max_steps, dfx.DirectAdjoint() if adjoint is None else adjoint


class AbstractContinuousLimit(AbstractParameterFlow):
    r"""A continuous-time flow sampled every ``step_size`` time units: step $k$ of it maps
    $\Theta(k\eta)$ to $\Theta((k+1)\eta)$."""

    step_size: eqx.AbstractVar[Float[Array, ""]]

    def __call__(self, t: ArrayLike, theta: PyTree[Array], grad: PyTree[Array]) -> PyTree[Array]:
        raise TypeError(
            f"{type(self).__name__} integrates the drift (and diffusion) itself and needs the "
            "objective and the noise model: use it through lspsde.simulate, LearningSystem or "
            "learning_profile, not as update(t, theta, grad)."
        )


def _drift(objective: AbstractObjective, unravel, eta: Array, order: int):
    r"""$-\nabla\mathcal{L}$, or $-\nabla\mathcal{L} - \frac\eta2 H\nabla\mathcal{L}$ for order 2,
    over the flat parameters."""

    def flat_grad(y):
        return ravel_pytree(objective.gradient(unravel(y)))[0]

    def drift(t, y, args):
        if order == 1:
            return -flat_grad(y)
        g, hg = jax.jvp(flat_grad, (y,), (flat_grad(y),))
        return -(g + 0.5 * eta * hg)

    return drift


def _lax_stages(solver: dfx.AbstractSolver) -> dfx.AbstractSolver:
    """Runge–Kutta and SRK solvers loop over their stages with a checkpointed scan (a
    ``custom_vjp``) by default, which forward-mode autodiff cannot enter; the plain
    ``lax.scan`` computes the same numbers and lets profiles and Lyapunov spectra (JVPs and
    VJPs) differentiate through a fixed step."""
    if hasattr(solver, "scan_kind") and solver.scan_kind is None:
        return eqx.tree_at(lambda s: s.scan_kind, solver, "lax", is_leaf=lambda x: x is None)
    return solver


def _check_ode_solver(solver: dfx.AbstractSolver, who: str) -> None:
    if isinstance(solver, dfx.AbstractSRK | dfx.ItoMilstein | dfx.StratonovichMilstein):
        raise ValueError(
            f"{who}: {type(solver).__name__} solves SDEs only, and this flow is an ODE (no "
            "noise). Use an ODE solver such as diffrax.Tsit5(), diffrax.Heun() or "
            "diffrax.Euler()."
        )


def _solve_fixed(make_terms, solver, t0, horizon, y0, n, bridge=None):
    r"""``n`` equal steps of ``solver`` over ``[t0, t0 + horizon]``: a ``lax.scan`` of the
    solver's ``step`` (no adaptive loop). ``bridge = (sub_step, carry)`` draws sub-step ``i``'s
    Brownian increments as the scan goes (``None`` for an ODE)."""
    delta = horizon / n
    if bridge is None:
        sub_step, noise_carry = (lambda i, c: (None, c)), None
    else:
        sub_step, noise_carry = bridge
    # `init` only looks at the vector fields (SRK solvers check additivity): zero increments.
    shapes = jax.eval_shape(sub_step, jnp.asarray(0), noise_carry)[0]
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    state = solver.init(make_terms(t0, t0 + delta, zeros), t0, t0 + delta, y0, None)

    def body(carry, i):
        y, state, noise_carry = carry
        inc, noise_carry = sub_step(i, noise_carry)
        ta, tb = t0 + i * delta, t0 + (i + 1) * delta
        y, _, _, state, _ = solver.step(make_terms(ta, tb, inc), ta, tb, y, None, state, False)
        return (y, state, noise_carry), None

    (y, _, _), _ = jax.lax.scan(body, (y0, state, noise_carry), jnp.arange(n))
    return y


def _solve_adaptive(terms, solver, controller, t0, horizon, y0, max_steps, dt, adjoint):
    r"""``diffeqsolve`` over ``[t0, t0 + horizon]`` with adaptive steps; a solve that fails
    (too many steps, non-finite values) gives NaN, which ``simulate`` records as divergence."""
    sol = dfx.diffeqsolve(
        terms,
        solver,
        t0,
        t0 + horizon,
        dt0=horizon / 8 if dt is None else dt,
        y0=y0,
        stepsize_controller=controller,
        saveat=dfx.SaveAt(t1=True),
        max_steps=max_steps,
        throw=False,
        adjoint=adjoint,
    )
    ok = sol.result == dfx.RESULTS.successful
    return jnp.where(ok, sol.ys[-1], jnp.nan)
