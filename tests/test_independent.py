"""Diagnostics against references that share no code with :mod:`pipeline.bptt.profile` /
:mod:`pipeline.bptt.spectra` / :mod:`pipeline.bptt.twin`.

* The LSTM's largest Lyapunov exponent against Benettin's QR method (Benettin et al. 1980) on full
  Jacobians of torch's own ``nn.LSTMCell`` step (h, c) -> (h', c') taken by autograd: a version of
  ``lyapunov_max`` whose tangent ignores the cell state c (issue 8, section 3) fails here.
* A true underflow on the all-steps path (readout "all", a direct loss term at every step, as in the copy
  task): the rescaled profile against a plain recursion in mpmath, whose exponent range is unbounded, so
  it needs no rescaling at all. A profile that adds the direct terms in linear space fails here.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from pipeline.bptt import profile as bptt
from pipeline.bptt import spectra
from pipeline.bptt import twin as cells

F64 = torch.float64


def total_profile(prof: bptt.Profile) -> np.ndarray:
    """log10 ||dL/dh_t|| of the *total* gradient, t = 1..T (the one place that names the state label)."""
    return np.asarray(prof.log10_norm["h"], dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# LSTM Lyapunov exponent


def lstm_params(H: int, seed: int, b_f: float, scale: float) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, k=1.0):
        return torch.randn(*shape, generator=g, dtype=F64) * k

    p = {
        "cell": "lstm",
        "W_ih": r(4 * H, 3, k=0.7),
        "b_ih": r(4 * H, k=0.3),
        "W_hh": r(4 * H, H, k=scale / math.sqrt(H)),
        "b_hh": r(4 * H, k=0.3),
        "W_out": r(2, H),
        "b_out": r(2),
    }
    p["b_hh"][H : 2 * H] += b_f  # forget-gate block (PyTorch gate order i, f, g, o)
    return p


def benettin_lambda1(p: dict, x: torch.Tensor, burn: int) -> float:
    """lambda_1 by QR iteration over the full 2H x 2H Jacobians of ``nn.LSTMCell`` (numpy QR).

    Shares nothing with pipeline.bptt.twin: the step is torch's LSTMCell with the same weights, the Jacobian
    comes from torch.autograd.functional.jacobian, and the tangent space is the whole of (h, c).
    """
    B, T, n_in = x.shape
    H = p["W_hh"].shape[1]
    cell = torch.nn.LSTMCell(n_in, H, dtype=F64)
    with torch.no_grad():
        for name in ("weight_ih", "bias_ih", "weight_hh", "bias_hh"):
            getattr(cell, name).copy_(p[name.replace("weight", "W").replace("bias", "b")])
    h = c = torch.zeros(B, H, dtype=F64)
    Q = [np.eye(2 * H) for _ in range(B)]
    acc = np.zeros(B)
    for t in range(T):

        def f(h_, c_, x_t=x[:, t]):
            return cell(x_t, (h_, c_))

        J = torch.autograd.functional.jacobian(f, (h, c))  # J[i][j]: d out_i / d state_j, [B, H, B, H]
        for b in range(B):
            Jb = np.block([[J[i][j][b, :, b, :].numpy() for j in range(2)] for i in range(2)])
            Q[b], R = np.linalg.qr(Jb @ Q[b])
            if t >= burn:
                acc[b] += math.log(abs(R[0, 0]))
        with torch.no_grad():
            h, c = f(h, c)
    return float((acc / (T - burn)).mean())


# (forget bias, recurrent scale): from a fast-forgetting to a nearly-open cell path. Measured with T = 300,
# burn-in 10, B = 2, H = 4: reference -0.533 / -0.108 / -0.0335 / -0.301, lyapunov_max within 0.0024 of
# it (one random tangent vs e_1, the finite-T transient). A tangent that ignores c (c part zeroed) reads
# -1.6 .. -2.9, off by more than 1.2 in every case, so 0.006 separates them with room on both sides.
@pytest.mark.parametrize(("b_f", "scale"), [(0.0, 1.0), (2.0, 1.0), (3.0, 0.5), (1.0, 2.0)])
def test_lstm_lyapunov_matches_full_jacobian_qr(b_f, scale):
    p = lstm_params(4, seed=0, b_f=b_f, scale=scale)
    x = torch.randn(2, 300, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    ref = benettin_lambda1(p, x, burn=10)
    assert spectra.lyapunov_max(p, x, burn_in=10) == pytest.approx(ref, abs=0.006)


def test_lstm_lyapunov_reference_catches_a_tangent_that_ignores_c(monkeypatch):
    """The planted bug of issue 8 (zero the c part of the tangent) must not pass the comparison above."""
    p = lstm_params(4, seed=0, b_f=2.0, scale=1.0)
    x = torch.randn(2, 300, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    ref = benettin_lambda1(p, x, burn=10)
    real = cells.step_jvp

    def ignores_c(params, cache, q):
        return real(params, cache, (q[0], torch.zeros_like(q[1])))

    monkeypatch.setattr(cells, "step_jvp", ignores_c)
    assert abs(spectra.lyapunov_max(p, x, burn_in=10) - ref) > 0.5


# --------------------------------------------------------------------------------------------------
# A true underflow on the all-steps path


def _orthogonal(H: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(H, H, generator=gen, dtype=F64))
    return Q * torch.sign(torch.diagonal(R))


def _mse(out, y):
    return ((out - y) ** 2).mean()


def mpmath_total_profile(p: dict, y: torch.Tensor) -> np.ndarray:
    """log10 ||dL/dh_t||, t = 1..T, by the plain recursion dL/dh_t = d_t + W^T dL/dh_{t+1} in mpmath.

    Valid where every state is exactly 0 (zero input and biases: tanh(0) = 0, tanh'(0) = 1), so J_t = W,
    and the outputs are b_out = 0: the direct term is d_t = W_out^T dL/dout_t with dL/dout_t = -2 y_t / N
    for the mean-squared error over N = B T O entries. Default precision (53 bits) suffices: the
    point is the exponent range, not the mantissa. mpmath floats have an unbounded exponent, so no
    rescaling is needed and 1e-600 is just a number.
    """
    B, T, n_out = y.shape
    W = [[mpmath.mpf(v) for v in row] for row in p["W_hh"].tolist()]
    w = [mpmath.mpf(v) for v in p["W_out"][0].tolist()]
    H = len(w)
    k = mpmath.mpf(2) / (B * T * n_out)
    tot = [[mpmath.mpf(0)] * H for _ in range(B)]
    out = np.empty(T)
    for t in range(T - 1, -1, -1):
        nxt = []
        for b in range(B):
            d = -k * mpmath.mpf(float(y[b, t, 0]))
            nxt.append([mpmath.fsum(tot[b][i] * W[i][j] for i in range(H)) + d * w[j] for j in range(H)])
        tot = nxt
        sq = mpmath.fsum(v * v for row in tot for v in row)
        out[t] = float(mpmath.log10(mpmath.sqrt(sq))) if sq != 0 else -math.inf
    return out


def test_all_steps_profile_underflows_exactly():
    """Copy-like loss: O(1) direct terms in a recall window at the end (t = 3991..4000), exactly zero ones
    elsewhere except two: 1e-250 at t = 3160, where the propagated signal is also ~1e-250 (g = 0.5:
    0.5^830), and 1e-10 at t = 2000, where the propagated signal is ~1e-599, so the two differ by more
    than float64's whole range and only a log-space sum adds them. The total then falls to ~1e-612 at
    t = 1. Every value must be finite and agree with the mpmath recursion. Measured: max |error| 5e-13
    decades (a T = 1400 variant of this layout)."""
    T, H, B, g = 4000, 4, 2, 0.5
    gen = torch.Generator().manual_seed(0)
    p = {
        "cell": "tanh",
        "W_ih": torch.randn(H, 2, generator=gen, dtype=F64),
        "b_ih": torch.zeros(H, dtype=F64),
        "W_hh": g * _orthogonal(H, 0),
        "b_hh": torch.zeros(H, dtype=F64),
        "W_out": torch.randn(1, H, generator=gen, dtype=F64),
        "b_out": torch.zeros(1, dtype=F64),
    }
    x = torch.zeros(B, T, 2, dtype=F64)
    y = torch.zeros(B, T, 1, dtype=F64)
    y[:, -10:] = torch.randn(B, 10, 1, generator=gen, dtype=F64)  # the recall window
    y[:, 3159] = 1e-250 * torch.randn(B, 1, generator=gen, dtype=F64)  # t = 3160
    y[:, 1999] = 1e-10 * torch.randn(B, 1, generator=gen, dtype=F64)  # t = 2000
    lg = total_profile(bptt.profile(p, x, y, _mse, "all"))
    ref = mpmath_total_profile(p, y)
    assert np.all(np.isfinite(ref)) and ref[0] < -600 and (ref < -400).sum() > 1000  # a true underflow
    assert ref[1999] - ref[2000] > 308  # the direct term at t = 2000 dwarfs what reaches it
    assert np.all(np.isfinite(lg))
    np.testing.assert_allclose(lg, ref, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------------------------------
# The regression suite's independent recursion (pipeline/bptt/reference.py) on every vanilla cell


@pytest.mark.parametrize("cell", ["tanh", "orthogonal", "relu", "indrnn"])
@pytest.mark.parametrize("dead_start", [False, True], ids=["random", "exact-zero-pre-activations"])
def test_reference_recursion_equals_the_profile_on_every_vanilla_cell(cell, dead_start):
    """README, "Regression suites": the profile equals the independent numpy recursion within 1e-9
    decades on every vanilla cell (``bptt/reference_max_err``). ``exact-zero-pre-activations``: zero
    biases and zero inputs over the first steps leave h = 0 and a = 0 exactly, where relu' is 0 (as
    torch's relu takes it): no gradient reaches those steps, -inf on both sides."""
    from pipeline.bptt import reference
    from pipeline.config import ModelConfig
    from pipeline.training.models import RNNModel
    from pipeline.training.tasks import make_task

    task = make_task("adding", 30)
    init = "orthogonal" if cell == "orthogonal" else "gaussian"
    cfg = ModelConfig(cell=cell, hidden_size=16, init=init, init_scale=0.9 if cell == "indrnn" else 1.2)
    p = RNNModel(cfg, task.input_size, task.output_size, task.readout, seed=1).params(F64)
    if cell == "indrnn":
        assert (p["u"] - 1).abs().max() > 0.05  # u h differs from h
    x, y = task.sample(8, torch.Generator().manual_seed(3))
    x, y = x.double(), y.double()
    if dead_start:
        for k in ("b_ih", "b_hh"):
            if k in p:
                p[k] = torch.zeros_like(p[k])
        x[:, :5] = 0.0
    prof = bptt.profile(p, x, y, task.loss, task.readout, window=task.window)
    ref = reference.profile_log10(p, x, y, task.loss)
    assert ref is not None
    h = prof.log10_norm["h"]
    if dead_start and cell in ("relu", "indrnn"):
        assert np.isneginf(h[:4]).all() and np.isfinite(h[5:]).all()
    else:
        assert np.isfinite(h).all()
    assert reference.max_error(h, ref) < 1e-9


def test_reference_max_error_is_inf_where_one_side_alone_is_finite():
    """``max_error``: the largest |difference| in decades; inf where one side is finite and the other is
    not (either side), 0 where both read -inf (an exact zero in both)."""
    from pipeline.bptt.reference import max_error

    inf = math.inf
    assert max_error(np.array([-1.0, 2.0]), np.array([-1.5, 2.25])) == 0.5
    assert max_error(np.array([0.0, 1.0]), np.array([-inf, 1.0])) == inf
    assert max_error(np.array([-inf, 1.0]), np.array([0.0, 1.0])) == inf
    assert max_error(np.array([-inf, 1.0]), np.array([-inf, 1.5])) == 0.5
    assert max_error(np.array([-inf, -inf]), np.array([-inf, -inf])) == 0.0
    assert max_error(np.array([math.nan, 1.0]), np.array([math.nan, 1.0])) == inf
