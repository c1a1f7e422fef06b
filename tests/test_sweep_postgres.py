"""Two workers on PostgreSQL, logging through an ``mlflow server`` whose backend is also PostgreSQL.

This is the many-machines layout (README, "Many machines") on one host: Optuna's RDBStorage on one database,
an ``mlflow server`` started here on a free loopback port with its backend store on a second database.
Skips with a reason when no PostgreSQL answers at 127.0.0.1:5432; CI sets PIPELINE_REQUIRE_POSTGRES,
which turns the skip into a failure.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PG_URL, ROOT, skip_or_fail, wait_for_http
from test_sweep import TINY, check_consistent, kill_a_worker_while_the_sweep_runs, run_sweep_cli, write_sweep

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def _connect(db_url: str):
    import psycopg2

    return psycopg2.connect(db_url, connect_timeout=3)


@pytest.fixture
def pg_databases():
    """Two fresh databases (Optuna, MLflow), dropped afterwards."""
    try:
        conn = _connect(PG_URL.replace("+psycopg2", ""))
    except Exception as e:  # psycopg2.OperationalError and friends
        skip_or_fail(
            "PIPELINE_REQUIRE_POSTGRES", f"no PostgreSQL at {PG_URL}: {str(e).strip().splitlines()[0]}"
        )
    conn.autocommit = True
    base = PG_URL.rsplit("/", 1)[0]
    names = [f"sweep_test_{os.getpid()}_{int(time.time())}_{k}" for k in ("optuna", "mlflow")]
    with conn.cursor() as cur:
        for n in names:
            cur.execute(f'CREATE DATABASE "{n}"')
    try:
        yield [f"{base}/{n}" for n in names]
    finally:
        with conn.cursor() as cur:
            for n in names:
                cur.execute(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)')
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(pg_databases, tmp_path):
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "w")  # noqa: SIM115 - the server writes to it until teardown closes it
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            pg_databases[1],
            "--default-artifact-root",
            str(tmp_path / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", proc, 180, tmp_path / "mlflow-server.log")
    try:
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


# A study on a database server names no store file, so it may have Optuna's 512 characters (a journal's
# has 100 bytes): 300 here, which its worker logs' folder, MLflow's 250-character run names in the server's
# PostgreSQL store and the report's folder must each take.
LONG_STUDY = "pg-" + "s" * 297


def test_two_workers_on_postgres_through_mlflow_server(pg_databases, mlflow_server, tmp_path, monkeypatch):
    import optuna
    from mlflow.tracking import MlflowClient

    from pipeline.uris import file_name

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    optuna_url = pg_databases[0]
    cfg = write_sweep(tmp_path / "s.yaml", n_trials=6, workers=2, study=LONG_STUDY)
    p = run_sweep_cli(cfg, "--storage", optuna_url, "--workers", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    files = list((Path("optuna/logs") / file_name(LONG_STUDY)).glob("*.log"))
    logs = "".join(f.read_text() for f in files)
    assert files and "Traceback" not in logs, logs[-3000:]  # the workers' logs, in the study's folder
    study = optuna.load_study(study_name=LONG_STUDY, storage=optuna_url)
    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("sweep-test")
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    check_consistent(study, runs, 6)
    workers = {t.user_attrs["worker"].split("|")[1] for t in study.trials if "worker" in t.user_attrs}
    assert len(workers) == 2  # both workers took trials
    assert not Path("mlflow.db").exists()  # everything went through the server
    # the server's own UI, not `ui --store http://...`, which mlflow ui cannot serve (a walkthrough)
    assert f"review in MLflow: open {mlflow_server}, experiment 'sweep-test'" in p.stdout, p.stdout[-2000:]
    assert "View run" not in p.stdout + p.stderr  # MLflow's line per run it ends on a server
    # A second invocation ("add a worker on another machine" after the end) joins, runs nothing new.
    p2 = run_sweep_cli(cfg, "--storage", optuna_url, "--workers", "1")
    assert p2.returncode == 0, p2.stderr
    assert len(optuna.load_study(study_name=LONG_STUDY, storage=optuna_url).trials) == len(study.trials)
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "report", "--study", LONG_STUDY],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (Path("reports") / file_name(LONG_STUDY) / "comparison.csv").exists(), r.stdout
    # A user's own run name past the 250 characters of the server's runs.name column: cut, with a note
    # (it was a traceback from the server; SQLite kept the whole name).
    name = "u" * 300
    t = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--config", "smoke", "trainer.max_steps=2"]
        + [
            "trainer.val_every=2",
            "diagnostics.plots=false",
            "tracking.experiment=long-name",
            f"tracking.run_name={name}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert t.returncode == 0 and "the run is named by its first 250" in t.stderr, t.stderr[-3000:]
    (run,) = c.search_runs([c.get_experiment_by_name("long-name").experiment_id])
    assert run.info.run_name == name[:250] and run.info.status == "FINISHED"


def test_kill_9_of_a_worker_on_postgres(pg_databases, store, tmp_path):
    """On RDB storage the parent reaps its own killed worker's trial at once (owner check), without waiting
    for the heartbeat grace (60 s here, longer than the whole sweep): trial FAIL, run KILLED, retried once."""
    import optuna

    optuna_url = pg_databases[0]
    cfg = write_sweep(
        tmp_path / "s.yaml",
        n_trials=3,
        heartbeat={"interval": 5, "grace": 60},
        base={**TINY["base"], "trainer": {"max_steps": 400, "val_every": 100, "log_every": 10}},
    )
    kill_a_worker_while_the_sweep_runs(
        cfg,
        store,
        3,
        "--storage",
        optuna_url,
        load=lambda: optuna.load_study(study_name="t", storage=_polled(optuna_url)),
    )


def test_rolling_stacks_on_postgres_beat_only_for_trials_they_hold(pg_databases, store, tmp_path):
    """Batched trials on RDB storage: a rolling stack holds trials for most of the sweep, one after
    another; each trial's heartbeat runs from its ask to its tell and stops there (a trial told early does
    not beat on while its stack-mates train), and the budget is exact."""
    import optuna

    optuna_url = pg_databases[0]
    space = {**TINY["space"], "trainer.max_steps": {"choices": [10, 200]}}
    cfg = write_sweep(
        tmp_path / "s.yaml",
        n_trials=6,
        trials_per_worker=3,
        space=space,
        sampler={"name": "random", "seed": 1},
        heartbeat={"interval": 1, "grace": 60},
    )
    p = run_sweep_cli(cfg, "--storage", optuna_url)
    assert p.returncode == 0, p.stdout + p.stderr
    study = optuna.load_study(study_name="t", storage=optuna_url)
    assert {t.params["trainer.max_steps"] for t in study.trials} == {10, 200}, "the draw must mix both"
    from mlflow.tracking import MlflowClient

    c = MlflowClient(store)
    runs = c.search_runs([c.get_experiment_by_name("sweep-test").experiment_id], max_results=1000)
    check_consistent(study, runs, 6)
    conn = _connect(optuna_url.replace("+psycopg2", ""))
    with conn.cursor() as cur:
        cur.execute(
            "SELECT t.number, EXTRACT(EPOCH FROM (h.heartbeat - t.datetime_complete)) "
            "FROM trial_heartbeats h JOIN trials t ON t.trial_id = h.trial_id"
        )
        late = dict(cur.fetchall())
    conn.close()
    assert late, "no heartbeat was recorded"
    assert max(late.values()) < 0.5, f"heartbeats after the tell, s by trial: {late}"


def _open_after(url: str, barrier, results) -> None:
    import warnings

    warnings.simplefilter("ignore")  # Optuna's experimental-argument labels, once per process
    import optuna.storages  # noqa: F401  (imported before the barrier: the processes meet the schema together)

    from pipeline.sweep.stores import open_storage

    barrier.wait()
    try:
        open_storage(url)
        results.put("ok")
    except Exception as e:
        results.put(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")


def test_machines_creating_a_fresh_databases_schema_together_all_start(pg_databases):
    """Four processes open the Optuna storage of a fresh database at once, as machines started by one job
    array do. Each creates the schema; PostgreSQL let one win and the others died with "duplicate key
    value violates unique constraint pg_type_typname_nsp_index" (walkthrough; reproduced in 5 of 5
    rounds of four, one to three processes lost each round). The losers now open the winner's schema. A
    race: with the retry planted out this test failed 2 of 3 runs, not every one."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_open_after, args=(pg_databases[0], barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    got = [results.get(timeout=5) for _ in procs]
    assert got == ["ok"] * 4, got


