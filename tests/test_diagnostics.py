"""The regime verdict: thresholds as documented (README, "Regime verdict"), on real profiles where the
answer is known in closed form."""

import math

import numpy as np
import pytest
import torch

from pipeline.bptt import profile as bptt
from pipeline.bptt import spectra
from pipeline.config import DiagnosticsConfig
from pipeline.training.callbacks import judge, verdict

D = DiagnosticsConfig()
F64 = torch.float64


def s(h=None, c=None, overflow=0.0):
    """A profile pass's metrics as ProfileMonitor logs them (decades per step)."""
    out = {"bptt/overflow_step": overflow}
    if h is not None:
        out["bptt/log10_ratio_per_step"] = h
    if c is not None:
        out["bptt/c_log10_ratio_per_step"] = c
    return out


@pytest.mark.parametrize(
    ("diverged", "summary", "norm", "want"),
    [
        (True, s(0.0), 1.0, "diverged"),
        (False, s(-0.035), 1.0, "vanishing"),
        (False, s(-0.029), 1.0, "healthy"),
        (False, s(0.031), 1.0, "exploding"),
        (
            False,
            s(0.0),
            1001.0,
            "exploding",
        ),  # large gradients over training even if the final profile is flat
        (False, s(-1.0), 5000.0, "exploding"),  # explosion wins over vanishing: it is what hurt the run
        (False, s(-math.inf), 1.0, "vanishing"),  # nothing reaches step 1 (dead relu units)
        (False, s(math.nan), 1.0, "vanishing"),  # nothing reaches either end
        (False, s(math.inf), 1.0, "exploding"),
        (False, None, None, "healthy"),
        # LSTM: the cell-state path carries memory (Gers 2000); an open c path is not vanishing ...
        (False, s(-0.2, -0.005), 1.0, "healthy"),
        (False, s(-math.inf, -0.005), 1.0, "healthy"),
        # ... and vanishing needs both paths closed; a growing path is exploding whichever it is.
        (False, s(-0.2, -0.1), 1.0, "vanishing"),
        (False, s(-0.2, 0.05), 1.0, "exploding"),
        # Forward overflow: the state itself passed 1e308, every gradient summary is NaN.
        (False, s(math.nan, overflow=1752.0), 1.0, "exploding"),
        (False, s(math.nan, overflow=1.0), 1.0, "exploding"),  # at the first step (1-based), not "vanishing"
        # T = 1: a ratio of 0 over no step, no rate: no evidence either way (the norm rule alone)
        (False, {**s(math.nan), "bptt/log10_ratio": 0.0}, 1.0, "healthy"),
        (False, {**s(math.nan), "bptt/log10_ratio": 0.0}, 5000.0, "exploding"),
        (False, {**s(math.nan), "bptt/log10_ratio": math.nan}, 1.0, "vanishing"),  # neither end reached
    ],
)
def test_verdict(diverged, summary, norm, want):
    assert verdict(diverged, summary, norm, D) == want


@pytest.mark.parametrize(
    ("diverged", "summary", "norm", "want"),
    [
        (True, s(0.0), 1e9, ("diverged", "")),
        (False, s(-0.035), 1.0, ("vanishing", "profile falls -0.035 decades/step < -0.03")),
        (False, s(-0.029), 1.0, ("healthy", "")),
        (False, s(0.031), 1e9, ("exploding", "profile grows +0.031 decades/step > 0.03")),  # the rate first
        (
            False,
            s(-1.0),
            1001.0,
            ("exploding", "pre-clip norm 1001 > explode_norm 1000"),
        ),  # a decaying profile
        (False, None, 3.1e13, ("exploding", "pre-clip norm 3.1e+13 > explode_norm 1000")),
        (False, s(-math.inf), 1.0, ("vanishing", "no gradient reaches t=1")),
        (False, s(-0.2, 0.05), 1.0, ("exploding", "profile grows +0.05 decades/step > 0.03")),  # LSTM's c
        (
            False,
            s(-0.2, -0.1),
            1.0,
            ("vanishing", "profile falls -0.1 decades/step < -0.03"),
        ),  # the best path
        (False, s(math.nan, overflow=1752.0), 1.0, ("exploding", "the float64 forward overflowed at t=1752")),
    ],
)
def test_the_rule_that_decided_the_verdict_is_named(diverged, summary, norm, want):
    """The tag ``regime_reason`` (README, "Regime verdict"): an exploding verdict of the norm rule beside a
    decaying profile said nothing of the rule, and its description read "loses 2.3 decades"."""
    assert judge(diverged, summary, norm, D) == want
    assert verdict(diverged, summary, norm, D) == want[0]


