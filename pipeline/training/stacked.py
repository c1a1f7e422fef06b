"""``run_stack(cfgs)``: train K configurations at once, each recorded exactly as :func:`~pipeline.training.run.run`
would record it alone (README, "Batched trials").

A sweep worker with ``trials_per_worker: K`` hands its K trials here. Each member is the same
:class:`~pipeline.training.module.RNNTrainingModule` a trial trains alone (same seed, same initial
weights, same optimizer, clipping, divergence guard and remedies), with the same monitors and Recorder.
What is shared is the training loop: one batch stream (common random numbers: every member sees the
same batches, which is also the stream each would see alone, since the stream depends only on the task,
the batch size and ``seed``), one stacked forward (:func:`pipeline.training.stack.stacked_forward`), one
backward of the summed loss. Then per member, in the order Lightning runs them: the module's clipping
and guard, its own optimizer step, its callbacks' hooks. Each member has its own
:class:`MemberTrainer`, so ``trainer.should_stop`` (the guard, pruning) stops that member alone: a
stopped member leaves the stack and its run is summarised and closed while the others go on.

The loop reproduces Lightning's schedule for these runs (``pytorch_lightning`` 2.x fit loop): the step
counter increments after the optimizer step, validation every ``trainer.val_every`` steps, at the last
step, and at the step a member is told to stop; then ``on_train_end``, and a final validation when the
last step had none (as :func:`pipeline.training.run._train`). The equivalence is tested: a member's
losses and diagnostics match the same config trained alone (tests/test_batched.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

import torch

from pipeline.config import Config
from pipeline.names import STATUS
from pipeline.signals import Terminated, terminate_as_exception
from pipeline.training import run as single
from pipeline.training.run import (
    Monitors,
    RunResult,
    _start_recorder,
    _system_metrics,
    configure_torch,
    quiet_lightning,
    record_start,
)


def stack_key(cfg: Config) -> tuple:
    """Configs with equal keys train in one stack: they share the batch stream (task, batch size, seed),
    the schedule (steps, validation interval) and the device. Everything else may differ, the cell and
    the hidden size included (:func:`pipeline.training.stack.plan` fuses the members it can)."""
    t = cfg.task
    return (repr(t), cfg.seed, cfg.trainer.max_steps, cfg.trainer.val_every, cfg.trainer.accelerator)


class MemberTrainer:
    """What a member's module and callbacks see as ``trainer``: the attributes they read of a Lightning
    Trainer, per member (its own step, its own ``should_stop``)."""

    def __init__(self, max_steps: int, callbacks: list):
        self.global_step = 0
        self.should_stop = False
        self.max_steps = max_steps
        self.callbacks = callbacks
        self.loggers: list = []
        self.state = SimpleNamespace(fn="fit")

    def __bool__(
        self,
    ) -> bool:  # LightningModule.global_step reads `self.trainer.global_step if self._trainer`
        return True


@dataclass
class Member:
    cfg: Config
    rec: Any
    module: Any
    mon: Monitors
    trainer: MemberTrainer
    opt: torch.optim.Optimizer
    sysmon: Any = None
    result: RunResult | BaseException | None = None
    closed: bool = False
    index: int = 0
    on_done: Callable[[int, RunResult | BaseException], None] | None = None

    def call(self, hook: str, *args) -> None:
        for cb in self.trainer.callbacks:
            getattr(cb, hook)(self.trainer, self.module, *args)

    def close(self, status: str, error: BaseException | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.sysmon is not None:
            with contextlib.suppress(Exception):
                self.sysmon.finish()
        with contextlib.suppress(Exception):
            tags: dict[str, Any] = {STATUS: status.lower()} if status != "FINISHED" else {}
            if error is not None:
                tags["error"] = f"{type(error).__name__}: {error}"[:5000]
            self.rec.set_tags(tags)
        self.rec.close(status)


def _member(cfg: Config, task, rec, extra: list, device: torch.device) -> Member:
    from pipeline.training import callbacks as dg
    from pipeline.training.module import RNNTrainingModule

    record_start(cfg, task, rec)
    module = RNNTrainingModule(cfg, task).to(device)
    module.pruned = False
    mon = Monitors(
        dg.GradientMonitor(rec, cfg.trainer.log_every, skip=cfg.remedy.skip.zscore > 0),
        dg.ProfileMonitor(rec, cfg, task),
        dg.ValidationLogger(rec, task),
    )
    trainer = MemberTrainer(cfg.trainer.max_steps, [mon.grads, mon.prof, mon.val, *extra])
    cast(Any, module)._trainer = trainer  # the module reads global_step and sets should_stop through it
    return Member(cfg, rec, module, mon, trainer, module.configure_optimizers(), _system_metrics(cfg, rec))


def _device(cfg: Config) -> torch.device:
    accel = cfg.trainer.accelerator
    return (
        torch.device("cuda")
        if accel in ("gpu", "cuda") and torch.cuda.is_available()
        else torch.device("cpu")
    )


def run_stack(
    cfgs: list[Config],
    *,
    parent_run_id: str | None = None,
    extra_tags: list[dict[str, Any]] | None = None,
    callbacks: list[list] | None = None,
    experiment_id: str | None = None,
    on_done: Callable[[int, RunResult | BaseException], None] | None = None,
) -> list[RunResult | BaseException]:
    """Train ``cfgs`` (equal :func:`stack_key`) as one stack; each gets its own MLflow run, recorded and
    closed as :func:`~pipeline.training.run.run` records and closes it. Returns per member its RunResult,
    or the exception that failed it alone (its run closed FAILED). Ctrl-C / SIGTERM closes every run
    KILLED and re-raises; an error in the shared loop closes every unfinished run FAILED and re-raises.
    ``on_done(i, result)``: called as soon as member ``i``'s run is closed (a sweep tells its trial then)."""
    from pipeline.training.tasks import task_of

    if len({stack_key(c) for c in cfgs}) != 1:
        raise ValueError("run_stack: the configs differ in the batch stream or schedule (stack_key)")
    quiet_lightning()
    configure_torch(cfgs[0])
    task = task_of(cfgs[0].task)
    device = _device(cfgs[0])
    tags = extra_tags or [{} for _ in cfgs]
    extras = callbacks or [[] for _ in cfgs]
    members: list[Member] = []
    try:
        for cfg, tg, ex in zip(cfgs, tags, extras, strict=True):
            rec = _start_recorder(cfg, parent_run_id, tg, experiment_id)
            try:
                members.append(_member(cfg, task, rec, ex, device))
                members[-1].index, members[-1].on_done = len(members) - 1, on_done
            except BaseException:
                rec.close("FAILED")
                raise
        with terminate_as_exception():
            _fit(members, task, cfgs[0], device)
    except (KeyboardInterrupt, SystemExit, Terminated):
        for m in members:
            m.close("KILLED")
        raise
    except BaseException as e:
        for m in members:
            m.close("FAILED", e)
        raise
    return [m.result if m.result is not None else RuntimeError("no result") for m in members]


