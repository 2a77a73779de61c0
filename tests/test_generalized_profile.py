"""The generalised Learning Stability Profile (Definition 6.1) and the generalised exponents
(Definition 6.2): Clarke signatures beside autodiff's, against closed forms at kinks, equal to
autodiff's off them (Lemma A.1)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lspsde
from lspsde.nonsmooth import L1, Ball, Box, ElasticNet, ProjectedGradient, ProximalGradient, Simplex
from lspsde.profile import (
    GeneralizedExponents,
    generalized_exponents,
    generalized_representation_profile,
)
import models

KEY = jax.random.key(0)


def _spd(d=4, low=0.5, high=3.0, seed=0):
    Q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    lam = np.linspace(low, high, d)
    return Q @ np.diag(lam) @ Q.T, lam


# --- depth: ReLU networks at their kinks -----------------------------------------------------


def test_relu_at_every_kink_gives_norm_W_where_autodiff_gives_zero():
    """The zero probe of a network without biases: every unit of both layers is at its kink
    (pre-activation exactly 0), so sigma^{x,C}_k = ||W_k||_2 (D = I), exactly, while autodiff's
    relu'(0) = 0 gives 0; the chain-rule bound of the cumulative block is ||W_1|| ||W_0||."""
    rng = np.random.default_rng(1)
    W0, W1 = rng.normal(size=(5, 5)), rng.normal(size=(3, 5))
    probes = jnp.zeros((2, 5))
    net = lspsde.Feedforward([W0, W1], [np.zeros(5), np.zeros(3)], activation="relu")
    data = jnp.asarray(rng.normal(size=(8, 5)))
    objective = lspsde.SupervisedLoss(net, data, jnp.zeros((8, 3)))
    system = lspsde.LearningSystem(objective, lspsde.SGD(1e-3), representation=net, probes=probes)
    prof = lspsde.learning_profile(
        system, lspsde.parameters(net), key=KEY, n_steps=2, method="dense", generalized=True
    )
    g = prof.generalized
    norms = [np.linalg.norm(W0, 2), np.linalg.norm(W1, 2)]
    np.testing.assert_allclose(g.sigma_x[0], norms, rtol=1e-12)
    np.testing.assert_array_equal(prof.sigma_x[0], [0.0, 0.0])  # ||0 * W_k||
    assert bool(np.all(g.exact_x[0])) and list(np.asarray(g.n_kinks_x[0])) == [10, 6]
    np.testing.assert_allclose(g.cum_x[0], np.cumprod(norms), rtol=1e-12)
    # after a step the biases moved (all but those of units dead on every training input,
    # which get no gradient): fewer kinks, and where none is left Clarke = autodiff
    nk = np.asarray(g.n_kinks_x)
    assert 0 < nk[1:].sum(axis=1).max() < nk[0].sum()
    smooth = nk[1:] == 0
    np.testing.assert_allclose(
        np.asarray(g.sigma_x[1:])[smooth], np.asarray(prof.sigma_x[1:])[smooth], rtol=1e-12
    )
    # the same numbers from the fixed-parameter function
    rep = generalized_representation_profile(net, probes)
    np.testing.assert_allclose(rep.sigma_x[0], norms, rtol=1e-12)
    np.testing.assert_array_equal(rep.autodiff, 0.0)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "hard_tanh", "tanh", "identity"])
