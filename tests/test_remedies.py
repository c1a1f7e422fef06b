"""Remedies beyond clipping (README, "Remedies beyond clipping"): Pascanu's Omega, gradient flossing, spike
skipping, each against an independent computation; their effect where it matters is a regression law
(configs/regression/smoke.yaml: ``tanh_omega_T50``, ``tanh_g0.5_floss``).

* the live twin params (``RNNModel.live_params``) carry the fused model's gradient, every cell;
* Omega equals an explicit-Jacobian, full-graph computation, and its gradient equals the formulation with
  previous states as autograd leaves (one ``torch.autograd.grad(create_graph=True)``), every cell kind;
  its direction survives a gradient that underflows float32;
* the differentiable Lyapunov spectrum: the sum of all exponents is mean log|det J_t| (slogdet of the
  explicit Jacobians), lambda_1 matches the float64 ``spectral/lyapunov_max``, gradcheck passes;
* the training step adds exactly weight x penalty;
* spike skipping: its decisions equal a numpy re-implementation of the rule; inside a real Trainer a
  planted spike that stops an unguarded run is skipped (optimizer state bit-identical across it) and
  recorded in the store; non-finite steps are skipped until ``max_consecutive`` stops the run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from pipeline.bptt import remedies, spectra, twin
from pipeline.config import ModelConfig, SkipConfig
from pipeline.schema import ConfigError
from pipeline.training import run as train
from pipeline.training.models import RNNModel
from pipeline.training.module import RECORD_FIELDS, RNNTrainingModule
from pipeline.training.remedies import APPLY, SKIP, STOP, SpikeSkip
from pipeline.training.tasks import make_task

CELLS = ("tanh", "relu", "lstm", "gru", "orthogonal", "indrnn")


def model(cell: str, task, H: int = 8, g: float = 1.2, init: str = "gaussian") -> RNNModel:
    init = "orthogonal" if cell == "orthogonal" else "default" if cell in twin.DIAGONAL_CELLS else init
    cfg = ModelConfig(cell=cell, hidden_size=H, init=init, init_scale=g if cell != "indrnn" else 0.9)
    return RNNModel(cfg, task.input_size, task.output_size, task.readout, seed=1)


def batch(task, n: int = 4, seed: int = 1, dtype=torch.float64):
    x, y = task.sample(n, torch.Generator().manual_seed(seed))
    return x.to(dtype), (y.to(dtype) if y.is_floating_point() else y)


# ----------------------------------------------------------------------------------- live twin params


@pytest.mark.parametrize("cell", CELLS)
def test_live_params_carry_the_fused_models_gradient(cell):
    """A loss on the twin unrolled over ``live_params()`` has the fused model's gradient, for every
    parameter (the orthogonal cell's parametrisation base included); ``params()`` is its detached copy."""
    task = make_task("adding", 10)
    m = model(cell, task).double()
    x, y = batch(task)
    fused = dict(
        zip(
            [n for n, _ in m.named_parameters()],
            torch.autograd.grad(task.loss(m(x), y), list(m.parameters())),
            strict=True,
        )
    )
    p = m.live_params()
    hT = twin.unroll(p, x)[-1][0]
    via_twin = torch.autograd.grad(task.loss(twin.readout(p, hT), y), list(m.parameters()), allow_unused=True)
    for (name, _), g in zip(m.named_parameters(), via_twin, strict=True):
        assert g is not None, f"{cell}: no gradient reaches {name} through live_params"
        torch.testing.assert_close(g, fused[name], rtol=1e-9, atol=1e-12, msg=f"{cell}: {name}")
    detached = m.params(torch.float64)
    for k, v in p.items():
        if torch.is_tensor(v):
            assert not detached[k].requires_grad and torch.equal(detached[k], v.detach())


# --------------------------------------------------------------------------------------------- Omega


def explicit_omega(p, x, y, loss_fn, readout):
    """Omega for tanh from full-graph autograd of every dL/dh_k and the explicit Jacobians diag(1-h_k^2) W."""
    B = x.shape[0]
    h = torch.zeros(B, p["W_hh"].shape[1], dtype=x.dtype, requires_grad=True)
    hs = [h]
    for t in range(x.shape[1]):
        h = torch.tanh(x[:, t] @ p["W_ih"].T + p["b_ih"] + h @ p["W_hh"].T + p["b_hh"])
        hs.append(h)
    H = torch.stack(hs[1:], 1)
    V = torch.autograd.grad(loss_fn(twin.readout(p, H[:, -1] if readout == "last" else H), y), hs[1:])
    terms = []
    for k, v in enumerate(V):
        J = (1 - hs[k + 1] ** 2)[:, :, None] * p["W_hh"][None]
        terms.append((torch.einsum("bi,bij->bj", v, J).norm(dim=1) / v.norm(dim=1) - 1) ** 2)
    return torch.stack(terms).mean()


@pytest.mark.parametrize("task_name", ["adding", "copy"])
def test_omega_equals_explicit_jacobians(task_name):
    """Pascanu eq. 9 (mean form) from explicit matrices; copy adds a direct loss term at every step."""
    task = make_task(task_name, 20)
    m = model("tanh", task)
    p = m.params()
    x, y = batch(task, 6)
    got = remedies.omega(p, x, y, task.loss, task.readout)
    assert float(got) > 1e-3  # not trivially zero
    torch.testing.assert_close(got, explicit_omega(p, x, y, task.loss, task.readout), rtol=1e-10, atol=0)


def leaf_omega(p, x, y, loss_fn, readout):
    """Omega by autograd only. v_k = dL/ds_k from a full-graph backward, taken at zero leaves added to each
    state (so for LSTM the c-gradient is the state's, not c's total through h_k = o tanh(c_k) in the same
    step); then the previous states stacked as leaves, the live step re-applied to them, and ONE
    torch.autograd.grad(create_graph=True) for all v_k J_k."""
    p0 = {k: v.detach() if torch.is_tensor(v) else v for k, v in p.items()}
    state = twin.init_state(p0, x.shape[0])
    states, probes = [state], []
    for gi in twin.input_projection(p0, x).unbind(1):
        nxt = twin.step_projected(p0, gi, state)
        e = tuple(torch.zeros_like(t, requires_grad=True) for t in nxt)
        state = tuple(t + z for t, z in zip(nxt, e, strict=True))
        states.append(state)
        probes.append(e)
    H = torch.stack([s[0] for s in states[1:]], 1)
    out = twin.readout(p0, H[:, -1] if readout == "last" else H, x[:, -1] if readout == "last" else x)
    n = len(state)
    flat = [z for e in probes for z in e]
    V = torch.autograd.grad(loss_fn(out, y), flat, allow_unused=True)  # c_T reaches no loss term
    V = [torch.zeros_like(z) if g is None else g for z, g in zip(flat, V, strict=True)]
    T, B = x.shape[1], x.shape[0]
    prev = tuple(torch.cat([s[i].detach() for s in states[:-1]]).requires_grad_() for i in range(n))
    v = tuple(torch.cat(V[i::n]) for i in range(n))
    gi = twin.input_projection(p, x).transpose(0, 1).reshape(T * B, -1)
    nxt = twin.step_projected(p, gi, prev)
    dot = sum((a * b).sum() for a, b in zip(nxt, v, strict=True))
    u = torch.autograd.grad(dot, prev, create_graph=True)
    num = torch.cat(u, dim=-1).norm(dim=-1)
    den = torch.cat(v, dim=-1).norm(dim=-1)
    ok = den > 0
    return ((num[ok] / den[ok] - 1) ** 2).mean()


@pytest.mark.parametrize("cell", ["tanh", "lstm", "gru", "indrnn", "lru", "mingru"])
def test_omega_gradient_equals_autograd_with_state_leaves(cell):
    """The hand-written batched VJP on live weights gives Omega and its gradient exactly as the autograd
    formulation (detached gradient and earlier states: the paper's approximation, eq. 10)."""
    task = make_task("adding", 15)
    m = model(cell, task).double()
    x, y = batch(task, 5)
    params = list(m.parameters())
    got = remedies.omega(m.live_params(), x, y, task.loss, task.readout)
    want = leaf_omega(m.live_params(), x, y, task.loss, task.readout)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    g_got = torch.autograd.grad(got, params, allow_unused=True)
    g_want = torch.autograd.grad(want, params, allow_unused=True)
    nonzero = 0
    for (name, _), a, b in zip(m.named_parameters(), g_got, g_want, strict=True):
        a = torch.zeros_like(_) if a is None else a
        b = torch.zeros_like(_) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12, msg=f"{cell}: {name}")
        nonzero += int(a.abs().sum() > 0)
    # the recurrent weights, and the input weights and biases through phi' (relu' is piecewise constant:
    # IndRNN's Jacobian diag(relu'(a)) u depends on u alone; lru's diag(lambda) reads nu and theta alone,
    # mingru's diag(1 - z_t) the gate's weight and bias alone)
    assert nonzero >= (1 if cell == "indrnn" else 2 if cell in ("lru", "mingru") else 3)


