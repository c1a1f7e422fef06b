"""Every part of the memory estimate (pipeline/training/budget.py, README "Memory estimate") against its
closed form, written here from the README text and the module's comments, not from the module's helpers.

Only refusals of huge configurations were tested before: a part that lost a factor (the batch in Omega's
bytes, the sequence length in the validation set, Adam's two buffers) underestimated silently and let a
run that cannot fit start, to be ended by the OOM killer. The sizes of the network's input (L, I, O) come
from the tasks themselves and the parameter count from the real model, so a wrong L or n_params in the
estimate is caught too.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import load_config
from pipeline.schema import ConfigError
from pipeline.training import budget
from pipeline.training.models import RNNModel
from pipeline.training.tasks import make_task

GIB = 1024**3
MIB = 1024**2

# Coefficients as the README states them ("Memory estimate"; cornn, lru/mingru Omega and flossing: the
# module's comments, which the README does not list).
TRAIN = {"tanh": 5, "relu": 5, "orthogonal": 5, "indrnn": 6, "gru": 13, "lstm": 17}
TRAIN |= {"lru": 14, "mingru": 8, "lem": 24, "cornn": 16}
PROFILE = {"tanh": 7, "relu": 7, "orthogonal": 7, "indrnn": 6, "gru": 16, "lstm": 20}
PROFILE |= {"lru": 11, "mingru": 6, "lem": 46, "cornn": 30}
OMEGA = {"tanh": 10, "relu": 10, "orthogonal": 10, "indrnn": 10, "gru": 40, "lstm": 56}
OMEGA |= {"lru": 18, "mingru": 12, "lem": 72, "cornn": 48}
FLOSS = {"tanh": 4, "relu": 4, "orthogonal": 4, "indrnn": 4, "gru": 16, "lstm": 20}
FLOSS |= {"lru": 8, "mingru": 3, "lem": 16, "cornn": 16}
# no-grad validation forward, floats per (sample, step, unit): G + 2 (G gates), lru 6, mingru 4, lem 6, cornn 4
GATES = {"tanh": 1, "relu": 1, "orthogonal": 1, "indrnn": 1, "gru": 3, "lstm": 4}
VALIDATION = {c: g + 2 for c, g in GATES.items()} | {"lru": 6, "mingru": 4, "lem": 6, "cornn": 4}
DIGITS_IMAGES = 1797  # scikit-learn's bundled 8x8 digits


def _dims(cfg) -> tuple[int, int, int]:
    """(n_params, L, I) from the model and the task themselves."""
    if cfg.task.name == "digits":  # README: L = 64, I = 1; 10 classes read at the last step
        L, n_in, n_out, readout = 64, 1, 10, "last"
    else:
        t = make_task(cfg.task.name, cfg.task.seq_len)
        x = t.sample(2, torch.Generator().manual_seed(0))[0]
        _, L, n_in = x.shape
        n_out, readout = t.output_size, t.readout
    m = RNNModel(cfg.model, n_in, n_out, readout)
    return sum(p.numel() for p in m.parameters()), L, n_in


def _optimizer_buffers(cfg) -> int:
    """README: Adam 2 buffers (exp_avg, exp_avg_sq); RMSprop square_avg (+ a momentum buffer); SGD a
    momentum buffer when momentum > 0."""
    o = cfg.optim
    return {"adam": 2, "rmsprop": 1 + (o.momentum > 0), "sgd": int(o.momentum > 0)}[o.name]


def expected_parts(cfg, cuda: bool) -> dict[str, tuple[int, bool]]:
    """{part: (bytes, on the training device)} from the closed forms of the README."""
    n, L, n_in = _dims(cfg)
    B, V, P = cfg.task.batch_size, cfg.task.val_size, cfg.diagnostics.probe_size
    H, cell, tr, d, r = cfg.model.hidden_size, cfg.model.cell, cfg.trainer, cfg.diagnostics, cfg.remedy
    f32, f64 = 4, 8
    sample = n_in * (8 + 4) + 8  # per (sample, step) while a batch is made: int64 one-hot, float32, index
    params = n * f32 * (2 + _optimizer_buffers(cfg))  # weights, gradients, optimizer buffers
    if cell == "orthogonal":
        params += 12 * H * H * f32  # matrix_exp of W_hh kept for backward
    profiles = 2 + (tr.max_steps // d.profile_every if d.profile_every else 0)  # step 0, the end, every N
    states = 2 if cell == "lstm" else 1
    train_coef = TRAIN[cell] + (2 * math.ceil(math.log2(L)) if cuda and cell == "lru" else 0)
    train = B * L * H * f32 * train_coef + B * L * sample
    if r.omega > 0:
        train += B * L * H * f32 * OMEGA[cell]
    if r.floss.weight > 0:
        train += r.floss.batch * L * H * f32 * (r.floss.exponents + 1) * FLOSS[cell]
    chunk = min(V, max(B, 256))  # validation runs in chunks of the training batch, at least 256
    profile_coef = PROFILE[cell] + (2 if cfg.task.name == "copy" else 0)  # copy reads out every step
    parts = {
        "runtime (torch, Lightning, MLflow)": (int(0.75 * GIB), False),
        "parameters, gradients and optimizer state": (params, cuda),
        "float64 twin of the weights and spectra": (n * f64 * 2 + 4 * H * H * f64, False),
        "validation set": (V * L * n_in * f32 + V * 8, cuda),
        "probe batch": (P * L * n_in * 12 + P * 8, False),
        "per-step history": (tr.max_steps * 200 + min(tr.log_every, tr.max_steps) * 512, False),
        "profile frames": (2 * profiles * L * states * 96, False),
        "training activations": (train, cuda),
        "validation forward": (chunk * L * H * f32 * VALIDATION[cell], cuda),
        "building the validation set": (V * L * sample, cuda),
        "float64 profile pass": (P * L * H * f64 * profile_coef, False),
    }
    if cell in ("lem", "cornn"):  # [P, 2H, 2H] float64 matrices, 6 alive at once
        parts["Jacobian bound"] = (P * (2 * H) ** 2 * f64 * 6, False)
    if cfg.task.name == "digits":
        parts["digits dataset (scikit-learn, the file's arrays)"] = (
            32 * MIB + DIGITS_IMAGES * (L + 1) * (8 + 4),
            False,
        )
        parts["digits splits"] = (DIGITS_IMAGES * (L * f32 + 8), cuda)
    if cuda:
        parts["CUDA context"] = (int(0.5 * GIB), True)
    return parts


def reported_parts(cfg, cuda: bool) -> dict[str, tuple[int, bool]]:
    est = budget.estimate(cfg, cuda)
    parts = [*est.persistent, *est.passes]
    assert len({p.what for p in parts}) == len(parts)
    return {p.what: (p.nbytes, p.on_device) for p in parts}


SMALL = ["task.seq_len=30", "task.batch_size=300", "task.val_size=1000", "diagnostics.probe_size=16"]
SMALL += [
    "model.hidden_size=16",
    "trainer.max_steps=50",
    "trainer.log_every=10",
    "diagnostics.profile_every=20",
]
FLOSS_ON = ["remedy.floss.weight=1", "remedy.floss.batch=4", "remedy.floss.exponents=3"]
CASES = {
    "tanh adding adam": [],
    "relu temporal_order sgd": ["model.cell=relu", "task.name=temporal_order", "optim.name=sgd"],
    "lstm copy sgd momentum, omega, flossing": [
        "model.cell=lstm",
        "task.name=copy",
        "task.seq_len=12",
        "optim.name=sgd",
        "optim.momentum=0.9",
        "remedy.omega=1",
        *FLOSS_ON,
    ],
    "orthogonal rmsprop": ["model.cell=orthogonal", "optim.name=rmsprop"],
    "gru rmsprop momentum, omega": [
        "model.cell=gru",
        "optim.name=rmsprop",
        "optim.momentum=0.5",
        "remedy.omega=1",
    ],
    "indrnn flossing, log_every past max_steps": ["model.cell=indrnn", *FLOSS_ON, "trainer.log_every=80"],
    "lru copy omega": ["model.cell=lru", "task.name=copy", "remedy.omega=1"],
    "lru adding L=65 flossing": ["model.cell=lru", "task.seq_len=65", *FLOSS_ON],
    "mingru omega": ["model.cell=mingru", "remedy.omega=1"],
    "lem omega, flossing": ["model.cell=lem", "remedy.omega=1", *FLOSS_ON],
    "cornn temporal_order": ["model.cell=cornn", "task.name=temporal_order"],
    "gru digits, profile only at the ends": [
        "model.cell=gru",
        "task.name=digits",
        "task.seq_len=64",
        "task.val_size=500",
        "diagnostics.profile_every=0",
    ],
}


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
@pytest.mark.parametrize("name", list(CASES))
def test_each_part_of_the_estimate_is_its_closed_form(name, cuda):
    cfg = load_config(None, [*SMALL, *CASES[name]])
    assert reported_parts(cfg, cuda) == expected_parts(cfg, cuda)


def _size(cfg, part: str, cuda: bool = False) -> int:
    return reported_parts(cfg, cuda)[part][0]


def _with(base: list[str], **values) -> object:
    return load_config(None, [*base, *(f"{k.replace('__', '.')}={v}" for k, v in values.items())])


def test_which_parts_double_with_each_size():
    """Doubling B, V, P, T (L) or H doubles exactly the parts the README says scale with it
    (the affine parts: their size-dependent share doubles)."""
    base = [*SMALL, "task.batch_size=512", "task.val_size=4096"]  # chunk = B: above 256, below V

    def doubled(key: str, small: int) -> set[str]:
        a = reported_parts(_with(base, **{key: small}), False)
        b = reported_parts(_with(base, **{key: 2 * small}), False)
        return {k for k in a if b[k][0] == 2 * a[k][0]}

    assert doubled("task__batch_size", 512) == {"training activations", "validation forward"}
    assert doubled("task__val_size", 4096) == {"validation set", "building the validation set"}
    assert doubled("diagnostics__probe_size", 16) == {"probe batch", "float64 profile pass"}
    # adding feeds L = T; every pass doubles (the sets' and the probe's per-sample labels do not)
    per_step = {"training activations", "validation forward", "building the validation set"}
    per_step |= {"float64 profile pass", "profile frames"}
    assert doubled("task__seq_len", 30) == per_step
    # the activations also hold the batch's inputs (not per unit), so H doubles only the passes per unit
    assert doubled("model__hidden_size", 16) == {"validation forward", "float64 profile pass"}
    # the twin's spectra workspace is quadratic in H
    a, b = (
        _size(_with(base, model__hidden_size=h), "float64 twin of the weights and spectra") for h in (64, 128)
    )
    assert b > 3 * a


@pytest.mark.parametrize("cell", ["tanh", "lstm", "lru", "lem"])
def test_the_remedies_extra_bytes_scale_with_their_batch(cell):
    """Omega runs on the whole training batch, flossing on remedy.floss.batch trajectories: each extra
    doubles when its batch doubles, and flossing's does not move with the training batch."""
    base = [*SMALL, f"model.cell={cell}", "task.batch_size=64"]

    def extra(over: list[str], on: list[str]) -> int:
        plain = _size(load_config(None, [*base, *over]), "training activations")
        return _size(load_config(None, [*base, *over, *on]), "training activations") - plain

    omega = ["remedy.omega=1"]
    assert extra([], omega) > 0
    assert extra(["task.batch_size=128"], omega) == 2 * extra([], omega)
    assert extra(["task.seq_len=60"], omega) == 2 * extra([], omega)
    floss = ["remedy.floss.weight=1", "remedy.floss.exponents=3"]
    assert extra([], [*floss, "remedy.floss.batch=4"]) > 0
    assert extra([], [*floss, "remedy.floss.batch=8"]) == 2 * extra([], [*floss, "remedy.floss.batch=4"])
    assert extra(["task.batch_size=128"], [*floss, "remedy.floss.batch=4"]) == extra(
        [], [*floss, "remedy.floss.batch=4"]
    )
    # k + 1 tangents and the trajectory: k = 3 -> 7 doubles them
    assert extra([], [*floss[:1], "remedy.floss.exponents=7", "remedy.floss.batch=4"]) == 2 * extra(
        [], [*floss, "remedy.floss.batch=4"]
    )


