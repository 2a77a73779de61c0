"""Reports and figures a reader can trust at a glance (issue 10, section 5).

Each test pins one defect a user reported: a count the table does not show, a summary range
that hides boundaries beyond the grid, a bound "attained" without a reason, a "yes" over
diverged paths, figures whose texts run into each other, a flat tightness plot, an axis
squashed by underflow, a warning while drawing, a fitted slope the report calls undecided.
The datasets come from each experiment's own ``run`` at a tiny size (seconds), or are built
by hand with the variables the figures read.
"""

from pathlib import Path
import re
import warnings

import jax
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import xarray as xr

from lspsde.study import (
    continuous_limit,
    feedforward,
    noise_ablation,
    residual,
    sgd_constant,
    sgd_decreasing,
)
from lspsde.study._data import Variables
from lspsde.study._plot import overlapping_text
from lspsde.study.schema import load_study

matplotlib.use("Agg")

STUDIES = Path(__file__).parents[2] / "studies"
THEOREM = re.compile(r"Theorem|Lemma|Corollary|Section|Assumption")


def _run(module, cfg, seed: int = 0):
    with jax.enable_x64(True):
        return module.run(cfg, jax.random.key(seed), False)


def _figures(module, ds) -> dict:
    with jax.enable_x64(True):
        return module.figures(ds)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# --- datasets, tiny ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quickstart():
    """The quickstart's own feedforward and residual tables, run as written (seconds)."""
    config = load_study(STUDIES / "quickstart.toml")
    return {
        "feedforward": _run(feedforward, config.feedforward_spectral),
        "residual": _run(residual, config.residual_cfl),
    }


@pytest.fixture(scope="module")
def ff():
    cfg = feedforward.FeedforwardSpectral(
        rho=[0.5, 0.9, 1.05],
        depth=[1, 2, 8],
        activation=["identity", "relu", "leaky_relu", "tanh"],
        width=16,
        n_probes=6,
    )
    return _run(feedforward, cfg)


@pytest.fixture(scope="module")
def sgd_const():
    """Below eta_max, and at 6 eta_max where every path diverges within ~30 steps while the
    bound q^t m_0 reaches the float range within the horizon (the overflow of the report)."""
    cfg = sgd_constant.SGDConstant(
        eta_over_etamax=[0.5, 6.0],
        n_paths=60,
        n_steps=400,
        fit={"max_points": 10, "num_warmup": 50, "num_samples": 100, "num_chains": 1},
    )
    return _run(sgd_constant, cfg)


@pytest.fixture(scope="module")
def sgd_dec():
    cfg = sgd_decreasing.SGDDecreasing(
        c_mu=[0.25, 4.0],
        p=[0.75],
        sigma1=[0.0],
        n_paths=50,
        n_steps=1000,
        save_every=10,
        n_sensitivity=2,
    )
    return _run(sgd_decreasing, cfg)


def _limit_dataset(weak_ode: list[float]) -> xr.Dataset:
    """A continuous_limit dataset for one system, by hand: the variables its checks and figures
    read (``continuous_limit._GRID``), with weak and strong errors of order 1 and the given
    weak errors against the gradient flow."""
    ratios = np.array([0.1, 0.2, 0.4, 0.8, 1.5])
    eta = ratios * 1.0
    grid = {name: np.zeros((1, ratios.size)) for name in continuous_limit._GRID}
    grid["eta"][0] = eta
    grid["k"][0] = np.ceil(1.0 / eta)
    grid["weak_sde"][0] = 0.05 * eta
    grid["strong_sde"][0] = 0.2 * eta
    grid["weak_ode"][0] = weak_ode
    for name in ("weak_sde_se", "strong_sde_se", "weak_ode_se"):
        grid[name][0] = 1e-6
    grid["valid"][0] = ratios < 1
    grid["limit_defined"][0] = 1.0
    grid["alpha_gd"][0] = -0.5 - 0.1 * eta
    grid["alpha_gf"][0] = -0.5
    grid["alpha_sgd"][0] = -0.5 - 0.1 * eta
    grid["alpha_sde"][0] = -0.5
    v = Variables()
    for name, values in grid.items():
        v.add(name, ("system", "eta_over_etamax"), values, *continuous_limit._GRID[name])
    v.add("system_note", ("system",), np.array([""]), "where a limit fails for the system")
    depths = np.array([4, 8, 16, 32])
    v.add("residual_error", ("depth",), 1.3 * 2.0 / depths, "max over probes of ||X_L - X(S)||")
    v.add("residual_alpha", ("depth",), -0.08 + 1.0 / depths, "(1/S) log max_x ||dX_L/dX_0||")
    return v.dataset(
        coords={
            "system": (["quadratic"], "learning system", "1"),
            "eta_over_etamax": (ratios, "step ratio eta / eta_max", "1"),
            "depth": (depths, "depth L of the residual network", "layer"),
        },
        attrs={
            "horizon": 1.0,
            "residual_horizon": 2.0,
            "ode_alpha": -0.08,
            "level": 0.95,
            "n_paths": 64,
            "substeps": 32,
        },
    )


