"""Variational energies (Section 6.4-6.6): Assumptions 3-4 and Theorem 6.4 on proximal and
projected flows and piecewise-linear networks, against closed forms."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lspsde
from lspsde.nonsmooth import (
    L1,
    Affine,
    Ball,
    CompositeEnergy,
    Elementwise,
    FunctionEnergy,
    ProjectedGradient,
    ProximalGradient,
    RepresentationEnergy,
    coercivity,
    composite_minimizer,
    energy_trace,
    generalized_jacobian_norm,
    mean_trace,
    prox_gradient_contraction,
    prox_gradient_decrease,
    step_signatures,
    sufficient_decrease,
    variational_dissipation,
    variational_stability,
)
import models

KEY = jax.random.key(0)


def _soft(x, tau):
    return np.sign(x) * np.maximum(np.abs(x) - tau, 0.0)


def _orthogonal_lasso(s2=1.0, lam=1.0, n=40, d=10, seed=3):
    """A^T A / n = s^2 I: L = s^2/2 ||theta - theta_ls||^2 + c, so theta* = S_{lam/s^2}(theta_ls)
    and Phi - Phi* = s^2/2 ||theta - theta*||^2 once the signs are those of theta*."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(n, d)))
    A = np.sqrt(s2 * n) * Q
    b = A @ rng.normal(scale=1.5, size=d) + rng.normal(size=n)
    theta_star = _soft(A.T @ b / (n * s2), lam / s2)
    assert 0 < np.count_nonzero(theta_star) < d  # some coordinates thresholded, some not
    return models.LeastSquares(A, b), theta_star


def _lasso_run(eta_L, n_steps=60, s2=1.0, lam=1.0):
    objective, theta_star = _orthogonal_lasso(s2, lam)
    flow = ProximalGradient(eta_L / float(objective.L), L1(lam))
    ens = lspsde.simulate(
        (objective, flow, lspsde.NoNoise()), jnp.full(10, 2.0), key=KEY, n_paths=1,
        n_steps=n_steps,
    )  # fmt: skip
    trace = energy_trace(CompositeEnergy.of(objective, flow, minimizer=theta_star), ens)
    return objective, flow, ens, trace


# --- Section 6.6: the sufficient decrease of proximal gradient -------------------------------


@pytest.mark.parametrize("eta_L", [0.25, 0.5, 1.0, 1.5, 1.9])
def test_lasso_sufficient_decrease_attains_the_closed_form(eta_L):
    """On an orthogonal design every step within one sign pattern is a step on a quadratic of
    curvature L, where Phi(theta) - Phi(theta^+) = (1/eta - L/2) ||theta^+ - theta||^2
    exactly: the closed form c_eta is attained (a step that changes signs decreases more).
    At eta = 1/L the first step lands on theta* (a sign-changing step): a strict bound."""
    objective, flow, _, trace = _lasso_run(eta_L)
    L = float(objective.L)
    c_eta = float(prox_gradient_decrease(flow.step_size(0), L))
    res = sufficient_decrease(trace, predicted=c_eta, rtol=1e-6)
    assert bool(res.holds) and bool(res.bound_holds)
    if eta_L == 1.0:
        assert int(res.n_steps_used) == 1 and float(res.rate) > 1.5 * c_eta
        return
    np.testing.assert_allclose(res.rate, c_eta, rtol=1e-9)  # tight
    np.testing.assert_allclose(c_eta, (1 / eta_L - 0.5) * L, rtol=1e-14)
    assert float(res.violating_fraction) == 0.0 and int(res.n_steps_used) >= 3


def test_sufficient_decrease_is_a_bound_on_a_general_design():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(30, 8))
    objective = models.LeastSquares(A, A @ rng.normal(size=8) + 0.1 * rng.normal(size=30))
    L = float(objective.L)
    for eta_L in (0.3, 1.0):
        flow = ProximalGradient(eta_L / L, L1(0.3))
        ens = lspsde.simulate(
            (objective, flow, lspsde.NoNoise()), jnp.full(8, 2.0), key=KEY, n_paths=1, n_steps=80
        )
        trace = energy_trace(CompositeEnergy.of(objective, flow), ens)  # Phi* not needed
        c_eta = float(prox_gradient_decrease(eta_L / L, L))
        res = sufficient_decrease(trace, predicted=c_eta)
        assert bool(res.holds) and bool(res.bound_holds)
        assert float(res.rate) > c_eta * (1 + 1e-3)  # curvature below L in some direction


