"""Batched trials (README, "Batched trials"): a member of a stack trains as the same config alone.

Equivalence is checked on the per-step record every run keeps (loss, pre/post-clip norms, clip
coefficient, per-group norms), the step-0 and final profile passes, and the run's summary, for a mix of
cells (fused tanh and gru blocks, looped lstm), clip modes, optimizers and a member that diverges at
step 0 while the others go on.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import from_dict
from pipeline.signals import Terminated

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
        if "__" not in k:
            d[k] = v
            continue
        sect, key = k.split("__")
        d[sect][key] = v
    return from_dict(d)


MEMBERS = [
    dict(model__cell="tanh", model__init_scale=1.5, optim__lr=0.02),
    dict(model__cell="tanh", model__init_scale=0.5, clip__mode="norm", clip__threshold=0.05),
    dict(model__cell="gru", optim__name="sgd", optim__lr=0.1, optim__momentum=0.9),
    dict(model__cell="lstm", clip__mode="value", clip__threshold=0.01),
    dict(model__cell="gru", model__init_scale=2.0, optim__weight_decay=0.01),
]  # plus a member that diverges at step 0 (_diverging)


@pytest.fixture
def captured(monkeypatch):
    """Every run's (cfg, module, monitors, steps) as it is recorded (``record.record_end``: both paths)."""
    from pipeline.training import record

    seen: list = []
    real = record.record_end

    def spy(cfg, task, rec, module, mon, steps):
        seen.append((cfg, module, mon, steps))
        return real(cfg, task, rec, module, mon, steps)

    monkeypatch.setattr(record, "record_end", spy)
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
        assert mod_b.val_loss == pytest.approx(mod_a.val_loss, rel=1e-3, nan_ok=True)


def run_opt(cfg):
    """The optimizer a config's module makes."""
    from pipeline.training.module import RNNTrainingModule
    from pipeline.training.tasks import task_of

    return RNNTrainingModule(cfg, task_of(cfg.task)).configure_optimizers()


def _diverging():
    # relu, identity init g = 40 at T = 12: the state grows as 40^12 ~ 1.7e19 and its square (the
    # loss's gradient path) overflows float32: the guard fires at step 0.
    return cfg_of(model__cell="relu", model__init="identity", model__init_scale=40.0)


def _spy_batched(monkeypatch, cfgs) -> list[set[int]]:
    """Records, at each batched measurement of a stack, which members (indices into ``cfgs``) took it."""
    from pipeline.training import stack_loop

    batched: list[set[int]] = []
    real = stack_loop.measure

    def spy(members, *rest):
        batched.append({cfgs.index(m.cfg) for m in members})
        return real(members, *rest)

    monkeypatch.setattr(stack_loop, "measure", spy)
    return batched


def test_member_of_a_stack_trains_as_it_would_alone(captured, monkeypatch):
    """Both update paths in one stack: Adam and SGD members (with and without clipping by norm, weight
    decay, momentum, the diverging member) take the batched update (pipeline.training.stack_update), the
    value-clipped member its own; each must match its run alone."""
    from pipeline.training import run, stack_update, stacked

    cfgs = [cfg_of(**m) for m in MEMBERS] + [_diverging()]
    alone = []
    for c in cfgs:
        r = run.run(c)
        alone.append((r, captured[-1]))
    captured.clear()
    batched = _spy_batched(monkeypatch, cfgs)
    results = stacked.run_stack(cfgs)
    assert batched[0] == {0, 1, 2, 4, 5}  # all but the value-clipped lstm (MEMBERS[3])
    assert not stack_update.batchable(cfgs[3], run_opt(cfgs[3]))
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


@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_a_members_nan_loss_with_finite_gradients_stops_it_as_alone(captured, monkeypatch, optim):
    """The loss the guard reads turns NaN at step K while the gradients stay finite (test_guard.py's
    "loss" case): only the loss half of the batched update's finite flag can stop the member. Dropping
    it left the member training on, "vanishing" instead of diverged at K (a mutation audit: no test
    caught it). The member stops at K as it does alone, its record equal to the alone run's; its
    neighbour in the fused block trains on as it would alone."""
    from test_guard import K, PlantAndWatch

    from pipeline.training import run, stack_loop, stack_update, stacked

    extra = {"optim__name": "sgd", "optim__lr": 0.05, "optim__momentum": 0.9} if optim == "sgd" else {}
    cfgs = [cfg_of(**extra), cfg_of(seed=1, model__init_scale=0.5, **extra)]
    assert all(stack_update.batchable(c, run_opt(c)) for c in cfgs)
    r_plant = run.run(cfgs[0], callbacks=[PlantAndWatch("loss")])
    alone = [captured[-1]]
    r_other = run.run(cfgs[1])
    alone.append(captured[-1])
    assert (r_plant.diverged_step, r_plant.regime) == (K, "diverged")
    captured.clear()
    real = stack_loop._loss

    def plant(m, task, out, batch):
        loss = real(m, task, out, batch)
        if m.cfg is cfgs[0] and m.trainer.global_step == K:
            m.module._loss = torch.full_like(m.module._loss, float("nan"))  # after its finite graph
        return loss

    monkeypatch.setattr(stack_loop, "_loss", plant)
    batched = _spy_batched(monkeypatch, cfgs)
    results = stacked.run_stack(cfgs)
    assert batched[K] == {0, 1}  # the planted step went through the batched update
    for a, rb, ra in zip(alone, results, (r_plant, r_other), strict=True):
        assert not isinstance(rb, BaseException)
        _same_run(a, next(x for x in captured if x[0] == a[0]))
        assert (rb.steps, rb.regime, rb.diverged_step) == (ra.steps, ra.regime, ra.diverged_step)
    assert [r.diverged_step for r in results] == [K, None]
    assert [r.steps for r in results] == [K + 1, 40]


