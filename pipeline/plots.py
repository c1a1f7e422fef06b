"""Drawing floor shared by a run's own plots (:mod:`pipeline.training.callbacks`) and the report's figures
(:mod:`pipeline.report.figures`): pyplot on the Agg backend, the figure size and resolution, title
wrapping, and the axis-level drawings of the long-range profile and of the gradient norms, so that each
of the two figures is drawn by one code path.

Importing this module imports matplotlib: the training stage imports it only when it draws.
"""

from __future__ import annotations

import math
import textwrap
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np

matplotlib.use("Agg")  # files only, never a window: set once, before pyplot is imported

import matplotlib.pyplot as plt

from pipeline.names import DIVERGED

__all__ = [
    "DPI",
    "LEARNED_NOTHING",
    "MIN_WIDTH",
    "PROFILE_YLABEL",
    "Curve",
    "draw_grad_norms",
    "draw_profile",
    "integer_ticks",
    "run_figure",
    "outcome",
    "panel_grid",
    "plt",
    "positive",
    "reused_run_figures",
    "run_summary",
    "wrap_title",
]

MIN_WIDTH = 8.0  # inches: a figure-wide title and legend fit even when there is one panel
DPI = 170  # report and run figures (110 looked soft on a laptop screen; ~2x the file size)
PROFILE_YLABEL = r"$\log_{10}\,\|\partial L_w/\partial h_t\|$ (long-range)"
# val loss / task baseline at or above which a run "learned nothing" (1.0 = the baseline's loss exactly):
# healthy gradient flow is no success if the loss never left the baseline (README, "What the report shows").
LEARNED_NOTHING = 0.9


def wrap_title(text: str, fig: Any) -> str:
    """Wrap a figure title to the figure's width (about 11 characters per inch at fontsize 11)."""
    return "\n".join(textwrap.wrap(text, max(30, int(fig.get_figwidth() * 11))))


# A run's own figure (plots/bptt_profile.png, plots/grad_norms.png), drawn for every trial of a sweep: margins
# in inches, fixed, instead of matplotlib's constrained layout, which measures every tick label's extent on
# each save (in a cProfile of a sweep worker, constrained layout was half of the time spent in savefig).
RUN_MARGINS = {"left": 0.9, "right": 2.15, "bottom": 0.6, "top": 0.25}  # right: the legend's column
TITLE_LINE = 0.19  # inches per wrapped title line at fontsize 10


# Per thread: how many reused_run_figures() blocks are open, and height -> the (figure, axes, rcParams at its
# making) run_figure hands out again inside them (kept for the thread's life: two figures of a run, about
# 10 MB with their renderers' buffers).
_pool = threading.local()


@contextmanager
def reused_run_figures() -> Iterator[None]:
    """While active (in this thread), :func:`run_figure` hands out one figure per height again and again,
    its axes emptied to a new figure's state, instead of building a new one. For the run figures
    (:func:`profile_figure`, :func:`pipeline.training.callbacks.plot_grad_norms`),
    saved and dropped at once, as a run's record does (:mod:`pipeline.training.record`): drawn after any of
    them, in any order and with any data, each is the same PNG bytes as on a new figure
    (tests/test_run_figures.py), at about three quarters of the cost (27% less in a recorded stack: README,
    "On a GPU"), because the ticks, the renderer and the parsed
    mathtext labels already exist (README, "Batched trials": a sweep draws two figures per trial).

    Not for other drawings: :func:`_new_state` undoes what the run figures do (and a few common calls),
    not every matplotlib setting. A figure that gained a second axes or figure-level artists, or whose
    rcParams changed since it was made (a style in a notebook), is replaced by a new one. A figure handed
    out here must not be kept past the next :func:`run_figure` call in the thread."""
    _pool.depth = getattr(_pool, "depth", 0) + 1
    try:
        yield
    finally:
        _pool.depth -= 1


