r"""Tracking $\sigma_1(W_l)$ of every layer, and the product bound, along a training trajectory.

**Layers.** Every 2-D inexact (floating) leaf of the parameter pytree $\theta$ is a layer
$W_l \in \mathbb{R}^{m_l \times n_l}$, in the order of ``jax.tree_util`` (for
``lspsde.parameters(Feedforward(...))``: ``weights[0], weights[1], ...``; biases are 1-D and
are not layers). A pytree without a 2-D floating leaf, or with a zero-size one, is refused.
Convolution kernels, stacked (scanned) layers and other higher-rank weights are not layers here:
reshape them to the matrix whose norm you mean first.

**Warm-started power iteration.** One tracked step does ``n_iter`` iterations of power
iteration on $A = W^\top W$ per layer, from the previous step's vector $v$:
$x_0 = v$, $x_{i+1} = A x_i / \|A x_i\|$ (each $A x = (W x)^\top W$: one product with $W$, one
with $W^\top$, written ``z @ W`` because XLA:CPU materialises ``W.T`` for ``W.T @ z``, 25x
slower). The estimate is then the Rayleigh–Ritz value of $A$ on the span of the last two iterates
$\{x_{k-2}, x_{k-1}\}$ ($k$ = ``n_iter``; both $A x$ are known, so this costs no product): the
top eigenvalue $\lambda$ of a $2 \times 2$ matrix, with Ritz vector $y$. It is at least the
plain power estimate $x_{k-1}^\top A x_{k-1}$ and at most $\sigma_1^2$ (up to rounding), and it
resolves a close $\sigma_2$ that plain power iteration mixes in; with ``n_iter=1`` it is the
Rayleigh quotient. Reported: $\sigma_1 \approx \sqrt\lambda$ and the residual
$\|A y - \lambda y\| / \lambda$ (a residual $r$ guarantees an eigenvalue of $A$ within
$r\lambda$ of $\lambda$, not necessarily the top one: a vector orthogonal to $v_1$ can have a
small residual on $\sigma_2$); carried to the next step: $A y / \|A y\|$. Along SGD, $W$ moves
by $O(\eta)$ per step, so the previous $v_1$ is within $O(\eta \|G\| / (\sigma_1 - \sigma_2))$
of the new one and 1-3 iterations keep it converged when the top singular value stands out of
the bulk; where it does not ($\sigma_2 / \sigma_1 \approx 0.99$ at the Marchenko–Pastur edge
of a Gaussian layer) errors of $10^{-3}$ remain at ``n_iter=2`` and the residual shows it.
A cold (random) start has an $O(1)$ error to remove every step (it decays like
$(\sigma_2/\sigma_1)^{4k}$, and slower inside a cluster). At step 0 the vectors come from
Golub–Kahan–Lanczos (``lspsde.linalg.operator_norm``'s algorithm, ``init_steps`` iterations at
most), so the first step is converged too. The residual
is returned at every step: it says whether warm starts suffice. A zero layer gives
$\sigma_1 = 0$ (bound $0$, ``log_bound`` $-\infty$), residual $0$, no NaN.

**The product bound.** For a feedforward chain $x \mapsto \phi(W_L \cdots \phi(W_1 x + b_1)
\cdots + b_L)$ with 1-Lipschitz activations $\phi$, $\operatorname{Lip} \le \prod_l
\sigma_1(W_l)$; ``log_bound`` $= \sum_l \log\sigma_1(W_l)$ is returned too (no overflow for deep
networks). For other architectures (residual blocks, attention) the product is only the product.
:func:`lipschitz_estimate` gives the data-dependent side: $\max_i \|\partial F/\partial x\,
(x_i)\|_2$ over given inputs, a lower bound of the true Lipschitz constant.

Everything is ``jit``- and ``vmap``-able: :func:`spectral_norm_trajectory` under ``jax.vmap``
over keys tracks an ensemble of SGD paths (one ``lax.scan`` per path, static shapes).
"""

from collections.abc import Callable, Sequence
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree
import numpy as np

