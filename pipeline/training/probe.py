"""The exact BPTT profile of an RNN inside any LightningModule, on that module's own loss.

:func:`probe` deep-copies the module to float64 on the CPU (the trainer reference left out, so nothing
of the run is copied or touched), puts a forward hook on the copy's RNN that records its input (and
``hx``) and replaces its outputs by leaf tensors, runs the copy's own ``training_step(batch, 0)`` (or a
given ``loss_fn(module, batch)``: a module in manual optimization steps its optimizers in its
training_step) and takes ``torch.autograd.grad`` of the returned loss with respect to those leaves: the gradient the loss injects at
every step of the top layer and into ``h_n`` / ``c_n``. The walk back through every layer is
:func:`pipeline.bptt.foreign.profile_layers` (pure torch). :func:`profile_rnn` is the notebook front.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from pipeline.bptt import foreign, spectra
from pipeline.bptt import profile as bptt
from pipeline.bptt.profile import exact_denormals
from pipeline.training.copy64 import eager, eager_path, float64_copy, to_cpu64

LossFn = Callable[[nn.Module, Any], Any]  # (module, batch) -> the loss, as training_step returns it


def check_loss_source(module: nn.Module, loss_fn: LossFn | None) -> None:
    """One line when the profile cannot take its loss from ``module``: ``loss_fn`` not callable, or a
    module in manual optimization without one (its training_step would step its optimizers, and needs
    the Trainer to do so; truncated BPTT is written that way in Lightning 2)."""
    if loss_fn is not None:
        if not callable(loss_fn):
            raise ValueError(
                f"loss_fn must be a callable (module, batch) -> loss, got {type(loss_fn).__name__}"
            )
        return
    if not callable(getattr(module, "training_step", None)):  # a bare nn.GRU: an AttributeError deep inside
        raise ValueError(
            f"{type(module).__name__} has no training_step(batch, batch_idx) to take the loss from: pass "
            'loss_fn=lambda module, batch: <the loss> (README, "Your own model")'
        )
    if getattr(module, "automatic_optimization", True) is False:
        raise ValueError(
            f"{type(module).__name__} uses manual optimization (automatic_optimization = False): its "
            "training_step steps its optimizers, so the profile needs loss_fn=lambda module, batch: <the "
            'loss over the whole sequence> (README, "Your own model")'
        )


def resolve(module: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted attribute path ``path`` (``"encoder.lstm"``), checked supported."""
    if not isinstance(path, str):  # the RNN itself, given for its path
        raise ValueError(
            f"rnn must be the RNN's dotted attribute path in the module (a str such as 'encoder.lstm'), got {type(path).__name__}"
        )
    try:
        rnn = eager(module.get_submodule(path))
    except AttributeError:
        raise ValueError(f"{type(module).__name__} has no submodule {path!r}; {foreign.SUPPORTED}") from None
    foreign.check_supported(rnn, path)
    return rnn


@dataclass
class Probe:
    """One profile pass: per-layer profiles (index 0 = bottom), summaries, spectra, the loss."""

    cell: str
    profiles: list[bptt.Profile]
    loss: float
    metrics: list[dict[str, float]] = field(default_factory=list)  # per layer, un-prefixed names

    def long_format(self, step: int | None = None) -> dict[str, Any]:
        """Columns ``[step,] layer, t, state, log10_norm``: one row per layer, step and state."""
        import numpy as np

        cols: dict[str, list[Any]] = {"layer": [], "t": [], "state": [], "log10_norm": []}
        for k, prof in enumerate(self.profiles):
            lf = prof.long_format(0)
            cols["layer"].append(np.full(len(lf["t"]), k, dtype=np.int64))
            for c in ("t", "state", "log10_norm"):
                cols[c].append(lf[c])
        out: dict[str, Any] = {c: np.concatenate(v) for c, v in cols.items()}
        if step is not None:
            out = {"step": np.full(len(out["t"]), int(step), dtype=np.int64), **out}
        return out