@pytest.mark.parametrize("path", ["mixed", "own_path", "batched"])
def test_a_member_diverging_in_a_fused_block_stops_alone(captured, path):
    """Four ReLU members in one block-diagonal kernel, one of which overflows float32 at step 0: its state
    grows as (1e4)^t past 3.4e38 at t = 10 of 12, and 0 x inf is NaN in its neighbours' rows, forward and
    backward. Only it is stopped; the others train as they would alone. ``mixed``: batched (Adam, SGD) and
    one on its own update path (clipping by value), the diverging member the only one clipping by norm
    (so the batched update has no gradient to clip at that step); ``own_path``: all four clip by value,
    so no member takes the batched update and its host read; ``batched``: none clips, all four take the
    batched update, so only its host read's finite flags can call for the step to be taken again."""
    from pipeline.training import run, stack, stack_update, stacked

    own = {"clip__mode": "value", "clip__threshold": 0.01}
    mine = own if path == "own_path" else {}
    cfgs = [
        cfg_of(model__cell="relu", model__init_scale=0.5, **mine),
        cfg_of(model__cell="relu", optim__name="sgd", optim__lr=0.05, seed=1, **mine),
        cfg_of(
            model__cell="relu",
            model__init="identity",
            model__init_scale=1e4,
            **(mine if path != "mixed" else {"clip__mode": "norm"}),
        ),
        cfg_of(model__cell="relu", seed=2, **({} if path == "batched" else own)),
    ]
    n_batched = sum(stack_update.batchable(c, run_opt(c)) for c in cfgs)
    assert n_batched == {"mixed": 3, "own_path": 0, "batched": 4}[path]
    alone = []
    for c in cfgs:
        r = run.run(c)
        alone.append((r, captured[-1]))
    captured.clear()
    from pipeline.training.models import RNNModel

    assert stack.plan([RNNModel(c.model, 2, 1, "last", seed=c.seed) for c in cfgs]) == [[0, 1, 2, 3]]
    results = stacked.run_stack(cfgs)
    for (ra, a), rb in zip(alone, results, strict=True):
        assert not isinstance(rb, BaseException)
        _same_run(a, next(x for x in captured if x[0] == a[0]))
        assert (rb.steps, rb.regime, rb.diverged_step) == (ra.steps, ra.regime, ra.diverged_step)
    assert [r.diverged_step for r in results] == [None, None, 0, None]
    assert [r.steps for r in results] == [40, 40, 1, 40]


@pytest.mark.parametrize("own_inputs", [False, True])
@pytest.mark.parametrize("cell", ["tanh", "gru", "lstm"])
def test_a_fused_block_gives_each_member_its_own_output_and_gradient(monkeypatch, cell, own_inputs):
    """The block-diagonal kernel (pipeline.training.stack), LSTM's included (measured, not chosen): each
    member's output and each member's parameter gradients match the member run alone (autograd through
    its own nn.RNN / GRU / LSTM), with one input for all or one per member (a rolling stack).

    In float64, so that the two sums' rounding is far below the tolerance on any CPU and BLAS: here both
    paths agree to 2e-14 of each tensor's largest entry (gradients up to 109 for tanh at init scale 2.5),
    and the tolerance is 1e-9 of it. In float32 the same comparison differed by 2e-8 of the largest entry
    on one CPU and failed an absolute tolerance of 1e-6 on another; a kernel bug (a block leaking into a
    neighbour's, gates out of order) moves entries by their own size."""
    import torch

    from pipeline.training import stack
    from pipeline.training.models import RNNModel

    monkeypatch.setitem(stack.KERNELS, cell, "blockdiag")
    mods = []
    for seed in range(3):
        cfg = cfg_of(seed=seed, model__cell=cell, model__init_scale=0.5 + seed)
        mods.append(RNNModel(cfg.model, 2, 1, "last", seed=seed).double())  # the adding task's shape
    assert stack.plan(mods) == [[0, 1, 2]]  # one fused block
    gen = torch.Generator().manual_seed(0)
    f64 = torch.float64
    xs = (
        [torch.randn(16, 12, 2, generator=gen, dtype=f64) for _ in mods]
        if own_inputs
        else torch.randn(16, 12, 2, generator=gen, dtype=f64)
    )

    def close(a, b):
        assert a.dtype == b.dtype == f64
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9 * float(b.detach().abs().max()))

    fused = stack.stacked_forward(mods, xs)
    sum(o.square().sum() for o in fused).backward()
    got = [[p.grad.clone() for p in m.parameters()] for m in mods]
    for m in mods:
        m.zero_grad(set_to_none=True)
    for i, m in enumerate(mods):
        out = m(xs[i] if own_inputs else xs)
        close(fused[i], out)
        out.square().sum().backward()
        for g, p in zip(got[i], m.parameters(), strict=True):
            close(g, p.grad)


class PruneAt:
    """Prunes its member at one validation step (as the sweep's TrialCallback does)."""

    def __init__(self, step: int):
        self.step = step

    def __getattr__(self, name):  # every other Lightning hook: nothing to do
        if name.startswith(("on_", "setup")):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step and trainer.state.fn == "fit":
            pl_module.pruned = True
            trainer.should_stop = True


