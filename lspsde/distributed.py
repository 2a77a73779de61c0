r"""Ensembles that lose nothing and run past one machine: stored pieces and dask.distributed.

The ensemble engine runs paths in chunks, and path $p$ depends only on ``(key, p)``
(``lspsde._ensemble``): a chunk of paths is a pure function of what it is. So a chunk is a
**piece** that can be stored, reused and computed anywhere:

- **Stored** ([`PieceStore`][]): inside ``with lspsde.distributed.execution(store=DIR):`` every
  chunk of every ``simulate`` / ``exponent_distribution`` is written to ``DIR`` as one HDF5 file
  (netCDF-4's storage format), keyed by a SHA-256 of what it is: the lspsde version, the path
  function, the learning system's arrays and static structure, the run's arguments and the path
  ids. Each file carries a SHA-256 checksum of its data; writes go to a uniquely named
  temporary and are moved into place atomically (``os.replace``). A piece already in the store
  is loaded, never recomputed; a partial, damaged or foreign file is never used (it is named in
  one log line and recomputed). Kill a run at any moment, SIGKILL included, and run it again:
  it continues from its pieces, and its numbers equal an uninterrupted run's to the bit.
- **Distributed** (``execution(store=DIR, client=distributed.Client(...))``): the pieces that
  are not stored yet are submitted as dask tasks. A worker computes its piece (sharded over its
  own local devices, as the engine does everywhere), writes it to the shared store, and returns
  only its key; the driver merges the pieces in path order. A worker that dies has its task
  retried elsewhere by the scheduler; a piece written twice is the same bytes, so nothing is
  lost or doubled. Results equal the serial run's to the bit (the program and the inputs of a
  piece are the same wherever it runs). The store must be visible to every worker: a shared
  filesystem.
- **Grid points** of a [`lspsde.Sweep`][] stay inside their chunk: a piece is a chunk of paths
  over the whole grid, exactly the program of an unstored run. (Running each grid point as a
  plain call would be a different program: for ``exponent_distribution`` the temporal block
  ``cum_u`` then differs in the last bit, 5.6e-17, measured.)
- ``chunk_size`` in [`execution`][] caps the paths per piece (the engine's results do not
  depend on the chunking), so that a long run checkpoints often.

The study runner uses this (``lspsde run STUDY.toml --out DIR --workers N`` or ``--scheduler
ADDRESS``, pieces in ``DIR/pieces``).
"""

from collections.abc import Callable, Iterator
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import importlib
import inspect
import logging
import os
from pathlib import Path
import re
import sys
import types
from typing import Any
import uuid

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ClusterError", "Execution", "PieceStore", "connect", "current", "execution"]

_FORMAT = "lspsde-piece-2"
# JAX settings that decide a piece's bits besides x64: in its key, and set on the workers
_SETTINGS = ("jax_threefry_partitionable", "jax_default_prng_impl", "jax_default_matmul_precision")
_log = logging.getLogger("lspsde.distributed")


class ClusterError(RuntimeError):
    """A dask cluster that cannot be started or reached (the message says which and why)."""


# --------------------------------------------------------------------------------------------
# Host-side copies of pytrees: what is hashed, pickled to workers and written to disk
# --------------------------------------------------------------------------------------------


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


@dataclasses.dataclass(frozen=True)
class _HostWeak:
    """A weakly typed JAX scalar on the host (``jnp.asarray(0.5)``): its value, so that the
    receiving process rebuilds it weakly typed and promotes it as the driver did."""

    value: bool | int | float | complex


@dataclasses.dataclass(frozen=True)
class _HostKey:
    """A typed PRNG key on the host: its implementation's name and its raw data."""

    impl: str
    data: np.ndarray


def _to_host(tree: Any) -> Any:
    """Every JAX array of ``tree`` as NumPy (a typed key as ``_HostKey``): it pickles without
    depending on the receiving process's precision setting, and hashes by its bytes."""

    def host(x):
        if _is_key(x):
            return _HostKey(str(jax.random.key_impl(x)), np.asarray(jax.random.key_data(x)))
        if isinstance(x, jax.Array):
            if getattr(x, "weak_type", False) and x.ndim == 0:
                return _HostWeak(x.item())
            return np.asarray(x)
        return x

    return jax.tree.map(host, tree)


