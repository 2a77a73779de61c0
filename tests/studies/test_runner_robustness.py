"""The study runner under damage and misuse (issue 10): damaged parts are reported and
recomputed, writes are atomic and uniquely named, one run per output directory, write failures
come before computing, a figure never loses a report, and bad input gets a clear error."""

import dataclasses
import os
from pathlib import Path
import re
import shutil
import subprocess
import sys

import h5py
import jax
import numpy as np
import pytest
import xarray as xr

from lspsde import fit_recursion
from lspsde.cli import main
from lspsde.study import runner
from lspsde.study.runner import StudyOutputError
from lspsde.study.schema import StudyConfigError, load_study, parse_study

TINY = {
    "study": {"name": "tiny", "seed": 1},
    "noise_ablation": {
        "noise": [{"kind": "IsotropicGaussian", "scale": 1.0}],
        "n_paths": 50,
        "n_steps": 40,
        "save_every": 2,
        "n_variance_draws": 200,
    },
}
TINY_TOML = """
[study]
name = "tiny"
seed = 1

[noise_ablation]
noise = [{kind = "IsotropicGaussian", scale = 1.0}]
n_paths = 50
n_steps = 40
save_every = 2
n_variance_draws = 200
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny study: its directory and result (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("finished")
    return out, runner.run_study(parse_study(TINY), out, progress=False)


def _copy(finished, tmp_path) -> Path:
    out = tmp_path / "study"
    shutil.copytree(finished[0], out)
    return out


def _counting(monkeypatch, fail: bool = False) -> list:
    """Replace noise_ablation's run by one that counts its calls (and fails when ``fail``)."""
    calls = []
    exp = runner._registry()["noise_ablation"]

    def run(*args, **kwargs):
        calls.append(1)
        if fail:
            raise AssertionError("an experiment ran")
        return exp.run(*args, **kwargs)

    patched = dataclasses.replace(exp, run=run)
    monkeypatch.setattr(runner, "_registry", lambda: {"noise_ablation": patched})
    return calls


def _truncate(part: Path) -> None:
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])


def _empty(part: Path) -> None:
    part.write_bytes(b"")


def _zero(part: Path) -> None:
    data = bytearray(part.read_bytes())
    n = len(data)
    data[n // 4 : 3 * n // 4] = bytes(3 * n // 4 - n // 4)
    part.write_bytes(bytes(data))


def _change_a_value(part: Path) -> None:
    with xr.open_dataset(part, engine="h5netcdf") as ds:
        name = next(n for n, v in ds.data_vars.items() if v.dtype.kind == "f" and v.size > 1)
    with h5py.File(part, "r+") as f:
        values = f[name][...]
        values.flat[0] += 1.0
        f[name][...] = values


@pytest.mark.parametrize(
    "damage,why",
    [
        (_truncate, "unreadable"),
        (_empty, "unreadable"),
        (_zero, "unreadable|checksum"),
        (_change_a_value, "checksum mismatch"),
    ],
)
def test_a_damaged_part_is_reported_and_recomputed(
    finished, tmp_path, monkeypatch, capsys, damage, why
):
    out = _copy(finished, tmp_path)
    part = out / "parts" / "noise_ablation.nc"
    damage(part)
    calls = _counting(monkeypatch)
    capsys.readouterr()
    again = runner.run_study(parse_study(TINY), out, progress=False)
    assert calls == [1]  # recomputed, never used
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "not using" in ln]
    assert len(lines) == 1 and str(part) in lines[0], lines
    assert re.search(why, lines[0]), lines[0]
    xr.testing.assert_identical(
        again.tree["noise_ablation"].to_dataset(), finished[1].tree["noise_ablation"].to_dataset()
    )
    # the recomputed part is sound again: the next run loads it
    calls.clear()
    runner.run_study(parse_study(TINY), out, progress=False)
    assert calls == []


