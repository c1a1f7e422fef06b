"""``python -m pipeline sweep --config FILE [--workers N|auto] [--storage URL] [dotted.key=value ...]``.

Light imports only (stdlib + pipeline.config): ``--help`` must not pay for torch, Optuna or MLflow.
The sweep file is validated before anything is written; a bad one is a one-line error, exit 2.
Exit status: 0 the study reached n_trials, or its timeout stopped it short after this command finished a
trial (said); 1 it ended short otherwise (workers failed, or no trial finished before the timeout);
130/143 interrupted.
"""

from __future__ import annotations

import argparse


def _workers(text: str) -> int | str:
    """``--workers``: a count, or ``auto`` (the sweep file's ``workers: auto``)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of workers or auto, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        help="sweep YAML: a path, or the name of a shipped sweep (default, digits, phase, smoke: "
        "configs/sweeps/NAME.yaml)",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default=None,
        help="worker processes (default: the sweep's `workers`; auto = up to 12 per visible GPU and 3/4 "
        "of the cores, else one per CPU core, at most 4)",
    )
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna storage: postgresql://user@host/db (several machines), sqlite:///file.db, "
        "mysql://..., or a journal file path (default: the sweep's `storage`, else optuna/<study>.journal)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides of the sweep file, e.g. n_trials=10 base.trainer.max_steps=200 "
        "space.optim.lr.high=0.1",
    )


def command(args: argparse.Namespace) -> int:
    from pipeline.presets import resolve

    config = resolve(args.config, "sweeps")
    from pipeline.sweep.parent import run_sweep

    overrides, workers = list(args.overrides), args.workers
    if workers == "auto":  # as the sweep file's `workers: auto`, over any workers=N override
        overrides, workers = [*overrides, "workers=auto"], None
    return run_sweep(config, overrides, workers=workers, storage=args.storage)
