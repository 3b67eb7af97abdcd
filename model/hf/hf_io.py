"""Native GPT <-> Hugging Face directories: export (`save_hf`) and load back (`load_exported`).

A `rope` model without eval-time scaling is exactly Llama, so it exports as a plain
`LlamaForCausalLM` that needs no custom code. Every other scheme exports as model_type `bifocal`
with its modeling code in the directory (`trust_remote_code=True`); that code is generated from
the package's own sources at export time (see `bifocal.model.hf.export_code`), never hand-copied.
Weights are safetensors only; nothing is ever unpickled. The parts: weight names (names.py),
config.json (hf_config.py), the tokenizer (hf_tokenizer.py), the model card (card.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import GPTConfig
from ..gpt import GPT
from .card import model_card
from .hf_config import CONFIG, bifocal_config_dict, gpt_config_of, intended_context, is_llama_compatible, llama_config_dict
from .hf_tokenizer import write_tokenizer
from .names import hf_state_dict, native_state_dict

RUN_NAME_KEY = "bifocal_run"  # config.json: the name of the training run an export came from
CODE_ENTRIES = ["hf/configuration_bifocal.py", "hf/modeling_bifocal.py"]
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def geometry_metadata(cfg: GPTConfig) -> dict[str, str]:
    """The head layout, stored in the safetensors header: with n_kv_head == n_head a consistent
    change of n_head and head_dim in config.json leaves every weight's shape unchanged, so the
    weights must say how they were cut into heads."""
    return {"bifocal_n_head": str(cfg.n_head), "bifocal_n_kv_head": str(cfg.n_kv_head),
            "bifocal_head_dim": str(cfg.head_dim)}


def save_hf(model: GPT, tokenizer_dir_or_files: Any, out_dir: str | Path, dtype: torch.dtype | str = torch.float32,
            max_shard_size: int | str = "2GB", extra_card: dict | None = None, context: int | None = None,
            run_name: str | None = None) -> Path:
    """Write a Hugging Face directory: config.json, safetensors weights (sharded with an index
    above `max_shard_size`), tokenizer, generation_config.json and a README.md model card
    (`extra_card`: e.g. {"training_config": ..., "final_metrics": ...}).

    `tokenizer_dir_or_files`: a directory, a tokenizer.json / .model file, a list of files, a
    transformers tokenizer or a bifocal TextTokenizer; None exports without a tokenizer.
    `context`: the intended context declared as max_position_embeddings and the tokenizer's
    model_max_length (what lm-eval uses as max_length); default `intended_context(cfg)`.
    `run_name`: the training run it came from, recorded in config.json as `bifocal_run`.
    `dtype`: a torch dtype or a name of DTYPES; `max_shard_size`: bytes, or a string such as "2GB".
    Returns the directory. Raises ValueError for an unknown dtype name, and what the tokenizer copy
    raises (FileNotFoundError, ValueError) for a tokenizer that is missing or not recognised."""
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
    if run_name is not None:
        config[RUN_NAME_KEY] = run_name  # the name results give the model (bifocal.eval.describe.model_name)
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()  # a re-export with other sharding must not leave stale shards behind
    save_torch_state_dict(hf_state_dict(model, dtype), out, max_shard_size=max_shard_size,
                          metadata={"format": "pt", **geometry_metadata(model.cfg)})
    GenerationConfig(eos_token_id=eos_id, pad_token_id=eos_id, bos_token_id=None).save_pretrained(out)
    (out / "README.md").write_text(model_card(model, fmt, dtype, extra_card))
    return out


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a directory's model.safetensors or sharded index, by name; raises as
    `weight_files` does, and ValueError for a file that is not readable safetensors."""
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
    """model.safetensors, or the shards its index names; raises ValueError for a malformed index and
    FileNotFoundError for a missing file."""
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
    """Check config.json's head layout against the one recorded in the weights' safetensors
    metadata (exports before this record had none: nothing to compare); raises ValueError on a
    difference or an unreadable file."""
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


def load_exported(path: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[GPT, GPTConfig]:
    """(native GPT in eval mode on `device` in `dtype`, its GPTConfig) from an exported directory
    (either format). Raises FileNotFoundError for missing files and ValueError for a config.json
    or weights that are invalid or do not match each other (see `gpt_config_of`, `check_geometry`)."""
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
