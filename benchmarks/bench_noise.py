"""Every noise model: ``lspsde.simulate`` beside a hand-written ``jit(vmap(scan))`` of its law.

The workload (issue 9, "Speed") is SGD on a quadratic, float32,
``simulate((objective, SGD(eta), noise), theta0, key=..., n_paths, n_steps, save="summary")``:
energy and loss recorded at every step, the final theta kept. For each noise model the
baseline is what a JAX user would write by hand for the same stochastic gradient: one
``lax.scan`` per path, ``jax.vmap`` over paths, ``jax.jit`` over all, the step's randomness from
the same counter keys ``fold_in(fold_in(key, p), t)`` (threefry), and the same outputs (energy
``||theta - theta*||^2`` and loss after every step, the final theta). What the baseline leaves
out is what the library adds around the noise model: input checks (``eval_shape`` traces,
~12-15 ms a call here) and the divergence guard (a norm and a ``where`` per step).

Cases (``d`` = 16 and 1,000):

- ``none``, ``isotropic``, ``anisotropic_diag``, ``anisotropic_full``, ``gaussian_s1=0``,
  ``gaussian_s1=0.5``, ``student_t`` (df = 3), ``alpha_stable`` (alpha = 1.5) on the dense
  SPD quadratic of ``bench_simulate.problem`` (eigenvalues in [0.1, 1], theta* = 1, eta = 1);
- ``curvature`` (``CurvatureNoise``, rows drawn with replacement) and ``minibatch``
  (``MinibatchNoise``, without replacement) on ``models.LeastSquares`` of
  ``models.synthetic_regression`` data (n = 5d rows at d = 16, 1.25d at d = 1,000), eta = 1 /
  max_i ||a_i||^2 (every batch step is then a contraction).

Each hand-written baseline draws the same law; where the library's sampler is a fixed
transform of threefry bits the baseline writes the same transform, so both draw the same
numbers and their results are compared (the largest relative difference of the energies over
all steps before simulate's divergence guard froze a path).
``gaussian_s1=0``: the law of ``GaussianNoise(sigma0, 0)`` is that of ``IsotropicGaussian``,
so the baseline draws one normal vector of size d per step.

Timing: a warm-up call of each (compile; reported as first call minus median), then
``--repeats`` rounds (median reported), simulate and the baseline interleaved within each round;
ratios as ratio of medians and (in brackets) median of per-round ratios. Shared-machine noise
is of the order of 10-15 %, so compare the ratios, not the absolute seconds.

Run: ``.venv/bin/python benchmarks/bench_noise.py`` (d = 16 at 4,096 paths x 1,000 steps,
d = 1,000 at 512 paths x 100 steps; ~15 min on 2 shared CPU cores); ``--quick`` (10x fewer steps,
not written) is a smoke test; ``--only CASE`` and ``--dims D`` pick a subset (written only with
``--out``). Results go to ``benchmarks/results/noise.json``.
"""

import argparse
from collections.abc import Callable
import json
import math
import os
from pathlib import Path
import statistics
import sys
import time

sys.path.insert(0, str(Path(__file__).parent))
from _rows import environment, row
from bench_simulate import _time, problem  # also pins OpenBLAS to one thread
import jax
import jax.numpy as jnp
import numpy as np

import lspsde
from models.objectives import LeastSquares, Quadratic, synthetic_regression

RESULTS = Path(__file__).parent / "results" / "noise.json"
# d: (n_paths, n_steps). d = 1,000 is cut to 512 x 100 (the brief: 4,096 x 1,000) so that one
# call takes seconds, not minutes, on 2 shared cores: there the two d x d matrix-vector products
# a step (gradient, loss) dominate both implementations alike.
SIZES = {16: (4_096, 1_000), 1_000: (512, 100)}
SIGMA = 1.0


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


def quadratic(d: int) -> dict:
    prob = problem(d)
    return {
        "objective": Quadratic(prob["H"], prob["theta_star"]),
        "params": {"H": prob["H"], "theta_star": prob["theta_star"]},
        "eta": prob["eta"],
        "theta0": prob["theta0"],
    }


def least_squares(d: int) -> dict:
    n = 5 * d if d <= 64 else (5 * d) // 4  # not a power of two: randint draws two words
    X, y, _ = synthetic_regression(jax.random.key(4321), n, d, 0.5)
    objective = LeastSquares(X, y)
    eta = 1.0 / float(jnp.max(jnp.sum(X**2, axis=1)))
    return {
        "objective": objective,
        "params": {"A": objective.A, "b": objective.b, "theta_star": objective.minimizer()},
        "eta": eta,
        "theta0": jnp.zeros(d),
        "n": n,
    }


