r"""Continuous-time limits of parameter flows, integrated with diffrax.

SGD with a constant step $\eta$ (eq. 5.1) is, to first order in $\eta$, a sample of the Itô SDE
(the stochastic modified equation, Li, Tai & E 2017)

$$d\Theta = -\nabla\mathcal{L}(\Theta)\,dt + \sqrt\eta\,B(\Theta)\,dW_t, \qquad
B B^\top = \Sigma(\Theta), \qquad t = k\eta,$$

and gradient descent of the gradient flow $d\theta/dt = -\nabla\mathcal{L}(\theta)$. With
``order=2`` the drift gets the first correction of backward error analysis,
$-\nabla(\mathcal{L} + \frac\eta4\|\nabla\mathcal{L}\|^2) = -\nabla\mathcal{L} -
\frac\eta2\nabla^2\mathcal{L}\,\nabla\mathcal{L}$.

Both limits here are parameter flows: they plug into ``lspsde.simulate`` (and
``learning_profile``) wherever ``lspsde.SGD`` does. One step of the flow integrates over one
step's worth of time, $[k\eta, (k+1)\eta]$, so step $k$ of SGD and step $k$ of its limit are
saved at the same time $t = k\eta$.

**Brownian paths.** For fixed steps (the default) each step $[k\eta, (k+1)\eta]$ first draws its
whole Brownian increment, $W((k+1)\eta) - W(k\eta) = \sqrt\eta\,\xi_k$, where $\xi_k$ is the
draw SGD itself would make at step $k$ (for models with ``gaussian_draws``:
``IsotropicGaussian``, ``AnisotropicGaussian``, ``GaussianNoise``), and then fills in the $n$
sub-steps as an exact sequential Brownian bridge pinned to it: with $R$ the part not yet used and
$j$ sub-steps left,

$$\Delta W_i = R/j + \sqrt{\delta (j - 1)/j}\; z_i, \qquad z_i \sim N(0, I), \quad
\delta = \eta/n.$$

(The $\Delta W_i$ are i.i.d. $N(0, \delta I)$ and sum to $\sqrt\eta\,\xi_k$.) So with the same key
an SGD path and its SDE-limit path are *coupled*: Euler–Maruyama with one sub-step reproduces SGD,
and strong errors between the two are meaningful. The sub-steps are a ``lax.scan`` of the diffrax
solver's own ``step`` over diffrax terms, each sub-step drawing its bridge increment as it goes:
no adaptive loop, no Brownian tree search, no pre-sampled block (drawing the $n \times m$ block up
front measured up to 1.6x slower on CPU), so a fixed-step ensemble takes 0.9–1.25x the time of
a hand-written scan (``benchmarks/bench_limits.py``). Space-time(-time) Lévy areas, for ``ShARK``,
``SRA1``, ``SEA`` and the like, are drawn independently per sub-step ($H_i \sim N(0, \delta/12)$,
$K_i \sim N(0, \delta/720)$), which is their exact joint law. [`SGDLimit.increments`][] returns
the sub-step increments of a draw, and ``step`` also accepts explicit
[`BrownianIncrements`][] (any Brownian path you construct).

With a ``stepsize_controller`` the step is a ``diffrax.diffeqsolve`` over
$[k\eta, (k+1)\eta]$ driven by a ``VirtualBrownianTree`` (what adaptive steps need); that mode is
not coupled to SGD's draws.
"""

from collections.abc import Callable, Sequence
import functools
import math
from typing import NamedTuple

import diffrax as dfx
import equinox as eqx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree
import lineax as lx
import numpy as np
import optimistix as optx

from ._checks import _concrete, check_positive, check_positive_int
from ._custom_types import ScalarLike
from ._simulate import Ensemble, masked_mean
from .noise import AbstractNoise, NoNoise
from .objectives import AbstractObjective
from .parameter import AbstractParameterFlow
from .representation import AbstractRepresentationFlow, Residual
from .schedules import AbstractSchedule, Constant

__all__ = [
    "AbstractContinuousLimit",
    "BrownianIncrements",
    "BrownianStep",
    "ErrorCurve",
    "GradientFlow",
    "NeuralODE",
    "OrderFit",
    "SGDLimit",
    "convergence_order",
    "euler_residual",
    "strong_error",
    "weak_error",
]

DEFAULT_SUBSTEPS = 32
"""Sub-steps per SGD step of a fixed-step limit when ``dt`` is not given: $\\delta = \\eta/32$."""


