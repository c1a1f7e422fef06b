"""Clipping that reports what it did: pre-clip norm measured before clipping, post-clip norm after."""

import numpy as np
import pytest
import torch

from pipeline.training.grad_window import window_stats
from pipeline.training.module import RECORD_FIELDS, RNNTrainingModule
from pipeline.training.tasks import make_task


class FakeTrainer:
    should_stop = False
    global_step = 3


def setup(tiny, **kw):
    cfg = tiny(**kw)
    task = make_task(cfg.task.name, cfg.task.seq_len)
    m = RNNTrainingModule(cfg, task)
    x, y = task.sample(16, torch.Generator().manual_seed(0))
    loss = m.training_step((x, y), 0)
    loss.backward()
    grads = [p.grad.detach().clone() for p in m.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    return m, grads, expected


def rec(m):
    return dict(zip(RECORD_FIELDS, m.last_record.tolist(), strict=True))


def total_norm(m):
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in m.parameters()])
    ).item()


def test_norm_clipping_records_pre_and_post(tiny):
    m, grads, pre = setup(tiny, **{"clip.mode": "norm", "clip.threshold": 0.01})
    assert pre > 0.01  # the case where clipping acts
    m.configure_gradient_clipping(None)
    r = rec(m)
    assert r["norm_preclip"] == pytest.approx(pre, rel=1e-6)
    assert r["norm_postclip"] == pytest.approx(0.01, rel=1e-4) and total_norm(m) == pytest.approx(
        0.01, rel=1e-4
    )
    assert r["clip_coef"] == pytest.approx(0.01 / pre, rel=1e-4) and r["clipped"] == 1.0
    # direction kept (Pascanu 2013, Algorithm 1): g <- c g / ||g||
    for p, g in zip(m.parameters(), grads, strict=True):
        assert torch.allclose(p.grad, g * (0.01 / pre), rtol=1e-4, atol=1e-12)
    groups = [r[f"norm_{k}"] for k in ("input", "recurrent", "bias", "readout")]
    assert sum(v * v for v in groups) == pytest.approx(pre * pre, rel=1e-6)


def test_norm_clipping_leaves_small_gradients(tiny):
    m, grads, pre = setup(tiny, **{"clip.mode": "norm", "clip.threshold": 1e6})
    m.configure_gradient_clipping(None)
    r = rec(m)
    assert (
        r["clipped"] == 0.0 and r["clip_coef"] == 1.0 and r["norm_postclip"] == pytest.approx(pre, rel=1e-6)
    )
    assert all(torch.equal(p.grad, g) for p, g in zip(m.parameters(), grads, strict=True))


def test_value_clipping(tiny):
    m, grads, pre = setup(tiny, **{"clip.mode": "value", "clip.threshold": 1e-3})
    m.configure_gradient_clipping(None)
    r = rec(m)
    assert all(p.grad.abs().max() <= 1e-3 for p in m.parameters())
    assert r["norm_postclip"] == pytest.approx(total_norm(m), rel=1e-6) and r["norm_postclip"] < pre
    assert r["norm_preclip"] == pytest.approx(pre, rel=1e-6)
    # clip_coef = post / pre: the factor the norm shrank by, < 1, so the step counts as clipped
    assert r["clip_coef"] == pytest.approx(r["norm_postclip"] / r["norm_preclip"], rel=1e-12)
    assert r["clip_coef"] < 1.0 and r["clipped"] == 1.0
    col = {k: np.array([r[k]]) for k in ("norm_preclip", "clip_coef")}
    assert window_stats(col, None)[1:] == (1.0, 1)  # grad/clip_rate = 1 over this step


def test_guard_drops_non_finite_gradients(tiny):
    m, _, _ = setup(tiny)
    m._trainer = FakeTrainer()
    next(m.parameters()).grad[0] = float("nan")
    m.configure_gradient_clipping(None)
    assert m.diverged_step == 3 and m.trainer.should_stop
    assert all(p.grad is None for p in m.parameters())  # optimizer.step will not touch the weights
