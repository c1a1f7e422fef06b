"""The public callbacks under the ways researchers train their own LightningModule (README, "Your own
model", "Manual optimization, accumulation, mixed precision"): manual optimization (truncated BPTT, two
optimizers), gradient accumulation and a loss scaler (``precision="16-mixed"``). Every number is checked
against an independent reading taken by the module itself or by a plain callback, not by the monitor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tests.test_api import H, T, V, autograd_profile, cls_data, first_batch, lm_data, loader, trainer

pl = pytest.importorskip("pytorch_lightning")

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


def norm_of(params, scale: float = 1.0) -> float:
    """The global gradient norm of ``params`` in float64, gradients divided by ``scale`` first."""
    gs = [p.grad.double() / scale for p in params if p.grad is not None]
    return math.sqrt(sum(float(g.square().sum()) for g in gs)) if gs else 0.0


class ManualGRU(pl.LightningModule):
    """Manual optimization as Lightning documents it: backward, the module's own clipping, step; with
    ``micro`` > 1 the batch is split and its gradients accumulated before the one step. The gradient
    norm before and after the clipping is read here, independently of the monitor."""

    def __init__(self, clip: float = 0.5, micro: int = 1):
        super().__init__()
        self.automatic_optimization = False
        self.clip, self.micro = clip, micro
        self.gru = nn.GRU(3, H, batch_first=True)
        self.out = nn.Linear(H, 4)
        self.seen: dict[str, list[float]] = {"loss": [], "pre": [], "post": []}

    def loss(self, x, y):
        _, h_n = self.gru(x)
        return nn.functional.cross_entropy(self.out(h_n[-1]), y)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        total = 0.0
        for x, y in zip(*(b.chunk(self.micro) for b in batch), strict=True):
            part = self.loss(x, y) / self.micro
            self.manual_backward(part)
            total += float(part.detach())
        self.seen["loss"].append(total)
        self.seen["pre"].append(norm_of(self.parameters()))
        self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        self.seen["post"].append(norm_of(self.parameters()))
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


@pytest.mark.parametrize("micro", [1, 2], ids=["one-backward", "two-backward-accumulated"])
def test_manual_optimization_reads_the_norm_before_the_modules_own_clipping(tmp_path, micro):
    from pipeline import GradientNormMonitor

    torch.manual_seed(0)
    model = ManualGRU(clip=0.33, micro=micro)
    gm = GradientNormMonitor(log_every_n_steps=4)
    trainer(tmp_path, [gm], max_steps=12, log_every_n_steps=1).fit(model, loader(cls_data()))
    seen = {k: np.asarray(v) for k, v in model.seen.items()}
    assert len(gm.history) == len(seen["pre"]) == 12
    np.testing.assert_allclose(gm.column("norm_preclip"), seen["pre"], rtol=1e-6)
    np.testing.assert_allclose(gm.column("norm_postclip"), seen["post"], rtol=1e-6)
    np.testing.assert_allclose(gm.column("loss"), seen["loss"], rtol=1e-6)
    clipped = seen["pre"] > 0.33 * (1 + 1e-6)
    assert 0 < clipped.sum() < 12, "the test needs clipped and unclipped steps"
    assert gm.clip_rate == pytest.approx(clipped.mean())
    assert np.all(gm.column("norm_postclip") <= 0.33 * (1 + 1e-6))


class AccumulatingGRU(pl.LightningModule):
    """Automatic optimization; records each micro-batch's loss (Lightning divides it by N before backward)."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, H, batch_first=True)
        self.out = nn.Linear(H, 4)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, h_n = self.gru(x)
        loss = nn.functional.cross_entropy(self.out(h_n[-1]), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class PreStep(pl.Callback):
    """The global gradient norm where Lightning calls on_before_optimizer_step (after unscaling, before
    clipping): the independent reading for automatic optimization."""

    def __init__(self):
        self.pre: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.pre.append(norm_of(pl_module.parameters()))


def test_accumulated_step_records_the_mean_micro_batch_loss(tmp_path):
    from pipeline import GradientNormMonitor

    torch.manual_seed(0)
    model, gm, ref = AccumulatingGRU(), GradientNormMonitor(log_every_n_steps=3), PreStep()
    t = trainer(
        tmp_path,
        [ref, gm],
        max_steps=6,
        log_every_n_steps=1,
        accumulate_grad_batches=4,
        gradient_clip_val=0.3,
    )
    t.fit(model, loader(cls_data(n=16 * 24), bs=16))
    assert t.global_step == 6 and len(model.losses) == 24
    np.testing.assert_allclose(gm.column("loss"), np.asarray(model.losses).reshape(6, 4).mean(1), rtol=1e-6)
    np.testing.assert_allclose(gm.column("norm_preclip"), ref.pre, rtol=1e-6)
    assert np.all(gm.column("norm_postclip") <= 0.3 * (1 + 1e-6))


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with the recurrent layer and the head under separate optimizers (different
    learning rates): one backward, the RNN's gradient clipped, both stepped."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.gru = nn.GRU(3, H, batch_first=True)
        self.out = nn.Linear(H, 4)
        self.seen: list[tuple[str, float, float]] = []

    def training_step(self, batch, batch_idx):
        rnn_opt, head_opt = self.optimizers()
        rnn_opt.zero_grad()
        head_opt.zero_grad()
        x, y = batch
        _, h_n = self.gru(x)
        loss = nn.functional.cross_entropy(self.out(h_n[-1]), y)
        self.manual_backward(loss)
        self.seen.append(("rnn", float(loss.detach()), norm_of(self.gru.parameters())))
        self.clip_gradients(rnn_opt, gradient_clip_val=0.2, gradient_clip_algorithm="norm")
        rnn_opt.step()
        self.seen.append(("head", float(loss.detach()), norm_of(self.out.parameters())))
        head_opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.gru.parameters(), lr=0.5), torch.optim.Adam(self.out.parameters(), 1e-2)


