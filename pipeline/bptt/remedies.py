"""Differentiable remedies beyond clipping, over a :mod:`pipeline.bptt.twin` params dict of LIVE tensors.

Both functions return a scalar (or a vector) whose gradient reaches the weights in ``params``, so a
training step adds them to its loss (README, "Remedies beyond clipping"). They run in the params' own
dtype and device (float32 on the training device), not in the diagnostics' float64.

* :func:`omega`: Pascanu's regulariser (Pascanu, Mikolov, Bengio 2013, eq. 9-10), which asks every step's
  Jacobian to preserve the norm of the gradient that flows through it.
* :func:`lyapunov_spectrum`: the k largest Lyapunov exponents of the forward dynamics by the QR method
  (Benettin et al. 1980), differentiable through ``torch.linalg.qr``; gradient flossing (Engelken 2023,
  "Gradient Flossing: Improving Gradient Descent through Dynamic Control of Jacobians") minimises
  ``sum_i lambda_i^2``.

Both use only the cells' own step functions (:func:`~pipeline.bptt.twin.step_cached`,
:func:`~pipeline.bptt.twin.step_vjp`, :func:`~pipeline.bptt.twin.step_jvp`), written with plain torch
ops, so every cell of the twin is covered. A cell's ``step_vjp`` / ``step_jvp`` must broadcast over a
leading batch of rows (``[N, H]``), and ``step_jvp`` also over a tangent axis (cache ``[B, 1, H]``,
tangents ``[B, k, H]``), as plain elementwise ops and ``@ W.T`` do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from pipeline.bptt import twin as cells
from pipeline.bptt.twin import Cache, Params, State

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Tensor], Tensor]


def _detached(params: Params) -> Params:
    return {k: v.detach() if isinstance(v, Tensor) else v for k, v in params.items()}


def _row_maxabs(parts: Sequence[Tensor]) -> Tensor:
    """Max |entry| per row (the last axis), over a tuple of same-shape tensors."""
    m: Tensor = functools.reduce(
        torch.maximum, [torch.linalg.vector_norm(v, ord=torch.inf, dim=-1) for v in parts]
    )
    return m


def _row_norm(parts: Sequence[Tensor]) -> Tensor:
    """Euclidean norm per row over the concatenated parts (the LSTM state is (h, c)). ``vector_norm``, not
    ``sqrt`` of a sum: its gradient at an exactly zero row (dead relu units) is 0, not NaN."""
    n: Tensor = torch.linalg.vector_norm(torch.cat(tuple(parts), dim=-1), dim=-1)
    return n


def _rescale(parts: Sequence[Tensor], log_scale: Tensor | None) -> tuple[tuple[Tensor, ...], Tensor | None]:
    """Per row: the vector at max-abs 1 and its log scale (None: not tracked, the direction alone). The
    divisor is clamped at the dtype's smallest normal number, so a zero row stays zero with a finite
    log scale."""
    m = _row_maxabs(parts).clamp_min(torch.finfo(parts[0].dtype).tiny)
    unit = tuple(v / m[:, None] for v in parts)
    return unit, None if log_scale is None else log_scale + torch.log(m)


def _forward(p: Params, x: Tensor) -> tuple[list[State], list[Cache]]:
    """States s_0 (zeros) .. s_T and each step's cache, without graphs."""
    state = cells.init_state(p, x.shape[0], x.dtype, x.device)
    states, caches = [state], []
    for gi in cells.input_projection(p, x).unbind(1):
        state, cache = cells.step_cached(p, gi, state)
        states.append(state)
        caches.append(cache)
    return states, caches


def _direct(
    p: Params, states: list[State], x: Tensor, y: Tensor, loss_fn: LossFn, readout_mode: str
) -> Tensor:
    """dL/dh_t through the readout alone (the direct loss terms), ``[B, T, H]``. ``x`` goes to the readout
    too: lru's output reads the step's input (y_t = Re(C h_t) + D x_t, Orvieto et al. 2023)."""
    hs = torch.stack([s[0] for s in states[1:]], dim=1).requires_grad_()
    last = readout_mode == "last"
    out = cells.readout(p, hs[:, -1] if last else hs, x[:, -1] if last else x)
    return torch.autograd.grad(loss_fn(out, y), hs)[0]