from .._checks import check_callable, check_positive_int
from .._ensemble import check_key, check_start, check_step, describe
from ..linalg._checks import _check_float_pytree, _check_function_output, _check_max_steps
from ..linalg.krylov import default_v0
from ..linalg.norms import _jacobian_norm_impl, operator_norm_impl
from ..system import LearningSystem
from ._kernels import _mm

__all__ = [
    "LipschitzEstimate",
    "SpectralNormTrajectory",
    "SpectralNorms",
    "init_vectors",
    "lipschitz_estimate",
    "spectral_norm_trajectory",
    "spectral_norms",
    "spectral_norms_along",
    "weight_matrices",
]

# Keys of the cold-start vectors: fold_in(fold_in(key, _COLD), t), disjoint from the noise
# draws fold_in(key, t) of LearningSystem.noise_at.
_COLD = 0x7FFFFFFF


class SpectralNorms(eqx.Module):
    r"""$\sigma_1$ of every layer at one $\theta$ (or along steps: a leading ``step`` axis).

    - `sigma`: $\sigma_1(W_l)$ per layer (last axis, in the order of `layers`).
    - `log_bound`: $\sum_l \log \sigma_1(W_l)$; `bound`: $\prod_l \sigma_1(W_l)$.
    - `residual`: $\|W^\top W v - \sigma^2 v\| / \sigma^2$ per layer ($0$ for a zero layer).
    """

    sigma: Float[Array, "*step layer"]
    log_bound: Float[Array, "*step"]
    bound: Float[Array, "*step"]
    residual: Float[Array, "*step layer"]


class SpectralNormTrajectory(eqx.Module):
    r"""What :func:`spectral_norm_trajectory` returns: the norms at $\theta^0, \dots, \theta^T$.

    - `sigma`, `log_bound`, `bound`, `residual`: as in :class:`SpectralNorms`, with a leading
      ``step`` axis of length ``n_steps + 1`` (step $t$ is $\theta^t$, before update $t$).
    - `final_theta`: $\theta^T$; `vectors`: the right singular vector estimates after step $T$
      (pass them to :func:`spectral_norms` to continue warm).
    - `steps`: $0, \dots, T$; `layers`: the layers' pytree paths (``jax.tree_util.keystr``).
    """

    sigma: Float[Array, "step layer"]
    log_bound: Float[Array, " step"]
    bound: Float[Array, " step"]
    residual: Float[Array, "step layer"]
    final_theta: PyTree[Array]
    vectors: tuple[Float[Array, " _"], ...]
    steps: Int[Array, " step"]
    layers: tuple[str, ...] = eqx.field(static=True)
    n_iter: int = eqx.field(static=True)
    warm_start: bool = eqx.field(static=True)


class LipschitzEstimate(eqx.Module):
    r"""$\max_i \|\partial F / \partial x\,(x_i)\|_2$: a lower bound of $\operatorname{Lip}(F)$.

    - `value`: the maximum over the inputs; `index`: the input attaining it.
    - `norms`: $\|\partial F/\partial x\,(x_i)\|_2$ per input (each a Lanczos lower bound, up to
      rounding, of the exact norm).
    - `converged`: whether every input's iteration met its stopping rule.
    """

    value: Float[Array, ""]
    index: Int[Array, ""]
    norms: Float[Array, " n"]
    converged: Bool[Array, ""]


# --------------------------------------------------------------------------------------------
# Layers


def _layers(theta: PyTree[Any]) -> list[tuple[str, Any]]:
    """``(path, leaf)`` of every 2-D inexact leaf (no checks)."""
    leaves = jax.tree_util.tree_flatten_with_path(theta)[0]
    return [
        (jax.tree_util.keystr(path), leaf)
        for path, leaf in leaves
        if np.ndim(leaf) == 2 and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]


