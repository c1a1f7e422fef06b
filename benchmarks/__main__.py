"""``make bench``: ``python -m benchmarks [--quick] [--only train,profile,remedy,scan,stack,store,sweep] [--gpu] [--seeds N]
[--sweep-trials N] [--sweep-modes "same points,TPE"] [--sweep-grid W:K:N[:S],...]``;
Markdown tables. ``--only results [--rows SUBSTR] [--jobs N]``: the README's results table (hours of CPU;
not part of the default set)."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

# --quick rows (a smoke check of the harness: fewer steps, shorter T) once replaced the measured rows of
# benchmarks/results.json, which the README's tables cite (found by a walkthrough).
QUICK_OUT = "benchmarks/out/quick.json"


def table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _result_seeds(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[int, ...]:
    """The results table's seeds, checked before any bench runs (one line, exit 2)."""
    try:
        seeds = tuple(int(x) for x in args.result_seeds.split(","))
    except ValueError:
        ap.error(f"--result-seeds: not a comma list of integers: {args.result_seeds!r}")
    if any(not 0 <= x < 2**63 for x in seeds) or len(set(seeds)) != len(seeds):
        ap.error(f"--result-seeds: seeds must be distinct and in [0, 2^63), got {args.result_seeds!r}")
    return seeds


def _sweep_modes(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, ...]:
    """The sweep bench's modes; bad sweep flags stop here, before any bench runs (one line, exit 2)."""
    modes = tuple(m.strip() for m in args.sweep_modes.split(","))
    if set(modes) - {"same points", "TPE"}:
        ap.error(f"--sweep-modes: unknown mode in {args.sweep_modes!r} (known: 'same points', 'TPE')")
    if args.sweep_trials is not None and args.sweep_trials < 1:
        ap.error(f"--sweep-trials: must be >= 1, got {args.sweep_trials}")
    if args.sweep_grid is not None:
        from .sweep_bench import parse_grid

        if "sweep" not in args.only.split(","):
            ap.error("--sweep-grid: needs the sweep bench (--only sweep)")
        try:
            parse_grid(args.sweep_grid)
        except ValueError as e:
            ap.error(f"--sweep-grid: {e}")
    return modes


def merge(old: dict, new: dict) -> dict:
    """``results.json`` after a run: ``new``'s benches replace ``old``'s, the others stay (``--only
    sweep`` keeps the train rows); under ``gpu`` likewise, one level down (a ``--gpu --only train`` run
    keeps ``gpu.stack``)."""
    out = {**old, **new}
    if "gpu" in new:
        out["gpu"] = {**old.get("gpu", {}), **new["gpu"]}
    return out


