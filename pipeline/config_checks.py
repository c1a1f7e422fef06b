"""The range and choice checks of a :class:`~pipeline.config.Config`, section by section: a value the
typed builder took but the run cannot use raises :class:`~pipeline.schema.ConfigError` naming the key and
what is allowed (README, "Configuration"). Apart from the sections they check (:mod:`pipeline.config`),
so that each of the two reads as one thing; ``diagnostics``' checks also serve
``BPTTProfileMonitor(diagnostics=...)`` on a user's own module.
"""

from __future__ import annotations

import importlib.util
import math

from pipeline.config import (
    ACCELERATORS,
    CLIP_MODES,
    DIGITS_SEQ_LEN,
    DIGITS_VAL_SIZE,
    INITS,
    OPTIMIZERS,
    SEED_MAX,
    SKIP_SIGNALS,
    STEPS_MAX,
    TASKS,
    THREADS_MAX,
    ULP_SEED_MAX,
    Config,
    DiagnosticsConfig,
    ModelConfig,
    TaskConfig,
)
from pipeline.names import CELLS
from pipeline.schema import ConfigError, build, check, choice


def _validate_task(t: TaskConfig) -> None:
    choice("task.name", t.name, TASKS)
    check("task.seq_len", t.seq_len >= 2, ">= 2", t.seq_len)
    check("task.batch_size", t.batch_size >= 1, ">= 1", t.batch_size)
    check("task.val_size", t.val_size >= 1, ">= 1", t.val_size)
    if t.name == "temporal_order":
        check("task.seq_len", t.seq_len >= 10, ">= 10 for temporal_order", t.seq_len)
    if t.name == "digits":
        check(
            "task.seq_len", t.seq_len == DIGITS_SEQ_LEN, "64 for digits (8x8 pixels, one a step)", t.seq_len
        )
        lo, hi = DIGITS_VAL_SIZE
        what = (
            f"in [{lo}, {hi}] for digits (the held-out images: one per class at least, half of them at most)"
        )
        check("task.val_size", lo <= t.val_size <= hi, what, t.val_size)
    check("task.permute", not t.permute or t.name == "digits", "false unless task.name is digits", t.permute)


EXPERIMENT_NAME_MAX = 500  # MLflow: MAX_EXPERIMENT_NAME_LENGTH


def _max_len(key: str, value: str, limit: int, what: str) -> None:
    """At most ``limit`` characters, else one line giving the length (not the long value itself)."""
    if len(value) > limit:
        raise ConfigError(
            key, f"must be at most {limit} characters (MLflow's limit on {what}), got {len(value)}"
        )


def validate_diagnostics(d: DiagnosticsConfig) -> None:
    """The ``diagnostics`` section's checks, shared by a config and by ``BPTTProfileMonitor(diagnostics=...)``
    on a user's own module (which took a verdict threshold the config refuses, a walkthrough): raises
    :class:`ConfigError` naming the first bad key."""
    steps = f"<= {STEPS_MAX} (2^63 - 1)"
    check(
        "diagnostics.profile_every", 0 <= d.profile_every <= STEPS_MAX, f">= 0 and {steps}", d.profile_every
    )
    check("diagnostics.probe_size", d.probe_size >= 1, ">= 1", d.probe_size)
    check(
        "diagnostics.horizon_decades",
        math.isfinite(d.horizon_decades) and d.horizon_decades > 0,
        "a finite number > 0",
        d.horizon_decades,
    )
    check("diagnostics.vanish_log10_per_step", d.vanish_log10_per_step < 0, "< 0", d.vanish_log10_per_step)
    check("diagnostics.explode_log10_per_step", d.explode_log10_per_step > 0, "> 0", d.explode_log10_per_step)
    check("diagnostics.explode_norm", d.explode_norm > 0, "> 0", d.explode_norm)


