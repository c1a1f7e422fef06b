"""MLflow record: stores created once, runs opened and always closed explicitly, buffered metrics.

We use ``MlflowClient`` rather than the fluent API: no active-run global state, and no atexit hook
that marks a crashed run FINISHED (README, "The MLflow record"). Each :class:`Recorder` closes its run with
FINISHED, FAILED or KILLED from the code path that ended it. Metrics are buffered and sent with
``log_batch`` (sqlite: ~5 ms per ``log_metric`` call vs ~23 ms per batch of 100) once
:data:`FLUSH_EVERY` values wait, or :data:`FLUSH_SECONDS` after the last send, and on close. Not at the
end of every ``trainer.log_every`` window: one 10-metric ``log_batch`` on sqlite measured 32 ms (2 shared
cores) against 17 ms per training step of the default config (log_every 10), i.e. +19% wall time.
Non-finite values are recorded visibly, never dropped (README, "The MLflow record"): +-inf is sent as
+-1.7976931348623157e308 (float64's largest value, what MLflow itself stores for inf), and NaN, which
breaks the run page (MLflow issue #16555), as the tag ``nonfinite.<metric> = nan`` (removed again when a
later finite value of that metric is logged), so a metric's latest value is never an earlier pass's
finite number in disguise.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.names import NONFINITE_PREFIX
from pipeline.store_checks import store_error
from pipeline.uris import resolve_uri, sqlite_file, uri_flag, with_libpq_bounds

FLUSH_EVERY = 500  # buffered metric values before a log_batch
FLUSH_SECONDS = 30.0  # ... or this long after the last send: a live run in the UI is at most this stale
MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call
MAX_TAGS = 100  # ... and on tags per call
WAL_BUSY_S = 5.0  # how long use_wal waits for a store another process holds busy


def client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    # libpq's bounds for a PostgreSQL store (pipeline.uris.with_libpq_bounds): a store whose server
    # stops answering fails in about 30 s instead of holding the run's process in a read for minutes
    return MlflowClient(tracking_uri=with_libpq_bounds(resolve_uri(uri)))


def ensure_experiment(uri: str | None, name: str, flag: str = "tracking.uri") -> str:
    """Create the store (schema) and the experiment if needed; return the experiment id. ``flag``: the
    key or option that gives ``uri``, named by a store error (as :func:`pipeline.store_checks.probe_store`).

    Call once in the parent process before any worker starts: concurrent first-time schema creation
    on a fresh sqlite/PostgreSQL store loses workers (README, "Faults and resuming").
    """
    path = sqlite_file(resolve_uri(uri))
    with _creating(path):
        return _ensure_experiment(uri, name, path, flag)


@contextlib.contextmanager
def _creating(path: Path | None) -> Iterator[None]:
    """An exclusive flock on ``<store>.create-lock`` beside a sqlite store while its schema and
    experiment may be created. Processes started together on a fresh store (two ``regress``, two
    ``train``) each ran MLflow's migrations: the losers failed, and once every one did, leaving a store
    that no later command could open (``table _alembic_tmp_latest_metrics already exists``; found by a
    review). Not the store's own file: closing any descriptor of a file drops every POSIX lock the
    process holds on it, SQLite's included, which SQLite relies on to tell whether another connection
    still reads the write-ahead log (a review of the first version; not reproduced here)."""
    if path is None:
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)  # as MLflow makes a sqlite store's folder
    with open(f"{path}.create-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ensure_experiment(uri: str | None, name: str, path: Path | None, flag: str) -> str:
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        if path is not None and (not path.is_file() or path.stat().st_size == 0):
            _create_schema(path)
        c = client(uri)
        exp = c.get_experiment_by_name(name)
    except (SQLAlchemyError, MlflowException) as e:  # what probe_store cannot see (a database server)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise store_error(
            resolve_uri(uri), f"cannot be opened ({first})", uri_flag(uri, flag), "check the server"
        ) from None
    if path is not None:
        use_wal(path)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=_beside(path, name))
    except MlflowException:  # another process created it between our get and create
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _create_schema(path: Path) -> None:
    """A new sqlite store's schema, made by MLflow in ``<store>.creating-<pid>-<hex>`` and renamed into
    place once whole (under the create lock). MLflow's migrations take seconds, and a kill -9 during them
    (a first ``make regress`` stopped) left a half-migrated ``mlflow.db`` that no later command could
    open (``table _alembic_tmp_experiments already exists``; a new-user walkthrough). A killed creator's
    file is removed by the next one. A new name each time: MLflow caches a store and its engine per URI
    for the life of the process, so a second creation at one name would reuse an engine on a renamed file."""
    import secrets

    for leftover in path.parent.glob(f"{glob.escape(path.name)}.creating-*"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    tmp = path.with_name(f"{path.name}.creating-{os.getpid()}-{secrets.token_hex(4)}")
    c = client(f"sqlite:///{tmp}")
    c.search_experiments(max_results=1)  # MLflow creates the schema and its Default experiment
    with contextlib.suppress(Exception):  # best effort: its connections are idle, the file complete
        c._tracking_client.store.engine.dispose()
    os.replace(tmp, path)


def _beside(path: Path | None, name: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: MLflow's default, ``./mlruns/<id>``
    of the working directory, where that is the store's own directory (the default store); else
    ``mlruns/<name>`` beside the store file, so that a store named by path (the DAG's under
    $AIRFLOW_HOME, a sweep's elsewhere) keeps its artifacts with it whatever directory a process runs in."""
    if path is None or path.resolve().parent == Path.cwd().resolve():
        return None
    return str(path.resolve().parent / "mlruns" / re.sub(r"[^\w.-]", "_", name))  # a path, as MLflow's own


