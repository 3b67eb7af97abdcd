"""Perplexity at several context lengths, per document and by position, and `bifocal eval ppl`.

Terms. A window of L input tokens starting at document token s predicts each of the tokens
s+1 .. s+L: target t is predicted at position p = t - s - 1 from p + 1 tokens of context
(tokens s .. t-1). A window needs L + 1 tokens of its document.

The protocol, recorded in every row:
  * `min_context` C (default 1): every scored target has at least C tokens of context. C is a
    number of tokens or a fraction of the length ("0.75L": ceil(0.75 L) tokens).
  * `stride` S (default, and at most, L - C + 1): a document's windows start S tokens apart; each
    window scores the targets after its predecessor's last, so every target is scored once, with
    C to L tokens of context. C = 1, S = L is the non-overlapping protocol (every position
    0 .. L-1, contexts 1 .. L mixed); C = 1, S < L is the sliding window of the Position
    Interpolation (arXiv:2306.15595) and YaRN (arXiv:2309.00071) evaluations (the first window
    scores all L targets, later ones their last S); C = 3L/4 scores every target with 3L/4 to L
    tokens of context.
  * `first_target` P and `targets_per_doc` N: document d's targets are its tokens
    P .. min(n_d - 1, P + N - 1). P defaults to the largest C over the requested lengths, so with
    documents of at least max(L) + 1 tokens every length scores the same targets; each row's
    `targets` digest (of the scored (document, token) pairs) shows whether it did.
    The last window of a document is moved back to end at its last token, so no target in range
    is left out for want of a full window; a document shorter than L + 1 tokens gives none.

Windows are taken round-robin over the documents (the first window of each document, then the
second, ...), so a `max_tokens` cap samples every document instead of only the first one (a capped
window drops its earliest targets and keeps the ones with the longest context).

Each row also holds the summed loss per document (`doc_ids`, `doc_loss`, `doc_tokens`: a bootstrap
over documents) and the loss by position (`by_position`: mean loss per position bin).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from bifocal.core import logs
from bifocal.core.errors import BifocalError
from bifocal.model import GPT
from bifocal.model.loss import cross_entropy

from .describe import model_name
from .protocol import MinContext, context_tokens, describe_protocol, parse_protocol, protocol_name, protocol_slug

Documents = Iterable[np.ndarray] | Callable[[int], Iterable[np.ndarray]]
MATCHED = "matched"  # the scaling factor matched to each length: s = max(1, L / L_train)
log = logs.get_logger(__name__)


class PerplexityWarning(UserWarning):
    """A length was skipped (no documents that long, or out of memory)."""


@dataclass(frozen=True)
class Window:
    doc: int  # index into the document list
    start: int  # first input token
    lo: int  # scored targets: window positions lo .. hi-1 (document tokens start+lo+1 .. start+hi)
    hi: int

    @property
    def score(self) -> int:
        return self.hi - self.lo


# ---------------------------------------------------------------------------------------------
# The protocol


def plan_windows(doc_lengths: list[int], length: int, stride: int | None = None, max_tokens: int | None = None,
                 min_context: int = 1, first_target: int | None = None,
                 targets_per_doc: int | None = None) -> list[Window]:
    """The scored windows, round-robin over documents, stopping at max_tokens scored targets.

    Per document of n tokens: targets P = max(first_target, min_context) .. min(n - 1, P + N - 1);
    window j starts at s_j = max(0, P - C) + j * S and scores the targets after window j - 1's
    last up to its own last, s_j + L (the last window moved back to end at token n - 1).
    """
    if not 1 <= min_context <= length:
        raise ValueError(f"min_context={min_context} must be in [1, length={length}]")
    widest = length - min_context + 1
    stride = widest if stride is None else stride
    if not 0 < stride <= widest:
        raise ValueError(f"stride={stride} must be in [1, length - min_context + 1 = {widest}]")
    first = max(first_target or 1, min_context)
    per_doc: list[list[Window]] = []
    for d, n in enumerate(doc_lengths):
        last = n - 1 if targets_per_doc is None else min(n - 1, first + targets_per_doc - 1)
        wins: list[Window] = []
        if n >= length + 1:
            start, done = max(0, first - min_context), first - 1  # done: the last target scored so far
            while done < last:
                s = min(start, n - 1 - length)  # the last window ends at the document's last token
                wins.append(Window(d, s, done - s, min(last, s + length) - s))
                done, start = min(last, s + length), start + stride
        per_doc.append(wins)
    plan: list[Window] = []
    total = 0
    for k in range(max((len(w) for w in per_doc), default=0)):
        for wins in per_doc:
            if k >= len(wins):
                continue
            w = wins[k]
            if max_tokens is not None:
                if total >= max_tokens:
                    return plan
                w = Window(w.doc, w.start, max(w.lo, w.hi - (max_tokens - total)), w.hi)
            plan.append(w)
            total += w.score
    return plan


def doc_id(doc: np.ndarray) -> str:
    """A document's identity: a hash of its tokens (equal documents share it)."""
    return hashlib.blake2b(np.ascontiguousarray(doc, dtype=np.int64).tobytes(), digest_size=8).hexdigest()


