"""The README.md model card of an export: format, position scheme, sizes, usage, and what the
caller adds (training config, final metrics)."""

from __future__ import annotations

import json

import torch

from ..gpt import GPT
from ..schemes import SCHEMES

def model_card(model: GPT, fmt: str, dtype: torch.dtype, extra: dict | None) -> str:
    """The README.md text: `fmt` "llama" (plain LlamaForCausalLM) or "bifocal" (custom code), the
    weights' `dtype`, and one JSON section per `extra` item (e.g. training_config, final_metrics)."""
    cfg = model.cfg
    pos = cfg.position
    trust = "" if fmt == "llama" else ", trust_remote_code=True"
    scheme = pos.scheme + (f" ({cfg.n_spectral_heads} of {cfg.n_head} heads spectral per layer)"
                           if pos.scheme == "bifocal" else "")
    rows = [
        ("format", "LlamaForCausalLM (no custom code)" if fmt == "llama" else "BifocalForCausalLM (custom code in this directory)"),
        ("position scheme", scheme), ("rope base", pos.rope_base),
        ("rope scaling", pos.rope_scaling and json.dumps(pos.rope_scaling if isinstance(pos.rope_scaling, dict) else vars(pos.rope_scaling))),
        ("layers", cfg.n_layer), ("d_model", cfg.d_model), ("heads (q / kv)", f"{cfg.n_head} / {cfg.n_kv_head}"),
        ("head dim", cfg.head_dim), ("SwiGLU hidden", cfg.d_ff), ("vocab", cfg.vocab_size),
        ("training length", cfg.max_seq_len), ("tied embeddings", cfg.tie_embeddings),
        ("parameters", f"{model.num_params(non_embedding=False):,} ({model.num_params():,} non-embedding)"),
        ("weights dtype", str(dtype).replace("torch.", "")),
    ]
    about = SCHEMES[pos.scheme].about
    lines = ["---", "library_name: transformers", f"tags: [bifocal, causal-lm, position-{pos.scheme}]", "---", "",
             f"# bifocal GPT, `{pos.scheme}` positions", "",
             f"A decoder-only GPT (pre-norm RMSNorm, SwiGLU, Llama layout) trained with bifocal; {about}.", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f"tok = AutoTokenizer.from_pretrained(path{trust})",
              f"model = AutoModelForCausalLM.from_pretrained(path{trust})", "```", ""]
    for key, value in (extra or {}).items():
        title = key.replace("_", " ").capitalize()
        lines += [f"## {title}", "", "```json", json.dumps(value, indent=2, default=str), "```", ""]
    return "\n".join(lines)
