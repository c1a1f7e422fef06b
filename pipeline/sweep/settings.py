"""What a resume of a sweep's study must keep (README, "Faults and resuming", "A resume keeps the study's
settings"): :func:`study_settings` of a sweep file, recorded on the study by its first sweep
(:func:`pipeline.sweep.parent.create_stores`), and :func:`changed_settings`, the one-line refusal of a
resume that changes one. Light imports (stdlib, pipeline.schema), as :mod:`pipeline.sweep.config`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from pipeline.schema import ConfigError, flatten
from pipeline.sweep.config import SweepConfig

# The study's settings: what a resume of a study must keep, recorded on it (Optuna study user attr
# SETTINGS_ATTR) when it is created and compared on every resume (README, "Faults and resuming"). A
# resume that changed them mixed two experiments in one study: a changed categorical space failed every
# new trial (Optuna's CategoricalDistribution has no dynamic value space), a changed range or sampler
# drew points the parent run's params and sweep.yaml do not describe, a changed base config (T, task)
# had a best trial picked across two problems, and another base.tracking.experiment split the study's
# runs over two parents (a walkthrough). What may change: the budget and how it runs (n_trials, workers,
# trials_per_worker, timeout, heartbeat, log_models) and, of the base config, RESUMABLE_BASE.
SETTINGS_ATTR = "sweep_settings"
RESUMABLE_BASE = (
    "tracking.uri",  # another spelling of the store, or the store moved with the study
    "tracking.run_name",
    "tracking.system_metrics",
    "tracking.log_model",  # set per trial from log_models
    "trainer.accelerator",  # the study moved to a GPU machine, or back
    "trainer.threads",
    "trainer.progress_bar",
    "trainer.log_every",  # how often metrics are sent: the record's density, not a trial's result
    "diagnostics.plots",
)


def study_settings(sw: SweepConfig) -> dict[str, Any]:
    """The settings a resume must keep, as ``{dotted key: JSON value}``: the resolved base training config
    less :data:`RESUMABLE_BASE`, ``sampler``, ``pruner``, ``prune``, ``penalty`` and ``space.<key>``."""
    base = flatten(sw.base_config().to_dict(), "base.")
    for k in RESUMABLE_BASE:
        base.pop(f"base.{k}")
    out = {**base, "penalty": sw.penalty}
    for name in ("sampler", "pruner", "prune"):
        out.update(flatten(dataclasses.asdict(getattr(sw, name)), f"{name}."))
    for p in sw.space:
        spec: dict[str, Any] = {"choices": list(p.choices)}
        if p.kind != "categorical":  # an int range's step None is Optuna's 1: the same distribution
            step = p.step if p.step is not None or p.kind != "int" else 1
            spec = {"low": p.low, "high": p.high, "log": p.log, "step": step, "int": p.kind == "int"}
        out[f"space.{p.key}"] = spec
    return out


def changed_settings(study: str, recorded: dict[str, Any], now: dict[str, Any]) -> ConfigError | None:
    """The first setting (in key order) this sweep changes from the ones study ``study`` was created
    with, as the error to raise; None when it keeps them. A key on one side only is a change for a searched
    key (``space.*``); for others it is a key an earlier or later version of the pipeline does not know.
    Values compare as Python values after a JSON round trip, as Optuna compares distributions (choices
    [1, 2] are [1.0, 2.0]); the base value of a searched key is no setting (no trial trains with it)."""

    def shown(v: Any) -> str:
        return json.dumps(v, sort_keys=True)

    searched = {k[len("space.") :] for k in set(recorded) | set(now) if k.startswith("space.")}
    keys = sorted(
        k
        for k in set(recorded) | set(now)
        if k.startswith("space.")
        or (k in recorded and k in now and not (k.startswith("base.") and k[len("base.") :] in searched))
    )
    diff = [k for k in keys if json.loads(shown(recorded.get(k))) != json.loads(shown(now.get(k)))]
    if not diff:
        return None
    k = diff[0]
    if k not in recorded:
        what = f"study {study!r} did not search it, this sweep does: {shown(now[k])}"
    elif k not in now:
        what = f"study {study!r} searched it ({shown(recorded[k])}), this sweep does not"
    else:
        what = f"study {study!r} was created with {shown(recorded[k])}, this sweep says {shown(now[k])}"
    more = (
        f" (and {len(diff) - 1} more: {', '.join(diff[1:4])}{', ...' if len(diff) > 4 else ''})"
        if len(diff) > 1
        else ""
    )
    return ConfigError(
        k,
        f"{what}{more}; a resume keeps the study's "
        'search space, sampler, pruner, penalty and base config (README, "Faults and resuming"): '
        "start a new study (study=NAME) or give the study's value",
    )