def targets_digest(plan: list[Window], ids: list[str]) -> str:
    """A digest of the scored (document, target token) pairs, independent of window layout and order."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for w in plan:
        spans.setdefault(w.doc, []).append((w.start + w.lo + 1, w.start + w.hi + 1))
    text = []
    for d in sorted(spans, key=lambda d: (ids[d], d)):
        merged: list[list[int]] = []
        for a, b in sorted(spans[d]):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        text.append(ids[d] + ":" + ",".join(f"{a}-{b}" for a, b in merged))
    return hashlib.blake2b(";".join(text).encode(), digest_size=8).hexdigest()


def position_edges(length: int, train_len: int | None = None) -> list[int]:
    """Bin edges for loss by position: 0, then 2^(k/4) rounded (quarter octaves), the training
    length, and `length`; bin i holds positions edges[i] .. edges[i+1]-1."""
    edges = {0, length} | {round(2 ** (k / 4)) for k in range(4 * max(1, length.bit_length()) + 1)}
    if train_len:
        edges.add(train_len)
    return sorted(e for e in edges if e <= length)


# ---------------------------------------------------------------------------------------------
# Scoring


def _docs_for(documents: Documents, length: int, cache: list | None) -> list[np.ndarray]:
    if callable(documents):
        return list(documents(length))
    return [d for d in cache if len(d) >= length + 1]  # type: ignore[union-attr]


def _model_device(model: GPT) -> torch.device:
    return next(model.parameters()).device


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


BATCH_TOKENS = 16384  # tokens per batch when no batch size is given (OOM halves it)


def default_batch_size(length: int) -> int:
    """Windows per batch for `length`: about BATCH_TOKENS tokens, 1 to 64 windows."""
    return max(1, min(64, BATCH_TOKENS // length))


@dataclass
class _Sums:
    doc_loss: np.ndarray  # (n_docs,) summed token loss
    doc_tokens: np.ndarray  # (n_docs,)
    pos_loss: np.ndarray  # (length,) summed loss by position
    pos_tokens: np.ndarray  # (length,)


@torch.inference_mode()  # no autograd graph: activations are freed layer by layer
def _score(model: GPT, docs: list[np.ndarray], plan: list[Window], length: int, batch_size: int,
           progress: bool) -> _Sums:
    """Summed token loss per document and per position over the planned windows."""
    device = _model_device(model)
    sums = _Sums(np.zeros(len(docs)), np.zeros(len(docs), dtype=np.int64), np.zeros(length),
                 np.zeros(length, dtype=np.int64))
    bar = logs.progress(total=len(plan), desc=f"ppl L={length}", unit="windows", log=log, disable=not progress,
                        leave=False)
    bar.set_postfix_str(f"batch {batch_size}")
    positions = np.arange(length)
    try:
        for i in range(0, len(plan), batch_size):
            batch = plan[i:i + batch_size]
            win = np.stack([docs[w.doc][w.start:w.start + length + 1] for w in batch]).astype(np.int64)
            keep = np.stack([(positions >= w.lo) & (positions < w.hi) for w in batch])  # (B, L) scored
            x = torch.from_numpy(win[:, :-1]).to(device)
            y = torch.from_numpy(np.where(keep, win[:, 1:], -100)).to(device)  # -100: context only
            logits, _ = model(x)
            nll = cross_entropy(logits, y, reduction="none").view(len(batch), length).double().cpu().numpy()
            np.add.at(sums.doc_loss, [w.doc for w in batch], nll.sum(1))
            np.add.at(sums.doc_tokens, [w.doc for w in batch], keep.sum(1))
            sums.pos_loss += nll.sum(0)
            sums.pos_tokens += keep.sum(0)
            bar.update(len(batch))
    finally:
        bar.close()
    return sums


def _row(length: int, plan: list[Window], docs: list[np.ndarray], sums: _Sums, stride: int, min_context: int,
         first_target: int, targets_per_doc: int | None, train_len: int | None) -> dict:
    tokens = int(sums.doc_tokens.sum())
    loss = float(sums.doc_loss.sum()) / tokens
    used = [d for d in range(len(docs)) if sums.doc_tokens[d] > 0]
    ids = [doc_id(d) for d in docs]
    edges = position_edges(length, train_len)
    bins = [(a, b) for a, b in zip(edges[:-1], edges[1:]) if sums.pos_tokens[a:b].sum() > 0]
    return {"length": int(length), "tokens": tokens, "loss": loss, "ppl": math.exp(min(loss, 700.0)),
            "docs": len(used), "windows": len(plan), "stride": int(stride), "min_context": int(min_context),
            "first_target": int(first_target), "targets_per_doc": targets_per_doc,
            "targets": targets_digest(plan, ids),
            "doc_ids": [ids[d] for d in used], "doc_loss": [float(sums.doc_loss[d]) for d in used],
            "doc_tokens": [int(sums.doc_tokens[d]) for d in used],
            "by_position": {"start": [a for a, _ in bins], "end": [b for _, b in bins],
                            "loss": [float(sums.pos_loss[a:b].sum() / sums.pos_tokens[a:b].sum()) for a, b in bins],
                            "tokens": [int(sums.pos_tokens[a:b].sum()) for a, b in bins]}}


def evaluate_perplexity(model: GPT, documents: Documents, lengths: Iterable[int], stride: int | None = None,
                        max_docs: int | None = None, max_tokens: int | None = None, batch_size: int | None = None,
                        device: str | torch.device | None = None, progress: bool = True,
                        on_skip: Callable[[int, str], None] | None = None, min_context: MinContext = None,
                        first_target: int | None = None, targets_per_doc: int | None = None) -> list[dict]:
    """One row per length that had data: {"length", "tokens", "loss" (mean token loss, nats),
    "ppl", "docs", "windows", "stride", "min_context", "first_target", "targets_per_doc",
    "targets", "doc_ids", "doc_loss", "doc_tokens", "by_position"} (module docstring).

    `documents`: token arrays (filtered per length to those with >= L + 1 tokens), or a callable
    length -> documents (e.g. a prepared split filtered by length). `stride` is capped at each
    length's L - C + 1. A length with no document long enough, a minimum context longer than
    itself, or that runs out of memory is reported through `on_skip(length, reason)` (default: a
    PerplexityWarning) and left out. `batch_size` None: `default_batch_size(length)` windows a batch.
    Raises ValueError for a malformed `min_context` or a `batch_size` < 1.
    """
    if device is not None:
        model = model.to(device)
    model.eval()
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    lengths = list(lengths)
    skip = on_skip or (lambda n, why: warnings.warn(f"length {n}: {why}", PerplexityWarning, stacklevel=3))
    contexts = {n: context_tokens(min_context, n) for n in lengths}
    if first_target is None:
        first_target = default_first_target(min_context, lengths)
    train_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    cache = None if callable(documents) else [np.asarray(d, dtype=np.int64) for d in documents]
    rows = []
    for length in lengths:
        if contexts[length] > length:
            skip(length, f"skipped: min context {contexts[length]} is longer than the window")
            continue
        docs = _docs_for(documents, length, cache)[:max_docs]
        win_stride = min(stride or length, length - contexts[length] + 1)
        plan = plan_windows([len(d) for d in docs], length, win_stride, max_tokens, contexts[length], first_target,
                            targets_per_doc)
        if not plan:
            skip(length, f"skipped: no document has {max(length + 1, first_target + 1)} tokens (needed for "
                         "one window and one target)")
            continue
        bs = batch_size or default_batch_size(length)
        while True:
            try:
                sums = _score(model, docs, plan, length, bs, progress)
                break
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _is_oom(exc):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if bs == 1:
                    skip(length, "skipped: out of memory even with batch size 1")
                    sums = None
                    break
                bs = max(1, bs // 2)  # retry the whole length with smaller batches
        if sums is not None and sums.doc_tokens.sum() > 0:
            rows.append(_row(length, plan, docs, sums, win_stride, contexts[length], first_target, targets_per_doc,
                             train_len))
    return rows


def default_first_target(min_context: MinContext, lengths: list[int]) -> int:
    """The largest minimum context over the lengths (those it fits): every length then scores the
    same targets of documents long enough for the longest."""
    return max([c for n in lengths if (c := context_tokens(min_context, n)) <= n] or [1])


def matched_factor(length: int, train_len: int) -> float:
    """The scaling factor matched to a length: s = L / L_train, 1 at or below the training length."""
    return max(1.0, length / train_len)


def evaluate_scaled(model: GPT, documents: Documents, lengths: list[int], variant: str | None,
                    factor: float | str | None, **kwargs) -> list[dict]:
    """evaluate_perplexity under training-free RoPE scaling `variant` with one `factor` at every
    length (fixed), or with factor MATCHED: s = matched_factor(L) set anew for each length L
    (dynamic NTK: factor 1, as it computes s = L / L_train itself). Rows record their factor."""
    if factor != MATCHED:
        s = apply_scaling(model, variant, factor, lengths)
        rows = evaluate_perplexity(model, documents, lengths, **kwargs)
        return [dict(r, factor=s) for r in rows] if variant else rows
    if kwargs.get("first_target") is None:  # chosen for all lengths, as one evaluate_perplexity call would
        kwargs["first_target"] = default_first_target(kwargs.get("min_context"), lengths)
    rows = []
    for n in lengths:
        s = 1.0 if variant == "dynamic_ntk" else matched_factor(n, model.cfg.max_seq_len)
        apply_scaling(model, variant, s, [n])
        rows += [dict(r, factor=s) for r in evaluate_perplexity(model, documents, [n], **kwargs)]
    return rows


# ---------------------------------------------------------------------------------------------
# Data sources for the command line


def raw_documents(path: str | Path, tokenizer) -> list[np.ndarray]:
    """Tokenize .txt / .jsonl / .jsonl.gz files (or a folder of them) with the model's tokenizer."""
    from bifocal.data_pipeline.config import SourceConfig
    from bifocal.data_pipeline.sources import read_source

    try:
        texts = [doc.text for doc in read_source(SourceConfig(name="eval", path=str(path)))]
    except BifocalError as exc:
        raise BifocalError(f"--data: {exc}") from None
    out = []
    for i in range(0, len(texts), 256):
        out += [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts[i:i + 256])]
    return out


