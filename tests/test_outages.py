"""A sweep worker waits out a store that does not answer (pipeline/sweep/outages.py): the trials the outage
cut are closed once the stores answer again (FAIL, attr ``error``, runs KILLED, params re-enqueued once),
the outcome tags it kept from a told trial's run are written, and a store away past the limit ends the
worker with one line. With real stores (an Optuna journal, MLflow's sqlite) behind a storage that refuses
as PostgreSQL does when it is down; the end-to-end outage is tests/test_sweep_postgres.py."""

from __future__ import annotations

import io
import os
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


def test_a_trial_is_cut_only_by_a_store_that_does_not_answer(tmp_path, monkeypatch):
    """An error that says "connection refused" is an outage only if the stores do not answer a read then:
    an unreachable data or artifact host says it too, and its trials cut, retried and uncounted would
    never stop a worker whose every trial fails (a review: 8 of 8 trials FAIL as "a store did not
    answer", the worker never stopping)."""
    clock = Clock(step=1.0)
    (tmp_path / "down").mkdir()
    (tmp_path / "up").mkdir()
    down, *_ = a_worker(tmp_path / "down", refusals=float("inf"), clock=clock, monkeypatch=monkeypatch)
    up, *_ = a_worker(tmp_path / "up", refusals=0, clock=clock, monkeypatch=monkeypatch)
    trial = types.SimpleNamespace(number=7)
    down.cut, up.cut = [], []
    with redirect_stderr(io.StringIO()):
        assert not outages.cut(down, trial, ValueError("lr must be positive"))
        assert not outages.cut(up, trial, RuntimeError(PG_DOWN))  # the stores answer: not theirs
        assert outages.cut(down, trial, RuntimeError(PG_DOWN))
    assert down.cut == [(trial, PG_DOWN)] and up.cut == []


@pytest.mark.parametrize("store", ["optuna", "mlflow"])
def test_a_store_that_goes_again_while_cut_trials_close_sends_the_worker_back_to_waiting(
    tmp_path, monkeypatch, store
):
    """The stores answered, then one went again in the middle of closing a cut trial: the trial was taken
    off the list all the same, left RUNNING (or FAIL with its run RUNNING for good) by a live worker no
    reaper takes for dead (a review). It stays on the list until it is closed."""
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    clock = Clock(step=5.0)
    worker, c, cut_run, _ = a_worker(tmp_path, refusals=1, clock=clock, monkeypatch=monkeypatch)
    fails = {"n": 1}
    if store == "optuna":
        real = worker.study._storage.get_trial

        def get_trial(trial_id):
            if fails["n"]:
                fails["n"] -= 1
                raise RuntimeError(PG_DOWN)
            return real(trial_id)

        monkeypatch.setattr(worker.study._storage, "get_trial", get_trial)
    else:  # MLflow's store refuses the run's close; close_trial_runs swallows MlflowException
        real_end = tracking.end_run

        def end_run(uri, run_id, status):
            if fails["n"]:
                fails["n"] -= 1
                raise MlflowException(PG_DOWN)
            return real_end(uri, run_id, status)

        monkeypatch.setattr(tracking, "end_run", end_run)
    with redirect_stderr(io.StringIO()):
        assert outages.ride_out(worker, clock=clock) is None
    assert fails["n"] == 0 and worker.cut == []
    trials = worker.study.get_trials(deepcopy=False)
    assert trials[0].state == TrialState.FAIL and c.get_run(cut_run).info.status == "KILLED"
    assert len([t for t in trials if t.user_attrs.get("retry_of") == 0]) == 1


def test_a_close_repeated_after_a_partial_one_retries_the_params_once(tmp_path, monkeypatch):
    """The first close told the trial FAIL (or PostgreSQL made that commit as the connection went) and
    the store went before the retry was enqueued: the next close enqueues it, and a third adds none."""
    clock = Clock(step=1.0)
    worker, c, cut_run, _ = a_worker(tmp_path, refusals=0, clock=clock, monkeypatch=monkeypatch)
    trial = worker.cut[0][0]
    trial.set_user_attr("error", f"{outages.OUTAGE_ERROR} ({PG_DOWN})")
    c.set_terminated(cut_run, "KILLED")
    worker.study.tell(trial, state=TrialState.FAIL)
    for _ in range(2):
        outages.close_cut(worker.study, worker.mlflow_uri, trial, PG_DOWN)
    retries = [t for t in worker.study.get_trials(deepcopy=False) if t.user_attrs.get("retry_of") == 0]
    assert len(retries) == 1 and retries[0].params == trial.params


