"""The public callbacks under setups researchers add to their own LightningModule (README, "Your own
model"): torch.compile in its three usual places, gradient checkpointing around the RNN, and two
monitors on two RNNs of one module. Each profile is checked against full-graph float64 autograd."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tests.test_api import GRUClassifier, H, autograd_profile, cls_data, first_batch, loader, trainer

pl = pytest.importorskip("pytorch_lightning")

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


def compile_(fn):
    """torch.compile with the eager backend: the same dynamo wrappers (``OptimizedModule``, a compiled
    bound method) as inductor's, without a C++ build per graph in the tests. ``PIPELINE_COMPILE_BACKEND=
    inductor`` runs them with torch's default backend (README, "torch.compile")."""
    return torch.compile(fn, backend=os.environ.get("PIPELINE_COMPILE_BACKEND", "eager"))


class ForwardCompiled(GRUClassifier):
    def __init__(self):
        super().__init__()
        self.forward = compile_(self.forward)

    def forward(self, x):
        return self.gru(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, h_n = self(x)
        return nn.functional.cross_entropy(self.out(h_n[-1]), y)


class RNNCompiledInInit(GRUClassifier):
    def __init__(self):
        super().__init__()
        self.gru = compile_(self.gru)


class RNNCompiledInConfigureModel(GRUClassifier):
    """Where Lightning's docs compile: ``configure_model`` runs after the callbacks' ``setup``."""

    def configure_model(self):
        if not hasattr(self.gru, "_orig_mod"):
            self.gru = compile_(self.gru)


@pytest.mark.parametrize(
    ("make", "fit_compiled", "path"),
    [
        (GRUClassifier, True, "gru"),
        (ForwardCompiled, False, "gru"),
        (RNNCompiledInInit, False, "gru"),
        (RNNCompiledInInit, False, "gru._orig_mod"),
        (RNNCompiledInConfigureModel, False, "gru"),
    ],
    ids=[
        "fit-torch-compile-model",
        "forward-compiled",
        "rnn-compiled",
        "rnn-compiled-orig-mod",
        "configure_model",
    ],
)
def test_a_compiled_module_is_profiled_on_an_eager_float64_copy(tmp_path, make, fit_compiled, path):
    """Lightning's ``fit(torch.compile(model))`` compiles ``training_step`` and ``forward`` onto the
    instance, bound to the float32 module, which the copy ran instead of itself (a false dtype message);
    a compiled RNN was refused as an ``OptimizedModule``. The copy now runs eagerly: every pass works,
    and the last is full-graph float64 autograd's on the trained weights."""
    from pipeline import BPTTProfileMonitor, GradientNormMonitor

    torch.manual_seed(0)
    batch = first_batch(cls_data(seed=3))
    model = make()
    pm = BPTTProfileMonitor(path, every_n_steps=4, batch=batch)
    gm = GradientNormMonitor(log_every_n_steps=4)
    tr = trainer(tmp_path, [gm, pm], max_steps=8, gradient_clip_val=0.05)
    tr.fit(compile_(model) if fit_compiled else model, loader(cls_data()))
    assert [p["step"] for p in pm.passes] == [0, 4, 8]
    assert (gm.column("clip_coef") < 1).all()  # the clipped steps of the compiled module are seen
    got = pm.profile_frame().query("step == 8 and state == 'h'").sort_values("t")["log10_norm"].to_numpy()
    np.testing.assert_allclose(got, autograd_profile(model, "gru", batch)[(0, "h")], atol=1e-9, rtol=0)


class Checkpointed(pl.LightningModule):
    """A two-layer LSTM called through torch.utils.checkpoint (``reentrant``: None calls it directly),
    the loss read at the last five steps."""

    def __init__(self, reentrant: bool | None):
        super().__init__()
        self.reentrant = reentrant
        self.lstm = nn.LSTM(3, H, num_layers=2, batch_first=True)
        self.out = nn.Linear(H, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.reentrant is None:
            out, _ = self.lstm(x)
        else:
            out, _ = checkpoint(self.lstm, x, use_reentrant=self.reentrant)
        return nn.functional.cross_entropy(self.out(out[:, -5:]).reshape(-1, 4), y.repeat_interleave(5))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_gradient_checkpointing_is_profiled_or_refused_never_read_as_zero():
    """Non-reentrant checkpointing keeps the graph: the profile is the plain module's. Reentrant
    checkpointing keeps none on the copy (its parameters do not require grad), which read as a gradient
    of 0 at every step (-inf, a "vanishing" verdict); it is one line naming the remedy."""
    from pipeline import profile_rnn

    torch.manual_seed(0)
    plain, batch = Checkpointed(None), first_batch(cls_data())
    want = profile_rnn(plain, "lstm", batch)
    assert np.isfinite(want["log10_norm"]).all()
    kept = Checkpointed(False)
    kept.load_state_dict(plain.state_dict())
    got = profile_rnn(kept, "lstm", batch)
    np.testing.assert_allclose(got["log10_norm"], want["log10_norm"], atol=1e-9, rtol=0)
    cut = Checkpointed(True)
    cut.load_state_dict(plain.state_dict())
    with pytest.raises(
        ValueError, match=r"^the loss of training_step does not depend on the outputs of 'lstm'"
    ):
        profile_rnn(cut, "lstm", batch)
    with pytest.raises(ValueError, match="use_reentrant=False"):
        profile_rnn(cut, "lstm", batch)


class TwoRNNs(pl.LightningModule):
    """A GRU and a tanh RNN (small recurrent weights) read side by side: two profiles that differ."""

    def __init__(self):
        super().__init__()
        self.fast = nn.GRU(3, H, batch_first=True)
        self.slow = nn.RNN(3, 8, batch_first=True)
        with torch.no_grad():
            self.slow.weight_hh_l0.mul_(0.1)
        self.out = nn.Linear(H + 8, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, h1 = self.fast(x)
        _, h2 = self.slow(x)
        return nn.functional.cross_entropy(self.out(torch.cat([h1[-1], h2[-1]], -1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_two_monitors_on_two_rnns_keep_their_own_records_by_name(tmp_path):
    """Unnamed, both logged under the same names: MLflow interleaved their values, and the last to
    finish replaced the other's artifacts and regime tag. Now that is refused at setup, and named
    monitors log under ``bptt/<name>/``, ``bptt_profile_<name>.*`` and ``regime.<name>``."""
    import pandas as pd
    from mlflow.tracking import MlflowClient
    from pytorch_lightning.loggers import MLFlowLogger

    from pipeline import BPTTProfileMonitor

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    unnamed = [BPTTProfileMonitor("fast", every_n_steps=4), BPTTProfileMonitor("slow", every_n_steps=4)]
    logger = MLFlowLogger(experiment_name="two", tracking_uri=uri, artifact_location=str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"\('fast' and 'slow'\) with no name .*give each its own name="):
        trainer(tmp_path, unnamed, logger=logger, max_steps=8).fit(TwoRNNs(), loader(cls_data()))
    assert not MlflowClient(uri).get_run(logger.run_id).data.metrics  # refused before the first pass

    torch.manual_seed(0)
    fast = BPTTProfileMonitor("fast", every_n_steps=4, name="fast")
    slow = BPTTProfileMonitor("slow", every_n_steps=4, name="slow")
    logger = MLFlowLogger(experiment_name="two", tracking_uri=uri, artifact_location=str(tmp_path / "b"))
    trainer(tmp_path, [fast, slow], logger=logger, max_steps=8).fit(TwoRNNs(), loader(cls_data()))
    client = MlflowClient(uri)
    run = client.get_run(logger.run_id)
    assert not any(k.startswith("bptt/log10") for k in run.data.metrics)
    for pm, name in ((fast, "fast"), (slow, "slow")):
        for metric in ("bptt/log10_ratio", "bptt/layer0/decay_rate", "spectral/sigma_max", "bptt/loss"):
            stage, rest = metric.split("/", 1)
            history = client.get_metric_history(run.info.run_id, f"{stage}/{name}/{rest}")
            got = [m.value for m in sorted(history, key=lambda m: m.step)]
            np.testing.assert_allclose(got, [p[metric] for p in pm.passes], rtol=1e-12)
        assert run.data.tags[f"regime.{name}"] == pm.regime
        local = client.download_artifacts(
            run.info.run_id, f"diagnostics/bptt_profile_{name}.parquet", str(tmp_path)
        )
        pd.testing.assert_frame_equal(pd.read_parquet(local), pm.profile_frame(), check_dtype=False)
    assert fast.passes[0]["bptt/log10_ratio"] != slow.passes[0]["bptt/log10_ratio"]
    arts = {a.path for d in ("diagnostics", "plots") for a in client.list_artifacts(run.info.run_id, d)}
    assert arts == {
        f"{d}/bptt_profile_{n}.{e}"
        for n in ("fast", "slow")
        for d, e in (("diagnostics", "parquet"), ("plots", "png"))
    }


@pytest.mark.parametrize("name", ["", "a b", "layer0", "x/y", 3])
def test_a_bad_monitor_name_is_one_line(name):
    from pipeline import BPTTProfileMonitor

    with pytest.raises(ValueError, match=r"^name must be letters, digits"):
        BPTTProfileMonitor("rnn", name=name)
