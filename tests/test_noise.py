"""Noise models (lspsde.noise): sampling laws against closed forms, and Assumption 1 declarations.

Monte Carlo checks compare a sample mean with its expectation within ``Z`` estimated standard
errors. ``Z = 4``: this file makes about 250 scalar comparisons and P(|N(0, 1)| > 4) = 6.3e-5, so
by the union bound the family-wise chance of a false alarm is below 2% for a random seed (the
seeds are fixed, so the outcome is deterministic). Tail probabilities use the exact binomial
standard error sqrt(p (1 - p) / m) of the true p.
"""

import itertools
import math

import equinox as eqx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import lspsde
from lspsde._ensemble import check_step
import lspsde.noise
from lspsde.noise import (
    AbstractNoise,
    AlphaStableNoise,
    AnisotropicGaussian,
    Assumption1,
    CurvatureNoise,
    GaussianNoise,
    IsotropicGaussian,
    MinibatchNoise,
    NoNoise,
    StudentTNoise,
    add_flat,
    as_float_array,
    check_positive,
    flat_size,
    iid_like,
    scaled_identity,
)
from lspsde.objectives import AbstractObjective
from lspsde.parameter import GradientDescent
from lspsde.system import LearningSystem, parameter_trajectory
import models

Z = 4.0
N = 40_000  # draws per Monte Carlo check: standard errors ~ 0.5% of the quantity measured

RNG = np.random.default_rng(20250101)
A_NP = RNG.normal(size=(8, 3))
B_NP = A_NP @ np.array([1.0, -2.0, 0.5]) + 0.7 * RNG.normal(size=8)
LS = models.LeastSquares(A_NP, B_NP)
THETA_STAR = np.asarray(LS.minimizer())
# theta* and two points off it (so sigma1 terms matter).
THETAS = [
    jnp.asarray(t)
    for t in (THETA_STAR, THETA_STAR + np.array([1.5, 0.0, 0.0]), THETA_STAR + RNG.normal(size=3))
]


@eqx.filter_jit
def _deviations(noise, objective, theta, key, n):
    """``n`` draws of the flat G(theta, u) - grad L(theta), u from independent keys."""
    g = ravel_pytree(objective.gradient(theta))[0]

    def one(k):
        return ravel_pytree(noise.gradient(objective, theta, noise.sample(k, theta)))[0] - g

    return jax.vmap(one)(jax.random.split(key, n))


@eqx.filter_jit
def _declared(noise, objective, theta):
    """(covariance, variance) declared by the noise model: one compiled call."""
    return noise.covariance(objective, theta), noise.variance(objective, theta)


@eqx.filter_jit
def _samples(noise, key, theta, n):
    return jax.vmap(lambda k: noise.sample(k, theta))(jax.random.split(key, n))


def _draws(noise, objective, theta, seed=0, n=N):
    theta = jax.tree.map(jnp.asarray, theta)
    return np.asarray(_deviations(noise, objective, theta, jax.random.key(seed), n))


def assert_mean(samples, expected, z=Z):
    """|mean - expected| <= z standard errors, entrywise over trailing axes."""
    samples = np.asarray(samples)
    mean = samples.mean(axis=0)
    se = samples.std(axis=0, ddof=1) / math.sqrt(samples.shape[0])
    bad = np.abs(mean - expected) > z * se + 1e-12
    assert not np.any(bad), f"mean {mean[bad]} vs {np.broadcast_to(expected, mean.shape)[bad]}"


def assert_moments(dev, cov, var):
    """Unbiased, E||dev||^2 = var, and E[dev dev^T] = cov (entrywise), all within the CI."""
    assert_mean(dev, 0.0)
    assert_mean(np.sum(dev**2, axis=1), var)
    assert_mean(dev[:, :, None] * dev[:, None, :], np.asarray(cov))
    assert float(np.trace(cov)) == pytest.approx(float(var), rel=1e-12, abs=1e-14)


def assert_binomial(hits, p):
    m = hits.size
    assert abs(hits.mean() - p) <= Z * math.sqrt(p * (1 - p) / m), (hits.mean(), p)


# ------------------------------------------------------------------------------------------
# Local objectives: a finite sum (the MinibatchNoise protocol), one without a minimiser
# ------------------------------------------------------------------------------------------


class FiniteLeastSquares(AbstractObjective):
    """(1/2n)||A theta - b||^2 as a finite sum of l_i = (a_i^T theta - b_i)^2 / 2."""

    A: jax.Array
    b: jax.Array

    @property
    def n_examples(self):
        return self.A.shape[0]

    def per_example_loss(self, theta, i):
        return 0.5 * (self.A[i] @ theta - self.b[i]) ** 2

    def loss(self, theta):
        return 0.5 * jnp.mean((self.A @ theta - self.b) ** 2)

    def minimizer(self):
        return jnp.linalg.lstsq(self.A, self.b)[0]


