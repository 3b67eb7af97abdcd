"""Read the documents of one configured source: local files line by line (JSON lines) or row by
row (parquet) with the row named in every error, Hugging Face datasets through `datasets` (streaming).

Streaming keeps memory flat and writes nothing to the Hugging Face cache. Every document gets a
stable `key` (its `source` field, else a hash of its text) that decides its train/val split.

Invalid Unicode is repaired, never dropped, with one rule for every format: each maximal invalid
UTF-8 byte sequence (Unicode's recommended practice, Python's errors="replace") and each lone
surrogate (a JSON "\\ud800" escape) becomes one U+FFFD; the document is kept and counted
(`Document.repaired`). A record that cannot be read as a document at all (malformed JSON, no text
field, a non-string text) is an error naming the file and its line (JSON lines) or row (parquet).
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .config import SourceConfig
from bifocal.core.errors import BifocalError

_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz", ".jsonl.zst",
                  ".jsonl.zstd", ".json.zst", ".ndjson.zst")
_TEXT_SUFFIXES = (".txt", ".md")
_PARQUET_SUFFIXES = (".parquet",)
_BATCH = 256  # rows per streamed batch: amortises Python overhead, keeps memory small


@dataclass
class Document:
    """One document read from a source: its text (valid Unicode, repaired if need be), its split
    key, whether it was repaired, and its UTF-8 size in bytes."""

    text: str
    key: str  # stable identity for the train/val hash
    repaired: bool = False  # the text was not valid Unicode: repaired with U+FFFD
    nbytes: int = 0  # UTF-8 size, for throughput


_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean(text: str) -> tuple[str, bool, int]:
    """(text, repaired, UTF-8 byte size): each lone surrogate becomes one U+FFFD (a str from JSON or
    `datasets` can hold them; Rust tokenizers and UTF-8 cannot)."""
    try:
        return text, False, len(text.encode("utf-8"))
    except UnicodeEncodeError:
        text = _SURROGATE.sub("\ufffd", text)
        return text, True, len(text.encode("utf-8"))


def _decode(raw: bytes) -> tuple[str, bool]:
    """UTF-8 bytes as text; invalid sequences become U+FFFD (one per maximal invalid subpart)."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), True


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
    """Yield the non-empty documents of `src` (at most max_documents), in a deterministic order.
    Raises BifocalError naming the file and line or row (or the dataset) for files that are
    missing, unsupported or unreadable, a dataset that cannot be opened, or a record that is not a
    document (malformed JSON, no text field, a non-string text)."""
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
        text, repaired, nbytes = _clean(text)
        yield Document(text=text, key=f"#{i}", repaired=repaired, nbytes=nbytes)


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
    for path in source_files(src):
        where, keys = f"source {src.name!r}: {path}", _Keys()
        kind = "text" if src.glob is not None else file_kind(path)
        if kind == "text":  # one document per file, newlines as Python's text mode reads them
            try:
                text, repaired = _decode(path.read_bytes())
            except OSError as exc:
                raise BifocalError(f"{where}: cannot read ({_first_line(exc)})") from None
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            yield _document(text, repaired, None, keys)
        elif kind == "json":
            yield from _json_rows(path, src.text_field, where, keys)
        else:
            yield from _parquet_rows(path, src.text_field, where, keys)


