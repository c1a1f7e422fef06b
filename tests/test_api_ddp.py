"""The public callbacks under DistributedDataParallel: two CPU processes (gloo), launched as Lightning's
``strategy="ddp"`` launches them (the script run again per rank). Each rank writes what it saw; the
test compares the ranks with each other and with the module's own readings (README, "Your own model")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

SCRIPT = r'''
import json, math, sys, warnings
from pathlib import Path
import torch
from torch import nn
import pytorch_lightning as pl
from pytorch_lightning.loggers import MLFlowLogger
from pipeline import BPTTProfileMonitor, GradientNormMonitor

out, mode, uri = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
warnings.filterwarnings("ignore")
CLIP = 0.3


def norm(params):
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None))


class Model(pl.LightningModule):
    """A tanh RNN classifier that reads its own gradient norms before and after Lightning's clipping.
    mode "nan-on-rank-1": at step 2, rank 1's loss is NaN while its gradient stays finite (a term
    with no gradient: 0 * NaN), so only that rank sees a non-finite loss."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 16, batch_first=True)
        self.out = nn.Linear(16, 4)
        self.seen = {"loss": [], "pre": [], "post": []}

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, h = self.rnn(x)
        loss = nn.functional.cross_entropy(self.out(h[-1]), y)
        self.seen["loss"].append(float(loss))
        if mode == "nan-on-rank-1" and self.global_rank == 1 and self.global_step == 2:
            loss = loss + 0 * torch.tensor(math.nan)
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.seen["pre"].append(norm(self.parameters()))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.seen["post"].append(norm(self.parameters()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def main():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(192, 20, 3, generator=g), torch.randint(0, 4, (192,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    torch.manual_seed(0)
    model = Model()
    gm = GradientNormMonitor(log_every_n_steps=1)
    pm = BPTTProfileMonitor("rnn", every_n_steps=2)
    logger = MLFlowLogger(experiment_name="ddp", tracking_uri=uri)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=logger, callbacks=[gm, pm],
        gradient_clip_val=CLIP, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, log_every_n_steps=1,
    )
    trainer.fit(model, loader)
    rank = trainer.global_rank
    record = {
        "step": trainer.global_step,
        "diverged_step": gm.diverged_step,
        "loss": [float(v) for v in gm.column("loss")],
        "pre": [float(v) for v in gm.column("norm_preclip")],
        "post": [float(v) for v in gm.column("norm_postclip")],
        "regime": pm.regime,
        "passes": len(pm.passes),
        "weights": [float(p.double().sum()) for p in model.parameters()],
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "run_id": logger.run_id if rank == 0 else None,
        **{f"own_{k}": v for k, v in model.seen.items()},
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
'''


def run_ddp(tmp_path: Path, mode: str) -> tuple[list[dict], str]:
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MASTER_PORT", None)  # Lightning takes a free port
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path), mode, uri],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    return ranks, uri


def test_ddp_norms_are_the_all_reduced_gradients_and_the_loss_the_ranks_mean(tmp_path):
    """Every rank records the same pre- and post-clip norms, the module's own readings of the
    all-reduced gradient before and after Lightning's clipping, and the loss as the mean of the ranks'
    losses (the loss whose gradient the step applies). The record in MLflow is rank 0's."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    (r0, r1), uri = run_ddp(tmp_path, "clean")
    for r in (r0, r1):
        assert r["step"] == 6 and r["diverged_step"] is None and r["passes"] == 4
        np.testing.assert_allclose(r["pre"], r["own_pre"], rtol=1e-6)
        np.testing.assert_allclose(r["post"], r["own_post"], rtol=1e-6)
    assert r0["pre"] == r1["pre"] and r0["post"] == r1["post"]
    clipped = np.asarray(r0["post"]) < np.asarray(r0["pre"]) * (1 - 1e-6)
    assert 0 < clipped.sum() < len(clipped), "the clip threshold should clip some steps, not all"
    assert r0["own_loss"] != r1["own_loss"]  # each rank its own batches
    np.testing.assert_allclose(r0["loss"], (np.asarray(r0["own_loss"]) + r1["own_loss"]) / 2, rtol=1e-6)
    assert r0["loss"] == r1["loss"]
    assert r0["weights"] == r1["weights"]
    client = MlflowClient(uri)
    history = client.get_metric_history(r0["run_id"], "grad/norm_preclip")
    np.testing.assert_allclose([m.value for m in sorted(history, key=lambda m: m.step)], r0["pre"], rtol=1e-6)
    assert client.get_run(r0["run_id"]).data.tags["regime"] == r0["regime"]


def test_ddp_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Rank 1 alone sees a NaN loss at step 2, its gradient finite. The guard decides on the ranks'
    mean loss, so both ranks drop that update and stop at step 2 with the same finite weights; deciding
    on each rank's own loss, rank 1 stopped alone and rank 0 failed in the next all-reduce."""
    from mlflow.tracking import MlflowClient

    (r0, r1), uri = run_ddp(tmp_path, "nan-on-rank-1")
    for r in (r0, r1):
        assert r["diverged_step"] == 2 and r["regime"] == "diverged" and r["finite"]
    assert r0["step"] == r1["step"] and r0["weights"] == r1["weights"]
    run = MlflowClient(uri).get_run(r0["run_id"])
    assert run.data.metrics["diverged_step"] == 2 and run.data.tags["regime"] == "diverged"
