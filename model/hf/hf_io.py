"""Native GPT <-> Hugging Face directories: export (`save_hf`) and load back (`load_exported`).

A `rope` model without eval-time scaling is exactly Llama, so it exports as a plain
`LlamaForCausalLM` that needs no custom code. Every other scheme exports as model_type `bifocal`
with its modeling code in the directory (`trust_remote_code=True`); that code is generated from
the package's own sources at export time (see `bifocal.model.hf.export_code`), never hand-copied.
Weights are safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import GPTConfig
from ..gpt import GPT

CONFIG = "config.json"
BPE_FILE = "tokenizer.json"
SP_FILE = "tokenizer.model"
# Files of a tokenizer already saved by transformers (copied as they are).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                      "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
AUTO_MAP = {"AutoConfig": "configuration_bifocal.BifocalConfig",
            "AutoModel": "modeling_bifocal.BifocalModel",
            "AutoModelForCausalLM": "modeling_bifocal.BifocalForCausalLM",
            "AutoModelForSequenceClassification": "modeling_bifocal.BifocalForSequenceClassification"}
CODE_ENTRIES = ["hf/configuration_bifocal.py", "hf/modeling_bifocal.py"]
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


# -- weight names -------------------------------------------------------------------------------

_LLAMA_LAYER = {  # native suffix within blocks.{i}. -> HF suffix within model.layers.{i}.
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}_proj.weight": f"self_attn.{p}_proj.weight" for p in "qkvo"},
    **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}
_LLAMA_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}


def native_to_llama_name(name: str) -> str:
    if name in _LLAMA_TOP:
        return _LLAMA_TOP[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in _LLAMA_LAYER:
        return f"model.layers.{parts[1]}.{_LLAMA_LAYER[parts[2]]}"
    raise ValueError(f"weight {name!r} has no Llama equivalent")


def llama_to_native_name(name: str) -> str:
    inverse_top = {v: k for k, v in _LLAMA_TOP.items()}
    if name in inverse_top:
        return inverse_top[name]
    inverse_layer = {v: k for k, v in _LLAMA_LAYER.items()}
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in inverse_layer:
        return f"blocks.{parts[2]}.{inverse_layer[parts[3]]}"
    raise ValueError(f"Llama weight {name!r} has no bifocal equivalent")


def intended_context(cfg: GPTConfig) -> int:
    """The context an export declares by default: a scaled rope model's original length times
    its factor, else the training length (`bifocal export --context` states another)."""
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
    s, d = float(scaling.factor), cfg.head_dim
    context = intended_context(cfg)
    if scaling.type == "pi":
        return {"rope_type": "linear", "factor": s, "rope_theta": base}, context
    if scaling.type == "ntk":
        return {"rope_type": "default", "rope_theta": base * s ** (d / (d - 2))}, context
    if scaling.type == "yarn":
        return {"rope_type": "yarn", "factor": s, "rope_theta": base,
                "original_max_position_embeddings": scaling.original_max_len,
                "beta_fast": float(scaling.beta_fast), "beta_slow": float(scaling.beta_slow)}, context
    return None


def is_llama_compatible(cfg: GPTConfig) -> bool:
    """rope (with no scaling, or one transformers computes identically) is Llama exactly (same
    layout, norms and rotation)."""
    return cfg.position.scheme == "rope" and llama_rope(cfg) is not None


def bifocal_name(name: str) -> str:
    """Native GPT weight name -> its name in a `BifocalForCausalLM` (the decoder under
    `model.decoder.`, the output head as `lm_head`, as in Llama)."""
    return name if name.startswith("lm_head.") else f"model.decoder.{name}"


def native_bifocal_name(name: str) -> str:
    """Inverse of `bifocal_name`; also reads exports written before the base model class existed
    (everything under `model.`)."""
    for prefix in ("model.decoder.", "model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    if name.startswith("lm_head."):
        return name
    raise ValueError(f"bifocal weight {name!r} is neither under `model.` nor the `lm_head`")


def hf_state_dict(model: GPT, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The model's weights under the names of its export format, cast, tied copies dropped."""
    rename = native_to_llama_name if is_llama_compatible(model.cfg) else bifocal_name
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue  # transformers re-ties it from the embedding
        out[rename(name)] = t.detach().to(device="cpu", dtype=dtype).contiguous()
    return out


