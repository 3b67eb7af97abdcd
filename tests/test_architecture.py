"""Imports go one way: each layer imports only the layers below it.

    core                      errors, YAML/--set/strict-dataclass plumbing (torch-free)
    model, data_pipeline      the network; corpora -> token shards -> batches (independent)
    run                       a run directory: run config, checkpoints, metrics, process group
    launcher, eval            training (+ the CLI, which names every command); evaluation, studies

The check parses every module with `ast` (nothing is imported), so a violation anywhere, even in
a function-level import, fails here with the file, line and the offending import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the bifocal packages its modules may import (besides their own)
ALLOWED = {
    "core": set(),
    "model": {"core"},
    "data_pipeline": {"core"},
    "run": {"core", "model", "data_pipeline"},
    "launcher": {"core", "model", "data_pipeline", "run"},
    "eval": {"core", "model", "data_pipeline", "run"},
}
# Within a package: readers never import writers.
FORBIDDEN_MODULES = {"data_pipeline/loader.py": {"data_pipeline.prepare"}}


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, dotted module below `bifocal.`) for every project import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = [package, *path.relative_to(ROOT / package).with_suffix("").parts]  # e.g. model/position/rope
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name[len("bifocal."):]) for a in node.names if a.name.startswith("bifocal.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:-node.level]
                assert base, f"{path}:{node.lineno}: relative import leaves the bifocal packages"
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("bifocal."):
                target = node.module[len("bifocal."):]
            else:
                continue
            if node.module is None:  # `from . import a, b`: each name is a module
                out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, target))
    return out


def violations() -> list[str]:
    found = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for line, module in imported_modules(path, package):
                top = module.split(".")[0]
                if top not in allowed | {package}:
                    found.append(f"{rel}:{line}: imports bifocal.{module} ({package} may import: "
                                 f"{', '.join(sorted(allowed)) or 'nothing of the project'})")
                if any(module == m or module.startswith(m + ".") for m in FORBIDDEN_MODULES.get(rel, ())):
                    found.append(f"{rel}:{line}: imports bifocal.{module}")
    return found


def test_imports_follow_the_layers() -> None:
    assert violations() == []


def launcher_strings(path: Path) -> list[int]:
    """Lines of string literals (docstrings aside) that name bifocal.launcher: a command line."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docs and "bifocal.launcher" in node.value]


def test_only_the_launcher_names_the_launcher() -> None:
    """Studies start training runs through bifocal.run.train_process (`python -m bifocal train`),
    never by naming the launcher's modules on a command line, around the layer rule."""
    found = [f"{path.relative_to(ROOT)}:{line}" for package in ALLOWED if package != "launcher"
             for path in sorted((ROOT / package).rglob("*.py")) for line in launcher_strings(path)]
    assert found == []


def test_the_launcher_check_sees_command_lines_not_docstrings(tmp_path: Path) -> None:
    probe = tmp_path / "study.py"
    probe.write_text('"""Trains with bifocal.launcher, said in a docstring."""\n\n'
                     'def f():\n    """Also bifocal.launcher here."""\n    return ["python", "-m", "bifocal.launcher.cli"]\n')
    assert launcher_strings(probe) == [5]


def test_the_check_sees_function_level_and_relative_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The parser must resolve `from ..x import y` and imports inside functions, or the test above
    # would pass vacuously.
    pkg = tmp_path / "model" / "position"
    pkg.mkdir(parents=True)
    (pkg / "rope.py").write_text("from ..config import X\n\ndef f():\n    from bifocal.run.config import load_config\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert imported_modules(pkg / "rope.py", "model") == [(1, "model.config"), (4, "run.config")]
    assert violations() == [
        "model/position/rope.py:4: imports bifocal.run.config (model may import: core)"]


def test_core_config_loads_without_torch() -> None:
    # YAML, includes, --set and key hints must stay usable without heavy dependencies.
    code = ("import sys, bifocal.core.config, bifocal.core.errors; "
            "heavy = sorted(m for m in ('torch', 'deepspeed', 'numpy') if m in sys.modules); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
