"""Non-smooth flows (Section 6): proximal operators, projections, proximal / projected gradient
against closed forms."""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lspsde
from lspsde.nonsmooth import (
    L1,
    L2,
    Affine,
    Ball,
    Box,
    ElasticNet,
    Elementwise,
    MaxPool,
    ProjectedGradient,
    ProximalGradient,
    Simplex,
    generalized_jacobian_norm,
)
import models

KEY = jax.random.key(0)


def _soft(x, tau):
    return np.sign(x) * np.maximum(np.abs(x) - tau, 0.0)


def _lasso(n=30, d=8, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, d))
    theta_true = rng.normal(size=d) * (rng.random(d) < 0.5)
    b = A @ theta_true + 0.1 * rng.normal(size=n)
    return models.LeastSquares(A, b)


# --- proximal operators and projections -----------------------------------------------------


def test_prox_closed_forms_on_a_pytree():
    x = {"w": jnp.array([[0.3, -2.0], [1.5, 0.05]]), "b": jnp.array([-0.7])}
    flat = np.array([0.3, -2.0, 1.5, 0.05, -0.7])
    eta, lam, mu = 0.5, 0.8, 3.0
    leaves = lambda t: np.concatenate([np.ravel(t["b"]), np.ravel(t["w"])])  # pytree order
    order = np.array([4, 0, 1, 2, 3])
    np.testing.assert_allclose(leaves(L1(lam).prox(x, eta)), _soft(flat, eta * lam)[order])
    np.testing.assert_allclose(leaves(L2(mu).prox(x, eta)), flat[order] / (1 + eta * mu))
    np.testing.assert_allclose(
        leaves(ElasticNet(lam, mu).prox(x, eta)), _soft(flat, eta * lam)[order] / (1 + eta * mu)
    )
    np.testing.assert_allclose(L1(lam).value(x), lam * np.abs(flat).sum())
    np.testing.assert_allclose(L2(mu).value(x), 0.5 * mu * (flat**2).sum())  # squared norm / 2
    np.testing.assert_allclose(
        ElasticNet(lam, mu).value(x), lam * np.abs(flat).sum() + 0.5 * mu * (flat**2).sum()
    )


def test_box_and_ball_projections():
    x = jnp.array([3.0, -4.0, 0.5])
    np.testing.assert_array_equal(Box(-1.0, 1.0).project(x), [1.0, -1.0, 0.5])
    box = Box(jnp.array([0.0, -np.inf, 1.0]), jnp.array([1.0, -5.0, np.inf]))  # one-sided bounds
    np.testing.assert_array_equal(box.project(x), [1.0, -5.0, 1.0])
    c = jnp.array([0.0, 0.0, 0.5])
    d = np.asarray(x - c)  # ||d|| = 5
    np.testing.assert_allclose(Ball(c, 2.5).project(x), c + d / 2, rtol=1e-15)
    np.testing.assert_array_equal(Ball(c, 6.0).project(x), x)  # inside: unchanged
    np.testing.assert_array_equal(Ball(c, 0.0).project(x), c)
    # Ball acts on the whole parameter vector, Box leaf by leaf
    tree = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    np.testing.assert_allclose(jax.tree.leaves(Ball(0.0, 1.0).project(tree)), [[0.6], [0.8]])
    bounds = Box({"a": jnp.array([0.0]), "b": jnp.array([5.0])}, {"a": 1.0, "b": 6.0})
    np.testing.assert_array_equal(jax.tree.leaves(bounds.project(tree)), [[1.0], [5.0]])
    assert bool(Ball(c, 2.5).contains(Ball(c, 2.5).project(x)))
    assert Ball(c, 2.5).value(x) == np.inf and Ball(c, 2.5).value(c) == 0.0


def _simplex_brute_force(v, r):
    """min ||x - v|| over the simplex by enumerating supports: on support S the KKT point is
    v_S - (sum v_S - r) / |S|; keep the feasible one closest to v."""
    best, best_dist = None, np.inf
    d = v.size
    for k in range(1, d + 1):
        for S in itertools.combinations(range(d), k):
            S = list(S)
            x = np.zeros(d)
            x[S] = v[S] - (v[S].sum() - r) / k
            if x.min() >= -1e-15 and np.sum((x - v) ** 2) < best_dist:
                best, best_dist = x, np.sum((x - v) ** 2)
    return best


