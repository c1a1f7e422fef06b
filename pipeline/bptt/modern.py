"""The float64 twin of the modern diagonal linear recurrences ``lru`` and ``mingru`` (dispatched from
:mod:`pipeline.bptt.twin`, whose functions and contract this module follows).

Both are h_t = a_t * h_{t-1} + b_t elementwise, so the step Jacobian is diagonal and known exactly:

* ``lru``, the Linear Recurrent Unit (Orvieto, Smith, Gu, Fernando, Gulcehre, Pascanu, De 2023,
  "Resurrecting Recurrent Neural Networks for Long Sequences", eq. 3-7): h_t = lambda * h_{t-1} +
  gamma * (B x_t) with lambda = exp(-exp(nu_log) + i exp(theta_log)) complex and diagonal,
  gamma = exp(gamma_log), and the output y_t = Re(C h_t) + D x_t. dh_t/dh_{t-1} = diag(lambda).
* ``mingru`` (Feng, Tung, Ahmed, Bengio, Hajimirsadeghi 2024, "Were RNNs All We Needed?", section 3.1):
  z_t = sigmoid(W_z x_t + b_z), h~_t = g(W_h x_t + b_h) with g(x) = x + 0.5 (x >= 0) else sigmoid(x),
  h_t = (1 - z_t) h_{t-1} + z_t h~_t. dh_t/dh_{t-1} = diag(1 - z_t), with 0 < 1 - z_t < 1.

Every tensor stays real: the lru's complex state of N channels is carried as the real vector
``[Re h, Im h]`` of width 2N, and lambda acts on each (Re, Im) pair as the 2 x 2 block
[[a, -b], [b, a]] (lambda = a + i b), whose singular values are both |lambda|. So ||dL/dh_t|| in the
profile is the Euclidean norm over the complex state's real and imaginary parts (over the batch too), and
the per-channel gradient, read as dL/dRe h + i dL/dIm h, propagates back as conj(lambda) times itself.

Params (:meth:`pipeline.training.models.RNNModel.params`)::

    lru:    "nu_log", "theta_log", "gamma_log": [N]; "B_re", "B_im": [N, I]; "C_re", "C_im": [H, N];
            "D": [H, I]; "W_out": [O, H], "b_out": [O]       (N = H = model.hidden_size)
    mingru: "W_ih": [2H, I] = [W_z; W_h], "b_ih": [2H] = [b_z; b_h]; "W_out": [O, H], "b_out": [O]

The lru's readout reads y_t (width H), which needs x_t for the feed-through D x_t: :func:`readout`
takes the input of the same steps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
State = tuple[Tensor, ...]
Params = dict[str, Any]
Cache = tuple[Tensor, ...]


def lam(p: Params) -> tuple[Tensor, Tensor]:
    """(Re lambda, Im lambda), each [N]: lambda = exp(-exp(nu_log)) * exp(i exp(theta_log))."""
    mod = torch.exp(-torch.exp(p["nu_log"]))
    phase = torch.exp(p["theta_log"])
    return mod * torch.cos(phase), mod * torch.sin(phase)


def modulus(p: Params) -> Tensor:
    """|lambda_j| = exp(-exp(nu_log_j)), [N] (no cos/sin round-off)."""
    return torch.exp(-torch.exp(p["nu_log"]))


def g(x: Tensor) -> Tensor:
    """minGRU's candidate activation g (Feng et al. 2024, section 3.1.1): positive everywhere, so the
    log-space scan applies; x + 0.5 for x >= 0, sigmoid(x) below (continuous at 0, both 0.5)."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def hidden_size(p: Params) -> int:
    """Width of the real state vector: 2N for lru ([Re h, Im h]), H for mingru."""
    if p["cell"] == "lru":
        return 2 * int(p["nu_log"].shape[0])
    return int(p["W_ih"].shape[0]) // 2


def reference_tensor(p: Params) -> Tensor:
    """A weight whose dtype and device the state takes."""
    ref: Tensor = p["nu_log"] if p["cell"] == "lru" else p["W_ih"]
    return ref


def input_projection(p: Params, x: Tensor) -> Tensor:
    """lru: gamma * (B x_t) as [Re, Im] (``[..., 2N]``); mingru: [W_z x + b_z, W_h x + b_h] (``[..., 2H]``)."""
    if p["cell"] == "lru":
        gamma = torch.exp(p["gamma_log"])[:, None]
        return F.linear(x, torch.cat([gamma * p["B_re"], gamma * p["B_im"]]))
    return F.linear(x, p["W_ih"], p["b_ih"])