# "0": leave a sqlite store's journal mode as it is (README, "The MLflow record")
WAL_ENV = "PIPELINE_SQLITE_WAL"


def use_wal(path: Path) -> str:
    """Put an MLflow SQLite store in write-ahead-log mode (https://www.sqlite.org/wal.html): the mode is
    kept in the file, so every later connection, MLflow's and the UI's, uses it. Returns the mode the store
    is in afterwards, or "unchanged" (``PIPELINE_SQLITE_WAL=0``, or the store busy or read-only).

    Why: MLflow opens SQLite in its default rollback-journal mode, where a reader blocks a writer and
    every commit syncs the journal and the database file; in WAL mode readers never block the one writer
    and a commit syncs the log alone. Durability is unchanged (``synchronous`` stays FULL: a commit is on
    disk when it returns). Many sweep workers write one store (README, "Batched trials", "On a GPU": the
    store's write rate under 12 writers, rollback against WAL). WAL needs every process on one host
    and a directory they can write (README, "The MLflow record": network file systems, read-only copies,
    the opt-out). A store another process holds busy for more than :data:`WAL_BUSY_S` keeps its mode
    until the next start. Not cached: one PRAGMA read (well under a millisecond) per call, and a store
    replaced at the same path is converted too."""
    import sqlite3

    if os.environ.get(WAL_ENV, "1") == "0":
        return "unchanged"
    try:
        con = sqlite3.connect(str(path), timeout=WAL_BUSY_S)
        try:
            (mode,) = con.execute("PRAGMA journal_mode").fetchone()
            if str(mode).lower() != "wal":
                (mode,) = con.execute("PRAGMA journal_mode=WAL").fetchone()
        finally:
            con.close()
    except sqlite3.Error:  # busy or read-only: MLflow works in either mode, only slower
        return "unchanged"
    return str(mode).lower()


FLOAT_MAX = sys.float_info.max  # +-inf is logged as +-FLOAT_MAX (1.7976931348623157e308)


