"""BPTT diagnostics against theory and independent computation (Pascanu, Mikolov, Bengio 2013).

Every check compares real numbers: the functional twin against torch's fused modules, the rescaled
profile against a plain full-graph backward, Pascanu's theorem as a property over random weights,
closed forms where the Jacobian product is known exactly (orthogonal g*Q at the zero fixed point,
IndRNN's diagonal recurrence, LSTM's forget-gate path), and the Lyapunov exponent against mean-field
theory and the backward profile's own growth rate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.bptt import profile as bptt
from pipeline.bptt import spectra
from pipeline.bptt import twin as cells
from pipeline.names import CELLS
from pipeline.training.callbacks import long_frame

torch.set_num_threads(1)  # small RNNs: one intra-op thread is faster (README, "Configuration reference")

F64 = torch.float64
GATE_COUNT = {"lstm": 4, "gru": 3}


def mse(out, y):
    return ((out - y) ** 2).mean()


def random_params(cell, H=5, n_in=3, n_out=2, scale=1.0, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    G = GATE_COUNT.get(cell, 1)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=F64) * s).to(dtype)

    p = {
        "cell": cell,
        "W_ih": rnd(G * H, n_in, s=0.7),
        "b_ih": rnd(G * H, s=0.3),
        "W_hh": rnd(G * H, H, s=scale / math.sqrt(H)),
        "b_hh": rnd(G * H, s=0.3),
        "W_out": rnd(n_out, H),
        "b_out": rnd(n_out, s=0.1),
    }
    if cell == "indrnn":
        del p["W_hh"], p["b_hh"]
        p["u"] = (torch.rand(H, generator=gen, dtype=F64) * 1.6 - 0.8).to(dtype)
    # --- modern diagonal cells (pipeline.bptt.modern): their own entries ---
    if cell == "lru":  # |lambda| in (0.55, 0.95), phases in (0.1, 1.5): every (Re, Im) block mixes
        p = {"cell": cell, "W_out": p["W_out"], "b_out": p["b_out"]}
        p["nu_log"] = torch.log(-torch.log(0.55 + 0.4 * torch.rand(H, generator=gen, dtype=F64))).to(dtype)
        p["theta_log"] = torch.log(0.1 + 1.4 * torch.rand(H, generator=gen, dtype=F64)).to(dtype)
        p["gamma_log"] = rnd(H, s=0.3)
        p.update(B_re=rnd(H, n_in), B_im=rnd(H, n_in), C_re=rnd(H, H, s=0.5), C_im=rnd(H, H, s=0.5))
        p["D"] = rnd(H, n_in, s=0.5)
    elif cell == "mingru":
        p = {
            "cell": cell,
            "W_ih": rnd(2 * H, n_in),
            "b_ih": rnd(2 * H, s=0.5),
            "W_out": p["W_out"],
            "b_out": p["b_out"],
        }
    elif cell == "lem":  # blocks (dt1, dt2, z, y) of the input, (dt1, dt2, z) of y_{n-1}; Wy: z_n -> y_n
        p = {"cell": cell, "W_out": p["W_out"], "b_out": p["b_out"], "dt": 0.7}
        p.update(W_ih=rnd(4 * H, n_in, s=0.7), b_ih=rnd(4 * H, s=0.3), b_hh=rnd(3 * H, s=0.3))
        p.update(W_hh=rnd(3 * H, H, s=scale / math.sqrt(H)), W_y=rnd(H, H, s=scale / math.sqrt(H)))
        p["b_y"] = rnd(H, s=0.3)
    elif cell == "cornn":  # W_hh = [W_z | W] acting on [z, y]
        p = {"cell": cell, "W_out": p["W_out"], "b_out": p["b_out"], "dt": 0.3, "gamma": 1.5, "epsilon": 0.7}
        p.update(W_ih=rnd(H, n_in, s=0.7), b_ih=rnd(H, s=0.3), W_hh=rnd(H, 2 * H, s=scale / math.sqrt(H)))
    # --- end modern cells ---
    return p


def orthogonal(H, seed):
    gen = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(H, H, generator=gen, dtype=F64))
    return Q * torch.sign(torch.diagonal(R))  # Haar-distributed


def from_module(cell, mod, W_out, b_out):
    return {
        "cell": cell,
        "W_ih": mod.weight_ih_l0.detach(),
        "b_ih": mod.bias_ih_l0.detach(),
        "W_hh": mod.weight_hh_l0.detach(),
        "b_hh": mod.bias_hh_l0.detach(),
        "W_out": W_out,
        "b_out": b_out,
    }


# --------------------------------------------------------------------------------------------------
# The functional twin equals torch's fused modules


@pytest.mark.parametrize("cell", ["tanh", "relu", "lstm", "gru"])
def test_unroll_matches_torch_modules(cell):
    torch.manual_seed(0)
    B, T, n_in, H = 4, 11, 3, 6
    if cell in ("tanh", "relu"):
        mod = torch.nn.RNN(n_in, H, nonlinearity=cell, batch_first=True)
    else:
        mod = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](n_in, H, batch_first=True)
    mod = mod.to(F64)
    x = torch.randn(B, T, n_in, dtype=F64)
    with torch.no_grad():
        out, hn = mod(x)
        p = from_module(cell, mod, torch.randn(2, H, dtype=F64), torch.zeros(2, dtype=F64))
        states = cells.unroll(p, x)
    h = torch.stack([s[0] for s in states], dim=1)
    assert len(states) == T and cells.state_names(cell) == (("h", "c") if cell == "lstm" else ("h",))
    assert (h - out).abs().max().item() < 1e-10
    if cell == "lstm":
        assert (states[-1][1] - hn[1][0]).abs().max().item() < 1e-10
    # one step on an arbitrary state also agrees (the twin is used from any state)
    s0 = tuple(torch.randn(1, B, H, dtype=F64) for _ in cells.state_names(cell))
    with torch.no_grad():
        ref, _ = mod(x[:, :1], s0 if cell == "lstm" else s0[0])
        mine = cells.step(p, x[:, 0], tuple(s[0] for s in s0))
    assert (mine[0] - ref[:, 0]).abs().max().item() < 1e-10


# --------------------------------------------------------------------------------------------------
# The rescaled profile equals a plain full-graph backward


def full_graph_log10_norms(p, x, y, loss_fn, readout_mode):
    """Independent reference: unroll with retain_grad on every h_t (and c_t), one loss.backward()."""
    p = {k: v.detach().to(F64).requires_grad_() if torch.is_tensor(v) else v for k, v in p.items()}
    state = cells.init_state(p, x.shape[0], F64, x.device)
    hs, cs = [], []
    for x_t in x.to(F64).unbind(1):
        state = cells.step(p, x_t, state)
        for s in state:
            s.retain_grad()
        hs.append(state[0])
        cs.extend(state[1:])
    x64 = x.to(F64)  # the lru readout also reads the input of the same steps (D x_t)
    out = cells.readout(
        p, *((hs[-1], x64[:, -1]) if readout_mode == "last" else (torch.stack(hs, dim=1), x64))
    )
    loss_fn(out, y).backward()
    ref = {"h": np.array([math.log10(h.grad.norm().item()) for h in hs])}
    if cs:
        ref["c"] = np.array([math.log10(c.grad.norm().item()) for c in cs])
    return ref


def cross_entropy_all(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("readout_mode", ["last", "all"])
@pytest.mark.parametrize("cell", CELLS)
def test_profile_matches_full_graph_autograd(cell, readout_mode):
    B, T, n_in, H, n_out = 3, 9, 3, 5, 4
    gen = torch.Generator().manual_seed(1)
    # float32 weights on purpose: the profile must cast a float64 copy itself.
    p = random_params(cell, H, n_in, n_out, scale=1.2, seed=2, dtype=torch.float32)
    if cell == "orthogonal":
        p["W_hh"] = (0.9 * orthogonal(H, 3)).float()
    if cell == "indrnn":
        p["b_ih"] = p["b_ih"].abs() + 0.5  # keep most relu units alive (a dead unit is fine, but dull)
    x = torch.randn(B, T, n_in, generator=gen)
    if readout_mode == "last":
        y, loss_fn = torch.randn(B, n_out, generator=gen), mse
    else:
        y, loss_fn = torch.randint(0, n_out, (B, T), generator=gen), cross_entropy_all
    prof = bptt.profile(p, x, y, loss_fn, readout_mode)
    ref = full_graph_log10_norms(p, x, y, loss_fn, readout_mode)
    assert prof.T == T and set(prof.log10_norm) == set(cells.state_names(cell))
    for name, r in ref.items():
        got = prof.log10_norm[name]
        assert got.shape == (T,) and np.all(np.isfinite(got))
        np.testing.assert_allclose(got, r, rtol=0, atol=1e-8)


def full_graph_window_log10_norms(p, x, y, window):
    """Independent reference for the long-range profile: the window's loss terms written out directly
    (per-element cross-entropy summed over the window steps, divided by B*T as the task's mean does),
    one full-graph backward with retain_grad on every h_t and c_t."""
    p = {k: v.detach().to(F64).requires_grad_() if torch.is_tensor(v) else v for k, v in p.items()}
    state = cells.init_state(p, x.shape[0], F64, x.device)
    hs, cs = [], []
    for x_t in x.to(F64).unbind(1):
        state = cells.step(p, x_t, state)
        for st in state:
            st.retain_grad()
        hs.append(state[0])
        cs.extend(state[1:])
    out = cells.readout(p, torch.stack(hs, dim=1), x.to(F64))  # [B, T, O]
    per = F.cross_entropy(out.transpose(1, 2), y, reduction="none")  # [B, T]
    a, b = window
    (per[:, a - 1 : b].sum() / per.numel()).backward()
    ref = {"h": np.array([math.log10(h.grad.norm().item()) for h in hs])}
    if cs:
        ref["c"] = np.array([math.log10(c.grad.norm().item()) for c in cs])
    return ref


@pytest.mark.parametrize("cell", CELLS)
def test_long_range_profile_is_the_gradient_of_the_window_loss(cell):
    """Copy-like loss (a term at every step), window = the last 3 steps: "h" (and "c") must equal the
    gradient of the window's loss terms alone; "h_total" (and "c_total") the gradient of the whole loss."""
    B, T, n_in, H, n_out = 3, 9, 3, 5, 4
    window = (7, 9)
    gen = torch.Generator().manual_seed(11)
    p = random_params(cell, H, n_in, n_out, scale=1.2, seed=5)
    if cell == "orthogonal":
        p["W_hh"] = 0.9 * orthogonal(H, 3)
    if cell == "indrnn":
        p["b_ih"] = p["b_ih"].abs() + 0.5
    x = torch.randn(B, T, n_in, generator=gen, dtype=F64)
    y = torch.randint(0, n_out, (B, T), generator=gen)
    prof = bptt.profile(p, x, y, cross_entropy_all, "all", window=window)
    names = cells.state_names(cell)
    assert set(prof.log10_norm) == set(names) | {f"{n}_total" for n in names}
    assert prof.window == window and prof.reference_step == 7 and prof.is_propagation_only
    ref = full_graph_window_log10_norms(p, x, y, window)
    total = full_graph_log10_norms(p, x, y, cross_entropy_all, "all")
    for n in names:
        np.testing.assert_allclose(prof.log10_norm[n], ref[n], rtol=0, atol=1e-8)
        np.testing.assert_allclose(prof.log10_norm[f"{n}_total"], total[n], rtol=0, atol=1e-8)
    # Summaries are measured from the window's first step a = 7 back to t = 1.
    sm = bptt.summarize(prof)
    assert sm["log10_ratio"] == pytest.approx(ref["h"][0] - ref["h"][6], abs=1e-8)
    assert sm["log10_ratio_per_step"] == pytest.approx(sm["log10_ratio"] / 6, abs=1e-12)
    if "c" in ref:  # the cell state's ratio over the same span, not from T
        assert sm["c_log10_ratio"] == pytest.approx(ref["c"][0] - ref["c"][6], abs=1e-8)


def test_copy_task_window_is_the_recall_steps():
    from pipeline.training.tasks import make_task

    copy = make_task("copy", 100)
    assert copy.length == 120 and copy.window == (111, 120)
    _, y = copy.sample(4, torch.Generator().manual_seed(0))
    assert (y[:, :110] == 0).all() and (y[:, 110:] > 0).all()  # the window is exactly the non-blank targets
    assert make_task("adding", 50).window == (50, 50)
    assert make_task("temporal_order", 50).window == (50, 50)


def test_indrnn_exact_power_law_before_the_window():
    """IndRNN (Li 2018) with every unit active: before the window no loss term acts, so
    dL_w/dh_1 = u^(a-1) dL_w/dh_a exactly, even though the loss (copy-like) has a term at every step;
    Pascanu's bound (sigma_max = u) is then met with equality. The total profile does not obey it."""
    T, H, B, a = 300, 6, 3, 291
    gen = torch.Generator().manual_seed(2)
    p = {
        "cell": "indrnn",
        "W_ih": torch.rand(H, 2, generator=gen, dtype=F64),
        "b_ih": torch.full((H,), 0.1, dtype=F64),
        "u": torch.full((H,), 0.9, dtype=F64),
        "W_out": torch.randn(3, H, generator=gen, dtype=F64),
        "b_out": torch.zeros(3, dtype=F64),
    }
    x = torch.rand(B, T, 2, generator=gen, dtype=F64)  # positive inputs: relu' = 1 everywhere
    y = torch.randint(0, 3, (B, T), generator=gen)
    prof = bptt.profile(p, x, y, cross_entropy_all, "all", window=(a, T))
    lg = prof.log10_norm["h"]
    k = np.arange(1, a + 1)
    np.testing.assert_allclose(lg[:a] - lg[a - 1], (a - k) * math.log10(0.9), atol=1e-9)
    sm = bptt.summarize(prof)
    assert sm["log10_ratio"] == pytest.approx((a - 1) * math.log10(0.9), abs=1e-9)
    assert sm["decay_rate"] == pytest.approx(math.log(0.9), abs=1e-9)
    assert spectra.pascanu_log10_bound(p, prof.reference_step) == pytest.approx(sm["log10_ratio"], abs=1e-9)
    tot = prof.log10_norm["h_total"]
    assert tot[0] - tot[a - 1] > -1  # direct terms keep the total O(1) at every step: it says nothing


def test_profile_frame_and_summary_shapes():
    p = random_params("lstm", seed=4)
    x = torch.randn(2, 6, 3, dtype=F64)
    prof = bptt.profile(p, x, torch.randn(2, 2, dtype=F64), mse, "last")
    df = long_frame(prof, step=7)
    assert list(df.columns) == ["step", "t", "state", "log10_norm"]
    assert len(df) == 12 and set(df["state"]) == {"h", "c"} and (df["step"] == 7).all()
    assert sorted(df["t"].unique().tolist()) == list(range(1, 7))
    s = bptt.summarize(prof)
    assert set(s) == {
        "log10_ratio",
        "log10_ratio_per_step",
        "decay_rate",
        "horizon",
        "c_log10_ratio",
        "c_log10_ratio_per_step",
        "overflow_step",
    }
    assert s["overflow_step"] == 0.0 and s["log10_ratio_per_step"] == pytest.approx(s["log10_ratio"] / 5)
    assert all(isinstance(v, float) for v in s.values())


# --------------------------------------------------------------------------------------------------
# The default window and the summaries on hand-built profiles (exact numbers, no model)


def test_default_window_last_is_T_T_and_all_is_1_T():
    """readout "last", no window: (T, T), pure propagation from T (pass_metrics logs Pascanu's bound only
    then). readout "all": (1, T), and an explicit (1, T) is the same profile, not an error."""
    T = 7
    p = random_params("tanh", seed=2)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, T, 3, generator=gen, dtype=F64)
    prof = bptt.profile(p, x, torch.randn(2, 2, generator=gen, dtype=F64), mse, "last")
    assert prof.window == (T, T) and prof.window_start == T and prof.reference_step == T
    assert prof.is_propagation_only
    y = torch.randn(2, T, 2, generator=gen, dtype=F64)
    default = bptt.profile(p, x, y, mse, "all")
    explicit = bptt.profile(p, x, y, mse, "all", window=(1, T))
    assert default.window == explicit.window == (1, T)
    assert set(explicit.log10_norm) == {"h"}  # the whole loss: no separate total
    np.testing.assert_array_equal(explicit.log10_norm["h"], default.log10_norm["h"])
    assert not default.is_propagation_only  # a loss term at every step before T


