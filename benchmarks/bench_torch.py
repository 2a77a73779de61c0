r"""PyTorch baselines for issue 9's ensemble workload: a plain PyTorch loop and ``torchsde.sdeint``.

Standalone: no lspsde and no JAX import, so it runs in a separate (Python 3.11, CPU torch) venv:

    /usr/bin/python3.11 -m venv .venv-torch
    .venv-torch/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl \
        torchsde numpy          # the CPU wheel; elsewhere see benchmarks/README.md
    .venv-torch/bin/python benchmarks/bench_torch.py [--quick] [--repeats 3]

Workload (issue 9, "Speed"): SGD on the quadratic $\frac12\theta^\top H\theta$ ($d = 16$, dense
SPD, eigenvalues in [0.1, 1], built by :func:`quadratic` from a fixed NumPy seed, so the JAX side
of ``bench_vs_torch.py`` uses the same H) with isotropic Gaussian gradient noise,

$$\theta^{t+1} = \theta^t - \eta\,(H\theta^t + s\,\xi^t),\qquad \xi^t \sim N(0, I_d),
\quad s = \sigma/\sqrt d,$$

from $\theta^0 = 1$, $\eta = 1$, $\sigma = 1$, 4,096 paths x 1,000 steps; only the final state
is kept (and its summary, the mean of $\|\theta^T\|^2$ over paths).

- ``torch_loop``: a Python loop over steps, batched over paths (``(n, d) @ H``), in-place
  ``normal_`` from one ``torch.Generator`` and ``addmm``, under ``torch.no_grad()``; float32 and
  float64.
- ``torch_loop_summary``: the same loop, also recording every path's energy ``||theta||^2`` and
  loss after every step, as ``simulate(save="summary")`` does (same outputs as lspsde).
- ``torchsde``: ``torchsde.sdeint`` of the SGD-limit SDE $d\Theta = -H\Theta\,dt +
  \sqrt\eta\,s\,dW_t$ (Ito, ``noise_type="diagonal"``), ``method="euler"``, ``dt = eta``, over
  $[0, \eta T]$ with ``ts = [0, eta T]`` (T steps, the same number as SGD), the default Brownian
  motion (``BrownianInterval``); float32. At ``dt = eta`` Euler--Maruyama of this SDE is SGD in
  law (the increment is $\sqrt\eta\,s\sqrt\eta\,\xi$), so all rows sample the same distribution.

Correctness: each row prints the mean final $\|\theta\|^2$ with its Monte Carlo standard error
and the exact value (:func:`exact_mean_square`; the recursion is linear, so
$E\|\theta^T\|^2$ is a closed form in H's eigenvalues).

Timing: ``--warmup`` untimed calls of each implementation (torch has no compile step; the first
call pays allocator and thread-pool start-up), then ``--repeats`` rounds, the implementations
interleaved, median reported; throughput = paths x steps / median. Output: one JSON object on the
last line of stdout (``--json-only``: only it); ``bench_vs_torch.py`` runs this script in rounds
interleaved with lspsde and turns it into rows of the common table (``run.py``).
"""

import argparse
import json
import math
import os
import platform
import statistics
import time

import numpy as np

D, N_PATHS, N_STEPS = 16, 4_096, 1_000
ETA, SIGMA = 1.0, 1.0


