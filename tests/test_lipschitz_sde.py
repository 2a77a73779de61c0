r"""The SDE model of $\sigma_1(W)$ under SGD (``lspsde.lipschitz.sde``, ``.covariance``).

References are independent of the implementation: the one-step decomposition
(``spectral_step_decomposition``, itself tested against exact SVDs), ``jax.hessian`` of
``svd(W)[0]``, closed forms of the linear model, and discrete SGD ensembles of
``lspsde.simulate`` with $\sigma_1$ of every path from NumPy's LAPACK SVD.

**The linear model.** $\mathcal{L}(W) = \frac12\|W - A\|_F^2$, $W \in \mathbb{R}^{5\times4}$,
$\sigma(A) = (2, 1.2, 0.8, 0.4)$, $W_0 = A + 0.8\,E$ ($\sigma_1(W_0) = 2.436$, gap 1.04),
``IsotropicGaussian(sqrt(20))`` (entry variance $v = 1$), $\eta = 0.01$, $T = 300$ ($s = 3$).
SGD's law is exactly $N(\bar W_t, v_t I)$ here, and the small-noise prediction's own error
against it (a $4 \cdot 10^5$-sample average of the exact law, computed once while writing
this test) is at most $3 \cdot 10^{-4}$ in the mean and $0.9\%$ in the variance, below the
$\approx 1.1 \cdot 10^{-3}$ and $2.2\%$ standard errors of a 4,096-path ensemble. Intervals are
$|z| < 4$ (two-sided $p \approx 6 \cdot 10^{-5}$ per comparison); the variance's standard
error is $\sqrt{(m_4 - s^4)/N}$ (no normality assumed).

**Measured** (float64, these seeds). Linear model, 12 saved steps $t = 25, \dots, 300$: mean
$z \in [-2.06, 0.23]$, variance $z \in [-1.19, 1.97]$; dropping the Itô term
$\eta\operatorname{tr}(QP)$ gives $z = 3.6, 4.7, 6.4, \dots, 9.7$ (from $s = 0.75$ on above 5);
the naive quadrature $\int\eta g^\top\Sigma g\,ds$ of the variance gives $z = -9.8$ to $-240$.
Two correlated layers, $\log\prod\sigma_1$: mean $z \in [-1.29, -0.37]$, variance $z \in
[-0.80, 0.12]$, the variance without the cross-layer covariance $z \approx 19$. Joint SDE
(1,024 paths, 4 sub-steps per SGD step) against SGD: mean $z \in [-1.43, 0.05]$, variance $z
\in [-1.69, 1.52]$; the small-noise mean inside its interval ($|z| \le 2.23$); Itô's formula
path by path: mean $|$residual$| = 4.5 \cdot 10^{-4}$ against an Itô term of $1.9 \cdot
10^{-2}$ at $s = 1$, and without the Itô term the paired miss is 741 standard errors.
Minibatch factor ($n = 40$, $B = 8$, $4 \cdot 10^4$ sampled batches): $z = 0.34$ for
$\operatorname{tr}(\Sigma Q)$ and $0.33$ for $g^\top\Sigma g$; with replacement's $\kappa =
1/B$: $z = -54$ and $-32$.
"""

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lspsde
from lspsde.lipschitz import (
    NoiseCovariance,
    expected_second_order,
    gradient_noise_covariance,
    minibatch_covariance,
    spectral_noise_terms,
    spectral_norm_moments,
    spectral_norm_sde,
    spectral_sde_coefficients,
    spectral_step_decomposition,
    top_singular_hessian,
)
from lspsde.lipschitz import covariance as covariance_module
from lspsde.lipschitz import sde as sde_module
from lspsde.objectives import AbstractObjective
import models

Z = 4.0
ETA = 0.01
N_PATHS = 4096
N_STEPS = 300
SAVE = 25
M, N = 5, 4
ENTRY_VAR = 1.0  # v: IsotropicGaussian(scale) has entry variance scale^2 / d
SCALE = float(np.sqrt(M * N * ENTRY_VAR))


