"""Training throughput of the pipeline (diagnostics + MLflow on) against a plain PyTorch loop.

Same model (RNNModel), same on-device batches, same optimizer and steps. Rounds are interleaved
(pipeline, plain, pipeline, plain, ...) and the median of per-round ratios is reported, so drift in
machine load hits both sides alike. Timed window: first training batch start to last batch end
(per-step gradient records, profile passes every ``diagnostics.profile_every`` steps, buffered MLflow
logging all inside it; process start, store creation and final artifacts outside it, reported apart).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from pipeline.config import load_config
from pipeline.training.data import OnDeviceBatches
from pipeline.training.models import RNNModel
from pipeline.training.run import configure_torch, run
from pipeline.training.tasks import make_task


class Window(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.t1 = time.perf_counter()


def bench_config(cell: str, steps: int, store: str, accelerator: str = "cpu"):
    return load_config(
        None,
        [
            f"model.cell={cell}",
            "model.hidden_size=128",
            "task.name=adding",
            "task.seq_len=100",
            "task.batch_size=64",
            f"trainer.max_steps={steps}",
            f"trainer.val_every={steps}",
            "optim.name=adam",
            "optim.lr=1e-3",
            "clip.mode=norm",
            "clip.threshold=1.0",
            f"trainer.accelerator={accelerator}",
            f"tracking.uri={store}",
            "tracking.experiment=bench",
        ],
    )


def plain_loop(cfg, device: str) -> float:
    """What a user writes by hand: the same model and data, no diagnostics, no logging. Returns steps/s."""
    configure_torch(cfg)
    task = make_task(cfg.task.name, cfg.task.seq_len)
    model = RNNModel(cfg.model, task.input_size, task.output_size, task.readout, seed=cfg.seed).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    batches = OnDeviceBatches(
        task, cfg.task.batch_size, cfg.trainer.max_steps, cfg.seed, torch.device(device)
    )
    t0 = None
    for x, y in batches:
        if t0 is None:
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip.threshold)
        opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return cfg.trainer.max_steps / (time.perf_counter() - t0)


def pipeline_run(cfg) -> tuple[float, float]:
    """Returns (steps/s inside the training window, whole run wall seconds)."""
    w = Window()
    t = time.perf_counter()
    run(cfg, callbacks=[w])
    return cfg.trainer.max_steps / (w.t1 - w.t0), time.perf_counter() - t


def throughput(quick: bool = False, accelerator: str = "cpu") -> list[dict]:
    device = "cuda" if accelerator == "gpu" else "cpu"
    steps, rounds = (120, 3) if quick else (300, 5)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        store = f"sqlite:///{Path(d) / 'mlflow.db'}"
        from pipeline.tracking import ensure_experiment

        ensure_experiment(store, "bench")
        for cell in ("tanh", "lstm"):
            cfg = bench_config(cell, steps, store, accelerator)
            pipeline_run(bench_config(cell, 20, store, accelerator))  # warm-up (first-call costs)
            plain_loop(bench_config(cell, 20, store, accelerator), device)
            ratios, ours, theirs, walls = [], [], [], []
            for _ in range(rounds):
                a, wall = pipeline_run(cfg)
                b = plain_loop(cfg, device)
                ours.append(a)
                theirs.append(b)
                walls.append(wall)
                ratios.append(a / b)
            rows.append(
                {
                    "bench": f"train throughput, {cell}",
                    "device": device,
                    "T": 100,
                    "H": 128,
                    "batch": 64,
                    "steps": steps,
                    "pipeline_steps_per_s": statistics.median(ours),
                    "plain_steps_per_s": statistics.median(theirs),
                    "ratio_median": statistics.median(ratios),
                    "target": ">= 0.90",
                    "run_wall_s": statistics.median(walls),
                }
            )
    return rows
