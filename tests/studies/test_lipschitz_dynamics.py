"""The *lipschitz_dynamics* study end to end, and the pieces it adds (two sampling orders, the
scaling of one small-noise solve to other batch sizes and orders).

The study runs the shipped file at its ``ci`` size (``[lipschitz_dynamics.sizes.ci]``: fewer
problems, factor levels, paths and steps; outside CI the tests' own mid size, with all three
problems, two label noises and more steps); the assertions are the same at both sizes: the
SDE prediction matches the SGD ensemble within its intervals on the linear teacher-student
baseline, the report names the disagreement of shuffled epochs with its size, and
data-only <= adversarial <= product bound on every path.
"""

import os
from pathlib import Path

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import lspsde
from lspsde.lipschitz import gradient_noise_covariance, spectral_norm_moments
from lspsde.noise import MinibatchNoise
from lspsde.objectives import parameters
from lspsde.study import lipschitz_dynamics as ld
from lspsde.study import runner
from lspsde.study._data import missing_cf
from lspsde.study.schema import StudyConfigError, load_study, parse_study

STUDIES = Path(__file__).parents[2] / "studies"
CI = os.environ.get("LSPSDE_STUDY_SIZE", "ci" if os.environ.get("CI") else "full") == "ci"


def _sized(**larger):
    """The shipped study file at its ci size; outside CI with the values `larger` replacing some
    of the ci size's (the tests' mid size), validated again by the schema."""
    config = load_study(STUDIES / "lipschitz_dynamics.toml", size="ci")
    if CI:
        return config
    doc = config.model_dump(exclude_none=True)
    doc["lipschitz_dynamics"].update(larger)
    return parse_study(doc, source="lipschitz_dynamics.toml (its ci size, enlarged for the test)")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    config = _sized(
        problems=["teacher_student_linear", "teacher_student_mlp", "gaussian_mixture"],
        label_noise=[0.1, 0.3],
        n_steps=120,
    )
    out = tmp_path_factory.mktemp("lipschitz_dynamics")
    res = runner.run_study(config, out, progress=False)
    ds = res.tree["lipschitz_dynamics"].to_dataset()
    return ds, res.checks, out


@pytest.mark.slow
def test_every_variable_is_described_and_round_trips(study):
    ds, _, out = study
    assert missing_cf(ds) == []  # every variable and coordinate has long_name and units
    with xr.open_datatree(out / "results.nc", engine="h5netcdf") as tree:
        xr.testing.assert_identical(tree["lipschitz_dynamics"].to_dataset().load(), ds)
    report = (out / "report.md").read_text()
    assert report.count("## lipschitz_dynamics") == 1
    for png in ("log_bound", "log_bound_noise_shift", "log_bound_variance", "lipschitz",
                "z_scores"):  # fmt: skip
        assert (out / f"lipschitz_dynamics_{png}.png").stat().st_size > 5_000


@pytest.mark.slow
def test_sde_prediction_matches_sgd_on_the_linear_teacher_student(study):
    ds, rows, _ = study
    case = "linear: baseline"
    got = {r.theorem: r for r in rows if r.case == case}
    assert got["SDE of sigma_1: E sigma_1, E log prod"].holds is True
    assert got["SDE of sigma_1: Var sigma_1, Var log prod"].holds is True
    s = ds.sel(case=case).isel(step=slice(1, None))
    bound = float(ds.attrs["z_bound"])
    for z in ("sigma1_z_mean", "sigma1_z_var"):
        assert float(np.nanmax(np.abs(s[z].values[:, 0]))) <= bound
    assert float(np.max(np.abs(s.log_bound_z_mean))) <= bound
    assert float(np.max(np.abs(s.log_bound_z_var))) <= bound
    # the Ito term is resolved: the prediction is not the flow (mean) and not zero (variance)
    assert float(s.sigma1_ito.max()) > 0
    ratio = float(s.log_bound_var[-1] / s.log_bound_pred_var[-1])
    assert 0.75 < ratio < 1.33
    assert float(s.noise_to_gap.max()) < 0.5
    assert float(ds.sel(case=case).tracking_error) < 1e-8