class BrownianIncrements(eqx.Module):
    r"""The Brownian motion over the sub-steps of one step $[k\eta, (k+1)\eta]$ of a limit:
    increments ``W`` and, where the solver needs them, space-time (``H``) and space-time-time
    (``K``) Lévy areas, each of shape ``(n_substeps, m)`` (see [`SGDLimit.increments`][])."""

    W: Float[Array, "*n m"]
    H: Float[Array, "*n m"] | None = None
    K: Float[Array, "*n m"] | None = None


class BrownianStep(eqx.Module):
    r"""What one fixed step of ``SGDLimit`` draws: the step's Brownian increment
    $W((k+1)\eta) - W(k\eta) = \sqrt\eta\,\xi_k$ (with $\xi_k$ SGD's own draw where the noise has
    ``gaussian_draws``) and the key from which the sub-step bridge is drawn as the solver goes."""

    total: Float[Array, " m"]
    key: PRNGKeyArray


class _SubstepPath(dfx.AbstractBrownianPath):
    """The Brownian path over one fixed sub-step, from pre-sampled values.

    Valid only for the sub-step it was made for: fixed-step solvers evaluate the control once,
    over exactly their step ``[t0, t1]``.
    """

    t0: Float[Array, ""]
    t1: Float[Array, ""]
    W: Float[Array, " m"]
    H: Float[Array, " m"] | None
    K: Float[Array, " m"] | None
    levy_area: type = eqx.field(static=True)

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        del t0, left
        if t1 is None:
            raise ValueError("A pre-sampled sub-step path only gives increments over its step.")
        if not use_levy:
            return self.W
        dt = self.t1 - self.t0
        if self.levy_area is dfx.SpaceTimeTimeLevyArea:
            return dfx.SpaceTimeTimeLevyArea(dt=dt, W=self.W, H=self.H, K=self.K)
        if self.levy_area is dfx.SpaceTimeLevyArea:
            return dfx.SpaceTimeLevyArea(dt=dt, W=self.W, H=self.H)
        return dfx.BrownianIncrement(dt=dt, W=self.W)


def _levy_area(solver: dfx.AbstractSolver) -> type:
    """The Brownian increment type ``solver`` needs (diffrax's ``minimal_levy_area``)."""
    need = getattr(solver, "minimal_levy_area", dfx.AbstractBrownianIncrement)
    if issubclass(need, dfx.AbstractSpaceTimeTimeLevyArea):
        return dfx.SpaceTimeTimeLevyArea
    if issubclass(need, dfx.AbstractSpaceTimeLevyArea):
        return dfx.SpaceTimeLevyArea
    return dfx.BrownianIncrement


def _constant_step(step_size: "ScalarLike | AbstractSchedule", who: str) -> Float[Array, ""]:
    if isinstance(step_size, AbstractSchedule):
        if not isinstance(step_size, Constant):
            raise ValueError(
                f"{who} needs a constant step size (the time unit t = k * step_size), got "
                f"{type(step_size).__name__}; compare decreasing-step SGD with the limit at "
                "each constant step instead."
            )
        return step_size.value
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


