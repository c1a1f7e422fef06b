"""``python -m pipeline regress --suite FILE [--workers N] [--update-baseline] [--baseline FILE] [--set K=V ...]``.

Runs a regression suite, checks the laws and the accepted baseline, prints the table (check, baseline,
now, band, verdict) and records everything in MLflow (experiment ``regression``: one parent run per
invocation with the table as an artifact and a ``verdict`` tag, one nested run per entry).
Exit status: 0 every check passed; 1 a law was violated, a number left its band, or a run failed;
2 the suite or baseline file is invalid (one line naming the key; nothing written).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", required=True, help="suite file, e.g. configs/regression/smoke.yaml")
    p.add_argument("--workers", type=int, default=1, help="run entries in N spawned processes (default 1)")
    p.add_argument("--update-baseline", action="store_true",
                   help="accept this run's numbers: run each baselined entry again under the perturbations "
                        "that stand in for another machine, set each band from the measured spread, rewrite "
                        "the baseline file and show what changed (refused if a law is violated)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every entry (repeatable), e.g. "
                        "--set model.init_ulp_seed=7 to check the baseline under a perturbation it was not "
                        "recorded with")
    p.add_argument("--baseline", default=None,
                   help="baseline file (default: the suite's `baseline:` key, else <suite>.baseline.yaml)")


def _print_diff(rows: list[tuple[str, str, str, str]]) -> None:
    if rows:
        _print_diff_like(("metric", "old", "new", "change"), rows)


def command(args: argparse.Namespace) -> int:
    from pipeline.regression.laws import NO_BASELINE
    from pipeline.regression.run import (
        collect,
        evaluate,
        finish_suite_run,
        format_table,
        load_suite,
        run_all,
        start_suite_run,
        suite_baseline,
        verdict,
        with_overrides,
    )
    from pipeline.schema import ConfigError

    if args.workers < 1:
        raise ConfigError("--workers", f"must be >= 1, got {args.workers}")
    suite = load_suite(args.suite)  # validated before anything is written
    overrides = tuple(args.overrides)
    if args.update_baseline and overrides:
        raise ConfigError("--set", "a baseline is recorded from the suite as written: drop --set with "
                                   "--update-baseline")
    if args.baseline:
        suite.baseline_path = Path(args.baseline)
        if not suite.baseline_path.exists() and not args.update_baseline:
            raise ConfigError("--baseline", f"file not found: {suite.baseline_path}")
    baseline = suite_baseline(suite)
    from pipeline.training.budget import check_fits

    for e in suite.entries:  # every override must give a valid config that fits, before the store is touched
        check_fits(with_overrides(e.cfg, overrides), copies=min(args.workers, len(suite.entries)),
                   what=f"entry {e.name!r} ")

    from pipeline.tracking import Recorder, probe_store

    uri = probe_store(suite.uri, "defaults.tracking.uri")  # a corrupt or unreachable store: one line, exit 2
    print(f"suite {suite.name}: {len(suite.entries)} entries, baseline {suite.baseline_path}"
          + ("" if baseline else " (none yet)") + f", store {uri}, workers {args.workers}"
          + (f", overrides {' '.join(overrides)}" if overrides else ""))
    parent, exp_id = start_suite_run(suite)
    if overrides:
        Recorder(uri, parent, exp_id).set_tags({"overrides": " ".join(overrides)})
    try:
        ids = run_all(suite, parent, exp_id, workers=args.workers, overrides=overrides)
        results = collect(suite, {n: rid for n, (rid, _) in ids.items()}, parent)
        for n, (_, err) in ids.items():
            if err and results[n].error is None:
                results[n].error = err
        rows = evaluate(suite, results, baseline)
        if args.update_baseline:
            code = _update_baseline(args, suite, baseline, results, rows, parent, exp_id, uri)
            if code is not None:
                return code
            rows = evaluate(suite, results, suite_baseline(suite))
        else:
            print(format_table(rows))
    except BaseException as e:
        from pipeline.signals import Terminated
        from pipeline.tracking import client

        killed = isinstance(e, (KeyboardInterrupt, SystemExit, Terminated))
        client(uri).set_terminated(parent, status="KILLED" if killed else "FAILED")
        raise
    v = finish_suite_run(suite, parent, rows)
    failing = [r for r in rows if r.failing]
    missing = sum(r.verdict == NO_BASELINE for r in rows)
    print(f"\n{suite.name}: {len(rows)} checks, {len(failing)} failing -> {v.upper()}"
          + (f"; {missing} without a baseline (accept with --update-baseline)" if missing else ""))
    print(f"  recorded: experiment regression, parent run {parent} ({uri}; review: make ui)")
    return 0 if verdict(rows) == "pass" else 1


def _update_baseline(args, suite, baseline, results, rows, parent, exp_id, uri) -> int | None:
    """Run the baselined entries under every perturbation, measure the bands, write the file.

    Returns 1 (nothing written) when a law is violated or a run failed, nominal or perturbed; else None.
    """
    from pipeline.regression.laws import ERROR, LAW
    from pipeline.regression.run import (
        PERTURBATIONS,
        baseline_diff,
        baselined,
        collect,
        evaluate,
        evaluate_perturbed,
        finish_suite_run,
        format_table,
        load_baseline,
        new_baseline,
        run_all,
        write_baseline,
    )
    from pipeline.tracking import Recorder

    names = baselined(suite)
    perturbed, extra_rows = {}, []
    if not any(r.verdict in (LAW, ERROR) for r in rows):
        print(f"measuring bands: {len(names)} baselined entries under {', '.join(PERTURBATIONS)}")
        for label, settings in PERTURBATIONS.items():
            ids = run_all(suite, parent, exp_id, workers=args.workers, entries=names, overrides=settings,
                          perturbation=label)
            perturbed[label] = collect(suite, {n: rid for n, (rid, _) in ids.items()}, parent,
                                       perturbation=label)
            extra_rows += evaluate_perturbed(suite, perturbed[label], label)
    broken = [r for r in rows + extra_rows if r.verdict in (LAW, ERROR)]
    if broken:
        print(format_table(rows + extra_rows))
        print(f"\nbaseline NOT written: {len(broken)} law(s) violated or run(s) failed; "
              "a baseline must come from runs that respect the laws, perturbed ones included")
        finish_suite_run(suite, parent, rows + extra_rows)
        return 1
    try:
        values = new_baseline(suite, results, perturbed)
    except ValueError as e:
        print(f"\nbaseline NOT written: {e}")
        finish_suite_run(suite, parent, rows)
        return 1
    diff = baseline_diff(load_baseline(suite.baseline_path), values)  # the file as it is, inherited rows too
    print(format_table(evaluate(suite, results, {**baseline, **values}) + extra_rows))
    _print_spreads(values)
    if diff:  # an unchanged baseline is not rewritten (no date-only diffs to commit)
        path = write_baseline(suite, values)
        rec = Recorder(uri, parent, exp_id)
        rec.log_file(path, "suite")
        rec.set_tags({"baseline_updated": "true"})
        print(f"\nbaseline written: {path} ({len(diff)} change(s))")
    else:
        print(f"\nbaseline unchanged: {suite.baseline_path} not rewritten")
    _print_diff(diff)
    return None


def _print_spreads(values: dict) -> None:
    """Where each band came from: the measured spread and the band it gave."""
    from pipeline.regression.laws import fmt

    rows = [(f"{entry}: {metric}", fmt(rec.get("spread")), " or ".join(
        f"±{fmt(rec[k])}" if k == "abs" else f"±{rec[k]:.0%}" for k in ("abs", "rel") if k in rec))
        for entry, metrics in values.items() for metric, rec in metrics.items() if "spread" in rec]
    if rows:
        print("\nmeasured spread under the perturbations -> band:")
        _print_diff_like(("metric", "spread", "band"), rows)


def _print_diff_like(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, tuple("-" * x for x in w), *rows]:
        print("  " + "  ".join(r[i].ljust(w[i]) for i in range(len(head))).rstrip())
