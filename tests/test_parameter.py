"""Parameter flows and schedules against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import gammaln

import lspsde
import models


def _run(update, objective, theta0, n_steps):
    system = lspsde.LearningSystem(objective, update)
    thetas, _ = lspsde.parameter_trajectory(system, theta0, key=jax.random.key(0), n_steps=n_steps)
    return thetas


def test_sgd_without_noise_is_gradient_descent():
    obj = models.Quadratic(jnp.diag(jnp.array([1.0, 3.0])), jnp.array([1.0, -1.0]))
    a = _run(lspsde.SGD(0.2), obj, jnp.zeros(2), 20)
    b = _run(lspsde.GradientDescent(0.2), obj, jnp.zeros(2), 20)
    np.testing.assert_array_equal(a, b)
    # theta^t = theta* + (I - eta H)^t (theta0 - theta*)
    lam, star = np.array([1.0, 3.0]), np.array([1.0, -1.0])
    expected = star[None, :] - (1 - 0.2 * lam[None, :]) ** np.arange(21)[:, None] * star[None, :]
    np.testing.assert_allclose(a, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("p", [1.0, 0.75])
def test_robbins_monro_schedule_and_deterministic_rate(p):
    c, t0, h, T = 0.8, 3.0, 1.5, 400
    sched = lspsde.RobbinsMonro(c, t0, p)
    etas = np.asarray(jax.vmap(sched)(jnp.arange(T)))
    np.testing.assert_allclose(etas, c / (np.arange(T) + t0) ** p, rtol=1e-14)
    obj = models.Quadratic(jnp.array([[h]]), jnp.zeros(1))
    e = np.asarray(_run(lspsde.SGD(sched), obj, jnp.ones(1), T))[:, 0]
    np.testing.assert_allclose(e, np.concatenate([[1.0], np.cumprod(1 - h * etas)]), rtol=1e-10)
    if p == 1.0:
        # prod_{s<t} (1 - a/(s+t0)) = Gamma(t+t0-a) Gamma(t0) / (Gamma(t0-a) Gamma(t+t0)) ~ t^{-a}
        a = h * c
        t = np.arange(T + 1)
        closed = np.exp(gammaln(t + t0 - a) + gammaln(t0) - gammaln(t0 - a) - gammaln(t + t0))
        np.testing.assert_allclose(e, closed, rtol=1e-9)


def test_subgradient_method_on_l1_converges_with_decreasing_steps():
    class L1(lspsde.AbstractObjective):
        def loss(self, theta):
            return jnp.sum(jnp.abs(theta))

    theta = _run(
        lspsde.SubgradientMethod(lspsde.RobbinsMonro(1.0, 1.0, 1.0)),
        L1(),
        jnp.array([3.3, -2.2]),
        2000,
    )
    # |theta_t| oscillates around 0 with amplitude ~ eta_t = 1/(t+1)
    assert float(jnp.max(jnp.abs(theta[-1]))) <= 1.0 / 2000 * 1.0001
    # a constant step only reaches a neighbourhood of size ~ eta
    theta = _run(lspsde.SubgradientMethod(0.25), L1(), jnp.array([3.3, -2.2]), 200)
    assert 0.0 < float(jnp.max(jnp.abs(theta[-1]))) <= 0.25


def test_bad_schedules():
    for p in [0.5, 1.2, 0.0]:
        with pytest.raises(ValueError, match=r"p.*\(1/2, 1\]"):
            lspsde.RobbinsMonro(1.0, 1.0, p)
    with pytest.raises(ValueError, match="c"):
        lspsde.RobbinsMonro(-1.0)
    with pytest.raises(ValueError, match="t0"):
        lspsde.RobbinsMonro(1.0, 0.0)
    with pytest.raises(ValueError, match="step_size"):
        lspsde.SGD(0.0)
