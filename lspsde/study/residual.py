r"""Experiment *residual_cfl*: Lemma 4.2, Theorem 4.3 and Corollary 4.4.

Residual networks $X_{k+1} = X_k + h g_k(X_k)$ with blocks of known dissipativity $m$ and
Jacobian bound $M_g$ (``models.residual``) are swept over $h = r\,h_{\max}(m)$ for a grid of
ratios $r$ across 1 and a grid of $m$. Measured: the per-layer factor
$\max_k\|I + hG_k\|_2$ (Lemma 4.2 predicts $\le c_x(h)$) and the forward growth rate
$\alpha_x = \frac1L\log\sup_x\|\partial X_L/\partial X_0\|_2$ (Theorem 4.3 predicts
$\le \frac12\log(1 - 2hm + h^2M_g^2)$, negative for $h < h_{\max} = 2m/M_g^2$).

Kinds: ``linear_shared`` (every layer the same normal map $I + hA$: the bounds are attained, and
the measured stability boundary is exactly $h_{\max}$); ``linear`` (independent blocks: the
bound holds, the product of non-commuting layers is smaller); ``nonlinear`` (tanh blocks with
exact $m$ and a conservative $M_g$: the measured boundary lies beyond $h_{\max}$, and the ratio
says how conservative the CFL condition is).
"""

from typing import Annotated, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from pydantic import Field
from tqdm.auto import tqdm
import xarray as xr

import models

from .. import theory
from ..profile import representation_profile
from . import _plot
from ._data import Variables
from .config import Grid, NormConfig, PositiveFloat, PositiveInt, Strict
from .experiment import Check, Experiment


class ResidualCFL(Strict):
    """Lemma 4.2 / Theorem 4.3 / Corollary 4.4: sweep h across h_max and over dissipativity m."""

    m: Grid(PositiveFloat)
    M_g: PositiveFloat = 2.0
    h_over_hmax: Grid(PositiveFloat, min_length=2)
    kind: list[Literal["linear_shared", "linear", "nonlinear"]] = [
        "linear_shared",
        "linear",
        "nonlinear",
    ]
    dim: PositiveInt = 16
    depth: PositiveInt = 32
    n_probes: PositiveInt = 8
    nonlinear_fraction: Annotated[float, Field(ge=0, le=1)] = 0.5
    norm: NormConfig = NormConfig()


def _profile_at(norm, net, probes, h):
    net_h = eqx.tree_at(lambda n: n.step_size, net, h)
    prof = representation_profile(
        net_h, probes, method=norm.method, max_steps=norm.max_steps, rtol=norm.rtol
    )
    return prof.cumulative[:, -1].max(), prof.sigma_x.max(), prof.converged


@eqx.filter_jit
def _measure(norm, net, probes, hs):
    return jax.vmap(lambda h: _profile_at(norm, net, probes, h))(hs)


@eqx.filter_jit
def _boundary(norm, net, probes, h_max, lower, upper):
    r"""Root of the measured $\alpha_x(r\,h_{\max})$ in the ratio $r \in$ [lower, upper]."""

    def alpha(r, _):
        jac, _, _ = _profile_at(norm, net, probes, r * h_max)
        return jnp.log(jac) / net.depth

    sol = optx.root_find(
        alpha,
        optx.Bisection(rtol=1e-7, atol=1e-7),
        0.5 * (lower + upper),
        options={"lower": lower, "upper": upper},
        throw=False,
    )
    return sol.value, sol.result == optx.RESULTS.successful


def critical_ratio(norm, net, probes, h_max, ratios: np.ndarray, alpha: np.ndarray) -> float:
    """The smallest $h/h_{\\max}$ at which the measured $\alpha_x$ reaches 0.

    The grid brackets the first sign change; bisection (optimistix) on the measured exponent
    then locates it to ~1e-7. ``inf`` if $\alpha_x < 0$ over the whole grid, the first ratio if
    it is already non-negative there, ``nan`` if the bisection failed.
    """
    nonneg = np.flatnonzero(alpha >= 0)
    if nonneg.size == 0:
        return np.inf
    i = nonneg[0]
    if i == 0:
        return float(ratios[0])
    root, ok = _boundary(norm, net, probes, h_max, float(ratios[i - 1]), float(ratios[i]))
    return float(root) if bool(ok) else np.nan


