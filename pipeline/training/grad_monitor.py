"""Clip-aware gradient norms with a divergence guard, for ANY LightningModule (README, "Your own model").

:class:`GradientNormMonitor` measures every step on the device, with one fused reduction per parameter
group (:func:`group_sq`): the global norm before clipping (``on_before_optimizer_step``, which Lightning
calls before ``gradient_clip_val`` clipping or the module's ``configure_gradient_clipping``) and after it.
Lightning runs the optimizer's closure (backward, that hook, clipping) *inside* ``optimizer.step``, so an
optimizer step *pre*-hook fires before the backward; the post-clip norm is read by a step *post*-hook
instead, on the gradients the update just used (torch's optimizers do not write ``.grad``). One host
transfer per ``log_every_n_steps`` window; the guard reads one flag per step, since it must decide before
the update. It logs through every logger the Trainer has (``trainer.loggers``), as Lightning's
LearningRateMonitor, or through a ``sink`` (the project's Recorder). The project's own trainer uses it as
a configured subclass (:mod:`pipeline.training.callbacks`): one implementation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

GRAD_GROUPS = ("input", "recurrent", "bias", "other")
RECORD_HEAD = ("loss", "norm_preclip", "norm_postclip", "clip_coef")
RECORD = (*RECORD_HEAD, *(f"norm_{g}" for g in GRAD_GROUPS))
FLOAT_MAX = float(np.finfo(np.float64).max)

GroupsOf = Callable[[nn.Module], Mapping[str, Sequence[nn.Parameter]]]
Sink = Callable[[dict[str, Any], int], None]


def parameter_groups(module: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by role: ``weight_ih*`` (input), ``weight_hh*`` (recurrent), ``bias*`` of
    every nn.RNN / nn.LSTM / nn.GRU; everything else is ``other``. Each parameter once."""
    groups: dict[str, list[nn.Parameter]] = {g: [] for g in GRAD_GROUPS}
    seen: set[int] = set()
    for mod in module.modules():
        if isinstance(mod, nn.RNNBase):
            for name, p in mod.named_parameters(recurse=False):
                if id(p) in seen or not p.requires_grad:
                    continue
                seen.add(id(p))
                g = (
                    "recurrent"
                    if name.startswith("weight_hh")
                    else "input"
                    if name.startswith("weight_ih")
                    else "bias"
                    if name.startswith("bias")
                    else "other"
                )
                groups[g].append(p)
    for p in module.parameters():
        if id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            groups["other"].append(p)
    return groups


def group_sq(groups: Mapping[str, Sequence[nn.Parameter]], names: Sequence[str]) -> torch.Tensor | None:
    """Squared gradient norm per group ``names[i]`` (float64, on the device; 0 for a group without
    gradients), one fused reduction per group (``torch._foreach_norm``); None when no parameter has a
    gradient. The one measurement both paths use (this monitor, and ``RNNTrainingModule``'s clipping)."""
    grads = [[p.grad for p in groups[g] if p.grad is not None] for g in names]
    flat = [x for gs in grads for x in gs]
    if not flat:
        return None
    zero = torch.zeros((), dtype=torch.float64, device=flat[0].device)
    return torch.stack(
        [torch.stack(torch._foreach_norm(gs)).double().square().sum() if gs else zero for gs in grads]
    )


def drop_gradients(params: Iterable[nn.Parameter]) -> None:
    """The guard's action: ``p.grad = None``, so ``optimizer.step`` skips the parameter (weights and
    optimizer state stay bit-identical)."""
    for p in params:
        p.grad = None


