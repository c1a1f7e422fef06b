"""The regression suite's process pool: every entry of a suite run, in ``workers`` spawned processes.

:func:`run_all` is what :func:`pipeline.regression.run.run_suite` and the ``--update-baseline`` reruns
(:mod:`pipeline.regression.update`) call; each entry is :func:`pipeline.regression.run.run_entry` in a
pool worker (:func:`_entry_worker`). What the pool promises on faults (README, "Faults and resuming"):
a Ctrl-C or SIGTERM of the suite reaches every worker as a SIGTERM, so each entry's run is closed KILLED
and no queued entry starts; after a kill -9 of the suite the workers notice they are orphaned and do the
same (:func:`_worker_init`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

from pipeline.regression.suite import Entry, Suite, load_suite

Say = Callable[[str], None]

_interrupted = False  # in a pool worker: a Ctrl-C or SIGTERM stopped an entry here; run no more
_busy = False  # in a pool worker: an entry is training (its run open) in the main thread


ORPHAN_POLL_S = 1.0  # how often a pool worker checks that the suite's process is still its parent
ORPHAN_GRACE_S = 60.0  # after its SIGTERM to itself, how long an orphaned worker has to close its run
# After the SIGTERM the suite forwards, how long a worker has to close its run KILLED (a store write may
# wait MLflow's 20 s on a lock) before it is killed: a worker that did not exit (seen once, when a whole
# process group's SIGTERM reached it first) held the suite forever in the pool's shutdown.
KILL_AFTER_S = 60.0


def _worker_init() -> None:
    """A pool worker ignores Ctrl-C: the parent, which gets it too, forwards a SIGTERM to every worker
    (:func:`run_all`), so a worker between entries never dies with a KeyboardInterrupt traceback.

    And it watches its parent: after a kill -9 of the suite's process (no SIGTERM forwarded), the workers
    went on training the entries queued to them, to FINISHED runs under a parent the next ``regress``
    closes KILLED (a chaos walkthrough). An orphaned worker sends itself the SIGTERM the parent would have
    (its entry's run is closed KILLED, no queued entry starts) and exits once no entry trains, or after
    :data:`ORPHAN_GRACE_S` at most. (It waited the whole grace before: with the parent gone, the pool's
    worker loop never returns, and each worker held its memory for another minute.)"""
    import os
    import signal
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)
        end = time.monotonic() + ORPHAN_GRACE_S
        while _busy and time.monotonic() < end:
            time.sleep(0.1)
        os._exit(143)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _entry_worker(
    suite_path: str,
    name: str,
    parent_run_id: str,
    experiment_id: str,
    uri: str | None,
    overrides: tuple[str, ...] = (),
    perturbation: str | None = None,
):
    """Process-pool target (spawn): returns (name, run_id or None, error or None). After an interrupt in
    this worker (its entry's run closed KILLED), an entry already queued to it is not started."""
    from pipeline.regression.run import run_entry

    global _interrupted, _busy
    if _interrupted:
        return name, None, "not run: the suite was interrupted"
    _busy = True
    try:
        return (
            name,
            run_entry(
                load_suite(suite_path),
                name,
                parent_run_id,
                experiment_id,
                uri=uri,
                overrides=overrides,
                perturbation=perturbation,
            ),
            None,
        )
    except Exception as e:  # the run is closed FAILED by train.run; report and let the others go on
        return name, None, f"{type(e).__name__}: {e}"
    except BaseException:  # KeyboardInterrupt, Terminated: the run is closed KILLED by train.run
        _interrupted = True
        raise
    finally:
        _busy = False


def cost(e: Entry) -> float:
    """Rough relative cost (steps x T x H x gates) to start the longest entries first."""
    gates = {"lstm": 4, "gru": 3}.get(e.cfg.model.cell, 1)
    return e.cfg.trainer.max_steps * e.cfg.task.seq_len * e.cfg.model.hidden_size * gates


def _stop_workers(pool) -> None:
    """SIGTERM every worker of ``pool``, wait up to :data:`KILL_AFTER_S` for each to exit, kill the rest.

    A worker whose entry the SIGTERM stopped closes its run KILLED and goes back to the pool's queue for
    more work: the pool's shutdown sends the sentinel that ends it (without it every interrupted suite of
    two or more workers waited the whole ``KILL_AFTER_S``, then killed that worker: measured 60 s). The
    pool's own thread joins its processes meanwhile, so a worker's exit is read from its sentinel, which
    does not depend on which thread reaps it (``is_alive`` after a ``join`` raced that thread and read a
    reaped worker as alive)."""
    import time
    from multiprocessing.connection import wait

    procs = list(getattr(pool, "_processes", {}).values())
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    left = {proc.sentinel: proc for proc in procs}
    deadline = time.monotonic() + KILL_AFTER_S
    while left and (remaining := deadline - time.monotonic()) > 0:
        try:
            ended = wait(list(left), remaining)
        except (OSError, ValueError):  # a sentinel closed: its process was joined and closed
            break
        for sentinel in ended:
            left.pop(sentinel)
    for proc in left.values():
        if proc.exitcode is None:  # its run, left RUNNING, is closed KILLED by the next regress
            print(
                f"regress: a worker (pid {proc.pid}) did not exit {KILL_AFTER_S:.0f} s after its "
                "SIGTERM; killed (a run it left RUNNING is closed KILLED by the next regress)",
                file=sys.stderr,
            )
            with contextlib.suppress(OSError, ValueError):
                proc.kill()


def run_all(
    suite: Suite,
    parent_run_id: str,
    experiment_id: str,
    workers: int = 1,
    uri: str | None = None,
    progress: Say = print,
    entries: list[str] | None = None,
    overrides: tuple[str, ...] = (),
    perturbation: str | None = None,
) -> dict[str, tuple[str | None, str | None]]:
    """Run every entry, or those named in ``entries`` (``workers`` spawned processes, or in-process for 1).

    Returns {name: (run_id, error)}. ``overrides`` and ``perturbation`` go to :func:`run_entry`.
    """
    import time

    out: dict[str, tuple[str | None, str | None]] = {}
    chosen = [e for e in suite.entries if entries is None or e.name in entries]
    order = sorted(chosen, key=cost, reverse=True) if workers > 1 else chosen
    t0, n = time.time(), len(order)
    label = f" ~{perturbation}" if perturbation else ""
    args = (parent_run_id, experiment_id, uri, tuple(overrides), perturbation)

    def done(name, run_id, err):
        out[name] = (run_id, err)
        progress(
            f"  [{len(out)}/{n}] {name}{label}: {'ok' if err is None else 'FAILED: ' + err} "
            f"({time.time() - t0:.0f} s)"
        )

    if workers <= 1:
        for e in order:
            done(*_entry_worker(str(suite.path), e.name, *args))
        return out
    import concurrent.futures as cf
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
        futs = [pool.submit(_entry_worker, str(suite.path), e.name, *args) for e in order]
        try:
            for f in cf.as_completed(futs):
                done(*f.result())
        except BaseException:
            # Ctrl-C or SIGTERM here (or a failure): every worker gets a SIGTERM, so its entry's run is
            # closed KILLED (train.run) and an entry already queued to it is not started; then wait for
            # them, so that none outlives the suite
            _stop_workers(pool)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return out
