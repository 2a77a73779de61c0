r"""Experiment *mean_field_depth*: the typical case beside Theorem 4.1's worst case.

Theorem 4.1 bounds the forward Jacobian of a depth-$L$ network by $\rho^L$,
$\rho = \max_k\|W_k\|_2$: a worst case over inputs and directions. A wide random network at
initialisation ($W_{k,ij} \sim N(0, \sigma_w^2/n)$, $b_{k,i} \sim N(0, \sigma_b^2)$) has a
*typical* rate instead: by the mean-field recursion (Poole et al. 2016, Schoenholz et al. 2017;
``lspsde.theory.mean_field``) a random direction $v$ grows per layer by $\chi_1$ in mean square,
so $\frac1L\log\|J v\|/\|v\| \to \frac12\log\chi_1$ as the width grows, and $\chi_1 = 1$ is the
edge between order ($\chi_1 < 1$) and chaos.

For every activation and $\sigma_w^2$ of the grid, ``n_networks`` networks of width $n$ and
depth $L$ are drawn (one standard-normal draw per network, scaled by $\sigma_w$, so every
$\sigma_w^2$ sees the same matrices: common random numbers), with probes at the mean-field
whose first pre-activations have the mean-field variance $q^*$ ($\mathbb{E}x_i^2 = (q^* -
\sigma_b^2)/\sigma_w^2$; $1$ where $q^*$ is infinite), so that every layer is at the fixed point
and there is no transient. Measured, per network and probe:

- the typical exponent $\frac1L\log\|J v\|$ for a random unit $v$;
- the worst-case exponent $\frac1L\log\|J\|_2$ (matrix-free Lanczos);
- Theorem 4.1's bound $\log\max_k\|W_k\|_2$ (about $\log(2\sigma_w)$ for square Gaussian layers).

Checks: the bound holds; the typical exponent matches $\frac12\log\chi_1 + \delta_n$ within
4 standard errors (over networks) plus $|\delta_n|$, $\delta_n = -(3\mathbb{E}a^2/
(\mathbb{E}a)^2 - 1)/(4n)$ the first-order finite-width shift ($a = \phi'(h)^2$,
$h \sim N(0, q^*)$; ``_finite_width``).
"""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

import models

from .. import linalg
from ..mean_field import _activation, _midpoint, mean_field
from ._data import Variables
from .config import Grid, NormConfig, PositiveFloat, PositiveInt, Strict
from .experiment import Check, Experiment


class MeanFieldDepth(Strict):
    """Typical (mean-field) against worst-case (Thm 4.1) depth exponents of random networks."""

    sigma_w2: Grid(PositiveFloat)
    activation: list[Literal["relu", "tanh"]] = ["tanh", "relu"]
    sigma_b2: float = 0.05
    width: PositiveInt = 256
    depth: PositiveInt = 32
    n_networks: PositiveInt = 4
    n_probes: PositiveInt = 8
    norm: NormConfig = NormConfig(rtol=1e-6)


_THM = "Thm 4.1"
_MF = "mean field"


def _finite_width(activation: str, q: float, width: int) -> float:
    r"""The first-order finite-width shift of the typical exponent.

    One layer multiplies $\|u\|^2$ by $X = \frac{\sigma_w^2}{n}\sum_i a_i z_i^2$,
    $a_i = \phi'(h_i)^2$, $z_i \sim N(0, 1)$, so $\mathrm{Var}X/(\mathbb{E}X)^2 =
    (3\mathbb{E}a^2/(\mathbb{E}a)^2 - 1)/n$ and $\mathbb{E}\frac12\log X \approx
    \frac12\log\chi_1 - \mathrm{Var}X/(4(\mathbb{E}X)^2)$: the shift is
    $-(3\mathbb{E}a^2/(\mathbb{E}a)^2 - 1)/(4n)$ ($-5/(4n)$ for ReLU), with $h \sim N(0, q)$
    (midpoint quadrature, as ``mean_field``)."""
    z, w = _midpoint(4000)
    a = jax.vmap(jax.grad(_activation(activation)))(jnp.sqrt(q) * z) ** 2
    m1, m2 = float(w @ a), float(w @ a**2)
    return -(3 * m2 / m1**2 - 1) / (4 * width)


@eqx.filter_jit
def _measure(norm, flow, probes, directions, sigma_w):
    """Per probe: (typical, worst-case) exponents, and log max_k ||W_k||, of ``flow`` with its
    weights scaled by ``sigma_w``."""
    scaled = eqx.tree_at(lambda f: f.weights, flow, tuple(sigma_w * w for w in flow.weights))
    L = len(flow.weights)

    def one(x, v):
        _, jv = jax.jvp(scaled, (x,), (v,))
        res = linalg.jacobian_norm(
            scaled, x, method="lanczos", max_steps=norm.max_steps, rtol=norm.rtol
        )
        return jnp.log(jnp.linalg.norm(jv)) / L, jnp.log(res.value) / L, res.converged

    typical, worst, ok = jax.vmap(one)(probes, directions)
    top = jnp.max(jnp.stack([jnp.linalg.norm(w, 2) for w in scaled.weights]))
    return typical, worst, ok, jnp.log(top)


