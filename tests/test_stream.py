r"""Non-stationary data (``lspsde.noise.stream``) against exact mean recursions.

A linear student $F(x) = \Theta x + b$ trained by online SGD on $y = W_t x + \varsigma_t\zeta$,
$x = m_t + s_t\xi$ (fresh draws every step, independent of the state), has an exactly linear
mean recursion: with $e = \Theta - W_t$,
$\mathbb{E}[G_\Theta] = \mathbb{E}[e](m m^\top + s^2 I) + \mathbb{E}[b] m^\top$ and
$\mathbb{E}[G_b] = \mathbb{E}[e] m + \mathbb{E}[b]$. The ensemble mean is tested against it
(95%-style intervals at 4 standard errors over many steps and entries), for a rotating teacher
and for a covariate shift; the label-noise schedule against the closed form
$\mathbb{E}\|G\|^2 = \varsigma_t^2 (s^2 d_{in} + 1) d_{out} / B$ at $\Theta = W_t$, $b = 0$.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lspsde
from lspsde.noise import (
    AbstractInputs,
    CovariateShift,
    DataStream,
    GaussianInputs,
    LinearTeacher,
    Piecewise,
    RotatingTeacher,
    StreamNoise,
)
from lspsde.objectives import SupervisedLoss, parameters

D_IN, D_OUT = 4, 2


def _student(theta_w):
    net = lspsde.Feedforward([theta_w], activation="identity")
    probes = jnp.asarray(np.random.default_rng(0).normal(size=(16, D_IN)))
    return SupervisedLoss(net, probes, jnp.zeros((16, D_OUT))), parameters(net)


def _teacher_weight():
    return jnp.asarray(np.random.default_rng(1).normal(size=(D_OUT, D_IN)))


def _mean_recursion(stream, theta0_w, eta, n_steps):
    """The exact E[Theta_t], E[b_t] of online SGD on ``stream`` (inputs independent of the
    state), t = 0..n_steps."""
    e_w, b = np.asarray(theta0_w), np.zeros(D_OUT)
    out = [e_w.copy()]
    for t in range(n_steps):
        W = np.asarray(stream.minimizer(t))
        m = np.asarray(stream.inputs.transform(t, jnp.zeros((1, D_IN))))[0]
        s = np.asarray(stream.inputs.transform(t, jnp.eye(D_IN)))[0, 0] - m[0]
        C = np.outer(m, m) + s**2 * np.eye(D_IN)
        g_w = (e_w - W) @ C + np.outer(b, m)
        g_b = (e_w - W) @ m + b
        e_w, b = e_w - eta * g_w, b - eta * g_b
        out.append(e_w.copy())
    return np.stack(out)


def _check_mean(ens, exact, steps):
    theta = np.asarray(ens.theta.weights[0])  # (path, step, D_OUT, D_IN)
    mean = theta.mean(axis=0)[steps]
    se = theta.std(axis=0, ddof=1)[steps] / np.sqrt(theta.shape[0])
    random = se > 1e-12  # step 0 is deterministic: equal, not within an interval
    np.testing.assert_allclose(mean[~random], exact[steps][~random], rtol=1e-12)
    z = (mean - exact[steps])[random] / se[random]
    assert np.max(np.abs(z)) < 4.5, np.max(np.abs(z))
    return z


def test_rotating_teacher_mean_follows_the_exact_recursion():
    W = _teacher_weight()
    stream = DataStream(GaussianInputs(D_IN), RotatingTeacher(W, rate=0.02), label_noise=0.3)
    objective, theta0 = _student(jnp.zeros((D_OUT, D_IN)))
    eta, T = 0.05, 200
    ens = lspsde.simulate(
        (objective, lspsde.SGD(eta), StreamNoise(stream, batch_size=4)),
        theta0,
        key=jax.random.key(0),
        n_paths=2000,
        n_steps=T,
        save_every=1,
    )
    exact = _mean_recursion(stream, np.zeros((D_OUT, D_IN)), eta, T)
    steps = np.arange(0, T + 1, 25)
    _check_mean(ens, exact, steps)
    # the teacher has turned by 4 rad; a static teacher's recursion is far off the ensemble
    static = DataStream(GaussianInputs(D_IN), LinearTeacher(W), label_noise=0.3)
    wrong = _mean_recursion(static, np.zeros((D_OUT, D_IN)), eta, T)
    with pytest.raises(AssertionError):
        _check_mean(ens, wrong, steps[1:])
    # rotation keeps the singular values of the teacher
    np.testing.assert_allclose(
        np.linalg.svd(np.asarray(stream.minimizer(123)), compute_uv=False),
        np.linalg.svd(np.asarray(W), compute_uv=False),
        rtol=1e-12,
    )


def test_covariate_shift_mean_follows_the_exact_recursion():
    W = _teacher_weight()
    after = GaussianInputs(mean=np.array([1.0, -0.5, 0.0, 0.5]), scale=0.5)
    stream = DataStream(
        CovariateShift(GaussianInputs(D_IN), after, at_step=60), LinearTeacher(W), 0.2
    )
    theta_w0 = np.asarray(W) + 0.5
    objective, theta0 = _student(jnp.asarray(theta_w0))
    eta, T = 0.1, 150
    ens = lspsde.simulate(
        (objective, lspsde.SGD(eta), StreamNoise(stream, batch_size=2)),
        theta0,
        key=jax.random.key(1),
        n_paths=2000,
        n_steps=T,
    )
    exact = _mean_recursion(stream, theta_w0, eta, T)
    _check_mean(ens, exact, np.arange(0, T + 1, 10))
    # chunking never changes a path
    ens3 = lspsde.simulate(
        (objective, lspsde.SGD(eta), StreamNoise(stream, batch_size=2)),
        theta0,
        key=jax.random.key(1),
        n_paths=7,
        n_steps=T,
        chunk_size=3,
    )
    np.testing.assert_array_equal(ens3.theta.weights[0], ens.theta.weights[0][:7])


def test_label_noise_schedule_sets_the_gradient_noise_at_each_step():
    W = _teacher_weight()
    levels = Piecewise([0.1, 0.8, 0.3], [50, 120])
    stream = DataStream(GaussianInputs(D_IN, scale=1.5), LinearTeacher(W), levels)
    objective, theta = _student(W)  # Theta = W_t, b = 0: G is the label noise alone
    B = 5
    noise = StreamNoise(stream, batch_size=B)
    keys = jax.random.split(jax.random.key(2), 20000)
    for t, level in [(0, 0.1), (49, 0.1), (50, 0.8), (119, 0.8), (120, 0.3), (999, 0.3)]:
        bound = noise.at_time(jnp.asarray(t))

        def sq(k, bound=bound):
            g = bound.gradient(objective, theta, bound.sample(k, theta))
            return sum(jnp.sum(a**2) for a in jax.tree.leaves(g))

        draws = np.asarray(jax.vmap(sq)(keys))
        want = level**2 * (1.5**2 * D_IN + 1) * D_OUT / B
        se = draws.std(ddof=1) / np.sqrt(len(draws))
        assert abs(draws.mean() - want) < 4 * se, (t, draws.mean(), want)


def test_profile_and_exponents_run_on_a_stream():
    W = _teacher_weight()
    stream = DataStream(GaussianInputs(D_IN), RotatingTeacher(W, 0.05), 0.1)
    objective, theta0 = _student(jnp.zeros((D_OUT, D_IN)))
    system = lspsde.LearningSystem(objective, lspsde.SGD(0.1), StreamNoise(stream, 3))
    prof = lspsde.learning_profile(system, theta0, key=jax.random.key(0), n_steps=10)
    assert bool(prof.converged) and np.all(np.isfinite(prof.sigma_u))
    assert np.all(np.asarray(prof.sigma_u) > 0)  # the step depends on the draws
    dist = lspsde.exponent_distribution(
        system, theta0, key=jax.random.key(0), n_paths=3, n_steps=10
    )
    assert np.all(np.isfinite(dist.alpha_theta))
    a1 = StreamNoise(stream, 3).assumption1(objective)
    assert a1.holds is False and "non-stationary" in a1.reason


def test_drift_beyond_the_horizon_is_refused_before_compiling():
    W = _teacher_weight()
    objective, theta0 = _student(jnp.zeros((D_OUT, D_IN)))
    late = DataStream(
        CovariateShift(GaussianInputs(D_IN), GaussianInputs(D_IN, scale=2.0), at_step=500),
        LinearTeacher(W),
    )
    kw = dict(key=jax.random.key(0), n_paths=2, n_steps=100)
    with pytest.raises(ValueError, match=r"step\(s\) \[500\].*horizon n_steps=100"):
        lspsde.simulate((objective, lspsde.SGD(0.1), StreamNoise(late, 2)), theta0, **kw)
    schedule = DataStream(GaussianInputs(D_IN), LinearTeacher(W), Piecewise([0.1, 0.2], [100]))
    with pytest.raises(ValueError, match="at or past the horizon"):
        lspsde.simulate((objective, lspsde.SGD(0.1), StreamNoise(schedule, 2)), theta0, **kw)
    system = lspsde.LearningSystem(objective, lspsde.SGD(0.1), StreamNoise(late, 2))
    with pytest.raises(ValueError, match="horizon"):
        lspsde.learning_profile(system, theta0, key=jax.random.key(0), n_steps=10)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: Piecewise([0.1, 0.2], []), ValueError, "one entry more"),
        (lambda: Piecewise([0.1, 0.2, 0.3], [50, 20]), ValueError, "increase"),
        (lambda: Piecewise([-0.1]), ValueError, ">= 0"),
        (lambda: Piecewise([0.1, 0.2], [-5]), ValueError, "boundaries"),
        (lambda: GaussianInputs(), ValueError, "dim"),
        (lambda: GaussianInputs(3, scale=0.0), ValueError, "scale"),
        (lambda: RotatingTeacher(np.ones((2, 3)), 0.1, plane=(1, 1)), ValueError, "plane"),
        (lambda: RotatingTeacher(np.ones((2, 1)), 0.1), ValueError, "d_in >= 2"),
        (
            lambda: CovariateShift(GaussianInputs(3), GaussianInputs(4), 10),
            ValueError,
            "dimension",
        ),
        (
            lambda: DataStream(GaussianInputs(3), LinearTeacher(np.ones((2, 4)))),
            ValueError,
            "dimension 4",
        ),
        (lambda: StreamNoise("data", 4), TypeError, "DataStream"),
    ],
)
def test_bad_stream_input(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_stream_needs_a_supervised_objective_of_the_right_shape():
    stream = DataStream(GaussianInputs(D_IN), LinearTeacher(_teacher_weight()))
    from models.objectives import Quadratic

    quad = Quadratic(jnp.eye(3), jnp.zeros(3))
    # checked before the abstract step: the message itself, not a failed step naming theta0
    with pytest.raises(TypeError, match=r"^StreamNoise needs an lspsde\.SupervisedLoss"):
        lspsde.simulate(
            (quad, lspsde.SGD(0.1), StreamNoise(stream, 2)),
            jnp.zeros(3),
            key=jax.random.key(0),
            n_paths=1,
            n_steps=2,
        )
    objective, theta0 = _student(jnp.zeros((D_OUT, D_IN)))
    other = DataStream(GaussianInputs(D_IN), LinearTeacher(np.ones((3, D_IN))))
    with pytest.raises(ValueError, match=r"^The stream draws"):
        lspsde.simulate(
            (objective, lspsde.SGD(0.1), StreamNoise(other, 2)),
            theta0,
            key=jax.random.key(0),
            n_paths=1,
            n_steps=2,
        )


class _AffineInputs(AbstractInputs):
    """x = b + A xi: a correlated law that only defines its transform (moments by default)."""

    A: jax.Array
    b: jax.Array
    dim: int = 3

    def transform(self, t, xi):
        return self.b[None, :] + (1.0 + 0.1 * t) * xi @ self.A.T


def test_input_moments_are_exact_and_match_the_draws():
    """``inputs.moments(t)``: GaussianInputs' (m, s^2 I), a shift's before/after at its step,
    the default (read off an affine transform) for a correlated law; and the draws' sample
    moments agree with them (50,000 draws, within 5 standard errors)."""
    A = jnp.array([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [0.0, -1.0, 0.5]])
    b = jnp.array([1.0, -2.0, 0.5])
    laws = {
        "gaussian": (GaussianInputs(mean=b, scale=0.7), 4, b, 0.49 * np.eye(3)),
        "affine": (_AffineInputs(A, b), 2, b, 1.2**2 * np.asarray(A @ A.T)),
        "shift, before": (
            CovariateShift(GaussianInputs(3), GaussianInputs(mean=b, scale=2.0), at_step=5),
            4,
            np.zeros(3),
            np.eye(3),
        ),
        "shift, at": (
            CovariateShift(GaussianInputs(3), GaussianInputs(mean=b, scale=2.0), at_step=5),
            5,
            b,
            4.0 * np.eye(3),
        ),
    }
    n = 50_000
    xi = jax.random.normal(jax.random.key(0), (n, 3))
    for name, (law, t, mean, cov) in laws.items():
        m, c = law.moments(t)
        mean, cov = np.asarray(mean), np.asarray(cov)
        np.testing.assert_allclose(m, mean, rtol=1e-12, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(c, cov, rtol=1e-12, atol=1e-12, err_msg=name)
        x = np.asarray(law.transform(t, xi))
        se = np.sqrt(np.diag(cov) / n)
        assert np.all(np.abs(x.mean(0) - mean) < 5 * se), name
        centred = x - mean
        emp = centred.T @ centred / n
        se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
        assert np.all(np.abs(emp - cov) < 5 * se_cov), name
