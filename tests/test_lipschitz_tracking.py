r"""Tracking $\sigma_1(W_l)$ along SGD (``lspsde.lipschitz.tracking``) against exact SVDs.

The network is a small tanh MLP (6 -> 24 -> 16 -> 3) trained by true minibatch SGD
(``MinibatchNoise(8, 64)``, $\eta = 0.02$, 100 steps; the loss halves). Its Gaussian layers get a
rank-one spike ($+0.8\,\sigma_1(W)\,u v^\top$), as trained layers have: their top singular
values stand out of the bulk ($\sigma_2/\sigma_1 \approx 0.77$-$0.92$ here). The reference is
NumPy's LAPACK SVD of every $W_l^t$ of ``parameter_trajectory`` (the same draws). Measured
(float64, this file's setting): warm-started with ``n_iter=2``, max relative error $4.6 \cdot
10^{-5}$, median $\sim 10^{-6}$; cold-started with the same ``n_iter``, max $0.3$-$0.45$ per
layer. (Without the spike, on the Marchenko–Pastur edge of Gaussian layers, $\sigma_2/\sigma_1
\approx 0.99$, warm ``n_iter=2`` errs by up to $\sim 10^{-3}$ at $\eta = 0.05$, and the
residual, up to 0.06, shows it.)
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lspsde
from lspsde.linalg import dense_jacobian_norm
from lspsde.lipschitz import tracking
from lspsde.objectives import SupervisedLoss, parameters
from lspsde.system import LearningSystem, parameter_trajectory
import models

N_STEPS = 100
WARM_RTOL = 3e-4  # max relative error of warm-started n_iter = 2, every layer, every step


class FiniteRegression(SupervisedLoss):
    """The supervised MSE loss as a finite sum, for ``MinibatchNoise``."""

    @property
    def n_examples(self):
        return self.inputs.shape[0]

    def per_example_loss(self, theta, i):
        return self.loss_fn(self.network(theta)(self.inputs[i]), self.targets[i])


def _spike(W, key):
    k1, k2 = jax.random.split(key)
    u = jax.random.normal(k1, (W.shape[0],))
    v = jax.random.normal(k2, (W.shape[1],))
    u, v = u / jnp.linalg.norm(u), v / jnp.linalg.norm(v)
    return W + 0.8 * jnp.linalg.norm(W, 2) * jnp.outer(u, v)


@pytest.fixture(scope="module")
def setup():
    k = jax.random.split(jax.random.key(0), 4)
    net = models.mlp(
        k[0], [6, 24, 16, 3], activation="tanh", init="gaussian", final_activation=False
    )
    spikes = jax.random.split(k[3], len(net.weights))
    spiked = tuple(_spike(W, s) for W, s in zip(net.weights, spikes, strict=True))
    net = eqx.tree_at(lambda m: m.weights, net, spiked)
    x = jax.random.normal(k[1], (64, 6))
    y = jax.random.normal(k[2], (64, 3))
    objective = FiniteRegression(net, x, y)
    system = LearningSystem(objective, lspsde.SGD(0.02), noise=lspsde.MinibatchNoise(8, 64))
    theta0 = parameters(net)
    key = jax.random.key(3)
    thetas, _ = parameter_trajectory(system, theta0, key=key, n_steps=N_STEPS)
    exact = np.stack(
        [np.linalg.svd(np.asarray(W), compute_uv=False)[:, 0] for W in thetas.weights], -1
    )
    return dict(system=system, theta0=theta0, key=key, thetas=thetas, exact=exact, x=x)


def test_warm_started_tracking_matches_exact_svd_at_every_step(setup):
    s = setup
    tr = lspsde.lipschitz.spectral_norm_trajectory(
        s["system"], s["theta0"], key=s["key"], n_steps=N_STEPS, n_iter=2
    )
    assert tr.layers == (".weights[0]", ".weights[1]", ".weights[2]")
    assert tr.sigma.shape == (N_STEPS + 1, 3) and tr.steps.shape == (N_STEPS + 1,)
    sigma = np.asarray(tr.sigma)
    err = np.abs(sigma / s["exact"] - 1)
    print(f"warm n_iter=2: max rel err {err.max():.2e}, median {np.median(err):.2e}")
    assert err.max() < WARM_RTOL, err.max()
    assert np.median(err) < 1e-5
    assert err[0].max() < 1e-9  # step 0 starts from converged Lanczos vectors
    # Rayleigh–Ritz values are lower bounds (up to rounding)
    assert np.all(sigma <= s["exact"] * (1 + 1e-12))
    # the loss went down: this is a training trajectory, the same one parameter_trajectory gives
    obj = s["system"].objective
    assert float(obj.loss(tr.final_theta)) < 0.7 * float(obj.loss(s["theta0"]))
    last = jax.tree.map(lambda a: a[-1], s["thetas"])
    for a, b in zip(jax.tree.leaves(last), jax.tree.leaves(tr.final_theta), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(tr.bound, np.prod(sigma, axis=1), rtol=1e-12)
    np.testing.assert_allclose(tr.log_bound, np.sum(np.log(sigma), axis=1), rtol=1e-12)
    assert float(tr.residual.max()) < 0.05 and np.all(np.isfinite(tr.residual))

    # Cold starts (a fresh random vector every step) with the same n_iter are far worse.
    cold = lspsde.lipschitz.spectral_norm_trajectory(
        s["system"], s["theta0"], key=s["key"], n_steps=N_STEPS, n_iter=2, warm_start=False
    )
    cold_err = np.abs(np.asarray(cold.sigma) / s["exact"] - 1)
    print(
        f"cold n_iter=2: max rel err {cold_err.max():.2e}, median {np.median(cold_err):.2e}; "
        f"residual max warm {float(tr.residual.max()):.2e}, cold {float(cold.residual.max()):.2e}"
    )
    assert cold_err.max() > 1e-2
    assert cold_err.max() > 100 * err.max()
    assert np.median(cold_err) > 100 * np.median(err)
    assert float(cold.residual.max()) > 10 * float(tr.residual.max())


def test_more_iterations_converge_further(setup):
    s = setup
    errs = []
    for n_iter in (1, 2, 3):
        tr = lspsde.lipschitz.spectral_norm_trajectory(
            s["system"], s["theta0"], key=s["key"], n_steps=N_STEPS, n_iter=n_iter
        )
        errs.append(np.abs(np.asarray(tr.sigma) / s["exact"] - 1).max())
    print("warm max rel err, n_iter = 1, 2, 3:", [f"{e:.2e}" for e in errs])
    assert errs[0] > errs[1] > errs[2]


def test_tracking_a_stored_trajectory_and_a_hand_written_loop(setup):
    s = setup
    along = lspsde.lipschitz.spectral_norms_along(s["thetas"], n_iter=2)
    err = np.abs(np.asarray(along.sigma) / s["exact"] - 1)
    assert along.sigma.shape == (N_STEPS + 1, 3) and err.max() < WARM_RTOL

    # one step at a time, as inside a user's own training loop
    vectors = lspsde.lipschitz.init_vectors(s["theta0"])
    for t in range(3):
        theta = jax.tree.map(lambda a: a[t], s["thetas"])
        norms, vectors = lspsde.lipschitz.spectral_norms(theta, vectors, n_iter=2)
        np.testing.assert_allclose(norms.sigma, s["exact"][t], rtol=WARM_RTOL)
    assert set(lspsde.lipschitz.weight_matrices(s["theta0"])) == {
        ".weights[0]",
        ".weights[1]",
        ".weights[2]",
    }


def test_vmap_over_paths_matches_one_path_at_a_time(setup):
    s = setup
    keys = jax.random.split(jax.random.key(9), 3)
    run = lambda k: lspsde.lipschitz.spectral_norm_trajectory(
        s["system"], s["theta0"], key=k, n_steps=5, n_iter=2
    )
    batched = jax.vmap(run)(keys)
    assert batched.sigma.shape == (3, 6, 3)
    for p in range(3):
        np.testing.assert_allclose(batched.sigma[p], run(keys[p]).sigma, rtol=1e-10)


def test_product_bound_dominates_the_data_dependent_lipschitz_estimate(setup):
    s = setup
    tr = lspsde.lipschitz.spectral_norm_trajectory(
        s["system"], s["theta0"], key=s["key"], n_steps=N_STEPS, n_iter=2
    )
    obj = s["system"].objective
    for theta, bound in ((s["theta0"], tr.bound[0]), (tr.final_theta, tr.bound[-1])):
        net = obj.network(theta)
        est = lspsde.lipschitz.lipschitz_estimate(net, s["x"], rtol=1e-10)
        assert bool(est.converged) and est.norms.shape == (64,)
        exact = float(dense_jacobian_norm(net, s["x"][int(est.index)]))
        np.testing.assert_allclose(est.value, exact, rtol=1e-8)
        assert float(est.value) == pytest.approx(float(jnp.max(est.norms)))
        # tanh is 1-Lipschitz: Lip(F) <= prod_l sigma_1(W_l); the tracked bound is a lower
        # bound of the product by at most WARM_RTOL per layer.
        print(f"Lipschitz estimate {float(est.value):.4f} <= tracked product {float(bound):.4f}")
        assert 0 < float(est.value) <= float(bound) * (1 + 3 * WARM_RTOL)


def test_bad_input_is_rejected_before_tracing(setup):
    s = setup
    system, theta0, key = s["system"], s["theta0"], s["key"]
    T = lspsde.lipschitz
    with pytest.raises(ValueError, match="no weight matrix"):
        T.weight_matrices({"b": jnp.zeros(3), "s": jnp.ones(())})
    with pytest.raises(ValueError, match="zero size"):
        T.weight_matrices({"w": jnp.zeros((0, 3)), "v": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="no weight matrix"):
        T.weight_matrices({"i": jnp.zeros((2, 2), int)})  # integer matrices are not layers
    with pytest.raises(ValueError, match="n_iter"):
        T.spectral_norm_trajectory(system, theta0, key=key, n_steps=3, n_iter=0)
    with pytest.raises(TypeError, match="n_iter"):
        T.spectral_norm_trajectory(system, theta0, key=key, n_steps=3, n_iter=1.5)
    with pytest.raises(ValueError, match="n_steps"):
        T.spectral_norm_trajectory(system, theta0, key=key, n_steps=0)
    with pytest.raises(TypeError, match="LearningSystem"):
        T.spectral_norm_trajectory(system.objective, theta0, key=key, n_steps=3)
    with pytest.raises(TypeError, match="warm_start"):
        T.spectral_norm_trajectory(system, theta0, key=key, n_steps=3, warm_start=1)
    with pytest.raises(TypeError, match="key"):
        T.spectral_norm_trajectory(system, theta0, key=3, n_steps=3)
    quadratic = LearningSystem(models.Quadratic(jnp.eye(2), jnp.zeros(2)), lspsde.SGD(0.1))
    with pytest.raises(ValueError, match="no weight matrix"):
        T.spectral_norm_trajectory(quadratic, jnp.ones(2), key=key, n_steps=3)
    vectors = T.init_vectors(theta0)
    with pytest.raises(ValueError, match="one per layer"):
        T.spectral_norms(theta0, vectors[:2])
    with pytest.raises(ValueError, match="input width"):
        T.spectral_norms(theta0, (vectors[0], vectors[2], vectors[1]))
    with pytest.raises(ValueError, match="leading step axis"):
        T.spectral_norms_along({"w": jnp.ones(())})
    net = system.objective.network(theta0)
    with pytest.raises(ValueError, match="inputs"):
        T.lipschitz_estimate(net, jnp.ones(6))
    with pytest.raises(ValueError, match="inputs"):
        T.lipschitz_estimate(net, jnp.ones((0, 6)))
    with pytest.raises(TypeError):
        T.lipschitz_estimate("net", s["x"])
    # a zero layer is not an error: sigma = 0, bound 0, log bound -inf, residual 0, no NaN
    zero = {"w": jnp.zeros((3, 2)), "v": jnp.eye(2)}
    norms, _ = T.spectral_norms(zero, T.init_vectors(zero))
    np.testing.assert_array_equal(norms.sigma, [1.0, 0.0])  # tree order: "v", then "w"
    assert float(norms.bound) == 0 and float(norms.log_bound) == -np.inf
    assert not np.any(np.isnan(norms.residual))


def test_tracking_module_exports():
    for name in tracking.__all__:
        assert getattr(lspsde.lipschitz, name) is getattr(tracking, name)
