"""The modern diagonal linear recurrences for training: ``lru`` and ``mingru``, vectorised over time.

Both are h_t = a_t * h_{t-1} + b_t elementwise (h_0 = 0), the recurrence every scan below computes:

* :class:`LRU`, the Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks
  for Long Sequences"): a_t = lambda = exp(-exp(nu_log) + i exp(theta_log)) (complex, diagonal, the same
  at every step), b_t = gamma * (B x_t) with gamma = exp(gamma_log), output y_t = Re(C h_t) + D x_t. The
  state is complex with N = ``model.hidden_size`` channels and y_t (what the readout reads) has
  ``model.hidden_size`` units. Ring init (their section 3.3 and appendix A): |lambda|^2 uniform on
  [r_min^2, r_max^2], phase uniform on [0, max_phase], gamma = sqrt(1 - |lambda|^2), B complex Gaussian with
  variance 1/(2 I) per part, C with variance 1/N per part. Their D is a diagonal (input and output widths
  are equal there) with N(0, 1) entries; here the widths differ (I inputs, H outputs), so D is a dense
  H x I matrix with N(0, 1/I) entries: the same output variance per unit of input variance.
* :class:`MinGRU` (Feng et al. 2024, "Were RNNs All We Needed?", section 3.1): a_t = 1 - z_t,
  b_t = z_t h~_t, with z_t = sigmoid(W_z x_t + b_z) and h~_t = g(W_h x_t + b_h) from x_t alone; the
  readout reads h_t (``model.hidden_size`` units). nn.Linear's default init (as their code).

How the recurrence runs over time (``scan``), chosen by measurement (README, "Benchmarks": forward +
backward, H = 64, batch 64, one thread, against a plain Python loop with autograd):

* ``"sequential"`` (the default on the CPU): :class:`SequentialScan`, a loop of one fused multiply-add per
  step without a graph, and a hand-written backward: the adjoint of a linear recurrence is the same
  recurrence run backwards, dL/dh_{t-1} += conj(a_t) dL/dh_t, dL/da_t = dL/dh_t conj(h_{t-1}),
  dL/db_t = dL/dh_t. Exact (the loop's own rounding), memory one state per step. On this 2-core CPU the
  work is bound by elementwise passes over [B, T, H], so the parallel scans (which do more of them) lose.
* ``"parallel"`` (the default on CUDA, not run on a GPU by this project): O(log T) steps. lru: the
  doubling (Hillis-Steele) scan with a constant lambda, h <- h + lambda^(2^k) h shifted by 2^k, where
  lambda^(2^k) = exp(2^k log lambda) underflows harmlessly to 0 (|lambda|^-t is never formed: stable at
  any T). mingru: the log-space scan of Heinsen 2023 ("Efficient parallelization of a ubiquitous
  sequential computation"), log h_t = a*_t + logcumsumexp(log b - a*) with a* = cumsum(log a), as in Feng
  et al.'s appendix (every h~ > 0, so logs exist), run in chunks of 256 steps so that a* stays small.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SCANS = ("sequential", "parallel")


def scan_for(device: torch.device, scan: str) -> str:
    """``scan`` as given, or for ``"auto"`` the measured choice: sequential on the CPU, parallel elsewhere."""
    if scan == "auto":
        return "sequential" if device.type == "cpu" else "parallel"
    if scan not in SCANS:
        raise ValueError(f"unknown scan {scan!r}; expected auto or one of {', '.join(SCANS)}")
    return scan


class SequentialScan(torch.autograd.Function):
    """h_t = a_t * h_{t-1} + b_t along dim 1, h_0 = 0; ``a`` is ``[N]`` (the same every step) or shaped
    like ``b`` ``[B, T, N]``; real or complex. Backward by the adjoint recurrence (module docstring)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = torch.empty_like(b)
        const = a.dim() == 1
        a_t = [a] * b.shape[1] if const else a.unbind(1)
        h = torch.zeros_like(b[:, 0])
        for a_s, b_s, o_s in zip(a_t, b.unbind(1), out.unbind(1), strict=True):
            torch.addcmul(b_s, a_s, h, out=o_s)  # one fused pass per step, written in place
            h = o_s
        ctx.save_for_backward(a, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        a, out = ctx.saved_tensors
        const = a.dim() == 1
        a_c = a.conj()
        grad = torch.empty_like(grad_out)
        gs, gos = grad.unbind(1), grad_out.unbind(1)
        T = grad_out.shape[1]
        gs[T - 1].copy_(gos[T - 1])
        a_next = [a_c] * T if const else a_c.unbind(1)
        for t in range(T - 2, -1, -1):
            torch.addcmul(gos[t], a_next[t + 1], gs[t + 1], out=gs[t])
        h_prev = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
        grad_a = grad * h_prev.conj()
        return (grad_a.sum(dim=(0, 1)) if const else grad_a), grad


def doubling_scan(log_a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The same recurrence for a constant a = exp(log_a) ``[N]`` in ceil(log2 T) vectorised steps
    (Hillis-Steele): after step k every h_t holds the sum over its last 2^(k+1) inputs. a^(2^k) is taken as
    exp(2^k log a), not by repeated squaring, which would multiply a's rounding error by 2^k (at |a| =
    0.9999, T = 5000 in float32, measured 2.4e-4 relative that way and 3e-7 this way)."""
    h, k = b, 1
    while k < b.shape[1]:
        h = torch.cat([h[:, :k], h[:, k:] + torch.exp(k * log_a) * h[:, :-k]], dim=1)
        k *= 2
    return h


def log_space_scan(log_a: torch.Tensor, log_b: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t from log a and log b (positive a, b; h_0 = 0), Heinsen 2023, eq. 2:
    log h_t = a*_t + log(h_0 + sum_{s<=t} exp(log b_s - a*_s)), a* = cumsum(log a). Run over chunks of
    ``chunk`` steps, each starting from the previous chunk's last state: a* then stays within one chunk's
    sum, and its float32 rounding with it (at T = 5000, z ~ 0.5, measured: unchunked a* ~ -3500 and h off
    by 2e-4 relative; chunked as here 1e-5; the sequential scan 1.4e-7)."""
    out, log_h0 = [], None
    for la, lb in zip(log_a.split(chunk, dim=1), log_b.split(chunk, dim=1), strict=True):
        a_star = torch.cumsum(la, dim=1)
        lse = torch.logcumsumexp(lb - a_star, dim=1)
        if log_h0 is not None:
            lse = torch.logaddexp(lse, log_h0[:, None])
        log_h = a_star + lse
        out.append(torch.exp(log_h))
        log_h0 = log_h[:, -1]
    return torch.cat(out, dim=1)


def log_g(x: torch.Tensor) -> torch.Tensor:
    """log of minGRU's g (Feng et al. 2024, appendix): log(x + 0.5) for x >= 0, -softplus(-x) below."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


def g(x: torch.Tensor) -> torch.Tensor:
    """minGRU's candidate activation: x + 0.5 for x >= 0, sigmoid(x) below (positive everywhere)."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


class LRU(nn.Module):
    """The Linear Recurrent Unit (Orvieto et al. 2023) with N = ``hidden`` complex channels; outputs y_t."""

    # parameter -> gradient-norm group (README, "Metrics"): nu, theta set lambda (the recurrence); gamma
    # and D act on the input; C maps the state to the output the readout reads.
    GROUP_OF = {
        "nu_log": "recurrent",
        "theta_log": "recurrent",
        "gamma_log": "input",
        "B_re": "input",
        "B_im": "input",
        "D": "input",
        "C_re": "readout",
        "C_im": "readout",
    }

    def __init__(
        self,
        input_size: int,
        hidden: int,
        r_min: float,
        r_max: float,
        max_phase: float,
        generator: torch.Generator,
    ):
        super().__init__()
        self.hidden_size, self.scan = hidden, "auto"
        f64 = torch.float64

        def draw(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter((torch.randn(*shape, generator=generator, dtype=f64) * std).float())

        # Ring init in float64, rounded once to float32; u in (0, 1] so no log(0).
        u1 = 1.0 - torch.rand(hidden, generator=generator, dtype=f64)
        u2 = 1.0 - torch.rand(hidden, generator=generator, dtype=f64)
        nu_log = torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2))
        modulus = torch.exp(-torch.exp(nu_log))
        self.nu_log = nn.Parameter(nu_log.float())
        self.theta_log = nn.Parameter(torch.log(max_phase * u2).float())
        self.gamma_log = nn.Parameter(torch.log(torch.sqrt(1.0 - modulus**2)).float())
        self.B_re = draw(hidden, input_size, std=1.0 / math.sqrt(2 * input_size))
        self.B_im = draw(hidden, input_size, std=1.0 / math.sqrt(2 * input_size))
        self.C_re = draw(hidden, hidden, std=1.0 / math.sqrt(hidden))
        self.C_im = draw(hidden, hidden, std=1.0 / math.sqrt(hidden))
        self.D = draw(hidden, input_size, std=1.0 / math.sqrt(input_size))

    def lam(self) -> torch.Tensor:
        """lambda = exp(-exp(nu_log)) exp(i exp(theta_log)), complex [N] (their eq. 6)."""
        mod, phase = torch.exp(-torch.exp(self.nu_log)), torch.exp(self.theta_log)
        return torch.complex(mod * torch.cos(phase), mod * torch.sin(phase))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = torch.exp(self.gamma_log)
        u = torch.complex(F.linear(x, self.B_re), F.linear(x, self.B_im)) * gamma  # [B, T, N]
        if scan_for(x.device, self.scan) == "sequential":
            h = SequentialScan.apply(self.lam(), u)
        else:
            h = doubling_scan(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)), u)
        return F.linear(h.real, self.C_re) - F.linear(h.imag, self.C_im) + F.linear(x, self.D)

    def live_params(self) -> dict[str, torch.Tensor]:
        """The twin's lru entries (:mod:`pipeline.bptt.modern`), live (the contract of
        :meth:`pipeline.training.models.RNNModel.live_params`)."""
        return {name: getattr(self, name) for name in self.GROUP_OF}


