"""Learning Stability Profile: matrix-free (Lanczos) against dense Jacobians, P = 1e3 .. 1e6.

A ReLU MLP (widths ``(d, 4d, ~2.25d, d, 10)``) is trained by full-batch gradient descent on a
teacher-student regression (``n = 64`` samples, inputs scaled to unit norm, ``eta = 0.1``) and
its profile is taken over ``T = 2`` steps, saved at ``t = 0`` and ``t = T``::

    system = LearningSystem(SupervisedLoss(net, x, y), GradientDescent(0.1),
                            representation=net, probes=x[:8])
    learning_profile(system, parameters(net), key=key, n_steps=2, save_every=2, method=...)

Routes, at each parameter count P (all float32, the same dtype for every route):

- ``mf``: ``method="lanczos"`` -- every block matrix-free (Golub-Kahan-Lanczos on JVP/VJP
  products; ``max_steps=64``, ``rtol=1e-4``, the float32 tolerance ``lspsde.linalg`` documents).
- ``dense``: ``method="dense"`` -- every Jacobian materialised (parameter blocks P x P, the
  input block of the cumulative update sensitivity P x TP), exact SVDs.
- ``dense_min``: the cheapest dense computation of the same numbers a user would write by hand
  (a fairer baseline than ``method="dense"``): T + 1 one-step Jacobians by ``jax.jacfwd``, their
  product for ``cum_theta``, one P x P Gram matrix for ``cum_u``, ``sigma_u = eta`` in closed form
  (GD with additive gradient noise), exact per-layer representation Jacobians.
- ``block_mf`` / ``block_dense``: a single block, sigma_theta at t = 0 -- ``jacobian_norm`` of
  one GD step against ``jnp.linalg.norm(jax.jacfwd(step)(theta), 2)``: the floor of any dense
  route (every dense profile needs at least T + 1 such Jacobians).

Time: each route is jitted with the system and theta^0 as arguments (the public function traced
once: Python-side argument checks, a few ms, are excluded), compiled ahead of time (``compile
s`` = lower + compile), called once to warm up, then timed in interleaved rounds with
``block_until_ready`` (median of >= 3 rounds), so load from other jobs hits all routes alike.

Memory: each (P, route) also runs once in a FRESH subprocess that reports its peak RSS
(``VmHWM`` from ``/proc/self/status``; ``getrusage(RUSAGE_SELF).ru_maxrss`` of a fork+exec'ed child
starts at the parent's RSS at fork time, GBs here, so it hides the child's own peak); a baseline
subprocess that imports jax and builds the same model and data but computes nothing is
subtracted ("peak MiB"). The subprocesses load the compiled executable from a persistent
compilation cache filled by the parent, so the peak is that of running the profile (plus tracing
it to find the cache entry), not of the compiler; the rise of the peak during the call itself is
reported too ("exec MiB": the high-water mark is reset via ``/proc/self/clear_refs`` right before
the call). XLA's own buffer plan (``memory_analysis()`` temporaries) is reported beside it and,
compile-only, for the dense route at sizes where running it is out of reach (including P ~ 1e6).
Log-log slopes of memory against P are fitted per route.

Dense routes run only while their O(P^3) SVD/product time and their P^2 memory stay within this
benchmark's budget (``--dense-max-p``, ``--dense-min-max-p``); beyond, the would-be memory of a
single P x P Jacobian (P^2 * 4 B in float32, P^2 * 8 B in float64) is printed.

Agreement: where a dense route ran, the maximum relative difference of sigma_theta, cum_theta,
sigma_x (and sigma_u, cum_u, cum_x) between it and the matrix-free profile is printed.

``OPENBLAS_NUM_THREADS`` defaults to 1 here: JAX's CPU SVD/eigh call the (scipy) OpenBLAS
LAPACK, whose spinning worker threads were measured 40-100x slower on this 2-core machine when
other jobs load it; one thread keeps the dense baseline fair.

Run: ``.venv/bin/python benchmarks/bench_profile.py`` (11 min at load average ~2, 15 min at ~5,
on 2 CPU cores) or ``--quick`` (smoke test, ~1.5-2 min). Results go to
``benchmarks/results/profile.json`` (``profile_quick.json`` for ``--quick``).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
from functools import partial
import gc
import hashlib
import itertools
import json
import math
from pathlib import Path
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax

jax.config.update("jax_enable_x64", False)  # float32 throughout, at every P and for every route

from jax.flatten_util import ravel_pytree  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lspsde  # noqa: E402
import models  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rows import row  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"

# Widths (d, 4d, ~2.25d, d, 10); P = parameter count (weights + biases).
FULL_LADDER = [
    (6, 24, 13, 6, 10),  # P = 647
    (8, 32, 18, 8, 10),  # P = 1,124
    (10, 40, 22, 10, 10),  # P = 1,682
    (12, 48, 27, 12, 10),  # P = 2,413
    (32, 128, 72, 32, 10),  # P = 16,178
    (64, 256, 144, 64, 10),  # P = 63,578
    (128, 512, 288, 128, 10),  # P = 252,074
    (256, 1024, 576, 256, 10),  # P = 1,003,850
]
QUICK_LADDER = [(6, 24, 13, 6, 10), (16, 64, 36, 16, 10)]
# Compile-only XLA memory plan of the dense profile where it is not run (full ladder only).
DENSE_PLAN_P = (16_178, 63_578, 1_003_850)

N_SAMPLES = 64
N_PROBES = 8
ETA = 0.1
T = 2
MAX_STEPS = 64
RTOL = 1e-4
PROFILE_ROUTES = ("mf", "dense", "dense_min")
BLOCK_ROUTES = ("block_mf", "block_dense")
FIELDS = ("sigma_theta", "sigma_u", "cum_theta", "cum_u", "sigma_x", "cum_x")


# --------------------------------------------------------------------------------------------
# Problem and routes


def n_parameters(widths):
    return sum(o * i + o for i, o in itertools.pairwise(widths))


def build(widths):
    """Teacher-student data, the ReLU student and its learning system (deterministic)."""
    widths = tuple(int(w) for w in widths)
    data = models.teacher_student(jax.random.key(0), n=N_SAMPLES, d_in=widths[0], d_out=widths[-1])
    x = data.inputs / jnp.sqrt(widths[0])  # unit-scale inputs: the Hessian scale is P-independent
    net = models.mlp(
        jax.random.key(1),
        widths,
        activation="relu",
        init="gaussian",
        sigma_w=math.sqrt(2.0),
        final_activation=False,
    )
    system = lspsde.LearningSystem(
        lspsde.SupervisedLoss(net, x, data.targets),
        lspsde.GradientDescent(ETA),
        representation=net,
        probes=x[:N_PROBES],
    )
    theta0 = lspsde.parameters(net)
    n_params = sum(int(a.size) for a in jax.tree.leaves(theta0))
    assert n_params == n_parameters(widths), (n_params, widths)
    return system, theta0, n_params


def _profile_dict(prof):
    return {name: getattr(prof, name) for name in FIELDS} | {"converged": prof.converged}


def route_mf(system, theta0):
    prof = lspsde.learning_profile(
        system,
        theta0,
        key=jax.random.key(0),
        n_steps=T,
        save_every=T,
        method="lanczos",
        max_steps=MAX_STEPS,
        rtol=RTOL,
    )
    return _profile_dict(prof)


def route_dense(system, theta0):
    return _profile_dict(
        lspsde.learning_profile(
            system, theta0, key=jax.random.key(0), n_steps=T, save_every=T, method="dense"
        )
    )


def route_dense_min(system, theta0):
    """The same profile by the cheapest dense computation (T + 1 Jacobians, no wasted SVDs)."""
    flat0, unravel = ravel_pytree(theta0)

    def step(t, z):
        th = unravel(z)
        return ravel_pytree(system.parameter_map(t, th, system.noise.zero(th)))[0]

    zs = [flat0]
    for t in range(T):
        zs.append(step(t, zs[-1]))
    jac = [jax.jacfwd(partial(step, t))(zs[t]) for t in range(T + 1)]  # d theta^{t+1}/d theta^t
    top = partial(jnp.linalg.norm, ord=2)
    eta = [jnp.abs(system.update.step_size(t)) for t in range(T)]
    # d theta^T / d theta^0 = J_{T-1} ... J_0.
    prod = jac[0]
    for t in range(1, T):
        prod = jac[t] @ prod
    # d theta^T / d u^s = -eta_s J_{T-1} ... J_{s+1}: ||[...]||^2 = lambda_max(sum_s M_s M_s^T).
    gram = eta[T - 1] ** 2 * jnp.eye(flat0.size, dtype=flat0.dtype)
    suffix = None
    for s in range(T - 2, -1, -1):
        suffix = jac[s + 1] if suffix is None else suffix @ jac[s + 1]
        gram = gram + eta[s] ** 2 * (suffix @ suffix.T)
    cum_u = jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(gram)[-1], 0))
    reps = [
        lspsde.representation_profile(system.network(unravel(zs[t])), system.probes, method="dense")
        for t in (0, T)
    ]
    one = jnp.ones((), flat0.dtype)
    return {
        "sigma_theta": jnp.stack([top(jac[0]), top(jac[T])]),
        "sigma_u": jnp.stack([jnp.abs(system.update.step_size(t)) for t in (0, T)]),
        "cum_theta": jnp.stack([one, top(prod)]),
        "cum_u": jnp.stack([0 * one, cum_u]),
        "sigma_x": jnp.stack([r.sigma_x.max(axis=0) for r in reps]),
        "cum_x": jnp.stack([r.cumulative.max(axis=0) for r in reps]),
        "converged": jnp.array(True),
    }


def _one_step(system):
    return lambda th: system.parameter_map(0, th, system.noise.zero(th))


def route_block_mf(system, theta0):
    res = lspsde.linalg.jacobian_norm(_one_step(system), theta0, max_steps=MAX_STEPS, rtol=RTOL)
    return {"sigma_theta0": res.value, "converged": res.converged, "n_steps": res.n_steps}


def route_block_dense(system, theta0):
    flat0, unravel = ravel_pytree(theta0)
    f = _one_step(system)
    J = jax.jacfwd(lambda z: ravel_pytree(f(unravel(z)))[0])(flat0)
    return {"sigma_theta0": jnp.linalg.norm(J, 2), "converged": jnp.array(True)}


ROUTES = {
    "mf": route_mf,
    "dense": route_dense,
    "dense_min": route_dense_min,
    "block_mf": route_block_mf,
    "block_dense": route_block_dense,
}


def compile_route(route, system, theta0):
    start = time.perf_counter()
    compiled = jax.jit(ROUTES[route]).lower(system, theta0).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    plan = None
    if mem is not None:
        plan = {
            "temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
        }
    return compiled, seconds, plan


def _timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def _proc_status_mib(key):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss():
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib():
    """Peak RSS of this process image: ``VmHWM`` (Linux), else ``ru_maxrss``.

    ``ru_maxrss`` of a fork+exec'ed child starts at the parent's RSS at fork time (Linux keeps
    the pre-exec high-water mark), which here is GBs and hides the child's own peak; ``VmHWM``
    is the high-water mark of the current address space only.
    """
    peak = _proc_status_mib("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return peak


# --------------------------------------------------------------------------------------------
# Memory: one fresh subprocess per configuration


def child_main(spec):
    """Run one configuration once (or only build it: ``route=None``); print peak RSS."""
    jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    system, theta0, n_params = build(spec["widths"])
    jax.block_until_ready(theta0)
    out = {"n_params": n_params, "route": spec["route"]}
    if spec["route"] is not None:
        compiled, out["load_or_compile_s"], _ = compile_route(spec["route"], system, theta0)
        gc.collect()
        rss_before = _proc_status_mib("VmRSS")
        out["peak_before_run_mib"] = _peak_rss_mib()
        reset = _reset_peak_rss()
        out["run_s"], _ = _timed(lambda: compiled(system, theta0))
        if reset and rss_before is not None:
            # High-water mark of the run itself, above the resident memory it started from.
            out["exec_peak_mib"] = _proc_status_mib("VmHWM") - rss_before
    out["maxrss_mib"] = max(_peak_rss_mib(), out.get("peak_before_run_mib", 0.0))
    out["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("CHILD_RESULT " + json.dumps(out), flush=True)


def run_child(widths, route, cache_dir, timeout):
    spec = {"widths": list(widths), "route": route, "cache_dir": cache_dir}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("CHILD_RESULT "):
            return json.loads(line[len("CHILD_RESULT ") :])
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}


# --------------------------------------------------------------------------------------------
# One ladder point


def _rel_diff(a, b):
    """Max |a - b| / |b| over entries where not both are exactly zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mask = (a != 0) | (b != 0)
    if not mask.any():
        return 0.0
    return float(np.max(np.abs(a - b)[mask] / np.maximum(np.abs(b), 1e-30)[mask]))


