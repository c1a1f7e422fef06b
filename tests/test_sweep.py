"""The sweep on the embedded stores (journal file + MLflow sqlite), queried back after each run.

Fast by default: config validation, the pruning callback in-process, and one tiny end-to-end sweep.
The multi-process fault tests (4 workers on fresh stores, kill -9 + resume, SIGTERM, divergence, the
shipped smoke sweep) start real worker processes and are marked slow.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "study": "t",
    "n_trials": 4,
    "workers": 1,
    "trials_per_worker": 1,  # today's one-at-a-time path; batched sweeps: tests/test_batched.py
    "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
    "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
    "base": {
        "seed": 0,
        "task": {"name": "adding", "seq_len": 12, "batch_size": 16, "val_size": 64},
        "model": {"cell": "tanh", "hidden_size": 8, "init": "gaussian"},
        "optim": {"name": "adam", "lr": 0.01},
        "trainer": {"max_steps": 20, "val_every": 10, "log_every": 5},
        "diagnostics": {"profile_every": 0, "probe_size": 8, "plots": False},
        "tracking": {"experiment": "sweep-test"},
    },
    "space": {
        "model.cell": {"choices": ["tanh", "gru"]},
        "model.init_scale": {"low": 0.3, "high": 3.0, "log": True},
        "optim.lr": {"low": 1e-3, "high": 3e-2, "log": True},
    },
}


def write_sweep(path: Path, **changes) -> Path:
    data = yaml.safe_load(yaml.safe_dump(TINY))
    for k, v in changes.items():
        data[k] = v
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sweep_cmd(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "sweep", "--config", str(cfg), *extra]


def sweep_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_sweep(cfg: Path, *extra: str, quiet: bool = False) -> subprocess.Popen:
    """The sweep command started in its own session (a test can kill its whole group), its output piped
    as text, or discarded (``quiet``) where nobody reads it (a pipe nobody drains fills and blocks)."""
    out = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen(
        sweep_cmd(cfg, *extra), stdout=out, stderr=out, text=True, env=sweep_env(), start_new_session=True
    )


# A hang guard, not a time limit: `make test-kernels` runs these sweeps at nice 19 beside `make test`, on
# the CPU it leaves (.ci/run); there the K = 4 sweep of test_batched.py (about 30 s in `make test`) took
# over 300 s, this guard as it was (2026-12-07, with more tests run beside it than CI runs).
SWEEP_HANG_S = 900


def run_sweep_cli(cfg: Path, *extra: str, timeout: float = SWEEP_HANG_S) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            sweep_cmd(cfg, *extra), capture_output=True, text=True, timeout=timeout, env=sweep_env()
        )
    except subprocess.TimeoutExpired as e:
        # what a hang needs to be diagnosed: the journal's lock files, the processes still alive, stderr
        # (seen once, 2026-12-05, under heavy load: a resume waiting on optuna/t.journal.lock for 300 s)
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        locks = {str(p): os.path.realpath(p) for p in Path("optuna").glob("*.lock*")}
        ps = subprocess.run(["ps", "-eo", "pid,pgid,etimes,stat,args"], capture_output=True, text=True).stdout
        alive = "\n".join(ln for ln in ps.splitlines() if "pipeline" in ln or "forkserver" in ln)
        pytest.fail(
            f"sweep still running after {timeout} s; locks {locks}\n{alive}\nstderr tail:\n{err[-4000:]}"
        )


def load_study(name: str = "t", path: str = "optuna/t.journal"):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(path)))


def mlflow_runs(uri: str, experiment: str = "sweep-test"):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], max_results=1000) if exp else []


def check_consistent(study, runs, n_trials: int) -> None:
    """Optuna and MLflow agree: one child per trial that ran, nothing RUNNING, budget met exactly."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == n_trials
    parents = [r for r in runs if r.data.tags.get("pipeline.kind") == "sweep"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("pipeline.kind") == "trial"]
    by_number = {}
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert r.data.tags["study"] == study.study_name
        by_number.setdefault(int(r.data.tags["trial_number"]), []).append(r)
    assert all(len(v) == 1 for v in by_number.values()), "a trial has two MLflow runs"
    for t in done:
        assert t.number in by_number
        run = by_number[t.number][0]
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.info.status == "FINISHED"
        # the run says how Optuna was told (README, "What is recorded"): a pruned trial's run reads PRUNED
        tags = run.data.tags
        assert tags["optuna_state"] == t.state.name, (t.number, tags.get("optuna_state"), t.state)
        assert tags["diverged"] == str(bool(t.user_attrs.get("diverged"))).lower()
        # a pruned trial's value too: Optuna keeps its last reported one (it was left off: a walkthrough)
        assert ("optuna_value" in tags) == (t.value is not None), (t.number, t.state, t.value)
        if t.value is not None:
            # exactly in test_a_trial_is_told_and_tagged_as_it_ended; a store an earlier version wrote
            # (tests/test_layout_stores.py) keeps its 6-digit tags
            assert float(tags["optuna_value"]) == pytest.approx(t.value, rel=1e-5)


# ------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"space": {"optim.lr": {"low": 0.1, "high": 0.01}}}, "space.optim.lr"),
        ({"space": {"model.nope": {"low": 0.1, "high": 1.0}}}, "space.model.nope"),
        ({"space": {"model.cell": {"choices": []}}}, "space.model.cell.choices"),
        ({"space": {"model.cell": {"choices": ["tanh", "bogus"]}}}, "space.model.cell"),
        ({"space": {"optim.lr": {"low": 0.0, "high": 0.1, "log": True}}}, "space.optim.lr.low"),
        ({"space": {"tracking.uri": {"choices": ["a"]}}}, "space.tracking.uri"),
        ({"space": {}}, "space"),
        ({"n_trials": 0}, "n_trials"),
        ({"sampler": {"name": "grid"}}, "sampler.name"),
        ({"pruner": {"name": "median", "patience": 3}}, "pruner.patience"),
        ({"bogus": 1}, "bogus"),
        ({"base": "nonexistent.yaml"}, "base"),
        # an empty value read as auto and ran the sweep (a walkthrough); a capital AUTO's error did not
        # say auto was allowed
        ({"workers": None}, "workers"),
        ({"trials_per_worker": None}, "trials_per_worker"),
        ({"trials_per_worker": "AUTO"}, "trials_per_worker"),
    ],
)
def test_bad_sweep_config_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys, change, key):
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = write_sweep(tmp_path / "bad.yaml", **change)
    assert main(["sweep", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and f"'{key}'" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
    if key == "space.model.nope":  # the keys it could have meant, as a training config's typo is answered
        assert "allowed in model: cell, " in err, err
    if key in ("workers", "trials_per_worker"):
        assert "must be auto or an integer, got " in err, err


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, mtime in ns)."""
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        # every new trial failed ("CategoricalDistribution does not support dynamic value space"), 3 x K of
        # them written before the worker stopped (a walkthrough)
        ("space.model.cell={choices: [tanh, lstm]}", "space.model.cell", '["tanh", "gru"]}, this sweep says'),
        ("space.optim.lr.high=0.1", "space.optim.lr", '"high": 0.03'),  # drew lr outside the recorded range
        (
            "space.model.forget_bias={low: 0.5, high: 2.0}",
            "space.model.forget_bias",
            "'t' did not search it, this sweep does: {",
        ),
        ("sampler.seed=5", "sampler.seed", "created with 0, this sweep says 5"),
        ("pruner.name=none", "pruner.name", '"median", this sweep says "none"'),
        ("penalty=3.0", "penalty", "created with 2.0, this sweep says 3.0"),
        ("base.task.seq_len=30", "base.task.seq_len", "created with 12, this sweep says 30"),
        # split the study's runs over two parent runs; its report then missed its best trial
        (
            "base.tracking.experiment=other",
            "base.tracking.experiment",
            '"sweep-test", this sweep says "other"',
        ),
    ],
)
def test_a_resume_that_changes_the_studys_settings_is_refused_before_any_write(
    store, tmp_path, monkeypatch, capsys, change, key, words
):
    """A resume keeps the study's search space, sampler, pruner, penalty and base config (README, "Faults
    and resuming"): one that changes one is one line naming the key, exit 2, and nothing written (the
    journal, the MLflow store and the working folder as they were)."""
    from pipeline.cli import main
    from pipeline.sweep.config import load_sweep
    from pipeline.sweep.parent import create_stores
    from pipeline.sweep.settings import SETTINGS_ATTR

    monkeypatch.setenv("PIPELINE_SWEEP_FORK", "0")  # no forkserver to start for a refusal
    cfg = write_sweep(tmp_path / "s.yaml")
    sw = load_sweep(str(cfg))
    create_stores(sw, sw.storage_url(), store)  # the first sweep's study and parent run
    assert isinstance(load_study().user_attrs[SETTINGS_ATTR], dict)
    before = _tree(tmp_path)
    capsys.readouterr()  # MLflow's lines as the first sweep made the store
    assert main(["sweep", "--config", str(cfg), change]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: config key '{key}': study 't' ") and "\n" not in err, err
    assert words in err and "start a new study (study=NAME)" in err, err
    assert _tree(tmp_path) == before  # the journal, mlflow.db and the folder as they were


def test_of_two_first_sweeps_of_one_study_at_once_the_loser_writes_nothing(store, tmp_path, monkeypatch):
    """Two first sweeps of one new study started at the same moment with other settings (here another
    experiment): both find the study new before the budget lock; the one that takes the lock second is
    refused under it, naming the key, before it makes its MLflow experiment or writes to the study. The
    race is planted: the winner's whole first sweep runs between the loser's first check and its lock."""
    import mlflow

    from pipeline.schema import ConfigError
    from pipeline.sweep import parent
    from pipeline.sweep.config import load_sweep
    from pipeline.sweep.settings import SETTINGS_ATTR, study_settings

    cfg = write_sweep(tmp_path / "s.yaml")
    winner = load_sweep(str(cfg))
    loser = load_sweep(str(cfg), ["base.tracking.experiment=other"])
    real, raced = parent._check_settings, []

    def racing(sw, storage, record=False):
        real(sw, storage, record)
        if not raced:  # the loser's check before the lock found a new study: the winner runs now
            raced.append(True)
            parent.create_stores(winner, winner.storage_url(), store)

    monkeypatch.setattr(parent, "_check_settings", racing)
    with pytest.raises(ConfigError) as e:
        parent.create_stores(loser, loser.storage_url(), store)
    assert raced and e.value.key == "base.tracking.experiment", e.value
    assert '"sweep-test", this sweep says "other"' in str(e.value)
    client = mlflow.MlflowClient(store)
    assert client.get_experiment_by_name("other") is None  # the loser made no experiment
    assert client.get_experiment_by_name("sweep-test") is not None
    assert load_study().user_attrs[SETTINGS_ATTR] == json_round_trip(study_settings(winner))
    assert len(client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])) == 1


def test_a_resume_may_change_the_budget_and_how_it_runs_and_an_earlier_study_gets_its_settings(
    store, tmp_path, monkeypatch
):
    """What may change on a resume (README, "Faults and resuming"): the budget, workers, stacks, timeout,
    heartbeat, log_models, the device and the store's spelling. A study made before its settings were
    recorded gets the first resume's."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from pipeline.sweep.config import load_sweep
    from pipeline.sweep.parent import create_stores
    from pipeline.sweep.settings import SETTINGS_ATTR, changed_settings, study_settings

    cfg = write_sweep(tmp_path / "s.yaml")
    sw = load_sweep(str(cfg))
    Path("optuna").mkdir()
    journal = JournalStorage(JournalFileBackend("optuna/t.journal"))
    optuna.create_study(
        study_name="t", storage=journal, direction="minimize"
    )  # an earlier version's: no settings
    create_stores(sw, sw.storage_url(), store)
    assert load_study().user_attrs[SETTINGS_ATTR] == json_round_trip(study_settings(sw))
    changed = load_sweep(
        str(cfg),
        [
            "n_trials=40", "workers=1", "trials_per_worker=3", "timeout=60", "heartbeat.interval=5",
            "log_models=all", "base.trainer.accelerator=cpu", "base.trainer.threads=2",
            f"base.tracking.uri=sqlite:///{tmp_path}/./mlflow.db", "base.diagnostics.plots=true",
        ],
    )  # fmt: skip
    create_stores(changed, changed.storage_url(), store)  # no error
    assert load_study().user_attrs[SETTINGS_ATTR] == json_round_trip(study_settings(sw))  # as first recorded
    # a base key only one side's version of the pipeline knows is no change; a searched key is
    recorded, now = study_settings(sw), study_settings(changed)
    assert changed_settings("t", {**recorded, "base.model.retired": 1}, now) is None
    assert changed_settings("t", {k: v for k, v in recorded.items() if k != "base.model.r_min"}, now) is None
    # the same distribution in another spelling; the base value of a searched key; the log's density
    ints = load_sweep(
        str(cfg), ["space.model.hidden_size={low: 8, high: 32}", "space.model.forget_bias={choices: [1, 2]}"]
    )
    same = load_sweep(
        str(cfg),
        [
            "space.model.hidden_size={low: 8, high: 32, step: 1}", "space.model.forget_bias={choices: [1.0, 2.0]}",
            "base.model.cell=gru", "base.trainer.log_every=1",
        ],
    )  # fmt: skip
    assert changed_settings("t", json_round_trip(study_settings(ints)), study_settings(same)) is None
    dropped = changed_settings("t", recorded, {k: v for k, v in now.items() if k != "space.optim.lr"})
    assert (
        dropped is not None
        and "study 't' searched it ({" in str(dropped)
        and "this sweep does not" in str(dropped)
    )
    fewer = {k: v for k, v in recorded.items() if k != "space.optim.lr"}
    assert changed_settings("t", fewer, now).key == "space.optim.lr"  # type: ignore[union-attr]


