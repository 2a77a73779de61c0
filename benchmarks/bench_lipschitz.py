"""Tracking overhead: ``spectral_norm_trajectory`` against the same SGD without tracking.

Workload (issue 12, "Benchmark"): an MLP with widths [256, 1024, 512, 256, 10] (921,866
parameters: four weight matrices, 919,552 weights), ReLU, He init, float32, MSE on a batch of
B = 64 fixed random examples; one step is one gradient step on that batch (``LearningSystem``
with ``SGD(0.01)`` and exact gradients of the batch loss: the cost of one minibatch-SGD step at
B = 64). Implementations, run side by side:

- ``plain``: ``jax.jit`` of a ``lax.scan`` of ``system.parameter_map`` over ``n_steps`` steps (the
  same iteration as ``lspsde.parameter_trajectory``, final theta only): SGD without tracking.
- ``tracked n_iter=k``: ``lspsde.lipschitz.spectral_norm_trajectory(system, theta0, ...,
  n_iter=k)``: the same steps, plus at every step k warm-started power iterations per layer
  (k products with W and k with W^T), sigma_1 per layer, the product bound and the residual,
  plus the Lanczos start at step 0 (timed alone as ``init_vectors``).

Timing: compile excluded (each called once first), then ``--repeats`` rounds with the
implementations interleaved in each round. Each runs ``n_steps / 5`` and ``n_steps`` steps; the
cost per step is the slope between the two (median over rounds), so per-call fixed costs (input
checks and one-step ``eval_shape``, dispatch, the Lanczos start) do not count as per-step
overhead; they are reported apart, with the whole-call ratio. Check: the tracked final sigma_1
against LAPACK's SVD of the final weights, and the final theta against ``plain``'s.

Run: ``.venv/bin/python benchmarks/bench_lipschitz.py`` (~1-2 minutes on 2 shared cores);
``--quick`` is a smoke test. Results go to ``benchmarks/results/lipschitz.json``.
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
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from _rows import environment, row

import lspsde
from lspsde.objectives import SupervisedLoss, parameters
from lspsde.system import LearningSystem
import models

RESULTS = Path(__file__).parent / "results" / "lipschitz.json"
WIDTHS = (256, 1024, 512, 256, 10)
BATCH = 64


def problem():
    k = jax.random.split(jax.random.key(0), 3)
    net = models.mlp(k[0], WIDTHS, init="gaussian", sigma_w=2**0.5, final_activation=False)
    x = jax.random.normal(k[1], (BATCH, WIDTHS[0]))
    y = jax.random.normal(k[2], (BATCH, WIDTHS[-1]))
    system = LearningSystem(SupervisedLoss(net, x, y), lspsde.SGD(0.01))
    return system, parameters(net)


def plain_impl(system, theta0, n_steps):
    @jax.jit
    def run(system, theta0, key):
        def body(theta, t):
            return system.parameter_map(t, theta, system.noise_at(key, t, theta)), None

        return jax.lax.scan(body, theta0, jnp.arange(n_steps))[0]

    key = jax.random.key(1)
    return lambda: run(system, theta0, key)


def tracked_impl(system, theta0, n_steps, n_iter):
    key = jax.random.key(1)
    return lambda: lspsde.lipschitz.spectral_norm_trajectory(
        system, theta0, key=key, n_steps=n_steps, n_iter=n_iter
    )


def _time(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def compare(n_steps: int, repeats: int, n_iters: tuple[int, ...]) -> dict:
    """Each implementation at ``n_short = n_steps // 5`` and ``n_steps`` steps: the marginal
    cost per step is the slope, (t(n_steps) - t(n_short)) / (n_steps - n_short), free of the
    per-call fixed costs (input checks, dispatch, the Lanczos start), reported apart."""
    system, theta0 = problem()
    n_params = sum(int(np.size(a)) for a in jax.tree.leaves(theta0))
    n_short = max(1, n_steps // 5)
    lengths = (n_short, n_steps)
    fns = {}
    for n in lengths:
        fns[f"plain_{n}"] = plain_impl(system, theta0, n)
        for k in n_iters:
            fns[f"tracked_n_iter_{k}_{n}"] = tracked_impl(system, theta0, n, k)
    fns["init_vectors"] = lambda: lspsde.lipschitz.init_vectors(theta0)
    first, checks = {}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        output = jax.block_until_ready(fn())
        first[name] = time.perf_counter() - start
        if name == f"plain_{n_steps}":
            final = output
        if name.startswith("tracked") and name.endswith(f"_{n_steps}"):
            checks[name.removesuffix(f"_{n_steps}")] = output
    exact = np.array([np.linalg.svd(np.asarray(W), compute_uv=False)[0] for W in final.weights])
    for name, tr in list(checks.items()):
        checks[name] = {
            "max_rel_err_final_sigma": float(np.max(np.abs(np.asarray(tr.sigma[-1]) / exact - 1))),
            "max_residual": float(jnp.max(tr.residual)),
            "max_abs_diff_final_theta": max(
                float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(
                    jax.tree.leaves(final), jax.tree.leaves(tr.final_theta), strict=True
                )
            ),
            "final_sigma": [float(s) for s in tr.sigma[-1]],
            "final_log_bound": float(tr.log_bound[-1]),
        }
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(_time(fn))
    out: dict = {
        "widths": WIDTHS,
        "n_params": n_params,
        "batch": BATCH,
        "n_steps": n_steps,
        "n_short": n_short,
        "init_vectors_s": statistics.median(runs["init_vectors"]),
        "runs_s": runs,
        "compile_s": {name: first[name] - statistics.median(runs[name]) for name in fns},
    }

    def per_step(prefix):
        """Median over rounds of the slope, and the slopes of every round."""
        slopes = [
            (b - a) / (n_steps - n_short)
            for a, b in zip(runs[f"{prefix}_{n_short}"], runs[f"{prefix}_{n_steps}"], strict=True)
        ]
        return statistics.median(slopes), slopes

    plain, plain_slopes = per_step("plain")
    out["plain"] = {"per_step_s": plain, "call_s": statistics.median(runs[f"plain_{n_steps}"])}
    for k in n_iters:
        name = f"tracked_n_iter_{k}"
        step, slopes = per_step(name)
        call = statistics.median(runs[f"{name}_{n_steps}"])
        out[name] = {
            "per_step_s": step,
            "call_s": call,
            "ratio": step / plain,
            "paired_ratio": statistics.median(
                a / b for a, b in zip(slopes, plain_slopes, strict=True)
            ),
            "call_ratio": call / out["plain"]["call_s"],
            "fixed_s": call - n_steps * step,
            "check": checks[name],
        }
    return out


def rows(results: dict) -> list[dict]:
    out = []
    for r in results["cases"]:
        case = f"MLP {'-'.join(map(str, r['widths']))} ({r['n_params']:,} params), B={r['batch']}"
        for name, v in r.items():
            if not name.startswith("tracked_n_iter_"):
                continue
            k = name.removeprefix("tracked_n_iter_")
            c = v["check"]
            note = (
                f"per step (slope {r['n_short']}->{r['n_steps']} steps); paired "
                f"{v['paired_ratio']:.2f}x; whole {r['n_steps']}-step call {v['call_ratio']:.2f}x "
                f"(fixed cost {v['fixed_s'] * 1e3:.0f} ms: checks + Lanczos start "
                f"{r['init_vectors_s'] * 1e3:.0f} ms); final sigma_1 max rel err "
                f"{c['max_rel_err_final_sigma']:.1e}, max residual {c['max_residual']:.1e}"
            )
            out.append(
                row(
                    "lipschitz",
                    f"{case}, tracking n_iter={k}",
                    v["per_step_s"],
                    "the same SGD step, no tracking",
                    r["plain"]["per_step_s"],
                    note,
                )
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-steps", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="10 steps, 2 repeats (smoke test)")
    parser.add_argument("--out", type=Path, help=f"write the JSON here (default {RESULTS})")
    options = parser.parse_args()
    n_steps, repeats = options.n_steps, options.repeats
    if options.quick:
        n_steps, repeats = 20, 2
    results = {
        "environment": environment(),
        "workload": (
            f"GD steps on a batch of {BATCH} (MSE) of an MLP {WIDTHS}, with and without "
            "warm-started spectral-norm tracking of its 4 weight matrices"
        ),
        "cases": [compare(n_steps, repeats, (1, 2, 3))],
    }
    results["environment"]["load_average_end"] = os.getloadavg()
    results["rows"] = rows(results)
    for r in results["rows"]:
        print(
            f"{r['case']}: {r['lspsde_s'] * 1e3:.2f} ms/step vs {r['baseline_s'] * 1e3:.2f} -> "
            f"{r['ratio']:.3f}x ({r['note']})",
            flush=True,
        )
    out_path = options.out or (None if options.quick else RESULTS)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2))
        print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
