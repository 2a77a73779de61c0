r"""Lyapunov spectra of discrete maps by QR re-orthonormalisation (Benettin / Shimada–Nagashima).

For a map $z_{t+1} = \Phi_t(z_t)$ on $\mathbb{R}^d$ (possibly time-varying: the step or layer index
$t$ is passed to the map) with Jacobians $J_t = D\Phi_t(z_t)$, the Lyapunov exponents are the
growth rates of the singular values of the cocycle $J_{n-1} \cdots J_1 J_0$ (Oseledets 1968).
They are computed stably, without ever forming the product, by the QR method of
Shimada & Nagashima (1979) and Benettin, Galgani, Giorgilli & Strelcyn (1980): an orthonormal
frame $Q_0 \in \mathbb{R}^{d \times k}$ is propagated and re-orthonormalised at every step,

$$J_t Q_t = Q_{t+1} R_{t+1}, \qquad
\lambda_i \approx \frac{1}{n\,\Delta t} \sum_{t=1}^{n} \log \lvert (R_t)_{ii} \rvert,$$

which gives the $k$ largest exponents per unit time ($\Delta t$ is the time one step represents:
``dt=1`` for maps and layers, the step size for a discretised flow). The tangent vectors
$J_t q$ are Jacobian–vector products (``jax.linearize`` once per step, then ``vmap`` over the
$k$ columns): the Jacobian is never materialised, so a step costs $O(k)$ forward passes plus a
$d \times k$ QR, and the whole run is one compiled ``lax.scan``. For $k \le 4$ the QR is an
unrolled Householder factorisation that XLA fuses into the step (on CPU 10-20x faster than a
LAPACK call for small maps); for larger $k$ it is ``jnp.linalg.qr``.

The estimate converges like $O(1/n)$ for the bias from the initial frame (a transient with the
frame aligned removes most of it) and, for chaotic maps, like $O(n^{-1/2})$ for the fluctuation.

References: I. Shimada and T. Nagashima, *Prog. Theor. Phys.* 61 (1979) 1605–1616;
G. Benettin, L. Galgani, A. Giorgilli and J.-M. Strelcyn, *Meccanica* 15 (1980) 9–20 and 21–30.
"""

from collections.abc import Callable
import math
from typing import Any

import equinox as eqx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PyTree
import numpy as np

from ._ensemble import check_start

__all__ = ["flow_map", "lyapunov_spectrum", "lyapunov_trace"]

# The fixed initial frame: Q_0 is the Q factor of a (d, k) matrix of uniform pseudo-random
# numbers in [-1/2, 1/2), entry (i, j) a 32-bit integer hash of i + d j + _FRAME_SEED (no PRNG
# key: threefry would add ~0.5 s to every compilation). It is generic (almost surely it has a
# component along every Oseledets direction, which columns of the identity need not have: for
# diag(1/2, 2) the first one sees only log 1/2), deterministic, and has the same first columns
# whatever k, so a run with k < d tracks exactly the first k columns of the full run.
_FRAME_SEED = 0

# Up to this many exponents the per-step QR is an unrolled Householder QR in ``jnp``; beyond it
# ``jnp.linalg.qr`` (LAPACK / cuSOLVER). Measured on CPU: 10-20x faster per step for d <= 3,
# ~1.5x for d = 40 (k = 4); its compile time grows with k (and with the map's complexity, up to
# ~2x that of the LAPACK version), so it is kept for small k, where the call overhead dominates.
_SMALL_K = 4


# --------------------------------------------------------------------------------------------
# Validation (runs in Python, before anything is traced)
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"`{name}` must be a Python int, got {value!r} of type {type(value).__name__}. {fix}"
        )
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}. {fix}")
    return int(value)


def _check_dt(dt: Any) -> None:
    if isinstance(dt, jax.core.Tracer):
        return  # traced (e.g. vmapped over step sizes): cannot be checked here
    try:
        arr = np.asarray(dt)
    except Exception:
        arr = None
    if arr is None or arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"`dt` must be a real scalar (the time one step represents), got {dt!r}.")
    if np.iscomplexobj(arr) or not math.isfinite(float(arr)) or float(arr) <= 0:
        raise ValueError(
            f"`dt` must be finite and positive, got {dt!r}. Pass the time one step represents: "
            "1.0 for a map or a layer, the step size for a discretised flow."
        )


