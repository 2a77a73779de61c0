"""Lyapunov spectra by the QR method: closed forms, exact identities and published values.

Tolerances:

- Linear maps: with the frame aligned, sum_t log|R_ii| = n log|mu_i| + c_i + O(rho^n), so the
  error of the estimate is c_i / n exactly (a 1/n law). c_i is a log of eigenvector-conditioning
  and frame-projection factors, O(1) for the matrices below, O(log 100) for the non-normal one.
- Identities (sum of exponents = mean log|det J|, dt scaling) hold per step up to rounding, so
  they are tested to ~1e-10.
- Chaotic maps/flows: the estimate fluctuates like sigma / sqrt(n); tolerances are a few such
  standard deviations, measured from runs with different rounding (or lyapax's different frame).
"""

import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lspsde.lyapunov import flow_map, lyapunov_spectrum, lyapunov_trace

# Sprott, *Chaos and Time-Series Analysis* (OUP 2003), Appendix A.
HENON_A, HENON_B = 1.4, 0.3
HENON_PUBLISHED = (0.41922, -1.62319)
LORENZ_SIGMA, LORENZ_RHO, LORENZ_BETA = 10.0, 28.0, 8.0 / 3.0
LORENZ_PUBLISHED = (0.9056, 0.0, -14.5723)


def henon(t, z, args):
    a, b = (HENON_A, HENON_B) if args is None else args
    return jnp.stack([1.0 - a * z[0] ** 2 + z[1], b * z[0]])


def lorenz(t, z, args):
    x, y, w = z[0], z[1], z[2]
    return jnp.stack(
        [
            LORENZ_SIGMA * (y - x),
            x * (LORENZ_RHO - w) - y,
            x * y - LORENZ_BETA * w,
        ]
    )


def linear(t, z, a):
    return a @ z


# Linear maps are run from the fixed point 0: the Jacobian is the matrix everywhere, and the
# state cannot overflow (from z0 != 0, 2^t overflows float64 after ~1000 steps, which is then
# correctly reported as divergence, +inf).
ORIGIN2, ORIGIN3 = jnp.zeros(2), jnp.zeros(3)


def sorted_log_moduli(matrix):
    return np.sort(np.log(np.abs(np.linalg.eigvals(np.asarray(matrix)))))[::-1]


# --------------------------------------------------------------------------------------------
# Linear maps: exact answers
# --------------------------------------------------------------------------------------------

LINEAR_CASES = {
    "upper_triangular": np.array([[2.0, 1.0, 0.5], [0.0, 0.5, 3.0], [0.0, 0.0, -1.5]]),
    # V diag(3, -0.8, 0.25) V^{-1} with V well conditioned: a full, diagonalisable matrix.
    "diagonalisable": (
        np.array([[1.0, 0.3, -0.2], [0.1, 1.0, 0.4], [-0.3, 0.2, 1.0]])
        @ np.diag([3.0, -0.8, 0.25])
        @ np.linalg.inv(np.array([[1.0, 0.3, -0.2], [0.1, 1.0, 0.4], [-0.3, 0.2, 1.0]]))
    ),
    # Rotation-scaling block: a complex pair, two equal exponents log 1.2, and log 0.5.
    "complex_pair": np.array(
        [
            [1.2 * math.cos(1.0), -1.2 * math.sin(1.0), 0.0],
            [1.2 * math.sin(1.0), 1.2 * math.cos(1.0), 0.0],
            [0.3, -0.7, 0.5],
        ]
    ),
}


@pytest.mark.parametrize("name", list(LINEAR_CASES))
def test_linear_map_exponents_are_log_eigenvalue_moduli(name):
    a = jnp.asarray(LINEAR_CASES[name])
    n = 2_000
    got = lyapunov_spectrum(linear, ORIGIN3, n, args=a, n_transient=200)
    # Error c_i / n with |c_i| <~ log(cond(V)) + log(1 / projection) ~ a few: 2e-3 = 4 / n.
    np.testing.assert_allclose(got, sorted_log_moduli(a), atol=4 / n)


