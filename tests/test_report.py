"""The report over a real small sweep: every table value equals what MLflow holds, plots, errors, CLI.

The sweep is built once per test session (``small_sweep``): a parent run tagged like the sweep's
(``pipeline.kind=sweep``, ``study``) and nine tiny trials through the real ``pipeline.training.run.run``:
tanh/gaussian and relu/identity x g in {0.5, 3} x SGD lr in {0.01, 1}, plus tanh g=3 lr=1 with norm
clipping. relu/identity g=3 with SGD lr=1 and no clipping diverges (checked below).
"""

from __future__ import annotations

import base64
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, tiny_config
from test_report_figures import _run

STUDY = "small-study"
EXPERIMENT = "sweep-small"  # not the default experiment: `report` with no flag must still find the sweep
PLOTTED = {
    ("tanh", 0.5, 0.01),
    ("relu", 3.0, 1.0),
}  # runs that also write plots/*.png (the UI test opens one)


def build_small_sweep(base: Path) -> dict:
    """Train the small sweep into ``base/mlflow.db`` once; later calls reuse it (marker file)."""
    import json

    base.mkdir(parents=True, exist_ok=True)
    marker = base / "sweep.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    from pipeline.tracking import Recorder
    from pipeline.training import run as train

    uri = f"sqlite:///{base / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(base)  # the artifact root (./mlruns) is resolved against the working directory
    try:
        parent = Recorder.start(
            uri, EXPERIMENT, f"sweep-{STUDY}", tags={"pipeline.kind": "sweep", "study": STUDY}
        )
        grid = [
            (cell, init, g, lr, "none")
            for cell, init in (("tanh", "gaussian"), ("relu", "identity"))
            for g in (0.5, 3.0)
            for lr in (0.01, 1.0)
        ]
        grid.append(("tanh", "gaussian", 3.0, 1.0, "norm"))
        trials = []
        for i, (cell, init, g, lr, clip) in enumerate(grid):
            cfg = tiny_config(
                **{
                    "model.cell": cell,
                    "model.init": init,
                    "model.init_scale": g,
                    "optim.name": "sgd",
                    "optim.lr": lr,
                    "clip.mode": clip,
                    "clip.threshold": 1.0,
                    "diagnostics.plots": (cell, g, lr) in PLOTTED,
                    "tracking.uri": uri,
                    "tracking.experiment": EXPERIMENT,
                }
            )
            r = train.run(
                cfg,
                parent_run_id=parent.run_id,
                experiment_id=parent.experiment_id,
                extra_tags={"pipeline.kind": "trial", "study": STUDY, "trial_number": str(i)},
            )
            trials.append(
                {
                    "run_id": r.run_id,
                    "regime": r.regime,
                    "cell": cell,
                    "init_scale": g,
                    "lr": lr,
                    "clip": clip,
                    "diverged_step": r.diverged_step,
                }
            )
        parent.close()
    finally:
        os.chdir(cwd)
    info = {
        "uri": uri,
        "base": str(base),
        "parent_run_id": parent.run_id,
        "experiment_id": parent.experiment_id,
        "trials": trials,
    }
    marker.write_text(json.dumps(info))
    return info


@pytest.fixture(scope="session")
def small_sweep(tmp_path_factory) -> dict:
    return build_small_sweep(tmp_path_factory.getbasetemp() / "small_sweep")


@pytest.fixture(scope="session")
def report(small_sweep, tmp_path_factory):
    from pipeline.report.write import build_report

    out = tmp_path_factory.mktemp("report") / "small"
    return build_report(small_sweep["uri"], study=STUDY, out=out)


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# ------------------------------------------------------------------------------------ the small sweep


def test_small_sweep_really_diverges_and_spans_regimes(small_sweep):
    by = {(t["cell"], t["init_scale"], t["lr"], t["clip"]): t for t in small_sweep["trials"]}
    div = by[("relu", 3.0, 1.0, "none")]
    assert div["regime"] == "diverged" and div["diverged_step"] is not None
    tags = _client(small_sweep["uri"]).get_run(div["run_id"]).data.tags
    assert tags["regime"] == "diverged" and tags["diverged_step"] == str(div["diverged_step"])
    assert by[("tanh", 0.5, 0.01, "none")]["regime"] == "vanishing"
    assert len({t["regime"] for t in small_sweep["trials"]}) >= 3


# ------------------------------------------------------------------------------- table == MLflow


TORCH_CELLS = ("tanh", "relu", "lstm", "gru")


def _expected(run, col: str):
    """What MLflow holds for a table column, read independently with MlflowClient.get_run."""
    d = run.data
    metric = {
        "val_loss_ratio": "val/loss_ratio",
        "val_accuracy": "val/accuracy",
        "log10_ratio": "bptt/log10_ratio",
        "decay_rate": "bptt/decay_rate",
        "clip_rate": "grad/clip_rate",
        "val_loss": "val/loss",
        "baseline": "task/baseline",
        "max_norm_preclip": "grad/max_norm_preclip",
        "steps": "train/steps",
    }
    tag = {
        "task": "task",
        "cell": "cell",
        "init": "init",
        "solved": "solved",
        "regime": "regime",
        "regime_init": "regime_init",
        "regime_reason": "regime_reason",
        "pruned": "pruned",
        "diverged_step": "diverged_step",
        "trial": "trial_number",
        "run_name": "mlflow.runName",
    }
    param = {
        "init_scale": "model.init_scale",
        "lr": "optim.lr",
        "seq_len": "task.seq_len",
        "optimizer": "optim.name",
        "seed": "seed",
    }
    if col in metric:  # as recorded (README, "The MLflow record"): NaN as a tag, +-inf as +-float64 max
        if f"nonfinite.{metric[col]}" in d.tags:
            return None
        v = d.metrics.get(metric[col])
        return math.copysign(math.inf, v) if v is not None and abs(v) == sys.float_info.max else v
    if col == "task" and d.params.get("task.permute") == "True":
        return f"{d.tags['task']} (permuted)"
    if col in tag:
        return d.tags.get(tag[col])
    if col == "init_scale" and d.params["model.init"] == "default" and d.params["model.cell"] in TORCH_CELLS:
        return 1 / math.sqrt(3)  # PyTorch's own init: U(+-1/sqrt(H)) has std g / sqrt(H) at g = 1/sqrt(3)
    if col in param:
        return d.params[param[col]]
    if col == "settings":  # the small sweep searches the report's keys only: no other setting differs
        return None
    if col == "clip":
        mode = d.params["clip.mode"]
        return "none" if mode == "none" else f"{mode} {float(d.params['clip.threshold']):g}"
    return {"status": run.info.status, "run_id": run.info.run_id}[col]