def _fit(members: list[Member], task, cfg: Config, device: torch.device) -> None:
    from pipeline.training.data import OnDeviceBatches

    max_steps, val_every = cfg.trainer.max_steps, min(cfg.trainer.val_every, cfg.trainer.max_steps)
    x_val, y_val = task.validation(cfg.task.val_size, cfg.seed + 1, device)
    chunk = max(cfg.task.batch_size, 256)  # as TaskDataModule.val_dataloader
    val = list(zip(x_val.split(chunk), y_val.split(chunk), strict=True))
    for m in members:
        m.module.train()
        m.call("setup", "fit")
        m.call("on_fit_start")
        m.call("on_train_start")
    active = list(members)
    stream = iter(OnDeviceBatches(task, cfg.task.batch_size, max_steps, cfg.seed, device))
    for batch_idx, batch in enumerate(stream):
        if not active:
            break
        _step(active, task, batch, batch_idx)
        still = []
        for m in active:
            last = m.trainer.global_step >= max_steps
            if m.trainer.should_stop or last or m.trainer.global_step % val_every == 0:
                _validate(m, val)
            if m.trainer.should_stop or last:
                _finish(m, val)
            else:
                still.append(m)
        active = still
    for m in active:  # only if the stream ended early (it has max_steps batches)
        _finish(m, val)


def _step(active: list[Member], task, batch, batch_idx: int) -> None:
    """One training step of every active member on the same batch (Lightning's automatic optimization:
    zero_grad, training_step, backward, configure_gradient_clipping, optimizer.step, step + 1)."""
    from pipeline.training.stack import stacked_forward

    x, y = batch
    for m in active:
        m.call("on_train_batch_start", batch, batch_idx)
        m.opt.zero_grad(set_to_none=True)
    outs = stacked_forward([m.module.model for m in active], x)
    total = None
    for m, out in zip(active, outs, strict=True):
        loss = task.loss(out, y)
        m.module._loss = loss.detach()
        penalty = m.module.remedies.penalty(m.module.model, x, y, m.trainer.global_step)
        term = loss if penalty is None else loss + penalty
        total = term if total is None else total + term
    assert total is not None
    total.backward()  # d(sum_k L_k)/d theta_j = dL_j/d theta_j: members share no parameter
    for m in active:
        m.module.configure_gradient_clipping(m.opt)
        m.opt.step()
        m.trainer.global_step += 1
    for m in active:
        m.call("on_train_batch_end", None, batch, batch_idx)


def _validate(m: Member, val: list) -> None:
    """The member's validation pass (its module's hooks on the fixed validation set), then its callbacks'."""
    mod = m.module
    mod.eval()
    with torch.no_grad():
        mod.on_validation_epoch_start()
        for i, b in enumerate(val):
            mod.validation_step(b, i)
        mod.on_validation_epoch_end()
    mod.train()
    m.call("on_validation_end")


def _finish(m: Member, val: list) -> None:
    """The end of a member's fit (``on_train_end``, the final validation when the last step had none),
    then its record and its run closed FINISHED; an error here fails this member alone."""
    try:
        m.call("on_train_end")
        m.call("on_fit_end")
        if m.module.diverged_step is None and m.mon.val.last_step != m.trainer.global_step:
            m.trainer.state.fn = "validate"
            _validate(m, val)
        m.result = single.record_end(m.cfg, m.module.task, m.rec, m.module, m.mon, m.trainer.global_step)
        m.close("FINISHED")
    except (KeyboardInterrupt, SystemExit, Terminated):
        raise
    except Exception as e:
        m.result = e
        m.close("FAILED", e)
    if m.on_done is not None:
        m.on_done(m.index, m.result)
