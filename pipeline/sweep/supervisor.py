"""The sweep's worker processes, supervised: spawn, watch, replace the killed, forward signals, stop.

Made by :func:`pipeline.sweep.parent.run_sweep` once the stores exist (:class:`~pipeline.sweep.parent.Stores`).
Each worker gets the validated sweep as data in its spawn spec (:func:`pipeline.sweep.config.to_data`),
so a replacement worker runs the sweep the parent validated even if the file changed since.
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

from pipeline.provenance import owner_tag
from pipeline.store_errors import Outage
from pipeline.sweep.config import SweepConfig, to_data
from pipeline.sweep.study import budget_left, counts
from pipeline.sweep.study_end import StudyEnd
from pipeline.sweep.summary import Progress
from pipeline.uris import display_url, file_name

STOP_GRACE_S = 60  # after forwarding SIGTERM, how long workers get to close their runs before SIGKILL
POLL_S = 1.0
FORCE_STATUS_S = 30  # a status line at least this often, even when no trial ended


class StopSignal:
    """SIGINT / SIGTERM to the parent while a sweep runs: remember the first, forward SIGTERM to the workers."""

    def __init__(self):
        self.signum: int | None = None
        self.procs: dict[int, Any] = {}  # the supervisor's workers (see :meth:`watch`)
        self._old: dict[int, Any] = {}
        self._sent: set[int] = set()  # id() of the workers sent the SIGTERM

    def __enter__(self) -> StopSignal:
        self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def watch(self, procs: dict[int, Any]) -> None:
        self.procs = procs

    def _on_signal(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            print(
                f"\nsweep: {signal.Signals(signum).name}: stopping workers (their trials close as "
                "FAIL, runs as KILLED; re-run the same command to resume)",
                file=sys.stderr,
                flush=True,
            )
        self._send(list(self.procs.values()))

    def forward(self) -> None:
        """After a stop signal: SIGTERM to each live worker not sent one yet (those spawned after it got
        none: a Ctrl-C at start-up trained the whole budget, then exited 130; a chaos review)."""
        if self.signum is not None:
            self._send([p for p in list(self.procs.values()) if id(p) not in self._sent])

    def _send(self, procs: list) -> None:
        for p in procs:
            self._sent.add(id(p))
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)


class Workers:
    """The live worker processes: started with the sweep's validated spec, stopped, their logs read."""

    def __init__(
        self, spec: dict[str, Any], devices: list[str | None], mlflow_uri: str, log_dir: Path, fork: bool
    ):
        self.spec, self.devices, self.mlflow_uri = spec, devices, mlflow_uri
        self.log_dir, self.fork = log_dir, fork
        self.procs: dict[int, Any] = {}  # sweep.procs.WorkerProcess (CPU) or subprocess.Popen (GPU)

    def spawn(self, index: int) -> None:
        gpu = self.devices[index % len(self.devices)]
        spec = json.dumps(
            {**self.spec, "worker": index, "gpu": gpu, "workers": len(self.devices), "parent": owner_tag()}
        )
        env = dict(os.environ)
        # One intra-op thread per CPU worker: 3-30x faster than 2 for these small RNNs (README, "Benchmarks").
        env.update(
            {
                "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
                "MLFLOW_TRACKING_URI": self.mlflow_uri,
                "CUDA_VISIBLE_DEVICES": gpu or "",
            }
        )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"worker-{index}.log"
        if self.fork:
            from pipeline.sweep.procs import WorkerProcess

            changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
            self.procs[index] = WorkerProcess(spec, str(log_path), changed)
            return
        # A fresh interpreter: GPU workers (CUDA cannot be used in a process forked after something, an
        # import in the forkserver, touched the driver; CUDA_VISIBLE_DEVICES must precede that), or
        # PIPELINE_SWEEP_FORK=0.
        with open(log_path, "a") as log:
            self.procs[index] = subprocess.Popen(
                [sys.executable, "-m", "pipeline.sweep.worker", spec],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def ended(self) -> dict[int, int]:
        """Forget the workers that exited; their exit statuses by index."""
        out = {i: p.returncode for i, p in self.procs.items() if p.poll() is not None}
        for i in out:
            del self.procs[i]
        return out

    def wait_any(self, timeout: float) -> None:
        """Sleep up to ``timeout`` s, returning as soon as a forked worker exits (its process sentinel), so
        the summary starts when the last worker ends, not at the next poll. Popen workers: a plain sleep."""
        from multiprocessing.connection import wait

        forked = [p for p in self.procs.values() if hasattr(p, "proc")]
        # a worker whose forkserver is gone: its sentinel is ready while it runs on (procs.WorkerProcess),
        # and waiting on it returned at once, a busy loop on the store until it ended (found by a review)
        lost = any(p.proc.exitcode is not None and p.poll() is None for p in forked)
        if forked and len(forked) == len(self.procs) and not lost:
            wait([p.proc.sentinel for p in forked], timeout)
        else:
            time.sleep(timeout)

    def log_tail(self, index: int, n: int = 8) -> str:
        with contextlib.suppress(OSError):
            lines = (self.log_dir / f"worker-{index}.log").read_text().splitlines()
            return "\n".join("    " + ln for ln in lines[-n:])
        return ""

    def wait_then_kill(self) -> None:
        """After a stop signal (already forwarded): give the workers STOP_GRACE_S, then SIGKILL."""
        deadline = time.time() + STOP_GRACE_S
        while any(p.poll() is None for p in self.procs.values()) and time.time() < deadline:
            time.sleep(0.2)
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    def terminate_all(self) -> None:
        """An exception in the parent: do not leave workers behind."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(STOP_GRACE_S)
                if p.poll() is None:
                    p.kill()


def _preimport_summary():
    """Import what the end-of-sweep summary draws with (matplotlib, Optuna's plots and importance, which
    imports scikit-learn: 2-3 s of CPU measured here) in a background thread now, while the workers'
    forkserver still imports and a core is free, instead of after the last trial. Returns the thread: the
    summary joins it first (``matplotlib.use`` reads ``sys.modules`` and would see a half-imported pyplot
    of a sweep shorter than the imports)."""
    import threading

    def work() -> None:
        with contextlib.suppress(Exception):
            import optuna.importance
            import optuna.visualization.matplotlib  # noqa: F401

            import pipeline.plots  # noqa: F401  (selects Agg before pyplot)

    th = threading.Thread(target=work, name="preimport-summary", daemon=True)
    th.start()
    return th


def signalled(rc: int) -> bool:
    """Whether a worker's exit status says a signal stopped it: killed by one (negative), or one it
    handled (130 Ctrl-C, 143 SIGTERM: a worker closes its trials and exits 128 + the signal). Such a
    worker is replaced and failed nothing; a SIGTERM'd worker's 143 read as its own error (a review)."""
    return rc < 0 or rc in (128 + signal.SIGINT, 128 + signal.SIGTERM)


def devices_text(devices: list[str | None]) -> str:
    """Where the workers run, for the banner: ``CPU``, or each GPU once in worker order (``GPU 0,1``;
    twelve workers sharing one card read ``GPU 0``, not ``GPU 0,0,...,0``)."""
    gpus = dict.fromkeys(d for d in devices if d is not None)
    return f"GPU {','.join(gpus)}" if gpus else "CPU"


def end_status(signum: int | None, complete: bool) -> str:
    """The parent run's status as this machine closes it: KILLED after a signal, unless the study reached
    ``n_trials`` all the same (its last trials done by other machines, or by this one's workers before the
    signal stopped them): a complete study closed KILLED with ``sweep_complete=false`` beside
    ``n_trials_done = n_trials`` (a many-machines walkthrough), and as the last machine to end sets the
    shared run's status, it undid another machine's FINISHED. The exit status still says the signal."""
    return "KILLED" if signum is not None and not complete else "FINISHED"


def banner(sw: SweepConfig, stores, devices: list[str | None], log_dir: Path, done: int, left: int) -> str:
    """The lines a sweep starts with: the study's progress, where its workers run and its stores are."""
    n = sw.n_trials
    if done > n:  # "10/4 done" alone read as a miscount (a walkthrough)
        nothing = (
            f": nothing to run (n_trials {n} is below the {done} trials this study has done, which it keeps)"
        )
    else:
        nothing = ": nothing to run" if done >= n else f": the {n - done} left are running elsewhere"
    return (
        f"sweep {sw.study}: {done}/{n} trials done"
        + ((f", resuming with {left} to go" if left > 0 else nothing) if done else "")
        + f"; {len(devices)} worker(s) on {devices_text(devices)}\n  optuna: {display_url(stores.url)}\n  mlflow: "
        f"{display_url(stores.mlflow_uri)} (experiment {stores.experiment}, parent run {stores.parent_run_id})"
        f"\n  worker logs: {log_dir}/"
    )


def timeout_note(sw: SweepConfig, done: int, done_at_start: int) -> tuple[str, bool]:
    """The line a sweep its ``timeout`` stopped short ends with, and whether that is a success (exit 0
    unless a worker failed too): the user's bound, once this command finished a trial. One that finished
    none (a timeout shorter than the workers' start-up) would make no progress however often it ran: exit
    1 (a review)."""
    head = f"the sweep's timeout ({sw.timeout:g} s from the command's start, worker start-up included)"
    if done > done_at_start:
        return f"note: {head} passed with {done} of {sw.n_trials} trials done; the same command goes on", True
    return (
        f"error: {head} passed before this command finished a trial ({done} of {sw.n_trials} done): raise timeout",
        False,
    )


class Supervisor:
    """The worker processes of one sweep, from the first spawn to the summary on the parent run."""

    def __init__(
        self,
        sw: SweepConfig,
        stores,
        devices: list[str | None],
        *,
        fork: bool,
        stop: StopSignal,
        t0: float,
        out=None,
    ):
        from pipeline.tracking import Recorder

        self.sw, self.stores, self.devices = sw, stores, devices
        self.stop, self.t0, self.out = stop, t0, sys.stdout if out is None else out
        self.log_dir = Path("optuna") / "logs" / file_name(sw.study)
        spec = {
            "sweep": to_data(sw),
            "storage_url": stores.url,
            "mlflow_uri": stores.mlflow_uri,
            "experiment": stores.experiment,
            "experiment_id": stores.experiment_id,
            "parent_run_id": stores.parent_run_id,
            "deadline": t0 + sw.timeout if sw.timeout else None,
        }
        self.workers = Workers(spec, devices, stores.mlflow_uri, self.log_dir, fork)
        stop.watch(self.workers.procs)
        self.respawns = len(devices)  # replacement budget for workers that die (kill -9, OOM)
        self.preimport: Any = None  # the summary-imports thread (_preimport_summary)
        self.rec = Recorder(stores.mlflow_uri, stores.parent_run_id, stores.experiment_id)
        self.progress = Progress(sw, stores.study, t0, out)
        self.end = StudyEnd(sw.n_trials)  # when this machine's workers are done (pipeline/sweep/study_end.py)
        self.last_print, self.ended = 0.0, dict[int, int]()  # last status line; workers to replace
        self.worker_failed = False  # a worker exited with an error of its own (not a signal)

    def budget_left(self) -> int:
        return budget_left(self.stores.study, self.sw.n_trials)

    def run(self) -> int:
        status, by_timeout = "FAILED", False
        try:
            left = self.budget_left()
            self._banner(left)
            # left == 0 with the study short of n_trials: its last trials run elsewhere; wait for them
            if (left > 0 or not self.reached()) and self.stop.signum is None:
                # a resume that raised n_trials: the parent run no longer says the study is complete
                with contextlib.suppress(Exception):
                    self.rec.set_tags({"sweep_complete": "false"})
                for i in range(min(len(self.devices), max(left, 0))):
                    if self.stop.signum is None:  # a signal while the first ones spawned: no more
                        self.workers.spawn(i)
                self.stop.forward()
                self.preimport = _preimport_summary()
                self.supervise()
                # decided as the workers stopped, not after the summary (which may outlast the deadline)
                by_timeout = self.stop.signum is None and not self.reached() and self.timed_out()
            self.progress.update(stopped=self.stop.signum is not None)
            complete = self.reached()
            status = end_status(self.stop.signum, complete)
            self.summarize(complete=complete)
            if by_timeout:
                by_timeout = self._timeout_note()
        finally:
            self.workers.terminate_all()
            with contextlib.suppress(Exception):
                self.rec.close(status)
        if self.stop.signum is not None:
            return 128 + int(self.stop.signum)  # 130 Ctrl-C, 143 SIGTERM
        return 0 if self.reached() or (by_timeout and not self.worker_failed) else 1

    def _timeout_note(self) -> bool:
        """Print the line a sweep its ``timeout`` stopped short ends with (:func:`timeout_note`)."""
        said, ok = timeout_note(self.sw, counts(self.stores.study)["done"], self.progress.done_at_start)
        print(said, file=self.out, flush=True)
        return ok

    def timed_out(self) -> bool:
        """Whether the sweep's ``timeout`` (counted from the command's start) has passed."""
        return bool(self.sw.timeout and time.time() > self.t0 + self.sw.timeout)

    def reached(self) -> bool:
        """Whether the study has its ``n_trials`` COMPLETE + PRUNED trials: trials still running count
        for the asking (:meth:`budget_left`), not for being done."""
        return counts(self.stores.study)["done"] >= self.sw.n_trials

    def _banner(self, left: int) -> None:
        text = banner(self.sw, self.stores, self.devices, self.log_dir, self.progress.done_at_start, left)
        print(text, file=self.out, flush=True)

    def supervise(self) -> None:
        outage = Outage(self.out)  # a store that does not answer for a while: the workers ride it out
        while True:
            self.workers.wait_any(POLL_S)
            if self.stop.signum is not None:
                self.stop.forward()  # a worker spawned as the signal came (a replacement, the first ones)
                self.workers.wait_then_kill()
                return
            if outage.call(self._poll, default=False):
                return

    def _poll(self) -> bool:
        """One round of the stores: replace ended workers, progress; True when this machine is done."""
        self._replace_ended()
        now = time.time()
        if self.progress.update(force=now - self.last_print > FORCE_STATUS_S):
            self.last_print = now
        if self.workers.procs:
            return False
        if self.timed_out() or self.reached():
            return True
        return not (self.end.take_waiting(self) or self.end.held_elsewhere(self))

    def _replace_ended(self) -> None:
        """After a worker crashed reap its trial, and replace one killed by a signal; it stays in ``ended``
        until then (a store that did not answer, :class:`Outage`, left it neither reaped nor replaced)."""
        from pipeline.sweep.owners import reap_stale
        from pipeline.sweep.stores import budget_lock

        s = self.stores
        for i, rc in self.workers.ended().items():
            if rc != 0:
                self.worker_failed = self.worker_failed or not signalled(rc)
                tail = self.workers.log_tail(i)
                print(f"sweep: worker {i} exited with status {rc}\n{tail}", file=self.out, flush=True)
                self.ended[i] = rc
        for i, rc in list(self.ended.items()):
            with budget_lock(s.url, s.storage, self.sw.study):
                reap_stale(s.study, s.url, s.mlflow_uri)
            if self.respawns > 0 and self.stop.signum is None and self.budget_left() > 0 and signalled(rc):
                self.respawns -= 1
                self.workers.spawn(i)
            del self.ended[i]

    def summarize(self, complete: bool) -> None:
        from pipeline.sweep.owners import close_finished_trials_runs, reap_stale
        from pipeline.sweep.stores import budget_lock
        from pipeline.sweep.summary import finalize, print_summary

        s = self.stores
        if self.preimport is not None:
            self.preimport.join()
        with budget_lock(s.url, s.storage, self.sw.study):
            reap_stale(s.study, s.url, s.mlflow_uri)
        with contextlib.suppress(Exception):  # belt and braces: no child run left RUNNING
            close_finished_trials_runs(s.mlflow_uri, s.study)
        print_summary(
            finalize(self.rec, s.study, self.sw, complete=complete),
            self.sw,
            s.mlflow_uri,
            s.experiment,
            self.out,
        )
