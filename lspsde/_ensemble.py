r"""The ensemble engine: the one path loop behind ``simulate``, ``exponent_distribution`` and the
learning profile.

It owns every piece of running many paths of a learning system:

- **start checks** ([`check_run`][], [`check_start`][], [`check_key`][], [`check_step`][]), the
  same for every entry point and run before anything compiles. Values that are traced (a sweep
  built inside ``jax.vmap``, a ``jax.jit`` around the call) cannot be checked before tracing;
  their checks are skipped, never turned into a crash (the run's settings, such as the counts
  and ``divergence_threshold``, must be concrete);
- the **divergence-guarded step** ([`guarded_step`][]): a path whose $\theta^t$ is not finite
  or leaves the ball $\|\theta\| \le$ ``divergence_threshold`` is frozen and its step recorded;
- the **saved steps** $0, s, 2s, \dots, T$ ([`saved_steps`][]);
- **counter keys**: path $p$ uses ``fold_in(key, p)``, its step $t$ ``fold_in(fold_in(key, p),
  t)`` (``LearningSystem.noise_at``), so a path never depends on the chunking, the devices or
  the grid point it runs beside;
- the **memory estimate** ([`MemoryPlan`][]): the result size and the per-path working set are
  computed from shapes alone, and a request that cannot fit is refused before compilation;
- **chunks and sharding** ([`run_ensemble`][]): paths run in chunks (all padded to one shape,
  so one program serves every chunk), the path axis sharded over the local devices, and a
  **sweep** (a batch of flows or noise models, [`lspsde.Sweep`][]) adds a leading grid axis
  that is a ``lax.map`` (``vmap``-ed ``batch_size`` points at a time) inside the same compiled
  program.
"""

from collections.abc import Callable
import dataclasses
import math
import os
import re
import sys
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray, PyTree
import numpy as np
from tqdm.auto import tqdm

from . import distributed
from ._checks import check_positive, check_positive_int
from .parameter import AbstractStatefulFlow
from .sweep import Sweep
from .system import LearningSystem

__all__ = [
    "CHUNK_BUDGET_BYTES",
    "MemoryPlan",
    "RunSettings",
    "check_key",
    "check_run",
    "check_start",
    "check_step",
    "describe",
    "guarded_step",
    "named_leaves",
    "run_ensemble",
    "saved_steps",
    "scan_progress",
    "show_progress",
    "sq_norm",
    "state_size",
    "tick_every",
]

# Default chunking: a chunk's estimated working set is kept under this many bytes.
CHUNK_BUDGET_BYTES = 2**30
# Chunks are padded in blocks of (a multiple of) this many paths, plus one block, so that no real
# path falls into the remainder loop of a vectorised kernel (see run_ensemble).
TAIL_PATHS = 8


# --------------------------------------------------------------------------------------------
# Small pytree helpers shared by the front ends
# --------------------------------------------------------------------------------------------


def sq_norm(tree: PyTree[Array]) -> Array:
    r"""$\|\theta\|^2$ summed over all leaves."""
    return sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree))


def state_size(system: LearningSystem, theta0: PyTree[Array]) -> int:
    """Numbers in the state the flow carries from ``theta0`` ($\theta$ and any optimiser
    state), from shapes alone."""
    state = eqx.filter_eval_shape(system.init_state, theta0)
    return sum(math.prod(a.shape) for a in jax.tree.leaves(state))


def describe(tree: PyTree) -> str:
    """``{'w': float64[3, 2], ...}``: dtypes and shapes of a pytree, for error messages."""
    return str(jax.tree.map(lambda a: f"{jnp.result_type(a)}{list(jnp.shape(a))}", tree))


