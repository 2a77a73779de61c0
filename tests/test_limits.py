"""Continuous-time limits: coupling with SGD, exact OU moments, solver orders, exponents."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lspsde
from lspsde.limits import DEFAULT_SUBSTEPS, GradientFlow, NeuralODE, SGDLimit
import models

D = 3
LAM = jnp.array([0.5, 1.0, 2.0])
QUAD = models.Quadratic(jnp.diag(LAM), jnp.zeros(D))
THETA0 = jnp.array([1.0, -0.5, 0.25])


def _ou_second_moment(t, eta, sigma, lam=LAM, theta0=THETA0):
    r"""$\mathbb{E}\|\Theta_t\|^2$ of $d\Theta = -\Lambda\Theta dt + \sqrt\eta\sigma dW/\sqrt d$."""
    var = eta * sigma**2 / lam.size / (2 * lam) * -jnp.expm1(-2 * lam * t)
    return jnp.sum(jnp.exp(-2 * lam * t) * theta0**2 + var)


# -- coupling ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "noise",
    [
        lspsde.IsotropicGaussian(0.7),
        lspsde.AnisotropicGaussian(jnp.array([0.1, 0.5, 1.0])),
        lspsde.GaussianNoise(0.3, 0.8),
    ],
    ids=["isotropic", "anisotropic", "assumption1"],
)
def test_euler_maruyama_with_one_substep_is_sgd(noise):
    """Same key, same draws: EM with dt = eta reproduces SGD path by path (to rounding)."""
    key = jax.random.key(3)
    eta = 0.2
    kw = dict(key=key, n_paths=6, n_steps=40)
    sgd = lspsde.simulate((QUAD, lspsde.SGD(eta), noise), THETA0, **kw)
    em = lspsde.simulate((QUAD, SGDLimit(eta, dt=eta, solver=dfx.Euler()), noise), THETA0, **kw)
    np.testing.assert_allclose(em.theta, sgd.theta, rtol=0, atol=1e-13)
    # A finer limit path stays close to SGD on the same Brownian path (strong coupling) ...
    fine = lspsde.simulate((QUAD, SGDLimit(eta, solver=dfx.Euler()), noise), THETA0, **kw)
    gap = float(jnp.sqrt(jnp.mean(jnp.sum((fine.theta - sgd.theta) ** 2, -1))))
    # ... while an independent key does not (the Brownian paths really are shared).
    other = lspsde.simulate(
        (QUAD, SGDLimit(eta, solver=dfx.Euler()), noise), THETA0, **{**kw, "key": jax.random.key(4)}
    )
    gap_other = float(jnp.sqrt(jnp.mean(jnp.sum((other.theta - sgd.theta) ** 2, -1))))
    assert gap < 0.5 * gap_other


def test_brownian_increments_are_exact():
    """The sequential bridge: i.i.d. N(0, dt) sub-increments that sum to sqrt(eta) * SGD's draw,
    and what `step` integrates is exactly what `increments` returns."""
    eta, n = 0.3, 8
    limit = SGDLimit(eta, dt=eta / n, solver=dfx.Euler())
    noise = lspsde.IsotropicGaussian(1.0)
    keys = jax.random.split(jax.random.key(0), 20_000)
    draws = jax.vmap(lambda k: limit.draw(QUAD, noise, k, THETA0))(keys)
    W = np.asarray(jax.vmap(lambda u: limit.increments(noise, u).W)(draws))  # (paths, n, m)
    xi = np.asarray(jax.vmap(lambda k: noise.sample(k, THETA0))(keys))
    np.testing.assert_allclose(W.sum(axis=1), np.sqrt(eta) * xi, atol=1e-12)
    flat = W.reshape(len(keys), -1)
    cov = np.cov(flat, rowvar=False)
    se = np.sqrt(2.0 / len(keys)) * eta / n  # sd of a sample variance / covariance
    np.testing.assert_allclose(cov, eta / n * np.eye(flat.shape[1]), atol=5 * se)
    u = jax.tree.map(lambda a: a[0], draws)
    via_draw = limit.step(QUAD, noise, 0, THETA0, u)
    via_increments = limit.step(QUAD, noise, 0, THETA0, limit.increments(noise, u))
    np.testing.assert_allclose(via_draw, via_increments, rtol=1e-14, atol=1e-15)


def test_float32_step_sizes_count_substeps_exactly():
    """eta = 0.1 in float32 is 0.10000000149: dt = eta (or eta / 32) must still give 1 (32)."""
    with jax.enable_x64(False):
        assert SGDLimit(0.1, dt=0.1).n_substeps == 1
        assert SGDLimit(0.01, dt=0.01).n_substeps == 1
        assert SGDLimit(0.1, dt=0.1 / 32).n_substeps == 32
        assert SGDLimit(jnp.float32(0.1), dt=0.1 / 10).n_substeps == 10
    assert SGDLimit(0.1, dt=0.03).n_substeps == 4


# -- exact Ornstein-Uhlenbeck moments ---------------------------------------------------------


def _one_step_moments(limit, noise, eta):
    r"""Exact mean and covariance propagation of one step of a fixed-step scheme on the OU
    process (the scheme is linear in the state and in the Gaussian inputs)."""
    incs = limit.increments(noise, limit.draw(QUAD, noise, jax.random.key(0), THETA0))

    def step(y, W, H):
        return limit.step(QUAD, noise, 0, y, lspsde.limits.BrownianIncrements(W, H, None))

    A = jax.jacfwd(step)(THETA0, incs.W, incs.H)
    JW = jax.jacfwd(step, argnums=1)(THETA0, incs.W, incs.H).reshape(D, -1)
    delta = eta / limit.n_substeps
    Q = delta * JW @ JW.T
    if incs.H is not None:
        JH = jax.jacfwd(step, argnums=2)(THETA0, incs.W, incs.H).reshape(D, -1)
        Q = Q + delta / 12 * JH @ JH.T
    return A, Q


@pytest.mark.parametrize("solver", [None, dfx.Euler()], ids=["default-ShARK", "Euler"])
def test_default_step_is_accurate_on_ou(solver):
    """The scheme's own stationary covariance (computed exactly, no Monte Carlo) against the OU
    one: the default ShARK is within 1e-3 relative for lambda * eta <= 1; Euler-Maruyama's
    relative error is lambda * delta / 2 to leading order, as the docstring says."""
    eta, sigma = 0.5, 1.0  # lambda * eta in {0.25, 0.5, 1}
    noise = lspsde.IsotropicGaussian(sigma)
    limit = SGDLimit(eta, solver=solver)
    A, Q = _one_step_moments(limit, noise, eta)
    S = jnp.zeros((D, D))
    for _ in range(400):
        S = A @ S @ A.T + Q
    exact = eta * sigma**2 / D / (2 * LAM)
    rel = np.asarray(jnp.diag(S) / exact - 1)
    if solver is None:
        assert np.all(np.abs(rel) < 1e-3), rel
    else:
        delta = eta / DEFAULT_SUBSTEPS
        np.testing.assert_allclose(rel, np.asarray(LAM) * delta / 2, rtol=0.1)
    np.testing.assert_allclose(S - jnp.diag(jnp.diag(S)), 0.0, atol=1e-15)


def test_ou_exact_mean_and_variance_monte_carlo():
    """Monte Carlo of the default SGD limit against the exact OU mean and second moment."""
    eta, sigma, n_steps, n_paths = 0.25, 1.5, 12, 4096
    noise = lspsde.IsotropicGaussian(sigma)
    ens = lspsde.simulate(
        (QUAD, SGDLimit(eta), noise), THETA0, key=jax.random.key(1), n_paths=n_paths,
        n_steps=n_steps, save_every=4,
    )  # fmt: skip
    t = np.asarray(ens.steps) * eta
    m = ens.mean_energy()
    exact = np.asarray([_ou_second_moment(ti, eta, sigma) for ti in t])
    z = (np.asarray(m.mean) - exact) / np.where(m.sem > 0, m.sem, 1.0)
    assert np.all(np.abs(z[1:]) < 4.0), z
    mean = np.asarray(ens.theta[:, -1].mean(axis=0))
    sem = np.asarray(ens.theta[:, -1].std(axis=0, ddof=1)) / np.sqrt(n_paths)
    exact_mean = np.asarray(jnp.exp(-LAM * t[-1]) * THETA0)
    assert np.all(np.abs(mean - exact_mean) < 4 * sem)


# -- Euler-Maruyama orders on geometric Brownian motion ---------------------------------------


def _fit_order(h, err):
    slope, _ = np.polyfit(np.log(h), np.log(err), 1)
    return slope


def _gbm(mu, eta, s1, substeps, n_steps=2, n_paths=4000):
    r"""GaussianNoise(0, s1) in d = 1 with theta* = 0 makes the SGD limit geometric Brownian
    motion, $d\Theta = -\mu\Theta dt - b\,\Theta\,dW$ ($b = \sqrt\eta s_1$, $\Theta > 0$), with
    $\Theta_T = \Theta_0\exp(-(\mu + b^2/2)T - bW_T)$ on the same Brownian path.

    Returns Euler-Maruyama's and the exact $\Theta_T$ per path for each sub-step count."""
    b, T = np.sqrt(eta) * s1, n_steps * eta
    obj = models.Quadratic(jnp.array([[mu]]), jnp.zeros(1))
    noise = lspsde.GaussianNoise(0.0, s1)
    keys = jax.random.split(jax.random.key(7), n_paths)
    out = []
    for n in substeps:
        system = lspsde.LearningSystem(obj, SGDLimit(eta, dt=eta / n, solver=dfx.Euler()), noise)

        def run(k, system=system):
            thetas, us = lspsde.parameter_trajectory(system, jnp.ones(1), n_steps=n_steps, key=k)
            W_T = jnp.sum(us.total[:, 1])  # the second Brownian component drives sigma1
            return thetas[-1, 0], jnp.exp(-(mu + b**2 / 2) * T - b * W_T)

        em, exact = jax.vmap(run)(keys)
        out.append((np.asarray(em), np.asarray(exact)))
    return b, T, out


