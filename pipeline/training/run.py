"""``run(cfg)``: the one composition root. Task -> data -> module -> callbacks -> recorder -> Trainer.

Every run is closed explicitly: FINISHED (including diverged runs, whose tags say so), KILLED on
Ctrl-C / SIGTERM, FAILED on any other exception, never left RUNNING.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config
from pipeline.names import DIVERGED, MLFLOW_NOTE, REGIME, STATUS
from pipeline.signals import Terminated, terminate_as_exception


@dataclass
class RunResult:
    run_id: str | None
    status: str  # FINISHED | FAILED | KILLED
    regime: str  # pipeline.names.REGIMES: vanishing | healthy | exploding | diverged
    val_loss: float | None
    val_loss_ratio: float | None  # val_loss / task baseline (1.0 = learned nothing)
    solved: bool
    diverged_step: int | None
    pruned: bool
    steps: int
    metrics: dict[str, Any] = field(default_factory=dict)  # final summary metrics
    tags: dict[str, Any] = field(default_factory=dict)


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
) -> RunResult:
    """Train one configuration and record it; returns the run's summary.

    ``callbacks``: extra Lightning callbacks (the sweep's pruning hook). A callback may set
    ``pl_module.pruned = True`` and ``trainer.should_stop = True`` to stop a run early as pruned.
    ``progress``: print one line per validation (``python -m pipeline train``; training/progress.py),
    unless ``trainer.progress_bar`` shows Lightning's bar instead.
    ``checkpoint``: log a Lightning checkpoint at every validation (``checkpoints/last.ckpt``;
    training/saved.py). ``resume``: the id of such a run to continue from its checkpoint (reopened, the
    same MLflow run; ``cfg`` is its own config, :func:`pipeline.training.saved.resume_config`).
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
            rec = Recorder.attach(cfg.tracking.uri, resume, reopen=True)
            for tag in (STATUS, "error"):  # the interrupted attempt's; this one sets its own
                with contextlib.suppress(Exception):
                    rec.client.delete_tag(resume, tag)
        else:
            rec = _start_recorder(cfg, parent_run_id, extra_tags, experiment_id)
        return _run_recorded(
            cfg, task, rec, callbacks or [], progress, checkpoint or resume is not None, ckpt
        )


def _run_recorded(
    cfg: Config, task, rec, callbacks: list, progress: bool, checkpoint: bool, ckpt
) -> RunResult:
    """Train on an open Recorder and close its run with the status the code path that ended it says."""
    monitor = _system_metrics(cfg, rec)
    status = "FAILED"
    try:
        result = _train(cfg, task, rec, callbacks, progress=progress, checkpoint=checkpoint, ckpt=ckpt)
        status = "FINISHED"
        return result
    except (KeyboardInterrupt, SystemExit, Terminated):
        status = "KILLED"
        raise
    except BaseException as e:
        with contextlib.suppress(Exception):
            rec.set_tags({"error": f"{type(e).__name__}: {e}"[:5000]})
        raise
    finally:
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()  # stops its thread (at most one sampling interval's values are lost)
        with contextlib.suppress(Exception):
            rec.set_tags({STATUS: status.lower()} if status != "FINISHED" else {})
        rec.close(status)
        if checkpoint and status != "FINISHED" and rec.run_id:
            print(f"resume: python -m pipeline train --resume {rec.run_id}", file=sys.stderr, flush=True)


def _start_recorder(
    cfg: Config, parent_run_id: str | None, extra_tags: dict[str, Any] | None, experiment_id: str | None
):
    """The run's Recorder (a NullRecorder when tracking is off), started with its identity tags."""
    from pipeline.tracking import NullRecorder, Recorder, version_tags

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


@dataclass
class Monitors:
    """The run's own callbacks, read after training by :func:`summarize_run`."""

    grads: Any  # callbacks.GradientMonitor
    prof: Any  # callbacks.ProfileMonitor
    val: Any  # callbacks.ValidationLogger


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
        record_start(cfg, task, rec)
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
    with terminate_as_exception():
        trainer.fit(module, datamodule=data, ckpt_path=None if ckpt is None else str(ckpt[0]))
        if module.diverged_step is None and mon.val.last_step != trainer.global_step:
            trainer.validate(module, datamodule=data, verbose=False)  # final validation
    return record_end(cfg, task, rec, module, mon, trainer.global_step)


def record_start(cfg: Config, task, rec) -> None:
    """What every run records before its first step: params, ``config.yaml``, ``task/baseline``."""
    from pipeline.training import saved

    rec.log_params(cfg.flat())
    rec.log_text(cfg.to_yaml(), saved.CONFIG)
    rec.log_metrics({"task/baseline": task.baseline}, 0)


def record_end(cfg: Config, task, rec, module, mon: Monitors, steps: int) -> RunResult:
    """What every run records after training (one trained alone, or a member of a stack: README,
    "Batched trials"): summary metrics, verdict tags, description, artifacts, weights."""
    from pipeline.training import saved

    summary = summarize_run(cfg, task, module, mon, steps)
    rec.log_metrics({k: x for k, x in summary.metrics.items() if x is not None}, steps)
    rec.set_tags({**summary.tags, MLFLOW_NOTE: describe(cfg, task, summary)})
    log_artifacts(rec, cfg, task, mon, summary)
    if cfg.tracking.log_model:
        saved.log_weights(rec, module.model)
    return summary.result(rec.run_id, steps)


@dataclass(frozen=True)
class Summary:
    """What a finished run says about itself: its final metrics and tags, and the RunResult fields."""

    regime: str
    val_loss: float | None
    val_loss_ratio: float | None
    solved: bool
    diverged_step: int | None
    pruned: bool
    metrics: dict[str, Any]
    tags: dict[str, Any]

    @property
    def title(self) -> str:
        """The verdict beside the outcome: healthy gradients that learned nothing must not read as success."""
        from pipeline.plots import run_summary

        return run_summary(self.regime, self.val_loss_ratio, self.solved)

    def result(self, run_id: str | None, steps: int) -> RunResult:
        return RunResult(
            run_id=run_id,
            status="FINISHED",
            regime=self.regime,
            val_loss=self.val_loss,
            val_loss_ratio=self.val_loss_ratio,
            solved=self.solved,
            diverged_step=self.diverged_step,
            pruned=self.pruned,
            steps=steps,
            metrics=self.metrics,
            tags=self.tags,
        )


def summarize_run(cfg: Config, task, module, mon: Monitors, steps: int) -> Summary:
    """Pure: the trained module and the monitors' records -> the run's verdict, summary metrics and tags."""
    from pipeline.training import callbacks as dg
    from pipeline.training.remedies import remedy_summary

    d = cfg.diagnostics
    grads, last = mon.grads, mon.prof.last
    diverged = module.diverged_step is not None
    max_pre = grads.max_norm_preclip
    regime = dg.verdict(diverged, last, max_pre, d)
    first_pre = float(grads.column("norm_preclip")[0]) if len(grads.history) else None
    regime_init = dg.verdict(False, mon.prof.first, first_pre, d)
    v = module.val_loss
    ratio = v / task.baseline if v is not None and math.isfinite(v) else None
    solved = bool(not diverged and v is not None and math.isfinite(v) and v < task.solved_below)
    pruned = bool(getattr(module, "pruned", False))
    metrics = {
        "grad/clip_rate": grads.clip_rate,
        "grad/max_norm_preclip": max_pre,
        "val/best_loss": mon.val.best,
        "train/steps": steps,
    }
    metrics.update({k: v2 for k, v2 in last.items() if k != "step"})
    if v is not None:
        metrics.update({"val/loss": v, "val/loss_ratio": ratio})
    if module.val_accuracy is not None:
        metrics["val/accuracy"] = module.val_accuracy
    tags = {
        REGIME: regime,
        "regime_init": regime_init,
        "solved": str(solved).lower(),
        "pruned": str(pruned).lower(),
    }
    if diverged:
        tags["diverged_step"] = module.diverged_step
    more_metrics, more_tags = remedy_summary(cfg, module.remedies)
    metrics.update(more_metrics)
    tags.update(more_tags)
    return Summary(regime, v, ratio, solved, module.diverged_step, pruned, metrics, tags)


def describe(cfg: Config, task, summary: Summary) -> str:
    """The run's description (``mlflow.note.content``): the verdict in a sentence. The regime, the decades
    the long-range gradient lost or gained over T (``bptt/log10_ratio``), and whether the task was learned
    (``val/loss_ratio`` against the solved threshold ``task.solved_below / baseline``; README, "Tasks")."""
    m = summary.metrics
    head = f"Regime **{summary.regime}**"
    if summary.regime == DIVERGED:
        head += f" at step {summary.diverged_step}"
    r = m.get("bptt/log10_ratio")
    over = f"T = {cfg.task.seq_len}"
    overflow = m.get("bptt/overflow_step")
    if overflow is not None and math.isfinite(overflow) and overflow > 0:
        flow = f"the float64 forward overflowed at step {int(overflow)}, so the gradient is undefined"
    elif r is None:
        flow = "no gradient profile was measured"
    elif math.isnan(r):
        flow = "no long-range gradient reaches either end of the sequence"
    elif math.isinf(r):
        flow = f"the long-range gradient {'never reaches step 1' if r < 0 else 'grows without bound'} over {over}"
    else:
        verb = "loses" if r < 0 else "gains"
        flow = (
            f"the long-range gradient {verb} {abs(r):.3g} decades over {over} (`bptt/log10_ratio` = {r:.3g})"
        )
    threshold = task.solved_below / task.baseline
    ratio = summary.val_loss_ratio
    if ratio is None:
        learned = "no finite validation loss, so the task was not learned"
    elif summary.solved:
        learned = f"the task was learned: `val/loss_ratio` = {ratio:.3g}, below the solved threshold {threshold:.3g}"
    else:
        learned = (
            f"the task was not learned: `val/loss_ratio` = {ratio:.3g}, above the solved threshold {threshold:.3g}"
            + (" (1 = learned nothing)" if ratio >= 0.9 else "")
        )
    return f"{head}: {flow}; {learned}."


def log_artifacts(rec, cfg: Config, task, mon: Monitors, summary: Summary) -> None:
    """The run's diagnostics frames (``diagnostics/*.parquet``, each with a ``.csv`` copy beside it for the
    UI's preview) and, with ``diagnostics.plots``, its plots (``plots/bptt_profile.png``, ``plots/grad_norms.png``)."""
    from pipeline.training import callbacks as dg

    frame = mon.prof.profile_frame()
    rec.log_frame(frame, "diagnostics/bptt_profile.parquet", csv=True)
    grads = mon.grads
    hist = grads.history
    if len(hist):
        import pandas as pd

        from pipeline.training.module import RECORD_FIELDS

        df = pd.DataFrame(hist, columns=list(RECORD_FIELDS))
        df.insert(0, "step", grads.steps[: len(df)])
        rec.log_frame(df, "diagnostics/grad_norms.parquet", csv=True)
    if not (cfg.diagnostics.plots and cfg.tracking.enabled):
        return
    from pipeline.plots import plt

    m = cfg.model
    title = f"{cfg.task.name} T={cfg.task.seq_len} {m.cell} {m.init} g={m.init_scale:g}: {summary.title}"
    fig = dg.plot_profile(frame, task, title)
    rec.log_figure(fig, "plots/bptt_profile.png")
    plt.close(fig)
    if len(hist):
        thr = cfg.clip.threshold if cfg.clip.mode == "norm" else None
        fig = dg.plot_grad_norms(
            grads.steps[: len(hist)],
            grads.column("norm_preclip"),
            grads.column("norm_postclip"),
            thr,
            title,
            skipped=grads.column("skipped") > 0,
        )
        rec.log_figure(fig, "plots/grad_norms.png")
        plt.close(fig)
