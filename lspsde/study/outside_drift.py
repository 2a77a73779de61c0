r"""Experiment *outside_drift*: online SGD on a drifting data stream, outside Theorem 5.2.

A linear student $F(x) = \Theta x + b$ is trained by online SGD (``lspsde.SGD(eta)``) on fresh
minibatches of $B$ examples from a ``lspsde.noise.DataStream``: inputs $x = m_t + s_t\xi$,
labels $y = W_t x + \varsigma_t\zeta$ (``StreamNoise``). Two kinds of scenario:

- **rotating teacher** $W_t = W R(\omega t)$ (``RotatingTeacher``) over a grid of rates
  $\omega$ (one ``Sweep`` of the noise model, common random numbers), $\omega = 0$ being the
  stationary control;
- **covariate shift** (``CovariateShift``): at step $t_s$ the inputs change from $N(0, I)$ to
  $N(m, s^2 I)$ and the label noise from $\varsigma$ to $\varsigma'$ (a ``Piecewise`` level),
  with a fixed teacher.

The moving target is $\theta^*(t) = (W_t, 0)$ (``stream.minimizer(t)``), and the measured
quantity the tracking error $\|\Theta^t - W_t\|_F^2 + \|b^t\|^2$.

**Exact recursion** (derived here; [`tracking_recursion`][]). With $z = (x, 1)$,
$\tilde E_t = [\Theta^t - W_t, b^t]$ and $\Delta_t = [W_{t+1} - W_t, 0]$, one step is
$\tilde E_{t+1} = \tilde E_t(I - \eta\hat C_t) + N_t - \Delta_t$ with
$\hat C_t = \frac1B\sum_i z_iz_i^\top$ and $N_t = \frac{\eta\varsigma_t}B\sum_i\zeta_iz_i^\top$,
both independent of $\tilde E_t$. So the mean $\mu_t = \mathbb{E}\tilde E_t$ and the second
moment $P_t = \mathbb{E}\tilde E_t^\top\tilde E_t$ obey

$$\mu_{t+1} = \mu_t(I - \eta C_t) - \Delta_t,$$
$$P_{t+1} = P_t - \eta(C_tP_t + P_tC_t) + \eta^2\Big(\tfrac1B Q_t(P_t) + (1 - \tfrac1B)C_tP_tC_t
\Big) + \tfrac{\eta^2\varsigma_t^2 d_{out}}{B}C_t - (I - \eta C_t)\mu_t^\top\Delta_t
- \Delta_t^\top\mu_t(I - \eta C_t) + \Delta_t^\top\Delta_t,$$

$C_t = \mathbb{E}zz^\top$ and $Q_t(P) = \mathbb{E}[zz^\top Pzz^\top]$, the Gaussian fourth moment
([`gaussian_fourth_moment`][]); the tracking error is $\operatorname{tr}P_t$, of which
$\|\mu_t\|_F^2$ is the squared mean lag.

**What the theory says.** Theorem 5.2 needs one fixed objective with a fixed minimiser and
Assumption 1 for its gradient noise. At $\omega = 0$ both hold: the population loss has Hessian
$C \otimes I$ ($\mu = \lambda_{\min}(C)$, $L = \lambda_{\max}(C)$) and
$\mathbb{E}\|G - \nabla\mathcal{L}\|^2 = \sigma_0^2 + \sum_j e_j^\top(Q(I) - C^2)e_j/B \le
\sigma_0^2 + \sigma_1^2\|\tilde E\|^2$ with $\sigma_0^2 = \varsigma^2 d_{out}\operatorname{tr}C/B$
and $\sigma_1^2 = \lambda_{\max}(Q(I) - C^2)/B$ (``assumption1_constants``), exact. With
$\omega > 0$ the minimiser moves every step: the theorem's assumption fails and its stationary
level, which knows nothing of $\omega$, is exceeded. Two things do still hold and are checked:
Lemma 5.1 per step plus Minkowski, $\sqrt{m_{t+1}} \le \sqrt{q\,m_t + \eta^2\sigma_0^2} +
\|\Delta_t\|_F$ (a drift-corrected bound derived here), and, under the covariate shift of a
well-specified model, Lemma 5.1 applied piecewise with each law's constants ($\theta^*$ does not
move there; only the curvature and the noise change). The stationary-law recursion (the law of
step 0 held fixed) is reported beside the exact one as what a fixed-objective analysis predicts.

**Exponents** (``lspsde.exponent_distribution`` on the first paths, the same keys): the
Jacobian of the step, $I - \eta\hat C_t$, does not involve $W_t$ or the labels, so
$\alpha_\theta$ is the same for every $\omega$ (checked to rounding): the exponent is blind to
the drift that sets the tracking floor. At $\omega = 0$, Theorem 5.2(2) in its norm form,
$\alpha_\theta \le \frac12\log q$, is a statement about the limit $T \to \infty$ (by Jensen,
for the top Lyapunov exponent); at the finite horizon $T$ the per-path exponents lie above it.
What holds at $T$ is the mean-square form: $\mathbb{E}[A_t^2] \preceq qI$ for $A_t = I -
\eta\hat C_t$ (Lemma 5.1 on the tangent, $\sigma_0 = 0$), so $\mathbb{E}\|\partial\theta^T/
\partial\theta^0\|_2^2 \le \mathbb{E}\|\prod_t A_t\|_F^2 \le (d_{in} + 1)\,q^T$, checked
against the Monte Carlo mean of $e^{2T\alpha_\theta}$ with its interval.
"""

