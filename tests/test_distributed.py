"""Stored pieces and dask.distributed (``lspsde.distributed``): the numbers never change.

- Under ``execution(store)`` every chunk of ``simulate`` / ``exponent_distribution`` (over
  the whole grid of a sweep) is a stored piece; the result equals the plain run's to
  the bit, a second run loads every piece and computes none, a damaged piece is recomputed.
- On a 2-worker ``LocalCluster`` the result equals the serial run's to the bit, also when one
  worker is killed mid-run (its task is retried elsewhere; nothing is lost or doubled).
"""

import os
import threading
import time

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lspsde
from lspsde import distributed
from models.objectives import Quadratic


@pytest.fixture(scope="module")
def problem():
    obj = Quadratic(jnp.diag(jnp.array([0.5, 1.0, 2.0])), jnp.array([0.1, 0.0, -0.2]))
    sweep = lspsde.Sweep.of(lambda e: lspsde.SGD(e), [0.1, 0.5, 0.9], name="eta")
    kw = dict(key=jax.random.key(0), n_paths=10, n_steps=40)
    return obj, sweep, lspsde.IsotropicGaussian(0.3), jnp.ones(3), kw


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _counting(monkeypatch) -> list:
    """Count the chunks computed in this process."""
    calls = []
    real = distributed.Piece.compute

    def compute(self, run_chunk):
        calls.append(self.start)
        return real(self, run_chunk)

    monkeypatch.setattr(distributed.Piece, "compute", compute)
    return calls


def test_stored_pieces_equal_the_plain_run_and_are_reused(problem, tmp_path, monkeypatch):
    obj, sweep, noise, theta0, kw = problem
    plain = lspsde.simulate((obj, sweep, noise), theta0, **kw)
    calls = _counting(monkeypatch)
    with distributed.execution(tmp_path, chunk_size=4):
        stored = lspsde.simulate((obj, sweep, noise), theta0, **kw)
    _same(stored, plain)
    assert len(calls) == 3 and len(distributed.PieceStore(tmp_path)) == 3  # 3 chunks, whole grid
    calls.clear()
    with distributed.execution(tmp_path, chunk_size=4):
        again = lspsde.simulate((obj, sweep, noise), theta0, **kw)
    _same(again, plain)
    assert calls == []  # every piece loaded, none computed
    # another run (a different key) shares no piece
    with distributed.execution(tmp_path, chunk_size=4):
        lspsde.simulate((obj, sweep, noise), theta0, **{**kw, "key": jax.random.key(1)})
    assert len(calls) == 3 and len(distributed.PieceStore(tmp_path)) == 6


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _edit(path):
    with h5py.File(path, "r+") as f:
        name = sorted(f)[0]
        data = f[name][...]
        f[name][...] = data + 1 if data.dtype.kind != "b" else ~data


@pytest.mark.parametrize("damage", [_truncate, _edit])
def test_a_damaged_piece_is_recomputed_never_used(problem, tmp_path, monkeypatch, capsys, damage):
    obj, _, noise, theta0, kw = problem
    flow = lspsde.SGD(0.5)
    plain = lspsde.simulate((obj, flow, noise), theta0, **kw)
    with distributed.execution(tmp_path, chunk_size=4):
        lspsde.simulate((obj, flow, noise), theta0, **kw)
    victim = sorted(tmp_path.glob("*.h5"))[1]
    damage(victim)
    calls = _counting(monkeypatch)
    with distributed.execution(tmp_path, chunk_size=4):
        again = lspsde.simulate((obj, flow, noise), theta0, **kw)
    _same(again, plain)
    assert len(calls) == 1  # exactly the damaged one
    assert f"not using piece {victim}" in capsys.readouterr().err


def test_exponent_distribution_pieces_equal_the_plain_run(problem, tmp_path):
    obj, sweep, noise, theta0, _ = problem
    kw = dict(key=jax.random.key(2), n_paths=6, n_steps=12)
    plain = lspsde.exponent_distribution((obj, sweep, noise), theta0, **kw)
    with distributed.execution(tmp_path, chunk_size=2):
        stored = lspsde.exponent_distribution((obj, sweep, noise), theta0, **kw)
    _same(stored, plain)


def test_bad_execution_settings():
    with pytest.raises(ValueError, match="needs a `store`"):
        with distributed.execution(client=object()):
            pass
    with pytest.raises(ValueError, match="chunk_size"):
        with distributed.execution("x", chunk_size=0):
            pass
    with pytest.raises(ValueError, match="positive number of worker"):
        with distributed.connect(workers=0):
            pass
    with pytest.raises(distributed.ClusterError, match="Could not reach the dask scheduler"):
        with distributed.connect(scheduler="tcp://127.0.0.1:9", timeout=1.0):
            pass


