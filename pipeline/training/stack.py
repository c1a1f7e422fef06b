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
  step. LSTM's four gates make the block-diagonal matrix 4x larger, and measured slower than the loop.

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
GATES = {"tanh": 1, "relu": 1, "gru": 3}
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


def _fused_weights(models: Sequence[nn.Module], gates: int, own_inputs: bool) -> list[torch.Tensor]:
    """[W_ih, W_hh, b_ih, b_hh] of one fused kernel over ``models`` (each an nn.RNN / nn.GRU core of
    hidden size H): per gate, recurrent blocks on the diagonal; input rows stacked (one shared input) or,
    with ``own_inputs`` (each member its input, side by side), input blocks on the diagonal too."""
    H = cast(int, models[0].hidden_size)
    w_ih, w_hh, b_ih, b_hh = [], [], [], []
    join_ih = torch.block_diag if own_inputs else (lambda *ws: torch.cat(ws))
    for g in range(gates):
        rows = slice(g * H, (g + 1) * H)
        w_ih.append(join_ih(*[cast(torch.Tensor, m.weight_ih_l0)[rows] for m in models]))
        w_hh.append(torch.block_diag(*[cast(torch.Tensor, m.weight_hh_l0)[rows] for m in models]))
        b_ih.append(torch.cat([cast(torch.Tensor, m.bias_ih_l0)[rows] for m in models]))
        b_hh.append(torch.cat([cast(torch.Tensor, m.bias_hh_l0)[rows] for m in models]))
    return [torch.cat(w_ih), torch.cat(w_hh), torch.cat(b_ih), torch.cat(b_hh)]


def fused_hidden(
    cell: str, cores: Sequence[nn.Module], x: torch.Tensor | Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The hidden states [B, T, H] of each core in ``cores`` (same cell and H), from one fused kernel;
    ``x``: the input every core reads, or one input per core (same shape)."""
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
    elif cell == "relu":
        out, _ = torch._VF.rnn_relu(x, h0, weights, *args)
    else:
        out, _ = torch._VF.rnn_tanh(x, h0, weights, *args)
    return list(out.split(H, dim=-1))


def _readout(model: RNNModel, hs: torch.Tensor) -> torch.Tensor:
    return model.readout(hs[:, -1]) if model.readout_mode == "last" else model.readout(hs)


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
        hs = fused_hidden(cell, [models[i].rnn for i in block], [xs[i] for i in block])
        for i, h in zip(block, hs, strict=True):
            outs[i] = _readout(models[i], h)
    return [cast(torch.Tensor, o) for o in outs]


def plan(models: Sequence[RNNModel]) -> list[list[int]]:
    """The fused blocks: indices of models sharing a block-diagonal cell and hidden size, in chunks of at
    most :data:`FUSED_MAX_UNITS` units (of the models' device); every other model alone (its own kernel)."""
    blocks: dict[tuple[str, int], list[int]] = {}
    alone: list[list[int]] = []
    for i, m in enumerate(models):
        if kernel_of(m.cell) == "blockdiag" and isinstance(m.rnn, (nn.RNN, nn.GRU)):
            blocks.setdefault((m.cell, m.hidden_size), []).append(i)
        else:
            alone.append([i])
    out = []
    units = FUSED_MAX_UNITS.get(next(models[0].parameters()).device.type, 128) if models else 128
    for (_, H), idx in blocks.items():
        per = max(1, units // H)
        out += [idx[j : j + per] for j in range(0, len(idx), per)]
    return out + alone