@pytest.mark.slow
def test_the_report_names_the_disagreement_of_shuffled_epochs(study):
    ds, rows, out = study
    report = (out / "report.md").read_text()
    assert "Where prediction and observation disagree" in report
    for problem in map(str, dict.fromkeys(ds.problem.values)):
        label = f"{ld._SHORT[problem]}: order=shuffled"
        var = next(r for r in rows if r.case == label and r.theorem.endswith("Var log prod"))
        # shuffled epochs: the batches of an epoch cancel, the variance is far below the SDE's
        assert var.holds is False and "DISAGREE" in var.note and "%" in var.note
        assert f"**{label}**: variance" in report
        last = ds.sel(case=label)
        assert float(np.min(last.log_bound_var[1:] / last.log_bound_pred_var[1:])) < 0.2
    # no iid case fails
    assert not [r for r in rows if r.holds is False and "shuffled" not in r.case]


@pytest.mark.slow
def test_data_adversarial_and_product_bounds_are_ordered(study):
    ds, rows, _ = study
    assert all(r.holds for r in rows if r.theorem == "Lipschitz bounds at step T")
    data, adv = ds.lipschitz_data.values, ds.lipschitz_adversarial.values
    prod = ds.product_bound.values
    assert np.all(data <= adv * (1 + 1e-9)) and np.all(adv <= prod * (1 + 1e-9))
    # the linear student is its matrix: all three are ||W||_2
    linear = ds.sel(case="linear: baseline")
    np.testing.assert_allclose(linear.lipschitz_adversarial, linear.product_bound, rtol=1e-8)
    np.testing.assert_allclose(linear.lipschitz_data, linear.product_bound, rtol=1e-8)
    # the tanh classifier: the ascent finds more than the data, the product is not tight
    mixture = ds.sel(case="mixture: baseline")
    assert np.all(mixture.lipschitz_adversarial > mixture.lipschitz_data)
    assert np.all(mixture.product_bound > 1.1 * mixture.lipschitz_adversarial)


# --------------------------------------------------------------------------------------------
# The pieces


def _linear_problem(label_noise=0.1, init_scale=1.0):
    cfg = ld.LipschitzDynamics(problems=["teacher_student_linear"])
    prob = ld._problem(cfg, "teacher_student_linear", jax.random.key(0))
    student = ld._student(prob, jax.random.key(1), init_scale)
    return cfg, prob.objective(label_noise, student), parameters(student)


def test_one_small_noise_solve_scales_to_other_batch_sizes_and_orders():
    """The prediction is linear in Sigma = kappa C: the reference solve (B = 8, iid) scaled by
    kappa / kappa_ref equals direct solves for B = 4 and for indices with replacement."""
    cfg, objective, theta0 = _linear_problem()
    n = cfg.n_examples
    kw = dict(n_steps=60, save_every=10, on_degenerate="fallback")
    ref = spectral_norm_moments(objective, MinibatchNoise(8, n), theta0, 0.05, **kw)
    k_ref = ld._kappa("iid", 8, n)
    for order, B, noise in (
        ("iid", 4, MinibatchNoise(4, n)),
        ("with_replacement", 8, ld.MinibatchWithReplacement(8, n)),
    ):
        direct = spectral_norm_moments(objective, noise, theta0, 0.05, **kw)
        scaled = ld._prediction(ref, ld._kappa(order, B, n) / k_ref, 1)
        np.testing.assert_allclose(scaled["sigma1_pred_mean"][:, 0], direct.mean[:, 0],
                                   rtol=1e-9)  # fmt: skip
        np.testing.assert_allclose(scaled["sigma1_pred_var"][:, 0], direct.variance[:, 0],
                                   rtol=1e-6, atol=1e-14)  # fmt: skip
        np.testing.assert_allclose(scaled["log_bound_pred_var"], direct.log_bound_variance,
                                   rtol=1e-6, atol=1e-14)  # fmt: skip


