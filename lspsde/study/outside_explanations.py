r"""Experiment *outside_explanations*: explanation stability against depth and step size.

Section 7.4 says gradient explanations inherit the network's and the training's sensitivity;
the theory proves nothing about them. This experiment measures it. Small MLPs
(``models.mlp``: $d_{in} \to$ ``width`` $\times$ ``depth`` $\to 1$, tanh or ReLU, Gaussian
initialisation, a linear last layer) are trained by SGD with additive noise
(``IsotropicGaussian(noise_scale)``) on one teacher–student regression (``models.
teacher_student``), over a grid of step sizes (one ``Sweep`` per network: common random
numbers), and explained at a fixed probe input $x$ by the saliency $S(\theta, x) =
\nabla_x F_\theta(x)$ (``lspsde.explanation_trajectory``). Measured at every saved step:

- the explanation's drift $\|S(\theta^t) - S(\theta^0)\|$, its spread across paths
  $\sqrt{\operatorname{tr}\operatorname{Cov}_p S(\theta^t_p)}$ (its sensitivity to the training
  noise), its input sensitivity $\|\partial S/\partial x\| = \|\nabla_x^2 F\|$ and its parameter
  sensitivity $\|\partial S/\partial\theta\|$ (matrix-free);
- beside them, on the first ``n_exponent_paths`` paths (``lspsde.exponent_distribution``, the
  same keys, horizon $T$ = ``n_steps``), the parametric exponent $\alpha_\theta =
  \frac1T\log\|\partial\theta^T/\partial\theta^0\|$, and the depth exponent at the probe
  $\alpha_x = \frac1L\log\|\partial F/\partial x\| = \frac1L\log\|S\|$ (a scalar output: the
  input Jacobian *is* the saliency), $L$ = depth + 1 layers.

**Checks.**

- *The chain rule* (``lspsde.explain``): along a realised trajectory
  $\|\partial S(\theta^T, x)/\partial\theta^0\|_2 \le \|\partial S/\partial\theta\,(\theta^T)\|_2
  \cdot \|\partial\theta^T/\partial\theta^0\|_2$. The left side is measured independently of the
  two factors: the dense $d_{in} \times P$ Jacobian of $\theta^0 \mapsto S(\theta^T(\theta^0), x)$
  through the whole training run (``jax.jacrev`` through ``parameter_trajectory`` with the path's
  draws), its exact 2-norm; the right side multiplies the two Krylov estimates. The check fails if
  either estimate is too low or the trajectories disagree.
- *Theorem 4.1 for the explained network*: with 1-Lipschitz activations,
  $\|S(\theta^t, x)\|_2 = \|\partial F/\partial x\|_2 \le \prod_k\|W_k^t\|_2$ at every saved step
  of every path (trained weights, not only at initialisation).
- *Theorem 5.2*: its assumptions fail (an MLP's loss is not strongly convex, and no smoothness
  constant is known), so no $\eta_{\max}$ or $q(\eta)$ exists: ``holds=None`` with the measured
  exponent and explanation spread instead.
"""

from typing import Annotated, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from pydantic import AfterValidator, Field, model_validator
import xarray as xr

import models

from .._simulate import masked_mean, saved_steps, simulate
from ..distributions import exponent_distribution
from ..explain import explanation_trajectory, model_function
from ..noise import IsotropicGaussian
from ..objectives import SupervisedLoss, parameters
from ..parameter import SGD
from ..sweep import Sweep
from ..system import LearningSystem, parameter_trajectory
from . import _mc
from ._data import Variables
from .config import Grid, Level, NormConfig, PositiveFloat, PositiveInt, Strict
from .experiment import Check, Experiment

# Both factors of the chain-rule bound are Krylov estimates, lower bounds accurate to about the
# tolerance rtol (1e-6 by default): the product may fall short of the truth by ~2 rtol.
CHAIN_TOL = 1e-5
THM52_NOTE = (
    "Assumptions of Thm 5.2 fail: the MLP loss is not mu-strongly convex and has no known "
    "smoothness constant L, so there is no eta_max and no q(eta)"
)


def _distinct(values: list) -> list:
    if len(set(values)) != len(values):
        raise ValueError(f"values must be distinct, got {values}")
    return values


