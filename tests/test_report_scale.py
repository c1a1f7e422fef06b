"""The report at thousands of runs (benchmarks/scale_store.py) reads and computes in bulk, with the results
of the straightforward code it replaced: the runs frame is ``mlflow.search_runs``'s, read in pages with
the collector paused (pipeline/report/search.py); ``representative_runs``, ``summary_table`` and the
HTML/Markdown tables give what their per-group and per-row loops gave (kept here as the references), on
tables built to hold ties, NaNs, missing keys and diverged runs."""

from __future__ import annotations

import gc
import math

import numpy as np
import pandas as pd
import pytest

from pipeline.names import DIVERGED
from pipeline.report import data as rd
from pipeline.report import write as rw

# ------------------------------------------------------------------ the references: the loops replaced


def reference_representative_runs(table, per_panel: int = rd.PROFILE_RUNS_PER_PANEL) -> list[str]:
    chosen: list[str] = []
    for _, panel in table.groupby(["task", "cell"], sort=True, dropna=False):
        picks = []
        for _, grp in panel.groupby(["init", "init_scale", "settings"], sort=True, dropna=False):
            order = grp.assign(_div=grp["regime"].eq(DIVERGED), _loss=grp["val_loss_ratio"].fillna(np.inf))
            picks.append(order.sort_values(["_div", "_loss"]).iloc[0]["run_id"])
        if len(picks) > per_panel:
            picks = [
                picks[i] for i in np.unique(np.linspace(0, len(picks) - 1, per_panel).round().astype(int))
            ]
        clipped = panel[(panel["clip"] != "none") & ~panel["run_id"].isin(picks)]
        clipped = clipped.sort_values("clip_rate", ascending=False, na_position="last")
        chosen.extend(picks + list(clipped["run_id"][: rd.CLIPPED_PER_PANEL]))
    return chosen


def reference_summary_table(table):
    rows = []
    for key, grp in table.groupby(rd.KEYS, sort=False, dropna=False):
        # a RUNNING run counts as running whatever its regime tag says so far (README, "Reports")
        counts = pd.Series(
            ["running" if st == "RUNNING" else r if isinstance(r, str) else "none"
             for r, st in zip(grp["regime"], grp["status"], strict=True)]
        ).value_counts()  # fmt: skip
        rows.append(
            {
                **dict(zip(rd.KEYS, key, strict=True)),
                "runs": len(grp),
                # solved and the medians: finished runs only (a RUNNING run's metrics are partial)
                "solved": int(((grp["solved"] == "true") & (grp["status"] != "RUNNING")).sum())
                if (grp["status"] != "RUNNING").any()
                else pd.NA,
                "regimes": ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
                "median_val_loss_ratio": grp.loc[grp["status"] != "RUNNING", "val_loss_ratio"].median(),
                "median_val_accuracy": grp.loc[grp["status"] != "RUNNING", "val_accuracy"].median(),
            }
        )
    return pd.DataFrame(rows).astype({"solved": "Int64"})


