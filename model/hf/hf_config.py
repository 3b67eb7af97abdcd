"""config.json both ways: a GPTConfig written as a transformers config (Llama's for rope models
transformers computes identically, BifocalConfig otherwise) and read back into a GPTConfig."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bifocal.core.settings import build

from ..config import GPTConfig
from ..schemes import SCALINGS, SCHEMES

CONFIG = "config.json"
AUTO_MAP = {"AutoConfig": "configuration_bifocal.BifocalConfig",
            "AutoModel": "modeling_bifocal.BifocalModel",
            "AutoModelForCausalLM": "modeling_bifocal.BifocalForCausalLM",
            "AutoModelForSequenceClassification": "modeling_bifocal.BifocalForSequenceClassification"}


def intended_context(cfg: GPTConfig) -> int:
    """The context (tokens) an export declares by default: a scaled rope model's original length
    times its factor, else the training length (`bifocal export --context` states another)."""
    scaling = cfg.position.rope_scaling
    return int(scaling.original_max_len * scaling.factor) if scaling is not None else cfg.max_seq_len


def llama_rope(cfg: GPTConfig) -> tuple[dict[str, Any], int] | None:
    """(rope_parameters, max_position_embeddings) of a rope model in transformers' terms, or None
    when its eval-time scaling has no exact transformers equivalent. pi is transformers' `linear`,
    yarn its `yarn`; static NTK is plain RoPE with the enlarged base. Dynamic NTK stays in the
    bifocal format: transformers keeps the frequencies of the longest input seen and takes the
    original length from max_position_embeddings (the declared context)."""
    pos, scaling = cfg.position, cfg.position.rope_scaling
    base = float(pos.rope_base)
    if scaling is None:
        return {"rope_type": "default", "rope_theta": base}, cfg.max_seq_len
    rope_type = SCALINGS[scaling.type].transformers
    if rope_type is None:
        return None
    s, d = float(scaling.factor), cfg.head_dim
    params: dict[str, Any] = {"rope_type": rope_type, "rope_theta": base}
    if scaling.type == "ntk":  # plain RoPE with the enlarged base
        params["rope_theta"] = base * s ** (d / (d - 2))
    elif rope_type == "linear":
        params["factor"] = s
    elif rope_type == "yarn":
        params.update(factor=s, original_max_position_embeddings=scaling.original_max_len,
                      beta_fast=float(scaling.beta_fast), beta_slow=float(scaling.beta_slow))
    return params, intended_context(cfg)


def is_llama_compatible(cfg: GPTConfig) -> bool:
    """rope (with no scaling, or one transformers computes identically) is Llama exactly (same
    layout, norms and rotation)."""
    return SCHEMES[cfg.position.scheme].llama and llama_rope(cfg) is not None


def llama_config_dict(cfg: GPTConfig, dtype: torch.dtype, eos_id: int | None,
                      context: int | None = None) -> dict[str, Any]:
    """config.json of a Llama-compatible model (`is_llama_compatible`) as `LlamaConfig` writes it,
    plus `bifocal_max_seq_len` (the training length) and transformers 4.x's rope keys. `context`:
    max_position_embeddings in tokens (None: `intended_context`); `eos_id` is also the pad id."""
    from transformers import LlamaConfig

    rope_parameters, default_context = llama_rope(cfg)
    context = context or default_context
    hf = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=context,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        rope_parameters=rope_parameters,
        attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    hf.architectures = ["LlamaForCausalLM"]
    hf.dtype = dtype
    out = hf.to_dict()
    out["bifocal_max_seq_len"] = cfg.max_seq_len  # the training length, when the context says more
    out.update(legacy_rope_keys(rope_parameters, dtype))
    return out


def legacy_rope_keys(rope_parameters: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The same rotation and dtype under transformers 4.x's keys (`rope_theta`, `rope_scaling`,
    `torch_dtype`): 4.x ignores `rope_parameters` and would otherwise load a scaled or re-based
    rope model with the default rotation and no error. transformers 5 reads these too (they take
    precedence there), so they must say exactly what `rope_parameters` says."""
    scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    legacy_scaling = None if scaling["rope_type"] == "default" else {**scaling, "type": scaling["rope_type"]}
    return {"rope_theta": rope_parameters["rope_theta"], "rope_scaling": legacy_scaling,
            "torch_dtype": str(dtype).removeprefix("torch.")}


