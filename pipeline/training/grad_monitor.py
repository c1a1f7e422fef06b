"""Clip-aware gradient norms with a divergence guard, for ANY LightningModule (README, "Your own model").

:class:`GradientNormMonitor` measures every step on the device, with one fused reduction per parameter
group (:func:`group_sq`): the global norm before clipping (``on_after_backward``, which Lightning calls
on callbacks before the module's own hook and before ``gradient_clip_val`` clipping or the module's
``configure_gradient_clipping``) and after it. Lightning runs the optimizer's closure (backward,
clipping) *inside* ``optimizer.step``, so an optimizer step *pre*-hook fires before the backward: the
pre-hook wraps that closure and reads the post-clip norm when it returns, before the update (which may
write ``.grad``: torch's foreach SGD adds Nesterov momentum into it in place). One host
transfer per ``log_every_n_steps`` window; the guard reads one flag per step, since it must decide before
the update. It logs through every logger the Trainer has (``trainer.loggers``), as Lightning's
LearningRateMonitor, or through a ``sink`` (the project's Recorder). The project's own trainer uses it as
a configured subclass (:mod:`pipeline.training.callbacks`): one implementation.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from pipeline.training.grad_window import Sink, _Window, post_clip_row

GRAD_GROUPS = ("input", "recurrent", "bias", "other")
RECORD_HEAD = ("loss", "norm_preclip", "norm_postclip", "clip_coef")
RECORD = (*RECORD_HEAD, *(f"norm_{g}" for g in GRAD_GROUPS))

GroupsOf = Callable[[nn.Module], Mapping[str, Sequence[nn.Parameter]]]


def check_arg(name: str, value: Any, kind: str) -> None:
    """A callback argument of the wrong type: a TypeError naming it, at construction (``"10"`` failed
    at the first step with ``'<' not supported``, ``2.5`` was cut to 2, a list for ``groups`` or an int for
    ``sink`` failed deep in the first log window: a walkthrough). ``kind``: ``int`` or ``callable``."""
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy's ints too
    ok = callable(value) if kind == "callable" else integral
    if not ok:
        raise TypeError(f"{name} must be {'an int' if kind == 'int' else 'a callable'}, got {value!r}")


def parameter_groups(module: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters by role: ``weight_ih*`` (input), ``weight_hh*`` and an LSTM's projection ``weight_hr*``
    (recurrent: h_t is W_hr times the cell's output, fed back), ``bias*`` of every nn.RNN / nn.LSTM /
    nn.GRU; everything else is ``other``. Each parameter once. Frozen ones too: a
    parameter unfrozen later (Lightning's ``BackboneFinetuning``) is measured from then on, and one
    without a gradient adds nothing."""
    groups: dict[str, list[nn.Parameter]] = {g: [] for g in GRAD_GROUPS}
    seen: set[int] = set()
    for mod in module.modules():
        if isinstance(mod, nn.RNNBase):
            for name, p in _rnn_parameters(mod):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                g = (
                    "recurrent"
                    if name.startswith(("weight_hh", "weight_hr"))
                    else "input"
                    if name.startswith("weight_ih")
                    else "bias"
                    if name.startswith("bias")
                    else "other"
                )
                groups[g].append(p)
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            groups["other"].append(p)
    return groups


def _rnn_parameters(rnn: nn.RNNBase) -> list[tuple[str, nn.Parameter]]:
    """An RNN's own parameters by name; a weight under ``torch.nn.utils.parametrize`` (``orthogonal``,
    ``weight_norm``, ``spectral_norm`` of ``torch.nn.utils.parametrizations``) is stored as
    ``parametrizations.<name>.original`` (or ``original0``, ``original1``, ...) and counts under the
    name it parametrizes; a parametrization's own parameters are ``other``."""
    own = list(rnn.named_parameters(recurse=False))
    plists = getattr(rnn, "parametrizations", None)
    if isinstance(plists, nn.ModuleDict):
        for name, plist in plists.items():
            own += [(name, p) for n, p in plist.named_parameters(recurse=False) if n.startswith("original")]
    return own