def test_euler_maruyama_strong_order_on_gbm():
    """E|Theta_T^EM - Theta_T| on the same Brownian path falls like h^(1/2)."""
    substeps = [4, 8, 16, 32, 64, 128]
    eta = 0.5
    _, _, runs = _gbm(mu=1.0, eta=eta, s1=1.2, substeps=substeps)
    strong = [np.mean(np.abs(em - exact)) for em, exact in runs]
    h = eta / np.asarray(substeps)
    # the O(h) term still shows at the coarsest steps: fit the finest four
    assert abs(_fit_order(h[2:], strong[2:]) - 0.5) < 0.1, strong


def test_euler_maruyama_weak_order_on_gbm():
    r"""The weak error of $\mathbb{E}\Theta_T^2$ is $O(h)$: measured by Monte Carlo with the exact
    solution on the same path as a control variate ($\mathbb{E}[\Theta^{EM\,2} - \Theta^2]$),
    and against Euler-Maruyama's exact second moment $((1 - \mu h)^2 + b^2h)^{T/h}$."""
    substeps = [2, 4, 8, 16, 32]
    mu, eta = 2.0, 0.5
    b, T, runs = _gbm(mu=mu, eta=eta, s1=0.3 / np.sqrt(eta), substeps=substeps)
    h = eta / np.asarray(substeps)
    moment = np.exp((-2 * mu + b**2) * T)
    exact_weak = ((1 - mu * h) ** 2 + b**2 * h) ** (T / h) - moment
    assert abs(_fit_order(h, np.abs(exact_weak)) - 1.0) < 0.1
    diff = np.stack([em**2 - exact**2 for em, exact in runs])
    weak = diff.mean(axis=1)
    se = diff.std(axis=1, ddof=1) / np.sqrt(diff.shape[1])
    assert np.all(np.abs(weak - exact_weak) < 4 * se), (weak, exact_weak, se)
    assert np.all(np.abs(weak) > 4 * se), (weak, se)  # resolved at every h
    assert abs(_fit_order(h, np.abs(weak)) - 1.0) < 0.15, weak


