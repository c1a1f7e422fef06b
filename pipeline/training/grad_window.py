"""The record window of a gradient monitor (:class:`pipeline.training.grad_monitor.GradientNormMonitor`
and the project's configured subclass): per-step records kept on the device, moved to the host once per
window, the running statistics (clip rate, largest pre-clip norm) and where the metrics go (a sink, or
every logger of the Trainer, with MLflow's rules for non-finite values: README, "The MLflow record").
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from pipeline.names import NONFINITE_PREFIX

FLOAT_MAX = float(np.finfo(np.float64).max)

Sink = Callable[[dict[str, Any], int], None]


# Per MLFlowLogger: the metrics whose ``nonfinite.<metric>`` tag log_everywhere set (and has not removed).
_NAN_TAGGED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def log_everywhere(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Every logger of the Trainer gets ``metrics``. MLflow: +-inf as +-float64 max (what MLflow stores
    for inf) and NaN, which breaks MLflow's run page, as the tag ``nonfinite.<metric>`` instead, removed
    again when a finite value of that metric follows (README, "The MLflow record"). Several processes
    (DDP): rank 0 alone, as Lightning's loggers write (on the others ``MLFlowLogger.experiment`` is a
    stand-in without runs)."""
    from pytorch_lightning.loggers import MLFlowLogger

    if not getattr(trainer, "is_global_zero", True):
        return
    for lg in trainer.loggers:
        if isinstance(lg, MLFlowLogger):
            ok = {}
            tagged = _NAN_TAGGED.get(lg)
            if tagged is None:  # first use: a resumed run may hold a tag from before (a NaN, then a kill)
                tags = lg.experiment.get_run(lg.run_id).data.tags
                tagged = {t.removeprefix(NONFINITE_PREFIX) for t in tags if t.startswith(NONFINITE_PREFIX)}
                _NAN_TAGGED[lg] = tagged
            for k, v in metrics.items():
                if math.isnan(v):
                    lg.experiment.set_tag(lg.run_id, f"{NONFINITE_PREFIX}{k}", "nan")
                    tagged.add(k)
                else:
                    ok[k] = max(-FLOAT_MAX, min(FLOAT_MAX, v))
                    if k in tagged:  # NaN is no longer the latest value
                        lg.experiment.delete_tag(lg.run_id, f"{NONFINITE_PREFIX}{k}")
                        tagged.discard(k)
            if ok:
                lg.log_metrics(ok, step=step)
        else:
            lg.log_metrics(metrics, step=step)


class _Logs:
    """Where a monitor's metrics go (:meth:`publish`; not ``log``: Lightning sets ``callback.log`` to the
    module's ``log`` on every callback): ``sink(metrics, step)`` when given (the project passes its
    :class:`pipeline.tracking.Recorder`'s ``log_metrics``, which records NaN as the same
    ``nonfinite.<metric>`` tag), else every logger of the Trainer (:func:`log_everywhere`)."""

    sink: Sink | None
    _trainer: pl.Trainer | None

    def publish(self, metrics: dict[str, Any], step: int) -> None:
        if self.sink is not None:
            self.sink(metrics, step)
        elif self._trainer is not None:
            log_everywhere(self._trainer, metrics, step)


def post_clip_row(loss: torch.Tensor, sq: torch.Tensor, post_sq: torch.Tensor | None) -> torch.Tensor:
    """One finite step's record (:data:`RECORD` order, per-group columns last) from its loss and the
    squared group norms before (``sq``) and after clipping (``post_sq``; None: no gradient left)."""
    pre = sq.sum().sqrt()
    post = post_sq.sum().sqrt() if post_sq is not None else pre.new_zeros(())
    coef = torch.where(pre > 0, post / pre.clamp_min(1e-300), torch.ones_like(pre))
    return torch.stack([loss, pre, post, coef, *sq.sqrt()])