def test_every_metric_history_of_a_member_is_the_trial_alone_s(store, monkeypatch):
    """Point for point, every metric key of each member's MLflow run (one pruned at a validation, two
    trained to the end) against the same config trained alone: the same steps, values within the
    equivalence tolerance (_same_run; the largest difference used 0.8% of it, bptt/decay_rate), and no
    point repeated (a run's end restates its last measurements
    at their step: sent once). A wall clock that moves 1 ms a call keeps MLflow's merging of equal
    points in one millisecond from deciding either."""
    import pytorch_lightning as pl
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.training import run, stacked
    from tests.test_recorder import Ticking

    monkeypatch.setattr(tracking, "time", Ticking())

    class Prune(PruneAt, pl.Callback):
        pass

    cfgs = [cfg_of(**m, tracking__enabled=True) for m in MEMBERS[:3]]
    alone = [run.run(c, callbacks=[Prune(20)] if i == 0 else None) for i, c in enumerate(cfgs)]
    members = stacked.run_stack(cfgs, callbacks=[[PruneAt(20)], [], []])
    c = MlflowClient(store)

    def histories(run_id):
        keys = c.get_run(run_id).data.metrics
        return {k: [(m.step, m.value) for m in c.get_metric_history(run_id, k)] for k in keys}

    for a, b in zip(alone, members, strict=True):
        assert not isinstance(b, BaseException)
        ha, hb = histories(a.run_id), histories(b.run_id)
        assert set(ha) == set(hb) and len(ha) > 20
        for k in ha:
            assert [s for s, _ in ha[k]] == [s for s, _ in hb[k]], (k, ha[k], hb[k])
            np.testing.assert_allclose([v for _, v in hb[k]], [v for _, v in ha[k]], rtol=2e-4, atol=1e-6)
            for h in (ha[k], hb[k]):
                assert len(set(h)) == len(h), (k, h)
    assert alone[0].pruned and members[0].pruned and members[0].steps == 20


def test_a_pruned_member_stops_and_the_others_go_on(captured):
    from pipeline.training import run, stacked

    cfgs = [cfg_of(**m) for m in MEMBERS[:3]]
    alone = []
    for c in cfgs[1:]:
        run.run(c)
        alone.append(captured[-1])
    captured.clear()
    done: list[int] = []
    results = stacked.run_stack(cfgs, callbacks=[[PruneAt(20)], [], []], on_done=lambda i, r: done.append(i))
    r0 = results[0]
    assert not isinstance(r0, BaseException) and r0.pruned and r0.steps == 20
    assert done[0] == 0 and sorted(done) == [0, 1, 2]  # the pruned member is told first
    for a in alone:  # the others train on, unchanged by the member that left
        _same_run(a, next(x for x in captured if x[0] == a[0]))


def test_a_member_that_joins_later_trains_as_it_would_alone(captured):
    """Rolling stacks: a member pruned at step 20 leaves; the slot is refilled at once with a config of
    another seed and schedule, which joins the running tanh member in one fused block (each reading its
    own batch stream: the block takes both inputs side by side) and must train exactly as alone."""
    from pipeline.training import run, stacked

    first = [cfg_of(model__init_scale=0.8), cfg_of(model__init_scale=1.2, optim__lr=0.02)]
    joiners = [
        cfg_of(seed=3, model__init_scale=0.6, trainer__max_steps=30, trainer__val_every=10),
        cfg_of(seed=3, model__cell="gru", trainer__max_steps=25, trainer__val_every=5),
    ]
    alone = []
    for c in [first[1], *joiners]:
        run.run(c)
        alone.append(captured[-1])
    captured.clear()
    asked: list[int] = []

    def refill(n: int):
        asked.append(n)
        if not joiners:
            return None
        return [(joiners.pop(0), {}, [])]

    done: list[int] = []
    results = stacked.run_stack(
        first,
        callbacks=[[PruneAt(20)], []],
        on_done=lambda i, r: done.append(i),
        refill=refill,
        capacity=2,
    )
    assert len(results) == 4 and done[0] == 0
    assert asked[0] == 1  # the first free slot: the pruned member's
    assert sorted(done) == [0, 1, 2, 3]
    r0 = results[0]
    assert not isinstance(r0, BaseException) and r0.pruned and r0.steps == 20
    for a in alone:
        _same_run(a, next(x for x in captured if x[0] == a[0]))
    assert [r.steps for r in results[1:] if not isinstance(r, BaseException)] == [40, 30, 25]


def test_a_slot_refilled_before_the_first_step_with_a_longer_member_trains_as_alone(captured):
    """A stack that starts short of its capacity (a sweep's last trials, several workers) is topped up
    before its first step; the newcomer of the same seed joins the first members' batch stream. That
    stream was once sized to the first members' steps and ran dry under a newcomer with more:
    StopIteration failed every member (found by a review, reproduced in a sweep)."""
    from pipeline.training import run, stacked

    short = cfg_of(trainer__max_steps=10, trainer__val_every=5)
    longer = cfg_of(model__init_scale=1.2, trainer__max_steps=30, trainer__val_every=10)
    run.run(longer)
    alone = captured[-1]
    captured.clear()
    queue = [longer]

    def refill(n: int):
        return [(queue.pop(), {}, [])] if queue else None

    results = stacked.run_stack([short], refill=refill, capacity=2)
    assert [r.steps for r in results if not isinstance(r, BaseException)] == [10, 30], results
    _same_run(alone, next(x for x in captured if x[0] == longer))


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_the_batched_optimizer_step_is_torchs_to_the_bit(name):
    """The batched SGD / Adam step of members with their own learning rates gives each member's
    parameters exactly what its own torch optimizer's step gives (``foreach=False``, the CPU default),
    over several steps (SGD's momentum buffer and Adam's moments included). SGD once rounded its
    product before the add (foreach mul, then add): about one parameter in ten differed in the last bit
    at lr 0.3, and a chaotic trial grew that bit (found by a review)."""
    from types import SimpleNamespace

    import torch

    from pipeline.training import stack_update

    gen = torch.Generator().manual_seed(0)
    shapes = [(32, 32), (32, 4), (32,)]
    kw = dict(momentum=0.9, weight_decay=0.01) if name == "sgd" else dict(weight_decay=0.01)
    cls = torch.optim.SGD if name == "sgd" else torch.optim.Adam
    lrs = [0.3, 0.7, 0.013] if name == "sgd" else [3e-3, 0.07, 0.013]
    ours, theirs = [], []
    for lr in lrs:
        ps = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
        qs = [p.detach().clone().requires_grad_(True) for p in ps]
        ours.append(SimpleNamespace(opt=cls(ps, lr=lr, **kw)))
        theirs.append(cls(qs, lr=lr, foreach=False, **kw))
    for _ in range(3):
        for m, opt in zip(ours, theirs, strict=True):
            for p, q in zip(m.opt.param_groups[0]["params"], opt.param_groups[0]["params"], strict=True):
                g = torch.randn(p.shape, generator=gen)
                p.grad, q.grad = g.clone(), g.clone()
        stack_update._step_optimizers(ours)
        for opt in theirs:
            opt.step()
    for m, opt in zip(ours, theirs, strict=True):
        for p, q in zip(m.opt.param_groups[0]["params"], opt.param_groups[0]["params"], strict=True):
            assert torch.equal(p, q)


