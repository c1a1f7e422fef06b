"""Where a run came from, as tags on it (README, "The MLflow record"): the pipeline's own code commit
(``git_commit``), the package versions (``version.<pkg>``) and the context tags MLflow's fluent API
would set (``mlflow.user``, ``mlflow.source.*``, the git commit and branch of the working directory's
repository). Each is read once per process (git once per directory), as MLflow's run-context providers
read theirs. And which process runs it: the owner ``host|pid|process start time|process space``
(:func:`owner_tag`), so that a run whose process on this host is gone (kill -9, OOM) can be told from one still running
(:func:`owner_alive`; the sweep's trials, a regression suite's runs). Stdlib only.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import os
import socket
import string
import subprocess
import sys
from pathlib import Path

from pipeline.names import (
    MLFLOW_GIT_BRANCH,
    MLFLOW_GIT_COMMIT,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
    SOURCE_TYPE_LOCAL,
)


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the checkout holding the package, ``<sha>-dirty`` (``git describe``'s word) when a
    tracked file of the package differs from it: a run or a baseline recorded from modified code claimed
    the clean commit (found by a review). ``unknown`` without a checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here
        )
        sha = out.stdout.strip()
        if not sha or out.returncode != 0:
            return "unknown"
        changed = subprocess.run(
            # no optional locks: a plain status may take .git/index.lock to refresh the index, and a
            # user's own `git commit` meanwhile failed ("index.lock exists"; a review)
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=here,
        )
        return f"{sha}-dirty" if changed.returncode == 0 and changed.stdout.strip() else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _git(args: list[str], cwd: str | Path) -> str | None:
    """``git ARGS`` in ``cwd``: its first output line, or None (not a repository, no commit yet);
    :class:`_GitUnanswered` where git could not start or timed out."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=cwd)
    except (OSError, subprocess.SubprocessError) as e:
        raise _GitUnanswered(str(e)) from e
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    return line or None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        return "unknown"


def _source_name() -> str:
    """What the fluent API records as the source: the program that was run (``sys.argv[0]``), with
    ``python -m pipeline`` spelled so for a module run."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if argv0.endswith(os.path.join("pipeline", "__main__.py")):
        return "python -m pipeline"
    return argv0 or "python"


def context_tags(cwd: str | Path | None = None) -> dict[str, str]:
    """The context tags a fluent-API run would carry (``mlflow.user``, ``mlflow.source.name``,
    ``mlflow.source.type`` = LOCAL), plus ``mlflow.source.git.commit`` / ``.branch`` of the git repository
    holding the working directory, when there is one (README, "The MLflow record"). The pipeline's own
    code version is in :func:`version_tags` (``git_commit``, ``version.rnn-gradient-pipeline``)."""
    where = Path.cwd() if cwd is None else Path(cwd)
    tags = {MLFLOW_USER: _user(), MLFLOW_SOURCE_NAME: _source_name(), MLFLOW_SOURCE_TYPE: SOURCE_TYPE_LOCAL}
    try:
        return {**tags, **_git_tags(str(where.resolve()), tuple(os.environ.get(k) for k in _GIT_ENV))}
    except _GitUnanswered:  # git timed out or could not start: this run goes without, the next one asks again
        return tags


# The variables that change which repository git finds for a directory, or whether it trusts it.
_GIT_ENV = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_COMMON_DIR",
    "GIT_CEILING_DIRECTORIES",
    "GIT_DISCOVERY_ACROSS_FILESYSTEM",
    "GIT_CONFIG_GLOBAL",
    "HOME",
)


class _GitUnanswered(Exception):
    """git did not answer (not installed, timed out): nothing to cache."""


@functools.lru_cache(maxsize=16)
def _git_tags(where: str, env: tuple[str | None, ...]) -> dict[str, str]:
    """The git tags of the repository holding ``where``, read once per process and directory, as MLflow's
    fluent API reads them once per process (its ``GitRunContext`` caches them): two ``git`` processes a run
    were about 4 ms of every trial of a sweep worker (cProfile of a 32-member stack). ``env``: the values
    of :data:`_GIT_ENV`, part of the key. An unanswered call raises, so it is not cached."""
    tags = {}
    commit = _git(["rev-parse", "--verify", "HEAD"], where)
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
        branch = _git(["symbolic-ref", "--short", "-q", "HEAD"], where)  # None: detached HEAD
        if branch:
            tags[MLFLOW_GIT_BRANCH] = branch
    return tags


def version_tags() -> dict[str, str]:
    """Every run's identity tags: the pipeline's code commit (``git_commit``), the package versions
    (``version.<pkg>``) and the fluent-API context tags of :func:`context_tags`."""
    return {"git_commit": git_commit(), **context_tags(), **_package_versions()}


@functools.cache
def _package_versions() -> dict[str, str]:
    """``version.<pkg>`` tags; read once per process (each read parses the package's metadata: 16 ms per
    run of five packages, measured with cProfile in a 32-member stack)."""
    from importlib.metadata import PackageNotFoundError, version

    tags = {}
    for pkg in ("torch", "pytorch-lightning", "mlflow", "optuna", "rnn-gradient-pipeline"):
        with contextlib.suppress(PackageNotFoundError):
            tags[f"version.{pkg}"] = version(pkg)
    return tags


# ------------------------------------------------------------------------------------ the owner process


def _start_time(pid: int) -> str:
    """Process start time in clock ticks since boot (Linux /proc); '' where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


