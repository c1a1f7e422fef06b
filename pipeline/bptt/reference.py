"""An independent recursion for the BPTT profile of vanilla cells: the regression suite's cross-check.

:func:`pipeline.bptt.profile` walks back with hand-written vector-Jacobian products
(:func:`pipeline.bptt.twin.step_vjp`). A bug there (a dropped diag(phi'), W where W^T belongs) leaves the
profile's statistics plausible: a Gaussian W and its transpose have the same spectrum, so decay rates,
Pascanu's bound and mean-field laws all still pass. This module recomputes the same numbers another way,
so a law can compare the two (``bptt/reference_max_err``, README "Regression suites"):

- the backward recursion dL/dh_{t-1} = W^T (phi'(a_t) * dL/dh_t) (Pascanu, Mikolov, Bengio 2013, eq. 3-5)
  runs in numpy, with phi' taken from the pre-activation a_t (tanh' = sech^2(a) = 4 e^{-2|a|} /
  (1 + e^{-2|a|})^2, which stays exact in deep saturation, e.g. g = 50, where 1 - tanh(a)^2 rounds to 0),
  not from the state h_t as the product does;
- the vector is rescaled to max-abs 1 at every step and the log of the factor accumulated, so ratios far
  outside float64's range still compare (1e-380 reads -380);
- only the forward pass is shared in kind: it is recomputed here in float64 torch with the same
  operations as :func:`pipeline.bptt.twin.step_projected`, so that in the chaotic phase (where a rounding
  difference grows at the Lyapunov exponent) both walk back along the very same trajectory. The forward
  itself is checked against ``nn.RNN`` in the tests.

Scope: a loss on the last step only (the adding and temporal-order tasks), cells tanh, orthogonal, relu
and indrnn. Gated cells return ``None``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # annotations only: no code is shared with the profile it checks
    from pipeline.bptt.profile import LossFn
    from pipeline.bptt.twin import Params

SUPPORTED = ("tanh", "orthogonal", "relu", "indrnn")


def _dphi(cell: str, a: np.ndarray) -> np.ndarray:
    if cell in ("relu", "indrnn"):
        return (a > 0).astype(np.float64)
    e = np.exp(-2.0 * np.abs(a))
    return np.asarray(4.0 * e / (1.0 + e) ** 2)


def profile_log10(params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> np.ndarray | None:
    """log10 ||dL/dh_t||_F for t = 1..T (index t-1) of ``loss_fn(readout(h_T), y)``, or ``None``.

    ``None`` for cells outside :data:`SUPPORTED`. Exact zeros read ``-inf``.
    """
    cell = params["cell"]
    if cell not in SUPPORTED:
        return None
    p = {k: (v.detach().to(torch.float64).cpu() if torch.is_tensor(v) else v) for k, v in params.items()}
    x = x.detach().to(torch.float64).cpu()
    if torch.is_tensor(y) and y.is_floating_point():
        y = y.detach().to(torch.float64)
    B, T = x.shape[0], x.shape[1]
    h = torch.zeros(B, p["W_ih"].shape[0], dtype=torch.float64)
    pre: list[np.ndarray] = []
    with torch.no_grad():
        for gi in F.linear(x, p["W_ih"], p["b_ih"]).unbind(1):
            a = gi + p["u"] * h if cell == "indrnn" else gi + F.linear(h, p["W_hh"], p["b_hh"])
            h = torch.relu(a) if cell in ("relu", "indrnn") else torch.tanh(a)
            pre.append(a.numpy())
    h_T = h.clone().requires_grad_()
    with torch.enable_grad():
        loss = loss_fn(F.linear(h_T, p["W_out"], p["b_out"]), y)
        d = torch.autograd.grad(loss, h_T)[0].numpy()
    W = None if cell == "indrnn" else p["W_hh"].numpy()
    u = p["u"].numpy() if cell == "indrnn" else None
    out = np.empty(T)
    log_scale = 0.0
    for t in range(T - 1, -1, -1):  # d = dL/dh_{t+1} * exp(-log_scale), 0-based index t
        m = float(np.abs(d).max())
        out[t] = (
            (log_scale + math.log(m) + math.log(float(np.sqrt(((d / m) ** 2).sum())))) / math.log(10)
            if m > 0
            else -math.inf
        )
        if t == 0:
            break
        g = d * _dphi(cell, pre[t])
        # dL/dh_{t-1}[j] = sum_i g[i] W[i, j], written as an explicit contraction over the row index.
        if u is not None:
            d = g * u
        else:
            assert W is not None
            d = np.einsum("bi,ij->bj", g, W)
        m = float(np.abs(d).max())
        if m > 0:
            d = d / m
            log_scale += math.log(m)
    return out


def max_error(profile_h: np.ndarray, reference: np.ndarray) -> float:
    """Largest |difference| in decades over t; ``inf`` where one side is finite and the other is not.

    Steps where both read ``-inf`` (an exactly zero gradient in both) agree.
    """
    a, b = np.asarray(profile_h, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    fa, fb = np.isfinite(a), np.isfinite(b)
    if (fa != fb).any() or ((~fa) & (a != b)).any():
        return math.inf
    return float(np.abs(a[fa] - b[fb]).max()) if fa.any() else 0.0
