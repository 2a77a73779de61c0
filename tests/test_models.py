"""The model zoo: known constants are what they claim; the paper's bounds hold or are tight."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lspsde import theory as T
from lspsde.representation import Feedforward, Residual
import models


def _svals(M) -> np.ndarray:
    # numpy for the checks: exact LAPACK SVD, no compilation per shape.
    return np.linalg.svd(np.asarray(M), compute_uv=False)


# Test data from numpy's generator: jax.random would compile a threefry kernel per shape.
RNG = np.random.default_rng


# Transforms under one jit each (eager transforms compile op by op).
@eqx.filter_jit
def _jacobian(f, x):
    return jax.jacfwd(f)(x)


@eqx.filter_jit
def _grad(obj, theta):
    return jax.grad(obj.loss)(theta)


@eqx.filter_jit
def _hessian(obj, theta):
    return jax.hessian(obj.loss)(theta)


# ------------------------------------------------------------------------------------------
# Feedforward networks
# ------------------------------------------------------------------------------------------


def test_orthogonal_init_all_singular_values_equal_rho():
    rho = 0.9
    net = models.mlp(jax.random.key(0), (7, 12, 12, 5), rho=rho)  # tall, square, wide layers
    assert isinstance(net, Feedforward) and net.widths == (7, 12, 12, 5)
    for w in net.weights:
        # Householder QR is backward stable: Q^T Q = I to ~n eps ~ 1e-15.
        np.testing.assert_allclose(_svals(w), rho, rtol=0, atol=1e-12)
    assert all(float(jnp.max(jnp.abs(b))) == 0.0 for b in net.biases)  # bias_std = 0


def test_spectral_init_and_spectral_normalize():
    net = models.mlp(jax.random.key(1), (7, 12, 12, 5), init="spectral", rho=0.5)
    for w in net.weights:
        s = _svals(w)
        assert s[0] == pytest.approx(0.5, abs=1e-12)
        assert s[-1] < 0.5  # only the top singular value is fixed
    W = RNG(2).standard_normal((4, 6))
    assert _svals(models.spectral_normalize(W, 2.0))[0] == pytest.approx(2.0, abs=1e-12)


def test_gaussian_init_entry_variance_chi_square():
    n_in, n_out, sigma_w = 400, 300, 1.7
    (W,) = models.mlp(jax.random.key(3), (n_in, n_out), init="gaussian", sigma_w=sigma_w).weights
    w = np.asarray(W).ravel()
    N, var = w.size, sigma_w**2 / n_in
    # Known mean 0: S = sum w^2 / var ~ chi^2_N exactly. Two-sided interval at level 1 - 1e-6
    # (the seed is fixed; a level this strict would accept almost every seed).
    S = float(np.sum(w**2) / var)
    lo, hi = stats.chi2.ppf([0.5e-6, 1 - 0.5e-6], N)
    assert lo < S < hi, (S, lo, hi)
    # Mean: sum w / sqrt(N var) ~ N(0, 1); |z| < 4.9 is the same 1e-6 level.
    assert abs(np.sum(w) / np.sqrt(N * var)) < stats.norm.ppf(1 - 0.5e-6)


def test_mlp_bias_std_and_determinism():
    a = models.mlp(jax.random.key(4), (3, 5, 2), bias_std=0.3, init="gaussian")
    b = models.mlp(jax.random.key(4), (3, 5, 2), bias_std=0.3, init="gaussian")
    assert all(bool(jnp.all(x == y)) for x, y in zip(a.weights, b.weights, strict=True))
    assert float(jnp.max(jnp.abs(a.biases[0]))) > 0.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"widths": (3, 0, 2)}, ValueError, "widths\\[1\\]"),
        ({"widths": (3,)}, ValueError, "at least two"),
        ({"widths": (3, 2.5)}, TypeError, "widths"),
        ({"widths": (3, 2), "init": "xavier"}, ValueError, "Unknown init"),
        ({"widths": (3, 2), "rho": 0.0}, ValueError, "`rho`"),
        ({"widths": (3, 2), "sigma_w": -1.0}, ValueError, "`sigma_w`"),
        ({"widths": (3, 2), "activation": "swish"}, ValueError, "Unknown activation"),
    ],
)
def test_mlp_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        models.mlp(jax.random.key(0), **kwargs)


def test_spectral_normalize_zero_matrix():
    with pytest.raises(ValueError, match="zero matrix"):
        models.spectral_normalize(jnp.zeros((3, 3)), 1.0)


# ------------------------------------------------------------------------------------------
# Residual blocks: Lemma 4.2 attained, Theorem 4.3 tight and holding
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 5, 8])
def test_linear_block_attains_lemma_4_2(dim):
    m, M_g = 0.5, 1.5
    block = models.linear_dissipative_block(jax.random.key(dim), dim, m, M_g, bias_std=1.0)
    A = np.asarray(block.A)
    # A = -m I + K with K exactly skew: sym(A) = -m I to rounding, ||A|| = sqrt(m^2 + kappa^2).
    np.testing.assert_allclose((A + A.T) / 2, -m * np.eye(dim), rtol=0, atol=1e-15)
    assert _svals(A)[0] == pytest.approx(M_g, abs=1e-12)
    assert float(block.m) == m and float(block.M_g) == pytest.approx(M_g, abs=1e-12)
    h_max = float(T.residual_step_max(m, M_g))  # 2 * 0.5 / 2.25 = 0.444...
    for h in [0.05, 0.2, h_max / 2, h_max, 0.7, 2.0]:  # inside and beyond h_max
        exact = _svals(np.eye(dim) + h * A)[0]
        # I + hA is normal with eigenvalues 1 - hm +- i h kappa: |.|^2 = 1 - 2hm + h^2 M_g^2.
        assert exact == pytest.approx(float(T.residual_contraction(h, m, M_g)), abs=1e-12)


def test_one_dimensional_block():
    block = models.linear_dissipative_block(jax.random.key(0), 1, 0.8, 0.8)
    # K = 0, A = -m: c(h) = |1 - h m| exactly; at h = 2 that is 0.6.
    assert float(T.residual_contraction(2.0, 0.8, 0.8)) == pytest.approx(0.6, abs=1e-15)
    assert float(block(jnp.array([1.0]))[0]) == pytest.approx(-0.8, abs=1e-15)


@pytest.mark.parametrize("h", [0.2, 0.8])  # h_max = 0.444: contraction, then expansion
def test_linear_network_jacobian_tight(h):
    dim, depth, m, M_g = 5, 7, 0.5, 1.5
    bound = float(T.residual_contraction(h, m, M_g)) ** depth
    x0 = jnp.asarray(RNG(9).standard_normal(dim))
    # All blocks equal: dX_L/dX_0 = (I + hA)^L, a power of a normal matrix, so its norm is
    # ||I + hA||^L = c_x(h)^L exactly: Theorem 4.3's bound is attained.
    shared = models.residual_network(jax.random.key(1), dim, depth, h, m, M_g, shared=True)
    assert isinstance(shared, Residual) and shared.depth == depth
    assert _svals(_jacobian(shared, x0))[0] == pytest.approx(bound, rel=1e-12)
    m_net, M_net = models.residual_network_constants(shared)
    assert float(m_net) == m and float(M_net) == pytest.approx(M_g, abs=1e-12)


@pytest.mark.parametrize(
    ("dim", "depth", "attained"),
    [
        # Even dim: K^T K = kappa^2 I, so (I + hA)^T (I + hA) = (1 - hm)^2 I + h^2 K^T K = c^2 I:
        # every layer is c_x(h) times an orthogonal matrix, and so is any product of them.
        (6, 5, True),
        # Odd dim: one null direction n_k of K_k per layer, where the gain is |1 - hm| < c.
        # With depth < dim, some x_0 keeps X_k orthogonal to n_k at every layer (depth linear
        # conditions in dim unknowns), so c^L is still attained ...
        (5, 3, True),
        # ... with depth >= dim, generically no such x_0: the product is strictly below c^L.
        (3, 6, False),
        (5, 8, False),
    ],
)
@pytest.mark.parametrize("h", [0.2, 0.8])
def test_linear_network_independent_blocks(dim, depth, attained, h):
    m, M_g = 0.5, 1.5
    bound = float(T.residual_contraction(h, m, M_g)) ** depth
    net = models.residual_network(jax.random.key(2), dim, depth, h, m, M_g)
    norm = _svals(_jacobian(net, jnp.ones(dim)))[0]
    assert norm <= bound * (1 + 1e-12)  # Theorem 4.3 holds
    if attained:
        assert norm == pytest.approx(bound, rel=1e-12)
    else:
        assert norm < 0.99 * bound  # this seed loses 3% to 53%


def test_nonlinear_block_dissipativity_and_bound():
    dim, m, M_g = 8, 0.3, 2.0
    block = models.nonlinear_dissipative_block(
        jax.random.key(5), dim, m, M_g, rank=3, inner_bias_std=0.5, bias_std=0.5
    )
    assert float(block.M_g) == pytest.approx(M_g, abs=1e-12)  # the budget split adds up
    xs = jnp.asarray(1.5 * RNG(6).standard_normal((64, dim)))
    Gs = np.asarray(jax.jit(jax.vmap(jax.jacfwd(block)))(xs))
    for G in Gs:
        eig = np.linalg.eigvalsh((G + G.T) / 2)
        # sym G = -m I - c W^T D W: every eigenvalue <= -m, and -m itself on null(W) (rank
        # 3 < 8), so lambda_max = -m to the rounding of an 8x8 eigensolve.
        assert eig[-1] == pytest.approx(-m, abs=1e-10)
        assert np.all(eig <= -m + 1e-12)
        assert _svals(G)[0] <= M_g + 1e-12  # the bound holds (conservatively)


def test_nonlinear_network_obeys_theorem_4_3():
    dim, depth, h, m, M_g = 6, 4, 0.1, 0.4, 1.6
    net = models.residual_network(jax.random.key(7), dim, depth, h, m, M_g, kind="nonlinear")
    m_net, M_net = models.residual_network_constants(net)
    bound = float(T.residual_contraction(h, m_net, M_net)) ** depth
    xs = jnp.asarray(2.0 * RNG(8).standard_normal((16, dim)))
    Js = np.asarray(jax.jit(jax.vmap(jax.jacfwd(net)))(xs))
    assert max(_svals(J)[0] for J in Js) <= bound * (1 + 1e-12)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: models.linear_dissipative_block(jax.random.key(0), 3, 2.0, 1.0), "m <= M_g"),
        (lambda: models.linear_dissipative_block(jax.random.key(0), 1, 1.0, 2.0), "dim = 1"),
        (lambda: models.linear_dissipative_block(jax.random.key(0), 3, 0.0, 1.0), "`m`"),
        (lambda: models.nonlinear_dissipative_block(jax.random.key(0), 3, 1, 2, rank=3), "rank"),
        (
            lambda: models.residual_network(jax.random.key(0), 3, 2, 0.1, 1.0, 2.0, kind="conv"),
            "Unknown kind",
        ),
    ],
)
def test_residual_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------------------
# Objectives
# ------------------------------------------------------------------------------------------


def test_quadratic():
    d = 6
    q = models.orthogonal_matrix(jax.random.key(0), (d, d))
    lam = jnp.array([0.2, 0.5, 1.0, 1.0, 3.0, 7.0])
    H = (q * lam[None, :]) @ q.T
    theta_star = jnp.asarray(RNG(1).standard_normal(d))
    obj = models.Quadratic(H, theta_star)
    assert float(jnp.max(jnp.abs(obj.gradient(obj.minimizer())))) == 0.0  # H (0) = 0 exactly
    assert float(obj.loss(theta_star)) == 0.0
    ev = np.linalg.eigvalsh(np.asarray(obj.hessian))
    assert float(obj.strong_convexity()) == pytest.approx(ev[0], rel=1e-13)
    assert float(obj.smoothness()) == pytest.approx(ev[-1], rel=1e-13)
    assert float(obj.strong_convexity()) == pytest.approx(0.2, rel=1e-13)  # Q diag Q^T
    theta = jnp.asarray(RNG(2).standard_normal(d))
    np.testing.assert_allclose(_grad(obj, theta), obj.gradient(theta), atol=1e-13)
    np.testing.assert_allclose(_hessian(obj, theta), obj.hessian, atol=1e-13)


def test_least_squares():
    n, d = 40, 7
    X, y, theta_true = models.synthetic_regression(jax.random.key(3), n, d, 0.5)
    obj = models.LeastSquares(X, y)
    g = obj.gradient(obj.minimizer())
    # Normal equations hold to rounding: ||A^T r|| / n ~ eps ||A|| ||b|| / n.
    scale = _svals(X)[0] * float(jnp.linalg.norm(y)) / n
    assert float(jnp.linalg.norm(g)) < 1e-12 * scale
    np.testing.assert_allclose(_grad(obj, theta_true), obj.gradient(theta_true), atol=1e-12)
    ev = np.linalg.eigvalsh(np.asarray(X.T @ X) / n)
    assert float(obj.strong_convexity()) == pytest.approx(ev[0], rel=1e-12)
    assert float(obj.smoothness()) == pytest.approx(ev[-1], rel=1e-12)
    # Noise-free data: theta* is the teacher's parameter (kappa(X) ~ 3: error ~ 1e-15).
    X0, y0, t0 = models.synthetic_regression(jax.random.key(3), n, d, 0.0)
    np.testing.assert_allclose(models.LeastSquares(X0, y0).minimizer(), t0, atol=1e-12)


@pytest.fixture(scope="module")
def logistic_data():
    rng = RNG(10)
    X = rng.standard_normal((80, 5))
    p = 1.0 / (1.0 + np.exp(-2.0 * X @ rng.standard_normal(5)))
    y01 = (rng.uniform(size=80) < p).astype(float)
    return jnp.asarray(X), jnp.asarray(y01)


def test_logistic_regression(logistic_data):
    X, y01 = logistic_data
    obj = models.LogisticRegression(X, y01, 0.05)
    # BFGS then Newton: the gradient at theta* is at rounding level (the spec asks < 1e-8).
    assert float(jnp.linalg.norm(obj.gradient(obj.minimizer()))) < 1e-8
    # The same objective from labels in {-1, 1}.
    obj_pm = models.LogisticRegression(X, 2.0 * y01 - 1.0, 0.05)
    theta = jnp.asarray(RNG(11).standard_normal(5))
    assert float(obj_pm.loss(theta)) == pytest.approx(float(obj.loss(theta)), rel=1e-15)
    np.testing.assert_allclose(obj_pm.minimizer(), obj.minimizer(), atol=1e-12)
    # mu = l2 <= lambda(Hessian) <= l2 + lambda_max(X^T X) / (4n) = L at random points.
    mu, L = float(obj.strong_convexity()), float(obj.smoothness())
    assert mu == 0.05 and L == pytest.approx(0.05 + _svals(X)[0] ** 2 / 320, rel=1e-12)
    thetas = jnp.asarray(np.concatenate([3.0 * RNG(12).standard_normal((20, 5)), np.zeros((1, 5))]))
    hessians = np.asarray(jax.vmap(lambda t: _hessian(obj, t))(thetas))
    for Hm in hessians:
        ev = np.linalg.eigvalsh(Hm)
        assert mu - 1e-12 <= ev[0] and ev[-1] <= L + 1e-12
    # At theta = 0 every p_i(1 - p_i) = 1/4: the Hessian is exactly l2 I + X^T X / (4n), so L
    # is attained there.
    assert np.linalg.eigvalsh(hessians[-1])[-1] == pytest.approx(L, rel=1e-12)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: models.Quadratic(jnp.array([[2.0, 1.0], [0.0, 2.0]]), jnp.zeros(2)), "symmetric"),
        (
            lambda: models.Quadratic(jnp.array([[1.0, 0.0], [0.0, -1.0]]), jnp.zeros(2)),
            "not positive definite",
        ),
        # Shape mismatch: jaxtyping's runtime check (TypeError) or ours (ValueError) fires.
        (lambda: models.Quadratic(jnp.eye(2), jnp.zeros(3)), "minimizer"),
        (
            lambda: models.LeastSquares(jnp.ones((5, 2)), jnp.ones(5)),  # two equal columns
            "mu = 0",
        ),
        (lambda: models.LogisticRegression(jnp.ones((4, 2)), jnp.ones(4), 0.0), "`l2`"),
        (lambda: models.LogisticRegression(jnp.ones((4, 2)), jnp.ones(4), -1.0), "`l2`"),
        (
            lambda: models.LogisticRegression(jnp.ones((3, 2)), jnp.array([0.0, 1.0, 2.0]), 1.0),
            "Labels",
        ),
    ],
)
def test_objective_bad_inputs(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ------------------------------------------------------------------------------------------
# Synthetic data
# ------------------------------------------------------------------------------------------


def test_teacher_student():
    data = models.teacher_student(jax.random.key(0), 30, 4, 2, hidden=(8, 8))
    assert data.inputs.shape == (30, 4) and data.targets.shape == (30, 2)
    assert data.teacher.widths == (4, 8, 8, 2) and not data.teacher.final_activation
    # Noise-free: the targets are the teacher's outputs; same key, same data.
    np.testing.assert_allclose(jax.vmap(data.teacher)(data.inputs), data.targets, atol=0)
    again = models.teacher_student(jax.random.key(0), 30, 4, 2, hidden=(8, 8))
    assert bool(jnp.all(again.targets == data.targets))
    noisy = models.teacher_student(jax.random.key(0), 30, 4, 2, hidden=(8, 8), noise_std=0.1)
    assert 0.0 < float(jnp.max(jnp.abs(noisy.targets - data.targets))) < 1.0
