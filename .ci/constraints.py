#!/usr/bin/env python3
"""Constraints for CI's dependency lanes, derived from pyproject.toml (the one place versions are
declared).

    python .ci/constraints.py oldest   # NAME==FLOOR for every library whose behaviour the code depends on
    python .ci/constraints.py names    # those libraries' names, one a line

The oldest lane installs with the first as pip constraints, so it tests exactly the floors the
project declares; the others float to whatever those floors pull in.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

# Libraries whose behaviour bifocal's code depends on (their floors are tested by the oldest lane).
BEHAVIOUR = ("torch", "deepspeed", "datasets", "tokenizers", "sentencepiece", "safetensors", "huggingface_hub",
             "transformers", "lm_eval", "accelerate", "peft", "trl")


def floors() -> dict[str, str]:
    """{name: floor} for BEHAVIOUR, from pyproject.toml's `>=` specifiers (dependencies and extras);
    every one must have exactly one floor."""
    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    found: dict[str, set[str]] = {}
    for text in project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]:
        req = Requirement(text)
        name = req.name.replace("-", "_").lower()
        found.setdefault(name, set()).update(str(s.version) for s in req.specifier if s.operator == ">=")
    out = {}
    for name in BEHAVIOUR:
        versions = found.get(name, set())
        if len(versions) != 1:
            raise SystemExit(f"pyproject.toml must declare exactly one floor (>=) for {name}, found {sorted(versions)}")
        out[name] = versions.pop()
    return out


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "oldest":
        print("\n".join(f"{name}=={version}" for name, version in floors().items()))
    elif what == "names":
        print("\n".join(BEHAVIOUR))
    else:
        raise SystemExit("usage: constraints.py oldest | names")