def _lru_apply(a: Tensor, b: Tensor, h: Tensor) -> Tensor:
    """lambda * h for h = [Re, Im]: (a Re - b Im, b Re + a Im)."""
    re, im = h.chunk(2, dim=-1)
    return torch.cat([a * re - b * im, b * re + a * im], dim=-1)


def step_cached(p: Params, gi: Tensor, state: State) -> tuple[State, Cache]:
    """One step from the input projection ``gi``; the cache holds what the Jacobian needs: nothing for lru
    (lambda is a weight), the retention 1 - z_t for mingru."""
    (h,) = state
    if p["cell"] == "lru":
        a, b = lam(p)
        return (_lru_apply(a, b, h) + gi,), ()
    k, c = gi.chunk(2, dim=-1)
    # 1 - sigmoid(k) computed as sigmoid(-k): exact where z rounds to 1 (no cancellation).
    keep, z = torch.sigmoid(-k), torch.sigmoid(k)
    return (keep * h + z * g(c),), (keep,)


def step_vjp(p: Params, cache: Cache, v: State) -> tuple[State, None]:
    """J_t^T v: lru conj(lambda) v per channel, i.e. (a vRe + b vIm, -b vRe + a vIm); mingru (1 - z_t) v."""
    if p["cell"] == "lru":
        a, b = lam(p)
        return (_lru_apply(a, -b, v[0]),), None
    (keep,) = cache
    return (keep * v[0],), None


def step_jvp(p: Params, cache: Cache, q: State) -> State:
    """J_t q: lru lambda q per channel; mingru (1 - z_t) q."""
    if p["cell"] == "lru":
        a, b = lam(p)
        return (_lru_apply(a, b, q[0]),)
    (keep,) = cache
    return (keep * q[0],)


def readout(p: Params, h: Tensor, x: Tensor | None) -> Tensor:
    """The model's output from the state (``[B, width]`` or ``[B, T, width]``) and, for lru, the input of
    the same steps: W_out y + b_out with y = Re(C h) + D x (lru) or y = h (mingru)."""
    if p["cell"] == "lru":
        if x is None:
            raise ValueError("the lru readout reads y_t = Re(C h_t) + D x_t: pass x_t")
        re, im = h.chunk(2, dim=-1)
        h = F.linear(re, p["C_re"]) - F.linear(im, p["C_im"]) + F.linear(x, p["D"])
    return F.linear(h, p["W_out"], p["b_out"])


def spectrum(p: Params) -> dict[str, float]:
    """lru: the recurrence is diag(lambda), so sigma_max = radius = max |lambda_j|. mingru: no recurrent
    matrix (its Jacobian diag(1 - z_t) depends on the input alone): no spectrum; its bound is
    :func:`gate_log10_bound`."""
    if p["cell"] == "lru":
        m = float(modulus(p).max())
        return {"sigma_max": m, "radius": m}
    return {}


def log_retention(p: Params, x: Tensor) -> Tensor:
    """ln |d_tj| of the diagonal Jacobian J_t = diag(d_t) at each step of ``x`` ``[B, T, I]``: ``[B, T, N]``.
    lru: ln |lambda_j| = -exp(nu_log_j) exactly, the same at every step; mingru: ln(1 - z_t) =
    logsigmoid(-k_t), finite however saturated the gate (log of sigmoid(-k) is -inf from k ~ 745)."""
    if p["cell"] == "lru":
        return (-torch.exp(p["nu_log"])).expand(x.shape[0], x.shape[1], -1)
    k = input_projection(p, x).chunk(2, dim=-1)[0]
    return F.logsigmoid(-k)


def gate_log10_bound(p: Params, x: Tensor, r: int) -> float:
    """minGRU's replacement for Pascanu's bound, on input ``x`` ``[B, T, I]``: the sum over t = 2..r of
    log10 max_{b, j} (1 - z_t). J_t = diag(1 - z_t) exactly, so ||J_t^T v|| <= max (1 - z_t) ||v|| for
    every v (also the Frobenius norm over a batch): an upper bound on the profile's log10 ratio from r,
    a theorem, and never positive since 1 - z < 1."""
    if r <= 1:
        return 0.0
    k = input_projection(p, x[:, 1:r]).chunk(2, dim=-1)[0]  # steps 2..r
    keep = torch.sigmoid(-k).amax(dim=(0, 2))  # [r - 1]
    return float(torch.log10(keep).sum())