def resolve_documents(model_path: Path, data: str | None, tokenizer) -> tuple[Documents, str]:
    """(documents, description): a prepared dir's validation split, raw files, or by default the
    run's own prepared data (its data.prepared_dir, relative to the cwd as in training)."""
    from bifocal.data_pipeline.loader import PreparedData, iter_documents

    if data is None:
        if not (model_path / "config.yaml").is_file():
            raise BifocalError(f"{model_path} is not a run directory: pass --data (a prepared dir or text files)")
        from bifocal.run.config import load_config

        data = load_config(model_path / "config.yaml").data.prepared_dir
    path = Path(data)
    if not path.exists():
        raise BifocalError(f"--data: {path} not found (prepare it with `bifocal prepare`, or pass --data)")
    if (path / "meta.json").is_file():
        prepared = PreparedData(path)
        if prepared.tokenizer_hash != tokenizer.hash:  # a re-serialised export can differ in bytes only
            log.warning(f"{path} was prepared with a tokenizer file that differs from the model's")
        if "val" not in prepared.splits:
            raise BifocalError(f"--data: {path} has no validation split")
        return (lambda n: iter_documents(prepared, "val", min_tokens=n + 1)), f"{path} (val)"
    return raw_documents(path, tokenizer), str(path)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise BifocalError(f"--lengths {text!r}: expected comma-separated integers, e.g. 512,1024") from None
    if not lengths or any(n < 1 for n in lengths):
        raise BifocalError(f"--lengths {text!r}: expected positive integers")
    return lengths


