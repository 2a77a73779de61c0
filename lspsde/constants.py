r"""Estimators of the theory's constants from a concrete model: what ``lspsde.theory``'s
closed forms take as inputs.

| constant | estimator | used by |
|---|---|---|
| $\|W_k\|_2$, $\rho = \max_k\|W_k\|_2$ | [`layer_spectral_norms`][], [`feedforward_rho`][] (exact SVD) | Theorem 4.1 |
| $m$, $M_g$ of a residual block | [`residual_block_constants`][] (dense Jacobians at sample points) | Lemma 4.2, Theorem 4.3 |
| $\mu$, $L$ of an objective | [`objective_constants`][] (Lanczos or dense Hessian) | Assumption 1, Theorem 5.2 |
"""  # noqa: E501

from collections.abc import Callable
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree
import numpy as np

from . import linalg
from ._checks import _concrete_array
from .objectives import AbstractObjective
from .representation import Feedforward

__all__ = [
    "feedforward_rho",
    "layer_spectral_norms",
    "objective_constants",
    "residual_block_constants",
]


def layer_spectral_norms(flow: Feedforward) -> Float[Array, " L"]:
    r"""$(\|W_0\|_2, \dots, \|W_{L-1}\|_2)$ of a feedforward flow, by exact SVD (Theorem 4.1).

    **Arguments:**

    - `flow`: a [`Feedforward`][lspsde.representation.Feedforward] network.

    **Returns:** the spectral norms, shape ``(L,)``.
    """
    if not isinstance(flow, Feedforward):
        raise TypeError(
            f"`flow` must be an lspsde.representation.Feedforward, got {type(flow).__name__}; "
            "for other layers use `lspsde.linalg.jacobian_norm` on each layer map."
        )
    return _layer_norms(flow.weights)


@jax.jit
def _layer_norms(weights: tuple[Array, ...]) -> Array:
    return jnp.stack([jnp.linalg.svd(w, compute_uv=False)[0] for w in weights])


def feedforward_rho(flow: Feedforward) -> Float[Array, ""]:
    r"""$\rho = \max_k \|W_k\|_2$, the smallest constant Theorem 4.1 applies with."""
    return jnp.max(layer_spectral_norms(flow))


def residual_block_constants(
    block: Callable[[Array], Array], xs: Float[ArrayLike, "*n d"]
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    r"""Estimates $(\hat m, \hat M_g)$ of the constants of (4.2) for one residual block $g$.

    With $G(x) = \partial g/\partial x$ computed densely (``jax.jacfwd``; blocks are at most a few
    hundred wide),

    $$\hat m = -\max_i \lambda_{\max}\big(\tfrac12(G(x_i) + G(x_i)^\top)\big), \qquad
    \hat M_g = \max_i \|G(x_i)\|_2 .$$

    A maximum over sample points is an estimate *from inside*: the true constants over all $x$
    satisfy $m \le \hat m$ and $M_g \ge \hat M_g$, so $c_x(h)$ from the estimates can be
    optimistic. For a linear block ($G$ constant) the estimates are exact.

    **Arguments:**

    - `block`: the residual function $x \mapsto g(x)$, $\mathbb{R}^d \to \mathbb{R}^d$.
    - `xs`: the sample points, shape ``(n, d)`` (or ``(d,)`` for one point).

    **Returns:** ``(m_hat, M_g_hat)``.
    """
    if not callable(block):
        raise TypeError(f"`block` must be callable x -> g(x), got {type(block).__name__}.")
    xs = jnp.asarray(xs)
    if xs.ndim == 1:
        xs = xs[None]
    if xs.ndim != 2 or xs.shape[0] == 0:
        raise ValueError(f"`xs` must have shape (n, d) with n >= 1, got {xs.shape}.")
    out = jax.eval_shape(block, xs[0])
    if out.shape != xs.shape[1:]:
        raise ValueError(
            f"The block maps R^{xs.shape[1]} to shape {out.shape}; a residual block g must map "
            "R^d to R^d (eq. 4.1)."
        )

    return _block_constants(block, xs)


@eqx.filter_jit
def _block_constants(block: Callable[[Array], Array], xs: Array) -> tuple[Array, Array]:
    def one(x: Array) -> tuple[Array, Array]:
        G = jax.jacfwd(block)(x)
        top_sym = jnp.linalg.eigvalsh(0.5 * (G + G.T))[-1]
        return top_sym, jnp.linalg.svd(G, compute_uv=False)[0]

    top_sym, norms = jax.vmap(one)(xs)
    return -jnp.max(top_sym), jnp.max(norms)


def objective_constants(
    objective: AbstractObjective,
    theta: PyTree[ArrayLike],
    *,
    method: str = "lanczos",
    max_steps: int = 64,
    rtol: float = 1e-6,
    key: PRNGKeyArray | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    r"""Estimates $(\hat\mu, \hat L)$ = extreme eigenvalues of $\nabla^2\mathcal{L}(\theta)$.

    For quadratics and least squares the Hessian is constant, so these are the exact $\mu$ and
    $L$ of Assumption 1 at any $\theta$. For other objectives they are *local* values at
    $\theta$ (e.g. at $\theta^*$ they give the asymptotic rates), not global constants.

    **Arguments:**

    - `objective`: an [`AbstractObjective`][lspsde.objectives.AbstractObjective].
    - `theta`: the point, any pytree of arrays.
    - `method`: ``"lanczos"`` (matrix-free, Hessian-vector products;
      ``lspsde.linalg.hessian_extreme_eigenvalues``) or ``"dense"`` (the full Hessian and
      ``eigvalsh``; exact, for small problems).
    - `max_steps`, `rtol`, `key`: passed to the Lanczos solver.

    **Returns:** ``(mu_hat, L_hat)``. A ``RuntimeWarning`` is issued when Lanczos did not
    converge to ``rtol`` (raise ``max_steps`` or use ``method="dense"``).
    """
    if not isinstance(objective, AbstractObjective):
        raise TypeError(
            f"`objective` must be an lspsde.objectives.AbstractObjective, got "
            f"{type(objective).__name__}."
        )
    if method not in ("lanczos", "dense"):
        raise ValueError(f"Unknown method {method!r}; use 'lanczos' or 'dense'.")
    if method == "dense":
        lam_min, lam_max = linalg.dense_hessian_extreme_eigenvalues(objective.loss, theta)
        return jnp.asarray(lam_min), jnp.asarray(lam_max)
    res = linalg.hessian_extreme_eigenvalues(
        objective.loss, theta, max_steps=max_steps, rtol=rtol, key=key
    )
    converged = _concrete_array(res.converged)
    if converged is not None and not np.all(converged):
        warnings.warn(
            f"Lanczos did not converge to rtol={rtol} in {max_steps} steps; the Hessian "
            "eigenvalue estimates may be inaccurate. Raise `max_steps` or use method='dense'.",
            RuntimeWarning,
            stacklevel=2,
        )
    return jnp.asarray(res.lambda_min), jnp.asarray(res.lambda_max)
