"""Batches made on the training device from a seeded ``torch.Generator``: no per-batch host work.

Training batches come from generator ``seed``; the fixed validation set from ``seed + 1``; the fixed
probe batch for the BPTT profile from ``seed + 2`` (see :mod:`pipeline.training.callbacks`). A task with
held-out data (digits) draws training and probe batches from its training split the same way, and its
validation set is the held-out split, whatever the seed (:meth:`~pipeline.training.tasks.Task.validation`).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline.training.tasks import Task


class OnDeviceBatches(IterableDataset):
    """``n`` fresh batches, each generated on ``device`` (DataLoader with batch_size=None, no workers).

    ``start``: a resumed run's step; the first ``start`` batches are drawn and dropped, so the run sees
    exactly the stream an uninterrupted run would (``len`` stays ``n``: Lightning's restored batch count
    of the epoch already includes them)."""

    def __init__(self, task: Task, batch_size: int, n: int, seed: int, device: torch.device, start: int = 0):
        self.task, self.batch_size, self.n, self.seed, self.device = task, batch_size, n, seed, device
        self.start = start

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        for i in range(self.n):
            batch = self.task.sample(self.batch_size, gen, self.device)
            if i >= self.start:
                yield batch


def fixed_batch(task: Task, n: int, seed: int, device: torch.device | str = "cpu"):
    """A deterministic batch (validation set, probe batch): same seed, same tensors, on any device."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return task.sample(n, gen, device)


class TaskDataModule(pl.LightningDataModule):
    def __init__(self, task: Task, batch_size: int, val_size: int, max_steps: int, seed: int):
        super().__init__()
        self.task, self.batch_size, self.val_size = task, batch_size, val_size
        self.max_steps, self.seed = max_steps, seed

    @property
    def device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def train_dataloader(self):
        # Called after a checkpoint's loop state is restored: global_step is the resumed run's step.
        start = self.trainer.global_step if self.trainer is not None else 0
        ds = OnDeviceBatches(self.task, self.batch_size, self.max_steps, self.seed, self.device, start)
        return DataLoader(ds, batch_size=None, num_workers=0)

    def val_dataloader(self):
        x, y = self.task.validation(self.val_size, self.seed + 1, self.device)
        # Validation in chunks of the training batch size (bounded memory at long T).
        chunk = max(self.batch_size, 256)
        batches = list(zip(x.split(chunk), y.split(chunk), strict=True))
        return DataLoader(batches, batch_size=None, num_workers=0)
