"""Is the memory estimate honest? Peak RSS of real training runs against :func:`pipeline.training.budget.estimate`.

Each configuration runs as ``python -m pipeline train`` (tracking off) in its own process; ``os.wait4``
returns that process's peak resident set (``ru_maxrss``). The table goes to the README section
"Memory estimate"::

    PYTHONPATH=. .venv/bin/python benchmarks/memory_estimate.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs/train/smoke.yaml")
COMMON = ["tracking.enabled=false", "trainer.accelerator=cpu", "diagnostics.plots=false"]
CASES = {
    "smoke config": [],
    "training activations (tanh)": [
        "task.seq_len=200",
        "task.batch_size=1024",
        "model.hidden_size=256",
        "trainer.max_steps=2",
        "task.val_size=64",
        "diagnostics.probe_size=8",
    ],
    "training activations (lstm)": [
        "task.seq_len=200",
        "task.batch_size=256",
        "model.hidden_size=256",
        "model.cell=lstm",
        "trainer.max_steps=2",
        "task.val_size=64",
        "diagnostics.probe_size=8",
    ],
    "validation set": [
        "task.seq_len=200",
        "task.val_size=200000",
        "trainer.max_steps=2",
        "diagnostics.probe_size=8",
    ],
    "float64 profile (lstm)": [
        "task.seq_len=400",
        "model.hidden_size=128",
        "model.cell=lstm",
        "diagnostics.probe_size=192",
        "trainer.max_steps=1",
        "task.val_size=64",
    ],
    "float64 profile (copy, gru)": [
        "task.name=copy",
        "task.seq_len=400",
        "model.hidden_size=128",
        "model.cell=gru",
        "diagnostics.probe_size=128",
        "trainer.max_steps=1",
        "task.val_size=64",
        "task.batch_size=8",
    ],
    # Real data (pipeline/training/digits.py): scikit-learn imported, the file read, both splits kept.
    "digits dataset": ["task.name=digits", "task.seq_len=64"],
    "digits, training activations (gru)": [
        "task.name=digits",
        "task.seq_len=64",
        "task.batch_size=2048",
        "model.hidden_size=256",
        "model.cell=gru",
        "trainer.max_steps=2",
        "task.val_size=898",
        "diagnostics.probe_size=8",
    ],
    "Omega (tanh)": [
        "task.seq_len=200",
        "task.batch_size=512",
        "model.hidden_size=256",
        "remedy.omega=1",
        "trainer.max_steps=2",
        "task.val_size=64",
        "diagnostics.probe_size=8",
    ],
    "Omega (lstm)": [
        "task.seq_len=200",
        "task.batch_size=128",
        "model.hidden_size=256",
        "model.cell=lstm",
        "remedy.omega=1",
        "trainer.max_steps=2",
        "task.val_size=64",
        "diagnostics.probe_size=8",
    ],
    "flossing (lstm, k = 16)": [
        "task.seq_len=200",
        "task.batch_size=64",
        "model.hidden_size=128",
        "model.cell=lstm",
        "remedy.floss.weight=1",
        "remedy.floss.exponents=16",
        "remedy.floss.batch=64",
        "trainer.max_steps=2",
        "task.val_size=64",
        "diagnostics.probe_size=8",
    ],
    # the modern diagonal cells (pipeline/training/modern.py): the CPU's sequential scan, the float64 twin
    "training activations (lru)": [
        "model.cell=lru",
        "model.init=default",
        "task.seq_len=200",
        "task.batch_size=256",
        "model.hidden_size=256",
        "trainer.max_steps=2",
        "task.val_size=64",
        "diagnostics.probe_size=8",
    ],
    "training activations (mingru)": [
        "model.cell=mingru",
        "model.init=default",
        "task.seq_len=200",
        "task.batch_size=512",
        "model.hidden_size=256",
        "trainer.max_steps=2",
        "task.val_size=64",
        "diagnostics.probe_size=8",
    ],
    "float64 profile (lru)": [
        "model.cell=lru",
        "model.init=default",
        "task.seq_len=400",
        "model.hidden_size=128",
        "diagnostics.probe_size=192",
        "trainer.max_steps=1",
        "task.val_size=64",
    ],
    "Omega (lru)": [
        "model.cell=lru",
        "model.init=default",
        "task.seq_len=200",
        "task.batch_size=256",
        "model.hidden_size=128",
        "remedy.omega=1",
        "trainer.max_steps=2",
        "task.val_size=64",
        "diagnostics.probe_size=8",
    ],
    "flossing (mingru, k = 16)": [
        "model.cell=mingru",
        "model.init=default",
        "task.seq_len=200",
        "task.batch_size=64",
        "model.hidden_size=128",
        "remedy.floss.weight=1",
        "remedy.floss.exponents=16",
        "remedy.floss.batch=64",
        "trainer.max_steps=2",
        "task.val_size=64",
        "diagnostics.probe_size=8",
    ],
    "float64 profile (mingru)": [
        "model.cell=mingru",
        "model.init=default",
        "task.seq_len=400",
        "model.hidden_size=128",
        "diagnostics.probe_size=192",
        "trainer.max_steps=1",
        "task.val_size=64",
    ],
    # lem (pipeline/training/lem.py): the loop with autograd; the profile pass and, after it, the Jacobian
    # bound's [P, 2H, 2H] matrices (H and P kept small: the bound costs one eigensolve per step and sequence)
    "training activations (lem)": [
        "model.cell=lem",
        "model.init=default",
        "task.seq_len=200",
        "task.batch_size=512",
        "model.hidden_size=128",
        "trainer.max_steps=2",
        "task.val_size=64",
        "diagnostics.probe_size=8",
    ],
    "float64 profile (lem)": [
        "model.cell=lem",
        "model.init=default",
        "task.seq_len=400",
        "model.hidden_size=64",
        "diagnostics.probe_size=128",
        "trainer.max_steps=1",
        "task.val_size=64",
    ],
    "Omega (lem)": [
        "model.cell=lem",
        "model.init=default",
        "task.seq_len=200",
        "task.batch_size=256",
        "model.hidden_size=128",
        "remedy.omega=1",
        "trainer.max_steps=2",
        "task.val_size=64",
        "diagnostics.probe_size=8",
    ],
}


def peak_rss(overrides: list[str]) -> int:
    """Bytes: the peak RSS of one ``pipeline train`` process with these overrides."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", "--config", SMOKE, *COMMON, *overrides],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0:
        raise SystemExit(f"{overrides}: exit {status}\n{p.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024  # KiB on Linux


def main(only: str = "") -> None:
    """Every case, or those whose name contains ``only`` (``benchmarks/memory_estimate.py lru``)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.config import load_config
    from pipeline.training.budget import estimate, fmt_bytes

    print("| configuration | overrides of configs/train/smoke.yaml | estimate | peak RSS | estimate / peak |")
    print("|---|---|---|---|---|")
    for name, over in CASES.items():
        if only not in name:
            continue
        est = estimate(load_config(SMOKE, [*COMMON, *over])).peak()
        rss = peak_rss(over)
        print(
            f"| {name} | `{' '.join(over) or '-'}` | {fmt_bytes(est)} | {fmt_bytes(rss)} | {est / rss:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
