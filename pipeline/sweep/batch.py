"""Batched trials: a sweep worker asks K trials at once and trains them as stacks (README, "Batched trials").

:func:`next_trials` asks up to ``trials_per_worker`` trials under the budget lock (the budget counts
RUNNING trials, so the study still stops at exactly ``n_trials``; the TPE sampler is a constant liar,
so the K points differ; WAITING retries and start-up points are popped first, as by one ask). The trials
are grouped by :func:`pipeline.training.stacked.stack_key` (the batch stream and schedule); a group of
one trains on today's path (:meth:`Worker.run_trial`), a larger one as a stack
(:func:`pipeline.training.stacked.run_stack`). Every trial stays its own Optuna trial and MLflow child
run, told as it ends (the outcome table of :mod:`pipeline.sweep.worker`): a member that is pruned or
diverges is told at once while the others go on. Faults as one trial: Ctrl-C / SIGTERM tells every
trial of the batch not yet told FAIL (attr ``interrupted``) and re-enqueues its params; kill -9 leaves
them RUNNING with this worker as owner, and the reaper closes each (FAIL, run KILLED, retried once).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from pipeline.names import KIND, KIND_TRIAL, STUDY, TRIAL_NUMBER
from pipeline.signals import Terminated

# trials_per_worker: auto. Measured (README, "Batched trials"): the default sweep on the 2-core CPU, 2
# workers, identical points: K = 4 ran 1.13x the trials per hour of K = 1, K = 8 only 1.04x (a fused
# CPU block holds 4 members of H = 32; the rest is compute and per-trial artifacts, not per-step
# overhead). GPU: unmeasured (no card was lent); one launch per time step for many members is the gain.
AUTO_CPU = 4
AUTO_GPU = 64


def trials_per_worker(sw, gpu: bool) -> int:
    """The sweep's ``trials_per_worker`` (``auto``: :data:`AUTO_CPU` or :data:`AUTO_GPU`), at most the budget."""
    k = sw.trials_per_worker
    if k is None:
        k = AUTO_GPU if gpu else AUTO_CPU
    return max(1, min(k, sw.n_trials))


def next_trials(worker, k: int) -> list:
    """Under the budget lock: reap stale trials, then ask at most ``k`` trials, never past the budget
    (nor past this worker's share of what is left)."""
    from pipeline.sweep.stores import budget_lock, owner_tag, reap_stale
    from pipeline.sweep.study import budget_left

    with budget_lock(worker.url, worker.storage, worker.sw.study):
        reap_stale(worker.study, worker.url, worker.mlflow_uri)
        left = budget_left(worker.study, worker.sw.n_trials)
        # The last trials are shared among this machine's workers (spec "workers"), so that one worker
        # does not train a full stack while the others idle: at most ceil(left / workers) each.
        n = min(k, left, -(-left // max(1, int(worker.spec.get("workers", 1)))))
        trials = []
        for _ in range(max(0, n)):
            trial = worker.study.ask()
            trial.set_user_attr("worker", owner_tag())
            trials.append(trial)
        return trials


def _fail(worker, trial, e: BaseException) -> None:
    from optuna.trial import TrialState

    msg = f"{type(e).__name__}: {e}"[:1000]
    print(f"trial {trial.number} failed: {msg}", file=sys.stderr)
    with contextlib.suppress(Exception):
        trial.set_user_attr("error", msg)
    worker.study.tell(trial, state=TrialState.FAIL)


def _interrupted(worker, trial) -> None:
    from optuna.trial import TrialState

    from pipeline.sweep.stores import enqueue_retry

    with contextlib.suppress(Exception):
        trial.set_user_attr("interrupted", True)
        worker.study.tell(trial, state=TrialState.FAIL)
        enqueue_retry(worker.study, worker.study._storage.get_trial(trial._trial_id))


def run_batch(worker, trials: list) -> bool:
    """Train ``trials`` (asked by :func:`next_trials`), grouped into stacks; False when any raised."""
    from pipeline.sweep.worker import heartbeat
    from pipeline.training.stacked import stack_key

    todo = list(trials)  # not yet told
    ok = True
    try:
        with contextlib.ExitStack() as beats:
            for t in trials:
                beats.enter_context(heartbeat(worker.storage, t._trial_id, worker.sw.heartbeat.interval))
            groups: dict[tuple, list[tuple[Any, Any]]] = {}
            for t in trials:
                try:
                    cfg = worker.trial_run_config(t)
                except Exception as e:  # a bad value: this trial alone fails
                    todo.remove(t)
                    _fail(worker, t, e)
                    ok = False
                    continue
                groups.setdefault(stack_key(cfg), []).append((t, cfg))
            for group in groups.values():
                if len(group) == 1:
                    t = group[0][0]
                    todo.remove(t)  # run_trial tells it however it ends
                    ok = worker.run_trial(t) and ok
                else:
                    ok = _run_group(worker, group, todo) and ok
    except (KeyboardInterrupt, SystemExit, Terminated):
        for t in todo:  # their runs are already closed KILLED by run_stack
            _interrupted(worker, t)
        raise
    return ok


def _run_group(worker, group: list[tuple[Any, Any]], todo: list) -> bool:
    from pipeline.sweep.worker import TrialCallback
    from pipeline.training.stacked import run_stack

    trials = [t for t, _ in group]
    cfgs = [c for _, c in group]
    cbs = [TrialCallback(t, worker.sw.prune.max_grad_norm, c.trainer.log_every) for t, c in group]
    tags = [{KIND: KIND_TRIAL, STUDY: worker.sw.study, TRIAL_NUMBER: str(t.number)} for t in trials]
    ok = True

    def done(i: int, r) -> None:  # a member's run is closed: tell its trial now
        nonlocal ok
        t = trials[i]
        todo.remove(t)
        if isinstance(r, BaseException):
            _fail(worker, t, r)
            ok = False
            return
        worker.log_best_model(r, cbs[i].module)
        worker.tell(t, r, cbs[i].pruned_by)

    try:
        run_stack(
            cfgs,
            parent_run_id=worker.spec["parent_run_id"],
            extra_tags=tags,
            callbacks=[[cb] for cb in cbs],
            experiment_id=worker.spec["experiment_id"],
            on_done=done,
        )
    except (KeyboardInterrupt, SystemExit, Terminated):
        raise
    except Exception as e:  # the shared loop raised: every member not yet told fails
        import traceback

        traceback.print_exc()
        for t in trials:
            if t in todo:
                todo.remove(t)
                _fail(worker, t, e)
        return False
    return ok
