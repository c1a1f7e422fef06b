"""The Optuna side of a sweep, shared by the parent and the workers: sampler, pruner, the start-up design,
``suggest``, counting trials against the budget, the best trial and the objective of a diverged trial.

Diverged trials are COMPLETE, not FAIL: Optuna's samplers drop FAIL trials (a NaN objective is FAIL),
so they would keep proposing the region that diverges (optuna #2864, #3472). The value is
``penalty`` (:func:`divergence_value`), and a trial that trained is told its ``val/loss_ratio`` capped
at ``penalty`` (:func:`trained_value`): never better than a trial that trained, also one told later
(a tell cannot be revised, and "the worst value so far" was beaten by a later trained trial of 1.8e7),
so TPE puts diverged points in its "bad" density and samples away from them (README, "Objective,
divergence, pruning").
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
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


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial ``number``'s draws in a sweep of ``sampler.seed`` = ``seed``: numpy's SeedSequence
    of the pair, hashed to the 32 bits Optuna's samplers take (numpy's RandomState). Two trials of a
    study share a seed by chance alone: among 10^4 trials with probability about 1% (birthday bound,
    n^2 / 2^33), and then, under TPE, still draw from different histories."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class PerTrialSeeded(optuna.samplers.BaseSampler):
    """Each trial's draws come from a sampler of its own, seeded by (sweep seed, trial number).

    Trial numbers are unique in a study, whichever process or machine asks, so trials do not share a
    random stream (but by a 32-bit chance: :func:`trial_seed`). Seeding per worker did not separate
    machines: every machine's first worker is worker 0, and one that joined while the start-up design
    was still being taken had seen as many trials as another, drew the same stream and proposed the
    same points (two machines on one PostgreSQL study, found by a walkthrough). The draws stay
    reproducible: a trial's number and the study's history decide them. TPE keeps no state between
    trials but its generator and a cache of the search space, so a fresh sampler per trial proposes what
    one long-lived sampler would, from another stream."""

    def __init__(self, make, seed: int):
        self._make, self._seed = make, seed
        self._by_number: dict[int, optuna.samplers.BaseSampler] = {}
        self._space: Any = None  # TPE's intersection search space, shared by the trials' samplers

    # Samplers kept for trials not told here (a trial another process reaps and tells never reaches this
    # after_trial): the oldest go past this many, more than a worker ever holds (trials_per_worker <= 4096).
    KEEP = 8192

    def _of(self, trial) -> optuna.samplers.BaseSampler:
        s = self._by_number.get(trial.number)
        if s is None:
            s = self._by_number[trial.number] = self._make(trial_seed(self._seed, trial.number))
            # TPE's search space is computed incrementally over the study's finished trials (Optuna's
            # IntersectionSearchSpace, for one study): a fresh one per trial read every trial again, 55-63
            # of the 70 ms a worker's ask took at 5,100 trials (cProfile). The same space, shared (tests/test_sampler.py).
            if getattr(s, "_search_space", None) is not None:
                self._space = self._space or s._search_space
                s._search_space = self._space  # type: ignore[attr-defined]
            while len(self._by_number) > self.KEEP:
                del self._by_number[next(iter(self._by_number))]
        return s

    def infer_relative_search_space(self, study, trial):
        return self._of(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._of(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._of(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._of(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        s = self._by_number.pop(trial.number, None)
        if s is not None:
            s.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:  # the seeds are the trials' own: nothing to reseed
        pass


def make_sampler(sw: SweepConfig):
    """The sweep's sampler: TPE (multivariate, constant liar) or random, each trial's draws seeded by
    (``sampler.seed``, trial number) (:class:`PerTrialSeeded`). (The start-up design itself is drawn once
    by the parent: :func:`startup_design`.)"""
    s = sw.sampler

    def one(seed: int):
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
                seed=seed,
                n_startup_trials=s.n_startup_trials,
                multivariate=s.multivariate,
                constant_liar=True,
            )

    return PerTrialSeeded(one, s.seed)


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
    """The trial that trained with the lowest value; among those tied at the cap (:func:`trained_value`),
    the lowest ``val/loss_ratio``."""
    good = _trained(study)
    return min(good, key=lambda t: (t.value, trial_ratio(t, math.inf))) if good else None


def trial_ratio(t, default: float) -> float:
    """A trial's attr ``val_loss_ratio`` (its told value is capped at the penalty), else ``default``."""
    v = t.user_attrs.get("val_loss_ratio")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def trained_value(study, val_loss_ratio: float, penalty: float) -> float:
    """Objective of a trial that trained: its ``val/loss_ratio``, capped at what a diverged trial is
    told (:func:`divergence_value`: ``penalty``, or a larger worst value in a study told before the
    cap, so a worse ratio is never told better than it): a loss that many times a model's that learned
    nothing is as bad as a divergence. The attr ``val_loss_ratio`` keeps the ratio."""
    return min(val_loss_ratio, divergence_value(study, penalty))


def divergence_value(study, penalty: float) -> float:
    """Objective of a diverged trial: never better than any trial that trained (see the module doc).
    ``penalty``, or the worst trained value where a study told before the cap holds a larger one."""
    return max([penalty, *(t.value for t in _trained(study))])
