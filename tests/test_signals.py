"""SIGTERM is not lost when Python drops its handler's exception (pipeline/signals.py): a handler that runs
inside a ``__del__`` or a weakref callback of the garbage collector raises there, Python prints
"Exception ignored in ..." and goes on. Seen in a 2-worker sweep stopped by SIGTERM: a worker trained on
until its parent killed it 60 s later. The signal is kept and raised again at the next training step,
or when the block that installed the handler ends.
"""

from __future__ import annotations

import contextlib
import signal

import pytest
import pytorch_lightning as pl
from mlflow.tracking import MlflowClient

from pipeline.signals import Terminated, check_terminated, deferred, terminate_as_exception

# the dropped exception is the point: pytest reports it as an unraisable-exception warning
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class SignalInDel:
    """An object whose finaliser receives SIGTERM: the handler's exception is raised inside ``__del__``,
    where Python drops it."""

    def __del__(self):
        signal.raise_signal(signal.SIGTERM)


def _drop_a_sigterm() -> None:
    SignalInDel()  # collected at once (reference count 0): the exception is printed and dropped here


def _drop_then_check(reached: list) -> None:
    with terminate_as_exception():
        _drop_a_sigterm()
        reached.append(True)  # Python went on: the handler's exception did not arrive
        check_terminated()
        reached.append(False)


def test_a_dropped_sigterm_is_raised_at_the_next_check():
    reached: list = []
    with pytest.raises(Terminated):
        _drop_then_check(reached)
    assert reached == [True]
    check_terminated()  # delivered: nothing pending any more


def test_a_dropped_sigterm_is_raised_when_its_block_ends():
    with pytest.raises(Terminated), terminate_as_exception():
        _drop_a_sigterm()
    check_terminated()


def test_a_block_without_a_signal_leaves_nothing_pending():
    with terminate_as_exception():
        check_terminated()
    check_terminated()


def test_a_sigterm_raised_where_it_arrived_is_not_raised_again():
    """The handler's exception reached its block (not dropped): the kept signal is gone with it, so a
    process that handles it (a notebook calling ``run`` again, a worker closing its trial) is not
    terminated a second time by the next check or the end of the next deferred step (mutation review)."""
    with pytest.raises(Terminated), terminate_as_exception():
        signal.raise_signal(signal.SIGTERM)
    check_terminated()
    with deferred():
        pass


def _nested_deferred(reached: list) -> None:
    with terminate_as_exception(), deferred():
        with deferred():  # nested: the outermost block's end raises
            signal.raise_signal(signal.SIGTERM)
            check_terminated()  # no-op while deferred
            reached.append(1)
        reached.append(2)
    reached.append(3)


def test_a_sigterm_in_a_deferred_block_is_raised_when_the_block_ends():
    reached: list = []
    with pytest.raises(Terminated):
        _nested_deferred(reached)
    assert reached == [1, 2]
    check_terminated()


def _signal_then_error() -> None:
    with deferred():
        signal.raise_signal(signal.SIGTERM)
        raise ValueError("the block's own error")


def _error_in_deferred() -> None:
    with terminate_as_exception():
        with pytest.raises(ValueError, match="own error"):
            _signal_then_error()
        check_terminated()  # the kept signal: raised at the next check


def test_an_error_in_a_deferred_block_unwinds_as_it_would_have():
    with pytest.raises(Terminated):
        _error_in_deferred()
    check_terminated()


def _terminate_block_inside_deferred(reached: list) -> None:
    with terminate_as_exception(), deferred():
        with terminate_as_exception():  # e.g. run() called inside a deferred step
            signal.raise_signal(signal.SIGTERM)
        reached.append(1)  # the deferred step goes on to its end
    reached.append(2)


def test_a_terminate_block_inside_a_deferred_block_leaves_the_signal_to_it():
    reached: list = []
    with pytest.raises(Terminated):
        _terminate_block_inside_deferred(reached)
    assert reached == [1]
    check_terminated()


class DropAt:
    """A callback whose ``on_train_batch_end`` at ``step`` drops a SIGTERM (as a garbage-collector callback
    would), and counts the steps that began after it."""

    def __init__(self, step: int):
        self.step, self.after = step, 0
        self.dropped = False

    def __getattr__(self, hook):  # every other Lightning hook: nothing to do
        return lambda *a, **k: None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.dropped:
            self.after += 1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.dropped:
            self.dropped = True
            _drop_a_sigterm()


