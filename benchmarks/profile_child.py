"""One measurement of :mod:`benchmarks.profile_bench`, alone in its process so that its peak RSS
(VmHWM, reset through /proc/self/clear_refs) belongs to it.

``python -m benchmarks.profile_child CELL T WHAT DEVICE``; WHAT is ``step`` (one fused training step),
``profile`` (one float64 BPTT profile pass) or ``full`` (profile, spectrum and Lyapunov exponent).
Prints ``{"s": median seconds, "peak_mb": peak RSS above the start}``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from pipeline.bptt import profile as bptt
from pipeline.bptt import spectra
from pipeline.config import load_config
from pipeline.training.data import fixed_batch
from pipeline.training.models import RNNModel
from pipeline.training.tasks import make_task


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def passes(cell: str, T: int, device: str) -> dict[str, Callable[[], None]]:
    cfg = load_config(None, [f"model.cell={cell}", "model.hidden_size=128", f"task.seq_len={T}"])
    task = make_task("adding", T)
    model = RNNModel(cfg.model, task.input_size, task.output_size, task.readout).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = fixed_batch(task, 64, 0, device)
    px, py = fixed_batch(task, 32, 2, "cpu")
    px, py = px.double(), py.double()

    def cpu_params() -> dict:
        p = model.params(torch.float64)
        return {k: v.cpu() if torch.is_tensor(v) else v for k, v in p.items()}

    def train_step() -> None:
        opt.zero_grad()
        task.loss(model(x), y).backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    def profile_pass() -> None:
        bptt.summarize(bptt.profile(cpu_params(), px, py, task.loss, task.readout))

    def full_pass() -> None:
        p = cpu_params()
        bptt.summarize(bptt.profile(p, px, py, task.loss, task.readout))
        spectra.spectrum(p)
        spectra.lyapunov_max(p, px)

    return {"step": train_step, "profile": profile_pass, "full": full_pass}


def main(argv: list[str]) -> int:
    cell, T, what, device = argv[0], int(argv[1]), argv[2], argv[3]
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    fn = passes(cell, T, device)[what]
    fn()  # warm-up, outside the measured peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = peak_rss_mb()
    times = []
    for _ in range(5 if T <= 100 else 3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    print(json.dumps({"s": statistics.median(times), "peak_mb": peak_rss_mb() - base}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