class MatrixQuadratic(AbstractObjective):
    r"""$\frac12\sum_l\|W_l - A_l\|_F^2$ over a pytree of matrices (a bare matrix: one)."""

    target: object

    def loss(self, theta):
        diff = jax.tree.map(jnp.subtract, theta, self.target)
        return 0.5 * sum(jnp.sum(d**2) for d in jax.tree.leaves(diff))

    def gradient(self, theta):
        return jax.tree.map(jnp.subtract, theta, self.target)

    def minimizer(self):
        return self.target


class MatrixLeastSquares(AbstractObjective):
    r"""$\frac1{2n}\sum_i\|W x_i - y_i\|^2$: per-example gradients $(W x_i - y_i) x_i^\top$."""

    X: jax.Array
    Y: jax.Array

    def loss(self, W):
        return 0.5 * jnp.mean(jnp.sum((self.X @ W.T - self.Y) ** 2, axis=1))

    @property
    def n_examples(self):
        return self.X.shape[0]

    def per_example_loss(self, W, i):
        return 0.5 * jnp.sum((W @ self.X[i] - self.Y[i]) ** 2)


def _matrix(rng, m, n, sigma):
    U = np.linalg.qr(rng.standard_normal((m, m)))[0]
    V = np.linalg.qr(rng.standard_normal((n, n)))[0]
    r = len(sigma)
    return U[:, :r] @ np.diag(np.asarray(sigma, float)) @ V[:, :r].T


def _sigma1(thetas):
    """sigma1 of every matrix of a (..., m, n) stack, LAPACK."""
    return np.linalg.svd(np.asarray(thetas), compute_uv=False)[..., 0]


def _mc(x):
    """Mean, its SE, variance, its SE over axis 0."""
    x = np.asarray(x)
    n = x.shape[0]
    mean, c = x.mean(0), x - x.mean(0)
    var = (c**2).sum(0) / (n - 1)
    return mean, np.sqrt(var / n), var, np.sqrt(np.maximum((c**4).mean(0) - var**2, 0) / n)


def _z(observed, se, predicted):
    return (np.asarray(observed) - np.asarray(predicted)) / np.asarray(se)


@pytest.fixture(scope="module")
def linear():
    rng = np.random.default_rng(0)
    A = _matrix(rng, M, N, [2.0, 1.2, 0.8, 0.4])
    W0 = A + 0.8 * _matrix(rng, M, N, [1.0, 0.5, 0.3, 0.1])
    objective = MatrixQuadratic(jnp.asarray(A))
    noise = lspsde.IsotropicGaussian(SCALE)
    ens = lspsde.simulate(
        (objective, lspsde.SGD(ETA), noise),
        jnp.asarray(W0),
        key=jax.random.key(3),
        n_paths=N_PATHS,
        n_steps=N_STEPS,
        save_every=SAVE,
    )
    assert not bool(jnp.any(ens.diverged))
    sgd = _sigma1(ens.theta)  # (path, step)
    pred = spectral_norm_moments(objective, noise, jnp.asarray(W0), ETA, n_steps=N_STEPS,
                                 save_every=SAVE)  # fmt: skip
    return dict(A=A, W0=W0, objective=objective, noise=noise, sgd=sgd, steps=ens.steps, pred=pred)


# --------------------------------------------------------------------------------------------
# The coefficients are the one-step terms, in time s = eta t