def test_two_optimizers_each_step_is_measured_on_its_own_parameters(tmp_path):
    from pipeline import GradientNormMonitor

    torch.manual_seed(0)
    model, gm = TwoOptimizers(), GradientNormMonitor(log_every_n_steps=4)
    t = trainer(tmp_path, [gm], max_steps=8, log_every_n_steps=1)
    t.fit(model, loader(cls_data()))
    assert t.global_step == 8 and len(gm.history) == 8  # Lightning counts every optimizer's step
    who = [w for w, _, _ in model.seen]
    np.testing.assert_allclose(gm.column("norm_preclip"), [n for _, _, n in model.seen], rtol=1e-6)
    np.testing.assert_allclose(gm.column("loss"), [v for _, v, _ in model.seen], rtol=1e-6)
    rnn = np.array([w == "rnn" for w in who])
    assert np.all(gm.column("norm_other")[rnn] == 0) and np.all(gm.column("norm_recurrent")[rnn] > 0)
    assert np.all(gm.column("norm_recurrent")[~rnn] == 0) and np.all(gm.column("norm_other")[~rnn] > 0)
    np.testing.assert_array_equal(gm.column("norm_postclip")[~rnn], gm.column("norm_preclip")[~rnn])
    assert np.all(gm.column("norm_postclip")[rnn] <= 0.2 * (1 + 1e-6))


# ------------------------------------------------------------------------------------ loss scaler