class FiniteLogistic(AbstractObjective):
    """Ridge logistic regression as a finite sum: per-example gradients are not affine."""

    X: jax.Array
    s: jax.Array

    @property
    def n_examples(self):
        return self.X.shape[0]

    def per_example_loss(self, theta, i):
        return jax.nn.softplus(-self.s[i] * self.X[i] @ theta) + 0.05 * theta @ theta

    def loss(self, theta):
        return jnp.mean(jax.vmap(self.per_example_loss, (None, 0))(theta, jnp.arange(6)))

    def minimizer(self):
        return jnp.zeros(self.X.shape[1])  # not the true minimiser; only its shape is used here


class Bowl(AbstractObjective):
    """A pytree objective with no declared minimiser."""

    def loss(self, theta):
        return 0.5 * (jnp.sum(theta["w"] ** 2) + jnp.sum((theta["b"] - 1.0) ** 2))


class BowlWithMinimiser(Bowl):
    def minimizer(self):
        return {"w": jnp.zeros((2, 2)), "b": jnp.ones(1)}


BOWL_THETA = {"w": jnp.ones((2, 2)), "b": jnp.zeros(1)}
FLS = FiniteLeastSquares(jnp.asarray(A_NP[:6]), jnp.asarray(B_NP[:6]))


def _ls_moments(A, b, theta_star):
    """(v0, c, Q) of one sampled row, from the definitions (independent of lspsde.noise)."""
    n = A.shape[0]
    r = A @ theta_star - b
    g = A * r[:, None]  # g_i* = a_i r_i*
    g = g - g.mean(axis=0)
    Hs = A[:, :, None] * A[:, None, :]
    H = Hs.mean(axis=0)
    dH = Hs - H
    v0 = np.mean(np.sum(g**2, axis=1))
    c = np.einsum("ijk,ik->j", dH, g) / n
    Q = np.einsum("ijk,ikl->jl", dH, dH) / n
    return v0, c, Q


# ------------------------------------------------------------------------------------------
# Gaussian models
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("i", range(3))
def test_isotropic_gaussian_moments(i):
    noise = IsotropicGaussian(scale=0.8)  # the magnitude is `scale`, as in every model
    theta = THETAS[i]
    dev = _draws(noise, LS, theta, seed=i)
    assert_moments(dev, noise.covariance(LS, theta), 0.64)
    a1 = noise.assumption1(LS)
    assert a1.holds is True and float(a1.sigma0) == 0.8 and float(a1.sigma1) == 0.0
    assert float(noise.scale) == 0.8


@pytest.mark.parametrize(
    "scale", [np.array([0.3, 1.0, 2.0]), np.array([[1.0, 0.0, 0.0], [0.5, 0.4, 0.0], [-1, 2, 0.3]])]
)
def test_anisotropic_gaussian_moments(scale):
    noise = AnisotropicGaussian(scale)
    C = np.diag(scale) if scale.ndim == 1 else scale
    cov = np.asarray(noise.covariance(LS, THETAS[1]))
    np.testing.assert_allclose(cov, C @ C.T, rtol=1e-14, atol=1e-15)
    assert_moments(_draws(noise, LS, THETAS[1]), cov, np.sum(C**2))
    a1 = noise.assumption1(LS)
    assert a1.holds and float(a1.sigma0) ** 2 == pytest.approx(np.trace(C @ C.T), rel=1e-14)
    # from_covariance reproduces Sigma.
    again = AnisotropicGaussian.from_covariance(C @ C.T).covariance(LS, THETAS[1])
    np.testing.assert_allclose(again, C @ C.T, atol=1e-13)


@pytest.mark.parametrize("i", range(3))
def test_gaussian_noise_is_assumption1_with_equality(i):
    noise = GaussianNoise(sigma0=0.7, sigma1=1.3)
    theta = THETAS[i]
    e2 = float(np.sum((np.asarray(theta) - THETA_STAR) ** 2))
    var = 0.49 + 1.69 * e2
    assert float(noise.variance(LS, theta)) == pytest.approx(var, rel=1e-12)
    cov = noise.covariance(LS, theta)
    np.testing.assert_allclose(cov, var / 3 * np.eye(3), rtol=1e-12)
    assert_moments(_draws(noise, LS, theta, seed=10 + i), cov, var)
    a1 = noise.assumption1(LS)
    assert a1.holds is True
    assert (float(a1.sigma0), float(a1.sigma1)) == (0.7, 1.3)


def test_gaussian_noise_without_minimiser():
    # sigma1 = 0: no theta* needed, on a pytree objective.
    noise = GaussianNoise(sigma0=0.5, sigma1=0)
    assert not noise.state_dependent
    noise.check(Bowl(), BOWL_THETA)
    dev = _draws(noise, Bowl(), BOWL_THETA, n=20_000)
    assert_moments(dev, noise.covariance(Bowl(), BOWL_THETA), 0.25)
    # sigma1 > 0 needs theta*: a clear error, before compilation and when traced.
    bad = GaussianNoise(sigma0=0.5, sigma1=0.1)
    with pytest.raises(ValueError, match=r"minimizer\(\) is None.*sigma1=0"):
        bad.check(Bowl(), BOWL_THETA)
    with pytest.raises(ValueError, match=r"models\.Quadratic"):
        jax.jit(lambda th: bad.gradient(Bowl(), th, bad.zero(th)))(BOWL_THETA)


