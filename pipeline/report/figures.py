"""Report figures (matplotlib, Agg): the phase diagram (drawn by :mod:`pipeline.report.phase`, its names
re-exported here), gradient profiles, gradient norms over training.

Every function takes the comparison table (:func:`pipeline.report.data.comparison_table`) and/or the
downloaded diagnostics frames and returns a matplotlib Figure; :mod:`pipeline.report.write` writes them as
PNG files and embeds them in the HTML as base64 (the report is one self-contained file).
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.names import DIVERGED
from pipeline.plots import (
    Curve,
    draw_grad_norms,
    draw_profile,
    panel_grid,
    plt,
    positive,
    run_summary,
    wrap_title,
)
from pipeline.report.phase import REGIME_COLORS, RING_PT, phase_diagram

__all__ = [
    "REGIME_COLORS",
    "RING_PT",
    "grad_norm_panels",
    "phase_diagram",
    "profile_panels",
    "theory_applies",
]

THEORY_INITS = ("gaussian", "orthogonal")  # mean-field ln g per step applies to tanh with these inits


def theory_applies(cell: str, init: str, g: float) -> bool:
    """Mean-field (Molgedey 1992; Chen, Pennington, Schoenholz 2018): a tanh RNN with W ~ N(0, g^2/H)
    (or g times an orthogonal matrix) has ||dL/dh_t|| shrinking by g per step going back, in the
    ordered phase g < 1."""
    return cell == "tanh" and init in THEORY_INITS and g is not None and 0 < g < 1


def _reason(r) -> str:
    """The rule that decided a run's verdict (tag ``regime_reason``), or "" (none fired, or a run recorded
    before the tag existed: NaN in the table)."""
    why = r.get("regime_reason")
    return why if isinstance(why, str) else ""


def _step(r) -> int | None:
    """A diverged run's ``diverged_step`` (tag), None when not recorded."""
    step = r.get("diverged_step")
    return int(step) if isinstance(step, (int, np.integer)) else None


def _summary(r) -> str:
    """A run's verdict and outcome (:func:`pipeline.plots.run_summary`), and for a pruned run the step it
    stopped at: its curves end there, which read as a run cut short for no reason (the phase diagram's
    triangle says it; a walkthrough found the line panels did not)."""
    text = run_summary(r["regime"], r["val_loss_ratio"], r["solved"], _reason(r), _step(r))
    if r.get("pruned") == "true" and r["regime"] != DIVERGED:
        steps = r.get("steps")
        text += f"; pruned at step {steps}" if isinstance(steps, (int, np.integer)) else "; pruned"
    return text


def _run_label(r) -> str:
    """A run in a legend: its init, g and lr, and the settings it differs in from the others reported."""
    settings = r.get("settings") or ""
    g = r["init_scale"]
    scale = f" g={g:.3g}" if g is not None and not (isinstance(g, float) and math.isnan(g)) else ""
    return f"{r['init']}{scale} lr={r['lr']:.3g}" + (f" {settings}" if settings else "")


def profile_panels(table, profiles: dict, task: str):
    """log10 ||dL/dh_t|| against t, per cell: at init (step 0, dashed) and at the end (last profile pass,
    solid) for the representative runs, with the mean-field line where it applies (dotted); an LSTM's
    cell-state path c (profile state ``c``) beside its h, dash-dot at the end, dotted at init."""
    sub = table[(table["task"] == task) & table["run_id"].isin(list(profiles))]
    panels = list(sub.groupby("cell", sort=True))
    if not panels:
        return None
    curves = [_profile_curves(grp, profiles, cell) for cell, grp in panels]
    fig, axes = panel_grid(
        len(panels), height=_panel_height([_lines(c.label for c in cs) for cs in curves]), max_cols=1
    )
    for ax, (cell, _), cs in zip(axes, panels, curves, strict=True):
        draw_profile(ax, cs)
        ax.set_title(f"{task}: {cell}", fontsize=10)
        _legend_below(ax)
    fig.suptitle(
        wrap_title(
            "Long-range gradient profiles (memory-window loss): at init (dashed) and end of training (solid)"
            + (
                "; LSTM cell state c: dotted (init), dash-dot (end)"
                if any(_has_c(cs) for cs in curves)
                else ""
            ),
            fig,
        ),
        fontsize=11,
    )
    return fig


