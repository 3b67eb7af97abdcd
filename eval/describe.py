"""What a result file says about the model it measured: name, scheme, training length, and where
its results go by default (RUN/eval/ for a run or an export directory)."""

from __future__ import annotations

from pathlib import Path

from bifocal.model import GPT


def model_name(path: str | Path) -> str:
    """The one name every result gives a model: its training run's. A run directory is named by
    itself; an export by the run recorded in its config.json at export (`bifocal_run`), else by
    its directory (an export written by other means)."""
    import json

    p = Path(path).resolve()
    try:
        return str(json.loads((p / "config.json").read_text())["bifocal_run"])
    except (OSError, ValueError, KeyError, TypeError):
        return p.name


def model_scheme(model: GPT) -> str:
    return model.cfg.position.scheme


def train_len(model: GPT) -> int:
    return int(model.cfg.max_seq_len)


def default_out(model_path: str | Path, filename: str) -> Path:
    return Path(model_path) / "eval" / filename
