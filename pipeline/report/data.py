"""Report data: which runs a report covers, read from MLflow in bulk into pandas.

Reading is bulk by design: ONE read of the runs per report, the frame of ``mlflow.search_runs`` (params,
latest metrics and tags as columns) read in pages of 1,000 runs (:mod:`pipeline.report.search`), never
one request per run per metric. Profiles (``diagnostics/bptt_profile.parquet``, every profile pass with
its ``step``) and gradient norms (``diagnostics/grad_norms.parquet``) are fetched with one
``download_artifacts`` of the run's ``diagnostics/`` folder, for at most ``PROFILE_RUNS_PER_PANEL``
representative runs per panel.

Target resolution (``python -m pipeline report``):

* ``--study NAME``: the trials tagged ``study=NAME`` (``pipeline.kind=trial``), in ``--experiment``
  if given, else in any experiment; the most recent sweep parent of that study receives the report.
* ``--experiment NAME``: every run of the experiment except sweep parents and regression suites' parents.
* neither: the most recent sweep parent (``pipeline.kind=sweep``) in any experiment and its study
  (``make sweep`` then ``make report``); if the store holds no sweep, the whole experiment of the most
  recent training run (``make train`` then ``make report``: a run without ``pipeline.kind``, else any
  run but a regression suite's parent), and ``rnn-gradients`` only when the store holds no run at all.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cell_keys import differing_settings, effective_scale, numbers_as_numbers
from pipeline.names import (
    DIVERGED,
    KIND_SWEEP,
    KIND_TRIAL,
    OWNER,
    REGIME,
    ROLE,
    STUDY,
    TRIAL_NUMBER,
    quoted,
)
from pipeline.names import KIND as KIND_TAG
from pipeline.recorded import as_recorded
from pipeline.schema import ConfigError
from pipeline.uris import file_name

DEFAULT_EXPERIMENT = "rnn-gradients"
RECENT_RUNS = 200  # runs read, newest first, to find the most recent training run when there is no sweep
PROFILE_RUNS_PER_PANEL = 4  # representative runs whose artifacts are downloaded, per (task, cell) panel
CLIPPED_PER_PANEL = 2  # ... plus this many clipped runs for the pre/post-clip panel
KIND = f"tags.`{KIND_TAG}`"  # backquoted: the tag key contains a dot

# Comparison table: (column, MLflow column of search_runs, kind). Kinds: tag/param strings, float, int.
# The key columns come first; the table is sorted by them.
KEYS = ["task", "cell", "init", "init_scale", "lr", "clip", "settings"]
COLUMNS: list[tuple[str, str, str]] = [
    ("val_loss_ratio", "metrics.val/loss_ratio", "float"),
    ("val_accuracy", "metrics.val/accuracy", "float"),
    ("solved", "tags.solved", "str"),
    ("regime", f"tags.{REGIME}", "str"),
    ("regime_reason", "tags.regime_reason", "str"),
    ("log10_ratio", "metrics.bptt/log10_ratio", "float"),
    ("decay_rate", "metrics.bptt/decay_rate", "float"),
    ("clip_rate", "metrics.grad/clip_rate", "float"),
    ("diverged_step", "tags.diverged_step", "int"),
    ("val_loss", "metrics.val/loss", "float"),
    ("baseline", "metrics.task/baseline", "float"),
    ("regime_init", "tags.regime_init", "str"),
    ("max_norm_preclip", "metrics.grad/max_norm_preclip", "float"),
    ("steps", "metrics.train/steps", "int"),
    ("pruned", "tags.pruned", "str"),
    ("seq_len", "params.task.seq_len", "int"),
    ("optimizer", "params.optim.name", "str"),
    ("seed", "params.seed", "int"),
    ("trial", f"tags.{TRIAL_NUMBER}", "int"),
    ("status", "status", "str"),
    ("run_name", "tags.mlflow.runName", "str"),
    ("run_id", "run_id", "str"),
]


@dataclass
class Target:
    """What a report covers: resolved before anything is written."""

    name: str  # report name: the study, else the experiment
    uri: str
    experiment_ids: list[str]
    experiment_names: list[str]
    filter_string: str  # passed to the one search_runs
    study: str | None = None
    parent_run_id: str | None = None  # the sweep parent that receives the report as artifacts
    parent_run_name: str | None = None
    killed: int = 0  # KILLED runs left out (load_runs), and runs left RUNNING by a process that is gone
    abandoned: int = 0  # of ``killed``: RUNNING in the store, their process on this host gone (kill -9)


@dataclass
class ReportData:
    target: Target
    runs: Any  # the search_runs frame (one row per run)
    table: Any  # the comparison table (one row per run, sorted by KEYS)
    profiles: dict[str, Any] = field(default_factory=dict)  # run_id -> bptt_profile frame
    grad_norms: dict[str, Any] = field(default_factory=dict)  # run_id -> grad_norms frame


def safe_name(name: str) -> str:
    """A report folder name: letters, digits, ``._-`` only, at most 100 bytes (:func:`pipeline.uris.file_name`)."""
    return file_name(re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "report")


def check_store(uri: str, flag: str = "--store") -> None:
    """A missing sqlite file is an error, not a new empty store (reading must not create one); a corrupt
    file or an unreachable server: one line, exit 2, naming ``flag`` (what gave ``uri``)."""
    from pipeline.store_checks import probe_existing_store

    probe_existing_store(uri, flag, "run `make sweep` or `make train` first, or pass --store URI")


def resolve_target(
    uri: str, experiment: str | None = None, study: str | None = None, flag: str = "--store"
) -> Target:
    """The runs a report covers; raises ConfigError (one line, exit 2) for unknown or empty targets."""
    from mlflow.entities import ViewType

    from pipeline.tracking import client

    check_store(uri, flag)
    c = client(uri)
    exps = list(c.search_experiments(view_type=ViewType.ACTIVE_ONLY))
    by_id = {e.experiment_id: e for e in exps}
    if study is None and experiment is None:
        # default: the most recent sweep in any experiment (each sweep config names its own experiment)
        last = (
            c.search_runs(
                list(by_id),
                f"{KIND} = '{KIND_SWEEP}'",
                max_results=1,
                order_by=["attributes.start_time DESC"],
            )
            if by_id
            else []
        )
        if last:
            study = last[0].data.tags.get(STUDY)
            experiment = by_id[last[0].info.experiment_id].name
        else:
            experiment = _latest_training_experiment(c, by_id)
    if experiment is not None or study is None:
        name = experiment or DEFAULT_EXPERIMENT
        exp = next((e for e in exps if e.name == name), None)
        if exp is None:
            known = ", ".join(sorted(e.name for e in exps)) or "none"
            hint = "" if experiment else "no sweep run in the store and "
            raise ConfigError("--experiment", f"{hint}unknown experiment {name!r} in {uri} (known: {known})")
        scope = [exp]
    else:
        scope = exps
    ids, names = [e.experiment_id for e in scope], [e.name for e in scope]

    if study is not None:
        parents = c.search_runs(
            ids,
            f"{KIND} = '{KIND_SWEEP}' and tags.{STUDY} = {quoted(study)}",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        trial_filter = f"{KIND} = '{KIND_TRIAL}' and tags.{STUDY} = {quoted(study)}"
        if not parents and not c.search_runs(ids, trial_filter, max_results=1):
            raise ConfigError("--study", f"unknown study {study!r} in experiment(s) {', '.join(names)}")
        t = Target(study, uri, ids, names, trial_filter, study=study)
        if parents:
            t.parent_run_id, t.parent_run_name = parents[0].info.run_id, parents[0].info.run_name
            # that sweep's trials only: an earlier sweep of the same study name in this store (its
            # Optuna storage moved aside or deleted, then the sweep run again) has a parent of its own
            t.filter_string += f" and tags.`mlflow.parentRunId` = {quoted(t.parent_run_id)}"
        return t
    # a whole experiment: every run; load_runs drops the sweep parents after the one read
    return Target(names[0], uri, ids, names, "")


def _latest_training_experiment(c, by_id: dict) -> str | None:
    """The experiment of the most recent training run: one without ``pipeline.kind`` (``make train``),
    else the newest run of any kind except a regression suite's parent; None when there are no runs."""
    if not by_id:
        return None
    runs = c.search_runs(list(by_id), "", max_results=RECENT_RUNS, order_by=["attributes.start_time DESC"])
    plain = [r for r in runs if KIND_TAG not in r.data.tags]
    other = [r for r in runs if r.data.tags.get(ROLE) != "suite" and r.data.tags.get(KIND_TAG) != KIND_SWEEP]
    pick = (plain or other or [None])[0]
    return by_id[pick.info.experiment_id].name if pick is not None else None


