"""Monte Carlo ensembles: ``lspsde.simulate`` beside a hand-written ``jit(vmap(scan))`` and NumPy.

The workload is SGD with additive isotropic Gaussian gradient noise on a dense quadratic,
$\\theta^{t+1} = \\theta^t - \\eta(H(\\theta^t - \\theta^*) + (\\sigma/\\sqrt d)\\,\\xi^t)$,
$\\xi^t \\sim N(0, I_d)$, from $\\theta^0 = 0$, with $\\theta$ saved every 10 steps
(steps 0, 10, ..., n_steps) for every path. Three implementations, run side by side:

- ``lspsde``: ``lspsde.simulate(Quadratic, GradientDescent, IsotropicGaussian, ...)`` with
  ``save="trajectory"``, ``save_every=10``, divergence tracking on (it is always on), and the
  energy and loss it records at the saved steps.
- ``jax_scan``: what a JAX user would write by hand: ``jax.jit(jax.vmap(path))`` with a nested
  ``lax.scan`` (outer over saved blocks, inner over 10 steps) saving the same steps, no
  divergence tracking, no energy / loss. It uses the *same* RNG scheme as lspsde (per-step
  counters: ``normal(fold_in(fold_in(key, p), t), (d,))``, threefry), so both draw the same
  numbers and the comparison measures the framework's overhead, not the RNG. (lspsde's paths
  are checked to agree with it to rounding.)
- ``numpy``: a NumPy loop over steps, vectorised over paths (``(n, d) @ H``), with
  ``Generator.standard_normal`` (PCG64 + ziggurat: a sequential stream, not counter-based: a
  path's noise then depends on the number of paths, which is what lspsde's counters avoid).

Timing: compile excluded (each JAX implementation is called once first; the compile time is
reported separately as first-call minus median), then ``--repeats`` rounds (median reported) with
``block_until_ready``, the implementations interleaved within each round so that load from other
processes hits all alike; ratios are given as the ratio of medians and as the median of the
per-round ratios. Throughput is path-steps per second = n_paths * n_steps / median time.

Run: ``.venv/bin/python benchmarks/bench_simulate.py`` (about 4-5 minutes on 2 CPU cores);
``--quick`` (10x fewer steps) is a smoke test. Results go to ``benchmarks/results/simulate.json``.
"""

import argparse
from collections.abc import Callable
import json
import math
import os
from pathlib import Path
import platform
import statistics
import sys
import time

# NumPy's OpenBLAS: one thread. On this shared 2-core machine its default (2 spinning threads)
# made the NumPy baseline ~4.7x slower; one thread is the strongest NumPy baseline here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax

if os.environ.get("BENCH_X64", "0") == "1":
    jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _rows import row

from lspsde._simulate import simulate
import lspsde.noise
from lspsde.parameter import GradientDescent
from models.objectives import Quadratic

RESULTS = Path(__file__).parent / "results" / "simulate.json"
SAVE_EVERY = 10
SIGMA = 1.0


def problem(d: int) -> dict:
    """A dense SPD quadratic with eigenvalues in [0.1, 1] (L = 1), and eta = 1 / L."""
    key = jax.random.key(1234)
    q, _ = jnp.linalg.qr(jax.random.normal(key, (d, d)))
    H = (q * jnp.linspace(0.1, 1.0, d)) @ q.T
    H = 0.5 * (H + H.T)  # exactly symmetric (Quadratic checks symmetry)
    return {"H": H, "theta_star": jnp.ones(d), "eta": 1.0, "theta0": jnp.zeros(d)}


def lspsde_impl(prob: dict, n_paths: int, n_steps: int) -> Callable[[], jax.Array]:
    objective = Quadratic(prob["H"], prob["theta_star"])
    update = GradientDescent(prob["eta"])
    noise = lspsde.noise.IsotropicGaussian(SIGMA)
    key = jax.random.key(0)
    return lambda: (
        simulate(
            (objective, update, noise),
            prob["theta0"],
            key=key,
            n_paths=n_paths,
            n_steps=n_steps,
            save_every=SAVE_EVERY,
            save="trajectory",
            progress=False,
        ).theta
    )