# -- SGD against its SDE limit ----------------------------------------------------------------


def test_sgd_to_sde_weak_error_is_order_one():
    """E||theta_k||^2 of SGD (exact second-moment recursion) against E||Theta_{k eta}||^2 of the
    OU limit at a fixed time T: the weak error is O(eta) with slope 1; coupled Monte Carlo
    ensembles reproduce the exact gap within their confidence interval."""
    sigma, T = 0.5, 1.0
    noise = lspsde.IsotropicGaussian(sigma)
    etas = np.array([0.1, 0.05, 0.025, 0.0125])
    errs = []
    for eta in etas:
        n = round(T / eta)
        exact_sgd = lspsde.quadratic_mean_square(jnp.diag(LAM), THETA0, eta, sigma, 0.0, n)
        errs.append(abs(float(exact_sgd[-1]) - float(_ou_second_moment(T, eta, sigma))))
    slope = _fit_order(etas, errs)
    assert abs(slope - 1.0) < 0.1, (slope, errs)

    eta, n = 0.1, 10
    kw = dict(key=jax.random.key(11), n_paths=4096, n_steps=n, save="summary")
    sgd = lspsde.simulate((QUAD, lspsde.SGD(eta), noise), THETA0, **kw)
    sde = lspsde.simulate((QUAD, SGDLimit(eta), noise), THETA0, **kw)
    gap = np.asarray(sgd.energy[:, -1] - sde.energy[:, -1])  # coupled: small variance
    se = gap.std(ddof=1) / np.sqrt(gap.size)
    exact_gap = float(
        lspsde.quadratic_mean_square(jnp.diag(LAM), THETA0, eta, sigma, 0.0, n)[-1]
    ) - float(_ou_second_moment(T, eta, sigma))
    assert abs(gap.mean() - exact_gap) < 4 * se, (gap.mean(), exact_gap, se)
    assert se < 0.25 * abs(exact_gap)  # the coupling resolves the O(eta) gap