def _from_host(tree: Any) -> Any:
    def device(x):
        if isinstance(x, _HostKey):
            return jax.random.wrap_key_data(jnp.asarray(x.data), impl=x.impl)
        if isinstance(x, _HostWeak):
            return jnp.asarray(x.value)  # a Python scalar: weakly typed again
        if isinstance(x, np.ndarray):
            return jnp.asarray(x)
        return x

    host_leaf = lambda x: isinstance(x, _HostKey | _HostWeak)
    return jax.tree.map(device, tree, is_leaf=host_leaf)


def _digest(obj: Any, seen: frozenset[int]) -> bytes:
    """The fingerprint of ``obj`` alone, as bytes (to sort the elements of a set by)."""
    h = hashlib.sha256()
    _fingerprint(obj, h, seen)
    return h.digest()


def _code(code: types.CodeType, h: "hashlib._Hash", seen: frozenset[int]) -> None:
    """A code object: its bytecode, the names it reads (globals, attributes), its variables and
    its constants, nested code objects (lambdas, comprehensions) included."""
    h.update(b"code:")
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars)).encode())
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            _code(c, h, seen)
        else:
            _fingerprint(c, h, seen)


_CLASS_DIGESTS: dict[type, bytes] = {}


def _class(cls: type, h: "hashlib._Hash") -> None:
    """A class by its name and the code of every function its own classes define (its MRO up
    to the library bases): editing a user objective's ``loss`` changes its pieces' keys."""
    if cls not in _CLASS_DIGESTS:
        ch = hashlib.sha256(f"type:{cls.__module__}.{cls.__qualname__};".encode())
        for klass in cls.__mro__:
            if klass.__module__.split(".")[0] in ("builtins", "equinox", "abc", "typing"):
                continue
            for name in sorted(vars(klass)):
                attr = inspect.getattr_static(klass, name)
                fn = getattr(attr, "__func__", attr)  # staticmethod, classmethod
                if isinstance(fn, property):
                    fn = fn.fget
                if isinstance(fn, types.FunctionType):
                    ch.update(f"{klass.__qualname__}.{name}:".encode())
                    _code(fn.__code__, ch, frozenset())
        _CLASS_DIGESTS[cls] = ch.digest()
    h.update(_CLASS_DIGESTS[cls])


