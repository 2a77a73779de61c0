r"""Variational learning energies and the checks of Assumptions 3–4 and Theorem 6.4 (Section 6).

**Energies** (strategy objects, [`AbstractVariationalEnergy`][]): a proper lower-semicontinuous
$\mathcal{E} \ge 0$ ($+\infty$ allowed off its domain) with the norm $N$ of Assumption 3.

- [`CompositeEnergy`][]: $\Phi = \mathcal{L} + R$ of a proximal / projected flow (Section 6.6),
  $\mathcal{E} = \Phi - \Phi^*$ with $\Phi^* = \Phi(\theta^*)$, $N = \|\theta - \theta^*\|^2$;
  [`composite_minimizer`][] finds $\theta^*$ when no closed form is known.
- [`RepresentationEnergy`][]: $\mathcal{E}_\text{fwd} = \frac12\|X_L\|^2$ of a network's output
  on probe inputs (Section 6.6, piecewise-linear networks), $N = \|X_L\|^2$; along depth
  ([`RepresentationEnergy.depth_trace`][]) or along training.
- [`FunctionEnergy`][]: any $\theta \mapsto \mathcal{E}(\theta)$ a user writes.

**Kernels on trajectories.** [`energy_trace`][] evaluates an energy on an ``Ensemble`` from
``lspsde.simulate`` (``theta`` of shape ``(path, step, ...)``) or on one trajectory (leading
axis ``step``) and returns an [`EnergyTrace`][]: per-point energies, norms, step lengths and a
``valid`` mask (alive, finite). Every check below reads only the valid points: a diverged path's
frozen tail and any NaN are data that never enter a statistic (the path is reported).

- [`coercivity`][]: Assumption 3, $c_1 N \le \mathcal{E} \le c_2 N$: $\hat c_1 = \min
  \mathcal{E}/N$, $\hat c_2 = \max \mathcal{E}/N$ over the visited set.
- [`variational_dissipation`][]: Assumption 4, $\mathcal{E}(S^{t+1}) - \mathcal{E}(S^t) \le
  -\gamma N(S^t) + R$: $\hat\gamma = \min_t (\mathcal{E}_t - \mathcal{E}_{t+1} + R_t)/N_t$.
- [`sufficient_decrease`][]: Section 6.6, $\Phi(\theta^{t+1}) - \Phi(\theta^t) \le
  -c_\eta\|\theta^{t+1} - \theta^t\|^2$, next to the closed form
  [`prox_gradient_decrease`][] $= 1/\eta - L/2$.
- [`variational_stability`][]: Theorem 6.4 both ways on the same run (see its docstring).
- [`mean_trace`][]: the ensemble mean as a one-path trace, to check the inequalities in
  expectation (stochastic flows).

**Resolution.** Ratios are taken only where their denominator is above ``rtol`` times its
running maximum along the path (default ``rtol`` $=\sqrt{\varepsilon}$ of the dtype): below
that the run has converged to rounding and $\mathcal{E}_t - \mathcal{E}_{t+1}$ is noise. A rate
"holds" when it exceeds ``rtol`` times the energy's scale $\hat c_2$ (so a rate that is zero
up to rounding is reported as zero, not as positive).
"""

import abc
from collections.abc import Callable
import math
from typing import Any

import equinox as eqx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree
import numpy as np

from .._checks import check_positive, check_positive_int
from .._simulate import Ensemble, MeanEstimate, masked_mean
from ..objectives import AbstractObjective
from ..representation import AbstractRepresentationFlow
from .flows import AbstractProximalFlow
from .regularizers import AbstractRegularizer

__all__ = [
    "AbstractVariationalEnergy",
    "Coercivity",
    "CompositeEnergy",
    "DissipationCheck",
    "EnergyTrace",
    "FunctionEnergy",
    "ImplicationCheck",
    "RepresentationEnergy",
    "VariationalStability",
    "coercivity",
    "composite_minimizer",
    "energy_trace",
    "mean_trace",
    "prox_gradient_contraction",
    "prox_gradient_decrease",
    "step_signatures",
    "sufficient_decrease",
    "variational_dissipation",
    "variational_stability",
]


def _sq_dist(a: PyTree[Array], b: PyTree[Array] | None) -> Float[Array, ""]:
    """$\\|a - b\\|^2$ over all leaves ($b$ = ``None``: $\\|a\\|^2$)."""
    d = a if b is None else jax.tree.map(jnp.subtract, a, b)
    leaves = jax.tree.leaves(d)
    return sum((jnp.sum(jnp.square(x)) for x in leaves), start=jnp.zeros(()))


def _floats(tree: PyTree[ArrayLike]) -> PyTree[Array]:
    return jax.tree.map(lambda a: jnp.asarray(a, dtype=float), tree)


def _concrete_scalar(name: str, value: Any, who: str) -> Any:
    if isinstance(value, jax.core.Tracer):  # built under jit/vmap: checked where it is used
        return value
    v = np.asarray(value, dtype=float)
    if v.shape != ():
        raise ValueError(f"{who}: `{name}` must be one real number, got shape {v.shape}.")
    if not np.isfinite(v):
        raise ValueError(
            f"{who}: `{name}` = {float(v)} is not finite. Give a minimiser inside the energy's "
            "domain (Phi(theta*) < inf), e.g. a point of the constraint set."
        )
    return float(v)


# --------------------------------------------------------------------------------------------
# Energies. Arguments this module checks itself are annotated ``Any``, so that the message
# that names the value and the fix is the one a user sees (also under the test suite's
# runtime type checking).
# --------------------------------------------------------------------------------------------


class AbstractVariationalEnergy(eqx.Module):
    r"""A variational learning energy (Assumption 3): a proper, lower-semicontinuous
    $\mathcal{E} \ge 0$, $+\infty$ off its domain, and the norm $N$ it is coercive in.

    Subclasses implement [`value`][] (the raw functional, e.g. $\Phi = \mathcal{L} + R$) and
    [`norm_sq`][] ($N$: $\|\theta - \theta^*\|^2$, or $\|X_L\|^2$); [`minimum`][] is the
    offset $\Phi^*$ subtracted by ``__call__`` (0 by default: the paper's literal
    $\mathcal{E} \ge 0$ with $N = \|X_L\|^2 + \|\theta\|^2$ centred at the origin).
    """

    @abc.abstractmethod
    def value(self, theta: PyTree[Array]) -> Float[Array, ""]:
        r"""The raw functional at $\theta$ ($+\infty$ off its domain)."""

    @abc.abstractmethod
    def norm_sq(self, theta: PyTree[Array]) -> Float[Array, ""]:
        r"""$N(\theta)$, the squared norm of Assumption 3."""

    def minimum(self) -> Float[Array, ""]:
        r"""$\Phi^*$, subtracted so that $\mathcal{E} = \Phi - \Phi^* \ge 0$."""
        return jnp.zeros(())

    def __call__(self, theta: PyTree[Array]) -> Float[Array, ""]:
        r"""$\mathcal{E}(\theta) = $ ``value(theta) - minimum()``."""
        return self.value(theta) - self.minimum()

    def check(self, theta: PyTree[Array]) -> None:
        """Check from shapes alone (nothing is compiled) that the energy takes parameters like
        ``theta`` and returns one number."""
        name = type(self).__name__
        try:
            out = eqx.filter_eval_shape(lambda th: (self.value(th), self.norm_sq(th)), theta)
        except Exception as err:
            shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), theta)
            raise ValueError(
                f"{name} cannot be evaluated at parameters {shapes}: {err}\nGive the "
                "trajectory of the parameters this energy was built for (the same pytree "
                "structure and leaf shapes as its minimiser / the objective's theta)."
            ) from err
        for what, o in zip(("value", "norm_sq"), out, strict=True):
            if getattr(o, "shape", None) != ():
                raise ValueError(
                    f"{name}.{what} must return one number per parameter point, got shape "
                    f"{getattr(o, 'shape', type(o).__name__)}; reduce it (e.g. jnp.sum)."
                )


