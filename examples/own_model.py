"""Your own LightningModule with the pipeline's gradient diagnostics (README, "Your own model").

A two-layer LSTM that sums a noisy sequence, trained with Lightning's own gradient clipping; the two
callbacks log through a CSVLogger (and an MLFlowLogger with ``--mlflow``), then ``profile_rnn`` gives the
final per-step profile as a data frame. Run: ``python examples/own_model.py [--mlflow] [--steps N]``.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import pytorch_lightning as pl
import torch
from torch import nn

from pipeline import BPTTProfileMonitor, GradientNormMonitor, profile_rnn

warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)  # Lightning's, not ours
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


class Summer(pl.LightningModule):
    """Predict the sum of the first 5 inputs at the last step: a memory of T - 5 steps."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.lstm = nn.LSTM(1, hidden, num_layers=2)  # time-major, as nn.LSTM's default
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch  # [B, T, 1], [B, 1]
        out, _ = self.encoder.lstm(x.transpose(0, 1))
        loss = nn.functional.mse_loss(self.head(out[-1]), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def data(n: int, T: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, 1, generator=g)
    return torch.utils.data.TensorDataset(x, x[:, :5].sum(dim=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--mlflow", action="store_true", help="also log to an MLflow sqlite store in a temp dir")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = tempfile.mkdtemp(prefix="own_model_")
    loggers: list = [pl.loggers.CSVLogger(out, name="csv")]
    if args.mlflow:
        loggers.append(
            pl.loggers.MLFlowLogger(  # artifacts beside the store (MLflow's default: ./mlruns in the cwd)
                experiment_name="own-model",
                tracking_uri=f"sqlite:///{out}/mlflow.db",
                artifact_location=f"{out}/mlartifacts",
            )
        )
    grads = GradientNormMonitor(log_every_n_steps=10)
    prof = BPTTProfileMonitor("encoder.lstm", every_n_steps=20)
    model = Summer()
    loader = torch.utils.data.DataLoader(data(512, args.seq_len, 0), batch_size=32)
    trainer = pl.Trainer(
        max_steps=args.steps,
        gradient_clip_val=0.5,
        callbacks=[grads, prof],
        logger=loggers,
        log_every_n_steps=10,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, loader)
    rate = float((grads.column("clip_coef") < 1).mean())
    print(f"steps {trainer.global_step}; max pre-clip norm {grads.max_norm_preclip:.3g}; clipped {rate:.0%}")
    for p in prof.passes:
        print(
            f"  step {int(p['step']):4d}: bptt/log10_ratio {p['bptt/log10_ratio']:+.2f} (top layer), "
            f"c path {p['bptt/c_log10_ratio']:+.2f}, layer 0 {p['bptt/layer0/log10_ratio']:+.2f}"
        )
    print(f"regime: {prof.regime}; metrics: {out}/csv")
    if args.mlflow:  # the run, its profile artifact and the regime tag: `python -m pipeline ui --store ...`
        print(f"mlflow: sqlite:///{out}/mlflow.db (experiment own-model)")
    frame = profile_rnn(model, "encoder.lstm", next(iter(loader)))
    print(frame.groupby(["layer", "state"])["log10_norm"].agg(["first", "last"]).round(2))


if __name__ == "__main__":
    main()
