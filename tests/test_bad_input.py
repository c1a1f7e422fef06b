"""Bad input never takes the machine down; broken stores are named in one line (issue section 4).

Each case runs the real CLI (``python -m pipeline ...``) in a subprocess whose working directory is a
temporary folder, and checks what a user sees: the exit status, exactly one line on stderr naming the
key or the file, no traceback, and nothing written. The subprocesses run under an address-space limit
(``GUARD_BYTES``) so that a regression fails the test with a MemoryError instead of holding all memory
of the machine until the OOM killer comes (what ``task.batch_size=100000000`` did before the estimate).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

SMOKE = str(ROOT / "configs/train/smoke.yaml")
GUARD_BYTES = (
    4 * 1024**3
)  # virtual memory per CLI process (torch + Lightning + MLflow import: VmPeak 1.2 GiB)
HUGE = 100_000_000


def _guard() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (GUARD_BYTES, GUARD_BYTES))


def cli(
    *args: str, cwd: Path, timeout: float = 60, env_uri: str | None = None
) -> subprocess.CompletedProcess:
    """The CLI as a user runs it; ``timeout`` guards against a hang (timings are not asserted);
    ``env_uri``: $MLFLOW_TRACKING_URI (else unset)."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    if env_uri is not None:
        env["MLFLOW_TRACKING_URI"] = env_uri
    env.pop("PIPELINE_MEMORY_CHECK", None)
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        preexec_fn=_guard,
    )


def one_error_line(r: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and lines[0].startswith("error: "), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


# ------------------------------------------------------------------------------------ memory and bounds


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (f"task.batch_size={HUGE}", "task.batch_size"),
        (f"task.val_size={HUGE}", "task.val_size"),
        (f"diagnostics.probe_size={HUGE}", "diagnostics.probe_size"),
        ("task.seq_len=1000000000", "task.seq_len"),
        ("model.hidden_size=2000000", "model.hidden_size"),
    ],
)
def test_train_refuses_what_cannot_fit_before_allocating(tmp_path, override, key):
    line = one_error_line(
        cli("train", "--config", SMOKE, override, cwd=tmp_path),
        f"config key '{key}'",
        "needs about",
        "available",
    )
    assert "GiB" in line or "TiB" in line or "PiB" in line
    assert files(tmp_path) == []


def test_train_max_steps_beyond_int64_is_a_bad_key(tmp_path):
    r = cli("train", "--config", SMOKE, f"trainer.max_steps={10**40}", cwd=tmp_path)
    one_error_line(r, "config key 'trainer.max_steps'", "2^63 - 1")
    assert files(tmp_path) == []


def test_train_max_steps_whose_history_cannot_fit(tmp_path):
    r = cli("train", "--config", SMOKE, f"trainer.max_steps={2**62}", cwd=tmp_path)
    one_error_line(r, "config key 'trainer.max_steps'", "per-step history")
    assert files(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--config", SMOKE, "task.permute=true"], ("config key 'task.permute'", "digits")),
        (["--config", "digits", "task.seq_len=50"], ("config key 'task.seq_len'", "64 for digits")),
        (["--config", SMOKE, "task.name=digits"], ("config key 'task.seq_len'", "64 for digits")),
        (["--config", "digits", "task.val_size=5"], ("config key 'task.val_size'", "[10, 898]")),
        (["--config", "digits", "task.val_size=899"], ("config key 'task.val_size'", "[10, 898]")),
    ],
)
def test_digits_keys_are_checked_before_anything_is_written(tmp_path, args, needles):
    """task.permute belongs to digits alone; digits are 64 pixels long; the held-out split must leave
    one image per class and half the images to train on (README, "Configuration reference")."""
    one_error_line(cli("train", *args, cwd=tmp_path), *needles)
    assert files(tmp_path) == []


def test_estimate_is_small_for_the_smoke_config():
    from pipeline.config import load_config
    from pipeline.training import budget

    est = budget.estimate(load_config(SMOKE))
    assert budget.RUNTIME_BYTES <= est.peak() < 2 * 1024**3


# ------------------------------------------------------------------------------------------- sweeps

TINY = {
    "study": "t",
    "n_trials": 2,
    "workers": 1,
    "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
    "pruner": {"name": "none"},
    "base": {
        "seed": 0,
        "task": {"name": "adding", "seq_len": 12, "batch_size": 16, "val_size": 64},
        "model": {"cell": "tanh", "hidden_size": 8, "init": "gaussian"},
        "optim": {"name": "adam", "lr": 0.01},
        "trainer": {"max_steps": 10, "val_every": 5, "log_every": 5},
        "diagnostics": {"profile_every": 0, "probe_size": 8, "plots": False},
        "tracking": {"experiment": "bad-input"},
    },
    "space": {"model.init_scale": {"low": 0.5, "high": 2.0, "log": True}},
}


def sweep_file(d: Path, **changes) -> Path:
    data = yaml.safe_load(yaml.safe_dump(TINY))
    data.update(changes)
    p = d / "s.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["storage=mongodb://x/y"], "storage"),
        (["--storage", "mongodb://x/y"], "--storage"),
        (["timeout=-5"], "timeout"),
        ([f"space.task.batch_size={{low: 1, high: {HUGE}}}"], "space.task.batch_size"),
        ([f"base.task.val_size={HUGE}"], "base.task.val_size"),
        ([f"sampler.seed={2**32}"], "sampler.seed"),
        (["workers=2000"], "workers"),
        (["--workers", "2000"], "--workers"),  # the key's bound, which the flag skipped (a walkthrough)
        (["--workers", "0"], "--workers"),
    ],
)
def test_sweep_validates_everything_before_any_store(tmp_path, args, key):
    cfg = sweep_file(tmp_path)
    r = cli("sweep", "--config", str(cfg), *args, cwd=tmp_path)
    one_error_line(r, f"{key}: " if key.startswith("-") else f"config key '{key}'")
    assert files(tmp_path) == ["s.yaml"]  # no optuna/, no mongodb:/, no mlflow.db


def test_largest_trial_is_the_corner_of_the_space():
    from pipeline.sweep.config import largest_trial, load_sweep

    sw_path = ROOT / "configs/sweeps/default.yaml"
    sw = load_sweep(
        sw_path, ["space.task.batch_size={low: 8, high: 64}", "space.model.hidden_size={low: 8, high: 128}"]
    )
    cfg = largest_trial(sw)
    assert cfg.task.batch_size == 64 and cfg.model.hidden_size == 128
    cells = (
        next(p.choices for p in sw.space if p.key == "model.cell")
        if any(p.key == "model.cell" for p in sw.space)
        else [cfg.model.cell]
    )
    if "lstm" in cells:
        assert cfg.model.cell == "lstm"  # the most gates: the most activations