@pytest.mark.parametrize("form", ["isotropic", "anisotropic", "dense", "factor"])
def test_coefficients_are_the_one_step_terms(form):
    rng = np.random.default_rng(1)
    m, n = 4, 6
    W = jnp.asarray(_matrix(rng, m, n, [1.8, 1.3, 0.9, 0.2]))
    A = jnp.asarray(rng.standard_normal((m, n)))
    objective = MatrixQuadratic(A)
    eta = 0.05
    L = rng.standard_normal((m * n, m * n)) * np.geomspace(0.05, 1.5, m * n) / 3
    Sigma = L @ L.T
    noise = {
        "isotropic": lspsde.IsotropicGaussian(0.7),
        "anisotropic": lspsde.AnisotropicGaussian(jnp.asarray(L)),
        "dense": NoiseCovariance.from_matrix(Sigma),
        "factor": NoiseCovariance.from_factor(L),
    }[form]
    if form == "isotropic":
        Sigma = 0.7**2 / (m * n) * np.eye(m * n)
    c = spectral_sde_coefficients(objective, noise, W, eta)
    step = spectral_step_decomposition(W, W - A, jnp.zeros((m, n)), eta, noise_cov=Sigma)
    np.testing.assert_allclose(eta * c.drift[0], step.drift, rtol=1e-12)
    np.testing.assert_allclose(eta * c.ito[0], step.ito, rtol=1e-11)
    np.testing.assert_allclose(eta * c.diffusion[0], step.noise_variance, rtol=1e-11)
    # The Ito term is (eta / 2) tr(Sigma Hess sigma1), Hess from JAX's SVD derivative rule.
    H = jax.hessian(lambda X: jnp.linalg.svd(X, compute_uv=False)[0])(W).reshape(m * n, m * n)
    np.testing.assert_allclose(c.ito[0], eta / 2 * np.sum(Sigma * np.asarray(H)), rtol=1e-10)
    # Order 2: -(eta/2) <g, H grad L> with H = I here, i.e. (eta / 2) * drift; order 1: 0.
    np.testing.assert_allclose(c.correction[0], eta / 2 * c.drift[0], rtol=1e-12)
    c1 = spectral_sde_coefficients(objective, noise, W, eta, order=1)
    assert float(c1.correction[0]) == 0.0
    s = c.sigma1[0]
    np.testing.assert_allclose(
        c.log_drift, (c.drift[0] + c.correction[0] + c.ito[0]) / s - c.diffusion[0] / (2 * s**2),
        rtol=1e-12,
    )  # fmt: skip
    np.testing.assert_allclose(c.log_diffusion, c.diffusion[0] / s**2, rtol=1e-11)


# --------------------------------------------------------------------------------------------
# The covariance of minibatch noise from per-example gradients


def _least_squares(rng, n_examples=40, m=3, n=4):
    X = rng.standard_normal((n_examples, n))
    Y = rng.standard_normal((n_examples, m))
    W = _matrix(rng, m, n, [2.0, 1.1, 0.5])
    return MatrixLeastSquares(jnp.asarray(X), jnp.asarray(Y)), jnp.asarray(W), X, Y


