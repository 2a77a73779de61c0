r"""The Learning Stability Profile (Section 2, Definition 6.1 in the smooth case).

For a learning system with joint state $S^t = (X_0^t, \dots, X_L^t, \theta^t)$ the profile
records, at depth $k$ and training step $t$, the operator 2-norms of the Jacobian blocks of the
one-step learning map

$$\sigma^x_{k,t} = \Big\|\frac{\partial f_k}{\partial x}(X_{k,t}; \theta^t)\Big\|_2, \quad
\sigma^\theta_t = \Big\|\frac{\partial \mathcal{A}_t}{\partial \theta}(\theta^t, u^t)\Big\|_2,\quad
\sigma^u_t = \Big\|\frac{\partial \mathcal{A}_t}{\partial u}(\theta^t, u^t)\Big\|_2,$$

and the cumulative sensitivities $\|\partial X_{k,t} / \partial X_{0}\|_2$ (depth, at fixed
$\theta^t$), $\|\partial\theta^t / \partial\theta^0\|_2$ and
$\|\partial\theta^t / \partial(u^0, \dots, u^{t-1})\|_2$ (time, along the realised trajectory).
Representation quantities are suprema over the probe inputs (the $\sup_x$ of Theorem 4.1).

Norms are matrix-free by default (Golub–Kahan–Lanczos on JVP/VJP products from
``lspsde.linalg``): no Jacobian is ever materialised, so networks with $10^5$–$10^6$ parameters
are fine. ``method="dense"`` materialises the Jacobians and takes exact SVDs, for small systems
and for cross-checks.
"""

import dataclasses
from typing import Any, Literal

import equinox as eqx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree
import numpy as np

from . import linalg
from ._checks import check_positive_int
from ._cumulative import log_cumulative_norms
from ._ensemble import as_system, check_key, check_run, check_start, check_step, saved_steps
from .nonsmooth.clarke import Affine, Elementwise, generalized_jacobian_norm, prox_chain
from .nonsmooth.constraints import Ball, Box, Simplex
from .nonsmooth.flows import AbstractProximalFlow
from .nonsmooth.regularizers import L1, L2, ElasticNet
from .representation import ACTIVATIONS, AbstractRepresentationFlow, Feedforward
from .system import LearningSystem, parameter_trajectory

Method = Literal["auto", "lanczos", "power", "dense"]
_METHODS = ("auto", "lanczos", "power", "dense")
DENSE_MAX = 256  # "auto": representation blocks up to this width are computed exactly
TIME_BLOCKS = (
    "sigma_theta",
    "sigma_u",
    "cum_theta",
    "cum_u",
    "log_cum_theta",
    "log_cum_u",
    "loss",
)
"""The profile's blocks over training time (dims ``(step,)``), as written to results."""
DEPTH_BLOCKS = ("sigma_x", "cum_x")
"""The profile's depth blocks (dims ``(step, layer)``)."""


class NormOptions(eqx.Module):
    """How operator norms are computed: ``method`` and the iteration controls.

    ``"auto"`` takes exact dense norms for representation blocks whose widths are all at most
    ``DENSE_MAX`` (a width x width Jacobian is cheap, exact, and compiles ~10x faster than an
    iterative solver), and Lanczos for everything else (parameter and update blocks, wide layers).
    """

    method: str = eqx.field(static=True, default="auto")
    max_steps: int = eqx.field(static=True, default=64)
    rtol: float = eqx.field(static=True, default=1e-6)

    def __check_init__(self):
        if self.method not in _METHODS:
            raise ValueError(f"Unknown norm method {self.method!r}; choose one of {_METHODS}.")
        check_positive_int("max_steps", self.max_steps)
        if not 0.0 < self.rtol < 1.0:
            raise ValueError(f"`rtol` must lie in (0, 1), got {self.rtol!r}.")

    def norm(self, f, x) -> tuple[Float[Array, ""], Bool[Array, ""]]:
        """``(||df/dx(x)||_2, converged)``."""
        if self.method == "dense":
            return linalg.dense_jacobian_norm(f, x), jnp.array(True)
        method = "lanczos" if self.method == "auto" else self.method
        res = linalg.jacobian_norm(f, x, method=method, max_steps=self.max_steps, rtol=self.rtol)
        return res.value, res.converged


class RepresentationProfile(eqx.Module):
    r"""Depth blocks of the profile for a batch of probe inputs.

    - ``sigma_x[i, k]`` $= \|\partial f_k / \partial x (X_k^{(i)})\|_2$, $k = 0..L-1$.
    - ``cumulative[i, k]`` $= \|\partial X_{k+1}^{(i)} / \partial X_0^{(i)}\|_2$.
    - ``converged``: every matrix-free estimate met its tolerance.
    """

    sigma_x: Float[Array, "n L"]
    cumulative: Float[Array, "n L"]
    converged: Bool[Array, ""]


