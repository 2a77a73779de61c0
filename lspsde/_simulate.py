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

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree
import numpy as np

from ._custom_types import ScalarLike
from ._ensemble import (
    CHUNK_BUDGET_BYTES,
    MemoryPlan,
    as_system,
    check_key,
    check_run,
    check_start,
    check_step,
    grid_point,
    guarded_step,
    named_leaves,
    run_ensemble,
    saved_steps,
    sq_norm,
    state_size,
    tick_every,
)
from .noise import AbstractNoise
from .objectives import AbstractObjective
from .parameter import AbstractParameterFlow
from .sweep import Sweep

__all__ = [
    "CHUNK_BUDGET_BYTES",
    "Ensemble",
    "MeanEstimate",
    "masked_mean",
    "memory_plan",
    "saved_steps",
    "simulate",
]

SAVE_MODES = ("trajectory", "summary")
# (objective, update, noise); the update or the noise may be a Sweep
SystemTuple = tuple[AbstractObjective, AbstractParameterFlow | Sweep, AbstractNoise | Sweep]
# Parameter-sized buffers a step needs besides the outputs (theta, u, G, the candidate, the
# frozen copy, RNG bits, ...): a deliberately generous count.
_STEP_BUFFERS = 8


class MeanEstimate(NamedTuple):
    """A Monte Carlo mean over the paths alive at each saved step."""

    mean: Float[Array, "*grid step"]
    """Mean over the paths that have not diverged by that step (NaN where none is left)."""
    sem: Float[Array, "*grid step"]
    """Standard error of the mean, ``std(ddof=1) / sqrt(n_alive)`` (NaN where n_alive < 2)."""
    diverged_fraction: Float[Array, "*grid step"]
    """Fraction of all paths that have diverged by that step."""