def test_a_trial_beats_from_the_moment_it_is_asked(pg_databases, store):
    """Optuna judges stale only a trial with a heartbeat on record, and a worker's beating thread starts
    after the trial's MLflow run is made: a machine lost in between left a trial no reaper would take,
    and a machine waiting for it waited forever (review). A trial asked by `ask_owned` has its first
    beat at once, so it is reaped after `grace` like any other."""
    import optuna

    from pipeline.sweep.owners import ask_owned, reap_stale
    from pipeline.sweep.stores import open_storage

    url = pg_databases[0]
    storage = open_storage(url, heartbeat_interval=1, grace=2, mlflow_uri=store)  # None: ./mlflow.db
    study = optuna.create_study(study_name="beats", storage=storage)
    trial = ask_owned(study)
    study._storage.set_trial_user_attr(trial._trial_id, "worker", "machine-b|4242|12345")  # another host
    time.sleep(3.5)  # past grace, no beat since the first
    assert reap_stale(study, url, store) == [trial.number]
    assert study.trials[trial.number].state == optuna.trial.TrialState.FAIL


@pytest.mark.parametrize(
    ("tables", "problem"),
    [
        ("CREATE TABLE studies (x int)", "studies is not Optuna's"),
        ("CREATE TABLE experiments (x int); CREATE TABLE runs (x int)", "it is an MLflow tracking store"),
    ],
)
def test_a_postgres_storage_with_a_foreign_schema_is_one_line_before_any_store(
    pg_databases, tmp_path, tables, problem
):
    """A database holding another program's ``studies`` table: a 92-line UndefinedColumn traceback from
    open_storage, after mlflow.db had been written (fuzzing review). MLflow's tables: Optuna read MLflow's
    ``alembic_version`` as its own (a new-user walkthrough, on SQLite)."""
    import psycopg2

    optuna_url = pg_databases[0]
    with psycopg2.connect(optuna_url.replace("+psycopg2", ""), connect_timeout=3) as conn:
        conn.cursor().execute(tables)
    conn.close()
    cfg = write_sweep(tmp_path / "s.yaml")
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "sweep",
            "--config",
            str(cfg),
            "n_trials=1",
            "--storage",
            optuna_url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=work,
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: optuna storage postgresql") and "--storage" in lines[0], lines
    assert problem in lines[0], lines
    remedy = "point --storage at another database" if "studies" in problem else "pass another --storage: "
    assert remedy in lines[0], lines  # a server's database is not moved aside
    assert list(work.iterdir()) == []