def test_run_stack_rejects_configs_of_different_streams():
    from pipeline.training import stacked

    with pytest.raises(ValueError, match="stack_key"):
        stacked.run_stack([cfg_of(), cfg_of(task__batch_size=8)])


def test_a_joiner_that_fails_to_start_is_told_as_itself(captured, monkeypatch):
    """Rolling stacks: the first member a refill brings fails as its run starts; it is told at once under
    its own index (2: after the two first members), not the index of a member that trains or has left,
    and the member the second refill brings joins as 3; the running member trains on as alone."""
    from pipeline.training import run, stacked

    first = [cfg_of(trainer__max_steps=10, trainer__val_every=5), cfg_of(model__init_scale=1.2)]
    bad = cfg_of(seed=5)
    good = cfg_of(seed=3, trainer__max_steps=20, trainer__val_every=10)
    alone = []
    for c in (first[1], good):
        run.run(c)
        alone.append(captured[-1])
    captured.clear()
    real = stacked._start_recorder

    def start(cfg, *rest):
        if cfg is bad:
            raise RuntimeError("no run for this member")
        return real(cfg, *rest)

    monkeypatch.setattr(stacked, "_start_recorder", start)
    queue = [[bad], [good]]

    def refill(n: int):
        return [(c, {}, []) for c in queue.pop(0)] if queue else None

    done: dict[int, list] = {}
    results = stacked.run_stack(
        first, on_done=lambda i, r: done.setdefault(i, []).append(r), refill=refill, capacity=2
    )
    assert sorted(done) == [0, 1, 2, 3] and all(len(v) == 1 for v in done.values()), done
    assert isinstance(done[2][0], RuntimeError) and results[2] is done[2][0]
    assert [r.steps for i, r in enumerate(results) if i != 2] == [10, 40, 20]
    assert all(not isinstance(done[i][0], BaseException) for i in (0, 1, 3))
    for a in alone:
        _same_run(a, next(x for x in captured if x[0] == a[0]))


def test_a_member_with_a_remedy_takes_its_own_update(captured, monkeypatch):
    """A member with a remedy (here Omega, whose value is a column of every record row) keeps its
    module's own clipping and guard in a stack of batched members, and trains as it would alone; every
    remedy (spike skip, Omega, flossing) keeps a member off the batched update."""
    from pipeline.training import run, stack_update, stacked

    remedies = [{"omega": 1.0}, {"skip": {"zscore": 3.0}}, {"floss": {"weight": 0.1}}]
    assert not any(stack_update.batchable(c, run_opt(c)) for c in (cfg_of(remedy=r) for r in remedies))
    cfgs = [cfg_of(**MEMBERS[0]), cfg_of(**MEMBERS[1]), cfg_of(model__init_scale=0.9, remedy=remedies[0])]
    alone = []
    for c in cfgs:
        run.run(c)
        alone.append(captured[-1])
    captured.clear()
    batched = _spy_batched(monkeypatch, cfgs)
    results = stacked.run_stack(cfgs)
    assert batched[0] == {0, 1}
    assert all(not isinstance(r, BaseException) and r.steps == 40 for r in results)
    for a in alone:
        _same_run(a, next(x for x in captured if x[0] == a[0]))


def test_a_joiner_clips_at_its_own_threshold_not_the_leavers(captured):
    """Rolling stacks: a member clipping by norm at 0.05 leaves and one clipping at 0.02 takes its slot,
    so the stack has as many members as before and a new set; the batched update's layout (which
    tensors clip, at which threshold) is the new set's: each trains as it would alone."""
    from pipeline.training import run, stacked

    first = [
        cfg_of(clip__mode="norm", clip__threshold=0.05, trainer__max_steps=10, trainer__val_every=5),
        cfg_of(model__init_scale=1.2),
    ]
    joiner = cfg_of(
        seed=3, clip__mode="norm", clip__threshold=0.02, trainer__max_steps=20, trainer__val_every=10
    )
    alone = []
    for c in [*first, joiner]:
        run.run(c)
        alone.append(captured[-1])
    captured.clear()
    queue = [joiner]

    def refill(n: int):
        return [(queue.pop(), {}, [])] if queue else None

    results = stacked.run_stack(first, refill=refill, capacity=2)
    assert [r.steps for r in results if not isinstance(r, BaseException)] == [10, 40, 20], results
    for a in alone:
        _same_run(a, next(x for x in captured if x[0] == a[0]))


def _statuses(store) -> dict[str, tuple[str, str | None]]:
    """Each member's MLflow run (by its ``member`` tag): its status and ``error`` tag."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(store)
    ids = [e.experiment_id for e in c.search_experiments()]
    return {r.data.tags["member"]: (r.info.status, r.data.tags.get("error")) for r in c.search_runs(ids)}


def test_a_member_whose_end_raises_fails_alone(store, monkeypatch):
    """An error in one member's end (its record) fails that member alone: its run FAILED with the error,
    its result the exception; the others' runs FINISHED."""
    from pipeline.training import record, stacked

    cfgs = [
        cfg_of(**m, tracking__enabled=True, trainer__max_steps=10, trainer__val_every=5) for m in MEMBERS[:3]
    ]
    real = record.record_end

    def end(cfg, *rest):
        if cfg is cfgs[1]:
            raise RuntimeError("record failed")
        return real(cfg, *rest)

    monkeypatch.setattr(record, "record_end", end)
    results = stacked.run_stack(cfgs, extra_tags=[{"member": str(i)} for i in range(3)])
    assert isinstance(results[1], RuntimeError)
    assert all(not isinstance(results[i], BaseException) for i in (0, 2))
    st = _statuses(store)
    assert {k: s for k, (s, _) in st.items()} == {"0": "FINISHED", "1": "FAILED", "2": "FINISHED"}
    assert st["1"][1] == "RuntimeError: record failed"


