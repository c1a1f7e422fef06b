"""A sweep worker's side of a store that does not answer for a while (a PostgreSQL failover or restart,
a database server behind a network cut): the worker waits for its stores instead of failing trials.

Before, each trial the outage met failed within a second (the store refused the run's first write), the
worker asked the next one, and after three in a row it stopped ("3 trials in a row raised"); every worker
of the machine did the same, and the sweep ended short of ``n_trials`` with spare budget (a chaos review:
PostgreSQL gone for 15 s under two workers). A trial whose error is a store that did not answer
(:func:`pipeline.store_errors.store_unreachable`) is now *cut*, not failed: the worker keeps it, says in
one line that a store did not answer, asks both stores again (1 s, doubling to 10 s) until they answer,
for at most :data:`~pipeline.store_errors.OUTAGE_LIMIT_S`, and then closes each cut trial as a killed
worker's trial is closed (README, "Faults and resuming"): its MLflow run(s) KILLED, FAIL with attr
``error`` naming the outage, its params re-enqueued once. Cut trials do not count toward the worker's
errors in a row. A store that stays away longer ends the worker with one line and exit 1; its trials,
owned by a process that is gone, are then the reapers' (:func:`pipeline.sweep.owners.reap_stale`).
"""

from __future__ import annotations

import contextlib
import sys
import time

from pipeline import signals as sigterm
from pipeline.signals import check_terminated
from pipeline.store_errors import OUTAGE_LIMIT_S, Outage, store_unreachable
from pipeline.sweep.record import outcome_tags, tag_run

FIRST_PAUSE_S, MAX_PAUSE_S = 1.0, 10.0


def cut(worker, trial, e: BaseException) -> bool:
    """If ``e`` says a store did not answer, keep ``trial`` for :func:`ride_out` and return True."""
    why = store_unreachable(e)
    if why is None:
        return False
    print(f"trial {trial.number} cut by a store that did not answer: {why}", file=sys.stderr, flush=True)
    worker.cut.append((trial, why))
    return True


def met(worker, e: BaseException) -> bool:
    """If ``e``, met outside a trial (asking, telling), says a store did not answer, keep it for
    :func:`ride_out`, with the trial it asked but could not own (:func:`~pipeline.sweep.owners.ask_owned`;
    left RUNNING with no owner, it held its place in the budget until the orphan reaper's ``ORPHAN_S``: a
    test with PostgreSQL cut for 15 s) and those a batched worker had asked before it
    (:func:`~pipeline.sweep.batch.next_trials`; owned by a live worker, no reaper would take them)."""
    why = store_unreachable(e)
    if why is None:
        return False
    worker.met = e
    asked = [*getattr(e, "held_trials", []), getattr(e, "asked_trial", None)]
    worker.cut += [(t, why) for t in asked if t is not None]
    return True


def probe(worker) -> None:
    """One read of each store the worker writes to; raises what the store raised."""
    from pipeline.tracking import client

    worker.storage.get_study_id_from_name(worker.sw.study)
    client(worker.mlflow_uri).get_experiment(worker.spec["experiment_id"])


def ride_out(worker, e: BaseException | None = None, clock=time.monotonic) -> int | None:
    """Wait until both stores answer, then close the cut trials. ``e``: the error that met the worker
    outside a trial (asking, telling), if any. Returns None to go on asking trials, or the worker's exit
    status: 0 when its sweep parent is gone or its deadline passed meanwhile, 1 when the stores stayed
    away past the limit. A SIGTERM while it waits raises as anywhere in the worker."""
    who = f"worker {worker.spec.get('worker')}"
    outage = Outage(sys.stderr, limit_s=OUTAGE_LIMIT_S, clock=clock, who=who, meanwhile="waiting for it")
    met = [store_unreachable(e)] if e is not None else []
    outage.begin([*met, *(why for *_, why in worker.cut + worker.untagged)][0] or "?")
    pause = FIRST_PAUSE_S
    while True:
        check_terminated()
        sigterm.check_received(worker.signals_before)
        if worker.parent_gone() or (worker.deadline and time.time() > worker.deadline):
            return 0
        try:
            if outage.call(lambda: probe(worker) or True, False):
                break
        except Exception as err:
            if store_unreachable(err) is None:
                raise
            print(f"{who}: {store_unreachable(err)}; no answer for {OUTAGE_LIMIT_S / 60:.0f} min, stopping",
                  file=sys.stderr, flush=True)  # fmt: skip
            return 1
        time.sleep(pause)
        pause = min(2 * pause, MAX_PAUSE_S)
    for trial, why in worker.cut:
        close_cut(worker.study, worker.mlflow_uri, trial, why)
    for run_id, tags, _ in worker.untagged:
        tag_run(worker.mlflow_uri, run_id, tags)
    worker.cut.clear()
    worker.untagged.clear()
    return None


def close_cut(study, mlflow_uri: str | None, trial, why: str) -> None:
    """A trial an outage cut, closed once the stores answer: its run(s) still RUNNING (or FINISHED, its
    trial untold) KILLED, then FAIL with attr ``error``, params re-enqueued once. A trial found told is
    left as it is: by a reaper (its heartbeat judged stale), or by this worker's own tell, whose commit
    PostgreSQL made before the connection went (the worker read an error); its run then gets the outcome
    tags the tell's step would have written (a test with PostgreSQL cut for 15 s found such a run FINISHED
    with no ``optuna_state``)."""
    from optuna.trial import TrialState

    from pipeline.sweep.owners import close_trial_runs, enqueue_retry

    storage = study._storage
    with contextlib.suppress(Exception):
        told = storage.get_trial(trial._trial_id)
        if told.state in (TrialState.COMPLETE, TrialState.PRUNED):
            a = told.user_attrs
            value = told.value if told.state == TrialState.COMPLETE else None
            tags = outcome_tags(told.state.name, bool(a.get("diverged")), value, a.get("pruned_by"))
            tag_run(mlflow_uri, a.get("mlflow_run_id"), tags)
        if told.state.is_finished():
            return
        storage.set_trial_user_attr(trial._trial_id, "error", f"a store did not answer ({why})"[:1000])
        close_trial_runs(mlflow_uri, study, trial, "KILLED", untold=True)
        study.tell(trial.number, state=TrialState.FAIL)
        enqueue_retry(study, storage.get_trial(trial._trial_id))
