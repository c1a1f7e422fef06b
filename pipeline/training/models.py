"""Recurrent models: fused torch kernels for training, a params dict for the unrolled diagnostic twin.

Cells: ``tanh`` and ``relu`` (nn.RNN; relu + identity init is the IRNN of Le, Jaitly, Hinton 2015),
``lstm`` (nn.LSTM), ``gru`` (nn.GRU), and two remedies beyond ReLU, LSTM and clipping:

* ``orthogonal``: W_hh = g * Q with Q kept exactly orthogonal through training by torch's orthogonal
  parametrization with the matrix-exponential map, the expRNN of Lezcano-Casado & Martinez-Rubio 2019
  ("Cheap orthogonal constraints in neural networks"). Every singular value of W_hh is g, always.
* ``indrnn``: h_t = relu(W_ih x_t + b + u * h_{t-1}), a diagonal recurrence (Li et al. 2018, "IndRNN"),
  so dL/dh_1 = u^(T-1) dL/dh_T exactly along active units.

the modern diagonal linear recurrences ``lru`` (Orvieto et al. 2023) and ``mingru`` (Feng et al.
2024), in :mod:`pipeline.training.modern`, ``lem`` (Rusch, Erichson, Mahoney 2022), in
:mod:`pipeline.training.lem`, and ``cornn`` (Rusch & Mishra 2021), in :mod:`pipeline.training.cornn`.

Recurrent inits (``model.init``, scale g = ``model.init_scale``), applied to each gate's H x H block:
``default`` (PyTorch's U(-1/sqrt(H), 1/sqrt(H)), i.e. std * sqrt(H) = 1/sqrt(3)), ``gaussian``
N(0, g^2/H) (the mean-field ensemble; edge of chaos at g = 1), ``orthogonal`` g * Q, ``identity`` g * I.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrizations

from pipeline.config import ModelConfig
from pipeline.names import GROUPS
from pipeline.training.cornn import CoRNN
from pipeline.training.lem import LEM
from pipeline.training.modern import LRU, MinGRU


def recurrent_init_(w: torch.Tensor, init: str, g: float, hidden: int, generator: torch.Generator) -> None:
    """Initialise ``w`` ([G*H, H]) in place, block by block; ``default`` leaves it untouched."""
    if init == "default":
        return
    with torch.no_grad():
        for block in w.split(hidden, dim=0):
            if init == "gaussian":
                block.normal_(0.0, g / math.sqrt(hidden), generator=generator)
            elif init == "orthogonal":
                block.copy_(g * random_orthogonal(hidden, generator))
            elif init == "identity":
                block.copy_(g * torch.eye(hidden))
            else:
                raise ValueError(f"unknown init {init!r}")


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-distributed orthogonal matrix (QR of a Gaussian with the sign fix of Mezzadri 2007)."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.float()


class OrthogonalRNN(nn.Module):
    """tanh RNN with W_hh = g * Q, Q orthogonal by parametrization (expRNN); fused tanh kernel."""

    def __init__(self, input_size: int, hidden: int, g: float, init: str, generator: torch.Generator):
        super().__init__()
        self.hidden_size, self.g = hidden, g
        ref = nn.RNN(input_size, hidden, batch_first=True)  # PyTorch's default init for W_ih and biases
        # torch registers a fused RNN's weight_*_l0 by name: its stubs see them only as Tensor | Module
        self.weight_ih = nn.Parameter(cast(torch.Tensor, ref.weight_ih_l0).detach().clone())
        self.bias_ih = nn.Parameter(cast(torch.Tensor, ref.bias_ih_l0).detach().clone())
        self.bias_hh = nn.Parameter(cast(torch.Tensor, ref.bias_hh_l0).detach().clone())
        self.recurrent = nn.Linear(hidden, hidden, bias=False)
        q0 = torch.eye(hidden) if init == "identity" else random_orthogonal(hidden, generator)
        parametrizations.orthogonal(self.recurrent, orthogonal_map="matrix_exp")
        with torch.no_grad():
            self.recurrent.weight = q0

    @property
    def weight_hh(self) -> torch.Tensor:
        return self.g * self.recurrent.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = x.new_zeros(1, x.shape[0], self.hidden_size)
        weights = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]
        out, _ = torch._VF.rnn_tanh(x, h0, weights, True, 1, 0.0, self.training, False, True)
        return out


class IndRNN(nn.Module):
    """IndRNN layer (Li et al. 2018): element-wise recurrence, relu activation."""

    def __init__(self, input_size: int, hidden: int, g: float, init: str, generator: torch.Generator):
        super().__init__()
        self.hidden_size = hidden
        ref = nn.RNN(input_size, hidden, batch_first=True)
        self.weight_ih = nn.Parameter(cast(torch.Tensor, ref.weight_ih_l0).detach().clone())
        self.bias_ih = nn.Parameter(torch.zeros(hidden))
        u = torch.empty(hidden)
        if init == "default":
            u.uniform_(0.0, 1.0, generator=generator)  # Li 2018: u ~ U(0, 1) for short memories
        elif init == "gaussian":
            u.normal_(0.0, g, generator=generator)
        elif init == "orthogonal":  # a diagonal orthogonal matrix is diag(+-1)
            u = g * (torch.randint(0, 2, (hidden,), generator=generator) * 2 - 1).float()
        else:
            u.fill_(g)
        self.u = nn.Parameter(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.nn.functional.linear(x, self.weight_ih, self.bias_ih)  # [B, T, H], one GEMM
        h = pre.new_zeros(pre.shape[0], self.hidden_size)
        outs = []
        for p_t in pre.unbind(1):  # unbind, not pre[:, t]: indexing per step makes backward O(T^2)
            h = torch.relu(p_t + self.u * h)
            outs.append(h)
        return torch.stack(outs, 1)


def ulp_nudge_(module: nn.Module, seed: int) -> None:
    """Move every parameter entry one float32 ulp up or down (random signs from ``seed``), in place.

    The regression suite's stand-in for another machine (README, "Regression suites"): a different CPU,
    BLAS kernel or thread count changes results by rounding, i.e. by about one ulp at the first matmul.
    In the chaotic phase such a difference grows at the largest Lyapunov exponent, so numbers measured
    under a few nudges show how far another machine may move them. The draw uses its own generator:
    the unperturbed weights and data are exactly those of ``init_ulp_seed = 0``. Exact zeros stay zero
    (structural zeros such as a zero-initialised bias or the unused part of the orthogonal cell's
    parametrisation; a step to the smallest denormal is no rounding difference, and flushing undoes it).
    """
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for p in module.parameters():
            up = torch.rand(p.shape, generator=gen) < 0.5
            target = torch.where(up, torch.full_like(p, math.inf), torch.full_like(p, -math.inf))
            p.copy_(torch.where(p == 0, p, torch.nextafter(p, target)))


def modern_core(cfg: ModelConfig, input_size: int, gen: torch.Generator) -> nn.Module:
    """The modern cells' layers: lru, mingru (:mod:`pipeline.training.modern`), lem, cornn."""
    H = cfg.hidden_size
    if cfg.cell == "lru":
        return LRU(input_size, H, cfg.r_min, cfg.r_max, cfg.max_phase, gen)
    if cfg.cell == "mingru":
        return MinGRU(input_size, H)
    if cfg.cell == "lem":
        return LEM(input_size, H, cfg.dt, gen)
    if cfg.cell == "cornn":
        return CoRNN(input_size, H, cfg.dt, cfg.gamma, cfg.epsilon, gen)
    raise ValueError(f"unknown cell {cfg.cell!r}")


