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


def raise_terminated(signum: int, frame: FrameType | None) -> None:
    """The SIGTERM handler: raise :class:`Terminated` where the main thread is."""
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (only in the main thread).

    Also restores SIGINT afterwards: Lightning sets it to SIG_IGN when it handles a KeyboardInterrupt,
    which would make a long-lived sweep worker deaf to the next Ctrl-C.
    """
    try:
        old_term = signal.signal(signal.SIGTERM, raise_terminated)
        old_int = signal.getsignal(signal.SIGINT)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
