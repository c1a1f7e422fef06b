"""What a trial that ran records about its end: its Optuna user attributes and tell, its MLflow run's tags
and, under ``log_models: best``, its weights (README, "What is recorded"; the table in
:mod:`pipeline.sweep.worker`). ``w``, where a function takes one, is the trial's
:class:`~pipeline.sweep.worker.Worker` (its sweep, study, MLflow store and list of tags kept for later)."""

from __future__ import annotations

import math
import sys
from typing import Any

from pipeline.names import KIND, KIND_TRIAL, OWNER, STUDY, TRIAL_NUMBER
from pipeline.provenance import owner_tag


def trial_tags(study: str, number: int) -> dict[str, str]:
    """The tags a trial's run opens with, strings (the REST store rejects others in create_run). ``OWNER``
    (the worker process) lets a report tell a run left RUNNING by a killed worker from one still training."""
    return {KIND: KIND_TRIAL, STUDY: study, TRIAL_NUMBER: str(number), OWNER: owner_tag()}


def tag_run(
    mlflow_uri: str | None, run_id: str | None, tags: dict[str, Any], later: list | None = None
) -> None:
    """Write ``tags`` on run ``run_id``, after its trial was told: an error does not undo the tell. One
    that says the store did not answer puts the write on ``later`` (the worker's, written when the store
    answers again: :func:`pipeline.sweep.outages.ride_out`); lost there, a trial told COMPLETE kept a
    FINISHED run that never said so (a test with PostgreSQL cut for 15 s)."""
    if not run_id:
        return
    from mlflow.entities import RunTag

    from pipeline.store_errors import store_unreachable
    from pipeline.tracking import client

    try:
        client(mlflow_uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    except Exception as e:
        why = store_unreachable(e)
        if later is not None and why:
            later.append((run_id, tags, why))


def trial_attrs(r, pruned_by: str | None) -> dict[str, Any]:
    """The Optuna user attributes of a trial that ran (see the module doc's table)."""
    attrs = {
        "mlflow_run_id": r.run_id,
        "regime": r.regime,
        "solved": r.solved,
        "steps": r.steps,
        "val_loss_ratio": r.val_loss_ratio,
        "val_accuracy": r.metrics.get("val/accuracy"),  # None unless the task classifies (Task.hits)
        "diverged": r.diverged_step is not None,
    }
    if r.diverged_step is not None:
        attrs["diverged_step"] = r.diverged_step
    if pruned_by:
        attrs["pruned_by"] = pruned_by
    return attrs


def outcome_tags(state: str, diverged: bool, value: float | None, pruned_by: str | None) -> dict[str, Any]:
    """The MLflow tags of how a trial ended in Optuna."""
    return {
        "optuna_state": state,
        "diverged": str(diverged).lower(),
        # full precision (shortest round trip): a script joins it back to Optuna's value exactly
        **({"optuna_value": repr(float(value))} if value is not None else {}),
        **({"pruned_by": pruned_by} if pruned_by else {}),
    }


def end_trial(w, trial, r, module, pruned_by: str | None) -> None:
    """A trial that trained, as its run closes FINISHED (``train.run``'s ``on_done``): its weights if it
    is the best so far (:func:`log_best_model`), then its tell (:func:`tell`)."""
    log_best_model(w, r, module)
    tell(w, trial, r, pruned_by)


def tell(w, trial, r, pruned_by: str | None) -> None:
    """Tell Optuna how a trial that ran ended (see the table in :mod:`pipeline.sweep.worker`) and tag its
    MLflow run."""
    from optuna.trial import TrialState

    from pipeline.sweep import study as objective

    attrs = trial_attrs(r, pruned_by)
    finite = r.val_loss_ratio is not None and math.isfinite(r.val_loss_ratio)
    # a loss that is not finite at the end is a divergence the guard did not stop: told as one, and
    # the run's `diverged` tag says so as the trial's attr does (the tag read "false" beside it)
    attrs["diverged"] = r.diverged_step is not None or not finite
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    value: float | None
    if attrs["diverged"]:
        value = objective.divergence_value(w.study, w.sw.penalty)
        w.study.tell(trial, value)
        state = "COMPLETE"
    elif r.pruned:
        # Optuna keeps a pruned trial's last reported value as its value (trials.parquet's `value`);
        # the run's optuna_value tag says the same (it was left off: a walkthrough)
        value = w.study.tell(trial, state=TrialState.PRUNED).value
        state = "PRUNED"
    else:
        value = objective.trained_value(w.study, r.val_loss_ratio, w.sw.penalty)
        w.study.tell(trial, value)
        state = "COMPLETE"
    tags = outcome_tags(state, attrs["diverged"], value, pruned_by)
    tag_run(w.mlflow_uri, r.run_id, tags, later=w.untagged)


def log_best_model(w, r, module) -> None:
    """``log_models: best``: log the weights of a trial that trained, unpruned and finite, no worse than
    every trial already COMPLETE (checked before its own tell), so the study's final best trial always
    has ``model/weights.pt``, whatever order parallel workers finish in; earlier bests keep theirs."""
    if not is_best_so_far(w.sw, w.study, r, module):
        return
    from pipeline.tracking import Recorder
    from pipeline.training.saved import log_weights

    try:
        log_weights(Recorder.attach(w.mlflow_uri, r.run_id), module.model)
    except Exception as e:  # the trial trained: a failed upload must not fail it
        print(f"trial {r.run_id}: model/weights.pt not logged: {type(e).__name__}: {e}", file=sys.stderr)


def is_best_so_far(sw, study, r, module) -> bool:
    """``log_models: best``: whether trial result ``r`` trained, unpruned and finite, no worse than every
    trial of ``study`` already COMPLETE (checked before its own tell)."""
    v = r.val_loss_ratio
    if sw.log_models != "best" or module is None or r.run_id is None or r.pruned:
        return False
    if r.diverged_step is not None or v is None or not math.isfinite(v):
        return False
    from pipeline.sweep.study import best_trial

    best = best_trial(study)
    return not (best is not None and best.value < v)
