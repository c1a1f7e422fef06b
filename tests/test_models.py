"""Models: init statistics from theory, and the unrolled twin equal to the fused kernels for every cell."""

import math
from pathlib import Path

import pytest
import torch

from pipeline.bptt import twin as cells
from pipeline.config import ModelConfig
from pipeline.names import CELLS
from pipeline.training.models import RNNModel


def model(cell="tanh", init="default", g=1.0, H=64, readout="last", **kw):
    return RNNModel(
        ModelConfig(cell=cell, init=init, init_scale=g, hidden_size=H, **kw), 3, 2, readout, seed=1
    )


def test_pytorch_default_init_scale():
    # U(-1/sqrt(H), 1/sqrt(H)) has std 1/sqrt(3H): std(W_hh) * sqrt(H) = 1/sqrt(3) (g = 0.577).
    H = 256
    w = model(H=H).params()["W_hh"]
    assert (w.std() * math.sqrt(H)).item() == pytest.approx(1 / math.sqrt(3), rel=0.02)


@pytest.mark.parametrize("g", [0.5, 1.5])
def test_gaussian_init_std(g):
    H = 256
    w = model(init="gaussian", g=g, H=H).params()["W_hh"]
    assert (w.std() * math.sqrt(H)).item() == pytest.approx(g, rel=0.02)
    assert abs(w.mean().item()) < 0.01 * g


@pytest.mark.parametrize("cell", ["tanh", "lstm", "gru", "orthogonal"])
def test_orthogonal_init_has_every_singular_value_g(cell):
    H, g = 32, 0.8
    w = model(cell, init="orthogonal", g=g, H=H).params()["W_hh"]
    for block in w.split(H):
        s = torch.linalg.svdvals(block)
        assert torch.allclose(s, torch.full_like(s, g), atol=1e-5)


def test_identity_init_is_irnn():
    w = model("relu", init="identity", g=1.0, H=16).params()["W_hh"]
    assert torch.equal(w, torch.eye(16, dtype=w.dtype))


def test_orthogonal_cell_stays_orthogonal_through_training():
    m = model("orthogonal", g=0.9, H=16)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    x = torch.randn(8, 10, 3)
    for _ in range(20):
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        opt.step()
    s = torch.linalg.svdvals(m.params()["W_hh"])
    assert torch.allclose(s, torch.full_like(s, 0.9), atol=1e-5)


@pytest.mark.parametrize("b", [0.0, 1.0, 3.0])
def test_lstm_forget_bias(b):
    p = model("lstm", H=8, forget_bias=b).params()
    total = p["b_ih"] + p["b_hh"]
    assert torch.allclose(total[8:16], torch.full((8,), b, dtype=total.dtype))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("readout", ["last", "all"])
def test_twin_equals_fused(cell, readout):
    m = model(
        cell,
        init="gaussian" if cell not in ("orthogonal", "indrnn", "lru", "mingru") else "default",
        g=1.2,
        H=16,
        readout=readout,
    ).double()
    x = torch.randn(4, 25, 3, dtype=torch.float64)
    fused = m(x)
    p = m.params()
    states = cells.unroll(p, x)
    hs = torch.stack([s[0] for s in states], 1)
    twin = cells.readout(p, *((hs[:, -1], x[:, -1]) if readout == "last" else (hs, x)))
    assert torch.allclose(fused, twin, atol=1e-10)


def test_param_groups_cover_every_parameter_once():
    for cell in CELLS:
        m = model(cell, H=8)
        groups = m.param_groups()
        ids = [id(p) for ps in groups.values() for p in ps]
        assert sorted(ids) == sorted(id(p) for p in m.parameters())
        assert groups["recurrent"] and groups["readout"] and groups["input"]


# recurrent by the role the README ("Models") gives them, though they act within a step: mingru's gate
# (its dh_t/dh_{t-1} = diag(1 - z_t); it has no W_hh) and lem's W_y (z_n -> y_n inside the step)
WITHIN_STEP = {"mingru": {"rnn.gate.weight"}, "lem": {"rnn.transform_z.weight"}}


