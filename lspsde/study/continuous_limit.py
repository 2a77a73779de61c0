r"""Experiment *continuous_limit*: SGD against its SDE and ODE limits; residual networks against
their neural-ODE limit (paper Sections 4.2, 5, 7.2; Li, Tai & E 2017).

For each system and each step $\eta = T/k$ (with $k$ an integer, so that step $k$ lands on the
comparison time $T$), from the same $\theta^0$:

- SGD, ``SGD(eta)``, and its stochastic modified equation, ``SGDLimit(eta)``, on the same
  Brownian paths where the noise model allows it (``gaussian_draws``): the weak error
  $\mathbb{E}f(\theta_k) - \mathbb{E}f(\Theta_T)$ with its standard error (paired), the strong
  error $\mathbb{E}\|\theta_k - \Theta_T\|$ (coupled paths only) and their fitted orders in $\eta$
  (predicted: 1 for both, see below);
- the gradient flow, ``GradientFlow(eta)``: the error $\mathbb{E}f(\theta_k) - f(\theta(T))$ of
  SGD against the deterministic limit (predicted order 1);
- parametric exponents per unit time, $\frac1T\log\|\partial\theta_k/\partial\theta_0\|$, of GD,
  SGD (one path), the SDE (the same path) and the gradient flow, side by side.

Where the limit fails the output says so instead of fitting through it: steps past the
stability limit of gradient descent ($\eta \ge 2/L$: SGD diverges, the flows do not) are marked
invalid and left out of the fits; heavy-tailed noise (Student-t with $\nu \le 2$) has no
covariance and so no diffusion limit, recorded as such.

The strong error of coupled paths is $O(\eta)$ too: SGD is Euler–Maruyama with step $\eta$ for an
SDE whose diffusion is itself of size $\sqrt\eta$, so the $\sqrt{\text{step}}$ strong rate of
Euler–Maruyama is multiplied by $\sqrt\eta$ (and for additive noise the rate is 1 anyway).

Residual networks $X_{k+1} = X_k + h\,g(kh, X_k)$, $h = S/L$ (``euler_residual``), are explicit
Euler steps of the neural ODE $dX/ds = g(s, X)$ (``NeuralODE``): the output error is $O(h)$ and
the exponent per unit depth converges to the ODE's.
"""

import math
from typing import Annotated, Literal

import equinox as eqx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
from pydantic import Field, model_validator
from tqdm.auto import tqdm
import xarray as xr

import models

from .._simulate import simulate
from ..limits import (
    GradientFlow,
    NeuralODE,
    SGDLimit,
    convergence_order,
    euler_residual,
    strong_error,
    weak_error,
)
from ..linalg import hessian_extreme_eigenvalues
from ..noise import IsotropicGaussian, MinibatchNoise, NoNoise, StudentTNoise
from ..objectives import SupervisedLoss, parameters
from ..parameter import SGD, GradientDescent
from ..sweep import Sweep
from ..system import LearningSystem, parameter_trajectory
from . import _mc, _plot
from ._data import Variables
from .config import Grid, Level, PositiveFloat, PositiveInt, Strict
from .experiment import Check, Experiment


class ContinuousLimit(Strict):
    """SGD against its SDE limit (Li-Tai-E) and its ODE limit over a grid of eta, with fitted
    orders; residual networks against their neural-ODE limit over a grid of depths."""

    eta_over_etamax: Grid(PositiveFloat, min_length=3) = [0.05, 0.1, 0.2, 0.4, 1.5]
    horizon: PositiveFloat = 1.0
    systems: list[Literal["quadratic", "least_squares", "two_layer", "heavy_tailed"]] = [
        "quadratic",
        "least_squares",
        "two_layer",
        "heavy_tailed",
    ]
    sigma: PositiveFloat = 0.5
    dim: Annotated[int, Field(ge=2, le=64)] = 4
    n_paths: Annotated[int, Field(ge=16)] = 2048
    residual_depths: Grid(PositiveInt, min_length=3) = [4, 8, 16, 32, 64]
    residual_horizon: PositiveFloat = 2.0
    residual_dim: PositiveInt = 4
    n_probes: PositiveInt = 8
    level: Level = 0.95

    @model_validator(mode="after")
    def _enough_stable_steps(self):
        if sum(r < 1 for r in self.eta_over_etamax) < 3:
            raise ValueError(
                f"eta_over_etamax = {self.eta_over_etamax} has fewer than 3 values below 1; an "
                "order fit needs at least 3 steps where the limit theory applies"
            )
        if not self.systems:
            raise ValueError("systems is empty; name at least one of the four systems")
        return self