def test_a_trial_cut_in_the_middle_of_its_sampling_is_retried_with_what_it_drew(tmp_path, monkeypatch):
    """CI caught the outage between two of a trial's suggests: it had drawn ``model.cell`` alone. Its retry
    keeps that draw and draws the rest as any trial does (the values it never drew cannot be asked again),
    so the retry trains a full set of params, not the base config's values for the rest."""
    from pipeline.sweep.space import Param
    from pipeline.sweep.study import suggest

    clock = Clock(step=1.0)
    worker, *_ = a_worker(tmp_path, refusals=0, clock=clock, monkeypatch=monkeypatch)
    space = (
        Param("model.cell", "categorical", choices=("tanh", "gru")),
        Param("model.init_scale", "float", low=0.1, high=3.0, log=True),
        Param("lr", "float", low=1e-3, high=1e-1, log=True),
    )
    cut = worker.study.ask()
    drawn = suggest(cut, space[0])  # the store went here, before the trial's second suggest
    with redirect_stderr(io.StringIO()):
        outages.close_cut(worker.study, worker.mlflow_uri, cut, PG_DOWN)
    told = worker.study._storage.get_trial(cut._trial_id)
    assert told.state == TrialState.FAIL and told.params == {"model.cell": drawn}
    (retry,) = [
        t for t in worker.study.get_trials(deepcopy=False) if t.user_attrs.get("retry_of") == cut.number
    ]
    assert retry.state == TrialState.WAITING and retry.params == {"model.cell": drawn}
    asked = worker.study.ask()
    assert asked.number == retry.number  # the waiting retry is the next trial asked
    values = {p.key: suggest(asked, p) for p in space}
    assert values["model.cell"] == drawn and set(values) == {p.key for p in space}


def test_a_sigterm_while_a_cut_trial_closes_waits_for_the_close(tmp_path, monkeypatch):
    """A stop between the close's writes (FAIL told, retry not yet enqueued) lost the params (a review):
    the close is one step for SIGTERM (pipeline.signals.deferred), and the signal is raised after it."""
    import signal

    from pipeline.signals import Terminated, raise_terminated
    from pipeline.sweep import owners

    clock = Clock(step=1.0)
    worker, *_ = a_worker(tmp_path, refusals=0, clock=clock, monkeypatch=monkeypatch)
    real = owners.enqueue_retry

    def enqueue_retry(study, trial):
        os.kill(os.getpid(), signal.SIGTERM)  # the stop arrives between the tell and the enqueue
        return real(study, trial)

    monkeypatch.setattr(owners, "enqueue_retry", enqueue_retry)
    before = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        with redirect_stderr(io.StringIO()), pytest.raises(Terminated):
            outages.ride_out(worker, clock=clock)
    finally:
        signal.signal(signal.SIGTERM, before)
    retries = [t for t in worker.study.get_trials(deepcopy=False) if t.user_attrs.get("retry_of") == 0]
    assert len(retries) == 1


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


