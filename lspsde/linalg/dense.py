"""Dense references, for small systems and cross-checks: the Jacobian or Hessian is
materialised and handed to LAPACK."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PyTree

from .._checks import check_callable
from ._checks import _check_float_pytree, _check_function_output
from .krylov import _flat_function


def dense_jacobian_norm(
    f: Callable[[PyTree[Array]], PyTree[Array]], x: PyTree[Float[ArrayLike, "..."]]
) -> Float[Array, ""]:
    r"""Exact $\|\partial f/\partial x\,(x)\|_2$ by materialising the Jacobian.

    `jax.jacfwd` of the flattened map gives the $(m, n)$ matrix $J$; the result is its largest
    singular value. Memory $O(mn)$: for small systems and cross-checks only.

    **Arguments:**

    - `f`, `x`: as in :func:`jacobian_norm`.

    **Returns:**

    The scalar $\sigma_1(J)$.
    """
    check_callable("f", f)
    _check_float_pytree("x", x)
    _check_function_output("f", f, x)
    f_flat, x_flat = _flat_function(f, x)
    J = jax.jacfwd(f_flat)(x_flat)
    return jnp.linalg.svd(J, compute_uv=False)[0]


def dense_hessian_extreme_eigenvalues(
    loss: Callable[[PyTree[Array]], Float[Array, ""]], theta: PyTree[Float[ArrayLike, "..."]]
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    r"""Exact $(\lambda_{\min}, \lambda_{\max})$ of $\nabla^2 \ell(\theta)$ via `jax.hessian`.

    **Arguments:**

    - `loss`, `theta`: as in :func:`hessian_extreme_eigenvalues`.

    **Returns:**

    `(lambda_min, lambda_max)` from `eigvalsh` of the symmetrised dense Hessian ($O(n^2)$ memory).
    """
    check_callable("loss", loss)
    _check_float_pytree("theta", theta)
    _check_function_output("loss", loss, theta, scalar=True)
    loss_flat, theta_flat = _flat_function(loss, theta)
    H = jax.hessian(lambda z: loss_flat(z)[0])(theta_flat)
    w = jnp.linalg.eigvalsh(0.5 * (H + H.T))
    return w[0], w[-1]