def test_gaussian_noise_on_a_pytree():
    # theta = {w: ones(2, 2), b: 0}, theta* = {w: 0, b: 1}: ||e||^2 = 4 + 1, d = 5.
    noise = GaussianNoise(sigma0=0.3, sigma1=0.4)
    noise.check(BowlWithMinimiser(), BOWL_THETA)
    var = 0.09 + 0.16 * 5.0
    assert float(noise.variance(BowlWithMinimiser(), BOWL_THETA)) == pytest.approx(var)
    dev = _draws(noise, BowlWithMinimiser(), BOWL_THETA, n=20_000)
    assert_moments(dev, var / 5 * np.eye(5), var)


def test_gaussian_noise_jacobian_at_the_minimiser_is_finite():
    noise = GaussianNoise(0.5, 2.0)
    u = noise.sample(jax.random.key(0), jnp.asarray(THETA_STAR))
    J = jax.jit(jax.jacfwd(lambda th: noise.gradient(LS, th, u)))(jnp.asarray(THETA_STAR))
    np.testing.assert_allclose(J, LS.A.T @ LS.A / 8, rtol=1e-12)  # the norm term has 0 derivative


# ------------------------------------------------------------------------------------------
# Random Hessians (CurvatureNoise) and minibatches (MinibatchNoise)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
def test_curvature_noise_exact_formulas(batch):
    noise = CurvatureNoise(batch, 8)
    for theta in THETAS:
        r = A_NP @ np.asarray(theta) - B_NP
        g = A_NP * r[:, None]  # per-row gradients a_i r_i
        D = g - g.mean(axis=0)
        cov = D.T @ D / 8 / batch  # i.i.d. rows: population covariance / B
        declared = _declared(noise, LS, theta)
        np.testing.assert_allclose(declared[0], cov, atol=1e-12)
        assert float(declared[1]) == pytest.approx(np.trace(cov))
    v0, c, Q = noise.moments(LS)
    v0_, c_, Q_ = _ls_moments(A_NP, B_NP, THETA_STAR)
    assert float(v0) == pytest.approx(v0_, rel=1e-10)
    np.testing.assert_allclose(c, c_, atol=1e-10)
    np.testing.assert_allclose(Q, Q_, atol=1e-10)


@pytest.mark.parametrize(("batch", "i"), [(1, 0), (1, 1), (1, 2), (3, 1)])
def test_curvature_noise_sampling(batch, i):
    noise = CurvatureNoise(batch, 8)
    theta = jnp.asarray(THETAS[i])
    dev = _draws(noise, LS, theta, seed=20 + i)
    assert_moments(dev, *_declared(noise, LS, theta))


def _frontier_checks(noise, objective, kappa, moments):
    """The declared constants bound the exact variance everywhere, with equality at one e."""
    v0, c, Q = (np.asarray(m) for m in moments)
    lam = np.linalg.eigvalsh(Q)[-1]
    variances = jax.jit(jax.vmap(lambda th: noise.variance(objective, th)))
    for sigma1 in (None, 1.5 * math.sqrt(kappa * lam)):
        a1 = noise.assumption1(objective, sigma1=sigma1)
        s0, s1 = float(a1.sigma0), float(a1.sigma1)
        assert a1.holds is True and "upper bound" in a1.reason
        if sigma1 is None:
            assert s1**2 == pytest.approx(2 * kappa * lam, rel=1e-12)
            assert s0**2 <= 2 * kappa * v0 * (1 + 1e-12)  # Young's inequality
        e_star = kappa * np.linalg.solve(s1**2 * np.eye(3) - kappa * Q, c)
        E = np.concatenate(
            [e_star[None], np.outer(np.geomspace(1e-2, 1e2, 60), RNG.normal(size=3))]
        )
        E = np.concatenate([E, RNG.normal(size=(60, 3)) * np.geomspace(1e-2, 1e2, 60)[:, None]])
        v = np.asarray(variances(jnp.asarray(THETA_STAR[None, :] + E)))
        bound = s0**2 + s1**2 * np.sum(E**2, axis=1)
        assert v[0] == pytest.approx(bound[0], rel=1e-9)  # equality at e*
        assert np.all(v <= bound * (1 + 1e-9) + 1e-12)
    with pytest.raises(ValueError, match="infimum"):
        noise.assumption1(objective, sigma1=0.9 * math.sqrt(kappa * lam))


def test_curvature_noise_assumption1_frontier():
    noise = CurvatureNoise(2, 8)
    _frontier_checks(noise, LS, 0.5, noise.moments(LS))
    # The declared constants are what the sampler measures: at e*, E||G - grad L||^2 equals the
    # bound sigma0^2 + sigma1^2 ||e*||^2.
    a1 = noise.assumption1(LS)
    _, c, Q = (np.asarray(m) for m in noise.moments(LS))
    s0, s1 = float(a1.sigma0), float(a1.sigma1)
    e_star = 0.5 * np.linalg.solve(s1**2 * np.eye(3) - 0.5 * Q, c)
    dev = _draws(noise, LS, jnp.asarray(THETA_STAR + e_star), seed=7)
    assert_mean(np.sum(dev**2, axis=1), s0**2 + s1**2 * e_star @ e_star)