def test_minibatch_with_replacement_has_kappa_one_over_b():
    cfg, objective, theta0 = _linear_problem()
    n, B = cfg.n_examples, 8
    with_r = ld.MinibatchWithReplacement(B, n)
    without = MinibatchNoise(B, n)
    assert with_r.kappa == 1 / B
    c1 = gradient_noise_covariance(objective, with_r, theta0).dense()
    c0 = gradient_noise_covariance(objective, without, theta0).dense()
    np.testing.assert_allclose(c1, c0 * (1 / B) / without.kappa, rtol=1e-12, atol=1e-15)
    # its draws repeat indices (with replacement), and the sample mean of G is grad L
    draws = jax.vmap(lambda k: with_r.sample(k, theta0))(jax.random.split(jax.random.key(0), 4000))
    assert np.mean([len(set(d)) < B for d in np.asarray(draws)]) > 0.2
    G = jax.vmap(lambda u: with_r.gradient(objective, theta0, u))(draws)
    flat = np.asarray(jax.vmap(lambda g: ravel_pytree(g)[0])(G))
    grad = np.asarray(ravel_pytree(objective.gradient(theta0))[0])
    se = flat.std(0) / np.sqrt(flat.shape[0])
    assert np.all(np.abs(flat.mean(0) - grad) < 5 * se + 1e-12)
    # total variance tr(Sigma) within its Monte Carlo interval
    v = np.sum((flat - grad) ** 2, axis=1)
    assert abs(v.mean() - np.trace(np.asarray(c1))) < 4 * v.std() / np.sqrt(v.size)


def test_shuffled_epochs_partition_the_data():
    cfg, objective, theta0 = _linear_problem()
    n, B = cfg.n_examples, 8
    noise = ld.ShuffledMinibatch(B, n, jax.random.key(3))
    m = n // B
    idx = np.stack([np.asarray(noise.at_time(t).sample(jax.random.key(t), theta0))
                    for t in range(3 * m)])  # fmt: skip
    epochs = idx.reshape(3, m * B)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))  # each example once per epoch
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh permutation every epoch
    # at a fixed theta the noise of an epoch sums to zero (the batches partition the data)
    grad = ravel_pytree(objective.gradient(theta0))[0]
    noise_sum = sum(
        ravel_pytree(noise.gradient(objective, theta0, u))[0] - grad for u in jnp.asarray(idx[:m])
    )
    np.testing.assert_allclose(noise_sum, 0.0, atol=1e-12)
    assert noise.assumption1(objective).holds is None
    # inside a learning system the step is bound before every draw (as for the data streams)
    system = lspsde.LearningSystem(objective, lspsde.SGD(0.05), noise)
    drawn = np.stack([np.asarray(system.noise_at(jax.random.key(0), t, theta0))
                      for t in range(m)])  # fmt: skip
    np.testing.assert_array_equal(drawn, idx[:m])


def test_config_errors_name_the_problem():
    good = {"study": {"name": "x"}, "lipschitz_dynamics": {}}
    parse_study(good)
    cases = [
        ({"baseline": {"batch_size": 5}}, "baseline.batch_size = 5 is not one of the levels"),
        ({"batch_size": [8, 12]}, "not a multiple of batch_size 12"),
        ({"label_noise": [0.1, 0.6]}, "flip probability of the classifier"),
        ({"batch_size": [8, 128]}, "exceeds n_examples"),
        ({"order": ["iid", "iid"]}, "distinct orders"),
        ({"order": ["sorted"]}, "order"),
        ({"n_steps": 15}, "fewer than 2 saved steps"),
        ({"lipschitz_paths": 600}, "exceeds n_paths"),
    ]
    for update, needle in cases:
        with pytest.raises(StudyConfigError, match=needle):
            parse_study({**good, "lipschitz_dynamics": update})
    # the mixture's flip probability bound does not apply without the classifier
    parse_study({**good, "lipschitz_dynamics": {
        "problems": ["teacher_student_linear"], "label_noise": [0.1, 0.6]}})  # fmt: skip


def test_cases_vary_one_factor_around_the_baseline():
    cfg = ld.LipschitzDynamics()
    cs = ld.cases(cfg)
    assert len(cs) == 3 * (1 + 2 + 2 + 2 + 2)
    assert len({c["label"] for c in cs}) == len(cs)
    base = cfg.baseline.model_dump()
    for c in cs:
        differs = [f for f in ld.FACTORS if c[f] != base[f]]
        assert differs == ([] if c["factor"] == "baseline" else [c["factor"]])
