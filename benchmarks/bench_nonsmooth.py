"""Generalised (Clarke) against smooth (autodiff) Learning Stability Profile of a ReLU MLP.

Workload (issue 11, "Benchmark"): a ReLU MLP with widths [64, 256, 256, 64, 10] (99,530
parameters, zero biases at initialisation), float32, trained by full-batch gradient descent
(``SGD(0.01)``, exact gradients) on B = 64 fixed random examples (MSE), with 8 probes; the
profile over ``n_steps`` steps saved at t = 0 and T, side by side in the same run:

- ``smooth``: ``learning_profile(system, theta0, ..., generalized=False)`` (autodiff's blocks:
  Lanczos for the parameter and update blocks, exact dense norms for the 256-wide layers);
- ``generalized``: the same call with ``generalized=True``: the same profile plus, at every
  saved step, the Clarke signatures of Definition 6.1 (``GeneralizedSignatures``): each
  layer's pre-activations at every probe, the kinked units counted, the classical norm
  ``||D W_k||`` batched over the probes without kinks, ``generalized_jacobian_norm`` on
  ``[Affine(W_k, b_k), relu]`` for the probes with kinks (past ``max_kinks`` the certified
  product bound), and autodiff's per-probe norms beside them. SGD's own step has no kink, so
  its parameter blocks are autodiff's (no extra work).

Two probe sets: ``generic`` (8 Gaussian inputs: no unit within tol of a kink, so the Clarke
blocks are the classical ones) and ``kinks`` (the zero input and 7 Gaussian ones: with zero
biases every unit of every layer is at its kink at t = 0, 256 kinks per layer, far past the
cap: the product bound). Timing: compile excluded (each route called once first), then
``--repeats`` rounds with the routes interleaved; ratio = generalized / smooth (median of
rounds; paired: the median of per-round ratios). Checks: Clarke and autodiff depth blocks agree
where no unit is at a kink; at the zero input the Clarke signature is the bound ``||W_k||``
where autodiff gives 0.

Run: ``.venv/bin/python benchmarks/bench_nonsmooth.py`` (~2 min on 2 shared cores) or
``--quick`` (smoke test). Results go to ``benchmarks/results/nonsmooth.json``.
"""

import argparse
import json
import os
from pathlib import Path
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax

jax.config.update("jax_enable_x64", False)  # float32, as the other profile benchmarks

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from _rows import environment, row  # noqa: E402

import lspsde  # noqa: E402
import models  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "nonsmooth.json"
WIDTHS = (64, 256, 256, 64, 10)
BATCH = 64
N_PROBES = 8


def problem(probe_set: str):
    k = jax.random.split(jax.random.key(0), 3)
    net = models.mlp(k[0], WIDTHS, init="gaussian", sigma_w=2**0.5, final_activation=False)
    x = jax.random.normal(k[1], (BATCH, WIDTHS[0]))
    y = jax.random.normal(k[2], (BATCH, WIDTHS[-1]))
    probes = x[:N_PROBES]
    if probe_set == "kinks":
        probes = probes.at[0].set(0.0)
    system = lspsde.LearningSystem(
        lspsde.SupervisedLoss(net, x, y), lspsde.SGD(0.01), representation=net, probes=probes
    )
    return system, lspsde.parameters(net), net