class OutsideExplanations(Strict):
    """Saliency stability of SGD-trained MLPs over activations, depths and step sizes."""

    activation: Annotated[
        list[Literal["tanh", "relu"]], Field(min_length=1), AfterValidator(_distinct)
    ] = ["tanh", "relu"]
    depth: Grid(PositiveInt) = [1, 3]
    width: PositiveInt = 8
    step_size: Grid(PositiveFloat, min_length=2) = [0.03, 0.1, 0.3]
    d_in: PositiveInt = 4
    n_examples: Annotated[int, Field(ge=2)] = 32
    noise_scale: PositiveFloat = 0.5
    sigma_w: PositiveFloat = 1.0
    n_paths: Annotated[int, Field(ge=4)] = 64
    n_steps: PositiveInt = 100
    save_every: PositiveInt = 10
    n_exponent_paths: PositiveInt = 4
    level: Level = 0.99
    divergence_threshold: Annotated[float, Field(gt=0, le=1e100)] = 1e8
    norm: NormConfig = NormConfig(rtol=1e-6)

    @model_validator(mode="after")
    def _sizes(self):
        if self.n_exponent_paths > self.n_paths:
            raise ValueError(
                f"n_exponent_paths = {self.n_exponent_paths} exceeds n_paths = {self.n_paths}: "
                "the exponents are measured on the first paths of the ensemble"
            )
        if self.save_every > self.n_steps:
            raise ValueError(f"save_every = {self.save_every} exceeds n_steps = {self.n_steps}")
        return self


def _norm2(J: jax.Array) -> jax.Array:
    """The 2-norm of a short, wide matrix (rows = input coordinates) from its Gram matrix."""
    return jnp.sqrt(jnp.max(jnp.linalg.eigvalsh(J @ J.T)))


@eqx.filter_jit
def explanation_jacobian(system, theta0, keys, x, n_steps: int, model_fn):
    r"""Per path key: $\|\partial S(\theta^T(\theta^0), x)/\partial\theta^0\|_2$ (the dense
    $d_{in} \times P$ Jacobian through the whole trajectory, reverse mode) and $\theta^T$."""

    def saliency_at_end(th0, key):
        states, _ = parameter_trajectory(system, th0, key=key, n_steps=n_steps)
        theta_T = jax.tree.map(lambda a: a[-1], system.params(states))
        s = jax.grad(lambda z: model_fn(theta_T, z)[0])(x)
        return s, theta_T

    def one(key):
        J, theta_T = jax.jacrev(saliency_at_end, has_aux=True)(theta0, key)
        rows = jnp.concatenate([jnp.reshape(a, (x.size, -1)) for a in jax.tree.leaves(J)], axis=1)
        return _norm2(rows), theta_T

    return jax.vmap(one)(keys)


def _weight_norm_product(weights: tuple) -> np.ndarray:
    """``prod_k ||W_k||_2`` for stacked weights ``(path, step, out, in)`` per layer."""
    return np.prod([np.linalg.norm(np.asarray(w), 2, axis=(-2, -1)) for w in weights], axis=0)