# Profile states a report panel draws (README, "The MLflow record (public names)": the ``state`` column of
# diagnostics/bptt_profile.parquet): (state, label suffix, style at init, at the end). h: dashed at init,
# solid at the end; the LSTM cell state c: dotted at init, dash-dot at the end, in the run's colour.
PROFILE_STATES = (
    ("h", "", "--", "-"),
    ("c", " cell state c", ":", "-."),
)


def _has_c(curves: list[Curve]) -> bool:
    return any(" cell state c" in c.label for c in curves)


def _state_curves(prof, r, color, curves: list[Curve], state: tuple):
    """Append one profile state's curves of run ``r`` to ``curves``: at its first profile pass (init) and,
    if later, at its last; returns the first pass's rows (sorted by t), or None if the run has no profile
    of that state."""
    name, suffix, at_init, at_end = state
    prof = prof[prof["state"] == name]
    if prof.empty:
        return None
    first, last = prof["step"].min(), prof["step"].max()
    p0 = prof[prof["step"] == first].sort_values("t")
    lw = 1.2 if name == "h" else 1.0
    curves.append(Curve(p0["t"], p0["log10_norm"], f"{_run_label(r)}{suffix}: init", at_init, lw, color))
    if last != first:
        p1 = prof[prof["step"] == last].sort_values("t")
        label = f"{_run_label(r)}{suffix}: step {last} ({_summary(r)})"
        curves.append(Curve(p1["t"], p1["log10_norm"], label, at_end, lw + 0.4, color))
    return p0


def _profile_curves(grp, profiles: dict, cell: str) -> list[Curve]:
    """One panel's curves, per run: h at init (dashed) and at the end (solid), the LSTM's cell state c
    likewise (:data:`PROFILE_STATES`) and the mean-field line (dotted) where it applies."""
    cmap = plt.get_cmap("tab10")
    curves: list[Curve] = []
    for k, (_, r) in enumerate(grp.iterrows()):
        prof = profiles[r["run_id"]]
        color = cmap(k % 10)
        p0 = _state_curves(prof, r, color, curves, PROFILE_STATES[0])
        if p0 is None:
            continue
        _state_curves(prof, r, color, curves, PROFILE_STATES[1])  # the LSTM's cell state c, if recorded
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
LEGEND_LINE = 0.14  # inches per legend line at fontsize 6.5
# A legend entry's line, in characters: longer labels wrap. A run that differs in many settings (runs of
# several configs in one experiment) had labels of ~190 characters, and the legend squeezed each panel's
# axes to a sliver of the figure's width (a walkthrough).
LABEL_CHARS = 100


def _wrap(label: str) -> str:
    return textwrap.fill(
        label, LABEL_CHARS, subsequent_indent="    ", break_long_words=False, break_on_hyphens=False
    )


def _lines(labels) -> int:
    """The lines a panel's legend entries take, wrapped."""
    return sum(_wrap(x).count("\n") + 1 for x in labels)


def _panel_height(entries: list[int]) -> float:
    """A row's height: the axes with their labels, and room below for the longest legend of a panel
    (``entries``: each panel's legend lines, :func:`_lines`)."""
    longest = max(entries, default=0)
    return 2.7 + LEGEND_LINE * longest + (LEGEND_DROP / 72 if longest else 0.0)


def _legend_below(ax) -> None:
    """The legend under its panel's x label, not over the curves or the label (constrained layout makes
    the room: an axes' legend is part of its layout box)."""
    from matplotlib.transforms import offset_copy

    handles, labels = ax.get_legend_handles_labels()
    if handles:
        below = offset_copy(ax.transAxes, fig=ax.figure, y=-LEGEND_DROP, units="points")
        ax.legend(
            handles,
            [_wrap(x) for x in labels],
            fontsize=6.5,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            bbox_transform=below,
            ncol=1,
            frameon=False,
        )


def grad_norm_panels(table, norms: dict, task: str):
    """Global gradient norm over training per cell: before clipping (solid) and, for clipped runs,
    after (dashed) with the threshold (dotted). Without clipping the two are the same curve. A diverged
    run has an X in its colour where it diverged (:func:`_diverged_mark`), its step in the legend."""
    sub = table[(table["task"] == task) & table["run_id"].isin(list(norms))]
    panels = list(sub.groupby("cell", sort=True))
    if not panels:
        return None
    drawn = [_grad_norm_curves(grp, norms) for _, grp in panels]
    entries = [_lines([*(x.label for x in c), *(x.label for x in m)]) + len(t) for c, t, m in drawn]
    fig, axes = panel_grid(len(panels), height=_panel_height(entries), max_cols=1)
    for ax, (cell, _), (curves, thresholds, marks) in zip(axes, panels, drawn, strict=True):
        draw_grad_norms(ax, curves, sorted(thresholds))
        for m in marks:
            _draw_diverged(ax, m)
        ax.set_title(f"{task}: {cell}", fontsize=10)
        _legend_below(ax)
    title = "Gradient norm over training: before (solid) and after (dashed) clipping"
    if any(m for _, _, m in drawn):
        title += "; X: where a run diverged (its last finite norm, or the top edge if it had none)"
    fig.suptitle(wrap_title(title, fig), fontsize=11)
    return fig


@dataclass(frozen=True)
class Diverged:
    """Where a diverged run's X goes: its step, the norm (None: at the panel's top edge), colour, label."""

    step: int
    norm: float | None
    color: Any
    label: str


def _diverged_mark(r, df, color) -> Diverged | None:
    """A diverged run's X: at its diverged step (tag ``diverged_step``; if not recorded, its last step
    recorded) on the last finite pre-clip norm recorded up to that step, or, with none finite, at the
    panel's top edge. None for a run that did not diverge (regime ``diverged``)."""
    if r["regime"] != DIVERGED or not len(df):
        return None
    step = r.get("diverged_step")
    known = isinstance(step, (int, np.integer))
    steps = df["step"].to_numpy()
    at = int(step) if known else int(steps.max())
    ok = positive(df["norm_preclip"]) & (steps <= at)
    norm = float(df["norm_preclip"].to_numpy(dtype=float)[ok][np.argmax(steps[ok])]) if ok.any() else None
    what = f"diverged at step {at}" if known else f"diverged (step not recorded; last step {at})"
    return Diverged(at, norm, color, f"{_run_label(r)}: {what}")


def _draw_diverged(ax, m: Diverged) -> None:
    style = {"marker": "X", "ms": 10, "color": m.color, "mec": "k", "mew": 0.7, "ls": "", "zorder": 4}
    if m.norm is not None:
        ax.plot([m.step], [m.norm], label=m.label, **style)
    else:  # no finite norm to sit on: near the top edge (y in axes units), x the step
        ax.plot([m.step], [0.95], transform=ax.get_xaxis_transform(), label=m.label, **style)


def _grad_norm_curves(grp, norms: dict) -> tuple[list[Curve], set[float], list[Diverged]]:
    """One panel's curves (pre-clip, and post-clip for clipped runs), its clip thresholds and the X of
    each diverged run."""
    cmap = plt.get_cmap("tab10")
    curves, thresholds, marks = [], set(), []
    for k, (_, r) in enumerate(grp.iterrows()):
        df = norms[r["run_id"]]
        color = cmap(k % 10)
        clipped = r["clip"] != "none"
        for col, ls, what in (("norm_preclip", "-", "pre-clip"), ("norm_postclip", "--", "post-clip")):
            if col == "norm_postclip" and not clipped:
                continue
            ok = positive(df[col])
            # a run with no finite pre-clip norm (diverged at its first step) still hands its curve over:
            # drawn as nothing, it has the panel say why (draw_grad_norms), not show bare axes whose
            # ticks ran -0.04..0.04 (a review)
            if ok.any() or (col == "norm_preclip" and len(df)):
                label = (
                    f"{_run_label(r)} clip {r['clip']}"
                    + (f": {what}" if clipped else "")
                    + f" ({_summary(r)})"
                )
                curves.append(
                    Curve(df["step"], df[col], label, ls, 0.9, color, "." if ok.sum() < 4 else None)
                )
        if r["clip"].startswith("norm "):
            thresholds.add(float(r["clip"].split()[1]))
        mark = _diverged_mark(r, df, color)
        if mark is not None:
            marks.append(mark)
    return curves, thresholds, marks
