"""Tasks: layouts and targets as defined (README, "Tasks"), baselines equal to the loss of a model that learned nothing."""

import math

import pytest
import torch
import torch.nn.functional as F

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


# ----------------------------------------------------------------------------------- digits (real data)


def _rows(x) -> set[bytes]:
    """Images as hashable rows (the 1,797 digits images are pairwise distinct, checked below)."""
    return {r.tobytes() for r in x.reshape(len(x), -1).astype("float32")}


def test_digits_are_read_from_the_wheel_without_the_network(monkeypatch):
    import importlib.resources
    import socket

    from pipeline.config import DIGITS_IMAGES, DIGITS_SEQ_LEN
    from pipeline.training import digits

    def refuse(*a, **k):
        raise AssertionError("digits tried to reach the network")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    x, y = digits.images.__wrapped__()  # uncached: really read the file now
    assert (importlib.resources.files("sklearn.datasets") / "data" / "digits.csv.gz").is_file()
    assert x.shape == (DIGITS_IMAGES, DIGITS_SEQ_LEN) and y.shape == (DIGITS_IMAGES,)
    assert x.dtype.name == "float32" and x.min() == 0.0 and x.max() == 1.0
    assert sorted(set(y.tolist())) == list(range(10))
    assert len(_rows(x)) == DIGITS_IMAGES  # no two images alike: rows identify images


def test_digits_split_is_fixed_disjoint_stratified_and_independent_of_the_seed():
    import numpy as np
    from conftest import digits_held_out

    task = make_task("digits", 64, val_size=500)
    vx, vy = task.validation(500, seed=1)
    wx, wy = task.validation(500, seed=12345)  # another run's seed + 1: the same images
    assert torch.equal(vx, wx) and torch.equal(vy, wy)
    ex, ey, _ = digits_held_out(500)  # the documented split, computed independently
    assert np.allclose(vx.squeeze(-1).double().numpy(), ex) and np.array_equal(vy.numpy(), ey)
    assert np.bincount(ey).tolist() == [50] * 10  # stratified
    held = _rows(ex)
    # Training batches (any seed) and the probe batch are drawn from the other 1,297 images only, and
    # reach every one of them.
    drawn = set()
    for seed in (0, 7):
        x, _ = task.sample(8000, gen(seed))
        drawn |= _rows(x.squeeze(-1).double().numpy())
    px, _ = fixed_batch(task, 32, 2)
    assert not (held & drawn) and not (held & _rows(px.squeeze(-1).double().numpy()))
    assert len(drawn) == 1797 - 500
    # Nested: a smaller held-out split is part of a larger one.
    assert _rows(digits_held_out(200)[0]) <= held


def test_digits_permutation_is_fixed_and_a_true_permutation():
    from pipeline.training.digits import permutation

    perm = permutation()
    assert sorted(perm.tolist()) == list(range(64)) and perm.tolist() != list(range(64))
    # Fixed forever (numpy's legacy RandomState stream is frozen, NEP 19): the first steps read these pixels.
    assert perm[:8].tolist() == [45, 29, 43, 61, 34, 33, 31, 40]
    plain = make_task("digits", 64, val_size=100).validation(100, 0)[0]
    permuted = make_task("digits", 64, val_size=100, permute=True).validation(100, 0)[0]
    assert torch.equal(permuted, plain[:, perm])  # the same images, the same permutation for each


def test_digits_shapes_and_baseline_is_a_uniform_guess():
    task = make_task("digits", 64)
    x, y = task.sample(256, gen())
    assert (
        x.shape == (256, 64, 1) and x.dtype == torch.float32 and y.shape == (256,) and y.dtype == torch.long
    )
    assert x.min() >= 0 and x.max() <= 1 and y.min() >= 0 and y.max() <= 9
    assert (task.readout, task.window, task.output_size) == ("last", (64, 64), 10)
    assert task.baseline == pytest.approx(math.log(10))
    assert task.loss(torch.zeros(256, 10), y).item() == pytest.approx(math.log(10))  # uniform predictor
    with pytest.raises(ValueError, match="64"):
        make_task("digits", 50)