@pytest.mark.parametrize("state", ["COMPLETE", "PRUNED"])
def test_a_cut_trial_found_told_keeps_its_state_and_its_run_gets_the_outcome_tags(
    tmp_path, monkeypatch, state
):
    """PostgreSQL made the tell's commit, then the connection went and the worker read an error: the
    trial is COMPLETE, its run FINISHED with no ``optuna_state`` (check_consistent failed on it). Closing
    it writes the tags the tell's step would have; it is neither failed nor retried. A pruned trial's
    ``optuna_value`` is its last reported value, as ``pipeline.sweep.record.tell`` writes it."""
    clock = Clock(step=1.0)
    worker, c, cut_run, _ = a_worker(tmp_path, refusals=0, clock=clock, monkeypatch=monkeypatch)
    trial = worker.cut[0][0]
    trial.set_user_attr("diverged", False)
    c.set_terminated(cut_run, "FINISHED")
    if state == "PRUNED":
        trial.report(0.25, 10)
        worker.study.tell(trial, state=TrialState.PRUNED)
    else:
        worker.study.tell(trial, 0.25)
    with redirect_stderr(io.StringIO()):
        assert outages.ride_out(worker, clock=clock) is None
    tags = c.get_run(cut_run).data.tags
    assert (tags["optuna_state"], tags["optuna_value"], tags["diverged"]) == (state, "0.25", "false")
    assert c.get_run(cut_run).info.status == "FINISHED"
    trials = worker.study.get_trials(deepcopy=False)
    assert trials[0].state == TrialState[state] and "error" not in trials[0].user_attrs
    assert not [t for t in trials if "retry_of" in t.user_attrs]


def test_the_trials_a_batched_stacks_refill_asked_when_the_store_went_are_cut(tmp_path, monkeypatch):
    """A rolling stack refills its free slots between steps (pipeline/sweep/batch.py): the outage came
    while it asked three trials. The stack's handler failed only its members; the trials the refill had
    asked (owned by this live worker) and the one it could not own stayed RUNNING (a review). Every one
    of them is now cut, and closed with the members once the stores answer."""
    import pipeline.training.stacked as stacked
    from pipeline.sweep import batch
    from pipeline.sweep.owners import ask_owned

    clock = Clock(step=1.0)
    worker, c, _, _ = a_worker(tmp_path, refusals=float("inf"), clock=clock, monkeypatch=monkeypatch)
    study = worker.study
    worker.cut, worker.untagged, worker.met, worker.k, worker.url = [], [], None, 4, str(tmp_path / "j")
    worker.spec.update({"workers": 1, "parent_run_id": None})
    worker.sw.n_trials = 10
    worker.sw.heartbeat = types.SimpleNamespace(interval=60)
    worker.sw.prune = types.SimpleNamespace(max_grad_norm=None)
    worker.trial_run_config = lambda t: "cfg"
    first = ask_owned(study)
    real = study._storage.set_trial_user_attr
    owners_written = {"n": 0}

    def flaky(trial_id, key, value):
        if key == "worker":
            owners_written["n"] += 1
            if owners_written["n"] == 3:  # the refill's second trial: asked, its owner refused
                raise RuntimeError(PG_DOWN)
        return real(trial_id, key, value)

    monkeypatch.setattr(study._storage, "set_trial_user_attr", flaky)
    monkeypatch.setattr(stacked, "stack_key", lambda cfg: 0)
    monkeypatch.setattr(batch._Group, "callback", lambda self, t, cfg: None)
    monkeypatch.setattr(stacked, "run_stack", lambda cfgs, refill=None, **kw: refill(3))
    with redirect_stderr(io.StringIO()):
        assert batch.run_batch(worker, [first]) is False
    asked = [t.number for t in study.get_trials(deepcopy=False) if t.number > first.number]
    assert len(asked) == 3  # two owned, the third not
    assert (
        sorted(t.number for t, _ in worker.cut) == sorted([first.number, *asked]) and worker.met is not None
    )
    worker.storage.n = 0  # the stores answer again
    with redirect_stderr(io.StringIO()):
        assert outages.ride_out(worker, clock=clock) is None
    closed = [t for t in study.get_trials(deepcopy=False) if t.number in [first.number, *asked]]
    assert all(t.state == TrialState.FAIL for t in closed), [(t.number, t.state) for t in closed]