def hand_profile(h):
    """A last-step profile with the given log10 norms (t = 1..T): reference step r = T."""
    h = np.asarray(h, dtype=np.float64)
    return bptt.Profile(cell="tanh", T=len(h), log10_norm={"h": h}, window=(len(h), len(h)))


def test_decay_rate_at_T_2_is_the_two_point_slope():
    """r = 2: the slope of two points (lags 0 and 1), ln(||dL/dh_1|| / ||dL/dh_2||), as documented."""
    s = bptt.summarize(hand_profile([-0.75, 0.5]))
    assert s["decay_rate"] == pytest.approx(-1.25 * math.log(10.0), rel=1e-14)
    p, x, y = zero_input_orthogonal(2, g=0.5)  # real profile: ||dL/dh_1|| = 0.5 ||dL/dh_2|| exactly
    s = bptt.summarize(bptt.profile(p, x, y, mse, "last"))
    assert s["decay_rate"] == pytest.approx(math.log(0.5), abs=1e-12)
    assert math.isnan(bptt.summarize(hand_profile([0.3]))["decay_rate"])  # r = 1: no slope


def test_decay_rate_leaves_the_lag_0_point_out():
    """From r >= 3 the slope is over lags 1..r-1: an outlier at lag 0 (the direct term at r) moves nothing."""
    back = np.array([5.0, -0.3, -0.6, -0.9, -1.2])  # back[k] = log10 ||dL/dh_{r-k}||; lag 0 is the outlier
    s = bptt.summarize(hand_profile(back[::-1]))
    assert s["decay_rate"] == pytest.approx(-0.3 * math.log(10.0), rel=1e-12)
    assert s["log10_ratio"] == pytest.approx(-6.2, abs=1e-12)


