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
from pathlib import Path

import pytest
import yaml

from pipeline.baselines import baseline_row
from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.laws import LAW, PASS, REGRESSION, EntryResult, evaluate, parse_check, run_check

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
        {"name": "tanh_g05", "patch": {"model": {"init": "gaussian", "init_scale": 0.5}},
         "checks": [{"metric_below": {"metric": "bptt/log10_ratio", "value": -1}}, {"pascanu_bound_holds": {}}],
         "baseline": {"bptt/log10_ratio": {"abs": 0.05}}},
        {"name": "orth", "patch": {"model": {"cell": "orthogonal", "init_scale": 1.0}},
         "checks": [{"metric_equals": {"metric": "spectral/sigma_max", "value": "g", "tol": 1e-4}}]},
    ],
    "compare": [{"difference_of_runs": {"metric": "bptt/log10_ratio", "a": "orth", "b": "tanh_g05", "min": 1}}],
}


def write_suite(tmp_path: Path, suite: dict, baseline: dict | None = None) -> Path:
    p = tmp_path / "suite.yaml"
    p.write_text(yaml.safe_dump(suite, sort_keys=False))
    if baseline is not None:
        (tmp_path / "suite.baseline.yaml").write_text(yaml.safe_dump({"suite": suite["name"], "entries": baseline}))
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
    assert "tanh_g05: bptt/log10_ratio" in out and "new" in out  # the diff of what changed

    assert main(["regress", "--suite", str(suite)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("check"))
    assert header.split() == ["check", "baseline", "now", "band", "verdict"]
    assert "REGRESSION" not in out and "law violated" not in out and "-> PASS" in out

    c, ps = parents(store)
    assert len(ps) == 2 and all(p.info.status == "FINISHED" for p in ps)
    last = max(ps, key=lambda r: r.info.start_time)
    tags = last.data.tags
    assert tags["verdict"] == "pass" and tags["pipeline.kind"] == "regression" and tags["suite"] == "tiny"
    assert tags["git_commit"] and "version.torch" in tags and "version.mlflow" in tags
    assert last.data.metrics["regression/failed"] == 0
    table = Path(c.download_artifacts(last.info.run_id, "regression/table.txt", str(tmp_path)))
    assert "orth: metric_equals spectral/sigma_max" in table.read_text()
    _, everything = runs(store)
    children = [r for r in everything if r.data.tags.get("mlflow.parentRunId") == last.info.run_id]
    assert sorted(r.data.tags["entry"] for r in children) == ["orth", "tanh_g05"]
    assert all(r.info.status == "FINISHED" and r.data.tags["pipeline.kind"] == "regression" for r in children)
    assert "bptt/log10_ratio" in children[0].data.metrics

    # What --update-baseline shows when numbers move: old -> new and the change.
    from pipeline.regression import baseline_diff

    old = {"tanh_g05": {"bptt/log10_ratio": {"value": -4.0, "abs": 0.05}}, "gone": {"val/loss": {"value": 1.0}}}
    diff = baseline_diff(old, base["entries"])
    assert ("tanh_g05: bptt/log10_ratio", "-4", f"{accepted['value']:.4g}",
            f"{accepted['value'] + 4:+.4g} ({(accepted['value'] + 4) / 4:+.1%})") in diff
    assert ("gone: val/loss", "1", "-", "removed") in diff


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


def test_a_failed_run_is_an_error_row_and_the_others_still_run(store, tmp_path, capsys):
    crash = yaml.safe_load(yaml.safe_dump(TINY))
    crash["entries"][1]["patch"]["trainer"] = {"accelerator": "gpu"}  # no GPU here: Lightning raises
    crash.pop("compare")
    if _has_cuda():
        pytest.skip("this machine has a GPU")
    suite = write_suite(tmp_path, crash)
    assert main(["regress", "--suite", str(suite)]) == 1
    out = capsys.readouterr().out
    assert "error: orth: run: MisconfigurationException" in out
    assert next(ln for ln in out.splitlines() if ln.startswith("tanh_g05: pascanu_bound_holds")).endswith("pass")
    _, everything = runs(store)
    status = {r.data.tags.get("entry"): r.info.status for r in everything if r.data.tags.get("entry")}
    assert status == {"tanh_g05": "FINISHED", "orth": "FAILED"}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("mutate, key", [
    (lambda s: s.update(entriez=[]), "entriez"),
    (lambda s: s["entries"][0]["patch"]["model"].update(cel="gru"), "entries.tanh_g05.model.cel"),
    (lambda s: s["entries"][0]["checks"].append({"metric_abuv": {}}), "entries.tanh_g05.checks[2].metric_abuv"),
    (lambda s: s["entries"][0]["checks"].append({"metric_above": {"metric": "bptt/log10_ratoi", "value": 1}}),
     "entries.tanh_g05.checks[2].metric_above.metric"),
    (lambda s: s["entries"][1]["checks"].append({"decay_rate_equals": {"value": "ln(q)", "tol": 0.1}}),
     "entries.orth.checks[1].decay_rate_equals.value"),
    (lambda s: s["compare"][0]["difference_of_runs"].update(a="nope"), "compare[0].difference_of_runs.a"),
    (lambda s: s["entries"][0]["baseline"].update({"val/loss": {"abs": -1}}), "entries.tanh_g05.baseline.val/loss.abs"),
    (lambda s: s["entries"].append(dict(s["entries"][0])), "entries[2].name"),
])
def test_invalid_suite_is_one_line_exit_2_nothing_written(store, tmp_path, capsys, mutate, key):
    bad = yaml.safe_load(yaml.safe_dump(TINY))
    mutate(bad)
    suite = write_suite(tmp_path, bad)
    assert main(["regress", "--suite", str(suite)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and f"'{key}'" in err and "\n" not in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "suite.baseline.yaml").exists()


def test_invalid_baseline_file_is_exit_2(store, tmp_path, capsys):
    suite = write_suite(tmp_path, TINY, {"tanh_g05": {"bptt/log10_ratio": {"value": "high"}}})
    assert main(["regress", "--suite", str(suite)]) == 2
    assert "entries.tanh_g05.bptt/log10_ratio" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_repo_suites_validate():
    from pipeline.regression import load_baseline, load_suite

    for name in ("smoke", "nightly", "gpu"):
        s = load_suite(ROOT / "configs" / "regression" / f"{name}.yaml")
        assert s.entries and all(e.cfg.tracking.experiment == "regression" for e in s.entries)
        base = load_baseline(s.baseline_path)
        if name != "gpu":  # gpu.yaml's numbers are recorded on a GPU server (README, "Regression suites")
            assert all(m in base.get(e.name, {}) for e in s.entries for m in e.bands), name
    smoke, nightly = (load_suite(ROOT / "configs" / "regression" / f"{n}.yaml") for n in ("smoke", "nightly"))
    assert [e.name for e in nightly.entries[:len(smoke.entries)]] == [e.name for e in smoke.entries]  # include
    assert nightly.entries[0].cfg.tracking.run_name == f"nightly/{smoke.entries[0].name}"
    assert len(nightly.compare) == len(smoke.compare) + 1


# ----------------------------------------------------------------- every law kind can fail (no training)


def _r(name="e", status="FINISHED", tags=None, **metrics):
    return EntryResult(name, "rid", status, {k.replace("__", "/"): v for k, v in metrics.items()}, tags or {})


def _chk(item, cfg=None, entry="e", names=("e", "f")):
    from pipeline.config import Config

    return parse_check(item, "k", entry, cfg or Config(), set(names))


@pytest.mark.parametrize("item, good, bad", [
    ({"metric_below": {"metric": "bptt/log10_ratio", "value": -10}}, {"bptt__log10_ratio": -20}, {"bptt__log10_ratio": -5}),
    ({"metric_above": {"metric": "val/loss", "value": 0.1}}, {"val__loss": 0.16}, {"val__loss": 0.001}),
    ({"metric_between": {"metric": "spectral/lyapunov_max", "low": 0.25, "high": 0.37}},
     {"spectral__lyapunov_max": 0.3}, {"spectral__lyapunov_max": 0.0}),
    ({"decay_rate_equals": {"value": "ln(0.5)", "tol": 0.1}}, {"bptt__decay_rate": -0.65}, {"bptt__decay_rate": -0.4}),
    ({"metric_equals": {"metric": "bptt/c_log10_ratio", "value": "99*log10(sigmoid(0))", "rel": 0.15}},
     {"bptt__c_log10_ratio": -28.0}, {"bptt__c_log10_ratio": -20.0}),
    ({"lyapunov_matches_decay": {"tol": 0.05}}, {"bptt__decay_rate": 0.30, "spectral__lyapunov_max": 0.29},
     {"bptt__decay_rate": 0.30, "spectral__lyapunov_max": 0.1}),
    ({"pascanu_bound_holds": {}}, {"bptt__log10_ratio": -20, "spectral__pascanu_log10_bound": 5},
     {"bptt__log10_ratio": 6, "spectral__pascanu_log10_bound": 5}),
])
def test_each_law_passes_and_fails(item, good, bad):
    chk = _chk(item)
    assert run_check(chk, {"e": _r(**good)}).verdict == PASS
    row = run_check(chk, {"e": _r(**bad)})
    assert row.verdict == LAW and row.detail
    assert run_check(chk, {"e": _r()}).verdict == LAW  # metric not recorded is a violation, not a pass


def test_finite_tag_and_cross_entry_laws():
    fin = _chk({"finite": {}})
    assert run_check(fin, {"e": _r(val__loss=0.1)}).verdict == PASS
    assert run_check(fin, {"e": _r(tags={"regime": "diverged", "diverged_step": "3"})}).now == "diverged at step 3"
    tag = _chk({"tag_equals": {"tag": "solved", "value": True}})
    assert run_check(tag, {"e": _r(tags={"solved": "true"})}).verdict == PASS
    assert run_check(tag, {"e": _r(tags={"solved": "false"})}).verdict == LAW
    ratio = _chk({"ratio_of_runs": {"metric": "grad/max_norm_preclip", "numerator": "e", "denominator": "f",
                                    "min": 10, "diverged_as_inf": True}}, entry=None)
    ok = {"e": _r(grad__max_norm_preclip=1e4), "f": _r("f", grad__max_norm_preclip=100)}
    assert run_check(ratio, ok).verdict == PASS and run_check(ratio, ok).now == "100"
    close = {"e": _r(grad__max_norm_preclip=500), "f": _r("f", grad__max_norm_preclip=100)}
    assert run_check(ratio, close).verdict == LAW
    div = {"e": _r(tags={"regime": "diverged"}, grad__max_norm_preclip=5), "f": _r("f", grad__max_norm_preclip=100)}
    assert run_check(ratio, div).verdict == PASS  # a diverged unclipped run had an infinite norm
    failed = {"e": _r(status="FAILED"), "f": _r("f", grad__max_norm_preclip=100)}
    assert run_check(ratio, failed).verdict == "error"


def test_baseline_band_and_expressions():
    accepted = {"value": -23.37, "abs": 0.01}
    assert baseline_row("e", "bptt/log10_ratio", _r(bptt__log10_ratio=-23.375), accepted).verdict == PASS
    row = baseline_row("e", "bptt/log10_ratio", _r(bptt__log10_ratio=-23.0), accepted)
    assert row.verdict == REGRESSION and row.check == "e: bptt/log10_ratio"
    assert baseline_row("e", "val/loss", _r(val__loss=1.1), {"value": 1.0, "rel": 0.2}).verdict == PASS
    assert evaluate("(T-1)*log10(sigmoid(b_f))", {"T": 100.0, "b_f": 0.0}, "k") == pytest.approx(99 * math.log10(0.5))
    for bad in ("__import__('os')", "g.real", "[1]", "ln(-1)"):
        with pytest.raises(ConfigError):
            evaluate(bad, {"g": 1.0}, "k")


# ----------------------------------------------------------------------------------- slow: real suites


@pytest.mark.slow
def test_workers_2_same_numbers(store, tmp_path, capsys):
    suite = write_suite(tmp_path, TINY)
    assert main(["regress", "--suite", str(suite), "--update-baseline"]) == 0
    assert main(["regress", "--suite", str(suite), "--workers", "2"]) == 0  # same numbers from spawned workers
    assert "-> PASS" in capsys.readouterr().out
    _, ps = parents(store)
    assert len(ps) == 2 and all(p.data.tags["verdict"] == "pass" for p in ps)


@pytest.mark.slow
def test_smoke_suite_passes_under_5_minutes(tmp_path):
    """`make regress` on a fresh store: the committed smoke baseline holds and every law holds."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pipeline", "regress", "--suite",
                        str(ROOT / "configs/regression/smoke.yaml")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    took = time.time() - t0
    print(p.stdout[-3000:], f"\nsmoke suite: {took:.0f} s wall")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "-> PASS" in p.stdout and "no baseline" not in p.stdout
    assert took < 300
    _, ps = parents(env["MLFLOW_TRACKING_URI"])
    assert ps[0].data.tags["verdict"] == "pass"
