"""Per-path exponent distributions: closed forms on quadratics, path-by-path agreement with
``learning_profile`` / ``simulate`` / dense Jacobians, chunking, divergence, ArviZ output.

Compile time dominates, so the quadratic ensembles share d = 4, T = 10, save_every = 2 and chunks
of 4 paths, and three compiled ensemble programs serve most tests: additive noise with dense norms
(exact SVDs: the smallest program) and with matrix-free Lanczos norms (the default route), and
state-dependent noise with dense norms. One more covers a network's parameter pytree and the
depth blocks."""

import math

import equinox as eqx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import PyTree
import numpy as np
import pytest
import xarray as xr

import lspsde
import lspsde._ensemble
from lspsde._simulate import simulate
import lspsde.distributions as distributions
from lspsde.distributions import EXPONENT_NAMES, ExponentDistribution, exponent_distribution
from lspsde.energy import RecursionFit, dissipation_rate
from lspsde.exponents import stability_exponents
from lspsde.noise import GaussianNoise, IsotropicGaussian
from lspsde.objectives import AbstractObjective, parameters
from lspsde.parameter import SGD, GradientDescent
from lspsde.profile import StabilityProfile, learning_profile, representation_profile
from lspsde.results import to_datatree
from lspsde.system import LearningSystem
import models
from models.objectives import Quadratic

D, T, EVERY, CHUNK = 4, 10, 2, 4
EIGS = np.array([0.5, 1.0, 2.0, 3.0])
ETA, SIGMA0, SIGMA1 = 0.2, 1.0, 1.0
KEY = jax.random.key(0)
COMMON = dict(n_steps=T, save_every=EVERY, chunk_size=CHUNK, method="dense", rtol=1e-12)


def _hessian(eigs):
    q, r = jnp.linalg.qr(jax.random.normal(jax.random.key(4), (D, D)))
    q = q * jnp.sign(jnp.diag(r))[None, :]
    return (q * jnp.asarray(eigs)[None, :]) @ q.T


def _system(eigs=EIGS, eta=ETA, sigma1=0.0, star=1.0, sigma0=SIGMA0):
    objective = Quadratic(_hessian(eigs), star * jnp.ones(D))
    return LearningSystem(objective, GradientDescent(eta), GaussianNoise(sigma0, sigma1))


@pytest.fixture(scope="module")
def additive():
    return exponent_distribution(_system(), jnp.zeros(D), key=KEY, n_paths=6, **COMMON)


@pytest.fixture(scope="module")
def state_dependent():
    system = _system(sigma1=SIGMA1)
    return system, exponent_distribution(system, jnp.zeros(D), key=KEY, n_paths=64, **COMMON)


# ----------------------------------------------------------------------------------------------
# Closed forms: additive noise on a quadratic
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "dense"])
def test_additive_noise_exponents_are_the_closed_forms_on_every_path(additive, method):
    # "auto": matrix-free Lanczos for every time block (rtol = 1e-12); "dense": exact SVDs.
    for eigs in (EIGS, np.full(D, 1.5)):  # one loop, so that one worker compiles "auto"
        dist = additive
        if method != "dense" or eigs is not EIGS:  # H is traced: the program is reused
            dist = exponent_distribution(
                _system(eigs), jnp.zeros(D), key=KEY, n_paths=6, **COMMON | {"method": method}
            )
        _check_closed_forms(dist, eigs)


