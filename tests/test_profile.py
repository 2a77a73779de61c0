"""The Learning Stability Profile: matrix-free against dense, and against closed forms."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lspsde
from lspsde.exponents import growth_rate, stability_exponents, sup_exponent
from lspsde.objectives import SupervisedLoss, parameters
from lspsde.parameter import GradientDescent
from lspsde.profile import learning_profile, representation_profile
from lspsde.representation import Feedforward, LayerSequence, Residual, from_equinox
from lspsde.schedules import RobbinsMonro
from lspsde.system import LearningSystem
import models

KEY = jax.random.key(0)


def _orthogonal(key, n):
    q, r = jnp.linalg.qr(jax.random.normal(key, (n, n)))
    return q * jnp.sign(jnp.diag(r))[None, :]


def _flows():
    k = jax.random.split(jax.random.key(1), 8)
    ff = [jax.random.normal(k[i], (12, 12)) / 4 for i in range(3)]
    yield "relu", Feedforward(ff, [0.1 * jnp.ones(12)] * 3, activation="relu")
    yield (
        "tanh-rect",
        Feedforward(
            [jax.random.normal(k[3], (20, 12)) / 4, jax.random.normal(k[4], (7, 20)) / 4],
            activation="tanh",
        ),
    )
    blocks = [eqx.nn.Linear(12, 12, key=k[5 + i]) for i in range(2)]
    yield "residual", Residual(blocks, 0.3)
    mlp = eqx.nn.MLP(12, 5, 16, 2, activation=jnp.tanh, key=k[7])
    yield "eqx-mlp", from_equinox(mlp)


@pytest.mark.parametrize("name,flow", list(_flows()))
def test_representation_profile_matrix_free_matches_dense(name, flow):
    probes = jax.random.normal(jax.random.key(2), (4, 12))
    free = representation_profile(flow, probes, method="lanczos", rtol=1e-10)
    dense = representation_profile(flow, probes, method="dense")
    assert bool(free.converged)
    # Lanczos on J^T J converges to the top singular value; rtol=1e-10 on the Ritz value.
    np.testing.assert_allclose(free.sigma_x, dense.sigma_x, rtol=1e-7)
    np.testing.assert_allclose(free.cumulative, dense.cumulative, rtol=1e-7)
    # Submultiplicativity: ||J_k ... J_0|| <= prod ||J_j||, an identity of the dense numbers.
    assert np.all(dense.cumulative <= np.cumprod(dense.sigma_x, axis=1) * (1 + 1e-12))


def test_theorem_4_1_bound_holds_and_is_attained():
    n, L, rho = 10, 6, 0.8
    keys = jax.random.split(jax.random.key(3), L)
    weights = [rho * _orthogonal(k, n) for k in keys]
    probes = jnp.concatenate([jnp.zeros((1, n)), jax.random.normal(keys[0], (7, n))])
    for act in ["relu", "tanh", "leaky_relu"]:
        prof = representation_profile(
            Feedforward(weights, activation=act), probes, method="lanczos"
        )
        assert float(prof.cumulative[:, -1].max()) <= rho**L * (1 + 1e-8)
        assert float(prof.sigma_x.max()) <= rho * (1 + 1e-8)
    # identity: J = prod rho Q_k, an orthogonal matrix times rho^L -> attained at every x.
    prof = representation_profile(Feedforward(weights, activation="identity"), probes)
    np.testing.assert_allclose(prof.cumulative[:, -1], rho**L, rtol=1e-10)
    # tanh at x = 0 with zero biases: tanh'(0) = 1 so D_k = I -> attained at the probe x = 0.
    prof = representation_profile(Feedforward(weights, activation="tanh"), probes)
    np.testing.assert_allclose(prof.cumulative[0, -1], rho**L, rtol=1e-10)
    assert float(prof.cumulative[1:, -1].max()) < rho**L * (1 - 1e-3)
    # ReLU zeroes some directions: strictly inside the bound.
    prof = representation_profile(Feedforward(weights, activation="relu"), probes[1:])
    assert float(prof.cumulative[:, -1].max()) < rho**L


def _quadratic_system(eigs, eta, schedule=None):
    d = len(eigs)
    q = _orthogonal(jax.random.key(4), d)
    H = (q * jnp.asarray(eigs)[None, :]) @ q.T
    obj = models.Quadratic(H, jnp.ones(d))
    return LearningSystem(obj, GradientDescent(schedule if schedule is not None else eta))


def test_gradient_descent_profile_on_a_quadratic_is_exact():
    eigs = jnp.array([0.5, 1.0, 2.0, 3.0])
    eta, T = 0.2, 12
    system = _quadratic_system(eigs, eta)
    theta0 = jnp.zeros(4)
    prof = learning_profile(system, theta0, key=KEY, n_steps=T, save_every=3, rtol=1e-12)
    t = np.asarray(prof.steps)
    r = float(jnp.max(jnp.abs(1 - eta * eigs)))  # ||I - eta H||
    np.testing.assert_allclose(prof.sigma_theta, r, rtol=1e-9)
    np.testing.assert_allclose(prof.sigma_u, eta, rtol=1e-9)  # dA/du = -eta I
    np.testing.assert_allclose(prof.cum_theta, r**t, rtol=1e-8)
    # d theta^t / d(u^0..u^{t-1}) = -eta [(I-eta H)^{t-1}, ..., I]: its norm is
    # eta * sqrt(max_lambda sum_{j<t} (1 - eta lambda)^{2j}).
    lam_sums = [
        np.sum(np.asarray(1 - eta * eigs)[None, :] ** (2 * np.arange(s))[:, None], 0) for s in t
    ]
    expected = np.array([eta * np.sqrt(np.max(s)) for s in lam_sums])
    np.testing.assert_allclose(prof.cum_u, expected, rtol=1e-8)
    # Theorem 5.2(3): bounded temporal sensitivity, sup_t <= eta / sqrt(1 - r^2).
    assert float(prof.cum_u.max()) <= eta / np.sqrt(1 - r**2)
    # loss decays: L(theta^t) = 0.5 sum_i lambda_i (1 - eta lambda_i)^{2t} (e_i . (theta0 - 1))^2
    ex = stability_exponents(prof)
    np.testing.assert_allclose(ex.alpha_theta, np.log(r), rtol=1e-8)
    assert float(ex.alpha_theta_sup) == 0.0  # the sup includes t = 0 where the norm is 1


def test_profile_with_decreasing_steps():
    eigs = jnp.array([1.0, 2.0])
    sched = RobbinsMonro(c=0.5, t0=2.0, p=0.75)
    system = _quadratic_system(eigs, None, schedule=sched)
    prof = learning_profile(system, jnp.zeros(2), key=KEY, n_steps=8, rtol=1e-12)
    etas = 0.5 / (np.arange(9) + 2.0) ** 0.75
    # sigma^u_t = eta_t, sigma^theta_t = max_i |1 - eta_t lambda_i|
    np.testing.assert_allclose(prof.sigma_u, etas, rtol=1e-9)
    np.testing.assert_allclose(
        prof.sigma_theta, np.max(np.abs(1 - etas[:, None] * np.asarray(eigs)), 1), rtol=1e-9
    )
    cum = np.concatenate(
        [[1.0], np.cumprod(np.max(np.abs(1 - etas[:-1, None] * np.asarray(eigs)), 1))]
    )
    np.testing.assert_allclose(prof.cum_theta, cum, rtol=1e-8)


def test_learning_profile_of_a_network_matches_dense():
    k = jax.random.split(jax.random.key(5), 4)
    net = Feedforward(
        [jax.random.normal(k[0], (8, 6)) / 3, jax.random.normal(k[1], (3, 8)) / 3],
        activation="tanh",
        final_activation=False,
    )
    x = jax.random.normal(k[2], (10, 6))
    y = jax.random.normal(k[3], (10, 3))
    system = LearningSystem(
        SupervisedLoss(net, x, y), GradientDescent(0.3), representation=net, probes=x[:3]
    )
    free = learning_profile(
        system, parameters(net), key=KEY, n_steps=6, save_every=2, method="lanczos", rtol=1e-10
    )
    dense = learning_profile(
        system, parameters(net), key=KEY, n_steps=6, save_every=2, method="dense"
    )
    assert bool(free.converged)
    for field in ["sigma_theta", "sigma_u", "cum_theta", "cum_u", "sigma_x", "cum_x", "loss"]:
        np.testing.assert_allclose(getattr(free, field), getattr(dense, field), rtol=1e-6)
    assert float(free.loss[-1]) < float(free.loss[0])


def test_exponent_definitions():
    norms = jnp.array([2.0, 0.5, 0.25, 0.125])
    np.testing.assert_allclose(growth_rate(norms[-1], 4), np.log(0.125) / 4)
    np.testing.assert_allclose(sup_exponent(norms), np.log(2.0) / 4)
    # a contracting sequence: the literal sup exponent is exactly 0 (from ||J_0|| = 1)
    np.testing.assert_allclose(sup_exponent(norms[1:]), 0.0)
    np.testing.assert_allclose(sup_exponent(norms[1:], include_identity=False), np.log(0.5) / 3)


def test_bad_input_is_rejected_before_compilation():
    system = _quadratic_system(jnp.array([1.0, 2.0]), 0.1)
    with pytest.raises(TypeError, match="n_steps"):
        learning_profile(system, jnp.zeros(2), key=KEY, n_steps=2.5)
    with pytest.raises(ValueError, match="n_steps"):
        learning_profile(system, jnp.zeros(2), key=KEY, n_steps=0)
    with pytest.raises(ValueError, match="save_every"):
        learning_profile(system, jnp.zeros(2), key=KEY, n_steps=3, save_every=5)
    with pytest.raises(ValueError, match="theta0"):
        learning_profile(system, jnp.zeros(3), key=KEY, n_steps=3)
    with pytest.raises(ValueError, match="method"):
        learning_profile(system, jnp.zeros(2), key=KEY, n_steps=3, method="svd")
    flow = LayerSequence([jnp.tanh])
    with pytest.raises(ValueError, match="probes"):
        representation_profile(flow, jnp.zeros(3))
    with pytest.raises(ValueError, match="step"):
        GradientDescent(-0.1)
    with pytest.raises(ValueError, match="p"):
        RobbinsMonro(1.0, 1.0, p=0.4)
    with pytest.raises(ValueError, match="chain"):
        Feedforward([jnp.ones((3, 2)), jnp.ones((3, 4))])
    with pytest.raises(ValueError, match="step_size"):
        Residual([jnp.tanh], 0.0)


def test_profile_with_minibatch_noise_has_no_u_blocks():
    data = models.synthetic_regression(jax.random.key(7), 40, 3, 0.1)
    obj = models.LeastSquares(data.X, data.y)
    system = LearningSystem(obj, GradientDescent(0.1), noise=lspsde.MinibatchNoise(8, 40))
    prof = learning_profile(system, jnp.zeros(3), key=KEY, n_steps=6, save_every=3, rtol=1e-12)
    assert prof.sigma_u is None and prof.cum_u is None
    assert stability_exponents(prof).alpha_u is None
    # sigma^theta_t = ||I - eta H_B|| with H_B the Hessian of the sampled batch: <= 1 here
    assert float(prof.sigma_theta.max()) <= 1.0
    assert np.all(np.isfinite(prof.cum_theta))
