"""Read the documents of one configured source, all through the `datasets` library (streaming).

Streaming keeps memory flat and writes nothing to the Hugging Face cache. Every document gets a
stable `key` (its `source` field, else a hash of its text) that decides its train/val split.
"""

from __future__ import annotations

import codecs
import glob as globlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .config import SourceConfig
from bifocal.core.errors import BifocalError

# Invalid UTF-8 bytes decode to this noncharacter (reserved by Unicode for internal use) so we can
# count the affected documents, then become U+FFFD like errors="replace" would give.
_MARK = "\ufdd0"
_ERRORS = "bifocal_mark_invalid_utf8"
codecs.register_error(_ERRORS, lambda exc: (_MARK, exc.end))

_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz", ".jsonl.zst",
                  ".jsonl.zstd", ".json.zst", ".ndjson.zst")
_TEXT_SUFFIXES = (".txt", ".md")
_PARQUET_SUFFIXES = (".parquet",)
_BATCH = 256  # rows per streamed batch: amortises Python overhead, keeps memory small


@dataclass
class Document:
    text: str
    key: str  # stable identity for the train/val hash
    invalid_utf8: bool = False
    nbytes: int = 0  # UTF-8 size, for throughput


def _clean(text: str) -> tuple[str, bool, int]:
    """(text, had invalid UTF-8, UTF-8 byte size): marked bytes and lone surrogates become U+FFFD."""
    invalid = _MARK in text
    if invalid:
        text = text.replace(_MARK, "\ufffd")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (e.g. a "\ud800" JSON escape): Rust tokenizers reject them
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        data, invalid = text.encode("utf-8"), True
    return text, invalid, len(data)


