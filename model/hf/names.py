"""Weight names: the native GPT's, a Llama export's and a custom-code (`bifocal`) export's, both ways.
A rope model without scaling is exactly Llama, so its weights take Llama's names; every other
scheme keeps the native names under `BifocalForCausalLM`'s prefixes."""

from __future__ import annotations

import torch
from torch import Tensor

from ..gpt import GPT
from .hf_config import is_llama_compatible

_LLAMA_LAYER = {  # native suffix within blocks.{i}. -> HF suffix within model.layers.{i}.
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}_proj.weight": f"self_attn.{p}_proj.weight" for p in "qkvo"},
    **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}
_LLAMA_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}


def native_to_llama_name(name: str) -> str:
    """Native GPT weight name -> LlamaForCausalLM's (`blocks.0.attn.q_proj.weight` ->
    `model.layers.0.self_attn.q_proj.weight`); raises ValueError for a weight Llama has not."""
    if name in _LLAMA_TOP:
        return _LLAMA_TOP[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in _LLAMA_LAYER:
        return f"model.layers.{parts[1]}.{_LLAMA_LAYER[parts[2]]}"
    raise ValueError(f"weight {name!r} has no Llama equivalent")


def llama_to_native_name(name: str) -> str:
    """Inverse of `native_to_llama_name`; raises ValueError for a Llama weight GPT has not."""
    inverse_top = {v: k for k, v in _LLAMA_TOP.items()}
    if name in inverse_top:
        return inverse_top[name]
    inverse_layer = {v: k for k, v in _LLAMA_LAYER.items()}
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in inverse_layer:
        return f"blocks.{parts[2]}.{inverse_layer[parts[3]]}"
    raise ValueError(f"Llama weight {name!r} has no bifocal equivalent")


def bifocal_name(name: str) -> str:
    """Native GPT weight name -> its name in a `BifocalForCausalLM` (the decoder under
    `model.decoder.`, the output head as `lm_head`, as in Llama)."""
    return name if name.startswith("lm_head.") else f"model.decoder.{name}"


def native_bifocal_name(name: str) -> str:
    """Inverse of `bifocal_name`; also reads exports written before the base model class existed
    (everything under `model.`). Raises ValueError for a name under neither."""
    for prefix in ("model.decoder.", "model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    if name.startswith("lm_head."):
        return name
    raise ValueError(f"bifocal weight {name!r} is neither under `model.` nor the `lm_head`")


def hf_state_dict(model: GPT, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The model's weights under the names of its export format, cast to `dtype`, on the CPU,
    contiguous; a tied lm_head is left out (transformers re-ties it)."""
    rename = native_to_llama_name if is_llama_compatible(model.cfg) else bifocal_name
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue  # transformers re-ties it from the embedding
        out[rename(name)] = t.detach().to(device="cpu", dtype=dtype).contiguous()
    return out


def native_state_dict(hf_sd: dict[str, Tensor], model_type: str) -> dict[str, Tensor]:
    """Inverse of `hf_state_dict` for a `llama` or `bifocal` directory's weights; raises ValueError
    for another model_type or a weight name without a native equivalent."""
    if model_type == "llama":
        return {llama_to_native_name(k): v for k, v in hf_sd.items()}
    if model_type == "bifocal":
        return {native_bifocal_name(k): v for k, v in hf_sd.items()}
    raise ValueError(f"model_type {model_type!r} is neither llama nor bifocal")
