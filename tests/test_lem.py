"""The lem cell (Rusch, Erichson, Mahoney 2022, "Long Expressive Memory for Sequence Modeling") against
its equations and its laws.

The training layer is checked against the paper's eq. 3 written block by block and against the float64
twin (pipeline/bptt/lem.py); the twin's hand-written VJP and JVP against torch.func; the profile of the
state [y, z] against full-graph autograd and against an independent recursion with explicit Jacobian
matrices (pipeline/bptt/reference.py); the Jacobian-norm bound that replaces Pascanu's against the profile
of lem and of other cells (a theorem for every cell, tight for a diagonal J with equal moduli); planted
bugs in the VJP against the laws.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_step_derivatives_match_autograd

from pipeline.bptt import lem, reference, remedies, spectra
from pipeline.bptt import profile as bptt
from pipeline.bptt import twin as cells
from pipeline.config import DiagnosticsConfig, ModelConfig, load_config
from pipeline.schema import ConfigError
from pipeline.training.callbacks import verdict
from pipeline.training.models import RNNModel

F64 = torch.float64


def mse(out, y):
    return ((out - y) ** 2).mean()


def model(H=8, readout="last", n_in=3, n_out=2, seed=1, dt=1.0, cell="lem"):
    return RNNModel(ModelConfig(cell=cell, hidden_size=H, dt=dt), n_in, n_out, readout, seed=seed)


def adding_like(B, T, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(B, T, 2, generator=gen, dtype=F64)
    x[..., 1] = 0.0
    x[:, T // 4, 1] = x[:, 3 * T // 4, 1] = 1.0
    return x, torch.randn(B, 1, generator=gen, dtype=F64)


def paper_step(m, y, z, u):
    """Eq. 3 of the paper, one step, with every block named: dt1 gates z, dt2 gates y."""
    V1, V2, Vz, Vy = m.inp2hid.weight.chunk(4)
    c1, c2, cz, cy = m.inp2hid.bias.chunk(4)
    W1, W2, Wz = m.hid2hid.weight.chunk(3)
    e1, e2, ez = m.hid2hid.bias.chunk(3)
    dt1 = m.dt * torch.sigmoid(y @ W1.T + e1 + u @ V1.T + c1)
    dt2 = m.dt * torch.sigmoid(y @ W2.T + e2 + u @ V2.T + c2)
    z = (1 - dt1) * z + dt1 * torch.tanh(y @ Wz.T + ez + u @ Vz.T + cz)
    y = (1 - dt2) * y + dt2 * torch.tanh(m.transform_z(z) + u @ Vy.T + cy)
    return y, z


# --------------------------------------------------------------------------------------------------
# The training layer: the paper's equations, the twin, the authors' init


@pytest.mark.parametrize("readout", ["last", "all"])
def test_training_layer_is_the_papers_equations_and_the_twin(readout):
    m = model(readout=readout, dt=0.6).double()
    x = torch.randn(4, 60, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    with torch.no_grad():
        y = z = torch.zeros(4, 8, dtype=F64)
        ys = []
        for u in x.unbind(1):
            y, z = paper_step(m.rnn, y, z, u)
            ys.append(y)
        torch.testing.assert_close(m.rnn(x), torch.stack(ys, 1), rtol=0, atol=1e-14)
        p = m.params()
        hs = torch.stack([s[0] for s in cells.unroll(p, x)], dim=1)  # [B, T, 2H] = [y, z]
        torch.testing.assert_close(hs[:, -1, 8:], z, rtol=0, atol=1e-14)  # the state carries z too
        twin = cells.readout(p, hs[:, -1] if readout == "last" else hs)
        torch.testing.assert_close(m(x), twin, rtol=0, atol=1e-13)


def test_authors_init_and_parameter_groups():
    """Every weight and bias from U(-1/sqrt(H), 1/sqrt(H)) (the authors' reset_parameters), seeded: the same
    seed gives the same weights; the groups name the recurrence (hid2hid, transform_z) and the input."""
    H = 64
    a, b = model(H=H, seed=3), model(H=H, seed=3)
    for (name, p), q in zip(a.rnn.named_parameters(), b.rnn.parameters(), strict=True):
        assert torch.equal(p, q) and p.abs().max() <= 1 / math.sqrt(H), name
        assert p.abs().max() > 0.9 / math.sqrt(H), name  # uniform on the whole interval
    groups = {k: {id(p) for p in v} for k, v in a.param_groups().items()}
    assert (
        id(a.rnn.hid2hid.weight) in groups["recurrent"]
        and id(a.rnn.transform_z.weight) in groups["recurrent"]
    )
    assert id(a.rnn.inp2hid.weight) in groups["input"] and id(a.rnn.hid2hid.bias) in groups["bias"]


def test_training_gradients_equal_autograd_through_the_twin():
    m = model(H=6, readout="all", dt=0.5).double()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, 40, 3, generator=gen, dtype=F64), torch.randn(3, 40, 2, generator=gen, dtype=F64)
    mse(m(x), y).backward()
    p = {k: (v.requires_grad_() if torch.is_tensor(v) else v) for k, v in m.params().items()}
    hs = torch.stack([s[0] for s in cells.unroll(p, x)], dim=1)
    mse(cells.readout(p, hs), y).backward()
    r = m.rnn
    pairs = [(r.inp2hid.weight, "W_ih"), (r.inp2hid.bias, "b_ih"), (r.hid2hid.weight, "W_hh")]
    pairs += [(r.hid2hid.bias, "b_hh"), (r.transform_z.weight, "W_y"), (r.transform_z.bias, "b_y")]
    for mine, key in pairs:
        torch.testing.assert_close(mine.grad, p[key].grad, rtol=1e-10, atol=1e-12)


def test_live_params_carry_the_gradient_to_the_module():
    m = model(H=5)
    live = m.live_params()
    assert live["dt"] == 1.0 and live["W_hh"] is m.rnn.hid2hid.weight
    x = torch.randn(2, 7, 3)
    hs = torch.stack([s[0] for s in cells.unroll(live, x)], 1)
    cells.readout(live, hs[:, -1]).sum().backward()
    assert all(p.grad is not None for p in m.rnn.parameters())


# --------------------------------------------------------------------------------------------------
# The twin's derivatives and the profile of the whole state


@pytest.mark.parametrize("dt", [1.0, 0.05])
def test_hand_written_step_derivatives_match_autograd(dt):
    p = model(H=6, dt=dt).double().params()
    cache, gen = assert_step_derivatives_match_autograd(p, n_in=3, width=12)
    # the remedies' broadcast contract: cache [B, 1, H], k tangents [B, k, 2H]
    Q = torch.randn(4, 5, 12, generator=gen, dtype=F64)
    got = cells.step_jvp(p, tuple(c.unsqueeze(1) for c in cache), (Q,))[0]
    for k in range(5):
        torch.testing.assert_close(got[:, k], cells.step_jvp(p, cache, (Q[:, k],))[0], rtol=0, atol=1e-14)


@pytest.mark.parametrize(("readout", "window"), [("last", None), ("all", (31, 40))])
def test_profile_is_the_gradient_on_y_and_z_from_full_autograd(readout, window):
    """||dL_w/d(y_t, z_t)|| from the profile against retain_grad on every state of the twin's graph."""
    T = 40
    m = model(H=5, readout=readout, dt=0.4, n_out=3)
    p = m.params()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, T, 3, generator=gen, dtype=F64)
    y = torch.randn(3, 3, generator=gen, dtype=F64) if readout == "last" else torch.randn(3, T, 3, dtype=F64)
    prof = bptt.profile(p, x, y, mse, readout, window=window)
    state = tuple(s.requires_grad_() for s in cells.init_state(p, 3))  # a graph from h_0 on
    leaves = []  # each h_t keeps its .grad
    for gi in cells.input_projection(p, x).unbind(1):
        (h,) = cells.step_projected(p, gi, state)
        h.retain_grad()
        leaves.append(h)
        state = (h,)
    H = torch.stack(leaves, 1)
    if readout == "last":
        loss = mse(cells.readout(p, H[:, -1]), y)
    else:  # the window's terms of the mean over every step, with the loss's own normalisation
        a, b = window
        loss = ((cells.readout(p, H) - y) ** 2)[:, a - 1 : b].sum() / y.numel()
    loss.backward()
    want = np.log10([h.grad.norm().item() for h in leaves])
    np.testing.assert_allclose(prof.log10_norm["h"], want, rtol=0, atol=1e-10)
    assert np.abs(want[:-1]).max() > 0  # z's share reaches back: the gradient is not y's alone