def _prefix(flow: AbstractRepresentationFlow, depth: int):
    def f(x):
        for k in range(depth):
            x = flow.layer(k, x)
        return x

    return f


def _one_sample(flow: AbstractRepresentationFlow, x: Array, options: NormOptions):
    xs = flow.trajectory(x)
    L = flow.depth
    sig, cum, ok = [], [], []
    dense = options.method == "dense" or (
        options.method == "auto" and max(z.size for z in xs) <= DENSE_MAX
    )
    if dense:
        # Exact: per-layer Jacobians, cumulative products by matrix multiplication.
        J = None
        for k in range(L):
            Jk = jax.jacfwd(lambda z, k=k: flow.layer(k, z))(xs[k])
            Jk = Jk.reshape(xs[k + 1].size, xs[k].size)
            J = Jk if J is None else Jk @ J
            sig.append(jnp.linalg.norm(Jk, 2))
            cum.append(jnp.linalg.norm(J, 2))
        return jnp.stack(sig), jnp.stack(cum), jnp.array(True)
    for k in range(L):
        s, c1 = options.norm(lambda z, k=k: flow.layer(k, z), xs[k])
        c, c2 = options.norm(_prefix(flow, k + 1), x)
        sig.append(s)
        cum.append(c)
        ok += [c1, c2]
    return jnp.stack(sig), jnp.stack(cum), jnp.all(jnp.stack(ok))


@eqx.filter_jit
def _representation_profile(flow, probes, options):
    sig, cum, ok = jax.vmap(lambda x: _one_sample(flow, x, options))(probes)
    return RepresentationProfile(sig, cum, jnp.all(ok))


def representation_profile(
    flow: AbstractRepresentationFlow,
    probes: ArrayLike,
    *,
    method: str = "auto",
    max_steps: int = 64,
    rtol: float = 1e-6,
) -> RepresentationProfile:
    r"""The depth blocks $\sigma^x_k$ and $\|\partial X_{k+1}/\partial X_0\|_2$ at each probe.

    **Arguments:**

    - `flow`: a representation flow (``Feedforward``, ``Residual``, ``LayerSequence``).
    - `probes`: inputs $X_0$, shape ``(n, d_0)``.
    - `method`: ``"auto"`` (default: exact for widths up to ``DENSE_MAX``, else Lanczos),
      ``"lanczos"`` (matrix-free), ``"power"`` or ``"dense"`` (exact SVD everywhere).
    - `max_steps`, `rtol`: iteration controls of the matrix-free methods.

    **Returns:** a [`RepresentationProfile`][lspsde.profile.RepresentationProfile]; take
    ``.max(axis=0)`` over probes for the $\sup_x$ of Theorem 4.1.
    """
    if not isinstance(flow, AbstractRepresentationFlow):
        raise TypeError(f"`flow` must be a representation flow, got {type(flow).__name__}.")
    probes = jnp.asarray(probes)
    if probes.ndim != 2:
        raise ValueError(f"`probes` must have shape (n, d_0), got {probes.shape}.")
    jax.eval_shape(flow, probes[0])  # shape errors surface here, before compilation
    options = NormOptions(method, max_steps, rtol)
    return _representation_profile(flow, probes, options)