def test_simplex_projection_known_examples_and_brute_force():
    P = Simplex()
    np.testing.assert_allclose(P.project(jnp.array([0.5, 0.5, 0.5])), [1 / 3] * 3, rtol=1e-15)
    np.testing.assert_allclose(P.project(jnp.array([2.0, 0.0, 0.0])), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(
        P.project(jnp.array([0.3, 0.2, -1.0])), [0.55, 0.45, 0.0], rtol=1e-14
    )
    # the flattened parameter vector: both leaves together sum to the radius
    tree = (jnp.array([0.5, 0.5]), jnp.array([[0.5]]))
    np.testing.assert_allclose(np.concatenate([np.ravel(a) for a in P.project(tree)]), [1 / 3] * 3)
    rng = np.random.default_rng(1)
    worst = 0.0
    for r in (1.0, 2.5):
        proj = eqx.filter_jit(Simplex(r).project)
        for _ in range(40):
            v = rng.normal(scale=2.0, size=6)
            got = np.asarray(proj(jnp.asarray(v)))
            worst = max(worst, np.max(np.abs(got - _simplex_brute_force(v, r))))
            assert got.min() >= 0 and abs(got.sum() - r) < 1e-13
            assert bool(Simplex(r).contains(jnp.asarray(got)))
    assert worst < 1e-13, worst


OPERATORS = {
    "box": Box(jnp.array([-1.0, 0.0, -np.inf, 0.5, -2.0]), 1.0).project,
    "ball": Ball(jnp.array([0.5, -0.5, 0.0, 1.0, 0.0]), 1.5).project,
    "simplex": Simplex().project,
    "simplex_r3": Simplex(3.0).project,
    "prox_l1": lambda x: L1(0.7).prox(x, 0.9),
    "prox_l2": lambda x: L2(2.0).prox(x, 0.9),
    "prox_elastic_net": lambda x: ElasticNet(0.7, 2.0).prox(x, 0.9),
    "prox_indicator_ball": lambda x: ProximalGradient(1.0, Ball(0.0, 1.0)).regularizer.prox(x, 5.0),
}


@pytest.mark.parametrize("name", list(OPERATORS))
def test_firmly_nonexpansive(name):
    """||Px - Py||^2 <= <Px - Py, x - y> on random pairs (and so ||Px - Py|| <= ||x - y||)."""
    P = eqx.filter_jit(eqx.filter_vmap(OPERATORS[name]))
    rng = np.random.default_rng(2)
    x, y = (jnp.asarray(rng.normal(scale=3.0, size=(500, 5))) for _ in range(2))
    dP = np.asarray(P(x) - P(y))
    lhs = np.sum(dP**2, axis=1)
    rhs = np.sum(dP * np.asarray(x - y), axis=1)
    assert np.all(lhs <= rhs + 1e-12 * (1 + rhs)), np.max(lhs - rhs)
    assert np.any(lhs > 0)  # not a degenerate (constant) operator


# --- proximal gradient against closed forms --------------------------------------------------


@pytest.mark.parametrize("s2", [1.0, 2.5])
def test_orthogonal_design_converges_to_soft_thresholding(s2):
    """With A^T A / n = s^2 I, L(theta) = s^2/2 ||theta - theta_ls||^2 + c, so the lasso
    minimiser is theta* = S_{lambda/s^2}(theta_ls) (theta_ls = A^T b / (n s^2))."""
    n, d, lam = 40, 10, 1.0
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.normal(size=(n, d)))
    A = np.sqrt(s2 * n) * Q
    b = A @ rng.normal(scale=1.5, size=d) + rng.normal(size=n)
    objective = models.LeastSquares(A, b)
    theta_ls = A.T @ b / (n * s2)
    expected = _soft(theta_ls, lam / s2)
    assert 0 < np.count_nonzero(expected) < d  # some coordinates thresholded, some not
    flow = ProximalGradient(0.3 / s2, L1(lam))
    ens = lspsde.simulate(
        (objective, flow, lspsde.NoNoise()), jnp.zeros(d), key=KEY, n_paths=1, n_steps=300,
        save="summary",
    )  # fmt: skip
    np.testing.assert_allclose(ens.final_theta[0], expected, atol=1e-12)
    assert np.array_equal(ens.final_theta[0] == 0, expected == 0)  # the exact support


def _energies(flow, objective, theta0, n_steps):
    ens = lspsde.simulate(
        (objective, flow, lspsde.NoNoise()), theta0, key=KEY, n_paths=1, n_steps=n_steps
    )
    thetas = ens.theta[0]
    return np.asarray(jax.vmap(lambda th: flow.energy(objective, th))(thetas)), thetas


@pytest.mark.parametrize("eta_L", [0.5, 1.0, 1.9])
def test_lasso_energy_nonincreasing_below_two_over_L(eta_L):
    """Phi = L + R decreases by at least (1/eta - L/2) ||theta^{t+1} - theta^t||^2."""
    objective = _lasso()
    L = float(objective.L)
    eta = eta_L / L
    phi, thetas = _energies(ProximalGradient(eta, L1(0.3)), objective, jnp.full(8, 2.0), 200)
    steps = np.sum(np.diff(np.asarray(thetas), axis=0) ** 2, axis=1)
    assert np.all(np.diff(phi) <= 1e-12 * np.abs(phi[:-1])), np.max(np.diff(phi))
    decrease = phi[:-1] - phi[1:]
    assert np.all(decrease >= (1 / eta - L / 2) * steps - 1e-12 * np.abs(phi[:-1]))
    assert phi[-1] < phi[0]


@pytest.mark.parametrize("eta_L", [2.2, 3.0])
def test_lasso_energy_not_monotone_beyond_two_over_L(eta_L):
    """At eta > 2/L the direction of L's top eigenvalue grows by |1 - eta L| > 1 per step:
    Phi increases (the failure the check must report)."""
    objective = _lasso()
    eta = eta_L / float(objective.L)
    phi, _ = _energies(ProximalGradient(eta, L1(0.3)), objective, jnp.full(8, 2.0), 60)
    assert np.sum(np.diff(phi) > 0) > 10
    assert phi[-1] > 10 * phi[0]