# --- reports and counts ---------------------------------------------------------------------


def _claimed(summary: str, pattern: str) -> tuple[int, int]:
    m = re.search(pattern, summary)
    assert m, summary
    return int(m.group(1)), int(m.group(2))


def test_quickstart_claims_exactly_the_cases_its_table_shows(quickstart):
    ds = quickstart["feedforward"]
    rows = feedforward.checks(ds)
    held, n = _claimed(feedforward.summary(ds), r"holds in (\d+) of (\d+) cases")
    # the sentence counts the rows the report shows (and the CLI counts): one per case
    assert n == len(rows) == ds.holds.size
    assert held == sum(r.holds is True for r in rows)
    depths = {int(d) for d in ds.depth.values}
    assert {int(r.case.rsplit("L=", 1)[1]) for r in rows} == depths  # every depth, not the last

    rc = quickstart["residual"]
    rows = residual.checks(rc)
    held, n = _claimed(residual.summary(rc), r"hold in (\d+) of (\d+) finite cases")
    tested = [r for r in rows if r.theorem == "Lemma 4.2 / Thm 4.3" and r.holds is not None]
    assert n == len(tested) and held == sum(r.holds is True for r in tested)


def test_residual_summary_counts_the_boundaries_beyond_the_grid(quickstart):
    ds = quickstart["residual"].copy(deep=True)
    crit = ds.critical_ratio.values
    crit[-1] = [np.inf, 1.8]  # the nonlinear blocks: one boundary beyond the grid
    ds["critical_ratio"] = (ds.critical_ratio.dims, crit, ds.critical_ratio.attrs)
    text = residual.summary(ds)
    part = text.split("`nonlinear`:")[1].split(". A ratio")[0]
    grid_max = float(ds.h_ratio.max())
    assert f"beyond the grid (h* > {grid_max:g} h_max) for 1 of 2" in part, part
    assert "for 1 of 2 values of m" in part, part  # the range says how many it covers
    row = next(r for r in residual.checks(ds) if r.case.startswith("nonlinear, m=0.5:"))
    assert "beyond the grid" in row.measured


def test_leaky_relu_is_not_probed_at_its_kink_and_attained_bounds_say_why(ff):
    # at x = 0 JAX's derivative of leaky_relu is 1 (a convention at the kink): with that probe
    # every D_k read as I and the bound as attained at every depth; at any x != 0 it is not
    assert not bool(ff.probe_at_zero.sel(activation="leaky_relu"))
    assert bool(np.isnan(ff.jacobian_norm_at_zero.sel(activation="leaky_relu")).all())
    deep = ff.tightness.sel(activation="leaky_relu", depth=8)
    assert float(deep.max()) < 0.99
    # tanh attains rho^L at x = 0, legitimately (tanh'(0) = 1, zero biases)
    np.testing.assert_allclose(ff.tightness.sel(activation="tanh"), 1.0, rtol=1e-9)
    for row in feedforward.checks(ff):
        if "attained" in row.note:
            assert re.search(
                r"attained(: the identity| at the probe x = 0| at a probe x != 0)", row.note
            ), row
    assert "probed at x != 0 only" in feedforward.summary(ff)


def test_rows_over_diverged_paths_say_so_and_state_their_criterion(sgd_const):
    ds = sgd_const
    assert float(ds.diverged_fraction.sel(eta_over_etamax=6.0)) == 1.0
    rows = [r for r in sgd_constant.checks(ds) if r.case == "eta = 6 eta_max"]
    for r in rows:
        if r.holds is not None:
            # a verdict over diverged paths says they diverged and what it tested instead
            assert "diverged" in r.note and "holds when" in r.note, r
    bound = next(r for r in rows if r.theorem == "Lemma 5.1 / Thm 5.2(1)")
    assert "tested on the" in bound.note and "every path diverged" in bound.note
    for r in sgd_constant.checks(ds):
        if r.holds is True:
            assert "holds when" in r.note or "diverged fraction 0" in r.predicted, r


# --- figures --------------------------------------------------------------------------------


def test_sgd_constant_figures_draw_without_warnings(sgd_const):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the overflow of a log axis autoscaled to ~1e308
        figs = _figures(sgd_constant, sgd_const)
        for fig in figs.values():
            fig.canvas.draw()


def test_sgd_decreasing_sensitivity_axes_come_from_their_data(sgd_dec):
    ds = sgd_dec.copy(deep=True)
    sens = ds.sensitivity.values
    sens[0, 0, 0, -3:] = 1e-320  # float underflow: not data, it must not set the limits
    ds["sensitivity"] = (ds.sensitivity.dims, sens, ds.sensitivity.attrs)
    fig = _figures(sgd_decreasing, ds)["sensitivity"]
    fig.canvas.draw()
    for ax in (a for a in fig.axes if a.get_visible()):
        lo, hi = ax.get_ylim()
        assert lo > 1e-300
        decades = np.log10(hi / lo)
        for line in ax.get_lines():
            y = np.asarray(line.get_ydata(), dtype=float)
            y = y[np.isfinite(y) & (y > 1e-300)]
            if y.size < 2 or np.ptp(np.log10(y)) < 1e-9:
                continue  # a reference line (y = 1)
            # every curve fills its axis up to a few decades (not squashed by another's range)
            assert decades <= np.ptp(np.log10(y)) + 3, (ax.get_title(), line.get_label())


