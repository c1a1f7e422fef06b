"""Sweep configuration: a YAML file that names a base training config, a search space and a budget.

Validated like training configs, before anything touches a store: an unknown key, a bad range or an
empty choice list raises :class:`~pipeline.config.ConfigError` naming the key (the CLI prints one line
and exits 2). Light imports only (stdlib, yaml, pipeline.config): the CLI's ``--help`` must not pay
for torch, Optuna or MLflow.

Layout (every top-level key is optional except ``space``; defaults in :class:`SweepConfig`)::

    study: default                  # Optuna study name (also the MLflow tag `study`)
    storage: null                   # null: journal file optuna/<study>.journal; or postgresql://...
    n_trials: 24                    # budget: COMPLETE + PRUNED trials (diverged ones are COMPLETE)
    workers: auto                   # auto: one per visible GPU, else one per CPU core (max 4)
    base: configs/train/x.yaml      # or an inline training config mapping
    sampler: {name: tpe, seed: 0, n_startup_trials: 8}
    pruner: {name: median, n_startup_trials: 4, n_warmup_steps: 100}
    prune: {max_grad_norm: 1.0e6}   # gradient-health pruning bound on the pre-clip norm (null: off)
    penalty: 2.0                    # objective floor of a diverged trial (1.0 = learned nothing)
    heartbeat: {interval: 10, grace: 30}
    space:
      model.init_scale: {low: 0.25, high: 4.0, log: true}
      model.cell: {choices: [tanh, gru, lstm]}
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import STEPS_MAX, Config, config_keys, from_dict
from pipeline.schema import ConfigError, deep_merge, parse_overrides, read_yaml, set_dotted
from pipeline.uris import check_storage_url

SAMPLERS = ("tpe", "random")
# Upper bounds (README "Sweep file"): n_trials and start-up counts: the journal replays every record of
# every trial on each open, so 10^6 trials is already a journal of gigabytes; workers: processes on one
# machine; sampler.seed: numpy's RandomState takes 32-bit seeds (Optuna's samplers); heartbeat: a day,
# beyond which stale-trial detection means nothing (and datetime.timedelta overflows far beyond).
N_TRIALS_MAX = 10**6
WORKERS_MAX = 1024
SAMPLER_SEED_MAX = 2**32 - 1
HEARTBEAT_MAX = 86_400
PRUNERS = ("median", "hyperband", "none")
SPEC_KEYS = {"low", "high", "log", "step", "choices"}
TOP_KEYS = {"study", "storage", "n_trials", "workers", "base", "sampler", "pruner", "prune", "penalty",
            "heartbeat", "space", "timeout"}
# Keys a sweep must not search: they change where or whether a trial is recorded, not what it trains.
FORBIDDEN = ("tracking.", "trainer.accelerator", "trainer.progress_bar", "trainer.threads")


@dataclass
class Param:
    """One search dimension: ``kind`` float | int (``low``..``high``, optional ``log``/``step``) or categorical."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)


@dataclass
class SweepConfig:
    study: str = "default"
    storage: str | None = None  # None: the journal file optuna/<study>.journal (this machine)
    n_trials: int = 24
    workers: int | None = None  # None: auto (GPUs, else CPU cores, at most 4)
    timeout: float | None = None  # seconds; stop starting trials after this (None: no limit)
    base: dict[str, Any] = field(default_factory=dict)  # training config as a nested dict (validated)
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe", "seed": 0, "n_startup_trials": 8})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median", "n_startup_trials": 4,
                                                            "n_warmup_steps": 0})
    max_grad_norm: float | None = 1.0e6  # prune.max_grad_norm
    penalty: float = 2.0
    heartbeat_interval: int = 10
    heartbeat_grace: int = 30
    space: list[Param] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)  # the merged YAML, logged on the parent run

    def base_config(self) -> Config:
        return from_dict(copy.deepcopy(self.base))

    def trial_config(self, values: dict[str, Any]) -> Config:
        """The base config with the sampled values set (validated)."""
        data = copy.deepcopy(self.base)
        for k, v in values.items():
            set_dotted(data, k, v)
        return from_dict(data)

    def storage_url(self, override: str | None = None) -> str:
        from pipeline.uris import study_storage

        return study_storage(self.study, override or self.storage)