def test_omega_direction_survives_float32_underflow():
    """At g = 0.3 over T = 120 the gradient shrinks by ~1e-60, beyond float32 (flushed to zero): the walk
    is rescaled per sequence, so the float32 Omega is the float64 one."""
    task = make_task("adding", 120)
    m = model("tanh", task, H=16, g=0.3)
    x, y = batch(task, 4)
    want = remedies.omega(m.params(torch.float64), x, y, task.loss, task.readout)
    before = torch.is_grad_enabled()
    torch.set_flush_denormal(True)
    try:
        got = remedies.omega(m.params(torch.float32), x.float(), y.float(), task.loss, task.readout)
    finally:
        torch.set_flush_denormal(False)
    assert before == torch.is_grad_enabled()
    assert float(want) > 0.1  # the strongly contracting steps are far from norm-preserving
    assert abs(float(got) - float(want)) < 1e-4 * float(want)


# --------------------------------------------------------------------------------- Lyapunov spectrum


def test_full_spectrum_sums_to_mean_log_det():
    """sum_i lambda_i = mean_t log|det J_t| (the volume growth), with J_t = diag(1 - h_t^2) W built
    explicitly and its determinant by slogdet: independent of the QR recursion."""
    task = make_task("adding", 30)
    m = model("tanh", task, H=6, g=1.5)
    p = m.params()
    x, _ = batch(task, 3)
    lam = remedies.lyapunov_spectrum(p, x, k=6, burn_in=0)
    assert torch.all(lam[:-1] >= lam[1:] - 1e-9)  # descending
    logdet = []
    for (h,) in twin.unroll(p, x):
        J = (1 - h**2)[:, :, None] * p["W_hh"][None]
        logdet.append(torch.linalg.slogdet(J).logabsdet)
    torch.testing.assert_close(lam.sum(), torch.stack(logdet).mean(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("cell", "g"), [("tanh", 3.0), ("tanh", 0.5), ("lstm", 1.0), ("gru", 1.0), ("lru", 1.0), ("mingru", 1.0)]
)
def test_largest_exponent_matches_lyapunov_max(cell, g):
    """lambda_1 of the differentiable spectrum (k = 1 and k = 3) against the float64 one-tangent method
    the diagnostics log as spectral/lyapunov_max (other tangents, same trajectory)."""
    task = make_task("adding", 200)
    m = model(cell, task, H=16, g=g)
    x, _ = batch(task, 8)
    want = spectra.lyapunov_max(m.params(), x)
    for k in (1, 3):
        got = float(remedies.lyapunov_spectrum(m.params(torch.float32), x.float(), k)[0])
        assert abs(got - want) < 0.02, (k, got, want)


@pytest.mark.parametrize(("seq_len", "burn", "others"), [(50, 5, (4, 6)), (300, 10, (9, 30))])
def test_the_default_burn_in_is_a_tenth_of_the_sequence_at_most_ten_steps(seq_len, burn, others):
    """burn_in=None drops min(T // 10, 10) steps: T // 10 on a short sequence, 10 on a long one (T = 300,
    not 30)."""
    task = make_task("adding", seq_len)
    m = model("tanh", task, H=4, g=1.5)
    p = m.params()
    x, _ = batch(task, 2)
    assert x.shape[1] == seq_len
    lam = remedies.lyapunov_spectrum(p, x, k=2)
    torch.testing.assert_close(lam, remedies.lyapunov_spectrum(p, x, k=2, burn_in=burn), rtol=0, atol=0)
    for other in others:
        assert not torch.equal(lam, remedies.lyapunov_spectrum(p, x, k=2, burn_in=other)), other


def test_spectrum_gradient_passes_gradcheck():
    """The gradient of the exponents through the trajectory, the tangents and torch.linalg.qr, against
    finite differences (float64)."""
    task = make_task("adding", 8)
    m = model("tanh", task, H=3, g=1.3)
    p = m.params()
    x, _ = batch(task, 2)

    def f(w_hh, w_ih):
        return remedies.lyapunov_spectrum({**p, "W_hh": w_hh, "W_ih": w_ih}, x, k=2, burn_in=1)

    w = (p["W_hh"].clone().requires_grad_(), p["W_ih"].clone().requires_grad_())
    assert torch.autograd.gradcheck(f, w, eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------- the training step


@pytest.mark.parametrize("key", ["remedy.omega", "remedy.floss.weight"])
def test_training_step_adds_weight_times_penalty(tiny, key):
    """grad(w) - grad(0) is linear in the weight w, and at w = 1 is the gradient of the penalty alone."""
    task = make_task("adding", 12)
    x, y = batch(task, 16, dtype=torch.float32)

    def grads(w: float) -> list[torch.Tensor]:
        m = RNNTrainingModule(tiny(**{key: w}), task)
        return list(torch.autograd.grad(m.training_step((x, y), 0), list(m.parameters())))

    g0, g1, g2 = grads(0.0), grads(1.0), grads(2.0)
    m = RNNTrainingModule(tiny(), task)
    pen = (
        remedies.omega(m.model.live_params(), x, y, task.loss, task.readout)
        if key == "remedy.omega"
        else (remedies.lyapunov_spectrum(m.model.live_params(), x[:8], 1, seed=3) ** 2).sum()
    )
    alone = torch.autograd.grad(pen, list(m.parameters()), allow_unused=True)
    moved = 0.0
    for a0, a1, a2, ga in zip(g0, g1, g2, alone, strict=True):
        ga = torch.zeros_like(a0) if ga is None else ga
        torch.testing.assert_close(a1 - a0, ga, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a2 - a0, 2 * (a1 - a0), rtol=1e-3, atol=1e-6)
        moved += float((a1 - a0).abs().sum())
    assert moved > 1e-4


# ------------------------------------------------------------------------------------- spike skipping


def reference_decisions(values: np.ndarray, cfg: SkipConfig) -> list[int]:
    """The skip rule written again in numpy: one-sided z-score over the previous finite values (ddof 1)."""
    window: list[np.ndarray] = []
    out, streak = [], 0
    cols = {"both": [0, 1], "grad_norm": [0], "loss": [1]}[cfg.signal]
    for v in values:
        finite = bool(np.isfinite(v).all())
        spike = False
        if finite and len(window) >= cfg.warmup:
            w = np.array(window[-cfg.window :])
            spike = bool(((v - w.mean(0)) > cfg.zscore * w.std(0, ddof=1))[cols].any())
        if finite:
            window.append(v)
        if finite and not spike:
            out.append(APPLY)
            streak = 0
            continue
        streak += 1
        out.append(STOP if streak >= cfg.max_consecutive else SKIP)
    return out


@pytest.mark.parametrize("signal", ["both", "grad_norm", "loss"])
def test_skip_decisions_equal_a_numpy_reference(signal):
    rng = np.random.default_rng(0)
    values = np.abs(rng.normal(1.0, 0.1, size=(120, 2)))
    values[40, 0] *= 30  # a gradient-norm spike
    values[50] = (0.05, 0.05)  # a drop: ~10 sigma below, kept (one-sided, as OLMo-core)
    values[60, 1] *= 30  # a loss spike
    values[70:72] = np.nan  # two non-finite steps
    values[90, 0] = 1.35  # a mild outlier: ~3.5 sigma, under the threshold
    cfg = SkipConfig(zscore=6.0, window=16, warmup=8, signal=signal, max_consecutive=3)
    skip = SpikeSkip(cfg)
    got = [
        skip.decide(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
        for a, b in values
    ]
    want = reference_decisions(values, cfg)
    assert got == want
    assert got[40] == (SKIP if signal != "loss" else APPLY) and got[60] == (
        SKIP if signal != "grad_norm" else APPLY
    )
    assert got[50] == APPLY and got[70] == got[71] == SKIP and got[90] == APPLY and got[:8] == [APPLY] * 8
    assert skip.count == want.count(SKIP)


def test_skip_decisions_on_a_heavy_tailed_series():
    """Many values near a low threshold, so the details decide: the unbiased std, one-sided test, skipped
    finite values entering the window, the warm-up count, the streak."""
    values = np.random.default_rng(1).lognormal(0.0, 1.0, size=(400, 2))
    values[rng_rows(values, 7)] = np.nan
    cfg = SkipConfig(zscore=2.5, window=16, warmup=8, signal="both", max_consecutive=50)
    skip = SpikeSkip(cfg)
    got = [
        skip.decide(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
        for a, b in values
    ]
    want = reference_decisions(values, cfg)
    assert got == want and 20 < want.count(SKIP) < 200


def rng_rows(values: np.ndarray, n: int) -> np.ndarray:
    return np.random.default_rng(2).choice(np.arange(20, len(values)), size=n, replace=False)


def test_skip_state_survives_a_checkpoint():
    cfg = SkipConfig(zscore=3.0, window=8, warmup=4)
    a, b = SpikeSkip(cfg), SpikeSkip(cfg)
    vals = [torch.tensor(v, dtype=torch.float64) for v in (1.0, 1.1, 0.9, 1.05, 0.95, 1.0)]
    for v in vals:
        a.decide(v, v)
    b.load_state_dict(a.state_dict(), torch.device("cpu"))
    spike = torch.tensor(5.0, dtype=torch.float64)
    assert a.decide(spike, spike) == b.decide(spike, spike) == SKIP


def test_skipping_starts_at_exactly_warmup_finite_steps():
    """With ``warmup`` = 4 the fifth step (index 4: the window holds exactly 4 finite steps) is judged;
    a spike there is skipped, not let through."""
    skip = SpikeSkip(SkipConfig(zscore=3.0, window=8, warmup=4))
    for v in (1.0, 1.1, 0.9, 1.05):
        t = torch.tensor(v, dtype=torch.float64)
        assert skip.decide(t, t) == APPLY
    spike = torch.tensor(50.0, dtype=torch.float64)
    assert skip.decide(spike, spike) == SKIP and skip.count == 1


def test_any_positive_zscore_turns_skipping_on(tiny):
    """remedy.skip.zscore = 0 is off; any threshold above it (0.5 included) is on."""
    from pipeline.training.remedies import Remedies

    task = make_task("adding", 12)
    assert Remedies(tiny(), task).skip is None
    on = Remedies(tiny(**{"remedy.skip.zscore": 0.5, "remedy.skip.warmup": 8}), task)
    assert on.skip is not None and on.skip.cfg.zscore == 0.5


def test_flossing_stops_at_until(tiny):
    """remedy.floss.until = N: flossing on steps < N (every = 1: each of them), off from step N on."""
    from pipeline.training.remedies import Remedies

    cfg = tiny(**{"remedy.floss.weight": 1, "remedy.floss.every": 1, "remedy.floss.until": 5})
    r = Remedies(cfg, make_task("adding", 12))
    assert [r.flosses_at(s) for s in range(7)] == [True] * 5 + [False] * 2


def _snapshot(trainer, module) -> dict:
    opt = trainer.optimizers[0]
    names = {id(p): n for n, p in module.named_parameters()}
    return {
        "weights": {n: p.detach().clone() for n, p in module.named_parameters()},
        "state": {
            names[id(p)]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
            for p, s in opt.state.items()
        },
    }


def _same(a: dict, b: dict) -> bool:
    if a["state"].keys() != b["state"].keys():
        return False
    weights = all(torch.equal(a["weights"][n], b["weights"][n]) for n in a["weights"])
    state = all(
        (torch.equal(v, b["state"][n][k]) if torch.is_tensor(v) else v == b["state"][n][k])
        for n, s in a["state"].items()
        for k, v in s.items()
    )
    return weights and state


class PlantSpike(pl.Callback):
    """Targets scaled by ``factor`` at the steps ``at`` (the module reads this very batch); snapshots
    around the first of them."""

    def __init__(self, at: tuple[int, ...], factor: float):
        self.at, self.factor = at, factor
        self.before = self.after = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at[0]:
            self.before = _snapshot(trainer, pl_module)
        if trainer.global_step in self.at:
            batch[1].mul_(self.factor)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at[0] + 1:
            self.after = _snapshot(trainer, pl_module)


S = 12  # the planted step: after the warm-up of 8 finite steps
SKIP_ON = {"remedy.skip.zscore": 6, "remedy.skip.window": 16, "remedy.skip.warmup": 8}
SGD = {
    "optim.name": "sgd",
    "optim.lr": 0.05,
    "optim.momentum": 0.9,
    "trainer.max_steps": 25,
    "trainer.log_every": 1,
}


def test_finite_spike_is_skipped_with_optimizer_state_untouched(tiny):
    """A finite gradient spike (targets x 1e6, norm ~1e6 against ~1): unguarded, the update throws the
    readout ~1e5 away; skipped, weights and SGD's momentum buffers are bit-identical across the step."""
    unguarded = PlantSpike((S,), 1e6)
    train.run(tiny(**SGD, **{"tracking.enabled": False}), callbacks=[unguarded])
    assert not _same(unguarded.before, unguarded.after)
    jump = max(
        float((unguarded.after["weights"][n] - w).abs().max()) for n, w in unguarded.before["weights"].items()
    )
    assert jump > 1e3
    guarded = PlantSpike((S,), 1e6)
    r = train.run(tiny(**SGD, **SKIP_ON, **{"tracking.enabled": False}), callbacks=[guarded])
    assert guarded.before["state"] and _same(guarded.before, guarded.after)
    assert r.diverged_step is None and r.steps == 25 and r.metrics["train/skipped_steps"] == 1
    assert math.isfinite(r.val_loss) and r.val_loss_ratio < 2
    # the dropped step's norm (~1e6) never reached the weights: not the run's largest norm, nor its verdict
    # (it made the run `exploding` through diagnostics.explode_norm; a science audit)
    plain = train.run(tiny(**SGD, **{"tracking.enabled": False}))  # no spike
    assert plain.metrics["grad/max_norm_preclip"] < 100 and r.metrics["grad/max_norm_preclip"] < 100
    assert r.regime == plain.regime != "exploding"


def test_spike_that_stops_an_unguarded_run_is_trained_through_and_recorded(tiny, store):
    """Targets x 1e25 make the loss overflow float32 at step S: without skipping the guard stops the run
    there (diverged); with it the step is skipped and counted, training goes on, and the store says so."""
    plain = train.run(tiny(**SGD, **{"tracking.enabled": False}), callbacks=[PlantSpike((S,), 1e25)])
    assert plain.regime == "diverged" and plain.diverged_step == S
    r = train.run(tiny(**SGD, **SKIP_ON), callbacks=[PlantSpike((S,), 1e25)])
    assert r.diverged_step is None and r.regime != "diverged" and r.steps == 25
    assert math.isfinite(r.val_loss)
    from mlflow.tracking import MlflowClient

    c = MlflowClient(store)
    run = c.get_run(r.run_id)
    assert run.data.tags["remedy"] == "skip" and run.data.tags["skipped_steps"] == "1"
    assert run.data.metrics["train/skipped_steps"] == 1
    hist = [m.value for m in c.get_metric_history(r.run_id, "train/skipped_steps")]
    assert hist[0] == 0 and hist[-1] == 1
    import pandas as pd

    df = pd.read_parquet(c.download_artifacts(r.run_id, "diagnostics/grad_norms.parquet"))
    assert list(df.columns) == ["step", *RECORD_FIELDS]
    # the record's step counts optimizer steps taken (1-based): the step planted at global_step S is S + 1
    assert df.step.iloc[0] == 1 and df.loc[df.skipped == 1, "step"].tolist() == [S + 1]
    assert not np.isfinite(df.loc[df.step == S + 1, "loss"]).any()
    assert df.omega.isna().all() and df.floss.isna().all()


def test_consecutive_skips_stop_the_run_as_diverged(tiny):
    """max_consecutive = 3: non-finite steps S, S+1 are skipped, the third in a row stops the run there."""
    cfg = tiny(**SGD, **SKIP_ON, **{"remedy.skip.max_consecutive": 3, "tracking.enabled": False})
    r = train.run(cfg, callbacks=[PlantSpike((S, S + 1, S + 2), 1e25)])
    assert r.regime == "diverged" and r.diverged_step == S + 2 and r.steps == S + 3
    assert r.metrics["train/skipped_steps"] == 2


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("remedy.omega", -1),
        ("remedy.floss.weight", "nan"),
        ("remedy.floss.exponents", 9),  # > H = 8
        ("remedy.floss.every", 0),
        ("remedy.floss.until", 0),
        ("remedy.skip.zscore", -2),
        ("remedy.skip.window", 1),
        ("remedy.skip.warmup", 200),  # > window
        ("remedy.skip.signal", "gradient"),
        ("remedy.skip.max_consecutive", 0),
    ],
)
def test_bad_remedy_values_name_the_key(tiny, key, value):
    with pytest.raises(ConfigError) as e:
        tiny(**{key: value})
    assert e.value.key == key and "\n" not in str(e.value)


def test_floss_batch_is_checked_against_the_training_batch_only_when_flossing(tiny):
    tiny(**{"remedy.floss.batch": 64})  # flossing off: not read
    with pytest.raises(ConfigError, match="remedy.floss.batch"):
        tiny(**{"remedy.floss.batch": 64, "remedy.floss.weight": 1})


def test_remedy_keys_are_sweepable(tmp_path):
    """A sweep space over the nested remedy keys validates each end against the training config."""
    from pipeline.sweep.config import load_sweep

    f = tmp_path / "s.yaml"
    f.write_text(
        "study: t\nn_trials: 2\nbase: {task: {seq_len: 20}, model: {hidden_size: 8}}\n"
        "space:\n  remedy.omega: {low: 0.0, high: 2.0}\n  remedy.floss.exponents: {low: 1, high: 4}\n"
        "  remedy.skip.zscore: {choices: [0, 6]}\n"
    )
    sw = load_sweep(f)
    assert [p.key for p in sw.space] == ["remedy.omega", "remedy.floss.exponents", "remedy.skip.zscore"]
    assert sw.trial_config({"remedy.omega": 1.5}).remedy.omega == 1.5
    f.write_text(f.read_text().replace("high: 4}", "high: 9}"))  # 9 > H = 8 exponents
    with pytest.raises(ConfigError, match="space.remedy.floss.exponents"):
        load_sweep(f)


def test_every_cell_has_remedy_memory_coefficients():
    """The memory check prices Omega and flossing for every cell (a cell without coefficients crashed
    `remedy.omega=1 model.cell=lru` with a KeyError before training began)."""
    from pipeline.config import load_config
    from pipeline.names import CELLS as ALL_CELLS
    from pipeline.training.budget import estimate

    for cell in ALL_CELLS:
        own_init = (*twin.DIAGONAL_CELLS, "lem", "cornn")  # cells that keep their authors' init
        init = "default" if cell in own_init else "orthogonal" if cell == "orthogonal" else "gaussian"
        base = [f"model.cell={cell}", f"model.init={init}", "task.seq_len=50"]
        base += ["task.batch_size=512", "model.hidden_size=256"]  # the training pass is the largest one

        def training(est):
            return max(p.nbytes for p in est.passes)

        plain = training(estimate(load_config(None, base)))
        for key in ("remedy.omega=1", "remedy.floss.weight=1"):
            assert training(estimate(load_config(None, [*base, key]))) > plain, (cell, key)


@pytest.mark.parametrize(
    ("overrides", "tag"),
    [
        ([], "none"),
        (["remedy.skip.zscore=6"], "skip"),
        (["remedy.floss.weight=0.1"], "floss"),
        (["remedy.skip.zscore=3", "remedy.floss.weight=0.1", "remedy.omega=0.5"], "omega,floss,skip"),
    ],
)
def test_the_remedy_tag_names_exactly_the_remedies_switched_on(overrides, tag):
    """README, "The MLflow record": the tag ``remedy`` lists the remedies a run trained with, in the order
    omega, floss, skip, or ``none``; a remedy whose switch is at 0 (the default) is off."""
    from pipeline.config import load_config
    from pipeline.training.remedies import remedy_summary

    assert remedy_summary(load_config(None, overrides), None) == ({}, {"remedy": tag})


def test_window_metrics_in_the_store_are_the_records_mean_last_and_best(tiny, store):
    """What the store holds per log window (README, "The MLflow record"), against the per-step record
    ``diagnostics/grad_norms.parquet`` of the same run: ``remedy/omega`` is the mean of the window's
    ``omega`` column, ``remedy/floss`` the window's last flossing step (flossing every 2nd step, so the
    first and the last differ) with ``remedy/floss_lambda_1 .. _k`` its exponents (sum lambda_i^2 =
    floss), no ``train/skipped_steps`` without ``remedy.skip``; ``val/loss_ratio`` = val/loss / baseline at
    every validation and ``val/best_loss`` the smallest val/loss."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    k, every = 2, 5
    cfg = tiny(
        **{
            "remedy.omega": 0.1,
            "remedy.floss.weight": 0.01,
            "remedy.floss.exponents": k,
            "remedy.floss.every": 2,
            "trainer.log_every": every,
            "trainer.val_every": every,
        }
    )
    r = train.run(cfg)
    c = MlflowClient(store)
    run = c.get_run(r.run_id)
    m = run.data.metrics
    assert "train/skipped_steps" not in m and "skipped_steps" not in run.data.tags
    assert {n for n in m if n.startswith("remedy/floss_lambda_")} == {
        f"remedy/floss_lambda_{i}" for i in range(1, k + 1)
    }
    df = pd.read_parquet(c.download_artifacts(r.run_id, "diagnostics/grad_norms.parquet"))

    def hist(name):
        return {h.step: h.value for h in c.get_metric_history(r.run_id, name)}

    omega, floss = hist("remedy/omega"), hist("remedy/floss")
    lams = [hist(f"remedy/floss_lambda_{i}") for i in range(1, k + 1)]
    assert sorted(omega) == sorted(floss) == [5, 10, 15, 20]
    for s in omega:
        win = df[(df.step > s - every) & (df.step <= s)]  # the record's step is 1-based
        assert len(win) == every
        np.testing.assert_allclose(omega[s], win.omega.mean(), rtol=1e-6)
        flossed = win.floss.dropna()
        assert len(flossed) >= 2 and flossed.iloc[0] != flossed.iloc[-1]
        np.testing.assert_allclose(floss[s], flossed.iloc[-1], rtol=1e-6)
        np.testing.assert_allclose(sum(lam[s] ** 2 for lam in lams), floss[s], rtol=1e-5)
    val, ratio = hist("val/loss"), hist("val/loss_ratio")
    assert len(val) >= 3 and sorted(val) == sorted(ratio)
    baseline = m["task/baseline"]
    for s in val:
        np.testing.assert_allclose(ratio[s], val[s] / baseline, rtol=1e-12)
    assert min(val.values()) < val[max(val)]  # the best is not the last: the test can tell
    assert m["val/best_loss"] == min(val.values())