def test_horizon_threshold_side_and_zero_reference():
    """horizon: the first lag whose drop is strictly below -horizon_decades (a drop of exactly 3 decades is
    not past it); a gradient exactly zero at r (-inf) has no horizon: NaN, not r - 1."""
    back = np.array([0.0, -1.0, -3.0, -3.5, -5.0])  # exact in binary: rel = back
    assert bptt.summarize(hand_profile(back[::-1]))["horizon"] == 3.0
    assert bptt.summarize(hand_profile(back[::-1]), horizon_decades=2.5)["horizon"] == 2.0
    assert bptt.summarize(hand_profile([-1.0, -1.5, -2.0]))["horizon"] == 2.0  # never drops 3: r - 1
    s = bptt.summarize(hand_profile([-1.0, -2.0, -math.inf]))
    assert math.isnan(s["horizon"]) and s["log10_ratio"] == math.inf
    assert math.isnan(bptt.summarize(hand_profile([-math.inf] * 4))["horizon"])


# --------------------------------------------------------------------------------------------------
# Pascanu, Mikolov, Bengio 2013: ||dL/dh_k|| <= (gamma sigma_max)^(T-k) ||dL/dh_T|| (a theorem)


@pytest.mark.parametrize("cell", ["tanh", "relu"])
def test_pascanu_bound_holds_for_random_weights(cell):
    B, T, n_in, H = 3, 16, 3, 6
    gamma = cells.activation_gamma(cell)
    assert gamma == 1.0
    k = np.arange(1, T + 1)
    checked = 0
    for g in (0.3, 0.5, 0.9, 1.5):
        for seed in range(12):
            p = random_params(cell, H, n_in, 2, scale=g, seed=100 * seed + int(10 * g))
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(B, T, n_in, generator=gen, dtype=F64) * (0.5 + seed % 3)
            prof = bptt.profile(p, x, torch.randn(B, 2, generator=gen, dtype=F64), mse, "last")
            lg = prof.log10_norm["h"]
            rel = lg - lg[-1]
            bound = (T - k) * math.log10(gamma * spectra.spectrum(p)["sigma_max"])
            ok = np.isneginf(rel) | (rel <= bound + 1e-9)  # an exact zero (dead relu) satisfies it too
            assert ok.all(), (g, seed, (rel - bound).max())
            s = bptt.summarize(prof)
            assert s["log10_ratio"] <= spectra.pascanu_log10_bound(p, T) + 1e-9
            checked += 1
    assert checked == 48


