r"""Learning energies: mean-square recursions (Lemma 5.1, Theorem 5.2) and dissipation checks.

Three layers, as in arviz-stats: array kernels here take per-path energies
$E_{p,s} = \mathcal{E}(\theta_p^{t_s})$ of shape ``(path, step)`` with a ``valid`` mask (the paths
that did not diverge) and return arrays or small result objects; conversion to a ``DataTree``
happens at the boundary (``RecursionFit.to_datatree``).

- [`mean_square`][]: $m_t = \mathbb{E}\|\theta^t - \theta^*\|^2$ with a normal-approximation
  confidence interval, over non-diverged paths only (never poisoned by NaN).
- [`quadratic_mean_square`][]: the *exact* $m_t$ of SGD on a quadratic with the Assumption-1
  Gaussian noise, by the second-moment recursion.
- [`fit_recursion`][]: a NumPyro posterior for $(q, c)$ in $m_{t+1} = q\,m_t + c$, hence
  $\alpha_\theta = \log q$, and the posterior probability that Theorem 5.2's bound is violated.
- [`dissipation_rate`][]: the largest $\gamma$ with
  $\mathcal{E}(S^{t+1}) - \mathcal{E}(S^t) \le -\gamma\,N(S^t) + R$ along an ensemble.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray
import numpy as np

from ._checks import check_in_interval, check_positive, check_positive_int, check_symmetric


class MeanSquare(eqx.Module):
    """Monte Carlo mean of an energy at each saved step, over the non-diverged paths."""

    mean: Float[Array, " step"]
    stderr: Float[Array, " step"]
    lower: Float[Array, " step"]
    upper: Float[Array, " step"]
    n_used: Array
    diverged_fraction: Float[Array, ""]
    level: float = eqx.field(static=True)


def _as_energy(energy: ArrayLike, valid: ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
    e = np.asarray(energy, dtype=float)
    if e.ndim != 2:
        raise ValueError(f"`energy` must have shape (path, step), got {e.shape}.")
    if valid is None:
        v = np.all(np.isfinite(e), axis=1)
    else:
        v = np.asarray(valid, dtype=bool)
        if v.shape != (e.shape[0],):
            raise ValueError(f"`valid` must have shape ({e.shape[0]},), got {v.shape}.")
        v = v & np.all(np.isfinite(e), axis=1)
    return e, v


def mean_square(
    energy: ArrayLike, valid: ArrayLike | None = None, *, level: float = 0.95
) -> MeanSquare:
    r"""$\hat m_t$, its standard error and a ``level`` confidence interval at each saved step.

    Paths with ``valid == False`` (diverged) or any non-finite energy are excluded; their
    fraction is reported. The interval is the normal approximation
    $\hat m_t \pm z\,\hat s_t/\sqrt{n}$ (CLT over independent paths).
    """
    check_in_interval("level", level, 0.0, 1.0)
    e, v = _as_energy(energy, valid)
    n = int(v.sum())
    if n < 2:
        raise ValueError(
            f"Only {n} of {e.shape[0]} paths did not diverge; at least 2 are needed for a mean "
            "and its error. Lower the step size or raise the divergence threshold."
        )
    ev = e[v]
    mean = ev.mean(axis=0)
    se = ev.std(axis=0, ddof=1) / math.sqrt(n)
    z = float(jax.scipy.stats.norm.ppf(0.5 + level / 2))
    return MeanSquare(
        mean=jnp.asarray(mean),
        stderr=jnp.asarray(se),
        lower=jnp.asarray(mean - z * se),
        upper=jnp.asarray(mean + z * se),
        n_used=jnp.asarray(n),
        diverged_fraction=jnp.asarray(1.0 - n / e.shape[0]),
        level=level,
    )


def quadratic_mean_square(
    hessian: ArrayLike,
    e0: ArrayLike,
    eta: float | ArrayLike,
    sigma0: float | ArrayLike,
    sigma1: float | ArrayLike,
    n_steps: int,
) -> Float[Array, " step"]:
    r"""Exact $m_t = \mathbb{E}\|\theta^t - \theta^*\|^2$ for SGD on $\frac12 e^\top H e$ with
    $G = He + \sigma_0\xi_0 + \sigma_1\|e\|\xi_1$, $\xi_i \sim \mathcal{N}(0, I/d)$
    (``lspsde.GaussianNoise``).

    With $A = I - \eta H$ and $S_t = \mathbb{E}[e_t e_t^\top]$ the second moment obeys the closed
    linear recursion $S_{t+1} = A S_t A + \frac{\eta^2}{d}(\sigma_0^2 + \sigma_1^2\,
    \mathrm{tr}\,S_t)\,I$, $S_0 = e_0 e_0^\top$, and $m_t = \mathrm{tr}\,S_t$. For
    $H = hI$ this is exactly $m_{t+1} = q\,m_t + \eta^2\sigma_0^2$ with
    $q = (1-\eta h)^2 + \eta^2\sigma_1^2 = q(\eta)$ of Theorem 5.2 at $\mu = L = h$:
    Lemma 5.1 is attained.
    """
    H = jnp.asarray(hessian, dtype=float)
    e0 = jnp.asarray(e0, dtype=float)
    d = e0.shape[0]
    if H.shape != (d, d):
        raise ValueError(f"`hessian` must be ({d}, {d}) to match e0, got {H.shape}.")
    check_symmetric("hessian", hessian)
    check_positive("eta", eta)
    check_positive("sigma0", sigma0, allow_zero=True)
    check_positive("sigma1", sigma1, allow_zero=True)
    n_steps = check_positive_int("n_steps", n_steps)
    A = jnp.eye(d) - eta * H

    def body(S, _):
        S_next = A @ S @ A + (eta**2 / d) * (sigma0**2 + sigma1**2 * jnp.trace(S)) * jnp.eye(d)
        return S_next, jnp.trace(S_next)

    _, ms = jax.lax.scan(body, jnp.outer(e0, e0), None, length=n_steps)
    return jnp.concatenate([jnp.sum(e0**2)[None], ms])


def recursion_mean(t: ArrayLike, q: ArrayLike, c: ArrayLike, m0: ArrayLike) -> Array:
    r"""$m_t = q^t m_0 + c\,(1 - q^t)/(1 - q)$: the solution of $m_{t+1} = q m_t + c$."""
    t = jnp.asarray(t, dtype=float)
    q = jnp.asarray(q, dtype=float)
    qt = q**t
    near = jnp.abs(1 - q) < 1e-8
    geom = jnp.where(near, t, (1 - qt) / jnp.where(near, 1.0, 1 - q))
    return qt * m0 + c * geom


class RecursionFit(eqx.Module):
    r"""Posterior of $(q, c, m_0)$ in $m_{t+1} = q m_t + c$ (samples flattened over chains)."""

    q: Float[Array, " draw"]
    c: Float[Array, " draw"]
    m0: Float[Array, " draw"]
    steps: Float[Array, " point"]
    m_hat: Float[Array, " point"]
    mcmc: object = eqx.field(static=True)

    @property
    def alpha_theta(self) -> Float[Array, " draw"]:
        r"""Posterior draws of the mean-square exponent $\log q$ (per step)."""
        return jnp.log(self.q)

    def prob_exceeds(self, q_bound: float, c_bound: float | None = None) -> Float[Array, ""]:
        r"""Posterior probability that $q > q_\text{bound}$ (or $c > c_\text{bound}$): that the
        measured recursion violates the predicted one."""
        viol = self.q > q_bound
        if c_bound is not None:
            viol = viol | (self.c > c_bound)
        return jnp.mean(viol)

    def to_datatree(self):
        """The posterior as an ArviZ 1.x ``DataTree`` (``arviz_base.from_numpyro``)."""
        import arviz_base

        return arviz_base.from_numpyro(self.mcmc)


def fit_recursion(
    steps: ArrayLike,
    energy: ArrayLike,
    valid: ArrayLike | None = None,
    *,
    key: PRNGKeyArray,
    max_points: int = 40,
    shrinkage: float = 0.0,
    num_warmup: int = 500,
    num_samples: int = 1000,
    num_chains: int = 2,
) -> RecursionFit:
    r"""Bayesian fit of $m_{t+1} = q\,m_t + c$ to a Monte Carlo energy ensemble (NumPyro NUTS).

    **Likelihood.** The per-step estimates $\hat m_{t_1}, \dots, \hat m_{t_K}$ are means over the
    *same* paths, so they are strongly correlated in $t$; treating them as independent (or
    regressing $\hat m_{t+1}$ on $\hat m_t$) would understate the uncertainty and bias $q$. By
    the multivariate CLT over independent paths, $\hat{\mathbf m} \approx
    \mathcal{N}(\mathbf m(q, c, m_0), \hat\Sigma / n)$ with $\hat\Sigma$ the sample covariance
    of the per-path energies across the saved steps, and $m(t) = q^t m_0 + c(1-q^t)/(1-q)$ the
    solution of the recursion (valid for any spacing of the saved steps). That is the
    likelihood used (optionally shrunk toward its diagonal by ``shrinkage``; 0 by default,
    since shrinking discards the step-to-step correlation and overstates the precision). When
    every path starts at the same $\theta^0$, $m_0$ has no Monte Carlo error and is held fixed.
    Chains start at the generalised-least-squares optimum (exact on a grid of $q$, since the
    curve is linear in $(m_0, c)$ given $q$).
    Priors: $q \sim \mathcal{U}(0, q_{\max})$, $q_{\max} = \min(2, e^{600/t_K})$ (values above
    1 — no contraction — are allowed, so a violated bound can be seen; the cap keeps $q^{t_K}$
    finite on long windows, where larger $q$ are excluded by any finite data),
    $c \sim \text{HalfNormal}(\max_t \hat m_t)$,
    $m_0 \sim \mathcal{N}(\hat m_0, \max(\hat m_0, \hat s_0))$.

    **Arguments:** saved ``steps`` (shape ``(K,)``), per-path ``energy`` ``(path, K)``, the
    ``valid`` mask of non-diverged paths (a path marked valid must be finite, else a
    ``ValueError``; with ``valid=None`` non-finite paths are dropped), a PRNG ``key``;
    ``max_points`` thins the steps.
    """
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import MCMC, NUTS, init_to_value

    check_positive_int("max_points", max_points, minimum=3)
    check_in_interval("shrinkage", shrinkage, 0.0, 1.0, closed_low=True)
    t = np.asarray(steps, dtype=float)
    e, v = _as_energy(energy, valid)
    if t.shape != (e.shape[1],):
        raise ValueError(f"`steps` must have shape ({e.shape[1]},), got {t.shape}.")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"`steps` must be finite; {int((~np.isfinite(t)).sum())} are not.")
    if valid is not None:
        bad = np.flatnonzero(np.asarray(valid, dtype=bool) & ~np.all(np.isfinite(e), axis=1))
        if bad.size:
            raise ValueError(
                f"{bad.size} path(s) marked valid have a non-finite energy (first: path "
                f"{bad[0]}); mark diverged paths invalid, or pass valid=None to drop them."
            )
    idx = np.unique(np.linspace(0, t.size - 1, min(max_points, t.size)).round().astype(int))
    t, e = t[idx], e[v][:, idx]
    n = e.shape[0]
    if n < t.size + 2:
        raise ValueError(
            f"{n} valid paths cannot estimate a {t.size}x{t.size} covariance; use more paths "
            "or a smaller `max_points`."
        )
    m_hat = e.mean(axis=0)
    S = np.cov(e, rowvar=False) / n
    cov = (1 - shrinkage) * S + shrinkage * np.diag(np.diag(S))
    # A start shared by every path has no Monte Carlo error: m_0 is then known exactly and is
    # held fixed (a free m_0 with posterior sd ~ 0 next to q and c stalls the sampler).
    fixed_m0 = bool(t[0] == 0 and S[0, 0] <= 1e-12 * max(float(m_hat[0]) ** 2, 1e-300))
    if fixed_m0:
        t, m_hat, cov = t[1:], m_hat[1:], cov[1:, 1:]
    cov = cov + 1e-12 * np.mean(np.diag(cov)) * np.eye(t.size)
    prec = np.linalg.inv(cov)
    m0_hat = float(e[:, 0].mean()) if fixed_m0 else float(m_hat[0])
    scale0 = max(abs(m0_hat), 1e-12)

    # Start at the generalised-least-squares optimum: given q the curve is linear in (m0, c).
    def design(q):
        geom = np.where(abs(1 - q) < 1e-8, t, (1 - q**t) / np.where(abs(1 - q) < 1e-8, 1, 1 - q))
        return q**t, geom

    def gls(q):
        a, g = design(q)
        if fixed_m0:
            y, X = m_hat - m0_hat * a, g[:, None]
        else:
            y, X = m_hat, np.stack([a, g], 1)
        beta = np.linalg.solve(X.T @ prec @ X, X.T @ prec @ y)
        r = y - X @ beta
        return float(r @ prec @ r), beta

    # q^t must stay finite over the window: factors whose curve overflows before the last saved
    # step are excluded by any finite data, so the prior stops short of them.
    q_max = float(min(2.0, np.exp(600.0 / max(float(t[-1]), 1.0))))
    grid = np.linspace(1e-3, q_max - 1e-3 * (q_max - 1e-3), 2000)
    with np.errstate(over="ignore", invalid="ignore"):
        objective = np.asarray([gls(q)[0] for q in grid])
    q_init = float(grid[int(np.nanargmin(np.where(np.isfinite(objective), objective, np.nan)))])
    beta = gls(q_init)[1]
    init = {"q": q_init, "c": max(float(beta[-1]), 1e-12)}
    if not fixed_m0:
        init["m0"] = float(beta[0])

    def model():
        q = numpyro.sample("q", dist.Uniform(0.0, q_max))
        c = numpyro.sample("c", dist.HalfNormal(float(np.max(m_hat))))
        if fixed_m0:
            m0 = numpyro.deterministic("m0", jnp.asarray(m0_hat))
        else:
            m0 = numpyro.sample("m0", dist.Normal(m0_hat, scale0))
        mu = recursion_mean(jnp.asarray(t), q, c, m0)
        numpyro.sample(
            "m_hat",
            dist.MultivariateNormal(mu, precision_matrix=jnp.asarray(prec)),
            obs=jnp.asarray(m_hat),
        )

    mcmc = MCMC(
        NUTS(model, init_strategy=init_to_value(values=init), dense_mass=True),
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method="sequential",
        progress_bar=False,
    )
    mcmc.run(key)
    s = mcmc.get_samples()
    m0 = jnp.broadcast_to(jnp.asarray(s["m0"]), s["q"].shape)
    return RecursionFit(s["q"], s["c"], m0, jnp.asarray(t), jnp.asarray(m_hat), mcmc)


class Dissipation(eqx.Module):
    r"""Result of [`dissipation_rate`][]: ``gamma`` is the largest rate consistent with every
    observed step; ``violating_fraction`` the share of steps that violate the inequality at
    the requested ``gamma_test`` (if given)."""

    gamma: Float[Array, ""]
    violating_fraction: Float[Array, ""]
    n_steps_used: Array


def dissipation_rate(
    energy: ArrayLike,
    norm_sq: ArrayLike,
    valid: ArrayLike | None = None,
    *,
    remainder: float | ArrayLike = 0.0,
    gamma_test: float | None = None,
) -> Dissipation:
    r"""The largest $\gamma$ with $\mathcal{E}(S^{t+1}) - \mathcal{E}(S^t) \le
    -\gamma\,N(S^t) + R$ on every observed step of every valid path (Theorem 3.1(2) /
    Assumption 4, with $N(S) = \|X_L\|^2 + \|\theta\|^2$ or any user norm).

    $\gamma^* = \min_{p,t} (\mathcal{E}_{p,t} - \mathcal{E}_{p,t+1} + R)/N_{p,t}$ over steps with
    $N_{p,t} > 0$; $\gamma^* \le 0$ means no dissipation rate is consistent with the data. With
    ``gamma_test``, the fraction of steps that violate the inequality at that rate is returned.
    """
    e, v = _as_energy(energy, valid)
    N = np.asarray(norm_sq, dtype=float)
    if N.shape != e.shape:
        raise ValueError(f"`norm_sq` must have the shape of `energy` {e.shape}, got {N.shape}.")
    e, N = e[v], N[v]
    dE = e[:, 1:] - e[:, :-1]
    Nt = N[:, :-1]
    pos = Nt > 0
    if not np.any(pos):
        raise ValueError("`norm_sq` is zero on every step: no rate can be estimated.")
    ratios = (-dE + remainder)[pos] / Nt[pos]
    gamma = float(np.min(ratios))
    frac = 0.0
    if gamma_test is not None:
        frac = float(np.mean(dE[pos] > -gamma_test * Nt[pos] + remainder))
    return Dissipation(jnp.asarray(gamma), jnp.asarray(frac), jnp.asarray(int(pos.sum())))
