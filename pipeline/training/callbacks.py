"""Gradient callbacks: clip-aware norms every step, the BPTT profile and spectra every N steps, the verdict.

The two monitors are this trainer's configurations of the public ones
(:class:`~pipeline.training.grad_monitor.GradientNormMonitor`, :class:`~pipeline.training.profile_monitor.BPTTProfileMonitor`):
one implementation of the window, the logging, the pass scheduling and the verdict; here only where the
record, the groups, the float64 weights and the loss come from, and the Recorder as the sink.

* :class:`GradientMonitor` reads the per-step record that :class:`~pipeline.training.module.RNNTrainingModule`
  leaves on the device (pre/post-clip norm, clip coefficient, group norms) and moves it to the host
  once per ``trainer.log_every`` steps (one transfer for the whole window, not one per parameter).
* :class:`ProfileMonitor` runs the exact float64 BPTT profile (:mod:`pipeline.bptt.profile`) and the spectra
  (:mod:`pipeline.bptt.spectra`) on a fixed probe batch through the unrolled twin at step 0, every
  ``diagnostics.profile_every`` steps, and at the end.
  The twin shares the trained weights (a float64 copy), so training keeps its fused kernels.
* :func:`verdict` turns the final profile and the run's largest gradient into a regime.

The profile is the *long-range* one (the gradient of the task's memory-window loss terms,
:attr:`pipeline.training.tasks.Task.window`); for copy the total gradient is kept beside it in the artifact as
state ``h_total`` (README, "The long-range profile").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from pipeline.bptt import modern, reference
from pipeline.bptt import profile as bptt
from pipeline.config import Config, DiagnosticsConfig
from pipeline.names import DIVERGED, EXPLODING, GROUPS, HEALTHY, VANISHING
from pipeline.training.data import fixed_batch
from pipeline.training.grad_monitor import GradientNormMonitor
from pipeline.training.module import RECORD_EXTRA
from pipeline.training.probe import pass_metrics
from pipeline.training.profile_monitor import BPTTProfileMonitor
from pipeline.training.tasks import Task


def _path_rates(summary: Mapping[str, Any]) -> list[float]:
    """Decades per step of each gradient path the verdict reads: h, and c for LSTM (Gers 2000: the cell
    state is the path that carries memory; an open c path is not vanishing even where h decays)."""
    rates = []
    for ratio, rate in (
        ("bptt/log10_ratio", "bptt/log10_ratio_per_step"),
        ("bptt/c_log10_ratio", "bptt/c_log10_ratio_per_step"),
    ):
        if summary.get(rate) is None:
            continue
        r = float(summary[rate])
        if math.isnan(r) and summary.get(ratio) is not None and math.isfinite(float(summary[ratio])):
            continue  # no step to propagate over (the reference step is step 1, e.g. T = 1): no evidence
        rates.append(r)
    return rates


def verdict(
    diverged: bool, summary: Mapping[str, Any] | None, max_norm_preclip: float | None, d: DiagnosticsConfig
) -> str:
    """Regime of a run from one profile pass's metrics (``bptt/*`` keys) and the largest gradient norm.

    Rules, in order (README, "Regime verdict"; thresholds are ``diagnostics.*`` config keys):

    1. diverged: a non-finite training loss or gradient stopped training.
    2. exploding: the float64 forward overflowed (``bptt/overflow_step`` > 0: the state itself grew past
       1e308, so the gradient is not even defined); or any path grows backward faster than
       ``explode_log10_per_step`` decades per step; or the largest pre-clip norm exceeded ``explode_norm``.
    3. vanishing: every path (h; and c for LSTM) decays faster than ``vanish_log10_per_step``, or no
       gradient reaches step 1 at all (-inf: e.g. every relu unit dead; NaN: neither end is reached). A
       path with no step to propagate over (T = 1: a finite ratio of 0 and no rate) is no evidence.
    4. healthy: none of these.

    Rates are decades per step of the long-range profile (``bptt/log10_ratio_per_step``), so the same
    dynamics get the same verdict at any T. ``summary=None`` (no profile) reads the norm rule alone.
    Which rule decided is :func:`judge`'s second value.
    """
    return judge(diverged, summary, max_norm_preclip, d)[0]


def _exact(limit: float) -> str:
    """A threshold as a reason prints it: ``:g`` (-0.03, 1000), or every digit where ``:g`` would round it
    (an explode_norm of 1234567 read "1.23457e+06": a review)."""
    short = f"{limit:g}"
    return short if float(short) == limit else repr(float(limit))


def _past(value: float, limit: float, sign: str = "", digits: int = 3) -> str:
    """``value`` in the fewest significant digits (``digits`` or more) that still fall on its side of
    ``limit``: -0.030033 against -0.03 is "-0.03003", not "-0.03" ("profile falls -0.03 decades/step <
    -0.03", a false inequality a teacher found in a run's reason)."""
    for n in range(digits, 18):
        text = f"{value:{sign}.{n}g}"
        if float(text) != limit and (float(text) < limit) == (value < limit):
            return text
    return f"{value:{sign}.17g}"


def judge(
    diverged: bool, summary: Mapping[str, Any] | None, max_norm_preclip: float | None, d: DiagnosticsConfig
) -> tuple[str, str]:
    """:func:`verdict` and which of its rules decided, in words (the run's ``regime_reason`` tag, its
    description and its figures' titles; README, "Regime verdict"): e.g. ``pre-clip norm 3.1e+13 >
    explode_norm 1e+06``. An ``exploding`` verdict whose profile decays came from the norm rule and said
    nothing of it: its run's description read "exploding: the long-range gradient loses 2.3 decades"
    (tests/test_mlflow_conventions.py). Empty for healthy (no rule fired) and diverged (the tag
    ``diverged_step`` says it)."""
    if diverged:
        return DIVERGED, ""
    summary = summary or {}
    overflow = summary.get("bptt/overflow_step")
    if overflow is not None and math.isfinite(overflow) and overflow > 0:
        return EXPLODING, f"the float64 forward overflowed at t={int(overflow)}"
    rates = _path_rates(summary)
    grows = [r for r in rates if not math.isnan(r) and r > d.explode_log10_per_step]
    if grows:
        return (
            EXPLODING,
            f"profile grows {_past(max(grows), d.explode_log10_per_step, '+')} decades/step > {_exact(d.explode_log10_per_step)}",
        )
    if max_norm_preclip is not None and max_norm_preclip > d.explode_norm:
        return (
            EXPLODING,
            f"pre-clip norm {_past(max_norm_preclip, d.explode_norm, '', 4)} > explode_norm {_exact(d.explode_norm)}",
        )
    if rates:
        # The best-connected path decides; NaN (nothing reaches either end) counts as nothing flowing.
        best = max(-math.inf if math.isnan(r) else r for r in rates)
        if best < d.vanish_log10_per_step:
            if best == -math.inf:
                return VANISHING, "no gradient reaches t=1"
            return (
                VANISHING,
                f"profile falls {_past(best, d.vanish_log10_per_step, '+')} decades/step < {_exact(d.vanish_log10_per_step)}",
            )
    return HEALTHY, ""


def long_frame(prof: bptt.Profile, step: int):
    """The profile of one pass as a long-format data frame: columns ``step``, ``t``, ``state``,
    ``log10_norm`` (:meth:`pipeline.bptt.profile.Profile.long_format`), the rows of
    ``diagnostics/bptt_profile.parquet``."""
    import pandas as pd

    return pd.DataFrame(prof.long_format(step))


class GradientMonitor(GradientNormMonitor):
    """The project's configuration of :class:`~pipeline.training.grad_monitor.GradientNormMonitor`.

    The module measures, guards and clips (``RNNTrainingModule.configure_gradient_clipping``, with the
    same :func:`~pipeline.training.grad_monitor.group_sq`) and leaves the step's record (:data:`RECORD_FIELDS`:
    groups input, recurrent, bias, readout, plus ``clipped``) in ``last_record``; :meth:`collect` moves it
    into the monitor's window. Everything else (one host transfer per ``trainer.log_every`` window, the
    running ``grad/clip_rate`` and ``grad/max_norm_preclip``) is the public monitor's, logged through the
    run's Recorder with ``train/loss`` (the window's mean) and without the metric ``diverged_step`` (the
    run's tag says it).
    """

    measures = False

    def __init__(self, recorder, log_every: int, skip: bool = False):
        super().__init__(
            log_every, sink=recorder.log_metrics, loss_metric="train/loss", log_diverged_step=False
        )
        self.recorder = recorder
        self.set_groups(GROUPS, extra=RECORD_EXTRA)  # = module.RECORD_FIELDS
        self.skip = skip  # remedy.skip is on: log train/skipped_steps
        self.skipped_steps = 0
        self._lyapunov: list[torch.Tensor] = []  # the flossing steps' exponents in this window (device)

    @property
    def log_every(self) -> int:
        return self.log_every_n_steps

    def collect(self, trainer, pl_module) -> None:
        rec = pl_module.last_record
        if rec is None:
            return
        self.push(rec, trainer.global_step)
        pl_module.last_record = None
        self.diverged_step = pl_module.diverged_step
        self.skipped_steps = pl_module.remedies.skipped  # the module's count: restored with a checkpoint
        lam = pl_module.remedies.last_lyapunov
        if lam is not None:
            self._lyapunov.append(lam)
            pl_module.remedies.last_lyapunov = None

    def window_extra(self, col: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """The remedies' window metrics (README, "The MLflow record"): ``train/skipped_steps`` (running
        count, with remedy.skip), ``remedy/omega`` (the window's mean Omega), ``remedy/floss`` and
        ``remedy/floss_lambda_<i>`` (the window's last flossing step)."""
        out: dict[str, Any] = {}
        if self.skip:
            out["train/skipped_steps"] = float(self.skipped_steps)
        omega, floss = col["omega"], col["floss"]
        if not np.isnan(omega).all():
            out["remedy/omega"] = float(np.nanmean(omega))
        if not np.isnan(floss).all():
            out["remedy/floss"] = float(floss[~np.isnan(floss)][-1])
        if self._lyapunov:
            lam = self._lyapunov[-1].cpu().numpy()  # one transfer per window, flossing runs only
            out.update({f"remedy/floss_lambda_{i + 1}": float(v) for i, v in enumerate(lam)})
            self._lyapunov = []
        return out


class ValidationLogger(pl.Callback):
    """``val/loss`` and ``val/loss_ratio`` (to the task's baseline) after every validation, and
    ``val/accuracy`` for classification tasks (:meth:`~pipeline.training.tasks.Task.hits`)."""

    def __init__(self, recorder, task: Task):
        self.recorder, self.task = recorder, task
        self.last_step: int | None = None
        self.best: float | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        v = pl_module.val_loss
        if v is None:
            return
        self.last_step = trainer.global_step
        if math.isfinite(v):
            self.best = v if self.best is None else min(self.best, v)
        metrics = {"val/loss": v, "val/loss_ratio": v / self.task.baseline}
        if pl_module.val_accuracy is not None:
            metrics["val/accuracy"] = pl_module.val_accuracy
        self.recorder.log_metrics(metrics, trainer.global_step)


class ProfileMonitor(BPTTProfileMonitor):
    """The project's configuration of :class:`~pipeline.training.profile_monitor.BPTTProfileMonitor`: the
    long-range profile (:attr:`Task.window`) of the float64 twin (``RNNModel.params()``, any cell of
    this project, ``orthogonal`` and ``indrnn`` included), with the spectra and the Lyapunov exponent,
    on a fixed probe batch (seed + 2) on the CPU, at step 0, every ``diagnostics.profile_every`` steps
    and at the end; logged through the run's Recorder. The scheduling, the record, the logging and the
    verdict are the public monitor's; the artifacts are written by :func:`pipeline.training.record.log_artifacts`.
    """

    step_type = int
    frame_columns = ("step", "t", "state", "log10_norm")
    UNREAD: Mapping[str, str] = {}  # this trainer reads every diagnostics field
    # A resumed run's record restarts its frames at the resume step (README, "Saved models and resuming");
    # its probe batch is fixed by the config, so there is nothing else to keep.
    keeps_state = False

    def __init__(self, recorder, cfg: Config, task: Task):
        x, y = fixed_batch(task, cfg.diagnostics.probe_size, cfg.seed + 2, "cpu")
        super().__init__(
            "model", cfg.diagnostics.profile_every, diagnostics=cfg.diagnostics, sink=recorder.log_metrics
        )
        self.recorder, self.cfg, self.task = recorder, cfg, task
        self.x = x.double()
        self.y = y.double() if y.is_floating_point() else y
        self.batch = (self.x, self.y)
        self._params: dict[str, Any] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        """The twin covers every cell of :class:`~pipeline.training.models.RNNModel`: nothing to check."""

    def stopping(self, trainer, pl_module) -> bool:
        return pl_module.diverged_step is not None

    def params_finite(self, pl_module) -> bool:
        self._params = {
            k: (v.cpu() if torch.is_tensor(v) else v)
            for k, v in pl_module.model.params(torch.float64).items()
        }
        return all(bool(torch.isfinite(v).all()) for v in self._params.values() if torch.is_tensor(v))

    def profile_pass(self, pl_module, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        params = self._params
        prof = bptt.profile(
            params, self.x, self.y, self.task.loss, self.task.readout, window=self.task.window
        )
        metrics: dict[str, Any] = pass_metrics(params, prof, self.diagnostics.horizon_decades, self.x)
        if params["cell"] == "lru":  # what ||dL/dh_t|| does not show (README, "Regime verdict")
            sens = modern.lru_sensitivity(
                params, self.x, self.y, self.task.loss, self.task.readout, self.task.window
            )
            metrics.update({f"bptt/{k}": v for k, v in sens.items()})
        if self.cfg.diagnostics.reference_check and self.task.readout == "last":
            ref = reference.profile_log10(params, self.x, self.y, self.task.loss)
            if ref is not None:
                metrics["bptt/reference_max_err"] = reference.max_error(prof.log10_norm["h"], ref)
        return metrics, prof.long_format(step)


# --------------------------------------------------------------------------------------------- plots


def plot_profile(frame, task: Task, title: str):
    """log10 ||dL_w/dh_t|| (the long-range profile) against t at several training steps: the textbook's
    figure, measured. LSTM adds the cell state (dashed); copy adds the total gradient (dotted), whose
    direct loss terms hide the loss of memory (README, "The long-range profile"). The public monitor's
    figure (:func:`pipeline.plots.profile_figure`) with the task's memory window shaded."""
    from pipeline.plots import profile_figure

    return profile_figure(frame, title, task.window)


def plot_grad_norms(
    steps: np.ndarray,
    pre: np.ndarray,
    post: np.ndarray,
    threshold: float | None,
    title: str,
    skipped: np.ndarray | None = None,
    clipped: bool = True,
):
    """Pre- and post-clip global gradient norm of one run over training, with the clip threshold; the
    steps ``remedy.skip`` skipped (``skipped``, a boolean mask) marked at their pre-clip norm. Without
    clipping (``clipped`` False) the pre-clip norm alone: a post-clip line equal to it was drawn over it,
    hid it, and said clipping happened (a teacher's review)."""
    from pipeline.plots import Curve, draw_grad_norms, run_figure

    fig, ax = run_figure(4.6, title)
    curves = [Curve(steps, pre, "pre-clip" if clipped else "gradient norm (no clipping)", lw=0.8)]
    curves += [Curve(steps, post, "post-clip", lw=0.8)] if clipped else []
    draw_grad_norms(ax, curves, () if threshold is None else (threshold,))
    mark = np.zeros(len(pre), dtype=bool) if skipped is None else skipped & np.isfinite(pre) & (pre > 0)
    if mark.any():  # a skipped non-finite step has no point on the log axis
        ax.scatter(steps[mark], pre[mark], marker="x", s=30, color="crimson", zorder=3, label="skipped")
    if ax.get_legend_handles_labels()[0]:  # nothing drawn (every norm overflowed): the note says so
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig
