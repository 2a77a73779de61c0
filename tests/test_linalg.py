r"""Matrix-free operator norms and extreme eigenvalues (``lspsde.linalg``) against dense LAPACK.

Tolerances. For Lanczos, ``converged=True`` means the Ritz residual $r$ of $A^\top A$ is at most
``rtol`` (relative to $\hat\sigma^2$); for a symmetric matrix a residual $r$ puts an exact
eigenvalue within $r \hat\sigma^2$ of $\hat\sigma^2$, hence $|\hat\sigma - \sigma_i| \le
\text{rtol}\,\hat\sigma$ for some singular value $\sigma_i$ (the top one, with a generic start).
So converged Lanczos estimates are checked to ``rtol`` plus rounding. When the Krylov space is
exhausted (``max_steps >= n``) the answer is exact up to rounding ($\sim 10^{-13}$ in float64).
Power iteration's stopping rule is a heuristic (geometric tail estimate): checked more loosely.
"""

import contextlib
import functools
import logging
import time

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from lspsde import linalg
from lspsde.linalg import (
    dense_hessian_extreme_eigenvalues,
    dense_jacobian_norm,
    extreme_eigenvalues,
    hessian_extreme_eigenvalues,
    jacobian_norm,
    operator_norm,
)

# --------------------------------------------------------------------------------------------
# Helpers


def _mm(A, v):
    return jnp.matmul(A, v, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("method", "max_steps"))
def _matrix_norm(A, v0, rtol, method, max_steps):
    return operator_norm(lambda v: _mm(A, v), v0, method=method, max_steps=max_steps, rtol=rtol)


def matrix_norm(A, v0, method="lanczos", max_steps=64, rtol=1e-8):
    """operator_norm of an explicit matrix. Jitted with A and rtol as arrays, so one program per
    (shape, dtype, method, max_steps) serves every test (compilation dominates this file's time)."""
    return _matrix_norm(A, v0, jnp.asarray(rtol, A.dtype), method, max_steps)


def sigma1(A):
    return float(np.linalg.svd(np.asarray(A, np.float64), compute_uv=False)[0])


def prescribed(m, n, s, seed):
    """U diag(s) V^T with Haar-random orthonormal U (m x k), V (n x k), k = len(s)."""
    rng = np.random.default_rng(seed)
    k = len(s)
    U, _ = np.linalg.qr(rng.standard_normal((m, k)))
    V, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return jnp.asarray((U * np.asarray(s)) @ V.T)


def start(n, seed=0, dtype=jnp.float64):
    return normal((n,), seed, dtype)


def normal(shape, seed, dtype=jnp.float64):
    """Standard normal array from NumPy (jax.random would compile a program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype=dtype)


def clustered(n=200):
    """sigma_1 = 1, sigma_2 = 0.999, the rest spread over [0.01, 0.9]."""
    return np.concatenate([[1.0, 0.999], np.linspace(0.9, 0.01, n - 2)])


@contextlib.contextmanager
def no_compilation(caplog):
    """Fail if XLA compiles anything inside the block (jax.log_compiles records it)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        yield
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert not compiled, compiled


# --------------------------------------------------------------------------------------------
# operator_norm: Lanczos vs dense SVD


@pytest.mark.parametrize("shape", [(200, 200), (300, 80), (60, 500)])
def test_lanczos_random_gaussian_matches_svd(shape):
    m, n = shape
    A = normal(shape, m + n)
    rtol = 1e-8
    res = matrix_norm(A, start(n), rtol=rtol)
    exact = sigma1(A)
    assert bool(res.converged)
    # Residual inclusion (module docstring): |sigma_hat - sigma_1| <= rtol sigma_hat, + rounding.
    assert abs(float(res.value) - exact) <= (rtol + 1e-13) * exact
    assert float(res.value) <= exact * (1 + 1e-13)  # Ritz values are lower bounds
    # The a-posteriori residual is the Ritz estimate up to rounding of the reorthogonalised basis.
    assert float(res.residual) <= 2 * rtol
    # The returned unit vector attains the norm: ||A v||^2 = sigma^2 (1 + O(residual^2)).
    assert float(jnp.linalg.norm(res.vector)) == pytest.approx(1.0, abs=1e-12)
    assert float(jnp.linalg.norm(A @ res.vector)) == pytest.approx(exact, rel=rtol)
    assert int(res.n_steps) <= 64


