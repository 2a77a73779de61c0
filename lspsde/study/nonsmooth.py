r"""Experiment *nonsmooth*: the examples of Section 6.6, generalised signatures beside autodiff's.

Three systems, each measured against the paper's claims (Definitions 6.1-6.3, Assumptions 3-4,
Theorem 6.4):

1. **Piecewise-linear networks** (fixed parameters). $X_{k+1} = \sigma(W_kX_k)$ with $W_k =
   \rho Q_k$ ($Q_k$ orthogonal, zero biases, so $\|W_k\|_2 = \rho < 1$) and $\sigma$ ReLU,
   leaky ReLU or hard-tanh. Probes: the zero input (every ReLU unit of every layer at its kink)
   and ``n_probes`` Gaussian inputs. Measured per probe and layer: the Clarke signature
   $\sigma^{x,C}_k = \sup_{V\in\partial_C f_k}\|V\|$ (``lspsde.profile.
   generalized_representation_profile``) beside autodiff's; the growth exponent
   $\frac1L\sum_k\log\sup_i\sigma^{x,C}_k$ and Definition 6.2 as written, $\frac1{L+T}
   \log\sup_k\sigma^{x,C}_k$ ($T = 0$), both against Section 6.6's $\tilde\alpha_x \le
   \log\rho$; the energy $\mathcal{E}_k = \frac12\|X_k\|^2$ (summed over probes) against
   $\rho^{2k}\mathcal{E}_0$ and Assumption 4 over depth with $\gamma = (1 - \rho^2)/2$; and
   Theorem 6.4 both ways over depth (``variational_stability``).
2. **Proximal gradient on a lasso** with the step swept across $2/L$ as one
   ``lspsde.Sweep``: $\mathcal{L} = \frac1{2n}\|A\theta - b\|^2$ on an orthogonal design
   ($A^\top A/n = L\,I$), $R = \lambda\|\theta\|_1$, $\theta^*$ in closed form
   (soft-thresholding). Per step size: $\Phi - \Phi^*$ along the run, the sufficient decrease
   $c_\eta$ (``sufficient_decrease``) beside $1/\eta - L/2$ (``prox_gradient_decrease``), the
   generalised signatures $\sigma^{\theta,C}_t$ of ``learning_profile(..., generalized=True)``
   beside autodiff's and their exponents (``generalized_exponents``), Theorem 6.4 both ways
   (``variational_stability``), and the signature at a point where every coordinate of the
   gradient step lands on a kink of soft-thresholding (closed form $|1 - \eta L|$; autodiff
   takes the tie slope $\frac12$ there).
3. **Stochastic projected gradient onto a ball**: $\mathcal{L} = \frac\mu2\|\theta - a\|^2$,
   $a$ inside $C = \{\|\theta - c\| \le r\}$, ``IsotropicGaussian`` noise of total variance
   $\sigma^2$, the step swept as one ``Sweep``. $P_C$ is non-expansive and fixes $a$, so
   $\mathbb{E}N_{t+1} \le q^2\mathbb{E}N_t + \eta^2\sigma^2$, $q = |1 - \eta\mu|$: Assumption 4
   in expectation with $\gamma = \frac\mu2(1 - q^2)$, $R = \frac\mu2\eta^2\sigma^2$, and the
   stationary level $\le \eta^2\sigma^2/(1 - q^2)$. A path that leaves the region $\|\theta\|
   \le$ ``ball_divergence_threshold`` is diverged: frozen, counted, and left out of every
   statistic (divergence is data). One path's generalised signatures are measured beside
   autodiff's ($\sigma^{\theta,C}_t \le q$).

Where the paper's statements fail on these runs the report says so (see the module docstring of
``lspsde.nonsmooth.energy``): Theorem 6.4's (1) read literally ("$\sigma \le C$ for some $C \ge
1$") holds for every finite run of a Lipschitz flow, also where no dissipative energy exists;
the equivalence holds only in its strict form ($\alpha < 0 \Leftrightarrow \gamma > 0$: at
$\eta = 2/L$, $\alpha = 0$ and no energy); and Definition 6.2 divides by $L + T$, so a bounded
signature gives $\tilde\alpha \to 0$ and $\sup\sigma \le \rho$ gives $\log\rho/(L + T) >
\log\rho$, not Section 6.6's $\tilde\alpha_x \le \log\rho$ (which holds for the growth rate).
"""

from typing import Annotated, Literal

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from pydantic import Field, model_validator
import xarray as xr

import models

from .. import nonsmooth as ns
from .._simulate import simulate
from ..exponents import stability_exponents
from ..noise import IsotropicGaussian, NoNoise
from ..profile import (
    generalized_exponents,
    generalized_representation_profile,
    learning_profile,
)
from ..sweep import Sweep
from ..system import LearningSystem
from . import _mc
from ._data import Variables
from .config import Grid, Level, PositiveFloat, PositiveInt, Strict
from .experiment import Check, Experiment

Contraction = Annotated[float, Field(gt=0, lt=1)]
_CENTER = 2.0  # the ball of part 3 is centred at 2 e_1


class Nonsmooth(Strict):
    """The examples of Section 6.6: piecewise-linear networks, a lasso by proximal gradient
    across 2/L, stochastic projected gradient onto a ball."""

    # piecewise-linear networks
    rho: Grid(Contraction) = [0.5, 0.9]
    activation: list[Literal["relu", "leaky_relu", "hard_tanh"]] = [
        "relu",
        "leaky_relu",
        "hard_tanh",
    ]
    width: PositiveInt = 8
    depth: PositiveInt = 8
    n_probes: PositiveInt = 16
    max_kinks: Annotated[int, Field(ge=0, le=20)] = 16
    # proximal gradient on a lasso: eta = eta_L / L
    eta_L: Grid(PositiveFloat) = [0.5, 1.0, 1.5, 1.9, 2.0, 2.2, 3.0]
    lasso_dim: PositiveInt = 10
    lasso_examples: PositiveInt = 40
    lasso_L: PositiveFloat = 1.0
    l1: PositiveFloat = 1.0
    lasso_steps: Annotated[int, Field(ge=5)] = 60
    resolution: Annotated[float, Field(gt=0, lt=1)] = 1e-6
    # stochastic projected gradient onto a ball: eta = eta_mu / mu
    eta_mu: Grid(PositiveFloat) = [0.5, 1.0, 1.5, 2.5]
    ball_dim: Annotated[int, Field(ge=2)] = 3
    mu: PositiveFloat = 1.0
    radius: PositiveFloat = 1.0
    noise_scale: PositiveFloat = 0.5
    n_paths: Annotated[int, Field(ge=20)] = 512
    ball_steps: Annotated[int, Field(ge=10)] = 60
    ball_divergence_threshold: PositiveFloat = 2.8
    level: Level = 0.99

    @model_validator(mode="after")
    def _sizes(self):
        if self.lasso_examples < self.lasso_dim:
            raise ValueError(
                f"lasso_examples = {self.lasso_examples} < lasso_dim = {self.lasso_dim}: an "
                "orthogonal design A^T A / n = L I needs n >= d"
            )
        start = float(np.hypot(_CENTER - 0.6 * self.radius, 0.8 * self.radius))
        if self.ball_divergence_threshold <= start:
            raise ValueError(
                f"ball_divergence_threshold = {self.ball_divergence_threshold} is not above the "
                f"start's norm {start:.4g} (the ball is centred at {_CENTER} e_1 with radius "
                f"{self.radius}): every path would start diverged"
            )
        return self


