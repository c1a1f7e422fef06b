"""The comparison report's figures and summary table on hand-built tables (no MLflow, no sweep): each
point, marker and line is where and what the docstrings say (``pipeline.report.figures``), and the
summary aggregates over seeds as documented (``pipeline.report.write.summary_table``)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.report import figures as rr


@pytest.fixture(autouse=True)
def _close_figures():
    """The figure functions hand their figures to the caller (the report saves and closes them): close
    what each test drew, or pyplot keeps them all and warns past 20 open figures."""
    yield
    rr.plt.close("all")


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
    # the rule that decided the verdict (tag regime_reason) is in the legend, after the regime
    why = "pre-clip norm 4.05e+04 > explode_norm 1000"
    table = pd.DataFrame([_run("a", 1e-2, 1.5, cell="gru", regime="exploding", regime_reason=why)])
    (ax,) = rr.profile_panels(table, {"a": prof}, "adding").axes
    end = next(ln for ln in ax.get_lines() if ln.get_linestyle() == "-")
    assert f"(exploding gradients ({why}); val loss " in end.get_label(), end.get_label()


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


def test_a_pruned_runs_curves_say_where_it_was_pruned_in_both_line_panels():
    """A pruned run's norm and profile curves end at the step the pruner stopped it: their legend says so
    (the line panels read as a run cut short for no reason; the phase diagram's triangle said it). A run
    that was not pruned says nothing of the kind, nor does a pruned one whose steps went unrecorded."""
    steps = np.arange(1, 151)
    norms = {
        "pru": pd.DataFrame({"step": steps, "norm_preclip": 2.0, "norm_postclip": 2.0}),
        "fin": pd.DataFrame({"step": np.arange(1, 301), "norm_preclip": 1.0, "norm_postclip": 1.0}),
        "old": pd.DataFrame({"step": steps, "norm_preclip": 3.0, "norm_postclip": 3.0}),
    }
    t = np.arange(1, 11)
    prof = pd.DataFrame(
        [(s, int(ti), "h", -0.1 * float(10 - ti)) for s in (0, 150) for ti in t],
        columns=["step", "t", "state", "log10_norm"],
    )
    table = pd.DataFrame(
        [
            _run("pru", 1e-2, 1.0, val_loss_ratio=0.9, pruned="true", steps=150),
            _run("fin", 1e-1, 1.0, pruned="false", steps=300),
            _run("old", 1e-3, 1.0, pruned="true", steps=pd.NA),
        ]
    ).astype({"steps": "Int64"})
    (ax,) = rr.grad_norm_panels(table, norms, "adding").axes
    labels = {ln.get_label().split(" clip ")[0]: ln.get_label() for ln in ax.get_lines()}
    assert labels["gaussian g=1 lr=0.01"].endswith(
        "; val loss 0.9 x baseline: learned nothing; pruned at step 150)"
    )
    assert "pruned" not in labels["gaussian g=1 lr=0.1"]
    assert labels["gaussian g=1 lr=0.001"].endswith("; pruned)")
    (ax,) = rr.profile_panels(table.iloc[:1], {"pru": prof}, "adding").axes
    end = next(ln for ln in ax.get_lines() if ln.get_linestyle() == "-")
    assert end.get_label().startswith("gaussian g=1 lr=0.01: step 150 (")
    assert end.get_label().endswith("; pruned at step 150)"), end.get_label()


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


def _crowded() -> pd.DataFrame:
    """One panel of 28 runs: a 6 x 4 grid in (lr, g) at 1.6x and 1.25x apart (neighbours about 20 points
    apart on screen), every fourth diverged (labels "div@10xx", wider than the gap between two columns),
    two more seeds at the first point (a ring of three) and a pair 1.15x apart in lr."""
    rows, k = [], 0
    for lr in (1e-3, 1.6e-3, 2.5e-3, 4e-3, 6.4e-3, 1e-2):
        for g in (0.8, 1.0, 1.25, 1.6):
            k += 1
            regime = ("vanishing", "healthy", "exploding", "diverged")[k % 4]
            step = 1000 + k if regime == "diverged" else None
            rows.append(_run(f"r{k}", lr, g, regime=regime, val_loss_ratio=0.1 + k / 100, diverged_step=step))
    rows += [_run("s1", 1e-3, 0.8, seed=1, val_loss_ratio=0.456), _run("s2", 1e-3, 0.8, seed=2)]
    # two runs side by side, closer than a label is wide: both labels above would overlap each other
    rows += [_run("p1", 2e-3, 0.5, val_loss_ratio=0.611), _run("p2", 2.3e-3, 0.5, val_loss_ratio=0.622)]
    return pd.DataFrame(rows).astype({"diverged_step": "Int64"})


def _label_and_marker_boxes(fig, ax):
    """Each run's label box and marker box in pixels (one scatter and one annotation per run, in order),
    read back from the drawn figure: the label's window extent, the marker's place on screen (its offset
    transform, the coincident runs' ring included) and its size (s is the area in points^2)."""
    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t.get_window_extent(renderer) for t in ax.texts]
    markers = []
    for c in ax.collections:
        cx, cy = c.get_offset_transform().transform(c.get_offsets()[0])
        h = math.sqrt(float(c.get_sizes()[0])) / 2 * fig.dpi / 72
        markers.append(Bbox.from_extents(cx - h, cy - h, cx + h, cy + h))
    assert len(labels) == len(markers) == len(ax.collections)
    return labels, markers


@pytest.mark.parametrize("dpi", [100, 170])
def test_phase_labels_overlap_no_other_label_and_no_other_runs_marker(dpi):
    """A crowded panel: no label's box overlaps another label's or another run's marker, each lies inside
    the axes, and each sits next to its own marker (labels 9 pt above / 15 pt below by index parity sat on
    neighbours' markers and labels; a teacher's review). Placed at draw time, after constrained layout has
    moved the axes, and again at the saved resolution."""
    table = _crowded()
    fig = rr.phase_diagram(table, "adding")
    fig.set_dpi(dpi)
    (ax,) = fig.axes
    labels, markers = _label_and_marker_boxes(fig, ax)
    assert {t.get_text() for t in ax.texts} >= {"div@1003", "0.46", "0.11"}
    frame = ax.get_window_extent()
    for i, box in enumerate(labels):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        for j, other in enumerate(labels):
            assert j == i or not box.overlaps(other), (ax.texts[i].get_text(), ax.texts[j].get_text())
        for j, m in enumerate(markers):
            assert j == i or not box.overlaps(m), (ax.texts[i].get_text(), j)
        # next to its own marker: within a label's height and width of it
        near = markers[i].padded(box.height + box.width)
        assert near.overlaps(box), ax.texts[i].get_text()
    fig.clf()


def _lstm_and_tanh_profiles():
    T = 12
    t = np.arange(1, T + 1)
    want = {
        ("h", 0): -0.1 * (T - t),
        ("h", 200): -0.3 * (T - t),
        ("c", 0): -0.02 * (T - t) + 0.4,
        ("c", 200): -0.05 * (T - t) + 0.7,
    }
    lstm = pd.DataFrame(
        [(s, int(ti), st, float(v)) for (st, s), ys in want.items() for ti, v in zip(t, ys, strict=True)],
        columns=["step", "t", "state", "log10_norm"],
    )
    tanh = lstm[lstm["state"] == "h"].copy()
    table = pd.DataFrame([_run("l", 1e-2, 1.0, cell="lstm"), _run("t", 1e-2, 1.5, cell="tanh")])
    return table, {"l": lstm, "t": tanh}, t, want


def test_an_lstm_profile_panel_draws_its_cell_state_path_in_the_runs_colour():
    """The LSTM's cell-state path c (profile state ``c``), at init and at the end, beside h: the recorded
    values, the run's colour, line styles of their own; a tanh panel has no c curve."""
    table, profiles, t, want = _lstm_and_tanh_profiles()
    fig = rr.profile_panels(table, profiles, "adding")
    lstm_ax, tanh_ax = fig.axes
    assert lstm_ax.get_title() == "adding: lstm" and tanh_ax.get_title() == "adding: tanh"
    lines = {ln.get_label(): ln for ln in lstm_ax.get_lines()}
    c_init = [ln for lab, ln in lines.items() if "cell state c" in lab and lab.endswith(": init")]
    c_end = [ln for lab, ln in lines.items() if "cell state c: step 200" in lab]
    h = [ln for lab, ln in lines.items() if "cell state c" not in lab]
    assert len(c_init) == len(c_end) == 1 and len(h) == 2
    for line, key in ((c_init[0], ("c", 0)), (c_end[0], ("c", 200))):
        assert np.allclose(line.get_xdata(), t) and np.allclose(line.get_ydata(), want[key])
        assert line.get_color() == h[0].get_color()
    h_styles = {ln.get_linestyle() for ln in h}
    c_styles = {c_init[0].get_linestyle(), c_end[0].get_linestyle()}
    assert len(c_styles) == 2 and not c_styles & h_styles
    assert "cell state c" in fig._suptitle.get_text()
    assert not [ln for ln in tanh_ax.get_lines() if "cell state" in ln.get_label()]
    assert len(tanh_ax.get_lines()) == 2  # h at init and at the end (g = 1.5: no mean-field line)


def test_a_panel_of_a_run_diverged_at_its_first_step_says_why_it_is_empty():
    """Its only norm inf: the panel had bare linear axes, ticks -0.04..0.04 on both (a review). It says
    why, as a run's own figure does, on a log axis, with whole training steps."""
    norms = {"d": pd.DataFrame({"step": [1], "norm_preclip": [np.inf], "norm_postclip": [np.nan]})}
    table = pd.DataFrame([_run("d", 1.0, 5.0, regime="diverged", diverged_step=0)]).astype(
        {"diverged_step": "Int64"}
    )
    fig = rr.grad_norm_panels(table, norms, "adding")
    (ax,) = fig.axes
    fig.canvas.draw()
    assert any("no finite gradient norm" in t.get_text() for t in ax.texts)
    assert ax.get_yscale() == "log"
    ticks = [x for x in ax.get_xticks() if ax.get_xlim()[0] <= x <= ax.get_xlim()[1]]
    assert ticks and all(float(x).is_integer() for x in ticks), ticks


def test_a_diverged_run_has_an_x_where_it_diverged_in_the_grad_norm_panel():
    """A diverged run (regime diverged, diverged_step 5): an X in its colour at step 5 on its last finite
    norm (100, at step 4: step 5's was inf), its step in the legend; one with no finite norm at all gets
    its X at the panel's top edge; a run that did not diverge gets none."""
    steps = np.arange(1, 6)
    norms = {
        "a": pd.DataFrame({"step": steps, "norm_preclip": [1, 3, 10, 100, np.inf], "norm_postclip": 1.0}),
        "b": pd.DataFrame({"step": steps, "norm_preclip": 2.0, "norm_postclip": 1.0}),
        "c": pd.DataFrame({"step": steps, "norm_preclip": np.inf, "norm_postclip": np.nan}),
    }
    table = pd.DataFrame(
        [
            _run("a", 1.0, 3.0, regime="diverged", diverged_step=5),
            _run("b", 1e-2, 1.0),
            _run("c", 1.0, 5.0, regime="diverged", diverged_step=2),
        ]
    ).astype({"diverged_step": "Int64"})
    fig = rr.grad_norm_panels(table, norms, "adding")
    (ax,) = fig.axes
    xs = [ln for ln in ax.get_lines() if ln.get_marker() == "X"]
    assert len(xs) == 2
    by_step = {int(ln.get_xdata()[0]): ln for ln in xs}
    assert sorted(by_step) == [2, 5]
    (curve_a,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("gaussian g=3 ") and ln not in xs]
    a = by_step[5]
    assert a.get_ydata()[0] == pytest.approx(100.0) and a.get_color() == curve_a.get_color()
    assert a.get_label().endswith("diverged at step 5")
    c = by_step[2]
    assert c.get_label().endswith("diverged at step 2")
    fig.canvas.draw()
    top = c.get_transform().transform((2, c.get_ydata()[0]))[1]
    box = ax.get_window_extent()
    assert box.y1 - 0.1 * box.height < top <= box.y1  # at the top edge, not at a norm it never had
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sum(s.endswith(("diverged at step 5", "diverged at step 2")) for s in legend) == 2  # the X's
    assert "(diverged at step 5; " in curve_a.get_label()  # the curve's own summary says the same step


def test_report_step_and_time_axes_tick_whole_numbers_only():
    """A short run (3 training steps, T = 3): every tick on the gradient-norm panel's step axis and the
    profile panel's t axis is a whole number (matplotlib's default put ticks at 1.5, 2.5 steps)."""
    steps = np.arange(1, 4)
    table = pd.DataFrame([_run("a", 1e-2, 1.0, cell="gru")])
    norms = {"a": pd.DataFrame({"step": steps, "norm_preclip": [3.0, 2.0, 1.0], "norm_postclip": 1.0})}
    prof = pd.DataFrame(
        [(s, t, "h", -0.1 * (3 - t)) for s in (0, 3) for t in (1, 2, 3)],
        columns=["step", "t", "state", "log10_norm"],
    )
    for fig in (rr.grad_norm_panels(table, norms, "adding"), rr.profile_panels(table, {"a": prof}, "adding")):
        fig.canvas.draw()
        (ax,) = fig.axes
        lo, hi = ax.get_xlim()
        ticks = [v for v in ax.get_xticks() if lo <= v <= hi]
        assert len(ticks) >= 2 and all(float(v).is_integer() for v in ticks), ticks
        fig.clf()


def test_a_panel_of_hundreds_of_runs_is_drawn_in_a_few_groups_with_every_run_in_its_own():
    """A study of thousands of trials: one scatter per run took 9.5 s of a 5,000-run report and drew a wall
    of opaque circles (a scale probe). Past LABELLED_RUNS a panel draws one scatter per (marker, colour,
    hollow) group, see-through, unlabelled, and says so; every run is still a point at its (lr, g), in
    its regime's colour, and a solved run's star is drawn over the crowd."""
    from matplotlib.colors import to_rgba

    from pipeline.report import phase

    rng = np.random.default_rng(0)
    n = 300
    rows = []
    for i in range(n):
        regime = ["vanishing", "healthy", "exploding", "diverged"][i % 4]
        solved = "true" if i % 50 == 1 else "false"
        ratio = 0.01 if solved == "true" else (1.2 if i % 3 == 0 else 0.5)
        rows.append(_run(f"r{i}", float(10 ** rng.uniform(-4, -1)), float(10 ** rng.uniform(-0.7, 0.5)),
                         regime=regime, solved=solved, val_loss_ratio=ratio,
                         diverged_step=7 if regime == "diverged" else None))  # fmt: skip
    table = pd.DataFrame(rows)
    (ax,) = rr.phase_diagram(table, "adding").axes[:1]
    assert len(ax.collections) <= 12, len(ax.collections)  # groups, not runs
    drawn = {}
    for c in ax.collections:
        for xy in c.get_offsets():
            drawn[tuple(np.round(np.asarray(xy, dtype=float), 12))] = c
    assert len(drawn) == n and not ax.texts[1:] and f"{n} runs: no labels" in ax.texts[0].get_text()
    for r in rows:
        c = drawn[(round(r["lr"], 12), round(r["init_scale"], 12))]
        color = c.get_edgecolor()[0] if not len(c.get_facecolor()) else c.get_facecolor()[0]
        assert np.allclose(color[:3], to_rgba(phase.REGIME_COLORS[r["regime"]])[:3]), r["run_id"]
    order = {id(c): k for k, c in enumerate(ax.collections)}
    at = [order[id(drawn[(round(r["lr"], 12), round(r["init_scale"], 12))])] for r in rows]
    plain = [at[i] for i in range(n) if rows[i]["solved"] == "false" and rows[i]["regime"] != "diverged"]
    assert at[1] > max(plain)  # row 1 is a solved healthy run: its star is drawn over every circle