def _validate(
    step: Any, z0: Any, n_steps: Any, k: Any, n_transient: Any, dt: Any, every: Any
) -> tuple[int, int]:
    """Check every user-controllable value; return ``(d, k)``. Traces nothing."""
    if not callable(step):
        raise TypeError(
            f"`step` must be a callable `step(t, z, args) -> z_next`, got {step!r} of type "
            f"{type(step).__name__}. For a vector field use `flow_map(vector_field, dt)`."
        )
    _check_int("n_steps", n_steps, 1, "Pass the number of measured steps, e.g. n_steps=10_000.")
    _check_int("n_transient", n_transient, 0, "Pass the number of discarded steps (0 for none).")
    _check_int(
        "every",
        every,
        1,
        "Pass how many steps separate two rows of the trace, e.g. every=100.",
    )
    if every > n_steps:
        raise ValueError(
            f"`every`={every} exceeds `n_steps`={n_steps}, so the trace would be empty. "
            "Pass every <= n_steps."
        )
    _check_dt(dt)
    leaves = jax.tree_util.tree_leaves(z0)
    if not leaves:
        raise ValueError(f"`z0` has no array leaves (got {z0!r}); pass the initial state.")
    # real floating and finite (NaN or inf would give meaningless +-inf exponents)
    check_start(z0, name="z0")
    d = sum(int(np.prod(np.shape(leaf))) for leaf in leaves)
    if d == 0:
        raise ValueError("`z0` has zero entries; the state dimension must be at least 1.")
    if k is None:
        k = d
    _check_int("k", k, 1, f"Pass 1 <= k <= {d} (the state dimension), or k=None for all.")
    if k > d:
        raise ValueError(
            f"`k`={k} exceeds the state dimension {d}; a {d}-dimensional map has only {d} "
            f"exponents. Pass 1 <= k <= {d}, or k=None for all of them."
        )
    return d, int(k)


def _check_step_output(step: Callable, t: Array, z0: PyTree, args: Any) -> None:
    """Abstractly evaluate ``step`` once (no compilation) and compare with ``z0``."""
    out = jax.eval_shape(step, t, z0, args)
    in_struct = jax.tree_util.tree_structure(z0)
    out_struct = jax.tree_util.tree_structure(out)
    if in_struct != out_struct:
        raise TypeError(
            f"`step` must return a state with the structure of `z0`: expected {in_struct}, got "
            f"{out_struct}. A map z -> z_next must return the same kind of object it receives."
        )
    for z_leaf, o_leaf in zip(
        jax.tree_util.tree_leaves(z0), jax.tree_util.tree_leaves(out), strict=True
    ):
        if z_leaf.shape != o_leaf.shape or z_leaf.dtype != o_leaf.dtype:
            raise TypeError(
                f"`step` must return arrays of the shape and dtype of `z0`: a leaf of `z0` is "
                f"{z_leaf.dtype}{list(z_leaf.shape)} but `step` returned "
                f"{o_leaf.dtype}{list(o_leaf.shape)}. Return an array of the same shape and "
                "cast with `.astype(z.dtype)`."
            )


# --------------------------------------------------------------------------------------------
# The compiled kernel: one implementation for both public functions
# --------------------------------------------------------------------------------------------