@pytest.mark.parametrize("eta_L", [0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
def test_sigma_theta_through_the_prox(eta_L):
    """sigma^theta_t = ||D_t (I - eta H)||_2 with D_t in {0,1}-diagonal: <= 1 for eta <= 2/L on a
    convex quadratic, and |1 - eta L| > 1 beyond, at a point where the prox is the identity map
    on every coordinate (D_0 = I)."""
    lam_H = np.array([0.5, 1.0, 2.0, 4.0])
    objective = models.Quadratic(jnp.diag(lam_H), jnp.array([1.0, -1.0, 0.05, 0.5]))
    eta = eta_L / lam_H.max()
    system = lspsde.LearningSystem(objective, ProximalGradient(eta, L1(0.05)))
    theta0 = jnp.array([5.0, -5.0, 5.0, 5.0])
    prof = lspsde.learning_profile(system, theta0, key=KEY, n_steps=8, method="dense")
    sigma = np.asarray(prof.sigma_theta)
    np.testing.assert_allclose(sigma[0], np.max(np.abs(1 - eta * lam_H)), rtol=1e-12)
    if eta_L <= 2.0:
        assert np.all(sigma <= 1 + 1e-12), sigma
    else:
        assert sigma[0] > 1.0
    # the same block directly: jax.jacobian of the step through soft-thresholding
    u0 = system.noise_at(KEY, 0, theta0)
    J = jax.jacobian(lambda th: system.parameter_map(0, th, u0))(theta0)
    np.testing.assert_allclose(np.linalg.norm(J, 2), sigma[0], rtol=1e-12)


def test_sigma_theta_through_a_ball_projection_matrix_free_and_closed_form():
    """Outside the ball, dP(y) = (r/n)(I - u u^T) (u = (y - c)/n, n = ||y - c||): sigma^theta_0
    = ||(r/n)(I - u u^T)(I - eta H)||_2 < 1, by Lanczos (the default) and densely."""
    H = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 3.0]])
    objective = models.Quadratic(H, jnp.array([3.0, -2.0, 1.0]))
    c, r, eta = np.array([0.5, 0.0, 0.0]), 0.7, 0.4
    system = lspsde.LearningSystem(objective, ProjectedGradient(eta, Ball(c, r)))
    theta0 = jnp.array([0.0, 0.5, -0.5])
    y = np.asarray(theta0) - eta * H @ (np.asarray(theta0) - [3.0, -2.0, 1.0])
    n = np.linalg.norm(y - c)
    u = (y - c) / n
    closed = np.linalg.norm((r / n) * (np.eye(3) - np.outer(u, u)) @ (np.eye(3) - eta * H), 2)
    sig = {
        m: np.asarray(
            lspsde.learning_profile(system, theta0, key=KEY, n_steps=4, method=m).sigma_theta
        )
        for m in ("auto", "dense")
    }
    assert n > r
    np.testing.assert_allclose(sig["dense"][0], closed, rtol=1e-12)
    np.testing.assert_allclose(sig["auto"], sig["dense"], rtol=1e-6)
    assert np.all(sig["dense"] <= 1.0)


# --- the paths SGD goes: simulate with noise, sweeps, exponent distributions ----------------


@pytest.mark.parametrize(
    "constraint",
    [Ball(jnp.array([0.5, 0.0, -0.5]), 0.8), Box(-0.2, jnp.array([0.1, 1.0, 0.3])), Simplex()],
    ids=["ball", "box", "simplex"],
)
def test_stochastic_projected_gradient_stays_feasible(constraint):
    objective = models.Quadratic(jnp.diag(jnp.array([1.0, 2.0, 3.0])), jnp.array([2.0, -1.0, 0.0]))
    noise = lspsde.IsotropicGaussian(1.0)
    run = lambda flow: lspsde.simulate(
        (objective, flow, noise), jnp.zeros(3), key=KEY, n_paths=16, n_steps=50
    )
    ens = run(ProjectedGradient(0.1, constraint))
    inside = jax.vmap(jax.vmap(constraint.contains))(ens.theta[:, 1:])
    assert bool(jnp.all(inside))
    assert float(jnp.std(ens.final_theta, axis=0).max()) > 1e-3  # the paths differ: noise acts
    # ProximalGradient with the constraint's indicator is the same flow
    same = run(ProximalGradient(0.1, constraint))
    np.testing.assert_array_equal(same.theta, ens.theta)


def test_sweep_over_step_sizes_and_weights_matches_plain_runs():
    objective = _lasso()
    etas = np.array([0.2, 1.0, 1.9]) / float(objective.L)
    sim = dict(key=KEY, n_paths=3, n_steps=30)
    noise = lspsde.IsotropicGaussian(0.2)
    theta0 = jnp.ones(8)
    sweep = lspsde.Sweep.of(lambda e: ProximalGradient(e, L1(0.3)), etas, name="step_size")
    grid = lspsde.simulate((objective, sweep, noise), theta0, **sim)
    assert grid.final_theta.shape == (3, 3, 8) and grid.grid_name == "step_size"
    for g, eta in enumerate(etas):
        plain = lspsde.simulate((objective, ProximalGradient(eta, L1(0.3)), noise), theta0, **sim)
        np.testing.assert_array_equal(grid.at(g).final_theta, plain.final_theta)
    weights = lspsde.Sweep(
        [ProximalGradient(0.5 / float(objective.L), ElasticNet(w, 0.1)) for w in (0.0, 0.5, 5.0)]
    )
    by_weight = lspsde.simulate((objective, weights, lspsde.NoNoise()), theta0, **sim)
    zeros = np.sum(np.asarray(by_weight.final_theta[:, 0]) == 0, axis=-1)
    assert zeros[0] == 0 and zeros[-1] == 8  # a large l1 weight zeroes every coordinate