def run(cfg: OutsideExplanations, key, progress: bool) -> xr.Dataset:
    k_data, k_net, k_sim = jax.random.split(key, 3)
    data = models.teacher_student(k_data, n=cfg.n_examples, d_in=cfg.d_in, d_out=1, noise_std=0.1)
    x = data.inputs[0]
    acts, depths, etas = cfg.activation, np.asarray(cfg.depth), np.asarray(cfg.step_size)
    steps = saved_steps(cfg.n_steps, cfg.save_every)
    n_a, n_d, n_e, n_s, P = len(acts), depths.size, etas.size, steps.size, cfg.n_paths
    E = cfg.n_exponent_paths
    level_c = _mc.family_level(cfg.level, n_a * n_d * n_e)
    grid = (n_a, n_d, n_e)
    nan = lambda *extra: np.full((*grid, *extra), np.nan)
    est_names = ("spread", "drift", "input_norm", "parameter_norm", "alpha", "alpha_x")
    est = {n: {part: nan() for part in ("mean", "lower", "upper")} for n in est_names}
    curves = {n: nan(n_s) for n in ("spread_t", "drift_t", "input_norm_t", "parameter_norm_t")}
    diverged, loss = nan(), nan()
    alpha, lhs, rhs, mismatch = nan(E), nan(E), nan(E), nan(E)
    sal_norm, wprod = nan(P, n_s), nan(P, n_s)
    converged = np.zeros(grid, dtype=bool)
    noise = IsotropicGaussian(cfg.noise_scale)
    sweep = Sweep.of(SGD, etas, name="step_size")
    keys = jax.vmap(lambda p: jax.random.fold_in(k_sim, p))(jnp.arange(E))
    for a, act in enumerate(acts):
        for i, depth in enumerate(depths):
            net = models.mlp(
                jax.random.fold_in(k_net, int(depth)),
                [cfg.d_in] + [cfg.width] * int(depth) + [1],
                activation=act,
                init="gaussian",
                sigma_w=cfg.sigma_w,
                final_activation=False,
            )
            objective = SupervisedLoss(net, data.inputs, data.targets)
            theta0 = parameters(net)
            model_fn, _ = model_function(net)
            ens_all = simulate(
                (objective, sweep, noise),
                theta0,
                key=k_sim,
                n_paths=P,
                n_steps=cfg.n_steps,
                save_every=cfg.save_every,
                divergence_threshold=cfg.divergence_threshold,
                progress=progress,
            )
            dist_all = exponent_distribution(
                (objective, sweep, noise),
                theta0,
                key=k_sim,  # path p here is ensemble path p
                n_paths=E,
                n_steps=cfg.n_steps,
                save_every=cfg.n_steps,
                divergence_threshold=cfg.divergence_threshold,
                method=cfg.norm.method,
                max_steps=cfg.norm.max_steps,
                rtol=cfg.norm.rtol,
                keep_final=False,
                progress=progress,
            )
            for g, eta in enumerate(etas):
                c = (a, i, g)
                ens, dist = ens_all.at(g), dist_all.at(g)
                traj = explanation_trajectory(
                    model_fn,
                    ens,
                    x,
                    output=0,
                    max_steps=cfg.norm.max_steps,
                    rtol=cfg.norm.rtol,
                )
                live = np.asarray(traj.alive)
                valid = ~np.asarray(ens.diverged)
                diverged[c] = 1.0 - valid.mean()
                loss[c] = float(np.asarray(ens.mean_loss().mean)[-1])
                e = np.asarray(traj.explanations)  # (path, step, d_in)
                curves["spread_t"][c] = np.asarray(traj.spread)
                curves["drift_t"][c] = np.asarray(traj.mean_drift())
                curves["input_norm_t"][c] = np.asarray(masked_mean(traj.input_norm, live)[0])
                curves["parameter_norm_t"][c] = np.asarray(
                    masked_mean(traj.parameter_norm, live)[0]
                )
                # the spread at T: sqrt of the mean squared deviation (CLT interval on the
                # per-path squared deviations, then the square root of its ends)
                end = e[:, -1][live[:, -1]]
                sq = ((end - end.mean(0)) ** 2).sum(-1) * end.shape[0] / max(end.shape[0] - 1, 1)
                s2 = _mc.path_mean(sq, np.ones(sq.size, bool), level_c)
                est["spread"]["mean"][c] = np.sqrt(s2["mean"])
                est["spread"]["lower"][c] = np.sqrt(max(s2["lower"], 0.0))
                est["spread"]["upper"][c] = np.sqrt(s2["upper"])
                for name, values in (
                    ("drift", np.asarray(traj.drift)[:, -1]),
                    ("input_norm", np.asarray(traj.input_norm)[:, -1]),
                    ("parameter_norm", np.asarray(traj.parameter_norm)[:, -1]),
                ):
                    m = _mc.path_mean(values, live[:, -1], level_c)
                    for part in ("mean", "lower", "upper"):
                        est[name][part][c] = m[part]
                L = int(depth) + 1
                sal = np.linalg.norm(e, axis=-1)
                sal_norm[c] = np.where(live, sal, np.nan)
                wprod[c] = np.where(live, _weight_norm_product(ens.theta.weights), np.nan)
                ax = _mc.path_mean(np.log(sal[:, -1]) / L, live[:, -1], level_c)
                for part in ("mean", "lower", "upper"):
                    est["alpha_x"][part][c] = ax[part]
                a_p = np.asarray(dist.alpha_theta)
                ok = ~np.asarray(dist.diverged) & np.isfinite(a_p)
                alpha[c] = a_p
                am = _mc.path_mean(a_p, ok, level_c)
                for part in ("mean", "lower", "upper"):
                    est["alpha"][part][c] = am[part]
                # the chain rule at T on the exponent paths
                system = LearningSystem(objective, SGD(float(eta)), noise)
                left, theta_T = explanation_jacobian(system, theta0, keys, x, cfg.n_steps, model_fn)
                lhs[c] = np.asarray(left)
                log_cum = np.asarray(dist.log_cum_theta)[:, -1]
                rhs[c] = np.asarray(traj.parameter_norm)[:E, -1] * np.exp(log_cum)
                final = jax.tree.map(lambda t: np.asarray(t)[:E, -1], ens.theta)
                mismatch[c] = np.max(
                    [
                        np.max(np.abs(np.asarray(u) - np.asarray(w)), axis=tuple(range(1, u.ndim)))
                        for u, w in zip(
                            jax.tree.leaves(theta_T), jax.tree.leaves(final), strict=True
                        )
                    ],
                    axis=0,
                )
                converged[c] = bool(traj.converged) and bool(np.all(np.asarray(dist.converged)))

    v = Variables()
    dims = ("activation", "depth", "step_size")
    curve, paths, ep = (*dims, "step"), (*dims, "path", "step"), (*dims, "exponent_path")
    labels = {
        "spread": ("spread of the saliency across paths at T, sqrt tr Cov_p S", "1"),
        "drift": ("mean drift ||S(theta^T) - S(theta^0)|| at T", "1"),
        "input_norm": ("mean input sensitivity ||dS/dx|| = ||Hess_x F|| at T", "1"),
        "parameter_norm": ("mean parameter sensitivity ||dS/dtheta|| at T", "1"),
        "alpha": ("mean parametric exponent (1/T) log ||dtheta^T/dtheta^0||", "1/step"),
        "alpha_x": ("mean depth exponent at the probe (1/L) log ||dF/dx|| at T", "1/layer"),
    }
    for name, (long_name, units) in labels.items():
        v.estimate(
            f"{name}_mean" if name in ("alpha", "alpha_x") else name,
            dims,
            est[name],
            long_name,
            units,
            bounds=name,
            level=level_c,
            interval="CLT interval over paths (Bonferroni over the grid)",
        )
    v.add("spread_t", curve, curves["spread_t"], "saliency spread across paths at step t")
    v.add("drift_t", curve, curves["drift_t"], "mean saliency drift at step t")
    v.add("input_norm_t", curve, curves["input_norm_t"], "mean ||dS/dx|| at step t")
    v.add("parameter_norm_t", curve, curves["parameter_norm_t"], "mean ||dS/dtheta|| at step t")
    v.add("saliency_norm", paths, sal_norm, "||S(theta^t, x)||_2 = ||dF/dx||_2 (NaN: diverged)")
    v.add("weight_norm_product", paths, wprod, "Thm 4.1 bound prod_k ||W_k^t||_2")
    v.add("alpha_theta", ep, alpha, "per-path exponent (1/T) log ||dtheta^T/dtheta^0||", "1/step")
    v.add("chain_lhs", ep, lhs, "||dS(theta^T, x)/dtheta^0||_2 (dense, through the trajectory)")
    v.add("chain_rhs", ep, rhs, "||dS/dtheta(theta^T)||_2 ||dtheta^T/dtheta^0||_2 (Krylov)")
    v.add(
        "trajectory_mismatch",
        ep,
        mismatch,
        "max |theta^T (parameter_trajectory) - theta^T (simulate)|",
    )
    v.add("diverged_fraction", dims, diverged, "fraction of paths that diverged")
    v.add("final_loss", dims, loss, "MC mean of the training loss at T")
    v.add("converged", dims, converged, "every Krylov estimate met its tolerance")
    return v.dataset(
        coords={
            "activation": (list(acts), "activation function", "1"),
            "depth": (depths, "number of hidden layers", "1"),
            "step_size": (etas, "SGD step size eta", "1"),
            "step": (steps, "training step t", "step"),
            "path": (np.arange(P), "Monte Carlo path index", "1"),
            "exponent_path": (np.arange(E), "exponent path index (= ensemble path)", "1"),
        },
        attrs={
            "theorem": "Katende (2025) Section 7.4; Theorem 4.1; Theorem 5.2 (assumptions fail)",
            "width": cfg.width,
            "d_in": cfg.d_in,
            "n_examples": cfg.n_examples,
            "noise_scale": cfg.noise_scale,
            "n_paths": P,
            "n_steps": cfg.n_steps,
            "n_exponent_paths": E,
            "level": cfg.level,
            "interval_level": level_c,
            "chain_tolerance": CHAIN_TOL,
            "probe": np.asarray(x),
        },
    )


