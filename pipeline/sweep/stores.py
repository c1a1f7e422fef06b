"""The sweep's stores, shared by the parent and the workers: Optuna storage, budget lock, stale-trial reaper.

Embedded default: Optuna's JournalStorage on a file (``optuna/<study>.journal``). Measured on the
2-core machine (``benchmarks/sweep_bench.py``): 3-8 ms per trial operation against
17-53 ms for SQLite, and appends under a file lock instead of SQLite's single-writer ``database is
locked``. Across machines: ``postgresql://...`` (Optuna's RDBStorage, with heartbeats).

Killed workers (kill -9, OOM, a lost machine) leave trials RUNNING forever unless someone notices
(optuna's JournalStorage has no heartbeat). Two detectors, one handler:

* Every storage: each trial records its owner ``host|pid|process start time``; a RUNNING trial whose
  owner process on this host is gone is stale at once (one with no owner at all, its worker killed
  between ``ask`` and recording it, after ``ORPHAN_S``). The start time guards against PID reuse. This is
  the only detector for the journal (Optuna 5.0's JournalStorage has no heartbeat; it is a
  single-machine store, use PostgreSQL for several machines).
* RDB storages also: Optuna's heartbeat (``heartbeat_interval`` + ``grace_period``), for workers on
  other hosts; ``fail_stale_trials`` marks the trial FAIL and calls our ``heartbeat_stale_trial_callback``.

The handler (:func:`on_stale`) closes the trial's MLflow run as KILLED and enqueues one retry with the
same params (WAITING; the next ``ask`` pops it), in the format of Optuna's
``RetryHeartbeatStaleTrialCallback(max_retry=1)`` so ``retried_trial_number`` works on it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import socket
import warnings
from pathlib import Path
from typing import Any

from pipeline.names import STATUS, STUDY, TRIAL_NUMBER
from pipeline.sweep.config import HeartbeatConfig
from pipeline.uris import is_rdb, journal_file, scheme, sqlite_file

MAX_RETRY = 1
ORPHAN_S = 120.0  # a RUNNING trial with no owner attr this long after it started: its worker died in between


def open_storage(
    url: str,
    *,
    heartbeat_interval: int = HeartbeatConfig.interval,
    grace: int = HeartbeatConfig.grace,
    mlflow_uri: str | None = None,
):
    """An Optuna storage for ``url``: RDB (with heartbeat and our stale handler) or a journal file."""
    import optuna

    if is_rdb(url):
        kwargs: dict[str, Any] = {}
        if scheme(url) == "sqlite":
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace,
            heartbeat_stale_trial_callback=StaleHandler(mlflow_uri),
            **kwargs,
        )
    from optuna.storages.journal import JournalFileBackend

    path = journal_file(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _journal_error(path: Path, problem: str):
    from pipeline.schema import StoreError

    return StoreError(
        f"optuna journal {path}",
        problem,
        "restore it from a backup, or move it aside to start the study afresh",
    )


def _bad_record(line: bytes) -> str | None:
    """Why a journal line is not a record Optuna can replay (None if it is one)."""
    import json

    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return "not JSON"
    if not isinstance(rec, dict) or "op_code" not in rec:
        return "not a journal record"
    return None


def repair_journal(path: Path, warn=None) -> int:
    """Replayable journal or one-line error; a last record cut off by a crash is removed (returns its bytes).

    Optuna 5's ``JournalFileBackend.read_logs`` skips an incomplete last line, but the next append lands
    right after it, so the torn record and the new one become one undecodable line in the middle and every
    later open fails with a JSONDecodeError. Appends are whole lines written under the journal's lock, so
    under that lock an incomplete or undecodable LAST line is a write a crash interrupted: nothing after it
    depends on it, and removing it loses only that one operation (a trial left RUNNING by it is reaped and
    retried like any killed trial). Its bytes are kept in ``<journal>.torn``. A bad record with records
    after it cannot be dropped safely (later operations refer to what it did): :class:`StoreError`.
    """
    import sys

    from optuna.storages.journal import JournalFileSymlinkLock

    if not path.is_file() or path.stat().st_size == 0:
        return 0
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        data = path.read_bytes()
        lines = data.split(b"\n")  # the piece after the last newline is b"" for a whole journal
        complete, tail = lines[:-1], lines[-1]
        offset = 0
        for i, line in enumerate(complete):
            why = _bad_record(line) if line.strip() else "an empty line"
            if why is not None and (i < len(complete) - 1 or tail):
                raise _journal_error(
                    path,
                    f"record {i + 1} of {len(complete) + bool(tail)} (byte {offset}) is "
                    f"corrupt ({why}) and records follow it, so it cannot be replayed",
                )
            if why is not None:  # the last line, whole but unreadable: a torn write
                tail = line + b"\n"
                break
            offset += len(line) + 1
        if not tail:
            return 0
        keep = offset
        with open(f"{path}.torn", "ab") as f:
            f.write(data[keep:])
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    finally:
        lock.release()
    removed = len(data) - keep
    print(
        f"warning: optuna journal {path}: its last record was cut off ({removed} bytes, as by a crash "
        f"mid-write); removed it (kept in {path}.torn) and resuming",
        file=warn or sys.stderr,
        flush=True,
    )
    return removed


def check_storage(url: str) -> None:
    """Before the sweep opens its Optuna store: a journal must replay (see :func:`repair_journal`); an
    existing SQLite file must be a readable database. Raises StoreError (one line, exit 2)."""
    if not is_rdb(url):
        repair_journal(journal_file(url))
        return
    if sqlite_file(url) is not None:
        from pipeline.store_checks import sqlite_problem

        path = sqlite_file(url)
        problem = sqlite_problem(path) if path is not None and path.is_file() else None
        if problem:
            from pipeline.schema import StoreError

            raise StoreError(f"optuna storage {url}", problem, "move it aside or pass another --storage")


@contextlib.contextmanager
def budget_lock(url: str, storage, study_name: str):
    """Serialize "count the trials, then ask for one" across workers, so the study stops at n_trials.

    Journal / SQLite: an flock on a file beside the store. PostgreSQL: an advisory lock keyed by the
    study name (held on its own connection). Other RDBs: no lock (a few extra trials are possible).
    """
    path = journal_file(url) if not is_rdb(url) else sqlite_file(url)
    if path is not None:
        import fcntl

        lock = Path(f"{path}.{study_name}.sweeplock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    if scheme(url) in ("postgresql", "postgres"):
        from sqlalchemy import text

        key = int.from_bytes(hashlib.sha1(study_name.encode()).digest()[:8], "big", signed=True)
        with storage.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        return
    yield


# ------------------------------------------------------------------------------------ ownership


def _start_time(pid: int) -> str:
    """Process start time in clock ticks since boot (Linux /proc); '' where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner_tag(pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{socket.gethostname()}|{pid}|{_start_time(pid)}"


def owner_alive(tag: str) -> bool | None:
    """True/False for an owner on this host; None when it runs on another host (cannot tell)."""
    try:
        host, pid_s, start = tag.split("|")
        pid = int(pid_s)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start and _start_time(pid) not in ("", start):
        return False  # the PID was reused by another process
    st = Path(f"/proc/{pid}/stat")
    return not (st.exists() and ") Z" in st.read_text())  # a zombie (killed, not yet reaped by its parent)


# ------------------------------------------------------------------------------- stale trials


def close_trial_runs(mlflow_uri: str | None, study, trial, status: str = "KILLED") -> list[str]:
    """End the MLflow run(s) of ``trial`` that are still RUNNING; returns their ids.

    The trial's ``mlflow_run_id`` attr is set as soon as the run exists; a search by tags catches a run
    created just before a kill, before the attr was written.
    """
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import client, end_run

    c = client(mlflow_uri)
    ids = {trial.user_attrs.get("mlflow_run_id")} - {None}
    exp_id = study.user_attrs.get("mlflow_experiment_id")
    if exp_id is not None:
        filt = (
            f"tags.{STUDY} = '{study.study_name}' and tags.{TRIAL_NUMBER} = '{trial.number}'"
            " and attributes.status = 'RUNNING'"
        )
        with contextlib.suppress(MlflowException):
            ids |= {r.info.run_id for r in c.search_runs([exp_id], filt, max_results=50)}
    closed = []
    for rid in ids:
        try:
            run = c.get_run(rid)
            if run.info.status == "RUNNING":
                c.set_tag(rid, STATUS, "killed")
                end_run(mlflow_uri, rid, status)
                closed.append(rid)
        except MlflowException:
            continue
    return closed


def enqueue_retry(study, trial) -> bool:
    """Re-enqueue ``trial``'s params once (WAITING). Same system attrs as Optuna's retry callback."""
    import optuna

    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    if len(history) > MAX_RETRY:
        return False
    system = {k: v for k, v in trial.system_attrs.items() if k not in ("retry_history", "failed_trial")}
    system.update(
        {"failed_trial": trial.system_attrs.get("failed_trial", trial.number), "retry_history": history}
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
        close_trial_runs(mlflow_uri, study, trial, "KILLED")
    retried = enqueue_retry(study, trial)
    logging.getLogger("pipeline.sweep").warning(
        "trial %d: its worker is gone; MLflow run closed as KILLED%s",
        trial.number,
        ", params re-enqueued once" if retried else " (already retried once: not re-enqueued)",
    )


def release_own(study, mlflow_uri: str | None) -> list[int]:
    """A worker stopped by SIGTERM or Ctrl-C: each trial it still owns (RUNNING, ``worker`` attr this
    process) is closed as an interrupted trial is (README, "Faults and resuming"): its MLflow run(s)
    KILLED, FAIL with attr ``interrupted``, its params re-enqueued once. Returns their numbers.

    The worker's training paths close the trials they hold themselves; this finds the ones a signal met
    between two steps (asked, not yet held; a run closed FINISHED, its trial not yet told), which would
    otherwise stay RUNNING until a reaper took them for a dead worker's."""
    from optuna.trial import TrialState

    storage, me = study._storage, owner_tag()
    released = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("worker") != me:
            continue
        with contextlib.suppress(Exception):
            close_trial_runs(mlflow_uri, study, t, "KILLED")
        try:  # each alone: one a heartbeat reaper failed meanwhile (RDB storages) must not stop the rest
            storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            study.tell(t.number, state=TrialState.FAIL)
        except Exception:  # told by another process already (it re-enqueued it, if it was a reaper)
            continue
        enqueue_retry(study, storage.get_trial(t._trial_id))
        released.append(t.number)
    return released


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
        if owner and owner_alive(owner) is not False:
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
