"""Monte Carlo ensembles: closed forms, exact moment recursions, and the invariants of
``lspsde.simulate`` (counter-based noise, divergence as data, bounded memory, one compile)."""

import os
from pathlib import Path
import statistics
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import lspsde
from lspsde._simulate import CHUNK_BUDGET_BYTES, Ensemble, default_chunk_size, simulate
import lspsde.noise
from lspsde.noise import AbstractNoise, NoNoise
from lspsde.objectives import AbstractObjective
from lspsde.parameter import GradientDescent
from models.objectives import Quadratic

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("theta", "final_theta", "energy", "loss", "diverged", "divergence_step", "steps")


class Additive(AbstractNoise):
    r"""$G = \nabla\mathcal{L} + \sigma\xi$, $\xi \sim N(0, I_d/d)$: $E\|G - \nabla L\|^2 =
    \sigma^2$ (kept local so that the tests do not depend on the noise zoo)."""

    sigma: jax.Array

    def __init__(self, sigma):
        self.sigma = jnp.asarray(sigma, dtype=float)

    def sample(self, key, theta):
        return jax.random.normal(key, theta.shape, theta.dtype)

    def gradient(self, objective, theta, u):
        return objective.gradient(theta) + self.sigma / np.sqrt(theta.size) * u


TRACES = {"loss": 0}


class CountingQuadratic(AbstractObjective):
    r"""$\frac12(\theta-\theta^*)^\top H(\theta-\theta^*)$ counting how often `loss` is traced
    (the gradient is analytic, so only the compiled ensemble traces `loss`)."""

    hessian: jax.Array
    theta_star: jax.Array

    def loss(self, theta):
        TRACES["loss"] += 1
        e = theta - self.theta_star
        return 0.5 * e @ (self.hessian @ e)

    def gradient(self, theta):
        return self.hessian @ (theta - self.theta_star)

    def minimizer(self):
        return self.theta_star


class LogBarrierLine(AbstractObjective):
    r"""$\nabla\mathcal{L}(\theta) = 1 + 0\cdot\log\theta$: GD walks down by $\eta$ per step and
    the gradient turns NaN once $\theta < 0$. No minimiser, so no energy."""

    def loss(self, theta):
        return jnp.sum(theta)

    def gradient(self, theta):
        return 1.0 + 0.0 * jnp.log(theta)


class Bowl(AbstractObjective):
    r"""$\frac12\sum_k\|\theta_k - c_k\|^2$ over a dict of arrays (a pytree parameter)."""

    centre: dict

    def loss(self, theta):
        return 0.5 * sum(jnp.sum((theta[k] - self.centre[k]) ** 2) for k in theta)

    def minimizer(self):
        return self.centre


def _spd(key, d, lo, hi):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (d, d)))
    H = (q * jnp.linspace(lo, hi, d)[None, :]) @ q.T
    return 0.5 * (H + H.T)


def _same(a: Ensemble, b: Ensemble) -> bool:
    """Bit-for-bit equality of every array of two ensembles."""
    return all(
        jax.tree.structure(getattr(a, f)) == jax.tree.structure(getattr(b, f))
        and all(
            np.array_equal(x, y)
            for x, y in zip(
                jax.tree.leaves(getattr(a, f)), jax.tree.leaves(getattr(b, f)), strict=True
            )
        )
        for f in FIELDS
    )


# ----------------------------------------------------------------------------------------------
# Mathematics
# ----------------------------------------------------------------------------------------------