def named_leaves(tree: PyTree[Array], prefix: str) -> dict[str, np.ndarray]:
    """``{prefix + sanitised key path: leaf}``: ``theta`` for a bare array, ``theta_w`` etc."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = re.sub(r"\W+", "_", prefix + jax.tree_util.keystr(path)).strip("_")
        out[name] = np.asarray(leaf)
    return out


def saved_steps(n_steps: int, save_every: int) -> np.ndarray:
    """The saved steps $0, s, 2s, \\dots$ and ``n_steps`` (always included)."""
    steps = list(range(0, n_steps + 1, save_every))
    if steps[-1] != n_steps:
        steps.append(n_steps)
    return np.asarray(steps)


# --------------------------------------------------------------------------------------------
# Start checks (before anything compiles)
# --------------------------------------------------------------------------------------------


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_key(key: Any) -> None:
    """``key`` must be a JAX PRNG key (typed, or a legacy ``uint32[2]``)."""
    if _is_traced(key):
        return
    ok = isinstance(key, jax.Array) and (
        jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.shape == (2,) and key.dtype == jnp.uint32)
    )
    if not ok:
        raise TypeError(
            f"`key` must be a JAX PRNG key, got {key!r}; use `key=jax.random.key(seed)`."
        )


def check_start(
    theta0: PyTree[ArrayLike],
    divergence_threshold: Any = None,
    *,
    name: str = "theta0",
) -> PyTree[Array]:
    r"""``theta0`` as arrays, checked to be real floating point and finite and, with a
    ``divergence_threshold``, inside it (and that threshold below overflow of $\|\theta\|^2$).

    Concrete values are checked in NumPy (no JAX op is traced), so the check also runs inside
    an outer ``jax.jit``; traced leaves (``theta0`` built inside ``jax.vmap``) are only checked
    for dtype.
    """
    leaves = jax.tree.leaves(theta0)
    dtypes = [jnp.result_type(a) for a in leaves]
    if not leaves or not all(jnp.issubdtype(d, jnp.floating) for d in dtypes):
        kind = (
            "complex"
            if any(jnp.issubdtype(d, jnp.complexfloating) for d in dtypes)
            else "non-floating"
        )
        raise TypeError(
            f"`{name}` must hold real floating-point arrays, got {kind} leaves "
            f"{describe(theta0)}; e.g. `jnp.asarray({name}, dtype=float)`"
            + (" (the theory is stated over the reals)." if kind == "complex" else ".")
        )
    theta0 = jax.tree.map(jnp.asarray, theta0)
    leaves = jax.tree.leaves(theta0)  # as converted: e.g. 1e39 is inf in float32
    concrete = [np.asarray(a) for a in leaves if not _is_traced(a)]
    if len(concrete) < len(leaves):
        return theta0  # traced: checked where it is used (divergence is data)
    norm0 = math.sqrt(sum(float(np.sum(np.square(a.astype(np.float64)))) for a in concrete))
    if not math.isfinite(norm0):
        raise ValueError(
            f"`{name}` is not finite (it holds NaN or inf) {describe(theta0)}; start from "
            "finite values."
        )
    if divergence_threshold is None or _is_traced(divergence_threshold):
        return theta0
    threshold = float(divergence_threshold)
    largest = math.sqrt(float(jnp.finfo(jnp.result_type(*leaves)).max))
    if not threshold < largest:
        raise ValueError(
            f"`divergence_threshold`={threshold:g} is not below sqrt(max float) = "
            f"{largest:.3g} for {name}'s dtype: ||theta||^2 would overflow before the threshold "
            "is reached. Use a smaller threshold (the default is 1e8)."
        )
    if not norm0 <= threshold:
        raise ValueError(
            f"`{name}` has norm {norm0:.6g}, above `divergence_threshold`={threshold:g}: every "
            "path would diverge at step 0. Start closer to the origin or raise the threshold."
        )
    return theta0


def check_step(
    system: LearningSystem, theta0: PyTree[Array], key: PRNGKeyArray, n_steps: int | None = None
) -> None:
    """One step, abstractly (``eval_shape``: traced, not compiled), must keep ``theta0``'s
    structure, shapes and dtypes. First the noise model's ``check_objective`` (does it fit this
    kind of objective at all), the flow's own check and, with ``n_steps``, the noise model's
    ``check_horizon``; the noise model's ``check(objective, theta0)`` runs after the abstract
    step, whose failure names ``theta0``."""
    system.noise.check_objective(system.objective)
    system.update.check(system.objective, system.noise, theta0)
    if n_steps is not None:
        system.noise.check_horizon(n_steps)
    fix = (
        "give `theta0` the structure, shapes and dtype the objective expects (for a network: "
        "`lspsde.parameters(network)`; for a d-dimensional quadratic: shape (d,))."
    )

    def one_step(s, th, k):
        state = s.init_state(th)
        return state, s.parameter_map(0, state, s.noise_at(k, 0, state))

    try:
        want, out = eqx.filter_eval_shape(one_step, system, theta0, key)
    except Exception as err:
        raise ValueError(
            f"One update step (noise.sample, noise.gradient, update) fails at `theta0` "
            f"{describe(theta0)}: {err}\nIf `theta0` is at fault, {fix}"
        ) from err
    if jax.tree.structure(out) != jax.tree.structure(want) or any(
        (a.shape, a.dtype) != (b.shape, b.dtype)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want), strict=True)
    ):
        raise ValueError(
            f"One update step maps `theta0` {describe(theta0)} to {describe(out)}; "
            f"the scan needs them equal: {fix}"
        )
    check = getattr(system.noise, "check", None)  # e.g. the model needs theta*
    if callable(check):
        check(system.objective, theta0)


class RunSettings(NamedTuple):
    """The checked counts of a run (see [`check_run`][])."""

    n_paths: int
    n_steps: int
    save_every: int
    chunk_size: int | None
    divergence_threshold: float
    steps: np.ndarray


def check_run(
    *,
    n_paths: int,
    n_steps: int,
    save_every: int,
    chunk_size: int | None,
    divergence_threshold: Any,
) -> RunSettings:
    """The counts and the divergence threshold of an ensemble, checked (clear errors, no
    compilation). ``divergence_threshold`` must be a concrete number: it is a static setting."""
    n_paths = check_positive_int("n_paths", n_paths, fix="Simulate at least one path.")
    n_steps = check_positive_int("n_steps", n_steps, fix="Simulate at least one step.")
    save_every = check_positive_int("save_every", save_every)
    if save_every > n_steps:
        raise ValueError(
            f"`save_every`={save_every} exceeds `n_steps`={n_steps}; use save_every <= n_steps "
            "(the last step is always saved)."
        )
    if chunk_size is not None:
        chunk_size = check_positive_int("chunk_size", chunk_size, fix="Or pass None (automatic).")
    if _is_traced(divergence_threshold):
        raise TypeError(
            "`divergence_threshold` must be a concrete number (it is a static setting of the "
            "run), not a traced value; sweep step sizes or noise levels instead."
        )
    if isinstance(divergence_threshold, str | bytes | bool) or np.ndim(divergence_threshold):
        raise TypeError(
            f"`divergence_threshold` must be a real number, got {divergence_threshold!r}."
        )
    check_positive(
        "divergence_threshold",
        divergence_threshold,
        fix="It bounds ||theta||; use e.g. 1e8 (the default).",
    )
    return RunSettings(
        n_paths,
        n_steps,
        save_every,
        chunk_size,
        float(divergence_threshold),
        saved_steps(n_steps, save_every),
    )


# --------------------------------------------------------------------------------------------
# Memory: estimated from shapes, checked before compilation
# --------------------------------------------------------------------------------------------


def _format_bytes(n: float | int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def available_memory() -> int:
    """Bytes a run may use: the first local device's memory limit where JAX reports one (GPU,
    TPU), else the host's physical memory. ``LSPSDE_MEMORY_LIMIT`` (bytes) overrides both."""
    override = os.environ.get("LSPSDE_MEMORY_LIMIT")
    if override:
        return int(float(override))
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # some backends do not implement memory_stats
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class MemoryPlan(NamedTuple):
    r"""The memory a run needs, from shapes alone.

    - `result_per_path`: bytes of the returned arrays for one path (all grid points);
    - `work_per_path`: bytes of one path's working set while it runs (all grid points),
      outputs included;
    - `what`: the names of the result's large parts, for the error message;
    - `fixes`: what to change when the request does not fit.
    """

    result_per_path: int
    work_per_path: int
    what: str
    fixes: str

    def check(self, n_paths: int, limit: int | None = None) -> None:
        """Refuse a request whose result, or whose smallest chunk (one path, padded to
        [`padded_size`][]: 16 paths on one device), cannot fit in ``limit`` bytes (default:
        [`available_memory`][])."""
        limit = available_memory() if limit is None else limit
        result = self.result_per_path * n_paths
        smallest = self.work_per_path * padded_size(1)
        if result > limit or smallest > limit:
            size, part = (
                (result, f"the result ({self.what}) alone")
                if result > limit
                else (smallest, f"the smallest chunk's working set ({padded_size(1)} paths)")
            )
            raise MemoryError(
                f"This run needs {_format_bytes(size)} for {part}, more than the "
                f"{_format_bytes(limit)} available. {self.fixes}"
            )

    def chunk_size(self, n_paths: int, budget: int = CHUNK_BUDGET_BYTES) -> int:
        """All paths if their padded working set fits ``budget``, else the fewest (nearly)
        equal chunks whose padded size ([`padded_size`][]) fits (one path per chunk at the
        least)."""
        block = chunk_block()
        fits = budget // max(self.work_per_path, 1)  # paths, padding included
        largest = max(1, (fits // block - 1) * block)
        return math.ceil(n_paths / math.ceil(n_paths / largest))  # balanced: none > largest


def chunk_block() -> int:
    """Chunks are padded in blocks of ``lcm(2 * local devices, TAIL_PATHS)`` paths (see
    [`run_ensemble`][])."""
    return math.lcm(2 * len(jax.local_devices()), TAIL_PATHS)


def padded_size(chunk_size: int) -> int:
    """The paths a chunk of ``chunk_size`` computes: a multiple of [`chunk_block`][] and one
    more block, so that no real path falls in a vectorised kernel's remainder loop."""
    block = chunk_block()
    return math.ceil(chunk_size / block) * block + block


# --------------------------------------------------------------------------------------------
# The guarded step
# --------------------------------------------------------------------------------------------


def _finite(tree: PyTree[Array]) -> Array:
    """Whether every floating leaf of ``tree`` is finite."""
    floats = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    leaves = [jnp.all(jnp.isfinite(a)) for a in floats]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


TICKS_PER_RUN = 50
"""How many times a compiled scan reports its progress over a run's steps (a host callback
every ``ceil(n_steps / TICKS_PER_RUN)`` steps; see [`scan_progress`][])."""

_DISPLAYS: list["_StepDisplay"] = []  # the innermost open display receives the scans' ticks


class _StepDisplay:
    """A tqdm bar over the steps of a run's chunks: ``n_chunks * n_steps`` in all. The compiled
    scans tick it from inside (``every`` steps a tick, once per grid point and device, so a
    tick advances ``every / calls_per_step`` steps), and each finished chunk sets it to the
    chunk's exact end, so that the count inside a chunk is an estimate and the boundaries are
    exact."""

    def __init__(self, bar: Any, n_steps: int | None, calls: int):
        self.bar, self.n_steps, self.done, self.pos = bar, n_steps or 1, 0, 0.0
        # counting chunks (no n_steps): the scans' ticks are ignored
        self.per_tick = tick_every(n_steps) / max(calls, 1) if n_steps else 0.0

    def tick(self) -> None:
        if self.per_tick:  # never past the running chunk's end
            self.pos = min(self.pos + self.per_tick, (self.done + 1) * self.n_steps)
            self._show()

    def chunk_done(self) -> None:
        self.done += 1
        self.pos = float(self.done * self.n_steps)
        self._show()

    def _show(self) -> None:
        if int(self.pos) > self.bar.n:
            self.bar.update(int(self.pos) - self.bar.n)


def _tick() -> None:
    if _DISPLAYS:
        _DISPLAYS[-1].tick()


def tick_every(n_steps: int) -> int:
    """The step interval of the in-scan progress ticks for a run of ``n_steps`` steps."""
    return max(1, math.ceil(n_steps / TICKS_PER_RUN))


def scan_progress(t: Array, every: int) -> None:
    r"""Report progress from inside a compiled scan: a host callback after steps
    $t + 1 \equiv 0 \pmod{every}$ (an ``ordered=False`` ``jax.debug.callback`` under a
    ``lax.cond`` on the unbatched step counter: once per grid point and device, never per
    path). It has no outputs, so the numbers do not depend on it; with no open display it
    does nothing."""
    jax.lax.cond(
        (t + 1) % every == 0, lambda: jax.debug.callback(_tick, ordered=False), lambda: None
    )


def show_progress(progress: bool | None, n_chunks: int, n_steps: int | None) -> bool:
    """``progress=None``: a display on a terminal, outside CI, for several chunks or a run of
    ``n_steps`` steps that reports from inside its scans."""
    if progress is not None:
        return bool(progress)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return False
    return getattr(sys.stderr, "isatty", lambda: False)() and (n_chunks > 1 or bool(n_steps))


def guarded_step(
    system: LearningSystem, k_p: PRNGKeyArray, threshold: Array, every: int | None = None
) -> Callable:
    r"""``step((state, div_step), t) -> (state, div_step)``: one step of path ``k_p`` under the
    divergence rule. A path whose new $\theta$ is not finite or has $\|\theta\| >$
    ``threshold`` (or, for a flow with optimiser state, whose state is not finite) is frozen at
    its last admissible state, and ``div_step`` (``-1`` while alive) records the first such
    step $t + 1$. With ``every``, the step reports progress ([`scan_progress`][])."""
    stateful = isinstance(system.update, AbstractStatefulFlow)

    def step(carry, t):
        if every is not None:
            scan_progress(t, every)
        theta, div_step = carry
        new = system.parameter_map(t, theta, system.noise_at(k_p, t, theta))
        # NaN and inf fail `<=`, so this one comparison also catches non-finite values.
        ok = jnp.sqrt(sq_norm(system.params(new))) <= threshold
        if stateful:  # a non-finite momentum or moment estimate is divergence too
            ok = ok & _finite(new)
        frozen = (div_step >= 0) | ~ok
        theta = jax.tree.map(lambda old, nw: jnp.where(frozen, old, nw), theta, new)
        div_step = jnp.where((div_step < 0) & frozen, t + 1, div_step)
        return theta, div_step

    return step


# --------------------------------------------------------------------------------------------
# Running the ensemble: chunks, sharding, the grid axis
# --------------------------------------------------------------------------------------------


@eqx.filter_jit
def _run_chunk(path_fn, system, sweep_field, swept, batch_size, args, ids):
    """``path_fn(system, *args, p)`` over the path ids of one chunk. With a sweep, a
    ``lax.map`` over the grid axis of ``swept`` (``vmap``-ed ``batch_size`` grid points at a
    time), which replaces the field ``sweep_field`` (``"update"`` or ``"noise"``) of ``system``
    at each grid point."""
    over_paths = eqx.filter_vmap(lambda s, p: path_fn(s, *args, p), in_axes=(None, 0))
    if sweep_field is None:
        return over_paths(system, ids)
    arrays, static = eqx.partition(swept, eqx.is_array)

    def at_grid_point(a):
        module = eqx.combine(a, static)
        return over_paths(eqx.tree_at(lambda s: getattr(s, sweep_field), system, module), ids)

    return jax.lax.map(at_grid_point, arrays, batch_size=batch_size)


def grid_point(result: eqx.Module, g: int, what: str) -> eqx.Module:
    """Grid point ``g`` of a sweep's result (an ``Ensemble``, an ``ExponentDistribution``):
    every array field but ``steps`` indexed at ``g`` on its leading grid axis, and no grid."""
    if result.grid_name is None:
        raise ValueError(f"This {what} has no grid (it was not run with an lspsde.Sweep).")
    pick = lambda x: None if x is None else jax.tree.map(lambda a: a[g], x)
    per_point = {
        f.name: pick(getattr(result, f.name))
        for f in dataclasses.fields(result)
        if not f.metadata.get("static", False) and f.name not in ("steps", "grid")
    }
    return dataclasses.replace(result, **per_point, grid=None, grid_name=None)


def split_sweep(update, noise) -> tuple:
    """``(update, noise, (field, batched module) | None, sweep | None)``; at most one sweep,
    and the system holds grid point 0 for the checks."""
    sweeps = {f: m for f, m in (("update", update), ("noise", noise)) if isinstance(m, Sweep)}
    if len(sweeps) > 1:
        raise ValueError(
            "Sweep either the update or the noise model, not both: a grid over two factors is "
            "a product; build it with `itertools.product` as one Sweep of one of them, or run "
            "one sweep per value of the other."
        )
    if not sweeps:
        return update, noise, None, None
    ((field, sweep),) = sweeps.items()
    batched = (field, sweep.module, sweep.batch_size)
    if field == "update":
        return sweep.at(0), noise, batched, sweep
    return update, sweep.at(0), batched, sweep


def as_system(system: Any, what: str) -> tuple:
    """``(LearningSystem, (field, batched module, batch_size) | None, sweep | None)`` from the
    one way every front end takes a system: a ``LearningSystem``, or a tuple ``(objective,
    update, noise)`` in which the update or the noise may be a ``Sweep``."""
    from .objectives import AbstractObjective

    if isinstance(system, AbstractObjective):
        raise TypeError(
            f"`{what}` takes the learning system first: `{what}((objective, update, noise), "
            f"theta0, ...)` or `{what}(lspsde.LearningSystem(objective, update, noise), theta0, "
            "...)`, not the objective alone."
        )
    if isinstance(system, tuple):
        if len(system) != 3:
            raise TypeError(
                "`system` must be a LearningSystem or a tuple (objective, update, noise), got a "
                f"tuple of length {len(system)}."
            )
        objective, update, noise = system
        update, noise, batched, sweep = split_sweep(update, noise)
        return LearningSystem(objective, update, noise), batched, sweep
    if not isinstance(system, LearningSystem):
        raise TypeError(
            "`system` must be a LearningSystem or a tuple (objective, update, noise), got "
            f"{type(system).__name__}."
        )
    return system, None, None


def run_ensemble(
    path_fn: Callable,
    system: LearningSystem,
    args: tuple,
    *,
    n_paths: int,
    chunk_size: int,
    sweep: "tuple[str, eqx.Module, int | None] | None" = None,
    progress: bool | None = None,
    desc: str = "ensemble",
    n_steps: int | None = None,
) -> PyTree[Array]:
    r"""``path_fn(system, *args, p)`` for every global path index ``p``, ``chunk_size`` paths
    per compiled call, concatenated on the path axis (after the grid axis, if any).

    ``path_fn`` must be a module-level function (its identity is part of the compilation key);
    ``args`` holds arrays (traced) and hashable settings (static). ``sweep = (field, module,
    batch_size)`` runs a grid: ``module`` is a batch of flows or noise models (every array leaf
    has a leading grid axis) that replaces ``system.<field>``. The grid is a ``lax.map`` inside
    the same compiled program, ``vmap``-ed over ``batch_size`` grid points at a time (``None``:
    one at a time). One at a time, each grid point runs exactly the program of a plain run, so
    path ``p`` at grid point ``g`` is bit for bit the plain run's path ``p``; a wider batch
    vectorises across the grid too, and XLA may then round reductions differently (last-ulp
    differences, measured 2.2e-16 on state-dependent noise).

    A compiled chunk is padded to a multiple of ``block = lcm(2 * devices, TAIL_PATHS)`` paths,
    plus one more block of padding. XLA:CPU evaluates a one-row matrix product with a fused
    matrix-vector kernel that rounds differently from the matrix-matrix one, and runs
    elementwise loops (the normal sampler's ``erfinv``, ``log``, ...) vectorised with a scalar
    remainder loop whose math functions round differently: either would make a path's last bit
    depend on the chunk's width and on where it falls in its chunk. With every width a multiple
    of the block and the remainder loops falling in the padding, a path's bits no longer depend
    on the chunking (one program serves all chunks; the padding is discarded). Measured over
    120 (dimension, objective, noise model, chunk size) combinations and chunk sizes 1-23 of a
    6-point sweep: 24 combinations differed in the last bit (up to 1.3e-15) with chunks padded
    only to a multiple of two, and chunk size 4 of the sweep still did with 8 padding paths
    after it; none does with the block padding. With several devices the path axis is sharded
    over a 1-D mesh.
    ``progress=None``: a display only on a terminal, outside CI ([`show_progress`][]). With
    ``n_steps`` (the steps of a path, for a ``path_fn`` whose scan reports with
    [`scan_progress`][]) the display counts steps, also inside a chunk; without, chunks.
    """
    exe = distributed.current()
    traced = any(_is_traced(a) for a in jax.tree.leaves((system, args, sweep)))
    if exe is not None and traced:
        exe = None  # inside jit/vmap: nothing concrete to store or send
    if exe is not None and exe.chunk_size is not None:
        chunk_size = min(chunk_size, exe.chunk_size)
    chunk_size = min(chunk_size, n_paths)
    padded = padded_size(chunk_size)
    field, swept, batch_size = sweep if sweep is not None else (None, None, None)
    axis = 0 if sweep is None else 1  # the path axis of every output
    starts = range(0, n_paths, chunk_size)
    valid = lambda start: min(chunk_size, n_paths - start)
    fixed = (path_fn, system, field, swept, batch_size, args)
    pieces = [distributed.Piece(fixed, s, padded, valid(s), axis) for s in starts]
    n_chunks = len(pieces)
    grid = 1 if swept is None else _grid_size(swept)
    calls = grid * _n_shards(padded)  # ticks per step interval (from workers: none arrive)
    with _display(progress, n_chunks, n_steps, desc, calls) as display:
        if exe is not None:
            chunks = distributed.run_pieces(
                "lspsde._ensemble:_run_chunk", pieces, exe, display.chunk_done
            )
        else:
            chunks = []
            for piece in pieces:
                chunks.append(piece.compute(_run_chunk))
                display.chunk_done()
    if n_chunks == 1:
        return chunks[0]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=axis), *chunks)