# -- gradient flow ----------------------------------------------------------------------------


def test_gradient_flow_exponents_are_hessian_eigenvalues():
    """The gradient flow of a quadratic is exp(-tH): its Lyapunov spectrum per unit time is
    minus the Hessian's eigenvalues, and its path is exp(-tH) theta0 (adaptive Tsit5)."""
    eta = 0.1
    flow = GradientFlow(eta)
    step = lambda t, z, args: flow.step(QUAD, lspsde.NoNoise(), t, z, None)
    spectrum = lspsde.lyapunov_spectrum(step, THETA0, 100, n_transient=300, dt=eta)
    np.testing.assert_allclose(spectrum, -np.sort(np.asarray(LAM)), atol=1e-6)
    ens = lspsde.simulate(
        (QUAD, flow, lspsde.NoNoise()), THETA0, key=jax.random.key(0), n_paths=1, n_steps=20
    )
    t = np.asarray(ens.steps) * eta
    np.testing.assert_allclose(
        ens.theta[0], np.exp(-np.outer(t, LAM)) * np.asarray(THETA0), rtol=1e-7
    )


def test_second_order_modified_equation_tracks_gradient_descent():
    """GD agrees with the order-2 modified flow to O(eta^2) at fixed T, with the gradient flow
    only to O(eta)."""
    T = 1.0
    gaps = {1: [], 2: []}
    etas = [0.1, 0.05]
    for eta in etas:
        n = round(T / eta)
        gd = THETA0 * (1 - eta * LAM) ** n
        for order in (1, 2):
            flow = GradientFlow(eta, order=order, dt=eta / 8)
            theta = THETA0
            for k in range(n):
                theta = flow.step(QUAD, lspsde.NoNoise(), k, theta, None)
            gaps[order].append(float(jnp.linalg.norm(theta - gd)))
    assert gaps[1][0] / gaps[1][1] == pytest.approx(2.0, rel=0.15)
    assert gaps[2][0] / gaps[2][1] == pytest.approx(4.0, rel=0.2)
    assert gaps[2][0] < 0.2 * gaps[1][0]