@pytest.mark.parametrize("shape", [(300, 80), (60, 500)])
def test_power_random_gaussian_matches_svd(shape):
    A = normal(shape, 7)
    res = matrix_norm(A, start(shape[1]), method="power", max_steps=6000, rtol=1e-8)
    assert bool(res.converged)
    # Heuristic stop (geometric tail estimate): allow 100 x rtol.
    assert float(res.value) == pytest.approx(sigma1(A), rel=1e-6)


def test_float32_stays_float32_and_is_accurate():
    A = normal((300, 80), 3, jnp.float32)
    res = matrix_norm(A, start(80, dtype=jnp.float32), rtol=1e-5)
    assert res.value.dtype == jnp.float32
    assert res.vector.dtype == jnp.float32
    assert res.residual.dtype == jnp.float32
    assert bool(res.converged)
    # rtol from the residual test, plus float32 rounding of the sums (~ sqrt(n) eps ~ 2e-6).
    assert float(res.value) == pytest.approx(sigma1(A), rel=2e-5)


def test_clustered_top_singular_values_lanczos_beats_power():
    """sigma_1 = 1, sigma_2 = 0.999: power converges like 0.999^(2j), Lanczos like
    exp(-4 j sqrt(gamma)) with gamma ~ 2e-3 (Kaniel-Paige-Saad), and then much faster once the
    rest of the spectrum is resolved."""
    n = 200
    A = prescribed(n, n, clustered(n), seed=1)
    v0 = start(n)
    lz = matrix_norm(A, v0, rtol=1e-8)
    assert bool(lz.converged)
    assert abs(float(lz.value) - 1.0) <= 1e-8 + 1e-13
    assert int(lz.n_steps) <= 40  # measured: 30
    # Power with 10x the Lanczos budget is still far off and says so.
    assert 10 * int(lz.n_steps) <= 400  # so 300 steps is <= 10x the Lanczos budget
    pw_short = matrix_norm(A, v0, method="power", max_steps=300, rtol=1e-8)
    assert not bool(pw_short.converged)
    assert 1.0 - float(pw_short.value) > 1e-7  # measured: 1e-6, Lanczos: 2e-16
    # Power needs > 20x more products to reach (a looser) 1e-6 (measured: 1453 steps, 1e-8).
    pw = matrix_norm(A, v0, method="power", max_steps=6000, rtol=1e-8)
    assert bool(pw.converged)
    assert abs(float(pw.value) - 1.0) <= 1e-6
    assert int(pw.n_steps) > 20 * int(lz.n_steps)


def test_clustered_default_rtol_is_accurate():
    """The stopping rule is residual-based, so a plateau inside the cluster is not 'converged'."""
    A = prescribed(200, 200, clustered(200), seed=2)
    res = matrix_norm(A, start(200, seed=5), rtol=1e-6)
    assert bool(res.converged)
    assert abs(float(res.value) - 1.0) <= 1e-6


def test_max_steps_clipped_to_n_gives_exact_answer():
    A = normal((30, 20), 11)
    res = matrix_norm(A, start(20), max_steps=64, rtol=1e-14)
    assert int(res.n_steps) <= 20
    assert float(res.value) == pytest.approx(sigma1(A), rel=1e-12)


def test_rank_one_exhausts_after_two_steps():
    a = start(30, seed=1)
    b = start(20, seed=2)
    A = jnp.outer(a, b)
    res = matrix_norm(A, start(20, seed=3))
    assert int(res.n_steps) <= 2
    assert bool(res.converged)
    assert float(res.value) == pytest.approx(float(jnp.linalg.norm(a) * jnp.linalg.norm(b)), 1e-13)
    assert float(res.residual) < 1e-12
    # Right singular vector is +-b/|b|.
    assert abs(float(res.vector @ b / jnp.linalg.norm(b))) == pytest.approx(1.0, abs=1e-12)


def test_identity_and_one_by_one():
    eye = operator_norm(lambda v: v, start(50))
    assert float(eye.value) == pytest.approx(1.0, abs=1e-14)
    assert int(eye.n_steps) == 1
    assert bool(eye.converged)
    one = matrix_norm(jnp.array([[-3.0]]), jnp.array([0.7]))
    assert float(one.value) == pytest.approx(3.0, abs=1e-14)
    assert int(one.n_steps) == 1
    assert bool(one.converged)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_zero_operator_is_zero_without_nan(method):
    res = matrix_norm(jnp.zeros((30, 20)), start(20), method=method, max_steps=64)
    assert float(res.value) == 0.0
    assert bool(res.converged)
    assert float(res.residual) == 0.0
    assert int(res.n_steps) == 1
    assert bool(jnp.all(jnp.isfinite(res.vector)))
    assert float(jnp.linalg.norm(res.vector)) == pytest.approx(1.0)