def checked_diagnostics(d: DiagnosticsConfig) -> DiagnosticsConfig:
    """A ``DiagnosticsConfig`` made in Python (``BPTTProfileMonitor(diagnostics=...)``), read as the config
    reads the section: each value's type (``probe_size=2.5``, ``plots='yes'`` went through, a string
    threshold failed with a TypeError inside the checks: a new-user walkthrough), then
    :func:`validate_diagnostics`. Returns it as the config would hold it (``explode_norm=1000`` a float)."""
    import dataclasses

    values = {f.name: getattr(d, f.name) for f in dataclasses.fields(d)}
    typed = build(DiagnosticsConfig, values, "diagnostics.")
    validate_diagnostics(typed)
    return typed


def validate(cfg: Config) -> None:
    """Range and choice checks; raises :class:`ConfigError` naming the first bad key."""
    t, m, o, c, tr, d = cfg.task, cfg.model, cfg.optim, cfg.clip, cfg.trainer, cfg.diagnostics
    check("seed", 0 <= cfg.seed <= SEED_MAX, f"in [0, {SEED_MAX}] (2^64 - 3)", cfg.seed)
    _validate_task(t)
    choice("model.cell", m.cell, CELLS)
    check("model.hidden_size", m.hidden_size >= 1, ">= 1", m.hidden_size)
    choice("model.init", m.init, INITS)
    check(
        "model.init_scale",
        math.isfinite(m.init_scale) and m.init_scale > 0,
        "a finite number > 0",
        m.init_scale,
    )
    check("model.forget_bias", math.isfinite(m.forget_bias), "finite", m.forget_bias)
    check(  # torch.Generator.manual_seed takes an unsigned 64-bit seed (OverflowError beyond, mid-run)
        "model.init_ulp_seed",
        0 <= m.init_ulp_seed <= ULP_SEED_MAX,
        f"in [0, {ULP_SEED_MAX}] (2^64 - 1)",
        m.init_ulp_seed,
    )
    _validate_diagonal(m)
    choice("optim.name", o.name, OPTIMIZERS)
    check("optim.lr", math.isfinite(o.lr) and o.lr > 0, "a finite number > 0", o.lr)
    check("optim.momentum", 0.0 <= o.momentum < 1.0, "in [0, 1)", o.momentum)
    check(
        "optim.weight_decay",
        math.isfinite(o.weight_decay) and o.weight_decay >= 0,
        "a finite number >= 0",
        o.weight_decay,
    )
    choice("clip.mode", c.mode, CLIP_MODES)
    check(
        "clip.threshold", math.isfinite(c.threshold) and c.threshold > 0, "a finite number > 0", c.threshold
    )
    steps = f"<= {STEPS_MAX} (2^63 - 1)"
    check("trainer.max_steps", 1 <= tr.max_steps <= STEPS_MAX, f">= 1 and {steps}", tr.max_steps)
    choice("trainer.accelerator", tr.accelerator, ACCELERATORS)
    check("trainer.val_every", 1 <= tr.val_every <= STEPS_MAX, f">= 1 and {steps}", tr.val_every)
    check("trainer.log_every", 1 <= tr.log_every <= STEPS_MAX, f">= 1 and {steps}", tr.log_every)
    check("trainer.threads", 1 <= tr.threads <= THREADS_MAX, f"in [1, {THREADS_MAX}]", tr.threads)
    validate_diagnostics(d)
    _validate_remedy(cfg)
    check(
        "tracking.experiment",
        bool(cfg.tracking.experiment.strip()),
        "a non-empty name",
        cfg.tracking.experiment,
    )
    # MLflow's limits (mlflow/utils/validation.py MAX_EXPERIMENT_NAME_LENGTH; the runs.name column is
    # VARCHAR(250) in its SQL schema): beyond them MLflow raised a traceback after mlflow.db was written
    # (found by a fuzzing review)
    _max_len("tracking.experiment", cfg.tracking.experiment, EXPERIMENT_NAME_MAX, "experiment names")
    if cfg.tracking.system_metrics and cfg.tracking.enabled and importlib.util.find_spec("psutil") is None:
        raise ConfigError(
            "tracking.system_metrics",
            "needs psutil, which is not installed: pip install 'rnn-gradient-pipeline[system-metrics]'",
        )


