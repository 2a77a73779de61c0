"""Reading a run directory: the parts (and their checksums), the study record ``study.json``,
the lock, and what ``lspsde status`` shows.

The runner ([`lspsde.study.runner`][]) writes what this module reads, and loads a part only
when [`verify_part`][] calls it *done*: ``lspsde status`` shows exactly the verdict a rerun
acts on. Nothing here computes an experiment, writes a file or takes the lock.

(This module imports neither the runner nor the study schema: the study registry imports every
module of ``lspsde.study``, this one included, while the schema is being built.)
"""

import dataclasses
import hashlib
import json
import os
from pathlib import Path
import socket
import time
from typing import Any, Literal

import h5netcdf
import numpy as np
import xarray as xr

__all__ = [
    "LOCK",
    "STUDY_FILE",
    "LockState",
    "PartState",
    "RunStatus",
    "StudyOutputError",
    "checksum",
    "holder_alive",
    "lock_holder",
    "lock_pid",
    "pid_alive",
    "read_study_record",
    "resume_command",
    "run_status",
    "verify_part",
]

LOCK = ".lspsde.lock"
STUDY_FILE = "study.json"


class StudyOutputError(RuntimeError):
    """The output directory cannot be used: not a directory, not writable, in use by another
    run, or holding another study's results; or (``rebuild_report``) it holds no finished
    study. Raised before any experiment runs; the CLI reports it in one line (exit code 2)."""


