"""The layout's rules, each a test (README, "Project structure").

* Folders are stages: the README's tree names every module of the package, and names nothing that is
  not there.
* ``cli/`` imports nothing heavy (torch, Lightning, MLflow, Optuna, pandas) when it is imported: the
  front doors answer ``--help`` and reject bad input before any of them loads.
* ``bptt/`` never imports Lightning, MLflow or Optuna, at module level or inside a function: the exact
  mathematics runs wherever torch runs, and a user's own model can use it without our trainer.
* The shared floor (config, config_checks, cell_keys, schema, names, uris, signals, tracking, provenance, store_checks, plots,
  presets) imports no stage folder.
* Classes stay under about 150 lines: at most :data:`CLASS_LINES` lines each, their docstring aside.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pipeline"
STAGES = ("cli", "training", "bptt", "sweep", "report", "regression")
HEAVY = ("torch", "pytorch_lightning", "lightning", "mlflow", "optuna", "pandas")
NEVER_IN_BPTT = ("pytorch_lightning", "lightning", "mlflow", "optuna")
CLASS_LINES = 160  # the design's "~150"; the largest today: sweep.worker.Worker, 156


def modules() -> list[str]:
    """Every module file of the package, as a path relative to ``pipeline/`` (``sweep/worker.py``)."""
    return sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def tree_entries() -> list[str]:
    """The file names in the README's "Project structure" tree, as paths relative to ``pipeline/``."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Project structure", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    out, folder = [], ""
    for line in block.splitlines():
        m = re.match(r"^(\s*)([\w.]+/|[\w.]+\.py)\s", line + " ")
        if not m:
            continue
        indent, name = len(m.group(1)), m.group(2)
        if name.endswith("/"):
            folder = "" if name == "pipeline/" else name
            if indent <= 2 and name != "pipeline/" and name.rstrip("/") not in STAGES:
                folder = None  # a top-level folder beside pipeline/ (configs/, tests/, ...)
        elif folder is not None:
            out.append(folder + name if indent > 2 else name)
    return out


