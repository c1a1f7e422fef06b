"""The divergence guard inside a real Lightning Trainer (``pipeline.training.run.run``), for Adam and SGD momentum.

The module's guard (``RNNTrainingModule.configure_gradient_clipping``) drops every gradient when the loss
or the gradient is non-finite, so ``optimizer.step`` skips every parameter. Across that step the weights
AND the optimizer state (Adam's ``exp_avg``, ``exp_avg_sq``, ``step``; SGD's ``momentum_buffer``) must be
bit-identical (``torch.equal``), training must stop there, and ``diverged_step`` must name the step.
The divergence is planted deterministically at step K after some normal steps, so the optimizer state
is non-trivial: a NaN in the batch (non-finite loss), an inf in one gradient (finite loss), or a NaN
loss with finite gradients.
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from pipeline.training import run as train
from pipeline.training.module import RECORD_FIELDS

K = 4  # the step at which the planted non-finite value appears (steps 0..K-1 train normally)


def _snapshot(trainer, module) -> dict:
    weights = {n: p.detach().clone() for n, p in module.named_parameters()}
    opt = trainer.optimizers[0]
    names = {id(p): n for n, p in module.named_parameters()}
    state = {
        names[id(p)]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
        for p, s in opt.state.items()
    }
    return {"weights": weights, "state": state}


def _assert_identical(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    for n in a["weights"]:
        assert torch.equal(a["weights"][n], b["weights"][n]), f"weight {n} changed across the guarded step"
    assert a["state"].keys() == b["state"].keys()
    for n, s in a["state"].items():
        assert s.keys() == b["state"][n].keys()
        for k, v in s.items():
            w = b["state"][n][k]
            same = torch.equal(v, w) if torch.is_tensor(v) else v == w
            assert same, f"optimizer state {n}.{k} changed across the guarded step"


class PlantAndWatch(pl.Callback):
    """At step K: snapshot, plant a non-finite value (``where``: "batch", "grad", or "loss": the loss the
    guard reads, gradients finite), snapshot after."""

    def __init__(self, where: str):
        self.where = where
        self.before = self.after = self.before_prev = None
        self.batches_seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches_seen += 1
        if trainer.global_step == K - 1:
            self.before_prev = _snapshot(trainer, pl_module)
        if trainer.global_step == K:
            self.before = _snapshot(trainer, pl_module)
            if self.where == "batch":
                batch[0][0, 0, 0] = float("nan")  # the module reads this very tensor

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == K and self.where == "grad":
            # One entry of W_hh's gradient: the loss stays finite, only the gradient check can catch it.
            pl_module.groups["recurrent"][0].grad.view(-1)[0] = float("inf")
        if trainer.global_step == K and self.where == "loss":
            # The loss the guard reads turns NaN after a finite backward: only the loss check can catch it.
            pl_module._loss = torch.full_like(pl_module._loss, float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.before is not None and self.after is None:
            self.after = _snapshot(trainer, pl_module)


OPTIMIZERS = {
    "adam": {"optim.name": "adam", "optim.lr": 0.01},
    "sgd_momentum": {"optim.name": "sgd", "optim.lr": 0.05, "optim.momentum": 0.9},
}


@pytest.mark.parametrize("where", ["batch", "grad", "loss"])
@pytest.mark.parametrize("optim", sorted(OPTIMIZERS))
def test_guarded_step_leaves_weights_and_optimizer_state_bit_identical(tiny, optim, where):
    cb = PlantAndWatch(where)
    cfg = tiny(**OPTIMIZERS[optim], **{"tracking.enabled": False, "trainer.log_every": 1})
    r = train.run(cfg, callbacks=[cb])
    assert cb.before is not None and cb.after is not None, "the planted step never ran"
    # The optimizer state is real before the guarded step (K normal steps ran), so equality means something.
    state = cb.before["state"]
    assert state, "no optimizer state before the guarded step"
    if optim == "adam":
        assert all(int(s["step"]) == K for s in state.values())
        assert all(s["exp_avg_sq"].abs().sum() > 0 for s in state.values())
    else:
        assert all(s["momentum_buffer"].abs().sum() > 0 for s in state.values())
    # ... and the steps before it did move the weights and the state (the snapshot is not stale).
    assert any(not torch.equal(cb.before_prev["weights"][n], w) for n, w in cb.before["weights"].items())
    _assert_identical(cb.before, cb.after)
    # Training stopped at that step and says so.
    assert r.diverged_step == K and r.regime == "diverged" and r.tags["diverged_step"] == K
    assert cb.batches_seen == K + 1 and r.steps == K + 1 < cfg.trainer.max_steps
    assert r.status == "FINISHED" and not r.solved


@pytest.mark.parametrize("where", ["batch", "grad"])
def test_guard_record_names_what_was_non_finite(tiny, where):
    """The guarded step's record: a NaN loss (batch) or a finite loss with an inf pre-clip norm (grad);
    post-clip fields NaN (nothing was clipped or applied)."""
    from pipeline.training import callbacks as diagnostics

    seen = {}
    real_drain = diagnostics.GradientMonitor.drain

    def drain(self, trainer=None):
        if self._pending:
            seen["rows"] = torch.stack(self._pending).cpu()
        return real_drain(self, trainer)

    cfg = tiny(**{"tracking.enabled": False, "trainer.log_every": 1})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diagnostics.GradientMonitor, "drain", drain)
        train.run(cfg, callbacks=[PlantAndWatch(where)])
    row = dict(zip(RECORD_FIELDS, seen["rows"][-1].tolist(), strict=True))
    if where == "batch":
        assert math.isnan(row["loss"])
    else:
        assert (
            math.isfinite(row["loss"])
            and row["norm_preclip"] == math.inf
            and row["norm_recurrent"] == math.inf
        )
    assert math.isnan(row["norm_postclip"]) and math.isnan(row["clip_coef"])


ORTHOGONAL_OVERFLOW = {"model.cell": "orthogonal", "optim.lr": 1e12, "optim.weight_decay": 0}


@pytest.mark.parametrize("stacked", [False, True], ids=["alone", "in-a-stack"])
@pytest.mark.parametrize("over", [{}, ORTHOGONAL_OVERFLOW], ids=["tanh", "orthogonal"])
def test_weights_left_non_finite_by_the_last_update_read_diverged(stacked, over):
    """SGD with a weight decay of 1e38 at lr 1000: the first gradient is finite, so the guard (which reads
    gradients before the optimizer adds the decay) lets the update through, and it leaves the weights
    infinite (float32). With more steps the next step's loss finds them: diverged at
    step 1. With max_steps 1 no step read them, and the run read healthy with a NaN validation loss
    (found by a walkthrough); it is diverged at step 1 as well, on both training paths. An ``orthogonal``
    cell's parameter is its parametrisation's base, which stays finite at lr 1e12 while the W_hh it
    computes, g * matrix_exp(base), overflows: the weights checked are the ones the cell computes with
    (found by a review)."""
    from conftest import tiny_config

    from pipeline.training import stacked as stack

    def go(steps: int):
        cfg = tiny_config(
            **{
                "optim.name": "sgd",
                "optim.lr": 1000,
                "optim.weight_decay": 1e38,
                "trainer.max_steps": steps,
                "tracking.enabled": "false",
                **over,
            }
        )
        r = stack.run_stack([cfg])[0] if stacked else train.run(cfg)
        assert not isinstance(r, BaseException)
        return r

    later = go(3)
    assert (later.diverged_step, later.regime) == (1, "diverged")
    last = go(1)
    assert (last.diverged_step, last.regime, last.steps) == (1, "diverged", 1)
    assert not last.solved