def _same(got, want) -> bool:
    import pandas as pd

    missing = got is None or got is pd.NA or (isinstance(got, float) and math.isnan(got)) or got == ""
    if want is None:
        return missing
    if missing:
        return False
    if isinstance(want, float):
        return float(got) == want  # exact: the CSV keeps full precision
    try:
        return float(got) == float(want)  # params/tags are strings: "0.5" vs 0.5, "3" vs 3
    except (TypeError, ValueError):
        return str(got) == str(want)


@pytest.mark.parametrize("source", ["frame", "csv"])
def test_every_table_value_equals_what_mlflow_holds(small_sweep, report, source):
    import pandas as pd

    table = (
        report.table
        if source == "frame"
        else pd.read_csv(report.files["comparison.csv"], dtype=str, keep_default_na=False)
    )
    c = _client(small_sweep["uri"])
    children = c.search_runs(
        [small_sweep["experiment_id"]], f"tags.mlflow.parentRunId = '{small_sweep['parent_run_id']}'"
    )
    assert sorted(table["run_id"]) == sorted(r.info.run_id for r in children)  # diverged not dropped
    runs = {r.info.run_id: r for r in children}
    checked = 0
    for _, row in table.iterrows():
        run = runs[row["run_id"]]
        for col in table.columns:
            want = _expected(run, col)
            assert _same(row[col], want), (source, row["run_name"], col, row[col], want)
            checked += 1
    assert checked == len(table) * len(table.columns)
    div = table[table["regime"] == "diverged"]
    assert len(div) >= 1 and div["diverged_step"].notna().all()


def test_table_is_sorted_by_the_comparison_keys(report):
    t = report.table
    keys = list(zip(t["task"], t["cell"], t["init"], t["init_scale"], t["lr"], t["clip"], strict=True))
    assert keys == sorted(keys)


# ------------------------------------------------------------------------------------ files, plots


def test_html_is_self_contained_with_figures(report):
    html = report.files["report.html"].read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert "<link" not in html
    imgs = html.count("src='data:image/png;base64,")
    assert imgs == 3  # one task: phase diagram, profiles, gradient norms
    start = html.index("data:image/png;base64,") + len("data:image/png;base64,")
    assert base64.b64decode(html[start : html.index("'", start)])[:8] == b"\x89PNG\r\n\x1a\n"
    for run_id in report.table["run_id"]:
        assert f'data-run-id="{run_id}"' in html
    assert "diverged" in html and STUDY in html


def test_markdown_csv_and_pngs_written(report):
    out = report.out
    for name in (
        "report.html",
        "report.md",
        "comparison.csv",
        "summary.csv",
        "phase_diagram.png",
        "profiles.png",
        "grad_norms.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert "](phase_diagram.png)" in md and "| regime |" in md
    import numpy as np
    from PIL import Image

    with Image.open(out / "phase_diagram.png") as im:
        assert (
            im.size[0] > 400 and len(set(map(tuple, np.asarray(im.convert("RGB")).reshape(-1, 3)))) > 50
        )  # not blank


def test_report_logged_to_the_sweep_parent(small_sweep, report):
    c = _client(small_sweep["uri"])
    names = {a.path for a in c.list_artifacts(small_sweep["parent_run_id"], "report")}
    assert {"report/report.html", "report/comparison.csv", "report/phase_diagram.png"} <= names


@pytest.fixture(scope="module")
def profiles(small_sweep, report) -> dict:
    from pipeline.report import data as rd

    got, _ = rd.download_diagnostics(small_sweep["uri"], rd.representative_runs(report.table))
    return got


def test_profile_panel_draws_the_mean_field_line_where_it_applies(report, profiles):
    import matplotlib.pyplot as plt

    from pipeline.report import figures as rr

    assert rr.theory_applies("tanh", "gaussian", 0.5) and not rr.theory_applies("tanh", "gaussian", 3.0)
    assert not rr.theory_applies("relu", "identity", 0.5) and not rr.theory_applies("lstm", "gaussian", 0.5)
    fig = rr.profile_panels(report.table, profiles, "adding")
    lines = [ln for ax in fig.axes for ln in ax.get_lines()]
    theory = [ln for ln in lines if ln.get_label().endswith("mean-field theory, -0.30 decades/step")]
    assert len(theory) == 1, "tanh/gaussian g=0.5 has its log10 g line, nothing else does"
    assert not [ln for ln in lines if "mean-field theory" in ln.get_label() and ln not in theory]
    _, y = theory[0].get_data()
    assert y[0] - y[1] == pytest.approx(math.log10(0.5))  # one step further back: log10 g lower
    label = theory[0].get_label().split(": mean-field")[0]  # the run's own label, and its own colour
    (run_init,) = [ln for ln in lines if ln.get_label() == f"{label}: init"]
    assert theory[0].get_color() == run_init.get_color()
    init_curves = [ln for ln in lines if ln.get_label().endswith(": init")]
    assert len(init_curves) == len(profiles)  # one init curve per representative run
    plt.close(fig)


def test_reads_in_bulk(small_sweep, monkeypatch, tmp_path):
    """One paged read for the table (pipeline/report/search.py: pages of PAGE runs); no per-metric
    requests; artifacts for a bounded set of runs only."""
    from mlflow.tracking import MlflowClient

    from pipeline.report import data as rd
    from pipeline.report import search as rs
    from pipeline.report.write import build_report

    calls = {"search_runs": 0, "history": 0, "download": 0}
    real_search, real_dl = MlflowClient.search_runs, MlflowClient.download_artifacts

    def search(self, *a, **k):
        pages = (a[3] if len(a) > 3 else k.get("max_results")) == rs.PAGE  # not the targets' lookups
        calls["search_runs"] += pages
        return real_search(self, *a, **k)

    def history(*a, **k):
        calls["history"] += 1
        raise AssertionError("per-metric history request")

    def download(self, *a, **k):
        calls["download"] += 1
        return real_dl(self, *a, **k)

    monkeypatch.setattr(MlflowClient, "search_runs", search)
    monkeypatch.setattr(MlflowClient, "get_metric_history", history)
    monkeypatch.setattr(MlflowClient, "download_artifacts", download)
    res = build_report(small_sweep["uri"], study=STUDY, out=tmp_path / "r", log_to_parent=False)
    assert calls["search_runs"] == 1 and calls["history"] == 0
    panels = res.table.groupby(["task", "cell"]).ngroups
    assert 0 < calls["download"] <= panels * (rd.PROFILE_RUNS_PER_PANEL + rd.CLIPPED_PER_PANEL)