def run(cfg: ResidualCFL, key, progress: bool) -> xr.Dataset:
    kinds, ms, ratios = cfg.kind, np.asarray(cfg.m), np.asarray(cfg.h_over_hmax)
    shape = (len(kinds), len(ms), len(ratios))
    jac = np.zeros(shape)
    layer = np.zeros(shape)
    converged = np.zeros(shape, dtype=bool)
    m_used = np.zeros(shape[:2])
    crit = np.zeros(shape[:2])
    Mg_used = np.zeros(shape[:2])
    probe_key, net_key = jax.random.split(key)
    probes = jax.random.normal(probe_key, (cfg.n_probes, cfg.dim))
    grid = [(a, b) for a in range(len(kinds)) for b in range(len(ms))]
    for a, b in tqdm(grid, disable=not progress, desc="residual_cfl"):
        kind = kinds[a]
        extra = {"nonlinear_fraction": cfg.nonlinear_fraction} if kind == "nonlinear" else {}
        net = models.residual_network(
            jax.random.fold_in(net_key, b),
            cfg.dim,
            cfg.depth,
            1.0,
            float(ms[b]),
            cfg.M_g,
            kind="nonlinear" if kind == "nonlinear" else "linear",
            shared=kind == "linear_shared",
            **extra,
        )
        m, M_g = (float(c) for c in models.residual_network_constants(net))
        m_used[a, b], Mg_used[a, b] = m, M_g
        h_max_ab = float(theory.residual_step_max(m, M_g))
        cum, sig, ok = _measure(cfg.norm, net, probes, jnp.asarray(ratios * h_max_ab))
        jac[a, b], layer[a, b], converged[a, b] = np.asarray(cum), np.asarray(sig), np.asarray(ok)
        with np.errstate(divide="ignore"):
            alpha_ab = np.log(jac[a, b]) / cfg.depth
        crit[a, b] = critical_ratio(cfg.norm, net, probes, h_max_ab, ratios, alpha_ab)

    h_max = 2 * m_used / Mg_used**2
    h = ratios[None, None, :] * h_max[..., None]
    c_x = np.asarray(theory.residual_contraction(h, m_used[..., None], Mg_used[..., None]))
    diverged = ~np.isfinite(jac)
    with np.errstate(divide="ignore"):
        alpha = np.where(diverged, np.inf, np.log(np.where(diverged, 1.0, jac)) / cfg.depth)
    bound = np.log(c_x)  # = 0.5 log(1 - 2hm + h^2 M_g^2), Theorem 4.3
    tol = 10 * cfg.norm.rtol
    dims, km = ("kind", "m", "h_ratio"), ("kind", "m")
    v = Variables()
    v.add("h", dims, h, "residual step h = (h/h_max) h_max")
    v.add("h_max", km, h_max, "CFL step h_max = 2m/M_g^2 (eq. 4.3)")
    v.add("M_g", km, Mg_used, "Jacobian bound M_g of the blocks")
    v.add("jacobian_norm", dims, jac, "sup over probes x of ||dX_L/dX_0||_2")
    v.add("alpha_x", dims, alpha, "growth rate (1/L) log sup_x ||dX_L/dX_0||_2", "1/layer")
    v.add("alpha_x_bound", dims, bound, "bound 0.5 log(1-2hm+h^2 M_g^2) (Thm 4.3)", "1/layer")
    v.add("layer_factor", dims, layer, "max_k sup_x ||I + h G_k||_2")
    v.add("layer_bound", dims, c_x, "bound c_x(h) on the layer factor (Lemma 4.2)")
    v.add("holds_lemma", dims, layer <= c_x * (1 + tol), "Lemma 4.2 holds (within tolerance)")
    v.add("holds_theorem", dims, alpha <= bound + tol, "Thm 4.3 holds (within tolerance)")
    v.add("tightness", dims, alpha - bound, "measured - predicted exponent", "1/layer")
    v.add("critical_ratio", km, crit, "measured h*/h_max where alpha_x reaches 0 (inf: none)")
    v.add("diverged", dims, diverged, "the Jacobian norm is not finite")
    v.add("converged", dims, converged, "every matrix-free norm met its tolerance")
    return v.dataset(
        coords={
            "kind": (list(kinds), "kind of residual block", "1"),
            "m": (ms, "dissipativity m of the blocks", "1"),
            "h_ratio": (ratios, "step ratio h / h_max", "1"),
        },
        attrs={
            "theorem": "Katende (2025) Lemma 4.2, Theorem 4.3, Corollary 4.4",
            "depth": cfg.depth,
            "dim": cfg.dim,
            "tolerance": tol,
        },
    )