def _time(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def compare(probe_set: str, n_steps: int, repeats: int) -> dict:
    system, theta0, net = problem(probe_set)
    n_params = sum(int(np.size(a)) for a in jax.tree.leaves(theta0))
    key = jax.random.key(1)
    kw = dict(key=key, n_steps=n_steps, save_every=n_steps)
    fns = {
        "smooth": lambda: lspsde.learning_profile(system, theta0, **kw),
        "generalized": lambda: lspsde.learning_profile(system, theta0, generalized=True, **kw),
    }
    first, outputs = {}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        outputs[name] = jax.block_until_ready(fn())
        first[name] = time.perf_counter() - start
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(_time(fn))
    smooth, gen = outputs["smooth"], outputs["generalized"]
    g = gen.generalized
    kinks = np.asarray(g.n_kinks_x)
    clarke, auto = np.asarray(g.sigma_x), np.asarray(smooth.sigma_x)
    free = kinks == 0
    rel = np.abs(clarke - auto) / np.maximum(np.abs(auto), 1e-30)
    norms = [float(np.linalg.norm(np.asarray(W), 2)) for W in net.weights]
    # per probe at t = 0 (the profile keeps the sup over probes): probe 0 is the zero input
    rep = lspsde.profile.generalized_representation_profile(net, system.probes)
    med = {name: statistics.median(v) for name, v in runs.items()}
    return {
        "probe_set": probe_set,
        "widths": WIDTHS,
        "n_params": n_params,
        "batch": BATCH,
        "n_probes": N_PROBES,
        "n_steps": n_steps,
        "runs_s": runs,
        "median_s": med,
        "compile_s": {name: first[name] - med[name] for name in fns},
        "ratio": med["generalized"] / med["smooth"],
        "paired_ratio": statistics.median(
            a / b for a, b in zip(runs["generalized"], runs["smooth"], strict=True)
        ),
        "check": {
            "n_kinks_x": kinks.tolist(),
            "exact": bool(g.exact),
            "max_rel_diff_kink_free": float(rel[free].max()) if free.any() else None,
            "clarke_sigma_x_t0": clarke[0].tolist(),
            "autodiff_sigma_x_t0": auto[0].tolist(),
            "probe0_clarke_t0": np.asarray(rep.sigma_x[0]).tolist(),
            "probe0_autodiff_t0": np.asarray(rep.autodiff[0]).tolist(),
            "probe0_exact_t0": np.asarray(rep.exact[0]).tolist(),
            "layer_norms_t0": norms,
            "sigma_theta_equal": bool(np.array_equal(g.sigma_theta, smooth.sigma_theta)),
        },
    }


def rows(results: dict) -> list[dict]:
    out = []
    for r in results["cases"]:
        c = r["check"]
        case = (
            f"ReLU MLP {'-'.join(map(str, r['widths']))} ({r['n_params']:,} params), "
            f"{r['n_probes']} probes, {r['probe_set']}"
        )
        kinks = sum(map(sum, c["n_kinks_x"]))
        note = (
            f"paired {r['paired_ratio']:.2f}x; T = {r['n_steps']} saved at 0 and T; kinks met "
            f"{kinks}, exact {c['exact']}; Clarke = autodiff off kinks to "
            f"{c['max_rel_diff_kink_free']:.1e}"
        )
        if r["probe_set"] == "kinks":
            note += (
                f"; zero input at t = 0, layer 0: Clarke {c['probe0_clarke_t0'][0]:.4g} "
                f"(product bound past the cap, = ||W_0|| = {c['layer_norms_t0'][0]:.4g}), "
                f"autodiff {c['probe0_autodiff_t0'][0]:.4g}"
            )
        out.append(
            row(
                "nonsmooth",
                f"{case}: generalized=True",
                r["median_s"]["generalized"],
                "learning_profile (autodiff only)",
                r["median_s"]["smooth"],
                note,
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-steps", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="2 steps, 2 repeats (smoke test)")
    parser.add_argument("--out", type=Path, help=f"write the JSON here (default {RESULTS})")
    options = parser.parse_args()
    n_steps, repeats = options.n_steps, options.repeats
    if options.quick:
        n_steps, repeats = 2, 2
    results = {
        "environment": environment(),
        "workload": (
            f"learning_profile of GD on a ReLU MLP {WIDTHS} (B = {BATCH}, {N_PROBES} probes), "
            "with and without the generalised (Clarke) signatures"
        ),
        "cases": [compare(p, n_steps, repeats) for p in ("generic", "kinks")],
    }
    results["environment"]["load_average_end"] = os.getloadavg()
    results["rows"] = rows(results)
    for r in results["rows"]:
        print(
            f"{r['case']}: {r['lspsde_s']:.3f} s vs {r['baseline_s']:.3f} s -> "
            f"{r['ratio']:.2f}x ({r['note']})",
            flush=True,
        )
    out_path = options.out or (None if options.quick else RESULTS)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2))
        print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
