"""Tiny random models saved as export directories, and tiny prepared task data, built in-process
in a second: for evaluation tests that need a model to load but not a trained one."""

from __future__ import annotations

from pathlib import Path

import torch

from bifocal.data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from bifocal.data_pipeline.prepare import prepare
from bifocal.data_pipeline.tokenizer import TextTokenizer, load_tokenizer, train_tokenizer
from bifocal.model.hf.hf_io import save_hf
from bifocal.model import GPT, GPTConfig


def text_tokenizer(texts: list[str], out: Path, vocab_size: int = 300) -> TextTokenizer:
    return train_tokenizer(texts, TokenizerConfig(vocab_size=vocab_size), out)


def prepared_task_data(out: Path, task: str = "modular", n_documents: int = 120) -> Path:
    cfg = DataConfig(sources=[SourceConfig(name=task, synthetic={"task": task, "n_documents": n_documents, "seed": 0})],
                     tokenizer=TokenizerConfig(vocab_size=300), val_fraction=0.2, prepared_dir=str(out))
    return prepare(cfg, out, workers=1)


def random_model(vocab_size: int, scheme: str = "bifocal", seed: int = 0, perturb: bool = True,
                 **overrides) -> GPT:
    """A 2-layer model; `perturb` moves Omega, A and Phi off their initial values, as training would."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab_size, n_layer=2, n_head=4, d_model=32, max_seq_len=64,
              position={"scheme": scheme, **({"spectral_heads": 2} if scheme == "bifocal" else {})})
    kw.update(overrides)
    model = GPT(GPTConfig(**kw)).eval()
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("omega_delta"):
                    p.normal_(0.0, 0.05)
                elif name.endswith("amplitude"):
                    p.uniform_(0.5, 1.5)
                elif name.endswith("phase"):
                    p.normal_(0.0, 0.5)
    return model


def export(model: GPT, tokenizer: TextTokenizer | Path, out: Path) -> Path:
    tok = tokenizer if isinstance(tokenizer, TextTokenizer) else load_tokenizer(tokenizer)
    return save_hf(model, tok, out)