def _nest_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted or nested space keys -> one nested dict whose leaves are specs (so overrides merge)."""
    out: dict[str, Any] = {}
    for k, v in space.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not (set(v) & SPEC_KEYS):
            out = deep_merge(out, _nest_space(v, key + "."))
        else:
            nested: dict[str, Any] = {}
            set_dotted(nested, key, v)
            out = deep_merge(out, nested)
    return out


def _flat_space(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in nested.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not (set(v) & SPEC_KEYS):
            out.update(_flat_space(v, key + "."))
        else:
            out[key] = v
    return out


def _num(key: str, v: Any, what: str = "a number") -> float:
    if isinstance(v, str):
        try:
            v = float(v)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(key, f"must be {what}, got {v!r}")
    return float(v)


def _int(key: str, v: Any, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(key, f"must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise ConfigError(key, f"must be >= {lo}, got {v!r}")
    if hi is not None and v > hi:
        raise ConfigError(key, f"must be <= {hi}, got {v!r}")
    return v


def _param(key: str, spec: Any, base: dict[str, Any], types: dict[str, Any]) -> Param:
    where = f"space.{key}"
    if key not in types:
        raise ConfigError(where, "unknown config key (see `python -m pipeline train --help` / README)")
    if key.startswith(FORBIDDEN) or key in FORBIDDEN:
        raise ConfigError(where, "cannot be searched (it changes where or how a trial runs, not what it trains)")
    if not isinstance(spec, dict):
        raise ConfigError(where, "must be a mapping with low/high or choices")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}", f"unknown key (allowed: {', '.join(sorted(SPEC_KEYS))})")
    tp = types[key]
    if "choices" in spec:
        if set(spec) - {"choices"}:
            raise ConfigError(where, "choices cannot be combined with low/high/log/step")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.choices", "must be a non-empty list")
        if any(isinstance(c, (dict, list)) for c in choices):
            raise ConfigError(f"{where}.choices", "must hold scalars")
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{where}.choices", f"has duplicates: {choices!r}")
        p = Param(key, "categorical", choices=list(choices))
        probes = p.choices
    else:
        if "low" not in spec or "high" not in spec:
            raise ConfigError(where, "needs low and high (or choices)")
        if tp not in (int, float):
            raise ConfigError(where, f"is not numeric ({tp.__name__}): use choices")
        low, high = _num(f"{where}.low", spec["low"]), _num(f"{where}.high", spec["high"])
        if not low < high:
            raise ConfigError(where, f"low must be < high, got low={low:g} high={high:g}")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{where}.log", f"must be true or false, got {log!r}")
        if log and low <= 0:
            raise ConfigError(f"{where}.low", f"must be > 0 on a log scale, got {low:g}")
        step = spec.get("step")
        if step is not None:
            step = _num(f"{where}.step", step)
            if step <= 0:
                raise ConfigError(f"{where}.step", f"must be > 0, got {step:g}")
            if log:
                raise ConfigError(f"{where}.step", "cannot be combined with log: true")
        if tp is int:
            if not (low.is_integer() and high.is_integer()) or (step is not None and not step.is_integer()):
                raise ConfigError(where, "is an integer key: low, high and step must be integers")
            p = Param(key, "int", int(low), int(high), log, int(step) if step else None)
        else:
            p = Param(key, "float", low, high, log, step)
        probes = [p.low, p.high]
    for v in probes:  # every end of the range / every choice must make a valid training config
        data = copy.deepcopy(base)
        set_dotted(data, key, v)
        try:
            from_dict(data)
        except ConfigError as e:
            raise ConfigError(where, f"value {v!r} is not valid for the training config: {e}") from None
    return p


def _types() -> dict[str, Any]:
    import dataclasses
    import typing

    out: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        hints = typing.get_type_hints(Config)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = typing.get_type_hints(tp)
            for g in dataclasses.fields(tp):
                t = sub[g.name]
                args = [a for a in typing.get_args(t) if a is not type(None)]
                out[f"{f.name}.{g.name}"] = args[0] if args else t
        else:
            out[f.name] = tp
    assert set(out) == set(config_keys())
    return out


def _section(data: dict[str, Any], name: str, allowed: set[str]) -> dict[str, Any]:
    sec = data.get(name) or {}
    if not isinstance(sec, dict):
        raise ConfigError(name, f"must be a mapping, got {sec!r}")
    for k in sec:
        if k not in allowed:
            raise ConfigError(f"{name}.{k}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return sec


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read, merge overrides (``n_trials=4``, ``base.optim.lr=0.01``, ``space.optim.lr.high=0.1``), validate."""
    raw = read_yaml(path)
    over = parse_overrides(overrides or [])
    if isinstance(raw.get("space"), dict):
        raw["space"] = _nest_space(raw["space"])
    if isinstance(over.get("space"), dict):
        over["space"] = _nest_space(over["space"])
    base = raw.get("base", {})
    if isinstance(base, str):  # a path, relative to the sweep file (else the working directory)
        cand = Path(path).parent / base
        raw["base"] = read_yaml(cand if cand.is_file() else base)
    data = deep_merge(raw, over)
    for k in data:
        if k not in TOP_KEYS:
            raise ConfigError(k, f"unknown key (allowed in a sweep: {', '.join(sorted(TOP_KEYS))})")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError("base", "must be a path to a training config or a mapping")
    try:
        from_dict(copy.deepcopy(base))
    except ConfigError as e:
        raise ConfigError(f"base.{e.key}" if e.key else "base", str(e)) from None
    s = SweepConfig(base=base, source=data)
    s.study = str(data.get("study", s.study))
    if not s.study.strip() or any(c in s.study for c in "/\\ "):
        raise ConfigError("study", f"must be a non-empty name without '/', '\\' or spaces, got {s.study!r}")
    s.storage = data.get("storage")
    if s.storage is not None and (not isinstance(s.storage, str) or not s.storage.strip()):
        raise ConfigError("storage", f"must be a URL or a journal file path, got {s.storage!r}")
    if s.storage is not None:
        check_storage_url("storage", s.storage)
    s.n_trials = _int("n_trials", data.get("n_trials", s.n_trials), 1, N_TRIALS_MAX)
    w = data.get("workers", "auto")
    s.workers = None if w in (None, "auto") else _int("workers", w, 1, WORKERS_MAX)
    if data.get("timeout") is not None:
        s.timeout = _num("timeout", data["timeout"], "a number of seconds")
        if s.timeout <= 0:
            raise ConfigError("timeout", f"must be > 0 seconds or null (no limit), got {data['timeout']!r}")
    smp = _section(data, "sampler", {"name", "seed", "n_startup_trials", "multivariate"})
    s.sampler = {**s.sampler, **smp}
    if s.sampler["name"] not in SAMPLERS:
        raise ConfigError("sampler.name", f"unknown value {s.sampler['name']!r} (allowed: {', '.join(SAMPLERS)})")
    _int("sampler.seed", s.sampler.get("seed", 0), 0, SAMPLER_SEED_MAX)
    _int("sampler.n_startup_trials", s.sampler.get("n_startup_trials", 8), 0, N_TRIALS_MAX)
    prn = _section(data, "pruner", {"name", "n_startup_trials", "n_warmup_steps", "min_resource",
                                    "reduction_factor"})
    s.pruner = {**s.pruner, **prn}
    if s.pruner["name"] not in PRUNERS:
        raise ConfigError("pruner.name", f"unknown value {s.pruner['name']!r} (allowed: {', '.join(PRUNERS)})")
    _int("pruner.n_startup_trials", s.pruner.get("n_startup_trials", 0), 0, N_TRIALS_MAX)
    _int("pruner.n_warmup_steps", s.pruner.get("n_warmup_steps", 0), 0, STEPS_MAX)
    if "min_resource" in s.pruner:
        _int("pruner.min_resource", s.pruner["min_resource"], 1, STEPS_MAX)
    if "reduction_factor" in s.pruner:
        _int("pruner.reduction_factor", s.pruner["reduction_factor"], 2, STEPS_MAX)
    prune = _section(data, "prune", {"max_grad_norm"})
    if "max_grad_norm" in prune:
        v = prune["max_grad_norm"]
        s.max_grad_norm = None if v is None else _num("prune.max_grad_norm", v)
        if s.max_grad_norm is not None and s.max_grad_norm <= 0:
            raise ConfigError("prune.max_grad_norm", f"must be > 0 or null, got {v!r}")
    s.penalty = _num("penalty", data.get("penalty", s.penalty))
    if s.penalty <= 0:
        raise ConfigError("penalty", f"must be > 0, got {s.penalty:g}")
    hb = _section(data, "heartbeat", {"interval", "grace"})
    s.heartbeat_interval = _int("heartbeat.interval", hb.get("interval", s.heartbeat_interval), 1, HEARTBEAT_MAX)
    s.heartbeat_grace = _int("heartbeat.grace", hb.get("grace", s.heartbeat_grace), 1, HEARTBEAT_MAX)
    if s.heartbeat_grace <= s.heartbeat_interval:
        raise ConfigError("heartbeat.grace", "must be larger than heartbeat.interval")
    space = data.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError("space", "must be a non-empty mapping of config keys to {low, high[, log]} or {choices}")
    types = _types()
    s.space = [_param(k, v, base, types) for k, v in _flat_space(space).items()]
    return s


