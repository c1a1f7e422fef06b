"""A sweep worker's side of a store that does not answer for a while (a PostgreSQL failover or restart,
a tracking server restarting behind a proxy): the worker waits for its stores instead of failing trials.

Before, each trial the outage met failed within a second (the store refused the run's first write), the
worker asked the next one, and after three in a row it stopped ("3 trials in a row raised"); every worker
of the machine did the same, and the sweep ended short of ``n_trials`` with spare budget (PostgreSQL gone
for 15 s under two workers: tests/test_sweep_postgres.py, ``test_workers_wait_out_an_outage_of_both_stores``).

A trial whose error says a store did not answer (:func:`pipeline.store_errors.store_unreachable`), and
whose stores indeed do not answer a read right then (:func:`probe`: an unreachable data or artifact host
says "connection refused" too, and its trials fail and count as any error), is now *cut*, not failed:
the worker keeps it, says in one line that a store did not answer, asks both stores again (1 s, doubling
to 10 s) until they answer, for at most :data:`~pipeline.store_errors.OUTAGE_LIMIT_S`, and then closes
each cut trial as a killed worker's trial is closed (README, "Faults and resuming"): its MLflow run(s)
KILLED, FAIL with attr ``error`` naming the outage, its params re-enqueued once. A trial leaves the cut
list only once it is closed: a store that stops answering again meanwhile sends the worker back to
waiting, and a close repeated after a partial one re-enqueues the params if the first did not. Cut
trials do not count toward the worker's errors in a row. A store that stays away longer ends the worker
with one line and exit 1; its trials, owned by a process that is gone, are then the reapers'
(:func:`pipeline.sweep.owners.reap_stale`).
"""

from __future__ import annotations

import contextlib
import sys
import time

from pipeline import signals as sigterm
from pipeline.signals import check_terminated, deferred
from pipeline.store_errors import OUTAGE_LIMIT_S, Outage, store_unreachable
from pipeline.sweep.record import outcome_tags, tag_run

FIRST_PAUSE_S, MAX_PAUSE_S = 1.0, 10.0
OUTAGE_ERROR = "a store did not answer"  # how a cut trial's attr ``error`` begins


PROBE_FRESH_S = 5.0  # a probe's answer stands this long: one outage meets a stack's K members at once
_DRIVERS = ("psycopg2", "psycopg", "sqlalchemy", "sqlite3", "pymysql")


def _outage(worker, e: BaseException) -> str | None:
    """Why ``e`` is a store outage: it says a store did not answer, and either a database driver said it
    (the stores' own connection: Optuna's PostgreSQL pool keeps connections a restart closed, and the
    first write after a fast restart fails while a fresh probe finds the server back, which failed the
    trial: tests/test_outages.py) or the stores do not answer a read now (a probe; an unreachable data
    or artifact host says "connection refused" too). A probe's answer is kept PROBE_FRESH_S seconds."""
    from pipeline.store_errors import deepest

    why = store_unreachable(e)
    if why is None:
        return None
    if deepest(e, lambda x: type(x).__module__.split(".")[0] in _DRIVERS) is not None:
        return why
    at, down = getattr(worker, "probed", (None, False))
    if at is None or time.monotonic() - at > PROBE_FRESH_S:
        try:
            probe(worker)
            down = False
        except Exception as again:
            down = store_unreachable(again) is not None
        worker.probed = (time.monotonic(), down)
    return why if down else None  # they answer: the error came from elsewhere


def cut(worker, trial, e: BaseException) -> bool:
    """If ``e`` is a store outage (:func:`_outage`), keep ``trial`` for :func:`ride_out`; True then."""
    why = _outage(worker, e)
    if why is None:
        return False
    print(f"trial {trial.number} cut by a store that did not answer: {why}", file=sys.stderr, flush=True)
    worker.cut.append((trial, why))
    return True