class StabilityProfile(eqx.Module):
    r"""The Learning Stability Profile along a training run, at the saved steps ``steps``.

    Time blocks (shape ``(T_saved,)``): ``sigma_theta``, ``sigma_u`` (one-step),
    ``log_cum_theta`` $= \log\|\partial\theta^t/\partial\theta^0\|_2$ and
    ``log_cum_u`` $= \log\|\partial\theta^t/\partial(u^0..u^{t-1})\|_2$ ($-\infty$ at
    $t = 0$), computed in the log domain (renormalised products, ``lspsde._cumulative``) so
    that they are right at any horizon, contracting or exploding; ``cum_theta`` and ``cum_u``
    are their exponentials (``inf`` past the float range: use the logs), and ``loss``.
    Depth blocks (shape ``(T_saved, L)``, ``None`` without a representation): ``sigma_x``
    and ``cum_x``, suprema over the probes. ``sigma_u`` and ``cum_u`` are ``None`` when the
    update noise is discrete (minibatch indices), where no derivative in $u$ exists.
    """

    steps: Int[Array, " T"]
    sigma_theta: Float[Array, " T"]
    sigma_u: Float[Array, " T"] | None
    log_cum_theta: Float[Array, " T"]
    log_cum_u: Float[Array, " T"] | None
    loss: Float[Array, " T"]
    sigma_x: Float[Array, "T L"] | None
    cum_x: Float[Array, "T L"] | None
    converged: Bool[Array, ""]
    n_steps: int = eqx.field(static=True)
    depth: int = eqx.field(static=True)
    generalized: "GeneralizedSignatures | None" = None

    @property
    def cum_theta(self) -> Float[Array, " T"]:
        r"""$\|\partial\theta^t/\partial\theta^0\|_2$ (``inf`` past the float range)."""
        return jnp.exp(self.log_cum_theta)

    @property
    def cum_u(self) -> Float[Array, " T"] | None:
        r"""$\|\partial\theta^t/\partial u^{0:t}\|_2$ (0 at $t = 0$)."""
        return None if self.log_cum_u is None else jnp.exp(self.log_cum_u)

    def generalized_profile(self) -> "StabilityProfile":
        r"""This profile with the Clarke-generalised blocks (Definition 6.1) in place of
        autodiff's: ``sigma_theta``, ``sigma_u``, ``sigma_x`` are $\sigma^{\cdot,C}$, and the
        cumulative blocks are their chain-rule bounds (see [`GeneralizedSignatures`][]), so that
        ``lspsde.stability_exponents`` of it gives the chain-rule bounds on the generalised
        growth rates. **Raises:** ``ValueError`` for a profile computed without
        ``generalized=True``."""
        g = self.generalized
        if g is None:
            raise ValueError(
                "This profile has no generalised signatures: compute it with "
                "learning_profile(..., generalized=True)."
            )
        return StabilityProfile(
            steps=self.steps,
            sigma_theta=g.sigma_theta,
            sigma_u=g.sigma_u,
            log_cum_theta=g.log_cum_theta,
            log_cum_u=g.log_cum_u,
            loss=self.loss,
            sigma_x=g.sigma_x,
            cum_x=g.cum_x,
            converged=self.converged,
            n_steps=self.n_steps,
            depth=self.depth,
        )


@eqx.filter_jit
def _learning_profile(system, theta0, key, n_steps, save_every, options, keep_states=False):
    states, us = parameter_trajectory(system, theta0, n_steps=n_steps, key=key)
    steps = jnp.asarray(saved_steps(n_steps, save_every))
    discrete_u = not all(jnp.issubdtype(u.dtype, jnp.inexact) for u in jax.tree.leaves(us))
    cum_method = "lanczos" if options.method == "auto" else options.method
    # The blocks differentiate the carried state's dynamical leaves (theta, and a flow's
    # optimiser state: `update.differentiated`); the others (a step count, an injected
    # hyperparameter) are held at their values along the path.
    spec = system.update.differentiated(system.init_state(theta0))
    floats, ints = eqx.partition(states, spec)
    at_step = lambda tree, s: jax.tree.map(lambda a: a[s], tree)

    def step_map(s, x, u):
        new = system.parameter_map(s, eqx.combine(x, at_step(ints, s)), u)
        return eqx.filter(new, spec)

    def at(t):
        x_t = at_step(floats, t)
        theta_t = system.params(eqx.combine(x_t, at_step(ints, t)))
        u_t = system.noise_at(key, t, eqx.combine(x_t, at_step(ints, t)))
        s_th, ok1 = options.norm(lambda x: step_map(t, x, u_t), x_t)
        c_th, ok3, c_u, ok4 = log_cumulative_norms(
            step_map,
            floats,
            us,
            t,
            method=cum_method,
            max_steps=options.max_steps,
            rtol=options.rtol,
            with_u=not discrete_u,
        )
        if discrete_u:  # u is data indices: no derivative in u exists
            s_u = jnp.array(0.0)
            ok2 = jnp.array(True)
        else:
            s_u, ok2 = options.norm(lambda u: step_map(t, x_t, u), u_t)
        loss = system.objective.loss(theta_t)
        ok = ok1 & ok2 & ok3 & ok4
        if system.representation is None:
            return (s_th, s_u, c_th, c_u, loss, ok)
        rep = _representation_profile(system.network(theta_t), system.probes, options)
        return (
            s_th,
            s_u,
            c_th,
            c_u,
            loss,
            ok & rep.converged,
            rep.sigma_x.max(axis=0),
            rep.cumulative.max(axis=0),
        )

    out = jax.lax.map(at, steps)  # sequential over time: memory stays that of one step
    sigma_x = cum_x = None
    if system.representation is not None:
        sigma_x, cum_x = out[6], out[7]
    depth = 0 if system.representation is None else system.representation.depth
    profile = StabilityProfile(
        steps=steps,
        sigma_theta=out[0],
        sigma_u=None if discrete_u else out[1],
        log_cum_theta=out[2],
        log_cum_u=None if discrete_u else out[3],
        loss=out[4],
        sigma_x=sigma_x,
        cum_x=cum_x,
        converged=jnp.all(out[5]),
        n_steps=n_steps,
        depth=depth,
    )
    if keep_states:  # the carried states at the saved steps, for the generalised signatures
        return profile, jax.tree.map(lambda a: a[steps], states)
    return profile


