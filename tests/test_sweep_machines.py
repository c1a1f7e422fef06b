"""Several machines on one study (README, "Many machines"): each trial its own random stream, a machine
whose workers are done waits for the trials other machines still train (and takes over a lost one's),
an Optuna store that cannot be opened is one line before anything is written, and machines that create a
fresh database's schema together all start. Found by a walkthrough running the README's "same command"
twice; "machines" here are processes on one host, which is what the stores see of them."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from test_sampler import _quiet_optuna  # noqa: F401  (autouse: Optuna's INFO lines off)
from test_sweep import load_study, sweep_cmd, sweep_env, write_sweep

from pipeline.sweep.config import SamplerConfig, SweepConfig
from pipeline.sweep.space import Param
from pipeline.sweep.study import make_sampler, suggest
from pipeline.sweep.study_end import WAIT_S


def _draw(study, space) -> dict:
    t = study.ask()
    return {p.key: suggest(t, p) for p in space}


def test_two_machines_joining_at_the_same_count_draw_different_points():
    """Each machine loads the study when it holds the same number of trials, as two machines started
    together do; both are the first worker of their machine. Seeded per (seed, worker, trials seen),
    both drew the same stream and proposed identical points (walkthrough: trials 3 and 4 of a
    PostgreSQL study, same cell, init scale and learning rate to the last digit). Per (seed, trial number)
    every trial has its own stream, and a trial's draw depends only on its number and the history."""
    sw = SweepConfig(sampler=SamplerConfig(seed=0, n_startup_trials=4))
    space = (Param("model.init_scale", "float", 0.3, 3.0, log=True), Param("optim.lr", "float", 1e-4, 0.1))
    storage = optuna.storages.InMemoryStorage()
    a = optuna.create_study(study_name="s", storage=storage, sampler=make_sampler(sw))
    b = optuna.load_study(study_name="s", storage=storage, sampler=make_sampler(sw))
    points = [_draw(a, space), _draw(b, space), _draw(b, space), _draw(a, space)]
    assert len({tuple(p.values()) for p in points}) == 4, points
    # the same numbers on a study of its own, asked by one process: the same points
    alone = optuna.create_study(sampler=make_sampler(sw))
    assert [_draw(alone, space) for _ in range(4)] == points


class _FakeSupervisor:
    """What :meth:`StudyEnd.take_waiting` reads of a supervisor: the study, the budget, the replacement
    budget (``respawns``) and the workers it spawns."""

    def __init__(self, study, respawns: int = 0, left: int = 2):
        from types import SimpleNamespace

        self.stores = SimpleNamespace(study=study)
        self.respawns, self.left, self.spawned = respawns, left, []
        self.workers = SimpleNamespace(spawn=self.spawned.append)

    def budget_left(self) -> int:
        return self.left


def test_a_lost_machines_retry_is_taken_over_after_the_crash_budget_is_spent():
    """respawns spent, trials seen elsewhere, one WAITING retry, budget left: one worker is spawned for it,
    paid from the takeovers (at most ``n_trials`` of them), not refused."""
    from pipeline.sweep.study_end import StudyEnd

    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    study.enqueue_trial({})  # the retry a lost machine's trial left WAITING
    end = StudyEnd(n_trials=3)
    end.elsewhere = True
    sup = _FakeSupervisor(study)
    assert end.take_waiting(sup) is True and sup.spawned == [0]
    assert end.takeovers == 2 and sup.respawns == 0
    # nothing seen elsewhere: a spent crash budget refuses it
    other = _FakeSupervisor(study)
    assert StudyEnd(n_trials=3).take_waiting(other) is False and other.spawned == []


def _owner_process():
    """A live process on this host to own a trial, as a worker of another machine (the reaper tells a
    same-host owner's death at once; another host's by Optuna's heartbeat after ``grace``)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def _wait(cond, timeout: float, what: str, proc=None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the sweep exited ({proc.returncode}) before {what}:\n{out[-3000:]}\n{err[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


WAITING = "waiting for 1 trial(s) running in other processes"


class _Drain:
    """Reads a process's stdout and stderr while it runs (a thread each), so a test can wait for a line."""

    def __init__(self, proc):
        self.lines: dict[str, list[str]] = {"out": [], "err": []}
        self.threads = [
            threading.Thread(target=self._read, args=(stream, self.lines[k]), daemon=True)
            for k, stream in (("out", proc.stdout), ("err", proc.stderr))
        ]
        for t in self.threads:
            t.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def join(self, timeout: float = 30) -> None:
        for t in self.threads:
            t.join(timeout)

    def text(self, which: str = "out") -> str:
        return "".join(list(self.lines[which]))