_SEC = "Sec 6.6"
_THM = "Thm 6.4"
_DEF1 = "Def 6.1"
_DEF2 = "Def 6.2"


# --- 1. piecewise-linear networks --------------------------------------------------------------


def _networks(cfg: Nonsmooth, key) -> dict:
    k_net, k_probe = jax.random.split(key)
    acts, rhos = cfg.activation, np.asarray(cfg.rho, dtype=float)
    P, L, A, R = cfg.n_probes + 1, cfg.depth, len(acts), len(rhos)
    probes = jnp.concatenate(
        [jnp.zeros((1, cfg.width)), jax.random.normal(k_probe, (P - 1, cfg.width))]
    )
    out = {
        name: np.zeros(shape, dtype)
        for name, shape, dtype in [
            ("sigma_x_clarke", (A, R, P, L), float),
            ("sigma_x_autodiff", (A, R, P, L), float),
            ("sigma_x_exact", (A, R, P, L), bool),
            ("n_kinks_x", (A, R, P, L), int),
            ("layer_norm", (A, R, L), float),
            ("depth_energy", (A, R, L + 1), float),
            ("growth_exponent_x", (A, R), float),
            ("def62_exponent_x", (A, R), float),
            ("depth_gamma", (A, R), float),
            ("depth_gamma_bound_holds", (A, R), bool),
            ("depth_energy_bound_holds", (A, R), bool),
            ("depth_statement_1_strict", (A, R), bool),
            ("depth_statement_2", (A, R), bool),
            ("depth_thm64_holds", (A, R), bool),
        ]
    }
    for a, act in enumerate(acts):
        for r, rho in enumerate(rhos):
            net = models.mlp(
                jax.random.fold_in(k_net, a),
                [cfg.width] * (L + 1),
                activation=act,
                init="orthogonal",
                rho=float(rho),
            )
            rep = generalized_representation_profile(net, probes, max_kinks=cfg.max_kinks)
            out["sigma_x_clarke"][a, r] = np.asarray(rep.sigma_x)
            out["sigma_x_autodiff"][a, r] = np.asarray(rep.autodiff)
            out["sigma_x_exact"][a, r] = np.asarray(rep.exact)
            out["n_kinks_x"][a, r] = np.asarray(rep.n_kinks)
            out["layer_norm"][a, r] = [np.linalg.norm(np.asarray(W), 2) for W in net.weights]
            sup = np.asarray(rep.sigma_x).max(axis=0)
            out["growth_exponent_x"][a, r] = np.mean(np.log(sup))
            out["def62_exponent_x"][a, r] = np.log(sup.max()) / (L + 0)
            trace = ns.RepresentationEnergy(net, probes).depth_trace()
            E = np.asarray(trace.energy[0])
            out["depth_energy"][a, r] = E
            bound = rho ** (2 * np.arange(L + 1)) * E[0]
            out["depth_energy_bound_holds"][a, r] = bool(np.all(E <= bound * (1 + 1e-12)))
            diss = ns.variational_dissipation(trace, predicted=(1 - rho**2) / 2)
            out["depth_gamma"][a, r] = float(diss.rate)
            out["depth_gamma_bound_holds"][a, r] = bool(diss.bound_holds)
            thm = ns.variational_stability(trace, sup)
            out["depth_statement_1_strict"][a, r] = bool(thm.statement_1_strict)
            out["depth_statement_2"][a, r] = bool(thm.statement_2)
            out["depth_thm64_holds"][a, r] = all(
                bool(c.holds)
                for c in (
                    thm.energy_implies_decay,
                    thm.energy_implies_exponent,
                    thm.stability_implies_energy,
                )
            )
    return out


# --- 2. proximal gradient on a lasso ----------------------------------------------------------


def _orthogonal_lasso(cfg: Nonsmooth, key):
    """A^T A / n = L I: theta* = S_{lam/L}(theta_ls), theta_ls = A^T b / (n L)."""
    n, d, s2 = cfg.lasso_examples, cfg.lasso_dim, cfg.lasso_L
    k_q, k_theta, k_noise = jax.random.split(key, 3)
    Q, _ = jnp.linalg.qr(jax.random.normal(k_q, (n, d)))
    A = jnp.sqrt(s2 * n) * Q
    b = A @ (1.5 * jax.random.normal(k_theta, (d,))) + jax.random.normal(k_noise, (n,))
    objective = models.LeastSquares(A, b)
    theta_ls = np.asarray(A.T @ b) / (n * s2)
    tau = cfg.l1 / s2
    theta_star = np.sign(theta_ls) * np.maximum(np.abs(theta_ls) - tau, 0.0)
    return objective, theta_ls, theta_star


_IMPLICATIONS = {
    "decay": ("energy_implies_decay", "(2) => decay"),
    "exponent": ("energy_implies_exponent", "(2) => (1), strict"),
    "converse": ("stability_implies_energy", "(1) => (2)"),
}


