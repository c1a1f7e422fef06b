"""What a run records: before its first step (params, ``config.yaml``, ``task/baseline``) and after
training (summary metrics, the verdict tags, the description, diagnostics frames, figures, weights), the
same for a run trained alone (:func:`pipeline.training.run.run`) and for a member of a stack
(:mod:`pipeline.training.stacked`; README, "Batched trials"): one code path, so the records cannot drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.cell_keys import DEFAULT_G, effective_scale
from pipeline.config import Config
from pipeline.names import DIVERGED, MLFLOW_NOTE, REGIME


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


@dataclass
class Monitors:
    """The run's own callbacks, read after training by :func:`summarize_run`."""

    grads: Any  # callbacks.GradientMonitor
    prof: Any  # callbacks.ProfileMonitor
    val: Any  # callbacks.ValidationLogger


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
    reason: str = ""  # which verdict rule decided (tag regime_reason; callbacks.judge)

    @property
    def title(self) -> str:
        """The verdict beside the outcome: healthy gradients that learned nothing must not read as success."""
        from pipeline.plots import run_summary

        return run_summary(self.regime, self.val_loss_ratio, self.solved, self.reason, self.diverged_step)

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


def init_label(m) -> str:
    """How a cell was initialised, for a figure's title: the W_hh scheme and scale g where the cell has a
    W_hh (``model.init_scale`` is read by those cells alone), else the keys its own init reads: a title
    "lem default g=1" named a scale no lem reads (found by a walkthrough)."""
    if m.cell == "lru":
        return f"lru r=[{m.r_min:g}, {m.r_max:g}]"
    if m.cell == "lem":
        return f"lem dt={m.dt:g}"
    if m.cell == "cornn":
        return f"cornn dt={m.dt:g} gamma={m.gamma:g} eps={m.epsilon:g}"
    if m.cell == "mingru":
        return "mingru"
    g = effective_scale(m.cell, m.init, m.init_scale)
    scale = (
        "u~U(0,1)" if g is None else "g=1/sqrt(3)" if g == DEFAULT_G and m.init == "default" else f"g={g:g}"
    )
    return f"{m.cell} {m.init} {scale}" + (f" b_f={m.forget_bias:g}" if m.cell == "lstm" else "")


def summarize_run(cfg: Config, task, module, mon: Monitors, steps: int) -> Summary:
    """Pure: the trained module and the monitors' records -> the run's verdict, summary metrics and tags."""
    from pipeline.training import callbacks as dg
    from pipeline.training.remedies import remedy_summary

    d = cfg.diagnostics
    grads, last = mon.grads, mon.prof.last
    diverged = module.diverged_step is not None
    max_pre = grads.max_norm_preclip
    regime, reason = dg.judge(diverged, last, max_pre, d)
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
    if reason:
        tags["regime_reason"] = reason
    if diverged:
        tags["diverged_step"] = module.diverged_step
    more_metrics, more_tags = remedy_summary(cfg, module.remedies)
    metrics.update(more_metrics)
    tags.update(more_tags)
    return Summary(regime, v, ratio, solved, module.diverged_step, pruned, metrics, tags, reason)


def describe(cfg: Config, task, summary: Summary) -> str:
    """The run's description (``mlflow.note.content``): the verdict in a sentence. The regime, the decades
    the long-range gradient lost or gained over T (``bptt/log10_ratio``), and whether the task was learned
    (``val/loss_ratio`` against the solved threshold ``task.solved_below / baseline``; README, "Tasks")."""
    m = summary.metrics
    head = f"Regime **{summary.regime}**" + (f" ({summary.reason})" if summary.reason else "")
    if summary.regime == DIVERGED:
        head += f" at step {summary.diverged_step}"
    r = m.get("bptt/log10_ratio")
    a = task.window[0]  # the summaries span the long-range profile from t = a back to t = 1: a - 1 steps
    over = f"the {a - 1} steps from t = {a} back to t = 1"
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
    from pipeline.plots import reused_run_figures

    what = f"{cfg.task.name}{' (permuted)' if cfg.task.permute else ''} T={cfg.task.seq_len}"
    title = f"{what} {init_label(cfg.model)}: {summary.title}"
    # One figure per kind for every run this process records (a sweep worker records thousands): saved at
    # once and never kept, so reusing them draws the same bytes in about 27% less time (README, "On a GPU").
    with reused_run_figures():
        rec.log_figure(dg.plot_profile(frame, task, title), "plots/bptt_profile.png")
        if len(hist):
            thr = cfg.clip.threshold if cfg.clip.mode == "norm" else None
            fig = dg.plot_grad_norms(
                grads.steps[: len(hist)],
                grads.column("norm_preclip"),
                grads.column("norm_postclip"),
                thr,
                title,
                skipped=grads.column("skipped") > 0,
                clipped=cfg.clip.mode != "none",
            )
            rec.log_figure(fig, "plots/grad_norms.png")
