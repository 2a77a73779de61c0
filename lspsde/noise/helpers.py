r"""Building blocks for noise models: what a new [`AbstractNoise`][lspsde.noise.AbstractNoise]
subclass needs besides JAX itself.

Every helper works on the flat parameter vector of ``jax.flatten_util.ravel_pytree`` (the order
in which covariances and diffusions are written), so a model written with them accepts pytree
parameters. Grouped by use:

- draws: [`iid_like`][], [`standard_normal_like`][], [`open_uniform`][];
- the gradient oracle: [`add_flat`][], [`additive_gradient`][], [`safe_norm`][],
  [`flat_minimizer`][];
- the declared theory: [`flat_size`][], [`flat_dtype`][], [`scaled_identity`][],
  [`moment_or_none`][], [`frontier_constants`][];
- input checks and errors: [`as_float_array`][], [`concrete_scalar`][], ``check_positive``,
  ``check_positive_int``, ``check_in_interval`` (from ``lspsde._checks``, re-exported),
  [`no_diffusion_error`][], [`no_minimizer_error`][].
"""

from collections.abc import Callable
import math
from typing import Any

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree
import lineax as lx

from .._checks import _concrete as concrete_scalar
from .._checks import check_in_interval, check_positive, check_positive_int
from .._custom_types import ScalarLike
from ..objectives import AbstractObjective

__all__ = [
    "add_flat",
    "additive_gradient",
    "as_float_array",
    "check_in_interval",
    "check_positive",
    "check_positive_int",
    "concrete_scalar",
    "flat_dtype",
    "flat_minimizer",
    "flat_size",
    "frontier_constants",
    "iid_like",
    "moment_or_none",
    "no_diffusion_error",
    "no_minimizer_error",
    "open_uniform",
    "safe_norm",
    "scaled_identity",
    "standard_normal_like",
]

Sampler = Callable[[PRNGKeyArray, tuple[int, ...]], Array]
"""``sampler(key, shape)``, e.g. ``jax.random.normal``: i.i.d. draws of the given shape."""


# --- draws ------------------------------------------------------------------------------------


def as_float_array(x: ArrayLike) -> Array:
    """``x`` as an array of JAX's default float dtype (float64 under ``jax_enable_x64``): the
    dtype of a noise model's array fields (its magnitudes), so that they can be swept."""
    return jnp.asarray(x, dtype=float)


def iid_like(sampler: Sampler, key: PRNGKeyArray, theta: PyTree[Array]) -> PyTree[Array]:
    """``sampler(key, (d,))``, i.i.d. per entry, in the pytree structure, shapes and dtype of
    ``theta`` ($d$ its number of entries): the $u$ of a model with per-entry innovations.

    **Arguments:** `sampler` ``(key, shape) -> array`` (``jax.random.normal``,
    ``jax.random.laplace``, ...); `key`; `theta` the current parameters (only their shape and
    dtype are used).
    """
    flat, unravel = ravel_pytree(theta)
    return unravel(jnp.asarray(sampler(key, flat.shape), dtype=flat.dtype))


def standard_normal_like(key: PRNGKeyArray, theta: PyTree[Array]) -> PyTree[Array]:
    r"""$\xi \sim N(0, I_d)$ in the shape and dtype of ``theta``: ``iid_like(jax.random.normal,
    key, theta)``, the draw of every Gaussian model."""
    return iid_like(jax.random.normal, key, theta)


def open_uniform(key: PRNGKeyArray, shape: tuple[int, ...]) -> Array:
    r"""$U(0, 1)$ on the midpoints $(k + \frac12)\,2^{-m}$ of JAX's uniform grid ($m$ mantissa
    bits): never 0 or 1, and each value stands for its own cell of probability $2^{-m}$. Use it
    wherever a transform of $U$ is singular at 0 or 1 ($\log U$, $U^{-2/\nu}$, $\tan(\pi U)$).

    A draw on $[\text{tiny}, 1)$ puts the mass $2^{-23}$ (float32) of the first cell on
    $U = 10^{-38}$: Student-t samples of $7.6\cdot 10^{12}$ where the next value is about 350,
    and an $\alpha$-stable angle $-\pi/2$ that rounds past $-\pi/2$ (NaN).
    """
    dtype = jax.dtypes.canonicalize_dtype(float)
    half_cell = 2.0 ** -(jnp.finfo(dtype).nmant + 1)
    return jax.random.uniform(key, shape, dtype) + jnp.asarray(half_cell, dtype)