@pytest.mark.parametrize("cell", CELLS)
def test_parameter_groups_by_what_each_weight_acts_on(cell):
    """The groups behind ``grad/norm_<group>``, checked by what the gradient does, not by the names the
    grouping reads: at T = 1 from the zero initial state nothing reaches the recurrent weights (they act on
    h_0 = 0), while every input weight and bias moves; over several steps the recurrent weights do too."""
    torch.manual_seed(0)
    m = model(cell, H=8)
    name = {id(p): n for n, p in m.named_parameters()}
    groups = m.param_groups()
    assert sorted(id(p) for ps in groups.values() for p in ps) == sorted(id(p) for p in m.parameters())

    def grads(T):
        m.zero_grad()
        m(torch.randn(4, T, 3)).square().sum().backward()
        return {g: [p.grad for p in ps] for g, ps in groups.items()}

    one, many = grads(1), grads(6)
    assert groups["input"] and groups["readout"]
    for g in one["input"] + one["bias"] + one["readout"]:
        assert g is not None and bool(g.abs().sum() > 0)
    for p, g in zip(groups["recurrent"], one["recurrent"], strict=True):
        assert name[id(p)] in WITHIN_STEP.get(cell, ()) or g is None or bool(g.abs().sum() == 0), name[id(p)]
    assert all(g is not None and bool(g.abs().sum() > 0) for g in many["recurrent"])


_OWN_INIT = ("lru", "mingru", "lem", "cornn")  # model.init must stay default (config_checks.validate)
# A value away from each cell-specific key's default (ModelConfig), valid for every cell that reads it.
_CHANGED = {
    "init_scale": 2.0,
    "forget_bias": 3.0,
    "r_min": 0.5,
    "r_max": 0.95,
    "max_phase": 1.0,
    "dt": 0.5,
    "gamma": 2.0,
    "epsilon": 2.0,
}


@pytest.mark.parametrize(
    ("cell", "init"),
    [(c, i) for c in CELLS for i in ("default", "gaussian") if i == "default" or c not in _OWN_INIT],
)
def test_the_keys_a_cell_is_said_not_to_read_change_nothing_it_computes(cell, init):
    """``reads_key`` (the notes of ``train`` and ``sweep``) against the model itself: changing a key the
    cell is said not to read leaves its weights and outputs bit for bit; changing one it reads changes
    them. A note that lied either way (a silent no-op called used, or a used key called unused) fails."""
    import dataclasses

    from pipeline.cell_keys import reads_key, unused_model_keys

    x = torch.randn(3, 7, 2, generator=torch.Generator().manual_seed(0))
    base = ModelConfig(cell=cell, hidden_size=8, init=init)
    ref = RNNModel(base, 2, 1, "last", seed=0)(x)
    for key, value in _CHANGED.items():
        m = dataclasses.replace(base, **{key: value})
        same = torch.equal(RNNModel(m, 2, 1, "last", seed=0)(x), ref)
        assert same != reads_key(cell, init, key), (cell, init, key)
        assert any(n.startswith(f"model.{key}=") for n in unused_model_keys(m)) == same, (cell, init, key)


@pytest.mark.kernel_free
def test_train_and_sweep_say_which_set_keys_no_model_reads(tmp_path):
    import subprocess
    import sys

    from pipeline.sweep.config import load_sweep, unread_searched_keys

    smoke = str(Path(__file__).resolve().parents[1] / "configs/sweeps/smoke.yaml")

    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--config", "smoke", "model.init=default",
         "model.init_scale=3", "model.cell=gru", "model.forget_bias=2", "tracking.enabled=false",
         "trainer.max_steps=1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    notes = [line for line in r.stderr.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: model.init_scale=3 is not used by this model (model.init=default keeps PyTorch's init; "
        "g scales gaussian, orthogonal and identity)",
        "note: model.forget_bias=2 is not used by this model (read by cell lstm only, and model.cell=gru)",
    ], r.stderr
    assert unread_searched_keys(load_sweep(smoke)) == []
    (note,) = unread_searched_keys(load_sweep(smoke, ["base.model.init=default"]))
    assert note.startswith("space key model.init_scale is read by no trial")
    # an orthogonal cell reads g whatever the init: searched with it, the key is read
    sw = load_sweep(
        "configs/sweeps/smoke.yaml",
        ["base.model.init=default", "space.model.cell.choices=[tanh, orthogonal]"],
    )
    assert unread_searched_keys(sw) == []


