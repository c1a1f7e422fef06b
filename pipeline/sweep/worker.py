"""A sweep worker process: ask a trial, train it with :func:`pipeline.training.run.run`, tell the result; repeat.

Started by :class:`pipeline.sweep.supervisor.Supervisor` (forked by :mod:`pipeline.sweep.procs`, or
``python -m pipeline.sweep.worker SPEC_JSON``) after the parent has created the study, the MLflow experiment and the sweep's parent run: a worker only loads them
(concurrent first-time creation loses workers, measured: 13 of 18 PostgreSQL workers died at a cold start).

How a trial ends, in Optuna and in MLflow:

=================  ===========================================  =====================================
outcome            Optuna                                       MLflow child run
=================  ===========================================  =====================================
trained            COMPLETE, value = final val/loss_ratio,      FINISHED
                   capped at penalty
pruned (val loss)  PRUNED, attr pruned_by=val_loss              FINISHED, tag pruned=true
pruned (gradient)  PRUNED, attr pruned_by=grad_norm             FINISHED, tag pruned=true
diverged           COMPLETE, value = penalty (see below),       FINISHED, tags regime=diverged,
                   attrs diverged=True, diverged_step, regime   diverged=true, diverged_step
SIGTERM / Ctrl-C   FAIL, attr interrupted, params re-enqueued   KILLED
kill -9            FAIL (reaper), params re-enqueued once       KILLED (by the reaper)
exception          FAIL, attr error                             FAILED
store outage       FAIL, attr error, params re-enqueued once    KILLED (pipeline/sweep/outages.py)
=================  ===========================================  =====================================

Why diverged trials are COMPLETE with the value :func:`pipeline.sweep.study.divergence_value`: see
:mod:`pipeline.sweep.study`. The worker receives the validated sweep as data in its spec (the parent's
:func:`pipeline.sweep.config.to_data`): a respawned worker runs the sweep the parent validated, even if
the file changed since.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
from dataclasses import replace
from typing import Any

import pytorch_lightning as pl

from pipeline import signals as sigterm
from pipeline.provenance import owner_alive
from pipeline.signals import Terminated, check_terminated, deferred, delivered, raise_terminated
from pipeline.sweep import batch, outages
from pipeline.sweep.config import from_data
from pipeline.sweep.owners import ask_owned, heartbeat, reap_stale
from pipeline.sweep.record import end_trial, trial_tags
from pipeline.sweep.stores import budget_lock, open_storage
from pipeline.sweep.study import budget_left, make_pruner, make_sampler, suggest

MAX_CONSECUTIVE_ERRORS = 3  # a worker whose trials keep raising stops instead of burning the budget


class TrialCallback(pl.Callback):
    """Reports val/loss_ratio to Optuna after each validation; prunes on it and on gradient health.

    Gradient health: the largest pre-clip gradient norm so far (``GradientMonitor.max_norm_preclip``,
    refreshed after each log window) above ``prune.max_grad_norm`` stops the trial as pruned. A
    non-finite loss or gradient already stops training in the module's divergence guard.
    We do not use optuna-integration's callback: it imports ``lightning.pytorch``, and mixing it with
    ``pytorch_lightning`` fails (two copies of the Lightning classes, neither recognising the other).
    """

    def __init__(self, trial, max_grad_norm: float | None, log_every: int, cap: float = math.inf):
        self.trial, self.max_grad_norm, self.log_every = trial, max_grad_norm, log_every
        # the sweep's penalty: each reported value is capped as the objective is (README, "Objective,
        # divergence, pruning"); a pruned trial's value, its last report, read 2.04 above a penalty of 2.0
        self.cap = cap
        self.pruned_by: str | None = None
        self.monitor: Any = None  # the run's GradientMonitor, found at setup
        self.reported: set[int] = set()  # the final validate() may repeat the last step
        self.module: Any = None  # the trial's LightningModule, for record.log_best_model

    def setup(self, trainer, pl_module, stage: str) -> None:
        from pipeline.training.callbacks import GradientMonitor

        if stage != "fit":
            return
        self.module = pl_module
        self.monitor = next((c for c in trainer.callbacks if isinstance(c, GradientMonitor)), None)
        run_id = getattr(getattr(self.monitor, "recorder", None), "run_id", None)
        if run_id:  # as early as possible: a reaper closes this run if the worker dies
            self.trial.set_user_attr("mlflow_run_id", run_id)

    def _prune(self, trainer, pl_module, why: str) -> None:
        self.pruned_by = why
        pl_module.pruned = True
        trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.max_grad_norm is None or self.pruned_by or self.monitor is None:
            return
        if trainer.global_step % self.log_every == 0:  # the monitor has just drained its window
            m = self.monitor.max_norm_preclip
            if m is not None and m > self.max_grad_norm:
                self._prune(trainer, pl_module, "grad_norm")

    def on_validation_end(self, trainer, pl_module) -> None:
        v = pl_module.val_loss
        if v is None or not math.isfinite(v) or self.pruned_by or pl_module.diverged_step is not None:
            return
        step = trainer.global_step
        if step in self.reported:
            return
        self.reported.add(step)
        self.trial.report(min(v / pl_module.task.baseline, self.cap), step)
        # Only prune while fitting, and not at the last step (the run is over anyway).
        if trainer.state.fn == "fit" and step < trainer.max_steps and self.trial.should_prune():
            self._prune(trainer, pl_module, "val_loss")


def trial_run_config(sw, spec: dict[str, Any], mlflow_uri: str, trial):
    """The training config of ``trial`` in sweep ``sw`` (worker ``spec``): sampled values on the base,
    recorded as a child run of the sweep's experiment at ``mlflow_uri``."""
    values = {p.key: suggest(trial, p) for p in sw.space}
    cfg = sw.trial_config(values)
    short = " ".join(
        f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
        for k, v in values.items()
    )
    tracking = replace(
        cfg.tracking,
        uri=mlflow_uri,
        enabled=True,
        experiment=spec["experiment"],
        run_name=f"{sw.study}-t{trial.number:04d} {short}",  # cut to MLflow's 250 by Recorder.start
        log_model=sw.log_models == "all",
    )
    trainer = replace(cfg.trainer, progress_bar=False, **({"accelerator": "gpu"} if spec.get("gpu") else {}))
    return replace(cfg, tracking=tracking, trainer=trainer)


