"""Comparison report: MLflow -> pandas -> tables, phase diagram, profiles -> HTML, Markdown, CSV.

``build_report(uri, experiment=..., study=..., out=...)`` reads the target's runs in bulk
(:mod:`pipeline.report.data`), draws the figures (:mod:`pipeline.report.figures`) and writes, under
``reports/<name>/``:

* ``report.html``: self-contained (inline CSS, figures as base64 PNG, no external JS/CSS);
* ``report.md`` with the PNG files beside it;
* ``comparison.csv`` (one row per run, full precision) and ``summary.csv`` (one row per
  (task, cell, init, g, lr, clip, settings), aggregated over seeds).

The files written are also logged as artifacts (``report/``) of the sweep's parent run, when there is one.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.names import DIVERGED, EXPLODING, HEALTHY, VANISHING
from pipeline.report import data as rd

SHOWN = [
    "task",
    "cell",
    "init",
    "init_scale",
    "lr",
    "clip",
    "settings",
    "val_loss_ratio",
    "val_accuracy",
    "solved",
    "regime",
    "regime_reason",
    "log10_ratio",
    "decay_rate",
    "clip_rate",
    "diverged_step",
    "pruned",
    "steps",
    "regime_init",
    "max_norm_preclip",
    "seed",
    "status",
    "run_name",
]
HEADERS = {
    "init_scale": "g",
    "val_loss_ratio": "val loss / baseline",
    "val_accuracy": "val accuracy",
    "median_val_accuracy": "median val accuracy",
    "log10_ratio": "log10 ratio",
    "decay_rate": "decay rate (ln/step)",
    "clip_rate": "clip rate",
    "diverged_step": "diverged step",
    "regime_init": "regime at init",
    "regime_reason": "verdict rule",
    "max_norm_preclip": "max norm (pre-clip)",
    "run_name": "run",
}


@dataclass
class ReportResult:
    name: str
    out: Path
    files: dict[str, Path] = field(default_factory=dict)
    n_runs: int = 0
    killed: int = 0  # KILLED runs left out, and RUNNING ones whose process is gone
    abandoned: int = 0  # of ``killed``: still RUNNING in the store, their process on this host gone
    running: int = 0  # runs still RUNNING when the report read the store: a partial report
    regimes: dict[str, int] = field(default_factory=dict)
    parent_run_id: str | None = None
    table: Any = None


def _regime_now(table, missing: str):
    """Each run's regime as counted: ``running`` for a run still RUNNING, whatever its regime tag says so
    far (as the figures draw it; it was counted under that tag beside "N runs still running": a
    walkthrough), ``missing`` for a run without one."""
    regime = table["regime"].fillna(missing)
    return regime.where(table["status"] != "RUNNING", "running") if "status" in table else regime


def summary_table(table):
    """Per (task, cell, init, g, lr, clip, other settings): runs, solved, regime counts, median loss ratio
    and accuracy; the groups in the order of ``table`` (:func:`pipeline.report.data.comparison_table`'s)."""
    import pandas as pd

    # Each group's numbers at once (groupby's size and median; regimes counted in one pass): a loop over
    # the groups, four Series operations each, took 6.1 s of a 5,000-run report, g and lr being continuous
    # and nearly every run a group of its own (benchmarks/scale_store.py: 6.1 s -> 0.05 s). The same frame
    # as the loop (tests/test_report_scale.py).
    # A run still RUNNING adds to ``runs`` and to its regimes as ``running``, never to ``solved`` or the
    # medians: its latest metrics are those of a model half trained (README, "Compare runs").
    done = table["status"] != "RUNNING" if "status" in table else pd.Series(True, index=table.index)
    final = table.assign(
        val_loss_ratio=table["val_loss_ratio"].where(done), val_accuracy=table["val_accuracy"].where(done)
    )
    groups = final.groupby(rd.KEYS, sort=False, dropna=False)  # the table's order: numbers as numbers
    sizes = groups.size()
    number = groups.ngroup().tolist()  # each run's group, numbered in the order of ``sizes``
    solved, finished = [0] * len(sizes), [0] * len(sizes)
    regimes: list[dict[str, int]] = [{} for _ in range(len(sizes))]
    for g, ok, fin, regime in zip(number, ((table["solved"] == "true") & done).tolist(), done.tolist(),
                                  _regime_now(table, "none").tolist(), strict=True):  # fmt: skip
        solved[g] += ok
        finished[g] += fin
        regimes[g][regime] = regimes[g].get(regime, 0) + 1
    loss = groups["val_loss_ratio"].median().tolist()
    accuracy = groups["val_accuracy"].median().tolist()  # NaN for adding (no accuracy)
    rows = [
        {
            **dict(zip(rd.KEYS, key, strict=True)),
            "runs": int(n),
            # none finished (all RUNNING): no count, as no median ("0" read as "not solved": a review)
            "solved": int(solved[g]) if finished[g] else None,
            "regimes": ", ".join(f"{k} {v}" for k, v in sorted(regimes[g].items())),
            "median_val_loss_ratio": loss[g],
            "median_val_accuracy": accuracy[g],
        }
        for g, (key, n) in enumerate(sizes.items())
    ]
    frame = pd.DataFrame(rows)
    return frame.astype({"solved": "Int64"}) if rows else frame  # NA where none finished; "2", not "2.0"


def fmt(v: Any, col: str = "") -> str:
    """Display format (tables in HTML/Markdown); the CSV keeps MLflow's values at full precision."""
    if v is None or v is getattr(__import__("pandas"), "NA", None):
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if col in ("init_scale", "lr"):
            return f"{v:g}"
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"
    return str(v)


def _png(fig) -> bytes:
    from pipeline.plots import DPI, plt

    buf = io.BytesIO()
    # bbox_inches="tight": whatever a figure-level title or legend needs is kept, never cut at the edge
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def figures(data: rd.ReportData) -> list[tuple[str, str, bytes]]:
    """(file name, caption, png bytes), per task: phase diagram, profiles, gradient norms."""
    from pipeline.report import figures as rr

    out = []
    tasks = sorted(t for t in data.table["task"].dropna().unique())
    for task in tasks:
        suffix = f"_{rd.safe_name(task)}" if len(tasks) > 1 else ""
        fig = rr.phase_diagram(data.table, task)
        out.append((f"phase_diagram{suffix}.png", f"Phase diagram ({task})", _png(fig)))
        fig = rr.profile_panels(data.table, data.profiles, task)
        if fig is not None:
            out.append((f"profiles{suffix}.png", f"Gradient profiles ({task})", _png(fig)))
        fig = rr.grad_norm_panels(data.table, data.grad_norms, task)
        if fig is not None:
            out.append((f"grad_norms{suffix}.png", f"Gradient norms over training ({task})", _png(fig)))
    return out


CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:12px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f2f2f2;position:sticky;top:0}
td.s{text-align:left}img{max-width:100%;border:1px solid #ddd}.meta td{text-align:left}
""" + "".join(
    f".{regime}{{background:{color}}}"
    for regime, color in {
        VANISHING: "#dbe9f6",
        HEALTHY: "#dcf0dc",
        EXPLODING: "#ffe6cc",
        DIVERGED: "#f8d0d0",
    }.items()
)


def _rows(df):
    """The rows of ``df`` as :meth:`pandas.DataFrame.iterrows` gives their values (``df.values``, one row a
    list), without a Series per row: 1.2 s of the HTML and 0.9 s of the Markdown of a 5,000-run report
    (benchmarks/scale_store.py; 0.1 s each now, the same text: tests/test_report_scale.py)."""
    return df.values.tolist() if len(df.columns) else [[] for _ in range(len(df))]


def _html_table(df, cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(HEADERS.get(c, c.replace('_', ' ')))}</th>" for c in cols)
    at = {c: i for i, c in enumerate(df.columns)}
    body = []
    for r in _rows(df):
        tds = []
        for c in cols:
            v = r[at[c]]
            cls = "s" if not isinstance(v, float) else ""
            if c == "regime" and isinstance(v, str):
                cls += f" {v}"
            tds.append(f'<td class="{cls.strip()}">{html.escape(fmt(v, c))}</td>')
        run = f' data-run-id="{html.escape(str(r[at["run_id"]]))}"' if "run_id" in at else ""
        body.append(f"<tr{run}>" + "".join(tds) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _md_table(df, cols: list[str]) -> str:
    lines = [
        "| " + " | ".join(HEADERS.get(c, c.replace("_", " ")) for c in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    at = [{c: i for i, c in enumerate(df.columns)}[c] for c in cols]
    for r in _rows(df):
        lines.append(
            "| " + " | ".join(fmt(r[i], c).replace("|", "\\|") for i, c in zip(at, cols, strict=True)) + " |"
        )
    return "\n".join(lines)


def _abandoned(t: rd.Target) -> str:
    """The header's word on killed runs still RUNNING in the store (their process gone)."""
    if not t.abandoned:
        return ""
    one = t.abandoned == 1
    return (
        f"; {'one' if one else t.abandoned} of them still RUNNING in the store, {'its' if one else 'their'} "
        f"process on this host gone (kill -9): the next `pipeline sweep` of its study (or `regress` of its "
        f"suite) closes {'it' if one else 'them'} KILLED"
    )


def _meta(data: rd.ReportData, n: int, regimes: dict[str, int]) -> list[tuple[str, str]]:
    t = data.target
    meta = [
        ("store", t.uri),
        ("experiment", ", ".join(t.experiment_names)),
        (
            "runs",
            str(n)
            + (
                f" ({runs(t.killed, 'killed')} left out: interrupted, retried or resumable{_abandoned(t)})"
                if t.killed
                else ""
            ),
        ),
        ("regimes", ", ".join(f"{k}: {v}" for k, v in regimes.items()) or "none"),
        *_in_progress(data.table),
        ("generated", time.strftime("%Y-%m-%d %H:%M:%S")),
    ]
    if t.study:
        meta.insert(2, ("study", t.study))
    if t.parent_run_id:
        meta.insert(3, ("sweep parent run", f"{t.parent_run_name} ({t.parent_run_id})"))
    return meta


def runs(n: int, kind: str = "") -> str:
    """'1 run', '2 killed runs': a count of runs as the report and its command line print it."""
    return f"{n} {kind + ' ' if kind else ''}run{'' if n == 1 else 's'}"


def _in_progress(table) -> list[tuple[str, str]]:
    """The header's warning when runs were still RUNNING as the store was read (a sweep in progress)."""
    running = int((table["status"] == "RUNNING").sum())
    if not running:
        return []
    return [("in progress", f"{runs(running)} still RUNNING when this was written: a partial report")]


NOTES = (
    "Values are MLflow's: final metrics (latest step) and tags of each run. val loss / baseline: "
    "1 means the model learned nothing (adding: predict 1, MSE 1/6). val accuracy: the fraction of the "
    "validation set classified correctly (classification tasks only; chance 1/10 for digits, 1/4 for "
    "temporal order, 1/8 for copy's recalled symbols). log10 ratio: log10 ||dL/dh_1|| / ||dL/dh_a|| of the "
    "final float64 profile, a the memory window's first step (T; T+11 for copy). decay rate: ln growth per step "
    "going back (= ln g in the ordered phase). Profiles are shown for at most "
    f"{rd.PROFILE_RUNS_PER_PANEL} representative runs per cell (per (init, g) the best-trained)."
)


# The figures a report draws, per task (figures()): an earlier report's in the same folder are removed.
FIGURE_FILES = ("phase_diagram*.png", "profiles*.png", "grad_norms*.png")


def _earlier_figures(out: Path) -> set[str]:
    """The figures an earlier report in ``out`` drew: the images its ``report.md`` links, by name, of
    the kinds a report draws (a folder without one holds none of ours, whatever its files are called)."""
    import fnmatch
    import re

    md = out / "report.md"
    try:
        text = md.read_text(encoding="utf-8") if md.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return set()
    names = set(re.findall(r"!\[[^\]]*\]\(([^)/\\]+)\)", text))
    return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in FIGURE_FILES)}


