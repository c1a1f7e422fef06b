"""Saved models and resuming, queried back from the MLflow store: model/weights.pt, load_run, a sweep's
best trial, checkpoints/last.ckpt and ``train --resume RUN_ID`` continuing the same run."""

import shlex

import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient

from pipeline.signals import Terminated
from pipeline.training.data import fixed_batch
from pipeline.training.run import run


class Capture(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        from pipeline import GradientNormMonitor

        self.module = pl_module
        self.grads = next(c for c in trainer.callbacks if isinstance(c, GradientNormMonitor))


class StopAt(pl.Callback):
    """Raise ``error`` after ``step`` optimizer steps: Terminated (what SIGTERM raises) closes the run
    KILLED, an ordinary error FAILED."""

    def __init__(self, step: int, error: BaseException | None = None):
        self.step, self.error = step, error if error is not None else Terminated("test")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise self.error


def _artifacts(c, run_id, folder=None):
    return {a.path for a in c.list_artifacts(run_id, folder)}


def test_train_logs_weights_and_load_run_predicts_the_same(store, tiny):
    from pipeline import load_run

    cap = Capture()
    cfg = tiny(**{"model.cell": "lstm"})
    r = run(cfg, callbacks=[cap])
    c = MlflowClient(store)
    assert "model/weights.pt" in _artifacts(c, r.run_id, "model")
    assert "checkpoints" not in _artifacts(c, r.run_id)  # run() checkpoints only when asked (train does)
    loaded = load_run(r.run_id)
    assert loaded.run_id == r.run_id and loaded.source == "model/weights.pt"
    assert loaded.config == cfg and loaded.task.name == "adding"
    assert not loaded.module.training and not loaded.model.training
    x, _ = fixed_batch(loaded.task, 32, 123)
    trained = cap.module.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(x), trained(x))
    # profile_rnn works on it directly (an nn.LSTM inside the LightningModule, the module's own loss)
    from pipeline import profile_rnn

    frame = profile_rnn(loaded.module, "model.rnn", fixed_batch(loaded.task, 8, 7))
    assert set(frame["state"]) == {"h", "c"} and frame["t"].max() == cfg.task.seq_len


def test_log_model_false_logs_no_weights(store, tiny):
    from pipeline.schema import ConfigError
    from pipeline.training.saved import load_run

    r = run(tiny(**{"tracking.log_model": "false"}))
    assert "model" not in _artifacts(MlflowClient(store), r.run_id)
    with pytest.raises(ConfigError) as e:
        load_run(r.run_id)
    assert str(e.value).endswith(
        f"run {r.run_id} has neither model/weights.pt nor checkpoints/last.ckpt: it ran with tracking.log_model: false"
    )


