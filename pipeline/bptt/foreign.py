"""The exact per-step profile of a user's own ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``, any number of layers.

Pure torch (no Lightning): :func:`layer_params` maps layer k of a fused module onto a
:mod:`pipeline.bptt.twin` params dict (``weight_ih_l{k}`` -> ``W_ih``, ...; a module built with
``bias=False`` gets zero biases), :func:`forward_layers` reruns the module layer by layer through the twin
cells keeping each step's activations, and :func:`profile_layers` walks back from the gradient the loss
injects into the module's outputs (``output`` at every step of the top layer, and ``h_n`` / ``c_n`` of
every layer) to ||dL/dh_t|| (and ||dL/dc_t|| for LSTM) at every step of every layer.

The walk is the one of :mod:`pipeline.bptt.profile`: float64, the backward signal carried as (vector at
max-abs 1, log scale), direct terms added in log space, so a gradient of 1e-400 reads log10 = -400. The
layers are walked top first: layer k's direct term at step t is the gradient its output h^k_t receives
through layer k+1's input weights, ``dL/da^{k+1}_t W_ih^{k+1}``, carried at layer k+1's scale at step t
(plus ``dL/dh_n[k]`` at t = T). The recurrent part is :func:`pipeline.bptt.twin.step_vjp`; the input part
is :func:`input_vjp` (the gradient of the step's input projection ``x_t W_ih^T + b_ih``).

Supported: unidirectional modules, ``proj_size == 0``, padded (not packed) input, ``batch_first`` either
way, an optional initial state ``hx``. Inter-layer dropout is not modelled: profile in eval mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.bptt import twin as cells
from pipeline.bptt.profile import (
    Profile,
    _log10_norms,
    _maxabs,
    _renormalise,
    exact_denormals,
    nonzero_or_one,
)
from pipeline.bptt.twin import Cache, Params, State

Tensor = torch.Tensor

SUPPORTED = (
    "supported: a unidirectional nn.RNN (tanh or relu), nn.LSTM (proj_size=0) or nn.GRU, any num_layers, "
    "batch_first or not, fed a padded tensor (not a PackedSequence)"
)


def cell_of(rnn: nn.Module) -> str:
    """The twin's cell name for a fused module: ``tanh`` / ``relu`` (nn.RNN), ``lstm``, ``gru``."""
    if isinstance(rnn, nn.LSTM):
        return "lstm"
    if isinstance(rnn, nn.GRU):
        return "gru"
    if isinstance(rnn, nn.RNN):
        return str(rnn.nonlinearity)
    raise ValueError(f"{type(rnn).__name__} is not supported; {SUPPORTED}")


def check_supported(rnn: nn.Module, name: str = "rnn") -> None:
    """Raise one ``ValueError`` line naming what is unsupported (and what is supported)."""
    if not isinstance(rnn, (nn.RNN, nn.LSTM, nn.GRU)):
        raise ValueError(f"{name!r} is a {type(rnn).__name__}; {SUPPORTED}")
    if rnn.bidirectional:
        raise ValueError(f"{name!r} is bidirectional; {SUPPORTED}")
    if getattr(rnn, "proj_size", 0):
        raise ValueError(f"{name!r} has proj_size={rnn.proj_size}; {SUPPORTED}")


