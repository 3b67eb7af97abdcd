"""An export's tokenizer: copied from a tokenizer.json, a SentencePiece model or a transformers
tokenizer so that `AutoTokenizer.from_pretrained(export)` gives the same ids, with a pad token,
left padding and the model's context as `model_max_length`; and read back."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

BPE_FILE = "tokenizer.json"
SP_FILE = "tokenizer.model"
# Files of a tokenizer already saved by transformers (copied as they are).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                      "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")


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
    with the same ids, a pad token and `model_max_length` (= `max_length`, tokens); returns its
    (eos token, eos id), (None, None) without one. `src`: a directory, a tokenizer.json or
    SentencePiece .model, a list of files, or a tokenizer object with `save_pretrained` / `save`.
    Raises FileNotFoundError for missing files, ValueError with no tokenizer.json or .model among them."""
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


def load_tokenizer(path: str | Path) -> Any:
    """The exported directory's tokenizer via transformers' AutoTokenizer, without running the
    directory's code (AutoTokenizer would otherwise load the remote-code config first and ask).
    Raises FileNotFoundError for a directory without tokenizer files."""
    from transformers import AutoTokenizer, PretrainedConfig

    p = Path(path)
    if not any((p / n).is_file() for n in (BPE_FILE, SP_FILE, "tokenizer_config.json")):
        raise FileNotFoundError(f"{p}: no tokenizer files (tokenizer.json / tokenizer.model / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(p), config=PretrainedConfig())