def _check_layers(theta: PyTree[Any], name: str = "theta") -> list[tuple[str, Any]]:
    layers = _layers(theta)
    if not layers:
        raise ValueError(
            f"`{name}` has no weight matrix: no 2-D floating leaf in {describe(theta)}. Every "
            "2-D inexact leaf of the parameter pytree is a layer (biases and scalars are not); "
            "pass the parameters of a network with weight matrices, e.g. "
            "`lspsde.parameters(models.mlp(...))`, or reshape higher-rank kernels to matrices."
        )
    for path, leaf in layers:
        if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
            raise TypeError(f"Layer `{name}{path}` is complex; only real weights are tracked.")
        if 0 in np.shape(leaf):
            raise ValueError(
                f"Layer `{name}{path}` has zero size (shape {tuple(np.shape(leaf))}): a layer "
                "without weights has no spectral norm (and the product bound none). Remove it "
                "from the parameters."
            )
    return layers


def weight_matrices(theta: PyTree[ArrayLike]) -> dict[str, Array]:
    """The layers of ``theta``: every 2-D inexact leaf, by pytree path (in tree order).

    **Raises:** ``ValueError`` if there is none or one has zero size; ``TypeError`` if complex.
    """
    return {path: jnp.asarray(leaf) for path, leaf in _check_layers(theta)}


def _matrices(theta: PyTree[Array]) -> list[Array]:
    return [jnp.asarray(leaf) for _, leaf in _layers(theta)]


# --------------------------------------------------------------------------------------------
# Kernels


def _unit(w: Array, fallback: Array) -> Array:
    nw = jnp.linalg.norm(w)
    return jnp.where(nw > 0, w / jnp.where(nw > 0, nw, 1), fallback)


def _power(W: Array, v: Array, n_iter: int) -> tuple[Array, Array, Array]:
    """``n_iter`` power iterations on A = W^T W from unit ``v``, then Rayleigh–Ritz on the last
    two iterates (no extra product): (sigma, next v, residual)."""
    pairs = []
    x = v
    for _ in range(n_iter):
        Ax = _mm(_mm(W, x), W)  # z @ W, not W.T @ z: XLA:CPU copies W.T (25x slower)
        pairs.append((x, Ax))
        x = _unit(Ax, x)
    x1, Ax1 = pairs[-1]
    a = jnp.vdot(x1, Ax1)  # the power iteration's Rayleigh quotient
    lam, y, Ay = a, x1, Ax1
    if n_iter >= 2:
        x0, Ax0 = pairs[-2]
        c = jnp.vdot(x1, x0)
        r = x0 - c * x1
        nr = jnp.linalg.norm(r)
        # x0 nearly parallel to x1 (converged): q2 would be rounding, keep the power estimate.
        ok = nr > 16 * math.sqrt(float(jnp.finfo(W.dtype).eps))
        inv = jnp.where(ok, 1 / jnp.where(ok, nr, 1), 0)
        q2, Aq2 = r * inv, (Ax0 - c * Ax1) * inv
        b = (jnp.vdot(x1, Aq2) + jnp.vdot(q2, Ax1)) / 2
        d = jnp.vdot(q2, Aq2)
        top = (a + d) / 2 + jnp.sqrt(((a - d) / 2) ** 2 + b**2)
        # eigenvector of [[a, b], [b, d]] for `top`, from its better-conditioned row
        c1, c2 = jnp.where(a >= d, top - d, b), jnp.where(a >= d, b, top - a)
        norm = jnp.sqrt(c1**2 + c2**2)
        use = ok & (norm > 0) & (top > a)
        c1, c2 = (
            jnp.where(use, c1 / jnp.where(use, norm, 1), 1),
            jnp.where(use, c2 / jnp.where(use, norm, 1), 0),
        )
        lam = jnp.where(use, top, a)
        y, Ay = c1 * x1 + c2 * q2, c1 * Ax1 + c2 * Aq2
    safe = jnp.where(lam > 0, lam, 1)
    res = jnp.where(lam > 0, jnp.linalg.norm(Ay - lam * y) / safe, 0)
    return jnp.sqrt(jnp.maximum(lam, 0)), _unit(Ay, y), res