def test_zero_jacobian_constant_map():
    # A constant map: its linearisation and transpose are symbolic zeros.
    jac = jacobian_norm(lambda x: jnp.ones(3), start(4))
    assert float(jac.value) == 0.0
    assert bool(jac.converged)
    assert bool(jnp.all(jnp.isfinite(jac.vector)))


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_non_convergence_is_reported_not_raised(method):
    A = prescribed(200, 200, clustered(200), seed=1)
    res = matrix_norm(A, start(200), method=method, max_steps=2, rtol=1e-8)
    assert not bool(res.converged)
    assert int(res.n_steps) == 2
    assert float(res.residual) > 1e-8
    assert np.isfinite(float(res.value))


def test_explicit_rmv_and_traced_rtol():
    A = normal((70, 40), 5)
    res = operator_norm(lambda v: A @ v, start(40), rmv=lambda u: A.T @ u, rtol=1e-10)
    assert float(res.value) == pytest.approx(sigma1(A), rel=1e-10)
    # rtol is a hyperparameter array: `matrix_norm` passes it traced through jit.
    B = normal((30, 20), 5)
    for rtol in [1e-4, 1e-10]:
        traced = matrix_norm(B, start(20), rtol=rtol)
        assert float(traced.value) == pytest.approx(sigma1(B), rel=rtol)


# --------------------------------------------------------------------------------------------
# jacobian_norm vs dense Jacobian


def _layer(activation, d_out, d_in, seed):
    W = normal((d_out, d_in), seed) / d_in**0.5
    b = normal((d_out,), seed + 100)
    return lambda x: activation(W @ x + b)


@pytest.mark.parametrize(
    "f, n, method",
    [
        (_layer(jnp.tanh, 30, 30, 0), 30, "lanczos"),
        (_layer(jax.nn.relu, 40, 40, 1), 40, "lanczos"),
        (_layer(jnp.tanh, 7, 50, 2), 50, "lanczos"),  # R^50 -> R^7
        (_layer(jnp.sin, 60, 12, 3), 12, "lanczos"),  # R^12 -> R^60
        (_layer(jnp.tanh, 30, 30, 0), 30, "power"),
    ],
    ids=["tanh", "relu", "wide", "tall", "tanh-power"],
)
def test_jacobian_norm_matches_dense(f, n, method):
    x = start(n, seed=9)
    res = jacobian_norm(f, x, method=method, max_steps=64 if method == "lanczos" else 5000)
    exact = float(dense_jacobian_norm(f, x))
    J = np.asarray(jax.jacfwd(f)(x))
    assert exact == pytest.approx(np.linalg.norm(J, 2), rel=1e-13)
    assert bool(res.converged)
    # n <= 64: the Krylov space is exhausted, Lanczos is exact up to rounding; power: heuristic.
    rel = 1e-11 if method == "lanczos" else 1e-5
    assert float(res.value) == pytest.approx(exact, rel=rel)


def test_jacobian_norm_pytree_input_and_output():
    M = normal((6, 15), 41)
    x = {"a": normal((5, 3), 42), "b": normal((4,), 43)}

    def f(p):
        h = jnp.tanh(M @ p["a"].reshape(-1))
        return {"h": h, "q": (p["b"] ** 2, jnp.sum(h) * p["b"])}

    res = jacobian_norm(f, x, rtol=1e-12)
    exact = float(dense_jacobian_norm(f, x))
    assert float(res.value) == pytest.approx(exact, rel=1e-11)
    assert res.vector.shape == (19,)
    # An explicit flat starting vector gives the same answer (n = 19 <= max_steps: exact).
    res_v0 = jacobian_norm(f, x, v0=start(19, seed=3), rtol=1e-12)
    assert float(res_v0.value) == pytest.approx(exact, rel=1e-11)
    # The vector unflattens to the input structure.
    unravel = ravel_pytree(x)[1]
    assert unravel(res.vector)["a"].shape == (5, 3)


