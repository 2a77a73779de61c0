r"""The typical case at initialisation: the mean-field recursion of wide random networks.

For a network $h^{l} = W^l\phi(h^{l-1}) + b^l$ with $W^l_{ij} \sim N(0, \sigma_w^2/n)$ and
$b^l_i \sim N(0, \sigma_b^2)$, in the limit of infinite width (Poole et al., 2016; Schoenholz et
al., 2017), the pre-activation variance and the correlation of two inputs follow

$$q^{l} = \sigma_w^2\,\mathbb{E}_z\,\phi(\sqrt{q^{l-1}}z)^2 + \sigma_b^2, \qquad
c^{l} = \frac{\sigma_w^2\,\mathbb{E}\,\phi(u_1)\phi(u_2) + \sigma_b^2}{q^*},$$

$u_1 = \sqrt{q^*}z_1$, $u_2 = \sqrt{q^*}(c z_1 + \sqrt{1 - c^2}z_2)$, $z, z_1, z_2 \sim N(0, 1)$.
The slope of the correlation map at $c = 1$,

$$\chi_1 = \sigma_w^2\,\mathbb{E}_z\,\phi'(\sqrt{q^*}z)^2,$$

is the mean squared singular value of one layer's input Jacobian: $\chi_1 < 1$ is the ordered
phase (inputs collapse), $\chi_1 > 1$ the chaotic one, and $\frac12\log\chi_1$ the typical
(mean-field) depth exponent of wide networks, to set beside Theorem 4.1's worst case
$\log\rho$. The depth scales are $\xi_q = -1/\log\chi_q$, $\chi_q = \chi_1 + \sigma_w^2\,
\mathbb{E}\,\phi''(\sqrt{q^*}z)\phi(\sqrt{q^*}z)$, and $\xi_c = -1/\log\chi_c$ with $\chi_c$ the
slope of the correlation map at its stable fixed point $c^*$ ($\chi_c = \chi_1$ when $c^* = 1$).

Every expectation is a midpoint rule on $[-10, 10]$ with ``n_quad`` nodes per dimension and
Gaussian weights: spectrally accurate for smooth activations (Gauss–Hermite would be too), and,
unlike Gauss–Hermite, exact by symmetry for a kink at 0 (ReLU's $\phi'$ is a step there; a
Gauss–Hermite node at 0 gives $\chi_1 = 0.438\,\sigma_w^2$ instead of $\sigma_w^2/2$). So any
elementwise activation works; derivatives come from ``jax.grad``.
"""

from collections.abc import Callable
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_positive, check_positive_int

__all__ = ["MeanField", "mean_field"]

_NAMED = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "erf": jax.scipy.special.erf,
    "linear": lambda x: x,
}


class MeanField(eqx.Module):
    r"""The result of [`mean_field`][]: `q_star` ($q^*$, ``inf`` where $q^l$ grows without
    bound), `chi1`, `chi_q`, `c_star` (the stable fixed point of the correlation map), `chi_c`,
    `xi_q`, `xi_c` (depth scales; ``inf`` at a critical point), `depth_exponent`
    ($\frac12\log\chi_1$), and `converged` (the $q$ and $c$ iterations met their tolerance)."""

    q_star: float
    chi1: float
    chi_q: float
    c_star: float
    chi_c: float
    xi_q: float
    xi_c: float
    depth_exponent: float
    converged: bool


def _activation(activation: "str | Callable") -> Callable:
    if isinstance(activation, str):
        if activation not in _NAMED:
            raise ValueError(
                f"Unknown activation {activation!r}; use one of {sorted(_NAMED)} or pass an "
                "elementwise function."
            )
        return _NAMED[activation]
    if not callable(activation):
        raise TypeError(f"`activation` must be a name or a callable, got {activation!r}.")
    x = jnp.linspace(-2.0, 2.0, 7)
    try:
        whole, each = activation(x), jax.vmap(activation)(x)
    except Exception as e:  # a function of the whole vector, or of no scalar at all
        raise ValueError(
            f"`activation` must be elementwise (a function of each entry alone): {e}"
        ) from None
    if jnp.shape(whole) != x.shape or not np.allclose(whole, each, rtol=1e-6, atol=1e-9):
        raise ValueError(
            "`activation` is not elementwise: applied to a vector it differs from applying it "
            "to each entry (e.g. softmax or a normalisation). The mean-field recursion needs "
            "phi(h)_i = phi(h_i)."
        )
    return activation


def _midpoint(n: int) -> tuple[jax.Array, jax.Array]:
    """Midpoint nodes on [-10, 10] (an even count: none at 0) and normalised N(0, 1) weights."""
    n += n % 2
    h = 20.0 / n
    z = -10.0 + (np.arange(n) + 0.5) * h
    w = np.exp(-0.5 * z * z)
    return jnp.asarray(z), jnp.asarray(w / w.sum())