def _lanczos_vector(W: Array, init_steps: int) -> Array:
    """The right singular vector of W from Golub–Kahan–Lanczos (a deterministic start)."""
    n = W.shape[1]
    eps = float(jnp.finfo(W.dtype).eps)
    v0 = default_v0(None, n, W.dtype)
    result = operator_norm_impl(
        lambda v: _mm(W, v), lambda u: _mm(u, W), v0, "lanczos", init_steps, eps**0.6
    )
    return result.vector


def _summarise(sigmas: list[Array], residuals: list[Array]) -> SpectralNorms:
    dtype = jnp.result_type(*sigmas)
    sigma = jnp.stack([s.astype(dtype) for s in sigmas], axis=-1)
    residual = jnp.stack([r.astype(dtype) for r in residuals], axis=-1)
    log_bound = jnp.sum(jnp.log(sigma), axis=-1)
    return SpectralNorms(sigma, log_bound, jnp.prod(sigma, axis=-1), residual)


def _step(theta, vectors, n_iter):
    out = [_power(W, v, n_iter) for W, v in zip(_matrices(theta), vectors, strict=True)]
    norms = _summarise([o[0] for o in out], [o[2] for o in out])
    return norms, tuple(o[1] for o in out)


def _cold_vectors(theta, key):
    return tuple(
        jax.random.normal(jax.random.fold_in(key, i), (W.shape[1],), W.dtype)
        / jnp.sqrt(jnp.asarray(W.shape[1], W.dtype))
        for i, W in enumerate(_matrices(theta))
    )


def _init_impl(theta, init_steps):
    return tuple(_lanczos_vector(W, init_steps) for W in _matrices(theta))


_init_jit = eqx.filter_jit(_init_impl)
_step_jit = eqx.filter_jit(_step)


# --------------------------------------------------------------------------------------------
# Public functions


def _check_n_iter(n_iter: Any) -> int:
    return check_positive_int(
        "n_iter",
        n_iter,
        fix="It is the number of power iterations per step (1-3 suffice when warm-started).",
    )


def _check_vectors(vectors: Any, layers: list[tuple[str, Any]]) -> None:
    if not isinstance(vectors, tuple | list) or len(vectors) != len(layers):
        raise ValueError(
            f"`vectors` must be a tuple of {len(layers)} vectors, one per layer "
            f"({[p for p, _ in layers]}), as `init_vectors` or the previous step returns; got "
            f"{describe(vectors)}."
        )
    for v, (path, W) in zip(vectors, layers, strict=True):
        if np.shape(v) != (np.shape(W)[1],):
            raise ValueError(
                f"The vector of layer `{path}` has shape {tuple(np.shape(v))}, expected "
                f"({np.shape(W)[1]},) (the layer's input width: a right singular vector)."
            )


def init_vectors(
    theta: PyTree[ArrayLike], *, init_steps: int = 64
) -> tuple[Float[Array, " _"], ...]:
    r"""Right singular vectors $v_1(W_l)$ of every layer by Golub–Kahan–Lanczos (at most
    ``init_steps`` iterations, relative tolerance $\epsilon^{0.6}$ of the dtype, from a fixed
    pseudo-random start): the warm start of the first tracked step."""
    _check_layers(theta)
    _check_max_steps(init_steps)
    return _init_jit(theta, init_steps)


def spectral_norms(
    theta: PyTree[ArrayLike],
    vectors: Sequence[Float[ArrayLike, " _"]],
    *,
    n_iter: int = 2,
) -> tuple[SpectralNorms, tuple[Float[Array, " _"], ...]]:
    r"""One tracked step: ``n_iter`` power iterations per layer from ``vectors``.

    For your own training loop (inside ``jit``/``scan``/``vmap`` too): start from
    ``init_vectors(theta0)`` and feed back the returned vectors at every step.

    **Returns:** ``(norms, vectors)``: the :class:`SpectralNorms` of ``theta`` and the vectors
    for the next step.
    """
    layers = _check_layers(theta)
    n_iter = _check_n_iter(n_iter)
    _check_vectors(vectors, layers)
    vectors = tuple(jnp.asarray(v) for v in vectors)
    return _step_jit(theta, vectors, n_iter)