def test_gradient_descent_is_the_closed_form_on_every_path():
    # theta^t = theta* + (I - eta H)^t (theta0 - theta*), exactly, on every path.
    d, eta, n_steps, every = 5, 0.3, 40, 7  # L = 2: eta L = 0.6 < 2; 40 = 5*7 + 5 (remainder)
    H = _spd(jax.random.key(0), d, 0.5, 2.0)
    star, theta0 = jax.random.normal(jax.random.key(1), (2, d))
    objective = Quadratic(H, star)
    kwargs = dict(key=jax.random.key(3), n_paths=3, n_steps=n_steps, save_every=every)
    ens = simulate((objective, GradientDescent(eta), NoNoise()), theta0, **kwargs)

    steps = np.array([0, 7, 14, 21, 28, 35, 40])
    np.testing.assert_array_equal(ens.steps, steps)
    M = np.eye(d) - eta * np.asarray(H)
    err = np.stack([np.linalg.matrix_power(M, t) @ np.asarray(theta0 - star) for t in steps])
    assert ens.theta.shape == (3, len(steps), d)
    expected = np.broadcast_to(err + np.asarray(star), ens.theta.shape)
    np.testing.assert_allclose(ens.theta, expected, atol=1e-12)
    np.testing.assert_allclose(ens.energy, np.broadcast_to((err**2).sum(1), (3, 7)), atol=1e-12)
    loss = 0.5 * np.einsum("ti,ij,tj->t", err, np.asarray(H), err)
    np.testing.assert_allclose(ens.loss, np.broadcast_to(loss, (3, 7)), atol=1e-12)
    np.testing.assert_array_equal(ens.final_theta, ens.theta[:, -1])
    assert not ens.diverged.any() and (ens.divergence_step == -1).all()

    # Summary mode runs the same program minus the trajectory: identical numbers.
    summ = simulate((objective, GradientDescent(eta), NoNoise()), theta0, save="summary", **kwargs)
    assert summ.theta is None
    for f in ("final_theta", "energy", "loss", "divergence_step"):
        np.testing.assert_array_equal(getattr(summ, f), getattr(ens, f))


def _noises():
    yield pytest.param(lambda s0, s1: Additive(s0), 0.0, id="additive")
    if hasattr(lspsde.noise, "GaussianNoise"):  # the library's model, if present
        make = lambda s0, s1: lspsde.noise.GaussianNoise(s0, s1)
        yield pytest.param(make, 0.0, id="GaussianNoise")
        yield pytest.param(make, 0.5, id="GaussianNoise-state-dependent")


@pytest.mark.parametrize("make_noise,sigma1", list(_noises()))
def test_mean_square_error_follows_the_exact_recursion(make_noise, sigma1):
    # H = h I and G = grad L + sigma0 xi0 + sigma1 ||e|| xi1 with E||xi_k||^2 = 1, independent:
    # e' = (1 - eta h) e - eta (noise), so m_{t+1} = (1 - eta h)^2 m_t + eta^2 (s0^2 + s1^2 m_t)
    # exactly, for m_t = E||theta^t - theta*||^2.
    d, h, eta, s0, n_paths, n_steps, every = 10, 1.0, 0.1, 1.0, 4096, 100, 10
    objective = Quadratic(h * jnp.eye(d), jnp.ones(d))
    ens = simulate(
        (objective, GradientDescent(eta), make_noise(s0, sigma1)),
        jnp.zeros(d),
        key=jax.random.key(7),
        n_paths=n_paths,
        n_steps=n_steps,
        save_every=every,
        save="summary",
    )
    m = [float(d)]
    for _ in range(n_steps):
        m.append((1 - eta * h) ** 2 * m[-1] + eta**2 * (s0**2 + sigma1**2 * m[-1]))
    exact = np.asarray(m)[np.asarray(ens.steps)]
    est = ens.mean_energy()
    assert float(est.mean[0]) == d and float(est.sem[0]) == 0.0  # theta0 is deterministic
    # 99.9% family-wise over the K = 10 random saved steps (Bonferroni: each step at level
    # 1 - 0.001/K), so this fixed-seed test had a <= 0.1% chance to fail if the code is right;
    # the CLT applies: m_t is a mean over 4096 i.i.d. paths of a variable with finite variance.
    K = len(exact) - 1
    z = statistics.NormalDist().inv_cdf(1 - 0.001 / (2 * K))
    dev = np.abs(np.asarray(est.mean) - exact)[1:]
    assert np.all(dev <= z * np.asarray(est.sem)[1:]), (dev, z * np.asarray(est.sem)[1:])
    # The CI is informative: the noise floor eta^2 s0^2 / (1 - (1 - eta h)^2) ~ 0.05 is resolved.
    assert np.all(np.asarray(est.sem)[1:] < 0.02 * exact[1:])
    assert not ens.diverged.any()


# ----------------------------------------------------------------------------------------------
# Reproducibility: noise from counters
# ----------------------------------------------------------------------------------------------


