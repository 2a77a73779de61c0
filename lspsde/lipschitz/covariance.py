r"""The covariance $\Sigma(\theta)$ of the gradient noise, and its projections on the spectral
norm's derivatives without a $d \times d$ matrix.

SGD with $G = \nabla\mathcal{L}(\theta) + \xi$, $\operatorname{Cov}(\xi) = \Sigma(\theta)$ over
the flat parameters $\operatorname{vec}\theta$ (``jax.flatten_util.ravel_pytree`` order, a
matrix row-major), moves $\sigma_1(W)$ of a layer through two projections of $\Sigma$ (package
docstring, §5–6): the Hessian one $\operatorname{tr}(\Sigma Q) = \frac12\operatorname{tr}(\Sigma
\nabla^2\sigma_1)$ (the Itô coefficient) and the Jacobian one $g^\top\Sigma g$, $g =
\operatorname{vec}(u_1 v_1^\top)$ (the diffusion). :class:`NoiseCovariance` keeps $\Sigma$ in
one of three exact forms, and :func:`spectral_noise_terms` computes both projections in each
without forming more than the form holds:

- isotropic, $\Sigma = v I_d$: $\operatorname{tr}(\Sigma Q) = v[\sum_{j\ge2}\frac{\sigma_1}
  {\sigma_1^2-\sigma_j^2} + \frac{m+n-2r}{2\sigma_1}]$, $g^\top\Sigma g = v$;
- factor, $\Sigma = FF^\top$, $F \in \mathbb{R}^{d\times k}$: $\operatorname{tr}(\Sigma Q) =
  \sum_{c \le k}\text{second}(F_c)$, $g^\top\Sigma g = \sum_c (u_1^\top F_c v_1)^2$;
- dense $\Sigma = S$: $\operatorname{tr}(\Sigma Q) = \sum_i w_i\,g_i^\top S g_i$ (package
  docstring, §3), $g^\top\Sigma g = g^\top S g$

($F_c$ the $c$-th column of the layer's rows of $F$, reshaped to $m \times n$; `second` the
exact second-order coefficient of :func:`top_singular_expansion`, a quadratic form
$\operatorname{vec}(E)^\top Q \operatorname{vec}(E)$, so $\operatorname{tr}(F^\top Q F) =
\sum_c \text{second}(F_c)$.) The factor form costs $O(k(mn + m^2 + n^2))$ per layer after the
SVD: the natural form of minibatch noise, whose rank is at most the number of examples.

**Minibatch noise from per-example gradients** (:func:`minibatch_covariance`). For a finite sum
$\mathcal{L} = \frac1n\sum_i \ell_i$ with per-example gradients $g_i$ (mean $\bar g =
\nabla\mathcal{L}$) and $G$ the mean over a uniform minibatch of size $B$,

$$\Sigma = \kappa\,\frac1n\sum_{i=1}^n (g_i - \bar g)(g_i - \bar g)^\top = F F^\top, \qquad
F = \sqrt{\kappa / n}\,\big[g_1 - \bar g, \dots, g_n - \bar g\big] \in \mathbb{R}^{d \times n},$$

with $\kappa = 1/B$ for indices drawn with replacement and $\kappa = \frac{n - B}{B(n - 1)}$
without (the finite-population correction; ``lspsde.MinibatchNoise`` samples without
replacement). This is exact for the data set the gradients come from; for $n$ gradients of a
sample of a larger data set, ``replace=True`` is the plug-in estimate
$\frac1B\hat\Sigma_{\text{pop}}$ (biased by the factor $(n-1)/n$).

**Exact covariances of the library's noise models** (:func:`gradient_noise_covariance`):
``IsotropicGaussian(s)`` is isotropic with $v = s^2/d$; ``GaussianNoise(sigma0, sigma1)``
isotropic with $v = (\sigma_0^2 + \sigma_1^2\|\theta - \theta^*\|^2)/d$; ``NoNoise`` isotropic
with $v = 0$; ``MinibatchNoise`` the factor above from its per-example gradients at $\theta$;
any other model (``AnisotropicGaussian``, ``CurvatureNoise``, ``StudentTNoise`` with $\nu > 2$,
a user's model) the factor $B(\theta)$ of its ``diffusion`` ($BB^\top = \Sigma$).
"""

import math
from typing import Any

import equinox as eqx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, PyTree
import numpy as np