def test_exponent_distribution_of_proximal_gradient_across_two_over_L():
    lam_H = np.array([0.5, 1.0, 2.0])
    objective = models.Quadratic(jnp.diag(lam_H), jnp.array([1.0, -1.0, 0.5]))
    sup, alpha = [], []
    for eta_L in (1.0, 1.9, 2.5):
        dist = lspsde.exponent_distribution(
            (
                objective,
                ProximalGradient(eta_L / lam_H.max(), L1(0.01)),
                lspsde.IsotropicGaussian(0.1),
            ),
            jnp.full(3, 3.0),
            key=KEY,
            n_paths=4,
            n_steps=10,
            method="dense",
        )
        sup.append(np.asarray(dist.sup_sigma_theta))
        alpha.append(np.asarray(dist.alpha_theta))
    sup, alpha = np.stack(sup), np.stack(alpha)  # (eta, path)
    assert np.all(sup[:2] <= 1 + 1e-12) and np.all(sup[2] > 1.0), sup
    assert np.all(alpha[:2] < 0) and np.all(alpha[2] > 0), alpha


class _CountingQuadratic(lspsde.AbstractObjective):
    """1/2 ||theta - 1||^2, counting how often `loss` is traced (only compilation traces it)."""

    traces: list = eqx.field(static=True)

    def loss(self, theta):
        self.traces.append(1)
        return 0.5 * jnp.sum((theta - 1.0) ** 2)

    def gradient(self, theta):
        return theta - 1.0


@pytest.mark.parametrize(
    "make",
    [
        lambda a: ProximalGradient(0.1 * a, ElasticNet(0.2 * a, a)),
        lambda a: ProjectedGradient(0.1 * a, Box(-a, jnp.full(3, a))),
        lambda a: ProjectedGradient(0.1 * a, Ball(jnp.full(3, a), a)),
        lambda a: ProximalGradient(0.1 * a, Simplex(a)),
    ],
    ids=["elastic_net", "box", "ball", "simplex"],
)
def test_new_hyperparameter_values_do_not_recompile(make):
    traces = []
    objective = _CountingQuadratic(traces)
    run = lambda a: lspsde.simulate(
        (objective, make(a), lspsde.IsotropicGaussian(0.3)), jnp.zeros(3), key=KEY, n_paths=2,
        n_steps=5,
    )  # fmt: skip
    first = run(1.0)
    n = len(traces)
    second = run(0.5)
    assert n > 0 and len(traces) == n, "a new step size / weight / bound recompiled"
    assert not np.array_equal(first.final_theta, second.final_theta)


# --- bad input: clear errors before anything is compiled --------------------------------------


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: L1(-0.1), ValueError, r"`weight` must be finite and non-negative.*-0\.1"),
        (lambda: L2(-2), ValueError, r"`weight` must be finite and non-negative"),
        (lambda: ElasticNet(0.1, -1.0), ValueError, r"`l2` must be finite and non-negative"),
        (lambda: L1(jnp.ones(3)), ValueError, r"one real number.*shape \(3,\).*Sweep"),
        (lambda: Box(1.0, 0.0), ValueError, r"empty: lower > upper.*Swap the bounds"),
        (
            lambda: Box(jnp.zeros(3), jnp.array([1.0, -1.0, 1.0])),
            ValueError,
            r"empty.*index \[\[1\]\].*lower \[0\.0\], upper \[-1\.0\]",
        ),
        (lambda: Box(jnp.zeros(2), jnp.ones(3)), ValueError, r"do not broadcast"),
        (lambda: Ball(0.0, -1.0), ValueError, r"`radius` must be finite and non-negative.*r >= 0"),
        (lambda: Simplex(0.0), ValueError, r"`radius` must be finite and positive"),
        (lambda: ProximalGradient(jnp.array([0.1, 0.2]), L1(0.1)), ValueError, r"scalar.*Sweep"),
        (lambda: ProximalGradient(-0.1, L1(0.1)), ValueError, r"`step_size` must be finite"),
        (lambda: ProjectedGradient(jnp.ones(2), Box(0, 1)), ValueError, r"scalar.*Sweep"),
        (lambda: ProjectedGradient(0.1, L1(0.1)), TypeError, r"constraint"),
    ],
)
def test_bad_input(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    "flow, match",
    [
        (ProjectedGradient(0.1, Box(jnp.zeros(2), jnp.ones(2))), r"Box does not fit"),
        (ProjectedGradient(0.1, Ball({"a": jnp.zeros(3)}, 1.0)), r"Ball does not fit"),
    ],
    ids=["box", "ball"],
)
def test_constraint_that_does_not_fit_theta_fails_before_compiling(flow, match):
    objective = models.Quadratic(jnp.eye(3), jnp.zeros(3))
    with pytest.raises(ValueError, match="(?s)" + match + r".*pytree of the parameters' structure"):
        lspsde.simulate(
            (objective, flow, lspsde.NoNoise()), jnp.zeros(3), key=KEY, n_paths=1, n_steps=2
        )