class CutProxy:
    """A TCP forwarder to PostgreSQL on a port of its own, which can be cut (the listener and every
    connection closed, as a failover or a restart does) and restored on the same port."""

    def __init__(self, target: int):
        import threading

        self.target, self.port, self.socks = target, free_port(), []
        self.listener = None
        self.lock = threading.Lock()  # cut() against a connection _accept is making

    def start(self) -> None:
        import threading

        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return  # cut
            with self.lock:
                if listener is not self.listener:  # cut while it was being made: it must not outlive the cut
                    client.close()
                    server.close()
                    return
                self.socks += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            # close() alone leaves a listener whose accept() is blocked in another thread listening (Linux):
            # the next connection went through to PostgreSQL and lived on through the whole outage, and a
            # start() before one came failed "Address already in use". shutdown() wakes the accept.
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            self.listener = None
            socks, self.socks = self.socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def test_a_sweep_rides_out_a_postgres_outage(pg_databases, store, tmp_path):
    """PostgreSQL gone for 12 s mid-sweep (every connection closed, then refused), then back: the parent
    died in its progress read with a 37-line traceback and stopped its workers (a chaos review, 3 of 3).
    It now says so in one line, waits, and the sweep ends at n_trials with exit 0; the trials the outage
    failed are retried as any failed trial (README, "Faults and resuming")."""
    import optuna

    proxy = CutProxy(5432)
    proxy.start()
    direct = pg_databases[0]
    via = direct.replace(":5432/", f":{proxy.port}/")
    assert via != direct
    cfg = write_sweep(
        tmp_path / "s.yaml",
        n_trials=6,
        base={**TINY["base"], "trainer": {"max_steps": 600, "val_every": 100, "log_every": 10}},
    )
    from test_sweep import sweep_cmd, sweep_env

    with _sweep(sweep_cmd(cfg, "--storage", via), sweep_env()) as parent:
        out, err = _cut_after_the_first_trial(parent, proxy, direct, 12, timeout=300)
    assert parent.returncode == 0, out[-3000:] + err[-3000:]
    assert "sweep: a store did not answer (" in out and "sweep: the store answers again (after " in out, out
    study = optuna.load_study(study_name="t", storage=direct)
    runs = _runs(store)
    check_consistent(study, runs, 6)