class _ParameterEnergy(AbstractVariationalEnergy):
    r"""An energy of $\theta$ with $N = \|\theta - \theta^*\|^2$ and $\Phi^*$ as fields."""

    reference: eqx.AbstractVar[PyTree[Array] | None]
    offset: eqx.AbstractVar[Float[Array, ""]]

    def norm_sq(self, theta: PyTree[Array]) -> Float[Array, ""]:
        return _sq_dist(theta, self.reference)

    def minimum(self) -> Float[Array, ""]:
        return self.offset


def _reference_and_offset(energy_value, minimizer, minimum, who):
    reference = None if minimizer is None else _floats(minimizer)
    if minimum is not None:
        offset = _concrete_scalar("minimum", minimum, who)
    elif reference is not None:
        offset = _concrete_scalar("value(minimizer)", energy_value(reference), who)
    else:
        offset = 0.0
    return reference, jnp.asarray(offset, dtype=float)


class FunctionEnergy(_ParameterEnergy):
    r"""Any energy $\theta \mapsto \mathcal{E}(\theta)$ a user writes (JAX-traceable, one number,
    $+\infty$ off its domain), with $N = \|\theta - \theta^*\|^2$.

    **Arguments:**

    - `fn`: the functional, ``fn(theta) -> scalar``.
    - `minimizer`: $\theta^*$, the centre of $N$ (default: the origin, the paper's literal
      $N = \|\theta\|^2$).
    - `minimum`: $\Phi^*$ (default: ``fn(minimizer)``, or 0 without a minimiser).

    **Raises:** ``TypeError`` if `fn` is not callable; ``ValueError`` if $\Phi^*$ is not finite
    (a minimiser outside the domain).
    """

    fn: Callable[[PyTree[Array]], Array] = eqx.field(static=True)
    reference: PyTree[Array] | None
    offset: Float[Array, ""]

    def __init__(
        self,
        fn: Any,
        minimizer: PyTree[ArrayLike] | None = None,
        minimum: ArrayLike | None = None,
    ):
        if not callable(fn):
            raise TypeError(
                f"`fn` must be a function theta -> energy, got {type(fn).__name__}. A "
                "regularised objective goes into CompositeEnergy(objective, regularizer)."
            )
        self.fn = fn
        self.reference, self.offset = _reference_and_offset(
            fn, minimizer, minimum, "FunctionEnergy"
        )

    def value(self, theta: PyTree[Array]) -> Float[Array, ""]:
        return jnp.asarray(self.fn(theta), dtype=float)

    def check(self, theta: PyTree[Array]) -> None:
        try:
            out = eqx.filter_eval_shape(self.fn, theta)
        except Exception:
            out = None  # reported, with the parameters' shapes, by the generic check below
        if out is not None and getattr(out, "shape", None) != ():
            raise ValueError(
                "FunctionEnergy.value must return one number per parameter point, but `fn` "
                f"returns {getattr(out, 'shape', type(out).__name__)}; reduce it (e.g. "
                "jnp.sum)."
            )
        super().check(theta)


class CompositeEnergy(_ParameterEnergy):
    r"""$\Phi = \mathcal{L} + R$ (Section 6.6, proximal and projected flows): $\mathcal{E} =
    \Phi - \Phi^*$ with $\Phi^* = \Phi(\theta^*)$ and $N = \|\theta - \theta^*\|^2$; $R$ a
    regulariser or a constraint's indicator ($\Phi = +\infty$ off the set).

    **Arguments:**

    - `objective`: $\mathcal{L}$, an ``lspsde.AbstractObjective``.
    - `regularizer`: $R$ (``L1``, ``L2``, ``ElasticNet``, ``Box``, ``Ball``, ``Simplex``).
    - `minimizer`: $\theta^*$ of $\Phi$ (closed form, or [`composite_minimizer`][]); default
      the origin (the paper's literal norm; then give `minimum` too, or $\Phi^* = 0$).
    - `minimum`: $\Phi^*$ (default $\Phi(\theta^*)$).

    ``CompositeEnergy.of(objective, flow, ...)`` takes $R$ from a proximal flow.

    **Raises:** ``TypeError`` for a wrong objective or regulariser; ``ValueError`` for a
    minimiser outside the domain ($\Phi(\theta^*) = +\infty$).
    """

    objective: AbstractObjective
    regularizer: AbstractRegularizer
    reference: PyTree[Array] | None
    offset: Float[Array, ""]

    def __init__(
        self,
        objective: Any,
        regularizer: Any,
        minimizer: PyTree[ArrayLike] | None = None,
        minimum: ArrayLike | None = None,
    ):
        if not isinstance(objective, AbstractObjective):
            raise TypeError(
                f"`objective` must be an lspsde.AbstractObjective, got {type(objective).__name__}."
            )
        if not isinstance(regularizer, AbstractRegularizer):
            raise TypeError(
                "`regularizer` must be an lspsde regulariser or constraint (L1, L2, ElasticNet, "
                f"Box, Ball, Simplex), got {type(regularizer).__name__}; for any other "
                "functional use FunctionEnergy(fn)."
            )
        self.objective, self.regularizer = objective, regularizer
        if minimizer is not None:
            regularizer.check(_floats(minimizer))
        value = lambda th: objective.loss(th) + regularizer.value(th)
        self.reference, self.offset = _reference_and_offset(
            value, minimizer, minimum, "CompositeEnergy"
        )

    @classmethod
    def of(
        cls,
        objective: AbstractObjective,
        flow: Any,
        minimizer: PyTree[ArrayLike] | None = None,
        minimum: ArrayLike | None = None,
    ) -> "CompositeEnergy":
        r"""The energy $\Phi = \mathcal{L} + R$ of a proximal / projected ``flow``."""
        if not isinstance(flow, AbstractProximalFlow):
            raise TypeError(
                "`flow` must be a proximal or projected flow (ProximalGradient, "
                f"ProjectedGradient), got {type(flow).__name__}."
            )
        return cls(objective, flow.term(), minimizer, minimum)

    def value(self, theta: PyTree[Array]) -> Float[Array, ""]:
        return self.objective.loss(theta) + self.regularizer.value(theta)


