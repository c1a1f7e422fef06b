"""``cornn``, the coupled oscillatory RNN (Rusch & Mishra 2021, "Coupled Oscillatory Recurrent Neural
Network (coRNN)", ICLR, eq. 3), for training: a loop over time of a few fused torch ops per step.

    z_n = z_{n-1} + dt (tanh(W y_{n-1} + W_z z_{n-1} + V u_n + b) - gamma y_{n-1} - epsilon z_{n-1})
    y_n = y_{n-1} + dt z_n

dt = ``model.dt``, gamma = ``model.gamma``, epsilon = ``model.epsilon``. The authors' cell is one
nn.Linear(I + 2H, H) over [u, z, y]; here it is two layers (``inp``: V and b; ``rec``: [W_z | W] without a
bias), the same map with the same init, U(-1/sqrt(I + 2H), 1/sqrt(I + 2H)) for every weight and bias, so
the input and the recurrence are separate gradient-norm groups. The readout reads y_n. The float64 twin
is :mod:`pipeline.bptt.cornn`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class CoRNN(nn.Module):
    """coRNN layer with H = ``hidden`` units in each of y and z; outputs y_n for every step ``[B, T, H]``."""

    GROUP_OF = {"inp.weight": "input", "inp.bias": "bias", "rec.weight": "recurrent"}

    def __init__(
        self,
        input_size: int,
        hidden: int,
        dt: float,
        gamma: float,
        epsilon: float,
        generator: torch.Generator,
    ):
        super().__init__()
        self.hidden_size, self.dt, self.gamma, self.epsilon = hidden, float(dt), float(gamma), float(epsilon)
        self.inp = nn.Linear(input_size, hidden)  # V u + b
        self.rec = nn.Linear(2 * hidden, hidden, bias=False)  # [W_z | W] [z; y]
        bound = 1.0 / math.sqrt(input_size + 2 * hidden)  # nn.Linear's init of the authors' one layer
        with torch.no_grad():
            for w in self.parameters():
                w.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt, gamma, eps = self.dt, self.gamma, self.epsilon
        y = x.new_zeros(x.shape[0], self.hidden_size)
        z = torch.zeros_like(y)
        outs = []
        for gi in self.inp(x).unbind(1):  # unbind, not gi[:, t] (see IndRNN)
            z = z + dt * (torch.tanh(gi + self.rec(torch.cat([z, y], dim=-1))) - gamma * y - eps * z)
            y = y + dt * z
            outs.append(y)
        return torch.stack(outs, 1)

    def live_params(self) -> dict:
        """The twin's cornn entries (:mod:`pipeline.bptt.cornn`), live; dt, gamma, epsilon are constants."""
        return {
            "W_ih": self.inp.weight,
            "b_ih": self.inp.bias,
            "W_hh": self.rec.weight,
            "dt": self.dt,
            "gamma": self.gamma,
            "epsilon": self.epsilon,
        }