def layer_params(rnn: nn.Module, layer: int, dtype: torch.dtype = torch.float64) -> Params:
    """Layer ``layer`` of a fused module as a twin params dict (detached copies, ``dtype``; no readout)."""
    cell = cell_of(rnn)
    w_ih = getattr(rnn, f"weight_ih_l{layer}").detach().to(dtype).clone()
    w_hh = getattr(rnn, f"weight_hh_l{layer}").detach().to(dtype).clone()
    if rnn.bias:
        b_ih = getattr(rnn, f"bias_ih_l{layer}").detach().to(dtype).clone()
        b_hh = getattr(rnn, f"bias_hh_l{layer}").detach().to(dtype).clone()
    else:
        b_ih = torch.zeros(w_ih.shape[0], dtype=dtype, device=w_ih.device)
        b_hh = torch.zeros_like(b_ih)
    return {"cell": cell, "W_ih": w_ih, "W_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh}


def input_vjp(params: Params, cache: Cache, v: State) -> Tensor:
    """dL/dgi_t for ``gi = x_t W_ih^T + b_ih`` given ``v`` = dL/dstate_t (from later steps and direct
    terms) at the step that produced ``cache``; ``dL/dx_t = input_vjp(...) @ W_ih``.

    Same pre-activation gradients as :func:`pipeline.bptt.twin.step_vjp`; for GRU the input part of the
    candidate gate is not multiplied by r (nn.GRU: ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``).
    """
    cell = params["cell"]
    if cell == "tanh":
        (d,) = cache
        return v[0] * d
    if cell == "relu":
        (h_new,) = cache
        return v[0] * (h_new > 0)
    if cell == "lstm":
        o_dtc, g_di, c_df, i_dg, tc_do, _ = cache  # the factors of twin.step_cached
        v_h, v_c = v
        dc = v_c + v_h * o_dtc
        return torch.cat([dc * g_di, dc * c_df, dc * i_dg, v_h * tc_do], dim=-1)
    if cell == "gru":
        _, keep_dn, hn_dr, hn_dz, _ = cache
        (v_h,) = v
        da_n = v_h * keep_dn
        return torch.cat([da_n * hn_dr, v_h * hn_dz, da_n], dim=-1)
    raise ValueError(f"cell {cell!r}: {SUPPORTED}")


@dataclass
class Layer:
    """One layer's forward: its params, its input sequence ``[B, T, I]`` (batch-first) and step caches."""

    params: Params
    x: Tensor
    caches: list[Cache]
    overflow_step: int | None


def forward_layers(
    rnn: nn.Module, x: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None
) -> list[Layer]:
    """Rerun ``rnn`` on ``x`` (batch-first ``[B, T, I]``, float64) layer by layer through the twin cells.

    ``hx``: the module's initial state as it was given (``h_0`` ``[L, B, H]``, or ``(h_0, c_0)``), or None
    (zeros). Each layer's input is the previous layer's output sequence (no dropout).
    """
    layers = []
    inp = x
    for k in range(int(rnn.num_layers)):  # type: ignore[arg-type]  # nn.Module attribute typing
        p = layer_params(rnn, k, x.dtype)
        if hx is None:
            state = cells.init_state(p, x.shape[0], x.dtype, x.device)
        elif isinstance(hx, tuple):
            state = (hx[0][k].to(x.dtype), hx[1][k].to(x.dtype))
        else:
            state = (hx[k].to(x.dtype),)
        caches, hs = [], []
        overflow = None
        with torch.no_grad():
            for gi in cells.input_projection(p, inp).unbind(1):
                state, cache = cells.step_cached(p, gi, state)
                caches.append(cache)
                hs.append(state[0])
        finite = torch.stack([torch.isfinite(h).all() for h in hs])
        bad = torch.nonzero(~finite).flatten()
        if bad.numel():
            overflow = int(bad[0]) + 1
        layers.append(Layer(p, inp, caches, overflow))
        inp = torch.stack(hs, dim=1)
    return layers


def _normalised(D: Tensor) -> tuple[list[Tensor], Tensor]:
    """``D`` ``[B, T, H]`` as per-step vectors at max-abs 1 (or 0) and their log scales (-inf for zero)."""
    m = D.abs().amax(dim=(0, 2))
    return list((D / nonzero_or_one(m)[None, :, None]).unbind(1)), torch.log(m)


def _add_scaled(v: State, s: Tensor, d: State, d_log: Tensor) -> tuple[State, Tensor]:
    """(v, s) + (d, d_log) in log space, renormalised. A zero v does not drown a tiny d (its scale is
    treated as -inf), and the result's scale stays finite."""
    s_eff = torch.where(_maxabs(v) > 0, s, torch.full_like(s, -math.inf))
    big = torch.maximum(s_eff, d_log)
    big = torch.where(torch.isfinite(big), big, torch.zeros_like(big))
    wv, wd = torch.exp(s_eff - big), torch.exp(d_log - big)
    return _renormalise(tuple(a * wv + b * wd for a, b in zip(v, d, strict=True)), big)


def _walk_layer(
    layer: Layer, D_n: list[Tensor], d_log: Tensor, final: State | None
) -> tuple[dict[str, Tensor], list[Tensor], Tensor]:
    """Walk one layer back from T to 1. ``(D_n, d_log)``: direct terms on h_t; ``final``: the extra
    gradient on the state at T (``dL/dh_n``, ``dL/dc_n``), unscaled. Returns the log10 norms per state
    (index t-1), and the input-projection gradients (vectors at max-abs 1 and their log scales, index
    t-1) that the layer below receives through ``W_ih``."""
    p, caches = layer.params, layer.caches
    names = cells.state_names(p)
    T = len(caches)
    zero = torch.zeros((), dtype=torch.float64, device=D_n[0].device)
    v: State = tuple(torch.zeros_like(D_n[0]) for _ in names)
    s = zero
    kept: dict[str, list[Tensor]] = {n: [] for n in names}
    scales: list[Tensor] = []
    dgi_n: list[Tensor] = []
    dgi_log: list[Tensor] = []
    for t in range(T, 0, -1):
        d: State = (D_n[t - 1],) + tuple(torch.zeros_like(D_n[0]) for _ in names[1:])
        v, s = _add_scaled(v, s, d, d_log[t - 1])
        if t == T and final is not None:
            m = _maxabs(final)
            f, f_log = tuple(x / nonzero_or_one(m) for x in final), torch.log(m)
            v, s = _add_scaled(v, s, f, f_log)
        cache = caches[t - 1]
        kept["h"].append(v[0])
        scales.append(s)
        g, dc = cells.step_vjp(p, cache, v)
        if dc is not None:
            kept["c"].append(dc)
        dgi, dgi_s = _renormalise((input_vjp(p, cache, v),), s)
        dgi_n.append(dgi[0])
        dgi_log.append(dgi_s)
        v, s = _renormalise(g, s)
    logs = {n: _log10_norms(kept[n], scales).flip(0) for n in names}
    return logs, dgi_n[::-1], torch.stack(dgi_log[::-1])


def np_nan(T: int) -> np.ndarray:
    """A fresh NaN array of length T (numpy)."""
    return np.full(T, np.nan)


def _first_nonzero(d_log: Tensor) -> int:
    """1-based first step with a direct term (T if none): where pure propagation ends."""
    idx = torch.nonzero(torch.isfinite(d_log)).flatten()
    return int(idx[0]) + 1 if idx.numel() else d_log.numel()


def check_memory_steps(memory_steps: object) -> int | None:
    """``memory_steps`` as given (a count >= 1, or None), else one ``ValueError`` line."""
    if memory_steps is None:
        return None
    if isinstance(memory_steps, bool) or not isinstance(memory_steps, int) or memory_steps < 1:
        raise ValueError(
            "memory_steps must be an int >= 1 (the last steps whose loss terms the long-range profile "
            f"keeps) or None (the total gradient), got {memory_steps!r}"
        )
    return memory_steps


def memory_window(d_log: Tensor, reads_final: bool, memory_steps: int | None) -> tuple[int, int]:
    """The top layer's long-range window (a, T), 1-based: a is the first of the last ``memory_steps``
    steps at which the loss reads the top layer (reading ``h_n`` / ``c_n`` is a read at T); with
    ``memory_steps`` None (the total gradient) or covering them all, the first step it reads."""
    T = d_log.numel()
    if memory_steps is None:
        return _first_nonzero(d_log), T
    reads = sorted(
        {int(i) + 1 for i in torch.nonzero(torch.isfinite(d_log)).flatten()} | ({T} if reads_final else set())
    )
    return (reads[-min(memory_steps, len(reads))] if reads else T), T


def profile_layers(
    layers: list[Layer],
    grad_output: Tensor | None,
    grad_h_n: Tensor | None = None,
    grad_c_n: Tensor | None = None,
    restore_flush: bool | None = None,
    memory_steps: int | None = 1,
) -> list[Profile]:
    """Per-layer profiles (index 0 = the bottom layer) from the loss's gradient on the module's outputs.

    ``grad_output``: dL/d output, batch-first ``[B, T, H]`` (None: the loss does not read it);
    ``grad_h_n`` / ``grad_c_n``: dL/dh_n, dL/dc_n ``[L, B, H]`` (None: not read).

    Each :class:`~pipeline.bptt.profile.Profile`'s ``h`` (and ``c`` for LSTM) is the **long-range**
    profile (README, "The long-range profile"): the gradient of the loss terms that read the top layer in
    its window (a, T) (:func:`memory_window`: the last ``memory_steps`` steps the loss reads), so that
    before a it is pure propagation and the summaries, Pascanu's bound and the verdict measure memory.
    A loss that also reads earlier steps (a language model's loss at every step) would otherwise hold a
    direct term at every t and read O(1) whatever the Jacobians do; its whole gradient is kept as
    ``h_total`` (``c_total``). ``memory_steps=None``: the total gradient alone, summaries from its first
    step (or T). A layer whose forward overflowed reads NaN.
    """
    top = layers[-1]
    B, T = top.x.shape[0], top.x.shape[1]
    H = cells.hidden_size(top.params)
    dtype, dev = torch.float64, top.x.device
    zeros = torch.zeros(B, T, H, dtype=dtype, device=dev)
    D = zeros if grad_output is None else grad_output.detach().to(dtype)
    D_n, d_log = _normalised(D)
    overflow = next((lay.overflow_step for lay in layers if lay.overflow_step is not None), None)
    if overflow is not None:  # no Jacobians past a non-finite state: every layer reads NaN
        return [
            Profile(
                cell=lay.params["cell"],
                T=T,
                log10_norm={n: np_nan(T) for n in cells.state_names(lay.params)},
                readout_mode="all",
                overflow_step=overflow,
            )
            for lay in layers
        ]
    top_window = memory_window(d_log, grad_h_n is not None or grad_c_n is not None, memory_steps)
    total = top_window[0] > _first_nonzero(d_log)  # loss terms before the window: walk the whole loss too
    out: list[dict[str, Tensor]] = [{} for _ in layers]
    windows: list[tuple[int, int]] = [top_window] * len(layers)
    with exact_denormals(restore_flush):
        for suffix in ("", "_total") if total else ("",):
            walk_n, walk_log = D_n, d_log
            if suffix == "":  # the window's loss terms alone
                walk_log = torch.where(torch.arange(1, T + 1, device=dev) >= top_window[0], d_log, -math.inf)
            for k in range(len(layers) - 1, -1, -1):
                layer = layers[k]
                names = cells.state_names(layer.params)
                if suffix == "" and k < len(layers) - 1:
                    # a lower layer's direct terms arrive through the layer above at every step it carries
                    # gradient: pure propagation only before the first of them (T: none before)
                    windows[k] = (_first_nonzero(walk_log), T)
                fin = []
                for n, g in (("h", grad_h_n), ("c", grad_c_n)):
                    if n in names:
                        fin.append(
                            torch.zeros(B, H, dtype=dtype, device=dev) if g is None else g[k].to(dtype)
                        )
                logs, dgi_n, dgi_log = _walk_layer(layer, walk_n, walk_log, tuple(fin))
                out[k].update({n + suffix: v for n, v in logs.items()})
                if k:  # the layer below: its output h^{k-1}_t feeds this layer's input projection
                    D = torch.stack(dgi_n, dim=1) @ layer.params["W_ih"]  # [B, T, I = H_below]
                    walk_n, m_log = _normalised(D)
                    walk_log = dgi_log + m_log
    return [
        Profile(
            cell=layer.params["cell"],
            T=T,
            log10_norm={n: v.cpu().numpy() for n, v in logs.items()},
            readout_mode="all",
            window=window,
        )
        for layer, logs, window in zip(layers, out, windows, strict=True)
    ]