def learning_profile(
    system: Any,  # LearningSystem | (objective, update, noise): checked by as_system
    theta0: PyTree[Array],
    *,
    key: PRNGKeyArray,
    n_steps: int,
    save_every: int = 1,
    method: str = "auto",
    max_steps: int = 64,
    rtol: float = 1e-6,
    generalized: Any = False,
    tol: Any = 1e-9,
    max_kinks: Any = 16,
) -> StabilityProfile:
    r"""The Learning Stability Profile of ``system`` over ``n_steps`` steps from $\theta^0$.

    **Arguments:**

    - `system`: a [`LearningSystem`][lspsde.system.LearningSystem] (with a representation
      and probes for the depth blocks), or a tuple ``(objective, update, noise)``: the one way
      ``simulate``, ``learning_profile`` and ``exponent_distribution`` take a system.
    - `theta0`: the initial parameters $\theta^0$ (a pytree of real floating arrays, finite).
    - `key`: PRNG key of the update noise (step $t$ uses ``fold_in(key, t)``); required, as
      everywhere in lspsde.
    - `n_steps`: the training horizon $T \ge 1$.
    - `save_every`: the profile is evaluated at $t = 0, s, 2s, \dots$ and at $T$.
    - `method`, `max_steps`, `rtol`: as in [`representation_profile`][]; with ``"auto"`` the
      parameter and update blocks are always matrix-free.
    - `generalized`: also compute the Clarke-generalised signatures of Definition 6.1 beside
      autodiff's (the profile's ``generalized`` field, a [`GeneralizedSignatures`][]; see
      there for what is classified); `tol` and `max_kinks` as in
      ``lspsde.generalized_jacobian_norm``.

    **Returns:** a [`StabilityProfile`][lspsde.profile.StabilityProfile]. Cumulative time blocks
    differentiate through the realised trajectory (the noise draws held fixed), in the log
    domain; their cost grows with $t$: choose ``save_every`` accordingly.

    **Raises:** ``TypeError``/``ValueError`` before compilation for a bad system, key, count,
    norm option or ``theta0`` (not real floating, not finite, or not mapped to its own shape by
    one update step), with the same checks and messages as ``simulate``; with
    ``generalized=True``, ``TypeError`` for a flow, regulariser or representation whose kinks
    cannot be classified (the message lists those that can) and ``ValueError`` for a bad `tol`
    or `max_kinks`.
    """
    system, batched, _ = as_system(system, "learning_profile")
    if batched is not None:
        raise TypeError(
            "`learning_profile` follows one path of one system; for a grid of flows or noise "
            "models use `exponent_distribution` with the Sweep (the profile of every path)."
        )
    run = check_run(
        n_paths=1,
        n_steps=n_steps,
        save_every=save_every,
        chunk_size=None,
        divergence_threshold=1e8,
    )
    options = NormOptions(method, max_steps, rtol)
    check_key(key)
    if not isinstance(generalized, bool):
        raise TypeError(f"`generalized` must be True or False, got {generalized!r}.")
    if generalized:
        tol, max_kinks = _check_clarke_options(tol, max_kinks)
        _check_generalized(system)
    theta0 = check_start(theta0)
    check_step(system, theta0, key, run.n_steps)
    if not generalized:
        return _learning_profile(system, theta0, key, run.n_steps, run.save_every, options)
    profile, saved = _learning_profile(
        system, theta0, key, run.n_steps, run.save_every, options, True
    )
    signatures = _generalized_signatures(
        system, profile, saved, key, tol, max_kinks, run.save_every
    )
    return dataclasses.replace(profile, generalized=signatures)


# --------------------------------------------------------------------------------------------
# Generalised (Clarke) signatures: Definition 6.1, and the exponents of Definition 6.2
# --------------------------------------------------------------------------------------------

_LEAKY_SLOPE = 0.1  # ACTIVATIONS["leaky_relu"] is jax.nn.leaky_relu(x, 0.1)
_PIECEWISE = {
    "relu": lambda: Elementwise("relu"),
    "leaky_relu": lambda: Elementwise("leaky_relu", slope=_LEAKY_SLOPE),
    "hard_tanh": lambda: Elementwise("hard_tanh"),
}
_PROX_TERMS = (L1, L2, ElasticNet, Box, Ball, Simplex)


def _smooth_flows() -> tuple[type, ...]:
    from .adaptive import HeavyBall
    from .limits import AbstractContinuousLimit
    from .parameter import SGD

    return (SGD, HeavyBall, AbstractContinuousLimit)