# --- Clarke generalised Jacobian norms ---------------------------------------------------------


def _full_rank_W(m=4, n=6, seed=5):
    return np.random.default_rng(seed).normal(size=(m, n))


def test_relu_at_every_kink_gives_the_norm_of_W_where_autodiff_gives_zero():
    W = _full_rank_W()
    x = np.random.default_rng(6).normal(size=6)
    res = generalized_jacobian_norm([Affine(W, -W @ x), Elementwise("relu")], x)
    np.testing.assert_allclose(res.value, np.linalg.norm(W, 2), rtol=1e-12)
    assert float(res.autodiff) == 0.0  # jax's relu'(0) = 0: ||0 * W|| = 0
    assert res.exact and res.n_kinks == 4
    # the B-subdifferential: Jacobians at x + eps*delta realise the vertices; their largest norm
    # is the value (all 2^4 sign patterns of W delta occur among the samples)
    f = lambda v: jax.nn.relu(W @ v - W @ x)
    deltas = np.random.default_rng(7).normal(size=(400, 6))
    norms = np.linalg.norm(np.asarray(jax.vmap(jax.jacobian(f))(x + 1e-6 * deltas)), 2, axis=(1, 2))
    assert max(norms) <= float(res.value) * (1 + 1e-12)
    np.testing.assert_allclose(max(norms), res.value, rtol=1e-12)


@pytest.mark.parametrize(
    "piece",
    [
        Elementwise("relu"),
        Elementwise("leaky_relu", slope=0.1),
        Elementwise("hard_tanh"),
        Elementwise("clip", lower=-0.5, upper=2.0),
        Elementwise("soft_threshold", threshold=0.3),
    ],
    ids=lambda p: p.kind,
)
def test_away_from_kinks_it_is_the_classical_norm(piece):
    W = _full_rank_W()
    x = np.random.default_rng(8).normal(size=6)
    chain = [Affine(W, jnp.full(4, 0.05)), piece, Affine(W.T)]
    res = generalized_jacobian_norm(chain, x)
    J = jax.jacobian(lambda v: W.T @ piece(W @ v + 0.05))(jnp.asarray(x))
    assert res.n_kinks == 0 and res.exact
    np.testing.assert_allclose(res.value, np.linalg.norm(J, 2), rtol=1e-12)
    np.testing.assert_allclose(res.autodiff, res.value, rtol=1e-12)


@pytest.mark.parametrize(
    "piece, at",
    [
        (Elementwise("leaky_relu", slope=0.2), 0.0),
        (Elementwise("hard_tanh"), 1.0),
        (Elementwise("soft_threshold", threshold=0.3), -0.3),
    ],
    ids=lambda p: getattr(p, "kind", ""),
)
def test_partial_kinks_against_vertex_closed_form(piece, at):
    """Two of four units at a kink: the sup over the 4 vertices of ||diag(d) W||, d the smooth
    slopes elsewhere, computed here by hand; and the sampled convex hull never exceeds it."""
    W = _full_rank_W()
    x = np.random.default_rng(9).normal(size=6)
    z = np.array([at, at, 2.5, -2.5])  # units 0, 1 at the kink, 2, 3 well away from it
    res = generalized_jacobian_norm([Affine(W, z - W @ x), piece], x)
    d_smooth = np.asarray(piece.slopes(jnp.asarray(z), 0.0)[0])
    lo, hi = (0.2, 1.0) if piece.kind == "leaky_relu" else (0.0, 1.0)
    vertices = []
    for a, b in itertools.product((lo, hi), repeat=2):
        d = d_smooth.copy()
        d[:2] = a, b
        vertices.append(np.linalg.norm(d[:, None] * W, 2))
    assert res.exact and res.n_kinks == 2
    np.testing.assert_allclose(res.value, max(vertices), rtol=1e-12)
    rng = np.random.default_rng(10)
    for _ in range(200):
        d = d_smooth.copy()
        d[:2] = rng.uniform(lo, hi, size=2)
        assert np.linalg.norm(d[:, None] * W, 2) <= float(res.value) * (1 + 1e-12)


