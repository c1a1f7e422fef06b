"""The example configs shipped with the package, found by name: ``--config smoke`` -> ``configs/train/smoke.yaml``.

The repository keeps them at its top level (``configs/train``, ``configs/sweeps``, ``configs/regression``);
``pip install .`` installs the same files as the package data ``pipeline/configs/`` (pyproject.toml maps
the package ``pipeline.configs`` to the folder ``configs/``). Lookup order (README, "Commands"):

1. a path that exists wins, whatever it is called;
2. a bare name (``smoke``, or ``smoke.yaml``) is looked up in the kind's folder of the shipped configs:
   ``pipeline/configs/`` beside the code (a regular install), else ``configs/`` of the checkout that holds
   the code (an editable install, or ``PYTHONPATH`` pointing at a checkout), else whatever
   ``importlib.resources`` finds for ``pipeline.configs`` (any other loader);
3. anything else is handed on unchanged, so a missing file is reported by the reader as before.

Standard library only: the front doors (``cli/``) call this before anything heavy is imported.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from pipeline.schema import ConfigError

KINDS = ("train", "sweeps", "regression")
_NOUN = {"sweeps": "sweep", "regression": "regression suite"}  # what a message calls a config of the kind
BASELINE_SUFFIX = ".baseline.yaml"  # a suite's accepted numbers, not a suite (README, "Regression suites")


def configs_root() -> Path | None:
    """The folder holding ``train/``, ``sweeps/``, ``regression/``; None when the package ships none."""
    here = Path(__file__).resolve().parent
    installed = here / "configs"
    if installed.is_dir():
        return installed
    checkout = here.parent / "configs"
    if checkout.is_dir() and (here.parent / "pyproject.toml").is_file():
        return checkout
    try:
        found = resources.files("pipeline.configs")
    except ModuleNotFoundError:
        return None
    p = Path(str(found))
    return p if p.is_dir() else None


def names(kind: str) -> list[str]:
    """The shipped configs of ``kind`` by name (a suite's baseline files are not suites)."""
    root = configs_root()
    if root is None or not (root / kind).is_dir():
        return []
    return sorted(
        p.name.removesuffix(".yaml")
        for p in (root / kind).glob("*.yaml")
        if not p.name.endswith(BASELINE_SUFFIX)
    )


def resolve(value: str, kind: str, flag: str = "--config") -> str:
    """``value`` as a file path: an existing path as given, a shipped config's name as its file.

    A bare name (no folder part) that is neither raises :class:`~pipeline.schema.ConfigError` naming
    the shipped configs of that kind; a path that does not exist is returned unchanged.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not value.strip():
        # Path("") is "." (a directory that exists): it was reported as "config file . is a directory"
        known = ", ".join(names(kind)) or "none"
        raise ConfigError(
            flag, f"empty path: name a YAML file or a shipped {_NOUN.get(kind, kind)} config (known: {known})"
        )
    if Path(value).expanduser().exists():
        return value
    if "/" in value or "\\" in value or not value.strip():
        return value
    name = value.removesuffix(".yaml")
    root = configs_root()
    if root is not None:
        p = root / kind / f"{name}.yaml"
        if p.is_file() and not p.name.endswith(BASELINE_SUFFIX):
            return str(p)
    known = ", ".join(names(kind)) or "none"
    raise ConfigError(
        "",
        f"config file not found: {value} ({flag}: not a shipped {_NOUN.get(kind, kind)} config either; known: {known})",
    )
