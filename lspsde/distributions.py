r"""Per-path distributions of the stability exponents across a Monte Carlo ensemble.

For a stochastic learning system the profile, and so every exponent, is a random variable: it
depends on the realised noise $u^{0:T}$. [`exponent_distribution`][] draws ``n_paths``
independent noise streams, computes the Learning Stability Profile along each path
([`learning_profile`][lspsde.profile.learning_profile], ``vmap``-ed over path keys and run over
chunks of paths so that memory stays bounded) and reduces it, per path $p$, to

- the parametric exponent $\alpha_\theta^{(p)} = \frac1T\log\|\partial\theta_p^T/\partial
  \theta^0\|_2$ (growth rate) and its literal sup form
  $\frac1T\log\sup_{t}\|\partial\theta_p^t/\partial\theta^0\|_2$ (saved steps, $t = 0$
  included, so $\ge 0$);
- the temporal exponent $\alpha_u^{(p)} = \frac1T\log\sup_t\|\partial\theta_p^t/\partial
  u^{0:t}\|_2$ (not for discrete noise such as minibatch indices, where no derivative in $u$
  exists);
- profile signatures: $\sup_t\sigma^\theta_t$, $\frac1{|S|}\sum_{t\in S}\log\sigma^\theta_t$
  over the saved steps $S$ before $T$ (with ``save_every=1`` an upper bound on
  $\alpha_\theta^{(p)}$, by submultiplicativity), $\sup_t\sigma^u_t$, and with a representation
  the depth exponent $\frac1L\log\|\partial X_L/\partial X_0\|_2$ at $T$ and
  $\sup_{t,k}\sigma^x_{k,t}$;
- where $\theta^*$ is known, the energy exponent $\frac1T\log(\|e_T\|/\|e_0\|)$,
  $e_t = \theta_p^t - \theta^*$.

These are the same definitions as [`stability_exponents`][lspsde.exponents.stability_exponents]
applied to one profile (it is what runs per path).

**Noise from counters.** Path $p$ uses the key ``fold_in(key, p)`` and step $t$ of that path
``fold_in(fold_in(key, p), t)``, exactly as [`simulate`][lspsde.simulate]: path $p$ here is
path $p$ there, and its profile is
``learning_profile(system, theta0, key=fold_in(key, p), n_steps=n_steps)``. Results do not
depend on ``chunk_size``.

**Divergence is data.** A path is *diverged* if $\|\theta^t\|$ exceeds
``divergence_threshold`` or is not finite at some step (the rule of ``simulate``), or if its
profile could not be computed: a one-step block not finite, or a log-domain cumulative block
NaN (the cumulative sensitivities are exact in the log domain at any size, so an exploding
sensitivity is a value, not a divergence; ``cum_theta = exp(log_cum_theta)`` may be ``inf``).
Its numbers are kept but every statistic ([`ExponentDistribution.summary`][], the
``/exponents`` group of [`ExponentDistribution.to_datatree`][]) uses the other paths only, and
the count is reported.

**Cost.** Each saved step costs two matrix-free norms through the whole $T$-step trajectory
(see ``learning_profile``), so the work per path is $O(|S| \cdot T \cdot \text{max\_steps})$
one-step products: the parametric and temporal exponents at $T$ need only the saved steps
$\{0, T\}$ (``save_every=n_steps``); choose a finer ``save_every`` for the sup forms.
"""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree
import numpy as np

from ._custom_types import ScalarLike
from ._ensemble import (
    CHUNK_BUDGET_BYTES,
    MemoryPlan,
    as_system,
    check_key,
    check_run,
    check_start,
    check_step,
    grid_point,
    named_leaves,
    run_ensemble,
    sq_norm,
    state_size,
)
from ._simulate import ENSEMBLE_CF, add_cf_attrs, simulate_path
from .exponents import mean_log_norm, stability_exponents
from .profile import DEPTH_BLOCKS, TIME_BLOCKS, NormOptions, learning_profile

__all__ = ["EXPONENT_NAMES", "ExponentDistribution", "exponent_distribution"]

EXPONENT_NAMES = (
    "alpha_theta",
    "alpha_theta_sup",
    "alpha_u",
    "energy_exponent",
    "sup_sigma_theta",
    "mean_log_sigma_theta",
    "sup_sigma_u",
    "alpha_x",
    "sup_sigma_x",
)
"""The per-path variables summarised by [`ExponentDistribution.summary`][] (those present)."""