def test_jacobian_norm_vmap_per_sample_equals_dense():
    f = _layer(jnp.tanh, 25, 20, seed=6)
    X = normal((8, 20), 8)
    batched = jax.jit(jax.vmap(lambda x: jacobian_norm(f, x, rtol=1e-12)))(X)
    dense = jax.vmap(functools.partial(dense_jacobian_norm, f))(X)
    assert batched.value.shape == (8,)
    assert batched.vector.shape == (8, 20)
    assert bool(jnp.all(batched.converged))
    np.testing.assert_allclose(batched.value, dense, rtol=1e-11)
    # Samples are different operators, so the norms differ.
    assert float(jnp.std(dense)) > 1e-3


def test_operator_norm_vmap_over_operators():
    As = normal((6, 30, 20), 12)
    v0 = start(20)
    exact = [sigma1(A) for A in As]
    # Lanczos: n = 20 <= max_steps, exact up to rounding. Power: heuristic stop at rtol=1e-8.
    for method, max_steps, rel in [("lanczos", 64, 1e-11), ("power", 6000, 1e-6)]:
        res = jax.vmap(lambda A, m=method, k=max_steps: matrix_norm(A, v0, method=m, max_steps=k))(
            As
        )
        np.testing.assert_allclose(res.value, exact, rtol=rel)
        assert bool(jnp.all(res.converged))
        # Every batch member ran its own number of steps; finished ones were frozen.
        assert res.n_steps.shape == (6,)


# --------------------------------------------------------------------------------------------
# Extreme eigenvalues


def test_hessian_of_quadratic_equals_eigvalsh():
    n = 40
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([[-2.0], np.linspace(0.3, 4.0, n - 2), [5.0]])
    H = jnp.asarray((Q * lam) @ Q.T)
    c = jnp.asarray(rng.standard_normal(n))

    def loss(x):
        d = x - c
        return 0.5 * d @ (H @ d)

    theta = start(n, seed=2)
    res = hessian_extreme_eigenvalues(loss, theta, rtol=1e-12)
    w = np.linalg.eigvalsh(np.asarray(H))
    assert bool(res.converged)
    # Krylov space exhausted or residual <= 1e-12 * 5: exact up to rounding; 1e-8 is the spec.
    assert float(res.lambda_min) == pytest.approx(w[0], abs=1e-8)
    assert float(res.lambda_max) == pytest.approx(w[-1], abs=1e-8)
    lo, hi = dense_hessian_extreme_eigenvalues(loss, theta)
    assert float(lo) == pytest.approx(w[0], abs=1e-12)
    assert float(hi) == pytest.approx(w[-1], abs=1e-12)
    # Ritz vectors are eigenvectors.
    assert float(res.residual_min) < 1e-10
    assert float(res.residual_max) < 1e-10
    assert float(jnp.linalg.norm(H @ res.vector_max - w[-1] * res.vector_max)) < 1e-9


def test_extreme_eigenvalues_large_symmetric_without_exhaustion():
    """n = 400 > max_steps: extremes separated from the bulk converge well inside 64 steps."""
    n = 400
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([[-1.0], np.linspace(0.1, 1.0, n - 2), [10.0]])
    H = jnp.asarray((Q * lam) @ Q.T)
    res = extreme_eigenvalues(lambda v: _mm(H, v), start(n), rtol=1e-10)
    assert bool(res.converged)
    assert int(res.n_steps) < 64
    # Residual <= 1e-10 * spread (=10) puts an eigenvalue within 1e-9 of each Ritz value.
    assert float(res.lambda_min) == pytest.approx(-1.0, abs=1e-9)
    assert float(res.lambda_max) == pytest.approx(10.0, abs=1e-9)


def test_hessian_logistic_regression_matches_dense():
    rng = np.random.default_rng(4)
    X = jnp.asarray(rng.standard_normal((100, 8)))
    y = jnp.asarray(np.sign(rng.standard_normal(100)))

    def loss(p):
        margins = y * (X @ p["w"] + p["b"])
        return jnp.mean(jax.nn.softplus(-margins)) + 0.5e-2 * p["w"] @ p["w"]

    theta = {"w": jnp.asarray(rng.standard_normal(8)) * 0.3, "b": jnp.asarray(0.1)}
    res = hessian_extreme_eigenvalues(loss, theta, rtol=1e-12)
    lo, hi = dense_hessian_extreme_eigenvalues(loss, theta)
    assert bool(res.converged)
    assert float(lo) > 0  # convex: mu > 0 from the ridge term
    assert float(res.lambda_min) == pytest.approx(float(lo), abs=1e-10 * float(hi))
    assert float(res.lambda_max) == pytest.approx(float(hi), rel=1e-10)