class RepresentationEnergy(AbstractVariationalEnergy):
    r"""$\mathcal{E}_\text{fwd} = \frac12\|X_L - X_L'\|^2$ (Section 6.6, piecewise-linear
    networks): half the squared Frobenius norm of the network's output on the probe inputs,
    $X_L = (F_\theta(x_i))_i$, relative to the outputs $X_L'$ on `reference` probes (default
    0). $N = \|X_L - X_L'\|^2$, so Assumption 3 holds with $c_1 = c_2 = \frac12$ in $X_L$ (the
    paper: "coercive in $X_L$", for fixed parameters; it is not coercive in $\theta$).

    With $\|W_k\|_2 \le \rho$ and slopes in $[0, 1]$ each layer is $\rho$-Lipschitz, so along
    depth $\mathcal{E}_{k+1} \le \rho^2\mathcal{E}_k$: Assumption 4 over depth with $\gamma =
    (1 - \rho^2)/2$ and $\mathcal{E}_L \le \rho^{2L}\mathcal{E}_0$ ([`depth_trace`][]). With
    zero biases and no reference this is the decay of $X_k$ itself; with biases, compare two
    probe sets (`reference`).

    **Arguments:**

    - `network`: an ``lspsde.AbstractRepresentationFlow`` (e.g. ``lspsde.Feedforward``); its
      arrays are the default $\theta$ and the template for trajectories (``lspsde.parameters``).
    - `probes`: the inputs $x_i$, shape ``(n, d_0)``.
    - `reference`: optional second inputs $x_i'$, the same shape.

    **Raises:** ``TypeError`` for a network that is not a representation flow; ``ValueError``
    for probes that are not ``(n, d_0)`` or a reference of another shape.
    """

    structure: AbstractRepresentationFlow
    theta: PyTree[Array]
    probes: Float[Array, "n d_in"]
    reference: Float[Array, "n d_in"] | None

    def __init__(
        self,
        network: Any,
        probes: Any,
        reference: Any = None,
    ):
        if not isinstance(network, AbstractRepresentationFlow):
            raise TypeError(
                f"`network` must be a representation flow (lspsde.Feedforward, Residual, "
                f"LayerSequence), got {type(network).__name__}; wrap an Equinox model with "
                "lspsde.from_equinox."
            )
        probes = jnp.asarray(probes, dtype=float)
        if probes.ndim != 2:
            raise ValueError(
                f"`probes` must be a batch of inputs (n, d_0), got shape {probes.shape}; a "
                "single input x is probes=x[None]."
            )
        if reference is not None:
            reference = jnp.asarray(reference, dtype=float)
            if reference.shape != probes.shape:
                raise ValueError(
                    f"`reference` must have the probes' shape {probes.shape}, got "
                    f"{reference.shape}."
                )
        self.structure = eqx.filter(network, eqx.is_inexact_array, inverse=True)
        self.theta = eqx.filter(network, eqx.is_inexact_array)
        self.probes, self.reference = probes, reference

    def _outputs(self, theta: PyTree[Array], which: Callable) -> PyTree[Array]:
        net = eqx.combine(theta, self.structure)
        xs = which(jax.vmap(net.trajectory)(self.probes))
        if self.reference is None:
            return xs
        return jax.tree.map(jnp.subtract, xs, which(jax.vmap(net.trajectory)(self.reference)))

    def norm_sq(self, theta: PyTree[Array]) -> Float[Array, ""]:
        return _sq_dist(self._outputs(theta, lambda xs: xs[-1]), None)

    def value(self, theta: PyTree[Array]) -> Float[Array, ""]:
        return 0.5 * self.norm_sq(theta)

    def depth_trace(self, theta: PyTree[Array] | None = None) -> "EnergyTrace":
        r"""The energy along depth, $\mathcal{E}_k = \frac12\|X_k - X_k'\|^2$ for $k = 0..L$
        (one "path", axis ``layer``), at parameters $\theta$ (default: the network's own)."""
        theta = self.theta if theta is None else theta
        self.check(theta)
        xs = eqx.filter_jit(self._outputs)(theta, lambda xs: xs)
        n = np.asarray([float(_sq_dist(x, None)) for x in xs])[None]
        return EnergyTrace(
            energy=jnp.asarray(0.5 * n),
            norm_sq=jnp.asarray(n),
            step_sq=None,
            valid=jnp.asarray(np.isfinite(n)),
            diverged=jnp.zeros(1, dtype=bool),
            steps=jnp.arange(n.shape[1]),
            axis="layer",
        )


def composite_minimizer(
    objective: AbstractObjective,
    regularizer: AbstractRegularizer,
    theta0: PyTree[ArrayLike],
    *,
    step_size: float | None = None,
    max_steps: int = 100_000,
    tol: float = 1e-13,
) -> PyTree[Array]:
    r"""$\theta^* = \arg\min \mathcal{L} + R$ by exact proximal gradient (ISTA) from $\theta^0$,
    $\theta^{t+1} = \operatorname{prox}_{\eta R}(\theta^t - \eta\nabla\mathcal{L}(\theta^t))$,
    until $\|\theta^{t+1} - \theta^t\| \le$ ``tol`` $\cdot(1 + \|\theta^t\|)$.

    **Arguments:** `step_size` $\eta$ (default $1/L$ from ``objective.smoothness()``; needed
    when $L$ is unknown), `max_steps`, `tol`.

    **Raises:** ``ValueError`` when $\eta$ is not given and $L$ unknown, for a bad `tol`, or
    when the iteration has not converged within `max_steps` (raise it, or check $\eta \le 1/L$).
    """
    if step_size is None:
        L = objective.smoothness()
        if L is None:
            raise ValueError(
                f"{type(objective).__name__} does not know its smoothness L: pass "
                "`step_size` (any eta <= 1/L converges)."
            )
        step_size = 1.0 / float(L)
    check_positive("step_size", step_size, fix="Use eta in (0, 1/L].")
    check_positive("tol", tol, fix="Use a small tol > 0, e.g. 1e-13.")
    max_steps = check_positive_int("max_steps", max_steps)
    theta0 = _floats(theta0)
    regularizer.check(theta0)
    eta = jnp.asarray(step_size, dtype=float)

    def step(th):
        g = objective.gradient(th)
        return regularizer.prox(jax.tree.map(lambda p, q: p - eta * q, th, g), eta)

    def cond(carry):
        _, delta, scale, k = carry
        return (delta > tol * (1.0 + scale)) & (k < max_steps)

    def body(carry):
        th, _, _, k = carry
        new = step(th)
        return new, jnp.sqrt(_sq_dist(new, th)), jnp.sqrt(_sq_dist(th, None)), k + 1

    run = eqx.filter_jit(lambda th: jax.lax.while_loop(cond, body, (th, jnp.inf, 0.0, 0)))
    theta, delta, scale, _ = run(theta0)
    if not float(delta) <= tol * (1.0 + float(scale)):
        raise ValueError(
            f"composite_minimizer did not converge in max_steps={max_steps} (last step "
            f"{float(delta):.3g} > tol = {tol:g}); raise `max_steps`, or check that "
            f"step_size={float(step_size):g} <= 1/L."
        )
    return theta


# --------------------------------------------------------------------------------------------
# Energies along trajectories
# --------------------------------------------------------------------------------------------


class EnergyTrace(eqx.Module):
    r"""An energy along trajectories: dims ``(path, step)`` (``(1, layer)`` along depth).

    - `energy`: $\mathcal{E} = \Phi - \Phi^*$ at each saved point ($+\infty$ off the domain).
    - `norm_sq`: $N$ (Assumption 3) at each point.
    - `step_sq`: $\|\theta^{t+1} - \theta^t\|^2$ between saved points, ``(path, step - 1)``
      (``None`` along depth).
    - `valid`: the point is data: the path is alive there (not diverged: a diverged path's
      frozen tail is masked) and $\theta$, $\mathcal{E}$ and $N$ are not NaN.
    - `diverged`: per path; `steps`: the saved step (or layer) numbers; `axis`: ``"step"`` or
      ``"layer"``.
    """

    energy: Float[Array, "path step"]
    norm_sq: Float[Array, "path step"]
    step_sq: Float[Array, "path step_1"] | None
    valid: Bool[Array, "path step"]
    diverged: Bool[Array, " path"]
    steps: Int[Array, " step"]
    axis: str = eqx.field(static=True, default="step")

    @property
    def n_paths(self) -> int:
        return self.energy.shape[0]

    def mean(self) -> MeanEstimate:
        r"""$\mathbb{E}\,\mathcal{E}$ at each step over the paths whose point is valid and in
        the domain there (``lspsde``'s ``masked_mean``: masked values never enter), its
        standard error and the fraction of paths left out."""
        use = self.valid & jnp.isfinite(self.energy)
        mean, sem = masked_mean(self.energy[None], use[None])
        return MeanEstimate(mean[0], sem[0], 1.0 - jnp.mean(use, axis=0))

    def to_datatree(self, attrs: dict | None = None):
        """The trace as an ``xarray.DataTree`` (dims ``path`` and ``step``/``layer``)."""
        import arviz_base

        data = {
            "energy": {
                "energy": np.asarray(self.energy),
                "norm_sq": np.asarray(self.norm_sq),
                "valid": np.asarray(self.valid),
            },
            "status": {"diverged": np.asarray(self.diverged)},
        }
        dims = {k: [self.axis] for k in ("energy", "norm_sq", "valid")}
        if self.step_sq is not None:
            data["energy"]["step_sq"] = np.concatenate(
                [np.asarray(self.step_sq), np.full((self.n_paths, 1), np.nan)], axis=1
            )
            dims["step_sq"] = [self.axis]
        return arviz_base.from_dict(
            data,
            sample_dims=["path"],
            dims={**dims, "diverged": []},
            coords={self.axis: np.asarray(self.steps)},
            attrs={"/": {"created_by": "lspsde.nonsmooth.energy_trace", **(attrs or {})}},
        )