def test_accuracy_counts_against_an_independent_count():
    """Task.hits against a Python loop: digits and temporal order at the last step, copy on its recall
    steps only (README "The MLflow record", val/accuracy); adding has none."""
    g = gen(5)
    for name, T in (("digits", 64), ("temporal_order", 20), ("copy", 5)):
        task = make_task(name, T)
        _, y = task.sample(64, g)
        out = torch.randn(*y.shape, task.output_size, generator=g)
        out[:8] = F.one_hot(y[:8], task.output_size).float() * 10  # some right for sure
        hits, n = task.hits(out, y)
        pred, want = out.argmax(-1).tolist(), y.tolist()
        if name == "copy":
            pred, want = [p[-10:] for p in pred], [w[-10:] for w in want]
            pairs = [(a, b) for p, w in zip(pred, want, strict=True) for a, b in zip(p, w, strict=True)]
        else:
            pairs = list(zip(pred, want, strict=True))
        assert (int(hits), n) == (sum(a == b for a, b in pairs), len(pairs))
    assert make_task("adding", 10).hits(torch.zeros(4, 1), torch.zeros(4, 1)) is None


def test_solved_levels_and_memory_windows_are_the_documented_ones():
    """README, "Tasks": solved below 0.01 (adding) and 0.1 x baseline (copy, temporal order, digits);
    the memory window is the last step, or copy's recall steps T+11 .. T+20."""
    adding, copy, order = make_task("adding", 40), make_task("copy", 15), make_task("temporal_order", 40)
    assert adding.solved_below == pytest.approx(0.01)
    for task in (copy, order, make_task("digits", 64)):
        assert task.solved_below == pytest.approx(0.1 * task.baseline), task.name
    assert (adding.window, order.window, copy.window) == ((40, 40), (40, 40), (26, 35))


def test_unknown_task_names_every_allowed_task():
    with pytest.raises(ValueError, match="unknown task") as e:
        make_task("parity", 10)
    assert str(e.value) == "unknown task 'parity' (allowed: adding, copy, temporal_order, digits)"


@pytest.mark.parametrize("name", ["adding", "copy", "temporal_order"])
def test_validation_set_is_drawn_from_the_seed_it_is_given(name):
    """``Task.validation(n, seed)`` is the batch of generator ``seed`` (the run passes ``seed + 1``; the
    probe batch is ``seed + 2``, README "Tasks"): not another seed's batch."""
    task = make_task(name, 30)
    v = task.validation(16, 5)
    assert all(torch.equal(a, b) for a, b in zip(v, fixed_batch(task, 16, 5), strict=True))
    assert not torch.equal(v[0], fixed_batch(task, 16, 6)[0])


def test_task_of_reads_every_task_key():
    """``task.permute`` and ``task.val_size`` of a run's config reach the task it trains on."""
    from pipeline.config import load_config
    from pipeline.training.tasks import task_of

    cfg = load_config(None, ["task.name=digits", "task.seq_len=64", "task.permute=true", "task.val_size=100"])
    task = task_of(cfg.task)
    assert (task.name, task.permute, task.val_size) == ("digits", True, 100)
    plain = make_task("digits", 64, val_size=100).validation(100, 0)[0]
    assert not torch.equal(task.validation(100, 0)[0], plain)


def test_digits_validation_is_the_held_out_split_and_a_copy_of_it():
    """The held-out split is ``task.val_size`` images: asking another size is refused by name, and what
    is returned is a copy (a caller writing into it does not change the next run's validation set)."""
    task = make_task("digits", 64, val_size=100)
    with pytest.raises(ValueError, match="the digits held-out split has 100 images, 50 asked"):
        task.validation(50, 0)
    x, y = task.validation(100, 0)
    want = x.clone()
    x.zero_()
    y.zero_()
    again = task.validation(100, 0)
    assert torch.equal(again[0], want) and again[1].sum() > 0


def test_digits_refuse_a_changed_dataset(monkeypatch):
    """A scikit-learn whose digits are not the 1,797 images of grey levels 0..16 is named, not trained on."""
    import numpy as np
    import sklearn.datasets

    from pipeline.training import digits

    x, y = sklearn.datasets.load_digits(return_X_y=True)
    for bad in (x[:, :63], np.minimum(x, 15)):
        monkeypatch.setattr(sklearn.datasets, "load_digits", lambda return_X_y, bad=bad: (bad, y))
        with pytest.raises(RuntimeError, match="scikit-learn's digits changed"):
            digits.images.__wrapped__()