@pytest.mark.parametrize("cell", ["tanh", "relu", "orthogonal"])
def test_pascanu_bound_holds_on_the_long_range_profile_not_on_the_total(cell):
    """With a loss term at every step, the long-range profile (window = last 4 steps) is pure propagation
    before the window, so the theorem bounds it from the window start; the total profile carries the
    direct term of step 1 and exceeds (gamma sigma_max)^(T-1) by many decades at small g: it is no
    bound there, which is why the bound is logged against the long-range ratio only."""
    B, T, n_in, H, n_out = 3, 24, 3, 6, 3
    violated_total = 0
    for g in (0.3, 0.6, 1.2):
        for seed in range(6):
            p = random_params(cell, H, n_in, n_out, scale=g, seed=7 * seed + int(10 * g))
            if cell == "orthogonal":
                p["W_hh"] = g * orthogonal(H, seed)
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(B, T, n_in, generator=gen, dtype=F64)
            y = torch.randint(0, n_out, (B, T), generator=gen)
            prof = bptt.profile(p, x, y, cross_entropy_all, "all", window=(T - 3, T))
            r = prof.reference_step
            assert r == T - 3 and prof.is_propagation_only
            lg = prof.log10_norm["h"]
            k = np.arange(1, r + 1)
            rel = lg[:r] - lg[r - 1]
            per_step = math.log10(spectra.spectrum(p)["sigma_max"])
            assert (np.isneginf(rel) | (rel <= (r - k) * per_step + 1e-9)).all(), (g, seed)
            assert bptt.summarize(prof)["log10_ratio"] <= spectra.pascanu_log10_bound(p, r) + 1e-9
            tot = prof.log10_norm["h_total"]
            violated_total += (tot[0] - tot[-1]) > spectra.pascanu_log10_bound(p, T) + 1
    assert violated_total >= 6  # every g = 0.3 case at least


