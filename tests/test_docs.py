"""Public names are documented: every config key and every metric a run logs appears in the README."""

import re

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
