"""`BifocalForCausalLM`: transformers' interface around the native GPT, nothing re-implemented.

The exporter ships this file next to flattened copies of the model's own sources, so an exported
directory loads with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and
computes exactly what `bifocal.model.GPT` computes. Weights are GPT's, under the prefix `model.`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..gpt import GPT, RMSNorm
from .configuration_bifocal import BifocalConfig


class _CacheView:
    """A transformers `Cache` behind the interface of GPT's KVCache (length, layer_length, update).
    Keys are stored after rotation (PoPE's are 2x wide); positions continue from the length."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    @property
    def length(self) -> int:
        return int(self.cache.get_seq_length())

    def layer_length(self, layer: int) -> int:
        return int(self.cache.get_seq_length(layer))

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(k, v, layer)


class BifocalPreTrainedModel(PreTrainedModel):
    config_class = BifocalConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module: nn.Module) -> None:
        # Only for weights missing from a checkpoint; GPT's own init is used at construction.
        std = self.config.bifocal.get("init_std", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class BifocalForCausalLM(BifocalPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: BifocalConfig) -> None:
        super().__init__(config)
        self.model = GPT(config.gpt_config())
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.model.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """transformers conventions: `labels` are the inputs themselves (shifted here, -100
        ignored). Positions always continue from the cache length (`position_ids` is ignored:
        every scheme depends on relative positions only). `attention_mask` may mark padding, left
        or right (batched generation pads on the left)."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("BifocalForCausalLM takes input_ids (inputs_embeds is not supported)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        cache = _CacheView(past_key_values) if past_key_values is not None else None
        aligned = None if labels is None else F.pad(labels[:, 1:], (0, 1), value=-100)
        logits, loss = self.model(input_ids, aligned, cache=cache, attention_mask=attention_mask)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)
