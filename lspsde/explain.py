r"""Explanation stability: gradient explanations of a model and their sensitivities (Section 7.4).

An explanation functional $E(\theta, x)$ attributes a scalar model output $F_\theta(x)$ to the
input coordinates. Two are implemented, each a small strategy object:

- [`Saliency`][]: the input gradient $S(\theta, x) = \nabla_x F_\theta(x)$;
- [`IntegratedGradients`][] (Sundararajan, Taly & Yan 2017, *Axiomatic attribution for deep
  networks*, ICML): for a baseline $x'$,

  $$\mathrm{IG}_i(\theta, x) = (x_i - x'_i)\int_0^1 \partial_i F_\theta\big(x' + a(x - x')\big)
  \,\mathrm{d}a \approx (x_i - x'_i)\sum_{k=1}^{m} w_k\,
  \partial_i F_\theta\big(x' + a_k(x - x')\big),$$

  with an $m$-point quadrature rule $(a_k, w_k)$ on $[0, 1]$. By the fundamental theorem of
  calculus along the path, $\sum_i \mathrm{IG}_i = F_\theta(x) - F_\theta(x')$ up to the
  quadrature error (*completeness*), which [`integrated_gradients`][] reports.

**Sensitivities** (Section 7.4: explanations "inherit their sensitivity from network Jacobians
and from the stability of the training procedure"), all matrix-free with ``lspsde.linalg``:

- to the input, $\|\partial E / \partial x\|_2$. For the saliency this is the input Hessian
  $\nabla_x^2 F_\theta(x)$, symmetric, so $\|\cdot\|_2 = \max(|\lambda_{\min}|,
  |\lambda_{\max}|)$ by symmetric Lanczos on Hessian-vector products
  (``linalg.hessian_extreme_eigenvalues``); for integrated gradients $\partial\mathrm{IG}/\partial x
  = \mathrm{diag}\big(\int_0^1 \nabla F\big) + \mathrm{diag}(x - x')\int_0^1 a\,\nabla^2 F\,
  \mathrm{d}a$ is not symmetric, and Golub–Kahan–Lanczos (``linalg.jacobian_norm``) is used;
- to the parameters, $\|\partial E / \partial \theta\|_2$, the operator norm of the Jacobian
  from the flattened parameter pytree to the explanation (``linalg.jacobian_norm``);
- along training ([`explanation_trajectory`][]): $E(\theta^t_p, x)$ at every saved step $t$ of
  every Monte Carlo path $p$ (an [`Ensemble`][lspsde.Ensemble] from ``lspsde.simulate``), the
  drift $\|E(\theta^t_p) - E(\theta^0_p)\|_2$, the spread across paths (the sensitivity of the
  explanation to the training noise) and the two operator norms above at each $(p, t)$.

The parameter-side norm is what connects an explanation to the Learning Stability Profile: by
the chain rule, along a realised trajectory

$$\Big\|\frac{\partial E(\theta^t, x)}{\partial \theta^0}\Big\|_2 \le
\Big\|\frac{\partial E}{\partial \theta}(\theta^t, x)\Big\|_2\,
\Big\|\frac{\partial \theta^t}{\partial \theta^0}\Big\|_2,$$

so $\frac1t \log$ of the left side is at most the finite-horizon parametric exponent
$\frac1t\log\|\partial\theta^t/\partial\theta^0\|_2$ ($\alpha_\theta$ of
``lspsde.stability_exponents`` at horizon $t$) plus $\frac1t\log$ ``parameter_norm``: a
negative parametric exponent and a bounded ``parameter_norm`` give explanations that forget
perturbations of the initialisation, while with $\alpha_\theta \ge 0$ they may be amplified
even when the prediction error is small. On the input side, by the mean value inequality,
$\|E(\theta, x) - E(\theta, \tilde x)\|_2 \le \sup_{z \in [x, \tilde x]}
\|\partial E / \partial x\,(\theta, z)\|_2\,\|x - \tilde x\|_2$.

**Models.** ``model_fn(theta, x)`` is any function of a parameter pytree and one input array
(batch with ``jax.vmap``). For an Equinox model, [`model_function`][] returns
``(model_fn, theta)`` with ``theta = lspsde.parameters(model)``. When ``model_fn`` returns
more than a scalar, ``output`` picks the explained scalar: ``output=c`` explains the logit of
class ``c`` (``model_fn(theta, x)[c]``), a tuple indexes several axes. To explain a probability
instead of a logit, explain ``lambda th, x: jax.nn.softmax(model_fn(th, x))[c]``.

**Compilation.** Every function is one ``eqx.filter_jit`` program with ``model_fn`` static: pass
the same function object again to reuse it.
"""

import abc
from collections.abc import Callable
import math
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree
import numpy as np

from . import linalg
from ._checks import check_callable, check_positive_int
from ._ensemble import check_key, describe
from ._simulate import Ensemble, add_cf_attrs
from .linalg._checks import _check_float_pytree, _check_max_steps, _check_rtol
from .objectives import parameters
from .results import to_datatree

__all__ = [
    "AbstractExplanation",
    "Attribution",
    "ExplanationSensitivity",
    "ExplanationTrajectory",
    "IntegratedGradients",
    "ModelFunction",
    "Saliency",
    "explanation_sensitivity",
    "explanation_trajectory",
    "integrated_gradients",
    "model_function",
    "quadrature_rule",
    "saliency",
]

Output = int | tuple[int, ...] | Int[ArrayLike, ""] | None
ModelFn = Callable[[PyTree[Array], Array], Any]

RULES = ("gauss_legendre", "trapezoid", "midpoint", "riemann_right")
"""Quadrature rules on $[0, 1]$ for integrated gradients, with their orders: the error of an
$m$-point rule on a smooth integrand falls like $\\rho^{-2m}$ (Gauss–Legendre, exact for
polynomials of degree $2m - 1$), $m^{-2}$ (trapezoid, midpoint) and $m^{-1}$ (the right
Riemann sum $\\frac1m\\sum_{k=1}^m$ of Sundararajan et al., eq. 3)."""

SENSITIVITY_BUDGET_BYTES = 256 * 2**20
"""Working set of the Krylov bases of one batch of sensitivity estimates in
[`explanation_trajectory`][] (``batch_size=None`` picks the batch to fit)."""


# --------------------------------------------------------------------------------------------
# Quadrature and the scalar output
# --------------------------------------------------------------------------------------------


def quadrature_rule(rule: str, n_points: int) -> tuple[np.ndarray, np.ndarray]:
    r"""Nodes $a_k$ and weights $w_k$ of an ``n_points``-point rule for $\int_0^1 g(a)\,da$.

    **Arguments:**

    - `rule`: one of ``RULES``: ``"gauss_legendre"`` (nodes the Legendre roots mapped to
      $[0, 1]$), ``"trapezoid"`` (nodes $k/(m-1)$, $k = 0..m-1$; needs $m \ge 2$),
      ``"midpoint"`` (nodes $(k + \frac12)/m$) or ``"riemann_right"`` (nodes $k/m$,
      $k = 1..m$, weights $1/m$: Sundararajan et al.'s eq. 3).
    - `n_points`: the number of nodes $m$ (= gradient evaluations), an int $\ge 1$.

    **Returns:** ``(nodes, weights)``, float64 NumPy arrays of shape ``(n_points,)``; the weights
    sum to 1.

    **Raises:** ``ValueError`` for an unknown rule or too few points, ``TypeError`` for a
    non-int ``n_points``.
    """
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"Unknown quadrature `rule` {rule!r}; choose one of {RULES}.")
    m = check_positive_int(
        "n_points",
        n_points,
        minimum=2 if rule == "trapezoid" else 1,
        fix="It is the number of gradient evaluations of the quadrature rule"
        + (" (the trapezoid rule needs both end points)." if rule == "trapezoid" else "."),
    )
    if rule == "gauss_legendre":
        t, w = np.polynomial.legendre.leggauss(m)
        return (t + 1.0) / 2.0, w / 2.0
    if rule == "trapezoid":
        w = np.full(m, 1.0 / (m - 1))
        w[[0, -1]] /= 2.0
        return np.linspace(0.0, 1.0, m), w
    if rule == "midpoint":
        return (np.arange(m) + 0.5) / m, np.full(m, 1.0 / m)
    return np.arange(1, m + 1) / m, np.full(m, 1.0 / m)


def _scalar_fn(model_fn: ModelFn, output: Output) -> Callable[[PyTree[Array], Array], Array]:
    """``F(theta, x)``: the explained scalar ``model_fn(theta, x)[output]``."""

    def F(theta, x):
        out = model_fn(theta, x)
        return out if output is None else jnp.asarray(out)[output]

    return F


# --------------------------------------------------------------------------------------------
# Explanation functionals
# --------------------------------------------------------------------------------------------


class AbstractExplanation(eqx.Module):
    r"""A gradient-based explanation functional $E(\theta, x)$ of a scalar output
    $F_\theta(x)$, with the same shape as $x$.

    Subclasses implement [`explain`][]; [`input_norm`][] defaults to Golub–Kahan–Lanczos on
    $x \mapsto E(\theta, x)$ and may be overridden where structure helps (the saliency's
    Jacobian is a symmetric Hessian).
    """

    name: ClassVar[str] = "explanation"

    @abc.abstractmethod
    def explain(
        self, F: Callable[[PyTree[Array], Array], Array], theta: PyTree[Array], x: Array
    ) -> Array:
        r"""$E(\theta, x)$, the shape of ``x``."""

    def check(self, x: Array) -> None:
        """Structural checks against the input ``x`` (before tracing); none by default."""

    def input_norm(
        self,
        F: Callable[[PyTree[Array], Array], Array],
        theta: PyTree[Array],
        x: Array,
        *,
        max_steps: int,
        rtol: float,
        key: PRNGKeyArray | None,
    ) -> tuple[Float[Array, ""], Bool[Array, ""]]:
        r"""$(\|\partial E/\partial x\,(\theta, x)\|_2$, converged$)$, matrix-free."""
        res = linalg.jacobian_norm(
            lambda z: self.explain(F, theta, z), x, max_steps=max_steps, rtol=rtol, key=key
        )
        return res.value, res.converged