def quadratic_loss(P: dict, theta: jax.Array) -> jax.Array:
    e = theta - P["theta_star"]
    return 0.5 * e @ (P["H"] @ e)


def least_squares_loss(P: dict, theta: jax.Array) -> jax.Array:
    r = P["A"] @ theta - P["b"]
    return 0.5 * (r @ r) / P["A"].shape[0]


# --------------------------------------------------------------------------------------------
# Hand-written stochastic gradients: G(theta) for one step from its key k, plain jax.random
# --------------------------------------------------------------------------------------------


def _grad_quadratic(P, theta):
    return P["H"] @ (theta - P["theta_star"])


def g_none(P, theta, k):
    return _grad_quadratic(P, theta)


def g_isotropic(P, theta, k):
    d = theta.shape[0]
    return _grad_quadratic(P, theta) + P["sigma"] / math.sqrt(d) * jax.random.normal(k, (d,))


def g_anisotropic(P, theta, k):
    z = jax.random.normal(k, theta.shape)
    C = P["C"]
    return _grad_quadratic(P, theta) + (C @ z if C.ndim == 2 else C * z)


def g_gaussian_additive(P, theta, k):
    # GaussianNoise(sigma0, 0) has the law of IsotropicGaussian(sigma0): one normal vector.
    d = theta.shape[0]
    return _grad_quadratic(P, theta) + P["sigma0"] / math.sqrt(d) * jax.random.normal(k, (d,))


def g_gaussian_state(P, theta, k):
    d = theta.shape[0]
    e = theta - P["theta_star"]
    z = jax.random.normal(k, (2 * d,))
    pert = P["sigma0"] * z[:d] + P["sigma1"] * jnp.sqrt(e @ e) * z[d:]
    return P["H"] @ e + pert / math.sqrt(d)


def _open_uniform(k, shape, dtype):
    # U(0, 1) on the midpoints of JAX's uniform grid, never 0 (as lspsde's samplers draw it)
    return jax.random.uniform(k, shape, dtype) + 2.0 ** -(jnp.finfo(dtype).nmant + 1)


def g_student_t(P, theta, k):
    # Bailey's polar method, two uniforms per entry (what lspsde.StudentTNoise draws).
    d, df = theta.shape[0], P["df"]
    k1, k2 = jax.random.split(k)
    u1 = _open_uniform(k1, (d,), theta.dtype)
    u2 = jax.random.uniform(k2, (d,))
    t = jnp.cos(2 * jnp.pi * u2) * jnp.sqrt(df * jnp.expm1(-2 / df * jnp.log(u1)))
    return _grad_quadratic(P, theta) + P["sigma"] / math.sqrt(d) * t


def g_alpha_stable(P, theta, k):
    # Chambers-Mallows-Stuck, symmetric (what lspsde.AlphaStableNoise draws).
    d, a = theta.shape[0], P["alpha"]
    kv, kw = jax.random.split(k)
    v = jnp.pi * (_open_uniform(kv, (d,), theta.dtype) - 0.5)
    w = -jnp.log(_open_uniform(kw, (d,), theta.dtype))
    s = jnp.sin(a * v) / jnp.cos(v) ** (1 / a) * (jnp.cos((1 - a) * v) / w) ** ((1 - a) / a)
    return _grad_quadratic(P, theta) + P["sigma"] / math.sqrt(d) * s


def _rows_gradient(P, theta, idx):
    rows = P["A"][idx]
    return rows.T @ (rows @ theta - P["b"][idx]) / idx.shape[0]


def g_curvature(P, theta, k):
    return _rows_gradient(P, theta, jax.random.randint(k, (P["batch"],), 0, P["A"].shape[0]))


def g_minibatch(P, theta, k):
    idx = jax.random.choice(k, P["A"].shape[0], (P["batch"],), replace=False)
    return _rows_gradient(P, theta, idx)


# --------------------------------------------------------------------------------------------
# Cases: (problem, lspsde noise model, hand-written gradient, extra parameters, same numbers?)
# --------------------------------------------------------------------------------------------


def _batch(d: int) -> int:
    return 8 if d <= 64 else 32


def _aniso_scale(d: int) -> jax.Array:
    return jnp.linspace(0.5, 1.5, d) / math.sqrt(d)


