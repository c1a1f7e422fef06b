"""Store URLs, parsed in one place: the default MLflow store, PostgreSQL's driver, sqlite files, the
Optuna storage of a sweep, and URLs shown without credentials (README, "Stores"); and names made into
file names (:func:`file_name`).

Stdlib only at import: the CLI validates a URL before anything heavy is imported (the libpq bounds read a
PostgreSQL URL with SQLAlchemy's parser, imported as a store is about to be opened).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipeline.schema import ConfigError

DEFAULT_URI = (
    "sqlite:///mlflow.db"  # MLflow's store when neither tracking.uri nor $MLFLOW_TRACKING_URI is set
)
SQLITE = "sqlite:///"
# What an Optuna storage URL may start with (RDB storages); anything without "://" is a journal file path.
STORAGE_SCHEMES = ("journal", "sqlite", "postgresql", "postgres", "mysql")
RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql")


FILE_NAME_MAX = 100  # bytes: a folder named after a study or an experiment (NAME_MAX is 255)


def file_name(name: str, limit: int = FILE_NAME_MAX) -> str:
    """``name`` as one path component of at most ``limit`` bytes: as it is when it fits (so the folders
    of existing studies keep their names), else its first bytes, ``-`` and 12 hex digits of its SHA-1
    (distinct names stay distinct). A study on a database server may have 512 characters and an
    experiment 500, and their folders (``optuna/logs/<study>``, ``reports/<name>``) failed with "File
    name too long"."""
    raw = name.encode()
    if len(raw) <= limit:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:12]
    head = raw[: limit - len(digest) - 1].decode(errors="ignore")  # never half a UTF-8 character
    return f"{head}-{digest}"


def with_pg_driver(url: str) -> str:
    """``postgresql://`` -> ``postgresql+psycopg2://``: SQLAlchemy 2.1 maps a bare ``postgresql://`` to
    psycopg 3, which we do not install; psycopg2 is our PostgreSQL driver (Optuna and MLflow stores)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


# A PostgreSQL server behind a network cut (packets dropped, not refused) left a worker blocked in libpq
# for minutes with no word, past the 10-minute outage limit and deaf to SIGTERM (tests/test_sweep_postgres.py:
# a connect to a server that never answers was still blocked when killed at 25 s). libpq's own bounds,
# unless the URL sets them: a connect gives up after PG_CONNECT_TIMEOUT_S, and an open connection whose
# peer stops answering fails after about 30 s (TCP keepalives, tcp_user_timeout; libpq's docs, "Parameter
# Key Words"). Each then reads as a store that did not answer (pipeline.store_errors), which a sweep rides
# out and any other command names in one line. Optuna's engine gets them as connect arguments
# (pipeline.sweep.stores), MLflow's, which takes no engine arguments, in its URL (pipeline.tracking.client).
PG_CONNECT_TIMEOUT_S = 10
_LIBPQ = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
          "tcp_user_timeout": 30_000}  # fmt: skip
_LIBPQ_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg")


def libpq_args(url: str) -> dict[str, int]:
    """The connect arguments a PostgreSQL ``url`` (psycopg2 or psycopg) gets: the bounds above, each unless
    the URL's query sets it (the connect's also unless ``PGCONNECT_TIMEOUT`` is set, which libpq reads
    itself). Empty for other databases and drivers. The URL is read as SQLAlchemy reads it (a password may
    hold a raw ``?`` or ``#``, which a generic URL parser takes for the query: a review), imported here
    only, as a store is about to be opened."""
    if "://" not in url or url.split("://", 1)[0].lower() not in _LIBPQ_SCHEMES:
        return {}
    from sqlalchemy.engine import make_url

    wanted = {"connect_timeout": PG_CONNECT_TIMEOUT_S, **_LIBPQ}
    if "PGCONNECT_TIMEOUT" in os.environ:  # the user's (or a sweep's own, the same 10 s)
        del wanted["connect_timeout"]
    given = make_url(url).query
    return {k: v for k, v in wanted.items() if k not in given}


def with_libpq_bounds(url: str) -> str:
    """``url`` with :func:`libpq_args` added to its query (SQLAlchemy hands a URL's query to the driver as
    connect arguments): the form MLflow's store takes them in, written back by SQLAlchemy (a raw ``?`` in
    the password comes back %-escaped, the same password). Any other URL unchanged."""
    extra = libpq_args(url)
    if not extra:
        return url
    from sqlalchemy.engine import make_url

    u = make_url(url).update_query_dict({k: str(v) for k, v in extra.items()})
    return u.render_as_string(hide_password=False)


def resolve_uri(uri: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else the sqlite file in the working directory."""
    return with_pg_driver(uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)


ENV_URI = "$MLFLOW_TRACKING_URI"


def uri_flag(uri: str | None, flag: str) -> str:
    """What names the MLflow store a command opens, for its messages: ``flag`` (the key or option that
    gives ``uri``), or $MLFLOW_TRACKING_URI when ``uri`` is not given and the environment sets it (an error
    said "point tracking.uri elsewhere" to a user who never set it: a new-user walkthrough)."""
    return ENV_URI if not uri and os.environ.get("MLFLOW_TRACKING_URI") else flag


