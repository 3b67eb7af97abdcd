"""`prepare`: raw corpora -> tokenizer + packed token shards + meta.json, atomically and idempotently.

Deduplication (`data.dedup`, on by default) comes first: a document whose content repeats an
earlier one's, exactly or nearly (`dedup.py`), is dropped before it is split, so no content is in
both splits or twice in one; meta.json counts the drops per source. Synthetic task sources are not
deduplicated: they repeat instances by design, and `synthetic.held_out` keeps test instances apart.

Split rule (by document, never inside one): a document goes to `val` when
sha1(source name + NUL + document key) read as a fraction in [0, 1) is below `val_fraction`; its key
is its `source` field (repeats get "#k"), else the sha1 of its text. So identical inputs always
split identically. With so few documents that none hashes into val (Austen has 6), a source with
>= 2 documents moves its lowest-hash train document to val, so every such source has a val split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from bifocal.core import logs
from bifocal.core.errors import BifocalError

from .config import DataConfig, SourceConfig
from .dedup import Deduplicator
from .prefetch import prefetch
from .shards import FORMAT_VERSION, DataWarning, ShardWriter, dtype_for
from .sources import Document, origin, read_source, source_files
from .tokenizer import TextTokenizer, load_tokenizer, tokenizer_meta, train_tokenizer

SPLITS = ("train", "val")
_BATCH_CHARS = 1_000_000  # text per encode_batch call: enough docs to keep threads busy, small to start soon
log = logs.get_logger(__name__)


def is_prepared(out_dir: str | os.PathLike) -> bool:
    """True when out_dir holds a finished prepare run of this format (shards are checked on open)."""
    meta = Path(out_dir) / "meta.json"
    try:
        return json.loads(meta.read_text()).get("format_version") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _digest(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def settings_fingerprint(cfg: DataConfig) -> str:
    """Hash of the data settings without any location: the same config prepares the same shards
    wherever its corpora and its output live."""
    return _digest({
        "format_version": FORMAT_VERSION,
        "val_fraction": cfg.val_fraction,
        "dedup": cfg.dedup,
        "tokenizer": {k: v for k, v in dataclasses.asdict(cfg.tokenizer).items() if k != "path"},
        "tokenizer_given": cfg.tokenizer.path is not None,
        "sources": [{k: v for k, v in dataclasses.asdict(s).items() if k != "path"} for s in cfg.sources],
    })


def fingerprint(cfg: DataConfig) -> str:
    """Hash of everything that determines the output: the settings and the bytes of every input
    file (content only: neither paths nor modification times, so copying or `touch` keeps it).
    A sha256 hex digest; raises BifocalError for a missing tokenizer.path or source file."""
    tok = cfg.tokenizer.path
    if tok is not None and not Path(tok).is_file():
        raise BifocalError(f"tokenizer.path: tokenizer file not found: {tok}")
    return _digest({
        "settings": settings_fingerprint(cfg),
        "tokenizer_file": _sha256(Path(tok)) if tok else None,
        "sources": [[_sha256(f) for f in source_files(s)] for s in cfg.sources],
    })


def val_score(source: str, key: str) -> float:
    """Stable pseudo-random fraction in [0, 1) for a document: the first 8 bytes of
    sha1(source + NUL + key), big-endian, / 2^64 (the split rule in the module doc)."""
    digest = hashlib.sha1(f"{source}\0{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def prepare(cfg: DataConfig, out_dir: str | os.PathLike | None = None, workers: int | None = None,
            trust_complete: bool = False) -> Path:
    """Tokenize cfg's sources into `out_dir` (default cfg.prepared_dir); reuse it if already done.

    `trust_complete` (training): a finished directory prepared with the same settings is used as
    is, without reading the raw corpora, so shards copied to a cluster train on their own.
    `workers`: tokenizer threads (RAYON_NUM_THREADS). Returns the directory, absolute. Raises
    BifocalError for invalid workers, missing inputs, unreadable documents, or an existing
    directory prepared from other settings or inputs (nothing is written then)."""
    out = Path(out_dir if out_dir is not None else cfg.prepared_dir).resolve()
    if trust_complete and is_prepared(out):
        recorded = json.loads((out / "meta.json").read_text()).get("settings")  # None: an older prepare
        if recorded == settings_fingerprint(cfg):
            return out
        if recorded is not None:
            raise BifocalError(f"{out} exists and was prepared from a different config; "
                            "choose another data.prepared_dir or delete it")
    if workers is not None:
        if workers < 1:
            raise BifocalError(f"workers={workers} is invalid: must be >= 1")
        # Rust (rayon) reads this when its thread pool starts, i.e. on the first parallel call.
        os.environ["RAYON_NUM_THREADS"] = str(workers)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    fp = fingerprint(cfg)  # also fails fast on missing input files
    log.debug(f"{out}: config and inputs fingerprint {fp}")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):  # an empty folder is fine to fill
        return _existing(out, fp)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # our own pid: a leftover from a crashed earlier run
    tmp.mkdir(parents=True)
    try:
        meta = _build(cfg, tmp, fp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, out)  # atomic: `out` appears complete or not at all
        except OSError:
            if out.exists():  # someone finished the same directory meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
                return _existing(out, fp)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _report(meta, out)
    return out


def _existing(out: Path, fp: str) -> Path:
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        raise BifocalError(f"{out} exists and is not a prepared data directory (no meta.json); "
                           "choose another --out or delete it")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise BifocalError(f"{meta_path}: unreadable meta.json ({type(exc).__name__}); the directory is damaged: "
                           "delete it and prepare again") from None
    if not isinstance(meta, dict):
        raise BifocalError(f"{meta_path}: malformed meta.json (not a JSON object); delete the directory and prepare again")
    if meta.get("fingerprint") == fp and meta.get("format_version") == FORMAT_VERSION:
        log.info(f"{out} is already prepared from the same config and inputs; reusing it")
        return out
    raise BifocalError(f"{out} exists and was prepared from a different config; choose another --out or delete it")


def _build(cfg: DataConfig, tmp: Path, fp: str) -> dict:
    tok = _tokenizer(cfg, tmp)
    dtype = dtype_for(tok.vocab_size)
    run_id = secrets.token_bytes(8)
    t0 = time.perf_counter()
    bar = logs.progress(desc="tokenizing", unit="B", unit_scale=True, log=log, dynamic_ncols=True)
    sources = []
    dedup = Deduplicator() if cfg.dedup else None  # across sources: a later source's copies go too
    try:
        for src in cfg.sources:
            # Synthetic tasks repeat instances by design (held-out ones are kept apart by synthetic.held_out).
            sources.append(_tokenize_source(src, cfg.val_fraction, tok, tmp, dtype, run_id, bar,
                                            dedup if src.synthetic is None else None))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    text_bytes = sum(s["text_bytes"] for s in sources)
    splits = {sp: {"tokens": sum(s["splits"][sp]["tokens"] for s in sources),
                   "documents": sum(s["splits"][sp]["documents"] for s in sources)} for sp in SPLITS}
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "settings": settings_fingerprint(cfg),
        "run_id": run_id.hex(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": tokenizer_meta(tok),
        "dtype": dtype,
        "val_fraction": cfg.val_fraction,
        "split_rule": "val iff sha1(source NUL key) < val_fraction; sources with >= 2 docs get >= 1 val doc",
        "sources": sources,
        "splits": splits,
        "repaired_documents": sum(s["repaired_documents"] for s in sources),
        "duplicates": {kind: sum(s["duplicates"][kind] for s in sources) for kind in ("exact", "near")},
        "dedup_rule": ("drop a document whose whitespace-normalised text equals an earlier one's (exact) or whose "
                       "token 5-gram MinHash estimates Jaccard >= 0.8 with an earlier one's (near)") if cfg.dedup else None,
        "text_bytes": text_bytes,
        "seconds": round(seconds, 3),
        "mb_per_s": round(text_bytes / 1e6 / max(seconds, 1e-9), 3),
    }


def _tokenizer(cfg: DataConfig, tmp: Path) -> TextTokenizer:
    tcfg = cfg.tokenizer
    if tcfg.path:
        tok = load_tokenizer(tcfg.path)
        tok.save(tmp)
        return tok
    total_w = sum(s.weight for s in cfg.sources)
    log.info(f"training {tcfg.type} tokenizer (vocab {tcfg.vocab_size}) on up to {tcfg.train_chars / 1e6:.1f}M chars")

    def sample() -> Iterator[str]:
        # Each source contributes in proportion to its weight, from documents that hash to train.
        bar = logs.progress(total=tcfg.train_chars, desc="tokenizer sample", unit="char", unit_scale=True, log=log,
                            dynamic_ncols=True)
        try:  # closed on errors too, so an error line never shares the bar's terminal line
            for src in cfg.sources:
                budget = int(tcfg.train_chars * src.weight / total_w)
                got = 0
                for doc in read_source(src):
                    got += 1
                    if budget <= 0:
                        break
                    if val_score(src.name, doc.key) < cfg.val_fraction:
                        continue
                    yield doc.text[:budget].replace("\ufffd", "")
                    bar.update(min(budget, len(doc.text)))
                    budget -= len(doc.text)
                if got == 0:
                    raise BifocalError(f"source {src.name!r}: no documents with text in {_where(src)}")
        finally:
            bar.close()

    return train_tokenizer(sample(), tcfg, tmp)


def _where(src: SourceConfig) -> str:
    return src.path or src.hf_dataset or f"synthetic {src.synthetic}"


def _batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
    batch, chars = [], 0
    for d in docs:
        batch.append(d)
        chars += len(d.text)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenize_source(src: SourceConfig, val_fraction: float, tok: TextTokenizer, tmp: Path, dtype: str,
                     run_id: bytes, bar, dedup: Deduplicator | None) -> dict:
    writers = {sp: ShardWriter(tmp, src.name, sp, dtype, run_id) for sp in SPLITS}
    eod = np.array([tok.eod_id], dtype=np.int64)
    bos = np.array([] if tok.bos_id is None else [tok.bos_id], dtype=np.int64)
    repaired = text_bytes = 0
    duplicates = {"exact": 0, "near": 0}
    held: tuple[float, np.ndarray] | None = None  # lowest-score train doc, kept back while val is empty
    for batch in prefetch(_batches(read_source(src))):
        encoded = tok.encode_batch([d.text for d in batch])
        verdicts = dedup.check([d.text for d in batch], encoded) if dedup else [None] * len(batch)
        nbytes = 0
        for doc, ids, duplicate in zip(batch, encoded, verdicts):
            nbytes += doc.nbytes
            repaired += doc.repaired
            if duplicate:
                duplicates[duplicate] += 1
                continue
            arr = np.concatenate([bos, np.asarray(ids, dtype=np.int64), eod])
            score = val_score(src.name, doc.key)
            if score < val_fraction:
                writers["val"].add(arr)
                if held is not None:
                    writers["train"].add(held[1])
                    held = None
            elif val_fraction > 0 and writers["val"].documents == 0:
                if held is None or score < held[0]:
                    if held is not None:
                        writers["train"].add(held[1])
                    held = (score, arr)
                else:
                    writers["train"].add(arr)
            else:
                writers["train"].add(arr)
        text_bytes += nbytes
        bar.update(nbytes)
    if held is not None:  # no document hashed into val: move the lowest-score one there if train keeps one
        writers["val" if writers["train"].documents >= 1 else "train"].add(held[1])
    shards = {sp: w.close() for sp, w in writers.items()}
    n_docs = sum(s["documents"] for s in shards.values())
    if n_docs == 0:
        copies = f" that are not copies of earlier ones ({sum(duplicates.values())} were)" if any(duplicates.values()) else ""
        raise BifocalError(f"source {src.name!r}: no documents with text{copies} in {_where(src)}")
    if repaired:
        warnings.warn(f"source {src.name!r}: {repaired} document(s) were not valid Unicode: kept, each invalid "
                      "sequence or lone surrogate replaced by one U+FFFD", DataWarning, stacklevel=3)
    return {
        "name": src.name,
        "weight": src.weight,
        "origin": origin(src),
        "splits": shards,
        "repaired_documents": repaired,
        "duplicates": duplicates,
        "text_bytes": text_bytes,
    }


def _report(meta: dict, out: Path) -> None:
    sp = meta["splits"]
    log.info(f"prepared {out}: {sp['train']['tokens']:,} train / {sp['val']['tokens']:,} val tokens "
             f"({sp['train']['documents']:,} / {sp['val']['documents']:,} documents) from "
             f"{meta['text_bytes'] / 1e6:.1f} MB of text in {meta['seconds']:.1f} s: {meta['mb_per_s']:.2f} MB/s")
