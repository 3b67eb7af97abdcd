"""Bifocal attention inside a transformers Llama-family model (Llama, Mistral, Qwen2, ...).

`apply_surgery` swaps every decoder layer's `self_attn` for a `SpectralAttention` that keeps the
original projections (same parameter names, Qwen2's q/k/v biases included) and rotates q and k
with bifocal's own `SpectralRotary` instead of the model-wide RoPE table: the last
`spectral_heads` query heads get learnable Omega/A/Phi initialised from the model's rope_theta,
the others keep fixed RoPE. With phase 0 the model computes what it computed before.

Imports only bifocal.model's config and position modules (relative), so the exporter can ship
this file with a spectralized model's remote code.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from ..config import GPTConfig, PositionConfig
from ..position import make_context
from ..position.spectral import SpectralRotary
from .compat import one_cache

SURGERY_KEY = "bifocal_surgery"  # config attribute recording how a model was spectralized


def rope_theta_of(config: Any) -> float:
    """The model's RoPE base (rope_theta); raises ValueError for a rope_type other than default or a
    config without rope_theta."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"spectralize supports rope_type 'default' only, this model uses {rope_type!r}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("the model config has no rope_theta")
    return float(theta)


def default_spectral_heads(n_head: int, n_kv_head: int) -> int:
    """Half the query heads, rounded down to whole GQA groups (at least one group)."""
    group = n_head // n_kv_head
    return max(group, (n_head // 2) // group * group)


def surgery_config(config: Any, spectral_heads: int | None, phase_init_std: float,
                   spectral_lr_mult: float) -> GPTConfig:
    """A GPTConfig describing the model's attention, for SpectralRotary and make_context.
    Its validation enforces the GQA alignment of `spectral_heads` (BifocalError); raises ValueError
    as `rope_theta_of` does."""
    n_head = config.num_attention_heads
    n_kv_head = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    if spectral_heads is None:
        spectral_heads = default_spectral_heads(n_head, n_kv_head)
    return GPTConfig(
        vocab_size=config.vocab_size, n_layer=config.num_hidden_layers, n_head=n_head, n_kv_head=n_kv_head,
        d_model=n_head * head_dim, d_ff=getattr(config, "intermediate_size", None),
        max_seq_len=getattr(config, "max_position_embeddings", 2048),
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        position=PositionConfig(scheme="bifocal", rope_base=rope_theta_of(config), spectral_heads=spectral_heads,
                                phase_init_std=phase_init_std, spectral_lr_mult=spectral_lr_mult),
    )


class SpectralAttention(nn.Module):
    """A Llama-family attention with bifocal rotation (SpectralRotary on q (B, n_head, T, d) and
    k (B, n_kv_head, T, d)); everything else as in transformers."""

    def __init__(self, attn: nn.Module, cfg: GPTConfig) -> None:
        super().__init__()
        self.config, self.layer_idx = attn.config, attn.layer_idx
        self.head_dim, self.num_key_value_groups = attn.head_dim, attn.num_key_value_groups
        self.scaling, self.attention_dropout, self.is_causal = attn.scaling, attn.attention_dropout, True
        # Qwen2 sets a per-layer window; Mistral reads the config; Llama has none.
        self.sliding_window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.position = SpectralRotary(cfg)
        self.bifocal_cfg = cfg
        self._eager = sys.modules[type(attn).__module__].eager_attention_forward
        with torch.no_grad():  # live where the projections live
            ref = attn.q_proj.weight
            if ref.device.type != "meta":
                self.position.to(device=ref.device)

    def forward(self, hidden_states: Tensor, position_embeddings: Any = None, attention_mask: Tensor | None = None,
                past_key_values: Any = None, cache: Any = None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        """The decoder layer's call, as transformers' Llama attention takes it: the KV cache under
        either name (`cache` from transformers 5.24 on), positions from `position_ids` (B, T), or
        the cache length onwards; `position_embeddings` (the model-wide RoPE table) is unused.
        hidden_states (B, T, hidden) -> (output (B, T, hidden), attention weights or None)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        cache = one_cache(cache, past_key_values)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        positions = kwargs.get("position_ids")
        if positions is None:
            past = int(cache.get_seq_length(self.layer_idx)) if cache is not None else 0
            positions = torch.arange(past, past + q.shape[2], device=q.device)
        q, k = self.position(q, k, make_context(self.bifocal_cfg, positions.to(q.device)))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager)
        out, weights = attention(
            self, q, k, v, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, sliding_window=self.sliding_window, **kwargs,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers (`model.<base_model_prefix>.layers`) of a Llama-family model; raises
    ValueError when there are none with a `self_attn`."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    layers = getattr(base, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"{type(model).__name__} is not a Llama-family model (no model.layers[i].self_attn)")
    return layers


def apply_surgery(model: nn.Module, spectral_heads: int | None = None, phase_init_std: float = 1e-3,
                  spectral_lr_mult: float = 1.0) -> nn.Module:
    """Replace every layer's attention by `SpectralAttention` in place; records the settings in
    `model.config.bifocal_surgery` (saved with the config, read back on load). Raises ValueError
    for a model that is not Llama-style or is already spectralized."""
    layers = decoder_layers(model)
    if any(isinstance(layer.self_attn, SpectralAttention) for layer in layers):
        raise ValueError("this model is already spectralized")
    cfg = surgery_config(model.config, spectral_heads, phase_init_std, spectral_lr_mult)
    for layer in layers:
        attn = layer.self_attn
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "scaling")):
            raise ValueError(f"{type(attn).__name__} is not a Llama-style attention (q/k/v/o_proj)")
        layer.self_attn = SpectralAttention(attn, cfg)  # position parameters are created in fp32
    setattr(model.config, SURGERY_KEY, {"spectral_heads": cfg.position.spectral_heads,
                                        "phase_init_std": phase_init_std, "spectral_lr_mult": spectral_lr_mult})
    return model
