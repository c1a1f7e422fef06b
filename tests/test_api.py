"""The public API on models this project did not design (README, "Your own model"): GradientNormMonitor,
BPTTProfileMonitor and profile_rnn on a two-layer LSTM language model with an embedding and an MLP head,
and a batch-first GRU classifier, each with its own training_step loss."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import ROOT

pl = pytest.importorskip("pytorch_lightning")

# Lightning's own use of a torch pytree class that torch deprecated (as pipeline.training.run silences it).
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

V, H, T = 20, 16, 30


def _quiet():
    import logging

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


class LSTMLanguageModel(pl.LightningModule):
    """Next-token prediction: Embedding -> 2-layer LSTM (time-major unless batch_first) -> MLP head."""

    def __init__(self, batch_first: bool = False, lr: float = 0.05, nan_at: int | None = None):
        super().__init__()
        self.batch_first, self.lr, self.nan_at = batch_first, lr, nan_at
        self.embed = nn.Embedding(V, 8)
        self.encoder = nn.Module()
        self.encoder.lstm = nn.LSTM(8, H, num_layers=2, batch_first=batch_first)
        self.head = nn.Sequential(nn.Linear(H, 32), nn.ReLU(), nn.Linear(32, V))

    def training_step(self, batch, batch_idx):
        x, y = batch  # [B, T] tokens, next tokens
        e = self.embed(x if self.batch_first else x.T)
        out, _ = self.encoder.lstm(e)
        if not self.batch_first:
            out = out.transpose(0, 1)
        loss = nn.functional.cross_entropy(self.head(out).reshape(-1, V), y.reshape(-1))
        self.log("my_loss", loss)
        if self.nan_at is not None and self.global_step >= self.nan_at:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class GRUClassifier(pl.LightningModule):
    """Sequence classification from the last hidden state h_n[-1] of a batch-first GRU."""

    def __init__(self, num_layers: int = 1):
        super().__init__()
        self.gru = nn.GRU(3, H, num_layers=num_layers, batch_first=True)
        self.out = nn.Linear(H, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, h_n = self.gru(x)
        return nn.functional.cross_entropy(self.out(h_n[-1]), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class LayerBefore(GRUClassifier):
    """A linear layer of ``width`` outputs before the GRU (which takes 3): the GRU's input comes from the
    model's own weights; a width other than 3 is the model's own bug, its batch right."""

    def __init__(self, width: int):
        super().__init__()
        self.inp = nn.Linear(3, width)

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, h_n = self.gru(self.inp(x))
        return nn.functional.cross_entropy(self.out(h_n[-1]), y)


class TinyTanh(nn.Module):
    """A plain nn.Module (no Lightning) with training_step: tanh RNN, tiny recurrent weights."""

    def __init__(self, scale: float = 0.01):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.RNN(2, 8, batch_first=True)
        with torch.no_grad():
            self.rnn.weight_hh_l0.mul_(scale)
        self.out = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out, _ = self.rnn(x)
        return nn.functional.mse_loss(self.out(out[:, -1]), y)


class ReluWithInitialState(nn.Module):
    """Time-major 2-layer relu nn.RNN given h_0 (a learned initial state), loss on every step."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, H, num_layers=2, nonlinearity="relu")
        self.h0 = nn.Parameter(0.1 * torch.randn(2, 1, H))
        self.out = nn.Linear(H, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out, _ = self.rnn(x.transpose(0, 1), self.h0.expand(-1, x.shape[0], -1).contiguous())
        return nn.functional.cross_entropy(self.out(out[-10:]).reshape(-1, 4), y.repeat(10))


def lm_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, V, (n, T + 1), generator=g)
    return torch.utils.data.TensorDataset(seq[:, :-1], seq[:, 1:])


def cls_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, 3, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, :5, 0].sum(1) > 0).long() + 2 * (x[:, -1, 1] > 0).long())


def loader(ds, bs=16):
    return torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=False)


def trainer(tmp_path, callbacks, logger=None, **kw):
    _quiet()
    from pytorch_lightning.loggers import CSVLogger

    return pl.Trainer(
        max_steps=kw.pop("max_steps", 24),
        callbacks=callbacks,
        logger=logger if logger is not None else CSVLogger(tmp_path, name="csv"),
        enable_progress_bar=False,
        enable_checkpointing=kw.pop("enable_checkpointing", False),
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        **kw,
    )


# ------------------------------------------------------------------------------------ reference


def scaled_norm(g) -> float:
    """||g||_F without underflow in the squares (entries of 1e-161 square to a denormal)."""
    if g is None:
        return 0.0
    m = float(g.abs().max())
    return m * float((g / m).norm()) if m > 0 else 0.0


def autograd_profile(module, path, batch, loss_fn=None, window_from=None):
    """log10 ||dL/dh_t|| (and c_t) per layer by full-graph float64 autograd: the RNN unrolled one step at a
    time with nn.LSTMCell / nn.GRUCell / nn.RNNCell sharing its weights, retain_grad on every state; L is
    the module's training_step loss, or ``loss_fn(module, batch)``. ``window_from=a``: the loss terms that
    read the top layer's output before step a are left out (a hook zeroes that output's gradient there):
    the long-range profile's definition, by autograd."""
    from pipeline.training.copy64 import float64_copy, to_cpu64
    from pipeline.training.probe import NO_TRAINER_LOG

    m = float64_copy(module)
    r = m.get_submodule(path)
    cells_of = {nn.LSTM: nn.LSTMCell, nn.GRU: nn.GRUCell, nn.RNN: nn.RNNCell}
    kind = next(
        c for t, c in cells_of.items() if isinstance(r, t)
    )  # a parametrized module subclasses its own
    cells = []
    for k in range(r.num_layers):
        extra = {"nonlinearity": r.nonlinearity} if isinstance(r, nn.RNN) else {}
        c = kind(r.input_size if k == 0 else r.hidden_size, r.hidden_size, **extra).double()
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(c, name).data = getattr(r, f"{name}_l{k}").data
        cells.append(c)
    kept = []

    def unrolled(x, hx=None):
        xs = x if r.batch_first else x.transpose(0, 1)
        inp, hn, cn = list(xs.unbind(1)), [], []
        for k, c in enumerate(cells):
            h = torch.zeros(xs.shape[0], r.hidden_size, dtype=torch.float64)
            cc, outs, layer = torch.zeros_like(h), [], []
            if hx is not None:  # the given initial state
                h, cc = (hx[0][k], hx[1][k]) if isinstance(hx, tuple) else (hx[k], cc)
            for x_t in inp:
                if isinstance(r, nn.LSTM):
                    h, cc = c(x_t, (h, cc))
                    cc.retain_grad()
                else:
                    h = c(x_t, h)
                h.retain_grad()
                layer.append((h, cc) if isinstance(r, nn.LSTM) else (h,))
                outs.append(h)
            kept.append(layer)
            inp = outs
            hn.append(h)
            cn.append(cc)
        out = torch.stack(inp, 1)
        if window_from is not None:
            keep = (torch.arange(1, out.shape[1] + 1) >= window_from).to(out.dtype)[None, :, None]
            out.register_hook(lambda g: g * keep)
        out = out if r.batch_first else out.transpose(0, 1)
        return out, ((torch.stack(hn), torch.stack(cn)) if isinstance(r, nn.LSTM) else torch.stack(hn))

    r.forward = unrolled
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=NO_TRAINER_LOG, category=UserWarning
        )  # self.log(), no trainer
        b = to_cpu64(batch)
        (loss_fn(m, b) if loss_fn is not None else m.training_step(b, 0)).backward()
    out = {}
    for k, layer in enumerate(kept):
        for i, name in enumerate(("h", "c")[: len(layer[0])]):
            norms = [scaled_norm(s[i].grad) for s in layer]
            with np.errstate(divide="ignore"):
                out[(k, name)] = np.log10(np.asarray(norms))
    return out


