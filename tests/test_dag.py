"""The Airflow 3 DAG: it parses fast with no heavy imports, and runs end to end through ``dag.test()``.

Airflow reads AIRFLOW_HOME when it is first imported, so everything here runs in subprocesses with a
temporary AIRFLOW_HOME (its own sqlite metadata DB, made by ``airflow db migrate``); nothing touches
~/airflow. One driver process runs several DAG runs, so the in-process execution API that ``dag.test()``
starts (tens of seconds on a busy 2-core machine) is paid once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("airflow", reason="Airflow is the optional extra: pip install '.[airflow]'")

pytestmark = pytest.mark.airflow

ROOT = Path(__file__).resolve().parents[1]
DAG_ID = "rnn_gradient_regression"
BIN = Path(sys.executable).parent


def airflow_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "airflow"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_TRACKING_URI"))}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW_VAR_RNN_REGRESSION_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "AIRFLOW_VAR_RNN_REGRESSION_REPORT_DIR": str(tmp_path / "reports"),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    return env


def run_py(code: str, env: dict, timeout: int = 900) -> dict:
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"rc={p.returncode}\n{p.stdout[-5000:]}\n{p.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


PARSE = f"""
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
t = time.perf_counter()
bag = DagBag(dag_folder={str(ROOT / "dags")!r})
took = time.perf_counter() - t
dag = bag.dags.get({DAG_ID!r})
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlflow', 'pytorch_lightning', 'pipeline', 'pandas'))
print('RESULT ' + json.dumps({{
    'errors': bag.import_errors, 'took': took, 'tasks': sorted(dag.task_ids) if dag else None,
    'file_s': [s.duration.total_seconds() for s in bag.dagbag_stats], 'heavy': heavy,
    'schedule': str(dag.timetable) if dag else None, 'catchup': dag.catchup if dag else None,
    'retries': {{t.task_id: t.retries for t in dag.tasks}} if dag else None,
}}))
"""


def test_dag_parses_without_heavy_imports(tmp_path):
    r = run_py(PARSE, airflow_env(tmp_path), timeout=300)
    assert r["errors"] == {}
    assert r["tasks"] == ["compare", "prepare_stores", "publish_report", "run_entry"]
    assert r["heavy"] == []  # torch, Lightning, MLflow, pandas and the pipeline load inside tasks only
    print("DAG file parse times (s):", r["file_s"])  # measured ~0.1 s on a busy 2-core machine; not asserted
    assert "0 0 * * *" in r["schedule"] and r["catchup"] is False
    assert r["retries"]["run_entry"] == 2


BAD_SETTINGS = f"""
import json, os
from airflow.dag_processing.dagbag import DagBag
out = []
for name, value in json.loads({
    json.dumps(
        json.dumps(
            [
                ["AIRFLOW_VAR_RNN_REGRESSION_MAX_PARALLEL", "0"],
                ["AIRFLOW_VAR_RNN_REGRESSION_MAX_PARALLEL", "two"],
                ["AIRFLOW_VAR_RNN_REGRESSION_ENTRY_TIMEOUT", "-5"],
                ["AIRFLOW_VAR_RNN_REGRESSION_ENTRY_TIMEOUT", "nan"],
                ["AIRFLOW_VAR_RNN_REGRESSION_ENTRY_TIMEOUT", "1e300"],
                ["AIRFLOW_VAR_RNN_REGRESSION_SCHEDULE", "@dialy"],
                ["AIRFLOW_VAR_RNN_REGRESSION_SCHEDULE", "61 0 * * *"],
                ["AIRFLOW_VAR_RNN_REGRESSION_SCHEDULE", ""],
                ["AIRFLOW_VAR_RNN_REGRESSION_SCHEDULE", "None"],
                ["AIRFLOW_VAR_RNN_REGRESSION_ENTRY_TIMEOUT", "0.5"],
            ]
        )
    )
}):
    os.environ[name] = value
    bag = DagBag(dag_folder={str(ROOT / "dags")!r})
    dag = bag.dags.get({DAG_ID!r})
    out.append([name, value, list(bag.import_errors.values()), dag is not None and type(dag.timetable).__name__])
    del os.environ[name]