def imports(path: Path) -> list[str]:
    """Every module ``path`` imports, at any depth (module level and inside functions), absolute names."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out


def test_readme_tree_names_every_module_and_nothing_else():
    listed, present = tree_entries(), modules()
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert sorted(set(present) - set(listed)) == [], "modules missing from README 'Project structure'"
    assert sorted(set(listed) - set(present)) == [], (
        "README 'Project structure' names modules that do not exist"
    )


def test_tree_parser_sees_a_missing_module(tmp_path, monkeypatch):
    """The check above can fail: a package with one more module than the README lists."""
    (tmp_path / "pipeline" / "sweep").mkdir(parents=True)
    for rel in modules():
        (tmp_path / "pipeline" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pipeline" / rel).write_text("")
    (tmp_path / "pipeline" / "sweep" / "extra.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path / "pipeline")
    assert set(modules()) - set(tree_entries()) == {"sweep/extra.py"}


def test_only_stage_folders_one_level_deep():
    folders = sorted(p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(STAGES)
    for stage in STAGES:
        assert not [p for p in (PKG / stage).iterdir() if p.is_dir() and p.name != "__pycache__"], stage


def test_cli_imports_nothing_heavy():
    mods = ["pipeline.cli"] + [
        f"pipeline.cli.{p.stem}" for p in (PKG / "cli").glob("*.py") if p.stem != "__init__"
    ]
    code = (
        f"import importlib, sys\nfor m in {mods!r}: importlib.import_module(m)\n"
        f"print(','.join(sorted({{n.split('.')[0] for n in sys.modules}} & set({HEAVY!r}))))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "", f"importing cli/ loaded {p.stdout.strip()}"


@pytest.mark.parametrize("path", sorted((PKG / "bptt").glob("*.py")), ids=lambda p: p.name)
def test_bptt_never_imports_lightning_mlflow_or_optuna(path):
    bad = [m for m in imports(path) if m.split(".")[0] in NEVER_IN_BPTT]
    assert bad == [], f"{path.name} imports {bad}"
    stages = {m.split(".")[1] for m in imports(path) if m.startswith("pipeline.") and m.count(".") >= 1}
    assert stages <= {"bptt", "names", "config", "schema"}, f"{path.name} imports pipeline.{stages}"


def test_import_scan_sees_a_function_level_import(tmp_path):
    """The scan above reads imports inside functions too (a planted ``import mlflow`` in a function)."""
    f = tmp_path / "planted.py"
    f.write_text("import torch\n\ndef f():\n    from mlflow import MlflowClient\n    return MlflowClient\n")
    assert "mlflow" in imports(f) and "torch" in imports(f)


FLOOR = (
    "config.py",
    "config_checks.py",
    "cell_keys.py",
    "schema.py",
    "names.py",
    "uris.py",
    "signals.py",
    "tracking.py",
    "provenance.py",
    "store_checks.py",
    "plots.py",
    "presets.py",
)


@pytest.mark.parametrize("name", [n for n in FLOOR if (PKG / n).exists()])
def test_the_floor_imports_no_stage(name):
    used = {m.split(".")[1] for m in imports(PKG / name) if m.startswith("pipeline.")}
    assert not used & set(STAGES), f"{name} imports stage folder(s) {sorted(used & set(STAGES))}"


TAGS = (
    "pipeline.kind",
    "pipeline.owner",
    "pipeline.heartbeat",
)  # MLflow tag names that read like module paths


def documented_names() -> tuple[set[str], set[str]]:
    """``pipeline/x/y.py`` paths and ``pipeline.x.y[.attr]`` dotted names cited in the README and configs."""
    texts = [(ROOT / "README.md").read_text()] + [p.read_text() for p in (ROOT / "configs").rglob("*.yaml")]
    paths, dotted = set(), set()
    for text in texts:
        paths |= set(re.findall(r"\bpipeline/[\w/]+\.py\b", text))
        dotted |= {d for d in re.findall(r"`(pipeline(?:\.\w+)+)`", text) if d not in TAGS}
    return paths, dotted


def test_every_module_the_docs_cite_exists():
    import importlib

    paths, dotted = documented_names()
    assert paths, "the README cites no module path: the pattern is broken"
    assert sorted(p for p in paths if not (ROOT / p).is_file()) == []
    missing = []
    for name in sorted(dotted):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ModuleNotFoundError:
                continue
            for attr in parts[i:]:
                obj = getattr(obj, attr, None)
            if obj is None:
                missing.append(name)
            break
    assert missing == []


def class_sizes(source: str) -> dict[str, int]:
    """Each class of a module (nested ones by their dotted name): its lines, its docstring aside."""
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                name = f"{prefix}{child.name}"
                doc = child.body[0]
                said = (
                    isinstance(doc, ast.Expr)
                    and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str)
                )
                out[name] = (
                    child.end_lineno - child.lineno + 1 - (doc.end_lineno - doc.lineno + 1 if said else 0)
                )
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return out


def test_classes_stay_under_about_150_lines():
    """A class that grew past the bound is split where it has a seam (README, "Project structure"): the
    sweep's Worker and Supervisor, and the two public callbacks, were 186-273 lines before one."""
    big = {
        f"{m}:{name}": n
        for m in modules()
        for name, n in class_sizes((PKG / m).read_text()).items()
        if n > CLASS_LINES
    }
    assert not big, big


def test_class_sizes_counts_a_class_without_its_docstring():
    body = "\n".join(f"    x{i} = {i}" for i in range(CLASS_LINES + 1))
    assert class_sizes(f'class A:\n    """One\n    two."""\n{body}\n') == {"A": CLASS_LINES + 2}
    assert class_sizes(f"def f():\n    class B:\n{body.replace('    ', '        ')}\n") == {
        "B": CLASS_LINES + 2
    }
