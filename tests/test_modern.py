"""The modern diagonal cells lru (Orvieto et al. 2023) and mingru (Feng et al. 2024) against their laws.

Both have an exact step Jacobian, diag(lambda) and diag(1 - z_t), so their profiles are known in closed
form: an lru whose channels all have |lambda| = r gives log10 ratio = (T-1) log10 r, each channel decays
like |lambda_j|^(T-t), and a minGRU's gradient is the product of its retentions 1 - z along the batch.
The twin (pipeline/bptt/modern.py) is checked against the training path (both scans) and autograd, the
laws against independent numpy computations, and planted bugs in the twin's VJP against the laws.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.bptt import modern, reference, spectra
from pipeline.bptt import profile as bptt
from pipeline.bptt import twin as cells
from pipeline.config import DiagnosticsConfig, ModelConfig, load_config
from pipeline.schema import ConfigError
from pipeline.training.callbacks import verdict
from pipeline.training.models import RNNModel
from pipeline.training.modern import SequentialScan, doubling_scan, log_space_scan

F64 = torch.float64
EPS32 = 2.0**-24  # float32's unit round-off


def mse(out, y):
    return ((out - y) ** 2).mean()


def model(cell, H=8, readout="last", n_in=3, n_out=2, seed=1, **kw):
    return RNNModel(ModelConfig(cell=cell, hidden_size=H, **kw), n_in, n_out, readout, seed=seed)


def ring_at(r, H=16, n_in=2, seed=0):
    """The float64 weights of an lru whose every |lambda_j| is r exactly: nu_log = log(-log r) in float64
    (a float32 model realises r only to float32's resolution, see test_lru_float32_model_...)."""
    p = model("lru", H=H, n_in=n_in, n_out=1, seed=seed, r_min=r, r_max=r, max_phase=math.pi).params()
    p["nu_log"] = torch.full((H,), math.log(-math.log(r)), dtype=F64)
    return p


# --------------------------------------------------------------------------------------------------
# The training path (both scans) equals the twin, and its gradients equal a plain autograd loop


@pytest.mark.parametrize("readout", ["last", "all"])
@pytest.mark.parametrize("scan", ["sequential", "parallel"])
@pytest.mark.parametrize("cell", ["lru", "mingru"])
def test_training_path_equals_the_twin(cell, scan, readout):
    m = model(cell, readout=readout, r_min=0.4, r_max=0.99, max_phase=3.0).double()
    m.rnn.scan = scan
    x = torch.randn(4, 300, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    with torch.no_grad():
        fused = m(x)
        p = m.params()
        hs = torch.stack([s[0] for s in cells.unroll(p, x)], dim=1)
        twin = cells.readout(p, *((hs[:, -1], x[:, -1]) if readout == "last" else (hs, x)))
    assert (fused - twin).abs().max().item() < 1e-12


@pytest.mark.parametrize("scan", ["sequential", "parallel"])
@pytest.mark.parametrize("cell", ["lru", "mingru"])
def test_training_gradients_equal_autograd_through_the_twin(cell, scan):
    """The sequential scan's hand-written backward and the parallel scans' autograd, against autograd
    through the twin's plain step loop (float64), for every parameter."""
    m = model(cell, H=6, readout="all", r_min=0.5, r_max=0.99, max_phase=2.0).double()
    m.rnn.scan = scan
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, 40, 3, generator=gen, dtype=F64), torch.randn(3, 40, 2, generator=gen, dtype=F64)
    mse(m(x), y).backward()
    p = {k: (v.requires_grad_() if torch.is_tensor(v) else v) for k, v in m.params().items()}
    hs = torch.stack([s[0] for s in cells.unroll(p, x)], dim=1)
    mse(cells.readout(p, hs, x), y).backward()
    if cell == "lru":
        pairs = [(getattr(m.rnn, k).grad, p[k].grad) for k in m.rnn.GROUP_OF]
    else:
        w = torch.cat([m.rnn.gate.weight.grad, m.rnn.candidate.weight.grad])
        b = torch.cat([m.rnn.gate.bias.grad, m.rnn.candidate.bias.grad])
        pairs = [(w, p["W_ih"].grad), (b, p["b_ih"].grad)]
    pairs.append((m.readout.weight.grad, p["W_out"].grad))
    for mine, ref in pairs:
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12)


