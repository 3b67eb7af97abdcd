"""Bundled run presets (YAML files beside this module), shipped inside the wheel.

A config is named by a path on disk or by its place here: `gpu/125m`, `gpu/125m.yaml`,
`configs/gpu/125m.yaml` (the README's clone-relative spelling) or a study preset `study/cpu`.
A path that exists on disk always wins over a bundled name.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

ROOT = Path(str(files(__name__)))
DEMO = ROOT / "demo.yaml"


def bundled(folder: str = "") -> list[str]:
    """Names of the bundled YAML files under `folder` (e.g. "gpu/125m"), sorted."""
    base = ROOT / folder
    return sorted(str(p.relative_to(ROOT).with_suffix("")) for p in base.rglob("*.yaml"))


def find(name: str | Path, folder: str = "") -> Path | None:
    """The file a config name means: a path on disk first, then a bundled preset under `folder`
    (with or without `.yaml`, with or without a leading `configs/`); None if neither exists."""
    disk = Path(name)
    if disk.is_file():
        return disk
    rel = Path(*disk.parts[1:]) if disk.parts[:1] == ("configs",) else disk
    if rel.is_absolute() or ".." in rel.parts:
        return None
    for candidate in (rel, rel.with_name(rel.name + ".yaml")):
        for base in (ROOT / folder, ROOT):
            path = base / candidate
            if path.is_file():
                return path
    return None
