"""A real run end to end, queried back from the MLflow store; divergence, interruption and failure close the run."""

import math

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient

from pipeline.train import run

DIVERGING = {"model.cell": "relu", "model.init": "identity", "model.init_scale": 1.5, "optim.name": "sgd",
             "optim.lr": 1.0, "task.seq_len": 20, "model.hidden_size": 16}


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
    for key in ("train/loss", "val/loss", "grad/norm_preclip", "grad/norm_postclip", "grad/clip_rate",
                "bptt/log10_ratio", "bptt/decay_rate", "spectral/sigma_max", "spectral/radius",
                "spectral/lyapunov_max", "spectral/pascanu_log10_bound", "task/baseline"):
        assert key in metrics, key
    assert metrics["task/baseline"] == pytest.approx(1 / 6)
    assert metrics["val/loss"] == pytest.approx(r.val_loss)
    # Pascanu's bound holds for the recorded run (vanilla tanh, last-step loss).
    assert metrics["bptt/log10_ratio"] <= metrics["spectral/pascanu_log10_bound"] + 1e-9
    # Post-clip norms never exceed the threshold; the history has every step.
    post = [m.value for m in c.get_metric_history(r.run_id, "grad/norm_postclip")]
    assert post and max(post) <= 0.5 + 1e-6
    arts = {a.path for a in c.list_artifacts(r.run_id)} | {a.path for d in ("diagnostics", "plots")
                                                           for a in c.list_artifacts(r.run_id, d)}
    for a in ("config.yaml", "diagnostics/bptt_profile.parquet", "diagnostics/grad_norms.parquet",
              "plots/bptt_profile.png", "plots/grad_norms.png"):
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
    prof = pd.read_parquet(MlflowClient(store).download_artifacts(r.run_id, "diagnostics/bptt_profile.parquet"))
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


@pytest.mark.parametrize("exc, raised, status", [
    (KeyboardInterrupt(), (KeyboardInterrupt, SystemExit), "KILLED"),  # Lightning turns Ctrl-C into exit(1)
    (RuntimeError("boom"), RuntimeError, "FAILED"),
])
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
    from pipeline.train import default_run_name

    slow, fast = tiny(**{"optim.lr": 0.01}), tiny(**{"optim.lr": 1.0})
    names = [default_run_name(c) for c in (slow, fast, fast)]
    assert len(set(names)) == 3, names
    assert "-lr0.01-" in names[0] and "-lr1-" in names[1]
    assert names[0].startswith("adding-T12-tanh-default-g1-")