_PROFILE_NAMES = (*TIME_BLOCKS, "energy")
_CF = {  # CF (long_name, units) of every variable of `to_datatree`, by name prefix
    **ENSEMBLE_CF,  # loss, energy, final_theta, step, path as in simulate's results
    "alpha_theta_sup": (
        "sup-form parametric exponent (1/T) log sup_t ||dtheta^t/dtheta^0||",
        "1/step",
    ),
    "alpha_theta": ("parametric exponent (1/T) log ||dtheta^T/dtheta^0||_2", "1/step"),
    "alpha_u": ("temporal exponent (1/T) log sup_t ||dtheta^t/du^{0:t}||_2", "1/step"),
    "alpha_x": ("depth exponent (1/L) log ||dX_L/dX_0||_2 at T", "1/layer"),
    "energy_exponent": ("energy exponent (1/T) log(||e_T|| / ||e_0||)", "1/step"),
    "sup_sigma_theta": ("sup over saved steps of sigma^theta_t", "1"),
    "mean_log_sigma_theta": ("mean over saved steps t < T of log sigma^theta_t", "1"),
    "sup_sigma_u": ("sup over saved steps of sigma^u_t", "1"),
    "sup_sigma_x": ("sup over saved steps and layers of sigma^x_{k,t}", "1"),
    "sigma_theta": ("one-step parametric block ||dtheta^{t+1}/dtheta^t||_2", "1"),
    "sigma_u": ("one-step update-noise block ||dtheta^{t+1}/du^t||_2", "1"),
    "sigma_x": ("one-step depth block ||dX_{k+1}/dX_k||_2", "1"),
    "cum_theta": ("cumulative parametric block ||dtheta^t/dtheta^0||_2", "1"),
    "cum_u": ("cumulative noise block ||dtheta^t/du^{0:t}||_2", "1"),
    "cum_x": ("cumulative depth block ||dX_k/dX_0||_2", "1"),
    "log_cum_theta": ("log ||dtheta^t/dtheta^0||_2", "1"),
    "log_cum_u": ("log ||dtheta^t/du^{0:t}||_2", "1"),
    "diverged": ("whether the path diverged (or its profile could not be computed)", "1"),
    "divergence_step": ("first step of divergence (-1: none)", "step"),
    "converged": ("every matrix-free norm of the path met its tolerance", "1"),
    "layer": ("layer k", "1"),
}
_DEPTH_NAMES = DEPTH_BLOCKS


