r"""A lower bound on the true Lipschitz constant: projected ascent on the input-Jacobian norm.

For a network $F : \mathbb{R}^{d} \to \mathbb{R}^{m}$ and a convex input set $C$ (all of
$\mathbb{R}^d$, a box, a ball), the Lipschitz constant of $F$ on $C$ is

$$L(F; C) = \sup_{x \in C} \|J_F(x)\|_2 = \sup_{x \ne x' \in C}
\frac{\|F(x) - F(x')\|}{\|x - x'\|}$$

(the mean-value inequality gives $\le$; Rademacher's theorem and a limit of secants give
$\ge$, for $F$ locally Lipschitz, the supremum over points of differentiability). Two
estimates bracket it from below and above:

- from below, any point: $\|J_F(x)\|_2 \le L$, and $\|J_F(x)v\| \le \|J_F(x)\|_2$ for a unit
  $v$. :func:`lspsde.lipschitz.lipschitz_estimate` takes the largest over the data
  $x_1, \dots, x_n$ ("data-only");
- from above, for a feedforward chain with 1-Lipschitz activations, $L \le \prod_l
  \sigma_1(W_l)$ (``lspsde.lipschitz.tracking``).

:func:`adversarial_lipschitz` moves the data points to where the Jacobian is largest. Every
value it records is $\|J_F(x)v\|$ at an iterate $x \in C$ with a unit $v$, so it is a lower
bound of $L(F; C)$ for any network, whether or not the ascent converges; the best one is at
least the data-only estimate (each start's exact value is kept), and at most the product bound
where that holds. It is a local method on a non-concave function: the gap to $L$ is not
certified, only the ordering data-only $\le$ adversarial $\le L \le$ product bound.

**The ascent.** Per start $x^0 = x_i$ (which must lie in $C$), with $T$ = ``n_steps``,
$\eta_t = $ ``step_size`` $\cdot(1 - t/T)$ and the right singular vector estimate $v^t$:

$$x^{t+1} = P_C\Big(x^t + \eta_t\,\frac{\hat g^t}{\|\hat g^t\|}\Big), \qquad
v^{t+1} = \text{``n\_power'' power iterations on } J(x^{t+1})^\top J(x^{t+1}) \text{ from } v^t,$$

and the recorded value $\hat\varphi^{t+1} = \|J(x^{t+1})v^{t+1}\|$ (one JVP and one VJP per
power iteration, matrix-free; the warm start from $v^t$ follows the top pair as $x$ moves, as
``spectral_norm_trajectory`` does along SGD). $v^0$ and the value at $x^0$ come from
Golub–Kahan–Lanczos (``lspsde.linalg``), so step 0 is exact. Normalised steps make the run
independent of the scale of $F$; the decaying length lets the last iterates settle. The
direction $\hat g^t$ (``smoothing`` $= r$):

- $r = 0$: the gradient of $\varphi(x) = \sigma_1(J_F(x))$. Where $\sigma_1$ is simple,
  Danskin's theorem gives $\nabla\varphi = \nabla_x\langle u_1, J_F(x)v_1\rangle$ at fixed
  singular vectors; with $v_1 \approx v^t$ this is the direction of
  $\nabla_x \frac12\|J_F(x)v^t\|^2$ (forward-over-reverse, second derivatives of $F$). Right
  for smooth networks (tanh, GELU).
- $r > 0$: piecewise-linear networks (ReLU) have a piecewise-constant $\varphi$ whose gradient
  vanishes almost everywhere, so the ascent would never leave its start's activation region.
  $\hat g^t$ is then the zeroth-order, antithetic estimate of the gradient of the Gaussian
  smoothing $\varphi_r(x) = \mathbb{E}\,\varphi(P_C(x + rz))$, $z \sim N(0, I_d)$ (Nesterov &
  Spokoiny 2017): $\hat g = \sum_{k \le K}[\hat\varphi(x + r_t z_k) - \hat\varphi(x - r_t
  z_k)]\,z_k$, $K$ = ``n_samples``, $\hat\varphi$ one power step from $v^t$, with the radius
  $r_t = r(1 - t/T)$ shrinking with the step, so that the smoothing first sees the
  neighbouring regions and last only the current one. The draws come from
  ``fold_in(fold_in(key, i), t)``.

**Result.** Per start $i$, the best recorded iterate is re-evaluated exactly (Lanczos,
``max_steps``, ``rtol``) and the start's value is the larger of that and the exact value at
$x_i$: `start_values` $\ge$ `data.norms` elementwise. `value` is their maximum, `maximiser`
its point. `history` $(n, T + 1)$ holds $\hat\varphi^t$ ($t = 0$: the exact value at $x_i$) and
`best_history` its running maximum (non-decreasing).

**Measured** (``tests/test_lipschitz_adversarial.py``, float64). A linear network $Wx + b$: the
value is $\|W\|_2$ to $1.1 \cdot 10^{-16}$ from every start. On 20 random 1-hidden-layer ReLU
networks in 2-D (8 units, the box $[-2, 2]^2$, $L$ from an exact enumeration of the activation
regions by linear programming), from 16 starts placed where $\|J\|$ is smallest,
``smoothing=0.5``, ``step_size=1``, 300 steps: the ascent reaches $L$ (to $10^{-15}$) on 15 of
the 20 networks and is strictly above the data-only estimate on all 20 (median 8.4x); with
``smoothing=0`` it never leaves the start regions (the data-only value, to rounding). A tanh
network in 2-D: the grid maximum of $\|J\|_2$ (to the grid's resolution), 13.9x the data-only
value.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree
import numpy as np

from .._checks import (
    _concrete_array,
    check_callable,
    check_positive,
    check_positive_int,
    check_real_scalar,
)
from .._ensemble import check_key, check_start, describe
from ..linalg._checks import _check_function_output, _check_max_steps, _check_rtol
from ..linalg.krylov import _HIGHEST, default_v0
from ..linalg.norms import operator_norm_impl
from ..nonsmooth import AbstractConstraint
from ..objectives import AbstractObjective
from .tracking import LipschitzEstimate

__all__ = ["AdversarialLipschitz", "adversarial_lipschitz"]


class AdversarialLipschitz(eqx.Module):
    r"""What :func:`adversarial_lipschitz` returns (module docstring).

    - `value`: the adversarial lower bound $\max_i$ `start_values`$_i$ of $L(F; C)$.
    - `maximiser`: the input where it was found, shape ``(d,)``; `index`: its start.
    - `start_values` ``(n,)``: per start, the exact $\|J_F\|_2$ at its best point (at least
      the value at the start itself); `maximisers` ``(n, d)``: those points.
    - `history` ``(n, step)``: the recorded $\hat\varphi^t = \|J_F(x^t)v^t\|$, $t = 0..T$
      (a lower bound of $\|J_F(x^t)\|_2$ at every step); `best_history`: its running
      maximum.
    - `data`: the data-only estimate at the starts (a
      :class:`~lspsde.lipschitz.LipschitzEstimate`, the same Lanczos iteration as
      ``lipschitz_estimate``).
    - `converged`: whether every final Lanczos evaluation met its stopping rule.
    """

    value: Float[Array, ""]
    maximiser: Float[Array, " d"]
    index: Int[Array, ""]
    start_values: Float[Array, " n"]
    maximisers: Float[Array, "n d"]
    history: Float[Array, "n step"]
    best_history: Float[Array, "n step"]
    data: LipschitzEstimate
    converged: Bool[Array, ""]

    @property
    def gain(self) -> Float[Array, ""]:
        r"""`value` / `data.value`: how much the ascent added to the data-only estimate."""
        return self.value / self.data.value


# --------------------------------------------------------------------------------------------
# The network x -> F(x) from what the caller passes


def _kind(model: Any, theta: Any) -> str:
    if theta is None:
        check_callable("model", model)
        return "function"
    if isinstance(model, AbstractObjective):
        if not callable(getattr(model, "network", None)):
            raise TypeError(
                f"`model` is the objective {type(model).__name__}, which has no `network(theta)` "
                "method; pass the network itself (an Equinox module), a function "
                "`(theta, x) -> F(x)`, or `theta=None` with a function `x -> F(x)`."
            )
        return "objective"
    if isinstance(model, eqx.Module):
        return "template"
    check_callable("model", model)
    return "theta_function"


def _apply(kind: str, model: Any, theta: Any, x: Array) -> Any:
    if kind == "function":
        return model(x)
    if kind == "objective":
        return model.network(theta)(x)
    if kind == "template":
        return eqx.combine(theta, eqx.filter(model, eqx.is_inexact_array, inverse=True))(x)
    return model(theta, x)


# --------------------------------------------------------------------------------------------
# The kernel


def _unit(w: Array, fallback: Array) -> Array:
    nw = jnp.linalg.norm(w)
    return jnp.where(nw > 0, w / jnp.where(nw > 0, nw, 1), fallback)


def _kernel(
    model,
    theta,
    inputs,
    key,
    constraint,
    step_size,
    smoothing,
    kind,
    n_steps,
    smooth,
    n_samples,
    n_power,
    max_steps,
    rtol,
):
    dtype = inputs.dtype
    d = inputs.shape[1]

    def f(x):
        return ravel_pytree(_apply(kind, model, theta, x))[0].astype(dtype)

    def project(x):
        return x if constraint is None else constraint.project(x)

    def linear(x):
        _, lin = jax.linearize(f, x)
        transpose = jax.linear_transpose(lin, x)
        return lin, lambda u: transpose(u)[0]

    def lanczos(x, v0):
        lin, rmv = linear(x)
        return operator_norm_impl(lin, rmv, v0, "lanczos", max_steps, rtol)

    def power(x, v, iterations):
        lin, rmv = linear(x)
        for _ in range(iterations):
            v = _unit(rmv(lin(v)), v)
        return v, jnp.linalg.norm(lin(v))

    def direction(x, v, t, radius, k):
        if not smooth:  # Danskin: grad of (1/2)||J(x) v||^2 at fixed v
            return jax.grad(lambda y: 0.5 * jnp.sum(jax.jvp(f, (y,), (v,))[1] ** 2))(x)
        z = jax.random.normal(jax.random.fold_in(k, t), (n_samples, d), dtype)

        def diff(zk):
            return (
                power(project(x + radius * zk), v, 1)[1] - power(project(x - radius * zk), v, 1)[1]
            )

        return jnp.matmul(jax.vmap(diff)(z), z, precision=_HIGHEST)

    v_start = default_v0(None, d, dtype)  # as lipschitz_estimate: the same exact start values
    T = jnp.asarray(n_steps, dtype)

    def one(x0, k):
        start = lanczos(x0, v_start)

        def body(carry, t):
            x, v, best, best_x, best_v = carry
            frac = t.astype(dtype) / T
            g = direction(x, v, t, smoothing * (1 - frac), k)
            ng = jnp.linalg.norm(g)
            scale = jnp.where(ng > 0, step_size * (1 - frac) / jnp.where(ng > 0, ng, 1), 0)
            x = project(x + scale * g)
            v, value = power(x, v, n_power)
            better = value > best
            best_x = jnp.where(better, x, best_x)
            best_v = jnp.where(better, v, best_v)
            return (x, v, jnp.maximum(value, best), best_x, best_v), value

        init = (x0, start.vector, start.value, x0, start.vector)
        (_, _, _, best_x, best_v), values = jax.lax.scan(body, init, jnp.arange(n_steps))
        final = lanczos(best_x, best_v)
        moved = final.value > start.value
        history = jnp.concatenate([start.value[None], values])
        return (
            jnp.where(moved, final.value, start.value),
            jnp.where(moved, best_x, x0),
            history,
            start.value,
            start.converged,
            jnp.where(moved, final.converged, start.converged),
        )

    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(inputs.shape[0]))
    values, points, history, norms, start_ok, ok = jax.vmap(one)(inputs, keys)
    index = jnp.argmax(values)
    data_index = jnp.argmax(norms)
    data = LipschitzEstimate(
        value=norms[data_index], index=data_index, norms=norms, converged=jnp.all(start_ok)
    )
    return AdversarialLipschitz(
        value=values[index],
        maximiser=points[index],
        index=index,
        start_values=values,
        maximisers=points,
        history=history,
        best_history=jax.lax.cummax(history, axis=1),
        data=data,
        converged=jnp.all(ok),
    )


_kernel_jit = eqx.filter_jit(_kernel)


# --------------------------------------------------------------------------------------------
# Checks and the public function


def _check_inputs(inputs: Any) -> Array:
    if isinstance(inputs, str | bytes | bool) or inputs is None:
        raise TypeError(f"`inputs` must be an (n, d) array of start points, got {inputs!r}.")
    shape = tuple(np.shape(inputs))
    if len(shape) != 2 or 0 in shape:
        raise ValueError(
            f"`inputs` must be a non-empty (n, d) array of start points (the data), got shape "
            f"{shape}. One input x is `x[None, :]`."
        )
    inputs = jnp.asarray(inputs)
    if not jnp.issubdtype(inputs.dtype, jnp.floating):
        raise TypeError(
            f"`inputs` must have a real floating dtype, got {inputs.dtype}; cast it, e.g. "
            "`jnp.asarray(inputs, dtype=float)`."
        )
    arr = _concrete_array(inputs)
    if arr is not None and not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))
        raise ValueError(
            f"`inputs` is not finite: {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} NaN or "
            f"inf, the first at index {tuple(int(i) for i in bad[0])}. Every start point must be "
            "a finite input."
        )
    return inputs


def _check_constraint(constraint: Any, inputs: Array) -> None:
    if constraint is None:
        return
    if not isinstance(constraint, AbstractConstraint):
        raise TypeError(
            f"`constraint` must be None or an lspsde constraint (lspsde.Box(lower, upper), "
            f"lspsde.Ball(center, radius), ...), got {type(constraint).__name__}."
        )
    if _concrete_array(inputs) is None or any(
        isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(constraint)
    ):
        return
    inside = np.asarray(jax.vmap(constraint.contains)(inputs))
    if not inside.all():
        first = int(np.argmin(inside))
        raise ValueError(
            f"{int((~inside).sum())} of the {inside.size} start points lie outside `constraint` "
            f"(the first: inputs[{first}]); the ascent stays in the set, so it must start there. "
            "Project them first (`jax.vmap(constraint.project)(inputs)`) or widen the set."
        )


def adversarial_lipschitz(
    model: Callable | eqx.Module,
    theta: PyTree[ArrayLike] | None,
    inputs: Float[ArrayLike, "..."],
    *,
    n_steps: int,
    step_size: float | Float[ArrayLike, ""],
    key: PRNGKeyArray,
    constraint: AbstractConstraint | None = None,
    smoothing: float | Float[ArrayLike, ""] = 0.0,
    n_samples: int = 8,
    n_power: int = 2,
    max_steps: int = 64,
    rtol: float | None = None,
) -> AdversarialLipschitz:
    r"""A lower bound of the Lipschitz constant $L(F; C) = \sup_{x \in C}\|J_F(x)\|_2$ by
    projected ascent on $x \mapsto \|J_F(x)\|_2$ from every input (module docstring).

    **Arguments:**

    - `model`, `theta`: the network $F = F_\theta$, as one of
      (a) an objective with a ``network(theta)`` method (``lspsde.SupervisedLoss``) and its
      parameters; (b) a network module used as a template (e.g. a ``Feedforward``): its
      floating arrays are replaced by `theta` (``lspsde.parameters(net)``, as the objective
      does); (c) a function ``(theta, x) -> F(x)``; (d) ``theta=None`` and a function
      ``x -> F(x)`` (any callable, a module too). `theta` is traced, so the call can be
      ``jax.vmap``-ped over an ensemble of parameters. $F(x)$ may be any pytree of floating
      arrays (flattened).
    - `inputs`: the start points $x_i$ (the data), shape ``(n, d)``; inside `constraint`.
    - `n_steps`: ascent steps $T \ge 1$ per start.
    - `step_size`: the first step's length in input units, $> 0$ (then $\eta_t = $
      ``step_size`` $(1 - t/T)$; steps are normalised).
    - `key`: a JAX PRNG key (the smoothing draws; unused for ``smoothing=0``).
    - `constraint`: ``None`` (all of $\mathbb{R}^d$) or a convex set, e.g.
      ``lspsde.Box(-1.0, 1.0)`` or ``lspsde.Ball(0.0, 3.0)``; every iterate is projected on it.
    - `smoothing`: the initial radius $r \ge 0$ of the Gaussian smoothing; 0 (default) uses
      the exact gradient (smooth networks); piecewise-linear networks need $r > 0$, about the
      size of their activation regions.
    - `n_samples`: antithetic pairs per step for the smoothed direction ($K \ge 1$).
    - `n_power`: power iterations per step ($\ge 1$).
    - `max_steps`, `rtol`: the Lanczos iteration at the starts and at the best points (as in
      ``lspsde.linalg.jacobian_norm``; `rtol` defaults to $\max(10^{-10}, 100\epsilon)$ of
      the inputs' dtype).

    **Returns:** an :class:`AdversarialLipschitz`.

    **Raises:** ``ValueError``/``TypeError`` before anything is compiled for non-finite or
    non-floating `inputs` (or not ``(n, d)``), inputs outside `constraint`, `n_steps` < 1,
    `step_size` $\le 0$ or not finite, `smoothing` < 0, bad `n_samples`/`n_power`/
    `max_steps`/`rtol`/`key`/`constraint`, a non-finite `theta`, or a `model` that does not map
    an input to floating arrays.
    """
    n_steps = check_positive_int("n_steps", n_steps, fix="It is the number of ascent steps T.")
    check_real_scalar("step_size", step_size)
    check_positive(
        "step_size",
        step_size,
        fix="It is the length of the first (normalised) ascent step, in input units.",
    )
    check_real_scalar("smoothing", smoothing)
    check_positive(
        "smoothing",
        smoothing,
        allow_zero=True,
        fix="It is the radius of the Gaussian smoothing (0: the exact gradient).",
    )
    n_samples = check_positive_int("n_samples", n_samples)
    n_power = check_positive_int("n_power", n_power)
    _check_max_steps(max_steps)
    if rtol is not None:
        _check_rtol(rtol)
    check_key(key)
    inputs = _check_inputs(inputs)
    if rtol is None:
        rtol = max(1e-10, 100 * float(jnp.finfo(inputs.dtype).eps))
    kind = _kind(model, theta)
    if theta is not None:
        theta = check_start(theta, name="theta")
    _check_constraint(constraint, inputs)

    def f(x):
        return _apply(kind, model, theta, x)

    try:
        _check_function_output("model", f, inputs[0])
    except (TypeError, ValueError):
        raise  # they name the problem already
    except Exception as err:  # e.g. a shape error deep inside the network
        raise ValueError(
            f"`model` cannot be evaluated at one input of shape {tuple(inputs.shape[1:])} "
            f"(theta {describe(theta)}, as {kind.replace('_', ' ')}): {err}"
        ) from err
    smooth_arr = _concrete_array(smoothing)
    smooth = bool(smooth_arr is None or smooth_arr > 0)
    dtype = inputs.dtype
    return _kernel_jit(
        model,
        theta,
        inputs,
        key,
        constraint,
        jnp.asarray(step_size, dtype),
        jnp.asarray(smoothing, dtype),
        kind,
        n_steps,
        smooth,
        n_samples,
        n_power,
        max_steps,
        float(rtol),
    )