def test_bounds_past_the_cap_across_layers_and_for_dependent_rows():
    W = _full_rank_W()
    x = np.random.default_rng(6).normal(size=6)
    relu_at_kinks = [Affine(W, -W @ x), Elementwise("relu")]
    capped = generalized_jacobian_norm(relu_at_kinks, x, max_kinks=3)  # 4 kinks > 3
    assert not capped.exact and capped.n_kinks == 4
    np.testing.assert_allclose(capped.value, np.linalg.norm(W, 2), rtol=1e-12)  # ||diag(1) W||
    # two kinked layers: the enumerated chain-rule sup, a bound below the product bound
    W2 = np.random.default_rng(11).normal(size=(3, 4))
    deep = [*relu_at_kinks, Affine(W2, jnp.zeros(3)), Elementwise("relu")]
    two = generalized_jacobian_norm(deep, x)
    product = generalized_jacobian_norm(deep, x, max_kinks=0)
    assert not two.exact and not product.exact and two.n_kinks == 7
    assert float(two.value) <= float(product.value) * (1 + 1e-12)
    np.testing.assert_allclose(product.value, np.linalg.norm(W2, 2) * np.linalg.norm(W, 2))
    # duplicated rows: relu(w.x), relu(w.x) can only switch together, so the chain-rule set
    # (independent slopes) is larger than the Clarke Jacobian: a bound
    Wd = np.vstack([W[:1], W[:1], W[1:2]])
    dup = generalized_jacobian_norm([Affine(Wd, -Wd @ x), Elementwise("relu")], x)
    assert not dup.exact and dup.n_kinks == 3
    np.testing.assert_allclose(dup.value, np.linalg.norm(Wd, 2), rtol=1e-12)
    # with tol = 0 a point 1e-12 from the kink is smooth; the default tol counts it
    near = [Affine(W, -W @ x + 1e-12), Elementwise("relu")]
    assert generalized_jacobian_norm(near, x, tol=0.0).n_kinks == 0
    assert generalized_jacobian_norm(near, x).n_kinks == 4


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: generalized_jacobian_norm(jnp.tanh, jnp.ones(2)), TypeError, r"Affine\(W, b\)"),
        (
            lambda: generalized_jacobian_norm([Affine(jnp.eye(2)), jax.nn.relu], jnp.ones(2)),
            TypeError,
            r"supported|kind in \('relu'",
        ),
        (lambda: Elementwise("gelu"), ValueError, r"Unknown elementwise kind 'gelu'.*relu"),
        (lambda: Elementwise("clip", lower=1.0, upper=1.0), ValueError, r"lower < upper"),
        (
            lambda: generalized_jacobian_norm(Elementwise("relu"), jnp.ones(2), tol=-1e-3),
            ValueError,
            r"`tol` must be finite and non-negative",
        ),
        (
            lambda: generalized_jacobian_norm(Affine(jnp.ones((2, 3))), jnp.ones(2)),
            ValueError,
            r"expects inputs of size 3, gets 2",
        ),
    ],
)
def test_generalized_norm_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- more Clarke pieces: max-pooling, ball and simplex projections ---------------------------


def _fd_jacobian(f, x, h=1e-7):
    """Central finite differences (exact for a map that is linear on [x - h, x + h]^n)."""
    x, f = np.asarray(x, dtype=float), jax.jit(f)
    cols = [(np.asarray(f(x + h * e)) - np.asarray(f(x - h * e))) / (2 * h) for e in np.eye(x.size)]
    return np.stack(cols, axis=1)


def _one_sided_norms(f, x, rng, n=300, eps=1e-4):
    """The norms of finite-difference Jacobians at x + eps * delta for random delta: the pieces
    of a piecewise-linear map met on every side of its kinks at x (the B-subdifferential)."""
    f = jax.jit(f)
    deltas = rng.normal(size=(n, np.size(x)))
    return np.array([np.linalg.norm(_fd_jacobian(f, x + eps * d), 2) for d in deltas])


def test_max_pool_at_ties_is_the_hull_of_the_selections():
    """Groups {0,1,2}, {3,4}, {5}, {6,7}: ties in the first two (3 x 2 = 6 vertices, the tied
    selections), none in the others. Closed form: max over the 6 selections of ||W[sel]||; the
    hull sampled never exceeds it; one-sided finite-difference Jacobians realise the vertices;
    autodiff (the average of the tied selections) lies inside."""
    rng = np.random.default_rng(20)
    W = rng.normal(size=(8, 8))
    x = rng.normal(size=8)
    z = np.array([1.0, 1.0, 1.0, -0.5, -0.5, 2.0, 0.3, -0.7])
    pool = MaxPool([[0, 1, 2], [3, 4], [5], [6, 7]])
    chain = [Affine(W, z - W @ x), pool]
    res = generalized_jacobian_norm(chain, x)
    assert res.exact and res.n_kinks == 2 and res.n_vertices == 6
    closed = max(np.linalg.norm(W[[a, b, 5, 6]], 2) for a in (0, 1, 2) for b in (3, 4))
    np.testing.assert_allclose(res.value, closed, rtol=1e-12)
    for _ in range(200):  # random points of the hull: convex weights on the tied rows
        w0, w1 = rng.dirichlet(np.ones(3)), rng.dirichlet(np.ones(2))
        V = np.stack([w0 @ W[:3], w1 @ W[3:5], W[5], W[6]])
        assert np.linalg.norm(V, 2) <= float(res.value) * (1 + 1e-12)
    f = lambda v: pool(W @ v + (z - W @ x))
    sided = _one_sided_norms(f, x, rng)
    np.testing.assert_allclose(sided.max(), res.value, rtol=1e-6)
    assert sided.max() <= float(res.value) * (1 + 1e-6)
    assert float(res.autodiff) < float(res.value)  # the average selection, inside the hull
    # away from ties: the classical norm of the selection
    smooth = generalized_jacobian_norm([Affine(W, rng.normal(size=8)), pool], x)
    assert smooth.exact and smooth.n_kinks == 0
    np.testing.assert_allclose(smooth.value, smooth.autodiff, rtol=1e-12)