def _boundary_text(crit: float, grid_max: float) -> str:
    if np.isinf(crit):
        return f"h* > {grid_max:g} h_max (beyond the grid)"
    if np.isnan(crit):
        return "not located (bisection failed)"
    return f"h* = {crit:.3f} h_max"


def checks(ds: xr.Dataset) -> list[Check]:
    rows = []
    grid_max = float(ds.h_ratio.max())
    for kind in ds.kind.values:
        for m in ds.m.values:
            for r in ds.h_ratio.values:
                s = ds.sel(kind=kind, m=m, h_ratio=r)
                case = f"{kind}, m={m:g}, h={r:g} h_max"
                if bool(s.diverged):
                    rows.append(
                        Check(
                            "Lemma 4.2 / Thm 4.3",
                            case,
                            "-",
                            "diverged",
                            None,
                            "non-finite Jacobian: no test",
                        )
                    )
                    continue
                note = "h >= h_max: bound > 0" if r >= 1 else ""
                if abs(float(s.tightness)) < 1e-6:
                    note = (note + "; " if note else "") + "attained"
                rows.append(
                    Check(
                        "Lemma 4.2 / Thm 4.3",
                        case,
                        f"alpha_x <= {float(s.alpha_x_bound):.4f}; "
                        f"max_k ||I + h G_k|| <= c_x = {float(s.layer_bound):.4f}",
                        f"alpha_x = {float(s.alpha_x):.4f}; {float(s.layer_factor):.4f}",
                        bool(s.holds_theorem) and bool(s.holds_lemma),
                        note,
                    )
                )
            crit = float(ds.critical_ratio.sel(kind=kind, m=m))
            # beyond the grid proves h* >= h_max only when the grid reaches h_max
            holds = (
                None if np.isnan(crit) or (np.isinf(crit) and grid_max < 1) else crit >= 1 - 1e-5
            )
            rows.append(
                Check(
                    "Cor 4.4",
                    f"{kind}, m={m:g}: stability boundary",
                    "h* >= h_max",
                    _boundary_text(crit, grid_max),
                    None if holds is None else bool(holds),
                    "tight" if abs(crit - 1) < 1e-5 else "",
                )
            )
    return rows


def _boundaries(c: np.ndarray, ms: np.ndarray, grid_max: float) -> str:
    """The measured boundaries of one kind: the range of those located, and how many lie
    beyond the grid (no sign change of alpha_x up to its last h) or were not located."""
    n = c.size
    finite, beyond, lost = np.isfinite(c), np.isinf(c), np.isnan(c)
    parts = []
    if finite.any():
        lo, hi = c[finite].min(), c[finite].max()
        rng = f"{lo:.3f}" if np.isclose(lo, hi, atol=5e-4) else f"{lo:.3f}–{hi:.3f}"
        parts.append(f"h*/h_max = {rng} for {int(finite.sum())} of {n} values of m")
    if beyond.any():
        which = ", ".join(f"{x:g}" for x in ms[beyond])
        parts.append(
            f"beyond the grid (h* > {grid_max:g} h_max) for {int(beyond.sum())} of {n} "
            f"(m = {which})"
        )
    if lost.any():
        parts.append(f"not located for {int(lost.sum())} of {n}")
    return "; ".join(parts)