def encode_metric(v: Any) -> float | None:
    """The value to send for a metric: finite values as they are, +-inf as +-FLOAT_MAX, None for NaN
    (recorded as a tag instead) and for anything that is not a number."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    if math.isnan(x):
        return None
    return x if math.isfinite(x) else math.copysign(FLOAT_MAX, x)


def _is_nan(v: Any) -> bool:
    try:
        return math.isnan(float(v))
    except (TypeError, ValueError):
        return False


RUN_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow's database stores keep a run name in runs.name, a VARCHAR(250) column (mlflow/store/tracking/
# dbmodels/models.py): a PostgreSQL-backed `mlflow server` refused a longer one with a traceback, where
# SQLite kept it whole. Every run this package starts has its name cut to it (README, "Configuration
# reference", tracking.run_name), so a name behaves the same on every store.
RUN_NAME_MAX = 250


def end_run(uri: str | None, run_id: str, status: str) -> None:
    """End a run that no live Recorder holds (a dead worker's trial, a suite's interrupted entries)."""
    if status not in RUN_END_STATUSES:
        raise ValueError(f"status must be one of {RUN_END_STATUSES}, got {status!r}")
    client(uri).set_terminated(run_id, status=status)


class Recorder:
    """One MLflow run: buffered metrics, params, tags, artifacts; :meth:`close` ends it explicitly."""

    def __init__(self, uri: str | None, run_id: str, experiment_id: str):
        from mlflow.entities import Metric

        self._Metric = Metric
        self.uri, self.run_id, self.experiment_id = resolve_uri(uri), run_id, experiment_id
        self.client = client(uri)
        self._buf: list[Any] = []
        self._nan_tags: set[str] = set()  # metrics whose nonfinite.<metric> tag is set
        self._last: dict[str, tuple[int, float]] = {}  # per metric, the (step, value) last buffered
        self._sent_at = time.monotonic()
        self.closed = False

    @classmethod
    def start(
        cls,
        uri: str | None,
        experiment: str,
        run_name: str,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
        experiment_id: str | None = None,
    ) -> Recorder:
        exp_id = experiment_id or ensure_experiment(uri, experiment)
        t = {k: str(v) for k, v in (tags or {}).items() if v is not None}  # server stores want strings
        if parent_run_id:
            t["mlflow.parentRunId"] = parent_run_id  # nests the run under its parent in the UI
        run = client(uri).create_run(exp_id, run_name=run_name[:RUN_NAME_MAX], tags=t)
        return cls(uri, run.info.run_id, exp_id)

    @classmethod
    def attach(cls, uri: str | None, run_id: str, reopen: bool = False) -> Recorder:
        """A Recorder for an existing run; ``reopen``: a resumed sweep or suite sets it RUNNING again."""
        c = client(uri)
        run = c.get_run(run_id)
        if reopen and run.info.status != "RUNNING":
            c.update_run(run_id, status="RUNNING")
        return cls(uri, run_id, run.info.experiment_id)

    # -- metrics / params / tags
    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Buffer finite and +-inf values (inf as +-FLOAT_MAX); a NaN sets the tag ``nonfinite.<key>=nan``
        at once, and a later finite or infinite value of that key deletes it again.

        A value equal to the one its key last logged at the same step is not sent again: a run's end
        restates its last measurements (the final validation loss, the last profile pass) at the step
        they were taken, and MLflow keeps both points unless they share a millisecond, so the history of
        one and the same run would depend on timing (README, "The MLflow record")."""
        ts = int(time.time() * 1000)
        step = int(step)
        nan_keys = [k for k, v in metrics.items() if _is_nan(v)]
        for k, v in metrics.items():
            x = encode_metric(v)
            if x is None:
                continue
            if self._last.get(k) == (step, x) and k not in self._nan_tags:
                continue
            self._last[k] = (step, x)
            self._buf.append(self._Metric(k, x, ts, step))
            if k in self._nan_tags:
                self.client.delete_tag(self.run_id, NONFINITE_PREFIX + k)
                self._nan_tags.discard(k)
        if nan_keys:
            self.set_tags({NONFINITE_PREFIX + k: "nan" for k in nan_keys})
            self._nan_tags.update(nan_keys)
        if len(self._buf) >= FLUSH_EVERY or time.monotonic() - self._sent_at >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        while self._buf:
            chunk, self._buf = self._buf[:MAX_BATCH], self._buf[MAX_BATCH:]
            self.client.log_batch(self.run_id, metrics=chunk)
        self._sent_at = time.monotonic()

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, "None" if v is None else str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), MAX_TAGS):  # MLflow: at most 100 tags and 1000 entities a call
            part = items[i : i + MAX_TAGS]
            chunk = self._buf[: MAX_BATCH - len(part)]  # buffered metrics ride along: one write, not two
            self.client.log_batch(self.run_id, metrics=chunk, tags=part)
            del self._buf[: len(chunk)]  # only once written: a failed call keeps them for close()

    # -- artifacts
    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_frame(self, df, artifact_file: str, csv: bool = False) -> None:
        """A pandas frame as a parquet artifact at ``artifact_file`` (e.g. diagnostics/x.parquet); with
        ``csv``, also as ``x.csv`` beside it, which the MLflow UI previews (it shows no parquet)."""
        folder = str(Path(artifact_file).parent) if "/" in artifact_file else None
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(artifact_file).name
            df.to_parquet(p, index=False)
            self.log_file(p, folder)
            if csv:
                c = p.with_suffix(".csv")
                df.to_csv(c, index=False, na_rep="nan")  # full precision (repr); -inf, inf, nan spelled so
                self.log_file(c, folder)

    def log_figure(self, fig, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, fig, artifact_file)

    # -- end
    def close(self, status: str = "FINISHED") -> None:
        """Flush and end the run with FINISHED, FAILED or KILLED. Idempotent."""
        if self.closed:
            return
        if status not in RUN_END_STATUSES:
            raise ValueError(f"status must be one of {RUN_END_STATUSES}, got {status!r}")
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status=status)
            self.closed = True


class NullRecorder(Recorder):
    """``tracking.enabled: false``: same interface, records nothing."""

    def __init__(self):
        self.run_id, self.experiment_id, self.closed, self.uri = None, None, False, None

    def log_metrics(self, metrics, step):
        pass

    def flush(self):
        pass

    def log_params(self, params):
        pass

    def set_tags(self, tags):
        pass

    def log_file(self, path, artifact_path=None):
        pass

    def log_text(self, text, artifact_file):
        pass

    def log_frame(self, df, artifact_file, csv=False):
        pass

    def log_figure(self, fig, artifact_file):
        pass

    def close(self, status="FINISHED"):
        self.closed = True