def _fingerprint(obj: Any, h: "hashlib._Hash", seen: frozenset[int] = frozenset()) -> None:
    """Feed a deterministic description of ``obj`` (a static part of a pytree) to ``h``:
    functions by module, name, code (bytecode, names, constants, nested code), closure and
    defaults; wrappers by their own closure and what they wrap; modules and dataclasses by their
    class (and its methods' code) and fields; containers by their items (sets by their sorted
    element digests); other objects by their class and ``vars``. Nothing depends on memory
    addresses or on ``PYTHONHASHSEED``."""
    if isinstance(obj, str | bytes | int | float | complex | bool | type(None)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
        return
    if id(obj) in seen:
        h.update(b"<cycle>;")
        return
    seen = seen | {id(obj)}
    if isinstance(obj, np.ndarray | np.generic):
        a = np.ascontiguousarray(obj)
        h.update(f"array{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
        return
    if isinstance(obj, type):
        _class(obj, h)
        return
    if isinstance(obj, set | frozenset):
        h.update(f"{type(obj).__name__}[{len(obj)}]:".encode())
        for d in sorted(_digest(x, seen) for x in obj):
            h.update(d)
        return
    if isinstance(obj, types.FunctionType):
        h.update(f"fn:{obj.__module__}.{obj.__qualname__}:".encode())
        _code(obj.__code__, h, seen)
        for cell in obj.__closure__ or ():
            try:
                _fingerprint(cell.cell_contents, h, seen)
            except ValueError:  # an empty cell
                h.update(b"<empty>;")
        _fingerprint(obj.__defaults__, h, seen)
        _fingerprint(obj.__kwdefaults__, h, seen)
        wrapped = getattr(obj, "__wrapped__", None)  # functools.wraps: the wrapper and its target
        if wrapped is not None and wrapped is not obj:
            h.update(b"wraps:")
            _fingerprint(wrapped, h, seen)
        return
    if isinstance(obj, functools.partial):
        _fingerprint((obj.func, obj.args, obj.keywords), h, seen)
        return
    if isinstance(obj, types.MethodType):
        _fingerprint((obj.__func__, obj.__self__), h, seen)
        return
    if isinstance(obj, types.BuiltinFunctionType | types.ModuleType):
        h.update(f"builtin:{getattr(obj, '__module__', '')}.{obj.__name__};".encode())
        return
    if isinstance(obj, tuple | list):
        h.update(f"{type(obj).__qualname__}[{len(obj)}]:".encode())
        for x in obj:
            _fingerprint(x, h, seen)
        return
    if isinstance(obj, dict):
        h.update(f"dict[{len(obj)}]:".encode())
        for k, v in sorted(obj.items(), key=lambda kv: _digest(kv[0], seen)):
            _fingerprint(k, h, seen)
            _fingerprint(v, h, seen)
        return
    if isinstance(obj, jax.tree_util.PyTreeDef):
        h.update(re.sub(r"0x[0-9a-f]+", "0x", str(obj)).encode())
        return
    _class(type(obj), h)
    if dataclasses.is_dataclass(obj):  # equinox modules are dataclasses
        for f in dataclasses.fields(obj):
            h.update(f"{f.name}=".encode())
            _fingerprint(getattr(obj, f.name, None), h, seen)
        return
    wrapped = getattr(obj, "__wrapped__", None)  # jit wrappers, custom_jvp, ...
    if wrapped is not None and wrapped is not obj:
        h.update(b"wraps:")
        _fingerprint(wrapped, h, seen)
    state = getattr(obj, "__dict__", None)
    if state is not None:
        _fingerprint(dict(state), h, seen)
        return
    slots = [n for k in type(obj).__mro__ for n in getattr(k, "__slots__", ())]
    if slots:
        _fingerprint({n: getattr(obj, n, None) for n in slots}, h, seen)
        return
    h.update(re.sub(r"0x[0-9a-f]+", "0x", repr(obj)).encode())


def piece_key(*parts: Any) -> str:
    """SHA-256 of ``parts`` (pytrees): the bytes, dtype and shape of every array leaf, and a
    deterministic description of the static structure (functions by their code and closure)."""
    from . import __version__

    h = hashlib.sha256(f"{_FORMAT}|lspsde {__version__}|jax {jax.__version__}".encode())
    # what else decides the bits: the backend and its device count, and JAX's numerics settings
    config = [
        jax.default_backend(),
        len(jax.local_devices()),
        str(jnp.result_type(float)),
        *(str(getattr(jax.config, name, None)) for name in _SETTINGS),
    ]
    h.update(repr(config).encode())
    host = _to_host(parts)
    leaves, treedef = jax.tree.flatten(host, is_leaf=lambda x: isinstance(x, _HostKey | _HostWeak))
    for leaf in leaves:
        if isinstance(leaf, _HostKey):
            h.update(leaf.impl.encode())
            leaf = leaf.data
        _fingerprint(leaf, h)
    _fingerprint(treedef, h)
    arrays = lambda x: isinstance(x, np.ndarray | np.generic | _HostKey | _HostWeak)
    _fingerprint(jax.tree.map(lambda x: None if arrays(x) else x, host, is_leaf=arrays), h)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


def _checksum(leaves: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in leaves:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class PieceStore:
    """A directory of pieces: ``<key>.h5`` files, each one chunk's outputs (every leaf a
    dataset ``leaf_<i>``) with its key and a checksum of its data in the attributes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()  # workers elsewhere need the absolute path
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(
                f"The piece store {self.path} is a file; give a directory (it is created)."
            )

    def file(self, key: str) -> Path:
        return self.path / f"{key}.h5"

    def save(self, key: str, leaves: list[np.ndarray]) -> None:
        """Write one piece atomically (a unique temporary, then ``os.replace``)."""
        import h5py

        self.path.mkdir(parents=True, exist_ok=True)
        final = self.file(key)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            # no HDF5 file locking: many shared filesystems (NFS, Lustre) refuse it, and a piece
            # is written once, to a unique temporary, and moved into place atomically
            with h5py.File(tmp, "w", locking=False) as f:
                for i, leaf in enumerate(leaves):
                    a = np.ascontiguousarray(leaf)  # raw bytes: every dtype (bfloat16 too)
                    d = f.create_dataset(f"leaf_{i:05d}", data=a.reshape(-1).view(np.uint8))
                    d.attrs.update(dtype=a.dtype.name, shape=list(a.shape))
                f.attrs.update(
                    format=_FORMAT, key=key, n_leaves=len(leaves), checksum=_checksum(leaves)
                )
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)

    def load(self, key: str, like: list[jax.ShapeDtypeStruct]) -> list[np.ndarray] | None:
        """The piece ``key`` if it is complete and intact and has the expected leaves
        (shapes and dtypes of ``like``); ``None`` if it is missing. A damaged piece is named in
        one log line, removed and reported missing, so that it is recomputed."""
        import h5py

        path = self.file(key)
        if not path.exists():
            return None
        try:
            with h5py.File(path, "r", locking=False) as f:
                attrs = dict(f.attrs)
                n = int(attrs["n_leaves"])
                leaves = []
                for i in range(n):
                    d = f[f"leaf_{i:05d}"]
                    raw = np.asarray(d).tobytes()
                    dtype, shape = np.dtype(str(d.attrs["dtype"])), tuple(d.attrs["shape"])
                    leaves.append(np.frombuffer(raw, dtype=dtype).reshape(shape).copy())
            why = None
            if attrs.get("format") != _FORMAT or attrs.get("key") != key:
                why = "it is not this piece"
            elif n != len(like) or any(
                (a.shape, a.dtype) != (tuple(b.shape), np.dtype(b.dtype))
                for a, b in zip(leaves, like, strict=False)
            ):
                why = "its arrays do not have the expected shapes"
            elif _checksum(leaves) != attrs.get("checksum"):
                why = "checksum mismatch (its data changed or are damaged)"
        except Exception as err:  # truncated, emptied, not HDF5, missing datasets
            why, leaves = f"it cannot be read ({type(err).__name__}: {err})", None
        if why is None:
            return leaves
        print(f"lspsde: not using piece {path}: {why}; recomputing it", file=sys.stderr)
        path.unlink(missing_ok=True)
        return None

    def __len__(self) -> int:
        return len(list(self.path.glob("*.h5"))) if self.path.is_dir() else 0


# --------------------------------------------------------------------------------------------
# The execution context
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Execution:
    """Where ensemble chunks go (see [`execution`][]): a store, a dask client, a piece size."""

    store: PieceStore | None = None
    client: Any = None
    chunk_size: int | None = None


_CURRENT: contextvars.ContextVar[Execution | None] = contextvars.ContextVar(
    "lspsde_execution", default=None
)


def current() -> Execution | None:
    """The active [`Execution`][] (``None`` outside [`execution`][])."""
    return _CURRENT.get()


@contextlib.contextmanager
def execution(
    store: "str | os.PathLike | PieceStore | None" = None,
    *,
    client: Any = None,
    chunk_size: int | None = None,
) -> Iterator[Execution]:
    """Run every ensemble inside this block with stored pieces and, with ``client`` (a
    ``distributed.Client``), on a dask cluster.

    **Arguments:**

    - `store`: a directory (created) for the pieces; required with `client` (the workers write
      their pieces there, so it must be shared with them).
    - `client`: a ``distributed.Client``; pieces not in the store run as its tasks.
    - `chunk_size`: at most this many paths per piece (smaller pieces checkpoint more often;
      the numbers do not depend on it).

    **Raises:** ``ValueError`` for a `client` without a `store` or a `chunk_size` below 1.
    """
    from ._checks import check_positive_int

    if chunk_size is not None:
        chunk_size = check_positive_int("chunk_size", chunk_size)
    if client is not None and store is None:
        raise ValueError(
            "A dask `client` needs a `store`: the workers write their pieces to it (a directory "
            "every worker can reach, e.g. on a shared filesystem)."
        )
    if store is not None and not isinstance(store, PieceStore):
        store = PieceStore(store)
    token = _CURRENT.set(Execution(store, client, chunk_size))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def connect(workers: int | None = None, scheduler: str | None = None, *, timeout: float = 10.0):
    """A ``distributed.Client`` for the block: on a new ``LocalCluster`` of ``workers``
    processes (one thread each; closed with the block), or on the scheduler at ``scheduler``
    (``tcp://host:8786``; left running).

    **Raises:** ``ValueError`` for ``workers < 1`` or both or neither argument;
    ``ClusterError`` when the scheduler cannot be reached within ``timeout`` seconds or the
    local cluster cannot start.
    """
    from distributed import Client, LocalCluster

    if (workers is None) == (scheduler is None):
        raise ValueError("Give either `workers` (a local cluster) or `scheduler` (an address).")
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(
                f"`workers` must be a positive number of worker processes, got {workers!r}; "
                "use --workers 1 or more (or leave it out to run in this process)."
            )
        try:
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
        except Exception as err:
            raise ClusterError(
                f"Could not start a local cluster of {workers} workers: {err}"
            ) from err
        with cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout=timeout)
    except Exception as err:
        raise ClusterError(
            f"Could not reach the dask scheduler at {scheduler!r} within {timeout:g} s "
            f"({type(err).__name__}: {err}). Check the address (e.g. tcp://host:8786) and that "
            "the scheduler is running and reachable from this machine."
        ) from None
    with client:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except Exception:
            raise ClusterError(
                f"The dask scheduler at {scheduler!r} has no workers (none joined within "
                f"{timeout:g} s): start some with `dask worker {scheduler}`."
            ) from None
        yield client


# --------------------------------------------------------------------------------------------
# Running pieces (called by the engine's run_ensemble)
# --------------------------------------------------------------------------------------------


def path_ids(start: int, padded: int) -> jax.Array:
    """The global path indices ``start .. start + padded - 1`` of one chunk, sharded over the
    local devices when there are several (the tail beyond the valid paths is padding)."""
    ids = jnp.arange(start, start + padded)
    devices = jax.local_devices()
    # (a worker may have another device count than the driver that sized the chunk: shard only
    # when the chunk divides evenly; the bits do not depend on the sharding)
    if len(devices) > 1 and padded % len(devices) == 0:
        mesh = jax.sharding.Mesh(np.asarray(devices), ("path",))
        ids = jax.device_put(
            ids, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("path"))
        )
    return ids


@dataclasses.dataclass(frozen=True)
class Piece:
    """One chunk: ``run_chunk(*fixed, path_ids(start, padded))``, its first ``valid`` paths
    along ``axis``."""

    fixed: tuple
    start: int
    padded: int
    valid: int
    axis: int

    def compute(self, run_chunk: Callable) -> Any:
        out = run_chunk(*self.fixed, path_ids(self.start, self.padded))
        if self.valid == self.padded:
            return out
        return jax.tree.map(lambda x: jax.lax.slice_in_dim(x, 0, self.valid, axis=self.axis), out)


def _resolve(ref: str) -> Callable:
    """``"package.module:name"`` -> that module-level object (imported here)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _piece_task(
    store_path: str,
    key: str,
    x64: bool,
    run_chunk: str,
    fixed: list,
    piece: Piece,
    settings: dict | None = None,
) -> str:
    """A dask task: compute one piece with the driver's precision and write it to the store.
    ``run_chunk`` is a reference ``"module:name"``: the worker imports it (a jitted function
    does not pickle by value). ``fixed`` is the host copy of the piece's fixed arguments, in a
    one-element list so that dask hands over the scattered data (sent once per run, not once
    per task)."""
    run_chunk = _resolve(run_chunk)
    for name, value in (settings or {}).items():  # the driver's numerics, in this process
        if getattr(jax.config, name, value) != value:
            jax.config.update(name, value)
    with jax.enable_x64(x64):
        piece = dataclasses.replace(piece, fixed=_from_host(fixed[0]))
        leaves = [np.asarray(a) for a in jax.tree.leaves(piece.compute(run_chunk))]
    PieceStore(store_path).save(key, leaves)
    return key


def run_pieces(
    run_chunk_ref: str,
    pieces: list[Piece],
    exe: Execution,
    progress: Callable[[], None] = lambda: None,
) -> list[Any]:
    """``piece.compute(run_chunk)`` for every piece, in order, with ``run_chunk`` the
    module-level function ``run_chunk_ref`` (``"module:name"``): loaded from the store,
    computed here, or computed by the client's workers (and stored)."""
    run_chunk = _resolve(run_chunk_ref)
    template = eqx.filter_eval_shape(
        run_chunk, *pieces[0].fixed, jax.ShapeDtypeStruct((pieces[0].padded,), jnp.int_)
    )
    treedef = jax.tree.structure(template)
    fixed_keys: dict[int, str] = {}  # one hash of the (large) fixed arguments per distinct tuple
    keys = []
    for piece in pieces:
        if id(piece.fixed) not in fixed_keys:
            fixed_keys[id(piece.fixed)] = piece_key(run_chunk_ref, piece.fixed)
        where = (
            f"{fixed_keys[id(piece.fixed)]}|{piece.start}|{piece.padded}|{piece.valid}|{piece.axis}"
        )
        like = []
        for a in jax.tree.leaves(template):
            shape = list(a.shape)
            shape[piece.axis] = piece.valid
            like.append(jax.ShapeDtypeStruct(tuple(shape), a.dtype))
        keys.append((hashlib.sha256(where.encode()).hexdigest(), like))

    def loaded(i):
        found = exe.store.load(*keys[i]) if exe.store is not None else None
        return (
            None if found is None else jax.tree.unflatten(treedef, [jnp.asarray(a) for a in found])
        )

    results = [loaded(i) for i in range(len(pieces))]
    missing = [i for i, r in enumerate(results) if r is None]
    for _ in range(len(pieces) - len(missing)):
        progress()
    if exe.client is not None and missing:
        from distributed import as_completed

        x64 = jnp.result_type(float) == jnp.float64  # the precision in force here
        scattered = {}  # one copy of each distinct fixed tuple (the system, its data) per run
        for i in missing:
            if id(pieces[i].fixed) not in scattered:
                host = _to_host(pieces[i].fixed)
                scattered[id(pieces[i].fixed)] = exe.client.scatter(host, broadcast=True)
        futures = {
            exe.client.submit(
                _piece_task,
                str(exe.store.path),
                keys[i][0],
                x64,
                run_chunk_ref,
                [scattered[id(pieces[i].fixed)]],
                dataclasses.replace(pieces[i], fixed=()),
                {name: getattr(jax.config, name) for name in _SETTINGS},
                key="lspsde-piece-"
                + hashlib.sha256(f"{exe.store.path}|{keys[i][0]}".encode()).hexdigest(),
                pure=False,
                retries=3,
            ): i
            for i in missing
        }
        for future in as_completed(futures):
            i = futures[future]
            try:
                future.result()  # re-raises a task's error (or KilledWorker) here
            except Exception as err:
                raise ClusterError(
                    f"A piece failed on the dask cluster ({type(err).__name__}: {err}); the "
                    f"pieces already in {exe.store.path} are kept, and rerunning resumes."
                ) from err
            results[i] = loaded(i)
            if results[i] is None:
                raise ClusterError(
                    f"A worker reported piece {keys[i][0]} written, but the store "
                    f"{exe.store.path} does not hold it intact: the output directory must be on "
                    "storage every worker and this process share (a shared filesystem)."
                )
            progress()
        return results
    for i in missing:
        out = pieces[i].compute(run_chunk)
        if exe.store is not None:
            exe.store.save(keys[i][0], [np.asarray(a) for a in jax.tree.leaves(out)])
        results[i] = out
        progress()
    return results