def _aniso_matrix(d: int) -> jax.Array:
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(99), (d, d)))
    return q * _aniso_scale(d)


CASES: dict[str, Callable[[int], dict]] = {
    "none": lambda d: dict(
        problem=quadratic(d), noise=lspsde.NoNoise(), grad=g_none, extra={}, same=True
    ),
    "isotropic": lambda d: dict(
        problem=quadratic(d),
        noise=lspsde.IsotropicGaussian(SIGMA),
        grad=g_isotropic,
        extra={"sigma": SIGMA},
        same=True,
    ),
    "anisotropic_diag": lambda d: dict(
        problem=quadratic(d),
        noise=lspsde.AnisotropicGaussian(_aniso_scale(d)),
        grad=g_anisotropic,
        extra={"C": _aniso_scale(d)},
        same=True,
    ),
    "anisotropic_full": lambda d: dict(
        problem=quadratic(d),
        noise=lspsde.AnisotropicGaussian(_aniso_matrix(d)),
        grad=g_anisotropic,
        extra={"C": _aniso_matrix(d)},
        same=True,
    ),
    "gaussian_s1=0": lambda d: dict(
        problem=quadratic(d),
        noise=lspsde.GaussianNoise(SIGMA, 0.0),
        grad=g_gaussian_additive,
        extra={"sigma0": SIGMA},
        same=None,  # decided by a probe below: same numbers iff z0 is normal(k, (d,))
    ),
    "gaussian_s1=0.5": lambda d: dict(
        problem=quadratic(d),
        noise=lspsde.GaussianNoise(SIGMA, 0.5),
        grad=g_gaussian_state,
        extra={"sigma0": SIGMA, "sigma1": 0.5},
        same=True,
    ),
    "student_t": lambda d: dict(
        problem=quadratic(d),
        noise=lspsde.StudentTNoise(SIGMA, 3.0),
        grad=g_student_t,
        extra={"sigma": SIGMA, "df": 3.0},
        same=True,
    ),
    "alpha_stable": lambda d: dict(
        problem=quadratic(d),
        noise=lspsde.AlphaStableNoise(SIGMA, 1.5),
        grad=g_alpha_stable,
        extra={"sigma": SIGMA, "alpha": 1.5},
        same=True,
    ),
    "curvature": lambda d: (
        lambda prob: dict(
            problem=prob,
            noise=lspsde.CurvatureNoise(_batch(d), prob["n"]),
            grad=g_curvature,
            extra={},
            static={"batch": _batch(d)},
            same=True,
        )
    )(least_squares(d)),
    "minibatch": lambda d: (
        lambda prob: dict(
            problem=prob,
            noise=lspsde.MinibatchNoise(_batch(d), prob["n"]),
            grad=g_minibatch,
            extra={},
            static={"batch": _batch(d)},
            same=True,
        )
    )(least_squares(d)),
}


def _same_numbers_s1_zero(d: int) -> bool:
    """Whether GaussianNoise(s, 0).sample's first draw is normal(k, (d,)), as the baseline's."""
    k, theta = jax.random.key(5), jnp.zeros(d)
    z0 = lspsde.GaussianNoise(1.0, 0.0).sample(k, theta)[0]
    return bool(jnp.array_equal(z0, jax.random.normal(k, (d,))))


# --------------------------------------------------------------------------------------------
# The two implementations
# --------------------------------------------------------------------------------------------


def lspsde_impl(case: dict, n_paths: int, n_steps: int) -> Callable[[], dict]:
    prob = case["problem"]
    update = lspsde.SGD(prob["eta"])
    key = jax.random.key(0)

    def run():
        ens = lspsde.simulate(
            (prob["objective"], update, case["noise"]),
            prob["theta0"],
            key=key,
            n_paths=n_paths,
            n_steps=n_steps,
            save="summary",
            progress=False,
        )
        return {
            "final_theta": ens.final_theta,
            "energy": ens.energy,
            "loss": ens.loss,
            "divergence_step": ens.divergence_step,
        }

    return run


