"""``python -m pipeline ui``: the MLflow UI over the default store, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import os
import sys

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default 127.0.0.1; anything else exposes an unauthenticated UI)")
    p.add_argument("--store", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")


def ui_command(store: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", host, "--port", str(port)]


def command(args: argparse.Namespace) -> int:
    from .tracking import resolve_uri

    if args.host not in LOOPBACK:
        print(f"warning: binding the MLflow UI to {args.host}: it has no authentication; anyone who can reach "
              "this address can read and delete runs", file=sys.stderr)
    store = resolve_uri(args.store)
    cmd = ui_command(store, args.host, args.port)
    print(f"MLflow UI on http://{args.host}:{args.port} over {store} (Ctrl-C stops)", flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached
