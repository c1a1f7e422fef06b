"""The cornn cell (Rusch & Mishra 2021, "Coupled Oscillatory Recurrent Neural Network (coRNN)") against
its equations and the laws it shares with lem (tests/test_lem.py): the training layer equals the authors'
cell (one nn.Linear over [u, z, y]) and the float64 twin; the twin's VJP and JVP equal torch.func; the
profile of [y, z] equals the explicit-Jacobian recursion; the Jacobian-norm bound holds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_step_derivatives_match_autograd

from pipeline.bptt import cornn, reference, remedies, spectra
from pipeline.bptt import profile as bptt
from pipeline.bptt import twin as cells
from pipeline.config import ModelConfig, load_config
from pipeline.schema import ConfigError
from pipeline.training.models import RNNModel

F64 = torch.float64


def mse(out, y):
    return ((out - y) ** 2).mean()


def model(H=8, readout="last", n_in=3, n_out=2, seed=1, dt=0.3, gamma=2.0, epsilon=0.5):
    cfg = ModelConfig(cell="cornn", hidden_size=H, dt=dt, gamma=gamma, epsilon=epsilon)
    return RNNModel(cfg, n_in, n_out, readout, seed=seed)


def test_training_layer_is_the_authors_cell_and_the_twin():
    """The authors' coRNNCell: hz += dt (tanh(i2h([x, hz, hy])) - gamma hy - epsilon hz); hy += dt hz, with
    i2h = [V | W_z | W] and its bias b, rebuilt here from our two layers."""
    m = model(dt=0.2).double()
    r = m.rnn
    x = torch.randn(4, 50, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    i2h = torch.cat([r.inp.weight, r.rec.weight], dim=1)  # [H, I + 2H] over [x, hz, hy]
    with torch.no_grad():
        hy = hz = torch.zeros(4, 8, dtype=F64)
        ys = []
        for u in x.unbind(1):
            pre = torch.cat([u, hz, hy], 1) @ i2h.T + r.inp.bias
            hz = hz + r.dt * (torch.tanh(pre) - r.gamma * hy - r.epsilon * hz)
            hy = hy + r.dt * hz
            ys.append(hy)
        torch.testing.assert_close(r(x), torch.stack(ys, 1), rtol=0, atol=1e-13)
        p = m.params()
        hs = torch.stack([s[0] for s in cells.unroll(p, x)], dim=1)
        torch.testing.assert_close(hs[:, -1], torch.cat([hy, hz], 1), rtol=0, atol=1e-13)
        torch.testing.assert_close(m(x), cells.readout(p, hs[:, -1]), rtol=0, atol=1e-13)
    assert i2h.abs().max() <= 1 / np.sqrt(3 + 16)  # nn.Linear's init of the authors' layer


def test_hand_written_step_derivatives_match_autograd():
    assert_step_derivatives_match_autograd(model(H=6).double().params(), n_in=3, width=12)


@pytest.mark.parametrize(("dt", "gamma", "epsilon"), [(0.05, 1.0, 1.0), (0.3, 2.7, 4.7), (1.0, 1.0, 1.0)])
def test_profile_reference_and_jacobian_bound(dt, gamma, epsilon, monkeypatch):
    """The explicit-Jacobian recursion agrees within 1e-9 decades; the bound holds; a VJP without the
    dt dL/dy_n term in dL/dz_n (y_n = y_{n-1} + dt z_n) leaves the recursion."""
    p = model(H=12, n_in=2, n_out=1, seed=0, dt=dt, gamma=gamma, epsilon=epsilon).params()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 120, 2, generator=gen, dtype=F64), torch.randn(6, 1, generator=gen, dtype=F64)
    ref = reference.profile_log10(p, x, y, mse)
    prof = bptt.profile(p, x, y, mse)
    assert reference.max_error(prof.log10_norm["h"], ref) < 1e-9
    assert bptt.summarize(prof)["log10_ratio"] <= spectra.jacobian_log10_bound(p, x, 120) + 1e-9
    real = cornn.step_vjp

    def dropped(p_, cache, v):
        g_y, g_z = v[0].chunk(2, dim=-1)
        (out,), _ = real(p_, cache, (torch.cat([g_y, g_z - p_["dt"] * g_y], -1),))
        return (out,), None

    monkeypatch.setattr(cornn, "step_vjp", dropped)
    assert reference.max_error(bptt.profile(p, x, y, mse).log10_norm["h"], ref) > 1e-3


def test_spectrum_remedies_and_budget():
    m = model(H=4, n_in=2, n_out=1, seed=0)
    p = m.params()
    s = spectra.spectrum(p)
    assert s["sigma_max_y"] == pytest.approx(np.linalg.norm(p["W_hh"][:, 4:].numpy(), 2), rel=1e-12)
    for k, M in (("z", p["W_hh"][:, :4].numpy()), ("y", p["W_hh"][:, 4:].numpy())):
        assert s[f"radius_{k}"] == pytest.approx(np.abs(np.linalg.eigvals(M)).max(), rel=1e-10)
    assert s["radius"] == max(s["radius_z"], s["radius_y"]) > min(s["radius_z"], s["radius_y"])
    assert s["sigma_max"] == max(s["sigma_max_z"], s["sigma_max_y"])
    assert spectra.pascanu_log10_bound(p, 50) is None
    x, y = torch.rand(3, 30, 2), torch.randn(3, 1)
    om = remedies.omega(m.live_params(), x, y, mse)
    lam = remedies.lyapunov_spectrum(m.live_params(), x, k=8)  # the state [y, z]: k up to 2H
    (om + (lam**2).sum()).backward()
    assert torch.isfinite(om) and m.rnn.rec.weight.grad.abs().sum() > 0
    from pipeline.training.budget import n_params
    from pipeline.training.tasks import make_task

    for task in ("adding", "copy"):
        cfg = load_config(None, ["model.cell=cornn", f"task.name={task}", "model.hidden_size=12"])
        t = make_task(task, cfg.task.seq_len)
        assert n_params(cfg) == sum(
            q.numel() for q in RNNModel(cfg.model, t.input_size, 1, "last").rnn.parameters()
        ) + (t.output_size * 12 + t.output_size)


@pytest.mark.parametrize(
    ("override", "key"),
    [("model.gamma=-1", "model.gamma"), ("model.epsilon=.nan", "model.epsilon"), ("model.dt=0", "model.dt")],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.cell=cornn", override])
    assert e.value.key == key and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.cell=cornn", "model.init=gaussian"])
    assert e.value.key == "model.init"


@pytest.mark.parametrize("cell", ["cornn", "lem", "tanh"])
def test_a_profile_pass_logs_the_jacobian_bound_for_cornn_and_lem_alone(cell):
    """README, "The science in one screen": ``spectral/jacobian_log10_bound`` is logged for ``lem`` and
    ``cornn`` only (a pass's metrics, :func:`pipeline.training.probe.pass_metrics`, as the run logs
    them), equal to the product of the step-Jacobian norms and above the measured ratio."""
    from pipeline.training.probe import pass_metrics

    cfg = ModelConfig(cell=cell, hidden_size=6, init="default" if cell != "tanh" else "gaussian")
    p = RNNModel(cfg, 3, 2, "last", seed=1).params(F64)
    x = torch.randn(4, 25, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    prof = bptt.profile(p, x, y, mse)
    m = pass_metrics(p, prof, 3.0, x)
    if cell == "tanh":
        assert "spectral/jacobian_log10_bound" not in m and "spectral/pascanu_log10_bound" in m
        return
    assert m["spectral/jacobian_log10_bound"] == pytest.approx(
        spectra.jacobian_log10_bound(p, x, 25), abs=1e-12
    )
    assert m["bptt/log10_ratio"] <= m["spectral/jacobian_log10_bound"] + 1e-9


def test_gamma_and_epsilon_reach_the_cell_from_the_config():
    """``model.gamma`` is the restoring force on y, ``model.epsilon`` the damping on z (README, "Models"):
    each reaches its own term, from the config through the model to the twin."""
    m = model(gamma=2.0, epsilon=0.5)
    assert (m.rnn.gamma, m.rnn.epsilon) == (2.0, 0.5)
    p = m.params()
    assert (p["gamma"], p["epsilon"], p["dt"]) == (2.0, 0.5, 0.3)