def test_curvature_noise_interpolation_is_exact():
    # b = A theta_true: r* = 0, so c = 0, v0 = 0 and the variance is e^T Q e / B exactly.
    ls = models.LeastSquares(A_NP, A_NP @ np.array([1.0, 2.0, 3.0]))
    noise = CurvatureNoise(1, 8)
    v0, c, Q = noise.moments(ls)
    assert float(v0) < 1e-20 and float(jnp.max(jnp.abs(c))) < 1e-10
    a1 = noise.assumption1(ls)
    assert float(a1.sigma0) < 1e-10
    e = np.array([0.3, -1.0, 2.0])
    var = float(noise.variance(ls, jnp.asarray(np.array([1.0, 2.0, 3.0]) + e)))
    assert var == pytest.approx(e @ np.asarray(Q) @ e, rel=1e-9)


@eqx.filter_jit
def _all_batches(noise, objective, theta, subsets):
    return jax.vmap(lambda u: noise.gradient(objective, theta, u))(subsets)


@pytest.mark.parametrize("batch", [1, 3, 6])
def test_minibatch_noise_by_enumerating_batches(batch):
    # n = 6: every subset of size B is equally likely, so the exact law is a finite average.
    noise = MinibatchNoise(batch, 6)
    theta = THETAS[2]
    subsets = jnp.asarray(list(itertools.combinations(range(6), batch)))
    G = np.asarray(_all_batches(noise, FLS, theta, subsets))
    g = A_NP[:6] * (A_NP[:6] @ np.asarray(theta) - B_NP[:6])[:, None]  # per-example a_i r_i
    grad = g.mean(axis=0)
    np.testing.assert_allclose(G.mean(axis=0), grad, atol=1e-13)  # unbiased
    D = G - grad
    cov = D.T @ D / len(subsets)
    declared = _declared(noise, FLS, theta)
    np.testing.assert_allclose(declared[0], cov, atol=1e-12)
    assert float(declared[1]) == pytest.approx(np.trace(cov), abs=1e-12)
    # ... and equals the finite-population formula (1 - B/n) / B * S^2.
    np.testing.assert_allclose(cov, (1 - batch / 6) / batch * np.cov(g.T, ddof=1), atol=1e-12)


def test_minibatch_sampling_is_uniform_without_replacement():
    noise = MinibatchNoise(3, 6)
    u = np.asarray(_samples(noise, jax.random.key(3), THETAS[0], N))
    assert u.shape == (N, 3) and u.dtype.kind == "i"
    assert np.all(np.sort(u, axis=1)[:, 1:] != np.sort(u, axis=1)[:, :-1])  # distinct
    codes = np.sort(u, axis=1) @ np.array([36, 6, 1])
    for subset in itertools.combinations(range(6), 3):
        assert_binomial(codes == np.array(subset) @ np.array([36, 6, 1]), 1 / 20)
    theta = THETAS[1]
    assert_moments(_draws(noise, FLS, theta, seed=5), *_declared(noise, FLS, theta))


def test_minibatch_assumption1():
    noise = MinibatchNoise(2, 6)
    kappa = (6 - 2) / (2 * 5)
    assert noise.kappa == pytest.approx(kappa)
    # Autodiff Hessians of the finite sum agree with the closed form of least squares.
    v0, c, Q, dev = noise.moments(FLS)
    v0_, c_, Q_ = _ls_moments(A_NP[:6], B_NP[:6], np.asarray(FLS.minimizer()))
    assert float(dev) < 1e-12
    assert float(v0) == pytest.approx(v0_, rel=1e-10)
    np.testing.assert_allclose(c, c_, atol=1e-10)
    np.testing.assert_allclose(Q, Q_, atol=1e-10)
    global THETA_STAR
    saved, THETA_STAR = THETA_STAR, np.asarray(FLS.minimizer())
    try:
        _frontier_checks(noise, FLS, kappa, (v0, c, Q))
    finally:
        THETA_STAR = saved
    # Non-quadratic finite sums: no global constants.
    X = jnp.asarray(A_NP[:6])
    a1 = MinibatchNoise(2, 6).assumption1(FiniteLogistic(X, jnp.sign(X[:, 0])))
    assert a1.holds is None and "not affine" in a1.reason
    # The full batch is exact.
    full = MinibatchNoise(6, 6).assumption1(FLS)
    assert float(full.sigma0) == 0.0 and float(full.sigma1) == 0.0


# ------------------------------------------------------------------------------------------
# Heavy tails
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("df", [1.0, 1.5, 3.0])
def test_student_t_tails(df):
    noise = StudentTNoise(2.0, df)
    dev = _draws(noise, LS, THETAS[0], seed=1)  # d = 3: entries (2 / sqrt 3) T
    T = np.ravel(dev) * math.sqrt(3) / 2.0
    for x in (0.5, 1.0, 3.0, 6.0, 20.0):
        assert_binomial(np.abs(T) > x, 2 * stats.t.sf(x, df))
    assert_mean(np.sign(T) * (np.abs(T) > 1.0), 0.0)  # symmetric


