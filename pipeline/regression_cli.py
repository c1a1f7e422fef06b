"""``python -m pipeline regress --suite FILE [--workers N] [--update-baseline] [--baseline FILE]``.

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
                   help="accept this run's numbers: rewrite the baseline file and show what changed "
                        "(refused if a law is violated)")
    p.add_argument("--baseline", default=None,
                   help="baseline file (default: the suite's `baseline:` key, else <suite>.baseline.yaml)")


def _print_diff(rows: list[tuple[str, str, str, str]]) -> None:
    if not rows:
        return
    head = ("metric", "old", "new", "change")
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for r in [head, tuple("-" * x for x in w), *rows]:
        print("  " + "  ".join(r[i].ljust(w[i]) for i in range(4)).rstrip())


def command(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .laws import ERROR, LAW, NO_BASELINE
    from .regression import (
        baseline_diff,
        collect,
        evaluate,
        finish_suite_run,
        format_table,
        load_baseline,
        load_suite,
        new_baseline,
        run_all,
        start_suite_run,
        verdict,
        write_baseline,
    )

    if args.workers < 1:
        raise ConfigError("--workers", f"must be >= 1, got {args.workers}")
    suite = load_suite(args.suite)  # validated before anything is written
    if args.baseline:
        suite.baseline_path = Path(args.baseline)
        if not suite.baseline_path.exists() and not args.update_baseline:
            raise ConfigError("--baseline", f"file not found: {suite.baseline_path}")
    baseline = load_baseline(suite.baseline_path)
    from .budget import check_fits

    for e in suite.entries:  # every entry must fit in memory, before the store is touched
        check_fits(e.cfg, copies=min(args.workers, len(suite.entries)), what=f"entry {e.name!r} ")

    from .tracking import Recorder, probe_store

    uri = probe_store(suite.uri, "defaults.tracking.uri")  # a corrupt or unreachable store: one line, exit 2
    print(f"suite {suite.name}: {len(suite.entries)} entries, baseline {suite.baseline_path}"
          + ("" if baseline else " (none yet)") + f", store {uri}, workers {args.workers}")
    parent, exp_id = start_suite_run(suite)
    try:
        ids = run_all(suite, parent, exp_id, workers=args.workers)
        results = collect(suite, {n: rid for n, (rid, _) in ids.items()}, parent)
        for n, (_, err) in ids.items():
            if err and results[n].error is None:
                results[n].error = err
        rows = evaluate(suite, results, baseline)
        if args.update_baseline:
            broken = [r for r in rows if r.verdict in (LAW, ERROR)]
            if broken:
                print(format_table(rows))
                print(f"\nbaseline NOT written: {len(broken)} law(s) violated or run(s) failed; "
                      "a baseline must come from a run that respects the laws")
                finish_suite_run(suite, parent, rows)
                return 1
            values = new_baseline(suite, results)
            diff = baseline_diff(baseline, values)
            rows = evaluate(suite, results, values)
            print(format_table(rows))
            if diff:  # an unchanged baseline is not rewritten (no date-only diffs to commit)
                path = write_baseline(suite, values)
                rec = Recorder(uri, parent, exp_id)
                rec.log_file(path, "suite")
                rec.set_tags({"baseline_updated": "true"})
                print(f"\nbaseline written: {path} ({len(diff)} change(s))")
            else:
                print(f"\nbaseline unchanged: {suite.baseline_path} not rewritten")
            _print_diff(diff)
        else:
            print(format_table(rows))
    except BaseException as e:
        from .tracking import client
        from .train import Terminated

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