def _check_clarke_options(tol: Any, max_kinks: Any) -> tuple[float, int]:
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not np.isfinite(tol):
        raise ValueError(f"`tol` must be a finite number >= 0, got {tol!r}.")
    if tol < 0:
        raise ValueError(f"`tol` must be finite and non-negative, got {tol!r} (0: exact kinks).")
    return float(tol), check_positive_int("max_kinks", max_kinks, minimum=0)


def _check_generalized(system: LearningSystem) -> None:
    """What the generalised profile can classify, checked before anything is compiled."""
    flow = system.update
    if isinstance(flow, AbstractProximalFlow):
        if not isinstance(flow.term(), _PROX_TERMS):
            raise TypeError(
                f"generalized=True cannot classify the kinks of the prox of "
                f"{type(flow.term()).__name__}; supported: L1, L2, ElasticNet, Box, Ball, "
                "Simplex."
            )
    elif not isinstance(flow, _smooth_flows()):
        raise TypeError(
            f"generalized=True cannot classify the kinks of {type(flow).__name__}: supported "
            "are ProximalGradient and ProjectedGradient (their prox / projection, Clarke "
            "sets enumerated) and the smooth flows SGD, HeavyBall, GradientFlow, SGDLimit "
            "(autodiff's Jacobian is the Clarke Jacobian where the objective is twice "
            "differentiable, Lemma A.1)."
        )
    rep = system.representation
    if rep is not None and not isinstance(rep, Feedforward):
        raise TypeError(
            f"generalized=True classifies the layers of a Feedforward network (piecewise-linear "
            f"activations {sorted(_PIECEWISE)}, or smooth ones); got a "
            f"{type(rep).__name__} representation, whose kinks cannot be classified. For its "
            "layers use lspsde.generalized_jacobian_norm on a chain of Affine / Elementwise / "
            "MaxPool pieces."
        )


class GeneralizedRepresentationProfile(eqx.Module):
    r"""Depth blocks of the generalised profile for a batch of probes (Definition 6.1).

    - ``sigma_x[i, k]`` $= \sup_{V\in\partial_C f_k(X_k^{(i)})}\|V\|_2$ (or a certified bound
      where ``exact[i, k]`` is false);
    - ``autodiff[i, k]``: $\|\,$``jax.jacobian`` of layer $k\,\|_2$, the element JAX picks;
    - ``cumulative[i, k]`` $= \prod_{j \le k}$ ``sigma_x[i, j]``, the chain-rule bound on
      $\sup\|V\|$ over the Clarke Jacobian of $X_0 \mapsto X_{k+1}$;
    - ``n_kinks[i, k]``: pre-activations within ``tol`` of a kink.
    """

    sigma_x: Float[Array, "n L"]
    autodiff: Float[Array, "n L"]
    cumulative: Float[Array, "n L"]
    exact: Bool[Array, "n L"]
    n_kinks: Int[Array, "n L"]


@eqx.filter_jit
def _pre_activations(flow: Feedforward, probes: Array) -> tuple[tuple[Array, ...], list]:
    xs = jax.vmap(flow.trajectory)(probes)
    pre = [x @ W.T + b[None, :] for x, W, b in zip(xs[:-1], flow.weights, flow.biases, strict=True)]
    return xs, pre


@eqx.filter_jit
def _scaled_norms(W: Array, D: Array) -> Array:
    r"""$\|\operatorname{diag}(D_i) W\|_2$ for every row $D_i$."""
    return jnp.linalg.norm(D[:, :, None] * W[None], ord=2, axis=(1, 2))


def _layer_kind(flow: Feedforward, k: int) -> str:
    last = k == flow.depth - 1 and not flow.final_activation
    return "identity" if last else flow.activation


def _generalized_layers(
    flow: Feedforward, probes: Array, tol: float, max_kinks: int
) -> GeneralizedRepresentationProfile:
    xs, pre = _pre_activations(flow, probes)
    sig, ad, ex, nk = [], [], [], []
    for k, (W, b, Z) in enumerate(zip(flow.weights, flow.biases, pre, strict=True)):
        kind = _layer_kind(flow, k)
        act = ACTIVATIONS[kind][0]
        d_ad = jax.vmap(jax.vmap(jax.grad(act)))(Z)  # JAX's selection at a kink
        autodiff = np.array(_scaled_norms(W, d_ad))
        value, exact = autodiff.copy(), np.ones(Z.shape[0], bool)
        kinks = np.zeros(Z.shape[0], int)
        if kind in _PIECEWISE:
            piece = _PIECEWISE[kind]()
            d, at, _, _ = jax.vmap(piece.slopes, in_axes=(0, None))(Z, tol)
            if not np.array_equal(np.asarray(d), np.asarray(d_ad)):  # else: the same norms
                value = np.array(_scaled_norms(W, d))  # the classical norm off the kinks
            for i in np.flatnonzero(np.asarray(at).any(axis=1)):
                res = generalized_jacobian_norm(
                    [Affine(W, b), piece], xs[k][i], tol=tol, max_kinks=max_kinks
                )
                value[i], exact[i], kinks[i] = float(res.value), res.exact, res.n_kinks
        sig.append(value)
        ad.append(autodiff)
        ex.append(exact)
        nk.append(kinks)
    sig = np.stack(sig, axis=1)
    return GeneralizedRepresentationProfile(
        sigma_x=jnp.asarray(sig),
        autodiff=jnp.asarray(np.stack(ad, axis=1)),
        cumulative=jnp.asarray(np.cumprod(sig, axis=1)),
        exact=jnp.asarray(np.stack(ex, axis=1)),
        n_kinks=jnp.asarray(np.stack(nk, axis=1)),
    )


