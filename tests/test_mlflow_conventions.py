"""MLflow conventions on every training run (README, "The MLflow record"), read back from the store:
the fluent API's context tags, the run description, CSV previews of the parquet diagnostics, the
progress lines of ``train``, and the bare ``report`` after a single ``train``."""

from __future__ import annotations

import getpass
import io
import os
import subprocess
import sys

import pandas as pd
import pytest
from conftest import ROOT, tiny_config
from mlflow.tracking import MlflowClient

from pipeline.names import MLFLOW_NOTE
from pipeline.schema import ConfigError
from pipeline.training.run import run


def _git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def test_context_tags_name_the_user_source_and_the_working_directory_repository(store, tiny, tmp_path):
    _git("init", "-q", "-b", "exp-branch", cwd=tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    _git("add", "notes.txt", cwd=tmp_path)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c", cwd=tmp_path)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    r = run(tiny())
    tags = MlflowClient(store).get_run(r.run_id).data.tags
    assert tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"]
    assert tags["mlflow.source.git.commit"] == head  # the working directory's repository...
    assert tags["mlflow.source.git.branch"] == "exp-branch"
    assert tags["git_commit"] != head  # ...while the pipeline's own code version stays in its tags
    assert tags["version.torch"]


@pytest.mark.parametrize(
    ("argv0", "source"),
    [
        (os.path.join("", "site-packages", "pipeline", "__main__.py"), "python -m pipeline"),
        ("/home/u/.venv/bin/rnn-pipeline", "/home/u/.venv/bin/rnn-pipeline"),
        ("scripts/mine.py", "scripts/mine.py"),
        ("", "python"),
    ],
)
def test_the_source_names_the_program_run(monkeypatch, argv0, source):
    """README "The MLflow record": ``mlflow.source.name`` is the program run: ``python -m pipeline``,
    the console script's path or a script's; every ``version.<pkg>`` tag of the README's list is set,
    the pipeline's own too (mutation review)."""
    from importlib.metadata import version

    from pipeline import provenance

    monkeypatch.setattr(sys, "argv", [argv0])
    assert provenance.context_tags()["mlflow.source.name"] == source
    tags = provenance.version_tags()
    for pkg in ("torch", "pytorch-lightning", "mlflow", "optuna", "rnn-gradient-pipeline"):
        assert tags[f"version.{pkg}"] == version(pkg), pkg


def test_no_git_tags_outside_a_repository(store, tiny, tmp_path, monkeypatch):
    (tmp_path / "x").mkdir()
    monkeypatch.chdir(tmp_path / "x")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above tmp_path either
    r = run(tiny())
    tags = MlflowClient(store).get_run(r.run_id).data.tags
    assert "mlflow.source.git.commit" not in tags and "mlflow.source.git.branch" not in tags
    assert tags["mlflow.source.type"] == "LOCAL"


def test_git_tags_are_read_once_per_directory_and_an_unanswered_git_is_asked_again(tmp_path, monkeypatch):
    """``mlflow.source.git.*`` are read once per process and directory (as MLflow's fluent API reads them
    once per process), keyed by the resolved directory; a git that timed out is not cached as "no repository"."""
    from pipeline import provenance

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above tmp_path
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (tmp_path / "sub").mkdir()
    _git("init", "-q", "-b", "b1", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "c", cwd=repo)
    provenance._git_tags.cache_clear()
    calls = []
    real = subprocess.run

    def timing_out_once(args, **kw):
        calls.append(args)
        if len(calls) == 1:
            raise subprocess.TimeoutExpired(args, 5)
        return real(args, **kw)

    monkeypatch.setattr(provenance.subprocess, "run", timing_out_once)
    assert "mlflow.source.git.commit" not in provenance.context_tags(repo)  # this run goes without
    first = provenance.context_tags(repo)  # the next asks again
    assert first["mlflow.source.git.branch"] == "b1" and len(calls) == 3
    assert provenance.context_tags(repo) == first and len(calls) == 3  # once per directory
    monkeypatch.chdir(repo)
    assert provenance.context_tags("sub")["mlflow.source.git.commit"] == first["mlflow.source.git.commit"]
    monkeypatch.chdir(tmp_path)  # a relative directory is the one it names now: here, in no repository
    assert "mlflow.source.git.commit" not in provenance.context_tags("sub")


def test_an_exploding_verdict_of_the_norm_rule_says_so_beside_a_decaying_profile(store, tiny, monkeypatch):
    """g = 0.3 decays; an ``explode_norm`` below its gradient norm makes the norm rule decide: the tag
    ``regime_reason``, the description and the run figures' titles name it (README, "Regime verdict")."""
    from pipeline.training import callbacks as dg

    titles = []
    for name, at in (("plot_profile", 2), ("plot_grad_norms", 4)):  # the title's place in each call
        real = getattr(dg, name)
        monkeypatch.setattr(dg, name, lambda *a, _r=real, _at=at, **k: titles.append(a[_at]) or _r(*a, **k))
    c = MlflowClient(store)
    cfg = {"model.init": "gaussian", "model.init_scale": 0.3, "trainer.max_steps": 10}
    r = run(tiny(**cfg, **{"diagnostics.explode_norm": 1e-6, "diagnostics.plots": True}))
    run_ = c.get_run(r.run_id)
    m, tags = run_.data.metrics, run_.data.tags
    assert r.regime == "exploding" and m["bptt/log10_ratio"] < -1  # the profile decays
    want = f"pre-clip norm {m['grad/max_norm_preclip']:.4g} > explode_norm 1e-06"
    assert tags["regime_reason"] == want
    assert tags[MLFLOW_NOTE].startswith(f"Regime **exploding** ({want}): the long-range gradient loses")
    healthy = run(tiny(**cfg, **{"diagnostics.vanish_log10_per_step": -50.0}))
    assert healthy.regime == "healthy" and "regime_reason" not in c.get_run(healthy.run_id).data.tags
    assert len(titles) == 2 and all(f"exploding gradients ({want}); val loss " in t for t in titles), titles


def test_the_description_states_the_verdict(store, tiny):
    c = MlflowClient(store)
    learned = run(tiny(**{"model.cell": "gru", "trainer.max_steps": 300, "trainer.val_every": 100}))
    note = c.get_run(learned.run_id).data.tags[MLFLOW_NOTE]
    m = c.get_run(learned.run_id).data.metrics
    r = m["bptt/log10_ratio"]
    assert note.startswith(f"Regime **{learned.regime}**: the long-range gradient ")
    assert (
        f"{abs(r):.3g} decades over the 11 steps from t = 12 back to t = 1" in note
        and ("loses" if r < 0 else "gains") in note
    )
    assert f"`val/loss_ratio` = {m['val/loss_ratio']:.3g}" in note
    assert ("the task was learned" in note) == learned.solved
    vanishing = run(tiny(**{"model.init": "gaussian", "model.init_scale": 0.3, "trainer.max_steps": 10}))
    note = c.get_run(vanishing.run_id).data.tags[MLFLOW_NOTE]
    assert vanishing.regime == "vanishing" and note.startswith("Regime **vanishing** (profile falls ")
    assert (
        "the task was not learned" in note
        and "above the solved threshold 0.06 (1 = learned nothing)." in note
    )
    diverged = run(tiny(**{"optim.name": "sgd", "optim.lr": 1e30, "trainer.max_steps": 10}))
    note = c.get_run(diverged.run_id).data.tags[MLFLOW_NOTE]
    assert diverged.regime == "diverged" and note.startswith(
        f"Regime **diverged** at step {diverged.diverged_step}"
    )


def test_each_parquet_artifact_has_a_csv_beside_it(store, tiny, tmp_path):
    r = run(tiny())
    c = MlflowClient(store)
    names = {f.path for f in c.list_artifacts(r.run_id, "diagnostics")}
    assert names == {
        "diagnostics/bptt_profile.parquet",
        "diagnostics/bptt_profile.csv",
        "diagnostics/grad_norms.parquet",
        "diagnostics/grad_norms.csv",
    }
    d = c.download_artifacts(r.run_id, "diagnostics", str(tmp_path / "dl"))
    for stem in ("bptt_profile", "grad_norms"):
        pq = pd.read_parquet(f"{d}/{stem}.parquet")
        csv = pd.read_csv(f"{d}/{stem}.csv")
        assert list(csv.columns) == list(pq.columns) and len(csv) == len(pq) > 0
        num = pq.select_dtypes("number").columns
        pd.testing.assert_frame_equal(csv[num], pq[num], check_dtype=False)  # full precision
    # every missing value spelled "nan" (the UI's preview shows an empty field as nothing at all): the
    # record rows of an unclipped run have no omega / floss, the first profile pass no previous one
    text = (tmp_path / "dl" / "diagnostics" / "grad_norms.csv").read_text()
    assert ",nan," in text and ",," not in text and not text.splitlines()[1].endswith(",")


def run_with_progress(cfg, **kw):
    """``run(cfg, progress=True, **kw)`` with its progress lines captured: (result, lines)."""
    from pipeline.training import progress

    buf = io.StringIO()
    orig = progress.ProgressPrinter.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        self.stream = buf

    progress.ProgressPrinter.__init__ = init
    try:
        r = run(cfg, progress=True, **kw)
    finally:
        progress.ProgressPrinter.__init__ = orig
    return r, buf.getvalue().splitlines()


def test_progress_prints_one_line_per_validation(store, tiny):
    r, lines = run_with_progress(tiny(**{"trainer.max_steps": 25, "trainer.val_every": 10}))
    assert [ln.split()[1] for ln in lines] == ["10/25", "20/25", "25/25"]  # fit's two, then the final one
    for ln in lines:
        assert "train/loss " in ln and "val/loss " in ln and "grad/clip_rate " in ln and " regime " in ln
    assert f"val/loss {r.val_loss:.4g} " in lines[-1]
    assert lines[-1].split(" regime ")[1].startswith(r.regime)  # the last line's regime is the verdict


@pytest.mark.parametrize(("max_steps", "val_every"), [(20, 10), (25, 10)])
def test_progress_last_line_reads_the_pass_at_train_end(store, tiny, max_steps, val_every):
    """max_steps no multiple of profile_every: the last line read the previous pass (step 15) while the
    summary under it read the one at train end (new-user walkthrough: "regime vanishing (profile at step
    0)" over "regime=healthy"). Both when fit validates at the last step and when the validation after
    fit does (25: off val_every's multiples)."""
    cfg = tiny(
        **{"trainer.max_steps": max_steps, "trainer.val_every": val_every, "diagnostics.profile_every": 15}
    )
    r, lines = run_with_progress(cfg)
    assert lines[-1].split()[1] == f"{max_steps}/{max_steps}"
    assert lines[-1].endswith(f" (profile at step {max_steps})"), lines
    assert lines[-1].split(" regime ")[1] == f"{r.regime} (profile at step {max_steps})"
    assert lines[0].endswith(" (profile at step 0)"), lines  # the other lines as they come


def test_progress_train_loss_is_the_mean_of_the_steps_since_the_previous_line(store, tiny):
    """A line's ``train/loss`` is the mean training loss of the steps since the previous line (the module
    docstring of training/progress.py), not of every step so far: the losses each step returned, read by
    a callback of the test, give the number (mutation review)."""
    import pytorch_lightning as pl

    class Losses(pl.Callback):
        def __init__(self):
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    seen = Losses()
    _, lines = run_with_progress(tiny(**{"trainer.max_steps": 20, "trainer.val_every": 10}), callbacks=[seen])
    assert len(seen.losses) == 20 and [ln.split()[1] for ln in lines] == ["10/20", "20/20"]
    printed = [float(ln.split("train/loss ")[1].split()[0]) for ln in lines]
    want = [sum(seen.losses[:10]) / 10, sum(seen.losses[10:]) / 10]
    assert printed == pytest.approx(want, rel=1e-3)
    assert printed[1] != pytest.approx(sum(seen.losses) / 20, rel=1e-3)  # the window's, not the run's
    # the regime is read on the latest profile pass (diagnostics.profile_every 10), which the line names
    assert lines[0].endswith(" (profile at step 10)") and lines[1].endswith(" (profile at step 20)"), lines


def test_progress_train_loss_of_a_diverged_window_is_the_records(store, tiny):
    """The diverged step's NaN loss made the console's ``train/loss`` NaN while the record's window mean
    (NaN losses left out, ``grad_window.window_metrics``) held the other steps' mean: the console said
    ``nan``, the run's metric 6.3e8 (a walkthrough). A line's number is now the record's: here a window
    of finite steps and the step whose weights a callback of the test made NaN."""
    import math

    import pytorch_lightning as pl
    import torch

    class Poison(pl.Callback):
        def __init__(self):
            self.losses: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 7:
                with torch.no_grad():
                    next(pl_module.parameters()).fill_(math.nan)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    seen = Poison()
    cfg = tiny(**{"trainer.max_steps": 20, "trainer.val_every": 5, "trainer.log_every": 5})
    r, lines = run_with_progress(cfg, callbacks=[seen])
    assert r.regime == "diverged" and len(seen.losses) == 8 and math.isnan(seen.losses[-1])
    printed = float(lines[-1].split("train/loss ")[1].split()[0])
    assert printed == pytest.approx(sum(seen.losses[5:7]) / 2, rel=1e-3)  # steps 5 and 6; 7's NaN left out
    (last,) = MlflowClient(store).get_metric_history(r.run_id, "train/loss")[-1:]
    assert printed == pytest.approx(last.value, rel=1e-3)


def test_progress_reads_the_steps_not_yet_logged(store, tiny):
    """A validation between two log windows (val_every 1, log_every 5): the line's clip rate and regime
    count every step so far, as the run's record at the end does, not only the logged windows'."""
    cfg = tiny(
        **{"trainer.max_steps": 3, "trainer.val_every": 1, "clip.mode": "norm", "clip.threshold": 1e-6}
        | {"diagnostics.explode_norm": 1e-9}
    )
    r, lines = run_with_progress(cfg)
    assert [ln.split()[1] for ln in lines] == ["1/3", "2/3", "3/3"]
    assert r.regime == "exploding"  # every step clipped, every norm above explode_norm
    for ln in lines:
        assert "grad/clip_rate 1.000 " in ln and " regime exploding " in ln, ln


def test_progress_line_is_plain_text():
    from pipeline.training.progress import line

    s = line(50, 1000, 0.25, float("nan"), 1 / 6, 0.5, "healthy (profile at step 50)")
    assert s == (
        "step   50/1000  train/loss 0.2500  val/loss nan  grad/clip_rate 0.500  regime healthy (profile at step 50)"
    )
    # one width a column: x1.00 beside x1.02, 0.1950 beside 0.1692 (they read x1 and 0.195: a walkthrough)
    assert "train/loss 0.1950  val/loss 0.1500 (x1.00 of baseline)" in line(1, 2, 0.195, 0.15, 0.15, 0, "h")
    assert s.isascii() and "\r" not in s and "\x1b" not in s
    # A classification task adds its accuracy after the validation loss.
    s = line(600, 600, 0.5, 0.5888, 2.302585, 0.908, "healthy", accuracy=0.812)
    assert "val/loss 0.5888 (x0.256 of baseline)  val/accuracy 0.812  grad/clip_rate 0.908" in s
    # the step is right-aligned to max_steps' width, so the columns line up; no value yet reads n/a
    s = line(5, 100000, None, None, 1 / 6, 0.0, "healthy")
    assert s == "step      5/100000  train/loss n/a  val/loss n/a  grad/clip_rate 0.000  regime healthy"


def test_bare_report_after_a_single_train_finds_its_experiment(store, tmp_path):
    env_cwd = tmp_path
    p = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--config", "smoke", "trainer.max_steps=20",
         "trainer.val_every=10", "diagnostics.plots=false"],
        cwd=env_cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert [ln.split()[1] for ln in p.stdout.splitlines() if ln.startswith("step ")] == ["10/20", "20/20"]
    p = subprocess.run(
        [sys.executable, "-m", "pipeline", "report", "--no-log"],
        cwd=env_cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("report 'smoke': 1 run (")  # the smoke config's experiment
    assert (tmp_path / "reports" / "smoke" / "report.html").is_file()


def test_system_metrics_through_mlflows_monitor_when_asked(store, tiny, monkeypatch):
    # `make test` has psutil (Airflow needs it); `make test-fast` installs only the dev extra
    pytest.importorskip("psutil", reason="tracking.system_metrics needs the system-metrics extra (psutil)")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow's own override
    c = MlflowClient(store)
    off = run(tiny())
    assert not [k for k in c.get_run(off.run_id).data.metrics if k.startswith("system/")]  # the default
    on = run(tiny(**{"tracking.system_metrics": "true", "trainer.max_steps": 200, "trainer.val_every": 100}))
    got = c.get_run(on.run_id)
    assert got.info.status == "FINISHED" and got.data.params["tracking.system_metrics"] == "True"
    keys = {k for k in got.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, keys
    assert c.get_metric_history(on.run_id, "system/cpu_utilization_percentage")


def test_system_metrics_without_psutil_is_a_config_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "psutil" else real(n, *a))
    with pytest.raises(
        ConfigError, match=r"^config key 'tracking.system_metrics': needs psutil.*\[system-metrics\]"
    ):
        tiny_config(**{"tracking.system_metrics": "true"})
    assert not tiny_config(
        **{"tracking.system_metrics": "true", "tracking.enabled": "false"}
    ).tracking.enabled


def test_train_summary_of_a_diverged_run_reads_plainly(capsys, monkeypatch, tmp_path):
    """A run whose state overflowed at once: no '(xn/a of baseline)', and huge values in significant
    digits (they printed as 30-digit fixed-point numbers)."""
    import re

    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["train", "--config", "smoke", "model.cell=relu", "model.init_scale=1e30", "trainer.max_steps=5"]
    assert main([*args, "tracking.enabled=false", "diagnostics.plots=false"]) == 0
    out = capsys.readouterr().out
    summary = [ln for ln in out.splitlines() if ln.startswith("run ")][0]
    assert "regime=diverged" in summary and "baseline" not in summary, summary
    assert all(len(tok) < 16 for tok in re.findall(r"[-+0-9.e]+", out)), out


def test_train_summary_states_what_the_store_recorded(store, capsys):
    """``python -m pipeline train`` ends with the run's summary: its id, the regime, the validation loss
    and its ratio to the baseline, whether it solved the task, the steps; then the long-range numbers.
    Each must be the recorded one (mutation review)."""
    from pipeline.cli import main

    args = ["train", "--config", "smoke", "trainer.max_steps=20", "trainer.val_every=10"]
    assert main([*args, "diagnostics.profile_every=10", "diagnostics.plots=false"]) == 0
    out = capsys.readouterr().out
    c = MlflowClient(store)
    (got,) = c.search_runs([c.get_experiment_by_name("smoke").experiment_id])
    t, m = got.data.tags, got.data.metrics
    lines = [ln for ln in out.splitlines() if ln.startswith(("run ", "  bptt/"))]
    assert lines == [
        f"run {got.info.run_id}: regime={t['regime']} val/loss={m['val/loss']:.4g}"
        f" (x{m['val/loss_ratio']:.4g} of baseline) solved={t['solved'] == 'true'} steps=20",
        f"  bptt/log10_ratio={m['bptt/log10_ratio']:.2f} bptt/decay_rate={m['bptt/decay_rate']:.4f}"
        f" spectral/sigma_max={m['spectral/sigma_max']:.4g} grad/clip_rate={m['grad/clip_rate']:.3f}",
    ], out
    assert t["solved"] == "false" and m["train/steps"] == 20


def test_a_store_named_by_path_keeps_its_artifacts_beside_it(tmp_path, monkeypatch):
    """A sqlite store elsewhere than the working directory (the DAG's under $AIRFLOW_HOME): a new
    experiment's artifacts go to mlruns/ beside the store, not to the mlruns/ of whatever directory the
    first process ran in; the default store in the working directory keeps MLflow's mlruns/<id>."""
    (tmp_path / "store").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere = f"sqlite:///{tmp_path / 'store' / 'm.db'}"
    r = run(tiny_config(**{"tracking.uri": elsewhere, "tracking.experiment": "x y"}))
    got = MlflowClient(elsewhere).get_run(r.run_id).info.artifact_uri
    assert got == str(tmp_path / "store" / "mlruns" / "x_y" / r.run_id / "artifacts")
    assert (
        any((tmp_path / "store" / "mlruns").rglob("config.yaml"))
        and not (tmp_path / "cwd" / "mlruns").exists()
    )
    here = f"sqlite:///{tmp_path / 'cwd' / 'mlflow.db'}"
    h = run(tiny_config(**{"tracking.uri": here}))
    exp = MlflowClient(here).get_experiment_by_name("test")
    assert exp.artifact_location == str(tmp_path / "cwd" / "mlruns" / exp.experiment_id)
    assert MlflowClient(here).get_run(h.run_id).info.artifact_uri.startswith(exp.artifact_location)


def test_git_commit_says_dirty_when_the_packages_tracked_code_differs_from_it(tmp_path):
    """README, "The MLflow record": ``git_commit`` is the commit of the pipeline's code; a run or a
    baseline recorded from modified code claimed the clean commit (found by a review). A clone of this
    repository: its HEAD when clean, ``<HEAD>-dirty`` with a tracked file of the package changed; a new
    untracked file or a change outside the package leaves it clean."""
    clone = tmp_path / "clone"
    _git("clone", "-q", str(ROOT), str(clone), cwd=tmp_path)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True, check=True
    ).stdout.strip()
    code = "from pipeline.provenance import git_commit; print(git_commit())"

    def commit() -> str:
        env = {**os.environ, "PYTHONPATH": str(clone)}
        r = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    (clone / "pipeline" / "scratch_notes.py").write_text("# untracked\n")
    (clone / "README.md").write_text("changed outside the package\n")
    assert commit() == head
    with (clone / "pipeline" / "names.py").open("a") as f:
        f.write("# a local change\n")
    assert commit() == f"{head}-dirty"
