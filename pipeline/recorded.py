"""Reading a run back as :class:`pipeline.tracking.Recorder` wrote it (README, "The MLflow record"): MLflow
keeps neither NaN nor inf, so the Recorder sends +-inf as +-float64 max and a NaN as the tag
``nonfinite.<metric>`` (MLflow keeps the metric's last finite value). :func:`as_recorded` reads a
``mlflow.search_runs`` frame back (public: ``pipeline.as_recorded``), :func:`recorded_metrics` one run's
metrics (the regression suite's entries)."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

from pipeline.names import NONFINITE_PREFIX


def recorded_metrics(metrics: Mapping[str, float], tags: Mapping[str, str]) -> dict[str, float]:
    """One run's latest metrics (``run.data.metrics``) as the run recorded them, read as :func:`as_recorded`
    reads a frame: +-float64 max as +-inf, and NaN where the tag ``nonfinite.<metric>`` is set (MLflow
    kept the last finite value there)."""
    top = sys.float_info.max
    out = {k: math.inf if v == top else -math.inf if v == -top else v for k, v in metrics.items()}
    for tag in tags:
        if tag.startswith(NONFINITE_PREFIX):
            out[tag[len(NONFINITE_PREFIX) :]] = math.nan
    return out


def as_recorded(runs):
    """A ``mlflow.search_runs`` frame with each metric's latest value as the run recorded it, the
    reading of what :class:`Recorder` writes (public: ``pipeline.as_recorded``). MLflow
    keeps neither NaN nor inf (README, "The MLflow record"): a metric whose latest value was NaN keeps
    its last finite value and the tag ``nonfinite.<metric>``, so it is NaN here; +-inf was stored as
    +-float64 max, so it is +-inf here."""
    import numpy as np

    runs = runs.copy()
    metric_cols = [c for c in runs.columns if c.startswith("metrics.")]
    if metric_cols:
        top = float(np.finfo(np.float64).max)
        runs[metric_cols] = runs[metric_cols].replace({top: np.inf, -top: -np.inf})
    prefix = f"tags.{NONFINITE_PREFIX}"
    for col in (c for c in list(runs.columns) if c.startswith(prefix)):
        nan_now = runs[col].notna().to_numpy()
        if nan_now.any():
            runs.loc[nan_now, "metrics." + col[len(prefix) :]] = np.nan
    return runs
