"""The continuous-limit study end to end: SGD against its SDE and ODE limits, residual networks
against their neural-ODE limit, with the places where the limit fails said out loud."""

import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from lspsde.study import runner
from lspsde.study._data import missing_cf
from lspsde.study.schema import StudyConfigError, load_study, parse_study

STUDIES = Path(__file__).parents[2] / "studies"
SIZE = os.environ.get("LSPSDE_STUDY_SIZE", "ci" if os.environ.get("CI") else "full")


def _config():
    """The shipped study file; at CI its ``ci`` size (fewer paths, depths and probes)."""
    return load_study(STUDIES / "continuous_limit.toml", size="ci" if SIZE == "ci" else "full")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("continuous_limit")
    res = runner.run_study(_config(), out, progress=False)
    # every variable and coordinate has long_name and units
    assert missing_cf(res.tree["continuous_limit"].to_dataset()) == []
    return res, out


@pytest.mark.slow
def test_orders_and_failures_are_reported(result):
    res, out = result
    # closed again at once: the resume test below writes results.nc anew
    with xr.open_datatree(out / "results.nc", engine="h5netcdf") as tree:
        ds = tree["continuous_limit"].to_dataset().load()
    assert missing_cf(ds) == []  # results.nc keeps every long_name and unit
    rows = {(r.theorem, str(r.case)): r for r in res.checks}
    # Li-Tai-E: SGD -> SDE weak order 1 on the coupled Gaussian systems, strong order 1 too
    for system in ("quadratic", "two_layer"):
        assert rows[("SGD -> SDE, weak", system)].holds is True
        assert rows[("SGD -> SDE, strong", system)].holds is True
    # heavy tails: no diffusion limit, nothing fitted, said so
    heavy = rows[("SDE limit (Li-Tai-E)", "heavy_tailed")]
    assert heavy.holds is None and "no covariance" in heavy.note
    assert not ds.valid.sel(system="heavy_tailed").any()
    # past eta_max the points are left out of every fit and listed
    for system in ds.system.values:
        row = rows[("limit fails", str(system))]
        assert row.holds is None and "1.5" in row.measured
    # GD's exponent per unit time tends to the gradient flow's
    q = ds.sel(system="quadratic")
    np.testing.assert_allclose(q.alpha_gf, -0.5, atol=1e-6)  # -lambda_min of the Hessian
    ok = q.valid.values.astype(bool)
    gap = np.abs(q.alpha_gd - q.alpha_gf).values[ok]
    assert gap[np.argmin(q.eta.values[ok])] < 0.02
    # residual networks -> neural ODE: order 1 in h
    assert rows[("residual -> neural ODE", "explicit Euler in depth")].holds is True
    violated = [r for r in res.checks if r.holds is False]
    assert not violated, violated
    report = (out / "report.md").read_text()
    assert "limit fails" in report and "no SDE limit" in report


@pytest.mark.slow
def test_resume_reuses_the_finished_part(result):
    res, out = result
    again = runner.run_study(_config(), out, progress=False)
    assert missing_cf(again.tree["continuous_limit"].to_dataset()) == []
    assert [r.measured for r in again.checks] == [r.measured for r in res.checks]


def test_bad_config_is_rejected_before_running():
    with pytest.raises(StudyConfigError, match="eta_over_etamax"):
        parse_study({"study": {"name": "x"}, "continuous_limit": {"eta_over_etamax": [0.1]}})
    with pytest.raises(StudyConfigError, match="systems"):
        parse_study({"study": {"name": "x"}, "continuous_limit": {"systems": ["cubic"]}})
