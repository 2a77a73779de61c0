"""The stochastic modified equation of SGD, coupled to SGD's own draws (see
``lspsde.limits``)."""

import diffrax as dfx
import equinox as eqx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree
import lineax as lx

from .._custom_types import ScalarLike
from ..noise import AbstractNoise, NoNoise
from ..objectives import AbstractObjective
from ..schedules import AbstractSchedule
from ._common import (
    AbstractContinuousLimit,
    _check_ode_solver,
    _drift,
    _lax_stages,
    _settings,
    _solve_adaptive,
    _solve_fixed,
)
from .brownian import BrownianIncrements, BrownianStep, _levy_area, _SubstepPath


class SGDLimit(AbstractContinuousLimit):
    r"""The stochastic modified equation of SGD (Li, Tai & E, 2017), sampled at $t = k\eta$:

    $$d\Theta = -\nabla\mathcal{L}(\Theta)\,dt + \sqrt\eta\,B(\Theta)\,dW, \qquad
    BB^\top = \Sigma(\Theta),$$

    an Itô SDE whose diffusion comes from the noise model (``noise.diffusion``: exact for the
    Gaussian models, the covariance over the whole data set for ``MinibatchNoise`` and
    ``CurvatureNoise``, the Gaussian of equal covariance for ``StudentTNoise`` with $\nu > 2$).
    ``order=2`` adds the drift correction $-\frac\eta2\nabla^2\mathcal{L}\,\nabla\mathcal{L}$.
    Use it wherever ``lspsde.SGD`` is used: ``simulate((objective, SGDLimit(0.1), noise), ...)``
    saves $\Theta$ at $t = k\eta$, beside step $k$ of ``simulate((objective, SGD(0.1), noise),
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
