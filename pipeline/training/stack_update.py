"""A stack's update step, batched over its members (README, "Batched trials").

After the stack's one backward, every member measures, guards, clips and records
(:meth:`~pipeline.training.module.RNNTrainingModule.configure_gradient_clipping`), then steps its own
optimizer. Done member by member that is about 40 small operations and one host read per member and
step: on a GPU the launches and K host reads a step, not the kernels, set a stack's speed (README,
"Batched trials", the H200 measurements). :func:`update` does the same for all members at once:

* one fused norm (``torch._foreach_norm``) over every member's gradients, summed per member and group
  with one ``index_add_``: the same squared group norms :func:`~pipeline.training.grad_monitor.group_sq`
  gives each member (float64 sums, up to summation order);
* one host read for the whole stack: the divergence guard's finite flags of every member, with their
  clip coefficients;
* clipping by norm (Pascanu et al. 2013, Algorithm 1) with each member's own coefficient, one
  ``torch._foreach_mul_``; each member's record row (``RECORD_FIELDS``) is a row of one tensor;
* the optimizers, grouped by their hyperparameters other than the learning rate: the operations of
  torch's multi-tensor (``foreach``) Adam and SGD (``torch/optim/adam.py::_multi_tensor_adam``,
  ``torch/optim/sgd.py::_multi_tensor_sgd``, torch 2.13), with per-member learning rates as scalar lists
  (Adam) or one fused add per learning rate (SGD), each rounded once as torch's own step.
  Each member's optimizer state stays in its own ``torch.optim`` optimizer, in torch's layout (``step``,
  ``exp_avg``, ``exp_avg_sq``; ``momentum_buffer``), so a member can step alone at any time.

What is batched (:func:`batchable`): Adam (not amsgrad, maximize, decoupled decay, capturable,
differentiable or fused) and SGD (not nesterov or maximize), with clipping ``none`` or ``norm``, and no
remedy (``remedy.*``: the spike skip's window, Omega and flossing keep their per-member path). Every
other member (RMSprop, clipping by value, remedies) takes its module's own per-member step, in the same
training step. The equivalence with a member trained alone is tested (tests/test_batched.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.names import GROUPS
from pipeline.training.grad_monitor import drop_gradients

_ADAM_OFF = ("amsgrad", "maximize", "decoupled_weight_decay", "capturable", "differentiable", "fused")


def batchable(cfg, opt: torch.optim.Optimizer) -> bool:
    """Whether a member with config ``cfg`` and optimizer ``opt`` takes the batched update."""
    if cfg.clip.mode not in ("none", "norm") or cfg.remedy.active or len(opt.param_groups) != 1:
        return False
    g = opt.param_groups[0]
    if type(opt) is torch.optim.Adam:
        return not any(g.get(k) for k in _ADAM_OFF) and not isinstance(g["lr"], torch.Tensor)
    if type(opt) is torch.optim.SGD:
        off = ("nesterov", "maximize", "fused", "differentiable")
        return not any(g.get(k) for k in off) and not isinstance(g["lr"], torch.Tensor)
    return False


class _Layout:
    """Where each gradient tensor of a set of members belongs (its member and group), which tensors clip
    by norm, and the members' thresholds; built once per set of members, on their device."""

    def __init__(self, members: Sequence[Any], device: torch.device):
        seg: list[int] = []
        owner: list[int] = []
        clip: list[int] = []
        for k, m in enumerate(members):
            for gi, g in enumerate(GROUPS):
                for _ in m.module.groups[g]:
                    if m.cfg.clip.mode == "norm":
                        clip.append(len(seg))
                    seg.append(k * len(GROUPS) + gi)
                    owner.append(k)
        self.seg = torch.tensor(seg, device=device)
        self.owner = owner  # the member of each gradient tensor
        self.clip = clip  # indices (into the flat gradient list) of the tensors clipped by norm
        thr = [m.cfg.clip.threshold if m.cfg.clip.mode == "norm" else math.inf for m in members]
        self.threshold = torch.tensor(thr, dtype=torch.float64, device=device)


def _layout(members: Sequence[Any], device: torch.device, cache: dict | None) -> _Layout:
    """The layout of ``members``, from ``cache`` (a stack's own dict: its member set changes only when
    one joins or leaves). The entry holds its members, so their ids cannot be reused while it is kept."""
    key = tuple(id(m) for m in members)
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        return hit[1]
    lay = _Layout(members, device)
    if cache is not None:
        cache.clear()  # one entry: the current set
        cache[key] = (tuple(members), lay)
    return lay


