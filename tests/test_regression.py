"""Regression suite: laws that can fail, baselines that catch a planted regression, the CLI contract.

Fast tests use a two-entry suite of tiny configs (about a second per run); the real smoke suite runs in
the slow test at the end (`make regress` as CI and a new user run it).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.regression.baselines import Band, baseline_row, spread_rows
from pipeline.regression.expr import evaluate
from pipeline.regression.laws import LAW, PASS, REGRESSION, EntryResult, parse_check, run_check
from pipeline.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "defaults": {
        "seed": 0,
        "task": {"name": "adding", "seq_len": 12, "batch_size": 16, "val_size": 32},
        "model": {"cell": "tanh", "hidden_size": 8},
        "optim": {"name": "adam", "lr": 0.01},
        "trainer": {"accelerator": "cpu", "max_steps": 10, "val_every": 10, "log_every": 5},
        "diagnostics": {"profile_every": 0, "probe_size": 8, "plots": False},
    },
    "entries": [
        {
            "name": "tanh_g05",
            "patch": {"model": {"init": "gaussian", "init_scale": 0.5}},
            "checks": [
                {"metric_below": {"metric": "bptt/log10_ratio", "value": -1}},
                {"pascanu_bound_holds": {}},
            ],
            "baseline": {"bptt/log10_ratio": {"abs": 0.05}},
        },
        {
            "name": "orth",
            "patch": {"model": {"cell": "orthogonal", "init_scale": 1.0}},
            "checks": [{"metric_equals": {"metric": "spectral/sigma_max", "value": "g", "tol": 1e-4}}],
        },
    ],
    "compare": [
        {"difference_of_runs": {"metric": "bptt/log10_ratio", "a": "orth", "b": "tanh_g05", "min": 1}}
    ],
}


def write_suite(tmp_path: Path, suite: dict, baseline: dict | None = None) -> Path:
    p = tmp_path / "suite.yaml"
    p.write_text(yaml.safe_dump(suite, sort_keys=False))
    if baseline is not None:
        (tmp_path / "suite.baseline.yaml").write_text(
            yaml.safe_dump({"suite": suite["name"], "entries": baseline})
        )
    return p


def runs(uri: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("regression")
    return c, (c.search_runs([exp.experiment_id]) if exp else [])


def parents(uri: str):
    c, rs = runs(uri)
    return c, [r for r in rs if r.data.tags.get("regression_role") == "suite"]


# ------------------------------------------------------------------------------- the CLI, end to end


def test_passing_suite_exits_0_records_everything_and_update_shows_changes(store, tmp_path, capsys):
    suite = write_suite(tmp_path, TINY)
    assert main(["regress", "--suite", str(suite), "--update-baseline"]) == 0
    out = capsys.readouterr().out
    base = yaml.safe_load((tmp_path / "suite.baseline.yaml").read_text())
    accepted = dict(base["entries"]["tanh_g05"]["bptt/log10_ratio"])
    assert accepted["abs"] == 0.05 and accepted["value"] < -1
    assert base["records"] == sum(len(m) for m in base["entries"].values()) > 0  # a cut-off file is seen
    assert "tanh_g05: bptt/log10_ratio" in out and "new" in out  # the diff of what changed

    assert main(["regress", "--suite", str(suite)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("check"))
    assert header.split() == ["check", "baseline", "now", "band", "verdict"]
    assert "REGRESSION" not in out and "law violated" not in out and "-> PASS" in out

    c, ps = parents(store)
    assert len(ps) == 2 and all(p.info.status == "FINISHED" for p in ps)
    last = max(ps, key=lambda r: r.info.start_time)
    # README "What is recorded": the run that rewrote the file says so, the run that judged does not
    assert [p.data.tags.get("baseline_updated") for p in sorted(ps, key=lambda r: r.info.start_time)] == [
        "true",
        None,
    ]
    tags = last.data.tags
    assert tags["verdict"] == "pass" and tags["pipeline.kind"] == "regression" and tags["suite"] == "tiny"
    assert tags["git_commit"] and "version.torch" in tags and "version.mlflow" in tags
    assert last.data.metrics["regression/failed"] == 0
    table = Path(c.download_artifacts(last.info.run_id, "regression/table.txt", str(tmp_path)))
    assert "orth: metric_equals spectral/sigma_max" in table.read_text()
    # README "What is recorded": the suite file and the baseline it was judged against, as they are
    assert [a.path for a in c.list_artifacts(last.info.run_id, "suite")] == [
        "suite/suite.baseline.yaml",
        "suite/suite.yaml",
    ]
    kept = Path(c.download_artifacts(last.info.run_id, "suite/suite.baseline.yaml", str(tmp_path / "got")))
    assert kept.read_text() == (tmp_path / "suite.baseline.yaml").read_text()
    _, everything = runs(store)
    children = [r for r in everything if r.data.tags.get("mlflow.parentRunId") == last.info.run_id]
    assert sorted(r.data.tags["entry"] for r in children) == ["orth", "tanh_g05"]
    assert all(r.info.status == "FINISHED" and r.data.tags["pipeline.kind"] == "regression" for r in children)
    assert "bptt/log10_ratio" in children[0].data.metrics

    # --update-baseline again on the unchanged suite: same numbers, so the file is not rewritten (no
    # date-only diff to commit) and the run says so.
    path = tmp_path / "suite.baseline.yaml"
    text, mtime = path.read_text(), path.stat().st_mtime_ns
    time.sleep(0.01)  # a rewrite would show in the mtime
    assert main(["regress", "--suite", str(suite), "--update-baseline"]) == 0
    out = capsys.readouterr().out
    assert f"baseline unchanged: {path} not rewritten" in out and "baseline written" not in out
    assert path.read_text() == text and path.stat().st_mtime_ns == mtime
    assert "baseline_updated" not in max(parents(store)[1], key=lambda r: r.info.start_time).data.tags

    # What --update-baseline shows when numbers move: old -> new and the change.
    from pipeline.regression.baselines import baseline_diff

    old = {
        "tanh_g05": {"bptt/log10_ratio": {"value": -4.0, "abs": 0.05}},
        "gone": {"val/loss": {"value": 1.0}},
    }
    diff = baseline_diff(old, base["entries"])
    assert (
        "tanh_g05: bptt/log10_ratio",
        "-4",
        f"{accepted['value']:.4g}",
        f"{accepted['value'] + 4:+.4g} ({(accepted['value'] + 4) / 4:+.1%})",
    ) in diff
    assert ("gone: val/loss", "1", "-", "removed") in diff


def test_a_keyed_attempt_after_the_suite_changed_trains_the_changed_entry_again(store, tmp_path):
    """The DAG's idempotency (README, "The Airflow DAG"): a second attempt of one key reuses the FINISHED
    runs of the entries the suite still trains as before, trains again an entry it changed, reads that
    run back (not the first attempt's) and logs the suite file as it is now. It reused the first
    attempt's run and judged it against the edited file (a platform-team walkthrough)."""
    import mlflow

    from pipeline.regression.run import FINGERPRINT, collect, run_entry, start_suite_run
    from pipeline.regression.suite import load_suite

    def attempt(data):
        suite = load_suite(str(write_suite(tmp_path, data)))
        parent, exp = start_suite_run(suite, key="k", uri=store)
        ids = {e.name: run_entry(suite, e.name, parent, exp, key="k", uri=store) for e in suite.entries}
        return suite, parent, ids

    _, parent, first = attempt(TINY)
    again = attempt(TINY)[2]
    assert again == first  # nothing changed: nothing trained
    edited = yaml.safe_load(yaml.safe_dump(TINY))
    edited["entries"][0]["patch"]["model"]["init_scale"] = 0.4
    suite, parent2, second = attempt(edited)
    assert parent2 == parent and second["orth"] == first["orth"]
    assert second["tanh_g05"] != first["tanh_g05"]
    c = mlflow.MlflowClient(store)
    run = c.get_run(second["tanh_g05"])
    assert (
        run.data.params["model.init_scale"] == "0.4"
        and run.data.tags[FINGERPRINT] != c.get_run(first["tanh_g05"]).data.tags[FINGERPRINT]
    )
    # an attempt whose run id did not come back reads the entry's run as the suite now trains it
    got = collect(suite, {"tanh_g05": None, "orth": second["orth"]}, parent, store)["tanh_g05"]
    assert got.run_id == run.info.run_id
    logged = mlflow.artifacts.download_artifacts(
        run_id=parent, artifact_path="suite/suite.yaml", tracking_uri=store
    )
    assert "init_scale: 0.4" in Path(logged).read_text()
    # one that failed before its run was made reads none, not an earlier attempt's of another config
    edited["entries"][0]["patch"]["model"]["init_scale"] = 0.3
    third = load_suite(str(write_suite(tmp_path, edited)))
    got = collect(third, {"tanh_g05": None, "orth": second["orth"]}, parent, store)["tanh_g05"]
    assert (got.status, got.run_id) == ("MISSING", None)


def test_planted_regression_fails_and_names_the_check(store, tmp_path, capsys):
    # A baseline the code can no longer meet: the tanh g=0.5 ratio was "accepted" at +50 decades.
    suite = write_suite(tmp_path, TINY, {"tanh_g05": {"bptt/log10_ratio": {"value": 50.0, "abs": 0.05}}})
    assert main(["regress", "--suite", str(suite)]) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("tanh_g05: bptt/log10_ratio"))
    assert row.split()[-1] == "REGRESSION" and "50" in row
    assert "REGRESSION: tanh_g05: bptt/log10_ratio: bptt/log10_ratio moved by" in out
    assert "-> REGRESSION" in out
    _, ps = parents(store)
    assert ps[0].data.tags["verdict"] == "regression"
    assert "tanh_g05: bptt/log10_ratio" in ps[0].data.tags["failed_checks"]