@pytest.mark.parametrize("eta_L", [2.2, 3.0])
def test_sufficient_decrease_fails_beyond_two_over_L(eta_L):
    """Past 2/L the closed form is negative: Phi grows on some step, and the measured rate lies
    in [c_eta, 0). At 3/L the error doubles each step, the l1 term is soon negligible and
    c_eta is attained until the path diverges; its frozen tail is masked, its prefix counted.
    (At 2.2/L the iterates flip sign about theta* every step: the l1 term adds decrease.)"""
    objective, flow, ens, trace = _lasso_run(eta_L)
    c_eta = float(prox_gradient_decrease(flow.step_size(0), float(objective.L)))
    res = sufficient_decrease(trace, predicted=c_eta, rtol=1e-6)
    assert c_eta < 0 and not bool(res.holds) and not bool(res.holds_path[0])
    assert c_eta <= float(res.rate) < 0 and bool(res.bound_holds)
    assert float(res.violating_fraction) == 0.0
    if eta_L == 2.2:
        assert not bool(ens.diverged[0])
        return
    np.testing.assert_allclose(res.rate, c_eta, rtol=1e-6)
    assert bool(ens.diverged[0]) and float(res.diverged_fraction) == 1.0
    # the frozen tail is masked: the counted steps are the alive ones
    alive = np.asarray(ens.alive()[0])
    assert not np.asarray(trace.valid[0])[~alive].any() and (~alive).any()
    assert int(res.n_steps_used) <= int(alive.sum()) - 1


def test_at_two_over_L_the_decrease_is_exactly_zero():
    """eta = 2/L reflects every active coordinate about theta* (a 2-cycle): c_eta = 0, Phi
    constant, and no gamma > 0 exists (reported as not holding, not as a tiny positive rate)."""
    _, _, _, trace = _lasso_run(2.0)
    sd = sufficient_decrease(trace, predicted=0.0)
    a4 = variational_dissipation(trace)
    assert abs(float(sd.rate)) < 1e-12 and not bool(sd.holds) and bool(sd.bound_holds)
    assert abs(float(a4.rate)) < 1e-12 and not bool(a4.holds)


# --- Assumption 3: coercivity -----------------------------------------------------------------


def test_coercivity_of_a_quadratic_plus_ball_indicator_is_mu_over_two():
    """Phi = mu/2 ||theta - a||^2 + i_C with a in C: Phi - Phi* = mu/2 ||theta - a||^2 on C, so
    c1 = c2 = mu/2; the start outside C (Phi = +inf) is not admissible and is reported."""
    mu, a = 2.0, jnp.array([0.3, -0.2, 0.1])
    objective = models.Quadratic(mu * jnp.eye(3), a)
    flow = ProjectedGradient(0.2, Ball(0.0, 1.0))
    ens = lspsde.simulate(
        (objective, flow, lspsde.NoNoise()), jnp.array([2.0, 1.0, -1.0]), key=KEY, n_paths=1,
        n_steps=40,
    )  # fmt: skip
    res = coercivity(energy_trace(CompositeEnergy.of(objective, flow, minimizer=a), ens))
    np.testing.assert_allclose([res.c1, res.c2], mu / 2, rtol=1e-12)
    assert bool(res.holds) and int(res.n_outside_domain) == 1 and int(res.n_points) > 10