def load_runs(target: Target):
    """The ONE bulk read: a pandas frame of the target's runs (params, latest metrics, tags), as
    ``mlflow.search_runs`` gives it, read in pages (:func:`pipeline.report.search.search_runs_frame`)."""
    from pipeline.report.search import search_runs_frame

    df = search_runs_frame(
        target.uri, target.experiment_ids, target.filter_string, ["attributes.start_time ASC"]
    )
    df = as_recorded(df)
    kind_col = f"tags.{KIND_TAG}"
    kind = df.get(kind_col)
    if kind is not None:
        df = df[kind.fillna("") != KIND_SWEEP].reset_index(drop=True)
    role = df.get(f"tags.{ROLE}")
    if role is not None:  # a regression suite's parent: no training of its own, an empty row
        df = df[role.fillna("") != "suite"].reset_index(drop=True)
    # A KILLED run was interrupted: a sweep retries its trial from the start (another run, the same
    # params), a killed `train` resumes in the same run. Its partial numbers are no result, and beside
    # the retry they counted one trial twice, half of them with no verdict (found by a walkthrough).
    status = df.get("status")
    if status is not None:
        killed = (status == "KILLED").to_numpy()
        # A run RUNNING in the store whose process on this host is gone (its owner tag, README "The MLflow
        # record"): a sweep worker or regress killed with -9 or by the OOM killer, closed KILLED only by the
        # next resume. It is killed, not "still running" (a walkthrough read a dead sweep as one in progress).
        abandoned = (status == "RUNNING").to_numpy() & _owner_gone(df.get(f"tags.{OWNER}"), len(df))
        target.killed = int((killed | abandoned).sum())
        target.abandoned = int(abandoned.sum())
        df = df[~(killed | abandoned)].reset_index(drop=True)
    if df.empty:
        what = f"study {target.study!r}" if target.study else f"experiment {target.name!r}"
        raise ConfigError(
            "--study" if target.study else "--experiment",
            f"{what} has no runs to report"
            + (f" but {target.killed} killed" if target.killed else "")
            + (f" ({target.abandoned} left RUNNING by a process that is gone)" if target.abandoned else "")
            + (
                " (resume it: run the sweep command that made it again)"
                if target.study and target.killed
                else " (run `make sweep` or `make train` first)"
            ),
        )
    # name only the experiments the runs live in (a study is looked up across all of them)
    found = set(df["experiment_id"])
    target.experiment_names = [
        n for i, n in zip(target.experiment_ids, target.experiment_names, strict=True) if i in found
    ]
    return df