def _loss_of(result: Any, source: str = "training_step") -> torch.Tensor:
    if isinstance(result, dict):
        result = result.get("loss")
    if not isinstance(result, torch.Tensor) or result.numel() != 1:
        raise ValueError(f"{source} must return the loss (a scalar tensor, or a dict with 'loss')")
    return result.reshape(())


# What a module's training_step does, run outside a Trainer, that is expected and harmless: Lightning warns
# that ``self.log()`` (and ``self.log_dict()``, which calls it) has no trainer reference, and logs nothing.
NO_TRAINER_LOG = r"You are trying to `self\.log\(\)` but the `self\.trainer` reference is not registered"


@contextlib.contextmanager
def _isolated() -> Iterator[None]:
    """Around the copy's loss: float64 as the default dtype (a state the module makes, ``torch.zeros(...)``,
    meets the float64 copy in its precision), and the random generators it may draw from (input noise,
    a sampled mask) put back after, so profiling never changes what training draws next (torch's CPU
    generator; Python's and numpy's global ones)."""
    import random

    import numpy as np

    dtype, py, npy = torch.get_default_dtype(), random.getstate(), np.random.get_state()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_default_dtype(dtype)
        random.setstate(py)
        np.random.set_state(npy)


def _explained(e: Exception, cls: str, source: str) -> Exception:
    """The two ways a loss written for a Trainer fails on the detached float64 copy, said in one line."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    low = msg.lower()
    if "not attached to a `Trainer`" in msg:
        fix = (
            "loss_fn must not use it"
            if source == "loss_fn"
            else 'pass loss_fn=lambda module, batch: <the loss> (README, "Your own model")'
        )
        return ValueError(
            f"{cls} {source} needs its Trainer ({msg}); the profile runs it on a float64 copy without one: {fix}"
        )
    # "must have the type": nn.RNN's words for it in torch 2.4 (the floor, README "Supported versions")
    if "dtype" in low or "scalar type" in low or "must have the type" in low:
        return ValueError(
            f"{cls} {source} mixed float64 and another dtype on the profile's float64 copy ({msg}): make "
            "the tensors it creates follow the input (x.new_zeros(...), dtype=x.dtype), or pass loss_fn"
        )
    return e


class ProbeError(ValueError):
    """A pass of the profile refused, said in one line by the profile itself (no note added under it)."""


# Said under an error of the user's own step on the probe batch, whose traceback runs through a callback
# of ours: what ran, and on what (type and message stay the user's code's).
_WHERE = (
    "(raised by {what} on the gradient profile's probe batch, run on a float64 CPU copy of the model: "
    "the batch= given to BPTTProfileMonitor or profile_rnn, else the first training batch)"
)


def _shapes(batch: Any) -> str:
    """The shapes of a batch's tensors, as a line says them: ``[16, 10, 3], [16]``."""
    items = (
        batch.values() if isinstance(batch, dict) else batch if isinstance(batch, list | tuple) else [batch]
    )
    shapes = [str(list(t.shape)) for t in items if isinstance(t, torch.Tensor)]
    return ", ".join(shapes) or "no tensors"


def _check_input_shape(target: nn.Module, rnn: str, x: Any, batch: Any) -> None:
    """An input an ``nn.RNN``/``GRU``/``LSTM`` cannot take, in one line naming it and the probe batch's
    shapes: the batch may be wrong, or the layers before the RNN (torch's own error named neither the
    batch nor the monitor: a walkthrough; a review found a model's own wrong layer blamed on the batch)."""
    size = getattr(target, "input_size", None)
    if not isinstance(x, torch.Tensor) or not isinstance(size, int):
        return
    if x.dim() not in (2, 3) or x.shape[-1] != size:
        layout = "[batch, T, {0}]" if getattr(target, "batch_first", False) else "[T, batch, {0}]"
        raise ProbeError(
            f"{rnn!r} got an input of shape {list(x.shape)} on the gradient profile's probe batch (its "
            f"tensors: {_shapes(batch)}), which it cannot take (input_size {size}: {layout.format(size)}, or "
            f"[T, {size}] unbatched): the probe batch (batch=, else the first training batch) or the layers "
            f"before {rnn!r} do not fit it"
        )


