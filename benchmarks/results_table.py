"""The README's results table: which cell learns what (``make bench BENCH_ARGS='--only results'``).

Every row is one real ``python -m pipeline train`` process (the command the README prints beside the row),
recorded in a store of its own under ``--results-dir`` (default ``benchmarks/out/results``), read back from
MLflow afterwards: solved or not, the first validation step below the task's solved level (from the
``val/loss`` history), the final ``val/loss_ratio`` (and ``val/accuracy`` where the task classifies), the
verdict at step 0 and at the end, and ``bptt/log10_ratio`` at step 0 and at the end. Runs are seeded and
deterministic on a given machine, so the numbers do not depend on the machine's load; the wall times do.

``python -m benchmarks --only results [--rows SUBSTR] [--jobs N]``: ``--rows`` runs the rows whose id
contains SUBSTR; ``--jobs N`` runs N rows at once (one intra-op
thread each); a row whose store already holds a FINISHED run is read, not retrained (delete the folder to
start afresh).
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    cell: str  # the label in the table (a cell, or a cell with its settings)
    task: str  # adding | copy | digits | digits (permuted)
    T: int
    args: tuple[str, ...]  # dotted overrides after `python -m pipeline train`

    @property
    def id(self) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "_", f"{self.task}-T{self.T}-{self.cell}").strip("_")

    @property
    def command(self) -> str:
        return "python -m pipeline train " + " ".join(self.args)


def _adding(T: int, cell: str, steps: int, *extra: str, label: str | None = None) -> Row:
    args = (f"task.seq_len={T}", f"model.cell={cell}", f"trainer.max_steps={steps}", *extra)
    return Row(label or cell, "adding", T, args)


def _copy(T: int, cell: str, steps: int, *extra: str, label: str | None = None) -> Row:
    args = ("task.name=copy", f"task.seq_len={T}", f"model.cell={cell}", f"trainer.max_steps={steps}", *extra)
    return Row(label or cell, "copy", T, args)


def _digits(cell: str, permute: bool, *extra: str, label: str | None = None) -> Row:
    args = ("--config", "configs/train/digits.yaml", f"model.cell={cell}", *extra)
    if permute:
        args += ("task.permute=true",)
    return Row(label or cell, "digits (permuted)" if permute else "digits", 64, args)


# Shared settings (the configuration reference's defaults unless a row says otherwise): seed 0, H = 64,
# Adam 1e-3, batch 50, no clipping, validation every 100 steps on the fixed set of 500, the profile every
# 500 steps. Digits rows take configs/train/digits.yaml (GRU-sized settings for every cell: Adam 3e-3,
# clip 1, batch 64) for 2400 steps, where the GRU passes the solved level. Cells with their papers'
# own settings say so in their label.
PROFILE = "diagnostics.profile_every=500"
IRNN = ("model.init=identity", "clip.mode=norm", "clip.threshold=1")  # Le, Jaitly, Hinton 2015
DIGITS_STEPS = "trainer.max_steps=2400"
# lem in the authors' adding setting (Rusch, Erichson, Mahoney 2022), profiled at the start and end only
LEM = ("model.dt=0.0242", "optim.lr=0.0026", "diagnostics.profile_every=0", "diagnostics.probe_size=8")

ROWS: tuple[Row, ...] = (
    *(_adding(100, c, 3000, PROFILE) for c in ("tanh", "orthogonal", "indrnn", "lstm", "gru", "lru")),
    _adding(100, "relu", 3000, PROFILE, *IRNN, label="relu (IRNN, clip 1)"),
    _adding(100, "mingru", 8000, PROFILE),
    *(
        _adding(100, "lem", s, *LEM, f"model.hidden_size={h}", label=f"lem (H {h}, dt 0.0242, lr 0.0026)")
        for h, s in ((64, 2500), (128, 3000))
    ),
    *(_adding(200, c, 3000, PROFILE) for c in ("lstm", "gru", "lru")),
    _adding(200, "mingru", 8000, PROFILE),
    *(_copy(100, c, 3000, PROFILE, "task.batch_size=64") for c in ("tanh", "lstm", "gru")),
    *(_copy(100, c, 8000, PROFILE, "task.batch_size=64") for c in ("lru", "mingru")),
    *(_digits(c, p, DIGITS_STEPS) for p in (False, True) for c in ("tanh", "lstm", "gru", "lru", "mingru")),
)


def _train(row: Row, folder: Path) -> float:
    """Train ``row`` into its own store under ``folder`` (skipped when already there); wall seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "done"
    if done.exists():
        return float(done.read_text() or "nan")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "pipeline", "train", *row.args]
    cmd += [f"tracking.uri={uri}", "tracking.experiment=results", f"tracking.run_name={row.id}"]
    cmd += ["tracking.log_model=false", "diagnostics.plots=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri}
    t0 = time.monotonic()
    with open(folder / "train.log", "w") as log:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.monotonic() - t0
    if rc != 0:
        raise RuntimeError(f"{row.id}: exit {rc}; see {folder / 'train.log'}")
    done.write_text(f"{wall:.1f}")
    return wall


def _read(row: Row, folder: Path, wall: float) -> dict:
    """The row's numbers, read back from its MLflow store."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.training.tasks import task_of

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("results")
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    args = list(row.args)
    path = None
    if "--config" in args:
        i = args.index("--config")
        path = ROOT / args[i + 1]
        del args[i : i + 2]
    task = task_of(load_config(path, args).task)
    hist = client.get_metric_history(run.info.run_id, "val/loss")
    first = next(
        (int(m.step) for m in sorted(hist, key=lambda m: m.step) if m.value < task.solved_below), None
    )
    prof = client.get_metric_history(run.info.run_id, "bptt/log10_ratio")
    ratios = [m.value for m in sorted(prof, key=lambda m: m.step)]
    m, tags = run.data.metrics, run.data.tags
    acc = m.get("val/accuracy")
    return {
        "cell": row.cell,
        "task": row.task,
        "T": row.T,
        "steps": int(m.get("train/steps", float("nan"))),
        "solved": "yes" if tags.get("solved") == "true" else "no",
        "steps to solve": first if first is not None else "-",
        "val/loss_ratio": round(m.get("val/loss_ratio", math.nan), 3),
        "val/accuracy": round(acc, 3) if acc is not None else "",
        "regime": f"{tags.get('regime_init', '?')} -> {tags.get('regime', '?')}",
        "bptt/log10_ratio": f"{ratios[0]:.3g} -> {ratios[-1]:.3g}" if ratios else "",
        "wall (s)": round(wall),
        "command": row.command,
    }


def seeded(row: Row, seed: int) -> Row:
    """``row`` with ``seed=N`` (seed 0, every row's own, is the row as it is, in its own folder as before)."""
    return row if seed == 0 else Row(row.cell, row.task, row.T, (*row.args, f"seed={seed}"))


def run(
    rows: str = "", jobs: int = 2, out: str = "benchmarks/out/results", seeds: tuple[int, ...] = (0,)
) -> list[dict]:
    """Train (or read) every row whose id contains ``rows``, once per seed; the table rows in ROWS order,
    each with its ``seed``."""
    chosen = [(seeded(r, s), s) for r in ROWS if rows in r.id for s in seeds]
    base = ROOT / out

    def one(row_seed: tuple[Row, int]) -> dict:
        row, seed = row_seed
        folder = base / (row.id if seed == 0 else f"{row.id}-s{seed}")
        return {**_read(row, folder, _train(row, folder)), "seed": seed}

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, chosen))


