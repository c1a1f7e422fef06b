"""When buffered metrics reach MLflow (README, "The MLflow record"): once ``FLUSH_EVERY`` values wait,
``FLUSH_SECONDS`` after the last send, and on close; never silently later. A fake monotonic clock drives
the time bound; a real sqlite store says what was sent.
"""

from __future__ import annotations

import time as real_time

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking


class Clock:
    """Stands in for the ``time`` module inside pipeline.tracking: wall time real, monotonic ours."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def time(self):
        return real_time.time()


def _recorder(store, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(tracking, "time", clock)
    rec = tracking.Recorder.start(store, "t", "r")
    calls = []
    real = rec.client.log_batch

    def log_batch(run_id, metrics=(), **kw):
        if metrics:
            calls.append(len(metrics))
        return real(run_id, metrics=metrics, **kw)

    rec.client.log_batch = log_batch
    return rec, clock, calls


def _sent(store, rec, key="grad/m0") -> int:
    return len(MlflowClient(store).get_metric_history(rec.run_id, key))


WINDOW = {f"grad/m{i}": float(i) for i in range(10)}  # about what one log_every window logs


def test_metrics_are_sent_within_flush_seconds(store, monkeypatch):
    rec, clock, calls = _recorder(store, monkeypatch)
    for step in range(20):  # 200 values over 19 s: neither bound reached
        rec.log_metrics(WINDOW, step)
        clock.now += 1.0
    assert calls == [] and _sent(store, rec) == 0
    clock.now += tracking.FLUSH_SECONDS  # a long window (slow steps): the next log sends everything
    rec.log_metrics(WINDOW, 20)
    assert calls == [210] and _sent(store, rec) == 21
    rec.log_metrics(WINDOW, 21)  # the clock restarted at that send
    assert calls == [210]
    rec.close()
    assert calls == [210, 10] and _sent(store, rec) == 22


def test_metrics_are_sent_at_flush_every_values_and_on_close(store, monkeypatch):
    rec, clock, calls = _recorder(store, monkeypatch)
    n = tracking.FLUSH_EVERY // len(WINDOW)
    for step in range(n + 3):  # no time passes: only the count bound applies
        rec.log_metrics(WINDOW, step)
    assert calls == [tracking.FLUSH_EVERY] and _sent(store, rec) == n
    rec.close()
    assert calls == [tracking.FLUSH_EVERY, 30] and _sent(store, rec) == n + 3
    assert MlflowClient(store).get_run(rec.run_id).info.status == "FINISHED"


def test_a_tag_write_carries_the_buffered_metrics_and_a_failed_one_keeps_them(store, monkeypatch):
    """``set_tags`` sends the buffered metrics in the same write (one call, not two); when that write
    fails, the metrics stay buffered and ``close`` sends them."""
    rec, clock, calls = _recorder(store, monkeypatch)
    rec.log_metrics(WINDOW, 0)
    rec.set_tags({"a": 1})
    assert calls == [10] and _sent(store, rec) == 1
    rec.log_metrics(WINDOW, 1)
    ok = rec.client.log_batch

    def locked(run_id, metrics=(), **kw):
        raise RuntimeError("database is locked")

    rec.client.log_batch = locked
    with pytest.raises(RuntimeError, match="locked"):
        rec.set_tags({"b": 2})
    rec.client.log_batch = ok
    assert _sent(store, rec) == 1
    rec.close()
    assert _sent(store, rec) == 2 and calls == [10, 10]
    many = {f"t{i}": i for i in range(250)}  # MLflow takes at most 100 tags a call
    rec2 = tracking.Recorder.start(store, "t", "r2")
    rec2.set_tags(many)
    assert len(MlflowClient(store).get_run(rec2.run_id).data.tags) >= 250


class Ticking(Clock):
    """A wall clock that moves 1 ms a call: no two logs share a millisecond, so MLflow's merging of equal
    points logged in the same millisecond cannot hide a repeated one."""

    def time(self):
        self.now += 0.001
        return self.now


def test_a_value_restated_at_its_step_is_sent_once(store, monkeypatch):
    """A run's end restates its last measurements at their step (README, "The MLflow record"): the same
    value at the same step is one point; a new value, a new step, or a value after a NaN is a new one."""
    monkeypatch.setattr(tracking, "time", Ticking())
    rec = tracking.Recorder.start(store, "t", "r")
    rec.log_metrics({"a": 1.0, "b": 2.0}, 20)
    rec.log_metrics({"a": 1.0, "b": 3.0}, 20)  # a restated, b a new value at the same step
    rec.log_metrics({"a": 1.0}, 21)  # the same value at the next step
    rec.log_metrics({"c": 5.0}, 3)
    rec.log_metrics({"c": float("nan")}, 3)
    rec.log_metrics({"c": 5.0}, 3)  # after a NaN: the finite value is the latest again
    rec.close()
    c = MlflowClient(store)
    hist = {k: [(m.step, m.value) for m in c.get_metric_history(rec.run_id, k)] for k in "abc"}
    assert hist["a"] == [(20, 1.0), (21, 1.0)]
    assert hist["b"] == [(20, 2.0), (20, 3.0)]
    assert hist["c"] == [(3, 5.0), (3, 5.0)]
    assert "nonfinite.c" not in c.get_run(rec.run_id).data.tags


# ------------------------------------------------- runs reopened, experiments restored (mutation review)


def test_a_resumed_record_is_running_again_and_only_when_asked(store):
    """A resumed sweep, suite or train reopens its run (``attach(reopen=True)``): it reads RUNNING while it
    runs again, and a reader that merely attaches leaves a closed run's status alone."""
    c = MlflowClient(store)
    for status in ("FINISHED", "KILLED", "FAILED"):
        rec = tracking.Recorder.start(store, "t", f"r-{status}")
        rec.close(status)
        tracking.Recorder.attach(store, rec.run_id)
        assert c.get_run(rec.run_id).info.status == status
        again = tracking.Recorder.attach(store, rec.run_id, reopen=True)
        assert (again.run_id, c.get_run(rec.run_id).info.status) == (rec.run_id, "RUNNING")


