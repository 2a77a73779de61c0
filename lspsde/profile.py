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

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree

from . import linalg
from ._checks import check_positive_int
from ._cumulative import log_cumulative_norms
from ._ensemble import check_key, check_run, check_start, check_step, saved_steps
from .representation import AbstractRepresentationFlow
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

    @property
    def cum_theta(self) -> Float[Array, " T"]:
        r"""$\|\partial\theta^t/\partial\theta^0\|_2$ (``inf`` past the float range)."""
        return jnp.exp(self.log_cum_theta)

    @property
    def cum_u(self) -> Float[Array, " T"] | None:
        r"""$\|\partial\theta^t/\partial u^{0:t}\|_2$ (0 at $t = 0$)."""
        return None if self.log_cum_u is None else jnp.exp(self.log_cum_u)


@eqx.filter_jit
def _learning_profile(system, theta0, key, n_steps, save_every, options):
    states, us = parameter_trajectory(system, theta0, n_steps=n_steps, key=key)
    steps = jnp.asarray(saved_steps(n_steps, save_every))
    discrete_u = not all(jnp.issubdtype(u.dtype, jnp.inexact) for u in jax.tree.leaves(us))
    cum_method = "lanczos" if options.method == "auto" else options.method
    # The blocks differentiate the carried state's floating leaves (theta, and a flow's
    # optimiser state); integer leaves (a step count) are held at their values along the path.
    floats, ints = eqx.partition(states, eqx.is_inexact_array)
    at_step = lambda tree, s: jax.tree.map(lambda a: a[s], tree)

    def step_map(s, x, u):
        new = system.parameter_map(s, eqx.combine(x, at_step(ints, s)), u)
        return eqx.filter(new, eqx.is_inexact_array)

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
    return StabilityProfile(
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


def learning_profile(
    system: LearningSystem,
    theta0: PyTree[Array],
    *,
    key: PRNGKeyArray,
    n_steps: int,
    save_every: int = 1,
    method: str = "auto",
    max_steps: int = 64,
    rtol: float = 1e-6,
) -> StabilityProfile:
    r"""The Learning Stability Profile of ``system`` over ``n_steps`` steps from $\theta^0$.

    **Arguments:**

    - `system`: a [`LearningSystem`][lspsde.system.LearningSystem].
    - `theta0`: the initial parameters $\theta^0$ (a pytree of real floating arrays, finite).
    - `key`: PRNG key of the update noise (step $t$ uses ``fold_in(key, t)``); required, as
      everywhere in lspsde.
    - `n_steps`: the training horizon $T \ge 1$.
    - `save_every`: the profile is evaluated at $t = 0, s, 2s, \dots$ and at $T$.
    - `method`, `max_steps`, `rtol`: as in [`representation_profile`][]; with ``"auto"`` the
      parameter and update blocks are always matrix-free.

    **Returns:** a [`StabilityProfile`][lspsde.profile.StabilityProfile]. Cumulative time blocks
    differentiate through the realised trajectory (the noise draws held fixed), in the log
    domain; their cost grows with $t$: choose ``save_every`` accordingly.

    **Raises:** ``TypeError``/``ValueError`` before compilation for a bad system, key, count,
    norm option or ``theta0`` (not real floating, not finite, or not mapped to its own shape by
    one update step), with the same checks and messages as ``simulate``.
    """
    if not isinstance(system, LearningSystem):
        raise TypeError(f"`system` must be a LearningSystem, got {type(system).__name__}.")
    run = check_run(
        n_paths=1,
        n_steps=n_steps,
        save_every=save_every,
        chunk_size=None,
        divergence_threshold=1e8,
    )
    options = NormOptions(method, max_steps, rtol)
    check_key(key)
    theta0 = check_start(theta0)
    check_step(system, theta0, key, run.n_steps)
    return _learning_profile(system, theta0, key, run.n_steps, run.save_every, options)
