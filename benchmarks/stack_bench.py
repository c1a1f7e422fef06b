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


def _members(cell: str, k: int, hidden: int = 32):
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
    mods = [RNNTrainingModule(c, task) for c in cfgs]
    return task, mods, [m.configure_optimizers() for m in mods]


def ms_per_step(cell: str, k: int, kernel: str, reps: int = 20) -> float:
    from pipeline.training import stack

    task, mods, opts = _members(cell, k)
    gen = torch.Generator().manual_seed(0)
    x, y = task.sample(32, gen, "cpu")
    models = [m.model for m in mods]
    saved = dict(stack.KERNELS)
    if kernel == "blockdiag":
        stack.KERNELS[cell] = "blockdiag"
        stack.GATES.setdefault("lstm", 4)
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

    try:
        for _ in range(3):
            step()
        t = time.perf_counter()
        for _ in range(reps):
            step()
        return 1000 * (time.perf_counter() - t) / reps
    finally:
        stack.KERNELS.clear()
        stack.KERNELS.update(saved)


def run(quick: bool) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for cell in ("tanh", "gru", "lstm"):
        for k in (8,) if quick else (4, 8, 16):
            row: dict = {"cell": cell, "K": k}
            kernels = ["separate", "loop", "blockdiag"]
            if cell == "lstm":  # _fused_weights' LSTM layout: 4 gates (i, f, g, o), as nn.LSTM
                kernels = ["separate", "loop"]
            for kern in kernels:
                row[f"{kern}_ms"] = ms_per_step(cell, k, kern, 5 if quick else 20)
            rows.append(row)
    return rows


if __name__ == "__main__":
    for r in run("--full" not in __import__("sys").argv):
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()})