def _owner_gone(owners, n: int):
    """Per run, whether its ``pipeline.owner`` names a process on this host that is gone (False where the
    tag is absent or its process cannot be seen: another host or container)."""
    import numpy as np

    from pipeline.provenance import owner_alive

    if owners is None:
        return np.zeros(n, dtype=bool)
    seen: dict[str, bool] = {}
    for o in set(owners.dropna()):
        seen[o] = isinstance(o, str) and owner_alive(o) is False
    return np.array([seen.get(o, False) if isinstance(o, str) else False for o in owners], dtype=bool)


def _num(v: Any, kind: str) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if kind == "float":
        return float(v)
    if kind == "int":
        try:
            return int(float(v))
        except (TypeError, ValueError):
            return None
    return str(v)


def _clip(mode: Any, threshold: Any) -> str:
    if mode in (None, "none") or (isinstance(mode, float) and math.isnan(mode)):
        return "none"
    return f"{mode} {float(threshold):g}" if threshold is not None else str(mode)


def _task(tag: Any, name: Any, permute: Any) -> str | None:
    """The task column: the ``task`` tag (else the param), ``digits (permuted)`` for ``task.permute``
    runs, so that the permuted and the plain task get their own phase diagram and panels."""
    task = _num(tag, "str") or _num(name, "str")
    return f"{task} (permuted)" if task is not None and _num(permute, "str") == "True" else task


def _settings(runs, tasks: list) -> list[str]:
    """Per run, the settings in which the runs of its task differ (:func:`pipeline.cell_keys.differing_settings`):
    over the whole report, one digits run gave every copy run's label its T, batch and sizes (a walkthrough)."""
    cols = {c[7:]: runs[c].tolist() for c in runs.columns if c.startswith("params.")}
    params = [{k: v[i] for k, v in cols.items()} for i in range(len(runs))]
    by_task: dict[Any, list[int]] = {}
    for i, task in enumerate(tasks):
        by_task.setdefault(task, []).append(i)
    out = [""] * len(runs)
    for idx in by_task.values():
        for i, setting in zip(idx, differing_settings([params[i] for i in idx]), strict=True):
            out[i] = setting
    return out


