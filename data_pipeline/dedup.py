"""Content deduplication before the train/val split: exact and near duplicates, in linear time.

A document is dropped when an earlier one (in source order, then file order) has
- the same text after whitespace normalisation (runs of whitespace -> one space, ends stripped):
  a 128-bit BLAKE2b of it, or
- nearly the same token 5-grams: a MinHash signature (Broder 1997) of 64 multiply-add-shift hashes
  (Dietzfelbinger 1996) of its token 5-grams, indexed by locality-sensitive hashing in 16 bands of 4
  rows (Leskovec, Rajaraman, Ullman, Mining of Massive Datasets, ch. 3); a band collision is a
  candidate, kept as a duplicate when the signatures estimate a Jaccard similarity >= 0.8.
Work per document is linear in its length (64 hashes per 5-gram); memory per kept document is
its 256-byte signature and 16 band keys. Documents shorter than 5 tokens are checked exactly only.
"""

from __future__ import annotations

import hashlib

import numpy as np

SHINGLE = 5  # tokens per shingle
PERMUTATIONS, BANDS = 64, 16  # 16 bands x 4 rows
THRESHOLD = 0.8  # estimated Jaccard similarity of 5-gram sets at or above which a document is a near duplicate
_CHUNK = 1 << 14  # shingles hashed at once: bounds memory to PERMUTATIONS x _CHUNK uint64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al. 2014): spreads every input bit over the 64 output bits."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Deduplicator:
    """`check(texts, ids)` -> per document None (keep), "exact" or "near" (drop), in order, each
    document compared with every earlier one kept (in earlier calls or earlier in this one)."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, PERMUTATIONS, dtype=np.uint64)[:, None] | np.uint64(1)  # odd multipliers
        self.b = rng.integers(0, 2**63, PERMUTATIONS, dtype=np.uint64)[:, None]
        self.exact: set[bytes] = set()
        self.bands: list[dict[int, int]] = [{} for _ in range(BANDS)]
        self.signatures = np.zeros((0, PERMUTATIONS), dtype=np.uint32)
        self.kept = 0

    def check(self, texts: list[str], ids: list) -> list[str | None]:
        """Per document of `texts` (with `ids`, each its token ids, a 1-D integer sequence): None
        (kept, and remembered), "exact" or "near" (a duplicate of one kept earlier)."""
        docs = [np.asarray(x, dtype=np.uint64) for x in ids]
        sigs = self.signatures_of(docs)
        # Each band's 4 rows folded into one 64-bit key (a collision only adds a candidate to verify).
        rows = PERMUTATIONS // BANDS
        folded = (sigs.reshape(len(texts), BANDS, rows).astype(np.uint64)
                  * (np.uint64(0x9E3779B97F4A7C15) ** np.arange(rows, dtype=np.uint64))).sum(axis=2)
        out: list[str | None] = []
        for text, doc, sig, keys in zip(texts, docs, sigs, folded.tolist()):
            out.append(self._check_one(text, sig if len(doc) >= SHINGLE else None, keys))
        return out

    def _check_one(self, text: str, sig: np.ndarray | None, keys: list[int]) -> str | None:
        digest = hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).digest()
        if digest in self.exact:
            return "exact"
        self.exact.add(digest)
        if sig is None:  # under 5 tokens: exact duplicates only
            return None
        for band, key in zip(self.bands, keys):
            other = band.get(key)
            if other is not None and np.count_nonzero(self.signatures[other] == sig) >= THRESHOLD * PERMUTATIONS:
                return "near"
        if self.kept == len(self.signatures):  # grow by doubling: amortised O(1) per document
            grown = np.zeros((max(64, 2 * self.kept), PERMUTATIONS), dtype=np.uint32)
            grown[:self.kept] = self.signatures
            self.signatures = grown
        self.signatures[self.kept] = sig
        for band, key in zip(self.bands, keys):
            band.setdefault(key, self.kept)
        self.kept += 1
        return None

    def signatures_of(self, docs: list[np.ndarray]) -> np.ndarray:
        """MinHash of each document's token 5-grams, (n_docs, PERMUTATIONS) uint32 (zeros under 5
        tokens), computed for many documents at once: work linear in their total length."""
        sigs = np.zeros((len(docs), PERMUTATIONS), dtype=np.uint32)
        group: list[int] = []
        size = 0
        for i, ids in enumerate(docs + [None]):
            n = 0 if ids is None else len(ids) - SHINGLE + 1
            if group and (ids is None or size + n > _CHUNK):
                self._minhash_group([docs[j] for j in group], sigs, group)
                group, size = [], 0
            if n > 0:
                group.append(i)
                size += n
        return sigs

    def _minhash_group(self, docs: list[np.ndarray], out: np.ndarray, rows: list[int]) -> None:
        lens = np.array([len(d) for d in docs])
        cat = np.concatenate(docs)
        n = len(cat) - SHINGLE + 1
        h = np.zeros(n, dtype=np.uint64)
        for j in range(SHINGLE):  # a polynomial hash of every 5-gram of the concatenation, then mixed
            h = h * np.uint64(0x100000001B3) + cat[j:j + n]
        h = _mix(h) >> np.uint64(32)  # 32-bit keys: multiply-add-shift is 2-independent on them
        # keep the 5-grams that lie inside one document
        ends = np.repeat(np.cumsum(lens), lens)[:n]
        h = h[np.arange(n) + SHINGLE <= ends]
        starts = np.concatenate([[0], np.cumsum(lens - SHINGLE + 1)[:-1]])
        mins = np.full((PERMUTATIONS, len(docs)), np.iinfo(np.uint64).max, dtype=np.uint64)
        for c in range(0, len(h), _CHUNK):  # a group is one document when it alone exceeds a chunk
            part = (self.a * h[None, c:c + _CHUNK] + self.b) >> np.uint64(32)
            if len(docs) == 1:
                np.minimum(mins[:, 0], part.min(axis=1), out=mins[:, 0])
            else:
                mins = np.minimum.reduceat(part, starts, axis=1)
        out[rows] = mins.T.astype(np.uint32)
