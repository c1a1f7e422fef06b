"""Who holds a sweep's trials, and what becomes of a trial whose worker is gone or stopped.

Killed workers (kill -9, OOM, a lost machine) leave trials RUNNING forever unless someone notices
(optuna's JournalStorage has no heartbeat). Two detectors, one handler:

* Every storage: each trial records its owner ``host|pid|process start time|process space``; a RUNNING
  trial whose owner process in this PID space is gone is stale at once (one with no owner at all, its worker killed
  between ``ask`` and recording it, after ``ORPHAN_S``). The start time guards against PID reuse. This is
  the only detector for the journal (Optuna 5.0's JournalStorage has no heartbeat; it is a
  single-machine store, use PostgreSQL for several machines).
* RDB storages also: Optuna's heartbeat (``heartbeat_interval`` + ``grace_period``), for workers on
  other hosts; ``fail_stale_trials`` marks the trial FAIL and calls our ``heartbeat_stale_trial_callback``.

The handler (:func:`on_stale`) closes the trial's MLflow run as KILLED and enqueues one retry with the
same params (WAITING; the next ``ask`` pops it), in the format of Optuna's
``RetryHeartbeatStaleTrialCallback(max_retry=1)`` so ``retried_trial_number`` works on it.

A worker stopped by SIGTERM closes its own trials instead (:func:`release_own`, :func:`close_interrupted`);
:func:`ask_owned` asks a trial and records its owner as one step, :func:`heartbeat` beats for it (RDB).
"""

from __future__ import annotations

import contextlib
import datetime
import threading
import warnings

from pipeline.names import STATUS, STUDY, TRIAL_NUMBER, quoted
from pipeline.provenance import owner_alive, owner_tag
from pipeline.signals import deferred
from pipeline.uris import is_rdb

MAX_RETRY = 1  # retries of a point after failures of its own (interrupts are free: enqueue_retry)
FAILURES = "pipeline_failures"  # system attr: such failures in a retried point's chain so far
SEARCH_PAGE = 1000  # runs per MLflow search page at the end of a sweep
ORPHAN_S = 120.0  # a RUNNING trial with no owner attr this long after it started: its worker died in between


# ------------------------------------------------------------------------------------ ownership


# ------------------------------------------------------------------------------- stale trials


def close_trial_runs(
    mlflow_uri: str | None, study, trial, status: str = "KILLED", untold: bool = False
) -> list[str]:
    """End the MLflow run(s) of ``trial`` that are still RUNNING; returns their ids.

    The trial's ``mlflow_run_id`` attr is set as soon as the run exists; a search by tags catches a run
    created just before a kill, before the attr was written. ``untold`` (a trial being failed and retried
    because its worker is gone or was stopped): also a run its worker closed FINISHED but whose trial it
    never told (no ``optuna_state`` tag, written after the tell), so that a kill between the two leaves no
    FINISHED run beside the retry's (a chaos walkthrough counted 13 FINISHED trial runs for 12 trials).
    """
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import client, end_run

    c = client(mlflow_uri)
    ids = {trial.user_attrs.get("mlflow_run_id")} - {None}
    exp_id = study.user_attrs.get("mlflow_experiment_id")
    if exp_id is not None:
        filt = _runs_of(study, trial.number)
        if not untold:  # untold: RUNNING or FINISHED, told apart below (MLflow's filter has no IN on status)
            filt += " and attributes.status = 'RUNNING'"
        with contextlib.suppress(MlflowException):
            ids |= {r.info.run_id for r in c.search_runs([exp_id], filt, max_results=50)}
    closed = []
    for rid in ids:
        try:
            run = c.get_run(rid)
            never_told = untold and run.info.status == "FINISHED" and "optuna_state" not in run.data.tags
            if run.info.status == "RUNNING" or never_told:
                c.set_tag(rid, STATUS, "killed")
                end_run(mlflow_uri, rid, status)
                closed.append(rid)
        except MlflowException:
            continue
    return closed


