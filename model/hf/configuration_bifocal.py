"""`BifocalConfig`: the transformers config of an exported bifocal model.

It carries the native `GPTConfig` as a plain dict (`bifocal`), the single source of truth, and
mirrors the sizes under transformers' standard names (hidden_size, num_hidden_layers, ...) that
generation utilities and device maps read. Shipped as is in every trust_remote_code export.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ..config import GPTConfig
from .compat import require_transformers

require_transformers()  # an older transformers refuses here, the first file AutoConfig imports

# Standard names derived from the GPTConfig; values found for them in config.json are ignored.
_DERIVED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings")


class BifocalConfig(PretrainedConfig):
    """`bifocal`: the GPTConfig as a dict (validated on construction, BifocalError if invalid);
    the standard size names are derived from it (values given for them are ignored), except
    `max_position_embeddings`, the declared context in tokens (default: the training length)."""

    model_type = "bifocal"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, bifocal: dict[str, Any] | None = None, use_cache: bool = True, **kwargs: Any) -> None:
        cfg = GPTConfig(**(bifocal or {}))  # validates (its own checks); None gives the defaults
        self.bifocal = cfg.to_dict()
        self.use_cache = use_cache
        for key in _DERIVED:
            kwargs.pop(key, None)
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.d_model
        self.intermediate_size = cfg.d_ff
        self.num_hidden_layers = cfg.n_layer
        self.num_attention_heads = cfg.n_head
        self.num_key_value_heads = cfg.n_kv_head
        self.head_dim = cfg.head_dim
        # The intended context (what lm-eval and generation utilities read as the model's
        # length); the exporter may set it beyond the training length. Positions are not limited.
        self.max_position_embeddings = int(kwargs.pop("max_position_embeddings", None) or cfg.max_seq_len)
        self.rms_norm_eps = cfg.norm_eps
        super().__init__(tie_word_embeddings=cfg.tie_embeddings, **kwargs)

    def gpt_config(self) -> GPTConfig:
        """The native GPTConfig this config carries."""
        return GPTConfig(**self.bifocal)