@pytest.mark.parametrize("dt", [1.0, 0.3, 0.0242])
def test_independent_recursion_agrees_and_catches_planted_bugs(dt, monkeypatch):
    """The explicit-Jacobian recursion (numpy, reference.py) agrees with the profile to 1e-9 decades; a
    VJP that drops z_n's path into y_n (Wy), or uses W_hh where W_hh^T belongs, is off by far more."""
    p = model(H=12, n_in=2, n_out=1, dt=dt, seed=0).params()
    x, y = adding_like(6, 150)
    ref = reference.profile_log10(p, x, y, mse)
    assert reference.max_error(bptt.profile(p, x, y, mse).log10_norm["h"], ref) < 1e-9
    real = lem.step_vjp

    def no_wy(p_, cache, v):
        return real({**p_, "W_y": torch.zeros_like(p_["W_y"])}, cache, v)

    def transposed(p_, cache, v):
        W = p_["W_hh"]
        sq = torch.cat([blk.T for blk in W.chunk(3)], dim=0)  # each block transposed: W where W^T belongs
        return real({**p_, "W_hh": sq}, cache, v)

    for bug in (no_wy, transposed):
        monkeypatch.setattr(lem, "step_vjp", bug)
        assert reference.max_error(bptt.profile(p, x, y, mse).log10_norm["h"], ref) > 1e-3, bug.__name__