class ExponentDistribution(eqx.Module):
    r"""The result of [`exponent_distribution`][]: per-path exponents over ``n_paths`` paths.

    The path axis comes first everywhere; "step" indexes the saved steps ``steps``
    ($0, s, 2s, \dots$ and always $T$ = ``n_steps``).

    **Exponents** (dims ``(path,)``; ``None`` where undefined):

    - `alpha_theta`: $\frac1T\log\|\partial\theta^T/\partial\theta^0\|_2$.
    - `alpha_theta_sup`: $\frac1T\log\max(1, \sup_{t\in S}\|\partial\theta^t/\partial
      \theta^0\|_2)$, the paper's definition over the saved steps $S$.
    - `alpha_u`: $\frac1T\log\sup_{t\in S}\|\partial\theta^t/\partial u^{0:t}\|_2$; ``None``
      for discrete noise.
    - `energy_exponent`: $\frac1T\log(\|\theta^T-\theta^*\|/\|\theta^0-\theta^*\|)$; ``None``
      if $\theta^*$ is unknown or $\theta^0 = \theta^*$.
    - `sup_sigma_theta`, `mean_log_sigma_theta`: $\sup_{t\in S}\sigma^\theta_t$ and the mean of
      $\log\sigma^\theta_t$ over the saved $t < T$.
    - `sup_sigma_u`: $\sup_{t\in S}\sigma^u_t$; ``None`` for discrete noise.
    - `alpha_x`, `sup_sigma_x`: $\frac1L\log\|\partial X_L/\partial X_0\|_2$ at $t = T$ and
      $\sup_{t\in S,k}\sigma^x_{k,t}$ (suprema over the probes); ``None`` without a
      representation.

    **Profile blocks** (dims ``(path, step)``, depth blocks ``(path, step, layer)``): the fields
    of [`StabilityProfile`][lspsde.profile.StabilityProfile] (`sigma_theta`, `sigma_u`,
    `cum_theta`, `cum_u`, their log-domain `log_cum_theta`, `log_cum_u` (right beyond the
    float range, where ``cum_*`` are ``inf`` or 0), `loss`, `sigma_x`, `cum_x`) and `energy`
    $\|\theta^t - \theta^*\|^2$ (``None`` without $\theta^*$).

    **Status:** `final_theta` ($\theta^T$ as ``simulate`` returns it, frozen at divergence;
    ``None`` with ``keep_final=False``), `diverged`, `divergence_step` (the first step with
    $\|\theta^t\|$ above the threshold or not finite, else the first saved step with a
    non-finite profile, else ``-1``), `converged` (every matrix-free norm of the path met its
    tolerance), `steps`, and static metadata.
    """

    alpha_theta: Float[Array, "*grid path"]
    alpha_theta_sup: Float[Array, "*grid path"]
    alpha_u: Float[Array, "*grid path"] | None
    energy_exponent: Float[Array, "*grid path"] | None
    sup_sigma_theta: Float[Array, "*grid path"]
    mean_log_sigma_theta: Float[Array, "*grid path"]
    sup_sigma_u: Float[Array, "*grid path"] | None
    alpha_x: Float[Array, "*grid path"] | None
    sup_sigma_x: Float[Array, "*grid path"] | None
    sigma_theta: Float[Array, "*grid path step"]
    sigma_u: Float[Array, "*grid path step"] | None
    cum_theta: Float[Array, "*grid path step"]
    cum_u: Float[Array, "*grid path step"] | None
    log_cum_theta: Float[Array, "*grid path step"]
    log_cum_u: Float[Array, "*grid path step"] | None
    loss: Float[Array, "*grid path step"]
    energy: Float[Array, "*grid path step"] | None
    sigma_x: Float[Array, "*grid path step layer"] | None
    cum_x: Float[Array, "*grid path step layer"] | None
    final_theta: PyTree[Float[Array, "..."]] | None
    diverged: Bool[Array, "*grid path"]
    divergence_step: Int[Array, "*grid path"]
    converged: Bool[Array, "*grid path"]
    steps: Int[Array, " step"]
    n_steps: int = eqx.field(static=True)
    save_every: int = eqx.field(static=True)
    divergence_threshold: float = eqx.field(static=True)
    chunk_size: int = eqx.field(static=True)
    method: str = eqx.field(static=True)
    grid: Array | None = None
    grid_name: str | None = eqx.field(static=True, default=None)

    @property
    def n_paths(self) -> int:
        return self.diverged.shape[-1]

    def at(self, g: int) -> "ExponentDistribution":
        """The distribution of grid point ``g`` of a sweep: what a plain call with the
        ``g``-th module returns (bit for bit with the default ``Sweep(batch_size=None)``)."""
        return grid_point(self, g, "distribution")

    @property
    def n_diverged(self) -> int:
        """How many paths diverged (excluded from every statistic)."""
        return int(jnp.sum(self.diverged))

    @property
    def valid(self) -> Bool[Array, "*grid path"]:
        """The paths that did not diverge: those that enter the statistics."""
        return ~self.diverged

    def exponents(self, *, valid_only: bool = False) -> dict[str, np.ndarray]:
        """``{name: per-path values}`` for the exponents present (see ``EXPONENT_NAMES``),
        restricted to the non-diverged paths with ``valid_only`` (not for a sweep, whose
        grid points keep different paths: use ``at(g)``)."""
        if valid_only and self.grid_name is not None:
            raise ValueError(
                "A sweep's grid points keep different paths: take `.at(g).exponents(...)` for "
                "grid point g."
            )
        keep = np.asarray(self.valid) if valid_only else slice(None)
        return {
            name: np.asarray(getattr(self, name))[keep]
            for name in EXPONENT_NAMES
            if getattr(self, name) is not None
        }

    def to_datatree(self, attrs: dict | None = None):
        r"""The distribution as an ArviZ 1.x ``xarray.DataTree`` with sample dim ``path``.

        Groups:

        - ``/exponents``: the per-path exponents of the *non-diverged* paths only, labelled by
          their global path index (coordinate ``path``), so that any ArviZ function applied to
          this group, e.g. ``arviz_stats.summary(dt, group="exponents",
          sample_dims=["path"], kind="stats")``, never sees a diverged path;
        - ``/profile``: the profile blocks and the energy of *all* paths, dims
          ``(path, step)`` and ``(path, step, layer)``, ``step`` labelled by the step numbers;
        - ``/final``: $\theta^T$ per leaf (``final_theta...``), if kept;
        - ``/status``: ``diverged``, ``divergence_step``, ``converged``.

        A sweep's grid is the dimension ``grid_name`` after ``path``, labelled with its values;
        its grid points keep different paths, so there ``/exponents`` holds every path with
        NaN at the diverged ones (ArviZ's statistics then skip nothing silently: summarise a
        grid point with ``.at(g)``, or the whole grid with [`summary`][]). Every variable has
        CF ``long_name`` and ``units``. The configuration, updated with ``attrs``, is in the
        root's attributes.
        """
        import arviz_base

        grid = [] if self.grid_name is None else [self.grid_name]
        first = (lambda v: np.moveaxis(np.asarray(v), 0, 1)) if grid else np.asarray
        data: dict[str, dict[str, np.ndarray]] = {"profile": {}}
        dims: dict[str, list[str]] = {}
        for name in _PROFILE_NAMES + _DEPTH_NAMES:
            value = getattr(self, name)
            if value is not None:
                data["profile"][name] = first(value)
                dims[name] = [*grid, "step"] + ([] if name in _PROFILE_NAMES else ["layer"])
        if self.final_theta is not None:
            data["final"] = {
                k: first(v) for k, v in named_leaves(self.final_theta, "final_theta").items()
            }
            for name, v in data["final"].items():
                base = name.removeprefix("final_")
                dims[name] = [*grid, *(f"{base}_dim_{i}" for i in range(v.ndim - 1 - len(grid)))]
        data["status"] = {
            "diverged": first(self.diverged),
            "divergence_step": first(self.divergence_step),
            "converged": first(self.converged),
        }
        for name in data["status"]:
            dims[name] = grid
        config = {
            "n_paths": self.n_paths,
            "n_diverged": self.n_diverged,
            "n_steps": self.n_steps,
            "save_every": self.save_every,
            "divergence_threshold": self.divergence_threshold,
            "chunk_size": self.chunk_size,
            "method": self.method,
            "n_unconverged": int(jnp.sum(~self.converged)),  # netCDF has no boolean attrs
            "created_by": "lspsde.exponent_distribution",
            **(attrs or {}),
        }
        coords: dict[str, Any] = {"step": np.asarray(self.steps)}
        if self.sigma_x is not None:
            coords["layer"] = np.arange(self.sigma_x.shape[-1])
        if grid:
            coords[self.grid_name] = np.asarray(self.grid)
        tree = arviz_base.from_dict(
            data, sample_dims=["path"], dims=dims, coords=coords, attrs={"/": config}
        )
        if grid:
            valid = np.asarray(self.valid)
            exponents = {k: first(np.where(valid, v, np.nan)) for k, v in self.exponents().items()}
            exps = arviz_base.from_dict(
                {"exponents": exponents},
                sample_dims=["path"],
                dims={k: grid for k in exponents},
                coords={self.grid_name: np.asarray(self.grid)},
            )
        else:
            exps = arviz_base.from_dict(
                {"exponents": self.exponents(valid_only=True)},
                sample_dims=["path"],
                coords={"path": np.flatnonzero(np.asarray(self.valid))},
            )
        tree["exponents"] = exps["exponents"]
        return add_cf_attrs(tree, _CF)

    def summary(
        self,
        var_names: list[str] | None = None,
        *,
        ci_prob: float | None = None,
        ci_kind: str = "hdi",
        fmt: str = "wide",
    ):
        r"""``arviz_stats`` summary of the exponents over the non-diverged paths.

        Columns: ``mean``, ``sd``, the ``ci_kind`` interval (``hdi{p}_lb``, ``hdi{p}_ub``,
        $p$ = 100 ``ci_prob``, default ``arviz_base.rcParams["stats.ci_prob"]``), ``ess_bulk``,
        ``ess_tail``, ``mcse_mean`` and ``mcse_sd``, all computed by ``arviz_stats`` over the
        single sample dim ``path`` (unrounded).

        The paths are independent draws, so the ESS should be close to the number $n$ of paths
        used, and ``mcse_mean`` close to ``sd / sqrt(n)``: a much smaller ESS flags paths that
        are not independent. ``arviz_stats`` treats the single sample dim ``path`` as one chain
        (no ``chain``/``draw`` dims are needed; its ESS and MCSE split it in two halves), and its
        ESS is the MCMC estimator, noisy for small $n$ (for 32 i.i.d. draws values from
        $0.2n$ to $1.5n$ occur). R-hat needs several chains and says nothing about independent
        paths, so it is not reported. A variable constant over the paths has ``mcse`` 0.

        **Arguments:** `var_names` (default: every exponent present, ``EXPONENT_NAMES``),
        `ci_prob`, `ci_kind` (``"hdi"`` or ``"eti"``), `fmt` (``"wide"``: a
        ``pandas.DataFrame`` with one row per variable; ``"xarray"``: a ``Dataset`` with dim
        ``summary``).

        For a sweep, one summary per grid point (of its own non-diverged paths), stacked on the
        grid: a ``DataFrame`` indexed by ``(grid value, variable)``, or a ``Dataset`` with the
        grid dimension.

        **Raises:** ``ValueError`` for unknown names or options, or when fewer than two paths
        (of a grid point) did not diverge.
        """
        import arviz_base
        import arviz_stats
        import pandas as pd
        import xarray as xr

        if self.grid_name is not None:  # one summary per grid point, stacked on the grid
            values = np.asarray(self.grid)
            parts = [
                self.at(g).summary(var_names, ci_prob=ci_prob, ci_kind=ci_kind, fmt=fmt)
                for g in range(values.shape[0])
            ]
            if fmt == "xarray":
                return xr.concat(parts, dim=pd.Index(values, name=self.grid_name))
            return pd.concat(parts, keys=list(values), names=[self.grid_name, "variable"])
        if ci_kind not in ("hdi", "eti"):
            raise ValueError(f"`ci_kind` must be 'hdi' or 'eti', got {ci_kind!r}.")
        if fmt not in ("wide", "xarray"):
            raise ValueError(f"`fmt` must be 'wide' or 'xarray', got {fmt!r}.")
        values = self.exponents(valid_only=True)
        if var_names is not None:
            unknown = [v for v in var_names if v not in values]
            if unknown:
                raise ValueError(
                    f"Unknown or absent exponents {unknown}; this distribution has "
                    f"{sorted(values)}."
                )
            values = {v: values[v] for v in var_names}
        n = self.n_paths - self.n_diverged
        if n < 2:
            raise ValueError(
                f"Only {n} of {self.n_paths} paths did not diverge; a summary needs at least 2. "
                "Lower the step size, raise `divergence_threshold` or simulate more paths."
            )
        valid_ids = np.flatnonzero(np.asarray(self.valid))
        ds = xr.Dataset({k: ("path", v) for k, v in values.items()}, coords={"path": valid_ids})
        sample_dims = ["path"]
        parts = [
            arviz_stats.summary(
                ds,
                kind="stats",
                sample_dims=sample_dims,
                ci_prob=ci_prob,
                ci_kind=ci_kind,
                fmt="xarray",
                round_to="none",
            )
        ]
        sd = ds.std("path", ddof=1)
        # A variable constant over the paths (alpha_theta under additive noise) has sd = 0:
        # arviz_stats' MCSE of the sd is then 0/0; it is 0.
        with np.errstate(invalid="ignore", divide="ignore"):
            for method in ("bulk", "tail"):
                ess = arviz_stats.ess(ds, sample_dims=sample_dims, method=method)
                parts.append(ess.expand_dims(summary=[f"ess_{method}"]))
            for method in ("mean", "sd"):
                mcse = arviz_stats.mcse(ds, sample_dims=sample_dims, method=method)
                parts.append(mcse.where(sd > 0, 0.0).expand_dims(summary=[f"mcse_{method}"]))
        out = xr.concat(parts, dim="summary")
        out.attrs.update(n_paths=self.n_paths, n_used=n, n_diverged=self.n_diverged)
        if fmt == "xarray":
            return out
        return arviz_base.dataset_to_dataframe(out, sample_dims=["summary"]).T