def test_student_t_assumption1():
    infinite = StudentTNoise(1.0, 1.5).assumption1(LS)
    assert infinite.holds is False and "infinite variance" in infinite.reason
    assert StudentTNoise(1.0, 2.0).assumption1(LS).holds is False
    assert "no mean" in StudentTNoise(1.0, 0.9).assumption1(LS).reason
    assert StudentTNoise(1.0, 1.5).covariance(LS, THETAS[0]) is None
    assert float(StudentTNoise(1.0, 1.5).variance(LS, THETAS[0])) == np.inf
    # df = 8 > 4: finite variance sigma^2 df / (df - 2), and a finite variance of ||X||^2.
    noise = StudentTNoise(1.2, 8.0)
    a1 = noise.assumption1(LS)
    assert a1.holds is True and "heavy tails" in a1.reason
    var = 1.44 * 8 / 6
    assert float(a1.sigma0) ** 2 == pytest.approx(var, rel=1e-14)
    assert_moments(_draws(noise, LS, THETAS[1], seed=4), noise.covariance(LS, THETAS[1]), var)


@pytest.mark.parametrize("alpha", [0.8, 1.0, 1.5, 2.0])
def test_alpha_stable_characteristic_function_and_tails(alpha):
    scale = 1.5
    noise = AlphaStableNoise(scale, alpha)
    dev = _draws(noise, LS, THETAS[0], seed=2).ravel()  # entries scale / sqrt(3) * S
    for t in (0.3, 1.0, 2.5):
        assert_mean(np.cos(t * dev), math.exp(-(abs(scale * t / math.sqrt(3)) ** alpha)))
        assert_mean(np.sin(t * dev), 0.0)  # symmetric
    S = dev * math.sqrt(3) / scale
    for x in (1.0, 3.0, 10.0):
        assert_binomial(np.abs(S) > x, 2 * stats.levy_stable.sf(x, alpha, 0.0))
    if alpha < 2:
        # Tail index: the log-log slope of P(|S| > x) between x = 10 and 30 is about -alpha.
        # Empirical vs exact slope within a delta-method CI; the exact one is near -alpha.
        p10, p30 = (2 * stats.levy_stable.sf(x, alpha, 0.0) for x in (10.0, 30.0))
        h10, h30 = (np.sum(np.abs(S) > x) for x in (10.0, 30.0))
        slope = math.log(h30 / h10) / math.log(3.0)
        se = math.sqrt(1 / h30 - 1 / h10) / math.log(3.0)  # nested counts: Var log ratio
        assert abs(slope - math.log(p30 / p10) / math.log(3.0)) <= Z * se
        assert math.log(p30 / p10) / math.log(3.0) == pytest.approx(-alpha, abs=0.15)


def test_alpha_stable_assumption1():
    assert "no mean" in AlphaStableNoise(1.0, 1.0).assumption1(LS).reason
    a1 = AlphaStableNoise(1.0, 1.5).assumption1(LS)
    assert a1.holds is False and "infinite variance" in a1.reason
    assert AlphaStableNoise(1.0, 1.5).covariance(LS, THETAS[0]) is None
    gauss = AlphaStableNoise(0.5, 2.0)
    a1 = gauss.assumption1(LS)
    assert a1.holds is True and float(a1.sigma0) ** 2 == pytest.approx(0.5)
    assert_moments(_draws(gauss, LS, THETAS[0], seed=9), gauss.covariance(LS, THETAS[0]), 0.5)


# ------------------------------------------------------------------------------------------
# Input checks, determinism, vmap, and use inside a learning system
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: IsotropicGaussian(-0.1), "scale"),
        (lambda: GaussianNoise(0.1, -0.2), "sigma1"),
        (lambda: AnisotropicGaussian(np.array([1.0, -1.0])), "scale"),
        (lambda: AnisotropicGaussian(np.ones((2, 3))), r"\(d, d\)"),
        (lambda: StudentTNoise(1.0, 0.0), "df"),
        (lambda: StudentTNoise(-1.0, 3.0), "scale"),
        (lambda: AlphaStableNoise(1.0, 2.5), r"alpha.*\(0.0, 2.0\]"),
        (lambda: AlphaStableNoise(1.0, 0.0), "alpha"),
        (lambda: MinibatchNoise(7, 6), "batch_size.*exceeds"),
        (lambda: MinibatchNoise(0, 6), "batch_size"),
        (lambda: CurvatureNoise(0, 6), "batch_size"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_mismatches_raise_before_compilation():
    theta = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"dimension 5.*theta has 3"):
        AnisotropicGaussian(np.ones(5)).check(LS, theta)
    with pytest.raises(ValueError, match="dimension 5"):
        AnisotropicGaussian(np.ones(5)).sample(jax.random.key(0), theta)
    with pytest.raises(ValueError, match="data_size=8"):
        CurvatureNoise(1, 6).check(LS, theta)
    with pytest.raises(TypeError, match="A` \\(n, d\\)"):
        CurvatureNoise(1, 6).check(Bowl(), BOWL_THETA)
    with pytest.raises(ValueError, match=r"theta of shape \(3,\)"):
        CurvatureNoise(1, 8).check(LS, jnp.zeros(4))
    with pytest.raises(TypeError, match="per_example_loss"):
        MinibatchNoise(2, 8).check(Bowl(), BOWL_THETA)
    MinibatchNoise(2, 8).check(LS, theta)  # models.LeastSquares is a finite sum
    with pytest.raises(ValueError, match="data_size=6"):
        MinibatchNoise(2, 8).check(FLS, theta)
    with pytest.raises(ValueError, match=r"minimizer\(\) is None"):
        CurvatureNoise(1, 8).assumption1(NoMinimizer(jnp.asarray(A_NP), jnp.asarray(B_NP)))


