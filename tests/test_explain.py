"""Explanation stability (Section 7.4): saliency and integrated gradients against closed forms,
their matrix-free sensitivities against dense Jacobians, the convergence orders of the
integrated-gradients quadrature, and explanations along an SGD ensemble."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lspsde
from lspsde.explain import (
    Attribution,
    ExplanationSensitivity,
    ExplanationTrajectory,
    IntegratedGradients,
    Saliency,
    explanation_sensitivity,
    explanation_trajectory,
    integrated_gradients,
    model_function,
    quadrature_rule,
    saliency,
)
import models
from models.objectives import LeastSquares

D = 6


def _rand(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


# Module-level model functions: the same objects every call, so compiled programs are reused.
def linear(theta, x):
    r"""$F(x) = w^\top x + b$."""
    return theta["w"] @ x + theta["b"]


def quadratic(theta, x):
    r"""$F(x) = \frac12 x^\top A x + w^\top x$ (the saliency is $\frac12(A + A^\top)x + w$)."""
    return 0.5 * x @ (theta["A"] @ x) + theta["w"] @ x


def logistic(theta, x):
    r"""$F(x) = \sigma(w^\top x + b)$."""
    return jax.nn.sigmoid(theta["w"] @ x + theta["b"])


def tanh_layer(theta, x):
    r"""$\tanh(W x + b)$, a vector: explained through ``output``."""
    return jnp.tanh(theta["W"] @ x + theta["b"])


def smooth(theta, x):
    r"""$\sum \sin(W x) + \frac12 \tanh(v^\top x)^2$: a smooth non-polynomial model."""
    return jnp.sum(jnp.sin(theta["W"] @ x)) + 0.5 * jnp.tanh(theta["v"] @ x) ** 2


def dot(theta, x):
    r"""Linear regression $F_\theta(x) = \theta^\top x$: its saliency is $\theta$ itself."""
    return theta @ x


def image(theta, x):
    r"""$F(x) = \sum_{ij} W_{ij} x_{ij}$ on a matrix-shaped input."""
    return jnp.sum(theta * x)


def _linear_theta():
    return {"w": _rand(0, (D,)), "b": jnp.array(0.3)}


# --------------------------------------------------------------------------------------------
# Linear and quadratic models: closed forms
# --------------------------------------------------------------------------------------------


def test_linear_model_closed_forms():
    theta = _linear_theta()
    w = np.asarray(theta["w"])
    x, x0 = _rand(1, (D,)), _rand(2, (D,))

    np.testing.assert_array_equal(saliency(linear, theta, x), w)  # exactly: d(w.x)/dx = w
    ig = integrated_gradients(linear, theta, x, baseline=x0, n_points=3)
    assert isinstance(ig, Attribution) and (ig.n_points, ig.rule) == (3, "gauss_legendre")
    np.testing.assert_allclose(ig.attribution, (x - x0) * w, rtol=1e-14, atol=1e-15)
    assert abs(float(ig.completeness_error)) < 1e-14
    np.testing.assert_allclose(ig.output_change, w @ (x - x0), rtol=1e-14)
    # Every rule integrates a constant integrand exactly.
    for rule, m in (("riemann_right", 1), ("midpoint", 1), ("trapezoid", 2)):
        ig_r = integrated_gradients(linear, theta, x, baseline=x0, n_points=m, rule=rule)
        np.testing.assert_allclose(ig_r.attribution, ig.attribution, rtol=1e-14, atol=1e-15)

    # Saliency: dS/dx = 0 (zero Hessian); dS/dtheta = [I | 0] (w, then b), norm 1.
    sens = explanation_sensitivity(linear, theta, x)
    assert isinstance(sens, ExplanationSensitivity) and sens.method == "saliency"
    assert float(sens.input_norm) == 0.0
    np.testing.assert_allclose(sens.parameter_norm, 1.0, rtol=1e-13)
    assert bool(sens.converged)
    # IG: dIG/dx = diag(w) (baseline fixed), dIG/dw = diag(x - x'): max |w|, max |x - x'|.
    sens = explanation_sensitivity(
        linear, theta, x, explanation=IntegratedGradients(x0, n_points=2)
    )
    assert sens.method == "integrated_gradients"
    np.testing.assert_allclose(sens.explanation, (x - x0) * w, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(sens.input_norm, np.abs(w).max(), rtol=1e-12)
    np.testing.assert_allclose(sens.parameter_norm, np.abs(x - x0).max(), rtol=1e-12)
    assert bool(sens.converged)


def test_image_shaped_input():
    W, x, x0 = _rand(50, (3, 4)), _rand(51, (3, 4)), _rand(52, (3, 4))
    np.testing.assert_array_equal(saliency(image, W, x), W)
    ig = integrated_gradients(image, W, x, baseline=x0, n_points=2)
    np.testing.assert_allclose(ig.attribution, (x - x0) * W, rtol=1e-14, atol=1e-15)
    sens = explanation_sensitivity(image, W, x)
    assert sens.explanation.shape == (3, 4) and float(sens.input_norm) == 0.0
    np.testing.assert_allclose(sens.parameter_norm, 1.0, rtol=1e-13)


DQ = 100  # the quadratic model's input dimension: above max_steps=64, so Lanczos is truncated


def _spectrum_matrix(seed, ends, interior):
    """A symmetric (DQ, DQ) matrix with eigenvalues ``ends`` and DQ - len(ends) of them spread
    uniformly over ``interior``, in a random orthonormal basis."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    q, _ = jnp.linalg.qr(jax.random.normal(k1, (DQ, DQ)))
    inner = jax.random.uniform(k2, (DQ - len(ends),), minval=interior[0], maxval=interior[1])
    eigs = jnp.concatenate([jnp.asarray(ends), inner])
    A = q @ jnp.diag(eigs) @ q.T
    return 0.5 * (A + A.T)


