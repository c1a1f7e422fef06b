"""The sweep's stores, shared by the parent and the workers: the Optuna storage, journal repair, budget lock.

Embedded default: Optuna's JournalStorage on a file (``optuna/<study>.journal``). Measured on the
2-core machine (``benchmarks/sweep_bench.py``): 3-8 ms per trial operation against
17-53 ms for SQLite, and appends under a file lock instead of SQLite's single-writer ``database is
locked``. Across machines: ``postgresql://...`` (Optuna's RDBStorage, with heartbeats).

Who holds a trial, and what becomes of trials whose worker is gone or stopped: :mod:`pipeline.sweep.owners`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import warnings
from pathlib import Path
from typing import Any

from pipeline.sweep.config import HeartbeatConfig
from pipeline.sweep.owners import StaleHandler
from pipeline.uris import (  # noqa: F401  (PG_CONNECT_TIMEOUT_S: the sweep parent sets it for libpq)
    PG_CONNECT_TIMEOUT_S,
    display_url,
    is_rdb,
    journal_file,
    libpq_args,
    scheme,
    sqlite_file,
)


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
        elif libpq_args(url):
            kwargs["engine_kwargs"] = {"connect_args": libpq_args(url)}
        for attempt in range(SCHEMA_RACE_TRIES):
            try:
                with warnings.catch_warnings():  # labelled experimental (Optuna docs, RDBStorage): two lines
                    warnings.filterwarnings(  # in every PostgreSQL sweep's output and worker log
                        "ignore",
                        r"Argument ``(heartbeat_interval|grace_period)``",
                        optuna.exceptions.ExperimentalWarning,
                    )
                    return optuna.storages.RDBStorage(
                        url,
                        heartbeat_interval=heartbeat_interval,
                        grace_period=grace,
                        heartbeat_stale_trial_callback=StaleHandler(mlflow_uri),
                        **kwargs,
                    )
            except Exception as e:
                if attempt == SCHEMA_RACE_TRIES - 1 or not _lost_schema_race(e):
                    raise
                time.sleep(0.5 * (attempt + 1))
    from optuna.storages.journal import JournalFileBackend

    path = journal_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


# Machines started together on a fresh database each create Optuna's schema; PostgreSQL lets one win and
# tells the others "duplicate key value violates unique constraint pg_type_typname_nsp_index" (CREATE
# TYPE) or "relation ... already exists": found by a walkthrough starting the README's "same command" on
# two machines at once. The loser opens the schema the winner made.
SCHEMA_RACE_TRIES = 4


def _lost_schema_race(e: Exception) -> bool:
    import sqlalchemy

    if not isinstance(e, sqlalchemy.exc.IntegrityError | sqlalchemy.exc.ProgrammingError):
        return False
    text = str(e).lower()
    return "already exists" in text or "duplicate key value" in text


def journal_path(url: str) -> Path:
    """The journal's absolute path. Optuna's journal lock is a symlink ``<journal>.lock`` whose target is
    the path it was given, and it breaks a lock held longer than its grace period (30 s) only when it can
    stat that target. A relative target (``optuna/t.journal``) resolves beside the link, to
    ``optuna/optuna/t.journal``, which does not exist: the lock of a process killed while holding it was
    then never broken, and a resume waited forever (measured: still waiting after 300 s)."""
    return Path(os.path.abspath(journal_file(url)))


def _drop_dangling_lock(path: Path, warn: Any) -> None:
    """A ``<journal>.lock`` symlink whose target does not exist is no live lock: this version's locks
    point at the journal itself. It is one an earlier version left when its process was killed while
    holding it (a relative target, see :func:`journal_path`), which Optuna would wait on forever."""
    lock = Path(f"{path}.lock")
    if lock.is_symlink() and not lock.exists():
        lock.unlink(missing_ok=True)
        print(
            f"warning: removed the stale lock {lock} of the optuna journal (its holder was killed)", file=warn
        )


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
    target = os.path.abspath(path)  # the lock's target (journal_path); messages name the path as given
    _drop_dangling_lock(Path(target), warn or sys.stderr)
    lock = JournalFileSymlinkLock(target)
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


def _journal_unwritable(path: Path) -> str | None:
    """Why the journal file ``path`` (existing or new; its directories are created) cannot be written."""
    from pipeline.store_checks import creation_problem

    if os.path.isdir(path):  # os.path: Path.exists raises on a name over the file system's limit
        return f"{path} is a directory, not a journal file"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    return creation_problem(path)


# Optuna's RDB schema: a table ``studies`` without these columns is another program's (a 92-line
# UndefinedColumn traceback from open_storage, after the MLflow store was created)
OPTUNA_STUDY_COLUMNS = frozenset({"study_id", "study_name"})
# MLflow's tracking store: both it and Optuna keep their schema's revision in ``alembic_version``, so
# Optuna read MLflow's revision as its own, created its tables beside MLflow's and then failed with a
# traceback telling to upgrade Optuna (a new-user walkthrough: ``--storage sqlite:///mlflow.db``). Two
# of its tables mark it (pipeline.store_checks.MLFLOW_TABLES, all of them, is what an MLflow store must hold).
MLFLOW_MARKS = ("experiments", "runs")


def _foreign_schema(url: str, server: bool = False) -> tuple[str, str] | None:
    """(problem, remedy) of a database at ``url`` whose schema Optuna cannot open (read-only:
    SQLAlchemy's inspector), or None (Optuna's own tables, or none yet). The remedy has ``{flag}``; a
    ``server``'s database is pointed away from, not moved aside as a file is."""
    import sqlalchemy

    from pipeline.uris import with_pg_driver

    elsewhere = "point {flag} at another database" if server else "move it aside or pass another {flag}"
    engine = sqlalchemy.create_engine(with_pg_driver(url))
    try:
        inspector = sqlalchemy.inspect(engine)
        tables = set(inspector.get_table_names())
        columns = {c["name"] for c in inspector.get_columns("studies")} if "studies" in tables else None
    except sqlalchemy.exc.SQLAlchemyError as e:
        why = f"its schema cannot be read ({str(getattr(e, 'orig', None) or e).strip().splitlines()[0]})"
        return why, elsewhere
    finally:
        engine.dispose()
    if columns is None:
        if set(MLFLOW_MARKS) <= tables:
            return (
                f"it is an MLflow tracking store (tables {', '.join(MLFLOW_MARKS)})",
                "pass another {flag}: the Optuna study needs a database of its own",
            )
        if "alembic_version" in tables and "version_info" not in tables:
            return (
                "its table alembic_version is another program's (no Optuna table version_info)",
                "pass another {flag}: the Optuna study needs a database of its own",
            )
        return None
    missing = sorted(OPTUNA_STUDY_COLUMNS - columns)
    if missing:
        return f"its table studies is not Optuna's (no column {', '.join(missing)})", elsewhere
    return None


