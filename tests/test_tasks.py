"""Tasks: layouts and targets as defined (README, "Tasks"), baselines equal to the loss of a model that learned nothing."""

import math

import pytest
import torch

from pipeline.training.data import fixed_batch
from pipeline.training.tasks import make_task


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_adding_layout_and_target():
    task = make_task("adding", 20)
    x, y = task.sample(500, gen())
    assert x.shape == (500, 20, 2) and y.shape == (500, 1)
    marks = x[..., 1]
    assert torch.all(marks.sum(1) == 2)
    assert torch.all(marks[:, :10].sum(1) == 1) and torch.all(marks[:, 10:].sum(1) == 1)
    assert torch.allclose((x[..., 0] * marks).sum(1, keepdim=True), y)
    assert x[..., 0].min() >= 0 and x[..., 0].max() <= 1


def test_adding_baseline_is_mse_of_predicting_one():
    task = make_task("adding", 50)
    assert task.baseline == pytest.approx(1 / 6)
    _, y = task.sample(200_000, gen(1))
    mse = task.loss(torch.ones_like(y), y).item()
    assert mse == pytest.approx(1 / 6, rel=0.01)


def test_copy_layout_and_baseline():
    T = 15
    task = make_task("copy", T)
    x, y = task.sample(64, gen())
    L = T + 20
    assert task.length == L and x.shape == (64, L, 10) and y.shape == (64, L)
    sym = x.argmax(-1)
    assert torch.all((sym[:, :10] >= 1) & (sym[:, :10] <= 8))
    assert torch.all(sym[:, 10 + T - 1] == 9) and (sym == 9).sum() == 64
    assert torch.all(y[:, -10:] == sym[:, :10]) and torch.all(y[:, :-10] == 0)
    # The learned-nothing model: blank with certainty, then uniform over the 8 symbols.
    logits = torch.full((64, L, 9), -1e9)
    logits[:, :-10, 0] = 0.0
    logits[:, -10:, 1:] = 0.0
    assert task.loss(logits, y).item() == pytest.approx(10 * math.log(8) / L, rel=1e-5)
    assert task.baseline == pytest.approx(10 * math.log(8) / L)


def test_temporal_order_layout_and_baseline():
    task = make_task("temporal_order", 100)
    x, y = task.sample(400, gen())
    sym = x.argmax(-1)
    rel = sym < 2
    assert torch.all(rel.sum(1) == 2)
    pos = rel.float().argsort(1, descending=True)[:, :2].sort(1).values
    assert torch.all((pos[:, 0] >= 10) & (pos[:, 0] < 20) & (pos[:, 1] >= 50) & (pos[:, 1] < 60))
    first, second = sym.gather(1, pos[:, :1]).squeeze(1), sym.gather(1, pos[:, 1:]).squeeze(1)
    assert torch.all(y == 2 * first + second)
    assert task.loss(torch.zeros(400, 4), y).item() == pytest.approx(math.log(4))
    assert task.baseline == pytest.approx(math.log(4))


@pytest.mark.parametrize("name", ["adding", "copy", "temporal_order"])
def test_seeded_and_device_local(name):
    task = make_task(name, 30)
    a = fixed_batch(task, 8, 3)
    b = fixed_batch(task, 8, 3)
    c = fixed_batch(task, 8, 4)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        make_task("parity", 10)
