"""Memory estimate of a training configuration, checked against what the machine has before anything runs.

Without it a configuration that cannot fit (``task.batch_size=100000000``) grows until the kernel's
OOM killer ends it a minute later, holding all memory of the machine meanwhile, or dies in a
27-line allocator traceback. :func:`check_fits` raises :class:`~pipeline.config.ConfigError` naming the
key that makes the estimate large, before any tensor is allocated or any store is touched; the CLI
prints it as one line and exits 2.

How the estimate is made (README "Memory estimate"): a sum of components, each a closed form in the
config's sizes (B batch, V validation set, P probe batch, L sequence length fed to the network, H hidden
size, G gates, I input size), with per-cell coefficients measured as peak RSS over a forward + backward
pass (training, float32) and over the float64 profile pass (README table). The peak is the persistent
part (runtime, parameters + optimizer state, validation set, probe batch, per-step history, the digits
dataset) plus the
largest of the passes that do not overlap in time (a training step, a validation chunk, the profile
pass, building the validation set). What the machine has comes from :mod:`pipeline.training.machine`.
Light imports only (stdlib + pipeline.config); torch is imported only to ask whether CUDA is there,
when a GPU driver is present and the accelerator could resolve to it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from pipeline.config import DIGITS_IMAGES, DIGITS_SEQ_LEN, Config
from pipeline.names import GATE_COUNT
from pipeline.schema import ConfigError
from pipeline.training.machine import device_available, host_available, uses_cuda

GIB = 1024**3
FIT_FRACTION = 0.8  # refuse when the estimate exceeds 80% of what is available (safety margin)
RUNTIME_BYTES = int(
    0.75 * GIB
)  # torch + Lightning + MLflow + pandas + matplotlib imported (measured ~0.6 GiB)
CUDA_CONTEXT_BYTES = int(0.5 * GIB)  # the CUDA context and kernels on the device
# digits: importing scikit-learn (and the parts of SciPy it loads) to read the bundled file; measured
# +17-18 MiB of peak RSS over the same run on adding (benchmarks/memory_estimate.py), rounded up.
SKLEARN_BYTES = 32 * 1024**2
ENV_SWITCH = "PIPELINE_MEMORY_CHECK"  # "0": skip the check (an escape hatch if the estimate is wrong)

# float32 values per (sample, step, hidden unit) alive at the peak of a training forward + backward:
# about 4G + 1 (gate pre-activations kept for backward, their gradients, the output). Measured peak RSS
# with nn.RNN/LSTM/GRU on CPU, B=128 L=200 H=256 and B=64 L=800 H=128: tanh 4.7, relu 4.0, orthogonal
# 3.3, indrnn 5.5, lstm 16.5, gru 12.7 (README "Memory estimate").
TRAIN_COEF = {"tanh": 5, "relu": 5, "orthogonal": 5, "indrnn": 6, "lstm": 17, "gru": 13}
# float64 values per (probe sample, step, hidden unit) at the peak of the profile pass (pipeline.bptt.profile:
# the input projection, per-step caches for the hand-written VJPs, states, kept gradients and their
# stacked copy). Measured P=64 L=400 H=256: tanh 7.0, orthogonal 7.0, indrnn 5.5, lstm 19.3, gru 15.4;
# readout "all" (copy) adds about 2. The Lyapunov pass needs less (no caches kept) and runs after it.
PROFILE_COEF = {"tanh": 7, "relu": 7, "orthogonal": 7, "indrnn": 6, "lstm": 20, "gru": 16}
# The remedies' passes run inside the training step, while its activations are alive, so they add to
# the training pass (README "Memory estimate"). Pascanu's Omega (pipeline.bptt.remedies.omega): float32
# values per (sample, step, hidden unit) for the unrolled states and caches, the gradient directions, and
# the batched live step with its graph. Measured as whole-process peak RSS less the fused step's share
# (benchmarks/memory_estimate.py, L=200 H=256): tanh 8 (B=512), lstm 52 (B=128); gru from the ratio of
# the per-step growth over the fused step (B=256 L=200 H=128: tanh 1.0, indrnn 4.9, gru 19.6, lstm 30.7).
OMEGA_COEF = {"tanh": 10, "relu": 10, "orthogonal": 10, "indrnn": 10, "lstm": 56, "gru": 40}
# Gradient flossing (pipeline.bptt.remedies.lyapunov_spectrum): float32 values per (trajectory, step,
# hidden unit, k + 1) for the graph through the trajectory, the k tangents and the QR; measured with 64
# trajectories, k = 16, L=200, H=128: tanh 2.8, indrnn 2.0, gru 15.2, lstm 19.0.
FLOSS_COEF = {"tanh": 4, "relu": 4, "orthogonal": 4, "indrnn": 4, "lstm": 20, "gru": 16}

# --- modern diagonal cells (pipeline.training.modern) ---
# Training (the CPU's sequential scan) and profile coefficients as above, measured the same way (README
# "Memory estimate"): training B=256/512 L=200 H=256 lru 13.5, mingru 8.0; profile P=192 L=400 H=128 lru
# 10.2 (its state is complex: 2 floats per channel), mingru 5.6. On CUDA the parallel scans keep more:
# lru's doubling scan one complex [B, L, H] state per level (ceil(log2 L) levels, not measured on a GPU).
TRAIN_COEF.update({"lru": 14, "mingru": 8})
# Omega and flossing on them, measured as above (peak RSS with the remedy less without, B=128 L=200 H=128,
# flossing with 64 trajectories and k = 16): Omega lru 10.6, mingru 11.2 (tanh 10.9 in the same run);
# flossing lru 7.6 (complex state), mingru 2.1. lru's Omega is set at 18: at B=256 (README "Memory estimate",
# row "Omega (lru)") the peak read 1.33 and 1.42 GiB in two runs, so 11 and 15 left the estimate only 1.03x above it.
OMEGA_COEF.update({"lru": 18, "mingru": 12})
FLOSS_COEF.update({"lru": 8, "mingru": 3})
PROFILE_COEF.update({"lru": 11, "mingru": 6})
VALIDATION_FLOATS = {
    "lru": 6,
    "mingru": 4,
}  # per (sample, step, unit) in a no-grad forward: G + 2 for the rest
# lem (pipeline.training.lem): a loop over time with autograd; per (sample, step, unit) it keeps the input
# projection (4), the recurrent projection (3), two gates, two candidates, the steps, y and z and their
# gradients in backward. Its state is [y, z] (2H), so the twin's caches and gradients are twice a vanilla
# cell's or more. Measured as above (README "Memory estimate", benchmarks/memory_estimate.py): training
# B=512 L=200 H=128 about 15 (24 kept: the estimate reads 1.31x the peak, as the others); profile P=128 L=400 H=64 about 41 with the
# Jacobian bound after it; Omega B=256 L=200 H=128 55-64 over the training step. Flossing: not measured
# (set as gru's).
TRAIN_COEF["lem"] = 24
PROFILE_COEF["lem"] = 46
VALIDATION_FLOATS["lem"] = 6
OMEGA_COEF["lem"] = 72
FLOSS_COEF["lem"] = 16
# lem's spectral/jacobian_log10_bound (pipeline.bptt.spectra.jacobian_log10_bound): per step, float64
# [P, 2H, 2H] matrices alive at once: the Jacobians, their Gram matrices, the eigensolver's copy and the
# tangents' intermediates; after the profile pass, not during it.
JACOBIAN_FLOATS = 6
# cornn (pipeline.training.cornn): the same loop with fewer ops per step (one tanh, no gates); not measured:
# set from lem's by the count of kept [B, H] tensors per step (about 10 against lem's 17), rounded up.
TRAIN_COEF["cornn"] = 16
PROFILE_COEF["cornn"] = 30
VALIDATION_FLOATS["cornn"] = 4
OMEGA_COEF["cornn"] = 48
FLOSS_COEF["cornn"] = 16
# --- end modern cells ---
HISTORY_BYTES_PER_STEP = (
    200  # host copy of the 9 float64 per-step records (+ the final concat) and the step list
)
PENDING_BYTES_PER_STEP = 512  # a per-step record tensor waiting for its log_every window (object overhead)
FRAME_BYTES_PER_ROW = (
    96  # a profile frame row (step, t, state, log10_norm), kept until the run ends, then concatenated
)
SIZE_KEYS = (
    "task.batch_size",
    "task.val_size",
    "diagnostics.probe_size",
    "task.seq_len",
    "model.hidden_size",
    "trainer.max_steps",
    "trainer.log_every",
)


@dataclass(frozen=True)
class Part:
    """One component of the estimate: what it is, its bytes, and whether it lives on the training device."""

    what: str
    nbytes: int
    on_device: bool
    per_process: bool = False  # paid once per process (imports, the CUDA context), not per trial of a stack
    together: bool = False  # a pass every member of a stack runs at once (the training step)


@dataclass(frozen=True)
class Estimate:
    persistent: tuple[Part, ...]
    passes: tuple[Part, ...]  # do not overlap in time: the peak takes the largest

    def peak(self, on_device: bool | None = None, members: int = 1) -> int:
        """Bytes at the peak on the device (True), on the host (False), or both together (None), of one
        process training ``members`` such runs at once as a stack (README, "Batched trials"): the
        per-process parts once, the other persistent parts per member, and the largest pass, where the
        training pass counts for every member (a stack's members step together) and the others for one
        (validation, the profile, building a validation set: one member at a time)."""
        keep = (lambda p: True) if on_device is None else (lambda p: p.on_device == on_device)
        shared = sum(p.nbytes for p in self.persistent if keep(p) and p.per_process)
        own = sum(p.nbytes for p in self.persistent if keep(p) and not p.per_process)
        largest = max((p.nbytes * (members if p.together else 1) for p in self.passes if keep(p)), default=0)
        return shared + members * own + largest

    def top(self, on_device: bool | None, n: int = 2) -> list[Part]:
        keep = (lambda p: True) if on_device is None else (lambda p: p.on_device == on_device)
        biggest_pass = max((p for p in self.passes if keep(p)), key=lambda p: p.nbytes, default=None)
        parts = [p for p in self.persistent if keep(p)] + ([biggest_pass] if biggest_pass else [])
        return sorted(parts, key=lambda p: -p.nbytes)[:n]


def _task_dims(cfg: Config) -> tuple[int, int, int]:
    """(L, I, O): sequence length fed to the network, input and output sizes (pipeline.training.tasks)."""
    T, name = cfg.task.seq_len, cfg.task.name
    if name == "copy":
        return T + 20, 10, 9
    if name == "temporal_order":
        return T, 6, 4
    if name == "digits":
        return T, 1, 10
    return T, 2, 1


def _dataset(cfg: Config, cuda: bool) -> tuple[Part, ...]:
    """digits: scikit-learn and the file's arrays on the host (float64 as read, float32 scaled), and the
    two splits, float32 pixels and int64 labels, on the training device (pipeline.training.digits)."""
    if cfg.task.name != "digits":
        return ()
    n, L = DIGITS_IMAGES, DIGITS_SEQ_LEN
    return (
        Part(
            "digits dataset (scikit-learn, the file's arrays)", SKLEARN_BYTES + n * (L + 1) * (8 + 4), False
        ),  # per member: each member's module reads the file (pipeline.training.digits)
        Part("digits splits", n * (L * 4 + 8), cuda),
    )


def n_params(cfg: Config) -> int:
    """Trainable parameters of :class:`pipeline.training.models.RNNModel` (exact for every cell)."""
    _, n_in, n_out = _task_dims(cfg)
    H, cell = cfg.model.hidden_size, cfg.model.cell
    if cell == "indrnn":
        core = H * n_in + 2 * H
    elif cell == "lru":  # nu, theta, gamma [H]; B_re, B_im [H, I]; C_re, C_im [H, H]; D [H, I]
        core = 3 * H + 3 * H * n_in + 2 * H * H
    elif cell == "mingru":  # gate and candidate: nn.Linear(I, H) each
        core = 2 * H * (n_in + 1)
    elif cell == "lem":  # inp2hid Linear(I, 4H), hid2hid Linear(H, 3H), transform_z Linear(H, H)
        core = 4 * H * (n_in + 1) + 3 * H * (H + 1) + H * (H + 1)
    elif cell == "cornn":  # inp Linear(I, H), rec Linear(2H, H) without bias
        core = H * (n_in + 1) + 2 * H * H
    else:
        G = GATE_COUNT[cell]
        core = G * H * (n_in + H + 2)
    return core + n_out * H + n_out


def _opt_states(cfg: Config) -> int:
    """Per-parameter optimizer buffers: Adam 2 (exp_avg, exp_avg_sq); RMSprop 1 + momentum; SGD momentum."""
    o = cfg.optim
    if o.name == "adam":
        return 2
    if o.name == "rmsprop":
        return 1 + (o.momentum > 0)
    return int(o.momentum > 0)


def _remedy_bytes(cfg: Config, L: int) -> int:
    """What Pascanu's Omega and gradient flossing add to a training step (0 when both are off)."""
    r, H, cell = cfg.remedy, cfg.model.hidden_size, cfg.model.cell
    n = cfg.task.batch_size * L * H * 4 * OMEGA_COEF[cell] if r.omega > 0 else 0
    if r.floss.weight > 0:
        n += r.floss.batch * L * H * 4 * (r.floss.exponents + 1) * FLOSS_COEF[cell]
    return n


def _train_coef(cell: str, L: int, cuda: bool) -> int:
    """float32 values per (sample, step, unit) at a training step's peak; lru's doubling scan on CUDA
    keeps one complex state (2 floats) per level (see TRAIN_COEF)."""
    coef = TRAIN_COEF[cell]
    if cuda and cell == "lru":
        coef += 2 * max(1, (L - 1).bit_length())
    return coef


def estimate(cfg: Config, cuda: bool = False) -> Estimate:
    """The memory a run of ``cfg`` needs, as components (see the module docstring for the method)."""
    L, n_in, _ = _task_dims(cfg)
    B, V, P = cfg.task.batch_size, cfg.task.val_size, cfg.diagnostics.probe_size
    H, cell = cfg.model.hidden_size, cfg.model.cell
    G = GATE_COUNT[cell]
    tr, d = cfg.trainer, cfg.diagnostics
    n = n_params(cfg)
    sample = 12 * n_in + 8  # bytes per (sample, step) while a batch is made: int64 one-hot + float32 + index
    readout_all = cfg.task.name == "copy"
    prof_coef = PROFILE_COEF[cell] + (2 if readout_all else 0)
    passes_n = 2 + (tr.max_steps // d.profile_every if d.profile_every else 0)
    states = 2 if cell == "lstm" else 1  # lem's [y, z] is one profile state
    square = 12 * H * H * 4 if cell == "orthogonal" else 0  # matrix_exp of W_hh kept for backward
    persistent: tuple[Part, ...] = (
        Part("runtime (torch, Lightning, MLflow)", RUNTIME_BYTES, False, per_process=True),
        Part("parameters, gradients and optimizer state", n * 4 * (2 + _opt_states(cfg)) + square, cuda),
        Part("float64 twin of the weights and spectra", n * 8 * 2 + 4 * H * H * 8, False),
        Part("validation set", V * L * n_in * 4 + V * 8, cuda),
        Part("probe batch", P * L * n_in * 12 + P * 8, False),
        Part(
            "per-step history",
            tr.max_steps * HISTORY_BYTES_PER_STEP + min(tr.log_every, tr.max_steps) * PENDING_BYTES_PER_STEP,
            False,
        ),
        Part("profile frames", 2 * passes_n * L * states * FRAME_BYTES_PER_ROW, False),
        *_dataset(cfg, cuda),
    )
    chunk = min(V, max(B, 256))
    passes: tuple[Part, ...] = (
        Part(
            "training activations",
            B * L * (H * 4 * _train_coef(cell, L, cuda) + sample) + _remedy_bytes(cfg, L),
            cuda,
            together=True,
        ),
        Part("validation forward", chunk * L * H * 4 * VALIDATION_FLOATS.get(cell, G + 2), cuda),
        Part("building the validation set", V * L * sample, cuda),
        Part("float64 profile pass", P * L * H * 8 * prof_coef, False),
    )
    if cell in ("lem", "cornn"):
        passes += (Part("Jacobian bound", P * (2 * H) ** 2 * 8 * JACOBIAN_FLOATS, False),)
    if cuda:
        persistent += (Part("CUDA context", CUDA_CONTEXT_BYTES, True, per_process=True),)
    return Estimate(persistent, passes)


# ---------------------------------------------------------------------------------------- the check


def fmt_bytes(n: float) -> str:
    """``412 GiB``, ``3.1 MiB``, ``1.2e+09 EiB``: three significant digits, binary units."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    i = 0
    x = float(n)
    while x >= 1024 and i < len(units) - 1:
        x /= 1024
        i += 1
    if x >= 1e4:
        return f"{x:.2g} {units[i]}"
    return f"{x:.3g} {units[i]}" if i else f"{int(x)} bytes"


def _with(cfg: Config, key: str, value: int) -> Config:
    section, name = key.split(".")
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})


def dominant_key(cfg: Config, cuda: bool, on_device: bool | None) -> str:
    """The size key whose reset to its default lowers the estimate most (the one to change)."""
    default = Config()
    base = estimate(cfg, cuda).peak(on_device)
    best, gain = SIZE_KEYS[0], -1
    for key in SIZE_KEYS:
        section, name = key.split(".")
        mine, dflt = getattr(getattr(cfg, section), name), getattr(getattr(default, section), name)
        if mine <= dflt:
            continue
        g = base - estimate(_with(cfg, key, dflt), cuda).peak(on_device)
        if g > gain:
            best, gain = key, g
    if gain < 0:  # every size at or below its default: name the largest component's key
        top = estimate(cfg, cuda).top(on_device, 1)[0].what
        best = {
            "training activations": "task.batch_size",
            "validation set": "task.val_size",
            "float64 profile pass": "diagnostics.probe_size",
        }.get(top, "model.hidden_size")
    return best


def _workers_text(n: int) -> str:
    return "1 worker" if n == 1 else f"{n} workers"


def check_fits(
    cfg: Config, *, copies: int = 1, device_copies: int | None = None, members: int = 1, what: str = ""
) -> Estimate:
    """Raise :class:`ConfigError` if ``copies`` concurrent runs of ``cfg`` cannot fit; return the estimate.

    ``copies``: sweep workers that may each run such a trial at once on this machine (``device_copies``
    of them on one GPU; default ``copies``); ``members``: trials each worker trains at once as a stack
    (``trials_per_worker``), which share the worker's per-process memory (:meth:`Estimate.peak`). The
    check is skipped with ``PIPELINE_MEMORY_CHECK=0``.
    """
    cuda = uses_cuda(cfg) if os.environ.get(ENV_SWITCH, "1") != "0" else False
    est = estimate(cfg, cuda)
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return est
    budgets = [(False, *host_available())]
    if cuda:
        budgets.append((True, device_available(), "free on the GPU"))
    for on_device, avail, src in budgets:
        n = (device_copies or copies) if on_device else copies
        side = on_device if cuda else None
        one = est.peak(side)  # one trial, alone in its process
        each = est.peak(side, members)  # one worker: its process and its stack
        need, room = each * n, avail * FIT_FRACTION
        where = "on the GPU" if on_device else "on this machine"
        stack = f" x {members} trials" if members > 1 else ""
        if need <= room:
            continue
        # the margin said beside what is available: a need below it but above FIT_FRACTION of it is refused,
        # and a message without the margin read as a contradiction (found by a walkthrough)
        have = f"{fmt_bytes(avail)} are available {where} ({src}, {FIT_FRACTION:.0%} of it usable)"
        if n > 1 and each <= room:
            most = max(1, int(room // each))
            per_worker = f", each worker {fmt_bytes(each)}" if members > 1 else ""
            raise ConfigError(
                "workers",
                f"{n} workers{stack} at once need about {fmt_bytes(need)} ({what}each "
                f"{fmt_bytes(one)}{per_worker}) but {have}; "
                f"use at most {most} (--workers {most})",
            )
        most = max((m for m in range(1, members) if est.peak(side, m) * n <= room), default=0)
        if most >= 1:
            raise ConfigError(
                "trials_per_worker",
                f"{_workers_text(n)}{stack} at once need about {fmt_bytes(need)} ({what}each worker "
                f"{fmt_bytes(each)}) but {have}; use at most "
                f"{most} (trials_per_worker={most})",
            )
        if members > 1 and one <= room:  # not even one trial per worker fits for all n: fewer workers
            fit = int(room // one)
            raise ConfigError(
                "workers",
                f"{_workers_text(n)}{stack} at once need about {fmt_bytes(need)} ({what}each "
                f"{fmt_bytes(one)} alone) but {have}; use at "
                f"most {fit} (--workers {fit}) with trials_per_worker=1",
            )
        key = dominant_key(cfg, cuda, side)
        parts = ", ".join(f"{p.what} {fmt_bytes(p.nbytes)}" for p in est.top(side))
        many = f" for {_workers_text(n)}{stack} at once" if n > 1 or members > 1 else ""
        raise ConfigError(
            key,
            f"{what}needs about {fmt_bytes(need)}{many} ({parts}) but {have}; lower it",
        )
    return est
