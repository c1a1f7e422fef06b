"""What a store's error says, read from an exception's chain (its causes and contexts): a store locked by
another process, a full disk, a store that did not answer. The CLI turns each into one line (README,
"Commands"); the sweep's parent rides out a store that does not answer for a while (:class:`Outage`).
Stdlib only: the CLI imports it before anything heavy.
"""

from __future__ import annotations

import errno
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


def first_line(x: BaseException) -> str:
    return str(x).strip().splitlines()[0][:200] if str(x).strip() else type(x).__name__


def in_chain(e: BaseException, says: Callable[[BaseException], bool]) -> str | None:
    """The first line of the deepest error in ``e``'s chain (causes and contexts) for which ``says``:
    the root cause's own words ("database is locked"), not a wrapper's, which SQLAlchemy prefixes with
    notes such as "(raised as a result of Query-invoked autoflush; ...)" (seen with a real 45 s lock)."""
    found = deepest(e, says)
    return None if found is None else first_line(found)


def deepest(e: BaseException, says: Callable[[BaseException], bool]) -> BaseException | None:
    """The deepest error in ``e``'s chain for which ``says``, or None."""
    seen: set[int] = set()
    found = None
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if says(x):
            found = x
        x = x.__cause__ or x.__context__
    return found


def store_locked(e: BaseException) -> str | None:
    """SQLite's "database is locked" anywhere in ``e``'s chain (another process held the store past
    the wait MLflow sets, PRAGMA busy_timeout 20000), as its first line, or None."""
    return in_chain(e, lambda x: "database is locked" in str(x))


def disk_full(e: BaseException) -> str | None:
    """The first line of the error in ``e``'s chain that says the disk is full (ENOSPC, or SQLite's
    "database or disk is full"), or None."""
    return in_chain(
        e,
        lambda x: (
            (isinstance(x, OSError) and x.errno == errno.ENOSPC) or "database or disk is full" in str(x)
        ),
    )


# A database or tracking server that went away: requests' and urllib3's errors (MLflow's REST client) by
# class name, and psycopg2's words under SQLAlchemy and Optuna's RDB storage (a class name such as
# OperationalError would also take a schema error for an outage). None of them is imported here.
_UNREACHABLE = ("ConnectionError", "MaxRetryError", "NewConnectionError")
_UNREACHABLE_WORDS = (
    "connection refused", "could not connect", "server closed the connection", "connection to server",
    "terminating connection", "connection reset", "max retries exceeded", "timeout expired",
    "connection timed out",
)  # fmt: skip


def store_unreachable(e: BaseException) -> str | None:
    """The first line of the deepest error in ``e``'s chain that says a store did not answer (a
    PostgreSQL server or an MLflow tracking server down, restarting or unreachable), or None. A locked or
    full store is not this (:func:`store_locked`, :func:`disk_full`)."""
    if store_locked(e) or disk_full(e) or deepest(e, _answered) is not None:
        return None
    # urllib3's deepest names the host ("HTTPConnection(host=..., port=...): Failed to establish a new
    # connection: [Errno 111] Connection refused"); the OSError under it does not
    x = (
        deepest(e, lambda x: type(x).__name__ in _UNREACHABLE)
        or deepest(e, lambda x: any(w in str(x).lower() for w in _UNREACHABLE_WORDS))
        or deepest(e, lambda x: _PROXY_GONE.search(str(x)) is not None)
    )
    # urllib3's line names the whole URL before its cause: the cause is what says why (a review: cut at 200)
    return None if x is None else first_line(Exception(re.sub(r" with url: \S+", "", str(x).strip())))


# What a proxy or load balancer in front of a tracking server answers while the server restarts or is
# down (Bad Gateway, Service Unavailable, Gateway Timeout): the store did not answer, the proxy did.
_PROXY_GONE = re.compile(r"too many (502|503|504) error responses")


def _answered(x: BaseException) -> bool:
    """A server that answered, with errors: urllib3 also says "Max retries exceeded" after too many 5xx
    responses (ResponseError), which is no outage to wait for (tests/test_store_errors.py: a server
    answering 500), unless a proxy gave them for a server behind it (502, 503, 504)."""
    if _PROXY_GONE.search(str(x)):
        return False
    return type(x).__name__ == "ResponseError" or "error responses" in str(x)


OUTAGE_LIMIT_S = 600.0  # how long the sweep's parent waits for a store that does not answer


class Outage:
    """The sweep's parent reads the stores every second while its workers train (progress, reaping, the
    end). A PostgreSQL failover or a tracking server's restart made one such read raise, and the parent
    died with a traceback, stopping workers that would have ridden it out (a chaos review: a 10-15 s
    PostgreSQL outage ended the sweep). :meth:`call` returns ``default`` instead while a store does not
    answer, says so once, and raises after :data:`OUTAGE_LIMIT_S` of silence. A sweep worker waits for its
    stores with one as well (:mod:`pipeline.sweep.outages`): ``who`` and ``meanwhile`` word its lines."""

    def __init__(
        self,
        out: TextIO | None = None,
        limit_s: float = OUTAGE_LIMIT_S,
        clock=time.monotonic,
        who: str = "sweep",
        meanwhile: str = "the workers go on, asking again",
    ):
        self.out, self.limit_s, self.clock = out or sys.stdout, limit_s, clock
        self.who, self.meanwhile = who, meanwhile
        self.since: float | None = None

    def begin(self, why: str) -> None:
        """The stores stopped answering (``why``: :func:`store_unreachable`'s line): say so, once."""
        if self.since is None:
            self.since = self.clock()
            print(f"{self.who}: a store did not answer ({why}); {self.meanwhile}", file=self.out, flush=True)

    def call(self, fn: Callable[[], Any], default: Any = None) -> Any:
        try:
            value = fn()
        except Exception as e:
            why = store_unreachable(e)
            if why is None:
                raise
            self.begin(why)
            if self.clock() - (self.since or 0.0) > self.limit_s:
                raise
            return default
        if self.since is not None:
            print(
                f"{self.who}: the store answers again (after {self.clock() - self.since:.0f} s)",
                file=self.out,
                flush=True,
            )
            self.since = None
        return value