print('RESULT ' + json.dumps(out))
"""


def test_a_bad_parse_time_setting_is_a_broken_dag_naming_it(tmp_path):
    """0 entries at once parsed, and would never start one (with one run at a time, blocking every later
    night); a timeout of 0 or less failed every entry at once (found by a review); a mistyped schedule
    was Airflow's croniter message, naming neither variable nor value (a platform-team walkthrough). Each
    is an import error naming the variable, as Airflow shows a broken DAG; a valid value parses."""
    results = run_py(BAD_SETTINGS, airflow_env(tmp_path), timeout=300)
    *bad, (_, _, errors, manual), (_, _, errors2, parsed) = results
    assert errors == [] and manual == "NullTimetable"  # schedule "none": manual triggers only
    assert errors2 == [] and parsed == "CronTriggerTimetable"  # 0.5 minutes is a valid timeout
    for name, value, errs, parsed in bad:
        assert not parsed and len(errs) == 1, (name, value, errs)
        assert f"{name} must be " in errs[0] and f"got {value!r}" in errs[0], errs[0]
        if name.endswith("SCHEDULE"):
            # Airflow's own reason kept after the name and value (croniter's: "out of range" for minute 61)
            why = errs[0].split(f"got {value!r}: ", 1)[1].strip()
            assert why and ("out of range" in why) == value.startswith("61"), errs[0]
        else:
            assert f"> 0, got {value!r}" in errs[0], errs[0]


DRIVE = f"""
import json, sys
from datetime import datetime, timezone
from airflow.utils.db import upgradedb
upgradedb()  # what `airflow db migrate` does, without paying a second Airflow start-up
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder={str(ROOT / "dags")!r}).dags[{DAG_ID!r}]
out = []
import os
for suite, day, *uri in json.loads(sys.argv[1]):
    if uri:  # this run's store Variable (Airflow reads the variable's environment at each get)
        os.environ["AIRFLOW_VAR_RNN_REGRESSION_TRACKING_URI"] = uri[0]
    dr = dag.test(logical_date=datetime(2026, 1, day, tzinfo=timezone.utc), run_conf={{'suite': suite}})
    tis = {{ti.task_id + ('' if ti.map_index < 0 else f'[{{ti.map_index}}]'): [str(getattr(ti.state, 'value', ti.state)), ti.try_number]
           for ti in dr.get_task_instances()}}
    out.append([str(getattr(dr.state, 'value', dr.state)), tis])