def sqlite_file(uri: str) -> Path | None:
    """The file behind a ``sqlite:///`` URI (None for an in-memory database or another scheme)."""
    if not uri.startswith(SQLITE):
        return None
    path = uri[len(SQLITE) :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def absolute_uri(uri: str) -> str:
    """sqlite:///mlflow.db -> sqlite:////abs/path/mlflow.db: workers and later readers agree on the file."""
    path = sqlite_file(uri)
    if path is not None and not path.is_absolute():
        return SQLITE + str(path.resolve())
    return uri


def ui_command(uri: str) -> str:
    """The command that serves the MLflow UI over store ``uri`` from the working directory: ``make ui`` in
    this package's own checkout over its default store (what the Makefile's target serves), else the verb
    itself, with ``--store`` unless ``uri`` is the default store here (a sweep run outside the checkout
    printed ``make ui``, which there has no such target: a README audit). A tracking server serves its
    own UI: ``open URL`` (``mlflow ui`` cannot serve a server's store: it failed with a traceback after
    ``ui --store http://...``, the command printed before; a new-user walkthrough)."""
    if is_server(uri):
        return f"open {display_url(uri)}"
    default = absolute_uri(uri) == absolute_uri(DEFAULT_URI)
    here = Path.cwd().resolve()
    if default and here == Path(__file__).resolve().parents[1] and (here / "Makefile").is_file():
        return "make ui"
    # a password stays out of the output (logs, CI): the user puts it back (a review found it printed)
    return "python -m pipeline ui" + ("" if default else f" --store {display_url(uri)}")


def is_server(uri: str) -> bool:
    """An MLflow tracking server's URL (http or https)."""
    return scheme(uri) in ("http", "https")


def display_url(url: str) -> str:
    """The URL without a password (for logs and MLflow params)."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}" if ":" in cred else url
    return url


def scheme(url: str) -> str:
    """``postgresql+psycopg2://...`` -> ``postgresql``; a path -> ``""``."""
    return url.split("://", 1)[0].lower().split("+", 1)[0] if "://" in url else ""


def is_rdb(url: str) -> bool:
    """An Optuna RDB storage URL (else a journal file)."""
    return scheme(url) in RDB_SCHEMES


def check_storage_url(key: str, url: str) -> None:
    """A URL scheme an Optuna storage can be opened with, else a path (a journal file).

    Without it ``mongodb://x/y`` was taken for a journal path and created a local directory ``mongodb:``.
    """
    if "://" in url and scheme(url) not in STORAGE_SCHEMES:
        raise ConfigError(
            key,
            f"unknown storage scheme {url.split('://', 1)[0].lower() + '://'!r} (allowed: a "
            "journal file path, " + ", ".join(f"{s}://" for s in STORAGE_SCHEMES) + ")",
        )
    if not is_rdb(url) and not url.removeprefix("journal://").strip():
        raise ConfigError(key, f"{url!r} names no journal file (journal://PATH or a path names one)")
    check_database_named(key, url, "optuna.db")


def journal_file(url: str) -> Path:
    """The file of a journal storage URL: a path, or ``journal://path``."""
    return Path(url.removeprefix("journal://"))


def study_storage(study: str, storage: str | None) -> str:
    """The Optuna storage URL of a sweep: ``storage`` (driver added), else the journal optuna/<study>.journal."""
    return with_pg_driver(storage or str(Path("optuna") / f"{study}.journal"))


def names_no_database(url: str) -> bool:
    """Whether a database URL names no database or file: ``sqlite://``, ``sqlite:///``,
    ``sqlite:///:memory:`` (an in-memory database that vanishes with the process), ``postgresql://`` or
    ``postgresql://host/`` (libpq would pick the user's own database and MLflow create its tables there)."""
    if scheme(url) == "sqlite":
        return url.startswith("sqlite://") and sqlite_file(url) is None
    if scheme(url) in ("postgresql", "postgres", "mysql"):
        rest = url.split("://", 1)[1].split("?", 1)[0]
        return "/" not in rest or not rest.split("/", 1)[1].strip("/")
    return False


def check_database_named(key: str, url: str, file: str = "mlflow.db") -> None:
    """A database URL must name its database (``file``: the SQLite file the message's example names);
    see :func:`names_no_database`."""
    if names_no_database(url):
        example = f"sqlite:///path/{file}" if scheme(url) == "sqlite" else f"{scheme(url)}://user@host/DBNAME"
        raise ConfigError(key, f"{display_url(url)!r} names no database ({example} names one)")


# The schemes MLflow's own tracking stores take (mlflow.tracking._tracking_service.utils registers them);
# an unknown one failed inside MLflow with its model registry's paragraph (a new-user walkthrough).
MLFLOW_SCHEMES = (
    "sqlite",
    "postgresql",
    "postgres",
    "mysql",
    "mssql",
    "http",
    "https",
    "databricks",
    "databricks-uc",
    "uc",
)


def _plugin_schemes() -> set[str]:
    """Schemes of installed MLflow tracking-store plugins (entry point group ``mlflow.tracking_store``,
    https://mlflow.org/docs/latest/plugins.html)."""
    import importlib.metadata

    return {ep.name for ep in importlib.metadata.entry_points(group="mlflow.tracking_store")}


def check_tracking_uri(key: str, uri: str) -> None:
    """A tracking URI this pipeline supports: not MLflow's file store (``file:...`` or a bare path, which
    MLflow reads as one: deprecated there, and its warning came as a paragraph cut off mid-word), and a
    database URL that names its database (:func:`check_database_named`)."""
    if uri.lower().startswith("file:") or "://" not in uri and not uri.startswith("databricks"):
        raise ConfigError(
            key,
            f"{uri!r} names MLflow's file store (file:... or a bare path), which is not supported; use a "
            "SQLite file (sqlite:///path/mlflow.db), "
            "a database URL or an http:// tracking server",
        )
    kind = scheme(uri)
    if "://" in uri and kind not in MLFLOW_SCHEMES and kind not in _plugin_schemes():
        raise ConfigError(
            key,
            f"{display_url(uri)!r}: MLflow has no tracking store for the scheme {kind!r} (use sqlite:///path/"
            "mlflow.db, a postgresql:// or mysql:// database URL or an http:// tracking server)",
        )
    check_database_named(key, uri)
