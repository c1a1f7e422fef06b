"""``run(cfg)``: the one composition root. Task -> data -> module -> callbacks -> recorder -> Trainer.

Every run is closed explicitly: FINISHED (including diverged runs, whose tags say so), KILLED on
Ctrl-C / SIGTERM, FAILED on any other exception, never left RUNNING.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

from pipeline.config import Config
from pipeline.names import STATUS
from pipeline.signals import (
    Terminated,
    ctrl_c_not_exit_1,
    deferred,
    received,
    received_count,
    terminate_as_exception,
)
from pipeline.training import record
from pipeline.training.record import Monitors, RunResult


def default_run_name(cfg: Config) -> str:
    """``<task>-T<T>-<cell>-<init>-g<g>-lr<lr>-s<seed>-<HHMMSS>-<4 hex>``: readable, and distinct even for runs
    started in the same second (a script or sweep over learning rates starts several per second)."""
    m = cfg.model
    return (
        f"{cfg.task.name}-T{cfg.task.seq_len}-{m.cell}-{m.init}-g{m.init_scale:.3g}-lr{cfg.optim.lr:.3g}"
        f"-s{cfg.seed}-{time.strftime('%H%M%S')}-{secrets.token_hex(2)}"
    )


def configure_torch(cfg: Config) -> None:
    import torch

    torch.set_num_threads(cfg.trainer.threads)
    # Vanishing tanh states produce denormals; unflushed they slow CPU training 3-9x (README, "How it works").
    # The float64 profile turns flushing off while it runs, so diagnostics stay exact.
    torch.set_flush_denormal(True)


# Lightning's advice that does not apply to this pipeline, silenced by (category, message regex); each
# is a UserWarning (Lightning's PossibleUserWarning is a subclass) or a FutureWarning. Everything else shows.
LIGHTNING_NOISE: tuple[tuple[type[Warning], str], ...] = (
    # Batches are generated on the device in the training process (training/data.py, num_workers=0):
    # worker processes would only add start-up time.
    (UserWarning, r".*does not have many workers.*"),
    # trainer.accelerator is a config key (README, "Configuration reference"): CPU on a GPU machine is
    # the user's choice.
    (UserWarning, r".*GPU available but not used.*"),
    # Lightning's own use of a torch pytree class that torch deprecated: nothing this pipeline can change.
    (FutureWarning, r".*LeafSpec.*"),
    # OnDeviceBatches is an IterableDataset with a length (the epoch size) loaded without worker
    # processes: the duplicate-data caveat for multi-worker loading cannot occur.
    (UserWarning, r".*`IterableDataset` has `__len__` defined.*"),
    # Resuming from a mid-epoch checkpoint (``--resume``): the training stream skips the batches already
    # trained (training/data.py), so the restored run continues exactly, which the advice assumes it cannot.
    (UserWarning, r".*resuming from a checkpoint that ended before the epoch ended.*"),
)


def quiet_lightning() -> None:
    """The one home of the training stage's warning policy: Lightning's loggers at ERROR (no banner per
    run; a sweep starts many) and the :data:`LIGHTNING_NOISE` warnings ignored, each by category and
    message. No blanket ignores."""
    # Lightning sets its loggers to INFO when first imported: import it first, then quiet it.
    import pytorch_lightning  # noqa: F401

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category, message in LIGHTNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


def run(
    cfg: Config,
    *,
    parent_run_id: str | None = None,
    extra_tags: dict[str, Any] | None = None,
    callbacks: list | None = None,
    experiment_id: str | None = None,
    progress: bool = False,
    checkpoint: bool = False,
    resume: str | None = None,
    on_done: Callable[[RunResult], None] | None = None,
) -> RunResult:
    """Train one configuration and record it; returns the run's summary.

    ``callbacks``: extra Lightning callbacks (the sweep's pruning hook). A callback may set
    ``pl_module.pruned = True`` and ``trainer.should_stop = True`` to stop a run early as pruned.
    ``progress``: print one line per validation (``python -m pipeline train``; training/progress.py),
    unless ``trainer.progress_bar`` shows Lightning's bar instead.
    ``checkpoint``: log a Lightning checkpoint at every validation (``checkpoints/last.ckpt``;
    training/saved.py). ``resume``: the id of such a run to continue from its checkpoint (reopened, the
    same MLflow run; ``cfg`` is its own config, :func:`pipeline.training.saved.resume_config`).
    ``on_done(result)``: called once the run is closed FINISHED, in the same step for SIGTERM
    (:func:`~pipeline.signals.deferred`): a sweep tells its trial there, so a signal cannot fall between
    a run that says it finished and its trial (as ``run_stack``'s ``on_done``).
    """
    from pipeline.training.tasks import task_of

    quiet_lightning()
    configure_torch(cfg)
    task = task_of(cfg.task)
    with contextlib.ExitStack() as stack:
        ckpt = None
        if resume is not None:
            from pipeline.tracking import Recorder
            from pipeline.training.saved import download_checkpoint

            ckpt = download_checkpoint(
                resume, cfg.tracking.uri, stack.enter_context(tempfile.TemporaryDirectory())
            )

            def open_run():
                rec = Recorder.attach(cfg.tracking.uri, resume, reopen=True)
                for tag in (STATUS, "error"):  # the interrupted attempt's; this one sets its own
                    with contextlib.suppress(Exception):
                        rec.client.delete_tag(resume, tag)
                return rec

        else:

            def open_run():
                return _start_recorder(cfg, parent_run_id, extra_tags, experiment_id)

        return _run_recorded(
            cfg, task, open_run, callbacks or [], progress, checkpoint or resume is not None, ckpt, on_done
        )


def _run_recorded(
    cfg: Config, task, open_run, callbacks: list, progress: bool, checkpoint: bool, ckpt, on_done=None
) -> RunResult:
    """Open the run (``open_run()``: its Recorder), train, and close it with the status the code path
    that ended it says. SIGTERM is an exception from before the run is opened until it is closed
    (:func:`~pipeline.signals.terminate_as_exception`; Lightning's fit alone would leave the run's start
    and its record at the end to the default action, which kills the process and leaves the run
    RUNNING), deferred while the run opens and while it closes (:func:`~pipeline.signals.deferred`)."""
    with terminate_as_exception():
        return _open_train_close(cfg, task, open_run, callbacks, progress, checkpoint, ckpt, on_done)


def _open_train_close(
    cfg: Config, task, open_run, callbacks: list, progress: bool, checkpoint: bool, ckpt, on_done
) -> RunResult:
    rec = monitor = result = error = None
    status, signals_before = "FAILED", received_count()
    try:
        with deferred():
            rec = open_run()
            monitor = _system_metrics(cfg, rec)
        result = _train(cfg, task, rec, callbacks, progress=progress, checkpoint=checkpoint, ckpt=ckpt)
        status = "FINISHED"
        return result
    except (KeyboardInterrupt, SystemExit, Terminated):
        status = "KILLED"
        raise
    except BaseException as e:
        error = e
        if received(signals_before):  # a SIGTERM whose exception this one replaced: stopped, not failed
            status = "KILLED"
        raise
    finally:
        with deferred():
            if monitor is not None:
                with contextlib.suppress(Exception):
                    monitor.finish()  # stops its thread (at most one sampling interval's values are lost)
            if rec is not None:
                close_run(rec, status, error)
                if status == "FINISHED" and on_done is not None:
                    on_done(result)
                if checkpoint and status != "FINISHED" and rec.run_id:
                    print(
                        f"resume: {resume_command(rec.run_id, cfg.tracking.uri)}", file=sys.stderr, flush=True
                    )


def resume_command(run_id: str, uri: str | None) -> str:
    """The command that resumes ``run_id`` (README, "Saved models and resuming"), naming its store
    (``tracking.uri``, else $MLFLOW_TRACKING_URI) unless that is the default ``mlflow.db``: without it the
    command printed after a run in another store failed, "no MLflow store at mlflow.db" (new-user
    walkthrough)."""
    import os
    import shlex

    from pipeline.uris import DEFAULT_URI

    cmd = f"python -m pipeline train --resume {run_id}"
    store = uri or os.environ.get("MLFLOW_TRACKING_URI")
    return cmd if not store or store == DEFAULT_URI else f"{cmd} {shlex.quote(f'tracking.uri={store}')}"


def close_run(rec, status: str, error: BaseException | None = None) -> None:
    """End a run with ``status`` (FINISHED, FAILED or KILLED), tagged ``status`` unless it finished and
    ``error`` (the exception's type and message) when one failed it; the run of a stack's member too."""
    with contextlib.suppress(Exception):
        tags: dict[str, Any] = {STATUS: status.lower()} if status != "FINISHED" else {}
        if error is not None:
            tags["error"] = f"{type(error).__name__}: {error}"[:5000]
        rec.set_tags(tags)
    rec.close(status)


def _start_recorder(
    cfg: Config, parent_run_id: str | None, extra_tags: dict[str, Any] | None, experiment_id: str | None
):
    """The run's Recorder (a NullRecorder when tracking is off), started with its identity tags."""
    from pipeline.provenance import version_tags
    from pipeline.tracking import NullRecorder, Recorder

    tags = {"task": cfg.task.name, "cell": cfg.model.cell, "init": cfg.model.init, **version_tags()}
    tags.update(extra_tags or {})
    t = cfg.tracking
    if not t.enabled:
        return NullRecorder()
    return Recorder.start(
        t.uri,
        t.experiment,
        t.run_name or default_run_name(cfg),
        tags=tags,
        parent_run_id=parent_run_id,
        experiment_id=experiment_id,
    )


SYSTEM_METRICS_INTERVAL_S = 10.0  # MLflow's default; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it


def _system_metrics(cfg: Config, rec):
    """With ``tracking.system_metrics``: MLflow's own monitor (``mlflow.system_metrics``), started on the
    run; it logs ``system/*`` metrics from a thread and stops when :func:`run` calls ``finish()``. None
    otherwise. It reads the environment variables MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL and
    MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING (MLflow's documentation, "System Metrics")."""
    if not (cfg.tracking.system_metrics and cfg.tracking.enabled and rec.run_id):
        return None
    # MLflow announces start and stop at INFO on every run; its warnings still show.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        rec.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, tracking_uri=rec.uri
    )
    monitor.start()
    return monitor


def _trainer(cfg: Config, callbacks: list):
    import pytorch_lightning as pl

    accel = {"gpu": "gpu", "cuda": "gpu"}.get(cfg.trainer.accelerator, cfg.trainer.accelerator)
    return pl.Trainer(
        accelerator=accel,
        devices=1,
        max_steps=cfg.trainer.max_steps,
        max_epochs=-1,
        val_check_interval=min(cfg.trainer.val_every, cfg.trainer.max_steps),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=cfg.trainer.progress_bar,
        deterministic=False,
        callbacks=callbacks,
    )


def _train(
    cfg: Config, task, rec, extra_callbacks: list, progress: bool = False, checkpoint: bool = False, ckpt=None
) -> RunResult:
    """Fit (plus a final validation when the last step had none), then summarise and record.

    ``ckpt``: (local checkpoint path, its step) of a resumed run, whose params and config are recorded."""
    from pipeline.training import callbacks as dg
    from pipeline.training import saved
    from pipeline.training.data import TaskDataModule
    from pipeline.training.module import RNNTrainingModule

    if ckpt is None:
        record.record_start(cfg, task, rec)
    else:
        rec.set_tags({saved.RESUMED_AT_STEP: ckpt[1]})
    module = RNNTrainingModule(cfg, task)
    module.pruned = False
    data = TaskDataModule(task, cfg.task.batch_size, cfg.task.val_size, cfg.trainer.max_steps, cfg.seed)
    mon = Monitors(
        dg.GradientMonitor(rec, cfg.trainer.log_every, skip=cfg.remedy.skip.zscore > 0),
        dg.ProfileMonitor(rec, cfg, task),
        dg.ValidationLogger(rec, task),
    )
    own = [mon.grads, mon.prof, mon.val]
    if progress and not cfg.trainer.progress_bar:
        from pipeline.training.progress import ProgressPrinter

        own.append(ProgressPrinter(cfg, task, mon.grads, mon.prof))  # after the monitors it reads
    if checkpoint:
        own.append(saved.RunCheckpoint(rec, mon))  # after ValidationLogger: its state has this validation
    trainer = _trainer(cfg, [*own, *extra_callbacks])
    with terminate_as_exception(), ctrl_c_not_exit_1():
        trainer.fit(module, datamodule=data, ckpt_path=None if ckpt is None else str(ckpt[0]))
        if mon.prof.regime is None:
            # Lightning runs no training loop, so no on_train_end, when the checkpoint is at max_steps (a
            # run killed during its end-of-run work): the last pass and the verdict, as the loop's end.
            mon.prof.on_train_end(trainer, module)
        module.mark_nonfinite_weights(trainer.global_step)
        if module.diverged_step is None and mon.val.last_step != trainer.global_step:
            trainer.validate(module, datamodule=data, verbose=False)  # final validation
    return record.record_end(cfg, task, rec, module, mon, trainer.global_step)