def _one_path(system, theta0, key, threshold, n_steps, save_every, norm, keep_final, p):
    k_p = jax.random.fold_in(key, p)
    method, max_steps, rtol = norm
    profile = learning_profile(
        system,
        theta0,
        n_steps=n_steps,
        key=k_p,
        save_every=save_every,
        method=method,
        max_steps=max_steps,
        rtol=rtol,
    )
    ex = stability_exponents(profile)
    # simulate's path p: the divergence rule and the energies at every step
    path = simulate_path(system, theta0, key, threshold, n_steps, 1, False, p)
    final, div_step, energies = path["final_theta"], path["divergence_step"], path.get("energy")
    steps = profile.steps
    blocks = {
        "sigma_theta": profile.sigma_theta,
        "sigma_u": profile.sigma_u,
        "cum_theta": profile.cum_theta,
        "cum_u": profile.cum_u,
        "log_cum_theta": profile.log_cum_theta,
        "log_cum_u": profile.log_cum_u,
        "loss": profile.loss,
        "sigma_x": profile.sigma_x,
        "cum_x": profile.cum_x,
    }
    blocks = {k: v for k, v in blocks.items() if v is not None}
    # First saved step at which some block could not be computed (for the divergence step):
    # a one-step block not finite, or a log-domain cumulative block NaN (its -inf at t = 0, and
    # exp(log) beyond the float range, are values, not failures).
    bad = jnp.zeros(steps.shape, dtype=bool)
    for name, v in blocks.items():
        if name in ("cum_theta", "cum_u"):
            continue
        ok = ~jnp.isnan(v) if name.startswith("log_") else jnp.isfinite(v)
        bad = bad | ~ok.reshape(v.shape[0], -1).all(axis=1)
    first_bad = jnp.where(bad.any(), steps[jnp.argmax(bad)], -1)
    div_step = jnp.where(div_step >= 0, div_step, first_bad)
    out = dict(blocks)
    out.update(
        alpha_theta=ex.alpha_theta,
        alpha_theta_sup=ex.alpha_theta_sup,
        sup_sigma_theta=jnp.max(profile.sigma_theta),
        mean_log_sigma_theta=mean_log_norm(profile.sigma_theta[:-1]),
        divergence_step=div_step,
        converged=profile.converged,
    )
    if profile.cum_u is not None:
        out.update(alpha_u=ex.alpha_u, sup_sigma_u=jnp.max(profile.sigma_u))
    if profile.cum_x is not None:
        out.update(alpha_x=ex.alpha_x[-1], sup_sigma_x=jnp.max(profile.sigma_x))
    if system.objective.minimizer() is not None:
        out["energy"] = energies[steps]
        out["energy_exponent"] = jnp.log(energies[-1] / energies[0]) / (2 * n_steps)
    if keep_final:
        out["final_theta"] = final
    return out