def measure_point(widths, routes, options, cache_dir):
    system, theta0, n_params = build(widths)
    point = {"widths": list(widths), "n_params": n_params, "routes": {}}
    print(f"\nP = {n_params:,}  widths {list(widths)}  routes {list(routes)}", flush=True)

    compiled, first = {}, {}
    for route in routes:
        compiled[route], compile_s, plan = compile_route(route, system, theta0)
        first[route], out = _timed(lambda c=compiled[route]: c(system, theta0))
        point["routes"][route] = {
            "compile_s": compile_s,
            "first_run_s": first[route],
            "xla_plan": plan,
            "values": jax.tree.map(lambda a: np.asarray(a).tolist(), out),
        }
        print(
            f"  {route:<12} compile {compile_s:7.2f} s, first run {first[route]:8.3f} s, "
            f"XLA temp {plan['temp_bytes'] / 2**20 if plan else float('nan'):9.1f} MiB",
            flush=True,
        )

    repeats = options.repeats or (7 if max(first.values()) < 2.0 else 3)
    runs = {route: [] for route in routes}
    for _ in range(repeats):  # interleaved: load from other jobs hits every route alike
        for route in routes:
            seconds, _ = _timed(lambda c=compiled[route]: c(system, theta0))
            runs[route].append(seconds)
    for route in routes:
        r = point["routes"][route]
        r["run_all_s"] = runs[route]
        r["run_median_s"] = statistics.median(runs[route])
    del compiled

    # Speedups and agreement.
    mf = point["routes"].get("mf")
    for route in ("dense", "dense_min"):
        if mf and route in point["routes"]:
            r = point["routes"][route]
            r["speedup_vs_mf"] = r["run_median_s"] / mf["run_median_s"]
            r["max_rel_diff_vs_mf"] = {
                field: _rel_diff(mf["values"][field], r["values"][field]) for field in FIELDS
            }
    if "block_mf" in point["routes"] and "block_dense" in point["routes"]:
        bm, bd = point["routes"]["block_mf"], point["routes"]["block_dense"]
        bd["speedup_vs_block_mf"] = bd["run_median_s"] / bm["run_median_s"]
        bd["max_rel_diff_vs_block_mf"] = _rel_diff(
            bm["values"]["sigma_theta0"], bd["values"]["sigma_theta0"]
        )

    # Peak memory: a fresh subprocess per profile route, minus a build-only baseline.
    if not options.no_memory:
        base = run_child(widths, None, cache_dir, options.child_timeout)
        point["baseline_child"] = base
        for route in routes:
            if route not in PROFILE_ROUTES:
                continue
            child = run_child(widths, route, cache_dir, options.child_timeout)
            if "maxrss_mib" in child and "maxrss_mib" in base:
                child["net_peak_mib"] = child["maxrss_mib"] - base["maxrss_mib"]
            point["routes"][route]["memory_child"] = child
    for route in routes:
        r = point["routes"][route]
        mem = r.get("memory_child", {})
        print(
            f"  {route:<12} run median {r['run_median_s']:8.3f} s over {len(r['run_all_s'])}"
            f" | peak {mem.get('net_peak_mib', float('nan')):8.1f} MiB net,"
            f" run-only {mem.get('exec_peak_mib', float('nan')):8.1f} MiB"
            f" (child load {mem.get('load_or_compile_s', float('nan')):.1f} s)",
            flush=True,
        )
    return point