def _runs_of(study, number: int) -> str:
    """The MLflow filter of a trial's runs: tags ``study`` and ``trial_number``."""
    return f"tags.{STUDY} = {quoted(study.study_name)} and tags.{TRIAL_NUMBER} = '{number}'"


def close_finished_trials_runs(mlflow_uri: str | None, study, status: str = "KILLED") -> list[str]:
    """The end of a sweep: close every child run of ``study`` still RUNNING whose trial is finished (a
    worker that died between the two, a store that failed the close); returns their ids. One paged search
    for the study's RUNNING runs: a close per finished trial, each with its own search and read, took
    138 s at the end of a 5,000-trial study with no word (27 ms a trial; README, "Faults and resuming")."""
    from pipeline.tracking import client, end_run

    exp_id = study.user_attrs.get("mlflow_experiment_id")
    if exp_id is None:
        return []
    finished = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    c = client(mlflow_uri)
    filt = f"tags.{STUDY} = {quoted(study.study_name)} and attributes.status = 'RUNNING'"
    running, token = [], None
    while True:  # every page first: a run closed while paging shifts the pages after it (one was skipped)
        page = c.search_runs([exp_id], filt, max_results=SEARCH_PAGE, page_token=token)
        running += list(page)
        token = page.token
        if not token:
            break
    closed = []
    for run in running:
        number = run.data.tags.get(TRIAL_NUMBER)
        if number is not None and number.isdigit() and int(number) in finished:
            try:  # each alone: one run's error (deleted meanwhile) must not keep the rest RUNNING
                c.set_tag(run.info.run_id, STATUS, "killed")
                end_run(mlflow_uri, run.info.run_id, status)
            except Exception:
                continue
            closed.append(run.info.run_id)
    return closed


def enqueue_retry(study, trial, interrupted: bool = False) -> bool:
    """Re-enqueue ``trial``'s params (WAITING), with Optuna's retry callback's system attrs; whether it
    did. A point is retried once (:data:`MAX_RETRY`) after a failure of its own (its worker killed, a
    store outage cut it); a stop the user asked for (SIGTERM, Ctrl-C: ``interrupted``) uses up none, so a
    resume reruns every interrupted trial however often the sweep was stopped. Counting those too, a
    second Ctrl-C dropped the points the first had re-enqueued, the start-up design's among them, and the
    resume drew new ones in their place (a walkthrough)."""
    import optuna

    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    # a study written before FAILURES was recorded: every retry in its chain counts, as it did then
    failures = int(trial.system_attrs.get(FAILURES, len(history) - 1)) + (0 if interrupted else 1)
    if failures > MAX_RETRY:
        return False
    system = {k: v for k, v in trial.system_attrs.items() if k not in ("retry_history", "failed_trial")}
    system.update(
        {
            "failed_trial": trial.system_attrs.get("failed_trial", trial.number),
            "retry_history": history,
            FAILURES: failures,
        }
    )
    study.add_trial(
        optuna.create_trial(
            state=optuna.trial.TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs={"retry_of": trial.number},
            system_attrs=system,
        )
    )
    return True


class StaleHandler:
    """Optuna's ``heartbeat_stale_trial_callback``: close the MLflow run KILLED, retry once."""

    def __init__(self, mlflow_uri: str | None):
        self.mlflow_uri = mlflow_uri

    def __call__(self, study, trial) -> None:
        on_stale(study, trial, self.mlflow_uri)


def on_stale(study, trial, mlflow_uri: str | None) -> None:
    import logging

    with contextlib.suppress(Exception):
        close_trial_runs(mlflow_uri, study, trial, "KILLED", untold=True)
    retried = enqueue_retry(study, trial)
    logging.getLogger("pipeline.sweep").warning(
        "trial %d: its worker is gone; MLflow run closed as KILLED%s",
        trial.number,
        ", params re-enqueued once" if retried else " (already retried once: not re-enqueued)",
    )