def first_batch(ds, bs=16):
    return next(iter(loader(ds, bs)))


@pytest.mark.parametrize(
    ("make", "path", "data"),
    [
        (lambda: LSTMLanguageModel(batch_first=False), "encoder.lstm", lm_data),
        (lambda: LSTMLanguageModel(batch_first=True), "encoder.lstm", lm_data),
        (lambda: GRUClassifier(num_layers=2), "gru", cls_data),
        (ReluWithInitialState, "rnn", cls_data),
    ],
    ids=["lstm-time-major", "lstm-batch-first", "gru-2-layer-h_n", "relu-h0-last-10"],
)
def test_profile_equals_autograd_reference(make, path, data):
    from pipeline import profile_rnn

    torch.manual_seed(0)
    module = make()
    batch = first_batch(data())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    frame = profile_rnn(module, path, batch)
    assert list(frame.columns) == ["layer", "t", "state", "log10_norm"]
    # the long-range profile (h, c): the loss terms at the last step the loss reads (all of these read
    # step T); the whole loss's (h_total, c_total) where the loss also reads earlier steps
    ref = autograd_profile(module, path, batch, window_from=T)
    total = autograd_profile(module, path, batch)
    reads_earlier = any(not np.array_equal(total[key], ref[key]) for key in ref)
    assert reads_earlier == (path != "gru")  # the classifier reads h_n alone
    if reads_earlier:
        ref.update({(k, f"{s}_total"): v for (k, s), v in total.items()})
    assert {
        (int(k), s) for k, s in frame[["layer", "state"]].drop_duplicates().itertuples(index=False)
    } == set(ref)
    for (k, state), want in ref.items():
        got = (
            frame[(frame["layer"] == k) & (frame["state"] == state)].sort_values("t")["log10_norm"].to_numpy()
        )
        assert len(got) == T
        np.testing.assert_allclose(got, want, atol=1e-9, rtol=0)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "profile_rnn changed the module"


class NoBatchIdx(GRUClassifier):
    """``training_step(self, batch)``: Lightning's "the batch_idx is optional"."""

    def training_step(self, batch):  # type: ignore[override]
        return super().training_step(batch, 0)


def test_a_training_step_without_batch_idx_is_profiled_as_lightning_calls_it(tmp_path):
    """Lightning trains a module whose training_step takes no batch_idx; the profile called it with one and
    failed at the step-0 pass, ``takes 2 positional arguments but 3 were given`` (a walkthrough). The
    profile is now the one the same module with a batch_idx gets, inside fit and in profile_rnn."""
    from pipeline import BPTTProfileMonitor, profile_rnn

    torch.manual_seed(0)
    module = NoBatchIdx()
    twin = GRUClassifier()
    twin.load_state_dict(module.state_dict())
    batch = first_batch(cls_data())
    got, want = profile_rnn(module, "gru", batch), profile_rnn(twin, "gru", batch)
    assert len(got) == T and got.equals(want)
    pm = BPTTProfileMonitor("gru", every_n_steps=2)
    trainer(tmp_path, [pm], max_steps=4).fit(module, loader(cls_data()))
    assert [p["step"] for p in pm.passes] == [0, 2, 4] and pm.regime is not None


def test_underflow_reads_large_negative_log10_where_autograd_gives_zero():
    from pipeline.training.probe import probe

    module = TinyTanh(scale=0.01)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 600, 2, generator=g), torch.randn(4, 1, generator=g))
    res = probe(module, "rnn", batch, lyapunov=False)
    h = res.profiles[0].log10_norm["h"]
    assert np.isfinite(h).all()
    assert h[0] < -300, h[0]
    ref = autograd_profile(module, "rnn", batch)[(0, "h")]
    assert ref[0] == -math.inf  # float64 autograd: exactly 0 at t = 1
    ok = np.isfinite(ref) & (ref > -290)  # where autograd has not underflowed the two agree
    assert ok.sum() > 20
    np.testing.assert_allclose(h[ok], ref[ok], atol=1e-9, rtol=0)
    assert res.metrics[0]["bptt/log10_ratio"] < -300
    assert "spectral/pascanu_log10_bound" in res.metrics[0]  # last-step loss, vanilla cell
    assert res.metrics[0]["bptt/log10_ratio"] <= res.metrics[0]["spectral/pascanu_log10_bound"] + 1e-9


# ------------------------------------------------------------------------------------ training


def _read_csv_metrics(tmp_path):
    import pandas as pd

    (path,) = list(tmp_path.glob("csv/version_*/metrics.csv"))
    return pd.read_csv(path)