def memory_plan(
    n_params: int,
    n_noise: int,
    n_steps: int,
    n_saved: int,
    max_steps: int,
    itemsize: int,
    dense: bool,
    grid: int = 1,
    batch: int = 1,
) -> MemoryPlan:
    r"""The memory of one path of [`exponent_distribution`][], over ``grid`` grid points run
    ``batch`` at a time (the result is held for every grid point, the working set for the
    ``batch`` that run at once).

    With $d$ parameters, $m$ noise entries per step, horizon $T$ and $k$ = ``max_steps``
    (clipped to the dimension), a path's profile holds the trajectory and the draws
    ($\approx 4(T+1)d + 2Tm$ numbers, with the linearisation residuals), and the Lanczos bases of
    the cumulative blocks, $2k(2d + Tm + d)$; ``method="dense"`` materialises the $d \times
    (d + Tm)$ Jacobians instead. Memory the objective or a representation needs internally
    (activations over a data set, probes) is not counted: pass ``chunk_size`` for such models.
    The result holds eight numbers per saved step and $\theta^T$.
    """
    tm = n_steps * n_noise
    per_path = 4 * (n_steps + 1) * n_params + 2 * tm + 16 * n_params
    if dense:
        per_path += 2 * n_params * (n_params + tm)
    else:
        per_path += 2 * min(max_steps, n_params) * 2 * n_params
        per_path += 2 * min(max_steps, max(tm, 1)) * (tm + n_params)
    return MemoryPlan(
        result_per_path=grid * itemsize * (8 * n_saved + n_params + 16),
        work_per_path=min(grid, batch) * itemsize * per_path,
        what="profile blocks at every saved step and the final theta",
        fixes="Use fewer paths, a shorter horizon, or `keep_final=False`.",
    )