def reaped(worker, trial, e: BaseException) -> bool:
    """Whether ``e`` says ``trial`` was finished by someone else while this worker held it: a heartbeat
    reaper (RDB storages) judged it stale because its beats stopped for longer than ``heartbeat.grace``
    (an outage that long), failed it and retried its params. The worker's report or tell then raised
    ``UpdateFinishedTrialError`` and the worker died of it (tests/test_outages.py). Its run, closed FINISHED since,
    is closed KILLED as the reaper would have, and the worker goes on. True when so."""
    from optuna.exceptions import UpdateFinishedTrialError

    from pipeline.store_errors import deepest
    from pipeline.sweep.owners import close_trial_runs

    if deepest(e, lambda x: isinstance(x, UpdateFinishedTrialError)) is None:
        return False
    print(f"trial {trial.number} was failed by a reaper while this worker held it (its heartbeat stopped "
          "for longer than heartbeat.grace); going on", file=sys.stderr, flush=True)  # fmt: skip
    with contextlib.suppress(Exception):
        close_trial_runs(worker.mlflow_uri, worker.study, trial, "KILLED", untold=True)
    return True


def met(worker, e: BaseException) -> bool:
    """If ``e``, met outside a trial (asking, telling, a batched stack's refill), says a store did not
    answer, keep it for :func:`ride_out`, with the trial it asked but could not own
    (:func:`~pipeline.sweep.owners.ask_owned`; left RUNNING with no owner, it held its place in the budget
    until the orphan reaper's ``ORPHAN_S``) and those a batched worker had asked before it
    (:func:`~pipeline.sweep.batch.next_trials`; owned by a live worker, no reaper would take them)."""
    why = store_unreachable(e)
    if why is None:
        return False
    worker.met = e
    asked = [*getattr(e, "held_trials", []), getattr(e, "asked_trial", None)]
    worker.cut += [(t, why) for t in asked if t is not None and t not in [c for c, _ in worker.cut]]
    return True


def probe(worker) -> None:
    """One read of each store the worker writes to; raises what the store raised."""
    from pipeline.tracking import client

    worker.storage.get_study_id_from_name(worker.sw.study)
    client(worker.mlflow_uri).get_experiment(worker.spec["experiment_id"])


def sweep_over(worker) -> bool:
    """Whether the worker's sweep is over for it: the sweep's parent is gone
    (:meth:`~pipeline.sweep.worker.Worker.parent_gone`) or the sweep's deadline (``timeout``) passed. A
    worker then takes no new trial, its stack asks no more, and a wait for the stores ends."""
    return bool(worker.parent_gone() or (worker.deadline and time.time() > worker.deadline))


def ride_out(worker, e: BaseException | None = None, clock=time.monotonic) -> int | None:
    """Wait until both stores answer, then close the cut trials and write the tags kept back. ``e``: the
    error that met the worker outside a trial (asking, telling), if any. Returns None to go on asking
    trials, or the worker's exit status: 0 when its sweep parent is gone or its deadline passed
    meanwhile, 1 when the stores stayed away past the limit. A SIGTERM while it waits raises as anywhere
    in the worker (its cut trials, still RUNNING and its own, are then released as interrupted)."""
    who = f"worker {worker.spec.get('worker')}"
    outage = Outage(sys.stderr, limit_s=OUTAGE_LIMIT_S, clock=clock, who=who, meanwhile="waiting for it")
    met = [store_unreachable(e)] if e is not None else []
    outage.begin([*met, *(why for *_, why in worker.cut + worker.untagged)][0] or "?")
    pause = FIRST_PAUSE_S
    while True:
        check_terminated()
        sigterm.check_received(worker.signals_before)
        if sweep_over(worker):
            with contextlib.suppress(Exception):  # what it can close now; the rest is the reapers'
                _settle(worker)
            return 0
        try:
            if outage.call(lambda: _answered(worker) and _settle(worker), False):
                return None
        except Exception as err:
            if store_unreachable(err) is None:
                raise
            print(f"{who}: {store_unreachable(err)}; no answer for {OUTAGE_LIMIT_S / 60:.0f} min, stopping",
                  file=sys.stderr, flush=True)  # fmt: skip
            return 1
        time.sleep(pause)
        pause = min(2 * pause, MAX_PAUSE_S)


