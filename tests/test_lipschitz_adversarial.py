r"""Adversarial ascent for the true Lipschitz constant (``lspsde.lipschitz.adversarial``).

References independent of the implementation: the spectral norm of a linear network's matrix
(NumPy's SVD); for a 1-hidden-layer ReLU network in 2-D, an exact enumeration of its
activation regions inside the box (one linear program per activation pattern, SciPy's HiGHS:
a pattern whose region has an interior point contributes $\|\sum_{i \text{ active}}
a_i w_i\|$); for a smooth network in 2-D, the largest $\|J\|_2$ over a $301 \times 301$ grid;
and the product bound $\prod_l\sigma_1(W_l)$ (1-Lipschitz activations).

**Measured** (float64, these seeds). Linear network: value $= \|W_2W_1\|_2$ to $1.1 \cdot
10^{-16}$ (relative) from every start and at every step, with every parametrisation of the
model. ReLU networks ($[-2, 2]^2$, 8 hidden units, 16 starts at grid points where $\|J\|$ is
smallest, ``smoothing=0.5``, ``step_size=1``, 300 steps): the ascent reaches the enumerated
maximum (to $10^{-15}$) on 15 of 20 random networks and lies strictly above the data-only
estimate on all 20 (median gain 8.4x); without smoothing it stays at the data-only value (to
rounding). The tanh network ($2 \to 16 \to 16 \to 2$, $[-3, 3]^2$): 2.56054 against the grid's
2.56048 (the grid's resolution), 13.9x the data-only 0.185, 0.14x the product bound 17.95.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

import lspsde
from lspsde.lipschitz import adversarial as adversarial_module
from lspsde.lipschitz import adversarial_lipschitz, lipschitz_estimate
from lspsde.objectives import SupervisedLoss, parameters
from lspsde.representation import Feedforward
import models

BOX = (-2.0, 2.0)


def _relu_net(key, hidden=8):
    k1, k2, k3 = jax.random.split(key, 3)
    W1 = jax.random.normal(k1, (hidden, 2))
    b1 = 0.7 * jax.random.normal(k2, (hidden,))
    W2 = jax.random.normal(k3, (1, hidden))
    return Feedforward([W1, W2], [b1, jnp.zeros(1)], activation="relu", final_activation=False)


def _enumerated_lipschitz(net, lo, hi):
    r"""$\max\|J\|$ over the activation regions of $a^\top\mathrm{relu}(Wx + b)$ that meet the
    open box: for each pattern $s$, maximise $\tau$ s.t. $\pm(w_i x + b_i) \ge \tau$, $x$ in
    the box; the region has interior points iff $\tau^* > 0$."""
    W, b = np.asarray(net.weights[0]), np.asarray(net.biases[0])
    a = np.asarray(net.weights[1])[0]
    h, best = W.shape[0], 0.0
    for pattern in itertools.product((0.0, 1.0), repeat=h):
        s = np.asarray(pattern)
        sign = 2 * s - 1
        A_ub = np.hstack([-(sign[:, None] * W), np.ones((h, 1))])
        res = linprog(
            [0.0, 0.0, -1.0], A_ub=A_ub, b_ub=sign * b, bounds=[(lo, hi), (lo, hi), (None, 1.0)]
        )
        if res.status == 0 and -res.fun > 1e-9:
            best = max(best, float(np.linalg.norm((s * a) @ W)))
    return best


def _grid(lo, hi, n):
    g = np.linspace(lo, hi, n)
    X, Y = np.meshgrid(g, g)
    return np.stack([X.ravel(), Y.ravel()], axis=1)


def _jacobian_norms(f, points):
    return np.asarray(
        jax.vmap(lambda x: jnp.linalg.svd(jax.jacfwd(f)(x), compute_uv=False)[0])(
            jnp.asarray(points)
        )
    )


def _badly_placed(f, lo, hi, n_starts=16):
    """``n_starts`` grid points of the box among the 800 where ||J|| is smallest."""
    grid = _grid(lo, hi, 201)
    order = np.argsort(_jacobian_norms(f, grid))
    return jnp.asarray(grid[order[: 50 * n_starts : 50]])


def _product_bound(net):
    return float(np.prod([np.linalg.norm(np.asarray(W), 2) for W in net.weights]))


# --------------------------------------------------------------------------------------------
# A linear network: L = ||W2 W1||_2 everywhere


def test_linear_network_attains_the_spectral_norm():
    key = jax.random.key(0)
    net = models.mlp(
        key, [5, 4, 3], activation="identity", init="gaussian", bias_std=0.3, final_activation=False
    )
    L = float(np.linalg.norm(np.asarray(net.weights[1] @ net.weights[0]), 2))
    x = jax.random.normal(jax.random.key(1), (6, 5))
    theta = parameters(net)
    objective = SupervisedLoss(net, x, jnp.zeros((6, 3)))
    forms = {
        "function": (net, None),
        "template": (net, theta),
        "objective": (objective, theta),
        "theta_function": (lambda th, z: objective.network(th)(z), theta),
    }
    for name, (model, th) in forms.items():
        res = adversarial_lipschitz(model, th, x, n_steps=20, step_size=0.5, key=key)
        assert abs(float(res.value) / L - 1) < 1e-8, name
        np.testing.assert_allclose(res.start_values, L, rtol=1e-8)
        np.testing.assert_allclose(res.data.norms, L, rtol=1e-8)
        assert res.history.shape == (6, 21) and res.maximisers.shape == (6, 5)
        assert np.all(np.asarray(res.history) <= L * (1 + 1e-12))
        assert bool(res.converged) and bool(res.data.converged)
    # The data-only estimate is lipschitz_estimate's, at the same inputs.
    est = lipschitz_estimate(net, x, rtol=1e-10)
    np.testing.assert_allclose(res.data.norms, est.norms, rtol=1e-12)
    # In a ball: the iterates stay there.
    ball = lspsde.Ball(0.0, 3.0)
    res = adversarial_lipschitz(
        net, None, x / 2, n_steps=20, step_size=4.0, key=key, constraint=ball
    )
    assert abs(float(res.value) / L - 1) < 1e-8
    assert np.all(np.linalg.norm(np.asarray(res.maximisers), axis=1) <= 3.0 * (1 + 1e-12))


# --------------------------------------------------------------------------------------------
# ReLU networks in 2-D: the exact maximum by enumerating activation regions


@pytest.fixture(scope="module")
def relu_runs():
    lo, hi = BOX
    box = lspsde.Box(lo, hi)
    out = []
    for seed in range(20):
        net = _relu_net(jax.random.key(seed))
        starts = _badly_placed(net, lo, hi)
        res = adversarial_lipschitz(
            net,
            None,
            starts,
            n_steps=300,
            step_size=1.0,
            key=jax.random.key(1),
            constraint=box,
            smoothing=0.5,
        )
        out.append((net, starts, res, _enumerated_lipschitz(net, lo, hi)))
    return out


def test_relu_ascent_reaches_the_enumerated_maximum(relu_runs):
    reached, gains = 0, []
    for net, _, res, L in relu_runs:
        value, data = float(res.value), float(res.data.value)
        # every value is a lower bound: never above the true L (rounding only)
        assert value <= L * (1 + 1e-12) and np.all(np.asarray(res.history) <= L * (1 + 1e-12))
        assert value > data  # strictly above the data-only estimate, on every network
        assert value <= _product_bound(net) * (1 + 1e-12)
        m = np.asarray(res.maximisers)
        assert np.all((m >= BOX[0]) & (m <= BOX[1]))
        reached += abs(value - L) < 1e-6 * L
        gains.append(value / data)
    print(f"reached the enumerated L on {reached}/20; median gain {np.median(gains):.3g}x")
    assert reached >= 13  # measured: 15 of 20 (a local method: the gap is not certified)
    # network 0: the data sit where ||J|| = 0.157 and the maximum is 4.405
    net, _, res, L = relu_runs[0]
    assert abs(float(res.value) - L) < 1e-6
    assert float(res.data.value) < 0.05 * L
    assert float(res.value) == pytest.approx(float(res.start_values.max()))
    assert int(res.index) == int(np.argmax(np.asarray(res.start_values)))
    x_star = res.maximiser
    np.testing.assert_allclose(
        float(jnp.linalg.norm(jax.jacfwd(net)(x_star))), float(res.value), rtol=1e-12
    )


def test_without_smoothing_relu_ascent_stays_put(relu_runs):
    net, starts, _, _ = relu_runs[0]
    res = adversarial_lipschitz(
        net,
        None,
        starts,
        n_steps=50,
        step_size=1.0,
        key=jax.random.key(1),
        constraint=lspsde.Box(*BOX),
    )
    np.testing.assert_allclose(res.value, res.data.value, rtol=1e-12)


def test_best_value_is_monotone_and_bounds_the_history(relu_runs):
    for _, _, res, _ in relu_runs[:5]:
        best = np.asarray(res.best_history)
        assert np.all(np.diff(best, axis=1) >= 0)
        np.testing.assert_array_equal(best, np.maximum.accumulate(np.asarray(res.history), 1))
        np.testing.assert_allclose(best[:, 0], res.data.norms, rtol=0)
        # each start's final (exact) value is at least its best recorded one, and its start
        final = np.asarray(res.start_values)
        assert np.all(final >= best[:, -1] * (1 - 1e-10))
        assert np.all(final >= np.asarray(res.data.norms))


# --------------------------------------------------------------------------------------------
# A smooth network: the exact gradient (smoothing = 0)


def test_smooth_network_ascent_reaches_the_grid_maximum():
    lo, hi = -3.0, 3.0
    net = models.mlp(
        jax.random.key(4),
        [2, 16, 16, 2],
        activation="tanh",
        init="gaussian",
        sigma_w=1.5,
        bias_std=0.5,
        final_activation=False,
    )
    grid_max = float(_jacobian_norms(net, _grid(lo, hi, 301)).max())
    starts = _badly_placed(net, lo, hi)
    res = adversarial_lipschitz(
        net,
        None,
        starts,
        n_steps=200,
        step_size=0.5,
        key=jax.random.key(0),
        constraint=lspsde.Box(lo, hi),
    )
    value, data, bound = float(res.value), float(res.data.value), _product_bound(net)
    print(
        f"tanh: data {data:.4f}, adversarial {value:.6f}, grid {grid_max:.6f}, product {bound:.4f}"
    )
    assert data < value <= bound
    assert value >= grid_max * (1 - 1e-5)  # within the grid's resolution (or above it)
    assert value > 2 * data


def test_data_adversarial_product_ordering_and_vmap_over_parameters():
    """An 8-input ReLU classifier: data-only <= adversarial <= product bound, for an ensemble of
    parameters at once (``jax.vmap`` over theta), equal to one call per parameter."""
    net = models.mlp(
        jax.random.key(2),
        [8, 16, 16, 1],
        activation="relu",
        init="gaussian",
        bias_std=0.2,
        final_activation=False,
    )
    x = jax.random.normal(jax.random.key(3), (12, 8))
    objective = SupervisedLoss(net, x, jnp.zeros((12, 1)))
    theta = parameters(net)
    thetas = jax.tree.map(lambda a: jnp.stack([a, 1.3 * a, 0.7 * a]), theta)
    kw = dict(n_steps=40, step_size=0.5, key=jax.random.key(5), smoothing=0.3)
    batched = jax.vmap(lambda th: adversarial_lipschitz(objective, th, x, **kw))(thetas)
    for p in range(3):
        th = jax.tree.map(lambda a: a[p], thetas)
        one = adversarial_lipschitz(objective, th, x, **kw)
        np.testing.assert_allclose(batched.value[p], one.value, rtol=1e-10)
        bound = _product_bound(objective.network(th))
        assert float(one.data.value) <= float(one.value) <= bound * (1 + 1e-12)


# --------------------------------------------------------------------------------------------
# Bad input: clear errors before anything is compiled


@pytest.fixture
def no_compile(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("reached the compiled kernel")

    monkeypatch.setattr(adversarial_module, "_kernel_jit", boom)


def test_bad_input_is_rejected_before_compiling(no_compile):
    net = _relu_net(jax.random.key(0))
    x = jnp.zeros((3, 2))
    key = jax.random.key(0)
    ok = dict(n_steps=5, step_size=0.1, key=key)

    def call(model=net, theta=None, inputs=x, **kw):
        return adversarial_lipschitz(model, theta, inputs, **{**ok, **kw})

    cases = [
        (dict(inputs=x.at[1, 0].set(jnp.nan)), ValueError, r"not finite.*index \(1, 0\)"),
        (dict(inputs=x.at[0, 1].set(jnp.inf)), ValueError, "not finite"),
        (dict(inputs=jnp.zeros(2)), ValueError, r"non-empty \(n, d\)"),
        (dict(inputs=jnp.zeros((0, 2))), ValueError, r"non-empty \(n, d\)"),
        (dict(inputs=jnp.zeros((3, 2), int)), TypeError, "real floating dtype|parameter 'inputs'"),
        (dict(step_size=0.0), ValueError, "`step_size` must be finite and positive"),
        (dict(step_size=-1.0), ValueError, "`step_size` must be finite and positive"),
        (dict(step_size=float("nan")), ValueError, "`step_size` must be finite and positive"),
        (
            dict(step_size=jnp.ones(2)),
            (TypeError, ValueError),
            "must be a scalar|parameter 'step_size'",
        ),
        (dict(n_steps=0), ValueError, "`n_steps` must be >= 1"),
        (dict(n_steps=-3), ValueError, "`n_steps` must be >= 1"),
        (dict(n_steps=2.5), TypeError, "`n_steps` must be a Python int|parameter 'n_steps'"),
        (dict(smoothing=-0.1), ValueError, "`smoothing` must be finite and non-negative"),
        (dict(n_samples=0), ValueError, "`n_samples` must be >= 1"),
        (dict(n_power=0), ValueError, "`n_power` must be >= 1"),
        (dict(key=3), TypeError, "key"),
        (
            dict(constraint="box"),
            TypeError,
            "`constraint` must be None or an lspsde constraint|parameter 'constraint'",
        ),
        (dict(constraint=lspsde.Box(1.0, 2.0)), ValueError, "3 of the 3 start points lie outside"),
        (dict(model=3), TypeError, "`model` must be callable|parameter 'model'"),
        (dict(theta={"w": jnp.array([jnp.nan])}, model=lambda th, z: z), ValueError, "not finite"),
        (dict(model=lambda z: jnp.arange(3)), TypeError, "floating"),
        (dict(model=lambda z: z @ jnp.ones((5, 2))), (TypeError, ValueError), "model|dot_general"),
    ]
    for kw, error, match in cases:
        with pytest.raises(error, match=match):
            call(**kw)