def test_lstm_with_gradient_clip_val_and_both_callbacks(tmp_path):
    from pipeline import BPTTProfileMonitor, GradientNormMonitor

    torch.manual_seed(0)
    clip = 0.05  # the pre-clip norms of this model run 0.03 .. 0.08
    gm = GradientNormMonitor(log_every_n_steps=4)
    pm = BPTTProfileMonitor("encoder.lstm", every_n_steps=8)
    module = LSTMLanguageModel(lr=0.05)
    tr = trainer(tmp_path, [gm, pm], gradient_clip_val=clip)
    tr.fit(module, loader(lm_data()))
    assert tr.global_step == 24
    pre, post, coef = gm.column("norm_preclip"), gm.column("norm_postclip"), gm.column("clip_coef")
    assert len(pre) == 24
    np.testing.assert_array_equal(gm.steps, np.arange(24))  # one record per optimizer step, in order
    assert (post <= clip * (1 + 1e-5)).all(), post.max()
    clipped = pre > clip
    assert clipped.any(), pre
    np.testing.assert_allclose(post[clipped], clip, rtol=1e-4)
    np.testing.assert_array_equal(post[~clipped], pre[~clipped])
    np.testing.assert_allclose(coef, post / pre, rtol=1e-12)
    groups = [gm.column(f"norm_{g}") for g in ("input", "recurrent", "bias", "other")]
    np.testing.assert_allclose(np.sqrt(sum(g**2 for g in groups)), pre, rtol=1e-10)
    assert (gm.column("norm_recurrent") > 0).all() and (gm.column("norm_other") > 0).all()
    assert gm.diverged_step is None
    # profile passes: step 0 (first batch, before any update), 8, 16, 24 (= train end)
    assert [int(p["step"]) for p in pm.passes] == [0, 8, 16, 24]
    assert pm.regime in ("vanishing", "healthy", "exploding")
    frame = pm.profile_frame()
    assert set(frame["layer"]) == {0, 1} and set(frame["state"]) == {"h", "c", "h_total", "c_total"}
    df = _read_csv_metrics(tmp_path)
    for name in (
        "grad/norm_preclip",
        "grad/norm_postclip",
        "grad/clip_rate",
        "grad/max_norm_preclip",
        "grad/norm_recurrent",
        "grad/norm_other",
        "bptt/log10_ratio",
        "bptt/decay_rate",
        "bptt/log10_ratio_per_step",
        "bptt/c_log10_ratio",
        "spectral/sigma_max",
        "spectral/lyapunov_max",
        "bptt/layer0/log10_ratio",
        "bptt/layer1/log10_ratio",
        "spectral/layer0/sigma_max",
    ):
        assert name in df.columns, name
        assert df[name].notna().any(), name
    rates = df["grad/clip_rate"].dropna()
    assert ((rates >= 0) & (rates <= 1)).all() and (rates > 0).any()
    # the plain names are the top layer's
    top = df.dropna(subset=["bptt/log10_ratio"])
    np.testing.assert_allclose(top["bptt/log10_ratio"], top["bptt/layer1/log10_ratio"])
    assert "spectral/pascanu_log10_bound" not in df.columns  # gated cell


def test_no_clipping_post_equals_pre_and_gru(tmp_path):
    from pipeline import BPTTProfileMonitor, GradientNormMonitor

    torch.manual_seed(0)
    gm = GradientNormMonitor(log_every_n_steps=5)
    batch = first_batch(cls_data(seed=3))
    pm = BPTTProfileMonitor("gru", every_n_steps=0, batch=batch)
    from pipeline.training.probe import probe

    module = GRUClassifier()
    expected = probe(module, "gru", batch, lyapunov=False).loss  # the given probe batch, before training
    tr = trainer(tmp_path, [gm, pm], max_steps=10)
    tr.fit(module, loader(cls_data()))
    np.testing.assert_array_equal(gm.column("norm_postclip"), gm.column("norm_preclip"))
    assert (gm.column("clip_coef") == 1).all()
    df = _read_csv_metrics(tmp_path)
    assert (df["grad/clip_rate"].dropna() == 0).all()
    assert [int(p["step"]) for p in pm.passes] == [0, 10]
    assert pm.passes[0]["bptt/loss"] == expected
    assert pm.passes[1]["bptt/loss"] != expected
    assert "spectral/pascanu_log10_bound" not in pm.passes[0]  # gated cell


class GroupNormsBeforeStep(pl.Callback):
    """The README's groups read independently where Lightning calls on_before_optimizer_step (before
    clipping): ``weight_ih*`` input, ``weight_hh*`` recurrent, ``bias*`` of the nn.GRU, the rest other."""

    def __init__(self, path: str):
        self.path, self.rows = path, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        rnn = pl_module.get_submodule(self.path)
        own = dict(rnn.named_parameters())
        ids = {id(p) for p in own.values()}

        def norm(ps):
            return math.sqrt(sum(float(p.grad.double().square().sum()) for p in ps if p.grad is not None))

        self.rows.append(
            {
                "input": norm(p for n, p in own.items() if n.startswith("weight_ih")),
                "recurrent": norm(p for n, p in own.items() if n.startswith("weight_hh")),
                "bias": norm(p for n, p in own.items() if n.startswith("bias")),
                "other": norm(p for p in pl_module.parameters() if id(p) not in ids),
            }
        )


def test_group_norms_are_the_groups_the_readme_names(tmp_path):
    """``grad/norm_input`` is the gradient of the RNN's ``weight_ih*``, ``grad/norm_recurrent`` of its
    ``weight_hh*``, ``grad/norm_bias`` of its biases and ``grad/norm_other`` of everything else (the
    readout), pre-clip, step by step as an independent callback reads them; the CSV log has the last."""
    from pipeline import GradientNormMonitor

    torch.manual_seed(0)
    ref, gm = GroupNormsBeforeStep("gru"), GradientNormMonitor(log_every_n_steps=5)
    module = GRUClassifier(num_layers=2)
    with torch.no_grad():
        module.gru.weight_hh_l0.mul_(3.0)  # the recurrent and the input gradients differ clearly
    tr = trainer(tmp_path, [ref, gm], max_steps=10, gradient_clip_val=0.05)
    tr.fit(module, loader(cls_data()))
    assert len(ref.rows) == len(gm.history) == 10
    for g in ("input", "recurrent", "bias", "other"):
        want = np.array([r[g] for r in ref.rows])
        assert (want > 0).all()
        np.testing.assert_allclose(gm.column(f"norm_{g}"), want, rtol=1e-6, err_msg=g)  # float32 norms
    assert not np.allclose(gm.column("norm_input"), gm.column("norm_recurrent"), rtol=1e-3)
    df = _read_csv_metrics(tmp_path)
    last = df.dropna(subset=["grad/norm_recurrent"]).iloc[-1]
    assert last["grad/norm_recurrent"] == pytest.approx(ref.rows[-1]["recurrent"], rel=1e-6)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (
            lambda m: m.GradientNormMonitor(log_every_n_steps="10"),
            "log_every_n_steps must be an int, got '10'",
        ),
        (lambda m: m.GradientNormMonitor(log_every_n_steps=2.5), "log_every_n_steps must be an int, got 2.5"),
        (lambda m: m.GradientNormMonitor(groups=["rnn"]), "groups must be a callable, got ['rnn']"),
        (lambda m: m.GradientNormMonitor(sink=1), "sink must be a callable, got 1"),
        (lambda m: m.BPTTProfileMonitor("gru", every_n_steps="x"), "every_n_steps must be an int, got 'x'"),
        (lambda m: m.BPTTProfileMonitor("gru", every_n_steps=1.5), "every_n_steps must be an int, got 1.5"),
        (lambda m: m.BPTTProfileMonitor("gru", sink=1), "sink must be a callable, got 1"),
        # in the logger at the first window, naming no argument (a walkthrough)
        (
            lambda m: m.GradientNormMonitor(loss_metric=3),
            "loss_metric must be a metric name (a non-empty str) or None, got 3",
        ),
        (
            lambda m: m.GradientNormMonitor(loss_metric=" "),
            "loss_metric must be a metric name (a non-empty str) or None, got ' '",
        ),
    ],
)
def test_a_callback_argument_of_the_wrong_type_is_named_at_construction(make, words):
    """``"10"`` failed at the first step with "'<' not supported", ``2.5`` was cut to 2 silently, a list
    for ``groups`` or an int for ``sink`` failed deep in the first log window (a walkthrough)."""
    import pipeline

    with pytest.raises(TypeError) as err:
        make(pipeline)
    assert str(err.value) == words


