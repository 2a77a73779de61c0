r"""Experiment *noise_ablation*: one least-squares problem under every noise model (Section 5).

$\mathcal{L}(\theta) = \frac1{2n}\|A\theta - b\|^2$ on a small synthetic regression data set
(``models.synthetic_regression``, ``models.LeastSquares``: $\mu$, $L$, $\theta^*$ exact), SGD with
one constant step $\eta = r\cdot 2\mu/L^2$, and each noise model of ``lspsde.noise``. The noise
level is matched to the data: $\sigma^2 := \mathbb{E}\|G - \nabla\mathcal{L}\|^2$ of minibatch
sampling at $\theta^*$ (``MinibatchNoise(B, n).variance``), and every additive model is scaled
to that variance at $\theta^*$ where it has one (Student-$t$ with $\nu > 2$: scale
$\sigma\sqrt{(\nu - 2)/\nu}$; with $\nu \le 2$ and $\alpha$-stable, which have none, the same
scale $\sigma$, resp. $\sigma/\sqrt2$, the $\alpha = 2$ Gaussian match).

For every model: its declaration of Assumption 1 (``assumption1``: holds?, $\sigma_0$,
$\sigma_1$) checked against a Monte Carlo estimate of $\mathbb{E}\|G - \nabla\mathcal{L}\|^2$ at
$\theta^*$; the stationary level $\lim\mathbb{E}\|\theta^t - \theta^*\|^2$ (tail mean, CLT
interval over paths) against Theorem 5.2's $\eta^2\sigma_0^2/(1 - q(\eta))$ where the
assumption holds and $\eta < \eta_{\max}(\sigma_1)$; the diverged fraction; and, for the tails,
Hill's estimate of the tail index of $\|\theta^T - \theta^*\|$ over paths next to the noise's
own index ($\nu$ or $\alpha$), and $\max_{t, p}\|\theta^t_p - \theta^*\|$. Heavy-tailed models
with infinite variance break Assumption 1: they are reported, never fitted through.
"""

import math
from typing import Annotated, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from pydantic import Field, model_validator
from tqdm.auto import tqdm
import xarray as xr

import models

from .. import theory
from .._simulate import saved_steps, simulate
from ..noise import (
    AlphaStableNoise,
    AnisotropicGaussian,
    CurvatureNoise,
    GaussianNoise,
    IsotropicGaussian,
    MinibatchNoise,
    NoNoise,
    StudentTNoise,
)
from ..parameter import SGD
from . import _mc
from .config import Grid, Level, NonNegativeFloat, PositiveFloat, PositiveInt, Strict
from .experiment import Check, Experiment

NoiseKind = Literal[
    "none",
    "isotropic",
    "anisotropic",
    "gaussian",
    "curvature",
    "minibatch",
    "student_t",
    "alpha_stable",
]


class NoiseAblation(Strict):
    """Every noise model on one least-squares problem at a matched noise level (Section 5)."""

    noise: list[NoiseKind] = list(NoiseKind.__args__)
    dim: PositiveInt = 5
    n_examples: Annotated[int, Field(ge=2)] = 64
    data_noise: PositiveFloat = 0.5
    batch_size: PositiveInt = 8
    eta_over_etamax: Annotated[float, Field(gt=0, lt=1)] = 0.4
    initial_distance: PositiveFloat = 2.0
    gaussian_sigma1: NonNegativeFloat = 0.3
    student_df: Grid(PositiveFloat) = [5.0, 1.5]
    stable_alpha: Grid(Annotated[float, Field(gt=1, le=2)]) = [1.5]
    n_paths: Annotated[int, Field(ge=50)] = 1000
    n_steps: Annotated[int, Field(ge=20)] = 1000
    save_every: PositiveInt = 5
    n_variance_draws: Annotated[int, Field(ge=100)] = 20000
    level: Level = 0.99
    divergence_threshold: Annotated[float, Field(gt=0, le=1e100)] = 1e8

    @model_validator(mode="after")
    def _sizes(self):
        if len(set(self.noise)) != len(self.noise) or not self.noise:
            raise ValueError(f"noise must list distinct models, got {self.noise}")
        if self.n_examples < self.dim:
            raise ValueError(
                f"n_examples = {self.n_examples} < dim = {self.dim}: the least-squares "
                "Hessian A^T A / n would be singular (mu = 0); use n_examples >= dim"
            )
        if self.batch_size > self.n_examples:
            raise ValueError(
                f"batch_size = {self.batch_size} exceeds n_examples = {self.n_examples}"
            )
        if self.n_steps < 20 * self.save_every:
            raise ValueError(
                f"n_steps = {self.n_steps} gives fewer than 20 saved steps with save_every = "
                f"{self.save_every}"
            )
        return self