def _lasso(cfg: Nonsmooth, key) -> dict:
    objective, theta_ls, theta_star = _orthogonal_lasso(cfg, key)
    L, lam, T, d = float(objective.L), cfg.l1, cfg.lasso_steps, cfg.lasso_dim
    etas = np.asarray(cfg.eta_L, dtype=float) / L
    theta0 = jnp.full(d, 2.0)
    flows = lambda e: ns.ProximalGradient(e, ns.L1(lam))
    sweep = Sweep.of(flows, etas, name="step_size")
    ens = simulate((objective, sweep, NoNoise()), theta0, key=key, n_paths=1, n_steps=T)
    G = etas.size
    out = {
        name: np.zeros(shape, dtype)
        for name, shape, dtype in [
            ("lasso_energy", (G, T + 1), float),
            ("lasso_valid", (G, T + 1), bool),
            ("sigma_theta_clarke", (G, T + 1), float),
            ("sigma_theta_autodiff", (G, T + 1), float),
            ("sigma_theta_exact", (G, T + 1), bool),
            ("n_kinks_theta", (G, T + 1), int),
            ("decrease_rate", (G,), float),
            ("decrease_predicted", (G,), float),
            ("decrease_holds", (G,), bool),
            ("decrease_bound_holds", (G,), bool),
            ("alpha_theta_growth", (G,), float),
            ("alpha_theta_def62", (G,), float),
            ("alpha_theta_autodiff", (G,), float),
            ("statement_1", (G,), bool),
            ("statement_1_strict", (G,), bool),
            ("statement_1_literal", (G,), bool),
            ("statement_2", (G,), bool),
            ("kink_sigma_clarke", (G,), float),
            ("kink_sigma_autodiff", (G,), float),
            ("kink_closed_form", (G,), float),
            ("kink_exact", (G,), bool),
            ("kink_n_kinks", (G,), int),
            ("lasso_diverged", (G,), bool),
            ("profile_loss_gap", (G,), float),
        ]
        + [
            (f"thm64_{k}_{part}", (G,), dtype)
            for k in _IMPLICATIONS
            for part, dtype in (
                ("premise", bool),
                ("conclusion", bool),
                ("holds", bool),
                ("predicted", float),
                ("measured", float),
            )
        ]
    }
    H = np.asarray(objective.A.T @ objective.A) / cfg.lasso_examples
    g0 = np.asarray(objective.A.T @ objective.b) / cfg.lasso_examples
    signs = np.where(np.arange(d) % 2 == 0, 1.0, -1.0)
    for g, eta in enumerate(etas):
        flow = flows(eta)
        run = ens.at(g)
        energy = ns.CompositeEnergy.of(objective, flow, minimizer=jnp.asarray(theta_star))
        trace = ns.energy_trace(energy, run)
        out["lasso_energy"][g] = np.asarray(trace.energy[0])
        out["lasso_valid"][g] = np.asarray(trace.valid[0])
        out["lasso_diverged"][g] = bool(run.diverged[0])
        c_eta = float(ns.prox_gradient_decrease(eta, L))
        sd = ns.sufficient_decrease(trace, predicted=c_eta, rtol=cfg.resolution)
        out["decrease_rate"][g], out["decrease_predicted"][g] = float(sd.rate), c_eta
        out["decrease_holds"][g], out["decrease_bound_holds"][g] = (
            bool(sd.holds),
            bool(sd.bound_holds),
        )
        prof = learning_profile(
            LearningSystem(objective, flow),
            theta0,
            key=key,
            n_steps=T,
            method="dense",
            generalized=True,
        )
        gs = prof.generalized
        out["sigma_theta_clarke"][g] = np.asarray(gs.sigma_theta)
        out["sigma_theta_autodiff"][g] = np.asarray(prof.sigma_theta)
        out["sigma_theta_exact"][g] = np.asarray(gs.exact_theta)
        out["n_kinks_theta"][g] = np.asarray(gs.n_kinks_theta)
        alive = np.asarray(run.alive()[0])
        gap = np.abs(np.asarray(prof.loss) - np.asarray(run.loss[0]))[alive]
        out["profile_loss_gap"][g] = float(
            np.max(gap / (1 + np.abs(np.asarray(run.loss[0])[alive])))
        )
        ex = generalized_exponents(prof)
        out["alpha_theta_growth"][g] = float(ex.growth.alpha_theta)
        out["alpha_theta_def62"][g] = float(ex.alpha_theta)
        out["alpha_theta_autodiff"][g] = float(stability_exponents(prof).alpha_theta)
        thm = ns.variational_stability(trace, gs.sigma_theta, rtol=cfg.resolution)
        for name in ("statement_1", "statement_1_strict", "statement_1_literal", "statement_2"):
            out[name][g] = bool(getattr(thm, name))
        for k, (attr, _) in _IMPLICATIONS.items():
            check = getattr(thm, attr)
            for part in ("premise", "conclusion", "holds", "predicted", "measured"):
                out[f"thm64_{k}_{part}"][g] = np.asarray(getattr(check, part))
        # a point where the gradient step lands every coordinate on a kink, y_i = +-eta lam
        q = 1.0 - eta * L
        out["kink_closed_form"][g] = float(np.max(np.abs(1 - eta * np.linalg.eigvalsh(H))))
        if abs(q) < 1e-9:  # eta = 1/L: y = theta_ls whatever theta: the step is constant
            out["kink_sigma_clarke"][g] = out["kink_sigma_autodiff"][g] = np.nan
            continue
        target = eta * lam * signs
        theta_k = (target - eta * L * theta_ls) / q
        J = np.eye(d) - eta * H
        chain = [ns.Affine(J, eta * g0), *ns.prox_chain(ns.L1(lam), eta, jnp.asarray(theta_k))]
        res = ns.generalized_jacobian_norm(chain, theta_k)
        out["kink_sigma_clarke"][g], out["kink_sigma_autodiff"][g] = res.value, res.autodiff
        out["kink_exact"][g], out["kink_n_kinks"][g] = res.exact, res.n_kinks
    out["attrs"] = {"lasso_L": L, "lasso_mu": float(objective.mu), "l1": lam}
    out["etas"] = etas
    return out


# --- 3. stochastic projected gradient onto a ball ---------------------------------------------


def _steps_below(trace, gamma: float, R: float, z: float) -> int:
    r"""Steps $t$ where $\mathbb{E}[\mathcal{E}_t - \mathcal{E}_{t+1} + R - \gamma N_t] \ge 0$
    (Assumption 4 in expectation with rate $\gamma$) is rejected: the path mean plus ``z``
    standard errors is negative (over the paths alive at both ends; Bonferroni over steps)."""
    E, N = np.asarray(trace.energy), np.asarray(trace.norm_sq)
    valid = np.asarray(trace.valid)
    both = valid[:, :-1] & valid[:, 1:] & np.isfinite(E[:, :-1]) & np.isfinite(E[:, 1:])
    D = np.where(both, E[:, :-1] - E[:, 1:] + R - gamma * N[:, :-1], 0.0)
    n = both.sum(axis=0)
    mean = D.sum(axis=0) / np.maximum(n, 1)
    var = np.where(both, (D - mean[None]) ** 2, 0.0).sum(axis=0) / np.maximum(n - 1, 1)
    se = np.sqrt(var / np.maximum(n, 1))
    return int(np.sum((n >= 2) & (mean + z * se < 0)))


