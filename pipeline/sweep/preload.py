"""Imported once by the sweep's forkserver (:mod:`pipeline.sweep.procs`): everything a worker needs, so
that forked workers start training at once. No store is opened and no CUDA context is created here."""

import mlflow  # noqa: F401
import optuna  # noqa: F401
import pytorch_lightning  # noqa: F401
import torch  # noqa: F401

from pipeline.training import run as train  # noqa: F401