def generalized_representation_profile(
    flow: Any,
    probes: ArrayLike,
    *,
    tol: Any = 1e-9,
    max_kinks: Any = 16,
) -> GeneralizedRepresentationProfile:
    r"""The generalised depth signatures $\sigma^{x,C}_k$ (Definition 6.1, fixed parameters) of
    a ``Feedforward`` network at each probe, beside autodiff's.

    Layer $k$ is the chain ``[Affine(W_k, b_k), Elementwise(activation)]``: for ReLU, leaky ReLU
    and hard-tanh the supremum over $\{DW_k\}$, $D$ diagonal with entries between the one-sided
    slopes at the kinked pre-activations ($\le \|W_k\|_2$ for slopes in $[0, 1]$, Section
    6.6), by ``lspsde.generalized_jacobian_norm``; probes with no unit within `tol` of a kink
    take the classical norm $\|D W_k\|_2$ directly (the same number, Lemma A.1, batched).
    Smooth activations (tanh, sigmoid, gelu, identity, a last layer without activation) give
    autodiff's norm, exactly. Norms are dense (exact SVDs of ``width x width`` matrices).

    **Raises:** ``TypeError`` for a flow that is not a ``Feedforward``; ``ValueError`` for
    probes that are not ``(n, d_0)`` or a bad `tol` / `max_kinks`.
    """
    if not isinstance(flow, Feedforward):
        raise TypeError(
            f"generalized_representation_profile classifies the layers of a Feedforward "
            f"network, got {type(flow).__name__}; for other layers use "
            "lspsde.generalized_jacobian_norm on a chain of pieces."
        )
    tol, max_kinks = _check_clarke_options(tol, max_kinks)
    probes = jnp.asarray(probes, dtype=float)
    if probes.ndim != 2:
        raise ValueError(f"`probes` must have shape (n, d_0), got {probes.shape}.")
    jax.eval_shape(flow, probes[0])
    return _generalized_layers(flow, probes, tol, max_kinks)


class GeneralizedSignatures(eqx.Module):
    r"""The generalised Learning Stability Profile (Definition 6.1) at the saved steps, beside
    autodiff's (the enclosing ``StabilityProfile``'s own fields).

    - ``sigma_theta[t]`` $= \sigma^{\theta,C}_t = \sup_{V\in\partial_C\Phi_t}\|V_\theta\|_2$,
      ``sigma_u[t]`` $= \sigma^{u,C}_t$ (``None`` for discrete draws), ``sigma_x[t, k]`` $=
      \sup_i\sigma^{x,C}_{k,t}(X^{(i)}_{k,t})$ over the probes (``None`` without a
      representation).
    - ``exact_*``: the Clarke set was enumerated (otherwise the value is a certified upper
      bound, see ``lspsde.generalized_jacobian_norm``); ``n_kinks_*``: kinked coordinates
      found (depth: summed over probes).
    - Chain-rule bounds of the cumulative sensitivities: ``cum_x[t, k]`` $= \sup_i\prod_{j \le
      k}\sigma^{x,C}_{j,t}(X^{(i)})$; ``log_cum_theta[t]`` $= \sum_{s<t}\log\sigma^{\theta,C}_s$
      and ``log_cum_u[t]`` $= \frac12\log c_t^2$, $c_{s+1}^2 = (\sigma^{\theta,C}_s c_s)^2 +
      (\sigma^{u,C}_s)^2$ ($\|[AX, B]\|^2 \le \|A\|^2\|X\|^2 + \|B\|^2$): they need every step
      (``save_every=1``) and are NaN otherwise.

    **What is classified.** Proximal and projected flows (``ProximalGradient`` with ``L1``,
    ``L2``, ``ElasticNet`` or a constraint; ``ProjectedGradient`` with ``Box``, ``Ball``,
    ``Simplex``): the step is $\operatorname{prox}_{\eta R}(y)$, $y = \theta - \eta G(\theta,
    u)$, so $\partial_C\Phi_t = \partial_C\operatorname{prox}(y)\cdot\partial y$ with the
    prox's Clarke set enumerated (``lspsde.nonsmooth.prox_chain``) and $\partial y/\partial
    \theta$, $\partial y/\partial u$ dense Jacobians (so for small parameter counts). The smooth
    flows (``SGD``, ``HeavyBall``, ``GradientFlow``, ``SGDLimit``) have no kink of their own:
    their values are autodiff's (``exact``). In both cases the objective's own Hessian is
    autodiff's: exact where $\mathcal{L}$ is twice differentiable at $\theta^t$ (every objective
    of ``models.objectives``; a ReLU network's loss off its kinks, which a trajectory visits
    with probability 0); the objective's kinks are not classified. Depth: the layers of a
    ``Feedforward`` network (``generalized_representation_profile``).
    """

    sigma_theta: Float[Array, " T"]
    sigma_u: Float[Array, " T"] | None
    sigma_x: Float[Array, "T L"] | None
    cum_x: Float[Array, "T L"] | None
    log_cum_theta: Float[Array, " T"]
    log_cum_u: Float[Array, " T"] | None
    exact_theta: Bool[Array, " T"]
    exact_u: Bool[Array, " T"] | None
    exact_x: Bool[Array, "T L"] | None
    n_kinks_theta: Int[Array, " T"]
    n_kinks_u: Int[Array, " T"] | None
    n_kinks_x: Int[Array, "T L"] | None
    tol: float = eqx.field(static=True)
    max_kinks: int = eqx.field(static=True)

    @property
    def exact(self) -> bool:
        """Every signature is exact (none is only a bound)."""
        parts = [self.exact_theta, self.exact_u, self.exact_x]
        return all(bool(np.all(np.asarray(p))) for p in parts if p is not None)


