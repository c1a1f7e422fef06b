"""The sampler really learns from divergence (README, "Objective, divergence, pruning").

Optuna's samplers drop FAIL trials (optuna #2864, #3472), so a sweep that records divergence as FAIL keeps
proposing the region that diverges. The project tells a diverged trial COMPLETE with
:func:`pipeline.sweep.study.divergence_value`. A cheap, deterministic in-process experiment (no
training): a synthetic objective over x = log10(lr) in [-5, 0] whose best values sit just below a
divergence edge at x = -1 (as real learning rates do), the project's own sampler
(:func:`pipeline.sweep.study.make_sampler`, default sweep settings: TPE, multivariate, constant liar,
8 start-up trials) and its own penalty, against the same sweep with diverged trials told FAIL.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import optuna
import pytest

from pipeline.sweep.config import SamplerConfig, SweepConfig
from pipeline.sweep.study import divergence_value, make_sampler

EDGE = -1.0  # log10(lr) above which the synthetic run "diverges"
FAR = 0.25  # count proposals past the edge by more than 10^0.25 ~ 1.8x in lr: clearly diverging
N_TRIALS = 40
SEEDS = range(6)


def synthetic_ratio(x: float) -> float:
    """val/loss_ratio of a run that trained: falls towards the edge (bigger lr learns more), a ripple."""
    return 1.0 - 0.9 * (x + 5) / (EDGE + 5) + 0.02 * math.sin(7 * x)


def share_diverging(policy: str, seed: int) -> float:
    """Share of the TPE proposals (after the start-up trials) that land well inside the diverging region."""
    sw = SweepConfig(sampler=SamplerConfig(seed=seed))
    startup = sw.sampler.n_startup_trials
    with warnings.catch_warnings():
        # make_sampler silences the multivariate / constant_liar labels; nothing else is expected here.
        warnings.simplefilter("error", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(sampler=make_sampler(sw))
        hits = []
        for i in range(N_TRIALS):
            t = study.ask()
            x = t.suggest_float("log_lr", -5.0, 0.0)
            if i >= startup:
                hits.append(x > EDGE + FAR)
            if x <= EDGE:
                study.tell(t, synthetic_ratio(x))
            elif policy == "penalty":  # what Worker.run_trial does with a diverged run
                t.set_user_attr("diverged", True)
                study.tell(t, divergence_value(study, sw.penalty))
            else:
                study.tell(t, state=optuna.trial.TrialState.FAIL)
    return float(np.mean(hits))


@pytest.fixture(autouse=True)
def _quiet_optuna():
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    yield
    optuna.logging.set_verbosity(level)


def test_penalised_divergence_steers_tpe_away_from_the_diverging_region():
    # Measured (optuna 5.0, seeds 0-5, 32 proposals each), share of proposals with x > EDGE + FAR, with
    # each trial's draws seeded by (seed, trial number) (study.PerTrialSeeded):
    #   project's policy (COMPLETE, max(penalty, worst trained))   0.19-0.28, mean 0.245
    #   diverged told FAIL                                          0.91-0.97, mean 0.94
    #   planted bug: diverged told the *best* value trained so far  0.25-0.44, mean 0.34
    #   planted bug: diverged told 0.0 (better than any run)        0.47-0.56, mean 0.51
    # One long-lived TPESampler per seed instead gave 0.224 / 0.339 / 0.526 on these seeds, and 0.231
    # against 0.227 (policy) over 20 more: per-trial seeding changes the stream, not TPE's behaviour.
    # (Any value ranked below every trained one gives the project's numbers: TPE is rank-based.)
    # Thresholds sit between the measured groups: a gap to FAIL > 0.4, every seed better than FAIL,
    # and a mean share < 0.28 that the planted "good value" bugs do not reach.
    penalty = [share_diverging("penalty", s) for s in SEEDS]
    fail = [share_diverging("fail", s) for s in SEEDS]
    assert np.mean(fail) - np.mean(penalty) > 0.4, (penalty, fail)
    assert all(p < f for p, f in zip(penalty, fail, strict=True)), (penalty, fail)
    assert np.mean(penalty) < 0.28, penalty


def test_per_trial_samplers_share_tpes_search_space_and_draw_what_unshared_ones_draw():
    """A worker's ask rescanned every trial of the study for TPE's search space (a fresh sampler per
    trial: study.PerTrialSeeded), 55-63 of 70 ms at 5,100 trials (a scale probe). The space, which Optuna
    computes incrementally for one study, is now shared: the trials' samplers hold one object, it has
    read the study once, and each proposal is what a sampler with a space of its own proposes."""
    from pipeline.sweep import study as sweep_study

    def tpe(seed: int):
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=5, multivariate=True, constant_liar=True
        )

    shared = sweep_study.PerTrialSeeded(tpe, 7)
    study = optuna.create_study(sampler=shared)
    spaces = set()
    for _ in range(30):
        t = study.ask()
        x, y = t.suggest_float("x", -1, 1), t.suggest_float("y", 1e-3, 1, log=True)
        spaces.add(id(shared._of(t)._search_space))
        # the same trial drawn by a sampler whose space is its own, on the same history
        own = tpe(sweep_study.trial_seed(7, t.number))
        alone = optuna.create_study(sampler=own)
        alone.add_trials(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
        u = alone.ask()
        assert (u.suggest_float("x", -1, 1), u.suggest_float("y", 1e-3, 1, log=True)) == (x, y), t.number
        study.tell(t, (x - 0.3) ** 2 + y)
    assert len(spaces) == 1
    assert shared._space._cached_trial_number >= 20  # incremental: the finished trials read once
