"""``python -m pipeline sweep --config FILE [--workers N] [--storage URL] [dotted.key=value ...]``.

Light imports only (stdlib + pipeline.config): ``--help`` must not pay for torch, Optuna or MLflow.
The sweep file is validated before anything is written; a bad one is a one-line error, exit 2.
Exit status: 0 the study reached n_trials; 1 it did not (workers failed); 130/143 interrupted.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        help="sweep YAML: a path, or the name of a shipped sweep (default, digits, phase, smoke: "
        "configs/sweeps/NAME.yaml)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: the sweep's `workers`; auto = up to 12 per visible GPU and 3/4 "
        "of the cores, else one per CPU core, at most 4)",
    )
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna storage: postgresql://user@host/db (several machines) or a journal file "
        "path (default: the sweep's `storage`, else optuna/<study>.journal)",
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

    return run_sweep(config, args.overrides, workers=args.workers, storage=args.storage)
