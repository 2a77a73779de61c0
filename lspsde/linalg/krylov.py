"""What the Krylov iterations share: the default starting vector, full
reorthogonalisation, and the flattening of pytree functions to flat vectors."""

import jax
from jax import lax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

_HIGHEST = lax.Precision.HIGHEST


def _flat_function(f, x):
    """Flatten ``x`` and ``f(x)``: returns ``(f_flat, x_flat)`` on 1-D vectors of one dtype."""
    x_flat, unravel = ravel_pytree(x)

    def f_flat(z):
        return ravel_pytree(f(unravel(z)))[0].astype(x_flat.dtype)

    return f_flat, x_flat


def default_v0(key, n, dtype):
    """Unit starting vector: normal from ``key``, or a fixed hash-based vector if ``None``.

    The fixed vector hashes the index (murmur3 finaliser) to uniform entries in [-1/2, 1/2): it
    is as generic as a random draw for Krylov purposes, deterministic, and costs one fused
    integer kernel, where a threefry draw adds ~0.5 s of XLA compile time per shape on CPU.
    """
    if key is None:
        h = lax.iota(jnp.uint32, n) * np.uint32(0x9E3779B9) + np.uint32(0x7F4A7C15)
        h = (h ^ (h >> 16)) * np.uint32(0x85EBCA6B)
        h = (h ^ (h >> 13)) * np.uint32(0xC2B2AE35)
        h = h ^ (h >> 16)
        v = (h >> 8).astype(dtype) * (2.0**-24) - 0.5
    else:
        v = jax.random.normal(key, (n,), dtype=dtype)
    return v / jnp.linalg.norm(v)


def _reorthogonalise(basis, w):
    """Classical Gram–Schmidt twice against the rows of ``basis`` (unused rows are zero)."""
    for _ in range(2):
        w = w - jnp.matmul(jnp.matmul(basis, w, precision=_HIGHEST), basis, precision=_HIGHEST)
    return w
