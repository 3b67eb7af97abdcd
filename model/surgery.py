"""Spectralize a pretrained Hugging Face Llama-family model for continued pretraining.

`spectralize(model)` gives the last `spectral_heads` query heads of every layer learnable
Spectral-RoPE (Omega init rope_theta's frequencies, A = 1, Phi ~ N(0, phase_init_std)) using
bifocal's own `SpectralRotary`; at phase_init_std = 0 the logits are unchanged.
`CausalLMAdapter` lets the trainer treat the result like `GPT` (aligned labels, param_groups),
and `save_hf` / `load_spectralized` write and read local directories.

Saved directories keep the original config (model_type llama / mistral / qwen2) plus
`bifocal_surgery` (the settings) and an `auto_map` to a shipped `modeling_spectralized.py`, so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` rebuilds the stock class,
re-applies the surgery and loads the learned parameters. `load_spectralized` needs no remote
code: it loads the stock model, spectralizes it and loads the position parameters itself.
transformers is imported lazily (the rest of bifocal.model does not need it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bifocal.core.errors import BifocalError

from .config import GPTConfig
from .gpt import param_groups
from .loss import cross_entropy
from .position import position_parameters
from .hf.compat import set_checkpointing
from .hf.spectral_attention import SURGERY_KEY, apply_surgery, surgery_config

__all__ = ["spectralize", "CausalLMAdapter", "load_spectralized"]


def spectralize(model: nn.Module, spectral_heads: int | None = None, phase_init_std: float = 1e-3,
                spectral_lr_mult: float = 1.0) -> nn.Module:
    """Replace the rotary embedding of a transformers Llama/Mistral/Qwen2 causal LM (in place)
    by bifocal attention; returns the model. `spectral_heads` (default: half, in whole GQA
    groups) must be a multiple of n_head / n_kv_head. Spectral parameters are trainable. Raises
    ValueError for a model that is not Llama-style, uses a rope_type other than default or is
    already spectralized, and BifocalError for `spectral_heads` that do not fit."""
    return apply_surgery(model, spectral_heads, phase_init_std, spectral_lr_mult)



class CausalLMAdapter(nn.Module):
    """A spectralized transformers causal LM behind GPT's training interface; raises ValueError for
    a model `spectralize` has not been applied to."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        settings = getattr(model.config, SURGERY_KEY, None)
        if settings is None:
            raise ValueError("CausalLMAdapter wraps a spectralized model: call spectralize(model) first")
        self.model = model
        # What the trainer reads from GPT.cfg (vocab, length, position settings).
        self.cfg: GPTConfig = surgery_config(model.config, settings["spectral_heads"], settings["phase_init_std"],
                                             settings["spectral_lr_mult"])

    def forward(self, input_ids: Tensor, labels: Tensor | None = None,
                return_logits: bool = True) -> tuple[Tensor | None, Tensor | None]:
        """input_ids (B, T) -> (logits (B, T, vocab), loss): for ALIGNED labels (B, T) (labels[t] is
        the target at position t, -100 ignored) the mean cross-entropy, a float32 scalar, else None:
        exactly GPT.forward's contract (the training step passes `return_logits=False`, which
        returns None for the logits; they are built here either way)."""
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        loss = None
        if labels is not None:
            loss = cross_entropy(logits, labels)
        return (logits if return_logits else None), loss

    def set_activation_checkpointing(self, every: int) -> None:
        """GPT's switch on the transformers model: transformers recomputes all decoder layers or
        none, so only 0 (off) and 1 (every block) exist here; anything else raises BifocalError."""
        if every not in (0, 1):
            raise BifocalError(f"train.activation_checkpointing={every}: a --init-from-hf model checkpoints "
                               "every block or none (0 or 1)")
        set_checkpointing(self.model, bool(every))

    def position_parameters(self) -> dict[str, nn.Parameter]:
        """The spectral heads' Omega, A, Phi, by name (see bifocal.model.position.position_parameters)."""
        return position_parameters(self.model)

    def param_groups(self, weight_decay: float, spectral_lr_mult: float | None = None) -> list[dict]:
        """GPT's optimizer groups (bifocal.model.gpt.param_groups); the multiplier defaults to the surgery's."""
        mult = self.cfg.position.spectral_lr_mult if spectral_lr_mult is None else spectral_lr_mult
        return param_groups(self.model, weight_decay, mult)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters of the wrapped model, each shared one once; `non_embedding` leaves out the
        input embedding."""
        n = sum(p.numel() for p in self.model.parameters())
        return n - self.model.get_input_embeddings().weight.numel() if non_embedding else n

    def save_hf(self, out_dir: str | Path, tokenizer: Any = None) -> Path:
        """Write a directory that `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
        and `load_spectralized(dir)` load with the learned spectral parameters. `tokenizer`: a
        transformers tokenizer (save_pretrained) or None. Returns the directory; raises ValueError
        for a model class with no spectralized counterpart (modeling_spectralized.CLASSES)."""
        from .hf.export_code import write_code
        from .hf.modeling_spectralized import CLASSES

        base = type(self.model).__name__
        if base not in CLASSES:
            raise ValueError(f"saving spectralized {base} is not supported (supported: {', '.join(CLASSES)})")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        # The live config stays the stock one; only the saved copy points at the remote code.
        config = json.loads((out / "config.json").read_text())
        config["architectures"] = [CLASSES[base]]
        config["auto_map"] = {"AutoModelForCausalLM": f"modeling_spectralized.{CLASSES[base]}"}
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_code(out, ["hf/modeling_spectralized.py"])
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        return out


def _read_weights(hf_dir: Path, names: set[str]) -> dict[str, Tensor]:
    """The tensors `names` from a directory's safetensors files (single or sharded)."""
    from safetensors import safe_open

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {weight_map[n] for n in names if n in weight_map}
    else:
        files = {"model.safetensors"}
    found: dict[str, Tensor] = {}
    for fname in sorted(files):
        path = hf_dir / fname
        if not path.is_file():
            raise FileNotFoundError(f"{hf_dir}: weights file {fname} is missing")
        with safe_open(str(path), framework="pt") as f:
            for key in set(f.keys()) & names:
                found[key] = f.get_tensor(key)
    return found


def load_spectralized(hf_dir: str | Path, spectral_heads: int | None = None, phase_init_std: float = 1e-3,
                      spectral_lr_mult: float = 1.0, dtype: torch.dtype | None = None) -> CausalLMAdapter:
    """A local Llama-family HF directory, spectralized, as a CausalLMAdapter. A directory written
    by `CausalLMAdapter.save_hf` comes back with its learned spectral parameters and its own
    surgery settings (the arguments then apply only where they agree); a plain one is
    spectralized fresh. Runs no code from the directory; reads safetensors only. Raises
    FileNotFoundError for a missing directory, config.json or weights file, ValueError for a
    `spectral_heads` that disagrees with the saved one or spectral weights missing, and what
    `spectralize` raises. `dtype`: the weights' torch dtype (None: as saved)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    p = Path(hf_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"model directory not found: {p}")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: no config.json")
    config = AutoConfig.from_pretrained(str(p), trust_remote_code=False)
    saved = getattr(config, SURGERY_KEY, None)
    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    verbosity = hf_logging.get_verbosity()
    if saved is not None:
        hf_logging.set_verbosity_error()  # the spectral weights are "unexpected" for the stock class
    try:
        # safetensors only: a pytorch_model.bin is a pickle, and unpickling can run code.
        model = AutoModelForCausalLM.from_pretrained(str(p), config=config, trust_remote_code=False,
                                                     use_safetensors=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if saved is None:
        spectralize(model, spectral_heads, phase_init_std, spectral_lr_mult)
        return CausalLMAdapter(model)
    if spectral_heads is not None and spectral_heads != saved["spectral_heads"]:
        raise ValueError(f"{p} was spectralized with spectral_heads={saved['spectral_heads']}, not {spectral_heads}")
    delattr(model.config, SURGERY_KEY)
    spectralize(model, saved["spectral_heads"], saved["phase_init_std"], saved["spectral_lr_mult"])
    names = set(position_parameters(model))
    weights = _read_weights(p, names)
    if set(weights) != names:
        raise ValueError(f"{p}: spectral parameters missing from the weights: {sorted(names - set(weights))[:3]}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in weights.items():
            params[name].copy_(value)
    return CausalLMAdapter(model)