def _only_run(c):
    runs = c.search_runs([c.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_interrupted_train_resumes_the_same_run_exactly(store, tiny):
    """Killed at step 27 (checkpoint at step 20), resumed with ``train --resume``: FINISHED, same run id,
    train/steps = max_steps, metrics beyond the interruption, and the weights of an uninterrupted run."""
    from pipeline.cli import main
    from pipeline.training.saved import load_run

    # clipped on some steps and not on others, so a clip rate counted from the resume would differ
    over = {
        "trainer.max_steps": 40,
        "diagnostics.profile_every": 0,
        "clip.mode": "norm",
        "clip.threshold": 0.12,
    }
    cfg = tiny(**over)
    ref_cap = Capture()
    run(tiny(**over, **{"tracking.enabled": "false"}), callbacks=[ref_cap])  # the uninterrupted reference
    with pytest.raises(Terminated):
        run(cfg, callbacks=[StopAt(27)], checkpoint=True)
    c = MlflowClient(store)
    killed = _only_run(c)
    run_id = killed.info.run_id
    assert killed.info.status == "KILLED"
    assert "checkpoints/last.ckpt" in _artifacts(c, run_id, "checkpoints")
    assert load_run(run_id).source == "checkpoints/last.ckpt"  # a killed run's model: its checkpoint
    assert max(m.step for m in c.get_metric_history(run_id, "val/loss")) == 20

    assert main(["train", "--resume", run_id]) == 0
    got = c.get_run(run_id)
    assert _only_run(c).info.run_id == run_id
    assert got.info.status == "FINISHED"
    assert got.data.metrics["train/steps"] == 40 and got.data.tags["resumed_at_step"] == "20"
    assert "status" not in got.data.tags
    assert sorted({m.step for m in c.get_metric_history(run_id, "val/loss")}) == [10, 20, 30, 40]
    assert max(m.step for m in c.get_metric_history(run_id, "train/loss")) == 40
    loaded = load_run(run_id)
    assert loaded.source == "model/weights.pt"
    for k, v in ref_cap.module.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k  # same data stream, optimizer state restored
    # the running statistics came back with the checkpoint: the same as the uninterrupted run's
    rate = ref_cap.grads.clip_rate
    assert 0 < rate < 1 and rate != ref_cap.grads.column("clip_coef")[20:].__lt__(1).mean()
    assert got.data.metrics["grad/clip_rate"] == pytest.approx(rate, abs=1e-12)
    assert got.data.metrics["grad/max_norm_preclip"] == pytest.approx(
        ref_cap.grads.max_norm_preclip, rel=1e-12
    )


def test_the_resume_command_names_the_store_unless_it_is_the_default(monkeypatch):
    """README "Saved models and resuming": ``tracking.uri=URI when the run is in another store``, quoted
    for the shell; the default store (``mlflow.db`` in the working directory) needs none."""
    from pipeline.training.run import resume_command

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resume_command("abc", None) == "python -m pipeline train --resume abc"
    assert resume_command("abc", "sqlite:///mlflow.db") == "python -m pipeline train --resume abc"
    pg = "postgresql://u@h/db?sslmode=require&x=1"
    assert shlex.split(resume_command("abc", pg))[-1] == f"tracking.uri={pg}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////data/runs.db")
    assert resume_command("abc", None).endswith(" tracking.uri=sqlite:////data/runs.db")


def test_a_failed_run_resumes_without_the_error_of_its_failed_attempt(
    store, tiny, capsys, monkeypatch, tmp_path_factory
):
    """README "Saved models and resuming": the resume reopens the run with "the ``status`` / ``error``
    tags of the interrupted attempt removed"; a FINISHED run that still said ``error: RuntimeError ...``
    would read as failed in the UI and the report. The failed attempt printed its resume line on stderr;
    the finished resume prints none (mutation review)."""
    from pipeline.cli import main

    with pytest.raises(RuntimeError, match="on fire"):
        run(
            tiny(**{"diagnostics.profile_every": 0}),
            callbacks=[StopAt(13, RuntimeError("disk on fire"))],
            checkpoint=True,
        )
    c = MlflowClient(store)
    failed = _only_run(c)
    run_id = failed.info.run_id
    assert failed.info.status == "FAILED"
    assert failed.data.tags["status"] == "failed"
    assert failed.data.tags["error"] == "RuntimeError: disk on fire"
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("resume: ")]
    # the store named, as the run's is not the default mlflow.db: the command runs as printed from
    # another folder without $MLFLOW_TRACKING_URI (it failed "no MLflow store at mlflow.db" before)
    assert said == [f"resume: python -m pipeline train --resume {run_id} tracking.uri={store}"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert main(shlex.split(said[0])[4:]) == 0
    got = c.get_run(run_id)
    assert got.info.status == "FINISHED" and got.data.tags["resumed_at_step"] == "10"
    assert "error" not in got.data.tags and "status" not in got.data.tags
    assert "resume:" not in capsys.readouterr().err


def test_a_checkpoint_is_logged_after_the_metrics_it_covers(store, tiny, monkeypatch):
    """When a checkpoint reaches the store, every metric up to its step is there too: a kill -9 after it
    must not leave a gap that the resume, which starts from that step, never fills (the metrics waited in
    the recorder's buffer for 30 s or 500 values while the checkpoint went at once: a chaos walkthrough saw
    gaps of 20 to 300 steps after kill -9 and after a full disk)."""
    from pipeline import tracking

    seen = []
    log_file = tracking.Recorder.log_file

    def snapshot(self, path, artifact_path=None):
        if artifact_path == "checkpoints":
            c = MlflowClient(store)
            last = {
                k: max((m.step for m in c.get_metric_history(self.run_id, k)), default=-1)
                for k in ("train/loss", "val/loss", "grad/norm_preclip")
            }
            seen.append((torch.load(path, weights_only=False)["global_step"], last))
        return log_file(self, path, artifact_path)

    monkeypatch.setattr(tracking.Recorder, "log_file", snapshot)
    run(tiny(**{"trainer.max_steps": 30, "diagnostics.profile_every": 0}), checkpoint=True)
    assert [step for step, _ in seen] == [10, 20, 30]
    for step, last in seen:
        assert last == {"train/loss": step, "val/loss": step, "grad/norm_preclip": step}, (step, last)


@pytest.mark.parametrize("profile_every", [0, 10])
def test_a_run_killed_after_its_last_checkpoint_resumes_to_the_same_verdict(store, tiny, profile_every):
    """The last checkpoint is written at the last step's validation, before the end-of-run work (the last
    profile pass, the verdict, the record). A run killed there resumes at max_steps, where Lightning runs
    no training loop and none of its end hooks: the resumed run read ``healthy`` with no profile summary
    (found by a walkthrough). It must read what the run would have read uninterrupted."""
    from pipeline.cli import main

    over = {"model.init_scale": 0.5, "diagnostics.profile_every": profile_every}
    r = run(tiny(**over), checkpoint=True)
    c = MlflowClient(store)
    want = c.get_run(r.run_id).data
    assert want.tags["regime"] == "vanishing"  # g = 0.5: the verdict a lost end must not turn healthy
    c.set_terminated(r.run_id, "KILLED")  # as a kill after the checkpoint leaves it
    assert main(["train", "--resume", r.run_id]) == 0
    got = c.get_run(r.run_id)
    assert got.info.status == "FINISHED" and got.data.tags["resumed_at_step"] == "20"
    for tag in ("regime", "regime_init", "solved"):
        assert got.data.tags[tag] == want.tags[tag], tag
    for key in ("bptt/log10_ratio", "bptt/decay_rate", "spectral/sigma_max", "grad/clip_rate", "val/loss"):
        assert got.data.metrics[key] == pytest.approx(want.metrics[key], rel=1e-9), key


def test_resume_refusals(store, tiny, capsys):
    from pipeline.cli import main

    r = run(tiny())
    assert main(["train", "--resume", r.run_id]) == 2
    assert "is FINISHED: nothing to resume" in capsys.readouterr().err
    assert main(["train", "--resume", r.run_id, f"tracking.uri={store}"]) == 2  # the one override taken
    assert "is FINISHED: nothing to resume" in capsys.readouterr().err
    assert main(["train", "--resume", r.run_id, "--config", "smoke"]) == 2
    assert "--resume takes no --config" in capsys.readouterr().err
    assert main(["train", "--resume", r.run_id, "optim.lr=0.1"]) == 2
    assert "--resume takes no overrides" in capsys.readouterr().err
    assert main(["train", "--resume", "0" * 32]) == 2
    err = capsys.readouterr().err  # the store as given, not MLflow's form of it (pipeline.tracking.client)
    assert err.strip().endswith(f"no run '{'0' * 32}' in the MLflow store {store}"), err


def test_resume_of_a_sweeps_or_a_suites_run_names_the_command_that_goes_on(store, tiny, capsys):
    """A killed sweep trial was refused with "has no checkpoints/last.ckpt (it stopped before its first
    validation)" after 45 validations, a killed regression entry with "has no config.yaml: not a run of
    this pipeline" (a walkthrough). Their runs log no checkpoint: the refusal says whose run it is and
    the command that goes on with it; a run that validated without logging a checkpoint says that."""
    from pipeline.cli import main

    r = run(tiny())  # validated, no checkpoint (only `python -m pipeline train` logs them)
    c = MlflowClient(store)
    c.set_terminated(r.run_id, "KILLED")
    assert main(["train", "--resume", r.run_id]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "has no checkpoints/last.ckpt (it validated but logged no checkpoint, which `python -m pipeline "
            "train` logs at every validation): start it afresh"
        )
    )
    exp = c.get_run(r.run_id).info.experiment_id
    cases = [
        ({"pipeline.kind": "trial", "study": "s1", "trial_number": "7"}, "is trial 7 of sweep 's1': a sweep "
         "retries a killed trial itself; run the same sweep command again: it resumes the study"),
        ({"pipeline.kind": "sweep", "study": "s1"}, "is the parent run of sweep 's1': run the same sweep"),
        ({"pipeline.kind": "regression", "suite": "smoke", "entry": "digits_gru_learns", "regression_role":
          "entry"}, "is entry 'digits_gru_learns' of regression suite 'smoke': run `python -m pipeline "
         "regress --suite smoke` again"),
        ({"pipeline.kind": "regression", "suite": "smoke", "regression_role": "suite"},
         "is the parent run of regression suite 'smoke'"),
    ]  # fmt: skip
    for tags, said in cases:
        rid = c.create_run(exp, tags=tags).info.run_id
        c.set_terminated(rid, "KILLED")
        assert main(["train", "--resume", rid]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"error: run {rid} {said}" in err, err
    from pipeline import load_run
    from pipeline.schema import ConfigError

    with pytest.raises(ConfigError, match="has no config.yaml: it ended before it recorded one"):
        load_run(rid)  # the last: a suite's run of ours, killed before its config was recorded
    with pytest.raises(ConfigError, match="has no config.yaml: not a run of this pipeline"):
        load_run(c.create_run(exp).info.run_id)


def test_resume_or_load_from_a_store_that_is_not_there_names_it_and_writes_nothing(
    tmp_path, monkeypatch, capsys
):
    from pipeline import load_run
    from pipeline.cli import main
    from pipeline.schema import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["train", "--resume", "0" * 32]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no MLflow store at mlflow.db" in err, err
    assert main(["train", "--resume", "0" * 32, "tracking.uri=sqlite:///other.db"]) == 2
    assert "no MLflow store at other.db" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no MLflow store at mlflow.db"):
        load_run("0" * 32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("log_models", ["best", "all"])
def test_sweep_best_trial_is_loadable(store, tmp_path, log_models):
    """``log_models: best`` (the default): the best trial has model/weights.pt (and trials that were the best
    when they finished); ``all``: every trial that trained. The parent run points at the best's model."""
    from test_sweep import load_study, mlflow_runs, run_sweep_cli, write_sweep

    from pipeline import load_run

    cfg = write_sweep(tmp_path / "s.yaml", log_models=log_models, n_trials=3)
    p = run_sweep_cli(cfg)
    assert p.returncode == 0, p.stdout + p.stderr
    runs = mlflow_runs(store)
    parent = next(r for r in runs if r.data.tags.get("pipeline.kind") == "sweep")
    best_id = parent.data.tags["best_run_id"]
    assert parent.data.tags["best_model_uri"] == f"runs:/{best_id}/model"
    study = load_study()
    best = min((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert best.user_attrs["mlflow_run_id"] == best_id
    loaded = load_run(best_id)
    assert loaded.source == "model/weights.pt" and loaded.run_id == best_id
    assert loaded.config.model.cell == best.params["model.cell"]
    assert loaded.config.optim.lr == pytest.approx(best.params["optim.lr"])
    c = MlflowClient(store)
    trained = [t for t in study.trials if t.state.name == "COMPLETE"]
    with_weights = {
        t.number
        for t in trained
        if "model/weights.pt" in _artifacts(c, t.user_attrs["mlflow_run_id"], "model")
    }
    if log_models == "all":
        assert with_weights == {t.number for t in trained}
    else:  # exactly the trials that were the best so far when they finished (one worker: in order)
        so_far, expect = float("inf"), set()
        for t in sorted(trained, key=lambda t: t.number):
            if t.value <= so_far and not t.user_attrs.get("diverged"):
                expect.add(t.number)
                so_far = t.value
        assert with_weights == expect and best.number in with_weights
        # a trial without weights is named as log_models' doing, not as tracking.log_model's
        without = [
            t for t in study.trials if t.number not in with_weights and "mlflow_run_id" in t.user_attrs
        ]
        assert without, "the test needs a trial that logged no weights"
        from pipeline.schema import ConfigError

        with pytest.raises(
            ConfigError, match=r"a sweep trial logs its weights as the sweep file's log_models says"
        ):
            load_run(without[0].user_attrs["mlflow_run_id"])


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sigterm_of_train_then_resume(store, tmp_path, sig):
    """A real ``python -m pipeline train`` SIGTERMed (or Ctrl-C'd: Lightning turns a KeyboardInterrupt in
    fit into exit 1, "a check failed", unless the product raises it again) after its first checkpoint:
    exit 143 (130), KILLED, the resume command printed; ``--resume`` finishes the same run to
    max_steps (once, after the SIGTERM)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipeline.cli import main
    from tests.conftest import ROOT

    args = [
        "task.seq_len=12",
        "task.batch_size=16",
        "task.val_size=64",
        "model.hidden_size=8",
        "optim.lr=0.01",
        "trainer.max_steps=1000",  # 10-20 s a run here: the signal comes about 1 s after step 40
        "trainer.val_every=40",
        "trainer.log_every=20",
        "diagnostics.profile_every=0",
        "diagnostics.probe_size=8",
        "diagnostics.plots=false",
        "tracking.experiment=test",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    from pipeline.tracking import use_wal

    c = MlflowClient(store)
    c.search_experiments()  # the store made here first: two processes creating its tables at once collide
    use_wal(tmp_path / "mlflow.db")  # as the pipeline makes it: this test's polling must not block the run's
    # writes (in MLflow's rollback-journal mode it did: "database is locked" as the run closed KILLED)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # a job started in the background inherits SIGINT ignored, and Python then installs no handler
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    run_id, end = None, time.monotonic() + 120
    try:
        while time.monotonic() < end and proc.poll() is None:
            time.sleep(0.3)
            exp = c.get_experiment_by_name("test")
            runs = c.search_runs([exp.experiment_id]) if exp else []
            if runs and "checkpoints/last.ckpt" in _artifacts(c, runs[0].info.run_id, "checkpoints"):
                run_id = runs[0].info.run_id
                break
        if run_id is None or proc.poll() is not None:
            proc.kill()
            out, err = proc.communicate(timeout=60)
            pytest.fail(f"no checkpoint seen while the run trained (exit {proc.returncode}): {err[-3000:]}")
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    code, said = {"SIGTERM": (143, "terminated"), "SIGINT": (130, "interrupted")}[sig]
    assert proc.returncode == code, err
    assert f"resume: python -m pipeline train --resume {run_id}" in err
    assert f"{said}: runs closed as KILLED" in err
    killed = c.get_run(run_id)
    assert killed.info.status == "KILLED"
    if sig == "SIGINT":
        return
    stopped_at = max(m.step for m in c.get_metric_history(run_id, "train/loss"))
    assert stopped_at < 1000
    assert main(["train", "--resume", run_id, f"tracking.uri={store}"]) == 0
    got = c.get_run(run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["train/steps"] == 1000
    assert int(got.data.tags["resumed_at_step"]) % 40 == 0
    steps = {m.step for m in c.get_metric_history(run_id, "val/loss")}
    assert max(steps) == 1000 and {s for s in steps if s > stopped_at}
    assert _only_run(c).info.run_id == run_id


def _killed_run_with_a_checkpoint(store, tiny, tmp_path):
    """A 2-step run with a checkpoint at each validation, left KILLED; its local artifacts folder."""
    r = run(
        tiny(**{"trainer.max_steps": 2, "trainer.val_every": 1, "diagnostics.profile_every": 0}),
        checkpoint=True,
    )
    MlflowClient(store).set_terminated(r.run_id, "KILLED")
    (folder,) = [p for p in tmp_path.rglob("artifacts") if p.parent.name == r.run_id]
    return r.run_id, folder


def _snapshot(store, run_id, tmp_path):
    got = MlflowClient(store).get_run(run_id)
    listing = sorted(
        (str(p.relative_to(tmp_path)), p.read_bytes())
        for p in tmp_path.rglob("*")
        if p.is_file() and p.name != "mlflow.db"
    )
    return got.info.status, got.info.end_time, got.data.tags, got.data.metrics, got.data.params, listing


@pytest.mark.parametrize(
    ("artifact", "content", "needles"),
    [
        ("checkpoints/last.ckpt", b"garbage", ("checkpoints/last.ckpt", "not a readable checkpoint")),
        ("checkpoints/last.ckpt", None, ("checkpoints/last.ckpt", "not a readable checkpoint")),  # half of it
        ("config.yaml", b"task:\n  name: [\n", ("config.yaml is invalid: invalid YAML (line 3)",)),
        ("config.yaml", b"task: {}\ntask: {}\n", ("config.yaml is invalid: duplicate key 'task'",)),
        ("config.yaml", b"task: {seq_len: -1}\n", ("config.yaml is invalid: config key 'task.seq_len'",)),
    ],
)
def test_resume_of_a_run_whose_artifact_is_corrupt_is_one_line_naming_the_run_and_changes_nothing(
    store, tiny, tmp_path, capsys, artifact, content, needles
):
    """A checkpoint overwritten with "garbage" was a 26-line UnpicklingError; a corrupt config.yaml was
    named by the temporary path it was downloaded to (/tmp/tmpXXXX/config.yaml)."""
    from pipeline.cli import main

    run_id, folder = _killed_run_with_a_checkpoint(store, tiny, tmp_path)
    whole = (folder / artifact).read_bytes()
    (folder / artifact).write_bytes(whole[: len(whole) // 2] if content is None else content)
    capsys.readouterr()
    before = _snapshot(store, run_id, tmp_path)
    assert main(["train", "--resume", run_id, f"tracking.uri={store}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: run {run_id}: its artifact "), err
    assert "/tmp" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    assert _snapshot(store, run_id, tmp_path) == before


@pytest.mark.parametrize("artifact", ["model/weights.pt", "checkpoints/last.ckpt"])
def test_load_run_of_a_truncated_artifact_names_it(store, tiny, tmp_path, artifact):
    """A kill during an artifact's upload leaves it cut short (the local store copies in place): load_run
    raised torch's "PytorchStreamReader failed reading zip archive"; it names the run and the artifact."""
    from pipeline.schema import ConfigError
    from pipeline.training.saved import load_run

    if artifact == "model/weights.pt":
        run_id = run(tiny(**{"trainer.max_steps": 2, "diagnostics.profile_every": 0})).run_id
        (folder,) = [p for p in tmp_path.rglob("artifacts") if p.parent.name == run_id]
    else:
        run_id, folder = _killed_run_with_a_checkpoint(store, tiny, tmp_path)
        (folder / "model" / "weights.pt").unlink()  # a killed run's model is its checkpoint
    whole = (folder / artifact).read_bytes()
    (folder / artifact).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ConfigError, match=f"run {run_id}: its artifact {artifact} cannot be loaded"):
        load_run(run_id)


def test_a_checkpoint_carries_the_best_validation_loss_to_the_resumed_run():
    """``val/best_loss`` of a resumed run is the best over the whole run: RunCheckpoint's state (saved in
    the checkpoint, restored by the resume) holds the best loss seen before the interruption."""
    from types import SimpleNamespace

    from pipeline.training.saved import RunCheckpoint

    def monitors(best):
        return SimpleNamespace(val=SimpleNamespace(best=best), grads=SimpleNamespace(max_norm_preclip=1.5))

    state = RunCheckpoint(None, monitors(0.0625)).state_dict()
    resumed = monitors(None)
    RunCheckpoint(None, resumed).load_state_dict(state)
    assert resumed.val.best == 0.0625 and resumed.grads.max_norm_preclip == 1.5
