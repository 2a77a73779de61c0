"""Named sizes of a study file (issue 10): ``[EXPERIMENT.sizes.NAME]`` tables, ``lspsde run
--size``, ``lspsde validate --size`` and ``lspsde validate --calibrate``.

The studies here are tiny (one noise model, 50 paths and 40 steps at size ci; a 4-wide network)
so that every test takes a few seconds."""

import copy
import dataclasses
import json
from pathlib import Path
import re
import tempfile
import tomllib

import h5netcdf
import pytest

from lspsde import cli
from lspsde.cli import main
from lspsde.study import registry, runner
from lspsde.study.schema import StudyConfigError, load_study, parse_study
from lspsde.study.status import run_status

STUDIES = Path(__file__).parents[2] / "studies"

NETWORK = {"rho": [0.5, 0.9, 1.1], "depth": [2, 3], "activation": ["identity"], "width": 4}
DOC = {
    "study": {"name": "sized", "seed": 2},
    "feedforward_spectral": {
        **NETWORK,
        "norm": {"method": "dense", "max_steps": 32},
        "sizes": {"ci": {"rho": [0.5, 1.1], "norm": {"max_steps": 8}}, "mid": {"width": 3}},
    },
    "residual_cfl": {"m": [0.5, 1.0], "h_over_hmax": [0.5, 2.0]},
}

TINY = """
[study]
name = "tiny"
seed = 1

[noise_ablation]
noise = [{kind = "IsotropicGaussian", scale = 1.0}]
n_paths = 400
n_steps = 100
save_every = 2
n_variance_draws = 200

[noise_ablation.sizes.ci]
n_paths = 50
n_steps = 40

[feedforward_spectral]
rho = [0.5, 1.1]
depth = [3]
activation = ["identity"]
width = 4
n_probes = 2
"""
NETWORK_CI = "\n[feedforward_spectral.sizes.ci]\nwidth = 3\n"


