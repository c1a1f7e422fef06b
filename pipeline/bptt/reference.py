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
and indrnn, and the diagonal cells lru and mingru (below). Gated cells return ``None``.

The diagonal cells have their own recursion, written from the papers' equations in numpy, sharing no code
with the twin's real [Re, Im] blocks: lru in complex arithmetic (Orvieto et al. 2023: h_t = lambda h_{t-1}
+ gamma B x_t, so the gradient g = dL/dRe h + i dL/dIm h goes back as g_{t-1} = conj(lambda) g_t, each
channel by exactly |lambda_j| per step); mingru with dL/dh_{t-1} = (1 - z_t) dL/dh_t, z_t = sigmoid(W_z x_t
+ b_z) from the input alone (Feng et al. 2024): the profile is the product of the retentions 1 - z along
the batch.

lem has its own too (:func:`_lem_log10`): the step Jacobian J_t = d(y_t, z_t)/d(y_{t-1}, z_{t-1}) built
as an explicit [B, 2H, 2H] matrix, block by block, by the chain rule written from Rusch, Erichson, Mahoney
2022's eq. 3 (no vector-Jacobian product), and the gradient carried back as d_{t-1} = J_t^T d_t; cornn
the same way from Rusch & Mishra 2021's eq. 3.
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

SUPPORTED = ("tanh", "orthogonal", "relu", "indrnn", "lru", "mingru", "lem", "cornn")


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
    if cell in ("lru", "mingru"):
        return _diagonal_log10(p, x, y, loss_fn)
    if cell in ("lem", "cornn"):
        return _lem_log10(p, x.numpy(), y, loss_fn)
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