def json_round_trip(x):
    import json

    return json.loads(json.dumps(x))


def test_sweep_overrides_and_space_forms(tmp_path):
    from pipeline.sweep.config import load_sweep

    cfg = write_sweep(
        tmp_path / "s.yaml",
        space={
            "model": {"init_scale": {"low": 0.5, "high": 2.0}},
            "optim.lr": {"low": 1e-3, "high": 1e-2, "log": True},
        },
    )
    sw = load_sweep(cfg, ["n_trials=7", "space.model.init_scale.high=4", "base.optim.name=sgd"])
    assert sw.n_trials == 7 and sw.base["optim"]["name"] == "sgd"
    ps = {p.key: p for p in sw.space}
    assert ps["model.init_scale"].high == 4.0 and ps["optim.lr"].log
    assert sw.storage_url() == "optuna/t.journal"
    assert sw.trial_config({"optim.lr": 0.005}).optim.lr == 0.005


def test_hyperband_pruner_spans_val_every_to_max_steps(tmp_path):
    """Hyperband's rungs in training steps: from ``pruner.min_resource`` (unset: ``trainer.val_every``, the
    first step a trial reports) to ``trainer.max_steps`` (not Optuna's "auto", which guesses it from the
    first trial to finish), at the configured reduction factor."""
    import optuna

    from pipeline.sweep.config import load_sweep
    from pipeline.sweep.study import make_pruner

    cfg = write_sweep(tmp_path / "s.yaml", pruner={"name": "hyperband", "reduction_factor": 2})
    p = make_pruner(load_sweep(cfg))  # base trainer: max_steps 20, val_every 10
    assert isinstance(p, optuna.pruners.HyperbandPruner)
    assert (p._min_resource, p._max_resource, p._reduction_factor) == (10, 20, 2)
    p = make_pruner(load_sweep(cfg, ["pruner.min_resource=5", "base.trainer.max_steps=40"]))
    assert (p._min_resource, p._max_resource, p._reduction_factor) == (5, 40, 2)


def test_shipped_sweeps_validate():
    from pipeline.sweep.config import load_sweep

    for name in ("default", "smoke", "phase"):
        sw = load_sweep(ROOT / "configs" / "sweeps" / f"{name}.yaml")
        assert {"model.init_scale", "optim.lr"} <= {p.key for p in sw.space}


# --------------------------------------------------------------------------- pruning in-process


def _dead_owner() -> str:
    from pipeline.sweep.owners import owner_tag

    p = subprocess.Popen(["sleep", "60"])
    tag = owner_tag(p.pid)
    p.kill()
    p.wait()
    return tag


def _reaper_study(store, name: str):
    """A journal study ``name`` whose user attrs point at a new MLflow experiment of the same name:
    (journal url, study, MLflow client, experiment id)."""
    import optuna
    from mlflow.tracking import MlflowClient

    from pipeline.sweep.stores import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"optuna/{name}.journal"
    study = optuna.create_study(study_name=name, storage=open_storage(url))
    c = MlflowClient(store)
    exp = c.create_experiment(name)
    study.set_user_attr("mlflow_experiment_id", exp)
    return url, study, c, exp


def test_reaper_fails_dead_owners_trials_closes_runs_and_retries_once(store, monkeypatch):
    """In-process: which RUNNING trials the journal reaper takes (dead owner, orphan past ORPHAN_S) and which
    it leaves (live owner, another host, a fresh orphan); the run closed KILLED; one retry, never two."""
    import optuna

    from pipeline.sweep import owners as sweep_store
    from pipeline.sweep.owners import owner_alive, owner_tag, reap_stale

    url, study, c, exp = _reaper_study(store, "r")

    def running(owner: str | None, x: float):
        t = study.ask()
        study._storage.set_trial_param(t._trial_id, "x", x, optuna.distributions.FloatDistribution(0.0, 1.0))
        if owner:
            t.set_user_attr("worker", owner)
        return t

    dead, live, remote, orphan = _dead_owner(), owner_tag(), "another-host|1|123", None
    # a dead worker of this host name in another PID namespace of this boot (a container restarted under
    # its name): judged by its PID on a journal, one machine's store with no heartbeat to reap it else
    host, pid, start, space = _dead_owner().split("|")
    machine, boot, ns = space.split(".")
    restarted = f"{host}|{pid}|{start}|{machine}.{boot}.{ns}1"
    assert (owner_alive(dead), owner_alive(live), owner_alive(remote)) == (False, True, None)
    assert owner_alive(restarted) is (None if boot and ns else False)
    trials = {
        name: running(o, x)
        for name, o, x in (
            ("dead", dead, 0.1),
            ("live", live, 0.2),
            ("remote", remote, 0.3),
            ("orphan", orphan, 0.4),
            ("restarted", restarted, 0.5),
        )
    }
    run = c.create_run(exp, tags={"study": "r", "trial_number": str(trials["dead"].number)})
    trials["dead"].set_user_attr("mlflow_run_id", run.info.run_id)

    assert reap_stale(study, url, store) == [trials["dead"].number, trials["restarted"].number]
    state = {n: study.trials[t.number].state.name for n, t in trials.items()}
    assert state == {
        "dead": "FAIL",
        "live": "RUNNING",
        "remote": "RUNNING",
        "orphan": "RUNNING",
        "restarted": "FAIL",
    }
    assert c.get_run(run.info.run_id).info.status == "KILLED"
    waiting = [t for t in study.trials if t.state.name == "WAITING"]
    assert [(t.params, t.user_attrs["retry_of"]) for t in waiting] == [
        ({"x": 0.1}, trials["dead"].number),
        ({"x": 0.5}, trials["restarted"].number),
    ]
    assert reap_stale(study, url, store) == []  # idempotent

    monkeypatch.setattr(sweep_store, "ORPHAN_S", -1.0)  # the orphan is now old enough
    assert reap_stale(study, url, store) == [trials["orphan"].number]

    retry = study.ask()  # pops the WAITING retry; its worker dies too: no second retry
    assert retry.params == {"x": 0.1}
    retry.set_user_attr("worker", _dead_owner())
    before = len([t for t in study.trials if t.state.name == "WAITING"])
    assert reap_stale(study, url, store) == [retry.number]
    assert len([t for t in study.trials if t.state.name == "WAITING"]) == before  # orphan's retry only


def test_an_interrupt_uses_up_no_retry_and_a_failure_of_its_own_one():
    """README, "Faults and resuming": a resume reruns every interrupted trial, however often the sweep is
    stopped; a point whose own trials fail (a killed worker, an outage) is retried once. Counting the
    interrupts, a second Ctrl-C left the points the first had re-enqueued FAIL with no retry, the
    start-up design's among them, and the resume drew new ones (a walkthrough). Each step below is the
    path a worker takes: close_interrupted for a stop, a FAIL then enqueue_retry for a reaped trial."""
    import optuna
    from optuna.trial import TrialState

    from pipeline.sweep.owners import close_interrupted, enqueue_retry

    study = optuna.create_study()
    study.enqueue_trial({"x": 0.25}, user_attrs={"startup": True})

    def the_retry_of(number: int):
        (t,) = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == number]
        assert t.state == TrialState.WAITING
        return t

    def asked():
        t = study.ask()
        t.suggest_float("x", 0, 1)
        return t

    a = asked()
    close_interrupted(study, a._trial_id, None)  # Ctrl-C
    waiting = the_retry_of(a.number)
    b = asked()
    assert b.number == waiting.number and b.params == {"x": 0.25}
    close_interrupted(study, b._trial_id, None)  # a second Ctrl-C, on the resume: rerun all the same
    waiting = the_retry_of(b.number)
    c = asked()
    assert c.number == waiting.number and c.params == {"x": 0.25}
    study.tell(c, state=TrialState.FAIL)  # its worker killed: the point's one retry
    assert enqueue_retry(study, study.get_trials()[c.number])
    waiting = the_retry_of(c.number)
    d = asked()
    assert d.number == waiting.number and d.params == {"x": 0.25}
    study.tell(d, state=TrialState.FAIL)  # killed again: no more
    assert not enqueue_retry(study, study.get_trials()[d.number])
    assert study.get_trials()[d.number].system_attrs["retry_history"] == [a.number, b.number, c.number]
    # a study written before the failures were counted: its retried trial keeps its one retry used
    e = asked()
    study.tell(e, state=TrialState.FAIL)
    old = study.get_trials()[e.number]
    old.system_attrs.update({"retry_history": [0], "failed_trial": 0})
    assert not enqueue_retry(study, old)
    assert enqueue_retry(study, old, interrupted=True)