@contextlib.contextmanager
def heartbeat(storage, trial_id: int, interval: int):
    """RDB storages: record the trial's heartbeat every ``interval`` s (Optuna's own thread does the
    same inside ``study.optimize``, which we do not use: we need our own loop for the budget lock)."""
    from optuna.storages import RDBStorage

    if not isinstance(storage, RDBStorage):
        yield
        return
    stop = threading.Event()

    def beat():
        while True:
            with contextlib.suppress(Exception):
                storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    th = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join(timeout=5)


def ask_owned(study):
    """``study.ask()`` and the trial's owner (``worker`` attr: this process) as one step for SIGTERM
    (:func:`~pipeline.signals.deferred`): a trial asked but not yet owned is one no handler of this worker
    can find (:func:`release_own`), left RUNNING until a reaper takes it as a dead worker's."""
    with deferred(), warnings.catch_warnings():
        # Optuna warns at every ask on a storage with a heartbeat that the heartbeat is Study.optimize's;
        # the sweep beats for its trials itself (heartbeat above): two lines a trial in every worker's log
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask()
        try:
            trial.set_user_attr("worker", owner_tag())
            first_beat(study._storage, trial._trial_id)
        except Exception as e:  # a store that stopped answering: the worker closes it (sweep.outages)
            e.asked_trial = trial  # type: ignore[attr-defined]
            raise
    return trial


def first_beat(storage, trial_id: int) -> None:
    """RDB storages: a trial's first heartbeat, as it is asked. Optuna judges stale only a trial with a
    heartbeat on record (``_get_stale_trial_ids`` skips one with none), and a worker's beating thread
    starts later (:func:`heartbeat`, after the trial's MLflow run is made): a machine lost in between
    left a trial that no reaper would ever take, and a machine waiting for it waited forever (found by
    a review)."""
    # a study's storage is Optuna's cache in front of the RDBStorage; both record heartbeats (a journal
    # has none of these methods)
    interval = getattr(storage, "get_heartbeat_interval", None)
    if interval is not None and interval():
        storage.record_heartbeat(trial_id)


def asked_stop(e: BaseException, since: int) -> bool:
    """Whether ``e``, ending a trial, is a stop the user asked for: a Ctrl-C, a SIGTERM, or any exit after
    a SIGTERM arrived (``since``: :func:`pipeline.signals.received_count` at the worker's start). A
    ``SystemExit`` of the trial's own code is not: free, it re-enqueued its point after every failure, for
    ever (a review)."""
    from pipeline.signals import received

    return not isinstance(e, SystemExit) or received(since)


def close_interrupted(study, trial_id: int, mlflow_uri: str | None, asked: bool = True) -> None:
    """A trial stopped by SIGTERM or Ctrl-C (its run already closed KILLED): FAIL with attr
    ``interrupted``, its params re-enqueued, so a resume reruns them (every time: a stop the user
    ``asked`` for uses up no retry, :func:`enqueue_retry`, :func:`asked_stop`). Raises when the trial is
    told already (by another process)."""
    from optuna.trial import TrialState

    storage = study._storage
    with contextlib.suppress(Exception):
        note_run(study, trial_id, mlflow_uri)
    storage.set_trial_user_attr(trial_id, "interrupted", True)
    study.tell(storage.get_trial(trial_id).number, state=TrialState.FAIL)
    enqueue_retry(study, storage.get_trial(trial_id), interrupted=asked)