def test_adam_keeps_two_buffers_per_parameter_and_sgd_none():
    """README: parameters + gradients + optimizer state in float32, Adam 2 buffers: 16 bytes a parameter
    for Adam, 8 for SGD without momentum (no buffer), 12 with it."""
    n, _, _ = _dims(load_config(None, SMALL))
    part = "parameters, gradients and optimizer state"
    assert _size(load_config(None, [*SMALL, "optim.name=adam"]), part) == n * 4 * 4
    assert _size(load_config(None, [*SMALL, "optim.name=sgd"]), part) == n * 4 * 2
    assert _size(load_config(None, [*SMALL, "optim.name=sgd", "optim.momentum=0.9"]), part) == n * 4 * 3


# ------------------------------------------------------------------------- the check on the GPU


@pytest.fixture
def gpu(monkeypatch):
    """A machine with CUDA: the accelerator resolves to it, the GPU has ``room[0]`` bytes free and the host
    ``room[1]``."""
    room = [0, 0]
    monkeypatch.delenv(budget.ENV_SWITCH, raising=False)
    monkeypatch.setattr(budget, "uses_cuda", lambda cfg: True)
    monkeypatch.setattr(budget, "device_available", lambda: room[0])
    monkeypatch.setattr(budget, "host_available", lambda: (room[1], "MemAvailable"))
    return room