def _check_finite_input(twin: nn.Module, rnn: str, x: torch.Tensor, hx: Any) -> None:
    """A NaN or inf in the RNN's input or ``hx`` while every weight of the copy is finite came from the
    probe batch: its forward is no overflow, yet it read as one (``bptt/overflow_step``, verdict
    ``exploding``; a walkthrough put one NaN in a GRU's probe batch). A model whose own weights went
    non-finite (diverged in training) is measured as it is."""
    states = [h for h in (hx if isinstance(hx, tuple) else (hx,)) if isinstance(h, torch.Tensor)]
    bad = sum(int((~torch.isfinite(t)).sum()) for t in [x, *states] if t.is_floating_point())
    if bad and all(bool(torch.isfinite(p).all()) for p in twin.parameters()):
        raise ProbeError(
            f"the probe batch gives {rnn!r} {bad} non-finite input value(s) (NaN or inf) while the model's "
            "weights are finite: its profile would read them as the forward overflowing (verdict "
            "exploding); give a probe batch of finite values"
        )


def _training_step(module: nn.Module, batch: Any) -> Any:
    """``module.training_step(batch, 0)``, or ``(batch)`` where it takes no ``batch_idx``: as Lightning
    calls it (its ``is_param_in_hook_signature(..., min_args=2)``: "the batch_idx is optional"). Always
    passing 0 failed a module with ``training_step(self, batch)``, which Lightning trains (a walkthrough)."""
    from pytorch_lightning.utilities.signature_utils import is_param_in_hook_signature

    step: Callable[..., Any] = module.training_step  # type: ignore[assignment]
    if is_param_in_hook_signature(step, "batch_idx", min_args=2):
        return step(batch, 0)
    return step(batch)


def _step(twin: nn.Module, batch: Any, loss_fn: LossFn | None) -> Any:
    """``loss_fn(twin, batch)``, else ``twin.training_step(batch, 0)`` (:func:`_training_step`); an error
    it raises is explained (:func:`_explained`) or, the user's own, told where it came from
    (:data:`_WHERE`)."""
    source = "loss_fn" if loss_fn is not None else "training_step"
    # loss_fn is the user's function, not a method of the module
    where = _WHERE.format(what="loss_fn" if loss_fn is not None else f"{type(twin).__name__}.training_step")
    try:
        return loss_fn(twin, batch) if loss_fn is not None else _training_step(twin, batch)
    except ProbeError:
        raise
    except (RuntimeError, ValueError) as e:  # nn.RNN raises ValueError on an input's dtype
        explained = _explained(e, type(twin).__name__, source)
        if explained is not e:
            raise explained from e
        e.add_note(where)
        raise
    except Exception as e:  # the batch's structure (unpacking, a key): the user's error, in context
        e.add_note(where)
        raise


