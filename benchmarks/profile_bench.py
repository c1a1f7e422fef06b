"""Cost of one BPTT profile pass relative to one fused training step; peak memory of each.

Each measurement runs in a fresh subprocess so peak RSS (VmHWM, reset through /proc/self/clear_refs)
belongs to that measurement alone.
"""

from __future__ import annotations

import json
import subprocess
import sys


def measure(cell: str, T: int, what: str, device: str = "cpu") -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_child", cell, str(T), what, device],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile_cost(quick: bool = False, device: str = "cpu") -> list[dict]:
    rows = []
    for cell in ("tanh", "lstm"):
        for T in (100,) if quick else (100, 1000):
            step, prof, full = (measure(cell, T, w, device) for w in ("step", "profile", "full"))
            rows.append(
                {
                    "bench": f"profile pass / train step, {cell}",
                    "device": device,
                    "T": T,
                    "H": 128,
                    "train_step_ms (batch 64)": 1000 * step["s"],
                    "profile_ms (probe 32)": 1000 * prof["s"],
                    "ratio": prof["s"] / step["s"],
                    "target": "<= 2.0",
                    "full_pass_ms (+spectra, Lyapunov)": 1000 * full["s"],
                    "peak_mb step/profile": f"{step['peak_mb']:.0f}/{prof['peak_mb']:.0f}",
                }
            )
    return rows