def test_thresholds_are_config():
    d = DiagnosticsConfig(vanish_log10_per_step=-0.1, explode_log10_per_step=0.1, explode_norm=10.0)
    assert verdict(False, s(-0.15), 1.0, d) == "vanishing"
    assert verdict(False, s(-0.05), 1.0, d) == "healthy"
    assert verdict(False, s(0.15), 1.0, d) == "exploding"
    assert verdict(False, s(0.0), 11.0, d) == "exploding"


def test_each_rule_exactly_at_its_threshold():
    """README, "Regime verdict": exploding when a path grows *faster than* explode_log10_per_step or the
    largest norm *exceeds* explode_norm; vanishing when every path decays *faster than*
    vanish_log10_per_step. Exactly at a threshold no rule applies (healthy); one ulp past it, it does."""
    up, down = D.explode_log10_per_step, D.vanish_log10_per_step
    assert verdict(False, s(up), 1.0, D) == "healthy"
    assert verdict(False, s(-0.2, up), 1.0, D) == "healthy"  # the c path too
    assert verdict(False, s(np.nextafter(up, 1.0)), 1.0, D) == "exploding"
    assert verdict(False, s(0.0), D.explode_norm, D) == "healthy"
    assert verdict(False, s(0.0), np.nextafter(D.explode_norm, math.inf), D) == "exploding"
    assert verdict(False, None, D.explode_norm, D) == "healthy"
    assert verdict(False, s(down), 1.0, D) == "healthy"
    assert verdict(False, s(-0.2, down), 1.0, D) == "healthy"
    assert verdict(False, s(np.nextafter(down, -1.0)), 1.0, D) == "vanishing"


@pytest.mark.parametrize("past", [1e-12, 3.3e-5, 4e-3])
def test_a_reason_never_prints_a_false_inequality(past):
    """A teacher's run read "profile falls -0.03 decades/step < -0.03" (the rate -0.030033 at 3 digits).
    Each rule's number is printed with as many digits as it takes to stay on its side of the threshold,
    down to one ulp past it; 3 (the norm: 4) where they do."""
    import re

    up, down, norm = D.explode_log10_per_step, D.vanish_log10_per_step, D.explode_norm
    cases = [
        (s(up + past), 1.0, ">", up),
        (s(down - past), 1.0, "<", down),
        (s(0.0), norm * (1 + past), ">", norm),
        (s(np.nextafter(down, -1.0)), 1.0, "<", down),
        (s(0.0), np.nextafter(norm, math.inf), ">", norm),
    ]
    for summary, n, op, limit in cases:
        reason = judge(False, summary, n, D)[1]
        shown, said_limit = (float(x) for x in re.findall(r"[-+]?\d[\d.e+-]*", reason)[-2:])
        assert said_limit == limit, reason
        assert (shown > limit) if op == ">" else (shown < limit), reason
    assert judge(False, s(-0.030033), 1.0, D)[1] == "profile falls -0.03003 decades/step < -0.03"
    # a threshold of more digits than :g prints is printed whole (it read "1234568 > 1.23457e+06")
    fine = DiagnosticsConfig(explode_norm=1234567.0, vanish_log10_per_step=-0.02999999)
    assert judge(False, s(0.0), 1234568.0, fine)[1] == "pre-clip norm 1.235e+06 > explode_norm 1234567.0"
    assert judge(False, s(-0.03), 1.0, fine)[1] == "profile falls -0.03 decades/step < -0.02999999"
    assert judge(False, s(-0.1), 1.0, D)[1] == "profile falls -0.1 decades/step < -0.03"  # no digit more


