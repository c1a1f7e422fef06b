"""``run_stack(cfgs)``: train K configurations at once, each recorded exactly as :func:`~pipeline.training.run.run`
would record it alone (README, "Batched trials").

A sweep worker with ``trials_per_worker: K`` hands its K trials here. Each member is the same
:class:`~pipeline.training.module.RNNTrainingModule` a trial trains alone (same seed, same initial
weights, same optimizer, clipping, divergence guard and remedies), with the same monitors and Recorder.
What is shared is the training loop: one stacked forward (:func:`pipeline.training.stack.stacked_forward`)
and one backward of the summed loss per step, then the update, in the order Lightning runs it: clipping
and guard, optimizer step, callbacks' hooks. The update is one batched update for every member that
allows it (:mod:`pipeline.training.stack_update`: Adam or SGD, clipping none or norm, no remedy), and
each other member's own module clipping and optimizer step. Each member has its own
:class:`MemberTrainer`, so ``trainer.should_stop`` (the guard, pruning) stops that member alone: a
stopped member leaves the stack and its run is summarised and closed while the others go on.

**Rolling stacks.** With ``refill``, a slot a member leaves is filled at once by a new member (the sweep
asks its next trial), so the stack stays K wide instead of running down to its slowest member. Members
therefore sit at different steps: each reads its own batch stream, the stream it would read alone
(``seed``'s generator from step 0). Members that joined together with the same seed (a *cohort*) stay in
lockstep and share one stream and its batch tensors (common random numbers: every trial of a seed sees
the same batches in the same order, README "Batched trials").

The training loop itself (batch streams, the step, validation, a member's end) is
:mod:`pipeline.training.stack_loop`. The equivalence is tested: a member's losses and diagnostics match
the same config trained alone, whether it started with the stack or joined it later
(tests/test_batched.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import torch

from pipeline.config import Config
from pipeline.signals import Terminated, deferred, received, received_count, terminate_as_exception
from pipeline.training import record
from pipeline.training.record import Monitors, RunResult
from pipeline.training.run import (
    _start_recorder,
    _system_metrics,
    close_run,
    configure_torch,
    quiet_lightning,
)
from pipeline.training.stack_loop import fit
from pipeline.training.stack_update import batchable

# Members whose optimizer and clipping allow it take one batched update per step
# (pipeline.training.stack_update); False: every member its own (the benchmark's comparison).
BATCHED_UPDATE = True


def stack_key(cfg: Config) -> tuple:
    """Configs with equal keys can share a stack: the same task config (so the same input and target
    shapes, batch size and loss) and device. Everything else may differ: the seed and schedule (each
    member reads its own stream and keeps its own step), the cell and the hidden size
    (:func:`pipeline.training.stack.plan` fuses the members it can)."""
    return (repr(cfg.task), cfg.trainer.accelerator)


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
    cohort: tuple[int, int] = (0, 0)  # (seed, loop iteration it joined at): the batch stream it reads
    val: list | None = None  # its validation set, in chunks
    batched: bool = False  # takes the stack's batched update (pipeline.training.stack_update.batchable)
    params: list = field(default_factory=list)  # its optimizer's parameters
    signals_before: int = 0  # pipeline.signals.received_count() when its stack started

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
        if status == "FAILED" and received(self.signals_before):  # the error replaced a SIGTERM's
            status = "KILLED"
        close_run(self.rec, status, error)


def _member(cfg: Config, task, rec, extra: list, device: torch.device) -> Member:
    from pipeline.training import callbacks as dg
    from pipeline.training.module import RNNTrainingModule

    record.record_start(cfg, task, rec)
    module = RNNTrainingModule(cfg, task).to(device)
    module.pruned = False
    mon = Monitors(
        dg.GradientMonitor(rec, cfg.trainer.log_every, skip=cfg.remedy.skip.zscore > 0),
        dg.ProfileMonitor(rec, cfg, task),
        dg.ValidationLogger(rec, task),
    )
    trainer = MemberTrainer(cfg.trainer.max_steps, [mon.grads, mon.prof, mon.val, *extra])
    cast(Any, module)._trainer = trainer  # the module reads global_step and sets should_stop through it
    opt = module.configure_optimizers()
    m = Member(cfg, rec, module, mon, trainer, opt, _system_metrics(cfg, rec))
    m.batched = BATCHED_UPDATE and batchable(cfg, opt)
    m.params = [p for g in opt.param_groups for p in g["params"]]
    return m


def _device(cfg: Config) -> torch.device:
    """Where the stack trains: CUDA as Lightning would pick it for the same config (``gpu``, ``cuda`` or
    ``auto`` with a visible GPU: :func:`~pipeline.training.machine.uses_cuda`), else the CPU."""
    from pipeline.training.machine import uses_cuda

    return torch.device("cuda") if uses_cuda(cfg) else torch.device("cpu")


Refill = Callable[[int], list[tuple[Config, dict[str, Any], list]] | None]


def run_stack(
    cfgs: list[Config],
    *,
    parent_run_id: str | None = None,
    extra_tags: list[dict[str, Any]] | None = None,
    callbacks: list[list] | None = None,
    experiment_id: str | None = None,
    on_done: Callable[[int, RunResult | BaseException], None] | None = None,
    refill: Refill | None = None,
    capacity: int | None = None,
) -> list[RunResult | BaseException]:
    """Train ``cfgs`` (equal :func:`stack_key`) as one stack; each gets its own MLflow run, recorded and
    closed as :func:`~pipeline.training.run.run` records and closes it. Returns per member its RunResult,
    or the exception that failed it alone (its run closed FAILED). Ctrl-C / SIGTERM closes every run
    KILLED and re-raises; an error in the shared loop closes every unfinished run FAILED and re-raises.
    ``on_done(i, result)``: called as soon as member ``i``'s run is closed (a sweep tells its trial then).

    ``refill(n)``: called between steps while fewer than ``capacity`` (default ``len(cfgs)``) members
    train; returns up to ``n`` new ``(cfg, extra_tags, callbacks)`` of the same :func:`stack_key`, which
    join at once as members ``len(cfgs)``, ``len(cfgs) + 1``, ... (``[]``: none now; ``None``: none ever
    again). Their results follow the first ones in the returned list."""
    from pipeline.training.tasks import task_of

    if len({stack_key(c) for c in cfgs}) != 1:
        raise ValueError("run_stack: the configs differ in the task or device (stack_key)")
    quiet_lightning()
    configure_torch(cfgs[0])
    stack = _Stack(
        task_of(cfgs[0].task), _device(cfgs[0]), cfgs[0], on_done, refill, (parent_run_id, experiment_id)
    )
    tags = extra_tags or [{} for _ in cfgs]
    extras = callbacks or [[] for _ in cfgs]
    try:
        # SIGTERM is an exception from the first member's start to the last one's close (not only in the
        # loop: the default action would kill the process and leave the runs RUNNING)
        with terminate_as_exception():
            for cfg, tg, ex in zip(cfgs, tags, extras, strict=True):
                stack.start(cfg, tg, ex)
            fit(
                list(stack.members),
                stack.task,
                stack.device,
                stack.joining if refill else None,
                capacity or len(cfgs),
            )
    except (KeyboardInterrupt, SystemExit, Terminated):
        for m in stack.members:
            m.close("KILLED")
        raise
    except BaseException as e:
        for m in stack.members:
            m.close("FAILED", e)
        raise
    return [m.result if m.result is not None else RuntimeError("no result") for m in stack.members]


class _Stack:
    """The members of one :func:`run_stack` call, in the order they joined, and how new ones start."""

    def __init__(
        self,
        task,
        device: torch.device,
        first: Config,
        on_done,
        refill: Refill | None,
        run_ids: tuple[str | None, str | None],
    ):
        self.task, self.device, self.key, self.on_done = task, device, stack_key(first), on_done
        self.refill, self.run_ids = refill, run_ids
        self.members: list[Member] = []
        self.signals_before = received_count()

    def start(self, cfg: Config, tags: dict[str, Any], extra: list) -> Member:
        """A new member: its run created and the member in :attr:`members` as one step for SIGTERM
        (:func:`deferred`), so a run created is a run this stack closes."""
        parent_run_id, experiment_id = self.run_ids
        rec = None
        try:
            with deferred():
                rec = _start_recorder(cfg, parent_run_id, tags, experiment_id)
                m = _member(cfg, self.task, rec, extra, self.device)
                m.index, m.on_done, m.signals_before = len(self.members), self.on_done, self.signals_before
                self.members.append(m)
        except BaseException as e:
            if rec is not None and not any(x.rec is rec for x in self.members):
                killed = isinstance(e, (KeyboardInterrupt, SystemExit, Terminated))
                close_run(rec, "KILLED" if killed else "FAILED", None if killed else e)
            raise
        return m

    def joining(self, n: int) -> list[Member] | None:
        """New members for ``n`` free slots (a member that fails to start fails alone, told at once)."""
        assert self.refill is not None
        asked = self.refill(n)
        if asked is None:
            return None
        out = []
        for cfg, tags, extra in asked:
            if stack_key(cfg) != self.key:
                raise ValueError("run_stack: refill returned a config of another task or device (stack_key)")
            try:
                out.append(self.start(cfg, tags, extra))
            except (KeyboardInterrupt, SystemExit, Terminated):
                raise
            except Exception as e:
                failed = Member(cfg, None, None, cast(Any, None), cast(Any, None), cast(Any, None))
                failed.index, failed.result, failed.closed = len(self.members), e, True
                self.members.append(failed)
                if self.on_done is not None:
                    self.on_done(failed.index, e)
        return out