def apply_scaling(model: GPT, variant: str | None, factor: float | None, lengths: list[int]) -> float:
    """Set training-free RoPE scaling on the model's fixed-frequency heads; returns the factor
    (default: the longest length over the training length, at least 1). No variant: the model as
    trained (a scaling it was fine-tuned with stays; GPT.set_rope_scaling)."""
    if not variant:
        model.set_rope_scaling(None)
        return 1.0
    train_len = model.cfg.max_seq_len
    factor = float(factor) if factor is not None else max(1.0, max(lengths) / train_len)
    if factor < 1:
        raise BifocalError(f"--factor {factor:g}: must be >= 1")
    model.set_rope_scaling({"type": variant, "factor": factor, "original_max_len": train_len})
    return factor


def parse_factor(text: str | float | None) -> float | str | None:
    """--factor: a number >= 1, or "matched" (s = L / L_train at each length L)."""
    if text is None or text == MATCHED:
        return text
    try:
        factor = float(text)
    except ValueError:
        raise BifocalError(f"--factor {text!r}: a number >= 1, or {MATCHED!r} (s = L / L_train at each "
                           "length)") from None
    if not factor >= 1:
        raise BifocalError(f"--factor {text!r}: must be >= 1")
    return factor


def default_out(model_path: Path, variant: str | None, factor: float | str, protocol: str = "windows") -> Path:
    suffix = (f"-{variant}-" + (MATCHED if factor == MATCHED else f"x{factor:g}")) if variant else ""
    return model_path / "eval" / f"ppl{suffix}{protocol_slug(protocol)}.json"