def _spread(values: list) -> str:
    """'0.093 (0.077-0.133)': the median and range over seeds of a column's numbers."""
    x = sorted(v for v in values if isinstance(v, (int, float)) and not math.isnan(v))
    if not x:
        return "-"
    mid = x[len(x) // 2] if len(x) % 2 else (x[len(x) // 2 - 1] + x[len(x) // 2]) / 2
    return f"{mid:.3g} ({x[0]:.3g}-{x[-1]:.3g})" if x[0] != x[-1] else f"{mid:.3g}"


def over_seeds(results: list[dict]) -> list[dict]:
    """One row per table row over its seeds: solved k/n, each seed's first step below the solved level,
    the median and range of the loss ratio and the accuracy, the verdicts met (the results table's
    digits rows: a single run's "solved" flipped between two machines, README "Results")."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["command"].replace(f" seed={r['seed']}", ""), []).append(r)
    out = []
    for command, rs in groups.items():
        first = rs[0]
        out.append(
            {
                "cell": first["cell"],
                "task": first["task"],
                "T": first["T"],
                "steps": first["steps"],
                "seeds": ",".join(str(r["seed"]) for r in rs),
                "solved at the end": f"{sum(r['solved'] == 'yes' for r in rs)}/{len(rs)}",
                "first validation below": ", ".join(str(r["steps to solve"]) for r in rs),
                "val/loss_ratio": _spread([r["val/loss_ratio"] for r in rs]),
                "val/accuracy": _spread([r["val/accuracy"] for r in rs]),
                "regime": ", ".join(sorted({r["regime"] for r in rs})),
                "command": command + " seed=N",
            }
        )
    return out


def markdown(results: list[dict]) -> str:
    """The README table, then the commands, one a row (over seeds, one row per command: over_seeds)."""
    if len({r.get("seed", 0) for r in results}) > 1:
        results = over_seeds(results)
    cols = [c for c in results[0] if c not in ("command", "wall (s)", "seed")] if results else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in results]
    cmds = [f"{r['command']}" for r in results]
    return "\n".join(lines) + "\n\n```bash\n" + "\n".join(cmds) + "\n```"


if __name__ == "__main__":
    sel = sys.argv[1] if len(sys.argv) > 1 else ""
    print(markdown(run(sel)))
    print(shlex.join(sys.argv))
