"""``run(cfg)``: the one composition root. Task -> data -> module -> callbacks -> recorder -> Trainer.

Every run is closed explicitly: FINISHED (including diverged runs, whose tags say so), KILLED on
Ctrl-C / SIGTERM, FAILED on any other exception, never left RUNNING.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config
from pipeline.signals import Terminated, terminate_as_exception


@dataclass
class RunResult:
    run_id: str | None
    status: str  # FINISHED | FAILED | KILLED
    regime: str  # vanishing | healthy | exploding | diverged
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
    return (f"{cfg.task.name}-T{cfg.task.seq_len}-{m.cell}-{m.init}-g{m.init_scale:.3g}-lr{cfg.optim.lr:.3g}"
            f"-s{cfg.seed}-{time.strftime('%H%M%S')}-{secrets.token_hex(2)}")


def configure_torch(cfg: Config) -> None:
    import torch

    torch.set_num_threads(cfg.trainer.threads)
    # Vanishing tanh states produce denormals; unflushed they slow CPU training 3-9x (README, "How it works").
    # The float64 profile turns flushing off while it runs, so diagnostics stay exact.
    torch.set_flush_denormal(True)


def quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")


def run(cfg: Config, *, parent_run_id: str | None = None, extra_tags: dict[str, Any] | None = None,
        callbacks: list | None = None, experiment_id: str | None = None) -> RunResult:
    """Train one configuration and record it; returns the run's summary.

    ``callbacks``: extra Lightning callbacks (the sweep's pruning hook). A callback may set
    ``pl_module.pruned = True`` and ``trainer.should_stop = True`` to stop a run early as pruned.
    """
    import pytorch_lightning as pl

    from pipeline.tracking import NullRecorder, Recorder, version_tags
    from pipeline.training import callbacks as dg
    from pipeline.training.data import TaskDataModule
    from pipeline.training.module import RNNTrainingModule
    from pipeline.training.tasks import make_task

    quiet_lightning()
    configure_torch(cfg)
    task = make_task(cfg.task.name, cfg.task.seq_len)
    tags = {"task": cfg.task.name, "cell": cfg.model.cell, "init": cfg.model.init, **version_tags()}
    tags.update(extra_tags or {})
    t = cfg.tracking
    if t.enabled:
        rec = Recorder.start(t.uri, t.experiment, t.run_name or default_run_name(cfg), tags=tags,
                             parent_run_id=parent_run_id, experiment_id=experiment_id)
    else:
        rec = NullRecorder()
    status = "FAILED"
    try:
        rec.log_params(cfg.flat())
        rec.log_text(cfg.to_yaml(), "config.yaml")
        rec.log_metrics({"task/baseline": task.baseline}, 0)
        module = RNNTrainingModule(cfg, task)
        module.pruned = False
        data = TaskDataModule(task, cfg.task.batch_size, cfg.task.val_size, cfg.trainer.max_steps, cfg.seed)
        grads = dg.GradientMonitor(rec, cfg.trainer.log_every)
        prof = dg.ProfileMonitor(rec, cfg, task)
        val = dg.ValidationLogger(rec, task)
        accel = {"gpu": "gpu", "cuda": "gpu"}.get(cfg.trainer.accelerator, cfg.trainer.accelerator)
        trainer = pl.Trainer(
            accelerator=accel, devices=1, max_steps=cfg.trainer.max_steps, max_epochs=-1,
            val_check_interval=min(cfg.trainer.val_every, cfg.trainer.max_steps),
            check_val_every_n_epoch=None, num_sanity_val_steps=0,
            logger=False, enable_checkpointing=False, enable_model_summary=False,
            enable_progress_bar=cfg.trainer.progress_bar, deterministic=False,
            callbacks=[grads, prof, val, *(callbacks or [])],
        )
        with terminate_as_exception():
            trainer.fit(module, datamodule=data)
            if module.diverged_step is None and val.last_step != trainer.global_step:
                trainer.validate(module, datamodule=data, verbose=False)  # final validation
        result = _finish(cfg, task, rec, module, grads, prof, val, trainer.global_step)
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
        with contextlib.suppress(Exception):
            rec.set_tags({"status": status.lower()} if status != "FINISHED" else {})
        rec.close(status)


def _finish(cfg, task, rec, module, grads, prof, val, steps: int) -> RunResult:
    from pipeline.training import callbacks as dg

    d = cfg.diagnostics
    diverged = module.diverged_step is not None
    last, first = prof.last, prof.first
    max_pre = grads.max_norm_preclip
    regime = dg.verdict(diverged, last, max_pre, d)
    first_pre = float(grads.column("norm_preclip")[0]) if len(grads.history) else None
    regime_init = dg.verdict(False, first, first_pre, d)
    v = module.val_loss
    ratio = v / task.baseline if v is not None and math.isfinite(v) else None
    solved = bool(not diverged and v is not None and math.isfinite(v) and v < task.solved_below)
    metrics = {
        "grad/clip_rate": grads.clip_rate,
        "grad/max_norm_preclip": max_pre,
        "val/best_loss": val.best,
        "train/steps": steps,
    }
    metrics.update({k: v2 for k, v2 in last.items() if k != "step"})
    if v is not None:
        metrics.update({"val/loss": v, "val/loss_ratio": ratio})
    rec.log_metrics({k: x for k, x in metrics.items() if x is not None}, steps)
    tags = {"regime": regime, "regime_init": regime_init, "solved": str(solved).lower(),
            "pruned": str(bool(getattr(module, "pruned", False))).lower()}
    if diverged:
        tags["diverged_step"] = module.diverged_step
    rec.set_tags(tags)
    frame = prof.profile_frame()
    rec.log_frame(frame, "diagnostics/bptt_profile.parquet")
    hist = grads.history
    if len(hist):
        import pandas as pd

        from pipeline.training.module import RECORD_FIELDS
        df = pd.DataFrame(hist, columns=list(RECORD_FIELDS))
        df.insert(0, "step", grads.steps[: len(df)])
        rec.log_frame(df, "diagnostics/grad_norms.parquet")
    if d.plots and cfg.tracking.enabled:
        from pipeline.report.figures import run_summary

        # The verdict beside the outcome: healthy gradients that learned nothing must not read as success.
        title = (f"{cfg.task.name} T={cfg.task.seq_len} {cfg.model.cell} {cfg.model.init} g={cfg.model.init_scale:g}: "
                 f"{run_summary(regime, ratio, solved)}")
        import matplotlib.pyplot as plt

        fig = dg.plot_profile(frame, task, title)
        rec.log_figure(fig, "plots/bptt_profile.png")
        plt.close(fig)
        if len(hist):
            thr = cfg.clip.threshold if cfg.clip.mode == "norm" else None
            fig = dg.plot_grad_norms(grads.steps[: len(hist)], grads.column("norm_preclip"),
                                     grads.column("norm_postclip"), thr, title)
            rec.log_figure(fig, "plots/grad_norms.png")
            plt.close(fig)
    return RunResult(run_id=rec.run_id, status="FINISHED", regime=regime, val_loss=v, val_loss_ratio=ratio,
                     solved=solved, diverged_step=module.diverged_step,
                     pruned=bool(getattr(module, "pruned", False)), steps=steps, metrics=metrics, tags=tags)