def test_away_from_kinks_the_depth_blocks_are_autodiffs(activation):
    """Random probes (no pre-activation within tol of a kink): the Clarke norm of every layer
    is the classical one, the profile's autodiff block to 1e-12 (Lemma A.1)."""
    net = models.mlp(jax.random.key(3), (6, 8, 8, 4), activation=activation, rho=0.9)
    probes = jax.random.normal(jax.random.key(4), (5, 6))
    x = jax.random.normal(jax.random.key(5), (16, 6))
    objective = lspsde.SupervisedLoss(net, x, jnp.zeros((16, 4)))
    system = lspsde.LearningSystem(objective, lspsde.SGD(0.05), representation=net, probes=probes)
    prof = lspsde.learning_profile(
        system, lspsde.parameters(net), key=KEY, n_steps=3, method="dense", generalized=True
    )
    g = prof.generalized
    assert int(np.sum(g.n_kinks_x)) == 0 and g.exact
    np.testing.assert_allclose(g.sigma_x, prof.sigma_x, rtol=1e-12)
    assert np.all(np.asarray(g.cum_x) >= np.asarray(prof.cum_x) * (1 - 1e-12))  # a bound
    # SGD on this (locally smooth) loss: the parameter blocks are autodiff's, bit for bit
    np.testing.assert_array_equal(g.sigma_theta, prof.sigma_theta)
    np.testing.assert_array_equal(g.sigma_u, prof.sigma_u)
    # the chain piece used for the layer reproduces the network's own layer
    rep = generalized_representation_profile(net, probes)
    np.testing.assert_allclose(rep.sigma_x, rep.autodiff, rtol=1e-12)
    np.testing.assert_allclose(rep.sigma_x.max(axis=0), g.sigma_x[0], rtol=1e-12)


# --- parameter blocks of proximal and projected flows at their kinks -------------------------


def test_lasso_prox_at_a_kink_is_the_sup_over_the_hull():
    """theta0 = theta* of L with every coordinate at +-eta*lam: the gradient step is the
    identity on theta0 and lands every coordinate on a kink of soft-thresholding, so
    sigma^{theta,C}_0 = sup_D ||D (I - eta H)|| = max_i |1 - eta lambda_i| (D = I) and
    sigma^{u,C}_0 = eta, exact; autodiff takes jnp.maximum's tie slope 1/2: half of each."""
    H, lam_H = _spd()
    eta, lam = 0.25, 0.5
    tau = eta * lam
    signs = np.array([1.0, -1.0, 1.0, 1.0])
    objective = models.Quadratic(H, jnp.asarray(tau * signs))
    system = lspsde.LearningSystem(objective, ProximalGradient(eta, L1(lam)))
    prof = lspsde.learning_profile(
        system, objective.theta_star, key=KEY, n_steps=3, method="dense", generalized=True
    )
    g = prof.generalized
    closed = np.max(np.abs(1 - eta * lam_H))
    np.testing.assert_allclose(g.sigma_theta[0], closed, rtol=1e-12)
    np.testing.assert_allclose(g.sigma_u[0], eta, rtol=1e-12)
    assert bool(g.exact_theta[0]) and int(g.n_kinks_theta[0]) == 4
    np.testing.assert_allclose(prof.sigma_theta[0], closed / 2, rtol=1e-12)  # autodiff's pick
    np.testing.assert_allclose(prof.sigma_u[0], eta / 2, rtol=1e-12)
    assert float(prof.sigma_theta[0]) < float(g.sigma_theta[0])  # autodiff understates
    # the chain-rule bounds dominate autodiff's cumulative sensitivities
    assert np.all(np.asarray(g.log_cum_theta) >= np.asarray(prof.log_cum_theta) - 1e-12)
    assert np.all(np.asarray(g.log_cum_u) >= np.asarray(prof.log_cum_u) - 1e-12)


