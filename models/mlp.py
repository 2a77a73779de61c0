r"""Feedforward networks $X_{k+1} = \sigma(W_k X_k + b_k)$ with controlled spectral norms.

Theorem 4.1 bounds the forward Jacobian by $\prod_k \|W_k\|_2 \le \rho^L$. The initialisations
here make $\|W_k\|_2$ known:

- ``init="orthogonal"``: $W_k = \rho\,Q_k$ with $Q_k$ (semi-)orthogonal, so *every* singular
  value of $W_k$ equals $\rho$ (the bound of Theorem 4.1 is then attained by a linear network);
- ``init="spectral"``: a Gaussian matrix rescaled so its *top* singular value is $\rho$;
- ``init="gaussian"``: i.i.d. $\mathcal{N}(0, \sigma_w^2 / n_{\rm in})$ entries (LeCun for
  $\sigma_w = 1$, He for ReLU with $\sigma_w = \sqrt2$); then
  $\|W_k\|_2 \approx \sigma_w (1 + \sqrt{n_{\rm out}/n_{\rm in}})$ (Bai–Yin), not exactly known.
"""

from collections.abc import Sequence
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from lspsde._checks import _concrete_array, check_positive, check_positive_int
from lspsde._custom_types import ScalarLike
from lspsde.representation import Feedforward

__all__ = ["mlp", "orthogonal_matrix", "spectral_normalize"]

_INITS = ("orthogonal", "gaussian", "spectral")


def orthogonal_matrix(key: PRNGKeyArray, shape: tuple[int, int]) -> Float[Array, "n_out n_in"]:
    r"""A Haar-random (semi-)orthogonal matrix: all $\min(n_{\rm out}, n_{\rm in})$ singular
    values equal 1.

    The Q factor of the QR decomposition of a Gaussian matrix, with the signs of its columns fixed
    by $\operatorname{sign}(\operatorname{diag} R)$ so that the distribution is Haar (Mezzadri
    2007); transposed when $n_{\rm out} < n_{\rm in}$ (orthonormal rows).
    """
    n_out = check_positive_int("shape[0]", shape[0])
    n_in = check_positive_int("shape[1]", shape[1])
    return _orthogonal(key, (n_out, n_in))


def _haar(z: Array, shape: tuple[int, int]) -> Array:
    """Haar (semi-)orthogonal matrix of ``shape`` from a Gaussian ``z`` of shape (max, min)."""
    q, r = jnp.linalg.qr(z)
    q = q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)[None, :]
    return q if shape[0] >= shape[1] else q.T


@functools.partial(jax.jit, static_argnums=1)
def _orthogonal(key: PRNGKeyArray, shape: tuple[int, int]) -> Array:
    return _haar(jax.random.normal(key, (max(shape), min(shape))), shape)


@jax.jit
def _top_singular_value(W: Array) -> Array:
    return jnp.linalg.svd(W, compute_uv=False)[0]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _mlp_arrays(
    key: PRNGKeyArray,
    widths: tuple[int, ...],
    init: str,
    rho: Array,
    sigma_w: Array,
    bias_std: Array,
) -> tuple[list[Array], list[Array]]:
    """All (W_k, b_k) from ONE Gaussian draw (one compile per `widths`; the threefry kernel
    dominates compile time on CPU, so it is traced once, not once per layer)."""
    shapes = [(widths[k + 1], widths[k]) for k in range(len(widths) - 1)]
    sizes = [o * i + o for o, i in shapes]
    z = jax.random.normal(key, (sum(sizes),))
    weights, biases, start = [], [], 0
    for (n_out, n_in), size in zip(shapes, sizes, strict=True):
        zw = z[start : start + n_out * n_in]
        zb = z[start + n_out * n_in : start + size]
        start += size
        if init == "orthogonal":
            w = rho * _haar(zw.reshape(max(n_out, n_in), min(n_out, n_in)), (n_out, n_in))
        elif init == "gaussian":
            w = sigma_w / jnp.sqrt(n_in) * zw.reshape(n_out, n_in)
        else:
            g = zw.reshape(n_out, n_in)
            w = (rho / _top_singular_value(g)) * g
        weights.append(w)
        biases.append(bias_std * zb)
    return weights, biases