def test_a_deleted_experiment_is_restored_and_recorded_into(store):
    """Deleted in the UI, an experiment keeps its name in MLflow's store: creating it again fails, so a run
    into that name restores it (same id) rather than failing at ``create_run``."""
    c = MlflowClient(store)
    exp_id = tracking.ensure_experiment(store, "gone")
    c.delete_experiment(exp_id)
    assert tracking.ensure_experiment(store, "gone") == exp_id
    assert c.get_experiment(exp_id).lifecycle_stage == "active"
    rec = tracking.Recorder.start(store, "gone", "r", tags={"kept": "x", "unset": None})
    rec.close()
    tags = c.get_run(rec.run_id).data.tags
    assert tags["kept"] == "x" and "unset" not in tags  # a None tag is left out, not written as "None"
    # ... by set_tags too (a sweep's best trial without a run id: best_run_id None; mutation review)
    rec = tracking.Recorder.start(store, "gone", "r2")
    rec.set_tags({"best_trial": 3, "best_run_id": None})
    rec.close()
    tags = c.get_run(rec.run_id).data.tags
    assert tags["best_trial"] == "3" and "best_run_id" not in tags


def test_params_are_recorded_whole_up_to_mlflows_limit(store):
    """A param is sent as its text, cut only at MLflow's 6000-character limit (a sweep's ``space.*``
    choices, a long override), and None as "None" (mutation review)."""
    rec = tracking.Recorder.start(store, "t", "p")
    long = ",".join(str(i) for i in range(2000))  # 8889 characters
    rec.log_params({"long": long, "mid": "y" * 4000, "none": None})
    rec.close()
    params = MlflowClient(store).get_run(rec.run_id).data.params
    assert params["long"] == long[:6000] and params["mid"] == "y" * 4000 and params["none"] == "None"