# -- diffusion factors ------------------------------------------------------------------------


def _regression():
    data = models.synthetic_regression(jax.random.key(0), n=24, d=D, noise_std=0.3)
    return models.LeastSquares(data.X, data.y)


@pytest.mark.parametrize(
    "make_noise",
    [
        lambda: lspsde.IsotropicGaussian(0.5),
        lambda: lspsde.AnisotropicGaussian(jnp.arange(1.0, D * D + 1).reshape(D, D) / 9),
        lambda: lspsde.GaussianNoise(0.3, 0.7),
        lambda: lspsde.CurvatureNoise(4, 24),
        lambda: lspsde.MinibatchNoise(4, 24),
        lambda: lspsde.StudentTNoise(0.5, 5.0),
        lambda: lspsde.AlphaStableNoise(0.5, 2.0),
    ],
    ids=["iso", "aniso", "assumption1", "curvature", "minibatch", "student", "stable2"],
)
def test_diffusion_factor_matches_covariance(make_noise):
    noise = make_noise()
    obj = _regression()
    theta = jnp.array([0.3, -1.0, 2.0])
    B = noise.diffusion(obj, theta).as_matrix()
    np.testing.assert_allclose(B @ B.T, noise.covariance(obj, theta), rtol=1e-10, atol=1e-12)


def test_minibatch_limit_runs_and_keeps_the_mean():
    """The SDE limit of minibatch SGD on least squares (covariance from the whole data set):
    the mean of Theta follows the gradient flow exactly (the drift is linear)."""
    obj = _regression()
    noise = lspsde.MinibatchNoise(4, 24)
    eta, n = 0.05, 10
    ens = lspsde.simulate(
        (obj, SGDLimit(eta), noise), jnp.zeros(D), key=jax.random.key(2), n_paths=2048, n_steps=n
    )
    flow = lspsde.simulate(
        (obj, GradientFlow(eta), lspsde.NoNoise()), jnp.zeros(D), key=jax.random.key(0),
        n_paths=1, n_steps=n,
    )  # fmt: skip
    mean = np.asarray(ens.theta[:, -1].mean(0))
    sem = np.asarray(ens.theta[:, -1].std(0, ddof=1)) / np.sqrt(2048)
    assert np.all(np.abs(mean - np.asarray(flow.theta[0, -1])) < 4 * sem)
    assert not bool(ens.diverged.any())


# -- adaptive steps ---------------------------------------------------------------------------