def run(cfg: MeanFieldDepth, key, progress: bool) -> xr.Dataset:
    acts, s2 = cfg.activation, np.asarray(cfg.sigma_w2, dtype=float)
    n, L, N, P = cfg.width, cfg.depth, cfg.n_networks, cfg.n_probes
    shape = (len(acts), len(s2), N, P)
    typical, worst = np.zeros(shape), np.zeros(shape)
    converged = np.zeros(shape, dtype=bool)
    bound = np.zeros(shape[:3])
    q_star, chi1, q_in = (np.zeros(shape[:2]) for _ in range(3))
    net_key, probe_key, dir_key = jax.random.split(key, 3)
    xi = jax.random.normal(probe_key, (N, P, n))
    v = jax.random.normal(dir_key, (N, P, n))
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    for a, act in enumerate(acts):
        nets = [
            models.mlp(
                jax.random.fold_in(net_key, s),
                [n] * (L + 1),
                activation=act,
                init="gaussian",
                sigma_w=1.0,
                bias_std=float(np.sqrt(cfg.sigma_b2)),
            )
            for s in range(N)
        ]
        for j, sw2 in enumerate(s2):
            mf = mean_field(act, float(sw2), cfg.sigma_b2)
            chi1[a, j] = mf.chi1
            at_fixed_point = np.isfinite(mf.q_star) and mf.q_star > cfg.sigma_b2
            q_star[a, j] = mf.q_star if at_fixed_point else np.nan
            # inputs whose first pre-activations have variance q*: E x_i^2 = (q* - s_b^2)/s_w^2
            q_in[a, j] = (mf.q_star - cfg.sigma_b2) / sw2 if at_fixed_point else 1.0
            for s, net in enumerate(nets):
                t, w, ok, top = _measure(
                    cfg.norm, net, np.sqrt(q_in[a, j]) * xi[s], v[s], float(np.sqrt(sw2))
                )
                typical[a, j, s], worst[a, j, s] = np.asarray(t), np.asarray(w)
                converged[a, j, s], bound[a, j, s] = np.asarray(ok), float(top)

    draws = ("activation", "sigma_w2", "network", "probe")
    # Probes of one network share its weights: the standard error is over networks (each the
    # mean over its probes), not over network x probe pairs.
    per_net = typical.mean(-1)
    t_mean = per_net.mean(-1)
    t_sem = per_net.std(-1, ddof=1) / np.sqrt(N)
    predicted = 0.5 * np.log(chi1)
    correction = np.asarray(
        [
            [_finite_width(act, q if np.isfinite(q) else 1.0, n) for q in q_star[a]]
            for a, act in enumerate(acts)
        ]
    )
    band = np.abs(correction)
    v = Variables()
    v.add(
        "typical_exponent",
        draws,
        typical,
        "typical exponent (1/L) log ||J v|| (random unit v)",
        "1/layer",
    )
    v.add("worst_exponent", draws, worst, "worst-case exponent (1/L) log ||J||_2", "1/layer")
    v.add("bound_exponent", draws[:3], bound, "Thm 4.1 bound log max_k ||W_k||_2", "1/layer")
    v.add(
        "typical_mean",
        draws[:2],
        t_mean,
        "mean typical exponent over networks and probes",
        "1/layer",
    )
    v.add("typical_sem", draws[:2], t_sem, "standard error of the mean typical exponent", "1/layer")
    v.add(
        "mean_field_exponent",
        draws[:2],
        predicted,
        "mean-field depth exponent (1/2) log chi1",
        "1/layer",
    )
    v.add(
        "finite_width_shift",
        draws[:2],
        correction,
        "first-order finite-width shift delta_n of the typical exponent",
        "1/layer",
    )
    v.add("chi1", draws[:2], chi1, "mean-field chi1 (mean squared singular value per layer)")
    v.add(
        "q_star",
        draws[:2],
        q_star,
        "mean-field fixed point q* of the pre-activation variance (NaN: none, q grows)",
    )
    v.add("q_in", draws[:2], q_in, "per-coordinate second moment of the probes")
    v.add(
        "holds",
        draws[:3],
        (worst <= bound[..., None] + 1e-9).all(-1),
        "Thm 4.1 bound holds at every probe",
    )
    mf_ok = np.abs(t_mean - (predicted + correction)) <= 4 * t_sem + band
    v.add(
        "mean_field_agrees",
        draws[:2],
        mf_ok,
        "typical exponent within 4 SE + |delta_n| of (1/2) log chi1 + delta_n",
    )
    v.add("converged", draws, converged, "the Lanczos estimate met its tolerance")
    return v.dataset(
        coords={
            "activation": (list(acts), "activation function", "1"),
            "sigma_w2": (s2, "weight variance sigma_w^2 (W_ij ~ N(0, sigma_w^2 / n))", "1"),
            "network": (np.arange(N), "random network index", "1"),
            "probe": (np.arange(P), "probe input index", "1"),
        },
        attrs={
            "theorem": "Katende (2025) Theorem 4.1; Poole et al. (2016), Schoenholz et al. (2017)",
            "width": n,
            "depth": L,
            "sigma_b2": cfg.sigma_b2,
        },
    )


