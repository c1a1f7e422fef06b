"""Shared fixtures: temporary stores, tiny configs, and the skip-or-require switches for real services."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_OUTPUT = ROOT / "test-output"  # screenshots and other artefacts a person may want to look at
# The PostgreSQL server the postgres-marked tests use (pyproject.toml's `postgres` marker); each test makes
# databases of its own there, named by its process id. SQLAlchemy 2.1 maps postgresql:// to psycopg 3,
# which we do not install: the URL names the driver. Fixed, as the README says (the outage tests put a
# proxy in front of this port).
PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def required(var: str) -> bool:
    """CI sets PIPELINE_REQUIRE_POSTGRES / PIPELINE_REQUIRE_BROWSER: a missing service then fails."""
    return os.environ.get(var, "") not in ("", "0", "false")


def skip_or_fail(var: str, reason: str) -> None:
    if required(var):
        pytest.fail(f"{reason} (required because {var} is set)")
    pytest.skip(reason)


def wait_for_http(url: str, proc, timeout: float, log_path) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if ``proc`` dies or time runs out."""
    import time
    import urllib.request

    end = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            pytest.fail(f"server at {url} did not start:\n" + Path(log_path).read_text()[-3000:])
        time.sleep(0.5)


@pytest.fixture(scope="session", autouse=True)
def _mlflow_schema_from_a_template(tmp_path_factory):
    """A new MLflow sqlite store made in this process gets its tables by copying a store MLflow migrated
    once in this process, not by MLflow's migrations again: those took 3-8 s of CPU per store (a profile
    of a tiny sweep: 7 of its parent's 8 s), and over a hundred tests each make a fresh store. The copy
    is of what ``mlflow.store.db.utils._initialize_tables`` writes (its tables at the migration head, no
    experiment: MLflow's store adds the Default experiment itself, with this store's artifact root).
    Stores made by the commands the tests start (subprocesses) and PostgreSQL stores are made by MLflow
    as for a user, and so is the template (README, "Development")."""
    import sqlite3

    if os.environ.get("PIPELINE_TEST_MLFLOW_MIGRATIONS") == "1":  # MLflow's migrations for every store
        yield
        return
    try:
        from mlflow.store.db import utils
    except ImportError:  # pragma: no cover
        yield
        return
    import threading

    real = utils._initialize_tables

    # MLflow's _is_empty_database (absent at the floor, 3.9): alembic's tables only
    def empty(engine) -> bool:
        import sqlalchemy

        return all(t.startswith("alembic_") for t in sqlalchemy.inspect(engine).get_table_names())

    template = tmp_path_factory.mktemp("mlflow-schema") / "template.db"
    making = threading.Lock()

    def initialize_tables(engine) -> None:
        db = engine.url.database
        if engine.dialect.name != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
            return real(engine)
        if not empty(engine):  # a store with tables, which MLflow migrates in place: a copy would wipe it
            return real(engine)
        with making:  # made whole under another name, then renamed: a half-made template is never copied
            if not template.exists():
                import sqlalchemy

                part = template.with_suffix(".part")
                part.unlink(missing_ok=True)
                made = sqlalchemy.create_engine(f"sqlite:///{part}")
                real(made)
                made.dispose()
                part.replace(template)
        src = sqlite3.connect(template)
        try:
            with engine.connect() as conn:
                src.backup(conn.connection.driver_connection)
        finally:
            src.close()

    utils._initialize_tables = initialize_tables
    yield
    utils._initialize_tables = real


@pytest.fixture(autouse=True)
def _mlflow_global_tracking_uri():
    """Lightning's MLFlowLogger calls ``mlflow.set_tracking_uri``, which also sets $MLFLOW_TRACKING_URI
    "so that subprocess can inherit it" (MLflow's tracking utils): a test using it would send every
    later test's subprocess to its temporary store. Restore both after each test."""
    import sys

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        from mlflow.tracking._tracking_service import utils

        if utils._tracking_uri != before:
            utils.set_tracking_uri(before)  # None unsets the variable too
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


# What the commands write into the folder they run in (`make clean`'s list): a test writes them into its
# own temporary directory, never into the checkout, where they would mix with a user's own sweeps.
CWD_OUTPUTS = (
    "mlflow.db",
    "mlflow.db-wal",
    "mlflow.db-shm",
    "mlflow.db.create-lock",
    "mlruns",
    "mlartifacts",
    "optuna",
    "reports",
    "runs",
)


