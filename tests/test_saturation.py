"""The profile in saturation: units whose pre-activations lie far out on tanh's or sigmoid's tails.

There ``1 - tanh(a)^2`` taken from the output rounds to exactly 0 in float64 (|a| >= 19.1), and so does
``s (1 - s)`` (a >= 37), where the true derivatives are 1e-17 and below: a walk back through them read an
exactly zero gradient (-inf decades) and the regime flipped (README, "The long-range profile";
``pipeline/bptt/dphi.py``). The truth here is independent of the twin's hand-written derivatives: the
complex step (Squire & Trapp 1998, "Using complex variables to estimate derivatives of real functions",
SIAM Review 40(1)): for an analytic step f, ``J q = Im f(s + i h q) / h`` with no subtraction, exact to
rounding for any h (here 1e-100), run through the twin's own forward (``step_projected``, checked against
torch's modules in tests/test_bptt.py) in complex128."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.bptt import profile as bptt
from pipeline.bptt import reference, spectra
from pipeline.bptt import twin as cells
from tests.test_bptt import random_params

STEP = 1e-100
SATURATING = ("tanh", "orthogonal", "lstm", "gru", "lem", "cornn")


def as_complex(p: dict) -> dict:
    return {k: v.to(torch.complex128) if isinstance(v, torch.Tensor) else v for k, v in p.items()}


# per cell, the sign of each gate block's pre-activation (None: random) that leaves no unsaturated path
# through the step to hide a zeroed one behind: lstm i, f, g, o all near 1 (with a large cell state,
# tanh(c) saturated too); gru r near 1, z near 0 (1 - z = 1), n either way; lem both step gates near 1
SIGNS = {"lstm": (1, 1, 1, 1), "gru": (1, -1, None), "lem": (1, 1, None, None)}


def saturated_step(cell: str, B: int = 3, H: int = 4):
    """Params, a state and an input projection 20 to 45 in size in every entry, so each gate and
    candidate of the step sits where 1 - tanh^2 (and 1 - sigmoid for positive a) rounds to 0."""
    p = random_params(cell, H=H, seed=5)
    g = torch.Generator().manual_seed(11)
    names = cells.state_names(p)
    width = cells.hidden_size(p)
    state = tuple(torch.randn(B, width, generator=g, dtype=torch.float64) * 0.5 for _ in names)
    if cell == "lstm":  # a cell state of about 25: tanh(c') saturated
        state = (state[0], 25 + state[1])
    shape = (B, p["W_ih"].shape[0])
    size = 20 + 25 * torch.rand(shape, generator=g, dtype=torch.float64)
    sign = torch.sign(torch.randn(shape, generator=g, dtype=torch.float64))
    for k, fixed in enumerate(SIGNS.get(cell, ())):
        if fixed is not None:
            sign.chunk(len(SIGNS[cell]), dim=-1)[k].fill_(fixed)
    return p, state, size * sign


def complex_jvp(p, gi, state, q):
    """J q of the step, by one complex evaluation of its forward."""
    pc = as_complex(p)
    s = tuple(x.to(torch.complex128) + 1j * STEP * d for x, d in zip(state, q, strict=True))
    return tuple(o.imag / STEP for o in cells.step_projected(pc, gi.to(torch.complex128), s))


def complex_vjp(p, gi, state, v):
    """J^T v of the step, one complex evaluation per state coordinate (all rows of the batch at once:
    each row's step depends on its own state alone)."""
    out = []
    for k, x in enumerate(state):
        col = torch.zeros_like(x)
        for j in range(x.shape[-1]):
            q = tuple(torch.zeros_like(s) for s in state)
            q[k][:, j] = 1.0
            jq = complex_jvp(p, gi, state, q)
            col[:, j] = sum((a * b).sum(-1) for a, b in zip(jq, v, strict=True))
        out.append(col)
    return tuple(out)


@pytest.mark.parametrize("cell", SATURATING)
def test_step_derivatives_in_saturation_equal_the_complex_step(cell):
    p, state, gi = saturated_step(cell)
    g = torch.Generator().manual_seed(12)
    v = tuple(torch.randn(s.shape, generator=g, dtype=torch.float64) for s in state)
    if cell == "lstm":  # dL/dc' = 0: else its exact path (c' = f c + ...) swamps the saturated ones
        v = (v[0], torch.zeros_like(v[1]))
    _, cache = cells.step_cached(p, gi, state)
    got_vjp, _ = cells.step_vjp(p, cache, v)
    got_jvp = cells.step_jvp(p, cache, v)
    want_vjp = complex_vjp(p, gi, state, v)
    want_jvp = complex_jvp(p, gi, state, v)
    for got, want in [*zip(got_vjp, want_vjp, strict=True), *zip(got_jvp, want_jvp, strict=True)]:
        assert torch.all(want != 0)  # the tails are tiny, not zero
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=0)
    if cell in ("tanh", "orthogonal"):  # what the output-based derivative would have read
        assert torch.all(1 - torch.tanh(gi + state[0] @ p["W_hh"].T + p["b_hh"]) ** 2 == 0)
        assert float(want_vjp[0].abs().max()) < 1e-15