@pytest.mark.parametrize(
    "flow, closed",
    [
        # elastic net: soft-thresholding, then the shrinkage 1 / (1 + eta l2)
        (ProximalGradient(0.25, ElasticNet(0.5, 2.0)), lambda M, a: np.linalg.norm(M, 2) / 1.5),
        # a box with a at its bounds: D = I is a vertex of the hull
        (
            ProjectedGradient(0.25, Box(-0.125, jnp.array([0.125, 1.0, 0.125, 0.125]))),
            lambda M, a: np.linalg.norm(M, 2),
        ),
        # a ball with a on its sphere: the sup over {I, I - uu^T} composed with M
        (
            ProjectedGradient(0.25, Ball(0.0, 0.25)),
            lambda M, a: max(
                np.linalg.norm(M, 2),
                np.linalg.norm((np.eye(4) - np.outer(a, a) / (a @ a)) @ M, 2),
            ),
        ),
    ],
    ids=["elastic_net", "box", "ball"],
)
def test_prox_and_projections_at_kinks_against_closed_forms(flow, closed):
    H, _ = _spd(seed=1)
    a = np.array([0.125, -0.125, 0.125, 0.125])  # |a_i| = eta l1; on the box's bounds; |a| = r
    objective = models.Quadratic(H, jnp.asarray(a))
    prof = lspsde.learning_profile(
        lspsde.LearningSystem(objective, flow),
        objective.theta_star,
        key=KEY,
        n_steps=2,
        method="dense",
        generalized=True,
    )
    g = prof.generalized
    M = np.eye(4) - 0.25 * H
    assert int(g.n_kinks_theta[0]) >= 1 and bool(g.exact_theta[0])
    np.testing.assert_allclose(g.sigma_theta[0], closed(M, a), rtol=1e-12)
    assert float(prof.sigma_theta[0]) <= float(g.sigma_theta[0]) * (1 + 1e-12)


def test_simplex_projection_at_a_kink():
    """a = (1/2, 1/4, 1/4, 0) on the simplex: the gradient step fixes it, and coordinate 3 sits
    at the threshold tau = 0: the sup over the supports {0,1,2} and {0,1,2,3}."""
    H, _ = _spd(seed=2)
    a = np.array([0.5, 0.25, 0.25, 0.0])
    objective = models.Quadratic(H, jnp.asarray(a))
    prof = lspsde.learning_profile(
        lspsde.LearningSystem(objective, ProjectedGradient(0.25, Simplex())),
        objective.theta_star,
        key=KEY,
        n_steps=1,
        method="dense",
        generalized=True,
    )
    M = np.eye(4) - 0.25 * H

    def J(support):
        P = np.zeros((4, 4))
        idx = np.flatnonzero(support)
        P[np.ix_(idx, idx)] = np.eye(idx.size) - 1.0 / idx.size
        return P

    closed = max(np.linalg.norm(J(s) @ M, 2) for s in ([1, 1, 1, 0], [1, 1, 1, 1]))
    g = prof.generalized
    assert int(g.n_kinks_theta[0]) == 1 and bool(g.exact_theta[0])
    np.testing.assert_allclose(g.sigma_theta[0], closed, rtol=1e-12)


# --- off kinks: autodiff's numbers ---------------------------------------------------------------


@pytest.mark.parametrize(
    "flow",
    [
        ProximalGradient(0.3, L1(0.05)),
        ProximalGradient(0.3, ElasticNet(0.05, 0.5)),
        ProjectedGradient(0.3, Ball(jnp.array([0.5, 0.0, 0.0, -0.5]), 0.7)),
        ProjectedGradient(0.3, Box(-0.2, 0.4)),
        ProjectedGradient(0.3, Simplex()),
    ],
    ids=["l1", "elastic_net", "ball", "box", "simplex"],
)
def test_stochastic_proximal_flows_off_kinks_equal_autodiff(flow):
    """Noisy steps from a generic start visit no kink (probability 0): the generalised blocks
    equal autodiff's dense ones to 1e-12, exactly."""
    H, _ = _spd(seed=3)
    objective = models.Quadratic(H, jnp.array([1.0, -0.5, 0.3, 0.2]))
    system = lspsde.LearningSystem(objective, flow, lspsde.IsotropicGaussian(0.3))
    prof = lspsde.learning_profile(
        system,
        jnp.array([0.7, 0.1, -0.4, 0.9]),
        key=KEY,
        n_steps=6,
        method="dense",
        generalized=True,
    )
    g = prof.generalized
    assert int(np.sum(g.n_kinks_theta)) == 0 and g.exact
    np.testing.assert_allclose(g.sigma_theta, prof.sigma_theta, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g.sigma_u, prof.sigma_u, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g.log_cum_theta[:2], prof.log_cum_theta[:2], rtol=1e-12)


