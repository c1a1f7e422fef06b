"""The float64 twin of ``cornn``, the coupled oscillatory RNN (dispatched from :mod:`pipeline.bptt.twin`,
whose functions and contract this module follows).

Rusch & Mishra 2021 ("Coupled Oscillatory Recurrent Neural Network (coRNN): An accurate and (gradient)
stable architecture for learning long time dependencies", ICLR, eq. 3), a discretised second-order ODE
y'' = tanh(W y + W_z y' + V u + b) - gamma y - epsilon y', with dt = ``model.dt``::

    z_n = z_{n-1} + dt * (tanh(W y_{n-1} + W_z z_{n-1} + V u_n + b) - gamma y_{n-1} - epsilon z_{n-1})
    y_n = y_{n-1} + dt * z_n

The readout reads y. As for lem (:mod:`pipeline.bptt.lem`) the state is carried as one vector h = [y, z]
of width 2H and the profile is the gradient on both; J_t is a full 2H x 2H matrix, bounded by
:func:`pipeline.bptt.spectra.jacobian_log10_bound`.

Params (:meth:`pipeline.training.models.RNNModel.params`)::

    "W_ih": [H, I] = V, "b_ih": [H]; "W_hh": [H, 2H] = [W_z | W] (acting on [z, y], the authors' order)
    "dt", "gamma", "epsilon": floats; "W_out": [O, H], "b_out": [O]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pipeline.bptt.dphi import tanh_prime

Tensor = torch.Tensor
State = tuple[Tensor, ...]
Params = dict[str, Any]
Cache = tuple[Tensor, ...]


def width(p: Params) -> int:
    """H: the width of y and of z (the state vector is [y, z], 2H)."""
    return int(p["W_ih"].shape[0])


def step_cached(p: Params, gi: Tensor, state: State) -> tuple[State, Cache]:
    """One step from ``gi`` = V u_n + b; the cache holds tanh'(a) (from the pre-activation: exact in
    saturation, :mod:`pipeline.bptt.dphi`), all J_t needs."""
    (h,) = state
    y, z = h.chunk(2, dim=-1)
    dt, gamma, eps = p["dt"], p["gamma"], p["epsilon"]
    a = gi + F.linear(torch.cat([z, y], dim=-1), p["W_hh"])
    c = torch.tanh(a)
    z_new = z + dt * (c - gamma * y - eps * z)
    return (torch.cat([y + dt * z_new, z_new], dim=-1),), (tanh_prime(a),)


def step_vjp(p: Params, cache: Cache, v: State) -> tuple[State, None]:
    """J_t^T v: dL/dz_n gains dt dL/dy_n (y_n = y_{n-1} + dt z_n); then both reach (y_{n-1}, z_{n-1})."""
    (s,) = cache
    dt, gamma, eps, H = p["dt"], p["gamma"], p["epsilon"], width(p)
    g_y, g_z = v[0].chunk(2, dim=-1)
    g_z = g_z + dt * g_y
    back = (g_z * dt * s) @ p["W_hh"]  # [through z_{n-1}, through y_{n-1}]
    return (
        torch.cat([g_y - dt * gamma * g_z + back[..., H:], (1 - dt * eps) * g_z + back[..., :H]], -1),
    ), None


def step_jvp(p: Params, cache: Cache, q: State) -> State:
    """J_t q (forward mode, by hand); broadcasts over a tangent axis as :mod:`pipeline.bptt.remedies` needs."""
    (s,) = cache
    dt, gamma, eps = p["dt"], p["gamma"], p["epsilon"]
    q_y, q_z = q[0].chunk(2, dim=-1)
    da = s * (torch.cat([q_z, q_y], dim=-1) @ p["W_hh"].T)
    dz = q_z + dt * (da - gamma * q_y - eps * q_z)
    return (torch.cat([q_y + dt * dz, dz], dim=-1),)


def readout(p: Params, h: Tensor) -> Tensor:
    """W_out y + b_out: the readout reads y, the first half of the state."""
    return F.linear(h[..., : width(p)], p["W_out"], p["b_out"])


def spectrum(p: Params) -> dict[str, float]:
    """Largest singular value and spectral radius of W_z (``_z``) and W (``_y``); ``sigma_max`` / ``radius``
    the larger. A description of the weights, not a bound."""
    H = width(p)
    out: dict[str, float] = {}
    for name, W in (("z", p["W_hh"][:, :H]), ("y", p["W_hh"][:, H:])):
        out[f"sigma_max_{name}"] = float(torch.linalg.matrix_norm(W, ord=2))
        out[f"radius_{name}"] = float(torch.linalg.eigvals(W).abs().max())
    out["sigma_max"] = max(out["sigma_max_z"], out["sigma_max_y"])
    out["radius"] = max(out["radius_z"], out["radius_y"])
    return out