def _why(e: Exception) -> str:
    """``TypeName: first line of the message``, for one-line reports."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def checksum(ds: xr.Dataset, config_hash: str) -> str:
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


@dataclasses.dataclass(frozen=True)
class PartState:
    """What a part on disk is worth.

    - `path`: the part's file (``DIR/parts/<experiment>.nc``);
    - `state`: ``"done"`` (intact, and for the configuration asked about), ``"missing"``,
      ``"damaged"`` (unreadable, without checksum, or its data no longer match it) or
      ``"outdated"`` (intact, but for another configuration);
    - `why`: for ``"damaged"``, what is wrong with it;
    - `dataset`: for ``"done"``, its data (the checksum attribute removed);
    - `config_hash`: the configuration hash the part records, when it could be read.
    """

    path: Path
    state: Literal["done", "missing", "damaged", "outdated"]
    why: str = ""
    dataset: xr.Dataset | None = dataclasses.field(default=None, repr=False, compare=False)
    config_hash: str | None = None


def verify_part(part: str | Path, config_hash: str | None = None) -> PartState:
    """Read a part and check its checksum: whether it can be used for the configuration hash
    `config_hash` (``None``: for the configuration it records itself).

    The runner loads a part only when this says ``"done"``; ``lspsde status`` shows the same
    verdict. Nothing raises: an unreadable file is ``"damaged"``, with the reason."""
    part = Path(part)
    if not part.exists():
        return PartState(part, "missing")
    try:
        with xr.open_dataset(part, engine="h5netcdf") as f:
            ds = f.load()
    except Exception as e:  # any unreadable file is recomputed, not a traceback
        return PartState(part, "damaged", f"unreadable ({_why(e)})")
    stored_hash = ds.attrs.get("config_hash")
    stored = ds.attrs.pop("checksum", None)
    if not isinstance(stored_hash, str):
        return PartState(part, "damaged", "records no configuration hash")
    if config_hash is not None and stored_hash != config_hash:
        return PartState(part, "outdated", config_hash=stored_hash)
    if stored is None:
        return PartState(part, "damaged", "has no checksum", config_hash=stored_hash)
    if stored != checksum(ds, stored_hash):
        why = "checksum mismatch: its data changed or are damaged"
        return PartState(part, "damaged", why, config_hash=stored_hash)
    return PartState(part, "done", dataset=ds, config_hash=stored_hash)


def read_study_record(out: str | Path) -> dict[str, Any] | None:
    """``DIR/study.json`` as written by a run (``None`` when there is none).

    **Raises:** ``StudyOutputError`` for one that cannot be read or is not a study record."""
    path = Path(out) / STUDY_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StudyOutputError(
            f"Cannot read {path} ({_why(e)}); delete it to reuse {out}."
        ) from None
    if not (
        isinstance(record, dict)
        and isinstance(record.get("study"), str)
        and isinstance(record.get("experiments"), dict)
    ):
        raise StudyOutputError(
            f"{path} is not an lspsde study record (no `study` name or `experiments`); delete "
            f"it to reuse {out}."
        )
    return record


def resume_command(record: dict[str, Any] | None, out: str | Path) -> str:
    """The command that resumes the run `record` (``study.json``) describes in `out`: its study
    file (``STUDY.toml`` when unknown), and ``--size`` when it ran at a named size."""
    record = record or {}
    command = f"lspsde run {record.get('source') or 'STUDY.toml'} --out {out}"
    size = record.get("size", "full")
    return command if size == "full" else f"{command} --size {size}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def lock_holder(lock: Path) -> tuple[int | None, str | None]:
    """``(pid, host)`` in a lock file (``pid host``; waiting up to 1 s for a run that has just
    created it to write them); ``(None, None)`` for a lock that holds none."""
    for _ in range(10):
        try:
            fields = lock.read_text().split()
            return int(fields[0]), (fields[1] if len(fields) > 1 else None)
        except (OSError, ValueError, IndexError):
            time.sleep(0.1)
    return None, None


def lock_pid(lock: Path) -> int | None:
    """The pid in a lock file (see [`lock_holder`][])."""
    return lock_holder(lock)[0]


def holder_alive(pid: int | None, host: str | None) -> bool:
    """Whether the run holding a lock may still be running: its pid is alive here, or it runs
    on another host (a directory on shared storage), where this process cannot tell."""
    if pid is None:
        return False
    if host is not None and host != socket.gethostname():
        return True
    return pid_alive(pid)


# --- what a run directory holds -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LockState:
    """``DIR/.lspsde.lock``: the pid it holds (``None``: unreadable) and whether that process
    is alive (a stale lock is taken over by the next run)."""

    path: Path
    pid: int | None
    alive: bool
    host: str | None = None


@dataclasses.dataclass(frozen=True)
class RunStatus:
    """What a (possibly interrupted) run directory holds.

    - `record`: ``study.json`` (``None``: a directory written before it existed, or none);
    - `parts`: per experiment, the runner's verdict on its part (the experiments of the
      record, or, without one, the parts found, each checked against the configuration it
      records);
    - `lock`: the lock, when one is there;
    - `results`: ``results.nc`` is ``"current"`` (holds exactly the recorded experiments, for
      their configurations), ``"stale"`` (from another configuration or set of experiments),
      ``"present"`` (no record to compare with), ``"unreadable"`` or ``"missing"``;
    - `report`: whether ``report.md`` exists.
    """

    out: Path
    record: dict | None
    parts: dict[str, PartState]
    lock: LockState | None
    results: Literal["current", "stale", "present", "unreadable", "missing"]
    report: bool

    @property
    def size(self) -> str | None:
        """The size the run was at (``study.json``; ``"full"`` for a record written before
        sizes were recorded, which ran the file as written; ``None`` without a record)."""
        return None if self.record is None else str(self.record.get("size", "full"))

    @property
    def done(self) -> list[str]:
        """The experiments whose part a rerun would load."""
        return [n for n, p in self.parts.items() if p.state == "done"]

    @property
    def complete(self) -> bool:
        """Every experiment finished, and ``results.nc`` and ``report.md`` written."""
        finished = bool(self.parts) and len(self.done) == len(self.parts)
        return finished and self.results in ("current", "present") and self.report


def _results_state(out: Path, hashes: dict[str, str] | None) -> str:
    path = out / "results.nc"
    if not path.exists():
        return "missing"
    try:
        with h5netcdf.File(path, "r") as f:
            stored = {n: f.groups[n].attrs.get("config_hash") for n in f.groups}
    except Exception:  # a damaged file: the next run rewrites it
        return "unreadable"
    if hashes is None:
        return "present"
    return "current" if stored == hashes else "stale"


def run_status(out: str | Path) -> RunStatus:
    """What the run directory `out` holds (reads it; writes nothing, takes no lock).

    **Raises:** ``StudyOutputError`` when `out` is not a directory or its ``study.json``
    cannot be read."""
    out = Path(out)
    if not out.is_dir():
        raise StudyOutputError(f"No run directory at {out}.")
    record = read_study_record(out)
    if record is not None:
        hashes = {str(n): str(h) for n, h in record["experiments"].items()}
        parts = {n: verify_part(out / "parts" / f"{n}.nc", h) for n, h in hashes.items()}
    else:
        hashes = None
        found = sorted((out / "parts").glob("*.nc")) if (out / "parts").is_dir() else []
        parts = {p.stem: verify_part(p) for p in found}
    lock = None
    if (out / LOCK).exists():
        pid, host = lock_holder(out / LOCK)
        lock = LockState(out / LOCK, pid, holder_alive(pid, host), host)
    return RunStatus(
        out=out,
        record=record,
        parts=parts,
        lock=lock,
        results=_results_state(out, hashes),
        report=(out / "report.md").is_file(),
    )
