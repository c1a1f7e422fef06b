"""The report's bulk read: the frame ``mlflow.search_runs`` returns, read a page at a time with Python's
cyclic garbage collector paused.

Measured on a sweep of 5,000 trials (``benchmarks/scale_store.py``: 5,100 runs of 55 params, 24 metrics
and about 30 tags, the SQLite store; the 2-core machine, 2026-12-06): ``mlflow.search_runs`` took 23-27 s
and the report 1.0 GB of memory. MLflow's SQL store builds one SQLAlchemy object per param, metric and
tag of every run (547,000 here) and its pandas frame from those; the collector, set off again and again
by so many new objects, traversed them all each time: 2/3 of the read (the same read with it paused:
8 s). And ``mlflow.search_runs`` reads 10,000 runs a request, holding every run's objects at once. Here
pages of :data:`PAGE` runs, each turned into columns before the next is read (``MlflowClient.search_runs``,
with its page token), with the collector paused for the read: 23 s -> 8 s, and the report's peak memory
1.0 GB -> 0.4 GB. The frame is the one ``mlflow.search_runs`` builds (tests/test_report_scale.py): the
run's info, then ``metrics.*`` (NaN where a run lacks one), ``params.*`` and ``tags.*`` (None), each
group in the order first met (``mlflow.search_runs`` orders each run's new keys as a set, by hash).

A limit, MLflow's: its page token is an offset, so a run deleted while the pages are read moves the next
page by one and leaves one run out (a review; ``mlflow.search_runs`` has the same beyond its 10,000 runs a
request). A run created meanwhile starts later and comes on the last page. A report read while runs are
deleted in the UI can be written again.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any

PAGE = 1000  # runs a request; 500-10,000 read as fast, and fewer runs at once hold less memory
INFO = ("run_id", "experiment_id", "status", "artifact_uri", "start_time", "end_time")


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off for the block (as it was, after): a bulk read's objects are
    freed by their reference counts, and the collections their number sets off traverse them all."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _Columns:
    """Values by column and row, the missing ones filled when the frame is built."""

    def __init__(self):
        self.rows = 0
        self.info: dict[str, list] = {k: [] for k in INFO}
        self.groups: dict[str, dict[str, dict[int, Any]]] = {"metrics": {}, "params": {}, "tags": {}}

    def add(self, run) -> None:
        i, info, data = self.rows, run.info, run.data
        for k, v in (("run_id", info.run_id), ("experiment_id", info.experiment_id), ("status", info.status),
                     ("artifact_uri", info.artifact_uri), ("start_time", info.start_time),
                     ("end_time", info.end_time)):  # fmt: skip
            self.info[k].append(v)
        for group, values in (("metrics", data.metrics), ("params", data.params), ("tags", data.tags)):
            cols = self.groups[group]
            for k, v in values.items():
                col = cols.get(k)
                if col is None:
                    col = cols[k] = {}
                col[i] = v
        self.rows += 1

    def frame(self):
        import numpy as np
        import pandas as pd

        n = self.rows
        data: dict[str, Any] = {k: self.info[k] for k in INFO}
        if n:  # as mlflow.search_runs: pd.to_datetime(ms, unit="ms", utc=True) of each run (None: NaT)
            for k in ("start_time", "end_time"):
                data[k] = list(pd.to_datetime(pd.array(self.info[k], dtype="Int64"), unit="ms", utc=True))
        for group, missing in (("metrics", np.nan), ("params", None), ("tags", None)):
            for k, by_row in self.groups[group].items():
                col = [missing] * n
                for i, v in by_row.items():
                    col[i] = v
                data[f"{group}.{k}"] = col
        return pd.DataFrame(data)


def search_runs_frame(uri: str, experiment_ids: list[str], filter_string: str, order_by: list[str]):
    """``mlflow.search_runs(experiment_ids, filter_string, order_by=order_by)`` on the store at ``uri``
    (active runs), read in pages of :data:`PAGE` runs with the collector paused."""
    from mlflow.entities import ViewType

    from pipeline.tracking import client

    c = client(uri)
    cols, token = _Columns(), None
    with gc_paused():
        while True:
            page = c.search_runs(experiment_ids, filter_string, ViewType.ACTIVE_ONLY, PAGE, order_by, token)
            for run in page:
                cols.add(run)
            token = page.token
            del page  # this page's objects go before the next page's come
            if not token:
                break
        return cols.frame()