def _householder_qr(a: Array) -> tuple[Array, Array]:
    """Thin QR of a ``(d, k)`` matrix with ``k`` small, as ``(Q, log|diag R|)``.

    The ``k`` Householder reflections are written out in ``jnp`` (rank-one updates of the whole
    matrix, no scatters), so that XLA fuses them into the scan body: a LAPACK
    ``geqrf``/``orgqr`` call costs ~1 µs, which dominates the step of a small map. Backward
    stable like LAPACK's (the reflection sign avoids cancellation). Columns are first scaled by
    their max-abs entry, ``A = A' C`` so that ``R = R' C``: squares can neither overflow nor
    underflow, and ``log|R_jj| = log|R'_jj| + log c_j``. An exactly zero column gives ``H = I``
    (no reflection) and ``log|R_jj| = -inf``, as it should.
    """
    d, k = a.shape
    scale = jnp.max(jnp.abs(a), axis=0)
    safe = jnp.where(scale > 0, scale, 1.0)
    a = a / safe[None, :]
    rows = jnp.arange(d)
    columns = jnp.arange(k)
    reflectors = []
    diagonal = []
    for j in range(k):
        x = jnp.where(rows >= j, a[:, j], 0.0)  # H_j acts on rows j, ..., d-1 only
        norm = jnp.sqrt(jnp.sum(x * x))
        alpha = jnp.where(x[j] >= 0, -norm, norm)  # H_j x = alpha e_j
        v = x - alpha * (rows == j)
        vv = jnp.sum(v * v)
        tau = jnp.where(vv > 0, 2.0 / jnp.where(vv > 0, vv, 1.0), 0.0)  # H_j = I - tau v v^T
        if j + 1 < k:  # only the columns still to be reduced are needed
            a = a - jnp.outer(v, jnp.where(columns > j, tau * (v @ a), 0.0))
        reflectors.append((v, tau))
        diagonal.append(alpha)
    q = jnp.eye(d, k, dtype=a.dtype)
    for v, tau in reversed(reflectors):  # Q = H_0 H_1 ... H_{k-1} [I_k; 0]
        q = q - jnp.outer(v, tau * (v @ q))
    log_diagonal = jnp.log(jnp.abs(jnp.stack(diagonal))) + jnp.log(safe)
    return q, log_diagonal


def _initial_frame(d: int, k: int, dtype: Any) -> Array:
    """The fixed, generic initial frame ``Q_0`` (see ``_FRAME_SEED``)."""
    rows = jnp.arange(d, dtype=jnp.uint32)[:, None]
    columns = jnp.arange(k, dtype=jnp.uint32)[None, :]
    x = rows + jnp.uint32(d) * columns + jnp.uint32(_FRAME_SEED)
    # "lowbias32" integer hash (C. Wellons): well mixed 32-bit values, cheap to compile.
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    x = x ^ (x >> 16)
    uniform = x.astype(dtype) / dtype.type(2.0**32) - dtype.type(0.5)
    frame, _ = jnp.linalg.qr(uniform)
    return frame


def _qr_log_diag(a: Array) -> tuple[Array, Array]:
    """``(Q, log|diag R|)`` of the thin QR of ``a``."""
    if a.shape[1] <= _SMALL_K:
        return _householder_qr(a)
    q, r = jnp.linalg.qr(a)
    return q, jnp.log(jnp.abs(jnp.diagonal(r)))


class _Carry(eqx.Module):
    t: Array  # integer step index, counted from the start of the transient
    z: Array  # flattened state, (d,)
    frame: Array  # orthonormal tangent frame Q_t, (d, k)
    total: Array  # running sum of log|diag R|, (k,)
    compensation: Array  # Kahan compensation of `total`, (k,)
    diverged: Array  # bool: the state or the tangent frame became non-finite


def _compensated_add(total: Array, compensation: Array, value: Array) -> tuple[Array, Array]:
    """Kahan summation: keeps float32 sums over 1e5+ steps accurate; inf-safe."""
    y = value - compensation
    new_total = total + y
    new_compensation = (new_total - total) - y
    # log|R_ii| = -inf (an exactly annihilated direction) is a valid value; the compensation
    # would turn it into nan (inf - inf), so it is reset there.
    new_compensation = jnp.where(jnp.isfinite(new_compensation), new_compensation, 0.0)
    return new_total, new_compensation