def file_kind(path: str | os.PathLike) -> str | None:
    """'json' | 'text' | 'parquet' by file name, None if unsupported."""
    name = str(path).lower()
    for kind, suffixes in (("json", _JSON_SUFFIXES), ("text", _TEXT_SUFFIXES), ("parquet", _PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def source_files(src: SourceConfig) -> list[Path]:
    """The local files a path source reads, sorted; BifocalError if there are none."""
    if src.path is None:
        return []
    where = f"source {src.name!r}"
    p = Path(src.path)
    if any(ch in src.path for ch in "*?["):
        files = [Path(f) for f in sorted(globlib.glob(src.path, recursive=True)) if Path(f).is_file()]
        if src.glob is None:
            files = [f for f in files if file_kind(f)]
        if not files:
            raise BifocalError(f"{where}: no supported files match {src.path}")
        return files
    if not p.exists():
        raise BifocalError(f"{where}: file not found: {p}")
    if p.is_dir():
        if src.glob is not None:
            files = sorted(f for f in p.glob(src.glob) if f.is_file())
            if not files:
                raise BifocalError(f"{where}: no files match glob {src.glob!r} in {p}")
        else:
            files = sorted(f for f in p.rglob("*") if f.is_file() and file_kind(f))
            if not files:
                raise BifocalError(f"{where}: no .txt/.jsonl[.gz|.zst]/.parquet files in folder {p}")
        return files
    if src.glob is not None:
        raise BifocalError(f"{where}: glob {src.glob!r} needs a folder path, got the file {p}")
    if file_kind(p) is None:
        raise BifocalError(f"{where}: unsupported file type {p.name} (use .txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet)")
    return [p]


def origin(src: SourceConfig) -> dict[str, Any]:
    """Where a source's documents came from, for meta.json."""
    if src.synthetic is not None:
        return {"synthetic": dict(src.synthetic)}
    if src.hf_dataset is not None:
        return {"hf_dataset": src.hf_dataset, "hf_config": src.hf_config, "split": src.split,
                "data_files": src.data_files, "data_dir": src.data_dir, "revision": src.revision,
                "text_field": src.text_field}
    return {"path": src.path, "glob": src.glob, "text_field": src.text_field}


def read_source(src: SourceConfig) -> Iterator[Document]:
    """Yield the non-empty documents of `src` (at most max_documents), in a deterministic order."""
    n = 0
    for doc in _raw_documents(src):
        if not doc.text or doc.text.isspace():
            continue  # empty documents carry no tokens; an all-empty source is caught by the caller
        yield doc
        n += 1
        if src.max_documents is not None and n >= src.max_documents:
            return


def _raw_documents(src: SourceConfig) -> Iterator[Document]:
    if src.synthetic is not None:
        yield from _synthetic(src)
    elif src.hf_dataset is not None:
        yield from _hub(src)
    else:
        yield from _local(src)


def _synthetic(src: SourceConfig) -> Iterator[Document]:
    from .synthetic import generate_documents  # lazy: written separately, optional for real corpora

    params = {k: v for k, v in src.synthetic.items() if k not in ("task", "n_documents", "seed")}
    gen = generate_documents(src.synthetic["task"], int(src.synthetic["n_documents"]),
                             int(src.synthetic.get("seed", 0)), **params)
    for i, text in enumerate(gen):
        text, invalid, nbytes = _clean(text)
        yield Document(text=text, key=f"#{i}", invalid_utf8=invalid, nbytes=nbytes)


def is_saved_dataset(path: str) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    p = Path(path)
    return p.is_dir() and any((p / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _hub(src: SourceConfig) -> Iterator[Document]:
    from datasets import load_dataset, load_from_disk

    where = f"source {src.name!r}: dataset {src.hf_dataset!r}"
    try:
        if is_saved_dataset(src.hf_dataset):
            ds = load_from_disk(src.hf_dataset)
            if hasattr(ds, "keys"):  # a DatasetDict: pick the split
                if src.split not in ds:
                    raise ValueError(f"no split {src.split!r} (splits: {', '.join(ds)})")
                ds = ds[src.split]
        else:
            ds = load_dataset(src.hf_dataset, src.hf_config, split=src.split, streaming=True,
                              data_files=src.data_files, data_dir=src.data_dir, revision=src.revision)
    except Exception as exc:
        raise BifocalError(f"{where}: cannot open ({_first_line(exc)})") from None
    yield from _rows(ds, src, where)


def _local(src: SourceConfig) -> Iterator[Document]:
    from datasets import load_dataset

    files = source_files(src)
    if src.glob is not None:
        # One document per file (source trees): the text builder in document mode, all files at once.
        groups = [("text", files)]
    else:
        groups = [(file_kind(f), [f]) for f in files]
    for kind, group in groups:
        where = f"source {src.name!r}: {group[0] if len(group) == 1 else src.path}"
        kwargs: dict[str, Any] = {}
        if kind == "json":
            # A non-"utf-8" spelling routes datasets through Python decoding with our error handler.
            kwargs = {"encoding": "utf_8", "encoding_errors": _ERRORS}
        elif kind == "text":
            kwargs = {"sample_by": "document", "encoding_errors": _ERRORS}
        if kind == "json":
            _check_first_record(group[0], where)
        try:
            ds = load_dataset(kind, data_files=[str(f) for f in group], split="train", streaming=True, **kwargs)
        except StopIteration:  # datasets infers the schema from the first rows: none there
            if len(groups) == 1:
                raise BifocalError(f"source {src.name!r}: no documents with text in {group[0]}") from None
            continue
        except Exception as exc:
            raise BifocalError(f"{where}: cannot open ({_first_line(exc)})") from None
        field = "text" if kind == "text" else src.text_field
        yield from _rows(ds, src, where, field)


def _check_first_record(path: Path, where: str) -> None:
    """pyarrow's JSON reader (under `datasets`) crashes the process with a segmentation fault on a
    file whose first record is a bare `null`; refuse such a file before it is handed over."""
    try:
        if path.name.lower().endswith(".gz"):
            import gzip

            with gzip.open(path, "rb") as f:
                head = f.read(4096)
        elif path.name.lower().endswith((".zst", ".zstd")):
            import zstandard

            with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as f:
                head = f.read(4096)
        else:
            with open(path, "rb") as f:
                head = f.read(4096)
    except Exception:  # damaged compression: left to the reader, which reports it as one line
        return
    if head.lstrip().startswith(b"null"):
        raise BifocalError(f"{where}: the first record is `null`, not a JSON object with a text field")


def _rows(ds: Any, src: SourceConfig, where: str, field: str | None = None) -> Iterator[Document]:
    field = field or src.text_field
    seen: dict[str, int] = {}
    i = 0
    try:
        for batch in ds.iter(batch_size=_BATCH):
            texts = batch.get(field)
            if texts is None:
                raise BifocalError(f"{where}: document {i} has no field {field!r} "
                                   f"(fields: {', '.join(batch) or 'none'}); set text_field in the source config")
            sources = batch.get("source") if field != "source" else None
            for j, text in enumerate(texts):
                if not isinstance(text, str):
                    what = "no" if text is None else f"a non-string ({type(text).__name__})"
                    raise BifocalError(f"{where}: document {i + j} has {what} value for field {field!r}")
                text, invalid, nbytes = _clean(text)
                sname = sources[j] if sources is not None else None
                if isinstance(sname, str) and sname:
                    # Duplicate `source` values get an occurrence suffix so each stays its own document.
                    k = seen.get(sname, 0)
                    seen[sname] = k + 1
                    key = sname if k == 0 else f"{sname}#{k}"
                else:
                    key = "sha1:" + hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()
                yield Document(text=text, key=key, invalid_utf8=invalid, nbytes=nbytes)
            i += len(texts)
    except BifocalError:
        raise
    except Exception as exc:  # corrupt gzip, malformed JSON, unreadable parquet, ...
        raise BifocalError(f"{where}: cannot read document {i} ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