def test_an_interrupted_trial_stopped_before_its_run_id_was_noted_gets_it_from_the_runs_tags(store):
    """README, "What is recorded": ``mlflow_run_id`` is set when the run opens. A signal between a run's
    start and that attr (a batched refill starts its members' runs before their callbacks note them)
    left the interrupted trial with a KILLED run and no attr (a walkthrough); its close finds the run by
    its tags. A trial with the attr keeps it; one whose run was never made gets none."""
    from pipeline.sweep.owners import close_interrupted
    from pipeline.sweep.record import trial_tags

    _, study, c, exp = _reaper_study(store, "n")
    parent = c.create_run(exp).info.run_id
    study.set_user_attr("mlflow_parent_run_id", parent)
    trials = [study.ask() for _ in range(3)]
    under = {"mlflow.parentRunId": parent}
    runs = [c.create_run(exp, tags={**trial_tags("n", t.number), **under}).info.run_id for t in trials[:2]]
    study._storage.set_trial_user_attr(trials[1]._trial_id, "mlflow_run_id", "noted")
    # an earlier study of the same name in this experiment (its journal deleted): the same tags, another
    # parent run; its run was taken for this trial's (a review)
    c.create_run(exp, tags={**trial_tags("n", trials[2].number), "mlflow.parentRunId": "earlier"})
    for t in trials:
        close_interrupted(study, t._trial_id, store)
    got = [study.get_trials()[t.number].user_attrs.get("mlflow_run_id") for t in trials]
    assert got == [runs[0], "noted", None]
    assert all(study.get_trials()[t.number].user_attrs["interrupted"] for t in trials)


def test_a_trial_reaped_after_its_run_finished_but_before_its_tell_has_that_run_killed(store):
    """A kill -9 between a trial's run closing FINISHED and its tell: the reaper fails the trial and retries
    it, so its FINISHED run, never told (no ``optuna_state`` tag), is closed KILLED too; it stayed FINISHED
    beside the retry's run (13 FINISHED trial runs for 12 trials). A told trial's run is left alone."""
    import optuna

    from pipeline.sweep.owners import reap_stale

    url, study, c, exp = _reaper_study(store, "u")
    runs = {}
    for name in ("untold", "told", "untold, no attr", "running, no attr"):
        t = study.ask()
        study._storage.set_trial_param(
            t._trial_id, "x", 0.5, optuna.distributions.FloatDistribution(0.0, 1.0)
        )
        t.set_user_attr("worker", _dead_owner())
        r = c.create_run(exp, tags={"study": "u", "trial_number": str(t.number)})
        if "no attr" not in name:  # else killed before the attr was written: found by its tags
            t.set_user_attr("mlflow_run_id", r.info.run_id)
        if "running" not in name:
            c.set_terminated(r.info.run_id, "FINISHED")
        runs[name] = (t, r.info.run_id)
    told, told_run = runs["told"]
    study.tell(told, 1.0)
    c.set_tag(told_run, "optuna_state", "COMPLETE")

    reaped = sorted(t.number for name, (t, _) in runs.items() if name != "told")
    assert sorted(reap_stale(study, url, store)) == reaped
    for name, (_, rid) in runs.items():
        if name != "told":
            got = c.get_run(rid)
            assert got.info.status == "KILLED" and got.data.tags["status"] == "killed", name
    assert c.get_run(told_run).info.status == "FINISHED"
    assert sorted(t.user_attrs["retry_of"] for t in study.trials if t.state.name == "WAITING") == reaped


def test_the_parents_best_params_wait_for_a_complete_study_and_its_metrics_step_by_trials_done(
    store, tmp_path
):
    """``finalize`` on the sweep's parent run: MLflow params cannot change, so the ``best_*`` params are
    written only once the study is complete (an interrupted sweep's best may still move when it resumes;
    its tags say the best so far); the ``trials/*`` and ``best_*`` metrics are at step ``n_trials_done``,
    so their history reads as the sweep's progress."""
    import optuna

    from pipeline.sweep.config import load_sweep
    from pipeline.sweep.summary import finalize
    from pipeline.tracking import Recorder

    _, study, c, exp = _reaper_study(store, "f")
    sw = load_sweep(str(write_sweep(tmp_path / "s.yaml", n_trials=3)))
    dist = optuna.distributions.FloatDistribution(0.0, 1.0)
    for x, value in ((0.1, 0.5), (0.2, 0.3)):
        study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions={"x": dist}, value=value))
    study.enqueue_trial({"x": 0.3})
    last = study.ask()
    last.suggest_float("x", 0.0, 1.0)
    rec = Recorder.start(store, "f", "sweep-f", experiment_id=exp)
    finalize(rec, study, sw, complete=False, plots=False)
    run = c.get_run(rec.run_id)
    assert not [k for k in run.data.params if k.startswith("best")], run.data.params
    assert (run.data.tags["best_x"], run.data.tags["sweep_complete"]) == ("0.2", "false")
    study.tell(last, 0.1)  # the last trial moves the best
    finalize(rec, study, sw, complete=True, plots=False)
    run = c.get_run(rec.run_id)
    assert (run.data.params["best_x"], run.data.params["best_trial"]) == ("0.3", str(last.number))
    for key, want in (("best_value", [(2, 0.3), (3, 0.1)]), ("trials/complete", [(2, 2.0), (3, 3.0)])):
        got = sorted((m.step, m.value) for m in c.get_metric_history(rec.run_id, key))
        assert got == [(s, pytest.approx(v)) for s, v in want], key


@pytest.mark.parametrize(
    ("ratio", "step", "pruned", "state", "diverged"),
    [
        (0.5, None, False, "COMPLETE", False),
        (0.9379932582378387, None, False, "COMPLETE", False),  # its tag was 0.937993 (a walkthrough)
        (0.5, None, True, "PRUNED", False),
        (0.5, 12, False, "COMPLETE", True),  # the guard stopped it
        (float("nan"), None, False, "COMPLETE", True),  # not finite at the end, guard or not
        (float("inf"), None, True, "COMPLETE", True),
        (None, None, False, "COMPLETE", True),
    ],
)
def test_a_trial_is_told_and_tagged_as_it_ended(store, tmp_path, ratio, step, pruned, state, diverged):
    """``pipeline.sweep.record.tell`` (README, "Objective, divergence, pruning"): a diverged trial, or one whose loss ratio
    is not finite at the end, is told the penalty; its trial attr and its run's ``diverged`` tag agree (the
    tag read "false" where the loss was non-finite without a guard stop)."""
    from types import SimpleNamespace

    from pipeline.sweep.config import load_sweep
    from pipeline.sweep.record import tell
    from pipeline.sweep.study import divergence_value
    from pipeline.sweep.worker import Worker

    _, study, c, exp = _reaper_study(store, "w")
    study.add_trial(optuna_trial(0.7))  # a finished trial: the penalty is relative to it
    worker = Worker.__new__(Worker)  # tell reads only these
    worker.study, worker.mlflow_uri, worker.untagged = study, store, []
    worker.sw = load_sweep(str(write_sweep(tmp_path / "s.yaml")))
    run = c.create_run(exp)
    r = SimpleNamespace(
        run_id=run.info.run_id, regime="exploding", solved=False, steps=20, val_loss_ratio=ratio,
        metrics={}, diverged_step=step, pruned=pruned,
    )  # fmt: skip
    penalty = divergence_value(study, worker.sw.penalty)
    trial = study.ask()
    trial.report(0.9, 10)  # a validation's value: a pruned trial keeps it as its value
    tell(worker, trial, r, "median" if pruned else None)
    told = study.trials[trial.number]
    assert (told.state.name, told.user_attrs["diverged"]) == (state, diverged)
    assert told.value == (penalty if diverged else 0.9 if pruned else ratio)
    tags = c.get_run(run.info.run_id).data.tags
    assert (tags["optuna_state"], tags["diverged"]) == (state, str(diverged).lower())
    # a pruned trial's too (it was left off: a walkthrough), at full precision (it was rounded to 6 digits)
    assert tags["optuna_value"] == repr(float(told.value))


def optuna_trial(value: float):
    import optuna

    dist = optuna.distributions.FloatDistribution(0.0, 1.0)
    return optuna.trial.create_trial(params={"x": 0.5}, distributions={"x": dist}, value=value)


def test_a_stopped_worker_releases_only_the_trials_it_owns(store):
    """SIGTERM in a worker between two steps (README, "Faults and resuming"): ``release_own`` closes the
    trials this process owns (run KILLED, FAIL ``interrupted``, one retry) and leaves every other worker's
    alone: released too, a live worker's trial would be failed and retried twice and its run closed while
    it trains (a mutation review found no test telling the two apart)."""
    import optuna

    from pipeline.sweep.owners import owner_tag, release_own

    url, study, c, exp = _reaper_study(store, "o")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        trials = {}
        mine = owner_tag()
        for name, owner, x in (
            ("mine", mine, 0.1),
            ("theirs", owner_tag(other.pid), 0.2),
            ("untold", mine, 0.3),
        ):
            t = study.ask()
            study._storage.set_trial_param(
                t._trial_id, "x", x, optuna.distributions.FloatDistribution(0.0, 1.0)
            )
            t.set_user_attr("worker", owner)
            run = c.create_run(exp, tags={"study": "o", "trial_number": str(t.number)})
            t.set_user_attr("mlflow_run_id", run.info.run_id)
            trials[name] = (t, run.info.run_id)
        # "untold": its run closed FINISHED, the signal came before the tell (no optuna_state tag yet), so a
        # retry must not leave a FINISHED run beside its own
        c.set_terminated(trials["untold"][1], "FINISHED")
        assert release_own(study, store) == [trials["mine"][0].number, trials["untold"][0].number]
        got = {
            n: (study.trials[t.number].state.name, c.get_run(r).info.status) for n, (t, r) in trials.items()
        }
        assert got == {
            "mine": ("FAIL", "KILLED"),
            "theirs": ("RUNNING", "RUNNING"),
            "untold": ("FAIL", "KILLED"),
        }
        assert c.get_run(trials["untold"][1]).data.tags["status"] == "killed"
        assert study.trials[trials["mine"][0].number].user_attrs["interrupted"] is True
        waiting = [t.user_attrs["retry_of"] for t in study.trials if t.state.name == "WAITING"]
        assert waiting == [trials["mine"][0].number, trials["untold"][0].number]
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("seed", [0, 7])
def test_startup_design_is_what_a_single_process_tpe_draws(seed):
    """The parent's start-up points equal the first n_startup_trials of a plain ``TPESampler(seed)`` study
    over the same space: the sweep's design does not depend on the number of workers."""
    import optuna

    from pipeline.sweep.config import load_sweep
    from pipeline.sweep.study import startup_design, suggest

    def default_sweep(*overrides: str):
        return load_sweep(str(ROOT / "configs/sweeps/default.yaml"), [f"sampler.seed={seed}", *overrides])

    sw = default_sweep()
    design = startup_design(sw)
    n = sw.sampler.n_startup_trials
    assert len(design) == n == 8
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plain = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=n))
    for expected in design:
        t = plain.ask()
        assert {p.key: suggest(t, p) for p in sw.space} == expected
        plain.tell(t, 1.0)
    assert len({tuple(sorted(d.items())) for d in design}) == n  # distinct points
    assert design != startup_design(default_sweep(f"sampler.seed={seed + 1}"))  # the later override wins
    assert startup_design(default_sweep("n_trials=3")) == design[:3]