@eqx.filter_jit
def _lyapunov_kernel(
    step: Callable,
    z0: PyTree[Array],
    args: Any,
    dt: Array,
    *,
    n_steps: int,
    k: int,
    n_transient: int,
    every: int,
    last_only: bool,
) -> Array:
    t0 = jnp.asarray(0, dtype=jnp.result_type(int))
    _check_step_output(step, t0, z0, args)  # at trace time only: never on a cached call

    flat0, unravel = ravel_pytree(z0)
    dtype = flat0.dtype
    flat0 = flat0.astype(dtype)  # drop a weak type, so that the scan carry type is stable
    d = flat0.shape[0]

    def flat_step(t: Array, x: Array) -> Array:
        return ravel_pytree(step(t, unravel(x), args))[0].astype(dtype)

    def one_step(carry: _Carry, _: None) -> tuple[_Carry, None]:
        z_next, tangent_map = jax.linearize(lambda x: flat_step(carry.t, x), carry.z)
        moved = jax.vmap(tangent_map, in_axes=1, out_axes=1)(carry.frame)  # J_t Q_t
        frame, log_growth = _qr_log_diag(moved)
        ok = jnp.all(jnp.isfinite(z_next)) & jnp.all(jnp.isfinite(moved)) & ~carry.diverged
        # Divergence is frozen, not propagated: the last finite state and frame are kept, the
        # sum stops, and the flag turns the reported exponents into +inf.
        total, compensation = _compensated_add(
            carry.total, carry.compensation, jnp.where(ok, log_growth, 0.0)
        )
        new = _Carry(
            t=carry.t + 1,
            z=jnp.where(ok, z_next, carry.z),
            frame=jnp.where(ok, frame, carry.frame),
            total=total,
            compensation=compensation,
            diverged=~ok,
        )
        return new, None

    frame0 = _initial_frame(d, k, dtype)
    zeros = jnp.zeros((k,), dtype)
    carry = _Carry(t0, flat0, frame0, zeros, zeros, jnp.asarray(False))

    if n_transient > 0:
        # The frame is aligned during the transient too (the same step), only the sum is reset.
        carry, _ = jax.lax.scan(one_step, carry, length=n_transient)
        carry = eqx.tree_at(lambda c: (c.total, c.compensation), carry, (zeros, zeros))

    def block(carry: _Carry, _: None) -> tuple[_Carry, tuple[Array, Array]]:
        carry, _ = jax.lax.scan(one_step, carry, length=every)
        return carry, (carry.total, carry.diverged)

    n_blocks = n_steps // every
    _, (totals, diverged) = jax.lax.scan(block, carry, length=n_blocks)
    elapsed = jnp.arange(1, n_blocks + 1, dtype=dtype) * (every * dt.astype(dtype))
    estimates = totals / elapsed[:, None]
    estimates = jnp.where(diverged[:, None], jnp.inf, estimates)
    order = jnp.argsort(-estimates[-1])  # sort by the final estimate, descending
    if last_only:
        return estimates[-1, order]
    return estimates[:, order]


def _run(step, z0, n_steps, args, k, n_transient, dt, every, last_only) -> Array:
    _, k = _validate(step, z0, n_steps, k, n_transient, dt, every)
    z0 = jax.tree_util.tree_map(jnp.asarray, z0)
    if not isinstance(dt, jax.Array):  # one dtype for every Python/NumPy dt: no recompilation
        dt = jnp.asarray(dt, dtype=jnp.result_type(float))
    return _lyapunov_kernel(
        step,
        z0,
        args,
        dt,
        n_steps=int(n_steps),
        k=k,
        n_transient=int(n_transient),
        every=int(every),
        last_only=last_only,
    )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def lyapunov_spectrum(
    step: Callable[..., PyTree[Array]],
    z0: PyTree[ArrayLike],
    n_steps: int | np.integer,
    *,
    args: Any = None,
    k: int | np.integer | None = None,
    n_transient: int | np.integer = 0,
    dt: float | int | Float[ArrayLike, ""] = 1.0,
) -> Float[Array, " k"]:
    r"""The $k$ largest Lyapunov exponents of the map $z_{t+1} = \Phi_t(z_t)$, per unit time.

    Benettin / Shimada–Nagashima QR method: with $J_t Q_t = Q_{t+1} R_{t+1}$,

    $$\lambda_i = \frac{1}{n\,\Delta t} \sum_{t=n_0+1}^{n_0+n} \log\lvert (R_t)_{ii}\rvert,
    \qquad i = 1, \dots, k,$$

    where $n_0$ = ``n_transient`` and $n$ = ``n_steps``. The initial frame $Q_0$ is the Q factor
    of a fixed standard-normal $(d, k)$ matrix (``jax.random.key(0)``), so runs are reproducible
    and the frame is generic. During the transient the state is iterated *and* the frame is
    re-orthonormalised (so it is aligned with the Oseledets directions when measuring starts),
    but nothing is accumulated.

    The whole computation is one ``equinox.filter_jit``-compiled program per (``step``,
    shapes/dtypes of ``z0`` and ``args``, integers ``n_steps``, ``k``, ``n_transient``): a second
    call with the same ``step`` object and shapes reuses it. ``dt`` and arrays in ``args`` are
    traced, so sweeping them does not recompile. Under ``jax.config.jax_enable_x64`` the
    computation runs in float64; in float32 the sum of logs is Kahan-compensated.

    **Arguments:**

    - `step`: the map, ``step(t, z, args) -> z_next``. ``t`` is the step (or layer) index, an
      integer JAX scalar counted from 0 at the start of the transient; ``z`` has the structure,
      shapes and dtypes of ``z0`` and so must ``z_next``. It must be differentiable in ``z``
      (forward mode). For a vector field use [`lspsde.lyapunov.flow_map`][].
    - `z0`: the initial state: a floating-point array of any shape, or a pytree of them (it is
      flattened with ``jax.flatten_util.ravel_pytree``; $d$ is the total number of entries).
    - `n_steps`: number of measured steps $n \ge 1$.
    - `args`: passed unchanged to ``step`` (arrays in it are traced, not baked in).
    - `k`: how many exponents, $1 \le k \le d$; default all $d$.
    - `n_transient`: steps iterated first and not counted ($n_0 \ge 0$).
    - `dt`: the time one step represents, $\Delta t > 0$ (``1.0`` for maps; the step size when
      ``step`` discretises a flow, so that exponents are per unit of continuous time).

    **Returns:**

    The exponents $\lambda_1 \ge \dots \ge \lambda_k$, shape ``(k,)``, dtype of the flattened
    state.

    Divergence is data, not a crash: if the state or the tangent frame becomes non-finite
    (the trajectory escaped to infinity, or the linearisation overflowed) at any step,
    including the transient, the run freezes there and **all** returned exponents are ``+inf``.
    A direction annihilated exactly ($R_{ii} = 0$, e.g. a singular linear map) gives a
    legitimate ``-inf``. NaN is never returned for a finite-valued run.

    **Raises:**

    ``TypeError``/``ValueError`` before anything is compiled if ``step`` is not callable,
    ``n_steps`` < 1 or ``n_transient`` < 0 or either is not an int, ``k`` is outside
    $[1, d]$, ``dt`` is not finite and positive, ``z0`` is not floating point, or ``step``
    returns a state whose structure, shape or dtype differs from ``z0`` (found with one abstract
    evaluation, ``jax.eval_shape``).
    """
    return _run(step, z0, n_steps, args, k, n_transient, dt, n_steps, last_only=True)