def _stamps() -> dict[str, int | None]:
    """Each of CWD_OUTPUTS in the checkout: its modification time (ns), None where absent."""
    out: dict[str, int | None] = {}
    for name in CWD_OUTPUTS:
        try:
            out[name] = (ROOT / name).stat().st_mtime_ns
        except FileNotFoundError:
            out[name] = None
    return out


@pytest.fixture(autouse=True)
def _nothing_written_in_the_checkout():
    """A test that left an MLflow store in the checkout went unseen (an empty ./mlflow.db after `make
    test`: a store URI of None read as MLflow's default, in the test process's working directory)."""
    before = _stamps()
    yield
    after = _stamps()
    changed = sorted(name for name in CWD_OUTPUTS if after[name] != before[name])
    if changed:
        pytest.fail(
            f"{', '.join(changed)} in the checkout ({ROOT}) created or changed during this test or one "
            "running beside it: a test writes into its own temporary directory"
        )


@pytest.fixture(autouse=True)
def _torch_one_thread():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh MLflow sqlite store in a temporary working directory (also $MLFLOW_TRACKING_URI)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def tiny_config(**overrides):
    """A config that trains in about a second; dotted-key overrides, e.g. tiny_config(**{"model.cell": "lstm"})."""
    from pipeline.config import load_config

    base = {
        "seed": 0,
        "task": {"name": "adding", "seq_len": 12, "batch_size": 16, "val_size": 64},
        "model": {"cell": "tanh", "hidden_size": 8},
        "optim": {"name": "adam", "lr": 0.01},
        "trainer": {"max_steps": 20, "val_every": 10, "log_every": 5},
        "diagnostics": {"profile_every": 10, "probe_size": 8, "plots": False},
        "tracking": {"experiment": "test"},
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()], patch=base)


@pytest.fixture
def tiny():
    return tiny_config


def digits_held_out(val_size: int):
    """The held-out split of task ``digits`` as README "Tasks" documents it, computed here from
    scikit-learn directly (not through pipeline code): shuffle the 1,797 indices with numpy's
    ``RandomState(0)``, then take rounds of one image per class (each class's next image in shuffled
    order; within a round, in shuffled order) until ``val_size`` are taken. Returns (pixels / 16 as
    float64 ``[n, 64]``, labels, indices)."""
    import numpy as np
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    shuffled = list(np.random.RandomState(0).permutation(len(y)))
    position = {i: p for p, i in enumerate(shuffled)}
    by_class = {c: [i for i in shuffled if y[i] == c] for c in range(10)}
    order: list[int] = []
    for r in range(max(len(v) for v in by_class.values())):
        order += sorted((v[r] for v in by_class.values() if r < len(v)), key=position.__getitem__)
    held = np.array(order[:val_size])
    return x[held] / 16.0, y[held], held


def assert_step_derivatives_match_autograd(p, n_in: int, width: int, seed: int = 2):
    """A two-state twin cell's hand-written step derivatives (``pipeline.bptt.twin.step_vjp`` /
    ``step_jvp``, float64 params ``p``) equal torch.func's VJP and JVP of its step at a random state of
    ``width`` units (within 1e-14); returns (cache, generator) for further checks of the same step."""
    import torch

    from pipeline.bptt import twin as cells

    f64 = torch.float64
    gen = torch.Generator().manual_seed(seed)
    state = (torch.randn(4, width, generator=gen, dtype=f64),)
    gi = cells.input_projection(p, torch.randn(4, n_in, generator=gen, dtype=f64))
    _, cache = cells.step_cached(p, gi, state)
    v, q = (
        (torch.randn(4, width, generator=gen, dtype=f64),),
        (torch.randn(4, width, generator=gen, dtype=f64),),
    )

    def f(s):
        return cells.step_projected(p, gi, (s,))[0]

    _, vjp_fn = torch.func.vjp(f, state[0])
    torch.testing.assert_close(cells.step_vjp(p, cache, v)[0][0], vjp_fn(v[0])[0], rtol=0, atol=1e-14)
    _, want = torch.func.jvp(f, state, q)
    torch.testing.assert_close(cells.step_jvp(p, cache, q)[0], want, rtol=0, atol=1e-14)
    return cache, gen