class _display:
    """The progress display of one ensemble (a context manager yielding a [`_StepDisplay`][]);
    a disabled one when ``show_progress`` says no."""

    def __init__(self, progress, n_chunks: int, n_steps: int | None, desc: str, calls: int):
        shown = show_progress(progress, n_chunks, n_steps)
        unit = "step" if n_steps else "chunk"  # without steps, the display counts chunks
        total = n_chunks * (n_steps or 1)
        # `delay`: a run that ends within a second never draws the automatic bar; one asked
        # for with progress=True is drawn at once
        delay = 0.0 if progress else 1.0
        bar = tqdm(total=total, disable=not shown, desc=desc, unit=unit, delay=delay)
        self.display = _StepDisplay(bar, n_steps, calls)

    def __enter__(self) -> _StepDisplay:
        if not self.display.bar.disable:
            _DISPLAYS.append(self.display)
        return self.display

    def __exit__(self, *exc: Any) -> None:
        if self.display in _DISPLAYS:
            _DISPLAYS.remove(self.display)
        self.display.bar.close()


def _grid_size(swept: eqx.Module) -> int:
    leaves = jax.tree.leaves(eqx.filter(swept, eqx.is_array))
    return int(leaves[0].shape[0]) if leaves else 1


def _n_shards(padded: int) -> int:
    """How many devices a chunk of ``padded`` paths is sharded over (see `Piece.compute`)."""
    n = jax.local_device_count()
    return n if n > 1 and padded % n == 0 else 1
