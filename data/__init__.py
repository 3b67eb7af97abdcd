"""The bundled demo corpora (gzip JSON lines beside this module), shipped inside the wheel."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

ROOT = Path(str(files(__name__)))
