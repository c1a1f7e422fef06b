"""The sqlite MLflow store in write-ahead-log mode (README, "The MLflow record"): the pipeline puts the
store in WAL mode when it first opens it, a reader no longer blocks a writer, a busy store is left as it
is (and converted on a later open), and the broken-store check reads a store whose log holds pages the
file does not have yet.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.store_checks import sqlite_problem
from pipeline.uris import sqlite_file


def _mode(path: Path) -> str:
    con = sqlite3.connect(str(path))
    try:
        return con.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        con.close()


def test_the_store_a_run_opens_is_in_wal_mode_and_a_reader_does_not_block_a_run(store, monkeypatch):
    path = sqlite_file(store)
    MlflowClient(store).create_experiment("t")  # made by MLflow alone: its default rollback journal
    assert _mode(path) == "delete"
    rec = tracking.Recorder.start(store, "t", "r")
    assert _mode(path) == "wal"
    # A reader in the middle of a read transaction (the UI, a report, the sweep's parent) while the run
    # writes: with the rollback journal the commit would wait for it (MLflow's busy_timeout, 20 s) and
    # then fail "database is locked"; in WAL mode it goes through at once.
    reader = sqlite3.connect(str(path), check_same_thread=False)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
    t = time.monotonic()
    rec.log_metrics({"m": 1.0}, step=0)
    rec.set_tags({"k": "v"})
    rec.close("FINISHED")
    assert time.monotonic() - t < 10
    reader.execute("COMMIT")
    reader.close()
    run = MlflowClient(store).get_run(rec.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["m"] == 1.0 and run.data.tags["k"] == "v"


def test_a_busy_store_keeps_its_mode_and_is_converted_on_a_later_open(tmp_path, monkeypatch):
    path = tmp_path / "mlflow.db"
    holder = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a write
    monkeypatch.setattr(tracking, "WAL_BUSY_S", 0.2)
    assert tracking.use_wal(path) == "unchanged"
    holder.execute("COMMIT")
    assert _mode(path) == "delete"
    assert tracking.use_wal(path) == "wal"  # the failed attempt was not cached
    assert _mode(path) == "wal"
    holder.close()


def test_a_store_whose_log_holds_pages_is_not_called_truncated(tmp_path):
    """A checkpoint copies pages from the log back into the file; killed half-way, the file can be shorter
    than its header says while the log, which SQLite replays on the next open, still holds them. A file
    beside it that is not such a log (no WAL magic, or no whole frame) excuses nothing."""
    live = tmp_path / "live.db"
    con = sqlite3.connect(str(live), isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA wal_autocheckpoint=0")  # every page stays in the log while this connection lives
    con.execute("CREATE TABLE t (x)")
    con.executemany("INSERT INTO t VALUES (?)", [("x" * 1000,)] * 200)
    path, wal = tmp_path / "mlflow.db", tmp_path / "mlflow.db-wal"
    wal.write_bytes((tmp_path / "live.db-wal").read_bytes())
    con.close()
    data = live.read_bytes()  # closed: checkpointed, the whole database in the file
    path.write_bytes(data[: len(data) // 2])
    log = wal.read_bytes()
    assert sqlite_problem(path) is None  # a real log with frames
    wal.write_bytes(b"\0" * 32 + log[32:])  # no WAL magic
    assert "truncated" in (sqlite_problem(path) or "")
    wal.write_bytes(log[:40])  # the header and part of a frame
    assert "truncated" in (sqlite_problem(path) or "")
    wal.unlink()
    assert "truncated" in (sqlite_problem(path) or "")


def test_the_opt_out_leaves_the_mode_alone(tmp_path, monkeypatch):
    path = tmp_path / "mlflow.db"
    sqlite3.connect(str(path)).execute("CREATE TABLE t (x)").connection.close()
    monkeypatch.setenv(tracking.WAL_ENV, "0")
    assert tracking.use_wal(path) == "unchanged" and _mode(path) == "delete"
    monkeypatch.setenv(tracking.WAL_ENV, "1")
    assert tracking.use_wal(path) == "wal" and _mode(path) == "wal"


def test_a_wal_store_in_a_directory_the_reader_cannot_write_is_named_in_one_line(tmp_path, monkeypatch):
    """SQLite must create ``mlflow.db-shm`` beside a WAL store even to read it; on a read-only mount the
    open fails "unable to open database file". Checked by hand on a read-only bind mount (``pipeline
    report`` prints this line); here the mount is stood in for: the directory reported unwritable, the
    open failing as it does there."""
    from pipeline import store_checks
    from pipeline.schema import StoreError

    path = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").create_experiment("t")
    tracking.use_wal(path)

    def refuse(*a, **k):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(store_checks.os, "access", lambda p, mode: False)
    monkeypatch.setattr(sqlite3, "connect", refuse)
    with pytest.raises(StoreError) as e:
        store_checks.check_sqlite_store(f"sqlite:///{path}", path)
    msg = str(e.value)
    assert "in WAL mode in a directory this process cannot write" in msg and "journal_mode=DELETE" in msg
    assert "\n" not in msg
    monkeypatch.setattr(store_checks, "_wal_mode", lambda p: False)  # the same failure, not a WAL store
    with pytest.raises(StoreError, match="not a readable MLflow database"):
        store_checks.check_sqlite_store(f"sqlite:///{path}", path)


def test_processes_started_together_on_a_fresh_store_all_open_it(tmp_path):
    """Commands started together on a store that does not exist yet (two `regress` in a fresh CI
    workspace) each ran MLflow's migrations: the losers failed with "table latest_metrics already
    exists" or an alembic error, and once all did, leaving a store no later command could open (found
    by a review). The schema and the experiment are created under a lock on the store's file."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = f"from pipeline.tracking import ensure_experiment; print(ensure_experiment({uri!r}, 'regression'))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err.decode()[-500:] for _, err in outs]
    ids = {out.decode().strip() for out, _ in outs}
    assert len(ids) == 1, ids
    c = MlflowClient(uri)
    assert c.get_experiment_by_name("regression").experiment_id in ids
    assert sqlite_problem(tmp_path / "mlflow.db") is None


def test_a_creator_killed_during_the_migrations_leaves_no_store_and_the_next_creates_it(tmp_path):
    """kill -9 while MLflow's migrations ran (seconds, on a first `make regress`) left a half-migrated
    `mlflow.db` no later command could open ("table _alembic_tmp_experiments already exists"; a new-user
    walkthrough). The schema is made under another name and renamed into place whole: here a creator is
    killed once its file appears, the store's name is still free, and the next creator removes the
    leftover and creates the store."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    path = tmp_path / "mlflow.db"
    uri = f"sqlite:///{path}"
    code = f"from pipeline.tracking import ensure_experiment; ensure_experiment({uri!r}, 'regression')"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    try:
        end = time.monotonic() + 120
        while not list(tmp_path.glob("mlflow.db.creating-*")) and time.monotonic() < end:
            assert proc.poll() is None, "the creator ended before its schema file was seen"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert list(tmp_path.glob("mlflow.db.creating-*")) and not path.exists()  # killed mid-way, name free
    exp = tracking.ensure_experiment(uri, "regression")
    assert MlflowClient(uri).get_experiment_by_name("regression").experiment_id == exp
    assert sqlite_problem(path) is None and not list(tmp_path.glob("mlflow.db.creating-*"))