def _gradient_directions(
    p: Params, caches: list[Cache], D: Tensor, n_states: int, has_direct: bool
) -> list[State]:
    """dL/ds_t for t = 1..T, each row (sequence) rescaled to max-abs 1: the direction Omega needs.

    The walk back of BPTT, v_{t-1} = D_{t-1} + J_t^T v_t, with the hand-written VJP, carried per sequence as
    (vector at max-abs 1, log scale) so a gradient that vanished by 1e-60 still has its direction in
    float32 (a plain float32 walk would flush it to zero). Direct terms before T (``has_direct``: a loss
    with a term at every step, readout "all") are added in log space.
    """
    B, T, _ = D.shape
    zeros = [torch.zeros_like(D[:, 0]) for _ in range(n_states - 1)]
    # The log scale matters only where direct terms are added; pure propagation needs the direction alone.
    s0 = torch.zeros(B, dtype=D.dtype, device=D.device) if has_direct else None
    v, s = _rescale((D[:, -1], *zeros), s0)
    out = [v]
    d_max = D.abs().amax(dim=-1)  # [B, T]
    for t in range(T - 1, 0, -1):  # v_t from v_{t+1}; caches[t] is step t+1
        g, _ = cells.step_vjp(p, caches[t], v)
        v, s = _rescale(g, s)
        if s is not None:
            dm = d_max[:, t - 1]
            d_log = torch.where(dm > 0, torch.log(dm), torch.full_like(dm, -torch.inf))
            big = torch.maximum(s, d_log)
            wv, wd = torch.exp(s - big)[:, None], torch.exp(d_log - big)[:, None]
            d = D[:, t - 1] / torch.where(dm > 0, dm, torch.ones_like(dm))[:, None]
            v, s = _rescale((v[0] * wv + d * wd, *(c * wv for c in v[1:])), big)
        out.append(v)
    return out[::-1]


def omega(params: Params, x: Tensor, y: Tensor, loss_fn: LossFn, readout_mode: str = "last") -> Tensor:
    """Pascanu's regulariser Omega (Pascanu, Mikolov, Bengio 2013, eq. 9), differentiable in ``params``.

        Omega = mean over steps k = 1..T and sequences b of ( ||v_k J_k|| / ||v_k|| - 1 )^2,
        v_k = dL/ds_k (the total gradient reaching state s_k), J_k = ds_k / ds_{k-1}

    The paper sums over k; its published code (``trainingRNNs``, RNN.py) averages over the (step,
    sequence) terms whose gradient is non-zero, which keeps the weight's meaning independent of T: so do
    we. The paper's eq. 9 ratio of norms is used (the code squares both norms).

    Which dependencies on the weights are kept (the paper's approximation, eq. 10): v_k is a constant
    (detached); so are the states s_{k-1} from earlier steps. Kept: the step itself, s_k = F(s_{k-1}, x_k),
    with every weight it reads live: W_hh explicitly, and W_hh, W_ih and the biases through phi'(a_k)
    (and the gates) of that step. This is the paper's "immediate" derivative d+ (their x_k is the
    pre-activation, so their diag(sigma'(x_k)) is constant; ours, h_k = phi(W h_{k-1} + U x_k + b), reads
    phi' at a_k, which depends on the weights immediately). The readout gets no gradient from Omega.

    Cost: one forward without graphs (the states and caches), one walk back with the hand-written VJP
    (the directions v_k, rescaled per sequence), then ONE batched step: the live step re-applied to all
    T detached previous states at once (``[T*B]`` rows) and its VJP against the stacked v_k, by the
    hand-written :func:`~pipeline.bptt.twin.step_vjp` on live tensors, so autograd differentiates it
    like any op: no per-step ``torch.autograd.grad`` call. Terms whose v_k is exactly zero (a dead relu
    path) are left out, as the code's bound does.
    """
    p0 = _detached(params)
    n_states = len(cells.state_names(params))
    with torch.no_grad():
        states, caches = _forward(p0, x)
    with torch.enable_grad():
        D = _direct(p0, states, x, y, loss_fn, readout_mode)
    with torch.no_grad():
        V = _gradient_directions(p0, caches, D, n_states, readout_mode != "last")
    B, T = x.shape[0], x.shape[1]
    prev = tuple(torch.cat([s[i] for s in states[:-1]]) for i in range(n_states))  # [T*B, H], step-major
    v = tuple(torch.cat([vk[i] for vk in V]) for i in range(n_states))
    gi = cells.input_projection(params, x).transpose(0, 1).reshape(T * B, -1)  # live: W_ih, b_ih
    _, cache = cells.step_cached(params, gi, prev)  # live: phi'(a_k) and gates from the live weights
    u, _ = cells.step_vjp(params, cache, v)  # v_k J_k, live in W_hh and in the cache
    den = _row_norm(v)
    valid = den > 0
    ratio = _row_norm(u) / torch.where(valid, den, torch.ones_like(den))
    terms = torch.where(valid, (ratio - 1.0) ** 2, torch.zeros_like(ratio))
    return terms.sum() / valid.sum().clamp_min(1)


