r"""Parameter flows with an optimiser state: heavy ball, and any optax optimiser.

The paper's theory (Sections 4–6) is stated for memoryless updates
$\theta^{t+1} = \mathcal{A}_t(\theta^t, u^t)$; Section 7.5 names strongly adaptive optimisers as
outside its scope. The instruments do not need that assumption: these flows carry a state
$s^t$ (a momentum buffer; Adam's moments and step count) beside $\theta^t$, the joint state
$(\theta^t, s^t)$ is what the ensemble engine steps (an ``lspsde.FlowState``), and so

- ``simulate``, sweeps and ``exponent_distribution`` take them as they take ``SGD``;
- the profile's $\sigma^\theta_t$ and the exponent $\alpha_\theta$ are norms of the Jacobian of
  the *full* step with respect to the full state (for heavy ball on a quadratic: the companion
  matrix, whose spectral radius is the exponent);
- the noise, the loss, the energy $\|\theta - \theta^*\|^2$ and the divergence rule read
  $\theta^t$ (a state that is not finite is divergence too).
"""

from collections.abc import Callable
import inspect
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PyTree
import numpy as np
import optax

from ._checks import check_in_interval, check_positive, check_real_scalar
from .parameter import AbstractStatefulFlow, FlowState
from .schedules import AbstractSchedule, as_schedule

__all__ = ["HeavyBall", "Optax"]


class HeavyBall(AbstractStatefulFlow):
    r"""Polyak's heavy ball, $v^{t+1} = \beta v^t - \eta_t G(\theta^t, u^t)$,
    $\theta^{t+1} = \theta^t + v^{t+1}$, from $v^0 = 0$.

    On a quadratic $\frac12\theta^\top H\theta$ with exact gradients the joint step is linear,
    $(\theta, v) \mapsto M(\theta, v)$ with $M = \begin{pmatrix} I - \eta H & \beta I \\ -\eta H
    & \beta I\end{pmatrix}$; on each eigenvalue $\lambda$ of $H$ it has the eigenvalues of the
    companion matrix of $z^2 - (1 + \beta - \eta\lambda) z + \beta$, so $\alpha_\theta =
    \lim_T \frac1T\log\|M^T\|_2 = \log\rho(M)$; it is stable iff $0 \le \beta < 1$ and
    $0 < \eta\lambda < 2(1 + \beta)$ for every $\lambda$.

    **Arguments:**

    - `step_size`: $\eta > 0$, a number or an ``lspsde.schedules.AbstractSchedule``.
    - `momentum`: $\beta \in [0, 1)$ ($\beta = 0$ is SGD).
    """

    step_size: AbstractSchedule
    momentum: Array

    def __init__(self, step_size: "float | Array | AbstractSchedule", momentum: float | Array):
        self.step_size = as_schedule(step_size)
        check_real_scalar("momentum", momentum)
        check_in_interval(
            "momentum",
            momentum,
            0.0,
            1.0,
            closed_low=True,
            fix="Heavy ball needs 0 <= momentum < 1 (at 1 the velocity never forgets, and the "
            "quadratic's companion matrix has spectral radius >= 1).",
        )
        self.momentum = jnp.asarray(momentum, dtype=float)

    def init_opt_state(self, theta0: PyTree[Array]) -> PyTree[Array]:
        return jax.tree.map(jnp.zeros_like, theta0)

    def __call__(self, t: ArrayLike, state: FlowState, grad: PyTree[Array]) -> FlowState:
        eta = self.step_size(t)
        v = jax.tree.map(lambda v, g: self.momentum * v - eta * g, state.opt_state, grad)
        return FlowState(jax.tree.map(jnp.add, state.theta, v), v)


# Valid ranges of the hyperparameters optax's factories share (name: (low, high, closed_low,
# closed_high, what it is)); a factory's other arguments are passed through unchecked.
_RANGES = {
    "learning_rate": (0.0, float("inf"), False, False, "a step size > 0"),
    "b1": (0.0, 1.0, True, False, "a decay rate in [0, 1)"),
    "b2": (0.0, 1.0, True, False, "a decay rate in [0, 1)"),
    "decay": (0.0, 1.0, True, False, "a decay rate in [0, 1)"),
    "momentum": (0.0, 1.0, True, False, "a momentum in [0, 1)"),
    "eps": (0.0, float("inf"), True, False, "a non-negative number"),
    "eps_root": (0.0, float("inf"), True, False, "a non-negative number"),
    "weight_decay": (0.0, float("inf"), True, False, "a non-negative number"),
}