def reference_html_table(df, cols):
    import html

    head = "".join(f"<th>{html.escape(rw.HEADERS.get(c, c.replace('_', ' ')))}</th>" for c in cols)
    body = []
    for _, r in df.iterrows():
        tds = []
        for c in cols:
            v = r[c]
            cls = "s" if not isinstance(v, float) else ""
            if c == "regime" and isinstance(v, str):
                cls += f" {v}"
            tds.append(f'<td class="{cls.strip()}">{html.escape(rw.fmt(v, c))}</td>')
        rid = (
            f' data-run-id="{html.escape(str(r["run_id"]))}"' if "run_id" in df else ""
        )  # a summary has none
        body.append(f"<tr{rid}>" + "".join(tds) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def reference_md_table(df, cols):
    lines = [
        "| " + " | ".join(rw.HEADERS.get(c, c.replace("_", " ")) for c in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(rw.fmt(r[c], c).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ tables


def runs_frame(n: int, seed: int) -> pd.DataFrame:
    """A search_runs frame drawn from small pools: equal g, lr and loss ratios (ties), NaN ratios and g,
    runs without a cell or init tag, diverged runs, clipped runs of equal or missing clip rates, two
    tasks, settings that differ, regimes missing, a pipe in a name (the Markdown escape)."""
    rng = np.random.default_rng(seed)

    def pick(pool):
        return [pool[i] for i in rng.integers(len(pool), size=n)]

    return pd.DataFrame(
        {
            "tags.task": pick(["adding", "adding", "digits"]),
            "tags.cell": pick(["tanh", "gru", "lstm", None]),
            "tags.init": pick(["gaussian", "gaussian", "orthogonal", None]),
            "params.model.init_scale": pick(["0.5", "1.0", "1.0", "2.0", None]),
            "params.optim.lr": pick(["0.001", "0.01", "0.01"]),
            "params.clip.mode": pick(["none", "norm", "norm"]),
            "params.clip.threshold": pick(["1.0", "0.5"]),
            "params.seed": pick(["0", "1"]),
            "params.model.hidden_size": pick(["32", "32", "64"]),
            "metrics.val/loss_ratio": pick([0.1, 0.1, 0.5, 1.2, math.nan, math.inf]),
            "metrics.val/accuracy": pick([0.5, 0.9, math.nan]),
            "metrics.grad/clip_rate": pick([0.1, 0.1, 0.4, math.nan]),
            "tags.solved": pick(["true", "false", None]),
            "tags.regime": pick(["healthy", "vanishing", "exploding", DIVERGED, DIVERGED, None]),
            "tags.diverged_step": pick(["12", None]),
            "status": pick(["FINISHED", "FINISHED", "RUNNING"]),
            "run_id": [f"r{i}" for i in range(n)],
            "tags.mlflow.runName": pick(["a", "b|c", "d"]),
        }
    )


def test_the_numbers_in_clip_and_settings_sort_as_numbers():
    """``clip`` and ``settings`` are text: sorted as text, ``norm 10`` came before ``norm 2`` and
    ``model.hidden_size=128`` before ``=32`` in comparison.csv and summary.csv (a walkthrough)."""
    clip = [("norm", "10.0", "32"), ("norm", "2.0", "32"), ("norm", "0.5", "32")]
    sizes = [("none", "1.0", "128"), ("none", "1.0", "32"), ("none", "1.0", "64")]
    runs = pd.DataFrame(
        [
            {"tags.task": "adding", "tags.cell": "tanh", "tags.init": "gaussian", "params.model.init_scale": "1.0",
             "params.optim.lr": "0.01", "params.clip.mode": mode, "params.clip.threshold": c,
             "params.model.hidden_size": h, "run_id": f"r{i}", "status": "FINISHED"}
            for i, (mode, c, h) in enumerate(clip + sizes)
        ]
    )  # fmt: skip
    table = rd.comparison_table(runs)
    want = [
        ("none", "model.hidden_size=32"),
        ("none", "model.hidden_size=64"),
        ("none", "model.hidden_size=128"),
        ("norm 0.5", "model.hidden_size=32"),
        ("norm 2", "model.hidden_size=32"),
        ("norm 10", "model.hidden_size=32"),
    ]
    assert list(zip(table["clip"], table["settings"], strict=True)) == want
    summary = rw.summary_table(table)
    assert list(zip(summary["clip"], summary["settings"], strict=True)) == want
    # signed after "=" (a forget bias below 0 sorted after 2.0, and -1 before -3: a review), not after a word
    from pipeline.cell_keys import numbers_as_numbers

    bias = pd.Series(
        [f"model.forget_bias={b}" for b in ("0.0", "2.0", "-1.0", "-3.0", "1e-3")], name="settings"
    )
    assert bias.sort_values(key=numbers_as_numbers).str[18:].tolist() == [
        "-3.0",
        "-1.0",
        "0.0",
        "1e-3",
        "2.0",
    ]
    assert numbers_as_numbers(pd.Series(["x=lstm-2"], name="settings"))[0] == ("x=lstm-", 2.0, "")


def test_settings_are_the_ones_the_runs_of_a_task_differ_in():
    """Over the whole report, one digits run among copy runs gave every copy run's label and settings its
    T, batch and sizes, in which no two copy runs differed (a walkthrough)."""
    base = {"tags.cell": "tanh", "tags.init": "gaussian", "params.model.init_scale": "1.0",
            "params.optim.lr": "0.01", "params.clip.mode": "none", "status": "FINISHED"}  # fmt: skip
    copy = {"tags.task": "copy", "params.task.seq_len": "30", "params.task.batch_size": "16"}
    digits = {"tags.task": "digits", "params.task.seq_len": "64", "params.task.batch_size": "32"}
    runs = pd.DataFrame(
        [base | copy | {"run_id": f"c{k}", "params.model.hidden_size": "16"} for k in range(3)]
        + [
            base | digits | {"run_id": f"d{k}", "params.model.hidden_size": h}
            for k, h in enumerate(["32", "64"])
        ]
    )
    table = rd.comparison_table(runs).set_index("run_id")
    assert table.loc[["c0", "c1", "c2"], "settings"].tolist() == ["", "", ""]
    assert table.loc[["d0", "d1"], "settings"].tolist() == ["model.hidden_size=32", "model.hidden_size=64"]


@pytest.mark.parametrize("seed", range(12))
def test_representative_runs_pick_what_the_loop_picked(seed):
    table = rd.comparison_table(runs_frame(300 if seed % 3 else 40, seed))
    for per_panel in (1, 2, 4, 50):
        assert rd.representative_runs(table, per_panel) == reference_representative_runs(table, per_panel)


def test_representative_runs_on_a_raw_frame_with_every_tie_and_nan():
    """Object columns as built by hand (None, not NaN), every row of a group tied or missing its ratio."""
    rows = []
    for i, (g, loss, regime, init) in enumerate(
        [(1.0, 0.5, "healthy", "gaussian"), (1.0, 0.5, "healthy", "gaussian"), (1.0, math.nan, DIVERGED, "gaussian"),
         (math.nan, 0.2, DIVERGED, "gaussian"), (math.nan, 0.2, "healthy", "gaussian"), (2.0, math.nan, None, None),
         (2.0, math.nan, None, None), (2.0, -math.inf, DIVERGED, None), (0.5, 0.3, "healthy", "orthogonal")]
    ):  # fmt: skip
        rows.append({"task": "adding", "cell": "tanh", "init": init, "init_scale": g, "clip": "norm 1",
                     "settings": "", "clip_rate": 0.2, "val_loss_ratio": loss, "regime": regime, "run_id": f"r{i}"})  # fmt: skip
    table = pd.DataFrame(rows).astype({"init": object, "regime": object})
    for per_panel in (1, 2, 3, 4, 9):
        assert rd.representative_runs(table, per_panel) == reference_representative_runs(table, per_panel)


def test_representative_runs_sort_each_panel_once(monkeypatch):
    """In bulk: a sort or two per panel, not one per (init, g) group (7.8 s at 5,000 runs)."""
    table = rd.comparison_table(
        runs_frame(400, 1).assign(**{"params.model.init_scale": [str(i) for i in range(400)]})
    )
    sorts = []
    real = pd.DataFrame.sort_values
    monkeypatch.setattr(
        pd.DataFrame, "sort_values", lambda self, *a, **k: sorts.append(1) or real(self, *a, **k)
    )
    chosen = rd.representative_runs(table)
    panels = table.groupby(["task", "cell"], dropna=False).ngroups
    assert len(sorts) <= 2 * panels < 400 and chosen


@pytest.mark.parametrize("seed", range(8))
def test_summary_table_is_what_the_loop_built(seed):
    table = rd.comparison_table(runs_frame(300 if seed % 2 else 30, seed))
    pd.testing.assert_frame_equal(rw.summary_table(table), reference_summary_table(table), check_exact=True)


def test_summary_table_does_not_loop_over_its_groups(monkeypatch):
    """One pass for all groups: a value_counts and two medians per group took 6.1 s at 5,000 runs."""
    table = rd.comparison_table(
        runs_frame(300, 3).assign(**{"params.optim.lr": [str(i) for i in range(300)]})
    )
    calls = []
    real = pd.Series.value_counts
    monkeypatch.setattr(
        pd.Series, "value_counts", lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    )
    assert len(rw.summary_table(table)) >= 250 and len(calls) < 5


@pytest.mark.parametrize("seed", range(4))
def test_html_and_markdown_tables_are_what_iterrows_wrote(seed, monkeypatch):
    table = rd.comparison_table(runs_frame(120, seed))
    summary = rw.summary_table(table)
    sum_cols = rd.KEYS + ["runs", "solved", "regimes", "median_val_loss_ratio", "median_val_accuracy"]
    cases = [(table, rw.SHOWN + ["run_id"]), (summary, sum_cols), (table.iloc[:0], rw.SHOWN + ["run_id"])]
    want = [(reference_html_table(df, cols), reference_md_table(df, cols)) for df, cols in cases]
    monkeypatch.setattr(pd.DataFrame, "iterrows", lambda self: pytest.fail("a Series per row"))
    for (df, cols), (html, md) in zip(cases, want, strict=True):
        assert rw._html_table(df, cols) == html
        assert rw._md_table(df, cols) == md


# ------------------------------------------------------------------------------------ the bulk read


@pytest.fixture
def varied_store(tmp_path):
    """Runs that differ in which params, metrics and tags they have; one still RUNNING (no end time), one
    deleted (not read), one in another experiment, one with an infinite metric."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp, other = c.create_experiment("e"), c.create_experiment("o")
    ids = []
    for i in range(7):
        rid = c.create_run(exp if i != 5 else other, start_time=1_700_000_000_000 + i * 1000).info.run_id
        metrics = [Metric("val/loss", 0.1 * i, 0, 0), Metric("val/loss", 0.05 * i, 0, 10)]
        if i % 2:
            metrics.append(Metric(f"extra/{i}", 1.7976931348623157e308, 0, 0))
        params = [Param("seed", str(i))] + ([Param("model.cell", "lstm")] if i % 3 == 0 else [])
        tags = [RunTag("pipeline.kind", "trial"), RunTag(f"only.{i % 2}", "x")]
        c.log_batch(rid, metrics=metrics, params=params, tags=tags)
        if i != 4:
            c.set_terminated(rid, "FINISHED" if i != 2 else "KILLED", end_time=1_700_000_000_500 + i * 1000)
        ids.append(rid)
    c.delete_run(ids[6])
    return uri, [exp, other]


@pytest.mark.parametrize("page", [2, 3, 1000])
def test_the_paged_read_is_mlflow_search_runs(varied_store, monkeypatch, page):
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from pipeline.report import search

    uri, exps = varied_store
    monkeypatch.setattr(search, "PAGE", page)
    pages: list[bool] = []
    real = MlflowClient.search_runs

    def spy(self, *a, **k):  # each page read with the collector off
        pages.append(gc.isenabled())
        return real(self, *a, **k)

    monkeypatch.setattr(MlflowClient, "search_runs", spy)
    order = ["attributes.start_time ASC"]
    for filt in ("", "tags.`pipeline.kind` = 'trial'", "params.seed = '3'", "params.seed = 'none'"):
        pages.clear()
        got = search.search_runs_frame(uri, exps, filt, order)
        assert pages and not any(pages) and gc.isenabled()
        assert len(pages) == max(1, math.ceil(len(got) / page))  # pages of `page` runs, none per run
        with _use_tracking_uri(uri):  # mlflow.search_runs reads the global tracking URI
            want = mlflow.search_runs(experiment_ids=exps, filter_string=filt, order_by=order)
        assert list(got.columns[:6]) == list(want.columns[:6]) and sorted(got.columns) == sorted(want.columns)
        pd.testing.assert_frame_equal(got, want[list(got.columns)], check_exact=True)


def test_gc_paused_puts_the_collector_back_as_it_was():
    from pipeline.report.search import gc_paused

    seen = []

    def read():
        with gc_paused():
            seen.append(gc.isenabled())
            raise KeyError  # a store error mid-read

    assert gc.isenabled()
    with pytest.raises(KeyError):
        read()
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
