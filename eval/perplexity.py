"""Perplexity at several context lengths, and `bifocal eval ppl`.

Windows are full length: a window of L input tokens predicts the L tokens after each of them, so
a document needs L + 1 tokens to give one window (the short tail of a document is not scored).

Two modes, as in the Position Interpolation and YaRN papers:
  * non-overlapping (stride None or L): windows start at 0, L, 2L, ... and every target is scored;
  * sliding window (stride S < L): windows start at 0, S, 2S, ...; the first window scores all L
    targets, every later one only its last S, so each token is scored once with >= L - S context.
A document of n tokens thus gives k = (n - 1 - L) // S + 1 windows and L + (k - 1) * S scored
tokens; stride == L is exactly the non-overlapping mode.

Windows are taken round-robin over the documents (the first window of each document, then the
second, ...), so a `max_tokens` cap samples every document instead of only the first one.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from bifocal.core.errors import BifocalError
from bifocal.model import GPT
from bifocal.model.loss import cross_entropy

Documents = Iterable[np.ndarray] | Callable[[int], Iterable[np.ndarray]]
# Position schemes with no fixed-frequency head: training-free RoPE scaling cannot change them.


class PerplexityWarning(UserWarning):
    """A length was skipped (no documents that long, or out of memory)."""


@dataclass(frozen=True)
class Window:
    doc: int  # index into the document list
    start: int  # first input token
    score: int  # how many of the window's last targets are scored


def window_starts(n_tokens: int, length: int, stride: int) -> list[int]:
    """Starts of the full windows (length + 1 tokens each) in a document of n_tokens."""
    if n_tokens < length + 1:
        return []
    return list(range(0, n_tokens - length, stride))


def plan_windows(doc_lengths: list[int], length: int, stride: int | None = None,
                 max_tokens: int | None = None) -> list[Window]:
    """The scored windows, round-robin over documents, stopping at max_tokens scored targets
    (the last window then scores only its last few targets, which keep their long context)."""
    stride = length if stride is None else stride
    if not 0 < stride <= length:
        raise ValueError(f"stride={stride} must be in [1, length={length}]")
    per_doc = [window_starts(n, length, stride) for n in doc_lengths]
    plan: list[Window] = []
    total = 0
    for k in range(max((len(s) for s in per_doc), default=0)):
        for d, starts in enumerate(per_doc):
            if k >= len(starts):
                continue
            score = length if k == 0 else stride
            if max_tokens is not None:
                score = min(score, max_tokens - total)
                if score <= 0:
                    return plan
            plan.append(Window(d, starts[k], score))
            total += score
    return plan


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


@torch.inference_mode()  # no autograd graph: activations are freed layer by layer
def _score(model: GPT, docs: list[np.ndarray], plan: list[Window], length: int, batch_size: int,
           progress: bool) -> tuple[float, int]:
    """(summed token loss, scored tokens) over the planned windows."""
    from tqdm.auto import tqdm

    device = _model_device(model)
    total_loss, total_tokens = 0.0, 0
    bar = tqdm(total=len(plan), desc=f"ppl L={length}", unit="win", disable=None if progress else True, leave=False)
    # Without a terminal tqdm stays silent: logs get a plain line every tenth of the windows.
    plain = progress and bar.disable
    next_line = max(1, len(plan) // 10)
    try:
        for i in range(0, len(plan), batch_size):
            batch = plan[i:i + batch_size]
            win = np.stack([docs[w.doc][w.start:w.start + length + 1] for w in batch]).astype(np.int64)
            win = torch.from_numpy(win).to(device)
            x, y = win[:, :-1], win[:, 1:].clone()
            for row, w in enumerate(batch):
                y[row, :length - w.score] = -100  # context only: scored by an earlier window
            logits, _ = model(x)
            loss = cross_entropy(logits, y, reduction="sum")
            total_loss += float(loss)
            total_tokens += sum(w.score for w in batch)
            bar.update(len(batch))
            done = i + len(batch)
            if plain and (done >= next_line or done == len(plan)):
                print(f"ppl L={length}: {done}/{len(plan)} windows, batch {batch_size}", file=sys.stderr, flush=True)
                next_line = done + max(1, len(plan) // 10)
    finally:
        bar.close()
    return total_loss, total_tokens


def evaluate_perplexity(model: GPT, documents: Documents, lengths: Iterable[int], stride: int | None = None,
                        max_docs: int | None = None, max_tokens: int | None = None, batch_size: int | None = None,
                        device: str | torch.device | None = None, progress: bool = True,
                        on_skip: Callable[[int, str], None] | None = None) -> list[dict]:
    """One row {"length", "tokens", "loss", "ppl", "docs", "windows"} per length that had data.

    `documents`: token arrays (filtered per length to those with >= L + 1 tokens), or a callable
    length -> documents (e.g. a prepared split filtered by length). `stride` (default: the length)
    is capped at each length; each row records the stride it used. A length with no document long enough, or that runs out of memory,
    is reported through `on_skip(length, reason)` (default: a PerplexityWarning) and left out.
    `batch_size` None: `default_batch_size(length)` windows per batch.
    """
    if device is not None:
        model = model.to(device)
    model.eval()
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    skip = on_skip or (lambda n, why: warnings.warn(f"length {n}: {why}", PerplexityWarning, stacklevel=3))
    cache = None if callable(documents) else [np.asarray(d, dtype=np.int64) for d in documents]
    rows = []
    for length in lengths:
        docs = _docs_for(documents, length, cache)[:max_docs]
        win_stride = None if stride is None else min(stride, length)
        plan = plan_windows([len(d) for d in docs], length, win_stride, max_tokens)
        if not plan:
            skip(length, f"skipped: no document has {length + 1} tokens (needed for one window)")
            continue
        bs = batch_size or default_batch_size(length)
        while True:
            try:
                loss_sum, tokens = _score(model, docs, plan, length, bs, progress)
                break
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _is_oom(exc):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if bs == 1:
                    skip(length, "skipped: out of memory even with batch size 1")
                    tokens = 0
                    break
                bs = max(1, bs // 2)  # retry the whole length with smaller batches
        if tokens == 0:
            continue
        loss = loss_sum / tokens
        rows.append({"length": int(length), "tokens": int(tokens), "loss": loss,
                     "ppl": math.exp(min(loss, 700.0)), "docs": len({w.doc for w in plan}),
                     "windows": len(plan), "stride": int(win_stride or length)})
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
            print(f"warning: {path} was prepared with a tokenizer file that differs from the model's",
                  file=sys.stderr)
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
    (default: the longest length over the training length, at least 1)."""
    if not variant:
        model.set_rope_scaling(None)
        return 1.0
    train_len = model.cfg.max_seq_len
    factor = float(factor) if factor is not None else max(1.0, max(lengths) / train_len)
    if factor < 1:
        raise BifocalError(f"--factor {factor:g}: must be >= 1")
    model.set_rope_scaling({"type": variant, "factor": factor, "original_max_len": train_len})
    return factor