class Measured:
    """What :func:`measure` read of a set of members: each one's record row, finite flag and clip
    coefficient (the step's one host read), for :func:`apply`."""

    def __init__(self, members: Sequence[Any], grads: list, lay: _Layout | None, rows, finite, coefs):
        self.members, self.grads, self.lay, self.rows = members, grads, lay, rows
        self.finite: list[float] = finite
        self.coefs: list[float] = coefs


def measure(members: Sequence[Any], cache: dict | None = None) -> Measured:
    """Each member's norms and record row, and the one host read of the step: its finite flag and clip
    coefficient. Nothing is clipped or stepped yet (:func:`apply`), so a caller may still redo a member's
    step when its flag was set by a neighbour in a fused block (:func:`pipeline.training.stack_loop._step`)."""
    if not members:
        if cache is not None:
            cache.clear()  # hold no member that has left the stack
        return Measured(members, [], None, None, [], [])
    mods = [m.module for m in members]
    grads = [p.grad for mod in mods for g in GROUPS for p in mod.groups[g]]
    device = grads[0].device
    lay = _layout(members, device, cache)
    K, G = len(mods), len(GROUPS)
    norms = torch.stack(torch._foreach_norm(grads)).double().square()
    sq = torch.zeros(K * G, dtype=torch.float64, device=device).index_add_(0, lay.seg, norms).view(K, G)
    pre = sq.sum(1).sqrt()
    loss = torch.stack([mod._loss for mod in mods]).double()
    coef = torch.clamp(lay.threshold / (pre + 1e-6), max=1.0)  # 1 exactly without clipping (inf / x)
    post = pre * coef
    nan = torch.full_like(pre, math.nan)
    head = torch.stack([loss, pre, post, coef, (coef < 1.0).double(), torch.zeros_like(pre), nan, nan], 1)
    rows = torch.cat([head, sq.sqrt()], 1)  # RECORD_FIELDS: the head, then the group norms
    # The one host read of the step: each member's finite flag and its clip coefficient (in the
    # gradients' dtype, as the per-member path multiplies by it).
    ok_coef = torch.stack(
        [(torch.isfinite(pre) & torch.isfinite(loss)).to(grads[0].dtype), coef.to(grads[0].dtype)]
    )
    finite, coefs = ok_coef.tolist()
    return Measured(members, grads, lay, rows, finite, coefs)


def apply(ms: Measured) -> None:
    """Guard, clip, record and step the members :func:`measure` read, as each module's
    ``configure_gradient_clipping`` and optimizer ``step`` would."""
    lay, grads, finite, coefs = ms.lay, ms.grads, ms.finite, ms.coefs
    if lay is None:
        return
    sel = [i for i in lay.clip if finite[lay.owner[i]]]
    if sel:  # each clipped gradient times its member's coefficient: one foreach kernel (a scalar list)
        torch._foreach_mul_([grads[i] for i in sel], [coefs[lay.owner[i]] for i in sel])
    live = []
    for k, (m, ok) in enumerate(zip(ms.members, finite, strict=True)):
        if ok == 1.0:
            live.append(m)
            continue
        ms.rows[k, 2:5] = math.nan  # as the per-member guard's record: no post-clip norm, coefficient, flag
        drop_gradients(m.module.model.parameters())
        m.module.diverged_step = m.trainer.global_step
        m.trainer.should_stop = True
    for m, row in zip(ms.members, ms.rows.unbind(0), strict=True):
        m.module.last_record = row
    _step_optimizers(live)


def update(members: Sequence[Any], cache: dict | None = None) -> None:
    """Measure, guard, clip, record and step every member in ``members`` (each :func:`batchable`, every
    parameter with a gradient, all on one device), as its module's ``configure_gradient_clipping`` and
    its optimizer's ``step`` would, member by member. ``cache``: a dict the caller keeps for the stack
    (the members' layout is built again only when the set changes)."""
    apply(measure(members, cache))


