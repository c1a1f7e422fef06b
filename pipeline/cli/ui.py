"""``python -m pipeline ui``: the MLflow UI over the default store, on 127.0.0.1 unless told otherwise.

``mlflow ui`` has no authentication: anyone who can reach the port can read and delete runs. We bind
loopback by default; any other ``--host`` is an explicit choice and prints a warning. Before handing
over to ``mlflow ui`` (exec, so Ctrl-C and signals reach the server directly) we print where the
pipeline's runs are: the runs table of each experiment holding a sweep, the newest first (the UI's
experiment page otherwise opens on its GenAI overview in MLflow 3).
"""

from __future__ import annotations

import argparse
import os
import sys

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_LINKS = 5


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default 127.0.0.1; anything else exposes an unauthenticated UI)",
    )
    p.add_argument(
        "--store", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server worker processes (default 1: one reviewer; mlflow's own default is 4)",
    )


def ui_command(store: str, host: str, port: int, workers: int = 1) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        store,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def base_url(host: str, port: int) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"http://{h}:{port}"


def run_links(store: str, url: str) -> list[str]:
    """``name: URL`` of the runs table of experiments with a sweep (newest first), then of the other
    experiments with runs, at most :data:`MAX_LINKS`; [] when the store cannot be read (the UI still
    starts)."""
    from pipeline.uris import sqlite_file

    path = sqlite_file(store)
    if path is not None and not path.is_file():
        return []  # nothing recorded yet; reading would create the file
    try:
        from mlflow.entities import ViewType

        from pipeline.tracking import client

        c = client(store)
        exps = {e.experiment_id: e.name for e in c.search_experiments(view_type=ViewType.ACTIVE_ONLY)}
        if not exps:
            return []
        sweeps = c.search_runs(
            list(exps),
            "tags.`pipeline.kind` = 'sweep'",
            max_results=50,
            order_by=["attributes.start_time DESC"],
        )
        ids = list(dict.fromkeys(r.info.experiment_id for r in sweeps))
        ids += [
            i
            for i in sorted(exps, key=lambda i: -int(i) if i.isdigit() else 0)
            if i not in ids and c.search_runs([i], max_results=1)
        ]
    except Exception:
        return []
    return [f"{exps[i]}: {url}/#/experiments/{i}/runs" for i in ids[:MAX_LINKS]]


def check_bind(host: str, port: int) -> None:
    """``host:port`` can be listened on: one bind, closed at once; else a ConfigError naming ``--host`` or
    ``--port``. MLflow's server reported a bad host or a busy port in its log and the command exited 0
    (found by a fuzzing review). SO_REUSEADDR is set as the server (uvicorn, gunicorn) sets it on POSIX:
    a port still in TIME_WAIT after the last UI stopped is free for it, and Linux still refuses a port
    another socket listens on. Windows' SO_REUSEADDR would take a busy port over: not set there."""
    import errno
    import socket

    from pipeline.schema import ConfigError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(
            "--host",
            f"cannot resolve {host!r} to an address to listen on ({getattr(e, 'strerror', None) or e})",
        ) from None
    # Every address the name resolves to, as the server's asyncio listener binds them all (``localhost``:
    # ::1 and 127.0.0.1): the first alone passed where ::1 came first and 127.0.0.1's port was busy.
    socks = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == getattr(socket, "AF_INET6", None) and hasattr(socket, "IPV6_V6ONLY"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio: v4 is its own bind
            sock.bind(addr)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                "--port", f"{port} is in use on {host}: stop what listens there or pick another --port"
            ) from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise ConfigError(
                "--port", f"{port} on {host} needs privileges: pick a port above 1023"
            ) from None
        raise ConfigError(
            "--host", f"cannot listen on {host} ({e.strerror or e}): not an address of this machine?"
        ) from None
    finally:
        for sock in socks:
            sock.close()


def command(args: argparse.Namespace) -> int:
    from pipeline.schema import ConfigError

    if not 1 <= args.port <= 65535:
        raise ConfigError("--port", f"must be in 1..65535, got {args.port}")
    if args.workers < 1:
        raise ConfigError("--workers", f"must be >= 1, got {args.workers}")
    if not args.host.strip():
        raise ConfigError("--host", "must not be empty")
    check_bind(args.host, args.port)  # before any store is read: one line, exit 2
    if args.host not in LOOPBACK:
        print(
            f"warning: binding the MLflow UI to {args.host}: it has no authentication; anyone who can reach "
            "this address can read and delete runs",
            file=sys.stderr,
        )
    from pipeline.store_checks import probe_existing_store
    from pipeline.uris import display_url, is_server, resolve_uri, uri_flag

    if is_server(given := resolve_uri(args.store)):  # `mlflow ui` cannot serve it (a traceback, exit 1)
        url, silent = display_url(given), _no_answer(given)
        raise ConfigError(
            uri_flag(args.store, "--store"),
            # it said "open URL" where nothing ran (a new-user walkthrough)
            f"nothing answers at {url} ({silent}): start the MLflow tracking server there, which serves its "
            "own UI at that address"
            if silent
            else f"{url} is an MLflow tracking server, which serves its own UI: open {url}",
        )
    # MLflow would create a store that does not exist and serve it empty: a mistyped --store (or `make ui`
    # before anything ran) read as "no runs" and left a stray file behind (found by a walkthrough)
    store = probe_existing_store(
        args.store, "--store", "run make train or make sweep first, or name the store"
    )
    cmd = ui_command(store, args.host, args.port, args.workers)
    # MLflow 3 also starts a job runner and ~7 huey consumers for its GenAI jobs (judges, evaluation);
    # reviewing runs needs none of them. An explicit MLFLOW_SERVER_ENABLE_JOB_EXECUTION wins.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    url = base_url(args.host, args.port)
    print(f"MLflow UI on {url} over {store} (Ctrl-C stops)", flush=True)
    links = run_links(store, url)
    for line in links:
        print(f"  runs of {line}", flush=True)
    if links:
        print(
            "  filter runs with e.g. tags.regime = 'vanishing'; a sweep's trials are nested under its parent run",
            flush=True,
        )
    os.execv(cmd[0], cmd)
    return 0  # not reached


def _no_answer(url: str) -> str | None:
    """Why nothing answers HTTP at ``url`` (its user and password left out of the request), or None when
    something does, whatever its status."""
    import urllib.error
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # an IPv6 address keeps its brackets
    bare = parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")).geturl()
    try:
        urllib.request.urlopen(bare, timeout=3).close()
    except urllib.error.HTTPError:
        return None  # an answer: 401, 404, ...
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return str(getattr(reason, "strerror", None) or reason)
    return None