class Saliency(AbstractExplanation):
    r"""The saliency map $S(\theta, x) = \nabla_x F_\theta(x)$ (the input gradient).

    Its input sensitivity is the input Hessian: $\|\partial S/\partial x\|_2 =
    \|\nabla_x^2 F_\theta(x)\|_2 = \max(|\lambda_{\min}|, |\lambda_{\max}|)$, computed by
    symmetric Lanczos on forward-over-reverse Hessian-vector products (one product a step).
    """

    name: ClassVar[str] = "saliency"

    def explain(
        self, F: Callable[[PyTree[Array], Array], Array], theta: PyTree[Array], x: Array
    ) -> Array:
        return jax.grad(F, argnums=1)(theta, x)

    def input_norm(
        self,
        F: Callable[[PyTree[Array], Array], Array],
        theta: PyTree[Array],
        x: Array,
        *,
        max_steps: int,
        rtol: float,
        key: PRNGKeyArray | None,
    ) -> tuple[Float[Array, ""], Bool[Array, ""]]:
        res = linalg.hessian_extreme_eigenvalues(
            lambda z: F(theta, z), x, max_steps=max_steps, rtol=rtol, key=key
        )
        return jnp.maximum(jnp.abs(res.lambda_min), jnp.abs(res.lambda_max)), res.converged


class IntegratedGradients(AbstractExplanation):
    r"""Integrated gradients (Sundararajan et al. 2017) with a fixed quadrature rule:
    $\mathrm{IG}(\theta, x) = (x - x') \odot \sum_k w_k \nabla_x F_\theta(x' + a_k (x - x'))$.

    **Arguments:**

    - `baseline`: the baseline $x'$, shape of ``x``; ``None`` (default): $x' = 0$. It is held
      fixed when $x$ is perturbed (in the input sensitivity).
    - `n_points`: the number $m$ of quadrature nodes (gradient evaluations, batched with
      ``vmap``), default 32.
    - `rule`: one of ``RULES`` (default ``"gauss_legendre"``, exact for an integrand that is a
      polynomial of degree $\le 2m - 1$ in $a$; see [`quadrature_rule`][]).

    **Raises:** ``ValueError``/``TypeError`` for an unknown rule, ``n_points`` < 1 (< 2 for
    the trapezoid rule), or a baseline that is not a finite floating array.
    """

    baseline: Float[Array, "..."] | None
    n_points: int = eqx.field(static=True)
    rule: str = eqx.field(static=True)
    name: ClassVar[str] = "integrated_gradients"

    def __init__(
        self,
        baseline: Float[ArrayLike, "..."] | None = None,
        n_points: int = 32,
        rule: str = "gauss_legendre",
    ):
        quadrature_rule(rule, n_points)  # validates both
        if baseline is not None:
            baseline = _check_input(baseline, "baseline")
        self.baseline = baseline
        self.n_points = int(n_points)
        self.rule = rule

    def check(self, x: Array) -> None:
        if self.baseline is not None and self.baseline.shape != x.shape:
            raise ValueError(
                f"`baseline` has shape {self.baseline.shape} but `x` has shape {x.shape}; the "
                "baseline is a point of the input space (e.g. `jnp.zeros_like(x)`)."
            )

    def reference(self, x: Array) -> Array:
        """The baseline $x'$ for input ``x`` (zeros if ``baseline`` is ``None``)."""
        if self.baseline is None:
            return jnp.zeros_like(x)
        return self.baseline.astype(x.dtype)

    def explain(
        self, F: Callable[[PyTree[Array], Array], Array], theta: PyTree[Array], x: Array
    ) -> Array:
        nodes, weights = quadrature_rule(self.rule, self.n_points)
        nodes = jnp.asarray(nodes, dtype=x.dtype)
        weights = jnp.asarray(weights, dtype=x.dtype)
        x0 = self.reference(x)
        diff = x - x0
        grad = jax.grad(F, argnums=1)
        grads = jax.vmap(lambda a: grad(theta, x0 + a * diff))(nodes)
        return diff * jnp.tensordot(weights, grads, axes=1)


# --------------------------------------------------------------------------------------------
# Checks before tracing
# --------------------------------------------------------------------------------------------


def _all_finite(a: Any) -> bool:
    """Whether concrete ``a`` is finite, evaluated eagerly (also while an outer ``jit`` traces
    a function that closes over ``a``), on ``a``'s device."""
    with jax.ensure_compile_time_eval():
        return bool(jnp.all(jnp.isfinite(a)))


def _check_input(x: Any, name: str = "x") -> Array:
    if isinstance(x, jax.core.Tracer):
        arr = x
    else:
        try:
            arr = jnp.asarray(x)
        except TypeError as err:
            raise TypeError(f"`{name}` must be a floating array, got {type(x).__name__}.") from err
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must have a real floating dtype to be differentiated, got {arr.dtype}; "
            f"cast it, e.g. `{name}.astype(float)`."
        )
    if not isinstance(arr, jax.core.Tracer) and not _all_finite(arr):
        with jax.ensure_compile_time_eval():
            bad = int(jnp.sum(~jnp.isfinite(arr)))
        raise ValueError(
            f"`{name}` contains NaN or inf ({bad} of {arr.size} entries); an explanation at a "
            "non-finite point is meaningless. Clean the input."
        )
    return arr


def _check_theta(theta: Any, name: str = "theta") -> None:
    _check_float_pytree(name, theta)
    for leaf in jax.tree.leaves(theta):
        if not isinstance(leaf, jax.core.Tracer) and not _all_finite(leaf):
            raise ValueError(
                f"`{name}` contains NaN or inf: {describe(theta)}. Explain at finite parameters "
                "(`explanation_trajectory` leaves non-finite ones out instead)."
            )