# ------------------------------------------------------------------------- targets, CLI and errors


def test_no_log_logs_nothing_and_says_nothing_of_the_parent_run(small_sweep, tmp_path, capsys, monkeypatch):
    """``--no-log``: the parent run gets no artifact, and the CLI does not claim it did (it printed
    "logged to the sweep's parent run" whenever the target had one; found by a new-user review)."""
    from mlflow import MlflowClient

    from pipeline.cli import main

    logged = []
    monkeypatch.setattr(MlflowClient, "log_artifact", lambda self, *a, **k: logged.append(a))
    argv = ["report", "--store", small_sweep["uri"], "--study", STUDY, "--out", str(tmp_path / "r")]
    assert main([*argv, "--no-log"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"report '{STUDY}'") and "parent run" not in out and logged == []
    assert main(argv) == 0  # without it: logged, and said
    assert "logged to the sweep's parent run" in capsys.readouterr().out
    assert sorted(Path(a[1]).name for a in logged) == sorted(p.name for p in (tmp_path / "r").iterdir())


def test_whole_experiment_target_excludes_the_sweep_parent(small_sweep, tmp_path):
    from pipeline.report.write import build_report

    res = build_report(small_sweep["uri"], experiment=EXPERIMENT, out=tmp_path / "e")
    assert res.name == EXPERIMENT and res.parent_run_id is None
    assert sorted(res.table["run_id"]) == sorted(t["run_id"] for t in small_sweep["trials"])


def test_whole_experiment_target_excludes_a_regression_suites_parent(store, tmp_path):
    """A suite's parent run trains nothing: it was an empty row of the regression experiment's table."""
    from mlflow.tracking import MlflowClient

    from pipeline.names import ROLE, SUITE
    from pipeline.report.write import build_report
    from pipeline.training.run import run

    trained = run(tiny_config(**{"tracking.experiment": "suite-like"}))
    c = MlflowClient(store)
    parent = c.create_run(c.get_experiment_by_name("suite-like").experiment_id, tags={ROLE: SUITE})
    c.set_terminated(parent.info.run_id)
    res = build_report(store, experiment="suite-like", out=tmp_path / "e")
    assert list(res.table["run_id"]) == [trained.run_id]


def test_runs_differing_in_a_setting_are_not_merged_and_default_init_sits_at_its_g(store, tmp_path):
    """A teacher's review: LSTM runs at forget bias 0 and 2 (what lstm_forget_bias.yaml's comment asks to
    compare) were one summary row ("runs 2") and one profile curve, and a run at init: default with
    init_scale 3, which trains PyTorch's init, sat at g = 3 of the phase diagram."""
    import pandas as pd

    from pipeline.report.write import build_report
    from pipeline.training.run import run

    exp = {"tracking.experiment": "lesson", "task.name": "temporal_order", "task.seq_len": 12}
    bf0 = run(tiny_config(**exp, **{"model.cell": "lstm", "model.forget_bias": 0.0}))
    bf2 = run(tiny_config(**exp, **{"model.cell": "lstm", "model.forget_bias": 2.0}))
    default = run(
        tiny_config(**exp, **{"model.cell": "tanh", "model.init": "default", "model.init_scale": 3.0})
    )
    no_g = run(
        tiny_config(**exp, **{"model.cell": "indrnn", "model.init": "default", "model.init_scale": 3.0})
    )
    res = build_report(store, experiment="lesson", out=tmp_path / "r")
    t = res.table.set_index("run_id")
    assert t.loc[bf0.run_id, "settings"] == "model.forget_bias=0.0"
    assert t.loc[bf2.run_id, "settings"] == "model.forget_bias=2.0"
    assert t.loc[default.run_id, "settings"] == ""  # its forget_bias param differs, but no tanh reads it
    assert t.loc[default.run_id, "init_scale"] == pytest.approx(3**-0.5)
    assert math.isnan(t.loc[no_g.run_id, "init_scale"])  # indrnn's default u ~ U(0, 1): no g at all
    from matplotlib.colors import to_rgb

    from pipeline.report import figures as rr

    fig = rr.phase_diagram(res.table, "temporal_order")
    (ax,) = [a for a in fig.axes if a.get_title() == "indrnn / default"]
    # its run drawn by learning rate, its regime's colour and its label (a panel of a note only: a walkthrough)
    from pipeline.report.phase import REGIME_COLORS, _marker

    (dot,) = ax.collections
    assert dot.get_offsets()[0][0] == pytest.approx(t.loc[no_g.run_id, "lr"])
    color = to_rgb(REGIME_COLORS[t.loc[no_g.run_id, "regime"]])  # filled, or hollow in its colour
    assert any(tuple(c[:3]) == pytest.approx(color) for c in [*dot.get_facecolor(), *dot.get_edgecolor()])
    assert sorted(x.get_text() for x in ax.texts) == sorted(
        [
            "no init scale g: indrnn at init default keeps its own init;\nits 1 run(s) by learning rate",
            _marker(t.loc[no_g.run_id])[2],
        ]
    )
    assert ax.get_ylabel() == "(no g)" and not len(ax.get_yticks())
    fig.clf()
    summary = pd.read_csv(res.files["summary.csv"])
    lstm = summary[summary["cell"] == "lstm"].sort_values("settings")
    assert list(lstm["runs"]) == [1, 1] and list(lstm["settings"]) == [
        "model.forget_bias=0.0",
        "model.forget_bias=2.0",
    ]
    assert "model.forget_bias=2.0" in res.files["report.md"].read_text()


def test_settings_are_what_trained_differently_not_what_was_logged_differently():
    """A review of the column: a model key the cell does not read, a param an older version did not log
    (read as its default), and a display setting are no settings; a key a cell reads is."""
    from pipeline.cell_keys import differing_settings

    lstm = {"model.cell": "lstm", "model.init": "default", "model.forget_bias": "2.0", "task.seq_len": "50"}
    tanh = {**lstm, "model.cell": "tanh", "model.forget_bias": "0.5"}
    old = {k: v for k, v in tanh.items() if k != "model.forget_bias"} | {"trainer.progress_bar": "True"}
    # a key differs between the runs that read it: one LSTM among tanh runs has no setting apart (its
    # forget bias read as one, the default sweep's "model.forget_bias=1.0": a new-user walkthrough) ...
    assert differing_settings([lstm, tanh, old]) == ["", "", ""]
    # ... two LSTM runs at different forget biases have, whatever the other cells' runs
    zero = {**lstm, "model.forget_bias": "0.0"}
    assert differing_settings([lstm, tanh, zero]) == ["model.forget_bias=2.0", "", "model.forget_bias=0.0"]
    assert differing_settings([tanh, {**tanh, "task.seq_len": "200"}]) == [
        "task.seq_len=50",
        "task.seq_len=200",
    ]
    missing = {k: v for k, v in lstm.items() if k != "model.forget_bias"}  # an older store: the default, 1.0
    assert differing_settings([missing, {**lstm, "model.forget_bias": "1.0"}]) == ["", ""]


def test_killed_runs_are_left_out_and_counted(store, tmp_path, capsys):
    """An interrupted trial's run is KILLED and its retry is another run with the same params: the report
    counted the trial twice, the killed half with no verdict (walkthrough: 17 runs for 11 trials)."""
    from mlflow.tracking import MlflowClient

    from pipeline.training.run import run

    kept = run(tiny_config(**{"tracking.experiment": "killed"}))
    gone = run(tiny_config(**{"tracking.experiment": "killed", "seed": 1}))
    MlflowClient(store).set_terminated(gone.run_id, "KILLED")
    import pandas as pd

    from pipeline.cli import main

    assert main(["report", "--experiment", "killed", "--out", str(tmp_path / "r"), "--no-log"]) == 0
    out = capsys.readouterr().out
    assert "report 'killed': 1 run (" in out and "; 1 killed run left out" in out
    table = pd.read_csv(tmp_path / "r" / "comparison.csv")
    assert list(table["run_id"]) == [kept.run_id]
    assert "**runs**: 1 (1 killed run left out" in (tmp_path / "r" / "report.md").read_text()


def test_runs_left_running_by_a_process_that_is_gone_are_killed_not_in_progress(store, tmp_path, capsys):
    """After a kill -9 of a sweep, its trials' runs stay RUNNING until the next resume closes them: the report
    read the dead sweep as one in progress ("3 runs still running", half-trained points). A RUNNING run
    whose ``pipeline.owner`` names a gone process on this host is left out as killed; one whose process
    lives, or cannot be seen (another host), is still running."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from pipeline.cli import main
    from pipeline.names import OWNER
    from pipeline.provenance import owner_tag
    from pipeline.training.run import run

    sleeper = subprocess.Popen(["sleep", "60"])
    dead = owner_tag(sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    owners = {"dead": dead, "alive": owner_tag(), "elsewhere": "another-host|1|1|x.y.z", "untagged": None}
    ids = {}
    c = MlflowClient(store)
    for seed, (name, owner) in enumerate(owners.items()):
        ids[name] = run(tiny_config(**{"tracking.experiment": "gone", "seed": seed})).run_id
        if owner:
            c.set_tag(ids[name], OWNER, owner)
        c.update_run(ids[name], status="RUNNING")
    ids["done"] = run(tiny_config(**{"tracking.experiment": "gone", "seed": 9})).run_id

    assert main(["report", "--experiment", "gone", "--out", str(tmp_path / "r"), "--no-log"]) == 0
    out = capsys.readouterr().out
    assert "report 'gone': 4 runs (" in out, out
    assert "; 1 killed run left out (1 left RUNNING by a process that is gone); 3 runs still running" in out
    table = pd.read_csv(tmp_path / "r" / "comparison.csv")
    assert set(table["run_id"]) == {ids[k] for k in ("alive", "elsewhere", "untagged", "done")}
    md = (tmp_path / "r" / "report.md").read_text()
    assert (
        "(1 killed run left out: interrupted, retried or resumable; one of them still RUNNING in the store, "
        "its process on this host gone (kill -9): the next `pipeline sweep` of its study (or `regress` of its suite) closes it KILLED)"
    ) in md, md


def test_make_report_default_finds_the_latest_sweep(small_sweep, tmp_path):
    """`make report` as a new user runs it: no flags, the default store from the environment."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": small_sweep["uri"], "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-m", "pipeline", "report"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"report '{STUDY}': {len(small_sweep['trials'])} runs" in p.stdout
    assert "Downloading artifacts" not in p.stderr  # no progress bar per download
    html = tmp_path / "reports" / STUDY / "report.html"
    assert html.is_file() and "diverged" in html.read_text()


def _cli(argv, capsys) -> tuple[int, str]:
    from pipeline.cli import main

    rc = main(["report", *argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def _run_count(uri) -> int:
    from mlflow.entities import ViewType

    c = _client(uri)
    ids = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ALL)]
    return len(c.search_runs(ids, run_view_type=ViewType.ALL)), len(ids)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--experiment", "no-such-experiment"], "unknown experiment 'no-such-experiment'"),
        (["--study", "no-such-study"], "unknown study 'no-such-study'"),
        (["--experiment", EXPERIMENT, "--study", "no-such-study"], "unknown study"),
        (["--experiment", " "], "must not be empty"),
    ],
)
def test_unknown_targets_are_one_line_errors_and_write_nothing(small_sweep, tmp_path, capsys, args, needle):
    before = _run_count(small_sweep["uri"])
    out = tmp_path / "out"
    rc, err = _cli([*args, "--store", small_sweep["uri"], "--out", str(out)], capsys)
    assert rc == 2 and err.startswith("error: ") and needle in err and "\n" not in err
    assert not out.exists() and _run_count(small_sweep["uri"]) == before