def log_everywhere(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Every logger of the Trainer gets ``metrics``. MLflow: +-inf as +-float64 max (what MLflow stores
    for inf) and NaN, which breaks MLflow's run page, as the tag ``nonfinite.<metric>`` instead
    (README, "The MLflow record")."""
    from pytorch_lightning.loggers import MLFlowLogger

    for lg in trainer.loggers:
        if isinstance(lg, MLFlowLogger):
            ok = {}
            for k, v in metrics.items():
                if math.isnan(v):
                    lg.experiment.set_tag(lg.run_id, f"nonfinite.{k}", "nan")
                else:
                    ok[k] = max(-FLOAT_MAX, min(FLOAT_MAX, v))
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
    the one so far), and the number of clipped (clip_coef < 1) and of finite steps."""
    pre = col["norm_preclip"][np.isfinite(col["norm_preclip"])]
    if pre.size:
        m = float(pre.max())
        max_norm_preclip = m if max_norm_preclip is None else max(max_norm_preclip, m)
    coef = col["clip_coef"][np.isfinite(col["clip_coef"])]
    return max_norm_preclip, float((coef < 1.0).sum()), coef.size


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
    last = {n: float(v[-1]) for n, v in col.items()}
    metrics: dict[str, Any] = {}
    if loss_metric is not None:
        loss = col["loss"]
        metrics[loss_metric] = float(np.nanmean(loss)) if np.isfinite(loss).any() else math.nan
    metrics.update(
        {
            "grad/norm_preclip": last["norm_preclip"],
            "grad/norm_postclip": last["norm_postclip"],
            "grad/clip_coef": last["clip_coef"],
            "grad/clip_rate": clip_rate,
        }
    )
    if max_norm_preclip is not None:
        metrics["grad/max_norm_preclip"] = max_norm_preclip
    metrics.update({f"grad/norm_{g}": last[f"norm_{g}"] for g in group_names})
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
    _pending: list[torch.Tensor]
    _staged: np.ndarray | None
    _rows: list[np.ndarray]
    _steps: list[int]
    _clipped: float
    _counted: int

    def push(self, row: torch.Tensor, step: int) -> None:
        """One step's record (on the device, in :attr:`fields` order) into the window."""
        self._pending.append(row)
        self._steps.append(step)

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
        self._pending = []
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
        step = trainer.global_step if trainer is not None else (self._steps[-1] if self._steps else 0)
        self.publish(metrics, step)


class GradientNormMonitor(_Window, pl.Callback):
    """Clip-aware gradient norms and a divergence guard for any LightningModule.

    Logs once per ``log_every_n_steps`` optimizer steps (values of the window's last step unless said):
    ``grad/norm_preclip``, ``grad/norm_postclip``, ``grad/clip_coef`` (post / pre),
    ``grad/clip_rate`` (fraction of the steps so far with clip_coef < 1), ``grad/max_norm_preclip``
    (running max), ``grad/norm_<group>`` (pre-clip; groups input, recurrent, bias, other), and
    ``diverged_step`` once, when the guard fires. Guard: a non-finite loss or gradient drops every
    gradient (``p.grad = None``, so the optimizer skips them), sets ``trainer.should_stop`` and records
    :attr:`diverged_step`. Per step on the host afterwards: :attr:`history` (rows of :attr:`fields`).

    The project's own trainer is a configuration of this class
    (:class:`pipeline.training.callbacks.GradientMonitor`); the hooks are:

    * ``groups``: a callable module -> ``{name: [parameters]}`` (default :func:`parameter_groups`); the
      names give the ``norm_<name>`` columns and metrics, in order.
    * ``sink``: ``(metrics, step) -> None`` instead of ``trainer.loggers``.
    * ``loss_metric``: also log the window's mean loss under this name (the project: ``train/loss``).
    * ``log_diverged_step``: log the metric ``diverged_step`` when the guard fires.
    * where each step's record comes from: :attr:`measures` (this class measures, guards and reads the
      post-clip gradients itself) and :meth:`collect` (a subclass whose module measures hands the
      record over there, once per batch).
    * :meth:`window_extra`: more metrics from a window's columns (the project's: the remedies' fields).
    """

    measures: bool = True  # False: the module measures and guards; collect() hands its record over

    def __init__(
        self,
        log_every_n_steps: int = 10,
        groups: GroupsOf | None = None,
        *,
        sink: Sink | None = None,
        loss_metric: str | None = None,
        log_diverged_step: bool = True,
    ):
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps = int(log_every_n_steps)
        self.groups_of: GroupsOf = groups or parameter_groups
        self.sink, self.loss_metric, self.log_diverged_step = sink, loss_metric, log_diverged_step
        self.group_names: tuple[str, ...] = GRAD_GROUPS
        self.fields: tuple[str, ...] = RECORD
        self.diverged_step: int | None = None
        self.max_norm_preclip: float | None = None
        self.groups: dict[str, list[nn.Parameter]] = {}
        self._handles: list[Any] = []
        self._loss: torch.Tensor | None = None
        self._pre: torch.Tensor | None = None  # this step's group_sq, until the post-hook
        self._pre_loss: torch.Tensor | None = None
        self._pending: list[torch.Tensor] = []
        self._rows: list[np.ndarray] = []
        self._steps: list[int] = []
        self._trainer: pl.Trainer | None = None
        # Running clip rate over every (finite) step so far (README, "The MLflow record").
        self._clipped, self._counted = 0.0, 0

    def set_groups(self, names: Sequence[str], extra: Sequence[str] = ()) -> None:
        """The record's layout: :data:`RECORD_HEAD`, ``extra`` columns, then ``norm_<name>`` per group."""
        self.group_names = tuple(names)
        self.fields = (*RECORD_HEAD, *extra, *(f"norm_{g}" for g in self.group_names))

    # -- wiring
    def on_fit_start(self, trainer, pl_module) -> None:
        self._trainer = trainer
        if not self.measures:
            return
        self.groups = {g: list(ps) for g, ps in self.groups_of(pl_module).items()}
        self.set_groups(list(self.groups))
        for opt in trainer.optimizers:
            self._handles.append(opt.register_step_post_hook(self._after_update))

    def on_fit_end(self, trainer, pl_module) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- every step (when this monitor measures)
    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.measures:
            self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.measures:
            return
        sq = group_sq(self.groups, self.group_names)
        if sq is None:
            return
        pre = sq.sum().sqrt()
        loss = self._loss.double() if self._loss is not None else pre.new_zeros(())
        if not bool(torch.isfinite(pre) & torch.isfinite(loss)):  # one host read: before the update
            drop_gradients(p for gs in self.groups.values() for p in gs)
            # anything the monitor did not classify
            drop_gradients(p for group in optimizer.param_groups for p in group["params"])
            self.diverged_step = trainer.global_step
            trainer.should_stop = True
            nan = pre.new_tensor(math.nan)
            self.push(torch.stack([loss.reshape(()), pre, nan, nan, *sq.sqrt()]), trainer.global_step)
            self._pre = None
            return
        self._pre = sq
        self._pre_loss = loss.reshape(())

    def _after_update(self, optimizer, args, kwargs) -> None:
        """Optimizer step post-hook: the gradients the update used, i.e. after clipping."""
        if self._pre is None or self._pre_loss is None:
            return
        sq = self._pre
        self._pre = None
        post_sq = group_sq(self.groups, self.group_names)
        step = self._trainer.global_step if self._trainer is not None else len(self._steps)
        self.push(post_clip_row(self._pre_loss, sq, post_sq), step)

    def collect(self, trainer, pl_module) -> None:
        """Hook, once per training batch before the window check: a subclass whose module measures
        pushes that module's record here. This class measures in the hooks above: nothing to do."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.collect(trainer, pl_module)
        if len(self._pending) >= self.log_every_n_steps or (self.diverged_step is not None and self._pending):
            self.drain()

    def on_train_end(self, trainer, pl_module) -> None:
        self.drain()