@contextlib.contextmanager
def _sweep(cmd: list[str], env: dict, cwd=None):
    """The sweep ``cmd`` started in its own session, killed if the block leaves it running: a failed test
    left a sweep holding PostgreSQL connections, and the next tests failed with "too many clients"."""
    parent = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        yield parent
    finally:
        if parent.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(parent.pid, 9)
            parent.wait(30)


def _cut_after_the_first_trial(
    parent, proxy, optuna_url: str, seconds: float, timeout: float, while_running: bool = False
):
    """Mid-sweep (the study's first trial done; no cut once the sweep ended or after 240 s), the proxy's
    stores cut for ``seconds``, then back; the sweep's (stdout, stderr) once it ends. ``while_running``: also wait for a trial told
    RUNNING, so that the cut meets one being trained, not only workers asking; and cut again (at most
    twice more) while no trial reads as cut once two more are done, because a short trial can end between
    the poll that saw it RUNNING and the cut (on CI's machine, slower than this one, and under a heavy
    load here, a one-at-a-time sweep's single cut met no trial)."""
    for _ in range(3 if while_running else 1):
        if not _wait_for(
            parent, optuna_url, lambda c: c["done"] >= 1 and (c["running"] >= 1 or not while_running)
        ):
            break
        proxy.cut()
        time.sleep(seconds)
        proxy.start()
        if not while_running:
            break
        done = _counts(optuna_url)["done"]
        if not _wait_for(parent, optuna_url, lambda c, d=done: c["done"] >= d + 2) or _outage_trials(
            optuna_url
        ):
            break
    return parent.communicate(timeout=timeout)


def _wait_for(parent, optuna_url: str, ready, seconds: float = 240) -> bool:
    """True once the study's counts are ``ready``; False when the sweep ended or ``seconds`` passed."""
    deadline = time.time() + seconds
    while time.time() < deadline and parent.poll() is None:
        if _has_study(optuna_url) and ready(_counts(optuna_url)):
            return True
        time.sleep(0.3)
    return False


def _outage_trials(optuna_url: str) -> list:
    """The study's trials that an outage cut (closed with attr ``error`` naming it)."""
    import optuna

    study = optuna.load_study(study_name="t", storage=_polled(optuna_url))
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if "a store did not answer" in t.user_attrs.get("error", "")
    ]


_POLLED: dict[str, object] = {}


def _polled(url: str):
    """One storage per database for a test's polls, with no pool: given the URL, Optuna made a storage, an
    engine and a pooled connection per poll, left idle until collected: about 50 connections held by
    one outage test, and three PostgreSQL tests at once took all 100 of the server's ("too many clients
    already", a worker of the next test; make test, twice in one session)."""
    import optuna
    from sqlalchemy.pool import NullPool

    if url not in _POLLED:
        _POLLED[url] = optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": NullPool})
    return _POLLED[url]


def _has_study(url: str) -> bool:
    import optuna

    try:
        return "t" in [s.study_name for s in optuna.get_all_study_summaries(storage=_polled(url))]
    except Exception:
        return False


def _runs(uri: str):
    from test_sweep import mlflow_runs

    return mlflow_runs(uri)