def test_zero_hessian():
    res = hessian_extreme_eigenvalues(lambda p: jnp.sum(p["a"]) * 2.0, {"a": start(6)})
    assert float(res.lambda_min) == 0.0
    assert float(res.lambda_max) == 0.0
    assert bool(res.converged)
    assert bool(jnp.all(jnp.isfinite(res.vector_min)))


# --------------------------------------------------------------------------------------------
# Memory: ~10^6 inputs, never an n x n matrix


def test_jacobian_norm_million_parameters_float32():
    d, h, o, batch = 1000, 1000, 10, 2
    theta = {
        "W1": normal((h, d), 11, jnp.float32) / d**0.5,
        "b1": jnp.full((h,), 0.1, jnp.float32),
        "W2": normal((o, h), 12, jnp.float32) / h**0.5,
    }
    x = normal((batch, d), 13, jnp.float32)

    def f(p):  # theta -> outputs of a ReLU MLP on a fixed batch: R^1_011_000 -> R^20
        z = jax.nn.relu(x @ p["W1"].T + p["b1"][None, :])
        return z @ p["W2"].T

    n = sum(leaf.size for leaf in jax.tree_util.tree_leaves(theta))
    assert n > 10**6
    max_steps = 24  # the output has m = 20 entries: the Krylov space is exhausted by step 21
    t0 = time.perf_counter()
    compiled = (
        jax.jit(lambda p: jacobian_norm(f, p, max_steps=max_steps, rtol=1e-5))
        .lower(theta)
        .compile()
    )
    res = compiled(theta)
    assert time.perf_counter() - t0 < 20
    assert res.value.dtype == jnp.float32
    assert bool(res.converged)

    # XLA's buffer plan: O(n * max_steps) scratch (the Lanczos bases), not O(n^2) (= 4 TB).
    stats = compiled.memory_analysis()
    if stats is not None and stats.temp_size_in_bytes > 0:
        assert stats.temp_size_in_bytes < 4 * n * (max_steps + 16)

    # Exact reference without any n x n matrix: sigma_1(J)^2 = lambda_max(J J^T), J J^T is the
    # 20 x 20 Gram matrix of the per-output gradients, in closed form (float64): with
    # z_s = relu(W1 x_s + b1), D_s = relu'(.), for outputs (s, i), (t, k):
    # <grad out_si, grad out_tk> = [i = k] z_s.z_t + (x_s.x_t + 1) sum_h W2_ih W2_kh D_sh D_th.
    W1, b1, W2 = (np.asarray(theta[k], np.float64) for k in ("W1", "b1", "W2"))
    X = np.asarray(x, np.float64)
    pre = X @ W1.T + b1
    Z, D = np.maximum(pre, 0), (pre > 0).astype(np.float64)
    G = np.einsum("ik,st->sitk", np.eye(o), Z @ Z.T) + np.einsum(
        "st,ih,kh,sh,th->sitk", X @ X.T + 1, W2, W2, D, D, optimize=True
    )
    exact = float(np.sqrt(np.linalg.eigvalsh(G.reshape(batch * o, batch * o))[-1]))
    # float32: inner products of length 10^6 carry ~1e-6 relative rounding; rtol = 1e-5.
    assert float(res.value) == pytest.approx(exact, rel=2e-5)
    # Power iteration agrees to its looser heuristic tolerance (sigma_2/sigma_1 ~ 0.99 here).
    pw = jacobian_norm(f, theta, method="power", max_steps=300, rtol=1e-6)
    assert float(pw.value) == pytest.approx(exact, rel=1e-4)


# --------------------------------------------------------------------------------------------
# Compilation


def test_second_call_does_not_retrace_or_recompile(caplog):
    A = normal((30, 20), 2)
    traces = []

    def mv(v):
        traces.append(1)
        return A @ v

    def f(x):
        traces.append(1)
        return jnp.tanh(A @ x)

    v1, v2 = start(20, seed=1), start(20, seed=2)
    first = operator_norm(mv, v1)
    first_jac = jacobian_norm(f, v1)
    n_traces = len(traces)
    with no_compilation(caplog):
        second = operator_norm(mv, v2)
        second_jac = jacobian_norm(f, v2)
    assert len(traces) == n_traces
    assert float(first.value) == pytest.approx(float(second.value), rel=1e-10)
    assert float(first_jac.value) != float(second_jac.value)  # a different point, same program