@pytest.mark.parametrize(
    ("error", "status", "tag"),
    [
        (RuntimeError("the loop broke"), "FAILED", "RuntimeError: the loop broke"),
        (Terminated("test"), "KILLED", None),
    ],
    ids=["error", "sigterm"],
)
def test_an_error_or_a_signal_in_the_shared_loop_closes_every_unfinished_run(
    store, monkeypatch, error, status, tag
):
    """The shared step raises at step 8: run_stack re-raises, and every member still training has its run
    closed, FAILED with the error, or KILLED for SIGTERM (raised as Terminated) or Ctrl-C (README, "Batched
    trials"); the member that finished at step 5 stays FINISHED."""
    from pipeline.training import stack_loop, stacked

    short = {"trainer__max_steps": 5, "trainer__val_every": 5}
    cfgs = [
        cfg_of(**m, tracking__enabled=True, **(short if i == 0 else {})) for i, m in enumerate(MEMBERS[:3])
    ]
    real, calls = stack_loop._step, []

    def step(*a, **k):
        calls.append(1)
        if len(calls) == 9:
            raise error
        return real(*a, **k)

    monkeypatch.setattr(stack_loop, "_step", step)
    with pytest.raises(type(error)):
        stacked.run_stack(cfgs, extra_tags=[{"member": str(i)} for i in range(3)])
    st = _statuses(store)
    assert {k: s for k, (s, _) in st.items()} == {"0": "FINISHED", "1": status, "2": status}
    if tag is not None:
        assert st["1"][1] == st["2"][1] == tag


# ------------------------------------------------------------------- a batched worker (in this process)


def _bad_config(w, monkeypatch, which) -> list[int]:
    """``w.trial_run_config`` raises for the trials ``which(number)`` picks; the numbers it was asked."""
    real, asked = w.trial_run_config, []

    def cfg(t):
        asked.append(t.number)
        if len(asked) > 30:  # the worker did not stop: end the test instead of the sweep
            raise SystemExit("the worker never stopped")
        if which(t.number):
            raise ValueError(f"bad value in trial {t.number}")
        return real(t)

    monkeypatch.setattr(w, "trial_run_config", cfg)
    return asked


def test_a_batched_trial_whose_config_raises_fails_alone(store, tmp_path, monkeypatch):
    from tests.test_signals import _worker

    w = _worker(tmp_path, 2, n_trials=2, pruner={"name": "none"})
    _bad_config(w, monkeypatch, lambda n: n == 0)
    assert w.run() == 0
    ts = w.study.get_trials()
    assert [t.state.name for t in ts] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert ts[0].user_attrs["error"] == "ValueError: bad value in trial 0"


def test_a_batched_worker_whose_stack_raises_fails_every_trial_and_stops(store, tmp_path, monkeypatch):
    """run_stack itself raises: every trial the stack held fails with the error, and after
    MAX_CONSECUTIVE_ERRORS such batches the worker stops (1)."""
    from pipeline.sweep.worker import MAX_CONSECUTIVE_ERRORS
    from pipeline.training import stacked
    from tests.test_signals import _worker

    w = _worker(tmp_path, 2, n_trials=4, pruner={"name": "none"})

    def broken(*a, **k):
        raise RuntimeError("the stack broke")

    monkeypatch.setattr(stacked, "run_stack", broken)
    assert w.run() == 1
    ts = w.study.get_trials()
    assert len(ts) == 2 * MAX_CONSECUTIVE_ERRORS
    assert {t.state.name for t in ts} == {"FAIL"}
    assert {t.user_attrs.get("error") for t in ts} == {"RuntimeError: the stack broke"}


def test_a_batched_worker_whose_configs_all_raise_stops(store, tmp_path, monkeypatch):
    """Every trial's config raises: each trial fails, and the worker stops (1) after
    MAX_CONSECUTIVE_ERRORS batches instead of asking trials for ever."""
    from pipeline.sweep.worker import MAX_CONSECUTIVE_ERRORS
    from tests.test_signals import _worker

    w = _worker(tmp_path, 2, n_trials=4, pruner={"name": "none"})
    asked = _bad_config(w, monkeypatch, lambda n: True)
    assert w.run() == 1
    assert len(asked) == 2 * MAX_CONSECUTIVE_ERRORS
    assert {t.state.name for t in w.study.get_trials()} == {"FAIL"}


DEFAULT_SWEEP = str(Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "default.yaml")
GIB = 1024**3


def _room(monkeypatch, nbytes):
    from pipeline.training import budget

    monkeypatch.delenv("PIPELINE_MEMORY_CHECK", raising=False)
    monkeypatch.setattr(budget, "host_available", lambda: (int(nbytes), "MemAvailable"))