def test_violated_law_fails_and_update_baseline_is_refused(store, tmp_path, capsys):
    bad = yaml.safe_load(yaml.safe_dump(TINY))
    bad["entries"][0]["checks"].append({"decay_rate_equals": {"value": "ln(g) + 1", "tol": 0.05}})
    suite = write_suite(tmp_path, bad)
    assert main(["regress", "--suite", str(suite), "--update-baseline"]) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("tanh_g05: decay_rate_equals"))
    assert row.endswith("law violated") and "ln(g) + 1 = 0.3069" in row
    assert "baseline NOT written" in out and not (tmp_path / "suite.baseline.yaml").exists()


def test_a_failed_run_is_an_error_row_and_the_others_still_run(store, tmp_path, capsys, monkeypatch):
    from pipeline.training.models import OrthogonalRNN

    def crash(self, x):  # orth's training raises (an accelerator missing here is now refused before any run)
        raise RuntimeError("planted crash in orth's forward")

    monkeypatch.setattr(OrthogonalRNN, "forward", crash)
    suite = yaml.safe_load(yaml.safe_dump(TINY))
    suite.pop("compare")
    assert main(["regress", "--suite", str(write_suite(tmp_path, suite))]) == 1
    out = capsys.readouterr().out
    assert "error: orth: run: RuntimeError: planted crash" in out
    assert next(ln for ln in out.splitlines() if ln.startswith("tanh_g05: pascanu_bound_holds")).endswith(
        "pass"
    )
    _, everything = runs(store)
    status = {r.data.tags.get("entry"): r.info.status for r in everything if r.data.tags.get("entry")}
    assert status == {"tanh_g05": "FINISHED", "orth": "FAILED"}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_a_suite_for_an_accelerator_this_machine_lacks_is_exit_2_before_any_run(store, tmp_path, capsys):
    """The GPU suite on a CPU runner is a misrouted job, told in one line (exit 2) before the store is
    touched: each entry failed in Lightning and the suite read REGRESSION, exit 1, as if the science had
    broken (a platform-team walkthrough). ``--set trainer.accelerator=cpu`` runs it here."""
    if _has_cuda():
        pytest.skip("this machine has a GPU")
    gpu = yaml.safe_load(yaml.safe_dump(TINY))
    gpu["defaults"]["trainer"]["accelerator"] = "gpu"
    gpu.pop("compare")
    suite = write_suite(tmp_path, gpu)
    assert main(["regress", "--suite", str(suite)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: config key 'entries.tanh_g05.trainer.accelerator': 'gpu', but")
        and "\n" not in err
    )
    assert "run the suite where torch sees a GPU, or --set trainer.accelerator=cpu" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite.yaml"]  # no store, no baseline
    assert main(["regress", "--suite", str(suite), "--update-baseline"]) == 2  # which refuses --set
    err = capsys.readouterr().err.strip()
    assert err.endswith("run the suite where torch sees a GPU") and "--set" not in err


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda s: s.update(entriez=[]), "entriez"),
        (lambda s: s["entries"][0]["patch"]["model"].update(cel="gru"), "entries.tanh_g05.model.cel"),
        (
            lambda s: s["entries"][0]["checks"].append({"metric_abuv": {}}),
            "entries.tanh_g05.checks[2].metric_abuv",
        ),
        (
            lambda s: s["entries"][0]["checks"].append(
                {"metric_above": {"metric": "bptt/log10_ratoi", "value": 1}}
            ),
            "entries.tanh_g05.checks[2].metric_above.metric",
        ),
        (
            lambda s: s["entries"][1]["checks"].append({"decay_rate_equals": {"value": "ln(q)", "tol": 0.1}}),
            "entries.orth.checks[1].decay_rate_equals.value",
        ),
        (lambda s: s["compare"][0]["difference_of_runs"].update(a="nope"), "compare[0].difference_of_runs.a"),
        (
            lambda s: s["entries"][0]["baseline"].update({"val/loss": {"abs": -1}}),
            "entries.tanh_g05.baseline.val/loss.abs",
        ),
        (lambda s: s["entries"].append(dict(s["entries"][0])), "entries[2].name"),
        # wrong types: a string read as true flipped a failing comparison to a pass; a complex number or
        # a list crashed the judging after training (exit 1, store written)
        (
            lambda s: s["compare"].append({"ratio_of_runs": {**RATIO, "diverged_as_inf": "no"}}),
            "compare[1].ratio_of_runs.diverged_as_inf",
        ),
        (
            lambda s: s["compare"].append({"ratio_of_runs": {**RATIO, "numerator": ["orth"]}}),
            "compare[1].ratio_of_runs.numerator",
        ),
        (
            lambda s: s["entries"][0]["checks"].append(
                {"metric_below": {"metric": "val/loss", "value": "(-1)**0.5"}}
            ),
            "entries.tanh_g05.checks[2].metric_below.value",
        ),
        (
            lambda s: s["entries"][0]["checks"].append(
                {"decay_rate_equals": {"value": "ln((-g)**0.5)", "tol": 0.1}}
            ),
            "entries.tanh_g05.checks[2].decay_rate_equals.value",
        ),
        (
            lambda s: s["entries"][0]["checks"].append(
                {"decay_rate_equals": {"value": "ln(g)", "tol": "(-2)**0.5"}}
            ),
            "entries.tanh_g05.checks[2].decay_rate_equals.tol",
        ),
        (
            lambda s: s["entries"][0]["checks"].append({"tag_equals": {"tag": ["regime"], "value": "x"}}),
            "entries.tanh_g05.checks[2].tag_equals.tag",
        ),
        (
            lambda s: s["entries"][0]["checks"].append(
                {"tag_equals": {"tag": "regime", "value": ["a", "b"]}}
            ),
            "entries.tanh_g05.checks[2].tag_equals.value",
        ),
        # a misspelt tag read as absent after every entry had trained: a law violated, "REGRESSION"
        (
            lambda s: s["entries"][0]["checks"].append({"tag_equals": {"tag": "regim", "value": "healthy"}}),
            "entries.tanh_g05.checks[2].tag_equals.tag",
        ),
    ],
)
def test_invalid_suite_is_one_line_exit_2_nothing_written(store, tmp_path, capsys, mutate, key):
    bad = yaml.safe_load(yaml.safe_dump(TINY))
    mutate(bad)
    suite = write_suite(tmp_path, bad)
    assert main(["regress", "--suite", str(suite)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and f"'{key}'" in err and "\n" not in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "suite.baseline.yaml").exists()


RATIO = {"metric": "grad/max_norm_preclip", "numerator": "orth", "denominator": "tanh_g05", "min": 1}
ACCEPTED = {"value": -3.0, "abs": 0.05}


@pytest.mark.parametrize(
    ("suite_field", "entries", "key"),
    [
        (
            "tiny",
            {"tanh_g05": {"bptt/log10_ratio": {"value": "high"}}},
            "suite.baseline.yaml: entries.tanh_g05.bptt/log10_ratio",
        ),
        # numbers that would never be compared while the suite passes: a renamed entry, an entry whose
        # `baseline:` was lost (one of the shipped smoke entries, in a merge), another suite's file
        ("tiny", {"tanh_g5": {"bptt/log10_ratio": ACCEPTED}}, "suite.baseline.yaml: entries.tanh_g5"),
        (
            "tiny",
            {"orth": {"bptt/log10_ratio": ACCEPTED}},
            "suite.baseline.yaml: entries.orth.bptt/log10_ratio",
        ),
        ("smoke", {"tanh_g05": {"bptt/log10_ratio": ACCEPTED}}, "suite.baseline.yaml: suite"),
        # accepted numbers no run can meet (.nan) or that every run meets (.inf, with a band)
        (
            "tiny",
            {"tanh_g05": {"bptt/log10_ratio": {"value": float("nan"), "abs": 0.05}}},
            "suite.baseline.yaml: entries.tanh_g05.bptt/log10_ratio",
        ),
        (
            "tiny",
            {"tanh_g05": {"bptt/log10_ratio": {"value": float("-inf"), "abs": 0.05}}},
            "suite.baseline.yaml: entries.tanh_g05.bptt/log10_ratio",
        ),
        (  # no float holds it: math.isfinite raised OverflowError, a traceback
            "tiny",
            {"tanh_g05": {"bptt/log10_ratio": {"value": 10**400, "abs": 0.05}}},
            "suite.baseline.yaml: entries.tanh_g05.bptt/log10_ratio",
        ),
        (
            "tiny",
            {"tanh_g05": {"bptt/log10_ratio": {"value": -3.0, "abs": 10**400}}},
            "suite.baseline.yaml: entries.tanh_g05.bptt/log10_ratio.abs",
        ),
    ],
)
def test_invalid_baseline_file_is_exit_2(store, tmp_path, capsys, suite_field, entries, key):
    suite = write_suite(tmp_path, TINY)
    (tmp_path / "suite.baseline.yaml").write_text(yaml.safe_dump({"suite": suite_field, "entries": entries}))
    assert main(["regress", "--suite", str(suite)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and f"'{key}'" in err and "\n" not in err
    assert not (tmp_path / "mlflow.db").exists()


ONE = "  tanh_g05:\n    bptt/log10_ratio: {value: -3.0, abs: 0.05}\n"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("", "entries"),  # empty
        ("suite: tiny\nrecords: 1\nrecorded: {date: x}\n", "entries"),  # cut off before its entries
        ("suite: tiny\nentries:\n", "entries"),  # cut off right after the key, an older file (no records)
        (f"suite: tiny\nrecords: 2\nentries:\n{ONE}", "records"),  # cut off among them
        (f"suite: tiny\nrecords: true\nentries:\n{ONE}", "records"),
    ],
    ids=["empty", "header-only", "no-entries", "cut-among-entries", "records-not-a-count"],
)
def test_a_baseline_file_empty_or_cut_off_is_refused_not_read_as_none_yet(store, tmp_path, capsys, text, key):
    """A file that exists but lost its numbers (a bad merge, a partial write) passed the suite with
    none of them compared, as "no baseline yet" (found by a review): one line, exit 2."""
    suite = write_suite(tmp_path, TINY)
    (tmp_path / "suite.baseline.yaml").write_text(text)
    assert main(["regress", "--suite", str(suite)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and f"'suite.baseline.yaml: {key}'" in err and "\n" not in err
    assert "--update-baseline" in err and not (tmp_path / "mlflow.db").exists()


def test_update_baseline_rewrites_a_cut_off_file_the_remedy_its_error_names(store, tmp_path, capsys):
    """The refusal above names --update-baseline; it refused the same file (a review)."""
    suite = write_suite(tmp_path, TINY)
    (tmp_path / "suite.baseline.yaml").write_text(f"suite: tiny\nrecords: 2\nentries:\n{ONE}")
    assert main(["regress", "--suite", str(suite), "--update-baseline"]) == 0
    base = yaml.safe_load((tmp_path / "suite.baseline.yaml").read_text())
    assert base["records"] == 1 and list(base["entries"]) == ["tanh_g05"]
    assert main(["regress", "--suite", str(suite)]) == 0


def test_update_baseline_refuses_a_banded_metric_that_is_not_recorded(store, tmp_path, capsys):
    """Accepting nothing for it would drop the metric from the file and pass from then on."""
    bad = yaml.safe_load(yaml.safe_dump(TINY))
    bad["entries"][0]["baseline"]["val/accuracy"] = {"abs": 0.01}  # adding records no accuracy
    suite = write_suite(tmp_path, bad, {"tanh_g05": {"val/accuracy": {"value": 0.5, "abs": 0.01}}})
    before = (tmp_path / "suite.baseline.yaml").read_text()
    assert main(["regress", "--suite", str(suite), "--update-baseline"]) == 1
    out = capsys.readouterr().out
    assert "baseline NOT written: tanh_g05: val/accuracy: not recorded" in out
    assert (tmp_path / "suite.baseline.yaml").read_text() == before
    _, everything = runs(store)  # refused before the perturbed reruns, not after them
    assert everything and not [r for r in everything if r.data.tags.get("perturbation")]


def test_a_refused_first_baseline_is_a_failing_row_not_a_passing_suite(store, tmp_path, capsys):
    """A suite's first --update-baseline refused for a banded metric not recorded: its rows read "no
    baseline", none failing, so the parent run was closed with verdict=pass and no table was printed
    (a platform-team walkthrough; dashboards read the tag). The refusal is now an error row of both."""
    bad = yaml.safe_load(yaml.safe_dump(TINY))
    bad["entries"][0]["baseline"]["val/accuracy"] = {"abs": 0.01}  # adding records no accuracy
    suite = write_suite(tmp_path, bad)
    assert main(["regress", "--suite", str(suite), "--update-baseline"]) == 1
    out = capsys.readouterr().out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("tanh_g05: val/accuracy")]
    assert rows and rows[-1][-1] == "error", out
    assert "baseline NOT written: tanh_g05: val/accuracy: not recorded" in out
    assert out.count("baseline NOT written") == 1, out  # the row says why, the closing line what it means
    assert not (tmp_path / "suite.baseline.yaml").exists()
    (parent,) = parents(store)[1]
    assert parent.data.tags["verdict"] == "regression" and parent.info.status == "FINISHED"
    assert parent.data.tags["failed_checks"] == "tanh_g05: val/accuracy"
    assert parent.data.metrics["regression/failed"] == 1


# ------------------------------------------------------------ bands measured under perturbations

CHAOTIC = {
    "name": "tanh_g3",
    "patch": {"task": {"seq_len": 60}, "model": {"init": "gaussian", "init_scale": 3.0, "hidden_size": 32}},
    "checks": [{"metric_above": {"metric": "bptt/log10_ratio", "value": 3}}],
    "baseline": {"bptt/log10_ratio": {"abs": 0.001}, "bptt/decay_rate": {"abs": 0.5}},
}


def test_update_baseline_measures_each_band_under_perturbations(store, tmp_path, capsys):
    from pipeline.regression.baselines import SAFETY
    from pipeline.regression.run import PERTURBATIONS

    suite = yaml.safe_load(yaml.safe_dump(TINY))
    suite["entries"].append(CHAOTIC)
    path = write_suite(tmp_path, suite)
    assert main(["regress", "--suite", str(path), "--update-baseline"]) == 0
    out = capsys.readouterr().out
    assert "measured spread under the perturbations -> band:" in out
    base = yaml.safe_load((tmp_path / "suite.baseline.yaml").read_text())["entries"]

    # Every value was measured under every perturbation; the band is max(floor, SAFETY x spread).
    for entry, metrics in base.items():
        for metric, rec in metrics.items():
            assert rec["runs"] == 1 + len(PERTURBATIONS), (entry, metric)
            floor = suite["entries"][[e["name"] for e in suite["entries"]].index(entry)]["baseline"][metric][
                "abs"
            ]
            assert rec["abs"] == pytest.approx(max(floor, SAFETY * rec["spread"]), rel=0.1), (
                entry,
                metric,
                rec,
            )
            assert rec["abs"] >= SAFETY * rec["spread"] and rec["abs"] >= floor
    # In the chaotic phase a 1-ulp nudge of the weights moves the trajectory-level ratio far beyond a
    # hand-set band of 0.001 decades: the measured band says so; the statistic's floor (0.5) stays.
    chaotic = base["tanh_g3"]["bptt/log10_ratio"]
    assert chaotic["spread"] > 0.01 and chaotic["abs"] > 0.04
    assert base["tanh_g3"]["bptt/decay_rate"]["abs"] == 0.5
    # The ordered phase is insensitive: the spread is tiny and the floor is the band.
    assert (
        base["tanh_g05"]["bptt/log10_ratio"]["spread"] < 1e-3
        and base["tanh_g05"]["bptt/log10_ratio"]["abs"] == 0.05
    )

    # The perturbed runs are in the store, nested under the same parent, tagged, only for baselined entries.
    c, everything = runs(store)
    perturbed = [r for r in everything if r.data.tags.get("perturbation")]
    assert sorted((r.data.tags["entry"], r.data.tags["perturbation"]) for r in perturbed) == sorted(
        (e, p) for e in ("tanh_g05", "tanh_g3") for p in PERTURBATIONS
    )
    params = {(r.data.tags["entry"], r.data.tags["perturbation"]): r.data.params for r in perturbed}
    assert params["tanh_g3", "ulp1"]["model.init_ulp_seed"] == "1"
    assert params["tanh_g3", "threads2"]["trainer.threads"] == "2"
    assert all(r.info.run_name.endswith("~" + r.data.tags["perturbation"]) for r in perturbed)

    # The suite passes against the measured baseline, and under a perturbation it was not recorded with.
    assert main(["regress", "--suite", str(path), "--set", "model.init_ulp_seed=7"]) == 0
    out = capsys.readouterr().out
    assert "-> PASS" in out and "overrides model.init_ulp_seed=7" in out


def test_a_laws_expressions_read_the_config_after_set(store, tmp_path, capsys):
    """``--set model.init_scale=0.7``: the run trains at 0.7, and the law ``sigma_max = g`` of the orthogonal
    entry must read g = 0.7; the laws read the suite as written (g = 1), so a run that holds its law
    failed it (a new-user walkthrough: ``decay_rate_equals: ln(g)`` after ``--set model.init_scale``)."""
    from pipeline.cli import main

    suite = yaml.safe_load(yaml.safe_dump(TINY))
    suite["entries"], suite["compare"] = [e for e in suite["entries"] if e["name"] == "orth"], []
    path = write_suite(tmp_path, suite)
    assert main(["regress", "--suite", str(path), "--set", "model.init_scale=0.7"]) == 0
    out = capsys.readouterr().out
    assert "-> PASS" in out and "g = 0.7 " in out, out
    _, everything = runs(store)
    (run,) = [r for r in everything if r.data.tags.get("entry") == "orth"]
    assert run.data.params["model.init_scale"] == "0.7"
    assert run.data.metrics["spectral/sigma_max"] == pytest.approx(0.7, abs=1e-4)


def test_a_law_that_fails_only_under_a_perturbation_refuses_the_baseline(store, tmp_path, capsys):
    suite = yaml.safe_load(yaml.safe_dump(TINY))
    chaotic = yaml.safe_load(yaml.safe_dump(CHAOTIC))
    nominal = _nominal_ratio(tmp_path, chaotic)
    # A law tuned to this machine's exact trajectory: holds nominally, not after a 1-ulp nudge.
    chaotic["checks"] = [
        {"metric_between": {"metric": "bptt/log10_ratio", "low": nominal - 1e-6, "high": nominal + 1e-6}}
    ]
    suite["entries"].append(chaotic)
    path = write_suite(tmp_path, suite)
    assert main(["regress", "--suite", str(path), "--update-baseline"]) == 1
    out = capsys.readouterr().out
    assert "baseline NOT written" in out and not (tmp_path / "suite.baseline.yaml").exists()
    assert any(
        ln.startswith("tanh_g3~ulp1: metric_between bptt/log10_ratio") and ln.endswith("law violated")
        for ln in out.splitlines()
    )
    assert next(
        ln for ln in out.splitlines() if ln.startswith("tanh_g3: metric_between bptt/log10_ratio")
    ).endswith("pass")


def test_a_law_between_entries_that_fails_only_under_a_perturbation_refuses_the_baseline(
    store, tmp_path, capsys
):
    """README, "Baselines that hold on another machine": the laws must hold in every perturbed run, the
    laws between entries (``compare:``) too, an entry not run again (``orth``, no baseline) read from
    its nominal run. They were not checked there, and the baseline was written (found by a review)."""
    suite = yaml.safe_load(yaml.safe_dump(TINY))
    chaotic = yaml.safe_load(yaml.safe_dump(CHAOTIC))
    orth = next(e for e in suite["entries"] if e["name"] == "orth")
    gap = _nominal_ratio(tmp_path, chaotic) - _nominal_ratio(tmp_path, orth, "probe-orth")
    suite["entries"].append(chaotic)
    # tuned to this machine's exact trajectory: holds nominally, not after a 1-ulp nudge of tanh_g3
    diff = {"metric": "bptt/log10_ratio", "a": "tanh_g3", "b": "orth", "min": gap - 1e-6, "max": gap + 1e-6}
    suite["compare"] = [{"difference_of_runs": diff}]
    path = write_suite(tmp_path, suite)
    assert main(["regress", "--suite", str(path), "--update-baseline"]) == 1
    out = capsys.readouterr().out
    assert "baseline NOT written" in out and not (tmp_path / "suite.baseline.yaml").exists()
    lines = out.splitlines()
    assert next(ln for ln in lines if ln.startswith("tanh_g3 - orth: difference_of_runs")).endswith("pass")
    assert any(
        ln.startswith("~ulp1: tanh_g3 - orth: difference_of_runs") and ln.endswith("law violated")
        for ln in lines
    )


def test_update_baseline_refuses_while_an_included_suites_number_is_out_of_its_band(store, tmp_path, capsys):
    """An included suite's accepted numbers are that suite's to accept (its own --update-baseline). With
    one of them out of band, the including suite's update wrote its own file and then exited 1, the
    status that says refused and untouched (found by a review); it is refused before any rerun."""
    child = yaml.safe_load(yaml.safe_dump(TINY))
    child["name"], child["compare"] = "child", []
    child["entries"] = child["entries"][:1]  # tanh_g05, banded: bptt/log10_ratio about -3
    (tmp_path / "child.yaml").write_text(yaml.safe_dump(child, sort_keys=False))
    planted = {"suite": "child", "entries": {"tanh_g05": {"bptt/log10_ratio": {"value": 5.0, "abs": 0.05}}}}
    (tmp_path / "child.baseline.yaml").write_text(yaml.safe_dump(planted))
    top = yaml.safe_load(yaml.safe_dump(TINY))
    top["include"], top["compare"] = "child.yaml", []
    top["entries"] = [{**top["entries"][0], "name": "own"}]
    path = write_suite(tmp_path, top)
    assert main(["regress", "--suite", str(path), "--update-baseline"]) == 1
    out = capsys.readouterr().out
    assert "baseline NOT written" in out and "suite's own --update-baseline" in out
    assert not (tmp_path / "suite.baseline.yaml").exists()
    # its header: no file of its own yet, though the included suite's numbers are read
    assert f"baseline {tmp_path / 'suite.baseline.yaml'} (none yet), store" in out, out
    assert "  REGRESSION: tanh_g05: bptt/log10_ratio: " in out, out  # the included entry's row
    _, everything = runs(store)
    assert not [r for r in everything if r.data.tags.get("perturbation")]  # refused before the reruns


def _nominal_ratio(tmp_path: Path, entry: dict, folder: str = "probe") -> float:
    from pipeline.regression.run import run_entry, start_suite_run
    from pipeline.regression.suite import load_suite
    from pipeline.tracking import client

    one = yaml.safe_load(yaml.safe_dump(TINY))
    one["entries"], one["compare"] = [{**entry, "checks": []}], []
    (tmp_path / folder).mkdir()
    s = load_suite(write_suite(tmp_path / folder, one))
    parent, exp = start_suite_run(s)
    rid = run_entry(s, entry["name"], parent, exp)
    return client(s.uri).get_run(rid).data.metrics["bptt/log10_ratio"]


def test_two_suite_runs_started_in_the_same_second_have_their_own_names(store, tmp_path, monkeypatch):
    """A command-line ``regress`` names its parent run ``regress-<suite>-<time>-<4 hex>`` (README, "What is
    recorded"): two started in the same second shared a name in the MLflow UI."""
    import datetime as dt
    import re
    import types

    from pipeline.regression import run as regress_run
    from pipeline.regression.suite import load_suite
    from pipeline.tracking import client

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 6, 12, 0, 0)

    monkeypatch.setattr(regress_run, "dt", types.SimpleNamespace(datetime=Frozen))  # this module's clock
    one = yaml.safe_load(yaml.safe_dump(TINY))
    s = load_suite(write_suite(tmp_path, one))
    names = [client(s.uri).get_run(regress_run.start_suite_run(s)[0]).info.run_name for _ in range(2)]
    assert all(re.fullmatch(rf"regress-{s.name}-20261206-120000-[0-9a-f]{{4}}", n) for n in names), names
    assert names[0] != names[1], names


def test_measured_band_rules():
    from pipeline.regression.baselines import SAFETY, Band, _round_up, measured_band

    assert measured_band(Band(abs=0.01), 13.64, [13.60, 13.91, 13.37]) == (Band(abs=1.1), pytest.approx(0.27))
    assert measured_band(Band(abs=0.5), 0.30, [0.31, 0.29]) == (
        Band(abs=0.5),
        pytest.approx(0.01),
    )  # floor wins
    assert measured_band(Band(rel=0.1), 100.0, [101.0]) == (Band(rel=0.1), pytest.approx(1.0))
    # the largest deviation on either side: 0.5 below (a signed spread read 0.1 above: a mutation audit)
    assert measured_band(Band(abs=0.01), 1.0, [0.5, 1.1]) == (Band(abs=2.0), pytest.approx(0.5))
    assert measured_band(Band(abs=0.01), 1.0, [1.0, None])[1] == math.inf
    assert measured_band(Band(abs=0.01), 1.0, [math.nan])[1] == math.inf
    assert _round_up(0.1234) == pytest.approx(0.13) and _round_up(1.0) == 1.0 and _round_up(0.0) == 0.0
    band, spread = measured_band(Band(abs=1e-9), 0.0, [3e-7])
    assert band.abs >= SAFETY * spread and band.abs == pytest.approx(1.2e-6)


def test_ulp_nudge_moves_every_weight_by_exactly_one_float32_ulp(tiny):
    import torch

    from pipeline.training.models import RNNModel

    for cell in ("tanh", "lstm", "orthogonal", "indrnn"):
        a = RNNModel(tiny(**{"model.cell": cell, "model.hidden_size": 64}).model, 2, 1, "last", seed=0)
        b = RNNModel(
            tiny(**{"model.cell": cell, "model.hidden_size": 64, "model.init_ulp_seed": 3}).model,
            2,
            1,
            "last",
            seed=0,
        )
        ups = []
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            up, down = (
                torch.nextafter(p, torch.full_like(p, math.inf)),
                torch.nextafter(p, torch.full_like(p, -math.inf)),
            )
            nz = p != 0
            assert bool(((q == up) | (q == down))[nz].all()) and bool((q == 0)[~nz].all()), (cell, name)
            ups.append((q > p)[nz].flatten())
        assert 0.4 < float(torch.cat(ups).float().mean()) < 0.6  # random signs (>= 200 weights each)
    c = RNNModel(tiny(**{"model.init_ulp_seed": 4}).model, 2, 1, "last", seed=0)
    assert not all(torch.equal(p, q) for p, q in zip(b.parameters(), c.parameters(), strict=False))


# ----------------------------------------------------- the reference law catches planted profile bugs


def _drop_tanh_prime(real):
    def vjp(params, cache, v):
        if params["cell"] in ("tanh", "orthogonal"):
            return (v[0] @ params["W_hh"],), None  # no diag(1 - h^2)
        return real(params, cache, v)

    return vjp


def _w_not_transposed(real):
    def vjp(params, cache, v):
        if params["cell"] in ("tanh", "orthogonal"):
            (h,) = cache
            return ((v[0] * (1 - h * h)) @ params["W_hh"].T,), None  # W where W^T belongs
        return real(params, cache, v)

    return vjp


@pytest.mark.parametrize(
    "plant", [None, _drop_tanh_prime, _w_not_transposed], ids=["correct", "no-tanh'", "W-not-WT"]
)
def test_smoke_laws_catch_planted_profile_bugs(store, monkeypatch, plant):
    """Both bugs leave decay rates and the spectrum plausible; the suite must still fail on each."""
    from pipeline.bptt import twin as cells
    from pipeline.regression.run import collect, judge_entries, run_entry, start_suite_run
    from pipeline.regression.suite import load_suite

    if plant is not None:
        monkeypatch.setattr(cells, "step_vjp", plant(cells.step_vjp))
    suite = load_suite(ROOT / "configs" / "regression" / "smoke.yaml")
    names = ("tanh_default_T100", "tanh_g0.5_T100")
    suite = replace(suite, entries=tuple(e for e in suite.entries if e.name in names), compare=())
    parent, exp = start_suite_run(suite)
    results = collect(suite, {n: run_entry(suite, n, parent, exp) for n in names}, parent)
    if plant is None:  # every tag a real entry run records is one a suite's tag_equals may name (a review)
        from pipeline.regression.metrics import check_tag

        assert all(check_tag("t", t) == t for r in results.values() for t in r.tags)
    rows = {r.check: r for r in judge_entries(suite, results, {})}
    ref = [rows[f"{n}: metric_below bptt/reference_max_err"] for n in names]
    if plant is None:
        assert all(r.verdict == PASS for r in ref)
        assert not [r for r in rows.values() if r.verdict == LAW]
    else:
        assert all(r.verdict == LAW for r in ref), [r.__dict__ for r in ref]


def test_repo_suites_validate():
    from pipeline.regression.baselines import suite_baseline
    from pipeline.regression.suite import load_suite

    for name in ("smoke", "nightly", "gpu"):
        s = load_suite(ROOT / "configs" / "regression" / f"{name}.yaml")
        assert s.entries and all(e.cfg.tracking.experiment == "regression" for e in s.entries)
        base = suite_baseline(s)
        if name != "gpu":  # gpu.yaml's numbers are recorded on a GPU server (README, "Regression suites")
            assert all(m in base.get(e.name, {}) for e in s.entries for m in e.bands), name
    smoke, nightly = (load_suite(ROOT / "configs" / "regression" / f"{n}.yaml") for n in ("smoke", "nightly"))
    assert [e.name for e in nightly.entries[: len(smoke.entries)]] == [
        e.name for e in smoke.entries
    ]  # include
    assert nightly.entries[0].cfg.tracking.run_name == f"nightly/{smoke.entries[0].name}"
    # One source of truth: smoke's entries keep smoke's accepted numbers inside nightly.
    assert suite_baseline(nightly)["tanh_g3_T100"] == suite_baseline(smoke)["tanh_g3_T100"]
    assert all(e.baseline_path == smoke.baseline_path for e in nightly.entries[: len(smoke.entries)])
    assert len(nightly.compare) == len(smoke.compare) + 1


# ----------------------------------------------------------------- every law kind can fail (no training)


def _r(name="e", status="FINISHED", tags=None, **metrics):
    return EntryResult(name, "rid", status, {k.replace("__", "/"): v for k, v in metrics.items()}, tags or {})


def _chk(item, cfg=None, entry="e", names=("e", "f")):
    from pipeline.config import Config

    return parse_check(item, "k", entry, cfg or Config(), set(names))


@pytest.mark.parametrize(
    ("item", "good", "bad"),
    [
        (
            {"metric_below": {"metric": "bptt/log10_ratio", "value": -10}},
            {"bptt__log10_ratio": -20},
            {"bptt__log10_ratio": -5},
        ),
        ({"metric_above": {"metric": "val/loss", "value": 0.1}}, {"val__loss": 0.16}, {"val__loss": 0.001}),
        (
            {"metric_between": {"metric": "spectral/lyapunov_max", "low": 0.25, "high": 0.37}},
            {"spectral__lyapunov_max": 0.3},
            {"spectral__lyapunov_max": 0.0},
        ),
        (
            {"decay_rate_equals": {"value": "ln(0.5)", "tol": 0.1}},
            {"bptt__decay_rate": -0.65},
            {"bptt__decay_rate": -0.4},
        ),
        (
            {"metric_equals": {"metric": "bptt/c_log10_ratio", "value": "99*log10(sigmoid(0))", "rel": 0.15}},
            {"bptt__c_log10_ratio": -28.0},
            {"bptt__c_log10_ratio": -20.0},
        ),
        (
            {"lyapunov_matches_decay": {"tol": 0.05}},
            {"bptt__decay_rate": 0.30, "spectral__lyapunov_max": 0.29},
            {"bptt__decay_rate": 0.30, "spectral__lyapunov_max": 0.1},
        ),
        (
            {"pascanu_bound_holds": {}},
            {"bptt__log10_ratio": -20, "spectral__pascanu_log10_bound": 5},
            {"bptt__log10_ratio": 6, "spectral__pascanu_log10_bound": 5},
        ),
    ],
)
def test_each_law_passes_and_fails(item, good, bad):
    chk = _chk(item)
    assert run_check(chk, {"e": _r(**good)}).verdict == PASS
    row = run_check(chk, {"e": _r(**bad)})
    assert row.verdict == LAW and row.detail
    assert run_check(chk, {"e": _r()}).verdict == LAW  # metric not recorded is a violation, not a pass


def test_finite_tag_and_cross_entry_laws():
    fin = _chk({"finite": {}})
    assert run_check(fin, {"e": _r(val__loss=0.1)}).verdict == PASS
    assert (
        run_check(fin, {"e": _r(tags={"regime": "diverged", "diverged_step": "3"})}).now
        == "diverged at step 3"
    )
    tag = _chk({"tag_equals": {"tag": "solved", "value": True}})
    assert run_check(tag, {"e": _r(tags={"solved": "true"})}).verdict == PASS
    assert run_check(tag, {"e": _r(tags={"solved": "false"})}).verdict == LAW
    ratio = _chk(
        {
            "ratio_of_runs": {
                "metric": "grad/max_norm_preclip",
                "numerator": "e",
                "denominator": "f",
                "min": 10,
                "diverged_as_inf": True,
            }
        },
        entry=None,
    )
    ok = {"e": _r(grad__max_norm_preclip=1e4), "f": _r("f", grad__max_norm_preclip=100)}
    assert run_check(ratio, ok).verdict == PASS and run_check(ratio, ok).now == "100"
    close = {"e": _r(grad__max_norm_preclip=500), "f": _r("f", grad__max_norm_preclip=100)}
    assert run_check(ratio, close).verdict == LAW
    div = {
        "e": _r(tags={"regime": "diverged"}, grad__max_norm_preclip=5),
        "f": _r("f", grad__max_norm_preclip=100),
    }
    assert run_check(ratio, div).verdict == PASS  # a diverged unclipped run had an infinite norm
    failed = {"e": _r(status="FAILED"), "f": _r("f", grad__max_norm_preclip=100)}
    assert run_check(ratio, failed).verdict == "error"


def test_baseline_band_and_expressions():
    accepted = {"value": -23.37, "abs": 0.01}
    assert baseline_row("e", "bptt/log10_ratio", _r(bptt__log10_ratio=-23.375), accepted).verdict == PASS
    row = baseline_row("e", "bptt/log10_ratio", _r(bptt__log10_ratio=-23.0), accepted)
    assert row.verdict == REGRESSION and row.check == "e: bptt/log10_ratio"
    assert baseline_row("e", "val/loss", _r(val__loss=1.1), {"value": 1.0, "rel": 0.2}).verdict == PASS
    # a relative band under 0.5% read "0%", an exact band, in the table and the spread rows
    assert baseline_row("e", "val/loss", _r(val__loss=1.0), {"value": 1.0, "rel": 0.001}).band == "±0.1%"
    assert Band(abs=0.5, rel=0.2).describe() == "±0.5 or ±20%"
    assert spread_rows({"e": {"m": {"value": 1.0, "rel": 2.5e-8, "spread": 1e-8}}}) == [
        ("e: m", "1e-08", "±2.5e-06%")
    ]
    tiny_rel = run_check(
        _chk({"metric_equals": {"metric": "val/loss", "value": 1.0, "rel": 5e-8}}), {"e": _r(val__loss=1.0)}
    )
    assert tiny_rel.band == "±5e-08 (5e-06%)" and tiny_rel.verdict == PASS
    assert evaluate("(T-1)*log10(sigmoid(b_f))", {"T": 100.0, "b_f": 0.0}, "k") == pytest.approx(
        99 * math.log10(0.5)
    )
    for bad in ("__import__('os')", "g.real", "[1]", "ln(-1)"):
        with pytest.raises(ConfigError):
            evaluate(bad, {"g": 1.0}, "k")


# ----------------------------------------------------------------------------------- slow: real suites


@pytest.mark.kernel_free  # both runs on the same kernels, whichever they are: the same numbers or not
@pytest.mark.slow
def test_workers_2_same_numbers(store, tmp_path, capsys):
    suite = write_suite(tmp_path, TINY)
    assert main(["regress", "--suite", str(suite), "--update-baseline"]) == 0
    assert (
        main(["regress", "--suite", str(suite), "--workers", "2"]) == 0
    )  # same numbers from spawned workers
    assert "-> PASS" in capsys.readouterr().out
    _, ps = parents(store)
    assert len(ps) == 2 and all(p.data.tags["verdict"] == "pass" for p in ps)


@pytest.mark.slow
def test_smoke_suite_holds_under_an_unrecorded_perturbation_and_fails_on_a_planted_regression(tmp_path):
    """`make regress` as another machine would run it: the committed baseline was measured under
    PERTURBATIONS (another thread count, ulp seeds 1 and 2); here every entry runs with weights nudged
    by a seed it was not recorded with. Every law and every band must hold; a planted regression of one
    accepted number by 1.5x its band must still fail, naming that number alone."""
    from pipeline.regression.baselines import suite_baseline
    from pipeline.regression.run import collect, judge_entries
    from pipeline.regression.suite import load_suite

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    suite_path = ROOT / "configs/regression/smoke.yaml"
    t0 = time.time()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "regress",
            "--suite",
            str(suite_path),
            "--set",
            "model.init_ulp_seed=7",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(p.stdout[-3000:], f"\nsmoke suite: {time.time() - t0:.0f} s wall")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "-> PASS" in p.stdout and "no baseline" not in p.stdout
    _, ps = parents(uri)
    assert ps[0].data.tags["verdict"] == "pass" and ps[0].data.tags["overrides"] == "model.init_ulp_seed=7"

    suite = load_suite(suite_path)
    results = collect(suite, {}, ps[0].info.run_id, uri=uri)
    assert all(r.tags.get("overrides") == "model.init_ulp_seed=7" for r in results.values())
    baseline = suite_baseline(suite)
    assert not [r for r in judge_entries(suite, results, baseline) if r.failing]
    planted = yaml.safe_load(yaml.safe_dump(baseline))
    rec = planted["tanh_g3_T100"]["spectral/lyapunov_max"]
    rec["value"] += 1.5 * rec["abs"]
    failing = [r for r in judge_entries(suite, results, planted) if r.failing]
    assert [(r.check, r.verdict) for r in failing] == [("tanh_g3_T100: spectral/lyapunov_max", REGRESSION)]


def test_an_expression_outside_the_grammar_is_one_message(store, tmp_path, capsys):
    """``value: __import__('os')`` was "config key K: expression ... is undefined (config key K: unsupported
    expression ...)": the walk's ConfigError is a ValueError and was wrapped in a second message."""
    bad = yaml.safe_load(yaml.safe_dump(TINY))
    bad["entries"][0]["checks"].append(
        {"metric_below": {"metric": "bptt/log10_ratio", "value": "__import__('os')"}}
    )
    assert main(["regress", "--suite", str(write_suite(tmp_path, bad))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config key 'entries.tanh_g05.checks[2].metric_below.value': "), err
    assert err.count("config key") == 1 and "undefined" not in err and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite.yaml"]


@pytest.mark.parametrize("via", ["suite_key", "--baseline"])
def test_update_baseline_to_a_file_that_cannot_be_written_is_one_line_before_any_entry(
    store, tmp_path, capsys, via
):
    """Every entry trained first, then writing the baseline failed with a traceback."""
    (tmp_path / "afile").write_text("x\n")
    target = tmp_path / "afile" / "suite.baseline.yaml"
    suite = dict(TINY, baseline="afile/suite.baseline.yaml") if via == "suite_key" else TINY
    argv = ["regress", "--suite", str(write_suite(tmp_path, suite)), "--update-baseline"]
    if via == "--baseline":
        argv += ["--baseline", str(target)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    head = "error: --baseline: " if via == "--baseline" else "error: config key 'baseline': "
    assert err.startswith(head) and err.count("\n") == 1, err
    assert f"baseline file {target} cannot be written" in err and "afile is not a folder" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "suite.yaml"]


def test_run_suite_update_checks_the_baseline_file_before_any_entry(store, tmp_path):
    from pipeline.regression.run import run_suite
    from pipeline.regression.suite import load_suite

    (tmp_path / "afile").write_text("x\n")
    suite = load_suite(write_suite(tmp_path, dict(TINY, baseline="afile/b.yaml")))
    with pytest.raises(ConfigError, match=r"^config key 'baseline': baseline file .*afile/b\.yaml cannot be"):
        run_suite(suite, {}, store, update=True, say=lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "suite.yaml"]


def test_each_name_and_function_of_an_expression_means_what_the_readme_says():
    """README, "Regression suites": the names are the entry's config keys and the functions are the usual
    ones, each checked against ``math`` away from the points where a wrong one agrees (sigmoid(0) = 0.5
    whichever the sign of its exponent; g = 1 under ln and log10 alike)."""
    from pipeline.config import load_config
    from pipeline.regression.expr import fmt, names_of, shown

    cfg = load_config(
        None,
        [
            "model.init_scale=1.5",
            "task.seq_len=37",
            "model.hidden_size=12",
            "model.forget_bias=2",
            "optim.lr=0.003",
            "clip.threshold=0.7",
            "trainer.max_steps=123",
            "model.r_min=0.4",
            "model.r_max=0.8",
        ],
    )
    names = names_of(cfg)
    assert names == {
        "g": 1.5,
        "T": 37.0,
        "H": 12.0,
        "b_f": 2.0,
        "lr": 0.003,
        "c": 0.7,
        "steps": 123.0,
        "r_min": 0.4,
        "r_max": 0.8,
    }
    for expr, want in [
        ("sigmoid(b_f)", 1 / (1 + math.exp(-2.0))),
        ("(T-1)*log10(sigmoid(b_f))", 36 * math.log10(1 / (1 + math.exp(-2.0)))),
        ("ln(g)", math.log(1.5)),
        ("log(g)", math.log(1.5)),
        ("log10(T)", math.log10(37)),
        ("exp(-c)", math.exp(-0.7)),
        ("sqrt(H)", math.sqrt(12)),
        ("abs(-lr)", 0.003),
        ("-g", -1.5),
        ("+g", 1.5),
        ("T/2", 18.5),
        ("2**-1", 0.5),
        ("steps - H*2", 99.0),
        ("(T-1)*log10(r_max) - log10(r_min)", 36 * math.log10(0.8) - math.log10(0.4)),
        (-3, -3.0),
    ]:
        assert evaluate(expr, names, "k") == pytest.approx(want, rel=1e-12), expr
    # the table's cells: 4 significant digits, non-finite values spelled out, an expression with its value
    assert [fmt(v) for v in (None, 1234567.0, -0.000123456, float("nan"), float("inf"), float("-inf"))] == [
        "-",
        "1.235e+06",
        "-0.0001235",
        "nan",
        "inf",
        "-inf",
    ]
    assert shown("ln(g)", math.log(1.5)) == "ln(g) = 0.4055" and shown(-3, -3.0) == "-3"


def test_a_suite_file_reads_as_the_regression_suites_section_says(tmp_path):
    """README, "Regression suites", read without training: the name from the file name without .yaml
    (up to its first dot, a copy `night.v2.yaml` took suite night's name and baseline file, and its
    --update-baseline rewrote night's: a platform-team walkthrough), the baseline file beside it, an
    entry's patch over the suite's defaults over its base config (relative to the suite file first),
    included suites' entries renamed <suite>/<entry>, keeping their own baseline files (however deep the
    include) and recorded in the including suite's store (`defaults.tracking`: it was ignored, and the
    runs went to the included suite's), a key written without a value as absent."""
    from pipeline.regression.suite import load_suite, with_baseline_file

    (tmp_path / "configs" / "train").mkdir(parents=True)
    (tmp_path / "configs" / "train" / "smoke.yaml").write_text("seed: 5\ntask: {seq_len: 30}\n")
    inner = {"entries": [{"name": "deep", "patch": {"seed": 1}}]}
    (tmp_path / "inner.yaml").write_text(yaml.safe_dump(inner))
    middle = {
        "include": "inner.yaml",
        "defaults": {"tracking": {"uri": "sqlite:///middle.db", "log_model": False}},
        "entries": [{"name": "mid", "patch": {"seed": 2}}],
    }
    (tmp_path / "middle.yaml").write_text(yaml.safe_dump(middle))
    night_db = f"sqlite:///{tmp_path / 'night.db'}"
    top = {
        "include": ["middle.yaml"],
        "defaults": {
            "model": {"hidden_size": 8},
            "task": {"seq_len": 20},
            "tracking": {"uri": night_db, "experiment": "mine"},
        },
        "entries": [
            {
                "name": "own",
                "config": "configs/train/smoke.yaml",  # beside the suite, not the repository's smoke config
                "patch": {"model": {"hidden_size": 4}},
                "checks": None,
            }
        ],
        "compare": None,
        "description": "  words  ",
    }
    path = tmp_path / "night.v2.yaml"
    path.write_text(yaml.safe_dump(top))
    s = load_suite(path)
    assert (s.name, s.baseline_path, s.description) == (
        "night.v2",
        tmp_path / "night.v2.baseline.yaml",
        "words",
    )
    assert [e.name for e in s.entries] == ["deep", "mid", "own"] and s.compare == ()
    own = s.entry("own").cfg
    assert (own.seed, own.task.seq_len, own.model.hidden_size) == (5, 20, 4)
    assert own.tracking.run_name == "night.v2/own" and own.tracking.experiment == "regression"
    assert [s.entry(n).cfg.tracking.run_name for n in ("deep", "mid")] == ["night.v2/deep", "night.v2/mid"]
    # the store is the including suite's, the rest of an included entry's config its own suite's
    assert s.uri == night_db and {e.cfg.tracking.uri for e in s.entries} == {night_db}
    assert {e.cfg.tracking.experiment for e in s.entries} == {"regression"}
    # only the store: the rest of an included entry's tracking is its own suite's
    assert [s.entry(n).cfg.tracking.log_model for n in ("deep", "mid", "own")] == [True, False, True]
    assert [s.entry(n).cfg.model.hidden_size for n in ("deep", "mid")] != [8, 8]
    assert load_suite(tmp_path / "middle.yaml").uri == "sqlite:///middle.db"
    # an including suite without a store of its own: two stores, named with their entries, and the fix
    # (it said only "must use one tracking store": a platform-team walkthrough)
    (tmp_path / "bare.yaml").write_text(
        yaml.safe_dump({"include": "middle.yaml", "entries": [{"name": "b"}]})
    )
    with pytest.raises(ConfigError) as e:
        load_suite(tmp_path / "bare.yaml")
    assert e.value.key == "defaults.tracking.uri", e.value
    said = "these use 2: the default store (b), sqlite:///middle.db (deep, mid); set defaults.tracking.uri in"
    assert said in str(e.value), e.value
    # a suite named up to its first dot before: its old default baseline beside it is refused, naming both
    (tmp_path / "night.baseline.yaml").write_text("suite: night\nrecords: 0\nentries: {}\n")
    with pytest.raises(ConfigError) as e:
        load_suite(path)
    assert e.value.key == "baseline" and "night.v2.baseline.yaml" in str(e.value)
    assert "`baseline: night.baseline.yaml`" in str(e.value)
    (tmp_path / "night.v2.baseline.yaml").write_text("suite: night.v2\nrecords: 0\nentries: {}\n")
    assert load_suite(path).baseline_path == tmp_path / "night.v2.baseline.yaml"  # its own: no question
    assert s.entry("deep").baseline_path == tmp_path / "inner.baseline.yaml"
    assert s.entry("mid").baseline_path == tmp_path / "middle.baseline.yaml"
    with pytest.raises(ConfigError) as e:
        with_baseline_file(s, tmp_path / "nope.yaml")
    assert e.value.key == "--baseline" and "nope.yaml" in str(e.value)
    with pytest.raises(ConfigError) as e:  # a template's unset variable: it was read as no --baseline
        with_baseline_file(s, "", must_exist=False)
    assert e.value.key == "--baseline" and "empty" in str(e.value)
    assert (
        with_baseline_file(s, tmp_path / "nope.yaml", must_exist=False).baseline_path
        == tmp_path / "nope.yaml"
    )


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda s: s["entries"][1].update(name="orth/2"), "entries[1].name"),
        (lambda s: s.update(name="tiny suite"), "name"),
        (
            lambda s: s["entries"][1]["patch"].update(tracking={"uri": "sqlite:///other.db"}),
            "defaults.tracking.uri",
        ),
    ],
)
def test_a_suite_refuses_names_and_stores_it_cannot_record(tmp_path, mutate, key):
    """Names go into run names and MLflow filters (letters, digits, _ - . only), and one suite is recorded
    in one store: each is refused when the suite is read, before any run."""
    from pipeline.regression.suite import load_suite

    bad = yaml.safe_load(yaml.safe_dump(TINY))
    mutate(bad)
    with pytest.raises(ConfigError) as e:
        load_suite(write_suite(tmp_path, bad))
    assert e.value.key == key and "\n" not in str(e.value)