def test_coercivity_with_the_minimiser_on_the_sphere():
    """a outside the unit ball: theta* = a/|a|, and on the sphere <theta* - a, theta - theta*> =
    |a - theta*| |theta - theta*|^2 / (2r), so Phi - Phi* = mu/2 (1 + |a - theta*|/r)
    |theta - theta*|^2 exactly: projected gradient stays on the sphere, c1 = c2 = 3 mu/2."""
    mu, r = 2.0, 1.0
    a = jnp.array([3.0, 0.0, 0.0])
    objective = models.Quadratic(mu * jnp.eye(3), a)
    flow = ProjectedGradient(0.2, Ball(0.0, r))
    ens = lspsde.simulate(
        (objective, flow, lspsde.NoNoise()), jnp.array([0.6, 0.8, 0.0]), key=KEY, n_paths=1,
        n_steps=30,
    )  # fmt: skip
    np.testing.assert_allclose(np.linalg.norm(np.asarray(ens.theta[0]), axis=1), r, rtol=1e-14)
    energy = CompositeEnergy.of(objective, flow, minimizer=jnp.array([1.0, 0.0, 0.0]))
    trace = energy_trace(energy, ens)
    res = coercivity(trace, rtol=1e-5)
    np.testing.assert_allclose([res.c1, res.c2], mu / 2 * (1 + 2.0 / r), rtol=1e-9)
    # Theorem 6.4 here: both statements hold; the energy contracts by 1 - gamma/c2 = 1/9 per
    # step, the signatures (r/|y|)(1 - eta mu) tend to 1/3 from above, so on a finite horizon
    # alpha = mean log sigma_t sits above the energy's rate 1/2 log(1/9) (a transient: the
    # strict, qualitative claim holds, the energy's rate is no bound on alpha)
    thm = variational_stability(trace, step_signatures(objective, flow, ens), rtol=1e-5)
    assert bool(thm.statement_2) and bool(thm.statement_1_strict)
    assert all(bool(c.holds) for c in (thm.energy_implies_decay, thm.energy_implies_exponent))
    np.testing.assert_allclose(thm.energy_implies_exponent.predicted, np.log(1 / 3), rtol=1e-6)
    assert np.log(1 / 3) < float(thm.alpha_growth) < 0.99 * np.log(1 / 3)


def test_coercivity_of_the_lasso_attains_the_strong_convexity_bound():
    """Phi - Phi* >= mu/2 ||theta - theta*||^2 (0 in the subdifferential at theta*), attained
    once the signs are fixed; before, the l1 term adds more (c2 > c1)."""
    objective, _, _, trace = _lasso_run(0.5, s2=2.5)
    res = coercivity(trace, rtol=1e-6)
    np.testing.assert_allclose(res.c1, float(objective.mu) / 2, rtol=1e-9)
    assert float(res.c2) > 1.2 * float(res.c1) and bool(res.holds)


def test_coercivity_of_a_user_energy_on_one_trajectory():
    """E = lam ||theta||_1 (a FunctionEnergy) on theta^t = q^t v: E/N = lam |v|_1 / (q^t |v|^2),
    so c1 = lam|v|_1/|v|^2 and c2 = c1 / q^T: finite on every finite visited set, unbounded
    as T grows (an l1 energy is not coercive from above at its minimiser)."""
    lam, q, T = 0.7, 0.5, 12
    v = np.array([1.0, -2.0, 0.5])
    traj = {"w": jnp.asarray(q ** np.arange(T + 1)[:, None] * v)}
    energy = FunctionEnergy(lambda th: lam * jnp.sum(jnp.abs(th["w"])))
    res = coercivity(energy_trace(energy, traj))
    c1 = lam * np.abs(v).sum() / (v @ v)
    np.testing.assert_allclose([res.c1, res.c2], [c1, c1 / q**T], rtol=1e-12)


def test_composite_minimizer_reaches_soft_thresholding():
    objective, theta_star = _orthogonal_lasso(s2=2.5)
    got = composite_minimizer(objective, L1(1.0), jnp.zeros(10))
    np.testing.assert_allclose(got, theta_star, atol=1e-12)


# --- Theorem 6.4 both ways --------------------------------------------------------------------


def _theorem(eta_L):
    objective, flow, ens, trace = _lasso_run(eta_L)
    sig = step_signatures(objective, flow, ens)
    return objective, flow, ens, sig, variational_stability(trace, sig, rtol=1e-6)