# --- the gradient oracle ----------------------------------------------------------------------


def add_flat(tree: PyTree[Array], perturbation: Float[Array, " d"]) -> PyTree[Array]:
    """``tree + perturbation``, with the flat ``perturbation`` (``ravel_pytree`` order) unravelled
    into ``tree``'s structure and cast to its dtype: $\\nabla\\mathcal{L}(\\theta) + \\text{noise}$
    for pytree parameters."""
    flat, unravel = ravel_pytree(tree)
    return unravel(flat + perturbation.astype(flat.dtype))


def additive_gradient(
    objective: AbstractObjective, theta: PyTree[Array], u: PyTree[Array], scale: ArrayLike
) -> PyTree[Array]:
    r"""$G = \nabla\mathcal{L}(\theta) + (\text{scale}/\sqrt d)\,\mathrm{ravel}(u)$: the gradient
    of the i.i.d.-per-entry models (``IsotropicGaussian``, ``StudentTNoise``,
    ``AlphaStableNoise``), whose `scale` is the size of the whole perturbation, not of one entry
    (for standard draws of unit variance, $\mathbb{E}\|G - \nabla\mathcal{L}\|^2 =
    \text{scale}^2$ whatever $d$). For a per-entry scale $b$, use
    ``add_flat(objective.gradient(theta), b * ravel_pytree(u)[0])``."""
    z = ravel_pytree(u)[0]
    return add_flat(objective.gradient(theta), scale / math.sqrt(z.size) * z)


def safe_norm(x: Array) -> Array:
    """$\\|x\\|$ with derivative 0 (a Clarke subgradient) at $x = 0$, not NaN: for noise levels
    such as $\\sigma_1\\|\\theta - \\theta^*\\|$ that are differentiated at $\\theta^*$."""
    sq = jnp.sum(x * x)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


_HAS_MINIMIZER = (
    "Objectives with a known minimiser: models.Quadratic, models.LeastSquares, "
    "models.LogisticRegression (or override `minimizer()` in your objective)."
)


def no_minimizer_error(objective: AbstractObjective, who: str) -> ValueError:
    """The error to raise when ``who`` (a model, or one of its methods) needs $\\theta^*$ and
    ``objective.minimizer()`` is ``None``: it lists the objectives that have one."""
    return ValueError(
        f"{who} needs the minimiser theta*, but {type(objective).__name__}.minimizer() is "
        f"None. {_HAS_MINIMIZER} GaussianNoise(sigma0=..., sigma1=0) needs no minimiser."
    )


def flat_minimizer(
    objective: AbstractObjective, theta: PyTree[Array], who: str
) -> Float[Array, " d"]:
    r"""The flat $\theta^*$ of ``objective`` (``ravel_pytree`` order), checked against the shape
    of ``theta``: for state-dependent noise levels such as $\|\theta - \theta^*\|$.

    **Raises:** ``ValueError`` ([`no_minimizer_error`][] naming ``who``) when the objective has
    no minimiser, or when its size differs from ``theta``'s.
    """
    theta_star = objective.minimizer()
    if theta_star is None:
        raise no_minimizer_error(objective, who)
    flat_star, flat = ravel_pytree(theta_star)[0], ravel_pytree(theta)[0]
    if flat_star.shape != flat.shape:
        raise ValueError(
            f"{type(objective).__name__}.minimizer() has {flat_star.size} entries but theta has "
            f"{flat.size}; pass a theta of the objective's shape."
        )
    return flat_star


# --- the declared theory: covariance, diffusion, Assumption 1 ---------------------------------


def flat_size(theta: PyTree[Array]) -> int:
    """$d$: the number of entries of ``theta`` over all leaves (a Python int, from shapes)."""
    return ravel_pytree(theta)[0].size


def flat_dtype(theta: PyTree[Array]) -> Any:
    """The dtype of ``theta``'s flat vector (its leaves' promoted dtype): the dtype of a
    diffusion operator's output."""
    return ravel_pytree(theta)[0].dtype