def _lru_last(p: Params, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """lambda [N] (complex) and h_T [B, N] (complex) by the plain recursion."""
    nu, theta = p["nu_log"].numpy(), p["theta_log"].numpy()
    lam = np.exp(-np.exp(nu) + 1j * np.exp(theta))
    B_c = np.exp(p["gamma_log"].numpy())[:, None] * (p["B_re"].numpy() + 1j * p["B_im"].numpy())
    h = np.zeros((x.shape[0], nu.shape[0]), dtype=np.complex128)
    for t in range(x.shape[1]):
        h = lam * h + x[:, t] @ B_c.T
    return lam, h


def _mingru_last(p: Params, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The retentions 1 - z_t [B, T, H] and h_T [B, H] by the plain recursion."""
    W, b = p["W_ih"].numpy(), p["b_ih"].numpy()
    H = W.shape[0] // 2
    k = x @ W[:H].T + b[:H]
    c = x @ W[H:].T + b[H:]
    keep, z = 1.0 / (1.0 + np.exp(k)), 1.0 / (1.0 + np.exp(-k))
    cand = np.where(c >= 0, c + 0.5, 1.0 / (1.0 + np.exp(-np.minimum(c, 0.0))))
    h = np.zeros((x.shape[0], H))
    for t in range(x.shape[1]):
        h = keep[:, t] * h + z[:, t] * cand[:, t]
    return keep, h


def _diagonal_log10(p: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> np.ndarray:
    """log10 ||dL/dh_t|| of a last-step loss for lru (complex state, norm over Re and Im) and mingru."""
    xn = x.numpy()
    with torch.enable_grad():
        if p["cell"] == "lru":
            lam, h_T = _lru_last(p, xn)
            re = torch.from_numpy(h_T.real.copy()).requires_grad_()
            im = torch.from_numpy(h_T.imag.copy()).requires_grad_()
            out = re @ p["C_re"].T - im @ p["C_im"].T + x[:, -1] @ p["D"].T  # y_T = Re(C h_T) + D x_T
            g_re, g_im = torch.autograd.grad(loss_fn(F.linear(out, p["W_out"], p["b_out"]), y), (re, im))
            d = g_re.numpy() + 1j * g_im.numpy()
            step = [np.conj(lam)] * x.shape[1]  # g_{t-1} = conj(lambda) g_t, the same every step
        else:
            keep, h_np = _mingru_last(p, xn)
            h_leaf = torch.from_numpy(h_np).requires_grad_()
            d = torch.autograd.grad(loss_fn(F.linear(h_leaf, p["W_out"], p["b_out"]), y), h_leaf)[0].numpy()
            step = list(keep.transpose(1, 0, 2))  # step[t] = 1 - z_{t+1} (0-based t)
    out_log = np.empty(x.shape[1])
    log_scale = 0.0
    for t in range(x.shape[1] - 1, -1, -1):
        m = float(np.abs(d).max())
        out_log[t] = (
            (log_scale + math.log(m) + 0.5 * math.log(float((np.abs(d / m) ** 2).sum()))) / math.log(10)
            if m > 0
            else -math.inf
        )
        if m > 0:
            d, log_scale = d / m, log_scale + math.log(m)
        d = step[t] * d  # dL/dh_{t-1} from dL/dh_t through step t's diagonal Jacobian
    return out_log


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * a)))  # no overflow for large |a|


def _lem_forward(p: Params, x: np.ndarray) -> tuple[list[tuple[np.ndarray, ...]], np.ndarray]:
    """Per step t = 1..T the activations its Jacobian needs (s1, s2, c_z, c_y, y_{t-1}, z_{t-1}), and y_T."""
    dt = float(p["dt"])
    V, c = p["W_ih"].numpy(), p["b_ih"].numpy()
    W, e = p["W_hh"].numpy(), p["b_hh"].numpy()
    Wy, by = p["W_y"].numpy(), p["b_y"].numpy()
    H = Wy.shape[0]
    y = np.zeros((x.shape[0], H))
    z = np.zeros_like(y)
    acts: list[tuple[np.ndarray, ...]] = []
    for t in range(x.shape[1]):
        u = x[:, t] @ V.T + c  # [B, 4H]: V1 u + b1, V2 u + b2, Vz u + bz, Vy u + by
        a = y @ W.T + e  # [B, 3H]: W1 y + b1', W2 y + b2', Wz y + bz'
        s1, s2 = _sigmoid(a[:, :H] + u[:, :H]), _sigmoid(a[:, H : 2 * H] + u[:, H : 2 * H])
        cz = np.tanh(a[:, 2 * H :] + u[:, 2 * H : 3 * H])
        z_new = (1 - dt * s1) * z + dt * s1 * cz
        cy = np.tanh(z_new @ Wy.T + by + u[:, 3 * H :])
        acts.append((s1, s2, cz, cy, y, z))
        y, z = (1 - dt * s2) * y + dt * s2 * cy, z_new
    return acts, y


def _lem_jacobian(p: Params, act: tuple[np.ndarray, ...]) -> np.ndarray:
    """The explicit step Jacobian [B, 2H, 2H] (rows (y_t, z_t), columns (y_{t-1}, z_{t-1})), block by block,
    with dt1 = dt s1, dt2 = dt s2: dz_t/dz_{t-1} = diag(1 - dt1); dz_t/dy_{t-1} = diag(dt s1 (1 - s1)
    (c_z - z)) W1 + diag(dt1 (1 - c_z^2)) Wz; dy_t/dy_{t-1} = diag(1 - dt2) + diag(dt s2 (1 - s2) (c_y - y))
    W2 + K dz_t/dy_{t-1}; dy_t/dz_{t-1} = K dz_t/dz_{t-1}, with K = dy_t/dz_t = diag(dt2 (1 - c_y^2)) Wy."""
    s1, s2, cz, cy, y, z = act
    dt, W, Wy = float(p["dt"]), p["W_hh"].numpy(), p["W_y"].numpy()
    H = Wy.shape[0]
    W1, W2, Wz = W[:H], W[H : 2 * H], W[2 * H :]
    eye = np.eye(H)
    zz = (1 - dt * s1)[:, :, None] * eye
    zy = (dt * s1 * (1 - s1) * (cz - z))[:, :, None] * W1 + (dt * s1 * (1 - cz**2))[:, :, None] * Wz
    k = (dt * s2 * (1 - cy**2))[:, :, None] * Wy
    yy = (1 - dt * s2)[:, :, None] * eye + (dt * s2 * (1 - s2) * (cy - y))[:, :, None] * W2 + k @ zy
    return np.concatenate([np.concatenate([yy, k @ zz], 2), np.concatenate([zy, zz], 2)], 1)


def _cornn_forward(p: Params, x: np.ndarray) -> tuple[list[tuple[np.ndarray, ...]], np.ndarray]:
    """cornn: per step the tanh' of its pre-activation, and y_T, by the plain recursion."""
    dt, gamma, eps = float(p["dt"]), float(p["gamma"]), float(p["epsilon"])
    V, b, W = p["W_ih"].numpy(), p["b_ih"].numpy(), p["W_hh"].numpy()
    H = V.shape[0]
    y = np.zeros((x.shape[0], H))
    z = np.zeros_like(y)
    acts: list[tuple[np.ndarray, ...]] = []
    for t in range(x.shape[1]):
        c = np.tanh(x[:, t] @ V.T + b + z @ W[:, :H].T + y @ W[:, H:].T)
        acts.append((1 - c**2,))
        z = z + dt * (c - gamma * y - eps * z)
        y = y + dt * z
    return acts, y


def _cornn_jacobian(p: Params, act: tuple[np.ndarray, ...]) -> np.ndarray:
    """cornn's step Jacobian [B, 2H, 2H]: dz_t/dy_{t-1} = dt (diag(s) W - gamma I), dz_t/dz_{t-1} = (1 -
    dt epsilon) I + dt diag(s) W_z, and y_t = y_{t-1} + dt z_t: dy_t/d(.) = [I, 0] + dt dz_t/d(.)."""
    (s,) = act
    dt, gamma, eps, W = float(p["dt"]), float(p["gamma"]), float(p["epsilon"]), p["W_hh"].numpy()
    H = W.shape[0]
    eye = np.eye(H)
    zy = dt * (s[:, :, None] * W[:, H:] - gamma * eye)
    zz = (1 - dt * eps) * eye + dt * s[:, :, None] * W[:, :H]
    return np.concatenate([np.concatenate([eye + dt * zy, dt * zz], 2), np.concatenate([zy, zz], 2)], 1)


def _lem_log10(p: Params, x: np.ndarray, y: torch.Tensor, loss_fn: LossFn) -> np.ndarray:
    """log10 ||dL/d(y_t, z_t)||_F of a last-step loss for lem and cornn, by d_{t-1} = J_t^T d_t (explicit matrices,
    each built when the walk reaches it: memory O(T B H), not O(T B H^2))."""
    cornn = p["cell"] == "cornn"
    acts, y_T = _cornn_forward(p, x) if cornn else _lem_forward(p, x)
    jacobian = _cornn_jacobian if cornn else _lem_jacobian
    with torch.enable_grad():
        leaf = torch.from_numpy(y_T).requires_grad_()
        g = torch.autograd.grad(loss_fn(F.linear(leaf, p["W_out"], p["b_out"]), y), leaf)[0].numpy()
    d = np.concatenate([g, np.zeros_like(g)], axis=1)  # the loss reads y_T alone: dL/dz_T (direct) = 0
    out, log_scale = np.empty(x.shape[1]), 0.0
    for t in range(x.shape[1] - 1, -1, -1):
        m = float(np.abs(d).max())
        if m == 0:
            out[: t + 1] = -math.inf
            break
        d, log_scale = d / m, log_scale + math.log(m)
        out[t] = (log_scale + 0.5 * math.log(float((d**2).sum()))) / math.log(10)
        if t > 0:
            d = np.einsum("bi,bij->bj", d, jacobian(p, acts[t]))  # (J^T d)_j = sum_i d_i J_ij
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