def checks(ds: xr.Dataset) -> list[Check]:
    rows = []
    for act in ds.activation.values:
        for s2 in ds.sigma_w2.values:
            sel = ds.sel(activation=act, sigma_w2=s2)
            case = f"{act}, sigma_w^2={s2:g}, n={ds.attrs['width']}, L={ds.attrs['depth']}"
            typical = float(sel.typical_mean)
            gap = float(sel.bound_exponent.mean()) - typical
            rows.append(
                Check(
                    _THM,
                    case,
                    f"(1/L) log||J|| <= {float(sel.bound_exponent.min()):.4f}",
                    f"{float(sel.worst_exponent.max()):.4f} (max)",
                    bool(sel.holds.all()),
                    f"typical {typical:.4f}: the bound is {gap:.3f}/layer above it",
                )
            )
            pred = float(sel.mean_field_exponent) + float(sel.finite_width_shift)
            rows.append(
                Check(
                    _MF,
                    case,
                    f"(1/2) log chi1 + delta_n = {pred:.4f} "
                    f"(+-{abs(float(sel.finite_width_shift)):.4f})",
                    f"{typical:.4f} +- {2 * float(sel.typical_sem):.4f}",
                    bool(sel.mean_field_agrees),
                    "edge of chaos" if abs(float(sel.chi1) - 1) < 0.05 else "",
                )
            )
    return rows


def summary(ds: xr.Dataset) -> str:
    held = int(ds.holds.sum())
    agree = int(ds.mean_field_agrees.sum())
    gap = float((ds.bound_exponent.mean("network") - ds.typical_mean).mean())
    return (
        f"Random Gaussian networks of width {ds.attrs['width']} and depth {ds.attrs['depth']}: "
        f"Theorem 4.1's bound holds for {held} of {ds.holds.size} networks, and the measured "
        f"typical exponent agrees with the mean-field (1/2) log chi1 in {agree} of "
        f"{ds.mean_field_agrees.size} (activation, sigma_w^2) cases. On average the worst-case "
        f"bound lies {gap:.3f} per layer above the typical rate: at the edge of chaos "
        "(chi1 = 1) a random direction neither grows nor shrinks, while rho^L still grows like "
        "(2 sigma_w)^L."
    )


def figures(ds: xr.Dataset) -> dict:
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    acts = ds.activation.values
    fig, axes = plt.subplots(
        1, len(acts), figsize=(5.2 * len(acts), 4.2), squeeze=False, layout="constrained"
    )
    s2 = ds.sigma_w2.values
    for ax, act in zip(axes[0], acts, strict=True):
        sel = ds.sel(activation=act)
        fine = np.geomspace(s2.min(), s2.max(), 60)
        with jax.enable_x64(True):  # figures may be redrawn outside a run (lspsde report)
            chi = np.asarray([mean_field(act, float(x), ds.attrs["sigma_b2"]).chi1 for x in fine])
        ax.plot(fine, 0.5 * np.log(chi), "k-", lw=1.2, label="mean field ½ log χ1")
        ax.errorbar(
            s2,
            sel.typical_mean,
            yerr=2 * sel.typical_sem,
            fmt="o",
            ms=4,
            capsize=2,
            label="typical (1/L) log‖Jv‖ (± 2 SE)",
        )
        ax.plot(
            s2,
            sel.worst_exponent.mean(("network", "probe")),
            "s-",
            ms=4,
            label="worst case (1/L) log‖J‖₂",
        )
        ax.plot(
            s2, sel.bound_exponent.mean("network"), "^--", ms=4, label="Thm 4.1 bound log max‖W_k‖₂"
        )
        crossing = np.flatnonzero(np.diff(np.sign(np.log(chi))))
        if crossing.size:  # the edge of chaos, chi1 = 1
            ax.axvline(fine[crossing[0]], color="grey", ls=":", lw=1, label="edge of chaos χ1 = 1")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(s2))
        ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="σ_w²", ylabel="exponent per layer", title=act)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"Typical (mean field) against worst case (Theorem 4.1): width {ds.attrs['width']}, "
        f"depth {ds.attrs['depth']}"
    )
    return {"typical_vs_worst": fig}


EXPERIMENT = Experiment(
    name="mean_field_depth",
    config=MeanFieldDepth,
    run=run,
    checks=checks,
    figures=figures,
    summary=summary,
)