def test_a_reported_value_is_capped_at_the_penalty_as_the_objective_is():
    """A pruned trial's value is its last report: uncapped, it read 2.04 above the penalty of 2.0 that caps
    every trained trial's objective (a many-machines walkthrough)."""
    from types import SimpleNamespace

    import optuna

    from pipeline.sweep.worker import TrialCallback

    study = optuna.create_study()
    t = study.ask()
    cb = TrialCallback(t, max_grad_norm=None, log_every=5, cap=2.0)
    module = SimpleNamespace(val_loss=5.0, task=SimpleNamespace(baseline=2.0), diverged_step=None)
    for step, loss in ((10, 5.0), (20, 3.0)):
        module.val_loss = loss
        cb.on_validation_end(SimpleNamespace(global_step=step, state=SimpleNamespace(fn="validate")), module)
    assert study.trials[0].intermediate_values == {10: 2.0, 20: 1.5}


def test_gradient_health_and_divergence_in_process(tiny):
    """An exploding trial is pruned on its pre-clip norm; a diverging one stops at its first bad step."""
    import optuna

    from pipeline.sweep.worker import TrialCallback
    from pipeline.training import run as train

    study = optuna.create_study()
    t = study.ask()
    cb = TrialCallback(t, max_grad_norm=1e6, log_every=5)
    cfg = tiny(
        **{
            "model.cell": "relu",
            "model.init": "gaussian",
            "model.init_scale": 4.0,
            "optim.lr": 1.0,
            "tracking.enabled": False,
            "diagnostics.plots": False,
        }
    )
    r = train.run(cfg, callbacks=[cb])
    assert cb.pruned_by == "grad_norm" and r.pruned and r.steps < cfg.trainer.max_steps
    t2 = study.ask()
    cb2 = TrialCallback(t2, max_grad_norm=1e6, log_every=5)
    cfg2 = tiny(
        **{
            "model.cell": "relu",
            "model.init": "gaussian",
            "model.init_scale": 3.0,
            "optim.name": "sgd",
            "optim.lr": 10.0,
            "tracking.enabled": False,
            "diagnostics.plots": False,
        }
    )
    r2 = train.run(cfg2, callbacks=[cb2])
    assert r2.diverged_step is not None and r2.regime == "diverged" and r2.steps < 5


# ----------------------------------------------------------------------------- end to end (fast)


def test_tiny_sweep_parent_child_structure(store, tmp_path):
    cfg = write_sweep(tmp_path / "s.yaml")
    p = run_sweep_cli(cfg)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "best trial #" in p.stdout and "by regime:" in p.stdout
    # run outside the checkout: the verb, not `make ui` (no such target there; a README audit)
    assert "review in MLflow: python -m pipeline ui   (then open" in p.stdout, p.stdout
    study, runs = load_study(), mlflow_runs(store)
    check_consistent(study, runs, 4)
    parent = next(r for r in runs if r.data.tags.get("pipeline.kind") == "sweep")
    best = min(
        (t for t in study.trials if t.value is not None and t.state.name == "COMPLETE"), key=lambda t: t.value
    )
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.params["best_optim.lr"] == str(best.params["optim.lr"])
    assert parent.info.status == "FINISHED"
    # The start-up design went first: trials 0-1 are the parent's seeded points.
    from pipeline.sweep.config import load_sweep
    from pipeline.sweep.study import startup_design

    design = startup_design(load_sweep(str(cfg)))
    assert len(design) == 2 and study.user_attrs["startup_design"] == 2
    assert [t.params for t in study.trials[:2]] == design
    assert [t.user_attrs.get("startup") for t in study.trials] == [True, True, None, None]
    # Re-running the finished study runs nothing new and keeps the same parent run.
    p2 = run_sweep_cli(cfg)
    assert p2.returncode == 0, p2.stderr
    assert "4/4 trials done: nothing to run" in p2.stdout, p2.stdout
    assert len(load_study().trials) == len(study.trials)
    assert len([r for r in mlflow_runs(store) if r.data.tags.get("pipeline.kind") == "sweep"]) == 1
    # A larger budget resumes the study; the parent's n_trials param stays the first one's (MLflow params
    # cannot change), its tag follows; the old budget again has nothing to run.
    p3 = run_sweep_cli(cfg, "n_trials=5")
    assert p3.returncode == 0 and "4/5 trials done, resuming with 1 to go" in p3.stdout, p3.stdout + p3.stderr
    parent = next(r for r in mlflow_runs(store) if r.data.tags.get("pipeline.kind") == "sweep")
    assert parent.data.params["n_trials"] == "4"
    assert (parent.data.tags["n_trials"], parent.data.tags["n_trials_done"]) == ("5", "5")
    p4 = run_sweep_cli(cfg)
    assert p4.returncode == 0, p4.stdout + p4.stderr
    # "5/4 done" alone read as a miscount (a walkthrough)
    assert (
        "5/4 trials done: nothing to run (n_trials 4 is below the 5 trials this study has done" in p4.stdout
    )


def test_an_owner_is_dead_when_its_pid_was_reused_or_is_a_zombie():
    """``host|pid|start time|process space``: a live PID with another start time is another process that reused the
    PID, and a zombie (killed, not yet reaped by its parent) is dead too; either way its trials and runs
    are reaped (pipeline/provenance.py; mutation review)."""
    import socket

    from pipeline.provenance import owner_alive, owner_tag

    me = owner_tag()
    assert owner_alive(me) is True
    host, pid, start, space = me.split("|")
    assert owner_alive(f"{host}|{pid}|{int(start) + 1}|{space}") is False  # the PID now runs another process
    assert owner_alive(f"{host}|{pid}|{int(start) + 1}") is False  # an earlier version's tag, no space
    assert owner_alive(f"{host}|{pid}||{space}") is True  # no start time recorded: the PID alone decides
    assert owner_alive(f"{socket.gethostname()}-elsewhere|{pid}|{start}|{space}") is None  # cannot tell
    assert (
        owner_alive(f"{host}|0|{start}|{space}") is None and owner_alive(f"{host}|-1||") is None
    )  # kill(0): "alive"
    child = subprocess.Popen(["true"])
    try:
        tag = owner_tag(child.pid)
        end = time.monotonic() + 10
        while ") Z" not in Path(f"/proc/{child.pid}/stat").read_text() and time.monotonic() < end:
            time.sleep(0.01)
        assert owner_alive(tag) is False  # exited, not yet reaped
    finally:
        child.wait()
    assert owner_alive(tag) is False  # reaped: gone


def test_an_owner_in_another_pid_namespace_or_boot_is_not_read_as_gone_unless_this_machine_rebooted():
    """A host name does not name a PID space: a live process in another PID namespace (a container with
    the same host name), started here with ``unshare --pid``, was read as gone, since its PID is not ours
    to look up, and a regress or a sweep's reaper closed its runs and trials (a platform-team
    walkthrough). The tag's process space tells it: another namespace or another machine of the same
    name cannot be told (None); the same machine after a reboot (same machine id, another boot id) is
    gone (False), as are the processes of a laptop that lost power."""
    from pipeline.provenance import owner_alive, owner_tag

    if "" in owner_tag().split("|")[3].split("."):
        pytest.skip(f"this machine's process space is not readable in full: {owner_tag()}")
    probe = "from pipeline.provenance import owner_tag; print(owner_tag(), flush=True); import time; time.sleep(60)"
    try:
        child = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", probe],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    except FileNotFoundError:
        pytest.skip("unshare (util-linux) is not installed")
    try:
        tag = child.stdout.readline().strip()
        if not tag:
            pytest.skip(f"unshare --pid needs privileges this process lacks: {child.stderr.read()[-300:]}")
        host, pid, start, theirs = tag.split("|")
        assert child.poll() is None  # alive while it is judged
        assert theirs != owner_tag().split("|")[3]  # another PID namespace, the same boot
        assert owner_alive(tag) is None
        assert (
            owner_alive(f"{host}|{pid}|{start}") is False
        )  # the same tag without its space: the old misreading
    finally:
        child.kill()
        child.wait()
    # a journal store is one machine's: there the host name and PID decide, so a container restarted under
    # its name (a new PID namespace) reaps its own dead trials, which no heartbeat would reap
    assert owner_alive(tag, one_machine=True) is not None


@pytest.mark.parametrize(
    ("mine", "theirs", "verdict"),
    [
        ("aaaa.1111.7", "aaaa.1111.7", "same"),
        ("aaaa.1111.7", "aaaa.1111.8", "unknown"),  # a container on this kernel
        (".1111.7", ".1111.8", "unknown"),  # ... without /etc/machine-id: its namespace still tells
        ("aaaa.1111.7", "aaaa.2222.7", "gone"),  # this machine booted since
        ("aaaa.1111.7", "bbbb.2222.7", "unknown"),  # another machine of the same name
        (".1111.7", ".2222.7", "unknown"),  # no machine id: a reboot cannot be told from another machine
        ("uninitialize.1111.7", "uninitialize.2222.7", "unknown"),  # systemd's placeholder is no machine id
        ("aaaa..7", "aaaa.2222.8", "same"),  # no boot id here: the host name decides, as before
        ("aaaa.1111.", "aaaa.1111.8", "same"),  # no namespace here, one boot: as before
        ("aaaa.1111.7", "garbage", "same"),
    ],
)
def test_a_process_space_is_judged_part_by_part(monkeypatch, mine, theirs, verdict):
    """The owner tag's process space, ``<machine>.<boot>.<pid namespace>``: each part judged on its own
    (a container without /etc/machine-id was judged by its host name alone; a review)."""
    from pipeline import provenance

    monkeypatch.setattr(provenance, "_process_space", lambda: mine)
    assert provenance._space_verdict(theirs) == verdict
    me = f"{provenance.socket.gethostname()}|{os.getpid()}|"
    expected = {"same": True, "gone": False, "unknown": None}[verdict]
    assert provenance.owner_alive(f"{me}|{theirs}") is expected
    assert provenance.owner_alive(f"{me}|{theirs}", one_machine=True) is True  # the journal: this PID lives


