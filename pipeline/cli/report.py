"""``python -m pipeline report``: the comparison report of a sweep or an experiment (``make report``).

Light imports only (stdlib + pipeline.config): MLflow, pandas and matplotlib load inside ``command``.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--experiment",
        default=None,
        help="report every run of this MLflow experiment (default: the most recent sweep in any "
        "experiment; with no sweep in the store, the experiment of the most recent training run)",
    )
    p.add_argument(
        "--study",
        default=None,
        help="report the trials of this sweep study (tag study=NAME), in --experiment if given",
    )
    p.add_argument(
        "--store", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    p.add_argument("--out", default=None, help="output folder (default: reports/<study or experiment>/)")
    p.add_argument(
        "--no-log", action="store_true", help="do not log the report as artifacts of the sweep's parent run"
    )


def command(args: argparse.Namespace) -> int:
    from pipeline.report.write import build_report, runs
    from pipeline.schema import ConfigError

    for flag, v in (("--experiment", args.experiment), ("--study", args.study)):
        if v is not None and not v.strip():
            raise ConfigError(flag, "must not be empty")
    res = build_report(
        args.store, experiment=args.experiment, study=args.study, out=args.out, log_to_parent=not args.no_log
    )
    regimes = ", ".join(f"{k} {v}" for k, v in res.regimes.items())
    gone = f" ({res.abandoned} left RUNNING by a process that is gone)" if res.abandoned else ""
    killed = f"; {runs(res.killed, 'killed')} left out{gone}" if res.killed else ""
    running = f"; {runs(res.running)} still running: a partial report" if res.running else ""
    print(f"report '{res.name}': {runs(res.n_runs)} ({regimes}){killed}{running}")
    print(f"  {res.files['report.html']}")
    print(f"  {res.files['report.md']}  {res.files['comparison.csv']}  {res.files['summary.csv']}")
    if res.parent_run_id and not args.no_log:
        print(f"  logged to the sweep's parent run {res.parent_run_id} under report/")
    return 0
