"""The public callbacks under the ways researchers train their own LightningModule (README, "Your own
model", "Manual optimization, accumulation, mixed precision"): manual optimization (truncated BPTT, two
optimizers), gradient accumulation and a loss scaler (``precision="16-mixed"``). Every number is checked
against an independent reading taken by the module itself or by a plain callback, not by the monitor."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tests.test_api import H, cls_data, first_batch, loader, trainer

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


def test_accumulated_step_records_the_mean_micro_batch_loss(tmp_path, monkeypatch):
    from pipeline import GradientNormMonitor
    from pipeline.training import grad_monitor

    reads = []  # the group norms computed: once before and once after each step, not per micro-batch
    real = grad_monitor.group_sq
    monkeypatch.setattr(grad_monitor, "group_sq", lambda *a: reads.append(1) or real(*a))
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
    assert len(reads) == 2 * 6


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
    logged: list[tuple[int, dict]] = []
    model = TwoOptimizers()
    gm = GradientNormMonitor(log_every_n_steps=4, sink=lambda m, step: logged.append((step, m)))
    t = trainer(tmp_path, [gm], max_steps=8, log_every_n_steps=1)
    t.fit(model, loader(cls_data()))
    assert t.global_step == 8 and len(gm.history) == 8  # Lightning counts every optimizer's step
    who = [w for w, _, _ in model.seen]
    np.testing.assert_allclose(gm.column("norm_preclip"), [n for _, _, n in model.seen], rtol=1e-6)
    np.testing.assert_allclose(gm.column("loss"), [v for _, v, _ in model.seen], rtol=1e-6)
    rnn = np.array([w == "rnn" for w in who])
    assert np.all(gm.column("norm_other")[rnn] == 0) and np.all(gm.column("norm_recurrent")[rnn] > 0)
    assert np.all(gm.column("norm_recurrent")[~rnn] == 0) and np.all(gm.column("norm_other")[~rnn] > 0)
    # each window (two batches, four steps) logs each optimizer's last step at its own step: the clipped
    # recurrent optimizer's norms are not hidden behind the head's
    assert [step for step, _ in logged] == [3, 4, 7, 8]
    for step, m in logged:
        assert m["grad/norm_preclip"] == pytest.approx(gm.column("norm_preclip")[step - 1], rel=1e-12)
        assert m["grad/norm_postclip"] == pytest.approx(gm.column("norm_postclip")[step - 1], rel=1e-12)
    assert [("grad/clip_rate" in m, m["grad/norm_recurrent"] > 0) for _, m in logged] == [
        (False, True),
        (True, False),
        (False, True),
        (True, False),
    ]
    assert all(m["grad/norm_postclip"] <= 0.2 * (1 + 1e-6) for _, m in logged[::2])  # clipped at 0.2
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
    # README, "In a Lightning checkpoint": scaler_skips is kept, so a resumed fit goes on counting them
    t.save_checkpoint(tmp_path / "end.ckpt")
    state = torch.load(tmp_path / "end.ckpt", weights_only=True)["callbacks"]
    fresh = GradientNormMonitor(log_every_n_steps=5)
    fresh.load_state_dict(state["GradientNormMonitor{'log_every_n_steps': 5, 'loss_metric': None}"])
    assert fresh.scaler_skips == skips and fresh.max_norm_preclip == gm.max_norm_preclip


def test_a_direct_backward_under_a_loss_scaler_overflows_as_the_scalers_skip(tmp_path):
    """Manual optimization that scales and backpropagates by hand (``scaler.scale(loss).backward()``, not
    through Lightning): the monitor sees no loss (NaN in its record), and an overflow at a scale above 1
    is still the scaler's skipped step, not divergence (review: a NaN loss first read as divergence)."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    from pipeline import GradientNormMonitor

    class Direct(ScaledGRU):
        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.trainer.precision_plugin.scaler.scale(self.loss(batch)).backward()
            opt.step()

    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22)
    gm = GradientNormMonitor(log_every_n_steps=5)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    t = trainer(tmp_path, [gm], max_steps=20, log_every_n_steps=1, plugins=[plugin])
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        t.fit(Direct(manual=True), loader(cls_data()))
    # said once: with self.clip_gradients, the clip rate and the largest norm read the clipped norms
    ours = [w for w in said if "no backward through Lightning before this optimizer step" in str(w.message)]
    assert len(ours) == 1 and "self.manual_backward(loss)" in str(ours[0].message), [
        str(w.message) for w in said
    ]
    assert gm.diverged_step is None and t.global_step == 20
    assert gm.scaler_skips == round(math.log2(2.0**22 / scaler.get_scale())) > 0
    assert np.isnan(gm.column("loss")).all()


