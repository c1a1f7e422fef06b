"""The public callbacks on code researchers write for a Trainer (README, "Your own model": "The float64
copy's loss", the monitor paragraphs): state made and noise drawn in training_step, a training_step that
reads its Trainer, dataclass batches, clipping in the module's own hook, parameters handed to the optimizer
mid-run, sparse, bfloat16 and mixed-precision gradients, the verdict whatever the callbacks' order,
min_steps after a NaN, a second fit, two monitors of a kind. Every number is checked against an
independent reading (the module's, a plain callback's, full-graph float64 autograd)."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
import torch
from torch import nn

from tests.test_api import H, T, V, autograd_profile, cls_data, first_batch, lm_data, loader, trainer
from tests.test_api_modes import AccumulatingGRU, PreStep, ScaledGRU, norm_of

pl = pytest.importorskip("pytorch_lightning")

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


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
        elif self.noise == "python":  # Python's own generator: a random rescaling of the batch
            x = x * (1.0 + 0.1 * random.random())
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


class CarriedState(pl.LightningModule):
    """A tanh nn.RNN whose hidden state is carried from one batch to the next as a plain attribute
    (``self.h``, float32, not a buffer): the stateful-RNN pattern. ``cast``: the input made float32 on
    purpose, which the float64 copy cannot follow."""

    def __init__(self, cast: bool = False):
        super().__init__()
        self.cast, self.h = cast, None
        self.rnn = nn.RNN(3, H, batch_first=True)
        self.out = nn.Linear(H, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out, h_n = self.rnn(x.float() if self.cast else x, self.h)
        self.h = h_n.detach()
        return nn.functional.cross_entropy(self.out(out[:, -1]), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_a_hidden_state_carried_as_an_attribute_is_profiled_in_float64(tmp_path):
    """README, "The float64 copy's loss": a tensor kept as a plain attribute is moved to the copy's
    float64, so the passes after the first (where ``self.h`` holds a float32 state) work; each pass is
    full-graph float64 autograd's from that state, and the module's own state is left as it was."""
    from pipeline import BPTTProfileMonitor, profile_rnn

    torch.manual_seed(0)
    model, pm = CarriedState(), BPTTProfileMonitor("rnn", every_n_steps=3)
    trainer(tmp_path, [pm], max_steps=7, log_every_n_steps=1).fit(model, loader(cls_data()))
    assert [p["step"] for p in pm.passes] == [0, 3, 6, 7]
    held = model.h.clone()
    assert held.dtype == torch.float32
    batch = first_batch(cls_data())
    frame = profile_rnn(model, "rnn", batch)
    assert torch.equal(model.h, held), "the copy's step changed the module's carried state"
    ref = autograd_profile(model, "rnn", batch, window_from=T)  # from the carried state, in float64
    got = frame[frame["state"] == "h"].sort_values("t")["log10_norm"].to_numpy()
    np.testing.assert_allclose(got, ref[(0, "h")], atol=1e-9, rtol=0)
    model.h = None  # from zeros the profile differs: the carried state was used
    assert not np.allclose(profile_rnn(model, "rnn", batch).query("state == 'h'")["log10_norm"], got)


class InPlaceMask(pl.LightningModule):
    """A GRU whose output is masked in place (``out.mul_(mask)``: the first half of the steps zeroed)
    before a readout of the mean over time."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, H, batch_first=True)
        self.out = nn.Linear(H, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out, _ = self.gru(x)
        mask = (torch.arange(out.shape[1], device=out.device) >= out.shape[1] // 2).to(out.dtype)
        out.mul_(mask[None, :, None])
        return nn.functional.cross_entropy(self.out(out.mean(1)), y)


def test_an_output_edited_in_place_is_profiled_as_autograd_sees_it():
    """The profile's hook hands the step clones, not autograd leaves (which refuse in-place edits): the
    whole loss's profile (``h_total``) equals full-graph float64 autograd's, zeroed steps included."""
    from pipeline import profile_rnn

    torch.manual_seed(0)
    model, batch = InPlaceMask(), first_batch(cls_data())
    frame = profile_rnn(model, "gru", batch)
    got = frame[frame["state"] == "h_total"].sort_values("t")["log10_norm"].to_numpy()
    np.testing.assert_allclose(got, autograd_profile(model, "gru", batch)[(0, "h")], atol=1e-9, rtol=0)


def test_an_input_made_float32_on_purpose_is_one_line_saying_pass_loss_fn():
    """nn.RNN raises a ValueError (not a RuntimeError) on an input whose dtype is not its weights'."""
    from pipeline import profile_rnn

    with pytest.raises(
        ValueError, match=r"^CarriedState training_step mixed float64 and another dtype .*loss_fn"
    ):
        profile_rnn(CarriedState(cast=True), "rnn", first_batch(cls_data()))


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


@pytest.mark.parametrize("noise", ["torch", "numpy", "python"])
def test_profile_passes_do_not_change_what_training_draws(tmp_path, noise):
    """Input noise drawn in training_step: the same seed trains to the same weights with and without
    profile passes (each pass runs training_step on the copy, drawing from the same generators)."""
    from pipeline import BPTTProfileMonitor

    def weights(callbacks):
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
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

    def __init__(self, clip: float = 0.3):
        super().__init__()
        self.clip = clip

    def on_after_backward(self):
        torch.nn.utils.clip_grad_norm_(self.parameters(), self.clip)


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


def test_an_epoch_ending_inside_an_accumulation_window_is_measured_at_its_step(tmp_path):
    """22 batches an epoch, 4 to a step: Lightning also steps after the 22nd batch (a window of 2). The
    pre-clip norm is the one after each step's last backward, before the module's hook clips it; a
    monitor that took that backward for one it accumulates past would read the clipped gradient."""
    from pipeline import GradientNormMonitor

    torch.manual_seed(0)
    ref, gm = AfterBackward(), GradientNormMonitor(log_every_n_steps=3)
    t = trainer(tmp_path, [ref, gm], max_steps=12, log_every_n_steps=1, accumulate_grad_batches=4)
    t.fit(ClipsAfterBackward(clip=0.05), loader(cls_data(n=16 * 22), bs=16))
    assert t.global_step == 12 and len(ref.pre) == 44 and len(gm.history) == 12
    last = [e * 22 + b - 1 for e in range(2) for b in (4, 8, 12, 16, 20, 22)]  # each step's last backward
    pre = np.asarray(ref.pre)[last]
    np.testing.assert_allclose(gm.column("norm_preclip"), pre, rtol=1e-6)
    assert pre.min() > 0.05 and np.all(gm.column("norm_postclip") <= 0.05 * (1 + 1e-6))


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


class Overflows(StateInside):
    """Its update overflows float32 from a finite gradient: SGD's weight decay of 1e38 at lr 1000."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1000, weight_decay=1e38)


@pytest.mark.parametrize("steps", [1, 3])
def test_weights_left_non_finite_by_the_last_update_read_diverged(tmp_path, steps):
    """With more steps the next step's loss finds the infinite weights (the monitor's guard, at step 1);
    when the update that made them was the last, only the final pass sees them, and the verdict read
    them as no profile at all (found by a walkthrough of the project's own runs)."""
    from pipeline import BPTTProfileMonitor, GradientNormMonitor

    torch.manual_seed(0)
    gm, pm = GradientNormMonitor(log_every_n_steps=1), BPTTProfileMonitor("gru", every_n_steps=0)
    t = trainer(tmp_path, [gm, pm], max_steps=steps, log_every_n_steps=1)
    t.fit(Overflows(), loader(cls_data()))
    assert gm.diverged_step == (None if steps == 1 else 1)
    assert pm.regime == "diverged" and pm.passes[-1] == {"step": t.global_step}  # a pass on no finite weights
    assert len(pm.passes[0]) > 1  # the step-0 pass: finite weights, a profile


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
    from pipeline import DiagnosticsConfig

    # the config's checks: a verdict threshold of the wrong sign was taken and judged by (a walkthrough)
    with pytest.raises(
        ValueError, match=r"^config key 'diagnostics.vanish_log10_per_step': must be < 0, got 0.5$"
    ):
        BPTTProfileMonitor("gru", diagnostics=DiagnosticsConfig(vanish_log10_per_step=0.5))
    with pytest.raises(TypeError, match="diagnostics must be a pipeline.DiagnosticsConfig, got dict"):
        BPTTProfileMonitor("gru", diagnostics={"vanish_log10_per_step": -0.05})
    # ... and its types, as the config reads them (a new-user walkthrough: a TypeError from inside the
    # checks for a string, and a fractional probe size or a string for plots taken)
    for bad, said in [
        ({"horizon_decades": "x"}, "'diagnostics.horizon_decades': must be a number, got 'x'"),
        ({"probe_size": 2.5}, "'diagnostics.probe_size': must be an integer, got 2.5"),
        ({"plots": "yes"}, "'diagnostics.plots': must be true or false, got 'yes'"),
    ]:
        with pytest.raises(ValueError, match=f"^config key {re.escape(said)}$"):
            BPTTProfileMonitor("gru", diagnostics=DiagnosticsConfig(**bad))
    typed = BPTTProfileMonitor(
        "gru", diagnostics=DiagnosticsConfig(explode_norm=10, horizon_decades=2)
    ).diagnostics
    assert typed == DiagnosticsConfig(explode_norm=10.0, horizon_decades=2.0)  # as the config would hold them
    assert type(typed.explode_norm) is float and type(typed.horizon_decades) is float
    gm, pm = GradientNormMonitor(log_every_n_steps=4), BPTTProfileMonitor("gru", every_n_steps=4)
    for _ in range(2):
        trainer(tmp_path, [gm, pm], max_steps=8, log_every_n_steps=1).fit(
            AccumulatingGRU(), loader(cls_data())
        )
        assert [p["step"] for p in pm.passes] == [0, 4, 8] and len(gm.history) == 8
        assert sorted(pm.profile_frame()["step"].unique()) == [0, 4, 8]


def test_two_monitors_of_a_kind_share_a_trainer_and_keep_their_own_state(tmp_path):
    """Lightning refuses two stateful callbacks with one ``state_key``: the keys name the settings (two
    profile monitors logging to one logger are named too: README, "Two RNNs, two monitors")."""
    from pipeline import BPTTProfileMonitor, GradientNormMonitor

    torch.manual_seed(0)
    fine, coarse = GradientNormMonitor(log_every_n_steps=1), GradientNormMonitor(log_every_n_steps=4)
    p2 = BPTTProfileMonitor("gru", every_n_steps=2, name="every2")
    p4 = BPTTProfileMonitor("gru", every_n_steps=4, name="every4")
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

    with pytest.raises(RuntimeError, match="modified: .torch.DoubleTensor") as err:
        profile_rnn(Fails(), "gru", first_batch(cls_data()))
    # the user's own error, with a note saying where it ran (its traceback runs through our code)
    assert "raised by Fails.training_step on the gradient profile's probe batch" in err.value.__notes__[0]


class ExplodingRelu(nn.Module):
    """A relu nn.RNN whose state grows 10x a step (W_hh = 10 I): float64 overflows near step 309."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(1, 3, nonlinearity="relu", batch_first=True)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(10 * torch.eye(3))
            self.rnn.weight_ih_l0.fill_(1.0)
            self.rnn.bias_ih_l0.zero_()
            self.rnn.bias_hh_l0.zero_()

    def training_step(self, batch, batch_idx):
        x, y = batch
        out, _ = self.rnn(x)
        return nn.functional.mse_loss(out[:, -1].sum(-1, keepdim=True), y)


def test_forward_overflow_of_a_users_rnn_names_its_first_non_finite_step():
    """README, "The science in one screen": ``bptt/overflow_step`` is the first step t (1-based) whose
    float64 forward state is not finite; the profile and every other ``bptt/*`` summary are then NaN and
    the verdict is exploding. The step is read off the module's own float64 forward."""
    from pipeline.config import DiagnosticsConfig
    from pipeline.training.callbacks import verdict
    from pipeline.training.probe import probe

    module = ExplodingRelu()
    batch = (torch.ones(2, 400, 1), torch.zeros(2, 1))
    with torch.no_grad():
        out, _ = module.double().rnn(batch[0].double())
    bad = (~torch.isfinite(out).all(dim=(0, 2))).nonzero().flatten()
    assert bad.numel(), "the forward must overflow"
    want = int(bad[0]) + 1
    assert 300 < want < 400
    res = probe(ExplodingRelu(), "rnn", batch, lyapunov=False)
    m = res.metrics[0]
    assert m["bptt/overflow_step"] == want
    assert math.isnan(m["bptt/log10_ratio"]) and np.isnan(res.profiles[0].log10_norm["h"]).all()
    assert verdict(False, m, None, DiagnosticsConfig()) == "exploding"


class Unbatched(nn.Module):
    """A 2-layer GRU fed one unbatched sequence ``[T, I]`` (batched=False: ``[1, T, I]``), its loss
    on h_n of both layers."""

    def __init__(self, batched: bool):
        super().__init__()
        torch.manual_seed(0)
        self.batched = batched
        self.gru = nn.GRU(3, 8, num_layers=2, batch_first=True)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        _, h_n = self.gru(x[None] if self.batched else x)
        return h_n.sum()


def test_an_unbatched_input_profiles_as_the_same_sequence_batched():
    """An unbatched ``[T, I]`` input (its states ``[L, H]``) gives every layer the profile of the same
    sequence given as a batch of one."""
    from pipeline.training.probe import probe

    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(1))
    one = probe(Unbatched(batched=False), "gru", (x,), lyapunov=False)
    ref = probe(Unbatched(batched=True), "gru", (x,), lyapunov=False)
    assert len(one.profiles) == len(ref.profiles) == 2
    for a, b in zip(one.profiles, ref.profiles, strict=True):
        np.testing.assert_allclose(a.log10_norm["h"], b.log10_norm["h"], atol=1e-12, rtol=0)
        assert np.isfinite(a.log10_norm["h"]).all()