def test_outside_execution_nothing_is_stored(problem, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    obj, sweep, noise, theta0, kw = problem
    lspsde.simulate((obj, sweep, noise), theta0, **kw)
    assert list(tmp_path.iterdir()) == []
    assert distributed.current() is None


@pytest.mark.slow
def test_a_local_cluster_gives_the_serial_numbers_even_when_a_worker_dies(problem, tmp_path):
    obj, _, noise, theta0, _ = problem
    etas = list(np.linspace(0.05, 0.9, 6))
    sweep = lspsde.Sweep.of(lambda e: lspsde.SGD(e), etas, name="eta")
    kw = dict(key=jax.random.key(3), n_paths=24, n_steps=3000, save_every=100)
    serial = lspsde.simulate((obj, sweep, noise), theta0, **kw)
    with distributed.connect(workers=2) as client:
        store = distributed.PieceStore(tmp_path)
        killed = []

        def kill_one_worker():  # once the first pieces are in, kill a worker process
            while len(store) < 2:
                time.sleep(0.05)
            pids = client.run(os.getpid)
            victim = sorted(pids)[0]
            killed.append(victim)
            os.kill(pids[victim], 9)

        thread = threading.Thread(target=kill_one_worker, daemon=True)
        thread.start()
        with distributed.execution(store, client=client, chunk_size=4):
            result = lspsde.simulate((obj, sweep, noise), theta0, **kw)
        thread.join(timeout=60)
    assert killed, "no worker was killed: the test did not exercise a failure"
    _same(result, serial)
    assert len(store) == 6  # 6 chunks (each over the whole grid), each exactly once


def test_a_sweep_is_one_piece_per_chunk(problem, tmp_path):
    obj, sweep, noise, theta0, kw = problem
    with distributed.execution(tmp_path):
        lspsde.simulate((obj, sweep, noise), theta0, **kw)
    assert len(distributed.PieceStore(tmp_path)) == 1  # all paths in one chunk, the whole grid


def test_piece_keys_tell_different_computations_apart(monkeypatch):
    """Two computations that differ only in code get different keys; the same one gets the
    same key whatever PYTHONHASHSEED (a set literal inside a function)."""
    import subprocess
    import sys

    key = lambda *parts: distributed.piece_key("lspsde._ensemble:_run_chunk", parts)

    def sin(x):
        return jnp.sin(x)

    def cos(x):
        return jnp.cos(x)

    def outer(p):
        return lambda y: y**p

    def kw(x, *, s=2.0):
        return s * x

    def kw3(x, *, s=3.0):
        return s * x

    class Scaler:
        def __init__(self, s):
            self.s = s

    assert key(sin) != key(cos)  # names the code reads (co_names)
    assert key(lambda y: y**2) != key(lambda y: y**3)
    assert key(outer(2)) != key(outer(3))  # closures
    assert key(kw) != key(kw3)  # keyword-only defaults
    assert key(Scaler(2.0)) != key(Scaler(3.0))  # plain objects by their state
    assert key(sin) == key(sin)
    script = (
        "import lspsde.distributed as d\n"
        "def f(k):\n    return k in {'relu', 'gelu', 'tanh', 'elu', 'selu'}\n"
        "print(d.piece_key('m:f', (f, {'a', 'b', 'c'})))\n"
    )
    keys = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed, "JAX_PLATFORMS": "cpu"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(keys) == 1, keys


def test_stored_runs_of_different_losses_do_not_share_pieces(tmp_path):
    from lspsde.objectives import SupervisedLoss, parameters

    net = lspsde.Feedforward([jnp.eye(2)], activation="identity")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 2)))
    losses = [
        lambda p, y: jnp.sum(jnp.square(p - y)),
        lambda p, y: jnp.sum(jnp.abs(p - y)),
    ]
    kw = dict(key=jax.random.key(0), n_paths=2, n_steps=5, save="summary")
    for loss in losses:
        obj = SupervisedLoss(net, x, jnp.zeros((8, 2)), loss_fn=loss)
        system = (obj, lspsde.SGD(0.1), lspsde.IsotropicGaussian(0.1))
        plain = lspsde.simulate(system, parameters(net), **kw)
        with distributed.execution(tmp_path):
            stored = lspsde.simulate(system, parameters(net), **kw)
        _same(stored, plain)
    assert len(distributed.PieceStore(tmp_path)) == 2


def test_pieces_round_trip_every_dtype_and_weak_scalars(tmp_path):
    store = distributed.PieceStore(tmp_path)
    leaves = [
        np.arange(6, dtype=jnp.bfloat16).reshape(2, 3),
        np.array([True, False]),
        np.arange(3, dtype=np.int32),
        np.linspace(0, 1, 4),
    ]
    store.save("k", leaves)
    like = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves]
    back = store.load("k", like)
    for a, b in zip(leaves, back, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # a weakly typed scalar crosses to a worker weakly typed (it promotes as on the driver)
    tree = {"w": jnp.asarray(0.5), "s": jnp.asarray(0.5, dtype=jnp.float32)}
    again = distributed._from_host(distributed._to_host(tree))
    assert again["w"].weak_type and not again["s"].weak_type
    x32 = jnp.ones(2, jnp.float32)
    assert (again["w"] * x32).dtype == (tree["w"] * x32).dtype == jnp.float32
