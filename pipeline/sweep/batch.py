"""Batched trials: a sweep worker trains up to K trials at once as rolling stacks (README, "Batched trials").

:func:`next_trials` asks up to ``trials_per_worker`` trials under the budget lock (the budget counts
RUNNING trials, so the study still stops at exactly ``n_trials``; the TPE sampler is a constant liar,
so the K points differ; WAITING retries and start-up points are popped first, as by one ask). The trials
are grouped by :func:`pipeline.training.stacked.stack_key` (task and device) and each group trains as
one stack (:func:`pipeline.training.stacked.run_stack`); when a member leaves it (finished, pruned,
diverged), the worker asks the next trial for its slot at once (:func:`_refill`), so a stack stays K
wide until the budget is spent instead of waiting for its slowest member. Every trial stays its own
Optuna trial and MLflow child run, told as it ends (the outcome table of :mod:`pipeline.sweep.worker`).
Faults as one trial: Ctrl-C / SIGTERM tells every trial the worker holds and has not told FAIL (attr
``interrupted``) and re-enqueues its params; kill -9 leaves them RUNNING with this worker as owner, and
the reaper closes each (FAIL, run KILLED, retried once).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from pipeline.signals import Terminated, received
from pipeline.sweep import outages
from pipeline.sweep.record import end_trial, trial_tags

# trials_per_worker: auto. Measured (README, "Batched trials"): the default sweep on the 2-core CPU, 2
# workers, rolling stacks: K = 4 ran 1.1x (same points) to 1.4x (TPE) the trials per hour of K = 1 (medians
# over 3 seeds); K = 2, 3, 6, 8 were no faster (a fused CPU block holds 4 members of H = 32). On one H200
# (16 cores; benchmarks/gpu_check.sh, 2026-12-04): with each member's clipping, guard and optimizer as
# their own small kernels (and one host read per member and step), 12 workers with K = 32 were slower than
# 12 with K = 1 (11606 trials/h). With the stack's batched update (pipeline.training.stack_update: one
# fused norm, one host read, one foreach optimizer step for all members) 12 workers with K = 32 ran 21961
# trials/h, 1.9x that, and 14.9x one worker with K = 1 in the same run (1479 trials/h).
AUTO_CPU = 4
AUTO_GPU = 32


def trials_per_worker(sw, gpu: bool) -> int:
    """The sweep's ``trials_per_worker`` (``auto``: :data:`AUTO_CPU` or :data:`AUTO_GPU`), at most the budget."""
    k = sw.trials_per_worker
    if k is None:
        k = AUTO_GPU if gpu else AUTO_CPU
    return max(1, min(k, sw.n_trials))