@pytest.mark.parametrize("k", [1, 3])
def test_workers_wait_out_an_outage_of_both_stores(pg_databases, tmp_path, k):
    """Optuna's and MLflow's PostgreSQL both gone for 15 s while two workers ask short trials (the
    many-machines layout, README "Many machines"). Each trial the outage met failed within a second and
    a worker stopped after three ("3 trials in a row raised; stopping"), and the sweep ended short of
    n_trials (a chaos review). A worker now says so in one line, waits for the stores, closes the trials
    the outage cut (FAIL, attr ``error`` naming the outage, runs KILLED, params re-enqueued once), and goes
    on: the sweep ends at n_trials with exit 0 and nothing RUNNING."""
    import optuna
    from optuna.trial import TrialState

    proxy = CutProxy(5432)
    proxy.start()
    optuna_url, mlflow_url = (u.replace(":5432/", f":{proxy.port}/") for u in pg_databases)
    n = 30  # enough left after the first trial that the cut meets trials, batched too (a run with 14 did not)
    cfg = write_sweep(
        tmp_path / "s.yaml",
        n_trials=n,
        workers=2,
        trials_per_worker=k,
        base={**TINY["base"], "trainer": {"max_steps": 40, "val_every": 20, "log_every": 10},
              "tracking": {"experiment": "sweep-test", "uri": mlflow_url}},
    )  # fmt: skip
    from test_sweep import sweep_cmd, sweep_env

    with _sweep(sweep_cmd(cfg, "--storage", optuna_url), sweep_env(), cwd=tmp_path) as parent:
        out, err = _cut_after_the_first_trial(
            parent, proxy, pg_databases[0], 15, timeout=400, while_running=k == 1
        )
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "optuna" / "logs").rglob("*.log")))
    assert parent.returncode == 0, out[-3000:] + err[-3000:] + logs[-5000:]
    assert "in a row raised" not in logs, logs[-5000:]
    # Optuna's notes on its heartbeat (experimental; "supposed to be used with Study.optimize") are not
    # the user's business: they were two lines in the sweep's output and two a trial in each worker's log
    assert "ExperimentalWarning" not in out + err + logs and "Heartbeat of storage" not in logs, logs[-3000:]
    assert "a store did not answer (" in logs and "the store answers again (after " in logs, logs[-5000:]
    study = optuna.load_study(study_name="t", storage=pg_databases[0])
    runs = _runs(pg_databases[1])
    check_consistent(study, runs, n)
    cut = _outage_trials(pg_databases[0])
    # one at a time, a cut meets a trial (cut again while one did not); a batched worker spends much of a
    # 40-step sweep asking under the budget lock, where the outage met both workers in 1 of 4 runs (no trial cut)
    assert cut or k > 1, ("the outage met no trial", logs[-6000:])
    for t in cut:  # closed as the outage left them: FAIL, their runs ended, their params asked again
        assert t.state == TrialState.FAIL
        statuses = [r.info.status for r in runs if r.data.tags.get("trial_number") == str(t.number)]
        assert statuses in ([], ["KILLED"], ["FAILED"]), (t.number, statuses)  # FAILED: closed by its stack
        retry = [u for u in study.get_trials(deepcopy=False) if u.user_attrs.get("retry_of") == t.number]
        assert len(retry) == 1, t.number
        # the params it drew are asked again; a trial cut before or during its sampling (CI: only
        # model.cell drawn) has the rest drawn by its retry, which trains a full set like any trial
        assert t.params.items() <= retry[0].params.items(), (t.number, t.params, retry[0].params)
        full = {
            name for u in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) for name in u.params
        }
        assert retry[0].state != TrialState.COMPLETE or set(retry[0].params) == full, (retry[0].params, full)


def _counts(url: str) -> dict[str, int]:
    import optuna

    from pipeline.sweep.study import counts

    return counts(optuna.load_study(study_name="t", storage=_polled(url)))