def plan_dense(widths):
    """Compile-only: XLA's buffer plan for ``method="dense"`` where running it is out of reach."""
    system, theta0, n_params = build(widths)
    _, compile_s, plan = compile_route("dense", system, theta0)
    print(
        f"  dense plan at P = {n_params:,}: XLA temporaries "
        f"{plan['temp_bytes'] / 2**30:,.1f} GiB (compile-only, {compile_s:.1f} s)",
        flush=True,
    )
    return {"n_params": n_params, "compile_s": compile_s, "xla_plan": plan}


# --------------------------------------------------------------------------------------------
# Report


def loglog_slope(ps, values):
    pts = [(p, v) for p, v in zip(ps, values, strict=True) if v is not None and v > 0]
    if len(pts) < 2:
        return None
    x = np.log([p for p, _ in pts])
    y = np.log([v for _, v in pts])
    return float(np.polyfit(x, y, 1)[0])


def slopes(points, dense_plans, mf_fit_min_p):
    out = {}
    for route in PROFILE_ROUTES:
        rows = [
            (pt["n_params"], pt["routes"][route])
            for pt in points
            if route in pt["routes"] and (route != "mf" or pt["n_params"] >= mf_fit_min_p)
        ]
        if len(rows) < 2:
            continue
        ps = [p for p, _ in rows]
        rss = [r.get("memory_child", {}).get("net_peak_mib") for _, r in rows]
        run = [r.get("memory_child", {}).get("exec_peak_mib") for _, r in rows]
        plan = [r["xla_plan"]["temp_bytes"] if r["xla_plan"] else None for _, r in rows]
        out[route] = {
            "fit_range_P": [min(ps), max(ps)],
            "n_points": len(ps),
            "peak_rss_slope": loglog_slope(ps, rss),
            "exec_peak_slope": loglog_slope(ps, run),
            "xla_temp_slope": loglog_slope(ps, plan),
        }
    if dense_plans and "dense" in out:
        rows = [
            (pt["n_params"], pt["routes"]["dense"]["xla_plan"]["temp_bytes"])
            for pt in points
            if "dense" in pt["routes"]
        ] + [(d["n_params"], d["xla_plan"]["temp_bytes"]) for d in dense_plans]
        out["dense"]["xla_temp_slope_incl_compile_only"] = loglog_slope(*zip(*rows, strict=True))
        out["dense"]["xla_temp_fit_range_P_incl_compile_only"] = [
            min(p for p, _ in rows),
            max(p for p, _ in rows),
        ]
        # Where the P^2 Jacobians dominate every other buffer.
        large = [(p, b) for p, b in rows if p >= 10_000]
        if len(large) >= 2:
            out["dense"]["xla_temp_slope_P_ge_1e4"] = loglog_slope(*zip(*large, strict=True))
    # Matrix-free: the slope between the two largest P.
    mf_rows = [(pt["n_params"], pt["routes"]["mf"]) for pt in points if "mf" in pt["routes"]]
    if "mf" in out and len(mf_rows) >= 2:
        (p1, r1), (p2, r2) = sorted(mf_rows, key=lambda row: row[0])[-2:]
        m1, m2 = r1.get("memory_child", {}), r2.get("memory_child", {})
        out["mf"]["local_slopes_two_largest_P"] = {
            key: (
                math.log(m2[key] / m1[key]) / math.log(p2 / p1)
                if m1.get(key, 0) > 0 and m2.get(key, 0) > 0
                else None
            )
            for key in ("net_peak_mib", "exec_peak_mib")
        }
    return out


