"""Command line: ``python -m pipeline VERB ...``.

Verbs live in the stage modules (each exposes ``add_arguments(parser)`` and ``command(args) -> int``)
and are imported only when chosen, so ``--help`` answers without importing torch, Lightning or MLflow.
Exit status: 0 ok, 1 a check failed (regression), 2 bad input (one line naming the key), 130/143
interrupted (SIGINT/SIGTERM; runs closed as KILLED).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pipeline.store_errors import disk_full, store_locked, store_unreachable

MODULE_PROG = "python -m pipeline"

VERBS = {
    "train": ("pipeline.cli.train", "train one configuration and record it in MLflow"),
    "sweep": ("pipeline.cli.sweep", "Optuna sweep over a search space (many workers, resumable)"),
    "report": ("pipeline.cli.report", "comparison report: tables, phase diagram, profiles"),
    "regress": ("pipeline.cli.regress", "run a regression suite against laws and a baseline"),
    "ui": ("pipeline.cli.ui", "serve the MLflow UI over the default store (127.0.0.1)"),
}


def default_prog(argv0: str | None = None) -> str:
    """How the user called us: the console script's name (``rnn-pipeline``), else ``python -m pipeline``."""
    name = os.path.basename(sys.argv[0] if argv0 is None else argv0)
    return MODULE_PROG if not name or name.endswith(".py") or name in ("-c", "-m") else name


def build_parser(prog: str = MODULE_PROG) -> argparse.ArgumentParser:
    from pipeline import __version__

    p = argparse.ArgumentParser(
        prog=prog,
        description="Measure, compare and guard vanishing/exploding gradients in RNNs.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for verb, (mod, help_) in VERBS.items():
        sp = sub.add_parser(verb, help=help_, description=help_)
        sp.set_defaults(_module=mod, _parser=sp)  # _parser: the verb's own usage line in an error
        try:
            importlib.import_module(mod).add_arguments(sp)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            sp.set_defaults(_missing=True)
    return p


# The packages every verb imports (pyproject's dependencies), as imported: found, never imported, here.
NEEDED: tuple[str, ...] = ("torch", "pytorch_lightning", "mlflow", "optuna", "pandas", "numpy", "sqlalchemy")
NEEDED += ("yaml", "matplotlib", "pyarrow")


def missing_dependencies() -> list[str]:
    """The :data:`NEEDED` packages this interpreter cannot import: a verb run with the system's python3
    instead of .venv's died of "No module named 'mlflow'" in a traceback, after ``--help`` had answered
    (a new-user walkthrough)."""
    import importlib.util

    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run one verb; ``prog`` names the program in usage lines (default: the console script's name when
    called as one with ``argv`` None, else ``python -m pipeline``)."""
    from pipeline.schema import ConfigError
    from pipeline.signals import received_count

    signals_before = received_count()  # a signal before this command (a caller's, handled) is not its stop
    parser = build_parser(prog or (default_prog() if argv is None else MODULE_PROG))
    # Overrides may sit between flags (`sweep --config F study=x --workers 1 n_trials=10`): argparse fills
    # a `nargs="*"` positional once and calls the later ones unrecognized (found by a walkthrough).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.verb:
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        print(f"error: verb '{args.verb}' is not available in this build", file=sys.stderr)
        return 2
    missing = missing_dependencies()
    if missing:
        print(
            f"error: this Python ({sys.executable}) lacks {', '.join(missing)}, which the package needs: run the "
            "commands with .venv/bin/python -m pipeline (made by make install; or source .venv/bin/activate), "
            'or pip install the package into this Python (README, "Installing the package")',
            file=sys.stderr,
        )
        return 2
    _quiet_locked_store_logs()
    # MLflow prints "View run ... at: URL" for each run it ends on a tracking server: a sweep's resume
    # printed ten before its header (a new-user walkthrough); the commands print where to review. Yours wins.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        return importlib.import_module(args._module).command(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: runs closed as KILLED", file=sys.stderr)
        return 130
    except BaseException as e:
        from pipeline.signals import Terminated, received

        if isinstance(e, Terminated):
            print("terminated: runs closed as KILLED", file=sys.stderr)
            return 143
        if received(signals_before):  # a SIGTERM whose exception this one replaced (a write found locked)
            print(f"terminated ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): runs "
                  "closed as KILLED where the store could take it", file=sys.stderr)  # fmt: skip
            return 143
        said = store_error(e, args.verb)
        if said is None:
            raise
        print(said[0], file=sys.stderr)
        return said[1]


def store_error(e: BaseException, verb: str) -> tuple[str, int] | None:
    """One line and an exit status for a store's error in ``e``'s chain, else None. Exit 1, but 2 for
    ``regress``, whose 1 says regression (README, "Regression suites")."""
    code = 2 if verb == "regress" else 1
    done = "what was running was closed as FAILED where the store could take it"
    locked = store_locked(e)
    if locked is not None:  # a traceback of about 200 lines (a review held the sqlite store for 40 s)
        return (
            f"error: a store is locked by another process ({locked}: it held the MLflow store or the Optuna "
            f"storage past the wait for it, 20 s for MLflow's); {done}: run the same command again when it "
            "is free",
            code,
        )
    full = disk_full(e)
    if full is not None:  # a traceback of 100-170 lines said no more (a chaos walkthrough, tmpfs)
        return (
            f"error: no space left on the device ({full}); {done.replace('could', 'could still')}: free space "
            "and run the same command again (train: the --resume line above)",
            1,
        )
    gone = store_unreachable(e)
    if gone is not None:  # a PostgreSQL or tracking server gone for longer than a sweep waits: 37-100 lines
        return (
            f"error: a store did not answer ({gone}); {done}, and the next run of the same command closes "
            "what it could not: run it again when the store answers (train: the --resume line above)",
            code,
        )
    return None


def _not_a_locked_store(record) -> bool:
    """A filter for MLflow's ``mlflow.store.db.utils`` logger: it logs a locked SQLite store as an ERROR
    with the whole traceback (about 90 lines) before it raises, and :func:`main` then says the same in
    one line. Only records whose exception is a locked store are dropped."""
    exc = record.exc_info[1] if record.exc_info else None
    return exc is None or store_locked(exc) is None


def _quiet_locked_store_logs() -> None:
    import logging

    db_log = logging.getLogger("mlflow.store.db.utils")
    if _not_a_locked_store not in db_log.filters:
        db_log.addFilter(_not_a_locked_store)


if __name__ == "__main__":
    sys.exit(main())
