r"""The second-order expansion of $\sigma_1(W + \varepsilon E)$: :func:`top_singular_expansion`,
the closed-form Hessian :func:`top_singular_hessian` and its Gaussian mean
:func:`expected_second_order`. The derivation is in the package docstring."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float
import numpy as np

from . import _kernels as K
from ._checks import (
    check_covariance,
    check_gap_tol,
    check_matrix,
    check_on_degenerate,
    check_same_shape,
)


class TopSingularExpansion(eqx.Module):
    r"""$\sigma_1(W + \varepsilon E) = \sigma_1 + \varepsilon\,\text{first} +
    \varepsilon^2\,\text{second} + O(\varepsilon^3)$, for a simple top singular value.

    **Fields** (shapes: the batch shape of `W`, or `()`):

    - `sigma1`: $\sigma_1(W)$.
    - `first`: $u_1^\top E v_1 = \langle \nabla\sigma_1, E \rangle$. Where `degenerate`: the
      one-sided directional derivative $\lim_{\varepsilon \downarrow 0}$ (package docstring, §4).
    - `second`: the exact $\varepsilon^2$ coefficient ($= \frac12 E : \nabla^2\sigma_1 : E$); NaN
      where `degenerate`.
    - `gap`: $\sigma_1 - \sigma_2$ ($\sigma_2 := 0$ for a single row or column).
    - `degenerate`: `gap` $\le$ `gap_tol` $\sigma_1$, or $\sigma_1 = 0$.
    - `u1`, `v1`: the top singular vectors ($\nabla\sigma_1 = u_1 v_1^\top$; one choice of the
      top cluster where `degenerate`).
    """

    sigma1: Float[Array, "*batch"]
    first: Float[Array, "*batch"]
    second: Float[Array, "*batch"]
    gap: Float[Array, "*batch"]
    degenerate: Bool[Array, "*batch"]
    u1: Float[Array, "*batch m"]
    v1: Float[Array, "*batch n"]


def _expansion_one(W, E, gap_tol):
    U, s, V = K.svd(W)
    gap, degenerate = K.gap_and_flag(s, gap_tol)
    a, b = K.projections(U, V, E)
    first = K.first_coefficient(U, s, V, a, E, degenerate, gap_tol)
    second = jnp.where(degenerate, jnp.nan, K.second_coefficient(s, a, b))
    return TopSingularExpansion(
        sigma1=s[0],
        first=first,
        second=second,
        gap=gap,
        degenerate=degenerate,
        u1=U[:, 0],
        v1=V[:, 0],
    )


@eqx.filter_jit
def _expansion(W, E, gap_tol):
    return K.over_batch(_expansion_one, W.ndim - 2, (0, 0, None))(W, E, gap_tol)


def _hessian_one(W, gap_tol):
    U, s, V = K.svd(W)
    gap, degenerate = K.gap_and_flag(s, gap_tol)
    g, w = K.hessian_factors(U, s, V)
    H = 2 * K._mm(g.T * w[None, :], g)
    return jnp.where(degenerate, jnp.nan, H), s[0], gap, degenerate


@eqx.filter_jit
def _hessian(W, gap_tol):
    return K.over_batch(_hessian_one, W.ndim - 2, (0, None))(W, gap_tol)


def _expected_one(W, cov, gap_tol):
    U, s, V = K.svd(W)
    gap, degenerate = K.gap_and_flag(s, gap_tol)
    value = jnp.where(degenerate, jnp.nan, K.expected_second(U, s, V, cov))
    return value, s[0], gap, degenerate


@eqx.filter_jit
def _expected(W, cov, gap_tol):
    return K.over_batch(_expected_one, W.ndim - 2, (0, None, None))(W, cov, gap_tol)


def prepare_gap_tol(gap_tol, dtype):
    check_gap_tol(gap_tol)
    if gap_tol is None:
        gap_tol = K.default_gap_tol(dtype)
    return jnp.asarray(gap_tol, dtype=dtype)


def raise_if_degenerate(sigma1, gap, degenerate, gap_tol, what: str) -> None:
    """The concrete-input error for a degenerate top singular value (traced flags pass)."""
    if isinstance(degenerate, jax.core.Tracer):
        return
    flags = np.asarray(degenerate)
    if not np.any(flags):
        return
    idx = tuple(int(i) for i in np.argwhere(flags)[0])
    s1 = float(np.asarray(sigma1)[idx])
    g = float(np.asarray(gap)[idx])
    where = f" at batch index {idx}" if idx else ""
    tol = float(gap_tol)
    if not s1 > 0:
        why = (
            f"`W` is zero{where} (sigma1 = {s1:g}): sigma1(eps E) = |eps| sigma1(E) has no "
            "derivative at eps = 0"
        )
    else:
        why = (
            f"the top singular value of `W`{where} is degenerate: sigma1 = {s1:.6g}, gap "
            f"sigma1 - sigma2 = {g:.3g} (relative {g / s1:.3g}) is not above gap_tol = {tol:.3g}, "
            "so sigma1 is not differentiable twice there (the second-order coefficient ~ 1/gap)"
        )
    raise ValueError(
        f"{what}: {why}. Fix: pass `on_degenerate='fallback'` (then `first` is the one-sided "
        "directional derivative, the largest eigenvalue of sym(U_c^T E V_c) over the top "
        "cluster, and second-order terms are NaN with `degenerate=True`, as under jit); or, for "
        "a close but simple pair, a smaller `gap_tol` (the expansion then holds only for "
        "|eps| ||E|| << gap)."
    )


def top_singular_expansion(
    W: ArrayLike,
    E: ArrayLike,
    *,
    gap_tol: float | Float[ArrayLike, ""] | None = None,
    on_degenerate: str = "raise",
) -> TopSingularExpansion:
    r"""First- and second-order coefficients of $\varepsilon \mapsto \sigma_1(W + \varepsilon E)$.

    Exact perturbation theory of a simple top singular value, from one full SVD of `W` (package
    docstring, §1–3): with $a_j = u_j^\top E v_1$, $b_j = u_1^\top E v_j$,

    $$\text{first} = u_1^\top E v_1, \qquad \text{second} = \sum_{j=2}^{r}
    \frac{(a_j + b_j)^2}{4(\sigma_1 - \sigma_j)} + \frac{(a_j - b_j)^2}{4(\sigma_1 + \sigma_j)}
    + \sum_{k > r} \frac{a_k^2}{2\sigma_1} + \sum_{k > r} \frac{b_k^2}{2\sigma_1},$$

    the last two sums over the left ($k \le m$) and right ($k \le n$) null directions.

    **Arguments:**

    - `W`: real floating matrix `(m, n)`, or a batch `(..., m, n)` (each matrix on its own).
    - `E`: the perturbation direction, same shape as `W`.
    - `gap_tol`: the top singular value counts as degenerate where
      $\sigma_1 - \sigma_2 \le$ `gap_tol` $\sigma_1$ (or $\sigma_1 = 0$); default
      $\sqrt{\epsilon}$ of the dtype (singular vectors of a pair with relative gap $\delta$ carry
      errors $\approx \epsilon / \delta$).
    - `on_degenerate`: `"raise"` (default): a `ValueError` naming the gap when the inputs are
      concrete; `"fallback"`: return the documented fallback. Under `jit`/`vmap` the flags are
      traced and the fallback is always returned.

    **Returns:**

    A :class:`TopSingularExpansion`.

    **Raises:**

    `TypeError`/`ValueError` before tracing for a non-floating `W`/`E`, fewer than two
    dimensions, a zero-size axis, mismatched shapes, NaN/inf (concrete values), a `gap_tol`
    outside $[0, 1)$; `ValueError` for a degenerate top singular value (see `on_degenerate`).
    """
    W = check_matrix("W", W)
    E = check_matrix("E", E)
    check_same_shape("E", E, "W", W)
    check_on_degenerate(on_degenerate)
    dtype = jnp.result_type(W, E)
    W, E = W.astype(dtype), E.astype(dtype)
    tol = prepare_gap_tol(gap_tol, dtype)
    out = _expansion(W, E, tol)
    if on_degenerate == "raise":
        raise_if_degenerate(out.sigma1, out.gap, out.degenerate, tol, "top_singular_expansion")
    return out


def top_singular_hessian(
    W: ArrayLike,
    *,
    gap_tol: float | Float[ArrayLike, ""] | None = None,
    on_degenerate: str = "raise",
) -> Float[Array, "*batch mn mn"]:
    r"""$\nabla^2\sigma_1(W)$ in closed form, on the row-major $\operatorname{vec}(W) =$
    `W.reshape(-1)`: $2 \sum_k w_k g_k g_k^\top$ over the $m + n - 2$ other eigenvectors of the
    dilation (package docstring, §3), so that `E.reshape(-1) @ H @ E.reshape(-1) / 2` is the
    `second` of :func:`top_singular_expansion`. Dense, $(mn)^2$ memory: for small layers and
    checks. NaN where degenerate.

    **Arguments:** `W`, `gap_tol`, `on_degenerate` as in :func:`top_singular_expansion`.

    **Returns:** shape `(..., m n, m n)`.
    """
    W = check_matrix("W", W)
    check_on_degenerate(on_degenerate)
    tol = prepare_gap_tol(gap_tol, W.dtype)
    H, s1, gap, degenerate = _hessian(W, tol)
    if on_degenerate == "raise":
        raise_if_degenerate(s1, gap, degenerate, tol, "top_singular_hessian")
    return H


def expected_second_order(
    W: ArrayLike,
    cov: float | ArrayLike,
    *,
    gap_tol: float | Float[ArrayLike, ""] | None = None,
    on_degenerate: str = "raise",
) -> Float[Array, "*batch"]:
    r"""$\mathbb{E}[\text{second}]$ for a Gaussian $E$: $\operatorname{tr}(\Sigma\,\nabla^2\sigma_1)
    / 2$, the Itô coefficient of $\sigma_1$ (package docstring, §5).

    For i.i.d. $N(0, s^2)$ entries (`cov` a scalar $s^2$) in closed form, $O(r)$ after the SVD:

    $$s^2 \Big[\sum_{j=2}^{r} \frac{\sigma_1}{\sigma_1^2 - \sigma_j^2} +
    \frac{(m - r) + (n - r)}{2 \sigma_1}\Big];$$

    for a general covariance $\Sigma$ of the row-major $\operatorname{vec}(E)$ (`cov` of shape
    `(m n, m n)`), $\sum_k w_k\, g_k^\top \Sigma g_k$ ($O((m+n)(mn)^2)$).

    **Arguments:**

    - `W`: as in :func:`top_singular_expansion`.
    - `cov`: the entry variance $s^2$ (a scalar $\ge 0$, not the standard deviation) or the
      symmetric PSD `(m n, m n)` covariance of `E.reshape(-1)`, shared across a batch.
    - `gap_tol`, `on_degenerate`: as in :func:`top_singular_expansion`; NaN where degenerate.

    **Returns:** the batch shape of `W`.
    """
    W = check_matrix("W", W)
    check_on_degenerate(on_degenerate)
    m, n = W.shape[-2:]
    cov = check_covariance(cov, m, n, W.dtype)
    tol = prepare_gap_tol(gap_tol, W.dtype)
    value, s1, gap, degenerate = _expected(W, cov, tol)
    if on_degenerate == "raise":
        raise_if_degenerate(s1, gap, degenerate, tol, "expected_second_order")
    return value