def load_study(sw, url: str, mlflow_uri: str):
    """The worker's (storage, study): the study the parent created, with the sweep's sampler and pruner."""
    import optuna

    storage = open_storage(
        url, heartbeat_interval=sw.heartbeat.interval, grace=sw.heartbeat.grace, mlflow_uri=mlflow_uri
    )
    study = optuna.load_study(
        study_name=sw.study, storage=storage, sampler=make_sampler(sw), pruner=make_pruner(sw)
    )
    return storage, study


def parent_gone(spec: dict[str, Any], ppid: int) -> bool:
    """Whether the sweep's parent (spec ``parent``: pid and start time) is gone. Asked of the parent
    itself, not of this worker's own parent: a forkserver outlives a parent killed with kill -9 (each
    worker holds the write end of its "alive" pipe, which multiprocessing hands to every child), so the
    workers, still its children, took the whole study on in the background (a walkthrough: all 10
    trials of a killed sweep finished). A forkserver killed alone leaves the workers going on (README,
    "Faults and resuming"). Without a parent in the spec, or one this host cannot judge, a change of
    this worker's own parent (``ppid``, the one it started with) says it."""
    parent = spec.get("parent")
    alive = owner_alive(parent) if parent else None
    if alive is not None:
        return not alive
    return os.getppid() != ppid