def test_empty_experiment_is_an_error(store, tmp_path, capsys):
    from pipeline.tracking import ensure_experiment

    ensure_experiment(store, "empty")
    rc, err = _cli(["--experiment", "empty", "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "experiment 'empty' has no runs" in err
    assert not (tmp_path / "out").exists()


def test_default_experiment_missing_is_an_error(store, tmp_path, capsys):
    from pipeline.tracking import ensure_experiment

    ensure_experiment(store, "something-else")
    rc, err = _cli([], capsys)
    assert rc == 2 and "no sweep run in the store and unknown experiment 'rnn-gradients'" in err
    assert "something-else" in err
    assert not (tmp_path / "reports").exists()


def test_missing_store_is_an_error_and_not_created(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "nothing.db"
    rc, err = _cli(["--store", f"sqlite:///{db}"], capsys)
    assert rc == 2 and "no MLflow store" in err
    assert not db.exists() and not (tmp_path / "reports").exists()
    db.touch()  # an empty file: sqlite reads it as an empty database, and MLflow filled it with its schema
    rc, err = _cli(["--store", f"sqlite:///{db}"], capsys)
    assert rc == 2 and f"no MLflow store at {db}: the file is empty" in err
    assert db.stat().st_size == 0 and not (tmp_path / "reports").exists()


# ------------------------------------------------------------------- figures say what the verdict means


def _one_panel_table():
    """A one-(cell, init) sweep: healthy gradients that learned nothing, a vanishing run that solved it, and
    a diverged one (the shape that lost its title and legend)."""
    import pandas as pd

    rows = [
        ("r1", 0.5, 0.01, "healthy", 0.98, "false", None),
        ("r2", 1.0, 0.01, "vanishing", 0.05, "true", None),
        ("r3", 3.0, 1.0, "diverged", math.nan, "false", 7),
    ]
    return pd.DataFrame(
        [
            _run(rid, lr, g, clip="norm 1", regime=reg, val_loss_ratio=v, solved=sol, diverged_step=ds)
            for rid, g, lr, reg, v, sol, ds in rows
        ]
    )


def _inside(fig, artist) -> bool:
    fig.canvas.draw()
    box = artist.get_window_extent(fig.canvas.get_renderer())
    W, H = fig.bbox.width, fig.bbox.height
    return box.x0 >= -1 and box.y0 >= -1 and box.x1 <= W + 1 and box.y1 <= H + 1


def test_one_panel_figures_keep_title_and_legend():
    """tight_layout ignores figure-level artists: a one-panel phase diagram (figure 4.2 in wide) cut its
    title and its 6-column legend, and a one-panel gradient-norm figure its title. Every title and legend
    must lie inside the figure it is saved from."""
    import numpy as np
    import pandas as pd

    from pipeline.report import figures as rr

    table = _one_panel_table()
    fig = rr.phase_diagram(table, "adding")
    assert _inside(fig, fig._suptitle) and all(_inside(fig, lg) for lg in fig.legends)
    norms = {
        rid: pd.DataFrame(
            {"step": np.arange(1, 6), "norm_preclip": np.linspace(1, 5, 5), "norm_postclip": np.ones(5)}
        )
        for rid in table["run_id"]
    }
    fig = rr.grad_norm_panels(table, norms, "adding")
    assert _inside(fig, fig._suptitle)
    for ax in fig.axes:
        assert ax.get_legend() is not None and _inside(fig, ax.get_legend())


def test_panel_legends_overlap_nothing_and_phase_ticks_do_not_run_together():
    """Three cells of six runs each, clipped (two legend entries a run, labels of ~90 characters): each
    panel's legend lies below its x label and inside the figure, and touches no other panel or legend (two
    columns of them ran into each other and over the x labels). The phase diagram's learning-rate labels
    over 3.5 decades do not overlap (1-2-5 ticks ran together: "0.00020.00050.001")."""
    import numpy as np
    import pandas as pd

    from pipeline.report import figures as rr

    one = _one_panel_table().iloc[0]
    rows = []
    for cell in ("gru", "lstm", "tanh"):
        for k in range(6):
            rid = f"{cell}{k}"
            g, lr = 0.25 * 2**k, 2e-4 * 3.2**k
            rows.append(one.to_dict() | {"run_id": rid, "cell": cell, "init_scale": g, "lr": lr})
    table = pd.DataFrame(rows)
    norms = {
        r: pd.DataFrame(
            {
                "step": np.arange(1, 301),
                "norm_preclip": np.geomspace(1e3, 1e-2, 300),
                "norm_postclip": np.minimum(np.geomspace(1e3, 1e-2, 300), 1.0),
            }
        )
        for r in table["run_id"]
    }
    fig = rr.grad_norm_panels(table, norms, "adding")
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [(ax, ax.get_legend().get_window_extent(r)) for ax in fig.axes]
    assert all(len(ax.get_legend().get_texts()) == 13 for ax in fig.axes)  # 6 runs x 2, the threshold
    for ax, box in boxes:
        assert _inside(fig, ax.get_legend())
        assert box.y1 < ax.xaxis.label.get_window_extent(r).y0  # below its x label
        for other, obox in boxes:
            if other is not ax:
                assert not box.overlaps(other.get_window_extent(r)) and not box.overlaps(obox)
    fig = rr.phase_diagram(table, "adding")
    fig.canvas.draw()
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]
        spans = sorted((t.get_window_extent(r).x0, t.get_window_extent(r).x1) for t in labels)
        spans = [sp for sp in spans if fig.bbox.x0 <= sp[0] and sp[1] <= fig.bbox.x1]
        assert len(spans) >= 3 and all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_long_settings_wrap_in_the_legend_and_leave_the_axes_their_width():
    """Labels of ~230 characters (a run differing in many settings): the legend was as wide as its longest
    label and squeezed each panel's axes to ~5% of the figure's width (a walkthrough). Wrapped at
    LABEL_CHARS, the axes keep most of the width, and each legend lies below its x label, inside the
    figure, clear of the next panel."""
    import numpy as np
    import pandas as pd

    from pipeline.report import figures as rr

    long = "; ".join(f"model.some_setting_{k}={k * 1.5}" for k in range(8))  # 223 characters
    one = _one_panel_table().iloc[0].to_dict() | {"settings": long}
    table = pd.DataFrame([one | {"run_id": f"{c}{k}", "cell": c, "init_scale": 0.5 + k} for c in ("gru", "tanh")
                          for k in range(3)])  # fmt: skip
    norms = {r: pd.DataFrame({"step": np.arange(1, 6), "norm_preclip": np.linspace(1, 5, 5),
                              "norm_postclip": np.ones(5)}) for r in table["run_id"]}  # fmt: skip
    fig = rr.grad_norm_panels(table, norms, "adding")
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    for ax in fig.axes:
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(long[:60] in t.replace("\n", " ") for t in texts), texts
        assert max(len(line) for t in texts for line in t.splitlines()) <= rr.LABEL_CHARS + 4
        assert ax.get_window_extent(r).width > 0.6 * fig.bbox.width
        box = ax.get_legend().get_window_extent(r)
        assert _inside(fig, ax.get_legend()) and box.y1 < ax.xaxis.label.get_window_extent(r).y0
        for other in fig.axes:
            if other is not ax:
                assert not box.overlaps(other.get_window_extent(r))


def test_learned_nothing_does_not_look_like_success():
    """A healthy run whose loss stayed at the baseline is drawn hollow and says "learned nothing" next to
    its regime; a solved run is a filled star."""
    from matplotlib.colors import to_rgba

    from pipeline import plots
    from pipeline.report import figures as rr

    assert (
        plots.run_summary("healthy", 0.98, "false")
        == "healthy gradients; val loss 0.98 x baseline: learned nothing"
    )
    assert plots.outcome(0.05, "true") == "solved" and plots.outcome(0.5) == "partly learned"
    # README "What the report shows": learned nothing is a final val loss of at least 0.9 x baseline
    assert plots.outcome(0.9) == "learned nothing" and plots.outcome(0.8999) == "partly learned"
    assert plots.outcome(None) == plots.outcome(float("nan")) == "no val loss"
    assert plots.run_summary("diverged", float("nan")) == "diverged; no val loss"
    # MLflow's +-float64 max, read back as inf (pipeline.as_recorded): it read "val loss 1.8e+308 x baseline"
    assert plots.run_summary("diverged", float("inf")) == "diverged; no val loss"
    # its step (tag diverged_step), so its last profile pass, labelled with the step after, is not read as
    # a second diverged step (a teacher saw "step 5 (diverged ...)" beside "diverged at step 4")
    assert plots.run_summary("diverged", float("nan"), diverged_step=4) == "diverged at step 4; no val loss"
    assert (
        plots.run_summary("diverged", 3.0, "false", "", 4)
        == "diverged at step 4; val loss 3 x baseline: learned nothing"
    )
    assert plots.run_summary("healthy", 0.98, "false", "", 4).startswith("healthy gradients; ")
    import pandas as pd

    prof = pd.DataFrame({"step": [0, 0, 5, 5], "t": [1, 2, 1, 2], "state": "h", "log10_norm": [0.0, 1, 2, 3]})
    row = pd.Series(
        {
            "regime": "diverged",
            "val_loss_ratio": math.inf,
            "solved": "false",
            "diverged_step": 4,
            "regime_reason": math.nan,
            "init": "gaussian",
            "init_scale": 1.0,
            "lr": 0.1,
            "settings": "",
        }
    )
    curves: list = []
    rr._state_curves(prof, row, "k", curves, rr.PROFILE_STATES[0])
    assert curves[-1].label.endswith(": step 5 (diverged at step 4; no val loss)"), curves[-1].label
    fig = rr.phase_diagram(_one_panel_table(), "adding")
    ax = fig.axes[0]
    faces = [tuple(c.get_facecolors()[0]) for c in ax.collections]
    white, green = to_rgba("white"), to_rgba(rr.REGIME_COLORS["healthy"])
    assert white in faces and green not in faces  # the healthy-but-nothing run is not a filled green point
    labels = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert any(lab.startswith("hollow: learned nothing") for lab in labels)


def test_report_figures_are_sharp(report):
    from PIL import Image

    from pipeline import plots

    assert plots.DPI >= 160
    for name in ("phase_diagram.png", "profiles.png", "grad_norms.png"):
        with Image.open(report.out / name) as im:
            assert round(im.info["dpi"][0]) == plots.DPI, name
        assert (report.out / name).stat().st_size < 400_000, name  # sharp, not heavy


def test_permuted_digits_runs_are_a_task_of_their_own():
    """task.permute runs get their own phase diagram: the table's task is `digits (permuted)` (README,
    "What the report shows"); runs stored before the key existed (no param) keep their task."""
    import pandas as pd

    from pipeline.report.data import comparison_table

    runs = pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "tags.task": ["digits", "digits", "adding"],
            "params.task.permute": ["True", "False", None],
            "metrics.val/accuracy": [0.8, 0.7, math.nan],
        }
    )
    table = comparison_table(runs).set_index("run_id")
    assert table.loc[["a", "b", "c"], "task"].tolist() == ["digits (permuted)", "digits", "adding"]
    assert table.loc["a", "val_accuracy"] == 0.8 and math.isnan(table.loc["c", "val_accuracy"])