def test_scans_agree_and_sequential_backward_passes_gradcheck():
    gen = torch.Generator().manual_seed(5)
    b = torch.randn(2, 9, 3, generator=gen, dtype=F64, requires_grad=True)
    a_t = torch.rand(2, 9, 3, generator=gen, dtype=F64, requires_grad=True)
    log_lam = torch.complex(torch.full((3,), -0.1, dtype=F64), torch.randn(3, generator=gen, dtype=F64))
    lam = torch.exp(log_lam).requires_grad_()
    bc = torch.complex(b.detach(), torch.randn(2, 9, 3, generator=gen, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(SequentialScan.apply, (a_t, b))  # per-step a (mingru)
    assert torch.autograd.gradcheck(SequentialScan.apply, (lam, bc))  # constant complex a (lru)
    torch.testing.assert_close(
        doubling_scan(log_lam, bc), SequentialScan.apply(lam, bc), rtol=1e-13, atol=1e-13
    )
    bp = b.detach().abs() + 0.1
    for chunk in (4, 256):  # several chunks, one chunk
        got = log_space_scan(a_t.log(), bp.log(), chunk)
        torch.testing.assert_close(got, SequentialScan.apply(a_t, bp), rtol=1e-12, atol=0.0)


def test_parallel_scans_stay_finite_and_accurate_at_T_5000():
    """float32 at T = 5000 against the float64 recursion on the same parameter values: the doubling scan
    never forms |lambda|^-t and takes lambda^(2^k) as exp(2^k log lambda) (measured 3e-7 relative; the
    float32 sequential loop 1e-4, its complex64 lambda's rounding compounding over the steps), and the
    chunked log-space scan keeps a* = cumsum log(1 - z) small (measured 1e-5; unchunked 2e-4)."""
    gen = torch.Generator().manual_seed(0)
    T = 5000
    nu = torch.log(-torch.log(torch.tensor([0.5, 0.99, 0.9999])))
    log_lam = torch.complex(-torch.exp(nu), torch.tensor([0.3, 0.01, 1.0]))
    u = torch.complex(torch.randn(2, T, 3, generator=gen), torch.randn(2, T, 3, generator=gen))
    ref = SequentialScan.apply(torch.exp(log_lam.to(torch.complex128)), u.to(torch.complex128))
    got = doubling_scan(log_lam, u)
    assert torch.isfinite(torch.view_as_real(got)).all()
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5
    k, c = torch.randn(2, T, 4, generator=gen), torch.randn(2, T, 4, generator=gen).abs()
    ref = SequentialScan.apply(torch.sigmoid(-k.double()), torch.sigmoid(k.double()) * c.double())
    got = log_space_scan(-F.softplus(k), -F.softplus(-k) + c.log())
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.parametrize("cell", ["lru", "mingru"])
def test_hand_written_step_derivatives_match_autograd(cell):
    m = model(cell, H=6, r_min=0.3, r_max=0.95, max_phase=3.0).double()
    p = m.params()
    gen = torch.Generator().manual_seed(2)
    width = cells.hidden_size(p)
    state = (torch.randn(4, width, generator=gen, dtype=F64),)
    gi = cells.input_projection(p, torch.randn(4, 3, generator=gen, dtype=F64))
    _, cache = cells.step_cached(p, gi, state)
    v, q = (
        (torch.randn(4, width, generator=gen, dtype=F64),),
        (torch.randn(4, width, generator=gen, dtype=F64),),
    )

    def f(*s):
        return cells.step_projected(p, gi, s)

    _, vjp_fn = torch.func.vjp(f, *state)
    torch.testing.assert_close(cells.step_vjp(p, cache, v)[0][0], vjp_fn(v)[0], rtol=0, atol=1e-13)
    _, want = torch.func.jvp(f, state, q)
    torch.testing.assert_close(cells.step_jvp(p, cache, q)[0], want[0], rtol=0, atol=1e-13)


# --------------------------------------------------------------------------------------------------
# The laws


@pytest.mark.parametrize(("r", "T"), [(0.5, 1400), (0.999, 300)])
def test_lru_profile_is_r_to_the_T_minus_1(r, T):
    """J = diag(lambda) with every |lambda_j| = r: ||dL/dh_t|| = r^(T-t) ||dL/dh_T|| exactly, so the log10
    ratio is (T-1) log10 r: -421.1 at r = 0.5, T = 1400, a ratio below float64's range (1e-308)."""
    p = ring_at(r)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(4, T, 2, generator=gen, dtype=F64), torch.randn(4, 1, generator=gen, dtype=F64)
    prof = bptt.profile(p, x, y, mse)
    lg = prof.log10_norm["h"]
    assert np.isfinite(lg).all()
    np.testing.assert_allclose(lg - lg[-1], (T - np.arange(1, T + 1)) * math.log10(r), rtol=0, atol=1e-9)
    s = bptt.summarize(prof)
    assert s["log10_ratio"] == pytest.approx((T - 1) * math.log10(r), abs=1e-9)
    assert s["decay_rate"] == pytest.approx(math.log(r), abs=1e-9)
    # Pascanu's bound with gamma = 1, sigma_max = max|lambda| = r: a theorem, and tight here.
    assert spectra.spectrum(p) == {
        "sigma_max": pytest.approx(r, rel=1e-15),
        "radius": pytest.approx(r, rel=1e-15),
    }
    assert spectra.pascanu_log10_bound(p, T) == pytest.approx(s["log10_ratio"], abs=1e-9)
    # The independent recursion (numpy, complex: g <- conj(lambda) g) agrees step by step.
    assert reference.max_error(lg, reference.profile_log10(p, x, y, mse)) < 1e-9


def test_lru_float32_model_meets_the_law_to_float32_resolution():
    """A float32 lru at r_min = r_max = r realises |lambda| = exp(-exp(fl32(nu))), nu = ln(-ln r): the
    ratio is (T-1) log10 r to a relative |nu| 2^-24 (the regression suite's tolerance), and equals the
    Pascanu bound of the realised weights to 1e-9 decades."""
    r, T = 0.5, 1400
    p = model("lru", H=16, n_in=2, n_out=1, r_min=r, r_max=r).params()
    x = torch.rand(2, T, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    s = bptt.summarize(bptt.profile(p, x, torch.zeros(2, 1, dtype=F64), mse))
    want = (T - 1) * math.log10(r)
    assert abs(s["log10_ratio"] - want) <= abs(want) * abs(math.log(-math.log(r))) * EPS32
    assert s["log10_ratio"] == pytest.approx(spectra.pascanu_log10_bound(p, T), abs=1e-9)


def test_lru_each_channel_decays_like_its_modulus():
    """Per channel: dL/dh_t (as dL/dRe + i dL/dIm) has modulus |lambda_j|^(T-t) |dL/dh_T| exactly, with
    |lambda_j| = exp(-exp(nu_j)) computed here in numpy from the weights, for a ring of distinct moduli."""
    T, H = 200, 12
    p = model("lru", H=H, r_min=0.5, r_max=0.99, max_phase=math.pi).params()
    mod = np.exp(-np.exp(p["nu_log"].numpy()))
    assert np.ptp(mod) > 0.2  # distinct decay rates
    v = (torch.randn(3, 2 * H, generator=torch.Generator().manual_seed(0), dtype=F64),)
    start = np.hypot(*v[0].numpy().reshape(3, 2, H).transpose(1, 0, 2))  # [3, H] moduli at t = T
    for k in range(1, T):
        v, _ = cells.step_vjp(p, (), v)
        got = np.hypot(*v[0].numpy().reshape(3, 2, H).transpose(1, 0, 2))
        np.testing.assert_allclose(got, start * mod**k, rtol=1e-11, atol=0)


def test_mingru_profile_is_the_product_of_retentions():
    """dL/dh_t = (prod_{s>t} (1 - z_s)) * dL/dh_T elementwise: the norms from numpy log-products of the
    retentions (z from the weights, not the twin) and dL/dh_T from autograd through the training model."""
    T, H = 300, 8
    m = model("mingru", H=H, n_in=2, n_out=1).double()
    gen = torch.Generator().manual_seed(4)
    x, y = torch.rand(5, T, 2, generator=gen, dtype=F64), torch.randn(5, 1, generator=gen, dtype=F64)
    h_T = m.rnn(x)[:, -1].detach().requires_grad_()
    d_T = torch.autograd.grad(mse(m.readout(h_T), y), h_T)[0].numpy()  # [B, H]
    W, b = m.rnn.gate.weight.detach().numpy(), m.rnn.gate.bias.detach().numpy()
    log_keep = -np.logaddexp(0.0, x.numpy() @ W.T + b)  # log(1 - z_t) = -softplus(k_t), [B, T, H]
    # log |dL/dh_t| = log |d_T| + sum_{s = t+1..T} log(1 - z_s); the norm by a log-sum-exp over (b, j)
    tail = np.concatenate([np.cumsum(log_keep[:, ::-1], axis=1)[:, ::-1][:, 1:], np.zeros((5, 1, H))], axis=1)
    log_abs = np.log(np.abs(d_T))[:, None, :] + tail
    big = log_abs.max(axis=(0, 2))
    want = (big + 0.5 * np.log(np.exp(2 * (log_abs - big[None, :, None])).sum(axis=(0, 2)))) / math.log(10)
    prof = bptt.profile(m.params(), x, y, mse)
    np.testing.assert_allclose(prof.log10_norm["h"], want, rtol=0, atol=1e-9)
    s = bptt.summarize(prof)
    assert s["log10_ratio"] < -5  # z ~ 0.5 at nn.Linear's init: it forgets fast
    assert (np.diff(prof.log10_norm["h"]) >= 0).all()  # 0 < 1 - z < 1: the profile never grows back
    assert spectra.spectrum(m.params()) == {} and spectra.pascanu_log10_bound(m.params(), T) is None
    bound = spectra.gate_log10_bound(m.params(), x, T)
    assert s["log10_ratio"] <= bound + 1e-9 and bound < 0


def test_lyapunov_exponent_of_the_diagonal_cells():
    """J_t = diag(d_t): the window's product is diag(prod_t d_tj), whose largest finite-time exponent is
    max_j mean_t ln|d_tj| per sequence, computed here in numpy from the weights. lru: ln max |lambda_j|
    whatever the input, also on the paper's ring, whose moduli are so close that one tangent had not
    turned towards the slowest channel within a sequence (-0.0143 at T = 100 where the exact value is
    -0.00142). minGRU: d_tj = 1 - z_tj; and at most the mean over t of ln max_{b, j} (1 - z_t)."""
    x = torch.rand(3, 200, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert spectra.lyapunov_max(ring_at(0.8), x) == pytest.approx(math.log(0.8), abs=1e-12)
    ring = model("lru", H=64, n_in=2, n_out=1, seed=0).params()  # init: default, |lambda| in [0.9, 0.999]
    exact = -np.exp(ring["nu_log"].numpy()).min()
    assert exact > -0.002 and spectra.lyapunov_max(ring, x[:, :100]) == pytest.approx(exact, rel=1e-12)
    m = model("mingru", H=8, n_in=2, n_out=1)
    W, b = m.rnn.gate.weight.detach().double().numpy(), m.rnn.gate.bias.detach().double().numpy()
    log_keep = -np.logaddexp(0.0, x.numpy() @ W.T + b)  # log(1 - z)
    for burn in (0, 10):
        want = log_keep[:, burn:].mean(axis=1).max(axis=1).mean()
        assert spectra.lyapunov_max(m.params(), x, burn_in=burn) == pytest.approx(want, rel=1e-12)
    assert want <= log_keep[:, 10:].max(axis=(0, 2)).mean() and want < 0


def test_planted_vjp_bugs_break_the_laws(monkeypatch):
    """Each law catches a bug in the twin's VJP: an lru walk back that drops lambda's phase (multiplies by
    Re lambda) misses (T-1) log10 r by decades; a minGRU walk back by z instead of 1 - z leaves the
    independent recursion. A conjugation slip (lambda for conj(lambda)) keeps every channel's modulus, so no
    norm law can see it: the VJP-against-autograd check does."""
    r, T = 0.9, 200
    p_lru = ring_at(r)
    p_min = model("mingru", H=8, n_in=2, n_out=1).params()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, T, 2, generator=gen, dtype=F64), torch.randn(3, 1, generator=gen, dtype=F64)
    real_vjp = modern.step_vjp

    def ratio(p):
        return bptt.summarize(bptt.profile(p, x, y, mse))["log10_ratio"]

    def no_phase(p, cache, v):
        if p["cell"] != "lru":
            return real_vjp(p, cache, v)
        a, _ = modern.lam(p)
        return (v[0] * torch.cat([a, a]),), None

    def z_for_keep(p, cache, v):
        if p["cell"] != "mingru":
            return real_vjp(p, cache, v)
        return ((1 - cache[0]) * v[0],), None

    def conjugation_slip(p, cache, v):
        a, b = modern.lam(p)
        return (modern._lru_apply(a, b, v[0]),), None

    assert ratio(p_lru) == pytest.approx((T - 1) * math.log10(r), abs=1e-9)
    assert (
        reference.max_error(
            bptt.profile(p_min, x, y, mse).log10_norm["h"], reference.profile_log10(p_min, x, y, mse)
        )
        < 1e-9
    )
    monkeypatch.setattr(modern, "step_vjp", no_phase)
    assert abs(ratio(p_lru) - (T - 1) * math.log10(r)) > 1
    monkeypatch.setattr(modern, "step_vjp", z_for_keep)
    prof = bptt.profile(p_min, x, y, mse)
    assert reference.max_error(prof.log10_norm["h"], reference.profile_log10(p_min, x, y, mse)) > 1
    monkeypatch.setattr(modern, "step_vjp", conjugation_slip)
    assert ratio(p_lru) == pytest.approx((T - 1) * math.log10(r), abs=1e-9)  # invisible to norms
    state = (torch.randn(2, 32, generator=gen, dtype=F64),)
    gi = torch.zeros(2, 32, dtype=F64)
    _, vjp_fn = torch.func.vjp(lambda s: cells.step_projected(p_lru, gi, (s,))[0], state[0])
    assert not torch.allclose(cells.step_vjp(p_lru, (), state)[0][0], vjp_fn(state[0])[0])


def test_smoke_laws_catch_planted_vjp_bugs(store, monkeypatch):
    """The regression suite's entries for these cells fail on the planted bugs above: run through the suite
    machinery (configs/regression/smoke.yaml's entries, real training runs, the store read back)."""
    from dataclasses import replace

    from conftest import ROOT

    from pipeline.regression.laws import LAW
    from pipeline.regression.run import collect, judge_entries, run_entry, start_suite_run
    from pipeline.regression.suite import load_suite

    real_vjp = modern.step_vjp

    def planted(p, cache, v):  # lru: lambda's phase dropped; mingru: z where 1 - z belongs
        if p["cell"] == "lru":
            a, _ = modern.lam(p)
            return (v[0] * torch.cat([a, a]),), None
        if p["cell"] == "mingru":
            return ((1 - cache[0]) * v[0],), None
        return real_vjp(p, cache, v)

    monkeypatch.setattr(modern, "step_vjp", planted)
    suite = load_suite(ROOT / "configs" / "regression" / "smoke.yaml")
    names = ("lru_r0.5_T1400_underflow", "mingru_T100")
    suite = replace(suite, entries=tuple(e for e in suite.entries if e.name in names), compare=())
    parent, exp = start_suite_run(suite)
    results = collect(suite, {n: run_entry(suite, n, parent, exp) for n in names}, parent)
    rows = {r.check: r for r in judge_entries(suite, results, {})}
    assert rows["lru_r0.5_T1400_underflow: metric_equals bptt/log10_ratio"].verdict == LAW
    for n in names:
        assert rows[f"{n}: metric_below bptt/reference_max_err"].verdict == LAW


def test_one_lru_layer_is_linear_so_adding_is_out_of_reach():
    """The README's reading of the lru's adding result: its output is linear in the input sequence, and the
    best linear predictor of adding's target leaves 1 - 2/T of the baseline (least squares here, T = 20:
    measured 0.899 on 200k sequences), whatever the gradients do."""
    from pipeline.training.tasks import make_task

    m = model("lru", H=8, n_in=2, n_out=1).double()
    gen = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(3, 50, 2, generator=gen, dtype=F64), torch.randn(3, 50, 2, generator=gen, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(m.rnn(x1 + 2 * x2), m.rnn(x1) + 2 * m.rnn(x2), rtol=0, atol=1e-12)
    T = 20
    task = make_task("adding", T)

    def design(seed):
        x, y = task.sample(50000, torch.Generator().manual_seed(seed))
        return torch.cat([x.reshape(len(x), -1).double(), torch.ones(len(x), 1, dtype=F64)], 1), y.double()

    X, Y = design(0)
    w = torch.linalg.lstsq(X, Y.reshape(-1, 1)).solution
    Xv, Yv = design(1)
    ratio = ((Xv @ w).flatten() - Yv.flatten()).pow(2).mean().item() / task.baseline
    assert ratio == pytest.approx(1 - 2 / T, abs=0.02)


# --------------------------------------------------------------------------------------------------
# Zucchet & Orvieto 2024: what the hidden-state gradient does not show


@pytest.mark.parametrize("readout", ["last", "all"])
def test_lru_sensitivity_equals_autograd(readout):
    """The forward-mode R_t = dh_t/dlambda route against autograd through the twin: the window loss's
    gradient on (nu_log, theta_log) and on h_a (a = the window's first step). Matching both real
    directions per channel pins dL/dlambda too (dlambda/dnu and dlambda/dtheta are orthogonal in C)."""
    T, window = 60, ((60, 60) if readout == "last" else (51, 60))
    p = model("lru", H=5, n_in=2, n_out=3, r_min=0.6, r_max=0.99, max_phase=2.0).params()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, T, 2, generator=gen, dtype=F64)
    if readout == "last":
        y, loss_fn = torch.randn(4, 3, generator=gen, dtype=F64), mse
    else:
        y = torch.randint(0, 3, (4, T), generator=gen)

        def loss_fn(out, y):
            return F.cross_entropy(out.reshape(-1, 3), y.reshape(-1))

    got = modern.lru_sensitivity(p, x, y, loss_fn, readout, window)
    leaf = {k: (v.clone().requires_grad_() if k in ("nu_log", "theta_log") else v) for k, v in p.items()}
    hs = [s[0] for s in cells.unroll(leaf, x)]
    for h in hs:
        h.retain_grad()
    a, b = window
    out = cells.readout(leaf, torch.stack(hs, dim=1), x)  # [B, T, 3]
    per = ((out[:, -1] - y) ** 2).mean() if readout == "last" else None
    if per is None:  # the window's terms of the mean cross-entropy, with the loss's own normalisation
        per = F.cross_entropy(out.transpose(1, 2), y, reduction="none")[:, a - 1 : b].sum() / y.numel()
    per.backward()
    rec = torch.cat([leaf["nu_log"].grad, leaf["theta_log"].grad]).norm()
    want = math.log10(rec.item()) - math.log10(hs[a - 1].grad.norm().item())
    assert got["recurrent_log10_sensitivity"] == pytest.approx(want, abs=1e-9)
    assert math.isfinite(got["lambda_log10_sensitivity"])


def test_lambda_sensitivity_explodes_as_memory_grows():
    """White input, last-step loss, every |lambda_j| = r: the sensitivity to lambda per unit of
    ||dL/dh_T|| grows like sqrt(1 + r^2) / (1 - r^2) (Zucchet & Orvieto 2024, with the LRU's gamma
    normalisation), a decade per decade of 1 - r (measured 0.88, 0.90), while the profile loses only
    log10 r per step (healthy for every r here: test_lru_profile_is_r_to_the_T_minus_1); through the
    trained nu_log (phases near 0) it stays flat (measured -0.12, -0.24, -0.14)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4000, 2, generator=gen, dtype=F64), torch.randn(32, 1, generator=gen, dtype=F64)
    sens = {}
    for r in (0.9, 0.99, 0.999):
        p = model("lru", H=32, n_in=2, n_out=1, seed=0, r_min=r, r_max=r, max_phase=0.001).params()
        sens[r] = modern.lru_sensitivity(p, x, y, mse, "last", (4000, 4000))
    lam = [sens[r]["lambda_log10_sensitivity"] for r in (0.9, 0.99, 0.999)]
    rec = [sens[r]["recurrent_log10_sensitivity"] for r in (0.9, 0.99, 0.999)]
    assert 0.7 < lam[1] - lam[0] < 1.2 and 0.7 < lam[2] - lam[1] < 1.2
    assert max(rec) - min(rec) < 0.3


def test_lru_spectrum_is_the_largest_modulus_of_distinct_channels():
    """lru: J = diag(lambda), so sigma_max = radius = max_j |lambda_j| (not a mean over channels)."""
    p = model("lru", H=3, n_in=2, n_out=1).params()
    mod = torch.tensor([0.5, 0.9, 0.7], dtype=F64)
    p["nu_log"] = torch.log(-torch.log(mod))
    sp = spectra.spectrum(p)
    assert sp["sigma_max"] == pytest.approx(0.9, rel=1e-14) and sp["radius"] == pytest.approx(0.9, rel=1e-14)
    assert spectra.pascanu_log10_bound(p, 5) == pytest.approx(4 * math.log10(0.9), rel=1e-12)


def test_mingru_gate_bound_is_the_sum_over_steps_2_to_r():
    """gate_log10_bound(r) = sum over t = 2..r of log10 max_{b, j} (1 - z_t), z from the weights in numpy.
    Step 1 is made distinctive (1 - z_1 ~ e^-30: no step before it to propagate from, so it must not
    count) and x runs past r (steps after r must not count either)."""
    r, T = 6, 9
    m = model("mingru", H=2, n_in=2, n_out=1)
    x = torch.rand(3, T, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    W, b = m.rnn.gate.weight.detach().double().numpy(), m.rnn.gate.bias.detach().double().numpy()
    x[:, 0] = torch.as_tensor(np.linalg.solve(W, 30.0 - b))  # k_1 = W x_1 + b = 30 in every unit
    k = x.numpy() @ W.T + b
    np.testing.assert_allclose(k[:, 0], 30.0, rtol=1e-9)
    log10_keep = -np.logaddexp(0.0, k) / math.log(10.0)  # log10(1 - z) = -softplus(k) / ln 10
    want = log10_keep[:, 1:r].max(axis=(0, 2)).sum()
    got = spectra.gate_log10_bound(m.params(), x, r)
    assert got == pytest.approx(want, abs=1e-12) and got < 0
    assert spectra.gate_log10_bound(m.params(), x[:, :r], r) == got
    assert spectra.gate_log10_bound(m.params(), x, 1) == 0.0


# --------------------------------------------------------------------------------------------------
# The verdict, the configuration, a real run


def test_verdict_reads_the_lru_ring_and_mingru_gates():
    """An lru on the ring at 0.999 is healthy and at 0.5 vanishing (decades per step log10 r); a minGRU
    at nn.Linear's init (z ~ 0.5) vanishes, and with its update gate nearly shut (b_z = -6, 1 - z ~ 0.998)
    it is healthy."""
    T, d = 100, DiagnosticsConfig()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, T, 2, generator=gen, dtype=F64), torch.randn(8, 1, generator=gen, dtype=F64)

    def regime(p):
        s = bptt.summarize(bptt.profile(p, x, y, mse))
        return verdict(False, {f"bptt/{k}": v for k, v in s.items()}, None, d)

    lru = {r: model("lru", H=16, n_in=2, n_out=1, r_min=r, r_max=r).params() for r in (0.999, 0.5)}
    assert regime(lru[0.999]) == "healthy" and regime(lru[0.5]) == "vanishing"
    assert regime(model("lru", H=16, n_in=2, n_out=1).params()) == "healthy"  # the paper's ring [0.9, 0.999]
    p = model("mingru", H=16, n_in=2, n_out=1).params()
    assert regime(p) == "vanishing"
    p["b_ih"][:16] = -6.0
    assert regime(p) == "healthy"


def test_several_rates_read_the_slowest_only_at_long_T():
    """README, "Regime verdict": with several rates the log10 ratio is a constant (the slowest channel's
    share of dL_w/dh_a, here about -0.88) plus (a - 1) times the slowest rate, so the per-step rate that the
    verdict reads approaches the slowest channel's only as T grows. One channel at |lambda| = 0.999 and 63
    at 0.5, the same weights at every T: -0.098 decades per step at T = 10 (vanishing), -0.0049 at 200
    (healthy), against the slowest channel's -0.0004."""
    from pipeline.training.data import fixed_batch
    from pipeline.training.tasks import make_task

    p = model("lru", H=64, n_in=2, n_out=1, seed=0, r_min=0.5, r_max=0.5).params()
    p["nu_log"][0] = math.log(-math.log(0.999))
    consts, rates, d = [], {}, DiagnosticsConfig()
    for T in (10, 20, 50, 100, 200):
        task = make_task("adding", T)
        x, y = fixed_batch(task, 32, 2, "cpu")
        s = bptt.summarize(bptt.profile(p, x.double(), y.double(), task.loss, "last"))
        consts.append(s["log10_ratio"] - (T - 1) * math.log10(0.999))
        rates[T] = (
            s["log10_ratio_per_step"],
            verdict(False, {f"bptt/{k}": v for k, v in s.items()}, None, d),
        )
    assert max(consts) - min(consts) < 0.02 and -1.0 < consts[0] < -0.8
    assert rates[10][0] == pytest.approx(-0.098, abs=0.005) and rates[10][1] == "vanishing"
    assert rates[200][0] == pytest.approx(-0.0049, abs=0.0005) and rates[200][1] == "healthy"


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        (["model.r_min=0.95", "model.r_max=0.9"], "model.r_min", "[0, model.r_max = 0.9]"),
        (["model.r_min=-0.1"], "model.r_min", "[0, model.r_max"),
        (["model.r_max=1.0"], "model.r_max", "(0, 1)"),
        (["model.r_max=.nan"], "model.r_max", "(0, 1)"),
        (["model.max_phase=0"], "model.max_phase", "(0, 2 pi]"),
        (["model.max_phase=7"], "model.max_phase", "(0, 2 pi]"),
        (["model.cell=lru", "model.init=gaussian"], "model.init", "lru has no W_hh"),
        (["model.cell=mingru", "model.init=identity"], "model.init", "mingru has no W_hh"),
    ],
)
def test_bad_ring_values_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert e.value.key == key and words in str(e.value) and "\n" not in str(e.value)


def test_cli_refuses_a_bad_ring_with_one_line_and_writes_nothing(tmp_path):
    from conftest import ROOT

    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "model.cell=lru", "model.r_min=0.99", "model.r_max=0.9"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "model.r_min" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_real_runs_record_the_laws(store, tiny):
    """A real training run per cell (two steps), read back from the MLflow store: lru at r = 0.5 (Adam at
    lr 1e-30, whose steps are at most 1e-30: no float32 weight moves) logs the law's ratio, Pascanu's
    bound tight, vanishing; mingru logs its gate bound (and no spectrum); both pass the independent
    recursion."""
    from mlflow.tracking import MlflowClient

    from pipeline.training.run import run

    T = 40
    base = {"task.seq_len": T, "diagnostics.reference_check": True, "trainer.max_steps": 2}
    base.update({"trainer.val_every": 2, "diagnostics.profile_every": 0})
    ring = {"model.r_min": 0.5, "model.r_max": 0.5, "optim.lr": 1e-30}
    for cell in ("lru", "mingru"):
        res = run(tiny(**base, **{"model.cell": cell}, **(ring if cell == "lru" else {})))
        got = MlflowClient(store).get_run(res.run_id)
        m, tags, params = got.data.metrics, got.data.tags, got.data.params
        assert got.info.status == "FINISHED" and tags["cell"] == cell
        assert params["model.r_min"] == ("0.5" if cell == "lru" else "0.9")  # the ring keys are params too
        assert m["bptt/reference_max_err"] < 1e-9 and "grad/norm_recurrent" in m
        if cell == "lru":
            want = (T - 1) * math.log10(0.5)
            assert abs(m["bptt/log10_ratio"] - want) <= abs(want) * abs(math.log(math.log(2))) * EPS32
            assert m["spectral/pascanu_log10_bound"] == pytest.approx(m["bptt/log10_ratio"], abs=1e-9)
            assert m["spectral/radius"] == pytest.approx(0.5, rel=1e-7) and tags["regime"] == "vanishing"
            assert math.isfinite(m["bptt/lambda_log10_sensitivity"] + m["bptt/recurrent_log10_sensitivity"])
        else:
            assert "spectral/sigma_max" not in m and "spectral/pascanu_log10_bound" not in m
            assert m["bptt/log10_ratio"] <= m["spectral/gate_log10_bound"] + 1e-9
            assert tags["regime"] in ("vanishing", "healthy")


@pytest.mark.parametrize("cell", ["lru", "mingru"])
def test_memory_estimate_counts_every_parameter(cell):
    from pipeline.training.budget import n_params

    for task in ("adding", "copy"):
        cfg = load_config(None, [f"model.cell={cell}", f"task.name={task}", "model.hidden_size=12"])
        from pipeline.training.tasks import make_task

        t = make_task(task, cfg.task.seq_len)
        m = RNNModel(cfg.model, t.input_size, t.output_size, t.readout)
        assert n_params(cfg) == sum(p.numel() for p in m.parameters())


def test_lru_init_is_the_documented_ring_and_gaussians():
    """README, "Models" (Orvieto et al. 2023, section 3.3): gamma = sqrt(1 - |lambda|^2), B complex Gaussian
    with variance 1/(2 I) per part, C with 1/N per part, D dense N(0, 1/I)."""
    H, n_in = 64, 128
    p = model("lru", H=H, n_in=n_in, r_min=0.4, r_max=0.99).params()
    modulus = torch.exp(-torch.exp(p["nu_log"]))
    assert torch.allclose(torch.exp(p["gamma_log"]), torch.sqrt(1 - modulus**2), rtol=1e-5)
    for name, std in (
        ("B_re", 1 / math.sqrt(2 * n_in)),
        ("B_im", 1 / math.sqrt(2 * n_in)),
        ("C_re", 1 / math.sqrt(H)),
        ("C_im", 1 / math.sqrt(H)),
        ("D", 1 / math.sqrt(n_in)),
    ):
        assert p[name].std().item() == pytest.approx(std, rel=0.05), name
        assert abs(p[name].mean().item()) < 0.1 * std, name


def test_auto_scan_is_sequential_on_the_cpu_and_parallel_elsewhere():
    """README, "Models": the measured choice of ``scan: auto``; a name outside the two is refused."""
    from pipeline.training.modern import scan_for

    assert scan_for(torch.device("cpu"), "auto") == "sequential"
    assert scan_for(torch.device("cuda"), "auto") == "parallel"
    assert scan_for(torch.device("cpu"), "parallel") == "parallel"
    with pytest.raises(ValueError, match="unknown scan 'fast'"):
        scan_for(torch.device("cpu"), "fast")