print('RESULT ' + json.dumps(out))
"""

TINY = {
    "name": "tiny",
    "defaults": {
        "seed": 0,
        "task": {"name": "adding", "seq_len": 12, "batch_size": 16, "val_size": 32},
        "model": {"cell": "tanh", "hidden_size": 8, "init": "gaussian", "init_scale": 0.5},
        "optim": {"name": "adam", "lr": 0.01},
        "trainer": {"accelerator": "cpu", "max_steps": 10, "val_every": 10, "log_every": 5},
        "diagnostics": {"profile_every": 0, "probe_size": 8, "plots": False},
    },
    "entries": [
        {
            "name": "tanh_g05",
            "checks": [{"pascanu_bound_holds": {}}],
            "baseline": {"bptt/log10_ratio": {"abs": 0.05}},
        },
        {
            "name": "orth",
            "patch": {"model": {"cell": "orthogonal", "init_scale": 1.0}},
            "checks": [{"metric_equals": {"metric": "spectral/sigma_max", "value": "g", "tol": 1e-4}}],
        },
    ],
}


def _mlflow(uri: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    return c, c.search_runs([c.get_experiment_by_name("regression").experiment_id])


def test_dag_end_to_end_idempotent_and_fails_on_a_planted_regression(tmp_path):
    env = airflow_env(tmp_path)
    good = tmp_path / "tiny.yaml"
    good.write_text(yaml.safe_dump(TINY))
    (tmp_path / "tiny.baseline.yaml").write_text(
        yaml.safe_dump({"entries": {"tanh_g05": {"bptt/log10_ratio": {"value": -5.596, "abs": 0.05}}}})
    )
    planted = tmp_path / "planted" / "tiny.yaml"
    planted.parent.mkdir()
    planted.write_text(yaml.safe_dump(TINY))
    (planted.parent / "tiny.baseline.yaml").write_text(
        yaml.safe_dump({"entries": {"tanh_g05": {"bptt/log10_ratio": {"value": 50.0, "abs": 0.05}}}})
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        yaml.safe_dump({**TINY, "entries": [{"name": "x", "patch": {"model": {"cel": "gru"}}}]})
    )
    crash = tmp_path / "crash" / "tiny.yaml"
    crash.parent.mkdir()
    crashing = yaml.safe_load(yaml.safe_dump(TINY))
    crashing["entries"][1]["patch"]["trainer"] = {
        "accelerator": "gpu"
    }  # no GPU: Lightning refuses the config
    crash.write_text(yaml.safe_dump(crashing))
    # Day 2 twice (a rerun of the same data interval must reuse its runs), day 3 with a planted baseline,
    # day 5 with an invalid suite (a configuration error: fails at once, no retry), day 6 with an entry
    # that crashes (the others still run, compare still reports, the DAG run fails).
    # Day 7 names a suite no file or shipped suite has; day 8's store Variable has a mistyped scheme
    # (retried for 4 minutes, a walkthrough): configuration errors, each failing prepare_stores once.
    plan = [[str(good), 2], [str(good), 2], [str(planted), 3], [str(broken), 5], [str(crash), 6]]
    plan += [["nope", 7], [str(good), 8, f"sqlit:///{tmp_path / 'x.db'}"]]
    code = DRIVE.replace("json.loads(sys.argv[1])", repr(plan))
    (s1, tis1), (s2, _), (s3, tis3), (s4, tis4), (s5, tis5), (s6, tis6), (s7, tis7) = run_py(code, env)
    assert (s1, s2, s3, s4, s5, s6, s7) == (
        "success",
        "success",
        "failed",
        "failed",
        "failed",
        "failed",
        "failed",
    )
    for tis in (tis4, tis6, tis7):  # prepare_stores' failure alone: compare does not fail after it (it did,
        # "prepare_stores produced no jobs", after an "XCom not found" line: a walkthrough)
        assert tis["prepare_stores"] == ["failed", 1], tis
        assert tis["compare"][0] in ("upstream_failed", "skipped"), tis
    assert not (tmp_path / "x.db").exists()
    assert all(state == "success" and tries == 1 for state, tries in tis1.values()), tis1
    assert tis3["compare"][0] == "success" and tis3["publish_report"] == ["failed", 1]  # no retry
    assert tis4["prepare_stores"] == ["failed", 1] and tis4["run_entry"][0] == "upstream_failed"
    assert tis5["run_entry[0]"][0] == "success" and tis5["run_entry[1]"] == ["failed", 1], tis5
    assert tis5["compare"][0] == "success" and tis5["publish_report"][0] == "failed"

    uri = env["AIRFLOW_VAR_RNN_REGRESSION_TRACKING_URI"]
    c, runs = _mlflow(uri)
    day2 = [r for r in runs if r.data.tags.get("regression_key") == "tiny@2026-01-02T00:00:00+00:00"]
    parents = [r for r in day2 if r.data.tags.get("regression_role") == "suite"]
    children = [r for r in day2 if r.data.tags.get("regression_role") == "entry"]
    assert len(parents) == 1 and len(children) == 2  # the second DAG run trained nothing new
    assert parents[0].data.tags["verdict"] == "pass" and parents[0].info.status == "FINISHED"
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    report = tmp_path / "reports" / "tiny@2026-01-02T00_00_00_00_00" / "report.md"
    assert "PASS" in report.read_text() and "orth: metric_equals spectral/sigma_max" in report.read_text()
    assert (report.parent / "table.txt").read_text() in report.read_text()  # beside it (README, "The DAG")
    assert sorted(p.name for p in report.parent.iterdir()) == ["report.md", "table.txt"]

    day3 = [
        r
        for r in runs
        if r.data.tags.get("regression_key") == "tiny@2026-01-03T00:00:00+00:00"
        and r.data.tags.get("regression_role") == "suite"
    ]
    assert day3[0].data.tags["verdict"] == "regression"
    assert "tanh_g05: bptt/log10_ratio" in day3[0].data.tags["failed_checks"]
    text = (tmp_path / "reports" / "tiny@2026-01-03T00_00_00_00_00" / "report.md").read_text()
    assert "REGRESSION" in text and "tanh_g05: bptt/log10_ratio" in text
    text = (tmp_path / "reports" / "tiny@2026-01-06T00_00_00_00_00" / "report.md").read_text()
    assert "error: orth: run: MisconfigurationException" in text


def test_the_airflow_cli_runs_a_suite_as_the_readme_says(tmp_path):
    """`airflow db migrate`, then `airflow dags test` with the suite as a path relative to the checkout
    (README, "The DAG"). The shipped smoke suite's science is checked through the CLI
    (tests/test_regression.py, under an unrecorded perturbation); through the DAG it trained the same
    entries a second time (70 s of a 16-minute make test, and 92 s of the Airflow floor's run), so
    here the two-entry tiny suite goes the README's way instead."""
    env = airflow_env(tmp_path)
    suite = tmp_path / "tiny.yaml"
    suite.write_text(yaml.safe_dump(TINY))
    (tmp_path / "tiny.baseline.yaml").write_text(
        yaml.safe_dump({"entries": {"tanh_g05": {"bptt/log10_ratio": {"value": -5.596, "abs": 0.05}}}})
    )
    relative = os.path.relpath(suite, ROOT)
    assert not Path(relative).is_absolute()
    for cmd in (
        ["db", "migrate"],
        ["dags", "test", DAG_ID, "2026-01-04", "-c", json.dumps({"suite": relative})],
    ):
        p = subprocess.run(  # from elsewhere: the path is the checkout's, not the working folder's
            [str(BIN / "airflow"), *cmd], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path
        )
        assert p.returncode == 0, f"airflow {cmd[:2]}: " + (p.stdout[-4000:] + p.stderr[-4000:])
    _, runs = _mlflow(env["AIRFLOW_VAR_RNN_REGRESSION_TRACKING_URI"])
    parent = [r for r in runs if r.data.tags.get("regression_role") == "suite"]
    assert len(parent) == 1 and parent[0].data.tags["verdict"] == "pass", [r.data.tags for r in parent]
    assert parent[0].data.tags["regression_key"] == "tiny@2026-01-04T00:00:00+00:00"
    entries = [r.info.run_name for r in runs if r.data.tags.get("regression_role") == "entry"]
    assert sorted(entries) == ["tiny/orth", "tiny/tanh_g05"]
    report = tmp_path / "reports" / "tiny@2026-01-04T00_00_00_00_00" / "report.md"
    assert "PASS" in report.read_text()
