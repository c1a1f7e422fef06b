"""Gradient callbacks: clip-aware norms every step, the BPTT profile and spectra every N steps, the verdict.

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

from pipeline.bptt import profile as bptt
from pipeline.bptt import reference, spectra
from pipeline.config import Config, DiagnosticsConfig
from pipeline.names import DIVERGED, EXPLODING, GROUPS, HEALTHY, VANISHING
from pipeline.training.data import fixed_batch
from pipeline.training.module import RECORD_FIELDS
from pipeline.training.tasks import Task


def _path_rates(summary: Mapping[str, Any]) -> list[float]:
    """Decades per step of each gradient path the verdict reads: h, and c for LSTM (Gers 2000: the cell
    state is the path that carries memory; an open c path is not vanishing even where h decays)."""
    keys = ("bptt/log10_ratio_per_step", "bptt/c_log10_ratio_per_step")
    return [float(summary[k]) for k in keys if summary.get(k) is not None]


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
       gradient reaches step 1 at all (-inf: e.g. every relu unit dead; NaN: neither end is reached).
    4. healthy: none of these.

    Rates are decades per step of the long-range profile (``bptt/log10_ratio_per_step``), so the same
    dynamics get the same verdict at any T. ``summary=None`` (no profile) reads the norm rule alone.
    """
    if diverged:
        return DIVERGED
    summary = summary or {}
    overflow = summary.get("bptt/overflow_step")
    if overflow is not None and math.isfinite(overflow) and overflow > 0:
        return EXPLODING
    rates = _path_rates(summary)
    if any(r > d.explode_log10_per_step for r in rates if not math.isnan(r)) or (
        max_norm_preclip is not None and max_norm_preclip > d.explode_norm
    ):
        return EXPLODING
    if rates:
        # The best-connected path decides; NaN (nothing reaches either end) counts as nothing flowing.
        best = max(-math.inf if math.isnan(r) else r for r in rates)
        if best < d.vanish_log10_per_step:
            return VANISHING
    return HEALTHY


def long_frame(prof: bptt.Profile, step: int):
    """The profile of one pass as a long-format data frame: columns ``step``, ``t``, ``state``,
    ``log10_norm`` (:meth:`pipeline.bptt.profile.Profile.long_format`), the rows of
    ``diagnostics/bptt_profile.parquet``."""
    import pandas as pd

    return pd.DataFrame(prof.long_format(step))


class GradientMonitor(pl.Callback):
    """Step metrics: ``train/loss``, ``grad/norm_*``, ``grad/clip_coef``, ``grad/clip_rate``."""

    def __init__(self, recorder, log_every: int):
        self.recorder, self.log_every = recorder, log_every
        self._pending: list[torch.Tensor] = []
        self._rows: list[np.ndarray] = []
        self._steps: list[int] = []
        # Running summaries, updated once per window (not recomputed from the whole history).
        self.max_norm_preclip: float | None = None
        self._clipped, self._counted = 0.0, 0

    # -- running summaries over every step so far
    @property
    def history(self) -> np.ndarray:
        return np.concatenate(self._rows) if self._rows else np.zeros((0, len(RECORD_FIELDS)))

    @property
    def steps(self) -> np.ndarray:
        return np.asarray(self._steps, dtype=int)

    def column(self, name: str) -> np.ndarray:
        return self.history[:, RECORD_FIELDS.index(name)]

    @property
    def clip_rate(self) -> float:
        """Fraction of (finite) steps so far whose gradient was clipped."""
        return self._clipped / self._counted if self._counted else 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rec = pl_module.last_record
        if rec is None:
            return
        self._pending.append(rec)
        self._steps.append(trainer.global_step)
        pl_module.last_record = None
        if len(self._pending) >= self.log_every or pl_module.diverged_step is not None:
            self.drain()

    def on_train_end(self, trainer, pl_module) -> None:
        self.drain()

    def drain(self) -> None:
        """Move the window to the host in one transfer and log it."""
        if not self._pending:
            return
        rows = torch.stack(self._pending).cpu().numpy()
        self._pending = []
        self._rows.append(rows)
        pre = rows[:, RECORD_FIELDS.index("norm_preclip")]
        pre = pre[np.isfinite(pre)]
        if pre.size:
            m = float(pre.max())
            self.max_norm_preclip = m if self.max_norm_preclip is None else max(self.max_norm_preclip, m)
        clipped = rows[:, RECORD_FIELDS.index("clipped")]
        clipped = clipped[np.isfinite(clipped)]
        self._clipped += float(clipped.sum())
        self._counted += clipped.size
        step = self._steps[-1]
        last = dict(zip(RECORD_FIELDS, rows[-1], strict=True))
        metrics: dict[str, Any] = {
            "train/loss": float(np.nanmean(rows[:, 0])) if np.isfinite(rows[:, 0]).any() else float("nan"),
            "grad/norm_preclip": last["norm_preclip"],
            "grad/norm_postclip": last["norm_postclip"],
            "grad/clip_coef": last["clip_coef"],
            "grad/clip_rate": self.clip_rate,
            "grad/max_norm_preclip": self.max_norm_preclip,
        }
        for g in GROUPS:
            metrics[f"grad/norm_{g}"] = last[f"norm_{g}"]
        self.recorder.log_metrics(metrics, step)


class ValidationLogger(pl.Callback):
    """``val/loss`` and ``val/loss_ratio`` (to the task's baseline) after every validation."""

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
        self.recorder.log_metrics(
            {"val/loss": v, "val/loss_ratio": v / self.task.baseline}, trainer.global_step
        )


