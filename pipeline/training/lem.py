"""``lem``, the Long Expressive Memory cell (Rusch, Erichson, Mahoney 2022, "Long Expressive Memory for
Sequence Modeling", ICLR, eq. 3), for training: a loop over time of a few fused torch ops per step.

    dt1_n = dt sigmoid(W1 y_{n-1} + V1 u_n + b1),  dt2_n = dt sigmoid(W2 y_{n-1} + V2 u_n + b2)
    z_n = (1 - dt1_n) z_{n-1} + dt1_n tanh(Wz y_{n-1} + Vz u_n + bz)
    y_n = (1 - dt2_n) y_{n-1} + dt2_n tanh(Wy z_n + Vy u_n + by)

dt = ``model.dt`` in (0, 1] (the authors' default 1; their adding runs use 0.0242). The layers are the
authors': ``inp2hid`` = [V1; V2; Vz; Vy] (one GEMM over all steps before the loop), ``hid2hid`` = [W1; W2;
Wz] and ``transform_z`` = Wy, every weight and bias drawn from U(-1/sqrt(H), 1/sqrt(H)) as their
``reset_parameters``. The readout reads y_n. The float64 twin is :mod:`pipeline.bptt.lem`.

Unlike lru and mingru, dt_n depends on y_{n-1}: the recurrence is nonlinear, so no parallel scan applies
and the loop is sequential on every device, with autograd through it (backward is the same loop reversed).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LEM(nn.Module):
    """LEM layer with H = ``hidden`` units in each of y and z; outputs y_n for every step ``[B, T, H]``."""

    # parameter -> gradient-norm group (README, "Metrics"): the matrices acting on y_{n-1} and z_n are the
    # recurrence; inp2hid acts on the input.
    GROUP_OF = {
        "inp2hid.weight": "input",
        "hid2hid.weight": "recurrent",
        "transform_z.weight": "recurrent",
        "inp2hid.bias": "bias",
        "hid2hid.bias": "bias",
        "transform_z.bias": "bias",
    }

    def __init__(self, input_size: int, hidden: int, dt: float, generator: torch.Generator):
        super().__init__()
        self.hidden_size, self.dt = hidden, float(dt)
        self.inp2hid = nn.Linear(input_size, 4 * hidden)  # blocks (dt1, dt2, z, y): V1, V2, Vz, Vy
        self.hid2hid = nn.Linear(hidden, 3 * hidden)  # blocks (dt1, dt2, z): W1, W2, Wz
        self.transform_z = nn.Linear(hidden, hidden)  # Wy: z_n -> y_n
        std = 1.0 / math.sqrt(hidden)
        with torch.no_grad():
            for w in self.parameters():  # the authors' reset_parameters, from our seeded generator
                w.uniform_(-std, std, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt, H = self.dt, self.hidden_size
        y = x.new_zeros(x.shape[0], H)
        z = torch.zeros_like(y)
        outs = []
        # unbind, not gi[:, t]: indexing per step makes backward O(T^2) (as IndRNN)
        for gi in self.inp2hid(x).unbind(1):
            i1, i2, iz, iy = gi.chunk(4, dim=-1)
            a1, a2, az = self.hid2hid(y).chunk(3, dim=-1)
            dt1, dt2 = dt * torch.sigmoid(i1 + a1), dt * torch.sigmoid(i2 + a2)
            z = torch.lerp(z, torch.tanh(iz + az), dt1)  # (1 - dt1) z + dt1 tanh(...)
            y = torch.lerp(y, torch.tanh(self.transform_z(z) + iy), dt2)
            outs.append(y)
        return torch.stack(outs, 1)

    def live_params(self) -> dict:
        """The twin's lem entries (:mod:`pipeline.bptt.lem`), live (the contract of
        :meth:`pipeline.training.models.RNNModel.live_params`); ``dt`` is a constant, not a parameter."""
        return {
            "W_ih": self.inp2hid.weight,
            "b_ih": self.inp2hid.bias,
            "W_hh": self.hid2hid.weight,
            "b_hh": self.hid2hid.bias,
            "W_y": self.transform_z.weight,
            "b_y": self.transform_z.bias,
            "dt": self.dt,
        }