def native_state_dict(hf_sd: dict[str, Tensor], model_type: str) -> dict[str, Tensor]:
    """Inverse of `hf_state_dict` for a `llama` or `bifocal` directory's weights."""
    if model_type == "llama":
        return {llama_to_native_name(k): v for k, v in hf_sd.items()}
    if model_type == "bifocal":
        return {native_bifocal_name(k): v for k, v in hf_sd.items()}
    raise ValueError(f"model_type {model_type!r} is neither llama nor bifocal")


def load_native_state_dict_into_hf(hf_model: torch.nn.Module, native_sd: dict[str, Tensor]) -> None:
    """Copy a native GPT state dict into a transformers model built from an exported config
    (LlamaForCausalLM or BifocalForCausalLM); every weight must find its place."""
    model_type = hf_model.config.model_type
    if model_type == "llama":
        mapped = {native_to_llama_name(k): v for k, v in native_sd.items()}
    elif model_type == "bifocal":
        mapped = {bifocal_name(k): v for k, v in native_sd.items()}
    else:
        raise ValueError(f"cannot load bifocal weights into model_type {model_type!r}")
    missing, unexpected = hf_model.load_state_dict(mapped, strict=False)
    tied = {"lm_head.weight"} if hf_model.config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


# -- configs ------------------------------------------------------------------------------------

def llama_config_dict(cfg: GPTConfig, dtype: torch.dtype, eos_id: int | None,
                      context: int | None = None) -> dict[str, Any]:
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
    from .configuration_bifocal import BifocalConfig

    hf = BifocalConfig(bifocal=cfg.to_dict(), bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id,
                       max_position_embeddings=context or intended_context(cfg))
    hf.architectures = ["BifocalForCausalLM"]
    hf.auto_map = dict(AUTO_MAP)
    hf.dtype = dtype
    return hf.to_dict()


def gpt_config_from_llama(d: dict[str, Any], where: Path) -> GPTConfig:
    """GPTConfig for a Llama config.json, refusing what GPT cannot represent."""
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


# -- tokenizer ----------------------------------------------------------------------------------

def _eos_of(tokenizer_file: Path) -> tuple[str | None, int | None]:
    """(token, id) of the end-of-text token of a tokenizer.json or SentencePiece model."""
    if tokenizer_file.name.endswith(".model"):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
        eos = sp.eos_id()
        return (sp.id_to_piece(eos), eos) if eos >= 0 else (None, None)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    for cand in EOS_CANDIDATES:
        i = tok.token_to_id(cand)
        if i is not None:
            return cand, i
    return None, None


def _collect_tokenizer(src: Any, staging: Path) -> list[Path]:
    """Tokenizer files for `src`: a directory, a file, a list of files, or an object with
    `save_pretrained` (transformers) or `save(directory)` (bifocal's TextTokenizer)."""
    if hasattr(src, "save_pretrained"):
        src.save_pretrained(staging)
        return [p for p in staging.iterdir() if p.name in HF_TOKENIZER_FILES]
    if hasattr(src, "save") and not isinstance(src, (str, Path)):
        return [Path(p) for p in src.save(staging)]
    if isinstance(src, (list, tuple)):
        files = [Path(p) for p in src]
    else:
        p = Path(src)
        if p.is_dir():
            files = [p / n for n in HF_TOKENIZER_FILES if (p / n).is_file()]
            if not any(f.name in (BPE_FILE, SP_FILE) or f.suffix == ".model" for f in files):
                files += sorted(p.glob("*.model"))[:1]
            if not files:
                raise FileNotFoundError(f"{p}: no tokenizer.json or SentencePiece .model in this directory")
        else:
            files = [p]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {f}")
    return files


def _usable_defaults(tok_cfg: dict, eos: str | None, max_length: int | None) -> dict:
    """A pad token (the end-of-text token, as GPT-2 and Llama exports do), the model's context
    as model_max_length, and left padding (decoder-only batched generation) where unset."""
    if eos is not None and not tok_cfg.get("pad_token"):
        tok_cfg["pad_token"] = eos
    if max_length is not None and not (0 < int(tok_cfg.get("model_max_length") or 0) < 10**9):
        tok_cfg["model_max_length"] = max_length
    tok_cfg.setdefault("padding_side", "left")
    return tok_cfg