def jax_scan_impl(prob: dict, n_paths: int, n_steps: int) -> Callable[[], jax.Array]:
    n_blocks = n_steps // SAVE_EVERY

    @jax.jit
    def run(H, theta_star, eta, sigma, theta0, key):
        d = theta0.shape[0]

        def path(p):
            k_p = jax.random.fold_in(key, p)

            def step(theta, t):
                xi = jax.random.normal(jax.random.fold_in(k_p, t), (d,), theta.dtype)
                g = H @ (theta - theta_star) + sigma / math.sqrt(d) * xi
                return theta - eta * g, None

            def block(theta, start):
                theta, _ = jax.lax.scan(step, theta, start + jnp.arange(SAVE_EVERY))
                return theta, theta

            _, saved = jax.lax.scan(block, theta0, jnp.arange(n_blocks) * SAVE_EVERY)
            return jnp.concatenate([theta0[None], saved])

        return jax.vmap(path)(jnp.arange(n_paths))

    dtype = prob["theta0"].dtype
    args = (
        prob["H"],
        prob["theta_star"],
        jnp.asarray(prob["eta"], dtype),
        jnp.asarray(SIGMA, dtype),
        prob["theta0"],
        jax.random.key(0),
    )
    return lambda: run(*args)


def numpy_impl(prob: dict, n_paths: int, n_steps: int) -> Callable[[], np.ndarray]:
    H, theta_star = np.asarray(prob["H"]), np.asarray(prob["theta_star"])
    theta0 = np.asarray(prob["theta0"])
    dtype, d = theta0.dtype, theta0.shape[0]
    eta, scale = dtype.type(prob["eta"]), dtype.type(SIGMA / math.sqrt(d))

    def run():
        rng = np.random.default_rng(0)
        theta = np.repeat(theta0[None], n_paths, axis=0)
        saved = np.empty((n_paths, n_steps // SAVE_EVERY + 1, d), dtype)
        saved[:, 0] = theta
        for t in range(n_steps):
            xi = rng.standard_normal((n_paths, d), dtype=dtype)
            theta -= eta * ((theta - theta_star) @ H + scale * xi)  # H is symmetric
            if (t + 1) % SAVE_EVERY == 0:
                saved[:, (t + 1) // SAVE_EVERY] = theta
        return saved

    return run


IMPLS = {"lspsde": lspsde_impl, "jax_scan": jax_scan_impl, "numpy": numpy_impl}


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def compare(d: int, n_paths: int, n_steps: int, repeats: int) -> dict:
    prob = problem(d)
    fns = {name: make(prob, n_paths, n_steps) for name, make in IMPLS.items()}
    first, outputs = {}, {}
    for name in ("lspsde", "jax_scan"):
        start = time.perf_counter()
        outputs[name] = jax.block_until_ready(fns[name]())
        first[name] = time.perf_counter() - start
    # Same counters, same draws: the two JAX implementations agree to rounding.
    agree = float(jnp.max(jnp.abs(outputs["lspsde"] - outputs["jax_scan"])))
    del outputs
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(_time(fn))
    out: dict = {"d": d, "n_paths": n_paths, "n_steps": n_steps, "save_every": SAVE_EVERY}
    for name in fns:
        median = statistics.median(runs[name])
        out[name] = {
            "run_median_s": median,
            "run_all_s": runs[name],
            "path_steps_per_s": n_paths * n_steps / median,
            "compile_s": first[name] - median if name in first else None,
        }
    for other in ("jax_scan", "numpy"):
        out[f"ratio_lspsde_over_{other}"] = (
            out["lspsde"]["run_median_s"] / out[other]["run_median_s"]
        )
        # Runs are interleaved, so run i of each saw about the same load: the median of the
        # per-round ratios is less sensitive to load drift than the ratio of medians.
        out[f"paired_ratio_lspsde_over_{other}"] = statistics.median(
            a / b for a, b in zip(runs["lspsde"], runs[other], strict=True)
        )
    out["max_abs_difference_lspsde_vs_jax_scan"] = agree
    return out


BASELINES = {"jax_scan": "hand jit(vmap(scan))", "numpy": "NumPy loop (1 thread)"}


def rows(results: dict) -> list[dict]:
    """The common rows (``_rows.row``): each case against each baseline."""
    out = []
    for r in results["cases"]:
        case = f"d={r['d']:,}, {r['n_paths']:,} x {r['n_steps']:,}, trajectory every {SAVE_EVERY}"
        for other, name in BASELINES.items():
            note = f"paired {r[f'paired_ratio_lspsde_over_{other}']:.2f}x"
            if other == "jax_scan":
                note += f"; max |diff| {r['max_abs_difference_lspsde_vs_jax_scan']:.1e}"
            out.append(
                row(
                    "simulate",
                    case,
                    r["lspsde"]["run_median_s"],
                    name,
                    r[other]["run_median_s"],
                    note,
                )
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="10x fewer steps (smoke test)")
    parser.add_argument(
        "--full",
        action="store_true",
        help="the full grid: d=1000 at 1000 steps, with 1024 and 4096 paths (~1 hour on 2 cores)",
    )
    parser.add_argument("--out", type=Path, help=f"write the JSON here (default {RESULTS})")
    options = parser.parse_args()
    # (d, n_paths, n_steps). d = 1000 runs 100 steps by default: at 1000 steps one run takes
    # ~2 minutes on 2 shared CPU cores (the (n, d) @ (d, d) product dominates every
    # implementation alike), too long for ~10 minutes in all; --full runs it.
    cases = [(100, 1_024, 1_000), (100, 4_096, 1_000), (1_000, 1_024, 100)]
    if options.full:
        cases = [(100, 1_024, 1_000), (100, 4_096, 1_000), (1_000, 1_024, 1_000)]
        cases.append((1_000, 4_096, 1_000))
    if options.quick:
        cases = [(d, n, steps // 10) for d, n, steps in cases]

    dtype = str(jnp.zeros(()).dtype)
    results = {
        "environment": {
            "jax": jax.__version__,
            "numpy": np.__version__,
            "backend": jax.default_backend(),
            "devices": len(jax.devices()),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "dtype": dtype,
            "openblas_threads": os.environ["OPENBLAS_NUM_THREADS"],
        },
        "workload": (
            "SGD + additive isotropic Gaussian noise (sigma=1) on a dense SPD quadratic, "
            "eta = 1/L, theta saved every 10 steps"
        ),
        "cases": [],
    }
    header = (
        f"{'d':>5} {'paths':>6} {'steps':>6} | {'lspsde':>9} {'jax_scan':>9} {'numpy':>9}"
        f" | {'lspsde/scan':>12} {'lspsde/numpy':>13} | Mpath-steps/s (lspsde, scan, numpy)"
    )
    print(
        f"dtype {dtype}; median of {options.repeats} interleaved runs, compile excluded; "
        "ratios: of medians (median of per-round ratios)"
    )
    print(header)
    for d, n_paths, n_steps in cases:
        r = compare(d, n_paths, n_steps, options.repeats)
        results["cases"].append(r)
        print(
            f"{d:>5} {n_paths:>6} {n_steps:>6} | "
            + " ".join(f"{r[k]['run_median_s']:>8.3f}s" for k in IMPLS)
            + " | "
            + " ".join(
                f"{r[f'ratio_lspsde_over_{o}']:>6.2f}x ({r[f'paired_ratio_lspsde_over_{o}']:.2f})"
                for o in ("jax_scan", "numpy")
            )
            + " | "
            + ", ".join(f"{r[k]['path_steps_per_s'] / 1e6:.2f}" for k in IMPLS),
            flush=True,
        )
    results["rows"] = rows(results)
    out_path = options.out or (None if options.quick else RESULTS)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2))
        print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