def test_max_pool_windows_overlap_and_bounds():
    pool = MaxPool.windows(6, 3, stride=2)  # [0,1,2], [2,3,4]
    assert pool.groups == ((0, 1, 2), (2, 3, 4))
    np.testing.assert_array_equal(pool(jnp.arange(6.0)), [2.0, 4.0])
    assert MaxPool.windows(4, 2).groups == ((0, 1), (2, 3))
    # all-equal inputs: the tie sets {0,1,2} and {2,3,4} share input 2, but their difference
    # functionals e1-e0, e2-e0, e3-e2, e4-e2 are independent, so every combination of
    # selections is a nearby Jacobian: exact
    x = np.zeros(6)
    res = generalized_jacobian_norm(pool, x)
    assert res.n_kinks == 2 and res.n_vertices == 9 and res.exact
    np.testing.assert_allclose(res.value, np.sqrt(2.0), rtol=1e-12)  # both rows select input 2
    # past the cap: the closed-form bound (min of sqrt(cmax)||M|| and the row bound) >= value
    capped = generalized_jacobian_norm(pool, x, max_kinks=3)  # 9 > 2^3 vertices
    assert not capped.exact and float(capped.value) >= float(res.value) * (1 - 1e-12)
    np.testing.assert_allclose(capped.value, np.sqrt(2.0), rtol=1e-12)
    # through an affine map with dependent rows: an upper bound only
    W = np.random.default_rng(21).normal(size=(6, 3))
    dep = generalized_jacobian_norm([Affine(W, -W @ np.ones(3)), pool], np.ones(3))
    assert not dep.exact and dep.n_kinks == 2


def test_ball_projection_inside_outside_and_on_the_sphere():
    """Inside: I M; outside: (r/n)(I - uu^T) M; on the sphere the hull of both, its sup at one
    of the two: closed forms against one-sided finite differences on each side."""
    rng = np.random.default_rng(22)
    M, T = rng.normal(size=(4, 3)), rng.normal(size=(2, 4))
    c, r = np.array([0.5, -0.2, 0.1, 0.0]), 1.5
    ball = Ball(jnp.asarray(c), r)
    x = rng.normal(size=3)
    direction = rng.normal(size=4)
    u = direction / np.linalg.norm(direction)
    P = np.eye(4) - np.outer(u, u)
    for dist, expected in [
        (0.5 * r, np.linalg.norm(T @ M, 2)),
        (2.0 * r, 0.5 * np.linalg.norm(T @ P @ M, 2)),
        (r, max(np.linalg.norm(T @ M, 2), np.linalg.norm(T @ P @ M, 2))),
    ]:
        z = c + dist * u
        chain = [Affine(M, z - M @ x), ball, Affine(T)]
        res = generalized_jacobian_norm(chain, x)
        assert res.exact and res.n_kinks == (dist == r)
        np.testing.assert_allclose(res.value, expected, rtol=1e-12)
    f = lambda v: T @ ball.project(M @ v + (z - M @ x))
    inside = np.linalg.norm(_fd_jacobian(f, x - 1e-4 * np.linalg.pinv(M) @ u), 2)
    outside = np.linalg.norm(_fd_jacobian(f, x + 1e-4 * np.linalg.pinv(M) @ u), 2)
    np.testing.assert_allclose(max(inside, outside), res.value, rtol=1e-3)
    np.testing.assert_allclose(
        sorted([inside, outside]),
        sorted([np.linalg.norm(T @ M, 2), np.linalg.norm(T @ P @ M, 2)]),
        rtol=1e-3,
    )
    # a ball of radius 0 is a constant map
    zero = generalized_jacobian_norm([Affine(M), Ball(0.0, 0.0)], x)
    assert float(zero.value) == 0.0 and zero.exact


def _simplex_jacobian(support, n):
    S = np.zeros((n, n))
    idx = np.flatnonzero(support)
    S[np.ix_(idx, idx)] = np.eye(idx.size) - 1.0 / idx.size
    return S


def test_simplex_projection_supports_and_kinks():
    """z = (0.625, 0.375, 0.375, 0.125, -1): tau = 0.125, support {0,1,2} and coordinate 3 at
    the threshold: the Clarke set is the hull of the Jacobians on the supports {0,1,2} and
    {0,1,2,3} (closed form I_S - 11^T/|S|), realised by finite differences on both sides."""
    rng = np.random.default_rng(23)
    z = np.array([0.625, 0.375, 0.375, 0.125, -1.0])
    W = rng.normal(size=(5, 5))
    x = rng.normal(size=5)
    simplex = Simplex()
    chain = [Affine(W, z - W @ x), simplex]
    res = generalized_jacobian_norm(chain, x)
    s3, s4 = np.array([1, 1, 1, 0, 0], bool), np.array([1, 1, 1, 1, 0], bool)
    expected = max(np.linalg.norm(_simplex_jacobian(s, 5) @ W, 2) for s in (s3, s4))
    assert res.exact and res.n_kinks == 1 and res.n_vertices == 2
    np.testing.assert_allclose(res.value, expected, rtol=1e-12)
    f = lambda v: simplex.project(W @ v + (z - W @ x))
    sided = _one_sided_norms(f, x, rng, n=100)
    np.testing.assert_allclose(sided.max(), expected, rtol=1e-6)
    pieces = np.array([np.linalg.norm(_simplex_jacobian(s, 5) @ W, 2) for s in (s3, s4)])
    nearest = np.abs(sided[:, None] - pieces[None]).min(axis=1)
    assert np.all(nearest < 1e-6 * pieces.max())  # every side is one of the two pieces
    assert all(np.any(np.abs(sided - p) < 1e-6) for p in pieces)  # and both are met
    # off the kinks: the classical Jacobian, which autodiff gives too
    z2 = np.array([0.7, 0.4, 0.3, -0.5, -1.0])
    smooth = generalized_jacobian_norm([Affine(W, z2 - W @ x), simplex], x)
    J = _simplex_jacobian(np.array([1, 1, 1, 0, 0], bool), 5) @ W
    assert smooth.n_kinks == 0 and smooth.exact
    np.testing.assert_allclose([smooth.value, smooth.autodiff], np.linalg.norm(J, 2), rtol=1e-12)


