"""The stacked forward of a batched sweep worker (README, "Batched trials"): K members' models, one pass.

Each member keeps its own :class:`~pipeline.training.models.RNNModel` (its own parameters, built from its
own seed exactly as the trial would be alone). The stack never copies weights: every step it *builds* the
fused kernel's weights from the members' live parameters, so autograd routes each member's gradient back
into that member's own tensors, and the summed loss ``sum_k L_k`` gives each member exactly the gradient
of its own loss (d L_j / d theta_k = 0 for j != k: the off-diagonal blocks are constants, not parameters).

Kernels, per cell (chosen by measurement on the 2-core CPU, README "Batched trials"):

* ``blockdiag`` (tanh, relu, gru): the members' hidden states side by side in one fused ``nn.RNN`` /
  ``nn.GRU`` kernel of hidden size n*H: input weights stacked, the recurrent matrix block-diagonal per
  gate (``torch.block_diag``), biases concatenated. One kernel launch per time step instead of n; the
  off-diagonal zeros cost O(n^2 H^2) flops, so a fused block holds at most :data:`FUSED_MAX_UNITS` units
  (per device type), and a larger group is split into several blocks.
* ``loop`` (lstm and every other cell): each member's own fused kernel, one after another, in the same
  step. LSTM's four gates make the block-diagonal matrix 4x larger: its fused block (supported below,
  tested equal to each member alone) measured slower than the loop on the CPU (8.3 vs 6.5 ms a step at
  K = 4, 25.8 vs 12.9 at K = 8: ``python -m benchmarks.stack_bench --kernels cpu lstm 4,8``) and is not
  yet measured on a GPU (``benchmarks/gpu_check.sh`` does), so LSTM loops on every device.

Members may read different batches (a rolling stack's members joined at different steps,
:mod:`pipeline.training.stacked`): a fused block then takes the members' inputs side by side and a
block-diagonal input matrix as well, so each member's hidden state still sees only its own input.

What is shared either way is everything around the kernel: one backward, one Python step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from pipeline.training.models import RNNModel

# cell -> kernel (measured: README, "Batched trials"); cells not listed run as "loop".
KERNELS = {"tanh": "blockdiag", "relu": "blockdiag", "gru": "blockdiag"}
GATES = {"tanh": 1, "relu": 1, "gru": 3, "lstm": 4}  # rows per gate block, gate-major as nn.RNN/GRU/LSTM
# Hidden units side by side in one fused block, per device type. CPU, measured (benchmarks/stack_bench.py,
# H = 32, T = 50, batch 32): the block-diagonal step beats K separate ones at 4 members (128 units,
# tanh 1.5x, gru 1.5x) and loses at 16 (512 units), where the O(n^2 H^2) zeros dominate. CUDA, measured
# on an H200 (python -m benchmarks --gpu --only stack, 2026-12-04, one run each): at K = 64 members
# (2048 units) one block under a cap of 4096 was fastest (tanh 51.5 vs 54.9 and 60.1 ms a step for caps
# 1024 and 512, gru 76.8 vs 91.6 and 99.8), by about the spread of identical blocks at K = 16 (up to 22%):
# fewer launches, at most no slower. Larger H (more zeros per block) was not measured.
FUSED_MAX_UNITS = {"cpu": 128, "cuda": 4096}


def kernel_of(cell: str) -> str:
    return KERNELS.get(cell, "loop")


def _block_diag(w: torch.Tensor) -> torch.Tensor:
    """``w`` [K, G, H, cols] (member, gate, rows, columns) as G block-diagonal matrices, gate-major:
    [G * K * H, K * cols], block (k, k) of gate g is ``w[k, g]``. One ``diag_embed``, whatever K (its
    backward one ``diagonal``): ``torch.block_diag`` of K slices costs K views forward and K gradient
    scatters backward, which on a GPU are launches a step per member."""
    K, G, H, cols = w.shape
    # d[g, i, j, k, l] = w[k, g, i, j] where k == l, else 0: shape [G, H, cols, K, K]
    d = torch.diag_embed(w.permute(1, 2, 3, 0))
    return d.permute(0, 3, 1, 4, 2).reshape(G * K * H, K * cols)


def _fused_weights(models: Sequence[nn.Module], gates: int, own_inputs: bool) -> list[torch.Tensor]:
    """[W_ih, W_hh, b_ih, b_hh] of one fused kernel over ``models`` (each an nn.RNN / GRU / LSTM core of
    hidden size H): per gate, recurrent blocks on the diagonal; input rows stacked (one shared input) or,
    with ``own_inputs`` (each member its input, side by side), input blocks on the diagonal too. Each
    weight is one ``torch.stack`` of the members' live parameters, so the gradient reaches each member."""
    K, H = len(models), cast(int, models[0].hidden_size)

    def stacked(name: str) -> torch.Tensor:
        return torch.stack([cast(torch.Tensor, getattr(m, name)) for m in models])

    w_ih, w_hh = stacked("weight_ih_l0"), stacked("weight_hh_l0")
    w_ih = w_ih.view(K, gates, H, -1)
    # own inputs: input blocks on the diagonal too; one input: gate-major rows (g, k, i), its columns
    w_ih = _block_diag(w_ih) if own_inputs else w_ih.permute(1, 0, 2, 3).reshape(gates * K * H, -1)
    w_hh = _block_diag(w_hh.view(K, gates, H, H))
    b_ih, b_hh = (
        stacked(n).view(K, gates, H).permute(1, 0, 2).reshape(-1) for n in ("bias_ih_l0", "bias_hh_l0")
    )
    return [w_ih, w_hh, b_ih, b_hh]


