"""The training loop of a stack (:func:`pipeline.training.stacked.run_stack`; README, "Batched trials"):
the members' batch streams, one step of every active member, validation, and a member's end.

The loop reproduces Lightning's schedule per member (``pytorch_lightning`` 2.x fit loop): the step counter
increments after the optimizer step, validation every ``trainer.val_every`` steps, at the last step, and at
the step a member is told to stop; then ``on_train_end``, and a final validation when the last step had
none (as :func:`pipeline.training.run._train`). A step is one stacked forward
(:func:`pipeline.training.stack.stacked_forward`), one backward of the summed loss, one batched update
for the members that allow it (:func:`pipeline.training.stack_update.measure`, then ``apply``) and each
other member's own clipping and optimizer step, then the members' callbacks. A step in which a member of
a fused block has a non-finite loss or gradient is taken again member by member for that block
(:func:`_beside_nonfinite`), so that a diverging member does not stop its neighbours.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from pipeline.signals import Terminated, check_terminated, deferred
from pipeline.training import record
from pipeline.training.stack_update import apply, measure

if TYPE_CHECKING:
    from pipeline.training.stacked import Member


class Streams:
    """The batch streams of a stack, one per cohort (seed, loop iteration joined at): each the stream
    :class:`~pipeline.training.data.OnDeviceBatches` gives the same config alone, drawn once per step for
    every member of the cohort; and the validation sets, one per seed (the task config, validation size
    included, is the stack's own).

    A cohort's stream has no end of its own: each member stops at its ``max_steps``, and the stream goes
    when no member reads it. A stream sized to the cohort's first members ran dry under a member that
    joined it later with more steps (a slot refilled before the first step joins the cohort of the
    members that started the stack): StopIteration failed the whole stack. The batches are a prefix of
    one generator's draws (:class:`~pipeline.training.data.OnDeviceBatches`), so every member still
    sees exactly the batches it sees alone."""

    def __init__(self, task, device: torch.device):
        self.task, self.device = task, device
        self.iters: dict[tuple[int, int], Any] = {}
        self.vals: dict[int, list] = {}

    def join(self, m: Member, it: int) -> None:
        from pipeline.training.data import OnDeviceBatches

        cfg = m.cfg
        m.cohort = (cfg.seed, it)
        if m.cohort not in self.iters:
            endless = sys.maxsize  # range() is lazy: a stream as long as its longest reader
            self.iters[m.cohort] = iter(
                OnDeviceBatches(self.task, cfg.task.batch_size, endless, cfg.seed, self.device)
            )
        if cfg.seed not in self.vals:
            chunk = max(cfg.task.batch_size, 256)  # as TaskDataModule.val_dataloader
            x_val, y_val = self.task.validation(cfg.task.val_size, cfg.seed + 1, self.device)
            self.vals[cfg.seed] = list(zip(x_val.split(chunk), y_val.split(chunk), strict=True))
        m.val = self.vals[cfg.seed]

    def next(self, active: list[Member]) -> dict[tuple[int, int], Any]:
        """This step's batch of every cohort with an active member; the streams of the others dropped."""
        live = {m.cohort for m in active}
        for c in [c for c in self.iters if c not in live]:
            del self.iters[c]
        return {c: next(self.iters[c]) for c in live}


def fit(
    members: list[Member],
    task,
    device: torch.device,
    joining: Callable[[int], list[Member] | None] | None,
    capacity: int,
) -> None:
    streams = Streams(task, device)
    layouts: dict = {}  # the batched update's layout of the current members (stack_update.measure)

    def join(new: list[Member], it: int) -> None:
        for m in new:
            streams.join(m, it)
            m.module.train()
            m.call("setup", "fit")
            m.call("on_fit_start")
            m.call("on_train_start")

    active = list(members)
    join(active, 0)
    it = 0
    while True:
        check_terminated()  # a SIGTERM whose exception a garbage-collector callback dropped
        if joining is not None and len(active) < capacity:
            new = joining(capacity - len(active))
            if new is None:
                joining = None  # the sweep has nothing more to give
            elif new:
                join(new, it)
                active += new
        if not active:
            break
        _step(active, task, streams.next(active), layouts)
        still = []
        for m in active:
            max_steps = m.cfg.trainer.max_steps
            val_every = min(m.cfg.trainer.val_every, max_steps)
            last = m.trainer.global_step >= max_steps
            if m.trainer.should_stop or last or m.trainer.global_step % val_every == 0:
                _validate(m)
            if m.trainer.should_stop or last:
                _finish(m)
            else:
                still.append(m)
        active = still
        it += 1


def _step(
    active: list[Member], task, batches: dict[tuple[int, int], Any], layouts: dict | None = None
) -> None:
    """One training step of every active member on its cohort's batch (Lightning's automatic
    optimization: zero_grad, training_step, backward, configure_gradient_clipping, optimizer.step,
    step + 1)."""
    from pipeline.training.stack import plan, stacked_forward

    for m in active:
        m.call("on_train_batch_start", batches[m.cohort], m.trainer.global_step)
        _zero_grad(m)
    models = [m.module.model for m in active]
    outs = stacked_forward(models, [batches[m.cohort][0] for m in active])
    total = None
    for m, out in zip(active, outs, strict=True):
        term = _loss(m, task, out, batches[m.cohort])
        total = term if total is None else total + term
    assert total is not None
    total.backward()  # d(sum_k L_k)/d theta_j = dL_j/d theta_j: members share no parameter
    together = [m for m in active if m.batched and all(p.grad is not None for p in m.params)]
    got = measure(together, layouts)
    redo = _beside_nonfinite(active, plan(models), together, got.finite)
    if redo:  # rare: a step that stopped someone, taken again member by member (see _beside_nonfinite)
        for m in redo:
            _zero_grad(m)
            x, _ = batches[m.cohort]
            _loss(m, task, m.module.model(x), batches[m.cohort]).backward()
        got = measure(together, layouts)
    batched = {id(m) for m in together}
    for m in active:
        if id(m) not in batched:
            m.module.configure_gradient_clipping(m.opt)
            m.opt.step()
    apply(got)
    for m in active:
        m.trainer.global_step += 1
    _stage_windows(active)
    for m in active:
        m.call("on_train_batch_end", None, batches[m.cohort], m.trainer.global_step - 1)


def _zero_grad(m: Member) -> None:
    for p in m.params:  # zero_grad(set_to_none=True), without its per-call profiler record
        p.grad = None


def _loss(m: Member, task, out: torch.Tensor, batch) -> torch.Tensor:
    """The member's training loss on ``out`` (its model's output on ``batch``), its remedies' penalty
    added; the loss kept on the module for the step's record."""
    x, y = batch
    loss = task.loss(out, y)
    m.module._loss = loss.detach()
    penalty = m.module.remedies.penalty(m.module.model, x, y, m.trainer.global_step)
    return loss if penalty is None else loss + penalty


def _beside_nonfinite(
    active: list[Member], blocks: list[list[int]], together: list[Member], finite: list[float]
) -> list[Member]:
    """The members of every fused block in which some member's loss or gradient is not finite.

    In a block-diagonal kernel a member's infinite or NaN hidden state (a ReLU state past float32's
    range, weights gone infinite) meets its neighbours' zero blocks, and 0 x inf is NaN in IEEE
    arithmetic: forward, the neighbours' states turn NaN; backward, so do their gradients. The guard
    would stop them all as diverged. Their step is taken again member by member, each on its own kernel
    as the trial alone (then only the member whose own numbers are not finite is stopped). Read from the
    batched update's host read; members of a shared block outside it (their own update path) cost one
    more host read per step, only in such a stack."""
    shared = [i for b in blocks if len(b) > 1 for i in b]
    if not shared:
        return []
    ok = {id(m): f == 1.0 for m, f in zip(together, finite, strict=True)}
    others = [active[i] for i in shared if id(active[i]) not in ok]
    if others:
        flags = []
        for m in others:
            grads = [p.grad for p in m.params if p.grad is not None]
            norm = torch.stack(torch._foreach_norm(grads)).sum() if grads else m.module._loss.new_zeros(())
            flags.append(torch.isfinite(norm) & torch.isfinite(m.module._loss))
        ok.update({id(m): bool(f) for m, f in zip(others, torch.stack(flags).tolist(), strict=True)})
    return [active[i] for b in blocks if len(b) > 1 and not all(ok[id(active[i])] for i in b) for i in b]


def _stage_windows(active: list[Member]) -> None:
    """The gradient windows that drain at this step (their monitor's rule: ``log_every`` records, or
    the guard fired), moved to the host in one transfer for all members instead of one each (on a GPU
    every transfer waits for the device)."""
    due = []
    for m in active:
        g, row = m.mon.grads, m.module.last_record
        if row is not None and (len(g._pending) + 1 >= g.log_every or m.module.diverged_step is not None):
            due.append((g, [*g._pending, row]))
    if len(due) < 2:
        return
    host = torch.stack([r for _, rows in due for r in rows]).cpu().numpy()
    i = 0
    for g, rows in due:
        g.stage(host[i : i + len(rows)])
        i += len(rows)


def _validate(m: Member) -> None:
    """The member's validation pass (its module's hooks on its validation set), then its callbacks'."""
    mod = m.module
    mod.eval()
    with torch.no_grad():
        mod.on_validation_epoch_start()
        for i, b in enumerate(m.val or []):
            mod.validation_step(b, i)
        mod.on_validation_epoch_end()
    mod.train()
    m.call("on_validation_end")


def _finish(m: Member) -> None:
    """The end of a member's fit (``on_train_end``, the final validation when the last step had none),
    then its record and its run closed FINISHED; an error here fails this member alone. The close and
    ``on_done`` (a sweep tells the member's trial there) are one step for SIGTERM (:func:`deferred`): a
    signal between them would fail a trial whose run says it finished."""
    error: Exception | None = None
    try:
        m.call("on_train_end")
        m.call("on_fit_end")
        m.module.mark_nonfinite_weights(m.trainer.global_step)
        if m.module.diverged_step is None and m.mon.val.last_step != m.trainer.global_step:
            m.trainer.state.fn = "validate"
            _validate(m)
        m.result = record.record_end(m.cfg, m.module.task, m.rec, m.module, m.mon, m.trainer.global_step)
    except (KeyboardInterrupt, SystemExit, Terminated):
        raise
    except Exception as e:
        error = e
    with deferred():
        if error is None:
            try:
                m.close("FINISHED")
            except Exception as e:
                error = e
        if error is not None:
            m.result = error
            m.close("FAILED", error)
        if m.on_done is not None and m.result is not None:
            m.on_done(m.index, m.result)
