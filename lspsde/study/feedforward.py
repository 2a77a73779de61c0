r"""Experiment *feedforward_spectral*: Theorem 4.1 on a grid of $\rho$, depth and activation.

For each activation and depth $L$ a network with weights $W_k = \rho\,Q_k$ ($Q_k$ orthogonal,
so $\|W_k\|_2 = \rho$ exactly) is built, and for every $\rho$ of the grid the forward Jacobian
$\|JF_\theta(x)\|_2$ is measured (matrix-free) at the probes, including $x = 0$. Prediction:
$\sup_x\|JF_\theta(x)\|_2 \le \rho^L$ and $\alpha_x = \frac1L\log\|JF\| \le \log\rho$. With the
identity activation, and with tanh at $x = 0$, every $D_k = I$ and the bound is attained.
"""

from typing import Annotated, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from pydantic import Field
from tqdm.auto import tqdm
import xarray as xr

import models

from .. import theory
from ..exponents import sup_exponent
from ..profile import representation_profile
from ._data import Variables
from .config import Grid, NormConfig, PositiveFloat, PositiveInt, Strict
from .experiment import Check, Experiment


class FeedforwardSpectral(Strict):
    """Theorem 4.1: measured forward exponent against log(rho) over a grid of rho and depth."""

    rho: Grid(PositiveFloat)
    depth: Grid(PositiveInt)
    activation: list[Literal["relu", "tanh", "identity", "leaky_relu", "hard_tanh"]] = [
        "identity",
        "relu",
        "tanh",
    ]
    width: PositiveInt = 32
    n_probes: Annotated[int, Field(ge=2)] = 16
    init: Literal["orthogonal", "spectral"] = "orthogonal"
    norm: NormConfig = NormConfig()


_THM = "Thm 4.1"


@eqx.filter_jit
def _measure(norm, flow, probes, rhos):
    def one(rho):
        scaled = eqx.tree_at(lambda f: f.weights, flow, tuple(rho * w for w in flow.weights))
        prof = representation_profile(
            scaled, probes, method=norm.method, max_steps=norm.max_steps, rtol=norm.rtol
        )
        return prof.cumulative.max(axis=0), prof.sigma_x.max(axis=0), prof.converged

    return jax.vmap(one)(rhos)


def run(cfg: FeedforwardSpectral, key, progress: bool) -> xr.Dataset:
    acts, depths, rhos = cfg.activation, cfg.depth, jnp.asarray(cfg.rho)
    shape = (len(acts), len(rhos), len(depths))
    jac = np.zeros(shape)
    alpha_sup = np.zeros(shape)
    max_sigma = np.zeros(shape)
    converged = np.zeros(shape, dtype=bool)
    probe_key, net_key = jax.random.split(key)
    probes = jax.random.normal(probe_key, (cfg.n_probes - 1, cfg.width))
    probes = jnp.concatenate([jnp.zeros((1, cfg.width)), probes])  # x = 0 is a probe
    grid = [(a, d) for a in range(len(acts)) for d in range(len(depths))]
    for a, d in tqdm(grid, disable=not progress, desc="feedforward_spectral"):
        L = depths[d]
        flow = models.mlp(
            jax.random.fold_in(net_key, L),
            [cfg.width] * (L + 1),
            activation=acts[a],
            init=cfg.init,
            rho=1.0,
        )
        cum, sig, ok = _measure(cfg.norm, flow, probes, rhos)
        jac[a, :, d] = np.asarray(cum[:, -1])
        alpha_sup[a, :, d] = np.asarray(sup_exponent(cum))
        max_sigma[a, :, d] = np.asarray(sig.max(axis=1))
        converged[a, :, d] = np.asarray(ok)

    depth_arr = np.asarray(depths, dtype=float)
    rho_arr = np.asarray(cfg.rho)
    bound = np.asarray(theory.feedforward_jacobian_bound(rho_arr[:, None], depth_arr[None, :]))
    finite = np.isfinite(jac) & (jac > 0)
    alpha = np.where(finite, np.log(np.where(finite, jac, 1.0)) / depth_arr[None, None, :], -np.inf)
    dims = ("activation", "rho", "depth")
    tol = 10 * cfg.norm.rtol
    v = Variables()
    v.add("jacobian_norm", dims, jac, "sup over probes x of ||J F_theta(x)||_2")
    v.add("jacobian_bound", ("rho", "depth"), bound, "predicted bound rho^L (Thm 4.1)")
    v.add("alpha_x", dims, alpha, "growth rate (1/L) log sup_x ||J F_theta(x)||_2", "1/layer")
    v.add("alpha_x_bound", ("rho",), np.log(rho_arr), "bound log rho (Thm 4.1)", "1/layer")
    sup_name = "paper's exponent (1/L) log sup_{0<=k<=L} ||dX_k/dX_0||_2"
    v.add("alpha_x_sup", dims, alpha_sup, sup_name, "1/layer")
    v.add("max_layer_sigma", dims, max_sigma, "max over layers k of sigma^x_k (<= rho)")
    v.add("tightness", dims, jac / bound, "measured / predicted Jacobian norm")
    v.add("holds", dims, jac <= bound * (1 + tol), "Thm 4.1 bound holds (within tolerance)")
    v.add("hypothesis", ("rho",), rho_arr < 1, "rho < 1 (the hypothesis of Thm 4.1)")
    v.add("converged", dims, converged, "every matrix-free norm met its tolerance")
    return v.dataset(
        coords={
            "activation": (list(acts), "activation function", "1"),
            "rho": (rho_arr, "spectral norm rho = ||W_k||_2 of every weight matrix", "1"),
            "depth": (np.asarray(depths), "depth L (number of layers)", "layer"),
        },
        attrs={
            "theorem": "Katende (2025) Theorem 4.1",
            "width": cfg.width,
            "init": cfg.init,
            "norm_method": cfg.norm.method,
            "tolerance": tol,
        },
    )