def lru_sensitivity(
    p: Params, x: Tensor, y: Tensor, loss_fn: Any, readout_mode: str, window: tuple[int, int]
) -> dict[str, float]:
    """How strongly the window loss L_w depends on the lru's recurrence parameters, per unit of its
    gradient on the state at the window's first step a (Zucchet & Orvieto 2024, arXiv 2405.21064: as
    |lambda| -> 1 the state's sensitivity to lambda explodes, E|dh/dlambda|^2 = (1 + |lambda|^2) /
    (1 - |lambda|^2)^3 for white input, while dL/dh does not).

    R_t = dh_t/dlambda obeys R_t = lambda R_{t-1} + h_{t-1} (R_0 = 0), so without any backward walk
    dL_w/dlambda = sum_t D_t conj(R_t) per channel (D_t = dL_w/dRe h_t + i dL_w/dIm h_t, the direct terms
    of the window's steps), and by the chain rule dL/dnu = Re(conj(dlambda/dnu) dL/dlambda) with
    dlambda/dnu = -exp(nu) lambda, dlambda/dtheta_log = i exp(theta_log) lambda. Returns
    ``lambda_log10_sensitivity`` = log10 ||dL_w/dlambda|| / ||dL_w/dh_a|| and
    ``recurrent_log10_sensitivity``, the same for the trained parameters (nu_log, theta_log): the LRU's
    exponential parametrisation scales the first by |dlambda/dnu| ~ 1 - |lambda|, which keeps the second
    bounded as |lambda| -> 1. float64 throughout; the window's terms are rescaled by their largest."""
    a, b = lam(p)
    h = torch.zeros(x.shape[0], hidden_size(p), dtype=x.dtype, device=x.device)
    R = torch.zeros_like(h)
    hs, Rs = [], []
    with torch.no_grad():
        for gi in input_projection(p, x).unbind(1):
            R = _lru_apply(a, b, R) + h  # uses h_{t-1}
            h = _lru_apply(a, b, h) + gi
            hs.append(h)
            Rs.append(R)
    lo, hi = window
    with torch.enable_grad():
        H = torch.stack(hs[lo - 1 : hi], dim=1).requires_grad_()
        if readout_mode == "last":
            out = readout(p, H[:, -1], x[:, -1])
            D = torch.autograd.grad(loss_fn(out, y), H)[0]
        else:  # the window's terms of a per-step loss: the full loss's gradient at the window's states
            full = torch.stack(hs, dim=1).requires_grad_()
            D = torch.autograd.grad(loss_fn(readout(p, full, x), y), full)[0][:, lo - 1 : hi]
    m = D.abs().max()
    if not bool(m > 0):
        return {"lambda_log10_sensitivity": float("nan"), "recurrent_log10_sensitivity": float("nan")}
    Dn = D / m
    d_re, d_im = Dn.chunk(2, dim=-1)
    r_re, r_im = torch.stack(Rs[lo - 1 : hi], dim=1).chunk(2, dim=-1)
    g_re = (d_re * r_re + d_im * r_im).sum(dim=(0, 1))  # Re sum D conj(R), per channel
    g_im = (d_im * r_re - d_re * r_im).sum(dim=(0, 1))
    e_nu, e_th = torch.exp(p["nu_log"]), torch.exp(p["theta_log"])
    # dlambda/dnu = -e_nu (a + ib); dlambda/dtheta_log = e_th (-b + ia); dL/ds = Re(conj(dlambda/ds) G)
    d_nu = -e_nu * (a * g_re + b * g_im)
    d_th = e_th * (-b * g_re + a * g_im)
    # ||dL_w/dh_a||: the state gradient at a, a direct term plus what later window steps send back
    v = Dn[:, -1]
    for t in range(hi - 1, lo - 1, -1):
        v = _lru_apply(a, -b, v) + Dn[:, t - lo]
    base = torch.log10(torch.linalg.vector_norm(v))
    return {
        "lambda_log10_sensitivity": float(torch.log10(torch.hypot(g_re, g_im).norm()) - base),
        "recurrent_log10_sensitivity": float(torch.log10(torch.cat([d_nu, d_th]).norm()) - base),
    }