def fused_hidden(
    cell: str, cores: Sequence[nn.Module], x: torch.Tensor | Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The hidden states [B, T, H] of each core in ``cores`` (same cell and H), from one fused kernel;
    ``x``: the input every core reads, or one input per core (same shape)."""
    return list(_fused_out(cell, cores, x).split(cast(int, cores[0].hidden_size), dim=-1))


def _fused_out(
    cell: str, cores: Sequence[nn.Module], x: torch.Tensor | Sequence[torch.Tensor]
) -> torch.Tensor:
    """The fused kernel's output [B, T, n * H]: the cores' hidden states side by side."""
    H = cast(int, cores[0].hidden_size)
    n = len(cores)
    own = not isinstance(x, torch.Tensor) and any(xi is not x[0] for xi in x)
    if not isinstance(x, torch.Tensor):
        x = torch.cat(list(x), dim=-1) if own else x[0]
    weights = _fused_weights(cores, GATES[cell], own)
    h0 = x.new_zeros(1, x.shape[0], n * H)
    args = (True, 1, 0.0, True, False, True)  # has_biases, layers, dropout, train, bidirectional, batch_first
    if cell == "gru":
        out, _ = torch._VF.gru(x, h0, weights, *args)
    elif cell == "lstm":  # measured, not chosen (KERNELS): benchmarks/stack_bench.py
        out, _, _ = torch._VF.lstm(x, (h0, torch.zeros_like(h0)), weights, *args)
    elif cell == "relu":
        out, _ = torch._VF.rnn_relu(x, h0, weights, *args)
    else:
        out, _ = torch._VF.rnn_tanh(x, h0, weights, *args)
    return out


def _readout(model: RNNModel, hs: torch.Tensor) -> torch.Tensor:
    return model.readout(hs[:, -1]) if model.readout_mode == "last" else model.readout(hs)


def _readouts(models: Sequence[RNNModel], out: torch.Tensor) -> list[torch.Tensor]:
    """Each model's readout of its hidden states (``out``: [B, T, K * H], the fused kernel's output, the
    models' states side by side): one batched matmul of the stacked readout weights (``torch.baddbmm``)
    when every readout is an ``nn.Linear`` of the same shape, else one readout per model."""
    K, (B, T, KH) = len(models), out.shape
    H = KH // K
    w = [m.readout.weight for m in models]
    if any(type(m.readout) is not nn.Linear for m in models) or len({x.shape for x in w}) > 1:
        return [_readout(m, h) for m, h in zip(models, out.split(H, dim=-1), strict=True)]
    states = out.view(B, T, K, H)
    if models[0].readout_mode == "last":
        h = states[:, -1].transpose(0, 1)  # [K, B, H]
    else:
        h = states.permute(2, 0, 1, 3).reshape(K, B * T, H)
    weight = torch.stack(w).transpose(1, 2)  # [K, H, O]
    bias = torch.stack([m.readout.bias for m in models]).unsqueeze(1)  # [K, 1, O]
    out = torch.baddbmm(bias, h, weight)  # [K, B (* T), O]
    if models[0].readout_mode != "last":
        out = out.view(K, B, T, -1)
    return list(out.unbind(0))


def stacked_forward(
    models: Sequence[RNNModel], x: torch.Tensor | Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Each model's output on its input (``x``: one for all, or one per model), exactly
    ``[m(x_m) for m in models]`` up to float rounding, with the models of a block-diagonal cell and equal
    hidden size fused (:func:`plan`)."""
    xs = [x] * len(models) if isinstance(x, torch.Tensor) else list(x)
    outs: list[torch.Tensor | None] = [None] * len(models)
    for block in plan(models):
        if len(block) == 1:
            i = block[0]
            outs[i] = models[i](xs[i])
            continue
        cell = models[block[0]].cell
        members = [models[i] for i in block]
        out = _fused_out(cell, [m.rnn for m in members], [xs[i] for i in block])
        for i, o in zip(block, _readouts(members, out), strict=True):
            outs[i] = o
    return [cast(torch.Tensor, o) for o in outs]


def plan(models: Sequence[RNNModel]) -> list[list[int]]:
    """The fused blocks: indices of models sharing a block-diagonal cell and hidden size, in chunks of at
    most :data:`FUSED_MAX_UNITS` units (of the models' device); every other model alone (its own kernel)."""
    blocks: dict[tuple[str, int], list[int]] = {}
    alone: list[list[int]] = []
    for i, m in enumerate(models):
        if kernel_of(m.cell) == "blockdiag" and isinstance(m.rnn, (nn.RNN, nn.GRU, nn.LSTM)):
            blocks.setdefault((m.cell, m.hidden_size), []).append(i)
        else:
            alone.append([i])
    out = []
    units = FUSED_MAX_UNITS.get(next(models[0].parameters()).device.type, 128) if models else 128
    for (_, H), idx in blocks.items():
        per = max(1, units // H)
        out += [idx[j : j + per] for j in range(0, len(idx), per)]
    return out + alone
