"""The float64 twin of ``lem``, the Long Expressive Memory cell (dispatched from :mod:`pipeline.bptt.twin`,
whose functions and contract this module follows).

Rusch, Erichson, Mahoney 2022 ("Long Expressive Memory for Sequence Modeling", ICLR, eq. 3), a
multiscale discretisation of two coupled ODEs, with u_n the input and dt = ``model.dt``::

    dt1_n = dt * sigmoid(W1 y_{n-1} + V1 u_n + b1)       (the step of z, per unit)
    dt2_n = dt * sigmoid(W2 y_{n-1} + V2 u_n + b2)       (the step of y, per unit)
    z_n = (1 - dt1_n) * z_{n-1} + dt1_n * tanh(Wz y_{n-1} + Vz u_n + bz)
    y_n = (1 - dt2_n) * y_{n-1} + dt2_n * tanh(Wy z_n + Vy u_n + by)

The readout reads y. The state is the two vectors together, carried as ONE real vector h = [y, z] of
width 2H, so the profile's ||dL/dh_t|| is the norm of the gradient on the whole state (y_t, z_t): the
honest quantity, since a gradient that survives only in z still carries memory back (a norm of dL/dy_t
alone would miss it). Before the loss window the direct term on z is zero and the one on y is the readout's.

The step Jacobian J_t = d(y_n, z_n)/d(y_{n-1}, z_{n-1}) is a full 2H x 2H matrix (W1, W2, Wz couple y to
both; Wy couples z_n into y_n), so Pascanu's bound (one ||W_hh|| times max |phi'|) has no counterpart. What
replaces it is the bound every chain of Jacobians obeys: ||J_2^T ... J_r^T v|| <= prod_t ||J_t||_2 ||v||,
with ||J_t||_2 the largest singular value of the exact J_t along the probe trajectory, the largest over the
probe batch (:func:`pipeline.bptt.spectra.jacobian_log10_bound`). A theorem for any cell, logged for lem.

Params (:meth:`pipeline.training.models.RNNModel.params`)::

    "W_ih": [4H, I] = [V1; V2; Vz; Vy], "b_ih": [4H]   the input's blocks (dt1, dt2, z, y), as the
    "W_hh": [3H, H] = [W1; W2; Wz],    "b_hh": [3H]    authors' inp2hid and hid2hid layers
    "W_y":  [H, H],                     "b_y":  [H]     z_n -> y_n (their transform_z)
    "dt": float; "W_out": [O, H], "b_out": [O]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pipeline.bptt.dphi import sigmoid_prime, tanh_prime

Tensor = torch.Tensor
State = tuple[Tensor, ...]
Params = dict[str, Any]
Cache = tuple[Tensor, ...]


def width(p: Params) -> int:
    """H: the width of y and of z (the state vector is [y, z], 2H)."""
    return int(p["W_y"].shape[0])


def input_projection(p: Params, x: Tensor) -> Tensor:
    """[V1 u + b1, V2 u + b2, Vz u + bz, Vy u + by] for all steps at once (``[..., 4H]``)."""
    return F.linear(x, p["W_ih"], p["b_ih"])


def step_cached(p: Params, gi: Tensor, state: State) -> tuple[State, Cache]:
    """One step (the module docstring's equations); the cache holds the factors J_t needs, each gate's
    derivative taken from its pre-activation (:mod:`pipeline.bptt.dphi`: exact in saturation): the
    retentions 1 - dt s1 and 1 - dt s2 (the values the forward multiplies by), and dt s2 tanh'(a_y),
    (cz - z) dt sigmoid'(a1), (cy - y) dt sigmoid'(a2), dt s1 tanh'(a_z)."""
    (h,) = state
    y, z = h.chunk(2, dim=-1)
    dt = p["dt"]
    i1, i2, iz, iy = gi.chunk(4, dim=-1)
    a1, a2, az = F.linear(y, p["W_hh"], p["b_hh"]).chunk(3, dim=-1)
    a1, a2, az = i1 + a1, i2 + a2, iz + az
    s1, s2 = torch.sigmoid(a1), torch.sigmoid(a2)
    cz = torch.tanh(az)
    z_new = (1 - dt * s1) * z + dt * s1 * cz
    ay = F.linear(z_new, p["W_y"], p["b_y"]) + iy
    cy = torch.tanh(ay)
    y_new = (1 - dt * s2) * y + dt * s2 * cy
    cache = (
        1 - dt * s1,
        1 - dt * s2,
        dt * s2 * tanh_prime(ay),
        (cz - z) * dt * sigmoid_prime(a1),
        (cy - y) * dt * sigmoid_prime(a2),
        dt * s1 * tanh_prime(az),
    )
    return (torch.cat([y_new, z_new], dim=-1),), cache


def step_vjp(p: Params, cache: Cache, v: State) -> tuple[State, None]:
    """J_t^T v by the chain rule through the step, backwards: v = (dL/dy_n, dL/dz_n) as one vector.

    dL/dz_n gains the path through y_n (Wy z_n); then both reach y_{n-1} directly ((1 - dt2) and, through
    the pre-activations a1, a2, az, W_hh^T) and z_{n-1} only through its retention (1 - dt1)."""
    keep1, keep2, f_ay, f_a1, f_a2, f_az = cache
    g_y, g_z = v[0].chunk(2, dim=-1)
    g_z = g_z + (g_y * f_ay) @ p["W_y"]  # through tanh(Wy z_n + Vy u_n + by)
    # through dt1 = dt sigmoid(a1), dt2 = dt sigmoid(a2) and tanh(Wz y + ...)
    g_y_prev = g_y * keep2 + torch.cat([g_z * f_a1, g_y * f_a2, g_z * f_az], dim=-1) @ p["W_hh"]
    return (torch.cat([g_y_prev, g_z * keep1], dim=-1),), None


def step_jvp(p: Params, cache: Cache, q: State) -> State:
    """J_t q (forward mode, by hand); broadcasts over a tangent axis (cache ``[B, 1, H]``, q ``[B, k, 2H]``)
    as :mod:`pipeline.bptt.remedies` needs."""
    keep1, keep2, f_ay, f_a1, f_a2, f_az = cache
    q_y, q_z = q[0].chunk(2, dim=-1)
    t1, t2, tz = (q_y @ p["W_hh"].T).chunk(3, dim=-1)
    dz = keep1 * q_z + f_a1 * t1 + f_az * tz
    dy = keep2 * q_y + f_a2 * t2 + f_ay * (dz @ p["W_y"].T)
    return (torch.cat([dy, dz], dim=-1),)


def readout(p: Params, h: Tensor) -> Tensor:
    """W_out y + b_out: the readout reads y, the first half of the state (``[..., 2H]``)."""
    return F.linear(h[..., : width(p)], p["W_out"], p["b_out"])


BLOCKS = ("dtz", "dty", "z")  # W_hh's row blocks: W1 (z's step), W2 (y's step), Wz; then "y" for Wy


def spectrum(p: Params) -> dict[str, float]:
    """Largest singular value and spectral radius of each recurrent matrix: ``sigma_max_dtz`` (W1),
    ``_dty`` (W2), ``_z`` (Wz), ``_y`` (Wy, z_n -> y_n); ``sigma_max`` / ``radius`` the largest. A
    description of the weights, not a bound (J_t mixes them with the gates: the module docstring)."""
    out: dict[str, float] = {}
    blocks = dict(zip(BLOCKS, p["W_hh"].chunk(3, dim=0), strict=True)) | {"y": p["W_y"]}
    for name, W in blocks.items():
        out[f"sigma_max_{name}"] = float(torch.linalg.matrix_norm(W, ord=2))
        out[f"radius_{name}"] = float(torch.linalg.eigvals(W).abs().max())
    out["sigma_max"] = max(out[f"sigma_max_{n}"] for n in blocks)
    out["radius"] = max(out[f"radius_{n}"] for n in blocks)
    return out
