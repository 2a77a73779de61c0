"""Run a study: experiments → labelled results (DataTree) → figures → Markdown report.

Each finished experiment is written at once to ``DIR/parts/<experiment>.nc`` together with the
hash of its configuration; a re-run with the same configuration loads it instead of recomputing,
so an interrupted study resumes where it stopped and never loses finished work.

Robustness:

- *Damaged parts are never used.* A part carries a sha256 checksum of its variables' values and
  its configuration hash (attribute ``checksum``). On resume a part that cannot be read
  (truncated, emptied, zeroed), has no checksum, or whose data no longer match it is reported in
  one log line naming the file and why, and recomputed.
- *Writes are atomic and uniquely named.* Every file (parts, ``results.nc``, figures,
  ``report.md``) is written to ``<name>.<pid>.<uuid>.tmp`` beside it and moved into place with
  ``os.replace``: a file on disk is complete or absent, and concurrent writers never share a
  temporary.
- *One run per directory.* A run holds ``DIR/.lspsde.lock`` (created exclusively, holding its
  pid). A second run into the same directory fails at once with ``StudyOutputError`` naming the
  directory and the other pid; a lock left by a process no longer alive is taken over, with a log
  line.
- *Write failures come before computing.* An ``out`` that is a file, or an unwritable ``out`` or
  ``parts/``, raise ``StudyOutputError`` before any experiment runs.
- *A figure never loses a report.* A figure that cannot be drawn (e.g. a log scale with no
  positive data, when every grid point diverged) is logged and named in ``report.md`` with the
  reason; the rest of the report is written.
- *One study per directory.* At the start of a run, ``DIR/study.json`` records which study the
  directory holds (its ``[study]`` name, a hash of the whole study file, the file it came from,
  the size it was run at, and each experiment's configuration hash). A run of a different
  study (another name) into it stops before computing with ``StudyOutputError``
  (``force=True`` replaces it); a changed experiment of the same study is recomputed through
  its own configuration hash. A directory without ``study.json`` (written before it existed)
  is identified by ``results.nc``'s ``study`` attribute.
- *What a study would run.* [`plan_study`][] reads each experiment's grid axes, sizes and (for
  ensembles) memory per grid point from the parsed study, computing nothing
  (``lspsde validate``).
- *Named sizes.* A study parsed at a size (``[EXPERIMENT.sizes.NAME]``, ``lspsde run --size``)
  records it in ``study.json``, the root attributes of ``results.nc`` and the report's header.
  The configuration hash covers the values, so runs of two sizes never share a part.
  [`calibrate`][] times each experiment once (``lspsde validate --calibrate``).
- *Reports without recomputing.* [`rebuild_report`][] rewrites ``report.md`` and the figures
  (and ``results.nc`` when it is missing or out of date) from the finished parts, or from
  ``results.nc``'s groups, and names the experiments that are not finished.
- *Progress.* One bar over the experiments still to compute, with an ETA (on a terminal, not
  under ``CI``), and a log line per finished experiment with its wall time. Ctrl-C raises
  [`StudyInterrupted`][] (a ``KeyboardInterrupt``) whose message says what was kept and that the
  same command resumes.
"""

from collections.abc import Iterable
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
from pathlib import Path
import shutil
import socket
import sys
import tempfile
import time
from typing import Any
import uuid
import zlib

import h5netcdf
import jax
import matplotlib
from tqdm.auto import tqdm
import xarray as xr

from .. import __version__, distributed
from .._checks import check_positive_int
from .._ensemble import padded_size, saved_steps
from .._simulate import memory_plan
from ..distributed import Execution
from . import Check, Experiment, registry
from .config import StudyMeta
from .schema import FULL, StudyConfig, load_study
from .status import (
    LOCK,
    STUDY_FILE,
    PartState,
    StudyOutputError,
    _why,
    checksum,
    holder_alive,
    lock_holder,
    read_study_record,
    resume_command,
    verify_part,
)

__all__ = [
    "ExperimentPlan",
    "PartState",
    "StudyInterrupted",
    "StudyOutputError",
    "StudyResult",
    "calibrate",
    "experiment_key",
    "plan_study",
    "read_study_record",
    "rebuild_report",
    "run_study",
    "study_record",
    "verify_part",
]

matplotlib.use("Agg")


def _registry() -> dict[str, Experiment]:
    """The experiments the runner knows: every study module of ``lspsde.study``."""
    return registry()


