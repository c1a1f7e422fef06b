"""SIGTERM as an exception, so that every layer unwinds and closes what it opened (README, "Faults").

A run, a trial or a suite closes its MLflow run as KILLED from the code path that ended it; a signal
handler that only set a flag would leave the run RUNNING if the process is then killed. Stdlib only.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType


class Terminated(BaseException):
    """Raised from the SIGTERM handler (a BaseException, like KeyboardInterrupt: ``except Exception``
    blocks in libraries must not swallow it)."""


_pending: int | None = None  # a SIGTERM kept by the handler, until it is raised from ordinary code or handled
_deferring = 0  # depth of the deferred() blocks the main thread is in
_received = 0  # SIGTERMs arrived in this process so far (see received())


def raise_terminated(signum: int, frame: FrameType | None) -> None:
    """The SIGTERM handler: raise :class:`Terminated` where the main thread is, and remember it.

    Python runs a signal handler between any two bytecodes, also inside a ``__del__`` or a weakref
    callback that the garbage collector runs; an exception raised there is printed ("Exception ignored
    in ...") and dropped. Seen: a sweep worker that went on training after SIGTERM until its parent
    killed it 60 s later (a 2-worker sweep stopped at 43 s, twice in five tries). So the signal is also
    kept, and :func:`check_terminated` raises it again where training checks (each step). Inside a
    :func:`deferred` block it is only kept, and raised when the block ends."""
    global _pending, _received
    _pending, _received = signum, _received + 1
    if not _deferring:
        raise Terminated(f"signal {signum}")


def _deliver() -> None:
    """Raise the kept signal from ordinary code (where nothing drops it): it is no longer pending."""
    global _pending
    signum, _pending = _pending, None
    raise Terminated(f"signal {signum}")


def delivered() -> None:
    """The :class:`Terminated` being handled reached its handler: forget the kept signal, so that a
    block deferred while handling it (:func:`deferred`) raises only a signal that arrives after it."""
    global _pending
    _pending = None


def received_count() -> int:
    """How many SIGTERMs arrived in this process so far (through :func:`raise_terminated`): a run or a
    sweep worker notes it when it starts, for :func:`received`."""
    return _received


def received(since: int) -> bool:
    """Whether a SIGTERM arrived after :func:`received_count` was ``since``, delivered or not, handled or
    not. Asked where the signal's exception may have been replaced by another: a store write that the
    signal found waiting on a lock another process held fails after it (MLflow's sqlite busy timeout,
    20 s), and that error, not :class:`Terminated`, unwinds the run or trial. It was stopped, not failed:
    a run is closed KILLED, a sweep worker's trial is interrupted and the worker takes no new one (a
    new-user review saw a trial told FAIL with the lock's error, its params not re-enqueued). Counted
    from a start, so that a process that handled a signal (a notebook) records its later runs as they end."""
    return _received > since


def check_received(since: int) -> None:
    """Raise :class:`Terminated` if a SIGTERM arrived since ``since`` (:func:`received`): where a sweep
    worker would take new work."""
    if received(since):
        raise Terminated("signal 15, received earlier")


def check_terminated() -> None:
    """Raise :class:`Terminated` if SIGTERM arrived: a no-op unless a handler's exception was dropped
    (:func:`raise_terminated`), cheap enough for every training step; inside a :func:`deferred` block, no-op."""
    if _pending is not None and not _deferring:
        _deliver()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A step that must not be cut in two: SIGTERM within the block is kept, and raised as
    :class:`Terminated` when the outermost block ends (unless it ends by an exception, which then
    unwinds as it would have).

    For the few store writes that make a trial's state whole: a sweep worker asks a trial and writes its
    owner (a trial asked but not yet owned is one no handler of this worker can find, left RUNNING until
    a reaper takes it as a dead worker's), and it closes a member's run FINISHED and tells its trial (a
    signal between the two would fail a trial whose run says it finished). Keep the block short: the
    sweep parent waits for its workers to stop, then kills them. Only SIGTERM, through this module's
    handler, is deferred; Ctrl-C (KeyboardInterrupt) is not."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _pending is not None:
        _deliver()


@contextlib.contextmanager
def ctrl_c_not_exit_1() -> Iterator[None]:
    """Around Lightning's ``fit`` / ``validate``: Lightning catches a Ctrl-C there and calls
    ``sys.exit(1)`` (``pytorch_lightning.trainer.call._call_and_handle_interrupt``), which the command
    line would report as exit 1, "a check failed". The KeyboardInterrupt is raised again instead, so
    the run closes KILLED and the command exits 130, as for a Ctrl-C anywhere else."""
    try:
        yield
    except SystemExit as e:
        if isinstance(e.__context__, KeyboardInterrupt) and e.code == 1:
            raise e.__context__ from None
        raise


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (only in the main thread); one that arrived
    but whose exception was dropped (:func:`raise_terminated`) is raised when the block ends.

    Also restores SIGINT afterwards: Lightning sets it to SIG_IGN when it handles a KeyboardInterrupt,
    which would make a long-lived sweep worker deaf to the next Ctrl-C.
    """
    try:
        old_term = signal.signal(signal.SIGTERM, raise_terminated)
        old_int = signal.getsignal(signal.SIGINT)
    except ValueError:  # not the main thread
        yield
        return
    global _pending
    try:
        yield
    except (Terminated, SystemExit, KeyboardInterrupt):
        # delivered: it unwinds through here (Lightning's fit turns SIGTERM into its SIGTERMException, a
        # SystemExit, at the end of the step it arrived in, dropped exception or not)
        _pending = None
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
    if _pending is not None and not _deferring:  # arrived, its exception dropped, no step checked since
        _deliver()  # (within a deferred block, that block's end raises it)