def comparison_table(runs):
    """One row per run, values exactly as MLflow holds them (but g: the scale W_hh was drawn at, None
    where it has none, :func:`pipeline.cell_keys.effective_scale`; and ``settings``, in which the runs
    of its task differ), sorted by (task, cell, init, g, lr, clip, settings)."""
    import pandas as pd

    # Columns as lists, read by index: a Series' .iloc per value and column took 4.7 s of a 5,000-run
    # report, and the settings' 11.5 s (cProfile; benchmarks/report_scale.py)
    cols: dict[str, list] = {}

    def col(name: str) -> list:
        if name not in cols:
            cols[name] = runs[name].tolist() if name in runs else [None] * len(runs)
        return cols[name]

    rows = []
    for i in range(len(runs)):
        r = {
            "task": _task(col("tags.task")[i], col("params.task.name")[i], col("params.task.permute")[i]),
            "cell": _num(col("tags.cell")[i], "str") or _num(col("params.model.cell")[i], "str"),
            "init": _num(col("tags.init")[i], "str") or _num(col("params.model.init")[i], "str"),
            "init_scale": _num(col("params.model.init_scale")[i], "float"),
            "lr": _num(col("params.optim.lr")[i], "float"),
            "clip": _clip(col("params.clip.mode")[i], col("params.clip.threshold")[i]),
        }
        for name, src, kind in COLUMNS:
            r[name] = _num(col(src)[i], kind)
        if r["cell"] and r["init"] and r["init_scale"] is not None:  # the g W_hh was drawn at; None: no g
            r["init_scale"] = effective_scale(r["cell"], r["init"], r["init_scale"])
        rows.append(r)
    for r, setting in zip(rows, _settings(runs, [r["task"] for r in rows]), strict=True):
        r["settings"] = setting
    table = pd.DataFrame(rows, columns=KEYS + [c[0] for c in COLUMNS])
    for c in ("init_scale", "lr", *(n for n, _, k in COLUMNS if k == "float")):
        table[c] = table[c].astype(float)
    for c in (n for n, _, k in COLUMNS if k == "int"):
        table[c] = table[c].astype("Int64")
    return table.sort_values(
        KEYS + ["seed", "run_name"], key=numbers_as_numbers, na_position="last", kind="stable"
    ).reset_index(drop=True)


def representative_runs(table, per_panel: int = PROFILE_RUNS_PER_PANEL) -> list[str]:
    """The runs whose diagnostics are downloaded, per (task, cell) panel: one per (init, g), the
    best-trained of each (lowest loss ratio, diverged last), spread evenly over g when there are more
    (init, g) than ``per_panel``; plus up to ``CLIPPED_PER_PANEL`` clipped runs (highest clip rate) for
    the pre/post-clip panel. At most per_panel + CLIPPED_PER_PANEL downloads per panel."""
    import numpy as np

    # One stable sort of the panel by (init, g, settings, diverged, loss), then the first row of each
    # (init, g, settings): per group, a sort and a row read took 7.8 s of a 5,000-run report, as g is
    # continuous and nearly every run its own group (benchmarks/scale_store.py: 7.8 s -> 0.03 s). The same
    # runs as the loop, ties kept in table order (tests/test_report_scale.py).
    group = ["init", "init_scale", "settings"]
    chosen: list[str] = []
    for _, panel in table.groupby(["task", "cell"], sort=True, dropna=False):
        order = panel.assign(_div=panel["regime"].eq(DIVERGED), _loss=panel["val_loss_ratio"].fillna(np.inf))
        order = order.sort_values([*group, "_div", "_loss"], kind="stable", na_position="last")
        picks = order.drop_duplicates(group, keep="first")["run_id"].tolist()
        if len(picks) > per_panel:
            picks = [
                picks[i] for i in np.unique(np.linspace(0, len(picks) - 1, per_panel).round().astype(int))
            ]
        clipped = panel[(panel["clip"] != "none") & ~panel["run_id"].isin(picks)]
        clipped = clipped.sort_values("clip_rate", ascending=False, na_position="last")
        chosen.extend(picks + list(clipped["run_id"][:CLIPPED_PER_PANEL]))
    return chosen


@contextlib.contextmanager
def _no_progress_bar():
    """MLflow draws a tqdm bar per download; a report downloads several: keep the terminal quiet."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def download_diagnostics(uri: str, run_ids: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One ``download_artifacts`` of ``diagnostics/`` per run: (profiles, grad_norms) by run id."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import client

    c = client(uri)
    profiles, norms = {}, {}
    with tempfile.TemporaryDirectory() as d, _no_progress_bar():
        for rid in run_ids:
            try:
                local = Path(c.download_artifacts(rid, "diagnostics", str(Path(d) / rid)))
            except (MlflowException, OSError):  # a run that failed before writing its diagnostics
                continue
            if (local / "bptt_profile.parquet").is_file():
                profiles[rid] = pd.read_parquet(local / "bptt_profile.parquet")
            if (local / "grad_norms.parquet").is_file():
                norms[rid] = pd.read_parquet(local / "grad_norms.parquet")
    return profiles, norms


def load(
    uri: str, experiment: str | None = None, study: str | None = None, flag: str = "--store"
) -> ReportData:
    target = resolve_target(uri, experiment, study, flag)
    runs = load_runs(target)
    table = comparison_table(runs)
    profiles, norms = download_diagnostics(uri, representative_runs(table))
    return ReportData(target, runs, table, profiles, norms)