# --------------------------------------------------------------------------------------------------
# The Jacobian-norm bound: what replaces Pascanu's bound


@pytest.mark.parametrize(
    ("cell", "dt"), [("lem", 1.0), ("lem", 0.0242), ("tanh", 1.0), ("gru", 1.0), ("lstm", 1.0)]
)
def test_jacobian_bound_holds_for_every_cell(cell, dt):
    """A theorem: log10 ratio <= sum_t log10 max_b ||J_t||_2 (every cell; logged for lem). Each bound is
    checked against numpy's SVD of the Jacobians built by torch.func.jacrev, per step and sequence."""
    T = 30
    p = model(H=6, n_in=2, n_out=1, dt=dt, cell=cell).params()
    x, y = adding_like(4, T)
    s = bptt.summarize(bptt.profile(p, x, y, mse))
    bound = spectra.jacobian_log10_bound(p, x, T)
    assert s["log10_ratio"] <= bound + 1e-9
    state, want = cells.init_state(p, 4, F64), 0.0
    for t, gi in enumerate(cells.input_projection(p, x).unbind(1), start=1):
        new = cells.step_projected(p, gi, state)
        if t >= 2:
            top = 0.0
            for b in range(4):

                def f(*s, b=b, gi=gi):
                    return torch.cat(cells.step_projected(p, gi[b : b + 1], tuple(v[None] for v in s)), -1)[0]

                jac = torch.func.jacrev(f, argnums=tuple(range(len(state))))(*(v[b] for v in state))
                top = max(top, float(np.linalg.norm(torch.cat(jac, -1).numpy(), 2)))
            want += math.log10(top)
        state = new
    assert bound == pytest.approx(want, abs=1e-10)


def test_jacobian_bound_is_tight_for_equal_moduli():
    """lru with every |lambda_j| = r: J = diag(lambda) acting on (Re, Im) pairs, ||J||_2 = r, so the bound
    is (T-1) log10 r, the profile exactly (the equality case of submultiplicativity)."""
    T, r = 200, 0.9
    p = RNNModel(ModelConfig(cell="lru", hidden_size=8, r_min=r, r_max=r), 2, 1, "last", seed=0).params()
    p["nu_log"] = torch.full((8,), math.log(-math.log(r)), dtype=F64)
    x, y = adding_like(3, T)
    s = bptt.summarize(bptt.profile(p, x, y, mse))
    assert spectra.jacobian_log10_bound(p, x, T) == pytest.approx((T - 1) * math.log10(r), abs=1e-9)
    assert s["log10_ratio"] == pytest.approx((T - 1) * math.log10(r), abs=1e-9)