@eqx.filter_jit
def _step_jacobians(system: LearningSystem, t: Array, theta: PyTree, u: PyTree, with_u: bool):
    r"""$y = \theta - \eta_t G(\theta, u)$ of a proximal flow, flattened, and its Jacobians in
    $\theta$ and (with_u) in $u$."""
    flow, noise = system.update, system.noise.at_time(t)
    eta = flow.step_size(t)
    x, unravel = ravel_pytree(theta)

    def pre(v, w):
        th = unravel(v)
        g = noise.gradient(system.objective, th, w)
        return ravel_pytree(jax.tree.map(lambda p, q: p - eta * q, th, g))[0]

    y = pre(x, u)
    J_theta = jax.jacfwd(lambda v: pre(v, u))(x)
    if not with_u:
        return eta, x, y, J_theta, None, None
    uf, unravel_u = ravel_pytree(u)
    J_u = jax.jacfwd(lambda w: pre(x, unravel_u(w)))(uf)
    return eta, x, y, J_theta, uf, J_u


def _clarke(J: Array, y: Array, at: Array, pieces: list, tol: float, max_kinks: int):
    """The Clarke norm of ``prox(y + J (v - at))`` in ``v`` at ``at``."""
    return generalized_jacobian_norm(
        [Affine(J, y - J @ at), *pieces], at, tol=tol, max_kinks=max_kinks
    )


def _cumulative_bounds(sig_th: np.ndarray, sig_u: np.ndarray | None) -> tuple:
    with np.errstate(divide="ignore"):
        log_th = np.log(sig_th)
        log_th = np.concatenate([[0.0], np.cumsum(log_th[:-1])])
        if sig_u is None:
            return log_th, None
        log_c = np.full(sig_th.size, -np.inf)
        for t in range(sig_th.size - 1):
            log_c[t + 1] = 0.5 * np.logaddexp(
                2 * (np.log(sig_th[t]) + log_c[t]), 2 * np.log(sig_u[t])
            )
    return log_th, log_c


