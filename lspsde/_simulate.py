r"""Monte Carlo ensembles of the parameter flow $\theta^{t+1} = \mathcal{A}_t(\theta^t, u^t)$.

One path is a fixed-grid ``lax.scan``; the ensemble is a filtered ``jit`` of a filtered ``vmap`` of
that path (as diffrax's test helpers build ensembles), run over chunks of paths by a Python loop so
that memory stays bounded, and sharded over the path axis when several devices are present.

**Noise from counters.** Path $p$ (its global index, whatever the chunking) uses the key
$k_p = $ ``fold_in(key, p)`` and step $t$ draws $u^t$ from ``fold_in(k_p, t)``
(``LearningSystem.noise_at``). A path therefore depends only on ``(key, p)``: results are the same,
bit for bit, whatever ``chunk_size`` and however many devices share the work.

**Divergence is data.** A path whose $\theta^t$ is not finite or has $\|\theta^t\| >$
``divergence_threshold`` is frozen at its last admissible value from step $t$ on (a ``where``
in the scan body, so shapes stay static), and ``diverged`` / ``divergence_step`` record it.
Ensemble statistics ([`Ensemble.mean_energy`][]) use the paths alive at each saved step only.
"""

import math
import re
import sys
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree
import numpy as np
from tqdm.auto import tqdm

from ._checks import check_positive, check_positive_int
from ._custom_types import ScalarLike
from .noise import AbstractNoise
from .objectives import AbstractObjective
from .parameter import AbstractParameterFlow
from .system import LearningSystem

__all__ = ["Ensemble", "MeanEstimate", "simulate"]

SAVE_MODES = ("trajectory", "summary")

# Default chunking: a chunk's estimated working set is kept under this many bytes.
CHUNK_BUDGET_BYTES = 2**30
# Parameter-sized buffers a step needs besides the outputs (theta, u, G, the candidate, the
# frozen copy, RNG bits, ...): a deliberately generous count.
_STEP_BUFFERS = 8


class MeanEstimate(NamedTuple):
    """A Monte Carlo mean over the paths alive at each saved step."""

    mean: Float[Array, " step"]
    """Mean over the paths that have not diverged by that step (NaN where none is left)."""
    sem: Float[Array, " step"]
    """Standard error of the mean, ``std(ddof=1) / sqrt(n_alive)`` (NaN where n_alive < 2)."""
    diverged_fraction: Float[Array, " step"]
    """Fraction of all paths that have diverged by that step."""


