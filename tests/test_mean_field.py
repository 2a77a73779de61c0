"""The mean-field recursion of wide random networks (``lspsde.theory.mean_field``) against
closed forms (ReLU, linear, erf) and a high-accuracy adaptive quadrature (tanh)."""

import math

import jax
import numpy as np
import pytest
from scipy.integrate import quad

from lspsde import theory as T


def _gauss(f):
    return quad(
        lambda z: f(z) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi),
        -np.inf,
        np.inf,
        epsabs=1e-14,
        epsrel=1e-13,
    )[0]


@pytest.mark.parametrize("sigma_w2", [0.5, 1.0, 2.0, 3.0])
def test_relu_chi1_is_half_sigma_w2_and_its_q_map_is_linear(sigma_w2):
    r = T.mean_field("relu", sigma_w2)
    assert r.chi1 == pytest.approx(sigma_w2 / 2, rel=1e-12)
    assert r.depth_exponent == pytest.approx(0.5 * math.log(sigma_w2 / 2), rel=1e-10)
    # no bias: q -> 0 below sigma_w^2 = 2, stays at q0 there, grows without bound above
    expected = 0.0 if sigma_w2 < 2 else 1.0 if sigma_w2 == 2 else math.inf
    assert r.q_star == pytest.approx(expected, rel=1e-12)


def test_relu_with_bias_reaches_its_closed_form_fixed_point():
    r = T.mean_field("relu", 1.5, 0.2, q0=3.0)
    assert r.converged
    assert r.q_star == pytest.approx(0.2 / (1 - 1.5 / 2), rel=1e-10)


def test_linear_and_erf_closed_forms():
    lin = T.mean_field("linear", 0.7, 0.3)
    assert lin.chi1 == pytest.approx(0.7, rel=1e-12)
    assert lin.q_star == pytest.approx(0.3 / (1 - 0.7), rel=1e-9)
    # erf: E erf(sqrt(q) z)^2 = (2/pi) arcsin(2q / (1 + 2q)),
    # E erf'(sqrt(q) z)^2 = (4/pi) / sqrt(1 + 4q)
    sw, sb = 2.5, 0.1
    r = T.mean_field("erf", sw, sb)
    q = r.q_star
    assert q == pytest.approx(sw * 2 / math.pi * math.asin(2 * q / (1 + 2 * q)) + sb, rel=1e-10)
    assert r.chi1 == pytest.approx(sw * 4 / math.pi / math.sqrt(1 + 4 * q), rel=1e-10)


def test_tanh_fixed_point_against_adaptive_quadrature():
    with jax.enable_x64(True):
        r = T.mean_field("tanh", 1.5, 0.05)
    q = 1.0
    for _ in range(500):
        q = 1.5 * _gauss(lambda z: math.tanh(math.sqrt(q) * z) ** 2) + 0.05
    chi1 = 1.5 * _gauss(lambda z: (1 - math.tanh(math.sqrt(q) * z) ** 2) ** 2)
    assert r.converged
    assert r.q_star == pytest.approx(q, rel=1e-9)
    assert r.chi1 == pytest.approx(chi1, rel=1e-9)
    assert r.c_star == 1.0 and r.chi_c == r.chi1  # ordered phase: inputs collapse
    assert r.xi_c == pytest.approx(-1 / math.log(chi1), rel=1e-9)


def test_order_to_chaos_transition_of_tanh():
    with jax.enable_x64(True):
        ordered, chaotic = T.mean_field("tanh", 1.2, 0.05), T.mean_field("tanh", 4.0, 0.05)
    assert ordered.chi1 < 1 and ordered.depth_exponent < 0 and ordered.c_star == 1.0
    # chaos: chi_1 > 1 (c* = 1 unstable), a stable fixed point c* < 1 with slope below 1
    assert chaotic.chi1 > 1 and chaotic.depth_exponent > 0
    assert chaotic.c_star < 1 and chaotic.chi_c < 1 and chaotic.converged


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="elementwise"):
        T.mean_field(jax.nn.softmax, 1.0)
    with pytest.raises(ValueError, match="Unknown activation"):
        T.mean_field("gelu2", 1.0)
    with pytest.raises(ValueError, match="sigma_w2"):
        T.mean_field("tanh", 0.0)
    with pytest.raises(ValueError, match="sigma_b2"):
        T.mean_field("tanh", 1.0, -0.1)
    with pytest.raises(TypeError, match="activation"):  # the type check, or ours
        T.mean_field(3, 1.0)