def _norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """The norm of each gradient, one fused reduction: a sparse gradient (``nn.Embedding(sparse=True)``)
    by its coalesced values; float16 / bfloat16 ones accumulated in float32 (in their own precision the
    sum is off by ~0.1% and a float16 norm overflows past 65504 while every entry is finite)."""
    grads = [g.coalesce()._values() if g.is_sparse else g for g in grads]
    half = [g.dtype in (torch.float16, torch.bfloat16) for g in grads]
    if not any(half):
        return torch.stack(torch._foreach_norm(grads))
    low = iter(torch._foreach_norm([g for g, h in zip(grads, half, strict=True) if h], dtype=torch.float32))
    rest = [g for g, h in zip(grads, half, strict=True) if not h]
    other = iter(torch._foreach_norm(rest) if rest else [])
    return torch.stack([(next(low) if h else next(other)).double() for h in half])  # a mixed list


def group_sq(groups: Mapping[str, Sequence[nn.Parameter]], names: Sequence[str]) -> torch.Tensor | None:
    """Squared gradient norm per group ``names[i]`` (float64, on the device; 0 for a group without
    gradients), one fused reduction per group (``torch._foreach_norm``); None when no parameter has a
    gradient. The one measurement both paths use (this monitor, and ``RNNTrainingModule``'s clipping)."""
    grads = [[p.grad for p in groups[g] if p.grad is not None] for g in names]
    flat = [x for gs in grads for x in gs]
    if not flat:
        return None
    zero = torch.zeros((), dtype=torch.float64, device=flat[0].device)
    return torch.stack([_norms(gs).double().square().sum() if gs else zero for gs in grads])


def optimizer_groups(
    groups: Mapping[str, Sequence[nn.Parameter]], optimizer: torch.optim.Optimizer
) -> dict[str, list[nn.Parameter]]:
    """``groups`` restricted to the parameters ``optimizer`` updates: a step's norms are those of what it
    steps (what Lightning's clipping reads too), so with several optimizers (manual optimization) each
    step is measured on its own parameters. One optimizer over every parameter: ``groups`` itself."""
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return {g: [p for p in ps if id(p) in ids] for g, ps in groups.items()}


def grad_scaler(trainer: pl.Trainer) -> Any:
    """The Trainer's loss scaler (``precision="16-mixed"``: a ``torch.amp.GradScaler``), None without."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    return scaler if scaler is not None and getattr(scaler, "is_enabled", lambda: True)() else None


def scale_of(scaler: Any) -> torch.Tensor | float:
    """The scaler's current loss scale, on the device where it has one (no host read)."""
    scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
    return scale if scale is not None else float(scaler.get_scale())


def drop_gradients(params: Iterable[nn.Parameter]) -> None:
    """The guard's action: ``p.grad = None``, so ``optimizer.step`` skips the parameter (weights and
    optimizer state stay bit-identical)."""
    for p in params:
        p.grad = None


def _accumulating(trainer) -> bool:
    """Whether Lightning will not step after this backward (``accumulate_grad_batches > 1``,
    automatic optimization): the gradient is partial, and the last micro-batch's read replaces it, so it
    is not measured. Lightning's own test (``fit_loop._should_accumulate``, which it asks before each
    closure); where a Lightning lacks it, every backward is measured, as before."""
    if getattr(trainer, "accumulate_grad_batches", 1) <= 1:
        return False
    should = getattr(getattr(trainer, "fit_loop", None), "_should_accumulate", None)
    return bool(should()) if callable(should) else False


