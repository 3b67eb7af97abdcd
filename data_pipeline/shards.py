"""Packed token shards: one token file and one document-offset file per (source, split).

Both files start with a 16-byte header: an 8-byte magic and the 8-byte run id of the `prepare`
run that wrote them, so a shard copied in from another prepared directory is detected in O(1)
(meta.json records the run id). After the header: little-endian tokens (uint16/uint32), or
uint64 document start offsets (n_documents + 1 values, the last is the token count).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from bifocal.core.errors import BifocalError

# Version of a prepared directory's layout (meta.json + shards); the reader refuses others.
FORMAT_VERSION = 1
HEADER = 16
TOKENS_MAGIC = b"BFCLTOK1"
INDEX_MAGIC = b"BFCLIDX1"


class DataWarning(UserWarning):
    """Recoverable input problems (e.g. invalid UTF-8 replaced)."""


def dtype_for(vocab_size: int) -> str:
    """The token dtype of the shards: "uint16" for vocabularies up to 2^16 ids, else "uint32"."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def shard_names(source: str, split: str) -> tuple[str, str]:
    """(token file, offset file) names of a source's split: `SOURCE.SPLIT.bin`, `SOURCE.SPLIT.idx`."""
    return f"{source}.{split}.bin", f"{source}.{split}.idx"


class ShardWriter:
    """Appends documents (token ids incl. their EOD) to a token file; offsets written on close."""

    def __init__(self, directory: Path, source: str, split: str, dtype: str, run_id: bytes) -> None:
        self.bin_name, self.idx_name = shard_names(source, split)
        self.directory = directory
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.run_id = run_id
        self._f = open(directory / self.bin_name, "wb")
        self._f.write(TOKENS_MAGIC + run_id)
        self._sha = hashlib.sha256()
        self.offsets: list[int] = [0]

    @property
    def tokens(self) -> int:
        """Tokens written so far."""
        return self.offsets[-1]

    @property
    def documents(self) -> int:
        """Documents written so far."""
        return len(self.offsets) - 1

    def add(self, ids: np.ndarray) -> None:
        """Append one document's token ids, (n,) integers, stored in the shard's dtype."""
        data = np.ascontiguousarray(ids, dtype=self.dtype).tobytes()
        self._f.write(data)
        self._sha.update(data)
        self.offsets.append(self.offsets[-1] + len(ids))

    def close(self) -> dict:
        """Close the token file and write the offset file; returns meta.json's entry for the shard:
        bin, idx (file names), tokens, documents and the sha256 of the token data (header excluded)."""
        self._f.close()
        with open(self.directory / self.idx_name, "wb") as f:
            f.write(INDEX_MAGIC + self.run_id)
            f.write(np.asarray(self.offsets, dtype="<u8").tobytes())
        return {"bin": self.bin_name, "idx": self.idx_name, "tokens": self.tokens, "documents": self.documents,
                "sha256": self._sha.hexdigest()}


def _check_header(path: Path, magic: bytes, run_id: bytes) -> None:
    with open(path, "rb") as f:
        head = f.read(HEADER)
    if len(head) < HEADER or head[:8] != magic:
        raise BifocalError(f"{path}: not a bifocal shard (bad header); re-run prepare")
    if head[8:] != run_id:
        raise BifocalError(f"{path}: foreign shard from another prepare run (run id {head[8:].hex()}, "
                           f"meta.json says {run_id.hex()}); re-run prepare")


def open_shard(directory: Path, entry: dict, dtype: str, run_id: bytes) -> tuple[np.memmap, np.ndarray]:
    """(tokens (n_tokens,) memmap of `dtype`, document offsets (n_documents + 1,) int64) of a shard,
    after checking existence, header and sizes against meta.json's `entry`; raises BifocalError
    for a missing, truncated, oversized, foreign or corrupt shard."""
    dt = np.dtype(dtype).newbyteorder("<")
    bin_path, idx_path = directory / entry["bin"], directory / entry["idx"]
    for p in (bin_path, idx_path):
        if not p.is_file():
            raise BifocalError(f"{p}: shard missing (meta.json lists it); re-run prepare")
    n_tok, n_doc = int(entry["tokens"]), int(entry["documents"])
    for p, want in ((bin_path, HEADER + n_tok * dt.itemsize), (idx_path, HEADER + (n_doc + 1) * 8)):
        size = os.path.getsize(p)
        if size != want:
            raise BifocalError(f"{p}: {'truncated' if size < want else 'oversized'} shard: {size} bytes, "
                               f"meta.json expects {want}; re-run prepare")
    _check_header(bin_path, TOKENS_MAGIC, run_id)
    _check_header(idx_path, INDEX_MAGIC, run_id)
    offsets = np.fromfile(idx_path, dtype="<u8", offset=HEADER).astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != n_tok or np.any(np.diff(offsets) < 0):
        raise BifocalError(f"{idx_path}: corrupt document index (offsets do not cover {n_tok} tokens)")
    if n_tok == 0:
        return np.zeros(0, dtype=dt), offsets  # np.memmap refuses empty files
    return np.memmap(bin_path, dtype=dt, mode="r", offset=HEADER, shape=(n_tok,)), offsets


def file_sha256(path: Path) -> str:
    """Hex sha256 of a shard file's data after its 16-byte header (what `ShardWriter.close` records)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(HEADER)
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