class GradientFlow(AbstractContinuousLimit):
    r"""The gradient flow $d\theta/dt = -\nabla\mathcal{L}(\theta)$, the $\eta \to 0$ limit of
    gradient descent, sampled at $t = k\eta$ (``order=2``: with the modified-equation drift
    $-\nabla\mathcal{L} - \frac\eta2\nabla^2\mathcal{L}\nabla\mathcal{L}$).

    The noise model of the learning system is ignored: this is the deterministic limit.

    **Arguments:**

    - `step_size`: $\eta > 0$, the time between saved steps (the GD step it is compared with).
    - `order`: 1 (gradient flow) or 2 (first modified equation of GD).
    - `dt`: fixed integration step ($\le \eta$; ``ceil(eta / dt)`` sub-steps per step). Default
      ``None``: adaptive steps.
    - `n_substeps`: instead of `dt`, a static number of fixed sub-steps per step
      ($\delta = \eta / n$): it needs no concrete step size, so the flow can be swept
      (``lspsde.Sweep``) or built under ``vmap``.
    - `solver`: a diffrax ODE solver; default ``diffrax.Tsit5()``.
    - `stepsize_controller`: used when `dt` is ``None``; default
      ``diffrax.PIDController(rtol=1e-8, atol=1e-10)``.
    - `max_steps`: the most adaptive steps per step of the flow (a path that needs more is
      marked divergent, not crashed).
    - `adjoint`: how ``diffeqsolve`` is differentiated in the adaptive mode; default
      ``diffrax.DirectAdjoint()``, which supports both the JVPs and the VJPs that profiles and
      Lyapunov spectra use (``RecursiveCheckpointAdjoint`` is reverse mode only), at no
      measurable cost in a forward run.

    With the defaults the integration error is below $10^{-7}$ relative: the limit, not a
    re-run of gradient descent.
    """

    step_size: Float[Array, ""]
    order: int = eqx.field(static=True)
    dt: float | None = eqx.field(static=True)
    solver: dfx.AbstractSolver
    stepsize_controller: dfx.AbstractStepSizeController
    adjoint: dfx.AbstractAdjoint
    n_substeps: int = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    fixed_steps: bool = eqx.field(static=True)

    def __init__(
        self,
        step_size: "ScalarLike | AbstractSchedule",
        order: int = 1,
        dt: float | None = None,
        solver: dfx.AbstractSolver | None = None,
        stepsize_controller: dfx.AbstractStepSizeController | None = None,
        max_steps: int = 4096,
        adjoint: dfx.AbstractAdjoint | None = None,
        n_substeps: int | None = None,
    ):
        (self.step_size, self.order, self.dt, self.n_substeps, self.max_steps, self.adjoint) = (
            _settings("GradientFlow", step_size, order, dt, max_steps, adjoint, n_substeps)
        )
        self.fixed_steps = dt is not None or n_substeps is not None
        if solver is not None and not isinstance(solver, dfx.AbstractSolver):
            raise TypeError(f"`solver` must be a diffrax solver, got {solver!r}.")
        self.solver = _lax_stages(dfx.Tsit5() if solver is None else solver)
        _check_ode_solver(self.solver, "GradientFlow")
        if stepsize_controller is None:
            stepsize_controller = dfx.PIDController(rtol=1e-8, atol=1e-10)
        self.stepsize_controller = stepsize_controller

    def draw(
        self,
        objective: AbstractObjective,
        noise: AbstractNoise,
        key: PRNGKeyArray,
        theta: PyTree[Array],
    ) -> PRNGKeyArray:
        return key  # deterministic: nothing is drawn (a key is not differentiable: no u-blocks)

    def step(
        self,
        objective: AbstractObjective,
        noise: AbstractNoise,
        t: ArrayLike,
        theta: PyTree[Array],
        u: PyTree,
    ) -> PyTree[Array]:
        y0, unravel = ravel_pytree(theta)
        terms = dfx.ODETerm(_drift(objective, unravel, self.step_size, self.order))
        t0 = jnp.asarray(t, dtype=y0.dtype) * self.step_size
        if not self.fixed_steps:
            controller = self.stepsize_controller
            y1 = _solve_adaptive(
                terms, self.solver, controller, t0, self.step_size, y0, self.max_steps, None,
                self.adjoint,
            )  # fmt: skip
        else:
            y1 = _solve_fixed(
                lambda *_: terms, self.solver, t0, self.step_size, y0, self.n_substeps
            )
        return unravel(y1)


