"""The study commands (issue 10): ``validate`` (alias ``check``), ``list``, ``status`` and
``report``; progress and its log lines; Ctrl-C; and an ``--out`` holding another study's
results. Every study here is tiny (one noise model, 50 paths, 40 steps; a 4-wide network) and
most tests reuse one finished run, with experiments replaced by stand-ins that return its
data, so nothing is computed twice."""

import dataclasses
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import h5py
import pytest
import xarray as xr

from lspsde.cli import main
from lspsde.study import registry, runner
from lspsde.study.schema import load_study
from lspsde.study.status import run_status, verify_part

STUDIES = Path(__file__).parents[2] / "studies"

NOISE = """
[noise_ablation]
noise = [{kind = "IsotropicGaussian", scale = 1.0}]
n_paths = 50
n_steps = 40
save_every = 2
n_variance_draws = 200
"""
NETWORK = """
[feedforward_spectral]
rho = [0.5, 1.1]
depth = [3]
activation = ["identity"]
width = 4
n_probes = 2
"""
HEAD = '[study]\nname = "{name}"\nseed = 1\ndescription = "A tiny study. For the tests."\n'


def _study(tmp_path: Path, *tables: str, name: str = "tiny", file: str = "tiny.toml") -> Path:
    path = tmp_path / file
    path.write_text(HEAD.format(name=name) + "".join(tables))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-experiment run through the CLI: its directory, study file and data."""
    root = tmp_path_factory.mktemp("finished")
    study = _study(root, NOISE, NETWORK)
    out = root / "out"
    assert main(["run", str(study), "--out", str(out), "--quiet"]) == 0
    names = ("feedforward_spectral", "noise_ablation")
    data = {n: verify_part(out / "parts" / f"{n}.nc").dataset for n in names}
    return out, study, data


def _copy(finished, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    return out


def _stand_ins(monkeypatch, finished, fail: bool = False, interrupt: str = "") -> list[str]:
    """Replace every experiment's ``run`` by one that records its name and returns the finished
    run's data (raises when ``fail``; Ctrl-C in the experiment ``interrupt``)."""
    calls: list[str] = []
    exps = dict(registry())

    def stand_in(name):
        def run(cfg, key, progress):
            calls.append(name)
            if fail:
                raise AssertionError(f"the experiment {name} ran")
            if name == interrupt:
                raise KeyboardInterrupt
            return finished[2][name].copy()

        return run

    patched = {n: dataclasses.replace(e, run=stand_in(n)) for n, e in exps.items()}
    monkeypatch.setattr(runner, "_registry", lambda: patched)
    return calls


def _change_a_value(part: Path) -> None:
    with xr.open_dataset(part, engine="h5netcdf") as ds:
        name = next(n for n, v in ds.data_vars.items() if v.dtype.kind == "f" and v.size > 1)
    with h5py.File(part, "r+") as f:
        values = f[name][...]
        values.flat[0] += 1.0
        f[name][...] = values


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# --- validate -------------------------------------------------------------------------------


def test_validate_says_what_each_experiment_would_run(tmp_path, monkeypatch, capsys):
    study = _study(tmp_path, NOISE, NETWORK)
    _stand_ins(monkeypatch, None, fail=True)
    assert main(["validate", str(study)]) == 0
    out = capsys.readouterr().out
    assert "study 'tiny' (seed 1), 2 experiments: feedforward_spectral, noise_ablation" in out
    assert "feedforward_spectral: grid rho 2 × depth 1 × activation 1 (2 combinations)" in out
    assert "width 4, n_probes 2" in out
    assert "noise_ablation: grid noise 1 (1 combination); " in out
    assert "1 × 50 paths × 40 steps = 2,000 path-steps" in out
    assert "memory per grid point:" in out and "available" in out
    assert "\nsize: full (the file as written); no other size\n" in out
    assert f"time: `lspsde validate {study} --calibrate` gives a rough estimate" in out
    assert out.strip().endswith("OK (nothing was run)")
    assert main(["check", str(study)]) == 0  # the old name stays
    assert capsys.readouterr().out == out
    assert list(tmp_path.iterdir()) == [study]  # nothing written