class NoMinimizer(FiniteLeastSquares):
    def minimizer(self):
        return None


@eqx.filter_jit
def _keyed(noise, key, theta):
    """Draws for 5 split keys under vmap, single draws for keys 0 and 4, and a 20-step SGD path
    of a learning system with this noise (one compilation for all three)."""
    keys = jax.random.split(key, 5)
    batch = jax.vmap(lambda k: noise.sample(k, theta))(keys)
    system = LearningSystem(FLS, GradientDescent(0.05), noise)
    path = parameter_trajectory(system, theta, n_steps=20, key=key)[0]
    return batch, [noise.sample(keys[i], theta) for i in (0, 4)], path


ALL = [
    NoNoise(),
    IsotropicGaussian(0.5),
    AnisotropicGaussian(np.array([0.1, 0.2, 0.3])),
    GaussianNoise(0.5, 0.5),
    CurvatureNoise(2, 6),
    MinibatchNoise(2, 6),
    StudentTNoise(0.5, 3.0),
    AlphaStableNoise(0.5, 1.5),
]


@pytest.mark.parametrize("noise", ALL, ids=lambda n: type(n).__name__)
def test_determinism_vmap_and_learning_system(noise):
    theta = THETAS[2]
    key = jax.random.key(11)
    batch, singles, path = _keyed(noise, key, theta)
    jax.tree.map(np.testing.assert_array_equal, batch, _keyed(noise, key, theta)[0])  # same key
    for i, one in zip((0, 4), singles, strict=True):  # vmap over keys = one draw per key
        jax.tree.map(lambda b, o, i=i: np.testing.assert_array_equal(b[i], o), batch, one)
    flat = np.stack([ravel_pytree(jax.tree.map(lambda b, i=i: b[i], batch))[0] for i in range(5)])
    assert np.all(flat == flat[0]) == isinstance(noise, NoNoise)  # different keys differ
    noise.check(FLS, theta)
    check_step(LearningSystem(FLS, GradientDescent(0.05), noise), theta, key)
    assert path.shape == (21, 3) and np.all(np.isfinite(path))
    assert isinstance(noise.assumption1(FLS), Assumption1)


def test_vmap_over_noise_levels():
    theta = jnp.asarray(THETAS[1])
    u = IsotropicGaussian(1.0).sample(jax.random.key(0), theta)
    sigmas = jnp.array([0.0, 0.5, 2.0])
    G = jax.vmap(lambda s: IsotropicGaussian(s).gradient(LS, theta, u))(sigmas)
    expected = LS.gradient(theta)[None, :] + sigmas[:, None] / math.sqrt(3) * u[None, :]
    np.testing.assert_allclose(G, expected, rtol=1e-14)
    s1 = jnp.array([0.0, 1.0, 2.0])  # sigma1 traced at construction: state dependent
    v = jax.vmap(lambda s: GaussianNoise(0.5, s).variance(LS, theta))(s1)
    np.testing.assert_allclose(v, 0.25 + s1**2 * 1.5**2, rtol=1e-12)
    dfs = jnp.array([1.5, 3.0])
    v = jax.vmap(lambda df: StudentTNoise(1.0, df).variance(LS, theta))(dfs)
    np.testing.assert_allclose(v, [np.inf, 3.0])


def test_no_noise_is_unchanged():
    noise = NoNoise()
    theta = jnp.asarray(THETAS[1])
    u = noise.sample(jax.random.key(0), theta)
    np.testing.assert_array_equal(u, 0.0)
    np.testing.assert_array_equal(noise.gradient(LS, theta, u + 1.0), LS.gradient(theta) + 1.0)
    a1 = noise.assumption1(LS)
    assert a1.holds and float(a1.sigma0) == 0.0 and float(a1.sigma1) == 0.0
    assert float(noise.variance(LS, theta)) == 0.0