def test_an_intact_part_carries_its_checksum_and_is_loaded(finished, tmp_path, monkeypatch):
    out = _copy(finished, tmp_path)
    with xr.open_dataset(out / "parts" / "noise_ablation.nc", engine="h5netcdf") as ds:
        assert len(ds.attrs["checksum"]) == 64
    _counting(monkeypatch, fail=True)
    runner.run_study(parse_study(TINY), out, progress=False)  # loads: nothing runs


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from lspsde.study.runner import _acquire_lock
_acquire_lock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_into_a_locked_directory_fails_at_once(
    finished, tmp_path, monkeypatch, capsys
):
    out = _copy(finished, tmp_path)
    study = tmp_path / "tiny.toml"
    study.write_text(TINY_TOML)
    other = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline().strip() == "locked"  # another process holds the lock
        _counting(monkeypatch, fail=True)
        with pytest.raises(StudyOutputError, match=f"{out}.*pid {other.pid}"):
            runner.run_study(parse_study(TINY), out, progress=False)
        capsys.readouterr()
        assert main(["run", str(study), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another lspsde run" in err[0], err
        assert (out / ".lspsde.lock").read_text().split()[0] == str(other.pid)  # left alone
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_is_taken_over_and_released(finished, tmp_path, monkeypatch, capsys):
    out = _copy(finished, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lspsde.lock").write_text(f"{dead.pid}\n")
    (out / "parts" / "noise_ablation.nc.123.abc.tmp").write_bytes(b"left by a killed run")
    _counting(monkeypatch, fail=True)
    runner.run_study(parse_study(TINY), out, progress=False)
    assert "stale lock" in capsys.readouterr().err
    assert not (out / ".lspsde.lock").exists()  # released after the run
    assert list(out.rglob("*.tmp")) == []  # a killed run's temporaries are cleaned up


def test_temporaries_are_unique(tmp_path):
    a, b = runner._tmp_name(tmp_path / "x.nc"), runner._tmp_name(tmp_path / "x.nc")
    assert a != b and f".{os.getpid()}." in a.name and a.name.endswith(".tmp")


@pytest.mark.parametrize("which", ["out", "parts"])
def test_an_out_that_is_a_file_is_a_clear_error_before_computing(
    tmp_path, monkeypatch, capsys, which
):
    study = tmp_path / "tiny.toml"
    study.write_text(TINY_TOML)
    out = tmp_path / "study"
    target = out if which == "out" else out / "parts"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("not a directory")
    _counting(monkeypatch, fail=True)
    assert main(["run", str(study), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{target} is a file" in err[0], err


@pytest.mark.parametrize("where", ["out", "parts"])
def test_an_unwritable_directory_is_a_clear_error_before_computing(tmp_path, monkeypatch, where):
    out = tmp_path / "study"
    (out / "parts").mkdir(parents=True)
    target = out if where == "out" else out / "parts"
    target.chmod(0o500)
    try:
        if os.access(target, os.W_OK):
            pytest.skip("running as a user whom chmod does not stop from writing (root)")
        _counting(monkeypatch, fail=True)
        with pytest.raises(StudyOutputError, match=f"Cannot write.*{target}"):
            runner.run_study(parse_study(TINY), out, progress=False)
    finally:
        target.chmod(0o700)


def test_a_figure_that_cannot_be_drawn_does_not_lose_the_report(finished, tmp_path, monkeypatch):
    out = _copy(finished, tmp_path)
    exp = runner._registry()["noise_ablation"]

    def figures(ds):
        raise RuntimeError("no data to draw")

    patched = dataclasses.replace(exp, figures=figures)
    monkeypatch.setattr(runner, "_registry", lambda: {"noise_ablation": patched})
    (out / "report.md").unlink()
    res = runner.run_study(parse_study(TINY), out, progress=False)
    report = (out / "report.md").read_text()
    assert "could not be drawn: RuntimeError: no data to draw" in report
    assert "| theorem |" in report and res.checks


def test_an_all_diverged_grid_is_a_finding(tmp_path, monkeypatch):
    config = parse_study(
        {
            "study": {"name": "all_diverged", "seed": 0},
            "sgd_constant": {
                "eta_over_etamax": [500, 1000],
                "dim": 3,
                "n_paths": 50,
                "n_steps": 40,
                "fit": {"max_points": 10, "num_warmup": 20, "num_samples": 20, "num_chains": 1},
            },
        }
    )
    res = runner.run_study(config, tmp_path, progress=False)
    ds = res.tree["sgd_constant"].to_dataset()
    assert np.all(ds.diverged_fraction.values == 1)
    assert (tmp_path / "results.nc").exists()
    report = (tmp_path / "report.md").read_text()
    assert "could not be drawn" in report  # the stationary figure: nothing to log-scale
    assert "every path diverged at every grid point" in report
    assert "diverged 1.000" in report  # the rows: a finding, not a violation
    assert not [c for c in res.checks if c.holds is False]
    # the rerun loads the part and writes the same report, without crashing
    exp = runner._registry()["sgd_constant"]

    def boom(*args, **kwargs):
        raise AssertionError("a finished experiment was recomputed")

    patched = dataclasses.replace(exp, run=boom)
    monkeypatch.setattr(runner, "_registry", lambda: {"sgd_constant": patched})
    again = runner.run_study(config, tmp_path, progress=False)
    assert [c.measured for c in again.checks] == [c.measured for c in res.checks]
    assert (tmp_path / "report.md").read_text() == report


def test_a_binary_study_file_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(StudyConfigError, match="not a UTF-8 text file"):
        load_study(path)
    assert main(["check", str(path)]) == 2
    assert "not a UTF-8 text file" in capsys.readouterr().err


def test_fit_recursion_rejects_a_non_finite_path_marked_valid():
    t = np.arange(20.0)
    e = 5 * 0.8 ** t[None, :] + 0.1 + 0.05 * np.random.default_rng(0).standard_normal((60, 20))
    e[3, 5] = np.nan
    with pytest.raises(ValueError, match=r"marked valid.*path 3"):
        fit_recursion(t, e, np.ones(60, bool), key=jax.random.key(0))
    t[4] = np.nan
    with pytest.raises(ValueError, match="`steps` must be finite"):
        fit_recursion(t, np.abs(e[:, :]), key=jax.random.key(0))