def checks(ds: xr.Dataset) -> list[Check]:
    rows = []
    tol = float(ds.attrs["chain_tolerance"])
    for act in ds.activation.values:
        for depth in ds.depth.values:
            for eta in ds.step_size.values:
                s = ds.sel(activation=act, depth=depth, step_size=eta)
                case = f"{act}, depth {int(depth)}, eta = {eta:g}"
                lhs, rhs = s.chain_lhs.values, s.chain_rhs.values
                ok = np.isfinite(lhs) & np.isfinite(rhs)
                ratio = lhs[ok] / rhs[ok]
                same = bool(np.all(s.trajectory_mismatch.values[ok] < 1e-8))
                if not ok.any() or not bool(s.converged):
                    holds, note = None, "no finite path or a Krylov estimate did not converge"
                else:
                    holds = bool(np.all(ratio <= 1 + tol)) and same
                    note = f"tightness LHS/RHS in [{ratio.min():.3g}, {ratio.max():.3g}]" + (
                        "" if same else "; the two trajectories disagree"
                    )
                rows.append(
                    Check(
                        "chain rule (Section 7.4)",
                        case,
                        "||dS/dtheta^0|| <= ||dS/dtheta|| ||dtheta^T/dtheta^0|| at T",
                        f"max ratio {ratio.max():.4g}" if ok.any() else "n/a",
                        holds,
                        note,
                    )
                )
                sal, wp = s.saliency_norm.values, s.weight_norm_product.values
                live = np.isfinite(sal) & np.isfinite(wp)
                r41 = sal[live] / wp[live]
                rows.append(
                    Check(
                        "Thm 4.1 (trained network)",
                        case,
                        "||S(theta^t, x)|| = ||dF/dx|| <= prod_k ||W_k^t||, every (path, t)",
                        f"max ratio {r41.max():.3g}" if r41.size else "n/a",
                        bool(np.all(r41 <= 1 + 1e-12)) if r41.size else None,
                        "1-Lipschitz activations",
                    )
                )
                rows.append(
                    Check(
                        "Thm 5.2",
                        case,
                        "- (no eta_max for an MLP)",
                        f"alpha_theta {float(s.alpha_mean):.4g} [{float(s.alpha_lower):.4g}, "
                        f"{float(s.alpha_upper):.4g}]; saliency spread {float(s.spread):.3g}; "
                        f"diverged {float(s.diverged_fraction):.3f}",
                        None,
                        THM52_NOTE,
                    )
                )
    return rows


