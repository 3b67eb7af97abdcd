"""Every public function, class and method of bifocal.core, .model, .run and .data_pipeline has a
docstring (the project's rule: shapes, units, errors raised and the source of every formula; that
the text says those things is for review, that it exists is checked here).

Public: a name without a leading underscore, defined at module level (also inside a module-level
`if` / `try`) or directly in a public class (properties included). Dunder methods start with an
underscore and are skipped; dataclass-generated methods are not in the source at all. The check
parses each file with `ast` (nothing is imported), so it runs without torch or transformers.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "model", "run", "data_pipeline")
# (file, qualified name) of definitions allowed without a docstring, each with its reason. Keep it
# empty: an entry that has gained its docstring (or is gone) fails `test_the_allowlist_is_current`.
ALLOWED: dict[tuple[str, str], str] = {}

Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _definitions(body: list[ast.stmt]) -> Iterator[Definition]:
    """The functions and classes of a module or class body, through `if` / `try` blocks."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node
        elif isinstance(node, ast.If):
            yield from _definitions(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _definitions(node.body + node.orelse + node.finalbody
                                    + [s for handler in node.handlers for s in handler.body])


def undocumented(path: Path) -> list[str]:
    """Qualified names (`f`, `C`, `C.method`) of the public definitions in `path` without a docstring."""
    found = []
    for node in _definitions(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body):
        if node.name.startswith("_"):
            continue
        if ast.get_docstring(node) is None:
            found.append(node.name)
        if isinstance(node, ast.ClassDef):
            found += [f"{node.name}.{m.name}" for m in _definitions(node.body)
                      if not m.name.startswith("_") and ast.get_docstring(m) is None]
    return found


def missing() -> list[tuple[str, str]]:
    """(file relative to the repository, qualified name) of every undocumented public definition."""
    return [(path.relative_to(ROOT).as_posix(), name) for package in PACKAGES
            for path in sorted((ROOT / package).rglob("*.py")) for name in undocumented(path)]


def test_public_definitions_have_docstrings() -> None:
    assert [f"{file}: {name}" for file, name in missing() if (file, name) not in ALLOWED] == []


def test_the_allowlist_is_current() -> None:
    assert sorted(set(ALLOWED) - set(missing())) == []


def test_the_check_sees_what_lacks_a_docstring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without this, a checker that found nothing would pass vacuously.
    package = tmp_path / "model" / "position"
    package.mkdir(parents=True)
    (package / "probe.py").write_text(
        '"""A probe module."""\n\n'
        "def rotate(x):\n    return x\n\n"
        'def _helper(x):\n    return x\n\n'
        'class Scheme:\n    """Documented."""\n\n'
        "    def forward(self, q):\n        return q\n\n"
        "    @property\n    def width(self):\n        return 2\n\n"
        '    def __init__(self):\n        pass\n\n'
        "class _Private:\n    def forward(self):\n        pass\n\n"
        "try:\n    def fallback():\n        pass\nexcept ImportError:\n    pass\n\n"
        'def documented():\n    """Yes."""\n')
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert undocumented(package / "probe.py") == ["rotate", "Scheme.forward", "Scheme.width", "fallback"]
    assert missing() == [("model/position/probe.py", name)
                         for name in ("rotate", "Scheme.forward", "Scheme.width", "fallback")]