from typing import Annotated

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from pydantic import Field, model_validator
import xarray as xr

from .. import theory
from .._simulate import saved_steps, simulate
from ..distributions import exponent_distribution
from ..noise import (
    CovariateShift,
    DataStream,
    GaussianInputs,
    LinearTeacher,
    Piecewise,
    RotatingTeacher,
    StreamNoise,
)
from ..objectives import SupervisedLoss, parameters
from ..parameter import SGD
from ..representation import Feedforward
from ..sweep import Sweep
from . import _mc
from ._data import Variables
from .config import Grid, Level, NonNegativeFloat, NormConfig, PositiveFloat, PositiveInt, Strict
from .experiment import Check, Experiment

# The Jacobian of the step does not see W_t: exponents agree across rates to rounding (the
# tangent computation is the same floating-point program; 1e-9 per step allows reassociation).
DRIFT_BLIND_TOL = 1e-9


class OutsideDrift(Strict):
    """Online SGD of a linear student on a rotating teacher and under a covariate shift."""

    d_in: Annotated[int, Field(ge=2)] = 8
    d_out: PositiveInt = 2
    batch_size: PositiveInt = 4
    eta: PositiveFloat = 0.05
    label_noise: NonNegativeFloat = 0.3
    rates: Grid(NonNegativeFloat, min_length=2) = [0.0, 0.0025, 0.005, 0.01, 0.02]
    covariate_shift: bool = True
    shift_at: Annotated[int, Field(ge=1)] = 500
    shift_mean: NonNegativeFloat = 0.5
    shift_scale: PositiveFloat = 1.5
    shift_label_noise: NonNegativeFloat = 0.6
    n_paths: Annotated[int, Field(ge=50)] = 1000
    n_steps: Annotated[int, Field(ge=20)] = 1000
    save_every: PositiveInt = 10
    n_exponent_paths: Annotated[int, Field(ge=2)] = 64
    n_exponent_steps: PositiveInt = 200
    level: Level = 0.99
    divergence_threshold: Annotated[float, Field(gt=0, le=1e100)] = 1e8
    norm: NormConfig = NormConfig(rtol=1e-6)

    @model_validator(mode="after")
    def _sizes(self):
        if self.n_steps < 20 * self.save_every:
            raise ValueError(
                f"n_steps = {self.n_steps} gives fewer than 20 saved steps with save_every = "
                f"{self.save_every}; the tail mean needs more"
            )
        if self.covariate_shift and not (self.n_steps // 4 <= self.shift_at < self.n_steps):
            raise ValueError(
                f"shift_at = {self.shift_at} must lie in [n_steps/4, n_steps) = "
                f"[{self.n_steps // 4}, {self.n_steps}): a shift at or past the horizon never "
                "happens, and one in the first quarter leaves no settled level before it"
            )
        if self.n_exponent_steps > self.n_steps:
            raise ValueError(
                f"n_exponent_steps = {self.n_exponent_steps} exceeds n_steps = {self.n_steps}"
            )
        return self


# --- the exact recursion ----------------------------------------------------------------------


def augmented_moments(m: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
    r"""$(c, \Sigma)$ of $z = (x, 1)$, $x \sim N(m, s^2 I)$: mean $c = (m, 1)$ and covariance
    $\Sigma = \operatorname{diag}(s^2 I, 0)$."""
    return np.append(m, 1.0), np.diag(np.append(np.full(m.size, s**2), 0.0))


def gaussian_fourth_moment(P: np.ndarray, c: np.ndarray, Sigma: np.ndarray) -> np.ndarray:
    r"""$\mathbb{E}[zz^\top Pzz^\top]$ for $z \sim N(c, \Sigma)$ and symmetric $P$ (Isserlis):
    $(c^\top Pc + \operatorname{tr}P\Sigma)cc^\top + 2cc^\top P\Sigma + 2\Sigma Pcc^\top +
    (c^\top Pc)\Sigma + 2\Sigma P\Sigma + \operatorname{tr}(P\Sigma)\Sigma$."""
    cc = np.outer(c, c)
    cpc, tps = float(c @ P @ c), float(np.trace(P @ Sigma))
    return (
        (cpc + tps) * cc
        + 2 * cc @ P @ Sigma
        + 2 * Sigma @ P @ cc
        + cpc * Sigma
        + 2 * Sigma @ P @ Sigma
        + tps * Sigma
    )


def assumption1_constants(
    m: np.ndarray, s: float, label_noise: float, d_out: int, batch_size: int
) -> dict[str, float]:
    r"""$\mu, L$ of the population loss and the exact Assumption-1 constants $\sigma_0,
    \sigma_1$ of online least squares with inputs $N(m, s^2 I)$ (see the module docstring)."""
    c, Sigma = augmented_moments(m, s)
    C = Sigma + np.outer(c, c)
    eig = np.linalg.eigvalsh(C)
    excess = gaussian_fourth_moment(np.eye(c.size), c, Sigma) - C @ C
    return {
        "mu": float(eig[0]),
        "L": float(eig[-1]),
        "sigma0": float(np.sqrt(label_noise**2 * d_out * np.trace(C) / batch_size)),
        "sigma1": float(np.sqrt(max(np.linalg.eigvalsh(excess)[-1], 0.0) / batch_size)),
    }


def law_moments(stream: DataStream, n_steps: int) -> dict[str, np.ndarray]:
    r"""The law of every step $t = 0..T$: input mean $m_t$ ``(T+1, d)`` and scale $s_t$, label
    noise $\varsigma_t$, teacher $W_t$ ``(T+1, d_out, d)``, from the stream's own moments
    (``inputs.moments(t)``; the recursion needs an isotropic covariance $s_t^2 I$)."""
    d = stream.inputs.dim
    ts = jnp.arange(n_steps + 1)
    m, cov = (np.asarray(a) for a in jax.vmap(stream.inputs.moments)(ts))
    s2 = np.einsum("tii->t", cov) / d
    if not np.allclose(cov, s2[:, None, None] * np.eye(d), rtol=1e-12, atol=0.0):
        raise ValueError("The exact tracking recursion needs isotropic inputs N(m_t, s_t^2 I).")
    return {
        "m": m,
        "s": np.sqrt(s2),
        "label_noise": np.asarray(jax.vmap(stream.label_noise)(ts)),
        "W": np.asarray(jax.vmap(stream.minimizer)(ts)),
    }


def tracking_recursion(
    stream: DataStream,
    E0: np.ndarray,
    eta: float,
    batch_size: int,
    n_steps: int,
    *,
    freeze: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    r"""The exact tracking error $\operatorname{tr}P_t$ and squared mean lag $\|\mu_t\|_F^2$,
    $t = 0..T$, of online SGD on ``stream`` from $\tilde E_0 = [\Theta^0 - W_0, b^0]$ = ``E0``
    (shape ``(d_out, d_in + 1)``), by the recursion of the module docstring.

    ``freeze=True``: the law of step 0 at every step (no drift, no shift): what a
    fixed-objective analysis would predict for the same start."""
    d_out = E0.shape[0]
    law = law_moments(stream, n_steps)
    mu = np.array(E0, dtype=float)
    P = mu.T @ mu
    eye = np.eye(mu.shape[1])
    B = batch_size
    track, lag = np.empty(n_steps + 1), np.empty(n_steps + 1)
    for t in range(n_steps + 1):
        track[t], lag[t] = np.trace(P), float(np.sum(mu**2))
        if t == n_steps:
            break
        tt = 0 if freeze else t
        c, Sigma = augmented_moments(law["m"][tt], float(law["s"][tt]))
        C = Sigma + np.outer(c, c)
        varsigma = float(law["label_noise"][tt])
        A = eye - eta * C
        Delta = np.zeros_like(mu)
        if not freeze:
            Delta[:, :-1] = law["W"][t + 1] - law["W"][t]
        P = (
            P
            - eta * (C @ P + P @ C)
            + eta**2 * (gaussian_fourth_moment(P, c, Sigma) / B + (1 - 1 / B) * C @ P @ C)
            + (eta**2 * varsigma**2 * d_out / B) * C
            - A @ mu.T @ Delta
            - Delta.T @ mu @ A
            + Delta.T @ Delta
        )
        P = 0.5 * (P + P.T)
        mu = mu @ A - Delta
    return track, lag


def drift_bound(
    m0: float, eta: float, constants: list[dict], delta: np.ndarray, n_steps: int
) -> np.ndarray:
    r"""Lemma 5.1 per step, plus the target's move (Minkowski):
    $\sqrt{b_{t+1}} = \sqrt{q_t b_t + \eta^2\sigma_{0,t}^2} + \|\Delta_t\|_F$, $b_0 = m_0$,
    with the constants of the law at step $t$ (``constants[t]``, each with ``mu, L, sigma0,
    sigma1``). With $\Delta = 0$ and one law it is Theorem 5.2(1)'s bound."""
    b = np.empty(n_steps + 1)
    b[0] = m0
    for t in range(n_steps):
        k = constants[t]
        q = float(theory.sgd_contraction(eta, k["mu"], k["L"], k["sigma1"]))
        b[t + 1] = (np.sqrt(q * b[t] + eta**2 * k["sigma0"] ** 2) + delta[t]) ** 2
    return b


# --- the experiment ---------------------------------------------------------------------------


def _student(d_in: int, d_out: int, probes: np.ndarray, targets: np.ndarray):
    net = Feedforward([jnp.zeros((d_out, d_in))], activation="identity")
    return SupervisedLoss(net, jnp.asarray(probes), jnp.asarray(targets)), parameters(net)


def _tracking(ens, stream: DataStream) -> np.ndarray:
    """Per path ``||Theta^t - W_t||_F^2 + ||b^t||^2`` at the saved steps, ``(path, step)``."""
    W = np.asarray(jax.vmap(stream.minimizer)(jnp.asarray(ens.steps)))
    theta = np.asarray(ens.theta.weights[0])  # (path, step, d_out, d_in)
    b = np.asarray(ens.theta.biases[0])  # (path, step, d_out)
    return ((theta - W[None]) ** 2).sum(axis=(-2, -1)) + (b**2).sum(-1)


def _scenarios(cfg: OutsideDrift, W: np.ndarray) -> tuple[list[str], list[DataStream]]:
    labels, streams = [], []
    for r in cfg.rates:
        labels.append(f"rotation {r:g}")
        streams.append(
            DataStream(GaussianInputs(cfg.d_in), RotatingTeacher(W, float(r)), cfg.label_noise)
        )
    if cfg.covariate_shift:
        mean = np.full(cfg.d_in, cfg.shift_mean / np.sqrt(cfg.d_in))
        after = GaussianInputs(mean=mean, scale=cfg.shift_scale)
        labels.append("covariate shift")
        streams.append(
            DataStream(
                CovariateShift(GaussianInputs(cfg.d_in), after, at_step=cfg.shift_at),
                LinearTeacher(W),
                Piecewise([cfg.label_noise, cfg.shift_label_noise], [cfg.shift_at]),
            )
        )
    return labels, streams


def run(cfg: OutsideDrift, key, progress: bool) -> xr.Dataset:
    k_w, k_probe, k_sim = jax.random.split(key, 3)
    W = np.asarray(jax.random.normal(k_w, (cfg.d_out, cfg.d_in)))
    probes = np.asarray(jax.random.normal(k_probe, (32, cfg.d_in)))
    objective, theta0 = _student(cfg.d_in, cfg.d_out, probes, probes @ W.T)
    labels, streams = _scenarios(cfg, W)
    n_rot = len(cfg.rates)
    steps = saved_steps(cfg.n_steps, cfg.save_every)
    n_sc, n_s = len(labels), steps.size
    z_band = _mc.z_value(cfg.level, n_sc * n_s)
    level_sc = _mc.family_level(cfg.level, n_sc)
    tail_start = int(np.searchsorted(steps, cfg.n_steps // 2))
    if cfg.covariate_shift:  # the tail after the shift has settled: its last half
        tail_start = max(tail_start, int(np.searchsorted(steps, (cfg.shift_at + cfg.n_steps) // 2)))
    E0 = np.concatenate([0.0 - W, np.zeros((cfg.d_out, 1))], axis=1)  # Theta^0 = 0, b^0 = 0
    m0 = float(np.sum(E0**2))
    T = cfg.n_exponent_steps
    sgd = SGD(cfg.eta)
    noises = [StreamNoise(s, cfg.batch_size) for s in streams]
    groups = [(list(range(n_rot)), Sweep(noises[:n_rot], name="rate", values=cfg.rates))]
    if cfg.covariate_shift:
        groups.append(([n_rot], noises[n_rot]))

    track = {part: np.full((n_sc, n_s), np.nan) for part in ("mean", "lower", "upper")}
    alive = np.zeros((n_sc, n_s))
    diverged = np.zeros(n_sc)
    floor = {part: np.full(n_sc, np.nan) for part in ("mean", "lower", "upper")}
    alpha = np.full((n_sc, cfg.n_exponent_paths), np.nan)
    alpha_ok = np.zeros((n_sc, cfg.n_exponent_paths), dtype=bool)
    for idx, noise in groups:
        ens_all = simulate(
            (objective, sgd, noise),
            theta0,
            key=k_sim,
            n_paths=cfg.n_paths,
            n_steps=cfg.n_steps,
            save_every=cfg.save_every,
            divergence_threshold=cfg.divergence_threshold,
            progress=progress,
        )
        if not isinstance(noise, Sweep):
            dist_all = None  # the shift lies past the exponent horizon: not profiled
        else:
            dist_all = exponent_distribution(
                (objective, sgd, noise),
                theta0,
                key=k_sim,
                n_paths=cfg.n_exponent_paths,
                n_steps=T,
                save_every=T,
                method=cfg.norm.method,
                max_steps=cfg.norm.max_steps,
                rtol=cfg.norm.rtol,
                keep_final=False,
                progress=progress,
            )
        for j, i in enumerate(idx):
            ens = ens_all.at(j) if isinstance(noise, Sweep) else ens_all
            dist = dist_all.at(j) if dist_all is not None else None
            e = _tracking(ens, streams[i])
            live = np.asarray(ens.alive())
            valid = ~np.asarray(ens.diverged)
            for t in range(n_s):
                est = _mc.path_mean(e[:, t], live[:, t], 0.5)
                track["mean"][i, t] = est["mean"]
                half = z_band * est["se"] if np.isfinite(est["se"]) else 0.0
                track["lower"][i, t] = est["mean"] - half
                track["upper"][i, t] = est["mean"] + half
            alive[i] = live.sum(axis=0)
            diverged[i] = 1.0 - valid.mean()
            st = _mc.tail_mean(e, valid, tail_start, level_sc)
            for part in floor:
                floor[part][i] = st[part]
            if dist is not None:
                a = np.asarray(dist.alpha_theta)
                alpha[i], alpha_ok[i] = a, ~np.asarray(dist.diverged) & np.isfinite(a)

    exact, lag, frozen, bound, bound_drift = (np.zeros((n_sc, n_s)) for _ in range(5))
    delta = np.zeros(n_sc)
    consts0 = assumption1_constants(
        np.zeros(cfg.d_in), 1.0, cfg.label_noise, cfg.d_out, cfg.batch_size
    )
    fixed = theory.sgd_mean_square_bound(
        np.arange(cfg.n_steps + 1),
        m0,
        cfg.eta,
        consts0["mu"],
        consts0["L"],
        consts0["sigma0"],
        consts0["sigma1"],
    )
    for i, stream in enumerate(streams):
        tr, lg = tracking_recursion(stream, E0, cfg.eta, cfg.batch_size, cfg.n_steps)
        fr, _ = tracking_recursion(stream, E0, cfg.eta, cfg.batch_size, cfg.n_steps, freeze=True)
        exact[i], lag[i], frozen[i] = tr[steps], lg[steps], fr[steps]
        law = law_moments(stream, cfg.n_steps)
        moves = np.sqrt(((law["W"][1:] - law["W"][:-1]) ** 2).sum(axis=(-2, -1)))
        delta[i] = moves.mean()
        cache: dict = {}
        per_step = []
        for t in range(cfg.n_steps):  # the constants of the law at step t (few distinct laws)
            key_t = (*law["m"][t], law["s"][t], law["label_noise"][t])
            if key_t not in cache:
                cache[key_t] = assumption1_constants(
                    law["m"][t],
                    float(law["s"][t]),
                    float(law["label_noise"][t]),
                    cfg.d_out,
                    cfg.batch_size,
                )
            per_step.append(cache[key_t])
        bound[i] = np.asarray(fixed)[steps]
        bound_drift[i] = drift_bound(m0, cfg.eta, per_step, moves, cfg.n_steps)[steps]

    def tail(x):
        return x[:, tail_start:].mean(axis=1)

    q0 = float(theory.sgd_contraction(cfg.eta, consts0["mu"], consts0["L"], consts0["sigma1"]))
    if cfg.covariate_shift:
        law = law_moments(streams[-1], cfg.n_steps)
        after = assumption1_constants(
            law["m"][-1], float(law["s"][-1]), cfg.shift_label_noise, cfg.d_out, cfg.batch_size
        )
        q_after = float(theory.sgd_contraction(cfg.eta, after["mu"], after["L"], after["sigma1"]))
    else:
        after, q_after = dict.fromkeys(("mu", "L", "sigma0", "sigma1"), np.nan), np.nan
    v = Variables()
    sc, curve = ("scenario",), ("scenario", "step")
    err = "||Theta^t - W_t||_F^2 + ||b^t||^2"
    rates = np.append(np.asarray(cfg.rates, dtype=float), [np.nan] * (n_sc - n_rot))
    v.add(
        "rotation_rate", sc, rates, "teacher rotation rate omega (NaN: covariate shift)", "rad/step"
    )
    v.add("teacher_move", sc, delta, "mean per-step move ||W_{t+1} - W_t||_F of the target")
    v.estimate(
        "tracking_error",
        curve,
        track,
        f"MC mean of the tracking error {err}",
        bounds="tracking",
        level=cfg.level,
        interval="simultaneous (Bonferroni) band over steps and scenarios",
    )
    v.add("tracking_exact", curve, exact, "exact tracking error (second-moment recursion)")
    v.add("lag_exact", curve, lag, "exact squared mean lag ||E[Theta^t - W_t, b^t]||_F^2")
    v.add(
        "tracking_stationary_law",
        curve,
        frozen,
        "tracking error predicted with the law of step 0 held fixed (no drift)",
    )
    v.add(
        "tracking_bound",
        curve,
        bound,
        "Thm 5.2(1) bound with the step-0 law's constants (a fixed objective)",
    )
    v.add(
        "tracking_bound_drift",
        curve,
        bound_drift,
        "Lemma 5.1 per step + Minkowski: sqrt b_{t+1} = sqrt(q b_t + eta^2 s0^2) + ||Delta_t||",
    )
    v.add("n_alive", curve, alive, "number of paths not diverged by step t")
    v.add("diverged_fraction", sc, diverged, "fraction of paths that diverged")
    v.estimate(
        "floor",
        sc,
        floor,
        f"MC tail mean of {err}",
        bounds="floor",
        level=level_sc,
    )
    v.add("floor_exact", sc, tail(exact), "exact tail mean of the tracking error")
    v.add("floor_lag", sc, tail(lag), "exact tail mean of the squared mean lag")
    v.add("floor_stationary_law", sc, tail(frozen), "tail mean predicted with the step-0 law")
    v.add("floor_bound", sc, tail(bound), "Thm 5.2(1) bound (step-0 law) over the tail")
    v.add("floor_bound_drift", sc, tail(bound_drift), "drift-corrected bound over the tail")
    v.add(
        "alpha_theta",
        ("scenario", "exponent_path"),
        alpha,
        "per-path exponent (1/T) log ||dtheta^T/dtheta^0||_2",
        "1/step",
    )
    v.add("alpha_valid", ("scenario", "exponent_path"), alpha_ok, "exponent path valid")
    return v.dataset(
        coords={
            "scenario": (labels, "data-stream scenario", "1"),
            "step": (steps, "training step t", "step"),
            "exponent_path": (np.arange(cfg.n_exponent_paths), "exponent path index", "1"),
        },
        attrs={
            "theorem": "Katende (2025) Lemma 5.1, Theorem 5.2 (Assumption 1); Section 7.5",
            "assumption1_stream": noises[0].assumption1(objective).reason,
            "d_in": cfg.d_in,
            "d_out": cfg.d_out,
            "batch_size": cfg.batch_size,
            "eta": cfg.eta,
            "label_noise": cfg.label_noise,
            "mu": consts0["mu"],
            "L": consts0["L"],
            "sigma0": consts0["sigma0"],
            "sigma1": consts0["sigma1"],
            "q": q0,
            "eta_max": float(theory.sgd_step_max(consts0["mu"], consts0["L"], consts0["sigma1"])),
            "stationary_bound": float(
                theory.sgd_stationary_level(
                    cfg.eta, consts0["mu"], consts0["L"], consts0["sigma0"], consts0["sigma1"]
                )
            ),
            "alpha_bound_norm": 0.5 * np.log(q0),
            "q_after_shift": q_after,
            "mu_after_shift": after["mu"],
            "L_after_shift": after["L"],
            "sigma0_after_shift": after["sigma0"],
            "sigma1_after_shift": after["sigma1"],
            "shift_at": cfg.shift_at if cfg.covariate_shift else -1,
            "m0": m0,
            "n_paths": cfg.n_paths,
            "n_steps": cfg.n_steps,
            "n_exponent_steps": T,
            "level": cfg.level,
            "interval_level": level_sc,
            "band_z": z_band,
            "tail_start_step": int(steps[tail_start]),
            "drift_blind_tolerance": DRIFT_BLIND_TOL,
        },
    )


def _inside(s: xr.Dataset, curve: str) -> np.ndarray:
    return _mc.in_band(s[curve].values, s.tracking_lower.values, s.tracking_upper.values)


def checks(ds: xr.Dataset) -> list[Check]:
    rows = []
    reason = ds.attrs["assumption1_stream"]
    for name in ds.scenario.values:
        s = ds.sel(scenario=name)
        rate = float(s.rotation_rate)
        shift = not np.isfinite(rate)
        stationary = rate == 0
        case = str(name)
        floor = _mc.fmt_ci(s.floor, s.floor_lower, s.floor_upper)
        all_alive = bool(np.all(s.n_alive.values == s.n_alive.values[0]))
        inside = _inside(s, "tracking_exact")
        rows.append(
            Check(
                "exact recursion (mean + second moment)",
                case,
                "MC band contains the exact tracking error",
                f"{int(inside.sum())}/{inside.size} steps inside",
                bool(inside.all()) if all_alive else None,
                "derived for Gaussian inputs and a linear teacher"
                if all_alive
                else "divergence: the alive-path mean is not the expectation",
            )
        )
        ok = (s.n_alive.values >= 2) & (s.step.values > 0)
        lower = s.tracking_lower.values[ok]
        ratio = float(np.max(lower / s.tracking_bound.values[ok]))
        if stationary:
            rows.append(
                Check(
                    "Lemma 5.1 / Thm 5.2(1)",
                    case,
                    "tracking error <= q^t m_0 + eta^2 s0^2 (1-q^t)/(1-q), every t",
                    f"max_t lower-CI / bound = {ratio:.3g}",
                    bool(ratio <= 1 + 1e-12),
                    "a fixed teacher: one objective, Assumption 1 exact (sigma0, sigma1 derived)",
                )
            )
            rows.append(
                Check(
                    "Thm 5.2 stationary level",
                    case,
                    f"tail mean <= {float(s.floor_bound):.4g} (limit "
                    f"{float(ds.attrs['stationary_bound']):.4g})",
                    floor,
                    bool(float(s.floor_lower) <= float(s.floor_bound) * (1 + 1e-12)),
                    f"exact floor {float(s.floor_exact):.4g}",
                )
            )
        else:
            why = (
                "the population loss changes at the shift (inputs and label noise)"
                if shift
                else f"theta*(t) = W_t turns at {rate:g} rad/step"
            )
            rows.append(
                Check(
                    "Thm 5.2 (fixed objective)",
                    case,
                    f"floor <= {float(s.floor_bound):.4g} if the objective were fixed",
                    floor + f"; max_t lower-CI / bound = {ratio:.3g}",
                    None,
                    f"Assumption fails: {why} ({reason}); fixed-law recursion predicts "
                    f"{float(s.floor_stationary_law):.4g}, "
                    f"{float(s.floor) / float(s.floor_stationary_law):.2f}x off",
                )
            )
            lower_all = s.tracking_lower.values[ok]
            b = s.tracking_bound_drift.values[ok]
            rows.append(
                Check(
                    "Lemma 5.1 piecewise" if shift else "Lemma 5.1 + drift (Minkowski)",
                    case,
                    "every t: "
                    + (
                        "Lemma 5.1 with each law's constants (theta* fixed)"
                        if shift
                        else "sqrt b_{t+1} = sqrt(q b_t + eta^2 s0^2) + ||W_{t+1} - W_t||"
                    ),
                    f"max_t lower-CI / bound = {float(np.max(lower_all / b)):.3g}; tail bound "
                    f"{float(s.floor_bound_drift):.4g}",
                    bool(np.all(lower_all <= b * (1 + 1e-12))),
                    "a bound derived here, not the paper's"
                    + (
                        f"; q after the shift = {float(ds.attrs['q_after_shift']):.4f}"
                        + (" >= 1: vacuous there" if ds.attrs["q_after_shift"] >= 1 else "")
                        if shift
                        else ""
                    ),
                )
            )
    rot = ds.sel(scenario=[n for n in ds.scenario.values if n.startswith("rotation")])
    ok = rot.alpha_valid.values.all(axis=0)
    a = rot.alpha_theta.values[:, ok]
    spread = float(np.max(np.abs(a - a[:1]))) if a.size else np.nan
    rows.append(
        Check(
            "alpha_theta is drift-blind",
            f"rates {', '.join(f'{r:g}' for r in rot.rotation_rate.values)}",
            "the same alpha_theta at every rate (the Jacobian I - eta C_t has no W_t)",
            f"max |alpha(omega) - alpha(omega_0)| = {spread:.2e} over {int(ok.sum())} paths",
            bool(a.size and spread <= float(ds.attrs["drift_blind_tolerance"])),
            f"alpha median {np.median(a):.5f}" if a.size else "no valid path",
        )
    )
    if 0.0 in rot.rotation_rate.values:
        s = rot.sel(scenario="rotation 0")
        ok0 = s.alpha_valid.values
        a0 = s.alpha_theta.values[ok0]
        T, n = float(ds.attrs["n_exponent_steps"]), int(ds.attrs["d_in"]) + 1
        q = float(ds.attrs["q"])
        half = float(ds.attrs["alpha_bound_norm"])
        # ||dtheta^T/dtheta^0||^2 = exp(2 T alpha): Lemma 5.1 with sigma0 = 0 on the tangent,
        # E[A^2] <= q I, gives E[Pi^T Pi] <= q^T I and E||Pi||_2^2 <= E||Pi||_F^2 <= n q^T.
        est = _mc.path_mean(np.exp(2 * T * a0), np.ones(a0.size, bool), ds.attrs["level"])
        rows.append(
            Check(
                "Thm 5.2(2), mean square at T",
                "rotation 0",
                f"E||dtheta^T/dtheta^0||^2 <= (d+1) q^T = {n * q**T:.4g}",
                _mc.fmt_ci(est["mean"], est["lower"], est["upper"]) if a0.size else "no valid path",
                bool(a0.size and est["lower"] <= n * q**T),
                f"per path alpha in [{a0.min():.5f}, {a0.max():.5f}] above (1/2) log q = "
                f"{half:.5f}: the norm form is asymptotic (Jensen); at T = {T:g} it holds in "
                "mean square, with the factor d+1"
                if a0.size
                else "",
            )
        )
    return rows


def summary(ds: xr.Dataset) -> str:
    rot = ds.sel(scenario=[n for n in ds.scenario.values if n.startswith("rotation")])
    rates = rot.rotation_rate.values
    fl = rot.floor.values
    ex = rot.floor_exact.values
    lagshare = rot.floor_lag.values / ex
    slope = np.nan
    if 0.0 in rates and (rates > 0).sum() >= 2:
        excess = ex[rates > 0] - ex[rates == 0][0]
        if np.all(excess > 0):
            slope = _mc.ols_slope(np.log(rates[rates > 0]), np.log(excess))
    text = (
        f"Online SGD (eta = {ds.attrs['eta']:g}, batch {ds.attrs['batch_size']}) of a linear "
        f"student ({ds.attrs['d_in']} -> {ds.attrs['d_out']}) on a data stream, "
        f"{ds.attrs['n_paths']} paths x {ds.attrs['n_steps']} steps. **Which theorem "
        "applies:** with a fixed teacher, Theorem 5.2 does (one objective, Assumption 1 with "
        f"sigma0 = {ds.attrs['sigma0']:.3g}, sigma1 = {ds.attrs['sigma1']:.3g} derived "
        f"exactly, mu = {ds.attrs['mu']:g}, L = {ds.attrs['L']:g}, q = {ds.attrs['q']:.4f}); "
        "with a rotating teacher its assumption of a fixed objective fails (theta*(t) = W_t "
        "moves every step), and under the covariate shift the objective changes once. "
        f"Measured tracking floors: {', '.join(f'{f:.3g}' for f in fl)} at rates "
        f"{', '.join(f'{r:g}' for r in rates)} rad/step (exact recursion "
        f"{', '.join(f'{f:.3g}' for f in ex)}): the floor grows with the rate"
        + (
            f", its excess over omega = 0 like omega^{slope:.2f} (exact recursion, log-log slope)"
            if np.isfinite(slope)
            else ""
        )
        + " (the squared mean lag is "
        f"{', '.join(f'{100 * x:.0f}%' for x in lagshare)} of it). Theorem 5.2's stationary "
        f"level {ds.attrs['stationary_bound']:.3g} knows nothing of omega"
    )
    over = rates[fl > float(ds.attrs["stationary_bound"])]
    text += (
        f" and is exceeded from omega = {over.min():g} on; " if over.size else " and holds here; "
    )
    text += (
        "the drift-corrected bound sqrt b_{t+1} = sqrt(q b_t + eta^2 s0^2) + ||Delta_t|| holds "
        "at every rate. The exact second-moment recursion matches the Monte Carlo band at "
        "every saved step and scenario; the recursion with the law of step 0 held fixed does "
        "not once the teacher moves. "
    )
    if "covariate shift" in ds.scenario.values:
        s = ds.sel(scenario="covariate shift")
        text += (
            f"Covariate shift at step {ds.attrs['shift_at']}: the floor moves to "
            f"{float(s.floor):.3g} (exact {float(s.floor_exact):.3g}, the fixed-law prediction "
            f"{float(s.floor_stationary_law):.3g}); theta* does not move, so Lemma 5.1 still "
            "holds piecewise with the new law's constants. "
        )
    ok = rot.alpha_valid.values.all(axis=0)
    a = rot.alpha_theta.values[:, ok]
    if a.size:
        text += (
            f"The exponent alpha_theta (median {np.median(a):.4f}) is identical at every rate: "
            "the sensitivity to the initial parameters is blind to the drift that sets the "
            "tracking floor, so a negative exponent does not mean a small error here. "
            f"Per path it lies above Theorem 5.2(2)'s (1/2) log q = "
            f"{float(ds.attrs['alpha_bound_norm']):.4f} at T = {ds.attrs['n_exponent_steps']} "
            f"(max {a.max():.4f}): that bound is asymptotic; at a finite horizon only its "
            "mean-square form E||dtheta^T/dtheta^0||^2 <= (d+1) q^T holds (and does)."
        )
    return text


def figures(ds: xr.Dataset) -> dict:
    names = list(ds.scenario.values)
    ncol = min(3, len(names))
    nrow = -(-len(names) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    t = ds.step.values
    for ax, name in zip(axes.ravel(), names, strict=False):
        s = ds.sel(scenario=name)
        ax.fill_between(t, s.tracking_lower, s.tracking_upper, color="C0", alpha=0.3, lw=0)
        ax.plot(t, s.tracking_error, "C0", lw=1, label="MC mean")
        ax.plot(t, s.tracking_exact, "k--", lw=0.8, label="exact recursion")
        ax.plot(t, s.tracking_stationary_law, "C1:", lw=1.2, label="step-0 law held fixed")
        ax.plot(t, s.tracking_bound, "C3-.", lw=0.8, label="Thm 5.2 (fixed objective)")
        ax.plot(t, s.tracking_bound_drift, "C2-", lw=0.6, label="Lemma 5.1 + drift")
        ax.set(yscale="log", title=str(name))
        if float(ds.attrs["shift_at"]) > 0 and name == "covariate shift":
            ax.axvline(float(ds.attrs["shift_at"]), color="grey", lw=0.5)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=6)
    fig.supxlabel("step t")
    fig.supylabel("||Theta^t - W_t||^2 + ||b^t||^2")
    fig.suptitle("Tracking a drifting teacher: Monte Carlo against the exact recursion")
    fig.tight_layout()

    rot = ds.sel(scenario=[n for n in names if n.startswith("rotation")])
    fig2, ax = plt.subplots(figsize=(5.4, 3.8))
    r = rot.rotation_rate.values
    x = np.where(r > 0, r, np.nan)
    lo, hi = rot.floor - rot.floor_lower, rot.floor_upper - rot.floor
    ax.errorbar(r, rot.floor, yerr=[lo, hi], fmt="o", ms=4, label="MC tail mean")
    ax.plot(r, rot.floor_exact, "kx-", lw=0.8, label="exact recursion")
    moving = r > 0
    ax.plot(r[moving], rot.floor_lag.values[moving], "C1.--", lw=0.8, label="squared mean lag")
    ax.plot(r, rot.floor_bound_drift, "C2-", lw=0.8, label="Lemma 5.1 + drift bound")
    ax.axhline(
        float(ds.attrs["stationary_bound"]),
        color="C3",
        ls="-.",
        lw=0.8,
        label="Thm 5.2 stationary level",
    )
    ax.set(
        xscale="symlog",
        yscale="log",
        xlabel="rotation rate omega (rad/step)",
        ylabel="tracking floor",
    )
    if np.isfinite(x).any():
        ax.set_xscale("symlog", linthresh=float(np.nanmin(x)))
    lo_y = 0.3 * float(np.nanmin(rot.floor_lower))
    ax.set_ylim(lo_y, 3 * float(np.nanmax(rot.floor_bound_drift)))
    ax.legend(fontsize=7)
    ax.set_title("Tracking floor against the rotation rate")
    fig2.tight_layout()
    return {"tracking": fig, "floor": fig2}


EXPERIMENT = Experiment(
    name="outside_drift",
    config=OutsideDrift,
    run=run,
    checks=checks,
    figures=figures,
    summary=summary,
)