def test_heavy_tail_samplers_give_the_first_uniform_cell_its_own_quantile(monkeypatch):
    # Every uniform draw at the bottom of JAX's grid (u = 0): the cell [0, 2^-m) must map to a
    # moderate quantile (its midpoint), not to U = tiny (|T| ~ 1e103 for df = 3 in float64;
    # 7.6e12 where the next value is ~350 in float32), and the stable angle must stay inside
    # (-pi/2, pi/2) (it used to be exactly -pi/2: NaN in float32).
    zeros = lambda key, shape=(), dtype=float, minval=0.0, maxval=1.0: jnp.full(
        shape, minval, dtype
    )
    monkeypatch.setattr(jax.random, "uniform", zeros)
    t = StudentTNoise(1.0, 3.0)._standard_t(jax.random.key(0), (4,))
    quantile = np.sqrt(3.0 * np.expm1(-2 / 3.0 * np.log(2.0 ** -(np.finfo(float).nmant + 1))))
    np.testing.assert_allclose(np.abs(t), quantile, rtol=1e-12)
    assert np.all(np.abs(t) < 1e6)
    s = AlphaStableNoise(1.0, 1.5)._standard_stable(jax.random.key(0), (4,))
    assert np.all(np.isfinite(s))


# ------------------------------------------------------------------------------------------
# A new model from the public helpers alone
# ------------------------------------------------------------------------------------------


class LaplaceNoise(AbstractNoise):
    r"""$G = \nabla\mathcal{L}(\theta) + b\,u$, $u$ i.i.d. Laplace(0, 1) per entry: each entry of
    $G - \nabla\mathcal{L}$ is Laplace(0, b), variance $2b^2$, so $\mathbb{E}\|G -
    \nabla\mathcal{L}\|^2 = 2b^2d$. Written as a user would, from ``lspsde.noise``'s public
    names only (no per-entry $1/\sqrt d$ here: `scale` is $b$, the scale of one entry)."""

    scale: jax.Array

    def __init__(self, scale):
        check_positive("scale", scale, allow_zero=True, fix="Use scale >= 0.")
        self.scale = as_float_array(scale)

    def sample(self, key, theta):
        return iid_like(jax.random.laplace, key, theta)

    def gradient(self, objective, theta, u):
        return add_flat(objective.gradient(theta), self.scale * ravel_pytree(u)[0])

    def covariance(self, objective, theta):
        return 2 * self.scale**2 * jnp.eye(flat_size(theta))

    def assumption1(self, objective):
        theta_star = objective.minimizer()
        if theta_star is None:  # sigma0 depends on d, known here from theta* only
            return Assumption1(None, None, None, "unknown: d needs objective.minimizer()")
        s0 = self.scale * jnp.sqrt(2.0 * flat_size(theta_star))
        return Assumption1(True, s0, as_float_array(0.0), "exact: sigma0^2 = 2 b^2 d")

    def is_additive(self):
        return True

    def diffusion(self, objective, theta):
        return scaled_identity(theta, jnp.sqrt(2.0) * self.scale)


def test_a_laplace_model_from_public_helpers_through_simulate():
    # SGD on a quadratic: G_t = (theta_t - theta_{t+1}) / eta is the oracle's output, so
    # xi_t = G_t - H (theta_t - theta*) is the realised noise. Its draws are independent over
    # steps and paths (fold_in keys) and of theta_t (additive): per path, the mean over steps
    # of ||xi_t||^2 is i.i.d. over paths, with mean 2 b^2 d (E x^2 = 2 b^2 for Laplace(0, b)).
    # The mean absolute entry E|x| = b tells Laplace from a Gaussian of the same variance
    # (E|x| = 2 b / sqrt(pi) = 1.13 b), and the intervals are tight enough (< 5%) that a wrong
    # factor 2 or sqrt(d) in the model cannot pass.
    b, d, eta, n_paths, n_steps = 0.7, 4, 0.1, 2_000, 20
    H = np.diag([1.0, 2.0, 0.5, 1.5])
    star = np.array([1.0, -1.0, 0.5, 2.0])
    objective = models.Quadratic(H, star)
    noise = LaplaceNoise(b)
    ens = lspsde.simulate(
        (objective, lspsde.SGD(eta), noise), jnp.zeros(d), key=jax.random.key(3),
        n_paths=n_paths, n_steps=n_steps,
    )  # fmt: skip
    theta = np.asarray(ens.theta)
    assert theta.shape == (n_paths, n_steps + 1, d) and not np.any(ens.diverged)
    xi = (theta[:, :-1] - theta[:, 1:]) / eta - (theta[:, :-1] - star) @ H
    for per_path, expected in (
        (np.mean(np.sum(xi**2, axis=2), axis=1), 2 * b**2 * d),
        (np.mean(np.abs(xi), axis=(1, 2)), b),
    ):
        half_width = Z * np.std(per_path, ddof=1) / math.sqrt(n_paths)
        assert half_width < 0.05 * expected
        assert abs(np.mean(per_path) - expected) < half_width, (np.mean(per_path), expected)
    # what the model declares agrees with the closed form
    np.testing.assert_allclose(noise.variance(objective, jnp.zeros(d)), 2 * b**2 * d, rtol=1e-14)
    a1 = noise.assumption1(objective)
    assert a1.holds is True and float(a1.sigma0) ** 2 == pytest.approx(2 * b**2 * d, rel=1e-14)
    B = noise.diffusion(objective, jnp.zeros(d)).as_matrix()
    np.testing.assert_allclose(B @ B.T, noise.covariance(objective, jnp.zeros(d)), rtol=1e-14)


