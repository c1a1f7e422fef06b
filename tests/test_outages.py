"""A sweep worker waits out a store that does not answer (pipeline/sweep/outages.py): the trials the outage
cut are closed once the stores answer again (FAIL, attr ``error``, runs KILLED, params re-enqueued once),
the outcome tags it kept from a told trial's run are written, and a store away past the limit ends the
worker with one line. With real stores (an Optuna journal, MLflow's sqlite) behind a storage that refuses
as PostgreSQL does when it is down; the end-to-end outage is tests/test_sweep_postgres.py."""

from __future__ import annotations

import io
import types
from contextlib import redirect_stderr

import optuna
import pytest
from optuna.trial import TrialState

from pipeline import signals
from pipeline.sweep import outages

PG_DOWN = 'connection to server at "127.0.0.1", port 5432 failed: Connection refused'


class Refusing:
    """An Optuna storage that refuses its first ``n`` reads, as psycopg2 does while PostgreSQL is down."""

    def __init__(self, storage, n: float):
        self.storage, self.n = storage, n

    def get_study_id_from_name(self, name: str) -> int:
        if self.n > 0:
            self.n -= 1
            raise RuntimeError(PG_DOWN)
        return self.storage.get_study_id_from_name(name)


class Clock:
    def __init__(self, step: float):
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += self.step


def a_worker(tmp_path, refusals: float, clock: Clock, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(outages.time, "sleep", clock.sleep)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j")))
    study = optuna.create_study(study_name="s", storage=storage)
    c = MlflowClient(uri)
    exp = c.create_experiment("e")
    cut_trial, told = study.ask(), study.ask()
    cut_trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    run = c.create_run(exp, tags={"study": "s", "trial_number": str(cut_trial.number)})
    cut_trial.set_user_attr("mlflow_run_id", run.info.run_id)
    told_run = c.create_run(exp, tags={"study": "s", "trial_number": str(told.number)})
    c.set_terminated(told_run.info.run_id, "FINISHED")
    study.tell(told, 0.5)
    study.set_user_attr("mlflow_experiment_id", exp)
    worker = types.SimpleNamespace(
        spec={"worker": 3, "experiment_id": exp},
        storage=Refusing(storage, refusals),
        sw=types.SimpleNamespace(study="s"),
        study=study,
        mlflow_uri=uri,
        cut=[(cut_trial, PG_DOWN)],
        untagged=[(told_run.info.run_id, {"optuna_state": "COMPLETE"}, PG_DOWN)],
        signals_before=signals.received_count(),
        parent_gone=lambda: False,
        deadline=None,
    )
    return worker, c, run.info.run_id, told_run.info.run_id


def test_a_worker_waits_for_its_stores_then_closes_what_the_outage_cut(tmp_path, monkeypatch):
    clock = Clock(step=5.0)
    worker, c, cut_run, told_run = a_worker(tmp_path, refusals=3, clock=clock, monkeypatch=monkeypatch)
    err = io.StringIO()
    with redirect_stderr(err):
        assert outages.ride_out(worker, clock=clock) is None  # go on asking trials
    lines = err.getvalue().splitlines()
    assert lines == [
        f"worker 3: a store did not answer ({PG_DOWN}); waiting for it",
        "worker 3: the store answers again (after 15 s)",  # three refusals, 5 s each on the clock
    ], lines
    trials = worker.study.get_trials(deepcopy=False)
    cut = trials[0]
    assert cut.state == TrialState.FAIL and cut.user_attrs["error"] == f"a store did not answer ({PG_DOWN})"
    assert c.get_run(cut_run).info.status == "KILLED"
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == cut.number]
    assert retry.state == TrialState.WAITING and retry.params == cut.params
    assert c.get_run(told_run).data.tags["optuna_state"] == "COMPLETE"  # the tag the outage kept back
    assert trials[1].state == TrialState.COMPLETE and trials[1].value == 0.5  # a told trial is left alone
    assert worker.cut == [] and worker.untagged == []