def test_non_normal_map_converges_at_rate_one_over_n():
    # Strongly non-normal (off-diagonal 100 >> eigenvalues): transient growth ~ 100 before the
    # asymptotic rates log 1.1 and log 0.9 set in. Without a transient the error is c_i / n with
    # c_i ~ log 100 ~ 5: check both the size and the 1/n law (n * error constant).
    a = jnp.array([[1.1, 100.0], [0.0, 0.9]])
    exact = sorted_log_moduli(a)
    every, n = 1_000, 8_000
    trace = np.asarray(lyapunov_trace(linear, ORIGIN2, n, args=a, every=every))
    steps = every * np.arange(1, n // every + 1)[:, None]
    scaled_error = steps * (trace - exact)  # -> c_i, constant once rho^n has died out
    assert np.all(np.abs(scaled_error) < 10.0)  # |c_i| < 2 log 100
    np.testing.assert_allclose(scaled_error[-1], scaled_error[-2], atol=1e-6)
    np.testing.assert_allclose(trace[-1], exact, atol=10.0 / n)


def test_time_varying_map_alternating_two_matrices():
    # z_{t+1} = A z_t for even t, B z_t for odd t (t counts from 0 at the start of the
    # transient, which is even). Two steps are BA, so lambda_i = (1/2) log|mu_i(BA)|.
    a = jnp.array([[2.0, 1.0], [0.0, 0.3]])
    b = jnp.array([[0.5, 0.0], [1.5, 1.8]])

    def alternating(t, z, args):
        return jnp.where(t % 2 == 0, a @ z, b @ z)

    n = 4_000
    got = lyapunov_spectrum(alternating, ORIGIN2, n, n_transient=100)
    expected = 0.5 * sorted_log_moduli(b @ a)
    np.testing.assert_allclose(got, expected, atol=4 / n)
    # Not the average of the one-matrix spectra: the test sees the time dependence.
    naive = 0.5 * (sorted_log_moduli(a) + sorted_log_moduli(b))
    assert np.max(np.abs(naive - expected)) > 0.1


def test_dt_scales_exponents_per_unit_time():
    # The same iterates with dt = 0.1 represent 10x less time: exponents x 10, to rounding.
    a = jnp.asarray(LINEAR_CASES["upper_triangular"])
    per_step = lyapunov_spectrum(linear, ORIGIN3, 500, args=a)
    per_time = lyapunov_spectrum(linear, ORIGIN3, 500, args=a, dt=0.1)
    np.testing.assert_allclose(per_time, 10.0 * per_step, rtol=1e-12)


def test_large_k_lapack_path_agrees_with_unrolled_householder_path():
    # k > 4 uses jnp.linalg.qr, k <= 4 the unrolled Householder QR. The frame's first columns do
    # not depend on k, so the 4 leading exponents of both runs agree up to rounding, and both
    # equal the exact log|eigenvalues| of this triangular map (aligned frame: error ~ 1e-12).
    rng = np.random.default_rng(0)
    diagonal = np.array([1.9, -1.6, 1.3, 0.9, -0.6, 0.3])
    a = jnp.asarray(np.diag(diagonal) + np.triu(rng.normal(size=(6, 6)), 1))
    n = 1_000
    full = lyapunov_spectrum(linear, jnp.zeros(6), n, args=a, n_transient=300)
    top = lyapunov_spectrum(linear, jnp.zeros(6), n, args=a, n_transient=300, k=4)
    np.testing.assert_allclose(full, np.sort(np.log(np.abs(diagonal)))[::-1], atol=1e-9)
    np.testing.assert_allclose(top, full[:4], atol=1e-12)


def test_unrolled_householder_qr_matches_lapack():
    from lspsde.lyapunov import _householder_qr

    rng = np.random.default_rng(1)
    a = rng.normal(size=(7, 4))
    a[:, 1] *= 1e-200  # no underflow: columns are scaled before squaring
    a[:, 2] *= 1e200  # no overflow
    q, log_diagonal = _householder_qr(jnp.asarray(a))
    _, r = np.linalg.qr(a)
    np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-14)
    np.testing.assert_allclose(log_diagonal, np.log(np.abs(np.diag(r))), rtol=1e-13)
    # Q spans the columns of a, and Q^T a is upper triangular (relative to each column's size).
    qta = np.asarray(q.T @ a) / np.max(np.abs(a), axis=0)
    np.testing.assert_allclose(np.tril(qta, -1), 0.0, atol=1e-14)
    np.testing.assert_allclose(np.asarray(q) @ qta, a / np.max(np.abs(a), axis=0), atol=1e-14)
    # A zero column: -inf, and Q stays orthonormal.
    a[:, 3] = 0.0
    q, log_diagonal = _householder_qr(jnp.asarray(a))
    assert log_diagonal[3] == -np.inf
    np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-14)