class SGDLimit(AbstractContinuousLimit):
    r"""The stochastic modified equation of SGD (Li, Tai & E, 2017), sampled at $t = k\eta$:

    $$d\Theta = -\nabla\mathcal{L}(\Theta)\,dt + \sqrt\eta\,B(\Theta)\,dW, \qquad
    BB^\top = \Sigma(\Theta),$$

    an Itô SDE whose diffusion comes from the noise model (``noise.diffusion``: exact for the
    Gaussian models, the covariance over the whole data set for ``MinibatchNoise`` and
    ``CurvatureNoise``, the Gaussian of equal covariance for ``StudentTNoise`` with $\nu > 2$).
    ``order=2`` adds the drift correction $-\frac\eta2\nabla^2\mathcal{L}\,\nabla\mathcal{L}$.
    Use it wherever ``lspsde.SGD`` is used: ``simulate(objective, SGDLimit(0.1), noise, ...)``
    saves $\Theta$ at $t = k\eta$, beside step $k$ of ``simulate(objective, SGD(0.1), noise,
    ...)``; with the same key and a noise model with ``gaussian_draws`` the two are driven by
    the same Brownian path (see the module docstring).

    **Arguments:**

    - `step_size`: $\eta > 0$ (a constant): the SGD step, the time per saved step, and the
      noise scale $\sqrt\eta$.
    - `order`: 1 or 2 (see above).
    - `dt`: the fixed integration step, $\le \eta$; ``ceil(eta / dt)`` sub-steps per step.
      Default ``eta / 32`` (``DEFAULT_SUBSTEPS``).
    - `solver`: a diffrax SDE solver. Default: ``diffrax.ShARK()`` for additive noise (strong
      order 1.5 there), ``diffrax.Euler()`` (Euler–Maruyama) otherwise. Stratonovich solvers
      (Heun, the SRK family) are refused for state-dependent noise, because the SGD limit is an
      Itô equation; ShARK, SRA1 and SEA need additive noise; Milstein needs commutative noise,
      accepted when the noise is additive or one-dimensional.
    - `stepsize_controller`: if given (e.g. ``diffrax.PIDController``), each step is a
      ``diffeqsolve`` with adaptive steps on a ``VirtualBrownianTree``; then paths are not
      coupled to SGD's draws.
    - `max_steps`, `adjoint`: for the adaptive mode, as in [`GradientFlow`][].
    - `n_substeps`: instead of `dt`, a static number of fixed sub-steps per step (default 32
      when neither is given): it needs no concrete step size, so limits can be swept
      (``lspsde.Sweep``) or built under ``vmap``.
    - `coupled`: with fixed steps, pin each step's Brownian increment to SGD's draw and fill in
      the sub-steps as a bridge (default ``True``: paired weak errors and strong errors against
      SGD are available). ``False`` draws every sub-step increment independently: the same law,
      no coupling, and a little cheaper for many sub-steps (no bridge arithmetic).

    SRK solvers are run with ``scan_kind="lax"`` (same numbers; their default checkpointed
    stage loop cannot be differentiated in forward mode, which profiles need). In
    ``learning_profile`` a limit has the parametric blocks ($\sigma^\theta_t$, cumulative
    $\|\partial\Theta_t/\partial\Theta_0\|$); its draw holds a key, so the $u$-blocks are
    reported as undefined (``None``), as for minibatch indices.

    **Default accuracy.** With the default $\delta = \eta/32$: on an Ornstein–Uhlenbeck process
    with curvature $\lambda$, ShARK's stationary variance is within $10^{-3}$ relative of
    the exact one for $\lambda\eta \le 1$ (below the $\approx 2\%$ Monte Carlo error of a
    4,096-path ensemble); Euler–Maruyama's error is about $\lambda\delta/2 = \lambda\eta/64$,
    relative (tested in ``tests/test_limits.py``).

    **Raises:** ``ValueError`` before compilation for a schedule that is not constant, `dt`
    larger than `step_size`, a solver that cannot handle the noise, or a noise model without a
    covariance (heavy tails: ``AlphaStableNoise`` with $\alpha < 2$, ``StudentTNoise`` with
    $\nu \le 2$).
    """

    step_size: Float[Array, ""]
    order: int = eqx.field(static=True)
    dt: float | None = eqx.field(static=True)
    solver: dfx.AbstractSolver | None
    stepsize_controller: dfx.AbstractStepSizeController | None
    adjoint: dfx.AbstractAdjoint
    n_substeps: int = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    coupled: bool = eqx.field(static=True)

    def __init__(
        self,
        step_size: "ScalarLike | AbstractSchedule",
        order: int = 1,
        dt: float | None = None,
        solver: dfx.AbstractSolver | None = None,
        stepsize_controller: dfx.AbstractStepSizeController | None = None,
        max_steps: int = 4096,
        adjoint: dfx.AbstractAdjoint | None = None,
        coupled: bool = True,
        n_substeps: int | None = None,
    ):
        (self.step_size, self.order, self.dt, self.n_substeps, self.max_steps, self.adjoint) = (
            _settings("SGDLimit", step_size, order, dt, max_steps, adjoint, n_substeps)
        )
        if not isinstance(coupled, bool):
            raise TypeError(f"`coupled` must be True or False, got {coupled!r}.")
        self.coupled = coupled
        if solver is not None and not isinstance(solver, dfx.AbstractSolver):
            raise TypeError(f"`solver` must be a diffrax solver, got {solver!r}.")
        self.solver = solver
        self.stepsize_controller = stepsize_controller

    # -- what the flow integrates -------------------------------------------------------------

    def solver_for(self, noise: AbstractNoise) -> dfx.AbstractSolver:
        """The solver used with ``noise``: the one given, or the default for its noise type."""
        solver = self.solver
        if solver is None:
            if isinstance(noise, NoNoise):
                solver = dfx.Tsit5()
            else:
                solver = dfx.ShARK() if noise.is_additive() else dfx.Euler()
        return _lax_stages(solver)

    def check(
        self, objective: AbstractObjective, noise: AbstractNoise, theta0: PyTree[Array]
    ) -> None:
        r"""Refuse, before compilation, a noise model with no covariance and a solver that does
        not converge to this Itô SDE for it."""
        solver = self.solver_for(noise)
        name = type(solver).__name__
        if isinstance(noise, NoNoise):
            _check_ode_solver(solver, "SGDLimit with NoNoise")
            return
        B = noise.diffusion(objective, theta0)  # raises for heavy tails
        if noise.gaussian_draws:
            m = ravel_pytree(noise.sample(jax.random.key(0), theta0))[0].size
            if m != B.in_size():
                raise ValueError(
                    f"{type(noise).__name__}.diffusion takes {B.in_size()} Brownian entries but "
                    f"its draws have {m}; a model with gaussian_draws must match them."
                )
        additive = noise.is_additive()
        sde = isinstance(solver, dfx.AbstractItoSolver | dfx.AbstractStratonovichSolver)
        if not sde:
            raise ValueError(
                f"{name} is not an SDE solver (it does not converge to an SDE's solution). Use "
                "diffrax.Euler() (Euler-Maruyama), diffrax.ItoMilstein(), or for additive noise "
                "diffrax.ShARK(), diffrax.SRA1(), diffrax.Heun()."
            )
        if isinstance(solver, dfx.AbstractSRK) and solver.tableau.is_additive_noise():
            if not additive:
                raise ValueError(
                    f"{name} is for additive noise, but {type(noise).__name__} has a "
                    "state-dependent covariance. Use diffrax.Euler() or diffrax.ItoMilstein()."
                )
        if isinstance(solver, dfx.AbstractStratonovichSolver) and not additive:
            raise ValueError(
                f"{name} converges to the Stratonovich solution, but the SGD limit is an Ito SDE "
                f"and {type(noise).__name__} is state dependent, so the two differ. Use "
                "diffrax.Euler() or diffrax.ItoMilstein()."
            )
        if isinstance(solver, dfx.ItoMilstein) and not (additive or B.in_size() == 1):
            raise ValueError(
                f"ItoMilstein needs commutative noise, which lspsde accepts only for additive or "
                f"one-dimensional noise; {type(noise).__name__} here has {B.in_size()} Brownian "
                "dimensions and a state-dependent diffusion. Use diffrax.Euler()."
            )
        if self.stepsize_controller is not None and not isinstance(
            solver, dfx.AbstractAdaptiveSolver
        ):
            if not isinstance(self.stepsize_controller, dfx.ConstantStepSize):
                raise ValueError(
                    f"{name} gives no error estimate, so it cannot take adaptive steps; use "
                    "diffrax.SPaRK() (additive or not) or drop `stepsize_controller`."
                )

    def draw(
        self,
        objective: AbstractObjective,
        noise: AbstractNoise,
        key: PRNGKeyArray,
        theta: PyTree[Array],
    ) -> "BrownianStep | PRNGKeyArray":
        r"""The Brownian motion over one step: its increment pinned to SGD's draw and the key of
        the sub-step bridge (fixed steps, see the module docstring), or the step's key (adaptive
        steps: a ``VirtualBrownianTree``)."""
        if isinstance(noise, NoNoise) or self.stepsize_controller is not None:
            return key
        dtype = ravel_pytree(theta)[0].dtype
        if not self.coupled:  # nothing to pin: the sub-steps draw their own increments
            m = noise.diffusion(objective, theta).in_size()  # traced only for its shape
            return BrownianStep(jnp.zeros((m,), dtype), jax.random.fold_in(key, 1))
        if noise.gaussian_draws:
            xi = ravel_pytree(noise.sample(key, theta))[0]
        else:
            m = noise.diffusion(objective, theta).in_size()
            xi = jax.random.normal(key, (m,), dtype)
        return BrownianStep(jnp.sqrt(self.step_size) * xi, jax.random.fold_in(key, 1))

    def _bridge(self, noise: AbstractNoise, u: BrownianStep):
        r"""``(sub_step(i, remaining) -> (increments_i, remaining'), remaining_0)``: the exact
        sequential Brownian bridge. With $R$ the part of the step's increment not yet used and
        $j = n - i$ sub-steps left, $\Delta W_i = R/j + \sqrt{\delta(j-1)/j}\,z_i$,
        $z_i \sim N(0, I)$ from ``fold_in(key, i)``: the $\Delta W_i$ are i.i.d. $N(0, \delta I)$
        and sum to the step's increment. Lévy areas are independent of them, per sub-step."""
        n = self.n_substeps
        delta = self.step_size / n
        levy = _levy_area(self.solver_for(noise))
        shape, dtype = u.total.shape, u.total.dtype

        def sub_step(i, remaining):
            k_i = jax.random.fold_in(u.key, i)
            # (The barriers keep XLA from fusing the whole normal transform into the solver's
            # update, measured up to 1.7x slower at small m: benchmarks/bench_limits.py.)
            if not self.coupled:
                z = jax.lax.optimization_barrier(jax.random.normal(k_i, shape, dtype))
                W = jnp.sqrt(delta) * z
            elif n == 1:
                W = remaining
            else:
                left = (n - i).astype(dtype)
                z = jax.lax.optimization_barrier(jax.random.normal(k_i, shape, dtype))
                W = remaining / left + jnp.sqrt(delta * (left - 1) / left) * z
            H = K = None
            if levy in (dfx.SpaceTimeLevyArea, dfx.SpaceTimeTimeLevyArea):
                H = jnp.sqrt(delta / 12) * jax.random.normal(
                    jax.random.fold_in(k_i, 1), shape, dtype
                )
            if levy is dfx.SpaceTimeTimeLevyArea:
                K = jnp.sqrt(delta / 720) * jax.random.normal(
                    jax.random.fold_in(k_i, 2), shape, dtype
                )
            return BrownianIncrements(W, H, K), remaining - W

        return sub_step, u.total

    def increments(self, noise: AbstractNoise, u: BrownianStep) -> BrownianIncrements:
        r"""The sub-step increments (and Lévy areas) that [`step`][] uses for the draw ``u``,
        stacked: ``W`` of shape ``(n_substeps, m)``, summing to ``u.total`` when ``coupled``."""
        sub_step, remaining = self._bridge(noise, u)

        def body(rem, i):
            inc, rem = sub_step(i, rem)
            return rem, inc

        return jax.lax.scan(body, remaining, jnp.arange(self.n_substeps))[1]

    def step(
        self,
        objective: AbstractObjective,
        noise: AbstractNoise,
        t: ArrayLike,
        theta: PyTree[Array],
        u: PyTree,
    ) -> PyTree[Array]:
        y0, unravel = ravel_pytree(theta)
        eta = self.step_size
        t0 = jnp.asarray(t, dtype=y0.dtype) * eta
        drift = dfx.ODETerm(_drift(objective, unravel, eta, self.order))
        solver = self.solver_for(noise)
        if isinstance(noise, NoNoise):
            if self.stepsize_controller is not None:
                y1 = _solve_adaptive(
                    drift, solver, self.stepsize_controller, t0, eta, y0, self.max_steps,
                    self.dt, self.adjoint,
                )  # fmt: skip
            else:
                y1 = _solve_fixed(lambda *_: drift, solver, t0, eta, y0, self.n_substeps)
            return unravel(y1)

        scale = -jnp.sqrt(eta)
        # SRK and Milstein solvers vmap / differentiate the diffusion: give them arrays.
        dense = isinstance(solver, dfx.AbstractSRK | dfx.ItoMilstein | dfx.StratonovichMilstein)

        def operator(theta_now):
            return _scaled(noise.diffusion(objective, theta_now), scale, dense)

        if noise.is_additive():  # one operator for the whole step (SRK solvers check this)
            constant = operator(theta)
            vf = lambda t, y, args: constant
        else:
            vf = lambda t, y, args: operator(unravel(y))
        levy = _levy_area(solver)
        if self.stepsize_controller is not None:
            m = operator(theta).in_size()
            bm = dfx.VirtualBrownianTree(
                t0,
                t0 + eta,
                tol=eta / 2**12,
                shape=jax.ShapeDtypeStruct((m,), y0.dtype),
                key=u,
                levy_area=levy,
            )
            terms = dfx.MultiTerm(drift, dfx.ControlTerm(vf, bm))
            y1 = _solve_adaptive(
                terms, solver, self.stepsize_controller, t0, eta, y0, self.max_steps, self.dt,
                self.adjoint,
            )  # fmt: skip
            return unravel(y1)

        def make_terms(ta, tb, inc):
            path = _SubstepPath(ta, tb, inc.W, inc.H, inc.K, levy)
            return dfx.MultiTerm(drift, dfx.ControlTerm(vf, path))

        if isinstance(u, BrownianIncrements):  # given increments (tests, custom paths)
            bridge = (lambda i, c: (jax.tree.map(lambda a: a[i], u), c), None)
        else:
            bridge = self._bridge(noise, u)
        return unravel(_solve_fixed(make_terms, solver, t0, eta, y0, self.n_substeps, bridge))


