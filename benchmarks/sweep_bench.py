"""Sweep benchmark: trials per hour of ``python -m pipeline sweep`` against a hand-written Optuna sweep.

The hand-written sweep is what a user writes today: one process, Optuna's SQLite storage, an
objective that builds a fresh ``pl.Trainer`` and ``MLFlowLogger`` per trial (synchronous logging to
the same sqlite MLflow store), default torch threads, no pruning (optuna-integration's callback imports
``lightning.pytorch``). It trains the same LightningModule on the same data, over the
same space and budget. Ours additionally records the full gradient diagnostics of every trial.

Each variant runs in a fresh process and a fresh working directory; wall time includes start-up.
``run(quick)`` returns one row per variant: trials, wall seconds, trials per hour, speed-up, best value.
Also a storage micro-benchmark: ms per trial (create, 3 params, tell) for the journal file and SQLite.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _sweep_spec(quick: bool, seed: int = 0, n_trials: int | None = None) -> dict:
    """The default sweep (``configs/sweeps/default.yaml``) at sampler seed ``seed``; ``n_trials``: another
    budget, every other key (the sampler's and the pruner's start-up counts included) unchanged."""
    sw = yaml.safe_load((ROOT / "configs" / "sweeps" / "default.yaml").read_text())
    sw["sampler"]["seed"] = seed
    if quick:
        sw["n_trials"] = 6
        sw["base"]["trainer"]["max_steps"] = 100
        sw["sampler"]["n_startup_trials"] = 3
        sw["pruner"]["n_startup_trials"] = 3
        sw["pruner"]["n_warmup_steps"] = 50
    if n_trials is not None:
        sw["n_trials"] = n_trials
    sw["study"] = "bench"
    return sw


def _env() -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_hand_written(sw: dict) -> dict:
    spec = {
        "space": sw["space"],
        "base": sw["base"],
        "n_trials": sw["n_trials"],
        "n_startup": sw["sampler"]["n_startup_trials"],
        "seed": sw["sampler"]["seed"],
    }
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-m", "benchmarks.hand_written_sweep", json.dumps(spec)],
            cwd=d,
            env=_env(),
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"hand-written sweep failed:\n{p.stderr[-3000:]}")
    res = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    return {
        "variant": "hand-written (1 process, sqlite, Trainer+MLFlowLogger per trial)",
        "workers": 1,
        "seed": spec["seed"],
        "trials": res["trials"],
        "wall_s": wall,
        "best": res["best"],
    }


def run_ours(sw: dict, workers: int, k: int = 1, max_seconds: float | None = None) -> dict:
    """``pipeline sweep --workers W`` with ``trials_per_worker: k`` (README, "Batched trials").

    ``max_seconds``: stop the sweep with SIGTERM after that long (it closes its trials' runs KILLED,
    README "Faults and resuming") and count the trials finished by then (COMPLETE or PRUNED): a rate
    over a fixed window, start-up included, which comes back even when ``n_trials`` would take longer.
    ``trials_per_hour_from_first_start``: the rate without the sweep's start-up
    (:func:`rate_from_first_start`)."""
    import signal

    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "sweep.yaml"
        cfg.write_text(yaml.safe_dump({**sw, "trials_per_worker": k}, sort_keys=False))
        t = time.perf_counter()
        started = datetime.datetime.now()  # Optuna's datetime_complete is local and naive, like this
        p = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "sweep", "--config", str(cfg), "--workers", str(workers)],
            cwd=d,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        stopped = False
        try:
            try:
                out, err = p.communicate(timeout=max_seconds)
            except subprocess.TimeoutExpired:
                stopped = True
                p.send_signal(signal.SIGTERM)
                try:
                    out, err = p.communicate(timeout=120)
                except subprocess.TimeoutExpired:
                    p.kill()
                    out, err = p.communicate()
        except BaseException:  # Ctrl-C, anything else: no sweep left running in a deleted directory
            p.kill()
            p.wait()
            raise
        wall = time.perf_counter() - t
        if p.returncode != 0 and not stopped:
            raise RuntimeError(f"pipeline sweep failed:\n{out[-2000:]}\n{err[-2000:]}")
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        from pipeline.sweep.study import best_trial

        study = optuna.load_study(
            study_name="bench",
            storage=JournalStorage(JournalFileBackend(str(Path(d) / "optuna/bench.journal"))),
        )
        best = best_trial(study)
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        row = {
            "variant": f"pipeline sweep --workers {workers}, trials_per_worker {k}",
            "workers": workers,
            "seed": sw["sampler"]["seed"],
            "trials": sum(tr.state in finished for tr in study.trials) if stopped else len(study.trials),
            "wall_s": max_seconds if stopped else wall,
            "best": best.value if best else None,
        }
        if stopped:
            row["stopped_at_s"] = max_seconds
        done = [
            (tr.datetime_complete - started).total_seconds()
            for tr in study.trials
            if tr.state in finished and tr.datetime_complete is not None
        ]
        starts = [(tr.datetime_start - started).total_seconds() for tr in study.trials if tr.datetime_start]
        end = max_seconds if stopped else max(done, default=0.0)
        row["trials_per_hour_from_first_start"] = rate_from_first_start(starts, done, end)
        return row


def rate_from_first_start(starts_s: list[float], done_s: list[float], end_s: float) -> float:
    """Trials per hour from the first trial's start (seconds after the sweep's start, of every trial in
    ``starts_s``) to ``end_s`` (a stopped run's stop, else its last finish): the trials finished by then
    (``done_s``), over that time. What is left out is the sweep's own start-up before its first trial
    (interpreters, imports, the stores' schemas, the workers' launch), which a long sweep pays once;
    what stays in is every trial's whole life, the first stacks' included, so this never counts a trial
    whose time it did not see. For a stopped run, trials in flight at the stop count for nothing: a
    lower bound of the rate a long sweep settles at. 0.0 with no trial finished."""
    if not starts_s or end_s <= min(starts_s):
        return 0.0
    return sum(t <= end_s for t in done_s) * 3600 / (end_s - min(starts_s))


def storage_ms_per_trial(n: int = 40) -> list[dict]:
    """Optuna storage cost per trial (ask, 3 suggests, tell), single process, fresh files."""
    import optuna

    from pipeline.sweep.stores import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings(
        "ignore", message="Heartbeat of storage"
    )  # ask/tell on purpose, as our workers do
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, url in (("journal file", f"{d}/s.journal"), ("sqlite", f"sqlite:///{d}/s.db")):
            st = open_storage(url)
            study = optuna.create_study(
                storage=st, study_name="m", sampler=optuna.samplers.RandomSampler(seed=0)
            )
            t = time.perf_counter()
            for _ in range(n):
                tr = study.ask()
                tr.suggest_float("a", 0, 1)
                tr.suggest_float("b", 0, 1)
                tr.suggest_categorical("c", ["x", "y"])
                study.tell(tr, 0.5)
            rows.append({"variant": f"storage: {name}", "ms_per_trial": 1000 * (time.perf_counter() - t) / n})
    return rows


BATCHED_K = 4  # the batched variant: trials_per_worker (pipeline.sweep.batch.AUTO_CPU)


def run(
    quick: bool, seeds: int = 1, n_trials: int | None = None, modes: tuple[str, ...] = ("same points", "TPE")
) -> list[dict]:
    """Two comparisons (``modes``), each hand-written vs ``--workers 2`` with ``trials_per_worker`` 1 (one trial at
    a time) and :data:`BATCHED_K` (batched trials) per sampler seed, interleaved so that machine drift
    hits all alike:

    * ``same points``: ``n_startup_trials = n_trials``, so both evaluate the identical random design (our
      start-up design equals what ``TPESampler(seed)`` draws; tested): trials per hour measure the
      machinery alone, not which cells a sampler happened to pick (an LSTM trial costs 3x a tanh one).
    * ``TPE``: the shipped sampler settings; the best value is the search quality. One seed's best is one
      draw of a noisy search, so each comparison ends with a "median over seeds" row per variant.

    Then 1 and 4 workers with TPE at seed 0, for scaling (only at the default budget).

    ``n_trials``: a budget other than the default sweep's 24 trials, to measure trials per hour once the
    fixed start-up (about 9 s, README "Batched trials") is a small part of the wall time.
    """
    import statistics

    rows = storage_ms_per_trial()
    sweeps = []
    for mode in modes:
        for seed in range(seeds):
            sw = _sweep_spec(quick, seed, n_trials)
            if mode == "same points":
                sw["sampler"]["n_startup_trials"] = sw["n_trials"]
            for r in (run_hand_written(sw), run_ours(sw, 2, 1), run_ours(sw, 2, BATCHED_K)):
                sweeps.append({"mode": mode, **r})
    sw0 = _sweep_spec(quick, 0, n_trials)
    if n_trials is None:
        sweeps += [{"mode": "TPE", **run_ours(sw0, w)} for w in (1, 4)]
    hand_rate = {
        (r["mode"], r["seed"]): r["trials"] * 3600 / r["wall_s"]
        for r in sweeps
        if r["variant"].startswith("hand")
    }
    for r in sweeps:
        r["trials_per_hour"] = r["trials"] * 3600 / r["wall_s"]
        r["speedup"] = r["trials_per_hour"] / hand_rate[(r["mode"], r["seed"])]
        r["n_trials"], r["max_steps"] = sw0["n_trials"], sw0["base"]["trainer"]["max_steps"]
        r["device"] = f"CPU x{os.cpu_count()}"
    summary = []
    if seeds > 1:
        for key in dict.fromkeys((r["mode"], r["variant"]) for r in sweeps):
            group = [r for r in sweeps if (r["mode"], r["variant"]) == key]
            if len(group) < 2:
                continue
            bests = [r["best"] for r in group if r["best"] is not None]
            summary.append(
                {
                    "mode": key[0],
                    "variant": key[1],
                    "workers": group[0]["workers"],
                    "seed": f"median of {len(group)}",
                    "trials_per_hour": statistics.median(r["trials_per_hour"] for r in group),
                    "speedup": statistics.median(r["speedup"] for r in group),
                    "speedup_per_seed": [round(r["speedup"], 2) for r in group],
                    "best": statistics.median(bests) if bests else None,
                    "best_per_seed": [round(b, 6) for b in bests],
                }
            )
    return rows + sweeps + summary


def parse_grid(text: str) -> list[tuple[int, int, int, float | None]]:
    """``--sweep-grid "W:K:N[:S],..."``: (workers, trials_per_worker, n_trials, seconds or None) per
    entry (S: stop the entry after S seconds and rate the trials finished by then); ValueError names the
    bad entry."""
    out: list[tuple[int, int, int, float | None]] = []
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        parts = entry.split(":")
        try:
            if len(parts) not in (3, 4):
                raise ValueError
            w, k, n = (int(v) for v in parts[:3])
            secs = float(parts[3]) if len(parts) == 4 else None
        except ValueError:
            raise ValueError(
                f"{entry!r} is not W:K:N or W:K:N:S (workers:trials_per_worker:n_trials:seconds)"
            ) from None
        if min(w, k, n) < 1 or (secs is not None and not (0 < secs < math.inf)):
            raise ValueError(f"{entry!r}: workers, trials_per_worker and n_trials must be >= 1, seconds > 0")
        out.append((w, k, n, secs))
    if not out:
        raise ValueError("no entry (expected W:K:N,...)")
    return out


def run_grid(quick: bool, grid: list[tuple[int, int, int, float | None]], seed: int = 0) -> list[dict]:
    """``pipeline sweep`` at each (workers, trials_per_worker, n_trials) of ``grid`` on the same points
    (``n_startup_trials = n_trials``: every entry trains a prefix of one random design of the default
    sweep at sampler seed ``seed``), each in a fresh process and directory, start-up and summary included.
    On a CUDA machine the workers are GPU workers (each entry names its count, spread round-robin over the
    visible GPUs). Speed-up: trials per hour against the first entry of this call."""
    import torch

    device = (
        f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    )
    rows = []
    for w, k, n, secs in grid:
        sw = _sweep_spec(quick, seed, n)
        sw["sampler"]["n_startup_trials"] = n
        r = {"mode": "same points", **run_ours(sw, w, k, secs), "device": device, "n_trials": n}
        r["max_steps"] = sw["base"]["trainer"]["max_steps"]
        r["trials_per_hour"] = r["trials"] * 3600 / r["wall_s"]
        r["speedup"] = r["trials_per_hour"] / rows[0]["trials_per_hour"] if rows else 1.0
        first = (rows[0] if rows else r)["trials_per_hour_from_first_start"]
        r["speedup_from_first_start"] = r["trials_per_hour_from_first_start"] / first if first else None
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        rows.append(r)
    return rows


if __name__ == "__main__":
    quick = "--full" not in sys.argv
    for row in run(quick, seeds=3 if not quick else 1):
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