def bifocal_config_dict(cfg: GPTConfig, dtype: torch.dtype, eos_id: int | None,
                        context: int | None = None) -> dict[str, Any]:
    """config.json of a custom-code export (`BifocalConfig`, with `auto_map`); `context` and `eos_id`
    as in `llama_config_dict`."""
    from .configuration_bifocal import BifocalConfig

    hf = BifocalConfig(bifocal=cfg.to_dict(), bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id,
                       max_position_embeddings=context or intended_context(cfg))
    hf.architectures = ["BifocalForCausalLM"]
    hf.auto_map = dict(AUTO_MAP)
    hf.dtype = dtype
    return hf.to_dict()


def gpt_config_from_llama(d: dict[str, Any], where: Path) -> GPTConfig:
    """GPTConfig for a Llama config.json `d` (read from `where`); raises ValueError naming `where`
    for what GPT cannot represent (another activation, biases, a rope_type other than default,
    linear or yarn, head_dim * num_attention_heads != hidden_size)."""
    rope = d.get("rope_parameters") or {"rope_type": "default", "rope_theta": d.get("rope_theta", 10000.0)}
    rope_type = rope.get("rope_type", "default")
    checks = {
        "hidden_act": (d.get("hidden_act", "silu"), "silu"),
        "attention_bias": (d.get("attention_bias", False), False),
        "mlp_bias": (d.get("mlp_bias", False), False),
        "rope_type": (rope_type, rope_type if rope_type in ("default", "linear", "yarn") else "default, linear or yarn"),
    }
    for key, (got, want) in checks.items():
        if got != want:
            raise ValueError(f"{where}: Llama config has {key}={got!r}; bifocal's GPT needs {want!r}")
    n_head = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // n_head
    if head_dim * n_head != d["hidden_size"]:
        raise ValueError(f"{where}: head_dim * num_attention_heads != hidden_size, which GPT cannot represent")
    context = d.get("max_position_embeddings", 2048)
    max_len = d.get("bifocal_max_seq_len") or context
    position: dict[str, Any] = {"scheme": "rope", "rope_base": float(rope["rope_theta"])}
    if rope_type == "linear":  # position interpolation; by default the context is original * factor
        factor = float(rope["factor"])
        if "bifocal_max_seq_len" not in d:
            max_len = max(1, round(context / factor))
        position["rope_scaling"] = {"type": "pi", "factor": factor, "original_max_len": max_len}
    elif rope_type == "yarn":
        position["rope_scaling"] = {"type": "yarn", "factor": float(rope["factor"]),
                                    "original_max_len": int(rope["original_max_position_embeddings"]),
                                    "beta_fast": float(rope.get("beta_fast") or 32.0),
                                    "beta_slow": float(rope.get("beta_slow") or 1.0)}
        if "bifocal_max_seq_len" not in d:
            max_len = int(rope["original_max_position_embeddings"])
    return GPTConfig(
        vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], n_head=n_head,
        n_kv_head=d.get("num_key_value_heads") or n_head, d_model=d["hidden_size"], d_ff=d["intermediate_size"],
        max_seq_len=max_len, tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        norm_eps=d.get("rms_norm_eps", 1e-6), init_std=d.get("initializer_range", 0.02),
        position=position,
    )


def read_config(path: str | Path) -> dict[str, Any]:
    """The config.json of an export directory as a dict; raises FileNotFoundError for a missing
    directory or file, ValueError for one that is not UTF-8 JSON holding an object."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"exported model directory not found: {p}")
    if not (p / CONFIG).is_file():
        raise FileNotFoundError(f"{p}: no {CONFIG} (not an exported model directory)")
    try:
        d = json.loads((p / CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p / CONFIG}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{p / CONFIG}: not UTF-8 text") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p / CONFIG}: must hold a JSON object")
    return d


def gpt_config_of(path: str | Path) -> tuple[GPTConfig, str]:
    """(GPTConfig, model_type "llama" or "bifocal") of an exported directory; raises as
    `read_config` does, ValueError for another model_type or a Llama config GPT cannot represent,
    BifocalError for an invalid `bifocal` section."""
    p = Path(path)
    d = read_config(p)
    model_type = d.get("model_type")
    if model_type == "bifocal":
        if "bifocal" not in d:
            raise ValueError(f"{p / CONFIG}: model_type bifocal without a `bifocal` section")
        return build(GPTConfig, d["bifocal"], "bifocal"), model_type
    if model_type == "llama":
        return gpt_config_from_llama(d, p / CONFIG), model_type
    raise ValueError(f"{p / CONFIG}: model_type {model_type!r} is not an exported bifocal model (llama or bifocal)")