class Ensemble(eqx.Module):
    r"""The result of [`simulate`][lspsde.simulate.simulate]: ``n_paths`` paths of $\theta^t$.

    Every array has the path axis first; "step" indexes the saved steps ``steps``
    ($0, s, 2s, \dots$ and always ``n_steps``; $s$ = ``save_every``).

    **Fields:**

    - `theta`: $\theta^t$ at the saved steps, dims ``(path, step, ...)`` per leaf; ``None`` when
      ``save="summary"``.
    - `final_theta`: $\theta^T$, dims ``(path, ...)`` per leaf.
    - `energy`: $\|\theta^t - \theta^*\|^2$ at the saved steps, ``(path, step)``; ``None`` when the
      objective does not know $\theta^*$.
    - `loss`: $\mathcal{L}(\theta^t)$ at the saved steps, ``(path, step)``.
    - `diverged`: whether the path diverged, ``(path,)``.
    - `divergence_step`: the first $t$ at which $\theta^t$ was not finite or exceeded the
      threshold (the path holds $\theta^{t-1}$ from then on), ``-1`` if none, ``(path,)``.
    - `steps`: the saved steps, ``(step,)``.
    - static metadata: `n_steps`, `save_every`, `save`, `divergence_threshold`, `chunk_size`.
    """

    theta: PyTree[Float[Array, "path step ..."]] | None
    final_theta: PyTree[Float[Array, "path ..."]]
    energy: Float[Array, "path step"] | None
    loss: Float[Array, "path step"]
    diverged: Bool[Array, " path"]
    divergence_step: Int[Array, " path"]
    steps: Int[Array, " step"]
    n_steps: int = eqx.field(static=True)
    save_every: int = eqx.field(static=True)
    save: str = eqx.field(static=True)
    divergence_threshold: float = eqx.field(static=True)
    chunk_size: int = eqx.field(static=True)

    @property
    def n_paths(self) -> int:
        return self.diverged.shape[0]

    def alive(self) -> Bool[Array, "path step"]:
        """Whether each path is still alive (not diverged) at each saved step."""
        d = self.divergence_step[:, None]
        return (d < 0) | (d > self.steps[None, :])

    def _mean(self, values: Float[Array, "path step"]) -> MeanEstimate:
        mean, sem = masked_mean(values, self.alive())
        return MeanEstimate(mean, sem, 1.0 - jnp.sum(self.alive(), axis=0) / self.n_paths)

    def mean_energy(self) -> MeanEstimate:
        r"""$\mathbb{E}\|\theta^t - \theta^*\|^2$ over the paths alive at each saved step, its
        standard error and the diverged fraction (frozen paths never enter the mean)."""
        if self.energy is None:
            raise ValueError(
                "This ensemble has no `energy`: the objective does not know its minimiser "
                "theta* (`objective.minimizer()` is None). Use `mean_loss()` instead."
            )
        return self._mean(self.energy)

    def mean_loss(self) -> MeanEstimate:
        r"""$\mathbb{E}\,\mathcal{L}(\theta^t)$ over the alive paths, as [`mean_energy`][]."""
        return self._mean(self.loss)

    def to_datatree(self, attrs: dict | None = None):
        r"""The ensemble as an ``xarray.DataTree`` (ArviZ 1.x conventions, sample dim ``path``).

        Groups: ``/trajectory`` (each leaf of $\theta$ as ``theta...``, dims
        ``(path, step, <leaf>_dim_i)``; only with ``save="trajectory"``), ``/final`` ($\theta^T$
        as ``final_theta...``), ``/energy``, ``/loss`` (dims ``(path, step)``) and ``/status``
        (``diverged``, ``divergence_step``). ``step`` is labelled with the step numbers; the run's
        configuration, updated with ``attrs``, is in the root's attributes.
        """
        import arviz_base

        data: dict[str, dict[str, np.ndarray]] = {}
        dims: dict[str, list[str]] = {}
        if self.theta is not None:
            data["trajectory"] = _named_leaves(self.theta, "theta")
            for name, v in data["trajectory"].items():
                dims[name] = ["step", *(f"{name}_dim_{i}" for i in range(v.ndim - 2))]
        data["final"] = _named_leaves(self.final_theta, "final_theta")
        for name, v in data["final"].items():
            base = name.removeprefix("final_")
            dims[name] = [f"{base}_dim_{i}" for i in range(v.ndim - 1)]
        if self.energy is not None:
            data["energy"] = {"energy": np.asarray(self.energy)}
        data["loss"] = {"loss": np.asarray(self.loss)}
        data["status"] = {
            "diverged": np.asarray(self.diverged),
            "divergence_step": np.asarray(self.divergence_step),
        }
        dims.update(energy=["step"], loss=["step"])
        config = {
            "n_paths": self.n_paths,
            "n_steps": self.n_steps,
            "save_every": self.save_every,
            "save": self.save,
            "divergence_threshold": self.divergence_threshold,
            "chunk_size": self.chunk_size,
            "diverged_fraction": float(np.mean(data["status"]["diverged"])),
            "created_by": "lspsde.simulate",
            **(attrs or {}),
        }
        return arviz_base.from_dict(
            data,
            sample_dims=["path"],
            dims=dims,
            coords={"step": np.asarray(self.steps)},
            attrs={"/": config},
        )


