"""Tokenizers behind one small interface: byte-level BPE (`tokenizers`) or SentencePiece.

A `TextTokenizer` keeps the exact bytes of its file, so `hash` (sha256 of the file) is the same
whether it was just trained, loaded, or copied into a prepared data directory.

Document text is data: a control token's spelling inside a text (`<|endoftext|>`, Llama's `<s>`,
`</s>`, `<|begin_of_text|>`) is encoded as the characters it is made of, never as the control id,
so the only end-of-document and BOS ids in prepared shards are those `prepare` inserts. For a
`tokenizers` file this is its documented `Tokenizer.encode_special_tokens` switch (tokenizers >=
0.19), set on load and not stored in the file; SentencePiece never matches control symbols
(eos/bos/unk) in text.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

from .config import TokenizerConfig
from bifocal.core.errors import BifocalError

EOD_TOKEN = "<|endoftext|>"
# End-of-document names tried, in order, when loading a tokenizer trained elsewhere.
_EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
BPE_FILE = "tokenizer.json"
SP_FILE = "tokenizer.model"
# SentencePiece skips training sentences longer than this many bytes, so long documents are cut.
_SP_MAX_SENTENCE = 4096
# The BPE trainer's time grows with the square of a pre-tokenized word's length (each merge inside
# a word shifts the rest of it), so training text is cut inside runs of non-whitespace (or of
# whitespace) longer than this: one long line of `x`, base64 or minified code costs linear time.
# Encoding is unaffected (linear already); no ordinary word is this long.
_BPE_MAX_RUN = 256
_LONG_RUN = re.compile(r"(?<!\S)\S{%d,}|(?<!\s)\s{%d,}" % (_BPE_MAX_RUN, _BPE_MAX_RUN))


class TextTokenizer:
    """encode/decode plus the facts a prepared data directory records about its tokenizer: `kind`
    (bpe | sentencepiece), `hash` (sha256 hex of the file), `vocab_size`, `eod_id`, `bos_id` (None
    if it adds none). Built from a file's bytes; raises BifocalError for another kind or a
    tokenizer without an end-of-document token."""

    def __init__(self, kind: str, file_bytes: bytes) -> None:
        self.kind = kind
        self._bytes = file_bytes
        self.hash = hashlib.sha256(file_bytes).hexdigest()
        if kind == "bpe":
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(file_bytes.decode("utf-8"))
            self._tok.encode_special_tokens = True  # special tokens' spellings in text stay text
            self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
            ids = [self._tok.token_to_id(t) for t in _EOD_CANDIDATES]
            eod = next((i for i in ids if i is not None), None)
        elif kind == "sentencepiece":
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_proto=file_bytes)
            self.vocab_size = int(self._sp.get_piece_size())
            eod = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        else:
            raise BifocalError(f"unknown tokenizer kind {kind!r}: expected bpe or sentencepiece")
        if eod is None:
            raise BifocalError(f"tokenizer has no end-of-document token (looked for {', '.join(_EOD_CANDIDATES)} / eos)")
        self.eod_id = int(eod)
        self.bos_id = self._bos()
        if kind == "bpe":  # a file may list its eos/bos as plain added tokens: make them special too
            self._tok.add_special_tokens([self._tok.id_to_token(i) for i in (self.eod_id, self.bos_id) if i is not None])

    def _bos(self) -> int | None:
        """The token the tokenizer itself puts at the start of a text (Llama's <s> or
        <|begin_of_text|>): prepared documents start with it, as the model saw in pretraining.
        None for tokenizers that add nothing (bifocal's own)."""
        if self.kind == "sentencepiece":
            return int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None
        plain = self._tok.encode("a", add_special_tokens=False).ids
        special = self._tok.encode("a", add_special_tokens=True).ids
        if len(special) > len(plain) and special[1:1 + len(plain)] == plain and special[0] != self.eod_id:
            return int(special[0])
        return None

    @property
    def filename(self) -> str:
        """The file name it is saved under: tokenizer.json (bpe) or tokenizer.model (SentencePiece)."""
        return BPE_FILE if self.kind == "bpe" else SP_FILE

    def encode(self, text: str) -> list[int]:
        """Token ids of one text; no BOS/EOS added, control-token spellings encoded as text."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode in parallel (Rust/C++ threads); never adds BOS/EOS, the caller appends EOD."""
        if self.kind == "bpe":
            fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # fast skips offsets
            return [e.ids for e in fast(list(texts), add_special_tokens=False)]
        threads = int(os.environ.get("RAYON_NUM_THREADS", "0")) or (os.cpu_count() or 1)
        return self._sp.encode(list(texts), num_threads=threads)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids, special tokens included as their spelling."""
        ids = [int(i) for i in ids]
        if self.kind == "bpe":
            return self._tok.decode(ids, skip_special_tokens=False)
        return self._sp.decode(ids)

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write the tokenizer file (byte-identical to what was loaded) into `directory`; returns
        [its path]."""
        out = Path(directory) / self.filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(self._bytes)
        return [out]

    def __repr__(self) -> str:
        return f"TextTokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id}, hash={self.hash[:12]})"


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """Load from a prepared data directory, a tokenizer.json, or a SentencePiece .model file;
    raises BifocalError for a missing file, another file type, or a file its library cannot read."""
    p = Path(path)
    if p.is_dir():
        names = [BPE_FILE, SP_FILE]
        try:  # a prepared directory names its tokenizer file in meta.json
            names.insert(0, json.loads((p / "meta.json").read_text())["tokenizer"]["file"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        found = [p / n for n in names if (p / n).is_file()]
        if not found:
            raise BifocalError(f"{p}: no {BPE_FILE} or {SP_FILE} in this directory")
        p = found[0]
    if not p.is_file():
        raise BifocalError(f"tokenizer file not found: {p}")
    data = p.read_bytes()
    if p.suffix == ".json":
        try:
            return TextTokenizer("bpe", data)
        except BifocalError:
            raise
        except Exception as exc:  # tokenizers raises plain Exception on a malformed file
            raise BifocalError(f"{p}: not a valid tokenizers JSON file ({str(exc).splitlines()[0]})") from None
    if p.suffix == ".model":
        try:
            return TextTokenizer("sentencepiece", data)
        except BifocalError:
            raise
        except Exception as exc:
            raise BifocalError(f"{p}: not a valid SentencePiece model ({str(exc).splitlines()[0]})") from None
    raise BifocalError(f"{p}: unknown tokenizer file type (expected tokenizer.json or a SentencePiece .model)")


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, out_dir: str | os.PathLike) -> TextTokenizer:
    """Train on `texts` (capped at cfg.train_chars characters), save into out_dir, return it. Raises
    BifocalError when there is no text or SentencePiece's trainer fails."""
    capped = _cap(texts, cfg.train_chars)
    if cfg.type == "bpe":
        data = _train_bpe(capped, cfg.vocab_size)
        kind = "bpe"
    else:
        data = _train_sentencepiece(capped, cfg.vocab_size, cfg.type.split("_", 1)[1])
        kind = "sentencepiece"
    tok = TextTokenizer(kind, data)
    tok.save(out_dir)
    return tok


def _cap(texts: Iterable[str], limit: int) -> Iterator[str]:
    left = limit
    for t in texts:
        if left <= 0:
            return
        if t:
            yield t[:left]
            left -= min(len(t), left)


def _train_bpe(texts: Iterable[str], vocab_size: int) -> bytes:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level: every string round-trips exactly, no unknown tokens, no normalisation.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    n = 0

    def counted() -> Iterator[str]:
        nonlocal n
        for t in texts:
            n += 1
            yield from _cut_long_runs(t)

    tok.train_from_iterator(counted(), trainer=trainer)
    if n == 0:
        raise BifocalError("no text to train the tokenizer on")
    return tok.to_str(pretty=False).encode("utf-8")


def _cut_long_runs(text: str) -> Iterator[str]:
    """`text` in pieces, cut every _BPE_MAX_RUN characters inside longer runs (the lookbehind
    starts a match only where a run starts, so the scan is linear)."""
    pos = 0
    for m in _LONG_RUN.finditer(text):
        for cut in range(m.start() + _BPE_MAX_RUN, m.end(), _BPE_MAX_RUN):
            yield text[pos:cut]
            pos = cut
    yield text[pos:]


def _sp_pieces(texts: Iterable[str]) -> Iterator[str]:
    # SentencePiece trains on "sentences": feed lines (newline kept so it can learn it), cut to size.
    for t in texts:
        for line in t.splitlines(keepends=True):
            while line:
                yield line[: _SP_MAX_SENTENCE // 4]
                line = line[_SP_MAX_SENTENCE // 4:]


def _train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    sentences = _sp_pieces(texts)
    first = next(sentences, None)
    if first is None:
        raise BifocalError("no text to train the tokenizer on")

    def all_sentences() -> Iterator[str]:
        yield first
        yield from sentences

    threads = int(os.environ.get("RAYON_NUM_THREADS", "0")) or (os.cpu_count() or 1)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_sentences(),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            # Exact round trip: no normalisation, keep all whitespace, bytes for anything unseen.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_by_whitespace=True,
            allow_whitespace_only_pieces=True,
            byte_fallback=True,
            character_coverage=0.9995,
            max_sentence_length=_SP_MAX_SENTENCE,
            unk_id=0, bos_id=-1, eos_id=1, pad_id=-1,
            eos_piece=EOD_TOKEN,
            num_threads=threads,
            minloglevel=2,
            train_extremely_large_corpus=False,
        )
    except RuntimeError as exc:
        raise BifocalError(f"SentencePiece training failed: {str(exc).splitlines()[0]}") from None
    return model.getvalue()


def tokenizer_meta(tok: TextTokenizer) -> dict:
    """What meta.json records about a tokenizer."""
    return {"kind": tok.kind, "file": tok.filename, "hash": tok.hash, "vocab_size": tok.vocab_size,
            "eod_id": tok.eod_id, "bos_id": tok.bos_id}


__all__ = ["TextTokenizer", "load_tokenizer", "train_tokenizer", "tokenizer_meta", "EOD_TOKEN"]