@pytest.mark.parametrize(
    ("ends", "code", "status", "complete"),
    [
        ("short", 1, "FINISHED", False),
        ("reached", 0, "FINISHED", True),
        ("sigterm", 143, "KILLED", False),
        ("timeout", 0, "FINISHED", False),
        ("timeout, a worker failed", 1, "FINISHED", False),
        ("timeout, no trial finished", 1, "FINISHED", False),
    ],
)
def test_the_sweeps_exit_status_and_parent_run_status(monkeypatch, ends, code, status, complete):
    """README "Sweeps" / cli/sweep.py: exit 0 when the study reached n_trials, or when the sweep's timeout
    stopped it short (said in one line; it exited 1 with no word of the timeout: a walkthrough) unless a
    worker failed too; 1 when it ended short otherwise (workers failed), 128 + the signal when stopped;
    the parent run closes FINISHED, or KILLED on a signal, and is summarized as complete only when the
    study is. The supervisor in-process, its workers and summary stubbed (mutation review)."""
    import io

    import optuna
    from optuna.distributions import FloatDistribution

    from pipeline.sweep import supervisor as sup

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    dist = {"x": FloatDistribution(0.0, 1.0)}

    def complete_one():
        study.add_trial(optuna.trial.create_trial(params={"x": 0.5}, distributions=dist, value=0.5))

    complete_one()
    calls: dict = {"spawned": [], "closed": [], "summarized": []}

    class Workers:
        procs: dict = {}

        def spawn(self, i):
            calls["spawned"].append(i)

        def terminate_all(self):
            pass

    class Rec:
        def set_tags(self, tags):
            pass

        def close(self, st):
            calls["closed"].append(st)

    def supervise():  # what the workers did meanwhile
        if ends == "reached":
            complete_one()
            complete_one()
        elif ends.startswith("timeout") and not ends.endswith("finished"):
            complete_one()  # one of the two left, then the deadline
        elif ends == "sigterm":
            s.stop.signum = signal.SIGTERM

    s = object.__new__(sup.Supervisor)
    timeout = 5.0 if ends.startswith("timeout") else None
    s.sw = type("Sweep", (), {"n_trials": 3, "study": "p", "timeout": timeout})()
    s.t0, s.out, s.worker_failed = time.time() - 10, io.StringIO(), ends.endswith("failed")
    s.stores = type("Stores", (), {"study": study})()
    s.devices, s.workers, s.rec = [None, None], Workers(), Rec()
    s.stop = type("Stop", (), {"signum": None, "forward": lambda self: None})()
    s.progress = type(
        "Progress", (), {"update": lambda self, force=False, stopped=False: False, "done_at_start": 1}
    )()
    s.preimport = None
    monkeypatch.setattr(sup, "_preimport_summary", lambda: None)
    s._banner = lambda left: None
    s.supervise = supervise
    s.summarize = lambda complete: calls["summarized"].append(complete)
    assert s.run() == code
    assert calls == {"spawned": [0, 1], "closed": [status], "summarized": [complete]}
    head = "the sweep's timeout (5 s from the command's start, worker start-up included) passed"
    said = {
        "timeout": f"note: {head} with 2 of 3 trials done; the same command goes on",
        "timeout, a worker failed": f"note: {head} with 2 of 3 trials done; the same command goes on",
        "timeout, no trial finished": f"error: {head} before this command finished a trial (1 of 3 done): "
        "raise timeout",
    }.get(ends)
    assert [ln for ln in s.out.getvalue().splitlines() if "timeout" in ln] == ([said] if said else [])


@pytest.mark.parametrize(("rc", "failed", "respawned"), [(1, True, []), (-9, False, [0]), (143, False, [0])])
def test_a_worker_that_exits_with_an_error_is_a_failure_and_one_killed_by_a_signal_is_replaced(
    monkeypatch, rc, failed, respawned
):
    """What the exit status above reads (``Supervisor._replace_ended``): a worker's own error exit (1:
    its trials kept raising) makes a timed-out sweep exit 1; a worker killed by a signal, or stopped by a
    SIGTERM it handled (143: its trials closed; read as its own error, a review), is replaced and fails
    nothing. The supervisor in-process, its stores stubbed."""
    import contextlib as cl
    import io

    from pipeline.sweep import owners, stores
    from pipeline.sweep import supervisor as sup

    monkeypatch.setattr(stores, "budget_lock", lambda *a: cl.nullcontext())
    monkeypatch.setattr(owners, "reap_stale", lambda *a: None)
    spawned: list[int] = []
    s = object.__new__(sup.Supervisor)
    s.stores = type("Stores", (), {"url": "u", "storage": None, "study": None, "mlflow_uri": "m"})()
    s.sw = type("Sweep", (), {"study": "p"})()
    s.workers = type(
        "Workers",
        (),
        {"ended": lambda self: {0: rc}, "log_tail": lambda self, i: "", "spawn": spawned.append},
    )()
    s.stop = type("Stop", (), {"signum": None})()
    s.out, s.ended, s.respawns, s.worker_failed = io.StringIO(), {}, 1, False
    s.budget_left = lambda: 5
    s._replace_ended()
    assert (s.worker_failed, spawned, s.ended) == (failed, respawned, {})
    assert f"sweep: worker 0 exited with status {rc}" in s.out.getvalue()


def test_the_parent_run_hides_the_storage_password_and_is_reused_by_a_resume(store, tmp_path):
    """The sweep's parent run (``parent._parent_run``): tags ``pipeline.kind=sweep``, ``study`` and
    ``storage`` without its password (README "Many machines": a PostgreSQL URL may carry one), the
    sweep's params; the study remembers it, so a resume reopens the same run, and a study whose
    experiment changed gets a new one (mutation review)."""
    import optuna
    from mlflow.tracking import MlflowClient

    from pipeline.sweep.config import load_sweep
    from pipeline.sweep.parent import _parent_run
    from pipeline.tracking import ensure_experiment

    sw = load_sweep(str(write_sweep(tmp_path / "s.yaml")))
    study = optuna.create_study(direction="minimize")
    url = "postgresql://sweeper:s3cret@db.example/optuna"
    exp = ensure_experiment(store, "sweeps")
    rid = _parent_run(sw, study, url, store, "sweeps", exp)
    got = MlflowClient(store).get_run(rid)
    tags, params = got.data.tags, got.data.params
    assert tags["storage"] == "postgresql://sweeper:***@db.example/optuna" and "s3cret" not in str(tags)
    assert (tags["pipeline.kind"], tags["study"]) == ("sweep", sw.study)
    assert params["n_trials"] == str(sw.n_trials) and "s3cret" not in str(params)
    assert study.user_attrs["mlflow_parent_run_id"] == rid
    MlflowClient(store).set_terminated(rid, "KILLED")
    assert _parent_run(sw, study, url, store, "sweeps", exp) == rid  # a resume: the same run, reopened
    assert MlflowClient(store).get_run(rid).info.status == "RUNNING"
    other = ensure_experiment(store, "elsewhere")
    assert _parent_run(sw, study, url, store, "elsewhere", other) != rid


def test_progress_prints_the_trials_of_this_sweep_and_an_eta_from_them():
    """The parent's plain-text progress (summary.Progress): one line per trial that ended since the
    sweep started (not the trials a resumed study already had), DIVERGED for a diverged one, then the
    status line, whose ETA extrapolates from the trials done since the start (mutation review)."""
    import io

    import optuna
    from optuna.distributions import FloatDistribution

    from pipeline.sweep.summary import Progress

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="p", direction="minimize")
    dist = {"optim.lr": FloatDistribution(1e-4, 1.0, log=True)}

    def add(value, lr, **attrs):
        t = optuna.trial.create_trial(
            params={"optim.lr": lr}, distributions=dist, value=value, user_attrs=attrs
        )
        study.add_trial(t)

    add(0.5, 0.01, regime="healthy")  # done before this sweep (a resume)
    out = io.StringIO()
    sw = type("Sweep", (), {"n_trials": 5, "study": "p"})()
    p = Progress(sw, study, time.time() - 120, out)  # the sweep started two minutes ago
    add(0.25, 0.1, regime="vanishing")
    add(1.0, 0.9, regime="diverged", diverged=True)
    assert p.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].split()[:3] == ["trial", "1", "COMPLETE"], lines[0]
    assert "value=0.2500" in lines[0] and "regime=vanishing" in lines[0] and "optim.lr=0.1" in lines[0]
    assert lines[1].split()[:3] == ["trial", "2", "DIVERGED"], lines[1]
    assert lines[2].startswith(
        "[p] 3/5 done | running 0 | pruned 0 | diverged 1 | failed 0 | best 0.2500 (#1) | elapsed 2.0 min"
    ), lines[2]
    # two trials in this sweep's two minutes, two left: two minutes more (not 2 x 120 s / 3 done)
    assert lines[2].endswith("| ETA 2.0 min"), lines[2]
    # the last status line of a sweep a signal stopped: no ETA (it read "ETA 0.8 min"; a walkthrough)
    assert p.update(force=True, stopped=True)
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("[p] 3/5 done") and last.endswith("| ETA - (stopped: the same command resumes)"), (
        last
    )


# ------------------------------------------------------------------------------- faults (slow)


def wait_for_running_trial(timeout: float = 240, load=None):
    """The first RUNNING trial that has its MLflow run id (the worker is inside train.run)."""
    from optuna.trial import TrialState

    end = time.time() + timeout
    while time.time() < end:
        if load is not None or Path("optuna/t.journal").exists():
            try:
                study = (load or load_study)()
            except KeyError:  # the store exists a moment before the study record is in it
                study = None
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if study else []:
                if "mlflow_run_id" in t.user_attrs:
                    return t
        time.sleep(0.5)
    raise AssertionError("no trial started")


def _stopped(pid: int) -> bool:
    """Whether no thread of ``pid`` runs any more: each stopped (SIGSTOP taken) or exited, or it is gone."""
    try:
        states = [
            (d / "stat").read_text().rsplit(")", 1)[1].split()[0] for d in Path(f"/proc/{pid}/task").iterdir()
        ]
    except (OSError, IndexError):
        return True
    return all(s in "TZX" for s in states)


def stop_a_worker_mid_trial(timeout: float = 240, load=None):
    """A trial RUNNING in its worker, and that worker's pid, the worker stopped (SIGSTOP) while it holds the
    trial, for the test to kill -9: the trial read RUNNING (wait_for_running_trial) may be told before a
    kill sent right after the read arrives (a pruned trial lasts 0.4 s), and the kill then cut the next
    trial or none, not the one the test checks. Read again once the worker is stopped: still RUNNING, it is
    the trial the kill will cut; else the worker goes on and another is read."""
    end = time.time() + timeout
    while time.time() < end:
        t = wait_for_running_trial(max(1.0, end - time.time()), load=load)
        pid = int(t.user_attrs["worker"].split("|")[1])
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            continue
        stop_end = time.monotonic() + 10
        while not _stopped(pid) and time.monotonic() < stop_end:
            time.sleep(0.01)
        time.sleep(0.2)  # a write it sent before it stopped has reached the store (PostgreSQL)
        if (load or load_study)().trials[t.number].state.name == "RUNNING":
            return t, pid
        os.kill(pid, signal.SIGCONT)
    raise AssertionError("no worker stopped while it held a trial")