def hand_impl(case: dict, n_paths: int, n_steps: int) -> Callable[[], dict]:
    """``jit(vmap(scan))`` by hand: ``theta <- theta - eta G(theta, fold_in(k_p, t))``, energy
    and loss recorded after every step (and at step 0), no divergence guard, no checks."""
    prob = case["problem"]
    grad = case["grad"]
    static = case.get("static", {})
    loss = least_squares_loss if "A" in prob["params"] else quadratic_loss

    @jax.jit
    def run(P, eta, theta0, key):
        P = {**P, **static}
        theta_star = P["theta_star"]

        def record(theta):
            e = theta - theta_star
            return e @ e, loss(P, theta)

        def path(p):
            k_p = jax.random.fold_in(key, p)

            def step(theta, t):
                theta = theta - eta * grad(P, theta, jax.random.fold_in(k_p, t))
                return theta, record(theta)

            final, (energy, lossv) = jax.lax.scan(step, theta0, jnp.arange(n_steps))
            e0, l0 = record(theta0)
            return {
                "final_theta": final,
                "energy": jnp.concatenate([e0[None], energy]),
                "loss": jnp.concatenate([l0[None], lossv]),
            }

        return jax.vmap(path)(jnp.arange(n_paths))

    dtype = prob["theta0"].dtype
    P = {k: jnp.asarray(v, dtype) for k, v in {**prob["params"], **case["extra"]}.items()}
    args = (P, jnp.asarray(prob["eta"], dtype), prob["theta0"], jax.random.key(0))
    return lambda: run(*args)


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def _agreement(lib: dict, hand: dict, same: bool) -> dict:
    """Same numbers: the largest relative |difference| of the energies, over the steps before
    the path diverged in simulate (which freezes it; the baseline has no guard) and where the
    baseline's energy is finite. Same law only: the final mean energies of the paths alive in
    both, and their difference in standard errors."""
    ea, eb = np.asarray(lib["energy"], np.float64), np.asarray(hand["energy"], np.float64)
    div = np.asarray(lib["divergence_step"])
    steps = np.arange(ea.shape[1])[None, :]
    valid = ((div[:, None] < 0) | (steps < div[:, None])) & np.isfinite(eb)
    alive = valid[:, -1]
    out = {
        "expected_same_numbers": same,
        "same_numbers": same,
        "diverged_paths_simulate": int(np.sum(div >= 0)),
        "nonfinite_paths_hand": int(np.sum(~np.all(np.isfinite(eb), axis=1))),
        "final_mean_energy": [float(np.mean(ea[alive, -1])), float(np.mean(eb[alive, -1]))],
    }
    if same:
        rel = np.abs(ea - eb)[valid] / np.maximum(np.abs(eb[valid]), 1e-30)
        out["max_rel_difference_energy"] = float(np.max(rel))
        # the case promises the same draws: say so only when they are (float32 rounding of a
        # 1,000-step recursion stays far below 1e-3)
        out["same_numbers"] = out["max_rel_difference_energy"] < 1e-3
    if not out["same_numbers"]:
        a, b = ea[alive, -1], eb[alive, -1]
        sem = math.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / a.size)
        out["final_energy_z"] = float((np.mean(a) - np.mean(b)) / sem)
    return out


def compare(name: str, d: int, n_paths: int, n_steps: int, repeats: int) -> dict:
    case = CASES[name](d)
    if case["same"] is None:
        case["same"] = _same_numbers_s1_zero(d)
    fns = {"lspsde": lspsde_impl(case, n_paths, n_steps), "hand": hand_impl(case, n_paths, n_steps)}
    first, outputs = {}, {}
    for impl, fn in fns.items():
        start = time.perf_counter()
        outputs[impl] = jax.block_until_ready(fn())
        first[impl] = time.perf_counter() - start
    agreement = _agreement(outputs["lspsde"], outputs["hand"], case["same"])
    del outputs
    runs: dict[str, list[float]] = {impl: [] for impl in fns}
    for _ in range(repeats):
        for impl, fn in fns.items():
            runs[impl].append(_time(fn))
    out: dict = {"case": name, "d": d, "n_paths": n_paths, "n_steps": n_steps}
    for impl in fns:
        median = statistics.median(runs[impl])
        out[impl] = {
            "run_median_s": median,
            "run_all_s": runs[impl],
            "compile_s": first[impl] - median,
        }
    out["ratio"] = out["lspsde"]["run_median_s"] / out["hand"]["run_median_s"]
    out["paired_ratio"] = statistics.median(
        a / b for a, b in zip(runs["lspsde"], runs["hand"], strict=True)
    )
    out["agreement"] = agreement
    out["load_average"] = os.getloadavg()
    return out