def write(data: rd.ReportData, out: Path) -> ReportResult:
    out.mkdir(parents=True, exist_ok=True)
    earlier = _earlier_figures(out)
    table = data.table
    regimes = {k: int(v) for k, v in _regime_now(table, "no verdict").value_counts().sort_index().items()}
    res = ReportResult(
        data.target.name,
        out,
        n_runs=len(table),
        killed=data.target.killed,
        abandoned=data.target.abandoned,
        running=int((table["status"] == "RUNNING").sum()),
        regimes=regimes,
        parent_run_id=data.target.parent_run_id,
        table=table,
    )
    summary = summary_table(table)
    table.to_csv(out / "comparison.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    res.files.update({"comparison.csv": out / "comparison.csv", "summary.csv": out / "summary.csv"})
    figs = figures(data)
    for name, _, png in figs:
        (out / name).write_bytes(png)
        res.files[name] = out / name
    meta = _meta(data, len(table), regimes)
    title = f"RNN gradient report: {data.target.name}"
    sum_cols = rd.KEYS + ["runs", "solved", "regimes", "median_val_loss_ratio", "median_val_accuracy"]

    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        "<table class='meta'>"
        + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in meta)
        + "</table>",
        f"<p>{html.escape(NOTES)}</p>",
    ]
    for name, caption, png in figs:
        b64 = base64.b64encode(png).decode()
        parts.append(
            f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(name)}' "
            f"src='data:image/png;base64,{b64}'>"
        )
    parts.append("<h2>Summary per (task, cell, init, g, lr, clip)</h2>" + _html_table(summary, sum_cols))
    parts.append("<h2>Comparison: one row per run</h2>" + _html_table(table, SHOWN + ["run_id"]))
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts), encoding="utf-8")

    md = [f"# {title}", "", *(f"- **{k}**: {v}" for k, v in meta), "", NOTES, ""]
    for name, caption, _ in figs:
        md += [f"## {caption}", "", f"![{caption}]({name})", ""]
    md += [
        "## Summary per (task, cell, init, g, lr, clip)",
        "",
        _md_table(summary, sum_cols),
        "",
        "## Comparison: one row per run",
        "",
        _md_table(table, SHOWN + ["run_id"]),
        "",
    ]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    res.files.update({"report.html": out / "report.html", "report.md": out / "report.md"})
    for name in earlier - set(res.files):  # an earlier report's figure of a task this one does not cover
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    return res


