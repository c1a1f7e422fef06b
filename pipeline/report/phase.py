"""The report's phase diagram: init scale g against learning rate, one panel per (cell, init), each run a
point coloured by its regime (README, "What the report shows"), its label placed clear of the other
points and labels of its panel (:class:`LabelPlacer`).

Re-exported by :mod:`pipeline.report.figures`, where the report's other figures are.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.artist import Artist
from matplotlib.ticker import NullLocator
from matplotlib.transforms import Bbox

from pipeline.names import DIVERGED, EXPLODING, HEALTHY, VANISHING
from pipeline.plots import LEARNED_NOTHING, outcome, panel_grid, wrap_title

REGIME_COLORS = {
    VANISHING: "#1f77b4",
    HEALTHY: "#2ca02c",
    EXPLODING: "#ff7f0e",
    DIVERGED: "#d62728",
    None: "#9e9e9e",
}

RING_PT = 7.0  # radius, in points, of the ring coincident runs are spread on


def _ring(x: np.ndarray, y: np.ndarray) -> list[tuple[float, float]]:
    """Runs at the same (lr, g) in one panel (seeds, clip settings) are spread on a small ring, so none
    hides another: each point's offset in points. On screen, not in the data: a ring of 10^0.12 in lr
    drew two runs at lr 0.001 at 0.00076 and 0.0013, nearer a 1.5x grid's next column (a teacher's
    review); each point keeps its (lr, g)."""
    keys: dict[tuple[float, float], list[int]] = {}
    for i, k in enumerate(zip(np.round(x.astype(float), 12), np.round(y.astype(float), 12), strict=True)):
        keys.setdefault(k, []).append(i)
    out = [(0.0, 0.0)] * len(x)
    for idx in keys.values():
        if len(idx) > 1:
            for j, i in enumerate(idx):
                a = 2 * math.pi * j / len(idx)
                out[i] = (RING_PT * math.cos(a), RING_PT * math.sin(a))
    return out


def _limits(values) -> tuple[float, float]:
    v = values[(values > 0) & values.notna()]
    if v.empty:
        return 0.1, 10.0
    lo, hi = float(v.min()), float(v.max())
    return lo / 2.2, hi * 2.2


# A phase panel's axes (4.2 x 3.6 in figure cells, constrained layout): about 3.4 in of x axis and 2.2 in
# of y axis; a tick label at fontsize 10 is about 0.075 in a character wide and 0.14 in high.
X_AXIS_IN, Y_AXIS_IN, CHAR_IN, LINE_IN, GAP_IN = 3.4, 2.2, 0.075, 0.14, 0.08


def _value_ticks(axis, values, horizontal: bool) -> None:
    """A grid sweep (values at least 1.5x apart) gets ticks at its own values; sampled values (TPE) get
    log ticks: 1-2-5 per decade, else 1-3, else decades, the first whose labels do not run into each
    other on the axis (1-2-5 labels over the default sweep's 3.5 decades of learning rate read
    "0.00020.00050.001"); a grid too dense for its labels gets the log ticks too. Labels plain, 3
    significant digits: 0.01, 0.5, 3."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    lo, hi = _limits(values)
    span = math.log10(hi / lo)  # decades on the axis

    def fits(ticks: np.ndarray) -> bool:
        """Whether labels at ``ticks`` (sorted) leave a gap between neighbours."""
        if len(ticks) < 2:
            return True
        gap = float(np.log10(ticks[1:] / ticks[:-1]).min()) / span * (X_AXIS_IN if horizontal else Y_AXIS_IN)
        size = max(len(f"{t:.3g}") for t in ticks) * CHAR_IN if horizontal else LINE_IN
        return gap >= size + GAP_IN

    def log_ticks(subs: tuple[float, ...]) -> np.ndarray:
        e = np.arange(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        t = np.sort((np.asarray(subs)[:, None] * 10.0 ** e[None, :]).ravel())
        return t[(t >= lo) & (t <= hi)]

    v = np.unique(values[(values > 0) & values.notna()].to_numpy(dtype=float))
    grid = len(v) > 0 and (len(v) == 1 or (v[1:] / v[:-1]).min() >= 1.5) and fits(v)
    subs = next((sb for sb in ((1.0, 2.0, 5.0), (1.0, 3.0)) if fits(log_ticks(sb))), (1.0,))
    axis.set_major_locator(FixedLocator(v.tolist()) if grid else LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.3g}"))
    axis.set_minor_formatter(NullFormatter())


def _marker(r) -> tuple[str, int, str]:
    """Marker, size and label of one run: still running (a grey circle, whatever its tags say so far),
    diverged (X, the step), pruned (a triangle, the steps it trained), solved (star), else a circle."""
    if r.get("status") == "RUNNING":
        return "o", 90, "running"
    if r["regime"] == DIVERGED:
        step = r["diverged_step"]  # Int64 in the table: a missing step is pd.NA, not None
        return "X", 110, f"div@{step}" if isinstance(step, (int, np.integer)) else "div"
    if r.get("pruned") == "true":
        steps = r.get("steps")
        return "v", 110, f"pruned@{steps}" if isinstance(steps, (int, np.integer)) else "pruned"
    if r["solved"] == "true":
        return "*", 220, f"{r['val_loss_ratio']:.2g}"
    text = f"{r['val_loss_ratio']:.2g}" if not np.isnan(r["val_loss_ratio"]) else r["status"] or "?"
    return "o", 90, text


def _phase_points(ax, grp) -> None:
    """The runs of one (cell, init) panel at (lr, g): colour = regime, hollow = learned nothing; each label
    placed at draw time clear of the panel's markers and other labels (:class:`LabelPlacer`)."""
    from matplotlib.transforms import offset_copy

    x, y = grp["lr"].to_numpy(dtype=float), grp["init_scale"].to_numpy(dtype=float)
    if len(grp) > LABELLED_RUNS:
        _dense_points(ax, grp, x, y)
        return
    markers, labels = [], []
    for xi, yi, (dx, dy), (_, r) in zip(x, y, _ring(x, y), grp.iterrows(), strict=True):
        at = offset_copy(ax.transData, fig=ax.figure, x=dx, y=dy, units="points")
        regime = r["regime"] if r["regime"] in REGIME_COLORS and r.get("status") != "RUNNING" else None
        color = REGIME_COLORS[regime]
        marker, size, text = _marker(r)
        if regime != DIVERGED and outcome(r["val_loss_ratio"], r["solved"]) == "learned nothing":
            # hollow: whatever the gradients did, the loss stayed at the baseline
            style = {"facecolors": "white", "edgecolors": color, "linewidths": 2.2}
        else:
            style = {"c": color, "edgecolors": "k", "linewidths": 0.6}
        dot = ax.scatter([xi], [yi], marker=marker, s=size, zorder=3, transform=at, **style)
        markers.append((dot, math.sqrt(size) / 2))
        ann = ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(dx, dy), fontsize=7)
        labels.append((ann, (dx, dy), math.sqrt(size) / 2))
    if labels:
        ax.add_artist(LabelPlacer(markers, labels))