def _check_output(output: Output) -> None:
    if output is None:
        return
    ok_int = lambda i: isinstance(i, int | np.integer) and not isinstance(i, bool)
    if ok_int(output) or (isinstance(output, tuple) and output and all(map(ok_int, output))):
        return
    dtype = getattr(output, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.integer) and np.ndim(output) == 0:
        return
    raise TypeError(
        f"`output` must be None, an int (e.g. the class whose logit is explained) or a tuple of "
        f"ints, got {output!r}."
    )


def _check_model(model_fn: Any, theta: Any, x: Array, output: Output, theta_name="theta"):
    """``model_fn(theta, x)[output]`` must be a floating scalar (checked with ``eval_shape``)."""
    check_callable("model_fn", model_fn)
    try:
        out = jax.eval_shape(model_fn, theta, x)
    except Exception as err:
        raise ValueError(
            f"`model_fn({theta_name}, x)` failed for `x` of shape {tuple(x.shape)} and "
            f"`{theta_name}` {describe(theta)}: {type(err).__name__}: {err}. Pass one input of "
            "the shape the model expects (batch explanations with `jax.vmap`)."
        ) from err
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise TypeError(
            f"`model_fn` must return one array, got the pytree {out}; return the output to "
            "explain (e.g. the logits)."
        )
    if output is None:
        if out.shape != ():
            raise ValueError(
                f"`model_fn` returns shape {out.shape}, not a scalar; pass `output=c` to explain "
                "one entry (e.g. the logit of class c), or reduce the output in `model_fn`."
            )
    else:
        idx = output if isinstance(output, tuple) else (output,)
        if len(idx) > len(out.shape):
            raise ValueError(
                f"`output={output!r}` has {len(idx)} indices but `model_fn` returns shape "
                f"{out.shape}."
            )
        for axis, i in enumerate(idx):
            if isinstance(i, jax.core.Tracer):
                continue  # a traced index is clamped by JAX, as any dynamic index
            if not -out.shape[axis] <= int(i) < out.shape[axis]:
                raise ValueError(
                    f"`output={output!r}` is out of range for the output shape {out.shape} "
                    f"(axis {axis} has length {out.shape[axis]})."
                )
        if len(idx) != len(out.shape):
            raise ValueError(
                f"`output={output!r}` selects a slice of shape {out.shape[len(idx) :]} of the "
                f"output shape {out.shape}, not a scalar; give one index per axis."
            )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"`model_fn` must return a floating output, got dtype {out.dtype}.")


def _check_explanation(explanation: Any) -> None:
    if not isinstance(explanation, AbstractExplanation):
        raise TypeError(
            f"`explanation` must be an AbstractExplanation (`lspsde.Saliency()` or "
            f"`lspsde.IntegratedGradients(...)`), got {explanation!r}."
        )


def _prepare(model_fn, theta, x, output, explanation=None):
    _check_output(output)
    x = _check_input(x)
    _check_theta(theta)
    _check_model(model_fn, theta, x, output)
    if explanation is not None:
        _check_explanation(explanation)
        explanation.check(x)
    return x


def _check_norm_options(max_steps, rtol, key):
    _check_max_steps(max_steps)
    _check_rtol(rtol)
    if key is not None:
        check_key(key)


# --------------------------------------------------------------------------------------------
# Explanations at one parameter
# --------------------------------------------------------------------------------------------


@eqx.filter_jit
def _explain_jit(model_fn, output, explanation, theta, x):
    return explanation.explain(_scalar_fn(model_fn, output), theta, x)


def saliency(
    model_fn: ModelFn,
    theta: PyTree[Float[ArrayLike, "..."]],
    x: Float[ArrayLike, "*d"],
    *,
    output: Output = None,
) -> Float[Array, "*d"]:
    r"""The saliency map $S(\theta, x) = \nabla_x F_\theta(x)$.

    **Arguments:**

    - `model_fn`: ``model_fn(theta, x)``, the model on one input (see the module docstring;
      [`model_function`][] builds it from an Equinox model).
    - `theta`: the parameters $\theta$ (a pytree of finite floating arrays).
    - `x`: one input (a finite floating array of any shape).
    - `output`: ``None`` if ``model_fn`` returns a scalar; else the index of the explained
      entry, e.g. ``output=c`` for the logit of class ``c``.

    **Returns:** $\nabla_x F_\theta(x)$, the shape of ``x``.

    **Raises:** before compilation, ``ValueError`` if ``model_fn(theta, x)`` fails for this
    shape of ``x``, returns a non-scalar without ``output`` (or ``output`` does not select a
    scalar), or ``x``/``theta`` contain NaN or inf; ``TypeError`` for a non-floating ``x``,
    ``theta`` or output, or a bad ``output``.
    """
    x = _prepare(model_fn, theta, x, output)
    return _explain_jit(model_fn, output, Saliency(), theta, x)


class Attribution(eqx.Module):
    r"""Integrated gradients at one input, with their completeness check.

    **Fields:**

    - `attribution`: $\mathrm{IG}(\theta, x)$, the shape of $x$.
    - `output_change`: $F_\theta(x) - F_\theta(x')$.
    - `completeness_error`: $\sum_i \mathrm{IG}_i - (F_\theta(x) - F_\theta(x'))$, the
      quadrature error of $\int_0^1 \nabla F(x' + a(x - x')) \cdot (x - x')\,da$ (exactly zero
      for an exact rule, up to rounding).
    - `n_points`, `rule`: the quadrature rule used (static).
    """

    attribution: Float[Array, "*d"]
    output_change: Float[Array, ""]
    completeness_error: Float[Array, ""]
    n_points: int = eqx.field(static=True)
    rule: str = eqx.field(static=True)