def checks(ds: xr.Dataset) -> list[Check]:
    rows = []
    L = int(ds.depth.max())
    for act in ds.activation.values:
        for rho in ds.rho.values:
            sel = ds.sel(activation=act, rho=rho, depth=L)
            note = "" if bool(sel.hypothesis) else "rho >= 1: outside the theorem"
            if float(sel.tightness) > 1 - 1e-6:
                note = (note + "; " if note else "") + "bound attained"
            rows.append(
                Check(
                    _THM,
                    f"{act}, rho={rho:g}, L={L}",
                    f"alpha_x <= {float(sel.alpha_x_bound):.4f}",
                    f"{float(sel.alpha_x):.4f}",
                    bool(sel.holds),
                    note,
                )
            )
    return rows


def summary(ds: xr.Dataset) -> str:
    n = int(ds.holds.size)
    held = int(ds.holds.sum())
    tight = float(ds.tightness.max())
    where = ds.tightness.argmax(...)
    case = {k: ds[k].values[v.item()] for k, v in where.items()}
    sup_neg = bool((ds.alpha_x_sup < 0).any())
    return (
        f"Theorem 4.1 (`sup_x ||JF|| <= rho^L`, `alpha_x <= log rho`) holds in {held} of {n} "
        f"cases (widths {ds.attrs['width']}, `{ds.attrs['init']}` weights with "
        f"`||W_k|| = rho`). Largest measured/predicted ratio {tight:.6f} at "
        f"{', '.join(f'{k}={v}' for k, v in case.items())}: "
        + ("the bound is attained." if tight > 1 - 1e-6 else "the bound is not attained.")
        + " The paper's literal exponent (sup over 0 <= k <= L, which includes k = 0 with norm 1)"
        + (
            " is negative somewhere."
            if sup_neg
            else " is never negative (alpha_x_sup >= 0): the "
            "theorem's alpha_x <= log rho < 0 holds for the growth rate (1/L) log ||JF||, which "
            "is what its proof bounds; see lspsde.exponents."
        )
    )


def figures(ds: xr.Dataset) -> dict:
    fig, axes = plt.subplots(1, ds.sizes["activation"], figsize=(4 * ds.sizes["activation"], 3.6))
    axes = np.atleast_1d(axes)
    lo = float(np.log(ds.rho.min())) - 0.1
    hi = float(np.log(ds.rho.max())) + 0.1
    for ax, act in zip(axes, ds.activation.values, strict=True):
        for L in ds.depth.values:
            a = ds.alpha_x.sel(activation=act, depth=L)
            ax.plot(np.log(ds.rho), a, "o-", ms=4, label=f"L={L}")
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="bound log rho")
        ax.axvline(0, color="grey", lw=0.5)
        ax.set(title=act, xlabel="log rho", ylabel="measured alpha_x")
        ax.legend(fontsize=7)
    fig.suptitle("Theorem 4.1: forward exponent against log rho")
    fig2, ax = plt.subplots(figsize=(5, 3.6))
    for act in ds.activation.values:
        ax.plot(ds.rho, ds.tightness.sel(activation=act).max("depth"), "o-", label=act)
    ax.set(xlabel="rho", ylabel="max over depth of ||JF|| / rho^L", ylim=(0, 1.05))
    ax.set_title("How tight is rho^L?")
    ax.legend()
    return {"alpha_vs_logrho": fig, "tightness": fig2}


EXPERIMENT = Experiment(
    name="feedforward_spectral",
    config=FeedforwardSpectral,
    run=run,
    checks=checks,
    figures=figures,
    summary=summary,
)
