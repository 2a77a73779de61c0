r"""Flows with an optimiser state (``lspsde.adaptive``): heavy ball and the optax wrapper.

- The wrapped optax step equals optax's own loop, step for step, for Adam, AdamW, RMSProp,
  Nesterov SGD and a scheduled Adam, with exact gradients and with sampled noise (the loop
  draws $u^t$ from the same counter keys).
- Heavy ball on a quadratic: the joint step is the linear map $M$ on $(\theta, v)$, so the
  profile's $\sigma^\theta = \|M\|_2$ and $\|\partial S^T/\partial S^0\|_2 = \|M^T\|_2$ (dense
  NumPy), and the exponent lies in the exact window $\log\rho(M) \le \alpha_\theta \le
  \log\rho(M) + \log\kappa(V)/T$ ($M = V\Lambda V^{-1}$): underdamped, overdamped and unstable.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lspsde
from lspsde.system import LearningSystem, parameter_trajectory
from models.objectives import Quadratic

H_DIAG = np.array([0.5, 1.0, 2.0])


@pytest.fixture(scope="module")
def quadratic():
    return Quadratic(jnp.diag(jnp.asarray(H_DIAG)), jnp.array([0.3, -0.2, 0.1]))


def _optax_loop(objective, noise, tx, theta0, key, p, n_steps):
    """optax's own loop, with the noise draws of simulate's path ``p``."""
    k_p = jax.random.fold_in(key, p)
    theta, state, out = theta0, tx.init(theta0), [theta0]
    for t in range(n_steps):
        u = noise.sample(jax.random.fold_in(k_p, t), theta)
        g = noise.gradient(objective, theta, u)
        updates, state = tx.update(g, state, theta)
        theta = optax.apply_updates(theta, updates)
        out.append(theta)
    return np.stack(out)


OPTIMIZERS = {
    "adam": lambda: optax.adam(0.05),
    "adamw": lambda: optax.adamw(0.05, weight_decay=0.1),
    "rmsprop": lambda: optax.rmsprop(0.02, decay=0.8),
    "nesterov": lambda: optax.sgd(0.1, momentum=0.7, nesterov=True),
    # optax (0.2.8) evaluates schedules in float32 even under x64, and a compiled float32 pow
    # rounds differently from an eager one (1e-8 relative with exponential_decay): a piecewise
    # constant schedule keeps the comparison exact.
    "adam+schedule": lambda: optax.adam(optax.piecewise_constant_schedule(0.1, {10: 0.5})),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("noisy", [False, True])
def test_wrapped_optax_matches_optax_step_for_step(quadratic, name, noisy):
    noise = lspsde.IsotropicGaussian(0.3) if noisy else lspsde.NoNoise()
    tx = OPTIMIZERS[name]()
    theta0, key, T = jnp.array([1.0, -1.0, 2.0]), jax.random.key(4), 25
    ens = lspsde.simulate(
        (quadratic, lspsde.Optax(tx), noise), theta0, key=key, n_paths=3, n_steps=T
    )
    for p in range(3):
        want = _optax_loop(quadratic, noise, tx, theta0, key, p, T)
        np.testing.assert_allclose(np.asarray(ens.theta[p]), want, rtol=1e-13, atol=1e-15)
    if not noisy:  # exact gradients: every path is the same
        np.testing.assert_array_equal(ens.theta[0], ens.theta[2])


def test_factory_form_sweeps_hyperparameters_as_one_program(quadratic):
    theta0, key = jnp.array([1.0, -1.0, 2.0]), jax.random.key(1)
    noise = lspsde.IsotropicGaussian(0.2)
    kw = dict(key=key, n_paths=4, n_steps=20)
    built = lspsde.simulate((quadratic, lspsde.Optax(optax.adam(0.05)), noise), theta0, **kw)
    factory = lspsde.simulate(
        (quadratic, lspsde.Optax(optax.adam, learning_rate=0.05), noise), theta0, **kw
    )
    np.testing.assert_allclose(factory.theta, built.theta, rtol=1e-14, atol=1e-15)
    lrs = [0.01, 0.05, 0.2]
    sweep = lspsde.Sweep.of(
        lambda lr: lspsde.Optax(optax.adam, learning_rate=lr, b1=0.8), lrs, name="lr"
    )
    swept = lspsde.simulate((quadratic, sweep, noise), theta0, **kw)
    assert swept.theta.shape == (3, 4, 21, 3)
    for g, lr in enumerate(lrs):
        one = lspsde.simulate(
            (quadratic, lspsde.Optax(optax.adam, learning_rate=lr, b1=0.8), noise), theta0, **kw
        )
        np.testing.assert_array_equal(swept.at(g).theta, one.theta)  # bit for bit


def test_heavy_ball_equals_optax_momentum_sgd(quadratic):
    theta0, key = jnp.array([1.0, -1.0, 2.0]), jax.random.key(2)
    noise = lspsde.IsotropicGaussian(0.2)
    kw = dict(key=key, n_paths=3, n_steps=40)
    hb = lspsde.simulate((quadratic, lspsde.HeavyBall(0.1, 0.6), noise), theta0, **kw)
    ox = lspsde.simulate(
        (quadratic, lspsde.Optax(optax.sgd(0.1, momentum=0.6)), noise), theta0, **kw
    )
    # v = -eta * trace: the same recursion, associated differently
    np.testing.assert_allclose(hb.theta, ox.theta, rtol=1e-12, atol=1e-14)
    sgd = lspsde.simulate((quadratic, lspsde.SGD(0.1), noise), theta0, **kw)
    zero = lspsde.simulate((quadratic, lspsde.HeavyBall(0.1, 0.0), noise), theta0, **kw)
    np.testing.assert_allclose(zero.theta, sgd.theta, rtol=1e-14, atol=1e-15)
    assert np.max(np.abs(hb.theta - sgd.theta)) > 0.1  # momentum changes the path


def _companion(eta, beta):
    H = np.diag(H_DIAG)
    eye = np.eye(3)
    return np.block([[eye - eta * H, beta * eye], [-eta * H, beta * eye]])


@pytest.mark.parametrize(
    "eta, beta, regime",
    [(0.3, 0.5, "underdamped"), (0.05, 0.1, "overdamped"), (1.4, 0.2, "unstable")],
)
def test_heavy_ball_exponent_is_log_spectral_radius_of_companion(quadratic, eta, beta, regime):
    M = _companion(eta, beta)
    lam, V = np.linalg.eig(M)
    rho = np.max(np.abs(lam))
    # the regime is what the stability condition 0 < eta*lambda < 2(1 + beta) says
    assert (rho < 1) == bool(np.all(eta * H_DIAG < 2 * (1 + beta))) == (regime != "unstable")
    T = 60
    system = LearningSystem(quadratic, lspsde.HeavyBall(eta, beta))
    theta0 = jnp.array([1.0, -1.0, 2.0])
    prof = lspsde.learning_profile(system, theta0, key=jax.random.key(0), n_steps=T)
    np.testing.assert_allclose(prof.sigma_theta, np.linalg.norm(M, 2), rtol=1e-8)
    exact = np.log(np.linalg.norm(np.linalg.matrix_power(M, T), 2))
    np.testing.assert_allclose(prof.log_cum_theta[-1], exact, rtol=1e-8, atol=1e-10)
    alpha = float(lspsde.stability_exponents(prof).alpha_theta)
    window = np.log(np.linalg.cond(V)) / T  # rho^T <= ||M^T|| <= cond(V) rho^T
    assert np.log(rho) - 1e-12 <= alpha <= np.log(rho) + window + 1e-12
    # the ensemble front end measures the same exponent (exact gradients: every path alike)
    dist = lspsde.exponent_distribution(
        system, theta0, key=jax.random.key(0), n_paths=2, n_steps=T, divergence_threshold=1e30
    )
    np.testing.assert_allclose(dist.alpha_theta, alpha, rtol=1e-8)


def test_unstable_heavy_ball_diverges_as_data(quadratic):
    theta0 = jnp.array([1.0, -1.0, 2.0])
    ens = lspsde.simulate(
        (
            quadratic,
            lspsde.Sweep.of(lambda eta: lspsde.HeavyBall(eta, 0.5), [0.2, 1.6], name="eta"),
            lspsde.IsotropicGaussian(0.1),
        ),
        theta0,
        key=jax.random.key(0),
        n_paths=8,
        n_steps=300,
        divergence_threshold=1e6,
    )
    assert not np.any(ens.diverged[0]) and np.all(ens.diverged[1])
    est = ens.mean_energy()
    assert np.all(np.isfinite(est.mean[0]))
    assert est.diverged_fraction[1, -1] == 1.0
    assert np.all(np.isfinite(np.asarray(ens.final_theta)))  # frozen at the last finite state


def test_adam_profile_and_exponents_differentiate_the_full_state(quadratic):
    """Adam's state holds an integer step count; the blocks differentiate the floating
    leaves (theta, mu, nu), and a dense Jacobian of the same step agrees."""
    theta0 = jnp.array([1.0, -1.0, 2.0])
    flow = lspsde.Optax(optax.adam(0.05))
    system = LearningSystem(quadratic, flow, lspsde.IsotropicGaussian(0.2))
    key = jax.random.key(3)
    prof = lspsde.learning_profile(system, theta0, key=key, n_steps=6)
    assert bool(prof.converged)
    states, _ = parameter_trajectory(system, theta0, key=key, n_steps=6)
    t = 4
    state_t = jax.tree.map(lambda a: a[t], states)
    floats, ints = eqx.partition(state_t, eqx.is_inexact_array)
    u_t = system.noise_at(key, t, state_t)

    def step(x):
        new = system.parameter_map(t, eqx.combine(x, ints), u_t)
        return jax.flatten_util.ravel_pytree(eqx.filter(new, eqx.is_inexact_array))[0]

    flat, unravel = jax.flatten_util.ravel_pytree(floats)
    J = jax.jacfwd(lambda z: step(unravel(z)))(flat)
    assert J.shape == (9, 9)  # theta, mu, nu: three leaves of three
    np.testing.assert_allclose(prof.sigma_theta[t], np.linalg.norm(J, 2), rtol=1e-6)
    dist = lspsde.exponent_distribution(system, theta0, key=key, n_paths=3, n_steps=6)
    assert np.all(np.isfinite(dist.alpha_theta))


@pytest.mark.parametrize("momentum", [None, 0.5])
@pytest.mark.parametrize("chained", [False, True])
def test_injected_hyperparameters_are_held_not_differentiated(quadratic, momentum, chained):
    """``inject_hyperparams`` keeps the learning rate (and momentum) in the optimiser state;
    the profile holds them (they are not dynamics), so sigma^theta equals that of the factory
    form, where they are fields: the norm of the step's matrix. Differentiating them too
    would add an identity block (sigma^theta >= 1 where the step contracts)."""
    eta, theta0, key = 0.3, jnp.array([1.0, -1.0, 2.0]), jax.random.key(0)
    field_form = lspsde.Optax(optax.sgd, learning_rate=eta, momentum=momentum)
    injected = optax.inject_hyperparams(optax.sgd)(learning_rate=eta, momentum=momentum)
    state_form = lspsde.Optax(optax.chain(injected) if chained else injected)
    profiles = [
        lspsde.learning_profile((quadratic, flow, lspsde.NoNoise()), theta0, key=key, n_steps=5)
        for flow in (field_form, state_form)
    ]
    np.testing.assert_allclose(profiles[1].sigma_theta, profiles[0].sigma_theta, rtol=1e-6)
    np.testing.assert_allclose(profiles[1].log_cum_theta, profiles[0].log_cum_theta, rtol=1e-6)
    H = np.diag(H_DIAG)
    if momentum is None:  # theta' = (I - eta H) theta: a contraction, ||.|| = 0.85
        M = np.eye(3) - eta * H
        assert np.linalg.norm(M, 2) < 1
    else:  # optax's trace on the state (theta, m): m' = H theta + beta m, theta' = theta - eta m'
        b = momentum
        M = np.block([[np.eye(3) - eta * H, -eta * b * np.eye(3)], [H, b * np.eye(3)]])
    np.testing.assert_allclose(profiles[1].sigma_theta, np.linalg.norm(M, 2), rtol=1e-6)
    mask = state_form.differentiated(state_form.init(theta0))
    assert not any(_injected_hyperparams(mask))


def _injected_hyperparams(mask):
    """The mask's entries for the injected hyperparameters, wherever the state holds them."""
    found = []
    for node in jax.tree.leaves(
        mask.opt_state, is_leaf=lambda n: isinstance(n, optax.InjectStatefulHyperparamsState)
    ):
        if isinstance(node, optax.InjectStatefulHyperparamsState):
            found.extend(jax.tree.leaves(node.hyperparams))
    assert found, "no injected state found"
    return found