def window_stats(
    col: Mapping[str, np.ndarray], max_norm_preclip: float | None
) -> tuple[float | None, float, int]:
    """One window's share of the running statistics: the running max of the finite pre-clip norms (given
    the one so far) of the updates applied, and the number of clipped (clip_coef < 1) and of finite steps.
    A step ``remedy.skip`` dropped (column ``skipped``) is left out of the max, as a loss scaler's skip
    is (non-finite): its spike never reached the weights, and it made a run ``exploding`` by its norm
    alone (a science audit: a 4.9e6 spike skipped, in a run whose applied norms stayed below 4)."""
    keep = np.isfinite(col["norm_preclip"])
    if "skipped" in col:
        keep &= ~(col["skipped"] > 0)
    pre = col["norm_preclip"][keep]
    if pre.size:
        m = float(pre.max())
        max_norm_preclip = m if max_norm_preclip is None else max(max_norm_preclip, m)
    coef = col["clip_coef"][np.isfinite(col["clip_coef"])]
    return max_norm_preclip, float((coef < 1.0).sum()), coef.size


def step_metrics(col: Mapping[str, np.ndarray], i: int, group_names: Sequence[str]) -> dict[str, float]:
    """One step's norms (row ``i`` of the window's columns ``col``) under their metric names."""
    names = ("norm_preclip", "norm_postclip", "clip_coef", *(f"norm_{g}" for g in group_names))
    return {f"grad/{n}": float(col[n][i]) for n in names}


def last_of_each(keys: Sequence[Any]) -> list[int]:
    """The positions of each key's last occurrence, in order: the steps of a window that are logged when
    two or more optimizers step (each optimizer's last one; one optimizer: the window's last step)."""
    last = {k: i for i, k in enumerate(keys)}
    return sorted(last.values())


def window_metrics(
    col: Mapping[str, np.ndarray],
    group_names: Sequence[str],
    clip_rate: float,
    max_norm_preclip: float | None,
    loss_metric: str | None = None,
    diverged_step: int | None = None,
) -> dict[str, Any]:
    """The metrics of one window (columns ``col``): the window's mean loss under ``loss_metric`` (when
    given), the last step's norms, the running ``clip_rate`` and ``max_norm_preclip``, ``diverged_step``
    (when given)."""
    metrics: dict[str, Any] = {}
    if loss_metric is not None:
        loss = col["loss"]
        metrics[loss_metric] = float(np.nanmean(loss)) if np.isfinite(loss).any() else math.nan
    metrics.update(step_metrics(col, -1, group_names))
    metrics["grad/clip_rate"] = clip_rate
    if max_norm_preclip is not None:
        metrics["grad/max_norm_preclip"] = max_norm_preclip
    if diverged_step is not None:
        metrics["diverged_step"] = float(diverged_step)
    return metrics


