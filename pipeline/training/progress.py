"""``python -m pipeline train``'s progress: one plain line per validation, fine in logs and CI.

::

    step     50/100  train/loss 0.1812  val/loss 0.1677 (x1.006 of baseline)  grad/clip_rate 0.760  regime vanishing (profile at step 50)
    step 600/600  train/loss 0.5062  val/loss 0.5597 (x0.243 of baseline)  val/accuracy 0.838  grad/clip_rate 0.032  regime vanishing (profile at step 600)

``val/accuracy`` appears for classification tasks (digits, temporal order, copy's recall steps).
``train/loss`` is the mean training loss of the steps since the previous line, NaN losses left out, as
the record's window mean (``grad_window.window_metrics``; NaN only when no step's loss is finite),
accumulated on the device (one host read per line, beside the validation's own); ``grad/clip_rate`` the fraction of steps
clipped so far; the regime the verdict of README "Regime verdict" on the latest profile pass and the
largest gradient so far, so it can change as training goes on (the final verdict is the run's ``regime``
tag, which the last line reads: it is printed after the pass at train end). Lightning's progress bar (``trainer.progress_bar: true``) replaces these lines.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import pytorch_lightning as pl
import torch

from pipeline.config import Config
from pipeline.training.callbacks import verdict
from pipeline.training.tasks import Task


def _fmt(x: float | None, spec: str = "#.4g") -> str:  # '#': trailing zeros kept (0.1950, not 0.195)
    return "n/a" if x is None else format(x, spec)


class ProgressPrinter(pl.Callback):
    """Prints :func:`line` after every validation; reads the run's own monitors (``training/run.py``)."""

    def __init__(self, cfg: Config, task: Task, grads: Any, prof: Any, stream: TextIO | None = None):
        self.cfg, self.task, self.grads, self.prof = cfg, task, grads, prof
        self.stream = stream
        self._sum: torch.Tensor | None = None  # (sum of the non-NaN losses, their count, finite count)
        self._line: tuple | None = None  # the latest validation's (step, train loss, val loss, accuracy)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if torch.is_tensor(loss):
            loss = loss.detach().double().reshape(())
            nan = torch.isnan(loss)
            step = torch.stack([torch.where(nan, 0.0, loss), (~nan).double(), torch.isfinite(loss).double()])
            self._sum = step if self._sum is None else self._sum + step  # stays on the device

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or pl_module.val_loss is None:
            return
        train_loss = None
        if self._sum is not None:  # a diverged step's NaN loss made the whole line's NaN (a walkthrough:
            total, n, finite = self._sum.tolist()  # the console said nan, the record 6.3e8)
            train_loss = total / n if finite else math.nan
        self._sum = None
        self._line = (trainer.global_step, train_loss, pl_module.val_loss, pl_module.val_accuracy)
        if trainer.state.fn != "fit" or trainer.global_step < self.cfg.trainer.max_steps:
            self._print(pl_module)
        # else fit's validation at its last step: its line waits for the profile's pass at train end,
        # which runs after it (ProfileMonitor.on_train_end, an earlier callback), so the line's regime is
        # the run's; it read an older pass where max_steps is no multiple of profile_every (new-user
        # walkthrough). The validation after fit (a last step off val_every's multiples) comes after it.

    def on_train_end(self, trainer, pl_module) -> None:
        self._print(pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._print(pl_module)  # the last validation's line, if an interrupt came before train end

    def _print(self, pl_module) -> None:
        if self._line is None:
            return
        (step, train_loss, val_loss, accuracy), self._line = self._line, None
        last = self.prof.last
        clip_rate, max_norm = self.grads.running()  # the steps since the last logged window included
        regime = verdict(pl_module.diverged_step is not None, last, max_norm, self.cfg.diagnostics)
        at = f" (profile at step {last['step']})" if "step" in last else ""
        print(
            line(
                step,
                self.cfg.trainer.max_steps,
                train_loss,
                val_loss,
                self.task.baseline,
                clip_rate,
                regime + at,
                accuracy=accuracy,
            ),
            file=self.stream or sys.stdout,
            flush=True,
        )


def line(
    step: int,
    max_steps: int,
    train_loss: float | None,
    val_loss: float | None,
    baseline: float,
    clip_rate: float,
    regime: str,
    accuracy: float | None = None,
) -> str:
    """One progress line (pure; see the module docstring)."""
    ratio = (
        f" (x{val_loss / baseline:#.3g} of baseline)"  # x1.00, not x1 beside x1.02 (a walkthrough)
        if val_loss is not None and math.isfinite(val_loss)
        else ""
    )
    acc = "" if accuracy is None else f"  val/accuracy {accuracy:.3f}"
    width = len(str(max_steps))
    return (
        f"step {step:>{width}}/{max_steps}  train/loss {_fmt(train_loss)}  val/loss {_fmt(val_loss)}{ratio}"
        f"{acc}  grad/clip_rate {clip_rate:.3f}  regime {regime}"
    )