@eqx.filter_jit
def _ig_jit(model_fn, output, explanation, theta, x):
    F = _scalar_fn(model_fn, output)
    ig = explanation.explain(F, theta, x)
    change = F(theta, x) - F(theta, explanation.reference(x))
    return Attribution(ig, change, jnp.sum(ig) - change, explanation.n_points, explanation.rule)


def integrated_gradients(
    model_fn: ModelFn,
    theta: PyTree[Float[ArrayLike, "..."]],
    x: Float[ArrayLike, "*d"],
    *,
    baseline: Float[ArrayLike, "..."] | None = None,
    n_points: int = 32,
    rule: str = "gauss_legendre",
    output: Output = None,
) -> Attribution:
    r"""Integrated gradients (Sundararajan et al. 2017) and their completeness error.

    $$\mathrm{IG}_i(\theta, x) = (x_i - x'_i)\sum_{k=1}^m w_k\,\partial_i F_\theta(x' +
    a_k(x - x')), \qquad \sum_i \mathrm{IG}_i = F_\theta(x) - F_\theta(x') + O(\text{rule}).$$

    **Arguments:**

    - `model_fn`, `theta`, `x`, `output`: as in [`saliency`][].
    - `baseline`: $x'$, the shape of ``x`` (default zeros).
    - `n_points`: quadrature nodes $m \ge 1$ (trapezoid: $\ge 2$).
    - `rule`: ``"gauss_legendre"`` (default), ``"trapezoid"``, ``"midpoint"`` or
      ``"riemann_right"`` (see ``RULES`` for the orders).

    **Returns:** an [`Attribution`][] (``attribution``, ``output_change``,
    ``completeness_error``).

    **Raises:** as [`saliency`][]; also ``ValueError`` for ``n_points`` < 1, an unknown rule,
    or a baseline of another shape than ``x`` or not finite.
    """
    explanation = IntegratedGradients(baseline, n_points, rule)
    x = _prepare(model_fn, theta, x, output, explanation)
    return _ig_jit(model_fn, output, explanation, theta, x)


# --------------------------------------------------------------------------------------------
# Sensitivities at one parameter
# --------------------------------------------------------------------------------------------


class ExplanationSensitivity(eqx.Module):
    r"""An explanation $E(\theta, x)$ and its two operator-norm sensitivities.

    **Fields:**

    - `explanation`: $E(\theta, x)$, the shape of $x$.
    - `input_norm`: $\|\partial E / \partial x\,(\theta, x)\|_2$ (saliency: the input Hessian's
      spectral norm $\max(|\lambda_{\min}|, |\lambda_{\max}|)$).
    - `parameter_norm`: $\|\partial E / \partial \theta\,(\theta, x)\|_2$, over the flattened
      parameter pytree.
    - `input_converged`, `parameter_converged`: whether each Krylov estimate met its stopping
      rule (``lspsde.linalg``); both estimates are lower bounds up to rounding.
    - `method`: the explanation's name (``"saliency"``, ``"integrated_gradients"``).
    """

    explanation: Float[Array, "*d"]
    input_norm: Float[Array, ""]
    parameter_norm: Float[Array, ""]
    input_converged: Bool[Array, ""]
    parameter_converged: Bool[Array, ""]
    method: str = eqx.field(static=True)

    @property
    def converged(self) -> Bool[Array, ""]:
        """Both estimates converged."""
        return self.input_converged & self.parameter_converged


def _sensitivity(F, explanation, theta, x, max_steps, rtol, key):
    """``(E, input_norm, input_ok, parameter_norm, parameter_ok)`` at one ``theta``."""
    e = explanation.explain(F, theta, x)
    s_x, ok_x = explanation.input_norm(F, theta, x, max_steps=max_steps, rtol=rtol, key=key)
    res = linalg.jacobian_norm(
        lambda th: explanation.explain(F, th, x), theta, max_steps=max_steps, rtol=rtol, key=key
    )
    return e, s_x, ok_x, res.value, res.converged


@eqx.filter_jit
def _sensitivity_jit(model_fn, output, explanation, theta, x, max_steps, rtol, key):
    e, s_x, ok_x, s_th, ok_th = _sensitivity(
        _scalar_fn(model_fn, output), explanation, theta, x, max_steps, rtol, key
    )
    return ExplanationSensitivity(
        explanation=e,
        input_norm=s_x,
        parameter_norm=s_th,
        input_converged=ok_x,
        parameter_converged=ok_th,
        method=explanation.name,
    )