LABELLED_RUNS = 40  # a panel with more runs is drawn dense: no labels, smaller see-through markers


def _dense_points(ax, grp, x: np.ndarray, y: np.ndarray) -> None:
    """A panel of more than LABELLED_RUNS runs (a study of thousands of trials): one scatter per (marker,
    colour, hollow) group, not one per run (9.5 s of a 5,000-run report, then a wall of opaque circles
    in which the one run that learned was hard to find; benchmarks/report_scale.py), with markers a quarter of the
    area and half opaque, so that density shows; no labels, and a note that says so."""
    groups: dict[tuple, list[int]] = {}
    for i, (_, r) in enumerate(grp.iterrows()):
        regime = r["regime"] if r["regime"] in REGIME_COLORS and r.get("status") != "RUNNING" else None
        marker, size, _ = _marker(r)
        hollow = regime != DIVERGED and outcome(r["val_loss_ratio"], r["solved"]) == "learned nothing"
        groups.setdefault((marker, size, regime, hollow), []).append(i)
    # solved stars and diverged crosses drawn last: over the crowd
    for (marker, size, regime, hollow), idx in sorted(groups.items(), key=lambda kv: kv[0][0] in "*X"):
        color = REGIME_COLORS[regime]
        style = (
            {"facecolors": "none", "edgecolors": color, "linewidths": 1.2}
            if hollow
            else {"c": color, "edgecolors": "k", "linewidths": 0.3}
        )
        ax.scatter(x[idx], y[idx], marker=marker, s=size / 4, alpha=0.5, zorder=3, **style)
    ax.text(0.02, 0.02, f"{len(grp)} runs: no labels", transform=ax.transAxes, fontsize=7, color="0.3")


LABEL_GAP_PT = 2.0  # between a marker's edge (and its outline) and its label
LABEL_PAD_PT = 1.0  # around a label's text: two labels closer than this read as one


def _candidates(r: float) -> list[tuple[float, float, str, str]]:
    """Where a label may go around a marker of radius ``r`` points: (dx, dy) in points from the marker's
    centre and the text's alignment there: above, below, right, left, the four diagonals, then the same
    one label height further out."""
    out = []
    for far in (0.0, 9.0):
        d = r + LABEL_GAP_PT + far  # diagonals as far on both axes: markers are kept clear of as squares
        out += [
            (0.0, d, "center", "bottom"),
            (0.0, -d, "center", "top"),
            (d, 0.0, "left", "center"),
            (-d, 0.0, "right", "center"),
            (d, d, "left", "bottom"),
            (-d, d, "right", "bottom"),
            (d, -d, "left", "top"),
            (-d, -d, "right", "top"),
        ]
    return out


def _overlap(a: Bbox, b: Bbox) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