def _candidates(p: Param) -> list[Any]:
    """The values of ``p`` that can be extremes of the memory estimate: the ends of a range, every choice."""
    return list(p.choices) if p.kind == "categorical" else [p.low, p.high]


def largest_trial(sw: SweepConfig) -> Config:
    """The trial config of the space that needs the most memory (by :func:`pipeline.training.budget.estimate`).

    The estimate grows with every size key, so its maximum over a box lies at a corner; coordinate ascent
    over the ends of each range and every choice (two rounds) finds it without enumerating the corners.
    Corners that are not valid training configs are skipped (each end was validated on its own).
    """
    from pipeline.training.budget import estimate

    def need(values: dict[str, Any]) -> int | None:
        try:
            return estimate(sw.trial_config(values)).peak()
        except ConfigError:
            return None

    best: dict[str, Any] = {}
    for _ in range(2):
        for p in sw.space:
            scored = [(need({**best, p.key: v}), i, v) for i, v in enumerate(_candidates(p))]
            scored = [s for s in scored if s[0] is not None]
            if scored:
                best[p.key] = max(scored)[2]
    return sw.trial_config(best)


def check_sweep_fits(sw: SweepConfig, workers: int, device_workers: int | None = None) -> None:
    """Every trial the space can produce must fit, ``workers`` at once, before any store is created.

    Raises :class:`ConfigError` naming the key (prefixed ``space.`` when the space sets it, else ``base.``).
    """
    from pipeline.training.budget import check_fits

    cfg = largest_trial(sw)
    searched = {p.key for p in sw.space}
    try:
        check_fits(cfg, copies=workers, device_copies=device_workers, what="the largest trial of the space ")
    except ConfigError as e:
        if e.key == "workers":
            raise
        prefix = "space" if e.key in searched else "base"
        raise ConfigError(f"{prefix}.{e.key}", str(e).split(": ", 1)[1]) from None