def _trend(values: np.ndarray, etas: np.ndarray) -> float:
    """Log-log slope of ``values`` against the step size (NaN unless all positive)."""
    ok = np.isfinite(values) & (values > 0)
    if ok.sum() < 2:
        return np.nan
    return _mc.ols_slope(np.log(etas[ok]), np.log(values[ok]))


def summary(ds: xr.Dataset) -> str:
    etas = ds.step_size.values
    parts = []
    for act in ds.activation.values:
        for depth in ds.depth.values:
            s = ds.sel(activation=act, depth=depth)
            parts.append(
                f"{act} depth {int(depth)}: spread {s.spread.values.min():.3g} to "
                f"{s.spread.values.max():.3g} (slope {_trend(s.spread.values, etas):.2f} in "
                f"log eta), alpha_theta {np.nanmin(s.alpha_mean.values):.4f} to "
                f"{np.nanmax(s.alpha_mean.values):.4f}, alpha_x "
                f"{np.nanmin(s.alpha_x_mean.values):.3f} to "
                f"{np.nanmax(s.alpha_x_mean.values):.3f}, ||dS/dtheta|| "
                f"{np.nanmin(s.parameter_norm.values):.3g} to "
                f"{np.nanmax(s.parameter_norm.values):.3g}"
            )
    ratio = ds.chain_lhs.values / ds.chain_rhs.values
    relu_flat = "relu" in ds.activation.values and bool(
        np.nanmax(ds.input_norm.sel(activation="relu").values) == 0
    )
    grows = bool(np.all(np.diff(ds.spread.transpose(..., "step_size").values, axis=-1) > 0))
    alpha, T = ds.alpha_mean.values, float(ds.attrs["n_steps"])
    return (
        f"Saliency of SGD-trained MLPs (width {ds.attrs['width']}, {ds.attrs['n_paths']} paths x "
        f"{ds.attrs['n_steps']} steps, additive noise {ds.attrs['noise_scale']:g}) at one probe "
        "input. **Which theorem applies:** Theorem 5.2 does not (a non-convex loss: no mu, no "
        "L, no eta_max); Theorem 4.1 does, at every training step, to the trained weights; the "
        "chain rule of Section 7.4 holds for any differentiable training run. Measured: "
        + "; ".join(parts)
        + ". "
        + (
            "The saliency's spread across paths (its sensitivity to the training noise) grows "
            "with the step size in every network. "
            if grows
            else "The saliency's spread does not grow with the step size in every network. "
        )
        + (
            "The exponent alpha_theta is positive in every case: perturbations of theta^0 grow "
            f"(by e^(T alpha) = {np.exp(T * np.nanmin(alpha)):.2g}-"
            f"{np.exp(T * np.nanmax(alpha)):.2g} over the run), which ||I - eta H_t|| > 1 "
            "allows only through negative curvature (or eta lambda > 2): a non-convex loss, "
            "far from Theorem 5.2's contraction. "
            if np.nanmin(alpha) > 0
            else f"The exponent alpha_theta ranges over {np.nanmin(alpha):.4f}-"
            f"{np.nanmax(alpha):.4f}. "
        )
        + "The chain rule carries that sensitivity into the explanation: "
        f"||dS/dtheta^0|| is {np.nanmin(ratio):.3g}-{np.nanmax(ratio):.3g} of the product "
        "bound ||dS/dtheta|| ||dtheta^T/dtheta^0||, so the bound holds but is loose (the "
        "top singular directions of the two factors do not align)."
        + (
            " For ReLU the input sensitivity ||Hess_x F|| is 0 (a piecewise-linear network): the "
            "saliency is piecewise constant in x and jumps across activation boundaries, which "
            "a derivative-based input sensitivity cannot see."
            if relu_flat
            else ""
        )
    )


