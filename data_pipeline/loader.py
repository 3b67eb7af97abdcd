"""Read a prepared directory: validation, counter-based window sampling, whole documents.

WindowSampler is stateless apart from a micro-batch counter `c`. Optimizer step s = c // grad_accum
draws its whole global batch, micro_batch * world_size * grad_accum windows, from
np.random.default_rng([seed, s]) (a source by weight, then a uniform start in that source's split),
and micro-batch m = c % grad_accum of rank r takes rows [(m*world_size + r)*mb, ... + mb). So ranks
are disjoint, every split of one global batch (ranks x micro_batch x grad_accum) trains on the same
windows at every step (one process with 4 x 2 accumulated, two ranks with 2 x 2 or 4 x 1), and resume
is exact from {"counter": c} under any such split; with grad_accum 1 step s is global micro-batch s.
Shards are memory-mapped; only the sampled windows are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from bifocal.core.errors import BifocalError

from .shards import FORMAT_VERSION, DataWarning, file_sha256, open_shard, shard_names
from .tokenizer import TextTokenizer, load_tokenizer


class PreparedData:
    """A validated prepared data directory (meta.json + shards + tokenizer file). Opening it raises
    BifocalError for a missing, unreadable, malformed or other-version meta.json, or a shard or
    tokenizer file that is missing or does not match it (see shards.open_shard)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            hint = " (an unfinished run? its .tmp-<pid> sibling is never used)" if self.path.is_dir() else ""
            raise BifocalError(f"{self.path}: not a prepared data directory, no meta.json{hint}; run `bifocal prepare`")
        try:
            self.meta: dict = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise BifocalError(f"{meta_path}: unreadable meta.json ({type(exc).__name__}); re-run prepare") from None
        if not isinstance(self.meta, dict):
            raise BifocalError(f"{meta_path}: malformed meta.json (not a JSON object); re-run prepare")
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:
            raise BifocalError(f"{meta_path}: format_version {version!r}, this bifocal reads {FORMAT_VERSION}; "
                               "re-run prepare")
        try:
            tok = self.meta["tokenizer"]
            self.vocab_size = int(tok["vocab_size"])
            self.eod_id = int(tok["eod_id"])
            self.tokenizer_hash: str = tok["hash"]
            self.dtype: str = self.meta["dtype"]
            run_id = bytes.fromhex(self.meta["run_id"])
            self.weights: dict[str, float] = {s["name"]: float(s["weight"]) for s in self.meta["sources"]}
            self._shards = {(s["name"], split): open_shard(self.path, entry, self.dtype, run_id)
                            for s in self.meta["sources"] for split, entry in s["splits"].items()}
            tok_file = self.path / tok["file"]
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else ""
            raise BifocalError(f"{meta_path}: malformed meta.json ({type(exc).__name__}: {detail[:200]})") from None
        if not tok_file.is_file():
            raise BifocalError(f"{tok_file}: tokenizer file missing (meta.json lists it)")

    @property
    def sources(self) -> list[str]:
        """Source names in meta.json order."""
        return list(self.weights)

    @property
    def splits(self) -> list[str]:
        """Split names present (e.g. train, val), sorted."""
        return sorted({sp for _, sp in self._shards})

    def tokens(self, source: str, split: str) -> np.ndarray:
        """The memory-mapped tokens (n_tokens,) of one source and split, uint16 or uint32 (documents
        each end in eod_id); raises BifocalError for an unknown source or split."""
        return self._shard(source, split)[0]

    def offsets(self, source: str, split: str) -> np.ndarray:
        """Document start offsets into tokens(source, split), (n_documents + 1,) int64; the last value
        is the token count. Raises BifocalError for an unknown source or split."""
        return self._shard(source, split)[1]

    def num_tokens(self, split: str, source: str | None = None) -> int:
        """Tokens in `split` of one source, or of all (None)."""
        names = [source] if source else self.sources
        return sum(len(self.tokens(n, split)) for n in names)

    def _shard(self, source: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            return self._shards[(source, split)]
        except KeyError:
            raise BifocalError(f"{self.path}: no split {split!r} of source {source!r} "
                               f"(sources: {', '.join(self.sources)}; splits: {', '.join(self.splits)})") from None

    def tokenizer(self) -> TextTokenizer:
        """The directory's tokenizer; raises BifocalError when its file's hash differs from meta.json's."""
        tok = load_tokenizer(self.path / self.meta["tokenizer"]["file"])
        if tok.hash != self.tokenizer_hash:
            raise BifocalError(f"{self.path}: tokenizer file hash {tok.hash[:16]} differs from meta.json "
                               f"{self.tokenizer_hash[:16]}; re-run prepare")
        return tok

    def check_ids(self, ids: np.ndarray, source: str, split: str) -> None:
        """Token ids beyond the vocabulary mean a shard was damaged in place (same size, so the
        open-time checks pass); a max over the read window catches it without hashing every shard.
        Raises BifocalError naming the shard when `ids` hold one >= vocab_size."""
        if ids.size and int(ids.max()) >= self.vocab_size:
            shard = self.path / shard_names(source, split)[0]
            raise BifocalError(f"{shard}: token id {int(ids.max())} is outside the {self.vocab_size}-token vocabulary; "
                               f"the shard is corrupted (its sha256 no longer matches meta.json); re-run prepare")

    def check_tokenizer(self, tokenizer_hash: str) -> None:
        """Raise BifocalError unless `tokenizer_hash` is the one the data was prepared with."""
        if tokenizer_hash != self.tokenizer_hash:
            raise BifocalError(f"data at {self.path} was prepared with tokenizer {self.tokenizer_hash[:16]}, "
                               f"the run uses {str(tokenizer_hash)[:16]}")

    def verify(self) -> None:
        """Full content check of every shard against the sha256 in meta.json (reads everything);
        raises BifocalError naming the first that differs."""
        for s in self.meta["sources"]:
            for entry in s["splits"].values():
                if file_sha256(self.path / entry["bin"]) != entry["sha256"]:
                    raise BifocalError(f"{self.path / entry['bin']}: content differs from meta.json sha256; re-run prepare")

    def __repr__(self) -> str:
        return f"PreparedData({str(self.path)!r}, sources={self.sources}, vocab_size={self.vocab_size})"


def _as_data(data: PreparedData | str | os.PathLike) -> PreparedData:
    return data if isinstance(data, PreparedData) else PreparedData(data)


@dataclass
class Batch:
    """One micro-batch: `inputs` and `labels` (B, T), labels[t] the token after inputs[t]; with
    packing, `positions` (B, T) restarting at each document and `documents` (B, T), each token's
    document within its window (0, 1, ...), as GPT.forward takes them."""

    inputs: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None = None
    documents: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> "Batch":
        """The batch with every tensor on `device` (non-blocking copies)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.inputs), move(self.labels), move(self.positions), move(self.documents))

    def shard(self, index: int, count: int) -> "Batch":
        """The `index`-th of `count` contiguous slices of every sequence (B, T/count), for sequence
        parallelism: positions are the slice's global ones (index * T/count + ... when the batch had
        none), so every position scheme rotates each token as in the whole sequence. Raises
        BifocalError when `count` does not divide T."""
        if count == 1:
            return self
        B, T = self.inputs.shape
        if T % count:
            raise BifocalError(f"sequence length {T} does not split into {count} equal shards")
        positions = self.positions if self.positions is not None else torch.arange(T).expand(B, T)
        part = slice(index * T // count, (index + 1) * T // count)
        cut = lambda t: None if t is None else t[:, part].contiguous()  # noqa: E731
        return Batch(cut(self.inputs), cut(self.labels), cut(positions), cut(self.documents))

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments GPT.forward takes besides inputs and labels (none for plain windows)."""
        return {k: v for k, v in (("positions", self.positions), ("documents", self.documents)) if v is not None}


