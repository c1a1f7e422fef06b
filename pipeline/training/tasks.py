"""Long-memory tasks: pure tensor generators, seeded by a ``torch.Generator``, made on the device.

Each task knows its loss, its *baseline* (the loss of a model that learned nothing; README, "Tasks")
and how the model reads out (``"last"``: one output after the last step; ``"all"``: one per step).
Every loss in the pipeline is read against the baseline: ``val/loss_ratio = val/loss / baseline``.

Classification tasks also count their correct predictions (:meth:`Task.hits`), logged as
``val/accuracy``. :mod:`pipeline.training.digits` adds a task on real data (scikit-learn's digits).

Each task also declares its *memory window* (:attr:`Task.window`): the steps whose loss terms need
information from far back. The BPTT diagnostics measure the gradient of those terms alone (the
long-range profile, README "The long-range profile"), since a loss with a term at every step (copy)
has a total gradient dominated at each step by its own direct term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.config import TaskConfig


@dataclass(frozen=True)
class Task:
    name: str
    seq_len: int  # T as configured
    length: int  # actual sequence length fed to the network
    input_size: int
    output_size: int
    readout: str  # "last" | "all"
    baseline: float  # loss of a model that learned nothing
    solved_below: float  # loss under which the task counts as solved

    @property
    def window(self) -> tuple[int, int]:
        """Memory window (a, b): 1-based, inclusive steps of the loss terms that need long memory.

        Default: the last step alone (adding, temporal order: the only loss term). Copy overrides it
        with its recall steps.
        """
        return (self.length, self.length)

    def sample(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu"):
        raise NotImplementedError

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def validation(self, n: int, seed: int, device: torch.device | str = "cpu"):
        """The fixed validation set: ``n`` samples from a generator seeded with ``seed`` (the run's
        ``seed + 1``). A task with held-out data (digits) returns that split instead, whatever the seed."""
        gen = torch.Generator(device=device).manual_seed(seed)
        return self.sample(n, gen, device)

    def hits(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """Correct predictions in a batch (a tensor on the device, no host read) and how many were made,
        for ``val/accuracy``; None for a task that is not a classification (adding)."""
        return None


class Adding(Task):
    """Adding problem (Hochreiter 1997; Le, Jaitly, Hinton 2015; Arjovsky 2016).

    Input ``[n, T, 2]``: channel 0 holds values ~ U[0, 1]; channel 1 is a marker with exactly one 1 in
    the first half (t < T/2) and one in the second half. Target ``[n, 1]``: the sum of the two marked
    values. Loss: MSE. Predicting the constant 1 (the mean of the sum) gives MSE = Var(u1 + u2) = 2/12 =
    1/6, the baseline.

    Worked example, T = 6 (the halves are t in {0,1,2} and {3,4,5})::

        values  0.31 0.80 0.12 0.55 0.97 0.04
        marker  0    1    0    0    1    0
        target  0.80 + 0.97 = 1.77
    """

    def __init__(self, seq_len: int):
        super().__init__("adding", seq_len, seq_len, 2, 1, "last", 1.0 / 6.0, 0.01)

    def sample(self, n, generator, device="cpu"):
        T = self.seq_len
        half = T // 2
        values = torch.rand(n, T, generator=generator, device=device)
        first = torch.randint(0, half, (n,), generator=generator, device=device)
        second = torch.randint(half, T, (n,), generator=generator, device=device)
        marker = torch.zeros(n, T, device=device)
        rows = torch.arange(n, device=device)
        marker[rows, first] = 1.0
        marker[rows, second] = 1.0
        x = torch.stack([values, marker], dim=-1)
        y = (values[rows, first] + values[rows, second]).unsqueeze(-1)
        return x, y

    def loss(self, out, y):
        return F.mse_loss(out, y)


class Copy(Task):
    """Copy memory (Hochreiter 1997; Arjovsky, Shah, Bengio 2016; expRNN).

    Symbols: 0 blank, 1..8 data, 9 marker. Input (one-hot over 10 symbols), length T + 20: 10 data
    symbols from {1..8}, then T - 1 blanks, the marker, then 10 blanks. Target: blanks everywhere except
    the last 10 steps, which must reproduce the 10 data symbols. Loss: cross-entropy averaged over all
    T + 20 steps (9 classes, 0..8). A model that outputs blank, then guesses uniformly among 8 symbols
    for the last 10 steps scores 10 ln 8 / (T + 20), the baseline.

    Worked example, T = 3 (length 23; data shown as 10 symbols)::

        input   3 1 4 1 5 2 6 5 3 5  0 0  9  0 0 0 0 0 0 0 0 0 0
        target  0 0 0 0 0 0 0 0 0 0  0 0  0  3 1 4 1 5 2 6 5 3 5
    """

    n_mem = 10

    def __init__(self, seq_len: int):
        length = seq_len + 2 * self.n_mem
        super().__init__(
            "copy",
            seq_len,
            length,
            10,
            9,
            "all",
            self.n_mem * math.log(8) / length,
            0.1 * self.n_mem * math.log(8) / length,
        )

    @property
    def window(self) -> tuple[int, int]:
        """The recall steps T+11 .. T+20: the only loss terms that depend on the data symbols at steps
        1..10 (Arjovsky, Shah, Bengio 2016, section 4.1). The blank targets before them are learned from
        the current input alone and say nothing about memory."""
        return (self.length - self.n_mem + 1, self.length)

    def sample(self, n, generator, device="cpu"):
        T, m, L = self.seq_len, self.n_mem, self.length
        data = torch.randint(1, 9, (n, m), generator=generator, device=device)
        seq = torch.zeros(n, L, dtype=torch.long, device=device)
        seq[:, :m] = data
        seq[:, m + T - 1] = 9  # the marker: "recall now"
        y = torch.zeros(n, L, dtype=torch.long, device=device)
        y[:, -m:] = data
        x = F.one_hot(seq, 10).float()
        return x, y

    def loss(self, out, y):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def hits(self, out, y):
        """The recall steps only: the fraction of the 10 data symbols recalled (a blank target is learned
        from the current input alone, and counting them would put chance near (T + 10) / (T + 20))."""
        m = self.n_mem
        return (out[:, -m:].argmax(-1) == y[:, -m:]).sum(), y.shape[0] * m


class TemporalOrder(Task):
    """Temporal order (Hochreiter & Schmidhuber 1997, exp. 6a; Pascanu 2013).

    Symbols 0..5 one-hot: A=0, B=1 relevant; C, D, E, F = 2..5 distractors. Every step holds a random
    distractor except two positions, t1 in [0.1T, 0.2T) and t2 in [0.5T, 0.6T), which hold A or B.
    The class is the order: AA=0, AB=1, BA=2, BB=3. Loss: cross-entropy on the last step; guessing gives
    ln 4, the baseline.

    Worked example, T = 10 (t1 = 1, t2 = 5)::

        input  D B E C F A C D E F   ->  B then A: class BA = 2
    """

    def __init__(self, seq_len: int):
        super().__init__("temporal_order", seq_len, seq_len, 6, 4, "last", math.log(4), 0.1 * math.log(4))

    def sample(self, n, generator, device="cpu"):
        T = self.seq_len
        seq = torch.randint(2, 6, (n, T), generator=generator, device=device)
        lo1, hi1 = int(0.1 * T), max(int(0.2 * T), int(0.1 * T) + 1)
        lo2, hi2 = int(0.5 * T), max(int(0.6 * T), int(0.5 * T) + 1)
        t1 = torch.randint(lo1, hi1, (n,), generator=generator, device=device)
        t2 = torch.randint(lo2, hi2, (n,), generator=generator, device=device)
        a = torch.randint(0, 2, (n,), generator=generator, device=device)
        b = torch.randint(0, 2, (n,), generator=generator, device=device)
        rows = torch.arange(n, device=device)
        seq[rows, t1] = a
        seq[rows, t2] = b
        return F.one_hot(seq, 6).float(), 2 * a + b

    def loss(self, out, y):
        return F.cross_entropy(out, y)

    def hits(self, out, y):
        """The order class read at the last step (chance 1/4)."""
        return (out.argmax(-1) == y).sum(), y.shape[0]


_TASKS = {"adding": Adding, "copy": Copy, "temporal_order": TemporalOrder}


def make_task(name: str, seq_len: int, *, val_size: int = 500, permute: bool = False) -> Task:
    """The task ``name`` at length ``seq_len``. ``val_size`` and ``permute`` matter to digits only
    (the held-out split's size, the fixed pixel permutation; README "Tasks"); the synthetic tasks
    ignore them (their validation size is the ``n`` asked of :meth:`Task.validation`)."""
    if name == "digits":
        # Imported here: the only task with a dataset (scikit-learn, read once per process).
        from pipeline.training.digits import Digits

        return Digits(seq_len, val_size=val_size, permute=permute)
    try:
        return _TASKS[name](seq_len)
    except KeyError:
        raise ValueError(f"unknown task {name!r} (allowed: {', '.join([*_TASKS, 'digits'])})") from None


def task_of(cfg: TaskConfig) -> Task:
    """The task a run's ``task.*`` config describes."""
    return make_task(cfg.name, cfg.seq_len, val_size=cfg.val_size, permute=cfg.permute)