CASES = {
    # definite; indefinite with |lambda_min| > lambda_max; a tie |lambda_min| = lambda_max
    # (the norm sits at both ends); and a top pair 1e-9 apart (a tight cluster).
    "spd": ([0.1, 3.5], (0.2, 2.5)),
    "indefinite": ([-4.0, 2.5], (-3.0, 2.0)),
    "tie": ([-2.0, 2.0], (-1.6, 1.6)),
    "cluster": ([0.3, 3.0 - 1e-9, 3.0], (0.5, 2.4)),
}


@pytest.mark.parametrize("case", CASES)
def test_quadratic_model_input_hessian(case):
    A = _spectrum_matrix(3, *CASES[case])
    theta = {"A": A, "w": _rand(4, (DQ,))}
    x, x0 = _rand(5, (DQ,)), _rand(6, (DQ,))
    An, xn, x0n, wn = (np.asarray(a) for a in (A, x, x0, theta["w"]))

    np.testing.assert_allclose(saliency(quadratic, theta, x), An @ xn + wn, rtol=1e-12)
    sens = explanation_sensitivity(quadratic, theta, x, rtol=1e-10)
    norm_A = np.abs(np.linalg.eigvalsh(An)).max()
    np.testing.assert_allclose(sens.input_norm, norm_A, rtol=1e-9)
    # dS/dA_kl = (delta_ik x_l + delta_il x_k) / 2 and dS/dw = I: J J^T = (|x|^2 I + x x^T)/2 + I.
    np.testing.assert_allclose(sens.parameter_norm, np.sqrt(1 + xn @ xn), rtol=1e-10)
    assert bool(sens.converged)

    # IG: the integrand is linear in a, so Gauss-Legendre with one node is exact:
    # IG = (x - x') * (A (x + x')/2 + w); dIG/dx = diag(A m + w) + diag(x - x') A / 2.
    m = 0.5 * (xn + x0n)
    ig = integrated_gradients(quadratic, theta, x, baseline=x0, n_points=1)
    np.testing.assert_allclose(ig.attribution, (xn - x0n) * (An @ m + wn), rtol=1e-12)
    assert abs(float(ig.completeness_error)) < 1e-12
    ig = IntegratedGradients(x0, n_points=1)
    sens = explanation_sensitivity(quadratic, theta, x, explanation=ig, rtol=1e-10)
    J = np.diag(An @ m + wn) + np.diag(xn - x0n) @ An / 2
    np.testing.assert_allclose(sens.input_norm, np.linalg.norm(J, 2), rtol=1e-9)
    assert bool(sens.converged)