def explanation_sensitivity(
    model_fn: ModelFn,
    theta: PyTree[Float[ArrayLike, "..."]],
    x: Float[ArrayLike, "*d"],
    *,
    explanation: AbstractExplanation | None = None,
    output: Output = None,
    max_steps: int = 64,
    rtol: float = 1e-6,
    key: PRNGKeyArray | None = None,
) -> ExplanationSensitivity:
    r"""How much an explanation moves with the input and with the parameters (Section 7.4).

    $$\Big\|\frac{\partial E}{\partial x}(\theta, x)\Big\|_2 \quad\text{and}\quad
    \Big\|\frac{\partial E}{\partial \theta}(\theta, x)\Big\|_2,$$

    matrix-free: for the saliency the first is the input Hessian's spectral norm by symmetric
    Lanczos on Hessian-vector products, otherwise Golub–Kahan–Lanczos on JVP/VJP products of
    $x \mapsto E$; the second is Golub–Kahan–Lanczos on $\theta \mapsto E$
    (``lspsde.linalg.jacobian_norm``). No Jacobian is materialised.

    **Arguments:**

    - `model_fn`, `theta`, `x`, `output`: as in [`saliency`][].
    - `explanation`: [`Saliency`][] (default) or [`IntegratedGradients`][] (with its
      baseline and quadrature rule), or any [`AbstractExplanation`][].
    - `max_steps`, `rtol`: Krylov controls (``lspsde.linalg``).
    - `key`: PRNG key for the Krylov starting vectors; ``None``: a fixed deterministic start.

    **Returns:** an [`ExplanationSensitivity`][].

    **Raises:** as [`saliency`][]; also ``ValueError``/``TypeError`` for a bad
    ``explanation``, ``max_steps``, ``rtol`` or ``key``.
    """
    explanation = Saliency() if explanation is None else explanation
    _check_norm_options(max_steps, rtol, key)
    x = _prepare(model_fn, theta, x, output, explanation)
    return _sensitivity_jit(model_fn, output, explanation, theta, x, max_steps, rtol, key)


# --------------------------------------------------------------------------------------------
# Along training
# --------------------------------------------------------------------------------------------


class ExplanationTrajectory(eqx.Module):
    r"""Explanations along training: $E(\theta^t_p, x)$ for paths $p$ and saved steps $t$.

    **Fields** (``P`` paths, ``T`` saved steps, ``*d`` the shape of $x$):

    - `explanations`: $E(\theta^t_p, x)$, ``(P, T, *d)``.
    - `drift`: $\|E(\theta^t_p, x) - E(\theta^0_p, x)\|_2$, ``(P, T)`` (Frobenius over ``*d``).
    - `mean`: $\bar E^t = \frac{1}{n_t}\sum_{p\ \text{alive}} E(\theta^t_p, x)$, ``(T, *d)``.
    - `spread`: the spread across paths, $\big(\frac{1}{n_t - 1}\sum_{p\ \text{alive}}
      \|E(\theta^t_p, x) - \bar E^t\|_2^2\big)^{1/2}$ (the square root of the trace of the
      sample covariance), ``(T,)``: the explanation's sensitivity to the training noise. NaN
      with fewer than two alive paths.
    - `input_norm`, `parameter_norm`: $\|\partial E / \partial x\|_2$ and
      $\|\partial E / \partial \theta\|_2$ at each $(\theta^t_p, x)$, ``(P, T)``; ``None``
      with ``sensitivity=False``.
    - `alive`: which $(p, t)$ enter the statistics, ``(P, T)`` (an ensemble's
      ``alive()``: paths that diverged are left out from their divergence on; for stacked
      parameters, the finite ones).
    - `converged`: every Krylov estimate at an alive $(p, t)$ converged.
    - `steps`: the training steps of the saved parameters, ``(T,)``.
    - `method`: the explanation's name.
    """

    explanations: Float[Array, "P T *d"]
    drift: Float[Array, "P T"]
    mean: Float[Array, " T *d"]
    spread: Float[Array, " T"]
    input_norm: Float[Array, "P T"] | None
    parameter_norm: Float[Array, "P T"] | None
    alive: Bool[Array, "P T"]
    converged: Bool[Array, ""]
    steps: Int[Array, " T"]
    method: str = eqx.field(static=True)

    @property
    def n_paths(self) -> int:
        return self.drift.shape[0]

    def mean_drift(self) -> Float[Array, " T"]:
        r"""$\frac{1}{n_t}\sum_{p\ \text{alive}} \|E(\theta^t_p) - E(\theta^0_p)\|_2$."""
        return _masked_mean(self.drift, self.alive)

    def to_datatree(self, attrs: dict | None = None):
        r"""As an ``xarray.DataTree``: ``/explanation`` (``explanations`` with dims ``(path,
        step, x_dim_0, ...)``, ``mean``), ``/drift``, ``/spread``, ``/sensitivity``
        (``input_norm``, ``parameter_norm``, dims ``(path, step)``; absent without) and
        ``/status`` (``alive``, ``converged``); coordinate ``step``."""
        import xarray as xr

        x_dims = [f"x_dim_{i}" for i in range(self.explanations.ndim - 2)]
        coords = {"step": np.asarray(self.steps)}
        ds = lambda **v: xr.Dataset(v, coords=coords)
        groups = {
            "explanation": ds(
                explanation=(["path", "step", *x_dims], np.asarray(self.explanations)),
                mean=(["step", *x_dims], np.asarray(self.mean)),
            ),
            "drift": ds(drift=(["path", "step"], np.asarray(self.drift))),
            "spread": ds(spread=(["step"], np.asarray(self.spread))),
            "status": ds(
                alive=(["path", "step"], np.asarray(self.alive)),
                converged=((), np.asarray(self.converged)),
            ),
        }
        if self.input_norm is not None:
            groups["sensitivity"] = ds(
                input_norm=(["path", "step"], np.asarray(self.input_norm)),
                parameter_norm=(["path", "step"], np.asarray(self.parameter_norm)),
            )
        root = {"method": self.method, "reference": "Katende (2025), Section 7.4"}
        root.update(attrs or {})
        tree = xr.DataTree.from_dict({"/": xr.Dataset(attrs=root), **groups})
        return add_cf_attrs(tree, EXPLANATION_CF)