def test_smooth_flows_are_autodiffs_bit_for_bit():
    H, _ = _spd(seed=4)
    objective = models.Quadratic(H, jnp.ones(4))
    for flow in (lspsde.SGD(0.2), lspsde.HeavyBall(0.1, 0.5)):
        system = lspsde.LearningSystem(objective, flow, lspsde.GaussianNoise(0.2, 0.1))
        prof = lspsde.learning_profile(system, jnp.zeros(4), key=KEY, n_steps=5, generalized=True)
        g = prof.generalized
        np.testing.assert_array_equal(g.sigma_theta, prof.sigma_theta)
        np.testing.assert_array_equal(g.sigma_u, prof.sigma_u)
        assert g.exact and int(np.sum(g.n_kinks_theta)) == 0
    # generalized=False leaves the field empty and the smooth numbers unchanged
    plain = lspsde.learning_profile(system, jnp.zeros(4), key=KEY, n_steps=5)
    assert plain.generalized is None
    np.testing.assert_array_equal(plain.sigma_theta, prof.sigma_theta)


# --- Definition 6.2 through the exponent machinery ------------------------------------------


def test_generalized_exponents_definition_6_2_and_the_growth_rates():
    """Proximal gradient on a quadratic with eta L < 2, every step saved: Definition 6.2 as
    written is log(sup sigma)/(L + T); the chain-rule growth rate (stability_exponents of the
    generalised blocks) is the mean of log sigma_t, and bounds autodiff's growth rate."""
    H, lam_H = _spd(seed=5)
    eta = 1.5 / lam_H.max()
    objective = models.Quadratic(H, jnp.array([1.0, -1.0, 0.5, 0.2]))
    system = lspsde.LearningSystem(objective, ProximalGradient(eta, L1(0.1)))
    T = 12
    prof = lspsde.learning_profile(
        system, jnp.full(4, 2.0), key=KEY, n_steps=T, method="dense", generalized=True
    )
    ex = generalized_exponents(prof)
    assert isinstance(ex, GeneralizedExponents) and ex.alpha_x is None and ex.exact
    s = np.asarray(prof.generalized.sigma_theta)
    np.testing.assert_allclose(ex.alpha_theta, np.log(s.max()) / T, rtol=1e-12)
    np.testing.assert_allclose(ex.growth.alpha_theta, np.mean(np.log(s[:-1])), rtol=1e-12)
    smooth = lspsde.stability_exponents(prof)
    assert float(ex.growth.alpha_theta) >= float(smooth.alpha_theta) - 1e-12
    assert np.all(s <= 1 + 1e-12) and bool(ex.stable)  # eta < 2/L: sigma^{theta,C} <= 1
    # the definition as written tends to 0 with the horizon whatever the contraction
    assert np.log(s.max()) < float(ex.alpha_theta) <= 0
    # with steps left out, no chain-rule bound: NaN, and the Def. 6.2 values still there
    sparse = lspsde.learning_profile(
        system,
        jnp.full(4, 2.0),
        key=KEY,
        n_steps=T,
        save_every=4,
        method="dense",
        generalized=True,
    )
    assert np.all(np.isnan(sparse.generalized.log_cum_theta))
    assert np.isnan(float(generalized_exponents(sparse).growth.alpha_theta))


def test_generalized_exponents_with_a_network():
    """||W_k|| = rho: sigma^{x,C} <= rho, the growth rate (1/L) sum_k log sigma_k <= log rho,
    while Definition 6.2 as written, log(sup sigma)/(L + T), lies above log rho."""
    rho, depth = 0.8, 4
    net = models.mlp(jax.random.key(6), (6,) * (depth + 1), rho=rho)
    probes = jnp.concatenate([jnp.zeros((1, 6)), jax.random.normal(KEY, (4, 6))])  # 0: kinks
    x = jax.random.normal(jax.random.key(7), (8, 6))
    system = lspsde.LearningSystem(
        lspsde.SupervisedLoss(net, x, jnp.zeros((8, 6))),
        lspsde.SGD(1e-3),
        representation=net,
        probes=probes,
    )
    prof = lspsde.learning_profile(
        system, lspsde.parameters(net), key=KEY, n_steps=1, method="dense", generalized=True
    )
    ex = generalized_exponents(prof)
    g = prof.generalized
    np.testing.assert_allclose(g.sigma_x[0], rho, rtol=1e-12)  # the zero probe: every kink
    assert np.all(np.asarray(g.sigma_x) <= rho * (1 + 1e-3))
    assert np.all(np.asarray(ex.growth.alpha_x) <= np.log(rho) + 1e-3)
    np.testing.assert_allclose(ex.alpha_x, np.log(float(g.sigma_x.max())) / (depth + 1))
    assert float(ex.alpha_x) > np.log(rho)