# --------------------------------------------------------------------------------------------
# Nonlinear single-layer models: against dense Jacobians
# --------------------------------------------------------------------------------------------

K = 4  # tanh layer width


def _dense_norms(F, theta, x, explain):
    """``(||dE/dx||_2, ||dE/dtheta||_2)`` from dense ``jax.jacfwd`` Jacobians and NumPy SVD."""
    Jx = np.asarray(jax.jacfwd(lambda z: explain(F, theta, z))(x))
    Jth = jax.jacfwd(lambda th: explain(F, th, x))(theta)
    Jth = np.concatenate([np.reshape(a, (x.size, -1)) for a in jax.tree.leaves(Jth)], axis=1)
    return np.linalg.svd(Jx, compute_uv=False)[0], np.linalg.svd(Jth, compute_uv=False)[0]


@pytest.mark.parametrize("explanation", [Saliency(), IntegratedGradients(n_points=8)])
@pytest.mark.parametrize("model", ["logistic", "tanh"])
def test_nonlinear_sensitivities_match_dense(model, explanation):
    x = _rand(7, (D,))
    if model == "logistic":
        model_fn, output = logistic, None
        theta = {"w": _rand(8, (D,)), "b": jnp.array(-0.2)}
        F = logistic
    else:
        model_fn, output = tanh_layer, 2  # the third unit's "logit"
        theta = {"W": 0.7 * _rand(9, (K, D)), "b": _rand(10, (K,))}
        F = lambda th, z: tanh_layer(th, z)[2]
    sens = explanation_sensitivity(model_fn, theta, x, explanation=explanation, output=output)
    in_norm, th_norm = _dense_norms(F, theta, x, explanation.explain)
    np.testing.assert_allclose(sens.explanation, explanation.explain(F, theta, x), rtol=1e-14)
    np.testing.assert_allclose(sens.input_norm, in_norm, rtol=1e-8)
    np.testing.assert_allclose(sens.parameter_norm, th_norm, rtol=1e-8)
    assert bool(sens.converged)
    if isinstance(explanation, Saliency):  # and the saliency itself against jax.grad
        np.testing.assert_allclose(
            saliency(model_fn, theta, x, output=output), jax.grad(F, argnums=1)(theta, x)
        )


# --------------------------------------------------------------------------------------------
# Integrated gradients: completeness and the convergence order of each rule
# --------------------------------------------------------------------------------------------


def _smooth_problem():
    theta = {"W": 0.8 * _rand(11, (3, D)), "v": _rand(12, (D,))}
    return theta, 1.5 * _rand(13, (D,)), -0.5 * _rand(14, (D,))


def _completeness_errors(rule, ns):
    theta, x, x0 = _smooth_problem()
    errs = []
    for n in ns:
        ig = integrated_gradients(smooth, theta, x, baseline=x0, n_points=int(n), rule=rule)
        errs.append(abs(float(ig.completeness_error)))
    return np.array(errs), float(ig.output_change)


@pytest.mark.parametrize(
    ("rule", "order"), [("riemann_right", 1), ("midpoint", 2), ("trapezoid", 2)]
)
def test_ig_completeness_order(rule, order):
    ns = np.array([16, 32, 64, 128, 256])
    errs, change = _completeness_errors(rule, ns)
    assert abs(change) > 0.1  # a nontrivial output change to be accounted for
    slope = np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope + order) < 0.1, (slope, errs)
    assert np.all(np.diff(errs) < 0)


def test_ig_gauss_legendre_converges_geometrically():
    ns = [2, 4, 8, 16, 24]
    errs, change = _completeness_errors("gauss_legendre", ns)
    assert np.all(np.diff(errs[:4]) < 0)
    assert errs[1] / errs[0] < 0.1 and errs[2] / errs[1] < 1e-2  # faster than any power
    assert errs[-1] < 1e-13 * max(1.0, abs(change))  # completeness to rounding
    # For comparison, the paper's right Riemann sum at 24 points is off by ~1e-2.
    assert _completeness_errors("riemann_right", [24])[0][0] > 1e6 * errs[-1]