def _is_number(value: Any) -> bool:
    """A number or a numeric array (a hyperparameter to hold as an array field)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return False  # an integer (a count, a size) stays a static Python int
    if isinstance(value, float | complex):
        return True  # complex: refused by the real-number check
    dtype = getattr(value, "dtype", None)
    return isinstance(value, jax.Array | np.ndarray | np.number) and (
        np.issubdtype(dtype, np.inexact)
    )


class Optax(AbstractStatefulFlow):
    r"""Any optax optimiser as a parameter flow: $(\theta^{t+1}, s^{t+1})$ from optax's
    ``update(G, s^t, \theta^t)`` and ``apply_updates``, with $s^0 = $ ``init(theta0)``.

    Two forms:

    - ``Optax(optax.adam(1e-3))``: a built ``optax.GradientTransformation`` (any chain,
      schedule or wrapper). Its hyperparameters are baked into the transformation: they are
      static, and optax does not expose them to be checked.
    - ``Optax(optax.adam, learning_rate=1e-3, b1=0.9)``: the factory and its hyperparameters.
      Numeric hyperparameters become array fields, so they can be swept
      (``lspsde.Sweep.of(lambda lr: Optax(optax.adam, learning_rate=lr), lrs)``: one compiled
      program) and are checked before anything compiles (``learning_rate > 0``; ``b1``, ``b2``,
      ``decay``, ``momentum`` in $[0, 1)$; ``eps``, ``eps_root``, ``weight_decay`` $\ge 0$);
      integers, booleans and the rest (``nesterov=True``, a schedule) are static.

    optax counts its own steps in its state; ``simulate`` starts it at $t = 0$, so a schedule's
    step is the training step. The wrapped step equals optax's, step for step (tested).

    **What the profile differentiates.** $\sigma^\theta$ and $\alpha_\theta$ are norms of
    the Jacobian of the step with respect to the floating leaves of the state that are its
    dynamics ([`differentiated`][]): $\theta$ and optax's moments, traces and accumulators.
    The hyperparameters that ``optax.inject_hyperparams`` keeps in its state (constants, or a
    schedule's value at the step count) are held at their values along the path, as the
    integer step counts are: an injected constant would otherwise add an identity block, and
    $\sigma^\theta \ge 1$ for every optimiser (tested against the factory form). Other
    floating bookkeeping (``reduce_on_plateau``'s scale and best value, ``MultiSteps``'
    accumulated gradient) is dynamical state and is differentiated.
    """

    factory: Callable | None = eqx.field(static=True)
    transform: optax.GradientTransformation | None = eqx.field(static=True)
    static_hyperparams: tuple = eqx.field(static=True)
    hyperparams: dict[str, Array]

    def __init__(self, optimizer: "optax.GradientTransformation | Callable", **hyperparams: Any):
        if isinstance(optimizer, optax.GradientTransformation):
            if hyperparams:
                raise TypeError(
                    f"`Optax` got a built optimiser and hyperparameters {sorted(hyperparams)}: "
                    "pass either `Optax(optax.adam(1e-3))` or the factory with its "
                    "hyperparameters, `Optax(optax.adam, learning_rate=1e-3)`."
                )
            self.factory, self.transform = None, optimizer
            self.static_hyperparams, self.hyperparams = (), {}
            return
        if not callable(optimizer):
            raise TypeError(
                f"`optimizer` must be an optax.GradientTransformation (e.g. optax.adam(1e-3)) "
                f"or an optax factory such as optax.adam, got {optimizer!r}."
            )
        try:
            signature = inspect.signature(optimizer)
        except (TypeError, ValueError):  # a builtin without a signature: nothing to check
            signature = None
        if signature is not None:
            accepts_kw = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
            unknown = sorted(set(hyperparams) - set(signature.parameters))
            if unknown and not accepts_kw:
                raise TypeError(
                    f"{getattr(optimizer, '__name__', optimizer)} has no hyperparameter "
                    f"{unknown}; it takes {sorted(signature.parameters)}."
                )
        numeric, static = {}, {}
        for name, value in hyperparams.items():
            if _is_number(value):
                check_real_scalar(name, value)
                if name in _RANGES:
                    low, high, cl, ch, what = _RANGES[name]
                    if high == float("inf"):
                        check_positive(name, value, allow_zero=cl, fix=f"It is {what}.")
                    else:
                        check_in_interval(
                            name,
                            value,
                            low,
                            high,
                            closed_low=cl,
                            closed_high=ch,
                            fix=f"It is {what}.",
                        )
                numeric[name] = jnp.asarray(value, dtype=float)
            else:
                static[name] = value
        self.factory, self.transform = optimizer, None
        self.static_hyperparams = tuple(sorted(static.items(), key=lambda kv: kv[0]))
        self.hyperparams = numeric
        try:  # fail here, not inside a trace, if the factory rejects its arguments
            self.optimizer()
        except Exception as err:
            raise ValueError(
                f"{getattr(optimizer, '__name__', optimizer)}(**{hyperparams}) fails: {err}"
            ) from err

    def optimizer(self) -> optax.GradientTransformation:
        """The optax transformation (built from the factory with this module's values)."""
        if self.transform is not None:
            return self.transform
        return self.factory(**self.hyperparams, **dict(self.static_hyperparams))

    def init_opt_state(self, theta0: PyTree[Array]) -> PyTree[Array]:
        return self.optimizer().init(theta0)

    def __call__(self, t: ArrayLike, state: FlowState, grad: PyTree[Array]) -> FlowState:
        updates, opt_state = self.optimizer().update(grad, state.opt_state, state.theta)
        return FlowState(optax.apply_updates(state.theta, updates), opt_state)

    def differentiated(self, state: FlowState) -> PyTree[bool]:
        """Every floating leaf, except the hyperparameters (and their schedules' states) that
        ``optax.inject_hyperparams`` keeps in the state, at any depth of a chain."""
        return jax.tree.map(_dynamical, state, is_leaf=_is_injected)


_INJECTED = tuple(
    cls
    for cls in (
        getattr(optax, "InjectHyperparamsState", None),
        getattr(optax, "InjectStatefulHyperparamsState", None),
    )
    if cls is not None
)


def _is_injected(node: Any) -> bool:
    return isinstance(node, _INJECTED)


def _dynamical(node: Any) -> Any:
    if not _is_injected(node):
        return eqx.is_inexact_array(node)
    held = {f: jax.tree.map(lambda _: False, getattr(node, f)) for f in node._fields}
    held["inner_state"] = jax.tree.map(_dynamical, node.inner_state, is_leaf=_is_injected)
    return node._replace(**held)