def _check_closed_forms(dist, eigs):
    # G = H e + (s0/sqrt d) z0: d theta^t / d theta^0 = (I - eta H)^t whatever the noise, and
    # d theta^t / d z0^s = -eta (s0/sqrt d) (I - eta H)^(t-1-s), s < t, so
    # ||d theta^t / d u^{0:t}|| = eta (s0/sqrt d) sqrt(max_lambda sum_{j<t} (1 - eta lambda)^2j)
    # (for H = mu I: eta (s0/sqrt d) sqrt((1 - r^2t) / (1 - r^2)), r = 1 - eta mu). The second
    # noise half z1 (sigma1 = 0) does not enter G: its derivative is 0.
    t = np.arange(0, T + 1, EVERY)
    np.testing.assert_array_equal(dist.steps, t)
    a = 1 - ETA * eigs
    r = np.max(np.abs(a))
    scale = ETA * SIGMA0 / math.sqrt(D)
    cum_u = scale * np.sqrt(np.max(np.cumsum(a[None, :] ** (2 * np.arange(T))[:, None], 0), 1))
    cum_u = np.concatenate([[0.0], cum_u])[t]
    if eigs is not EIGS:
        np.testing.assert_allclose(cum_u[1:], scale * np.sqrt((1 - r ** (2 * t[1:])) / (1 - r**2)))
    assert dist.alpha_theta.shape == (6,) and dist.cum_theta.shape == (6, len(t))
    np.testing.assert_allclose(dist.alpha_theta, np.log(r), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dist.cum_theta, np.broadcast_to(r**t, (6, len(t))), rtol=1e-9)
    np.testing.assert_allclose(dist.sigma_theta, r, rtol=1e-9)
    np.testing.assert_allclose(dist.sigma_u, scale, rtol=1e-9)
    np.testing.assert_allclose(dist.cum_u, np.broadcast_to(cum_u, (6, len(t))), rtol=1e-9)
    np.testing.assert_allclose(dist.alpha_u, np.log(cum_u[-1]) / T, rtol=1e-9)
    np.testing.assert_allclose(dist.sup_sigma_theta, r, rtol=1e-9)
    np.testing.assert_allclose(dist.mean_log_sigma_theta, np.log(r), rtol=1e-9)
    np.testing.assert_allclose(dist.sup_sigma_u, scale, rtol=1e-9)
    assert np.all(np.asarray(dist.alpha_theta_sup) == 0.0)  # sup includes ||J_0|| = 1
    # The energy exponent is random, and is the definition applied to the path's energies.
    e = np.asarray(dist.energy)
    np.testing.assert_allclose(dist.energy_exponent, np.log(e[:, -1] / e[:, 0]) / (2 * T))
    assert np.ptp(np.asarray(dist.energy_exponent)) > 1e-3
    assert dist.alpha_x is None and dist.sup_sigma_x is None  # no representation
    assert not dist.diverged.any() and bool(dist.converged.all()) and dist.n_diverged == 0


