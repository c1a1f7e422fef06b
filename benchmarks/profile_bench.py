"""Cost of one BPTT profile pass relative to one fused training step; peak memory of each.

Each measurement runs in a fresh subprocess so peak RSS (VmHWM, reset through /proc/self/clear_refs)
belongs to that measurement alone.
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, statistics, torch
from pipeline.config import load_config
from pipeline.training.models import RNNModel
from pipeline.training.tasks import make_task
from pipeline.training.data import fixed_batch
from pipeline.bptt import profile as bptt
from pipeline.bptt import spectra
cell, T, what, device = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(1); torch.set_flush_denormal(True)
cfg = load_config(None, [f"model.cell={cell}", "model.hidden_size=128", f"task.seq_len={T}"])
task = make_task("adding", T)
model = RNNModel(cfg.model, task.input_size, task.output_size, task.readout).to(device)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
x, y = fixed_batch(task, 64, 0, device)
px, py = fixed_batch(task, 32, 2, "cpu")
px = px.double(); py = py.double()
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
def train_step():
    opt.zero_grad(); task.loss(model(x), y).backward(); opt.step()
    if device == "cuda": torch.cuda.synchronize()
def profile_pass():
    p = model.params(torch.float64)
    p = {k: v.cpu() if torch.is_tensor(v) else v for k, v in p.items()}
    bptt.summarize(bptt.profile(p, px, py, task.loss, task.readout))
def full_pass():
    p = model.params(torch.float64)
    p = {k: v.cpu() if torch.is_tensor(v) else v for k, v in p.items()}
    bptt.summarize(bptt.profile(p, px, py, task.loss, task.readout)); spectra.spectrum(p); spectra.lyapunov_max(p, px)
fn = {"step": train_step, "profile": profile_pass, "full": full_pass}[what]
fn()
open("/proc/self/clear_refs", "w").write("5")
base = rss()
times = []
for _ in range(5 if T <= 100 else 3):
    t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
print(json.dumps({"s": statistics.median(times), "peak_mb": rss() - base}))
"""


def measure(cell: str, T: int, what: str, device: str = "cpu") -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, cell, str(T), what, device], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile_cost(quick: bool = False, device: str = "cpu") -> list[dict]:
    rows = []
    for cell in ("tanh", "lstm"):
        for T in ((100,) if quick else (100, 1000)):
            step, prof, full = (measure(cell, T, w, device) for w in ("step", "profile", "full"))
            rows.append({
                "bench": f"profile pass / train step, {cell}", "device": device, "T": T, "H": 128,
                "train_step_ms (batch 64)": 1000 * step["s"], "profile_ms (probe 32)": 1000 * prof["s"],
                "ratio": prof["s"] / step["s"], "target": "<= 2.0",
                "full_pass_ms (+spectra, Lyapunov)": 1000 * full["s"],
                "peak_mb step/profile": f"{step['peak_mb']:.0f}/{prof['peak_mb']:.0f}",
            })
    return rows