# ------------------------------------------------------------------------------------ the profile


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


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")
def test_a_fit_resumed_at_max_steps_makes_the_last_pass_and_the_verdict(tmp_path):
    """A job stopped after its last checkpoint (at max_steps), during its end-of-run work: its resume
    trains no step and Lightning runs no train-end hook. The resumed monitor makes the last pass (step
    24; the checkpoint's end at 20), the verdict and the MLflow tag and artifacts the uninterrupted run
    made; it had no verdict, no tag and no artifacts (a walkthrough)."""
    import mlflow
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import MLFlowLogger

    from pipeline import BPTTProfileMonitor

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def fit(extra=(), ckpt=None, run_id=None):
        pm = BPTTProfileMonitor("gru", every_n_steps=5)
        lg = MLFlowLogger("e", tracking_uri=uri, run_id=run_id, artifact_location=str(tmp_path / "art"))
        t = trainer(
            tmp_path, [pm, *extra], lg, max_steps=24, log_every_n_steps=1, enable_checkpointing=bool(extra)
        )
        torch.manual_seed(0)
        t.fit(AccumulatingGRU(), loader(cls_data(n=16)), ckpt_path=ckpt)
        return pm, lg

    saver = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=24, filename="{step}")
    ref, _ = fit([saver])
    ckpt = tmp_path / "ck" / "step=24.ckpt"
    key = "BPTTProfileMonitor{'rnn': 'gru', 'every_n_steps': 5}"
    saved = torch.load(ckpt, weights_only=True)["callbacks"][key]["passes"]
    assert [q["step"] for q in saved] == [0, 5, 10, 15, 20]  # the pass at 24 is made at train end
    c = mlflow.MlflowClient(uri)
    run = c.create_run(c.get_experiment_by_name("e").experiment_id)  # the stopped run's, resumed into
    p, lg = fit(ckpt=str(ckpt), run_id=run.info.run_id)
    assert [q["step"] for q in p.passes] == [q["step"] for q in ref.passes] == [0, 5, 10, 15, 20, 24]
    assert p.passes[-1]["bptt/log10_ratio"] == pytest.approx(ref.passes[-1]["bptt/log10_ratio"], rel=1e-9)
    assert p.regime == ref.regime is not None and p.regime_reason == ref.regime_reason
    assert c.get_run(run.info.run_id).data.tags["regime"] == ref.regime
    arts = {a.path for d in ("diagnostics", "plots") for a in c.list_artifacts(run.info.run_id, d)}
    assert arts == {"diagnostics/bptt_profile.parquet", "plots/bptt_profile.png"}, arts


CLIP = 0.2


class ClipReadGRU(AccumulatingGRU):
    """Automatic optimization with ``gradient_clip_val``; the gradient norm right after Lightning's
    clipping is read by the module's own ``configure_gradient_clipping``, independently of the monitor,
    per step (LBFGS calls the closure several times a step: the last call's)."""

    def __init__(self, make_optimizer):
        super().__init__()
        self.make_optimizer, self.post = make_optimizer, {}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.post[self.trainer.global_step] = norm_of(self.parameters())

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


@pytest.mark.parametrize(
    "make_optimizer",
    [
        # foreach SGD with Nesterov momentum (the default implementation on CUDA) adds the momentum into
        # .grad in place during the update (torch/optim/sgd.py, _multi_tensor_sgd)
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, foreach=True),
        lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=True),
        lambda ps: torch.optim.LBFGS(ps, lr=0.1, max_iter=3),
    ],
    ids=["sgd-nesterov-foreach", "adam-foreach", "lbfgs"],
)
def test_post_clip_norm_is_read_before_the_update_whatever_it_writes(tmp_path, make_optimizer):
    from pipeline import GradientNormMonitor

    torch.manual_seed(0)
    model, gm = ClipReadGRU(make_optimizer), GradientNormMonitor(log_every_n_steps=3)
    trainer(tmp_path, [gm], max_steps=8, log_every_n_steps=1, gradient_clip_val=CLIP).fit(
        model, loader(cls_data())
    )
    assert len(gm.history) == 8 and sorted(model.post) == list(range(8))
    np.testing.assert_allclose(gm.column("norm_postclip"), [model.post[k] for k in range(8)], rtol=1e-6)
    clipped = gm.column("norm_preclip") > CLIP
    assert clipped.sum() > 0, "the test needs clipped steps"
    assert gm.clip_rate == pytest.approx(clipped.mean())
    np.testing.assert_allclose(gm.column("norm_postclip")[clipped], CLIP, rtol=1e-5)