def _scaled(B: lx.AbstractLinearOperator, s: Array, dense: bool) -> lx.AbstractLinearOperator:
    """``s * B``, keeping a diagonal or dense ``B`` in its own (array) form; any other operator
    is wrapped as a function, or materialised when ``dense``."""
    if isinstance(B, lx.DiagonalLinearOperator):
        return lx.DiagonalLinearOperator(s * B.diagonal)
    if isinstance(B, lx.MatrixLinearOperator):
        return lx.MatrixLinearOperator(s * B.matrix)
    if dense:
        return lx.MatrixLinearOperator(s * B.as_matrix())
    return lx.FunctionLinearOperator(lambda w: s * B.mv(w), B.in_structure())


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


# ------------------------------------------------------------------------------------------
# The neural-ODE limit of residual networks
# ------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------
# Comparing a discrete flow with its limit
# ------------------------------------------------------------------------------------------


class ErrorCurve(NamedTuple):
    """An error between two ensembles at each saved step, with its Monte Carlo uncertainty."""

    steps: np.ndarray
    """The saved steps $k$ (time $k\\eta$)."""
    difference: np.ndarray
    """Weak: $\\mathbb{E}f(\\theta_k) - \\mathbb{E}f(\\Theta_{k\\eta})$; strong:
    $\\mathbb{E}\\|\\theta_k - \\Theta_{k\\eta}\\|$."""
    se: np.ndarray
    """Its standard error."""
    valid: np.ndarray
    """False where a path of either ensemble has diverged by that step: the limit does not
    describe a diverging flow, and these points must not enter an order fit."""

    @property
    def error(self) -> np.ndarray:
        return np.abs(self.difference)