def _device_and_host_peaks(cfg) -> tuple[int, int]:
    parts = expected_parts(cfg, cuda=True)
    persistent = {"training activations", "validation forward", "building the validation set"}
    persistent |= {"float64 profile pass", "Jacobian bound"}

    def peak(on_device: bool) -> int:
        mine = {k: b for k, (b, dev) in parts.items() if dev == on_device}
        passes = [b for k, b in mine.items() if k in persistent]
        return sum(b for k, b in mine.items() if k not in persistent) + max(passes, default=0)

    return peak(True), peak(False)


def test_a_run_that_fits_the_host_but_not_the_gpu_is_refused(gpu):
    """With CUDA the training activations live on the GPU, whose free memory is checked on its own: a
    batch that fits the host (1 TiB here) but not 2 GiB of GPU is refused naming task.batch_size."""
    cfg = load_config(None, [*SMALL, "task.batch_size=8192", "model.hidden_size=256", "task.val_size=64"])
    device, host = _device_and_host_peaks(cfg)
    assert 2 * GIB * budget.FIT_FRACTION < device < 1024 * GIB * budget.FIT_FRACTION
    gpu[:] = [2 * GIB, 1024 * GIB]
    with pytest.raises(ConfigError) as e:
        budget.check_fits(cfg)
    assert e.value.key == "task.batch_size"
    assert "on the GPU" in str(e.value) and "free on the GPU" in str(e.value)
    gpu[0] = int(device / budget.FIT_FRACTION) + 1
    budget.check_fits(cfg)  # the same run fits a GPU with that much free