def _new_state(ax: Any) -> None:
    """Empty ``ax`` to the state of a new axes, keeping its ticks: the data artists and the legend gone,
    linear scales, the default x tick locator (not :func:`integer_ticks`'s), the colour cycle at its
    start, the data limits null (a drawing with no finite point, as a run diverged at its first step
    draws, must not inherit the previous run's), the view (0, 1) and not autoscaled until something is
    drawn, autoscaling on, no labels, no grid."""
    from matplotlib.transforms import Bbox

    for artist in [*ax.lines, *ax.patches, *ax.collections, *ax.texts, *ax.images]:
        artist.remove()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
        if scale != "linear":
            (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("linear")
    if type(ax.xaxis.get_major_locator()) is not matplotlib.ticker.AutoLocator:  # integer_ticks's
        ax.xaxis.set_major_locator(matplotlib.ticker.AutoLocator())
        ax.xaxis.isDefault_majloc = True
    ax.set_prop_cycle(None)
    ax.dataLim = Bbox.null()
    ax.ignore_existing_data_limits = True
    ax.viewLim.set_points(Bbox.unit().get_points())
    ax.set_autoscale_on(True)
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.grid(False, which="both")


def _figure(height: float) -> tuple[Any, Any]:
    if not getattr(_pool, "depth", 0):
        return plt.subplots(figsize=(MIN_WIDTH, height), dpi=DPI)
    pool = _pool.__dict__.setdefault("figures", {})
    entry = pool.get(height)
    if entry is not None:
        fig, ax, rc = entry
        foreign = fig.axes != [ax] or fig.texts or fig.legends or fig.lines or fig.patches or fig.images
        if foreign or not dict.__eq__(matplotlib.rcParams, rc):  # about 3 us
            entry = None
    if entry is None:  # outside pyplot: plt.close leaves it, and no window manager keeps it
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(MIN_WIDTH, height), dpi=DPI)
        FigureCanvasAgg(fig)
        entry = pool[height] = (fig, fig.subplots(), matplotlib.rcParams.copy())
    fig, ax, _ = entry
    _new_state(ax)
    return fig, ax


def run_figure(height: float, title: str) -> tuple[Any, Any]:
    """A one-panel figure of a run with fixed margins: the legend to the right of the axes (loc
    "upper left" at (1.01, 1)), ``title`` wrapped to the width above them. Inside :func:`reused_run_figures`
    the same figure again for the same height."""
    fig, ax = _figure(height)
    text = wrap_title(title, fig)
    m = RUN_MARGINS
    top = m["top"] + TITLE_LINE * (text.count("\n") + 1)
    fig.subplots_adjust(
        left=m["left"] / MIN_WIDTH,
        right=1 - m["right"] / MIN_WIDTH,
        bottom=m["bottom"] / height,
        top=1 - top / height,
    )
    # y given: the title sits at the top of the axes, where matplotlib's automatic placement puts it for
    # these axes (no ticks on top; the same PNG bytes: tests/test_diagnostics.py), without measuring the
    # tick labels again at each save. The y axis's offset text ("+1e5" above it), which the automatic
    # placement would have moved the title over, is off.
    ax.set_title(text, fontsize=10, y=1.0)
    fmt = ax.yaxis.get_major_formatter()
    if isinstance(fmt, matplotlib.ticker.ScalarFormatter):  # a new axes' formatter; log axes replace it
        fmt.set_useOffset(False)
    return fig, ax


def panel_grid(n: int, width: float = 4.2, height: float = 3.6, max_cols: int = 3) -> tuple[Any, list]:
    """A report figure of ``n`` panels (:mod:`pipeline.report.figures`), ``max_cols`` a row, each cell
    ``width`` x ``height`` inches (the figure at least MIN_WIDTH wide); cells past ``n`` hidden."""
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    # Constrained layout makes room for titles, figure legends and legends below the axes (tight_layout
    # ignores figure-level artists: one-panel figures lost their title and legend).
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(width * cols, MIN_WIDTH), height * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def integer_ticks(axis: Any) -> None:
    """Ticks at whole numbers only, for an axis of training steps or time steps t: matplotlib's default
    locator (AutoLocator's steps 1, 2, 2.5, 5, 10) with ``integer=True``, so a short run shows no
    "0.5 step" (tests/test_run_figures.py)."""
    axis.set_major_locator(
        matplotlib.ticker.MaxNLocator(nbins="auto", steps=[1, 2, 2.5, 5, 10], integer=True)
    )


