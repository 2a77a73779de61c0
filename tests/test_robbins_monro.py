"""The Robbins–Monro rate (Theorem 5.3 made quantitative) against exact recursions and Monte Carlo.

``theory.robbins_monro_limit`` gives $K = \\lim_t \\mathbb{E}\\|e_t\\|^2/\\eta_t$ for
$\\eta_t = c/(t + t_0)^p$; ``theory.robbins_monro_mean_square`` gives the exact $m_t$. The closed
form is checked first against the exact recursion (to the order of the known finite-$t$
correction), then against a Monte Carlo ensemble with a confidence interval.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lspsde
from lspsde import theory as T
import models

LAM = np.array([0.5, 0.8, 1.3, 2.0])  # Hessian eigenvalues, mu = 0.5, L = 2
S0 = 1.0  # total additive noise variance sigma0^2 = 1, per coordinate 1/d


def _rotated(lam, seed=0):
    V = np.linalg.qr(np.random.default_rng(seed).normal(size=(lam.size, lam.size)))[0]
    return (V * lam) @ V.T


def _exact_scaled(c, p, t0, n_steps, sigma1=0.0, lam=LAM):
    """m_T / eta_T from the exact recursion, from e_0 = (1, ..., 1)."""
    m = T.robbins_monro_mean_square(_rotated(lam), np.ones(lam.size), c, t0, p, S0, sigma1, n_steps)
    return float(m[-1]) / (c / (n_steps + t0) ** p)


def test_limit_hand_values():
    # p = 1, c = 2, lambda = (1, 2), d = 2, sigma0 = 1: sum_i c (1/2) / (2 c lambda_i - 1) / c
    # K = (1/2) (1/(2 - 1/2) + 1/(4 - 1/2)) = (1/2)(2/3 + 2/7) = 10/21.
    K = T.robbins_monro_limit(2.0, np.array([1.0, 2.0]), 1.0, 1.0)
    assert float(K) == pytest.approx(10 / 21, rel=1e-14)
    # p < 1: K = (1/2)(1/2 + 1/4) = 3/8, independent of c.
    for c in (0.1, 3.0):
        assert float(T.robbins_monro_limit(c, np.array([1.0, 2.0]), 1.0, 0.75)) == pytest.approx(
            3 / 8
        )
    # 2 c mu <= 1 with p = 1: no 1/t rate.
    assert float(T.robbins_monro_limit(0.25, np.array([1.0, 2.0]), 1.0, 1.0)) == math.inf
    assert float(T.robbins_monro_rate(0.25, 1.0, 1.0)) == 0.5
    assert float(T.robbins_monro_rate(4.0, 1.0, 1.0)) == 1.0
    assert float(T.robbins_monro_rate(4.0, 1.0, 0.6)) == pytest.approx(0.6)
    # broadcasting: a batch of c against one spectrum
    Ks = T.robbins_monro_limit(jnp.array([2.0, 4.0]), jnp.array([1.0, 2.0]), 1.0, 1.0)
    assert Ks.shape == (2,) and float(Ks[0]) == pytest.approx(10 / 21, rel=1e-14)


@pytest.mark.parametrize("c", [2.0, 4.0, 10.0])
def test_p1_limit_is_the_exact_recursion_limit_at_rate_one_over_t(c):
    # t m_t -> c K with a relative error O(1/t): 10x more steps, ~10x smaller error.
    K = float(T.robbins_monro_limit(c, LAM, S0, 1.0))
    errs = [abs(_exact_scaled(c, 1.0, 10.0, n) / K - 1) for n in (10**4, 10**5, 10**6)]
    assert errs[-1] < 1e-4
    for a, b in itertools.pairwise(errs):
        assert 6 < a / b < 14
    # the naive "eta_t sigma^2 / (2 lambda)" constant is wrong for p = 1: off by a factor
    # 2 c lambda / (2 c lambda - 1) per direction
    naive = float(T.robbins_monro_limit(c, LAM, S0, 0.75))
    assert abs(naive / K - 1) > 0.02


@pytest.mark.parametrize("p", [0.6, 0.75, 0.9])
def test_p_below_one_limit_with_its_finite_t_order(p):
    # m_t / eta_t -> sum_i (sigma0^2/d) / (2 lambda_i); the leading correction is the drift of
    # eta_t, relative p n^(p-1) / (2 c lambda): the error falls like n^(p-1).
    c = 2.0
    K = float(T.robbins_monro_limit(c, LAM, S0, p))
    assert K == pytest.approx(np.sum(S0 / LAM.size / (2 * LAM)), rel=1e-14)
    ns = np.array([10**4, 10**5, 10**6])
    errs = np.array([_exact_scaled(c, p, 10.0, int(n)) / K - 1 for n in ns])
    assert np.all(errs > 0)
    order = np.polyfit(np.log(ns), np.log(errs), 1)[0]
    if p >= 0.75:  # n^(p-1) dominates the O(eta_t) = O(n^-p) correction
        assert order == pytest.approx(p - 1, abs=0.06)
    else:  # comparable exponents: the local order lies between them
        assert -p - 0.03 < order < p - 1 + 0.03


def test_state_dependent_noise_does_not_change_the_limit():
    K = float(T.robbins_monro_limit(4.0, LAM, S0, 1.0))
    for s1 in (0.5, 1.5):
        assert _exact_scaled(4.0, 1.0, 10.0, 10**6, sigma1=s1) == pytest.approx(K, rel=2e-4)


def test_slow_regime_decays_like_t_to_minus_2c_mu():
    # p = 1, 2 c mu = 0.5 < 1: m_t ~ t^(-2 c mu), and t m_t -> infinity.
    c, mu = 0.5, 0.5
    lam = np.array([mu, 1.0, 2.0])
    m = np.asarray(
        T.robbins_monro_mean_square(_rotated(lam), np.ones(3), c, 10.0, 1.0, S0, 0.0, 10**6)
    )
    t = np.array([10**5, 10**6])
    slope = np.diff(np.log(m[t])) / np.diff(np.log(t + 10.0))
    assert slope[0] == pytest.approx(-float(T.robbins_monro_rate(c, mu, 1.0)), abs=0.01)
    assert t[1] * m[t[1]] > 2 * t[0] * m[t[0]]


def test_exact_recursion_matches_the_full_second_moment_recursion():
    # The eigenbasis diagonal recursion against S_{t+1} = A_t S A_t + eta_t^2/d (s0^2 + s1^2 tr S) I
    # in the original coordinates (dense, NumPy), for a rotated non-diagonal H.
    H = _rotated(LAM, seed=3)
    e0 = np.array([1.0, -2.0, 0.5, 0.3])
    c, t0, p, s0, s1, n = 1.5, 5.0, 0.8, 0.7, 0.6, 60
    S, ms = np.outer(e0, e0), [float(e0 @ e0)]
    for t in range(n):
        eta = c / (t + t0) ** p
        A = np.eye(4) - eta * H
        S = A @ S @ A + eta**2 / 4 * (s0**2 + s1**2 * np.trace(S)) * np.eye(4)
        ms.append(np.trace(S))
    got = T.robbins_monro_mean_square(H, e0, c, t0, p, s0, s1, n)
    np.testing.assert_allclose(got, ms, rtol=1e-12)


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="p"):
        T.robbins_monro_limit(1.0, LAM, 1.0, 1.5)
    with pytest.raises(ValueError, match="p"):
        T.robbins_monro_rate(1.0, 0.5, 0.0)
    with pytest.raises(ValueError, match="c"):
        T.robbins_monro_limit(-1.0, LAM, 1.0)
    with pytest.raises(ValueError, match="eigenvalues"):
        T.robbins_monro_limit(1.0, np.array([0.0, 1.0]), 1.0)
    with pytest.raises(ValueError, match="t0"):
        T.robbins_monro_mean_square(np.eye(2), np.ones(2), 1.0, 0.0, 1.0, 1.0, 0.0, 10)


@pytest.mark.parametrize(("c", "p"), [(3.0, 1.0), (2.0, 0.75)])
def test_monte_carlo_rate_constant(c, p):
    # SGD on a 4-d quadratic with IsotropicGaussian noise, Robbins-Monro steps. The per-path
    # tail average of ||e_t||^2 / eta_t, averaged over independent paths: a CLT interval.
    lam, t0, n_steps, n_paths = LAM, 10.0, 2000, 2000
    H = _rotated(lam, seed=1)
    objective = models.Quadratic(H, np.zeros(lam.size))
    ens = lspsde.simulate(
        (
            objective,
            lspsde.SGD(lspsde.RobbinsMonro(c, t0, p)),
            lspsde.IsotropicGaussian(math.sqrt(S0)),
        ),
        jnp.ones(lam.size),
        key=jax.random.key(7),
        n_paths=n_paths,
        n_steps=n_steps,
        save_every=50,
        save="summary",
    )
    steps = np.asarray(ens.steps)
    tail = steps >= n_steps // 2
    eta = c / (steps[tail] + t0) ** p
    per_path = (np.asarray(ens.energy)[:, tail] / eta).mean(axis=1)
    mean, se = per_path.mean(), per_path.std(ddof=1) / math.sqrt(n_paths)
    exact_m = np.asarray(
        T.robbins_monro_mean_square(H, np.ones(lam.size), c, t0, p, S0, 0.0, n_steps)
    )
    exact = float(np.mean(exact_m[steps[tail]] / eta))
    K = float(T.robbins_monro_limit(c, lam, S0, p))
    z = 3.29  # 99.9%: two parametrised cases, family-wise error < 0.2%
    assert abs(mean - exact) < z * se  # Monte Carlo against the exact finite-T value
    assert abs(mean - K) < z * se + abs(exact - K)  # ... and against the closed-form limit
    assert abs(exact / K - 1) < 0.08  # the finite-T offset is small at T = 2000
    # the constant is discriminating: the p = 1 constant without the -1/c (or with it for p < 1)
    other = float(T.robbins_monro_limit(c, lam, S0, 0.75 if p == 1.0 else 1.0))
    assert abs(mean - other) > 4 * z * se