def _tiny(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# --- parsing --------------------------------------------------------------------------------


def test_a_size_is_merged_into_its_table_and_full_is_the_file_as_written():
    before = copy.deepcopy(DOC)
    full = parse_study(DOC)
    ci = parse_study(DOC, size="ci")
    assert DOC == before  # the document is not changed
    ff, ff_ci = full.feedforward_spectral, ci.feedforward_spectral
    assert (full.size, ci.size) == ("full", "ci")
    assert ff.rho == [0.5, 0.9, 1.1] and ff.norm.max_steps == 32
    # lists and scalars replaced; a sub-table merged key by key (norm.method kept)
    assert ff_ci.rho == [0.5, 1.1]
    assert (ff_ci.norm.method, ff_ci.norm.max_steps) == ("dense", 8)
    assert (ff_ci.depth, ff_ci.width) == (ff.depth, ff.width)  # not in the size: as written
    # residual_cfl declares no size: it runs as written at every size
    assert ci.residual_cfl == full.residual_cfl
    assert parse_study(DOC, size="mid").feedforward_spectral.width == 3
    assert full.declared_sizes == ("ci", "mid")
    assert full.has_size("feedforward_spectral", "ci")
    assert not full.has_size("residual_cfl", "ci")
    assert full.size_tables["feedforward_spectral"]["ci"] == {
        "rho": [0.5, 1.1],
        "norm": {"max_steps": 8},
    }
    # the size survives a copy, and is not part of the configuration's values
    assert ci.model_copy(update={"residual_cfl": None}).size == "ci"
    assert "sizes" not in ci.model_dump()["feedforward_spectral"]
    # without any sizes table a file parses as before
    plain = parse_study({"study": {"name": "x"}, "feedforward_spectral": NETWORK})
    assert plain.size == "full" and plain.declared_sizes == ()


@pytest.mark.parametrize(
    "size_table,needle",
    [
        (
            {"widht": 3},
            "feedforward_spectral.sizes.ci.widht: unknown key; allowed here: activation, depth, "
            "init, n_probes, norm, rho, width (in the size table [feedforward_spectral.sizes.ci])",
        ),
        (
            {"norm": {"meth": "dense"}},
            "feedforward_spectral.sizes.ci.norm.meth: unknown key; allowed here: max_steps, "
            "method, rtol (in the size table [feedforward_spectral.sizes.ci])",
        ),
        (
            {"width": "wide"},
            "feedforward_spectral.sizes.ci.width: Input should be a valid integer (got 'wide') "
            "(in the size table [feedforward_spectral.sizes.ci])",
        ),
        ({"rho": [-0.5]}, "feedforward_spectral.sizes.ci.rho.0: "),
    ],
)
def test_a_bad_key_in_a_size_table_names_the_key_and_the_size_table(size_table, needle):
    doc = {"study": {"name": "x"}, "feedforward_spectral": {**NETWORK, "sizes": {"ci": size_table}}}
    with pytest.raises(StudyConfigError) as e:
        parse_study(doc, source="x.toml", size="ci")
    assert str(e.value).startswith("Invalid study file x.toml at size 'ci':\n")
    assert needle in str(e.value), str(e.value)
    parse_study(doc)  # at full the size table is not used


def test_an_error_in_the_table_itself_is_not_blamed_on_the_size_table():
    doc = {
        "study": {"name": "x"},
        "feedforward_spectral": {**NETWORK, "widht": 3, "sizes": {"ci": {"width": 2}}},
    }
    with pytest.raises(StudyConfigError) as e:
        parse_study(doc, size="ci")
    assert "  feedforward_spectral.widht: unknown key; allowed here:" in str(e.value)
    assert "sizes" not in str(e.value)


def test_an_unknown_size_names_the_sizes_the_file_declares():
    with pytest.raises(StudyConfigError, match="declares no size 'medium'; its sizes are ci, mid"):
        parse_study(DOC, source="x.toml", size="medium")
    with pytest.raises(StudyConfigError, match="declares no sizes at all"):
        parse_study({"study": {"name": "x"}, "feedforward_spectral": NETWORK}, size="ci")


@pytest.mark.parametrize(
    "sizes,needle",
    [
        (3, "feedforward_spectral.sizes must be a table of size tables, got 3"),
        ([{"rho": [0.5]}], "feedforward_spectral.sizes must be a table of size tables"),
        ({"ci": 200}, "[feedforward_spectral.sizes.ci] must be a table of keys of"),
        ({"full": {"width": 2}}, "the size 'full' is always the file as written"),
    ],
)
def test_a_malformed_sizes_is_a_clear_error(sizes, needle):
    doc = {"study": {"name": "x"}, "feedforward_spectral": {**NETWORK, "sizes": sizes}}
    with pytest.raises(StudyConfigError) as e:
        parse_study(doc, source="x.toml")
    assert needle in str(e.value) and str(e.value).startswith("Invalid study file x.toml: ")


def test_sizes_in_the_study_table_are_an_unknown_key():
    doc = {"study": {"name": "x", "sizes": {"ci": {"seed": 1}}}, "feedforward_spectral": NETWORK}
    with pytest.raises(StudyConfigError, match=r"study\.sizes: unknown key"):
        parse_study(doc)


def test_every_shipped_study_declares_ci_for_every_experiment_table():
    paths = sorted(STUDIES.glob("*.toml"))
    assert len(paths) >= 10
    for path in paths:
        data = tomllib.loads(path.read_text())
        tables = [n for n in data if n != "study"]
        assert tables, path
        for name in tables:
            assert isinstance(data[name].get("sizes", {}).get("ci"), dict), (path, name)
        full, ci = load_study(path), load_study(path, size="ci")
        assert ci.size == "ci" and full.declared_sizes == ("ci",), path
        assert list(ci.experiments()) == list(full.experiments()) == sorted(tables)
        for name in tables:
            assert ci.has_size(name, "ci")
            # a ci size is no larger than the file: every grid axis as short or shorter
            small = {p.name: p for p in runner.plan_study(ci)}[name]
            big = {p.name: p for p in runner.plan_study(full)}[name]
            assert all(small.grid[k] <= v for k, v in big.grid.items()), (path, name)
            assert all(small.sizes[k] <= v for k, v in big.sizes.items()), (path, name)
        if path.stem != "quickstart":  # the quickstart is small already: ci is the file
            assert ci.model_dump() != full.model_dump(), path


# --- run --size -----------------------------------------------------------------------------


def _stand_ins(monkeypatch, data) -> list[str]:
    """Every experiment's ``run`` replaced by one that records its name and returns `data`."""
    calls: list[str] = []

    def stand_in(name):
        def run(cfg, key, progress):
            calls.append(name)
            return data[name].copy()

        return run

    patched = {n: dataclasses.replace(e, run=stand_in(n)) for n, e in registry().items()}
    monkeypatch.setattr(runner, "_registry", lambda: patched)
    return calls


def test_run_at_size_ci_records_the_size_everywhere(tmp_path, monkeypatch, capsys):
    study = _tiny(tmp_path)
    out = tmp_path / "out"
    assert main(["run", str(study), "--out", str(out), "--size", "ci", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert re.search(rf"wrote \d+ files to {re.escape(str(out))} \(size ci\):", captured.out)
    # the table without a ci size is said to run as written
    assert "[feedforward_spectral] declares no [feedforward_spectral.sizes.ci] table" in (
        captured.err
    )
    names = ("feedforward_spectral", "noise_ablation")
    data = {n: runner.verify_part(out / "parts" / f"{n}.nc").dataset for n in names}
    record = json.loads((out / "study.json").read_text())
    assert record["size"] == "ci"
    assert record["config"]["noise_ablation"]["n_paths"] == 50  # the ci values ran
    assert record["config"]["feedforward_spectral"]["width"] == 4
    with h5netcdf.File(out / "results.nc", "r") as f:
        assert f.attrs["size"] == "ci"
        assert json.loads(f.groups["noise_ablation"].attrs["config"])["n_steps"] == 40
    report = (out / "report.md").read_text()
    assert "seed 1, size: ci (the study file with its `[EXPERIMENT.sizes.ci]` tables" in report
    # status and report show the size; resuming keeps it
    assert main(["status", str(out)]) == 0
    assert "; size ci; lspsde " in capsys.readouterr().out
    assert run_status(out).size == "ci"
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert "(size ci):" in capsys.readouterr().out
    assert (out / "report.md").read_text() == report
    part = out / "parts" / "noise_ablation.nc"
    kept = part.read_bytes()
    part.unlink()
    (out / "results.nc").unlink()
    assert main(["status", str(out)]) == 0
    resume = f"`lspsde run {study.resolve()} --out {out} --size ci` resumes (noise_ablation)"
    assert resume in capsys.readouterr().out
    assert main(["report", str(out)]) == 2
    assert f"`lspsde run {study.resolve()} --out {out} --size ci` resumes them" in _error(capsys)
    part.write_bytes(kept)

    # a full run into the same directory does not use the ci run's part of noise_ablation (its
    # configuration differs); feedforward_spectral, the same at both sizes, is loaded
    calls = _stand_ins(monkeypatch, data)
    assert main(["run", str(study), "--out", str(out), "--quiet"]) == 0
    assert calls == ["noise_ablation"]
    assert "[noise_ablation] its configuration changed" in capsys.readouterr().err
    assert json.loads((out / "study.json").read_text())["size"] == "full"
    assert "seed 1, size: full (the study file as written)" in (out / "report.md").read_text()
    assert main(["status", str(out)]) == 0
    assert "; size full; lspsde " in capsys.readouterr().out


def test_run_study_takes_a_size_for_a_file_and_checks_it_for_a_config(tmp_path, monkeypatch):
    study = _tiny(tmp_path)
    seen = {}

    def record(name):
        def run(cfg, key, progress):
            seen[name] = cfg
            raise KeyboardInterrupt  # stop before anything is computed

        return run

    patched = {n: dataclasses.replace(e, run=record(n)) for n, e in registry().items()}
    monkeypatch.setattr(runner, "_registry", lambda: patched)
    with pytest.raises(KeyboardInterrupt):
        runner.run_study(study, tmp_path / "out", progress=False, size="ci")
    assert json.loads((tmp_path / "out" / "study.json").read_text())["size"] == "ci"
    assert (
        json.loads((tmp_path / "out" / "study.json").read_text())["config"]["noise_ablation"][
            "n_paths"
        ]
        == 50
    )
    assert seen["feedforward_spectral"].width == 4
    config = load_study(study, size="ci")
    with pytest.raises(ValueError, match="parsed at size 'ci'"):
        runner.run_study(config, tmp_path / "other", size="full")
    assert not (tmp_path / "other").exists()
    with pytest.raises(StudyConfigError, match="declares no size 'mid'"):
        runner.run_study(study, tmp_path / "other", size="mid")


def test_run_with_an_unknown_size_fails_before_writing(tmp_path, capsys):
    study = _tiny(tmp_path)
    out = tmp_path / "out"
    assert main(["run", str(study), "--out", str(out), "--size", "mid"]) == 2
    line = _error(capsys)
    assert "declares no size 'mid'; its sizes are ci" in line and "full" in line, line
    assert not out.exists()


# --- validate --size and --calibrate --------------------------------------------------------


def test_validate_at_a_size(tmp_path, monkeypatch, capsys):
    study = _tiny(tmp_path)
    _stand_ins(monkeypatch, {})  # nothing may run: a stand-in without data would fail
    assert main(["validate", str(study)]) == 0
    full = capsys.readouterr().out
    assert "size: full (the file as written); it also declares ci (--size NAME)" in full
    assert "1 × 400 paths × 100 steps = 40,000 path-steps" in full
    assert f"time: `lspsde validate {study} --calibrate` gives a rough estimate" in full
    assert full.strip().endswith("OK (nothing was run)")
    assert main(["validate", str(study), "--size", "ci"]) == 0
    ci = capsys.readouterr().out
    assert "size: ci (each [EXPERIMENT.sizes.ci] table merged into" in ci
    assert "    size ci: [noise_ablation.sizes.ci] sets n_paths, n_steps" in ci
    assert "1 × 50 paths × 40 steps = 2,000 path-steps" in ci
    assert "    size ci: no [feedforward_spectral.sizes.ci] table, so it runs as written" in ci
    assert f"`lspsde validate {study} --size ci --calibrate`" in ci
    assert ci.strip().endswith("OK (nothing was run)")
    assert main(["check", str(study), "--size", "big"]) == 2
    assert "declares no size 'big'" in _error(capsys)
    assert list(tmp_path.iterdir()) == [study]  # nothing written


def test_validate_at_size_ci_for_every_shipped_study(capsys):
    for path in sorted(STUDIES.glob("*.toml")):
        assert main(["validate", str(path), "--size", "ci"]) == 0, path
        out = capsys.readouterr().out
        assert "size: ci (" in out and "table, so it runs as written" not in out, path
        for name in load_study(path).experiments():
            assert f"  {name}: grid " in out and f"    size ci: [{name}.sizes.ci] " in out


def test_calibrate_extrapolates_linearly_in_path_steps(tmp_path, monkeypatch, capsys):
    study = _tiny(tmp_path, TINY.replace("n_probes = 2\n", "n_probes = 2\n" + NETWORK_CI))
    asked = []

    def fake(config, names):
        asked.append((config.size, list(names), config.noise_ablation.n_paths))
        return {n: 3.0 for n in names}

    monkeypatch.setattr(cli, "calibrate", fake)
    assert main(["validate", str(study), "--calibrate"]) == 0
    out = capsys.readouterr().out
    # only the ensemble experiment is run, at its ci size; the network has no path-steps
    assert asked == [("ci", ["noise_ablation"], 50)]
    # 3 s for 2,000 path-steps -> 60 s for 40,000
    assert (
        "  noise_ablation: calibrated at size ci: 3.0 s for 2.0k path-steps; estimated "
        "1 min 00 s for 40.0k path-steps (size full)"
    ) in out
    assert "  feedforward_spectral: no estimate available (no path-step count" in out
    assert "estimated total: 1 min 00 s for the 1 experiment with an estimate" in out
    assert "rough linear extrapolation in path-steps" in out and "leans high" in out
    assert "includes JIT compilation" in out
    assert "--calibrate` gives" not in out
    assert out.strip().endswith("nothing was written beside the study)")
    # at size ci the estimate is the calibration itself
    assert main(["validate", str(study), "--size", "ci", "--calibrate"]) == 0
    out = capsys.readouterr().out
    assert "3.0 s for 2.0k path-steps (the size asked for: the estimate is this time)" in out
    assert "estimated total: 3.0 s" in out
    # a table without a ci size has no estimate, and nothing is run for it
    asked.clear()
    study.write_text(TINY.replace("[noise_ablation.sizes.ci]\nn_paths = 50\nn_steps = 40\n", ""))
    assert main(["validate", str(study), "--calibrate"]) == 0
    out = capsys.readouterr().out
    assert asked == []
    assert "  noise_ablation: no estimate available (no [noise_ablation.sizes.ci] table" in out
    assert "estimated total" not in out


def test_calibrate_runs_each_experiment_once_in_a_temporary_directory(
    tmp_path, monkeypatch, capsys
):
    study = _tiny(tmp_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    ran = []
    real = runner.run_study

    def spy(config, out, **kw):
        ran.append((Path(out), config.size, list(config.experiments())))
        return real(config, out, **kw)

    monkeypatch.setattr(runner, "run_study", spy)
    assert main(["validate", str(study), "--calibrate"]) == 0
    out = capsys.readouterr().out
    [(where, size, names)] = ran
    assert where.parent == scratch and size == "ci" and names == ["noise_ablation"]
    assert list(scratch.iterdir()) == []  # removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scratch", "tiny.toml"]
    m = re.search(r"noise_ablation: calibrated at size ci: ([\d.]+) s for 2\.0k path-steps; "
                  r"estimated (.+) for 40\.0k path-steps \(size full\)", out)  # fmt: skip
    assert m, out
    assert 0 < float(m.group(1)) < 600
    assert "feedforward_spectral: no estimate available" in out