def outcome(val_loss_ratio: Any, solved: Any = None) -> str:
    """What the run learned, in words, for titles and labels: "solved", "learned nothing" (val loss at
    least LEARNED_NOTHING x baseline), "partly learned", or "no val loss"."""
    if solved in (True, "true"):
        return "solved"
    try:
        r = float(val_loss_ratio)
    except (TypeError, ValueError):
        return "no val loss"
    if math.isnan(r):
        return "no val loss"
    return "learned nothing" if r >= LEARNED_NOTHING else "partly learned"


def run_summary(
    regime: Any, val_loss_ratio: Any, solved: Any = None, reason: str = "", diverged_step: Any = None
) -> str:
    """ "<regime> gradients; val loss 0.98 x baseline: learned nothing": the verdict next to the outcome,
    so a healthy gradient flow that learned nothing does not read as a success. With ``reason`` (the
    verdict rule that decided, tag ``regime_reason``), after the regime: "exploding gradients (pre-clip
    norm 3.1e+13 > explode_norm 1000)", so a verdict of the norm rule beside a decaying profile says so.
    A diverged run says its ``diverged_step`` (tag), "diverged at step 15": its last profile pass is
    labelled with the step after (16, the step dropped counted), which read as a second diverged step."""
    try:
        r = float(val_loss_ratio)
    except (TypeError, ValueError):
        r = math.nan
    diverged = DIVERGED
    if isinstance(diverged_step, (int, float)) and math.isfinite(diverged_step):
        diverged += f" at step {int(diverged_step)}"
    if regime == DIVERGED and not math.isfinite(r):  # an infinite loss is no measured one
        return f"{diverged}; no val loss"
    loss = f"val loss {r:.2g} x baseline: " if math.isfinite(r) else ""
    what = diverged if regime == DIVERGED else f"{regime} gradients" + (f" ({reason})" if reason else "")
    return f"{what}; {loss}{outcome(val_loss_ratio, solved)}"


@dataclass(frozen=True)
class Curve:
    """One line of a drawing: x and y values, its legend label and its style."""

    x: Any
    y: Any
    label: str
    style: str = "-"
    lw: float = 1.0
    color: Any = None  # None: the axes' colour cycle
    marker: str | None = None


def draw_profile(ax: Any, curves: Iterable[Curve], window: tuple[int, int] | None = None) -> None:
    """The long-range profile log10 ||dL_w/dh_t|| against the time step t (README, "The long-range
    profile"): one line per curve, the memory window shaded when it starts after t = 1, axis labels and
    grid. Titles and legends are the caller's."""
    curves = list(curves)
    drawn = [c for c in curves if np.isfinite(np.asarray(c.y, dtype=float)).any()]
    for c in drawn:  # a pass with no finite value draws nothing: no legend entry of its own either
        # one finite point draws no line: a marker (a dead relu run's profile, -inf but at t = T, was a
        # legend entry with nothing drawn; a teacher's review)
        one = np.isfinite(np.asarray(c.y, dtype=float)).sum() == 1
        ax.plot(
            c.x,
            c.y,
            c.style,
            lw=c.lw,
            color=c.color,
            marker=c.marker or ("o" if one else None),
            label=c.label,
        )
    if curves and not drawn:
        # Nothing to draw: say why, over the whole sequence (an empty axes around the window read as a
        # broken plot; found by a walkthrough of a relu run that overflowed at t = 1026).
        ys = np.concatenate([np.asarray(c.y, dtype=float) for c in curves])
        ts = np.concatenate([np.asarray(c.x, dtype=float) for c in curves])
        why = (
            "the gradient is exactly 0 at every step: nothing reaches back"
            if ys.size and np.all(ys == -np.inf)
            else "no finite value: the float64 forward overflowed\n(bptt/overflow_step) or the gradient did"
        )
        ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.3")
        if ts.size:
            ax.set_xlim(1, max(float(ts.max()), 2.0))
    if window is not None and window[0] > 1:
        a, b = window
        where = f"t = {a}" if a == b else f"t = {a}..{b}"
        ax.axvspan(a, b, color="0.85", zorder=0, label=f"memory window {where}")
    ax.set_xlabel("time step t")
    integer_ticks(ax.xaxis)
    ax.set_ylabel(PROFILE_YLABEL)
    ax.grid(alpha=0.3)


