"""The public record's vocabulary, in one place: cells, regimes, parameter groups, tag keys and values.

These names are part of the product (README, "The MLflow record" and "Configuration reference"): a
store written by one version is read by the next, so a name here changes only with a migration note.
Stdlib only, no imports: every stage reads it.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------------------------- cells

# model.cell values. Vanilla cells have one recurrent matrix and h_t = phi(W h_{t-1} + U x_t + b), so
# Pascanu's bound (Pascanu et al. 2013, eq. 7) is a theorem for them; gated cells carry gates.
VANILLA_CELLS = ("tanh", "relu", "orthogonal", "indrnn")
GATED_CELLS = ("lstm", "gru")
# --- modern diagonal linear recurrences (lru, mingru) ---
# A family of their own: h_t = a_t * h_{t-1} + b_t elementwise, so dh_t/dh_{t-1} = diag(a_t) exactly.
# lru (Orvieto et al. 2023): a_t = lambda, constant and complex; phi is the identity, so Pascanu's bound
# with gamma = 1 and sigma_max = max|lambda| is a theorem (and tight when every |lambda_j| is equal).
# mingru (Feng et al. 2024): a_t = 1 - z_t with z_t from x_t alone; no recurrent matrix, so the bound is
# replaced by the data-dependent spectral/gate_log10_bound (README, "Models").
DIAGONAL_CELLS = ("lru", "mingru")
# lem (Rusch, Erichson, Mahoney 2022): two coupled states (y, z) with learned per-unit time steps; cornn
# (Rusch & Mishra 2021): a damped oscillator y'' = tanh(...) - gamma y - epsilon y'. Their Jacobians are
# full 2H x 2H matrices, bounded by the product of their exact norms (spectral/jacobian_log10_bound).
ODE_CELLS = ("lem", "cornn")
# --- end modern cells ---
CELLS = ("tanh", "relu", "lstm", "gru", "orthogonal", "indrnn", *DIAGONAL_CELLS, *ODE_CELLS)
# Gate blocks of the fused weight matrices, in torch's row order (nn.LSTM: i f g o; nn.GRU: r z n;
# the twin's minGRU input weights: z then the candidate h~).
GATE_NAMES: dict[str, tuple[str, ...]] = {
    "lstm": ("i", "f", "g", "o"),
    "gru": ("r", "z", "n"),
    "mingru": ("z", "h"),
    "lem": ("dtz", "dty", "z", "y"),  # the input's blocks V1 (z's step), V2 (y's step), Vz, Vy
}
GATE_COUNT: dict[str, int] = {c: len(GATE_NAMES.get(c, ("h",))) for c in CELLS}

# Parameter groups whose gradient norms are logged as grad/norm_<group> (README, "Metrics").
GROUPS = ("input", "recurrent", "bias", "readout")

# --------------------------------------------------------------------------------------------- regimes

VANISHING, HEALTHY, EXPLODING, DIVERGED = "vanishing", "healthy", "exploding", "diverged"
REGIMES = (VANISHING, HEALTHY, EXPLODING, DIVERGED)  # the verdict's values (README, "Regime verdict")
UNKNOWN = "unknown"  # a run without a verdict (killed before its first profile)

# ------------------------------------------------------------------------------------------------ tags

KIND = "pipeline.kind"  # what a run is: one of the KIND_* values
KIND_SWEEP, KIND_TRIAL, KIND_REGRESSION = "sweep", "trial", "regression"
STUDY = "study"  # the Optuna study of a sweep parent or trial
TRIAL_NUMBER = "trial_number"  # the Optuna trial number of a trial run
REGIME = "regime"  # the final verdict of a training run
STATUS = "status"  # how a run ended beyond MLflow's status (killed, diverged, ...)
OVERRIDES = "overrides"  # the command line's dotted overrides, as given
SUITE, ENTRY, ROLE = "suite", "entry", "regression_role"  # regression runs: ROLE is "suite" or "entry"
PERTURBATION = "perturbation"  # a regression entry rerun under a perturbation (--update-baseline)
OWNER = "pipeline.owner"  # host|pid|start time|process space of the process of a regress run or trial run (pipeline.provenance)
HEARTBEAT = "pipeline.heartbeat"  # a command-line regress parent run: unix time of its process's last beat
NONFINITE_PREFIX = "nonfinite."  # nonfinite.<metric> = nan: a NaN metric value (README, "The MLflow record")

# MLflow's own system tags (mlflow.utils.mlflow_tags), which the fluent API's run-context providers set
# and the UI shows (the run's User, Source and Description); we set them ourselves (pipeline/tracking.py).
MLFLOW_USER = "mlflow.user"
MLFLOW_SOURCE_NAME = "mlflow.source.name"
MLFLOW_SOURCE_TYPE = "mlflow.source.type"
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
MLFLOW_GIT_BRANCH = "mlflow.source.git.branch"
MLFLOW_NOTE = "mlflow.note.content"  # the run's description (Markdown) on its Overview page
SOURCE_TYPE_LOCAL = "LOCAL"  # mlflow.entities.SourceType.LOCAL: a run started by a local process


def quoted(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter. MLflow's grammar has no escape: a study
    named ``bob's`` in single quotes with a backslash matched nothing (its report was empty and the end
    of its sweep closed nothing); double quotes hold a single quote (tests/test_outages.py)."""
    return f'"{value}"' if "'" in value and '"' not in value else f"'{value}'"
