r"""``lspsde.simulate`` beside PyTorch: a plain torch loop and ``torchsde.sdeint``, same workload.

The PyTorch side is ``bench_torch.py`` (no JAX, no lspsde), run by a separate Python that has
torch (``--torch-python``, default ``.venv-torch/bin/python``; see ``benchmarks/README.md`` for
the two install commands). This script times the lspsde side of the same workload in the same
run: ``simulate(Quadratic(H, 0), SGD(1), IsotropicGaussian(1), theta0=1, n_paths=4096,
n_steps=1000, save="summary")`` with H from ``bench_torch.quadratic`` (d = 16), so both sides
have the same H, step, noise law and start. ``save="summary"`` keeps the final theta and, as
simulate always does, the energy and loss at every step and the divergence guard; the torch
rows keep only the final state.

Rounds: each round times one simulate call (compiled by a warm-up call first; compile time
reported) and then one ``bench_torch.py`` subprocess (``--warmup 1 --repeats 1``, its import and
warm-up excluded from the times it reports). So load from other jobs hits both alike, and the
ratio is given as the ratio of medians and (in brackets) the median of per-round ratios.

Correctness: the mean final ||theta||^2 of simulate and of every torch row, with Monte Carlo
standard errors, the z-score of their difference, and the exact value. Euler--Maruyama of the SGD
limit at dt = eta has the law of SGD, so torchsde samples the same distribution too.

Run: ``.venv/bin/python benchmarks/bench_vs_torch.py`` (float32: torch loop and torchsde) and
``... --x64`` (float64: torch loop; torchsde float64 with ``--torch-impls``); ``--quick`` is 10x
fewer steps. Results: ``benchmarks/results/torch.json`` (``torch_x64.json``), or ``--out``.
"""

import argparse
import json
import math
import os
from pathlib import Path
import platform
import statistics
import subprocess
import sys
import time

X64 = "--x64" in sys.argv
import jax  # noqa: E402

if X64:
    jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _rows import row  # noqa: E402
from bench_torch import ETA, N_PATHS, N_STEPS, SIGMA, D, exact_mean_square, quadratic  # noqa: E402

import lspsde  # noqa: E402
from models.objectives import Quadratic  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
DEFAULT_TORCH_PYTHON = ROOT.parent / ".venv-torch" / "bin" / "python"
INSTALL_HINT = (
    "torch not found: install it in its own venv as benchmarks/README.md shows (section "
    "'PyTorch baselines: their own venv': /usr/bin/python3.11 -m venv .venv-torch, then "
    "pip install the CPU torch wheel, torchsde and numpy), or pass --torch-python PATH"
)
BASELINE_NAMES = {
    "torch_loop": "PyTorch loop (no_grad, batched), final θ only",
    "torch_loop_summary": "PyTorch loop, + energy & loss every step (= simulate's outputs)",
    "torchsde": "torchsde.sdeint (Euler, dt = eta)",
}


def simulate_impl(n_paths: int, n_steps: int):
    dtype = jnp.float64 if X64 else jnp.float32
    objective = Quadratic(jnp.asarray(quadratic(), dtype), jnp.zeros(D, dtype))
    update, noise = lspsde.SGD(ETA), lspsde.IsotropicGaussian(SIGMA)
    theta0, key = jnp.ones(D, dtype), jax.random.key(0)

    def run():
        ens = lspsde.simulate(
            (objective, update, noise),
            theta0,
            key=key,
            n_paths=n_paths,
            n_steps=n_steps,
            save="summary",
            progress=False,
        )
        return jax.block_until_ready(ens.final_theta)

    return run


def _summary(theta) -> dict:
    sq = np.sum(np.asarray(theta, np.float64) ** 2, axis=1)
    return {
        "mean_final_sq_norm": float(sq.mean()),
        "sem_final_sq_norm": float(sq.std(ddof=1) / math.sqrt(sq.size)),
    }