def test_validate_covers_every_shipped_study(capsys):
    for path in sorted(STUDIES.glob("*.toml")):
        assert main(["validate", str(path)]) == 0, path
        out = capsys.readouterr().out
        for name in load_study(path).experiments():
            assert f"  {name}: grid " in out


@pytest.mark.parametrize(
    "text,needle",
    [
        (NOISE.replace("n_paths = 50", "n_paths = 5"), "noise_ablation.n_paths"),
        (NETWORK.replace("width = 4", 'width = "wide"'), "feedforward_spectral.width"),
        (NETWORK.replace("rho = [0.5, 1.1]", "rho = []"), "feedforward_spectral.rho"),
        (NETWORK + "\n[quantum]\n", "quantum: unknown key"),
        ("[feedforward_spectral\n", "not valid TOML"),
    ],
)
def test_validate_errors_are_one_line_naming_the_key(tmp_path, capsys, text, needle):
    study = _study(tmp_path, text)
    assert main(["validate", str(study)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: ") and needle in line, line


def test_validate_refuses_a_grid_point_that_cannot_fit_in_memory(tmp_path, monkeypatch, capsys):
    study = _study(tmp_path, NOISE)
    monkeypatch.setenv("LSPSDE_MEMORY_LIMIT", "1000")
    assert main(["validate", str(study)]) == 2
    line = _one_error_line(capsys)
    assert "one grid point needs" in line and "noise_ablation.n_paths" in line, line


# --- list -----------------------------------------------------------------------------------


def test_list_names_the_experiment_kinds_and_the_study_files(tmp_path, monkeypatch, capsys):
    _study(tmp_path, NOISE, NETWORK)
    (tmp_path / "broken.toml").write_text("[study\n")
    assert main(["list", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    for name in registry():
        assert any(line.startswith(f"  {name}  ") for line in out), name
    assert out[-1].startswith("Run one: lspsde run ") and "tiny.toml" in out[-1]
    [tiny] = [line for line in out if line.startswith("  tiny.toml ")]
    assert "[feedforward_spectral, noise_ablation] A tiny study." in tiny
    [broken] = [line for line in out if line.startswith("  broken.toml ")]
    assert "invalid: " in broken and "not valid TOML" in broken
    assert all(len(line) <= 120 for line in out[:-1])  # the last: `Run one: ...`
    # by default: the shipped studies, one line each
    monkeypatch.chdir(STUDIES.parent)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for path in STUDIES.glob("*.toml"):
        assert out.count(f"  {path.name} ") == 1
    assert main(["list", str(tmp_path / "nowhere")]) == 2
    assert "No study directory" in _one_error_line(capsys)


# --- status ---------------------------------------------------------------------------------


def test_status_of_a_finished_run(finished, capsys):
    out = finished[0]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"study 'tiny' (seed 1), from {finished[1].resolve()}; size full; lspsde " in text
    assert "lock: none" in text
    assert "experiments: 2 of 2 done" in text
    assert "  noise_ablation        done      parts/noise_ablation.nc (" in text
    assert "results.nc: current; report.md: present" in text
    assert text.strip().endswith("complete")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # reads only


def test_status_names_damaged_and_missing_parts_and_the_lock(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    _change_a_value(out / "parts" / "noise_ablation.nc")
    (out / "parts" / "feedforward_spectral.nc").unlink()
    (out / "report.md").unlink()
    (out / ".lspsde.lock").write_text(f"{os.getpid()}\n")  # a live process
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "experiments: 0 of 2 done" in text
    assert "feedforward_spectral  missing" in text
    assert "noise_ablation        damaged   checksum mismatch" in text
    assert f"lock: held by pid {os.getpid()}, which is running" in text
    assert "report.md: missing" in text
    assert "next: wait for the running run to finish" in text
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lspsde.lock").write_text(f"{dead.pid}\n")
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"lock: stale (pid {dead.pid} is not running" in text
    assert f"--out {out}` resumes (feedforward_spectral, noise_ablation)" in text


def test_status_done_is_what_a_rerun_loads(finished, tmp_path, monkeypatch):
    out = _copy(finished, tmp_path)
    _change_a_value(out / "parts" / "noise_ablation.nc")
    status = run_status(out)
    assert status.done == ["feedforward_spectral"]
    assert status.parts["noise_ablation"].state == "damaged"
    calls = _stand_ins(monkeypatch, finished)
    runner.run_study(finished[1], out, progress=False)
    assert calls == ["noise_ablation"]  # exactly the parts status did not call done
    assert run_status(out).complete


def test_status_of_a_directory_without_study_json(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    (out / "study.json").unlink()
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "no study.json" in text and "experiments: 2 of 2 done" in text
    assert "results.nc: present" in text
    assert main(["status", str(tmp_path / "nowhere")]) == 2
    assert "No run directory" in _one_error_line(capsys)


# --- report ---------------------------------------------------------------------------------


def test_report_rebuilds_the_report_and_figures_without_recomputing(
    finished, tmp_path, monkeypatch, capsys
):
    out = _copy(finished, tmp_path)
    report = (out / "report.md").read_text()
    figures = sorted(p.name for p in out.glob("*.png"))
    assert figures
    (out / "report.md").unlink()
    for png in out.glob("*.png"):
        png.unlink()
    results = (out / "results.nc").stat().st_mtime_ns
    _stand_ins(monkeypatch, finished, fail=True)
    assert main(["report", str(out)]) == 0
    assert "no experiment was recomputed" in capsys.readouterr().out
    assert (out / "report.md").read_text() == report
    assert sorted(p.name for p in out.glob("*.png")) == figures
    assert (out / "results.nc").stat().st_mtime_ns == results  # current: left alone
    assert not (out / ".lspsde.lock").exists()


def test_report_uses_results_nc_for_a_damaged_part(finished, tmp_path, monkeypatch):
    out = _copy(finished, tmp_path)
    report = (out / "report.md").read_text()
    _change_a_value(out / "parts" / "noise_ablation.nc")
    _stand_ins(monkeypatch, finished, fail=True)
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == report


def test_report_names_the_unfinished_experiments(finished, tmp_path, monkeypatch, capsys):
    out = _copy(finished, tmp_path)
    (out / "parts" / "noise_ablation.nc").unlink()
    (out / "results.nc").unlink()
    report = (out / "report.md").read_text()
    _stand_ins(monkeypatch, finished, fail=True)
    assert main(["report", str(out)]) == 2
    line = _one_error_line(capsys)
    assert "1 of 2 experiments are not finished: noise_ablation (no part)" in line, line
    assert f"`lspsde run {finished[1].resolve()} --out {out}` resumes them" in line
    assert (out / "report.md").read_text() == report  # nothing overwritten
    # results.nc is rebuilt from the parts when it is missing
    (out / "parts" / "noise_ablation.nc").write_bytes(
        (finished[0] / "parts" / "noise_ablation.nc").read_bytes()
    )
    assert main(["report", str(out)]) == 0
    with xr.open_datatree(out / "results.nc", engine="h5netcdf") as tree:
        assert set(tree.children) == {"feedforward_spectral", "noise_ablation"}


def test_report_of_a_directory_that_is_no_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "has no study.json" in _one_error_line(capsys)


# --- another study's directory ---------------------------------------------------------------


def test_an_out_holding_another_study_is_refused_before_computing(
    finished, tmp_path, monkeypatch, capsys
):
    out = _copy(finished, tmp_path)
    other = _study(tmp_path, NETWORK, name="other", file="other.toml")
    record = (out / "study.json").read_text()
    results = (out / "results.nc").read_bytes()
    calls = _stand_ins(monkeypatch, finished, fail=True)
    assert main(["run", str(other), "--out", str(out), "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert "holds the results of another study, 'tiny'" in line, line
    assert "this run is the study 'other'" in line and "another --out" in line
    assert "--force" in line
    assert calls == []
    assert (out / "study.json").read_text() == record
    assert (out / "results.nc").read_bytes() == results
    assert not (out / ".lspsde.lock").exists()
    # a directory written before study.json existed: results.nc names its study
    (out / "study.json").unlink()
    assert main(["run", str(other), "--out", str(out), "--quiet"]) == 2
    assert "another study, 'tiny'" in _one_error_line(capsys)
    # --force replaces it
    calls = _stand_ins(monkeypatch, finished)
    assert main(["run", str(other), "--out", str(out), "--quiet", "--force"]) == 0
    assert "--force: replacing the study 'tiny'" in capsys.readouterr().err
    assert json.loads((out / "study.json").read_text())["study"] == "other"
    assert calls == ["feedforward_spectral"]


def test_a_changed_experiment_of_the_same_study_is_recomputed(
    finished, tmp_path, monkeypatch, capsys
):
    out = _copy(finished, tmp_path)
    changed = _study(tmp_path, NOISE.replace("n_paths = 50", "n_paths = 60"), NETWORK)
    calls = _stand_ins(monkeypatch, finished)
    assert main(["run", str(changed), "--out", str(out), "--quiet"]) == 0
    assert calls == ["noise_ablation"]
    err = capsys.readouterr().err
    assert "[noise_ablation] its configuration changed" in err
    assert "[feedforward_spectral] loaded finished part" in err
    # the log line of a finished experiment gives its wall time
    assert "[noise_ablation] finished in " in err and " s: " in err


def test_reordering_the_tables_reuses_every_part(finished, tmp_path, monkeypatch):
    out = _copy(finished, tmp_path)
    reordered = _study(tmp_path, NETWORK, NOISE)  # the finished run's file has NOISE first
    first, second = load_study(finished[1]), load_study(reordered)
    assert list(first.experiments()) == list(second.experiments())
    assert runner.study_record(first)["experiments"] == runner.study_record(second)["experiments"]
    calls = _stand_ins(monkeypatch, finished, fail=True)
    res = runner.run_study(reordered, out, progress=False)
    assert calls == []
    for name, ds in finished[2].items():
        xr.testing.assert_identical(res.tree[name].to_dataset(), ds)


def test_an_experiments_numbers_do_not_depend_on_the_other_tables(finished, tmp_path):
    # the key of [feedforward_spectral] comes from its name: run alone, it gives the numbers
    # it gave beside [noise_ablation]
    alone = _study(tmp_path, NETWORK)
    res = runner.run_study(alone, tmp_path / "alone", progress=False)
    xr.testing.assert_identical(
        res.tree["feedforward_spectral"].to_dataset(), finished[2]["feedforward_spectral"]
    )


# --- progress and Ctrl-C -------------------------------------------------------------------


def test_progress_is_one_bar_over_experiments_and_quiet_under_ci(
    finished, tmp_path, monkeypatch, capsys
):
    out = _copy(finished, tmp_path)
    for part in (out / "parts").iterdir():
        part.unlink()
    _stand_ins(monkeypatch, finished)
    runner.run_study(finished[1], out, progress=True)
    err = capsys.readouterr().err
    assert "study tiny" in err and "2/2" in err and "experiment" in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.delenv("CI", raising=False)
    assert runner._show_progress()
    monkeypatch.setenv("CI", "true")
    assert not runner._show_progress()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.delenv("CI")
    assert not runner._show_progress()


def test_ctrl_c_says_in_one_line_what_was_kept(finished, tmp_path, monkeypatch, capsys):
    out = _copy(finished, tmp_path)
    (out / "parts" / "noise_ablation.nc").unlink()
    _stand_ins(monkeypatch, finished, interrupt="noise_ablation")
    capsys.readouterr()
    assert main(["run", str(finished[1]), "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("Interrupted: 1 of 2 experiments finished and kept in"), err
    assert "(feedforward_spectral)" in err[-1] and "the same command resumes" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (out / ".lspsde.lock").exists()
    assert list(out.rglob("*.tmp")) == []


def test_a_lock_held_on_another_host_is_never_taken_over(tmp_path, capsys):
    """On shared storage a lock from another host cannot be checked by pid: it is respected,
    and status says where it is held."""
    from lspsde.study.runner import StudyOutputError, _acquire_lock

    out = tmp_path / "out"
    out.mkdir()
    (out / ".lspsde.lock").write_text("12345 some-other-host\n")
    with pytest.raises(StudyOutputError, match="pid 12345 on some-other-host"):
        _acquire_lock(out)
    assert main(["status", str(out)]) == 0
    assert "held by pid 12345 on some-other-host" in capsys.readouterr().out