def _sqlite_storage_problem(url: str, path: Path) -> tuple[str, str] | None:
    """(problem, remedy) of an Optuna SQLite storage file that cannot be used, or None."""
    from pipeline.store_checks import long_name, sqlite_problem, unwritable

    long = long_name(path)
    if long:
        return long, "pass a shorter {flag}"
    if path.is_file():
        problem = sqlite_problem(path)
        if problem:
            return problem, "move it aside or pass another {flag}"
    elif not path.parent.is_dir():
        return f"its directory {path.parent} does not exist", "create it or pass another {flag}"
    why = unwritable(path)
    if why:
        return why, "make it writable or pass another {flag}"
    return _foreign_schema(url) if path.is_file() and path.stat().st_size else None


def _database_of(url: str, journal: bool) -> tuple | None:
    """The file or server database a store URL names, comparable across the two stores: ``("file",
    real path)`` (a SQLite file; with ``journal``, a path is the Optuna journal file) or ``(backend,
    host, port, database)``; None for a tracking server or an in-memory database."""
    kind = scheme(url)
    if kind == "sqlite" or (journal and not is_rdb(url)):
        path = sqlite_file(url) if kind == "sqlite" else journal_path(url)
        return None if path is None else ("file", os.path.realpath(path))
    if kind not in ("postgresql", "postgres", "mysql"):
        return None
    from sqlalchemy.engine import make_url

    u = make_url(url)
    backend = "mysql" if kind == "mysql" else "postgresql"
    return backend, u.host or "", u.port or {"mysql": 3306, "postgresql": 5432}[backend], u.database


def check_storage(
    url: str,
    flag: str = "storage",
    mlflow_uri: str | None = None,
    mlflow_flag: str = "base.tracking.uri",
    default: bool = False,
) -> None:
    """Before the sweep writes anything: a journal must replay (see :func:`repair_journal`) and be a file
    this process can write; an existing SQLite file must be a readable database, a new one's directory
    must exist; either must be writable; a PostgreSQL or MySQL database must accept a connection within
    seconds; a database whose ``studies`` table is not Optuna's, or MLflow's (``mlflow_uri``'s file or
    database, or one holding its tables), is refused. Raises StoreError (one line,
    exit 2). Without these an unreachable server, a mistyped database name, a missing or read-only
    directory, a directory given as the journal or another program's schema came as a traceback after
    the MLflow store was created (found by a walkthrough and a fuzzing review). A journal named by
    ``flag`` in a directory that does not exist is refused as a SQLite file's is (a mistyped path started a
    new study elsewhere: a walkthrough); the ``default`` one, ``optuna/<study>.journal``, gets its folder."""
    from pipeline.schema import StoreError

    def refuse(problem: str, remedy: str = "move it aside or pass another {flag}"):
        return StoreError(f"optuna storage {display_url(url)}", problem, remedy.format(flag=flag))

    if mlflow_uri is not None:
        named = _database_of(url, journal=True)
        if named is not None and named == _database_of(mlflow_uri, journal=False):
            # Both programs keep their schema's revision in alembic_version: the second to open it failed
            # with a traceback (a new-user walkthrough: --storage sqlite:///mlflow.db in a new folder).
            raise refuse(
                f"it is the MLflow store's {'file' if named[0] == 'file' else 'database'} ({mlflow_flag})",
                "pass another {flag}: the Optuna study needs a database of its own",
            )

    if not is_rdb(url):
        from pipeline.store_checks import long_name

        long = long_name(journal_path(url))
        if long:
            raise refuse(long, "pass a shorter {flag}")
        folder = journal_path(url).parent
        if not default and not os.path.isdir(folder) and not os.path.exists(folder):
            raise refuse(f"its directory {folder} does not exist", "create it or pass another {flag}")
        why = _journal_unwritable(journal_path(url))
        if why:
            remedy = "make it writable or pass another {flag}"
            raise refuse(why, "pass a journal file path as {flag}" if "directory," in why else remedy)
        repair_journal(journal_file(url))
        return
    path = sqlite_file(url)
    if path is not None:
        bad = _sqlite_storage_problem(url, path)
        if bad:
            raise refuse(*bad)
        return
    if scheme(url) != "sqlite":
        from pipeline.store_checks import check_database_store

        check_database_store(url, flag, "optuna storage")
        foreign = _foreign_schema(url, server=True)
        if foreign:
            raise refuse(*foreign)


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