# --------------------------------------------------------------------------------------------------
# Closed forms: exact Jacobian products, far below float64's range


def zero_input_orthogonal(T, g=0.5, H=16, B=2, seed=0):
    """tanh cell, W_hh = g*Q, zero inputs and biases: h_t = 0 for all t, so tanh'(0) = 1 and J_t = W
    exactly; ||W^T v|| = g ||v|| for every v, hence ||dL/dh_k|| = g^(T-k) ||dL/dh_T||."""
    gen = torch.Generator().manual_seed(seed)
    p = {
        "cell": "tanh",
        "W_ih": torch.randn(H, 2, generator=gen, dtype=F64),
        "b_ih": torch.zeros(H, dtype=F64),
        "W_hh": g * orthogonal(H, seed),
        "b_hh": torch.zeros(H, dtype=F64),
        "W_out": torch.randn(1, H, generator=gen, dtype=F64),
        "b_out": torch.zeros(1, dtype=F64),
    }
    return p, torch.zeros(B, T, 2, dtype=F64), torch.randn(B, 1, generator=gen, dtype=F64)


@pytest.mark.parametrize("T", [1000, 1400])
def test_underflow_profile_is_exact(T):
    p, x, y = zero_input_orthogonal(T)
    supported = torch.set_flush_denormal(True)  # as training leaves it
    try:
        prof = bptt.profile(p, x, y, mse, "last")
        assert bptt.flush_denormal_enabled() == supported  # restored after the exact pass
    finally:
        torch.set_flush_denormal(False)
    lg = prof.log10_norm["h"]
    assert np.all(np.isfinite(lg))
    expected = (T - 1) * math.log10(0.5)  # -300.7 at T=1000; -421.1 at T=1400: below float64's range
    s = bptt.summarize(prof)
    assert s["log10_ratio"] == pytest.approx(expected, abs=1e-6)
    if T == 1400:
        assert s["log10_ratio"] < -420
    np.testing.assert_allclose(lg - lg[-1], (T - np.arange(1, T + 1)) * math.log10(0.5), atol=1e-6)
    assert s["decay_rate"] == pytest.approx(math.log(0.5), abs=1e-6)
    assert s["horizon"] == 10.0  # first lag with k*log10(2) > 3
    assert spectra.pascanu_log10_bound(p, T) == pytest.approx(expected, abs=1e-9)  # tight here


def test_underflow_with_all_readout_stays_exact():
    """Readout "all": the direct loss terms (O(1)) are added in log space to a 1e-300-scale signal."""
    T = 800
    p, x, _ = zero_input_orthogonal(T)
    y = torch.randn(2, T, 1, generator=torch.Generator().manual_seed(5), dtype=F64)
    prof = bptt.profile(p, x, y, mse, "all")
    lg = prof.log10_norm["h"]
    # Outputs are all b_out = 0, so dL/dh_t = W_out^T (2/(B T)) (0 - y_t) + W^T dL/dh_{t+1}: compare with
    # a plain float64 recursion (no underflow risk here: the direct terms keep every total O(1)).
    W, w = p["W_hh"], p["W_out"][0]
    d = [(2.0 / (2 * T)) * (-y[:, t, 0])[:, None] * w[None, :] for t in range(T)]
    ref = [None] * T
    ref[-1] = d[-1]
    for t in range(T - 2, -1, -1):
        ref[t] = d[t] + ref[t + 1] @ W
    ref = np.array([math.log10(r.norm().item()) for r in ref])
    np.testing.assert_allclose(lg, ref, atol=1e-9)


