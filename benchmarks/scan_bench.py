"""The modern cells' training paths over time (``pipeline/training/modern.py``) against a plain Python loop.

For ``lru`` and ``mingru`` (H = 64, batch 64, adding-task inputs, one thread): one forward + backward of
the cell (input projection, recurrence, output) by each path: ``loop``, a Python loop over T with autograd
(what a user writes by hand; the module's own recurrence swapped for it), ``sequential`` (the fused
scan with its hand-written backward, the CPU default) and ``parallel`` (lru: the doubling scan; mingru:
the chunked log-space scan; the CUDA default). Rounds interleave the paths; the median per path is
reported, with each path's largest relative error against the float64 recursion on the same weights.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from unittest import mock

import torch

from pipeline.config import ModelConfig
from pipeline.training import modern
from pipeline.training.models import RNNModel

PATHS = ("loop", "sequential", "parallel")


class PlainLoop:
    """h_t = a_t h_{t-1} + b_t one step at a time, autograd recording every step (``SequentialScan``'s API)."""

    @staticmethod
    def apply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # unbind, not a[:, t]: indexing per step makes the backward O(T^2)
        a_t = [a] * b.shape[1] if a.dim() == 1 else a.unbind(1)
        h = torch.zeros_like(b[:, 0])
        outs = []
        for a_s, b_s in zip(a_t, b.unbind(1), strict=True):
            h = a_s * h + b_s
            outs.append(h)
        return torch.stack(outs, dim=1)


@contextmanager
def path(m: RNNModel, name: str):
    m.rnn.scan = "parallel" if name == "parallel" else "sequential"
    if name == "loop":
        with mock.patch.object(modern, "SequentialScan", PlainLoop):
            yield
    else:
        yield


def step_ms(m: RNNModel, x: torch.Tensor, name: str) -> float:
    with path(m, name):
        t0 = time.perf_counter()
        m.rnn(x).pow(2).mean().backward()
        return 1000 * (time.perf_counter() - t0)


def rel_error(m: RNNModel, x: torch.Tensor, name: str) -> float:
    ref = m.double()
    with torch.no_grad(), path(ref, "sequential"):
        want = ref.rnn(x.double())
    m.float()
    with torch.no_grad(), path(m, name):
        got = m.rnn(x).double()
    return float((got - want).abs().max() / want.abs().max())


def scan_cost(quick: bool = False) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for cell in ("lru", "mingru"):
        for T in (100,) if quick else (100, 1000):
            m = RNNModel(ModelConfig(cell=cell, hidden_size=64), 2, 1, "last", seed=0)
            x = torch.rand(64, T, 2, generator=torch.Generator().manual_seed(0))
            times: dict[str, list[float]] = {p: [] for p in PATHS}
            for p in PATHS:
                step_ms(m, x, p)  # warm-up
            for _ in range(3 if quick or T > 100 else 7):
                for p in PATHS:
                    times[p].append(step_ms(m, x, p))
            med = {p: statistics.median(v) for p, v in times.items()}
            row = {"bench": f"scan, {cell}", "T": T, "H": 64, "batch": 64}
            row.update({f"{p}_ms": med[p] for p in PATHS})
            row.update({f"{p}_vs_loop": med[p] / med["loop"] for p in PATHS[1:]})
            row.update({f"{p}_rel_err": rel_error(m, x, p) for p in PATHS})
            rows.append(row)
    return rows
