"""The long-range profile of a researcher's own model (README, "Your own model": ``memory_steps``; "The
long-range profile"): a loss with a term at every step (a tagger, a language model, truncated BPTT in
manual optimization) is profiled on its last step's terms, so that the summaries and the verdict read
memory, with the whole loss's gradient beside it. Every profile is checked against full-graph float64
autograd of the same loss (the window's by a hook that zeroes the output's gradient before it), and the
verdict against the project's own measurement of the same weights on the copy task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.test_api import H, T, V, autograd_profile, first_batch, lm_data, loader, trainer

pl = pytest.importorskip("pytorch_lightning")

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


class Tagger(nn.Module):
    """A loss term at every step (a sequence tagger): nn.RNN (tanh, PyTorch's default init), a linear
    head, cross-entropy over all steps; here on the copy task's sequences."""

    def __init__(self, n_in: int, n_out: int, hidden: int = 64, num_layers: int = 1):
        super().__init__()
        self.rnn = nn.RNN(n_in, hidden, num_layers, batch_first=True)
        self.head = nn.Linear(hidden, n_out)
        self.n_out = n_out

    def training_step(self, batch, batch_idx):
        x, y = batch
        out, _ = self.rnn(x)
        return nn.functional.cross_entropy(self.head(out).reshape(-1, self.n_out), y.reshape(-1))


def test_a_loss_at_every_step_is_profiled_on_its_last_steps_and_reads_vanishing():
    """README, "The long-range profile": the total gradient of copy at T = 100 with a tanh RNN at
    PyTorch's default init reads +0.17 decades and "healthy"; the long-range profile reads -0.258 decades a
    step, "vanishing". The same must hold for a user's own tagger through the public probe."""
    from pipeline.bptt import profile as bptt
    from pipeline.config import DiagnosticsConfig
    from pipeline.training.callbacks import verdict
    from pipeline.training.probe import probe
    from pipeline.training.tasks import make_task

    torch.manual_seed(0)
    task = make_task("copy", 100)
    x, y = task.sample(32, torch.Generator().manual_seed(2))
    m = Tagger(task.input_size, task.output_size)
    long_range = probe(m, "rnn", (x, y)).metrics[0]
    total = probe(m, "rnn", (x, y), memory_steps=None).metrics[0]
    # the project's own measurement: the twin on the copy task's recall window
    p = {"cell": "tanh", "W_out": m.head.weight.detach(), "b_out": m.head.bias.detach()}
    p.update(
        {k: getattr(m.rnn, f"{n}_l0").detach() for k, n in [("W_ih", "weight_ih"), ("W_hh", "weight_hh")]}
    )
    p.update({k: getattr(m.rnn, f"{n}_l0").detach() for k, n in [("b_ih", "bias_ih"), ("b_hh", "bias_hh")]})
    own = bptt.summarize(bptt.profile(p, x.double(), y, task.loss, "all", window=task.window))
    d = DiagnosticsConfig()
    assert long_range["bptt/log10_ratio_per_step"] == pytest.approx(own["log10_ratio_per_step"], abs=0.01)
    assert verdict(False, long_range, None, d) == "vanishing"
    assert verdict(False, total, None, d) == "healthy"  # the old reading, still there on request
    assert long_range["bptt/log10_ratio"] <= long_range["spectral/pascanu_log10_bound"]  # propagation only
    assert "spectral/pascanu_log10_bound" not in total


def test_a_lower_layer_gets_its_terms_at_every_step_so_no_propagation_bound():
    """Under the top layer's window, the layer below still receives gradient through the top layer's input
    weights at every step: its profile is not pure propagation, and Pascanu's bound (a theorem about
    propagation alone) is logged for the top layer only."""
    from pipeline.training.probe import probe
    from pipeline.training.tasks import make_task

    torch.manual_seed(0)
    task = make_task("copy", 30)
    x, y = task.sample(8, torch.Generator().manual_seed(2))
    res = probe(Tagger(task.input_size, task.output_size, hidden=16, num_layers=2), "rnn", (x, y))
    bottom, top = res.metrics
    assert res.profiles[1].window == (res.profiles[1].T, res.profiles[1].T)
    assert res.profiles[0].window[0] == 1 and not res.profiles[0].is_propagation_only
    assert "spectral/pascanu_log10_bound" in top and "spectral/pascanu_log10_bound" not in bottom


def test_a_wider_window_measures_and_bounds_from_its_first_step():
    """memory_steps = 5 on a loss at every step: the window is the last five steps, the summaries run from
    its first step a = T - 4 back to 1, and Pascanu's bound is (gamma sigma_max)^(a - 1) over the same
    span (sigma_max here from numpy's SVD of the module's own W_hh; tanh: gamma = 1)."""
    from pipeline.training.probe import probe
    from pipeline.training.tasks import make_task

    torch.manual_seed(0)
    task = make_task("copy", 30)
    x, y = task.sample(8, torch.Generator().manual_seed(2))
    m = Tagger(task.input_size, task.output_size, hidden=16)
    with torch.no_grad():
        m.rnn.weight_hh_l0.mul_(2.0)  # sigma_max well away from 1: a bound over the wrong span differs
    res = probe(m, "rnn", (x, y), memory_steps=5)
    prof, met = res.profiles[0], res.metrics[0]
    a = prof.T - 4
    assert prof.window == (a, prof.T) and prof.reference_step == a and prof.is_propagation_only
    h = prof.log10_norm["h"]
    assert met["bptt/log10_ratio"] == pytest.approx(h[0] - h[a - 1], abs=1e-12)
    sigma = float(np.linalg.svd(m.rnn.weight_hh_l0.detach().double().numpy(), compute_uv=False)[0])
    assert met["spectral/pascanu_log10_bound"] == pytest.approx((a - 1) * np.log10(sigma), rel=1e-9)
    assert met["bptt/log10_ratio"] <= met["spectral/pascanu_log10_bound"]


class EveryFifth(nn.Module):
    """A 2-layer GRU whose loss reads the top layer at steps 5, 10, 15 and 20 only."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 8, num_layers=2, batch_first=True)

    def training_step(self, batch, batch_idx):
        out, _ = self.gru(batch[0])
        return out[:, 4::5].square().mean()


def test_the_window_counts_the_steps_the_loss_reads():
    """memory_steps = 2 on a loss that reads every fifth step: the window holds the terms at steps 15 and
    20 (the last two it reads), not the last two time steps."""
    from pipeline.training.probe import probe

    torch.manual_seed(0)
    m, batch = EveryFifth(), (torch.randn(4, 20, 3),)
    res = probe(m, "gru", batch, memory_steps=2, lyapunov=False)
    assert res.profiles[1].window == (15, 20)
    ref = autograd_profile(m, "gru", batch, window_from=15)
    for (k, state), want in ref.items():
        np.testing.assert_allclose(res.profiles[k].log10_norm[state], want, atol=1e-9, rtol=0)


class EarlyAndFinal(nn.Module):
    """A GRU whose loss reads its output at steps 1..5 and its final state h_n (no output after step 5)."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 8, batch_first=True)

    def training_step(self, batch, batch_idx):
        out, h_n = self.gru(batch[0])
        return out[:, :5].square().mean() + h_n[-1].sum()


def test_reading_h_n_is_a_read_at_the_last_step():
    """README, "Your own model": reading ``h_n`` / ``c_n`` is a read at T. A loss that reads the output at
    steps 1..5 and h_n: the one-step window is (T, T), the h_n term alone (autograd with the output's
    gradient zeroed before T), and the whole loss is ``h_total``."""
    from pipeline.training.probe import probe

    torch.manual_seed(0)
    m, batch = EarlyAndFinal(), (torch.randn(4, 20, 3),)
    res = probe(m, "gru", batch, lyapunov=False)
    assert res.profiles[0].window == (20, 20)
    want = autograd_profile(m, "gru", batch, window_from=20)[(0, "h")]
    np.testing.assert_allclose(res.profiles[0].log10_norm["h"], want, atol=1e-9, rtol=0)
    total = autograd_profile(m, "gru", batch)[(0, "h")]
    np.testing.assert_allclose(res.profiles[0].log10_norm["h_total"], total, atol=1e-9, rtol=0)
    assert np.abs(want[:5] - total[:5]).max() > 0.1  # the early terms are left out of the window's


@pytest.mark.parametrize("memory_steps", [0, -1, 1.5, True, "1"])
def test_memory_steps_must_be_a_positive_count_or_none(memory_steps):
    from pipeline import BPTTProfileMonitor, profile_rnn

    with pytest.raises(ValueError, match="memory_steps must be an int >= 1 ") as e:  # 1.5 is >= 1: says int
        BPTTProfileMonitor("rnn", memory_steps=memory_steps)
    assert str(e.value).endswith(f"got {memory_steps!r}")
    with pytest.raises(ValueError, match="memory_steps"):  # the notebook front, before any work
        profile_rnn(EveryFifth(), "gru", (torch.randn(2, 10, 3),), memory_steps=memory_steps)


class TBPTTLanguageModel(pl.LightningModule):
    """Truncated BPTT as Lightning 2 writes it (manual optimization): the sequence in chunks of ``k``
    steps, the state carried across chunks detached, one backward and one step per chunk."""

    def __init__(self, k: int = 10):
        super().__init__()
        self.automatic_optimization = False
        self.k = k
        self.embed = nn.Embedding(V, 8)
        self.lstm = nn.LSTM(8, H, batch_first=True)
        self.head = nn.Linear(H, V)

    def full_loss(self, batch):
        """The loss over the whole sequence: what the profile differentiates."""
        x, y = batch
        out, _ = self.lstm(self.embed(x))
        return nn.functional.cross_entropy(self.head(out).reshape(-1, V), y.reshape(-1))

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        state = None
        for i in range(0, x.shape[1], self.k):
            out, state = self.lstm(self.embed(x[:, i : i + self.k]), state)
            loss = nn.functional.cross_entropy(
                self.head(out).reshape(-1, V), y[:, i : i + self.k].reshape(-1)
            )
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            state = tuple(s.detach() for s in state)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def full_loss(module, batch):
    return module.full_loss(batch)


def test_manual_module_profile_needs_loss_fn_and_then_equals_autograd(tmp_path):
    from pipeline import BPTTProfileMonitor, GradientNormMonitor, profile_rnn

    torch.manual_seed(0)
    model, batch = TBPTTLanguageModel(), first_batch(lm_data())
    with pytest.raises(ValueError, match=r"^TBPTTLanguageModel uses manual optimization.*loss_fn=") as err:
        profile_rnn(model, "lstm", batch)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="manual optimization.*loss_fn="):
        trainer(tmp_path, [BPTTProfileMonitor("lstm")], max_steps=3, log_every_n_steps=1).fit(
            model, loader(lm_data())
        )

    frame = profile_rnn(model, "lstm", batch, loss_fn=full_loss)
    ref = autograd_profile(model, "lstm", batch, loss_fn=full_loss, window_from=T)  # the last step's term
    total = autograd_profile(model, "lstm", batch, loss_fn=full_loss)
    ref.update({(k, f"{s}_total"): v for (k, s), v in total.items()})
    for (k, state), want in ref.items():
        got = frame[(frame["layer"] == k) & (frame["state"] == state)].sort_values("t")["log10_norm"]
        assert len(got) == T
        np.testing.assert_allclose(got.to_numpy(), want, atol=1e-9, rtol=0)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = BPTTProfileMonitor("lstm", every_n_steps=6, batch=batch, loss_fn=full_loss)
    gm = GradientNormMonitor(log_every_n_steps=3)
    t = trainer(tmp_path, [gm, pm], max_steps=12, log_every_n_steps=1)
    t.fit(model, loader(lm_data()))
    assert t.global_step == 12 and len(gm.history) == 12  # 3 chunks, so 3 steps, per batch
    assert [p["step"] for p in pm.passes] == [0, 6, 12]
    # every 4 steps with 3 steps a batch: the batch ends at 3, 6, 9, 12 cross 4, 8 and 12
    pm4 = BPTTProfileMonitor("lstm", every_n_steps=4, batch=batch, loss_fn=full_loss)
    trainer(tmp_path, [pm4], max_steps=12, log_every_n_steps=1).fit(TBPTTLanguageModel(), loader(lm_data()))
    assert [p["step"] for p in pm4.passes] == [0, 6, 9, 12]
    first = pm.profile_frame()
    first = first[first["step"] == 0]
    for (k, state), want in ref.items():  # the step-0 pass ran on the untrained weights
        got = first[(first["layer"] == k) & (first["state"] == state)].sort_values("t")["log10_norm"]
        np.testing.assert_allclose(got.to_numpy(), want, atol=1e-9, rtol=0)
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "it trained"
    assert pm.regime in ("vanishing", "healthy", "exploding")


# ------------------------------------------------------------------------------------ resuming


# Lightning's note that the resumed Trainer has no ModelCheckpoint like the one that wrote the checkpoint
