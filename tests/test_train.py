"""A real run end to end, queried back from the MLflow store; divergence, interruption and failure close the run."""

import math

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient

from pipeline.training.run import run

DIVERGING = {
    "model.cell": "relu",
    "model.init": "identity",
    "model.init_scale": 1.5,
    "optim.name": "sgd",
    "optim.lr": 1.0,
    "task.seq_len": 20,
    "model.hidden_size": 16,
}


class Capture(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        self.module = pl_module


def test_run_recorded_in_mlflow(store, tiny):
    cfg = tiny(**{"diagnostics.plots": True, "clip.mode": "norm", "clip.threshold": 0.5})
    r = run(cfg)
    c = MlflowClient(store)
    got = c.get_run(r.run_id)
    assert got.info.status == "FINISHED"
    tags, params, metrics = got.data.tags, got.data.params, got.data.metrics
    assert tags["task"] == "adding" and tags["cell"] == "tanh" and tags["init"] == "default"
    assert tags["regime"] in ("vanishing", "healthy", "exploding") and tags["regime"] == r.regime
    assert tags["git_commit"] and "version.torch" in tags and "diverged_step" not in tags
    assert params["optim.lr"] == "0.01" and params["task.seq_len"] == "12" and params["clip.mode"] == "norm"
    for key in (
        "train/loss",
        "val/loss",
        "grad/norm_preclip",
        "grad/norm_postclip",
        "grad/clip_rate",
        "bptt/log10_ratio",
        "bptt/decay_rate",
        "spectral/sigma_max",
        "spectral/radius",
        "spectral/lyapunov_max",
        "spectral/pascanu_log10_bound",
        "task/baseline",
    ):
        assert key in metrics, key
    assert metrics["task/baseline"] == pytest.approx(1 / 6)
    assert "val/accuracy" not in metrics  # adding is a regression: no accuracy
    assert metrics["val/loss"] == pytest.approx(r.val_loss)
    # Pascanu's bound holds for the recorded run (vanilla tanh, last-step loss).
    assert metrics["bptt/log10_ratio"] <= metrics["spectral/pascanu_log10_bound"] + 1e-9
    # Post-clip norms never exceed the threshold; the history has every step.
    post = [m.value for m in c.get_metric_history(r.run_id, "grad/norm_postclip")]
    assert post and max(post) <= 0.5 + 1e-6
    arts = {a.path for a in c.list_artifacts(r.run_id)} | {
        a.path for d in ("diagnostics", "plots") for a in c.list_artifacts(r.run_id, d)
    }
    for a in (
        "config.yaml",
        "diagnostics/bptt_profile.parquet",
        "diagnostics/grad_norms.parquet",
        "plots/bptt_profile.png",
        "plots/grad_norms.png",
    ):
        assert a in arts, a
    local = c.download_artifacts(r.run_id, "diagnostics/bptt_profile.parquet")
    prof = pd.read_parquet(local)
    assert list(prof.columns) == ["step", "t", "state", "log10_norm"]
    assert sorted(prof["step"].unique()) == [0, 10, 20] and set(prof["state"]) == {"h"}
    assert prof.groupby("step")["t"].apply(lambda t: sorted(t) == list(range(1, 13))).all()
    last = prof[prof.step == 20].set_index("t")["log10_norm"]
    assert last[1] - last[12] == pytest.approx(metrics["bptt/log10_ratio"], abs=1e-9)
    grads = pd.read_parquet(c.download_artifacts(r.run_id, "diagnostics/grad_norms.parquet"))
    assert len(grads) == 20 and (grads["norm_postclip"] <= 0.5 + 1e-6).all()
    assert grads["clipped"].mean() == pytest.approx(metrics["grad/clip_rate"])


def test_lstm_profile_has_cell_state(store, tiny):
    r = run(tiny(**{"model.cell": "lstm"}))
    prof = pd.read_parquet(
        MlflowClient(store).download_artifacts(r.run_id, "diagnostics/bptt_profile.parquet")
    )
    assert set(prof["state"]) == {"h", "c"}
    assert "bptt/c_log10_ratio" in r.metrics and "spectral/sigma_max_f" in r.metrics


def test_divergence_stops_before_weights_are_damaged(store, tiny):
    cap = Capture()
    r = run(tiny(**DIVERGING), callbacks=[cap])
    assert r.regime == "diverged" and r.diverged_step is not None and r.status == "FINISHED"
    assert r.steps <= r.diverged_step + 1 < 20  # stopped right there, did not train on with NaN
    assert all(torch.isfinite(p).all() for p in cap.module.parameters())
    got = MlflowClient(store).get_run(r.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags["regime"] == "diverged" and got.data.tags["diverged_step"] == str(r.diverged_step)
    # Everything logged before the divergence is kept, and nothing non-finite was sent.
    assert all(math.isfinite(v) for v in got.data.metrics.values())
    assert "bptt/log10_ratio" in got.data.metrics


class Interrupt(pl.Callback):
    def __init__(self, exc):
        self.exc = exc

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 5:
            raise self.exc


@pytest.mark.parametrize(
    ("exc", "raised", "status"),
    [
        # Lightning turns Ctrl-C into sys.exit(1), "a check failed" to the command line: it must come out
        # as the KeyboardInterrupt it was (signals.ctrl_c_not_exit_1), so the command exits 130
        (KeyboardInterrupt(), KeyboardInterrupt, "KILLED"),
        (RuntimeError("boom"), RuntimeError, "FAILED"),
    ],
)
def test_interrupted_or_failed_run_is_closed(store, tiny, exc, raised, status):
    with pytest.raises(raised):
        run(tiny(), callbacks=[Interrupt(exc)])
    runs = MlflowClient(store).search_runs([MlflowClient(store).get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == status
    assert runs[0].data.tags["status"] == status.lower()
    assert "train/loss" in runs[0].data.metrics  # what was logged before the interruption is kept


def test_tracking_disabled_writes_nothing(tmp_path, monkeypatch, tiny):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    r = run(tiny(**{"tracking.enabled": False}))
    assert r.run_id is None and r.regime in ("vanishing", "healthy", "exploding")
    assert not any(tmp_path.iterdir())


def test_default_run_names_are_distinct_within_one_second(tiny):
    """Two runs that differ only in learning rate, started in the same second, must not share a name: a reviewer
    tells runs apart by name in the MLflow UI (a name collision once made the UI test filter look wrong)."""
    from pipeline.training.run import default_run_name

    slow, fast = tiny(**{"optim.lr": 0.01}), tiny(**{"optim.lr": 1.0})
    names = [default_run_name(c) for c in (slow, fast, fast)]
    assert len(set(names)) == 3, names
    assert "-lr0.01-" in names[0] and "-lr1-" in names[1]
    assert names[0].startswith("adding-T12-tanh-default-g1-")
    # README "Configuration reference": <task>-T<T>-<cell>-<init>-g<g>-lr<lr>-s<seed>-<HHMMSS>-<4 hex>
    import re

    named = default_run_name(tiny(**{"seed": 7, "model.init": "orthogonal", "model.init_scale": 0.9}))
    assert re.fullmatch(r"adding-T12-tanh-orthogonal-g0\.9-lr0\.01-s7-\d{6}-[0-9a-f]{4}", named), named


# ------------------------------------------------------------------------ verdicts that are right


@pytest.mark.parametrize(
    ("cell", "extra", "want", "ratio_range"),
    [
        # copy, T = 100, H = 64, PyTorch default init: the recall window's gradient, carried from its first
        # step (t = 111) back to t = 1. Measured: tanh -28.3, orthogonal g = 1: -1.5 decades (README).
        ("tanh", {}, "vanishing", (-35, -20)),
        ("orthogonal", {"model.init_scale": 1.0}, "healthy", (-3, 1)),
    ],
)
def test_copy_verdict_reads_the_memory_window(store, tiny, cell, extra, want, ratio_range):
    """The total dL/dh_t of copy is dominated by each step's own loss term (it read 0.16 decades and
    `healthy` for tanh): the verdict must read the recall window's gradient instead."""
    cfg = tiny(
        **{
            "task.name": "copy",
            "task.seq_len": 100,
            "model.cell": cell,
            "model.hidden_size": 64,
            "optim.lr": 1e-6,
            "trainer.max_steps": 1,
            "trainer.val_every": 1,
            "diagnostics.probe_size": 32,
            **extra,
        }
    )
    r = run(cfg)
    assert r.tags["regime_init"] == want and r.regime == want
    lo, hi = ratio_range
    assert lo < r.metrics["bptt/log10_ratio"] < hi
    assert r.metrics["bptt/log10_ratio_per_step"] == pytest.approx(r.metrics["bptt/log10_ratio"] / 110)
    assert r.metrics["bptt/log10_ratio"] <= r.metrics["spectral/pascanu_log10_bound"] + 1e-9
    prof = pd.read_parquet(
        MlflowClient(store).download_artifacts(r.run_id, "diagnostics/bptt_profile.parquet")
    )
    assert set(prof["state"]) == {"h", "h_total"}
    last = prof[(prof.step == prof.step.max()) & (prof.state == "h")].set_index("t")["log10_norm"]
    assert last[1] - last[111] == pytest.approx(r.metrics["bptt/log10_ratio"], abs=1e-9)
    total = prof[(prof.step == prof.step.max()) & (prof.state == "h_total")].set_index("t")["log10_norm"]
    assert abs(total[1] - total[120]) < 2  # the total profile hides the loss of memory


def test_forward_overflow_is_exploding_and_recorded(store, tiny):
    """relu, identity init g = 1.5, T = 2000: the float64 twin's state passes 1e308 near t = 1750 (it
    read all-NaN, Lyapunov -inf, regime_init `vanishing`). float32 training overflows at once, so the
    run itself diverges; its step-0 verdict must be exploding, with the step of the overflow."""
    cfg = tiny(
        **{
            "task.seq_len": 2000,
            "model.cell": "relu",
            "model.init": "identity",
            "model.init_scale": 1.5,
            "model.hidden_size": 8,
            "trainer.max_steps": 2,
            "trainer.val_every": 2,
            "diagnostics.probe_size": 4,
            "task.batch_size": 4,
            "task.val_size": 4,
        }
    )
    r = run(cfg)
    assert r.tags["regime_init"] == "exploding"
    assert r.regime in ("exploding", "diverged")
    got = MlflowClient(store).get_run(r.run_id)
    m, tags = got.data.metrics, got.data.tags
    assert 1700 < m["bptt/overflow_step"] < 1800
    assert m["spectral/lyapunov_max"] == pytest.approx(math.log(1.5), abs=0.05)  # growth before the overflow
    # The NaN summaries are visible in the store: a tag each, never an earlier finite value.
    assert tags["nonfinite.bptt/log10_ratio"] == "nan" and "bptt/log10_ratio" not in m


def test_nonfinite_metrics_are_recorded_visibly(store):
    """+-inf is stored as +-float max; NaN as the tag nonfinite.<metric>=nan while it is the latest
    value (MLflow's latest value would otherwise be an earlier pass's finite number)."""
    import sys

    from pipeline.tracking import Recorder

    rec = Recorder.start(store, "test", "nonfinite")
    rec.log_metrics({"a": 1.0, "b": 2.0, "c": 3.0}, 0)
    rec.log_metrics({"a": float("nan"), "b": float("-inf"), "c": float("inf")}, 5)
    rec.flush()
    c = MlflowClient(store)
    got = c.get_run(rec.run_id).data
    assert got.tags["nonfinite.a"] == "nan"
    assert got.metrics["b"] == -sys.float_info.max and got.metrics["c"] == sys.float_info.max
    assert [(x.step, x.value) for x in c.get_metric_history(rec.run_id, "b")] == [
        (0, 2.0),
        (5, -sys.float_info.max),
    ]
    rec.log_metrics({"a": 4.0}, 10)  # a finite value again: the tag goes
    rec.close()
    got = c.get_run(rec.run_id).data
    assert "nonfinite.a" not in got.tags and got.metrics["a"] == 4.0


def test_digits_run_records_the_accuracy_of_the_held_out_split(store, tiny):
    """A real run on digits: val/accuracy and val/loss in the store equal an independent evaluation of
    the saved model (pipeline.load_run) on the documented held-out split, computed from scikit-learn here."""
    from conftest import digits_held_out

    from pipeline import load_run

    cfg = tiny(
        **{
            "task.name": "digits",
            "task.seq_len": 64,
            "task.val_size": 300,  # two validation chunks (256 + 44): the counts add up across chunks
            "model.cell": "gru",
            "model.hidden_size": 16,
            "trainer.max_steps": 30,
            "trainer.val_every": 15,
            "diagnostics.profile_every": 0,
        }
    )
    r = run(cfg)
    c = MlflowClient(store)
    got = c.get_run(r.run_id).data
    assert got.tags["task"] == "digits" and got.params["task.permute"] == "False"
    assert got.metrics["task/baseline"] == pytest.approx(math.log(10))
    assert {m.step for m in c.get_metric_history(r.run_id, "val/accuracy")} == {15, 30}  # each validation
    x, y, _ = digits_held_out(300)
    model = load_run(r.run_id).model
    with torch.no_grad():
        logits = model(torch.tensor(x, dtype=torch.float32).unsqueeze(-1))
    right = sum(int(p == t) for p, t in zip(logits.argmax(-1).tolist(), y.tolist(), strict=True))
    assert got.metrics["val/accuracy"] == right / 300 == r.metrics["val/accuracy"]
    want_loss = torch.nn.functional.cross_entropy(logits, torch.tensor(y)).item()
    assert got.metrics["val/loss"] == pytest.approx(want_loss, rel=1e-5)
    assert right / 300 > 0.1  # 30 steps of a GRU already beat chance (measured 0.3-0.4)


def test_a_diverged_classifier_has_no_accuracy_not_chance(store, tiny):
    """Logits that overflowed to NaN predict nothing: argmax read every image as class 0, so a diverged
    digits run recorded val/accuracy 0.100, chance, in the store and its summary (a real-data walkthrough).
    It is NaN now, recorded as MLflow records a NaN (tag ``nonfinite.val/accuracy``), as val/loss is; a
    run whose logits are finite keeps its count (the test above)."""
    from pipeline import as_recorded

    cfg = tiny(
        **{
            "task.name": "digits",
            "task.seq_len": 64,
            "task.val_size": 100,
            "model.cell": "relu",
            "model.hidden_size": 64,  # with 8 units the logits stayed finite (4e18): a count, if a poor one
            "model.init": "gaussian",
            "model.init_scale": 3.0,
            "optim.name": "sgd",
            "optim.lr": 100.0,
            "trainer.max_steps": 4,
            "trainer.val_every": 2,
            "diagnostics.profile_every": 0,
        }
    )
    r = run(cfg)
    assert r.tags["regime"] == "diverged", r.metrics
    assert math.isnan(r.metrics["val/accuracy"]) and math.isnan(r.metrics["val/loss"]), r.metrics
    got = MlflowClient(store).get_run(r.run_id).data
    assert got.tags["nonfinite.val/accuracy"] == "nan" == got.tags["nonfinite.val/loss"]
    import mlflow

    frame = as_recorded(mlflow.search_runs(experiment_names=["test"]))
    assert math.isnan(frame["metrics.val/accuracy"].iloc[0])


def test_a_run_name_past_mlflows_250_characters_is_cut_with_a_note(store, capsys):
    """MLflow's database stores keep 250 characters of a run name (runs.name is VARCHAR(250)): a
    PostgreSQL-backed server refused a longer one with a traceback. Every store now gets the first 250,
    and train says so (tests/test_sweep_postgres.py runs the same through such a server)."""
    from pipeline.cli import main

    name = "r" * 240 + "0123456789-cut-here"
    args = [
        "trainer.max_steps=2",
        "trainer.val_every=2",
        "diagnostics.plots=false",
        f"tracking.run_name={name}",
    ]
    assert main(["train", "--config", "smoke", *args]) == 0
    err = capsys.readouterr().err
    assert f"note: tracking.run_name has {len(name)} characters; the run is named by its first 250" in err
    c = MlflowClient(store)
    (r,) = c.search_runs([c.get_experiment_by_name("smoke").experiment_id])
    assert r.info.run_name == name[:250] and r.info.status == "FINISHED"
    assert main(["train", "--config", "smoke", *args[:3], "tracking.run_name=" + "s" * 250]) == 0
    assert "tracking.run_name has" not in capsys.readouterr().err  # 250 is kept whole, without a note


def _summarize(tiny, first, last, norms=(1.0,), val_loss=0.1, pruned=False):
    """:func:`summarize_run` (pure) on monitors that say what the test wants: ``first``/``last`` the
    step-0 and the last profile pass, ``norms`` the pre-clip gradient norms of the steps."""
    from types import SimpleNamespace as NS

    import numpy as np

    from pipeline.training.record import Monitors, summarize_run
    from pipeline.training.tasks import task_of

    cfg = tiny()
    task = task_of(cfg.task)
    grads = NS(
        max_norm_preclip=max(norms),
        clip_rate=0.0,
        history=[()] * len(norms),
        column=lambda name: np.array(norms) if name == "norm_preclip" else None,
    )
    mon = Monitors(grads, NS(first=first, last=last), NS(best=val_loss))
    module = NS(diverged_step=None, val_loss=val_loss, val_accuracy=None, pruned=pruned, remedies=None)
    return task, summarize_run(cfg, task, module, mon, 20)


def test_regime_init_is_the_verdict_of_the_step_0_pass_and_the_first_norm(tiny):
    """README "Regime verdict": ``regime_init`` reads the step-0 profile and the first step's gradient,
    ``regime`` the last pass and the largest gradient; tags are lower-case words (README, "The MLflow
    record": ``pruned`` is ``true`` when a sweep stopped the run early); the pass's ``step`` is no metric
    (mutation review)."""
    decaying = {"step": 0, "bptt/log10_ratio": -5.5, "bptt/log10_ratio_per_step": -0.5}  # < -0.03: vanishing
    flat = {"step": 20, "bptt/log10_ratio": -0.11, "bptt/log10_ratio_per_step": -0.01}  # healthy
    task, s = _summarize(tiny, decaying, flat)
    assert (s.tags["regime_init"], s.tags["regime"]) == ("vanishing", "healthy")
    assert (s.tags["pruned"], s.tags["solved"]) == ("false", "false")
    assert s.metrics["bptt/log10_ratio"] == -0.11 and "step" not in s.metrics
    assert s.val_loss_ratio == pytest.approx(0.1 / task.baseline) == s.metrics["val/loss_ratio"]
    # a healthy start whose gradient norm passed explode_norm (1000) only later
    _, s = _summarize(tiny, {**flat, "step": 0}, flat, norms=(1.0, 5000.0), pruned=True)
    assert (s.tags["regime_init"], s.tags["regime"]) == ("healthy", "exploding")
    assert s.tags["pruned"] == "true" and s.pruned is True


@pytest.mark.parametrize(("mode", "line"), [("norm", True), ("value", False), ("none", False)])
def test_the_grad_norm_plot_draws_the_clip_threshold_only_for_norm_clipping(
    store, tiny, monkeypatch, mode, line
):
    """``plots/grad_norms.png`` draws ``clip.threshold`` on the global-norm axis only where it is a norm
    (``clip.mode: norm``): a value clamp's threshold is per element, and an unclipped run has none
    (mutation review)."""
    from pipeline.tracking import Recorder

    legends = {}
    real = Recorder.log_figure

    def log_figure(self, fig, artifact_file):
        legends[artifact_file] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        return real(self, fig, artifact_file)

    monkeypatch.setattr(Recorder, "log_figure", log_figure)
    run(tiny(**{"diagnostics.plots": True, "clip.mode": mode, "clip.threshold": 0.5, "trainer.max_steps": 5}))
    assert ("clip threshold 0.5" in legends["plots/grad_norms.png"]) is line, legends