class ProfileMonitor(pl.Callback):
    """BPTT profile, spectra and Lyapunov exponent on a fixed probe batch (seed + 2), on the CPU in float64."""

    def __init__(self, recorder, cfg: Config, task: Task):
        self.recorder, self.cfg, self.task = recorder, cfg, task
        x, y = fixed_batch(task, cfg.diagnostics.probe_size, cfg.seed + 2, "cpu")
        self.x = x.double()
        self.y = y.double() if y.is_floating_point() else y
        self.frames: list[Any] = []  # long-format profile frames, one per pass
        self.passes: list[dict[str, Any]] = []  # summary metrics per pass, with "step"
        self._last_step: int | None = None

    def measure(self, module, step: int) -> dict[str, Any]:
        if self._last_step == step:
            return self.passes[-1]
        params = {
            k: (v.cpu() if torch.is_tensor(v) else v) for k, v in module.model.params(torch.float64).items()
        }
        finite = all(torch.isfinite(v).all() for v in params.values() if torch.is_tensor(v))
        metrics: dict[str, Any] = {"step": step}
        if finite:
            prof = bptt.profile(
                params, self.x, self.y, self.task.loss, self.task.readout, window=self.task.window
            )
            summary = bptt.summarize(prof, self.cfg.diagnostics.horizon_decades)
            metrics.update({f"bptt/{k}": v for k, v in summary.items()})
            metrics.update({f"spectral/{k}": v for k, v in spectra.spectrum(params).items()})
            # Pascanu 2013's bound is a theorem about pure propagation (no loss term between step 1 and
            # the reference step) through vanilla cells: logged only there (gated cells: None).
            bound = (
                spectra.pascanu_log10_bound(params, prof.reference_step) if prof.is_propagation_only else None
            )
            if bound is not None:
                metrics["spectral/pascanu_log10_bound"] = bound
            metrics["spectral/lyapunov_max"] = spectra.lyapunov_max(params, self.x)
            if self.cfg.diagnostics.reference_check and self.task.readout == "last":
                ref = reference.profile_log10(params, self.x, self.y, self.task.loss)
                if ref is not None:
                    metrics["bptt/reference_max_err"] = reference.max_error(prof.log10_norm["h"], ref)
            self.frames.append(long_frame(prof, step))
        self.passes.append(metrics)
        self._last_step = step
        self.recorder.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
        return metrics

    def on_train_start(self, trainer, pl_module) -> None:
        self.measure(pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.cfg.diagnostics.profile_every
        if every and trainer.global_step % every == 0 and pl_module.diverged_step is None:
            self.measure(pl_module, trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.measure(pl_module, trainer.global_step)

    def profile_frame(self):
        import pandas as pd

        cols = ["step", "t", "state", "log10_norm"]
        return pd.concat(self.frames, ignore_index=True) if self.frames else pd.DataFrame(columns=cols)

    @property
    def first(self) -> dict[str, Any]:
        return self.passes[0] if self.passes else {}

    @property
    def last(self) -> dict[str, Any]:
        return self.passes[-1] if self.passes else {}


# --------------------------------------------------------------------------------------------- plots


PROFILE_STYLES = (("h", "-", 1.6, ""), ("c", "--", 1.2, " (c)"), ("h_total", ":", 1.0, " (total)"))


def plot_profile(frame, task: Task, title: str):
    """log10 ||dL_w/dh_t|| (the long-range profile) against t at several training steps: the textbook's
    figure, measured. LSTM adds the cell state (dashed); copy adds the total gradient (dotted), whose
    direct loss terms hide the loss of memory (README, "The long-range profile")."""
    from pipeline.plots import DPI, MIN_WIDTH, Curve, draw_profile, plt, wrap_title

    fig, ax = plt.subplots(figsize=(MIN_WIDTH, 5.0), layout="constrained", dpi=DPI)
    steps = sorted(frame["step"].unique()) if len(frame) else []
    if len(steps) > 6:  # at most 6 curves: first, last and evenly spaced between
        idx = np.unique(np.linspace(0, len(steps) - 1, 6).round().astype(int))
        steps = [steps[i] for i in idx]
    cmap = plt.get_cmap("viridis")
    curves = []
    for i, s in enumerate(steps):
        for state, ls, lw, suffix in PROFILE_STYLES:
            sub = frame[(frame["step"] == s) & (frame["state"] == state)]
            if len(sub):
                curves.append(
                    Curve(
                        sub["t"],
                        sub["log10_norm"],
                        f"step {s}{suffix}",
                        ls,
                        lw,
                        cmap(i / max(len(steps) - 1, 1)),
                    )
                )
    draw_profile(ax, curves, task.window)
    ax.set_title(wrap_title(title, fig), fontsize=10)
    if steps:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def plot_grad_norms(
    steps: np.ndarray, pre: np.ndarray, post: np.ndarray, threshold: float | None, title: str
):
    """Pre- and post-clip global gradient norm of one run over training, with the clip threshold."""
    from pipeline.plots import DPI, MIN_WIDTH, Curve, draw_grad_norms, plt, wrap_title

    fig, ax = plt.subplots(figsize=(MIN_WIDTH, 4.6), layout="constrained", dpi=DPI)
    curves = [Curve(steps, pre, "pre-clip", lw=0.8), Curve(steps, post, "post-clip", lw=0.8)]
    draw_grad_norms(ax, curves, () if threshold is None else (threshold,))
    ax.set_title(wrap_title(title, fig), fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig
