r"""Monte Carlo helpers shared by the Section-5 studies (``sgd_constant``, ``sgd_decreasing``,
``noise_ablation``): the test system, confidence intervals, tail statistics, tail indices.

Everything here takes NumPy arrays of per-path energies ``(path, step)`` and a ``valid`` mask of
the paths that never diverged; nothing is ever averaged over a NaN or a frozen (diverged) path.
"""

import math
import statistics

import jax
import numpy as np

import models


def z_value(level: float, n_intervals: int = 1) -> float:
    r"""The normal quantile $z$ of a two-sided ``level`` interval, Bonferroni-corrected for
    ``n_intervals`` simultaneous intervals: $z = \Phi^{-1}(1 - (1 - \text{level})/(2k))$."""
    alpha = (1.0 - level) / max(1, n_intervals)
    return statistics.NormalDist().inv_cdf(1.0 - alpha / 2.0)


def family_level(level: float, n_intervals: int) -> float:
    r"""The per-interval level that makes ``n_intervals`` intervals hold together with
    probability ``level`` (Bonferroni): $1 - (1 - \text{level})/k$. The studies compare many
    grid cases at once; without it, a 99% interval misses somewhere on a 30-case grid with
    probability ~26%."""
    return 1.0 - (1.0 - level) / max(1, n_intervals)


def rotated_quadratic(
    key, dim: int, mu: float, L: float, initial_distance: float
) -> tuple[models.Quadratic, np.ndarray, np.ndarray, np.ndarray]:
    r"""$\frac12(\theta - \theta^*)^\top H(\theta - \theta^*)$ with $H = V\Lambda V^\top$,
    $\Lambda$ = ``dim`` eigenvalues evenly spaced in $[\mu, L]$, $V$ Haar-random, $\theta^*$
    standard normal, and $\theta^0 = \theta^* + e_0$ with $e_0$ of norm ``initial_distance``
    spread evenly over the eigen-directions, $(V^\top e_0)_i = $ ``initial_distance``$/\sqrt d$.

    **Returns:** ``(objective, theta0, eigenvalues, V)``.
    """
    k_rot, k_star = jax.random.split(key)
    lam = np.linspace(mu, L, dim)
    V = np.asarray(models.orthogonal_matrix(k_rot, (dim, dim)))
    H = (V * lam[None, :]) @ V.T
    theta_star = np.asarray(jax.random.normal(k_star, (dim,)))
    objective = models.Quadratic(0.5 * (H + H.T), theta_star)
    e0 = V @ np.full(dim, initial_distance / math.sqrt(dim))
    return objective, theta_star + e0, lam, V


def path_mean(values: np.ndarray, valid: np.ndarray, level: float) -> dict[str, float]:
    """Mean over the valid paths of one value per path, with its standard error and a ``level``
    normal interval (NaN when fewer than two paths are valid)."""
    x = np.asarray(values, dtype=float)[np.asarray(valid, dtype=bool)]
    x = x[np.isfinite(x)]
    if x.size < 2:
        return {"mean": np.nan, "se": np.nan, "lower": np.nan, "upper": np.nan, "n": float(x.size)}
    mean, se = float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))
    z = z_value(level)
    return {
        "mean": mean,
        "se": se,
        "lower": mean - z * se,
        "upper": mean + z * se,
        "n": float(x.size),
    }


def tail_mean(
    energy: np.ndarray,
    valid: np.ndarray,
    start: int,
    level: float,
    weight: np.ndarray | None = None,
) -> dict[str, float]:
    r"""The stationary level: each valid path's time average of ``energy[:, start:]`` (times
    ``weight`` per step, if given), then the mean over paths with a CLT interval. Paths are
    independent, so the interval is honest even though the steps of one path are correlated."""
    e = np.asarray(energy, dtype=float)[:, start:]
    if weight is not None:
        e = e * np.asarray(weight, dtype=float)[None, start:]
    return path_mean(e.mean(axis=1), valid, level)


def hill_tail_index(x: np.ndarray, k: int | None = None) -> float:
    r"""Hill's estimator of the tail index $\alpha$ in $P(X > x) \sim x^{-\alpha}$ from the $k$
    largest of the positive samples ``x`` (default $k = \max(10, n/20)$):
    $\hat\alpha = \big(\frac1k\sum_{i \le k}\log(X_{(i)}/X_{(k+1)})\big)^{-1}$.

    Light (Gaussian-like) tails give large values that grow with $n$; a power law gives its
    exponent. NaN with fewer than 20 finite positive samples."""
    x = np.sort(np.asarray(x, dtype=float)[np.isfinite(x) & (np.asarray(x) > 0)])[::-1]
    if x.size < 20:
        return np.nan
    k = k or max(10, x.size // 20)
    k = min(k, x.size - 1)
    xi = float(np.mean(np.log(x[:k] / x[k])))
    return 1.0 / xi if xi > 0 else np.inf


def ols_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of ``y`` on ``x``."""
    xc = x - x.mean()
    return float(xc @ (y - y.mean()) / (xc @ xc))


def loglog_slope(
    steps: np.ndarray,
    energy: np.ndarray,
    valid: np.ndarray,
    level: float,
    key,
    n_boot: int = 200,
) -> dict[str, float]:
    r"""Slope of $\log\hat m_t$ against $\log t$ (``steps`` already shifted as wanted), with a
    bootstrap interval over paths (the paths are the independent units): slope $\pm z\,$sd of
    the bootstrap slopes. (Percentile limits from ``n_boot`` = 200 resamples cannot resolve the
    tails of a Bonferroni-adjusted 99.x% interval: they came out too narrow.)"""
    e = np.asarray(energy, dtype=float)[np.asarray(valid, dtype=bool)]
    lx = np.log(np.asarray(steps, dtype=float))
    if e.shape[0] < 2:
        return {"slope": np.nan, "lower": np.nan, "upper": np.nan}
    slope = ols_slope(lx, np.log(e.mean(axis=0)))
    idx = np.asarray(jax.random.randint(key, (n_boot, e.shape[0]), 0, e.shape[0]))
    boot = np.array([ols_slope(lx, np.log(e[i].mean(axis=0))) for i in idx])
    half = z_value(level) * float(np.std(boot, ddof=1))
    return {"slope": slope, "lower": slope - half, "upper": slope + half}


def fmt_ci(x, lo, hi) -> str:
    """``x [lo, hi]`` to four significant digits, for a report's measured column."""
    return f"{float(x):.4g} [{float(lo):.4g}, {float(hi):.4g}]"


def in_band(x: np.ndarray, lower: np.ndarray, upper: np.ndarray, rel: float = 1e-12) -> np.ndarray:
    """Where ``lower <= x <= upper`` up to a relative rounding ``rel``: at t = 0 every path is at
    theta0, the band has zero width, and a closed form's m_0 may differ from the simulator's in
    the last bits (a 1-ulp difference must not read as a violation)."""
    return (x >= lower * (1 - rel)) & (x <= upper * (1 + rel))
