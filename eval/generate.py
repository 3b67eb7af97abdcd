"""Text generation with the native GPT: KV-cached (prefill, then one token a step) or uncached,
greedy or sampled (temperature, top-k, top-p), reproducible for a seed; and `bifocal generate`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bifocal.core.errors import BifocalError
from bifocal.model import GPT, KVCache


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """(B, V) logits with everything outside the top-k / nucleus top-p set to -inf."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked before it already cover top_p (the first one stays).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _check(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, greedy: bool) -> None:
    if max_new_tokens < 0:
        raise BifocalError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not greedy and temperature <= 0:
        raise BifocalError(f"temperature={temperature} must be > 0 (use greedy=True for argmax decoding)")
    if top_k is not None and top_k < 1:
        raise BifocalError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise BifocalError(f"top_p={top_p} must be in (0, 1]")


@torch.no_grad()
def generate(model: GPT, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, greedy: bool = False, seed: int | None = None, use_cache: bool = True,
             eos_id: int | None = None) -> Tensor:
    """(B, T + n) ids: the prompt `input_ids` (B, T) followed by up to `max_new_tokens` tokens.

    With `use_cache` the prompt is run once into a KVCache (rotated keys) and each new token is
    one forward step; without it the whole prefix is recomputed each step (same tokens). A row
    that emits `eos_id` is padded with it; generation stops early once every row has."""
    _check(max_new_tokens, temperature, top_k, top_p, greedy)
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise BifocalError(f"input_ids must be (batch, length>=1), got shape {tuple(input_ids.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = KVCache() if use_cache else None
    done = torch.zeros(ids.size(0), dtype=torch.bool, device=device)
    step_input = ids
    try:
        for _ in range(max_new_tokens):
            logits, _ = model(step_input if use_cache else ids, cache=cache)
            logits = logits[:, -1, :].float()
            if greedy:
                nxt = logits.argmax(-1)
            else:
                probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            ids = torch.cat((ids, nxt[:, None]), dim=1)
            step_input = nxt[:, None]
            if eos_id is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)
    return ids


# -- CLI ----------------------------------------------------------------------------------------

class _Tok:
    """encode/decode/eos over a transformers tokenizer or bifocal's TextTokenizer."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.hf = hasattr(tok, "save_pretrained")
        self.eos_id = tok.eos_token_id if self.hf else getattr(tok, "eod_id", None)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False) if self.hf else self.tok.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def load_model_and_tokenizer(path: str | Path, device: str) -> tuple[GPT, Any]:
    """An exported directory (config.json) or a training run directory."""
    from .loading import load_model

    return load_model(path, device)


def main(args: argparse.Namespace) -> int:
    """`bifocal generate MODEL --prompt ...`: prints the prompt followed by its completion."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(args.model, device)
    tok = _Tok(tokenizer)
    prompt_ids = tok.encode(args.prompt)
    if not prompt_ids:
        raise BifocalError("the prompt encodes to no tokens")
    out = generate(model, torch.tensor([prompt_ids]), args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, seed=args.seed,
                   use_cache=not args.no_cache, eos_id=tok.eos_id)
    new = out[0, len(prompt_ids):].tolist()
    if tok.eos_id is not None and tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    print(args.prompt + tok.decode(new))
    return 0