def test_singular_direction_gives_minus_infinity_not_nan():
    a = jnp.array([[2.0, 0.0], [0.0, 0.0]])
    # After one (transient) step the frame is exactly (e1, e2): then log 2 and log 0 per step.
    got = np.asarray(lyapunov_spectrum(linear, ORIGIN2, 50, args=a, n_transient=1))
    assert got[0] == pytest.approx(math.log(2.0), abs=1e-12)
    assert got[1] == -np.inf


def test_pytree_state_matches_flat_state():
    # The same linear map on a (x, y) tuple of differently shaped arrays.
    a = jnp.asarray(LINEAR_CASES["upper_triangular"])

    def tree_map(t, z, args):
        x, y = z
        flat = a @ jnp.concatenate([x, y[None]])
        return flat[:2], flat[2]

    n = 2_000
    got = lyapunov_spectrum(tree_map, (jnp.zeros(2), jnp.asarray(0.0)), n, n_transient=200)
    np.testing.assert_allclose(got, sorted_log_moduli(a), atol=4 / n)


def test_logistic_map_scalar_state():
    # r = 4: conjugate to the tent map, lambda = log 2 exactly (Ulam & von Neumann). The state is
    # a Python float (a 0-d state, d = 1). Fluctuation of the mean of log|4 - 8 z| over 1e5
    # steps ~ 3e-3.
    got = lyapunov_spectrum(lambda t, z, args: 4.0 * z * (1.0 - z), 0.3, 100_000, n_transient=100)
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(math.log(2.0), abs=1e-2)


# --------------------------------------------------------------------------------------------
# Hénon map
# --------------------------------------------------------------------------------------------

HENON_Z0 = jnp.array([0.1, 0.1])


@pytest.fixture(scope="module")
def henon_spectrum():
    return lyapunov_spectrum(henon, HENON_Z0, 100_000, n_transient=1_000)


def test_henon_published_values(henon_spectrum):
    # sigma(lambda_1) over 1e5 steps is ~1e-3 (spread over runs with different rounding).
    np.testing.assert_allclose(henon_spectrum, HENON_PUBLISHED, atol=5e-3)


def test_henon_sum_is_log_b_exactly(henon_spectrum):
    # |det J| = b at every point, and |R_11 R_22| = |det(J Q)| = b per step up to rounding.
    assert float(jnp.sum(henon_spectrum)) == pytest.approx(math.log(HENON_B), abs=1e-10)


def test_henon_float32():
    z0 = HENON_Z0.astype(jnp.float32)
    got = lyapunov_spectrum(henon, z0, 100_000, n_transient=1_000)
    assert got.dtype == jnp.float32
    # Per-step rounding of log|R_11 R_22| ~ 1e-7, Kahan-summed: the mean is exact to ~1e-6.
    assert float(jnp.sum(got)) == pytest.approx(math.log(HENON_B), abs=1e-5)
    np.testing.assert_allclose(got, HENON_PUBLISHED, atol=1e-2)


def test_henon_with_x64_disabled():
    with jax.enable_x64(False):
        got = lyapunov_spectrum(henon, jnp.array([0.1, 0.1]), 20_000, n_transient=1_000)
        assert got.dtype == jnp.float32
        assert float(jnp.sum(got)) == pytest.approx(math.log(HENON_B), abs=1e-5)


def test_k_smaller_than_dimension_gives_the_k_largest(henon_spectrum):
    # The first column of the frame evolves independently of the others and is the same
    # whatever k, so this is the leading entry of the full run up to rounding.
    top = lyapunov_spectrum(henon, HENON_Z0, 100_000, n_transient=1_000, k=1)
    assert top.shape == (1,)
    np.testing.assert_allclose(top, henon_spectrum[:1], rtol=1e-10)


def test_trace_last_row_is_spectrum_and_converges(henon_spectrum):
    every = 1_000
    trace = lyapunov_trace(henon, HENON_Z0, 100_000, n_transient=1_000, every=every)
    assert trace.shape == (100, 2)
    np.testing.assert_allclose(trace[-1], henon_spectrum, rtol=1e-12)
    # Every row obeys the exact determinant identity.
    np.testing.assert_allclose(jnp.sum(trace, axis=1), math.log(HENON_B), atol=1e-10)
    # Statistical error ~ 1/sqrt(n): after 1e5 steps it is well below that after 1e3.
    early = abs(float(trace[0, 0]) - HENON_PUBLISHED[0])
    late = abs(float(trace[-1, 0]) - HENON_PUBLISHED[0])
    assert late < early / 3
    assert late < 5e-3


