"""rnn-gradient-pipeline: measure, compare and guard vanishing and exploding gradients in RNNs.

The folders are the stages, over a shared floor that imports no stage (README, "Project structure")::

    config, config_checks, cell_keys, the floor: typed configs and their checks, the keys each cell reads,
    schema,                           their builder,
    names, uris, signals, tracking,   the public record's names, store URLs, SIGTERM, the MLflow Recorder,
    provenance, store_checks, plots,  a run's identity tags, store probes, shared drawings, the shipped
    presets                           configs by name
    cli/         front doors: python -m pipeline VERB (imports nothing heavy until a verb runs)
    training/    one run: tasks -> data -> model -> LightningModule -> callbacks -> Recorder -> Trainer
    bptt/        the exact float64 mathematics: twin cells, the profile, spectra and Lyapunov exponent
    sweep/       Optuna: typed sweep file, stores, parent supervisor, workers
    report/      the comparison report: one bulk read, figures, HTML / Markdown / CSV
    regression/  suites of seeded runs checked against laws and an accepted baseline

Importing the package is cheap: heavy libraries (torch, Lightning, MLflow, Optuna, pandas) are imported
inside the functions that need them, or by the stage modules a verb imports.
"""

__version__ = "0.1.0"

# The public API for a user's own LightningModule (README, "Your own model"), imported on first use so
# that ``import pipeline`` (and ``python -m pipeline --help``) stays free of torch and Lightning.
_LAZY = {
    "GradientNormMonitor": "pipeline.training.grad_monitor",
    "BPTTProfileMonitor": "pipeline.training.profile_monitor",
    "profile_rnn": "pipeline.training.probe",
    # BPTTProfileMonitor's verdict thresholds and horizon (``diagnostics=``), the config's section
    "DiagnosticsConfig": "pipeline.config",
    # A trained model back from its MLflow run (README, "Saved models and resuming").
    "load_run": "pipeline.training.saved",
    "LoadedRun": "pipeline.training.saved",
    # A search_runs frame with NaN and +-inf read back as the runs recorded them (README, "The MLflow record").
    "as_recorded": "pipeline.recorded",
}
__all__ = [
    "BPTTProfileMonitor",
    "DiagnosticsConfig",
    "GradientNormMonitor",
    "LoadedRun",
    "__version__",
    "as_recorded",
    "load_run",
    "profile_rnn",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
