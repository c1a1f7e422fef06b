"""The Optuna side of a sweep, shared by the parent and the workers: sampler, pruner, the start-up design,
``suggest``, counting trials against the budget, the best trial and the objective of a diverged trial.

Diverged trials are COMPLETE, not FAIL: Optuna's samplers drop FAIL trials (a NaN objective is FAIL),
so they would keep proposing the region that diverges (optuna #2864, #3472). The value is
``max(penalty, worst finite value of the non-diverged trials so far)`` (:func:`divergence_value`):
never better than a trial that trained, so TPE puts diverged points in its "bad" density and samples
away from them (README, "Objective, divergence, pruning").
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from pipeline.sweep.config import SweepConfig
from pipeline.sweep.space import Param


def suggest(trial, p: Param) -> Any:
    if p.kind == "categorical":
        return trial.suggest_categorical(p.key, p.choices)
    assert p.low is not None and p.high is not None  # a range parameter (space.Param)
    if p.kind == "int":
        return trial.suggest_int(p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)


def make_sampler(sw: SweepConfig, worker: int, n_seen: int):
    """Seeded per (sweep seed, worker, trials already in the study): parallel workers and resumed
    sweeps do not replay the same random draws. (The start-up design itself is drawn once by the parent:
    :func:`startup_design`.)"""
    s = sw.sampler
    seed = (s.seed * 1_000_003 + worker * 7919 + n_seen) % (2**31)
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        # TPESampler's multivariate and constant_liar arguments are labelled experimental (Optuna docs,
        # "optuna.samplers.TPESampler"); the label is the only warning they give.
        warnings.filterwarnings(
            "ignore",
            r"Argument ``(multivariate|constant_liar)`` is an experimental feature",
            ExperimentalWarning,
        )
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=s.n_startup_trials, multivariate=s.multivariate, constant_liar=True
        )


def startup_design(sw: SweepConfig) -> list[dict[str, Any]]:
    """The sweep's first ``sampler.n_startup_trials`` points (at most ``n_trials``), drawn once by the
    parent from ``sampler.seed`` alone and enqueued before any worker starts.

    Without it each worker's sampler draws its own random start-up points, so the design changes with the
    number of workers. With it a sweep starts from the same points with 1, 2 or 16 workers, and they are
    the points a single-process ``TPESampler(seed=...)`` would draw (same RandomSampler, same order; tested).
    """
    s = sw.sampler
    n = min(s.n_startup_trials, sw.n_trials) if s.name == "tpe" else 0
    if n == 0:
        return []
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=s.seed))
    points = []
    for _ in range(n):
        trial = study.ask()
        points.append({p.key: suggest(trial, p) for p in sw.space})
        study.tell(trial, 0.0)
    return points


def make_pruner(sw: SweepConfig):
    p = sw.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
        )
    if p.name == "hyperband":
        trainer = sw.base_config().trainer
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_resource or trainer.val_every,
            max_resource=trainer.max_steps,
            reduction_factor=p.reduction_factor,
        )
    return optuna.pruners.NopPruner()


# ------------------------------------------------------------------------------------------ counting


def counts(study) -> dict[str, int]:
    """Trials by state (lower-case TrialState names), plus ``diverged`` (COMPLETE ones that diverged) and
    ``done`` (COMPLETE + PRUNED: what the budget counts)."""
    ts = study.get_trials(deepcopy=False)
    c = {s.name.lower(): sum(t.state == s for t in ts) for s in TrialState}
    c["diverged"] = sum(t.state == TrialState.COMPLETE and bool(t.user_attrs.get("diverged")) for t in ts)
    c["done"] = c["complete"] + c["pruned"]
    return c


def budget_left(study, n_trials: int) -> int:
    """Trials that may still be started: ``n_trials`` less the done and the running ones."""
    c = counts(study)
    return n_trials - c["done"] - c["running"]


def has_waiting(study) -> bool:
    """A WAITING trial (an enqueued retry or start-up point) that the next ``ask`` would pop."""
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _trained(study) -> list:
    """COMPLETE trials that trained: not diverged, with a finite value."""
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not t.user_attrs.get("diverged") and t.value is not None and math.isfinite(t.value)
    ]


def best_trial(study):
    good = _trained(study)
    return min(good, key=lambda t: t.value) if good else None


def divergence_value(study, penalty: float) -> float:
    """Objective of a diverged trial: never better than any trial that trained (see the module doc)."""
    return max([penalty, *(t.value for t in _trained(study))])