def test_signatures_are_the_clarke_norms():
    """sigma_t = ||D_t (1 - eta s^2)||: soft-thresholding composed with an affine map, so
    generalized_jacobian_norm gives the same value at points off the kinks."""
    objective, flow, ens, sig, _ = _theorem(0.5)
    eta, lam = float(flow.step_size(0)), 1.0
    H = np.asarray(objective.A.T @ objective.A) / objective.A.shape[0]
    g0 = np.asarray(objective.A.T @ objective.b) / objective.A.shape[0]
    for t in (0, 1, 5):
        chain = [Affine(np.eye(10) - eta * H, eta * g0), Elementwise("soft_threshold",
                 threshold=eta * lam)]  # fmt: skip
        res = generalized_jacobian_norm(chain, ens.theta[0, t])
        assert res.exact
        np.testing.assert_allclose(sig[0, t], res.value, rtol=1e-12)


def test_theorem_6_4_on_a_stable_proximal_flow():
    """eta = L/2 on the orthogonal lasso: sigma_t = q = |1 - eta L| = 1/2 (the contraction of
    the step), A4 with gamma = (s^2/2)(1 - q^2) = 3/8 (attained once the signs are fixed),
    energy decay log(1/q^2) = log 4, and the converse energy sum_s N_s has c2 = 1/(1 - q^2)."""
    objective, flow, _, _, res = _theorem(0.5)
    L = float(objective.L)
    q = float(prox_gradient_contraction(flow.step_size(0), float(objective.mu), L))
    assert q == pytest.approx(0.5, rel=1e-12)
    np.testing.assert_allclose(res.sigma_sup, q, rtol=1e-12)
    np.testing.assert_allclose(res.alpha_growth, np.log(q), rtol=1e-12)
    assert bool(res.statement_1) and bool(res.statement_1_strict) and bool(res.statement_2)
    np.testing.assert_allclose(res.dissipation.rate, L / 2 * (1 - q**2), rtol=1e-8)
    np.testing.assert_allclose(res.coercivity.c1, L / 2, rtol=1e-8)
    np.testing.assert_allclose(res.decay_rate, -np.log(q**2), rtol=1e-8)
    for check in (res.energy_implies_decay, res.energy_implies_exponent):
        assert bool(check.premise) and bool(check.conclusion) and bool(check.holds)
    # (2) => decay: predicted -log(1 - gamma/c2) is below the measured log 4
    c2, gamma = float(res.coercivity.c2), float(res.dissipation.rate)
    np.testing.assert_allclose(res.energy_implies_decay.predicted, -np.log(1 - gamma / c2))
    assert float(res.energy_implies_decay.predicted) <= float(res.decay_rate)
    # (1) => (2): the Lyapunov sum's c2 is the one the signatures predict
    conv = res.stability_implies_energy
    assert bool(conv.premise) and bool(conv.conclusion) and bool(conv.holds)
    np.testing.assert_allclose([conv.measured, conv.predicted], 1 / (1 - q**2), rtol=1e-10)


def test_theorem_6_4_on_an_unstable_proximal_flow():
    """eta = 3/L: sigma_t = 2 every step (alpha = log 2 > 0) and Phi grows (gamma = (L/2)(1 -
    4) < 0): (1) and (2) both fail, so both directions hold. The theorem's literal (1), a
    uniform bound C_theta = 2 >= 1 on the one-step signatures, holds: read literally, it
    would assert an energy that cannot exist."""
    objective, _, ens, _, res = _theorem(3.0)
    L = float(objective.L)
    np.testing.assert_allclose(res.sigma_sup, 2.0, rtol=1e-12)
    np.testing.assert_allclose(res.alpha_growth, np.log(2.0), rtol=1e-12)
    assert not bool(res.statement_1) and not bool(res.statement_2)
    np.testing.assert_allclose(res.dissipation.rate, L / 2 * (1 - 4.0), rtol=1e-6)
    for check in (res.energy_implies_decay, res.energy_implies_exponent,
                  res.stability_implies_energy):  # fmt: skip
        assert not bool(check.premise) and bool(check.holds)
    assert bool(res.statement_1_literal)  # the counterexample to the literal statement
    assert float(res.alpha_sup) == pytest.approx(np.log(2.0) / 60)  # Def. 6.2: -> 0 as T grows
    assert bool(ens.diverged[0])


