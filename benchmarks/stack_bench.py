"""Stacked-kernel benchmark: ms per training step of K members (README, "Batched trials").

Per cell, K members of H = 32 on the adding problem (T = 50, batch 32): one step is the forward, the
backward of the summed loss and each member's Adam step. Kernels: ``blockdiag`` (one fused kernel,
block-diagonal recurrent matrix: :func:`pipeline.training.stack.fused_hidden`) and ``loop`` (each
member's own fused kernel), against ``separate`` (K models stepped one after another, as K one-trial
workers would, without their per-step Lightning overhead). Model compute only; the per-step overhead
that stacking also shares (Lightning, callbacks) is in the sweep benchmark's trials per hour.
"""

from __future__ import annotations

import time

import torch


def _members(cell: str, k: int, hidden: int = 32, device: str = "cpu"):
    from pipeline.config import from_dict
    from pipeline.training.module import RNNTrainingModule
    from pipeline.training.tasks import task_of

    cfgs = [
        from_dict(
            {
                "seed": i,
                "task": {"name": "adding", "seq_len": 50, "batch_size": 32},
                "model": {"cell": cell, "hidden_size": hidden, "init": "gaussian"},
                "tracking": {"enabled": False},
            }
        )
        for i in range(k)
    ]
    task = task_of(cfgs[0].task)
    mods = [RNNTrainingModule(c, task).to(device) for c in cfgs]
    return task, mods, [m.configure_optimizers() for m in mods]