def test_vmap_over_args():
    # Arrays in `args` are traced: a parameter sweep is one program. b enters only as |det J|.
    bs = jnp.array([0.2, 0.3])
    got = jax.vmap(
        lambda b: lyapunov_spectrum(henon, HENON_Z0, 2_000, args=(1.4, b), n_transient=100)
    )(bs)
    np.testing.assert_allclose(jnp.sum(got, axis=1), jnp.log(bs), atol=1e-10)


# --------------------------------------------------------------------------------------------
# Lorenz flow through flow_map
# --------------------------------------------------------------------------------------------


def test_lorenz_published_values_rk4():
    dt = 0.01
    got = lyapunov_spectrum(flow_map(lorenz, dt), jnp.ones(3), 200_000, n_transient=2_000, dt=dt)
    # T = 2000 time units: sigma(lambda_1) ~ 5e-3 (spread over runs with different rounding).
    np.testing.assert_allclose(got[0], LORENZ_PUBLISHED[0], atol=0.02)
    # The zero exponent (flow direction) has an O(1/T) bias plus fluctuation.
    assert abs(float(got[1])) < 0.02
    np.testing.assert_allclose(got[2], LORENZ_PUBLISHED[2], atol=0.03)
    # trace J = -(sigma + 1 + beta) everywhere; RK4 changes log det per step by
    # ~ h^5 |lambda_3|^5 / 120 ~ 6e-7, i.e. ~1e-4 per unit time.
    assert float(jnp.sum(got)) == pytest.approx(-(LORENZ_SIGMA + 1 + LORENZ_BETA), abs=1e-3)


def test_lorenz_diffrax_solver_and_substeps():
    dt = 0.02
    step = flow_map(lorenz, dt, substeps=2, solver=diffrax.Tsit5())
    got = lyapunov_spectrum(step, jnp.ones(3), 10_000, n_transient=500, dt=dt)
    # T = 200 only (the diffrax loop is slower): sigma(lambda_1) ~ 0.02.
    np.testing.assert_allclose(got[0], LORENZ_PUBLISHED[0], atol=0.06)
    # Tsit5 at h = 0.01 is accurate to ~1e-7 in log det per unit time.
    assert float(jnp.sum(got)) == pytest.approx(-(LORENZ_SIGMA + 1 + LORENZ_BETA), abs=1e-5)


def test_flow_map_rk4_matches_exponential_of_linear_field():
    # dz/dt = M z: the flow map is expm(M dt); RK4 with 4 substeps is accurate to ~1e-10 here,
    # and the exponents are the real parts of eig(M).
    m = jnp.array([[-0.5, 2.0], [-2.0, -0.5]])  # eigenvalues -0.5 +- 2i
    dt = 0.1
    step = flow_map(lambda t, z, args: m @ z, dt, substeps=4)
    z1 = step(jnp.asarray(0), jnp.array([1.0, 0.0]), None)
    expected = jax.scipy.linalg.expm(m * dt) @ jnp.array([1.0, 0.0])
    np.testing.assert_allclose(z1, expected, atol=1e-9)
    got = lyapunov_spectrum(step, jnp.ones(2), 200, dt=dt)
    np.testing.assert_allclose(got, [-0.5, -0.5], atol=1e-6)


def test_flow_map_passes_continuous_time():
    # dz/ds = 1 + s: from s = t dt the exact step is z + dt + ((t+1)^2 - t^2) dt^2 / 2,
    # integrated exactly by RK4 (polynomial of degree 1 in s).
    dt = 0.5
    step = flow_map(lambda s, z, args: jnp.ones_like(z) * (1.0 + s), dt)
    t = 3
    got = step(jnp.asarray(t), jnp.zeros(1), None)
    np.testing.assert_allclose(got, [dt + ((t + 1) ** 2 - t**2) * dt**2 / 2], rtol=1e-14)


# --------------------------------------------------------------------------------------------
# Divergence is data
# --------------------------------------------------------------------------------------------


def test_divergent_map_reports_plus_infinity():
    def cubic(t, z, args):
        return 10.0 * z**3

    got = lyapunov_spectrum(cubic, jnp.array([1.0, 0.5]), 100)
    assert np.all(np.asarray(got) == np.inf)
    # Also during the transient.
    got = lyapunov_spectrum(cubic, jnp.array([1.0, 0.5]), 10, n_transient=100)
    assert np.all(np.asarray(got) == np.inf)
    # The trace keeps the finite estimates from before the blow-up (10^(3^t) overflows float64
    # after ~6 steps) and is +inf from then on; never NaN.
    trace = np.asarray(lyapunov_trace(cubic, jnp.array([1.0, 0.5]), 20, every=1))
    assert not np.any(np.isnan(trace))
    assert np.all(np.isfinite(trace[0])) and np.all(trace[-1] == np.inf)


