"""The hand-written sweep of :mod:`benchmarks.sweep_bench`: what a user writes without this package.

One process, Optuna's SQLite storage, a fresh ``pl.Trainer`` and ``MLFlowLogger`` per trial, default
torch threads, no pruning. Run as ``python -m benchmarks.hand_written_sweep SPEC_JSON`` in an empty
working directory; prints ``RESULT {"trials": N, "best": value}``.
"""

from __future__ import annotations

import json
import math
import sys

import optuna
import pytorch_lightning as pl
from pytorch_lightning.loggers import MLFlowLogger

from pipeline.config import load_config
from pipeline.training.data import TaskDataModule
from pipeline.training.module import RNNTrainingModule
from pipeline.training.tasks import make_task


def objective(trial, spec: dict) -> float:
    values = {}
    for key, p in spec["space"].items():
        if "choices" in p:
            values[key] = trial.suggest_categorical(key, p["choices"])
        else:
            values[key] = trial.suggest_float(key, float(p["low"]), float(p["high"]), log=p.get("log", False))
    cfg = load_config(None, [f"{k}={v}" for k, v in values.items()], patch=spec["base"])
    task = make_task(cfg.task.name, cfg.task.seq_len)
    module = RNNTrainingModule(cfg, task)
    data = TaskDataModule(task, cfg.task.batch_size, cfg.task.val_size, cfg.trainer.max_steps, cfg.seed)
    logger = MLFlowLogger(
        experiment_name="hand-written", tracking_uri="sqlite:///mlflow.db", run_name=f"trial-{trial.number}"
    )
    logger.log_hyperparams(values)
    trainer = pl.Trainer(
        max_steps=cfg.trainer.max_steps,
        max_epochs=-1,
        logger=logger,
        val_check_interval=cfg.trainer.val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    ratio = module.val_loss / task.baseline if module.val_loss is not None else float("nan")
    logger.log_metrics({"val_loss_ratio": ratio})
    logger.finalize("success")
    return ratio  # NaN: Optuna marks the trial FAIL and TPE ignores it


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="hand",
        storage="sqlite:///optuna.db",
        sampler=optuna.samplers.TPESampler(seed=spec["seed"], n_startup_trials=spec["n_startup"]),
    )
    study.optimize(lambda trial: objective(trial, spec), n_trials=spec["n_trials"], catch=(Exception,))
    done = [t for t in study.trials if t.value is not None and math.isfinite(t.value)]
    print(
        "RESULT "
        + json.dumps({"trials": len(study.trials), "best": min(t.value for t in done) if done else None})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