def lyapunov_trace(
    step: Callable[..., PyTree[Array]],
    z0: PyTree[ArrayLike],
    n_steps: int | np.integer,
    *,
    args: Any = None,
    k: int | np.integer | None = None,
    n_transient: int | np.integer = 0,
    dt: float | int | Float[ArrayLike, ""] = 1.0,
    every: int | np.integer = 1,
) -> Float[Array, "n_rows k"]:
    r"""Running Lyapunov-exponent estimates, to see the Benettin estimate converge.

    Row $j$ (0-based) is the estimate of [`lspsde.lyapunov.lyapunov_spectrum`][] after
    $m = (j+1) \cdot$ ``every`` measured steps,
    $\frac{1}{m\,\Delta t}\sum_{t \le m} \log\lvert (R_t)_{ii}\rvert$. The columns are ordered
    once, by the final row (descending), and that order is applied to every row; when
    ``every`` divides ``n_steps`` the final row is exactly ``lyapunov_spectrum(...)`` with the
    same arguments (the same compiled kernel computes both).

    **Arguments:**

    As for [`lspsde.lyapunov.lyapunov_spectrum`][], plus

    - `every`: steps between two rows, $1 \le$ ``every`` $\le$ ``n_steps``. If it does not
      divide ``n_steps``, only the first ``(n_steps // every) * every`` steps are run.

    **Returns:**

    Array of shape ``(n_steps // every, k)``. Rows from the step at which the run diverged
    onward are ``+inf`` (see ``lyapunov_spectrum``); earlier rows keep their finite values.
    """
    return _run(step, z0, n_steps, args, k, n_transient, dt, every, last_only=False)


# --------------------------------------------------------------------------------------------
# Continuous time: a vector field as a step map
# --------------------------------------------------------------------------------------------


def _axpy(a: Any, x: PyTree, y: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda xi, yi: yi + a * xi, x, y)