def spectral_normalize(
    W: Float[ArrayLike, "n_out n_in"], rho: ScalarLike
) -> Float[Array, "n_out n_in"]:
    r"""$\rho\, W / \|W\|_2$: the matrix rescaled so that its spectral norm is exactly $\rho$.

    **Arguments:**

    - `W`: a nonzero matrix.
    - `rho`: the target spectral norm $\rho > 0$.

    **Raises:** ``ValueError`` for a concrete zero matrix or $\rho \le 0$.
    """
    check_positive("rho", rho, fix="The target spectral norm rho must be > 0.")
    W = jnp.asarray(W, dtype=float)
    if W.ndim != 2:
        raise ValueError(f"`W` must be a matrix, got shape {W.shape}.")
    norm = _top_singular_value(W)
    concrete = _concrete_array(norm)
    if concrete is not None and not concrete > 0:
        raise ValueError("`W` is the zero matrix: it has no direction to rescale to norm rho.")
    return (rho / norm) * W


def mlp(
    key: PRNGKeyArray,
    widths: Sequence[int],
    *,
    activation: str = "relu",
    init: str = "orthogonal",
    rho: ScalarLike = 1.0,
    sigma_w: ScalarLike = 1.0,
    bias_std: ScalarLike = 0.0,
    final_activation: bool = True,
) -> Feedforward:
    r"""A feedforward network $(n_0 \to n_1 \to \dots \to n_L)$ (Section 4.1, Theorem 4.1).

    **Arguments:**

    - `key`: PRNG key (all layers are drawn from one Gaussian vector, split by layer).
    - `widths`: $(n_0, n_1, \dots, n_L)$, integers $\ge 1$, at least two entries.
    - `activation`: a name from ``lspsde.representation.ACTIVATIONS``.
    - `init`: ``"orthogonal"`` ($W_k = \rho Q_k$: all singular values $= \rho$),
      ``"spectral"`` (Gaussian rescaled to $\|W_k\|_2 = \rho$) or ``"gaussian"``
      ($W_{k,ij} \sim \mathcal{N}(0, \sigma_w^2/n_k)$).
    - `rho`: the spectral norm for ``"orthogonal"``/``"spectral"``; $> 0$.
    - `sigma_w`: the weight scale for ``"gaussian"``; $> 0$.
    - `bias_std`: biases $b_k \sim \mathcal{N}(0, \text{bias\_std}^2)$; 0 gives zero biases.
    - `final_activation`: whether $\sigma$ is applied after the last layer.

    **Returns:** a [`Feedforward`][lspsde.representation.Feedforward].
    """
    if isinstance(widths, str) or not isinstance(widths, Sequence):
        raise TypeError(f"`widths` must be a sequence of ints (n_0, ..., n_L), got {widths!r}.")
    if len(widths) < 2:
        raise ValueError(
            f"`widths` must have at least two entries (input and output width), got {widths!r}."
        )
    widths = tuple(
        check_positive_int(f"widths[{i}]", n, fix="Every layer width must be an int >= 1.")
        for i, n in enumerate(widths)
    )
    if init not in _INITS:
        raise ValueError(f"Unknown init {init!r}; choose one of {list(_INITS)}.")
    check_positive("rho", rho, fix="rho is the spectral norm of each W_k; use rho > 0.")
    check_positive("sigma_w", sigma_w, fix="sigma_w scales the weight variance; use > 0.")
    check_positive("bias_std", bias_std, allow_zero=True, fix="Use bias_std >= 0.")

    weights, biases = _mlp_arrays(
        key,
        widths,
        init,
        jnp.asarray(rho, float),
        jnp.asarray(sigma_w, float),
        jnp.asarray(bias_std, float),
    )
    return Feedforward(weights, biases, activation=activation, final_activation=final_activation)
