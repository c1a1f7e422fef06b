"""``regress --update-baseline``: run the baselined entries again under :data:`PERTURBATIONS`, set each
band from the measured spread, and rewrite the baseline file (README, "Baselines that hold on another
machine"). Refused, with nothing written, when a law is violated in a nominal or a perturbed run.
"""

from __future__ import annotations

from pipeline.regression.baselines import (
    Unbandable,
    baseline_diff,
    baselined,
    load_baseline,
    new_baseline,
    spread_rows,
    write_baseline,
)
from pipeline.regression.judge import format_columns, format_table, judge_entries, judge_perturbed
from pipeline.regression.laws import ERROR, LAW, REGRESSION, EntryResult, Row
from pipeline.regression.pool import Say, run_all
from pipeline.regression.run import PERTURBATIONS, collect, finish_suite_run
from pipeline.regression.suite import Suite


def update_baseline(
    suite: Suite,
    baseline: dict,
    results: dict[str, EntryResult],
    rows: list[Row],
    parent: str,
    exp_id: str,
    uri: str,
    workers: int = 1,
    say: Say = print,
) -> int | None:
    """Run the baselined entries under every perturbation, measure the bands, write the file.

    Returns 1 (nothing written, the parent run closed) when a law is violated or a run failed, nominal
    or perturbed, or an included suite's number is out of its band; else None.
    """
    perturbed: dict[str, dict[str, EntryResult]] = {}
    extra: list[Row] = []
    # An included suite's number out of its band: that suite's own --update-baseline accepts it; this
    # one wrote its file and then exited 1, the code that says refused and untouched (found by a review).
    inherited = tuple(f"{e.name}: " for e in suite.entries if e.baseline_path is not None)

    def refused(r: Row) -> bool:
        return r.verdict in (LAW, ERROR) or (r.verdict == REGRESSION and r.check.startswith(inherited))

    if not any(refused(r) for r in rows):
        try:  # the nominal values alone first: a banded metric not recorded is refused before minutes of reruns
            new_baseline(suite, results)
        except Unbandable as e:
            return _unbandable(suite, parent, rows, e, say)
        perturbed, extra = _run_perturbed(suite, results, parent, exp_id, workers, say)
    broken = [r for r in rows + extra if refused(r)]
    if broken:
        say(format_table(rows + extra))
        say(
            f"\nbaseline NOT written: {len(broken)} law(s) violated, run(s) failed or included suite's "
            "number(s) out of band; a baseline must come from runs that respect the laws, perturbed ones "
            "included, and an included suite's numbers are accepted by that suite's own --update-baseline"
        )
        finish_suite_run(suite, parent, rows + extra)
        return 1
    try:
        values = new_baseline(suite, results, perturbed)
    except Unbandable as e:
        return _unbandable(suite, parent, rows + extra, e, say)
    diff = baseline_diff(load_baseline(suite.baseline_path, whole=False), values)  # the file as it is
    say(format_table(judge_entries(suite, results, {**baseline, **values}) + extra))
    spreads = spread_rows(values)
    if spreads:
        say("\nmeasured spread under the perturbations -> band:")
        say(format_columns(("metric", "spread", "band"), spreads))
    _write(suite, values, diff, parent, exp_id, uri, say)
    return None


def _unbandable(suite: Suite, parent: str, rows: list[Row], e: Unbandable, say: Say) -> int:
    """A banded metric with no finite value to accept: refused as a failing row of the table and of the
    parent run (closed with verdict ``pass`` and no table printed, a dashboard read the refusal as a
    passing suite: a platform-team walkthrough)."""
    row = Row(e.check, "-", "-", "-", ERROR, str(e))  # why; the closing line says what it means
    say(format_table([*rows, row]))
    say(f"\nbaseline NOT written: {e}")
    finish_suite_run(suite, parent, [*rows, row])
    return 1


def _run_perturbed(
    suite: Suite, nominal: dict[str, EntryResult], parent: str, exp_id: str, workers: int, say: Say
) -> tuple[dict[str, dict[str, EntryResult]], list[Row]]:
    """The baselined entries again under each of :data:`PERTURBATIONS`: their results and law rows
    (the laws between entries read an entry not run again from ``nominal``)."""
    names = baselined(suite)
    perturbed, rows = {}, []
    say(f"measuring bands: {len(names)} baselined entries under {', '.join(PERTURBATIONS)}")
    for label, settings in PERTURBATIONS.items():
        ids = run_all(
            suite,
            parent,
            exp_id,
            workers=workers,
            progress=say,
            entries=names,
            overrides=settings,
            perturbation=label,
        )
        perturbed[label] = collect(suite, {n: rid for n, (rid, _) in ids.items()}, parent, perturbation=label)
        rows += judge_perturbed(suite, perturbed[label], label, nominal)
    return perturbed, rows


def _write(suite: Suite, values: dict, diff: list, parent: str, exp_id: str, uri: str, say: Say) -> None:
    """Rewrite the baseline file if a value changed (no date-only diffs to commit) and show the diff."""
    from pipeline.tracking import Recorder

    if diff:
        path = write_baseline(suite, values)
        rec = Recorder(uri, parent, exp_id)
        rec.log_file(path, "suite")
        rec.set_tags({"baseline_updated": "true"})
        say(f"\nbaseline written: {path} ({len(diff)} change(s))")
    else:
        say(f"\nbaseline unchanged: {suite.baseline_path} not rewritten")
    if diff:
        say(format_columns(("metric", "old", "new", "change"), diff))