class _StepReads:
    """How one optimizer step is read, for :class:`GradientNormMonitor`: the loss of the backward passes
    before it (:meth:`on_before_backward`, :meth:`_step_loss`), the gradient groups of the optimizer that
    steps (:meth:`_groups_of`) and the post-clip read in that optimizer's step hooks
    (:meth:`_before_update`, :meth:`_after_update`, which push the step's record). Its state
    (:meth:`_reset_reads`) is reset with the monitor's."""

    measures: bool
    groups: dict[str, list[nn.Parameter]]
    group_names: tuple[str, ...]
    _by_opt: dict[int, tuple[int, dict[str, list[nn.Parameter]]]]
    _scaler: Any
    _trainer: pl.Trainer | None
    _steps: list
    _handles: list[Any]
    _hooked: set[int]  # ids of the optimizers whose step hooks are registered
    push: Callable[..., None]
    _diverge: Callable[..., None]

    def _reset_reads(self) -> None:
        self._backward_sq: dict[int, torch.Tensor | None] = {}  # pre-clip after backward, per optimizer
        self._loss: torch.Tensor | None = None  # summed over the backward passes before this step
        self._stepped = False  # a step came after the last backward: the next backward starts a new sum
        self._micro = 0  # backward passes in self._loss
        self._pre: torch.Tensor | None = None  # this step's group_sq, until the post-hook
        self._pre_loss: torch.Tensor | None = None
        self._post: torch.Tensor | None = None  # the same after clipping, read before the update

    def _finite(self, pre: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """The guard's test on the device (no host read): the pre-clip norm finite, and the step's loss
        where a backward went through Lightning (else its NaN stands for "not read", not divergence)."""
        return torch.isfinite(pre) & (torch.isfinite(loss) if self._loss is not None else True)

    def _optimizer_entry(self, optimizer) -> tuple[int, dict[str, list[nn.Parameter]]]:
        return len(optimizer.param_groups), optimizer_groups(self.groups, optimizer)

    def _groups_of(self, optimizer) -> Mapping[str, Sequence[nn.Parameter]]:
        entry = self._by_opt.get(id(optimizer))
        if entry is None:
            return self.groups
        if entry[0] != len(optimizer.param_groups):  # add_param_group during training (BackboneFinetuning)
            entry = self._by_opt[id(optimizer)] = self._optimizer_entry(optimizer)
        return entry[1]

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if not self.measures:
            return
        loss = loss.detach()
        if self._scaler is not None:  # Lightning hands this hook the scaled loss
            loss = loss.double() / scale_of(self._scaler)
        if self._stepped:
            self._loss, self._micro, self._stepped = None, 0, False
        self._loss = loss if self._loss is None else self._loss + loss
        self._micro += 1

    def _step_loss(self, trainer, pl_module, pre: torch.Tensor) -> torch.Tensor:
        """The loss of the backward passes before this step (float64, on the device): their sum; with
        ``accumulate_grad_batches=N`` (automatic optimization) their mean, N / n times the sum of the n
        passes, as Lightning divides each by N, also when an epoch ends with n < N of them left. NaN
        where no backward went through Lightning (``loss.backward()`` called directly). Under DDP, the
        mean over the ranks."""
        if self._loss is None:
            return pre.new_tensor(math.nan)
        loss = self._loss.double().reshape(())
        n = getattr(trainer, "accumulate_grad_batches", 1)
        if pl_module.automatic_optimization and 0 < self._micro < n:
            loss = loss * (n / self._micro)
        if getattr(trainer, "world_size", 1) > 1:
            # Several processes (DDP): each rank's loss is its own batch's, the gradient their mean. The
            # record takes the ranks' mean loss too, and the guard decides on it, so every rank stops
            # at the same step; one stopping alone left the others in the next all-reduce (README,
            # "Your own model"). One scalar all-reduce a step, in place: on a copy.
            loss = trainer.strategy.reduce(loss.clone(), reduce_op="mean")
        return loss

    def _hook_optimizers(self, trainer) -> None:
        """The post-clip read and the step's record in each optimizer's step hooks, until ``fit`` ends."""
        for opt in trainer.optimizers:
            self._handles.append(opt.register_step_pre_hook(self._before_update))
            self._handles.append(opt.register_step_post_hook(self._after_update))
            self._hooked.add(id(opt))

    def on_fit_end(self, trainer, pl_module) -> None:
        for h in self._handles:
            h.remove()
        self._hooked.clear()
        self._handles = []

    def _before_update(self, optimizer, args, kwargs) -> tuple[tuple, dict] | None:
        """Optimizer step pre-hook: the post-clip read (:meth:`_read_post`) before the update touches
        ``.grad``. Lightning steps with a closure (backward, ``on_before_optimizer_step``, clipping) that
        the optimizer calls inside ``step`` (LBFGS: several times; the last call's gradients are read):
        wrapped, so the read follows each call. Without a closure (the loss scaler's step, or a plain
        ``optimizer.step()``) the gradients are final here."""
        in_kwargs = kwargs.get("closure") is not None
        closure = kwargs["closure"] if in_kwargs else (args[1] if len(args) > 1 else None)
        if closure is None:
            self._read_post(optimizer)
            return None

        def read_after(*a: Any, **kw: Any) -> Any:
            out = closure(*a, **kw)
            self._read_post(optimizer)
            return out

        if in_kwargs:
            return args, {**kwargs, "closure": read_after}
        return (args[0], read_after, *args[2:]), kwargs

    def _read_post(self, optimizer) -> None:
        """The gradients the update will use, i.e. after clipping (nothing when the step is not measured),
        and, without a loss scaler, the guard's decision on the loss and both reads (one host read). A
        gradient made non-finite after the pre-clip read (the module's own ``on_after_backward``, which
        Lightning calls after the callbacks', or its clipping) was let through, and the update left the
        weights NaN (a walkthrough)."""
        sq, loss = self._pre, self._pre_loss
        if sq is None or loss is None:
            self._post = None
            return
        self._post = post = group_sq(self._groups_of(optimizer), self.group_names)
        if self._scaler is not None:
            return
        pre = sq.sum().sqrt()
        finite = self._finite(pre, loss)
        if post is not None:
            finite = finite & torch.isfinite(post.sum())
        if not bool(finite):
            nan = pre.new_tensor(math.nan)
            self._pre = self._post = None
            trainer = self._trainer
            assert trainer is not None  # set at setup, before any step
            self._diverge(trainer, optimizer, torch.stack([loss, pre, nan, nan, *sq.sqrt()]))

    def _after_update(self, optimizer, args, kwargs) -> None:
        """Optimizer step post-hook: the step's record, from the reads before the update."""
        if self._pre is None or self._pre_loss is None:
            return
        sq, post_sq = self._pre, self._post
        self._pre = self._post = None
        step = self._trainer.global_step if self._trainer is not None else len(self._steps)
        self.push(post_clip_row(self._pre_loss, sq, post_sq), step, optimizer)


class GradientNormMonitor(_StepReads, _Window, pl.Callback):
    """Clip-aware gradient norms and a divergence guard for any LightningModule.

    Logs once per ``log_every_n_steps`` optimizer steps (values of the window's last step unless said;
    with two or more optimizers, also each other optimizer's last step in the window, at its own step):
    ``grad/norm_preclip``, ``grad/norm_postclip``, ``grad/clip_coef`` (post / pre),
    ``grad/clip_rate`` (fraction of the steps so far with clip_coef < 1), ``grad/max_norm_preclip``
    (running max), ``grad/norm_<group>`` (pre-clip; groups input, recurrent, bias, other), and
    ``diverged_step`` once, when the guard fires. Guard: a non-finite loss or gradient (without a loss
    scaler also after clipping) drops every gradient (``p.grad = None``, so the optimizer skips them),
    sets ``trainer.should_stop`` and records :attr:`diverged_step`. Per step on the host afterwards:
    :attr:`history` (rows of :attr:`fields`).

    Each step is measured on the parameters its optimizer updates (a parameter group added during
    training included), with the loss summed over the backward passes before it (since the previous
    step's; ``accumulate_grad_batches``: the mean micro-batch loss, as Lightning divides each by N). The
    pre-clip norm is read after the backward before each step (``on_after_backward``, which Lightning
    calls on callbacks before the module's own; with ``accumulate_grad_batches``, after the last
    micro-batch's, which sees the accumulated gradient), so clipping
    anywhere after it is seen: ``gradient_clip_val``, ``configure_gradient_clipping``, the module's
    ``on_after_backward``, or ``self.clip_gradients`` before ``opt.step()`` in manual optimization
    (``automatic_optimization = False``). Without a backward through Lightning since the optimizer's
    last step (``loss.backward()`` called directly), it is read in ``on_before_optimizer_step``. With a
    loss scaler (``precision="16-mixed"``): the loss and the gradients are read unscaled, and a non-finite
    gradient under a finite loss while the scale is above 1 is the scaler's overflow, which skips that
    update and lowers the scale: recorded (non-finite pre-clip norm, NaN after) and counted in
    :attr:`scaler_skips` (``grad/scaler_skips``), not divergence. At a scale of 1 or below the gradient
    is non-finite unscaled: divergence, as without a scaler.

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
        check_arg("log_every_n_steps", log_every_n_steps, "int")
        if loss_metric is not None and (not isinstance(loss_metric, str) or not loss_metric.strip()):
            # an int or "" failed in the logger at the first log window, naming no argument (a walkthrough)
            raise TypeError(
                f"loss_metric must be a metric name (a non-empty str) or None, got {loss_metric!r}"
            )
        for arg, value in (("groups", groups), ("sink", sink)):
            if value is not None:
                check_arg(arg, value, "callable")
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps = int(log_every_n_steps)
        self.groups_of: GroupsOf = groups or parameter_groups
        self.sink, self.loss_metric, self.log_diverged_step = sink, loss_metric, log_diverged_step
        self.group_names: tuple[str, ...] = GRAD_GROUPS
        self.fields: tuple[str, ...] = RECORD
        self.groups: dict[str, list[nn.Parameter]] = {}
        self._by_opt: dict[int, tuple[int, dict[str, list[nn.Parameter]]]] = {}  # id -> (n groups, groups)
        self._scaler: Any = None
        self._handles: list[Any] = []
        self._hooked: set[int] = set()
        self._trainer: pl.Trainer | None = None
        self._reset()

    def _reset(self) -> None:
        """What one fit records (a new ``fit`` starts afresh; a checkpoint's state is restored after)."""
        self.diverged_step = None
        self.max_norm_preclip = None
        self.scaler_skips = None  # updates the loss scaler skipped (None: no scaler)
        self._reset_reads()
        self._unseen_backward_said = False  # the warning of a step with no backward through Lightning
        self._pending = []
        self._staged = None
        self._rows = []
        self._steps = []
        self._opt_keys = []
        # Running clip rate over every (finite) step so far (README, "The MLflow record").
        self._clipped, self._counted = 0.0, 0

    def set_groups(self, names: Sequence[str], extra: Sequence[str] = ()) -> None:
        """The record's layout: :data:`RECORD_HEAD`, ``extra`` columns, then ``norm_<name>`` per group."""
        self.group_names = tuple(names)
        self.fields = (*RECORD_HEAD, *extra, *(f"norm_{g}" for g in self.group_names))

    # -- wiring
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.measures:
            self._reset()

    def on_fit_start(self, trainer, pl_module) -> None:
        self._trainer = trainer
        if not self.measures:
            return
        self.groups = {g: list(ps) for g, ps in self.groups_of(pl_module).items()}
        # no such weights (a hand-written cell loop): no metric, not a 0.0 read as measured (a walkthrough)
        if self.groups_of is parameter_groups:
            self.groups = {g: ps for g, ps in self.groups.items() if ps}
        self.set_groups(list(self.groups))
        self._by_opt = {id(opt): self._optimizer_entry(opt) for opt in trainer.optimizers}
        self._scaler = grad_scaler(trainer)
        if self._scaler is not None and self.scaler_skips is None:
            self.scaler_skips = 0
        self._hook_optimizers(trainer)

    # -- every step (when this monitor measures)
    def on_after_backward(self, trainer, pl_module) -> None:
        """The gradient as backward left it, before any clipping (the module's hooks run after this)."""
        if not self.measures or (pl_module.automatic_optimization and _accumulating(trainer)):
            return
        scale = scale_of(self._scaler) if self._scaler is not None else None
        for opt in trainer.optimizers:
            sq = group_sq(self._groups_of(opt), self.group_names)
            if sq is not None and scale is not None:
                sq = sq / torch.as_tensor(scale, dtype=torch.float64, device=sq.device).square()
            self._backward_sq[id(opt)] = sq

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.measures:
            return
        sq = self._backward_sq.pop(id(optimizer), None)
        if sq is None:
            sq = group_sq(self._groups_of(optimizer), self.group_names)
            if sq is not None and not self._unseen_backward_said:
                # read after any self.clip_gradients: a clip rate of 0 and a largest norm of the clipped
                # ones, with no word (a walkthrough); said once, as Lightning's own warnings are
                self._unseen_backward_said = True
                warnings.warn(
                    "GradientNormMonitor: no backward through Lightning before this optimizer step "
                    "(loss.backward() called directly?): the pre-clip norm is read here, after any "
                    "clip_gradients, so clipping is not seen and the loss is not read; use "
                    "self.manual_backward(loss)",
                    UserWarning,
                    stacklevel=2,
                )
        self._stepped = True  # every optimizer stepped after these backward passes gets their loss
        if sq is None:
            return
        pre = sq.sum().sqrt()
        loss = self._step_loss(trainer, pl_module, pre)
        self._pre, self._pre_loss = sq, loss
        if self._scaler is None and id(optimizer) in self._hooked:
            return  # decided with the post-clip read, before the update (_read_post): one host read
        # With a loss scaler, here: its overflow must be told from divergence before it skips the update
        # (its step then calls no optimizer hook). So is an optimizer the Trainer did not have at fit
        # start (one swapped in since), whose step has no hook to decide in.
        finite = self._finite(pre, loss)
        if not bool(finite):  # one host read: before the update
            nan = pre.new_tensor(math.nan)
            row = torch.stack([loss, pre, nan, nan, *sq.sqrt()])
            self._pre = None
            if (
                self._scaler is not None
                and (self._loss is None or bool(torch.isfinite(loss)))
                and float(scale_of(self._scaler)) > 1.0
            ):
                # the scaler's overflow (no loss seen: as a finite one): it skips this update and lowers
                # the scale (torch.amp.GradScaler). At a scale of 1 or below the gradient is non-finite
                # unscaled: divergence (below).
                self.scaler_skips = (self.scaler_skips or 0) + 1
                self.push(row, trainer.global_step, optimizer)
                return
            self._diverge(trainer, optimizer, row)

    def _diverge(self, trainer, optimizer, row: torch.Tensor) -> None:
        """The guard fires: every gradient dropped before the update, training told to stop, the step
        recorded (``row``: post-clip norm and coefficient NaN)."""
        drop_gradients(p for gs in self.groups.values() for p in gs)
        # anything the monitor did not classify
        drop_gradients(p for group in optimizer.param_groups for p in group["params"])
        # the first non-finite step: Lightning may go on (min_steps), the guard keeping the weights finite
        if self.diverged_step is None:
            self.diverged_step = trainer.global_step
        trainer.should_stop = True
        self.push(row, trainer.global_step, optimizer)

    def collect(self, trainer, pl_module) -> None:
        """Hook, once per training batch before the window check: a subclass whose module measures
        pushes that module's record here. This class measures in the hooks above: nothing to do."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.collect(trainer, pl_module)
        if len(self._pending) >= self.log_every_n_steps or (self.diverged_step is not None and self._pending):
            self.drain()

    def on_train_end(self, trainer, pl_module) -> None:
        self.drain()