def test_spectral_norm_tracking_reads_theta_of_a_stateful_flow():
    W0 = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)))
    A = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)))

    class Fit(lspsde.AbstractObjective):
        target: jax.Array

        def loss(self, theta):
            return 0.5 * jnp.sum((theta["W"] - self.target) ** 2)

    system = LearningSystem(Fit(A), lspsde.HeavyBall(0.1, 0.5), lspsde.IsotropicGaussian(0.1))
    key = jax.random.key(0)
    tr = lspsde.lipschitz.spectral_norm_trajectory(
        system, {"W": W0}, key=key, n_steps=20, n_iter=30
    )
    states, _ = parameter_trajectory(system, {"W": W0}, key=key, n_steps=20)
    exact = [np.linalg.norm(np.asarray(W), 2) for W in states.theta["W"]]
    np.testing.assert_allclose(np.asarray(tr.sigma)[:, 0], exact, rtol=1e-8)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: lspsde.HeavyBall(0.1, 1.0), ValueError, "momentum"),
        (lambda: lspsde.HeavyBall(0.1, -0.1), ValueError, "momentum"),
        (lambda: lspsde.HeavyBall(0.1, "0.5"), TypeError, "momentum"),
        (lambda: lspsde.HeavyBall(0.0, 0.5), ValueError, "step_size"),
        (lambda: lspsde.Optax(optax.adam, learning_rate=-1e-3), ValueError, "learning_rate"),
        (lambda: lspsde.Optax(optax.adam, learning_rate=1e-3, b1=1.0), ValueError, "b1"),
        (lambda: lspsde.Optax(optax.adam, learning_rate=1e-3, eps=-1.0), ValueError, "eps"),
        (
            lambda: lspsde.Optax(optax.adamw, learning_rate=1e-3, weight_decay=-0.1),
            ValueError,
            "weight_decay",
        ),
        (lambda: lspsde.Optax(optax.rmsprop, learning_rate=1e-3, decay=1.5), ValueError, "decay"),
        (lambda: lspsde.Optax(optax.adam, lr=1e-3), TypeError, "no hyperparameter"),
        (lambda: lspsde.Optax("adam"), TypeError, "GradientTransformation"),
        (lambda: lspsde.Optax(optax.adam(1e-3), learning_rate=1e-3), TypeError, "either"),
        (lambda: lspsde.Optax(optax.adam, learning_rate=1j), TypeError, "learning_rate"),
        (lambda: lspsde.Optax(optax.adam), ValueError, "fails"),  # no learning rate
    ],
)
def test_bad_hyperparameters_are_refused_with_the_fix(build, error, match):
    with pytest.raises(error, match=match):
        build()
