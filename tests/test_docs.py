"""Public names are documented: every config key and every metric a run logs appears in the README."""

import re

import pytest
from conftest import ROOT

from pipeline.config import config_keys
from pipeline.training.run import run

README = (ROOT / "README.md").read_text()


def test_every_config_key_is_documented():
    missing = [k for k in config_keys() if f"`{k}`" not in README]
    assert not missing, missing


def test_every_logged_metric_and_tag_is_documented(store, tiny):
    names = set()
    # tanh and lstm on adding, and a classification task (val/accuracy)
    for over in ({"model.cell": "tanh"}, {"model.cell": "lstm"}, {"task.name": "temporal_order"}):
        r = run(tiny(**over, **{"clip.mode": "norm"}))
        names |= set(r.metrics) | set(r.tags)
    from mlflow.tracking import MlflowClient

    c = MlflowClient(store)
    got = c.get_run(r.run_id)
    names |= set(got.data.metrics) | {t for t in got.data.tags if not t.startswith("mlflow.")}
    documented = set(re.findall(r"`([a-z_./0-9<>-]+)`", README))
    missing = []
    for n in sorted(names):
        generic = re.sub(r"_(i|f|g|o|r|z|n)$", "_<gate>", n)
        if n not in documented and generic not in documented:
            missing.append(n)
    assert not missing, missing


def test_every_public_python_name_is_documented():
    """`pipeline.__all__` is the Python API (README, "Your own model"): each name in backticks there."""
    import pipeline

    missing = [n for n in pipeline.__all__ if f"`{n}`" not in README]
    assert not missing, missing
    listed = re.search(r"The public names are those of\s+`pipeline.__all__`:(.*?)\n\n", README, re.S)
    assert listed and set(re.findall(r"`([A-Za-z_]+)`", listed.group(1))) == set(pipeline.__all__)


def test_a_suite_may_read_every_tag_of_the_runs_table_and_no_other():
    """tag_equals reads the tags README's Tags table lists (and the DAG's, under "The Airflow DAG"), the
    same list the suite loader accepts: a misspelt tag failed only after every entry had trained (a
    real-data walkthrough)."""
    from pipeline.regression.metrics import KNOWN_TAGS, check_tag
    from pipeline.schema import ConfigError

    table = README[README.index("**Tags**") : README.index("**Metrics** (step = optimizer step")]
    rows = [ln.split(" | ")[0] for ln in table.splitlines() if ln.startswith("| `")]
    names = {n for row in rows for n in re.findall(r"`([^`]+)`", row)}
    names = {n.replace("<metric>", "val/loss") for n in names}
    names -= {
        "pipeline.heartbeat"
    }  # regression parent runs only: no entry run, which tag_equals reads, has it
    assert len(names) > 20, names
    assert [n for n in sorted(names) if check_tag("t", n) != n] == []  # raises ConfigError, naming it
    dag = {"regression_key", "regression_fingerprint"}
    assert all(f"`{n}`" in README for n in dag)
    recorded = README[README.index("### What is recorded (MLflow experiment `regression`)") :]
    recorded = recorded[: recorded.index("\n##")]  # the entry runs' own tags
    documented = (
        names | dag | set(re.findall(r"`([a-z_.]+)[`=]", table + recorded))
    )  # `error`: in status's row
    assert documented >= KNOWN_TAGS, sorted(KNOWN_TAGS - documented)  # nothing a suite reads is undocumented
    for bad in ("regim", "Regime", "nonfinite.", "val/loss", 3):
        with pytest.raises(ConfigError, match=r"^config key 't': unknown tag"):
            check_tag("t", bad)


def test_a_suite_may_read_every_metric_of_the_runs_table():
    """README, "Regression suites": "metric names are the public ones" (the runs' Metrics table under
    "The MLflow record"). `bptt/c_log10_ratio_per_step` and `bptt/overflow_step` were in the table and
    logged, but a suite check on them failed to load, "unknown metric" (a README review)."""
    from pipeline.regression.metrics import KNOWN_METRICS, check_metric

    table = README[README.index("**Metrics** (step = optimizer step") :]
    rows = []
    for line in table.splitlines()[4:]:
        if not line.startswith("| `") or "layer<k>" in line:  # the rest: your own model's, MLflow's system
            break
        rows.append(line.split(" | ")[0])
    names = {
        n.replace("<gate>", "f").replace("<i>", "1") for row in rows for n in re.findall(r"`([^`]+)`", row)
    }
    assert len(names) > 30, names
    assert [n for n in sorted(names) if check_metric("m", n) != n] == []  # raises ConfigError, naming it
    assert names >= KNOWN_METRICS, sorted(KNOWN_METRICS - names)  # nothing a suite reads is undocumented