def _along_impl(thetas, n_iter, init_steps):
    first = jax.tree.map(lambda a: a[0], thetas)
    vectors = _init_impl(first, init_steps)

    def body(vs, theta):
        norms, vs = _step(theta, vs, n_iter)
        return vs, norms

    return jax.lax.scan(body, vectors, thetas)


_along_jit = eqx.filter_jit(_along_impl)


def spectral_norms_along(
    thetas: PyTree[ArrayLike], *, n_iter: int = 2, init_steps: int = 64
) -> SpectralNorms:
    r"""Warm-started tracking over a stored trajectory: every leaf of ``thetas`` has a leading
    ``step`` axis (as ``lspsde.parameter_trajectory`` returns, or one path of
    ``Ensemble.theta``); the first step starts from :func:`init_vectors`.

    **Returns:** :class:`SpectralNorms` with a leading ``step`` axis.
    """
    n_iter = _check_n_iter(n_iter)
    _check_max_steps(init_steps)
    leaves = jax.tree.leaves(thetas)
    if not leaves or any(np.ndim(a) < 1 for a in leaves):
        raise ValueError(
            f"`thetas` must be a pytree of arrays with a leading step axis, got {describe(thetas)}."
        )
    if len({np.shape(a)[0] for a in leaves}) != 1:
        raise ValueError(
            f"The leaves of `thetas` have different leading (step) lengths: {describe(thetas)}."
        )
    first = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], jnp.result_type(a)), thetas
    )
    _check_layers(first, "thetas[t]")
    return _along_jit(thetas, n_iter, init_steps)[1]


def _trajectory_impl(system, theta0, key, n_steps, n_iter, warm_start, init_steps):
    cold_key = jax.random.fold_in(key, _COLD)

    def vectors_at(t, theta, vs):
        return vs if warm_start else _cold_vectors(theta, jax.random.fold_in(cold_key, t))

    vectors = _init_impl(theta0, init_steps) if warm_start else None

    def body(carry, t):
        state, vs = carry
        theta = system.params(state)
        norms, vs = _step(theta, vectors_at(t, theta, vs), n_iter)
        state = system.parameter_map(t, state, system.noise_at(key, t, state))
        return (state, vs), norms

    if vectors is None:
        vectors = _cold_vectors(theta0, cold_key)
    init = (system.init_state(theta0), vectors)
    (last, vs), norms = jax.lax.scan(body, init, jnp.arange(n_steps))
    last = system.params(last)
    final, vs = _step(last, vectors_at(n_steps, last, vs), n_iter)
    cat = lambda a, b: jnp.concatenate([a, b[None]])
    return SpectralNormTrajectory(
        sigma=cat(norms.sigma, final.sigma),
        log_bound=cat(norms.log_bound, final.log_bound),
        bound=cat(norms.bound, final.bound),
        residual=cat(norms.residual, final.residual),
        final_theta=last,
        vectors=vs,
        steps=jnp.arange(n_steps + 1),
        layers=tuple(p for p, _ in _layers(theta0)),
        n_iter=n_iter,
        warm_start=warm_start,
    )


_trajectory_jit = eqx.filter_jit(_trajectory_impl)