def test_a_trial_a_reaper_failed_while_the_worker_trained_it_does_not_end_the_worker(tmp_path, monkeypatch):
    """PostgreSQL away longer than ``heartbeat.grace``: when it came back, a heartbeat reaper failed the
    trial a worker was still training, and retried it; the worker's tell raised UpdateFinishedTrialError
    and the worker died with a traceback (a review). It now says so in one line, closes the trial's run
    KILLED as the reaper would have, and goes on (True: not an error of the trial)."""
    import pipeline.training.run as train
    from pipeline.sweep.worker import Worker

    clock = Clock(step=1.0)
    fake, c, _, _ = a_worker(tmp_path, refusals=0, clock=clock, monkeypatch=monkeypatch)
    study = fake.study
    worker = Worker.__new__(Worker)
    worker.spec, worker.study, worker.storage, worker.mlflow_uri = (
        fake.spec,
        study,
        fake.storage,
        fake.mlflow_uri,
    )
    worker.cut, worker.met, worker.untagged, worker.signals_before = [], None, [], signals.received_count()
    worker.spec["parent_run_id"] = None
    worker.sw = types.SimpleNamespace(
        study="s", penalty=2.0, log_models="none", heartbeat=types.SimpleNamespace(interval=10),
        prune=types.SimpleNamespace(max_grad_norm=None),
    )  # fmt: skip
    worker.trial_run_config = lambda t: types.SimpleNamespace(trainer=types.SimpleNamespace(log_every=10))
    trial = study.ask()
    run = c.create_run(worker.spec["experiment_id"], tags={"study": "s", "trial_number": str(trial.number)})
    trial.set_user_attr("mlflow_run_id", run.info.run_id)

    def fake_run(cfg, on_done=None, **kw):
        study.tell(trial.number, state=TrialState.FAIL)  # the reaper, as PostgreSQL came back
        c.set_terminated(run.info.run_id, "FINISHED")  # the run closed, its trial not yet told
        on_done(types.SimpleNamespace(run_id=run.info.run_id, regime="healthy", solved=False, steps=40,
                                      val_loss_ratio=0.5, metrics={}, diverged_step=None, pruned=False))  # fmt: skip

    monkeypatch.setattr(train, "run", fake_run)
    err = io.StringIO()
    with redirect_stderr(err):
        assert worker.run_trial(trial) is True
    assert "was failed by a reaper while this worker held it" in err.getvalue()
    assert c.get_run(run.info.run_id).info.status == "KILLED"
    assert study.get_trials(deepcopy=False)[trial.number].state == TrialState.FAIL


def test_the_end_of_a_sweep_closes_the_finished_trials_runs_in_one_paged_search(tmp_path, monkeypatch):
    """A close per finished trial (a search and a read each) took 138 s at the end of a 5,000-trial
    study, with no word (a scale probe). One paged search for the study's RUNNING runs closes those whose
    trial is finished, and leaves a run whose trial still trains (another machine's worker) alone."""
    from mlflow.tracking import MlflowClient

    from pipeline.sweep import owners

    study, c, exp, uri = _study_and_store(tmp_path, "s")
    runs = {}
    for n, (state, status) in enumerate(
        [("COMPLETE", "RUNNING"), ("FAIL", "RUNNING"), ("RUNNING", "RUNNING"), ("COMPLETE", "FINISHED"),
         ("PRUNED", "RUNNING"), ("FAIL", "RUNNING")]
    ):  # fmt: skip
        t = study.ask()
        runs[n] = c.create_run(exp, tags={"study": "s", "trial_number": str(t.number)}).info.run_id
        if status != "RUNNING":
            c.set_terminated(runs[n], status)
        if state != "RUNNING":
            study.tell(t, 0.5 if state == "COMPLETE" else None, state=getattr(TrialState, state))
    other = c.create_run(exp, tags={"study": "another", "trial_number": "0"}).info.run_id
    pages = []
    real = MlflowClient.search_runs
    monkeypatch.setattr(owners, "SEARCH_PAGE", 2)
    monkeypatch.setattr(
        MlflowClient, "search_runs", lambda self, *a, **k: pages.append(1) or real(self, *a, **k)
    )
    closed = owners.close_finished_trials_runs(uri, study)
    assert sorted(closed) == sorted(runs[n] for n in (0, 1, 4, 5))
    assert len(pages) == 3  # 5 RUNNING runs of the study, 2 a page: not a search per trial
    status = {n: c.get_run(r).info.status for n, r in runs.items()}
    assert status == {0: "KILLED", 1: "KILLED", 2: "RUNNING", 3: "FINISHED", 4: "KILLED", 5: "KILLED"}
    assert c.get_run(other).info.status == "RUNNING" and c.get_run(runs[0]).data.tags["status"] == "killed"