def test_memory_check_counts_a_workers_imports_once_and_each_member_of_its_stack(monkeypatch):
    """A stack of K shares its worker's runtime (imports, CUDA context) and steps its K members together:
    one worker needs runtime + K x (its persistent parts) + max(K x training pass, any other pass). On the
    H200 (125 GiB available) the first count, workers x K whole processes, refused 12 workers x 64 trials
    of the default sweep ("768 workers at once need about 579 GiB")."""
    from pipeline.schema import ConfigError
    from pipeline.sweep.config import largest_trial, load_sweep
    from pipeline.training import budget

    cfg = largest_trial(load_sweep(DEFAULT_SWEEP, ["base.trainer.accelerator=cpu"]))
    est = budget.estimate(cfg)
    own = sum(p.nbytes for p in est.persistent) - budget.RUNTIME_BYTES
    train = next(p.nbytes for p in est.passes if p.what == "training activations")
    others = max(p.nbytes for p in est.passes if p.what != "training activations")
    for k in (1, 2, 64):  # an independent sum of the parts
        assert est.peak(None, k) == budget.RUNTIME_BYTES + k * own + max(k * train, others)
    assert est.peak(None, 64) < 64 * est.peak()

    _room(monkeypatch, 125 * GIB)
    budget.check_fits(cfg, copies=12, members=64)  # fits: about 12 x (0.75 GiB + 64 trials)
    with pytest.raises(ConfigError) as e:  # 768 whole processes would not
        budget.check_fits(cfg, copies=768)
    assert e.value.key == "workers"

    # too little room: each suggestion is the largest that fits with the other value held
    room = 3 * GIB
    _room(monkeypatch, room)
    fits = room * budget.FIT_FRACTION
    each = est.peak(None, 64)
    with pytest.raises(ConfigError) as e:
        budget.check_fits(cfg, copies=12, members=64)
    most = int(str(e.value).rsplit("--workers ", 1)[1].rstrip(")"))
    assert e.value.key == "workers" and most * each <= fits < (most + 1) * each
    _room(monkeypatch, each * 0.9 / budget.FIT_FRACTION)
    with pytest.raises(ConfigError) as e:
        budget.check_fits(cfg, copies=1, members=64)
    k = int(str(e.value).rsplit("trials_per_worker=", 1)[1].rstrip(")"))
    assert e.value.key == "trials_per_worker" and 1 <= k < 64
    assert (
        est.peak(None, k)
        <= int(each * 0.9 / budget.FIT_FRACTION) * budget.FIT_FRACTION
        < est.peak(None, k + 1)
    )
    # not one full stack fits, nor 12 workers of one trial: fewer workers, one trial each
    assert 1.2 * est.peak() < each
    _room(monkeypatch, 1.2 * est.peak() / budget.FIT_FRACTION)
    with pytest.raises(ConfigError) as e:
        budget.check_fits(cfg, copies=12, members=64)
    assert e.value.key == "workers" and "(--workers 1) with trials_per_worker=1" in str(e.value), e.value


def test_workers_auto_shrinks_to_what_fits_and_an_explicit_count_is_refused(monkeypatch):
    from pipeline.schema import ConfigError
    from pipeline.sweep import parent
    from pipeline.sweep.config import largest_trial, load_sweep
    from pipeline.training import budget

    sw = load_sweep(DEFAULT_SWEEP, ["n_trials=100", "trials_per_worker=4", "base.trainer.accelerator=cpu"])
    est = budget.estimate(largest_trial(sw))
    _room(monkeypatch, 3 * est.peak(None, 4) / budget.FIT_FRACTION)
    lines = []
    out = type("Out", (), {"write": lambda self, s: lines.append(s), "flush": lambda self: None})()
    n, devices = parent.fit_workers(sw, 8, [None] * 8, auto=True, out=out)
    assert n == 3 and devices == [None] * 3
    assert "workers: auto -> 3 (memory: 8 would not fit)" in "".join(lines)
    with pytest.raises(ConfigError) as e:
        parent.fit_workers(sw, 8, [None] * 8, auto=False, out=out)
    assert e.value.key == "workers" and "(--workers 3)" in str(e.value)
    # a worker holds at most its share of the budget: 100 trials over 50 workers is 2 each, not 4
    _room(monkeypatch, 50 * est.peak(None, 2) / budget.FIT_FRACTION)
    assert parent.fit_workers(sw, 50, [None] * 50, auto=False, out=out)[0] == 50


@pytest.mark.parametrize(
    ("gpus", "cores", "want"),
    [(1, 16, 12), (1, 2, 1), (2, 16, 12), (8, 64, 48), (4, 256, 48), (8, 4, 8), (0, 16, 4), (0, 2, 2)],
)
def test_workers_auto_shares_each_gpu_among_cpu_cores(monkeypatch, gpus, cores, want):
    """``workers: auto``: on a GPU machine up to 12 workers per GPU (measured on an H200: 7.0x the
    trials per hour of one worker) and 3/4 of the cores, at least one per GPU, round-robin over the GPUs
    the parent sees; else one per core (at most 4)."""
    from pipeline.sweep import parent
    from pipeline.sweep.config import load_sweep

    monkeypatch.setattr(parent, "gpu_count", lambda: gpus)
    monkeypatch.setattr(parent, "_cores", lambda: cores)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    sw = load_sweep(DEFAULT_SWEEP, ["n_trials=1000"])
    n, devices = parent.choose_workers(None, sw)
    assert n == want and len(devices) == n
    if gpus:
        assert devices == [str(i % gpus) for i in range(n)]  # spread evenly
        assert max(devices.count(str(g)) for g in range(gpus)) <= parent.GPU_WORKERS_PER_GPU
        # a parent restricted to some GPUs puts its workers on those
        names = [str(7 - g) for g in range(gpus)]
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(names))
        assert parent.choose_workers(None, sw)[1] == [names[i % gpus] for i in range(n)]
    else:
        assert devices == [None] * n
    assert parent.choose_workers(3, sw)[0] == 3  # --workers wins
    cpu = load_sweep(DEFAULT_SWEEP, ["n_trials=1000", "base.trainer.accelerator=cpu"])
    assert parent.choose_workers(None, cpu) == (
        min(4, cores),
        [None] * min(4, cores),
    )  # CPU: the user's choice
    assert parent.choose_workers(None, load_sweep(DEFAULT_SWEEP, ["n_trials=2"]))[0] <= 2