def test_theorem_6_4_boundary_non_strict_stability_has_no_energy():
    """eta = 2/L: sigma_t = 1 (alpha = 0, statement (1) as written) but the 2-cycle keeps N
    constant: no energy with gamma > 0 exists (E(a) > E(b) > E(a)). The equivalence holds
    only in its strict form (alpha < 0 <=> gamma > 0): (1) => (2) fails here."""
    _, _, _, _, res = _theorem(2.0)
    assert abs(float(res.alpha_growth)) < 1e-12 and bool(res.statement_1)
    assert not bool(res.statement_1_strict) and not bool(res.statement_2)
    conv = res.stability_implies_energy
    assert bool(conv.premise) and not bool(conv.conclusion) and not bool(conv.holds)
    assert float(conv.measured) == np.inf and float(conv.predicted) == np.inf


# --- piecewise-linear networks: the representation energy over depth -------------------------


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "identity"])
def test_representation_energy_decays_like_rho_to_the_2L(activation):
    """||W_k||_2 = rho, slopes in [0, 1]: E_k = 1/2 ||X_k||^2 <= rho^{2k} E_0 and Assumption 4
    over depth with gamma = (1 - rho^2)/2 (N = ||X_k||^2); a linear network with W_k = rho Q_k
    attains both."""
    rho, depth = 0.8, 6
    net = models.mlp(jax.random.key(1), (6,) * (depth + 1), activation=activation, rho=rho)
    probes = jax.random.normal(jax.random.key(2), (5, 6))
    trace = RepresentationEnergy(net, probes).depth_trace()
    E = np.asarray(trace.energy[0])
    bound = rho ** (2 * np.arange(depth + 1))
    assert np.all(E <= bound * E[0] * (1 + 1e-12))
    res = variational_dissipation(trace, predicted=(1 - rho**2) / 2)
    assert bool(res.holds) and bool(res.bound_holds)
    np.testing.assert_allclose([coercivity(trace).c1, coercivity(trace).c2], 0.5)
    if activation == "identity":
        np.testing.assert_allclose(E, bound * E[0], rtol=1e-12)
        np.testing.assert_allclose(res.rate, (1 - rho**2) / 2, rtol=1e-12)
    else:
        assert E[-1] < 0.5 * bound[-1] * E[0]


def test_representation_energy_with_biases_and_theorem_6_4_over_depth():
    """With biases, the energy of the difference of two probe sets decays like rho^{2k}; the
    Clarke signatures sup_V ||D W_k|| <= rho (Section 6.6) give alpha_x <= log rho, and
    Theorem 6.4 holds both ways over depth."""
    rho = 0.8
    net = models.mlp(jax.random.key(1), (6, 8, 8, 8, 4), init="spectral", rho=rho, bias_std=0.5)
    x = jax.random.normal(jax.random.key(2), (5, 6))
    y = x + 0.1 * jax.random.normal(jax.random.key(3), (5, 6))
    trace = RepresentationEnergy(net, x, reference=y).depth_trace()
    E = np.asarray(trace.energy[0])
    assert np.all(E <= rho ** (2 * np.arange(5)) * E[0] * (1 + 1e-12))
    xs = jax.vmap(net.trajectory)(x)
    sig = [
        max(
            float(generalized_jacobian_norm([Affine(W, b), Elementwise("relu")], xs[k][i]).value)
            for i in range(5)
        )
        for k, (W, b) in enumerate(zip(net.weights, net.biases, strict=True))
    ]
    assert max(sig) <= rho * (1 + 1e-12)
    res = variational_stability(trace, np.asarray(sig))
    assert float(res.alpha_growth) <= np.log(rho)
    assert bool(res.statement_1_strict) and bool(res.statement_2)
    for check in (res.energy_implies_decay, res.energy_implies_exponent,
                  res.stability_implies_energy):  # fmt: skip
        assert bool(check.premise) and bool(check.holds), check.statement
    # the energy's rate is not a bound on the signatures' exponent (suprema over directions)
    assert float(res.energy_implies_exponent.predicted) < float(res.alpha_growth)


