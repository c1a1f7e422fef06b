"""Read-only checks that an MLflow store can be opened, before anything is written (README, "Faults and
resuming": a broken store is named, not dumped as a traceback). Each problem raises
:class:`~pipeline.schema.StoreError`: one line naming the store, what is wrong and what to do.
Light imports only (stdlib): the CLI runs them before it imports MLflow.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.metadata
import importlib.util
import os
import re
from pathlib import Path

from pipeline.uris import display_url, is_server, resolve_uri, scheme, sqlite_file, uri_flag

SQLITE_MAGIC = b"SQLite format 3\x00"
# the tables every MLflow store has (since its first migrations) and every train or sweep writes
MLFLOW_TABLES = frozenset(
    {"alembic_version", "experiments", "runs", "metrics", "latest_metrics", "params", "tags"}
)
HTTP_PROBE_TIMEOUT_S = 5.0


PROBLEM_CHARS = 300  # a problem quoted from a library (MLflow's paragraphs) is shortened to this


def shorten(text: str, limit: int = PROBLEM_CHARS) -> str:
    """``text`` on one line, at most ``limit`` characters, cut at a word boundary with an ellipsis (never
    mid-word: MLflow's deprecation paragraph was cut to "...use a database back" with a wrong remedy)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 3]
    if " " in cut:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:.(") + "..."


def store_error(uri: str, problem: str, flag: str, remedy: str = "move it aside", what: str = "mlflow store"):
    from pipeline.schema import StoreError

    return StoreError(f"{what} {uri}", shorten(problem), f"{remedy} or point {flag} elsewhere")


def schema_problem(revision: str | None) -> tuple[str, str] | None:
    """Why the installed MLflow cannot open a store whose schema is at ``revision`` (its
    ``alembic_version``), and what to do; None when this MLflow knows the revision (or its migrations
    cannot be found). A newer MLflow wrote it: MLflow itself says "out-of-date database schema ... run
    'mlflow db upgrade'", which cannot help, as this MLflow has no migration to that revision (README,
    "Supported versions"). Each migration is a file ``<revision>_<name>.py`` of
    ``mlflow/store/db_migrations/versions``, found without importing MLflow; MLflow's revisions are hex,
    so another program's (Optuna's ``v3.2.0.a``) is named as such."""
    spec = importlib.util.find_spec("mlflow") if revision else None
    if spec is None or not spec.submodule_search_locations:
        return None
    if not re.fullmatch(r"[0-9a-f]+", str(revision)):
        return (
            f"its alembic_version {revision!r} is no MLflow schema revision (another program's tables: "
            "Optuna's look like v3.2.0.a)",
            "give MLflow a database of its own",
        )
    for loc in spec.submodule_search_locations:
        versions = Path(loc) / "store" / "db_migrations" / "versions"
        if versions.is_dir():
            if any(versions.glob(f"{glob.escape(str(revision))}_*.py")):
                return None
            return (
                f"its schema (revision {revision}) was written by a newer MLflow than this one "
                f"({importlib.metadata.version('mlflow')})",
                "upgrade MLflow here to the version that wrote it (pip install -U mlflow)",
            )
    return None


def sqlite_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable SQLite database (header, length; https://www.sqlite.org/fileformat.html
    section 1.3), or None. An empty file is a new database."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError as e:
        return f"cannot read {path} ({e.strerror})"
    if size == 0:
        return None
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        return "not a readable database (file is not a database)"
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    pages, counter, valid_for = (int.from_bytes(head[a : a + 4], "big") for a in (28, 24, 92))
    # a write-ahead log beside it (pipeline.tracking.use_wal) holding pages not yet copied back: SQLite
    # replays it on the next open, so the file alone may be shorter than its header says
    if counter == valid_for and pages * page > size and not wal_frames(path):
        return (
            f"not a readable database (truncated: its header says {pages * page} bytes, the file has {size})"
        )
    return None


WAL_MAGIC = (0x377F0682, 0x377F0683)  # https://www.sqlite.org/fileformat.html, section 4.1
WAL_HEADER, WAL_FRAME_HEADER = 32, 24


def wal_frames(path: Path) -> bool:
    """Whether ``<path>-wal`` is a write-ahead log holding at least one frame (its header's magic number
    and room for one frame of its page size), which SQLite replays on the next open."""
    try:
        with open(path.with_name(path.name + "-wal"), "rb") as f:
            head = f.read(WAL_HEADER)
            size = f.seek(0, 2)
    except OSError:
        return False
    if len(head) < WAL_HEADER or int.from_bytes(head[:4], "big") not in WAL_MAGIC:
        return False
    return size >= WAL_HEADER + WAL_FRAME_HEADER + int.from_bytes(head[8:12], "big")


def check_sqlite_store(uri: str, path: Path, flag: str = "tracking.uri") -> None:
    """Read-only checks of an existing MLflow SQLite file: the header, its length, the schema.

    Without them a corrupt file surfaces as a 79-line SQLAlchemy traceback from MLflow's migrations,
    and a SQLite file of another program would be migrated into an MLflow store. An empty file is a new
    store. The header layout is SQLite's (https://www.sqlite.org/fileformat.html, section 1.3).
    """
    problem = sqlite_problem(path)
    if problem:
        raise store_error(uri, problem.replace("readable database", "readable MLflow database"), flag)
    if path.stat().st_size == 0:
        return
    sidecars = [p for p in (path.with_name(path.name + x) for x in ("-wal", "-shm")) if not p.exists()]
    try:
        _check_sqlite_schema(uri, path, flag)
    except BaseException:
        # reading a WAL store creates its -wal and -shm files: a refused store is left as it was found
        for p in sidecars:
            with contextlib.suppress(OSError):
                if p.name.endswith("-shm") or p.stat().st_size == 0:
                    p.unlink()
        raise


def _check_sqlite_schema(uri: str, path: Path, flag: str) -> None:
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=30)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables:
                if "experiments" not in tables or "alembic_version" not in tables:
                    raise store_error(
                        uri, "a SQLite database but not an MLflow store (no experiments table)", flag
                    )
                missing = sorted(MLFLOW_TABLES - tables)
                if missing:  # an alien or damaged schema: MLflow's migrations failed in an 807-line traceback
                    raise store_error(
                        uri,
                        f"{path} is not a whole MLflow store (no table {', '.join(missing)})",
                        flag,
                    )
                con.execute("SELECT count(*) FROM experiments").fetchone()
                con.execute("SELECT count(*) FROM runs").fetchone()
                row = con.execute("SELECT version_num FROM alembic_version").fetchone()
                newer = schema_problem(row[0] if row else None)
                if newer:
                    raise store_error(uri, newer[0], flag, newer[1])
        finally:
            con.close()
    except sqlite3.Error as e:
        if _wal_mode(path) and not os.access(path.parent, os.W_OK):
            raise store_error(
                uri,
                f"in WAL mode in a directory this process cannot write ({e}: SQLite keeps "
                f"{path.name}-shm beside it)",
                flag,
                "make the directory writable, or read a copy converted with "
                "PRAGMA journal_mode=DELETE (README, 'The MLflow record'),",
            ) from None
        raise store_error(uri, f"not a readable MLflow database ({e})", flag) from None


def _wal_mode(path: Path) -> bool:
    """The header's file format versions (bytes 18 and 19) are 2 in WAL mode (fileformat.html, 1.3.3)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    return len(head) == 20 and head[18] == 2


def check_http_store(uri: str, flag: str = "tracking.uri") -> None:
    """An MLflow server must answer within a few seconds (MLflow itself retries for minutes)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HTTP_PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return  # it answered: a server is there (auth and paths are MLflow's business)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise store_error(uri, f"unreachable ({reason})", flag, "start the server") from None


def check_database_store(uri: str, flag: str = "tracking.uri", what: str = "mlflow store") -> None:
    """A PostgreSQL or MySQL store must accept a connection within a few seconds: MLflow retries a
    database that is down or not there (a mistyped name) for about 100 s of warnings before failing.
    ``what``: the store named in the message (an Optuna storage is checked the same way)."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": int(HTTP_PROBE_TIMEOUT_S)})
        with engine.connect() as conn:
            newer = _database_schema_problem(conn) if what == "mlflow store" else None
        engine.dispose()
    except (ValueError, sqlalchemy.exc.ArgumentError) as e:  # the URL itself (its text may hold a password)
        raise store_error(
            display_url(uri),
            f"is not a database URL SQLAlchemy can read ({type(e).__name__}; a password holding @ : / must "
            "be percent-encoded)",
            flag,
            "fix it",
            what,
        ) from None
    except ModuleNotFoundError as e:  # the driver: MLflow would fail the same way, in a traceback
        raise store_error(
            display_url(uri), f"needs the Python package {e.name!r}", flag, "install it", what
        ) from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        lines = [ln.strip() for ln in str(getattr(e, "orig", None) or e).splitlines() if ln.strip()]
        reason = lines[0] if lines else type(e).__name__
        raise store_error(
            display_url(uri),
            f"refused the connection ({reason})",
            flag,
            "check the server, database and user",
            what,
        ) from None
    if newer:
        raise store_error(display_url(uri), newer[0], flag, newer[1], what)


def _database_schema_problem(conn) -> tuple[str, str] | None:
    """:func:`schema_problem` of a database store: None for a new database (no MLflow tables yet)."""
    import sqlalchemy

    if not sqlalchemy.inspect(conn).has_table("alembic_version"):
        return None
    row = conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).first()
    return schema_problem(row[0] if row else None)


def _nearest_existing(path: Path) -> Path:
    """``path`` (absolute) or its nearest parent that exists (``os.path.exists``: False, not an error, for
    a name over the file system's limit)."""
    while not os.path.exists(path) and path != path.parent:
        path = path.parent
    return path


def long_name(path: Path) -> str | None:
    """A name on ``path`` longer than its file system allows (``PC_NAME_MAX`` of the nearest existing
    folder, usually 255 bytes), said in one line, or None. ``Path.exists`` raises ``ENAMETOOLONG`` on
    such a path, so the checks ask this first."""
    full = Path(os.path.abspath(path))
    d = _nearest_existing(full)
    try:
        limit = os.pathconf(d, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    n = next((n for n in full.relative_to(d).parts if len(os.fsencode(n)) > limit), None)
    if n is None:
        return None
    return f"the name {n[:16]}... is {len(os.fsencode(n))} bytes, over the {limit} its file system allows"


def creation_problem(path: Path) -> str | None:
    """Why ``path``, which does not exist yet, cannot be created (with the folders on the way), or None:
    its nearest existing parent must be a writable folder that really takes a new entry, and each new name
    must fit the file system's limit. ``os.access`` answers yes to root on ``/proc`` and ``/sys``, so a
    file is created there and removed at once; a name over the limit (``ENAMETOOLONG``) failed only at
    the write, after the work. Shared by the journal, ``--out`` and ``--update-baseline`` checks (found
    by a new-user review)."""
    d = _nearest_existing(Path(os.path.abspath(path)))
    if not d.is_dir():
        return f"{d} is not a folder"
    if not os.access(d, os.W_OK | os.X_OK):
        return f"{d} is not writable"
    long = long_name(path)
    if long is not None:
        return long
    refused = refuses_a_new_file(d)
    return f"{d} cannot hold a new file ({refused})" if refused else None


def refuses_a_new_file(d: Path) -> str | None:
    """Why the folder ``d`` does not take a new file (the error of creating one, removed at once), or None."""
    import tempfile

    try:  # a name of its own: a probe left by a killed process, or another host's, is not in the way
        fd, probe = tempfile.mkstemp(prefix=".pipeline-probe-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def unwritable(path: Path) -> str | None:
    """Why a SQLite file at ``path`` (existing or new) cannot be written, or None. SQLite writes a journal
    beside the file, so its directory must be writable too. ``os.access`` answers False on a read-only
    mount even for root; a directory it wrongly calls writable (``/proc``) is tried with a file created
    and removed at once. Without this MLflow retried a read-only store for about 60 s."""
    d = Path(os.path.abspath(path)).parent
    if not d.is_dir():
        return f"directory {d} does not exist" if not d.exists() else f"{d} is not a directory"
    if path.is_dir():
        return f"{path} is a directory"
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    if not os.access(d, os.W_OK | os.X_OK):
        return f"directory {d} is not writable (SQLite writes its journal beside the file)"
    refused = refuses_a_new_file(d) if not path.exists() else None
    return f"directory {d} cannot hold a new file ({refused})" if refused else None


def _artifact_root(path: Path) -> Path:
    """Where a new experiment of the sqlite store at ``path`` keeps its artifacts
    (:func:`pipeline.tracking._beside`): ``mlruns/`` of the working directory for a store there, else
    ``mlruns/`` beside the file."""
    d = path.resolve().parent
    return Path.cwd() / "mlruns" if d == Path.cwd().resolve() else d / "mlruns"


def probe_store(uri: str | None, flag: str = "tracking.uri", write: bool = True) -> str:
    """Check that the MLflow store at ``uri`` can be opened, without writing to it; returns the resolved URI.

    Raises :class:`~pipeline.config.StoreError` (one line naming the store and what to do): a file store
    (not supported), a URL naming no database, a corrupt or truncated SQLite file, a SQLite file that is
    not a whole MLflow store, one that cannot be written (``write``: a writer's check; readers pass
    False) or whose artifact root ``mlruns`` is not a directory, a server that does not answer, a
    database that refuses the connection. A missing SQLite file is fine (it becomes a new store).
    """
    from pipeline.uris import check_tracking_uri

    u, flag = resolve_uri(uri), uri_flag(uri, flag)
    default = not uri and not os.environ.get("MLFLOW_TRACKING_URI")
    check_tracking_uri(flag, u)
    path = sqlite_file(u)
    if path is not None:
        long = long_name(path)
        if long:
            raise store_error(u, long, flag, "pick a shorter name")
        if path.is_file():
            check_sqlite_store(u, path, flag)
        elif not path.parent.is_dir():
            raise store_error(u, f"directory {path.parent} does not exist", flag, "create it")
        why = unwritable(path) if write else None
        if why and default:
            from pipeline.schema import StoreError

            raise StoreError(
                f"mlflow store {u}",
                f"the default store (mlflow.db in the working directory): {why}",
                f"run in a writable directory or pick another store with {flag}=sqlite:////DIR/mlflow.db "
                "(or $MLFLOW_TRACKING_URI)",
            )
        if why:
            raise store_error(u, why, flag, "make it writable")
        root = _artifact_root(path)
        if write and root.exists() and not root.is_dir():
            raise store_error(u, f"its artifact root {root} is not a directory", flag, f"move {root} aside")
    elif is_server(u):
        check_http_store(u, flag)
    elif scheme(u) in ("postgresql", "postgres", "mysql"):
        check_database_store(u, flag)
    return u


def probe_existing_store(uri: str | None, flag: str, remedy: str) -> str:
    """:func:`probe_store` for a reader (``report``, ``ui``, ``train --resume``, ``load_run``): a sqlite
    file that does not exist is an error naming ``flag`` (``remedy``: what to do), not a new empty store
    (MLflow would make one to find nothing in); a read-only store is fine. Returns the resolved URI."""
    from pipeline.schema import ConfigError
    from pipeline.uris import check_tracking_uri

    u, flag = resolve_uri(uri), uri_flag(uri, flag)
    check_tracking_uri(flag, u)
    path = sqlite_file(u)
    if path is not None and not path.is_file():
        raise ConfigError(flag, f"no MLflow store at {path} ({remedy})")
    if path is not None and path.stat().st_size == 0:  # sqlite reads it as an empty database: MLflow
        raise ConfigError(flag, f"no MLflow store at {path}: the file is empty ({remedy})")  # would fill it
    return probe_store(u, flag, write=False)