def test_a_postgres_server_that_never_answers_is_an_outage_within_the_connect_bound(monkeypatch):
    """A network cut that drops packets (not a refused port): a connect to a server that accepts and never
    answers blocked a worker in libpq for minutes, deaf to the outage limit and to SIGTERM (a review: still
    blocked when killed at 25 s). The sweep's connect bound (``sweep.stores.libpq_args``) ends it, and the
    error reads as a store that did not answer, which the sweep rides out. A bound the URL sets is kept."""
    import threading

    from pipeline import uris
    from pipeline.store_errors import store_unreachable
    from pipeline.sweep import stores

    assert stores.libpq_args("postgresql://u@h/db?connect_timeout=3")["keepalives"] == 1
    assert "connect_timeout" not in stores.libpq_args("postgresql://u@h/db?connect_timeout=3")
    assert stores.libpq_args("mysql+pymysql://u@h/db") == {} == stores.libpq_args("sqlite:///x.db")
    assert stores.libpq_args("postgresql+pg8000://u@h/db") == {}  # not libpq
    assert uris.with_libpq_bounds("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "4")  # the user's, which libpq reads itself: not overridden
    assert uris.with_libpq_bounds("postgres://u:p@h/db?sslmode=require&keepalives=0") == (
        "postgres://u:p@h/db?keepalives=0&keepalives_count=3&keepalives_idle=10&keepalives_interval=5"
        "&sslmode=require&tcp_user_timeout=30000"
    )
    # a raw "?" or "#" in the password is the password's, as SQLAlchemy reads the URL (a review: the bounds
    # went into the database name, and the user's own connect_timeout was not seen). Read back, not
    # compared as text: SQLAlchemy 2.1 %-escapes the password as it writes the URL, 2.0 does not.
    from sqlalchemy.engine import make_url

    got = make_url(uris.with_libpq_bounds("postgresql://u:p#w?d@h/db?keepalives_idle=60"))
    assert (got.password, got.host, got.database) == ("p#w?d", "h", "db")
    assert dict(got.query) == {
        "keepalives": "1", "keepalives_count": "3", "keepalives_idle": "60", "keepalives_interval": "5",
        "tcp_user_timeout": "30000",
    }  # fmt: skip
    silent = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: held.append(silent.accept()), daemon=True).start()
    monkeypatch.setattr(uris, "PG_CONNECT_TIMEOUT_S", 2)
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    t0 = time.monotonic()
    with pytest.raises(Exception) as e:  # noqa: PT011 - what libpq raises, through SQLAlchemy and Optuna
        stores.open_storage(f"postgresql+psycopg2://postgres@127.0.0.1:{silent.getsockname()[1]}/x")
    took = time.monotonic() - t0
    silent.close()
    assert took < 8, took  # libpq's bound (2 s here; 10 s by default, which this would fail)
    assert store_unreachable(e.value) is not None, str(e.value)[:500]


def test_mlflows_postgresql_connections_carry_libpqs_bounds(pg_databases, monkeypatch):
    """MLflow takes no engine arguments, so its PostgreSQL store had none of the bounds Optuna's engine
    gets: a worker whose MLflow server stopped answering mid-read waited for the kernel's retransmissions
    (about 15 minutes on Linux) before the sweep could ride the outage out. ``tracking.client`` puts them
    in the store's URL (every read of ours goes through it, the report's bulk read too): what libpq itself
    holds on each connection is checked here. A bound the user's URL sets is kept."""
    from pipeline.tracking import client

    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    uri = pg_databases[1]

    def libpq_holds(c) -> dict:
        c.search_experiments()  # the store made, a connection in its pool
        with c._tracking_client.store.engine.connect() as conn:
            return conn.connection.dbapi_connection.get_dsn_parameters()

    held = libpq_holds(client(uri))
    want = {"connect_timeout": "10", "keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5"}
    assert {k: held.get(k) for k in [*want, "keepalives_count", "tcp_user_timeout"]} == {
        **want, "keepalives_count": "3", "tcp_user_timeout": "30000"
    }, held  # fmt: skip
    assert libpq_holds(client(uri + "?tcp_user_timeout=5000"))["tcp_user_timeout"] == "5000"
    # a password with a raw "?" (the trust auth of a URL without one ignores it): the same database
    from sqlalchemy.engine import make_url

    if make_url(uri).password is None:
        odd = uri.replace("@", ":pa?ss@", 1)
        assert libpq_holds(client(odd))["dbname"] == make_url(uri).database
    from pipeline.report.search import search_runs_frame

    assert search_runs_frame(uri, ["0"], "", []).empty  # the report's bulk read: through tracking.client


def test_a_store_password_is_not_printed(pg_databases, tmp_path):
    """``train``, ``sweep`` and ``regress`` print their store and the UI command for it: a PostgreSQL
    password went to the terminal and the logs with them (a review). Trust auth here ignores the password."""
    uri = pg_databases[1]
    secret = uri.replace("@", ":s3cret@", 1)
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--config", "smoke", "trainer.max_steps=2",
         f"tracking.uri={secret}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "s3cret" not in r.stdout + r.stderr and ":***@" in r.stdout, r.stdout