def test_representation_energy_along_training_on_an_ensemble():
    net = models.mlp(jax.random.key(1), (3, 4, 2), rho=0.9, bias_std=0.3)
    x = jax.random.normal(jax.random.key(2), (6, 3))
    objective = lspsde.SupervisedLoss(net, x, jnp.zeros((6, 2)))
    ens = lspsde.simulate(
        (objective, lspsde.SGD(0.1), lspsde.IsotropicGaussian(0.05)), lspsde.parameters(net),
        key=KEY, n_paths=3, n_steps=5,
    )  # fmt: skip
    energy = RepresentationEnergy(net, x)
    trace = energy_trace(energy, ens)
    theta = jax.tree.map(lambda a: a[2, 4], ens.theta)
    direct = 0.5 * np.sum(np.asarray(jax.vmap(eqx.combine(theta, energy.structure))(x)) ** 2)
    np.testing.assert_allclose(trace.energy[2, 4], direct, rtol=1e-12)
    np.testing.assert_allclose(trace.energy, 0.5 * np.asarray(trace.norm_sq), rtol=1e-14)
    # the MSE objective to zero targets is exactly this energy (mean over probes)
    np.testing.assert_allclose(trace.energy, 6 * np.asarray(ens.loss), rtol=1e-12)


# --- stochastic projected gradient: divergence is data --------------------------------------


def _noisy_ball(threshold=1e8):
    """Projected SGD onto the ball |theta - c| <= 1, c = (2, 0, 0), minimiser a = (1.5, 0, 0)
    inside it, noise of total scale 2 (half the visited points are on the sphere)."""
    mu, eta, sigma = 1.0, 0.5, 2.0
    a = jnp.array([1.5, 0.0, 0.0])
    objective = models.Quadratic(mu * jnp.eye(3), a)
    flow = ProjectedGradient(eta, Ball(jnp.array([2.0, 0.0, 0.0]), 1.0))
    ens = lspsde.simulate(
        (objective, flow, lspsde.IsotropicGaussian(sigma)), a, key=KEY, n_paths=256, n_steps=40,
        divergence_threshold=threshold,
    )  # fmt: skip
    trace = energy_trace(CompositeEnergy.of(objective, flow, minimizer=a), ens)
    return (mu, eta, sigma), ens, trace


def test_stochastic_projected_gradient_masks_diverged_paths():
    """Paths that reach |theta| > 2.8 (the far side of the ball) are diverged (frozen) and never
    enter a statistic: the mean energy is the mean over the alive paths, c1 = c2 = mu/2 holds
    exactly at every visited point of C, and pathwise sufficient decrease fails (noise)."""
    (mu, _, _), ens, trace = _noisy_ball(threshold=2.8)
    alive = np.asarray(ens.alive())
    frac = float(ens.diverged.mean())
    assert 0.2 < frac < 0.8, frac
    on_sphere = np.abs(np.linalg.norm(np.asarray(ens.theta) - [2.0, 0, 0], axis=-1) - 1) < 1e-9
    assert on_sphere[alive].mean() > 0.2  # the projection is active
    np.testing.assert_array_equal(trace.valid, alive)
    E = np.asarray(trace.energy)
    manual = np.nansum(np.where(alive, E, np.nan), axis=0) / alive.sum(axis=0)
    np.testing.assert_allclose(trace.mean().mean, manual, rtol=1e-13)
    co = coercivity(trace)
    np.testing.assert_allclose([co.c1, co.c2], mu / 2, rtol=1e-12)
    assert int(co.n_masked) == int((~alive).sum()) > 0
    sd = sufficient_decrease(trace)
    assert not bool(sd.holds) and np.isfinite(float(sd.rate))
    late = np.asarray((ens.divergence_step < 0) | (ens.divergence_step > 1))
    assert np.all(np.isfinite(np.asarray(sd.rate_path)[late]))
    assert not np.asarray(sd.holds_path)[np.asarray(ens.diverged)].any()
    np.testing.assert_allclose(sd.diverged_fraction, frac)
    # a user energy that is NaN on part of the ball: those points are masked too
    nan_energy = FunctionEnergy(
        lambda th: mu / 2 * jnp.sum((th - jnp.array([1.5, 0, 0])) ** 2) + 0 * jnp.log(th[0] - 1.2),
        minimizer=jnp.array([1.5, 0.0, 0.0]),
    )
    nan_trace = energy_trace(nan_energy, ens)
    assert int((np.asarray(nan_trace.valid) != alive).sum()) > 0
    co_nan = coercivity(nan_trace)
    np.testing.assert_allclose([co_nan.c1, co_nan.c2], mu / 2, rtol=1e-12)
    assert np.all(np.isfinite(np.asarray(nan_trace.mean().mean)))
    tree = trace.to_datatree()
    assert tree["energy"]["energy"].dims == ("path", "step")
    np.testing.assert_array_equal(tree["energy"]["valid"].values, alive)


