"""``python -m pipeline regress --suite FILE [--workers N] [--update-baseline] [--baseline FILE] [--set K=V ...]``.

Runs a regression suite, checks the laws and the accepted baseline, prints the table (check, baseline,
now, band, verdict) and records everything in MLflow (experiment ``regression``: one parent run per
invocation with the table as an artifact and a ``verdict`` tag, one nested run per entry).
Exit status: 0 every check passed; 1 a law was violated, a number left its band, or a run failed;
2 the suite or baseline file is invalid (one line naming the key; nothing written).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--suite",
        required=True,
        help="suite file: a path, or the name of a shipped suite (smoke, nightly, gpu: "
        "configs/regression/NAME.yaml)",
    )
    p.add_argument("--workers", type=int, default=1, help="run entries in N spawned processes (default 1)")
    p.add_argument(
        "--update-baseline",
        action="store_true",
        help="accept this run's numbers: run each baselined entry again under the perturbations "
        "that stand in for another machine, set each band from the measured spread, rewrite "
        "the baseline file and show what changed (refused if a law is violated)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override applied to every entry (repeatable), e.g. "
        "--set model.init_ulp_seed=7 to check the baseline under a perturbation it was not "
        "recorded with",
    )
    p.add_argument(
        "--baseline",
        default=None,
        help="baseline file (default: the suite's `baseline:` key, else <suite>.baseline.yaml)",
    )


def command(args: argparse.Namespace) -> int:
    from pipeline.regression.baselines import check_writable, suite_baseline
    from pipeline.regression.run import check_suite_fits, run_suite
    from pipeline.regression.suite import load_suite, with_baseline_file
    from pipeline.schema import ConfigError

    if args.workers < 1:
        raise ConfigError("--workers", f"must be >= 1, got {args.workers}")
    from pipeline.presets import resolve

    suite = load_suite(resolve(args.suite, "regression", "--suite"))  # validated before anything is written
    overrides = tuple(args.overrides)
    tracking = [
        k for k in (o.split("=", 1)[0].strip() for o in overrides) if k.split(".", 1)[0] == "tracking"
    ]
    if tracking:  # the parent run, the entries' runs and the read-back must share one store and experiment
        raise ConfigError(
            "--set",
            f"{tracking[0]}: where a suite records is the suite's own "
            "(defaults.tracking.uri in the suite file, else $MLFLOW_TRACKING_URI), not an entry override",
        )
    if args.update_baseline and overrides:
        raise ConfigError(
            "--set", "a baseline is recorded from the suite as written: drop --set with --update-baseline"
        )
    if args.baseline is not None:  # `--baseline ""` (a template's unset variable) is refused, not ignored
        suite = with_baseline_file(suite, args.baseline, must_exist=not args.update_baseline)
    baseline = suite_baseline(suite, update=args.update_baseline)
    if args.update_baseline:
        check_writable(suite.baseline_path, "--baseline" if args.baseline is not None else "baseline")
    check_suite_fits(suite, overrides, args.workers, update=args.update_baseline)  # (--set is refused there)

    from pipeline.store_checks import probe_store
    from pipeline.uris import display_url, ui_command

    uri = probe_store(suite.uri, "defaults.tracking.uri")  # a corrupt or unreachable store: one line, exit 2
    # "(none yet)" also for an including suite without a file of its own: an included suite's numbers
    # are not its own
    none_yet = "" if suite.baseline_path.exists() else " (none yet)"
    print(
        f"suite {suite.name}: {len(suite.entries)} entries, baseline {suite.baseline_path}{none_yet}"
        + f", store {display_url(uri)}, workers {args.workers}"
        + (f", overrides {' '.join(overrides)}" if overrides else "")
    )
    from pipeline.signals import terminate_as_exception

    with terminate_as_exception():  # SIGTERM: the parent run and the entries' runs closed KILLED, exit 143
        out = run_suite(
            suite, baseline, uri, workers=args.workers, overrides=overrides, update=args.update_baseline
        )
    if out.verdict is None:
        return 1  # --update-baseline refused: the table and the reason are printed
    failing = [r for r in out.rows if r.failing]
    print(
        f"\n{suite.name}: {len(out.rows)} checks, {len(failing)} failing -> {out.verdict.upper()}"
        + (f"; {out.missing} without a baseline (accept with --update-baseline)" if out.missing else "")
    )
    print(
        f"  recorded: experiment regression, parent run {out.parent_run_id} ({display_url(uri)}; review: {ui_command(uri)})"
    )
    return 0 if out.verdict == "pass" else 1