def test_quadrature_rules():
    poly = lambda a: 7 * a**7 - 3 * a**4 + a  # integral 7/8 - 3/5 + 1/2
    for m in (1, 2, 4):  # Gauss-Legendre is exact to degree 2m - 1
        a, w = quadrature_rule("gauss_legendre", m)
        assert (a.shape, w.shape) == ((m,), (m,)) and np.all((0 < a) & (a < 1))
        if 2 * m - 1 >= 7:
            np.testing.assert_allclose(w @ poly(a), 7 / 8 - 3 / 5 + 1 / 2, rtol=1e-14)
    for rule in ("trapezoid", "midpoint", "riemann_right", "gauss_legendre"):
        np.testing.assert_allclose(quadrature_rule(rule, 5)[1].sum(), 1.0, rtol=1e-15)
    np.testing.assert_allclose(quadrature_rule("riemann_right", 4)[0], [0.25, 0.5, 0.75, 1.0])


# --------------------------------------------------------------------------------------------
# Along training: an SGD ensemble of linear regression
# --------------------------------------------------------------------------------------------


def _regression(d=4, n=64):
    A = _rand(20, (n, d))
    b = A @ jnp.arange(1.0, d + 1) + 0.1 * _rand(21, (n,))
    return LeastSquares(A, b)