def check_killed_trial_retried(study, runs, t, n_trials: int) -> None:
    """After a kill -9 of trial ``t``'s worker: the trial FAIL, its run KILLED (tag status=killed), its
    params retried exactly once and finished, and the rest of the study consistent."""
    stale = study.trials[t.number]
    assert stale.state.name == "FAIL"
    killed = next(r for r in runs if r.info.run_id == t.user_attrs["mlflow_run_id"])
    assert killed.info.status == "KILLED" and killed.data.tags.get("status") == "killed"
    retry = [x for x in study.trials if x.user_attrs.get("retry_of") == t.number]
    assert (
        len(retry) == 1 and retry[0].params == stale.params and retry[0].state.name in ("COMPLETE", "PRUNED")
    )
    check_consistent(study, [r for r in runs if r.info.run_id != killed.info.run_id], n_trials)


def kill_a_worker_while_the_sweep_runs(cfg: Path, mlflow_uri: str, n_trials: int, *extra: str, load=None):
    """kill -9 one worker mid-trial; the parent goes on. It must reap the trial at once (FAIL, run KILLED),
    replace the worker, retry the params once, and finish the budget with everything accounted for."""
    parent = start_sweep(cfg, *extra)
    try:
        t, worker_pid = stop_a_worker_mid_trial(load=load)  # None: the journal, once its file exists
        os.kill(worker_pid, signal.SIGKILL)
        out, err = parent.communicate(timeout=300)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
    assert parent.returncode == 0, out + err
    assert "exited with status -9" in out, out
    study = (load or load_study)()
    check_killed_trial_retried(study, mlflow_runs(mlflow_uri), t, n_trials)
    owners = {x.user_attrs["worker"] for x in study.trials if "worker" in x.user_attrs}
    assert t.user_attrs["worker"] in owners and len(owners) >= 2  # a replacement worker took trials
    return study


@pytest.mark.slow
def test_four_workers_on_fresh_stores(store, tmp_path):
    cfg = write_sweep(tmp_path / "s.yaml", n_trials=10, workers=4)
    p = run_sweep_cli(cfg)
    assert p.returncode == 0, p.stdout + p.stderr
    logs = "".join(f.read_text() for f in Path("optuna/logs/t").glob("*.log")) + p.stdout + p.stderr
    assert "database is locked" not in logs and "Traceback" not in logs, logs[-3000:]
    assert len(list(Path("optuna/logs/t").glob("worker-*.log"))) == 4
    study = load_study()
    check_consistent(study, mlflow_runs(store), 10)
    assert [t.number for t in study.trials] == list(range(len(study.trials)))  # no lost or duplicated trial
    con = sqlite3.connect(store.removeprefix("sqlite:///"))  # four writers on the WAL-mode store
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


@pytest.mark.slow
def test_kill_9_mid_trial_then_resume(store, tmp_path):
    cfg = write_sweep(
        tmp_path / "s.yaml",
        n_trials=3,
        base={**TINY["base"], "trainer": {"max_steps": 400, "val_every": 100, "log_every": 10}},
    )
    parent = start_sweep(cfg, quiet=True)
    t, worker_pid = stop_a_worker_mid_trial()
    os.kill(parent.pid, signal.SIGKILL)  # the whole sweep dies without a chance to clean up
    os.kill(worker_pid, signal.SIGKILL)
    parent.wait()
    time.sleep(0.5)
    assert load_study().trials[t.number].state.name == "RUNNING"  # what other tools leave behind
    # Until the resume, a report reads the dead trial's RUNNING run as killed, not as a sweep in progress:
    # its run names its worker (pipeline.owner, the trial's worker attr), a process that is gone.
    from pipeline.report import data as rd

    now = load_study().trials[t.number]  # its run id, set as its run opened (maybe after t was read)
    (run,) = [r for r in mlflow_runs(store) if r.info.run_id == now.user_attrs["mlflow_run_id"]]
    assert run.info.status == "RUNNING" and run.data.tags["pipeline.owner"] == now.user_attrs["worker"]
    from pipeline.schema import ConfigError

    target = rd.resolve_target(store, study="t")
    refused = ""
    try:
        rd.load_runs(target)
    except ConfigError as e:  # no other trial has finished yet
        refused = str(e)
    assert (
        not refused or "no runs to report but 1 killed (1 left RUNNING by a process that is gone)" in refused
    )
    assert (target.killed, target.abandoned) == (1, 1)
    p = run_sweep_cli(cfg)  # the same command resumes
    assert p.returncode == 0, p.stdout + p.stderr
    check_killed_trial_retried(load_study(), mlflow_runs(store), t, 3)


@pytest.mark.slow
@pytest.mark.parametrize("fork", ["1", "0"], ids=["forkserver", "fresh-interpreter"])
def test_kill_9_of_one_worker_while_the_sweep_goes_on(store, tmp_path, monkeypatch, fork):
    monkeypatch.setenv("PIPELINE_SWEEP_FORK", fork)  # both process models (GPU workers use the second)
    cfg = write_sweep(
        tmp_path / "s.yaml",
        n_trials=3,
        base={**TINY["base"], "trainer": {"max_steps": 400, "val_every": 100, "log_every": 10}},
    )
    kill_a_worker_while_the_sweep_runs(cfg, store, 3)


FORKSERVER_SCRIPT = """
import os, signal, sys, time
from multiprocessing import forkserver
from pipeline.sweep import procs
procs.prestart()
server = forkserver._forkserver._forkserver_pid
def worker(seconds):
    w = procs.WorkerProcess.__new__(procs.WorkerProcess)
    w.proc = procs.context().Process(target=time.sleep, args=(seconds,))
    w.proc.start()
    w.pid = w.proc.pid
    return w
w, killed = worker(6), worker(60)
os.kill(server, signal.SIGTERM)   # a SIGTERM to the sweep's process group reaches the forkserver
time.sleep(1)
print("forkserver alive after SIGTERM:", procs._running(server))
os.kill(server, signal.SIGKILL)   # gone all the same: the workers are this process's children now
time.sleep(1)
t = time.monotonic()
print("poll while the worker sleeps:", w.poll())
os.kill(killed.pid, signal.SIGKILL)
print("killed:", killed.wait(20))
print("wait:", w.wait(20), "after", round(time.monotonic() - t, 1), "s")
"""