def test_adaptive_sde_steps_on_a_virtual_brownian_tree():
    eta, sigma = 0.25, 1.0
    noise = lspsde.IsotropicGaussian(sigma)
    limit = SGDLimit(eta, solver=dfx.SPaRK(), stepsize_controller=dfx.PIDController(
        rtol=1e-3, atol=1e-4))  # fmt: skip
    ens = lspsde.simulate(
        (QUAD, limit, noise), THETA0, key=jax.random.key(5), n_paths=512, n_steps=4, save="summary"
    )
    m = ens.mean_energy()
    exact = float(_ou_second_moment(4 * eta, eta, sigma))
    assert abs(float(m.mean[-1]) - exact) < 4 * float(m.sem[-1])


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, noise, match",
    [
        (lambda: SGDLimit(0.1, dt=0.5), lspsde.IsotropicGaussian(1.0), "larger than the horizon"),
        (lambda: SGDLimit(0.1, solver=dfx.ShARK()), lspsde.GaussianNoise(0.1, 0.5), "additive"),
        (lambda: SGDLimit(0.1, solver=dfx.Heun()), lspsde.GaussianNoise(0.1, 0.5), "Stratonov"),
        (lambda: SGDLimit(0.1, solver=dfx.Tsit5()), lspsde.IsotropicGaussian(1.0), "not an SDE"),
        (
            lambda: SGDLimit(0.1, solver=dfx.ItoMilstein()),
            lspsde.GaussianNoise(0.1, 0.5),
            "commutative",
        ),
        (lambda: SGDLimit(0.1), lspsde.AlphaStableNoise(1.0, 1.5), "no covariance"),
        (lambda: SGDLimit(0.1), lspsde.StudentTNoise(1.0, 2.0), "no covariance"),
        (lambda: SGDLimit(0.1, solver=dfx.ShARK()), lspsde.NoNoise(), "ODE"),
        (lambda: SGDLimit(lspsde.RobbinsMonro(1.0)), lspsde.NoNoise(), "constant step"),
        (lambda: SGDLimit(-0.1), lspsde.NoNoise(), "step_size"),
        (lambda: SGDLimit(0.1, order=3), lspsde.NoNoise(), "order"),
        (lambda: GradientFlow(0.1, solver=dfx.ShARK()), lspsde.NoNoise(), "ODE"),
    ],
)
def test_bad_input_is_refused_before_compilation(make, noise, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lspsde.simulate((QUAD, make(), noise), THETA0, key=jax.random.key(0), n_paths=2, n_steps=2)


def test_limit_is_not_a_plain_update():
    with pytest.raises(TypeError, match="needs the objective"):
        SGDLimit(0.1)(0, THETA0, THETA0)


# -- comparing a flow with its limit ----------------------------------------------------------


def test_weak_and_strong_error_and_fitted_order():
    """SGD against its coupled SDE limit on the OU quadratic: the paired weak error matches the
    exact moment gap; the strong error of coupled paths falls with eta; convergence_order fits
    slope 1 to exact weak errors with an interval that contains it."""
    sigma, n = 0.5, 10
    noise = lspsde.IsotropicGaussian(sigma)
    eta = 0.1
    kw = dict(key=jax.random.key(2), n_paths=2048, n_steps=n, save_every=5)
    sgd = lspsde.simulate((QUAD, lspsde.SGD(eta), noise), THETA0, **kw)
    sde = lspsde.simulate((QUAD, SGDLimit(eta), noise), THETA0, **kw)
    weak = lspsde.limits.weak_error(sgd, sde)
    exact = lspsde.quadratic_mean_square(jnp.diag(LAM), THETA0, eta, sigma, 0.0, n)
    exact_gap = np.asarray(exact)[weak.steps] - np.asarray(
        [_ou_second_moment(k * eta, eta, sigma) for k in weak.steps]
    )
    assert np.all(np.abs(weak.difference - exact_gap)[1:] < 4 * weak.se[1:])
    assert weak.valid.all()
    unpaired = lspsde.limits.weak_error(sgd, sde, paired=False)
    assert np.all(unpaired.se[1:] > 3 * weak.se[1:])  # coupling pays
    strong = lspsde.limits.strong_error(sgd, sde)
    assert strong.difference[0] == 0 and np.all(strong.difference[1:] > 0)

    etas = np.array([0.1, 0.05, 0.025, 0.0125])
    errs = [
        float(lspsde.quadratic_mean_square(jnp.diag(LAM), THETA0, e, sigma, 0.0, round(1 / e))[-1])
        - float(_ou_second_moment(1.0, e, sigma))
        for e in etas
    ]
    fit = lspsde.limits.convergence_order(etas, errs)
    assert abs(fit.order - 1) < 0.02 and fit.ci[1] - fit.ci[0] < 0.05
    # invalid and unresolved points are left out and said so
    fit2 = lspsde.limits.convergence_order(
        etas, errs, se=[1e-9, 1e-9, 1e-9, 1.0], valid=[False, True, True, True]
    )
    assert not fit2.used[0] and not fit2.used[3] and np.isnan(fit2.order)
    assert "diverged" in fit2.note and "not resolved" in fit2.note


def test_neural_ode_is_the_limit_of_euler_residual_networks():
    """A residual net with h = S/L is explicit Euler for the neural ODE: the output error is
    O(h), and the per-unit-depth exponents of the Jacobians converge to the ODE's."""
    A = jnp.array([[-1.0, 2.0], [-2.0, -1.0]]) / 2

    def g(s, x):
        return jnp.tanh(A @ x) * (1 + 0.5 * jnp.sin(s))

    S = 2.0
    ode = NeuralODE(g, S, n_layers=4)
    x0 = jnp.array([1.0, -0.5])
    X_S = ode.trajectory(x0)[-1]
    errs = []
    for L in (8, 16, 32, 64):
        res = lspsde.limits.euler_residual(g, S, L)
        errs.append(float(jnp.linalg.norm(res.trajectory(x0)[-1] - X_S)))
    fit = lspsde.limits.convergence_order(S / np.array([8, 16, 32, 64]), errs)
    assert abs(fit.order - 1) < 0.1
    J_ode = jax.jacfwd(lambda x: ode.trajectory(x)[-1])(x0)
    J_res = jax.jacfwd(lambda x: lspsde.limits.euler_residual(g, S, 256).trajectory(x)[-1])(x0)
    a_ode = np.log(np.linalg.norm(J_ode, 2)) / S
    a_res = np.log(np.linalg.norm(J_res, 2)) / S
    assert abs(a_ode - a_res) < 0.01 and a_ode < 0
    prof = lspsde.representation_profile(ode, x0[None], method="dense")
    np.testing.assert_allclose(prof.cumulative[0, -1], np.linalg.norm(J_ode, 2), rtol=1e-6)


def test_order_interval_covers_the_true_order():
    """Synthetic errors C h^p (1 + noise) with known standard errors: the 95% interval covers p
    in about 95% of replicates (Monte Carlo coverage within its binomial uncertainty)."""
    rng = np.random.default_rng(0)
    h = np.array([0.2, 0.1, 0.05, 0.025, 0.0125])
    p, n_rep, hits = 1.0, 400, 0
    for _ in range(n_rep):
        rel = 0.05
        e = 0.3 * h**p * (1 + rel * rng.standard_normal(h.size))
        fit = lspsde.limits.convergence_order(h, e, se=rel * 0.3 * h**p)
        hits += fit.ci[0] <= p <= fit.ci[1]
    coverage = hits / n_rep
    assert abs(coverage - 0.95) < 3 * np.sqrt(0.95 * 0.05 / n_rep), coverage


# -- solver and option coverage ---------------------------------------------------------------


def test_uncoupled_increments_have_the_same_law_but_no_pin():
    eta, n = 0.3, 4
    noise = lspsde.IsotropicGaussian(1.0)
    limit = SGDLimit(eta, dt=eta / n, solver=dfx.Euler(), coupled=False)
    keys = jax.random.split(jax.random.key(1), 20_000)
    W = np.asarray(
        jax.vmap(lambda k: limit.increments(noise, limit.draw(QUAD, noise, k, THETA0)).W)(keys)
    )
    flat = W.reshape(len(keys), -1)
    se = np.sqrt(2.0 / len(keys)) * eta / n
    np.testing.assert_allclose(np.cov(flat, rowvar=False), eta / n * np.eye(flat.shape[1]),
                               atol=5 * se)  # fmt: skip
    xi = np.asarray(jax.vmap(lambda k: noise.sample(k, THETA0))(keys))
    corr = np.corrcoef(W.sum(axis=1)[:, 0], xi[:, 0])[0, 1]
    assert abs(corr) < 0.05  # not pinned to SGD's draw
    ens = lspsde.simulate((QUAD, SGDLimit(0.25, coupled=False), lspsde.IsotropicGaussian(1.5)),
                          THETA0, key=jax.random.key(3), n_paths=2048, n_steps=8,
                          save="summary")  # fmt: skip
    m = ens.mean_energy()
    assert abs(float(m.mean[-1]) - float(_ou_second_moment(2.0, 0.25, 1.5))) < 4 * float(m.sem[-1])


@pytest.mark.parametrize("solver", [dfx.ItoMilstein(), dfx.Heun(), dfx.SRA1()])
def test_other_solvers_on_additive_noise(solver):
    """With additive noise Milstein is Euler-Maruyama exactly; Heun and SRA1 (Stratonovich =
    Ito here) have the OU stationary covariance within 1e-2 at the default step."""
    eta = 0.5
    noise = lspsde.IsotropicGaussian(1.0)
    limit = SGDLimit(eta, solver=solver)
    u = limit.draw(QUAD, noise, jax.random.key(0), THETA0)
    if isinstance(solver, dfx.ItoMilstein):
        euler = SGDLimit(eta, solver=dfx.Euler())
        incs = euler.increments(noise, euler.draw(QUAD, noise, jax.random.key(0), THETA0))
        np.testing.assert_allclose(
            limit.step(QUAD, noise, 0, THETA0, incs),
            euler.step(QUAD, noise, 0, THETA0, incs),
            rtol=1e-13,
        )
        return
    A, Q = _one_step_moments(limit, noise, eta)
    S = jnp.zeros((D, D))
    for _ in range(400):
        S = A @ S @ A.T + Q
    rel = np.asarray(jnp.diag(S) / (eta / D / (2 * LAM)) - 1)
    assert np.all(np.abs(rel) < 1e-2), rel
    assert np.all(np.isfinite(np.asarray(limit.step(QUAD, noise, 0, THETA0, u))))


def test_second_order_sgd_limit_drift_is_the_modified_flow():
    """With zero noise SGDLimit(order=2) follows the order-2 modified gradient flow."""
    eta = 0.2
    noise = lspsde.IsotropicGaussian(0.0)
    kw = dict(key=jax.random.key(0), n_paths=2, n_steps=5)
    sde = lspsde.simulate((QUAD, SGDLimit(eta, order=2), noise), THETA0, **kw)  # ShARK
    lam = np.asarray(LAM)
    t = np.asarray(sde.steps) * eta
    exact = np.exp(-np.outer(t, lam + eta * lam**2 / 2)) * np.asarray(THETA0)
    np.testing.assert_allclose(sde.theta[0], exact, rtol=1e-4)  # ShARK at dt = eta / 32


def test_learning_profile_of_the_sde_limit():
    """The parametric blocks of the OU limit: ||dTheta_{t+eta}/dTheta_t|| = exp(-lambda_min eta)
    on every path (additive noise), cumulative exp(-lambda_min t); u-blocks undefined."""
    eta = 0.1
    system = lspsde.LearningSystem(QUAD, SGDLimit(eta), lspsde.IsotropicGaussian(0.5))
    prof = lspsde.learning_profile(system, THETA0, key=jax.random.key(0), n_steps=10,
                                   save_every=5)  # fmt: skip
    lam_min = float(LAM.min())
    np.testing.assert_allclose(prof.sigma_theta, np.exp(-lam_min * eta), rtol=1e-6)
    np.testing.assert_allclose(
        prof.cum_theta, np.exp(-lam_min * eta * np.asarray(prof.steps)), rtol=1e-6
    )
    assert prof.sigma_u is None and prof.cum_u is None