def figures(ds: xr.Dataset) -> dict:
    etas = ds.step_size.values
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.4))
    markers = {"tanh": "o", "relu": "s"}
    n_depth = ds.sizes["depth"]
    for a, act in enumerate(ds.activation.values):
        for j, depth in enumerate(ds.depth.values):
            s = ds.sel(activation=act, depth=depth)
            style = dict(marker=markers.get(str(act), "o"), color=f"C{a * n_depth + j}", ms=4)
            lab = f"{act}, depth {int(depth)}"
            for ax, name, stem in (
                (axes[0, 0], "spread", "spread"),
                (axes[0, 1], "alpha_mean", "alpha"),
                (axes[1, 0], "parameter_norm", "parameter_norm"),
            ):
                y = s[name].values
                err = [y - s[f"{stem}_lower"].values, s[f"{stem}_upper"].values - y]
                ax.errorbar(etas, y, yerr=err, label=lab, capsize=2, lw=0.8, **style)
            axes[1, 1].loglog(
                s.chain_rhs.values.ravel(), s.chain_lhs.values.ravel(), ls="none", **style
            )
    axes[0, 0].set(xscale="log", yscale="log", xlabel="eta", title="saliency spread at T")
    axes[0, 1].set(xscale="log", xlabel="eta", title="alpha_theta (1/step)")
    axes[0, 1].axhline(0, color="grey", lw=0.5)
    axes[1, 0].set(xscale="log", xlabel="eta", title="||dS/dtheta|| at T")
    for a in (axes[0, 0], axes[0, 1], axes[1, 0]):
        a.set_xticks(etas, [f"{e:g}" for e in etas])
        a.xaxis.set_minor_formatter(plt.NullFormatter())
    ax = axes[1, 1]
    lim = np.array(ax.get_xlim())
    ax.plot(lim, lim, "k--", lw=0.8, label="bound attained")
    ax.set(
        xlabel="||dS/dtheta|| ||dtheta^T/dtheta^0||",
        ylabel="||dS/dtheta^0||",
        title="chain rule at T (each point a path)",
    )
    for a in axes.ravel():
        a.legend(fontsize=6)
    fig.suptitle("Explanation stability against depth and step size")
    fig.tight_layout()
    return {"explanations": fig}


EXPERIMENT = Experiment(
    name="outside_explanations",
    config=OutsideExplanations,
    run=run,
    checks=checks,
    figures=figures,
    summary=summary,
)