def test_planted_growth_breaks_the_jacobian_bound(monkeypatch):
    """A VJP whose z retention reads 1 + dt1 (a sign slip) carries the gradient back growing: the profile
    then exceeds the bound computed from the (correct) JVP, so the law fails."""
    p = model(H=8, n_in=2, n_out=1, dt=0.5, seed=0).params()
    x, y = adding_like(4, 100)
    real = lem.step_vjp

    def sign_slip(p_, cache, v):
        (g,), _ = real(p_, cache, v)
        s1 = cache[0]
        half = g.shape[-1] // 2
        return (
            torch.cat([g[..., :half], g[..., half:] * (1 + p_["dt"] * s1) / (1 - p_["dt"] * s1)], -1),
        ), None

    bound = spectra.jacobian_log10_bound(p, x, 100)
    assert bptt.summarize(bptt.profile(p, x, y, mse))["log10_ratio"] <= bound
    monkeypatch.setattr(lem, "step_vjp", sign_slip)
    assert bptt.summarize(bptt.profile(p, x, y, mse))["log10_ratio"] > bound + 1


def test_lyapunov_exponent_is_below_the_mean_log_jacobian_norm():
    """lambda_1 <= mean over steps 2..T of ln max_b ||J_t||_2 (each tangent grows at most by the norm),
    i.e. the Jacobian bound in nats per step; dt small keeps every step near the identity (J = I + O(dt))."""
    T = 120
    for dt in (1.0, 0.0242):
        p = model(H=8, n_in=2, n_out=1, dt=dt, seed=0).params()
        x, _ = adding_like(4, T)
        lyap = spectra.lyapunov_max(p, x, burn_in=1)
        assert lyap <= spectra.jacobian_log10_bound(p, x, T) * math.log(10) / (T - 1) + 1e-12
        if dt < 0.1:
            assert abs(lyap) < 0.05


# --------------------------------------------------------------------------------------------------
# Spectra, verdict, remedies, configuration


def test_spectrum_per_recurrent_matrix():
    p = model(H=10).params()
    s = spectra.spectrum(p)
    W = p["W_hh"].numpy()
    want = {"dtz": W[:10], "dty": W[10:20], "z": W[20:], "y": p["W_y"].numpy()}
    for k, M in want.items():
        assert s[f"sigma_max_{k}"] == pytest.approx(np.linalg.norm(M, 2), rel=1e-12)
        assert s[f"radius_{k}"] == pytest.approx(np.abs(np.linalg.eigvals(M)).max(), rel=1e-10)
    assert s["sigma_max"] == max(s[f"sigma_max_{k}"] for k in want)
    assert s["radius"] == max(s[f"radius_{k}"] for k in want)  # spectral/radius: the largest
    assert min(s[f"radius_{k}"] for k in want) < s["radius"]
    assert spectra.pascanu_log10_bound(p, 100) is None  # not a theorem for lem


def test_verdict_reads_the_time_step():
    """At the authors' init, dt = 1 lets each step halve what z and y keep (dt1 ~ 0.5): vanishing; dt =
    0.0242 (their adding setting) keeps 99% per step: healthy."""
    T, d = 100, DiagnosticsConfig()
    x, y = adding_like(8, T)

    def regime(dt):
        p = model(H=32, n_in=2, n_out=1, dt=dt, seed=0).params()
        s = bptt.summarize(bptt.profile(p, x, y, mse))
        return verdict(False, {f"bptt/{k}": v for k, v in s.items()}, None, d)

    assert regime(1.0) == "vanishing" and regime(0.0242) == "healthy"


def test_remedies_run_on_the_two_state_cell():
    """Omega and the Lyapunov spectrum through lem's live step: finite, differentiable, and k up to 2H (the
    state [y, z]); lambda_1 of the QR method matches lyapunov_max."""
    m = model(H=4, n_in=2, n_out=1, dt=0.5, seed=0)
    x = torch.rand(3, 30, 2, generator=torch.Generator().manual_seed(0))
    y = torch.randn(3, 1)
    om = remedies.omega(m.live_params(), x, y, mse)
    lam = remedies.lyapunov_spectrum(m.live_params(), x, k=8)
    (om + (lam**2).sum()).backward()
    assert torch.isfinite(om) and m.rnn.hid2hid.weight.grad.abs().sum() > 0
    with torch.no_grad():  # float64: the same seeded tangent as lyapunov_max (randn differs per dtype)
        one = remedies.lyapunov_spectrum(m.double().live_params(), x.double(), k=1)
    assert one.item() == pytest.approx(spectra.lyapunov_max(m.params(), x.double()), abs=1e-12)
    assert lam[0].item() >= lam[-1].item()
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        remedies.lyapunov_spectrum(m.live_params(), x, k=9)
    cfg = load_config(None, ["model.cell=lem", "model.hidden_size=4", "remedy.floss.exponents=8"])
    assert cfg.remedy.floss.exponents == 8
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.cell=lem", "model.hidden_size=4", "remedy.floss.exponents=9"])
    assert e.value.key == "remedy.floss.exponents" and "[1, 8]" in str(e.value)


