"""Declared versions are tested versions: the lanes' constraints come from pyproject.toml, the lock
pins everything the README installs, and `bifocal env` reports what is installed."""

from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO, run_cli


def _constraints(what: str) -> list[str]:
    out = subprocess.run([sys.executable, str(REPO / ".ci" / "constraints.py"), what], capture_output=True, text=True,
                         check=True).stdout
    return out.split()


def _lock() -> dict[str, str]:
    rows = [r for r in (REPO / "requirements" / "lock.txt").read_text().splitlines() if r and not r.startswith("#")]
    return {Requirement(r).name.replace("-", "_").lower(): str(next(iter(Requirement(r).specifier)).version) for r in rows}


def test_oldest_lane_pins_the_declared_floors_and_the_lock_satisfies_every_range():
    import tomllib

    oldest = dict(r.split("==") for r in _constraints("oldest"))
    assert set(oldest) == set(_constraints("names")) and "transformers" in oldest and "deepspeed" in oldest
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = _lock()
    for text in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(text)
        name = req.name.replace("-", "_").lower()
        assert name in lock, f"{name} is declared but not locked"
        assert req.specifier.contains(lock[name]), f"lock has {name}=={lock[name]}, outside {req.specifier}"
        if name in oldest:
            assert Version(oldest[name]) <= Version(lock[name])


def test_readme_commands_install_the_lock():
    readme = (REPO / "README.md").read_text()
    commands = [line for line in readme.split("```bash", 1)[1].split("```", 1)[0].splitlines() if line.strip()]
    assert len(commands) == 2 and all("-c requirements/lock.txt" in c for c in commands)
    assert "python -m pytest" in commands[1] and "bifocal train" in commands[0]
    assert "bash .ci/lane locked" in (REPO / ".ci" / "run").read_text()


def test_env_reports_the_installed_versions(tmp_path):
    out = run_cli(["env"], cwd=tmp_path).stdout
    rows = dict(line.split(":", 1) for line in out.splitlines())
    rows = {k: v.strip() for k, v in rows.items()}
    for name in ("torch", "deepspeed", "transformers", "datasets", "tokenizers"):
        assert rows[name] == metadata.version(name)
    assert rows["bifocal"] == metadata.version("bifocal")
    assert rows["device"].startswith(("cpu", "cuda")) and "cuda" in rows


def test_the_dependency_lanes_name_existing_tests():
    """.ci/dependency-tests.txt: what the oldest and newest lanes run."""
    listed = [line.split("#")[0].strip() for line in (REPO / ".ci" / "dependency-tests.txt").read_text().splitlines()]
    listed = [name for name in listed if name]
    assert len(listed) >= 10 and "tests/test_hf_downstream.py" in listed
    assert [name for name in listed if not (REPO / name).is_file()] == []