def test_workers_outlive_their_forkserver_in_the_parents_eyes(tmp_path):
    """The forkserver ignores SIGTERM (a SIGTERM to the sweep's process group, as ``timeout`` and service
    managers send, killed it); and a worker whose forkserver is gone anyway (SIGKILL) is watched until it
    ends, with its own exit status: multiprocessing reported 255 for it at once, and the parent, thinking
    every worker gone, left before they had closed their trials (runs left RUNNING; a chaos walkthrough, 4
    of 4 group SIGTERMs)."""
    out = subprocess.run(
        [sys.executable, "-c", FORKSERVER_SCRIPT],
        capture_output=True,
        text=True,
        env=sweep_env(),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "forkserver alive after SIGTERM: True"
    assert lines[1] == "poll while the worker sleeps: None"
    # their own statuses, read by the sweep's parent as their subreaper (procs.become_subreaper): 255
    # for both before, so a worker killed after its forkserver was not replaced
    assert lines[2] == "killed: -9"
    waited = float(lines[3].split("after ")[1].split()[0])
    assert lines[3].startswith("wait: 0 ") and waited >= 1.0  # it slept on, 6 s from its start (about 4 here)


def _children(pid: int) -> dict[int, str]:
    """The live child processes of ``pid`` and their command lines (/proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    return out


@pytest.mark.slow
def test_a_worker_killed_after_its_forkserver_is_replaced_and_the_sweep_ends_at_n_trials(store, tmp_path):
    """kill -9 of the CPU workers' forkserver mid-sweep, then of a worker. The workers took the forkserver's
    end for their parent's and stopped after their trial; the parent read status 255 for each (the real
    one went with the forkserver), replaced none, and the sweep ended short of ``n_trials``, exit 1 (a
    chaos review). The parent is now its workers' subreaper: orphaned, they are its children, it reads a
    killed one's -9 and replaces it from a new forkserver; the others go on, and the sweep ends at
    ``n_trials`` with everything accounted for (README, "Faults and resuming")."""
    n = 8
    cfg = write_sweep(
        tmp_path / "s.yaml",
        n_trials=n,
        workers=2,
        base={**TINY["base"], "trainer": {"max_steps": 400, "val_every": 100, "log_every": 20}},
    )
    parent = start_sweep(cfg)
    try:
        wait_for_running_trial()
        (server,) = [pid for pid, cmd in _children(parent.pid).items() if "forkserver" in cmd]
        workers = set(_children(server))
        os.kill(server, signal.SIGKILL)
        since = datetime.datetime.now()  # Optuna stamps datetime_start with naive local time
        time.sleep(1)
        t, killed = stop_a_worker_mid_trial()
        os.kill(killed, signal.SIGKILL)
        out, err = parent.communicate(timeout=300)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
    assert parent.returncode == 0, out + err
    assert "exited with status -9" in out and "status 255" not in out, out
    study = load_study()
    check_killed_trial_retried(study, mlflow_runs(store), t, n)
    later = {int(x.user_attrs["worker"].split("|")[1]) for x in study.trials if x.datetime_start > since}
    assert later & (workers - {killed}), "the worker that was not killed took no trial after its forkserver"


def _gone(pid: int) -> bool:
    """A process that has ended: no such pid, or a zombie (its new parent may never reap it in a container)."""
    try:
        return ") Z" in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True


@pytest.mark.slow
def test_workers_of_a_sweep_whose_parent_is_killed_take_no_new_trial(store, tmp_path):
    """kill -9 of the sweep's parent alone. Its forkserver outlived it (each worker holds the write end of
    the forkserver's "alive" pipe), so the workers, still the forkserver's children, saw no change of
    parent and took trial after trial in the background until the study was done (a walkthrough: all 10
    trials of a killed sweep finished). They now ask the sweep's parent itself (pid and start time): each
    finishes the trial it holds and exits, and the forkserver with them (README, "Faults and resuming")."""
    n, workers = 40, 2
    cfg = write_sweep(
        tmp_path / "s.yaml",
        n_trials=n,
        workers=workers,
        base={**TINY["base"], "trainer": {"max_steps": 400, "val_every": 100, "log_every": 20}},
    )
    parent, procs = start_sweep(cfg, quiet=True), set()
    try:
        wait_for_running_trial()
        (server,) = [pid for pid, cmd in _children(parent.pid).items() if "forkserver" in cmd]
        procs = {server, *_children(server)}
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        # counted after the kill: counted before it, the trials its live workers rightly took while this
        # process was held up between the count and the kill broke the bound below
        asked = len(load_study().trials)
        end = time.monotonic() + 240
        while not all(_gone(p) for p in procs) and time.monotonic() < end:
            time.sleep(0.5)
        alive = [p for p in procs if not _gone(p)]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
    assert not alive, f"still running 240 s after their sweep's parent was killed: {alive}"
    # a worker that passed its check just before the kill may still have asked one trial
    trials = load_study().trials
    assert len(trials) <= asked + workers < n, (asked, len(trials))
    assert sum(t.state.name == "COMPLETE" for t in trials) < n


def test_a_worker_that_is_a_zombie_or_gone_is_not_running():
    """A worker whose forkserver died is watched by its pid (``procs._running``): a zombie (exited, not
    reaped: its new parent may never reap it in a container without an init) has ended, as has a pid
    that is gone; else the parent waited on it for ever (mutation review)."""
    from pipeline.sweep.procs import _running

    assert _running(os.getpid())
    child = subprocess.Popen(["true"])
    try:
        end = time.monotonic() + 10
        while ") Z" not in Path(f"/proc/{child.pid}/stat").read_text() and time.monotonic() < end:
            time.sleep(0.01)
        assert not _running(child.pid)
    finally:
        child.wait()
    assert not _running(child.pid)


def test_the_parent_sleeps_while_a_worker_outlives_its_forkserver(monkeypatch):
    """A worker whose forkserver is gone has a ready sentinel while it runs: waiting on it returned at
    once, and the parent spun on the store (100,000 waits in 3 s in a review); it sleeps instead."""
    import multiprocessing.connection

    from pipeline.sweep import supervisor

    class Lost:  # what procs.WorkerProcess shows then: exit status 255 from multiprocessing, yet running
        proc = type("P", (), {"exitcode": 255, "sentinel": None})()

        def poll(self):
            return None

    workers = supervisor.Workers.__new__(supervisor.Workers)
    workers.procs = {0: Lost()}
    calls = []
    monkeypatch.setattr(supervisor.time, "sleep", lambda s: calls.append(("sleep", s)))
    monkeypatch.setattr(multiprocessing.connection, "wait", lambda *a: calls.append(("wait", a)) or [])
    workers.wait_any(0.5)
    assert calls == [("sleep", 0.5)]


@pytest.mark.slow
@pytest.mark.parametrize("to", ["parent", "group"])
def test_sigterm_closes_trial_and_runs(store, tmp_path, to):
    """SIGTERM to the parent, or to the sweep's whole process group as ``timeout`` and service managers
    send it: the group holds the forkserver too, which died of it, and the parent, reading exit status 255
    for workers that still ran, left before they had closed their trials (runs left RUNNING). End to end;
    these tiny trials close within the parent's first poll, so the test that fails on either cause alone is
    test_workers_outlive_their_forkserver_in_the_parents_eyes."""
    cfg = write_sweep(
        tmp_path / "s.yaml",
        n_trials=3,
        base={**TINY["base"], "trainer": {"max_steps": 2000, "val_every": 500, "log_every": 10}},
    )
    parent = start_sweep(cfg)
    t = wait_for_running_trial()
    worker_pid = int(t.user_attrs["worker"].split("|")[1])
    if to == "group":
        os.killpg(parent.pid, signal.SIGTERM)
    else:
        parent.send_signal(signal.SIGTERM)
    out, err = parent.communicate(timeout=120)
    assert parent.returncode == 143, out + err
    from pipeline.sweep.procs import _running

    assert not _running(worker_pid)  # the parent waited for its worker
    study, runs = load_study(), mlflow_runs(store)
    assert study.trials[t.number].state.name == "FAIL" and study.trials[t.number].user_attrs.get(
        "interrupted"
    )
    assert not [r for r in runs if r.info.status == "RUNNING"]
    by_id = {r.info.run_id: r for r in runs}
    assert by_id[t.user_attrs["mlflow_run_id"]].info.status == "KILLED"
    assert next(r for r in runs if r.data.tags.get("pipeline.kind") == "sweep").info.status == "KILLED"
    waiting = [x for x in study.trials if x.state.name == "WAITING"]
    retry = [x for x in waiting if x.user_attrs.get("retry_of") == t.number]
    assert len(retry) == 1 and retry[0].params == study.trials[t.number].params  # the resume reruns it
    assert all(x in retry or x.user_attrs.get("startup") for x in waiting)  # the rest: unused start-up points


@pytest.mark.slow
def test_a_sigterm_while_the_first_workers_spawn_stops_them(store, tmp_path):
    """The parent has printed its banner and is forking its first workers (seconds: the forkserver imports
    torch and Lightning). A SIGTERM then (a scheduler's cancel at start-up) reached no worker: each was
    forked after it, or forked and still ignoring SIGTERM as the forkserver does, and the sweep trained
    its whole budget before exiting 143 (a chaos review, 5 of 5). Now the parent forks no more, forwards
    the signal to those it forked, and a worker keeps it pending until it can take it."""
    from pipeline.sweep.study import counts

    cfg = write_sweep(
        tmp_path / "s.yaml",
        n_trials=4,
        workers=2,
        base={**TINY["base"], "trainer": {"max_steps": 2000, "val_every": 500, "log_every": 10}},
    )
    parent = subprocess.Popen(
        sweep_cmd(cfg), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=sweep_env()
    )
    for line in parent.stdout:
        if line.startswith("  worker logs:"):  # the banner's last line: stores made, no worker forked yet
            parent.send_signal(signal.SIGTERM)
            break
    out, err = parent.communicate(timeout=240)
    assert parent.returncode == 143, out + err
    study, runs = load_study(), mlflow_runs(store)
    assert counts(study)["done"] == 0, [(t.number, t.state.name) for t in study.trials]
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert next(r for r in runs if r.data.tags.get("pipeline.kind") == "sweep").info.status == "KILLED"


@pytest.mark.slow
def test_diverged_trials_are_recorded_and_learned_from(store, tmp_path):
    base = {
        **TINY["base"],
        "model": {"cell": "relu", "hidden_size": 8, "init": "gaussian"},
        "optim": {"name": "sgd", "lr": 10.0},
    }
    cfg = write_sweep(
        tmp_path / "s.yaml",
        n_trials=4,
        workers=2,
        penalty=3.0,
        base=base,
        space={
            "model.init_scale": {"low": 2.5, "high": 4.0},
            "optim.lr": {"low": 10.0, "high": 100.0, "log": True},
        },
    )
    p = run_sweep_cli(cfg)
    assert p.returncode == 0, p.stdout + p.stderr
    study, runs = load_study(), mlflow_runs(store)
    check_consistent(study, runs, 4)
    div = [t for t in study.trials if t.user_attrs.get("diverged")]
    assert div, "the diverging space produced no diverged trial"
    by_id = {r.info.run_id: r for r in runs}
    for t in div:
        assert t.state.name == "COMPLETE" and t.value == 3.0  # penalty, not FAIL: TPE sees it
        assert isinstance(t.user_attrs["diverged_step"], int) and t.user_attrs["regime"] == "diverged"
        tags = by_id[t.user_attrs["mlflow_run_id"]].data.tags
        assert (
            tags["regime"] == "diverged" and tags["diverged"] == "true" and tags["optuna_state"] == "COMPLETE"
        )
    assert "diverged" in p.stdout


@pytest.mark.slow
def test_shipped_smoke_sweep(store):
    import pandas as pd
    from mlflow.tracking import MlflowClient

    p = run_sweep_cli(ROOT / "configs" / "sweeps" / "smoke.yaml", timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    study = load_study("smoke", "optuna/smoke.journal")
    runs = mlflow_runs(store, "sweep-smoke")
    check_consistent(study, runs, 6)
    parent = next(r for r in runs if r.data.tags.get("pipeline.kind") == "sweep")
    c = MlflowClient(store)
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)} | {
        a.path for a in c.list_artifacts(parent.info.run_id, "plots")
    }
    assert {
        "trials.parquet",
        "sweep.yaml",
        "plots/optuna_history.png",
        "plots/param_importances.png",
        "plots/contour_init_scale_lr.png",
    } <= arts
    df = pd.read_parquet(c.download_artifacts(parent.info.run_id, "trials.parquet"))
    assert {"number", "state", "value", "regime", "run_id", "p.optim.lr"} <= set(df.columns)
    assert len(df) == len(study.trials)


def test_a_sweep_that_fails_creating_its_stores_stops_its_forkserver(tmp_path, monkeypatch):
    """The forkserver starts (importing torch for seconds) while the parent creates the stores; a sweep
    that failed there left it alive with parent 1 for about 30 s, writing to the finished command's
    stderr (fuzzing review). run_sweep is what ``python -m pipeline sweep`` calls."""
    from multiprocessing import forkserver

    from pipeline.schema import StoreError
    from pipeline.sweep import parent, procs

    seen: dict[str, int | None] = {}

    def subreaper() -> int:
        import ctypes

        flag = ctypes.c_int(-1)
        ctypes.CDLL(None).prctl(37, ctypes.byref(flag), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
        return flag.value

    def fail(*args, **kwargs):
        seen["pid"] = forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
        seen["subreaper"] = subreaper()
        raise StoreError("optuna storage planted", "fails after the forkserver started", "nothing to do")

    cfg = write_sweep(tmp_path / "s.yaml")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("PIPELINE_SWEEP_FORK", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # prestart sets them for the forkserver
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    monkeypatch.setattr(parent, "create_stores", fail)
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    try:
        with pytest.raises(StoreError, match="planted"):
            parent.run_sweep(str(cfg), ["n_trials=1"], workers=1)
        assert "PGCONNECT_TIMEOUT" not in os.environ  # the sweep's libpq bound, taken back with it
        pid = seen["pid"]
        assert pid is not None  # it had started
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # stopped and reaped
        assert list(work.iterdir()) == []
        # the orphans' reaper while the sweep ran (procs.become_subreaper), not after it: a process that
        # runs sweeps in-process would collect zombies
        assert (seen["subreaper"], subreaper()) == (1, 0)
    finally:
        procs.stop()


@pytest.mark.parametrize(
    ("shared", "key", "edge", "beyond"),
    [
        (["heartbeat.interval=10"], "heartbeat.grace", 11, 10),  # grace must be larger than the interval
        ([], "heartbeat.interval", 1, 0),
        ([], "pruner.reduction_factor", 2, 1),
        ([], "penalty", 1, 0.999),  # below 1 the cap on trained values ties every trial that learned little
        ([], "timeout", 0.001, 0),
        ([], "sampler.seed", 2**32 - 1, 2**32),
        ([], "workers", 1024, 1025),
        ([], "trials_per_worker", 4096, 4097),
        ([], "n_trials", 10**6, 10**6 + 1),
        ([], "pruner.min_resource", 1, 0),
    ],
)
def test_each_sweep_bound_holds_at_its_edge_and_refuses_beyond(tmp_path, shared, key, edge, beyond):
    """README, "Sweep file": the value at a bound loads, the first one beyond is one line naming the key."""
    from pipeline.schema import ConfigError
    from pipeline.sweep.config import load_sweep

    cfg = write_sweep(tmp_path / "s.yaml")
    sw = load_sweep(cfg, [*shared, f"{key}={edge}"])
    section, _, field = key.rpartition(".")
    got = getattr(getattr(sw, section), field) if section else getattr(sw, key)
    assert got == edge
    with pytest.raises(ConfigError) as e:
        load_sweep(cfg, [*shared, f"{key}={beyond}"])
    assert e.value.key == key and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("spec", "key", "words"),
    [
        ({"optim.lr": {"low": 0.01, "high": 0.01}}, "space.optim.lr", "low must be < high"),
        ({"trainer.threads": {"choices": [1, 2]}}, "space.trainer.threads", "cannot be searched"),
        ({"trainer.progress_bar": {"choices": [True]}}, "space.trainer.progress_bar", "cannot be searched"),
        ({"model.cell": {"choices": ["gru", "tanh", "gru"]}}, "space.model.cell.choices", "duplicates"),
        (
            {"model.init_scale": {"choices": [1.0, 2.0], "low": 1}},
            "space.model.init_scale",
            "cannot be combined",
        ),
        ({"model.hidden_size": {"low": 8, "high": 16.5}}, "space.model.hidden_size", "integers"),
        ({"model.hidden_size": {"low": 8, "high": 16, "step": 2.5}}, "space.model.hidden_size", "integers"),
        ({"optim.lr": {"low": 0.001, "high": 0.1, "log": True, "step": 0.01}}, "space.optim.lr.step", "log"),
        ({"optim.lr": {"low": 0.001, "high": 0.1, "step": 0}}, "space.optim.lr.step", "> 0"),
        ({"model.cell": {"low": 1, "high": 2}}, "space.model.cell", "use choices"),
    ],
)
def test_a_bad_space_dimension_is_one_line_naming_it(tmp_path, spec, key, words):
    """README, "Sweep file": ``{low, high[, log][, step]}`` on numeric keys, ``{choices}`` on any, and no
    ``trainer.threads/progress_bar``: each other form is refused before anything is written."""
    from pipeline.schema import ConfigError
    from pipeline.sweep.config import load_sweep

    with pytest.raises(ConfigError) as e:
        load_sweep(write_sweep(tmp_path / "s.yaml", space=spec))
    assert e.value.key == key and words in str(e.value) and "\n" not in str(e.value)


def test_a_space_reads_as_written(tmp_path):
    """Each dimension as the worker's Optuna calls will draw it: the kind, the ends, log and step."""
    from pipeline.sweep.config import load_sweep
    from pipeline.sweep.space import Param

    space = {
        "model.hidden_size": {"low": 8, "high": 32, "step": 8},
        "optim.lr": {"low": 1e-3, "high": 0.1, "log": True},
        "task.seq_len": {"low": 10, "high": 40, "log": True},
        "model.init_scale": {"low": 0.5, "high": 2.0, "step": 0.5},
        "model.cell": {"choices": ["tanh", "gru"]},
    }
    sw = load_sweep(write_sweep(tmp_path / "s.yaml", space=space))
    got = {p.key: p for p in sw.space}
    assert got == {
        "model.hidden_size": Param("model.hidden_size", "int", 8, 32, False, 8),
        "optim.lr": Param("optim.lr", "float", 1e-3, 0.1, True, None),
        "task.seq_len": Param("task.seq_len", "int", 10, 40, True, None),
        "model.init_scale": Param("model.init_scale", "float", 0.5, 2.0, False, 0.5),
        "model.cell": Param("model.cell", "categorical", choices=("tanh", "gru")),
    }
    h = got["model.hidden_size"]
    assert all(type(v) is int for v in (h.low, h.high, h.step))


def test_auto_and_names_as_the_sweep_file_reference_says(tmp_path):
    """``workers: auto`` and ``trials_per_worker: auto`` leave the choice to the machine (None); a study
    named by a number is that name; the parent run's name is ``sweep-<study>``, cut to the 250 characters
    of MLflow's database column."""
    from pipeline.sweep.config import load_sweep, parent_run_name

    sw = load_sweep(write_sweep(tmp_path / "s.yaml", workers="auto", trials_per_worker="auto", study=2024))
    assert (sw.workers, sw.trials_per_worker, sw.study) == (None, None, "2024")
    assert parent_run_name("t") == "sweep-t"
    long = parent_run_name("s" * 512)
    assert len(long) == 250 and long == "sweep-" + "s" * 244


def test_a_base_path_is_read_beside_the_sweep_file(tmp_path, monkeypatch):
    """README, "Sweep file": ``base`` is a path relative to the sweep file, wherever the command runs; a
    file of that name in the working directory does not win over it."""
    from pipeline.sweep.config import load_sweep

    d = tmp_path / "sweeps"
    d.mkdir()
    base = dict(TINY["base"], seed=11)
    (d / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(dict(TINY["base"], seed=22)))
    cfg = write_sweep(d / "s.yaml", base="base.yaml")
    monkeypatch.chdir(tmp_path)
    assert load_sweep(cfg).base_config().seed == 11


def test_a_searched_init_makes_the_searched_scale_read(tmp_path):
    """``model.init_scale`` is read by a trial whose ``model.init`` is not ``default``: searched beside an
    ``init`` choice that has such a value, it is no dimension "read by no trial"."""
    from pipeline.sweep.config import load_sweep, unread_searched_keys

    space = {
        "model.init": {"choices": ["default", "gaussian"]},
        "model.init_scale": {"low": 0.5, "high": 2.0},
    }
    sw = load_sweep(write_sweep(tmp_path / "s.yaml", space=space), ["base.model.init=default"])
    assert unread_searched_keys(sw) == []
    sw = load_sweep(write_sweep(tmp_path / "s.yaml", space={"model.init_scale": {"low": 0.5, "high": 2.0}}))
    assert unread_searched_keys(sw) == []  # the base's init is gaussian
    (note,) = unread_searched_keys(load_sweep(tmp_path / "s.yaml", ["base.model.init=default"]))
    assert note.startswith("space key model.init_scale is read by no trial (model.cell in ['tanh'], ")


def test_the_banner_names_each_gpu_once():
    """Twelve workers sharing one card (README, "Batched trials": `workers: auto` is up to 12 per GPU) read ``GPU 0``,
    not ``GPU 0,0,0,0,0,0,0,0,0,0,0,0``; two cards in worker order; CPU workers ``CPU``."""
    from pipeline.sweep.supervisor import devices_text

    assert devices_text(["0"] * 12) == "GPU 0"
    assert devices_text(["1", "0", "1", "0"]) == "GPU 1,0"
    assert devices_text([None, None]) == "CPU"


def test_a_worker_killed_while_the_store_does_not_answer_is_replaced_when_it_does(monkeypatch):
    """A review: the parent took a killed worker off its list, then its reap failed (a store outage,
    ridden out by the parent), and the next poll no longer knew the worker: never reaped nor replaced."""
    import contextlib

    from pipeline.sweep import owners, stores
    from pipeline.sweep import supervisor as sup

    ended = [{0: -9, 1: 0}]
    spawned, reaps = [], []

    class Workers:
        def ended(self):
            return ended.pop() if ended else {}

        def log_tail(self, i):
            return ""

        def spawn(self, i):
            spawned.append(i)

    def reap(*a):
        reaps.append(a)
        if len(reaps) == 1:
            raise RuntimeError("could not connect to server: Connection refused")

    monkeypatch.setattr(owners, "reap_stale", reap)
    monkeypatch.setattr(stores, "budget_lock", lambda *a: contextlib.nullcontext())
    s = object.__new__(sup.Supervisor)
    s.sw = type("Sweep", (), {"study": "t"})()
    s.stores = type("Stores", (), {"url": "u", "storage": None, "study": None, "mlflow_uri": "m"})()
    s.workers, s.out, s.ended, s.respawns, s.worker_failed = Workers(), io.StringIO(), {}, 2, False
    s.stop = type("Stop", (), {"signum": None})()
    s.budget_left = lambda: 3
    with pytest.raises(RuntimeError):
        s._replace_ended()  # the outage: Outage.call swallows this in supervise
    assert spawned == [] and s.ended == {0: -9}
    s._replace_ended()  # the store answers again
    assert spawned == [0] and s.ended == {} and s.respawns == 1 and len(reaps) == 2
    assert s.out.getvalue().count("worker 0 exited with status -9") == 1


SLOW_CHILD = """
import signal, sys, time
def slow_entry(delay):
    time.sleep(delay)  # as pipeline.sweep.procs._entry begins: SIGTERM as the forkserver left it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    time.sleep(3)
    sys.exit(0)
"""
SIGNAL_A_FRESH_WORKER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from pipeline.sweep import procs
procs.prestart()
import slow_child
p = procs.context().Process(target=slow_child.slow_entry, args=(1.0,))
p.start()
os.kill(p.pid, signal.SIGTERM)  # forwarded before the worker took SIGTERM back
p.join()
print(p.exitcode)
procs.stop()
"""


def test_a_sigterm_forwarded_to_a_worker_just_forked_is_kept_until_it_can_take_it(tmp_path):
    """The forkserver ignores SIGTERM (a process-group SIGTERM killed it), and a worker inherits that
    until its entry takes SIGTERM back: a SIGTERM the parent forwarded in between was lost, and the
    worker trained on. The forkserver also blocks SIGTERM, so the worker keeps it pending and ends (-15)
    as it takes SIGTERM back (a review planted the block out: this test is the one that fails)."""
    (tmp_path / "slow_child.py").write_text(SLOW_CHILD)
    r = subprocess.run(
        [sys.executable, "-c", SIGNAL_A_FRESH_WORKER, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        env=sweep_env(),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-1] == "-15", r.stdout + r.stderr[-2000:]


def test_a_pruned_trial_is_never_the_best_so_far_whatever_its_ratio():
    """log_models: best keeps the weights of the best COMPLETE trial; a pruned trial's intermediate ratio
    (0.1 here, below the best 0.5) does not make it the best (a mutation audit: dropping the pruned test
    survived, and a real sweep then logged a pruned trial's weights)."""
    import types

    import optuna

    from pipeline.sweep.record import is_best_so_far

    study = optuna.create_study()
    t = study.ask()
    t.set_user_attr("val_loss_ratio", 0.5)
    study.tell(t, 0.5)
    sw = types.SimpleNamespace(log_models="best")
    r = types.SimpleNamespace(val_loss_ratio=0.1, run_id="x", pruned=True, diverged_step=None)
    assert is_best_so_far(sw, study, r, object()) is False
    r.pruned = False
    assert is_best_so_far(sw, study, r, object()) is True