class Ensemble(eqx.Module):
    r"""The result of [`simulate`][lspsde.simulate.simulate]: ``n_paths`` paths of $\theta^t$.

    Every array has the path axis first, after the grid axis of a sweep (``*grid``: absent
    without a [`Sweep`][lspsde.Sweep], one axis of length ``len(grid)`` with one); "step"
    indexes the saved steps ``steps`` ($0, s, 2s, \dots$ and always ``n_steps``; $s$ =
    ``save_every``).

    **Fields:**

    - `theta`: $\theta^t$ at the saved steps, dims ``(*grid, path, step, ...)`` per leaf;
      ``None`` when ``save="summary"``.
    - `final_theta`: $\theta^T$, dims ``(*grid, path, ...)`` per leaf.
    - `energy`: $\|\theta^t - \theta^*\|^2$ at the saved steps, ``(*grid, path, step)``;
      ``None`` when the objective does not know $\theta^*$.
    - `loss`: $\mathcal{L}(\theta^t)$ at the saved steps, ``(*grid, path, step)``.
    - `diverged`: whether the path diverged, ``(*grid, path)``.
    - `divergence_step`: the first $t$ at which $\theta^t$ was not finite or exceeded the
      threshold (the path holds $\theta^{t-1}$ from then on), ``-1`` if none.
    - `steps`: the saved steps, ``(step,)``.
    - `grid`: the sweep's coordinate values, ``None`` without a sweep; `grid_name` its name.
    - static metadata: `n_steps`, `save_every`, `save`, `divergence_threshold`, `chunk_size`.
    """

    theta: PyTree[Float[Array, "..."]] | None
    final_theta: PyTree[Float[Array, "..."]]
    energy: Float[Array, "*grid path step"] | None
    loss: Float[Array, "*grid path step"]
    diverged: Bool[Array, "*grid path"]
    divergence_step: Int[Array, "*grid path"]
    steps: Int[Array, " step"]
    grid: Array | None
    n_steps: int = eqx.field(static=True)
    save_every: int = eqx.field(static=True)
    save: str = eqx.field(static=True)
    divergence_threshold: float = eqx.field(static=True)
    chunk_size: int = eqx.field(static=True)
    grid_name: str | None = eqx.field(static=True, default=None)

    @property
    def n_paths(self) -> int:
        return self.diverged.shape[-1]

    def at(self, g: int) -> "Ensemble":
        """The ensemble of grid point ``g`` of a sweep: what a plain ``simulate`` call with the
        ``g``-th module returns (bit for bit with the default ``Sweep(batch_size=None)``)."""
        return grid_point(self, g, "ensemble")

    def alive(self) -> Bool[Array, "*grid path step"]:
        """Whether each path is still alive (not diverged) at each saved step."""
        d = self.divergence_step[..., None]
        steps = jnp.reshape(self.steps, (1,) * (d.ndim - 1) + (-1,))
        return (d < 0) | (d > steps)

    def _mean(self, values: Float[Array, "*grid path step"]) -> MeanEstimate:
        alive = self.alive()
        mean, sem = masked_mean(values, alive)
        return MeanEstimate(mean, sem, 1.0 - jnp.sum(alive, axis=-2) / self.n_paths)

    def mean_energy(self) -> MeanEstimate:
        r"""$\mathbb{E}\|\theta^t - \theta^*\|^2$ over the paths alive at each saved step, its
        standard error and the diverged fraction (frozen paths never enter the mean); dims
        ``(*grid, step)``."""
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
        ``(path, [grid,] step, <leaf>_dim_i)``; only with ``save="trajectory"``), ``/final``
        ($\theta^T$ as ``final_theta...``), ``/energy``, ``/loss`` (dims ``(path, [grid,]
        step)``) and ``/status`` (``diverged``, ``divergence_step``). A sweep's grid is the
        dimension ``grid_name``, labelled with its values; ``step`` is labelled with the step
        numbers; every variable has CF ``long_name`` and ``units``; the run's configuration,
        updated with ``attrs``, is in the root's attributes.
        """
        import arviz_base

        grid = [] if self.grid_name is None else [self.grid_name]
        # ArviZ puts the sample dim first: (path, grid, ...).
        first = (lambda v: np.moveaxis(v, 0, 1)) if grid else (lambda v: v)
        data: dict[str, dict[str, np.ndarray]] = {}
        dims: dict[str, list[str]] = {}
        if self.theta is not None:
            data["trajectory"] = {k: first(v) for k, v in named_leaves(self.theta, "theta").items()}
            for name, v in data["trajectory"].items():
                dims[name] = [
                    *grid,
                    "step",
                    *(f"{name}_dim_{i}" for i in range(v.ndim - 2 - len(grid))),
                ]
        data["final"] = {
            k: first(v) for k, v in named_leaves(self.final_theta, "final_theta").items()
        }
        for name, v in data["final"].items():
            base = name.removeprefix("final_")
            dims[name] = [*grid, *(f"{base}_dim_{i}" for i in range(v.ndim - 1 - len(grid)))]
        if self.energy is not None:
            data["energy"] = {"energy": first(np.asarray(self.energy))}
        data["loss"] = {"loss": first(np.asarray(self.loss))}
        data["status"] = {
            "diverged": first(np.asarray(self.diverged)),
            "divergence_step": first(np.asarray(self.divergence_step)),
        }
        dims.update(energy=[*grid, "step"], loss=[*grid, "step"])
        dims.update(diverged=grid, divergence_step=grid)
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
        coords = {"step": np.asarray(self.steps)}
        if grid:
            coords[self.grid_name] = np.asarray(self.grid)
        tree = arviz_base.from_dict(
            data, sample_dims=["path"], dims=dims, coords=coords, attrs={"/": config}
        )
        return add_cf_attrs(tree, ENSEMBLE_CF)


ENSEMBLE_CF = {  # CF (long_name, units) of the variables of `Ensemble.to_datatree`
    "theta": ("parameters theta^t at the saved steps", "1"),
    "final_theta": ("final parameters theta^T", "1"),
    "energy": ("squared distance to the minimiser ||theta^t - theta*||^2", "1"),
    "loss": ("objective L(theta^t)", "1"),
    "diverged": ("whether the path diverged", "1"),
    "divergence_step": (
        "first step with theta not finite or beyond the threshold (-1: none)",
        "step",
    ),
    "step": ("training step t", "step"),
    "path": ("Monte Carlo path index", "1"),
}


def flag_attrs(name: str, meanings: tuple[str, str] | None = None) -> dict[str, Any]:
    """CF flag attributes of a boolean variable ``name``: ``flag_values = [0, 1]`` (netCDF
    stores booleans as bytes) and ``flag_meanings``, two words for false and true (default
    ``"not_<name> <name>"``)."""
    false, true = meanings or (f"not_{name}", name)
    for word in (false, true):
        if not word or any(c.isspace() for c in word):
            raise ValueError(
                f"CF flag meanings are single words (use underscores); got {word!r} for {name!r}."
            )
    return {"flag_values": np.array([0, 1], dtype=np.int8), "flag_meanings": f"{false} {true}"}


def add_cf_attrs(tree, table: dict[str, tuple[str, str]]):
    """Set CF ``long_name``/``units`` on every variable and coordinate of ``tree`` whose name
    (or, for pytree leaves such as ``theta_w``, whose name's prefix) is in ``table``; others
    get their own name as ``long_name`` and ``units = "1"``, so that nothing is left bare.
    Booleans also get CF ``flag_values``/``flag_meanings`` ([`flag_attrs`][])."""
    for node in tree.subtree:
        for name in list(node.ds.variables):
            key = next(
                (k for k in sorted(table, key=len, reverse=True) if str(name).startswith(k)), None
            )
            long_name, units = table.get(key, (str(name), "1"))
            var = node[name] if name in node.data_vars else node.coords[name]
            var.attrs.setdefault("long_name", long_name)
            var.attrs.setdefault("units", units)
            if var.dtype == bool and "flag_meanings" not in var.attrs:
                var.attrs.update(flag_attrs(str(name)))
    return tree


def masked_mean(
    values: Float[ArrayLike, "*grid path step"], mask: Bool[ArrayLike, "*grid path step"]
) -> tuple[Float[Array, "*grid step"], Float[Array, "*grid step"]]:
    r"""Mean over the paths (axis ``-2``) where ``mask`` holds, per step, and its standard error
    ``std(ddof=1) / sqrt(n)``; NaN where fewer than one (mean) or two (error) paths count.
    Masked-out values never enter, so a NaN on a diverged path cannot poison the statistic."""
    values, mask = jnp.asarray(values), jnp.asarray(mask)
    n = jnp.sum(mask, axis=-2)
    mean = jnp.sum(jnp.where(mask, values, 0.0), axis=-2) / jnp.where(n > 0, n, np.nan)
    dev = jnp.where(mask, values - mean[..., None, :], 0.0)
    var = jnp.sum(dev * dev, axis=-2) / jnp.where(n > 1, n - 1, np.nan)
    return mean, jnp.sqrt(var / n)


def simulate_path(system, theta0, key, threshold, n_steps, save_every, keep_theta, p) -> dict:
    r"""One path: $\theta^0 \to \theta^T$ with divergence freezing, recorded every ``save_every``.

    A nested scan (outer over saved blocks, inner over the ``save_every`` steps of a block)
    records only the saved steps; no per-step output is materialised.
    """
    k_p = jax.random.fold_in(key, p)
    theta_star = system.objective.minimizer()
    guarded = guarded_step(system, k_p, threshold, tick_every(n_steps))  # reports progress
    step = lambda carry, t: (guarded(carry, t), None)

    def advance(carry, start, length):
        return jax.lax.scan(step, carry, start + jnp.arange(length))[0]

    def record(theta):
        out = {"loss": system.objective.loss(theta)}
        if theta_star is not None:
            out["energy"] = sq_norm(jax.tree.map(jnp.subtract, theta, theta_star))
        if keep_theta:
            out["theta"] = theta
        return out

    def block(carry, start):
        carry = advance(carry, start, save_every)
        return carry, record(system.params(carry[0]))

    n_blocks, remainder = divmod(n_steps, save_every)
    carry = (system.init_state(theta0), jnp.full((), -1, dtype=int))
    records = [jax.tree.map(lambda x: x[None], record(theta0))]
    carry, saved = jax.lax.scan(block, carry, jnp.arange(n_blocks) * save_every)
    records.append(saved)
    if remainder:
        carry = advance(carry, n_blocks * save_every, remainder)
        records.append(jax.tree.map(lambda x: x[None], record(system.params(carry[0]))))
    out = jax.tree.map(lambda *xs: jnp.concatenate(xs), *records)
    out["final_theta"], out["divergence_step"] = system.params(carry[0]), carry[1]
    return out


def memory_plan(
    n_params: int,
    n_saved: int,
    itemsize: int,
    keep: bool,
    grid: int = 1,
    batch: int = 1,
    n_state: int | None = None,
) -> MemoryPlan:
    r"""The memory of one path of ``simulate``, over ``grid`` grid points run ``batch`` at a
    time.

    Result: ``n_saved`` copies of $\theta$ with ``save="trajectory"``, energy and loss per saved
    step, and $\theta^T$, for every grid point. Working set: the saved outputs counted twice
    (scan buffers and their concatenation) for every grid point, and eight parameter-sized
    buffers for one step ($\theta$, $u$, $G$, the candidate, RNG bits) for the ``batch`` grid
    points that run at once; they are ``n_state`` numbers each (default ``n_params``) when the
    flow carries an optimiser state beside $\theta$. Memory the objective needs internally
    (e.g. activations over a data set) is not counted: pass ``chunk_size`` for such models.
    """
    saved = n_saved * (n_params if keep else 0) + 2 * n_saved
    result = itemsize * (saved + n_params) + 16
    n_state = n_params if n_state is None else n_state
    work = itemsize * (grid * 2 * saved + min(grid, batch) * _STEP_BUFFERS * n_state)
    return MemoryPlan(
        result_per_path=grid * result,
        work_per_path=work,
        what="theta at every saved step" if keep else "energy, loss and final theta",
        fixes=(
            'Keep less: `save="summary"` (no trajectory), a larger `save_every`, fewer '
            "paths or a smaller grid."
            if keep
            else "Simulate fewer paths, fewer saved steps (a larger `save_every`) or a smaller "
            "grid."
        ),
    )


def default_chunk_size(n_paths: int, n_params: int, n_saved: int, itemsize: int, keep: bool) -> int:
    r"""The default chunk of ``simulate``: all paths if their working set
    ([`memory_plan`][]) fits ``CHUNK_BUDGET_BYTES`` (1 GiB), else the fewest (nearly) equal
    chunks that each fit (one path per chunk at the least)."""
    return memory_plan(n_params, n_saved, itemsize, keep).chunk_size(n_paths)


def simulate(
    system: Any,  # LearningSystem | (objective, update, noise): checked by as_system
    theta0: PyTree[ArrayLike],
    *unexpected: object,
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

    - `system`: the learning system, a tuple ``(objective, update, noise)`` ($\mathcal{L}$, the
      update rule $\mathcal{A}_t$, the noise model) or an ``lspsde.LearningSystem``: the one way
      ``simulate``, ``learning_profile`` and ``exponent_distribution`` take a system. Array
      fields (step sizes, noise levels) are traced: calling again with other values reuses the
      compiled program. In the tuple, either `update` or `noise` may be a
      [`Sweep`][lspsde.Sweep]: the grid runs as one compiled program (a ``lax.map`` over the
      grid, ``vmap``-ed ``Sweep.batch_size`` points at a time), every array of the result gains
      a leading grid axis, and path $p$ draws the same noise at every grid point (common random
      numbers).
    - `theta0`: $\theta^0$, a pytree of real floating arrays, shared by all paths.
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
    - `progress`: show a tqdm bar over the steps of every chunk, advanced from inside the
      compiled scan (about 50 host callbacks a run, which do not change the numbers); default:
      only if stderr is a terminal and ``CI`` is not set, and only once a run takes a second
      (``progress=True`` draws it at once).

    With several local devices the path axis of each chunk is sharded over a 1-D mesh of them
    (every chunk is padded to a multiple of twice the device count).

    **Memory.** The result size and the working set of the smallest chunk are computed from
    shapes before anything is traced ([`memory_plan`][]); a request that cannot fit in the
    device's memory (the host's on CPU) raises ``MemoryError`` at once, with the size and the
    fix (``save="summary"``, a larger ``save_every``, fewer paths).

    **Inside ``jax.jit``/``jax.vmap``.** ``simulate`` may be traced (e.g.
    ``jax.vmap(lambda eta: simulate((obj, SGD(eta), noise), ...))``): checks of traced values
    are then skipped (a bad traced value shows up as diverged paths), every other check runs;
    the settings of the run (counts, ``save``, ``divergence_threshold``) must be concrete.
    A [`Sweep`][lspsde.Sweep] is the documented way to run a grid.

    **Returns:** an [`Ensemble`][lspsde.simulate.Ensemble].

    **Raises:** ``MemoryError`` for a result that cannot fit (above);
    ``TypeError``/``ValueError`` before anything is compiled for: wrong object
    types, non-positive or non-integer counts, ``save_every > n_steps``, an unknown ``save``,
    ``divergence_threshold <= 0``, a ``theta0`` that one update step does not map to its own
    shape and dtype (checked with ``eval_shape``), a non-finite ``theta0`` or one beyond the
    threshold, or a noise model whose ``check(objective, theta0)`` fails.
    """
    if unexpected:
        raise TypeError(
            f"`simulate` takes two positional arguments, the system and theta0, got "
            f"{2 + len(unexpected)}. If you passed the objective, update and noise apart: it "
            "takes the learning system first, `simulate((objective, update, noise), theta0, "
            "key=..., n_paths=..., n_steps=...)`; pass everything after theta0 by keyword."
        )
    system, batched, sweep = as_system(system, "simulate")  # checks the three types
    run = check_run(
        n_paths=n_paths,
        n_steps=n_steps,
        save_every=save_every,
        chunk_size=chunk_size,
        divergence_threshold=divergence_threshold,
    )
    if save not in SAVE_MODES:
        raise ValueError(f"Unknown `save`={save!r}; choose one of {SAVE_MODES}.")
    check_key(key)
    theta0 = check_start(theta0, run.divergence_threshold)
    itemsize = max(jnp.result_type(a).itemsize for a in jax.tree.leaves(theta0))
    n_params = sum(a.size for a in jax.tree.leaves(theta0))
    keep_theta = save == "trajectory"
    grid, batch = (1, 1) if sweep is None else (sweep.size, sweep.batch_size or 1)
    n_state = state_size(system, theta0)  # theta and any optimiser state
    plan = memory_plan(n_params, len(run.steps), itemsize, keep_theta, grid, batch, n_state)
    plan.check(run.n_paths)  # from shapes alone: refused before anything is traced
    check_step(system, theta0, key, run.n_steps)
    chunk = run.chunk_size or plan.chunk_size(run.n_paths)
    chunk = min(chunk, run.n_paths)
    threshold = jnp.asarray(run.divergence_threshold, dtype=float)
    out = run_ensemble(
        simulate_path,
        system,
        (theta0, key, threshold, run.n_steps, run.save_every, keep_theta),
        n_paths=run.n_paths,
        chunk_size=chunk,
        sweep=batched,
        progress=progress,
        desc="simulate",
        n_steps=run.n_steps,
    )
    div_step = out["divergence_step"]
    return Ensemble(
        theta=out.get("theta"),
        final_theta=out["final_theta"],
        energy=out.get("energy"),
        loss=out["loss"],
        diverged=div_step >= 0,
        divergence_step=div_step,
        steps=jnp.asarray(run.steps),
        grid=None if sweep is None else sweep.values,
        n_steps=run.n_steps,
        save_every=run.save_every,
        save=save,
        divergence_threshold=run.divergence_threshold,
        chunk_size=chunk,
        grid_name=None if sweep is None else sweep.name,
    )