def torch_round(
    python: Path, impls: list[str], n_paths: int, n_steps: int, threads: int = 1
) -> dict:
    cmd = [str(python), str(ROOT / "bench_torch.py"), "--json-only", "--warmup", "1"]
    cmd += ["--threads", str(threads)]
    cmd += ["--repeats", "1", "--paths", str(n_paths), "--steps", str(n_steps)]
    cmd += ["--impls", ",".join(impls)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rows(results: dict) -> list[dict]:
    out = []
    if results.get("skipped"):
        dtype = results["environment"]["dtype"]
        for impl in results["torch_impls"]:
            kind = impl.rsplit("_", 1)[0]
            out.append(
                row(
                    "torch",
                    f"SGD d=16 isotropic, {dtype}",
                    None,
                    BASELINE_NAMES[kind],
                    None,
                    results["skipped"],
                )
            )
        return out
    w, lib = results["workload"], results["lspsde"]
    threads = results["environment"].get("torch", {}).get("torch_threads")
    for impl, r in results["torch"].items():
        kind, dtype = impl.rsplit("_", 1)
        z = (lib["mean_final_sq_norm"] - r["mean_final_sq_norm"]) / math.hypot(
            lib["sem_final_sq_norm"], r["sem_final_sq_norm"]
        )
        note = (
            f"{r['path_steps_per_s'] / 1e6:.2f} vs {lib['path_steps_per_s'] / 1e6:.2f} M "
            f"path-steps/s (torch, lspsde); paired {r['paired_ratio']:.2f}x; "
            f"E‖θ_T‖² {r['mean_final_sq_norm']:.4f}±{r['sem_final_sq_norm']:.4f} vs "
            f"{lib['mean_final_sq_norm']:.4f}±{lib['sem_final_sq_norm']:.4f} "
            f"(z = {z:+.2f}; exact {w['exact_mean_final_sq_norm']:.4f})"
        )
        out.append(
            row(
                "torch",
                f"SGD d=16 isotropic, {w['n_paths']:,} x {w['n_steps']:,}, {dtype}",
                lib["run_median_s"],
                f"{BASELINE_NAMES[kind]}, {threads} thread{'s' if threads != 1 else ''}",
                r["run_median_s"],
                note,
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--x64", action="store_true", help="float64 (default float32)")
    parser.add_argument("--quick", action="store_true", help="10x fewer steps (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", type=int, default=N_PATHS)
    parser.add_argument("--steps", type=int, default=N_STEPS)
    parser.add_argument("--torch-python", type=Path, default=None)
    parser.add_argument("--torch-impls", default=None, help="comma-separated; see bench_torch")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)"
    )
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    dtype = "float64" if X64 else "float32"
    impls = (
        options.torch_impls.split(",")
        if options.torch_impls
        else [f"torch_loop_{dtype}", f"torch_loop_summary_{dtype}"]
        + ([] if X64 else [f"torchsde_{dtype}"])
    )
    n_paths = options.paths
    n_steps = options.steps // 10 if options.quick else options.steps
    name = "torch_x64" if X64 else "torch"
    out_path = options.out or RESULTS / (f"{name}_quick.json" if options.quick else f"{name}.json")
    python = options.torch_python or DEFAULT_TORCH_PYTHON

    results: dict = {
        "environment": {
            "jax": jax.__version__,
            "python": platform.python_version(),
            "dtype": dtype,
            "cpu_count": os.cpu_count(),
            "load_average_start": os.getloadavg(),
            "torch_python": str(python),
            "torch_threads_option": options.torch_threads,
        },
        "workload": {
            "d": D,
            "n_paths": n_paths,
            "n_steps": n_steps,
            "eta": ETA,
            "sigma": SIGMA,
            "exact_mean_final_sq_norm": exact_mean_square(
                quadratic(), np.ones(D), n_steps, ETA, SIGMA / math.sqrt(D)
            ),
        },
        "torch_impls": impls,
    }
    if not Path(python).exists():
        results["skipped"] = INSTALL_HINT
        print(INSTALL_HINT)
    else:
        fn = simulate_impl(n_paths, n_steps)
        start = time.perf_counter()
        final = fn()
        first = time.perf_counter() - start
        lib_runs, torch_runs, torch_out = [], {impl: [] for impl in impls}, {}
        for _ in range(options.repeats):
            start = time.perf_counter()
            final = fn()
            lib_runs.append(time.perf_counter() - start)
            rnd = torch_round(python, impls, n_paths, n_steps, options.torch_threads)
            results["environment"]["torch"] = rnd["environment"]
            for impl in impls:
                torch_runs[impl].append(rnd["impls"][impl]["run_median_s"])
                torch_out[impl] = rnd["impls"][impl]
        median = statistics.median(lib_runs)
        results["lspsde"] = {
            "run_median_s": median,
            "run_all_s": lib_runs,
            "compile_s": first - median,
            "path_steps_per_s": n_paths * n_steps / median,
            **_summary(final),
        }
        results["torch"] = {}
        for impl in impls:
            t = statistics.median(torch_runs[impl])
            results["torch"][impl] = {
                "run_median_s": t,
                "run_all_s": torch_runs[impl],
                "path_steps_per_s": n_paths * n_steps / t,
                "paired_ratio": statistics.median(
                    a / b for a, b in zip(lib_runs, torch_runs[impl], strict=True)
                ),
                "mean_final_sq_norm": torch_out[impl]["mean_final_sq_norm"],
                "sem_final_sq_norm": torch_out[impl]["sem_final_sq_norm"],
            }
    results["environment"]["load_average_end"] = os.getloadavg()
    results["rows"] = rows(results)
    print("| case | lspsde s | baseline | baseline s | lspsde / baseline | note |")
    print("|---|---|---|---|---|---|")
    for r in results["rows"]:
        fmt = lambda v, spec: (
            "--" if v is None else format(v, spec) + ("x" if spec == ".2f" else "")
        )
        print(
            f"| {r['case']} | {fmt(r['lspsde_s'], '.3f')} | {r['baseline']} "
            f"| {fmt(r['baseline_s'], '.3f')} | {fmt(r['ratio'], '.2f')} | {r['note']} |",
            flush=True,
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
