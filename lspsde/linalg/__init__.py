r"""Matrix-free operator norms and extreme eigenvalues.

The Learning Stability Profile needs operator 2-norms $\|J\|_2 = \sigma_1(J)$ of Jacobian blocks
$J = \partial f / \partial x$ of learning maps, and the extreme Hessian eigenvalues $\mu, L$ of
objectives. Both are computed here from matrix-vector products only, so that networks with
$10^6$ parameters never materialise a $10^6 \times 10^6$ matrix: memory is
$O(n \cdot \text{max\_steps})$.

**Algorithms.**

- ``method="lanczos"`` (default): Golub–Kahan–Lanczos bidiagonalisation (Golub & Kahan 1965;
  Golub & Van Loan, *Matrix Computations*, 4th ed., §10.4) with full reorthogonalisation
  (classical Gram–Schmidt applied twice, "twice is enough") against preallocated bases
  $U \in \mathbb{R}^{k \times m}$, $V \in \mathbb{R}^{k \times n}$. After $j$ steps
  $A V_j = U_j B_j$ with $B_j$ upper bidiagonal; $\sigma_1(B_j) \uparrow \sigma_1(A)$.
- ``method="power"``: power iteration on $A^\top A$ (Golub & Van Loan §7.3.1). Its error decays
  like $(\sigma_2 / \sigma_1)^{2j}$, against roughly $\exp(-4 j \sqrt{\gamma})$,
  $\gamma = (\sigma_1^2 - \sigma_2^2)/(\sigma_2^2 - \sigma_n^2)$, for Lanczos (Kaniel–Paige–Saad
  bound): with clustered top singular values Lanczos needs far fewer products.
- :func:`extreme_eigenvalues`: symmetric Lanczos tridiagonalisation with full
  reorthogonalisation (Golub & Van Loan §10.1) for $\lambda_{\min}$ and $\lambda_{\max}$.

**Stopping rules.** Lanczos (both kinds) has converged when the Ritz estimate changed by at most
``rtol`` (relative) over the last step *and* the Ritz residual bound is at most ``rtol`` (relative
to $\sigma_1^2$, resp. the spectral radius), the ARPACK / irlba criterion. A residual $r$
guarantees an exact eigenvalue within $r$ of the Ritz value (Weyl / Bauer–Fike for symmetric
matrices), so a plateau of the Ritz value inside a cluster, or on a lower singular value when
``v0`` is nearly orthogonal to the top one, is not mistaken for convergence (a test on the change
alone, or on $r \le \sqrt{\text{rtol}}$ via Kato–Temple, was measured to stop with errors up to
$4 \cdot 10^{-3}$ at ``rtol=1e-6`` on flat spectra). Power iteration converges too slowly for a
residual test: it stops when the estimated remaining error of its geometrically converging
Rayleigh quotients (Aitken: $\delta_j \rho / (1 - \rho)$, $\rho = \delta_j / \delta_{j-1}$)
is below ``rtol`` and the residual is below $\sqrt{\text{rtol}}$ — a heuristic, which can still
stop early on a plateau. Both have also converged, exactly, when the Krylov space is exhausted (a
new Lanczos vector has norm at the rounding level $\varepsilon \sqrt{n}$ times the running norm
estimate). Non-convergence is reported in ``converged`` (like lineax's result codes), never
raised; ``residual`` is always recomputed a posteriori from extra products.

**The small problem, per step.** The Ritz value comes from bisection on Sturm counts of the
(padded) tridiagonal — for Golub–Kahan the zero-diagonal "perfect shuffle" form of $B_j$, whose
eigenvalues are $\pm\sigma_i(B_j)$, so small singular values keep full accuracy — and the last
entry of its eigenvector, needed for the Ritz residual $\beta_j |x_j|$ (Paige), from one step of
inverse iteration with a definite shift (LDL^T without pivoting). Both are short ``lax.scan``s in
pure XLA: a LAPACK ``svd``/``eigh`` per step was measured at 25–40 ms on a busy 2-core CPU (BLAS
thread contention) against ~0.1 ms, and batches poorly under ``vmap``. The Ritz vector itself is
formed once, after the loop, from one small dense ``eigh``.

**Why not lineax.** ``lineax.JacobianLinearOperator.mv`` re-linearises at every product and its
transpose goes through ``jax.vjp``; here the map is linearised once with ``jax.linearize`` and
transposed with ``jax.linear_transpose``, so every product reuses the stored linearisation. This is
simpler and faster for the iterative loop, so lineax is not used.

**Compilation.** Every public function is wrapped in ``eqx.filter_jit`` with the callables as
static arguments (as ``diffrax.diffeqsolve`` does with vector fields): calling again with the same
function object and the same shapes reuses the compiled program. Pass the same function object to
benefit; arrays closed over by that function are compile-time constants.

All functions are ``jit``- and ``vmap``-able (``lax.while_loop``, static shapes); under ``vmap``
the loop runs until every batch member has stopped, with finished members frozen.
"""

from ._checks import _check_float_pytree as _check_float_pytree
from ._checks import _check_function_output as _check_function_output
from ._checks import _check_linear_map as _check_linear_map
from ._checks import _check_max_steps as _check_max_steps
from ._checks import _check_method as _check_method
from ._checks import _check_rtol as _check_rtol
from ._checks import _check_v0 as _check_v0
from .dense import dense_hessian_extreme_eigenvalues, dense_jacobian_norm
from .eigenvalues import extreme_eigenvalues, hessian_extreme_eigenvalues
from .norms import jacobian_norm, operator_norm
from .results import EigResult, NormResult

__all__ = [
    "EigResult",
    "NormResult",
    "dense_hessian_extreme_eigenvalues",
    "dense_jacobian_norm",
    "extreme_eigenvalues",
    "hessian_extreme_eigenvalues",
    "jacobian_norm",
    "operator_norm",
]