def check_out(out: Path, flag: str = "--out", note: str = "") -> None:
    """``out`` can be made a folder to write in: it is one, or its nearest existing parent is a writable
    folder; else a ConfigError naming ``flag`` (a regular file on the way was a FileExistsError
    traceback after the store was read; found by a fuzzing review)."""
    import os

    from pipeline.schema import ConfigError
    from pipeline.store_checks import creation_problem, refuses_a_new_file

    if str(out) == "":
        raise ConfigError(flag, "empty path: name an output folder")
    p = out
    while not os.path.exists(p) and p != p.parent:  # os.path.exists: False for a name over the limit
        p = p.parent
    if not p.is_dir():
        what = f"{p} is not a folder" if p == out else f"{out} cannot be created: {p} is not a folder"
        raise ConfigError(flag, what + note)
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(flag, f"{out} cannot be written: {p} is not writable{note}")
    if p != out:  # /proc, /sys: os.access says yes to root; a name over the file system's limit
        why = creation_problem(out)
        if why:
            raise ConfigError(flag, f"{out} cannot be created: {why}{note}")
    elif refused := refuses_a_new_file(out):
        raise ConfigError(flag, f"{out} cannot be written: {out} cannot hold a new file ({refused}){note}")


def build_report(
    uri: str | None = None,
    experiment: str | None = None,
    study: str | None = None,
    out: str | Path | None = None,
    log_to_parent: bool = True,
) -> ReportResult:
    """Resolve, read (bulk), draw, write; log the files written to the sweep's parent run as ``report/``.

    Raises ConfigError (nothing written) for a missing store, an unknown experiment or study, or one
    without runs.
    """
    from pipeline.tracking import client
    from pipeline.uris import resolve_uri, uri_flag

    if out is not None:
        check_out(Path(out))  # before the store is read: nothing read, nothing written
    uri, flag = resolve_uri(uri), uri_flag(uri, "--store")
    data = rd.load(uri, experiment, study, flag)
    target = Path(out) if out is not None else Path("reports") / rd.safe_name(data.target.name)
    if out is None:
        check_out(target, "--out", " (the default folder: pass --out DIR)")
    res = write(data, target)
    if log_to_parent and data.target.parent_run_id:
        c = client(uri)
        for path in res.files.values():  # what this report wrote, not whatever else the folder holds
            c.log_artifact(data.target.parent_run_id, str(path), "report")
    return res
