"""The ensemble engine: sweeps as one compiled program, memory refused before compilation, the
same start checks everywhere, and cumulative sensitivities that survive instability."""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lspsde
import lspsde._ensemble as engine
from models.objectives import Quadratic

KEY = jax.random.key(0)


def _quadratic(d, eigs=None):
    eigs = np.linspace(0.5, 2.0, d) if eigs is None else np.asarray(eigs, dtype=float)
    return Quadratic(jnp.diag(jnp.asarray(eigs)), jnp.ones(d))


def _same(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


FIELDS = ("theta", "final_theta", "energy", "loss", "diverged", "divergence_step")


# ----------------------------------------------------------------------------------------------
# Sweeps
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("swept", ["update", "noise"])
def test_a_sweep_equals_the_loop_to_the_bit_and_compiles_once(swept):
    # d = 7 is used by no other test: the first sweep must compile exactly one new program.
    obj, theta0 = _quadratic(7), jnp.zeros(7)
    etas, sigmas = np.array([0.1, 0.4, 0.7, 0.9]), np.array([0.2, 0.5, 1.0, 2.0])
    run = dict(key=KEY, n_paths=6, n_steps=23, save_every=5, chunk_size=4)  # padded 2nd chunk
    if swept == "update":
        # State-dependent noise: its ||theta - theta*|| is a reduction, the case that a
        # vectorised grid rounds differently.
        noise = lspsde.GaussianNoise(0.3, 0.5)
        sweep = lspsde.Sweep.of(lspsde.SGD, etas, name="step_size")
        loop = [lspsde.simulate((obj, lspsde.SGD(e), noise), theta0, **run) for e in etas]
        args = lambda sw: ((obj, sw, noise), theta0)
        other = lspsde.Sweep.of(lspsde.SGD, etas / 2, name="step_size")
    else:
        update = lspsde.SGD(0.3)
        sweep = lspsde.Sweep(
            [lspsde.GaussianNoise(s, 0.5) for s in sigmas], name="sigma0", values=sigmas
        )
        loop = [
            lspsde.simulate((obj, update, lspsde.GaussianNoise(s, 0.5)), theta0, **run)
            for s in sigmas
        ]
        args = lambda sw: ((obj, update, sw), theta0)
        other = lspsde.Sweep([lspsde.GaussianNoise(s, 0.5) for s in sigmas[::-1]], name="sigma0")
    before = engine._run_chunk._cached._cache_size()
    ens = lspsde.simulate(*args(sweep), **run)
    assert engine._run_chunk._cached._cache_size() == before + 1  # the whole grid: one program
    for g, plain in enumerate(loop):
        for f in FIELDS:
            np.testing.assert_array_equal(
                getattr(ens, f)[g], getattr(plain, f), err_msg=f"grid point {g}: {f}"
            )
    # Other values of the grid reuse the program.
    lspsde.simulate(*args(other), **run)
    assert engine._run_chunk._cached._cache_size() == before + 1
    # Results carry the grid as a leading named dimension.
    assert ens.theta.shape == (4, 6, 6, 7) and ens.mean_energy().mean.shape == (4, 6)
    tree = ens.to_datatree()
    name = sweep.name
    assert tree["energy"]["energy"].dims == ("path", name, "step")
    np.testing.assert_array_equal(tree["energy"][name], sweep.values)
    assert tree["energy"]["energy"].attrs["long_name"] and tree["energy"]["energy"].attrs["units"]
    # Common random numbers: grid points differ only through the swept value, so with the
    # same value twice the paths are identical.
    twice = lspsde.Sweep([sweep.at(1), sweep.at(1)])
    both = lspsde.simulate(*args(twice), **run)
    np.testing.assert_array_equal(both.theta[0], both.theta[1])


def test_a_vectorised_grid_and_jit_of_vmap_of_simulate_agree_with_the_loop():
    obj, theta0 = _quadratic(5), jnp.zeros(5)
    noise = lspsde.GaussianNoise(0.3, 0.5)
    etas = jnp.array([0.1, 0.5, 0.9])
    run = dict(key=KEY, n_paths=5, n_steps=20)
    loop = np.stack(
        [
            np.asarray(lspsde.simulate((obj, lspsde.SGD(e), noise), theta0, **run).theta)
            for e in etas
        ]
    )
    # The one-liner: checks of traced values are skipped, never a crash.
    f = jax.jit(jax.vmap(lambda eta: lspsde.simulate((obj, lspsde.SGD(eta), noise), theta0, **run)))
    ens = f(etas)
    assert ens.theta.shape == loop.shape
    np.testing.assert_allclose(ens.theta, loop, rtol=1e-14, atol=1e-15)  # XLA may round ~1 ulp
    batched = lspsde.Sweep(eqx.filter_vmap(lspsde.SGD)(etas), name="eta", batch_size=3)
    ens = lspsde.simulate((obj, batched, noise), theta0, **run)
    np.testing.assert_allclose(ens.theta, loop, rtol=1e-14, atol=1e-15)


def test_bad_sweeps_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        lspsde.Sweep([])
    with pytest.raises(TypeError, match="one type"):
        lspsde.Sweep([lspsde.SGD(0.1), lspsde.GradientFlow(0.1)])
    with pytest.raises(ValueError, match="static setting"):
        lspsde.Sweep([lspsde.GaussianNoise(0.1, 0.0), lspsde.GaussianNoise(0.1, 0.5)])
    with pytest.raises(ValueError, match="one coordinate per grid point"):
        lspsde.Sweep([lspsde.SGD(0.1)], values=[1, 2])
    with pytest.raises(ValueError, match="same leading grid axis"):
        lspsde.Sweep(lspsde.SGD(0.1))
    obj = _quadratic(3)
    sw = lspsde.Sweep.of(lspsde.SGD, [0.1, 0.2], name="eta")
    nsw = lspsde.Sweep([lspsde.IsotropicGaussian(0.1)])
    with pytest.raises(ValueError, match="not both"):
        lspsde.simulate((obj, sw, nsw), jnp.zeros(3), key=KEY, n_paths=2, n_steps=2)


# ----------------------------------------------------------------------------------------------
# Memory and start checks: before anything compiles
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_compile(monkeypatch):
    def compiled(*args, **kwargs):
        raise AssertionError("compiled before the input was checked")

    monkeypatch.setattr(engine, "_run_chunk", compiled)


def test_an_impossible_request_is_refused_at_once(no_compile):
    obj = _quadratic(1000)
    start = time.perf_counter()
    with pytest.raises(MemoryError, match=r"save=\"summary\".*save_every.*fewer paths") as err:
        lspsde.simulate(
            (obj, lspsde.SGD(0.1), lspsde.IsotropicGaussian(0.1)),
            jnp.zeros(1000),
            key=KEY,
            n_paths=100_000,
            n_steps=100_000,
        )
    assert time.perf_counter() - start < 1.0
    # 1e5 paths x (1e5 + 1) saved steps x 1000 float64 = 8.0e13 bytes = 72.8 TiB.
    assert "72.8 TiB" in str(err.value) or "72.9 TiB" in str(err.value)


def test_the_memory_limit_counts_the_grid_and_the_saved_steps(no_compile, monkeypatch):
    obj = _quadratic(100)
    args = ((obj, lspsde.SGD(0.1), lspsde.IsotropicGaussian(0.1)), jnp.zeros(100))
    run = dict(key=KEY, n_paths=1000, n_steps=1000)
    # Trajectory: 1000 x 1001 x 100 x 8 B = 0.8 GB; summary: ~16 MB.
    monkeypatch.setenv("LSPSDE_MEMORY_LIMIT", str(2**29))
    with pytest.raises(MemoryError, match="theta at every saved step"):
        lspsde.simulate(*args, **run)
    with pytest.raises(AssertionError, match="compiled"):  # fits: reaches compilation
        lspsde.simulate(*args, **run, save="summary")
    sweep = lspsde.Sweep.of(lspsde.SGD, np.linspace(0.01, 0.1, 50), name="eta")
    monkeypatch.setenv("LSPSDE_MEMORY_LIMIT", str(2**24))
    with pytest.raises(MemoryError, match="smaller grid"):
        lspsde.simulate((obj, sweep, args[0][2]), args[1], **run, save="summary")


@pytest.mark.parametrize(
    "call, error, match",
    [
        # (under the test suite's runtime type checks, the annotation refuses these first)
        (lambda: lspsde.SGD("0.1"), TypeError, "real number|step_size"),
        (lambda: lspsde.schedules.check_real_scalar("step_size", "0.1"), TypeError, "real"),
        (lambda: lspsde.SGD(jnp.array([0.1, 0.2, 0.3])), ValueError, "Sweep"),
        (lambda: lspsde.GradientDescent(True), TypeError, "real number|step_size"),
        (lambda: lspsde.schedules.check_real_scalar("step_size", 1j), TypeError, "real"),
        (
            lambda: lspsde.simulate(
                (_quadratic(2), lspsde.SGD(0.1), lspsde.NoNoise()),
                jnp.zeros(2, dtype=complex),
                key=KEY,
                n_paths=2,
                n_steps=2,
            ),
            TypeError,
            "complex",
        ),
        (
            lambda: lspsde.learning_profile(
                lspsde.LearningSystem(_quadratic(2), lspsde.SGD(0.1)),
                jnp.array([np.nan, 0.0]),
                key=KEY,
                n_steps=2,
            ),
            ValueError,
            "not finite",
        ),
        (
            lambda: lspsde.learning_profile(
                lspsde.LearningSystem(_quadratic(2), lspsde.SGD(0.1)), jnp.zeros(2), n_steps=2
            ),
            TypeError,
            "key",
        ),
        (
            lambda: lspsde.lyapunov_spectrum(
                lambda t, z, args: 0.5 * z, jnp.array([np.nan, 1.0]), n_steps=10
            ),
            ValueError,
            "not finite",
        ),
        (
            lambda: lspsde.quadratic_mean_square(
                jnp.array([[1.0, 0.5], [0.0, 1.0]]), jnp.ones(2), 0.1, 0.1, 0.0, 5
            ),
            ValueError,
            "symmetric",
        ),
    ],
)
def test_every_entry_point_checks_its_start(no_compile, call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------------------------
# Exponents of unstable systems: the log domain
# ----------------------------------------------------------------------------------------------

DIAG = jnp.diag(jnp.array([0.5, 1.0, 2.0]))


def _gd_profile(eta, n_steps, method, noise=None):
    obj = Quadratic(DIAG, jnp.zeros(3))
    system = lspsde.LearningSystem(
        obj, lspsde.GradientDescent(eta), noise if noise is not None else lspsde.NoNoise()
    )
    return lspsde.learning_profile(
        system, jnp.ones(3), key=KEY, n_steps=n_steps, save_every=n_steps, method=method
    )


@pytest.mark.parametrize("method", ["power", "lanczos", "dense", "auto"])
def test_exploding_and_vanishing_sensitivities_give_the_exact_exponent(method):
    # GD on diag(0.5, 1, 2): d theta^T / d theta^0 = diag(1 - eta lambda)^T exactly.
    # eta = 1.5: |1 - 3| = 2, so ||J_T|| = 2^T: 3e150 at T = 500 and 4e180 at T = 600 (the
    # linear product overflowed its squares; the power method used to return 0, converged).
    for T in (500, 600):
        prof = _gd_profile(1.5, T, method)
        ex = lspsde.stability_exponents(prof)
        np.testing.assert_allclose(ex.alpha_theta, np.log(2.0), rtol=1e-12)
        np.testing.assert_allclose(prof.log_cum_theta[-1], T * np.log(2.0), rtol=1e-12)
        assert bool(prof.converged)
    # eta = 50, T = 100: ||J|| = 99^100 = 3.7e199 (dense used to give 4.595, Lanczos NaN).
    ex = lspsde.stability_exponents(_gd_profile(50.0, 100, method))
    np.testing.assert_allclose(ex.alpha_theta, np.log(99.0), rtol=1e-12)
    # eta = 0.2, T = 8000: ||J|| = 0.9^8000 = 1e-366, below the float64 range.
    prof = _gd_profile(0.2, 8000, method)
    np.testing.assert_allclose(
        lspsde.stability_exponents(prof).alpha_theta, np.log(0.9), rtol=1e-12
    )
    assert float(prof.cum_theta[-1]) == 0.0  # what the linear product would have said


def test_the_temporal_block_is_exact_when_it_explodes():
    # Additive noise G = grad + sigma0 z0 / sqrt(3): d theta^t / d z0^s = -(eta sigma0 / sqrt 3)
    # A^(t-1-s), A = diag(1 - eta lambda). The top singular value of [A^(t-1) ... A^0] is
    # sqrt(sum_s 2^(2s)) = sqrt((4^t - 1) / 3) along the exploding direction.
    eta, sigma0, T = 1.5, 0.7, 300
    prof = _gd_profile(eta, T, "lanczos", noise=lspsde.GaussianNoise(sigma0, 0.0))
    expected = np.log(eta * sigma0 / np.sqrt(3)) + 0.5 * (T * np.log(4.0) - np.log(3.0))
    np.testing.assert_allclose(prof.log_cum_u[-1], expected, rtol=1e-12)
    assert prof.log_cum_u[0] == -np.inf and bool(prof.converged)


def test_exponent_distribution_of_an_exploding_system_is_finite_and_flagged_converged():
    system = lspsde.LearningSystem(
        Quadratic(DIAG, jnp.zeros(3)), lspsde.SGD(1.5), lspsde.GaussianNoise(0.1, 0.0)
    )
    dist = lspsde.exponent_distribution(
        system, jnp.ones(3), key=KEY, n_paths=4, n_steps=600, save_every=600, method="power",
        divergence_threshold=1e150,
    )  # fmt: skip
    assert dist.n_diverged == 4  # theta = 2^t leaves the largest threshold (1e150) ...
    # ... and a threshold the trajectory stays inside keeps every path, with alpha = log 2.
    dist = lspsde.exponent_distribution(
        system, jnp.ones(3), key=KEY, n_paths=4, n_steps=200, save_every=200, method="power",
        divergence_threshold=1e100,
    )  # fmt: skip
    assert dist.n_diverged == 0 and bool(np.all(dist.converged))
    np.testing.assert_allclose(dist.alpha_theta, np.log(2.0), rtol=1e-12)


def test_continuous_limits_sweep_with_a_static_substep_count():
    obj, theta0 = _quadratic(3), jnp.ones(3)
    etas = np.array([0.1, 0.2, 0.4])
    run = dict(key=KEY, n_paths=4, n_steps=5)
    for make, noise in (
        (lambda e: lspsde.SGDLimit(e, n_substeps=4), lspsde.GaussianNoise(0.3, 0.5)),
        (lambda e: lspsde.GradientFlow(e, n_substeps=8), lspsde.NoNoise()),
    ):
        ens = lspsde.simulate((obj, lspsde.Sweep.of(make, etas, name="eta"), noise), theta0, **run)
        for g, eta in enumerate(etas):
            plain = lspsde.simulate((obj, make(eta), noise), theta0, **run)
            np.testing.assert_array_equal(ens.theta[g], plain.theta)
    # n_substeps = 4 is dt = eta / 4, to the bit.
    a = lspsde.simulate(
        (obj, lspsde.SGDLimit(0.2, n_substeps=4), lspsde.GaussianNoise(0.3)), theta0, **run
    )
    b = lspsde.simulate(
        (obj, lspsde.SGDLimit(0.2, dt=0.05), lspsde.GaussianNoise(0.3)), theta0, **run
    )
    np.testing.assert_array_equal(a.theta, b.theta)
    # The gradient flow's exact solution on diag(lambda): theta_t = theta* + e^(-lambda t) e_0.
    flow = lspsde.GradientFlow(0.2, n_substeps=16)
    flow = lspsde.simulate((obj, flow, lspsde.NoNoise()), jnp.zeros(3), **run)
    lam = np.linspace(0.5, 2.0, 3)
    exact = 1.0 - np.exp(-lam[None, :] * 0.2 * np.arange(6)[:, None])
    np.testing.assert_allclose(flow.theta[0], exact, rtol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        lspsde.SGDLimit(0.2, dt=0.05, n_substeps=4)


def test_a_vanishing_temporal_sensitivity_does_not_underflow():
    # theta^{s+1} = theta^s / 2 + [s = 0] u^s: d theta^t / d u^{0:t} = 2^-(t-1) exactly, far
    # below the float range at t = 1200 (log = -831.1), where the scale used to flush to 0;
    # d theta^t / d theta^0 = 2^-t.
    # The kick acts at step 0 only, through the step counter of the flow.
    class KickedHalving(lspsde.AbstractParameterFlow):
        def __call__(self, t, theta, grad):
            return 0.5 * theta + jnp.where(t == 0, 1.0, 0.0) * (grad - theta)

    obj = Quadratic(jnp.eye(1), jnp.zeros(1))  # grad = theta: grad - theta = u below
    noise = lspsde.IsotropicGaussian(1.0)  # G = theta + u: d/du = 1 at step 0
    system = lspsde.LearningSystem(obj, KickedHalving(), noise)
    T = 1200
    prof = lspsde.learning_profile(system, jnp.ones(1), key=KEY, n_steps=T, save_every=T)
    np.testing.assert_allclose(prof.log_cum_u[-1], -(T - 1) * np.log(2.0), rtol=1e-12)
    np.testing.assert_allclose(prof.log_cum_theta[-1], -T * np.log(2.0), rtol=1e-12)


class _RecordingBar:
    """A stand-in for tqdm that records every update."""

    def __init__(self, total=None, disable=False, **kwargs):
        self.total, self.disable, self.n, self.updates = total, disable, 0.0, []
        _RecordingBar.last = self

    def update(self, k=1):
        self.n += k
        self.updates.append(self.n)

    def close(self):
        pass


def test_progress_is_reported_from_inside_the_scan(monkeypatch):
    """One chunk of a 200-step run: the display advances ~50 times from inside the compiled
    scan (not only when the chunk ends) and ends exactly at the total; the numbers equal a
    run without a display; under CI the default display stays off, even on a terminal."""
    from lspsde import _ensemble

    monkeypatch.setattr(_ensemble, "tqdm", _RecordingBar)
    system = (Quadratic(jnp.eye(3), jnp.zeros(3)), lspsde.SGD(0.1), lspsde.IsotropicGaussian(0.1))
    kw = dict(key=jax.random.key(0), n_paths=16, n_steps=200)
    shown = lspsde.simulate(system, jnp.ones(3), progress=True, **kw)
    bar = _RecordingBar.last
    assert bar.total == 200 and not bar.disable
    inside = [n for n in bar.updates if 0 < n < 200]
    assert len(inside) >= 40  # ticks while the chunk runs, every ceil(200 / 50) = 4 steps
    assert np.all(np.diff(bar.updates) >= 0) and bar.n == pytest.approx(200)
    quiet = lspsde.simulate(system, jnp.ones(3), progress=False, **kw)
    np.testing.assert_array_equal(shown.energy, quiet.energy)

    # three chunks: boundaries are exact, whatever the ticks said
    lspsde.simulate(system, jnp.ones(3), progress=True, chunk_size=6, **kw)
    bar = _RecordingBar.last
    assert bar.total == 3 * 200 and bar.n == pytest.approx(600)

    monkeypatch.setattr(_ensemble.sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setenv("CI", "true")
    assert not _ensemble.show_progress(None, 3, 200)
    monkeypatch.delenv("CI")
    assert _ensemble.show_progress(None, 1, 200)