@eqx.filter_jit
def _solve(phi, sw, sb, q0, z, w, zc, wc, max_iter, tol):
    """The q and c fixed-point iterations (``lax.while_loop``) and the slopes at the fixed
    points, in one compiled program."""
    dphi = jax.vmap(jax.grad(phi))
    d2phi = jax.vmap(jax.grad(jax.grad(phi)))
    mean = lambda values: jnp.sum(w * values)

    def q_body(state):
        q, _, i = state
        new = sw * mean(phi(jnp.sqrt(q) * z) ** 2) + sb
        done = (jnp.abs(new - q) <= tol * q) | (new < 1e-200) | ~(new < 1e300)
        return new, done, i + 1

    q, q_ok, _ = jax.lax.while_loop(
        lambda st: ~st[1] & (st[2] < max_iter), q_body, (jnp.asarray(q0), False, 0)
    )
    q = jnp.where(q < 1e-200, 0.0, jnp.where(q < 1e300, q, jnp.inf))
    q_eval = jnp.where((q > 0) & jnp.isfinite(q), q, 1.0)  # homogeneous: q-independent
    u = jnp.sqrt(q_eval) * z
    chi1 = sw * mean(dphi(u) ** 2)
    chi_q = chi1 + sw * mean(d2phi(u) * phi(u))

    z1, z2 = jnp.meshgrid(zc, zc, indexing="ij")
    w2 = jnp.outer(wc, wc)
    s = jnp.sqrt(q_eval)
    qq = sw * mean(phi(u) ** 2) + sb
    pair = lambda c: (s * z1, s * (c * z1 + jnp.sqrt(jnp.maximum(1.0 - c * c, 0.0)) * z2))

    def c_next(c):
        u1, u2 = pair(c)
        return jnp.minimum((sw * jnp.sum(w2 * phi(u1) * phi(u2)) + sb) / qq, 1.0)

    def c_body(state):
        c, _, i = state
        new = c_next(c)
        return new, (jnp.abs(new - c) <= 1e-10) | (new > 1 - 1e-6), i + 1

    c, c_ok, _ = jax.lax.while_loop(
        lambda st: ~st[1] & (st[2] < max_iter), c_body, (jnp.asarray(0.5), False, 0)
    )
    at_one = c > 1 - 1e-6  # c^l -> 1 (algebraically slowly at a critical point)
    u1, u2 = pair(c)
    d1, d2 = (dphi(x.ravel()).reshape(x.shape) for x in (u1, u2))
    chi_c = jnp.where(at_one, chi1, sw * jnp.sum(w2 * d1 * d2))
    return q, q_ok, chi1, chi_q, jnp.where(at_one, 1.0, c), c_ok, chi_c


def _log_scale(chi: float) -> float:
    """$-1/\\log\\chi$: a depth scale (``inf`` at $\\chi = 1$)."""
    if chi <= 0:
        return 0.0
    return math.inf if chi == 1 else -1.0 / math.log(chi)


def mean_field(
    activation: "str | Callable",
    sigma_w2: float,
    sigma_b2: float = 0.0,
    *,
    q0: float = 1.0,
    n_quad: int = 2000,
    max_iter: int = 2000,
    tol: float = 1e-12,
) -> MeanField:
    r"""The mean-field fixed point $q^*$, $\chi_1$ and the depth scales of a wide random
    network with activation $\phi$ (see the module docstring).

    **Arguments:**

    - `activation`: ``"relu"``, ``"tanh"``, ``"erf"``, ``"linear"``, or any elementwise
      function of JAX arrays (checked: a function of the whole vector is refused).
    - `sigma_w2`, `sigma_b2`: the weight and bias variances $\sigma_w^2 > 0$, $\sigma_b^2 \ge 0$.
    - `q0`: the starting variance of the $q$ iteration.
    - `n_quad`: quadrature nodes (the correlation map's 2-D grid uses ``n_quad // 5`` per
      dimension); `max_iter`, `tol`: the fixed-point iterations (relative change).

    **Returns:** a [`MeanField`][]. For positively homogeneous activations (ReLU, linear) with
    $\sigma_b^2 = 0$ the $q$ map is linear, $q^* \in \{0, \infty\}$, and $\chi_1$ does not depend
    on $q$: it is reported at $q = 1$ ($\chi_1 = \sigma_w^2/2$ for ReLU).
    """
    phi = _activation(activation)
    check_positive("sigma_w2", sigma_w2, fix="sigma_w^2 is a variance; use sigma_w2 > 0.")
    check_positive("sigma_b2", sigma_b2, allow_zero=True, fix="Use sigma_b2 >= 0.")
    check_positive("q0", q0, fix="The starting variance q0 must be > 0.")
    n_quad = check_positive_int("n_quad", n_quad, minimum=2)
    max_iter = check_positive_int("max_iter", max_iter)
    sw, sb = float(sigma_w2), float(sigma_b2)

    z, w = _midpoint(n_quad)
    zc, wc = _midpoint(max(n_quad // 5, 2))
    q, q_ok, chi1, chi_q, c, c_ok, chi_c = (
        float(x) for x in _solve(phi, sw, sb, float(q0), z, w, zc, wc, max_iter, float(tol))
    )
    return MeanField(
        q_star=q,
        chi1=chi1,
        chi_q=chi_q,
        c_star=c,
        chi_c=chi_c,
        xi_q=_log_scale(chi_q),
        xi_c=_log_scale(chi_c),
        depth_exponent=0.5 * math.log(chi1) if chi1 > 0 else -math.inf,
        converged=bool(q_ok and c_ok),
    )