class _Keys:
    """Split keys: a row's `source` field (repeats get "#k", so each stays its own document),
    else the sha1 of its text."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def __call__(self, source: Any, text: str) -> str:
        if isinstance(source, str) and source:
            k = self.seen.get(source, 0)
            self.seen[source] = k + 1
            return source if k == 0 else f"{source}#{k}"
        return "sha1:" + hashlib.sha1(text.encode("utf-8")).hexdigest()


def _document(text: str, repaired: bool, source: Any, keys: _Keys) -> Document:
    text, surrogates, nbytes = _clean(text)
    return Document(text=text, key=keys(source, text), repaired=repaired or surrogates, nbytes=nbytes)


def _text_value(row: Any, field: str, where: str) -> str:
    """The text of one record, or the error naming it (`where` ends in its line or row)."""
    if not isinstance(row, dict):
        raise BifocalError(f"{where} is {type(row).__name__ if row is not None else 'null'}, "
                           f"not an object with a {field!r} field")
    if field not in row:
        raise BifocalError(f"{where} has no field {field!r} (fields: {', '.join(map(str, row)) or 'none'}); "
                           "set text_field in the source config")
    text = row[field]
    if not isinstance(text, str):
        what = "no" if text is None else f"a non-string ({type(text).__name__})"
        raise BifocalError(f"{where} has {what} value for field {field!r}")
    return text


def _open_binary(path: Path):
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _json_rows(path: Path, field: str, where: str, keys: _Keys) -> Iterator[Document]:
    """JSON lines, one object per line (a file holding one JSON array is read whole)."""
    line = 0
    try:
        with _open_binary(path) as f:
            if f.peek(64)[:64].lstrip().startswith(b"["):  # a JSON array of objects
                text, repaired = _decode(f.read())
                items = _loads(text, where)
                if not isinstance(items, list):
                    raise BifocalError(f"{where}: expected JSON lines or an array of objects")
                for i, row in enumerate(items):
                    yield _record(row, field, f"{where}: element {i}", repaired, keys)
                return
            for line, raw in enumerate(f, start=1):
                if raw.strip():
                    text, repaired = _decode(raw)
                    yield _record(_loads(text, f"{where}: line {line}"), field, f"{where}: line {line}", repaired, keys)
    except BifocalError:
        raise
    except Exception as exc:  # damaged compression, unreadable file
        raise BifocalError(f"{where}: cannot read line {line + 1} ({_first_line(exc)})") from None


def _record(row: Any, field: str, at: str, repaired: bool, keys: _Keys) -> Document:
    text = _text_value(row, field, at)
    return _document(text, repaired, row.get("source") if field != "source" else None, keys)


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise BifocalError(f"{where}: not valid JSON ({exc})") from None


def _parquet_rows(path: Path, field: str, where: str, keys: _Keys) -> Iterator[Document]:
    """Parquet strings as bytes, so an invalid UTF-8 value is repaired like any other text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if field not in names:
            raise BifocalError(f"{where}: no field {field!r} (fields: {', '.join(names) or 'none'}); "
                               "set text_field in the source config")
        columns = [field] + (["source"] if "source" in names and field != "source" else [])
        kind = pf.schema_arrow.field(field).type
        is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        for batch in pf.iter_batches(batch_size=_BATCH, columns=columns):
            col = batch.column(0)
            values = (col.cast(pa.large_binary()) if is_text else col).to_pylist()  # bytes: no UTF-8 check
            sources = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(values)
            for j, (value, source) in enumerate(zip(values, sources)):
                if is_text and value is not None:
                    text, repaired = _decode(value)
                else:
                    text, repaired = _text_value({field: value}, field, f"{where}: row {row + j}"), False
                yield _document(text, repaired, source, keys)
            row += len(values)
    except BifocalError:
        raise
    except Exception as exc:  # not parquet, damaged pages, ...
        raise BifocalError(f"{where}: cannot read row {row} ({_first_line(exc)})") from None


def _rows(ds: Any, src: SourceConfig, where: str) -> Iterator[Document]:
    """A `datasets` dataset's rows (hub, saved or builder datasets), read in batches."""
    field, keys = src.text_field, _Keys()
    i = 0
    try:
        for batch in ds.iter(batch_size=_BATCH):
            texts = batch.get(field)
            if texts is None:
                raise BifocalError(f"{where}: row {i} has no field {field!r} "
                                   f"(fields: {', '.join(batch) or 'none'}); set text_field in the source config")
            sources = batch.get("source") if field != "source" else None
            for j, text in enumerate(texts):
                text = _text_value({field: text}, field, f"{where}: row {i + j}")
                yield _document(text, False, sources[j] if sources is not None else None, keys)
            i += len(texts)
    except BifocalError:
        raise
    except Exception as exc:  # datasets reads ahead a batch at a time: name the batch
        raise BifocalError(f"{where}: cannot read rows {i}-{i + _BATCH - 1} ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