class CellLoop(pl.LightningModule):
    """A hand-written nn.LSTMCell loop: no nn.RNN / nn.LSTM / nn.GRU for the default groups."""

    def __init__(self):
        super().__init__()
        self.cell, self.out = nn.LSTMCell(3, H), nn.Linear(H, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = c = x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return nn.functional.cross_entropy(self.out(h), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_group_without_parameters_is_not_logged_and_a_projection_is_recurrent(tmp_path):
    """A model of hand-written cells logged grad/norm_input, _recurrent and _bias as 0.0, read as a
    measured vanishing gradient (a walkthrough): they are not logged; ``other`` holds every gradient. An
    LSTM's projection ``weight_hr*`` (fed back into the recurrence) is recurrent, not other."""
    from pipeline import GradientNormMonitor
    from pipeline.training.grad_monitor import parameter_groups

    gm = GradientNormMonitor(log_every_n_steps=1)
    module = CellLoop()
    tr = trainer(tmp_path, [gm], max_steps=2)
    tr.fit(module, loader(cls_data()))
    assert gm.fields[-1:] == ("norm_other",) and not any(
        f in gm.fields for f in ("norm_input", "norm_recurrent")
    )
    df = _read_csv_metrics(tmp_path)
    assert "grad/norm_recurrent" not in df.columns and "grad/norm_input" not in df.columns
    np.testing.assert_allclose(gm.column("norm_other"), gm.column("norm_preclip"), rtol=1e-6)
    lstm = nn.LSTM(3, 8, proj_size=2)
    groups = parameter_groups(lstm)
    assert {id(p) for p in groups["recurrent"]} == {id(lstm.weight_hh_l0), id(lstm.weight_hr_l0)}
    assert groups["other"] == []


class OrthogonalRNN(pl.LightningModule):
    """A tanh nn.RNN whose recurrent weight is kept orthogonal by torch's parametrization: the weight is
    stored as ``rnn.parametrizations.weight_hh_l0.original``."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, H, batch_first=True)
        nn.utils.parametrizations.orthogonal(self.rnn, "weight_hh_l0")
        self.out = nn.Linear(H, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, h_n = self.rnn(x)
        return nn.functional.cross_entropy(self.out(h_n[-1]), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ParametrizedGroups(pl.Callback):
    """The recurrent group of :class:`OrthogonalRNN` read independently: the gradient of the stored
    ``original``, and of the rest (input weight, biases, readout), before clipping."""

    def __init__(self):
        self.rows = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        original = pl_module.rnn.parametrizations.weight_hh_l0.original
        rest = [p for p in pl_module.parameters() if p is not original]
        self.rows.append((norm_of_grads([original]), norm_of_grads(rest)))


def norm_of_grads(params) -> float:
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None))


def test_a_parametrized_recurrent_weight_is_in_the_recurrent_group(tmp_path):
    """README, "Your own model": a weight under ``torch.nn.utils.parametrize`` counts under the name it
    parametrizes, so ``grad/norm_recurrent`` is the gradient of the orthogonal ``weight_hh_l0``'s
    ``original``, not 0 with that gradient under ``other``."""
    from pipeline import GradientNormMonitor

    torch.manual_seed(0)
    ref, gm = ParametrizedGroups(), GradientNormMonitor(log_every_n_steps=2)
    trainer(tmp_path, [ref, gm], max_steps=4).fit(OrthogonalRNN(), loader(cls_data()))
    recurrent, rest = (np.asarray(c) for c in zip(*ref.rows, strict=True))
    assert (recurrent > 0).all()
    np.testing.assert_allclose(gm.column("norm_recurrent"), recurrent, rtol=1e-6)
    others = np.sqrt(sum(gm.column(f"norm_{g}") ** 2 for g in ("input", "bias", "other")))
    np.testing.assert_allclose(others, rest, rtol=1e-6)


def test_nan_loss_stops_training_with_weights_finite(tmp_path):
    from pipeline import BPTTProfileMonitor, GradientNormMonitor

    torch.manual_seed(0)
    gm = GradientNormMonitor(log_every_n_steps=10)
    pm = BPTTProfileMonitor("encoder.lstm", every_n_steps=0)
    module = LSTMLanguageModel(nan_at=3)
    tr = trainer(tmp_path, [gm, pm], max_steps=20)
    tr.fit(module, loader(lm_data()))
    assert gm.diverged_step == 3
    assert tr.global_step <= 4
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert pm.regime == "diverged"
    df = _read_csv_metrics(tmp_path)
    assert df["diverged_step"].dropna().tolist() == [3.0]
    # README, "In a Lightning checkpoint": diverged_step is kept; a fit resumed from the diverged run's
    # checkpoint with new monitors still reports the first divergence (step 3), not a later step
    tr.save_checkpoint(tmp_path / "diverged.ckpt")
    gm2, pm2 = GradientNormMonitor(log_every_n_steps=10), BPTTProfileMonitor("encoder.lstm", every_n_steps=0)
    tr2 = trainer(tmp_path, [gm2, pm2], max_steps=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr2.fit(LSTMLanguageModel(nan_at=3), loader(lm_data()), ckpt_path=str(tmp_path / "diverged.ckpt"))
    assert tr2.global_step > tr.global_step  # it trained on, and met the NaN again
    assert gm2.diverged_step == 3 and pm2.regime == "diverged"


def test_the_guard_keeps_weights_outside_the_monitors_groups_finite_too(tmp_path):
    """``groups=`` covering the LSTM alone: the guard drops every gradient the optimizer would use, the
    embedding's and the head's too (dropping only its groups' let Adam write NaN into the rest: a
    mutation audit found no test of it)."""
    from pipeline import GradientNormMonitor

    torch.manual_seed(0)
    gm = GradientNormMonitor(
        log_every_n_steps=10, groups=lambda m: {"rnn": list(m.encoder.lstm.parameters())}
    )
    module = LSTMLanguageModel(nan_at=3)
    trainer(tmp_path, [gm], max_steps=20).fit(module, loader(lm_data()))
    assert gm.diverged_step == 3
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


def test_an_optimizer_swapped_in_during_fit_is_still_guarded(tmp_path):
    """The guard decides in the optimizer's step hooks, registered at fit start. An optimizer swapped in
    later (a callback replacing the strategy's, as fine-tuning recipes do) has none: the guard decides for
    it before its step, as it did for every optimizer before (a review), and the weights stay finite."""
    from pipeline import GradientNormMonitor

    class Swap(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2 and not getattr(self, "done", False):
                self.done = True
                trainer.strategy.optimizers = [torch.optim.Adam(pl_module.parameters(), lr=0.01)]

    torch.manual_seed(0)
    gm, swap = GradientNormMonitor(log_every_n_steps=10), Swap()
    module = LSTMLanguageModel(nan_at=4)
    trainer(tmp_path, [gm, swap], max_steps=20).fit(module, loader(lm_data()))
    assert swap.done and gm.diverged_step == 4
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


def test_a_second_fit_with_the_same_monitor_records_afresh(tmp_path):
    """README: "Each fit records afresh". The same monitor, fitted again on a healthy model after a diverged
    fit: no diverged_step, and the history of the second fit alone (a mutation audit: nothing reused one)."""
    from pipeline import GradientNormMonitor

    torch.manual_seed(0)
    gm = GradientNormMonitor(log_every_n_steps=5)
    trainer(tmp_path / "a", [gm], max_steps=20).fit(LSTMLanguageModel(nan_at=3), loader(lm_data()))
    assert gm.diverged_step == 3
    t = trainer(tmp_path / "b", [gm], max_steps=10)
    t.fit(LSTMLanguageModel(), loader(lm_data()))
    assert gm.diverged_step is None and len(gm.history) == t.global_step == 10


def test_mlflow_logger_gets_metrics_artifacts_and_regime(tmp_path):
    from mlflow.tracking import MlflowClient
    from pytorch_lightning.loggers import MLFlowLogger

    from pipeline import BPTTProfileMonitor, GradientNormMonitor
    from pipeline.config import DiagnosticsConfig

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(
        experiment_name="own-model", tracking_uri=uri, artifact_location=str(tmp_path / "art")
    )
    torch.manual_seed(0)
    pm = BPTTProfileMonitor("gru", every_n_steps=0, diagnostics=DiagnosticsConfig(explode_norm=1e-9))
    tr = trainer(
        tmp_path,
        [GradientNormMonitor(log_every_n_steps=4), pm],
        logger=logger,
        max_steps=8,
        gradient_clip_val=0.1,
    )
    tr.fit(GRUClassifier(num_layers=2), loader(cls_data()))
    client = MlflowClient(uri)
    run = client.get_run(logger.run_id)
    m = run.data.metrics
    for name in (
        "grad/norm_preclip",
        "grad/norm_postclip",
        "grad/clip_rate",
        "grad/norm_recurrent",
        "bptt/log10_ratio",
        "bptt/layer0/log10_ratio",
        "bptt/layer1/decay_rate",
        "spectral/sigma_max_r",
    ):
        assert name in m, name
    assert m["grad/norm_postclip"] <= 0.1 * (1 + 1e-5)
    assert [x.step for x in client.get_metric_history(run.info.run_id, "bptt/log10_ratio")] == [0, 8]
    # explode_norm below any gradient: the norm rule decides, and says so (README, "Regime verdict")
    assert run.data.tags["regime"] == pm.regime == "exploding"
    assert run.data.tags["regime_reason"] == pm.regime_reason
    assert pm.regime_reason.startswith(("profile grows ", "pre-clip norm ")), pm.regime_reason
    arts = {a.path for d in ("diagnostics", "plots") for a in client.list_artifacts(run.info.run_id, d)}
    assert arts == {"diagnostics/bptt_profile.parquet", "plots/bptt_profile.png"}
    import pandas as pd

    local = client.download_artifacts(run.info.run_id, "diagnostics/bptt_profile.parquet", str(tmp_path))
    frame = pd.read_parquet(local)
    assert list(frame.columns) == ["step", "layer", "t", "state", "log10_norm"]
    assert set(frame["step"]) == {0, 8} and set(frame["layer"]) == {0, 1}


@pytest.mark.parametrize(
    ("field", "value"), [("profile_every", 2), ("probe_size", 4), ("reference_check", True)]
)
def test_a_diagnostics_field_the_monitor_does_not_read_is_refused_at_construction(field, value):
    """``DiagnosticsConfig(profile_every=2, probe_size=4)`` was accepted and did nothing: passes at steps 0
    and 6 only, every probe sequence kept (a walkthrough). Each such field is refused, naming the argument
    that does it; the project's own trainer (ProfileMonitor) reads all of them."""
    from pipeline import BPTTProfileMonitor, DiagnosticsConfig
    from pipeline.training.callbacks import ProfileMonitor

    with pytest.raises(
        ValueError, match=rf"^diagnostics\.{field}={value!r} is not read by BPTTProfileMonitor: "
    ):
        BPTTProfileMonitor("gru", diagnostics=DiagnosticsConfig(**{field: value}))
    assert ProfileMonitor.UNREAD == {}
    BPTTProfileMonitor("gru", diagnostics=DiagnosticsConfig(horizon_decades=2.0, plots=False))


def test_plots_false_logs_the_profile_without_its_figure(tmp_path):
    """``DiagnosticsConfig(plots=False)``: the profile's parquet and the regime tag, no PNG (it was drawn
    and logged anyway: a walkthrough)."""
    from mlflow.tracking import MlflowClient
    from pytorch_lightning.loggers import MLFlowLogger

    from pipeline import BPTTProfileMonitor, DiagnosticsConfig

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="np", tracking_uri=uri, artifact_location=str(tmp_path / "a"))
    pm = BPTTProfileMonitor("gru", every_n_steps=2, diagnostics=DiagnosticsConfig(plots=False))
    trainer(tmp_path, [pm], logger=logger, max_steps=4).fit(GRUClassifier(), loader(cls_data()))
    client = MlflowClient(uri)
    arts = {a.path for d in ("diagnostics", "plots") for a in client.list_artifacts(logger.run_id, d)}
    assert arts == {"diagnostics/bptt_profile.parquet"}
    assert client.get_run(logger.run_id).data.tags["regime"] == pm.regime


def test_mlflow_logger_gets_nonfinite_values_as_the_record_has_them(tmp_path):
    """README, "The MLflow record" (and "Your own model": "as in The MLflow record"): through an
    MLFlowLogger +-inf is logged as +-float64 max, and NaN as the tag ``nonfinite.<metric>`` = ``nan``
    instead of a value, set while NaN is the latest value and deleted when a finite value follows."""
    from mlflow.tracking import MlflowClient
    from pytorch_lightning.loggers import MLFlowLogger

    from pipeline.training.grad_window import FLOAT_MAX, log_everywhere

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(
        experiment_name="nonfinite", tracking_uri=uri, artifact_location=str(tmp_path / "a")
    )
    tr = trainer(tmp_path, [], logger=logger)
    log_everywhere(tr, {"a": math.nan, "b": -math.inf, "c": math.inf, "d": 2.0}, 1)
    client = MlflowClient(uri)
    run = client.get_run(logger.run_id)
    assert run.data.tags["nonfinite.a"] == "nan" and "a" not in run.data.metrics
    assert run.data.metrics["b"] == -FLOAT_MAX and run.data.metrics["c"] == FLOAT_MAX
    assert run.data.metrics["d"] == 2.0 and not any(
        t.startswith("nonfinite.") and t != "nonfinite.a" for t in run.data.tags
    )
    log_everywhere(tr, {"a": 0.5}, 2)  # finite again: the tag goes
    run = client.get_run(logger.run_id)
    assert "nonfinite.a" not in run.data.tags and run.data.metrics["a"] == 0.5
    log_everywhere(tr, {"a": math.nan}, 3)  # and comes back with the next NaN
    assert client.get_run(logger.run_id).data.tags["nonfinite.a"] == "nan"
    assert [m.value for m in client.get_metric_history(logger.run_id, "a")] == [0.5]
    # A resumed fit logs into the same run through a new logger: the tag from before goes as well.
    again = MLFlowLogger(tracking_uri=uri, run_id=logger.run_id)
    log_everywhere(trainer(tmp_path, [], logger=again), {"a": 0.25}, 4)
    assert "nonfinite.a" not in client.get_run(logger.run_id).data.tags


@pytest.mark.parametrize(
    ("rnn", "what"),
    [
        (nn.LSTM(3, H, batch_first=True, bidirectional=True), "bidirectional"),
        (nn.LSTM(3, H, batch_first=True, proj_size=4), "proj_size=4"),
        (nn.Linear(3, H), "Linear"),
    ],
    ids=["bidirectional", "proj_size", "not-an-rnn"],
)
def test_unsupported_fails_at_setup_in_one_line(tmp_path, rnn, what):
    from pipeline import BPTTProfileMonitor

    module = GRUClassifier()
    module.gru = rnn
    tr = trainer(tmp_path, [BPTTProfileMonitor("gru")], max_steps=1)
    with pytest.raises(ValueError, match="supported") as err:
        tr.fit(module, loader(cls_data()))
    msg = str(err.value)
    assert "\n" not in msg and what in msg and "nn.LSTM" in msg


def test_a_module_without_training_step_or_an_rnn_given_as_an_object_is_one_line():
    """``profile_rnn(nn.GRU(...), "", batch)``: a raw AttributeError ("'GRU' object has no attribute
    'training_step'"); ``rnn=model.gru`` (the RNN, not its path): "has no submodule GRU(3, 16)" (a
    walkthrough). Each says what it takes."""
    from pipeline import profile_rnn

    batch = first_batch(cls_data())
    with pytest.raises(ValueError, match=r"^GRU has no training_step\(batch, batch_idx\).*loss_fn=") as err:
        profile_rnn(nn.GRU(3, H, batch_first=True), "", batch)
    assert "\n" not in str(err.value)
    frame = profile_rnn(nn.GRU(3, H, batch_first=True), "", batch, loss_fn=lambda m, b: m(b[0])[0].sum())
    assert (frame["state"] == "h").sum() == T  # with a loss_fn, a bare RNN is profiled
    model = GRUClassifier()
    with pytest.raises(ValueError, match=r"^rnn must be the RNN's dotted attribute path .* got GRU$"):
        profile_rnn(model, model.gru, batch)


def test_packed_sequence_input_fails_in_one_line():
    from pipeline.training.probe import probe

    class Packed(GRUClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            packed = nn.utils.rnn.pack_padded_sequence(x, [T] * x.shape[0], batch_first=True)
            _, h_n = self.gru(packed)
            return nn.functional.cross_entropy(self.out(h_n[-1]), y)

    with pytest.raises(ValueError, match="PackedSequence") as err:
        probe(Packed(), "gru", first_batch(cls_data()))
    assert "\n" not in str(err.value)
    assert not getattr(err.value, "__notes__", None)  # the profile's own line: no note under it (a review)


def test_a_non_finite_probe_input_fails_in_one_line_and_a_diverged_model_is_still_measured():
    """One NaN in a GRU's probe batch read as the float64 forward overflowing at its step: verdict
    ``exploding`` on default weights, which read vanishing on clean data (a walkthrough). It is now one
    line naming the probe batch; a model whose own weights are NaN (diverged) is measured as before."""
    from pipeline.training.probe import probe

    x, y = first_batch(cls_data())  # a layer before the RNN: its input comes from the model's weights
    assert np.isfinite(probe(LayerBefore(3), "gru", (x, y)).metrics[-1]["bptt/log10_ratio"])
    bad = x.clone()
    bad[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="the probe batch gives 'gru' 3 non-finite input value") as err:
        probe(LayerBefore(3), "gru", (bad, y))  # the NaN reaches the GRU through all 3 outputs of inp
    assert "\n" not in str(err.value) and "give a probe batch of finite values" in str(err.value)
    diverged = LayerBefore(3)
    with torch.no_grad():
        diverged.inp.weight[0, 0] = float("nan")
    assert probe(diverged, "gru", (x, y)).metrics[-1]["bptt/overflow_step"] == 1  # measured as before


def test_a_monitor_with_a_nan_in_its_probe_batch_fails_at_its_first_pass(tmp_path):
    """The walkthrough's case, through the callback: a NaN in ``batch`` is one line at the first pass,
    before the first update, not a verdict ``exploding`` at the end."""
    from pipeline import BPTTProfileMonitor

    x, y = first_batch(cls_data())
    x = x.clone()
    x[2, 3, 0] = float("nan")
    module = GRUClassifier()
    before = [p.detach().clone() for p in module.parameters()]
    tr = trainer(tmp_path, [BPTTProfileMonitor("gru", batch=(x, y))], max_steps=3)
    with pytest.raises(ValueError, match="the probe batch gives 'gru' 1 non-finite input value") as err:
        tr.fit(module, loader(cls_data()))
    assert "\n" not in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))  # no update


def test_a_probe_batch_the_rnn_cannot_take_is_one_line_naming_it(tmp_path):
    """A probe batch of the wrong feature size or rank raised torch's own error from deep inside the
    monitor, naming neither the batch nor the monitor (a walkthrough). Now one line, before any update;
    an error of the user's step itself keeps its type and message, with a note saying where it ran."""
    from pipeline import BPTTProfileMonitor, profile_rnn

    x, y = first_batch(cls_data())
    module = GRUClassifier()
    before = [p.detach().clone() for p in module.parameters()]
    wide = torch.randn(x.shape[0], x.shape[1], 5)
    tr = trainer(tmp_path, [BPTTProfileMonitor("gru", batch=(wide, y))], max_steps=3)
    with pytest.raises(
        ValueError,
        match=r"^'gru' got an input of shape \[16, (\d+), 5\] on the gradient profile's probe batch "
        r"\(its tensors: \[16, \1, 5\], \[16\]\)",
    ) as err:
        tr.fit(module, loader(cls_data()))
    said = str(err.value)
    assert "\n" not in said and "input_size 3: [batch, T, 3], or [T, 3] unbatched" in said, said
    assert said.endswith(
        "the probe batch (batch=, else the first training batch) or the layers before 'gru' do not fit it"
    )
    assert not getattr(err.value, "__notes__", None)  # its own line says it all
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))  # no update
    with pytest.raises(ValueError, match=r"an input of shape \[16\] .*, which it cannot take"):
        profile_rnn(GRUClassifier(), "gru", (x[:, 0, 0], y))  # rank 1

    with pytest.raises(ValueError, match=r"shape \[16, \d+, 5\] .*\(its tensors: \[16, \d+, 3\], \[16\]\)"):
        profile_rnn(LayerBefore(5), "gru", (x, y))  # the model's own bug, the batch right: both shapes said
    with pytest.raises(ValueError, match="too many values to unpack") as err:  # no (x, y) pair: the user's
        profile_rnn(GRUClassifier(), "gru", (x, y, y))
    assert any(
        "GRUClassifier.training_step on the gradient profile's probe batch" in n for n in err.value.__notes__
    )

    def loss_fn(module, batch):
        return batch["missing"]

    with pytest.raises(KeyError) as err:  # the user's function, named as such (not GRUClassifier.loss_fn)
        profile_rnn(GRUClassifier(), "gru", {"x": x}, loss_fn=loss_fn)
    assert err.value.__notes__[0].startswith("(raised by loss_fn on the gradient profile's probe batch")