def test_regress_set_overrides_name_the_flag_and_the_key():
    """``regress --set KEY=VALUE``: a bad value is one line naming the flag and then the config key."""
    from pipeline.config import Config
    from pipeline.regression.suite import with_overrides

    cfg = Config()
    assert with_overrides(cfg, []) is cfg
    assert with_overrides(cfg, ["optim.lr=0.5"]).optim.lr == 0.5
    with pytest.raises(ConfigError) as e:
        with_overrides(cfg, ["optim.lr=-1"])
    assert e.value.key == "--set" and str(e.value).startswith("--set: config key 'optim.lr': must be ")


def test_a_suite_may_read_each_per_gate_and_per_exponent_metric_and_no_other():
    """README, "The MLflow record": ``spectral/sigma_max_<gate>``, ``spectral/radius_<gate>`` and
    ``remedy/floss_lambda_<i>`` (i = 1 .. k) are metrics a check or a baseline may name; a name outside
    them (lambda_0 is no exponent) is refused when the suite is read."""
    from pipeline.regression.metrics import check_metric

    for name in (
        "spectral/sigma_max_f",
        "spectral/radius_f",
        "spectral/radius_dtz",
        "remedy/floss_lambda_1",
        "remedy/floss_lambda_12",
        "val/accuracy",
        "bptt/lambda_log10_sensitivity",
    ):
        assert check_metric("k", name) == name
    for name in (
        "remedy/floss_lambda_0",
        "remedy/floss_lambda_01",
        "spectral/radius_F",
        "spectral/norm_f",
        3,
    ):
        with pytest.raises(ConfigError, match=r"^config key 'k': unknown metric"):
            check_metric("k", name)


