"""Real data, offline: scikit-learn's handwritten digits, read pixel by pixel (a small sequential MNIST).

``sklearn.datasets.load_digits`` reads 1,797 greyscale 8x8 images (grey levels 0..16, 10 classes, 174-183
images each) from a file inside the scikit-learn wheel (``sklearn/datasets/data/digits.csv.gz``): nothing
is downloaded, at install or at run time. Each image is a sequence of T = 64 steps, one pixel a step, row
by row, scaled to [0, 1] (/ 16): input ``[n, 64, 1]``. The class is read at the last step (cross-entropy;
a model that learned nothing guesses uniformly: ln 10, the baseline). This is the pixel-by-pixel MNIST
protocol of Le, Jaitly & Hinton (2015, section 4.3) at 8x8; ``permute=True`` is their permuted variant:
one fixed pixel permutation (:data:`PERMUTE_SEED`), the same for every image and every run, so that
strokes no longer arrive as runs of neighbouring steps: what tells the classes apart is spread over all 64.

Worked example (image 0 of the file, a zero; its first row is ``0 0 5 13 9 1 0 0``)::

    steps 1..8   0.00 0.00 0.31 0.81 0.56 0.06 0.00 0.00   (then rows 2..8)   target 0

The split is fixed, and independent of the run's ``seed``: every run of every sweep is validated on the
same held-out images (:func:`held_out_order`). ``task.val_size`` is the size of that held-out split; the
rest is the training split. Training batches (generator ``seed``) and the probe batch of the BPTT profile
(generator ``seed + 2``) are drawn uniformly, with replacement, from the training split, on the device
(the splits live there, read once per process and device: 0.5 MB).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import DIGITS_IMAGES, DIGITS_SEQ_LEN
from pipeline.training.tasks import Task

# Seeds of numpy's legacy RandomState, whose streams NumPy keeps frozen across versions (NEP 19), so the
# split and the permutation are the same on every machine and every release.
SPLIT_SEED = 0
PERMUTE_SEED = 0
CLASSES = 10
GREY_LEVELS = 16  # pixel values are 0..16 (the 32x32 bitmaps' 4x4 block counts)
# Loss under which digits counts as solved: 0.1 x ln 10 = 0.230 nats, as for the other classification
# tasks (temporal order, copy). Measured on the held-out split with configs/train/digits.yaml (GRU): at
# 2400 steps 0.21-0.31 nats and 93-95% (seeds 0-2, two of them solved; README, "Results"); at 600 steps
# 0.44-0.59 nats and 81-85%, learning but not solved yet (README, "Tasks").
SOLVED_FRACTION = 0.1


@functools.lru_cache(maxsize=1)
def images() -> tuple[np.ndarray, np.ndarray]:
    """(pixels ``[1797, 64]`` float32 in [0, 1], labels ``[1797]`` int64): the bundled file, read once per
    process (scikit-learn imported here only: the other tasks never pay for it)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    if x.shape != (DIGITS_IMAGES, DIGITS_SEQ_LEN) or x.max() != GREY_LEVELS:  # a changed dataset, not ours
        raise RuntimeError(f"scikit-learn's digits changed: {x.shape} images, max {x.max()}")
    return (x / GREY_LEVELS).astype(np.float32), y.astype(np.int64)


def data_file() -> str:
    """Where scikit-learn keeps the digits file this task reads (for messages: it may not exist)."""
    import importlib.resources

    try:
        return str(importlib.resources.files("sklearn.datasets.data") / "digits.csv.gz")
    except ImportError:  # scikit-learn itself missing
        return "sklearn/datasets/data/digits.csv.gz (scikit-learn is not installed)"


