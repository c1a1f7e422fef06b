"""Judging a suite's runs: law and baseline rows, the verdict, and the tables ``regress`` prints.

Pure functions of the results read back from the store (:func:`pipeline.regression.run.collect`): the
CLI, the DAG and ``--update-baseline`` share them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from pipeline.regression.baselines import baseline_row
from pipeline.regression.laws import EntryResult, Row, run_check
from pipeline.regression.suite import Suite


def judge_entries(suite: Suite, results: dict[str, EntryResult], baseline: dict) -> list[Row]:
    """All rows: each entry's laws, then its baseline metrics, then the comparisons between entries."""
    rows = []
    for e in suite.entries:
        r = results[e.name]
        if r.status != "FINISHED":
            rows.append(Row(f"{e.name}: run", "FINISHED", r.status, "-", "error", r.error or ""))
        rows += [run_check(c, results) for c in e.checks]
        rows += [baseline_row(e.name, m, r, baseline.get(e.name, {}).get(m)) for m in e.bands]
    rows += [run_check(c, results) for c in suite.compare]
    return rows


# The parameters of a law between entries (ratio_of_runs, difference_of_runs) that name its entries.
ENTRY_PARAMS = ("numerator", "denominator", "a", "b")


def judge_perturbed(
    suite: Suite, results: dict[str, EntryResult], label: str, nominal: dict[str, EntryResult] | None = None
) -> list[Row]:
    """The laws of the entries run under perturbation ``label``, rows marked ``~label``: each entry's own,
    and each law between entries (``compare:``) that names one of them, an entry not run again read
    from ``nominal`` (its run did not change).

    A baseline is only accepted if every law also holds under the perturbations: a law that holds on
    one machine's rounding alone would fail on the next machine. The laws between entries were left out
    (a difference read 36.742 under a perturbation against a band of [37.003, 37.023], and the baseline
    was written; found by a review).
    """
    rows = []
    merged = {**(nominal or {}), **results}
    for c in suite.compare:
        names = [c.params[k] for k in ENTRY_PARAMS if k in c.params]
        if any(n in results for n in names) and all(n in merged for n in names):
            row = run_check(c, merged)
            rows.append(replace(row, check=f"~{label}: {row.check}"))
    for e in suite.entries:
        if e.name not in results:
            continue
        r = results[e.name]
        if r.status != "FINISHED":
            rows.append(Row(f"{e.name}~{label}: run", "FINISHED", r.status, "-", "error", r.error or ""))
        for c in e.checks:
            row = run_check(c, results)
            rows.append(replace(row, check=row.check.replace(f"{e.name}: ", f"{e.name}~{label}: ", 1)))
    return rows


def suite_verdict(rows: list[Row]) -> str:
    """The suite's verdict (tag ``verdict``): ``regression`` if any row fails, else ``pass``."""
    return "regression" if any(r.failing for r in rows) else "pass"


def format_table(rows: list[Row]) -> str:
    head = ("check", "baseline", "now", "band", "verdict")
    cells = [head] + [(r.check, r.baseline, r.now, r.band, r.verdict) for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(5)]
    lines = ["  ".join(c[i].ljust(w[i]) for i in range(5)).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    bad = [r for r in rows if r.failing]
    if bad:
        lines += ["", "failures:"] + [f"  {r.verdict}: {r.check}: {r.detail}" for r in bad]
    return "\n".join(lines)


def format_columns(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    """A small indented table (the baseline diff, the measured spreads)."""
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join(
        "  " + "  ".join(r[i].ljust(w[i]) for i in range(len(head))).rstrip()
        for r in [head, tuple("-" * x for x in w), *rows]
    )