def _values(ens: Ensemble, f) -> np.ndarray:
    if isinstance(f, str):
        v = getattr(ens, f, None)
        if f not in ("energy", "loss") or v is None:
            raise ValueError(
                f"f={f!r}: use 'energy' (needs a known minimiser), 'loss', or a callable of theta."
            )
        return np.asarray(v)
    if ens.theta is None:
        raise ValueError("A callable f needs the trajectories: simulate with save='trajectory'.")
    return np.asarray(jax.vmap(jax.vmap(f))(ens.theta))


def _check_pair(discrete: Ensemble, limit: Ensemble) -> None:
    if not (isinstance(discrete, Ensemble) and isinstance(limit, Ensemble)):
        raise TypeError("Compare two lspsde.Ensemble results (from lspsde.simulate).")
    if np.shape(discrete.steps) != np.shape(limit.steps) or not np.array_equal(
        discrete.steps, limit.steps
    ):
        raise ValueError(
            "The two ensembles are saved at different steps; simulate both with the same "
            "n_steps and save_every (step k of SGD and of its limit are then at time k * eta)."
        )


def weak_error(
    discrete: Ensemble, limit: Ensemble, f="energy", *, paired: bool = True
) -> ErrorCurve:
    r"""$\mathbb{E}f(\theta_k) - \mathbb{E}f(\Theta_{k\eta})$ at every saved step, with its
    standard error, over the paths alive in both ensembles.

    **Arguments:**

    - `discrete`, `limit`: ensembles from ``simulate`` with the same ``n_steps`` and
      ``save_every`` (e.g. ``SGD(eta)`` and ``SGDLimit(eta)``).
    - `f`: ``"energy"`` ($\|\theta - \theta^*\|^2$), ``"loss"``, or a callable of $\theta$.
    - `paired`: the two ensembles were run with the same key and ``n_paths``, so path $p$ of
      each is driven by the same Brownian path (noise models with ``gaussian_draws``). The
      standard error then comes from the per-path differences, typically far smaller than
      that of two independent means. Use ``paired=False`` for independent ensembles.
    """
    _check_pair(discrete, limit)
    a, b = _values(discrete, f), _values(limit, f)
    alive_a, alive_b = np.asarray(discrete.alive()), np.asarray(limit.alive())
    if paired:
        if a.shape[0] != b.shape[0]:
            raise ValueError("paired=True needs the same n_paths in both ensembles.")
        mean, se = map(np.asarray, masked_mean(a - b, alive_a & alive_b))
    else:
        (ma, sa), (mb, sb) = masked_mean(a, alive_a), masked_mean(b, alive_b)
        mean, se = np.asarray(ma - mb), np.sqrt(np.asarray(sa) ** 2 + np.asarray(sb) ** 2)
    valid = alive_a.all(axis=0) & alive_b.all(axis=0)
    return ErrorCurve(np.asarray(discrete.steps), mean, se, valid)