def test_assumption_4_in_expectation_for_stochastic_projected_gradient():
    """|P(y) - a| <= |y - a| (P non-expansive, P(a) = a), so E N_{t+1} <= q^2 E N_t + eta^2
    sigma^2 with q = 1 - eta mu: E Phi satisfies Assumption 4 in expectation with gamma =
    (mu/2)(1 - q^2) and R = (mu/2) eta^2 sigma^2 (with room: the projection is often active).
    With every path valid the pathwise rate is lspsde.dissipation_rate's."""
    (mu, eta, sigma), _, trace = _noisy_ball()
    q = 1 - eta * mu
    res = variational_dissipation(
        mean_trace(trace), remainder=mu / 2 * eta**2 * sigma**2, predicted=mu / 2 * (1 - q**2)
    )
    assert bool(res.holds) and bool(res.bound_holds), float(res.rate)
    assert float(res.rate) > 1.3 * mu / 2 * (1 - q**2)  # margin >> Monte Carlo error (~5%)
    pathwise = variational_dissipation(trace)
    reference = lspsde.dissipation_rate(trace.energy, trace.norm_sq)
    np.testing.assert_allclose(pathwise.rate, reference.gamma, rtol=1e-12)
    assert not bool(pathwise.holds)  # pathwise, the noise breaks the inequality with R = 0


# --- bad input: clear errors before anything is compiled ---------------------------------------


def _small():
    objective = models.Quadratic(jnp.eye(3), jnp.zeros(3))
    ens = lspsde.simulate(
        (objective, ProjectedGradient(0.1, Ball(0.0, 1.0)), lspsde.NoNoise()), jnp.ones(3) * 0.2,
        key=KEY, n_paths=2, n_steps=3,
    )  # fmt: skip
    trace = energy_trace(CompositeEnergy(objective, Ball(0.0, 1.0), jnp.zeros(3)), ens)
    return objective, ens, trace


class _NoConstants(lspsde.AbstractObjective):
    def loss(self, theta):
        return 0.5 * jnp.sum(theta**2)