def test_indrnn_exact_power_law():
    """IndRNN (Li 2018): with relu' = 1 everywhere, dL/dh_{t-1} = u * dL/dh_t, so ratio = u^(T-1)."""
    T, H, B = 400, 8, 3
    gen = torch.Generator().manual_seed(0)
    p = {
        "cell": "indrnn",
        "W_ih": torch.rand(H, 2, generator=gen, dtype=F64),
        "b_ih": torch.full((H,), 0.1, dtype=F64),
        "u": torch.full((H,), 0.9, dtype=F64),
        "W_out": torch.randn(1, H, generator=gen, dtype=F64),
        "b_out": torch.zeros(1, dtype=F64),
    }
    x = torch.rand(B, T, 2, generator=gen, dtype=F64)  # positive inputs -> positive pre-activations
    prof = bptt.profile(p, x, torch.randn(B, 1, generator=gen, dtype=F64), mse, "last")
    lg = prof.log10_norm["h"]
    np.testing.assert_allclose(lg - lg[-1], (T - np.arange(1, T + 1)) * math.log10(0.9), atol=1e-9)
    s = bptt.summarize(prof)
    assert s["log10_ratio"] == pytest.approx((T - 1) * math.log10(0.9), abs=1e-9)
    assert s["decay_rate"] == pytest.approx(math.log(0.9), abs=1e-9)
    assert spectra.spectrum(p) == {"sigma_max": pytest.approx(0.9), "radius": pytest.approx(0.9)}


@pytest.mark.parametrize("b_f", [0.0, 3.0])
def test_lstm_cell_path_decays_like_forget_gate(b_f):
    """LSTM with W_ih = W_hh = 0: every gate is a constant sigmoid/tanh of its bias. Then
    dc_t/dc_{t-1} = f = sigmoid(b_f) and h_{t-1} feeds nothing (W_hh = 0), so with a last-step loss
    dL/dh_t = 0 for t < T and dL/dc_t = f dL/dc_{t+1} exactly: c_log10_ratio = (T-1) log10 sigmoid(b_f).
    (With W_hh != 0 the h -> gates -> c coupling would add terms; here it is cut, so the check is exact.)"""
    T, H, B = 300, 4, 2
    gen = torch.Generator().manual_seed(1)
    b = torch.zeros(4 * H, dtype=F64)
    b[0:H], b[H : 2 * H], b[2 * H : 3 * H], b[3 * H :] = 0.5, b_f, 0.8, 0.2  # i, f, g, o
    p = {
        "cell": "lstm",
        "W_ih": torch.zeros(4 * H, 1, dtype=F64),
        "b_ih": b,
        "W_hh": torch.zeros(4 * H, H, dtype=F64),
        "b_hh": torch.zeros(4 * H, dtype=F64),
        "W_out": torch.randn(1, H, generator=gen, dtype=F64),
        "b_out": torch.zeros(1, dtype=F64),
    }
    x = torch.randn(B, T, 1, generator=gen, dtype=F64)
    prof = bptt.profile(p, x, torch.randn(B, 1, generator=gen, dtype=F64), mse, "last")
    s = bptt.summarize(prof)
    log_f = math.log10(1.0 / (1.0 + math.exp(-b_f)))
    assert s["c_log10_ratio"] == pytest.approx((T - 1) * log_f, abs=1e-9)
    assert np.isneginf(prof.log10_norm["h"][:-1]).all()  # exactly zero, reported honestly
    assert spectra.pascanu_log10_bound(p, T) is None


# --------------------------------------------------------------------------------------------------
# Spectra


def test_spectrum_orthogonal_and_gated():
    H = 12
    p = random_params("orthogonal", H=H, seed=0)
    p["W_hh"] = 0.7 * orthogonal(H, 1)
    sp = spectra.spectrum(p)
    assert sp["sigma_max"] == pytest.approx(0.7, abs=1e-12)
    assert sp["radius"] == pytest.approx(0.7, abs=1e-12)
    assert spectra.pascanu_log10_bound(p, 51) == pytest.approx(50 * math.log10(0.7), abs=1e-9)

    scales = {"i": 0.5, "f": 1.3, "g": 0.2, "o": 0.9}
    p = random_params("lstm", H=H, seed=1)
    p["W_hh"] = torch.cat([scales[gt] * orthogonal(H, 10 + j) for j, gt in enumerate("ifgo")])
    sp = spectra.spectrum(p)
    for gt, sc in scales.items():
        assert sp[f"sigma_max_{gt}"] == pytest.approx(sc, abs=1e-12)
        assert sp[f"radius_{gt}"] == pytest.approx(sc, abs=1e-12)
    assert sp["sigma_max"] == pytest.approx(1.3, abs=1e-12) and sp["radius"] == pytest.approx(1.3, abs=1e-12)
    assert {k for k in spectra.spectrum(random_params("gru", H=H)) if k.endswith("_z")} == {
        "sigma_max_z",
        "radius_z",
    }
    # float32 weights are measured in float64 and agree with numpy
    W = torch.randn(H, H)
    p = {**random_params("tanh", H=H), "W_hh": W}
    sp = spectra.spectrum(p)
    Wn = W.double().numpy()
    assert sp["sigma_max"] == pytest.approx(np.linalg.svd(Wn, compute_uv=False)[0], rel=1e-12)
    assert sp["radius"] == pytest.approx(np.abs(np.linalg.eigvals(Wn)).max(), rel=1e-12)