def zero_input_orthogonal(T, g, H=8, B=2, seed=0):
    """tanh cell, W_hh = g*Q, zero inputs and biases: J_t = g*Q exactly, so the profile is g^(T-k)."""
    gen = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(H, H, generator=gen, dtype=F64))
    p = {
        "cell": "tanh",
        "W_ih": torch.randn(H, 2, generator=gen, dtype=F64),
        "b_ih": torch.zeros(H, dtype=F64),
        "W_hh": g * Q * torch.sign(torch.diagonal(R)),
        "b_hh": torch.zeros(H, dtype=F64),
        "W_out": torch.randn(1, H, generator=gen, dtype=F64),
        "b_out": torch.zeros(1, dtype=F64),
    }
    return p, torch.zeros(B, T, 2, dtype=F64), torch.randn(B, 1, generator=gen, dtype=F64)


def run_verdict(p, x, y, readout="last", window=None):
    prof = bptt.profile(p, x, y, lambda o, t: ((o - t) ** 2).mean(), readout, window=window)
    return verdict(False, {f"bptt/{k}": v for k, v in bptt.summarize(prof).items()}, 1.0, D), prof


@pytest.mark.parametrize("T", [20, 400])
def test_same_dynamics_same_verdict_at_any_T(T):
    """g = 0.9 loses log10(0.9) = -0.046 decades per step at every T (exact here). In absolute decades
    that is -0.87 at T = 20 and -18 at T = 400: a fixed-decades threshold called the first healthy and
    the second vanishing. Per step, both are vanishing; g = 0.95 (-0.022 per step) is healthy at both."""
    for g, want in ((0.9, "vanishing"), (0.95, "healthy")):
        got, prof = run_verdict(*zero_input_orthogonal(T, g))
        summary = bptt.summarize(prof)
        assert summary["log10_ratio_per_step"] == pytest.approx(math.log10(g), abs=1e-9)
        assert got == want, (g, T, summary)


@pytest.mark.parametrize(("b_f", "want"), [(3.0, "healthy"), (0.0, "vanishing")])
def test_lstm_open_cell_path_is_not_vanishing(b_f, want):
    """LSTM with W_ih = W_hh = 0 (as in tests/test_bptt.py): dL/dh_t = 0 exactly for t < T (h feeds
    nothing) while dL/dc_t = sigmoid(b_f) dL/dc_{t+1}. b_f = 3: c keeps log10 sigmoid(3) = -0.021 decades
    per step: open, though the h path reads -inf. b_f = 0: log10(1/2) = -0.30 per step: closed."""
    T, H, B = 200, 4, 2
    gen = torch.Generator().manual_seed(1)
    b = torch.zeros(4 * H, dtype=F64)
    b[0:H], b[H : 2 * H], b[2 * H : 3 * H], b[3 * H :] = 0.5, b_f, 0.8, 0.2
    p = {
        "cell": "lstm",
        "W_ih": torch.zeros(4 * H, 1, dtype=F64),
        "b_ih": b,
        "W_hh": torch.zeros(4 * H, H, dtype=F64),
        "b_hh": torch.zeros(4 * H, dtype=F64),
        "W_out": torch.randn(1, H, generator=gen, dtype=F64),
        "b_out": torch.zeros(1, dtype=F64),
    }
    got, prof = run_verdict(
        p, torch.randn(B, T, 1, generator=gen, dtype=F64), torch.randn(B, 1, generator=gen, dtype=F64)
    )
    summary = bptt.summarize(prof)
    assert np.isneginf(summary["log10_ratio"])
    assert summary["c_log10_ratio_per_step"] == pytest.approx(math.log10(1 / (1 + math.exp(-b_f))), abs=1e-9)
    assert got == want