def quadratic(d: int = D, seed: int = 1234) -> np.ndarray:
    """A dense SPD H (float64) with eigenvalues linspace(0.1, 1, d); exactly symmetric."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    H = (q * np.linspace(0.1, 1.0, d)) @ q.T
    return 0.5 * (H + H.T)


def exact_mean_square(H: np.ndarray, theta0: np.ndarray, n_steps: int, eta: float, s: float):
    """E||theta^T||^2 of theta <- (I - eta H) theta - eta s xi, exactly (float64)."""
    lam, q = np.linalg.eigh(H)
    a = 1.0 - eta * lam
    c = q.T @ theta0
    a2t = a ** (2 * n_steps)
    noise = np.where(np.abs(1 - a**2) > 0, (1 - a2t) / np.where(a**2 != 1, 1 - a**2, 1), n_steps)
    return float(np.sum(a2t * c**2 + (eta * s) ** 2 * noise))


def _summary(theta) -> dict:
    sq = (theta.double() ** 2).sum(dim=1)
    return {
        "mean_final_sq_norm": float(sq.mean()),
        "sem_final_sq_norm": float(sq.std() / math.sqrt(sq.numel())),
        "finite": bool(np.isfinite(float(sq.sum()))),
    }


def make_loop(H, theta0, n_paths: int, n_steps: int, dtype):
    import torch

    Ht = torch.as_tensor(H, dtype=dtype)
    th0 = torch.as_tensor(theta0, dtype=dtype)
    s = SIGMA / math.sqrt(H.shape[0])
    gen = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def run():
        theta = th0.expand(n_paths, -1).clone()
        xi = torch.empty_like(theta)
        for _ in range(n_steps):
            xi.normal_(generator=gen)
            # g = s xi + theta @ H (H symmetric); theta <- theta - eta g
            g = torch.addmm(xi, theta, Ht, beta=s)
            theta.add_(g, alpha=-ETA)
        return theta

    return run


def make_loop_summary(H, theta0, n_paths: int, n_steps: int, dtype):
    """``make_loop`` that also records what ``simulate(save="summary")`` records: the energy
    ``||theta||^2`` and the loss ``theta^T H theta / 2`` of every path after every step."""
    import torch

    Ht = torch.as_tensor(H, dtype=dtype)
    th0 = torch.as_tensor(theta0, dtype=dtype)
    s = SIGMA / math.sqrt(H.shape[0])
    gen = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def run():
        theta = th0.expand(n_paths, -1).clone()
        xi = torch.empty_like(theta)
        energy = torch.empty(n_steps + 1, n_paths, dtype=dtype)
        loss = torch.empty(n_steps + 1, n_paths, dtype=dtype)
        energy[0] = (theta * theta).sum(1)
        loss[0] = 0.5 * (theta * (theta @ Ht)).sum(1)
        for t in range(n_steps):
            xi.normal_(generator=gen)
            theta.add_(torch.addmm(xi, theta, Ht, beta=s), alpha=-ETA)
            torch.sum(theta * theta, 1, out=energy[t + 1])
            torch.sum(theta * (theta @ Ht), 1, out=loss[t + 1]).mul_(0.5)
        return theta

    return run


def make_torchsde(H, theta0, n_paths: int, n_steps: int, dtype):
    import torch
    import torchsde

    Ht = torch.as_tensor(H, dtype=dtype)
    th0 = torch.as_tensor(theta0, dtype=dtype)
    diffusion = math.sqrt(ETA) * SIGMA / math.sqrt(H.shape[0])

    class SGDLimit(torch.nn.Module):
        noise_type = "diagonal"
        sde_type = "ito"

        def f(self, t, y):
            return -(y @ Ht)

        def g(self, t, y):
            return torch.full_like(y, diffusion)

    sde = SGDLimit()
    ts = torch.tensor([0.0, ETA * n_steps], dtype=dtype)

    @torch.no_grad()
    def run():
        y0 = th0.expand(n_paths, -1).clone()
        return torchsde.sdeint(sde, y0, ts, method="euler", dt=ETA)[-1]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10x fewer steps (smoke test)")
    parser.add_argument("--paths", type=int, default=N_PATHS)
    parser.add_argument("--steps", type=int, default=N_STEPS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--impls",
        default="torch_loop_float32,torch_loop_float64,torchsde_float32",
        help="comma-separated: torch_loop, torch_loop_summary, torchsde, each _float32/_float64",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: the fastest here; 0 keeps torch's default)",
    )
    parser.add_argument("--json-only", action="store_true")
    options = parser.parse_args()

    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    n_steps = options.steps // 10 if options.quick else options.steps
    n_paths = options.paths
    H, theta0 = quadratic(), np.ones(D)
    s = SIGMA / math.sqrt(D)
    exact = exact_mean_square(H, theta0, n_steps, ETA, s)
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    makers = {
        "torch_loop": make_loop,
        "torch_loop_summary": make_loop_summary,
        "torchsde": make_torchsde,
    }
    fns = {}
    for name in options.impls.split(","):
        kind, dtype = name.rsplit("_", 1)
        fns[name] = makers[kind](H, theta0, n_paths, n_steps, dtypes[dtype])

    outputs = {}
    for name, fn in fns.items():
        for _ in range(options.warmup):
            outputs[name] = fn()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(options.repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            outputs[name] = fn()
            runs[name].append(time.perf_counter() - start)

    results = {
        "environment": {
            "torch": torch.__version__,
            "torchsde": __import__("torchsde").__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "workload": {
            "d": D,
            "n_paths": n_paths,
            "n_steps": n_steps,
            "eta": ETA,
            "sigma": SIGMA,
            "theta0": "ones",
            "exact_mean_final_sq_norm": exact,
        },
        "impls": {},
    }
    for name in fns:
        median = statistics.median(runs[name])
        results["impls"][name] = {
            "run_median_s": median,
            "run_all_s": runs[name],
            "path_steps_per_s": n_paths * n_steps / median,
            **_summary(outputs[name]),
        }
    if not options.json_only:
        print(f"exact E||theta_T||^2 = {exact:.5f}; {n_paths} paths x {n_steps} steps, d = {D}")
        for name, r in results["impls"].items():
            print(
                f"{name:<20} {r['run_median_s']:8.3f} s  {r['path_steps_per_s'] / 1e6:7.3f} M "
                f"path-steps/s  mean ||theta_T||^2 = {r['mean_final_sq_norm']:.5f} "
                f"+- {r['sem_final_sq_norm']:.5f}"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