def test_an_epochs_short_last_accumulation_records_its_mean_micro_batch_loss(tmp_path):
    """5 batches an epoch, ``accumulate_grad_batches=2``: the steps take 2, 2 and 1 micro-batches, and
    Lightning divides the last one's loss by 2 as well; the record is each step's mean micro-batch loss."""
    from pipeline import GradientNormMonitor

    torch.manual_seed(0)
    model, gm, ref = AccumulatingGRU(), GradientNormMonitor(log_every_n_steps=2), PreStep()
    t = trainer(tmp_path, [ref, gm], max_steps=6, log_every_n_steps=1, accumulate_grad_batches=2)
    t.fit(model, loader(cls_data(n=16 * 5), bs=16))
    assert t.global_step == 6 and len(model.losses) == 10
    losses, want = iter(model.losses), []
    for n in (2, 2, 1, 2, 2, 1):
        want.append(np.mean([next(losses) for _ in range(n)]))
    np.testing.assert_allclose(gm.column("loss"), want, rtol=1e-6)
    np.testing.assert_allclose(gm.column("norm_preclip"), ref.pre, rtol=1e-6)


class LateInf(pl.LightningModule):
    """An inf put into one gradient by the module's own ``on_after_backward`` (a hand-written clip that
    divides by zero, say), at step 2, or in manual optimization between its backward and its step. Lightning
    calls the callbacks' ``on_after_backward`` before the module's, so the monitor's pre-clip read is
    finite there."""

    def __init__(self, manual: bool = False):
        super().__init__()
        self.automatic_optimization = not manual
        self.gru = nn.GRU(3, H, batch_first=True)
        self.out = nn.Linear(H, 4)
        self.weights_at: dict[int, dict[str, torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        self.weights_at[self.global_step] = {n: p.detach().clone() for n, p in self.named_parameters()}
        x, y = batch
        _, h_n = self.gru(x)
        loss = nn.functional.cross_entropy(self.out(h_n[-1]), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        self._plant()
        opt.step()
        return None

    def on_after_backward(self):
        if self.automatic_optimization:
            self._plant()

    def _plant(self):
        if self.global_step == 2:
            self.gru.weight_hh_l0.grad[0, 0] = float("inf")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


@pytest.mark.parametrize(
    ("manual", "clip"), [(False, None), (False, 1.0), (True, None)], ids=["auto", "auto-clipped", "manual"]
)
def test_a_gradient_made_non_finite_after_the_pre_clip_read_is_guarded(tmp_path, manual, clip):
    """The guard read only the pre-clip norm: the module's own inf after it came through as a NaN post-clip
    norm, the update was applied and the weights went NaN, diverged_step one step late (a walkthrough). The
    guard now decides on the post-clip read too, before the update: stopped at step 2, the weights of step
    2 kept exactly, the record's pre-clip norm finite and its post-clip norm NaN."""
    from pipeline import GradientNormMonitor

    torch.manual_seed(0)
    model, gm = LateInf(manual), GradientNormMonitor(log_every_n_steps=1)
    extra = {} if clip is None else {"gradient_clip_val": clip}
    trainer(tmp_path, [gm], max_steps=6, **extra).fit(model, loader(cls_data()))
    assert gm.diverged_step == 2
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert sorted(model.weights_at) == [0, 1, 2]  # stopped there
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], w) for n, w in model.weights_at[2].items())  # the step's update dropped
    pre, post = gm.column("norm_preclip"), gm.column("norm_postclip")
    assert len(pre) == 3 and np.isfinite(pre).all() and np.isfinite(post[:2]).all() and np.isnan(post[2])