def write_tokenizer(src: Any, out_dir: Path, max_length: int | None = None) -> tuple[str | None, int | None]:
    """Copy the tokenizer into `out_dir` so `AutoTokenizer.from_pretrained(out_dir)` loads it
    with the same ids, a pad token and `model_max_length`; returns its (eos token, eos id)."""
    with tempfile.TemporaryDirectory() as tmp:
        files = _collect_tokenizer(src, Path(tmp))
        names = {f.name for f in files}
        main = next((f for f in files if f.name == BPE_FILE), None) or next((f for f in files if f.suffix == ".model"), None)
        if main is None:
            raise ValueError(f"no tokenizer.json or SentencePiece .model among {sorted(names)}")
        eos, eos_id = _eos_of(main)
        if "tokenizer_config.json" in names:  # already a transformers tokenizer: keep its config
            for f in files:
                shutil.copyfile(f, out_dir / f.name)
            path = out_dir / "tokenizer_config.json"
            path.write_text(json.dumps(_usable_defaults(json.loads(path.read_text()), eos, max_length), indent=2) + "\n")
            return eos, eos_id
        if main.name == BPE_FILE:
            shutil.copyfile(main, out_dir / BPE_FILE)
            tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast"}
        else:
            # transformers converts the .model by its own type (unigram or BPE) with byte fallback;
            # Llama's class would force BPE. No BOS and no dummy prefix, as bifocal trains it;
            # ids are checked equal to SentencePiece's in tests/test_hf_export.py.
            shutil.copyfile(main, out_dir / SP_FILE)
            tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
                       "bos_token": None, "unk_token": "<unk>"}
    tok_cfg.update({"eos_token": eos, "clean_up_tokenization_spaces": False})
    _usable_defaults(tok_cfg, eos, max_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return eos, eos_id


# -- export -------------------------------------------------------------------------------------

def _model_card(model: GPT, fmt: str, dtype: torch.dtype, extra: dict | None) -> str:
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
    about = {
        "rope": "every head uses fixed RoPE",
        "spectral": "every head uses learnable Spectral-RoPE (frequency Omega, amplitude A, phase Phi)",
        "bifocal": "per layer, some heads use fixed RoPE and the others learnable Spectral-RoPE (Omega, A, Phi)",
        "pope": "PoPE polar position embeddings with learnable key phase offsets",
        "nope": "no position encoding (the causal mask alone carries order)",
    }[pos.scheme]
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


def geometry_metadata(cfg: GPTConfig) -> dict[str, str]:
    """The head layout, stored in the safetensors header: with n_kv_head == n_head a consistent
    change of n_head and head_dim in config.json leaves every weight's shape unchanged, so the
    weights must say how they were cut into heads."""
    return {"bifocal_n_head": str(cfg.n_head), "bifocal_n_kv_head": str(cfg.n_kv_head),
            "bifocal_head_dim": str(cfg.head_dim)}


def save_hf(model: GPT, tokenizer_dir_or_files: Any, out_dir: str | Path, dtype: torch.dtype | str = torch.float32,
            max_shard_size: int | str = "2GB", extra_card: dict | None = None, context: int | None = None) -> Path:
    """Write a Hugging Face directory: config.json, safetensors weights (sharded with an index
    above `max_shard_size`), tokenizer, generation_config.json and a README.md model card
    (`extra_card`: e.g. {"training_config": ..., "final_metrics": ...}).

    `tokenizer_dir_or_files`: a directory, a tokenizer.json / .model file, a list of files, a
    transformers tokenizer or a bifocal TextTokenizer; None exports without a tokenizer.
    `context`: the intended context declared as max_position_embeddings and the tokenizer's
    model_max_length (what lm-eval uses as max_length); default `intended_context(cfg)`."""
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos, eos_id = (None, None)
    if tokenizer_dir_or_files is not None:
        eos, eos_id = write_tokenizer(tokenizer_dir_or_files, out, context or intended_context(model.cfg))
    fmt = "llama" if is_llama_compatible(model.cfg) else "bifocal"
    if fmt == "llama":
        config = llama_config_dict(model.cfg, dtype, eos_id, context)
    else:
        from .export_code import write_code

        config = bifocal_config_dict(model.cfg, dtype, eos_id, context)
        write_code(out, CODE_ENTRIES)
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()  # a re-export with other sharding must not leave stale shards behind
    save_torch_state_dict(hf_state_dict(model, dtype), out, max_shard_size=max_shard_size,
                          metadata={"format": "pt", **geometry_metadata(model.cfg)})
    GenerationConfig(eos_token_id=eos_id, pad_token_id=eos_id, bos_token_id=None).save_pretrained(out)
    (out / "README.md").write_text(_model_card(model, fmt, dtype, extra_card))
    return out


# -- load ---------------------------------------------------------------------------------------

def read_config(path: str | Path) -> dict[str, Any]:
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


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a directory's model.safetensors or sharded index."""
    from safetensors.torch import load_file

    sd: dict[str, Tensor] = {}
    for f in weight_files(path):
        try:
            sd.update(load_file(str(f)))
        except Exception as exc:  # safetensors raises its own error type for damaged headers and data
            raise ValueError(f"{f}: unreadable safetensors file ({str(exc).splitlines()[0][:120]}); "
                             "truncated or not safetensors") from None
    return sd


def weight_files(path: str | Path) -> list[Path]:
    """model.safetensors, or the shards its index names (each checked to exist)."""
    p = Path(path)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [p / str(s) for s in shards]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index}: malformed index (needs a weight_map of file names)") from None
    else:
        files = [p / "model.safetensors"]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{p}: weights file {f.name} is missing")
    return files