def note_run(study, trial_id: int, mlflow_uri: str | None) -> None:
    """Set the trial's ``mlflow_run_id`` attr (README, "What is recorded": set when the run opens) from
    its run's tags (``study`` + ``trial_number``) where a signal came between the run's start and the
    attr: batched trials stopped as a refill started them had a KILLED run and no attr (a walkthrough).
    Nothing when it is set, or when no run was made."""
    from pipeline.tracking import client

    if "mlflow_run_id" in study._storage.get_trial(trial_id).user_attrs:
        return
    exp_id, parent = (
        study.user_attrs.get("mlflow_experiment_id"),
        study.user_attrs.get("mlflow_parent_run_id"),
    )
    if exp_id is None or parent is None:
        return
    number = study._storage.get_trial(trial_id).number
    # under this study's parent run: a study of the same name recorded earlier in the experiment (its
    # journal deleted, or another --storage) has runs with the same tags (a review)
    filt = f"{_runs_of(study, number)} and tags.`mlflow.parentRunId` = {quoted(parent)}"
    runs = client(mlflow_uri).search_runs(
        [exp_id], filt, max_results=1, order_by=["attributes.start_time DESC"]
    )
    if runs:
        study._storage.set_trial_user_attr(trial_id, "mlflow_run_id", runs[0].info.run_id)


def release_own(study, mlflow_uri: str | None) -> list[int]:
    """A worker stopped by SIGTERM or Ctrl-C: each trial it still owns (RUNNING, ``worker`` attr this
    process) is closed as an interrupted trial is (README, "Faults and resuming"): its MLflow run(s)
    KILLED, FAIL with attr ``interrupted``, its params re-enqueued. Returns their numbers.

    The worker's training paths close the trials they hold themselves; this finds the ones a signal met
    between two steps (asked, not yet held; a run closed FINISHED, its trial not yet told), which would
    otherwise stay RUNNING until a reaper took them for a dead worker's."""
    from optuna.trial import TrialState

    me = owner_tag()
    released = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("worker") != me:
            continue
        try:  # each alone: one a heartbeat reaper failed meanwhile (RDB storages) must not stop the rest
            release_trial(study, mlflow_uri, t)
        except Exception:  # told by another process already (it re-enqueued it, if it was a reaper)
            continue
        released.append(t.number)
    return released


def release_trial(study, mlflow_uri: str | None, trial) -> None:
    """``trial`` closed as an interrupted trial is: its MLflow run(s) still RUNNING (or FINISHED, untold)
    KILLED, as far as the store takes the write, then FAIL, attr ``interrupted``, params re-enqueued
    once (:func:`close_interrupted`, which raises when the trial is told already)."""
    with contextlib.suppress(Exception):
        close_trial_runs(mlflow_uri, study, trial, "KILLED", untold=True)
    close_interrupted(study, trial._trial_id, mlflow_uri)


def reap_stale(study, url: str, mlflow_uri: str | None) -> list[int]:
    """Fail RUNNING trials whose worker is gone and hand each to :func:`on_stale`; returns their numbers.

    Every storage: a trial whose owner process on this host is gone is stale at once (a sweep parent
    notices its own worker's kill -9 without waiting). RDB storages also: Optuna's heartbeat, which
    covers workers on other machines after ``heartbeat.grace`` seconds.
    """
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    reaped = []
    now = datetime.datetime.now()  # Optuna stamps datetime_start with naive local time
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("worker")
        if owner and owner_alive(owner, one_machine=not is_rdb(url)) is not False:
            continue
        if not owner and not (t.datetime_start and (now - t.datetime_start).total_seconds() > ORPHAN_S):
            continue  # a worker sets the attr right after ask(); only a kill in between leaves none
        try:
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another reaper got there first
        on_stale(study, storage.get_trial(t._trial_id), mlflow_uri)
        reaped.append(t.number)
    if is_rdb(url):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        with warnings.catch_warnings():
            # Labelled experimental since Optuna 2.9 (Optuna docs, "optuna.storages.fail_stale_trials").
            warnings.filterwarnings(
                "ignore", r".*fail_stale_trials is experimental", optuna.exceptions.ExperimentalWarning
            )
            optuna.storages.fail_stale_trials(study)  # calls StaleHandler for each
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        reaped += before - after
    return sorted(reaped)
