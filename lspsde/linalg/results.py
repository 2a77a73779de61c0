"""What the matrix-free solvers return: :class:`NormResult` and :class:`EigResult`."""

import equinox as eqx
from jaxtyping import Array, Bool, Float, Int


class NormResult(eqx.Module):
    r"""Estimate of the operator 2-norm $\|A\|_2 = \sigma_1(A)$.

    **Fields:**

    - `value`: the estimate of $\sigma_1(A)$ (a lower bound up to rounding, for both methods).
    - `vector`: unit right singular vector estimate $v$ (flat, shape `(n,)`).
    - `n_steps`: iterations used; each costs one product with $A$ and one with $A^\top$.
    - `converged`: whether the stopping rule (module docstring) was met.
    - `residual`: relative residual $\|A^\top A v - s^2 v\| / s^2$, recomputed a posteriori
      ($0$ for the zero operator). A residual $r$ guarantees an eigenvalue of $A^\top A$ within
      $r s^2$ of $s^2$.
    """

    value: Float[Array, ""]
    vector: Float[Array, " n"]
    n_steps: Int[Array, ""]
    converged: Bool[Array, ""]
    residual: Float[Array, ""]


class EigResult(eqx.Module):
    r"""Extreme eigenvalues $\lambda_{\min}, \lambda_{\max}$ of a symmetric operator $H$.

    **Fields:**

    - `lambda_min`, `lambda_max`: the Ritz-value estimates (they lie inside
      $[\lambda_{\min}(H), \lambda_{\max}(H)]$ up to rounding).
    - `vector_min`, `vector_max`: the corresponding unit Ritz vectors (flat, shape `(n,)`).
    - `n_steps`: Lanczos steps used (one product with $H$ each).
    - `converged`: whether the stopping rule (module docstring) was met for both ends.
    - `residual_min`, `residual_max`: $\|H v - \lambda v\| / \max(|\lambda_{\min}|,
      |\lambda_{\max}|)$, recomputed a posteriori (relative to the spectral radius estimate, so
      the accuracy of a $\lambda_{\min}$ much smaller than $\lambda_{\max}$ is absolute, not
      relative).
    """

    lambda_min: Float[Array, ""]
    lambda_max: Float[Array, ""]
    vector_min: Float[Array, " n"]
    vector_max: Float[Array, " n"]
    n_steps: Int[Array, ""]
    converged: Bool[Array, ""]
    residual_min: Float[Array, ""]
    residual_max: Float[Array, ""]