def scaled_identity(theta: PyTree[Array], scale: ArrayLike) -> lx.AbstractLinearOperator:
    r"""$B = s I_d$ over the flat parameters, as a diagonal operator in ``theta``'s dtype: the
    [`diffusion`][lspsde.noise.AbstractNoise.diffusion] of every isotropic additive model."""
    flat = ravel_pytree(theta)[0]
    return lx.DiagonalLinearOperator(jnp.full((flat.size,), scale, dtype=flat.dtype))


def moment_or_none(exists: ArrayLike, value: Array) -> Array | None:
    """``value`` where the moment exists (``exists`` true), else ``None``; when ``exists`` is
    traced, ``value`` with ``inf`` entries where it does not exist. For
    [`covariance`][lspsde.noise.AbstractNoise.covariance] of a heavy-tailed model."""
    if isinstance(exists, jax.core.Tracer):
        return jnp.where(exists, value, jnp.inf)
    return value if bool(exists) else None


def no_diffusion_error(model: str, why: str) -> ValueError:
    """The error a model's ``diffusion`` raises when it has no covariance (``why``: e.g.
    ``"df <= 2: infinite variance"``), so SGD with it has no SDE limit; the message says which
    models to use instead."""
    return ValueError(
        f"{model} has no covariance ({why}), so SGD with it has no diffusion (SDE) limit: the "
        "small-step limit of heavy-tailed SGD is a Levy-driven equation, which lspsde does not "
        "integrate. Use a finite-variance model (StudentTNoise with df > 2, a Gaussian model) "
        "for continuous-time limits."
    )


def frontier_constants(
    v0: ArrayLike, c: Array, Q: Array, kappa: float, sigma1: ScalarLike | None
) -> tuple[Array, Array]:
    r"""Assumption-1 constants $(\sigma_0, \sigma_1)$ for a variance quadratic in
    $e = \theta - \theta^*$, $\mathbb{E}\|G - \nabla\mathcal{L}\|^2 = \kappa(v_0 + 2c^\top e +
    e^\top Q e)$ (sampling noise of affine per-example gradients): the smallest $\sigma_0$ with
    $\kappa(v_0 + 2c^\top e + e^\top Q e) \le \sigma_0^2 + \sigma_1^2\|e\|^2$ for all $e$, at the
    given $\sigma_1$ (``None``: $\sigma_1^2 = 2\kappa\lambda_{\max}(Q)$).

    $\sigma_0^2 = \kappa v_0 + \max_e[2\kappa c^\top e - e^\top(\sigma_1^2 I - \kappa Q)e]
    = \kappa v_0 + \kappa^2 c^\top(\sigma_1^2 I - \kappa Q)^{-1}c$, attained at
    $e = \kappa(\sigma_1^2 I - \kappa Q)^{-1}c$.

    **Arguments:** `v0` (scalar), `c` ``(d,)``, `Q` ``(d, d)`` symmetric positive semidefinite,
    `kappa` $> 0$, `sigma1` $\ge 0$ or ``None``.

    **Raises:** ``ValueError`` when a concrete $\sigma_1^2 \le \kappa\lambda_{\max}(Q)$ (no
    $\sigma_0$ bounds the variance along the top eigenvector of $Q$).
    """
    q, V = jnp.linalg.eigh(Q)
    lam = jnp.maximum(q[-1], 0.0)
    if sigma1 is None:
        s = 2.0 * kappa * lam
    else:
        check_positive("sigma1", sigma1, allow_zero=True, fix="Use sigma1 >= 0.")
        s = as_float_array(sigma1) ** 2
        sc, lc = concrete_scalar(s), concrete_scalar(kappa * lam)
        if sc is not None and lc is not None and lc > 0 and not sc > lc * (1 + 1e-12):
            raise ValueError(
                f"sigma1^2 = {sc:.6g} is not above kappa * lambda_max(Q) = {lc:.6g}, the infimum "
                "of admissible sigma1^2 (the variance grows like that along the top eigenvector "
                "of Q); pass a larger `sigma1`, or None for 2 * kappa * lambda_max(Q)."
            )
    w2 = (V.T @ c) ** 2
    gap = s - kappa * q
    pos = gap > 0
    extra = jnp.sum(jnp.where(pos, kappa**2 * w2 / jnp.where(pos, gap, 1.0), 0.0))
    return jnp.sqrt(kappa * v0 + extra), jnp.sqrt(s)
