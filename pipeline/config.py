"""Typed configuration: YAML (safe-loaded) + dotted overrides, validated into dataclasses.

Every key a user may set is a field below, with its default and a one-line doc. Unknown keys, wrong
types and out-of-range values raise :class:`ConfigError`, whose message names the key and what is
allowed; the CLI prints it as one line and exits 2 before anything is written to any store.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value; ``str(err)`` is the one-line message shown to users."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}" if key else message)


class StoreError(ConfigError):
    """A store (MLflow database or server, Optuna journal) that cannot be opened or read: one line naming it.

    A ConfigError, so every entry point prints it as one line and exits 2 (README "Commands")."""

    def __init__(self, store: str, problem: str, remedy: str):
        self.store = store
        super().__init__("", f"{store}: {problem}; {remedy}")


TASKS = ("adding", "copy", "temporal_order")
CELLS = ("tanh", "relu", "lstm", "gru", "orthogonal", "indrnn")
INITS = ("default", "gaussian", "orthogonal", "identity")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
CLIP_MODES = ("none", "norm", "value")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")

# Upper bounds of integer keys (README "Configuration reference"). Sizes (batch, val_size, probe_size,
# seq_len, hidden_size) are bounded by the memory estimate of the machine that runs (pipeline.training.budget).
SEED_MAX = 2**64 - 3  # torch.Generator.manual_seed takes an unsigned 64-bit seed; seed + 2 seeds the probe
STEPS_MAX = 2**63 - 1  # the training stream's len() is a C ssize_t (OverflowError beyond); Lightning counts in int64
THREADS_MAX = 1024  # more intra-op threads than any machine's cores only oversubscribes them


@dataclass
class TaskConfig:
    name: str = "adding"  # adding | copy | temporal_order (README, "Tasks")
    seq_len: int = 50  # T: sequence length (copy: T blanks between symbols and recall, total T+20)
    batch_size: int = 50  # training batch size; batches are generated on the device each step
    val_size: int = 500  # size of the fixed validation set (seed + 1)


@dataclass
class ModelConfig:
    cell: str = "tanh"  # tanh | relu | lstm | gru | orthogonal (expRNN) | indrnn (IndRNN)
    hidden_size: int = 64  # H
    init: str = "default"  # recurrent-weight init: default | gaussian | orthogonal | identity
    init_scale: float = 1.0  # g: gaussian N(0, g^2/H); orthogonal g*Q; identity g*I (IRNN)
    forget_bias: float = 1.0  # LSTM forget-gate bias (b_ih + b_hh of the f gate); Gers 2000, Jozefowicz 2015
    init_ulp_seed: int = 0  # > 0: nudge every initial weight by one float32 ulp, signs drawn from this seed


@dataclass
class OptimConfig:
    name: str = "adam"  # sgd | adam | rmsprop
    lr: float = 1e-3  # learning rate (> 0)
    momentum: float = 0.0  # sgd / rmsprop momentum in [0, 1)
    weight_decay: float = 0.0  # L2 penalty (>= 0)


@dataclass
class ClipConfig:
    mode: str = "none"  # none | norm (Pascanu 2013 Alg. 1, global norm) | value (element-wise clamp)
    threshold: float = 1.0  # c: the norm (mode=norm) or absolute value (mode=value) to clip at


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # optimizer steps
    accelerator: str = "auto"  # auto | cpu | gpu
    val_every: int = 100  # validate every N steps (and at the end)
    log_every: int = 10  # send step metrics to MLflow every N steps (computed every step on device)
    threads: int = 1  # intra-op threads per process on CPU (1 is 3-30x faster for small RNNs)
    progress_bar: bool = False  # Lightning's per-step bar (off: sweeps show their own progress)


@dataclass
class DiagnosticsConfig:
    profile_every: int = 100  # BPTT profile + spectra every N steps (0: only at start and end)
    probe_size: int = 32  # fixed probe batch for the profile (seed + 2)
    horizon_decades: float = 3.0  # gradient horizon: steps back until ||dL/dh_t|| < 10^-d ||dL/dh_T||
    # Verdict thresholds in decades per step (bptt/log10_ratio_per_step), so they mean the same at any T:
    # -0.03 = 3 decades lost per 100 steps (README, "Regime verdict").
    vanish_log10_per_step: float = -0.03  # vanishing if every gradient path decays faster than this
    explode_log10_per_step: float = 0.03  # exploding if any gradient path grows faster than this ...
    explode_norm: float = 1000.0  # ... or if the max pre-clip gradient norm over training exceeds this
    plots: bool = True  # write plots/bptt_profile.png and plots/grad_norms.png
    reference_check: bool = False  # also compute the profile by an independent recursion: bptt/reference_max_err


@dataclass
class TrackingConfig:
    uri: str | None = None  # MLflow tracking URI; None: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "rnn-gradients"  # MLflow experiment name
    run_name: str | None = None  # None: <task>-T<T>-<cell>-<init>-g<g>-lr<lr>-s<seed>-<HHMMSS>-<4 hex>
    enabled: bool = True  # false: train without recording (tests, benchmarks)


@dataclass
class Config:
    seed: int = 0  # seeds data (seed, seed+1 val, seed+2 probe) and weights
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Flattened ``{"task.name": ..., ...}``: the MLflow params and the sweep's key space."""
        return flatten(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------- loading


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(key, f"'{p}' is a value, not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-2", "model.cell=lstm"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(item, "override must look like dotted.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(item, "override has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        set_dotted(out, key, value)
    return out


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def as_mapping(v: Any, key: str) -> dict[str, Any]:
    """A YAML section that must be a mapping (``None`` reads as empty); else a ConfigError naming ``key``."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(key, f"must be a mapping, got {v!r}")
    return v


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("", f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError("", f"{p}: invalid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{p}: top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                patch: dict[str, Any] | None = None) -> Config:
    """YAML file (optional) + nested patch + dotted overrides -> validated :class:`Config`."""
    data = read_yaml(path) if path is not None else {}
    if patch:
        data = deep_merge(data, patch)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    return from_dict(data)


def from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, args[0], value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML 1.1 reads "1e-3" as a string
                except ValueError:
                    pass
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip("."), f"must be a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = prefix.rstrip(".") or "top level"
            raise ConfigError(f"{prefix}{k}", f"unknown key (allowed in {where}: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name] if data[f.name] is not None else {}, key + ".")
        else:
            kwargs[f.name] = _coerce(key, tp, data[f.name])
    return cls(**kwargs)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"unknown value {value!r} (allowed: {', '.join(allowed)})")


def _check(key: str, ok: bool, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(key, f"must be {what}, got {value!r}")


def validate(cfg: Config) -> None:
    """Range and choice checks; raises :class:`ConfigError` naming the first bad key."""
    t, m, o, c, tr, d = cfg.task, cfg.model, cfg.optim, cfg.clip, cfg.trainer, cfg.diagnostics
    _check("seed", 0 <= cfg.seed <= SEED_MAX, f"in [0, {SEED_MAX}] (2^64 - 3)", cfg.seed)
    _choice("task.name", t.name, TASKS)
    _check("task.seq_len", t.seq_len >= 2, ">= 2", t.seq_len)
    _check("task.batch_size", t.batch_size >= 1, ">= 1", t.batch_size)
    _check("task.val_size", t.val_size >= 1, ">= 1", t.val_size)
    if t.name == "temporal_order":
        _check("task.seq_len", t.seq_len >= 10, ">= 10 for temporal_order", t.seq_len)
    _choice("model.cell", m.cell, CELLS)
    _check("model.hidden_size", m.hidden_size >= 1, ">= 1", m.hidden_size)
    _choice("model.init", m.init, INITS)
    _check("model.init_scale", math.isfinite(m.init_scale) and m.init_scale > 0, "a finite number > 0",
           m.init_scale)
    _check("model.forget_bias", math.isfinite(m.forget_bias), "finite", m.forget_bias)
    _check("model.init_ulp_seed", m.init_ulp_seed >= 0, ">= 0", m.init_ulp_seed)
    _choice("optim.name", o.name, OPTIMIZERS)
    _check("optim.lr", math.isfinite(o.lr) and o.lr > 0, "a finite number > 0", o.lr)
    _check("optim.momentum", 0.0 <= o.momentum < 1.0, "in [0, 1)", o.momentum)
    _check("optim.weight_decay", o.weight_decay >= 0, ">= 0", o.weight_decay)
    _choice("clip.mode", c.mode, CLIP_MODES)
    _check("clip.threshold", math.isfinite(c.threshold) and c.threshold > 0, "a finite number > 0",
           c.threshold)
    steps = f"<= {STEPS_MAX} (2^63 - 1)"
    _check("trainer.max_steps", 1 <= tr.max_steps <= STEPS_MAX, f">= 1 and {steps}", tr.max_steps)
    _choice("trainer.accelerator", tr.accelerator, ACCELERATORS)
    _check("trainer.val_every", 1 <= tr.val_every <= STEPS_MAX, f">= 1 and {steps}", tr.val_every)
    _check("trainer.log_every", 1 <= tr.log_every <= STEPS_MAX, f">= 1 and {steps}", tr.log_every)
    _check("trainer.threads", 1 <= tr.threads <= THREADS_MAX, f"in [1, {THREADS_MAX}]", tr.threads)
    _check("diagnostics.profile_every", 0 <= d.profile_every <= STEPS_MAX, f">= 0 and {steps}", d.profile_every)
    _check("diagnostics.probe_size", d.probe_size >= 1, ">= 1", d.probe_size)
    _check("diagnostics.horizon_decades", d.horizon_decades > 0, "> 0", d.horizon_decades)
    _check("diagnostics.vanish_log10_per_step", d.vanish_log10_per_step < 0, "< 0", d.vanish_log10_per_step)
    _check("diagnostics.explode_log10_per_step", d.explode_log10_per_step > 0, "> 0", d.explode_log10_per_step)
    _check("diagnostics.explode_norm", d.explode_norm > 0, "> 0", d.explode_norm)
    _check("tracking.experiment", bool(cfg.tracking.experiment.strip()), "a non-empty name",
           cfg.tracking.experiment)


def config_keys() -> list[str]:
    """Every dotted key a config may set (for sweep-space validation)."""
    return list(Config().flat().keys())
