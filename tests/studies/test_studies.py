"""End-to-end studies through the CLI, the study schema, and resuming.

The shipped study files are run in full locally and at their ``ci`` size in CI (``CI=true`` or
``LSPSDE_STUDY_SIZE=ci``: the ``[EXPERIMENT.sizes.ci]`` tables of the files, what
``lspsde run --size ci`` runs); the mathematical assertions are the same at both sizes.
"""

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from lspsde.cli import main
from lspsde.study import runner
from lspsde.study._data import missing_cf
from lspsde.study.schema import StudyConfigError, load_study, parse_study

STUDIES = Path(__file__).parents[2] / "studies"
SIZE = os.environ.get("LSPSDE_STUDY_SIZE", "ci" if os.environ.get("CI") else "full")


def _described(tree):
    """Every variable and coordinate of every study dataset has CF long_name and units."""
    for name, node in tree.children.items():
        assert missing_cf(node.to_dataset()) == [], name


def _load(name: str):
    """The shipped study file at the test size: at CI its ``ci`` size (fewer grid points, the
    same kinds of case: tight, holding, beyond the hypothesis), else as written."""
    return load_study(STUDIES / f"{name}.toml", size="ci" if SIZE == "ci" else "full")


def test_quickstart_through_the_cli(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["run", str(STUDIES / "quickstart.toml"), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "0 where the predicted bound does not hold" in printed
    tree = xr.open_datatree(out / "results.nc", engine="h5netcdf")
    _described(tree)  # what the file holds describes itself
    ff = tree["feedforward_spectral"].to_dataset()
    rc = tree["residual_cfl"].to_dataset()
    assert bool(ff.holds.all())
    # identity activation with ||W_k|| = rho attains rho^L exactly (Theorem 4.1 is tight)
    np.testing.assert_allclose(ff.tightness.sel(activation="identity"), 1.0, rtol=1e-9)
    # Lemma 4.2 / Theorem 4.3: attained for the shared linear blocks, for every h
    np.testing.assert_allclose(
        rc.alpha_x.sel(kind="linear_shared"), rc.alpha_x_bound.sel(kind="linear_shared"), atol=1e-9
    )
    # Corollary 4.4 is sharp there: the measured boundary is h_max itself
    np.testing.assert_allclose(rc.critical_ratio.sel(kind="linear_shared"), 1.0, atol=1e-5)
    assert bool((rc.critical_ratio.sel(kind="nonlinear") > 1).all())
    report = (out / "report.md").read_text()
    assert "| theorem | case | predicted | measured | holds | note |" in report
    for png in ["feedforward_spectral_alpha_vs_logrho.png", "residual_cfl_phase_diagram.png"]:
        assert (out / png).stat().st_size > 10_000


def test_resume_loads_finished_parts(tmp_path, monkeypatch):
    config = parse_study(
        {
            "study": {"name": "tiny", "seed": 3},
            "feedforward_spectral": {
                "rho": [0.5, 1.1],
                "depth": [3],
                "activation": ["identity"],
                "width": 4,
                "n_probes": 2,
            },
        }
    )
    first = runner.run_study(config, tmp_path, progress=False)
    _described(first.tree)
    part = tmp_path / "parts" / "feedforward_spectral.nc"
    assert part.exists()

    def boom(*args, **kwargs):
        raise AssertionError("a finished experiment was recomputed")

    exp = runner._registry()["feedforward_spectral"]
    monkeypatch.setattr(
        runner,
        "_registry",
        lambda: {"feedforward_spectral": dataclasses.replace(exp, run=boom)},
    )
    second = runner.run_study(config, tmp_path, progress=False)
    _described(second.tree)  # a resumed part keeps its attributes
    xr.testing.assert_identical(
        first.tree["feedforward_spectral"].to_dataset().drop_attrs(),
        second.tree["feedforward_spectral"].to_dataset().drop_attrs(),
    )
    # a changed configuration is recomputed, not silently reused
    changed = config.model_copy(update={"study": config.study.model_copy(update={"seed": 4})})
    with pytest.raises(AssertionError, match="recomputed"):
        runner.run_study(changed, tmp_path, progress=False)


@pytest.mark.slow
def test_feedforward_spectral_study(tmp_path):
    config = _load("feedforward_spectral")
    res = runner.run_study(config, tmp_path, progress=False)
    ds = res.tree["feedforward_spectral"].to_dataset()
    _described(res.tree)
    assert bool(ds.converged.all())
    assert bool(ds.holds.all()), "Theorem 4.1 failed: see report.md"
    np.testing.assert_allclose(ds.tightness.sel(activation="identity"), 1.0, rtol=1e-9)
    # ReLU: at depth 1 (and often 2) the bound is attained exactly -- selected rows of an
    # orthogonal matrix have norm 1, and two active coordinate sets of total size > width
    # intersect -- but deep networks lose directions layer by layer: strictly inside.
    deep = ds.tightness.sel(activation="relu", depth=int(ds.depth.max()))
    assert float(deep.max()) < 0.99
    # the literal sup-exponent is never negative (it includes ||J_0|| = 1)
    assert float(ds.alpha_x_sup.min()) >= 0.0
    assert float(ds.alpha_x.sel(activation="identity").min()) < 0.0


@pytest.mark.slow
def test_mean_field_depth_beside_theorem_4_1(tmp_path):
    config = _load("feedforward_spectral")
    config = config.model_copy(update={"feedforward_spectral": None})
    res = runner.run_study(config, tmp_path, progress=False)
    ds = res.tree["mean_field_depth"].to_dataset()
    _described(res.tree)
    assert bool(ds.converged.all())
    assert bool(ds.holds.all()), "Theorem 4.1 failed on a random network: see report.md"
    assert bool(ds.mean_field_agrees.all()), "typical exponent off mean field: see report.md"
    # ReLU's chi1 = sigma_w^2 / 2 exactly: the edge of chaos is at sigma_w^2 = 2
    np.testing.assert_allclose(ds.chi1.sel(activation="relu"), ds.sigma_w2 / 2, rtol=1e-10)
    # the worst case is far above the typical rate (Theorem 4.1 is not the typical case) ...
    assert float((ds.bound_exponent.mean("network") - ds.typical_mean).min()) > 0.5
    # ... and the typical exponent crosses zero with chi1 (order -> chaos)
    typical = ds.typical_mean.sel(activation="relu")
    assert float(typical.sel(sigma_w2=0.5)) < -0.5 and float(typical.sel(sigma_w2=4.0)) > 0.2
    assert "typical_vs_worst" in " ".join(str(f) for f in res.files)


@pytest.mark.slow
def test_residual_cfl_study(tmp_path):
    config = _load("residual_cfl")
    res = runner.run_study(config, tmp_path, progress=False)
    ds = res.tree["residual_cfl"].to_dataset()
    _described(res.tree)
    ok = ~ds.diverged
    assert bool((ds.holds_theorem | ~ok).all()) and bool((ds.holds_lemma | ~ok).all())
    np.testing.assert_allclose(ds.critical_ratio.sel(kind="linear_shared"), 1.0, atol=1e-5)
    # independent linear blocks and nonlinear blocks: stable at least up to h_max
    assert bool((ds.critical_ratio >= 1 - 1e-5).all())
    # below h_max every case is stable (alpha_x < 0): Corollary 4.4
    below = ds.alpha_x.sel(h_ratio=ds.h_ratio[ds.h_ratio < 1])
    assert float(below.max()) < 0


@pytest.mark.parametrize(
    "doc,needle",
    [
        ({"study": {"name": "x"}}, "runs no experiment"),
        (
            {
                "study": {"name": "x", "sede": 1},
                "residual_cfl": {"m": [1.0], "h_over_hmax": [1.0, 2.0]},
            },
            "study.sede: unknown key",
        ),
        (
            {
                "study": {"name": "x"},
                "feedforward_spectral": {"rho": [0.5], "depth": [2], "widht": 3},
            },
            "widht: unknown key; allowed here: activation, depth",
        ),
        (
            {"study": {"name": "x"}, "feedforward_spectral": {"rho": [0.5], "depth": ["2"]}},
            "depth.0",
        ),
        ({"study": {"name": "x"}, "feedforward_spectral": {"rho": [-0.5], "depth": [2]}}, "rho.0"),
        (
            {
                "study": {"name": "x"},
                "residual_cfl": {"m": [1.0], "h_over_hmax": [1.0], "kind": ["cubic"]},
            },
            "kind.0",
        ),
        (
            {
                "study": {"name": "x"},
                "residual_cfl": {"m": [1.0], "h_over_hmax": [1.0, 2.0], "norm": {"method": "svd"}},
            },
            "norm.method",
        ),
        ({"study": {"name": "x"}, "quantum": {}}, "quantum: unknown key"),
    ],
)
def test_study_schema_errors_name_the_key(doc, needle):
    with pytest.raises(StudyConfigError, match=needle.replace(".", r"\.")):
        parse_study(doc)


def test_cli_reports_bad_files_without_running(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[study]\nname = "x"\n[feedforward_spectral]\nrho = [0.5]\ndepth = [2]\nwidth = "wide"\n'
    )
    assert main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "feedforward_spectral.width" in err and "'wide'" in err
    assert not (tmp_path / "o").exists()
    broken = tmp_path / "broken.toml"
    broken.write_text("[study\n")
    assert main(["check", str(broken)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "missing.toml")]) == 2
    assert main(["check", str(STUDIES / "residual_cfl.toml")]) == 0


def test_each_study_module_declares_its_config_and_is_discovered():
    import pkgutil

    import lspsde.study
    from lspsde.study import Experiment, registry
    from lspsde.study.schema import StudyConfig

    reg = registry()
    infrastructure = {"config", "experiment", "runner", "schema", "status"}
    modules = {
        m.name
        for m in pkgutil.iter_modules(lspsde.study.__path__)
        if not m.name.startswith("_") and m.name not in infrastructure
    }
    # every study module is discovered under its own experiment name, with nothing else
    assert set(reg) == {exp.name for exp in reg.values()}
    assert {exp.run.__module__.rsplit(".", 1)[1] for exp in reg.values()} == modules
    assert {"continuous_limit", "feedforward_spectral", "mean_field_depth"} <= set(reg)
    for name, exp in reg.items():
        assert isinstance(exp, Experiment) and exp.name == name
        # the configuration class lives in the study module itself, beside its experiment
        assert exp.config.__module__ == exp.run.__module__
        assert name in StudyConfig.model_fields
    # every shipped TOML parses into the discovered classes
    for path in STUDIES.glob("*.toml"):
        cfg = load_study(path)
        for name, table in cfg.experiments().items():
            assert isinstance(table, reg[name].config)