def _journal_record_cut(path: Path, keep_newline: bool = False) -> None:
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    cut = data[: start + (len(data) - start) // 2]
    path.write_bytes(cut + (b"\n" if keep_newline else b""))


def test_torn_last_journal_record_is_recovered_and_trials_count_right(tmp_path):
    from pipeline.sweep.study import counts

    cfg = sweep_file(tmp_path)
    first = cli("sweep", "--config", str(cfg), cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    journal = tmp_path / "optuna" / "t.journal"
    _journal_record_cut(journal)
    r = cli("sweep", "--config", str(cfg), "n_trials=3", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    warn = [ln for ln in r.stderr.splitlines() if str(journal.relative_to(tmp_path)) in ln]
    assert len(warn) == 1 and warn[0].startswith("warning: ") and "cut off" in warn[0]
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="t", storage=JournalStorage(JournalFileBackend(str(journal))))
    c = counts(study)
    assert c["done"] == 3 and c["running"] == 0, c
    assert (tmp_path / "optuna" / "t.journal.torn").is_file()


def test_repair_journal_drops_only_a_torn_last_record_and_keeps_every_torn_byte(tmp_path):
    """``repair_journal`` in-process: a cut-off last record (no newline) or a whole but unreadable last
    line is removed and its bytes appended to ``<journal>.torn`` (a second tear is kept beside the first);
    an unreadable record with anything after it, a torn tail included, is refused naming the record,
    and the file is left as it was (mutation review)."""
    import io

    from pipeline.schema import StoreError
    from pipeline.sweep.stores import repair_journal

    good = b'{"op_code":0,"worker_id":"w","study_name":"t","directions":[1]}\n'
    journal = tmp_path / "t.journal"
    torn = tmp_path / "t.journal.torn"
    journal.write_bytes(good + good + b'{"op_code":4,"wor')
    warn = io.StringIO()
    assert repair_journal(journal, warn) == len(b'{"op_code":4,"wor')
    assert journal.read_bytes() == good + good and torn.read_bytes() == b'{"op_code":4,"wor'
    assert "its last record was cut off (17 bytes" in warn.getvalue()
    journal.write_bytes(good + b'{"op_code":5,"w\n')  # whole line, unreadable: a torn write too
    assert repair_journal(journal, warn) == 16
    assert journal.read_bytes() == good and torn.read_bytes() == b'{"op_code":4,"wor{"op_code":5,"w\n'
    assert repair_journal(journal, warn) == 0 and journal.read_bytes() == good  # whole: nothing to do
    for after in (good, b'{"op_code":4'):  # a record, or a torn tail, after the unreadable one
        text = good + b"not json\n" + after
        journal.write_bytes(text)
        says = rf"record 2 of 3 \(byte {len(good)}\) is corrupt \(not JSON\) and records follow"
        with pytest.raises(StoreError, match=says):
            repair_journal(journal, warn)
        assert journal.read_bytes() == text


HOLD_AND_DIE = """
import os, signal
from pipeline.sweep.stores import open_storage
from pipeline.uris import study_storage
storage = open_storage(study_storage("t", None))
storage._backend._lock.acquire()  # Optuna's journal lock, as an append takes it
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("left_by", ["this-version", "an-earlier-version"])
def test_a_journal_lock_left_by_a_killed_process_is_broken_and_the_sweep_resumes(tmp_path, left_by):
    """Optuna's journal lock is a symlink ``<journal>.lock``; a process killed while holding it (kill -9
    mid-append) leaves it. This version's link targets the journal's absolute path, so Optuna breaks it
    after its 30 s grace period; an earlier version's relative target dangles, Optuna could never break
    it (a resume waited forever), and the sweep removes it with one warning line."""
    from pipeline.sweep.study import counts

    cfg = sweep_file(tmp_path)
    first = cli("sweep", "--config", str(cfg), cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    journal = tmp_path / "optuna" / "t.journal"
    lock = Path(f"{journal}.lock")
    if (
        left_by == "this-version"
    ):  # a process that opened the journal as the sweep does, killed holding the lock
        killed = subprocess.run(
            [sys.executable, "-c", HOLD_AND_DIE],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    else:
        os.symlink("optuna/t.journal", lock)  # an earlier version's link: a relative target
    assert lock.is_symlink()
    r = cli("sweep", "--config", str(cfg), "n_trials=3", cwd=tmp_path, timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    stale = [ln for ln in r.stderr.splitlines() if "stale lock" in ln]
    assert len(stale) == (left_by == "an-earlier-version"), stale
    assert not lock.is_symlink()
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="t", storage=JournalStorage(JournalFileBackend(str(journal))))
    c = counts(study)
    assert c["done"] == 3 and c["running"] == 0, c


def test_corrupt_journal_record_in_the_middle_is_one_line(tmp_path):
    cfg = sweep_file(tmp_path)
    journal = tmp_path / "optuna" / "t.journal"
    journal.parent.mkdir()
    good = '{"op_code":0,"worker_id":"w","study_name":"t","directions":[1]}\n'
    journal.write_text(good + '{"op_code":4,"worker_id":"w","stu\n' + good)
    before = files(tmp_path)
    r = cli("sweep", "--config", str(cfg), cwd=tmp_path)
    one_error_line(r, "optuna journal optuna/t.journal", "record 2 of 3", "move it aside")
    assert files(tmp_path) == before


# ----------------------------------------------------------------------------------- broken stores


@pytest.fixture(scope="module")
def valid_db(tmp_path_factory) -> Path:
    """A real MLflow sqlite store with one experiment (made once: MLflow's migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    d = tmp_path_factory.mktemp("db")
    MlflowClient(f"sqlite:///{d / 'mlflow.db'}").create_experiment("x")
    return d / "mlflow.db"


def _broken(kind: str, valid: Path, dst: Path) -> None:
    if kind == "garbage":
        dst.write_bytes(os.urandom(5000))
    else:
        data = valid.read_bytes()
        dst.write_bytes(data[: len(data) // 2])


VERBS = {
    "train": lambda d: ["train", "--config", SMOKE],
    "sweep": lambda d: ["sweep", "--config", str(sweep_file(d))],
    "report": lambda d: ["report"],
    "regress": lambda d: ["regress", "--suite", str(ROOT / "configs/regression/smoke.yaml")],
}


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
@pytest.mark.parametrize("verb", list(VERBS))
def test_corrupt_mlflow_db_is_one_line(tmp_path, valid_db, verb, kind):
    _broken(kind, valid_db, tmp_path / "mlflow.db")
    args = VERBS[verb](tmp_path)
    before = files(tmp_path)
    r = cli(*args, cwd=tmp_path)
    one_error_line(
        r, "mlflow store sqlite:///", "mlflow.db", "not a readable MLflow database", "move it aside"
    )
    assert files(tmp_path) == before


FLAGS = {
    "train": "tracking.uri",
    "sweep": "base.tracking.uri",
    "report": "--store",
    "regress": "defaults.tracking.uri",
}


@pytest.mark.parametrize("verb", list(VERBS))
def test_a_corrupt_store_is_named_by_what_gave_it(tmp_path, valid_db, verb):
    """The remedy names what points at the store: the verb's key or flag when the default store is broken,
    $MLFLOW_TRACKING_URI when the environment named it (each said "point tracking.uri / --store /
    defaults.tracking.uri elsewhere" to a user who had set neither: a new-user walkthrough)."""
    _broken("garbage", valid_db, tmp_path / "mlflow.db")
    _broken("garbage", valid_db, tmp_path / "g.db")
    args = VERBS[verb](tmp_path)
    before = files(tmp_path)
    line = one_error_line(cli(*args, cwd=tmp_path), "not a readable MLflow database")
    assert line.endswith(f"; move it aside or point {FLAGS[verb]} elsewhere"), line
    line = one_error_line(cli(*args, cwd=tmp_path, env_uri="sqlite:///g.db"), "g.db: not a readable")
    assert line.endswith("; move it aside or point $MLFLOW_TRACKING_URI elsewhere"), line
    assert files(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "env_uri", "key"),
    [
        (["train", "--config", SMOKE, "tracking.uri=foo://bar"], None, "config key 'tracking.uri'"),
        (["report"], "foo://bar", "$MLFLOW_TRACKING_URI"),
    ],
)
def test_a_tracking_uri_of_no_mlflow_store_is_one_line_naming_its_key(tmp_path, args, env_uri, key):
    """A scheme MLflow has no store for (nor a plugin): MLflow's model-registry paragraph, cut off, ending
    "check the server or point tracking.uri elsewhere" even for a suite's key (a new-user walkthrough)."""
    one_error_line(
        cli(*args, cwd=tmp_path, env_uri=env_uri),
        f"error: {key}: 'foo://bar': MLflow has no tracking store for the scheme 'foo'",
    )
    assert files(tmp_path) == []


def test_unreachable_tracking_server_is_one_line(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = cli("train", "--config", SMOKE, f"tracking.uri=http://127.0.0.1:{port}", cwd=tmp_path)
    one_error_line(r, f"mlflow store http://127.0.0.1:{port}", "unreachable")
    assert files(tmp_path) == []


def _experiment_lookup_fails(monkeypatch) -> None:
    """MLflow's client as the store's: it opens (a sqlite store's schema is made), then the experiment's
    lookup fails as a tracking server's API does when it stops answering after the probe."""
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    real = tracking.client

    class Failing:
        def __init__(self, uri=None):
            self.real = real(uri)

        def __getattr__(self, name):
            return getattr(self.real, name)

        def get_experiment_by_name(self, name):
            raise MlflowException("API request to endpoint /api/2.0/mlflow/experiments/get-by-name failed")

    monkeypatch.setattr(tracking, "client", Failing)


@pytest.mark.parametrize(
    ("uri", "env_uri", "flag", "named"),
    [
        ("http://127.0.0.1:9/", None, "defaults.tracking.uri", "defaults.tracking.uri"),
        (None, "http://127.0.0.1:9/", "base.tracking.uri", "$MLFLOW_TRACKING_URI"),
    ],
)
def test_a_store_that_fails_after_the_probe_names_the_key_that_gave_it(
    monkeypatch, uri, env_uri, flag, named
):
    """A tracking server that answers the probe and then fails (MLflow's error on the experiment's
    lookup) named ``tracking.uri`` even for a suite's or a sweep's key, or for $MLFLOW_TRACKING_URI."""
    from pipeline import tracking
    from pipeline.schema import StoreError

    if env_uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    _experiment_lookup_fails(monkeypatch)
    with pytest.raises(StoreError) as e:
        tracking.ensure_experiment(uri, "regression", flag)
    line = str(e.value)
    assert line.startswith("mlflow store http://127.0.0.1:9/: cannot be opened (API request"), line
    assert line.endswith(f"; check the server or point {named} elsewhere"), line


@pytest.mark.parametrize("env", [False, True])
def test_a_sweeps_store_that_fails_after_the_probe_names_the_key_that_gave_it(monkeypatch, tmp_path, env):
    """The sweep's path to the same error: it passed its resolved URI, never empty, so a store given by
    $MLFLOW_TRACKING_URI was named as base.tracking.uri (a review of the first fix)."""
    from pipeline.schema import StoreError
    from pipeline.sweep.parent import run_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIPELINE_SWEEP_FORK", "0")
    overrides = [] if env else ["base.tracking.uri=sqlite:///k.db"]
    if env:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///e.db")
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _experiment_lookup_fails(monkeypatch)
    with pytest.raises(StoreError) as e:
        run_sweep(str(sweep_file(tmp_path)), overrides)
    line = str(e.value)
    assert "cannot be opened (API request" in line, line
    named = "$MLFLOW_TRACKING_URI" if env else "base.tracking.uri"
    assert line.endswith(f"; check the server or point {named} elsewhere"), line


def test_a_database_url_that_cannot_be_read_is_one_line_without_its_password(tmp_path):
    r = cli("regress", "--suite", str(ROOT / "configs/regression/smoke.yaml"), cwd=tmp_path,
            env_uri="postgresql://u:p@ss:word@127.0.0.1/db")  # fmt: skip
    line = one_error_line(r, "mlflow store postgresql+psycopg2://u:***@127.0.0.1/db", "percent-encoded")
    assert "p@ss" not in line and "ss:word" not in line and "word@" not in line
    assert files(tmp_path) == []


@pytest.mark.parametrize("where", ["no-server", "no-database"])
def test_a_database_store_that_refuses_is_one_line_at_once(tmp_path, where):
    """MLflow retried a PostgreSQL store that is not there for about 100 s of warnings before failing;
    the probe answers in one line within its connect timeout. No server: a port nobody listens on; no
    database: a mistyped name on this machine's PostgreSQL (skipped without one)."""
    if where == "no-server":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        uri, needle = f"postgresql://postgres@127.0.0.1:{port}/x", "Connection refused"
    else:
        try:
            import psycopg2

            psycopg2.connect("postgresql://postgres@127.0.0.1:5432/test", connect_timeout=3).close()
        except Exception as e:
            from tests.conftest import skip_or_fail

            skip_or_fail("PIPELINE_REQUIRE_POSTGRES", f"no PostgreSQL at 127.0.0.1:5432: {e}")
        uri, needle = "postgresql://postgres@127.0.0.1:5432/no_such_db_for_this_test", "does not exist"
    r = cli(
        "regress",
        "--suite",
        str(ROOT / "configs/regression/smoke.yaml"),
        cwd=tmp_path,
        timeout=30,
        env_uri=uri,
    )
    one_error_line(r, "mlflow store postgresql+psycopg2://", "refused the connection", needle)
    assert files(tmp_path) == []


def test_sqlite_file_of_another_program_is_not_migrated(tmp_path):
    import sqlite3

    other = tmp_path / "mlflow.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE notes (x)")
    con.commit()
    con.close()
    data = other.read_bytes()
    one_error_line(cli("train", "--config", SMOKE, cwd=tmp_path), "not an MLflow store")
    assert other.read_bytes() == data and files(tmp_path) == ["mlflow.db"]


@pytest.mark.parametrize("key", ["tracking.uri", "tracking.experiment", "tracking.enabled", "tracking"])
def test_regress_refuses_a_tracking_override(tmp_path, key):
    """The parent run, the entries' runs and their read-back share the suite's one store: a --set that
    moved only the entries' runs recorded the parent in one store and failed every entry in the other."""
    value = {
        "tracking.uri": f"sqlite:///{tmp_path / 'other.db'}",
        "tracking.enabled": "false",
        "tracking": f'{{uri: "sqlite:///{tmp_path / "other.db"}"}}',  # the whole section as a mapping
    }.get(key, "x")
    r = cli(
        "regress",
        "--suite",
        str(ROOT / "configs/regression/smoke.yaml"),
        "--set",
        f"{key}={value}",
        cwd=tmp_path,
    )
    one_error_line(r, "--set: ", key, "defaults.tracking.uri")
    assert files(tmp_path) == []


def test_memory_check_escape_hatch_is_documented():
    from pipeline.training.budget import ENV_SWITCH

    assert f"`{ENV_SWITCH}=0`" in (ROOT / "README.md").read_text()


# ------------------------------------------------------------------------------- config files (fuzzing review)

NOT_UTF8 = b"task:\n  name: \xff\xfe\n"
DUPLICATE = b"task: {batch_size: 3}\nmodel: {cell: tanh}\ntask: {batch_size: 4}\n"
SWEEP_SMOKE = str(ROOT / "configs/sweeps/smoke.yaml")
SUITE_SMOKE = str(ROOT / "configs/regression/smoke.yaml")


def _config_file_cases(tmp_path: Path, content: bytes) -> list[tuple[list[str], str]]:
    """Every YAML the product reads as config, each written with ``content`` outside the working directory
    ``tmp_path / "cwd"``: (CLI arguments, the file the error must name)."""
    (tmp_path / "in").mkdir()
    bad = tmp_path / "in" / "bad.yaml"
    bad.write_bytes(content)
    sweep = tmp_path / "in" / "sweep.yaml"
    sweep.write_text("base: bad.yaml\nspace: {model.cell: {choices: [tanh, gru]}}\n")
    return [
        (["train", "--config", str(bad)], str(bad)),
        (["sweep", "--config", str(bad)], str(bad)),
        (["sweep", "--config", str(sweep)], str(bad)),  # the sweep file's base:
        (["regress", "--suite", str(bad)], str(bad)),
        (["regress", "--suite", SUITE_SMOKE, "--baseline", str(bad)], str(bad)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, case):
    """Non-UTF-8 bytes were a 23-line UnicodeDecodeError, exit 1."""
    args, named = _config_file_cases(tmp_path, NOT_UTF8)[case]
    (tmp_path / "cwd").mkdir()
    one_error_line(cli(*args, cwd=tmp_path / "cwd"), named, "not UTF-8", "byte 14")
    assert files(tmp_path / "cwd") == []


@pytest.mark.parametrize("case", range(5))
def test_a_key_given_twice_in_a_config_file_is_one_line(tmp_path, case):
    """PyYAML keeps the last of two equal keys silently: the run trained batch_size 4 and nobody saw 3 go."""
    args, named = _config_file_cases(tmp_path, DUPLICATE)[case]
    (tmp_path / "cwd").mkdir()
    one_error_line(cli(*args, cwd=tmp_path / "cwd"), named, "duplicate key 'task'", "line 3", "line 1")
    assert files(tmp_path / "cwd") == []


def test_a_key_given_twice_deeper_down_names_its_line(tmp_path):
    from pipeline.schema import ConfigError, read_yaml

    p = tmp_path / "c.yaml"
    p.write_text("task:\n  batch_size: 3\n  seq_len: 10\n  batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'batch_size' \(line 4; first given at line 2\)"):
        read_yaml(p)
    p.write_text("a: &x {b: 1}\nc:\n  <<: *x\n  b: 2\n")  # a merge key may be overridden: no duplicate
    assert read_yaml(p) == {"a": {"b": 1}, "c": {"b": 2}}
    # chained merges: a mapping merged by a later one is flattened first, in place; the keys its own merge
    # brought in are not its duplicates (refused as "duplicate key 'task'" when checked at construction)
    p.write_text(
        "common: &common {task: {name: adding}, model: {cell: tanh}}\n"
        "entries:\n  - patch: &long {<<: *common, task: {name: copy}}\n"
        "more: {<<: *long}\n"
    )
    assert read_yaml(p) == yaml.safe_load(p.read_text())


@pytest.mark.parametrize("verb", ["train", "sweep", "regress"])
def test_an_empty_config_path_is_named_as_empty(tmp_path, verb):
    """``--config ''`` was "config file . is a directory" (Path('') is '.')."""
    flag = "--suite" if verb == "regress" else "--config"
    one_error_line(cli(verb, flag, "", cwd=tmp_path), f"{flag}: empty path")
    assert files(tmp_path) == []


@pytest.mark.parametrize(
    ("length", "storage", "needles"),
    [
        (101, None, ("at most 100 bytes for a study kept in files", "got 101")),  # optuna/<study>.journal
        (101, "sqlite:///optuna.db", ("at most 100 bytes for a study kept in files", "got 101")),
        (513, None, ("at most 512 characters", "got 513")),  # whatever the store
    ],
)
def test_a_study_name_too_long_for_its_store_is_refused_before_any_store(tmp_path, length, storage, needles):
    """600 characters: OSError File name too long, after mlflow.db and optuna/ were written."""
    flags = ["--storage", storage] if storage else []
    r = cli(
        "sweep",
        "--config",
        SWEEP_SMOKE,
        *flags,
        "n_trials=1",
        "workers=1",
        "study=" + "s" * length,
        cwd=tmp_path,
    )
    one_error_line(r, "config key 'study'", *needles)
    assert files(tmp_path) == []


def test_a_study_on_a_database_server_keeps_optunas_bound_not_the_file_one():
    """A study on PostgreSQL names no file: the 100-byte bound of a journal locked out a longer study made
    there before it (stop 27's note). Optuna's column takes 512 characters."""
    from pipeline.schema import ConfigError
    from pipeline.sweep.config import STUDY_MAX, check_study_name

    long = "s" * (STUDY_MAX + 50)
    check_study_name(long, "postgresql+psycopg2://u@h/db")
    for url in ("optuna/x.journal", "journal://optuna/x.journal", "sqlite:///optuna.db"):
        with pytest.raises(ConfigError, match="at most 100 bytes"):
            check_study_name(long, url)
    check_study_name("s" * STUDY_MAX, "optuna/x.journal")


def test_the_longest_study_name_fits_every_file_it_names(tmp_path):
    """The budget lock holds the name twice: <study>.journal.<study>.sweeplock must fit NAME_MAX."""
    from pipeline.sweep.config import STUDY_MAX

    study = "s" * STUDY_MAX
    for name in (f"{study}.journal.lock.rename", f"{study}.journal.{study}.sweeplock"):
        (tmp_path / name).write_text("")


# Not tracking.run_name: SQLite, the default store, keeps longer names than the 250 of MLflow's column
# type, and a bound would have refused resuming or loading a run made before it (a review).
@pytest.mark.parametrize(("key", "length", "limit"), [("tracking.experiment", 501, 500)])
def test_names_beyond_mlflow_limits_are_refused_before_the_store(tmp_path, key, length, limit):
    """A 600-character experiment name was MLflow's traceback after mlflow.db was written."""
    r = cli("train", "--config", SMOKE, f"{key}={'x' * length}", cwd=tmp_path)
    one_error_line(r, f"config key '{key}'", f"at most {limit} characters", f"got {length}")
    assert files(tmp_path) == []


@pytest.mark.parametrize(
    ("base", "needles"),
    [
        ("/nonexistent.yaml", ("config file not found: /nonexistent.yaml",)),
        ("3", ("config file not found: 3",)),  # a path on the command line, whatever YAML makes of it
        ("adir", ("adir is a directory",)),
        ("list.yaml", ("list.yaml: top level must be a mapping",)),
        ("[1, 2]", ("must be a path to a training config or a mapping, got [1, 2]",)),
    ],
)
def test_a_bad_sweep_base_says_what_is_wrong(tmp_path, base, needles):
    """``base=/nonexistent.yaml`` said "must be a path to a training config or a mapping"."""
    (tmp_path / "adir").mkdir()
    (tmp_path / "list.yaml").write_text("- 1\n")
    r = cli("sweep", "--config", SWEEP_SMOKE, f"base={base}", cwd=tmp_path)
    one_error_line(r, "config key 'base'", *needles)
    assert files(tmp_path) == ["adir", "list.yaml"]


def test_a_base_file_on_the_command_line_replaces_the_sweeps_base():
    """``base=FILE`` replaces the sweep file's inline base, as ``base: FILE`` in the file would: merged into
    it, the run kept the inline base's init, clip, ... that the file does not set."""
    from pipeline.schema import read_yaml
    from pipeline.sweep.config import load_sweep

    gru = ROOT / "configs/train/adding_gru.yaml"
    assert load_sweep(str(ROOT / "configs/sweeps/default.yaml"), [f"base={gru}"]).base == read_yaml(gru)


def test_a_sweep_file_whose_base_is_a_directory_says_so(tmp_path):
    """It said "config file not found"."""
    (tmp_path / "adir").mkdir()
    (tmp_path / "s.yaml").write_text("base: adir\nspace: {model.cell: {choices: [tanh, gru]}}\n")
    one_error_line(
        cli("sweep", "--config", "s.yaml", cwd=tmp_path), "config key 'base'", "adir is a directory"
    )
    assert files(tmp_path) == ["adir", "s.yaml"]


@pytest.mark.parametrize(
    ("out", "needles"),
    [
        ("outf", ("outf is not a folder",)),
        ("outf/sub", ("outf/sub cannot be created", "outf is not a folder")),
    ],
)
def test_report_out_that_cannot_be_a_folder_is_one_line_before_the_store_is_read(tmp_path, out, needles):
    """A regular file in the way was a FileExistsError traceback after the store was read."""
    (tmp_path / "outf").write_text("x\n")
    r = cli("report", "--experiment", "smoke", "--out", out, cwd=tmp_path)
    one_error_line(r, "error: --out: ", *needles)
    assert files(tmp_path) == ["outf"] and (tmp_path / "outf").read_text() == "x\n"


# ------------------------------------------------------------------------------------------------- ui


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--port", "70000"], ("error: --port: ", "1..65535", "70000")),
        (["--port", "0"], ("error: --port: ", "1..65535")),
        (["--host", "999.1.1.1", "--port", "5871"], ("error: --host: ", "999.1.1.1")),
        (["--host", "192.0.2.1", "--port", "5871"], ("error: --host: ", "192.0.2.1")),  # TEST-NET-1: not ours
        (["--workers", "0"], ("error: --workers: ", ">= 1")),
        # mlflow ui cannot serve a tracking server's store: its traceback, exit 1 (a new-user walkthrough);
        # with nothing there, it said "open" that address all the same (another)
        (
            ["--store", "http://127.0.0.1:5071"],
            (
                "error: --store: ",
                "nothing answers at http://127.0.0.1:5071 (",
                "start the MLflow tracking server",
            ),
        ),
    ],
)
def test_ui_bad_port_or_host_is_one_line_before_the_server(tmp_path, args, needles):
    """--port 70000 was an 82-line traceback and exit 0; a bad host was MLflow's log line and exit 0."""
    one_error_line(cli("ui", *args, cwd=tmp_path, timeout=30), *needles)
    assert files(tmp_path) == []


def test_ui_of_a_tracking_server_that_answers_says_to_open_it(tmp_path):
    """Something answers at the ``--store`` address (any HTTP status, a password in the URL kept out of
    the request and the message): it is the server, whose own UI to open."""
    import http.server
    import threading

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # 501s
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = srv.server_address[1]
        r = cli("ui", "--store", f"http://u:pw@127.0.0.1:{port}", cwd=tmp_path, timeout=30)
    finally:
        srv.shutdown()
    one_error_line(r, "error: --store: ", f"serves its own UI: open http://u:***@127.0.0.1:{port}")
    assert files(tmp_path) == []


def test_ui_checks_every_address_its_host_resolves_to(monkeypatch):
    """The server listens on every address ``--host`` resolves to (``localhost``: ::1 and 127.0.0.1); the
    check bound the first alone, so a busy port behind the second passed it and the server failed after
    (exit 0 with the error in its log). Here the name resolves to a free address, then the busy one."""
    import socket

    from pipeline.cli.ui import check_bind
    from pipeline.schema import ConfigError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        real = socket.getaddrinfo

        def two(host, p, *a, **kw):
            return [*real("127.0.0.2", p, *a, **kw), *real("127.0.0.1", p, *a, **kw)]

        monkeypatch.setattr(socket, "getaddrinfo", two)
        with pytest.raises(ConfigError, match=f"{port} is in use"):
            check_bind("localhost", port)


def test_ui_on_a_busy_port_is_one_line_naming_the_port(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli("ui", "--port", str(port), cwd=tmp_path, timeout=30)
    one_error_line(r, "error: --port: ", f"{port} is in use")
    assert files(tmp_path) == []


# ------------------------------------------------------- stores that cannot be written or do not exist


def _alien(valid: Path, dst: Path, table: str) -> None:
    """A copy of a real store in WAL mode (as the pipeline leaves one), with one of MLflow's tables dropped."""
    import sqlite3

    dst.write_bytes(valid.read_bytes())
    con = sqlite3.connect(dst)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(f"DROP TABLE {table}")
    con.commit()
    con.close()


@pytest.mark.parametrize("table", ["metrics", "latest_metrics", "params", "tags"])
def test_an_mlflow_db_with_an_alien_schema_is_one_line(tmp_path, valid_db, table):
    """Fuzzing review: `sqlite3 mlflow.db 'drop table metrics'` then train was an 807-line SQLAlchemy
    traceback and wrote mlruns/; reading the WAL store must not leave its -wal/-shm files either."""
    _alien(valid_db, tmp_path / "mlflow.db", table)
    before = files(tmp_path)
    r = cli("train", "--config", SMOKE, "trainer.max_steps=2", cwd=tmp_path)
    one_error_line(r, "mlflow store sqlite:///mlflow.db", "mlflow.db", f"no table {table}", "tracking.uri")
    assert files(tmp_path) == before == ["mlflow.db"]


def cli_read_only(*args: str, cwd: Path, read_only: Path) -> subprocess.CompletedProcess:
    """The CLI with ``read_only`` (and what is under it) answering os.access(W_OK) False, as a read-only
    mount does even for root: portable, no mount needed."""
    patch = (
        "import os, runpy, sys; real = os.access; ro = sys.argv.pop(1)\n"
        "def access(p, mode, *a, **k):\n"
        "    if mode & os.W_OK and os.path.abspath(p).startswith(ro): return False\n"
        "    return real(p, mode, *a, **k)\n"
        "os.access = access; sys.argv[0] = 'pipeline'; runpy.run_module('pipeline', run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PIPELINE_MEMORY_CHECK")}
    return subprocess.run(
        [sys.executable, "-c", patch, str(read_only), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        preexec_fn=_guard,
    )


@pytest.mark.parametrize("existing", [False, True])
def test_a_store_in_a_read_only_directory_is_one_line_at_once(tmp_path, valid_db, existing):
    """MLflow retried a store it could not write for about 60 s, then a traceback (fuzzing review)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if existing:
        (ro / "mlflow.db").write_bytes(valid_db.read_bytes())
    work = tmp_path / "work"
    work.mkdir()
    r = cli_read_only(
        "train", "--config", SMOKE, "trainer.max_steps=2", f"tracking.uri=sqlite:///{ro}/mlflow.db",
        cwd=work, read_only=ro,
    )  # fmt: skip
    one_error_line(r, f"mlflow store sqlite:///{ro}/mlflow.db", "not writable", "tracking.uri")
    assert files(work) == [] and files(ro) == (["mlflow.db"] if existing else [])


def test_the_default_store_in_a_read_only_working_directory_says_where_it_is(tmp_path):
    r = cli_read_only("train", "--config", SMOKE, "trainer.max_steps=2", cwd=tmp_path, read_only=tmp_path)
    one_error_line(
        r,
        "the default store",
        "mlflow.db in the working directory",
        "not writable",
        "tracking.uri=sqlite:///",
    )
    assert files(tmp_path) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc")
def test_a_store_in_a_directory_that_cannot_hold_a_file_is_one_line(tmp_path):
    """/proc: os.access says root may write it; creating a file there fails."""
    r = cli("train", "--config", SMOKE, "tracking.uri=sqlite:////proc/no-such.db", cwd=tmp_path, timeout=90)
    one_error_line(r, "mlflow store sqlite:////proc/no-such.db", "/proc", "tracking.uri")
    assert files(tmp_path) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc")
@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (
            ["sweep", "--config", "smoke", "--storage", "/proc/s.journal"],
            ["optuna storage /proc/s.journal", "--storage"],
        ),
        (["report", "--out", "/proc/nope"], ["--out: /proc/nope cannot be created"]),
        (["report", "--out", "/proc"], ["--out: /proc cannot be written"]),
        (
            ["regress", "--suite", "smoke", "--update-baseline", "--baseline", "/proc/b.yaml"],
            ["--baseline", "/proc/b.yaml"],
        ),
    ],
    ids=["sweep-journal", "report-new-folder", "report-folder", "regress-baseline"],
)
def test_a_folder_that_takes_no_new_file_is_one_line_before_anything_is_written(tmp_path, args, needles):
    """/proc, where ``os.access`` says root may write: the journal, ``--out`` and ``--update-baseline``
    checks asked only that, so the sweep failed with a traceback after creating the MLflow store, and
    the report after reading the store (a new-user review)."""
    r = cli(*args, cwd=tmp_path, timeout=90)
    # root: os.access says yes and the probe file is refused; another user: os.access says no
    one_error_line(
        r, *needles, "/proc cannot hold a new file" if os.geteuid() == 0 else "/proc is not writable"
    )
    assert files(tmp_path) == []


LONG = "x" * 300  # over the 255-byte name limit of ext4, xfs, btrfs and tmpfs


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["train", "--config", SMOKE, f"tracking.uri=sqlite:///{LONG}.db"], "tracking.uri"),
        (["sweep", "--config", "smoke", "--storage", f"{LONG}.journal"], "--storage"),
        (["sweep", "--config", "smoke", "--storage", f"sqlite:///{LONG}.db"], "--storage"),
        (["sweep", "--config", "smoke", "--storage", f"{LONG}/s.journal"], "--storage"),
        (["report", "--out", f"{LONG}/sub"], "--out"),
        (["regress", "--suite", "smoke", "--update-baseline", "--baseline", f"{LONG}.yaml"], "--baseline"),
        (["regress", "--suite", "smoke", "--baseline", f"{LONG}.yaml"], "--baseline"),
    ],
    ids=[
        "train-store",
        "sweep-journal",
        "sweep-sqlite",
        "sweep-journal-folder",
        "report-out",
        "baseline-new",
        "baseline",
    ],
)
def test_a_name_longer_than_the_file_system_allows_is_one_line(tmp_path, args, flag):
    """``Path.exists`` raises ENAMETOOLONG on such a path: each was an OSError traceback (a new-user review)."""
    r = cli(*args, cwd=tmp_path, timeout=90)
    one_error_line(r, flag, "bytes, over the 255 its file system allows")
    assert files(tmp_path) == []


def test_an_artifact_root_that_is_a_file_is_one_line(tmp_path):
    """`echo x > mlruns` then train: NotADirectoryError after the run record was written (fuzzing review)."""
    (tmp_path / "mlruns").write_text("x\n")
    r = cli("train", "--config", SMOKE, "trainer.max_steps=2", cwd=tmp_path)
    one_error_line(
        r, "mlflow store sqlite:///mlflow.db", f"artifact root {tmp_path / 'mlruns'}", "tracking.uri"
    )
    assert files(tmp_path) == ["mlruns"]


FILE_STORES = ["file:./store", "file:./newdir", "./store", "mlflow.db"]
EMPTY_DATABASES = ["sqlite://", "sqlite:///", "sqlite:///:memory:", "postgresql://", "postgresql://h:5432/"]


@pytest.mark.parametrize("uri", FILE_STORES + EMPTY_DATABASES)
def test_a_file_store_or_a_url_naming_no_database_is_refused_by_train(tmp_path, uri):
    """file: stores printed MLflow's deprecation paragraph cut mid-word, with a wrong remedy; sqlite://
    ran into an in-memory database that vanished (orphan ./mlruns); postgresql:// connected through
    libpq's defaults to the user's own database and created 65 tables there (fuzzing review)."""
    (tmp_path / "store").mkdir()
    before = files(tmp_path)
    r = cli("train", "--config", SMOKE, "trainer.max_steps=2", f"tracking.uri='{uri}'", cwd=tmp_path)
    line = one_error_line(r, "config key 'tracking.uri'")
    assert ("not supported" in line and "sqlite:///path/mlflow.db" in line) or "names no database" in line
    assert files(tmp_path) == before


@pytest.mark.parametrize("verb", ["ui", "report"])
@pytest.mark.parametrize("uri", ["file:./x", "sqlite://", "postgresql://"])
def test_a_file_store_or_a_url_naming_no_database_is_refused_as_store(tmp_path, verb, uri):
    r = cli(verb, "--store", uri, cwd=tmp_path)
    line = one_error_line(r, "--store:")
    assert "not supported" in line or "names no database" in line
    assert files(tmp_path) == []


def test_store_error_shortens_a_long_problem_at_a_word_boundary():
    """MLflow's file-store paragraph was cut at 300 characters mid-word ("...use a database back")."""
    from pipeline.store_checks import PROBLEM_CHARS, store_error

    words = " ".join(f"word{i:03d}" for i in range(200))
    msg = str(store_error("sqlite:///x.db", f"cannot be opened ({words})", "tracking.uri"))
    problem = msg.split(": ", 1)[1].rsplit("; ", 1)[0]
    assert len(problem) <= PROBLEM_CHARS and problem.endswith("...")
    assert problem[:-3].split()[-1] in words.split(), problem[-20:]
    assert msg.endswith("; move it aside or point tracking.uri elsewhere")


def test_a_long_name_makes_a_bounded_distinct_file_name():
    """A 300-character study (on a database server) or a 500-character experiment named a folder
    (optuna/logs/<study>, reports/<name>) past NAME_MAX: "File name too long" after the run."""
    from pipeline.report.data import safe_name
    from pipeline.uris import FILE_NAME_MAX, file_name

    assert file_name("default") == "default" and file_name("s" * FILE_NAME_MAX) == "s" * FILE_NAME_MAX
    a, b = file_name("s" * 300 + "a"), file_name("s" * 300 + "b")
    assert a != b and len(a.encode()) == len(b.encode()) == FILE_NAME_MAX and a.startswith("s" * 80)
    wide = file_name("é" * 200)  # 400 bytes: cut at a character, never inside one
    assert (
        len(wide.encode()) <= FILE_NAME_MAX and wide.encode().decode() == wide and wide.startswith("é" * 40)
    )
    assert len(safe_name("x y" * 200).encode()) == FILE_NAME_MAX


def test_sqlite_header_and_log_rules_at_their_edges(tmp_path):
    """The read-only checks against SQLite's file format (fileformat.html 1.3 and 4.1), on files made
    byte by byte: an empty file is a new store; a page size field of 1 means 65536; the header's page
    count is believed only while its change counter equals its version-valid-for number; a log excuses
    a short file from one whole frame on (its header, a frame header and one page); WAL mode is byte
    18 = 2; a problem exactly PROBLEM_CHARS long is shown whole."""
    from pipeline.store_checks import (
        PROBLEM_CHARS,
        SQLITE_MAGIC,
        _wal_mode,
        probe_store,
        shorten,
        sqlite_problem,
    )

    empty = tmp_path / "empty.db"
    empty.touch()
    assert sqlite_problem(empty) is None
    assert probe_store(f"sqlite:///{empty}") == f"sqlite:///{empty}"

    def header(page: int, pages: int, counter: int, valid_for: int, wal: bool = False) -> bytes:
        h = bytearray(SQLITE_MAGIC + bytes(84))
        h[16:18] = page.to_bytes(2, "big")
        h[18] = h[19] = 2 if wal else 1
        h[24:28], h[28:32], h[92:96] = (n.to_bytes(4, "big") for n in (counter, pages, valid_for))
        return bytes(h)

    db = tmp_path / "mlflow.db"
    db.write_bytes(header(1, 1, 7, 7))
    assert (
        sqlite_problem(db)
        == "not a readable database (truncated: its header says 65536 bytes, the file has 100)"
    )
    db.write_bytes(header(1, 1, 7, 8))  # an old writer's count: not to be believed
    assert sqlite_problem(db) is None
    db.write_bytes(header(512, 1, 7, 7))
    assert (
        sqlite_problem(db)
        == "not a readable database (truncated: its header says 512 bytes, the file has 100)"
    )
    assert not _wal_mode(db)
    db.write_bytes(header(512, 1, 7, 7, wal=True))
    assert _wal_mode(db)
    frame = 32 + 24 + 512
    log = (0x377F0682).to_bytes(4, "big") + bytes(4) + (512).to_bytes(4, "big") + bytes(20)
    (tmp_path / "mlflow.db-wal").write_bytes(log + bytes(frame - 32 - 1))
    assert "truncated" in (sqlite_problem(db) or "")  # one byte short of a frame
    (tmp_path / "mlflow.db-wal").write_bytes(log + bytes(frame - 32))
    assert sqlite_problem(db) is None

    whole = "x" * PROBLEM_CHARS
    assert shorten(whole) == whole and shorten(whole + "y") == "x" * (PROBLEM_CHARS - 3) + "..."


def test_store_urls_as_the_stores_section_says(tmp_path, monkeypatch):
    """README, "Stores": the driver added to a bare PostgreSQL URL, a password never shown, the file
    behind a sqlite URL (an in-memory one names none), relative sqlite files made absolute for workers,
    a journal URL that must name a file, and Databricks as a tracking URI."""
    from pathlib import Path

    from pipeline.schema import ConfigError
    from pipeline.uris import (
        absolute_uri,
        check_storage_url,
        check_tracking_uri,
        display_url,
        names_no_database,
        resolve_uri,
        sqlite_file,
        study_storage,
        with_pg_driver,
    )

    for bare in ("postgresql://u@h/db", "postgres://u@h/db"):
        assert with_pg_driver(bare) == "postgresql+psycopg2://u@h/db"
    assert study_storage("t", "postgres://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert study_storage("t", None) == str(Path("optuna") / "t.journal")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None) == "sqlite:///mlflow.db"
    assert display_url("postgresql://u:s3cret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert display_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert sqlite_file("sqlite:///:memory:") is None and sqlite_file("sqlite:///") is None
    assert sqlite_file("sqlite:///a/b.db?mode=ro") == Path("a/b.db")
    assert names_no_database("postgresql://h:5432//") and not names_no_database("postgresql://h/db")
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///x.db") == f"sqlite:///{tmp_path.resolve() / 'x.db'}"
    assert absolute_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    check_tracking_uri("tracking.uri", "databricks")
    check_tracking_uri("tracking.uri", "databricks://profile")
    with pytest.raises(ConfigError, match="names no journal file"):
        check_storage_url("storage", "journal://")
    check_storage_url("storage", "journal://optuna/x.journal")


def test_an_existing_store_file_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """A store file this process may not write (``os.access`` says so; as root only a read-only mount
    does, so it is simulated here) is named before MLflow retries it for a minute."""
    import pipeline.store_checks as sc
    from pipeline.schema import ConfigError

    f = tmp_path / "mlflow.db"
    f.touch()
    real = os.access
    monkeypatch.setattr(
        sc.os, "access", lambda p, mode: not (Path(p) == f and mode & os.W_OK) and real(p, mode)
    )
    assert sc.unwritable(f) == f"{f} is not writable"
    with pytest.raises(ConfigError) as e:
        sc.probe_store(f"sqlite:///{f}")
    assert str(e.value) == (
        f"mlflow store sqlite:///{f}: {f} is not writable; make it writable or point tracking.uri elsewhere"
    )
    assert sc.probe_store(f"sqlite:///{f}", write=False) == f"sqlite:///{f}"  # a reader may read it


def test_a_refused_wal_store_is_left_as_it_was_found(tmp_path):
    """Reading a WAL-mode file creates its -wal and -shm beside it: a store refused (here a SQLite file of
    another program) must not be left with them."""
    import sqlite3

    from pipeline.schema import ConfigError
    from pipeline.store_checks import check_sqlite_store

    f = tmp_path / "other.db"
    con = sqlite3.connect(str(f))
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE notes (x)")
    con.commit()
    con.close()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert before == ["other.db"]
    with pytest.raises(ConfigError, match="not an MLflow store"):
        check_sqlite_store(f"sqlite:///{f}", f)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# A store whose schema a newer MLflow wrote (one machine upgraded, another not, both on one store): MLflow
# says "out-of-date database schema ... run 'mlflow db upgrade'", which this MLflow cannot do. The revision
# is one no MLflow has, so the test holds under every MLflow the package admits (README, "Supported versions").
NEWER_REVISION = "ffffffffffff"


def _set_revision(con, revision: str) -> None:
    con.execute(f"UPDATE alembic_version SET version_num = '{revision}'")
    con.commit()


@pytest.mark.parametrize("verb", list(VERBS))
def test_a_store_written_by_a_newer_mlflow_is_one_line(tmp_path, valid_db, verb):
    import sqlite3

    import mlflow

    db = tmp_path / "mlflow.db"
    db.write_bytes(valid_db.read_bytes())
    with contextlib.closing(sqlite3.connect(db)) as con:
        _set_revision(con, NEWER_REVISION)
    args = VERBS[verb](tmp_path)
    data, before = db.read_bytes(), files(tmp_path)
    r = cli(*args, cwd=tmp_path)
    one_error_line(
        r,
        "mlflow store sqlite:///",
        f"its schema (revision {NEWER_REVISION}) was written by a newer MLflow than this one ({mlflow.__version__})",
        "pip install -U mlflow",
    )
    assert db.read_bytes() == data
    assert files(tmp_path) == before


def test_a_store_holding_optunas_schema_is_named_as_another_programs(tmp_path, valid_db):
    """tracking.uri pointed at the database the sweep's Optuna storage made: its ``alembic_version`` is
    Optuna's, not a revision some newer MLflow has (MLflow's are hex)."""
    import sqlite3

    db = tmp_path / "mlflow.db"
    db.write_bytes(valid_db.read_bytes())
    with contextlib.closing(sqlite3.connect(db)) as con:
        _set_revision(con, "v3.2.0.a")
    data = db.read_bytes()
    line = one_error_line(
        cli("train", "--config", SMOKE, cwd=tmp_path),
        "its alembic_version 'v3.2.0.a' is no MLflow schema revision",
        "give MLflow a database of its own",
    )
    assert "newer MLflow" not in line
    assert db.read_bytes() == data and files(tmp_path) == ["mlflow.db"]


def _another_programs_alembic(db) -> None:
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as con, con:
        con.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        con.execute("INSERT INTO alembic_version VALUES ('1a2b3c4d5e6f')")


@pytest.mark.parametrize(
    ("made_by", "problem"),
    [
        ("mlflow", "it is an MLflow tracking store (tables experiments, runs)"),
        ("other", "its table alembic_version is another program's (no Optuna table version_info)"),
    ],
)
def test_an_optuna_storage_holding_another_alembic_schema_is_one_line(tmp_path, valid_db, made_by, problem):
    """``--storage`` naming an MLflow store (here another than the sweep's own; that one: the next test):
    both programs keep their schema's revision in ``alembic_version``, so Optuna read MLflow's as its own,
    created twelve tables in the MLflow store and failed with a traceback telling to upgrade Optuna (a
    new-user walkthrough). The same for any other program whose schema Alembic keeps."""
    db = tmp_path / "other.db"
    if made_by == "mlflow":
        db.write_bytes(valid_db.read_bytes())
    else:
        _another_programs_alembic(db)
    data = db.read_bytes()
    one_error_line(
        cli("sweep", "--config", "smoke", "--storage", "sqlite:///other.db", "n_trials=2", cwd=tmp_path),
        "optuna storage sqlite:///other.db",
        problem,
        "pass another --storage",
    )
    assert db.read_bytes() == data and files(tmp_path) == ["other.db"]


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("storage", ["sqlite:///mlflow.db", "mlflow.db", "sqlite:///./sub/../mlflow.db"])
def test_an_optuna_storage_naming_the_mlflow_stores_file_is_one_line(tmp_path, storage, existing, valid_db):
    """The sweep's own MLflow store as ``--storage``, existing or in a new folder (where the second
    program to open the file failed with the same traceback, after the first had written it). A journal
    path names the file too."""
    (tmp_path / "sub").mkdir()
    if existing:
        (tmp_path / "mlflow.db").write_bytes(valid_db.read_bytes())
    before = {p: p.read_bytes() for p in tmp_path.glob("*.db")}
    one_error_line(
        cli("sweep", "--config", "smoke", "--storage", storage, "n_trials=2", cwd=tmp_path),
        f"optuna storage {storage}: it is the MLflow store's file (base.tracking.uri)",
        "pass another --storage",
    )
    assert files(tmp_path) == ["mlflow.db", "sub"][not existing :]
    assert {p: p.read_bytes() for p in tmp_path.glob("*.db")} == before


def test_the_same_database_is_recognised_across_spellings():
    """Two URLs of one server database, whatever the driver or the default port: one database."""
    from pipeline.sweep.stores import _database_of

    pg = _database_of("postgresql+psycopg2://u@db.example:5432/runs", journal=True)
    assert pg == _database_of("postgres://v@db.example/runs", journal=False)
    assert pg != _database_of("postgresql://u@db.example/optuna", journal=False)
    assert pg != _database_of("postgresql://u@db.example:5433/runs", journal=False)
    assert _database_of("mysql+pymysql://u@h/x", journal=True) == _database_of(
        "mysql://h:3306/x", journal=False
    )
    assert _database_of("http://127.0.0.1:5000", journal=False) is None
    assert _database_of("optuna/s.journal", journal=True)[0] == "file"
    assert _database_of("optuna/s.journal", journal=False) is None  # not a file MLflow would use


def test_a_store_whose_revision_this_mlflow_has_opens():
    """The other side of the check: every revision of the installed MLflow's migrations reads as known,
    and a made-up one as newer."""
    from pathlib import Path

    import mlflow

    from pipeline.store_checks import schema_problem

    versions = sorted((Path(mlflow.__file__).parent / "store" / "db_migrations" / "versions").glob("*_*.py"))
    assert len(versions) > 10
    assert all(schema_problem(p.name.split("_")[0]) is None for p in versions)
    assert schema_problem(NEWER_REVISION) and schema_problem(None) is None


def test_a_database_store_written_by_a_newer_mlflow_is_one_line(tmp_path):
    """The same on PostgreSQL: the probe reads ``alembic_version`` over the connection it opens anyway."""
    import sqlalchemy

    from tests.conftest import PG_URL as admin
    from tests.conftest import skip_or_fail

    # A database of this process's own, as test_sweep_postgres's: two test runs may share the server.
    name = f"pipeline_newer_mlflow_{os.getpid()}"
    try:
        engine = sqlalchemy.create_engine(
            admin, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
        )
        with engine.connect() as c:
            c.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
            c.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except Exception as e:
        skip_or_fail("PIPELINE_REQUIRE_POSTGRES", f"no PostgreSQL at {admin}: {e}")
    uri = f"{admin.rsplit('/', 1)[0]}/{name}"
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).create_experiment("x")
        store = sqlalchemy.create_engine(uri)
        with store.connect() as c:
            c.execute(sqlalchemy.text(f"UPDATE alembic_version SET version_num = '{NEWER_REVISION}'"))
            c.commit()
        store.dispose()
        r = cli("regress", "--suite", str(ROOT / "configs/regression/smoke.yaml"), cwd=tmp_path, env_uri=uri)
        one_error_line(
            r, "mlflow store postgresql+psycopg2://", "written by a newer MLflow", "pip install -U mlflow"
        )
        assert files(tmp_path) == []
    finally:
        with engine.connect() as c:
            c.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()