from .._checks import _concrete_array, check_positive_int
from ..noise import AbstractNoise, GaussianNoise, IsotropicGaussian, MinibatchNoise, NoNoise
from ..objectives import AbstractObjective
from . import _kernels as K
from ._checks import check_matrix, check_on_degenerate
from .expansion import prepare_gap_tol, raise_if_degenerate

__all__ = [
    "NoiseCovariance",
    "SpectralNoiseTerms",
    "gradient_noise_covariance",
    "minibatch_covariance",
    "spectral_noise_terms",
]


def _float_array(name: str, value: Any, ndim: int) -> Array:
    if isinstance(value, str | bytes | bool) or value is None:
        raise TypeError(f"`{name}` must be an array, got {value!r}.")
    try:
        dtype = jnp.result_type(value)
    except TypeError as err:
        raise TypeError(f"`{name}` must be an array, got {type(value).__name__}.") from err
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"`{name}` must be real, got dtype {dtype}.")
    value = jnp.asarray(value, dtype=dtype if jnp.issubdtype(dtype, jnp.floating) else float)
    if value.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} dimensions, got shape {value.shape}.")
    arr = _concrete_array(value)
    if arr is not None and not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` is not finite (it holds NaN or inf).")
    return value


class NoiseCovariance(eqx.Module):
    r"""$\Sigma$, the covariance of the flat gradient noise (size $d$), in one exact form.

    Exactly one of the array fields is set (build with the class methods):

    - `entry_variance`: $v$, with $\Sigma = v I_d$ (:meth:`isotropic`);
    - `factor`: $F$, shape ``(d, k)``, with $\Sigma = F F^\top$ (:meth:`from_factor`);
    - `matrix`: $\Sigma$ itself, shape ``(d, d)``, symmetric PSD (:meth:`from_matrix`).

    `size` is $d$ (static). Order: ``ravel_pytree(theta)``, each matrix row-major.
    """

    entry_variance: Float[Array, ""] | None
    factor: Float[Array, "d k"] | None
    matrix: Float[Array, "d d"] | None
    size: int = eqx.field(static=True)

    @classmethod
    def isotropic(cls, variance: float | Float[ArrayLike, ""], size: int) -> "NoiseCovariance":
        r"""$\Sigma = v I_d$: i.i.d. entries of variance $v \ge 0$ (not a standard deviation)."""
        size = check_positive_int("size", size)
        v = _float_array("variance", variance, 0)
        arr = _concrete_array(v)
        if arr is not None and arr < 0:
            raise ValueError(f"`variance` must be >= 0, got {float(arr)}.")
        return cls(v, None, None, size)

    @classmethod
    def from_factor(cls, factor: Float[ArrayLike, "d k"]) -> "NoiseCovariance":
        r"""$\Sigma = F F^\top$ for $F$ of shape ``(d, k)`` (any $k \ge 1$)."""
        F = _float_array("factor", factor, 2)
        if 0 in F.shape:
            raise ValueError(f"`factor` has zero size (shape {F.shape}); it must be (d, k >= 1).")
        return cls(None, F, None, F.shape[0])

    @classmethod
    def from_matrix(cls, matrix: Float[ArrayLike, "d d"]) -> "NoiseCovariance":
        r"""$\Sigma$ given densely, ``(d, d)``, symmetric positive semidefinite."""
        S = _float_array("matrix", matrix, 2)
        if S.shape[0] != S.shape[1] or S.shape[0] == 0:
            raise ValueError(f"`matrix` must be square (d, d) with d >= 1, got {S.shape}.")
        arr = _concrete_array(S)
        if arr is not None:
            tol = float(np.sqrt(np.finfo(arr.dtype).eps) * max(1.0, np.max(np.abs(arr))))
            if float(np.max(np.abs(arr - arr.T))) > tol:
                raise ValueError("`matrix` is not symmetric; a covariance is.")
            lam = float(np.linalg.eigvalsh(0.5 * (arr + arr.T))[0])
            if lam < -tol:
                raise ValueError(
                    f"`matrix` is not positive semidefinite (smallest eigenvalue {lam:.3g})."
                )
        return cls(None, None, S, S.shape[0])

    @property
    def form(self) -> str:
        """``"isotropic"``, ``"factor"`` or ``"dense"``."""
        if self.entry_variance is not None:
            return "isotropic"
        return "factor" if self.factor is not None else "dense"

    def dense(self) -> Float[Array, "d d"]:
        r"""$\Sigma$ as a ``(d, d)`` matrix (for small $d$ and checks)."""
        if self.entry_variance is not None:
            return self.entry_variance * jnp.eye(self.size, dtype=self.entry_variance.dtype)
        if self.factor is not None:
            return K._mm(self.factor, self.factor.T)
        return self.matrix

    def quadratic(self, x: Float[Array, " d"]) -> Float[Array, ""]:
        r"""$x^\top \Sigma x$ (the variance of $x^\top\xi$)."""
        if self.entry_variance is not None:
            return self.entry_variance * jnp.sum(x**2)
        if self.factor is not None:
            return jnp.sum(K._mm(x, self.factor) ** 2)
        return K._mm(x, K._mm(self.matrix, x))

    def block(self, start: int, stop: int) -> "NoiseCovariance":
        r"""$\Sigma$ restricted to the flat entries ``start:stop`` (one layer's block
        $\Sigma_{ll}$)."""
        if self.entry_variance is not None:
            return NoiseCovariance(self.entry_variance, None, None, stop - start)
        if self.factor is not None:
            return NoiseCovariance(None, self.factor[start:stop], None, stop - start)
        return NoiseCovariance(None, None, self.matrix[start:stop, start:stop], stop - start)


# --------------------------------------------------------------------------------------------
# Kernels on one layer (U, s, V from K.svd)


def hessian_trace(U: Array, s: Array, V: Array, cov: NoiseCovariance) -> Array:
    r"""$\operatorname{tr}(\Sigma_{ll} Q)$, $Q = \frac12\nabla^2\sigma_1$, for the layer's block."""
    m, n = U.shape[0], V.shape[0]
    if cov.entry_variance is not None:
        return cov.entry_variance * K.expected_isotropic(s, m, n)
    if cov.matrix is not None:
        return K.expected_second(U, s, V, cov.matrix)
    a, b = _factor_projections(U, V, cov.factor, m, n)
    return jnp.sum(jax.vmap(K.second_coefficient, in_axes=(None, 1, 1))(s, a, b))


def jacobian_variance(U: Array, V: Array, cov: NoiseCovariance) -> Array:
    r"""$g^\top\Sigma_{ll} g$, $g = \operatorname{vec}(u_1 v_1^\top)$."""
    if cov.entry_variance is not None:
        return cov.entry_variance
    if cov.matrix is not None:
        return K.jacobian_variance(U, V, cov.matrix)
    m, n = U.shape[0], V.shape[0]
    F = cov.factor.reshape(m, n, -1)
    first = jnp.einsum("mnk,m,n->k", F, U[:, 0], V[:, 0], precision=K._HIGHEST)  # u1^T F_c v1
    return jnp.sum(first**2)


def _factor_projections(U, V, F, m, n):
    r"""$a_{jc} = u_j^\top F_c v_1$ (``(m, k)``) and $b_{jc} = u_1^\top F_c v_j$ (``(n, k)``)."""
    F3 = F.reshape(m, n, -1)
    Fv = jnp.einsum("mnk,n->mk", F3, V[:, 0], precision=K._HIGHEST)
    Fu = jnp.einsum("mnk,m->nk", F3, U[:, 0], precision=K._HIGHEST)
    return K._mm(U.T, Fv), K._mm(V.T, Fu)


class SpectralNoiseTerms(eqx.Module):
    r"""The two projections of $\Sigma$ that drive $\sigma_1$ (module docstring).

    - `sigma1`: $\sigma_1(W)$.
    - `hessian_trace`: $\operatorname{tr}(\Sigma Q) = \frac12\operatorname{tr}(\Sigma\,
      \nabla^2\sigma_1)$ $= \mathbb{E}[\text{second}(\xi)]$; NaN where `degenerate`.
    - `jacobian_variance`: $g^\top \Sigma g = \operatorname{Var}(u_1^\top \xi v_1)$.
    - `gap`, `degenerate`: as in :class:`TopSingularExpansion`.
    """

    sigma1: Float[Array, ""]
    hessian_trace: Float[Array, ""]
    jacobian_variance: Float[Array, ""]
    gap: Float[Array, ""]
    degenerate: Bool[Array, ""]


@eqx.filter_jit
def _noise_terms(W, cov, gap_tol):
    U, s, V = K.svd(W)
    gap, degenerate = K.gap_and_flag(s, gap_tol)
    tr = jnp.where(degenerate, jnp.nan, hessian_trace(U, s, V, cov))
    return SpectralNoiseTerms(s[0], tr, jacobian_variance(U, V, cov), gap, degenerate)


def spectral_noise_terms(
    W: Float[ArrayLike, "m n"],
    cov: NoiseCovariance,
    *,
    gap_tol: float | Float[ArrayLike, ""] | None = None,
    on_degenerate: str = "raise",
) -> SpectralNoiseTerms:
    r"""$\operatorname{tr}(\Sigma Q)$ and $g^\top \Sigma g$ for one weight matrix, in the form
    `cov` holds (the factor form never builds an $mn \times mn$ matrix).

    **Arguments:**

    - `W`: a real floating matrix ``(m, n)``.
    - `cov`: a :class:`NoiseCovariance` of size $mn$ (the noise of `W.reshape(-1)`); for one
      layer of a larger $\theta$, pass ``cov.block(start, stop)``.
    - `gap_tol`, `on_degenerate`: as in :func:`top_singular_expansion`.

    **Returns:** a :class:`SpectralNoiseTerms`.

    **Raises:** ``ValueError``/``TypeError`` before tracing for a `W` that is not a finite
    floating matrix, a `cov` that is not a :class:`NoiseCovariance` of size $mn$, or (concrete
    inputs, ``on_degenerate="raise"``) a degenerate top singular value.
    """
    W = check_matrix("W", W)
    if W.ndim != 2:
        raise ValueError(f"`W` must be one matrix (m, n), got shape {W.shape}.")
    if not isinstance(cov, NoiseCovariance):
        raise TypeError(
            f"`cov` must be a NoiseCovariance, got {type(cov).__name__}; build one with "
            "NoiseCovariance.isotropic / from_factor / from_matrix, minibatch_covariance or "
            "gradient_noise_covariance."
        )
    if cov.size != W.size:
        raise ValueError(
            f"`cov` has size {cov.size} but `W` has {W.size} entries ({W.shape}); pass the "
            "covariance of W.reshape(-1) (cov.block(start, stop) for one layer of theta)."
        )
    check_on_degenerate(on_degenerate)
    tol = prepare_gap_tol(gap_tol, W.dtype)
    out = _noise_terms(W, cov, tol)
    if on_degenerate == "raise":
        raise_if_degenerate(out.sigma1, out.gap, out.degenerate, tol, "spectral_noise_terms")
    return out


# --------------------------------------------------------------------------------------------
# Building covariances


def _kappa(n: int, batch_size: int, replace: bool) -> float:
    if replace:
        return 1.0 / batch_size
    return 0.0 if batch_size == n else (n - batch_size) / (batch_size * (n - 1))


def _factor_from_gradients(flat: Array, kappa: float) -> Array:
    n = flat.shape[0]
    D = flat - jnp.mean(flat, axis=0, keepdims=True)
    return math.sqrt(kappa / n) * D.T


def minibatch_covariance(
    per_example_grads: PyTree[ArrayLike],
    batch_size: int,
    *,
    replace: bool = False,
) -> NoiseCovariance:
    r"""The covariance of a minibatch gradient, as the factor $F$ ($d \times n$) of the
    centred per-example gradients: $\Sigma = \kappa\frac1n\sum_i(g_i - \bar g)(g_i -
    \bar g)^\top = FF^\top$ (module docstring), never a $d \times d$ matrix.

    **Arguments:**

    - `per_example_grads`: the $n$ gradients $g_i = \nabla\ell_i(\theta)$: an array ``(n, d)``,
      or a pytree whose leaves have a leading axis $n$ (e.g. ``jax.vmap(jax.grad(loss_i),
      (None, 0))(theta, jnp.arange(n))``), flattened per example in ``ravel_pytree`` order.
    - `batch_size`: $B \ge 1$ (at most $n$ without replacement).
    - `replace`: ``False`` (default, as ``lspsde.MinibatchNoise``): indices without
      replacement, $\kappa = (n - B)/(B(n-1))$; ``True``: with replacement, $\kappa = 1/B$.

    **Returns:** a :class:`NoiseCovariance` in factor form, $k = n$.

    **Raises:** ``ValueError``/``TypeError`` for non-floating or non-finite gradients, leaves
    with different leading axes or none, $n < 2$, or $B$ not in $[1, n]$ without replacement.
    """
    leaves = jax.tree.leaves(per_example_grads)
    if not leaves:
        raise ValueError("`per_example_grads` is empty; pass the (n, d) per-example gradients.")
    arrays = []
    for leaf in leaves:
        arr = _float_array("per_example_grads", leaf, max(np.ndim(leaf), 1))
        if arr.ndim < 2:
            raise ValueError(
                "`per_example_grads` must have a leading example axis and at least one "
                f"parameter axis, e.g. (n, d); got a leaf of shape {arr.shape}."
            )
        arrays.append(arr)
    ns = {a.shape[0] for a in arrays}
    if len(ns) != 1:
        raise ValueError(
            f"The leaves of `per_example_grads` have different leading (example) axes {ns}."
        )
    n = ns.pop()
    if n < 2:
        raise ValueError(f"`per_example_grads` holds {n} example(s); a covariance needs n >= 2.")
    batch_size = check_positive_int("batch_size", batch_size)
    if not isinstance(replace, bool):
        raise TypeError(f"`replace` must be True or False, got {replace!r}.")
    if not replace and batch_size > n:
        raise ValueError(
            f"`batch_size` = {batch_size} exceeds the {n} examples; without replacement a "
            "batch cannot be larger than the data set (or pass replace=True)."
        )
    tree = jax.tree.unflatten(jax.tree.structure(per_example_grads), arrays)
    flat = jax.vmap(lambda g: ravel_pytree(g)[0])(tree)
    return NoiseCovariance.from_factor(_factor_from_gradients(flat, _kappa(n, batch_size, replace)))


def _per_example_flat(objective: AbstractObjective, theta: PyTree[Array], n: int) -> Array:
    grads = jax.vmap(jax.grad(objective.per_example_loss), in_axes=(None, 0))(theta, jnp.arange(n))
    return jax.vmap(lambda g: ravel_pytree(g)[0])(grads)


def covariance_at(
    objective: AbstractObjective, noise: AbstractNoise, theta: PyTree[Array]
) -> NoiseCovariance:
    """:func:`gradient_noise_covariance` without checks (traceable)."""
    flat = ravel_pytree(theta)[0]
    d, dtype = flat.size, flat.dtype
    if isinstance(noise, NoNoise):
        return NoiseCovariance(jnp.zeros((), dtype), None, None, d)
    if isinstance(noise, IsotropicGaussian):
        return NoiseCovariance(jnp.asarray(noise.scale**2 / d, dtype), None, None, d)
    if isinstance(noise, GaussianNoise):
        v = noise.variance(objective, theta) / d
        return NoiseCovariance(jnp.asarray(v, dtype), None, None, d)
    if isinstance(noise, MinibatchNoise):
        per = _per_example_flat(objective, theta, noise.data_size)
        return NoiseCovariance(None, _factor_from_gradients(per, noise.kappa), None, d)
    B = noise.diffusion(objective, theta)
    return NoiseCovariance(None, jnp.asarray(B.as_matrix(), dtype), None, d)


def gradient_noise_covariance(
    objective: AbstractObjective, noise: AbstractNoise, theta: PyTree[ArrayLike]
) -> NoiseCovariance:
    r"""$\Sigma(\theta)$ of a noise model, exactly, in the cheapest exact form (module
    docstring): isotropic for ``IsotropicGaussian``, ``GaussianNoise`` and ``NoNoise``; the
    per-example factor ($k = n$) for ``MinibatchNoise``; the factor of ``noise.diffusion``
    otherwise.

    **Arguments:** `objective`, `noise` (an ``lspsde`` noise model), `theta` (a pytree of
    floating arrays, its flat size $d$).

    **Returns:** a :class:`NoiseCovariance` of size $d$.

    **Raises:** ``TypeError`` for an objective or noise of the wrong type; what
    ``noise.check`` raises (a finite sum missing for ``MinibatchNoise``, a shape mismatch);
    ``ValueError`` for a model without a covariance (heavy tails).
    """
    if not isinstance(objective, AbstractObjective):
        raise TypeError(
            f"`objective` must be an AbstractObjective, got {type(objective).__name__}."
        )
    if not isinstance(noise, AbstractNoise):
        raise TypeError(f"`noise` must be an lspsde noise model, got {type(noise).__name__}.")
    theta = jax.tree.map(jnp.asarray, theta)
    noise.check(objective, theta)
    return covariance_at(objective, noise, theta)