def _step_optimizers(members: Sequence[Any]) -> None:
    adams: dict[tuple[tuple[float, float], float, float], list[Any]] = {}
    sgds: dict[tuple[float, float, float], list[Any]] = {}
    for m in members:  # grouped by every hyperparameter but the learning rate
        g = m.opt.param_groups[0]
        if type(m.opt) is torch.optim.Adam:
            adams.setdefault((tuple(g["betas"]), g["eps"], g["weight_decay"]), []).append(m)
        else:
            sgds.setdefault((g["momentum"], g["dampening"], g["weight_decay"]), []).append(m)
    with torch.no_grad():
        for (betas, eps, wd), ms in adams.items():
            _adam(ms, betas, eps, wd)
        for (momentum, dampening, wd), ms in sgds.items():
            _sgd(ms, momentum, dampening, wd)


def _params(opt: torch.optim.Optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, gradient) of each parameter of ``opt`` with a gradient."""
    return [(p, p.grad) for p in opt.param_groups[0]["params"] if p.grad is not None]


def _adam(members: Sequence[Any], betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """torch's ``_multi_tensor_adam`` (capturable=False, amsgrad=False, maximize=False), over the
    parameters of several optimizers, each with its own learning rate (``step_size`` is a per-tensor
    list there already)."""
    beta1, beta2 = betas
    params: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    exp_avgs: list[torch.Tensor] = []
    exp_avg_sqs: list[torch.Tensor] = []
    steps: list[torch.Tensor] = []
    lrs: list[float] = []
    for m in members:
        opt = m.opt
        lr = opt.param_groups[0]["lr"]
        for p, grad in _params(opt):
            state = opt.state[p]
            if len(state) == 0:  # as Adam._init_group (not capturable, not fused)
                state["step"] = torch.tensor(0.0, dtype=torch.get_default_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
            lrs.append(lr)
    if not params:
        return
    torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
    counts = torch.stack(steps).tolist()  # each tensor's own count (CPU tensors: no device read)
    if weight_decay != 0:
        grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_size = [(lr / (1 - beta1**n)) * -1 for lr, n in zip(lrs, counts, strict=True)]
    bias_correction2_sqrt = [(1 - beta2**n) ** 0.5 for n in counts]
    exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(exp_avg_sq_sqrt, bias_correction2_sqrt)
    torch._foreach_add_(exp_avg_sq_sqrt, eps)
    torch._foreach_addcdiv_(params, exp_avgs, exp_avg_sq_sqrt, step_size)


def _sgd(members: Sequence[Any], momentum: float, dampening: float, weight_decay: float) -> None:
    """torch's ``_multi_tensor_sgd`` (nesterov=False, maximize=False), over the parameters of several
    optimizers, each with its own learning rate."""
    params: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    bufs: list[torch.Tensor | None] = []
    lrs: list[float] = []
    states: list[dict] = []
    for m in members:
        opt = m.opt
        lr = opt.param_groups[0]["lr"]
        for p, grad in _params(opt):
            params.append(p)
            grads.append(grad)
            if momentum != 0:  # as torch's SGD, which keeps state only for a momentum buffer
                states.append(opt.state[p])
                bufs.append(opt.state[p].get("momentum_buffer"))
            lrs.append(-lr)
    if not params:
        return
    if weight_decay != 0:
        grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
    if momentum != 0:
        if all(b is not None for b in bufs):
            full = [b for b in bufs if b is not None]
            torch._foreach_mul_(full, momentum)
            torch._foreach_add_(full, grads, alpha=1 - dampening)
        else:
            full = []
            for b, grad in zip(bufs, grads, strict=True):
                if b is None:  # the first step: the buffer is the gradient
                    b = grad.detach().clone()
                else:
                    b.mul_(momentum).add_(grad, alpha=1 - dampening)
                full.append(b)
        for st, b in zip(states, full, strict=True):
            st["momentum_buffer"] = b
        grads = full
    _add_per_lr(params, grads, lrs)


def _add_per_lr(params: list[torch.Tensor], grads: list[torch.Tensor], alphas: list[float]) -> None:
    """``param += alpha * grad``, one fused add per distinct ``alpha``, as torch's SGD step (rounded once):
    a product rounded first and added after (foreach mul, then add) differs in the last bit at most
    learning rates, and a chaotic trial grows that bit (a review measured 2% on a diverging LSTM's
    largest norm)."""
    by_alpha: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for p, g, a in zip(params, grads, alphas, strict=True):
        ps, gs = by_alpha.setdefault(a, ([], []))
        ps.append(p)
        gs.append(g)
    for a, (ps, gs) in by_alpha.items():
        torch._foreach_add_(ps, gs, alpha=a)
