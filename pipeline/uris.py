"""Store URLs, parsed in one place: the default MLflow store, PostgreSQL's driver, sqlite files, the
Optuna storage of a sweep, and URLs shown without credentials (README, "Stores").

Stdlib only: the CLI validates a URL before anything heavy is imported.
"""

from __future__ import annotations

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


def with_pg_driver(url: str) -> str:
    """``postgresql://`` -> ``postgresql+psycopg2://``: SQLAlchemy 2.1 maps a bare ``postgresql://`` to
    psycopg 3, which we do not install; psycopg2 is our PostgreSQL driver (Optuna and MLflow stores)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


def resolve_uri(uri: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else the sqlite file in the working directory."""
    return with_pg_driver(uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)


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


def journal_file(url: str) -> Path:
    """The file of a journal storage URL: a path, or ``journal://path``."""
    return Path(url.removeprefix("journal://"))


def study_storage(study: str, storage: str | None) -> str:
    """The Optuna storage URL of a sweep: ``storage`` (driver added), else the journal optuna/<study>.journal."""
    return with_pg_driver(storage or str(Path("optuna") / f"{study}.journal"))