def test_bad_input():
    objective, ens, trace = _small()
    energy = CompositeEnergy(objective, Ball(0.0, 1.0), jnp.zeros(3))
    depth = RepresentationEnergy(models.mlp(KEY, (2, 2)), jnp.ones((1, 2))).depth_trace()
    cases = [
        (lambda: FunctionEnergy(3.0), TypeError, r"`fn` must be a function.*CompositeEnergy"),
        (lambda: CompositeEnergy(objective, jnp.abs), TypeError, r"regulariser or constraint"),
        (lambda: CompositeEnergy(jnp.abs, L1(1.0)), TypeError, r"AbstractObjective"),
        (
            lambda: CompositeEnergy(objective, Ball(0.0, 1.0), jnp.full(3, 5.0)),
            ValueError,
            r"value\(minimizer\)` = inf is not finite.*inside the energy's domain",
        ),
        (
            lambda: CompositeEnergy(objective, Ball(jnp.zeros(2), 1.0), jnp.zeros(3)),
            ValueError,
            r"Ball does not fit",
        ),
        (lambda: CompositeEnergy.of(objective, lspsde.SGD(0.1)), TypeError, r"proximal"),
        (lambda: energy_trace(lambda th: th, ens), TypeError, r"FunctionEnergy\(fn\)"),
        (
            lambda: energy_trace(energy, dataclasses.replace(ens, theta=None, save="summary")),
            ValueError,
            r'save="summary".*save="trajectory"',
        ),
        (
            lambda: energy_trace(
                energy, dataclasses.replace(ens, grid=jnp.arange(2.0), grid_name="step_size")
            ),
            ValueError,
            r"sweep over `step_size`.*ensemble.at\(g\)",
        ),
        (lambda: energy_trace(energy, jnp.ones((4, 5))), ValueError, r"cannot be evaluated"),
        (lambda: energy_trace(energy, 3.0), TypeError, r"leading step axis"),
        (
            lambda: energy_trace(energy, {"a": jnp.ones((4, 3)), "b": jnp.ones((5, 3))}),
            ValueError,
            r"different leading \(step\) lengths \[4, 5\]",
        ),
        (
            lambda: energy_trace(FunctionEnergy(lambda th: th), jnp.ones((4, 3))),
            ValueError,
            r"FunctionEnergy.value must return one number.*returns \(3,\)",
        ),
        (
            lambda: sufficient_decrease(energy_trace(energy, jnp.zeros((3, 3)), steps=[0, 2, 4])),
            ValueError,
            r"saved every 2 steps: simulate with save_every=1",
        ),
        (lambda: sufficient_decrease(depth), ValueError, r"no step lengths.*depth"),
        (lambda: coercivity(ens), TypeError, r"takes an EnergyTrace"),
        (lambda: coercivity(trace, rtol=2.0), ValueError, r"`rtol` must be a number in \(0, 1\)"),
        (
            lambda: variational_stability(trace, jnp.ones(7)),
            ValueError,
            r"`signatures` must hold.*\(2, 4\) or \(2, 3\).*got \(7,\)",
        ),
        (lambda: variational_stability(trace, -jnp.ones((2, 4))), ValueError, r">= 0"),
        (
            lambda: variational_dissipation(trace, remainder=jnp.ones(5)),
            ValueError,
            r"`remainder` R must be one number or broadcast.*\(2, 3\)",
        ),
        (lambda: prox_gradient_decrease(-0.1, 1.0), ValueError, r"`step_size` must be finite"),
        (lambda: prox_gradient_contraction(0.1, 2.0, 1.0), ValueError, r"mu <= L"),
        (lambda: RepresentationEnergy(jnp.tanh, jnp.ones((1, 2))), TypeError, r"from_equinox"),
        (
            lambda: RepresentationEnergy(models.mlp(KEY, (2, 2)), jnp.ones(2)),
            ValueError,
            r"`probes` must be a batch.*probes=x\[None\]",
        ),
        (
            lambda: RepresentationEnergy(models.mlp(KEY, (2, 2)), jnp.ones((3, 2)), jnp.ones(2)),
            ValueError,
            r"`reference` must have the probes' shape \(3, 2\)",
        ),
        (
            lambda: composite_minimizer(_NoConstants(), L1(0.1), jnp.ones(2)),
            ValueError,
            r"does not know its smoothness L: pass `step_size`",
        ),
        (
            lambda: composite_minimizer(
                objective, L1(0.1), jnp.ones(3), step_size=0.01, max_steps=2
            ),
            ValueError,
            r"did not converge in max_steps=2",
        ),
    ]
    for i, (build, error, match) in enumerate(cases):
        with pytest.raises(error, match=match):
            build()
            pytest.fail(f"case {i} ({match!r}) did not raise")
