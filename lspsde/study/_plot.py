r"""Figure helpers shared by the study modules: panels in constrained layout (so that titles,
labels and colorbars never run into a neighbouring panel), log-axis limits taken from the data
(zeros and float underflow left out), the paper's notation, and a check that no two texts of a
drawn figure overlap (``overlapping_text``, used by the tests).

Every figure of a study is saved by the runner at its own size (``dpi=120``,
``bbox_inches="tight"``): what is readable here is readable in ``report.md``.
"""

from collections.abc import Iterable
import math

import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter
import numpy as np

__all__ = [
    "ALPHA_X",
    "ETA_RATIO",
    "LOG_RHO",
    "M_T",
    "figure",
    "log_limits",
    "overlapping_text",
    "panels",
    "plain_log_ticks",
    "set_log_ylim",
]

# The paper's notation (matplotlib mathtext).
ALPHA_X = r"$\alpha_x$"
LOG_RHO = r"$\log\rho$"
ETA_RATIO = r"$\eta/\eta_{\max}$"
M_T = r"$m_t = \mathbb{E}\|\theta_t - \theta^*\|^2$"

# Values below this are float underflow (or exact zeros), not data, on a log axis.
TINY = 1e-300


def panels(
    n: int,
    ncols: int | None = None,
    *,
    size: tuple[float, float] = (3.8, 3.2),
    **kwargs,
):
    """``n`` panels of ``size`` inches each on a grid of ``ncols`` columns (default: one row), in
    constrained layout; the unused cells of the last row are hidden. Returns ``(fig, axes)``
    with ``axes`` 2-D."""
    ncols = max(1, min(n, ncols or n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(size[0] * ncols, size[1] * nrows),
        squeeze=False,
        layout="constrained",
        **kwargs,
    )
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes


def figure(size: tuple[float, float] = (5.6, 4.0)):
    """One panel in constrained layout: ``(fig, ax)``."""
    return plt.subplots(figsize=size, layout="constrained")


def positive(*arrays) -> np.ndarray:
    """The finite values above float underflow (``TINY``) of ``arrays``, flattened."""
    flat = [np.ravel(np.asarray(a, dtype=float)) for a in arrays]
    x = np.concatenate(flat) if flat else np.zeros(0)
    return x[np.isfinite(x) & (x > TINY)]


def log_limits(*arrays, pad: float = 2.0) -> tuple[float, float] | None:
    """Limits of a log axis that hold the positive finite values of ``arrays`` (zeros and
    underflow left out), padded by the factor ``pad`` on either side; ``None`` without data."""
    x = positive(*arrays)
    if x.size == 0:
        return None
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo * 1.0001:
        lo, hi = lo / 3, hi * 3
    return lo / pad, hi * pad


def set_log_ylim(ax, *arrays, pad: float = 2.0) -> tuple[float, float] | None:
    """A log y-axis whose limits come from the data (see [`log_limits`][])."""
    lim = log_limits(*arrays, pad=pad)
    ax.set_yscale("log")
    if lim is not None:
        ax.set_ylim(*lim)
    return lim


def clip_to(values, limits: tuple[float, float] | None, factor: float = 1e3) -> np.ndarray:
    """``values`` with what lies far outside ``limits`` (more than ``factor`` beyond either
    end, or not finite) replaced by NaN: a curve that leaves the axis is cut there, so that
    autoscaling a log axis never meets values near the float range (which overflows)."""
    v = np.asarray(values, dtype=float).copy()
    if limits is None:
        return v
    lo, hi = limits
    v[~np.isfinite(v) | (v > hi * factor) | (v < lo / factor)] = np.nan
    return v


def plain_log_ticks(axis, values: Iterable, labels: Iterable[str] | None = None) -> None:
    """Major ticks of a log ``axis`` at ``values`` with plain labels (``:g``, or ``labels``),
    and no minor tick labels (``2x10^-1, 3x10^-1, ...`` run into each other)."""
    values = [float(v) for v in values]
    labels = [f"{v:g}" for v in values] if labels is None else list(labels)
    axis.set_ticks(values, labels)
    axis.set_minor_formatter(NullFormatter())


def _in_view(ax, text, name: str, renderer) -> bool:
    """Whether a tick label sits beside the panel (ticks outside the view limits keep stale
    labels that are never drawn)."""
    box, frame = text.get_window_extent(renderer), ax.get_window_extent(renderer)
    if name == "x":
        return bool(frame.x0 - 1 <= 0.5 * (box.x0 + box.x1) <= frame.x1 + 1)
    return bool(frame.y0 - 1 <= 0.5 * (box.y0 + box.y1) <= frame.y1 + 1)


def _texts(fig, renderer):
    """``(owner, what, text)`` for every visible, non-empty text of a drawn figure: the
    figure's own (suptitle, supxlabel, supylabel, other figure texts), and per axes its titles,
    axis labels and the tick labels beside it."""
    out, seen = [], set()
    for what in ("_suptitle", "_supxlabel", "_supylabel"):
        t = getattr(fig, what, None)
        if t is not None:
            out.append(("figure", what.strip("_"), t))
            seen.add(id(t))
    out += [("figure", "text", t) for t in fig.texts if id(t) not in seen]
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible() or not ax.axison:
            continue
        owner = f"axes {i} ({ax.get_title() or ax.get_label()})"
        for what in ("title", "_left_title", "_right_title"):
            out.append((owner, what.strip("_"), getattr(ax, what)))
        out += [(owner, "xlabel", ax.xaxis.label), (owner, "ylabel", ax.yaxis.label)]
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            for minor in (False, True):
                for t in axis.get_ticklabels(minor=minor):
                    if t.get_visible() and t.get_text().strip() and _in_view(ax, t, name, renderer):
                        out.append((owner, f"{name} tick", t))
    return [(o, w, t) for o, w, t in out if t.get_visible() and t.get_text().strip()]


def overlapping_text(fig) -> list[str]:
    """What runs into what in ``fig``, drawn at its size and 120 dpi as the runner saves it: one
    line per pair whose window extents overlap by more than a pixel. Compared: texts of
    different panels and the figure's own texts (titles, labels and tick labels of neighbouring
    panels), tick labels of one axis among themselves (crowded ticks), and every text with the
    frame of a panel it does not belong to (a y-label running into the panel to its left)."""
    fig.set_dpi(120)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    items = []
    for owner, what, t in _texts(fig, renderer):
        box = t.get_window_extent(renderer)
        if box.width > 0 and box.height > 0:
            items.append((owner, what, t.get_text(), box.padded(-1.0)))
    clashes = []
    for i, (o1, w1, s1, b1) in enumerate(items):
        for o2, w2, s2, b2 in items[i + 1 :]:
            same_axis_ticks = o1 == o2 and w1 == w2 and w1.endswith("tick")
            if (o1 != o2 or same_axis_ticks) and b1.overlaps(b2):
                clashes.append(f"{o1} {w1} {s1!r} overlaps {o2} {w2} {s2!r}")
    for j, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        frame = ax.get_window_extent(renderer).padded(-1.0)
        owner = f"axes {j} ({ax.get_title() or ax.get_label()})"
        for o, w, s, b in items:
            if o != owner and o != "figure" and b.overlaps(frame):
                clashes.append(f"{o} {w} {s!r} runs into the frame of {owner}")
    return clashes