def _sweep(args: argparse.Namespace, modes: tuple[str, ...], results: dict) -> None:
    """The sweep bench: the comparison with the hand-written sweep, or ``--sweep-grid``'s entries."""
    try:
        from .sweep_bench import parse_grid, run_grid
        from .sweep_bench import run as sweep_run
    except ImportError as e:
        print(f"(sweep bench unavailable: {e})")
        return
    if args.sweep_grid is not None:
        results["sweep_grid"] = run_grid(args.quick, parse_grid(args.sweep_grid))
        print(table(results["sweep_grid"]) + "\n", flush=True)
        return
    key = "sweep" if args.sweep_trials is None else f"sweep_{args.sweep_trials}"
    results[key] = sweep_run(
        args.quick, seeds=1 if args.quick else args.seeds, n_trials=args.sweep_trials, modes=modes
    )
    print(table(results[key]) + "\n", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks")
    ap.add_argument("--quick", action="store_true", help="smaller budgets (a smoke check of the harness)")
    ap.add_argument(
        "--only",
        default="train,profile,remedy,scan,stack,store,sweep",
        help="comma list of: train, profile, remedy, scan, stack, store, sweep; or results (the README's results "
        "table, hours of CPU: not in the default set)",
    )
    ap.add_argument("--rows", default="", help="results: only the rows whose id contains this")
    ap.add_argument("--jobs", type=int, default=2, help="results: rows trained at once (default 2)")
    ap.add_argument(
        "--result-seeds",
        default="0",
        help="results: comma list of seeds, each row trained once per seed (default 0); with more than "
        "one, a row per command over its seeds: solved k/n, median (range) of the loss ratio and accuracy",
    )
    ap.add_argument("--gpu", action="store_true", help="run the train/profile benches on CUDA")
    ap.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="sweep bench: sampler seeds for hand-written vs 2 workers (default 3; --quick: 1)",
    )
    ap.add_argument(
        "--sweep-trials",
        type=int,
        default=None,
        help="sweep bench: the budget (default: the default sweep's n_trials); rows go to sweep_<N>",
    )
    ap.add_argument(
        "--sweep-modes",
        default="same points,TPE",
        help="sweep bench: comma list of 'same points', 'TPE' (default both)",
    )
    ap.add_argument(
        "--sweep-grid",
        default=None,
        help="sweep bench: instead of the comparison with the hand-written sweep, 'W:K:N[:S],...': pipeline "
        "sweep with W workers, trials_per_worker K, n_trials N, on the same points (GPU workers on a CUDA "
        "machine); with S, stopped (SIGTERM) after S seconds and rated by the trials finished by then; "
        "rows go to sweep_grid",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="where to write the raw rows (default benchmarks/results.json; with --quick "
        f"{QUICK_OUT}, git-ignored: a smoke check of the harness never replaces the measured rows the "
        "README's tables cite)",
    )
    args = ap.parse_args()
    modes = _sweep_modes(ap, args)
    result_seeds = _result_seeds(ap, args)
    import torch

    which = set(args.only.split(","))
    cpu = platform.processor() or platform.machine()
    print(
        f"# make bench  ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name(0) if args.gpu else f'CPU {cpu}, 1 thread/process'})\n"
    )
    results: dict[str, list[dict]] = {}
    if "train" in which:
        from .train_bench import throughput

        results["train"] = throughput(args.quick, "gpu" if args.gpu else "cpu")
        print(table(results["train"]) + "\n", flush=True)
    if "profile" in which:
        from .profile_bench import profile_cost

        results["profile"] = profile_cost(args.quick, "cuda" if args.gpu else "cpu")
        print(table(results["profile"]) + "\n", flush=True)
    if "remedy" in which:
        from .remedy_bench import remedy_cost

        results["remedy"] = remedy_cost(args.quick, "cuda" if args.gpu else "cpu")
        print(table(results["remedy"]) + "\n", flush=True)
    if "scan" in which:  # the modern cells' training paths over time (CPU only: see scan_bench)
        from .scan_bench import scan_cost

        results["scan"] = scan_cost(args.quick)
        print(table(results["scan"]) + "\n", flush=True)
    if "stack" in which:  # batched trials' kernels: README, "Batched trials"
        from .stack_bench import run as stack_run
        from .stack_bench import run_gpu as stack_run_gpu

        results["stack"] = stack_run_gpu(args.quick) if args.gpu else stack_run(args.quick)
        print(table(results["stack"]) + "\n", flush=True)
    if "store" in which:  # the sqlite MLflow store under many writers: README, "Batched trials"
        from .store_bench import run as store_run

        results["store"] = store_run(args.quick)
        print(table(results["store"]) + "\n", flush=True)
    if "sweep" in which:
        _sweep(args, modes, results)
    if "results" in which:
        from .results_table import markdown
        from .results_table import run as results_run

        results["results"] = results_run(args.rows, args.jobs, seeds=result_seeds)
        print(markdown(results["results"]) + "\n", flush=True)
    out = Path(args.out or (QUICK_OUT if args.quick else "benchmarks/results.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.gpu:  # GPU rows sit beside the CPU ones: {"train": ..., "gpu": {"device": ..., "train": ...}}
        results = {"gpu": {"device": torch.cuda.get_device_name(0), **results}}
    old = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps(merge(old, results), indent=2))  # keeps the rows of benches not run now
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
