"""A run's two figures drawn on reused axes (``pipeline.plots.reused_run_figures``, as a sweep worker draws
them for every trial) are the very PNG bytes a new figure draws, whatever was drawn on the axes before."""

import io

import numpy as np
import pandas as pd
import pytest

from pipeline.plots import plt, profile_figure, reused_run_figures, run_figure
from pipeline.training.callbacks import plot_grad_norms

SHORT = "adding T=50 tanh orthogonal g=1: healthy gradients; val loss 0.02 x baseline: solved"
LONG = (
    "copy T=120 lstm xavier g=1.35: exploding gradients; val loss 0.98 x baseline: learned nothing, "
    "and a title long enough to wrap onto a second and a third line of the figure's width"
)


def profile_frame(
    states: tuple[str, ...], steps: int, T: int, seed: int, holes: bool = False
) -> pd.DataFrame:
    """A long-format profile frame (step, t, state, log10_norm) as ProfileMonitor.profile_frame gives it."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in np.linspace(0, 300, steps).round().astype(int):
        slope = rng.uniform(-0.1, 0.05)
        for state in states:
            y = slope * (T - np.arange(1, T + 1)) + rng.normal(0, 0.05, T) + (0.3 if state == "c" else 0.0)
            if holes:  # a gradient that never reaches the first steps, and one that overflowed
                y[:3] = -np.inf
                y[-1] = np.nan
            rows += [(int(s), t + 1, state, float(v)) for t, v in enumerate(y)]
    return pd.DataFrame(rows, columns=["step", "t", "state", "log10_norm"])


def norms(n: int, seed: int, bad: bool = False):
    rng = np.random.default_rng(seed)
    pre = np.exp(rng.normal(0, 1.5, n))
    if bad:
        pre[[5, 9]] = [np.inf, np.nan]
        pre[12] = 0.0
    skipped = np.zeros(n, dtype=bool)
    if bad:
        skipped[[5, 20, 30]] = True
    return np.arange(n) * 3, pre, np.minimum(pre, 1.0), skipped


def draw(case: str):
    """One of the figures a run records, by name; each differs from the others in what state it leaves."""
    if case == "profile tanh":
        return profile_figure(profile_frame(("h",), 7, 50, 0), SHORT, None)
    if case == "profile lstm, window shaded":
        return profile_figure(profile_frame(("h", "c"), 3, 80, 1), LONG, (60, 80))
    if case == "profile copy, holes":
        return profile_figure(profile_frame(("h", "h_total"), 9, 40, 2, holes=True), SHORT, (31, 40))
    if case == "profile empty":
        return profile_figure(profile_frame((), 1, 10, 3), SHORT, None)
    steps, pre, post, skipped = norms(300, 4)
    if case == "norms clipped":
        return plot_grad_norms(steps, pre, post, 1.0, SHORT)
    if case == "norms unclipped, long title":
        return plot_grad_norms(steps[:40], pre[:40] * 1e4, pre[:40] * 1e4, None, LONG)
    if case == "norms skipped, non-finite":
        steps, pre, post, skipped = norms(50, 5, bad=True)
        return plot_grad_norms(steps, pre, post, 0.5, SHORT, skipped=skipped)
    if case == "norms diverged at step 0":  # one row, NaN norms: no point on the log axis, only the threshold
        nan = np.array([np.nan])
        return plot_grad_norms(np.array([0]), nan, nan, 1.0, SHORT, skipped=np.array([True]))
    if case == "norms zero and negative, no threshold":
        return plot_grad_norms(steps[:20], np.zeros(20), -np.ones(20), None, LONG)
    if case == "profile all NaN":
        frame = profile_frame(("h",), 2, 30, 6)
        return profile_figure(frame.assign(log10_norm=np.nan), SHORT, (21, 30))
    raise AssertionError(case)


CASES = [
    "profile tanh",
    "profile lstm, window shaded",
    "profile copy, holes",
    "profile empty",
    "norms clipped",
    "norms unclipped, long title",
    "norms skipped, non-finite",
    "norms diverged at step 0",
    "norms zero and negative, no threshold",
    "profile all NaN",
]


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@pytest.fixture(scope="module")
def fresh() -> dict[str, bytes]:
    out = {}
    for case in CASES:
        fig = draw(case)
        out[case] = png(fig)
        plt.close(fig)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reused_figures_draw_the_bytes_of_new_ones_in_any_order(fresh, seed):
    order = list(np.random.default_rng(seed).permutation(CASES * 2))
    with reused_run_figures():
        for case in order:
            assert png(draw(case)) == fresh[case], f"{case} (after {order[: order.index(case)]})"


def scribble(height: float) -> None:
    """Leave on the axes of ``height`` each thing ``_new_state`` undoes, some of it no run figure leaves: a
    log scale, a legend, a horizontal line, a scatter, a text, a grid on minor ticks, labels, a moved
    colour cycle, fixed limits."""
    fig, ax = run_figure(height, LONG)
    ax.semilogy([1, 2, 3], [1e-3, 1.0, 1e3], label="a")
    ax.scatter([2], [1.0], label="b")
    ax.axhline(0.5, label="c")
    ax.text(2, 1.0, "note")
    ax.grid(alpha=0.3, which="both")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_xlim(0, 10)  # autoscaling off
    ax.legend()
    png(fig)


def test_whatever_axes_of_one_height_held_is_gone(fresh):
    bare = run_figure(5.0, SHORT)[0]  # a figure with nothing drawn: no labels, no grid, the view (0, 1)
    want = png(bare)
    plt.close(bare)
    with reused_run_figures():
        scribble(5.0)  # the profile figure's height
        assert png(draw("profile lstm, window shaded")) == fresh["profile lstm, window shaded"]
        scribble(5.0)
        assert png(run_figure(5.0, SHORT)[0]) == want


def test_reuse_hands_out_the_same_figure_only_inside_the_block():
    with reused_run_figures():
        a = run_figure(4.6, SHORT)[0]
        with reused_run_figures():  # nested: still the same
            assert run_figure(4.6, SHORT)[0] is a
        assert run_figure(4.6, SHORT)[0] is a
        assert run_figure(5.0, SHORT)[0] is not a
    outside = run_figure(4.6, SHORT)[0]
    assert outside is not a
    plt.close(outside)
    with reused_run_figures():  # kept for the next block (a worker's next trial)
        assert run_figure(4.6, SHORT)[0] is a


def test_a_figure_given_more_or_drawn_under_other_rcparams_is_replaced(fresh):
    """What the reset does not undo makes a new figure: a second axes or a figure-level text (anything
    drawn in the block besides the run figures), or rcParams changed since the figure was made (a style
    in the user's session)."""
    import matplotlib

    style = {"xtick.labelsize": 14, "axes.prop_cycle": matplotlib.cycler(color=["k"])}
    with matplotlib.rc_context(style):
        new = draw("norms clipped")
        styled = png(new)
        plt.close(new)
    assert styled != fresh["norms clipped"]
    with reused_run_figures():
        fig, ax = run_figure(4.6, SHORT)
        ax.twinx().plot([1, 2])
        fig.text(0.5, 0.5, "X")
        assert png(draw("norms clipped")) == fresh["norms clipped"]
        assert run_figure(4.6, SHORT)[0] is not fig
        kept = run_figure(4.6, SHORT)[0]
        with matplotlib.rc_context(style):
            fig = draw("norms clipped")
            assert fig is not kept and png(fig) == styled
        assert png(draw("norms clipped")) == fresh["norms clipped"]  # and back


def test_a_run_whose_only_finite_norm_is_its_first_step_shows_that_point():
    """One plottable point draws no line segment: it gets a marker, or the figure is blank."""
    fig = plot_grad_norms(np.array([0, 1]), np.array([13.8, np.inf]), np.array([13.8, np.inf]), None, SHORT)
    ax = fig.axes[0]
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    box = ax.get_window_extent()  # the axes only: the legend's handles are outside them
    h = rgb.shape[0]
    inside = rgb[int(h - box.y1) : int(h - box.y0), int(box.x0) : int(box.x1)]
    colours = {"pre-clip": (0x1F, 0x77, 0xB4), "post-clip": (0xFF, 0x7F, 0x0E)}  # C0, C1
    for line in ax.lines[:2]:
        want = colours[line.get_label()]
        assert line.get_marker() == "o"
        if line.get_label() == "post-clip":  # drawn over pre-clip at the same place
            assert (np.abs(inside - want).sum(-1) < 60).sum() > 10
    plt.close(fig)


def test_the_post_clip_line_breaks_over_the_steps_remedy_skip_dropped():
    """A dropped step has no post-clip norm (no update): the line was joined straight across steps 31-34
    of a remedy.skip run, as if updates had happened there (a walkthrough). Pre-clip stays whole; the
    skipped steps get their crosses on it; points between gaps get markers."""
    steps = np.arange(1, 41)
    pre = np.geomspace(1.0, 2.0, 40)
    post = np.minimum(pre, 1.5)
    skipped = (steps >= 31) & (steps <= 34)
    post[skipped] = np.nan
    fig = plot_grad_norms(steps, pre, post, 1.5, SHORT, skipped=skipped)
    lines = {ln.get_label(): ln for ln in fig.axes[0].lines}
    y = np.asarray(lines["post-clip"].get_ydata(), dtype=float)
    assert np.isnan(y[skipped]).all() and np.isfinite(y[~skipped]).all()  # a gap, not a segment across it
    assert np.isfinite(np.asarray(lines["pre-clip"].get_ydata(), dtype=float)).all()
    (crosses,) = fig.axes[0].collections
    assert crosses.get_offsets()[:, 0].tolist() == [31, 32, 33, 34]
    plt.close(fig)
    # a point with no drawable neighbour (a step between two skipped ones) is a marker, the others a line
    y = np.array([1.0, 2.0, np.nan, 5.0, np.nan, 3.0, 4.0])
    fig = plot_grad_norms(np.arange(7), y, y, None, SHORT, clipped=False)
    (line,) = fig.axes[0].lines
    assert line.get_marker() == "o" and line.get_markevery() == [3]
    plt.close(fig)
    fig = plot_grad_norms(np.arange(3), np.ones(3), np.ones(3), None, SHORT, clipped=False)
    assert fig.axes[0].lines[0].get_marker() in ("None", "", None)  # whole lines: no markers
    plt.close(fig)


def test_a_figure_title_names_what_the_cell_was_initialised_by():
    """A W_hh scheme and scale where the cell has a W_hh; else the keys its own init reads (a lem's title
    said "default g=1", a scale no lem reads)."""
    from conftest import tiny_config

    from pipeline.training.record import init_label

    def label(**kw):
        return init_label(tiny_config(**kw).model)

    assert label(**{"model.cell": "gru", "model.init": "orthogonal", "model.init_scale": 1.5}) == (
        "gru orthogonal g=1.5"
    )
    assert label(**{"model.cell": "lru", "model.r_min": 0.5, "model.r_max": 0.9}) == "lru r=[0.5, 0.9]"
    assert label(**{"model.cell": "lem", "model.dt": 0.0242}) == "lem dt=0.0242"
    assert label(**{"model.cell": "mingru"}) == "mingru"
    assert "g=" not in label(**{"model.cell": "cornn"})
    # init: default keeps PyTorch's init whatever init_scale says: its g is 1/sqrt(3), not 3 (a teacher's
    # review: "tanh default g=3: vanishing gradients", the same network as g=1); the LSTM's forget bias is
    # the lesson's variable (two runs at b_f = 0 and 2 had one title); indrnn's default u has no g
    assert label(**{"model.cell": "tanh", "model.init": "default", "model.init_scale": 3}) == (
        "tanh default g=1/sqrt(3)"
    )
    assert label(**{"model.cell": "lstm", "model.init": "default", "model.forget_bias": 2}) == (
        "lstm default g=1/sqrt(3) b_f=2"
    )
    assert label(**{"model.cell": "indrnn", "model.init": "default"}) == "indrnn default u~U(0,1)"


@pytest.mark.parametrize("cell", ["tanh", "lstm", "gru"])
def test_the_default_inits_g_is_what_pytorch_draws(cell):
    """effective_scale's 1/sqrt(3) for init: default, against the drawn W_hh: std * sqrt(H)."""
    from pipeline.cell_keys import effective_scale
    from pipeline.config import ModelConfig
    from pipeline.training.models import RNNModel

    H = 256
    m = RNNModel(ModelConfig(cell=cell, init="default", init_scale=3.0, hidden_size=H), 2, 1, "last", seed=0)
    w = m.rnn.weight_hh_l0.detach().double()
    assert float(w.std() * H**0.5) == pytest.approx(effective_scale(cell, "default", 3.0), rel=0.01)
    assert effective_scale(cell, "gaussian", 3.0) == 3.0 and effective_scale("indrnn", "default", 3.0) is None


@pytest.mark.parametrize(
    ("value", "says"),
    [(float("nan"), "overflowed"), (float("inf"), "overflowed"), (-float("inf"), "exactly 0")],
)
def test_a_profile_with_no_finite_value_says_why_over_the_whole_sequence(value, says):
    """A relu run whose float64 forward overflowed drew empty axes around its memory window, a legend
    naming passes that drew nothing (walkthrough)."""
    t = np.arange(1, 101)
    frame = pd.DataFrame(
        {"step": np.repeat([0, 1], 100), "t": np.tile(t, 2), "state": "h", "log10_norm": value}
    )
    fig = profile_figure(frame, "relu", window=(100, 100))
    ax = fig.axes[0]
    assert not ax.lines and [says in x.get_text() for x in ax.texts] == [True]
    assert ax.get_xlim() == (1.0, 100.0)
    assert ax.get_legend().get_texts()[0].get_text() == "memory window t = 100"


def test_the_profile_figure_draws_at_most_six_passes_the_first_and_the_last():
    """The profile figure (``plots/bptt_profile.png``) draws up to 6 training steps: the first, the last
    and evenly spaced between; fewer passes are all drawn."""

    def labels(steps):
        t = np.arange(1, 6)
        frame = pd.DataFrame(
            {
                "step": np.repeat(steps, len(t)),
                "t": np.tile(t, len(steps)),
                "state": "h",
                "log10_norm": -0.1 * np.tile(t, len(steps)),
            }
        )
        fig = profile_figure(frame, "profile")
        got = [ln.get_label() for ln in fig.axes[0].get_lines() if ln.get_label().startswith("step ")]
        plt.close(fig)
        return got

    got = labels(np.arange(0, 1000, 100))
    assert len(got) == 6 and got[0] == "step 0" and got[-1] == "step 900", got
    assert labels(np.array([0, 50, 100])) == ["step 0", "step 50", "step 100"]


def test_the_memory_window_is_shaded_when_it_starts_after_step_1():
    """``draw_profile``: the memory window is shaded and named in the legend whenever it starts after
    t = 1 (t = 2 included); a window from t = 1 is the whole sequence and is not (mutation review)."""
    from pipeline.plots import Curve, draw_profile, plt

    def shaded(window):
        fig, ax = plt.subplots()
        try:
            draw_profile(ax, [Curve([1, 2, 3, 4, 5, 6], [0.0, -1, -2, -3, -4, -5], "step 0")], window)
            return [p.get_label() for p in ax.patches]
        finally:
            plt.close(fig)

    assert shaded((2, 5)) == ["memory window t = 2..5"]
    assert shaded((6, 6)) == ["memory window t = 6"]
    assert shaded((1, 6)) == [] and shaded(None) == []


def test_figures_show_what_a_teacher_sees_drawn():
    """A teacher's review: (1) an unclipped run's post-clip line, equal to the pre-clip one, was drawn over
    it and said clipping happened; (2) a run whose every norm overflowed drew empty axes with a legend of
    lines not drawn; (3) a profile finite at one step only (a dead relu run) was a legend entry with
    nothing drawn."""
    import math

    import matplotlib.pyplot as plt

    from pipeline.plots import Curve, draw_grad_norms, draw_profile
    from pipeline.training.callbacks import plot_grad_norms

    steps, pre = np.arange(1, 6), np.array([3.0, 2.0, 1.5, 1.2, 1.1])
    fig = plot_grad_norms(steps, pre, pre.copy(), None, "t", clipped=False)
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert labels == ["gradient norm (no clipping)"], labels
    plt.close(fig)
    fig = plot_grad_norms(steps, pre, np.minimum(pre, 1.0), 1.0, "t")
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["pre-clip", "post-clip", "clip threshold 1"]
    plt.close(fig)

    fig, ax = plt.subplots()
    inf = np.full(5, math.inf)
    draw_grad_norms(
        ax, [Curve(steps, inf, "pre-clip"), Curve(steps, np.full(5, math.nan), "post-clip")], (1.0,)
    )
    assert [ln.get_label() for ln in ax.get_lines()] == ["clip threshold 1"]  # no line for what is not drawn
    assert any("no finite gradient norm" in t.get_text() for t in ax.texts)
    plt.close(fig)

    fig, ax = plt.subplots()
    y = np.full(30, -math.inf)
    y[-1] = -1.0
    draw_profile(ax, [Curve(np.arange(1, 31), y, "step 200")])
    (line,) = ax.get_lines()
    assert line.get_label() == "step 200" and line.get_marker() == "o"
    plt.close(fig)


def test_a_short_runs_step_and_time_axes_tick_whole_numbers_only():
    """A run of 3 training steps and T = 3: every tick on the gradient-norm figure's step axis and the
    profile figure's t axis is a whole number (matplotlib's default ticked 0.5, 1.5 steps), on a new
    figure and on a reused one; a bare figure handed out again has the default locator back."""
    from matplotlib.ticker import AutoLocator

    def ticks(fig) -> list[float]:
        fig.canvas.draw()
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        return [float(v) for v in ax.get_xticks() if lo <= v <= hi]

    steps, pre = np.arange(3), np.array([3.0, 2.0, 1.0])
    with reused_run_figures():
        for _ in range(2):
            for fig in (
                plot_grad_norms(steps, pre, np.minimum(pre, 1.0), 1.0, SHORT),
                profile_figure(profile_frame(("h", "c"), 2, 3, 0), SHORT, None),
            ):
                got = ticks(fig)
                assert len(got) >= 2 and all(v.is_integer() for v in got), got
        assert type(run_figure(4.6, SHORT)[1].xaxis.get_major_locator()) is AutoLocator
