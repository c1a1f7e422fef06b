"""Cost of the remedies beyond clipping (README, "Remedies beyond clipping"): one training step of the real
module with Pascanu's Omega or gradient flossing against the plain fused step, and the peak memory each adds.

Each measurement runs in a fresh subprocess (:mod:`benchmarks.remedy_child`), so its peak RSS is its own.
Adding task, T = 100, H = 64, batch 64, Adam; flossing on 8 trajectories of the batch, every step.
"""

from __future__ import annotations

import json
import subprocess
import sys

WHAT = {
    "plain": "fused step",
    "omega": "+ Omega (remedy.omega)",
    "floss1": "+ flossing, k = 1",
    "floss4": "+ flossing, k = 4",
}


def measure(cell: str, T: int, H: int, B: int, what: str, device: str = "cpu") -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.remedy_child", cell, str(T), str(H), str(B), what, device],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def remedy_cost(quick: bool = False, device: str = "cpu") -> list[dict]:
    rows = []
    T, H, B = 100, 64, 64
    for cell in ("tanh",) if quick else ("tanh", "lstm"):
        got = {w: measure(cell, T, H, B, w, device) for w in WHAT}
        for w, label in WHAT.items():
            rows.append(
                {
                    "bench": f"remedy step, {cell}",
                    "device": device,
                    "T": T,
                    "H": H,
                    "batch": B,
                    "step": label,
                    "ms": 1000 * got[w]["s"],
                    "x fused step": got[w]["s"] / got["plain"]["s"],
                    "peak_mb": got[w]["peak_mb"],
                }
            )
    return rows