def _done(study) -> int:
    from pipeline.sweep.study import counts

    return counts(study)["done"]


@pytest.mark.slow
@pytest.mark.parametrize("n_trials", [3, 2], ids=["after-its-own", "nothing-left-at-start"])
def test_a_machine_whose_workers_are_done_waits_for_trials_elsewhere_and_takes_over_a_lost_ones(
    store, tmp_path, n_trials
):
    """One trial of the study is held by another machine's worker (a live process that owns it). This
    machine's sweep trains what the budget leaves it (nothing, with n_trials 2: it starts when all that is
    left runs elsewhere), then must wait: before, it reported the study complete, wrote the best trial's
    params and closed the shared parent run FINISHED with exit 0 while the trial still trained (with
    nothing left at the start: exit 1 and the parent closed). When that worker dies, the waiting machine
    reaps its trial, retries it, and ends complete."""
    from mlflow.tracking import MlflowClient

    from pipeline.provenance import owner_tag
    from pipeline.sweep.config import load_sweep

    cfg = write_sweep(tmp_path / "s.yaml", n_trials=1)
    first = subprocess.run(sweep_cmd(cfg), capture_output=True, text=True, timeout=300, env=sweep_env())
    assert first.returncode == 0, first.stderr[-3000:]
    study = load_study()
    sw = load_sweep(str(cfg), [f"n_trials={n_trials}"])
    other = _owner_process()
    proc = None
    try:
        held = study.ask()  # the other machine's trial: asked, owned, training
        held.set_user_attr("worker", owner_tag(other.pid))
        for p in sw.space:
            suggest(held, p)
        proc = subprocess.Popen(
            sweep_cmd(cfg, f"n_trials={n_trials}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=sweep_env(),
        )
        outs = _Drain(proc)
        # Timed on the machine's line saying it waits (after its own trial, or at once with nothing left
        # to it), not on a sleep: a machine under load was still starting when an 8 s sleep ran out, found
        # the other worker already dead, and never waited (seen once with other jobs on the 2 cores).
        _wait(lambda: WAITING in outs.text() or proc.poll() is not None, 240, "the line saying it waits")
        assert proc.poll() is None, (
            "ended while a trial of the study was still training elsewhere\n" + outs.text()
        )
        assert _done(load_study()) == n_trials - 1
        time.sleep(2 * WAIT_S)  # past a poll or two of the supervisor
        assert proc.poll() is None, "ended while a trial of the study was still training elsewhere"
        c = MlflowClient(store)
        parent = c.get_run(load_study().user_attrs["mlflow_parent_run_id"])
        assert parent.info.status == "RUNNING" and parent.data.tags.get("sweep_complete") != "true"
        other.kill()  # the other machine is lost
        other.wait()
        proc.wait(timeout=240)
        outs.join()
        out, err = outs.text(), outs.text("err")
    finally:
        for p in (other, proc):
            if p is not None and p.poll() is None:
                p.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert out.count(WAITING) == 1, out  # said once
    study = load_study()
    assert _done(study) == n_trials
    lost = study.trials[held.number]
    assert lost.state == optuna.trial.TrialState.FAIL
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == held.number]
    assert len(retry) == 1 and retry[0].state.is_finished() and retry[0].params == lost.params
    parent = MlflowClient(store).get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep_complete"] == "true"
    assert parent.data.tags["n_trials_done"] == str(n_trials)


