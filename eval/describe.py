"""What a result file says about the model it measured: name, scheme, training length, and where
its results go by default (RUN/eval/ for a run or an export directory)."""

from __future__ import annotations

from pathlib import Path

from bifocal.model import GPT


def model_name(path: str | Path) -> str:
    p = Path(path).resolve()
    # An export inside a run (RUN/export) is named after the run.
    return p.parent.name if p.name == "export" else p.name


def model_scheme(model: GPT) -> str:
    return model.cfg.position.scheme


def train_len(model: GPT) -> int:
    return int(model.cfg.max_seq_len)


def default_out(model_path: str | Path, filename: str) -> Path:
    return Path(model_path) / "eval" / filename