def _as_paths(trajectory: Any, steps: Any, who: str):
    """``(thetas with leading (path, step) axes, alive (path, step), steps, diverged)``."""
    if isinstance(trajectory, Ensemble):
        if trajectory.grid is not None:
            raise ValueError(
                f"{who} takes the ensemble of one flow; this one is a sweep over "
                f"`{trajectory.grid_name}` ({len(trajectory.grid)} points): pass "
                "`ensemble.at(g)` for each grid point g."
            )
        if trajectory.theta is None:
            raise ValueError(
                f"{who} needs the parameters at the saved steps, but this ensemble was run "
                'with save="summary" (theta is None): simulate with save="trajectory".'
            )
        if steps is not None:
            raise ValueError("`steps` is taken from the Ensemble; do not pass it.")
        return (
            trajectory.theta,
            np.asarray(trajectory.alive()),
            np.asarray(trajectory.steps),
            np.asarray(trajectory.diverged),
        )
    leaves = jax.tree.leaves(trajectory)
    if not leaves or not all(hasattr(a, "shape") and np.ndim(a) >= 1 for a in leaves):
        raise TypeError(
            f"{who} takes an lspsde Ensemble or one trajectory: a pytree of arrays with a "
            f"leading step axis (e.g. from lspsde.parameter_trajectory), got "
            f"{type(trajectory).__name__}."
        )
    lengths = {np.shape(a)[0] for a in leaves}
    if len(lengths) != 1:
        raise ValueError(
            "The leaves of the trajectory have different leading (step) lengths "
            f"{sorted(lengths)}; every leaf must be stacked over the same steps."
        )
    (S,) = lengths
    if not all(jnp.issubdtype(jnp.result_type(a), jnp.floating) for a in leaves):
        raise TypeError("The trajectory must hold real floating-point arrays.")
    if steps is None:
        steps = np.arange(S)
    steps = np.asarray(steps)
    if steps.shape != (S,) or not np.all(np.diff(steps) > 0):
        raise ValueError(
            f"`steps` must be {S} increasing step numbers (one per point), got shape {steps.shape}."
        )
    thetas = jax.tree.map(lambda a: jnp.asarray(a)[None], trajectory)
    return thetas, np.ones((1, S), bool), steps, np.zeros(1, bool)


@eqx.filter_jit
def _evaluate(energy: AbstractVariationalEnergy, thetas: PyTree[Array]):
    def point(th):
        leaves = jax.tree.leaves(th)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves]))
        return energy.value(th), energy.norm_sq(th), finite

    value, norm, finite = jax.vmap(jax.vmap(point))(thetas)
    diffs = jax.tree.map(lambda a: a[:, 1:] - a[:, :-1], thetas)
    step_sq = sum(
        (jnp.sum(jnp.square(a), axis=tuple(range(2, a.ndim))) for a in jax.tree.leaves(diffs)),
        start=jnp.zeros(value[:, 1:].shape),
    )
    return value - energy.minimum(), norm, finite, step_sq


def energy_trace(
    energy: Any,
    trajectory: Any,
    *,
    steps: Any = None,
) -> EnergyTrace:
    r"""Evaluate `energy` along an ensemble or one trajectory.

    **Arguments:**

    - `energy`: an [`AbstractVariationalEnergy`][].
    - `trajectory`: an ``lspsde.Ensemble`` (``save="trajectory"``, no sweep: use
      ``ensemble.at(g)``), whose ``alive()`` mask marks the diverged paths' frozen tails; or
      one trajectory, a pytree of arrays with a leading step axis (``parameter_trajectory``).
    - `steps`: the step numbers of a single trajectory's points (default ``0, 1, ...``).

    **Returns:** an [`EnergyTrace`][]. **Raises:** ``TypeError``/``ValueError`` before anything
    is compiled for a wrong energy or trajectory, or parameters the energy does not take.
    """
    if not isinstance(energy, AbstractVariationalEnergy):
        raise TypeError(
            "`energy` must be a variational energy (CompositeEnergy, RepresentationEnergy, or "
            f"FunctionEnergy(fn) for a function theta -> energy), got {type(energy).__name__}."
        )
    thetas, alive, steps, diverged = _as_paths(trajectory, steps, "energy_trace")
    energy.check(jax.tree.map(lambda a: a[0, 0], thetas))
    e, n, finite, step_sq = (np.asarray(x) for x in _evaluate(energy, thetas))
    valid = alive & finite & ~np.isnan(e) & (e != -np.inf) & ~np.isnan(n)
    return EnergyTrace(
        energy=jnp.asarray(e),
        norm_sq=jnp.asarray(n),
        step_sq=jnp.asarray(step_sq),
        valid=jnp.asarray(valid),
        diverged=jnp.asarray(diverged),
        steps=jnp.asarray(steps),
        axis="step",
    )


def mean_trace(trace: Any) -> EnergyTrace:
    r"""The ensemble mean as a one-path trace: $\mathbb{E}\,\mathcal{E}_t$, $\mathbb{E}\,N_t$
    and $\mathbb{E}\|\theta^{t+1} - \theta^t\|^2$ over the paths valid (and in the domain)
    at each step (``masked_mean``: a diverged path's frozen tail and NaN never enter).

    The checks then test the inequalities *in expectation*, e.g. Assumption 4 for stochastic
    flows, $\mathbb{E}\mathcal{E}_{t+1} - \mathbb{E}\mathcal{E}_t \le -\gamma\,\mathbb{E}N_t
    + R$ with $R$ the noise's contribution. Paths that diverge leave the mean from their
    divergence on (a survivor mean, as ``Ensemble.mean_energy``).
    """
    trace = _check_trace(trace, "mean_trace")
    use = trace.valid & jnp.isfinite(trace.energy)
    e, _ = masked_mean(trace.energy[None], use[None])
    n, _ = masked_mean(trace.norm_sq[None], use[None])
    step_sq = None
    if trace.step_sq is not None:
        both = use[:, 1:] & use[:, :-1]
        step_sq = masked_mean(trace.step_sq[None], both[None])[0]
    return EnergyTrace(
        energy=e,
        norm_sq=n,
        step_sq=step_sq,
        valid=jnp.isfinite(e) & jnp.isfinite(n),
        diverged=jnp.zeros(1, dtype=bool),
        steps=trace.steps,
        axis=trace.axis,
    )


