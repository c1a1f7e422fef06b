"""Stores written before the move into stage folders are read after it (README, "Project structure").

The archive in ``tests/data`` holds an MLflow sqlite store, its artifacts and an Optuna journal written
by the flat layout (a 2-trial sweep and one training run, see ``tests/data/README.md``). Nothing in them
names a Python module (no pickles: params, metrics, tags, parquet and YAML artifacts, Optuna's JSON
journal), so the move must not matter; this test is what shows it.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from test_sweep import check_consistent, load_study, mlflow_runs, sweep_env

ARCHIVE = Path(__file__).parent / "data" / "store-flat-layout.tgz"
WRITTEN_AT = "/tmp/legacy"


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> str:
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(tmp_path, filter="data")
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as c:  # artifact locations are absolute paths of the folder it was written in
        c.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (WRITTEN_AT, str(tmp_path)))
        c.execute(
            "UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)",
            (WRITTEN_AT, str(tmp_path)),
        )
        (revision,) = c.execute("SELECT version_num FROM alembic_version").fetchone()
    from pipeline.store_checks import schema_problem

    newer = schema_problem(revision)
    if newer:  # the floor run (README, "Supported versions"): an older MLflow cannot read the archive at all
        pytest.skip(f"the archive's store: {newer[0]}")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_report_reads_a_store_written_by_the_flat_layout(legacy, tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "report",
            "--experiment",
            "sweep-test",
            "--study",
            "t",
            "--out",
            str(tmp_path / "rep"),
        ],
        capture_output=True,
        text=True,
        env=sweep_env(),
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "report 't': 2 runs" in p.stdout
    import pandas as pd

    table = pd.read_csv(tmp_path / "rep" / "comparison.csv")
    runs = {r.info.run_id: r for r in mlflow_runs(legacy) if r.data.tags.get("pipeline.kind") == "trial"}
    assert set(table["run_id"]) == set(runs)
    for _, row in table.iterrows():
        assert row["val_loss"] == pytest.approx(runs[row["run_id"]].data.metrics["val/loss"])


def test_a_sweep_written_by_the_flat_layout_resumes(legacy):
    before = [t.params for t in load_study().trials]  # a list: Study.trials reads the storage when asked
    assert len(before) == 2
    p = subprocess.run(
        [sys.executable, "-m", "pipeline", "sweep", "--config", "s.yaml", "n_trials=4"],
        capture_output=True,
        text=True,
        env=sweep_env(),
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    study = load_study()
    check_consistent(study, mlflow_runs(legacy), 4)  # one parent run: the old one, continued
    assert [t.params for t in study.trials[:2]] == before


def test_artifacts_written_by_the_flat_layout_download(legacy, tmp_path):
    import pandas as pd
    from mlflow.tracking import MlflowClient

    c = MlflowClient(legacy)
    (run,) = c.search_runs([c.get_experiment_by_name("legacy-train").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["regime"]
    frame = pd.read_parquet(
        c.download_artifacts(run.info.run_id, "diagnostics/bptt_profile.parquet", str(tmp_path))
    )
    assert len(frame) and {"t", "log10_norm"} <= set(frame.columns)
