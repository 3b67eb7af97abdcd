"""One loader for every evaluation command: a training run directory (newest complete
checkpoint, consolidated) or an exported Hugging Face-style directory."""

from __future__ import annotations

from pathlib import Path

import torch

from bifocal.data_pipeline.tokenizer import TextTokenizer, load_tokenizer
from bifocal.core.errors import BifocalError
from bifocal.model import GPT


def default_device(device: str | None = None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path: str | Path, device: str | None = None, step: int | None = None) -> tuple[GPT, TextTokenizer]:
    """(model in eval mode, the tokenizer it was trained with)."""
    p = Path(path)
    device = default_device(device)
    if not p.exists():
        raise BifocalError(f"model not found: {p}")
    if (p / "config.json").is_file():
        from bifocal.model.hf.hf_io import load_exported

        try:
            model, _ = load_exported(p, device=device)
        except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:  # BifocalError is a ValueError
            detail = f"config.json lacks {exc}" if isinstance(exc, KeyError) else str(exc)
            raise BifocalError(f"{p}: cannot load the exported model: {detail}") from None
        tok_file = next((p / n for n in ("tokenizer.json", "tokenizer.model") if (p / n).is_file()), None)
        if tok_file is None:
            raise BifocalError(f"{p} has no tokenizer.json or tokenizer.model")
        return model.eval(), load_tokenizer(tok_file)
    from bifocal.run.checkpoint import load_run_model

    return load_run_model(p, step=step, device=device)
