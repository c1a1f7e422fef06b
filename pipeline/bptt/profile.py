"""Exact BPTT diagnostics: the per-step gradient profile ||dL/dh_t|| and its summaries. Pure torch over a
:mod:`pipeline.bptt.twin` params dict. Recurrent spectra, Pascanu's bound and the largest Lyapunov exponent
live in :mod:`pipeline.bptt.spectra`.

BPTT (Werbos 1990; Pascanu, Mikolov, Bengio 2013, eq. 3-5): dL/dh_k = (prod_{i=k+1..T} J_i)^T dL/dh_T (+ direct loss terms), with
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.bptt import twin as cells
from pipeline.bptt.twin import Cache, Params, State

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Tensor], Tensor]  # (outputs, targets) -> scalar loss
LN10 = math.log(10.0)


# ---------------------------------------------------------------------------------------------------
# Denormals: training flushes them (speed: README, "How it works"); diagnostics must not (exactness).


def flush_denormal_enabled() -> bool:
    """Whether denormals are currently flushed on this thread (torch has no getter, so probe it).

    The smallest positive float64 (bit pattern 1) is built without float arithmetic; doubling it gives
    bit pattern 2 unless DAZ/FTZ (what ``torch.set_flush_denormal(True)`` sets) turns it into 0.
    """
    tiny = torch.ones(1, dtype=torch.int64).view(torch.float64)
    return int((tiny * 2.0).view(torch.int64).item()) != 2


@contextlib.contextmanager
def exact_denormals(restore_flush: bool | None = None) -> Iterator[None]:
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


def as_float64(params: Params) -> Params:
    """Float64 detached copy of every floating tensor in ``params`` (the model's weights stay untouched)."""
    return {
        k: v.detach().to(torch.float64) if isinstance(v, Tensor) and v.is_floating_point() else v
        for k, v in params.items()
    }


def _maxabs(parts: Sequence[Tensor]) -> Tensor:
    """Max |entry| over a tuple of tensors (a 0-d tensor, kept on the device: no host sync per step)."""
    m: Tensor = functools.reduce(torch.maximum, [torch.linalg.vector_norm(p, ord=math.inf) for p in parts])
    return m


def nonzero_or_one(m: Tensor) -> Tensor:
    """``m`` with its zeros replaced by 1: a safe divisor for rescaling (a zero vector stays zero)."""
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
    n = torch.linalg.vector_norm(V / nonzero_or_one(m).reshape(shape), dim=dims)
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
    """Per-step gradient norms: ``log10_norm[name][t-1] = log10 ||dL_w/d{name}_t||_F`` for t = 1..T.

    States (README, "The long-range profile"):

    - ``"h"``: the **long-range** profile, the gradient of the loss terms in the task's memory window
      ``window = (a, b)`` (1-based steps, inclusive) with respect to h_t. Before the window (t < a) no
      loss term acts, so dL_w/dh_t = (J_{t+1}^T ... J_a^T) dL_w/dh_a exactly: pure propagation, the
      quantity Pascanu, Mikolov, Bengio 2013 (section 2.1) bound. For a last-step loss (adding,
      temporal order) the window is (T, T) and ``"h"`` is the total gradient.
    - ``"c"`` (LSTM): the same on the cell state: the total gradient of c_t in the window loss (including
      the path through h_t = o_t * tanh(c_t): Graves' delta c_t, what ``c_t.grad`` gives in a full-graph
      backward of the window loss).
    - ``"h_total"`` / ``"c_total"``: the gradient of the whole loss, present only when the loss has terms
      outside the window (copy: the loss covers every step; its direct terms dominate dL/dh_t at every
      t, so this curve says nothing about memory).

    ``overflow_step``: the first step t whose float64 forward state is not finite (growth beyond 1e308,
    e.g. relu with identity g = 1.5 at T = 2000), else ``None``; every norm is then NaN, since the
    activations the Jacobians need do not exist.
    """

    cell: str
    T: int
    log10_norm: dict[str, np.ndarray] = field(default_factory=dict)
    readout_mode: str = "last"
    loss: float = float("nan")
    window: tuple[int, int] | None = None  # None: (T, T)
    overflow_step: int | None = None

    @property
    def window_start(self) -> int:
        return self.window[0] if self.window is not None else self.T

    @property
    def reference_step(self) -> int:
        """The step ratios are measured from: the window's first step a (everything before it is pure
        propagation). A window that starts at t = 1 has nothing before it; then T, as in the total
        profile's summaries."""
        a = self.window_start
        return a if a > 1 else self.T

    @property
    def is_propagation_only(self) -> bool:
        """True when no loss term acts before :attr:`reference_step`: then the ratio is a product of
        Jacobians alone and Pascanu's bound applies to it (vanilla cells)."""
        return self.reference_step == self.window_start

    def long_format(self, step: int) -> dict[str, np.ndarray]:
        """Long format, as columns: ``step`` (int), ``t`` (int, 1..T), ``state`` (see the class doc),
        ``log10_norm``; one row per (state, t), states in :attr:`log10_norm`'s order. (A data frame of
        it is :func:`pipeline.training.callbacks.long_frame`: this stage imports no pandas.)"""
        names = list(self.log10_norm)
        n = len(names)
        return {
            "step": np.full(n * self.T, int(step), dtype=np.int64),
            "t": np.tile(np.arange(1, self.T + 1, dtype=np.int64), n),
            "state": np.repeat(np.asarray(names, dtype=object), self.T),
            "log10_norm": np.concatenate([np.asarray(v, dtype=np.float64) for v in self.log10_norm.values()])
            if n
            else np.zeros(0),
        }


def _check_window(window: tuple[int, int] | None, readout_mode: str, T: int) -> tuple[int, int]:
    """The memory window as 1-based inclusive steps; default (T, T) for "last", (1, T) for "all"."""
    if window is None:
        return (T, T) if readout_mode == "last" else (1, T)
    a, b = int(window[0]), int(window[1])
    if not 1 <= a <= b <= T:
        raise ValueError(f"window must satisfy 1 <= start <= end <= T={T}, got {window!r}")
    if readout_mode == "last" and b != T:
        raise ValueError(f"readout 'last' has its only loss term at T={T}; window {window!r} excludes it")
    return a, b


def _forward(p: Params, x: Tensor) -> tuple[list[Cache], list[State], int | None]:
    """Forward pass without graphs, keeping each step's activations for the hand-written VJPs.

    Also finds the first step whose state is not finite (overflow): one finiteness flag per step stays
    on the device and is read once at the end (no host sync per step).
    """
    caches, outs, flags = [], [], []
    state = cells.init_state(p, x.shape[0], torch.float64, x.device)
    with torch.no_grad():
        for gi in cells.input_projection(p, x).unbind(1):  # the input projection: one matmul for all steps
            state, cache = cells.step_cached(p, gi, state)
            caches.append(cache)
            outs.append(state)
            flags.append(functools.reduce(torch.logical_and, [torch.isfinite(s).all() for s in state]))
    bad = torch.nonzero(~torch.stack(flags)).flatten()
    return caches, outs, (int(bad[0]) + 1 if bad.numel() else None)


def _direct_terms(
    p: Params, outs: list[State], x: Tensor, y: Tensor, loss_fn: LossFn, readout_mode: str
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Direct loss terms dL/dh_t (partial, through the readout only), normalised: ``D[:, t] =
    D_n[t] * exp(d_log[t])`` with D_n at max-abs 1 (or 0) and d_log = -inf where the term is exactly zero
    (every t < T for a last-step loss). ``x`` is the input, for readouts that also read it (lru's D x_t)."""
    if readout_mode == "last":
        hT = outs[-1][0].detach().requires_grad_()
        loss = loss_fn(cells.readout(p, hT, x[:, -1]), y)
        D = torch.zeros((hT.shape[0], len(outs), hT.shape[1]), dtype=torch.float64, device=hT.device)
        D[:, -1] = torch.autograd.grad(loss, hT)[0]
    else:
        hs = torch.stack([o[0].detach() for o in outs], dim=1).requires_grad_()
        loss = loss_fn(cells.readout(p, hs, x), y)
        D = torch.autograd.grad(loss, hs)[0]  # [B, T, H]
    m = D.abs().amax(dim=(0, 2))
    return list((D / nonzero_or_one(m)[None, :, None]).unbind(1)), torch.log(m), loss.detach()


def _walk_back(
    p: Params, caches: list[Cache], names: tuple[str, ...], D_n: list[Tensor], d_log: Tensor
) -> dict[str, np.ndarray]:
    """One backward walk: dL/dstate_t for t = T..1 given the direct terms (D_n, d_log), rescaled.

    The gradient is carried as v * exp(s), v at max-abs 1; each step does one hand-written VJP
    (:func:`pipeline.bptt.twin.step_vjp`) and adds the direct term at t-1 in log space. Norms are taken
    afterwards in one batched pass over the stored (v, s): no per-step reduction chain.
    """
    lstm = len(names) == 2
    T = len(caches)
    zero = torch.zeros((), dtype=torch.float64, device=D_n[0].device)
    # Start at T: the direct term there, or an exact zero (finite log scale, see _renormalise).
    start = torch.where(torch.isfinite(d_log[-1]), d_log[-1], zero)
    v, s = _renormalise((D_n[-1],) + tuple(torch.zeros_like(D_n[-1]) for _ in names[1:]), start)
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
                assert dc is not None  # step_vjp returns dL/dc_t for LSTM
                kept["c"].append(dc)
        if t == 1:
            break
        # g = J_t^T v is the propagated part, at scale s.
        v, s = _renormalise(g, s)
        # Add the direct term at t-1 in log space: both rescaled to the larger scale. s is always finite
        # (see _renormalise) so no -inf - -inf; a term 1e-308x smaller is rightly lost; d_log = -inf
        # (no term) gives weight exp(-inf) = 0.
        big = torch.maximum(s, d_log[t - 2])
        wv, wd = torch.exp(s - big), torch.exp(d_log[t - 2] - big)
        v = (v[0] * wv + D_n[t - 2] * wd,) + tuple(c * wv for c in v[1:])
        v, s = _renormalise(v, big)
    return {n: _log10_norms(kept[n], scales).flip(0).cpu().numpy() for n in names}  # index t-1


def profile(
    params: Params,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    readout_mode: str = "last",
    restore_flush: bool | None = None,
    window: tuple[int, int] | None = None,
) -> Profile:
    """Exact gradients dL_w/dh_t (and dL_w/dc_t for LSTM) for every t = 1..T, in float64, rescaled.

    ``readout_mode``: ``"last"`` -> ``loss_fn(readout(h_T), y)``; ``"all"`` -> ``loss_fn(outputs, y)``
    with outputs ``[B, T, O]``. ``loss_fn`` receives float64 outputs. ``window`` = (a, b), 1-based
    inclusive: the steps whose loss terms make the long-range profile ``"h"`` (the task's memory window,
    :attr:`pipeline.training.tasks.Task.window`); default (T, T) for "last" and (1, T), the whole loss, for "all".
    The loss must be a sum (or mean) of per-step terms (MSE, cross-entropy are): then keeping the direct
    terms dL/dh_t of the window steps and zeroing the others gives exactly the gradient of the window's
    loss terms, with the loss's own normalisation. When the window leaves loss terms out, the total
    profile is returned too (``"h_total"``, ``"c_total"``). Denormal flushing is off during the pass and
    restored afterwards (see :func:`exact_denormals` for ``restore_flush``).

    Method: one forward pass keeps each step's activations, then a walk back does one hand-written
    vector-Jacobian product per step (:func:`pipeline.bptt.twin.step_vjp`, checked against full-graph
    autograd in the tests): O(T) work, no quadratic indexing, no per-step autograd overhead. Direct loss
    terms are added in log space. A forward state that overflows float64 stops there: every norm is NaN
    and :attr:`Profile.overflow_step` says where.
    """
    if readout_mode not in ("last", "all"):
        raise ValueError(f"readout_mode must be 'last' or 'all', got {readout_mode!r}")
    p = as_float64(params)
    names = cells.state_names(p)
    x = x.detach().to(torch.float64)
    if isinstance(y, Tensor) and y.is_floating_point():
        y = y.detach().to(torch.float64)
    T = x.shape[1]
    a, b = _check_window(window, readout_mode, T)
    full = readout_mode == "last" or (a, b) == (1, T)
    with exact_denormals(restore_flush), torch.enable_grad():
        caches, outs, overflow = _forward(p, x)
        if overflow is not None:
            nan = np.full(T, np.nan)
            keys = names + (() if full else tuple(f"{n}_total" for n in names))
            return Profile(
                cell=p["cell"],
                T=T,
                log10_norm={k: nan.copy() for k in keys},
                readout_mode=readout_mode,
                window=(a, b),
                overflow_step=overflow,
            )
        D_n, d_log, loss = _direct_terms(p, outs, x, y, loss_fn, readout_mode)
        in_window = torch.zeros(T, dtype=torch.bool, device=d_log.device)
        in_window[a - 1 : b] = True
        logs = _walk_back(p, caches, names, D_n, torch.where(in_window, d_log, -math.inf))
        if not full:
            logs.update({f"{n}_total": v for n, v in _walk_back(p, caches, names, D_n, d_log).items()})
        return Profile(
            cell=p["cell"], T=T, log10_norm=logs, readout_mode=readout_mode, loss=float(loss), window=(a, b)
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


def summarize(prof: Profile, horizon_decades: float = 3.0) -> dict[str, float]:
    """Scalar summaries of the long-range profile (floats; ``-inf`` where a gradient is exactly zero).

    All are measured from the reference step r = :attr:`Profile.reference_step`: the first step a of the
    memory window (T for a last-step loss, 111 for copy at T = 100), so they describe propagation alone.

    - ``log10_ratio``: log10(||dL_w/dh_1|| / ||dL_w/dh_r||), the decades gained (> 0) or lost (< 0)
      carrying the window's gradient back to the first step.
    - ``log10_ratio_per_step``: ``log10_ratio / (r - 1)``, decades per step: the same number for the same
      dynamics at any T (the verdict's input).
    - ``decay_rate``: least-squares slope of ln||dL_w/dh_{r-k}|| against the lag k = 1..r-1: the
      per-step log growth going back in time (ln g for a linear-regime tanh RNN with W = g*orthogonal;
      < 0 vanishing, > 0 exploding). k = 0 is left out since at r the direct loss term enters
      un-multiplied by a Jacobian; for r = 2 it is used (slope of two points); r = 1 gives NaN.
      Non-finite points (exact zeros) are dropped.
    - ``horizon``: the first lag k with log10(||dL_w/dh_{r-k}|| / ||dL_w/dh_r||) < -horizon_decades, or
      r-1 if it never drops that far: how far back the window's loss still "sees".
    - LSTM: ``c_log10_ratio`` and ``c_log10_ratio_per_step``, the same on the cell-state path.
    - ``overflow_step``: the first step whose forward state overflowed float64, 0 if none (then every
      other summary is NaN).
    """
    with np.errstate(invalid="ignore"):  # -inf - -inf (both gradients exactly zero) -> NaN, no warning
        return _summarize(prof, horizon_decades)


def _summarize(prof: Profile, horizon_decades: float) -> dict[str, float]:
    r = prof.reference_step
    h = np.asarray(prof.log10_norm["h"], dtype=np.float64)[:r]  # steps 1..r
    span = r - 1
    lag = np.arange(r)  # lag[k] = k, profile index r-1-k
    back = h[::-1]  # back[k] = log10 ||dL_w/dh_{r-k}||
    # from lag 1 where there are 3 points or more: the direct term at lag 0 is not the recursion's
    rate = _slope(lag[1:], back[1:] * LN10) if r >= 3 else _slope(lag, back * LN10)
    rel = back - back[0]
    below = np.nonzero(rel < -horizon_decades)[0]
    ratio = float(h[0] - h[-1])
    out = {
        "log10_ratio": ratio,
        "log10_ratio_per_step": ratio / span if span else float("nan"),
        "decay_rate": rate,
        "horizon": float(below[0]) if below.size else float(span) if np.isfinite(back[0]) else float("nan"),
    }
    if "c" in prof.log10_norm:
        c = np.asarray(prof.log10_norm["c"], dtype=np.float64)
        c_ratio = float(c[0] - c[r - 1])
        out["c_log10_ratio"] = c_ratio
        out["c_log10_ratio_per_step"] = c_ratio / span if span else float("nan")
    out["overflow_step"] = float(prof.overflow_step or 0)
    return out