def test_representative_runs_never_pick_a_run_twice():
    """The pre/post-clip slots go to clipped runs not already picked as their (init, g)'s best: picked
    twice, a run was downloaded twice and its panel showed one run where two were promised."""
    import pandas as pd

    from pipeline.report import data as rd

    rows = [  # one panel, two (init, g): the best of each is clipped, as are two more runs
        ("a", 1.0, "norm", 0.9, 0.1),
        ("b", 1.0, "norm", 0.5, 0.5),
        ("c", 2.0, "norm", 0.8, 0.2),
        ("d", 2.0, "none", None, 0.9),
    ]
    table = pd.DataFrame(
        [
            {"task": "adding", "cell": "tanh", "init": "gaussian", "init_scale": g, "clip": clip, "settings": "",
             "clip_rate": rate, "val_loss_ratio": loss, "regime": "healthy", "run_id": rid}
            for rid, g, clip, rate, loss in rows
        ]
    )  # fmt: skip
    chosen = rd.representative_runs(table, per_panel=4)
    assert len(chosen) == len(set(chosen)), chosen
    assert chosen == ["a", "c", "b"]  # the bests of g = 1 and 2, then the one clipped run not yet picked


def test_the_regime_table_best_is_never_a_diverged_trials_penalty():
    """A diverged trial is told the penalty (README, "Objective, divergence, pruning"): it is not a best.
    A regime whose trials all diverged shows no best."""
    import pandas as pd

    from pipeline.sweep.summary import regime_table

    df = pd.DataFrame(
        {
            "state": ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"],
            "regime": ["exploding", "healthy", "healthy", "healthy"],
            "diverged": [True, True, False, False],
            "value": [0.01, 0.02, 0.4, None],
            "p.model.cell": ["tanh", "tanh", "gru", "gru"],
        }
    )
    lines = {line.split()[0]: line.split() for line in regime_table(df, "lstm").splitlines()[1:]}
    assert lines["exploding"] == ["exploding", "1", "0", "-", "tanh", "1"]
    assert lines["healthy"] == ["healthy", "3", "1", "0.4000", "gru", "2,", "tanh", "1"]
    # a sweep that does not search the cell: each trial's is the base config's (the column was blank)
    lines = {
        ln.split()[0]: ln.split()
        for ln in regime_table(df.drop(columns="p.model.cell"), "lstm").splitlines()[1:]
    }
    assert lines["healthy"] == ["healthy", "3", "1", "0.4000", "lstm", "3"]


def test_a_bare_report_reads_the_latest_plain_training_runs_experiment(store):
    """With no sweep in the store, ``report`` covers the experiment of the latest ``make train`` run
    (no ``pipeline.kind``), even when a regression entry ran after it; only a store without plain runs
    falls back to the newest run of another kind (a suite's parent never)."""
    import time

    from mlflow.tracking import MlflowClient

    from pipeline.names import KIND, KIND_REGRESSION, ROLE
    from pipeline.report.data import resolve_target

    c = MlflowClient(store)
    mine, suite = c.create_experiment("mine"), c.create_experiment("regression")
    c.set_terminated(c.create_run(mine).info.run_id)
    time.sleep(0.01)  # a later start time
    c.set_terminated(c.create_run(suite, tags={KIND: KIND_REGRESSION, ROLE: "entry"}).info.run_id)
    assert resolve_target(store).experiment_names == ["mine"]
    c.delete_experiment(mine)
    c.set_terminated(
        c.create_run(c.create_experiment("other"), tags={KIND: KIND_REGRESSION, ROLE: "suite"}).info.run_id
    )
    assert resolve_target(store).experiment_names == [
        "regression"
    ]  # the entry's, not the newer suite parent's


def test_representative_runs_pick_the_best_trained_and_the_most_clipped():
    """Per (init, g): the lowest loss ratio, diverged last, a run without a ratio only when none has one;
    then the clipped runs of the highest clip rate (``representative_runs``'s docstring)."""
    import pandas as pd

    from pipeline.report import data as rd

    rows = [  # one panel; rid, g, clip, clip rate, loss ratio, regime
        ("nan", 1.0, "none", None, math.nan, "healthy"),  # no ratio: never over a run with one
        ("ok", 1.0, "none", None, 0.7, "healthy"),
        ("c3", 1.0, "norm", 0.3, 0.8, "healthy"),  # clipped, not best: for the clip panel
        ("c9", 1.0, "norm", 0.9, 0.85, "healthy"),
        ("c6", 1.0, "norm", 0.6, 0.95, "healthy"),
        ("div", 2.0, "none", None, 0.05, "diverged"),  # a lower ratio, but diverged
        ("fine", 2.0, "none", None, 0.6, "exploding"),
        ("alone", 3.0, "none", None, math.nan, "healthy"),  # its g's only run, no ratio: still picked
    ]
    table = pd.DataFrame(
        [
            {"task": "adding", "cell": "tanh", "init": "gaussian", "init_scale": g, "clip": clip, "settings": "",
             "clip_rate": rate, "val_loss_ratio": loss, "regime": regime, "run_id": rid}
            for rid, g, clip, rate, loss, regime in rows
        ]
    )  # fmt: skip
    assert rd.CLIPPED_PER_PANEL == 2
    assert rd.representative_runs(table, per_panel=4) == ["ok", "fine", "alone", "c9", "c6"]


