"""Data settings: plain dataclasses, each field's type, default and description (the attribute
docstring under it) declared once; their checks run on construction. A `data:` section of a run
config is validated against them by pydantic (`bifocal.core.settings.build`, through
`bifocal.run.config.load_config`), after its input paths are made absolute."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from bifocal import data as bundled_data
from bifocal.core.config import SETTINGS, check
from bifocal.core.errors import BifocalError

from .synthetic import TASKS

TOKENIZER_TYPES = ("bpe", "sentencepiece_unigram", "sentencepiece_bpe")
# datasets' file-format builders: `hf_dataset: parquet` etc. read `data_files`, never a repository.
PACKAGED_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "xml")
# Source names become shard file names, so keep them to a portable character set.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

BUNDLED_DATA = bundled_data.ROOT


@dataclass
class SourceConfig:
    """One entry of `data.sources`: a corpus and its mixture weight. Checks raise BifocalError."""

    __pydantic_config__ = SETTINGS
    name: str
    """Source name (names its shard files)."""
    weight: float = 1.0
    """Sampling weight in the training mixture."""
    path: str | None = None
    """A file (.txt .jsonl .jsonl.gz .jsonl.zst .parquet), a folder, or a glob pattern."""
    glob: str | None = None
    """With a folder `path`: e.g. "**/*.py", one document per file (source-code trees)."""
    hf_dataset: str | None = None
    """A hub dataset name, a builder (json, parquet, ...) or a save_to_disk folder."""
    hf_config: str | None = None
    """hf_dataset only: the dataset configuration name."""
    data_files: str | list | dict | None = None
    """hf_dataset only: files or patterns (relative to the config)."""
    data_dir: str | None = None
    """hf_dataset only: a folder inside the dataset repository (or a local one)."""
    revision: str | None = None
    """hf_dataset only: a branch, tag or commit of the hub repository."""
    split: str = "train"
    """Hub datasets only (local files are one "train" split)."""
    text_field: str = "text"
    """The field holding the text (JSON / parquet / datasets)."""
    max_documents: int | None = None
    """Read at most this many documents (null: all)."""
    synthetic: dict | None = None
    """{"task": "dyck"|"modular"|"rotation", "n_documents": int, "seed": int, ...}"""

    def __post_init__(self) -> None:
        where = f"source {self.name!r}"
        check(isinstance(self.name, str) and bool(_NAME_RE.match(self.name)), "name", self.name,
               "must be letters, digits, '_', '-' or '.' (it names shard files)")
        check(isinstance(self.weight, (int, float)) and self.weight >= 0, f"{where}: weight", self.weight,
               "must be a number >= 0")
        self.weight = float(self.weight)
        kinds = [k for k in ("path", "hf_dataset", "synthetic") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise BifocalError(f"{where}: set exactly one of path, hf_dataset, synthetic "
                               f"(got {', '.join(kinds) if kinds else 'none'})")
        check(self.glob is None or self.path is not None, f"{where}: glob", self.glob,
               "needs a folder `path` to search in")
        for key in ("data_files", "data_dir", "revision", "hf_config"):
            check(getattr(self, key) is None or self.hf_dataset is not None, f"{where}: {key}", getattr(self, key),
                  "only applies to an hf_dataset source")
        if self.hf_dataset in PACKAGED_BUILDERS and self.data_files is None and self.data_dir is None:
            # Without files, datasets' packaged builders read the working directory.
            raise BifocalError(f"{where}: hf_dataset={self.hf_dataset!r} is a file-format builder: "
                               "set data_files (or data_dir) to the files it should read")
        check(self.max_documents is None or (isinstance(self.max_documents, int) and self.max_documents > 0),
               f"{where}: max_documents", self.max_documents, "must be a positive integer or null")
        check(isinstance(self.text_field, str) and bool(self.text_field), f"{where}: text_field", self.text_field,
               "must be a non-empty string")
        if self.synthetic is not None:
            syn = self.synthetic
            check(isinstance(syn, Mapping), f"{where}: synthetic", syn, "must be a mapping with task, n_documents, seed")
            check(syn.get("task") in TASKS, f"{where}: synthetic.task", syn.get("task"),
                   f"one of {', '.join(TASKS)}")
            n = syn.get("n_documents")
            check(isinstance(n, int) and n > 0, f"{where}: synthetic.n_documents", n, "must be a positive integer")
            check(isinstance(syn.get("seed", 0), int), f"{where}: synthetic.seed", syn.get("seed"), "must be an integer")
            self.synthetic = dict(syn)


@dataclass
class TokenizerConfig:
    """`data.tokenizer`: the tokenizer to train, or to load from `path`. Checks raise BifocalError."""

    __pydantic_config__ = SETTINGS
    type: str = "bpe"
    """bpe (byte-level BPE, `tokenizers`) | sentencepiece_unigram | sentencepiece_bpe"""
    vocab_size: int = 4096
    """Vocabulary size of a trained tokenizer."""
    path: str | None = None
    """An existing tokenizer.json or SentencePiece .model: loaded instead of training one."""
    train_chars: int = 20_000_000
    """Cap on the characters used to train the tokenizer."""

    def __post_init__(self) -> None:
        check(self.type in TOKENIZER_TYPES, "tokenizer.type", self.type, f"one of {', '.join(TOKENIZER_TYPES)}")
        # 257 = 256 byte symbols + the end-of-document token; above 2^32 ids do not fit the shards.
        check(isinstance(self.vocab_size, int) and 257 <= self.vocab_size < 2**32, "tokenizer.vocab_size",
               self.vocab_size, "must be an integer in [257, 2^32)")
        check(isinstance(self.train_chars, int) and self.train_chars > 0, "tokenizer.train_chars",
               self.train_chars, "must be a positive integer")


def _absolute(value: str, base_dir: Path) -> str:
    if "://" in value or Path(value).is_absolute():
        return value
    return str((base_dir / value).resolve())


def resolve_input_paths(src: dict, base_dir: Path) -> None:
    """Make a raw source mapping's local inputs absolute, relative to `base_dir` (the config
    file's folder): `path`, a local dataset folder named by hf_dataset, and the data_files /
    data_dir of a file-format builder (`hf_dataset: parquet`). A repository's data_files and
    data_dir are relative to the repository and stay as given, as do URLs and hub names.
    Outputs are not inputs: they stay relative to the cwd."""
    if isinstance(src.get("path"), str) and src["path"]:
        src["path"] = _absolute(src["path"], base_dir)
    name = src.get("hf_dataset")
    if isinstance(name, str) and not Path(name).is_absolute() and (base_dir / name).is_dir():
        src["hf_dataset"] = str((base_dir / name).resolve())
    if name not in PACKAGED_BUILDERS:
        return
    if isinstance(src.get("data_dir"), str) and src["data_dir"]:
        src["data_dir"] = _absolute(src["data_dir"], base_dir)
    files = src.get("data_files")
    if isinstance(files, str):
        src["data_files"] = _absolute(files, base_dir)
    elif isinstance(files, list):
        src["data_files"] = [_absolute(f, base_dir) for f in files]
    elif isinstance(files, Mapping):
        src["data_files"] = {k: [_absolute(f, base_dir) for f in ([v] if isinstance(v, str) else v)]
                             for k, v in files.items()}


def _default_sources() -> list[SourceConfig]:
    return [
        SourceConfig(name="austen", weight=1.0, path=str(BUNDLED_DATA / "nl_small_austen.jsonl.gz")),
        SourceConfig(name="pystdlib", weight=1.0, path=str(BUNDLED_DATA / "code_small_pystdlib.jsonl.gz")),
    ]


@dataclass
class DataConfig:
    """`data`: sources, tokenizer, validation split, dedup, where shards go and how windows are
    positioned and masked. Checks raise BifocalError."""

    __pydantic_config__ = SETTINGS
    sources: list[SourceConfig] = field(default_factory=_default_sources)
    """The corpora: each a name, a weight, and a path, hf_dataset or synthetic task."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Train one (type, vocab_size) or load one (path)."""
    val_fraction: float = 0.05
    """Share of documents held out for validation (by document hash)."""
    prepared_dir: str = "runs/data/demo"
    """Where the packed token shards are written (relative to the cwd)."""
    dedup: bool = True
    """Drop exact and near-duplicate documents (MinHash, Jaccard >= 0.8) before the split."""
    positions: str = "continue"
    """Positions inside a training window of packed documents: continue (0 .. T-1 across the
    window) | reset (from 0 at each document start, as Llama 3 and OLMo train)."""
    attention: str = "causal"
    """causal (a token attends to every earlier token of its window) | document (never across a
    document boundary; an SDPA mask)."""

    def __post_init__(self) -> None:
        check(isinstance(self.sources, (list, tuple)) and len(self.sources) > 0, "sources", self.sources,
               "must be a non-empty list")
        self.sources = list(self.sources)
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        check(not dupes, "sources", dupes, "source names must be unique")
        check(sum(s.weight for s in self.sources) > 0, "sources.weight", [s.weight for s in self.sources],
               "at least one source needs a weight > 0")
        check(isinstance(self.val_fraction, (int, float)) and 0.0 <= self.val_fraction < 1.0, "val_fraction",
               self.val_fraction, "must be in [0, 1)")
        check(isinstance(self.prepared_dir, str) and bool(self.prepared_dir), "prepared_dir", self.prepared_dir,
               "must be a non-empty path")
        check(isinstance(self.dedup, bool), "dedup", self.dedup, "must be true or false")
        check(self.positions in ("continue", "reset"), "positions", self.positions, "one of continue, reset")
        check(self.attention in ("causal", "document"), "attention", self.attention, "one of causal, document")
