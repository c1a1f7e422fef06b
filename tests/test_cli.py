"""The CLI as a user runs it: fast help, one-line errors with exit 2 and nothing written, a real run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from mlflow.tracking import MlflowClient


def cli(*args, cwd, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_help_imports_no_heavy_library():
    code = (
        "import sys, pipeline.cli as c; c.build_parser();"
        "print(','.join(m for m in ('torch','pytorch_lightning','mlflow','optuna','pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == ""
    # The heavy-import check above is what keeps --help fast; how fast is a benchmark, not a test.
    r = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "train" in r.stdout and "sweep" in r.stdout


def test_a_python_without_the_packages_is_one_line_naming_the_venv(tmp_path, monkeypatch, capsys):
    """A verb run with the system's python3 instead of .venv's (the README's ``python -m pipeline``, the
    venv not activated): "No module named 'mlflow'" in a traceback, after ``--help`` had answered (a
    new-user walkthrough). Now one line naming what is missing and the interpreter to use, exit 2,
    nothing written; ``--help`` still answers."""
    import importlib.util

    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n in ("mlflow", "optuna") else real(n, *a)
    )
    assert main(["train", "--config", "smoke"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: this Python ({sys.executable}) lacks mlflow, optuna, ") and "\n" not in err
    assert ".venv/bin/python -m pipeline" in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),
        RuntimeError("(sqlite3.OperationalError) database or disk is full"),
        "chained",
    ],
)
def test_a_full_disk_is_one_line_not_a_traceback(monkeypatch, capsys, error):
    """A full disk (ENOSPC, or SQLite's "database or disk is full", anywhere in the error's chain) is one
    line and exit 1; the runs were closed FAILED on the way out (a chaos walkthrough on a 1.5 MB tmpfs got
    a 170-line traceback). Any other error still raises."""
    import sqlite3

    from pipeline.cli import main
    from pipeline.cli import train as verb

    def fail(args):
        if error == "chained":
            try:
                raise sqlite3.OperationalError("database or disk is full")
            except sqlite3.OperationalError as e:
                raise RuntimeError("MlflowException: could not log the batch") from e
        raise error

    monkeypatch.setattr(verb, "command", fail)
    assert main(["train"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no space left on the device ("), err
    monkeypatch.setattr(verb, "command", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["train"])


@pytest.mark.parametrize(
    ("verb", "flags", "code"),
    [("train", [], 1), ("sweep", ["--config", "smoke"], 1), ("regress", ["--suite", "smoke"], 2)],
)
def test_a_store_locked_past_mlflows_wait_is_one_line_not_a_traceback(monkeypatch, capsys, verb, flags, code):
    """SQLite's "database is locked" in the error's chain (another process held the store past MLflow's
    20 s wait; a review held it with BEGIN EXCLUSIVE for 40 s and got about 200 lines) is one line;
    exit 2 for regress, whose 1 says regression (README, "Regression suite"), else 1."""
    import importlib
    import sqlite3

    from pipeline.cli import main

    def fail(args):
        try:
            raise sqlite3.OperationalError("database is locked")
        except sqlite3.OperationalError as e:
            raise RuntimeError("(sqlite3.OperationalError) database is locked [SQL: INSERT INTO runs]") from e

    monkeypatch.setattr(importlib.import_module(f"pipeline.cli.{verb}"), "command", fail)
    assert main([verb, *flags]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: a store is locked by another process ("), err


LOCKED_TRAIN = """
import sys
import sqlalchemy.sql
text = sqlalchemy.sql.text  # MLflow waits 20 s for a locked SQLite store (PRAGMA busy_timeout); here 0.3 s
sqlalchemy.sql.text = lambda q, *a: text(q.replace("busy_timeout = 20000", "busy_timeout = 300"), *a)
from pipeline.cli import main
sys.exit(main(["train", "--config", "smoke", "tracking.uri=sqlite:///" + sys.argv[1], "trainer.max_steps=2"]))
"""


def test_a_store_really_locked_is_one_line_with_sqlites_own_words(tmp_path):
    """The real thing, not a raised chain: another connection holds the store (BEGIN EXCLUSIVE) past
    MLflow's wait. MLflow logs the error with its traceback (about 90 lines) before it raises, and
    SQLAlchemy's message starts with an autoflush note; the line says SQLite's words, and nothing else
    is printed (seen with a 45 s lock on the real 20 s wait, README "Faults and resuming")."""
    import sqlite3

    db = tmp_path / "mlflow.db"
    script = tmp_path / "locked_train.py"
    script.write_text(LOCKED_TRAIN)
    first = subprocess.run([sys.executable, str(script), str(db)], cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]  # the store exists, with its experiment
    hold = sqlite3.connect(db, isolation_level=None)
    hold.execute("BEGIN EXCLUSIVE")
    try:
        r = subprocess.run([sys.executable, str(script), str(db)], cwd=ROOT, capture_output=True, text=True)
    finally:
        hold.execute("ROLLBACK")
        hold.close()
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.startswith("error: a store is locked by another process (database is locked: "), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr[-3000:]


@pytest.mark.parametrize(
    ("verb", "flag", "kind"), [("sweep", "--config", "sweeps"), ("regress", "--suite", "regression")]
)
def test_help_names_every_shipped_config(verb, flag, kind):
    """The names a flag's help lists are the shipped ones (`sweep --help` once left out `digits`)."""
    import re

    from pipeline import presets
    from pipeline.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "verb").choices[verb]
    text = next(a for a in sub._actions if flag in a.option_strings).help
    listed = re.search(r"shipped \w+ \(([^:]*):", text).group(1)
    assert sorted(n.strip() for n in listed.split(",")) == presets.names(kind)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["optim.lr=-1"], "config key 'optim.lr': must be a finite number > 0"),
        (["task.seq_len=1"], "config key 'task.seq_len': must be >= 2"),
        (["model.cell=transformer"], "config key 'model.cell': unknown value 'transformer'"),
        (["model.colour=red"], "config key 'model.colour': unknown key"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, args, needle):
    r = cli("train", "--config", str(ROOT / "configs/train/smoke.yaml"), *args, cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns


@pytest.mark.parametrize("verb", ["train", "sweep"])
def test_a_gpu_where_torch_sees_none_is_one_line_exit_2_nothing_written(tmp_path, verb):
    """Lightning refused it with a traceback after the run was created, leaving a FAILED run with nothing
    to resume (found by a walkthrough). CUDA_VISIBLE_DEVICES hides any GPU, so this holds on a GPU machine."""
    import os

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    key = "trainer.accelerator" if verb == "train" else "base.trainer.accelerator"
    r = cli(verb, "--config", "smoke", f"{key}=gpu", cwd=tmp_path, env=env)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: config key '{key}': 'gpu', but CUDA_VISIBLE")
    assert list(tmp_path.iterdir()) == []


def _broken_sklearn(root, how: str):
    """A scikit-learn at ``root`` (for PYTHONPATH) whose digits file is missing or cut in half, as a broken
    install or a slimmed image leaves it: the real package, each entry a symlink to the installed one,
    except the path to that file."""
    import sklearn

    real = Path(sklearn.__file__).parent

    def mirror(src: Path, dst: Path, keep: list[str]) -> None:
        dst.mkdir(parents=True)
        for e in src.iterdir():
            if e.name != keep[0]:
                (dst / e.name).symlink_to(e)
            elif len(keep) > 1:
                mirror(e, dst / e.name, keep[1:])

    mirror(real, root / "sklearn", ["datasets", "data", "digits.csv.gz"])
    if how == "truncated":
        data = (real / "datasets" / "data" / "digits.csv.gz").read_bytes()
        (root / "sklearn" / "datasets" / "data" / "digits.csv.gz").write_bytes(data[: len(data) // 2])
    return root / "sklearn" / "datasets" / "data" / "digits.csv.gz"


@pytest.mark.parametrize(
    ("verb", "flag", "name", "key", "how"),
    [
        ("train", "--config", "digits", "task.name", "missing"),
        ("train", "--config", "digits", "task.name", "truncated"),
        ("sweep", "--config", "digits", "base.task.name", "truncated"),
        ("regress", "--suite", "nightly", "entries.digits_tanh_g0.5.task.name", "missing"),
    ],
)
def test_a_broken_digits_file_is_one_line_exit_2_nothing_written(tmp_path, verb, flag, name, key, how):
    """scikit-learn's digits file missing or truncated was a 58-line traceback (FileNotFoundError,
    EOFError) after the MLflow run had been created, a FAILED run left with a resume hint that could not
    work; a sweep failed its trials one by one (a real-data walkthrough). Now one line naming the key and
    the file, exit 2, before any store is opened."""
    file = _broken_sklearn(tmp_path / "site", how)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = cli(verb, flag, name, cwd=work, env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr[-3000:]
    want = "FileNotFoundError" if how == "missing" else "EOFError: Compressed file ended"
    assert lines[0].startswith(
        f"error: config key '{key}': 'digits' reads scikit-learn's bundled file {file}"
    )
    assert want in lines[0] and "--force-reinstall --no-deps scikit-learn==" in lines[0], lines[0]
    assert list(work.iterdir()) == []  # no mlflow.db, no mlruns, no optuna journal


def test_a_sweep_searching_digits_checks_its_file_before_any_store(tmp_path):
    """A space that searches task.name reads each choice's data before any store (the base alone is
    adding): the error names space.task.name."""
    file = _broken_sklearn(tmp_path / "site", "missing")
    work = tmp_path / "work"
    work.mkdir()
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "base: " + str(ROOT / "configs/train/smoke.yaml") + "\n"
        "n_trials: 2\nspace:\n  task.name: {choices: [adding, digits]}\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = cli("sweep", "--config", str(sweep), "base.task.seq_len=64", cwd=work, env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"error: config key 'space.task.name': 'digits' reads scikit-learn's bundled file {file}"
    ), r.stderr[-3000:]
    assert list(work.iterdir()) == []


def test_missing_config_file(tmp_path):
    r = cli("train", "--config", "nope.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "config file not found" in r.stderr and list(tmp_path.iterdir()) == []
    r = cli("train", "--config", str(tmp_path), cwd=tmp_path)  # a directory: not "not found"
    assert r.returncode == 2 and f"config file {tmp_path} is a directory" in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smoke_config_trains_from_the_cli(tmp_path):
    r = cli("train", "--config", str(ROOT / "configs/train/smoke.yaml"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "regime=" in r.stdout
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("smoke").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["regime"] in r.stdout


def test_overrides_may_sit_between_flags(capsys):
    """argparse fills the overrides once: `--config F a=1 --print-config b=2` called b=2 unrecognized
    (walkthrough: `sweep --config smoke --storage URL study=x --workers 1 n_trials=10`)."""
    from pipeline.cli import main

    assert (
        main(["train", "--config", "smoke", "trainer.max_steps=2", "--print-config", "task.seq_len=7"]) == 0
    )
    out = capsys.readouterr().out
    assert "seq_len: 7" in out and "max_steps: 2" in out
    with pytest.raises(SystemExit) as e:  # a flag no verb knows is still argparse's one-line error
        main(["train", "--config", "smoke", "--bogus", "trainer.max_steps=2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in err
    assert err.startswith("usage: python -m pipeline train [-h]"), err  # the verb's usage, not the top's
    with pytest.raises(SystemExit) as e:  # a mistyped flag with a value is a flag, not an override
        main(["train", "--config", "smoke", "--print-confg=yes", "trainer.max_steps=2"])
    assert e.value.code == 2 and "unrecognized arguments: --print-confg=yes" in capsys.readouterr().err


def test_sweep_workers_flag_takes_auto_as_the_sweep_file_does(monkeypatch, capsys):
    """README: "Workers: the sweep's `workers` key or `--workers`; `auto` ...". `--workers auto` was
    argparse's "invalid int value" (a walkthrough) while `workers=auto` worked; it is now that override,
    over any `workers=N` given beside it."""
    from pipeline.cli import main
    from pipeline.sweep import parent
    from pipeline.sweep.config import load_sweep

    got: list = []
    monkeypatch.setattr(
        parent, "run_sweep", lambda config, overrides, **kw: got.append((config, overrides, kw))
    )
    main(["sweep", "--config", "smoke", "--workers", "auto", "workers=3", "n_trials=5"])
    ((config, overrides, kw),) = got
    assert kw["workers"] is None and load_sweep(config, overrides).workers is None  # None: auto
    assert load_sweep(config, ["workers=3"]).workers == 3  # (what the override alone would give)
    main(["sweep", "--config", "smoke", "--workers", "2"])
    assert got[1][2]["workers"] == 2
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--config", "smoke", "--workers", "many"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --workers: expected a number of workers or auto, got 'many'" in err


def test_the_ui_command_printed_is_one_that_runs_where_the_user_is(tmp_path, monkeypatch):
    """`train`, `sweep` and `regress` end with the command that opens the MLflow UI on their store. `make
    ui` serves ./mlflow.db of this checkout only: run elsewhere (a store beside one's own project) it was
    "No rule to make target 'ui'" (a README audit), and for another store it served the wrong one."""
    from pipeline.uris import ui_command

    monkeypatch.chdir(ROOT)
    assert ui_command("sqlite:///mlflow.db") == "make ui"
    assert ui_command(f"sqlite:///{ROOT / 'mlflow.db'}") == "make ui"
    other = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert ui_command(other) == f"python -m pipeline ui --store {other}"
    monkeypatch.chdir(tmp_path)
    assert ui_command("sqlite:///mlflow.db") == ui_command(other) == "python -m pipeline ui"
    # a tracking server serves its own UI; `ui --store http://...` failed with mlflow ui's traceback
    assert ui_command("http://127.0.0.1:5005") == "open http://127.0.0.1:5005"
    assert ui_command("https://u:pw@mlflow.example") == "open https://u:***@mlflow.example"
    pg = "postgresql+psycopg2://u:s3cret@db/mlflow"  # a password stays out of logs (a review)
    assert ui_command(pg) == "python -m pipeline ui --store postgresql+psycopg2://u:***@db/mlflow"
    r = cli(
        "train",
        "--config",
        "smoke",
        "trainer.max_steps=2",
        "tracking.uri=sqlite:///elsewhere.db",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(review: python -m pipeline ui --store sqlite:///elsewhere.db)" in r.stdout, r.stdout


@pytest.mark.slow
def test_a_sigterm_to_the_ui_command_stops_its_server_and_frees_the_port(tmp_path):
    """``python -m pipeline ui`` execs ``mlflow ui`` (README, "`make ui`"): a SIGTERM to the command (a
    service manager, ``timeout``) ends the server it starts, with two workers too, and frees the port for
    the next ``make ui``. (A scale probe reported a uvicorn server left serving after one; that did not
    reproduce here, with MLflow 3 at one or two workers.)"""
    import signal
    import socket
    import urllib.request

    from conftest import wait_for_http

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # the store exists
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "ui.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "ui", "--port", str(port), "--store", uri, "--workers", "2"],
            cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc, 180, log)
        proc.send_signal(signal.SIGTERM)  # to the command alone, not to a group
        proc.wait(60)
        with pytest.raises(OSError, match="refused"):  # nothing serves the port any more
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
