"""The metric and tag names a regression suite may read (README, "The MLflow record"): its checks'
``metric`` and ``tag`` parameters and its entries' ``baseline:`` keys, checked when the suite is loaded,
before any run."""

from __future__ import annotations

import re
from typing import Any

from pipeline.names import ENTRY, KIND, ROLE, SUITE
from pipeline.schema import ConfigError

# Public metric names a check may read (README, "The MLflow record"); gate variants match METRIC_PATTERN.
KNOWN_METRICS = frozenset(
    {
        "train/loss",
        "val/loss",
        "val/loss_ratio",
        "val/accuracy",
        "val/best_loss",
        "task/baseline",
        "train/steps",
        "grad/norm_preclip",
        "grad/norm_postclip",
        "grad/clip_coef",
        "grad/clip_rate",
        "grad/max_norm_preclip",
        "grad/norm_input",
        "grad/norm_recurrent",
        "grad/norm_bias",
        "grad/norm_readout",
        "bptt/log10_ratio",
        "bptt/log10_ratio_per_step",
        "bptt/decay_rate",
        "bptt/horizon",
        "bptt/c_log10_ratio",
        "bptt/c_log10_ratio_per_step",
        "bptt/overflow_step",
        "bptt/reference_max_err",
        "spectral/sigma_max",
        "spectral/radius",
        "spectral/pascanu_log10_bound",
        "spectral/lyapunov_max",
        "train/skipped_steps",
        "remedy/omega",
        "remedy/floss",
        "spectral/gate_log10_bound",  # mingru's replacement for Pascanu's bound (README, "Models")
        "spectral/jacobian_log10_bound",  # lem's: the product of its exact step-Jacobian norms
        "bptt/lambda_log10_sensitivity",  # lru: Zucchet & Orvieto 2024 (README, "Regime verdict")
        "bptt/recurrent_log10_sensitivity",
    }
)
METRIC_PATTERN = re.compile(r"^spectral/(sigma_max|radius)_[a-z]+$|^remedy/floss_lambda_[1-9][0-9]*$")


def check_metric(key: str, name: Any) -> str:
    if not isinstance(name, str) or not (name in KNOWN_METRICS or METRIC_PATTERN.match(name)):
        raise ConfigError(key, f"unknown metric {name!r} (known: {', '.join(sorted(KNOWN_METRICS))})")
    return name


# Tags an entry's run records (README, "The MLflow record", Tags, and "What is recorded" under "Regression
# suites"), which tag_equals may read; nonfinite.*, version.* and mlflow.* match TAG_PATTERN. A misspelt
# one ("regim") read as absent after every entry had trained, a law violated, and the suite "REGRESSION"
# (a real-data walkthrough).
KNOWN_TAGS = frozenset(
    {
        KIND,  # an entry run's own (README, "What is recorded")
        SUITE,
        ENTRY,
        ROLE,
        "task",
        "cell",
        "init",
        "regime",
        "regime_init",
        "regime_reason",
        "diverged_step",
        "solved",
        "pruned",
        "status",
        "error",
        "resumed_at_step",
        "remedy",
        "skipped_steps",
        "git_commit",
        "overrides",
        "perturbation",
        "pipeline.owner",
        "regression_key",
        "regression_fingerprint",
    }
)
TAG_PATTERN = re.compile(r"^nonfinite\.\S+$|^version\.\S+$|^mlflow\.\S+$")


def check_tag(key: str, name: Any) -> str:
    if not isinstance(name, str) or not (name in KNOWN_TAGS or TAG_PATTERN.match(name)):
        known = ", ".join([*sorted(KNOWN_TAGS), "nonfinite.<metric>", "version.<package>", "mlflow.*"])
        raise ConfigError(key, f"unknown tag {name!r} (known: {known})")
    return name