SYSTEMS = ("quadratic", "least_squares", "two_layer", "heavy_tailed")

_PER_TIME = "per unit time (1/(k eta)) log ||d theta_k / d theta_0||_2"
_GRID = {  # CF (long_name, units) of the (system, eta) variables; f is "energy" or "loss"
    "eta": ("step size eta (T/k below eta_max)", "1"),
    "k": ("number of steps k compared at time T", "step"),
    "weak_sde": ("weak error E f(theta_k) - E f(Theta_T) against the SDE limit", "1"),
    "weak_sde_se": ("standard error of weak_sde (paired where the paths are coupled)", "1"),
    "strong_sde": ("strong error E||theta_k - Theta_T|| (coupled paths)", "1"),
    "strong_sde_se": ("standard error of strong_sde", "1"),
    "weak_ode": ("weak error E f(theta_k) - f(theta(T)) against the gradient flow", "1"),
    "weak_ode_se": ("standard error of weak_ode", "1"),
    "diverged_fraction": ("fraction of SGD paths diverged by step k", "1"),
    "alpha_gd": (f"GD exponent {_PER_TIME}", "1"),
    "alpha_gf": (f"gradient-flow exponent {_PER_TIME}", "1"),
    "alpha_sgd": (f"SGD exponent (one path) {_PER_TIME}", "1"),
    "alpha_sde": (f"SDE exponent (the same path) {_PER_TIME}", "1"),
    "valid": ("1 if used in the order fits (eta < eta_max, no divergence, finite variance)", "1"),
    "limit_defined": ("1 if the SDE limit exists (the noise has a covariance)", "1"),
}