class ScaledGRU(pl.LightningModule):
    """A GRU under a loss scaler; records its own (unscaled) loss per step; ``manual`` steps itself and
    reads the unscaled gradient norm after backward."""

    def __init__(self, manual: bool):
        super().__init__()
        self.automatic_optimization = not manual
        self.gru = nn.GRU(3, H, batch_first=True)
        self.out = nn.Linear(H, 4)
        self.losses: list[float] = []
        self.pre: list[float] = []

    def loss(self, batch):
        x, y = batch
        _, h_n = self.gru(x)
        loss = nn.functional.cross_entropy(self.out(h_n[-1]).float(), y)
        self.losses.append(float(loss.detach()))
        return loss

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return self.loss(batch)
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self.loss(batch))
        self.pre.append(norm_of(self.parameters(), self.trainer.precision_plugin.scaler.get_scale()))
        opt.step()
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_loss_scaler_overflow_is_a_skipped_step_not_divergence(tmp_path, manual):
    """``precision="16-mixed"`` on a GPU starts its torch.amp.GradScaler at 2**16 and halves it at each
    overflow, skipping that update. Here (CPU, float16 autocast) the scale starts at 2**22, so the first
    steps overflow: the monitor must count them as the scaler's, train on, and read the loss and the
    gradient unscaled."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    from pipeline import GradientNormMonitor

    torch.manual_seed(0)
    init = 2.0**22
    scaler = torch.amp.GradScaler("cpu", init_scale=init)  # growth_interval 2000: it only shrinks here
    model, gm, ref = ScaledGRU(manual), GradientNormMonitor(log_every_n_steps=5), PreStep()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    t = trainer(tmp_path, [ref, gm], max_steps=30, log_every_n_steps=1, plugins=[plugin])
    t.fit(model, loader(cls_data()))
    assert gm.diverged_step is None and t.global_step == 30
    skips = round(math.log2(init / scaler.get_scale()))
    assert skips > 0 and gm.scaler_skips == skips, (gm.scaler_skips, skips)
    pre, post = gm.column("norm_preclip"), gm.column("norm_postclip")
    skipped = ~np.isfinite(pre)
    assert skipped.sum() == skips and np.isnan(post[skipped]).all()
    np.testing.assert_allclose(gm.column("loss"), model.losses, rtol=1e-6)  # unscaled
    want = np.asarray(model.pre if manual else ref.pre)
    np.testing.assert_allclose(pre[~skipped], want[~skipped], rtol=1e-5)
    assert gm.clip_rate == 0.0 and gm.max_norm_preclip == pytest.approx(want[~skipped].max())
    import pandas as pd

    logged = pd.read_csv(next(tmp_path.glob("csv/*/metrics.csv")))
    assert logged["grad/scaler_skips"].dropna().iloc[-1] == skips


# ------------------------------------------------------------------------------------ the profile


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
    ref = autograd_profile(model, "lstm", batch, loss_fn=full_loss)
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
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")
@pytest.mark.parametrize("at", [12, 9], ids=["at-a-pass", "between-passes"])
def test_resumed_fit_keeps_running_statistics_and_passes(tmp_path, at):
    """``trainer.fit(ckpt_path=...)`` with new monitor instances, from a checkpoint taken mid-run by
    ModelCheckpoint (steps 10 and 11 still in the monitor's unlogged window): the clip rate, largest
    norm, passes and verdict cover the whole run, equal to the uninterrupted run's; the checkpoint loads
    with ``weights_only=True``."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from pipeline import BPTTProfileMonitor, GradientNormMonitor

    def fit(extra=(), ckpt=None):
        gm = GradientNormMonitor(log_every_n_steps=5)
        pm = BPTTProfileMonitor("gru", every_n_steps=6)
        t = trainer(
            tmp_path,
            [gm, pm, *extra],
            max_steps=24,
            log_every_n_steps=1,
            gradient_clip_val=0.3,
            enable_checkpointing=bool(extra),
        )
        # one batch an epoch: the resumed fit sees the batches the uninterrupted one saw (Lightning does not
        # resume a plain DataLoader mid-epoch), so the two runs' numbers can be compared exactly
        torch.manual_seed(0)
        t.fit(AccumulatingGRU(), loader(cls_data(n=16)), ckpt_path=ckpt)
        return gm, pm

    saver = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=at, save_top_k=-1, filename="{step}")
    g_ref, p_ref = fit([saver])  # uninterrupted, with a checkpoint at step `at`
    ckpt = tmp_path / "ck" / f"step={at}.ckpt"
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    key = "BPTTProfileMonitor{'rnn': 'gru', 'every_n_steps': 6}"
    gkey = "GradientNormMonitor{'log_every_n_steps': 5, 'loss_metric': None}"
    assert set(state) >= {gkey, key}
    assert state[gkey]["counted"] == at  # the logged steps and the pending ones (steps 10-11, or 5-8)
    x0 = first_batch(cls_data(n=16))[0].double()
    assert torch.equal(state[key]["batch"][0], x0)  # the default probe batch: the first one
    fresh = BPTTProfileMonitor("gru")
    fresh.load_state_dict(state[key])
    assert torch.equal(fresh.batch[0], x0) and [q["step"] for q in fresh.passes] == [0, 6, 12][: 1 + at // 6]

    g, p = fit(ckpt=str(ckpt))
    assert len(g.history) == 24 - at  # the steps from `at` on here; the statistics below are over all 24
    ref_rate = g_ref.clip_rate
    assert 0 < ref_rate < 1 and ref_rate != (g.column("clip_coef") < 1).mean()
    assert g.clip_rate == pytest.approx(ref_rate, abs=1e-12)
    assert g.max_norm_preclip == pytest.approx(g_ref.max_norm_preclip, rel=1e-9)
    assert [q["step"] for q in p.passes] == [q["step"] for q in p_ref.passes] == [0, 6, 12, 18, 24]
    for got, want in zip(p.passes, p_ref.passes, strict=True):
        assert got["bptt/log10_ratio"] == pytest.approx(want["bptt/log10_ratio"], rel=1e-9, abs=1e-9)
    assert sorted(p.profile_frame()["step"].unique()) == [0, 6, 12, 18, 24]
    assert p.regime == p_ref.regime


# ------------------------------------------------------------------------------------ code written for a Trainer


class StateInside(pl.LightningModule):
    """A GRU whose initial state is made inside training_step in float32 (the tutorial pattern), reading
    the Trainer (``self.optimizers()``) when ``reads_trainer``, adding input noise when ``noise``."""

    def __init__(self, reads_trainer: bool = False, noise: str | None = None):
        super().__init__()
        self.reads_trainer, self.noise = reads_trainer, noise
        self.gru = nn.GRU(3, H, batch_first=True)
        self.out = nn.Linear(H, 4)

    def loss(self, batch):
        x, y = batch
        if self.noise == "torch":
            x = x + 0.1 * torch.randn_like(x)
        elif self.noise == "numpy":
            x = x + torch.as_tensor(0.1 * np.random.standard_normal(tuple(x.shape)), dtype=x.dtype)
        h0 = torch.zeros(1, x.size(0), H).to(x.device)
        _, h_n = self.gru(x, h0)
        return nn.functional.cross_entropy(self.out(h_n[-1]), y)

    def training_step(self, batch, batch_idx):
        if self.reads_trainer:
            self.log("lr", self.optimizers().param_groups[0]["lr"])
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_profile_of_a_float32_state_made_in_training_step_equals_autograd():
    from pipeline import profile_rnn

    torch.manual_seed(0)
    model, batch = StateInside(), first_batch(cls_data())
    frame = profile_rnn(model, "gru", batch)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the reference runs the same training_step in float64 too
    try:
        ref = autograd_profile(model, "gru", batch)
    finally:
        torch.set_default_dtype(default)
    assert torch.get_default_dtype() == default, "the profile left the default dtype changed"
    got = frame[frame["state"] == "h"].sort_values("t")["log10_norm"].to_numpy()
    np.testing.assert_allclose(got, ref[(0, "h")], atol=1e-9, rtol=0)


def test_training_step_that_reads_its_trainer_is_named_and_loss_fn_profiles_it(tmp_path):
    from pipeline import BPTTProfileMonitor, profile_rnn

    model, batch = StateInside(reads_trainer=True), first_batch(cls_data())
    with pytest.raises(
        ValueError, match=r"^StateInside training_step needs its Trainer .*pass loss_fn="
    ) as e:
        profile_rnn(model, "gru", batch)
    assert "\n" not in str(e.value)
    pm = BPTTProfileMonitor("gru", every_n_steps=4, loss_fn=lambda m, b: m.loss(b))
    trainer(tmp_path, [pm], max_steps=8, log_every_n_steps=1).fit(model, loader(cls_data()))
    assert [p["step"] for p in pm.passes] == [0, 4, 8]


@pytest.mark.parametrize("noise", ["torch", "numpy"])
def test_profile_passes_do_not_change_what_training_draws(tmp_path, noise):
    """Input noise drawn in training_step: the same seed trains to the same weights with and without
    profile passes (each pass runs training_step on the copy, drawing from the same generators)."""
    from pipeline import BPTTProfileMonitor

    def weights(callbacks):
        torch.manual_seed(0)
        np.random.seed(0)
        model = StateInside(noise=noise)
        trainer(tmp_path, callbacks, max_steps=8, log_every_n_steps=1).fit(model, loader(cls_data()))
        return model.state_dict()

    plain = weights([])
    profiled = weights([BPTTProfileMonitor("gru", every_n_steps=2)])
    assert all(torch.equal(plain[k], profiled[k]) for k in plain)


def test_dataclass_and_dict_subclass_batches_profile_as_autograd():
    import dataclasses

    from pipeline import profile_rnn

    @dataclasses.dataclass
    class XY:
        x: torch.Tensor
        y: torch.Tensor

    class AttrDict(dict):
        __getattr__ = dict.__getitem__

    class Reads(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(3, H, batch_first=True)
            self.out = nn.Linear(H, 4)

        def training_step(self, batch, batch_idx):
            _, h_n = self.gru(batch.x)
            return nn.functional.cross_entropy(self.out(h_n[-1]), batch.y)

    torch.manual_seed(0)
    model = Reads()
    x, y = first_batch(cls_data())
    for batch in (XY(x, y), AttrDict(x=x, y=y)):
        frame = profile_rnn(model, "gru", batch)
        ref = autograd_profile(model, "gru", batch)
        got = frame[frame["state"] == "h"].sort_values("t")["log10_norm"].to_numpy()
        np.testing.assert_allclose(got, ref[(0, "h")], atol=1e-9, rtol=0)


def test_a_module_deepcopy_refuses_is_named_in_one_line():
    import threading

    from pipeline import profile_rnn

    model = AccumulatingGRU()
    model.lock = threading.Lock()
    with pytest.raises(ValueError, match=r"float64 copy of AccumulatingGRU.*deepcopy failed") as e:
        profile_rnn(model, "gru", first_batch(cls_data()))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ where gradients change


class ClipsAfterBackward(AccumulatingGRU):
    """Clips in its own on_after_backward (Lightning calls the callbacks' hook first)."""

    def on_after_backward(self):
        torch.nn.utils.clip_grad_norm_(self.parameters(), 0.3)


class AfterBackward(pl.Callback):
    def __init__(self):
        self.pre: list[float] = []

    def on_after_backward(self, trainer, pl_module):
        self.pre.append(norm_of(pl_module.parameters()))


def test_clipping_in_the_modules_on_after_backward_is_seen(tmp_path):
    from pipeline import GradientNormMonitor

    torch.manual_seed(0)
    ref, gm = AfterBackward(), GradientNormMonitor(log_every_n_steps=4)
    trainer(tmp_path, [ref, gm], max_steps=12, log_every_n_steps=1).fit(
        ClipsAfterBackward(), loader(cls_data())
    )
    np.testing.assert_allclose(gm.column("norm_preclip"), ref.pre, rtol=1e-6)
    clipped = np.asarray(ref.pre) > 0.3 * (1 + 1e-6)
    assert 0 < clipped.sum() < 12 and gm.clip_rate == pytest.approx(clipped.mean())


class Unfreezes(pl.Callback):
    """At step 4, unfreeze the GRU and hand it to the optimizer (what BackboneFinetuning does)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 4 and not pl_module.gru.weight_hh_l0.requires_grad:
            pl_module.gru.requires_grad_(True)
            trainer.optimizers[0].add_param_group({"params": list(pl_module.gru.parameters())})


def test_parameters_handed_to_the_optimizer_during_training_are_measured(tmp_path):
    from pipeline import GradientNormMonitor

    class Frozen(AccumulatingGRU):
        def configure_optimizers(self):
            self.gru.requires_grad_(False)
            return torch.optim.SGD(self.out.parameters(), lr=0.5)

    torch.manual_seed(0)
    ref, gm = PreStep(), GradientNormMonitor(log_every_n_steps=4)
    trainer(tmp_path, [Unfreezes(), ref, gm], max_steps=8, log_every_n_steps=1).fit(
        Frozen(), loader(cls_data())
    )
    np.testing.assert_allclose(gm.column("norm_preclip"), ref.pre, rtol=1e-6)
    rec = gm.column("norm_recurrent")
    assert np.all(rec[:4] == 0) and np.all(rec[4:] > 0)


def test_sparse_embedding_gradients_are_measured(tmp_path):
    from pipeline import GradientNormMonitor

    class Sparse(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, 8, sparse=True)
            self.lstm = nn.LSTM(8, H, batch_first=True)
            self.head = nn.Linear(H, V)

        def training_step(self, batch, batch_idx):
            x, y = batch
            out, _ = self.lstm(self.embed(x))
            return nn.functional.cross_entropy(self.head(out).reshape(-1, V), y.reshape(-1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Dense(pl.Callback):
        def __init__(self):
            self.pre: list[float] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            gs = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in pl_module.parameters()]
            self.pre.append(math.sqrt(sum(float(g.double().square().sum()) for g in gs)))

    torch.manual_seed(0)
    ref, gm = Dense(), GradientNormMonitor(log_every_n_steps=4)
    trainer(tmp_path, [ref, gm], max_steps=8, log_every_n_steps=1).fit(Sparse(), loader(lm_data()))
    np.testing.assert_allclose(gm.column("norm_preclip"), ref.pre, rtol=1e-6)


def test_bfloat16_gradients_are_summed_in_float32(tmp_path):
    from pipeline import GradientNormMonitor

    torch.manual_seed(0)
    ref, gm = PreStep(), GradientNormMonitor(log_every_n_steps=4)
    t = trainer(tmp_path, [ref, gm], max_steps=6, log_every_n_steps=1, precision="bf16-true")
    t.fit(AccumulatingGRU(), loader(cls_data()))
    np.testing.assert_allclose(gm.column("norm_preclip"), ref.pre, rtol=2e-7)  # bf16 alone: off by ~1e-4


# ------------------------------------------------------------------------------------ the run's bookkeeping


@pytest.mark.parametrize("order", ["grads-first", "profile-first"])
def test_verdict_does_not_depend_on_the_callbacks_order(tmp_path, order):
    from pipeline import BPTTProfileMonitor, GradientNormMonitor
    from pipeline.config import DiagnosticsConfig

    torch.manual_seed(0)
    gm = GradientNormMonitor(log_every_n_steps=50)  # the 8 steps stay in one unlogged window to the end
    pm = BPTTProfileMonitor("gru", every_n_steps=0, diagnostics=DiagnosticsConfig(explode_norm=0.1))
    cbs = [gm, pm] if order == "grads-first" else [pm, gm]
    trainer(tmp_path, cbs, max_steps=8, log_every_n_steps=1).fit(AccumulatingGRU(), loader(cls_data()))
    assert gm.max_norm_preclip > 0.1 and pm.regime == "exploding"


def test_diverged_step_is_the_first_non_finite_step_under_min_steps(tmp_path):
    from pipeline import GradientNormMonitor
    from tests.test_api import LSTMLanguageModel

    gm = GradientNormMonitor(log_every_n_steps=2)
    model = LSTMLanguageModel(nan_at=3)
    t = trainer(tmp_path, [gm], max_steps=20, min_steps=10, log_every_n_steps=1)
    t.fit(model, loader(lm_data()))
    assert t.global_step == 10 and gm.diverged_step == 3  # Lightning went on to min_steps
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_second_fit_records_afresh_and_bad_every_n_steps(tmp_path):
    from pipeline import BPTTProfileMonitor, GradientNormMonitor

    with pytest.raises(ValueError, match="every_n_steps must be >= 0"):
        BPTTProfileMonitor("gru", every_n_steps=-3)
    gm, pm = GradientNormMonitor(log_every_n_steps=4), BPTTProfileMonitor("gru", every_n_steps=4)
    for _ in range(2):
        trainer(tmp_path, [gm, pm], max_steps=8, log_every_n_steps=1).fit(
            AccumulatingGRU(), loader(cls_data())
        )
        assert [p["step"] for p in pm.passes] == [0, 4, 8] and len(gm.history) == 8
        assert sorted(pm.profile_frame()["step"].unique()) == [0, 4, 8]


def test_two_monitors_of_a_kind_share_a_trainer_and_keep_their_own_state(tmp_path):
    """Lightning refuses two stateful callbacks with one ``state_key``: the keys name the settings."""
    from pipeline import BPTTProfileMonitor, GradientNormMonitor

    torch.manual_seed(0)
    fine, coarse = GradientNormMonitor(log_every_n_steps=1), GradientNormMonitor(log_every_n_steps=4)
    p2, p4 = BPTTProfileMonitor("gru", every_n_steps=2), BPTTProfileMonitor("gru", every_n_steps=4)
    t = trainer(tmp_path, [fine, coarse, p2, p4], max_steps=8, log_every_n_steps=1)
    t.fit(AccumulatingGRU(), loader(cls_data()))
    np.testing.assert_array_equal(fine.column("norm_preclip"), coarse.column("norm_preclip"))
    assert [q["step"] for q in p2.passes] == [0, 2, 4, 6, 8] and [q["step"] for q in p4.passes] == [0, 4, 8]
    assert len({c.state_key for c in (fine, coarse, p2, p4)}) == 4


def test_a_gradient_non_finite_at_scale_one_is_divergence_not_the_scalers(tmp_path):
    """A NaN gradient under a finite loss on every step: the scaler halves 16 -> 1 skipping 4 updates;
    at scale 1 the gradient is non-finite unscaled, which is divergence."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    from pipeline import GradientNormMonitor

    class NaNGrad(ScaledGRU):
        def __init__(self):
            super().__init__(manual=False)
            self.out.weight.register_hook(lambda g: g * float("nan"))

    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    gm = GradientNormMonitor(log_every_n_steps=5)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    t = trainer(tmp_path, [gm], max_steps=30, log_every_n_steps=1, plugins=[plugin])
    t.fit(NaNGrad(), loader(cls_data()))
    assert gm.scaler_skips == 4 and gm.diverged_step == 4 and t.global_step == 5


def test_a_group_mixing_float64_and_bfloat16_gradients(tmp_path):
    from pipeline import GradientNormMonitor

    class Mixed(AccumulatingGRU):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * self.scale.float()

    torch.manual_seed(0)
    model = Mixed()
    model.gru.to(torch.bfloat16)
    model.out.to(torch.bfloat16)
    ref, gm = PreStep(), GradientNormMonitor(log_every_n_steps=4)

    class Cast(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batch[0].data = batch[0].data.to(torch.bfloat16)

    trainer(tmp_path, [Cast(), ref, gm], max_steps=4, log_every_n_steps=1).fit(model, loader(cls_data()))
    assert {p.grad.dtype for p in model.parameters()} == {torch.float64, torch.bfloat16}
    np.testing.assert_allclose(gm.column("norm_preclip"), ref.pre, rtol=2e-7)


def test_an_unrelated_runtime_error_in_training_step_is_not_relabelled():
    from pipeline import profile_rnn

    class Fails(AccumulatingGRU):
        def training_step(self, batch, batch_idx):
            super().training_step(batch, batch_idx)
            raise RuntimeError("one of the variables needed was modified: [torch.DoubleTensor [4]]")

    with pytest.raises(RuntimeError, match="modified: .torch.DoubleTensor"):
        profile_rnn(Fails(), "gru", first_batch(cls_data()))