def ms_per_step(
    cell: str, k: int, kernel: str, reps: int = 20, device: str = "cpu", max_units: int | None = None
) -> float:
    """``max_units``: the fused block's cap for this measurement (default: ``stack.FUSED_MAX_UNITS``)."""
    from pipeline.training import stack

    task, mods, opts = _members(cell, k, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    x, y = task.sample(32, gen, device)
    models = [m.model for m in mods]
    saved, saved_units = dict(stack.KERNELS), dict(stack.FUSED_MAX_UNITS)
    if max_units is not None:
        stack.FUSED_MAX_UNITS[torch.device(device).type] = max_units
    if kernel == "blockdiag":
        stack.KERNELS[cell] = "blockdiag"
    else:
        stack.KERNELS.pop(cell, None)

    def step():
        for o in opts:
            o.zero_grad(set_to_none=True)
        if kernel == "separate":
            for mdl in models:
                task.loss(mdl(x), y).backward()
        else:
            outs = stack.stacked_forward(models, x)
            sum(task.loss(o, y) for o in outs).backward()
        for o in opts:
            o.step()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    try:
        for _ in range(3):
            step()
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            step()
        sync()
        return 1000 * (time.perf_counter() - t) / reps
    finally:
        stack.KERNELS.clear()
        stack.KERNELS.update(saved)
        stack.FUSED_MAX_UNITS.clear()
        stack.FUSED_MAX_UNITS.update(saved_units)


def run_gpu(quick: bool) -> list[dict]:
    """The same step on CUDA, for the GPU's kernel choice and block cap (README, "Batched trials"):
    K = 16 and 64 members, ``blockdiag`` with fused blocks of at most 512, 1024 and 4096 units."""
    name = torch.cuda.get_device_name(0)
    rows = []
    for cell in ("tanh", "gru", "lstm"):
        for k in (64,) if quick else (16, 64):
            row: dict = {"device": name, "cell": cell, "K": k}
            reps = 3 if quick else 10
            for kern in ("separate", "loop"):
                row[f"{kern}_ms"] = ms_per_step(cell, k, kern, reps, "cuda")
            for cap in (512, 1024, 4096):
                row[f"blockdiag_{cap}_ms"] = ms_per_step(cell, k, "blockdiag", reps, "cuda", cap)
            print(row, flush=True)
            rows.append(row)
    return rows


def kernel_rows(device: str, cell: str, ks: list[int], caps=(1024, 4096), rounds: int = 3) -> list[dict]:
    """ms a step of ``cell`` stacks of each K in ``ks`` on ``device``: separate models, the loop, and the
    block-diagonal kernel under each block cap in ``caps``, interleaved over ``rounds`` (medians, with the
    rounds). For the kernel choice of a cell per device (``python -m benchmarks.stack_bench --kernels
    cuda lstm 32,64``: LSTM loops everywhere until a device measures its fused block faster)."""
    import statistics

    if device == "cpu":
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else device
    kinds = [("separate", None), ("loop", None)] + [("blockdiag", c) for c in caps]
    rows = []
    for k in ks:
        got: dict[str, list[float]] = {}
        for _ in range(rounds):
            for kern, cap in kinds:
                key = f"{kern}_{cap}_ms" if cap else f"{kern}_ms"
                got.setdefault(key, []).append(ms_per_step(cell, k, kern, 10, device, cap))
        row = {"device": name, "cell": cell, "K": k} | {
            key: round(statistics.median(v), 2) for key, v in got.items()
        }
        print(row, {key: [round(x, 2) for x in v] for key, v in got.items()}, flush=True)
        rows.append(row)
    return rows


def run(quick: bool) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for cell in ("tanh", "gru", "lstm"):
        for k in (8,) if quick else (4, 8, 16):
            row: dict = {"cell": cell, "K": k}
            for kern in ("separate", "loop", "blockdiag"):
                row[f"{kern}_ms"] = ms_per_step(cell, k, kern, 5 if quick else 20)
            rows.append(row)
    return rows


def default_member(i: int, steps: int, device: str, tracking: dict, cells=("tanh", "gru", "lstm"), **over):
    """Member ``i`` of a stack of the default sweep's shape (``configs/sweeps/default.yaml``'s base):
    ``cells`` in turn, init scales and learning rates spread, ``steps`` steps on ``device``; ``tracking``
    and the sections in ``over`` (e.g. ``clip=``, ``diagnostics=``) update the base's."""
    from pathlib import Path

    import yaml

    from pipeline.config import from_dict

    root = Path(__file__).resolve().parents[1]
    c = yaml.safe_load((root / "configs" / "sweeps" / "default.yaml").read_text())["base"]
    c["model"].update(cell=cells[i % len(cells)], init_scale=0.5 + 0.05 * i)
    c["optim"]["lr"] = 1e-3 * (1 + i % 7)
    c["trainer"].update(max_steps=steps, accelerator="gpu" if device.startswith("cuda") else "cpu")
    c["tracking"].update(tracking)
    for section, values in over.items():
        c[section].update(values)
    return from_dict(c)


def host_profile(device: str, k: int, steps: int = 300, top: int = 40) -> str:
    """Where a stack's time goes: ``run_stack`` of ``k`` members of the default sweep (cells tanh, gru,
    lstm in turn, learning rates and init scales spread), recorded to a fresh sqlite MLflow store,
    under cProfile; the ``top`` functions by cumulative time, and the wall seconds per trial."""
    import cProfile
    import io
    import pstats
    import tempfile

    from pipeline.training.stacked import run_stack

    with tempfile.TemporaryDirectory() as d:
        store = {"uri": f"sqlite:///{d}/mlflow.db", "experiment": "host-profile"}

        def cfg(i: int, n: int):
            return default_member(i, n, device, store)

        run_stack([cfg(0, 20)])  # warm-up: imports, the store's schema, CUDA context and kernels
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        run_stack([cfg(i, steps) for i in range(k)])
        prof.disable()
        wall = time.perf_counter() - t
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return (
        f"# {k} members x {steps} steps on {device}: {wall:.2f} s, {wall / k:.3f} s per trial\n"
        + out.getvalue()
    )


def update_bench(
    device: str, k: int, steps: int = 100, cells: tuple[str, ...] = ("tanh", "gru", "lstm")
) -> list[dict]:
    """Seconds a ``run_stack`` of ``k`` members takes with the batched update
    (:mod:`pipeline.training.stack_update`) and with every member's own (the per-member path), in
    turn, twice each: members of the default sweep's shape (``cells`` in turn, learning rates, init
    scales and clip modes spread), ``steps`` steps, validation and profile passes as configured there,
    nothing recorded (tracking off, no figures): the training loop's own cost."""
    from pipeline.training import stacked

    gpu = device.startswith("cuda")

    def cfg(i: int, n: int):
        return default_member(
            i,
            n,
            device,
            {"enabled": False},
            cells,
            clip={"mode": "norm" if i % 2 else "none"},
            diagnostics={"plots": False},
        )

    stacked.run_stack([cfg(0, 20), cfg(1, 20)])  # warm-up: CUDA context, kernels
    rows = []
    saved = stacked.BATCHED_UPDATE
    try:
        for batched in (False, True, False, True):
            stacked.BATCHED_UPDATE = batched
            t = time.perf_counter()
            stacked.run_stack([cfg(i, steps) for i in range(k)])
            if gpu:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t
            row = {"device": device, "cells": ",".join(cells), "K": k, "steps": steps, "batched": batched}
            row |= {"wall_s": round(wall, 3), "ms_per_step": round(1000 * wall / steps, 2)}
            print(row, flush=True)
            rows.append(row)
    finally:
        stacked.BATCHED_UPDATE = saved
    return rows


def record_split(device: str, k: int, steps: int = 300, reuse_figures: bool = True) -> dict:
    """Where a recorded stack's wall time goes, without a profiler (cProfile inflated the Python-heavy
    parts, the figures and MLflow, by about half on the 2-core machine): ``run_stack`` of ``k`` members of
    the default sweep recorded to a fresh sqlite store, with wall-clock timers around a member's record at
    its start and its end, and in those around the figures, the frames, the tag writes and the run's
    close. Seconds per trial each; ``training`` is the rest (steps, validation, profile passes).
    ``reuse_figures=False``: each figure drawn on a new one, as before ``pipeline.plots.reused_run_figures``."""
    import contextlib
    import functools
    import tempfile

    from pipeline import plots, tracking
    from pipeline.training import record, stacked

    spent: dict[str, float] = {}
    saved: list[tuple[object, str, object]] = []

    def timed(owner, name: str, key: str) -> None:
        f = getattr(owner, name)

        @functools.wraps(f)
        def g(*a, **kw):
            t = time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - t

        saved.append((owner, name, f))
        setattr(owner, name, g)

    with tempfile.TemporaryDirectory() as d:
        store = {"uri": f"sqlite:///{d}/mlflow.db", "experiment": "record-split"}
        stacked.run_stack([default_member(0, 20, device, store)])  # warm-up, as in host_profile
        for owner, name, key in [
            (record, "record_start", "record_start"),
            (record, "record_end", "record_end"),
            (tracking.Recorder, "log_figure", "of which figures"),
            (tracking.Recorder, "log_frame", "of which frames"),
            (tracking.Recorder, "set_tags", "of which tags"),
            (tracking.Recorder, "close", "of which close"),
        ]:
            timed(owner, name, key)
        if not reuse_figures:
            saved.append((plots, "reused_run_figures", plots.reused_run_figures))
            plots.reused_run_figures = contextlib.nullcontext
        try:
            t = time.perf_counter()
            stacked.run_stack([default_member(i, steps, device, store) for i in range(k)])
            wall = time.perf_counter() - t
        finally:
            for owner, name, f in reversed(saved):
                setattr(owner, name, f)
    row = {
        "device": device,
        "K": k,
        "steps": steps,
        "figures": "reused" if reuse_figures else "new",
        "wall_s": round(wall, 2),
        "s_per_trial": round(wall / k, 3),
    }
    row |= {key: round(v / k, 3) for key, v in spent.items()}
    row["training"] = round((wall - spent.get("record_start", 0.0) - spent.get("record_end", 0.0)) / k, 3)
    print(row, flush=True)
    return row


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--profile"]:  # python -m benchmarks.stack_bench --profile DEVICE K
        print(host_profile(sys.argv[2], int(sys.argv[3])))
    elif sys.argv[1:2] == ["--split"]:  # python -m benchmarks.stack_bench --split DEVICE K [ROUNDS]
        # with ROUNDS: figures reused and new, interleaved ROUNDS times (README, "Batched trials")
        for _ in range(int(sys.argv[4]) if len(sys.argv) > 4 else 0):
            record_split(sys.argv[2], int(sys.argv[3]), reuse_figures=False)
            record_split(sys.argv[2], int(sys.argv[3]))
        if len(sys.argv) <= 4:
            record_split(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["--kernels"]:  # python -m benchmarks.stack_bench --kernels DEVICE CELL K[,K...]
        kernel_rows(sys.argv[2], sys.argv[3], [int(k) for k in sys.argv[4].split(",")])
    elif sys.argv[1:2] == ["--update"]:  # python -m benchmarks.stack_bench --update DEVICE K [STEPS]
        update_bench(sys.argv[2], int(sys.argv[3]), *(int(a) for a in sys.argv[4:5]))
    else:
        for r in run("--full" not in sys.argv):
            print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()})