def positive(y: Any) -> np.ndarray:
    """Mask of the finite, positive values: the points a log axis can show."""
    y = np.asarray(y, dtype=float)
    return np.isfinite(y) & (y > 0)


def draw_grad_norms(ax: Any, curves: Iterable[Curve], thresholds: Iterable[float] = ()) -> None:
    """Global gradient norm over training on a log axis (only finite, positive points), one dotted line per
    clip threshold, axis labels and grid. Titles and legends are the caller's."""
    curves, drawn = list(curves), 0
    for c in curves:
        x, y = np.asarray(c.x), np.asarray(c.y, dtype=float)
        ok = positive(y)
        if not ok.any():  # nothing to draw: no legend entry either
            continue
        # Broken where a norm is not drawable (NaN, inf, 0), not joined across: a post-clip line straight
        # over the steps remedy.skip dropped (no update, no post-clip norm) read as updates (a walkthrough).
        # A point with no drawable neighbour draws no line: a marker on it (else a run whose only finite norm
        # was its first step, or a step between two skipped ones, shows nothing).
        lone = ok & ~np.r_[False, ok[:-1]] & ~np.r_[ok[1:], False]
        style: dict[str, Any] = {"marker": c.marker}
        if c.marker is None and lone.any():
            style = {"marker": "o", "markevery": np.flatnonzero(lone).tolist()}
        ax.semilogy(x, np.where(ok, y, np.nan), c.style, lw=c.lw, color=c.color, ms=4, label=c.label, **style)
        drawn += 1
    if curves and not drawn:
        # every norm inf or NaN (a run that overflowed at its first step): empty linear axes with a legend
        # of lines not drawn read as a broken plot (a teacher's review); say why, as draw_profile does
        steps = np.concatenate([np.asarray(c.x, dtype=float) for c in curves])
        ax.text(0.5, 0.5, "no finite gradient norm: it overflowed (inf or NaN)\nat every step recorded",
                transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.3")  # fmt: skip
        ax.set_yscale("log")
        if steps.size:
            ax.set_xlim(min(float(steps.min()), 0.0), max(float(steps.max()), 1.0))
    for t in thresholds:
        ax.axhline(t, color="k", ls=":", lw=0.8, label=f"clip threshold {t:g}")
    ax.set_xlabel("training step")
    integer_ticks(ax.xaxis)
    ax.set_ylabel("global gradient norm")
    ax.grid(alpha=0.3, which="both")


# One line style per profile state: h, the LSTM cell state c, and copy's total gradient h_total.
PROFILE_STYLES = (("h", "-", 1.6, ""), ("c", "--", 1.2, " (c)"), ("h_total", ":", 1.0, " (total)"))


def profile_figure(frame, title: str, window: tuple[int, int] | None = None, ylabel: str | None = None):
    """The profile figure of both paths: log10 ||dL/dh_t|| against t from a long-format frame (``step, t,
    state, log10_norm``), one line per state (:data:`PROFILE_STYLES`) at up to 6 training steps (the
    first, the last and evenly spaced between), ``window`` (a memory window) shaded."""
    fig, ax = run_figure(5.0, title)
    steps = sorted(frame["step"].unique()) if len(frame) else []
    if len(steps) > 6:
        idx = np.unique(np.linspace(0, len(steps) - 1, 6).round().astype(int))
        steps = [steps[i] for i in idx]
    cmap = plt.get_cmap("viridis")
    curves = []
    for i, s in enumerate(steps):
        for state, ls, lw, suffix in PROFILE_STYLES:
            sub = frame[(frame["step"] == s) & (frame["state"] == state)]
            if len(sub):
                color = cmap(i / max(len(steps) - 1, 1))
                curves.append(Curve(sub["t"], sub["log10_norm"], f"step {s}{suffix}", ls, lw, color))
    draw_profile(ax, curves, window)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig
