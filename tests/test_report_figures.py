"""The comparison report's figures and summary table on hand-built tables (no MLflow, no sweep): each
point, marker and line is where and what the docstrings say (``pipeline.report.figures``), and the
summary aggregates over seeds as documented (``pipeline.report.write.summary_table``)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.report import figures as rr


def _run(rid: str, lr: float, g: float, **kw) -> dict:
    """One row of the comparison table, with the columns the figures read."""
    return {
        "run_id": rid,
        "task": "adding",
        "cell": "tanh",
        "init": "gaussian",
        "init_scale": g,
        "lr": lr,
        "clip": "none",
        "settings": "",
        "regime": "healthy",
        "val_loss_ratio": 0.5,
        "val_accuracy": math.nan,
        "solved": "false",
        "diverged_step": None,
        "status": "FINISHED",
        "seed": 0,
    } | kw


def _points(fig) -> list[tuple[float, float]]:
    """Every phase-diagram point (one scatter collection per run) over all panels, in data units."""
    return [tuple(map(float, xy)) for ax in fig.axes for c in ax.collections for xy in c.get_offsets()]


def _collection_at(ax, lr: float, g: float):
    """The scatter collection of the point at (lr, g)."""
    hits = [c for c in ax.collections if np.allclose(c.get_offsets(), [[lr, g]])]
    assert len(hits) == 1, (lr, g, [c.get_offsets().tolist() for c in ax.collections])
    return hits[0]


def _marker_path(marker: str) -> np.ndarray:
    from matplotlib.markers import MarkerStyle

    m = MarkerStyle(marker)
    return m.get_path().transformed(m.get_transform()).vertices


def test_phase_points_sit_at_lr_and_g_inside_the_axes_limits():
    """The phase diagram is init scale g (y) against learning rate (x): a run's point is at (lr, g) in
    the axes' units and the axes' limits hold every run."""
    table = pd.DataFrame([_run("a", 1e-3, 0.5), _run("b", 3e-2, 2.0)])
    fig = rr.phase_diagram(table, "adding")
    (ax,) = fig.axes
    assert ax.get_xlabel() == "learning rate" and ax.get_ylabel() == "init scale g"
    assert sorted(_points(fig)) == [(1e-3, 0.5), (3e-2, 2.0)]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    for lr, g in _points(fig):
        assert x0 < lr < x1 and y0 < g < y1, ((lr, g), ax.get_xlim(), ax.get_ylim())


def test_each_tasks_phase_diagram_holds_only_its_own_runs():
    """One phase diagram per task: another task's runs (same cell and init) are not drawn in it."""
    table = pd.DataFrame(
        [
            _run("a1", 1e-3, 0.5),
            _run("a2", 1e-2, 1.0),
            _run("c1", 1e-3, 2.0, task="copy"),
            _run("c2", 1e-2, 0.5, task="copy"),
            _run("c3", 1e-1, 1.0, task="copy"),
        ]
    )
    adding = rr.phase_diagram(table, "adding")
    copy = rr.phase_diagram(table, "copy")
    assert sorted(_points(adding)) == [(1e-3, 0.5), (1e-2, 1.0)]
    assert sorted(_points(copy)) == [(1e-3, 2.0), (1e-2, 0.5), (1e-1, 1.0)]


def test_phase_markers_diverged_x_solved_star_else_circle():
    """Marker = diverged (X) / solved (star) / not solved (circle): an exploding run that did not diverge
    is a circle, a diverged run an X whatever its loss, a solved run a star (a larger one)."""
    table = pd.DataFrame(
        [
            _run("div", 1.0, 3.0, regime="diverged", val_loss_ratio=math.nan, diverged_step=7),
            _run("nostep", 1.0, 0.5, regime="diverged", val_loss_ratio=math.nan),  # its step not recorded
            _run("exp", 1e-1, 3.0, regime="exploding", val_loss_ratio=0.5),
            _run("sol", 1e-3, 1.0, regime="healthy", val_loss_ratio=0.02, solved="true"),
            _run("mid", 1e-2, 1.0, regime="vanishing", val_loss_ratio=0.5),
        ]
    ).astype({"diverged_step": "Int64"})  # as comparison_table types it
    fig = rr.phase_diagram(table, "adding")
    (ax,) = fig.axes
    want = {(1.0, 3.0): "X", (1.0, 0.5): "X", (1e-1, 3.0): "o", (1e-3, 1.0): "*", (1e-2, 1.0): "o"}
    for (lr, g), marker in want.items():
        path = _collection_at(ax, lr, g).get_paths()[0].vertices
        assert path.shape == _marker_path(marker).shape and np.allclose(path, _marker_path(marker)), (
            (lr, g),
            marker,
        )
    sizes = {k: float(_collection_at(ax, *k).get_sizes()[0]) for k in want}
    assert sizes[(1e-3, 1.0)] > sizes[(1e-2, 1.0)]  # the star is drawn larger than a circle
    texts = {t.get_text() for t in ax.texts}
    assert "div@7" in texts and "div" in texts  # a diverged run is labelled with its step, if recorded
    assert not [t for t in texts if "NA" in t or "nan" in t], texts  # it read div@<NA>