def test_trajectory_linear_saliency_is_theta():
    objective = _regression()
    d, eta, sigma = 4, 0.1, 0.5
    ens = lspsde.simulate(
        (objective, lspsde.SGD(step_size=eta), lspsde.IsotropicGaussian(sigma)),
        jnp.zeros(d),
        key=jax.random.key(0),
        n_paths=32,
        n_steps=40,
        save_every=10,
    )
    x = _rand(22, (d,))
    traj = explanation_trajectory(dot, ens, x)
    assert isinstance(traj, ExplanationTrajectory) and traj.method == "saliency"
    theta = np.asarray(ens.theta)  # (path, step, d)
    # The saliency of F(x) = theta.x is theta^t itself, bit for bit ...
    np.testing.assert_array_equal(traj.explanations, theta)
    np.testing.assert_array_equal(traj.steps, ens.steps)
    # ... so its path spread is the ensemble's parameter spread, sqrt(tr Cov_p(theta^t)).
    spread = np.sqrt(theta.var(axis=0, ddof=1).sum(-1))
    np.testing.assert_allclose(traj.spread, spread, rtol=1e-13)
    assert traj.spread[0] == 0.0 and np.all(traj.spread[1:] > 0)
    np.testing.assert_allclose(traj.mean, theta.mean(0), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(
        traj.drift, np.linalg.norm(theta - theta[:, :1], axis=-1), rtol=1e-13, atol=1e-15
    )
    np.testing.assert_allclose(traj.mean_drift(), traj.drift.mean(0), rtol=1e-13)
    # dS/dx = 0 and dS/dtheta = I at every (path, step).
    np.testing.assert_array_equal(traj.input_norm, 0.0)
    np.testing.assert_allclose(traj.parameter_norm, 1.0, rtol=1e-13)
    assert bool(traj.converged) and bool(traj.alive.all())

    tree = lspsde.to_datatree(traj, attrs={"study": "test"})
    assert tree["explanation"]["explanation"].dims == ("path", "step", "x_dim_0")
    assert tree["sensitivity"]["parameter_norm"].dims == ("path", "step")
    assert tree.attrs["study"] == "test" and tree.attrs["method"] == "saliency"
    for node in tree.subtree:  # every variable and coordinate describes itself (CF)
        for name, var in node.ds.variables.items():
            assert var.attrs.get("long_name") and "units" in var.attrs, name
    assert "saliency" in tree["explanation"]["explanation"].attrs["long_name"]


def test_trajectory_spread_matches_sgd_covariance():
    r"""With $\theta^0$ fixed, $\mathrm{Cov}(\theta^t) = \Sigma_t$, $\Sigma_{t+1} = M\Sigma_t M^\top
    + \eta^2\sigma^2/d\,I$, $M = I - \eta H$: the saliency spread$^2$ estimates $\mathrm{tr}\,
    \Sigma_t$; checked within 4 standard errors (Monte Carlo, 2048 paths)."""
    objective = _regression()
    d, eta, sigma, P = 4, 0.1, 0.5, 2048
    ens = lspsde.simulate(
        (objective, lspsde.SGD(step_size=eta), lspsde.IsotropicGaussian(sigma)),
        jnp.zeros(d),
        key=jax.random.key(1),
        n_paths=P,
        n_steps=30,
        save_every=10,
    )
    traj = explanation_trajectory(dot, ens, _rand(23, (d,)), sensitivity=False)
    assert traj.input_norm is None and traj.parameter_norm is None
    H = np.asarray(objective.A.T @ objective.A) / objective.A.shape[0]
    M = np.eye(d) - eta * H
    S, tr = np.zeros((d, d)), []
    for t in range(31):
        if t % 10 == 0:
            tr.append(np.trace(S))
        S = M @ S @ M.T + eta**2 * sigma**2 / d * np.eye(d)
    e = np.asarray(traj.explanations)
    sq = ((e - e.mean(0)) ** 2).sum(-1)  # per-path squared deviations, (path, step)
    se = sq.std(axis=0, ddof=1) / np.sqrt(P)
    np.testing.assert_allclose(traj.spread[0], 0.0)
    assert np.all(np.abs(np.asarray(traj.spread[1:]) ** 2 - tr[1:]) < 4 * se[1:]), (
        np.asarray(traj.spread) ** 2,
        tr,
        se,
    )


def test_trajectory_of_stacked_parameters_masks_nonfinite():
    theta = np.array(_rand(24, (3, 5, D)))  # (path, step, d)
    theta[1, 3:] = np.nan  # a path that blew up at step 3
    x = _rand(25, (D,))
    traj = explanation_trajectory(dot, jnp.asarray(theta), x, batch_size=4)
    alive = np.ones((3, 5), bool)
    alive[1, 3:] = False
    np.testing.assert_array_equal(traj.alive, alive)
    np.testing.assert_array_equal(traj.steps, np.arange(5))
    good = theta[[0, 2], 3]
    np.testing.assert_allclose(traj.mean[3], good.mean(0), rtol=1e-14)
    np.testing.assert_allclose(traj.spread[3], np.sqrt(good.var(axis=0, ddof=1).sum()), rtol=1e-13)
    np.testing.assert_allclose(traj.spread[:3], np.sqrt(theta[:, :3].var(0, ddof=1).sum(-1)))
    assert bool(traj.converged)  # non-finite (path, step) do not count
    np.testing.assert_allclose(traj.parameter_norm[alive], 1.0, rtol=1e-13)


def test_trajectory_of_a_trained_network():
    """A tanh network trained by SGD (``SupervisedLoss``): the trajectory's explanations are the
    saliency maps of each saved network, and its sensitivities those of each theta^t_p."""
    key = jax.random.key(60)
    data = models.teacher_student(key, n=32, d_in=3, d_out=1)
    net = models.mlp(key, [3, 5, 1], activation="tanh", init="gaussian", final_activation=False)
    ens = lspsde.simulate(
        (
            lspsde.SupervisedLoss(net, data.inputs, data.targets),
            lspsde.SGD(step_size=0.1),
            lspsde.IsotropicGaussian(0.3),
        ),
        lspsde.parameters(net),
        key=jax.random.key(61),
        n_paths=3,
        n_steps=20,
        save_every=10,
    )
    model_fn, _ = model_function(net)
    x = data.inputs[0]
    traj = explanation_trajectory(model_fn, ens, x, output=0)
    assert traj.explanations.shape == (3, 3, 3) and bool(traj.converged)
    theta_pt = jax.tree.map(lambda a: a[2, 1], ens.theta)
    sens = explanation_sensitivity(model_fn, theta_pt, x, output=0)
    np.testing.assert_allclose(traj.explanations[2, 1], sens.explanation, rtol=1e-13)
    np.testing.assert_allclose(traj.input_norm[2, 1], sens.input_norm, rtol=1e-10)
    np.testing.assert_allclose(traj.parameter_norm[2, 1], sens.parameter_norm, rtol=1e-10)
    assert np.all(np.asarray(traj.drift[:, 1:]) > 0) and np.all(np.asarray(traj.spread[1:]) > 0)


def test_equinox_model_and_no_recompile():
    net = eqx.nn.MLP(D, 3, 8, 1, activation=jnp.tanh, key=jax.random.key(30))
    model_fn, theta = model_function(net)
    x = _rand(31, (D,))
    s = saliency(model_fn, theta, x, output=1)
    np.testing.assert_allclose(s, jax.grad(lambda z: net(z)[1])(x), rtol=1e-14)
    # The same model_fn object again: the compiled program is reused (no new trace).
    counts = {"n": 0}

    def counted(theta, x):
        counts["n"] += 1
        return linear(theta, x)

    theta_l = _linear_theta()
    saliency(counted, theta_l, x)
    n = counts["n"]
    saliency(counted, jax.tree.map(lambda a: 2 * a, theta_l), 3 * x)
    assert counts["n"] == n


# --------------------------------------------------------------------------------------------
# Errors before compilation
# --------------------------------------------------------------------------------------------


def _type_error(name):
    """A ``TypeError`` about argument ``name``: the library's own message, or, when the test run
    type-checks annotations (``--jaxtyping-packages``), jaxtyping's, which fires first."""
    return pytest.raises(TypeError, match=f"`{name}`|parameter '{name}'")


def test_bad_inputs_raise_clear_errors():
    theta = _linear_theta()
    x = _rand(40, (D,))
    vec = {"W": _rand(41, (K, D)), "b": jnp.zeros(K)}
    with pytest.raises(ValueError, match="not a scalar; pass `output=c`"):
        saliency(tanh_layer, vec, x)
    with pytest.raises(ValueError, match="out of range"):
        saliency(tanh_layer, vec, x, output=K)
    with pytest.raises(ValueError, match="has 2 indices"):
        saliency(tanh_layer, vec, x, output=(0, 1))
    with _type_error("output"):
        saliency(tanh_layer, vec, x, output=1.5)
    with pytest.raises(ValueError, match=r"failed for `x` of shape \(7,\)"):
        saliency(linear, theta, jnp.ones(D + 1))
    with pytest.raises(ValueError, match="`baseline` has shape"):
        integrated_gradients(linear, theta, x, baseline=jnp.zeros(D + 1))
    with pytest.raises(ValueError, match="`n_points` must be >= 1"):
        integrated_gradients(linear, theta, x, n_points=0)
    with pytest.raises(ValueError, match="`n_points` must be >= 2"):
        IntegratedGradients(n_points=1, rule="trapezoid")
    with _type_error("n_points"):
        IntegratedGradients(n_points=4.0)
    with pytest.raises(ValueError, match="Unknown quadrature `rule`"):
        IntegratedGradients(rule="simpson")
    with pytest.raises(ValueError, match="`x` contains NaN or inf"):
        saliency(linear, theta, x.at[2].set(jnp.inf))
    with pytest.raises(ValueError, match="`baseline` contains NaN or inf"):
        IntegratedGradients(baseline=jnp.full(D, jnp.nan))
    with pytest.raises(ValueError, match="`theta` contains NaN or inf"):
        saliency(linear, {"w": theta["w"], "b": jnp.array(jnp.nan)}, x)
    with _type_error("x"):
        saliency(linear, theta, jnp.arange(D))
    with _type_error("explanation"):
        explanation_sensitivity(linear, theta, x, explanation="saliency")
    with pytest.raises(ValueError, match="leading \\(path, step\\)"):
        explanation_trajectory(dot, jnp.ones(D), x)
    with _type_error("rtol"):
        explanation_sensitivity(linear, theta, x, rtol="small")
    ens = lspsde.simulate(
        (_regression(d=D), lspsde.SGD(step_size=0.1), lspsde.IsotropicGaussian(0.1)),
        jnp.zeros(D),
        key=jax.random.key(2),
        n_paths=2,
        n_steps=2,
        save="summary",
    )
    with pytest.raises(ValueError, match='save="summary"'):
        explanation_trajectory(dot, ens, x)
    with _type_error("model"):
        model_function(lambda x: x)