@pytest.mark.parametrize("value", ["0", "-0.1", "1.5", ".nan", ".inf"])
def test_bad_dt_names_the_key_in_one_line(value):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.cell=lem", f"model.dt={value}"])
    assert e.value.key == "model.dt" and "(0, 1]" in str(e.value) and "\n" not in str(e.value)


def test_lem_keeps_its_own_init():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.cell=lem", "model.init=orthogonal"])
    assert e.value.key == "model.init" and "lem keeps its authors' init" in str(e.value)


def test_memory_estimate_counts_every_parameter():
    from pipeline.training.budget import n_params
    from pipeline.training.tasks import make_task

    for task in ("adding", "copy"):
        cfg = load_config(None, ["model.cell=lem", f"task.name={task}", "model.hidden_size=12"])
        t = make_task(task, cfg.task.seq_len)
        m = RNNModel(cfg.model, t.input_size, t.output_size, t.readout)
        assert n_params(cfg) == sum(p.numel() for p in m.parameters())


def test_real_run_records_the_laws(store, tiny):
    """A real training run, read back from the store: the Jacobian bound, the reference recursion, the
    spectra per matrix, no Pascanu bound; Omega trains through the twin."""
    from mlflow.tracking import MlflowClient

    from pipeline.training.run import run

    over = {"task.seq_len": 30, "diagnostics.reference_check": True, "trainer.max_steps": 2}
    over.update(
        {"trainer.val_every": 2, "diagnostics.profile_every": 0, "model.cell": "lem", "remedy.omega": 0.1}
    )
    res = run(tiny(**over, **{"model.dt": 0.5}))
    got = MlflowClient(store).get_run(res.run_id)
    m, tags = got.data.metrics, got.data.tags
    assert got.info.status == "FINISHED" and tags["cell"] == "lem"
    assert got.data.params["model.dt"] == "0.5"
    assert m["bptt/reference_max_err"] < 1e-9
    assert m["bptt/log10_ratio"] <= m["spectral/jacobian_log10_bound"] + 1e-9
    assert "spectral/sigma_max_dtz" in m and "spectral/pascanu_log10_bound" not in m
    assert math.isfinite(m["remedy/omega"]) and math.isfinite(m["spectral/lyapunov_max"])


def test_smoke_laws_catch_a_planted_vjp_bug(store, monkeypatch):
    """configs/regression/smoke.yaml's lem entries, run through the suite machinery (real training runs,
    the store read back), fail on a VJP whose z retention reads 1 + dt1: the reference law on both, and
    the Jacobian bound where the gradient then grows past it (dt = 1)."""
    from dataclasses import replace

    from conftest import ROOT

    from pipeline.regression.laws import LAW
    from pipeline.regression.run import collect, judge_entries, run_entry, start_suite_run
    from pipeline.regression.suite import load_suite

    real = lem.step_vjp

    def sign_slip(p_, cache, v):
        (g,), _ = real(p_, cache, v)
        keep, half = 1 - p_["dt"] * cache[0], g.shape[-1] // 2
        return (torch.cat([g[..., :half], g[..., half:] * (2 - keep) / keep], -1),), None

    monkeypatch.setattr(lem, "step_vjp", sign_slip)
    suite = load_suite(ROOT / "configs" / "regression" / "smoke.yaml")
    names = ("lem_dt1_T100", "lem_dt0.0242_T100")
    suite = replace(suite, entries=tuple(e for e in suite.entries if e.name in names), compare=())
    parent, exp = start_suite_run(suite)
    results = collect(suite, {n: run_entry(suite, n, parent, exp) for n in names}, parent)
    rows = {r.check: r for r in judge_entries(suite, results, {})}
    for n in names:
        assert rows[f"{n}: metric_below bptt/reference_max_err"].verdict == LAW
    assert rows["lem_dt1_T100: jacobian_bound_holds"].verdict == LAW