class Worker:
    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.sw = from_data(spec["sweep"])
        self.url, self.mlflow_uri = spec["storage_url"], spec["mlflow_uri"]
        self.storage, self.study = load_study(self.sw, self.url, self.mlflow_uri)
        from pipeline.training import callbacks, module, run  # noqa: F401  (import before the first trial, not inside it)

        self.ppid = os.getppid()
        self.k = batch.trials_per_worker(self.sw, spec.get("gpu") is not None)
        self.deadline = spec.get("deadline")
        self.signals_before = sigterm.received_count()  # SIGTERMs before this worker: not its stop
        self.cut: list[tuple[Any, str]] = []  # trials a store outage cut, and why (sweep.outages)
        self.met: BaseException | None = None  # an outage met outside a trial
        # outcome tags the outage kept from a told trial's run
        self.untagged: list[tuple[str, dict, str]] = []

    def next_trial(self):
        """Under the budget lock: reap stale trials, count, ask (WAITING retries are popped first)."""
        with budget_lock(self.url, self.storage, self.sw.study):
            reap_stale(self.study, self.url, self.mlflow_uri)
            if budget_left(self.study, self.sw.n_trials) <= 0:
                return None
            return ask_owned(self.study)

    def run(self) -> int:
        """Trials until the budget is spent (0), the sweep's deadline passes or its parent is gone (0), or
        too many raise in a row (1). On SIGTERM (and Ctrl-C), every trial this worker asked and has not
        told is closed as interrupted before the signal's exception goes on: the training paths close the
        ones they hold (run_trial, batch.run_batch); :func:`~pipeline.sweep.owners.release_own` closes any
        a signal met between two of them. Against SIGTERM the steps that must not be cut in two are
        deferred (pipeline.signals.deferred); a Ctrl-C sent to the worker itself is not (the sweep parent
        forwards a Ctrl-C as SIGTERM), so a trial it meets between ``ask`` and its owner is the orphan
        reaper's."""
        from pipeline.sweep.owners import release_own

        try:
            return self._loop()
        except (KeyboardInterrupt, SystemExit, Terminated):
            delivered()  # this signal is handled here; a second SIGTERM waits for the release below
            try:
                with deferred():
                    released = release_own(self.study, self.mlflow_uri)
            except Exception as e:  # the store itself failed: the parent's reaper is the next line
                print(f"worker {self.spec.get('worker')}: trials not released: {e}", file=sys.stderr)
            else:
                if released:
                    print(f"trials {released} interrupted between two steps: closed", file=sys.stderr)
            raise

    def _loop(self) -> int:
        errors = 0
        while True:
            check_terminated()  # a SIGTERM whose exception a garbage-collector callback dropped
            sigterm.check_received(self.signals_before)  # one whose exception another replaced
            if outages.sweep_over(self):  # finish, take no new trial
                return 0
            try:
                ok = self._round()
            except Exception as e:  # asking or telling met a store that did not answer: wait for it
                if not outages.met(self, e):
                    raise
                ok = False
            if self.cut or self.met or self.untagged:  # not the trials' errors (sweep/outages.py)
                code, self.met = outages.ride_out(self, self.met), None
                if code is not None:
                    return code
                continue
            if ok is None:
                return 0
            errors = 0 if ok else errors + 1
            if errors >= MAX_CONSECUTIVE_ERRORS:
                # with stacks a round is a rolling stack, refilled as its trials end: "3 trials" read as 3
                # where 12 had failed (a walkthrough)
                what = "trials" if self.k == 1 else "rounds of its stack (refilled as trials end)"
                print(
                    f"worker {self.spec['worker']}: {errors} {what} in a row raised; stopping",
                    file=sys.stderr,
                )
                return 1

    def parent_gone(self) -> bool:
        """Whether the sweep's parent is gone (:func:`parent_gone`)."""
        return parent_gone(self.spec, self.ppid)

    def _round(self) -> bool | None:
        """Ask and train one trial, or a batch (README, "Batched trials"): whether all went well; None
        when there is none left to ask."""
        if self.k > 1:
            trials = batch.next_trials(self, self.k)
            return batch.run_batch(self, trials) if trials else None
        trial = self.next_trial()
        return None if trial is None else self.run_trial(trial)

    def trial_run_config(self, trial):
        """The training config of ``trial``: sampled values on the base, recorded as a child run."""
        return trial_run_config(self.sw, self.spec, self.mlflow_uri, trial)

    def run_trial(self, trial) -> bool:
        """One trial, start to tell. Returns False when it raised (FAIL)."""
        from optuna.trial import TrialState

        from pipeline.sweep.owners import asked_stop, close_interrupted, release_trial
        from pipeline.training import run as train

        tags = trial_tags(self.sw.study, trial.number)
        try:
            cfg = self.trial_run_config(trial)
            cb = TrialCallback(trial, self.sw.prune.max_grad_norm, cfg.trainer.log_every, self.sw.penalty)

            def done(r) -> None:  # the run is closed FINISHED: tell the trial in the same step (train.run)
                end_trial(self, trial, r, cb.module, cb.pruned_by)

            with heartbeat(self.storage, trial._trial_id, self.sw.heartbeat.interval):
                train.run(
                    cfg,
                    parent_run_id=self.spec["parent_run_id"],
                    extra_tags=tags,
                    callbacks=[cb],
                    experiment_id=self.spec["experiment_id"],
                    on_done=done,
                )
        except (KeyboardInterrupt, SystemExit, Terminated) as e:
            if self.told(trial):  # the signal came as the trial was told: it is done
                raise
            # The run is already closed KILLED by train.run; close the trial, keep its params for a resume.
            with contextlib.suppress(Exception):
                asked = asked_stop(e, self.signals_before)
                close_interrupted(self.study, trial._trial_id, self.mlflow_uri, asked)
            raise
        except Exception as e:  # a bug or a bad value: record it, keep the sweep going
            if outages.cut(self, trial, e):  # a store did not answer: closed (or tagged) once it does
                return False
            if outages.reaped(self, trial, e):  # failed and retried by a reaper meanwhile
                return True
            if self.told(trial):  # an error after the tell (the worker's, not the trial's)
                raise
            if sigterm.received(self.signals_before):  # the stop's error (a write it found locked)
                with contextlib.suppress(Exception):
                    release_trial(self.study, self.mlflow_uri, trial)
                sigterm.check_received(self.signals_before)
            msg = f"{type(e).__name__}: {e}"[:1000]
            import traceback

            print(f"trial {trial.number} failed: {msg}", file=sys.stderr)
            traceback.print_exc()
            with contextlib.suppress(Exception):
                trial.set_user_attr("error", msg)
            self.study.tell(trial, state=TrialState.FAIL)
            return False
        return True

    def told(self, trial) -> bool:
        """Whether ``trial`` is finished in the storage (told by this worker, or failed by a reaper)."""
        with contextlib.suppress(Exception):
            return self.study._storage.get_trial(trial._trial_id).state.is_finished()
        return False


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])

    signal.signal(signal.SIGTERM, raise_terminated)
    if spec.get("gpu") is None:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import logging

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("pipeline.sweep").setLevel(logging.WARNING)
    try:
        return Worker(spec).run()
    except KeyboardInterrupt:
        return 130
    except Terminated:
        return 143


if __name__ == "__main__":
    code = main(sys.argv[1:])
    import gc

    gc.freeze()  # skip the seconds-long final collection of torch/Lightning objects (see pipeline/__main__.py)
    sys.exit(code)