def _capture(
    twin: nn.Module,
    target: nn.Module,
    rnn: str,
    batch: Any,
    loss_fn: LossFn | None = None,
    check_input: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, Any, list[torch.Tensor | None]]:
    """Run ``twin``'s ``training_step(batch, 0)`` (or ``loss_fn(twin, batch)``) with a forward hook on ``target`` (the RNN at ``rnn``)
    that records its input and ``hx`` and replaces its outputs by clones of leaf tensors (clones, so that the
    step may edit them in place): (the loss, the input, ``hx``,
    the loss's gradients with respect to the output and each final state, None where unused)."""
    seen: dict[str, Any] = {}
    source = "loss_fn" if loss_fn is not None else "training_step"

    def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if "x" in seen:
            raise ProbeError(f"{rnn!r} was called more than once in {source}; the profile needs one call")
        x = args[0] if args else kwargs["input"]
        if isinstance(x, PackedSequence):
            raise ProbeError(f"{rnn!r} was fed a PackedSequence; {foreign.SUPPORTED}")
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        out, state = output
        leaves = [out.detach().requires_grad_()]
        if isinstance(state, tuple):
            leaves += [s.detach().requires_grad_() for s in state]
            replaced = (leaves[0].clone(), (leaves[1].clone(), leaves[2].clone()))
        else:
            leaves.append(state.detach().requires_grad_())
            replaced = (leaves[0].clone(), leaves[1].clone())  # clones: the step may edit them in place
        seen.update(x=x.detach(), hx=hx, leaves=leaves)
        return replaced

    def shape_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        _check_input_shape(mod, rnn, args[0] if args else kwargs.get("input"), batch)

    handles = [
        target.register_forward_pre_hook(shape_hook, with_kwargs=True),
        target.register_forward_hook(hook, with_kwargs=True),
    ]
    try:
        with torch.enable_grad(), warnings.catch_warnings(), _isolated():
            warnings.filterwarnings("ignore", message=NO_TRAINER_LOG, category=UserWarning)
            loss = _loss_of(_step(twin, to_cpu64(batch), loss_fn), source)
    finally:
        for h in handles:
            h.remove()
    if "x" not in seen:
        raise ValueError(f"{source} never called {rnn!r}")
    if check_input:
        _check_finite_input(twin, rnn, seen["x"], seen["hx"])
    leaves = seen["leaves"]
    grads = (
        torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
    )
    if all(g is None for g in grads):
        # A gradient of 0 at every step would read "vanishing"; it is no measurement. torch.utils.checkpoint
        # with use_reentrant=True does this: it keeps a graph only for inputs that require grad, and the
        # copy's parameters do not (the leaves are made inside its forward).
        raise ValueError(
            f"the loss of {source} does not depend on the outputs of {rnn!r} on the profile's copy (called "
            "inside torch.utils.checkpoint with use_reentrant=True? use use_reentrant=False, or pass "
            "loss_fn)"
        )
    return loss, seen["x"].to(torch.float64), seen["hx"], list(grads)


def _batch_first(
    target: nn.Module,
    x: torch.Tensor,
    hx: Any,
    g_out: torch.Tensor | None,
    g_states: list[torch.Tensor | None],
) -> tuple[torch.Tensor, Any, torch.Tensor | None, list[torch.Tensor | None]]:
    """``x``, ``hx`` and the gradients in the layout :mod:`pipeline.bptt.foreign` reads: batched, batch
    first (an unbatched ``[T, I]`` input becomes ``[1, T, I]``, its states ``[L, H]`` become ``[L, 1, H]``)."""
    if x.dim() == 2:  # unbatched
        x = x.unsqueeze(0)
        g_out = None if g_out is None else g_out.unsqueeze(0)
        g_states = [None if g is None else g.unsqueeze(1) for g in g_states]
        if hx is not None:
            hx = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
    elif not bool(getattr(target, "batch_first", False)):
        x = x.transpose(0, 1)
        g_out = None if g_out is None else g_out.transpose(0, 1)
    return x, hx, g_out, g_states


def probe(
    module: nn.Module,
    rnn: str,
    batch: Any,
    horizon_decades: float = 3.0,
    lyapunov: bool = True,
    restore_flush: bool | None = None,
    loss_fn: LossFn | None = None,
    memory_steps: int | None = 1,
    check_input: bool = True,
) -> Probe:
    """The exact float64 profile of the RNN at ``rnn`` on ``module``'s own ``training_step`` loss (or
    ``loss_fn(module, batch)``'s) for ``batch``, with summaries (:func:`pipeline.bptt.profile.summarize`), spectra, Pascanu's bound (vanilla
    cells, when the loss reads only the last steps) and the Lyapunov exponent, per layer. ``module`` is not
    modified (a float64 copy runs). ``memory_steps``: the long-range window, the last N steps the loss
    reads (:func:`pipeline.bptt.foreign.profile_layers`; None: the total gradient). ``check_input``: refuse a
    non-finite RNN input from finite weights (the probe batch's; :func:`_check_finite_input`): a monitor's
    first pass; later passes on the same batch measure an upstream overflow as one."""
    foreign.check_memory_steps(memory_steps)
    resolve(module, rnn)
    check_loss_source(module, loss_fn)
    twin = float64_copy(module)
    target = twin.get_submodule(eager_path(rnn))
    loss, x, hx, grads = _capture(twin, target, rnn, batch, loss_fn, check_input)
    x, hx, g_out, g_states = _batch_first(target, x, hx, grads[0], grads[1:])
    with exact_denormals(restore_flush), torch.no_grad():
        layers = foreign.forward_layers(target, x, hx)
        profiles = foreign.profile_layers(
            layers,
            g_out,
            g_states[0],
            g_states[1] if len(g_states) > 1 else None,
            restore_flush,
            memory_steps,
        )
    result = Probe(cell=foreign.cell_of(target), profiles=profiles, loss=float(loss.detach()))
    for layer, prof in zip(layers, profiles, strict=True):
        lyap_x = layer.x if lyapunov and layer.x.shape[1] > 1 else None
        result.metrics.append(pass_metrics(layer.params, prof, horizon_decades, lyap_x, restore_flush))
    return result