def _ball(cfg: Nonsmooth, key) -> dict:
    d, mu, r = cfg.ball_dim, cfg.mu, cfg.radius
    center = jnp.zeros(d).at[0].set(_CENTER)
    a = jnp.zeros(d).at[0].set(_CENTER - 0.5 * r)  # the minimiser, inside the ball
    start = center + r * jnp.zeros(d).at[0].set(-0.6).at[1].set(0.8)  # on the sphere
    objective = models.Quadratic(mu * jnp.eye(d), a)
    ball = ns.Ball(center, r)
    etas = np.asarray(cfg.eta_mu, dtype=float) / mu
    noise = IsotropicGaussian(cfg.noise_scale)
    flows = lambda e: ns.ProjectedGradient(e, ball)
    T = cfg.ball_steps
    ens = simulate(
        (objective, Sweep.of(flows, etas, name="step_size"), noise),
        start,
        key=key,
        n_paths=cfg.n_paths,
        n_steps=T,
        divergence_threshold=cfg.ball_divergence_threshold,
    )
    G = etas.size
    s2 = cfg.noise_scale**2
    level = _mc.family_level(cfg.level, G)
    z_band = _mc.z_value(cfg.level, G * (T + 1))
    out = {
        name: np.zeros(shape, dtype)
        for name, shape, dtype in [
            ("ball_q", (G,), float),
            ("ball_diverged_fraction", (G,), float),
            ("ball_infeasible", (G,), int),
            ("ball_gamma", (G,), float),
            ("ball_gamma_predicted", (G,), float),
            ("ball_gamma_bound_holds", (G,), bool),
            ("ball_gamma_steps_below", (G,), int),
            ("ball_gamma_holds", (G,), bool),
            ("ball_stationary_bound", (G,), float),
            ("ball_sigma_theta_clarke", (G, T + 1), float),
            ("ball_sigma_theta_autodiff", (G, T + 1), float),
            ("ball_sigma_u_clarke", (G, T + 1), float),
            ("ball_sigma_u_autodiff", (G, T + 1), float),
            ("ball_n_kinks", (G,), int),
            ("ball_exact", (G,), bool),
        ]
    }
    band = {k: np.zeros((G, T + 1)) for k in ("mean", "lower", "upper")}
    stationary = []
    for g, eta in enumerate(etas):
        q = abs(1 - eta * mu)
        run = ens.at(g)
        out["ball_q"][g] = q
        out["ball_diverged_fraction"][g] = float(np.mean(np.asarray(run.diverged)))
        alive = np.asarray(run.alive())
        inside = np.asarray(jax.vmap(jax.vmap(ball.contains))(run.theta))
        out["ball_infeasible"][g] = int((alive & ~inside)[:, 1:].sum())
        flow = flows(eta)
        trace = ns.energy_trace(ns.CompositeEnergy.of(objective, flow, minimizer=a), run)
        est = trace.mean()
        m, half = np.asarray(est.mean), z_band * np.asarray(est.sem)
        band["mean"][g], band["lower"][g], band["upper"][g] = m, m - half, m + half
        gamma_pred = mu / 2 * (1 - q**2)
        R = mu / 2 * eta**2 * s2
        diss = ns.variational_dissipation(ns.mean_trace(trace), remainder=R, predicted=gamma_pred)
        out["ball_gamma"][g], out["ball_gamma_predicted"][g] = float(diss.rate), gamma_pred
        z_steps = _mc.z_value(level, T)
        below = _steps_below(trace, gamma_pred, R, z_steps)
        out["ball_gamma_steps_below"][g] = below
        out["ball_gamma_bound_holds"][g] = below == 0
        out["ball_gamma_holds"][g] = bool(diss.holds) and q < 1
        out["ball_stationary_bound"][g] = eta**2 * s2 / (1 - q**2) if q < 1 else np.inf
        n_sq = np.asarray(trace.norm_sq)
        stationary.append(_mc.tail_mean(n_sq, ~np.asarray(run.diverged), T // 2, level))
        system = LearningSystem(objective, flow, noise)
        prof = learning_profile(
            system,
            start,
            key=jax.random.fold_in(key, 0),
            n_steps=T,
            method="dense",
            generalized=True,
        )
        gs = prof.generalized
        out["ball_sigma_theta_clarke"][g] = np.asarray(gs.sigma_theta)
        out["ball_sigma_theta_autodiff"][g] = np.asarray(prof.sigma_theta)
        out["ball_sigma_u_clarke"][g] = np.asarray(gs.sigma_u)
        out["ball_sigma_u_autodiff"][g] = np.asarray(prof.sigma_u)
        out["ball_n_kinks"][g] = int(np.sum(gs.n_kinks_theta) + np.sum(gs.n_kinks_u))
        out["ball_exact"][g] = gs.exact
    out["band"] = band
    out["stationary"] = stationary
    out["level"] = level
    out["z_band"] = z_band
    return out


def run(cfg: Nonsmooth, key, progress: bool) -> xr.Dataset:
    k_net, k_lasso, k_ball = jax.random.split(key, 3)
    net = _networks(cfg, k_net)
    lasso = _lasso(cfg, k_lasso)
    ball = _ball(cfg, k_ball)
    v = Variables()
    nd = ("activation", "rho")
    v.add(
        "sigma_x_clarke",
        (*nd, "probe", "layer"),
        net["sigma_x_clarke"],
        "generalised signature sup_{V in Clarke Jacobian of layer k} ||V||_2 (Def 6.1)",
    )
    v.add(
        "sigma_x_autodiff",
        (*nd, "probe", "layer"),
        net["sigma_x_autodiff"],
        "autodiff's ||jax.jacobian of layer k||_2",
    )
    v.add(
        "sigma_x_exact",
        (*nd, "probe", "layer"),
        net["sigma_x_exact"],
        "the Clarke set was enumerated (else the value is an upper bound)",
    )
    v.add(
        "n_kinks_x",
        (*nd, "probe", "layer"),
        net["n_kinks_x"],
        "pre-activations within tol of a kink",
    )
    v.add("layer_norm", (*nd, "layer"), net["layer_norm"], "||W_k||_2")
    v.add(
        "depth_energy",
        (*nd, "depth_point"),
        net["depth_energy"],
        "E_k = 1/2 ||X_k||^2 summed over the probes",
    )
    v.add(
        "growth_exponent_x",
        nd,
        net["growth_exponent_x"],
        "(1/L) sum_k log sup_probes sigma^{x,C}_k (chain-rule growth rate)",
        "1/layer",
    )
    v.add(
        "def62_exponent_x",
        nd,
        net["def62_exponent_x"],
        "Def 6.2 as written: log sup_k sigma^{x,C}_k / (L + T), T = 0",
        "1/layer",
    )
    v.add(
        "depth_gamma",
        nd,
        net["depth_gamma"],
        "Assumption 4 over depth: measured gamma of E_{k+1} - E_k <= -gamma ||X_k||^2",
    )
    v.add(
        "depth_gamma_bound_holds",
        nd,
        net["depth_gamma_bound_holds"],
        "measured gamma >= (1 - rho^2)/2",
    )
    v.add(
        "depth_energy_bound_holds",
        nd,
        net["depth_energy_bound_holds"],
        "E_k <= rho^(2k) E_0 at every layer",
    )
    v.add(
        "depth_statement_1_strict",
        nd,
        net["depth_statement_1_strict"],
        "Thm 6.4 (1), strict: mean_k log sigma^{x,C}_k < 0",
    )
    v.add(
        "depth_statement_2",
        nd,
        net["depth_statement_2"],
        "Thm 6.4 (2): Assumptions 3 and 4 hold over depth",
    )
    v.add(
        "depth_thm64_holds",
        nd,
        net["depth_thm64_holds"],
        "Thm 6.4 both ways over depth: every implication holds",
    )
    gd, gt = ("eta_L",), ("eta_L", "step")
    v.add(
        "lasso_energy",
        gt,
        lasso["lasso_energy"],
        "Phi(theta^t) - Phi(theta*), Phi = L + lam ||.||_1",
    )
    v.add("lasso_valid", gt, lasso["lasso_valid"], "the point is data (path alive, finite)")
    v.add(
        "sigma_theta_clarke",
        gt,
        lasso["sigma_theta_clarke"],
        "sigma^{theta,C}_t: sup over the Clarke Jacobian of the proximal step (Def 6.1)",
    )
    v.add(
        "sigma_theta_autodiff",
        gt,
        lasso["sigma_theta_autodiff"],
        "autodiff's sigma^theta_t (dense)",
    )
    v.add("sigma_theta_exact", gt, lasso["sigma_theta_exact"], "the Clarke set was enumerated")
    v.add("n_kinks_theta", gt, lasso["n_kinks_theta"], "coordinates of the gradient step at a kink")
    v.add(
        "decrease_rate",
        gd,
        lasso["decrease_rate"],
        "measured c_eta: min_t (Phi_t - Phi_{t+1}) / ||theta^{t+1} - theta^t||^2",
    )
    v.add("decrease_predicted", gd, lasso["decrease_predicted"], "1/eta - L/2 (Sec 6.6)")
    v.add("decrease_holds", gd, lasso["decrease_holds"], "c_eta > 0 and no divergence")
    v.add(
        "decrease_bound_holds", gd, lasso["decrease_bound_holds"], "measured c_eta >= 1/eta - L/2"
    )
    v.add(
        "alpha_theta_growth",
        gd,
        lasso["alpha_theta_growth"],
        "(1/T) sum_t log sigma^{theta,C}_t (chain-rule growth rate)",
        "1/step",
    )
    v.add(
        "alpha_theta_def62",
        gd,
        lasso["alpha_theta_def62"],
        "Def 6.2 as written: log sup_t sigma^{theta,C}_t / T",
        "1/step",
    )
    v.add(
        "alpha_theta_autodiff",
        gd,
        lasso["alpha_theta_autodiff"],
        "autodiff's (1/T) log ||d theta^T / d theta^0||",
        "1/step",
    )
    for name, long in [
        ("statement_1", "Thm 6.4 (1): alpha = mean_t log sigma^{theta,C}_t <= 0"),
        ("statement_1_strict", "Thm 6.4 (1), strict: alpha < 0"),
        ("statement_1_literal", "Thm 6.4 (1) as written: sigma_t <= C for some C >= 1"),
        ("statement_2", "Thm 6.4 (2): Assumptions 3 and 4 on the run"),
        ("lasso_diverged", "the run diverged (frozen past the threshold)"),
        ("kink_sigma_clarke", "sigma^{theta,C} where every coordinate is at a kink"),
        ("kink_sigma_autodiff", "autodiff's sigma^theta there (jnp.maximum's tie slope 1/2)"),
        ("kink_closed_form", "max_i |1 - eta lambda_i(A^T A / n)| (the sup over the hull)"),
        ("kink_exact", "the Clarke set at the kink point was enumerated"),
        ("kink_n_kinks", "coordinates at a kink at the kink point"),
        ("profile_loss_gap", "max relative |loss| gap between the profile's and the sweep's run"),
    ]:
        v.add(name, gd, lasso[name], long)
    for k, (_, label) in _IMPLICATIONS.items():
        for part in ("premise", "conclusion", "holds", "predicted", "measured"):
            v.add(f"thm64_{k}_{part}", gd, lasso[f"thm64_{k}_{part}"], f"Thm 6.4 {label}: {part}")
    bd, bt = ("eta_mu",), ("eta_mu", "ball_step")
    v.estimate(
        "ball_mean_energy",
        bt,
        ball["band"],
        "MC mean of Phi - Phi* = (mu/2)||theta - a||^2",
        bounds="ball_energy",
        level=cfg.level,
        interval="simultaneous band",
    )
    v.estimate(
        "ball_stationary",
        bd,
        ball["stationary"],
        "MC tail mean of ||theta^t - a||^2 over non-diverged paths",
        bounds="ball_stationary",
        level=ball["level"],
    )
    for name, long in [
        ("ball_q", "q = |1 - eta mu|, the gradient step's contraction"),
        ("ball_diverged_fraction", "fraction of paths that left ||theta|| <= threshold"),
        ("ball_infeasible", "alive iterates after step 0 outside the ball"),
        ("ball_gamma", "Assumption 4 in expectation: measured gamma (remainder (mu/2) eta^2 s^2)"),
        ("ball_gamma_predicted", "(mu/2)(1 - q^2)"),
        (
            "ball_gamma_bound_holds",
            "no step where E[E_t - E_t+1 + R - gamma N_t] < 0 is "
            "significant (gamma = (mu/2)(1 - q^2), Bonferroni over steps)",
        ),
        (
            "ball_gamma_steps_below",
            "steps where Assumption 4 with gamma = (mu/2)(1 - q^2) is rejected in expectation",
        ),
        ("ball_gamma_holds", "measured gamma > 0 and q < 1"),
        ("ball_stationary_bound", "eta^2 s^2 / (1 - q^2) (inf: q >= 1)"),
        ("ball_n_kinks", "kinks met by the profiled path (theta and u blocks)"),
        ("ball_exact", "every generalised signature of the profiled path exact"),
    ]:
        v.add(name, bd, ball[name], long)
    for name, long in [
        ("ball_sigma_theta_clarke", "sigma^{theta,C}_t along path 0 (Def 6.1)"),
        ("ball_sigma_theta_autodiff", "autodiff's sigma^theta_t along path 0"),
        ("ball_sigma_u_clarke", "sigma^{u,C}_t along path 0 (Def 6.1)"),
        ("ball_sigma_u_autodiff", "autodiff's sigma^u_t along path 0"),
    ]:
        v.add(name, bt, ball[name], long)
    return v.dataset(
        coords={
            "activation": (list(cfg.activation), "activation function", "1"),
            "rho": (np.asarray(cfg.rho, dtype=float), "||W_k||_2 = rho of every layer", "1"),
            "probe": (np.arange(cfg.n_probes + 1), "probe input (0: the zero input)", "1"),
            "layer": (np.arange(cfg.depth), "layer k", "1"),
            "depth_point": (np.arange(cfg.depth + 1), "representation X_k, k = 0..L", "1"),
            "eta_L": (np.asarray(cfg.eta_L, dtype=float), "step size eta times L", "1"),
            "step": (np.arange(cfg.lasso_steps + 1), "training step t (lasso)", "step"),
            "eta_mu": (np.asarray(cfg.eta_mu, dtype=float), "step size eta times mu", "1"),
            "ball_step": (np.arange(cfg.ball_steps + 1), "training step t (ball)", "step"),
        },
        attrs={
            "theorem": "Katende (2025) Definitions 6.1-6.3, Assumptions 3-4, Theorem 6.4, "
            "Section 6.6",
            "depth": cfg.depth,
            "width": cfg.width,
            **lasso["attrs"],
            "mu": cfg.mu,
            "radius": cfg.radius,
            "noise_scale": cfg.noise_scale,
            "n_paths": cfg.n_paths,
            "level": cfg.level,
            "interval_level": ball["level"],
            "band_z": ball["z_band"],
            "ball_divergence_threshold": cfg.ball_divergence_threshold,
            "resolution": cfg.resolution,
        },
    )


# --- report -----------------------------------------------------------------------------------


def _understated(clarke, autodiff, scale) -> tuple[int, int]:
    c, a = np.asarray(clarke), np.asarray(autodiff)
    ok = np.isfinite(c) & np.isfinite(a)
    return int(np.sum(ok & (a < c - 1e-9 * scale))), int(ok.sum())


def _network_checks(ds: xr.Dataset) -> list[Check]:
    rows = []
    L = int(ds.attrs["depth"])
    for act in map(str, ds.activation.values):
        for rho in ds.rho.values:
            s = ds.sel(activation=act, rho=rho)
            case = f"{act}, rho = {rho:g}, L = {L}, width {ds.attrs['width']}"
            sig = s.sigma_x_clarke.values
            n_under, n_all = _understated(sig, s.sigma_x_autodiff.values, rho)
            rows.append(
                Check(
                    _SEC,
                    case,
                    f"sigma^(x,C) <= rho = {rho:g}",
                    f"max {sig.max():.6g}",
                    bool(sig.max() <= rho * (1 + 1e-12)),
                    f"autodiff below Clarke in {n_under} of {n_all} (probe, layer)",
                )
            )
            zero = s.sel(probe=0)
            kinked = bool((zero.n_kinks_x > 0).any())
            at = zero.sigma_x_clarke.values
            note = (
                f"zero input, {int(zero.n_kinks_x.sum())} kinked units; autodiff "
                f"{float(zero.sigma_x_autodiff.min()):.4g}..{float(zero.sigma_x_autodiff.max()):.4g}"
            )
            rows.append(
                Check(
                    _DEF1,
                    f"{case}: at the zero input",
                    "= ||W_k|| = rho per layer",
                    f"{at.min():.6g}..{at.max():.6g}" + ("" if kinked else " (no kink)"),
                    bool(np.allclose(at, rho, rtol=1e-10) and zero.sigma_x_exact.all()),
                    note,
                )
            )
            g = float(s.growth_exponent_x)
            rows.append(
                Check(
                    _SEC,
                    f"{case}: growth rate",
                    f"(1/L) sum log sigma <= log rho = {np.log(rho):.4f}",
                    f"{g:.4f}",
                    bool(g <= np.log(rho) + 1e-12),
                    "chain-rule bound on (1/L) log sup||dX_L/dX_0||",
                )
            )
            d62 = float(s.def62_exponent_x)
            rows.append(
                Check(
                    _DEF2,
                    f"{case}: as written",
                    f"alpha~_x <= log rho = {np.log(rho):.4f}",
                    f"{d62:.4f}",
                    bool(d62 <= np.log(rho) + 1e-12),
                    "Def 6.2 divides log sup sigma by L + T: >= log rho / (L + T) > "
                    "log rho; the claim holds for the growth rate",
                )
            )
            rows.append(
                Check(
                    "Assumption 4 (depth)",
                    case,
                    f"gamma >= (1 - rho^2)/2 = {(1 - rho**2) / 2:.4g}; E_k <= rho^2k E_0",
                    f"{float(s.depth_gamma):.4g}",
                    bool(s.depth_gamma_bound_holds) and bool(s.depth_energy_bound_holds),
                )
            )
            rows.append(
                Check(
                    _THM,
                    f"{case}: over depth",
                    "(1) <=> (2)",
                    f"(1) strict {bool(s.depth_statement_1_strict)}, (2) "
                    f"{bool(s.depth_statement_2)}",
                    bool(s.depth_thm64_holds),
                )
            )
    return rows


def _lasso_checks(ds: xr.Dataset) -> list[Check]:
    rows = []
    T = ds.sizes["step"] - 1
    for eL in ds.eta_L.values:
        s = ds.sel(eta_L=eL)
        case = f"lasso, eta = {eL:g}/L"
        c_pred, c = float(s.decrease_predicted), float(s.decrease_rate)
        mono = "Phi nonincreasing" if bool(s.decrease_holds) else "Phi increases on some step"
        rows.append(
            Check(
                _SEC,
                f"{case}: sufficient decrease",
                f"c_eta >= 1/eta - L/2 = {c_pred:.4g}",
                f"{c:.4g}",
                bool(s.decrease_bound_holds),
                mono + ("" if eL < 2 else " (eta >= 2/L: no decrease predicted)"),
            )
        )
        sig = s.sigma_theta_clarke.values[s.lasso_valid.values]
        n_under, n_all = _understated(
            s.sigma_theta_clarke.values, s.sigma_theta_autodiff.values, 1.0
        )
        note = (
            f"autodiff below Clarke at {n_under} of {n_all} steps; kinks met "
            f"{int(s.n_kinks_theta.sum())}"
        )
        if eL <= 2:
            rows.append(
                Check(
                    _SEC,
                    f"{case}: sigma^(theta,C)",
                    "<= 1 (eta <= 2/L)",
                    f"max {sig.max():.6g}",
                    bool(sig.max() <= 1 + 1e-12),
                    note,
                )
            )
        else:
            rows.append(
                Check(
                    _SEC,
                    f"{case}: sigma^(theta,C)",
                    "- (eta > 2/L)",
                    f"max {sig.max():.6g}",
                    None,
                    note,
                )
            )
        kc, ka = float(s.kink_sigma_clarke), float(s.kink_sigma_autodiff)
        if np.isfinite(kc):
            rows.append(
                Check(
                    _DEF1,
                    f"{case}: every coordinate at a kink",
                    f"= max|1 - eta lambda| = {float(s.kink_closed_form):.6g}",
                    f"{kc:.6g} (autodiff {ka:.6g})",
                    bool(abs(kc - float(s.kink_closed_form)) <= 1e-10 and s.kink_exact),
                    f"{int(s.kink_n_kinks)} kinks, exact {bool(s.kink_exact)}",
                )
            )
        for k, (_, label) in _IMPLICATIONS.items():
            pre, con = bool(s[f"thm64_{k}_premise"]), bool(s[f"thm64_{k}_conclusion"])
            holds = bool(s[f"thm64_{k}_holds"])
            note = f"premise {pre}, conclusion {con}"
            if k == "converse" and not holds:
                note += (
                    ": alpha = 0 but no energy with gamma > 0 (a 2-cycle); the equivalence "
                    "holds only in its strict form, alpha < 0 <=> gamma > 0"
                )
            rows.append(
                Check(
                    f"{_THM} {label}",
                    case,
                    f"{float(s[f'thm64_{k}_predicted']):.4g}",
                    f"{float(s[f'thm64_{k}_measured']):.4g}",
                    holds,
                    note,
                )
            )
        literal, s2 = bool(s.statement_1_literal), bool(s.statement_2)
        rows.append(
            Check(
                f"{_THM} as written",
                case,
                "(1) sigma_t <= C for some C >= 1 => (2)",
                f"(1) {literal}, (2) {s2}",
                (not literal) or s2,
                ""
                if (not literal) or s2
                else "read literally, (1) holds for every finite run of a Lipschitz flow "
                f"(C = {float(np.nanmax(sig)):.3g}), also where no energy exists",
            )
        )
        rows.append(
            Check(
                _DEF2,
                f"{case}: as written",
                "alpha~_theta = log sup sigma / T",
                f"{float(s.alpha_theta_def62):.4g} (growth {float(s.alpha_theta_growth):.4g},"
                f" autodiff {float(s.alpha_theta_autodiff):.4g})",
                None,
                f"the 1/T normalisation sends it to 0 as T = {T} grows",
            )
        )
    return rows


def _ball_checks(ds: xr.Dataset) -> list[Check]:
    rows = []
    for em in ds.eta_mu.values:
        s = ds.sel(eta_mu=em)
        q = float(s.ball_q)
        case = f"ball, eta = {em:g}/mu (q = {q:.3g})"
        frac = float(s.ball_diverged_fraction)
        rows.append(
            Check(
                "P_C",
                f"{case}: feasibility",
                "every iterate in C",
                f"{int(s.ball_infeasible)} outside",
                int(s.ball_infeasible) == 0,
                f"diverged (left ||theta|| <= {ds.attrs['ball_divergence_threshold']:g}) "
                f"{frac:.3f}: masked",
            )
        )
        gp = float(s.ball_gamma_predicted)
        rows.append(
            Check(
                "Assumption 4 (expectation)",
                case,
                f"gamma >= (mu/2)(1 - q^2) = {gp:.4g}, R = (mu/2) eta^2 s^2",
                f"{float(s.ball_gamma):.4g} (MC means); rejected at "
                f"{int(s.ball_gamma_steps_below)} steps",
                bool(s.ball_gamma_bound_holds),
                ("dissipative" if bool(s.ball_gamma_holds) else "not dissipative (q >= 1)")
                + (f"; survivors only ({frac:.3f} diverged): biased" if frac > 0 else ""),
            )
        )
        bound = float(s.ball_stationary_bound)
        meas = (
            f"{float(s.ball_stationary):.4g} [{float(s.ball_stationary_lower):.4g}, "
            f"{float(s.ball_stationary_upper):.4g}]"
        )
        if np.isfinite(bound):
            rows.append(
                Check(
                    "stationary level",
                    case,
                    f"<= eta^2 s^2/(1 - q^2) = {bound:.4g}",
                    meas,
                    bool(float(s.ball_stationary_lower) <= bound),
                    "",
                )
            )
        else:
            rows.append(
                Check("stationary level", case, "- (q >= 1)", meas, None, "non-diverged paths only")
            )
        sig = s.ball_sigma_theta_clarke.values
        n_under, n_all = _understated(sig, s.ball_sigma_theta_autodiff.values, 1.0)
        rows.append(
            Check(
                _DEF1,
                f"{case}: path 0",
                f"sigma^(theta,C) <= q = {q:.4g}",
                f"max {sig.max():.4g}",
                bool(sig.max() <= q * (1 + 1e-12)),
                f"{int(s.ball_n_kinks)} kinks met, exact {bool(s.ball_exact)}; autodiff "
                f"below Clarke at {n_under} of {n_all} steps",
            )
        )
    return rows


def checks(ds: xr.Dataset) -> list[Check]:
    return _network_checks(ds) + _lasso_checks(ds) + _ball_checks(ds)


def summary(ds: xr.Dataset) -> str:
    rows = checks(ds)
    failed = [r for r in rows if r.holds is False]
    n_under, n_all = _understated(ds.sigma_x_clarke.values, ds.sigma_x_autodiff.values, 1.0)
    l_under, l_all = _understated(ds.kink_sigma_clarke.values, ds.kink_sigma_autodiff.values, 1.0)
    t_under, t_all = _understated(ds.sigma_theta_clarke.values, ds.sigma_theta_autodiff.values, 1.0)
    b_under, b_all = _understated(
        ds.ball_sigma_theta_clarke.values, ds.ball_sigma_theta_autodiff.values, 1.0
    )
    kinds = sorted({r.theorem for r in failed})
    per_eta = ds.n_kinks_theta.sum("step").values
    kinked = [float(e) for e, n in zip(ds.eta_L.values, per_eta, strict=True) if n > 0]
    return (
        f"Piecewise-linear networks (width {ds.attrs['width']}, depth {ds.attrs['depth']}, "
        f"||W_k|| = rho in {list(map(float, ds.rho.values))}), the lasso by proximal gradient "
        f"(L = {ds.attrs['lasso_L']:.4g}, lambda = {ds.attrs['l1']:g}) across eta L in "
        f"{list(map(float, ds.eta_L.values))} as one sweep, and stochastic projected gradient "
        f"onto a ball ({ds.attrs['n_paths']} paths, eta mu in "
        f"{list(map(float, ds.eta_mu.values))}). {len(rows) - len(failed)} of {len(rows)} "
        "checks hold or are informational.\n\n"
        f"**Autodiff understates the generalised signature** at {n_under} of {n_all} (network, "
        f"probe, layer) cases (every one at the zero input, where ReLU's autodiff slope 0 gives "
        f"||0 W|| = 0 against ||W|| = rho), at {l_under} of {l_all} lasso points with every "
        "coordinate at a kink (there autodiff's slope per coordinate is 0, 1/2 or 1 as rounding "
        "puts it below, on or above the tie, and the supremum needs one slope 1 where |1 - eta "
        f"lambda| is largest), and at {t_under} of {t_all} lasso and {b_under} of {b_all} ball "
        f"trajectory steps ({int(ds.n_kinks_theta.sum())} kinked coordinates met along the lasso "
        f"runs, at eta L in {kinked}, where a slope-1 coordinate still attains the supremum): "
        "away from constructed points autodiff's signature is the generalised one (Lemma A.1)."
        "\n\n"
        "**Where the paper's statements fail** (rows marked no: "
        + (", ".join(kinds) if kinds else "none")
        + "): Definition 6.2 divides by L + T, so Section 6.6's alpha~_x <= log rho fails as "
        "written (it holds for the growth rate (1/L) sum log sigma_k); Theorem 6.4's (1) read "
        "literally (sigma_t <= C for some C >= 1) holds on every finite run, also past 2/L where "
        "Phi grows and no energy exists; and at eta = 2/L, alpha = 0 but the run is a 2-cycle "
        "with no dissipative energy: the equivalence holds in its strict form (alpha < 0 <=> "
        "gamma > 0) only."
    )


def figures(ds: xr.Dataset) -> dict:
    acts = [str(a) for a in ds.activation.values]
    fig1, axes = plt.subplots(2, len(acts), figsize=(4.4 * len(acts), 7), squeeze=False)
    k = ds.layer.values
    for j, act in enumerate(acts):
        ax, ax2 = axes[0, j], axes[1, j]
        for i, rho in enumerate(ds.rho.values):
            s = ds.sel(activation=act, rho=rho)
            c = f"C{i}"
            ax.plot(
                k,
                s.sigma_x_clarke.max("probe"),
                "o-",
                color=c,
                ms=3,
                label=f"rho={rho:g}: Clarke sup over probes",
            )
            ax.plot(
                k,
                s.sigma_x_clarke.isel(probe=slice(1, None)).median("probe"),
                "s:",
                color=c,
                ms=3,
                label="median over the random probes",
            )
            ax.plot(
                k,
                s.sigma_x_autodiff.sel(probe=0),
                "x--",
                color=c,
                ms=4,
                label="autodiff at the zero input",
            )
            ax.axhline(rho, color=c, lw=0.6, ls=":")
            E = s.depth_energy.values
            pts = ds.depth_point.values
            ax2.semilogy(pts, E, "o-", color=c, ms=3, label=f"rho={rho:g}: 1/2 ||X_k||^2")
            ax2.semilogy(pts, E[0] * rho ** (2 * pts), ":", color=c, label="rho^(2k) E_0")
        ax.set(title=f"{act}: sigma^(x,C)_k (dotted: rho)", xlabel="layer k", ylim=(-0.05, None))
        ax2.set(title=f"{act}: energy over depth", xlabel="k")
        ax.legend(fontsize=6)
        ax2.legend(fontsize=6)
    fig1.tight_layout()
    fig2, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.2))
    t = ds.step.values
    for i, eL in enumerate(ds.eta_L.values):
        s = ds.sel(eta_L=eL)
        e = np.where(s.lasso_valid.values, s.lasso_energy.values, np.nan)
        a1.semilogy(t, np.where(e > 0, e, np.nan), color=f"C{i % 10}", label=f"eta L = {eL:g}")
        a3.plot(t, s.sigma_theta_clarke.where(s.lasso_valid), color=f"C{i % 10}", lw=1)
    a1.set(title="lasso: Phi - Phi*", xlabel="step t")
    a1.legend(fontsize=6)
    eL = ds.eta_L.values
    fine = np.linspace(eL.min(), eL.max(), 100)
    L = float(ds.attrs["lasso_L"])
    a2.plot(fine, (1 / fine - 0.5) * L, "k-", lw=1, label="1/eta - L/2 (Sec 6.6)")
    a2.plot(eL, ds.decrease_rate, "o", label="measured c_eta")
    a2.axhline(0, color="grey", lw=0.5)
    a2.axvline(2, color="grey", lw=0.5, ls="--")
    a2.set(title="sufficient decrease", xlabel="eta L")
    a2.legend(fontsize=7)
    a3.axhline(1, color="grey", lw=0.5, ls="--")
    a3.set(title="sigma^(theta,C)_t per eta (dashed: 1)", xlabel="step t")
    fig2.tight_layout()
    fig3, (b1, b2) = plt.subplots(1, 2, figsize=(11, 4.2))
    tb = ds.ball_step.values
    for i, em in enumerate(ds.eta_mu.values):
        s = ds.sel(eta_mu=em)
        b1.plot(tb, s.ball_mean_energy, color=f"C{i}", label=f"eta mu = {em:g}")
        b1.fill_between(tb, s.ball_energy_lower, s.ball_energy_upper, color=f"C{i}", alpha=0.2)
    b1.set(title="projected SGD on a ball: E (Phi - Phi*) (non-diverged)", xlabel="step t")
    b1.legend(fontsize=7)
    b2.bar([f"{em:g}" for em in ds.eta_mu.values], ds.ball_diverged_fraction)
    b2.set(title="diverged fraction (left the safe region)", xlabel="eta mu")
    fig3.tight_layout()
    return {"networks": fig1, "lasso": fig2, "ball": fig3}


EXPERIMENT = Experiment(
    name="nonsmooth",
    config=Nonsmooth,
    run=run,
    checks=checks,
    figures=figures,
    summary=summary,
)