def check_readable(key: str = "task.name") -> None:
    """Read the digits file now, or raise :class:`~pipeline.schema.ConfigError` naming ``key`` and the file:
    a missing or truncated file (a broken scikit-learn install, a slimmed container image) was a traceback
    after the MLflow run had been created, left FAILED with a resume hint that could not work (a
    real-data walkthrough)."""
    import importlib.metadata
    import sys
    import zlib

    from pipeline.schema import ConfigError

    try:
        images()
    except (ImportError, OSError, EOFError, ValueError, RuntimeError, zlib.error) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        try:
            pin = f"scikit-learn=={importlib.metadata.version('scikit-learn')}"
        except importlib.metadata.PackageNotFoundError:
            pin = "scikit-learn"
        raise ConfigError(
            key,
            f"'digits' reads scikit-learn's bundled file {data_file()}, which cannot be read "
            f"({type(e).__name__}: {why}); reinstall it: {sys.executable} -m pip install "
            f"--force-reinstall --no-deps {pin}",
        ) from None


def held_out_order(labels: np.ndarray) -> np.ndarray:
    """Image indices in the order the held-out split takes them: the first ``val_size`` are held out.

    One fixed shuffle (:data:`SPLIT_SEED`), then round robin over the classes: every class's first image
    (in shuffled order), then every class's second... So the split is stratified (class counts differ by
    at most one while ``val_size`` <= 10 x 174, the smallest class), and nested: a smaller held-out split
    is a subset of a larger one.
    """
    shuffled = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
    lab = labels[shuffled]
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(lab):
        where = np.flatnonzero(lab == c)
        rank[where] = np.arange(len(where))
    return shuffled[np.lexsort((np.arange(len(labels)), rank))]  # by rank, then by shuffled position


def permutation() -> np.ndarray:
    """The fixed pixel permutation of ``permute=True``: step t reads pixel ``permutation()[t]``."""
    return np.random.RandomState(PERMUTE_SEED).permutation(DIGITS_SEQ_LEN)


@functools.cache
def splits(val_size: int, permute: bool, device: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train": (x, y), "val": (x, y)}`` on ``device``, x ``[n, 64, 1]`` float32, y ``[n]`` int64."""
    x, y = images()
    if permute:
        x = x[:, permutation()]
    order = held_out_order(y)
    held = order[:val_size]
    train = np.setdiff1d(np.arange(len(y)), held)  # in the file's order
    return {
        name: (
            torch.from_numpy(x[idx]).unsqueeze(-1).to(device),
            torch.from_numpy(y[idx]).to(device),
        )
        for name, idx in (("train", train), ("val", held))
    }


@dataclass(frozen=True, init=False)
class Digits(Task):
    """scikit-learn's digits read pixel by pixel (see the module docstring). ``seq_len`` must be 64."""

    val_size: int  # images held out (task.val_size)
    permute: bool  # the fixed pixel permutation (task.permute)

    def __init__(self, seq_len: int = DIGITS_SEQ_LEN, *, val_size: int = 500, permute: bool = False):
        if seq_len != DIGITS_SEQ_LEN:
            raise ValueError(f"digits are {DIGITS_SEQ_LEN} pixels long, got seq_len={seq_len}")
        baseline = math.log(CLASSES)
        super().__init__("digits", seq_len, seq_len, 1, CLASSES, "last", baseline, SOLVED_FRACTION * baseline)
        object.__setattr__(self, "val_size", val_size)  # a frozen dataclass: set once, here
        object.__setattr__(self, "permute", permute)

    def _split(self, name: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        return splits(self.val_size, self.permute, str(torch.device(device)))[name]

    def sample(self, n, generator, device="cpu"):
        x, y = self._split("train", device)
        idx = torch.randint(0, len(y), (n,), generator=generator, device=x.device)
        return x[idx], y[idx]

    def validation(self, n, seed, device="cpu"):
        """The held-out split (``n`` = its size, ``task.val_size``), whatever ``seed``: the same images
        for every run."""
        if n != self.val_size:
            raise ValueError(f"the digits held-out split has {self.val_size} images, {n} asked")
        x, y = self._split("val", device)
        return x.clone(), y.clone()

    def loss(self, out, y):
        return F.cross_entropy(out, y)

    def hits(self, out, y):
        """The class read at the last step (chance 1/10)."""
        return (out.argmax(-1) == y).sum(), y.shape[0]