def step_signatures(
    objective: AbstractObjective,
    flow: Any,
    trajectory: Any,
    *,
    steps: Any = None,
) -> Float[Array, "path step"]:
    r"""$\sigma^\theta_t = \|\partial_\theta\mathcal{A}_t(\theta^t)\|_2$ at every saved point:
    the spectral norm of the dense Jacobian of one exact-gradient step $\theta \mapsto$
    ``flow(t, theta, objective.gradient(theta))`` (additive noise does not change it).

    This is the element of the Clarke generalised Jacobian that JAX picks; it equals
    $\sigma^{\theta,C}_t$ (Definition 6.1) wherever the step is differentiable (Lemma A.1: a
    visited point sits on a kink with probability 0 for a continuous start or noise). At a
    kink use ``lspsde.generalized_jacobian_norm`` for the supremum. Dense: for small
    parameter counts (``lspsde.learning_profile`` is matrix-free).

    **Raises:** ``TypeError`` for a flow that carries optimiser state (its Jacobian is not
    $\partial_\theta\mathcal{A}$ alone), or a bad trajectory (as [`energy_trace`][]).
    """
    thetas, alive, steps, _ = _as_paths(trajectory, steps, "step_signatures")
    th0 = jax.tree.map(lambda a: a[0, 0], thetas)
    carried = eqx.filter_eval_shape(flow.init, th0)
    if jax.tree.structure(carried) != jax.tree.structure(th0):
        raise TypeError(
            f"{type(flow).__name__} carries optimiser state beside theta; step_signatures "
            "differentiates theta -> A_t(theta) of a flow without state (proximal, projected, "
            "SGD). Use lspsde.learning_profile for stateful flows."
        )

    @eqx.filter_jit
    def run(thetas, ts):
        def sigma(th, t):
            flat, unravel = ravel_pytree(th)
            step = lambda v: ravel_pytree(flow(t, unravel(v), objective.gradient(unravel(v))))[0]
            return jnp.linalg.norm(jax.jacobian(step)(flat), 2)

        return jax.vmap(jax.vmap(sigma, in_axes=(0, 0)), in_axes=(0, None))(thetas, ts)

    out = np.asarray(run(thetas, jnp.asarray(steps)))
    return jnp.asarray(np.where(alive, out, np.nan))


# --------------------------------------------------------------------------------------------
# Kernels (host side, NumPy: masks and ratios)
# --------------------------------------------------------------------------------------------


def _rtol(trace: EnergyTrace, rtol: float | None) -> float:
    if rtol is None:
        return float(np.sqrt(np.finfo(np.asarray(trace.energy).dtype).eps))
    if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not 0 < rtol < 1:
        raise ValueError(
            f"`rtol` must be a number in (0, 1), got {rtol!r}; it is the relative resolution "
            "of the run (default sqrt(eps) of the dtype)."
        )
    return float(rtol)


def _check_trace(trace: Any, who: str) -> EnergyTrace:
    if not isinstance(trace, EnergyTrace):
        raise TypeError(
            f"{who} takes an EnergyTrace (from energy_trace(energy, ensemble) or "
            f"RepresentationEnergy.depth_trace()), got {type(trace).__name__}."
        )
    return trace


def _resolved(den: np.ndarray, mask: np.ndarray, rtol: float) -> np.ndarray:
    """Where ``den`` is positive and above ``rtol`` times its running maximum along the path
    (over the masked-in entries): a ratio with that denominator is not rounding noise."""
    d = np.where(mask & np.isfinite(den), den, 0.0)
    return mask & (d > 0) & (d > rtol * np.maximum.accumulate(d, axis=1))


def _min_max(ratio: np.ndarray, use: np.ndarray, fn) -> tuple[float, np.ndarray]:
    r = np.where(use, ratio, np.nan)
    with np.errstate(all="ignore"):
        per = np.asarray([fn(row[u]) if u.any() else np.nan for row, u in zip(r, use, strict=True)])
        pooled = float(fn(r[use])) if use.any() else math.nan
    return pooled, per