def test_device_and_host_are_each_checked_for_their_own_parts(gpu):
    """What lives on the GPU is not counted against the host, nor the host's parts against the GPU: a run
    whose device parts and host parts each fit their side passes though their sum fits neither."""
    cfg = load_config(None, [*SMALL, "task.batch_size=4096", "model.hidden_size=256", "task.val_size=64"])
    device, host = _device_and_host_peaks(cfg)
    room = [int(device / budget.FIT_FRACTION) + 1, int(host / budget.FIT_FRACTION) + 1]
    assert (device + host) > budget.FIT_FRACTION * max(room)
    gpu[:] = room
    est = budget.check_fits(cfg)
    assert est.peak(True) == device and est.peak(False) == host
    gpu[:] = [room[0] - 2 * int(device * 0.01 / budget.FIT_FRACTION), room[1]]  # 1% short on the GPU
    with pytest.raises(ConfigError, match="on the GPU"):
        budget.check_fits(cfg)
    gpu[:] = [room[0], room[1] - 2 * int(host * 0.01 / budget.FIT_FRACTION)]  # 1% short on the host
    with pytest.raises(ConfigError, match="on this machine"):
        budget.check_fits(cfg)


def test_the_host_memory_is_memavailable_or_a_smaller_cgroup_limit(monkeypatch):
    """What the memory check may use on the host (pipeline/training/machine.py): /proc/meminfo's
    MemAvailable (kB, so x 1024), or a container's cgroup v2 room (memory.max - memory.current) where
    that is smaller (mutation review)."""
    from pipeline.training import machine

    class Fake:
        def __init__(self, path):
            self.path = str(path)

        def read_text(self):
            assert self.path == "/proc/meminfo", self.path
            return "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n"

    with monkeypatch.context() as m:
        m.setattr(machine, "Path", Fake)
        assert machine._meminfo_available() == 8000000 * 1024
    monkeypatch.setattr(machine, "_meminfo_available", lambda: 8 * 2**30)
    for room, want in (
        (2 * 2**30, (2 * 2**30, "cgroup memory.max")),
        (16 * 2**30, (8 * 2**30, "MemAvailable")),
    ):
        monkeypatch.setattr(machine, "_cgroup_available", lambda room=room: room)
        assert machine.host_available() == want
    monkeypatch.setattr(machine, "_cgroup_available", lambda: None)  # no limit
    assert machine.host_available() == (8 * 2**30, "MemAvailable")


@pytest.mark.parametrize("visible", ["", "-1", " -1 "])
def test_cuda_visible_devices_that_hide_every_gpu_mean_no_gpu(monkeypatch, visible):
    """CUDA's documented ways to hide every device (an empty CUDA_VISIBLE_DEVICES, or -1) mean no GPU,
    known without importing torch, and ``gpu`` is refused naming why (mutation review)."""
    from conftest import tiny_config

    from pipeline.training import machine

    monkeypatch.setattr(machine, "GPU_DRIVER_PATHS", (str(machine.__file__),))  # as if a driver were here
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert machine.gpu_driver_absent() is True
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES hides every device; use auto or cpu"):
        machine.check_accelerator(tiny_config(**{"trainer.accelerator": "gpu"}))