def test_public_names_are_documented():
    # Every name lspsde.noise exports is a documented class or function (the helpers included).
    for name in lspsde.noise.__all__:
        assert (getattr(lspsde.noise, name).__doc__ or "").strip(), name


def test_a_new_model_is_usable_from_a_study_file_and_matched_by_default():
    # The Laplace model above, with no other edit: the study file names it by its class, the
    # table round-trips, and the default `matched` rescales its `scale` to a target variance.
    from lspsde.study.config import noise_table, parse_noise
    from lspsde.study.noise_ablation import NoiseAblation

    cfg = NoiseAblation(
        noise=[{"kind": "LaplaceNoise", "scale": 1.0}, {"kind": "NoNoise"}],
        dim=3,
        n_examples=8,
        batch_size=2,
        n_paths=50,
        n_steps=100,
    )
    assert type(cfg.noise[0]) is LaplaceNoise and float(cfg.noise[0].scale) == 1.0
    by_path = parse_noise({"kind": f"{__name__}:LaplaceNoise", "scale": 2.0})
    assert noise_table(by_path) == {"kind": "LaplaceNoise", "scale": 2.0}
    assert parse_noise(noise_table(cfg.noise[0])).scale == cfg.noise[0].scale
    with pytest.raises(ValueError, match="its arguments are \\['scale'\\]"):
        parse_noise({"kind": "LaplaceNoise", "b": 1.0})
    objective = models.Quadratic(jnp.eye(3), jnp.zeros(3))
    matched = by_path.matched(objective, jnp.zeros(3), 0.6)
    np.testing.assert_allclose(float(matched.variance(objective, jnp.zeros(3))), 0.6, rtol=1e-6)
    np.testing.assert_allclose(float(matched.scale), np.sqrt(0.6 / 6), rtol=1e-6)  # 2 b^2 d
    assert np.isnan(matched.tail_index)  # not declared: unknown in advance


@pytest.mark.parametrize(
    "noise,variance,index",
    [
        (IsotropicGaussian(0.5), 0.25, np.inf),
        (AnisotropicGaussian(jnp.array([1.0, 2.0, 3.0])), 14.0, np.inf),
        (StudentTNoise(1.0, 5.0), 5.0 / 3.0, 5.0),
        (AlphaStableNoise(1.0, 2.0), 2.0, np.inf),
    ],
)
def test_matched_reaches_the_target_variance_exactly(noise, variance, index):
    objective = models.Quadratic(jnp.eye(3), jnp.ones(3))
    theta = jnp.zeros(3)
    np.testing.assert_allclose(float(noise.variance(objective, theta)), variance, rtol=1e-6)
    m = noise.matched(objective, theta, 0.3)
    np.testing.assert_allclose(float(m.variance(objective, theta)), 0.3, rtol=1e-6)
    assert m.tail_index == index and type(m) is type(noise)


def test_matched_heavy_tails_and_state_dependent_models():
    objective = models.Quadratic(jnp.eye(2), jnp.ones(2))
    theta = jnp.zeros(2)  # ||theta - theta*||^2 = 2
    # infinite variance: the scale whose Gaussian limit has the target variance
    t = StudentTNoise(1.0, 1.5).matched(objective, theta, 0.49)
    np.testing.assert_allclose(float(t.scale), 0.7, rtol=1e-6)
    assert t.tail_index == 1.5
    s = AlphaStableNoise(1.0, 1.5).matched(objective, theta, 0.5)
    np.testing.assert_allclose(float(s.scale), 0.5, rtol=1e-6)  # alpha = 2: variance 2 scale^2
    assert s.tail_index == 1.5
    # GaussianNoise: sigma0 takes up what sigma1 ||theta - theta*||^2 leaves of the target
    g = GaussianNoise(1.0, 0.5).matched(objective, theta, 1.0)
    np.testing.assert_allclose(float(g.sigma0), np.sqrt(1.0 - 0.25 * 2), rtol=1e-6)
    np.testing.assert_allclose(float(g.variance(objective, theta)), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="lower sigma1"):
        GaussianNoise(1.0, 1.0).matched(objective, theta, 1.0)
    # data-driven and no noise: their level is the data's, returned unchanged
    assert NoNoise().matched(objective, theta, 1.0) == NoNoise()
    with pytest.raises(ValueError, match="cannot be matched"):
        IsotropicGaussian(0.0).matched(objective, theta, 1.0)


@pytest.mark.parametrize(
    "noise, error, match",
    [
        (MinibatchNoise(2, 8), TypeError, "^MinibatchNoise needs a finite-sum objective"),
        (CurvatureNoise(2, 8), TypeError, "^CurvatureNoise samples rows of a least-squares"),
    ],
)
def test_a_data_model_on_the_wrong_objective_says_so_before_any_step(noise, error, match):
    """``check_objective`` runs before the abstract step: the model's own message, not a
    failed step (an AttributeError from inside ``gradient``) wrapped as a fault of theta0."""
    quad = models.objectives.Quadratic(jnp.eye(3), jnp.zeros(3))
    with pytest.raises(error, match=match):
        check_step(
            LearningSystem(quad, GradientDescent(0.1), noise), jnp.ones(3), jax.random.key(0)
        )
