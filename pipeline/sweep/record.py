"""What a trial that ran records about its end: its Optuna user attributes and its MLflow run's tags
(README, "What is recorded"; the table in :mod:`pipeline.sweep.worker`)."""

from __future__ import annotations

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
