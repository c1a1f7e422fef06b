"""One measurement of :mod:`benchmarks.remedy_bench`, alone in its process so that its peak RSS (VmHWM,
reset through /proc/self/clear_refs) belongs to it.

``python -m benchmarks.remedy_child CELL T H B WHAT DEVICE``: one training step of the real
:class:`~pipeline.training.module.RNNTrainingModule` (``training_step``, backward, Adam), with WHAT one of
``plain`` (the fused step), ``omega`` (``remedy.omega=1``), ``floss1`` / ``floss4`` (flossing with k = 1 or
4 exponents on 8 trajectories, every step). Prints ``{"s": median seconds, "peak_mb": peak RSS above the
start}``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from benchmarks.profile_child import peak_rss_mb
from pipeline.config import load_config
from pipeline.training.data import fixed_batch
from pipeline.training.module import RNNTrainingModule
from pipeline.training.tasks import make_task

REMEDY = {
    "plain": [],
    "omega": ["remedy.omega=1"],
    "floss1": ["remedy.floss.weight=1", "remedy.floss.exponents=1", "remedy.floss.batch=8"],
    "floss4": ["remedy.floss.weight=1", "remedy.floss.exponents=4", "remedy.floss.batch=8"],
}


def step_fn(cell: str, T: int, H: int, B: int, what: str, device: str):
    over = [f"model.cell={cell}", f"model.hidden_size={H}", f"task.seq_len={T}", f"task.batch_size={B}"]
    cfg = load_config(None, over + REMEDY[what])
    task = make_task("adding", T)
    module = RNNTrainingModule(cfg, task).to(device)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    x, y = fixed_batch(task, B, 0, device)

    def train_step() -> None:
        opt.zero_grad()
        module.training_step((x, y), 0).backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return train_step


def main(argv: list[str]) -> int:
    cell, T, H, B, what, device = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4], argv[5]
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    fn = step_fn(cell, T, H, B, what, device)
    fn()  # warm-up, outside the measured peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = peak_rss_mb()
    times = []
    for _ in range(7):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    print(json.dumps({"s": statistics.median(times), "peak_mb": peak_rss_mb() - base}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
