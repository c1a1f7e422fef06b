"""Imported once by the sweep's forkserver (:mod:`pipeline.sweep.procs`): everything a worker needs, so
that forked workers start training at once. No store is opened and no CUDA context is created here.

MLflow's SQL store module (the default sqlite store and PostgreSQL) is imported by ``mlflow`` only when a
client first opens such a store; without it here each worker imported it at its first trial (about 0.5 s
on an idle core: ``python -X importtime -c "import mlflow; import mlflow.store.tracking.sqlalchemy_store"``)."""

import os
import signal

# In the forkserver only (its parent is the sweep that started it), and before the imports below, which
# take seconds: ignore SIGTERM. A SIGTERM to the sweep's process group (``timeout``, a service manager, a
# batch scheduler) reached the forkserver, which lives in that group, and killed it; the parent then read
# exit status 255 for every worker while they still ran and left before they had closed their trials
# (runs left RUNNING). The forkserver still ends with the parent (multiprocessing closes its pipe);
# workers take SIGTERM back at once (pipeline.sweep.procs._entry).
# Also blocked: a forked worker inherits the mask, and a SIGTERM its parent forwards before the worker has
# taken SIGTERM back stays pending (Linux never discards a blocked signal, ignored or not) instead of being
# lost; a Ctrl-C at start-up, forwarded to a worker just forked, was, and that worker trained the whole
# budget (a chaos review). The worker unblocks it once it has SIGTERM back.
if os.environ.get("PIPELINE_FORKSERVER_OF") == str(os.getppid()):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

import mlflow
import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
import optuna  # noqa: F401
import pytorch_lightning  # noqa: F401
import torch  # noqa: F401

from pipeline.training import run as train  # noqa: F401
