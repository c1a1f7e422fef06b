"""A diverged trial's objective ``penalty``, a trained trial's ``val/loss_ratio`` capped at ``penalty``
(README, "Objective, divergence, pruning"; pipeline/sweep/study.py), and ``max(penalty, worst value
trained)`` for a study told before the cap, with real numbers, through ``Worker.run_trial``.

``train.run`` is replaced by a script of results, so this is the worker's bookkeeping only (in-memory
Optuna study, no MLflow, no training): which value each trial is told, in which state, with which attrs.
"""

from __future__ import annotations

import math

import optuna
import pytest

from pipeline.sweep.config import PruneConfig, SweepConfig
from pipeline.sweep.study import divergence_value
from pipeline.sweep.worker import Worker
from pipeline.training import run as train

optuna.logging.set_verbosity(optuna.logging.WARNING)


def result(ratio=None, diverged_step=None, pruned=False) -> train.RunResult:
    diverged = diverged_step is not None
    return train.RunResult(
        run_id=None,
        status="FINISHED",
        regime="diverged" if diverged else "healthy",
        val_loss=ratio,
        val_loss_ratio=ratio,
        solved=False,
        diverged_step=diverged_step,
        pruned=pruned,
        steps=7,
        metrics={},
        tags={},
    )


def fake_worker(tiny, penalty: float) -> Worker:
    w = object.__new__(Worker)  # no stores, no processes: only what run_trial reads
    w.sw = SweepConfig(penalty=penalty, prune=PruneConfig(max_grad_norm=None))
    w.spec = {"parent_run_id": None, "experiment_id": None}
    w.study = optuna.create_study()
    w.storage = w.study._storage  # in-memory: the heartbeat is a no-op
    w.mlflow_uri = None
    w.cut, w.met, w.untagged = [], None, []  # the outage lists (pipeline/sweep/outages.py), empty
    cfg = tiny(**{"tracking.enabled": False})
    w.trial_run_config = lambda trial: cfg
    return w


def test_a_diverged_trial_is_never_better_than_a_trained_one_told_before_or_after(tiny, monkeypatch):
    """The cap: a trial that trained to 3.5 x (or 1.8e7 x) the loss of learning nothing, told after a
    diverged one, was told worse than it (a tell cannot be revised), so TPE took the diverging points
    for its good ones, and Optuna's own best trial was a diverged one (found by a review)."""
    w = fake_worker(tiny, penalty=2.0)
    script = [
        result(ratio=0.8),  # 0: trained
        result(diverged_step=3),  # 1: diverged: the penalty, 2.0
        result(ratio=3.5),  # 2: trained, worse than learning nothing (ratio > penalty): capped, 2.0
        result(diverged_step=0),  # 3: diverged after it: 2.0 again
        result(ratio=9.0, pruned=True),  # 4: pruned: no value
        result(ratio=float("nan")),  # 5: non-finite objective without a guard stop: also diverged
        result(ratio=1.2),  # 6: trained
        result(ratio=1.8e7),  # 7: trained after every divergence, far worse than learning nothing
    ]
    calls = iter(script)

    def run(cfg, on_done=None, **kw):  # train.run: the run closed FINISHED, then on_done (the tell)
        r = next(calls)
        if on_done is not None:
            on_done(r)
        return r

    monkeypatch.setattr(train, "run", run)
    for _ in script:
        assert w.run_trial(w.study.ask())
    t = w.study.trials
    states = [x.state.name for x in t]
    assert states == ["COMPLETE"] * 4 + ["PRUNED"] + ["COMPLETE"] * 3
    values = [x.value for x in t]
    assert values == [0.8, 2.0, 2.0, 2.0, None, 2.0, 1.2, 2.0]
    assert t[2].user_attrs["val_loss_ratio"] == 3.5 and t[7].user_attrs["val_loss_ratio"] == 1.8e7
    assert [bool(x.user_attrs.get("diverged")) for x in t] == [
        False,
        True,
        False,
        True,
        False,
        True,
        False,
        False,
    ]
    assert t[1].user_attrs["diverged_step"] == 3 and t[3].user_attrs["diverged_step"] == 0
    assert "diverged_step" not in t[5].user_attrs  # no guard stop: nothing to name
    # Never better than any trial that trained (the README's promise), told before it or after
    trained = [y.value for y in t if y.state.name == "COMPLETE" and not y.user_attrs.get("diverged")]
    assert min(x.value for x in t if x.user_attrs.get("diverged")) >= max(trained)


def test_in_a_study_told_before_the_cap_a_worse_ratio_is_never_told_better(tiny, monkeypatch):
    """A resumed study holds a trained trial told 3.5 before the cap. A new trial of ratio 5.0 is
    capped at 3.5 (what a divergence is told there), not at the penalty 2.0, which ranked it better
    than the 3.5 one (a review)."""
    w = fake_worker(tiny, penalty=2.0)
    old = w.study.ask()
    old.set_user_attr("diverged", False)
    w.study.tell(old, 3.5)
    script = iter([result(ratio=5.0), result(ratio=1.5), result(diverged_step=2)])

    def run(cfg, on_done=None, **kw):
        r = next(script)
        if on_done is not None:
            on_done(r)
        return r

    monkeypatch.setattr(train, "run", run)
    for _ in range(3):
        assert w.run_trial(w.study.ask())
    assert [x.value for x in w.study.trials] == [3.5, 3.5, 1.5, 3.5]


def test_divergence_value_ignores_diverged_and_non_finite_values():
    """A study told before the cap may hold trained values above the penalty; only finite values of
    trials that trained count: an earlier penalty (diverged=True) or an inf objective must not ratchet
    the next penalty up."""
    study = optuna.create_study()
    for value, diverged in [(0.5, False), (7.0, True), (math.inf, False)]:
        t = study.ask()
        t.set_user_attr("diverged", diverged)
        study.tell(t, value)
    assert divergence_value(study, 2.0) == 2.0
    assert divergence_value(study, 0.1) == 0.5
    assert divergence_value(optuna.create_study(), 2.0) == 2.0  # no trial yet: the penalty


@pytest.mark.parametrize("penalty", [0.25, 4.0])
def test_both_branches_on_one_study(penalty):
    study = optuna.create_study()
    for v in (0.3, 1.0):
        study.tell(study.ask(), v)
    assert divergence_value(study, penalty) == max(penalty, 1.0)


def test_the_sweeps_best_value_is_the_best_trials_ratio_not_its_capped_value():
    """Where every trial that trained did worse than the penalty, their told values tie at the cap: the
    best is the one with the lowest ``val/loss_ratio``, and the summary's ``best_value`` is that ratio,
    not the cap (a review)."""
    from types import SimpleNamespace

    from pipeline.sweep.summary import finalize

    study = optuna.create_study()
    for ratio in (7.0, 3.0):
        t = study.ask()
        t.set_user_attr("diverged", False)
        t.set_user_attr("val_loss_ratio", ratio)
        study.tell(t, 2.0)  # both capped

    class Rec:
        def __init__(self):
            self.metrics = {}

        def log_metrics(self, metrics, step):
            self.metrics.update(metrics)

        def __getattr__(self, name):  # tags, params, frames, flush: not read here
            return lambda *a, **k: None

    rec = Rec()
    res = finalize(rec, study, SimpleNamespace(n_trials=2, space=[]), complete=True, plots=False)
    assert res["best"].number == 1 and rec.metrics["best_value"] == 3.0  # the tie broken by the ratio