def _fmt(v, spec, missing="-"):
    return missing if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_report(results):
    print(
        "\npeak MiB: peak RSS of a fresh subprocess running the configuration once, minus a "
        "build-only baseline subprocess;\nexec MiB: rise of the peak RSS during the run itself "
        "(high-water mark reset after loading the executable);\nXLA MiB: XLA's planned "
        "temporaries; speedup: dense route / matrix-free (profile rows: vs mf; block rows: vs "
        "block_mf)."
    )
    header = (
        f"{'P':>10} {'route':<12} {'compile s':>9} {'run s':>9} {'peak MiB':>9} {'exec MiB':>9} "
        f"{'XLA MiB':>10} {'speedup':>8} {'max rel diff (sigma_th, cum_th, sigma_x)':>42}"
    )
    print(header)
    print("-" * len(header))
    for pt in results["points"]:
        for route, r in pt["routes"].items():
            speed = r.get("speedup_vs_mf", r.get("speedup_vs_block_mf"))
            diff = r.get("max_rel_diff_vs_mf")
            if diff is not None:
                diff_s = "{:.1e}, {:.1e}, {:.1e}".format(
                    diff["sigma_theta"], diff["cum_theta"], diff["sigma_x"]
                )
            elif "max_rel_diff_vs_block_mf" in r:
                diff_s = f"{r['max_rel_diff_vs_block_mf']:.1e} (block)"
            else:
                diff_s = ""
            plan = r["xla_plan"]["temp_bytes"] / 2**20 if r["xla_plan"] else None
            print(
                f"{pt['n_params']:>10,} {route:<12} {r['compile_s']:>9.2f} "
                f"{r['run_median_s']:>9.3f} "
                f"{_fmt(r.get('memory_child', {}).get('net_peak_mib'), '9.1f'):>9} "
                f"{_fmt(r.get('memory_child', {}).get('exec_peak_mib'), '9.1f'):>9} "
                f"{_fmt(plan, '10.1f'):>10} {_fmt(speed, '7.1f') + 'x' if speed else '':>8} "
                f"{diff_s:>42}"
            )
        for route, why in pt.get("skipped", {}).items():
            print(f"{pt['n_params']:>10,} {route:<12} skipped: {why}")
    for d in results.get("dense_plans", []):
        print(
            f"{d['n_params']:>10,} {'dense':<12} compile-only: XLA plans "
            f"{d['xla_plan']['temp_bytes'] / 2**30:,.1f} GiB of temporaries"
        )
    print("\nlog-log slope of memory against P (dense ~2, matrix-free ~1 expected):")
    for route, s in results["memory_slopes"].items():
        line = (
            f"  {route:<10} P in [{s['fit_range_P'][0]:,}, {s['fit_range_P'][1]:,}] "
            f"({s['n_points']} pts): peak RSS {_fmt(s['peak_rss_slope'], '.2f')}, "
            f"run-only peak {_fmt(s['exec_peak_slope'], '.2f')}, "
            f"XLA temporaries {_fmt(s['xla_temp_slope'], '.2f')}"
        )
        if "xla_temp_slope_incl_compile_only" in s:
            hi = s["xla_temp_fit_range_P_incl_compile_only"][1]
            line += (
                f"; incl. compile-only plans up to P = {hi:,}: "
                f"{s['xla_temp_slope_incl_compile_only']:.2f}"
            )
        if s.get("xla_temp_slope_P_ge_1e4") is not None:
            line += f" (P >= 1e4 only: {s['xla_temp_slope_P_ge_1e4']:.2f})"
        if "local_slopes_two_largest_P" in s:
            loc = s["local_slopes_two_largest_P"]
            line += (
                f"; between the two largest P: peak RSS {_fmt(loc['net_peak_mib'], '.2f')}, "
                f"run-only {_fmt(loc['exec_peak_mib'], '.2f')}"
            )
        print(line)
    for route in ("dense", "dense_min"):
        both = [pt for pt in results["points"] if "speedup_vs_mf" in pt["routes"].get(route, {})]
        if both:
            pt = max(both, key=lambda p: p["n_params"])
            print(
                f"{route} / matrix-free at the largest P where both ran (P = {pt['n_params']:,}): "
                f"{pt['routes'][route]['speedup_vs_mf']:.0f}x"
            )
    agree = results["agreement"]
    print(
        f"\nagreement (matrix-free vs dense, all P where both ran): max relative difference "
        f"sigma_theta {agree['sigma_theta']:.1e}, cum_theta {agree['cum_theta']:.1e}, "
        f"sigma_x {agree['sigma_x']:.1e} (sigma_u {agree['sigma_u']:.1e}, "
        f"cum_u {agree['cum_u']:.1e}, cum_x {agree['cum_x']:.1e}); "
        f"matrix-free converged everywhere: {results['mf_converged_everywhere']}"
    )
    print(
        f"largest P: matrix-free {results['largest_P']['mf']:,}; "
        + ", ".join(f"{k} {v:,}" for k, v in results["largest_P"].items() if k != "mf")
    )
    env = results["environment"]
    print(
        f"load average before/after: {env['load_average_before']} / "
        f"{env['load_average_after']} on {env['cpu_count']} cores; "
        f"total wall {results['total_wall_s']:.0f} s"
    )


