r"""The SDE model of $\sigma_1(W_l)$ under SGD, and its predicted distribution over training.

SGD $\theta_{t+1} = \theta_t - \eta\,(\nabla\mathcal{L}(\theta_t) + \xi_t)$,
$\operatorname{Cov}(\xi_t) = \Sigma(\theta_t)$, on a parameter pytree whose 2-D floating leaves
are the layers $W_l \in \mathbb{R}^{m_l \times n_l}$ (``lspsde.lipschitz.tracking``); $w =
\operatorname{vec}\theta \in \mathbb{R}^d$ (``ravel_pytree`` order, matrices row-major). Time
is $s = \eta t$: training step $t$ is saved at $s = \eta t$, beside SGD's step $t$.

**§1 The weights.** The stochastic modified equation of SGD (Li, Tai & E, 2017/2019),

$$dw = b_\eta(w)\,ds + \sqrt\eta\,B(w)\,dB_s, \qquad BB^\top = \Sigma, \qquad
b_\eta = -\nabla\mathcal{L} - \tfrac\eta2\nabla^2\mathcal{L}\,\nabla\mathcal{L},$$

is weakly of order 2: $\mathbb{E} f(\theta_t) - \mathbb{E} f(w(\eta t)) = O(\eta^2)$ over a
fixed horizon $s \le S$ (``order=2``, the default); without the correction (``order=1``,
$b = -\nabla\mathcal{L}$, as ``lspsde.SGDLimit``) the error is $O(\eta)$.

**§2 The top singular value (Itô).** Where $\sigma_1(W_l)$ is simple, with $g_l =
\operatorname{vec}(u_1 v_1^\top) = \nabla\sigma_1$ and $Q_l = \frac12\nabla^2\sigma_1$ (package
docstring, §3), Itô's formula gives

$$d\sigma_l = \big[\underbrace{-\langle u_1 v_1^\top, \nabla_l\mathcal{L}\rangle}_{\text{(i)
drift}} \underbrace{-\,\tfrac\eta2\langle g_l, (\nabla^2\mathcal{L}\nabla\mathcal{L})_l
\rangle}_{\text{correction}} + \underbrace{\tfrac\eta2\operatorname{tr}(\Sigma_{ll}\,
\nabla^2\sigma_1)}_{\text{(iii) Itô}}\big]\,ds + \underbrace{\sqrt\eta\,g_l^\top B_l\,
dB_s}_{\text{(ii) noise}},$$

$d\langle\sigma_l\rangle = \eta\,g_l^\top\Sigma_{ll}g_l\,ds$: the paper's three terms (Luo et
al., 2025) are (i) the gradient flow projected on the operator-norm Jacobian, (ii) the gradient
noise projected on it, (iii) the noise projected on the operator-norm Hessian. Over one step
($ds = \eta$) they are the ``drift``, ``noise_variance`` and ``ito`` of
:func:`spectral_step_decomposition`; its $\eta^2\,\text{second}(\nabla\mathcal{L})$ is not a
separate term here: it is the curvature of $\sigma_1$ along the flow, which integrating (i)
along the path contains, together with the correction (which makes the mean $O(\eta^2)$
exact). For the product bound, $d\log\prod_l\sigma_l = \sum_l [d\sigma_l/\sigma_l - \frac12
d\langle\sigma_l\rangle/\sigma_l^2]$, with $d\langle\log\prod\rangle = \eta\,\hat g^\top\Sigma
\hat g\,ds$, $\hat g = (g_l/\sigma_l)_l$ (layers correlate through $\Sigma$, e.g. minibatch
noise). :func:`spectral_sde_coefficients` evaluates all of these at one $\theta$.

**§3 Along what? The closure problem.** The coefficients depend on all of $w$, not on
$\sigma_1$ alone: the equation for $\sigma_1$ is not closed. Two consistent ways:

(a) *Jointly with the weights* (:func:`spectral_norm_sde`): $(w, \text{(i)}, \text{correction},
\text{(ii)}, \text{(iii)}, \dots)$ integrated as one Itô SDE with ``diffrax.diffeqsolve``
(Euler–Maruyama, ``UnsafeBrownianPath``, fixed steps $\delta = \eta/$``n_substeps``), every
coefficient evaluated at the current $w$; each path carries the running integral of each term,
and $\sigma_1(W_l(s))$ from an exact SVD, whose difference from $\sigma_1(0) +$ the sum of the
terms is the Itô-formula discretisation error (mean $O(\delta)$, spread $O(\sqrt\delta)$).
Euler–Maruyama's weak error is $O(\delta)$; with ``order=2`` the total is $O(\eta^2 +
\delta)$.

(b) *Small noise* (:func:`spectral_norm_moments`): the expansion $w = \bar w + \sqrt\eta\,x +
\eta\,y + \dots$ about the deterministic path $\bar w' = b_\eta(\bar w)$ (van Kampen's linear
noise approximation with its first mean correction):

$$P' = JP + PJ^\top + \Sigma(\bar w), \qquad \mu' = J\mu + \tfrac12 D^2 b_\eta(\bar w)[P],
\qquad J = Db_\eta(\bar w), \qquad P(0) = 0,\ \mu(0) = 0,$$

($\operatorname{Cov} w \approx \eta P$, $\mathbb{E}w \approx \bar w + \eta\mu$; $\mu = 0$ for
quadratic losses), solved with ``diffrax`` (an ODE, adaptive Tsit5), and then

$$\mathbb{E}\sigma_l(s) = \underbrace{\sigma_l(\bar W_l)}_{\text{(i) along the flow}} +
\underbrace{\eta\operatorname{tr}(Q_l P_{ll})}_{\text{(iii)}} + \eta\langle g_l, \mu_l\rangle
+ O(\eta^2), \qquad \operatorname{Var}\sigma_l(s) = \underbrace{\eta\,g_l^\top P_{ll}
g_l}_{\text{(ii)}} + O(\eta^2),$$

$$\mathbb{E}\log\textstyle\prod_l\sigma_l = \sum_l\big[\log\sigma_l + \eta\frac{\langle g_l,
\mu_l\rangle + \operatorname{tr}(Q_lP_{ll})}{\sigma_l} - \eta\frac{g_l^\top P_{ll}g_l}
{2\sigma_l^2}\big], \qquad \operatorname{Var}\log\textstyle\prod_l\sigma_l = \eta\,\hat g^\top
P \hat g,$$

with $\sigma_l, g_l, Q_l$ at $\bar W_l(s)$. The remainders are $O(\eta^2)$ with ``order=2``
(the modified equation's and the expansion's), so the mean is right to $O(\eta^2)$ while the
Itô term is $O(\eta)$; with ``order=1`` the $O(\eta)$ error of the flow is as large as the Itô
term itself. The expansion needs the fluctuation to be small against the gap:
$\sqrt{\eta\,g^\top P g} \ll \sigma_1 - \sigma_2$ (reported as ``noise_to_gap``). Memory:
$P$ is $d \times d$ (small models; (a) scales further).

*Not consistent:* evaluating the coefficients of §2 along $\bar w$ and integrating them in
time, $\int_0^s \eta\,g^\top\Sigma g\,dr$ for the variance and $\int_0^s \frac\eta2
\operatorname{tr}(\Sigma\nabla^2\sigma_1)\,dr$ for the Itô shift. This ignores that the drift
(i) depends on the fluctuation of $w$ and pulls it back: $P$ solves a Lyapunov equation, not
$P' = \Sigma$. For $\mathcal{L} = \frac12\|W - A\|_F^2$ with i.i.d. noise of variance $v$ per
entry the variance saturates at $\approx\eta v/2$ where the naive integral grows like $\eta v
s$. The two agree only for $s \ll 1/\lambda_{\max}(\nabla^2\mathcal{L})$. The naive rates are
returned (``drift_rate``, ``ito_rate``, ``diffusion_rate``) for plotting, not as a prediction.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax as dfx
import equinox as eqx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree
import lineax as lx
import numpy as np

from .._checks import check_positive, check_positive_int
from .._ensemble import check_key, check_start
from ..limits._common import _check_ode_solver
from ..noise import AbstractNoise
from ..objectives import AbstractObjective
from . import _kernels as K
from ._checks import check_eta, check_on_degenerate
from .covariance import NoiseCovariance, covariance_at, hessian_trace, jacobian_variance
from .expansion import prepare_gap_tol, raise_if_degenerate
from .tracking import _check_layers

__all__ = [
    "MonteCarloMoments",
    "SpectralNormMoments",
    "SpectralNormSDE",
    "SpectralSDECoefficients",
    "spectral_norm_moments",
    "spectral_norm_sde",
    "spectral_sde_coefficients",
]


# --------------------------------------------------------------------------------------------
# Layout and the coefficients of §2


class _Layer(NamedTuple):
    path: str
    start: int
    stop: int
    m: int
    n: int


def _layout(theta: PyTree[Any]) -> tuple[_Layer, ...]:
    """Every 2-D floating leaf of ``theta`` and its slice of ``ravel_pytree(theta)``."""
    out, offset = [], 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(theta)[0]:
        size = int(np.size(leaf))
        if np.ndim(leaf) == 2 and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            m, n = np.shape(leaf)
            out.append(_Layer(jax.tree_util.keystr(path), offset, offset + size, m, n))
        offset += size
    return tuple(out)


def _flat_gradient(objective, unravel):
    return lambda y: ravel_pytree(objective.gradient(unravel(y)))[0]


def _drift(objective, unravel, eta, order):
    r"""$b_\eta$ over the flat parameters (§1)."""
    flat_grad = _flat_gradient(objective, unravel)

    def b(y):
        g = flat_grad(y)
        if order == 1:
            return -g
        return -(g + 0.5 * eta * jax.jvp(flat_grad, (y,), (g,))[1])

    return b


class _Local(NamedTuple):
    """§2 at one $w$, per layer (last axis ``layer``); unmasked: garbage where degenerate,
    never inf."""

    sigma1: Array
    drift: Array
    correction: Array
    ito: Array
    diffusion: Array
    gap: Array
    degenerate: Array
    g: tuple  # vec(u1 v1^T) per layer, shape (m n,)
    log_diffusion: Array


def _local(objective, cov, w, unravel, layout, eta, order, gap_tol) -> _Local:
    flat_grad = _flat_gradient(objective, unravel)
    grad = flat_grad(w)
    hg = jax.jvp(flat_grad, (w,), (grad,))[1] if order == 2 else None
    rows, gs = [], []
    ghat = jnp.zeros_like(w)
    for layer in layout:
        sl = slice(layer.start, layer.stop)
        U, s, V = K.svd(w[sl].reshape(layer.m, layer.n))
        gap, degenerate = K.gap_and_flag(s, gap_tol)
        g = jnp.outer(U[:, 0], V[:, 0]).reshape(-1)
        block = cov.block(layer.start, layer.stop)
        drift = -K._mm(g, grad[sl])
        correction = -0.5 * eta * K._mm(g, hg[sl]) if order == 2 else jnp.zeros_like(drift)
        ito = eta * hessian_trace(U, s, V, block)
        diffusion = eta * jacobian_variance(U, V, block)
        ghat = ghat.at[sl].set(g * K._safe_inv(s[0]))
        rows.append((s[0], drift, correction, ito, diffusion, gap, degenerate))
        gs.append(g)
    cols = [jnp.stack(c) for c in zip(*rows, strict=True)]
    return _Local(*cols, tuple(gs), eta * cov.quadratic(ghat))


class SpectralSDECoefficients(eqx.Module):
    r"""The coefficients of the SDE of $\sigma_1(W_l)$ (module docstring, §2) at one
    $\theta$, in time $s = \eta t$ (multiply by $\eta$ for one training step).

    **Fields** (shape ``(layer,)`` unless noted; layers in the order of `layers`):

    - `sigma1`: $\sigma_1(W_l)$.
    - `drift`: (i) $-\langle u_1 v_1^\top, \nabla_l\mathcal{L}\rangle$.
    - `correction`: $-\frac\eta2\langle u_1v_1^\top, (\nabla^2\mathcal{L}\nabla\mathcal{L})_l
      \rangle$ (order 2; $0$ for ``order=1``).
    - `ito`: (iii) $\frac\eta2\operatorname{tr}(\Sigma_{ll}\nabla^2\sigma_1) = \eta
      \operatorname{tr}(\Sigma_{ll}Q_l)$.
    - `diffusion`: (ii) squared, $\eta\,g_l^\top\Sigma_{ll}g_l$ ($= d\langle\sigma_l\rangle/ds$).
    - `log_drift`, `log_diffusion` (scalars): the drift $\sum_l[(\text{drift} +
      \text{correction} + \text{ito})/\sigma_l - \frac12\text{diffusion}/\sigma_l^2]$ and the
      squared diffusion $\eta\,\hat g^\top\Sigma\hat g$ of $\log\prod_l\sigma_l$.
    - `gap`, `degenerate`: as in :class:`TopSingularExpansion`; every coefficient is NaN where
      `degenerate` (there $\sigma_1$ has no gradient).
    - `layers`: the layers' pytree paths.
    """

    sigma1: Float[Array, " layer"]
    drift: Float[Array, " layer"]
    correction: Float[Array, " layer"]
    ito: Float[Array, " layer"]
    diffusion: Float[Array, " layer"]
    log_drift: Float[Array, ""]
    log_diffusion: Float[Array, ""]
    gap: Float[Array, " layer"]
    degenerate: Bool[Array, " layer"]
    layers: tuple[str, ...] = eqx.field(static=True)


def _log_drift(loc: _Local) -> Array:
    inv = K._safe_inv(loc.sigma1)
    return jnp.sum((loc.drift + loc.correction + loc.ito) * inv - 0.5 * loc.diffusion * inv**2)


@eqx.filter_jit
def _coefficients(objective, noise, theta, eta, layout, order, gap_tol):
    w, unravel = ravel_pytree(theta)
    cov = noise if isinstance(noise, NoiseCovariance) else covariance_at(objective, noise, theta)
    loc = _local(objective, cov, w, unravel, layout, eta, order, gap_tol)
    nan = lambda x: jnp.where(loc.degenerate, jnp.nan, x)
    bad = jnp.any(loc.degenerate)
    return SpectralSDECoefficients(
        sigma1=loc.sigma1,
        drift=nan(loc.drift),
        correction=nan(loc.correction),
        ito=nan(loc.ito),
        diffusion=nan(loc.diffusion),
        log_drift=jnp.where(bad, jnp.nan, _log_drift(loc)),
        log_diffusion=jnp.where(bad, jnp.nan, loc.log_diffusion),
        gap=loc.gap,
        degenerate=loc.degenerate,
        layers=tuple(layer.path for layer in layout),
    )


# --------------------------------------------------------------------------------------------
# Checks shared by the entry points (all before tracing)


def _check_order(order: Any) -> int:
    if isinstance(order, bool) or order not in (1, 2):
        raise ValueError(
            f"`order` must be 1 or 2, got {order!r}: the drift of the weights' SDE, -grad L "
            "(order 1, weak error O(eta)) or -grad L - (eta/2) H grad L (order 2, O(eta^2); "
            "needed for the mean of sigma1 to be right at the order of the Ito term)."
        )
    return int(order)


def _check_system(objective, noise, theta, *, allow_covariance: bool, name: str = "theta"):
    if not isinstance(objective, AbstractObjective):
        raise TypeError(
            f"`objective` must be an AbstractObjective, got {type(objective).__name__}."
        )
    kinds = (AbstractNoise, NoiseCovariance) if allow_covariance else (AbstractNoise,)
    if not isinstance(noise, kinds):
        what = (
            "an lspsde noise model or a NoiseCovariance"
            if allow_covariance
            else ("an lspsde noise model (its covariance may depend on theta along the path)")
        )
        raise TypeError(f"`noise` must be {what}, got {type(noise).__name__}.")
    _check_layers(theta, name)  # no 2-D leaf, zero size, complex
    theta = check_start(theta, name=name)
    layout = _layout(theta)
    d = ravel_pytree(theta)[0].size
    if isinstance(noise, NoiseCovariance):
        if noise.size != d:
            raise ValueError(
                f"`noise` is a NoiseCovariance of size {noise.size}, but `{name}` has {d} "
                "entries (ravel_pytree order); give the covariance of the whole flat parameter."
            )
    else:
        noise.check(objective, theta)
        # (traced for its errors only: a model without a covariance raises here)
        jax.eval_shape(lambda th: covariance_at(objective, noise, th), theta)
    return theta, layout


def _prepare(theta, eta, gap_tol, on_degenerate, order):
    check_eta(eta)
    check_on_degenerate(on_degenerate)
    order = _check_order(order)
    dtype = ravel_pytree(theta)[0].dtype
    return jnp.asarray(eta, dtype), prepare_gap_tol(gap_tol, dtype), order


def _raise_at_start(theta, layout, tol, on_degenerate, what):
    """The concrete-input degeneracy error at $\\theta$, from a NumPy SVD (no compile)."""
    if on_degenerate != "raise":
        return
    w = ravel_pytree(theta)[0]
    if isinstance(w, jax.core.Tracer):
        return
    w = np.asarray(w)
    for layer in layout:
        s = np.linalg.svd(w[layer.start : layer.stop].reshape(layer.m, layer.n), compute_uv=False)
        s2 = s[1] if s.size > 1 else 0.0
        gap = s[0] - s2
        degenerate = not (gap > float(tol) * s[0]) or not s[0] > 0
        raise_if_degenerate(
            np.asarray(s[0]), np.asarray(gap), np.asarray(degenerate), tol,
            f"{what} (layer `{layer.path or '(the matrix)'}`)",
        )  # fmt: skip


def spectral_sde_coefficients(
    objective: AbstractObjective,
    noise: AbstractNoise | NoiseCovariance,
    theta: PyTree[ArrayLike],
    eta: float | Float[ArrayLike, ""],
    *,
    order: int = 2,
    gap_tol: float | Float[ArrayLike, ""] | None = None,
    on_degenerate: str = "raise",
) -> SpectralSDECoefficients:
    r"""The drift, Itô and diffusion coefficients of $d\sigma_1(W_l)$ and of
    $d\log\prod_l\sigma_1(W_l)$ at $\theta$ (module docstring, §2), for SGD with step $\eta$.

    **Arguments:**

    - `objective`: $\mathcal{L}$.
    - `noise`: the gradient noise: a noise model (its exact $\Sigma(\theta)$,
      :func:`gradient_noise_covariance`) or a :class:`NoiseCovariance` of the flat parameters
      (e.g. :func:`minibatch_covariance` of per-example gradients).
    - `theta`: the parameters; every 2-D floating leaf is a layer (a bare matrix is one layer).
    - `eta`: the step size $\eta > 0$.
    - `order`: 2 (default) adds the modified-equation `correction` to the drift; 1 omits it.
    - `gap_tol`, `on_degenerate`: as in :func:`top_singular_expansion`.

    **Returns:** a :class:`SpectralSDECoefficients`.

    **Raises:** ``TypeError``/``ValueError`` before tracing for a wrong objective or noise
    type, a `theta` without a 2-D floating leaf (a vector), a zero-size or non-finite layer,
    a covariance of the wrong size, a model without a covariance (heavy tails), $\eta \le 0$,
    a bad `order`; ``ValueError`` for a degenerate top singular value (see `on_degenerate`).
    """
    theta, layout = _check_system(objective, noise, theta, allow_covariance=True)
    eta, tol, order = _prepare(theta, eta, gap_tol, on_degenerate, order)
    _raise_at_start(theta, layout, tol, on_degenerate, "spectral_sde_coefficients")
    return _coefficients(objective, noise, theta, eta, layout, order, tol)


# --------------------------------------------------------------------------------------------
# (b) The small-noise prediction


class SpectralNormMoments(eqx.Module):
    r"""The small-noise prediction of the law of $\sigma_1(W_l)$ at the saved steps (module
    docstring, §3(b)); step $t$ is time $s = \eta t$.

    **Fields** (shape ``(step, layer)`` unless noted):

    - `mean`, `variance`: $\mathbb{E}\sigma_l$ and $\operatorname{Var}\sigma_l$, each to
      $O(\eta^2)$ (``order=2``).
    - `sigma1_flow`: $\sigma_l(\bar W_l(s))$, term (i) integrated along the flow $\bar w$.
    - `hessian_term`: (iii) $\eta\operatorname{tr}(Q_l P_{ll})$, the noise accumulated in the
      weights projected on $\frac12\nabla^2\sigma_1$.
    - `shift`: $\eta\langle g_l, \mu_l\rangle$, the mean shift of the weights projected on
      $\nabla\sigma_1$ ($0$ for quadratic losses). `mean = sigma1_flow + hessian_term + shift`.
      `variance` $= \eta g_l^\top P_{ll} g_l$ is (ii).
    - `log_bound_mean`, `log_bound_variance`, `log_bound_flow` (``(step,)``): the same for
      $\log\prod_l\sigma_1(W_l)$ (with the Itô correction $-\frac12 d\langle\sigma_l\rangle/
      \sigma_l^2$ and the cross-layer covariance).
    - `drift_rate`, `correction_rate`, `ito_rate`, `diffusion_rate`: the coefficients of §2 at
      $\bar w(s)$ (:class:`SpectralSDECoefficients`); their time integrals are *not* the
      prediction (module docstring).
    - `noise_to_gap`: $\sqrt{\text{variance}}/(\sigma_1 - \sigma_2)$ at $\bar W_l$; the
      expansion needs it $\ll 1$.
    - `gap`, `degenerate`: at $\bar W_l(s)$; moments are NaN where `degenerate`. Both are
      evaluated at the saved steps only: a crossing $\sigma_1 = \sigma_2$ of the flow between
      two of them is not flagged, but `noise_to_gap` grows near it (and past it the layer's
      top pair is the other one).
    - `theta_flow`: $\bar\theta(s)$, leaves with a leading ``step`` axis; `weight_covariance`:
      $\eta P(s)$, ``(step, d, d)``; `weight_shift`: $\eta\mu(s)$, ``(step, d)``.
    - `steps`, `times` (``(step,)``); `layers`, `order`, `eta` (static / scalar).
    """

    mean: Float[Array, "step layer"]
    variance: Float[Array, "step layer"]
    sigma1_flow: Float[Array, "step layer"]
    hessian_term: Float[Array, "step layer"]
    shift: Float[Array, "step layer"]
    log_bound_mean: Float[Array, " step"]
    log_bound_variance: Float[Array, " step"]
    log_bound_flow: Float[Array, " step"]
    drift_rate: Float[Array, "step layer"]
    correction_rate: Float[Array, "step layer"]
    ito_rate: Float[Array, "step layer"]
    diffusion_rate: Float[Array, "step layer"]
    noise_to_gap: Float[Array, "step layer"]
    gap: Float[Array, "step layer"]
    degenerate: Bool[Array, "step layer"]
    theta_flow: PyTree[Array]
    weight_covariance: Float[Array, "step d d"]
    weight_shift: Float[Array, "step d"]
    steps: Int[Array, " step"]
    times: Float[Array, " step"]
    eta: Float[Array, ""]
    layers: tuple[str, ...] = eqx.field(static=True)
    order: int = eqx.field(static=True)


def _saved_steps(n_steps: int, save_every: int) -> np.ndarray:
    steps = np.arange(0, n_steps + 1, save_every)
    if steps[-1] != n_steps:
        steps = np.append(steps, n_steps)
    return steps


def _check_horizon(n_steps: Any, save_every: Any) -> tuple[int, int]:
    if not isinstance(n_steps, bool) and isinstance(n_steps, int | np.integer) and n_steps < 0:
        raise ValueError(
            f"`n_steps` = {n_steps} is a negative horizon; it is the number of SGD steps T >= 1 "
            "(time s = eta * T)."
        )
    n_steps = check_positive_int("n_steps", n_steps, fix="It is the number of SGD steps T.")
    save_every = check_positive_int("save_every", save_every)
    return n_steps, save_every


def _second_directional(b, w, P):
    r"""$D^2 b(w)[P] = \sum_i D^2 b(w)[e_i, P e_i]$ ($d$ JVPs of JVPs)."""

    def one(e, p):
        return jax.jvp(lambda x: jax.jvp(b, (x,), (p,))[1], (w,), (e,))[1]

    eye = jnp.eye(w.size, dtype=w.dtype)
    return jnp.sum(jax.vmap(one)(eye, P.T), axis=0)


@eqx.filter_jit
def _moments(objective, noise, theta0, eta, ts, layout, order, gap_tol, solver, rtol, atol,
             max_steps):  # fmt: skip
    w0, unravel = ravel_pytree(theta0)
    d, dtype = w0.size, w0.dtype
    b = _drift(objective, unravel, eta, order)
    eye = jnp.eye(d, dtype=dtype)

    def vf(s, y, args):
        w, P, mu = y
        bw, jvp = jax.linearize(b, w)
        J = jax.vmap(jvp, out_axes=1)(eye)
        S = covariance_at(objective, noise, unravel(w)).dense().astype(dtype)
        dP = K._mm(J, P) + K._mm(P, J.T) + S
        dmu = K._mm(J, mu) + 0.5 * _second_directional(b, w, P)
        return bw, 0.5 * (dP + dP.T), dmu

    y0 = (w0, jnp.zeros((d, d), dtype), jnp.zeros((d,), dtype))
    sol = dfx.diffeqsolve(
        dfx.ODETerm(vf),
        solver,
        ts[0],
        ts[-1],
        dt0=None,
        y0=y0,
        saveat=dfx.SaveAt(ts=ts),
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
    )
    W, P, mu = sol.ys

    def at(w, P, mu):
        cov = covariance_at(objective, noise, unravel(w))
        loc = _local(objective, cov, w, unravel, layout, eta, order, gap_tol)
        rows = []
        ghat = jnp.zeros_like(w)
        for layer, g in zip(layout, loc.g, strict=True):
            sl = slice(layer.start, layer.stop)
            U, s, V = K.svd(w[sl].reshape(layer.m, layer.n))
            shift = eta * K._mm(g, mu[sl])
            hess = eta * K.expected_second(U, s, V, P[sl, sl])
            var = eta * K._mm(g, K._mm(P[sl, sl], g))
            ghat = ghat.at[sl].set(g * K._safe_inv(s[0]))
            rows.append((shift, hess, var))
        shift, hess, var = (jnp.stack(c) for c in zip(*rows, strict=True))
        inv = K._safe_inv(loc.sigma1)
        log_flow = jnp.sum(jnp.log(loc.sigma1))
        log_mean = log_flow + jnp.sum((shift + hess) * inv - 0.5 * var * inv**2)
        log_var = eta * K._mm(ghat, K._mm(P, ghat))
        return loc, shift, hess, var, log_flow, log_mean, log_var

    loc, shift, hess, var, log_flow, log_mean, log_var = jax.vmap(at)(W, P, mu)
    deg = loc.degenerate
    nan = lambda x: jnp.where(deg, jnp.nan, x)
    anyd = jnp.any(deg, axis=-1)
    nan1 = lambda x: jnp.where(anyd, jnp.nan, x)
    return dict(
        mean=nan(loc.sigma1 + hess + shift),
        variance=nan(var),
        sigma1_flow=loc.sigma1,
        hessian_term=nan(hess),
        shift=nan(shift),
        log_bound_mean=nan1(log_mean),
        log_bound_variance=nan1(log_var),
        log_bound_flow=log_flow,
        drift_rate=nan(loc.drift),
        correction_rate=nan(loc.correction),
        ito_rate=nan(loc.ito),
        diffusion_rate=nan(loc.diffusion),
        noise_to_gap=nan(jnp.sqrt(jnp.maximum(var, 0)) * K._safe_inv(loc.gap)),
        gap=loc.gap,
        degenerate=deg,
        theta_flow=jax.vmap(unravel)(W),
        weight_covariance=eta * P,
        weight_shift=eta * mu,
    )


def spectral_norm_moments(
    objective: AbstractObjective,
    noise: AbstractNoise,
    theta0: PyTree[ArrayLike],
    eta: float | Float[ArrayLike, ""],
    *,
    n_steps: int,
    save_every: int = 1,
    order: int = 2,
    solver: dfx.AbstractSolver | None = None,
    rtol: float = 1e-8,
    atol: float = 1e-10,
    max_steps: int = 16_384,
    gap_tol: float | Float[ArrayLike, ""] | None = None,
    on_degenerate: str = "raise",
) -> SpectralNormMoments:
    r"""Predicted mean and variance of $\sigma_1(W_l)$ and of $\log\prod_l\sigma_1(W_l)$
    after $t$ SGD steps, from the small-noise expansion of the SDE (module docstring, §3(b)).

    One deterministic ODE for $(\bar w, P, \mu)$ (``diffrax.diffeqsolve``, adaptive), then the
    moments at the saved steps $0, s, 2s, \dots, T$ (as ``lspsde.simulate`` saves them, so the
    prediction lies beside an SGD ensemble step by step). Errors: $O(\eta^2)$ in the mean and the
    variance over a fixed horizon $\eta T$ (``order=2``), while the Itô term is $O(\eta)$.

    **Arguments:**

    - `objective`, `noise`: $\mathcal{L}$ and the noise model ($\Sigma(\theta)$ exactly, from
      :func:`gradient_noise_covariance`, re-evaluated along $\bar w$).
    - `theta0`: $\theta^0$; every 2-D floating leaf is a layer.
    - `eta`: the SGD step size $\eta > 0$.
    - `n_steps`: the horizon $T \ge 1$ in SGD steps; `save_every`: the saved-step stride.
    - `order`: the drift of the weights' SDE, 2 (default) or 1 (module docstring, §1).
    - `solver`: a diffrax ODE solver (default ``diffrax.Tsit5()``; a stiff one such as
      ``diffrax.Kvaerno5()`` where $\eta\lambda_{\max}T$ is large); `rtol`, `atol`: its
      ``PIDController`` tolerances; `max_steps`: its step limit.
    - `gap_tol`, `on_degenerate`: as in :func:`top_singular_expansion`; with ``"raise"`` a
      degenerate $\sigma_1$ at $\theta^0$ (before compiling) or along $\bar w$ raises.

    **Returns:** a :class:`SpectralNormMoments`.

    **Raises:** as :func:`spectral_sde_coefficients`, and ``ValueError`` for a negative or zero
    horizon `n_steps`, a bad `save_every`, `rtol`/`atol` not positive, or an SDE-only solver.
    Memory: $P$ is $d \times d$ per saved step.
    """
    theta0, layout = _check_system(objective, noise, theta0, allow_covariance=False, name="theta0")
    n_steps, save_every = _check_horizon(n_steps, save_every)
    eta, tol, order = _prepare(theta0, eta, gap_tol, on_degenerate, order)
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    max_steps = check_positive_int("max_steps", max_steps)
    if solver is None:
        solver = dfx.Tsit5()
    if not isinstance(solver, dfx.AbstractSolver):
        raise TypeError(f"`solver` must be a diffrax solver, got {solver!r}.")
    _check_ode_solver(solver, "spectral_norm_moments")
    _raise_at_start(theta0, layout, tol, on_degenerate, "spectral_norm_moments")
    steps = _saved_steps(n_steps, save_every)
    ts = jnp.asarray(steps, eta.dtype) * eta
    out = _moments(objective, noise, theta0, eta, ts, layout, order, tol, solver, rtol, atol,
                   max_steps)  # fmt: skip
    if on_degenerate == "raise" and not isinstance(out["degenerate"], jax.core.Tracer):
        flags = np.asarray(out["degenerate"])
        if np.any(flags):
            k, layer = (int(i) for i in np.argwhere(flags)[0])
            raise ValueError(
                f"spectral_norm_moments: the top singular value of layer `{layout[layer].path}` "
                f"becomes degenerate along the gradient flow at step {int(steps[k])} (gap "
                f"{float(out['gap'][k, layer]):.3g}): the expansion needs a simple sigma1. Pass "
                "on_degenerate='fallback' to get NaN moments from there on (flag `degenerate`), "
                "or stop the horizon before the crossing."
            )
    return SpectralNormMoments(
        **out,
        steps=jnp.asarray(steps),
        times=ts,
        eta=eta,
        layers=tuple(layer.path for layer in layout),
        order=order,
    )


# --------------------------------------------------------------------------------------------
# (a) The joint SDE of the weights and the terms, path by path


class MonteCarloMoments(eqx.Module):
    r"""Mean and variance over paths with their standard errors: `mean_se` $= s/\sqrt N$,
    `variance_se` $= \sqrt{(m_4 - s^4)/N}$ ($m_4$ the fourth central moment; no normality
    assumed). `n` is the number of paths."""

    mean: Float[Array, "*shape"]
    mean_se: Float[Array, "*shape"]
    variance: Float[Array, "*shape"]
    variance_se: Float[Array, "*shape"]
    n: int = eqx.field(static=True)


def monte_carlo_moments(x: Float[ArrayLike, " path *shape"]) -> MonteCarloMoments:
    """:class:`MonteCarloMoments` of ``x`` over its leading (path) axis."""
    x = jnp.asarray(x)
    n = x.shape[0]
    mean = jnp.mean(x, axis=0)
    c = x - mean[None]
    var = jnp.sum(c**2, axis=0) / (n - 1)
    m4 = jnp.mean(c**4, axis=0)
    return MonteCarloMoments(
        mean, jnp.sqrt(var / n), var, jnp.sqrt(jnp.maximum(m4 - var**2, 0) / n), n
    )


class SpectralNormSDE(eqx.Module):
    r"""Paths of the joint Itô SDE of the weights and of the terms of $d\sigma_1$ (module
    docstring, §3(a)), at the saved steps (time $s = \eta t$).

    **Fields** (shape ``(path, step, layer)`` unless noted):

    - `sigma1`: $\sigma_1(W_l(s))$ from an exact SVD of the path's weights.
    - `drift`, `correction`, `noise`, `ito`: the running integrals from $0$ to $s$ of (i), the
      modified-equation correction, (ii) $\sqrt\eta\,g^\top B\,dB$ and (iii), each with its
      coefficient at the current $w$ (Itô).
    - `log_bound` (``(path, step)``): $\sum_l\log\sigma_1(W_l(s))$; `log_drift`, `log_noise`,
      `log_ito`, `log_quadratic_variation` (``(path, step)``): the integrals of
      $\sum_l(\text{drift} + \text{correction})/\sigma_l$, $\sum_l d(\text{noise})/\sigma_l$,
      $\sum_l\text{ito}/\sigma_l$ and $-\frac12\sum_l d\langle\sigma_l\rangle/\sigma_l^2$.
    - `degenerate_time`: the time the path spent with a degenerate $\sigma_1$ (gap below
      ``gap_tol``); the terms are not accumulated there (they have no meaning), so a nonzero
      value marks the path's decomposition as incomplete. A path that crosses
      $\sigma_1 = \sigma_2$ between sub-steps (probability one for a crossing of the mean
      path) is not degenerate at any sub-step, but $\sigma_1$ is not $C^2$ there and the
      `residual` shows how far Itô's formula is off.
    - `final_theta`: the weights at $s = \eta T$, leaves with a leading ``path`` axis.
    - `steps`, `times` (``(step,)``); `eta`; `layers`, `order`, `n_substeps` (static).

    Properties: `sigma1_ito` $= \sigma_1(0) +$ drift $+$ correction $+$ noise $+$ ito (the
    integrated SDE of §2) and `residual` $=$ `sigma1` $-$ `sigma1_ito` (Itô's formula
    discretised: mean $O(\delta)$, spread $O(\sqrt\delta)$). :meth:`moments` gives mean and
    variance over paths with standard errors.
    """

    sigma1: Float[Array, "path step layer"]
    drift: Float[Array, "path step layer"]
    correction: Float[Array, "path step layer"]
    noise: Float[Array, "path step layer"]
    ito: Float[Array, "path step layer"]
    log_bound: Float[Array, "path step"]
    log_drift: Float[Array, "path step"]
    log_noise: Float[Array, "path step"]
    log_ito: Float[Array, "path step"]
    log_quadratic_variation: Float[Array, "path step"]
    degenerate_time: Float[Array, "path step layer"]
    final_theta: PyTree[Array]
    steps: Int[Array, " step"]
    times: Float[Array, " step"]
    eta: Float[Array, ""]
    layers: tuple[str, ...] = eqx.field(static=True)
    order: int = eqx.field(static=True)
    n_substeps: int = eqx.field(static=True)

    @property
    def sigma1_ito(self) -> Float[Array, "path step layer"]:
        start = self.sigma1[:, :1]
        return start + self.drift + self.correction + self.noise + self.ito

    @property
    def residual(self) -> Float[Array, "path step layer"]:
        return self.sigma1 - self.sigma1_ito

    def moments(self, field: str = "sigma1") -> MonteCarloMoments:
        r"""Mean and variance over paths (with standard errors) of `field` (``"sigma1"``,
        ``"log_bound"``, ``"sigma1_ito"``, a term, ...)."""
        return monte_carlo_moments(getattr(self, field))


class _JointTerm(dfx.AbstractTerm):
    r"""$f(w)\,ds + G(w)\,dB$ with one evaluation of the layers' SVDs for both parts: `vf`
    returns (the drift, the diffusion operator), `contr` ($ds$, $dB$)."""

    fields: Callable = eqx.field(static=True)
    path: dfx.AbstractBrownianPath

    def vf(self, t, y, args):
        return self.fields(t, y)

    def contr(self, t0, t1, **kwargs):
        return t1 - t0, self.path.evaluate(t0, t1)

    def prod(self, vf, control):
        (drift, op), (ds, dB) = vf, control
        return jax.tree.map(lambda a, c: a * ds + c, drift, op.mv(dB))


def _sde_path(objective, noise, theta0, key, eta, grid, save_idx, layout, order, gap_tol, m):
    w0, unravel = ravel_pytree(theta0)
    dtype = w0.dtype
    L = len(layout)
    b = _drift(objective, unravel, eta, order)
    root = jnp.sqrt(eta)

    def fields(t, y):
        w = y[0]
        theta = unravel(w)
        loc = _local(objective, covariance_at(objective, noise, theta), w, unravel, layout, eta,
                     order, gap_tol)  # fmt: skip
        ok = ~loc.degenerate
        z = lambda x: jnp.where(ok, x, 0)
        inv = jnp.where(ok, K._safe_inv(loc.sigma1), 0)
        zero = jnp.zeros((L,), dtype)
        terms = jnp.stack([z(loc.drift), z(loc.correction), zero, z(loc.ito)], axis=-1)
        logs = jnp.stack(
            [
                jnp.sum(z(loc.drift + loc.correction) * inv),
                jnp.zeros((), dtype),
                jnp.sum(z(loc.ito) * inv),
                -0.5 * jnp.sum(z(loc.diffusion) * inv**2),
            ]
        )
        drift = (b(w), terms, logs, loc.degenerate.astype(dtype))
        B = noise.diffusion(objective, theta)

        def mv(dB):
            dw = root * B.mv(dB).astype(dtype)
            proj = jnp.stack(
                [K._mm(g, dw[la.start : la.stop]) for la, g in zip(layout, loc.g, strict=True)]
            )
            proj = z(proj)
            dterms = jnp.zeros((L, 4), dtype).at[:, 2].set(proj)
            dlogs = jnp.zeros((4,), dtype).at[1].set(jnp.sum(proj * inv))
            return dw, dterms, dlogs, zero

        op = lx.FunctionLinearOperator(mv, jax.ShapeDtypeStruct((m,), dtype))
        return drift, op

    bm = dfx.UnsafeBrownianPath(shape=jax.ShapeDtypeStruct((m,), dtype), key=key)
    y0 = (w0, jnp.zeros((L, 4), dtype), jnp.zeros((4,), dtype), jnp.zeros((L,), dtype))
    sol = dfx.diffeqsolve(
        _JointTerm(fields, bm),
        dfx.Euler(),
        grid[0],
        grid[-1],
        dt0=None,
        y0=y0,
        saveat=dfx.SaveAt(ts=grid[save_idx]),
        stepsize_controller=dfx.StepTo(ts=grid),
        max_steps=grid.shape[0],
        adjoint=dfx.ForwardMode(),  # (the only one UnsafeBrownianPath allows)
    )
    W, terms, logs, degen = sol.ys

    def sig(w):
        return jnp.stack(
            [
                jnp.linalg.svd(w[la.start : la.stop].reshape(la.m, la.n), compute_uv=False)[0]
                for la in layout
            ]
        )

    sigma1 = jax.vmap(sig)(W)
    return dict(
        sigma1=sigma1,
        drift=terms[..., 0],
        correction=terms[..., 1],
        noise=terms[..., 2],
        ito=terms[..., 3],
        log_bound=jnp.sum(jnp.log(sigma1), axis=-1),
        log_drift=logs[:, 0],
        log_noise=logs[:, 1],
        log_ito=logs[:, 2],
        log_quadratic_variation=logs[:, 3],
        degenerate_time=degen,
        final_theta=unravel(W[-1]),
    )


@eqx.filter_jit
def _sde(objective, noise, theta0, key, eta, grid, save_idx, layout, order, gap_tol, m, n_paths,
         chunk_size):  # fmt: skip
    keys = jax.vmap(lambda p: jax.random.fold_in(key, p))(jnp.arange(n_paths))

    def one(k):
        return _sde_path(objective, noise, theta0, k, eta, grid, save_idx, layout, order,
                         gap_tol, m)  # fmt: skip

    return jax.lax.map(one, keys, batch_size=chunk_size)


def spectral_norm_sde(
    objective: AbstractObjective,
    noise: AbstractNoise,
    theta0: PyTree[ArrayLike],
    eta: float | Float[ArrayLike, ""],
    *,
    key: PRNGKeyArray,
    n_paths: int,
    n_steps: int,
    save_every: int = 1,
    order: int = 2,
    n_substeps: int = 8,
    chunk_size: int | None = None,
    gap_tol: float | Float[ArrayLike, ""] | None = None,
    on_degenerate: str = "raise",
) -> SpectralNormSDE:
    r"""Integrate the SDE of the weights jointly with the three terms of $d\sigma_1(W_l)$
    (module docstring, §3(a)) over ``n_paths`` independent Brownian paths.

    Each path is one ``diffrax.diffeqsolve`` with ``diffrax.Euler()`` (Euler–Maruyama, the Itô
    scheme) on the fixed grid $\delta = \eta/$``n_substeps`` (``StepTo``) and a
    ``diffrax.UnsafeBrownianPath`` keyed by ``fold_in(key, p)`` (path $p$); the diffusion is
    ``noise.diffusion`` ($BB^\top = \Sigma$), as in ``lspsde.SGDLimit``. Per sub-step: one
    gradient (and a Hessian-vector product for ``order=2``), one SVD per layer, and the noise
    projections of :func:`spectral_noise_terms` in the form of :func:`gradient_noise_covariance`
    (the per-example factor for ``MinibatchNoise``: no $d \times d$ matrix). Weak error
    $O(\eta^2 + \delta)$ against SGD (``order=2``).

    **Arguments:**

    - `objective`, `noise`, `theta0`, `eta`, `order`, `gap_tol`: as in
      :func:`spectral_norm_moments`.
    - `key`: a JAX PRNG key; `n_paths`: the number of paths.
    - `n_steps`, `save_every`: the horizon $T$ in SGD steps and the saved-step stride.
    - `n_substeps`: Euler–Maruyama steps per SGD step (default 8).
    - `chunk_size`: paths per batch of the ``lax.map`` over paths (default: all at once).
    - `on_degenerate`: ``"raise"`` refuses a degenerate $\sigma_1$ at $\theta^0$ before
      compiling; along a path a degenerate $\sigma_1$ is data (`degenerate_time`), never an
      error.

    **Returns:** a :class:`SpectralNormSDE`.

    **Raises:** as :func:`spectral_norm_moments`, and for a bad `key`, `n_paths`, `n_substeps`
    or `chunk_size`.
    """
    theta0, layout = _check_system(objective, noise, theta0, allow_covariance=False, name="theta0")
    check_key(key)
    n_paths = check_positive_int("n_paths", n_paths)
    n_steps, save_every = _check_horizon(n_steps, save_every)
    n_substeps = check_positive_int("n_substeps", n_substeps)
    if chunk_size is not None:
        chunk_size = min(check_positive_int("chunk_size", chunk_size), n_paths)
    eta, tol, order = _prepare(theta0, eta, gap_tol, on_degenerate, order)
    _raise_at_start(theta0, layout, tol, on_degenerate, "spectral_norm_sde")
    m = jax.eval_shape(lambda th: noise.diffusion(objective, th), theta0).in_size()
    steps = _saved_steps(n_steps, save_every)
    grid = jnp.arange(n_steps * n_substeps + 1, dtype=eta.dtype) * (eta / n_substeps)
    save_idx = jnp.asarray(steps * n_substeps)
    out = _sde(objective, noise, theta0, key, eta, grid, save_idx, layout, order, tol, m,
               n_paths, chunk_size)  # fmt: skip
    return SpectralNormSDE(
        **out,
        steps=jnp.asarray(steps),
        times=grid[save_idx],
        eta=eta,
        layers=tuple(layer.path for layer in layout),
        order=order,
        n_substeps=n_substeps,
    )
