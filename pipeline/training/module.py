"""The LightningModule: loss, optimizer, and clipping that reports what it did.

Lightning throws away what ``clip_grad_norm_`` returns and calls ``on_before_optimizer_step`` before
clipping (Lightning issues #18669, #12595), so nobody sees the post-clip norm or the clip rate. Here
``configure_gradient_clipping`` does the clipping itself and records, per step and on the device:
the total pre-clip norm, the post-clip norm, the clip coefficient, and pre-clip norms per parameter
group. It is also the divergence guard: a non-finite loss or gradient drops the gradients before
``optimizer.step`` runs (optimizers skip parameters whose grad is None), so the weights stay finite.
The remedies beyond clipping (:mod:`pipeline.training.remedies`) act in the same two places: their
penalties join the loss in ``training_step``, and spike skipping drops a step's gradients exactly as the
guard does, decided by the same one host read.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from pipeline.config import Config
from pipeline.names import GROUPS
from pipeline.signals import check_terminated
from pipeline.training.grad_monitor import RECORD_HEAD, drop_gradients, group_sq
from pipeline.training.models import RNNModel
from pipeline.training.remedies import APPLY, STOP, Remedies
from pipeline.training.tasks import Task

# Order of the per-step record tensor (see RNNTrainingModule.last_record): the public monitor's record
# (pipeline.training.grad_monitor.RECORD_HEAD), this project's extra fields, then its parameter groups.
# clipped: 1 if clipping acted; skipped: 1 if remedy.skip dropped the update and training went on;
# omega, floss: Pascanu's Omega and the flossing term sum lambda_i^2 (unweighted; NaN when not computed).
RECORD_EXTRA = ("clipped", "skipped", "omega", "floss")
RECORD_FIELDS = (*RECORD_HEAD, *RECORD_EXTRA, *(f"norm_{g}" for g in GROUPS))


class RNNTrainingModule(pl.LightningModule):
    pruned: bool  # set by the training driver (and the sweep's pruning callback), read by summarize_run

    def __init__(self, cfg: Config, task: Task):
        super().__init__()
        self.cfg, self.task = cfg, task
        self.model = RNNModel(cfg.model, task.input_size, task.output_size, task.readout, seed=cfg.seed)
        self.groups = self.model.param_groups()
        self.remedies = Remedies(cfg, task)
        self.last_record: torch.Tensor | None = None  # RECORD_FIELDS, on device, this step
        self.diverged_step: int | None = None
        self.val_loss: float | None = None  # mean loss over the fixed validation set, last validation
        self.val_accuracy: float | None = None  # fraction correct there (classification tasks: Task.hits)
        self._loss: torch.Tensor | None = None
        self._val_sum: torch.Tensor | None = None
        self._val_hits: torch.Tensor | None = None
        self._val_n = 0
        self._val_k = 0  # predictions counted by Task.hits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _common_step(self, batch) -> torch.Tensor:
        x, y = batch
        return self.task.loss(self.model(x), y)

    def training_step(self, batch, batch_idx):
        check_terminated()  # a SIGTERM whose exception a garbage-collector callback dropped
        x, y = batch
        loss = self.task.loss(self.model(x), y)  # the fused kernel: the task loss and its gradient
        self._loss = loss.detach()  # the record's loss is the task's, whatever the remedies add
        penalty = self.remedies.penalty(self.model, x, y, self.global_step)
        return loss if penalty is None else loss + penalty

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.remedies.skip is not None:  # the skip window, so a resumed run skips as an unbroken one
            checkpoint["remedy_skip"] = self.remedies.skip.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.remedies.skip is not None and "remedy_skip" in checkpoint:
            self.remedies.skip.load_state_dict(checkpoint["remedy_skip"], self.device)

    def on_validation_epoch_start(self) -> None:
        self._val_sum, self._val_hits, self._val_n, self._val_k = None, None, 0, 0

    def validation_step(self, batch, batch_idx):
        x, y = batch
        n = x.shape[0]
        out = self.model(x)
        loss = self.task.loss(out, y).detach() * n
        self._val_sum = loss if self._val_sum is None else self._val_sum + loss
        self._val_n += n
        hits = self.task.hits(out.detach(), y)
        if hits is not None:  # counted on the device; read with the loss at the end
            self._val_hits = hits[0] if self._val_hits is None else self._val_hits + hits[0]
            self._val_k += hits[1]

    def on_validation_epoch_end(self) -> None:
        if self._val_n:
            assert self._val_sum is not None  # set by every validation_step that counted a batch
            total = self._val_sum.double()
            if self._val_hits is not None:
                total = torch.stack([total, self._val_hits.double()])
            values = total.reshape(-1).tolist()  # one host read per validation: the loss and the hits
            self.val_loss = values[0] / self._val_n
            self.val_accuracy = values[1] / self._val_k if self._val_k else None
            if self.val_accuracy is not None and not math.isfinite(self.val_loss):
                # outputs that overflowed predict nothing: argmax of all-NaN logits is class 0, which
                # read as chance (digits 0.100 for a diverged run; a real-data walkthrough). A finite
                # cross-entropy has finite logits, so a non-finite val loss marks these (and, rarely,
                # finite logits so far apart that the loss itself overflows: no accuracy there either).
                self.val_accuracy = math.nan

    def mark_nonfinite_weights(self, step: int) -> None:
        """After training: weights the last update left non-finite (its gradient was finite, so the guard,
        which reads gradients before each step, let it through) make the run diverged at ``step``, the
        step that would have read them, as when a later step's loss finds them. Without this a run whose
        final update overflowed read healthy, with a NaN validation loss. The weights checked are the ones
        the cell computes with (:meth:`RNNModel.live_params`) as well as the parameters: an ``orthogonal``
        cell's parameter is its parametrisation's base, finite while g * matrix_exp(base) overflows (found by
        a review)."""
        if self.diverged_step is not None:
            return
        with torch.no_grad():
            used = [v for v in self.model.live_params().values() if torch.is_tensor(v)]
        if not all(bool(torch.isfinite(p).all()) for p in [*self.parameters(), *used]):
            self.diverged_step = step

    def configure_optimizers(self):
        o = self.cfg.optim
        params = self.model.parameters()
        if o.name == "sgd":
            return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        if o.name == "rmsprop":
            return torch.optim.RMSprop(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Measure, guard, clip (Pascanu 2013, Algorithm 1 for mode=norm), and record the result."""
        # One fused reduction per group (torch._foreach_norm), no host sync per parameter: the measurement
        # of the public GradientNormMonitor (pipeline.training.grad_monitor.group_sq).
        sq = group_sq(self.groups, GROUPS)
        if sq is None:
            return
        grads = [p.grad for g in GROUPS for p in self.groups[g] if p.grad is not None]
        pre = sq.sum().sqrt()
        loss = self._loss.double() if self._loss is not None else pre.new_zeros(())
        extra = self.remedies.record(pre)  # omega, floss
        # The guard (and spike skipping) needs one host read per step: it decides before optimizer.step.
        action = self.remedies.gate(pre, loss)
        if action != APPLY:  # dropped: optimizers skip parameters without a gradient, state untouched
            drop_gradients(p for gs in self.groups.values() for p in gs)
            if action == STOP:
                self.diverged_step = self.global_step
                self.trainer.should_stop = True
            nan = pre.new_tensor(float("nan"))
            skipped = pre.new_tensor(float(action != STOP))
            self.last_record = torch.stack([loss, pre, nan, nan, nan, skipped, *extra, *sq.sqrt()])
            return
        mode, c = self.cfg.clip.mode, self.cfg.clip.threshold
        if mode == "norm":
            coef = torch.clamp(c / (pre + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
            post = pre * coef
        elif mode == "value":
            torch._foreach_clamp_min_(grads, -c)
            torch._foreach_clamp_max_(grads, c)
            post = torch.stack(torch._foreach_norm(grads)).double().square().sum().sqrt()
            coef = post / pre.clamp_min(1e-30)
        else:
            post, coef = pre, torch.ones_like(pre)
        clipped = (coef < 1.0).double()
        zero = pre.new_zeros(())
        self.last_record = torch.stack([loss, pre, post, coef, clipped, zero, *extra, *sq.sqrt()])
