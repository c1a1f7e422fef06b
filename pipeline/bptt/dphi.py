"""The activations' derivatives from their pre-activations, exact where a unit saturates.

Taken from the output, ``1 - tanh(a)^2`` cancels: in float64 it keeps about 7 of 16 digits at |a| = 10 and
rounds to exactly 0 once |a| >= 19.1 (tanh(a) rounds to 1), where the true value is 1e-16 and below. A
profile walked back through such a unit reads an exactly zero gradient (-inf decades) and the regime
flips: a chaotic tanh RNN (g = 3) after an input pulse that saturates every unit read "vanishing" where
the exact profile gains 16 decades. ``sech^2(a) = 4 e^{-2|a|} / (1 + e^{-2|a|})^2`` has no cancellation
(full precision down to float64's smallest normal number, |a| ~ 354, and nonzero to |a| ~ 372 in the
subnormals the diagnostics keep); the independent recursion (:mod:`pipeline.bptt.reference`) takes it the
same way. Likewise ``sigmoid(a) (1 - sigmoid(a))`` rounds to 0 once a >= 37 and
``sigmoid(a) sigmoid(-a)`` does not. Values the forward itself computes (a GRU's ``1 - z``, a LEM's
retention ``1 - dt sigmoid(a)``) are taken as the forward rounds them, except where the forward keeps
the exact form (mingru's retention, ``sigmoid(-a)``: :mod:`pipeline.bptt.modern`).

Plain torch operations, differentiable (the remedies differentiate through the twin's steps).
"""

from __future__ import annotations

import torch
from torch import Tensor


def tanh_prime(a: Tensor) -> Tensor:
    """d tanh(a) / da = sech^2(a), from the pre-activation ``a``, without cancellation."""
    e = torch.exp(-2.0 * a.abs())
    return 4.0 * e / (1.0 + e).square()


def sigmoid_prime(a: Tensor) -> Tensor:
    """d sigmoid(a) / da = sigmoid(a) sigmoid(-a), from the pre-activation ``a``, without cancellation."""
    return torch.sigmoid(a) * torch.sigmoid(-a)
