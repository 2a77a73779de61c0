"""Lyapunov spectra: ``lspsde.lyapunov`` beside ``lyapax`` (0.3), at equal accuracy.

Both run the same algorithm with the same numerics: Benettin / QR re-orthonormalisation after
every step (lyapax ``renorm_every=1``), tangents by forward-mode JVPs, the same number of
transient and measured steps, and for flows the same classical RK4 scheme at the same step size.
Each implementation's error against the published exponents (Sprott 2003) and against the exact
sum rules (log b for Hénon, -(sigma + 1 + beta) for Lorenz) is printed, so accuracy is seen to
be equal; the remaining differences are the chaotic fluctuation of a finite run (the two use
different fixed initial frames and round differently).

Timing: each callable is compiled once (the first call, reported separately as "compile":
first-call time minus the median run time), then timed ``--repeats`` times with
``block_until_ready``, the two implementations interleaved so that load from other processes
hits both alike; the median is reported. ``lyapax.lyapunov_spectrum`` is not jitted by itself
(each eager call re-traces its scans), so it is wrapped in ``jax.jit`` for the comparison; its
eager time, as a user calling it directly would see it, is reported as well.

Run: ``.venv/bin/python benchmarks/bench_lyapunov.py`` (a few minutes on 2 CPU cores). Results
also go to ``benchmarks/results/lyapunov.json``.
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

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import lyapax  # noqa: E402
import numpy as np  # noqa: E402

from lspsde.lyapunov import flow_map, lyapunov_spectrum  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _rows import row  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "lyapunov.json"

# Sprott, *Chaos and Time-Series Analysis* (OUP 2003), Appendix A.
HENON_PUBLISHED = (0.41922, -1.62319)
LORENZ_PUBLISHED = (0.9056, 0.0, -14.5723)
SIGMA, RHO, BETA = 10.0, 28.0, 8.0 / 3.0


def henon(z):
    return jnp.stack([1.0 - 1.4 * z[0] ** 2 + z[1], 0.3 * z[0]])


def lorenz(z):
    x, y, w = z[0], z[1], z[2]
    return jnp.stack([SIGMA * (y - x), x * (RHO - w) - y, x * y - BETA * w])


def lorenz96(z):
    # dz_i/dt = (z_{i+1} - z_{i-2}) z_{i-1} - z_i + F, F = 8: chaotic, d = 40 exponents.
    return (jnp.roll(z, -1) - jnp.roll(z, 2)) * jnp.roll(z, 1) - z + 8.0


def _time(fn: Callable[[], jax.Array]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def compare(case: dict, repeats: int) -> dict:
    """Time ``case['lspsde']`` against ``case['lyapax_jit']`` (and the eager lyapax call)."""
    impls = {"lspsde": case["lspsde"], "lyapax": case["lyapax_jit"]}
    first = {name: _time(fn) for name, fn in impls.items()}
    runs: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            runs[name].append(_time(fn))
    eager = [_time(case["lyapax_eager"]) for _ in range(max(2, repeats // 2))]

    out = {"settings": case["settings"], "published": case["published"]}
    for name, fn in impls.items():
        exponents = np.asarray(fn())
        median = statistics.median(runs[name])
        out[name] = {
            "run_median_s": median,
            "run_all_s": runs[name],
            "compile_s": first[name] - median,
            "exponents": exponents.tolist(),
            "abs_error_vs_published": (
                None
                if case["published"] is None
                else np.abs(exponents[: len(case["published"])] - case["published"]).tolist()
            ),
            "sum_rule_error": (
                None
                if case["exact_sum"] is None
                else float(abs(exponents.sum() - case["exact_sum"]))
            ),
        }
    out["lyapax"]["eager_run_median_s"] = statistics.median(eager[1:] if len(eager) > 1 else eager)
    out["ratio_lyapax_over_lspsde"] = out["lyapax"]["run_median_s"] / out["lspsde"]["run_median_s"]
    out["ratio_lyapax_eager_over_lspsde"] = (
        out["lyapax"]["eager_run_median_s"] / out["lspsde"]["run_median_s"]
    )
    out["max_abs_difference_between_implementations"] = float(
        np.max(np.abs(np.asarray(out["lspsde"]["exponents"]) - out["lyapax"]["exponents"]))
    )
    return out


def map_case(n_steps: int, n_transient: int) -> dict:
    z0 = jnp.array([0.1, 0.1])
    step = lambda t, z, args: henon(z)
    lyapax_call = lambda z: (
        lyapax.lyapunov_spectrum(
            henon, z, 1.0, n_steps, renorm_every=1, t_transient=float(n_transient)
        ).exponents
    )
    lyapax_jit = jax.jit(lyapax_call)
    return {
        "settings": {"map": "Henon a=1.4 b=0.3", "n_steps": n_steps, "n_transient": n_transient},
        "published": HENON_PUBLISHED,
        "exact_sum": math.log(0.3),
        "lspsde": lambda: lyapunov_spectrum(step, z0, n_steps, n_transient=n_transient),
        "lyapax_jit": lambda: lyapax_jit(z0),
        "lyapax_eager": lambda: lyapax_call(z0),
    }


def flow_case(
    name: str,
    rhs: Callable,
    z0: jax.Array,
    dt: float,
    n_steps: int,
    n_transient: int,
    k: int | None,
    published,
    exact_sum,
) -> dict:
    step = flow_map(lambda t, z, args: rhs(z), dt)  # classical RK4, one substep
    problem = lyapax.ode_problem(rhs, z0, dt, integrator="rk4")  # classical RK4

    def lyapax_call(z):
        return lyapax.lyapunov_spectrum(
            problem.step_fn, z, dt, n_steps, k=k, renorm_every=1, t_transient=n_transient * dt
        ).exponents

    lyapax_jit = jax.jit(lyapax_call)
    return {
        "settings": {
            "flow": name,
            "integrator": "RK4 (both)",
            "dt": dt,
            "n_steps": n_steps,
            "n_transient": n_transient,
            "k": k if k is not None else int(z0.size),
        },
        "published": published,
        "exact_sum": exact_sum,
        "lspsde": lambda: lyapunov_spectrum(step, z0, n_steps, k=k, n_transient=n_transient, dt=dt),
        "lyapax_jit": lambda: lyapax_jit(z0),
        "lyapax_eager": lambda: lyapax_call(z0),
    }


def _case_name(settings: dict) -> str:
    what = settings.get("map") or settings["flow"]
    k = settings.get("k")
    steps = f"{settings['n_steps']:,} steps"
    return f"{what}" + (f", k={k}" if k is not None else "") + f", {steps}, float64"


def rows(results: dict) -> list[dict]:
    """The common rows (``_rows.row``): lspsde against lyapax, jitted and eager."""
    out = []
    for res in results["cases"].values():
        lib, other = res["lspsde"], res["lyapax"]
        err = lambda r: (
            "-" if r["abs_error_vs_published"] is None else f"{r['abs_error_vs_published'][0]:.1e}"
        )
        note = (
            f"λ1 err {err(lib)} / {err(other)} (lspsde / lyapax); max |Δλ| "
            f"{res['max_abs_difference_between_implementations']:.1e}; compile "
            f"{lib['compile_s']:.1f} s / {other['compile_s']:.1f} s"
        )
        case = _case_name(res["settings"])
        out.append(
            row(
                "lyapunov",
                case,
                lib["run_median_s"],
                "lyapax 0.3 (jit)",
                other["run_median_s"],
                note,
            )
        )
        out.append(
            row(
                "lyapunov",
                case,
                lib["run_median_s"],
                "lyapax 0.3 (eager, as called)",
                other["eager_run_median_s"],
                "",
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="10x fewer steps (smoke test)")
    parser.add_argument("--out", type=Path, help=f"write the JSON here (default {RESULTS})")
    options = parser.parse_args()
    scale = 10 if options.quick else 1

    l96_z0 = 8.0 + 0.01 * jnp.sin(jnp.arange(40.0))
    cases = {
        "henon": map_case(100_000 // scale, 1_000),
        "lorenz": flow_case(
            "Lorenz sigma=10 rho=28 beta=8/3",
            lorenz,
            jnp.ones(3),
            0.01,
            100_000 // scale,
            1_000,
            None,
            LORENZ_PUBLISHED,
            -(SIGMA + 1 + BETA),
        ),
        # Larger systems: the per-step QR is then LAPACK's (k > 4) or still the unrolled one
        # (k <= 4). No published values; the full spectrum obeys the exact sum rule
        # sum lambda_i = trace J = -d (each dz_i/dt has -z_i).
        "lorenz96_d40_k40": flow_case(
            "Lorenz-96 d=40 F=8", lorenz96, l96_z0, 0.01, 20_000 // scale, 5_000, None, None, -40.0
        ),
        "lorenz96_d40_k4": flow_case(
            "Lorenz-96 d=40 F=8", lorenz96, l96_z0, 0.01, 20_000 // scale, 5_000, 4, None, None
        ),
    }

    results = {
        "environment": {
            "jax": jax.__version__,
            "lyapax": lyapax.__version__,
            "device": str(jax.devices()[0]),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "x64": True,
            "load_average_before": os.getloadavg(),
        },
        "cases": {},
    }
    for name, case in cases.items():
        print(f"running {name} ...", flush=True)
        results["cases"][name] = compare(case, options.repeats)
    results["environment"]["load_average_after"] = os.getloadavg()

    header = (
        f"{'case':<18} {'impl':<7} {'run [s]':>9} {'compile [s]':>11} "
        f"{'lambda_1':>10} {'err lambda_1':>12} {'sum-rule err':>12}"
    )
    print()
    print(header)
    print("-" * len(header))
    for name, res in results["cases"].items():
        for impl in ("lspsde", "lyapax"):
            r = res[impl]
            err1 = r["abs_error_vs_published"]
            print(
                f"{name:<18} {impl:<7} {r['run_median_s']:>9.4f} {r['compile_s']:>11.2f} "
                f"{r['exponents'][0]:>10.5f} "
                f"{'-' if err1 is None else f'{err1[0]:.1e}':>12} "
                f"{'-' if r['sum_rule_error'] is None else f'{r["sum_rule_error"]:.1e}':>12}"
            )
        print(
            f"{'':<18} ratio lyapax(jit)/lspsde = {res['ratio_lyapax_over_lspsde']:.1f}x, "
            f"lyapax(eager)/lspsde = {res['ratio_lyapax_eager_over_lspsde']:.1f}x, "
            f"max |difference| = {res['max_abs_difference_between_implementations']:.1e}"
        )
    load = results["environment"]
    print(
        f"\nload average before/after: {load['load_average_before']} / "
        f"{load['load_average_after']} on {load['cpu_count']} cores"
    )

    results["rows"] = rows(results)
    out_path = options.out or RESULTS
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
