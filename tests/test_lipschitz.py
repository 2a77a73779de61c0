r"""The spectral-norm perturbation theory of ``lspsde.lipschitz`` against exact SVDs (float64).

References are independent of the implementation: central finite differences of
$\varepsilon \mapsto \sigma_1(W + \varepsilon E)$ (NumPy LAPACK, Richardson-extrapolated, so the
truncation error is $O(h^4)$ and rounding $\sim \epsilon \sigma_1 / h^2$), ``jax.hessian`` of
``svd(W)[0]`` (JAX's SVD derivative rule), and Monte Carlo means with CLT intervals. The one-step
Monte Carlo uses antithetic pairs $\pm\xi$ (a plain mean of exact $\sigma_1(W') - \sigma_1(W)$
over negatively correlated samples, with the interval from the i.i.d. pair means): the odd terms
cancel in each pair, so the interval is $\sim 30\times$ narrower than for independent draws and
a missing null-space term falls far outside it. Float64 is on for the whole suite
(``conftest.py``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lspsde.lipschitz import expansion as expansion_module
from lspsde.lipschitz import (
    expected_second_order,
    spectral_step_decomposition,
    top_singular_expansion,
    top_singular_hessian,
)
from lspsde.lipschitz import step as step_module

Z = 4.0  # CLT half-width in standard errors (two-sided p ~ 6e-5 per comparison)


def _matrix(rng, m, n, sigma):
    """A random ``(m, n)`` matrix with the given singular values (Haar singular vectors)."""
    U = np.linalg.qr(rng.standard_normal((m, m)))[0]
    V = np.linalg.qr(rng.standard_normal((n, n)))[0]
    r = min(m, n)
    return U[:, :r] @ np.diag(np.asarray(sigma, float)) @ V[:, :r].T


def _sigma1(W):
    return np.linalg.svd(np.asarray(W), compute_uv=False)[0]


def _finite_differences(W, E, h):
    """(first, second) coefficients by central differences, Richardson over h and h / 2."""

    def central(h):
        f = [_sigma1(W + t * E) for t in (-h, 0.0, h)]
        return (f[2] - f[0]) / (2 * h), (f[2] - 2 * f[1] + f[0]) / (2 * h * h)

    (f1, s1), (f2, s2) = central(h), central(h / 2)
    return (4 * f2 - f1) / 3, (4 * s2 - s1) / 3


def _null_count(m, n):
    r = min(m, n)
    return (m - r) + (n - r)


# --------------------------------------------------------------------------------------------
# First and second order against finite differences and jax.hessian

CASES = {
    "square": (5, 5, None, 1e-3),
    "tall": (7, 4, None, 1e-3),  # m > n: left null directions
    "wide": (3, 6, None, 1e-3),  # m < n: right null directions
    "row": (1, 5, None, 1e-3),
    "column": (6, 1, None, 1e-3),
    "rank_deficient": (6, 4, [2.0, 1.2, 0.0, 0.0], 1e-3),
    # a simple but close pair: relative gap 1e-3, so the series converges only for
    # |eps| ||E|| << 2e-3; h = 1e-5 and the coefficients are ~1/gap.
    "near_degenerate": (5, 4, [2.0, 1.998, 1.0, 0.3], 1e-5),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_coefficients_match_finite_differences(case, seed):
    m, n, sigma, h = CASES[case]
    rng = np.random.default_rng(100 * seed + len(case))
    W = rng.standard_normal((m, n)) if sigma is None else _matrix(rng, m, n, sigma)
    E = rng.standard_normal((m, n))
    out = top_singular_expansion(jnp.asarray(W), jnp.asarray(E))
    first_fd, second_fd = _finite_differences(W, E, h)
    assert not bool(out.degenerate)
    assert out.sigma1.dtype == jnp.float64
    np.testing.assert_allclose(float(out.sigma1), _sigma1(W), rtol=1e-13)
    np.testing.assert_allclose(float(out.first), first_fd, rtol=1e-7, atol=1e-9)
    # Richardson error ~ 1e-9 (rounding 1e-16 / h^2 times |coefficients|); ~1e-6 relative for the
    # near-degenerate pair (second ~ 1e3).
    np.testing.assert_allclose(float(out.second), second_fd, rtol=1e-6, atol=1e-7)
    s = np.linalg.svd(W, compute_uv=False)
    np.testing.assert_allclose(float(out.gap), s[0] - (s[1] if s.size > 1 else 0.0), rtol=1e-12)


@pytest.mark.parametrize("shape", [(5, 5), (7, 4), (3, 6), (1, 4)])
def test_hessian_matches_jax_hessian_and_second(shape):
    m, n = shape
    rng = np.random.default_rng(7)
    W = jnp.asarray(rng.standard_normal(shape))
    E = jnp.asarray(rng.standard_normal(shape))
    H = top_singular_hessian(W)
    H_ad = jax.hessian(lambda A: jnp.linalg.svd(A, compute_uv=False)[0])(W).reshape(m * n, m * n)
    np.testing.assert_allclose(H, H_ad, atol=1e-12)
    np.testing.assert_allclose(H, H.T, atol=1e-14)
    e = E.reshape(-1)
    second = top_singular_expansion(W, E).second
    np.testing.assert_allclose(e @ H @ e / 2, second, rtol=1e-12)


def test_float32_keeps_its_dtype_and_default_gap_tol():
    rng = np.random.default_rng(8)
    W, E = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    out32 = top_singular_expansion(W.astype(np.float32), E.astype(np.float32))
    out64 = top_singular_expansion(W, E)
    assert out32.second.dtype == jnp.float32 and out32.u1.dtype == jnp.float32
    np.testing.assert_allclose(out32.first, out64.first, rtol=1e-4)
    np.testing.assert_allclose(out32.second, out64.second, rtol=1e-3)
    # The default gap_tol is sqrt(eps) of the dtype: 3.5e-4 in float32, 1.5e-8 in float64.
    close = _matrix(rng, 4, 3, [2.0, 2.0 - 2e-4, 1.0])
    assert not bool(top_singular_expansion(close, jnp.ones((4, 3))).degenerate)
    with pytest.raises(ValueError, match="degenerate"):
        top_singular_expansion(close.astype(np.float32), np.ones((4, 3), np.float32))


def test_dropping_the_null_terms_breaks_the_tall_case():
    """The FD test can fail: the sum over the other singular pairs alone misses the left null
    directions of a tall matrix by far more than the FD error."""
    rng = np.random.default_rng(3)
    m, n = 7, 4
    W, E = rng.standard_normal((m, n)), rng.standard_normal((m, n))
    U, s, Vt = np.linalg.svd(W)
    a, b = U.T @ E @ Vt[0], Vt @ E.T @ U[:, 0]
    pairs = np.sum(
        (a[1:n] + b[1:n]) ** 2 / (4 * (s[0] - s[1:]))
        + (a[1:n] - b[1:n]) ** 2 / (4 * (s[0] + s[1:]))
    )
    null = np.sum(a[n:] ** 2) / (2 * s[0])
    _, second_fd = _finite_differences(W, E, 1e-3)
    assert abs(pairs - second_fd) > 1e3 * abs(pairs + null - second_fd)
    np.testing.assert_allclose(float(top_singular_expansion(W, E).second), pairs + null, rtol=1e-12)


def test_batched_equals_one_at_a_time():
    rng = np.random.default_rng(11)
    W = jnp.asarray(rng.standard_normal((2, 3, 5, 4)))
    E = jnp.asarray(rng.standard_normal((2, 3, 5, 4)))
    out = top_singular_expansion(W, E)
    assert out.second.shape == (2, 3) and out.u1.shape == (2, 3, 5) and out.v1.shape == (2, 3, 4)
    for i in range(2):
        for j in range(3):
            one = top_singular_expansion(W[i, j], E[i, j])
            np.testing.assert_allclose(out.first[i, j], one.first, rtol=1e-12)
            np.testing.assert_allclose(out.second[i, j], one.second, rtol=1e-12)
    np.testing.assert_allclose(
        expected_second_order(W, 0.5),
        jnp.stack([expected_second_order(w, 0.5) for w in W.reshape(6, 5, 4)]).reshape(2, 3),
        rtol=1e-12,
    )


# --------------------------------------------------------------------------------------------
# The Gaussian mean of the second-order coefficient (the Ito coefficient)


def _monte_carlo_second(W, samples):
    Wb = jnp.broadcast_to(W, samples.shape)
    return np.asarray(top_singular_expansion(Wb, samples).second)


@pytest.mark.parametrize("shape", [(7, 4), (3, 6), (5, 5)])
def test_expected_second_order_isotropic_monte_carlo(shape):
    m, n = shape
    r = min(m, n)
    rng = np.random.default_rng(21)
    sigma = np.linspace(2.0, 0.4, r)
    W = jnp.asarray(_matrix(rng, m, n, sigma))
    s2 = 0.3
    N = 20_000
    samples = jnp.asarray(np.sqrt(s2) * rng.standard_normal((N, m, n)))
    draws = _monte_carlo_second(W, samples)
    mean, se = draws.mean(), draws.std() / np.sqrt(N)
    predicted = float(expected_second_order(W, s2))
    closed = s2 * (
        np.sum(sigma[0] / (sigma[0] ** 2 - sigma[1:] ** 2)) + _null_count(m, n) / (2 * sigma[0])
    )
    np.testing.assert_allclose(predicted, closed, rtol=1e-12)
    assert abs(mean - predicted) < Z * se
    if _null_count(m, n):
        wrong = s2 * np.sum(sigma[0] / (sigma[0] ** 2 - sigma[1:] ** 2))
        assert abs(mean - wrong) > Z * se


def test_expected_second_order_general_covariance():
    m, n = 5, 3
    rng = np.random.default_rng(5)
    W = jnp.asarray(_matrix(rng, m, n, [1.5, 1.1, 0.4]))
    # Strongly anisotropic: entry scales from 0.1 to 2, plus correlations.
    L = rng.standard_normal((m * n, m * n)) * np.geomspace(0.1, 2.0, m * n)[None, :] / 4
    cov = L @ L.T
    predicted = float(expected_second_order(W, jnp.asarray(cov)))
    H = top_singular_hessian(W)
    np.testing.assert_allclose(predicted, 0.5 * float(jnp.sum(H * cov)), rtol=1e-12)
    np.testing.assert_allclose(
        expected_second_order(W, 0.7 * jnp.eye(m * n)), expected_second_order(W, 0.7), rtol=1e-12
    )
    N = 20_000
    samples = jnp.asarray((rng.standard_normal((N, m * n)) @ L.T).reshape(N, m, n))
    draws = _monte_carlo_second(W, samples)
    mean, se = draws.mean(), draws.std() / np.sqrt(N)
    assert abs(mean - predicted) < Z * se
    isotropic = float(expected_second_order(W, np.trace(cov) / (m * n)))  # the wrong law
    assert abs(mean - isotropic) > Z * se


# --------------------------------------------------------------------------------------------
# One SGD step of a linear layer


def _one_step_monte_carlo(W, G, eta, sample, cov, n_pairs, key):
    """Antithetic Monte Carlo of sigma1(W - eta (G + xi)) - sigma1(W): pair means and SE."""
    z = sample(key, n_pairs)
    xi = jnp.concatenate([z, -z])
    shape = xi.shape
    out = spectral_step_decomposition(
        jnp.broadcast_to(W, shape), jnp.broadcast_to(G, shape), xi, eta, noise_cov=cov
    )
    observed = np.asarray(out.observed)
    pairs = (observed[:n_pairs] + observed[n_pairs:]) / 2
    return out, pairs.mean(), pairs.std() / np.sqrt(n_pairs), np.asarray(out.residual).mean()


def test_one_step_mean_isotropic_noise():
    """Drift + Ito term predict the mean change of sigma1 of a tall layer; dropping the
    null-space term, or the whole Ito term, is rejected by the same interval."""
    m, n = 7, 4
    rng = np.random.default_rng(1)
    sigma = np.array([2.0, 1.6, 1.0, 0.5])
    W = jnp.asarray(_matrix(rng, m, n, sigma))
    G = jnp.asarray(0.2 * rng.standard_normal((m, n)))
    eta, s2 = 0.005, 1.0

    def sample(key, k):
        return np.sqrt(s2) * jax.random.normal(key, (k, m, n))

    out, mean, se, residual = _one_step_monte_carlo(
        W, G, eta, sample, s2, 50_000, jax.random.key(0)
    )
    predicted = float(out.predicted_mean[0])
    ito = float(out.ito[0])
    np.testing.assert_allclose(
        ito,
        eta**2 * s2 * (np.sum(sigma[0] / (sigma[0] ** 2 - sigma[1:] ** 2)) + 3 / (2 * sigma[0])),
        rtol=1e-12,
    )
    np.testing.assert_allclose(out.noise_variance, eta**2 * s2, rtol=1e-12)
    assert abs(mean - predicted) < Z * se
    # The bias of the second-order prediction, O(eta^3), is below the interval.
    assert abs(residual) < se
    null_term = eta**2 * s2 * _null_count(m, n) / (2 * sigma[0])
    assert abs(mean - (predicted - null_term)) > 10 * Z * se
    assert abs(mean - (predicted - ito)) > 10 * Z * se


def test_one_step_mean_anisotropic_noise():
    m, n = 4, 6
    rng = np.random.default_rng(2)
    W = jnp.asarray(_matrix(rng, m, n, [1.8, 1.3, 0.9, 0.2]))
    G = jnp.asarray(0.2 * rng.standard_normal((m, n)))
    L = jnp.asarray(rng.standard_normal((m * n, m * n)) * np.geomspace(0.05, 1.5, m * n) / 3)
    cov = L @ L.T
    eta = 0.005

    def sample(key, k):
        return (jax.random.normal(key, (k, m * n)) @ L.T).reshape(k, m, n)

    out, mean, se, residual = _one_step_monte_carlo(
        W, G, eta, sample, cov, 50_000, jax.random.key(1)
    )
    predicted = float(out.predicted_mean[0])
    assert abs(mean - predicted) < Z * se
    assert abs(residual) < se
    iso = float(expected_second_order(W, jnp.trace(cov) / (m * n)))
    wrong = predicted - float(out.ito[0]) + eta**2 * iso  # the Ito term of isotropic noise
    assert abs(mean - wrong) > Z * se


def test_decomposition_residual_is_third_order():
    m, n = 6, 4
    rng = np.random.default_rng(4)
    W = jnp.asarray(_matrix(rng, m, n, [2.0, 1.5, 0.8, 0.3]))
    G = jnp.asarray(rng.standard_normal((m, n)))
    xi = jnp.asarray(rng.standard_normal((m, n)))
    etas = 0.04 * 2.0 ** -np.arange(6)
    steps = [spectral_step_decomposition(W, G, xi, float(eta)) for eta in etas]
    residuals = np.abs([float(s.residual) for s in steps])
    slope = np.polyfit(np.log(etas), np.log(residuals), 1)[0]
    assert 2.8 < slope < 3.2, (slope, residuals)
    for s in steps:
        total = s.drift + s.noise + s.second_order + s.residual
        np.testing.assert_allclose(total, s.observed, rtol=1e-12, atol=1e-16)
        np.testing.assert_allclose(s.first_order, s.drift + s.noise, rtol=1e-12)
    # The first-order terms alone leave an O(eta^2) remainder.
    first_only = np.abs([float(s.observed - s.drift - s.noise) for s in steps])
    slope2 = np.polyfit(np.log(etas), np.log(first_only), 1)[0]
    assert 1.9 < slope2 < 2.1
    assert bool(jnp.isnan(steps[0].ito)) and bool(jnp.isnan(steps[0].predicted_mean))


# --------------------------------------------------------------------------------------------
# Degenerate top singular values


def _degenerate_matrix():
    W = np.zeros((4, 3))
    W[0, 0] = W[1, 1] = 3.0
    W[2, 2] = 1.0
    return jnp.asarray(W)


def test_degenerate_raises_when_concrete():
    W = _degenerate_matrix()
    E = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)))
    with pytest.raises(ValueError, match=r"degenerate.*gap sigma1 - sigma2 = 0.*on_degenerate"):
        top_singular_expansion(W, E)
    with pytest.raises(ValueError, match="degenerate"):
        expected_second_order(W, 1.0)
    with pytest.raises(ValueError, match="degenerate"):
        top_singular_hessian(W)
    with pytest.raises(ValueError, match="degenerate"):
        spectral_step_decomposition(W, E, E, 0.1)
    with pytest.raises(ValueError, match=r"`W` is zero.*\|eps\| sigma1\(E\)"):
        top_singular_expansion(jnp.zeros((3, 2)), E[:3, :2])
    batch = jnp.stack([jnp.asarray(np.random.default_rng(1).standard_normal((4, 3))), W])
    with pytest.raises(ValueError, match=r"at batch index \(1,\)"):
        top_singular_expansion(batch, jnp.broadcast_to(E, batch.shape))


def test_degenerate_fallback_is_the_one_sided_derivative():
    W = _degenerate_matrix()
    rng = np.random.default_rng(0)
    for _ in range(3):
        E = rng.standard_normal((4, 3))
        out = top_singular_expansion(W, jnp.asarray(E), on_degenerate="fallback")
        assert bool(out.degenerate) and float(out.gap) == 0.0
        assert bool(jnp.isnan(out.second))
        h = 1e-7
        one_sided = (_sigma1(W + h * E) - _sigma1(W)) / h
        np.testing.assert_allclose(float(out.first), one_sided, atol=1e-5)
        sym = (E[:2, :2] + E[:2, :2].T) / 2
        np.testing.assert_allclose(float(out.first), np.linalg.eigvalsh(sym)[-1], rtol=1e-12)
        # And from the other side, the derivative along -E is not -first (a kink).
        back = top_singular_expansion(W, jnp.asarray(-E), on_degenerate="fallback").first
        np.testing.assert_allclose(float(back), np.linalg.eigvalsh(-sym)[-1], rtol=1e-12)
    # W = 0: sigma1(eps E) = eps sigma1(E) for eps > 0.
    E = jnp.asarray(rng.standard_normal((3, 5)))
    zero = top_singular_expansion(jnp.zeros((3, 5)), E, on_degenerate="fallback")
    assert bool(zero.degenerate) and bool(jnp.isnan(zero.second))
    np.testing.assert_allclose(float(zero.first), _sigma1(E), rtol=1e-12)
    for field in ("sigma1", "first", "gap", "u1", "v1"):
        assert bool(jnp.all(jnp.isfinite(getattr(zero, field))))


def test_degenerate_under_jit_is_a_flag_not_an_error():
    W = _degenerate_matrix()
    E = jnp.asarray(np.random.default_rng(2).standard_normal((4, 3)))

    @jax.jit
    def run(W, E):
        out = top_singular_expansion(W, E)
        step = spectral_step_decomposition(W, E, E, 1e-4, noise_cov=1.0)
        return out, step, expected_second_order(W, 1.0)

    out, step, mean = run(W, E)
    assert bool(out.degenerate) and bool(jnp.isnan(out.second)) and bool(jnp.isnan(mean))
    assert bool(jnp.isfinite(out.first))
    assert bool(step.degenerate) and bool(jnp.isnan(step.second_order))
    assert bool(jnp.isnan(step.drift)) and bool(jnp.isnan(step.ito))
    # observed = first_order + O(eta^2) along the kink.
    assert abs(float(step.residual)) < 1e-6
    assert bool(jnp.isfinite(step.first_order)) and bool(jnp.isfinite(step.observed))
    # A simple matrix in the same compiled program is exact.
    W2 = W.at[0, 0].set(3.5)
    out2, _, _ = run(W2, E)
    assert not bool(out2.degenerate) and bool(jnp.isfinite(out2.second))


def test_gap_tol_sets_the_threshold():
    W = _matrix(np.random.default_rng(3), 4, 3, [2.0, 2.0 - 2e-6, 1.0])
    E = jnp.ones((4, 3))
    assert not bool(top_singular_expansion(W, E).degenerate)  # 1e-6 > sqrt(eps) = 1.5e-8
    with pytest.raises(ValueError, match=r"relative 1e-06.*gap_tol = 0.0001"):
        top_singular_expansion(W, E, gap_tol=1e-4)


# --------------------------------------------------------------------------------------------
# Bad input: clear errors before anything is compiled


@pytest.fixture
def no_compile(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("reached the compiled kernel")

    for module, name in (
        (expansion_module, "_expansion"),
        (expansion_module, "_hessian"),
        (expansion_module, "_expected"),
        (step_module, "_step"),
    ):
        monkeypatch.setattr(module, name, boom)


GOOD = np.arange(12.0).reshape(4, 3)


@pytest.mark.parametrize(
    ("W", "E", "error", "match"),
    [
        (np.ones(3), np.ones(3), ValueError, r"`W` must be a matrix of shape \(m, n\).*\(3,\)"),
        (np.ones((0, 3)), np.ones((0, 3)), ValueError, r"`W` has zero size \(shape \(0, 3\)\)"),
        (np.ones((2, 0, 3)), np.ones((2, 0, 3)), ValueError, "zero size"),
        (GOOD, np.ones((3, 4)), ValueError, r"`E` has shape \(3, 4\) but `W` has shape \(4, 3\)"),
        (
            np.where(GOOD == 5, np.nan, GOOD),
            GOOD,
            ValueError,
            r"`W` is not finite: 1 entry .* index \(1, 2\)",
        ),
        (GOOD, np.where(GOOD > 9, np.inf, GOOD), ValueError, r"`E` is not finite: 2 entries"),
        (np.ones((4, 3), int), GOOD, TypeError, "`W` must have a real floating dtype, got int"),
        (GOOD, GOOD.astype(complex), TypeError, "complex"),
        # (the runtime type checker of the test run, or the function's own check, names it)
        ("W", GOOD, TypeError, "parameter 'W'|`W` must be a matrix"),
    ],
)
def test_bad_matrices(no_compile, W, E, error, match):
    with pytest.raises(error, match=match):
        top_singular_expansion(W, E)


def test_bad_options_and_covariances(no_compile):
    W = jnp.asarray(GOOD)
    with pytest.raises(ValueError, match=r"`gap_tol` must lie in \[0.0, 1.0\)"):
        top_singular_expansion(W, W, gap_tol=1.5)
    with pytest.raises(ValueError, match="Unknown `on_degenerate` 'ignore'"):
        top_singular_expansion(W, W, on_degenerate="ignore")
    with pytest.raises(ValueError, match=r"`cov` must be a scalar .* \(12, 12\) .* shape \(4, 3\)"):
        expected_second_order(W, jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="`cov` is a variance and must be >= 0"):
        expected_second_order(W, -1.0)
    with pytest.raises(ValueError, match="`cov` is not symmetric"):
        expected_second_order(W, jnp.eye(12).at[0, 1].set(1.0))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        expected_second_order(W, -jnp.eye(12))
    with pytest.raises(ValueError, match="`cov` is not finite"):
        expected_second_order(W, jnp.nan)
    with pytest.raises(ValueError, match="`W` must be a matrix"):
        top_singular_hessian(jnp.ones(4))
    with pytest.raises(ValueError, match=r"`noise` has shape \(4, 4\) but `W`"):
        spectral_step_decomposition(W, W, jnp.ones((4, 4)), 0.1)
    with pytest.raises(ValueError, match=r"`grad` is not finite"):
        spectral_step_decomposition(W, W.at[0, 0].set(jnp.inf), W, 0.1)
    with pytest.raises(ValueError, match="`eta` must be finite and positive"):
        spectral_step_decomposition(W, W, W, 0.0)
    # (the test run's type checker rejects the annotation first; without it, the own check)
    with pytest.raises((TypeError, ValueError), match=r"parameter 'eta'|`eta` must be a scalar"):
        spectral_step_decomposition(W, W, W, jnp.ones(2))


def test_traced_values_are_not_checked_but_shapes_are():
    W = jnp.asarray(GOOD).at[0, 0].set(jnp.nan)
    out = jax.jit(lambda W: top_singular_expansion(W, W).second)(W)  # no Python error: NaN out
    assert bool(jnp.isnan(out))
    with pytest.raises(ValueError, match="must be a matrix"):
        jax.jit(lambda w: top_singular_expansion(w, w))(jnp.ones(3))


def test_second_call_does_not_recompile():
    rng = np.random.default_rng(9)
    W, E = jnp.asarray(rng.standard_normal((5, 4))), jnp.asarray(rng.standard_normal((5, 4)))
    top_singular_expansion(W, E)
    before = expansion_module._expansion._cached._cache_size()
    top_singular_expansion(W + 1.0, E * 2.0, gap_tol=1e-6)
    assert expansion_module._expansion._cached._cache_size() == before