def _energy_scale(trace: EnergyTrace, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """The ratios E/N and where they count (valid, in the domain, N resolved)."""
    e, n = np.asarray(trace.energy), np.asarray(trace.norm_sq)
    inside = np.asarray(trace.valid) & np.isfinite(e)
    use = _resolved(n, inside, rtol)
    with np.errstate(all="ignore"):
        return e / n, use


def _scale(trace: EnergyTrace, rtol: float) -> float:
    ratio, use = _energy_scale(trace, rtol)
    s = float(np.max(np.abs(ratio[use]))) if use.any() else math.nan
    return s if math.isfinite(s) and s > 0 else 1.0


def _remainder(remainder: Any, shape: tuple[int, int]) -> np.ndarray:
    r = np.asarray(remainder, dtype=float)
    try:
        return np.broadcast_to(r, shape)
    except ValueError:
        raise ValueError(
            f"`remainder` R must be one number or broadcast to the steps (path, step - 1) = "
            f"{shape}, got shape {r.shape}."
        ) from None


def _check_unit_spacing(trace: EnergyTrace, who: str) -> None:
    gaps = np.diff(np.asarray(trace.steps))
    if trace.axis == "step" and gaps.size and not np.all(gaps == 1):
        raise ValueError(
            f"{who} is a one-step inequality, but the trace was saved every "
            f"{int(gaps.max())} steps: simulate with save_every=1."
        )
    if trace.energy.shape[1] < 2:
        raise ValueError(f"{who} needs at least two points per path, got one.")


# --------------------------------------------------------------------------------------------
# Assumption 3: coercivity
# --------------------------------------------------------------------------------------------


class Coercivity(eqx.Module):
    r"""Assumption 3 on the visited set: $\hat c_1 = \min \mathcal{E}/N$, $\hat c_2 = \max
    \mathcal{E}/N$ over the valid points in the domain with $N$ resolved.

    - `c1`, `c2`: pooled over paths; `c1_path`, `c2_path`: per path (NaN: no point counted).
    - `holds`: $\hat c_1 > 0$ (beyond ``rtol`` $\hat c_2$) and $\hat c_2 < \infty$, i.e.
      $0 < c_1 \le c_2 < \infty$ on the visited set; `holds_path` per path (a property of
      the energy on the points visited, so a diverged path's points before it diverged
      count).
    - `n_points`: points counted; `n_outside_domain`: valid points with
      $\mathcal{E} = +\infty$ (not admissible, e.g. a start outside a constraint set);
      `n_masked`: points left out as not valid (diverged tails, NaN).
    """

    c1: Float[Array, ""]
    c2: Float[Array, ""]
    c1_path: Float[Array, " path"]
    c2_path: Float[Array, " path"]
    holds: Bool[Array, ""]
    holds_path: Bool[Array, " path"]
    n_points: Int[Array, ""]
    n_outside_domain: Int[Array, ""]
    n_masked: Int[Array, ""]


def coercivity(trace: Any, *, rtol: Any = None) -> Coercivity:
    r"""Estimate the constants of Assumption 3, $c_1 N \le \mathcal{E} \le c_2 N$
    ($N = \|X_L\|^2 + \|\theta\|^2$ in the paper, centred at $\theta^*$ here when the energy
    has a minimiser), from the points an ensemble visited.

    **Raises:** ``TypeError`` for something that is not an [`EnergyTrace`][]; ``ValueError``
    for a bad ``rtol``.
    """
    trace = _check_trace(trace, "coercivity")
    rtol = _rtol(trace, rtol)
    ratio, use = _energy_scale(trace, rtol)
    c1, c1p = _min_max(ratio, use, np.min)
    c2, c2p = _min_max(ratio, use, np.max)
    ok = lambda a, b: (a > rtol * np.abs(b)) & np.isfinite(b)
    valid = np.asarray(trace.valid)
    e = np.asarray(trace.energy)
    return Coercivity(
        c1=jnp.asarray(c1),
        c2=jnp.asarray(c2),
        c1_path=jnp.asarray(c1p),
        c2_path=jnp.asarray(c2p),
        holds=jnp.asarray(bool(ok(c1, c2))),
        holds_path=jnp.asarray(ok(c1p, c2p)),
        n_points=jnp.asarray(int(use.sum())),
        n_outside_domain=jnp.asarray(int((valid & (e == np.inf)).sum())),
        n_masked=jnp.asarray(int((~valid).sum())),
    )


# --------------------------------------------------------------------------------------------
# Assumption 4 and the sufficient decrease of Section 6.6
# --------------------------------------------------------------------------------------------


class DissipationCheck(eqx.Module):
    r"""A one-step dissipation inequality $\mathcal{E}_{t+1} - \mathcal{E}_t \le -\kappa\,D_t +
    R_t$ checked along trajectories ($D_t = N(S^t)$ for Assumption 4, $D_t =
    \|\theta^{t+1} - \theta^t\|^2$ for the sufficient decrease of Section 6.6).

    - `rate`: $\hat\kappa = \min_{p,t} (\mathcal{E}_t - \mathcal{E}_{t+1} + R_t)/D_t$ over the
      counted steps (both ends valid, the start in the domain, $D_t$ resolved); `rate_path`
      per path (NaN: no step counted).
    - `holds`: $\hat\kappa > 0$ (beyond ``rtol`` times the energy scale) and no path diverged;
      `holds_path` per path (a diverged path does not hold).
    - `predicted`: the closed form it is compared with (NaN if none); `bound_holds`:
      $\hat\kappa \ge$ `predicted` up to the resolution (``None`` if none).
    - `violating_fraction`: the share of counted steps whose ratio is below `predicted` (or,
      without one, not positive).
    - `n_steps_used`, `n_paths_used`, `diverged_fraction`; `form` names the inequality.
    """

    rate: Float[Array, ""]
    rate_path: Float[Array, " path"]
    holds: Bool[Array, ""]
    holds_path: Bool[Array, " path"]
    predicted: Float[Array, ""]
    bound_holds: Bool[Array, ""] | None
    violating_fraction: Float[Array, ""]
    n_steps_used: Int[Array, ""]
    n_paths_used: Int[Array, ""]
    diverged_fraction: Float[Array, ""]
    form: str = eqx.field(static=True)


def _dissipation(trace, den, remainder, predicted, rtol, form) -> DissipationCheck:
    rtol = _rtol(trace, rtol)
    e = np.asarray(trace.energy)
    valid = np.asarray(trace.valid)
    both = valid[:, :-1] & valid[:, 1:]
    start_inside = np.isfinite(e[:, :-1])
    R = _remainder(remainder, both.shape)
    with np.errstate(all="ignore"):
        num = e[:, :-1] - e[:, 1:] + R
    use = _resolved(den, both & start_inside, rtol) & ~np.isnan(num)
    with np.errstate(all="ignore"):
        ratio = num / den
    rate, rate_path = _min_max(ratio, use, np.min)
    tol = rtol * _scale(trace, rtol)
    diverged = np.asarray(trace.diverged)
    pred = math.nan if predicted is None else float(np.asarray(predicted, dtype=float))
    r = ratio[use]
    threshold = pred - tol * max(1.0, abs(pred)) if predicted is not None else tol
    frac = float(np.mean(r < threshold)) if r.size else math.nan
    return DissipationCheck(
        rate=jnp.asarray(rate),
        rate_path=jnp.asarray(rate_path),
        holds=jnp.asarray(bool(rate > tol) and not diverged.any()),
        holds_path=jnp.asarray((rate_path > tol) & ~diverged),
        predicted=jnp.asarray(pred),
        bound_holds=None
        if predicted is None
        else jnp.asarray(bool(rate >= pred - tol * max(1.0, abs(pred)))),
        violating_fraction=jnp.asarray(frac),
        n_steps_used=jnp.asarray(int(use.sum())),
        n_paths_used=jnp.asarray(int(use.any(axis=1).sum())),
        diverged_fraction=jnp.asarray(float(diverged.mean())),
        form=form,
    )


def variational_dissipation(
    trace: Any,
    *,
    remainder: Any = 0.0,
    predicted: float | ArrayLike | None = None,
    rtol: Any = None,
) -> DissipationCheck:
    r"""Assumption 4 along trajectories: the largest $\gamma$ with

    $$\mathcal{E}(S^{t+1}) - \mathcal{E}(S^t) \le -\gamma\,(\|X_L^t\|^2 + \|\theta^t\|^2) +
    R(S^t; \delta x, \delta\theta^0, \delta u)$$

    on every counted step ($N$ is the energy's norm: centred at $\theta^*$ when it has one).
    $R$ (the perturbation remainder, 0 for unperturbed runs) is one number or an array
    broadcast to ``(path, step - 1)``; `predicted` a closed-form $\gamma$ to compare with.
    ``lspsde.dissipation_rate`` is the same pooled rate for whole valid paths; this one masks
    step by step, so a diverged path's steps before it diverged still count.

    **Raises:** ``ValueError`` for a trace not saved at every step, a `remainder` of the wrong
    shape or a bad ``rtol``.
    """
    trace = _check_trace(trace, "variational_dissipation")
    _check_unit_spacing(trace, "Assumption 4")
    n = np.asarray(trace.norm_sq)[:, :-1]
    return _dissipation(trace, n, remainder, predicted, rtol, "Assumption 4")


def sufficient_decrease(
    trace: Any,
    *,
    predicted: float | ArrayLike | None = None,
    rtol: Any = None,
) -> DissipationCheck:
    r"""The proximal-gradient dissipation of Section 6.6: the largest $c_\eta$ with

    $$\Phi(\theta^{t+1}) - \Phi(\theta^t) \le -c_\eta\,\|\theta^{t+1} - \theta^t\|^2$$

    on every counted step; `predicted`: the closed form, e.g. ``prox_gradient_decrease(eta,
    L)`` $= 1/\eta - L/2$ (exact gradients, convex $R$).

    **Raises:** ``ValueError`` for a trace without step lengths (along depth) or not saved at
    every step.
    """
    trace = _check_trace(trace, "sufficient_decrease")
    if trace.step_sq is None:
        raise ValueError(
            "This trace has no step lengths ||theta^{t+1} - theta^t||^2 (a depth trace): the "
            "sufficient decrease is a statement about parameter steps; use "
            "variational_dissipation."
        )
    _check_unit_spacing(trace, "The sufficient decrease")
    return _dissipation(
        trace, np.asarray(trace.step_sq), 0.0, predicted, rtol, "sufficient decrease"
    )


def prox_gradient_decrease(
    step_size: float | ArrayLike, smoothness: float | ArrayLike
) -> Float[Array, "..."]:
    r"""$c_\eta = 1/\eta - L/2$: $\Phi(\theta^+) \le \Phi(\theta) - c_\eta\|\theta^+ -
    \theta\|^2$ for $\theta^+ = \operatorname{prox}_{\eta R}(\theta - \eta\nabla\mathcal{L})$,
    $\mathcal{L}$ with $L$-Lipschitz gradient and $R$ convex (descent lemma plus the
    $1/\eta$-strong convexity of the prox subproblem). Positive iff $\eta < 2/L$; attained on
    steps where $\mathcal{L} + R$ is a quadratic of curvature $L$ in every moving direction
    (e.g. the lasso on an orthogonal design, once the signs are fixed).

    **Raises:** ``ValueError`` for $\eta \le 0$ or $L < 0$.
    """
    check_positive("step_size", step_size, fix="The step size eta must be > 0.")
    check_positive("smoothness", smoothness, allow_zero=True, fix="L is a Lipschitz constant.")
    return 1.0 / jnp.asarray(step_size, float) - 0.5 * jnp.asarray(smoothness, float)


def prox_gradient_contraction(
    step_size: float | ArrayLike, mu: float | ArrayLike, smoothness: float | ArrayLike
) -> Float[Array, "..."]:
    r"""$q = \max(|1 - \eta\mu|, |1 - \eta L|)$: the Lipschitz constant of the proximal /
    projected gradient step on a $\mu$-strongly convex $\mathcal{L}$ with $L$-Lipschitz
    gradient (the gradient step is $q$-Lipschitz, the prox non-expansive), so
    $\sigma^{\theta,C}_t \le q$ and $\|\theta^t - \theta^*\| \le q^t\|\theta^0 - \theta^*\|$.

    **Raises:** ``ValueError`` for $\eta \le 0$ or $\mu > L$.
    """
    check_positive("step_size", step_size, fix="The step size eta must be > 0.")
    check_positive("mu", mu, allow_zero=True, fix="mu is a strong-convexity modulus.")
    check_positive("smoothness", smoothness, allow_zero=True, fix="L is a Lipschitz constant.")
    if np.any(np.asarray(mu, float) > np.asarray(smoothness, float)):
        raise ValueError(f"`mu` = {mu} exceeds the smoothness L = {smoothness}: need mu <= L.")
    eta = jnp.asarray(step_size, float)
    return jnp.maximum(jnp.abs(1 - eta * jnp.asarray(mu, float)), jnp.abs(1 - eta * smoothness))


# --------------------------------------------------------------------------------------------
# Theorem 6.4
# --------------------------------------------------------------------------------------------


class ImplicationCheck(eqx.Module):
    r"""One direction of Theorem 6.4 on a run: `holds` $=$ not `premise` or `conclusion`.

    `predicted` is what the premise's constants predict, `measured` the run's number (their
    meaning is in `statement`); NaN where not available (e.g. no signatures given).
    """

    premise: Bool[Array, ""]
    conclusion: Bool[Array, ""]
    holds: Bool[Array, ""]
    predicted: Float[Array, ""]
    measured: Float[Array, ""]
    statement: str = eqx.field(static=True)


def _implication(premise, conclusion, predicted, measured, statement) -> ImplicationCheck:
    premise, conclusion = bool(premise), bool(conclusion)
    return ImplicationCheck(
        premise=jnp.asarray(premise),
        conclusion=jnp.asarray(conclusion),
        holds=jnp.asarray((not premise) or conclusion),
        predicted=jnp.asarray(float(predicted)),
        measured=jnp.asarray(float(measured)),
        statement=statement,
    )


class VariationalStability(eqx.Module):
    r"""Theorem 6.4 checked on one set of runs (see [`variational_stability`][]).

    Statement (2), the energy: `coercivity` (Assumption 3), `dissipation` (Assumption 4),
    `statement_2` (both hold on the visited set).

    Statement (1), the generalised signatures $\sigma^{\theta,C}_t$ (from `signatures`; NaN
    without): `sigma_sup` $= \sup_t\sigma_t$ (the $C_\theta$ of the theorem),
    `alpha_sup` $= \frac1T\log\max(1, \sup_t\sigma_t)$ (Definition 6.2 at the horizon, as
    written), `alpha_growth` $= \max_p \frac1T\sum_t\log\sigma_t$ (the bound on the growth
    rate of the cumulative generalised sensitivity $\|\partial\theta^T/\partial\theta^0\|$,
    by the chain rule). `statement_1`: `alpha_growth` $\le 0$ (the sensitivities stay bounded
    for every horizon); `statement_1_strict`: $< 0$; `statement_1_literal`: the theorem's
    wording, "$\sigma_t \le C_\theta$ for some $C_\theta \ge 1$", which every finite run of a
    Lipschitz flow satisfies.

    `decay_rate`: the run's energy decay, $\min_t \log(\mathcal{E}_t/\mathcal{E}_{t+1})$.

    Checks: `energy_implies_decay` ((2) ⇒ exponential stability), `energy_implies_exponent`
    ((2) ⇒ (1), quantitative), `stability_implies_energy` ((1) ⇒ (2), by a converse Lyapunov
    energy built from the run).
    """

    coercivity: Coercivity
    dissipation: DissipationCheck
    statement_2: Bool[Array, ""]
    sigma_sup: Float[Array, ""]
    alpha_sup: Float[Array, ""]
    alpha_growth: Float[Array, ""]
    statement_1: Bool[Array, ""] | None
    statement_1_strict: Bool[Array, ""] | None
    statement_1_literal: Bool[Array, ""] | None
    decay_rate: Float[Array, ""]
    energy_implies_decay: ImplicationCheck
    energy_implies_exponent: ImplicationCheck
    stability_implies_energy: ImplicationCheck


def _signatures(signatures: Any, trace: EnergyTrace) -> np.ndarray | None:
    if signatures is None:
        return None
    s = np.array(signatures, dtype=float)
    P, S = trace.energy.shape
    if s.ndim == 1:
        s = s[None]
    if s.shape == (P, S):
        s = s[:, :-1]
    if s.shape != (P, S - 1):
        raise ValueError(
            f"`signatures` must hold sigma_t at each point or each step of the trace: shape "
            f"(path, step) = {(P, S)} or {(P, S - 1)} (one path: a vector), got "
            f"{np.shape(signatures)}."
        )
    if np.any(s[np.isfinite(s)] < 0):
        raise ValueError("`signatures` are operator norms: they must be >= 0.")
    return s


def _zero_below(s: np.ndarray, rtol: float) -> np.ndarray:
    """An operator norm of a step map (scale 1, the identity's) below ``rtol`` is 0 up to
    rounding: set it to 0 (its log is then -inf, the exact convergence it stands for)."""
    return np.where(s < rtol, 0.0, s)


def _lyapunov_sum(n: np.ndarray, use: np.ndarray, sig: np.ndarray | None, rtol: float):
    """Per path, over its first run of counted points t = 0..T': V_t = sum_{s>=t} N_s plus
    a geometric tail at the largest one-step ratio r of the last half; the constants of V
    (c1, c2, gamma) and the signature prediction of c2 (recursion pred_t = 1 + s_t^2
    pred_{t+1}, tail at the largest sigma^2 of the last half)."""
    P = n.shape[0]
    c1, c2, gam, pred = (np.full(P, np.nan) for _ in range(4))
    for p in range(P):
        counted = np.flatnonzero(use[p])
        if not counted.size:
            continue
        start = counted[0]  # the first run of counted points: start .. start + T
        gaps = np.flatnonzero(~use[p, start:])
        T = (gaps[0] if gaps.size else use.shape[1] - start) - 1
        N = n[p, start : start + T + 1]
        if T == 0:  # one counted point: converged (N below resolution next) or cut short
            nxt = start + 1
            r = 0.0 if (nxt < use.shape[1] and np.isfinite(n[p, nxt])) else np.inf
        else:
            half = slice(T // 2, T)
            r = float(np.max(N[1:][half] / N[:-1][half]))
        with np.errstate(all="ignore"):
            tail = np.inf if r >= 1 - rtol else r / (1 - r)
            V = np.cumsum(N[::-1])[::-1] + N[-1] * tail
            ratio = V / N
            c1[p], c2[p] = ratio.min(), ratio.max()
            gam[p] = np.min((V[:-1] - V[1:]) / N[:-1]) if T > 0 else 1.0
        if sig is not None and T == 0:
            pred[p] = 1.0 + (0.0 if r == 0.0 else np.inf)
        if sig is not None and T > 0:
            s2 = sig[p, start : start + T] ** 2
            sbar = float(np.max(s2[T // 2 :]))
            q = np.empty(T + 1)
            q[T] = 1.0 + (np.inf if sbar >= 1 - rtol else sbar / (1 - sbar))
            for t in range(T - 1, -1, -1):
                q[t] = 1.0 + s2[t] * q[t + 1]
            pred[p] = q.max()
    return c1, c2, gam, pred


def variational_stability(
    trace: Any,
    signatures: Any = None,
    *,
    remainder: Any = 0.0,
    rtol: Any = None,
) -> VariationalStability:
    r"""Theorem 6.4 (Fundamental Variational Stability Theorem) both ways on the same runs.

    The theorem: under Assumption 2, up to equivalence of norms, (1) there are
    $C_x, C_\theta, C_u \ge 1$ with $\sigma^{\cdot,C}_{k,t} \le C_\cdot$ for all $k, t$
    (equivalently $\tilde\alpha \le 0$) iff (2) there is a variational energy satisfying
    Assumptions 3 and 4. Here (2) is measured on the trace ([`coercivity`][],
    [`variational_dissipation`][]) and (1) from `signatures` $\sigma_t$ (e.g.
    [`step_signatures`][], or ``generalized_jacobian_norm`` per layer along depth).

    - **(2) ⇒ decay** (`energy_implies_decay`): with $c_1, c_2, \gamma$ of (2),
      $\mathcal{E}_{t+1} \le \mathcal{E}_t - \gamma N_t \le (1 - \gamma/c_2)\mathcal{E}_t$, so
      the energy decays at least at rate `predicted` $= -\log(1 - \gamma/c_2)$ per step
      (and $N_t \le (c_2/c_1)(1-\gamma/c_2)^t N_0$); `measured`: `decay_rate`.
    - **(2) ⇒ (1)** (`energy_implies_exponent`, "strict dissipation yields strict negativity
      of indices"): the conclusion is `statement_1_strict` ($\alpha < 0$); `measured`:
      `alpha_growth`, `predicted`: $\frac12\log(1 - \gamma/c_2)$, the rate at which the
      energy's constants make $\|\theta^t - \theta^*\|$ decay. That number does not bound
      $\alpha$: the energy decays along the visited trajectories, the signatures are suprema
      over directions and Clarke elements (ReLU networks: $-1.04$ against $\alpha = -0.44$),
      and a transient can keep $\alpha$ above it on a finite horizon.
    - **(1) ⇒ (2)** (`stability_implies_energy`, the converse Lyapunov construction): from the
      run, $V_t = \sum_{s \ge t} N_s$ (a geometric tail past the horizon at the largest
      one-step ratio of the last half, $+\infty$ if that is $\ge 1$) satisfies Assumption 4
      with $\gamma = 1$ and Assumption 3 with $c_1 \ge 1$; `measured` its $c_2$ (finite iff
      the decay persists), `predicted` the $c_2$ the signatures give,
      $\max_t \sum_{s\ge t}\prod_{r=t}^{s-1}\sigma_r^2$ ($N_{t+1} \le \sigma_t^2 N_t$ by
      Lebourg's mean-value theorem, with the visited point's $\sigma_t$ standing in for the
      supremum over the segment $[\theta^t, \theta^*]$). The premise is `statement_1`
      (without signatures: that the run decays, largest one-step ratio $< 1$); the
      conclusion: $V$'s $c_2$ finite and below the prediction.

    **Arguments:** `trace` (an [`EnergyTrace`][] saved at every step), `signatures` (shape
    ``(path, step)`` or ``(path, step - 1)``; a vector for one path), `remainder` (Assumption
    4's $R$), `rtol` (the resolution, see the module docstring).

    **Raises:** ``ValueError`` for signatures of the wrong shape or negative, and as
    [`variational_dissipation`][].
    """
    trace = _check_trace(trace, "variational_stability")
    coer = coercivity(trace, rtol=rtol)
    diss = variational_dissipation(trace, remainder=remainder, rtol=rtol)
    rtol = _rtol(trace, rtol)
    sig = _signatures(signatures, trace)
    sig = None if sig is None else _zero_below(sig, rtol)
    statement_2 = bool(coer.holds) and bool(diss.holds)
    c2, gamma = float(coer.c2), float(diss.rate)

    # (2) => decay of the energy
    e = np.asarray(trace.energy)
    valid = np.asarray(trace.valid)
    both = valid[:, :-1] & valid[:, 1:] & np.isfinite(e[:, :-1])
    use_e = _resolved(e[:, :-1], both, rtol) & ~np.isnan(e[:, 1:])
    with np.errstate(all="ignore"):  # E_{t+1} <= 0: converged exactly, an infinite rate
        decay, _ = _min_max(np.log(e[:, :-1] / np.maximum(e[:, 1:], 0.0)), use_e, np.min)
    q = 1.0 - gamma / c2 if statement_2 else math.nan
    with np.errstate(divide="ignore"):
        rate_pred = -math.log(q) if q > 0 else (math.inf if q <= 0 else math.nan)
    alpha_pred = -0.5 * rate_pred
    decay_ok = (not math.isnan(decay)) and decay >= rate_pred * (1 - rtol) - rtol
    energy_implies_decay = _implication(
        statement_2,
        decay_ok,
        rate_pred,
        decay,
        "(2) => decay: E_{t+1} <= (1 - gamma/c2) E_t; predicted = -log(1 - gamma/c2), "
        "measured = min_t log(E_t / E_{t+1})",
    )

    # statement (1): the signatures
    horizon = max(int(np.asarray(trace.steps)[-1] - np.asarray(trace.steps)[0]), 1)
    sigma_sup = alpha_sup = alpha_growth = math.nan
    s1 = s1_strict = s1_literal = None
    if sig is not None:
        alive = valid[:, :-1] & np.isfinite(sig)
        sigma_sup = float(np.max(sig[alive])) if alive.any() else math.nan
        alpha_sup = math.log(max(1.0, sigma_sup)) / horizon if alive.any() else math.nan
        with np.errstate(divide="ignore"):
            logs = np.where(alive, np.log(sig), 0.0)
        per_path = logs.sum(axis=1) / np.maximum(alive.sum(axis=1), 1)
        used = alive.any(axis=1)
        alpha_growth = float(per_path[used].max()) if used.any() else math.nan
        s1 = jnp.asarray(bool(alpha_growth <= rtol))
        s1_strict = jnp.asarray(bool(alpha_growth < -rtol))
        s1_literal = jnp.asarray(bool(np.isfinite(sigma_sup)))
    energy_implies_exponent = _implication(
        statement_2 and sig is not None,
        sig is not None and bool(s1_strict),
        alpha_pred,
        alpha_growth,
        "(2) => (1), strict: gamma > 0 gives alpha < 0; measured = max_path mean_t log "
        "sigma_t (the cumulative generalised sensitivity's growth-rate bound), predicted = "
        "1/2 log(1 - gamma/c2) (the energy's own rate, for comparison: not a bound on alpha)",
    )

    # (1) => (2): the converse Lyapunov energy V_t = sum_{s >= t} N_s
    n = np.asarray(trace.norm_sq)
    use_n = _resolved(n, valid, rtol)
    vc1, vc2, vgam, vpred = _lyapunov_sum(n, use_n, sig, rtol)
    counted = ~np.isnan(vc2)
    worst = lambda a, fn: float(fn(a[counted])) if counted.any() else math.nan
    c2_v, c1_v, gam_v = worst(vc2, np.max), worst(vc1, np.min), worst(vgam, np.min)
    pred_v = worst(vpred, np.max) if sig is not None else math.nan
    if sig is not None:
        premise = bool(s1)
    else:
        pairs = use_n[:, 1:] & use_n[:, :-1]
        with np.errstate(all="ignore"):
            ratios = (n[:, 1:] / n[:, :-1])[pairs]
        premise = bool(ratios.size) and bool(np.max(ratios) < 1 - rtol)
    conclusion = (
        math.isfinite(c2_v)
        and c1_v >= 1 - rtol
        and gam_v > 1 - math.sqrt(rtol)
        and (sig is None or c2_v <= pred_v * (1 + math.sqrt(rtol)))
    )
    stability_implies_energy = _implication(
        premise,
        conclusion,
        pred_v,
        c2_v,
        "(1) => (2): V_t = sum_{s>=t} N_s satisfies Assumption 4 with gamma = 1, Assumption "
        "3 with c1 >= 1; measured = its c2 (inf: no energy), predicted = max_t sum_s "
        "prod_r sigma_r^2 from the signatures",
    )
    return VariationalStability(
        coercivity=coer,
        dissipation=diss,
        statement_2=jnp.asarray(statement_2),
        sigma_sup=jnp.asarray(sigma_sup),
        alpha_sup=jnp.asarray(alpha_sup),
        alpha_growth=jnp.asarray(alpha_growth),
        statement_1=s1,
        statement_1_strict=s1_strict,
        statement_1_literal=s1_literal,
        decay_rate=jnp.asarray(decay),
        energy_implies_decay=energy_implies_decay,
        energy_implies_exponent=energy_implies_exponent,
        stability_implies_energy=stability_implies_energy,
    )
