"""rnn-gradient-pipeline: measure, compare and guard vanishing and exploding gradients in RNNs.

The folders are the stages, over a shared floor that imports no stage (README, "Project structure")::

    config, schema, names, uris,      the floor: typed configs and their builder, the public record's
    signals, tracking, plots,         names, store URLs, SIGTERM, the MLflow Recorder, shared drawings,
    presets                           the shipped example configs by name
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
