"""The MLflow sqlite store's write rate under many sweep workers: rollback journal (MLflow's default) against
write-ahead log (what the pipeline sets, :func:`pipeline.tracking.use_wal`), README "Batched trials".

Each of P processes writes T trial records to one fresh store, shaped as a trial of the default sweep
writes them (counted on a real run: one ``create_run`` with its tags, a ``log_batch`` of 55 params, a
``log_batch`` of 300 metric values with 8 tags at the end, ``set_terminated``), while one more process
reads the store the whole time as the sweep's parent and the MLflow UI do (a search of the trial runs every
0.2 s). Trials per second of the whole store, and the slowest process's seconds per trial.

``python -m benchmarks.store_bench [P] [T]`` prints both rows; ``make bench`` (``--only store``) writes
them to ``store`` in results.json.
"""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import tempfile
import time
from pathlib import Path

PARAMS, METRICS, TAGS = 55, 300, 8  # per trial, as counted on a trial of the default sweep


def _writer(uri: str, experiment_id: str, trials: int, start, out) -> None:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    c.get_experiment(experiment_id)  # the engine and its connection made before the clock starts
    out.put("ready")
    start.wait()
    t = time.perf_counter()
    now = int(time.time() * 1000)
    for _ in range(trials):
        run = c.create_run(experiment_id, tags={"pipeline.kind": "trial", "study": "bench", "cell": "tanh"})
        rid = run.info.run_id
        c.log_batch(rid, params=[Param(f"section.key{i}", str(i)) for i in range(PARAMS)])
        metrics = [Metric(f"grad/m{i % 30}", float(i), now, i // 30) for i in range(METRICS)]
        c.log_batch(rid, metrics=metrics, tags=[RunTag(f"tag{i}", "v") for i in range(TAGS)])
        c.set_terminated(rid, "FINISHED")
    out.put(time.perf_counter() - t)


def _reader(uri: str, experiment_id: str, stop) -> None:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    while not stop.is_set():
        c.search_runs([experiment_id], "tags.`pipeline.kind` = 'trial'", max_results=50)
        time.sleep(0.2)


def rate(mode: str, procs: int, trials: int) -> dict:
    """One row: ``mode`` "rollback" (the store as MLflow makes it) or "wal"."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import use_wal

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mlflow.db"
        uri = f"sqlite:///{path}"
        exp = MlflowClient(uri).create_experiment("bench")
        if mode == "wal":
            use_wal(path)
        con = sqlite3.connect(path)
        journal = con.execute("PRAGMA journal_mode").fetchone()[0]
        con.close()
        start, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
        ps = [ctx.Process(target=_writer, args=(uri, exp, trials, start, out)) for _ in range(procs)]
        reader = ctx.Process(target=_reader, args=(uri, exp, stop))
        for p in [*ps, reader]:
            p.start()
        for _ in ps:  # the rate is the store's, not the interpreters' start
            assert out.get(timeout=300) == "ready"
        t = time.perf_counter()
        start.set()
        walls = [out.get(timeout=600) for _ in ps]
        wall = time.perf_counter() - t
        stop.set()
        for p in [*ps, reader]:
            p.join(timeout=60)
        n = len(MlflowClient(uri).search_runs([exp], max_results=procs * trials + 1))
    assert n == procs * trials, f"{n} runs written, {procs * trials} expected"
    return {
        "journal_mode": journal,
        "writers": procs,
        "trials": procs * trials,
        "trials_per_s": round(procs * trials / wall, 1),
        "slowest_s_per_trial": round(max(walls) / trials, 4),
    }


def run(quick: bool = False, procs: int = 8, trials: int | None = None) -> list[dict]:
    trials = trials or (10 if quick else 40)
    rows = []
    for mode in ("rollback", "wal"):
        row = rate(mode, procs, trials)
        print(row, flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    import sys

    run(
        procs=int(sys.argv[1]) if len(sys.argv) > 1 else 8,
        trials=int(sys.argv[2]) if len(sys.argv) > 2 else None,
    )