def next_trials(worker, k: int) -> list:
    """Under the budget lock: reap stale trials, then ask at most ``k`` trials, never past the budget
    (nor past this worker's share of what is left)."""
    from pipeline.sweep.owners import ask_owned, reap_stale
    from pipeline.sweep.stores import budget_lock
    from pipeline.sweep.study import budget_left

    with budget_lock(worker.url, worker.storage, worker.sw.study):
        reap_stale(worker.study, worker.url, worker.mlflow_uri)
        left = budget_left(worker.study, worker.sw.n_trials)
        # The last trials are shared among this machine's workers (spec "workers"), so that one worker
        # does not train a full stack while the others idle: at most ceil(left / workers) each.
        n = min(k, left, -(-left // max(1, int(worker.spec.get("workers", 1)))))
        asked: list = []
        try:
            for _ in range(max(0, n)):
                asked.append(ask_owned(worker.study))
        except Exception as e:  # owned, not yet training: the worker closes them too (sweep.outages.met)
            e.held_trials = asked  # type: ignore[attr-defined]
            raise
        return asked


def _fail(worker, trial, e: BaseException) -> None:
    """``trial`` told FAIL with its error; after a SIGTERM, released as interrupted instead (the error is
    the stop's: :func:`pipeline.signals.received`), so a resume reruns its params."""
    from optuna.trial import TrialState

    from pipeline.sweep.owners import release_trial

    if received(worker.signals_before):
        with contextlib.suppress(Exception):
            release_trial(worker.study, worker.mlflow_uri, trial)
        return
    if outages.cut(worker, trial, e):  # a store did not answer: the worker closes it once it does
        return
    msg = f"{type(e).__name__}: {e}"[:1000]
    print(f"trial {trial.number} failed: {msg}", file=sys.stderr)
    with contextlib.suppress(Exception):
        trial.set_user_attr("error", msg)
    worker.study.tell(trial, state=TrialState.FAIL)


def _interrupted(worker, trial, e: BaseException) -> None:
    from pipeline.sweep.owners import asked_stop, close_interrupted

    with contextlib.suppress(Exception):
        close_interrupted(
            worker.study, trial._trial_id, worker.mlflow_uri, asked_stop(e, worker.signals_before)
        )


class Held:
    """The trials a worker holds (asked, not yet told), each with its heartbeat running (RDB storages)
    from when it is asked until it is told: a rolling stack holds trials for the whole sweep, one at a
    time, so each heartbeat stops with its own trial, not with the stack."""

    def __init__(self, worker):
        self.worker = worker
        self.beats: dict[int, tuple[Any, Any]] = {}  # trial id -> (trial, its heartbeat context)

    def add(self, t) -> None:
        from pipeline.sweep.owners import heartbeat

        beat = heartbeat(self.worker.storage, t._trial_id, self.worker.sw.heartbeat.interval)
        beat.__enter__()
        self.beats[t._trial_id] = (t, beat)

    def remove(self, t) -> None:
        """``t`` is told (or about to be): stop its heartbeat."""
        _, beat = self.beats.pop(t._trial_id)
        beat.__exit__(None, None, None)

    def __contains__(self, t) -> bool:
        return t._trial_id in self.beats

    def __len__(self) -> int:
        return len(self.beats)

    def __iter__(self):
        return iter([t for t, _ in list(self.beats.values())])

    def close(self) -> None:
        for t in list(self):
            self.remove(t)


def run_batch(worker, trials: list) -> bool:
    """Train ``trials`` (asked by :func:`next_trials`) as rolling stacks: each group of one stack key
    trains as one stack whose free slots are refilled with newly asked trials (:func:`_refill`) until
    the budget is spent; a trial asked for a slot whose config belongs to another stack waits for its own
    (at most ``trials_per_worker`` trials are held at once). False when any trial raised."""
    from pipeline.training.stacked import stack_key

    todo = Held(worker)  # asked, not yet told
    ok = True

    def hold(t) -> Any:  # a trial this worker now holds: heartbeat on, config built (None: it failed)
        todo.add(t)
        try:
            return worker.trial_run_config(t)
        except Exception as e:  # a bad value: this trial alone fails
            todo.remove(t)
            _fail(worker, t, e)
            return None

    try:
        waiting: list[tuple[Any, Any]] = []  # held, not yet training
        for t in trials:
            cfg = hold(t)
            ok = cfg is not None and ok
            if cfg is not None:
                waiting.append((t, cfg))
        while waiting:
            key = stack_key(waiting[0][1])
            group = [w for w in waiting if stack_key(w[1]) == key]
            waiting[:] = [w for w in waiting if stack_key(w[1]) != key]
            ok = _Group(worker, group, todo, waiting, hold).run() and ok
    except (KeyboardInterrupt, SystemExit, Terminated) as e:
        for t in list(todo):  # their runs are already closed KILLED by run_stack
            todo.remove(t)
            _interrupted(worker, t, e)
        raise
    finally:
        todo.close()
    return ok


def _refill(worker, n: int, todo: Held) -> list | None:
    """Up to ``n`` newly asked trials for free slots (``todo``: the trials this worker holds already, at
    most ``trials_per_worker`` in all); None once nothing more will come (budget spent, timeout, parent
    gone), so the stack stops asking and runs down."""
    if outages.sweep_over(worker):
        return None
    n = min(n, worker.k - len(todo))
    if n <= 0:
        return []
    trials = next_trials(worker, n)
    if not trials:
        return None
    return trials


class _Group:
    """One stack of a worker: its trials in the order they joined (the stack's member indices), their
    pruning callbacks, and how a free slot is refilled."""

    def __init__(self, worker, group: list[tuple[Any, Any]], todo: Held, waiting: list, hold):
        from pipeline.training.stacked import stack_key

        self.worker, self.todo, self.waiting, self.hold = worker, todo, waiting, hold
        self.key = stack_key(group[0][1])
        self.trials = [t for t, _ in group]
        self.cfgs = [c for _, c in group]
        self.cbs = [self.callback(t, c) for t, c in group]
        self.ok = True

    def callback(self, t, cfg) -> Any:
        from pipeline.sweep.worker import TrialCallback

        return TrialCallback(
            t, self.worker.sw.prune.max_grad_norm, cfg.trainer.log_every, self.worker.sw.penalty
        )

    def tags(self, t) -> dict[str, Any]:
        return trial_tags(self.worker.sw.study, t.number)

    def done(self, i: int, r) -> None:
        """Member ``i``'s run is closed: tell its trial now."""
        t = self.trials[i]
        self.todo.remove(t)
        if isinstance(r, BaseException):
            _fail(self.worker, t, r)
            self.ok = False
            return
        try:
            end_trial(self.worker, t, r, self.cbs[i].module, self.cbs[i].pruned_by)
        except Exception as e:  # no longer held: a store that did not answer leaves it to sweep.outages
            if outages.reaped(self.worker, t, e):
                return
            if not outages.cut(self.worker, t, e):
                raise
            self.ok = False

    def refill(self, n: int) -> list | None:
        """Configs of newly asked trials for ``n`` free slots; one of another stack key waits for its own."""
        from pipeline.training.stacked import stack_key

        asked = _refill(self.worker, n, self.todo)
        if asked is None:
            return None
        joining = []
        for t in asked:
            cfg = self.hold(t)
            if cfg is None:
                self.ok = False
            elif stack_key(cfg) != self.key:
                self.waiting.append((t, cfg))
            else:
                self.trials.append(t)
                self.cbs.append(self.callback(t, cfg))
                joining.append((cfg, self.tags(t), [self.cbs[-1]]))
        return joining

    def run(self) -> bool:
        from pipeline.training.stacked import run_stack

        try:
            run_stack(
                self.cfgs,
                parent_run_id=self.worker.spec["parent_run_id"],
                extra_tags=[self.tags(t) for t in self.trials],
                callbacks=[[cb] for cb in self.cbs],
                experiment_id=self.worker.spec["experiment_id"],
                on_done=self.done,
                refill=self.refill,
                capacity=self.worker.k,
            )
        except (KeyboardInterrupt, SystemExit, Terminated):
            raise
        except Exception as e:  # the shared loop raised: every member not yet told fails
            import traceback

            traceback.print_exc()
            outages.met(self.worker, e)  # a refill that met an outage: the trials it asked are cut too
            for t in self.trials:
                if t in self.todo:
                    self.todo.remove(t)
                    _fail(self.worker, t, e)
            return False
        return self.ok