def test_profile_panel_dashed_is_init_and_solid_is_the_end():
    """Profiles: at init (step 0, dashed) and at the end (the last profile pass, solid)."""
    T = 10
    t = np.arange(1, T + 1)
    at = {0: -0.1 * (T - t), 50: -0.2 * (T - t) + 0.5, 100: -0.05 * (T - t) - 1.0}
    prof = pd.DataFrame(
        [(s, int(ti), "h", float(v)) for s in (100, 0, 50) for ti, v in zip(t, at[s], strict=True)],
        columns=["step", "t", "state", "log10_norm"],
    )
    table = pd.DataFrame([_run("a", 1e-2, 1.5, cell="gru")])  # gru: no mean-field line
    fig = rr.profile_panels(table, {"a": prof}, "adding")
    (ax,) = fig.axes
    lines = {ln.get_linestyle(): ln for ln in ax.get_lines()}
    assert sorted(lines) == ["-", "--"]
    assert np.allclose(lines["--"].get_xdata(), t) and np.allclose(lines["--"].get_ydata(), at[0])
    assert np.allclose(lines["-"].get_xdata(), t) and np.allclose(lines["-"].get_ydata(), at[100])
    assert lines["--"].get_label().endswith(": init")
    assert "step 100" in lines["-"].get_label()


@pytest.fixture
def three_seeds() -> pd.DataFrame:
    """One (task, cell, init, g, lr, clip) over three seeds: two solved, loss ratios 0.1, 0.2, 0.9."""
    return pd.DataFrame(
        [
            _run("s0", 1e-2, 1.0, seed=0, val_loss_ratio=0.1, solved="true", val_accuracy=0.9),
            _run("s1", 1e-2, 1.0, seed=1, val_loss_ratio=0.2, solved="true", val_accuracy=0.8),
            _run(
                "s2",
                1e-2,
                1.0,
                seed=2,
                val_loss_ratio=0.9,
                solved="false",
                val_accuracy=0.1,
                regime="exploding",
            ),
        ]
    )


def test_summary_table_counts_solved_and_takes_medians_over_seeds(three_seeds):
    from pipeline.report.write import summary_table

    (row,) = summary_table(three_seeds).to_dict("records")
    assert row["runs"] == 3
    assert row["solved"] == 2
    assert row["median_val_loss_ratio"] == pytest.approx(0.2)  # the mean would be 0.4
    assert row["median_val_accuracy"] == pytest.approx(0.8)
    assert row["regimes"] == "exploding 1, healthy 2"


def test_a_running_point_is_grey_and_says_so_and_a_pruned_one_is_a_triangle_with_its_steps():
    """A run still training is drawn grey with "running", whatever tags it holds so far (a RUNNING trial
    read as solved was a star); a pruned run is a triangle labelled with the steps it trained, not a
    finished-looking circle. Both have a legend entry."""
    from matplotlib.colors import to_rgba

    table = pd.DataFrame(
        [
            _run("run", 1e-3, 1.0, regime="healthy", solved="true", val_loss_ratio=0.01, status="RUNNING"),
            _run("pru", 1e-2, 1.0, regime="healthy", val_loss_ratio=0.9, pruned="true", steps=150),
            _run("fin", 1e-1, 1.0, regime="healthy", val_loss_ratio=0.5),
        ]
    ).astype({"steps": "Int64"})
    fig = rr.phase_diagram(table, "adding")
    (ax,) = fig.axes
    running, pruned = _collection_at(ax, 1e-3, 1.0), _collection_at(ax, 1e-2, 1.0)
    assert np.allclose(running.get_facecolor()[0], to_rgba(rr.REGIME_COLORS[None]))
    assert np.allclose(running.get_paths()[0].vertices, _marker_path("o"))
    assert np.allclose(pruned.get_paths()[0].vertices, _marker_path("v"))
    assert {"running", "pruned@150", "0.5"} <= {t.get_text() for t in ax.texts}
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {"no verdict (running, failed)", "pruned (steps trained)"} <= legend


def test_coincident_runs_are_spread_on_screen_and_keep_their_lr_and_g():
    """Two seeds at one (lr, g): each keeps its (lr, g) in the data, and on screen they sit RING_PT points
    either side (a ring of 10^0.12 in lr drew lr 0.001 at 0.00076 and 0.0013; a teacher's review)."""
    table = pd.DataFrame([_run("a", 1e-3, 0.5, seed=0), _run("b", 1e-3, 0.5, seed=1), _run("c", 1e-2, 1.0)])
    fig = rr.phase_diagram(table, "adding")
    assert sorted(_points(fig)) == [(1e-3, 0.5), (1e-3, 0.5), (1e-2, 1.0)]
    fig.canvas.draw()
    (ax,) = fig.axes
    px = {}
    for c in ax.collections:
        (xy,) = c.get_offsets()
        px.setdefault(tuple(map(float, xy)), []).append(c.get_offset_transform().transform(xy))
    (a, b), (alone,) = px[(1e-3, 0.5)], px[(1e-2, 1.0)]
    points = fig.dpi / 72
    assert np.hypot(*(a - b)) == pytest.approx(2 * rr.RING_PT * points, rel=1e-6)
    assert np.allclose(alone, ax.transData.transform((1e-2, 1.0)))  # a point alone is not moved
    fig.clf()
