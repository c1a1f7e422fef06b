"""The sweep parent: validate everything, create the stores once, hand over to the supervisor.

``run_sweep`` is what ``python -m pipeline sweep`` and ``make sweep`` call:

1. Validate the sweep file, the memory each trial needs ``workers`` at once, and that both stores open:
   nothing is written before this passes (README, "Faults and resuming").
2. :func:`create_stores`, once, before any worker starts (concurrent first-time creation loses workers and
   can leave SQLite stores half-migrated; README, "Faults and resuming"): the MLflow experiment, the Optuna
   study (``load_if_exists``) and the sweep's parent run (its id kept in the study's user attrs, so a resume
   or a worker on another machine reuses it); trials left RUNNING by a killed earlier sweep are reaped
   (:mod:`pipeline.sweep.owners`) and a fresh study gets its start-up design. The result is a frozen
   :class:`Stores`.
3. The :class:`~pipeline.sweep.supervisor.Supervisor` starts N worker processes
   (:mod:`pipeline.sweep.worker`), each with one intra-op thread on CPU or pinned to one GPU
   (CUDA_VISIBLE_DEVICES), each in its own session: Ctrl-C reaches the parent, which forwards SIGTERM so
   every worker closes its trial and MLflow run before exiting. CPU workers fork from a forkserver that
   imported torch and Lightning once while the stores were being created (:mod:`pipeline.sweep.procs`);
   GPU workers get fresh interpreters. It prints a status line whenever a trial ends, replaces a worker
   that dies (kill -9), and at the end summarizes on the parent run (:mod:`pipeline.sweep.summary`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.names import KIND, KIND_SWEEP, STUDY
from pipeline.sweep.config import SweepConfig, parent_run_name
from pipeline.uris import absolute_uri, display_url, uri_flag


def gpu_count() -> int:
    """GPUs torch can use here (0 without importing torch where no GPU driver is present)."""
    from pipeline.training.machine import gpu_driver_absent

    if gpu_driver_absent():
        return 0
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


# workers: auto on a GPU machine. A sweep worker keeps its GPU mostly idle (launch-bound small RNNs; its
# CPU core builds the steps and writes each trial's record), so several share one GPU. Measured on one
# H200 with 16 cores (README, "Batched trials", GPU rows): the default sweep ran 7.0x the trials per hour
# with 12 workers on the GPU as with one (one trial each), and 14.9x to 19.6x with 12 workers of 32-trial
# stacks; 16 workers of 32 were not faster (17.3x against 19.6x in one 100 s window each). At most
# GPU_WORKERS_PER_GPU per GPU (the measured count; each
# holds a CUDA context, about 0.5 GiB of the card), and three quarters of the cores in all.
GPU_WORKERS_PER_GPU = 12


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def choose_workers(requested: int | None, sw: SweepConfig) -> tuple[int, list[str | None]]:
    """(workers, device per worker). ``auto``: on a GPU machine, up to :data:`GPU_WORKERS_PER_GPU` per
    GPU and three quarters of the cores in all (at least one per GPU), spread round-robin over the GPUs;
    else one per core (at most 4). ``base.trainer.accelerator: cpu`` keeps every worker on the CPU, on a
    GPU machine too (the user's choice, as for ``train``)."""
    n_gpu = 0 if sw.base_config().trainer.accelerator == "cpu" else gpu_count()
    if requested is None:
        requested = sw.workers
    if requested is None:
        if n_gpu:
            requested = max(n_gpu, min(n_gpu * GPU_WORKERS_PER_GPU, _cores() * 3 // 4))
        else:
            requested = max(1, min(4, _cores() // max(1, sw.base_config().trainer.threads)))
    requested = max(1, min(requested, sw.n_trials))
    # Worker i's GPU, as the parent's own CUDA_VISIBLE_DEVICES names it (a parent restricted to GPUs 2,3
    # puts its workers on 2 and 3, not on 0 and 1).
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    names = visible[:n_gpu] if len(visible) >= n_gpu else [str(g) for g in range(n_gpu)]
    devices: list[str | None] = [names[i % n_gpu] for i in range(requested)] if n_gpu else [None] * requested
    return requested, devices


def fit_workers(
    sw: SweepConfig, n_workers: int, devices: list[str | None], *, auto: bool, out=None
) -> tuple[int, list[str | None]]:
    """The memory check of ``n_workers`` workers, each holding its ``trials_per_worker`` stack (at most
    its share of the budget, ``ceil(n_trials / workers)``: pipeline.sweep.batch.next_trials). ``auto``
    (``workers: auto``): fewer workers where that many would not fit, said in one line; else the check's
    one-line refusal (README "Memory estimate"). ``out``: where the line goes (None: sys.stdout as it is
    at the call, not as it was at import: a notebook's or a test's capture replaces it)."""
    out = sys.stdout if out is None else out
    from pipeline.schema import ConfigError
    from pipeline.sweep.batch import trials_per_worker
    from pipeline.sweep.config import check_sweep_fits

    def check(n: int) -> None:
        used = devices[:n]
        n_gpu = len({d for d in used if d is not None})
        k = min(trials_per_worker(sw, bool(n_gpu)), -(-sw.n_trials // n))
        check_sweep_fits(sw, n, -(-n // n_gpu) if n_gpu else None, members=k)

    n = n_workers
    while True:
        try:
            check(n)
        except ConfigError as e:
            if not auto or e.key != "workers" or n == 1:
                raise
            n -= 1
            continue
        if n < n_workers:
            print(f"workers: auto -> {n} (memory: {n_workers} would not fit)", file=out)
        return n, devices[:n]


# ------------------------------------------------------------------------------------------ stores


@dataclass(frozen=True)
class Stores:
    """The sweep's stores, created once by the parent (:func:`create_stores`) before any worker starts."""

    url: str  # the Optuna storage URL (journal file path or RDB URL, driver added)
    mlflow_uri: str  # the MLflow tracking URI, absolute (workers and later readers agree on the file)
    experiment: str  # the MLflow experiment name (base.tracking.experiment)
    experiment_id: str
    parent_run_id: str  # the sweep's parent run: trials nest under it, the summary is written on it
    storage: Any  # the open Optuna storage (the budget lock of a PostgreSQL study needs its engine)
    study: Any  # the parent's optuna.Study handle on it


def create_stores(
    sw: SweepConfig, url: str, mlflow_uri: str, mlflow_flag: str = "base.tracking.uri"
) -> Stores:
    """Under the study's budget lock: its settings checked (:func:`_check_settings`), the MLflow
    experiment, the Optuna study and the parent run (reused on a resume), stale trials reaped and a fresh
    study's start-up design enqueued."""
    import optuna

    from pipeline.schema import ConfigError
    from pipeline.sweep.owners import reap_stale
    from pipeline.sweep.stores import budget_lock, open_storage
    from pipeline.sweep.study import make_pruner
    from pipeline.tracking import end_run, ensure_experiment

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    experiment = sw.base_config().tracking.experiment
    storage = open_storage(
        url, heartbeat_interval=sw.heartbeat.interval, grace=sw.heartbeat.grace, mlflow_uri=mlflow_uri
    )
    _check_settings(sw, storage)  # a resume that changes the study's settings: refused before any write
    with budget_lock(url, storage, sw.study):
        # Again under the lock, before the experiment and the study are made: of two first sweeps of one
        # study started at once with other settings, the second is refused here and writes nothing (it
        # made its MLflow experiment before the lock; tests/test_sweep.py plants the race).
        _check_settings(sw, storage)
        experiment_id = ensure_experiment(
            mlflow_uri, experiment, mlflow_flag
        )  # the key, or $MLFLOW_TRACKING_URI
        study = optuna.create_study(
            study_name=sw.study,
            storage=storage,
            direction="minimize",
            load_if_exists=True,
            pruner=make_pruner(sw),
        )
        if study.direction != optuna.study.StudyDirection.MINIMIZE:
            raise ConfigError("study", f"study {sw.study!r} exists and does not minimize")
        _check_settings(sw, storage, record=True)  # a new study (or an earlier version's) gets this sweep's
        run_id = _parent_run(sw, study, url, mlflow_uri, experiment, experiment_id)
        try:
            reap_stale(study, url, mlflow_uri)
            _enqueue_startup(sw, study)
        except BaseException:
            with contextlib.suppress(Exception):
                end_run(mlflow_uri, run_id, "FAILED")
            raise
    return Stores(url, mlflow_uri, experiment, experiment_id, run_id, storage, study)


def _check_settings(sw: SweepConfig, storage, record: bool = False) -> None:
    """Raise the ConfigError naming the first setting this sweep changes from the ones its study was
    created with (:func:`pipeline.sweep.settings.study_settings`). ``record``: a study without them (new,
    or made by a version before 2026-12-07) gets this sweep's."""
    from pipeline.sweep.settings import SETTINGS_ATTR, changed_settings, study_settings

    try:
        study_id = storage.get_study_id_from_name(sw.study)
    except KeyError:
        return  # a new study: nothing to keep
    now = study_settings(sw)
    recorded = storage.get_study_user_attrs(study_id).get(SETTINGS_ATTR)
    if isinstance(recorded, dict):
        err = changed_settings(sw.study, recorded, now)
        if err is not None:
            raise err
    elif record:
        storage.set_study_user_attr(study_id, SETTINGS_ATTR, now)


def _enqueue_startup(sw: SweepConfig, study) -> None:
    """A fresh study: the same start-up points for any worker count (:func:`pipeline.sweep.study.startup_design`)."""
    from pipeline.sweep.study import startup_design

    if study.get_trials(deepcopy=False) or "startup_design" in study.user_attrs:
        return
    design = startup_design(sw)
    for params in design:
        study.enqueue_trial(params, user_attrs={"startup": True})
    study.set_user_attr("startup_design", len(design))


def _parent_run(
    sw: SweepConfig, study, url: str, mlflow_uri: str, experiment: str, experiment_id: str
) -> str:
    """The parent run's id: the study's, opened again on a resume; else a new run with the sweep's params."""
    from mlflow.exceptions import MlflowException

    from pipeline.provenance import version_tags
    from pipeline.tracking import Recorder, client

    rid = study.user_attrs.get("mlflow_parent_run_id")
    if rid and study.user_attrs.get("mlflow_experiment_id") == experiment_id:
        with contextlib.suppress(MlflowException):
            if client(mlflow_uri).get_run(rid).info.lifecycle_stage == "active":
                return Recorder.attach(mlflow_uri, rid, reopen=True).run_id  # a resume: same parent run
    tags = {KIND: KIND_SWEEP, STUDY: sw.study, "storage": display_url(url), **version_tags()}
    rec = Recorder.start(
        mlflow_uri, experiment, parent_run_name(sw.study), tags=tags, experiment_id=experiment_id
    )
    params = {
        "n_trials": sw.n_trials,
        "sampler": json.dumps(asdict(sw.sampler)),
        "pruner": json.dumps(asdict(sw.pruner)),
        "penalty": sw.penalty,
        "prune.max_grad_norm": sw.prune.max_grad_norm,
    }
    params.update(
        {
            f"space.{p.key}": json.dumps(
                list(p.choices) if p.kind == "categorical" else {"low": p.low, "high": p.high, "log": p.log}
            )
            for p in sw.space
        }
    )
    rec.log_params(params)
    import yaml

    rec.log_text(yaml.safe_dump(sw.source, sort_keys=False), "sweep.yaml")
    study.set_user_attr("mlflow_parent_run_id", rec.run_id)
    study.set_user_attr("mlflow_experiment_id", experiment_id)
    study.set_user_attr("mlflow_experiment", experiment)
    return rec.run_id


# --------------------------------------------------------------------------------------------- run


def run_sweep(
    config_path: str,
    overrides: list[str] | None = None,
    *,
    workers: int | None = None,
    storage: str | None = None,
    out=None,
) -> int:
    """Load and validate the sweep file (nothing is written before this passes), then run it. ``out``:
    where the sweep prints (None: sys.stdout at the call)."""
    out = sys.stdout if out is None else out
    from pipeline.schema import ConfigError
    from pipeline.store_checks import probe_store
    from pipeline.sweep.config import WORKERS_MAX, check_study_name, load_sweep, unread_searched_keys
    from pipeline.sweep.stores import PG_CONNECT_TIMEOUT_S, check_storage
    from pipeline.sweep.supervisor import StopSignal, Supervisor
    from pipeline.uris import check_storage_url, resolve_uri

    sw = load_sweep(config_path, overrides)
    if workers is not None and not 1 <= workers <= WORKERS_MAX:  # the sweep file's bound for `workers`
        raise ConfigError("--workers", f"must be >= 1 and <= {WORKERS_MAX}, got {workers}")
    if storage is not None:
        check_storage_url("--storage", storage)
    url = sw.storage_url(storage)
    check_study_name(sw.study, url)
    mlflow_uri = absolute_uri(resolve_uri(sw.base_config().tracking.uri))
    from pipeline.training.machine import check_accelerator, check_data

    check_accelerator(sw.base_config(), "base.trainer.accelerator")  # a GPU asked for where there is none
    check_data(sw.base_config(), "base.task.name")
    for p in sw.space:  # a searched task: each choice's data (a choice is valid with the base: space.py)
        for choice in p.choices if p.key == "task.name" else ():
            check_data(sw.trial_config({p.key: choice}), "space.task.name")
    n_workers, devices = choose_workers(workers, sw)
    # Everything is checked before anything is written (README "Faults and resuming"): every trial the space
    # can produce fits in memory, n_workers at once; the MLflow store opens; the Optuna store replays.
    n_workers, devices = fit_workers(
        sw, n_workers, devices, auto=workers is None and sw.workers is None, out=out
    )
    mlflow_flag = uri_flag(sw.base_config().tracking.uri, "base.tracking.uri")
    probe_store(mlflow_uri, mlflow_flag)
    default = storage is None and sw.storage is None  # optuna/<study>.journal: its folder is made
    check_storage(url, "--storage" if storage is not None else "storage", mlflow_uri, mlflow_flag, default)
    for note in unread_searched_keys(sw):
        print(f"note: {note}", file=out, flush=True)
    # CPU workers fork from a preloaded forkserver unless PIPELINE_SWEEP_FORK=0 (an escape hatch).
    fork = devices[0] is None and os.environ.get("PIPELINE_SWEEP_FORK", "1") != "0"
    t0 = time.time()
    # libpq's connect bound for MLflow's PostgreSQL store too (Optuna's: sweep.stores.libpq_args), unless
    # set: inherited by the forkserver and the workers, and taken back when the sweep ends (a notebook)
    set_here = "PGCONNECT_TIMEOUT" not in os.environ
    os.environ.setdefault("PGCONNECT_TIMEOUT", str(PG_CONNECT_TIMEOUT_S))
    try:
        with StopSignal() as stop:  # from here a Ctrl-C stops the sweep cleanly (exit 130), stores and all
            if fork:
                from pipeline.sweep.procs import prestart

                # The forkserver's imports (torch, Lightning, MLflow, Optuna: 7 s of CPU measured here) run
                # while this process imports MLflow and creates the stores: two cores, two jobs.
                prestart()
            try:
                stores = create_stores(sw, url, mlflow_uri, mlflow_flag)
            except BaseException:
                if fork:
                    from pipeline.sweep.procs import stop as stop_forkserver

                    stop_forkserver()
                raise
            return Supervisor(sw, stores, devices, fork=fork, stop=stop, t0=t0, out=out).run()
    finally:
        if set_here:
            os.environ.pop("PGCONNECT_TIMEOUT", None)
        if fork:  # a process that runs sweeps in-process (a notebook) reaps no orphans after them
            from pipeline.sweep.procs import become_subreaper

            become_subreaper(False)