class LabelPlacer(Artist):
    """Places a panel's point labels when the figure is drawn, when the axes' place on screen is final
    (constrained layout moves the axes at draw time): greedily, in the runs' order, each label at the
    first of :func:`_candidates` that overlaps no marker of the panel, no label already placed and does
    not leave the axes; else at the candidate of least overlap. Draws nothing itself; it is drawn before
    the labels (a lower zorder). Index-parity offsets (9 pt above, 15 pt below) put labels on
    neighbouring markers and labels in crowded panels (tests/test_report_figures.py)."""

    def __init__(self, markers: list, labels: list) -> None:
        super().__init__()
        self.markers = markers  # (scatter collection, radius in points)
        self.labels = labels  # (annotation, ring offset in points, its marker's radius in points)
        self.set_zorder(0)
        self.set_in_layout(False)

    def draw(self, renderer) -> None:
        if self.axes is None or not self.get_visible():
            return
        px = renderer.points_to_pixels(1.0)
        obstacles = []
        for dot, r in self.markers:
            cx, cy = dot.get_offset_transform().transform(dot.get_offsets()[0])
            h = (r + LABEL_GAP_PT / 2) * px
            obstacles.append(Bbox.from_extents(cx - h, cy - h, cx + h, cy + h))
        frame = self.axes.bbox
        for ann, (dx, dy), r in self.labels:
            best: tuple[float, tuple, Bbox] | None = None
            for ox, oy, ha, va in _candidates(r):
                ann.xyann = (dx + ox, dy + oy)
                ann.set_horizontalalignment(ha)
                ann.set_verticalalignment(va)
                box = ann.get_window_extent(renderer).padded(LABEL_PAD_PT * px)
                outside = box.width * box.height - _overlap(box, frame)
                cost = outside + sum(_overlap(box, o) for o in obstacles)
                if best is None or cost < best[0]:
                    best = (cost, (ox, oy, ha, va), box)
                if cost == 0:
                    break
            assert best is not None
            ox, oy, ha, va = best[1]
            ann.xyann = (dx + ox, dy + oy)
            ann.set_horizontalalignment(ha)
            ann.set_verticalalignment(va)
            obstacles.append(best[2])


def _phase_legend() -> list:
    from matplotlib.lines import Line2D

    handles = [
        Line2D(
            [], [], ls="", marker="o", color=c, markeredgecolor="k", label=k or "no verdict (running, failed)"
        )
        for k, c in REGIME_COLORS.items()
    ]
    return handles + [
        Line2D([], [], ls="", marker="*", color="w", markeredgecolor="k", markersize=11, label="solved"),
        Line2D([], [], ls="", marker="X", color="w", markeredgecolor="k", label="diverged (step)"),
        Line2D([], [], ls="", marker="v", color="w", markeredgecolor="k", label="pruned (steps trained)"),
        Line2D(
            [],
            [],
            ls="",
            marker="o",
            color="w",
            markeredgecolor="#555",
            markeredgewidth=2,
            label=f"hollow: learned nothing (val loss >= {LEARNED_NOTHING:g} x baseline)",
        ),
    ]


def phase_diagram(table, task: str):
    """Init scale g against learning rate, one panel per (cell, init); colour = regime, marker = solved
    (star) / not solved (circle) / diverged (X), label = final val loss / baseline or the diverged step."""
    sub = table[table["task"] == task]
    panels = list(sub.groupby(["cell", "init"], sort=True, dropna=False))
    fig, axes = panel_grid(len(panels))
    # one scale for every panel, so that a point's place means the same (lr, g) across cells
    xlim, ylim = _limits(sub["lr"]), _limits(sub["init_scale"])
    for ax, ((cell, init), grp) in zip(axes, panels, strict=True):
        no_g = len(grp) > 0 and grp["init_scale"].isna().all()  # indrnn's default u, the modern cells' inits
        if no_g:  # by learning rate alone, on a line across the panel (a panel of a note only hid them all)
            _phase_points(ax, grp[grp["lr"].notna()].assign(init_scale=math.sqrt(ylim[0] * ylim[1])))
            why = f"no init scale g: {cell} at init {init} keeps its own init;\nits {len(grp)} run(s) by learning rate"
            ax.text(0.5, 0.97, why, transform=ax.transAxes, ha="center", va="top", fontsize=7.5, color="0.3")
        else:
            _phase_points(ax, grp[grp["lr"].notna() & grp["init_scale"].notna()])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        _value_ticks(ax.xaxis, sub["lr"], horizontal=True)
        if no_g:
            ax.yaxis.set_major_locator(NullLocator())
            ax.yaxis.set_minor_locator(NullLocator())
        else:
            _value_ticks(ax.yaxis, sub["init_scale"], horizontal=False)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("(no g)" if no_g else "init scale g")
        ax.set_title(f"{cell} / {init}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    handles = _phase_legend()
    fig.legend(
        handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False
    )
    title = (
        f"Phase diagram, {task}: gradient regime after training (colour) by init scale and learning rate; "
        "labels: final val loss / baseline"
    )
    fig.suptitle(wrap_title(title, fig), fontsize=11)
    return fig