EXPLANATION_CF = {  # CF (long_name, units) of ExplanationTrajectory.to_datatree's variables
    "explanation": ("explanation map E(theta^t, x) (saliency or integrated gradients)", "1"),
    "mean": ("mean explanation over the alive paths", "1"),
    "drift": ("drift of the explanation ||E(theta^t, x) - E(theta^0, x)||_2", "1"),
    "spread": ("spread of the explanation across paths sqrt(tr Cov_p E(theta^t_p, x))", "1"),
    "input_norm": ("input sensitivity of the explanation ||dE/dx||_2", "1"),
    "parameter_norm": ("parameter sensitivity of the explanation ||dE/dtheta||_2", "1"),
    "alive": ("whether the path is alive (not diverged) at the step", "1"),
    "converged": ("whether every Krylov estimate converged", "1"),
    "step": ("training step t", "step"),
    "path": ("Monte Carlo path index", "1"),
    "x_dim": ("input coordinate", "1"),
}


@to_datatree.register
def _(obj: ExplanationTrajectory, *, attrs: dict | None = None):
    return obj.to_datatree(attrs=attrs)


def _masked_mean(values: Array, mask: Array) -> Array:
    """Mean over the leading (path) axis of the entries where ``mask``; NaN where none."""
    m = mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
    n = jnp.sum(mask, axis=0)
    total = jnp.sum(jnp.where(m, values, 0), axis=0)
    n = n.reshape(n.shape + (1,) * (total.ndim - n.ndim))
    return total / jnp.where(n > 0, n, jnp.nan)


def _spread(values: Array, mask: Array) -> tuple[Array, Array]:
    """``(mean, spread)`` over the path axis of ``values`` ``(P, T, *d)`` at the alive ``mask``."""
    mean = _masked_mean(values, mask)
    m = mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
    dev = jnp.where(m, values - mean[None], 0)
    ss = jnp.sum(dev**2, axis=(0, *range(2, values.ndim)))
    n = jnp.sum(mask, axis=0)
    return mean, jnp.sqrt(ss / jnp.where(n > 1, n - 1, jnp.nan))