def masked_mean(
    values: Float[ArrayLike, "path step"], mask: Bool[ArrayLike, "path step"]
) -> tuple[Float[Array, " step"], Float[Array, " step"]]:
    r"""Mean over the paths where ``mask`` holds, per step, and its standard error
    ``std(ddof=1) / sqrt(n)``; NaN where fewer than one (mean) or two (error) paths count.
    Masked-out values never enter, so a NaN on a diverged path cannot poison the statistic."""
    values, mask = jnp.asarray(values), jnp.asarray(mask)
    n = jnp.sum(mask, axis=0)
    mean = jnp.sum(jnp.where(mask, values, 0.0), axis=0) / jnp.where(n > 0, n, np.nan)
    dev = jnp.where(mask, values - mean[None, :], 0.0)
    var = jnp.sum(dev * dev, axis=0) / jnp.where(n > 1, n - 1, np.nan)
    return mean, jnp.sqrt(var / n)


def _named_leaves(tree: PyTree[Array], prefix: str) -> dict[str, np.ndarray]:
    """``{prefix + sanitised key path: leaf}``: ``theta`` for a bare array, ``theta_w`` etc."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = re.sub(r"\W+", "_", prefix + jax.tree_util.keystr(path)).strip("_")
        out[name] = np.asarray(leaf)
    return out


def _sq_norm(tree: PyTree[Array]) -> Array:
    return sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree))


def guarded_step(system: LearningSystem, k_p: PRNGKeyArray, threshold: Array):
    r"""``step((theta, div_step), t) -> (theta, div_step)``: one step of path ``k_p`` under the
    divergence rule. A path whose new $\theta$ is not finite or has $\|\theta\| >$
    ``threshold`` is frozen at its last admissible value, and ``div_step`` (``-1`` while alive)
    records the first such step $t + 1$."""

    def step(carry, t):
        theta, div_step = carry
        new = system.parameter_map(t, theta, system.noise_at(k_p, t, theta))
        # NaN and inf fail `<=`, so this one comparison also catches non-finite values.
        frozen = (div_step >= 0) | ~(jnp.sqrt(_sq_norm(new)) <= threshold)
        theta = jax.tree.map(lambda old, nw: jnp.where(frozen, old, nw), theta, new)
        div_step = jnp.where((div_step < 0) & frozen, t + 1, div_step)
        return theta, div_step

    return step


def _path(
    system: LearningSystem,
    theta0: PyTree[Array],
    key: PRNGKeyArray,
    threshold: Array,
    p: Array,
    *,
    n_steps: int,
    save_every: int,
    keep_theta: bool,
) -> dict:
    r"""One path: $\theta^0 \to \theta^T$ with divergence freezing, recorded every ``save_every``.

    A nested scan (outer over saved blocks, inner over the ``save_every`` steps of a block)
    records only the saved steps; no per-step output is materialised.
    """
    k_p = jax.random.fold_in(key, p)
    theta_star = system.objective.minimizer()
    guarded = guarded_step(system, k_p, threshold)
    step = lambda carry, t: (guarded(carry, t), None)

    def advance(carry, start, length):
        return jax.lax.scan(step, carry, start + jnp.arange(length))[0]

    def record(theta):
        out = {"loss": system.objective.loss(theta)}
        if theta_star is not None:
            diff = jax.tree.map(jnp.subtract, theta, theta_star)
            out["energy"] = _sq_norm(diff)
        if keep_theta:
            out["theta"] = theta
        return out

    def block(carry, start):
        carry = advance(carry, start, save_every)
        return carry, record(carry[0])

    n_blocks, remainder = divmod(n_steps, save_every)
    carry = (theta0, jnp.full((), -1, dtype=int))
    records = [jax.tree.map(lambda x: x[None], record(theta0))]
    carry, saved = jax.lax.scan(block, carry, jnp.arange(n_blocks) * save_every)
    records.append(saved)
    if remainder:
        carry = advance(carry, n_blocks * save_every, remainder)
        records.append(jax.tree.map(lambda x: x[None], record(carry[0])))
    out = jax.tree.map(lambda *xs: jnp.concatenate(xs), *records)
    out["final_theta"], out["divergence_step"] = carry
    return out


@eqx.filter_jit
def _run_chunk(system, theta0, key, threshold, ids, n_steps, save_every, keep_theta):
    path = lambda p: _path(
        system,
        theta0,
        key,
        threshold,
        p,
        n_steps=n_steps,
        save_every=save_every,
        keep_theta=keep_theta,
    )
    return eqx.filter_vmap(path)(ids)


def saved_steps(n_steps: int, save_every: int) -> np.ndarray:
    """The saved steps $0, s, 2s, \\dots$ and ``n_steps`` (always included)."""
    steps = list(range(0, n_steps + 1, save_every))
    if steps[-1] != n_steps:
        steps.append(n_steps)
    return np.asarray(steps)


def default_chunk_size(n_paths: int, n_params: int, n_saved: int, itemsize: int, keep: bool) -> int:
    r"""The default chunk: all paths if their working set fits ``CHUNK_BUDGET_BYTES`` (1 GiB),
    else the fewest (nearly) equal chunks that each fit (one path per chunk at the least).

    A path's working set is estimated as
    ``itemsize * (2 * n_saved * (n_params if keep else 0) + 4 * n_saved + 8 * n_params)``:
    the saved outputs (counted twice: scan buffers and their concatenation; energy and loss),
    and eight parameter-sized buffers for one step ($\theta$, $u$, $G$, the candidate, RNG bits).
    Memory the objective needs internally (e.g. activations over a data set) is not counted:
    pass ``chunk_size`` for such models.
    """
    per_path = itemsize * (
        2 * n_saved * (n_params if keep else 0) + 4 * n_saved + _STEP_BUFFERS * n_params
    )
    largest = max(1, CHUNK_BUDGET_BYTES // per_path)
    return math.ceil(n_paths / math.ceil(n_paths / largest))  # balanced: no chunk > largest


def _check_key(key) -> None:
    ok = isinstance(key, jax.Array) and (
        jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.shape == (2,) and key.dtype == jnp.uint32)
    )
    if not ok:
        raise TypeError(
            f"`key` must be a JAX PRNG key, got {key!r}; use `key=jax.random.key(seed)`."
        )


def check_start(theta0: PyTree[ArrayLike], divergence_threshold: ScalarLike) -> PyTree[Array]:
    """``theta0`` as arrays, checked (before anything compiles) to be floating point, finite,
    inside the divergence threshold, and that threshold to be below overflow of $\\|\theta\\|^2$.
    """
    theta0 = jax.tree.map(jnp.asarray, theta0)
    leaves = jax.tree.leaves(theta0)
    if not leaves or not all(jnp.issubdtype(a.dtype, jnp.inexact) for a in leaves):
        raise TypeError(
            f"`theta0` must hold floating-point arrays, got {_describe(theta0)}; "
            "e.g. `jnp.asarray(theta0, dtype=float)`."
        )
    largest = math.sqrt(float(jnp.finfo(jnp.result_type(*leaves)).max))
    if not float(divergence_threshold) < largest:
        raise ValueError(
            f"`divergence_threshold`={float(divergence_threshold):g} is not below "
            f"sqrt(max float) = {largest:.3g} for theta0's dtype: ||theta||^2 would overflow "
            "before the threshold is reached. Use a smaller threshold (the default is 1e8)."
        )
    norm0 = float(jnp.sqrt(_sq_norm(theta0)))
    if not norm0 <= divergence_threshold:
        raise ValueError(
            f"`theta0` has norm {norm0:.6g}, not finite or above `divergence_threshold`="
            f"{float(divergence_threshold):g}: every path would diverge at step 0. Start from a "
            "finite theta0 or raise the threshold."
        )
    return theta0


def run_chunked(run, n_paths: int, chunk_size: int, progress: bool | None, desc: str):
    r"""``run(ids)`` over all paths, ``chunk_size`` at a time, concatenated on the path axis.

    ``ids`` are global path indices. A compiled chunk holds at least two paths per device:
    XLA:CPU evaluates a one-row matrix product with a fused matrix-vector kernel that rounds
    differently from the matrix-matrix one, which would break bit-for-bit equality across chunk
    sizes; so every chunk is padded to a multiple of twice the device count (one program serves
    all chunks) and the padding is discarded. With several devices the path axis is sharded over
    a 1-D mesh. ``progress=None``: a tqdm bar only on a terminal and with several chunks.
    """
    chunk_size = min(chunk_size, n_paths)
    devices = jax.local_devices()
    width = 2 * len(devices)
    padded = math.ceil(chunk_size / width) * width
    sharding = None
    if len(devices) > 1:
        mesh = jax.sharding.Mesh(np.asarray(devices), ("path",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("path"))
    n_chunks = math.ceil(n_paths / chunk_size)
    if progress is None:
        progress = n_chunks > 1 and getattr(sys.stderr, "isatty", lambda: False)()
    chunks = []
    starts = range(0, n_paths, chunk_size)
    for start in tqdm(starts, total=n_chunks, disable=not progress, desc=desc):
        ids = jnp.arange(start, start + padded)  # global path indices; the tail is padding
        if sharding is not None:
            ids = jax.device_put(ids, sharding)
        out = run(ids)
        valid = min(chunk_size, n_paths - start)
        chunks.append(jax.tree.map(lambda x: x[:valid], out) if valid < padded else out)
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *chunks) if n_chunks > 1 else chunks[0]


def _check_step(system: LearningSystem, theta0: PyTree[Array], key: PRNGKeyArray) -> None:
    """One step, abstractly (``eval_shape``: traced, not compiled), must keep ``theta0``'s shape."""
    fix = (
        "give `theta0` the structure, shapes and dtype the objective expects (for a network: "
        "`lspsde.parameters(network)`; for a d-dimensional quadratic: shape (d,))."
    )
    one_step = lambda s, th, k: s.parameter_map(0, th, s.noise_at(k, 0, th))
    try:
        out = eqx.filter_eval_shape(one_step, system, theta0, key)
    except Exception as err:
        raise ValueError(
            f"One update step (noise.sample, noise.gradient, update) fails at `theta0` "
            f"{_describe(theta0)}: {err}\nIf `theta0` is at fault, {fix}"
        ) from err
    want = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), theta0)
    if jax.tree.structure(out) != jax.tree.structure(want) or any(
        (a.shape, a.dtype) != (b.shape, b.dtype)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want), strict=True)
    ):
        raise ValueError(
            f"One update step maps `theta0` {_describe(theta0)} to {_describe(out)}; "
            f"the scan needs them equal: {fix}"
        )


