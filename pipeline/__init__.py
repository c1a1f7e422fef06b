"""rnn-gradient-pipeline: measure, compare and guard vanishing and exploding gradients in RNNs.

Stages, one module each: config, tasks, data, models, cells + bptt (the exact float64 diagnostics),
module (LightningModule), diagnostics (callbacks), tracking (MLflow), train (composition root),
sweep (Optuna), report, regression, cli. Importing the package is cheap: heavy libraries are
imported inside the functions that need them.
"""

__version__ = "0.1.0"