def _agreement(a: dict) -> str:
    """How the two runs agree: the same numbers (when the case draws the same keys the same
    way), else the same law, and any diverged paths."""
    if a["same_numbers"]:
        agree = f"same numbers (max rel diff {a['max_rel_difference_energy']:.1e})"
    else:
        agree = f"same law (final energy z = {a['final_energy_z']:+.2f})"
        if a.get("expected_same_numbers"):
            agree += (
                "; expected the same numbers, but they differ (max rel diff "
                f"{a['max_rel_difference_energy']:.1e}): the baseline is stale"
            )
    if a["diverged_paths_simulate"] or a["nonfinite_paths_hand"]:
        agree += (
            f"; {a['diverged_paths_simulate']} paths diverged in simulate, "
            f"{a['nonfinite_paths_hand']} not finite by hand"
        )
    return agree


def _row(r: dict) -> str:
    agree = _agreement(r["agreement"])
    return (
        f"| {r['case']} | {r['d']:,} | {r['n_paths']:,} x {r['n_steps']:,} "
        f"| {r['lspsde']['run_median_s']:.3f} | {r['hand']['run_median_s']:.3f} "
        f"| **{r['ratio']:.2f}x** ({r['paired_ratio']:.2f}) | {agree} |"
    )


NAMES = {
    "none": "NoNoise",
    "isotropic": "IsotropicGaussian(1)",
    "anisotropic_diag": "AnisotropicGaussian(s), diagonal",
    "anisotropic_full": "AnisotropicGaussian(C), full",
    "gaussian_s1=0": "GaussianNoise(1, 0)",
    "gaussian_s1=0.5": "GaussianNoise(1, 0.5)",
    "student_t": "StudentTNoise(1, 3)",
    "alpha_stable": "AlphaStableNoise(1, 1.5)",
    "curvature": "CurvatureNoise",
    "minibatch": "MinibatchNoise",
}


def _name(case: str, d: int) -> str:
    if case in ("curvature", "minibatch"):
        n = 5 * d if d <= 64 else (5 * d) // 4  # as least_squares
        return f"{NAMES[case]}({_batch(d)}, {n})"
    return NAMES.get(case, case)


def rows(results: dict) -> list[dict]:
    """The common rows (``_rows.row``): each noise model against its hand-written scan."""
    out = []
    for r in results["cases"]:
        agree = _agreement(r["agreement"])
        out.append(
            row(
                "noise",
                f"{_name(r['case'], r['d'])}, d={r['d']:,}, {r['n_paths']:,} x {r['n_steps']:,}",
                r["lspsde"]["run_median_s"],
                "hand jit(vmap(scan)), same law",
                r["hand"]["run_median_s"],
                f"paired {r['paired_ratio']:.2f}x; {agree}",
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="10x fewer steps (smoke test)")
    parser.add_argument("--only", action="append", choices=list(CASES), help="run this case")
    parser.add_argument("--dims", type=int, action="append", choices=list(SIZES))
    parser.add_argument("--out", type=Path, help=f"write the JSON here (default {RESULTS})")
    options = parser.parse_args()
    names = options.only or list(CASES)
    dims = options.dims or list(SIZES)
    partial = bool(options.only or options.dims)
    out_path = options.out or (None if (options.quick or partial) else RESULTS)

    dtype = str(jnp.zeros(()).dtype)
    results = {
        "environment": environment(
            lspsde_gaussian_s1_0_same_numbers_as_isotropic=_same_numbers_s1_zero(16),
            dtype=dtype,
            repeats=options.repeats,
        ),
        "workload": (
            'simulate((objective, SGD(eta), noise), theta0, save="summary") (energy and loss at '
            "every step) vs jit(vmap(scan)) by hand with the same counter keys and outputs"
        ),
        "cases": [],
    }
    print(
        f"dtype {dtype}; median of {options.repeats} interleaved rounds after a warm-up call; "
        "ratio of medians (median of per-round ratios)"
    )
    print("| case | d | paths x steps | simulate s | hand s | ratio | agreement |")
    print("|---|---|---|---|---|---|---|")
    for d in dims:
        n_paths, n_steps = SIZES[d]
        if options.quick:
            n_steps //= 10
        for name in names:
            r = compare(name, d, n_paths, n_steps, options.repeats)
            results["cases"].append(r)
            print(_row(r), flush=True)
    results["environment"]["load_average_end"] = os.getloadavg()
    results["rows"] = rows(results)
    if out_path is not None:
        out_path.parent.mkdir(exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2))
        print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