def test_contracting_map_stays_finite():
    # z -> 10 z^3 from a small z0 is superstable: exponents -> -inf-like rates, but finite or
    # -inf, never NaN and never +inf.
    got = np.asarray(lyapunov_spectrum(lambda t, z, a: 10.0 * z**3, jnp.array([0.1, 0.2]), 30))
    assert not np.any(np.isnan(got)) and np.all(got < 0)


# --------------------------------------------------------------------------------------------
# Input validation: before any tracing, with helpful messages
# --------------------------------------------------------------------------------------------


class CountingStep:
    """A map that counts how often it is traced (a Python side effect)."""

    def __init__(self, fn=henon):
        self.fn = fn
        self.traces = 0

    def __call__(self, t, z, args):
        self.traces += 1
        return self.fn(t, z, args)


BAD_INPUTS = [
    ({"n_steps": 0}, ValueError, "n_steps"),
    ({"n_steps": -5}, ValueError, "n_steps"),
    ({"n_steps": 10.0}, TypeError, "n_steps"),
    ({"n_transient": -1}, ValueError, "n_transient"),
    ({"k": 0}, ValueError, "k"),
    ({"k": 3}, ValueError, "state dimension 2"),
    ({"dt": 0.0}, ValueError, "dt"),
    ({"dt": -0.1}, ValueError, "dt"),
    ({"dt": float("nan")}, ValueError, "dt"),
    ({"dt": float("inf")}, ValueError, "dt"),
    ({"z0": jnp.array([1, 2])}, TypeError, "z0"),
]


@pytest.mark.parametrize(("change", "error", "match"), BAD_INPUTS)
def test_bad_input_raises_before_tracing(change, error, match):
    step = CountingStep()
    kwargs = {"z0": HENON_Z0, "n_steps": 10, **change}
    with pytest.raises(error, match=match):
        lyapunov_spectrum(step, **kwargs)
    assert step.traces == 0


def test_bad_every_raises_before_tracing():
    step = CountingStep()
    for every, error in [(0, ValueError), (11, ValueError), (2.5, TypeError)]:
        with pytest.raises(error, match="every"):
            lyapunov_trace(step, HENON_Z0, 10, every=every)
    assert step.traces == 0


def test_non_callable_step_raises():
    with pytest.raises(TypeError, match="step"):
        lyapunov_spectrum(jnp.eye(2), HENON_Z0, 10)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda t, z, args: z[:1], "shape"),
        (lambda t, z, args: z.astype(jnp.float32), "dtype"),
        (lambda t, z, args: (z, z), "structure"),
    ],
)
def test_step_returning_wrong_state_raises_before_compiling(fn, match):
    step = CountingStep(fn)
    with pytest.raises(TypeError, match=match):
        lyapunov_spectrum(step, HENON_Z0, 10)
    assert step.traces == 1  # a single abstract evaluation (jax.eval_shape), nothing compiled


def test_flow_map_validation():
    with pytest.raises(ValueError, match="dt"):
        flow_map(lorenz, -0.01)
    with pytest.raises(ValueError, match="substeps"):
        flow_map(lorenz, 0.01, substeps=0)
    with pytest.raises(TypeError, match="solver"):
        flow_map(lorenz, 0.01, solver="rk4")
    with pytest.raises(TypeError, match="vector_field"):
        flow_map(3.0, 0.01)


# --------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------


def test_second_call_does_not_recompile():
    step = CountingStep()
    first = lyapunov_spectrum(step, HENON_Z0, 500, n_transient=10, args=(jnp.asarray(1.4), 0.3))
    traces = step.traces
    assert traces > 0
    # Same step and shapes; new state values, new dt, new parameter values: no retracing.
    again = lyapunov_spectrum(
        step, HENON_Z0 + 0.01, 500, n_transient=10, args=(jnp.asarray(1.3), 0.3), dt=0.5
    )
    assert step.traces == traces
    assert not np.allclose(first, again)


def test_equal_flow_maps_share_compiled_code():
    counter = CountingStep(lorenz)
    lyapunov_spectrum(flow_map(counter, 0.01), jnp.ones(3), 50, dt=0.01)
    traces = counter.traces
    lyapunov_spectrum(flow_map(counter, 0.01), jnp.ones(3), 50, dt=0.01)
    assert counter.traces == traces
