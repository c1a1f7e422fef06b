"""The sweep: stores created once, worker processes, a plain-text progress display, signals, the summary.

``run_sweep`` is what ``python -m pipeline sweep`` and ``make sweep`` call:

1. Create the stores once, before any worker starts (concurrent first-time creation loses workers and
   can leave SQLite stores half-migrated; README, "Faults and resuming"): the MLflow experiment, the Optuna study
   (``load_if_exists``) and the sweep's parent run (its id kept in the study's user attrs, so a resume
   or a worker on another machine reuses it).
2. Reap trials left RUNNING by a killed earlier sweep (:mod:`pipeline.sweep.stores`).
3. Start N worker processes (:mod:`pipeline.sweep.worker`), each with one intra-op thread on CPU or
   pinned to one GPU (CUDA_VISIBLE_DEVICES), each in its own session: Ctrl-C reaches the parent, which
   forwards SIGTERM so every worker closes its trial and MLflow run before exiting. CPU workers fork
   from a forkserver that imported torch and Lightning once while the stores were being created
   (:mod:`pipeline.sweep.procs`); GPU workers get fresh interpreters.
4. Print a status line whenever a trial ends; a worker that dies (kill -9) is reaped and replaced.
5. Summarize on the parent run (:mod:`pipeline.sweep.summary`) and print the best trial, a table by
   regime and the command that opens the MLflow UI.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.sweep.config import SweepConfig
from pipeline.uris import absolute_uri, display_url

STOP_GRACE_S = 60  # after forwarding SIGTERM, how long workers get to close their runs before SIGKILL
POLL_S = 1.0


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def choose_workers(requested: int | None, sw: SweepConfig) -> tuple[int, list[str | None]]:
    """(workers, device per worker): one per visible GPU by default, else one per core (at most 4)."""
    n_gpu = gpu_count()
    if requested is None:
        requested = sw.workers
    if requested is None:
        if n_gpu:
            requested = n_gpu
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            requested = max(1, min(4, cores // max(1, sw.base_config().trainer.threads)))
    requested = max(1, min(requested, sw.n_trials))
    devices: list[str | None] = [str(i % n_gpu) for i in range(requested)] if n_gpu else [None] * requested
    return requested, devices


class Sweep:
    def __init__(self, sw: SweepConfig, config_path: str, overrides: list[str], *, workers: int | None = None,
                 storage: str | None = None, out=sys.stdout):
        from pipeline.uris import resolve_uri

        self.sw, self.config_path, self.overrides, self.out = sw, config_path, overrides, out
        self.url = sw.storage_url(storage)
        base = sw.base_config()
        self.experiment = base.tracking.experiment
        self.mlflow_uri = absolute_uri(resolve_uri(base.tracking.uri))
        self.n_workers, self.devices = choose_workers(workers, sw)
        # CPU workers fork from a preloaded forkserver unless PIPELINE_SWEEP_FORK=0 (an escape hatch).
        self.fork = self.devices[0] is None and os.environ.get("PIPELINE_SWEEP_FORK", "1") != "0"
        self.stop_signal: int | None = None
        self.procs: dict[int, Any] = {}  # sweep_procs.WorkerProcess (CPU) or subprocess.Popen (GPU)
        self.log_dir = Path("optuna") / "logs" / sw.study
        self.printed: set[int] = set()

    # ------------------------------------------------------------------------------------ stores
    def create_stores(self) -> None:
        import optuna

        from pipeline.sweep.stores import budget_lock, open_storage, reap_stale
        from pipeline.sweep.worker import make_pruner, startup_design
        from pipeline.tracking import ensure_experiment

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.experiment_id = ensure_experiment(self.mlflow_uri, self.experiment)
        self.storage = open_storage(self.url, heartbeat_interval=self.sw.heartbeat_interval,
                                    grace=self.sw.heartbeat_grace, mlflow_uri=self.mlflow_uri)
        self.study = optuna.create_study(study_name=self.sw.study, storage=self.storage, direction="minimize",
                                         load_if_exists=True, pruner=make_pruner(self.sw))
        if self.study.direction != optuna.study.StudyDirection.MINIMIZE:
            from pipeline.schema import ConfigError

            raise ConfigError("study", f"study {self.sw.study!r} exists and does not minimize")
        with budget_lock(self.url, self.storage, self.sw.study):
            self.rec = self._parent_run()
            reap_stale(self.study, self.url, self.mlflow_uri)
            if not self.study.get_trials(deepcopy=False) and "startup_design" not in self.study.user_attrs:
                design = startup_design(self.sw)  # a fresh study: the same start-up points for any worker count
                for params in design:
                    self.study.enqueue_trial(params, user_attrs={"startup": True})
                self.study.set_user_attr("startup_design", len(design))

    def _parent_run(self):
        from mlflow.exceptions import MlflowException

        from pipeline.tracking import Recorder, version_tags

        attrs = self.study.user_attrs
        rid = attrs.get("mlflow_parent_run_id")
        if rid and attrs.get("mlflow_experiment_id") == self.experiment_id:
            rec = Recorder(self.mlflow_uri, rid, self.experiment_id)
            try:
                info = rec.client.get_run(rid).info
                if info.lifecycle_stage == "active":
                    rec.client.update_run(rid, status="RUNNING")  # a resume: same parent run, open again
                    return rec
            except MlflowException:
                pass
        tags = {"pipeline.kind": "sweep", "study": self.sw.study, "storage": display_url(self.url),
                **version_tags()}
        rec = Recorder.start(self.mlflow_uri, self.experiment, f"sweep-{self.sw.study}", tags=tags,
                             experiment_id=self.experiment_id)
        params = {"n_trials": self.sw.n_trials, "sampler": json.dumps(self.sw.sampler),
                  "pruner": json.dumps(self.sw.pruner), "penalty": self.sw.penalty,
                  "prune.max_grad_norm": self.sw.max_grad_norm}
        params.update({f"space.{p.key}": json.dumps(p.choices if p.kind == "categorical" else
                                                    {"low": p.low, "high": p.high, "log": p.log})
                       for p in self.sw.space})
        rec.log_params(params)
        import yaml

        rec.log_text(yaml.safe_dump(self.sw.source, sort_keys=False), "sweep.yaml")
        self.study.set_user_attr("mlflow_parent_run_id", rec.run_id)
        self.study.set_user_attr("mlflow_experiment_id", self.experiment_id)
        self.study.set_user_attr("mlflow_experiment", self.experiment)
        return rec

    # ----------------------------------------------------------------------------------- workers
    def spawn(self, index: int) -> None:
        spec = {"config": self.config_path, "overrides": self.overrides, "storage": self.url,
                "study": self.sw.study, "mlflow_uri": self.mlflow_uri, "experiment": self.experiment,
                "experiment_id": self.experiment_id, "parent_run_id": self.rec.run_id, "worker": index,
                "gpu": self.devices[index % len(self.devices)],
                "deadline": self.t0 + self.sw.timeout if self.sw.timeout else None}
        env = dict(os.environ)
        # One intra-op thread per CPU worker: 3-30x faster than 2 for these small RNNs (README, "Benchmarks").
        env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "MLFLOW_TRACKING_URI": self.mlflow_uri})
        env["CUDA_VISIBLE_DEVICES"] = spec["gpu"] if spec["gpu"] is not None else ""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"worker-{index}.log"
        if self.fork:
            from pipeline.sweep.procs import WorkerProcess

            changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
            self.procs[index] = WorkerProcess(json.dumps(spec), str(log_path), changed)
            return
        # A fresh interpreter: GPU workers (CUDA cannot be used in a process forked after something, an
        # import in the forkserver, touched the driver; CUDA_VISIBLE_DEVICES must precede that), or
        # PIPELINE_SWEEP_FORK=0.
        with open(log_path, "a") as log:
            self.procs[index] = subprocess.Popen([sys.executable, "-m", "pipeline.sweep.worker", json.dumps(spec)],
                                                 env=env, stdout=log, stderr=subprocess.STDOUT,
                                                 start_new_session=True)

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            print(f"\nsweep: {signal.Signals(signum).name}: stopping workers (their trials close as "
                  "FAIL, runs as KILLED; re-run the same command to resume)", file=sys.stderr, flush=True)
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)

    def _log_tail(self, index: int, n: int = 8) -> str:
        with contextlib.suppress(OSError):
            lines = (self.log_dir / f"worker-{index}.log").read_text().splitlines()
            return "\n".join("    " + ln for ln in lines[-n:])
        return ""

    def supervise(self) -> None:
        from pipeline.sweep.stores import budget_lock, reap_stale

        respawns = self.n_workers  # replacement budget for workers that die (kill -9, OOM)
        last_print = 0.0
        while True:
            time.sleep(POLL_S)
            if self.stop_signal is not None:
                deadline = time.time() + STOP_GRACE_S
                while any(p.poll() is None for p in self.procs.values()) and time.time() < deadline:
                    time.sleep(0.2)
                for p in self.procs.values():
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                break
            ended = {i: p.returncode for i, p in self.procs.items() if p.poll() is not None}
            for i, rc in ended.items():
                del self.procs[i]
                if rc != 0:
                    print(f"sweep: worker {i} exited with status {rc}\n{self._log_tail(i)}", file=self.out, flush=True)
                    with budget_lock(self.url, self.storage, self.sw.study):
                        reap_stale(self.study, self.url, self.mlflow_uri)
                    if respawns > 0 and self._budget_left() > 0 and rc < 0:  # killed by a signal: replace
                        respawns -= 1
                        self.spawn(i)
            now = time.time()
            changed = self.progress(force=now - last_print > 30)
            if changed:
                last_print = now
            if not self.procs:
                if self._budget_left() > 0 and respawns > 0 and self._waiting() and not self._timed_out():
                    respawns -= 1  # a retry was enqueued after the others finished
                    self.spawn(0)
                    continue
                break

    def _budget_left(self) -> int:
        from pipeline.sweep.summary import counts

        c = counts(self.study)
        return self.sw.n_trials - c["done"] - c["running"]

    def _waiting(self) -> bool:
        from optuna.trial import TrialState

        return bool(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    def _timed_out(self) -> bool:
        return bool(self.sw.timeout and time.time() > self.t0 + self.sw.timeout)

    # ---------------------------------------------------------------------------------- progress
    def progress(self, force: bool = False) -> bool:
        """A line per trial that ended since the last call, then a status line. Plain text (logs, CI)."""
        from pipeline.sweep.summary import best_trial, counts, describe

        trials = self.study.get_trials(deepcopy=False)
        new = [t for t in trials if t.state.is_finished() and t.number not in self.printed]
        for t in sorted(new, key=lambda t: t.number):
            self.printed.add(t.number)
            if t.number in self.already_done:
                continue
            ua = t.user_attrs
            what = ("DIVERGED" if ua.get("diverged") else t.state.name) + (
                f"({ua['pruned_by']})" if ua.get("pruned_by") else "")
            val = f"{t.value:.4f}" if t.value is not None else "-"
            dur = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_start else 0
            print(f"  trial {t.number:>3} {what:<18} value={val:<8} regime={ua.get('regime', '-'):<9} "
                  f"{dur:5.0f}s  {describe(t)}", file=self.out, flush=True)
        if not new and not force:
            return False
        c, best = counts(self.study), best_trial(self.study)
        done_now = c["done"] - self.done_at_start
        elapsed = time.time() - self.t0
        left = max(0, self.sw.n_trials - c["done"])
        eta = f"{left * elapsed / done_now / 60:.1f} min" if done_now > 0 else "?"
        b = f"{best.value:.4f} (#{best.number})" if best else "-"
        print(f"[{self.sw.study}] {c['done']}/{self.sw.n_trials} done | running {c['running']} | pruned "
              f"{c['pruned']} | diverged {c['diverged']} | failed {c['fail']} | best {b} | "
              f"elapsed {elapsed / 60:.1f} min | ETA {eta}", file=self.out, flush=True)
        return True

    # --------------------------------------------------------------------------------------- run
    def run(self) -> int:
        from pipeline.sweep.summary import counts

        self.t0 = time.time()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        status = "FAILED"
        self.rec = None
        try:
            if self.fork:
                from pipeline.sweep.procs import prestart

                prestart()  # the workers' forkserver imports torch + Lightning while the stores are created
            self.create_stores()
            c = counts(self.study)
            self.done_at_start = c["done"]
            self.already_done = {t.number for t in self.study.get_trials(deepcopy=False) if t.state.is_finished()}
            left = self._budget_left()
            print(f"sweep {self.sw.study}: {c['done']}/{self.sw.n_trials} trials done"
                  + (f", resuming with {left} to go" if c["done"] else "")
                  + f"; {self.n_workers} worker(s) on " + (f"GPU {','.join(d for d in self.devices if d)}"
                                                            if self.devices[0] is not None else "CPU")
                  + f"\n  optuna: {display_url(self.url)}\n  mlflow: {self.mlflow_uri} (experiment "
                  f"{self.experiment}, parent run {self.rec.run_id})\n  worker logs: {self.log_dir}/",
                  file=self.out, flush=True)
            if left > 0 and self.stop_signal is None:
                for i in range(min(self.n_workers, left)):
                    self.spawn(i)
                self.supervise()
            self.progress()
            status = "KILLED" if self.stop_signal is not None else "FINISHED"
            self.summarize(complete=self._budget_left() <= 0 and status == "FINISHED")
        finally:
            for p in self.procs.values():  # an exception in the parent: do not leave workers behind
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(STOP_GRACE_S)
                    if p.poll() is None:
                        p.kill()
            if self.rec is not None:
                with contextlib.suppress(Exception):
                    self.rec.close(status)
            for s, h in old.items():
                signal.signal(s, h)
        if self.stop_signal is not None:
            return 128 + int(self.stop_signal)  # 130 Ctrl-C, 143 SIGTERM
        return 0 if self._budget_left() <= 0 else 1

    def summarize(self, complete: bool) -> None:
        from pipeline.sweep.stores import budget_lock, close_trial_runs, reap_stale
        from pipeline.sweep.summary import describe, finalize, regime_table

        with budget_lock(self.url, self.storage, self.sw.study):
            reap_stale(self.study, self.url, self.mlflow_uri)
        for t in self.study.get_trials(deepcopy=False):  # belt and braces: no child run left RUNNING
            if t.state.is_finished():
                with contextlib.suppress(Exception):
                    close_trial_runs(self.mlflow_uri, self.study, t, "KILLED")
        res = finalize(self.rec, self.study, self.sw, complete=complete)
        best, c = res["best"], res["counts"]
        o = self.out
        print(f"\nsweep {self.sw.study}: {c['done']}/{self.sw.n_trials} done ({c['complete']} complete, of which "
              f"{c['diverged']} diverged; {c['pruned']} pruned; {c['fail']} failed/killed)", file=o)
        if best is not None:
            print(f"best trial #{best.number}: val/loss_ratio={best.value:.4f} regime={best.user_attrs.get('regime')}"
                  f" run={best.user_attrs.get('mlflow_run_id')}\n  {describe(best)}", file=o)
        else:
            print("best trial: none yet (no trial trained without diverging)", file=o)
        print("by regime:\n" + regime_table(res["frame"]), file=o)
        for n in res["notes"]:
            print(f"note: {n}", file=o)
        ui = "make ui" if self.mlflow_uri == absolute_uri("sqlite:///mlflow.db") else \
            f"python -m pipeline ui --store {self.mlflow_uri}"
        print(f"review in MLflow: {ui}   (then open http://127.0.0.1:5000, experiment '{self.experiment}', "
              f"run 'sweep-{self.sw.study}')", file=o, flush=True)


def run_sweep(config_path: str, overrides: list[str] | None = None, *, workers: int | None = None,
              storage: str | None = None, out=sys.stdout) -> int:
    """Load and validate the sweep file (nothing is written before this passes), then run it."""
    from pipeline.schema import ConfigError
    from pipeline.sweep.config import check_sweep_fits, load_sweep
    from pipeline.sweep.stores import check_storage
    from pipeline.tracking import probe_store
    from pipeline.uris import check_storage_url

    sw = load_sweep(config_path, overrides)
    if workers is not None and workers < 1:
        raise ConfigError("--workers", f"must be >= 1, got {workers}")
    if storage is not None:
        check_storage_url("--storage", storage)
    sweep = Sweep(sw, config_path, list(overrides or []), workers=workers, storage=storage, out=out)
    # Everything is checked before anything is written (README "Faults and resuming"): every trial the space
    # can produce fits in memory, n_workers at once; the MLflow store opens; the Optuna store replays.
    n_gpu = sum(d is not None for d in sweep.devices) and len({d for d in sweep.devices})
    check_sweep_fits(sw, sweep.n_workers, -(-sweep.n_workers // n_gpu) if n_gpu else None)
    probe_store(sweep.mlflow_uri, "base.tracking.uri")
    check_storage(sweep.url)
    return sweep.run()