def test_results_do_not_depend_on_the_chunk_size(additive):
    # Chunks of 3 are padded to 4 (the same compiled program): path 3 moves from slot 3 of the
    # first chunk to slot 0 of the second, path 4 from the padded chunk to a full one.
    other = exponent_distribution(
        _system(), jnp.zeros(D), key=KEY, n_paths=6, **COMMON | {"chunk_size": 3}
    )
    assert other.chunk_size == 3 and additive.chunk_size == CHUNK
    for a, b in zip(jax.tree.leaves(additive), jax.tree.leaves(other), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_default_chunk_size_keeps_a_chunk_within_the_budget():
    # All paths in one chunk when they fit; else the fewest equal chunks under 1 GiB.
    assert distributions.default_chunk_size(6, 4, 8, 10, 64, 8, False) == 6
    # d = 100, T = 200, m = 200 noise entries: the Lanczos basis of the temporal block holds
    # 64 x 200 x 200 numbers per path, ~41 MB with the rest: 26 paths per GiB.
    size = distributions.default_chunk_size(1024, 100, 200, 200, 64, 8, False)
    per_path = 8 * (4 * 201 * 100 + 2 * 40_000 + 1600 + 4 * 64 * 100 + 2 * 64 * 40_100)
    assert size * per_path <= distributions.CHUNK_BUDGET_BYTES < 2 * size * per_path
    assert distributions.default_chunk_size(3, 10**7, 10**7, 100, 64, 8, False) == 1


def test_new_hyperparameters_reuse_the_compiled_program(additive):
    cache = lspsde._ensemble._run_chunk._cached._cache_size()
    dist = exponent_distribution(
        _system(eta=0.1),
        jnp.zeros(D),
        key=jax.random.key(9),
        n_paths=5,
        divergence_threshold=1e6,
        **COMMON,
    )
    assert lspsde._ensemble._run_chunk._cached._cache_size() == cache
    np.testing.assert_allclose(dist.alpha_theta, np.log(1 - 0.1 * EIGS[0]), rtol=1e-9)


# ----------------------------------------------------------------------------------------------
# State-dependent noise: exponents vary per path; each path is checked independently
# ----------------------------------------------------------------------------------------------


@jax.jit
def _dense_paths(system, theta0, key, ids):
    r"""Independent check: $\theta^T$ of path p as an explicit function of $(\theta^0, u)$ (a
    plain scan), its Jacobians by ``jacfwd`` and their norms by SVD; no ``learning_profile``."""
    return jax.vmap(lambda p: _dense_path(system, theta0, key, p))(ids)


def _dense_path(system, theta0, key, p):
    k_p = jax.random.fold_in(key, p)
    us = jax.vmap(lambda t: system.noise_at(k_p, t, theta0))(jnp.arange(T))
    flat_u, unravel = ravel_pytree(us)

    def final(th0, u):
        def body(th, t):
            return system.parameter_map(t, th, jax.tree.map(lambda a: a[t], u)), None

        return jax.lax.scan(body, th0, jnp.arange(T))[0]

    j_theta = jax.jacfwd(final)(theta0, us)
    j_u = jax.jacfwd(lambda fu: final(theta0, unravel(fu)))(flat_u)
    svd = lambda m: jnp.linalg.svd(m, compute_uv=False)[0]
    return svd(j_theta), svd(j_u)


def test_every_path_matches_dense_jacobians_and_its_own_learning_profile(state_dependent):
    system, dist = state_dependent
    theta0 = jnp.zeros(D)
    j_theta, j_u = _dense_paths(system, theta0, KEY, jnp.arange(64))
    np.testing.assert_allclose(dist.alpha_theta, np.log(j_theta) / T, rtol=1e-8)
    np.testing.assert_allclose(dist.cum_u[:, -1], j_u, rtol=1e-8)
    assert np.std(np.asarray(dist.alpha_theta)) > 1e-3  # the exponent is random here
    # Path p is learning_profile's path with key fold_in(key, p), block by block.
    for p in (0, 37):
        k_p = jax.random.fold_in(KEY, p)
        prof = learning_profile(
            system, theta0, n_steps=T, key=k_p, save_every=EVERY, method="dense"
        )
        for name in ("sigma_theta", "sigma_u", "cum_theta", "cum_u", "loss"):
            np.testing.assert_allclose(getattr(dist, name)[p], getattr(prof, name), rtol=1e-10)
        ex = stability_exponents(prof)
        np.testing.assert_allclose(dist.alpha_theta[p], ex.alpha_theta, rtol=1e-10)
        np.testing.assert_allclose(dist.alpha_u[p], ex.alpha_u, rtol=1e-10)
    # The mean exponent agrees with an independent Monte Carlo estimate (64 other paths, dense
    # Jacobians) within 4.5 combined standard errors: a < 1e-5 chance to fail if correct.
    summ = dist.summary()
    other = np.log(_dense_paths(system, theta0, jax.random.key(1), jnp.arange(64))[0]) / T
    se = math.hypot(summ.loc["alpha_theta", "mcse_mean"], np.std(other, ddof=1) / 8)
    assert abs(summ.loc["alpha_theta", "mean"] - np.mean(other)) < 4.5 * se


def test_path_p_is_path_p_of_simulate(state_dependent):
    system, dist = state_dependent
    ens = simulate(
        (system.objective, system.update, system.noise),
        jnp.zeros(D),
        key=KEY,
        n_paths=64,
        n_steps=T,
        save_every=EVERY,
        save="summary",
    )
    np.testing.assert_allclose(dist.final_theta, ens.final_theta, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dist.energy, ens.energy, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(dist.diverged, ens.diverged)
    tree = to_datatree(ens)
    assert set(tree.children) == {"final", "energy", "loss", "status"}


def test_summary_statistics_of_independent_paths(state_dependent):
    _, dist = state_dependent
    summ = dist.summary()
    present = [n for n in EXPONENT_NAMES if getattr(dist, n) is not None]
    assert (
        list(summ.index)
        == present
        == [
            "alpha_theta",
            "alpha_theta_sup",
            "alpha_u",
            "energy_exponent",
            "sup_sigma_theta",
            "mean_log_sigma_theta",
            "sup_sigma_u",
        ]
    )
    lb, ub = "hdi89_lb", "hdi89_ub"  # arviz_base.rcParams["stats.ci_prob"] = 0.89
    columns = ["mean", "sd", lb, ub, "ess_bulk", "ess_tail", "mcse_mean", "mcse_sd"]
    assert list(summ.columns) == columns
    for name in present:
        x = np.asarray(getattr(dist, name))
        np.testing.assert_allclose(summ.loc[name, "mean"], x.mean(), rtol=1e-12)
        np.testing.assert_allclose(summ.loc[name, "sd"], x.std(ddof=1), rtol=1e-10, atol=1e-15)
        # An 89% HDI need not contain the mean of a skewed variable (alpha_theta_sup is 0 on
        # most paths): check what it promises, that it holds ~89% of the paths.
        slack = 1e-12 * max(abs(summ.loc[name, lb]), abs(summ.loc[name, ub]))
        inside = (x >= summ.loc[name, lb] - slack) & (x <= summ.loc[name, ub] + slack)
        assert summ.loc[name, lb] <= summ.loc[name, ub] + slack
        assert inside.mean() >= 0.89 - 1.0 / x.size, (name, inside.mean())
    # Varying exponents over 64 independent paths: ESS ~ 64 and MCSE ~ sd / 8.
    for name in ("alpha_theta", "alpha_u", "energy_exponent", "mean_log_sigma_theta"):
        row = summ.loc[name]
        # (ESS estimated from 64 draws is itself noisy: a factor of 4 either way is a failure)
        assert 0.25 * 64 < row["ess_bulk"] < 4 * 64, (name, row["ess_bulk"])
        assert 0.6 < row["mcse_mean"] / (row["sd"] / 8) < 1.6, name
    # HDI with another probability, ETI, xarray output, a subset of variables.
    eti = dist.summary(["alpha_theta"], ci_prob=0.5, ci_kind="eti", fmt="xarray")
    assert list(eti.data_vars) == ["alpha_theta"]
    lo, hi = eti["alpha_theta"].sel(summary=["eti50_lb", "eti50_ub"]).values
    np.testing.assert_allclose([lo, hi], np.quantile(dist.alpha_theta, [0.25, 0.75]), rtol=0.05)
    with pytest.raises(ValueError, match="alpha_x"):
        dist.summary(["alpha_x"])  # no representation

    # A non-finite exponent on a path marked diverged never reaches a statistic.
    poisoned = eqx.tree_at(
        lambda d: (d.alpha_theta, d.diverged),
        dist,
        (dist.alpha_theta.at[5].set(jnp.nan), dist.diverged.at[5].set(True)),
    )
    clean = poisoned.summary()
    assert np.all(np.isfinite(clean.to_numpy(dtype=float)))
    keep = np.arange(64) != 5
    np.testing.assert_allclose(clean.loc["alpha_theta", "mean"], dist.alpha_theta[keep].mean())


class ParameterBowl(AbstractObjective):
    r"""$\frac12\|\theta - c\|^2$ over a pytree $\theta$ (a network's parameters): SGD contracts
    every leaf by $1 - \eta$, whatever the network computes."""

    centre: PyTree

    def loss(self, theta):
        pairs = zip(jax.tree.leaves(theta), jax.tree.leaves(self.centre), strict=True)
        return 0.5 * sum(jnp.sum((a - b) ** 2) for a, b in pairs)

    def minimizer(self):
        return self.centre


def test_network_parameters_and_depth_blocks():
    # theta = the arrays of a tanh MLP (a pytree), tracked probes: the depth exponents of path p
    # are those of the network with parameters theta^T_p; alpha_theta = log(1 - eta) exactly.
    probes = jax.random.normal(jax.random.key(5), (3, 2))
    net = models.mlp(jax.random.key(6), [2, 3, 2], activation="tanh", init="gaussian")
    theta0 = parameters(net)
    objective = ParameterBowl(jax.tree.map(lambda a: 0.5 * a, theta0))
    system = LearningSystem(
        objective, SGD(0.1), IsotropicGaussian(0.1), representation=net, probes=probes
    )
    dist = exponent_distribution(
        system, theta0, key=KEY, n_paths=4, n_steps=4, save_every=2, chunk_size=4, method="dense"
    )
    np.testing.assert_allclose(dist.alpha_theta, np.log(0.9), rtol=1e-12)
    assert dist.cum_x.shape == dist.sigma_x.shape == (4, 3, 2)  # (path, step, layer)
    p = 2
    theta_p = jax.tree.map(lambda a: a[p], dist.final_theta)
    rep = representation_profile(system.network(theta_p), probes, method="dense")
    np.testing.assert_allclose(dist.cum_x[p, -1], rep.cumulative.max(axis=0), rtol=1e-12)
    np.testing.assert_allclose(dist.alpha_x[p], np.log(rep.cumulative[:, -1].max()) / 2)
    np.testing.assert_allclose(dist.sup_sigma_x, np.max(np.asarray(dist.sigma_x), axis=(1, 2)))
    assert dist.energy_exponent.shape == (4,) and np.ptp(np.asarray(dist.alpha_x)) > 0
    assert "alpha_x" in dist.summary().index
    tree = dist.to_datatree()
    assert tree["profile"]["cum_x"].dims == ("path", "step", "layer")
    assert "final_theta_weights_0" in tree["final"].data_vars


# ----------------------------------------------------------------------------------------------
# Divergence is data
# ----------------------------------------------------------------------------------------------


def test_diverged_paths_are_excluded_and_counted():
    # eta = 0.7 > 2 / L = 2/3: |1 - 0.7 * 3| = 1.1, and noise from theta0 = theta* = 0 drives
    # ||theta^t|| past the threshold on some paths only; the rule is simulate's, step by step.
    system = _system(eta=0.7, star=0.0)
    # The threshold: the median final norm of an unthresholded run, so that some paths cross it
    # and some (at least those whose whole path stays below it) do not, whatever the key.
    free = simulate((system.objective, system.update, system.noise), jnp.zeros(D), key=KEY,
                    n_paths=6, n_steps=T, save_every=1)  # fmt: skip
    peak = np.sort(np.linalg.norm(np.asarray(free.theta), axis=-1).max(axis=1))
    threshold = float(0.5 * (peak[2] + peak[3]))  # three paths cross it, three never do
    kwargs = dict(key=KEY, n_paths=6, n_steps=T, save_every=EVERY, divergence_threshold=threshold)
    dist = exponent_distribution(system, jnp.zeros(D), **kwargs, chunk_size=CHUNK, method="dense")
    # (rtol is irrelevant with dense norms: the program of the other dense ensembles is reused)
    ens = simulate((system.objective, system.update, system.noise), jnp.zeros(D), **kwargs)
    np.testing.assert_array_equal(dist.diverged, ens.diverged)
    np.testing.assert_array_equal(dist.divergence_step, ens.divergence_step)
    valid = ~np.asarray(dist.diverged)
    assert 0 < dist.n_diverged < 6, dist.divergence_step
    np.testing.assert_allclose(dist.alpha_theta, np.log(1.1), rtol=1e-9)  # all paths: data
    assert dist.energy_exponent is None  # theta0 = theta*: ||e_T|| / ||e_0|| is undefined
    summ = dist.summary(fmt="xarray")
    assert summ.attrs["n_used"] == valid.sum() and summ.attrs["n_diverged"] == dist.n_diverged
    np.testing.assert_allclose(
        summ["alpha_u"].sel(summary="mean"), np.mean(np.asarray(dist.alpha_u)[valid])
    )
    tree = dist.to_datatree()
    np.testing.assert_array_equal(tree["exponents"]["path"], np.flatnonzero(valid))
    np.testing.assert_array_equal(tree["status"]["diverged"], dist.diverged)
    assert tree.attrs["n_diverged"] == dist.n_diverged


def test_an_overflowing_sensitivity_is_data_and_a_non_finite_profile_marks_divergence(additive):
    # theta0 = theta* and no noise: theta^t = theta* stays inside the threshold, while
    # d theta^t / d theta^0 = (I - eta H)^t grows like (3 eta)^t: for eta = 1e200 it leaves the
    # float range from t = 2 on. In the log domain it is still exact: log ||.|| = t log(3 eta - 1).
    system = _system(eta=1e200, sigma0=0.0, star=0.0)
    dist = exponent_distribution(system, jnp.zeros(D), key=KEY, n_paths=4, **COMMON)
    t = np.asarray(dist.steps)
    assert dist.n_diverged == 0 and np.all(np.asarray(dist.converged))
    np.testing.assert_allclose(dist.log_cum_theta, np.broadcast_to(t * np.log(3e200), (4, len(t))))
    np.testing.assert_allclose(dist.alpha_theta, np.log(3e200))
    assert not np.any(np.isfinite(np.asarray(dist.cum_theta)[:, 1:]))  # exp(log) overflows
    # eta = 1e308: the one-step Jacobian I - eta H itself is not representable (3e308 = inf):
    # the profile cannot be computed, and the path is diverged from the first saved step.
    dist = exponent_distribution(
        _system(eta=1e308, sigma0=0.0, star=0.0), jnp.zeros(D), key=KEY, n_paths=4, **COMMON
    )
    assert dist.n_diverged == 4 and np.all(np.asarray(dist.divergence_step) == 0)
    np.testing.assert_array_equal(dist.final_theta, 0.0)
    with pytest.raises(ValueError, match="Only 0 of 4 paths did not diverge"):
        dist.summary()
    assert dist.to_datatree()["exponents"].sizes["path"] == 0


# ----------------------------------------------------------------------------------------------
# Input errors before compilation
# ----------------------------------------------------------------------------------------------


def _bad_inputs():
    s, th = _system(), jnp.zeros(D)
    base = dict(key=KEY, n_paths=4, n_steps=T)
    yield (s, th, base | {"n_paths": 0}), ValueError, "n_paths"
    yield (s, th, base | {"n_paths": 2.0}), TypeError, "n_paths"
    yield (s, th, base | {"n_steps": -1}), ValueError, "n_steps"
    yield (s, th, base | {"save_every": T + 1}), ValueError, "save_every"
    yield (s, th, base | {"chunk_size": 0}), ValueError, "chunk_size"
    yield (s, th, base | {"method": "qr"}), ValueError, "norm method"
    yield (s, th, base | {"rtol": 2.0}), ValueError, "rtol"
    yield (s, th, base | {"divergence_threshold": 0.0}), ValueError, "divergence_threshold"
    yield (s, th, base | {"key": 0}), TypeError, "key"
    yield (s, jnp.zeros(D + 1), base), ValueError, "theta0"
    yield (s, jnp.zeros(D, dtype=int), base), TypeError, "floating"
    yield (s, jnp.full(D, jnp.nan), base), ValueError, "not finite"
    yield ("system", th, base), TypeError, "LearningSystem"
    yield ((s.objective, s.update), th, base), TypeError, "system"


@pytest.mark.parametrize("args,error,match", list(_bad_inputs()))
def test_bad_inputs_raise_before_compilation(monkeypatch, args, error, match):
    def compiled(*args, **kwargs):
        raise AssertionError("compiled before the input was checked")

    monkeypatch.setattr(lspsde._ensemble, "_run_chunk", compiled)
    system, theta0, kwargs = args
    with pytest.raises(error, match=match):
        exponent_distribution(system, theta0, **kwargs)


def test_a_tuple_system_is_the_learning_system(additive):
    s = _system()
    dist = exponent_distribution(
        (s.objective, s.update, s.noise), jnp.zeros(D), key=KEY, n_paths=6, **COMMON
    )
    np.testing.assert_array_equal(dist.final_theta, additive.final_theta)


def test_a_sweep_is_the_loop_to_the_bit_and_carries_its_grid(additive):
    s = _system(sigma1=SIGMA1)
    etas = [0.05, ETA, 0.9]  # 0.9 * 3 > 2: the last grid point's paths explode
    sweep = lspsde.Sweep([GradientDescent(e) for e in etas], name="eta", values=etas)
    kw = dict(key=KEY, n_paths=6, **COMMON)
    dist = exponent_distribution((s.objective, sweep, s.noise), jnp.zeros(D), **kw)
    assert dist.grid_name == "eta" and dist.alpha_theta.shape == (3, 6) and dist.n_paths == 6
    for g, eta in enumerate(etas):
        one = exponent_distribution(
            (s.objective, GradientDescent(eta), s.noise), jnp.zeros(D), **kw
        )
        at = dist.at(g)
        for f in ("alpha_theta", "alpha_u", "sigma_theta", "log_cum_u", "energy", "final_theta"):
            np.testing.assert_array_equal(getattr(at, f), getattr(one, f), err_msg=f)
        np.testing.assert_array_equal(at.diverged, one.diverged)
    # the summary is per grid point, over that point's own paths
    table = dist.summary(["alpha_theta"])
    assert list(table.index.get_level_values("eta")) == etas
    for g, eta in enumerate(etas):
        np.testing.assert_allclose(
            table.loc[(eta, "alpha_theta"), "mean"], np.mean(dist.at(g).alpha_theta)
        )
    tree = dist.to_datatree()
    assert tree["profile"]["sigma_theta"].dims == ("path", "eta", "step")
    np.testing.assert_array_equal(tree["exponents"]["eta"], etas)
    assert all(
        v.attrs.get("long_name") and v.attrs.get("units")
        for node in tree.subtree
        for v in node.ds.variables.values()
    )
    with pytest.raises(ValueError, match="no grid"):
        additive.at(0)
    with pytest.raises(ValueError, match="at\\(g\\)"):
        dist.exponents(valid_only=True)


# ----------------------------------------------------------------------------------------------
# to_datatree: one dispatch function
# ----------------------------------------------------------------------------------------------


def test_exponent_distribution_datatree(additive, tmp_path):
    tree = to_datatree(additive, attrs={"study": "test"})
    assert set(tree.children) == {"exponents", "profile", "final", "status"}
    assert tree.attrs["study"] == "test" and tree.attrs["n_paths"] == 6
    assert tree["profile"]["cum_theta"].dims == ("path", "step")
    np.testing.assert_array_equal(tree["profile"]["step"], additive.steps)
    np.testing.assert_array_equal(tree["exponents"]["alpha_u"], additive.alpha_u)
    assert tree["exponents"].attrs["sample_dims"] == ["path"]
    tree.to_netcdf(tmp_path / "d.nc", engine="h5netcdf")
    back = xr.open_datatree(tmp_path / "d.nc", engine="h5netcdf")
    np.testing.assert_array_equal(back["profile"]["cum_u"], additive.cum_u)


def test_to_datatree_of_profiles_exponents_fits_and_dissipation(additive, monkeypatch):
    # Path 0's profile, rebuilt from the distribution (what learning_profile returns for it).
    blocks = ("sigma_theta", "sigma_u", "cum_theta", "cum_u", "loss")
    prof = StabilityProfile(
        additive.steps,
        *(getattr(additive, name)[0] for name in blocks),
        None,
        None,
        additive.converged[0],
        n_steps=T,
        depth=0,
    )
    tree = to_datatree(prof)
    assert set(tree.children) == {"profile", "exponents"}
    assert tree["profile"]["sigma_theta"].dims == ("step",)
    np.testing.assert_array_equal(tree["profile"]["step"], prof.steps)
    np.testing.assert_array_equal(tree["profile"]["cum_u"], prof.cum_u)
    ex = stability_exponents(prof)
    assert float(tree["exponents"]["alpha_theta"]) == float(ex.alpha_theta)
    assert float(to_datatree(ex)["exponents"]["alpha_u"]) == float(ex.alpha_u)

    dis = dissipation_rate(np.array([[4.0, 2.0, 1.0]]), np.array([[4.0, 2.0, 1.0]]))
    dis_tree = to_datatree(dis, attrs={"note": "gd"})
    assert float(dis_tree["dissipation"]["gamma"]) == 0.5 and dis_tree.attrs["note"] == "gd"

    # RecursionFit converts through its own method (arviz_base.from_numpyro); a stub MCMC
    # avoids compiling NUTS here (test_energy runs the real fit).
    fit = RecursionFit(jnp.ones(3), jnp.ones(3), jnp.ones(3), jnp.arange(2.0), jnp.ones(2), None)
    sentinel = xr.DataTree()
    monkeypatch.setattr(RecursionFit, "to_datatree", lambda self: sentinel)
    assert to_datatree(fit) is sentinel

    with pytest.raises(TypeError, match=r"supported types: .*Ensemble.*ExponentDistribution"):
        to_datatree({"alpha": 1.0})
    batched = jax.tree.map(lambda x: jnp.stack([x, x]), prof)
    with pytest.raises(ValueError, match="batched"):
        to_datatree(batched)


def test_result_fields_have_the_documented_dims(additive):
    assert isinstance(additive, ExponentDistribution)
    n, s = 6, T // EVERY + 1
    for name in EXPONENT_NAMES:
        value = getattr(additive, name)
        assert value is None or value.shape == (n,), name
    for name in ("sigma_theta", "sigma_u", "cum_theta", "cum_u", "loss", "energy"):
        assert getattr(additive, name).shape == (n, s), name
    assert additive.final_theta.shape == (n, D)
    assert additive.diverged.shape == additive.divergence_step.shape == (n,)