def _config_hash(name: str, cfg, seed: int) -> str:
    """What a finished part is: its table, configuration, seed, key stream and code version."""
    payload = json.dumps(
        {
            "name": name,
            "seed": seed,
            "key": "fold_in(key(seed), crc32(name))",
            "version": __version__,
            "cfg": cfg.model_dump(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclasses.dataclass
class StudyResult:
    """What a study run produced: the DataTree, the report rows and the files written."""

    tree: xr.DataTree
    checks: list[Check]
    out: Path
    files: list[Path]
    size: str = FULL


def run_study(
    study: "str | Path | StudyConfig",
    out: str | Path,
    *,
    progress: bool | None = None,
    force: bool = False,
    source: str | Path | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    chunk_size: int | None = None,
    size: str | None = None,
) -> StudyResult:
    """Run every experiment of a study and write ``results.nc``, figures and ``report.md``.

    **Arguments:**

    - `study`: a study file path or a parsed ``StudyConfig`` (which carries the size it was
      parsed at).
    - `out`: output directory (created).
    - `progress`: show progress bars (default: when stderr is a terminal and ``CI`` is not
      set).
    - `force`: recompute experiments even when a finished part with the same configuration
      exists, and run into a directory that holds another study's results.
    - `source`: the study file, recorded in ``study.json`` (default: `study` when it is a path).
    - `workers`, `scheduler`: run the ensembles' pieces on dask.distributed, a new
      ``LocalCluster`` of `workers` processes or the scheduler at `scheduler` (``out`` must
      then be on storage every worker shares); the numbers equal a serial run's to the bit.
    - `chunk_size`: at most this many paths per stored piece (``out/pieces``), so that a
      killed run loses at most one piece per worker (the numbers do not depend on it).
    - `size`: for a study file path, the named size to load it at (``[EXPERIMENT.sizes.NAME]``;
      default ``"full"``, the file as written). For a ``StudyConfig`` it must be ``None`` or
      the size it was parsed at. The size is recorded in ``study.json``, ``results.nc`` and the
      report.

    Every ensemble's chunks are stored as pieces in ``out/pieces/<experiment>/`` while an
    experiment runs (``lspsde.distributed``): a rerun after a crash or SIGKILL loads the
    finished pieces, and its numbers equal an uninterrupted run's to the bit. An experiment's
    pieces are removed once its part is written.

    **Raises:** ``StudyOutputError``, before any experiment runs, when ``out`` (or its
    ``parts/``) is a file or cannot be written, another live run holds its lock, or it holds
    another study's results (without `force`). ``StudyInterrupted`` on Ctrl-C, saying what was
    kept. A damaged part is recomputed and a figure that cannot be drawn is named in the report
    (see the module docstring): neither raises.
    """
    if not isinstance(study, StudyConfig):
        source = study if source is None else source
        study = load_study(study, size=FULL if size is None else size)
    elif size is not None and size != study.size:
        raise ValueError(
            f"run_study(size={size!r}) with a study parsed at size {study.size!r}: parse it at "
            f"that size (load_study(path, size={size!r})) or leave size out."
        )
    source = str(Path(source).resolve()) if source is not None else None
    # Studies compare measurements with bounds to ~1e-8: they run in float64, and leave the
    # caller's precision as it was.
    if chunk_size is not None:
        chunk_size = check_positive_int("chunk_size", chunk_size, fix="Paths per stored piece.")
    with contextlib.ExitStack() as stack, jax.enable_x64(True):
        client = None
        if workers is not None or scheduler is not None:
            client = stack.enter_context(distributed.connect(workers, scheduler))
        run = Execution(None, client, chunk_size)
        return _run_study(study, Path(out), progress, force, source, run)


def calibrate(study: StudyConfig, names: Iterable[str] | None = None) -> dict[str, float]:
    """Run each experiment of `study` named in `names` (default: all) alone, once, in a
    temporary directory (removed), and return its wall time in seconds: everything a run of it
    does, JIT compilation, figures and report included. Nothing is written anywhere else.

    ``lspsde validate --calibrate`` calls it with the study parsed at its ``ci`` size and
    extrapolates linearly in path-steps ([`ExperimentPlan.path_steps`][])."""
    experiments = study.experiments()
    times: dict[str, float] = {}
    for name in experiments if names is None else names:
        if name not in experiments:
            raise ValueError(f"calibrate: the study has no experiment table [{name}].")
        alone = study.model_copy(update={n: None for n in experiments if n != name})
        with tempfile.TemporaryDirectory(prefix="lspsde-calibrate-") as tmp:
            start = time.perf_counter()
            run_study(alone, tmp, progress=False)
            times[name] = time.perf_counter() - start
    return times


def experiment_key(key, name: str):
    """The PRNG key of the experiment table ``[name]``: folded in from its name, so that its
    numbers do not depend on which other tables the study file holds, or in what order."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the message says which experiments were finished and kept, and that
    the same command resumes (finished experiments are loaded, not recomputed)."""


def _tmp_name(path: Path) -> Path:
    """A temporary beside ``path``, unique to this process and call."""
    return path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a unique temporary, then move it onto ``path`` (atomic)."""
    tmp = _tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _prepare_out(out: Path) -> None:
    """Create ``out/parts`` and check that both can be written, before anything is computed."""
    for d in (out, out / "parts"):
        if d.exists() and not d.is_dir():
            raise StudyOutputError(f"The output path {d} is a file, not a directory.")
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = _tmp_name(d / ".write-probe")
            probe.touch(exist_ok=False)
            probe.unlink()
        except OSError as e:
            raise StudyOutputError(
                f"Cannot write to the output directory {d}: {e.strerror or e}."
            ) from None


def _acquire_lock(out: Path) -> Path:
    """Create ``out/.lspsde.lock`` holding this pid (O_CREAT | O_EXCL); take over a stale one."""
    lock = out / LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, host = lock_holder(lock)
            if holder_alive(pid, host):
                where = f" on {host}" if host and host != socket.gethostname() else ""
                raise StudyOutputError(
                    f"The output directory {out} is in use by another lspsde run (pid {pid}"
                    f"{where}); wait for it to finish or choose another --out (if no such run "
                    f"exists, delete {lock})."
                ) from None
            _log(f"taking over the stale lock {lock} (pid {pid} is not running)")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        return lock
    raise StudyOutputError(f"Could not take the lock {lock}: another run keeps taking it.")


def _release_lock(lock: Path) -> None:
    try:
        if lock.read_text().split()[:2] == [str(os.getpid()), socket.gethostname()]:
            lock.unlink()
    except OSError:
        pass


def _write_part(ds: xr.Dataset, part: Path, config_hash: str) -> None:
    """Write a part with its checksum, computed from what the file reads back as."""

    def write(tmp: Path) -> None:
        ds.to_netcdf(tmp, engine="h5netcdf")
        with xr.open_dataset(tmp, engine="h5netcdf") as back:
            digest = checksum(back.load(), config_hash)
        with h5netcdf.File(tmp, "a") as f:
            f.attrs["checksum"] = digest

    _atomic_write(part, write)


# --- which study a directory holds ------------------------------------------------------------


def study_record(config: StudyConfig, source: str | None = None) -> dict[str, Any]:
    """What ``study.json`` says about a run of `config`: the study's name, seed, description,
    the size it was parsed at, a hash of the whole study (every table at that size, and the code
    version), the file it came from, and each experiment's configuration hash (the key of its
    part)."""
    dump = config.model_dump(mode="json", exclude_none=True)
    payload = json.dumps({"config": dump, "version": __version__}, sort_keys=True)
    seed = config.study.seed
    return {
        "format": 1,
        "study": config.study.name,
        "seed": seed,
        "description": config.study.description,
        "size": config.size,
        "study_hash": hashlib.sha256(payload.encode()).hexdigest()[:16],
        "source": source,
        "lspsde_version": __version__,
        "experiments": {
            name: _config_hash(name, cfg, seed) for name, cfg in config.experiments().items()
        },
        "config": dump,
    }


def _results_study(out: Path) -> str | None:
    """The ``study`` attribute of ``DIR/results.nc`` (``None``: no readable file)."""
    try:
        with h5netcdf.File(out / "results.nc", "r") as f:
            name = f.attrs.get("study")
    except Exception:  # absent or unreadable: nothing to protect, it is rewritten
        return None
    return str(name) if name is not None else None


def _check_identity(config: StudyConfig, out: Path, force: bool) -> None:
    """Refuse (before computing) a directory that holds another study's results."""
    try:
        record = read_study_record(out)
    except StudyOutputError:
        if not force:
            raise
        record = None
    held = record["study"] if record else _results_study(out)
    if held is None or held == config.study.name:
        return
    origin = f" (from {record['source']})" if record and record.get("source") else ""
    if not force:
        raise StudyOutputError(
            f"The output directory {out} holds the results of another study, {held!r}{origin}; "
            f"this run is the study {config.study.name!r}. Choose another --out, or pass "
            "--force to replace them."
        )
    _log(
        f"--force: replacing the study {held!r} in {out} (its parts and figures that this "
        "study does not write stay in place)"
    )


# --- what a study would run -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExperimentPlan:
    """What one experiment table asks for, read from its (validated) configuration alone.

    - `grid`: ``{field: number of values}`` for every list-valued field (the grid axes);
    - `sizes`: the integer size fields (``n_*``, ``dim``, ``depth``, ``width``, ``save_every``);
    - `result_bytes`, `work_bytes`: for an ensemble experiment (one with ``n_paths``,
      ``n_steps`` and ``dim``), the memory one grid point needs by ``simulate``'s memory plan
      (float64, ``save="summary"``): its result, and the working set of one chunk of paths;
      ``None`` for other experiments.
    """

    name: str
    grid: dict[str, int]
    sizes: dict[str, int]
    result_bytes: int | None = None
    work_bytes: int | None = None

    @property
    def combinations(self) -> int:
        """The number of combinations of the grid axes' values."""
        return math.prod(self.grid.values())

    @property
    def path_steps(self) -> int | None:
        """Combinations × paths × steps, for an experiment with ``n_paths`` and ``n_steps``."""
        if "n_paths" in self.sizes and "n_steps" in self.sizes:
            return self.combinations * self.sizes["n_paths"] * self.sizes["n_steps"]
        return None


def _is_size(name: str, value: object) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (name.startswith("n_") or name in ("dim", "depth", "width", "save_every"))
    )


def plan_study(config: StudyConfig) -> list[ExperimentPlan]:
    """What each experiment of a parsed (so validated, its noise tables instantiated) study
    would run: grid axes, sizes and, for ensembles, memory per grid point. Computes nothing."""
    plans = []
    for name, cfg in config.experiments().items():
        fields = {k: getattr(cfg, k) for k in type(cfg).model_fields}
        grid = {k: len(v) for k, v in fields.items() if isinstance(v, list | tuple)}
        sizes = {k: v for k, v in fields.items() if _is_size(k, v)}
        result = work = None
        if all(k in sizes for k in ("n_paths", "n_steps", "dim")):
            n_saved = len(saved_steps(sizes["n_steps"], sizes.get("save_every", 1)))
            plan = memory_plan(n_params=sizes["dim"], n_saved=n_saved, itemsize=8, keep=False)
            result = plan.result_per_path * sizes["n_paths"]
            work = plan.work_per_path * padded_size(plan.chunk_size(sizes["n_paths"]))
        plans.append(ExperimentPlan(name, grid, sizes, result, work))
    return plans


# --- the run ------------------------------------------------------------------------------


def _run_study(
    config: StudyConfig,
    out: Path,
    progress: bool | None,
    force: bool,
    source: str | None,
    run: Execution,
) -> StudyResult:
    _prepare_out(out)
    lock = _acquire_lock(out)
    try:
        return _run_locked(config, out, progress, force, source, run)
    finally:
        _release_lock(lock)


def _show_progress() -> bool:
    """Progress bars by default: on a terminal, and not under ``CI``."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return sys.stderr.isatty() and not ci


def _run_locked(
    config: StudyConfig,
    out: Path,
    progress: bool | None,
    force: bool,
    source: str | None,
    run: Execution,
) -> StudyResult:
    for stale in [*out.glob("*.tmp"), *(out / "parts").glob("*.tmp")]:
        stale.unlink(missing_ok=True)  # under the lock: left by a run that was killed
    _check_identity(config, out, force)
    record = study_record(config, source)
    _atomic_write(out / STUDY_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    if progress is None:
        progress = _show_progress()
    registry = _registry()
    key = jax.random.key(config.study.seed)
    experiments = config.experiments()
    datasets: dict[str, xr.Dataset] = {}
    try:
        todo = []
        for name in experiments:
            part = out / "parts" / f"{name}.nc"
            if not force:
                found = verify_part(part, record["experiments"][name])
                if found.state == "done":
                    datasets[name] = found.dataset
                    _log(f"[{name}] loaded finished part {part}")
                    continue
                if found.state == "damaged":
                    _log(f"[{name}] not using {part}: {found.why}; recomputing it")
                elif found.state == "outdated":
                    _log(f"[{name}] its configuration changed since {part} was written; rerunning")
            todo.append(name)
        bar = tqdm(
            total=len(todo),
            desc=f"study {config.study.name}",
            unit="experiment",
            disable=not progress or not todo,
            file=sys.stderr,
        )
        with bar:
            for name in todo:
                bar.set_postfix_str(name)
                cfg, part = experiments[name], out / "parts" / f"{name}.nc"
                _log(f"[{name}] running")
                start = time.perf_counter()
                h = record["experiments"][name]
                pieces = out / "pieces" / name
                if force:
                    shutil.rmtree(pieces, ignore_errors=True)
                with distributed.execution(pieces, client=run.client, chunk_size=run.chunk_size):
                    ds = registry[name].run(cfg, experiment_key(key, name), progress)
                ds.attrs.update(config_hash=h, config=json.dumps(cfg.model_dump()))
                _write_part(ds, part, h)  # a part on disk is always complete and checked
                shutil.rmtree(pieces, ignore_errors=True)  # the part holds everything now
                datasets[name] = ds
                _log(f"[{name}] finished in {_duration(time.perf_counter() - start)}: {part}")
                bar.update()
        datasets = {name: datasets[name] for name in experiments}  # the study's order
        return _write_outputs(config.study, datasets, out, size=config.size)
    except KeyboardInterrupt:
        kept = [n for n in experiments if n in datasets]
        rest = len(experiments) - len(kept)
        what = (
            f"all {len(kept)} experiments are finished and kept in {out / 'parts'}; the same "
            f"command (or `lspsde report {out}`) writes the report"
            if not rest
            else f"{len(kept)} of {len(experiments)} experiments finished and kept in "
            f"{out / 'parts'}{' (' + ', '.join(kept) + ')' if kept else ''}; the same command "
            f"resumes the other {rest}"
        )
        raise StudyInterrupted(f"Interrupted: {what}.") from None


def _duration(seconds: float) -> str:
    """``4.2 s``, ``3 min 05 s``, ``2 h 01 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _write_outputs(
    study: StudyMeta,
    datasets: dict[str, xr.Dataset],
    out: Path,
    *,
    results: bool = True,
    size: str = FULL,
) -> StudyResult:
    """``results.nc`` (unless `results` is false), the figures and ``report.md`` from the
    experiments' datasets, run at the named `size`: nothing here computes an experiment."""
    registry = _registry()
    tree = xr.DataTree.from_dict({f"/{n}": ds for n, ds in datasets.items()})
    tree.attrs.update(
        study=study.name,
        description=study.description,
        seed=study.seed,
        size=size,
        lspsde_version=__version__,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        papers=(
            "Katende (2025) Analytic and Variational Stability in Deep Learning Systems; "
            "Luo et al. (2025) Optimization-Induced Dynamics of Lipschitz Continuity"
        ),
    )
    files = []
    if results:
        path = out / "results.nc"
        _atomic_write(path, lambda tmp: tree.to_netcdf(tmp, engine="h5netcdf"))
        files.append(path)

    checks: list[Check] = []
    sections = []
    for name, ds in datasets.items():
        exp = registry[name]
        rows = exp.checks(ds)
        checks += rows
        fig_names, failed = _save_figures(exp, name, ds, out)
        files += [out / f for f in fig_names]
        sections.append((name, exp.summary(ds), rows, fig_names, failed))
    report = out / "report.md"
    _atomic_write(report, lambda tmp: tmp.write_text(_report(study, sections, size)))
    files.append(report)
    return StudyResult(tree, checks, out, files, size)


# --- a report from what is on disk ----------------------------------------------------------


def _results_groups(out: Path, hashes: dict[str, str]) -> tuple[dict[str, xr.Dataset], bool]:
    """The groups of ``DIR/results.nc`` whose configuration hash is the one in `hashes`, and
    whether the file holds exactly those experiments (``False``: missing, unreadable or from
    another configuration: it is to be rewritten)."""
    try:
        with xr.open_datatree(out / "results.nc", engine="h5netcdf") as tree:
            groups = {n: tree[n].to_dataset().load() for n in tree.children}
    except Exception:  # absent or unreadable: rewritten from the parts
        return {}, False
    found = {n: ds for n, ds in groups.items() if ds.attrs.get("config_hash") == hashes.get(n)}
    return found, set(found) == set(hashes) == set(groups)


def rebuild_report(out: str | Path) -> StudyResult:
    """Rewrite ``report.md`` and the figures of a finished run from what it saved, computing no
    experiment: each experiment's data come from its part when it is intact and for the
    configuration ``study.json`` records, else from its group in ``results.nc`` when that is for
    the same configuration. ``results.nc`` itself is rewritten only when it is missing or does
    not hold exactly the study's experiments.

    **Raises:** ``StudyOutputError`` when `out` is not a run directory (no ``study.json``),
    cannot be written, is in use by a run, or some experiment is not finished (naming each one,
    and that ``lspsde run`` resumes).
    """
    out = Path(out)
    if not out.is_dir():
        raise StudyOutputError(f"No run directory at {out}.")
    record = read_study_record(out)
    if record is None:
        raise StudyOutputError(
            f"{out} has no {STUDY_FILE}, so which study it holds is unknown; rerun "
            f"`lspsde run STUDY.toml --out {out}` (finished parts are loaded, not recomputed)."
        )
    with jax.enable_x64(True):
        _prepare_out(out)
        lock = _acquire_lock(out)
        try:
            hashes: dict[str, str] = record["experiments"]
            unknown = sorted(set(hashes) - set(_registry()))
            if unknown:
                raise StudyOutputError(
                    f"{out} holds experiments this lspsde ({__version__}) does not know: "
                    f"{', '.join(unknown)}; rebuild its report with the version that ran it "
                    f"({record.get('lspsde_version', 'unknown')})."
                )
            from_results, results_current = _results_groups(out, hashes)
            datasets, missing = {}, []
            for name, h in hashes.items():
                found = verify_part(out / "parts" / f"{name}.nc", h)
                if found.state == "done":
                    datasets[name] = found.dataset
                elif name in from_results:
                    datasets[name] = from_results[name]
                else:
                    why = found.why or {"missing": "no part", "outdated": "part is outdated"}.get(
                        found.state, found.state
                    )
                    missing.append(f"{name} ({why})")
            size = str(record.get("size", FULL))
            if missing:
                raise StudyOutputError(
                    f"Cannot rebuild the report of {out}: {len(missing)} of {len(hashes)} "
                    f"experiments are not finished: {'; '.join(missing)}. "
                    f"`{resume_command(record, out)}` resumes them."
                )
            study = StudyMeta(
                name=record["study"],
                seed=int(record.get("seed", 0)),
                description=str(record.get("description", "")),
            )
            return _write_outputs(study, datasets, out, results=not results_current, size=size)
        finally:
            _release_lock(lock)


def _save_figures(exp: Experiment, name: str, ds: xr.Dataset, out: Path):
    """Draw and save an experiment's figures: the file names written, and a line for each
    figure that could not be drawn (a failing figure never stops the report)."""
    import matplotlib.pyplot as plt

    saved, failed = [], []
    try:
        figs = exp.figures(ds)
    except Exception as e:  # reported in report.md, not a crash
        figs, failed = {}, [f"the figures could not be drawn: {_why(e)}"]
    for fname, fig in figs.items():
        path = out / f"{name}_{fname}.png"
        try:
            _atomic_write(
                path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
            )
            saved.append(path.name)
        except Exception as e:
            failed.append(f"figure `{path.name}` could not be drawn: {_why(e)}")
        finally:
            plt.close(fig)
    for line in failed:
        _log(f"[{name}] {line}")
    return saved, failed


def _cell(value) -> str:
    """A Markdown table cell: ``|`` (as in ``|x|``) escaped so it does not split the row."""
    return str(value).replace("|", "\\|")


def _fmt_holds(h: bool | None) -> str:
    return "n/a" if h is None else ("yes" if h else "**NO**")


def _report(study: StudyMeta, sections, size: str = FULL) -> str:
    lines = [f"# Study: {study.name}", ""]
    if study.description:
        lines += [study.description, ""]
    what = (
        "the study file as written"
        if size == FULL
        else f"the study file with its `[EXPERIMENT.sizes.{size}]` tables merged in"
    )
    lines += [
        f"lspsde {__version__}, seed {study.seed}, size: {size} ({what}). Data: `results.nc` "
        "(open with `xarray.open_datatree`).",
        "",
    ]
    for name, summary, rows, figs, failed in sections:
        lines += [f"## {name}", "", summary, ""]
        lines += [
            "| theorem | case | predicted | measured | holds | note |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            cells = (r.theorem, r.case, r.predicted, r.measured, _fmt_holds(r.holds), r.note)
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
        lines += [f"![{f}]({f})" for f in figs]
        lines += [f"*Note: {line.rstrip('.')}.*" for line in failed]
        lines.append("")
    return "\n".join(lines)


def _log(msg: str) -> None:
    """A line on stderr (above any progress bar)."""
    tqdm.write(msg, file=sys.stderr)
    sys.stderr.flush()