class _FlowMap(eqx.Module):
    """``step(t, z, args)``: the time-``dt`` flow of ``dz/ds = f(s, z, args)`` from ``s = t dt``.

    A module rather than a closure, so that two ``flow_map`` calls with equal arguments compare
    equal and share one compiled Lyapunov kernel.
    """

    vector_field: Callable
    dt: float | Array
    substeps: int = eqx.field(static=True)
    solver: Any = None

    def __call__(self, t: ArrayLike, z: PyTree[Array], args: Any) -> PyTree[Array]:
        s0 = jnp.asarray(t) * self.dt
        h = self.dt / self.substeps
        if self.solver is not None:
            return self._diffrax(s0, h, z, args)

        f = self.vector_field

        def rk4(i: Array | int, y: PyTree) -> PyTree:
            s = s0 + i * h
            k1 = f(s, y, args)
            k2 = f(s + h / 2, _axpy(h / 2, k1, y), args)
            k3 = f(s + h / 2, _axpy(h / 2, k2, y), args)
            k4 = f(s + h, _axpy(h, k3, y), args)
            increment = jax.tree_util.tree_map(
                lambda a, b, c, e: (a + 2 * b + 2 * c + e) / 6, k1, k2, k3, k4
            )
            return _axpy(h, increment, y)

        if self.substeps == 1:
            return rk4(0, z)
        return jax.lax.fori_loop(0, self.substeps, rk4, z)

    def _diffrax(self, s0: Array, h: Any, z: PyTree, args: Any) -> PyTree:
        import diffrax

        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(self.vector_field),
            self.solver,
            t0=s0,
            t1=s0 + self.dt,
            dt0=h,
            y0=z,
            args=args,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=diffrax.ConstantStepSize(),
            adjoint=diffrax.ForwardMode(),  # forward-mode (jvp) through the solver's internals
            max_steps=self.substeps + 1,  # one spare: the last step may be clipped to t1
            throw=False,  # divergence is reported by the caller (non-finite state), not raised
        )
        return jax.tree_util.tree_map(lambda y: y[-1], solution.ys)


def flow_map(
    vector_field: Callable[..., PyTree[Array]],
    dt: float | Float[ArrayLike, ""],
    *,
    substeps: int = 1,
    solver: Any = None,
) -> Callable[..., PyTree[Array]]:
    r"""The time-$\Delta t$ flow map of $\dot z = f(s, z, \text{args})$ as a ``step(t, z, args)``.

    ``step(t, z, args)`` integrates from $s = t\,\Delta t$ to $(t+1)\,\Delta t$ with
    ``substeps`` fixed steps of size $h = \Delta t / \text{substeps}$, so that
    ``lyapunov_spectrum(flow_map(f, dt), z0, n, dt=dt)`` gives the exponents of the flow per
    unit time. The default integrator is the classical fourth-order Runge–Kutta method, written
    in JAX (cheap, and exactly differentiable in forward mode: the tangent dynamics are the RK4
    discretisation of the variational equation). Alternatively any diffrax solver, run with
    ``diffrax.ConstantStepSize`` and ``diffrax.ForwardMode`` (forward-mode differentiation
    through the solver).

    **Arguments:**

    - `vector_field`: $f(s, z, \text{args})$ returning $dz/ds$ with the structure of $z$
      (the diffrax ``ODETerm`` convention).
    - `dt`: the time one step advances, $\Delta t > 0$ (pass the same ``dt`` to
      ``lyapunov_spectrum``).
    - `substeps`: integrator steps per map step, $\ge 1$.
    - `solver`: ``None`` for RK4, or a diffrax solver such as ``diffrax.Tsit5()``.

    **Returns:**

    A callable ``step(t, z, args) -> z_next`` (an ``equinox.Module``; two calls with equal
    arguments return equal maps, which share compiled code).

    **Raises:**

    ``TypeError``/``ValueError`` if ``vector_field`` is not callable, ``dt`` is not finite and
    positive, ``substeps`` is not an int $\ge 1$, or ``solver`` is not a diffrax solver.
    """
    if not callable(vector_field):
        raise TypeError(
            f"`vector_field` must be a callable f(t, z, args) -> dz/dt, got {vector_field!r}."
        )
    _check_dt(dt)
    substeps = _check_int("substeps", substeps, 1, "Pass the number of integrator steps per dt.")
    if solver is not None:
        import diffrax

        if not isinstance(solver, diffrax.AbstractSolver):
            raise TypeError(
                f"`solver` must be a diffrax solver (e.g. diffrax.Tsit5()) or None for RK4, "
                f"got {solver!r}."
            )
    if not isinstance(dt, jax.Array):
        dt = float(dt)
    return _FlowMap(vector_field, dt, substeps, solver)