def strong_error(discrete: Ensemble, limit: Ensemble) -> ErrorCurve:
    r"""$\mathbb{E}\|\theta_k - \Theta_{k\eta}\|$ over paths driven by the same noise (same key,
    same ``n_paths``, a noise model with ``gaussian_draws``), with its standard error."""
    _check_pair(discrete, limit)
    if discrete.theta is None or limit.theta is None:
        raise ValueError("The strong error needs trajectories: simulate with save='trajectory'.")
    if discrete.n_paths != limit.n_paths:
        raise ValueError("The strong error pairs paths: use the same n_paths and key in both.")
    diff = jax.tree.map(lambda x, y: np.asarray(x) - np.asarray(y), discrete.theta, limit.theta)
    sq = sum(
        np.sum(leaf.reshape(*leaf.shape[:2], -1) ** 2, axis=-1) for leaf in jax.tree.leaves(diff)
    )
    alive_a, alive_b = np.asarray(discrete.alive()), np.asarray(limit.alive())
    mean, se = map(np.asarray, masked_mean(np.sqrt(sq), alive_a & alive_b))
    valid = alive_a.all(axis=0) & alive_b.all(axis=0)
    return ErrorCurve(np.asarray(discrete.steps), mean, se, valid)


class OrderFit(NamedTuple):
    r"""A fitted convergence order: $|e(h)| \approx C h^p$."""

    order: float
    """$p$ (NaN when fewer than three points qualify)."""
    se: float
    """Its standard error (scaled by the fit's residual scatter)."""
    ci: tuple[float, float]
    """A ``level`` confidence interval for $p$ (Student-t with $n - 2$ degrees of freedom)."""
    constant: float
    """$C$."""
    used: np.ndarray
    """Which points entered the fit."""
    note: str
    """Why points were left out, in words (empty if none was)."""