def lyapunov_spectrum(params: Params, x: Tensor, k: int, burn_in: int | None = None, seed: int = 0) -> Tensor:
    """The k largest Lyapunov exponents (nats per step), differentiable in ``params``: ``[k]``, descending.

    QR method (Benettin et al. 1980; Engelken, Wolf, Abbott 2023): Q_0 random orthonormal ``[S, k]`` per
    sequence (seeded), then Q_t R_t = qr(J_t Q_{t-1}) and lambda_i = mean over steps after the burn-in
    and over the batch of ln |R_t[i, i]|. J_t Q is the hand-written tangent
    (:func:`~pipeline.bptt.twin.step_jvp`) applied to k tangents at once; ``torch.linalg.qr`` (reduced)
    is differentiable, and the trajectory itself runs on the live weights, so the gradient flows through
    the states, the Jacobians and the QR, as in Engelken's reference code (which differentiates the whole
    spectrum computation with Zygote). ``burn_in`` defaults to min(T // 10, 10) steps, as
    :func:`pipeline.bptt.spectra.lyapunov_max`, whose float64 value (without gradients) lambda_1 matches.
    The state is (h, c) for LSTM, so k <= 2H there, k <= H otherwise.
    """
    B, T = x.shape[0], x.shape[1]
    burn = min(T // 10, 10) if burn_in is None else int(burn_in)
    if T - burn < 1:
        raise ValueError(f"need more steps than the burn-in ({burn}), got T={T}")
    state = cells.init_state(params, B, x.dtype, x.device)
    S = sum(s.shape[1] for s in state)
    if not 1 <= k <= S:
        raise ValueError(f"k must be in [1, {S}] (the state dimension), got {k}")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    q0 = torch.randn(B, S, k, generator=gen, dtype=x.dtype, device=x.device)
    Q = torch.linalg.qr(q0).Q  # [B, S, k], orthonormal columns
    sizes = [s.shape[1] for s in state]
    acc = x.new_zeros(k)
    for t, gi in enumerate(cells.input_projection(params, x).unbind(1)):
        state, cache = cells.step_cached(params, gi, state)
        tangents = tuple(Q.transpose(1, 2).split(sizes, dim=-1))  # parts [B, k, H]
        jq = cells.step_jvp(params, tuple(c.unsqueeze(1) for c in cache), tangents)
        M = torch.cat(jq, dim=-1).transpose(1, 2)  # J_t Q_{t-1}: [B, S, k]
        if k == 1:  # the QR of one column is its norm: the same numbers, without the QR call's overhead
            r = torch.linalg.vector_norm(M, dim=1)  # [B, 1]
            Q = M / r.clamp_min(torch.finfo(M.dtype).tiny)[:, None]
        else:
            Q, R = torch.linalg.qr(M)
            r = torch.diagonal(R, dim1=-2, dim2=-1).abs()
        if t >= burn:
            # |R_ii| = 0 (a tangent annihilated, e.g. by dead relu units) is clamped at the dtype's smallest
            # normal number: a finite, very negative exponent with no gradient, not -inf in the loss.
            acc = acc + torch.log(r.clamp_min(torch.finfo(M.dtype).tiny)).mean(dim=0)
    return acc / (T - burn)