def default_out(model_path: Path, variant: str | None, factor: float) -> Path:
    suffix = f"-{variant}-x{factor:g}" if variant else ""
    return model_path / "eval" / f"ppl{suffix}.json"


def format_table(rows: list[dict], train_len: int | None = None) -> str:
    lines = [f"{'length':>8} {'docs':>5} {'tokens':>9} {'loss':>8} {'ppl':>10}"]
    for r in rows:
        star = "*" if train_len is not None and r["length"] > train_len else " "
        lines.append(f"{r['length']:>7}{star} {r['docs']:>5} {r['tokens']:>9} {r['loss']:>8.4f} {r['ppl']:>10.2f}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from .loading import load_model
    from .results import EvalResult

    lengths = parse_lengths(args.lengths)
    for name in ("stride", "max_docs", "max_tokens", "batch_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise BifocalError(f"--{name.replace('_', '-')} {value}: must be a positive integer")
    if args.factor is not None and not args.rope_scaling:
        raise BifocalError("--factor needs --rope-scaling pi|ntk|dynamic_ntk|yarn")
    model_path = Path(args.model)
    if args.out and Path(args.out).exists() and not getattr(args, "overwrite", False):
        raise BifocalError(f"{args.out} already exists; pass --overwrite to replace it, or choose another --out "
                           "(nothing was written)")
    model, tokenizer = load_model(model_path, device=args.device)
    documents, described = resolve_documents(model_path, args.data, tokenizer)
    scheme = model.cfg.position.scheme
    factor = apply_scaling(model, args.rope_scaling, args.factor, lengths)
    if args.rope_scaling and not model.cfg.n_fixed_heads:
        print(f"warning: --rope-scaling has no effect on a {scheme} model (no fixed-frequency heads)",
              file=sys.stderr)
    skipped: dict[int, str] = {}

    def on_skip(length: int, why: str) -> None:
        skipped[length] = why
        print(f"warning: length {length}: {why}", file=sys.stderr)

    train_len = model.cfg.max_seq_len
    if args.stride is not None and args.stride > min(lengths):
        print(f"warning: --stride {args.stride} is longer than length {min(lengths)}: windows there do not "
              f"overlap (stride = length); each row records the stride it used", file=sys.stderr)
    print(f"perplexity of {model_path} ({scheme}, trained at {train_len}) on {described}"
          + (f", rope scaling {args.rope_scaling} x{factor:g}" if args.rope_scaling else ""))
    # Documents are read lazily, so damaged shards surface here, as BifocalError like the rest.
    rows = evaluate_perplexity(model, documents, lengths, stride=args.stride, max_docs=args.max_docs,
                               max_tokens=args.max_tokens, batch_size=args.batch_size, on_skip=on_skip)
    if not rows:
        raise BifocalError(f"no length in {','.join(map(str, lengths))} could be evaluated "
                           f"(no documents with that many tokens in {described})")
    print(format_table(rows, train_len))
    result = EvalResult(kind="ppl", model=model_path.resolve().name, scheme=scheme, rows=rows,
                        variant=args.rope_scaling or "none", factor=factor, train_len=train_len,
                        extra={"data": described, "stride_requested": args.stride, "max_docs": args.max_docs,
                               "max_tokens": args.max_tokens, "skipped": skipped})
    out = Path(args.out) if args.out else default_out(model_path, args.rope_scaling, factor)
    print(f"wrote {result.save(out)}")
    return 0

