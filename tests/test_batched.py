"""Batched trials (README, "Batched trials"): a member of a stack trains as the same config alone.

Equivalence is checked on the per-step record every run keeps (loss, pre/post-clip norms, clip
coefficient, per-group norms), the step-0 and final profile passes, and the run's summary, for a mix of
cells (fused tanh and gru blocks, looped lstm), clip modes, optimizers and a member that diverges at
step 0 while the others go on.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.config import from_dict

BASE = {
    "seed": 0,
    "task": {"name": "adding", "seq_len": 12, "batch_size": 16, "val_size": 64},
    "model": {"cell": "tanh", "hidden_size": 8, "init": "gaussian", "init_scale": 1.0},
    "optim": {"name": "adam", "lr": 0.01},
    "clip": {"mode": "none", "threshold": 1.0},
    "trainer": {"max_steps": 40, "val_every": 20, "log_every": 5, "threads": 1},
    "diagnostics": {"profile_every": 20, "probe_size": 8, "plots": False},
    "tracking": {"enabled": False},
}


def cfg_of(**changes):
    import copy

    d = copy.deepcopy(BASE)
    for k, v in changes.items():
        sect, key = k.split("__")
        d[sect][key] = v
    return from_dict(d)


MEMBERS = [
    dict(model__cell="tanh", model__init_scale=1.5, optim__lr=0.02),
    dict(model__cell="tanh", model__init_scale=0.5, clip__mode="norm", clip__threshold=0.05),
    dict(model__cell="gru", optim__name="sgd", optim__lr=0.1, optim__momentum=0.9),
    dict(model__cell="lstm", clip__mode="value", clip__threshold=0.01),
    dict(model__cell="gru", model__init_scale=2.0, optim__weight_decay=0.01),
    # relu with identity init g = 8: the state reaches 8^12 ~ 7e10 and the loss overflows? not at T = 12;
    # the divergence member is made explicit below.
]


@pytest.fixture
def captured(monkeypatch):
    """Every run's (cfg, module, monitors, steps) as it is recorded (``run.record_end``: both paths)."""
    from pipeline.training import run

    seen: list = []
    real = run.record_end

    def spy(cfg, task, rec, module, mon, steps):
        seen.append((cfg, module, mon, steps))
        return real(cfg, task, rec, module, mon, steps)

    monkeypatch.setattr(run, "record_end", spy)
    return seen


def _records(mon) -> np.ndarray:
    return mon.grads.history


def _same_run(alone, member, rtol=2e-4, atol=1e-6) -> None:
    cfg_a, mod_a, mon_a, steps_a = alone
    cfg_b, mod_b, mon_b, steps_b = member
    assert cfg_a == cfg_b
    assert steps_a == steps_b
    assert mod_a.diverged_step == mod_b.diverged_step
    ha, hb = _records(mon_a), _records(mon_b)
    assert ha.shape == hb.shape and len(ha) > 0
    np.testing.assert_allclose(hb, ha, rtol=rtol, atol=atol, equal_nan=True)
    assert list(mon_a.grads.steps) == list(mon_b.grads.steps)
    # the step-0 diagnostics are of the same initial weights: equal to the last digit
    assert mon_a.prof.first.keys() == mon_b.prof.first.keys()
    for k, v in mon_a.prof.first.items():
        w = mon_b.prof.first[k]
        assert (math.isnan(v) and math.isnan(w)) or v == w, k
    assert [p["step"] for p in mon_a.prof.passes] == [p["step"] for p in mon_b.prof.passes]
    if mod_a.val_loss is not None:
        assert mod_b.val_loss == pytest.approx(mod_a.val_loss, rel=1e-3)


def _diverging():
    # relu, identity init g = 40 at T = 12: the state grows as 40^12 ~ 1.7e19 and its square (the
    # loss's gradient path) overflows float32: the guard fires at step 0.
    return cfg_of(model__cell="relu", model__init="identity", model__init_scale=40.0)


def test_member_of_a_stack_trains_as_it_would_alone(captured):
    from pipeline.training import run, stacked

    cfgs = [cfg_of(**m) for m in MEMBERS] + [_diverging()]
    alone = []
    for c in cfgs:
        r = run.run(c)
        alone.append((r, captured[-1]))
    captured.clear()
    results = stacked.run_stack(cfgs)
    assert len(results) == len(cfgs) == len(captured)
    by_cfg = {id(c): i for i, c in enumerate(cfgs)}
    assert by_cfg  # members finish in their own order: match them by config
    for (ra, a), rb in zip(alone, results, strict=True):
        b = next(x for x in captured if x[0] == a[0])
        _same_run(a, b)
        assert not isinstance(rb, BaseException)
        assert (rb.steps, rb.regime, rb.solved, rb.pruned, rb.diverged_step) == (
            ra.steps,
            ra.regime,
            ra.solved,
            ra.pruned,
            ra.diverged_step,
        )
    div = results[-1]
    assert not isinstance(div, BaseException) and div.diverged_step == 0 and div.regime == "diverged"
    assert all(not isinstance(r, BaseException) and r.steps == 40 for r in results[:-1])