class _Window(_Logs):
    """A gradient monitor's window (:class:`GradientNormMonitor`): per-step records on the device
    (:meth:`push`), moved to the host and logged once per window (:meth:`drain`), the host history and
    the running statistics."""

    fields: tuple[str, ...]
    group_names: tuple[str, ...]
    loss_metric: str | None
    log_diverged_step: bool
    diverged_step: int | None
    max_norm_preclip: float | None
    scaler_skips: int | None
    _pending: list[torch.Tensor]
    _staged: np.ndarray | None
    _rows: list[np.ndarray]
    _steps: list[int]
    _opt_keys: list[int | None]  # per pending record: the id of the optimizer that stepped (None: the only)
    _clipped: float
    _counted: int

    def push(self, row: torch.Tensor, step: int, optimizer: Any = None) -> None:
        """One step's record (on the device, in :attr:`fields` order) into the window; ``optimizer``: the
        one that stepped (None: the only one), so that each optimizer's last step in a window is logged."""
        self._pending.append(row)
        self._steps.append(step)
        self._opt_keys.append(None if optimizer is None else id(optimizer))

    @property
    def history(self) -> np.ndarray:
        return np.concatenate(self._rows) if self._rows else np.zeros((0, len(self.fields)))

    @property
    def steps(self) -> np.ndarray:
        return np.asarray(self._steps[: len(self.history)], dtype=int)

    def column(self, name: str) -> np.ndarray:
        return self.history[:, self.fields.index(name)]

    @property
    def clip_rate(self) -> float:
        """Fraction of the (finite) steps so far whose gradient was clipped (clip_coef < 1)."""
        return self._clipped / self._counted if self._counted else 0.0

    # -- in a Lightning checkpoint (Callback.state_dict): the running statistics, so that a run resumed with
    # trainer.fit(ckpt_path=...) reports its clip rate, largest norm and divergence over all its steps.
    @property
    def state_key(self) -> str:
        """Lightning's key for this state: two monitors with different windows or loss names can share a
        Trainer (two alike cannot: Lightning refuses two stateful callbacks with one key)."""
        keys = {
            "log_every_n_steps": getattr(self, "log_every_n_steps", None),
            "loss_metric": self.loss_metric,
        }
        return self._generate_state_key(**keys)  # type: ignore[attr-defined]

    def _running(self) -> tuple[float | None, float, int]:
        """The largest finite pre-clip norm, the clipped and the finite steps, over every step so far: the
        window not yet logged included (one host transfer of its rows)."""
        mx, clipped, counted = self.max_norm_preclip, self._clipped, self._counted
        if self._pending:
            rows = torch.stack(self._pending).cpu().numpy()
            mx, c, n = window_stats({f: rows[:, i] for i, f in enumerate(self.fields)}, mx)
            clipped, counted = clipped + c, counted + n
        return mx, clipped, counted

    def running(self) -> tuple[float, float | None]:
        """``(clip rate, largest pre-clip norm)`` over every step so far, the steps not yet logged
        included (:attr:`clip_rate` and :attr:`max_norm_preclip` follow the logged windows)."""
        mx, clipped, counted = self._running()
        return (clipped / counted if counted else 0.0), mx

    def state_dict(self) -> dict[str, Any]:
        """The running statistics up to now, the window not yet logged included (one host transfer, at a
        checkpoint only): a resume from this checkpoint retrains the steps after it, and counts them then.
        Plain numbers only, so the checkpoint loads with ``torch.load(weights_only=True)``."""
        mx, clipped, counted = self._running()
        return {
            "clipped": float(clipped),
            "counted": int(counted),
            "max_norm_preclip": None if mx is None else float(mx),
            "diverged_step": self.diverged_step,
            "scaler_skips": getattr(self, "scaler_skips", None),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._clipped = float(state_dict.get("clipped", 0.0))
        self._counted = int(state_dict.get("counted", 0))
        self.max_norm_preclip = state_dict.get("max_norm_preclip")
        self.diverged_step = state_dict.get("diverged_step")
        if state_dict.get("scaler_skips") is not None:
            self.scaler_skips = int(state_dict["scaler_skips"])

    def window_extra(self, col: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Hook: more metrics from one window's columns (a subclass's extra fields); none here."""
        return {}

    def stage(self, rows: np.ndarray) -> None:
        """The window's rows, already on the host (a stack of monitors moves all their windows in one
        transfer: :mod:`pipeline.training.stack_loop`); the next :meth:`drain` uses them when they are as
        many as the window's records, instead of its own transfer."""
        self._staged = rows

    def drain(self, trainer: pl.Trainer | None = None) -> None:
        """Move the window to the host (one transfer) and log it at ``trainer.global_step``."""
        if not self._pending:
            return
        trainer = trainer or self._trainer
        staged, self._staged = getattr(self, "_staged", None), None
        if staged is not None and len(staged) == len(self._pending):
            rows = staged
        else:
            rows = torch.stack(self._pending).cpu().numpy()
        keys, self._pending, self._opt_keys = self._opt_keys, [], []
        self._rows.append(rows)
        col = {n: rows[:, i] for i, n in enumerate(self.fields)}
        self.max_norm_preclip, clipped, counted = window_stats(col, self.max_norm_preclip)
        self._clipped += clipped
        self._counted += counted
        diverged = self.diverged_step if self.log_diverged_step else None
        metrics = window_metrics(
            col, self.group_names, self.clip_rate, self.max_norm_preclip, self.loss_metric, diverged
        )
        metrics.update(self.window_extra(col))
        skips = getattr(self, "scaler_skips", None)  # GradientNormMonitor under a loss scaler
        if skips is not None:
            metrics["grad/scaler_skips"] = float(skips)
        step = trainer.global_step if trainer is not None else (self._steps[-1] if self._steps else 0)
        # two or more optimizers (each opt.step() its own record): each one's last step in the window is
        # logged at its own step, so the earlier optimizers' norms are not hidden behind the last's
        steps = self._steps[len(self._steps) - len(rows) :]
        for i in last_of_each(keys)[:-1]:
            self.publish(step_metrics(col, i, self.group_names), step - (steps[-1] - steps[i]))
        self.publish(metrics, step)