def pass_metrics(
    params: Any,
    prof: bptt.Profile,
    horizon_decades: float,
    lyapunov_x: torch.Tensor | None = None,
    restore_flush: bool | None = None,
) -> dict[str, float]:
    """One layer's metrics of one profile pass, the same for a user's RNN (:func:`probe`) and the
    project's twin (:class:`pipeline.training.callbacks.ProfileMonitor`): the profile's summaries
    (``bptt/*``), the spectra of ``params`` (``spectral/*``), Pascanu's bound where it applies (vanilla
    cells and lru, propagation only) and, given its input ``lyapunov_x``, the largest Lyapunov exponent
    (and mingru's gate bound and lem's Jacobian bound, which need the input)."""
    m: dict[str, float] = {f"bptt/{k}": v for k, v in bptt.summarize(prof, horizon_decades).items()}
    m.update({f"spectral/{k}": v for k, v in spectra.spectrum(params).items()})
    # Pascanu 2013's bound is a theorem about pure propagation (no loss term between step 1 and the
    # reference step) through vanilla cells: logged only there (gated cells: None).
    bound = spectra.pascanu_log10_bound(params, prof.reference_step) if prof.is_propagation_only else None
    if bound is not None:
        m["spectral/pascanu_log10_bound"] = bound
    if lyapunov_x is not None:
        m["spectral/lyapunov_max"] = spectra.lyapunov_max(params, lyapunov_x, restore_flush=restore_flush)
        # mingru's replacement for the bound: its Jacobian depends on the input alone (README, "Models").
        gate = spectra.gate_log10_bound(params, lyapunov_x, prof.reference_step)
        if gate is not None and prof.is_propagation_only:
            m["spectral/gate_log10_bound"] = gate
        # lem's and cornn's replacement: the product of their exact step-Jacobian norms (README, "Models");
        # a theorem for any cell, logged for these two (it costs one 2H x 2H eigensolve per step and sequence).
        if params["cell"] in ("lem", "cornn") and prof.is_propagation_only:
            m["spectral/jacobian_log10_bound"] = spectra.jacobian_log10_bound(
                params, lyapunov_x, prof.reference_step, restore_flush
            )
    return m


def profile_rnn(
    module: nn.Module, rnn: str, batch: Any, loss_fn: LossFn | None = None, memory_steps: int | None = 1
):
    """The exact per-step profile of the RNN at dotted path ``rnn`` inside ``module`` (any
    LightningModule, or any module with ``training_step(batch, batch_idx)`` returning its loss), on that
    loss for ``batch`` (or on ``loss_fn(module, batch)``, needed in manual optimization): a pandas DataFrame with columns ``layer`` (0 = bottom), ``t`` (1..T), ``state``
    (``h``, and ``c`` for LSTM: the long-range profile of the loss terms at the last ``memory_steps``
    steps the loss reads; ``h_total`` / ``c_total``: the whole loss's, when it reads earlier steps too)
    and ``log10_norm`` = log10 ||dL/d{state}_t|| (Frobenius over the batch), one row per layer, step
    and state. ``module`` is left untouched."""
    import pandas as pd

    res = probe(module, rnn, batch, lyapunov=False, loss_fn=loss_fn, memory_steps=memory_steps)
    return pd.DataFrame(res.long_format())