_HOLDS = {True: 1, False: 0, None: -1}


def noise_models(cfg: NoiseAblation, sigma: float) -> list[tuple[str, object, float]]:
    r"""``(label, noise model, tail index of the noise)`` for each requested kind, with the noise
    level matched to $\sigma$ (see the module docstring); the index is ``inf`` for light tails
    and NaN where it is not known in advance (data-driven noise)."""
    d, B, n = cfg.dim, cfg.batch_size, cfg.n_examples
    out = []
    for kind in cfg.noise:
        if kind == "none":
            out.append(("none", NoNoise(), np.nan))
        elif kind == "isotropic":
            out.append(("isotropic", IsotropicGaussian(sigma), np.inf))
        elif kind == "anisotropic":
            s = np.linspace(1.0, 3.0, d)
            out.append(("anisotropic", AnisotropicGaussian(sigma * s / np.linalg.norm(s)), np.inf))
        elif kind == "gaussian":
            label = f"gaussian(sigma1={cfg.gaussian_sigma1:g})"
            out.append((label, GaussianNoise(sigma, cfg.gaussian_sigma1), np.inf))
        elif kind == "curvature":
            out.append((f"curvature(B={B})", CurvatureNoise(B, n), np.nan))
        elif kind == "minibatch":
            out.append((f"minibatch(B={B})", MinibatchNoise(B, n), np.nan))
        elif kind == "student_t":
            for df in cfg.student_df:
                scale = sigma * math.sqrt((df - 2) / df) if df > 2 else sigma
                out.append((f"student_t(df={df:g})", StudentTNoise(scale, df), df))
        elif kind == "alpha_stable":
            for a in cfg.stable_alpha:
                index = np.inf if a == 2 else a
                out.append(
                    (f"alpha_stable({a:g})", AlphaStableNoise(sigma / math.sqrt(2), a), index)
                )
    return out


@eqx.filter_jit
def _noise_energy(noise, objective, theta, keys):
    r"""$\|G(\theta, u_j) - \nabla\mathcal{L}(\theta)\|^2$ for independent draws $u_j$."""
    grad = objective.gradient(theta)

    def one(k):
        g = noise.gradient(objective, theta, noise.sample(k, theta))
        return jnp.sum((g - grad) ** 2)

    return jax.vmap(one)(keys)


