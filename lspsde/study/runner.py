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
"""

import dataclasses
import datetime
import hashlib
import json
import os
from pathlib import Path
import sys
import time
import uuid
import zlib

import h5netcdf
import jax
import matplotlib
import numpy as np
import xarray as xr

from .. import __version__
from . import Check, Experiment, registry
from .schema import StudyConfig, load_study

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


def run_study(
    study: "str | Path | StudyConfig",
    out: str | Path,
    *,
    progress: bool | None = None,
    force: bool = False,
) -> StudyResult:
    """Run every experiment of a study and write ``results.nc``, figures and ``report.md``.

    **Arguments:**

    - `study`: a study file path or a parsed ``StudyConfig``.
    - `out`: output directory (created).
    - `progress`: show progress bars (default: when stderr is a terminal).
    - `force`: recompute experiments even when a finished part with the same configuration exists.

    **Raises:** ``StudyOutputError``, before any experiment runs, when ``out`` (or its
    ``parts/``) is a file or cannot be written, or another live run holds its lock. A damaged
    part is recomputed and a figure that cannot be drawn is named in the report (see the module
    docstring): neither raises.
    """
    config = load_study(study) if not isinstance(study, StudyConfig) else study
    # Studies compare measurements with bounds to ~1e-8: they run in float64, and leave the
    # caller's precision as it was.
    with jax.enable_x64(True):
        return _run_study(config, Path(out), progress, force)


def experiment_key(key, name: str):
    """The PRNG key of the experiment table ``[name]``: folded in from its name, so that its
    numbers do not depend on which other tables the study file holds, or in what order."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


class StudyOutputError(RuntimeError):
    """The output directory cannot be used: not a directory, not writable, or in use by another
    run. Raised before any experiment runs; the CLI reports it in one line (exit code 2)."""


_LOCK = ".lspsde.lock"


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def _acquire_lock(out: Path) -> Path:
    """Create ``out/.lspsde.lock`` holding this pid (O_CREAT | O_EXCL); take over a stale one."""
    lock = out / _LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _lock_pid(lock)
            if pid is not None and _pid_alive(pid):
                raise StudyOutputError(
                    f"The output directory {out} is in use by another lspsde run (pid {pid}); "
                    f"wait for it to finish or choose another --out (if no such run exists, "
                    f"delete {lock})."
                ) from None
            _log(f"taking over the stale lock {lock} (pid {pid} is not running)")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return lock
    raise StudyOutputError(f"Could not take the lock {lock}: another run keeps taking it.")


def _lock_pid(lock: Path) -> int | None:
    """The pid in a lock file (waiting up to 1 s for a run that has just created it to write
    its pid); ``None`` for a lock that holds none."""
    for _ in range(10):
        try:
            return int(lock.read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.1)
    return None


def _release_lock(lock: Path) -> None:
    try:
        if lock.read_text().strip() == str(os.getpid()):
            lock.unlink()
    except OSError:
        pass


def _checksum(ds: xr.Dataset, config_hash: str) -> str:
    """sha256 of the configuration hash and every variable's (and coordinate's) name, shape and
    values, as read back from the file."""
    h = hashlib.sha256(config_hash.encode())
    for name in sorted(map(str, ds.variables)):
        a = np.asarray(ds[name].values)
        h.update(f"{name}{a.shape}".encode())
        if a.dtype.kind in "OUS":  # strings: read back as objects, written as unicode
            h.update("\x00".join(map(str, a.ravel())).encode())
        else:
            h.update(a.dtype.str.encode() + np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _write_part(ds: xr.Dataset, part: Path, config_hash: str) -> None:
    """Write a part with its checksum, computed from what the file reads back as."""

    def write(tmp: Path) -> None:
        ds.to_netcdf(tmp, engine="h5netcdf")
        with xr.open_dataset(tmp, engine="h5netcdf") as back:
            checksum = _checksum(back.load(), config_hash)
        with h5netcdf.File(tmp, "a") as f:
            f.attrs["checksum"] = checksum

    _atomic_write(part, write)


def _load_part(part: Path, config_hash: str) -> tuple[xr.Dataset | None, str]:
    """The finished part, or ``None`` and why it cannot be used (empty when it is simply for
    another configuration)."""
    try:
        with xr.open_dataset(part, engine="h5netcdf") as f:
            ds = f.load()
    except Exception as e:  # any unreadable file is recomputed, not a traceback
        return None, f"unreadable ({_why(e)})"
    if ds.attrs.get("config_hash") != config_hash:
        return None, ""
    stored = ds.attrs.pop("checksum", None)
    if stored is None:
        return None, "has no checksum"
    if stored != _checksum(ds, config_hash):
        return None, "checksum mismatch: its data changed or are damaged"
    return ds, ""


def _run_study(config: StudyConfig, out: Path, progress: bool | None, force: bool) -> StudyResult:
    _prepare_out(out)
    lock = _acquire_lock(out)
    try:
        return _run_locked(config, out, progress, force)
    finally:
        _release_lock(lock)


def _run_locked(config: StudyConfig, out: Path, progress: bool | None, force: bool):
    for stale in [*out.glob("*.tmp"), *(out / "parts").glob("*.tmp")]:
        stale.unlink(missing_ok=True)  # under the lock: left by a run that was killed
    if progress is None:
        progress = sys.stderr.isatty()
    registry = _registry()
    key = jax.random.key(config.study.seed)
    datasets: dict[str, xr.Dataset] = {}
    for name, cfg in config.experiments().items():
        exp = registry[name]
        part = out / "parts" / f"{name}.nc"
        h = _config_hash(name, cfg, config.study.seed)
        if part.exists() and not force:
            ds, why = _load_part(part, h)
            if ds is not None:
                datasets[name] = ds
                _log(f"[{name}] loaded finished part {part}")
                continue
            if why:
                _log(f"[{name}] not using {part}: {why}; recomputing it")
        _log(f"[{name}] running")
        ds = exp.run(cfg, experiment_key(key, name), progress)
        ds.attrs.update(config_hash=h, config=json.dumps(cfg.model_dump()))
        _write_part(ds, part, h)  # a part on disk is always complete and checked
        datasets[name] = ds

    tree = xr.DataTree.from_dict({f"/{n}": ds for n, ds in datasets.items()})
    tree.attrs.update(
        study=config.study.name,
        description=config.study.description,
        seed=config.study.seed,
        lspsde_version=__version__,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        papers=(
            "Katende (2025) Analytic and Variational Stability in Deep Learning Systems; "
            "Luo et al. (2025) Optimization-Induced Dynamics of Lipschitz Continuity"
        ),
    )
    files = []
    results = out / "results.nc"
    _atomic_write(results, lambda tmp: tree.to_netcdf(tmp, engine="h5netcdf"))
    files.append(results)

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
    _atomic_write(report, lambda tmp: tmp.write_text(_report(config, sections)))
    files.append(report)
    return StudyResult(tree, checks, out, files)


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


def _why(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _cell(value) -> str:
    """A Markdown table cell: ``|`` (as in ``|x|``) escaped so it does not split the row."""
    return str(value).replace("|", "\\|")


def _fmt_holds(h: bool | None) -> str:
    return "n/a" if h is None else ("yes" if h else "**NO**")


def _report(config: StudyConfig, sections) -> str:
    lines = [f"# Study: {config.study.name}", ""]
    if config.study.description:
        lines += [config.study.description, ""]
    lines += [
        f"lspsde {__version__}, seed {config.study.seed}. Data: `results.nc` "
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
    print(msg, file=sys.stderr, flush=True)