def _describe(tree: PyTree) -> str:
    return str(jax.tree.map(lambda a: f"{a.dtype}{list(a.shape)}", tree))


def simulate(
    objective: AbstractObjective,
    update: AbstractParameterFlow,
    noise: AbstractNoise,
    theta0: PyTree[ArrayLike],
    *,
    key: PRNGKeyArray,
    n_paths: int,
    n_steps: int,
    save_every: int = 1,
    chunk_size: int | None = None,
    divergence_threshold: ScalarLike = 1e8,
    save: str = "trajectory",
    progress: bool | None = None,
) -> Ensemble:
    r"""Simulate ``n_paths`` independent paths of the stochastic parameter flow (eq. 5.1)

    $$\theta^{t+1} = \mathcal{A}_t\big(\theta^t, G(\theta^t, u^t)\big), \qquad
    u^t \sim \text{noise}(\theta^t), \qquad t = 0, \dots, T-1,$$

    from the same $\theta^0$, with $u^t$ of path $p$ drawn from
    ``fold_in(fold_in(key, p), t)``: a path depends only on ``(key, p)``, never on the chunking
    or the number of devices (bit for bit).

    **Arguments:**

    - `objective`, `update`, `noise`: the learning system ($\mathcal{L}$, the update rule
      $\mathcal{A}_t$, the noise model). Their array fields (step sizes, noise levels) are traced:
      calling again with other values reuses the compiled program.
    - `theta0`: $\theta^0$, a pytree of inexact arrays, shared by all paths.
    - `key`: a JAX PRNG key.
    - `n_paths`, `n_steps`: the ensemble size and the horizon $T$.
    - `save_every`: record at steps $0, s, 2s, \dots$ and $T$.
    - `chunk_size`: paths per compiled call. Default: all paths if their estimated working set
      fits in ``CHUNK_BUDGET_BYTES`` (1 GiB), else the fewest equal chunks that fit (see
      [`default_chunk_size`][]). The last chunk is padded, so one program serves all chunks.
    - `divergence_threshold`: a path diverges at the first $t$ with $\theta^t$ not finite or
      $\|\theta^t\| >$ threshold (Euclidean norm over all leaves); it is then frozen. Must lie
      in $(0, \sqrt{\text{max float}})$ so that $\|\theta\|^2$ cannot overflow below it.
    - `save`: ``"trajectory"`` keeps $\theta$ at the saved steps; ``"summary"`` keeps only
      energy, loss, status and $\theta^T$ (memory independent of $T \cdot d$ up to the small
      per-step energy and loss).
    - `progress`: show a tqdm bar over chunks; default: only if stderr is a terminal and there
      is more than one chunk.

    With several local devices the path axis of each chunk is sharded over a 1-D mesh of them
    (the chunk is padded to a multiple of the device count).

    **Returns:** an [`Ensemble`][lspsde.simulate.Ensemble].

    **Raises:** ``TypeError``/``ValueError`` before anything is compiled for: wrong object
    types, non-positive or non-integer counts, ``save_every > n_steps``, an unknown ``save``,
    ``divergence_threshold <= 0``, a ``theta0`` that one update step does not map to its own
    shape and dtype (checked with ``eval_shape``), a non-finite ``theta0`` or one beyond the
    threshold, or a noise model whose ``check(objective, theta0)`` fails.
    """
    system = LearningSystem(objective, update, noise)  # checks the three types
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
    if save not in SAVE_MODES:
        raise ValueError(f"Unknown `save`={save!r}; choose one of {SAVE_MODES}.")
    check_positive(
        "divergence_threshold",
        divergence_threshold,
        fix="It bounds ||theta||; use e.g. 1e8 (the default).",
    )
    _check_key(key)
    theta0 = check_start(theta0, divergence_threshold)
    itemsize = max(a.dtype.itemsize for a in jax.tree.leaves(theta0))
    update.check(objective, noise, theta0)  # e.g. a continuous-time limit's solver and dt
    _check_step(system, theta0, key)
    check = getattr(noise, "check", None)  # the noise model's own checks (e.g. it needs theta*)
    if callable(check):
        check(objective, theta0)

    keep_theta = save == "trajectory"
    steps = saved_steps(n_steps, save_every)
    n_params = sum(a.size for a in jax.tree.leaves(theta0))
    if chunk_size is None:
        chunk_size = default_chunk_size(n_paths, n_params, len(steps), itemsize, keep_theta)
    chunk_size = min(chunk_size, n_paths)
    threshold = jnp.asarray(divergence_threshold, dtype=float)
    run = lambda ids: _run_chunk(
        system, theta0, key, threshold, ids, n_steps, save_every, keep_theta
    )
    out = run_chunked(run, n_paths, chunk_size, progress, "simulate")

    div_step = out["divergence_step"]
    return Ensemble(
        theta=out.get("theta"),
        final_theta=out["final_theta"],
        energy=out.get("energy"),
        loss=out["loss"],
        diverged=div_step >= 0,
        divergence_step=div_step,
        steps=jnp.asarray(steps),
        n_steps=n_steps,
        save_every=save_every,
        save=save,
        divergence_threshold=float(divergence_threshold),
        chunk_size=chunk_size,
    )