def _batch_size(theta_size: int, x_size: int, max_steps: int, itemsize: int, n: int) -> int:
    """Sensitivity estimates per batch so that the Krylov bases fit the budget."""
    per = itemsize * max_steps * 2 * (theta_size + x_size) + 1
    return max(1, min(n, SENSITIVITY_BUDGET_BYTES // per))


@eqx.filter_jit
def _trajectory_jit(
    model_fn, output, explanation, thetas, x, alive, steps, sensitivity, max_steps, rtol, key, batch
):
    F = _scalar_fn(model_fn, output)
    P, T = alive.shape
    flat = jax.tree.map(lambda a: a.reshape((P * T, *a.shape[2:])), thetas)
    if sensitivity:
        out = jax.lax.map(
            lambda th: _sensitivity(F, explanation, th, x, max_steps, rtol, key),
            flat,
            batch_size=batch,
        )
        e, s_x, ok_x, s_th, ok_th = (a.reshape((P, T, *a.shape[1:])) for a in out)
        converged = jnp.all((ok_x & ok_th) | ~alive)
    else:
        e = jax.vmap(lambda th: explanation.explain(F, th, x))(flat)
        e = e.reshape((P, T, *e.shape[1:]))
        s_x = s_th = None
        converged = jnp.array(True)
    diff = e - e[:, :1]
    drift = jnp.sqrt(jnp.sum(diff**2, axis=tuple(range(2, e.ndim))))
    mean, spread = _spread(e, alive)
    return ExplanationTrajectory(
        explanations=e,
        drift=drift,
        mean=mean,
        spread=spread,
        input_norm=s_x,
        parameter_norm=s_th,
        alive=alive,
        converged=converged,
        steps=steps,
        method=explanation.name,
    )


def _stacked(thetas: Any) -> tuple[PyTree[Array], Array, Array]:
    """``(thetas, alive, steps)`` from an ``Ensemble`` or a pytree with leading (path, step)."""
    if isinstance(thetas, Ensemble):
        if thetas.grid is not None:
            raise ValueError(
                "This ensemble comes from a sweep (dims (grid, path, step, ...)); explain one "
                "grid point at a time: `explanation_trajectory(model_fn, ens.at(g), x)`."
            )
        if thetas.theta is None:
            raise ValueError(
                'This ensemble was run with save="summary" and kept no parameters; rerun '
                '`lspsde.simulate` with save="trajectory" (the default).'
            )
        return thetas.theta, thetas.alive(), thetas.steps
    leaves = jax.tree.leaves(thetas)
    if not leaves or any(np.ndim(a) < 2 for a in leaves):
        raise ValueError(
            "`thetas` must be an Ensemble or a pytree whose leaves have leading (path, step) "
            f"axes, got {describe(thetas)}; for one trajectory of shape (step, ...) pass "
            "`jax.tree.map(lambda a: a[None], thetas)`."
        )
    if len({np.shape(a)[:2] for a in leaves}) != 1:
        raise ValueError(
            f"The leaves of `thetas` disagree on their leading (path, step) axes: "
            f"{describe(thetas)}."
        )
    _check_float_pytree("thetas", thetas)
    thetas = jax.tree.map(jnp.asarray, thetas)
    P, T = leaves[0].shape[:2]
    alive = jnp.ones((P, T), dtype=bool)
    for a in jax.tree.leaves(thetas):
        alive &= jnp.all(jnp.isfinite(a.reshape(P, T, -1)), axis=-1)
    return thetas, alive, jnp.arange(T)


def explanation_trajectory(
    model_fn: ModelFn,
    thetas: Ensemble | PyTree[Float[ArrayLike, "..."]],  # leaves (path, step, ...)
    x: Float[ArrayLike, "*d"],
    *,
    explanation: AbstractExplanation | None = None,
    output: Output = None,
    sensitivity: bool = True,
    max_steps: int = 64,
    rtol: float = 1e-6,
    key: PRNGKeyArray | None = None,
    batch_size: int | None = None,
) -> ExplanationTrajectory:
    r"""An explanation along training, across Monte Carlo paths, with its sensitivities.

    For parameters $\theta^t_p$ at the saved steps $t$ of paths $p$ computes
    $E(\theta^t_p, x)$, its drift $\|E(\theta^t_p, x) - E(\theta^0_p, x)\|_2$, its spread
    across the alive paths at each step, and (``sensitivity=True``) the operator norms
    $\|\partial E/\partial x\|_2$ and $\|\partial E/\partial \theta\|_2$ at every
    $(\theta^t_p, x)$, as [`explanation_sensitivity`][]. Beside the Learning Stability Profile
    of the same run, ``parameter_norm[p, t] * profile.cum_theta[t]`` bounds
    $\|\partial E(\theta^t, x) / \partial \theta^0\|_2$ (module docstring).

    **Arguments:**

    - `model_fn`, `x`, `output`, `explanation`, `max_steps`, `rtol`, `key`: as in
      [`explanation_sensitivity`][] (the same Krylov start at every $(p, t)$).
    - `thetas`: an [`Ensemble`][lspsde.Ensemble] run with ``save="trajectory"`` (its
      ``theta`` has dims ``(path, step, ...)``; diverged paths are left out of ``mean`` and
      ``spread`` from their divergence on), or a pytree whose leaves have leading
      ``(path, step)`` axes (e.g. ``lspsde.parameter_trajectory``'s output with ``[None]``
      added for one path).
    - `sensitivity`: compute the two operator norms (the expensive part); ``False`` gives the
      explanations, drift and spread only.
    - `batch_size`: sensitivity estimates computed at once (``lax.map`` over the
      $P \cdot T$ parameters); ``None`` picks the largest batch whose Krylov bases fit in
      ``SENSITIVITY_BUDGET_BYTES``.

    **Returns:** an [`ExplanationTrajectory`][].

    **Raises:** before compilation, ``ValueError`` for an ensemble from a sweep or with
    ``save="summary"``, leaves without matching leading ``(path, step)`` axes, and everything
    [`explanation_sensitivity`][] raises (``model_fn`` is checked on one $\theta^t_p$).
    """
    explanation = Saliency() if explanation is None else explanation
    _check_norm_options(max_steps, rtol, key)
    if not isinstance(sensitivity, bool):
        raise TypeError(f"`sensitivity` must be a bool, got {sensitivity!r}.")
    thetas, alive, steps = _stacked(thetas)
    _check_output(output)
    x = _check_input(x)
    _check_explanation(explanation)
    explanation.check(x)
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[2:], a.dtype), thetas)
    _check_model(model_fn, one, x, output, theta_name="thetas[p, t]")
    P, T = alive.shape
    theta_size = sum(math.prod(a.shape) for a in jax.tree.leaves(one))
    if batch_size is None:
        itemsize = jnp.dtype(x.dtype).itemsize
        batch_size = _batch_size(theta_size, x.size, max_steps, itemsize, P * T)
    else:
        batch_size = check_positive_int("batch_size", batch_size)
    return _trajectory_jit(
        model_fn,
        output,
        explanation,
        thetas,
        x,
        alive,
        steps,
        sensitivity,
        max_steps,
        rtol,
        key,
        batch_size,
    )


# --------------------------------------------------------------------------------------------
# Equinox models
# --------------------------------------------------------------------------------------------


class ModelFunction(eqx.Module):
    r"""``model_fn(theta, x) = eqx.combine(theta, structure)(x)``: an Equinox model as a
    function of its parameters $\theta$ (its inexact arrays) and one input."""

    structure: Any

    def __call__(self, theta: PyTree[Array], x: Array) -> Array:
        return eqx.combine(theta, self.structure)(x)


def model_function(model: eqx.Module) -> tuple[ModelFunction, PyTree[Array]]:
    r"""Split an Equinox model into ``(model_fn, theta)`` for the explanation functions.

    ``theta = lspsde.parameters(model)`` (the inexact arrays; the pytree that
    ``lspsde.simulate`` trains for a ``SupervisedLoss``), and ``model_fn(theta, x)`` rebuilds
    the model with ``eqx.combine`` and applies it to one input ``x``. Keep the returned
    ``model_fn`` and pass it again: the compiled programs are reused.

    **Raises:** ``TypeError`` if ``model`` is not an ``eqx.Module`` or has no inexact arrays.
    """
    if not isinstance(model, eqx.Module):
        raise TypeError(f"`model` must be an Equinox module, got {type(model).__name__}.")
    theta = parameters(model)
    if not jax.tree.leaves(theta):
        raise TypeError(f"`model` ({type(model).__name__}) has no floating arrays to explain.")
    return ModelFunction(eqx.filter(model, eqx.is_inexact_array, inverse=True)), theta
