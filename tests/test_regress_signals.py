"""A regression suite interrupted while its entries train in worker processes (README, "Regression
suites"; "Faults and resuming": every run closed explicitly, never left RUNNING by Ctrl-C or SIGTERM).
A real ``python -m pipeline regress --workers 2`` in its own session, signalled once two entries train:
the exit status names the signal, the parent and every entry run are closed KILLED, no entry trains to
FINISHED after the signal (one already queued to a worker included), and no process of the suite is
left (a worker orphaned by its parent went on training the queued entries)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

SUITE = """name: slow
defaults:
  seed: 0
  task: {name: adding, batch_size: 16, val_size: 32, seq_len: 50}
  optim: {name: adam, lr: 1.0e-3}
  trainer: {accelerator: cpu, max_steps: 20000, val_every: 100, log_every: 10, threads: 1}
  diagnostics: {profile_every: 0, probe_size: 16, plots: false}
  model: {cell: tanh, hidden_size: 32}
entries:
  - name: a
    checks: [{finite: {}}]
  - name: b
    checks: [{finite: {}}]
  - name: c
    checks: [{finite: {}}]
"""


def _session():
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a job started in the background inherits SIGINT ignored


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_an_interrupted_suite_closes_every_run_and_leaves_no_process(tmp_path, sig):
    """SIGKILL: the parent alone (kill -9), which forwards nothing; its workers, orphaned, stop themselves
    and close their entries' runs KILLED (they went on training queued entries to FINISHED), and the
    parent run is left RUNNING for the next ``regress`` to close
    (test_runs_left_running_by_a_killed_regress_are_closed_by_the_next)."""
    from mlflow.tracking import MlflowClient

    (tmp_path / "slow.yaml").write_text(SUITE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    from pipeline.tracking import use_wal

    c = MlflowClient(uri)
    c.search_experiments()  # the store made here first: two processes migrating one new file race
    use_wal(tmp_path / "mlflow.db")  # as the pipeline makes it: this test's polling never blocks a write
    cmd = [sys.executable, "-m", "pipeline", "regress", "--suite", "slow.yaml", "--workers", "2"]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_session,
    )
    try:
        end, running = time.monotonic() + 240, []
        while time.monotonic() < end and proc.poll() is None:
            time.sleep(0.5)
            exp = c.get_experiment_by_name("regression")
            runs = c.search_runs([exp.experiment_id]) if exp else []
            running = [r for r in runs if r.info.status == "RUNNING" and "mlflow.parentRunId" in r.data.tags]
            if len(running) >= 2:
                break
        assert len(running) >= 2 and proc.poll() is None, proc.communicate(timeout=60)
        if sig == "SIGINT":
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
        else:
            proc.send_signal(getattr(signal, sig))  # the parent alone, as a scheduler stops a task
        out, err = proc.communicate(timeout=120)  # until the workers, which share its stderr, are gone too
        assert proc.returncode == {"SIGTERM": 143, "SIGINT": 130, "SIGKILL": -9}[sig], err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        # each worker closed its entry's run and exited: none waited out KILL_AFTER_S to be killed (the
        # one that had trained went back to the pool's queue for more work, killed after 60 s)
        assert "did not exit" not in err, err[-3000:]
        gone = time.monotonic() + 30
        while _group_alive(proc.pid) and time.monotonic() < gone:
            time.sleep(0.2)
        assert not _group_alive(proc.pid), "a worker of the suite outlived it"
    finally:
        if proc.poll() is None:
            proc.kill()
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    exp = c.get_experiment_by_name("regression")
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    entries = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [p.info.status for p in parents] == ["RUNNING" if sig == "SIGKILL" else "KILLED"]
    assert len(entries) >= 2 and {r.info.status for r in entries} == {"KILLED"}, [
        (r.info.run_name, r.info.status) for r in entries
    ]


def test_runs_left_running_by_a_killed_regress_are_closed_by_the_next(tmp_path, monkeypatch, capsys):
    """kill -9 leaves no process to close anything: the suite's parent and its entry stay RUNNING. The
    next ``regress`` of the suite on this host finds their owner process gone and closes them KILLED."""
    from mlflow.tracking import MlflowClient

    from pipeline.cli import main

    (tmp_path / "slow.yaml").write_text(SUITE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    c.search_experiments()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pipeline", "regress", "--suite", "slow.yaml"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        end, running = time.monotonic() + 240, []
        while time.monotonic() < end and proc.poll() is None and len(running) < 2:
            time.sleep(0.5)
            exp = c.get_experiment_by_name("regression")
            running = [
                r for r in (c.search_runs([exp.experiment_id]) if exp else []) if r.info.status == "RUNNING"
            ]
        assert len(running) == 2, proc.stderr.read() if proc.poll() is not None else running  # parent, entry
    finally:
        proc.kill()
        proc.wait(timeout=60)
    left = {r.info.run_id for r in running}
    (beat,) = [r.data.tags["pipeline.heartbeat"] for r in running if "mlflow.parentRunId" not in r.data.tags]
    assert abs(int(beat) - time.time()) < 300, beat  # the parent's heartbeat, from its start
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    from pipeline.regression import run as regression_run

    beating, real = [], regression_run.heartbeat

    @contextlib.contextmanager
    def spy(uri, run_id, every=None):  # the suite's parent beats while its entries train, then stops
        beating.append([run_id, "in"])
        with real(uri, run_id, every):
            yield
        beating[-1][1] = "out"

    monkeypatch.setattr(regression_run, "heartbeat", spy)
    assert main(["regress", "--suite", "slow.yaml", "--set", "trainer.max_steps=10"]) == 0
    assert "closed 2 run(s) of suite slow as KILLED" in capsys.readouterr().out
    (parent,) = [
        r
        for r in c.search_runs([exp.experiment_id])
        if r.info.run_id not in left and r.data.tags.get("regression_role") == "suite"
    ]
    assert beating == [[parent.info.run_id, "out"]] and parent.info.status == "FINISHED"
    for rid in left:
        r = c.get_run(rid)
        assert r.info.status == "KILLED" and r.data.tags["status"] == "killed"


def test_only_this_hosts_dead_command_line_runs_are_closed(store):
    """``close_dead_runs``: of the suite's RUNNING runs, those of a command-line ``regress`` whose process
    on this host is gone are closed KILLED (tag ``status=killed``); a live owner's, another host's
    (cannot tell), a DAG run's (keyed) and another suite's are left as they are (mutation review).
    Another host's (or container's) whose parent run's heartbeat is older than ``STALE_S`` are closed,
    its entries with it: they were left RUNNING forever (a command-line regress restarted in a new
    container, a CronJob's pod with a new host name each run); a fresh or absent heartbeat leaves them."""
    import socket
    import time

    from mlflow.tracking import MlflowClient

    from pipeline.names import HEARTBEAT, OWNER, ROLE, SUITE
    from pipeline.provenance import owner_tag
    from pipeline.regression.run import KEY, ROLE_ENTRY, ROLE_SUITE, STALE_S, close_dead_runs
    from pipeline.tracking import Recorder

    p = subprocess.Popen(["sleep", "60"])
    dead = owner_tag(p.pid)
    p.kill()
    p.wait()
    runs = {
        "dead": {SUITE: "s", OWNER: dead},
        "live": {SUITE: "s", OWNER: owner_tag()},
        "remote": {SUITE: "s", OWNER: f"{socket.gethostname()}-other|{p.pid}|1"},
        "dag": {SUITE: "s", OWNER: dead, KEY: "s-2026-12-05"},
        "other_suite": {SUITE: "t", OWNER: dead},
    }
    ids = {name: Recorder.start(store, "regression", name, tags=tags).run_id for name, tags in runs.items()}
    done = Recorder.start(store, "regression", "done", tags={SUITE: "s", OWNER: dead})
    done.close()
    # another host's suites, each a parent and an entry: silent for STALE_S + 60 s, beating 60 s ago,
    # silent but closed (its entry left RUNNING), with no heartbeat (an earlier version)
    elsewhere = f"{socket.gethostname()}-other|{p.pid}|1|aaaa.bbbb.1"
    now = time.time()
    beats = {
        "silent": now - STALE_S - 60,
        "beating": now - 60,
        "closed": now - STALE_S - 60,
        "unbeating": None,
    }
    for name, beat in beats.items():
        tags = {
            SUITE: "s",
            OWNER: elsewhere,
            ROLE: ROLE_SUITE,
            **({HEARTBEAT: str(int(beat))} if beat else {}),
        }
        parent = Recorder.start(store, "regression", name, tags=tags)
        entry = {SUITE: "s", OWNER: elsewhere, ROLE: ROLE_ENTRY}
        ids[f"{name}/e"] = Recorder.start(store, "regression", f"{name}/e", entry, parent.run_id).run_id
        if name == "closed":
            parent.close("KILLED")
        else:
            ids[name] = parent.run_id
    exp = MlflowClient(store).get_experiment_by_name("regression").experiment_id
    assert close_dead_runs(store, exp, "s") == 4
    c = MlflowClient(store)
    got = {name: c.get_run(rid) for name, rid in ids.items()}
    assert {n: r.info.status for n, r in got.items()} == {
        "dead": "KILLED",
        "live": "RUNNING",
        "remote": "RUNNING",
        "dag": "RUNNING",
        "other_suite": "RUNNING",
        "silent": "KILLED",
        "silent/e": "KILLED",
        "beating": "RUNNING",
        "beating/e": "RUNNING",
        "closed/e": "KILLED",
        "unbeating": "RUNNING",
        "unbeating/e": "RUNNING",
    }
    assert got["dead"].data.tags["status"] == "killed" and "status" not in got["live"].data.tags
    assert c.get_run(done.run_id).info.status == "FINISHED"
    assert got["silent/e"].data.tags["status"] == "killed"


def test_a_regress_beats_on_its_parent_run_while_it_runs_and_stops_after(store):
    """``heartbeat``: tag ``pipeline.heartbeat`` of the run, the unix time, renewed every ``every`` seconds
    by a thread that ends with the block; the CLI's parent run carries one from its start."""
    import threading
    import time

    from mlflow.tracking import MlflowClient

    from pipeline.names import HEARTBEAT
    from pipeline.regression.run import heartbeat
    from pipeline.tracking import Recorder

    run = Recorder.start(store, "regression", "beating", tags={HEARTBEAT: "1"})
    c = MlflowClient(store)
    seen = set()
    with heartbeat(store, run.run_id, every=0.05):
        t0 = time.time()
        while len(seen) < 2 and time.time() - t0 < 30:
            seen.add(c.get_run(run.run_id).data.tags[HEARTBEAT])
            time.sleep(0.02)
    assert "regress-heartbeat" not in {t.name for t in threading.enumerate()}
    beats = sorted(int(b) for b in seen - {"1"})
    assert beats and int(t0) - 1 <= beats[0] <= time.time(), seen
    last = c.get_run(run.run_id).data.tags[HEARTBEAT]
    time.sleep(0.3)
    assert c.get_run(run.run_id).data.tags[HEARTBEAT] == last  # stopped with the block


DEAF = '''
import os, signal, time

def entry(suite_path, name, *args):
    """A pool entry: "b" ignores SIGTERM and never returns (writes its pid once it does); "a" returns 1 s
    after that, not 1 s after it began: the pool's second worker, started with the first, may take longer
    to start than "a" trains on a loaded machine, and "a" ending first sent its SIGTERM before "b" ran."""
    if name == "b":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open(os.environ["DEAF_PID"] + ".tmp", "w").write(str(os.getpid()))
        os.rename(os.environ["DEAF_PID"] + ".tmp", os.environ["DEAF_PID"])
        time.sleep(600)
    while not os.path.exists(os.environ["DEAF_PID"]):
        time.sleep(0.05)
    time.sleep(1)
    return name, None, None
'''

DRIVE = """
import sys, time
from pipeline.regression import pool
from pipeline.regression.suite import load_suite
import deaf
pool._entry_worker = deaf.entry
pool.KILL_AFTER_S = 2.0
def progress(msg):
    if "[1/" in msg:
        raise KeyboardInterrupt  # as Ctrl-C arrives in the parent while "b" trains
t = time.monotonic()
try:
    pool.run_all(load_suite(sys.argv[1]), "parent", "0", workers=2, progress=progress, entries=["a", "b"])
except KeyboardInterrupt:
    print(f"RAISED {time.monotonic() - t:.1f}")
"""


def test_a_worker_that_does_not_exit_after_the_sigterm_is_killed_and_the_suite_ends(tmp_path):
    """The suite forwards a SIGTERM to its workers and waits for them; one that did not exit (seen once
    after a whole process group's SIGTERM) held ``regress`` forever in the pool's shutdown (a review
    killed it by hand after 10 min). It is killed after ``KILL_AFTER_S`` (2 s here)."""
    (tmp_path / "suite.yaml").write_text(SUITE)
    (tmp_path / "deaf.py").write_text(DEAF)
    pid_file = tmp_path / "b.pid"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "DEAF_PID": str(pid_file)}
    r = subprocess.run(
        [sys.executable, "-c", DRIVE, str(tmp_path / "suite.yaml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "RAISED" in r.stdout, r.stdout + r.stderr[-3000:]
    assert float(r.stdout.split("RAISED")[1]) < 60  # 1 s of "a", 2 s of grace, the pool's shutdown
    assert "regress: a worker (pid " in r.stderr and " did not exit 2 s after its SIGTERM; killed" in r.stderr
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # "b" is gone (killed, reaped by the pool)