def test_a_store_away_past_the_limit_ends_the_worker_in_one_line(tmp_path, monkeypatch):
    clock = Clock(step=60.0)
    worker, c, cut_run, _ = a_worker(tmp_path, refusals=float("inf"), clock=clock, monkeypatch=monkeypatch)
    err = io.StringIO()
    with redirect_stderr(err):
        assert outages.ride_out(worker, clock=clock) == 1
    lines = err.getvalue().splitlines()
    assert len(lines) == 2 and lines[1] == f"worker 3: {PG_DOWN}; no answer for 10 min, stopping", lines
    assert outages.OUTAGE_LIMIT_S < clock.t <= outages.OUTAGE_LIMIT_S + 2 * 60
    # the trial stays the worker's: once its process is gone the reapers close and retry it
    assert worker.study.get_trials(deepcopy=False)[0].state == TrialState.RUNNING
    assert c.get_run(cut_run).info.status == "RUNNING"


@pytest.mark.parametrize("why", ["parent", "deadline"])
def test_a_worker_waiting_for_its_stores_stops_with_its_sweep(tmp_path, monkeypatch, why):
    clock = Clock(step=5.0)
    worker, *_ = a_worker(tmp_path, refusals=float("inf"), clock=clock, monkeypatch=monkeypatch)
    if why == "parent":
        worker.parent_gone = lambda: True
    else:
        worker.deadline = 1.0  # long past
    with redirect_stderr(io.StringIO()):
        assert outages.ride_out(worker, clock=clock) == 0


def test_a_trial_is_cut_only_by_a_store_that_did_not_answer():
    worker = types.SimpleNamespace(cut=[])
    trial = types.SimpleNamespace(number=7)
    with redirect_stderr(io.StringIO()):
        assert not outages.cut(worker, trial, ValueError("lr must be positive"))
        assert worker.cut == []
        assert outages.cut(worker, trial, RuntimeError(PG_DOWN))
    assert worker.cut == [(trial, PG_DOWN)]


def test_a_trial_asked_but_not_owned_when_the_store_went_is_the_workers_to_close(tmp_path):
    """The outage came between ``ask`` and the owner's write: the trial, RUNNING with no owner, held its
    place in the budget for the orphan reaper's 120 s; a batched worker's trials asked before it, owned
    by a live worker, were no reaper's at all. The error carries them, and the worker cuts them all."""
    from pipeline.sweep import batch

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j")))
    study = optuna.create_study(study_name="s", storage=storage)
    real = storage.set_trial_user_attr
    calls = {"n": 0}

    def flaky(trial_id, key, value):
        calls["n"] += 1
        if calls["n"] == 3:  # the third trial's owner write
            raise RuntimeError(PG_DOWN)
        return real(trial_id, key, value)

    storage.set_trial_user_attr = flaky
    worker = types.SimpleNamespace(
        url=str(tmp_path / "j"), storage=storage, study=study, mlflow_uri=None, cut=[], met=None,
        sw=types.SimpleNamespace(study="s", n_trials=10), spec={"workers": 1},
    )  # fmt: skip
    with pytest.raises(RuntimeError) as info:
        batch.next_trials(worker, 4)
    assert outages.met(worker, info.value) and worker.met is info.value
    assert [t.number for t, _ in worker.cut] == [0, 1, 2] and {w for _, w in worker.cut} == {PG_DOWN}
    assert [t.user_attrs.get("worker") is None for t in study.get_trials()] == [False, False, True]
    assert not outages.met(worker, ValueError("not a store"))


def test_a_cut_trial_found_told_keeps_its_state_and_its_run_gets_the_outcome_tags(tmp_path, monkeypatch):
    """PostgreSQL made the tell's commit, then the connection went and the worker read an error: the
    trial is COMPLETE, its run FINISHED with no ``optuna_state`` (check_consistent failed on it). Closing
    it writes the tags the tell's step would have; it is neither failed nor retried."""
    clock = Clock(step=1.0)
    worker, c, cut_run, _ = a_worker(tmp_path, refusals=0, clock=clock, monkeypatch=monkeypatch)
    trial = worker.cut[0][0]
    trial.set_user_attr("diverged", False)
    c.set_terminated(cut_run, "FINISHED")
    worker.study.tell(trial, 0.25)
    with redirect_stderr(io.StringIO()):
        assert outages.ride_out(worker, clock=clock) is None
    tags = c.get_run(cut_run).data.tags
    assert (tags["optuna_state"], tags["optuna_value"], tags["diverged"]) == ("COMPLETE", "0.25", "false")
    assert c.get_run(cut_run).info.status == "FINISHED"
    trials = worker.study.get_trials(deepcopy=False)
    assert trials[0].state == TrialState.COMPLETE and "error" not in trials[0].user_attrs
    assert not [t for t in trials if "retry_of" in t.user_attrs]
