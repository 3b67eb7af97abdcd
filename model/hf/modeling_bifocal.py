"""transformers classes around the native model, following the contract of transformers' Llama
classes (`LlamaModel` / `LlamaForCausalLM`): keyword arguments, KV cache, outputs, gradient
checkpointing, loss.

- `BifocalModel`: the native `Decoder` (embedding, blocks, final norm): hidden states out.
- `BifocalForCausalLM`: BifocalModel + an output head; generation; loss through transformers'
  own `loss_function` (so `num_items_in_batch` from Trainer's gradient accumulation and TRL's
  `shift_labels` mean what they mean for Llama).
- `BifocalForSequenceClassification`: BifocalModel + a score head read at the last real token.

The exporter ships this file next to flattened copies of the model's own sources, so an export
loads with `AutoModel*.from_pretrained(dir, trust_remote_code=True)` and computes exactly what
`bifocal.model.GPT` computes; nothing here re-implements the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast,
                                           SequenceClassifierOutputWithPast)
from transformers.utils import logging

from ..gpt import Decoder, RMSNorm
from .compat import cache_field, one_cache, require_transformers
from .configuration_bifocal import BifocalConfig

require_transformers()
logger = logging.get_logger(__name__)


class _CacheView:
    """A transformers `Cache` behind the interface of GPT's KVCache (length, layer_length, update),
    through the Cache's public methods. Keys are stored after rotation (PoPE's are 2x wide)."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    @property
    def length(self) -> int:
        return int(self.cache.get_seq_length())

    def layer_length(self, layer: int) -> int:
        return int(self.cache.get_seq_length(layer))

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's keys and values (B, H, T, d); returns all of them so far. A cache that
        returns more (a preallocated static or sliding-window cache) would let attention read empty
        slots, so it is refused."""
        expected = self.layer_length(layer) + k.shape[2]
        k, v = self.cache.update(k, v, layer)
        if k.shape[2] != expected:
            raise ValueError(f"bifocal models take transformers' dynamic KV cache only, not a preallocated one "
                             f"({type(self.cache).__name__}, e.g. cache_implementation='static'); drop that option")
        return k, v


def packed_documents(position_ids: Tensor) -> Tensor:
    """(B, T) document index of every token in rows that pack several sequences, each restarting
    its positions (TRL's padding-free packing): a step other than +1 starts a new document. The
    same rule as transformers' `find_packed_sequence_indices`, which Llama applies when
    `position_ids` come without an attention mask and without a cache."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1)


def _output(cls: type, return_dict: bool, cache: Any, **fields: Any) -> Any:
    """A transformers output with the cache under this version's name; a tuple if not return_dict."""
    out = cls(**fields, **{cache_field(cls): cache})
    return out if return_dict else out.to_tuple()


def _cache_of(out: BaseModelOutputWithPast) -> Any:
    return getattr(out, cache_field(type(out)))


class BifocalPreTrainedModel(PreTrainedModel):
    """transformers' base class of the bifocal models: config class, weight init of missing weights
    (normal, std `init_std`; RMSNorm weights 1), gradient checkpointing support."""

    config_class = BifocalConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = ["past_key_values", "cache"]

    def _init_weights(self, module: nn.Module) -> None:
        # Only for weights missing from a checkpoint (a new head); GPT's own init trained the rest.
        std = self.config.bifocal.get("init_std", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class BifocalModel(BifocalPreTrainedModel):
    """The decoder: `last_hidden_state` (B, T, hidden_size), and on request every layer's input
    and the final state (`hidden_states`, n_layer + 1) and attention probabilities (`attentions`,
    (B, n_head, T, cached + T) per layer), as `LlamaModel` returns them."""

    def __init__(self, config: BifocalConfig) -> None:
        super().__init__(config)
        self.decoder = Decoder(config.gpt_config())
        self.gradient_checkpointing = False  # set by gradient_checkpointing_enable (transformers' contract)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding, (vocab_size, hidden_size) (transformers' model contract)."""
        return self.decoder.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the token embedding (transformers' model contract)."""
        self.decoder.embed = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, cache: Cache | None = None, **kwargs: Any) -> Any:
        """`input_ids` (B, T) or `inputs_embeds` (B, T, hidden_size); `attention_mask` (B, cached + T),
        0 at padding (left or right); `position_ids` (B, T), default: the cache length onwards. Rows
        whose `position_ids` restart without an attention mask are packed documents and attend
        within their document only, as in Llama. No cache is built in training. Raises ValueError
        for both or neither of input_ids and inputs_embeds, a preallocated (static) cache or an
        attention_mask that is not 2D."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cfg = self.config
        cache = one_cache(cache, past_key_values)
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.return_dict if return_dict is None else return_dict
        recompute = self.gradient_checkpointing and self.training
        if use_cache is None:
            use_cache = cfg.use_cache and not self.training
        if recompute and use_cache:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing: setting use_cache=False")
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache()
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(f"bifocal models take transformers' dynamic KV cache only, not a preallocated one "
                             f"({type(cache).__name__}, e.g. cache_implementation='static'); drop that option")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2D (batch, cached + new tokens), 1 at tokens and 0 at padding; "
                             f"got shape {tuple(attention_mask.shape)}")
        tokens = input_ids if input_ids is not None else inputs_embeds
        B, T = tokens.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        documents = None
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=tokens.device)[None]
        elif attention_mask is None and cache is None:
            documents = packed_documents(position_ids.expand(B, -1))
        self.decoder.checkpoint_every = 1 if recompute else 0
        if recompute:
            self.decoder.checkpoint_fn = self._gradient_checkpointing_func
        hidden = [] if output_hidden_states else None
        attentions = [] if output_attentions else None
        x = self.decoder(input_ids, inputs_embeds=inputs_embeds, positions=position_ids,
                         cache=_CacheView(cache) if cache is not None else None, attention_mask=attention_mask,
                         documents=documents, hidden_states=hidden, attentions=attentions)
        return _output(BaseModelOutputWithPast, return_dict, cache, last_hidden_state=x,
                       hidden_states=tuple(hidden) if hidden is not None else None,
                       attentions=tuple(attentions) if attentions is not None else None)


class BifocalForCausalLM(BifocalPreTrainedModel, GenerationMixin):
    """BifocalModel + the output head (tied to the embedding when the config says so): next-token
    logits (B, T, vocab_size), loss and generation, as `LlamaForCausalLM`."""

    _tied_weights_keys = {"lm_head.weight": "model.decoder.embed.weight"}

    def __init__(self, config: BifocalConfig) -> None:
        super().__init__(config)
        self.model = BifocalModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding, (vocab_size, hidden_size) (transformers' model contract)."""
        return self.model.decoder.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the token embedding (transformers' model contract)."""
        self.model.decoder.embed = value

    def get_output_embeddings(self) -> nn.Module:
        """The output head, (vocab_size, hidden_size) (transformers' model contract)."""
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        """Replace the output head (transformers' model contract)."""
        self.lm_head = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, cache: Cache | None = None,
                logits_to_keep: int | Tensor = 0, **kwargs: Any) -> Any:
        """As `LlamaForCausalLM.forward`: `labels` (B, T) are the inputs themselves, shifted inside the
        loss, -100 ignored; `**kwargs` carries the loss's own arguments (`num_items_in_batch`:
        the loss is summed and divided by it, as Trainer expects under gradient accumulation).
        `logits_to_keep`: the last N positions' logits only (0: all) or the positions given."""
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=one_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         return_dict=True)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return _output(CausalLMOutputWithPast, return_dict, _cache_of(out), loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class BifocalForSequenceClassification(BifocalPreTrainedModel):
    """Scores (B, num_labels) read at each row's last token that is not padding, as transformers'
    `LlamaForSequenceClassification` does; the loss is transformers' (regression, single- or
    multi-label by `config.problem_type`)."""

    def __init__(self, config: BifocalConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = BifocalModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding, (vocab_size, hidden_size) (transformers' model contract)."""
        return self.model.decoder.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the token embedding (transformers' model contract)."""
        self.model.decoder.embed = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, cache: Cache | None = None, **kwargs: Any) -> Any:
        """As `LlamaForSequenceClassification.forward`: arguments as `BifocalModel.forward`; `labels`
        (B,) class ids or (B, num_labels) targets; logits (B, num_labels) at each row's last token
        that is not `pad_token_id`. Raises ValueError for a batch of more than one row without
        `config.pad_token_id`."""
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=one_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         return_dict=True)
        logits = self.score(out.last_hidden_state)
        B = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and B != 1:
            raise ValueError("sequence classification of a batch needs config.pad_token_id")
        if pad is None or input_ids is None:
            last = torch.full((B,), -1, device=logits.device)
        else:  # the rightmost token that is not padding, for left and right padding alike
            real = (input_ids != pad).to(logits.device, torch.int32)
            last = (torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32) * real).argmax(-1)
        pooled = logits[torch.arange(B, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return _output(SequenceClassifierOutputWithPast, return_dict, _cache_of(out), loss=loss, logits=pooled, hidden_states=out.hidden_states, attentions=out.attentions)