def pulsed_chaotic_tanh(T: int = 300, H: int = 64, B: int = 8, g: float = 3.0):
    """A chaotic tanh RNN (g = 3, past the edge of chaos at g = 1) given one input pulse of 30 at step 6
    that drives every unit to |a| > 20: the gradient gains about 0.05 decades a step over 300 steps."""
    gen = torch.Generator().manual_seed(0)
    f64 = torch.float64
    p = {
        "cell": "tanh",
        "W_ih": torch.cat(
            [
                torch.randn(H, 1, generator=gen, dtype=f64),
                torch.sign(torch.randn(H, 1, generator=gen, dtype=f64)),
            ],
            1,
        ),
        "b_ih": torch.zeros(H, dtype=f64),
        "W_hh": torch.randn(H, H, generator=gen, dtype=f64) * g / math.sqrt(H),
        "b_hh": torch.zeros(H, dtype=f64),
        "W_out": torch.randn(1, H, generator=gen, dtype=f64),
        "b_out": torch.zeros(1, dtype=f64),
    }
    x = torch.zeros(B, T, 2, dtype=f64)
    x[:, :, 0] = torch.rand(B, T, generator=gen, dtype=f64)
    x[:, 5, 1] = 30.0
    return p, x, torch.ones(B, 1, dtype=f64)


def test_a_saturating_pulse_leaves_the_profile_finite_and_the_regime_exploding():
    from pipeline.config import DiagnosticsConfig
    from pipeline.training.callbacks import verdict

    p, x, y = pulsed_chaotic_tanh()
    mse = torch.nn.functional.mse_loss
    prof = bptt.profile(p, x, y, mse)
    h = prof.log10_norm["h"]
    ref = reference.profile_log10(p, x, y, mse)  # numpy, sech^2 from the pre-activation
    assert np.all(np.isfinite(h))
    assert reference.max_error(h, ref) < 1e-9
    s = bptt.summarize(prof)
    assert s["log10_ratio"] > 10  # 16.3 here; a chaotic trajectory, so not pinned across BLAS kernels
    metrics = {"bptt/log10_ratio_per_step": s["log10_ratio_per_step"], "bptt/overflow_step": 0}
    assert verdict(False, metrics, 0.1, DiagnosticsConfig()) == "exploding"
    assert math.isfinite(spectra.lyapunov_max(p, x))  # its tangent takes the same derivatives


def test_activation_derivatives_are_even_and_finite_far_into_saturation():
    """sech^2 is even and sigmoid(a) sigmoid(-a) too: at |a| = 30, 200 and 360 (past exp's float64 range
    when doubled, |a| > 354.9) either sign gives the same finite value, the complex step's (to |a| = 200)."""
    from pipeline.bptt.dphi import sigmoid_prime, tanh_prime

    a = torch.tensor([30.0, 200.0, 360.0], dtype=torch.float64)
    for f, ref in ((tanh_prime, torch.tanh), (sigmoid_prime, torch.sigmoid)):
        for x in (a, -a):
            want = ref(x.to(torch.complex128) + 1j * STEP).imag / STEP
            got = f(x)
            assert torch.all(torch.isfinite(got)) and torch.equal(got, f(-x))
            assert torch.allclose(got[:2], want[:2], rtol=1e-12, atol=0)