def _generalized_signatures(system, profile, saved, key, tol, max_kinks, save_every):
    steps = np.asarray(profile.steps)
    S = steps.size
    flow = system.update
    with_u = profile.sigma_u is not None
    sig_th = np.asarray(profile.sigma_theta, dtype=float).copy()
    ex_th, nk_th = np.ones(S, bool), np.zeros(S, int)
    sig_u = np.asarray(profile.sigma_u, dtype=float).copy() if with_u else None
    ex_u = np.ones(S, bool) if with_u else None
    nk_u = np.zeros(S, int) if with_u else None
    rep = system.representation
    L = 0 if rep is None else rep.depth
    sig_x, cum_x = np.zeros((S, L)), np.zeros((S, L))
    ex_x, nk_x = np.ones((S, L), bool), np.zeros((S, L), int)
    for j, t in enumerate(steps):
        state = jax.tree.map(lambda a, j=j: a[j], saved)
        theta = system.params(state)
        if isinstance(flow, AbstractProximalFlow):
            u = system.noise_at(key, jnp.asarray(t), state)
            eta, x, y, J_th, uf, J_u = _step_jacobians(system, jnp.asarray(t), theta, u, with_u)
            pieces = prox_chain(flow.term(), eta, theta)
            res = _clarke(J_th, y, x, pieces, tol, max_kinks)
            sig_th[j], ex_th[j], nk_th[j] = float(res.value), res.exact, res.n_kinks
            if with_u:
                res = _clarke(J_u, y, uf, pieces, tol, max_kinks)
                sig_u[j], ex_u[j], nk_u[j] = float(res.value), res.exact, res.n_kinks
        if rep is not None:
            layers = _generalized_layers(system.network(theta), system.probes, tol, max_kinks)
            sig_x[j] = np.asarray(layers.sigma_x).max(axis=0)
            cum_x[j] = np.asarray(layers.cumulative).max(axis=0)
            ex_x[j] = np.asarray(layers.exact).all(axis=0)
            nk_x[j] = np.asarray(layers.n_kinks).sum(axis=0)
    if save_every == 1:
        log_th, log_u = _cumulative_bounds(sig_th, sig_u)
    else:  # the steps between saved points are not measured: no chain-rule bound
        log_th = np.full(S, np.nan)
        log_u = np.full(S, np.nan) if with_u else None
    opt = lambda a, cond: jnp.asarray(a) if cond else None
    return GeneralizedSignatures(
        sigma_theta=jnp.asarray(sig_th),
        sigma_u=opt(sig_u, with_u),
        sigma_x=opt(sig_x, rep is not None),
        cum_x=opt(cum_x, rep is not None),
        log_cum_theta=jnp.asarray(log_th),
        log_cum_u=opt(log_u, with_u),
        exact_theta=jnp.asarray(ex_th),
        exact_u=opt(ex_u, with_u),
        exact_x=opt(ex_x, rep is not None),
        n_kinks_theta=jnp.asarray(nk_th),
        n_kinks_u=opt(nk_u, with_u),
        n_kinks_x=opt(nk_x, rep is not None),
        tol=tol,
        max_kinks=max_kinks,
    )


class GeneralizedExponents(eqx.Module):
    r"""The generalised analytic exponents (Definition 6.2) at the horizon of a profile.

    - ``alpha_x``, ``alpha_theta``, ``alpha_u``: the definition as written, $\tilde\alpha =
      \frac{1}{L+T}\log\sup_{k,t}\sigma^{\cdot,C}_{k,t}$ over the saved steps ($L$ the depth,
      0 without a representation; $T$ = ``n_steps``). With the $\frac1{L+T}$ normalisation a
      bounded $\sigma$ gives $\tilde\alpha \to 0$ as $L + T \to \infty$, whatever the
      contraction, and $\sup\sigma \le \rho < 1$ gives $\log\rho/(L+T) > \log\rho$.
    - ``growth``: ``lspsde.stability_exponents`` of the profile's generalised blocks
      (``StabilityProfile.generalized_profile()``): the chain-rule bounds on the growth rates,
      e.g. ``growth.alpha_x[t]`` $= \frac1L\sum_k\log\sup_i\sigma^{x,C}_{k,t}$ (bounded by
      $\log\rho$ in Section 6.6) and ``growth.alpha_theta`` $= \frac1T\sum_t
      \log\sigma^{\theta,C}_t$ (needs ``save_every=1``; NaN otherwise).
    - ``stable``: Definition 6.3, every $\tilde\alpha \le 0$; ``exact``: every signature exact.
    """

    alpha_x: Float[Array, ""] | None
    alpha_theta: Float[Array, ""]
    alpha_u: Float[Array, ""] | None
    growth: eqx.Module
    stable: Bool[Array, ""]
    exact: bool = eqx.field(static=True)


def generalized_exponents(profile: StabilityProfile) -> GeneralizedExponents:
    r"""The generalised exponents of Definition 6.2 (and the chain-rule growth rates through
    ``lspsde.stability_exponents``) from a profile computed with ``generalized=True``.

    **Raises:** ``ValueError`` for a profile without generalised signatures."""
    from .exponents import stability_exponents

    g = profile.generalized
    if g is None:
        raise ValueError(
            "This profile has no generalised signatures: compute it with "
            "learning_profile(..., generalized=True)."
        )
    H = profile.depth + profile.n_steps
    alpha = lambda s: None if s is None else jnp.log(jnp.max(s)) / H
    a_x, a_th, a_u = alpha(g.sigma_x), alpha(g.sigma_theta), alpha(g.sigma_u)
    stable = all(bool(a <= 0) for a in (a_x, a_th, a_u) if a is not None)
    return GeneralizedExponents(
        alpha_x=a_x,
        alpha_theta=a_th,
        alpha_u=a_u,
        growth=stability_exponents(profile.generalized_profile()),
        stable=jnp.asarray(stable),
        exact=g.exact,
    )