def test_minibatch_covariance_is_exact_for_least_squares():
    rng = np.random.default_rng(2)
    n_ex, B = 40, 8
    objective, W, X, Y = _least_squares(rng, n_ex)
    # Closed form: G_i = (W x_i - y_i) x_i^T; Sigma = kappa [E vec G vec G^T - vec Gbar vec Gbar^T]
    G = np.einsum("im,in->imn", X @ np.asarray(W).T - Y, X).reshape(n_ex, -1)
    raw = G.T @ G / n_ex - np.outer(G.mean(0), G.mean(0))
    kappa = (n_ex - B) / (B * (n_ex - 1))
    cov = minibatch_covariance(jnp.asarray(G.reshape(n_ex, 3, 4)), B)
    assert cov.form == "factor" and cov.factor.shape == (12, n_ex)
    np.testing.assert_allclose(cov.dense(), kappa * raw, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        minibatch_covariance(jnp.asarray(G), B, replace=True).dense(), raw / B, rtol=1e-12,
        atol=1e-14,
    )  # fmt: skip
    model = lspsde.MinibatchNoise(B, n_ex)
    exact = gradient_noise_covariance(objective, model, W)
    assert exact.form == "factor"
    np.testing.assert_allclose(exact.dense(), kappa * raw, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(exact.dense(), model.covariance(objective, W), rtol=1e-12,
                               atol=1e-14)  # fmt: skip
    # Both projections through the factor equal the dense computation.
    Sigma = kappa * raw
    terms = spectral_noise_terms(W, exact)
    H = np.asarray(top_singular_hessian(W))
    np.testing.assert_allclose(terms.hessian_trace, 0.5 * np.sum(H * Sigma), rtol=1e-12)
    np.testing.assert_allclose(terms.hessian_trace, expected_second_order(W, Sigma), rtol=1e-12)
    U, _, Vt = np.linalg.svd(np.asarray(W))
    g = np.outer(U[:, 0], Vt[0]).reshape(-1)
    np.testing.assert_allclose(terms.jacobian_variance, g @ Sigma @ g, rtol=1e-12)
    dense = spectral_noise_terms(W, NoiseCovariance.from_matrix(Sigma))
    np.testing.assert_allclose(dense.hessian_trace, terms.hessian_trace, rtol=1e-12)
    np.testing.assert_allclose(dense.jacobian_variance, terms.jacobian_variance, rtol=1e-12)


def test_minibatch_covariance_matches_sampled_minibatches():
    r"""The factor's projections are the moments of the actual minibatch noise (without
    replacement): $\mathbb{E}[\text{second}(\xi)]$ and $\operatorname{Var}(u_1^\top\xi v_1)$
    over sampled batches; the with-replacement $\kappa = 1/B$ (18% larger) is rejected."""
    rng = np.random.default_rng(4)
    n_ex, B = 40, 8
    _, W, X, Y = _least_squares(rng, n_ex)
    G = np.einsum("im,in->imn", X @ np.asarray(W).T - Y, X)
    idx = jax.vmap(lambda k: jax.random.choice(k, n_ex, (B,), replace=False))(
        jax.random.split(jax.random.key(0), 40_000)
    )
    xi = G[np.asarray(idx)].mean(1) - G.mean(0)  # (draws, m, n)
    Wb = jnp.broadcast_to(W, xi.shape)
    second = np.asarray(lspsde.lipschitz.top_singular_expansion(Wb, jnp.asarray(xi)).second)
    U, _, Vt = np.linalg.svd(np.asarray(W))
    first = np.einsum("m,kmn,n->k", U[:, 0], xi, Vt[0])
    terms = spectral_noise_terms(W, minibatch_covariance(jnp.asarray(G), B))
    with_repl = spectral_noise_terms(W, minibatch_covariance(jnp.asarray(G), B, replace=True))
    mean, se = second.mean(), second.std() / np.sqrt(second.size)
    assert abs(mean - float(terms.hessian_trace)) < Z * se
    assert abs(mean - float(with_repl.hessian_trace)) > Z * se
    v, v_se = _mc(first)[2:]
    assert abs(v - float(terms.jacobian_variance)) < Z * v_se


# --------------------------------------------------------------------------------------------
# The small-noise prediction against the discrete SGD ensemble


def test_small_noise_flow_and_covariance_closed_form(linear):
    """For the linear model: w(s) = A + exp(-(1 + eta/2) s)(W0 - A) and eta P(s) = eta v (1 -
    exp(-(2 + eta) s)) / (2 + eta) I (the ODE solve, tolerance 1e-8)."""
    p = linear["pred"]
    s = np.asarray(p.times)
    decay = np.exp(-(1 + ETA / 2) * s)[:, None, None]
    flow = linear["A"] + decay * (linear["W0"] - linear["A"])
    np.testing.assert_allclose(p.theta_flow, flow, rtol=1e-7, atol=1e-9)
    var = ETA * ENTRY_VAR * (1 - np.exp(-(2 + ETA) * s)) / (2 + ETA)
    eye = np.eye(M * N)
    np.testing.assert_allclose(p.weight_covariance, var[:, None, None] * eye, atol=1e-10)
    np.testing.assert_allclose(p.shift, 0.0, atol=1e-12)  # quadratic loss: no mean shift
    assert p.mean.shape == (13, 1) and p.layers == ("",)
    np.testing.assert_allclose(p.sigma1_flow[:, 0], _sigma1(flow), rtol=1e-7)


def test_small_noise_mean_and_variance_match_sgd(linear):
    p, sgd = linear["pred"], linear["sgd"]
    np.testing.assert_array_equal(p.steps, linear["steps"])
    mean, mean_se, var, var_se = _mc(sgd)
    k = slice(1, None)  # step 0 is deterministic
    np.testing.assert_allclose(mean[0], p.mean[0, 0], rtol=1e-12)
    z_mean = _z(mean[k], mean_se[k], p.mean[k, 0])
    z_var = _z(var[k], var_se[k], p.variance[k, 0])
    assert np.all(np.abs(z_mean) < Z), z_mean
    assert np.all(np.abs(z_var) < Z), z_var
    assert float(np.max(p.noise_to_gap)) < 0.1
    # Without the Ito (Hessian) term the prediction misses from step 75 (s = 0.75) on.
    z_no_ito = _z(mean[k], mean_se[k], p.mean[k, 0] - p.hessian_term[k, 0])
    assert np.all(z_no_ito[2:] > 5) and np.max(z_no_ito) > 8, z_no_ito
    # The naive quadrature of the diffusion coefficient along the flow is not the variance.
    naive = np.concatenate([[0.0], np.cumsum(np.diff(p.times) * 0.5 * (
        p.diffusion_rate[1:, 0] + p.diffusion_rate[:-1, 0]))])  # fmt: skip
    np.testing.assert_allclose(naive[-1], ETA * ENTRY_VAR * ETA * N_STEPS, rtol=1e-10)
    z_naive = _z(var[k], var_se[k], naive[k])
    assert np.max(np.abs(z_naive)) > 50, z_naive
    print("ZDBG main", z_mean.round(2), z_var.round(2), z_no_ito.round(2), z_naive.round(1))


def test_log_bound_of_two_correlated_layers():
    r"""$\log\prod_l\sigma_1(W_l)$ of two layers whose noise is correlated along their top
    directions: the predicted mean and variance match SGD, and the variance without the
    cross-layer covariance $2\eta\,\hat g_1^\top P_{12}\hat g_2$ misses."""
    rng = np.random.default_rng(5)
    A = {"a": _matrix(rng, 5, 4, [2.0, 1.2, 0.8, 0.4]), "b": _matrix(rng, 3, 5, [1.5, 0.7, 0.3])}
    theta0 = {k: a + 0.5 * _matrix(rng, *a.shape, [1.0, 0.4, 0.2]) for k, a in A.items()}
    # Sigma = C C^T, C = s I + tau e e^T with e = (g_a / sigma_a, g_b / sigma_b) at theta0.
    es = []
    for k in ("a", "b"):
        U, s, Vt = np.linalg.svd(theta0[k])
        es.append(np.outer(U[:, 0], Vt[0]).reshape(-1) / s[0])
    e = np.concatenate(es)
    e /= np.linalg.norm(e)
    d = e.size
    C = 0.6 * np.eye(d) + 1.5 * np.outer(e, e)
    objective = MatrixQuadratic(jax.tree.map(jnp.asarray, A))
    noise = lspsde.AnisotropicGaussian(jnp.asarray(C))
    theta0 = jax.tree.map(jnp.asarray, theta0)
    steps, save = 200, 50
    ens = lspsde.simulate((objective, lspsde.SGD(ETA), noise), theta0, key=jax.random.key(7),
                          n_paths=N_PATHS, n_steps=steps, save_every=save)  # fmt: skip
    log_bound = np.log(_sigma1(ens.theta["a"])) + np.log(_sigma1(ens.theta["b"]))
    pred = spectral_norm_moments(objective, noise, theta0, ETA, n_steps=steps, save_every=save)
    assert pred.layers == ("['a']", "['b']")
    mean, mean_se, var, var_se = _mc(log_bound)
    k = slice(1, None)
    z_mean = _z(mean[k], mean_se[k], pred.log_bound_mean[k])
    z_var = _z(var[k], var_se[k], pred.log_bound_variance[k])
    assert np.all(np.abs(z_mean) < Z), z_mean
    assert np.all(np.abs(z_var) < Z), z_var
    # Per layer too.
    for i, key in enumerate(("a", "b")):
        m_l, se_l, v_l, vse_l = _mc(_sigma1(ens.theta[key]))
        assert np.all(np.abs(_z(m_l[k], se_l[k], pred.mean[k, i])) < Z)
        assert np.all(np.abs(_z(v_l[k], vse_l[k], pred.variance[k, i])) < Z)
    no_cross = np.sum(pred.variance / pred.sigma1_flow**2, axis=1)
    z_no_cross = _z(var[k], var_se[k], no_cross[k])
    assert np.all(z_no_cross > 10), z_no_cross


# --------------------------------------------------------------------------------------------
# The joint SDE of the weights and the three terms, path by path


def test_joint_sde_paths(linear):
    n_steps, save = 100, 25
    sde = spectral_norm_sde(linear["objective"], linear["noise"], jnp.asarray(linear["W0"]),
                            ETA, key=jax.random.key(11), n_paths=1024, n_steps=n_steps,
                            save_every=save, n_substeps=4)  # fmt: skip
    assert sde.sigma1.shape == (1024, 5, 1) and sde.n_substeps == 4
    np.testing.assert_allclose(sde.times, ETA * np.arange(0, n_steps + 1, save), rtol=1e-14)
    assert float(jnp.max(sde.degenerate_time)) == 0.0
    # The SDE ensemble's law matches SGD's (independent ensembles).
    sgd = linear["sgd"][:, : n_steps // SAVE + 1]
    mean, mean_se, var, var_se = _mc(sgd)
    mom = sde.moments()
    k = slice(1, None)
    se = np.hypot(mean_se[k], mom.mean_se[k, 0])
    assert np.all(np.abs((mom.mean[k, 0] - mean[k]) / se) < Z)
    se_v = np.hypot(var_se[k], mom.variance_se[k, 0])
    assert np.all(np.abs((mom.variance[k, 0] - var[k]) / se_v) < Z)
    # Ito's formula holds path by path: the terms add up to sigma1(W(s)) up to the time step
    # (|residual| ~ 1e-4 against an Ito term of ~5e-3) ...
    ito = np.asarray(sde.ito[:, -1, 0])
    residual = np.asarray(sde.residual[:, -1, 0])
    assert np.mean(np.abs(residual)) < 0.1 * np.mean(ito)
    # ... and fails without the Ito term, by far more than its paired standard error.
    missing = np.asarray(sde.sigma1[:, -1, 0] - (sde.sigma1_ito[:, -1, 0] - sde.ito[:, -1, 0]))
    assert missing.mean() / (missing.std() / np.sqrt(missing.size)) > 50
    # The small-noise mean lies inside the SDE ensemble's interval too.
    pred = linear["pred"]
    assert np.all(np.abs(_z(mom.mean[k, 0], mom.mean_se[k, 0], pred.mean[1:5, 0])) < Z)
    # log sigma1 by Ito: d log = (drift + corr + ito) / sigma - (1/2) d<sigma> / sigma^2 + noise.
    log_sum = sde.log_drift + sde.log_noise + sde.log_ito + sde.log_quadratic_variation
    log_res = np.asarray(sde.log_bound - sde.log_bound[:, :1] - log_sum)[:, -1]
    assert np.mean(np.abs(log_res)) < 0.1 * np.mean(np.asarray(sde.log_ito[:, -1]))


# --------------------------------------------------------------------------------------------
# Bad input: clear errors before anything is compiled


@pytest.fixture
def no_compile(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("reached the compiled kernel")

    for module, name in (
        (sde_module, "_coefficients"),
        (sde_module, "_moments"),
        (sde_module, "_sde"),
        (covariance_module, "_noise_terms"),
    ):
        monkeypatch.setattr(module, name, boom)


def _good():
    rng = np.random.default_rng(0)
    A = jnp.asarray(_matrix(rng, 4, 3, [2.0, 1.0, 0.5]))
    return MatrixQuadratic(A), lspsde.IsotropicGaussian(1.0), A + 0.1


def _calls(objective, noise, theta, eta=0.01, n_steps=10, **kw):
    yield lambda: spectral_norm_moments(objective, noise, theta, eta, n_steps=n_steps, **kw)
    yield lambda: spectral_norm_sde(objective, noise, theta, eta, key=jax.random.key(0),
                                    n_paths=4, n_steps=n_steps, **kw)  # fmt: skip


def test_bad_theta_eta_and_horizon(no_compile):
    objective, noise, W = _good()
    vec = models.Quadratic(jnp.eye(3), jnp.zeros(3))
    degenerate = jnp.zeros((4, 3)).at[0, 0].set(2.0).at[1, 1].set(2.0)
    cases = [
        ((vec, noise, jnp.ones(3)), {}, ValueError, "no weight matrix: no 2-D floating leaf"),
        ((objective, noise, {"w": jnp.ones((0, 3))}), {}, ValueError, r"has zero size"),
        ((objective, noise, degenerate), {}, ValueError, r"degenerate.*gap sigma1 - sigma2 = 0"),
        ((objective, noise, W.at[0, 0].set(jnp.nan)), {}, ValueError, "not finite"),
        ((objective, noise, W), {"eta": 0.0}, ValueError, "`eta` must be finite and positive"),
        ((objective, noise, W), {"eta": -0.1}, ValueError, "`eta` must be finite and positive"),
        ((objective, noise, W), {"n_steps": -5}, ValueError, "negative horizon"),
        ((objective, noise, W), {"n_steps": 0}, ValueError, "`n_steps` must be >= 1"),
        ((objective, noise, W), {"order": 3}, ValueError, "`order` must be 1 or 2"),
        ((objective, lspsde.StudentTNoise(1.0, 2.0), W), {}, ValueError, "has no covariance"),
        (
            (objective, NoiseCovariance.isotropic(1.0, 12), W),
            {},
            TypeError,
            "parameter 'noise'|noise model",
        ),
        ((W, noise, W), {}, TypeError, "parameter 'objective'|`objective` must be"),
    ]
    # (the runtime type checker of the test run, or the function's own check, names a bad type)
    for args, kw, error, match in cases:
        for call in _calls(*args, **kw):
            with pytest.raises(error, match=match):
                call()
    with pytest.raises(ValueError, match=r"SDE solver|SDEs only"):
        spectral_norm_moments(objective, noise, W, 0.01, n_steps=5, solver=dfx.ShARK())
    with pytest.raises(TypeError, match=r"parameter .key.|PRNG key"):
        spectral_norm_sde(objective, noise, W, 0.01, key=0, n_paths=4, n_steps=5)
    # The coefficients: the same checks, and a covariance of the wrong size.
    with pytest.raises(ValueError, match="NoiseCovariance of size 10"):
        spectral_sde_coefficients(objective, NoiseCovariance.isotropic(1.0, 10), W, 0.1)
    with pytest.raises(ValueError, match="degenerate"):
        spectral_sde_coefficients(objective, noise, degenerate, 0.1)
    with pytest.raises(ValueError, match="no weight matrix"):
        spectral_sde_coefficients(vec, noise, jnp.ones(3), 0.1)


def test_bad_covariances(no_compile):
    _, _, W = _good()
    G = jnp.asarray(np.random.default_rng(0).standard_normal((10, 12)))
    with pytest.raises(ValueError, match=r"`batch_size` = 11 exceeds the 10 examples"):
        minibatch_covariance(G, 11)
    minibatch_covariance(G, 11, replace=True)  # fine with replacement
    with pytest.raises(ValueError, match="needs n >= 2"):
        minibatch_covariance(G[:1], 1)
    with pytest.raises(ValueError, match="different leading"):
        minibatch_covariance({"a": G, "b": G[:5]}, 2)
    with pytest.raises(ValueError, match="leading example axis"):
        minibatch_covariance(jnp.ones(5), 2)
    with pytest.raises(ValueError, match="not finite"):
        minibatch_covariance(G.at[0, 0].set(jnp.inf), 2)
    with pytest.raises(ValueError, match="not positive semidefinite"):
        NoiseCovariance.from_matrix(-jnp.eye(3))
    with pytest.raises(ValueError, match="not symmetric"):
        NoiseCovariance.from_matrix(jnp.eye(3).at[0, 1].set(1.0))
    with pytest.raises(ValueError, match="`variance` must be >= 0"):
        NoiseCovariance.isotropic(-1.0, 3)
    with pytest.raises(ValueError, match=r"`cov` has size 13 but `W` has 12"):
        spectral_noise_terms(W, NoiseCovariance.isotropic(1.0, 13))
    with pytest.raises(TypeError, match=r"parameter 'cov'|must be a NoiseCovariance"):
        spectral_noise_terms(W, jnp.eye(12))
    with pytest.raises((TypeError, ValueError), match=r"parameter 'W'|must be a matrix"):
        spectral_noise_terms(jnp.ones(12), NoiseCovariance.isotropic(1.0, 12))