def test_box_piece_with_per_coordinate_bounds():
    """A box with one-sided and per-coordinate bounds is the clip of each coordinate: at its
    bounds the diagonal slopes range over [0, 1], as Elementwise('clip')."""
    rng = np.random.default_rng(24)
    W = rng.normal(size=(4, 6))
    x = rng.normal(size=6)
    lower, upper = np.array([-1.0, 0.0, -np.inf, 2.0]), np.array([1.0, 0.5, 0.0, 2.0])
    z = np.array([1.0, 0.25, 0.0, 3.0])  # at the upper bound, inside, at the upper bound, flat
    res = generalized_jacobian_norm([Affine(W, z - W @ x), Box(lower, upper)], x)
    assert res.exact and res.n_kinks == 2  # coordinate 3 (lower = upper) is constant, no kink
    vertices = [np.linalg.norm(np.diag([a, 1.0, b, 0.0]) @ W, 2) for a in (0, 1) for b in (0, 1)]
    np.testing.assert_allclose(res.value, max(vertices), rtol=1e-12)


def test_prox_chain_reproduces_the_prox():
    theta = {"a": jnp.array([0.3, -2.0]), "b": jnp.array([[1.5]])}
    flat = jax.flatten_util.ravel_pytree(theta)[0]
    for term in (
        L1(0.7),
        L2(2.0),
        ElasticNet(0.7, 2.0),
        Box(-1.0, {"a": 1.0, "b": 0.5}),
        Ball(0.1, 1.0),
        Simplex(2.0),
    ):
        pieces = lspsde.nonsmooth.prox_chain(term, 0.9, theta)
        v = flat
        for p in pieces:
            v = p(v) if not isinstance(p, Box | Ball | Simplex) else p.project(v)
        expected = jax.flatten_util.ravel_pytree(term.prox(theta, 0.9))[0]
        np.testing.assert_allclose(v, expected, rtol=1e-14)
    with pytest.raises(TypeError, match=r"cannot be classified.*L1, L2, ElasticNet"):
        lspsde.nonsmooth.prox_chain(_MyRegularizer(), 0.1, theta)


class _MyRegularizer(lspsde.AbstractRegularizer):
    def prox(self, x, step):
        return x

    def value(self, x):
        return jnp.zeros(())


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: MaxPool([]), ValueError, r"at least one group"),
        (lambda: MaxPool([[0, 1], []]), ValueError, r"group 1 must be a non-empty list"),
        (lambda: MaxPool([[0, 0]]), ValueError, r"repeats an index"),
        (lambda: MaxPool([[0, -1]]), ValueError, r"negative indices \[-1\]"),
        (lambda: MaxPool([[0.5, 1.0]]), ValueError, r"integer indices"),
        (lambda: MaxPool.windows(3, 4), ValueError, r"exceeds the input size"),
        (
            lambda: generalized_jacobian_norm(MaxPool([[0, 5]]), jnp.ones(3)),
            ValueError,
            r"indexes input 5, but its input has size 3",
        ),
        (
            lambda: generalized_jacobian_norm(Ball({"a": jnp.zeros(2)}, 1.0), jnp.ones(3)),
            ValueError,
            r"Ball's `center`.*size 3",
        ),
        (
            lambda: generalized_jacobian_norm(Ball(jnp.zeros(2), 1.0), jnp.ones(3)),
            ValueError,
            r"Ball's `center`.*shape \(3,\), got \(2,\)",
        ),
        (
            lambda: generalized_jacobian_norm(Box(jnp.zeros(2), 1.0), jnp.ones(3)),
            ValueError,
            r"Box's `lower`",
        ),
        (
            lambda: generalized_jacobian_norm([Affine(jnp.eye(2)), L1(0.1)], jnp.ones(2)),
            TypeError,
            r"MaxPool\(groups\).*Ball\(center, radius\), Simplex\(radius\); got \['L1'\]",
        ),
        (
            lambda: generalized_jacobian_norm(Simplex(), jnp.ones(2), tol=-1.0),
            ValueError,
            r"`tol` must be finite and non-negative",
        ),
    ],
)
def test_new_pieces_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