def format_table(rows: list[dict], train_len: int | None = None) -> str:
    lines = [f"{'length':>8} {'docs':>5} {'tokens':>9} {'context':>9} {'loss':>8} {'ppl':>10}"]
    for r in rows:
        star = "*" if train_len is not None and r["length"] > train_len else " "
        context = f"{r.get('min_context', 1)}-{r['length']}"
        lines.append(f"{r['length']:>7}{star} {r['docs']:>5} {r['tokens']:>9} {context:>9} {r['loss']:>8.4f} "
                     f"{r['ppl']:>10.2f}")
    return "\n".join(lines)


def same_targets(rows: list[dict]) -> bool | None:
    """Whether every row scored the same (document, target) pairs; None when not recorded."""
    digests = {r.get("targets") for r in rows}
    return None if None in digests or not rows else len(digests) == 1


def main(args: argparse.Namespace) -> int:
    from bifocal.core.settings import resolve_arguments

    from .settings import PplSettings

    args = resolve_arguments(PplSettings, args, "eval ppl")
    from .loading import load_model
    from .results import EvalResult

    lengths = parse_lengths(args.lengths)
    for name in ("stride", "max_docs", "max_tokens", "batch_size", "first_target", "targets_per_doc"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise BifocalError(f"--{name.replace('_', '-')} {value}: must be a positive integer")
    min_context = getattr(args, "min_context", None)
    try:
        protocol = protocol_name(min_context, args.stride)
        min_context = parse_protocol(protocol)[0]
    except ValueError:
        raise BifocalError(f"--min-context {min_context!r}: a number of tokens (24) or a fraction of the length "
                           "up to 1 (0.75L)") from None
    factor = parse_factor(args.factor)
    if factor is not None and not args.rope_scaling:
        raise BifocalError("--factor needs --rope-scaling pi|ntk|dynamic_ntk|yarn")
    model_path = Path(args.model)
    if args.out and Path(args.out).exists() and not getattr(args, "overwrite", False):
        raise BifocalError(f"{args.out} already exists; pass --overwrite to replace it, or choose another --out "
                           "(nothing was written)")
    model, tokenizer = load_model(model_path, device=args.device)
    documents, described = resolve_documents(model_path, args.data, tokenizer)
    scheme = model.cfg.position.scheme
    train_len = model.cfg.max_seq_len
    if factor is None and args.rope_scaling:
        factor = max(1.0, max(lengths) / train_len)
    if args.rope_scaling and not model.cfg.n_fixed_heads:
        log.warning(f"--rope-scaling has no effect on a {scheme} model (no fixed-frequency heads)")
    skipped: dict[int, str] = {}

    def on_skip(length: int, why: str) -> None:
        skipped[length] = why
        log.warning(f"length {length}: {why}")

    widest, at = min((n - context_tokens(min_context, n) + 1, n) for n in lengths)
    if args.stride is not None and args.stride > widest:
        limit = f"length {at}" + (f" - min context + 1 = {widest}" if min_context is not None else "")
        log.warning(f"--stride {args.stride} is longer than {limit}: it is capped there (windows do not "
                    "overlap without a min context); each row records the stride it used")
    convention = MATCHED if factor == MATCHED else "fixed"
    scaled = ("" if not args.rope_scaling else f", rope scaling {args.rope_scaling} "
              + ("s = L / L_train" if factor == MATCHED else f"x{factor:g}"))
    print(f"perplexity of {model_path} ({scheme}, trained at {train_len}) on {described}{scaled}; "
          f"protocol: {describe_protocol(protocol)}")
    # Documents are read lazily, so damaged shards surface here, as BifocalError like the rest.
    rows = evaluate_scaled(model, documents, lengths, args.rope_scaling, factor, stride=args.stride,
                           max_docs=args.max_docs, max_tokens=args.max_tokens, batch_size=args.batch_size,
                           on_skip=on_skip, min_context=min_context, first_target=args.first_target,
                           targets_per_doc=args.targets_per_doc)
    if not rows:
        raise BifocalError(f"no length in {','.join(map(str, lengths))} could be evaluated "
                           f"(no documents with that many tokens in {described})")
    print(format_table(rows, train_len))
    same = same_targets(rows)
    print("the same targets at every length" if same else
          "the scored targets differ between lengths (documents shorter than the longest length, or --max-tokens)")
    top = max(r["factor"] for r in rows) if args.rope_scaling else 1.0
    result = EvalResult(kind="ppl", model=model_name(model_path), scheme=scheme, rows=rows,
                        variant=args.rope_scaling or "none", factor=top, train_len=train_len,
                        convention=convention if args.rope_scaling else "fixed",
                        extra={"data": described, "protocol": protocol, "same_targets": same,
                               "stride_requested": args.stride, "max_docs": args.max_docs,
                               "max_tokens": args.max_tokens, "skipped": skipped})
    out = Path(args.out) if args.out else default_out(model_path, args.rope_scaling, factor or 1.0, protocol)
    print(f"wrote {result.save(out)}")
    return 0