def spectral_norm_trajectory(
    system: LearningSystem,
    theta0: PyTree[ArrayLike],
    *,
    key: PRNGKeyArray,
    n_steps: int,
    n_iter: int = 2,
    warm_start: bool = True,
    init_steps: int = 64,
) -> SpectralNormTrajectory:
    r"""$\sigma_1(W_l^t)$ of every layer, and $\prod_l \sigma_1(W_l^t)$, along
    $\theta^{t+1} = \mathcal{A}_t(\theta^t, u^t)$ (``lspsde.parameter_trajectory``'s iteration,
    the same draws $u^t$ from ``fold_in(key, t)``), without storing the trajectory.

    **Arguments:**

    - `system`: the learning system (e.g. ``LearningSystem(objective, SGD(eta), noise)``).
    - `theta0`: $\theta^0$; its 2-D floating leaves are the layers (module docstring).
    - `key`: PRNG key of the noise draws (as ``parameter_trajectory``).
    - `n_steps`: $T \ge 1$; the norms are returned at $\theta^0, \dots, \theta^T$.
    - `n_iter`: power iterations per step and layer ($\ge 1$).
    - `warm_start`: start each step from the previous step's vectors (after Lanczos vectors at
      step 0). ``False`` starts every step, step 0 included, from a fresh random vector: the
      cold-start baseline, to see what warm starting buys.
    - `init_steps`: the Lanczos iterations at step 0 (with ``warm_start``).

    Under ``jax.vmap`` over keys it tracks an ensemble of paths.

    **Returns:** a :class:`SpectralNormTrajectory`.

    **Raises:** ``ValueError``/``TypeError`` before tracing for a bad `system`, `theta0` (no
    layer, a zero-size layer, a step that changes its shapes), `key`, `n_steps` or `n_iter`.
    """
    if not isinstance(system, LearningSystem):
        raise TypeError(
            f"`system` must be a LearningSystem, got {type(system).__name__}; build one with "
            "`lspsde.LearningSystem(objective, lspsde.SGD(eta), noise)`."
        )
    check_key(key)
    n_steps = check_positive_int("n_steps", n_steps)
    n_iter = _check_n_iter(n_iter)
    _check_max_steps(init_steps)
    if not isinstance(warm_start, bool):
        raise TypeError(f"`warm_start` must be True or False, got {warm_start!r}.")
    theta0 = check_start(theta0)
    _check_layers(theta0, "theta0")
    check_step(system, theta0, key, n_steps)
    return _trajectory_jit(system, theta0, key, n_steps, n_iter, warm_start, init_steps)


def _estimate_impl(f, inputs, method, max_steps, rtol):
    results = jax.vmap(lambda x: _jacobian_norm_impl(f, x, method, max_steps, rtol, None, None))(
        inputs
    )
    index = jnp.argmax(results.value)
    return LipschitzEstimate(
        value=results.value[index],
        index=index,
        norms=results.value,
        converged=jnp.all(results.converged),
    )


_estimate_jit = eqx.filter_jit(_estimate_impl)


def lipschitz_estimate(
    f: Callable[[Array], Array],
    inputs: Float[ArrayLike, "..."],
    *,
    method: str = "lanczos",
    max_steps: int = 64,
    rtol: float = 1e-6,
) -> LipschitzEstimate:
    r"""The data-dependent estimate $\max_i \|\partial f / \partial x\,(x_i)\|_2$ of the
    Lipschitz constant of $f$ (a lower bound of it), by ``lspsde.linalg.jacobian_norm``'s
    matrix-free iteration at every input, ``vmap``-ped.

    **Arguments:**

    - `f`: the network $x \mapsto F(x)$ on one input (e.g. a ``Feedforward``, or
      ``objective.network(theta)``).
    - `inputs`: the inputs $x_i$, shape ``(n, d_in)``.
    - `method`, `max_steps`, `rtol`: as in ``lspsde.linalg.jacobian_norm``.

    At a ReLU kink ``jax.linearize`` picks one side: the estimate is that of a nearby point.
    """
    from ..linalg._checks import _check_method, _check_rtol

    check_callable("f", f)
    _check_method(method)
    _check_max_steps(max_steps)
    _check_rtol(rtol)
    if np.ndim(inputs) != 2 or 0 in np.shape(inputs):
        raise ValueError(
            f"`inputs` must be a non-empty (n, d_in) array of inputs, got shape "
            f"{tuple(np.shape(inputs))}."
        )
    inputs = jnp.asarray(inputs)
    _check_float_pytree("inputs", inputs)
    _check_function_output("f", f, inputs[0])
    return _estimate_jit(f, inputs, method, max_steps, rtol)