def summary(ds: xr.Dataset) -> str:
    held = int((ds.holds_theorem & ds.holds_lemma & ~ds.diverged).sum())
    n = int((~ds.diverged).sum())
    n_div = int(ds.diverged.sum())
    grid_max = float(ds.h_ratio.max())
    any_beyond = bool(np.isinf(ds.critical_ratio.values).any())
    parts = []
    for kind in ds.kind.values:
        c = ds.critical_ratio.sel(kind=kind).values
        parts.append(f"`{kind}`: {_boundaries(c, ds.m.values, grid_max)}")
    return (
        f"Lemma 4.2 and Theorem 4.3 hold in {held} of {n} finite cases (one `Lemma 4.2 / Thm "
        f"4.3` row each below; a case holds when both measured values are within the tolerance "
        f"{float(ds.attrs['tolerance']):.0e} of their bounds"
        + (f"; {n_div} cases with a non-finite Jacobian are not tested" if n_div else "")
        + f"), depth {ds.attrs['depth']}, width {ds.attrs['dim']}. Measured stability boundary "
        "h* (where alpha_x reaches 0) relative to the CFL step h_max = 2m/M_g^2 (one `Cor 4.4` "
        "row per kind and m): "
        + "; ".join(parts)
        + ". A ratio of 1 means Corollary 4.4 is sharp; above 1, it is conservative by that "
        "factor" + ("; beyond the grid, by more than the grid shows." if any_beyond else ".")
    )


def figures(ds: xr.Dataset) -> dict:
    kinds = [str(k) for k in ds.kind.values]
    nk = len(kinds)
    fig, axes = _plot.panels(nk, size=(4.2, 3.6), sharey=True)
    finite_alpha = np.where(np.isfinite(ds.alpha_x), ds.alpha_x, np.nan)
    vmax = float(np.nanmax(np.abs(finite_alpha))) if np.isfinite(finite_alpha).any() else 1.0
    grid_max = float(ds.h_ratio.max())
    for ax, kind in zip(axes[0], kinds, strict=True):
        s = ds.sel(kind=kind)
        hh = s.h.values.ravel()
        mm = np.repeat(s.m.values, s.sizes["h_ratio"])
        sc = ax.scatter(hh, mm, c=s.alpha_x.values.ravel(), cmap="coolwarm", vmin=-vmax, vmax=vmax)
        div = s.diverged.values.ravel()
        if div.any():
            ax.scatter(hh[div], mm[div], marker="x", color="k", label="diverged")
        mgrid = np.linspace(0, float(s.m.max()) * 1.05, 100)
        ax.plot(2 * mgrid / float(s.M_g.max()) ** 2, mgrid, "k-", label=r"$h_{\max} = 2m/M_g^2$")
        crit = s.critical_ratio.values * s.h_max.values
        ok = np.isfinite(crit)
        ax.plot(crit[ok], s.m.values[ok], "g--o", ms=3, label=r"measured $h^*$")
        beyond = np.isinf(s.critical_ratio.values)
        if beyond.any():
            edge = grid_max * s.h_max.values[beyond]
            ax.plot(
                edge, s.m.values[beyond], "g>", ms=6, label=rf"$h^* > {grid_max:g}\,h_{{\max}}$"
            )
        ax.set(title=kind, xlabel=r"step $h$")
        ax.legend(fontsize=7, loc="lower right")
    axes[0, 0].set_ylabel(r"dissipativity $m$")
    fig.colorbar(sc, ax=axes[0].tolist(), label=r"measured $\alpha_x$ (per layer)")
    fig.suptitle(r"Corollary 4.4: residual CFL phase diagram, stable where $h < h_{\max}$")

    fig2, axes2 = _plot.panels(nk, size=(4.2, 3.4), sharey=True)
    for ax, kind in zip(axes2[0], kinds, strict=True):
        s = ds.sel(kind=kind)
        for m in s.m.values:
            a = s.alpha_x.sel(m=m).values
            line = ax.plot(s.h_ratio, np.where(np.isfinite(a), a, np.nan), "o", ms=3,
                           label=f"m = {m:g}")  # fmt: skip
            ax.plot(s.h_ratio, s.alpha_x_bound.sel(m=m), "-", color=line[0].get_color(), lw=1)
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(1, color="k", lw=0.5, ls=":")
        ax.set(title=kind, xlabel=r"$h/h_{\max}$")
        ax.legend(fontsize=7)
    axes2[0, 0].set_ylabel(r"$\alpha_x$ (dots), bound $\log c_x(h)$ (lines)")
    fig2.suptitle(
        r"Theorem 4.3: $\alpha_x \leq \frac{1}{2}\log(1 - 2hm + h^2M_g^2)$ across $h_{\max}$"
    )
    return {"phase_diagram": fig, "alpha_vs_h": fig2}


EXPERIMENT = Experiment(
    name="residual_cfl",
    config=ResidualCFL,
    run=run,
    checks=checks,
    figures=figures,
    summary=summary,
)
