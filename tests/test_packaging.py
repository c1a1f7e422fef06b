"""The installable package (README, "Installing the package"): shipped configs by name, --print-config, --version,
the console script, and a wheel that carries the configs and the py.typed marker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from pipeline import presets
from pipeline.cli import main
from pipeline.config import from_dict, load_config
from pipeline.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize(
    ("kind", "name", "path"),
    [
        ("train", "smoke", "configs/train/smoke.yaml"),
        ("train", "vanishing_tanh.yaml", "configs/train/vanishing_tanh.yaml"),
        ("sweeps", "smoke", "configs/sweeps/smoke.yaml"),
        ("regression", "smoke", "configs/regression/smoke.yaml"),
    ],
)
def test_a_shipped_config_resolves_by_name(kind, name, path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file of that name here
    assert Path(presets.resolve(name, kind)).resolve() == (ROOT / path).resolve()


def test_an_existing_path_wins_over_a_shipped_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("smoke").write_text("seed: 7\n")
    assert presets.resolve("smoke", "train") == "smoke"
    assert main(["train", "--config", "smoke", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 7


def test_an_unknown_name_names_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"^config file not found: no_such_config \(--config: not a shipped train config either.*smoke",
    ):
        presets.resolve("no_such_config", "train")
    with pytest.raises(ConfigError, match=r"known: gpu, nightly, smoke\)$"):  # baselines are not suites
        presets.resolve("smoke.baseline", "regression", "--suite")
    assert presets.resolve("missing/dir.yaml", "train") == "missing/dir.yaml"  # the reader reports it


@pytest.mark.parametrize("config", [["--config", "smoke"], []], ids=["smoke", "defaults"])
def test_print_config_parses_back_to_the_same_config(config, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", *config, "--print-config", "model.cell=lstm", "optim.lr=0.01"]
    assert main(args) == 0
    out = capsys.readouterr().out
    path = presets.resolve("smoke", "train") if config else None
    assert from_dict(yaml.safe_load(out)) == load_config(path, ["model.cell=lstm", "optim.lr=0.01"])
    assert not list(tmp_path.iterdir()), "--print-config wrote something"


def test_version_prints_the_pyproject_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.split() == ["python", "-m", "pipeline", PYPROJECT["project"]["version"]]


def test_the_console_script_names_itself():
    assert PYPROJECT["project"]["scripts"] == {"rnn-pipeline": "pipeline.cli:main"}
    # What the generated script does: import the entry point and call it, argv[0] being its path.
    code = (
        "import sys; sys.argv[0] = '/venv/bin/rnn-pipeline'; from pipeline.cli import main; sys.exit(main())"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, "--help"], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: rnn-pipeline ")
    p = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--help"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert p.returncode == 0 and p.stdout.startswith("usage: python -m pipeline train "), p.stdout


def test_the_package_list_names_every_folder_of_pipeline():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    folders = {
        "pipeline." + p.name
        for p in (ROOT / "pipeline").iterdir()
        if p.is_dir() and (p / "__init__.py").is_file()
    }
    configs = {"pipeline.configs." + p.name for p in (ROOT / "configs").iterdir() if p.is_dir()}
    assert configs == {"pipeline.configs.train", "pipeline.configs.sweeps", "pipeline.configs.regression"}
    assert listed == {"pipeline", "pipeline.configs", *configs, *folders}
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"pipeline.configs": "configs"}


def test_the_wheel_carries_the_configs_and_py_typed(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "pipeline", src / "pipeline", ignore=ignore)
    shutil.copytree(ROOT / "configs", src / "configs", ignore=ignore)
    out = tmp_path / "wheels"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            ".",
        ],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    # Every folder of data is a listed package: setuptools prints a "Package would be ignored" wall for
    # each one that is not, on every `make install`.
    assert "would be ignored" not in p.stderr, p.stderr[-2000:]
    (wheel,) = out.glob("rnn_gradient_pipeline-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"pipeline/configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert want and want <= names, sorted(want - names)
    assert "pipeline/py.typed" in names
    assert "pipeline/presets.py" in names and "pipeline/sweep/worker.py" in names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in meta
    assert "Requires-Python: >=3.11" in meta
    assert 'Requires-Dist: psycopg2-binary>=2.9.5; extra == "postgres"' in meta
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def _pins(name: str) -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            package, version = line.split("==")
            pins[canonicalize_name(package)] = version
    return pins


@pytest.mark.parametrize(
    ("floor_file", "extras"),
    [
        ("constraints-floor.txt", ["postgres", "system-metrics"]),
        ("constraints-floor-airflow.txt", ["postgres", "airflow"]),
    ],
)
def test_the_floor_files_pin_each_lower_bound(floor_file, extras):
    """README, "Supported versions": `make test-floor` tests the lower bound of every range pyproject.toml
    gives, so the floor file pins each one at that bound (a later release of it where the bound is shorter:
    numpy>=1.24 at 1.24.4, nvidia-ml-py>=12 at its first 12.x release). A range raised in pyproject.toml without the floor file, or a
    new dependency, fails here instead of going untested."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for e in extras for r in project["optional-dependencies"][e]]
    pins = _pins(floor_file)
    if floor_file == "constraints-floor-airflow.txt":  # Airflow itself requires more than their floors
        reqs = [r for r in reqs if canonicalize_name(r.name) not in {"pyyaml", "sqlalchemy"}]
    assert {canonicalize_name(r.name) for r in reqs} == set(pins)
    for r in reqs:
        (low,) = [Version(s.version) for s in r.specifier if s.operator == ">="]
        pin = Version(pins[canonicalize_name(r.name)])
        assert pin in r.specifier and pin.release[: len(low.release)] == low.release, (r, pin)