def _answered(worker) -> bool:
    """:func:`probe`, True once it answers (it raises what a store that does not answer raised)."""
    probe(worker)
    return True


def _settle(worker) -> bool:
    """Close each cut trial and write each kept tag, taking each off its list once done; raises what a
    store that stopped answering again raised (the rest wait for its next answer). A close is one step
    for SIGTERM (:func:`~pipeline.signals.deferred`): a stop between its writes lost the params."""
    while worker.cut:
        trial, why = worker.cut[0]
        with deferred():
            close_cut(worker.study, worker.mlflow_uri, trial, why)
        worker.cut.pop(0)
    while worker.untagged:
        run_id, tags, _ = worker.untagged[0]
        _tag_now(worker.mlflow_uri, run_id, tags)
        worker.untagged.pop(0)
    return True


def _tag_now(mlflow_uri: str | None, run_id: str | None, tags: dict) -> None:
    """:func:`~pipeline.sweep.record.tag_run`, raising (as a store that did not answer) where it would
    have kept the write for later."""
    kept: list = []
    tag_run(mlflow_uri, run_id, tags, later=kept)
    if kept:
        raise ConnectionError(kept[0][2])


def close_cut(study, mlflow_uri: str | None, trial, why: str) -> None:
    """A trial an outage cut, closed once the stores answer: its run(s) still RUNNING (or FINISHED, its
    trial untold) KILLED, then FAIL with attr ``error``, params re-enqueued once. Raises what a store that
    does not answer raised; any other error leaves the trial to the reapers.

    Repeated after a partial close (the store went again), it finishes it: a trial FAIL with this error
    and no retry yet gets its retry. A trial found told otherwise is left as it is: by a reaper (its
    heartbeat judged stale: the reaper retried it), or by this worker's own tell, whose commit PostgreSQL
    made before the connection went (the worker read an error); its run then gets the outcome tags the
    tell's step would have written (such a run was FINISHED with no ``optuna_state``)."""
    from optuna.trial import TrialState

    from pipeline.sweep.owners import close_trial_runs, enqueue_retry
    from pipeline.tracking import client, end_run

    storage = study._storage
    try:
        told = storage.get_trial(trial._trial_id)
        if told.state in (TrialState.COMPLETE, TrialState.PRUNED):
            a = told.user_attrs
            value = told.value  # a pruned trial's: its last reported value (as record.tell)
            tags = outcome_tags(told.state.name, bool(a.get("diverged")), value, a.get("pruned_by"))
            _tag_now(mlflow_uri, a.get("mlflow_run_id"), tags)
            return
        ours = told.state == TrialState.FAIL and str(told.user_attrs.get("error", "")).startswith(
            OUTAGE_ERROR
        )
        if told.state.is_finished() and not ours:
            return
        if not ours:
            storage.set_trial_user_attr(trial._trial_id, "error", f"{OUTAGE_ERROR} ({why})"[:1000])
            close_trial_runs(mlflow_uri, study, trial, "KILLED", untold=True)  # best effort: checked here
            run_id = told.user_attrs.get("mlflow_run_id")
            run = client(mlflow_uri).get_run(run_id) if run_id else None  # raises if the store is down
            if run is not None and run.info.status == "RUNNING":  # its close failed: once more, unsuppressed
                try:
                    if run.info.lifecycle_stage != "active":
                        raise ValueError(f"the run is {run.info.lifecycle_stage}")
                    end_run(mlflow_uri, run_id, "KILLED")
                except Exception as e:
                    if store_unreachable(e) is not None:
                        raise
                    print(
                        f"trial {trial.number}: its run {run_id} could not be closed ({e})"[:300],
                        file=sys.stderr,
                    )
            study.tell(trial.number, state=TrialState.FAIL)
        if not any(t.user_attrs.get("retry_of") == trial.number for t in study.get_trials(deepcopy=False)):
            enqueue_retry(study, storage.get_trial(trial._trial_id))
    except Exception as e:
        if store_unreachable(e) is not None:
            raise
        with contextlib.suppress(Exception):
            print(f"trial {trial.number}: not closed ({type(e).__name__}: {e})"[:300], file=sys.stderr)