BASELINES = {
    "dense": ("mf", "learning_profile(method='dense')"),
    "dense_min": ("mf", "hand dense Jacobians (dense_min)"),
    "block_dense": ("block_mf", "one block: norm(jacfwd(step), 2)"),
}


def rows(results: dict) -> list[dict]:
    """The common rows (``_rows.row``): the matrix-free profile (``mf``; one block: ``block_mf``)
    against each dense route, and the skipped dense routes with the reason."""
    out = []
    for pt in results["points"]:
        routes = pt["routes"]
        case = f"P={pt['n_params']:,}"
        for other, (lib, name) in BASELINES.items():
            if other not in routes or lib not in routes:
                continue
            r, m = routes[other], routes[lib]
            mem = lambda x: x.get("memory_child", {}).get("exec_peak_mib")
            if lib == "mf":
                diff = r.get("max_rel_diff_vs_mf", {})
                note = f"max rel diff {max(diff.values()) if diff else float('nan'):.1e}"
                if mem(m) is not None and mem(r) is not None:
                    note += f"; run-peak {mem(m):.0f} / {mem(r):.0f} MiB"
            else:
                note = f"max rel diff {r.get('max_rel_diff_vs_block_mf', float('nan')):.1e}"
            out.append(row("profile", case, m["run_median_s"], name, r["run_median_s"], note))
        for other, why in pt.get("skipped", {}).items():
            mf = routes["mf"]
            out.append(row("profile", case, mf["run_median_s"], BASELINES[other][1], None, why))
    return out