def _noisy_problem():
    d = 6
    objective = Quadratic(_spd(jax.random.key(11), d, 0.2, 1.0), jnp.ones(d))
    return (objective, GradientDescent(0.5), Additive(1.0)), jnp.zeros(d)


def test_results_are_bit_for_bit_independent_of_chunking(capsys):
    problem = _noisy_problem()
    kwargs = dict(n_paths=10, n_steps=30, save_every=4)  # 30 = 7*4 + 2: a remainder block
    ref = simulate(*problem, key=jax.random.key(0), chunk_size=10, **kwargs)
    for chunk in (1, 3, 4):  # 3 and 4 do not divide 10: the last chunk is padded
        ens = simulate(*problem, key=jax.random.key(0), chunk_size=chunk, progress=True, **kwargs)
        assert ens.chunk_size == chunk
        assert _same(ens, ref), f"chunk_size={chunk} changed the result"
    assert "simulate" in capsys.readouterr().err  # the progress bar over chunks was drawn

    again = simulate(*problem, key=jax.random.key(0), chunk_size=10, **kwargs)
    assert _same(again, ref)
    other = simulate(*problem, key=jax.random.key(1), chunk_size=10, **kwargs)
    assert not np.any(np.asarray(other.theta[:, 1:] == ref.theta[:, 1:]))
    # Path p depends on (key, p) only: a smaller ensemble is a prefix of a larger one.
    small = simulate(*problem, key=jax.random.key(0), **{**kwargs, "n_paths": 4})
    np.testing.assert_array_equal(small.theta, ref.theta[:4])
    # Distinct paths draw distinct noise.
    assert len(np.unique(np.asarray(ref.final_theta[:, 0]))) == 10


_SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from lspsde.noise import AbstractNoise
    from lspsde.parameter import GradientDescent
    from lspsde._simulate import simulate
    from models.objectives import Quadratic

    class Additive(AbstractNoise):
        sigma: jax.Array
        def sample(self, key, theta):
            return jax.random.normal(key, theta.shape, theta.dtype)
        def gradient(self, objective, theta, u):
            return objective.gradient(theta) + self.sigma / np.sqrt(theta.size) * u

    def run(chunk_size):
        d = 8
        A = jax.random.normal(jax.random.key(5), (d, d))
        H = A @ A.T / d + jnp.eye(d)
        ens = simulate(
            (Quadratic(0.5 * (H + H.T), jnp.ones(d)), GradientDescent(0.2),
            Additive(jnp.asarray(0.7))), jnp.zeros(d), key=jax.random.key(3),
            n_paths=7, n_steps=25, save_every=5, chunk_size=chunk_size,
        )
        return {f: np.asarray(getattr(ens, f)) for f in
                ("theta", "final_theta", "energy", "loss", "divergence_step")}
    """
)


def test_sharded_over_two_devices_is_bit_for_bit_the_single_device_result(tmp_path):
    # Two host devices need XLA_FLAGS before jax is imported: hence a subprocess. There, chunks
    # of 3 paths are padded to 4 (two per device) and sharded; here, one unsharded chunk of 7.
    script = (
        "import os, sys\n"
        "import jax\n"
        "jax.config.update('jax_enable_x64', True)\n"
        "assert len(jax.local_devices()) == 2, jax.local_devices()\n"
        + _SHARDED
        + textwrap.dedent(
            """
            import importlib
            S = importlib.import_module("lspsde._ensemble")  # the engine every front end uses
            chunk, seen = S._run_chunk, []
            def spy(*args):
                out = chunk(*args)
                seen.append(len(out["loss"].sharding.device_set))
                return out
            S._run_chunk = spy
            np.savez(sys.argv[1], **run(3))
            assert seen == [2, 2, 2], seen  # three chunks, each computed on both devices
            """
        )
    )
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    out = [tmp_path / "sharded.npz"]
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    namespace: dict = {}
    exec(_SHARDED, namespace)
    ref = namespace["run"](None)
    for path in out:
        got = np.load(path)
        for name, value in ref.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"{path.name}: {name}")


# ----------------------------------------------------------------------------------------------
# Divergence is data
# ----------------------------------------------------------------------------------------------


def test_unstable_step_size_freezes_paths_at_the_exact_blow_up_step():
    # eta = 0.3 > 2/L = 0.2 on H = diag(1, 10): theta^t = (0.7^t, (-2)^t) from theta0 = (1, 1),
    # so ||theta^t|| first exceeds 1e3 at t = 10 (2^10 = 1024 > 1000 > 2^9).
    H, eta, threshold = jnp.diag(jnp.array([1.0, 10.0])), 0.3, 1e3
    powers = np.array([0.7, -2.0]) ** np.arange(21)[:, None]
    t_div = int(np.argmax(np.linalg.norm(powers, axis=1) > threshold))
    assert t_div == 10
    ens = simulate(
        (Quadratic(H, jnp.zeros(2)), GradientDescent(eta), NoNoise()),
        jnp.ones(2),
        key=jax.random.key(0),
        n_paths=3,
        n_steps=20,
        divergence_threshold=threshold,
    )
    assert ens.diverged.all() and (ens.divergence_step == t_div).all()
    frozen = powers.copy()
    frozen[t_div:] = powers[t_div - 1]  # held at the last admissible value
    np.testing.assert_allclose(ens.theta, np.broadcast_to(frozen, ens.theta.shape), atol=1e-12)
    est = ens.mean_energy()
    np.testing.assert_allclose(est.mean[:t_div], (powers[:t_div] ** 2).sum(1), rtol=1e-12)
    assert np.all(np.asarray(est.diverged_fraction) == (np.arange(21) >= t_div))
    assert np.all(np.isnan(est.mean[t_div:]))  # no path left: the mean is undefined, not 0


def test_non_finite_values_are_caught_and_frozen():
    # theta^t = 1 - 0.3 t while the gradient is finite: theta^4 = -0.2, then G = NaN (log < 0),
    # so theta^5 would be NaN: divergence at t = 5, frozen at -0.2.
    ens = simulate(
        (LogBarrierLine(), GradientDescent(0.3), NoNoise()),
        jnp.ones(3),
        key=jax.random.key(0),
        n_paths=2,
        n_steps=8,
    )
    assert ens.diverged.all() and (ens.divergence_step == 5).all()
    assert np.all(np.isfinite(ens.theta)) and np.all(np.isfinite(ens.loss))
    np.testing.assert_allclose(ens.final_theta, -0.2, atol=1e-12)
    assert ens.energy is None
    with pytest.raises(ValueError, match="minimizer"):
        ens.mean_energy()
    est = ens.mean_loss()
    np.testing.assert_allclose(est.mean[:5], 3 * (1 - 0.3 * np.arange(5)), atol=1e-12)


def test_mixed_ensemble_reports_the_diverged_fraction_and_clean_statistics():
    # SGD on ||theta||^2 / 2 with loud noise: stationary E||theta||^2 = eta^2 s^2 / (1 - (1 -
    # eta)^2) = 3, so a threshold of 4 is crossed by some paths and not others.
    d, threshold = 2, 4.0
    ens = simulate(
        (Quadratic(jnp.eye(d), jnp.zeros(d)), GradientDescent(0.5), Additive(3.0)),
        jnp.zeros(d),
        key=jax.random.key(2),
        n_paths=256,
        n_steps=100,
        save_every=5,
        divergence_threshold=threshold,
    )
    frac = np.asarray(ens.diverged).mean()
    theta, final = np.asarray(ens.theta), np.asarray(ens.final_theta)
    assert 0.05 < frac < 0.95, frac
    est = ens.mean_energy()
    div = np.asarray(ens.divergence_step)[:, None]
    alive = (div < 0) | (div > np.asarray(ens.steps)[None, :])
    np.testing.assert_array_equal(ens.alive(), alive)
    np.testing.assert_allclose(est.diverged_fraction, 1 - alive.mean(0))
    assert est.diverged_fraction[-1] == frac and np.all(np.diff(est.diverged_fraction) >= 0)
    assert np.all(np.isfinite(est.mean)) and np.all(np.isfinite(est.sem))
    energy = np.asarray(ens.energy)
    manual = [energy[alive[:, j], j].mean() for j in range(energy.shape[1])]
    np.testing.assert_allclose(est.mean, manual, rtol=1e-12)
    # Every recorded value is admissible, and a diverged path stays where it stopped.
    assert np.all(energy <= threshold**2)
    for p in np.flatnonzero(np.asarray(ens.diverged)):
        after = np.asarray(ens.steps) >= div[p, 0]
        assert np.all(theta[p, after] == final[p])


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


def test_summary_mode_keeps_no_trajectory_and_memory_is_bounded():
    n_paths, n_steps, d, every = 4096, 200, 100, 10
    objective = Quadratic(_spd(jax.random.key(4), d, 0.1, 1.0), jnp.ones(d))
    ens = simulate(  # exact gradients: the memory is the same with noise, the test faster
        (objective, GradientDescent(1.0), NoNoise()),
        jnp.zeros(d),
        key=jax.random.key(0),
        n_paths=n_paths,
        n_steps=n_steps,
        save_every=every,
        save="summary",
    )
    assert ens.theta is None
    n_saved = n_steps // every + 1
    arrays = jax.tree.leaves(eqx.filter(ens, eqx.is_array))
    total = sum(a.nbytes for a in arrays)
    # energy + loss (path, step), final theta (path, d), status (path,), steps: nothing of size
    # n_steps * d per path.
    expected = n_paths * (2 * n_saved * 8 + d * 8 + 1 + 8) + n_saved * 8
    assert total == expected
    assert max(a.nbytes for a in arrays) <= n_paths * max(n_saved, d) * 8
    assert total < n_paths * (n_steps + 1) * d * 8 / 50

    # The 4,096-path, 10,000-step, d = 1,000 run: feasible in summary mode. It returns
    # ~0.7 GB (energy and loss at every step, final theta) instead of the 328 GB trajectory,
    # and the default chunks keep each compiled call under the budget.
    n_paths, n_steps, d = 4096, 10_000, 1_000
    chunk = default_chunk_size(n_paths, d, n_steps + 1, 8, keep=False)
    per_path = 8 * (4 * (n_steps + 1) + 8 * d)
    assert chunk * per_path <= CHUNK_BUDGET_BYTES and chunk >= 1024
    assert n_paths * (2 * (n_steps + 1) + d + 2) * 8 < 1e9
    assert (
        default_chunk_size(n_paths, d, n_steps + 1, 8, keep=True) < 16
    )  # trajectories: tiny chunks


# ----------------------------------------------------------------------------------------------
# Checks before compilation, and compilation once
# ----------------------------------------------------------------------------------------------


class Picky(Additive):
    def check(self, objective, theta0):
        raise ValueError("Picky noise refuses this objective; use another noise model.")


def _counting(d=3):
    return CountingQuadratic(jnp.eye(d), jnp.ones(d))


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"n_paths": 0}, ValueError, "n_paths"),
        ({"n_steps": 0}, ValueError, "n_steps"),
        ({"save_every": 0}, ValueError, "save_every"),
        ({"save_every": 11}, ValueError, "save_every"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"save": "everything"}, ValueError, "save"),
        ({"divergence_threshold": 0.0}, ValueError, "divergence_threshold"),
        ({"divergence_threshold": -1.0}, ValueError, "divergence_threshold"),
        ({"divergence_threshold": 1e200}, ValueError, "overflow"),
        ({"theta0": jnp.zeros(4)}, ValueError, "theta0"),
        ({"theta0": jnp.zeros((3, 1))}, ValueError, "theta0"),
        ({"theta0": jnp.zeros(3, dtype=int)}, TypeError, "floating"),
        ({"theta0": jnp.full(3, jnp.nan)}, ValueError, "theta0"),
        ({"theta0": jnp.full(3, 1e9)}, ValueError, "divergence_threshold"),
        ({"noise": Picky(1.0)}, ValueError, "Picky"),
        ({"update": "sgd"}, TypeError, "update"),
    ],
)
def test_bad_inputs_raise_before_compilation(change, error, match):
    TRACES["loss"] = 0
    args = {"objective": _counting(), "update": GradientDescent(0.1), "noise": Additive(1.0)}
    args["theta0"] = jnp.zeros(3)
    kwargs = {"key": jax.random.key(0), "n_paths": 4, "n_steps": 10}
    for k, v in change.items():
        (args if k in args else kwargs)[k] = v
    with pytest.raises(error, match=match):
        simulate((args["objective"], args["update"], args["noise"]), args["theta0"], **kwargs)
    assert TRACES["loss"] == 0  # nothing was traced for compilation


def test_noise_model_check_is_called():
    if not hasattr(lspsde.noise, "GaussianNoise"):
        pytest.skip("lspsde.noise.GaussianNoise not available")
    # State-dependent noise needs theta*, which LogBarrierLine does not know.
    with pytest.raises(ValueError, match="minimi"):
        simulate(
            (LogBarrierLine(), GradientDescent(0.1), lspsde.noise.GaussianNoise(1.0, 0.5)),
            jnp.ones(2),
            key=jax.random.key(0),
            n_paths=2,
            n_steps=3,
        )


def test_negative_step_size_is_refused_by_the_schedule():
    with pytest.raises(ValueError, match="step_size"):
        GradientDescent(-0.1)


def test_new_hyperparameter_values_do_not_recompile():
    objective, theta0 = _counting(), jnp.zeros(3)
    common = dict(n_paths=8, n_steps=20, save_every=5)
    first = simulate(
        (objective, GradientDescent(0.1), Additive(0.5)), theta0, key=jax.random.key(0), **common
    )
    traced = TRACES["loss"]
    assert traced > 0
    second = simulate(
        (objective, GradientDescent(0.05), Additive(1.0)),
        theta0,
        key=jax.random.key(1),
        divergence_threshold=1e6,
        **common,
    )
    assert TRACES["loss"] == traced, "a new step size / noise level / key recompiled"
    assert not np.array_equal(first.theta, second.theta)


# ----------------------------------------------------------------------------------------------
# Results leave as a DataTree
# ----------------------------------------------------------------------------------------------


def test_to_datatree_with_pytree_parameters_round_trips_through_netcdf(tmp_path):
    centre = {"b": jnp.ones(3), "w": jnp.full((2, 3), 2.0)}
    theta0 = {"b": jnp.zeros(3), "w": jnp.zeros((2, 3))}
    ens = simulate(
        (Bowl(centre), GradientDescent(0.5), NoNoise()),
        theta0,
        key=jax.random.key(0),
        n_paths=4,
        n_steps=6,
        save_every=3,
    )
    # theta^t - c = 0.5^t (theta0 - c): energy = 0.25^t * (3 * 1 + 6 * 4), summed over leaves.
    np.testing.assert_allclose(
        ens.energy, np.broadcast_to(27 * 0.25 ** np.array([0, 3, 6]), (4, 3))
    )
    tree = ens.to_datatree(attrs={"study": "bowl"})
    assert set(tree.children) == {"trajectory", "final", "energy", "loss", "status"}
    w = tree["trajectory"]["theta_w"]
    assert w.dims == ("path", "step", "theta_w_dim_0", "theta_w_dim_1")
    np.testing.assert_array_equal(w["step"], [0, 3, 6])
    np.testing.assert_array_equal(w.values, ens.theta["w"])
    assert tree["final"]["final_theta_b"].dims == ("path", "theta_b_dim_0")
    assert tree["energy"]["energy"].dims == ("path", "step")
    assert tree["status"]["divergence_step"].dims == ("path",)
    assert tree.attrs["n_paths"] == 4 and tree.attrs["study"] == "bowl"

    path = tmp_path / "ensemble.nc"
    tree.to_netcdf(path, engine="h5netcdf")
    back = xr.open_datatree(path, engine="h5netcdf")
    np.testing.assert_array_equal(back["trajectory"]["theta_w"].values, ens.theta["w"])
    np.testing.assert_array_equal(back["status"]["diverged"].values, ens.diverged)
    assert back.attrs["save"] == "trajectory"

    summary = simulate(
        (Bowl(centre), GradientDescent(0.5), NoNoise()),
        theta0,
        key=jax.random.key(0),
        n_paths=4,
        n_steps=6,
        save_every=3,
        save="summary",
    ).to_datatree()
    assert "trajectory" not in summary.children


def test_one_way_to_pass_a_system():
    """``simulate``, ``learning_profile`` and ``exponent_distribution`` take the system first, as
    a tuple or a LearningSystem, with the same numbers; the objective alone is refused with the
    fix."""
    (objective, flow, noise), theta0 = _noisy_problem()
    kw = dict(key=jax.random.key(0), n_steps=8)
    system = lspsde.LearningSystem(objective, flow, noise)
    a = simulate((objective, flow, noise), theta0, n_paths=4, **kw)
    b = simulate(system, theta0, n_paths=4, **kw)
    np.testing.assert_array_equal(a.theta, b.theta)
    p1 = lspsde.learning_profile((objective, flow, noise), theta0, **kw)
    p2 = lspsde.learning_profile(system, theta0, **kw)
    np.testing.assert_array_equal(p1.sigma_theta, p2.sigma_theta)
    d1 = lspsde.exponent_distribution((objective, flow, noise), theta0, n_paths=2, **kw)
    d2 = lspsde.exponent_distribution(system, theta0, n_paths=2, **kw)
    np.testing.assert_array_equal(d1.alpha_theta, d2.alpha_theta)
    old_style = [
        lambda: simulate(objective, flow, noise, theta0, n_paths=2, **kw),
        lambda: simulate(objective, theta0, n_paths=2, **kw),
        lambda: lspsde.learning_profile(objective, theta0, **kw),
        lambda: lspsde.exponent_distribution(objective, theta0, n_paths=2, **kw),
    ]
    for call in old_style:
        with pytest.raises(TypeError, match=r"takes the learning system first"):
            call()
    sweep = lspsde.Sweep.of(lspsde.SGD, [0.1, 0.2], name="eta")
    with pytest.raises(TypeError, match="exponent_distribution"):
        lspsde.learning_profile((objective, sweep, noise), theta0, **kw)


def test_results_describe_their_booleans_and_every_library_tree_has_cf(tmp_path):
    """Booleans carry CF flag_values/flag_meanings, through netCDF; the profile, exponents and
    dissipation trees carry long_name and units on every variable (missing_cf finds none)."""
    from lspsde.energy import dissipation_rate
    from lspsde.profile import learning_profile
    from lspsde.study._data import Variables, missing_cf

    system = (Quadratic(jnp.eye(3), jnp.zeros(3)), GradientDescent(0.5), NoNoise())
    tree = simulate(system, jnp.ones(3), key=jax.random.key(0), n_paths=2, n_steps=4).to_datatree()
    diverged = tree["status"]["diverged"]
    assert diverged.attrs["flag_meanings"] == "not_diverged diverged"
    np.testing.assert_array_equal(diverged.attrs["flag_values"], [0, 1])
    tree.to_netcdf(tmp_path / "e.nc", engine="h5netcdf")
    back = xr.open_datatree(tmp_path / "e.nc", engine="h5netcdf")
    assert back["status"]["diverged"].dtype == bool
    assert back["status"]["diverged"].attrs["flag_meanings"] == "not_diverged diverged"

    profile = learning_profile(system, jnp.ones(3), key=jax.random.key(0), n_steps=4)
    dissipation = dissipation_rate(jnp.array([[4.0, 2.0, 1.0]]), jnp.ones((1, 3)))
    for library_tree in (lspsde.to_datatree(profile), lspsde.to_datatree(dissipation)):
        for node in library_tree.subtree:
            assert missing_cf(node.to_dataset()) == [], node.path
    assert (
        "||dtheta^{t+1}/dtheta^t||"
        in lspsde.to_datatree(profile)["profile"]["sigma_theta"].long_name
    )

    v = Variables()
    v.add(
        "holds", ("case",), np.array([True, False]), "bound holds", flag_meanings=("fails", "holds")
    )
    assert v.dataset({"case": ([0, 1], "case", "1")}).holds.attrs["flag_meanings"] == "fails holds"
    with pytest.raises(ValueError, match="single words"):
        v.add("h2", ("case",), np.array([True]), "x", flag_meanings=("does not hold", "holds"))
    with pytest.raises(ValueError, match="boolean variables"):
        v.add("h3", ("case",), np.array([1.0]), "x", flag_meanings=("a", "b"))
    bare = xr.Dataset({"ok": ("case", np.array([True]), {"long_name": "ok", "units": "1"})})
    assert missing_cf(bare) == ["ok"]  # a boolean without flag_meanings is not described
