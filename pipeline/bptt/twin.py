"""Functional recurrent cells: the unrolled twin of the fused torch modules, over a params dict.

Training runs the fused kernels (``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``, cuDNN or oneDNN); the BPTT
diagnostics (:mod:`pipeline.bptt.profile`) need the state at every step and per-step Jacobians, so they run this
step-by-step twin on the *same* weights. ``step`` reproduces PyTorch's equations exactly (checked to
1e-12 in float64 by ``tests/test_bptt.py``).

The params dict is the contract with ``pipeline/training/models.py``::

    params = {
        "cell": "tanh" | "relu" | "orthogonal" | "lstm" | "gru" | "indrnn",
        "W_ih": [G*H, I], "b_ih": [G*H],      # all cells
        "W_hh": [G*H, H], "b_hh": [G*H],      # all but indrnn (orthogonal: the effective g*Q)
        "u": [H],                             # indrnn only
        "W_out": [O, H], "b_out": [O],        # linear readout
    }

with G = 1 (tanh, relu, orthogonal, indrnn), 4 (lstm, gates i, f, g, o) or 3 (gru, gates r, z, n), in
PyTorch's gate order. Inputs are batch-first ``[B, T, I]``; the initial state is zeros. The modern
diagonal cells ``lru`` and ``mingru`` have their own entries and live in :mod:`pipeline.bptt.modern`,
``lem`` and ``cornn`` (state [y, z] as one vector) in :mod:`pipeline.bptt.lem` and :mod:`pipeline.bptt.cornn`;
every function here dispatches to them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pipeline.bptt import cornn, lem, modern
from pipeline.bptt.dphi import sigmoid_prime, tanh_prime
from pipeline.names import CELLS, DIAGONAL_CELLS, ODE_CELLS

Tensor = torch.Tensor
State = tuple[Tensor, ...]
Params = dict[str, Any]  # the contract above: "cell" (a str) and tensors
Cache = tuple[Tensor, ...]  # one step's derivative factors (step_cached), for step_vjp / step_jvp

# Gate names in PyTorch's row-block order of W_ih / W_hh (torch.nn.LSTM / torch.nn.GRU docs).


def _cell(cell_or_params: str | Params) -> str:
    cell = str(cell_or_params["cell"]) if isinstance(cell_or_params, dict) else cell_or_params
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; expected one of {', '.join(CELLS)}")
    return cell


def state_names(cell: str | Params) -> tuple[str, ...]:
    """Names of the state tensors carried from step to step: ``("h", "c")`` for LSTM, else ``("h",)``."""
    return ("h", "c") if _cell(cell) == "lstm" else ("h",)


def hidden_size(params: Params) -> int:
    """Width of the state vector h (lru: 2N, its complex state as [Re h, Im h]; lem: 2H, [y, z])."""
    if params["cell"] in ODE_CELLS:
        return 2 * (lem.width if params["cell"] == "lem" else cornn.width)(params)
    if params["cell"] in DIAGONAL_CELLS:
        return modern.hidden_size(params)
    return int(params["W_ih"].shape[0]) // (
        4 if params["cell"] == "lstm" else 3 if params["cell"] == "gru" else 1
    )


def init_state(
    params: Params, batch: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> State:
    """Zero initial state (as the fused modules use when ``hx`` is not given)."""
    ref = modern.reference_tensor(params) if params["cell"] in DIAGONAL_CELLS else params["W_ih"]
    dtype = dtype or ref.dtype
    device = device if device is not None else ref.device
    h = torch.zeros(batch, hidden_size(params), dtype=dtype, device=device)
    return tuple(torch.zeros_like(h) for _ in state_names(params))


def activation_gamma(cell: str | Params) -> float | None:
    """Bound on |phi'| for Pascanu's theorem (Pascanu, Mikolov, Bengio 2013, section 2.1).

    tanh and relu both have |phi'| <= 1 (IndRNN: relu with a diagonal recurrence, Li 2018); lru's phi is
    the identity (J = diag(lambda) exactly). Gated cells have no single activation between states, so the
    theorem does not apply: ``None``; nor for mingru, which has no recurrent matrix (its J_t = diag(1 - z_t)
    is bounded by :func:`pipeline.bptt.modern.gate_log10_bound` instead), nor for lem (its J_t mixes four
    matrices with its gates: :func:`pipeline.bptt.spectra.jacobian_log10_bound`), nor for cornn (likewise).
    """
    return None if _cell(cell) in ("lstm", "gru", "mingru", *ODE_CELLS) else 1.0


def input_projection(params: Params, x: Tensor) -> Tensor:
    """``x W_ih^T + b_ih`` for all steps at once (``[B, T, G*H]``): one matmul instead of T small ones."""
    if params["cell"] in DIAGONAL_CELLS:
        return modern.input_projection(params, x)
    return F.linear(x, params["W_ih"], params["b_ih"])


def step(params: Params, x_t: Tensor, state: State) -> State:
    """One step ``state_{t-1} -> state_t`` for input ``x_t`` ``[B, I]``; same equations as PyTorch."""
    return step_projected(params, input_projection(params, x_t), state)


def step_projected(params: Params, gi: Tensor, state: State) -> State:
    """:func:`step` given the input projection ``gi = x_t W_ih^T + b_ih`` (``[B, G*H]``)."""
    cell = _cell(params)
    if cell in DIAGONAL_CELLS:
        return modern.step_cached(params, gi, state)[0]
    if cell in ODE_CELLS:
        return (lem.step_cached if cell == "lem" else cornn.step_cached)(params, gi, state)[0]
    if cell == "indrnn":
        # IndRNN (Li et al. 2018, eq. 2): h_t = relu(W x_t + b + u * h_{t-1}), u elementwise.
        (h,) = state
        return (torch.relu(gi + params["u"] * h),)
    h = state[0]
    gh = F.linear(h, params["W_hh"], params["b_hh"])
    if cell in ("tanh", "orthogonal"):
        # nn.RNN: h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh); orthogonal = expRNN's W = g*Q
        # (Lezcano-Casado & Martinez-Rubio 2019) with a tanh activation.
        return (torch.tanh(gi + gh),)
    if cell == "relu":
        return (torch.relu(gi + gh),)
    if cell == "lstm":
        # nn.LSTM: gates i, f, g, o; c' = f*c + i*g; h' = o*tanh(c').
        c = state[1]
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return (torch.sigmoid(o) * torch.tanh(c_new), c_new)
    # gru, exactly nn.GRU: r and z from summed pre-activations; the reset gate multiplies
    # (W_hn h + b_hn), not h; h' = (1 - z) * n + z * h.
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return ((1 - z) * n + z * h,)


def unroll(params: Params, x: Tensor, state: State | None = None) -> list[State]:
    """Run all T steps of ``x`` ``[B, T, I]``; returns ``[state_1, ..., state_T]``."""
    if state is None:
        state = init_state(params, x.shape[0], x.dtype, x.device)
    states = []
    for gi in input_projection(params, x).unbind(1):  # unbind: views, no per-step indexing in the graph
        state = step_projected(params, gi, state)
        states.append(state)
    return states


def readout(params: Params, h: Tensor, x: Tensor | None = None) -> Tensor:
    """Linear readout ``h @ W_out^T + b_out``; ``h`` may be ``[B, H]`` or ``[B, T, H]``. ``x``: the input
    of the same steps, read only by lru (its output y_t = Re(C h_t) + D x_t feeds the readout); lem's
    readout reads y, the first half of its state [y, z]."""
    if params["cell"] in DIAGONAL_CELLS:
        return modern.readout(params, h, x)
    if params["cell"] in ODE_CELLS:
        return (lem.readout if params["cell"] == "lem" else cornn.readout)(params, h)
    return F.linear(h, params["W_out"], params["b_out"])


# ---------------------------------------------------------------------------------------------------
# Hand-written vector-Jacobian products: the profile's backward walk without per-step autograd overhead
# (about 2-3x faster than torch.autograd.grad per step for LSTM). Checked against full-graph autograd in
# tests/test_bptt.py. Each returns J_t^T v for the state, i.e. dL/dstate_{t-1} from dL/dstate_t.


def step_cached(params: Params, gi: Tensor, state: State) -> tuple[State, Cache]:
    """:func:`step_projected` plus what :func:`step_vjp` and :func:`step_jvp` need (not graphs): the
    activations' derivatives taken from the pre-activations (:mod:`pipeline.bptt.dphi`: exact in
    saturation, where ``1 - tanh^2`` of the output rounds to 0), multiplied into the factors J_t uses.

    tanh: ``(tanh'(a),)``. lstm: ``(o tanh'(c), g sigmoid'(a_i), c_prev sigmoid'(a_f), i tanh'(a_g),
    tanh(c) sigmoid'(a_o), f)``. gru: ``(z, (1 - z) tanh'(a_n), h_n sigmoid'(a_r), (h - n) sigmoid'(a_z),
    r)``."""
    cell = _cell(params)
    if cell in DIAGONAL_CELLS:
        return modern.step_cached(params, gi, state)
    if cell in ODE_CELLS:
        return (lem.step_cached if cell == "lem" else cornn.step_cached)(params, gi, state)
    if cell == "indrnn":
        h = torch.relu(gi + params["u"] * state[0])
        return (h,), (h,)
    h = state[0]
    gh = F.linear(h, params["W_hh"], params["b_hh"])
    if cell in ("tanh", "orthogonal"):
        a = gi + gh
        return (torch.tanh(a),), (tanh_prime(a),)
    if cell == "relu":
        h_new = torch.relu(gi + gh)
        return (h_new,), (h_new,)
    if cell == "lstm":
        a_i, a_f, a_g, a_o = (gi + gh).chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(a_i), torch.sigmoid(a_f), torch.tanh(a_g), torch.sigmoid(a_o)
        c_new = f * state[1] + i * g
        tc = torch.tanh(c_new)
        cache: Cache = (
            o * tanh_prime(c_new),
            g * sigmoid_prime(a_i),
            state[1] * sigmoid_prime(a_f),
            i * tanh_prime(a_g),
            tc * sigmoid_prime(a_o),
            f,
        )
        return (o * tc, c_new), cache
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    a_r, a_z = i_r + h_r, i_z + h_z
    r, z = torch.sigmoid(a_r), torch.sigmoid(a_z)
    a_n = i_n + r * h_n
    n = torch.tanh(a_n)
    gru_cache: Cache = (
        z,
        (1 - z) * tanh_prime(a_n),
        h_n * sigmoid_prime(a_r),
        (h - n) * sigmoid_prime(a_z),
        r,
    )
    return ((1 - z) * n + z * h,), gru_cache


def step_vjp(params: Params, cache: Cache, v: State) -> tuple[State, Tensor | None]:
    """``(J_t^T v, total dL/dc_t)`` for the step that produced ``cache``; the second item is LSTM-only.

    For LSTM, ``v = (v_h, v_c)`` are the gradients reaching (h_t, c_t) from later steps; the total
    gradient of c_t adds the path through h_t = o * tanh(c_t) (Graves 2012, LSTM backward pass).
    """
    cell = _cell(params)
    if cell in DIAGONAL_CELLS:
        return modern.step_vjp(params, cache, v)
    if cell in ODE_CELLS:
        return (lem.step_vjp if cell == "lem" else cornn.step_vjp)(params, cache, v)
    if cell == "indrnn":
        (h_new,) = cache
        return (v[0] * (h_new > 0) * params["u"],), None
    W = params["W_hh"]
    if cell in ("tanh", "orthogonal"):
        (d,) = cache
        return ((v[0] * d) @ W,), None
    if cell == "relu":
        (h_new,) = cache
        return ((v[0] * (h_new > 0)) @ W,), None
    if cell == "lstm":
        o_dtc, g_di, c_df, i_dg, tc_do, f = cache
        v_h, v_c = v
        dc = v_c + v_h * o_dtc
        da = torch.cat([dc * g_di, dc * c_df, dc * i_dg, v_h * tc_do], dim=-1)
        return (da @ W, dc * f), dc
    z, keep_dn, hn_dr, hn_dz, r = cache
    (v_h,) = v
    da_n = v_h * keep_dn
    dgh = torch.cat([da_n * hn_dr, v_h * hn_dz, da_n * r], dim=-1)
    return (v_h * z + dgh @ W,), None


def step_jvp(params: Params, cache: Cache, q: State) -> State:
    """``J_t q``: the tangent of the step that produced ``cache`` along ``q`` (forward mode, by hand).

    Used by :func:`pipeline.bptt.spectra.lyapunov_max`; checked against ``torch.func.jvp`` in the tests.
    """
    cell = _cell(params)
    if cell in DIAGONAL_CELLS:
        return modern.step_jvp(params, cache, q)
    if cell in ODE_CELLS:
        return (lem.step_jvp if cell == "lem" else cornn.step_jvp)(params, cache, q)
    if cell == "indrnn":
        (h_new,) = cache
        return ((h_new > 0) * params["u"] * q[0],)
    W = params["W_hh"]
    if cell in ("tanh", "orthogonal"):
        (d,) = cache
        return (d * (q[0] @ W.T),)
    if cell == "relu":
        (h_new,) = cache
        return ((h_new > 0) * (q[0] @ W.T),)
    if cell == "lstm":
        o_dtc, g_di, c_df, i_dg, tc_do, f = cache
        d_i, d_f, d_g, d_o = (q[0] @ W.T).chunk(4, dim=-1)
        dc = c_df * d_f + f * q[1] + g_di * d_i + i_dg * d_g
        return (tc_do * d_o + o_dtc * dc, dc)
    z, keep_dn, hn_dr, hn_dz, r = cache
    d_r, d_z, d_n = (q[0] @ W.T).chunk(3, dim=-1)
    return (keep_dn * (hn_dr * d_r + r * d_n) + z * q[0] + hn_dz * d_z,)