def _validate_remedy(cfg: Config) -> None:
    r, f, s = cfg.remedy, cfg.remedy.floss, cfg.remedy.skip
    steps = f"<= {STEPS_MAX} (2^63 - 1)"
    check("remedy.omega", math.isfinite(r.omega) and r.omega >= 0, "a finite number >= 0", r.omega)
    check("remedy.floss.weight", math.isfinite(f.weight) and f.weight >= 0, "a finite number >= 0", f.weight)
    # (h, c) for LSTM, (y, z) for lem and cornn; lru's N complex channels are 2N real numbers (Re, Im)
    state = cfg.model.hidden_size * (2 if cfg.model.cell in ("lstm", "lem", "cornn", "lru") else 1)
    check(
        "remedy.floss.exponents", 1 <= f.exponents <= state, f"in [1, {state}] (the state size)", f.exponents
    )
    check("remedy.floss.every", 1 <= f.every <= STEPS_MAX, f">= 1 and {steps}", f.every)
    check(
        "remedy.floss.until",
        f.until is None or 1 <= f.until <= STEPS_MAX,
        f"null, or >= 1 and {steps}",
        f.until,
    )
    check("remedy.floss.batch", f.batch >= 1, ">= 1", f.batch)
    if f.weight > 0:  # the trajectories are the training batch's first sequences
        b = cfg.task.batch_size
        check("remedy.floss.batch", f.batch <= b, f"<= task.batch_size ({b})", f.batch)
    check("remedy.skip.zscore", math.isfinite(s.zscore) and s.zscore >= 0, "a finite number >= 0", s.zscore)
    check("remedy.skip.window", 2 <= s.window <= 1_000_000, "in [2, 1000000]", s.window)
    check(
        "remedy.skip.warmup", 2 <= s.warmup <= s.window, f"in [2, {s.window}] (remedy.skip.window)", s.warmup
    )
    choice("remedy.skip.signal", s.signal, SKIP_SIGNALS)
    check("remedy.skip.max_consecutive", s.max_consecutive >= 1, ">= 1", s.max_consecutive)


def _validate_diagonal(m: ModelConfig) -> None:
    """The lru ring and lem's dt (checked for every cell: a bad value fails the same way whatever the cell)
    and the modern cells' own inits: lru sets lambda by the ring, mingru keeps nn.Linear's init, lem its
    authors' uniform init, so ``model.init`` (a W_hh scheme) must stay ``default``."""
    check("model.r_max", 0.0 < m.r_max < 1.0, "in (0, 1)", m.r_max)
    check("model.r_min", 0.0 <= m.r_min <= m.r_max, f"in [0, model.r_max = {m.r_max}]", m.r_min)
    check("model.max_phase", 0.0 < m.max_phase <= 2 * math.pi, "in (0, 2 pi]", m.max_phase)
    check("model.dt", 0.0 < m.dt <= 1.0, "in (0, 1] (lem's and cornn's time step)", m.dt)
    check("model.gamma", math.isfinite(m.gamma) and m.gamma >= 0, "a finite number >= 0 (cornn)", m.gamma)
    check(
        "model.epsilon",
        math.isfinite(m.epsilon) and m.epsilon >= 0,
        "a finite number >= 0 (cornn)",
        m.epsilon,
    )
    why = {
        "lru": "lru has no W_hh: its lambda is set by model.r_min, model.r_max, model.max_phase",
        "mingru": "mingru has no W_hh: its gates keep nn.Linear's init",
        "lem": "lem keeps its authors' init, U(-1/sqrt(H), 1/sqrt(H)) for every weight",
        "cornn": "cornn keeps its authors' init, nn.Linear's over [u, z, y]",
    }
    if m.cell in why:
        check("model.init", m.init == "default", f"'default' ({why[m.cell]})", m.init)