@functools.cache
def _process_space() -> str:
    """Which PID space this process sees: ``<machine>.<boot>.<pid namespace>``, the first 12 hex digits of
    /etc/machine-id (a Linux installation's), the first 8 of the kernel's boot id (a new one each boot)
    and the inode of the PID namespace ('' for each part that cannot be read). A host name alone does not
    name it: two containers with one host name (a pod's host UTS, a runner image's fixed name) or two
    machines with one name share a store, and each read the other's live processes as gone (their PIDs
    are not in its PID space), so a regress closed a running suite's runs KILLED and a sweep's reaper
    would fail a live worker's trials (a platform-team walkthrough, with ``unshare --pid``)."""

    def read(path: str, n: int) -> str:
        try:
            return Path(path).read_text().strip().replace("-", "")[:n]
        except OSError:
            return ""

    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        ns = ""
    return f"{read('/etc/machine-id', 12)}.{read('/proc/sys/kernel/random/boot_id', 8)}.{ns}"


def owner_tag(pid: int | None = None) -> str:
    """``host|pid|process start time|process space`` of ``pid`` (this process by default), which must
    run in this process's PID space."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()}|{pid}|{_start_time(pid)}|{_process_space()}"


def _space_verdict(theirs: str) -> str:
    """``same`` (their PIDs are ours to look up, or a part is unknown on either side: the host name
    decides, as before the space was tagged), ``gone`` (this machine, its machine id known, has booted
    since: every process of that boot is gone) or ``unknown`` (another PID namespace on this kernel, or
    another machine of the same name). Each part is judged on its own: a container without
    /etc/machine-id still tells its PID namespace from another's (a review)."""
    mine, other = _process_space().split("."), theirs.split(".")
    if len(other) != 3 or not other[1] or not mine[1]:
        return "same"
    if other[1] == mine[1]:  # one boot of one kernel: the PID namespace decides
        return "same" if not other[2] or not mine[2] or other[2] == mine[2] else "unknown"
    machine = other[0] == mine[0] and bool(mine[0]) and all(c in string.hexdigits for c in mine[0])
    return "gone" if machine else "unknown"  # "uninitialized" (systemd's placeholder) is no machine id


def owner_alive(tag: str, one_machine: bool = False) -> bool | None:
    """True/False for an owner in this PID space; None where it cannot be told: another host, another PID
    namespace on this kernel (a container), or another machine of the same host name. ``one_machine``
    (a store only one machine can use, the journal): the host name and PID decide, as for a tag of an
    earlier version (``host|pid|start``), so a container restarted under its name (a new PID namespace)
    reaps its own dead trials, which no heartbeat would ever reap there."""
    parts = tag.split("|")
    try:
        host, pid_s, start = parts[:3]
        pid = int(pid_s)
    except ValueError:
        return None
    if len(parts) > 4 or host != socket.gethostname() or pid <= 0:  # os.kill(0 or -1, 0) "succeeds"
        return None
    space = _space_verdict(parts[3]) if len(parts) == 4 and not one_machine else "same"
    if space != "same":
        return False if space == "gone" else None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start and _start_time(pid) not in ("", start):
        return False  # the PID was reused by another process
    st = Path(f"/proc/{pid}/stat")
    return not (st.exists() and ") Z" in st.read_text())  # a zombie (killed, not yet reaped by its parent)