def run(cfg: NoiseAblation, key, progress: bool) -> xr.Dataset:
    k_data, k_start, k_var, k_sim = jax.random.split(key, 4)
    data = models.synthetic_regression(k_data, cfg.n_examples, cfg.dim, cfg.data_noise)
    objective = models.LeastSquares(data.X, data.y)
    mu, L = float(objective.mu), float(objective.L)
    theta_star = objective.theta_star
    direction = jax.random.normal(k_start, (cfg.dim,))
    theta0 = theta_star + cfg.initial_distance * direction / jnp.linalg.norm(direction)
    eta = cfg.eta_over_etamax * 2.0 * mu / L**2
    minibatch = MinibatchNoise(cfg.batch_size, cfg.n_examples)
    sigma = math.sqrt(float(minibatch.variance(objective, theta_star)))
    entries = noise_models(cfg, sigma)
    steps = saved_steps(cfg.n_steps, cfg.save_every)
    n_m, n_s = len(entries), steps.size
    tail_start = int(np.searchsorted(steps, cfg.n_steps // 2))
    z_band = _mc.z_value(cfg.level, n_s * n_m)
    level_m = _mc.family_level(cfg.level, 2 * n_m)  # variance and stationary level, per model
    keys = jax.random.split(k_var, cfg.n_variance_draws)

    curves = {k: np.full((n_m, n_s), np.nan) for k in ("mean", "lower", "upper")}
    names = ["holds", "sigma0", "sigma1", "eta_max", "bound", "var_declared", "diverged"]
    names += ["var", "var_lower", "var_upper", "stat", "stat_lower", "stat_upper"]
    names += ["hill", "nominal", "max_error"]
    col = {k: np.full(n_m, np.nan) for k in names}
    reasons = []
    for i, (_, noise, nominal) in enumerate(
        tqdm(entries, disable=not progress, desc="noise_ablation")
    ):
        a1 = noise.assumption1(objective)
        reasons.append(a1.reason)
        col["holds"][i] = _HOLDS[a1.holds]
        col["nominal"][i] = nominal
        col["var_declared"][i] = float(noise.variance(objective, theta_star))
        if a1.holds:
            s0, s1 = float(a1.sigma0), float(a1.sigma1)
            col["sigma0"][i], col["sigma1"][i] = s0, s1
            col["eta_max"][i] = float(theory.sgd_step_max(mu, L, s1))
            col["bound"][i] = float(theory.sgd_stationary_level(eta, mu, L, s0, s1))
        v = np.asarray(_noise_energy(noise, objective, theta_star, keys))
        vs = _mc.path_mean(v, np.ones(v.size, bool), level_m)
        _put(col, i, "var", vs)
        ens = simulate(
            objective,
            SGD(eta),
            noise,
            theta0,
            key=k_sim,
            n_paths=cfg.n_paths,
            n_steps=cfg.n_steps,
            save_every=cfg.save_every,
            save="summary",
            divergence_threshold=cfg.divergence_threshold,
            progress=False,
        )
        est = ens.mean_energy()
        mean, sem = np.asarray(est.mean), np.asarray(est.sem)
        curves["mean"][i] = mean
        curves["lower"][i], curves["upper"][i] = mean - z_band * sem, mean + z_band * sem
        energy, valid = np.asarray(ens.energy), ~np.asarray(ens.diverged)
        col["diverged"][i] = 1.0 - valid.mean()
        st = _mc.tail_mean(energy, valid, tail_start, level_m)
        _put(col, i, "stat", st)
        col["hill"][i] = _mc.hill_tail_index(np.sqrt(energy[valid, -1]))
        alive = np.asarray(ens.alive())[:, tail_start:]
        col["max_error"][i] = float(np.sqrt(np.max(np.where(alive, energy[:, tail_start:], 0))))

    nd = ("noise",)
    ds = xr.Dataset(
        {
            "mean_energy": (("noise", "step"), curves["mean"]),
            "energy_lower": (("noise", "step"), curves["lower"], {"long_name": "band, lower"}),
            "energy_upper": (("noise", "step"), curves["upper"], {"long_name": "band, upper"}),
            "assumption1_holds": (
                nd,
                col["holds"].astype(np.int8),
                {"long_name": "Assumption 1: 1 holds, 0 fails, -1 unknown (model's declaration)"},
            ),
            "assumption1_reason": (nd, np.asarray(reasons, dtype=str)),
            "sigma0": (nd, col["sigma0"], {"long_name": "declared sigma0 (NaN: none)"}),
            "sigma1": (nd, col["sigma1"], {"long_name": "declared sigma1 (NaN: none)"}),
            "eta_max": (nd, col["eta_max"], {"long_name": "2 mu / (L^2 + sigma1^2)"}),
            "stationary_bound": (
                nd,
                col["bound"],
                {"long_name": "eta^2 sigma0^2 / (1 - q) (Thm 5.2); inf: eta >= eta_max"},
            ),
            "variance_declared": (nd, col["var_declared"], {"long_name": "noise.variance at θ*"}),
            "variance_measured": (nd, col["var"], {"long_name": "MC E||G - grad||^2 at θ*"}),
            "variance_lower": (nd, col["var_lower"]),
            "variance_upper": (nd, col["var_upper"]),
            "stationary_level": (nd, col["stat"], {"long_name": "MC tail mean of energy"}),
            "stationary_lower": (nd, col["stat_lower"]),
            "stationary_upper": (nd, col["stat_upper"]),
            "diverged_fraction": (nd, col["diverged"]),
            "tail_index": (
                nd,
                col["hill"],
                {"long_name": "Hill estimate of the tail index of ||theta^T - theta*||"},
            ),
            "tail_index_noise": (
                nd,
                col["nominal"],
                {"long_name": "tail index of the noise (inf: light; NaN: not known)"},
            ),
            "max_error": (
                nd,
                col["max_error"],
                {"long_name": "max over paths and tail steps of ||theta^t - theta*||"},
            ),
        },
        coords={"noise": [e[0] for e in entries], "step": steps},
        attrs={
            "theorem": "Katende (2025) Assumption 1, Theorem 5.2",
            "mu": mu,
            "L": L,
            "eta": eta,
            "eta_over_etamax": cfg.eta_over_etamax,
            "sigma_matched": sigma,
            "dim": cfg.dim,
            "n_examples": cfg.n_examples,
            "batch_size": cfg.batch_size,
            "n_paths": cfg.n_paths,
            "n_steps": cfg.n_steps,
            "level": cfg.level,
            "interval_level": level_m,
            "band_z": z_band,
            "tail_start_step": int(steps[tail_start]),
            "m0": cfg.initial_distance**2,
            # float64 rounding of theta near theta*: ||theta - theta*||^2 cannot go below this
            "roundoff_floor": float(
                cfg.dim * (64 * np.finfo(float).eps * (1 + float(jnp.linalg.norm(theta_star)))) ** 2
            ),
        },
    )
    return ds


def _put(col: dict, i: int, name: str, stats: dict) -> None:
    col[name][i] = stats["mean"]
    col[f"{name}_lower"][i], col[f"{name}_upper"][i] = stats["lower"], stats["upper"]


def _fmt_ci(x, lo, hi) -> str:
    return f"{x:.4g} [{lo:.4g}, {hi:.4g}]"


def _stat(s: xr.Dataset) -> str:
    """The stationary level with its interval; a bare sample mean where the variance is
    infinite (no central limit theorem, so no interval)."""
    if int(s.assumption1_holds) == 0:
        return f"sample mean {float(s.stationary_level):.4g} (no CLT)"
    return _fmt_ci(float(s.stationary_level), float(s.stationary_lower), float(s.stationary_upper))


def checks(ds: xr.Dataset) -> list[Check]:
    rows = []
    eta = float(ds.attrs["eta"])
    floor = float(ds.attrs["roundoff_floor"])
    for label in map(str, ds.noise.values):
        s = ds.sel(noise=label)
        holds = int(s.assumption1_holds)
        reason = str(s.assumption1_reason.values)
        var = _fmt_ci(float(s.variance_measured), float(s.variance_lower), float(s.variance_upper))
        stat = _stat(s)
        tails = f"tail index {float(s.tail_index):.3g} (noise: {float(s.tail_index_noise):.3g})"
        if holds == 1:
            s0 = float(s.sigma0)
            rows.append(
                Check(
                    "Assumption 1",
                    f"{label}: E‖G - grad L‖^2 at theta*",
                    f"<= sigma0^2 = {s0**2:.4g}, sigma1 = {float(s.sigma1):.3g}",
                    var,
                    bool(float(s.variance_lower) <= s0**2 * (1 + 1e-9)),
                    reason,
                )
            )
        else:
            rows.append(
                Check(
                    "Assumption 1",
                    f"{label}: E‖G - grad L‖^2 at theta*",
                    "fails" if holds == 0 else "unknown",
                    f"sample mean {float(s.variance_measured):.4g} (not a consistent estimate)"
                    if holds == 0
                    else var,
                    None,
                    reason,
                )
            )
        applies = holds == 1 and eta < float(s.eta_max)
        frac = float(s.diverged_fraction)
        if applies:
            bound = float(s.stationary_bound)
            rows.append(
                Check(
                    "Thm 5.2 stationary level",
                    label,
                    f"<= {bound:.4g}",
                    stat,
                    bool(float(s.stationary_lower) <= bound * (1 + 1e-12) + floor),
                    tails + (f"; float64 floor {floor:.1e}" if bound == 0 else ""),
                )
            )
            rows.append(
                Check("Thm 5.2 (eta < eta_max)", label, "diverged 0", f"{frac:.3f}", frac == 0.0)
            )
        else:
            why = (
                f"eta = {eta:.4g} >= eta_max(sigma1) = {float(s.eta_max):.4g}: theorem silent"
                if holds == 1
                else "Assumption 1 fails: no bound, the tail mean is not a consistent estimate"
                if holds == 0
                else "Assumption 1 unknown: no bound"
            )
            rows.append(
                Check("Thm 5.2 stationary level", label, "-", stat, None, f"{why}; {tails}")
            )
            rows.append(
                Check("Thm 5.2 (eta < eta_max)", label, "-", f"diverged {frac:.3f}", None, why)
            )
    return rows


def summary(ds: xr.Dataset) -> str:
    head = (
        f"Least squares, n = {ds.attrs['n_examples']}, d = {ds.attrs['dim']} (mu = "
        f"{ds.attrs['mu']:.4g}, L = {ds.attrs['L']:.4g}), SGD with eta = "
        f"{ds.attrs['eta_over_etamax']:g} x 2mu/L^2 = {ds.attrs['eta']:.4g}, "
        f"{ds.attrs['n_paths']} paths x {ds.attrs['n_steps']} steps per model. Noise level matched "
        f"to minibatch sampling (B = {ds.attrs['batch_size']}) at theta*: sigma = "
        f"{ds.attrs['sigma_matched']:.4g}. Stationary level: mean of "
        f"‖theta^t - theta*‖^2 over t >= {ds.attrs['tail_start_step']}; intervals over paths "
        f"hold jointly at {ds.attrs['level']:.0%} over the models (Bonferroni). "
        "Tail index: Hill estimate over paths of ‖theta^T - theta*‖ (light "
        "tails give large, sample-size dependent values).\n\n"
    )
    table = [
        "| noise | A1 | sigma0 | sigma1 | stationary level | bound | diverged | tail index "
        "(noise) | max error (tail) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label in ds.noise.values:
        s = ds.sel(noise=label)
        a1 = {1: "holds", 0: "**fails**", -1: "unknown"}[int(s.assumption1_holds)]
        table.append(
            f"| {label} | {a1} | {float(s.sigma0):.3g} | {float(s.sigma1):.3g} | "
            + _stat(s)
            + f" | {float(s.stationary_bound):.4g} | {float(s.diverged_fraction):.3f} | "
            f"{float(s.tail_index):.3g} ({float(s.tail_index_noise):.3g}) | "
            f"{float(s.max_error):.3g} |"
        )
    return head + "\n".join(table)


def figures(ds: xr.Dataset) -> dict:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6), width_ratios=(3, 2))
    t = ds.step.values
    labels = [str(v) for v in ds.noise.values]
    floor = float(ds.attrs["roundoff_floor"])
    noisy = ds.stationary_level.values > 1e3 * floor
    low = np.nanmin(ds.mean_energy.values[noisy]) if noisy.any() else floor
    for i, label in enumerate(labels):
        s = ds.sel(noise=label)
        ls = "-" if int(s.assumption1_holds) == 1 else "--"
        name = label if noisy[i] else f"{label} (falls to float64 rounding)"
        ax.plot(t, s.mean_energy, ls, color=f"C{i % 10}", lw=1.1, label=name)
        b = float(s.stationary_bound)
        if np.isfinite(b) and b > 0:
            ax.axhline(b, color=f"C{i % 10}", lw=0.7, ls=":")
    ax.set_yscale("log")
    ax.set_ylim(0.3 * low, None)
    ax.set(xlabel="step t", ylabel="E||theta^t - theta*||^2 (MC)")
    ax.set_title("m_t per noise model (dotted: Thm 5.2 bound; dashed: Assumption 1 fails)")
    ax.legend(fontsize=7, ncol=2)
    y = np.arange(len(labels))
    lvl = ds.stationary_level.values
    err = np.stack([lvl - ds.stationary_lower.values, ds.stationary_upper.values - lvl])
    heavy = ds.assumption1_holds.values != 1
    err[:, heavy] = 0.0  # infinite variance: no interval
    ok = noisy
    ax2.errorbar(lvl[ok], y[ok], xerr=err[:, ok], fmt="o", ms=4, label="measured (MC)")
    ax2.plot(ds.stationary_bound.values, y, "C3x", label="Thm 5.2 bound")
    ax2.set_yticks(y, labels, fontsize=7)
    ax2.set_xscale("log")
    ax2.set(xlabel="stationary E||theta - theta*||^2")
    ax2.set_title("Stationary level against the bound")
    ax2.legend(fontsize=7, loc="lower right")
    return {"energy": fig}


EXPERIMENT = Experiment(
    name="noise_ablation",
    config=NoiseAblation,
    run=run,
    checks=checks,
    figures=figures,
    summary=summary,
)