def test_a_database_drivers_own_error_is_an_outage_whatever_a_probe_finds_now(tmp_path, monkeypatch):
    """Optuna's PostgreSQL pool keeps connections a fast restart closed: the first write after it fails
    ("server closed the connection unexpectedly") while a fresh probe finds the server back. The probe
    then failed the trial, counted toward the three errors in a row (a review). A database driver's own
    error is its store's: the trial is cut without a probe."""
    clock = Clock(step=1.0)
    worker, *_ = a_worker(tmp_path, refusals=0, clock=clock, monkeypatch=monkeypatch)
    worker.cut = []

    class OperationalError(Exception):
        pass

    OperationalError.__module__ = "psycopg2"  # the class psycopg2 raises, as its module names it
    closed = "server closed the connection unexpectedly"
    trial = types.SimpleNamespace(number=4)
    with redirect_stderr(io.StringIO()):
        assert outages.cut(worker, trial, OperationalError(closed))
        assert not outages.cut(worker, trial, ConnectionError("Connection refused"))  # a data host's
    assert worker.cut == [(trial, closed)]


def test_one_outage_meets_a_stacks_members_with_one_probe(tmp_path, monkeypatch):
    """A stack of K members failed by one outage probed the stores K times (a review: 32 probes for one
    outage, each up to libpq's 10 s connect bound): a probe's answer stands PROBE_FRESH_S seconds."""
    clock = Clock(step=1.0)
    worker, *_ = a_worker(tmp_path, refusals=float("inf"), clock=clock, monkeypatch=monkeypatch)
    worker.cut = []
    calls = []
    real = outages.probe
    monkeypatch.setattr(outages, "probe", lambda w: calls.append(1) or real(w))
    with redirect_stderr(io.StringIO()):
        for k in range(32):
            assert outages.cut(worker, types.SimpleNamespace(number=k), ConnectionError("Connection refused"))
    assert len(calls) == 1 and len(worker.cut) == 32


def test_a_cut_trial_whose_run_cannot_be_closed_is_still_failed_and_retried(tmp_path, monkeypatch):
    """The run was deleted while its trial was cut: the close found it RUNNING with both stores answering,
    and waited for them 10 minutes, then stopped the worker (a review). The trial is failed and retried
    all the same, and the worker goes on."""
    clock = Clock(step=1.0)
    worker, c, cut_run, _ = a_worker(tmp_path, refusals=0, clock=clock, monkeypatch=monkeypatch)
    c.delete_run(cut_run)
    err = io.StringIO()
    with redirect_stderr(err):
        assert outages.ride_out(worker, clock=clock) is None
    assert clock.t < 60 and f"its run {cut_run} could not be closed" in err.getvalue()
    trials = worker.study.get_trials(deepcopy=False)
    assert (
        trials[0].state == TrialState.FAIL
        and len([t for t in trials if t.user_attrs.get("retry_of") == 0]) == 1
    )


def test_the_end_of_a_sweep_closes_the_runs_of_a_study_whose_name_has_a_quote(tmp_path):
    """A study named ``bob's`` passed validation, but the end's search filter was invalid, and its
    finished trials' runs stayed RUNNING (a review). Quoted as MLflow's filter grammar wants it."""
    from pipeline.sweep import owners

    study, c, exp, uri = _study_and_store(tmp_path, "bob's")
    t = study.ask()
    run = c.create_run(exp, tags={"study": "bob's", "trial_number": str(t.number)}).info.run_id
    study.tell(t, 0.5)
    assert owners.close_finished_trials_runs(uri, study) == [run]
    assert c.get_run(run).info.status == "KILLED"


def _study_and_store(tmp_path, name: str):
    """A journal study ``name`` and a sqlite MLflow store whose experiment the study names."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j")))
    study = optuna.create_study(study_name=name, storage=storage)
    c = MlflowClient(uri)
    exp = c.create_experiment("e")
    study.set_user_attr("mlflow_experiment_id", exp)
    return study, c, exp, uri