def _system(name: str, cfg: ContinuousLimit, key):
    """``(objective, noise, theta0, f, L)`` for one system: f is what the weak error compares
    ("energy" where the minimiser is known, else "loss"), L the largest Hessian eigenvalue."""
    d = cfg.dim
    if name in ("quadratic", "heavy_tailed"):
        lam = jnp.linspace(0.5, 2.0, d)
        objective = models.Quadratic(jnp.diag(lam), jnp.zeros(d))
        theta0 = jnp.full((d,), 1.0 / math.sqrt(d))
        noise = (
            IsotropicGaussian(cfg.sigma) if name == "quadratic" else StudentTNoise(cfg.sigma, 1.5)
        )
        return objective, noise, theta0, "energy", float(lam.max())
    if name == "least_squares":
        n = 8 * d
        data = models.synthetic_regression(key, n=n, d=d, noise_std=0.5)
        objective = models.LeastSquares(data.X, data.y)
        noise = MinibatchNoise(max(1, n // 8), n)
        L = float(np.linalg.eigvalsh(np.asarray(data.X.T @ data.X) / n).max())
        return objective, noise, jnp.zeros(d), "energy", L
    # two_layer: a tanh student fitting a tanh teacher
    k_data, k_student = jax.random.split(key)
    data = models.teacher_student(k_data, 8 * d, d, 1, hidden=(d,), activation="tanh")
    student = models.mlp(
        k_student, (d, d, 1), activation="tanh", init="gaussian", final_activation=False
    )
    objective = SupervisedLoss(student, data.inputs, data.targets)
    theta0 = parameters(student)
    eig = hessian_extreme_eigenvalues(objective.loss, theta0)
    L = float(jnp.maximum(jnp.abs(eig.lambda_min), jnp.abs(eig.lambda_max)))
    return objective, IsotropicGaussian(cfg.sigma), theta0, "loss", L


@eqx.filter_jit
def _sensitivity(system: LearningSystem, theta0, key, n_steps: int):
    r"""$\|\partial\theta_k/\partial\theta_0\|_2$ for $k = 0..n$ along one path (dense)."""
    flat0, unravel = ravel_pytree(theta0)

    def path(flat):
        thetas, _ = parameter_trajectory(system, unravel(flat), n_steps=n_steps, key=key)
        return jax.vmap(lambda i: ravel_pytree(jax.tree.map(lambda a: a[i], thetas))[0])(
            jnp.arange(n_steps + 1)
        )

    J = jax.jacfwd(path)(flat0)  # (n + 1, d, d)
    return jnp.linalg.norm(J, ord=2, axis=(1, 2))


def run(cfg: ContinuousLimit, key, progress: bool) -> xr.Dataset:
    systems = list(cfg.systems)
    ratios = np.asarray(cfg.eta_over_etamax)
    k_sys, k_sim, k_res = jax.random.split(key, 3)
    shape = (len(systems), ratios.size)
    out = {n: np.full(shape, np.nan) for n in _GRID}
    notes = []
    T = cfg.horizon
    for i, name in enumerate(tqdm(systems, disable=not progress, desc="continuous_limit")):
        objective, noise, theta0, f, L = _system(name, cfg, jax.random.fold_in(k_sys, i))
        eta_max = 2.0 / L  # gradient descent's stability limit
        # Below eta_max, eta = T/k exactly (step k lands on T); past it, eta = r * eta_max and
        # the comparison is at the first step past T.
        stable = ratios < 1
        ks = np.where(stable, np.round(T / (ratios * eta_max)), np.ceil(T / (ratios * eta_max)))
        ks = np.maximum(1, ks).astype(int)
        etas = np.where(stable, T / ks, ratios * eta_max)
        n_steps = int(ks.max())
        sim = dict(key=k_sim, n_paths=cfg.n_paths, n_steps=n_steps, progress=False)
        note = ""
        heavy = not noise.assumption1(objective).holds
        no_limit = None
        if heavy:
            note = "infinite noise variance: E f(theta) is infinite, no order is fitted; "
        # Each flow's eta grid is one compiled program, common random numbers across eta.
        sweep = lambda flow: Sweep.of(flow, etas, name="eta")
        sgd_grid = simulate((objective, sweep(SGD), noise), theta0, **sim)
        gf_grid = simulate((objective, sweep(GradientFlow), NoNoise()), theta0,
                           **{**sim, "n_paths": 1})  # fmt: skip
        try:
            sde_grid = simulate((objective, sweep(SGDLimit), noise), theta0, **sim)
        except ValueError as err:  # no covariance: the diffusion limit does not exist
            no_limit, sde_grid = str(err).split(", so")[0], None
        for j, k in enumerate(ks):
            eta = float(etas[j])
            out["eta"][i, j], out["k"][i, j] = eta, k
            sgd = sgd_grid.at(j)
            div = np.asarray(sgd.diverged) & (np.asarray(sgd.divergence_step) <= k)
            out["diverged_fraction"][i, j] = float(np.mean(div))
            out["valid"][i, j] = float(
                stable[j] and out["diverged_fraction"][i, j] == 0 and not heavy
            )
            gf = gf_grid.at(j)
            gf_vals = np.asarray(getattr(gf, f))[0]
            sgd_vals = np.where(np.asarray(sgd.alive()), np.asarray(getattr(sgd, f)), np.nan)
            m = np.nanmean(sgd_vals[:, k])
            n_alive = np.sum(np.isfinite(sgd_vals[:, k]))
            out["weak_ode"][i, j] = m - gf_vals[k]
            out["weak_ode_se"][i, j] = np.nanstd(sgd_vals[:, k], ddof=1) / math.sqrt(
                max(n_alive, 1)
            )
            sde = None if sde_grid is None else sde_grid.at(j)
            if sde is None:
                out["limit_defined"][i, j] = 0.0
            else:
                out["limit_defined"][i, j] = 1.0
                paired = noise.gaussian_draws
                w = weak_error(sgd, sde, f, paired=paired)
                out["weak_sde"][i, j], out["weak_sde_se"][i, j] = w.difference[k], w.se[k]
                if paired:
                    s = strong_error(sgd, sde)
                    out["strong_sde"][i, j], out["strong_sde_se"][i, j] = s.difference[k], s.se[k]
            # parametric exponents per unit time (one path for the stochastic flows)
            path_key = jax.random.fold_in(k_sim, 0)
            flows = {"alpha_gd": (GradientDescent(eta), NoNoise()),
                     "alpha_gf": (GradientFlow(eta), NoNoise()),
                     "alpha_sgd": (SGD(eta), noise)}  # fmt: skip
            if sde is not None:
                flows["alpha_sde"] = (SGDLimit(eta), noise)
            for var, (flow, nz) in flows.items():
                sens = _sensitivity(LearningSystem(objective, flow, nz), theta0, path_key, n_steps)
                out[var][i, j] = float(jnp.log(sens[k])) / (k * eta)  # per unit time
        notes.append(note + (f"no SDE limit: {no_limit}" if no_limit else ""))

    depths = np.asarray(cfg.residual_depths)
    res = _residual(cfg, k_res, depths)
    v = Variables()
    for name, values in out.items():
        v.add(name, ("system", "eta_over_etamax"), values, *_GRID[name])
    v.add(
        "system_note",
        ("system",),
        np.asarray(notes, dtype=str),
        "where a limit fails for the system, and why",
    )
    v.add("residual_error", ("depth",), res["error"], "max over probes of ||X_L - X(S)||")
    v.add("residual_alpha", ("depth",), res["alpha"], "(1/S) log max_x ||dX_L/dX_0||_2, S = L h")
    return v.dataset(
        coords={
            "system": (systems, "learning system", "1"),
            "eta_over_etamax": (ratios, "step ratio eta / eta_max, eta_max = 2/L", "1"),
            "depth": (depths, "depth L of the residual network (h = S/L)", "layer"),
        },
        attrs={
            "horizon": T,
            "residual_horizon": cfg.residual_horizon,
            "ode_alpha": res["ode_alpha"],
            "level": cfg.level,
            "n_paths": cfg.n_paths,
            "substeps": SGDLimit(1.0).n_substeps,
        },
    )


def _residual(cfg: ContinuousLimit, key, depths: np.ndarray) -> dict:
    r"""Euler residual networks of the neural ODE $dX/ds = \tanh(AX)(1 + \frac12\sin s)$."""
    n = cfg.residual_dim
    k_a, k_x = jax.random.split(key)
    M = jax.random.normal(k_a, (n, n)) / math.sqrt(n)
    A = 0.5 * (M - M.T) - 0.5 * jnp.eye(n)  # a rotation with damping: alpha < 0

    def g(s, x):
        return jnp.tanh(A @ x) * (1 + 0.5 * jnp.sin(s))

    S = cfg.residual_horizon
    probes = jax.random.normal(k_x, (cfg.n_probes, n))
    ode = NeuralODE(g, S)

    def jac_norm(flow):
        J = jax.vmap(jax.jacfwd(lambda x: flow.trajectory(x)[-1]))(probes)
        return float(jnp.max(jnp.linalg.norm(J, ord=2, axis=(1, 2))))

    X_S = jax.vmap(lambda x: ode.trajectory(x)[-1])(probes)
    error, alpha = [], []
    for L in depths:
        net = euler_residual(g, S, int(L))
        X_L = jax.vmap(lambda x, net=net: net.trajectory(x)[-1])(probes)
        error.append(float(jnp.max(jnp.linalg.norm(X_L - X_S, axis=-1))))
        alpha.append(math.log(jac_norm(net)) / S)
    return {"error": np.asarray(error), "alpha": np.asarray(alpha),
            "ode_alpha": math.log(jac_norm(ode)) / S}  # fmt: skip


def _fit(ds: xr.Dataset, system: str, var: str):
    s = ds.sel(system=system)
    se = s[var + "_se"].values if var + "_se" in s else None
    return convergence_order(s.eta.values, s[var].values, se, s.valid.values.astype(bool),
                             level=float(ds.attrs["level"]))  # fmt: skip


_UNDECIDED_WIDTH = 1.0  # an order interval wider than this cannot confirm or refute an order
_ORDER_TOLERANCE = 0.1  # beyond the CI, for pre-asymptotic curves


def _verdict(fit, predicted: float = 1.0) -> tuple[bool | None, str]:
    """What the report says about a fitted order, and why: ``None`` with the reason where no
    order was fitted or its interval is too wide to decide; else whether `predicted` lies
    within the CI widened by the tolerance. The figures draw a fit only where this decides."""
    if not np.isfinite(fit.order):
        return None, "no fit"
    lo, hi = fit.ci
    if hi - lo > _UNDECIDED_WIDTH:
        return None, "interval wider than 1: undecided (more paths or points)"
    ok = lo - _ORDER_TOLERANCE <= predicted <= hi + _ORDER_TOLERANCE
    return bool(ok), f"tolerance {_ORDER_TOLERANCE:g} beyond the CI (pre-asymptotic)"


def _order_check(theorem: str, case: str, predicted: float, fit) -> Check:
    holds, why = _verdict(fit, predicted)
    if not np.isfinite(fit.order):
        return Check(theorem, case, f"order {predicted:g}", "no fit", None, fit.note)
    lo, hi = fit.ci
    measured = f"{fit.order:.2f} ± {fit.se:.2f} (CI [{lo:.2f}, {hi:.2f}])"
    sep = "; " if fit.note else ""
    return Check(theorem, case, f"order {predicted:g}", measured, holds, fit.note + sep + why)


def checks(ds: xr.Dataset) -> list[Check]:
    rows = []
    for system in ds.system.values:
        s = ds.sel(system=system)
        note = str(s.system_note.values)
        if not np.any(s.limit_defined.values == 1):
            rows.append(Check("SDE limit (Li-Tai-E)", system, "a diffusion limit", "undefined",
                              None, note))  # fmt: skip
        else:
            rows.append(_order_check("SGD -> SDE, weak", system, 1.0, _fit(ds, system, "weak_sde")))
            if np.isfinite(s.strong_sde.values).any():
                rows.append(
                    _order_check("SGD -> SDE, strong", system, 1.0, _fit(ds, system, "strong_sde"))
                )
        rows.append(_order_check("SGD -> gradient flow, weak", system, 1.0,
                                 _fit(ds, system, "weak_ode")))  # fmt: skip
        bad = ~s.valid.values.astype(bool)
        if bad.any():
            r = s.eta_over_etamax.values[bad]
            past = r[r >= 1]
            rows.append(Check(
                "limit fails", system, "- (no limit theorem there)",
                f"left out: eta/eta_max = {', '.join(f'{x:g}' for x in r)}; SGD diverged by T in "
                f"{np.nanmax(s.diverged_fraction.values[bad]):.0%} of paths",
                None,
                (f"eta >= eta_max = 2/L (L at theta0) at {', '.join(f'{x:g}' for x in past)}"
                 if past.size else "") + (f"; {note}" if note else ""),
            ))  # fmt: skip
        # exponents: GD's per-unit-time exponent tends to the gradient flow's as eta -> 0
        ok = s.valid.values.astype(bool)
        gap = np.abs(s.alpha_gd.values - s.alpha_gf.values)[ok]
        etas = s.eta.values[ok]
        if gap.size >= 2:
            order = np.argsort(etas)
            rows.append(Check(
                "exponents per unit time", system, "|alpha_GD/eta - alpha_GF| -> 0 as eta -> 0",
                f"{gap[order[-1]]:.3g} at eta={etas[order[-1]]:.3g} -> {gap[order[0]]:.3g} at "
                f"eta={etas[order[0]]:.3g}",
                bool(gap[order[0]] < gap[order[-1]]),
            ))  # fmt: skip
    fit = convergence_order(ds.residual_horizon / ds.depth.values, ds.residual_error.values)
    rows.append(_order_check("residual -> neural ODE", "explicit Euler in depth", 1.0, fit))
    a = ds.residual_alpha.values
    rows.append(Check(
        "residual -> neural ODE", "exponent per unit depth",
        f"alpha_ODE = {ds.attrs['ode_alpha']:.4f}",
        f"{a[0]:.4f} (L={int(ds.depth[0])}) -> {a[-1]:.4f} (L={int(ds.depth[-1])})",
        bool(abs(a[-1] - ds.attrs["ode_alpha"]) < abs(a[0] - ds.attrs["ode_alpha"])),
    ))  # fmt: skip
    return rows


def summary(ds: xr.Dataset) -> str:
    return (
        f"SGD at steps eta = T/k (T = {ds.attrs['horizon']:g}) against its SDE limit "
        f"(`SGDLimit`, {ds.attrs['substeps']} sub-steps per step, coupled Brownian paths where "
        "the noise is Gaussian) and the gradient flow, on "
        f"{', '.join(map(str, ds.system.values))}; {ds.attrs['n_paths']} paths. Orders are "
        "fitted on log-log axes with their t intervals; points past eta_max, diverged, or not "
        "resolved from Monte Carlo noise are left out and listed. Exponents are per unit time. "
        "Residual networks of depth L with h = S/L against their neural-ODE limit."
    )


def _fit_label(fit, what: str) -> tuple[str, bool]:
    """The legend text of a fitted order, as the report words it, and whether to draw it."""
    holds, _ = _verdict(fit)
    if not np.isfinite(fit.order):
        return f"{what}: no order fitted", False
    lo, hi = fit.ci
    if holds is None:
        return f"{what}: order undecided (CI [{lo:.2f}, {hi:.2f}])", False
    return f"{what}: order {fit.order:.2f} [{lo:.2f}, {hi:.2f}]", True


def figures(ds: xr.Dataset) -> dict:
    systems = list(map(str, ds.system.values))
    level = float(ds.attrs["level"])
    z = _mc.z_value(level)
    fig, axes = _plot.panels(len(systems), min(4, len(systems)), size=(3.9, 3.4))
    for ax, system in zip(axes.ravel(), systems, strict=False):
        s = ds.sel(system=system)
        ok = s.valid.values.astype(bool)
        for var, what, color in (("weak_sde", "weak, SDE", "C0"),
                                 ("strong_sde", "strong, SDE", "C1"),
                                 ("weak_ode", "weak, ODE", "C2")):  # fmt: skip
            y = np.abs(s[var].values)
            if not np.isfinite(y).any():
                continue
            fit = _fit(ds, system, var)
            label, draw = _fit_label(fit, what)
            used = np.asarray(fit.used, dtype=bool)
            yerr = z * s[var + "_se"].values
            ax.errorbar(s.eta.values[used], y[used], yerr=yerr[used], fmt="o", color=color,
                        ms=4, label=label)  # fmt: skip
            rest = ~used & np.isfinite(y)
            if rest.any():
                ax.errorbar(s.eta.values[rest], y[rest], yerr=yerr[rest], fmt="o", color=color,
                            mfc="none", ms=4, alpha=0.8)  # fmt: skip
            if draw:
                h = s.eta.values[used]
                ax.plot(h, fit.constant * h**fit.order, "-", color=color, lw=1)
        for x in s.eta.values[~ok]:
            ax.axvline(x, color="r", lw=0.6, ls=":")
        ax.set(xscale="log", yscale="log", xlabel=r"step $\eta$", title=system)
        ax.legend(fontsize=6)
    for ax in axes[:, 0]:
        ax.set_ylabel(r"error at time $T$")
    fig.suptitle(
        "Section 7.2: SGD against its SDE (Li–Tai–E) and gradient-flow limits, fitted orders "
        f"as in the report\n(bars: {level:.0%} normal intervals; open: not fitted; red: left out, "
        r"past $\eta_{\max}$ or no limit)",
        fontsize=10,
    )

    fig2, axes2 = _plot.panels(len(systems), min(4, len(systems)), size=(3.9, 3.3))
    for ax, system in zip(axes2.ravel(), systems, strict=False):
        s = ds.sel(system=system)
        for var, label in (
            ("alpha_gd", "GD"),
            ("alpha_gf", "gradient flow"),
            ("alpha_sgd", "SGD (1 path)"),
            ("alpha_sde", "SDE (same path)"),
        ):
            ax.plot(s.eta.values, s[var].values, "o-", ms=3, lw=1, label=label)  # fmt: skip
        ax.set(xscale="log", xlabel=r"step $\eta$", title=system)
        ax.legend(fontsize=6)
    for ax in axes2[:, 0]:
        ax.set_ylabel(r"$\frac{1}{k\eta}\log\|\partial\theta_k/\partial\theta_0\|_2$")
    fig2.suptitle(
        r"Section 7.2: parametric exponents per unit time, GD $\to$ gradient flow as $\eta \to 0$"
    )

    fig3, axes3 = _plot.panels(2, size=(4.4, 3.6))
    a1, a2 = axes3[0]
    depths = ds.depth.values
    h = ds.residual_horizon / depths
    err = ds.residual_error.values
    fit = convergence_order(h, err)
    label, draw = _fit_label(fit, "fit")
    a1.loglog(h, err, "o", ms=5, label=r"$\max_x\|X_L - X(S)\|$")
    if draw:
        a1.loglog(h, fit.constant * h**fit.order, "C0-", lw=1, label=label)
    else:
        a1.plot([], [], " ", label=label)
    finest = int(np.argmin(h))
    a1.loglog(h, err[finest] * h / h[finest], "k--", lw=0.8, label="slope 1 (explicit Euler)")
    ticks = [f"{x:.3g}\nL={int(L)}" for x, L in zip(h, depths, strict=True)]
    _plot.plain_log_ticks(a1.xaxis, h, ticks)
    a1.set(xlabel=r"$h = S/L$", ylabel=r"$\max_x\|X_L - X(S)\|$", title="output error")
    a1.legend(fontsize=7)
    a2.semilogx(h, ds.residual_alpha.values, "o-", ms=4, label="residual, per unit depth")
    a2.axhline(ds.attrs["ode_alpha"], color="k", ls="--", lw=1, label="neural ODE")
    _plot.plain_log_ticks(a2.xaxis, h, ticks)
    a2.set(xlabel=r"$h = S/L$", ylabel=r"$\frac{1}{S}\log\max_x\|\partial X_L/\partial X_0\|_2$",
           title=r"depth exponent $\alpha_x$ per unit depth")  # fmt: skip
    a2.legend(fontsize=7)
    fig3.suptitle(
        r"Residual networks $\to$ neural ODE (Section 4.2): error $O(h)$, exponents converge"
    )
    return {"errors": fig, "exponents": fig2, "residual": fig3}


EXPERIMENT = Experiment(
    name="continuous_limit",
    config=ContinuousLimit,
    run=run,
    checks=checks,
    figures=figures,
    summary=summary,
)