class RNNModel(nn.Module):
    """A recurrent core plus a linear readout; ``readout`` is ``"last"`` or ``"all"`` (per task)."""

    def __init__(self, cfg: ModelConfig, input_size: int, output_size: int, readout: str, seed: int = 0):
        super().__init__()
        self.cell, self.readout_mode, self.hidden_size = cfg.cell, readout, cfg.hidden_size
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # nn.RNN/LSTM default init draws from the global RNG; seed it here only
        H, g = cfg.hidden_size, cfg.init_scale
        if cfg.cell in ("tanh", "relu"):
            self.rnn: nn.Module = nn.RNN(input_size, H, nonlinearity=cfg.cell, batch_first=True)
        elif cfg.cell == "lstm":
            self.rnn = nn.LSTM(input_size, H, batch_first=True)
        elif cfg.cell == "gru":
            self.rnn = nn.GRU(input_size, H, batch_first=True)
        elif cfg.cell == "orthogonal":
            self.rnn = OrthogonalRNN(input_size, H, g, cfg.init, gen)
        elif cfg.cell == "indrnn":
            self.rnn = IndRNN(input_size, H, g, cfg.init, gen)
        else:  # the modern cells; model.init is 'default' for them (config_checks.validate)
            self.rnn = modern_core(cfg, input_size, gen)
        if isinstance(self.rnn, (nn.RNN, nn.LSTM, nn.GRU)):  # weight_*_l0: see OrthogonalRNN
            recurrent_init_(cast(torch.Tensor, self.rnn.weight_hh_l0), cfg.init, g, H, gen)
        if cfg.cell == "lstm":
            with torch.no_grad():  # forget gate is block 1 of (i, f, g, o); the total bias is b_ih + b_hh
                cast(torch.Tensor, self.rnn.bias_ih_l0)[H : 2 * H].fill_(cfg.forget_bias)
                cast(torch.Tensor, self.rnn.bias_hh_l0)[H : 2 * H].zero_()
        self.readout = nn.Linear(H, output_size)
        if cfg.init_ulp_seed:
            ulp_nudge_(self, cfg.init_ulp_seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x)
        hs = out[0] if isinstance(out, tuple) else out  # [B, T, H]
        if self.readout_mode == "last":
            return self.readout(hs[:, -1])
        return self.readout(hs)

    def live_params(self) -> dict:
        """The twin's params dict (the contract of :mod:`pipeline.bptt.twin`) of LIVE tensors.

        Contract, for every cell (a new cell adds its branch here and nowhere else): every tensor the
        twin's step functions read for this cell, under the twin's key names, as the module's own
        parameters or tensors computed from them, neither detached nor copied, in the parameters' dtype
        and device. A loss on the twin's output therefore backpropagates into this module's parameters
        (the remedies of :mod:`pipeline.bptt.remedies`, Pascanu's Omega and gradient flossing, train
        through it). Derived weights are computed through their parametrisation: ``orthogonal`` hands
        ``g * Q`` with Q from torch's orthogonal parametrisation (matrix exponential), so the gradient
        reaches the parametrisation's base. :meth:`params` is the detached copy of this dict: one
        mapping per cell.
        """
        r = self.rnn
        p: dict = {"cell": self.cell, "W_out": self.readout.weight, "b_out": self.readout.bias}
        if isinstance(r, (nn.RNN, nn.LSTM, nn.GRU)):  # weight_*_l0: see OrthogonalRNN
            w_ih, w_hh = cast(torch.Tensor, r.weight_ih_l0), cast(torch.Tensor, r.weight_hh_l0)
            b_ih, b_hh = cast(torch.Tensor, r.bias_ih_l0), cast(torch.Tensor, r.bias_hh_l0)
            p.update(W_ih=w_ih, W_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
        elif isinstance(r, OrthogonalRNN):
            p.update(W_ih=r.weight_ih, W_hh=r.weight_hh, b_ih=r.bias_ih, b_hh=r.bias_hh)
        elif isinstance(r, (LRU, MinGRU, LEM, CoRNN)):  # own entries (bptt.modern, .lem, .cornn)
            p.update(r.live_params())
        else:
            assert isinstance(r, IndRNN), type(r)  # the cells are validated in __init__
            p.update(W_ih=r.weight_ih, b_ih=r.bias_ih, u=r.u)
        return p

    def params(self, dtype: torch.dtype = torch.float64) -> dict:
        """Detached copy of :meth:`live_params` in ``dtype``: the weights for the float64 diagnostic twin."""
        with torch.no_grad():  # orthogonal: g * Q without building a graph
            live = self.live_params()
        return {k: v.detach().to(dtype).clone() if torch.is_tensor(v) else v for k, v in live.items()}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by role, for per-group gradient norms: input, recurrent, bias, readout (the modern
        cells say theirs in ``GROUP_OF``: README, "Models")."""
        inputs, recurrent, bias, readout = GROUPS
        groups: dict[str, list[nn.Parameter]] = {g: [] for g in GROUPS}
        own = getattr(self.rnn, "GROUP_OF", {})
        for name, p in self.named_parameters():
            if name.removeprefix("rnn.") in own:
                groups[own[name.removeprefix("rnn.")]].append(p)
            elif name.startswith("readout."):
                groups[readout].append(p)
            elif "bias" in name:
                groups[bias].append(p)
            elif "weight_ih" in name:
                groups[inputs].append(p)
            else:  # weight_hh_l0, the orthogonal base, IndRNN's u
                groups[recurrent].append(p)
        return groups