@pytest.mark.kernel_free
def test_import_pipeline_stays_light():
    code = (
        "import sys, pipeline; heavy = [m for m in ('torch', 'pytorch_lightning', 'mlflow', 'pandas') "
        "if m in sys.modules]; assert not heavy, heavy; "
        "from pipeline import GradientNormMonitor, BPTTProfileMonitor, profile_rnn; "
        "assert 'pytorch_lightning' in sys.modules; print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    import pipeline

    with pytest.raises(AttributeError, match="no attribute"):
        _ = pipeline.NoSuchThing


def test_custom_groups_sink_and_running_clip_rate(tmp_path):
    """The hooks the project's own trainer configures: a groups callable names the columns and metrics,
    a sink replaces trainer.loggers, ``grad/clip_rate`` is the fraction of every step so far."""
    from pipeline import GradientNormMonitor
    from pipeline.training import callbacks

    assert issubclass(callbacks.GradientMonitor, GradientNormMonitor)  # one implementation
    sent: list[tuple[dict, int]] = []
    gm = GradientNormMonitor(
        log_every_n_steps=3,
        groups=lambda m: {"rnn": list(m.gru.parameters()), "head": list(m.out.parameters())},
        sink=lambda metrics, step: sent.append((dict(metrics), step)),
        loss_metric="train/loss",
    )
    torch.manual_seed(0)
    tr = trainer(tmp_path, [gm], max_steps=10, gradient_clip_val=0.35)
    tr.fit(GRUClassifier(), loader(cls_data()))
    assert gm.fields == ("loss", "norm_preclip", "norm_postclip", "clip_coef", "norm_rnn", "norm_head")
    np.testing.assert_allclose(
        np.hypot(gm.column("norm_rnn"), gm.column("norm_head")), gm.column("norm_preclip")
    )
    assert [s for _, s in sent] == [3, 6, 9, 10]
    last = sent[-1][0]
    assert {"train/loss", "grad/norm_rnn", "grad/norm_head"} <= set(last) and "grad/norm_other" not in last
    rate = float((gm.column("clip_coef") < 1).mean())
    assert 0 < rate < 1  # some steps clipped, not all
    assert last["grad/clip_rate"] == pytest.approx(rate)  # every step so far, not the last window
    csvs = list(tmp_path.glob("csv/version_*/metrics.csv"))  # the sink, not trainer.loggers, got them
    assert not csvs or "grad/clip_rate" not in _read_csv_metrics(tmp_path).columns


def test_clip_rate_counts_finite_steps_and_a_zero_gradient_is_not_clipped():
    """A step's record from its squared group norms (post_clip_row): an all-zero gradient has nothing to
    clip (clip_coef 1, not clipped); a halved one reads 0.5. The running clip rate is over the finite
    steps only: a scaler-skipped or diverged step (clip_coef NaN) is neither clipped nor counted."""
    from pipeline import GradientNormMonitor
    from pipeline.training.grad_window import post_clip_row, window_stats

    zero = torch.zeros(2, dtype=torch.float64)
    row = post_clip_row(torch.tensor(1.0, dtype=torch.float64), zero, zero)
    assert row.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # loss, pre, post, coef, per-group norms
    sq = torch.tensor([9.0, 16.0], dtype=torch.float64)  # pre = 5
    row = post_clip_row(torch.tensor(2.0, dtype=torch.float64), sq, sq / 4)
    assert row[:4].tolist() == [2.0, 5.0, 2.5, 0.5]
    nan = math.nan
    col = {"norm_preclip": np.array([5.0, nan, 3.0, 0.0]), "clip_coef": np.array([0.5, nan, 1.0, 1.0])}
    assert window_stats(col, None) == (5.0, 1.0, 3)
    assert window_stats(col, 7.0) == (7.0, 1.0, 3)

    sent: list[dict] = []
    gm = GradientNormMonitor(log_every_n_steps=4, sink=lambda m, s: sent.append(dict(m)))
    gm.set_groups(["a", "b"])
    loss = torch.tensor(1.0, dtype=torch.float64)
    gm.push(post_clip_row(loss, sq, sq / 4), 0)  # clipped
    gm.push(torch.tensor([nan, nan, nan, nan, nan, nan], dtype=torch.float64), 1)  # skipped step
    gm.push(post_clip_row(loss, zero, zero), 2)  # zero gradient: not clipped
    gm.push(post_clip_row(loss, sq, sq), 3)  # below the threshold: not clipped
    assert gm.running() == (pytest.approx(1 / 3), 5.0)
    gm.drain()
    assert gm.clip_rate == pytest.approx(1 / 3) and sent[-1]["grad/clip_rate"] == pytest.approx(1 / 3)


def test_window_loss_is_the_mean_of_the_windows_steps():
    """``loss_metric`` logs the window's mean loss (finite steps only), while the norms are the last
    step's: a window with losses 1 and 3 logs train/loss 2 and the second step's pre-clip norm."""
    from pipeline import GradientNormMonitor
    from pipeline.training.grad_window import post_clip_row

    sent: list[dict] = []
    gm = GradientNormMonitor(
        log_every_n_steps=2, sink=lambda m, s: sent.append(dict(m)), loss_metric="train/loss"
    )
    gm.set_groups(["a", "b"])
    sq = torch.tensor([9.0, 16.0], dtype=torch.float64)  # pre = 5
    gm.push(post_clip_row(torch.tensor(1.0, dtype=torch.float64), sq, sq), 0)
    gm.push(post_clip_row(torch.tensor(3.0, dtype=torch.float64), sq * 4, sq * 4), 1)  # pre = 10
    gm.drain()
    assert sent[-1]["train/loss"] == pytest.approx(2.0) and sent[-1]["grad/norm_preclip"] == 10.0
    nan = math.nan
    gm.push(post_clip_row(torch.tensor(5.0, dtype=torch.float64), sq, sq), 2)
    gm.push(torch.tensor([nan] * 6, dtype=torch.float64), 3)  # a skipped step: not in the mean
    gm.drain()
    assert sent[-1]["train/loss"] == pytest.approx(5.0)


def test_a_parametrized_recurrent_weight_is_profiled_inside_fit(tmp_path):
    """README, "The float64 copy's loss": after a forward, nn.RNN keeps the orthogonal weight as last
    computed (a tensor with a grad_fn, which copy.deepcopy refuses); the copy takes its value and
    recomputes it. Every pass works, the weight's spectrum is orthogonal's (sigma_max = radius = 1), and
    the profile after training is full-graph float64 autograd's."""
    from pipeline import BPTTProfileMonitor, profile_rnn

    torch.manual_seed(0)
    model, pm = OrthogonalRNN(), BPTTProfileMonitor("rnn", every_n_steps=2)
    trainer(tmp_path, [pm], max_steps=4, log_every_n_steps=1).fit(model, loader(cls_data()))
    assert [p["step"] for p in pm.passes] == [0, 2, 4]
    for p in pm.passes:
        assert p["spectral/sigma_max"] == pytest.approx(1, abs=1e-6)
        assert p["spectral/radius"] == pytest.approx(1, abs=1e-6)
    assert pm.passes[0]["bptt/loss"] != pm.passes[-1]["bptt/loss"]  # the passes saw the trained weights
    batch = first_batch(cls_data())
    frame = profile_rnn(model, "rnn", batch)
    got = frame[frame["state"] == "h"].sort_values("t")["log10_norm"].to_numpy()
    np.testing.assert_allclose(got, autograd_profile(model, "rnn", batch)[(0, "h")], atol=1e-9, rtol=0)


@pytest.mark.kernel_free
def test_the_example_file_runs_as_the_readme_says(tmp_path):
    """`python examples/own_model.py --mlflow` (README, "Your own model": "the whole runnable version"):
    it ran, but no test did. Its printed numbers against the store it logged to."""
    import os
    import re

    from mlflow.tracking import MlflowClient

    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "own_model.py"), "--steps", "20", "--mlflow"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "steps 20;" in r.stdout and "  step    0: bptt/log10_ratio" in r.stdout, r.stdout
    out = re.search(r"metrics: (\S+)/csv", r.stdout).group(1)
    assert f"mlflow: sqlite:///{out}/mlflow.db (experiment own-model)" in r.stdout  # where to look
    c = MlflowClient(f"sqlite:///{out}/mlflow.db")
    (run,) = c.search_runs([c.get_experiment_by_name("own-model").experiment_id])
    assert run.info.status == "FINISHED"
    assert f"regime: {run.data.tags['regime']};" in r.stdout
    printed = float(re.search(r"max pre-clip norm (\S+);", r.stdout).group(1))
    assert printed == pytest.approx(
        run.data.metrics["grad/max_norm_preclip"], rel=5e-3
    )  # printed to 3 digits
    top = float(re.search(r"step   20: bptt/log10_ratio (\S+) ", r.stdout).group(1))
    assert top == pytest.approx(run.data.metrics["bptt/log10_ratio"], abs=0.006)
    assert "diagnostics/bptt_profile.parquet" in [
        a.path for a in c.list_artifacts(run.info.run_id, "diagnostics")
    ]
    # all in its temp dir: the artifacts went to ./mlruns of the working directory (a walkthrough)
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(out)]
    assert run.info.artifact_uri.startswith(f"{out}/mlartifacts/"), run.info.artifact_uri