def test_tightness_figure_shows_the_ratio_per_depth(ff):
    fig = _figures(feedforward, ff)["tightness"]
    ys = np.concatenate(
        [np.asarray(line.get_ydata(), float) for ax in fig.axes for line in ax.get_lines()]
    )
    assert np.ptp(ys) > 0.1  # not flat at 1: relu and leaky_relu fall below rho^L with depth
    xs = {float(x) for ax in fig.axes for line in ax.get_lines() for x in line.get_xdata()}
    assert {float(d) for d in ff.depth.values} <= xs  # depth is on the x axis


def _fit_lines(ax) -> set[str]:
    """Colors of the solid lines without markers (the drawn fits) of an errors panel."""
    return {
        matplotlib.colors.to_hex(line.get_color())
        for line in ax.get_lines()
        if line.get_linestyle() == "-" and line.get_marker() in ("None", None, "")
    }


def test_continuous_limit_draws_only_the_fits_the_report_decides():
    # weak errors against the gradient flow that scatter: a finite fit with a wide interval
    ds = _limit_dataset([1e-2, 1e-3, 1e-1, 3e-3, 1.0])
    rows = {r.theorem: r for r in continuous_limit.checks(ds)}
    assert rows["SGD -> gradient flow, weak"].holds is None
    assert "undecided" in rows["SGD -> gradient flow, weak"].note
    assert rows["SGD -> SDE, weak"].holds is True
    fig = _figures(continuous_limit, ds)["errors"]
    ax = fig.axes[0]
    c = {
        v: matplotlib.colors.to_hex(k)
        for v, k in (("weak_sde", "C0"), ("strong_sde", "C1"), ("weak_ode", "C2"))
    }
    assert _fit_lines(ax) == {c["weak_sde"], c["strong_sde"]}  # no line for the undecided fit
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("undecided" in t for t in legend), legend
    assert not any(re.search(r"slope \d", t) for t in legend), legend


def test_continuous_limit_residual_has_a_slope_one_reference_and_plain_ticks():
    fig = _figures(continuous_limit, _limit_dataset([1e-3, 2e-3, 4e-3, 8e-3, 1.0]))["residual"]
    ax = fig.axes[0]
    ref = [line for line in ax.get_lines() if "slope 1" in line.get_label()]
    assert ref, [line.get_label() for line in ax.get_lines()]
    x, y = (np.asarray(a, float) for a in ref[0].get_data())
    np.testing.assert_allclose(np.diff(np.log(y)) / np.diff(np.log(x)), 1.0)
    fig.canvas.draw()
    assert not [t for t in ax.xaxis.get_ticklabels(minor=True) if t.get_text()]


def _multi_panel(quickstart, ff, sgd_const, sgd_dec) -> dict:
    figs = {}
    for name, module, ds in (
        ("feedforward_quickstart", feedforward, quickstart["feedforward"]),
        ("feedforward", feedforward, ff),
        ("residual_cfl", residual, quickstart["residual"]),
        ("sgd_constant", sgd_constant, sgd_const),
        ("sgd_decreasing", sgd_decreasing, sgd_dec),
        ("continuous_limit", continuous_limit, _limit_dataset([1e-3, 2e-3, 4e-3, 8e-3, 1.0])),
    ):
        for fname, fig in _figures(module, ds).items():
            figs[f"{name}_{fname}"] = fig
    return figs


def test_no_text_runs_into_a_neighbouring_panel(quickstart, ff, sgd_const, sgd_dec):
    figs = _multi_panel(quickstart, ff, sgd_const, sgd_dec)
    clashes = {name: overlapping_text(fig) for name, fig in figs.items()}
    assert not any(clashes.values()), {k: v[:3] for k, v in clashes.items() if v}


def test_every_figure_names_its_theorem(quickstart, ff, sgd_const, sgd_dec):
    for name, fig in _multi_panel(quickstart, ff, sgd_const, sgd_dec).items():
        titles = [fig.get_suptitle(), *(ax.get_title() for ax in fig.axes)]
        assert any(THEOREM.search(t) for t in titles), (name, titles)


def test_noise_ablation_figure_is_readable():
    cfg = noise_ablation.NoiseAblation(
        noise=[
            {"kind": "NoNoise"},
            {"kind": "IsotropicGaussian", "scale": 1.0},
            {"kind": "StudentTNoise", "scale": 1.0, "df": 1.5},
        ],
        n_paths=50,
        n_steps=100,
        n_variance_draws=200,
    )
    fig = _figures(noise_ablation, _run(noise_ablation, cfg))["energy"]
    assert overlapping_text(fig) == []
    assert THEOREM.search(fig.get_suptitle())