def check_geometry(path: str | Path, cfg: GPTConfig) -> None:
    """config.json's head layout against the one recorded in the weights (exports before this
    record had none: nothing to compare)."""
    from safetensors import safe_open

    want = geometry_metadata(cfg)
    for f in weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as st:
                meta = st.metadata() or {}
        except Exception as exc:
            raise ValueError(f"{f}: unreadable safetensors file ({str(exc).splitlines()[0][:120]})") from None
        for key, value in want.items():
            if key in meta and meta[key] != value:
                name = key.removeprefix("bifocal_")
                raise ValueError(f"{Path(path) / CONFIG} gives {name}={value} but the weights in {f.name} were "
                                 f"trained with {name}={meta[key]}; fix config.json")


def gpt_config_of(path: str | Path) -> tuple[GPTConfig, str]:
    """(GPTConfig, model_type) of an exported directory."""
    p = Path(path)
    d = read_config(p)
    model_type = d.get("model_type")
    if model_type == "bifocal":
        if "bifocal" not in d:
            raise ValueError(f"{p / CONFIG}: model_type bifocal without a `bifocal` section")
        return GPTConfig.from_dict(d["bifocal"]), model_type
    if model_type == "llama":
        return gpt_config_from_llama(d, p / CONFIG), model_type
    raise ValueError(f"{p / CONFIG}: model_type {model_type!r} is not an exported bifocal model (llama or bifocal)")


def load_exported(path: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[GPT, GPTConfig]:
    """An exported directory (either format) as the native GPT, in eval mode."""
    cfg, model_type = gpt_config_of(path)
    check_geometry(path, cfg)
    sd = native_state_dict(read_safetensors(path), model_type)
    model = GPT(cfg)
    expected = model.state_dict()
    for name, tensor in sd.items():
        if name in expected and expected[name].shape != tensor.shape:
            raise ValueError(f"{Path(path) / CONFIG} does not match the weights: {name} has shape "
                             f"{tuple(tensor.shape)}, config.json implies {tuple(expected[name].shape)}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match config.json: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device=device, dtype=dtype).eval(), cfg


def load_tokenizer(path: str | Path) -> Any:
    """The exported directory's tokenizer via transformers' AutoTokenizer, without running the
    directory's code (AutoTokenizer would otherwise load the remote-code config first and ask)."""
    from transformers import AutoTokenizer, PretrainedConfig

    p = Path(path)
    if not any((p / n).is_file() for n in (BPE_FILE, SP_FILE, "tokenizer_config.json")):
        raise FileNotFoundError(f"{p}: no tokenizer files (tokenizer.json / tokenizer.model / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(p), config=PretrainedConfig())


