"""`bifocal eval passkey`: passkey-retrieval accuracy against context length.

Per length, `trials` prompts from `passkey_data.make_passkey_prompt` (depth uniform in [0, 1], key
and depth drawn from one seeded RNG per length), each continued greedily with a KV cache for a few
tokens; a trial counts when the continuation starts with the key (`passkey_data.is_correct`).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bifocal.data_pipeline.tokenizer import TextTokenizer
from bifocal.core.errors import BifocalError
from bifocal.model import GPT

from .describe import default_out, model_name, model_scheme, train_len
from .generate import generate
from .passkey_data import PasskeySample, is_correct, make_passkey_prompt
from .perplexity import apply_scaling  # one definition of the eval-time scaling defaults

NEW_TOKENS = 8  # a 5-digit key plus slack for a leading space or a split into several tokens


@dataclass
class Trial:
    length: int
    sample: PasskeySample
    generated: str

    @property
    def correct(self) -> bool:
        return score(self.sample, self.generated)


def score(sample: PasskeySample, generated: str) -> bool:
    """Whether the continuation `generated` of `sample.prompt` retrieves the key."""
    return is_correct(sample, generated)


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BifocalError(f"--lengths must be comma-separated integers, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise BifocalError(f"--lengths needs positive integers, got {text!r}")
    return lengths


def run_trials(model: GPT, tok: TextTokenizer, lengths: list[int], trials: int, seed: int) -> list[Trial]:
    """All trials; the samples depend only on (seed, length, tokenizer), not on the model."""
    out = []
    with tqdm(total=len(lengths) * trials, desc="passkey", mininterval=1.0) as bar:
        for length in lengths:
            rng = random.Random(f"passkey:{seed}:{length}")
            for _ in range(trials):
                sample = make_passkey_prompt(length, tok.encode, rng)
                ids = torch.tensor([tok.encode(sample.prompt)])
                gen = generate(model, ids, NEW_TOKENS, greedy=True)
                out.append(Trial(length, sample, tok.decode(gen[0, ids.shape[1]:].tolist())))
                bar.update()
    return out


def rows_of(trials: list[Trial]) -> list[dict[str, Any]]:
    rows = []
    for length in dict.fromkeys(t.length for t in trials):
        mine = [t for t in trials if t.length == length]
        rows.append({"length": length, "trials": len(mine), "accuracy": sum(t.correct for t in mine) / len(mine),
                     "mean_tokens": sum(t.sample.n_tokens for t in mine) / len(mine)})
    return rows


def format_table(rows: list[dict[str, Any]], train: int | None) -> str:
    lines = [f"{'length':>7} {'tokens':>7} {'trials':>6} {'accuracy':>8}"]
    for r in rows:
        star = "*" if train is not None and r["length"] > train else " "
        lines.append(f"{r['length']:>6}{star} {r['mean_tokens']:>7.0f} {r['trials']:>6} {r['accuracy']:>8.2f}")
    if train is not None:
        lines.append(f"* longer than the training length ({train})")
    return "\n".join(lines)


def run(model_path: str | Path, lengths: list[int], trials: int = 10, seed: int = 0,
        rope_scaling: str | None = None, factor: float | None = None, device: str | None = None,
        out: str | Path | None = None):
    from .loading import load_model
    from .results import EvalResult

    if trials < 1:
        raise BifocalError(f"--trials must be >= 1, got {trials}")
    model, tok = load_model(model_path, device=device)
    used = apply_scaling(model, rope_scaling, factor, lengths)
    results = run_trials(model, tok, lengths, trials, seed)
    variant = rope_scaling or "none"
    result = EvalResult(kind="passkey", model=model_name(model_path), scheme=model_scheme(model), rows=rows_of(results),
                        variant=variant, factor=used, train_len=train_len(model),
                        extra={"seed": seed, "new_tokens": NEW_TOKENS})
    name = "passkey.json" if rope_scaling is None else f"passkey-{rope_scaling}.json"
    path = Path(out) if out else default_out(model_path, name)
    result.save(path)
    return result, path


def main(args: argparse.Namespace) -> int:
    result, path = run(args.model, parse_lengths(args.lengths), trials=args.trials, seed=args.seed,
                       rope_scaling=args.rope_scaling, factor=args.factor, device=args.device, out=args.out)
    scaling = "" if result.variant == "none" else f", {result.variant} x{result.factor:g}"
    print(f"passkey: {result.model} ({result.scheme}{scaling})")
    print(format_table(result.rows, result.train_len))
    print(f"wrote {path}")
    return 0