def test_the_sweep_records_values_the_table_must_read_back_as_nan_and_inf(small_sweep, report):
    """The check above is not vacuous: the sweep holds metrics whose latest value was NaN (a tag, the
    metric's history ending at its last finite value) and an infinite value stored as float64 max."""
    c = _client(small_sweep["uri"])
    children = c.search_runs(
        [small_sweep["experiment_id"]], f"tags.mlflow.parentRunId = '{small_sweep['parent_run_id']}'"
    )
    tagged = [
        (r, t[len("nonfinite.") :]) for r in children for t in r.data.tags if t.startswith("nonfinite.")
    ]
    shown = {"bptt/log10_ratio", "bptt/decay_rate", "val/loss_ratio", "val/loss", "grad/max_norm_preclip"}
    assert any(m in shown and m in r.data.metrics for r, m in tagged), sorted({m for _, m in tagged})


def test_a_second_sweep_of_the_same_study_name_is_reported_alone(small_sweep, tmp_path):
    """The study's Optuna storage moved aside and the sweep run again into the same MLflow store: a
    second parent run with the same ``study`` tag. The report names the newest parent and covers its
    trials only; it covered both sweeps' (trial numbers twice, two seeds mixed)."""
    import sqlite3

    from pipeline.report.data import load_runs, resolve_target
    from pipeline.tracking import Recorder

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(Path(small_sweep["base"]) / "mlflow.db") as src, sqlite3.connect(db) as dst:
        src.backup(dst)  # the store is in WAL mode: a file copy can miss what the log still holds
    uri = f"sqlite:///{db}"
    second = Recorder.start(
        uri, EXPERIMENT, f"sweep-{STUDY}", tags={"pipeline.kind": "sweep", "study": STUDY}
    )
    trial = Recorder.start(
        uri,
        EXPERIMENT,
        "again-0",
        tags={"pipeline.kind": "trial", "study": STUDY, "trial_number": "0"},
        parent_run_id=second.run_id,
        experiment_id=second.experiment_id,
    )
    trial.close()
    second.close()
    for target in (resolve_target(uri, study=STUDY), resolve_target(uri)):
        assert target.parent_run_id == second.run_id
        assert list(load_runs(target)["run_id"]) == [trial.run_id]
    first = resolve_target(small_sweep["uri"], study=STUDY)  # the store with one sweep: all its trials
    assert sorted(load_runs(first)["run_id"]) == sorted(t["run_id"] for t in small_sweep["trials"])