def test_a_stack_stops_at_the_next_step_after_a_dropped_sigterm_and_closes_every_run_killed(store, tiny):
    from pipeline.training import stacked

    cfgs = [tiny(**{"seed": i, "trainer.max_steps": 60}) for i in range(3)]
    drop = DropAt(5)
    with pytest.raises(Terminated):
        stacked.run_stack(cfgs, callbacks=[[drop], [], []])
    assert drop.dropped and drop.after == 0  # no step began after the signal
    runs = MlflowClient(store).search_runs([MlflowClient(store).get_experiment_by_name("test").experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"KILLED"}


def test_a_lightning_run_stops_after_a_dropped_sigterm_and_closes_its_run_killed(store, tiny):
    import pytorch_lightning as pl

    from pipeline.training.run import run

    class Drop(pl.Callback):
        def __init__(self):
            self.dropped, self.after = False, 0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if self.dropped:
                self.after += 1

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 5 and not self.dropped:
                self.dropped = True
                _drop_a_sigterm()

    drop = Drop()
    # Lightning's own SIGTERM handler runs before ours and keeps the signal too: its fit raises
    # SIGTERMException (a SystemExit) at the end of that step; our training_step check is the second line
    with pytest.raises((Terminated, SystemExit)):
        run(tiny(**{"trainer.max_steps": 60}), callbacks=[drop])
    assert drop.dropped and drop.after <= 1
    check_terminated()  # nothing left pending for the next run in this process
    (r,) = MlflowClient(store).search_runs([MlflowClient(store).get_experiment_by_name("test").experiment_id])
    assert r.info.status == "KILLED"


# ------------------------------------------------------------------ a SIGTERM between two store writes
# A sweep worker's trial passes through steps that must not be cut in two by a signal: asked, then owned
# (its ``worker`` attr: how this worker's handlers and the reapers find it); its run closed FINISHED, then
# told. pipeline.signals.deferred keeps SIGTERM until such a step ends, and Worker.run releases any trial
# the worker still owns when the signal unwinds (pipeline.sweep.owners.release_own). Each test sends the
# signal inside one such step, in a worker running in this process on real stores.


def _worker(tmp_path, k: int, **changes):
    """A sweep worker in this process (as the sweep parent's spec makes one) on fresh embedded stores."""
    from pipeline.sweep.config import load_sweep
    from pipeline.sweep.parent import absolute_uri, create_stores
    from pipeline.sweep.worker import Worker
    from pipeline.uris import resolve_uri
    from tests.test_sweep import write_sweep

    path = write_sweep(tmp_path / "s.yaml", trials_per_worker=k, **changes)
    sw = load_sweep(path)
    mlflow_uri = absolute_uri(resolve_uri(sw.base_config().tracking.uri))
    st = create_stores(sw, sw.storage_url(), mlflow_uri)
    spec = {
        "sweep": __import__("pipeline.sweep.config", fromlist=["to_data"]).to_data(sw),
        "storage_url": st.url,
        "mlflow_uri": st.mlflow_uri,
        "experiment": st.experiment,
        "experiment_id": st.experiment_id,
        "parent_run_id": st.parent_run_id,
        "deadline": None,
        "worker": 0,
        "gpu": None,
        "workers": 1,
    }
    return Worker(spec)


def _stop_in(monkeypatch, owner, name: str, after: bool | None = True) -> list:
    """``owner.name`` sends this process SIGTERM right after (or before) its first call's work (None:
    never; the calls are counted)."""
    calls: list = []
    f = getattr(owner, name)

    def g(*a, **kw):
        first = not calls
        calls.append(name)
        if first and after is False:
            signal.raise_signal(signal.SIGTERM)
        out = f(*a, **kw)
        if first and after is True:
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(owner, name, g)
    return calls


def _run_to_sigterm(w) -> None:
    with pytest.raises(Terminated), terminate_as_exception():
        w.run()
    check_terminated()  # delivered once, nothing left pending


def _trial_runs(store):
    from tests.test_sweep import mlflow_runs

    return {
        int(r.data.tags["trial_number"]): r
        for r in mlflow_runs(store)
        if r.data.tags.get("pipeline.kind") == "trial"
    }


def _nothing_left_running(study, store) -> None:
    assert [t.number for t in study.get_trials() if t.state.name == "RUNNING"] == []
    assert [n for n, r in _trial_runs(store).items() if r.info.status == "RUNNING"] == []


@pytest.mark.parametrize("second", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_a_sigterm_as_a_trial_is_asked_leaves_it_owned_then_closed_interrupted(
    store, tmp_path, monkeypatch, k, second
):
    """The signal arrives the moment ``ask`` returns, before the trial's owner is written: the worker
    still writes it, then releases the trial (FAIL, interrupted, re-enqueued once): no trial is left
    RUNNING for a reaper to find later; also when a second SIGTERM arrives during that release (the
    sweep parent forwards every signal it gets)."""
    import optuna

    from pipeline.sweep import owners

    w = _worker(tmp_path, k)
    _stop_in(monkeypatch, optuna.Study, "ask")
    if second:
        _stop_in(monkeypatch, owners, "close_trial_runs", after=False)
    _run_to_sigterm(w)
    study = w.study
    _nothing_left_running(study, store)
    (t,) = [t for t in study.get_trials() if t.state.name == "FAIL"]
    assert t.user_attrs["interrupted"] is True and t.user_attrs["worker"]
    (retry,) = [x for x in study.get_trials() if x.user_attrs.get("retry_of") == t.number]
    assert retry.state.name == "WAITING" and retry.params == t.params


def _stop_at_first_finished_close(monkeypatch) -> None:
    """The first run closed FINISHED receives SIGTERM as its close begins."""
    from pipeline.tracking import Recorder

    close, sent = Recorder.close, []

    def g(self, status: str = "FINISHED"):
        if status == "FINISHED" and not sent:
            sent.append(True)
            signal.raise_signal(signal.SIGTERM)
        return close(self, status)

    monkeypatch.setattr(Recorder, "close", g)


def test_a_trials_own_system_exit_is_no_stop_the_user_asked_for_and_gets_one_retry(
    store, tmp_path, monkeypatch
):
    """A ``sys.exit()`` inside a trial's own code (a library's) ends the worker as a stop does, but the
    user asked for none: its point is retried once, as a killed worker's, not re-enqueued after every
    exit for ever (a review of the free retry of interrupts). A Ctrl-C or SIGTERM stays free."""
    from optuna.trial import TrialState

    import pipeline.training.run as train
    from pipeline.signals import received_count
    from pipeline.sweep.owners import asked_stop

    since = received_count()
    assert not asked_stop(SystemExit(1), since)
    assert asked_stop(KeyboardInterrupt(), since) and asked_stop(Terminated("signal 15"), since)

    def exits(*a, **kw):
        raise SystemExit(1)

    monkeypatch.setattr(train, "run", exits)
    w = _worker(tmp_path, 1, n_trials=3, sampler={"name": "random", "seed": 0})
    exited = []
    for _ in range(3):
        t = w.next_trial()
        with pytest.raises(SystemExit):
            w.run_trial(t)
        exited.append(t.number)
    trials = w.study.get_trials()
    retries = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    assert retries == {exited[0]: exited[1], exited[2]: trials[-1].number}  # the retry's exit: none
    assert all(trials[n].state == TrialState.FAIL for n in exited)
    assert trials[-1].state == TrialState.WAITING and trials[-1].number not in exited


@pytest.mark.parametrize("where", ["tell", "close"])
@pytest.mark.parametrize("k", [1, 3])
def test_a_sigterm_as_a_finished_trial_is_told_tells_it_complete_first(
    store, tmp_path, monkeypatch, k, where
):
    """The signal arrives as a trial's run closes FINISHED, or after, before its trial is told: the tell
    completes (COMPLETE, as its run says), and the trials still training close KILLED and interrupted."""
    from pipeline.sweep import record

    w = _worker(tmp_path, k, n_trials=3, pruner={"name": "none"})
    if where == "tell":
        _stop_in(monkeypatch, record, "log_best_model", after=False)  # as the tell starts
    else:
        _stop_at_first_finished_close(monkeypatch)
    _run_to_sigterm(w)
    study, runs = w.study, _trial_runs(store)
    _nothing_left_running(study, store)
    states = {t.number: t.state.name for t in study.get_trials() if "retry_of" not in t.user_attrs}
    (first,) = [n for n, s in states.items() if s == "COMPLETE"]
    assert runs[first].info.status == "FINISHED" and "interrupted" not in study.trials[first].user_attrs
    interrupted = [n for n, s in states.items() if s == "FAIL"]
    for n in interrupted:  # its stack-mates (K = 3)
        assert study.trials[n].user_attrs["interrupted"] is True and runs[n].info.status == "KILLED"
    assert len(interrupted) == k - 1
    for n, s in states.items():  # the rest never started: start-up points still enqueued
        if n != first and n not in interrupted:
            assert s == "WAITING" and n not in runs


def _store_error_after_a_sigterm(monkeypatch, where: str) -> None:
    """A SIGTERM whose exception a store error replaces, as a new-user review saw when a SIGTERM found a
    worker's write waiting on a lock another process held on the MLflow store (SQLAlchemy's ``database is
    locked`` after MLflow's 20 s busy timeout, the Terminated only in its context). ``close``: the first
    run closed FINISHED meets the signal, then fails; ``metrics``: the first metric write in training
    does; ``killed-close``: the signal comes as Terminated at the first metric write in training, and the
    first run closed KILLED then fails."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import Recorder

    close, log_metrics, sent, signalled = Recorder.close, Recorder.log_metrics, [], []
    locked = MlflowException("(sqlite3.OperationalError) database is locked")

    def replaced() -> None:
        with contextlib.suppress(Terminated):  # the library's handler drops it ...
            signal.raise_signal(signal.SIGTERM)
        raise locked  # ... for its own

    def g(self, status: str = "FINISHED"):
        if not sent and (where, status) in (("close", "FINISHED"), ("killed-close", "KILLED")):
            sent.append(True)
            if where == "close":
                replaced()
            raise locked
        return close(self, status)

    def m(self, metrics, step):
        if step > 0 and not signalled and where != "close":
            signalled.append(True)
            if where == "metrics":
                replaced()
            signal.raise_signal(signal.SIGTERM)
        return log_metrics(self, metrics, step)

    monkeypatch.setattr(Recorder, "close", g)
    monkeypatch.setattr(Recorder, "log_metrics", m)


@pytest.mark.parametrize("where", ["close", "metrics", "killed-close"])
@pytest.mark.parametrize("k", [1, 3])
def test_a_sigterm_whose_exception_a_store_error_replaced_still_interrupts(
    store, tmp_path, monkeypatch, k, where
):
    """After a SIGTERM, a trial that an error ended is interrupted (FAIL, attr interrupted, its params
    re-enqueued once), not failed with the error, its run KILLED; the worker stops and asks no new trial
    (it told that trial FAIL with the error, lost its params, and a stack's worker went on asking)."""
    import optuna

    w = _worker(tmp_path, k, n_trials=6, pruner={"name": "none"})
    asked = _stop_in(monkeypatch, optuna.Study, "ask", after=None)  # counts the asks, sends nothing
    _store_error_after_a_sigterm(monkeypatch, where)
    _run_to_sigterm(w)
    study, runs = w.study, _trial_runs(store)
    _nothing_left_running(study, store)
    assert len(asked) == k  # the first stack's, none after the signal
    failed = [t for t in study.get_trials() if t.state.name == "FAIL"]
    assert len(failed) == k and not [t for t in study.get_trials() if "error" in t.user_attrs]
    assert {t.state.name for t in study.get_trials() if t not in failed} == {"WAITING"}  # none started
    for t in failed:
        assert t.user_attrs["interrupted"] is True and runs[t.number].info.status == "KILLED"
        (retry,) = [x for x in study.get_trials() if x.user_attrs.get("retry_of") == t.number]
        assert retry.state.name == "WAITING" and retry.params == t.params


@pytest.mark.parametrize("where", ["_start_recorder", "_member"])
def test_a_sigterm_as_a_members_run_is_created_closes_that_run_killed(store, tiny, monkeypatch, where):
    """The signal arrives right after a member's MLflow run is created, or its member built, before the
    stack holds it: the stack closes it KILLED with the others."""
    from pipeline.training import stacked

    _stop_in(monkeypatch, stacked, where)
    with pytest.raises(Terminated), terminate_as_exception():
        stacked.run_stack([tiny(**{"seed": i}) for i in range(2)])
    check_terminated()
    runs = MlflowClient(store).search_runs([MlflowClient(store).get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "KILLED"
    assert runs[0].data.tags["status"] == "killed"


def test_a_sigterm_as_a_lightning_run_is_created_closes_it_killed(store, tiny, monkeypatch):
    """The signal arrives right after ``run`` creates its MLflow run, before training begins: the run is
    closed KILLED (SIGTERM deferred while the run opens)."""
    from pipeline.training import run as train

    _stop_in(monkeypatch, train, "_start_recorder")
    with pytest.raises(Terminated):
        train.run(tiny())
    check_terminated()
    (r,) = MlflowClient(store).search_runs([MlflowClient(store).get_experiment_by_name("test").experiment_id])
    assert r.info.status == "KILLED" and r.data.tags["status"] == "killed"


_SIGTERM_AT = """
import signal, sys
from pipeline.training import record, stacked
from pipeline.training.run import run
from tests.conftest import tiny_config

def at(f):
    def g(*a, **kw):
        out = f(*a, **kw)
        signal.raise_signal(signal.SIGTERM)
        return out
    return g

where, path = sys.argv[1], sys.argv[2]
setattr(record, where, at(getattr(record, where)))
if path == "lightning":
    run(tiny_config())
else:
    stacked.run_stack([tiny_config(**{"seed": i}) for i in range(2)])
"""


@pytest.mark.parametrize("path", ["lightning", "stack"])
@pytest.mark.parametrize("where", ["record_start", "record_end"])
def test_a_sigterm_outside_the_training_loop_closes_the_run_killed(store, tmp_path, path, where):
    """A process that installed no SIGTERM handler of its own (``pipeline train``, a user's script):
    the signal arrives as a run starts to record or as it records its end, outside the training loop.
    The run is closed KILLED and the process exits by the exception, never killed with its run
    RUNNING (the default action, before SIGTERM was an exception for the run's whole life)."""
    import subprocess
    import sys

    from tests.test_sweep import sweep_env

    p = subprocess.run(
        [sys.executable, "-c", _SIGTERM_AT, where, path],
        capture_output=True,
        text=True,
        timeout=300,
        env=sweep_env(),
        cwd=tmp_path,
    )
    assert p.returncode == 1 and "Terminated" in p.stderr, (p.returncode, p.stderr[-2000:])
    runs = MlflowClient(store).search_runs([MlflowClient(store).get_experiment_by_name("test").experiment_id])
    assert runs and {r.info.status for r in runs} == {"KILLED"}
    assert {r.data.tags["status"] for r in runs} == {"killed"}


class _FailAt(pl.Callback):
    """Raises ``error`` at a step: a run ended by an error of its own."""

    def __init__(self, step: int, error: BaseException):
        self.step, self.error = step, error

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise self.error


def test_a_handled_sigterm_does_not_turn_a_later_runs_error_into_a_stop(store, tiny):
    """A process that handled a SIGTERM and goes on (a notebook, a script that catches Terminated)
    records its next run's own error as FAILED: only a signal since a run began makes its error a stop
    (review: the first version kept the signal for the whole process)."""
    from pipeline.training.run import run

    with pytest.raises(Terminated):
        run(tiny(), callbacks=[_FailAt(3, Terminated("signal 15"))])  # as the handler raises it
    with pytest.raises(Terminated), terminate_as_exception():
        signal.raise_signal(signal.SIGTERM)  # a signal arrives between runs and is handled
    with pytest.raises(RuntimeError, match="a bug of its own"):
        run(tiny(), callbacks=[_FailAt(3, RuntimeError("a bug of its own"))])
    c = MlflowClient(store)
    runs = c.search_runs([c.get_experiment_by_name("test").experiment_id], order_by=["attributes.start_time"])
    assert [r.info.status for r in runs] == ["KILLED", "FAILED"]


_TRAIN_WITH_A_REPLACED_SIGTERM = """
import runpy, signal, sys
from mlflow.exceptions import MlflowException
from pipeline.signals import Terminated
from pipeline.tracking import Recorder
real, close, sent = Recorder.log_metrics, Recorder.close, []
def log_metrics(self, metrics, step):
    if step > 0 and not sent:
        sent.append(True)
        signal.raise_signal(signal.SIGTERM)
    return real(self, metrics, step)
def locked_close(self, status="FINISHED"):  # the store's error replaces the signal's at the KILLED close
    raise MlflowException("(sqlite3.OperationalError) database is locked")
Recorder.log_metrics, Recorder.close = log_metrics, locked_close
sys.argv = ["pipeline", *sys.argv[1:]]
runpy.run_module("pipeline", run_name="__main__")
"""


def test_train_whose_sigterm_a_store_error_replaced_exits_143(store, tmp_path):
    """SIGTERM, then the run's KILLED close fails with the store's error, which unwinds instead of the
    signal's: the command still exits 143 and says so in one line (it was a traceback and exit 1); the
    run the store would not close stays RUNNING, resumable with ``--resume`` as after a kill -9."""
    import os
    import subprocess
    import sys

    from tests.test_bad_input import SMOKE

    r = subprocess.run(
        [sys.executable, "-c", _TRAIN_WITH_A_REPLACED_SIGTERM, "train", "--config", SMOKE, f"tracking.uri={store}",
         "trainer.max_steps=20", "trainer.val_every=10"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )  # fmt: skip
    assert r.returncode == 143, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "terminated (MlflowException: (sqlite3.OperationalError) database is locked)" in r.stderr
    c = MlflowClient(store)
    (run,) = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert run.info.status == "RUNNING"
