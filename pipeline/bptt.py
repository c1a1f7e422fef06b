"""Exact BPTT diagnostics: the per-step gradient profile ||dL/dh_t||, its summaries, recurrent spectra,
Pascanu's bound and the largest Lyapunov exponent. Pure torch over a :mod:`pipeline.cells` params dict.

BPTT (ANCHORS section 1): dL/dh_k = (prod_{i=k+1..T} J_i)^T dL/dh_T (+ direct loss terms), with
J_i = diag(phi'(a_i)) W_hh for a vanilla cell. Over T = 1000 steps at g = 0.5 the true ratio is 1e-301,
and at T = 1400 it is 1e-421, below float64's range. So everything here runs in float64 on a copy of the
weights, and the backward signal is carried as (unit-scale vector, log scale): the vector is renormalised
to max-abs 1 after every step and the log of the factor is accumulated, so a ratio of 1e-400 reads
log10 = -400, never 0, -inf or NaN. An exact zero gradient (dead relu units) honestly reads -inf.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline import cells

Tensor = torch.Tensor
LN10 = math.log(10.0)


# ---------------------------------------------------------------------------------------------------
# Denormals: training flushes them (speed, ANCHORS section 4); diagnostics must not (exactness).


def flush_denormal_enabled() -> bool:
    """Whether denormals are currently flushed on this thread (torch has no getter, so probe it).

    The smallest positive float64 (bit pattern 1) is built without float arithmetic; doubling it gives
    bit pattern 2 unless DAZ/FTZ (what ``torch.set_flush_denormal(True)`` sets) turns it into 0.
    """
    tiny = torch.ones(1, dtype=torch.int64).view(torch.float64)
    return int((tiny * 2.0).view(torch.int64).item()) != 2


@contextlib.contextmanager
def exact_denormals(restore_flush: bool | None = None):
    """Disable denormal flushing inside the block, then restore it.

    ``restore_flush=None`` (default) restores the setting found on entry (probed by
    :func:`flush_denormal_enabled`); ``True`` / ``False`` forces that setting on exit.
    """
    before = flush_denormal_enabled()
    torch.set_flush_denormal(False)
    try:
        yield
    finally:
        after = before if restore_flush is None else restore_flush
        if after:
            torch.set_flush_denormal(True)  # returns False (a no-op) where unsupported


# ---------------------------------------------------------------------------------------------------
# Scaled arithmetic helpers


def _as_float64(params: dict) -> dict:
    """Float64 detached copy of every floating tensor in ``params`` (the model's weights stay untouched)."""
    return {
        k: v.detach().to(torch.float64) if isinstance(v, Tensor) and v.is_floating_point() else v
        for k, v in params.items()
    }


def _maxabs(parts) -> Tensor:
    """Max |entry| over a tuple of tensors (a 0-d tensor, kept on the device: no host sync per step)."""
    return functools.reduce(torch.maximum, [torch.linalg.vector_norm(p, ord=math.inf) for p in parts])


def _safe(m: Tensor) -> Tensor:
    return torch.where(m > 0, m, torch.ones_like(m))


def _log10_norms(vs: list[Tensor], log_scales: list[Tensor]) -> Tensor:
    """log10 ||v_i * exp(s_i)||_F for a list of same-shape tensors, in one batched pass.

    Scaled: divide by max-abs first (a sum of squares of 1e-200 entries underflows even in float64).
    Exact zeros read -inf.
    """
    V = torch.stack(vs)  # [N, B, H]
    dims = tuple(range(1, V.dim()))
    m = V.abs().amax(dim=dims)
    shape = (-1,) + (1,) * (V.dim() - 1)
    n = torch.linalg.vector_norm(V / _safe(m).reshape(shape), dim=dims)
    return (torch.stack(log_scales) + torch.log(m) + torch.log(n)) / LN10


_TINY = torch.finfo(torch.float64).tiny


def _renormalise(parts: tuple[Tensor, ...], log_scale: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
    """(vector, log scale) -> the same value with the vector at max-abs 1.

    The divisor is clamped at the smallest normal float64 so that a zero vector stays zero (its log
    scale then stays finite; its norm reads -inf) and the pair stays consistent for denormal maxima.
    """
    m = _maxabs(parts).clamp_min(_TINY)
    return tuple(p / m for p in parts), log_scale + torch.log(m)


# ---------------------------------------------------------------------------------------------------
# The profile


@dataclass
class Profile:
    """Per-step gradient norms: ``log10_norm[name][t-1] = log10 ||dL/d{name}_t||_F`` for t = 1..T.

    The norm is the Frobenius norm over batch and hidden dims. For LSTM, ``"c"`` is the total gradient of
    the cell state c_t (including the path through h_t = o_t * tanh(c_t): Graves' delta c_t, the same
    number ``c_t.grad`` gives in a full-graph backward).
    """

    cell: str
    T: int
    log10_norm: dict[str, np.ndarray] = field(default_factory=dict)
    readout_mode: str = "last"
    loss: float = float("nan")

    def to_frame(self, step: int):
        """Long format: columns ``step`` (int), ``t`` (int, 1..T), ``state`` ("h"/"c"), ``log10_norm``."""
        import pandas as pd

        frames = [
            pd.DataFrame(
                {
                    "step": np.full(self.T, int(step), dtype=np.int64),
                    "t": np.arange(1, self.T + 1, dtype=np.int64),
                    "state": name,
                    "log10_norm": np.asarray(v, dtype=np.float64),
                }
            )
            for name, v in self.log10_norm.items()
        ]
        return pd.concat(frames, ignore_index=True)


def to_frame(profile: Profile, step: int):
    return profile.to_frame(step)


def profile(
    params: dict, x: Tensor, y: Tensor, loss_fn, readout_mode: str = "last", restore_flush: bool | None = None
) -> Profile:
    """Exact total gradients dL/dh_t (and dL/dc_t for LSTM) for every t = 1..T, in float64, rescaled.

    ``readout_mode``: ``"last"`` -> ``loss_fn(readout(h_T), y)``; ``"all"`` -> ``loss_fn(outputs, y)``
    with outputs ``[B, T, O]``. ``loss_fn`` receives float64 outputs. Denormal flushing is off during the
    pass and restored afterwards (see :func:`exact_denormals` for ``restore_flush``).

    Method: one forward pass keeps each step's activations, then a walk back does one hand-written
    vector-Jacobian product per step (:func:`pipeline.cells.step_vjp`, checked against full-graph
    autograd in the tests): O(T) work, no quadratic indexing, no per-step autograd overhead. Direct loss
    terms (readout "all") are added in log space.
    """
    if readout_mode not in ("last", "all"):
        raise ValueError(f"readout_mode must be 'last' or 'all', got {readout_mode!r}")
    p = _as_float64(params)
    names = cells.state_names(p)
    lstm = len(names) == 2
    x = x.detach().to(torch.float64)
    if isinstance(y, Tensor) and y.is_floating_point():
        y = y.detach().to(torch.float64)
    B, T = x.shape[0], x.shape[1]
    with exact_denormals(restore_flush), torch.enable_grad():
        # Forward without graphs: keep each step's activations for the hand-written VJPs
        # (cells.step_vjp); the input projection is one matmul for all steps.
        caches, outs = [], []
        state = cells.init_state(p, B, torch.float64, x.device)
        with torch.no_grad():
            for gi in cells.input_projection(p, x).unbind(1):
                state, cache = cells.step_cached(p, gi, state)
                caches.append(cache)
                outs.append(state)
        # Direct loss terms dL/dh_t (partial, through the readout only), from a leaf copy of the h's.
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        if readout_mode == "last":
            hT = outs[-1][0].detach().requires_grad_()
            loss = loss_fn(cells.readout(p, hT), y)
            d_T = torch.autograd.grad(loss, hT)[0]
            d_log = None
        else:
            hs = torch.stack([o[0].detach() for o in outs], dim=1).requires_grad_()
            loss = loss_fn(cells.readout(p, hs), y)
            D = torch.autograd.grad(loss, hs)[0]  # [B, T, H]
            # Normalise all direct terms at once: D[:, t] = D_n[:, t] * exp(d_log[t]), max-abs 1 (or 0).
            m = D.abs().amax(dim=(0, 2))
            d_log = torch.log(m)  # -inf where a direct term is exactly zero (weight 0 below)
            D_n = (D / _safe(m)[None, :, None]).unbind(1)
            d_T = D[:, -1]

        # Walk back. The total gradient dL/dstate_t is carried as v * exp(s), v at max-abs 1. Norms are
        # taken later in one batched pass over the stored (v, s): no per-step reduction chain.
        v, s = _renormalise((d_T,) + tuple(torch.zeros_like(d_T) for _ in names[1:]), zero)
        kept: dict[str, list[Tensor]] = {n: [] for n in names}
        scales: list[Tensor] = []
        for t in range(T, 0, -1):  # t is 1-based; its activations are caches[t-1]
            kept["h"].append(v[0])
            scales.append(s)
            if lstm or t > 1:
                g, dc = cells.step_vjp(p, caches[t - 1], v)
                if lstm:
                    # delta c_t = the state part of dL/dc_t + (dh_t/dc_t)^T dL/dh_t: the total gradient of
                    # c_t in the graph, i.e. what c_t.grad holds after a full backward.
                    kept["c"].append(dc)
            if t == 1:
                break
            # g = J_t^T v is the propagated part, at scale s.
            v, s = _renormalise(g, s)
            if d_log is not None:
                # Add the direct term at t-1 in log space: both rescaled to the larger scale. s is always
                # finite (see _renormalise) so no -inf - -inf; a term 1e-308x smaller is rightly lost.
                big = torch.maximum(s, d_log[t - 2])
                wv, wd = torch.exp(s - big), torch.exp(d_log[t - 2] - big)
                v = (v[0] * wv + D_n[t - 2] * wd,) + tuple(c * wv for c in v[1:])
                v, s = _renormalise(v, big)
        logs = {n: _log10_norms(kept[n], scales).flip(0).cpu().numpy() for n in names}  # index t-1
        return Profile(
            cell=p["cell"], T=T, log10_norm=logs, readout_mode=readout_mode, loss=float(loss.detach())
        )


# ---------------------------------------------------------------------------------------------------
# Summaries


def _slope(k: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(y)
    k, y = k[ok], y[ok]
    if k.size < 2:
        return float("nan")
    k0 = k - k.mean()
    return float((k0 * (y - y.mean())).sum() / (k0 * k0).sum())


def summarize(prof: Profile, horizon_decades: float = 3.0) -> dict:
    """Scalar summaries of a profile (floats; ``-inf`` where a gradient is exactly zero).

    - ``log10_ratio``: log10(||dL/dh_1|| / ||dL/dh_T||).
    - ``decay_rate``: least-squares slope of ln||dL/dh_{T-k}|| against the lag k = 1..T-1: the per-step
      log growth of the gradient going back in time (ln g for a linear-regime tanh RNN with
      W = g*orthogonal; < 0 vanishing, > 0 exploding). k = 0 is left out since at T the direct loss term
      enters un-multiplied by a Jacobian; for T = 2 it is used (slope of two points); T = 1 gives NaN.
      Non-finite points (exact zeros) are dropped.
    - ``horizon``: the first lag k with log10(||dL/dh_{T-k}|| / ||dL/dh_T||) < -horizon_decades, or T-1
      if it never drops that far: how far back the loss still "sees".
    - LSTM: ``c_log10_ratio``, the same ratio on the cell-state path.
    """
    with np.errstate(invalid="ignore"):  # -inf - -inf (both gradients exactly zero) -> NaN, no warning
        return _summarize(prof, horizon_decades)


def _summarize(prof: Profile, horizon_decades: float) -> dict:
    h = np.asarray(prof.log10_norm["h"], dtype=np.float64)
    T = h.size
    lag = np.arange(T)  # lag[k] = k, profile index T-1-k
    back = h[::-1]  # back[k] = log10 ||dL/dh_{T-k}||
    if T >= 3:
        rate = _slope(lag[1:], back[1:] * LN10)
    else:
        rate = _slope(lag, back * LN10)
    rel = back - back[0]
    below = np.nonzero(rel < -horizon_decades)[0]
    out = {
        "log10_ratio": float(h[0] - h[-1]),
        "decay_rate": rate,
        "horizon": float(below[0]) if below.size else float(max(T - 1, 0)),
    }
    if "c" in prof.log10_norm:
        c = np.asarray(prof.log10_norm["c"], dtype=np.float64)
        out["c_log10_ratio"] = float(c[0] - c[-1])
    return out


# ---------------------------------------------------------------------------------------------------
# Spectra and Pascanu's bound


def spectrum(params: dict) -> dict:
    """Largest singular value and spectral radius of the recurrent weights (float64, torch.linalg).

    Vanilla cells: of W_hh. LSTM / GRU: per gate block (``sigma_max_<gate>``, ``radius_<gate>``, each
    H x H), and ``sigma_max`` / ``radius`` = the max over gates. IndRNN: the recurrence is diag(u), so
    ``sigma_max = radius = max|u|``.
    """
    p = _as_float64(params)
    cell = p["cell"]
    if cell == "indrnn":
        m = float(p["u"].abs().max())
        return {"sigma_max": m, "radius": m}

    def sr(W: Tensor) -> tuple[float, float]:
        return float(torch.linalg.matrix_norm(W, ord=2)), float(torch.linalg.eigvals(W).abs().max())

    W = p["W_hh"]
    if cell not in cells.GATES:
        s, r = sr(W)
        return {"sigma_max": s, "radius": r}
    out = {}
    gates = cells.GATES[cell]
    for gate, block in zip(gates, W.chunk(len(gates), dim=0), strict=True):
        out[f"sigma_max_{gate}"], out[f"radius_{gate}"] = sr(block)
    out["sigma_max"] = max(out[f"sigma_max_{g}"] for g in gates)
    out["radius"] = max(out[f"radius_{g}"] for g in gates)
    return out


def pascanu_log10_bound(params: dict, T: int) -> float | None:
    """log10 of (gamma * sigma_max)^(T-1): Pascanu, Mikolov, Bengio 2013 (section 2.1) bound
    ||dL/dh_k|| <= (gamma sigma_max)^(T-k) ||dL/dh_T|| at k = 1, an upper bound on ``log10_ratio`` for a
    vanilla cell with a last-step loss. ``None`` for gated cells (no single |phi'| bound applies)."""
    gamma = cells.activation_gamma(params["cell"])
    if gamma is None:
        return None
    s = gamma * spectrum(params)["sigma_max"]
    if T <= 1:
        return 0.0
    return (T - 1) * math.log10(s) if s > 0 else float("-inf")


# ---------------------------------------------------------------------------------------------------
# Largest Lyapunov exponent


def lyapunov_max(
    params: dict, x: Tensor, burn_in: int | None = None, seed: int = 0, restore_flush: bool | None = None
) -> float:
    """Largest Lyapunov exponent lambda_1 (nats per step) of the state dynamics driven by ``x``.

    QR / renormalisation method with one tangent vector (Benettin et al. 1980; Engelken, Wolf, Abbott
    2023 "gradient flossing"): q_t = J_t q_{t-1} / ||J_t q_{t-1}||, lambda_1 = mean over steps after the
    burn-in and over the batch of ln ||J_t q_{t-1}||. Each batch element has its own random unit tangent
    (seeded generator); J_t q is exact, by the hand-written tangent :func:`pipeline.cells.step_jvp`.
    LSTM: the state (h, c) is one vector. ``burn_in`` defaults to min(T // 10, 10) steps (q aligns with
    the leading direction). -inf only if the tangent is exactly annihilated (e.g. all relu units dead).
    Cost: about one plain forward pass plus one matmul per step.
    """
    p = _as_float64(params)
    x = x.detach().to(torch.float64)
    B, T = x.shape[0], x.shape[1]
    burn = min(T // 10, 10) if burn_in is None else int(burn_in)
    if T - burn < 1:
        raise ValueError(f"need more steps than the burn-in ({burn}), got T={T}")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    state = cells.init_state(p, B, torch.float64, x.device)
    q = tuple(torch.randn(s.shape, generator=gen, dtype=torch.float64, device=x.device) for s in state)

    def row_norm(parts):  # per batch element, scaled (max-abs first)
        m = functools.reduce(torch.maximum, [v.abs().amax(dim=1) for v in parts])
        ms = _safe(m)[:, None]
        n = m * torch.sqrt(sum(((v / ms) ** 2).sum(dim=1) for v in parts))
        return n

    n = row_norm(q)
    q = tuple(v / n[:, None] for v in q)
    acc = torch.zeros(B, dtype=torch.float64, device=x.device)
    with exact_denormals(restore_flush), torch.no_grad():
        for t, gi in enumerate(cells.input_projection(p, x).unbind(1)):
            # J_t q is exact: the hand-written forward-mode tangent of the step (cells.step_jvp).
            state, cache = cells.step_cached(p, gi, state)
            jq = cells.step_jvp(p, cache, q)
            n = row_norm(jq)
            q = tuple(v / _safe(n)[:, None] for v in jq)
            if t >= burn:
                acc += torch.log(n)
    return float((acc / (T - burn)).mean())
