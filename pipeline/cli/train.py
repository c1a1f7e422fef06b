"""``python -m pipeline train [--config FILE|NAME] [--print-config] [dotted.key=value ...]``,
``python -m pipeline train --resume RUN_ID [tracking.uri=URI]``.

``--config`` takes a path or the name of a shipped config (``smoke`` -> ``configs/train/smoke.yaml``;
:mod:`pipeline.presets`); without it the documented defaults train (README, "Configuration reference").
"""

from __future__ import annotations

import argparse
import math
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        help="training YAML: a path, or the name of a shipped config (smoke, vanishing_tanh, ...: "
        "configs/train/NAME.yaml); default: the documented defaults",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (file + overrides, validated) as YAML and exit without training",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_ID",
        help="continue a killed or failed run from its last checkpoint (checkpoints/last.ckpt), in the same "
        "MLflow run, with its own config; takes no --config and no override but tracking.uri=URI",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.cell=lstm")


def _resume_config(args: argparse.Namespace):
    """The run's own config (``--resume``): overrides are refused but ``tracking.uri``, where the run is."""
    from pipeline.schema import ConfigError

    if args.config is not None:
        raise ConfigError("", "--resume takes no --config: a resumed run trains its own config.yaml")
    uri = None
    for item in args.overrides or []:
        key, _, value = item.partition("=")
        if key.strip() != "tracking.uri" or not value.strip():
            raise ConfigError(
                "",
                "--resume takes no overrides but tracking.uri=URI: a resumed run trains its own config.yaml",
            )
        uri = value.strip()
    from pipeline.training.saved import resume_config

    return resume_config(args.resume, uri)


def command(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.presets import resolve

    if args.resume is not None:
        cfg = _resume_config(args)
    else:
        path = resolve(args.config, "train") if args.config is not None else None
        cfg = load_config(path, args.overrides)  # validated before anything is written
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from pipeline.cell_keys import unused_model_keys

    for note in unused_model_keys(cfg.model):
        print(f"note: {note}", file=sys.stderr)
    from pipeline.tracking import RUN_NAME_MAX

    name = cfg.tracking.run_name
    if cfg.tracking.enabled and name is not None and len(name) > RUN_NAME_MAX:
        print(
            f"note: tracking.run_name has {len(name)} characters; the run is named by its first {RUN_NAME_MAX}"
            " (MLflow's limit on run names)",
            file=sys.stderr,
        )
    from pipeline.training.budget import check_fits
    from pipeline.training.machine import check_accelerator, check_data

    check_accelerator(cfg)  # a GPU asked for where there is none: one line, before any store is opened
    check_data(cfg)  # a real-data task's file missing or broken: the same
    check_fits(
        cfg
    )  # refuses what cannot fit in memory, before anything is allocated (README "Memory estimate")
    from pipeline.store_checks import probe_store
    from pipeline.tracking import ensure_experiment
    from pipeline.uris import display_url, resolve_uri, ui_command

    if cfg.tracking.enabled:
        probe_store(cfg.tracking.uri)  # a corrupt or unreachable store: one line, exit 2, nothing written
    from pipeline.training.run import run

    if cfg.tracking.enabled:
        ensure_experiment(cfg.tracking.uri, cfg.tracking.experiment)
    # One line per validation (training/progress.py); a checkpoint at each (training/saved.py).
    r = run(cfg, progress=True, checkpoint=True, resume=args.resume)
    ratio = r.val_loss_ratio
    of_baseline = f" (x{ratio:.4g} of baseline)" if ratio is not None and math.isfinite(ratio) else ""
    val = f"{r.val_loss:.4g}" if r.val_loss is not None else "n/a"
    acc = r.metrics.get("val/accuracy")
    print(
        f"run {r.run_id or '(not recorded: tracking.enabled=false)'}: regime={r.regime} val/loss={val}{of_baseline}"
        + (f" val/accuracy={acc:.3f}" if acc is not None else "")
        + f" solved={r.solved}"
        + (f" diverged at step {r.diverged_step}" if r.diverged_step is not None else "")
        + f" steps={r.steps}"
    )
    m = r.metrics
    if "bptt/log10_ratio" in m:
        # mingru has no recurrent matrix, lem no Pascanu bound: their bounds on the ratio stand where
        # sigma_max would
        bounds = ("spectral/gate_log10_bound", "spectral/jacobian_log10_bound")
        bound = next((b for b in bounds if b in m), "spectral/sigma_max")
        print(
            f"  bptt/log10_ratio={m['bptt/log10_ratio']:.2f} bptt/decay_rate={m['bptt/decay_rate']:.4f}"
            f" {bound}={m.get(bound, float('nan')):.4g}"
            f" grad/clip_rate={m['grad/clip_rate']:.3f}"
        )
    if cfg.tracking.enabled:
        uri = resolve_uri(cfg.tracking.uri)
        print(f"  store: {display_url(uri)}  (review: {ui_command(uri)})")
    return 0