@pytest.mark.parametrize("bad", ["0", "-1", "4097", "x"])
def test_bad_trials_per_worker_is_one_line_exit_2(tmp_path, monkeypatch, capsys, bad):
    import sys

    sys.path.insert(0, str(tmp_path.parent))
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = _sweep_file(tmp_path / "bad.yaml")
    assert main(["sweep", "--config", str(cfg), f"trials_per_worker={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "'trials_per_worker'" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


# ------------------------------------------------------------------------------- sweeps (processes)


def _sweep_file(path, **changes):
    import yaml

    from tests.test_sweep import TINY

    data = yaml.safe_load(yaml.safe_dump(TINY))
    data["trials_per_worker"] = 4
    data.update(changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _children(runs):
    return {int(r.data.tags["trial_number"]): r for r in runs if r.data.tags.get("pipeline.kind") == "trial"}


def test_batched_sweep_records_each_trial_as_one_at_a_time_does(store, tmp_path):
    """Same points on both sides (the start-up design covers every trial, no pruning): K = 4 and K = 1
    give every trial the same value and the same params, metrics, tags and artifacts."""
    from mlflow.tracking import MlflowClient

    from tests.test_sweep import check_consistent, load_study, mlflow_runs, run_sweep_cli

    same = {"n_trials": 4, "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 4}}
    same["pruner"] = {"name": "none"}
    out = {}
    for k in (1, 4):
        cfg = _sweep_file(tmp_path / f"s{k}.yaml", study=f"k{k}", trials_per_worker=k, **same)
        p = run_sweep_cli(cfg)
        assert p.returncode == 0, p.stdout + p.stderr
        study = load_study(f"k{k}", f"optuna/k{k}.journal")
        runs = [r for r in mlflow_runs(store) if r.data.tags.get("study") == f"k{k}"]
        check_consistent(study, runs, 4)
        out[k] = (study, _children(runs))
    c = MlflowClient(store)
    (s1, r1), (s4, r4) = out[1], out[4]
    assert {t.user_attrs["worker"] for t in s4.trials} == {s4.trials[0].user_attrs["worker"]}
    for t1, t4 in zip(s1.trials, s4.trials, strict=True):
        assert t1.params == t4.params
        assert t4.value == pytest.approx(t1.value, rel=1e-3)
        a, b = r1[t1.number], r4[t4.number]
        drop = lambda d: {k: v for k, v in d.items() if k != "tracking.run_name"}  # noqa: E731  (the study name)
        assert drop(a.data.params) == drop(b.data.params)
        assert set(a.data.metrics) == set(b.data.metrics)
        skip = {"mlflow.runName", "mlflow.note.content", "study", "git_commit", "mlflow.source.name"}
        assert {k for k in a.data.tags if k not in skip} == {k for k in b.data.tags if k not in skip}
        assert a.data.tags["regime"] == b.data.tags["regime"]
        names = lambda r: sorted(f.path for f in c.list_artifacts(r.info.run_id, "diagnostics"))  # noqa: E731
        assert names(a) == names(b)
        h1 = c.get_metric_history(a.info.run_id, "train/loss")
        h4 = c.get_metric_history(b.info.run_id, "train/loss")
        assert [m.step for m in h1] == [m.step for m in h4]
        np.testing.assert_allclose([m.value for m in h4], [m.value for m in h1], rtol=1e-4)


def _batched_sweep(tmp_path, steps: int):
    from tests.test_sweep import TINY, start_sweep

    base = {**TINY["base"], "trainer": {"max_steps": steps, "val_every": steps // 4, "log_every": 10}}
    cfg = _sweep_file(tmp_path / "s.yaml", n_trials=4, base=base)
    return start_sweep(cfg)


def _wait_all_running(n: int, timeout: float = 240):
    """The worker's n RUNNING trials, once each has its MLflow run id (the stack is training)."""
    import time

    from optuna.trial import TrialState

    from tests.test_sweep import load_study

    end = time.time() + timeout
    while time.time() < end:
        try:
            ts = load_study().get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except Exception:
            ts = []
        if len(ts) == n and all("mlflow_run_id" in t.user_attrs for t in ts):
            return ts
        time.sleep(0.5)
    raise AssertionError("the stack did not start")


@pytest.mark.kernel_free
@pytest.mark.slow
def test_kill_9_of_a_batched_worker_reaps_all_its_trials(store, tmp_path):
    import os
    import signal

    from tests.test_sweep import check_killed_trial_retried, load_study, mlflow_runs

    parent = _batched_sweep(tmp_path, 400)
    try:
        ts = _wait_all_running(4)
        assert len({t.user_attrs["worker"] for t in ts}) == 1
        os.kill(int(ts[0].user_attrs["worker"].split("|")[1]), signal.SIGKILL)
        out, err = parent.communicate(timeout=400)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
    assert parent.returncode == 0, out + err
    study, runs = load_study(), mlflow_runs(store)
    killed = {t.user_attrs["mlflow_run_id"] for t in ts}
    for t in ts:  # every member: FAIL, its run KILLED, retried exactly once and finished
        check_killed_trial_retried(
            study, [r for r in runs if r.info.run_id not in killed - {t.user_attrs["mlflow_run_id"]}], t, 4
        )


@pytest.mark.kernel_free
@pytest.mark.slow
def test_sigterm_closes_every_member(store, tmp_path):
    import signal

    from tests.test_sweep import load_study, mlflow_runs

    parent = _batched_sweep(tmp_path, 2000)
    ts = _wait_all_running(4)
    parent.send_signal(signal.SIGTERM)
    out, err = parent.communicate(timeout=120)
    assert parent.returncode == 143, out + err
    study, runs = load_study(), mlflow_runs(store)
    by_id = {r.info.run_id: r for r in runs}
    assert not [r for r in runs if r.info.status == "RUNNING"]
    for t in ts:
        assert (
            study.trials[t.number].state.name == "FAIL" and study.trials[t.number].user_attrs["interrupted"]
        )
        assert by_id[t.user_attrs["mlflow_run_id"]].info.status == "KILLED"
        retry = [x for x in study.trials if x.user_attrs.get("retry_of") == t.number]
        assert len(retry) == 1 and retry[0].state.name == "WAITING" and retry[0].params == t.params


@pytest.mark.kernel_free
def test_two_batched_workers_stop_at_exactly_n_trials(store, tmp_path):
    """Two workers asking up to 4 trials each under the budget lock: 7 trials done, no more, one MLflow
    run each; the last trials are shared (each asks at most ceil(left / workers))."""
    from tests.test_sweep import check_consistent, load_study, mlflow_runs, run_sweep_cli

    cfg = _sweep_file(tmp_path / "s.yaml", n_trials=7, workers=2)
    p = run_sweep_cli(cfg)
    assert p.returncode == 0, p.stdout + p.stderr
    study = load_study()
    check_consistent(study, mlflow_runs(store), 7)
    assert [t.number for t in study.trials] == list(range(len(study.trials)))


@pytest.mark.kernel_free
@pytest.mark.parametrize(("k", "n"), [(4, 4), (2, 6)], ids=["one-ask", "refills"])
def test_a_searched_task_setting_groups_trials_into_stacks_by_shape(store, tmp_path, k, n):
    """The space searches task.seq_len, so the trials asked together differ in shape: each stack holds one
    shape, and a refill of another shape waits for a stack of its own. Putting all asked trials in one
    stack (every trial FAIL: run_stack refuses mixed shapes) or letting a refill of another shape join
    (5 of 6 FAIL) survived every test (a mutation audit)."""
    from tests.test_sweep import check_consistent, load_study, mlflow_runs, run_sweep_cli

    space = {"task.seq_len": {"choices": [8, 12]}, "optim.lr": {"low": 1e-3, "high": 3e-2, "log": True}}
    sampler = {"name": "random", "seed": 0}
    cfg = _sweep_file(
        tmp_path / "s.yaml", n_trials=n, trials_per_worker=k, workers=1, space=space, sampler=sampler
    )
    p = run_sweep_cli(cfg)
    assert p.returncode == 0, p.stdout + p.stderr
    study = load_study()
    assert {t.params["task.seq_len"] for t in study.trials} == {8, 12}, "the draw must mix both"
    assert [t.state.name for t in study.trials if t.state.name not in ("COMPLETE", "PRUNED")] == []
    check_consistent(study, mlflow_runs(store), n)


@pytest.mark.kernel_free
def test_a_free_slot_is_refilled_while_the_stack_trains(store, tmp_path):
    """Rolling stacks, end to end: one worker, 2 slots, trials of 10 and 60 steps. A short trial's slot is
    refilled while its long stack-mate still trains (without refilling, a new trial would start only
    after both ended), never more than 2 train at once, and the budget stops at exactly 5."""
    from tests.test_sweep import check_consistent, load_study, mlflow_runs, run_sweep_cli

    space = {"trainer.max_steps": {"choices": [10, 60]}, "optim.lr": {"low": 1e-3, "high": 3e-2, "log": True}}
    sampler = {"name": "random", "seed": 0}
    cfg = _sweep_file(tmp_path / "s.yaml", n_trials=5, trials_per_worker=2, space=space, sampler=sampler)
    p = run_sweep_cli(cfg)
    assert p.returncode == 0, p.stdout + p.stderr
    study = load_study()
    runs = mlflow_runs(store)
    check_consistent(study, runs, 5)
    spans = [(r.info.start_time, r.info.end_time) for r in _children(runs).values()]
    assert {t.params["trainer.max_steps"] for t in study.trials} == {10, 60}, "the draw must mix both"
    # c joined a running stack: it started after a ended, while b, which started before a ended, trained on
    joined = [
        (a, b, c)
        for a in spans
        for b in spans
        for c in spans
        if a[1] <= c[0] and b[0] < a[1] and c[0] < b[1] and b is not a
    ]
    assert joined, f"no trial joined a running stack: {sorted(spans)}"
    assert max(sum(s2 <= s < e2 for s2, e2 in spans) for s, _ in spans) <= 2


def test_run_stack_rejects_configs_of_different_devices():
    """stack_key is the task config AND the device (README, "Batched trials"): members on the CPU and on
    the GPU never share a stack."""
    from pipeline.training import stacked

    cpu, gpu = cfg_of(trainer__accelerator="cpu"), cfg_of(trainer__accelerator="gpu")
    assert stacked.stack_key(cpu) != stacked.stack_key(gpu)
    with pytest.raises(ValueError, match="the configs differ in the task or device"):
        stacked.run_stack([cpu, gpu])


def test_a_refill_of_another_task_is_refused_and_fails_the_stack(store):
    """A refill that returns a config of another stack_key is an error of the sweep, named: run_stack
    raises and the member's run is closed FAILED with it."""
    from pipeline.training import stacked

    first = cfg_of(tracking__enabled=True)
    queue = [[(cfg_of(task__batch_size=8, tracking__enabled=True), {"member": "1"}, [])]]
    with pytest.raises(ValueError, match="refill returned a config of another task or device"):
        stacked.run_stack(
            [first],
            extra_tags=[{"member": "0"}],
            refill=lambda n: queue.pop(0) if queue else None,  # asked once, then no more trials
            capacity=2,
        )
    assert _statuses(store) == {
        "0": (
            "FAILED",
            "ValueError: run_stack: refill returned a config of another task or device (stack_key)",
        )
    }


def test_ctrl_c_while_a_member_starts_closes_its_run_killed(store, monkeypatch):
    """Ctrl-C after a member's run is created but before it joins the stack: that run is closed KILLED
    (not FAILED, and no error tag), as an interrupted run alone is."""
    from pipeline.training import stacked

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(stacked, "_member", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stacked.run_stack([cfg_of(tracking__enabled=True)], extra_tags=[{"member": "0"}])
    assert _statuses(store) == {"0": ("KILLED", None)}
