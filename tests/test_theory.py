"""The closed forms of Sections 4–5 (lspsde.theory) against hand arithmetic and exact dynamics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lspsde import constants as C
from lspsde import theory as T
import models

# Test data from numpy's generator: jax.random would compile a threefry kernel per shape.
RNG = np.random.default_rng

# Closed forms are a handful of float64 operations: agreement to a few ulps of O(1) numbers.
EXACT = 1e-14


# ------------------------------------------------------------------------------------------
# Section 4: feedforward and residual networks
# ------------------------------------------------------------------------------------------


def test_feedforward_bounds_hand_values():
    # rho = 0.5, L = 3: rho^L = 0.125; alpha_x <= log 0.5 = -0.6931...
    assert float(T.feedforward_jacobian_bound(0.5, 3)) == pytest.approx(0.125, abs=EXACT)
    assert float(T.feedforward_exponent_bound(0.5)) == pytest.approx(math.log(0.5), abs=EXACT)
    assert float(T.feedforward_jacobian_bound(2.0, 0)) == 1.0  # empty product


def test_residual_contraction_hand_values():
    # h = 0.1, m = 1, M_g = 2: c^2 = 1 - 2(0.1)(1) + (0.01)(4) = 1 - 0.2 + 0.04 = 0.84.
    c = T.residual_contraction(0.1, 1.0, 2.0)
    assert float(c) == pytest.approx(math.sqrt(0.84), abs=EXACT)
    assert float(T.residual_exponent_bound(0.1, 1.0, 2.0)) == pytest.approx(
        0.5 * math.log(0.84), abs=EXACT
    )
    # h_max = 2m / M_g^2 = 2 / 4 = 0.5 and c(h_max)^2 = 1 - 1 + 0.25 * 4 = 1.
    assert float(T.residual_step_max(1.0, 2.0)) == pytest.approx(0.5, abs=EXACT)
    assert float(T.residual_contraction(0.5, 1.0, 2.0)) == pytest.approx(1.0, abs=EXACT)
    # h* = m / M_g^2 = 0.25, c(h*)^2 = 1 - m^2 / M_g^2 = 0.75.
    assert float(T.residual_optimal_step(1.0, 2.0)) == pytest.approx(0.25, abs=EXACT)
    assert float(T.residual_contraction(0.25, 1.0, 2.0)) ** 2 == pytest.approx(0.75, abs=EXACT)


@pytest.mark.parametrize(("m", "M_g"), [(1.0, 2.0), (0.3, 0.3), (0.05, 7.0), (2.0, 2.5)])
def test_residual_step_max_is_the_root_of_c_equals_one(m, M_g):
    h_max = T.residual_step_max(m, M_g)
    # c(h_max) = 1 up to rounding of O(1) numbers.
    assert float(T.residual_contraction(h_max, m, M_g)) == pytest.approx(1.0, abs=1e-14)
    inside = h_max * jnp.linspace(0.01, 0.99, 99)
    beyond = h_max * jnp.linspace(1.01, 5.0, 99)
    assert bool(jnp.all(T.residual_contraction(inside, m, M_g) < 1.0))
    assert bool(jnp.all(T.residual_exponent_bound(inside, m, M_g) < 0.0))
    assert bool(jnp.all(T.residual_contraction(beyond, m, M_g) > 1.0))
    # The minimiser of c over h is h_max / 2.
    grid = h_max * jnp.linspace(0.0, 2.0, 2001)[1:]
    best = grid[jnp.argmin(T.residual_contraction(grid, m, M_g))]
    assert float(best) == pytest.approx(float(T.residual_optimal_step(m, M_g)), rel=2e-3)


def test_residual_degenerate_exponent_is_minus_infinity():
    # m = M_g and h = 1/M_g: c^2 = 1 - 2 + 1 = 0 (G = -M_g I gives I + hG = 0).
    assert float(T.residual_contraction(0.5, 2.0, 2.0)) == 0.0
    assert float(T.residual_exponent_bound(0.5, 2.0, 2.0)) == -math.inf


def test_vmap_and_jit_over_a_grid_of_h():
    hs = jnp.linspace(0.01, 1.0, 50)
    direct = T.residual_contraction(hs, 1.0, 2.0)
    mapped = jax.vmap(lambda h: T.residual_contraction(h, 1.0, 2.0))(hs)
    jitted = jax.jit(T.residual_contraction)(hs, 1.0, 2.0)
    np.testing.assert_allclose(mapped, direct, rtol=0, atol=EXACT)
    np.testing.assert_allclose(jitted, direct, rtol=0, atol=EXACT)
    # Broadcasting over (m, M_g) pairs, and a vmapped SGD sweep that crosses eta_max.
    grid = T.residual_contraction(0.1, jnp.array([[0.5], [1.0]]), jnp.array([[2.0, 3.0]]))
    assert grid.shape == (2, 2)
    etas = jnp.linspace(0.05, 1.0, 20)
    q = jax.vmap(lambda e: T.sgd_contraction(e, 1.0, 2.0, 1.0))(etas)
    np.testing.assert_allclose(q, 1 - 2 * etas + etas**2 * 5.0, rtol=0, atol=EXACT)
    # Every argument traced at once (vmap over eta and sigma0 of the whole mean-square curve).
    curve = jax.jit(
        jax.vmap(lambda e, s0: T.sgd_mean_square_bound(jnp.arange(5.0), 1.0, e, 1.0, 2.0, s0, 1.0))
    )(etas, 0.1 * etas)
    assert curve.shape == (20, 5) and bool(jnp.all(curve[:, 0] == 1.0))


# ------------------------------------------------------------------------------------------
# Section 5: SGD
# ------------------------------------------------------------------------------------------


def test_sgd_hand_values():
    # eta = 0.1, mu = 1, L = 2, sigma1 = 1: q = 1 - 0.2 + 0.01 (4 + 1) = 0.85.
    assert float(T.sgd_contraction(0.1, 1.0, 2.0, 1.0)) == pytest.approx(0.85, abs=EXACT)
    # eta_max = 2 mu / (L^2 + sigma1^2) = 2 / 5 = 0.4; q(0.4) = 1 - 0.8 + 0.16 * 5 = 1.
    assert float(T.sgd_step_max(1.0, 2.0, 1.0)) == pytest.approx(0.4, abs=EXACT)
    assert float(T.sgd_contraction(0.4, 1.0, 2.0, 1.0)) == pytest.approx(1.0, abs=EXACT)
    # Stationary level eta^2 sigma0^2 / (1 - q) with sigma0 = 1: 0.01 / 0.15 = 1/15.
    assert float(T.sgd_stationary_level(0.1, 1.0, 2.0, 1.0, 1.0)) == pytest.approx(
        1 / 15, abs=EXACT
    )
    assert float(T.sgd_exponent_bound(0.1, 1.0, 2.0, 1.0)) == pytest.approx(
        math.log(0.85), abs=EXACT
    )
    assert float(T.sgd_exponent_bound(0.1, 1.0, 2.0, 1.0, energy="norm")) == pytest.approx(
        0.5 * math.log(0.85), abs=EXACT
    )


@pytest.mark.parametrize(("mu", "L", "sigma1"), [(1.0, 2.0, 1.0), (0.1, 3.0, 0.0), (2.0, 2.0, 0.5)])
def test_sgd_step_max_root_and_minimiser(mu, L, sigma1):
    eta_max = T.sgd_step_max(mu, L, sigma1)
    assert float(T.sgd_contraction(eta_max, mu, L, sigma1)) == pytest.approx(1.0, abs=1e-14)
    inside = eta_max * jnp.linspace(0.01, 0.99, 99)
    assert bool(jnp.all(T.sgd_contraction(inside, mu, L, sigma1) < 1.0))
    assert bool(jnp.all(T.sgd_contraction(eta_max * 1.01, mu, L, sigma1) > 1.0))
    # q is a parabola in eta: minimiser mu / (L^2 + sigma1^2), value 1 - mu^2 / (L^2 + sigma1^2).
    s2 = L**2 + sigma1**2
    eta_star = T.sgd_optimal_step(mu, L, sigma1)
    assert float(eta_star) == pytest.approx(mu / s2, abs=EXACT)
    assert float(T.sgd_contraction(eta_star, mu, L, sigma1)) == pytest.approx(
        1 - mu**2 / s2, abs=EXACT
    )
    dq = jax.grad(lambda e: T.sgd_contraction(e, mu, L, sigma1))(eta_star)
    assert abs(float(dq)) < 1e-14
    # q >= (1 - eta mu)^2 >= 0 on a fine grid: the paper's "0 < q" can fail only with equality.
    grid = jnp.linspace(1e-3, 3.0, 3000) * eta_max
    assert bool(jnp.all(T.sgd_contraction(grid, mu, L, sigma1) >= (1 - grid * mu) ** 2 - 1e-15))


def test_q_can_be_zero():
    # mu = L = 1, sigma1 = 0, eta = 1: q = 1 - 2 + 1 = 0, so Theorem 5.2's "0 < q" is "0 <= q".
    assert float(T.sgd_contraction(1.0, 1.0, 1.0, 0.0)) == 0.0


def test_stationary_level_is_the_fixed_point():
    eta, mu, L, s0, s1 = 0.07, 0.5, 1.5, 0.8, 0.6
    q = float(T.sgd_contraction(eta, mu, L, s1))
    level = float(T.sgd_stationary_level(eta, mu, L, s0, s1))
    assert q * level + eta**2 * s0**2 == pytest.approx(level, rel=1e-14)
    # No stationary level where q >= 1 (beyond eta_max): inf, not a negative number.
    assert float(T.sgd_stationary_level(2.0, mu, L, s0, s1)) == math.inf


@pytest.mark.parametrize(
    ("eta", "mu", "L", "s1"),
    [
        (0.1, 1.0, 2.0, 1.0),  # q = 0.85
        (2.0, 1.0, 1.0, 0.0),  # q = 1 - 4 + 4 = 1 exactly: the sum is t eta^2 sigma0^2
        (0.5, 1.0, 2.0, 1.0),  # beyond eta_max = 0.4: q = 1.25, the bound grows
        (1.0, 1.0, 1.0, 0.0),  # q = 0
        (0.019, 0.01, 0.1, 0.0),  # q = 1 - 3.6e-5: near 1, where 1 - q^t cancels
    ],
)
def test_mean_square_bound_iterates_the_recursion(eta, mu, L, s1):
    s0, m0, horizon = 0.3, 2.5, 60
    q = float(T.sgd_contraction(eta, mu, L, s1))
    expected, m = [], m0
    for _ in range(horizon + 1):
        expected.append(m)
        m = q * m + eta**2 * s0**2
    got = T.sgd_mean_square_bound(jnp.arange(horizon + 1), m0, eta, mu, L, s0, s1)
    # Relative 1e-12: 60 multiply-adds accumulate at most ~60 ulps each way.
    np.testing.assert_allclose(got, np.array(expected), rtol=1e-12, atol=0)


def test_robbins_monro_conditions():
    # sum c/(t+t0)^p diverges iff p <= 1; sum of squares converges iff 2p > 1.
    ps = jnp.array([0.0, 0.5, 0.5000001, 0.75, 1.0, 1.0000001, 2.0])
    expected = [False, False, True, True, True, False, False]
    assert T.robbins_monro_conditions(ps).tolist() == expected
    assert bool(T.robbins_monro_conditions(1.0))


# ------------------------------------------------------------------------------------------
# The norm-vs-mean-square finding on Theorem 5.2(2)
# ------------------------------------------------------------------------------------------


def _gd_sensitivity_exponent(H: jax.Array, eta: float, steps: int) -> float:
    """(1/T) log ||d theta^T / d theta^0||_2 for gradient descent on 1/2 theta^T H theta."""

    def run(theta0):
        def body(theta, _):
            return theta - eta * (H @ theta), None

        return jax.lax.scan(body, theta0, None, length=steps)[0]

    J = jax.jit(jax.jacfwd(run))(jnp.ones(H.shape[0]))
    return float(jnp.log(jnp.linalg.svd(J, compute_uv=False)[0]) / steps)


def test_theorem_5_2_part_2_fails_for_the_norm_exponent():
    # mu = L = 1, sigma1 = 0, eta = 0.5: q = 1 - 1 + 0.25 = 0.25, log q = -1.386, but
    # d theta^t / d theta^0 = (1 - 0.5)^t I, so the exact exponent is log 0.5 = -0.693.
    H, eta = jnp.eye(3), 0.5
    exact = _gd_sensitivity_exponent(H, eta, steps=40)
    assert exact == pytest.approx(math.log(0.5), abs=1e-13)
    log_q = float(T.sgd_exponent_bound(eta, 1.0, 1.0, 0.0))  # as stated in the paper
    half_log_q = float(T.sgd_exponent_bound(eta, 1.0, 1.0, 0.0, energy="norm"))
    assert log_q == pytest.approx(math.log(0.25), abs=EXACT)
    assert exact > log_q + 0.69  # the stated bound is violated by log 2
    assert exact == pytest.approx(half_log_q, abs=1e-13)  # the corrected bound is attained


@pytest.mark.parametrize("eta_fraction", [0.1, 0.5, 0.9, 1.3])
def test_half_log_q_bounds_the_norm_exponent_and_log_q_the_energy(eta_fraction):
    # Random H with spectrum exactly in [mu, L] = [0.5, 2]; GD is SGD with sigma0 = sigma1 = 0.
    mu, L, d, steps = 0.5, 2.0, 6, 50
    q_mat = models.orthogonal_matrix(jax.random.key(0), (d, d))
    lam = jnp.concatenate([jnp.array([mu, L]), jnp.asarray(RNG(1).uniform(mu, L, d - 2))])
    H = (q_mat * lam[None, :]) @ q_mat.T
    eta = eta_fraction * float(T.sgd_step_max(mu, L, 0.0))
    exact = _gd_sensitivity_exponent(H, eta, steps)
    assert exact == pytest.approx(float(jnp.max(jnp.log(jnp.abs(1 - eta * lam)))), abs=1e-12)
    assert exact <= float(T.sgd_exponent_bound(eta, mu, L, 0.0, energy="norm")) + 1e-12
    # Energy E = ||theta^t - theta*||^2 (theta* = 0) decays at rate <= log q per step.
    theta = jnp.asarray(RNG(2).standard_normal(d))
    e0 = float(theta @ theta)
    for _ in range(steps):
        theta = theta - eta * (H @ theta)
    energy_rate = math.log(float(theta @ theta) / e0) / steps
    assert energy_rate <= float(T.sgd_exponent_bound(eta, mu, L, 0.0)) + 1e-12


# ------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: T.residual_contraction(-0.1, 1.0, 2.0), "`h` must be finite and positive"),
        (lambda: T.residual_contraction(0.1, 3.0, 2.0), "m <= M_g"),
        (lambda: T.residual_contraction(0.1, 0.0, 2.0), "dissipative"),
        (lambda: T.residual_step_max(1.0, 0.0), "`M_g`"),
        (lambda: T.residual_exponent_bound(0.1, jnp.array([1.0, 3.0]), 2.0), "exceeds"),
        (lambda: T.sgd_contraction(0.1, 3.0, 2.0, 0.0), "mu <= L"),
        (lambda: T.sgd_contraction(0.0, 1.0, 2.0, 0.0), "`eta`"),
        (lambda: T.sgd_contraction(0.1, -1.0, 2.0, 0.0), "strongly convex"),
        (lambda: T.sgd_step_max(1.0, 2.0, -0.1), "`sigma1`"),
        (lambda: T.sgd_stationary_level(0.1, 1.0, 2.0, -1.0, 0.0), "`sigma0`"),
        (lambda: T.sgd_mean_square_bound(-1, 1.0, 0.1, 1.0, 2.0, 0.0, 0.0), "`t`"),
        (lambda: T.sgd_exponent_bound(0.1, 1.0, 2.0, 0.0, energy="l2"), "Unknown energy"),
        (lambda: T.feedforward_jacobian_bound(0.0, 3), "`rho`"),
        (lambda: T.robbins_monro_conditions(math.inf), "finite"),
    ],
)
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_traced_inputs_are_not_checked():
    # Inside jit the values are unknown; the formula is evaluated as is (no Python branching).
    out = jax.jit(lambda h: T.residual_contraction(h, 1.0, 2.0))(-0.1)
    assert float(out) == pytest.approx(math.sqrt(1 + 0.2 + 0.04), abs=EXACT)


# ------------------------------------------------------------------------------------------
# Estimators of the constants
# ------------------------------------------------------------------------------------------


def test_layer_spectral_norms_of_orthogonal_mlp_equal_rho():
    net = models.mlp(jax.random.key(0), (5, 9, 9, 3), rho=0.8)
    # QR in float64 gives orthonormality to ~1e-15; 1e-12 leaves room for the SVD.
    np.testing.assert_allclose(C.layer_spectral_norms(net), 0.8, rtol=0, atol=1e-12)
    assert float(C.feedforward_rho(net)) == pytest.approx(0.8, abs=1e-12)
    with pytest.raises(TypeError, match="Feedforward"):
        C.layer_spectral_norms(models.residual_network(jax.random.key(0), 3, 2, 0.1, 1.0, 2.0))


def test_theorem_4_1_bound_holds_and_is_attained():
    rho, depth = 0.8, 4
    key = jax.random.key(3)
    # Identity activation, square orthogonal layers: JF = rho^L Q_3 Q_2 Q_1 Q_0, norm rho^L.
    lin = models.mlp(key, (6,) * (depth + 1), activation="identity", rho=rho)
    J = jax.jit(jax.jacfwd(lin))(jnp.ones(6))
    bound = float(T.feedforward_jacobian_bound(rho, depth))
    assert float(jnp.linalg.svd(J, compute_uv=False)[0]) == pytest.approx(bound, rel=1e-12)
    # ReLU: D_k has entries in {0, 1}, so ||JF(x)|| <= rho^L at every sample (holds).
    relu = models.mlp(key, (6, 12, 12, 12, 6), rho=rho, bias_std=0.5)
    xs = jnp.asarray(RNG(4).standard_normal((32, 6)))
    norms = jax.jit(jax.vmap(lambda x: jnp.linalg.svd(jax.jacfwd(relu)(x), compute_uv=False)[0]))(
        xs
    )
    assert bool(jnp.all(norms <= bound * (1 + 1e-12)))


def test_residual_block_constants_linear_block_exact():
    m, M_g = 0.7, 1.9
    block = models.linear_dissipative_block(jax.random.key(0), 8, m, M_g)
    xs = RNG(1).standard_normal((5, 8))
    m_hat, M_hat = C.residual_block_constants(block, xs)
    # G = A is constant: eigvalsh / SVD of an 8x8 matrix, accurate to ~1e-15 relative.
    assert float(m_hat) == pytest.approx(m, abs=1e-10)
    assert float(M_hat) == pytest.approx(M_g, abs=1e-10)
    # One point (shape (d,)) is accepted too.
    assert float(C.residual_block_constants(block, xs[0])[0]) == pytest.approx(m, abs=1e-10)


def test_residual_block_constants_nonlinear_block():
    m, M_g = 0.4, 2.0
    block = models.nonlinear_dissipative_block(jax.random.key(2), 10, m, M_g, rank=4)
    xs = 2.0 * RNG(3).standard_normal((64, 10))
    m_hat, M_hat = C.residual_block_constants(block, xs)
    # lambda_max(sym G(x)) = -m at every x (W has a null space): the sup is attained.
    assert float(m_hat) == pytest.approx(m, abs=1e-10)
    assert float(M_hat) <= float(block.M_g) + 1e-12
    with pytest.raises(ValueError, match="R\\^d to R\\^d"):
        C.residual_block_constants(lambda x: x[:3], xs)


@pytest.fixture(scope="module")
def quad() -> models.Quadratic:
    d = 20
    q = models.orthogonal_matrix(jax.random.key(5), (d, d))
    lam = jnp.linspace(0.3, 4.0, d)
    return models.Quadratic((q * lam[None, :]) @ q.T, RNG(6).standard_normal(d))


def test_objective_constants_quadratic_and_least_squares(quad):
    theta = jnp.asarray(RNG(8).standard_normal(20))
    ev = np.linalg.eigvalsh(np.asarray(quad.hessian))
    # d = 20 < max_steps: the Krylov space is exhausted, so Lanczos is exact up to the rounding
    # of a few dozen reorthogonalised products (relative to L).
    lanczos = C.objective_constants(quad, theta, rtol=1e-10)
    np.testing.assert_allclose(lanczos, (ev[0], ev[-1]), rtol=0, atol=1e-10 * ev[-1])
    # Constant Hessian: the estimates are the exact mu and L the objective reports.
    np.testing.assert_allclose(lanczos, (quad.strong_convexity(), quad.smoothness()), rtol=1e-10)
    # The dense path (eigvalsh of the full Hessian), on least squares: exact to rounding.
    X, y, _ = models.synthetic_regression(jax.random.key(7), 50, 12, 0.1)
    ls = models.LeastSquares(X, y)
    dense = C.objective_constants(ls, theta[:12], method="dense")
    ev = np.linalg.eigvalsh(np.asarray(X.T @ X) / 50)
    np.testing.assert_allclose(dense, (ev[0], ev[-1]), rtol=1e-12)
    np.testing.assert_allclose(dense, (ls.strong_convexity(), ls.smoothness()), rtol=1e-12)


def test_objective_constants_bad_method(quad):
    with pytest.raises(ValueError, match="Unknown method"):
        C.objective_constants(quad, jnp.zeros(20), method="qr")
