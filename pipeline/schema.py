"""Reading configuration files: YAML, dotted overrides, merging, and one typed builder dict -> dataclass.

Every configuration file of the project (training configs, sweep files, regression suites) is read by
:func:`read_yaml`, patched by :func:`parse_overrides` + :func:`deep_merge`, and built into frozen
dataclasses by :func:`build`, which owns the type rules: an unknown key, a wrong type or a value outside
a ``Literal`` raises :class:`ConfigError` naming the dotted key, which every entry point prints as one
line before exiting 2 (README, "Commands"). Range checks live beside each dataclass (``validate``).
Stdlib and PyYAML only: the CLI's ``--help`` imports this.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration value; ``str(err)`` is the one-line message shown to users."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        # a command-line flag ("--store") is no config key: "config key '--store'" read as one to a user
        # who never passed the flag (found by a walkthrough)
        # nor is $MLFLOW_TRACKING_URI, which names the store when no key or flag does
        head = f"{key}: " if key.startswith(("-", "$")) else f"config key '{key}': " if key else ""
        super().__init__(head + message)

    def under(self, prefix: str) -> ConfigError:
        """The same error one level down: key ``prefix.key`` (``prefix`` alone when the key is empty)."""
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


class StoreError(ConfigError):
    """A store (MLflow database or server, Optuna journal) that cannot be opened or read: one line naming it.

    A ConfigError, so every entry point prints it as one line and exits 2 (README "Commands")."""

    def __init__(self, store: str, problem: str, remedy: str):
        self.store = store
        super().__init__("", f"{store}: {problem}; {remedy}")


# ------------------------------------------------------------------------------- dicts and overrides


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "a.b", 1)``: ``d["a"]["b"] = 1``, creating sections on the way."""
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(key, f"'{p}' is a value, not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
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
    """``base`` with ``patch`` laid over it, section by section (neither argument is changed)."""
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


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one YAML mapping (``line``: 1-based, where it is repeated; ``first``: where
    it was first given)."""

    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first = key, line, first


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, but a key given twice in one mapping is an error: the plain loader keeps
    the last one silently, so ``task: {batch_size: 3}`` followed by ``task: {batch_size: 4}`` trained
    with 4 and nobody saw the 3 go (found by a fuzzing review). Merge keys (``<<: *anchor``) are not
    duplicates: what they bring in may be overridden, as YAML says."""

    def compose_mapping_node(self, anchor: Any) -> Any:
        # Checked as composed, on the keys written in this mapping: by construction time PyYAML may have
        # flattened merges into it in place (a mapping merged by a later one is flattened first), and the
        # keys they brought in then looked like duplicates of its own (found by a review).
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # a merge, or a complex key (the constructor names those)
            key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(self.construct_object(key_node, deep=True), line, seen[key])
            seen[key] = line
        return node


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load(text)``, but a key given twice in one mapping raises (:class:`UniqueKeyLoader`)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file reads as ``{}``), safe-loaded.

    Every problem is one :class:`ConfigError` naming the file: missing, a directory, unreadable, not
    UTF-8 (with the byte offset), invalid YAML or a key given twice in one mapping (with the line)."""
    if str(path) == "":
        # Path("") is "." and read as "config file . is a directory" (found by a fuzzing review)
        raise ConfigError("", "config file path is empty: name a YAML file")
    p = Path(path)
    if p.is_dir():
        raise ConfigError("", f"config file {p} is a directory: name a YAML file")
    if not p.is_file():
        raise ConfigError("", f"config file not found: {p}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError("", f"config file {p} cannot be read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("", f"{p}: not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    try:
        data = load_yaml_text(text)
    except _DuplicateKey as e:
        raise ConfigError(
            "", f"{p}: duplicate key {e.key!r} (line {e.line}; first given at line {e.first})"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError("", f"{p}: invalid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{p}: top level must be a mapping of sections")
    return data


# ------------------------------------------------------------------------------------- typed builder


def build(cls: type[T], data: Any, prefix: str = "") -> T:
    """Nested mapping -> dataclass ``cls``; missing keys take the field defaults (their one home).

    Types understood: bool, int, float (finite or not: ranges are the caller's), str, ``X | None``,
    ``Literal[...]``, ``tuple[X, ...]`` (from a YAML list), ``dict[str, X]``, ``Any`` and nested
    dataclasses (``None`` reads as an empty section). Raises :class:`ConfigError` naming the dotted key.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip("."), f"must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = {f.name for f in fields}
    for k in data:
        if k not in names:
            where = prefix.rstrip(".") or "top level"
            raise ConfigError(f"{prefix}{k}", f"unknown key (allowed in {where}: {', '.join(sorted(names))})")
    kwargs = {
        f.name: coerce(f"{prefix}{f.name}", hints[f.name], data[f.name]) for f in fields if f.name in data
    }
    return cls(**kwargs)


def coerce(key: str, tp: Any, value: Any) -> Any:
    """``value`` as type ``tp`` (see :func:`build`), else a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return coerce(key, args[0], value)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise ConfigError(key, f"unknown value {value!r} (allowed: {', '.join(map(str, allowed))})")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value))
    if origin is dict:
        mapping = as_mapping(value, key)
        item = typing.get_args(tp)[1]
        return {str(k): coerce(f"{key}.{k}", item, v) for k, v in mapping.items()}
    if tp in _SCALARS:
        return _SCALARS[tp](key, value)
    return value


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(key, f"must be true or false, got {value!r}")


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"must be an integer, got {value!r}")
    return value


def _float(key: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"must be a number, got {value!r}")
    return float(value)


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        # YAML reads 123 as a number (in a file and in key=value alike): say how to make it a string
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        hint = f' (YAML read a number: quote it, "{value}")' if number else ""
        raise ConfigError(key, f"must be a string, got {value!r}{hint}")
    return value


_SCALARS: dict[Any, Any] = {bool: _bool, int: _int, float: _float, str: _str}


# ------------------------------------------------------------------------------------- range checks


def check(key: str, ok: bool, what: str, value: Any) -> None:
    """``ok`` or a ConfigError ``config key 'key': must be <what>, got <value>``."""
    if not ok:
        raise ConfigError(key, f"must be {what}, got {value!r}")


def choice(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """``value in allowed`` or a ConfigError listing what is allowed."""
    if value not in allowed:
        raise ConfigError(key, f"unknown value {value!r} (allowed: {', '.join(map(str, allowed))})")
