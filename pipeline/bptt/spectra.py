"""Recurrent spectra, Pascanu's bound and the largest Lyapunov exponent, over a :mod:`pipeline.bptt.twin`
params dict, in float64 (pure torch; the profile itself is :mod:`pipeline.bptt.profile`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from pipeline.bptt import cornn, lem, modern
from pipeline.bptt import twin as cells
from pipeline.bptt.profile import as_float64, exact_denormals, nonzero_or_one
from pipeline.bptt.twin import Params
from pipeline.names import DIAGONAL_CELLS, GATE_NAMES

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------
# Spectra and Pascanu's bound


def spectrum(params: Params) -> dict[str, float]:
    """Largest singular value and spectral radius of the recurrent weights (float64, torch.linalg).

    Vanilla cells: of W_hh. LSTM / GRU: per gate block (``sigma_max_<gate>``, ``radius_<gate>``, each
    H x H), and ``sigma_max`` / ``radius`` = the max over gates. IndRNN: the recurrence is diag(u), so
    ``sigma_max = radius = max|u|``; lru likewise max|lambda|; mingru has no recurrent matrix: ``{}``
    (:func:`pipeline.bptt.modern.spectrum`); lem per recurrent matrix (:func:`pipeline.bptt.lem.spectrum`).
    """
    p = as_float64(params)
    cell = p["cell"]
    if cell in DIAGONAL_CELLS:
        return modern.spectrum(p)
    if cell == "lem":
        return lem.spectrum(p)
    if cell == "cornn":
        return cornn.spectrum(p)
    if cell == "indrnn":
        m = float(p["u"].abs().max())
        return {"sigma_max": m, "radius": m}

    def sr(W: Tensor) -> tuple[float, float]:
        return float(torch.linalg.matrix_norm(W, ord=2)), float(torch.linalg.eigvals(W).abs().max())

    W = p["W_hh"]
    if cell not in GATE_NAMES:
        s, r = sr(W)
        return {"sigma_max": s, "radius": r}
    out: dict[str, float] = {}
    gates = GATE_NAMES[cell]
    for gate, block in zip(gates, W.chunk(len(gates), dim=0), strict=True):
        out[f"sigma_max_{gate}"], out[f"radius_{gate}"] = sr(block)
    out["sigma_max"] = max(out[f"sigma_max_{g}"] for g in gates)
    out["radius"] = max(out[f"radius_{g}"] for g in gates)
    return out


def pascanu_log10_bound(params: Params, T: int) -> float | None:
    """log10 of (gamma * sigma_max)^(T-1), or ``None`` for gated cells (no single |phi'| bound applies).

    Pascanu, Mikolov, Bengio 2013 (section 2.1, eq. 5-7): for a loss term at step T only, dL/dh_k =
    (J_{k+1}^T ... J_T^T) dL/dh_T and ||J_t|| <= gamma sigma_max, so ||dL/dh_k|| <= (gamma sigma_max)^(T-k)
    ||dL/dh_T||. Pass ``T`` = the profile's :attr:`Profile.reference_step` r: before the memory window no
    loss term acts, so the long-range profile satisfies the same inequality from r, and this is an upper
    bound on ``summarize(...)["log10_ratio"]``. It is *not* a bound on a total profile with a loss term
    at every step (copy's ``h_total``): the direct term at step 1 alone can exceed it."""
    gamma = cells.activation_gamma(params["cell"])
    if gamma is None:
        return None
    s = gamma * spectrum(params)["sigma_max"]
    if T <= 1:
        return 0.0
    return (T - 1) * math.log10(s) if s > 0 else float("-inf")


def gate_log10_bound(params: Params, x: Tensor, T: int) -> float | None:
    """What replaces Pascanu's bound for mingru (``spectral/gate_log10_bound``): log10 of the product over
    steps 2..T of the largest retention max (1 - z_t) on the input ``x`` (a theorem: J_t = diag(1 - z_t));
    ``None`` for every other cell. ``T``: the profile's reference step, as for :func:`pascanu_log10_bound`."""
    if params["cell"] != "mingru":
        return None
    with exact_denormals():
        return modern.gate_log10_bound(as_float64(params), x.detach().to(torch.float64), T)


def jacobian_log10_bound(params: Params, x: Tensor, T: int, restore_flush: bool | None = None) -> float:
    """The per-step Jacobian-norm bound (``spectral/jacobian_log10_bound``, logged for lem, where
    Pascanu's bound has no counterpart): sum over t = 2..T of log10 max_b ||J_{t,b}||_2 along the
    trajectory of the input ``x`` ``[B, T', I]``, J_{t,b} the exact step Jacobian of sequence b (built by
    the hand-written tangent :func:`pipeline.bptt.twin.step_jvp` applied to the identity: one batched
    [B, S, S] matrix per step, S the state width) and ||.||_2 its largest singular value.

    A theorem for every cell: before the memory window dL/dh_1 = J_2^T ... J_T^T dL/dh_T, and over the
    batch ||(J_{t,b}^T v_b)_b||_F <= max_b ||J_{t,b}||_2 ||(v_b)_b||_F, so the long-range profile's log10
    ratio from the reference step ``T`` is at most this sum. It is tight when one direction is stretched
    most at every step and carries the gradient (a diagonal J with equal moduli). Cost: one symmetric
    eigensolve of each step's [B, S, S] Jacobian Gram matrices (S = 2H for lem): about 70 ms per step at B = 32, H = 64 on
    one CPU thread (measured under load), 7 s per profile pass at T = 100: the price of exactness."""
    p = as_float64(params)
    x = x.detach().to(torch.float64)
    if T <= 1:
        return 0.0
    B = x.shape[0]
    state = cells.init_state(p, B, torch.float64, x.device)
    sizes = [s.shape[1] for s in state]
    eye = torch.eye(sum(sizes), dtype=torch.float64, device=x.device).expand(B, -1, -1)
    tangents = tuple(torch.split(eye, sizes, dim=-1))  # parts [B, S, size]: row i is the basis vector e_i
    logs = []
    with exact_denormals(restore_flush), torch.no_grad():
        for t, gi in enumerate(cells.input_projection(p, x[:, :T]).unbind(1), start=1):
            state, cache = cells.step_cached(p, gi, state)
            if t >= 2:  # row i of the result is J_t e_i: the matrix J_t^T, whose norm is J_t's
                jt = torch.cat(cells.step_jvp(p, tuple(c.unsqueeze(1) for c in cache), tangents), dim=-1)
                # ||J||_2^2 = the largest eigenvalue of the Gram matrix J^T J (measured 1.5-2x faster
                # than an SVD of J here; float64 keeps it to about 1e-16 relative)
                top = torch.linalg.eigvalsh(jt @ jt.mT)[..., -1].amax()
                logs.append(0.5 * torch.log10(top))
        return float(torch.stack(logs).sum()) if logs else 0.0


# ---------------------------------------------------------------------------------------------------
# Largest Lyapunov exponent


def lyapunov_max(
    params: Params, x: Tensor, burn_in: int | None = None, seed: int = 0, restore_flush: bool | None = None
) -> float:
    """Largest Lyapunov exponent lambda_1 (nats per step) of the state dynamics driven by ``x``.

    QR / renormalisation method with one tangent vector (Benettin et al. 1980; Engelken, Wolf, Abbott
    2023 "gradient flossing"): q_t = J_t q_{t-1} / ||J_t q_{t-1}||, lambda_1 = mean over steps after the
    burn-in and over the batch of ln ||J_t q_{t-1}||. Each batch element has its own random unit tangent
    (seeded generator); J_t q is exact, by the hand-written tangent :func:`pipeline.bptt.twin.step_jvp`.
    LSTM: the state (h, c) is one vector. ``burn_in`` defaults to min(T // 10, 10) steps (q aligns with
    the leading direction). A tangent annihilated during the burn-in (J_t q = 0: at step 1 from h_0 = 0
    every relu unit can be dead, or every gate saturated) is drawn again, so the exponent describes the
    steps after the burn-in. One annihilated after it gives its batch element -inf, as it should: for a
    generic start that happens only where the product of the window's Jacobians is zero (every
    perturbation of that sequence is lost). The mean is over the other elements, as the profile's norm over
    the batch is not zero while one sequence's gradient is: -inf only if every element's tangent is lost
    (a saturated GRU or a relu net dead for a stretch of its inputs reads the sequences that carry).
    If the forward state overflows float64 (relu growth at long T), each batch element averages over
    its steps before the overflow; NaN if no element has a finite step after the burn-in.
    Cost: about one plain forward pass plus one matmul per step.

    The diagonal cells (lru, mingru) need no tangent: J_t = diag(d_t), so the largest finite-time
    exponent of the window's product is exactly max_j mean_t ln|d_tj| per batch element (lru: ln max
    |lambda_j| whatever the input). One tangent approaches it only as fast as it turns towards the slowest
    channel, which for the lru's ring (moduli in [0.9, 0.999]) takes far longer than a sequence: at T = 100
    it read -0.0143 where the exact value is -0.00142.
    """
    p = as_float64(params)
    x = x.detach().to(torch.float64)
    B, T = x.shape[0], x.shape[1]
    burn = min(T // 10, 10) if burn_in is None else int(burn_in)
    if T - burn < 1:
        raise ValueError(f"need more steps than the burn-in ({burn}), got T={T}")
    if p["cell"] in DIAGONAL_CELLS:
        return float(modern.log_retention(p, x[:, burn:]).mean(dim=1).amax(dim=1).mean())
    gen = torch.Generator(device=x.device).manual_seed(seed)
    state = cells.init_state(p, B, torch.float64, x.device)
    q = tuple(torch.randn(s.shape, generator=gen, dtype=torch.float64, device=x.device) for s in state)

    def row_norm(parts: Sequence[Tensor]) -> Tensor:  # per batch element, scaled (max-abs first)
        m = functools.reduce(torch.maximum, [v.abs().amax(dim=1) for v in parts])
        ms = nonzero_or_one(m)[:, None]
        return m * torch.sqrt(functools.reduce(torch.add, [((v / ms) ** 2).sum(dim=1) for v in parts]))

    n = row_norm(q)
    q = tuple(v / n[:, None] for v in q)
    acc = torch.zeros(B, dtype=torch.float64, device=x.device)
    count = torch.zeros(B, dtype=torch.float64, device=x.device)
    alive = torch.ones(B, dtype=torch.bool, device=x.device)  # state still finite (no forward overflow)
    with exact_denormals(restore_flush), torch.no_grad():
        for t, gi in enumerate(cells.input_projection(p, x).unbind(1)):
            # J_t q is exact: the hand-written forward-mode tangent of the step (cells.step_jvp).
            state, cache = cells.step_cached(p, gi, state)
            alive &= functools.reduce(torch.logical_and, [torch.isfinite(s).all(dim=1) for s in state])
            jq = cells.step_jvp(p, cache, q)
            n = row_norm(jq)
            q = tuple(v / nonzero_or_one(n)[:, None] for v in jq)
            if t < burn and bool((n == 0).any()):  # annihilated in the burn-in: a new start
                fresh = tuple(
                    torch.randn(v.shape, generator=gen, dtype=torch.float64, device=x.device) for v in q
                )
                nf = row_norm(fresh)
                q = tuple(
                    torch.where((n == 0)[:, None], f / nf[:, None], v) for f, v in zip(fresh, q, strict=True)
                )
            if t >= burn:
                # Steps after a forward overflow have no Jacobian (inf - inf = NaN in the state): only
                # the finite stretch counts, so a growing relu net reads ln(growth) > 0, not -inf.
                acc += torch.where(alive, torch.log(n), torch.zeros_like(n))
                count += alive
    ok = count > 0
    if not bool(ok.any()):
        return float("nan")
    per_element = acc[ok] / count[ok]
    # as the profile's norm over the batch: one lost sequence is not all of them
    kept = per_element[torch.isfinite(per_element)]
    return float((kept if kept.numel() else per_element).mean())