def window_documents(offsets: np.ndarray, start: int, length: int) -> np.ndarray:
    """(length,) int64: the document of each of the `length` input tokens from `start` in a shard
    whose documents begin at `offsets`, counted from 0 at the window's first token."""
    index = np.searchsorted(offsets, np.arange(start, start + length), side="right") - 1
    return (index - index[0]).astype(np.int64)


def reset_positions(documents: np.ndarray) -> np.ndarray:
    """(..., T) positions that restart at 0 where `documents` (..., T) changes (the first segment of
    a window starts at 0 too): Llama 3's and OLMo's positions for packed documents."""
    T = documents.shape[-1]
    index = np.broadcast_to(np.arange(T), documents.shape)
    starts = np.ones(documents.shape, dtype=bool)
    starts[..., 1:] = documents[..., 1:] != documents[..., :-1]
    return (index - np.maximum.accumulate(np.where(starts, index, 0), axis=-1)).astype(np.int64)


class WindowSampler:
    """Random (seq_len + 1)-token windows, mixed across sources by weight; see the module docstring.
    Raises BifocalError for invalid sizes or ranks, an unknown split or source, a negative weight,
    or no source with enough tokens (a train source shorter than seq_len + 1 tokens is an error, a
    validation one is left out with a DataWarning)."""

    def __init__(self, data: PreparedData | str, split: str, seq_len: int, micro_batch: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, weights: dict[str, float] | None = None,
                 grad_accum: int = 1, positions: str = "continue", attention: str = "causal",
                 shard: tuple[int, int] = (0, 1)) -> None:
        self.data = _as_data(data)
        if seq_len < 1 or micro_batch < 1 or world_size < 1 or grad_accum < 1 or not 0 <= rank < world_size:
            raise BifocalError(f"WindowSampler: invalid seq_len={seq_len}, micro_batch={micro_batch}, "
                               f"rank={rank}, world_size={world_size}, grad_accum={grad_accum}")
        if split not in self.data.splits:
            raise BifocalError(f"{self.data.path}: no split {split!r} (have {', '.join(self.data.splits)})")
        w = dict(self.data.weights)
        for name, value in (weights or {}).items():
            if name not in w:
                raise BifocalError(f"weights: unknown source {name!r} in {self.data.path} (sources: {', '.join(w)})")
            if value < 0:
                raise BifocalError(f"weights: {name}={value} is invalid: must be >= 0")
            w[name] = float(value)
        self.split, self.seq_len, self.micro_batch = split, int(seq_len), int(micro_batch)
        self.seed, self.rank, self.world_size, self.grad_accum = int(seed), int(rank), int(world_size), int(grad_accum)
        names, arrays, probs = [], [], []
        for name, weight in w.items():
            if weight <= 0:
                continue
            toks = self.data.tokens(name, split)
            if len(toks) < seq_len + 1:
                msg = (f"source {name!r} has {len(toks)} {split} tokens in {self.data.path}, "
                       f"fewer than seq_len + 1 = {seq_len + 1}")
                if split == "train":
                    raise BifocalError(msg)
                warnings.warn(msg + "; sampling without it", DataWarning, stacklevel=2)
                continue
            names.append(name)
            arrays.append(toks)
            probs.append(weight)
        if not names:
            raise BifocalError(f"{self.data.path}: no source has a weight > 0 and at least {seq_len + 1} {split} tokens")
        self.sources = names
        self.probs = np.asarray(probs, dtype=np.float64) / sum(probs)
        self._tokens = arrays
        self._offsets = [self.data.offsets(name, split) for name in names]
        # What a window of packed documents means to the model (data.positions, data.attention).
        self.positions, self.attention = positions, attention
        # (index, count): this rank's slice of every window under sequence parallelism (Batch.shard);
        # rank and world_size are then the data-parallel ones, shared by the ranks of a sequence.
        self.shard = shard
        self._starts = np.asarray([len(t) - seq_len for t in arrays], dtype=np.int64)  # valid starts per source
        self.counter = 0
        self._drawn: tuple[int, np.ndarray, np.ndarray] | None = None  # the current step's draw

    @property
    def global_batch(self) -> int:
        """Windows per optimizer step over all ranks."""
        return self.micro_batch * self.world_size * self.grad_accum

    def draw(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index, window start in tokens), each (global_batch,) int64, of all samples of
        optimizer step `step`."""
        rng = np.random.default_rng([self.seed, step])
        src = rng.choice(len(self.sources), size=self.global_batch, p=self.probs)
        starts = rng.integers(0, self._starts[src])
        return src, starts

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), each (micro_batch, seq_len) int64: the next micro-batch of this rank."""
        batch = self.sample()
        return batch.inputs, batch.labels

    def sample(self) -> Batch:
        """The next micro-batch of this rank, with the positions (`positions="reset"`) and documents
        (`attention="document"`) the sampler was built for; this rank's `shard` of each window.
        Tensors are int64, (micro_batch, seq_len / shard count)."""
        step, micro = divmod(self.counter, self.grad_accum)
        if self._drawn is None or self._drawn[0] != step:
            self._drawn = (step, *self.draw(step))
        _, src, starts = self._drawn
        self.counter += 1
        lo = (micro * self.world_size + self.rank) * self.micro_batch
        src, starts = src[lo:lo + self.micro_batch], starts[lo:lo + self.micro_batch]
        rows = [self._tokens[s][t:t + self.seq_len + 1] for s, t in zip(src, starts)]
        for s, row in zip(src, rows):
            self.data.check_ids(row, self.sources[s], self.split)
        win = torch.from_numpy(np.stack(rows).astype(np.int64))
        batch = Batch(win[:, :-1].contiguous(), win[:, 1:].contiguous())
        if self.positions == "reset" or self.attention == "document":
            docs = np.stack([window_documents(self._offsets[s], t, self.seq_len) for s, t in zip(src, starts)])
            if self.attention == "document":
                batch.documents = torch.from_numpy(docs)
            if self.positions == "reset":
                batch.positions = torch.from_numpy(reset_positions(docs))
        return batch.shard(*self.shard)

    def state_dict(self) -> dict:
        """The micro-batch counter and what a resume must agree with (seed, split, seq_len, batch
        split, sources), for `load_state_dict`."""
        return {"counter": self.counter, "seed": self.seed, "split": self.split, "seq_len": self.seq_len,
                "micro_batch": self.micro_batch, "world_size": self.world_size, "grad_accum": self.grad_accum,
                "sources": list(self.sources)}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved step under this sampler's split of the global batch; a state of
        another seed, split or global batch is refused with BifocalError (it would not continue the
        same data order), as is a counter in the middle of a step."""
        for key in ("seed", "split"):
            if key in state and state[key] != getattr(self, key):
                raise BifocalError(f"sampler state has {key}={state[key]!r}, this sampler has {getattr(self, key)!r}; "
                                   "resuming would not continue the same data order")
        accum = int(state.get("grad_accum", 1))  # older states: drawn per micro-batch, the same at grad_accum 1
        saved = (int(state.get("micro_batch", self.micro_batch)), int(state.get("world_size", self.world_size)), accum)
        step, micro = divmod(int(state["counter"]), accum)
        if saved[0] * saved[1] * saved[2] != self.global_batch or micro:
            raise BifocalError(f"sampler state draws {saved[0] * saved[1] * saved[2]} windows a step (micro_batch x "
                               f"ranks x grad_accum = {' x '.join(map(str, saved))}), this sampler "
                               f"{self.global_batch}; resuming would not continue the same data order")
        self.counter = step * self.grad_accum


def iter_documents(data: PreparedData | str, split: str = "val", min_tokens: int = 0) -> Iterator[np.ndarray]:
    """Whole documents (int64 tokens, without their end-of-document token) with >= min_tokens tokens,
    source by source in meta.json order, documents in shard order. Raises BifocalError for an
    unknown split or a corrupted shard (see PreparedData.check_ids)."""
    data = _as_data(data)
    if split not in data.splits:
        raise BifocalError(f"{data.path}: no split {split!r} (have {', '.join(data.splits)})")
    for name in data.sources:
        toks, offsets = data.tokens(name, split), data.offsets(name, split)
        for a, b in zip(offsets[:-1], offsets[1:]):
            if b - 1 - a >= min_tokens:
                doc = np.asarray(toks[a:b - 1], dtype=np.int64)
                data.check_ids(doc, name, split)
                yield doc