def test_random_orthogonal_is_haar_distributed():
    """Mezzadri's sign fix makes the QR draw Haar: every entry has mean 0 (E[Q] = 0 for Haar, as Q and -Q
    are equally likely). Without it LAPACK's QR puts a bias of about -+0.5 on the diagonal."""
    from pipeline.training.models import random_orthogonal

    gen = torch.Generator().manual_seed(0)
    qs = torch.stack([random_orthogonal(3, gen) for _ in range(2000)]).double()
    assert torch.allclose(qs[0] @ qs[0].T, torch.eye(3, dtype=qs.dtype), atol=1e-6)
    # each entry's std is 1/sqrt(3); over 2000 draws the mean's std is 0.013: 0.07 is over 5 of them
    assert qs.mean(0).abs().max().item() < 0.07


def test_indrnn_recurrent_weights_are_the_documented_inits():
    """README, "Models": for ``indrnn``, ``u`` is U(0,1) (default), N(0, g^2) (gaussian), +-g (orthogonal,
    the diagonal orthogonal matrices) or g (identity); the input bias starts at zero (Li et al. 2018)."""
    H, g = 4096, 0.7
    u = model("indrnn", H=H).params()["u"]
    assert u.min() >= 0 and u.max() < 1 and u.mean().item() == pytest.approx(0.5, abs=0.02)
    assert u.std().item() == pytest.approx(1 / math.sqrt(12), rel=0.05)
    u = model("indrnn", init="gaussian", g=g, H=H).params()["u"]
    assert u.std().item() == pytest.approx(g, rel=0.05) and abs(u.mean().item()) < 0.05
    u = model("indrnn", init="orthogonal", g=g, H=H).params()["u"]
    assert torch.allclose(u.abs(), torch.full_like(u, g)) and 0.45 < (u > 0).double().mean().item() < 0.55
    u = model("indrnn", init="identity", g=g, H=H).params()["u"]
    assert torch.allclose(u, torch.full_like(u, g))
    assert torch.equal(model("indrnn", H=16).params()["b_ih"], torch.zeros(16, dtype=torch.float64))


def test_orthogonal_cell_starts_at_identity_only_for_identity_init():
    """README, "Models": for ``orthogonal`` cells ``init: identity`` starts Q at I, anything else at a
    random orthogonal Q; W_hh = g Q either way."""
    H, g = 8, 0.9
    w = model("orthogonal", init="identity", g=g, H=H).params()["W_hh"]
    assert torch.allclose(w, g * torch.eye(H, dtype=w.dtype), atol=1e-6)
    for init in ("default", "orthogonal"):
        w = model("orthogonal", init=init, g=g, H=H).params()["W_hh"]
        assert torch.allclose(w @ w.T, g**2 * torch.eye(H, dtype=w.dtype), atol=1e-5)
        assert (w - torch.diag(torch.diagonal(w))).abs().max() > 0.1  # not g I


@pytest.mark.parametrize("cell", CELLS)
def test_every_bias_of_the_core_is_in_the_bias_group(cell):
    """``grad/norm_bias`` (README, "Metrics"): every bias of the recurrent core, of every cell, is in the
    bias group (the readout's is the readout's)."""
    m = model(cell, H=8)
    groups = {id(p): g for g, ps in m.param_groups().items() for p in ps}
    for name, p in m.named_parameters():
        if "bias" in name:
            assert groups[id(p)] == ("readout" if name.startswith("readout.") else "bias"), name
