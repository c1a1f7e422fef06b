"""The search space of a sweep file (README "Sweep file"): ``space`` maps dotted training config keys to
``{low, high[, log][, step]}`` or ``{choices: [...]}``; :func:`parse_space` turns it into :class:`Param` s,
each checked against the base config (every end of a range and every choice must make a valid training
config), raising :class:`~pipeline.schema.ConfigError` naming the key. Light imports only, like
:mod:`pipeline.sweep.config`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import Config, config_keys, from_dict
from pipeline.schema import ConfigError, check, deep_merge, set_dotted

SPEC_KEYS = {"low", "high", "log", "step", "choices"}
# Keys a sweep cannot search: they change where or how a trial runs, not what it trains.
FORBIDDEN = ("tracking.", "trainer.accelerator", "trainer.progress_bar", "trainer.threads")


@dataclass(frozen=True)
class Param:
    """One search dimension: ``kind`` float | int (``low``..``high``, optional ``log``/``step``) or categorical."""

    key: str  # the dotted training config key it sets
    kind: Literal["float", "int", "categorical"]  # which Optuna suggest_* draws it
    low: float | None = None  # float / int: the range's lower end (inclusive)
    high: float | None = None  # float / int: the range's upper end (inclusive)
    log: bool = False  # float / int: sample uniformly in log space
    step: float | None = None  # float / int: a grid step (None: continuous, or 1 for ints)
    choices: tuple[Any, ...] = ()  # categorical: the scalar values to choose from


def candidates(p: Param) -> list[Any]:
    """The values of ``p`` that can be extremes of the memory estimate: the ends of a range, every choice."""
    return list(p.choices) if p.kind == "categorical" else [p.low, p.high]


def nest_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted or nested space keys -> one nested dict whose leaves are specs (so overrides merge)."""
    out: dict[str, Any] = {}
    for k, v in space.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not (set(v) & SPEC_KEYS):
            out = deep_merge(out, nest_space(v, key + "."))
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


def _num(key: str, v: Any) -> float:
    if isinstance(v, str):
        with contextlib.suppress(ValueError):
            v = float(v)  # YAML 1.1 reads 1e-3 as a string
    check(key, not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v), "a number", v)
    return float(v)


def _choices(where: str, key: str, spec: dict[str, Any]) -> Param:
    if set(spec) - {"choices"}:
        raise ConfigError(where, "choices cannot be combined with low/high/log/step")
    choices = spec["choices"]
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}.choices", "must be a non-empty list")
    if any(isinstance(c, (dict, list)) for c in choices):
        raise ConfigError(f"{where}.choices", "must hold scalars")
    if len(set(map(repr, choices))) != len(choices):
        raise ConfigError(f"{where}.choices", f"has duplicates: {choices!r}")
    return Param(key, "categorical", choices=tuple(choices))


def _range(where: str, key: str, spec: dict[str, Any], tp: type) -> Param:
    if "low" not in spec or "high" not in spec:
        raise ConfigError(where, "needs low and high (or choices)")
    if tp not in (int, float):
        raise ConfigError(where, f"is not numeric ({tp.__name__}): use choices")
    low, high = _num(f"{where}.low", spec["low"]), _num(f"{where}.high", spec["high"])
    if not low < high:
        raise ConfigError(where, f"low must be < high, got low={low:g} high={high:g}")
    log = spec.get("log", False)
    check(f"{where}.log", isinstance(log, bool), "true or false", log)
    if log and low <= 0:
        raise ConfigError(f"{where}.low", f"must be > 0 on a log scale, got {low:g}")
    step = spec.get("step")
    if step is not None:
        step = _num(f"{where}.step", step)
        if step <= 0:
            raise ConfigError(f"{where}.step", f"must be > 0, got {step:g}")
        if log:
            raise ConfigError(f"{where}.step", "cannot be combined with log: true")
    if tp is float:
        return Param(key, "float", low, high, log, step)
    if not (low.is_integer() and high.is_integer()) or (step is not None and not step.is_integer()):
        raise ConfigError(where, "is an integer key: low, high and step must be integers")
    return Param(key, "int", int(low), int(high), log, int(step) if step else None)


def _param(key: str, spec: Any, base: dict[str, Any], types: dict[str, Any]) -> Param:
    where = f"space.{key}"
    if key not in types:  # the keys beside it, as a training config's unknown key is answered
        section = key.rpartition(".")[0]
        beside = sorted(k.rpartition(".")[2] for k in types if k.rpartition(".")[0] == section)
        if beside:
            raise ConfigError(where, f"unknown key (allowed in {section or 'a config'}: {', '.join(beside)})")
        sections = sorted({k.split(".")[0] for k in types if "." in k})
        raise ConfigError(where, f"unknown section (config sections: {', '.join(sections)})")
    if key.startswith(FORBIDDEN) or key in FORBIDDEN:
        raise ConfigError(
            where, "cannot be searched (it changes where or how a trial runs, not what it trains)"
        )
    if not isinstance(spec, dict):
        raise ConfigError(where, "must be a mapping with low/high or choices")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(
            f"{where}.{sorted(unknown)[0]}", f"unknown key (allowed: {', '.join(sorted(SPEC_KEYS))})"
        )
    p = _choices(where, key, spec) if "choices" in spec else _range(where, key, spec, types[key])
    for v in candidates(p):  # every end of the range / every choice must make a valid training config
        data = copy.deepcopy(base)
        set_dotted(data, key, v)
        try:
            from_dict(data)
        except ConfigError as e:
            raise ConfigError(where, f"value {v!r} is not valid for the training config: {e}") from None
    return p


def _types(cls: Any = Config, prefix: str = "") -> dict[str, Any]:
    """Dotted config key -> its scalar type (``X | None`` read as X), through every nested section
    (``remedy.floss.weight`` is three levels deep)."""
    import typing

    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_types(tp, f"{prefix}{f.name}."))
        else:
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            out[f"{prefix}{f.name}"] = args[0] if args else tp
    if cls is Config:
        assert set(out) == set(config_keys())
    return out


def parse_space(space: Any, base: dict[str, Any]) -> tuple[Param, ...]:
    """The YAML ``space`` mapping (nested or dotted keys) -> Params, each end checked against ``base``."""
    if not isinstance(space, dict) or not space:
        raise ConfigError(
            "space", "must be a non-empty mapping of config keys to {low, high[, log]} or {choices}"
        )
    types = _types()
    return tuple(_param(k, v, base, types) for k, v in _flat_space(space).items())