def default_chunk_size(
    n_paths: int,
    n_params: int,
    n_noise: int,
    n_steps: int,
    max_steps: int,
    itemsize: int,
    dense: bool,
) -> int:
    r"""The default chunk: all paths if their estimated working set ([`memory_plan`][]) fits
    ``CHUNK_BUDGET_BYTES`` (1 GiB), else the fewest (nearly) equal chunks that each fit."""
    plan = memory_plan(n_params, n_noise, n_steps, 2, max_steps, itemsize, dense)
    return plan.chunk_size(n_paths, CHUNK_BUDGET_BYTES)


def exponent_distribution(
    system: Any,  # LearningSystem | (objective, update, noise): checked by as_system
    theta0: PyTree[ArrayLike],
    *,
    key: PRNGKeyArray,
    n_paths: int,
    n_steps: int,
    save_every: int = 1,
    chunk_size: int | None = None,
    divergence_threshold: ScalarLike = 1e8,
    method: str = "auto",
    max_steps: int = 64,
    rtol: float = 1e-6,
    keep_final: bool = True,
    progress: bool | None = None,
) -> ExponentDistribution:
    r"""The distribution over independent noise paths of the stability exponents of ``system``.

    For $p = 0, \dots, n-1$ the path $\theta_p^{t+1} = \mathcal{A}_t(\theta_p^t, u_p^t)$,
    $u_p^t$ drawn from ``fold_in(fold_in(key, p), t)`` (the noise stream of
    [`simulate`][lspsde.simulate]'s path $p$), is profiled with
    [`learning_profile`][lspsde.profile.learning_profile] and reduced to its exponents
    $\alpha_\theta^{(p)}$, $\alpha_u^{(p)}$, the profile signatures and the energy exponent (see
    [`ExponentDistribution`][] and the module docstring for the definitions).

    **Arguments:**

    - `system`: a [`LearningSystem`][lspsde.system.LearningSystem] (with a representation and
      probes for the depth blocks), or a tuple ``(objective, update, noise)``, in which
      `update` or `noise` may be a [`Sweep`][lspsde.Sweep]: the grid runs as one compiled
      program, as in ``simulate``, every array of the result gains a leading grid axis
      (``.at(g)`` is grid point ``g``), and path $p$ draws the same noise at every grid point.
    - `theta0`: $\theta^0$, a pytree of floating arrays shared by all paths.
    - `key`: a JAX PRNG key.
    - `n_paths`, `n_steps`: the number of paths and the horizon $T$.
    - `save_every`: the profile is evaluated at $t = 0, s, 2s, \dots$ and $T$ (the sup forms
      are over these steps; the cost grows with their number).
    - `chunk_size`: paths per compiled call (the last chunk is padded, so one program serves
      every chunk). Default: [`default_chunk_size`][] with a 1 GiB budget.
    - `divergence_threshold`: a path diverges at the first $t$ with $\|\theta^t\| >$ threshold
      or $\theta^t$ not finite (as in ``simulate``), or when its profile cannot be computed.
    - `method`, `max_steps`, `rtol`: how the operator norms are computed (as in
      ``learning_profile``: ``"auto"``, ``"lanczos"``, ``"power"`` or ``"dense"``).
    - `keep_final`: keep $\theta^T$ of every path (``n_paths`` copies of $\theta$).
    - `progress`: a tqdm bar over chunks; default: only on a terminal (not under ``CI``) with
      several chunks.

    **Returns:** an [`ExponentDistribution`][]; ``.summary()`` for the ``arviz_stats``
    summary, ``.to_datatree()`` for an ArviZ ``DataTree``.

    **Cost.** The paths of a chunk run in lockstep (``vmap``): each matrix-free norm iterates
    until its slowest path has converged. Where iteration counts differ between paths
    (state-dependent noise) a smaller ``chunk_size`` can be faster; where the Jacobians are
    the same on every path (additive noise on a quadratic) a large chunk turns the products
    into matrix-matrix products and is much faster. ``method="dense"`` is exact and compiles
    faster for small $d$.

    **Raises:** ``MemoryError`` before anything is traced when the result or the smallest
    chunk cannot fit ([`memory_plan`][]); ``TypeError``/``ValueError`` before anything is
    compiled for: wrong object types, non-positive or non-integer counts,
    ``save_every > n_steps``, a bad norm option,
    ``divergence_threshold <= 0``, a ``theta0`` that is not real floating, not finite, beyond the
    threshold, or that one update step does not map to its own shape, or a noise model whose
    ``check(objective, theta0)`` fails.
    """
    system, batched, sweep = as_system(system, "exponent_distribution")
    run = check_run(
        n_paths=n_paths,
        n_steps=n_steps,
        save_every=save_every,
        chunk_size=chunk_size,
        divergence_threshold=divergence_threshold,
    )
    n_paths, n_steps, save_every = run.n_paths, run.n_steps, run.save_every
    NormOptions(method, max_steps, rtol)  # checks the three norm options
    check_key(key)
    theta0 = check_start(theta0, run.divergence_threshold)
    check_step(system, theta0, key, n_steps)  # one abstract step; the flow and noise checks
    u_shape = eqx.filter_eval_shape(
        lambda s, th: s.noise_at(jax.random.key(0), 0, s.init_state(th)), system, theta0
    )
    n_noise = sum(
        math.prod(a.shape) for a in jax.tree.leaves(u_shape) if jnp.issubdtype(a.dtype, jnp.inexact)
    )
    itemsize = max(jnp.result_type(a).itemsize for a in jax.tree.leaves(theta0))
    plan = memory_plan(
        state_size(system, theta0),
        n_noise,
        n_steps,
        len(run.steps),
        max_steps,
        itemsize,
        method == "dense",
        *((1, 1) if sweep is None else (sweep.size, sweep.batch_size or 1)),
    )
    plan.check(n_paths)
    chunk_size = min(run.chunk_size or plan.chunk_size(n_paths), n_paths)
    threshold = jnp.asarray(run.divergence_threshold, dtype=float)
    # The iteration controls are static: normalise them where unused, to share the program.
    norm = ("dense", 64, 1e-6) if method == "dense" else (method, int(max_steps), float(rtol))
    out = run_ensemble(
        _one_path,
        system,
        (theta0, key, threshold, n_steps, save_every, norm, keep_final),
        n_paths=n_paths,
        chunk_size=chunk_size,
        sweep=batched,
        progress=progress,
        desc="exponent_distribution",
    )

    energy_exponent = out.get("energy_exponent")
    if energy_exponent is not None:
        star = system.objective.minimizer()
        e0 = float(sq_norm(jax.tree.map(jnp.subtract, theta0, star)))
        if e0 == 0.0:
            energy_exponent = None  # theta0 = theta*: the ratio ||e_T|| / ||e_0|| is undefined
    div_step = out["divergence_step"]
    return ExponentDistribution(
        alpha_theta=out["alpha_theta"],
        alpha_theta_sup=out["alpha_theta_sup"],
        alpha_u=out.get("alpha_u"),
        energy_exponent=energy_exponent,
        sup_sigma_theta=out["sup_sigma_theta"],
        mean_log_sigma_theta=out["mean_log_sigma_theta"],
        sup_sigma_u=out.get("sup_sigma_u"),
        alpha_x=out.get("alpha_x"),
        sup_sigma_x=out.get("sup_sigma_x"),
        sigma_theta=out["sigma_theta"],
        sigma_u=out.get("sigma_u"),
        cum_theta=out["cum_theta"],
        cum_u=out.get("cum_u"),
        log_cum_theta=out["log_cum_theta"],
        log_cum_u=out.get("log_cum_u"),
        loss=out["loss"],
        energy=out.get("energy"),
        sigma_x=out.get("sigma_x"),
        cum_x=out.get("cum_x"),
        final_theta=out.get("final_theta"),
        diverged=div_step >= 0,
        divergence_step=div_step,
        converged=out["converged"],
        steps=jnp.asarray(run.steps),
        n_steps=n_steps,
        save_every=save_every,
        divergence_threshold=run.divergence_threshold,
        chunk_size=chunk_size,
        method=method,
        grid=None if sweep is None else sweep.values,
        grid_name=None if sweep is None else sweep.name,
    )
