"""The float64 CPU copy of a user's module that the profile runs on (:func:`float64_copy`), and the
batch moved to it (:func:`to_cpu64`): what ``copy.deepcopy`` needs help with in modules researchers
write (torch.compile's wrappers, parametrized weights, state kept as plain attributes; README, "The
float64 copy's loss")."""

from __future__ import annotations

import copy
import sys
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def _compiled_type() -> type | None:
    """torch.compile's module wrapper (``OptimizedModule``), if torch.compile was imported: a module can
    only be compiled once it is, so the profile never imports it (README, "Your own model")."""
    return getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)


def eager(module: nn.Module) -> nn.Module:
    """``module`` without torch.compile's wrappers (``torch.compile(m)._orig_mod`` is ``m``)."""
    compiled = _compiled_type()
    while compiled is not None and isinstance(module, compiled):
        module = module.get_submodule("_orig_mod")
    return module


def eager_path(path: str) -> str:
    """A dotted path without the ``_orig_mod`` steps through compiled wrappers (the copy drops them)."""
    return ".".join(part for part in path.split(".") if part != "_orig_mod")


def _uncompiled(twin: nn.Module, memo: dict[int, Any]) -> None:
    """The copy runs eagerly: a compiled submodule replaced by the module it wraps, and a method compiled
    onto an instance (Lightning's ``fit(torch.compile(model))`` compiles ``forward`` and
    ``training_step`` so; ``self.forward = torch.compile(self.forward)``) by that method bound to the
    copy. deepcopy keeps such a function as it is, still bound to the original float32 module."""
    compiled = _compiled_type()
    if compiled is None:
        return
    for mod in twin.modules():
        for name, child in list(mod._modules.items()):
            if child is not None and isinstance(child, compiled):
                mod._modules[name] = eager(child)
        for name, value in list(vars(mod).items()):
            fn = value
            while hasattr(fn, "_torchdynamo_orig_callable"):
                fn = fn._torchdynamo_orig_callable
            if fn is not value and isinstance(fn, types.MethodType) and id(fn.__self__) in memo:
                mod.__dict__[name] = types.MethodType(fn.__func__, memo[id(fn.__self__)])


def _tensor_cpu64(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.double() if t.is_floating_point() else t.clone()


def to_cpu64(obj: Any) -> Any:
    """A batch moved to the CPU, floating tensors as float64, through the collections Lightning itself
    moves to a device (tuples, namedtuples, lists, mappings and their subclasses, dataclasses:
    ``lightning_utilities``' ``apply_to_collection``, which rebuilds the collections around new tensors
    and keeps their other leaves: strings, numbers, arrays); anything else deep-copied."""
    from lightning_utilities.core.apply_func import apply_to_collection

    moved = apply_to_collection(obj, torch.Tensor, _tensor_cpu64)
    return moved if moved is not obj else copy.deepcopy(obj)


def float64_copy(module: nn.Module) -> nn.Module:
    """A float64 CPU copy of ``module`` in eval mode, without its trainer (or Fabric) reference, with no
    parameter requiring grad (only the RNN's replaced outputs do)."""
    module = eager(module)
    memo: dict[int, Any] = {}
    for attr in ("_trainer", "_fabric"):
        ref = getattr(module, attr, None)
        if ref is not None:
            memo[id(ref)] = None  # deepcopy returns None for that object: the run is not copied
    for t in _non_leaf_tensors(module):
        # deepcopy refuses a tensor autograd computed; a module keeps one after a forward where a weight
        # is parametrized (torch.nn.utils.parametrize: nn.RNN's _flat_weights holds the weight as last
        # computed) or an attribute holds an undetached state. The copy takes its value; Module.to
        # below recomputes an RNN's flat weights from its parametrizations.
        memo[id(t)] = t.detach().clone()
    try:
        twin = copy.deepcopy(module, memo)
    except Exception as e:  # any object deepcopy refuses, named in one line
        raise ValueError(
            f"the profile runs on a float64 copy of {type(module).__name__}, and copy.deepcopy failed: "
            f"{type(e).__name__}: {e}"
        ) from e
    _uncompiled(twin, memo)
    twin.to(device="cpu", dtype=torch.float64)
    for mod in twin.modules():
        _attributes_to_cpu64(mod)
    twin.eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def _non_leaf_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """The tensors with a ``grad_fn`` that ``module``'s submodules keep as plain attributes, alone or in
    a tuple or list."""
    for mod in module.modules():
        for value in vars(mod).values():
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                    yield t


def _attributes_to_cpu64(mod: nn.Module) -> None:
    """The tensors ``mod`` keeps as plain attributes (not parameters or buffers, which ``Module.to``
    moves), alone or in a tuple or list (a hidden state carried between batches: ``self.h =
    h_n.detach()``), moved to the CPU, floating ones as float64, as the copy's parameters are."""
    for name, value in list(vars(mod).items()):
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            mod.__dict__[name] = _tensor_cpu64(value)
        elif (
            isinstance(value, (tuple, list))
            and value
            and all(isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) for v in value)
        ):
            mod.__dict__[name] = to_cpu64(value)  # a namedtuple rebuilt by its fields