@pytest.mark.slow
def test_a_machine_stopped_while_it_waits_for_a_study_finished_elsewhere_closes_it_finished(store, tmp_path):
    """A machine waits for the last trial, held by another machine; that trial completes and a SIGTERM
    reaches the waiting machine before it sees so. It closed the shared parent run KILLED with
    ``sweep_complete=false`` beside ``n_trials_done = n_trials``, undoing the other machine's FINISHED (a
    many-machines walkthrough). The study is complete: FINISHED, complete; the exit status says the signal.
    Ordered by stopping the waiting process (SIGSTOP) while the trial is told and the SIGTERM sent."""
    import os
    import signal

    from mlflow.tracking import MlflowClient

    from pipeline.provenance import owner_tag
    from pipeline.sweep.config import load_sweep

    cfg = write_sweep(tmp_path / "s.yaml", n_trials=1)
    first = subprocess.run(sweep_cmd(cfg), capture_output=True, text=True, timeout=300, env=sweep_env())
    assert first.returncode == 0, first.stderr[-3000:]
    study = load_study()
    sw = load_sweep(str(cfg), ["n_trials=2"])
    other = _owner_process()
    proc = None
    try:
        held = study.ask()
        held.set_user_attr("worker", owner_tag(other.pid))
        for p in sw.space:
            suggest(held, p)
        proc = subprocess.Popen(
            sweep_cmd(cfg, "n_trials=2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=sweep_env(),
        )
        outs = _Drain(proc)
        _wait(lambda: WAITING in outs.text(), 240, "the line saying it waits", proc)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            study.tell(held, 0.5)  # the other machine's trial completes: the study is at n_trials
            os.kill(proc.pid, signal.SIGTERM)  # pending until it runs again: it comes first
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=240)
        outs.join()
    finally:
        for p in (other, proc):
            if p is not None and p.poll() is None:
                p.kill()
    out = outs.text() + outs.text("err")
    assert proc.returncode == 143, out[-3000:]  # the signal's path, not the study's end seen first
    parent = MlflowClient(store).get_run(load_study().user_attrs["mlflow_parent_run_id"])
    tags = parent.data.tags
    assert (parent.info.status, tags["sweep_complete"], tags["n_trials_done"]) == ("FINISHED", "true", "2"), (
        out
    )


def _refused_line(tmp_path, *args: str) -> str:
    """The one stderr line of a sweep (tmp_path/s.yaml, written here) refused with exit 2."""
    cfg = write_sweep(tmp_path / "s.yaml")
    r = subprocess.run(
        sweep_cmd(cfg, *args), capture_output=True, text=True, timeout=120, env=sweep_env(), cwd=tmp_path
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    ("storage", "says"),
    [
        ("postgresql://postgres@127.0.0.1:1/nodb", "refused the connection"),
        (
            "sqlite:////nonexistent-dir-of-this-test/x.db",
            "directory /nonexistent-dir-of-this-test does not exist",
        ),
        # a journal too: it made the folders and ran a new study there (a many-machines walkthrough)
        ("/nonexistent-dir-of-this-test/x.journal", "directory /nonexistent-dir-of-this-test does not exist"),
        ("typo/x.journal", "typo does not exist; create it or pass another --storage"),
    ],
)
def test_an_optuna_store_that_cannot_be_opened_is_one_line_and_nothing_is_written(tmp_path, storage, says):
    """A PostgreSQL server that refuses (port 1: nothing listens), or a SQLite file in a directory that
    does not exist: a 140-line traceback, exit 1, and mlflow.db written before (walkthrough)."""
    line = _refused_line(tmp_path, "--storage", storage)
    assert line.startswith("error: optuna storage ") and says in line and "--storage" in line, line
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["s.yaml"]
    assert not Path("/nonexistent-dir-of-this-test").exists()


def test_the_default_journal_gets_its_folder_and_a_storage_key_does_not(tmp_path):
    """``optuna/<study>.journal``, the default, is made with its folder (a fresh clone's ``make sweep``);
    a journal the sweep file's ``storage`` names in a folder that does not exist is refused, naming it."""
    from pipeline.schema import StoreError
    from pipeline.sweep.stores import check_storage

    url = str(tmp_path / "optuna" / "s.journal")
    check_storage(url, "storage", default=True)  # no error: open_storage makes the folder
    with pytest.raises(
        StoreError, match=r"optuna storage .*: its directory .*/optuna does not exist.*storage"
    ):
        check_storage(url, "storage")