def test_forward_overflow_reads_exploding():
    """relu, W_hh = 1.5 I, positive drive: h_t grows like 1.5^t and passes float64's 1.8e308 near
    t = 308 / log10(1.5) = 1750. The verdict must say exploding (it said vanishing from a NaN ratio)."""
    T, H, B = 2000, 4, 2
    p = {
        "cell": "relu",
        "W_ih": torch.ones(H, 1, dtype=F64),
        "b_ih": torch.zeros(H, dtype=F64),
        "W_hh": 1.5 * torch.eye(H, dtype=F64),
        "b_hh": torch.zeros(H, dtype=F64),
        "W_out": torch.ones(1, H, dtype=F64),
        "b_out": torch.zeros(1, dtype=F64),
    }
    x = torch.ones(B, T, 1, dtype=F64)
    got, prof = run_verdict(p, x, torch.zeros(B, 1, dtype=F64))
    # h_t = sum_{j<t} 1.5^j = 2 (1.5^t - 1): the first t with h_t > 1.797e308 (float64 max)
    t = np.arange(1, T + 1)
    expected = int(t[np.log10(2.0) + t * math.log10(1.5) > math.log10(np.finfo(np.float64).max)][0])
    assert prof.overflow_step == expected and bptt.summarize(prof)["overflow_step"] == expected
    assert got == "exploding"
    # The Lyapunov exponent reads the growth before the overflow: ln 1.5 exactly (J_t = 1.5 I), not -inf.
    assert spectra.lyapunov_max(p, x) == pytest.approx(math.log(1.5), abs=1e-12)


def test_run_figures_fixed_title_place_is_where_matplotlib_would_put_it():
    """pipeline.plots.run_figure sets the title's place instead of letting matplotlib measure the tick
    labels at each save: the PNG must be the very bytes the automatic placement draws."""
    import io

    from pipeline.plots import plt
    from pipeline.training.callbacks import plot_grad_norms

    steps = np.arange(300)
    pre = np.abs(np.random.default_rng(0).standard_normal(300)) + 0.1
    title = "copy T=50 tanh orthogonal g=1.05: healthy gradients; val loss 0.98 x baseline: learned nothing"

    def png(auto: bool) -> bytes:
        fig = plot_grad_norms(steps, pre, np.minimum(pre, 1.0), 1.0, title)
        fig.axes[0]._autotitlepos = auto  # matplotlib's own switch (Axes.set_title without y sets it)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return buf.getvalue()

    assert png(False) == png(True)


def test_the_runs_profile_is_the_init_twins_on_the_probe_batch_of_seed_plus_2(tmp_path, monkeypatch):
    """README, "Configuration reference": the profile's probe batch is drawn with ``seed + 2`` (the
    validation set has ``seed + 1``). The run's step-0 pass equals an independent profile of the model at
    initialisation on ``fixed_batch(task, probe_size, seed + 2)``, every step of it, and not the one on
    the validation seed's batch; with ``diagnostics.reference_check`` (adding: a last-step loss) the run
    logs ``bptt/reference_max_err`` at round-off."""
    import pytorch_lightning as pl

    from pipeline.training import run as train
    from pipeline.training.callbacks import ProfileMonitor
    from pipeline.training.data import fixed_batch
    from pipeline.training.module import RNNTrainingModule
    from pipeline.training.tasks import make_task
    from tests.conftest import tiny_config

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(
        **{"tracking.enabled": False, "trainer.max_steps": 2, "diagnostics.reference_check": True}
    )
    seen: dict = {}

    class Grab(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            (pm,) = [c for c in trainer.callbacks if isinstance(c, ProfileMonitor)]
            seen["first"], seen["frame"] = pm.first, pm.profile_frame()

    r = train.run(cfg, callbacks=[Grab()])
    assert 0 <= r.metrics["bptt/reference_max_err"] < 1e-9
    task = make_task(cfg.task.name, cfg.task.seq_len)
    params = RNNTrainingModule(cfg, task).model.params(F64)  # the same seed: the weights at step 0
    frame = seen["frame"]
    got = frame[(frame.step == 0) & (frame.state == "h")].sort_values("t").log10_norm.to_numpy()

    def independent(seed):
        x, y = fixed_batch(task, cfg.diagnostics.probe_size, seed)
        y = y.double() if y.is_floating_point() else y
        return bptt.profile(params, x.double(), y, task.loss, task.readout, window=task.window)

    want = independent(cfg.seed + 2)
    np.testing.assert_allclose(got, want.log10_norm["h"], rtol=0, atol=1e-9)
    assert seen["first"]["bptt/log10_ratio"] == pytest.approx(
        bptt.summarize(want, D.horizon_decades)["log10_ratio"], abs=1e-9
    )
    assert np.abs(got - independent(cfg.seed + 1).log10_norm["h"]).max() > 1e-3
