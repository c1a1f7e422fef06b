"""Report figures (matplotlib, Agg): the phase diagram, gradient profiles, gradient norms over training.

Every function takes the comparison table (:func:`pipeline.report.data.comparison_table`) and/or the
downloaded diagnostics frames and returns a matplotlib Figure; :mod:`pipeline.report.write` writes them as
PNG files and embeds them in the HTML as base64 (the report is one self-contained file).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.names import DIVERGED, EXPLODING, HEALTHY, VANISHING
from pipeline.plots import (
    LEARNED_NOTHING,
    MIN_WIDTH,
    Curve,
    draw_grad_norms,
    draw_profile,
    outcome,
    plt,
    positive,
    run_summary,
    wrap_title,
)

REGIME_COLORS = {
    VANISHING: "#1f77b4",
    HEALTHY: "#2ca02c",
    EXPLODING: "#ff7f0e",
    DIVERGED: "#d62728",
    None: "#9e9e9e",
}
THEORY_INITS = ("gaussian", "orthogonal")  # mean-field ln g per step applies to tanh with these inits


def _grid(n: int, width: float = 4.2, height: float = 3.6, max_cols: int = 3):
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


def theory_applies(cell: str, init: str, g: float) -> bool:
    """Mean-field (Molgedey 1992; Chen, Pennington, Schoenholz 2018): a tanh RNN with W ~ N(0, g^2/H)
    (or g times an orthogonal matrix) has ||dL/dh_t|| shrinking by g per step going back, in the
    ordered phase g < 1."""
    return cell == "tanh" and init in THEORY_INITS and g is not None and 0 < g < 1


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
    """The runs of one (cell, init) panel at (lr, g): colour = regime, hollow = learned nothing."""
    from matplotlib.transforms import offset_copy

    x, y = grp["lr"].to_numpy(dtype=float), grp["init_scale"].to_numpy(dtype=float)
    label_points = len(grp) <= 40
    for k, (xi, yi, (dx, dy), (_, r)) in enumerate(zip(x, y, _ring(x, y), grp.iterrows(), strict=True)):
        at = offset_copy(ax.transData, fig=ax.figure, x=dx, y=dy, units="points")
        regime = r["regime"] if r["regime"] in REGIME_COLORS and r.get("status") != "RUNNING" else None
        color = REGIME_COLORS[regime]
        marker, size, text = _marker(r)
        if regime != DIVERGED and outcome(r["val_loss_ratio"], r["solved"]) == "learned nothing":
            # hollow: whatever the gradients did, the loss stayed at the baseline
            ax.scatter(
                [xi],
                [yi],
                facecolors="white",
                edgecolors=color,
                marker=marker,
                s=size,
                linewidths=2.2,
                zorder=3,
                transform=at,
            )
        else:
            ax.scatter(
                [xi],
                [yi],
                c=color,
                marker=marker,
                s=size,
                edgecolors="k",
                linewidths=0.6,
                zorder=3,
                transform=at,
            )
        if label_points:
            ax.annotate(
                text,
                (xi, yi),
                textcoords="offset points",
                xytext=(dx, dy + (9 if k % 2 == 0 else -15)),
                ha="center",
                fontsize=7,
            )


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
    fig, axes = _grid(len(panels))
    # one scale for every panel, so that a point's place means the same (lr, g) across cells
    xlim, ylim = _limits(sub["lr"]), _limits(sub["init_scale"])
    for ax, ((cell, init), grp) in zip(axes, panels, strict=True):
        _phase_points(ax, grp[grp["lr"].notna() & grp["init_scale"].notna()])
        if len(grp) and grp["init_scale"].isna().all():  # indrnn's default u, the modern cells' own inits
            why = f"{len(grp)} run(s): no init scale g\n({cell} at init {init} keeps its own init)"
            ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.3")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        _value_ticks(ax.xaxis, sub["lr"], horizontal=True)
        _value_ticks(ax.yaxis, sub["init_scale"], horizontal=False)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("init scale g")
        ax.set_title(f"{cell} / {init}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    handles = _phase_legend()
    fig.legend(
        handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False
    )
    title = (
        f"Phase diagram, {task}: gradient regime (colour) by init scale and learning rate; "
        "labels: final val loss / baseline"
    )
    fig.suptitle(wrap_title(title, fig), fontsize=11)
    return fig


def _run_label(r) -> str:
    """A run in a legend: its init, g and lr, and the settings it differs in from the others reported."""
    settings = r.get("settings") or ""
    g = r["init_scale"]
    scale = f" g={g:.3g}" if g is not None and not (isinstance(g, float) and math.isnan(g)) else ""
    return f"{r['init']}{scale} lr={r['lr']:.3g}" + (f" {settings}" if settings else "")


def profile_panels(table, profiles: dict, task: str):
    """log10 ||dL/dh_t|| against t, per cell: at init (step 0, dashed) and at the end (last profile pass,
    solid) for the representative runs, with the mean-field line where it applies (dotted)."""
    sub = table[(table["task"] == task) & table["run_id"].isin(list(profiles))]
    panels = list(sub.groupby("cell", sort=True))
    if not panels:
        return None
    curves = [_profile_curves(grp, profiles, cell) for cell, grp in panels]
    fig, axes = _grid(len(panels), height=_panel_height([len(cs) for cs in curves]), max_cols=1)
    for ax, (cell, _), cs in zip(axes, panels, curves, strict=True):
        draw_profile(ax, cs)
        ax.set_title(f"{task}: {cell}", fontsize=10)
        _legend_below(ax)
    fig.suptitle(
        wrap_title(
            "Long-range gradient profiles (memory-window loss): at init (dashed) and end of training (solid)",
            fig,
        ),
        fontsize=11,
    )
    return fig


def _profile_curves(grp, profiles: dict, cell: str) -> list[Curve]:
    """One panel's curves, per run: at init (dashed), at the end (solid) and the mean-field line (dotted)
    where it applies."""
    cmap = plt.get_cmap("tab10")
    curves = []
    for k, (_, r) in enumerate(grp.iterrows()):
        prof = profiles[r["run_id"]]
        prof = prof[prof["state"] == "h"]
        if prof.empty:
            continue
        color = cmap(k % 10)
        first, last = prof["step"].min(), prof["step"].max()
        p0 = prof[prof["step"] == first].sort_values("t")
        p1 = prof[prof["step"] == last].sort_values("t")
        curves.append(Curve(p0["t"], p0["log10_norm"], f"{_run_label(r)}: init", "--", 1.2, color))
        if last != first:
            summary = run_summary(r["regime"], r["val_loss_ratio"], r["solved"])
            curves.append(
                Curve(p1["t"], p1["log10_norm"], f"{_run_label(r)}: step {last} ({summary})", "-", 1.6, color)
            )
        g = r["init_scale"]
        if theory_applies(cell, r["init"], g) and len(p0):
            T = int(p0["t"].max())
            anchor = float(p0.loc[p0["t"] == T, "log10_norm"].iloc[0])
            t = np.arange(1, T + 1)
            curves.append(
                Curve(
                    t,
                    anchor + (T - t) * math.log10(g),
                    # the run's colour (black lines read as the other run's: a teacher's review), and the
                    # slope in the axis's own unit, decades per step (log10 g; ln g was 2.3x the drawn slope)
                    f"{_run_label(r)}: mean-field theory, {math.log10(g):+.2f} decades/step",
                    ":",
                    1.0,
                    color,
                )
            )
    return curves


# Points between a panel's lower edge and its legend: the tick labels and the x label (10 pt each, their
# pads) above it. The labels of these panels are long (a run's settings and outcome, up to ~100
# characters): side by side, two columns' legends ran into each other and over the x labels, so these
# figures have one panel per row, each with its legend below.
LEGEND_DROP = 36
LEGEND_LINE = 0.14  # inches per legend entry at fontsize 6.5


def _panel_height(entries: list[int]) -> float:
    """A row's height: the axes with their labels, and room below for the longest legend of a panel
    (``entries``: each panel's legend entries)."""
    longest = max(entries, default=0)
    return 2.7 + LEGEND_LINE * longest + (LEGEND_DROP / 72 if longest else 0.0)


def _legend_below(ax) -> None:
    """The legend under its panel's x label, not over the curves or the label (constrained layout makes
    the room: an axes' legend is part of its layout box)."""
    from matplotlib.transforms import offset_copy

    if ax.get_legend_handles_labels()[0]:
        below = offset_copy(ax.transAxes, fig=ax.figure, y=-LEGEND_DROP, units="points")
        ax.legend(
            fontsize=6.5,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            bbox_transform=below,
            ncol=1,
            frameon=False,
        )


def grad_norm_panels(table, norms: dict, task: str):
    """Global gradient norm over training per cell: before clipping (solid) and, for clipped runs,
    after (dashed) with the threshold (dotted). Without clipping the two are the same curve."""
    sub = table[(table["task"] == task) & table["run_id"].isin(list(norms))]
    panels = list(sub.groupby("cell", sort=True))
    if not panels:
        return None
    drawn = [_grad_norm_curves(grp, norms) for _, grp in panels]
    fig, axes = _grid(len(panels), height=_panel_height([len(c) + len(t) for c, t in drawn]), max_cols=1)
    for ax, (cell, _), (curves, thresholds) in zip(axes, panels, drawn, strict=True):
        draw_grad_norms(ax, curves, sorted(thresholds))
        ax.set_title(f"{task}: {cell}", fontsize=10)
        _legend_below(ax)
    fig.suptitle(
        wrap_title("Gradient norm over training: before (solid) and after (dashed) clipping", fig),
        fontsize=11,
    )
    return fig


def _grad_norm_curves(grp, norms: dict) -> tuple[list[Curve], set[float]]:
    """One panel's curves (pre-clip, and post-clip for clipped runs) and its clip thresholds."""
    cmap = plt.get_cmap("tab10")
    curves, thresholds = [], set()
    for k, (_, r) in enumerate(grp.iterrows()):
        df = norms[r["run_id"]]
        color = cmap(k % 10)
        clipped = r["clip"] != "none"
        for col, ls, what in (("norm_preclip", "-", "pre-clip"), ("norm_postclip", "--", "post-clip")):
            if col == "norm_postclip" and not clipped:
                continue
            ok = positive(df[col])
            if ok.any():
                label = (
                    f"{_run_label(r)} clip {r['clip']}"
                    + (f": {what}" if clipped else "")
                    + f" ({run_summary(r['regime'], r['val_loss_ratio'], r['solved'])})"
                )
                curves.append(
                    Curve(df["step"], df[col], label, ls, 0.9, color, "." if ok.sum() < 4 else None)
                )
        if r["clip"].startswith("norm "):
            thresholds.add(float(r["clip"].split()[1]))
    return curves, thresholds