class MinGRU(nn.Module):
    """minGRU (Feng et al. 2024): gate z and candidate h~ from x_t alone; outputs h_t."""

    # z alone sets dh_t/dh_{t-1} = diag(1 - z_t), so its weight is the recurrent group (minGRU has no W_hh).
    GROUP_OF = {
        "gate.weight": "recurrent",
        "candidate.weight": "input",
        "gate.bias": "bias",
        "candidate.bias": "bias",
    }

    def __init__(self, input_size: int, hidden: int):
        super().__init__()
        self.hidden_size, self.scan = hidden, "auto"
        self.gate = nn.Linear(input_size, hidden)  # z_t = sigmoid(W_z x_t + b_z)
        self.candidate = nn.Linear(input_size, hidden)  # h~_t = g(W_h x_t + b_h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, c = self.gate(x), self.candidate(x)
        if scan_for(x.device, self.scan) == "sequential":
            # 1 - z as sigmoid(-k): exact where z rounds to 1
            return SequentialScan.apply(torch.sigmoid(-k), torch.sigmoid(k) * g(c))
        # log(1 - z) = -softplus(k), log z = -softplus(-k): Feng et al.'s appendix, no log of a difference
        return log_space_scan(-F.softplus(k), -F.softplus(-k) + log_g(c))

    def live_params(self) -> dict[str, torch.Tensor]:
        """The twin's mingru entries, live: W_ih = [W_z; W_h], b_ih = [b_z; b_h] (concatenated, so a loss
        on the twin reaches both layers' parameters)."""
        return {
            "W_ih": torch.cat([self.gate.weight, self.candidate.weight]),
            "b_ih": torch.cat([self.gate.bias, self.candidate.bias]),
        }
