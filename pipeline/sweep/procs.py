"""Worker processes forked from a forkserver that imported torch, Lightning, MLflow and Optuna once.

A fresh interpreter per worker spends about 5 s of CPU importing torch and Lightning before its first
trial; on 2 cores two workers doing that side by side, next to the parent creating the stores, delay the
sweep's first trial by about 10 s. Forking from a preloaded forkserver (``multiprocessing``'s, a clean
process started by the sweep, not a fork of the parent with its open store connections) pays the
import once. Each worker is still its own session (signals from the terminal reach only the parent),
writes to its own log file, and is watched like a ``subprocess.Popen``: :class:`WorkerProcess` gives
the parent the same ``poll``/``returncode``/``send_signal``/``kill``/``wait`` it used before.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from typing import Any

_CTX: Any = None
FORKSERVER_OF = "PIPELINE_FORKSERVER_OF"  # the sweep parent's pid, read by pipeline.sweep.preload
LOST_FORKSERVER = 255  # what multiprocessing reports for a forked child once its forkserver is gone


def context():
    """The forkserver context, preloading the worker module (and with it torch and Lightning)."""
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["pipeline.sweep.preload"])
    return _CTX


PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37  # <linux/prctl.h>
_subreaper_before = 0


def become_subreaper(on: bool = True) -> bool:
    """Linux: make this process, the sweep's parent, the reaper of its orphaned descendants
    (``prctl(PR_SET_CHILD_SUBREAPER)``, Linux 3.4+, man 2 prctl). A worker whose forkserver died is then
    re-parented to the sweep's parent rather than to init, and :meth:`WorkerProcess.poll` reads its real
    exit status. Before, such a worker read 255 whatever it did: one killed with kill -9 afterwards was
    not replaced, and the sweep ended short of ``n_trials`` (tests/test_sweep.py,
    ``test_a_worker_killed_after_its_forkserver_is_replaced_and_the_sweep_ends_at_n_trials``). ``on=False``
    when the sweep ends puts back what the process was: one that runs sweeps in-process would collect
    orphans' zombies after them.
    False where unsupported."""
    global _subreaper_before
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if on:  # what the process was before, put back after (it may have been one already)
            flag = ctypes.c_int(0)
            libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)
            _subreaper_before = flag.value
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else _subreaper_before, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def prestart() -> None:
    """Start the forkserver now (it imports while the parent creates the stores). CPU workers run one
    intra-op thread: the forkserver must see that before it imports torch."""
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", FORKSERVER_OF: str(os.getpid())})
    become_subreaper()
    context()
    from multiprocessing import forkserver

    forkserver.ensure_running()


def stop() -> None:
    """Stop the forkserver :func:`prestart` started (the sweep failed before any worker forked). Left
    alone it lived on for its imports (about 30 s, parent 1), writing to the finished command's stderr.
    A no-op when none runs."""
    from multiprocessing import forkserver

    server: Any = forkserver._forkserver  # multiprocessing has no public way to stop it
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None:
        return
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)  # it may be importing for seconds yet: no reason to wait for that
    with contextlib.suppress(OSError):
        server._stop()  # closes its "alive" pipe, reaps it, removes its socket


def _entry(spec_json: str, log_path: str, env: dict[str, str]) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the forkserver ignores it (pipeline.sweep.preload)
    # ... and blocks it: one forwarded since the fork was kept pending, and ends this worker here, before
    # it asks any trial (the parent, told -15 after its own stop signal, replaces no worker)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.setsid()  # its own session and process group, as Popen(start_new_session=True) gave
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from pipeline.sweep.worker import main

    code = main([spec_json])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown (seconds of torch/Lightning finalizers); logs are flushed


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie): /proc where there is one, else signal 0."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class WorkerProcess:
    """A forked worker with the part of ``subprocess.Popen``'s interface the sweep parent uses.

    Its exit status comes from the forkserver, which forked it and reaps it. If the forkserver dies first
    (a SIGKILL to it alone: it ignores SIGTERM, so that a SIGTERM to the sweep's process group, as
    ``timeout`` and service managers send, leaves it to go with the parent), multiprocessing reports 255
    for every worker at once while they still run. The worker, re-parented to the sweep's parent (its
    subreaper, :func:`become_subreaper`), is then reaped here with its own status; where the parent is
    not its subreaper it is watched by its pid until it is gone, and its status is 255."""

    _code: int | None = None  # the status read by waitpid once its forkserver was gone

    def __init__(self, spec_json: str, log_path: str, env: dict[str, str]):
        self.proc = context().Process(target=_entry, args=(spec_json, log_path, env), daemon=False)
        self.proc.start()
        self.pid = self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.poll()  # negative: killed by that signal, as Popen reports it

    def poll(self) -> int | None:
        code = self.proc.exitcode
        if code != LOST_FORKSERVER or self._code is not None:
            return code if self._code is None else self._code
        try:  # the forkserver is gone (or reaped this worker's own exit 255)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # not this process's child: no subreaper, or not yet re-parented
            return None if _running(self.pid) else code
        if pid == 0:
            return None
        self._code = os.waitstatus_to_exitcode(status)
        return self._code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        self.proc.join(timeout)
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired("sweep worker", timeout or 0)
            time.sleep(0.1)
        return self.poll()