def test_indrnn_spectrum_is_the_largest_modulus():
    """IndRNN: J = diag(u relu'), so sigma_max = radius = max |u|, a negative u included."""
    p = random_params("indrnn", H=2)
    p["u"] = torch.tensor([-1.5, 0.5], dtype=F64)
    assert spectra.spectrum(p) == {"sigma_max": 1.5, "radius": 1.5}
    assert spectra.pascanu_log10_bound(p, 11) == pytest.approx(10 * math.log10(1.5), abs=1e-12)


def test_jacobian_bound_reads_only_the_first_T_steps():
    """The bound from reference step T uses steps 2..T of x, whatever x holds after T; on the zero-input
    g Q tanh net every J_t = g Q, so it is exactly (T - 1) log10 g."""
    p = random_params("tanh", seed=5)
    x = torch.randn(2, 12, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    T = 6
    assert spectra.jacobian_log10_bound(p, x, T) == spectra.jacobian_log10_bound(p, x[:, :T], T)
    p, x, _ = zero_input_orthogonal(20, g=0.5, H=6)
    assert spectra.jacobian_log10_bound(p, x, 8) == pytest.approx(7 * math.log10(0.5), abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Lyapunov exponent (Engelken et al. 2023) vs mean field and vs the backward profile


def gaussian_tanh(g, H, seed):
    gen = torch.Generator().manual_seed(seed)
    p = {
        "cell": "tanh",
        "W_ih": torch.eye(H, dtype=F64),  # x_t enters as a direct kick to h
        "b_ih": torch.zeros(H, dtype=F64),
        "W_hh": torch.randn(H, H, generator=gen, dtype=F64) * (g / math.sqrt(H)),
        "b_hh": torch.zeros(H, dtype=F64),
        "W_out": torch.randn(1, H, generator=gen, dtype=F64),
        "b_out": torch.zeros(1, dtype=F64),
    }
    return p, gen


def test_lyapunov_ordered_phase():
    """g = 0.5, zero input: h stays at 0, J_t = W, so lambda_1 = ln rho(W) (the spectral radius) for
    long T. Mean field says ln g; at H = 256 the spectral radius of a Gaussian matrix sits a few percent
    above g (edge fluctuations ~ H^-1/2: measured rho/g = 1.04-1.07), so we check ln rho tightly and
    ln g to 0.1."""
    H, T, B = 256, 300, 2
    p, _ = gaussian_tanh(0.5, H, seed=0)
    lam = spectra.lyapunov_max(p, torch.zeros(B, T, H, dtype=F64))
    assert lam == pytest.approx(math.log(spectra.spectrum(p)["radius"]), abs=0.02)
    assert lam == pytest.approx(math.log(0.5), abs=0.1)


def test_lyapunov_exact_for_scaled_orthogonal():
    """J_t = g Q at the zero fixed point: every tangent grows by exactly g per step."""
    p, x, _ = zero_input_orthogonal(200, g=0.8, H=10, B=3)
    assert spectra.lyapunov_max(p, x) == pytest.approx(math.log(0.8), abs=1e-12)


def gru_scalar_gate(z_pre):
    """GRU with W_hh = 0 and every unit's update gate the same sigmoid(z_pre_t) (one scalar input): then
    h_t = (1 - z_t) tanh(n(x_t)) + z_t h_{t-1}, so J_t = z_t I exactly and every tangent shrinks by z_t."""
    H = 3
    p = random_params("gru", H=H, n_in=1)
    p["W_ih"] = torch.cat([torch.zeros(H, 1), torch.ones(H, 1), torch.full((H, 1), 0.5)]).to(F64)
    p["b_ih"], p["b_hh"] = torch.zeros(3 * H, dtype=F64), torch.zeros(3 * H, dtype=F64)
    p["W_hh"] = torch.zeros(3 * H, H, dtype=F64)
    return p, torch.as_tensor(z_pre, dtype=F64)[..., None]


def test_lyapunov_counts_exactly_the_steps_after_the_burn_in():
    """lambda_1 = mean over steps burn+1..T of ln z_t (J_t = z_t I): checked in numpy from the gate values,
    every step different so that one step more or less in the count moves it; the default burn-in is
    min(T // 10, 10) (10 at T = 240, not T // 10 = 24)."""
    T = 240
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(2, T, generator=gen, dtype=F64) * 2.0
    p, x = gru_scalar_gate(pre)
    ln_z = -np.logaddexp(0.0, -pre.numpy())  # ln sigmoid
    for burn in (0, 1, 10, 24):
        want = ln_z[:, burn:].mean(axis=1).mean()
        assert spectra.lyapunov_max(p, x, burn_in=burn) == pytest.approx(want, abs=1e-12), burn
    assert spectra.lyapunov_max(p, x) == spectra.lyapunov_max(p, x, burn_in=10)
    assert spectra.lyapunov_max(p, x) == pytest.approx(ln_z[:, 10:].mean(), abs=1e-12)


def test_lyapunov_chaotic_phase_matches_mean_field_and_profile():
    """g = 3: chaotic. One random input kick at t = 1 puts h on the attractor (zero input, zero state
    would sit on the unstable fixed point 0 with lambda = ln rho ~ 1.1). Mean field: lambda_1 ~ 0.31
    (Engelken, Wolf, Abbott 2023); measured at H = 256, T = 300 over seeds 0-3: 0.294-0.300, so |err| < 0.04.
    The backward profile multiplies the transposes of the same Jacobians, whose growth rate is the same
    lambda_1 (singular values of a product and of its transpose agree); measured |decay_rate - lambda|
    <= 0.004 over those seeds, so 0.02 leaves room for finite-T fluctuation without hiding a wrong
    propagation (a missing tanh' would give ln rho ~ 1.1)."""
    H, T, B = 256, 300, 4
    p, gen = gaussian_tanh(3.0, H, seed=1)
    x = torch.zeros(B, T, H, dtype=F64)
    x[:, 0] = torch.randn(B, H, generator=gen, dtype=F64)
    lam = spectra.lyapunov_max(p, x)
    assert lam == pytest.approx(0.31, abs=0.04)
    prof = bptt.profile(p, x, torch.randn(B, 1, generator=gen, dtype=F64), mse, "last")
    s = bptt.summarize(prof)
    assert s["decay_rate"] == pytest.approx(lam, abs=0.02)
    assert s["log10_ratio"] > 0 and s["horizon"] == T - 1  # exploding: never drops 3 decades


def test_lyapunov_lstm_runs_on_joint_state_and_is_seeded():
    p = random_params("lstm", H=6, seed=3)
    x = torch.randn(2, 60, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    a, b = spectra.lyapunov_max(p, x, seed=7), spectra.lyapunov_max(p, x, seed=7)
    assert a == b and math.isfinite(a) and a < 0.5


def _indrnn_growing(H=4, T=60, B=3, u=1.5):
    """IndRNN with u_j = 1.5 for every unit, non-negative input weights and no bias: where the input is
    positive every unit is active and J_t = diag(u), so every tangent grows by exactly 1.5 a step; where the
    input is zero (and the state 0) every unit is dead and J_t = 0."""
    p = random_params("indrnn", H=H, n_in=1)
    p["u"] = torch.full((H,), u, dtype=F64)
    p["W_ih"], p["b_ih"] = p["W_ih"].abs(), torch.zeros(H, dtype=F64)
    return p, torch.ones(B, T, 1, dtype=F64)


def test_lyapunov_tangent_lost_in_the_burn_in_is_drawn_again():
    """From h_0 = 0 with no input every relu unit is dead for the first 3 steps (J = 0): the tangent is
    annihilated there, inside the burn-in, which the exponent leaves out. Drawn again, it reads the steps
    after: ln 1.5 exactly. It read -inf when the lost tangent was kept (an IndRNN whose gradients grew
    3 nats a step read lyapunov_max = -inf)."""
    p, x = _indrnn_growing()
    x[:, :3] = 0.0
    assert spectra.lyapunov_max(p, x, burn_in=5) == pytest.approx(math.log(1.5), abs=1e-12)


def test_lyapunov_one_lost_sequence_is_not_the_batch():
    """A sequence whose units are all dead at one step after the burn-in (a large negative input: its
    window's Jacobian product is zero) has exponent -inf; the others grow by 1.5 a step. The exponent is
    their mean, as the profile's norm over the batch reads the sequences that carry; -inf only when every
    sequence is lost."""
    p, x = _indrnn_growing()
    x[0, 20] = -1e12
    assert spectra.lyapunov_max(p, x, burn_in=5) == pytest.approx(math.log(1.5), abs=1e-12)
    x[:, 20] = -1e12
    assert spectra.lyapunov_max(p, x, burn_in=5) == -math.inf


def test_flush_denormal_probe_and_restore():
    torch.set_flush_denormal(False)
    assert not bptt.flush_denormal_enabled()
    if not torch.set_flush_denormal(True):
        pytest.skip("flush-denormal not supported on this CPU")
    try:
        assert bptt.flush_denormal_enabled()
        with bptt.exact_denormals():
            assert not bptt.flush_denormal_enabled()
        assert bptt.flush_denormal_enabled()
        with bptt.exact_denormals(restore_flush=False):
            pass
        assert not bptt.flush_denormal_enabled()
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("cell", ["tanh", "relu", "orthogonal", "lstm", "gru", "indrnn"])
def test_hand_written_step_derivatives_match_autograd(cell):
    """cells.step_vjp / step_jvp (the fast paths of profile and lyapunov_max) against torch.func."""
    g = torch.Generator().manual_seed(3)
    H, n_in, B = 6, 3, 4
    G = {"lstm": 4, "gru": 3}.get(cell, 1)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * 0.7

    p = {"cell": cell, "W_ih": r(G * H, n_in), "b_ih": r(G * H), "W_out": r(2, H), "b_out": r(2)}
    if cell == "indrnn":
        p["u"] = r(H)
    else:
        p.update(W_hh=r(G * H, H), b_hh=r(G * H))
    names = cells.state_names(p)
    state = tuple(r(B, H) for _ in names)
    gi = cells.input_projection(p, r(B, 1, n_in))[:, 0]
    _, cache = cells.step_cached(p, gi, state)
    v = tuple(r(B, H) for _ in names)
    q = tuple(r(B, H) for _ in names)

    def f(*s):
        return cells.step_projected(p, gi, s)

    _, vjp_fn = torch.func.vjp(f, *state)
    want_vjp = vjp_fn(v)
    got_vjp, _ = cells.step_vjp(p, cache, v)
    _, want_jvp = torch.func.jvp(f, state, q)
    got_jvp = cells.step_jvp(p, cache, q)
    for a, b in zip(got_vjp, want_vjp, strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    for a, b in zip(got_jvp, want_jvp, strict=True):
        assert torch.allclose(a, b, atol=1e-12)