def test_the_suites_record_counts_its_checks_failures_and_violated_laws(store, tmp_path):
    """README "What is recorded": the parent run's metrics ``regression/checks``, ``regression/failed``
    and ``regression/laws_violated``, the tags ``verdict`` and ``failed_checks`` (the failing checks
    only), the table as artifacts, and the run closed FINISHED (mutation review)."""
    import json

    from mlflow.tracking import MlflowClient

    from pipeline.regression.laws import ERROR, NO_BASELINE, Row
    from pipeline.regression.run import finish_suite_run
    from pipeline.tracking import Recorder

    rows = [
        Row("a: law_one", "x", "y", "", LAW, "broke"),
        Row("a: bptt/log10_ratio", "-4", "-2", "+-0.05", REGRESSION),
        Row("b: law_two", "x", "x", "", PASS),
        Row("b: val/loss", "-", "0.5", "", NO_BASELINE),
        Row("c: run", "", "", "", ERROR, "RuntimeError: boom"),
        Row("c: law_three", "x", "z", "", LAW),
    ]
    parent = Recorder.start(store, "regression", "regress-t").run_id
    assert finish_suite_run(None, parent, rows, uri=store) == "regression"
    c = MlflowClient(store)
    r = c.get_run(parent)
    assert r.info.status == "FINISHED"
    assert r.data.metrics == {"regression/checks": 6, "regression/failed": 4, "regression/laws_violated": 2}
    assert r.data.tags["verdict"] == "regression"
    assert r.data.tags["failed_checks"] == "a: law_one; a: bptt/log10_ratio; c: run; c: law_three"
    table = json.loads(Path(c.download_artifacts(parent, "regression/table.json", str(tmp_path))).read_text())
    assert [row["verdict"] for row in table] == [LAW, REGRESSION, PASS, NO_BASELINE, ERROR, LAW]
    # what the command line then says: "; 1 without a baseline (accept with --update-baseline)"
    from pipeline.regression.run import Outcome

    assert Outcome(parent, rows, "regression").missing == 1


