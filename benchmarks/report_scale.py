"""The report's table and phase diagram at a study of thousands of runs, on a synthetic table (no store):
``.venv/bin/python benchmarks/report_scale.py [N]`` prints the seconds of ``comparison_table`` (from the
runs frame MLflow's ``search_runs`` returns) and of the phase diagram drawn and saved (README, "What the
report shows"). Measured on the 2-core machine, N = 5,000 (2026-12-06): 0.07 s and 0.5 s, against 6.3 s
and 7.4 s before the table read its columns as lists and a dense panel drew one scatter per group."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.report import data
from pipeline.report import figures as rr


def runs_frame(n: int, seed: int = 0) -> pd.DataFrame:
    """A runs frame with the columns ``search_runs`` gives the report, n runs of three cells."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "tags.task": ["adding"] * n,
            "tags.cell": rng.choice(["tanh", "gru", "lstm"], n),
            "tags.init": ["gaussian"] * n,
            "params.model.init_scale": [str(x) for x in 10 ** rng.uniform(-0.7, 0.5, n)],
            "params.optim.lr": [str(x) for x in 10 ** rng.uniform(-4, -1, n)],
            "params.clip.mode": ["none"] * n,
            "params.clip.threshold": ["1.0"] * n,
            "params.seed": ["0"] * n,
            "params.task.seq_len": ["50"] * n,
            "params.optim.name": ["adam"] * n,
            "params.model.hidden_size": ["32"] * n,
            "metrics.val/loss_ratio": rng.uniform(0, 1.5, n),
            "tags.solved": rng.choice(["true", "false"], n),
            "tags.regime": rng.choice(["healthy", "vanishing", "exploding", "diverged"], n),
            "status": ["FINISHED"] * n,
            "run_id": [f"r{i}" for i in range(n)],
            "tags.mlflow.runName": [f"n{i}" for i in range(n)],
        }
    )


def main(n: int) -> None:
    runs = runs_frame(n)
    t0 = time.perf_counter()
    table = data.comparison_table(runs)
    t1 = time.perf_counter()
    fig = rr.phase_diagram(table, "adding")
    with tempfile.TemporaryDirectory() as d:
        fig.savefig(Path(d) / "phase.png", dpi=100)
    t2 = time.perf_counter()
    print(f"{n} runs: comparison_table {t1 - t0:.2f} s, phase diagram drawn and saved {t2 - t1:.2f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