# --------------------------------------------------------------------------------------------
# Bad input: errors before tracing / compilation, naming the value and the fix


def _counting_mv(n_out=3):
    calls = []

    def mv(v):
        calls.append(1)
        return jnp.ones((n_out,)) * jnp.sum(v)

    return mv, calls


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="arnoldi"), ValueError, "Unknown `method`"),
        (dict(max_steps=0), ValueError, "max_steps"),
        (dict(max_steps=-3), ValueError, "max_steps"),
        (dict(max_steps=2.5), TypeError, "max_steps"),
        (dict(rtol=0.0), ValueError, "rtol"),
        (dict(rtol=1.0), ValueError, "rtol"),
        (dict(rtol=-1e-3), ValueError, "rtol"),
        (dict(rtol=float("nan")), ValueError, "rtol"),
    ],
)
def test_bad_options_raise_before_tracing(kwargs, error, match):
    mv, calls = _counting_mv()
    with pytest.raises(error, match=match):
        operator_norm(mv, start(4), **kwargs)
    assert not calls


@pytest.mark.parametrize(
    "v0",
    [jnp.ones((2, 3)), jnp.ones(4, dtype=jnp.int32), np.ones((1, 4)), jnp.zeros(4)],
    ids=["2d", "int", "2d-numpy", "zero"],
)
def test_bad_v0_raises_before_tracing(v0):
    mv, calls = _counting_mv()
    # 2-D / int are caught by the jaxtyping annotation under pytest (a TypeError), and by
    # linalg's own check otherwise; the zero vector only by linalg's check.
    with pytest.raises((TypeError, ValueError)):
        operator_norm(mv, v0)
    assert not calls


@pytest.mark.parametrize(
    "v0, error, match",
    [
        (jnp.ones((2, 3)), ValueError, "1-D vector of shape"),
        (jnp.ones(4, dtype=jnp.int32), TypeError, "floating dtype"),
        (jnp.zeros(4), ValueError, "zero vector"),
        (jnp.array([1.0, jnp.nan]), ValueError, "finite"),
        ([1.0, 2.0], TypeError, "JAX or NumPy array"),
    ],
)
def test_v0_messages(v0, error, match):
    with pytest.raises(error, match=match):
        linalg._check_v0(v0)


def test_bad_maps_raise_before_compilation(caplog):
    v0, v3, ints = start(4), start(3), {"a": jnp.ones(3, jnp.int32)}
    with no_compilation(caplog):
        with pytest.raises(ValueError, match="1-D vector"):
            operator_norm(lambda v: jnp.outer(v, v), v0)
        with pytest.raises(ValueError, match=r"must return shape \(4,\)"):
            operator_norm(lambda v: v[:2], v0, rmv=lambda u: u)
        with pytest.raises(TypeError, match="dtype"):
            operator_norm(lambda v: v.astype(jnp.float32), v0)
        with pytest.raises(ValueError, match=r"must return shape \(4,\)"):
            extreme_eigenvalues(lambda v: v[:3], v0)
        with pytest.raises(ValueError, match="scalar"):
            hessian_extreme_eigenvalues(lambda p: p * 2.0, v0)
        with pytest.raises(ValueError, match="has length 3"):
            jacobian_norm(jnp.tanh, v0, v0=v3)
        with pytest.raises(ValueError, match="Unknown `method`"):
            jacobian_norm(jnp.tanh, v0, method="dense")
        with pytest.raises(TypeError, match="floating"):
            jacobian_norm(lambda x: (x > 0).astype(jnp.int32), v0)
        with pytest.raises(TypeError, match="floating dtype"):
            linalg._check_float_pytree("x", ints)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_non_finite_jacobian_gives_nan_not_a_norm(method):
    """An overflowing map must not look finite: both routes return NaN, unconverged."""
    f = lambda x: jnp.array([jnp.inf, 1.0]) * x
    r = linalg.jacobian_norm(f, jnp.ones(2), method=method)
    assert np.isnan(float(r.value)) and not bool(r.converged)
    assert np.isnan(float(linalg.dense_jacobian_norm(f, jnp.ones(2))))


def test_non_finite_operator_gives_unconverged_nan_eigenvalues():
    r = linalg.extreme_eigenvalues(lambda v: jnp.array([jnp.inf, 1.0]) * v, jnp.ones(2))
    assert np.isnan(float(r.lambda_max)) and not bool(r.converged)