def test_the_pool_reports_each_entry_with_its_perturbation_and_its_error(monkeypatch):
    """``run_all`` (in-process, ``workers=1``; each entry's run stubbed): a line per entry as it ends,
    ``[k/n] <entry> ~<perturbation>: ok`` or ``FAILED: <type>: <message>``, the entries named in
    ``entries`` only, in the suite's order, and {name: (run id, error)} back (mutation review)."""
    from pipeline.regression import run as regression_run
    from pipeline.regression.pool import run_all
    from pipeline.regression.suite import load_suite

    suite = load_suite(str(Path(__file__).resolve().parents[1] / "configs" / "regression" / "smoke.yaml"))
    names = ["tanh_g3_T100", "gru_T30", "lstm_bf1"]
    seen = []

    def run_entry(s, name, parent, exp, uri=None, overrides=(), perturbation=None):
        seen.append((name, parent, exp, overrides, perturbation))
        if name == "gru_T30":
            raise RuntimeError("no memory")
        return f"rid-{name}"

    monkeypatch.setattr(regression_run, "run_entry", run_entry)
    lines: list[str] = []
    got = run_all(
        suite, "p", "e", progress=lines.append, entries=names, overrides=("a=1",), perturbation="ulp1"
    )
    order = [e.name for e in suite.entries if e.name in names]
    assert [x[0] for x in seen] == order and {x[1:] for x in seen} == {("p", "e", ("a=1",), "ulp1")}
    assert got == {
        "tanh_g3_T100": ("rid-tanh_g3_T100", None),
        "gru_T30": (None, "RuntimeError: no memory"),
        "lstm_bf1": ("rid-lstm_bf1", None),
    }
    said = [ln.rsplit(" (", 1)[0] for ln in lines]
    assert said == [
        f"  [{k}/3] {n} ~ulp1: " + ("FAILED: RuntimeError: no memory" if n == "gru_T30" else "ok")
        for k, n in enumerate(order, 1)
    ]