@pytest.mark.parametrize(
    ("storage", "says"),
    [
        ("sqlite:////proc/optuna-of-this-test.db", "/proc"),  # os.access lets root write /proc: tried
        ("o.journal", "o.journal is a directory"),
        ("journal://", "names no journal file"),
        ("sqlite://", "names no database"),
        ("sqlite:///", "names no database"),
        ("postgresql://", "names no database"),
        ("postgresql://127.0.0.1:5432/", "names no database"),
    ],
)
def test_a_storage_that_cannot_be_used_is_one_line_naming_storage(tmp_path, storage, says):
    """Fuzzing review: a directory given as the journal (or ``journal://`` alone) was an IsADirectoryError
    traceback, a storage naming no database ran into an in-memory one or libpq's default database; each
    after mlflow.db had been written."""
    if storage == "o.journal":
        (tmp_path / "o.journal").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir() if p.name != "s.yaml")
    line = _refused_line(tmp_path, "n_trials=1", "--storage", storage)
    assert line.startswith("error: ") and says in line and "--storage" in line, line
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "s.yaml") == before


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_storage_in_a_read_only_directory_is_one_line_before_any_store(tmp_path, kind):
    """--storage sqlite:////RO/o.db: a 131-line traceback after mlflow.db was written (fuzzing review).
    The directory reads as a read-only mount does (os.access W_OK False, even for root)."""
    from test_bad_input import cli_read_only

    ro = tmp_path / "ro"
    ro.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    cfg = write_sweep(tmp_path / "s.yaml")
    storage = f"sqlite:///{ro}/o.db" if kind == "sqlite" else str(ro / "o.journal")
    r = cli_read_only(
        "sweep", "--config", str(cfg), "n_trials=1", "--storage", storage, cwd=work, read_only=ro
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert f"optuna storage {storage}" in lines[0] and "not writable" in lines[0] and "--storage" in lines[0]
    assert list(work.iterdir()) == [] and list(ro.iterdir()) == []


@pytest.mark.slow
def test_a_trial_held_on_another_host_of_a_journal_store_is_not_waited_for(store, tmp_path):
    """A journal store has no heartbeat: a trial held by a process on another host (a container restarted
    under a new name, the journal on a volume) can never be told dead, and a machine waiting for it
    waited forever (review). It is named in one line and not waited for; the study is not complete here."""
    from mlflow.tracking import MlflowClient

    cfg = write_sweep(tmp_path / "s.yaml", n_trials=1)
    first = subprocess.run(sweep_cmd(cfg), capture_output=True, text=True, timeout=300, env=sweep_env())
    assert first.returncode == 0, first.stderr[-3000:]
    held = load_study().ask()
    held.set_user_attr("worker", "oldcontainer-4f2a|1234|99999")
    r = subprocess.run(
        sweep_cmd(cfg, "n_trials=2"), capture_output=True, text=True, timeout=120, env=sweep_env()
    )
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 trial(s) still running on oldcontainer-4f2a, which this machine cannot check" in r.stdout
    study = load_study()
    assert study.trials[held.number].state == optuna.trial.TrialState.RUNNING  # left to its own worker
    parent = MlflowClient(store).get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["sweep_complete"] == "false"


def test_a_machine_that_lost_the_schema_race_is_told_from_a_real_database_error():
    """Machines started together on a fresh PostgreSQL database each create Optuna's schema; the losers'
    errors ("duplicate key value violates unique constraint pg_type_typname_nsp_index" from CREATE TYPE,
    "relation ... already exists") mean: open the schema the winner made. Any other error is raised
    (pipeline/sweep/stores.py; mutation review)."""
    import sqlalchemy

    from pipeline.sweep.stores import _lost_schema_race

    def err(kind, text):
        return kind("CREATE ...", {}, Exception(text))

    exc = sqlalchemy.exc
    dup = 'duplicate key value violates unique constraint "pg_type_typname_nsp_index"'
    assert _lost_schema_race(err(exc.IntegrityError, dup))
    assert _lost_schema_race(err(exc.ProgrammingError, 'relation "studies" already exists'))
    assert not _lost_schema_race(err(exc.IntegrityError, "null value in column violates not-null"))
    assert not _lost_schema_race(err(exc.OperationalError, 'relation "studies" already exists'))
    assert not _lost_schema_race(ValueError("already exists"))