@functools.lru_cache(maxsize=64)
def _t_quantile(q: float, df: int) -> float:
    r"""The Student-t quantile, by bisection on $F(t) = 1 - \frac12 I_{\nu/(\nu+t^2)}(\nu/2,
    1/2)$ (NumPyro's ``StudentT.icdf`` needs TensorFlow Probability for ``betaincinv``)."""

    def cdf_gap(t, _):
        tail = 0.5 * jax.scipy.special.betainc(df / 2, 0.5, df / (df + t**2))
        return 1.0 - tail - q

    sol = optx.root_find(cdf_gap, optx.Bisection(rtol=1e-10, atol=1e-10), 1.0,
                         options={"lower": 0.0, "upper": 1e4})  # fmt: skip
    return float(sol.value)


def convergence_order(
    h: "ArrayLike | Sequence[float]",
    error: "ArrayLike | Sequence[float]",
    se: "ArrayLike | Sequence[float] | None" = None,
    valid: "ArrayLike | Sequence[bool] | None" = None,
    *,
    level: float = 0.95,
) -> OrderFit:
    r"""Fit $\log|e| = \log C + p\log h$ by weighted least squares.

    Points are left out, and the note says so, where the error is not finite, where ``valid``
    is False (e.g. a diverging discrete flow, or a step past $\eta_{\max}$: the limit does not
    describe it, and fitting through it would be wrong), and where the error is not resolved
    from zero by its Monte Carlo uncertainty ($|e| < 2\,\mathrm{se}$). Weights are the inverse
    variances of $\log|e|$ by the delta method ($\mathrm{se}/|e|$); the order's standard error is
    scaled by the residual scatter, so a pre-asymptotic curve widens the interval instead of
    hiding.
    """
    h, e = np.asarray(h, dtype=float), np.abs(np.asarray(error, dtype=float))
    if h.shape != e.shape or h.ndim != 1:
        raise ValueError(f"`h` and `error` must be 1-D of equal length, got {h.shape}, {e.shape}.")
    if not np.all(h > 0):
        raise ValueError(f"Step sizes `h` must be > 0, got {h}.")
    s = None if se is None else np.asarray(se, dtype=float)
    ok = np.isfinite(e) & (e > 0)
    notes = []
    if valid is not None:
        v = np.asarray(valid, dtype=bool)
        if (~v & ok).any():
            notes.append(
                f"{int((~v & ok).sum())} point(s) where the flow diverged or the limit fails"
            )
        ok &= v
    if s is not None:
        unresolved = ok & ~(e > 2 * s)
        if unresolved.any():
            notes.append(f"{int(unresolved.sum())} point(s) not resolved from Monte Carlo noise")
        ok &= ~unresolved
    if (~np.isfinite(np.asarray(error, dtype=float))).any():
        notes.append("non-finite errors")
    if ok.sum() < 3:
        notes.append(f"only {int(ok.sum())} usable point(s): no order fitted")
        return OrderFit(np.nan, np.nan, (np.nan, np.nan), np.nan, ok, "; ".join(notes))
    x, y = np.log(h[ok]), np.log(e[ok])
    w = None if s is None else e[ok] / np.maximum(s[ok], 1e-300)
    if w is not None:
        w = np.minimum(w, 1e6)  # an exact (zero-se) point should not take all the weight
    (p, c), cov = np.polyfit(x, y, 1, w=w, cov="unscaled" if ok.sum() == 2 else True)
    p_se = float(np.sqrt(cov[0, 0]))
    t = _t_quantile(0.5 + level / 2, int(ok.sum()) - 2)
    ci = (float(p - t * p_se), float(p + t * p_se))
    return OrderFit(float(p), p_se, ci, float(np.exp(c)), ok, "; ".join(notes))