def test_the_readmes_pandas_recipe_runs_verbatim_where_the_store_is(small_sweep, tmp_path):
    """README, "The MLflow record": the recipe, run as written in the folder that holds ``mlflow.db``,
    finds the vanishing runs of every experiment (a sweep's included: the recipe named only the
    training runs' experiment, and found nothing after `make sweep`), with numeric init scales and the
    metrics MLflow holds (``as_recorded``'s NaN and inf: the table test above)."""
    import re

    text = (ROOT / "README.md").read_text()
    block = re.search(r"Compare runs in pandas.*?```python\n(.*?)```", text, re.S).group(1)
    script = tmp_path / "recipe.py"
    out = tmp_path / "runs.pkl"
    last = block.strip().splitlines()[-1]  # the frame the recipe shows
    script.write_text(f"{block}\n({last}).to_pickle({str(out)!r})\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run(
        [sys.executable, str(script)],
        cwd=small_sweep["base"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    import pandas as pd

    got = pd.read_pickle(out).to_dict()
    c = _client(small_sweep["uri"])
    vanishing = [t for t in small_sweep["trials"] if t["regime"] == "vanishing"]
    assert vanishing
    rows = got["tags.cell"].keys()
    assert len(rows) == len(vanishing)
    by_scale = sorted(got["params.model.init_scale"].values())
    assert by_scale == sorted(t["init_scale"] for t in vanishing)  # numbers, not strings
    want = sorted(
        (_expected(c.get_run(t["run_id"]), "log10_ratio") for t in vanishing),
        key=lambda v: (v is None, v or 0),
    )
    have = sorted(got["metrics.bptt/log10_ratio"].values(), key=lambda v: (v is None, v or 0))
    assert all(_same(h, w) for h, w in zip(have, want, strict=True)), (have, want)


def test_a_report_written_over_an_earlier_one_replaces_its_figures_and_logs_only_its_files(
    small_sweep, tmp_path
):
    """An earlier report's figure of a task this one does not cover was left in the folder, and the
    whole folder (a user's own file too) was logged to the sweep's parent run (found by a review)."""
    from pipeline.report.write import build_report

    out = tmp_path / "r"
    out.mkdir()
    (out / "phase_diagram_copy.png").write_bytes(b"an earlier report's figure")
    (out / "profiles_mine.png").write_bytes(b"a user's figure, that no report drew")
    (out / "report.md").write_text("# earlier\n\n![Phase diagram (copy)](phase_diagram_copy.png)\n")
    (out / "notes.txt").write_text("the user's")
    res = build_report(small_sweep["uri"], study=STUDY, out=out)
    assert not (out / "phase_diagram_copy.png").exists()
    assert (out / "notes.txt").read_text() == "the user's"
    assert (out / "profiles_mine.png").read_bytes() == b"a user's figure, that no report drew"
    assert {p.name for p in out.iterdir()} == set(res.files) | {"notes.txt", "profiles_mine.png"}
    logged = {
        a.path for a in _client(small_sweep["uri"]).list_artifacts(small_sweep["parent_run_id"], "report")
    }
    assert {f"report/{n}" for n in res.files} <= logged
    assert not logged & {"report/notes.txt", "report/phase_diagram_copy.png", "report/profiles_mine.png"}


def test_a_report_of_a_sweep_in_progress_says_so_and_marks_running_and_pruned_points(small_sweep, tmp_path):
    """Read while trials still trained, a report looked final: no word in its header, a RUNNING trial
    drawn as solved from the tags it had so far, grey points missing from the legend; pruned runs looked
    like finished ones (found by a review)."""
    from pipeline.report import data as rd
    from pipeline.report.phase import _marker, _phase_legend
    from pipeline.report.write import write

    data = rd.load(small_sweep["uri"], study=STUDY)
    table = data.table
    solved = table.index[table["regime"] != "diverged"][0]
    table.loc[solved, ["status", "solved"]] = ["RUNNING", "true"]
    other = table.index[(table["regime"] != "diverged") & (table.index != solved)][0]
    table.loc[other, ["pruned", "steps"]] = ["true", 150]
    res = write(data, tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "**in progress**: 1 run still RUNNING when this was written: a partial report" in md
    assert res.running == 1
    # counted as running, not under the regime tag it had so far (it was, beside "1 run still running")
    regime = table.loc[solved, "regime"]
    expected = table["regime"].fillna("no verdict").value_counts().to_dict()
    expected[regime] -= 1
    expected = {k: v for k, v in {**expected, "running": 1}.items() if v}
    assert res.regimes == dict(sorted(expected.items())), (res.regimes, regime)
    summary = (tmp_path / "r" / "summary.csv").read_text()
    assert "running 1" in summary, summary
    # nor is it solved, nor in the medians: its metrics are a half-trained model's
    import pandas as pd

    from pipeline.report.write import summary_table

    key = table.loc[solved, rd.KEYS]
    same = (table[rd.KEYS] == key).all(axis=1)
    rows = summary_table(table)
    (row,) = [r for _, r in rows.iterrows() if all(r[k] == key[k] for k in rd.KEYS)]
    group = table[same & (table["status"] != "RUNNING")]
    assert row["runs"] == same.sum()
    if group.empty:  # the RUNNING run alone in its group: no count, no median
        assert row["solved"] is pd.NA and math.isnan(row["median_val_loss_ratio"])
        group = group.assign(solved=[], val_loss_ratio=[])
    assert group.empty or row["solved"] == (group["solved"] == "true").sum()
    assert row["median_val_loss_ratio"] == pytest.approx(group["val_loss_ratio"].median(), nan_ok=True)
    # a group of RUNNING runs alone: no solved count, as no median (a "0" read as "not solved")
    lone = table.loc[[solved]].assign(status="RUNNING")
    (only,) = [r for _, r in summary_table(lone).iterrows()]
    assert only["solved"] is pd.NA and only["runs"] == 1 and math.isnan(only["median_val_loss_ratio"])
    assert "| pruned | steps |" in md
    assert _marker(table.loc[solved]) == ("o", 90, "running")
    assert _marker(table.loc[other])[::2] == ("v", "pruned@150")
    labels = [h.get_label() for h in _phase_legend()]
    assert "no verdict (running, failed)" in labels and "pruned (steps trained)" in labels


def test_the_reports_note_says_what_copy_and_the_classification_tasks_measure():
    """The note under a report's title said the log10 ratio was taken from dL/dh_T and gave digits' chance
    only: for copy the window starts at T+11 and accuracy counts the 8 symbols (a walkthrough)."""
    from pipeline.report.write import NOTES
    from pipeline.training.tasks import make_task

    T = 30
    assert make_task("copy", T).window[0] == T + 11 and "(T; T+11 for copy)" in NOTES
    assert make_task("adding", T).window[0] == T and make_task("temporal_order", T).window[0] == T
    chances = {"digits": 10, "temporal order": 4, "copy's recalled symbols": 8}
    classes = {n: make_task(n.split("'")[0].replace(" ", "_"), 64).output_size for n in chances}
    classes["copy's recalled symbols"] -= 1  # the blank is no recalled symbol
    assert classes == chances
    assert all(f"1/{k} for {n}" in NOTES for n, k in chances.items()), NOTES