def _file_digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small ladder (smoke test)")
    parser.add_argument("--repeats", type=int, default=0, help="timed rounds (0: 7 or 3)")
    parser.add_argument("--dense-max-p", type=int, default=1_700, help="run method='dense' up to")
    parser.add_argument("--dense-min-max-p", type=int, default=2_500, help="dense_min/block up to")
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    parser.add_argument("--child-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child is not None:
        child_main(json.loads(options.child))
        return

    start = time.perf_counter()
    ladder = QUICK_LADDER if options.quick else FULL_LADDER
    out_path = options.out or RESULTS / ("profile_quick.json" if options.quick else "profile.json")
    cache_dir = tempfile.mkdtemp(prefix="lspsde_bench_profile_cache_")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    lib = Path(lspsde.__file__).parent
    results = {
        "environment": {
            "jax": jax.__version__,
            "device": str(jax.devices()[0]),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
            "load_average_before": os.getloadavg(),
            "library_sha256_16": {
                name: _file_digest(lib / name)
                for name in (
                    "profile.py",
                    "_cumulative.py",
                    "linalg/norms.py",
                    "linalg/golub_kahan.py",
                )
            },
        },
        "settings": {
            "dtype": "float32",
            "n_samples": N_SAMPLES,
            "n_probes": N_PROBES,
            "eta": ETA,
            "T": T,
            "saved_steps": [0, T],
            "max_steps": MAX_STEPS,
            "rtol": RTOL,
            "activation": "relu",
            "init": "gaussian sigma_w=sqrt(2)",
            "dense_max_p": options.dense_max_p,
            "dense_min_max_p": options.dense_min_max_p,
            "quick": options.quick,
        },
        "points": [],
    }
    try:
        for widths in ladder:
            n_params = n_parameters(widths)
            routes, skipped = ["mf"], {}
            gib32, gib64 = n_params**2 * 4 / 2**30, n_params**2 * 8 / 2**30
            would_be = (
                f"one P x P Jacobian alone would need {gib32:,.3g} GiB (float32) / "
                f"{gib64:,.3g} GiB (float64)"
            )
            if n_params <= options.dense_max_p:
                routes.append("dense")
            else:
                skipped["dense"] = f"P > {options.dense_max_p:,} (O(P^3) time); {would_be}"
            if n_params <= options.dense_min_max_p:
                routes += ["dense_min", "block_mf", "block_dense"]
            else:
                skipped["dense_min"] = f"P > {options.dense_min_max_p:,}; {would_be}"
            point = measure_point(widths, routes, options, cache_dir)
            point["skipped"] = skipped
            results["points"].append(point)
        results["dense_plans"] = []
        if not options.quick:
            print("\ncompile-only XLA memory plans of method='dense':", flush=True)
            for widths in ladder:
                if n_parameters(widths) in DENSE_PLAN_P:
                    results["dense_plans"].append(plan_dense(widths))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    points = results["points"]
    results["memory_slopes"] = slopes(
        points, results["dense_plans"], mf_fit_min_p=16_000 if not options.quick else 0
    )
    agreement = {field: 0.0 for field in FIELDS}
    for pt in points:
        for route in ("dense", "dense_min"):
            diff = pt["routes"].get(route, {}).get("max_rel_diff_vs_mf")
            if diff:
                for field in FIELDS:
                    agreement[field] = max(agreement[field], diff[field])
    results["agreement"] = agreement
    results["mf_converged_everywhere"] = all(
        bool(pt["routes"]["mf"]["values"]["converged"]) for pt in points
    )
    results["largest_P"] = {
        route: max((pt["n_params"] for pt in points if route in pt["routes"]), default=0)
        for route in ROUTES
    }
    results["environment"]["load_average_after"] = os.getloadavg()
    results["total_wall_s"] = time.perf_counter() - start
    results["rows"] = rows(results)
    print_report(results)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
