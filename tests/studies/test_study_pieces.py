"""A study that loses nothing (issue 10): SIGKILL at random moments and resume to the same bits;
the same study on a 2-worker dask LocalCluster; bad cluster options are clear errors."""

import os
from pathlib import Path
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr

from lspsde.cli import main
from lspsde.study import runner

STUDY = """
[study]
name = "pieces"
seed = 3

[noise_ablation]
noise = [{kind = "IsotropicGaussian", scale = 1.0}, {kind = "StudentTNoise", scale = 1.0, df = 5.0}]
n_paths = 240
n_steps = 200
save_every = 10
n_variance_draws = 200
"""


CHUNK = 40  # paths per piece


def _data(out: Path) -> dict[str, np.ndarray]:
    tree = xr.open_datatree(out / "results.nc")
    return {
        f"{node.path}/{name}": np.asarray(var)
        for node in tree.subtree
        for name, var in node.ds.data_vars.items()
    }


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    study = root / "pieces.toml"
    study.write_text(STUDY)
    # uninterrupted, unchunked and serial: the runs compared with it use pieces of CHUNK paths
    runner.run_study(study, root / "out", progress=False)
    return study, _data(root / "out")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lspsde.cli", *args]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_same_bits(reference, tmp_path):
    study, want = reference
    out = tmp_path / "out"
    env = {**os.environ, "CI": "true"}
    rng = random.Random(0)
    count = lambda: len(list(out.rglob("*.h5"))) + len(list(out.glob("parts/*.nc")))
    kills, kept = 0, []
    for attempt in range(4):
        before = count()
        proc = subprocess.Popen(
            _cli("run", str(study), "--out", str(out), "--chunk-size", str(CHUNK)),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if attempt == 0:  # once at a random moment of start-up or compilation
            time.sleep(rng.uniform(0.5, 3.0))
        else:  # then at random moments after the run has written something new
            deadline = time.monotonic() + 300
            while count() <= before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        kept.append(count())
    assert kills >= 3, f"only {kills} kills landed before the run finished"
    assert max(kept) > 0, "nothing was kept from the killed runs"
    done = subprocess.run(
        _cli("run", str(study), "--out", str(out), "--chunk-size", str(CHUNK)),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    _same(_data(out), want)
    assert not (out / "pieces" / "noise_ablation").exists()  # superseded by the part
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_a_study_on_a_local_cluster_equals_the_serial_run(reference, tmp_path):
    study, want = reference
    res = runner.run_study(study, tmp_path / "out", progress=False, workers=2, chunk_size=CHUNK)
    assert res.out == tmp_path / "out"
    _same(_data(tmp_path / "out"), want)


def test_bad_cluster_options_are_one_line_errors(reference, tmp_path, capsys):
    study, _ = reference
    assert main(["run", str(study), "--out", str(tmp_path / "a"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "--workers must be at least 1, got 0" in err and "Traceback" not in err
    assert main(["run", str(study), "--out", str(tmp_path / "b"), "--chunk-size", "0"]) == 2
    assert "--chunk-size must be at least 1" in capsys.readouterr().err
    code = main(
        ["run", str(study), "--out", str(tmp_path / "c"), "--scheduler", "tcp://127.0.0.1:9"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "Could not reach the dask scheduler at 'tcp://127.0.0.1:9'" in err
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").rglob("*.nc"))
