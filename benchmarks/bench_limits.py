r"""Fixed-step ensembles of the SGD limit: ``lspsde.simulate(SGDLimit)`` beside a hand-written scan.

The workload is the stochastic modified equation of SGD (``lspsde.limits.SGDLimit``) on a
d-dimensional dense SPD quadratic $\mathcal{L}(\theta) = \frac12(\theta-\theta^*)^\top
H(\theta-\theta^*)$ (eigenvalues in [0.1, 1]), from $\theta^0 = 0$ with $\theta^* = 1$,

$$d\Theta = -H(\Theta - \theta^*)\,dt + \sqrt\eta\,B(\Theta)\,dW_t,$$

integrated by Euler–Maruyama with a fixed step $\delta = \eta / n$ ($n$ sub-steps per SGD step
of size $\eta$), for two noise models:

- ``isotropic``: ``IsotropicGaussian(sigma)``, additive, $B = (\sigma/\sqrt d) I_d$, $m = d$;
- ``state``: ``GaussianNoise(sigma0, sigma1)``, state dependent, $B(\theta)w = (\sigma_0 w_0 +
  \sigma_1\|\theta - \theta^*\| w_1)/\sqrt d$ with $w = (w_0, w_1)$, $m = 2d$.

Four implementations of the same scheme, side by side in one run:

- ``lspsde``: ``lspsde.simulate(Quadratic, SGDLimit(eta, dt=eta/n, solver=diffrax.Euler()),
  noise, save="summary", save_every=n_steps)`` -- what a user runs (input checks, divergence
  tracking, energy and loss at steps 0 and T included). Each SGD step draws SGD's own
  $\xi_k$ (``noise.sample``; for ``GaussianNoise`` one flat ``(2d,)`` normal) and a key
  (``SGDLimit.draw`` returns ``BrownianStep(total, key)``); the fixed sub-steps are a
  ``lax.scan`` of ``diffrax.Euler().step`` in which sub-step $i$ draws its increment of the
  exact Brownian bridge pinned to $\sqrt\eta\,\xi_k$ sequentially,
  $\Delta W_i = R_i/j_i + \sqrt{\delta(j_i-1)/j_i}\,z_i$ ($R_i$ the part not yet used, $j_i$
  sub-steps left); with $n = 1$ nothing is drawn beyond $\xi_k$.
- ``scan``: the baseline, Euler–Maruyama written by hand: ``jax.jit(jax.vmap(path))`` with one
  ``lax.scan`` over the $n \cdot$ n_steps fine steps, fine step $j$ of path $p$ drawing
  ``normal(fold_in(fold_in(key, p), j), (m,))``; it returns $\theta^T$ and nothing else (no
  coupling to SGD's draws, no checks, no divergence tracking).
- ``vbt``: ``diffrax.diffeqsolve(MultiTerm(ODETerm, ControlTerm), Euler(), ...,
  stepsize_controller=ConstantStepSize(), saveat=SaveAt(t1=True))`` over $[0, \eta T]$ with
  ``dt0 = delta``, driven by a ``VirtualBrownianTree(tol=delta/2)`` per path, ``jit(vmap)`` over
  paths: the general (adaptive- and adjoint-ready) path. It is slow, so it runs on
  ``n_paths / --vbt-fraction`` paths (default 4,096 / 64 = 64) with the full number of steps, and
  its time per path-step is extrapolated to the full ensemble (``n_paths_run`` and
  ``extrapolated`` in the JSON).
- ``ubp``: the same ``diffeqsolve`` driven by an ``UnsafeBrownianPath`` (fresh normals per
  step; valid only for fixed steps; ``adjoint=ForwardMode()``, as diffrax requires).

The diffusion terms of ``vbt`` and ``ubp`` are the lineax operators lspsde builds
(``DiagonalLinearOperator`` / a ``FunctionLinearOperator`` for ``GaussianNoise``), so the
comparison isolates the Brownian path and the integration loop.

Cases: d in (10, 100) x noise in (isotropic, state) x sub-steps n in (1, 32). With n = 1
(``SGDLimit(eta, dt=eta, solver=Euler())``, the limit at SGD's own resolution: it reproduces SGD
path by path) the ensemble is 4,096 paths x 1,000 SGD steps; with the default n = 32 it is 4,096
paths x 8 SGD steps = 256 fine steps (``--steps-32``; a 125x shorter horizon, to fit the time
budget). Throughput counts *fine* steps: path-steps/s = n_paths * n * n_steps / time.
eta = 1/8 (exact in float32; ``_check_substeps`` guards the sub-step count).

Timing: float32 (JAX's default, as in ``bench_simulate.py``; ``BENCH_X64=1`` for float64). The
jitted baselines are compiled ahead of time (``compile_s`` = ``lower().compile()``); ``lspsde``
runs are called once first (``compile_s`` = first call minus the median run, input checks
included). Then ``--repeats`` rounds, the implementations interleaved within each round so that
load from other processes hits all alike; medians reported, ratios to ``scan`` per path-step, as
ratio of medians and as median of the per-round ratios. Sanity check: every implementation's
$\mathbb{E}\|\theta^T - \theta^*\|^2$ and its standard error are recorded (the draws differ, so
they agree in distribution, not path by path).

``--profile`` runs, instead, on ``PROFILE_CASES``: the hand-written scan with the same bridge
law as ``SGDLimit``, once with all $n$ sub-step increments of an SGD step pre-sampled as one
``(n, m)`` block before the sub-step scan (``scan_presampled``, what ``lspsde.limits`` did
before) and once drawn sequentially inside it (``scan_sequential``, what it does now), beside
``scan`` and ``lspsde``: the reason the bridge is drawn sequentially (on 2 shared CPU cores the
pre-sampled block measured 2.1-2.2x ``scan`` at d = 100, n = 32, the sequential draw 1.15-1.6x;
at n = 1 there is no bridge and all three agree).

Run: ``.venv/bin/python benchmarks/bench_limits.py --repeats 2`` (about 7 minutes on 2 shared
CPU cores at load ~2-5; the d = 100 ``GaussianNoise`` case dominates); ``--quick`` (10x fewer
steps, 4x fewer paths; ~2 minutes, mostly compilation) is a smoke test;
``--profile --paths 2048 --steps 200 --repeats 3`` (~2 minutes) the bridge comparison. Results go to
``benchmarks/results/limits.json`` (``limits_quick.json``, ``limits_profile.json``).
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

import jax

if os.environ.get("BENCH_X64", "0") == "1":
    jax.config.update("jax_enable_x64", True)

import diffrax as dfx
import jax.numpy as jnp
import lineax as lx

sys.path.insert(0, str(Path(__file__).parent))
from _rows import environment, row

from lspsde._simulate import simulate
from lspsde.limits import SGDLimit
import lspsde.noise
from models.objectives import Quadratic

RESULTS = Path(__file__).parent / "results"
ETA = 0.125  # SGD step (time per step), eta * L = 1/8: exact in float32 (see _check_substeps)
SIGMA = 1.0  # IsotropicGaussian
SIGMA0, SIGMA1 = 1.0, 0.5  # GaussianNoise
NOISES = ("isotropic", "state")


def problem(d: int, noise: str) -> dict:
    """A dense SPD quadratic with eigenvalues in [0.1, 1] (L = 1), theta* = 1, theta0 = 0."""
    key = jax.random.key(1234)
    q, _ = jnp.linalg.qr(jax.random.normal(key, (d, d)))
    H = (q * jnp.linspace(0.1, 1.0, d)) @ q.T
    H = 0.5 * (H + H.T)  # exactly symmetric (Quadratic checks symmetry)
    if noise == "isotropic":
        model = lspsde.noise.IsotropicGaussian(SIGMA)
    else:
        model = lspsde.noise.GaussianNoise(SIGMA0, SIGMA1)
    m = d if noise == "isotropic" else 2 * d
    return {
        "H": H,
        "theta_star": jnp.ones(d),
        "theta0": jnp.zeros(d),
        "noise": noise,
        "model": model,
        "m": m,
    }


def _diffusion(prob: dict) -> Callable:
    r"""$\sqrt\eta\,B(\theta)$ as a lineax operator (the forms lspsde builds), for diffrax."""
    d, dtype = prob["theta0"].shape[0], prob["theta0"].dtype
    root_eta = math.sqrt(ETA)
    if prob["noise"] == "isotropic":
        diag = jnp.full((d,), root_eta * SIGMA / math.sqrt(d), dtype)
        return lambda t, y, args: lx.DiagonalLinearOperator(diag)
    theta_star = prob["theta_star"]

    def vf(t, y, args):
        level = SIGMA1 * jnp.sqrt(jnp.sum((y - theta_star) ** 2))
        mv = lambda w: root_eta * (SIGMA0 * w[:d] + level * w[d:]) / math.sqrt(d)
        return lx.FunctionLinearOperator(mv, jax.ShapeDtypeStruct((2 * d,), dtype))

    return vf


# -- implementations: each maker returns (thunk giving theta^T of shape (paths, d), compile_s)
# -- for jitted programs the compile time is measured ahead of time; None: first call minus median


def _aot(run, *args) -> tuple[Callable[[], jax.Array], float]:
    start = time.perf_counter()
    compiled = run.lower(*args).compile()
    return (lambda: compiled(*args)), time.perf_counter() - start


def lspsde_impl(prob: dict, n_paths: int, n_steps: int, n_sub: int, coupled: bool = True):
    objective = Quadratic(prob["H"], prob["theta_star"])
    limit = SGDLimit(ETA, dt=ETA / n_sub, solver=dfx.Euler(), coupled=coupled)
    _check_substeps(limit, n_sub)
    key = jax.random.key(0)
    fn = lambda: (
        simulate(
            (objective, limit, prob["model"]),
            prob["theta0"],
            key=key,
            n_paths=n_paths,
            n_steps=n_steps,
            save_every=n_steps,
            save="summary",
            progress=False,
        ).final_theta
    )
    return fn, None


def _check_substeps(limit: SGDLimit, n_sub: int) -> None:
    # The throughput counts n fine steps per SGD step: make sure SGDLimit runs exactly n
    # (ETA = 1/8 and ETA / n are exact in float32, so this is a guard, not a workaround).
    if limit.n_substeps != n_sub:
        raise RuntimeError(f"SGDLimit made {limit.n_substeps} sub-steps, not {n_sub}.")


def _hand_em(prob: dict, n_paths: int, n_steps: int, n_sub: int, brownian: str):
    r"""Euler–Maruyama by hand, ``jit(vmap(scan))``, returning $\theta^T$. ``brownian``:

    - ``"flat"`` (the baseline): one scan over all fine steps, fine step $j$ drawing
      ``normal(fold_in(k_p, j), (m,))``;
    - ``"presampled"``: what ``lspsde.limits`` did before: per SGD step, $\xi$ and all $n$
      sub-step normals drawn up front as one ``(n, m)`` block, the bridge
      $\sqrt\delta(z_i - \bar z) + \sqrt\eta\,\xi/n$, then a scan over the sub-steps;
    - ``"sequential"``: what ``SGDLimit`` does now: the same bridge law sampled sub-step by
      sub-step inside the scan, $\Delta W_i = R_i/k_i + \sqrt{\delta(k_i - 1)/k_i}\,z_i$ with
      $R_i$ the part of $\sqrt\eta\,\xi$ not yet used and $k_i = n - i$ the sub-steps left.
    """
    n_fine = n_steps * n_sub
    m, state = prob["m"], prob["noise"] == "state"
    delta = ETA / n_sub

    @jax.jit
    def run(H, theta_star, theta0, key):
        d, dtype = theta0.shape[0], theta0.dtype
        root = math.sqrt(ETA / d)

        def em(theta, dw):  # one Euler–Maruyama step, dw ~ N(0, delta I_m)
            e = theta - theta_star
            if state:
                w = SIGMA0 * dw[:d] + SIGMA1 * jnp.sqrt(jnp.sum(e * e)) * dw[d:]
            else:
                w = SIGMA * dw
            return theta - delta * (H @ e) + root * w

        def normal(k, shape=(m,)):
            return jax.random.normal(k, shape, dtype)

        def path(p):
            k_p = jax.random.fold_in(key, p)
            if brownian == "flat":

                def fine(theta, j):
                    return em(theta, math.sqrt(delta) * normal(jax.random.fold_in(k_p, j))), None

                return jax.lax.scan(fine, theta0, jnp.arange(n_fine))[0]

            def sgd_step(theta, t):
                k = jax.random.fold_in(k_p, t)
                total = math.sqrt(ETA) * normal(k)
                if n_sub == 1:
                    return em(theta, total), None
                if brownian == "presampled":
                    z = normal(jax.random.fold_in(k, 1), (n_sub, m))
                    dws = math.sqrt(delta) * (z - jnp.mean(z, axis=0)) + total / n_sub
                    return jax.lax.scan(lambda th, dw: (em(th, dw), None), theta, dws)[0], None

                def sub(carry, i):
                    th, rest = carry
                    left = (n_sub - i).astype(dtype)
                    z = normal(jax.random.fold_in(k, i + 1))
                    dw = rest / left + jnp.sqrt(delta * (left - 1) / left) * z
                    return (em(th, dw), rest - dw), None

                return jax.lax.scan(sub, (theta, total), jnp.arange(n_sub))[0][0], None

            return jax.lax.scan(sgd_step, theta0, jnp.arange(n_steps))[0]

        return jax.vmap(path)(jnp.arange(n_paths))

    return _aot(run, prob["H"], prob["theta_star"], prob["theta0"], jax.random.key(0))


def scan_impl(prob, n_paths, n_steps, n_sub):
    return _hand_em(prob, n_paths, n_steps, n_sub, "flat")


def _diffrax(prob: dict, n_paths: int, n_steps: int, n_sub: int, brownian: str):
    n_fine = n_steps * n_sub
    m = prob["m"]
    vf = _diffusion(prob)
    # UnsafeBrownianPath cannot be checkpointed (the default RecursiveCheckpointAdjoint refuses
    # it); ForwardMode is diffrax's suggestion, and the forward pass is the same.
    adjoint = dfx.ForwardMode() if brownian == "ubp" else dfx.RecursiveCheckpointAdjoint()

    @jax.jit
    def run(H, theta_star, theta0, key):
        dtype = theta0.dtype
        delta = ETA / n_sub
        t1 = ETA * n_steps
        drift = dfx.ODETerm(lambda t, y, args: -(H @ (y - theta_star)))
        shape = jax.ShapeDtypeStruct((m,), dtype)

        def path(p):
            k_p = jax.random.fold_in(key, p)
            if brownian == "vbt":
                bm = dfx.VirtualBrownianTree(0.0, t1, tol=delta / 2, shape=shape, key=k_p)
            else:
                bm = dfx.UnsafeBrownianPath(shape=shape, key=k_p)
            sol = dfx.diffeqsolve(
                dfx.MultiTerm(drift, dfx.ControlTerm(vf, bm)),
                dfx.Euler(),
                0.0,
                t1,
                dt0=delta,
                y0=theta0,
                saveat=dfx.SaveAt(t1=True),
                stepsize_controller=dfx.ConstantStepSize(),
                max_steps=n_fine + 8,  # float32 time may need a last sliver of a step
                adjoint=adjoint,
            )
            return sol.ys[-1]

        return jax.vmap(path)(jnp.arange(n_paths))

    return _aot(run, prob["H"], prob["theta_star"], prob["theta0"], jax.random.key(0))


def vbt_impl(prob, n_paths, n_steps, n_sub):
    return _diffrax(prob, n_paths, n_steps, n_sub, "vbt")


def ubp_impl(prob, n_paths, n_steps, n_sub):
    return _diffrax(prob, n_paths, n_steps, n_sub, "ubp")


def lspsde_uncoupled_impl(prob: dict, n_paths: int, n_steps: int, n_sub: int):
    """``SGDLimit(..., coupled=False)``: independent sub-step increments, no bridge."""
    return lspsde_impl(prob, n_paths, n_steps, n_sub, coupled=False)


IMPLS = {
    "lspsde": lspsde_impl,
    "lspsde_uncoupled": lspsde_uncoupled_impl,
    "scan": scan_impl,
    "vbt": vbt_impl,
    "ubp": ubp_impl,
}


# -- --profile: the bridge pre-sampled as one block vs drawn sub-step by sub-step -------------


def scan_presampled_impl(prob, n_paths, n_steps, n_sub):
    return _hand_em(prob, n_paths, n_steps, n_sub, "presampled")


def scan_sequential_impl(prob, n_paths, n_steps, n_sub):
    return _hand_em(prob, n_paths, n_steps, n_sub, "sequential")


PROFILE_IMPLS = {
    "scan": scan_impl,
    "scan_presampled": scan_presampled_impl,
    "scan_sequential": scan_sequential_impl,
    "lspsde": lspsde_impl,
    "lspsde_uncoupled": lspsde_uncoupled_impl,
}
PROFILE_CASES = [(10, "isotropic", 1), (10, "state", 1), (100, "isotropic", 32), (100, "state", 32)]


# -- timing -----------------------------------------------------------------------------------


def _time(fn: Callable[[], jax.Array]) -> tuple[float, jax.Array]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def compare(
    d: int,
    noise: str,
    n_paths: int,
    n_steps: int,
    n_sub: int,
    impls: dict,
    repeats: int,
    fractions: dict[str, int],
) -> dict:
    prob = problem(d, noise)
    n_fine = n_steps * n_sub
    paths = {name: max(1, n_paths // fractions.get(name, 1)) for name in impls}
    fns, compile_s, first, outputs = {}, {}, {}, {}
    for name, make in impls.items():
        fns[name], compile_s[name] = make(prob, paths[name], n_steps, n_sub)
        if compile_s[name] is None:  # not compiled ahead of time: the first call compiles
            first[name], outputs[name] = _time(fns[name])
    runs: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in fns.items():
            elapsed, outputs[name] = _time(fn)
            runs[name].append(elapsed)
    out: dict = {
        "d": d,
        "noise": noise,
        "brownian_dim": prob["m"],
        "n_paths": n_paths,
        "n_steps": n_steps,
        "n_substeps": n_sub,
        "fine_steps": n_fine,
        "load_average_after": os.getloadavg(),
    }
    per_step = {name: [t / (paths[name] * n_fine) for t in runs[name]] for name in impls}
    for name in impls:
        median = statistics.median(runs[name])
        energy = jnp.sum((outputs[name] - prob["theta_star"]) ** 2, axis=-1)
        out[name] = {
            "n_paths_run": paths[name],
            "run_median_s": median,
            "run_all_s": runs[name],
            "path_steps_per_s": paths[name] * n_fine / median,
            "full_size_s": n_paths * n_fine * statistics.median(per_step[name]),
            "extrapolated": paths[name] != n_paths,
            "compile_s": compile_s[name] if compile_s[name] is not None else first[name] - median,
            "mean_final_energy": float(jnp.mean(energy)),
            "sem_final_energy": float(jnp.std(energy, ddof=1) / math.sqrt(energy.size)),
        }
        # Per path-step, so a run on fewer paths compares too. Runs are interleaved, so run i
        # of each saw about the same load: the median of per-round ratios is less sensitive to
        # load drift than the ratio of medians.
        out[name]["ratio_to_scan"] = statistics.median(per_step[name]) / statistics.median(
            per_step["scan"]
        )
        out[name]["paired_ratio_to_scan"] = statistics.median(
            a / b for a, b in zip(per_step[name], per_step["scan"], strict=True)
        )
    return out


def _print_case(r: dict, names: list[str]) -> None:
    head = f"{r['d']:>4} {r['noise']:>9} {r['n_substeps']:>3} {r['fine_steps']:>5} |"
    cells = []
    for name in names:
        x = r[name]
        star = "*" if x["extrapolated"] else " "
        cells.append(
            f"{name}: {x['full_size_s']:7.2f}s{star} {x['path_steps_per_s'] / 1e6:5.2f}M/s "
            f"{x['ratio_to_scan']:5.2f}x ({x['paired_ratio_to_scan']:.2f}) c{x['compile_s']:4.1f}s"
        )
    print(head + " | ".join(cells), flush=True)


BASELINES = {
    "scan": "hand Euler-Maruyama jit(vmap(scan))",
    "ubp": "diffrax UnsafeBrownianPath",
    "vbt": "diffrax VirtualBrownianTree",
}


def rows(results: dict) -> list[dict]:
    """The common rows (``_rows.row``): ``lspsde`` against each baseline, full-size times
    (per path-step medians times the full ensemble; vbt is extrapolated)."""
    out = []
    for r in results["cases"]:
        if "lspsde" not in r:
            continue
        lib = r["lspsde"]
        case = (
            f"SGDLimit n={r['n_substeps']}, {r['noise']}, d={r['d']}, "
            f"{r['n_paths']:,} x {r['fine_steps']:,} fine steps"
        )
        for other, name in BASELINES.items():
            if other not in r:
                continue
            x = r[other]
            note = (
                f"paired (via scan) {lib['paired_ratio_to_scan'] / x['paired_ratio_to_scan']:.2f}x"
            )
            if x["extrapolated"]:
                note += f"; {other} run on {x['n_paths_run']} paths, extrapolated"
            out.append(row("limits", case, lib["full_size_s"], name, x["full_size_s"], note))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="10x fewer steps (smoke test)")
    parser.add_argument("--paths", type=int, default=4_096)
    parser.add_argument("--steps", type=int, default=1_000, help="SGD steps with n = 1")
    parser.add_argument(
        "--steps-32", type=int, default=8, help="SGD steps with n = 32 (32x as many fine steps)"
    )
    parser.add_argument(
        "--vbt-fraction",
        type=int,
        default=64,
        help="VirtualBrownianTree runs on paths / this many paths (extrapolated per path-step)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the comparison: pre-sampled vs sequential bridge (PROFILE_CASES)",
    )
    parser.add_argument("--out", type=Path, help="write the JSON here (default results/NAME.json)")
    options = parser.parse_args()
    steps = {1: options.steps, 32: options.steps_32}
    n_paths = options.paths
    if options.quick:
        steps = {n: max(1, s // 10) for n, s in steps.items()}
        n_paths = max(1, n_paths // 4)
    if options.profile:
        impls, fractions = PROFILE_IMPLS, {}
        cases = PROFILE_CASES
        name = "limits_profile"
    else:
        impls, fractions = IMPLS, {"vbt": options.vbt_fraction}
        cases = [(d, noise, n) for n in (1, 32) for d in (10, 100) for noise in NOISES]
        name = "limits"
    if options.quick:
        name += "_quick"

    dtype = str(jnp.zeros(()).dtype)
    results = {
        "environment": environment(diffrax=dfx.__version__, dtype=dtype),
        "workload": (
            f"Euler-Maruyama of the SGD limit on a dense SPD quadratic (eigenvalues in [0.1, 1]), "
            f"eta = {ETA}, n sub-steps per SGD step; noise: IsotropicGaussian({SIGMA}) or "
            f"GaussianNoise({SIGMA0}, {SIGMA1}); throughput counts fine steps"
        ),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(options).items()},
        "cases": [],
    }
    print(
        f"dtype {dtype}; {n_paths} paths; median of {options.repeats} interleaved rounds, "
        "compile excluded. Per implementation: full-size time (* = extrapolated from "
        f"paths / {options.vbt_fraction}), Mpath-steps/s, time per path-step / scan's (median "
        "of per-round ratios), compile time."
    )
    print("   d     noise   n  fine |")
    for d, noise, n_sub in cases:
        r = compare(d, noise, n_paths, steps[n_sub], n_sub, impls, options.repeats, fractions)
        results["cases"].append(r)
        _print_case(r, [k for k in impls if k in r])
    results["environment"]["load_average_end"] = os.getloadavg()
    results["rows"] = rows(results)
    path = options.out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
