"""Saved models and resumable runs: weights + config in the run's artifacts, the loader, checkpoints.

A trained model is the artifact ``model/weights.pt``: the :class:`~pipeline.training.models.RNNModel`
``state_dict`` written with ``torch.save``, beside the run's ``config.yaml``. :func:`load_run` rebuilds the
model from that config and loads the tensors with ``torch.load(weights_only=True)``: no pickled class is
stored, so a store outlives refactors of this package (``tests/test_layout_stores.py``), nothing
executes code on load, and logging costs one small file (no pip-requirements inference, as an
``mlflow.pytorch`` model would do on every run).

``python -m pipeline train`` also writes a Lightning checkpoint at every validation while fitting
(weights, optimizer state, step counters, the largest pre-clip norm and best validation loss so far),
logged as ``checkpoints/last.ckpt``; ``--resume RUN_ID`` reopens that run and continues from it
(README, "Saved models and resuming").
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from pipeline.config import Config, load_config
from pipeline.schema import ConfigError
from pipeline.training.models import RNNModel
from pipeline.training.module import RNNTrainingModule
from pipeline.training.tasks import Task, task_of

WEIGHTS = "model/weights.pt"  # RNNModel state_dict (torch.save), loaded with weights_only=True
CHECKPOINT = "checkpoints/last.ckpt"  # Lightning checkpoint of the last validation while fitting
CONFIG = "config.yaml"  # the resolved config, logged by every run (pipeline/training/run.py)
RESUMED_AT_STEP = "resumed_at_step"  # tag: the checkpoint step of the latest --resume


def log_weights(rec, model: torch.nn.Module) -> None:
    """Log ``model``'s ``state_dict`` (tensors on the CPU) as :data:`WEIGHTS` on ``rec``'s run."""
    if not getattr(rec, "run_id", None):
        return  # tracking off (NullRecorder)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / Path(WEIGHTS).name
        torch.save(state, p)
        rec.log_file(p, str(Path(WEIGHTS).parent))


class RunCheckpoint(pl.Callback):
    """At the end of every validation while fitting: a Lightning checkpoint logged as :data:`CHECKPOINT`.

    Its own state (saved in the checkpoint under this class's name, restored by ``trainer.fit(...,
    ckpt_path=...)``): the best validation loss, which a resumed run must not forget. The gradient
    monitor keeps its own running statistics (``GradientNormMonitor.state_dict``: the clip rate's counts,
    the largest pre-clip norm). ``mon`` is the run's :class:`pipeline.training.record.Monitors`.
    """

    def __init__(self, rec, mon):
        self.rec, self.mon = rec, mon

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not getattr(self.rec, "run_id", None):
            return
        # The metrics up to this step go to the store first: a resume starts from the checkpoint's step, so
        # metrics still in the recorder's buffer when a kill -9 came after the upload were a gap for good.
        self.rec.flush()
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(CHECKPOINT).name
            trainer.save_checkpoint(p)
            self.rec.log_file(p, str(Path(CHECKPOINT).parent))

    def state_dict(self) -> dict[str, Any]:
        return {"val_best": self.mon.val.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.mon.val.best = state_dict.get("val_best")
        if self.mon.grads.max_norm_preclip is None:  # a checkpoint written before the monitor kept it
            self.mon.grads.max_norm_preclip = state_dict.get("max_norm_preclip")


def _download(c, run_id: str, path: str, dst: str) -> Path | None:
    """Artifact ``path`` of ``run_id`` downloaded under ``dst``, or None when the run has none."""
    folder = str(Path(path).parent) if "/" in path else None
    listed = {a.path for a in (c.list_artifacts(run_id, folder) if folder else c.list_artifacts(run_id))}
    if path not in listed:
        return None
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # no tqdm bar per small file on the terminal
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        return Path(c.download_artifacts(run_id, path, dst))
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _client(run_id: str, tracking_uri: str | None):
    """A client of the store ``run_id`` is read from, once it is known to be there: a sqlite file that does
    not exist is named in one line, not created, and a corrupt file or an unreachable server is named as
    every verb names it."""
    from pipeline.store_checks import probe_existing_store
    from pipeline.tracking import client

    probe_existing_store(
        tracking_uri, "tracking.uri", f"the store of run {run_id}: tracking.uri=URI names it"
    )
    return client(tracking_uri)


def _get_run(c, run_id: str, tracking_uri: str | None):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_run(run_id)
    except MlflowException:
        from pipeline.uris import display_url, resolve_uri

        raise ConfigError(
            "", f"no run {run_id!r} in the MLflow store {display_url(resolve_uri(tracking_uri))}"
        ) from None


def _why_no_weights(run, cfg: Config) -> str:
    """Why a run saved no model, from its config and tags (a sweep trial's follow ``log_models``)."""
    from pipeline.names import KIND, KIND_TRIAL

    if run.data.tags.get(KIND) == KIND_TRIAL and not cfg.tracking.log_model:
        return (
            "a sweep trial logs its weights as the sweep file's log_models says (best: only a trial that "
            "finishes as the best so far; all: every trial that trains)"
        )
    if not cfg.tracking.log_model:
        return "it ran with tracking.log_model: false"
    return f"it ended {run.info.status} before its weights were logged"


def run_config(run_id: str, tracking_uri: str | None = None) -> Config:
    """The validated config a run recorded (its ``config.yaml``)."""
    c = _client(run_id, tracking_uri)
    _get_run(c, run_id, tracking_uri)
    return _config_of(c, run_id)


def _config_of(c, run_id: str) -> Config:
    with tempfile.TemporaryDirectory() as d:
        p = _download(c, run_id, CONFIG, d)
        if p is None:
            from pipeline.names import KIND

            data = c.get_run(run_id).data  # a run of ours killed before it recorded its config has our tags
            ours = KIND in data.tags or "model.cell" in data.params
            why = "it ended before it recorded one" if ours else "not a run of this pipeline"
            raise ConfigError("", f"run {run_id} has no {CONFIG}: {why}")
        try:
            return load_config(p)
        except ConfigError as e:
            # named as the run's artifact, not as the temporary file it was downloaded to (found by a
            # fuzzing review: "error: /tmp/tmpXXXX/config.yaml: invalid YAML (line 2)")
            problem = str(e).replace(f"{p}: ", "").replace(str(p), CONFIG)
            raise ConfigError("", f"run {run_id}: its artifact {CONFIG} is invalid: {problem}") from None


@dataclass(frozen=True)
class LoadedRun:
    """A trained model back from its run: ``module`` is the run's LightningModule (CPU, eval mode), so
    ``profile_rnn(loaded.module, "model.rnn", batch)`` profiles it on its own loss; ``model`` is its
    :class:`RNNModel` (``loaded.model(x)`` predicts)."""

    run_id: str
    config: Config
    task: Task
    module: RNNTrainingModule
    source: str  # the artifact the weights came from: model/weights.pt or checkpoints/last.ckpt

    @property
    def model(self) -> RNNModel:
        return self.module.model


def load_run(run_id: str, tracking_uri: str | None = None) -> LoadedRun:
    """Load the model of a ``pipeline train`` run or a sweep trial, with its resolved config.

    Reads ``config.yaml`` and ``model/weights.pt``; a run without weights (killed, or
    ``tracking.log_model: false``) falls back to the model in its ``checkpoints/last.ckpt``.
    ``tracking_uri``: None is ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.
    """
    c = _client(run_id, tracking_uri)  # first: a missing store is named, not created
    run = _get_run(c, run_id, tracking_uri)
    cfg = _config_of(c, run_id)
    task = task_of(cfg.task)
    module = RNNTrainingModule(cfg, task)
    with tempfile.TemporaryDirectory() as d:
        p, source = _download(c, run_id, WEIGHTS, d), WEIGHTS
        if p is None:
            p, source = _download(c, run_id, CHECKPOINT, d), CHECKPOINT
            if p is None:
                raise ConfigError(
                    "", f"run {run_id} has neither {WEIGHTS} nor {CHECKPOINT}: {_why_no_weights(run, cfg)}"
                )
        try:  # the file only: a store that fails while downloading raises as it would anywhere else
            if source == WEIGHTS:
                state = torch.load(p, map_location="cpu", weights_only=True)
            else:
                ckpt = torch.load(p, map_location="cpu", weights_only=True)
                state = {
                    k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")
                }
            module.model.load_state_dict(state)
        except Exception as e:  # a truncated file (a kill during its upload), another model's tensors, ...
            raise ConfigError(
                "",
                f"run {run_id}: its artifact {source} cannot be loaded ({type(e).__name__}: {str(e)[:200]})",
            ) from None
    module.eval()
    for q in module.parameters():
        q.requires_grad_(False)
    return LoadedRun(run_id=run_id, config=cfg, task=task, module=module, source=source)


def resume_config(run_id: str, tracking_uri: str | None = None) -> Config:
    """The config to resume ``run_id`` with (its own, ``tracking.uri`` = where it was found), after the
    checks ``--resume`` makes: the run exists, is not FINISHED, and has a checkpoint."""
    c = _client(run_id, tracking_uri)
    r = _get_run(c, run_id, tracking_uri)
    if r.info.status == "FINISHED":
        raise ConfigError("", f"run {run_id} is FINISHED: nothing to resume")
    owner = _resumed_by_its_own_command(r)
    if owner:
        raise ConfigError("", f"run {run_id} is {owner}")
    cfg = _config_of(c, run_id)
    if CHECKPOINT not in {a.path for a in c.list_artifacts(run_id, str(Path(CHECKPOINT).parent))}:
        why = (
            "it validated but logged no checkpoint, which `python -m pipeline train` logs at every validation"
            if "val/loss" in r.data.metrics
            else "it stopped before its first validation"
        )
        raise ConfigError("", f"run {run_id} has no {CHECKPOINT} ({why}): start it afresh")
    return replace(cfg, tracking=replace(cfg.tracking, uri=tracking_uri, enabled=True))


def _resumed_by_its_own_command(run) -> str:
    """What a sweep's or a regression suite's run is and the command that goes on with it ('' for any
    other run): they log no checkpoint, and their commands retry or rerun what a kill left (README,
    "Faults and resuming"). `--resume` on a killed trial said "it stopped before its first validation"
    of a trial killed at step 900 (a walkthrough)."""
    from pipeline.names import (
        ENTRY,
        KIND,
        KIND_REGRESSION,
        KIND_SWEEP,
        KIND_TRIAL,
        STUDY,
        SUITE,
        TRIAL_NUMBER,
    )

    tags = run.data.tags
    kind, study, suite = tags.get(KIND), tags.get(STUDY, "?"), tags.get(SUITE, "?")
    again = "run the same sweep command again: it resumes the study"
    if kind == KIND_TRIAL:
        return f"trial {tags.get(TRIAL_NUMBER, '?')} of sweep {study!r}: a sweep retries a killed trial itself; {again}"
    if kind == KIND_SWEEP:
        return f"the parent run of sweep {study!r}: {again}"
    if kind == KIND_REGRESSION:
        what = f"entry {tags[ENTRY]!r} of" if ENTRY in tags else "the parent run of"
        return f"{what} regression suite {suite!r}: run `python -m pipeline regress --suite {suite}` again"
    return ""


def download_checkpoint(run_id: str, tracking_uri: str | None, dst: str) -> tuple[Path, int]:
    """The run's :data:`CHECKPOINT` downloaded under ``dst``, and the step it was saved at."""
    from pipeline.tracking import client

    p = _download(client(tracking_uri), run_id, CHECKPOINT, dst)
    if p is None:
        raise ConfigError("", f"run {run_id} has no {CHECKPOINT}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        step = int(ckpt["global_step"])
        if not isinstance(ckpt.get("state_dict"), dict):
            raise KeyError("state_dict")
    except Exception as e:  # a truncated or overwritten file: an UnpicklingError, EOFError, KeyError...
        # one line before the run is reopened: nothing of the run changes (found by a fuzzing review)
        raise ConfigError(
            "",
            f"run {run_id}: its artifact {CHECKPOINT} is not a readable checkpoint "
            f"({type(e).__name__}): it cannot be resumed; start it afresh",
        ) from None
    return p, step