# --- bad input: clear errors before anything is compiled --------------------------------------


class _Custom(lspsde.AbstractRegularizer):
    def prox(self, x, step):
        return x

    def value(self, x):
        return jnp.zeros(())


def test_generalized_bad_input():
    objective = models.Quadratic(jnp.eye(2), jnp.zeros(2))
    optax = pytest.importorskip("optax")
    run = lambda system, **kw: lspsde.learning_profile(
        system, jnp.ones(2), key=KEY, n_steps=2, generalized=True, **kw
    )
    residual = lspsde.Residual([lambda x: jnp.tanh(x)], 0.1)
    cases = [
        (
            lambda: run(lspsde.LearningSystem(objective, lspsde.Optax(optax.adam(0.1)))),
            TypeError,
            r"cannot classify the kinks of Optax.*ProximalGradient",
        ),
        (
            lambda: run(lspsde.LearningSystem(objective, ProximalGradient(0.1, _Custom()))),
            TypeError,
            r"prox of _Custom; supported: L1",
        ),
        (
            lambda: run(
                lspsde.LearningSystem(
                    objective, lspsde.SGD(0.1), representation=residual, probes=jnp.ones((1, 2))
                )
            ),
            TypeError,
            r"Feedforward.*Residual representation",
        ),
        (
            lambda: run(lspsde.LearningSystem(objective, lspsde.SGD(0.1)), tol=-1e-3),
            ValueError,
            r"`tol` must be finite and non-negative",
        ),
        (
            lambda: run(lspsde.LearningSystem(objective, lspsde.SGD(0.1)), max_kinks=-1),
            ValueError,
            r"`max_kinks` must be >= 0",
        ),
        (
            lambda: lspsde.learning_profile(
                lspsde.LearningSystem(objective, lspsde.SGD(0.1)),
                jnp.ones(2),
                key=KEY,
                n_steps=2,
                generalized="yes",
            ),
            TypeError,
            r"`generalized` must be True or False",
        ),
        (
            lambda: generalized_representation_profile(residual, jnp.ones((1, 2))),
            TypeError,
            r"Feedforward network, got Residual",
        ),
    ]
    for i, (build, error, match) in enumerate(cases):
        with pytest.raises(error, match=match):
            build()
            pytest.fail(f"case {i} ({match!r}) did not raise")
    plain = lspsde.learning_profile(
        lspsde.LearningSystem(objective, lspsde.SGD(0.1)), jnp.ones(2), key=KEY, n_steps=2
    )
    for call in (lambda: generalized_exponents(plain), plain.generalized_profile):
        with pytest.raises(ValueError, match=r"learning_profile\(\.\.\., generalized=True\)"):
            call()


def test_generalized_profile_is_a_plain_profile():
    """StabilityProfile.generalized_profile() is an ordinary profile (its blocks the generalised
    ones), so to_datatree and stability_exponents take it."""
    objective = models.Quadratic(jnp.diag(jnp.array([0.5, 2.0])), jnp.zeros(2))
    prof = lspsde.learning_profile(
        lspsde.LearningSystem(objective, ProjectedGradient(0.4, Ball(0.0, 0.5))),
        jnp.ones(2),
        key=KEY,
        n_steps=4,
        generalized=True,
    )
    gp = prof.generalized_profile()
    assert gp.generalized is None and isinstance(gp, lspsde.StabilityProfile)
    tree = lspsde.to_datatree(gp)
    assert "sigma_theta" in tree["profile"]
    assert eqx.tree_equal(gp.steps, prof.steps)
