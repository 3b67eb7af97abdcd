"""`bifocal eval passkey`: passkey-retrieval accuracy against context length, with its controls.

Per length L, `trials` samples from `passkey_data.make_passkey_prompt`: exactly L tokens of context
counting the answer, the haystack a window of the model's own validation split (or of `--data`),
the key line at a token-exact depth, one depth per equal stratum of [0, 1] (key, depth and window
from one seeded RNG per length, so every model sees the same samples). Each prompt is continued
greedily (KV cache) for the answer's tokens plus one; a trial counts when the continuation starts
with the key (`passkey_data.is_correct`). Lengths up to the training length are the in-distribution
control (default lengths: 1, 2, 4, 8 and 16 times it); every row carries the chance level.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bifocal.core import logs
from bifocal.core.errors import BifocalError
from bifocal.data_pipeline.tokenizer import TextTokenizer
from bifocal.model import GPT

from .describe import default_out, model_name, model_scheme, train_len
from .generate import generate
from .passkey_data import CHANCE, KEY_DIGITS, NEEDLE, QUESTION, PasskeySample, is_correct, make_passkey_prompt, \
    stratified_depths
from .perplexity import apply_scaling, resolve_documents  # one definition of scaling and of "the run's data"

DEFAULT_MULTIPLES = (1, 2, 4, 8, 16)  # of the training length
log = logs.get_logger(__name__)
MAX_HAYSTACK = 1 << 20  # filler tokens kept from the start of the split: windows are drawn from these


@dataclass
class Trial:
    length: int
    sample: PasskeySample
    generated: str

    @property
    def correct(self) -> bool:
        return score(self.sample, self.generated)


def score(sample: PasskeySample, generated: str) -> bool:
    """Whether the continuation `generated` of the sample's prompt retrieves the key."""
    return is_correct(sample, generated)


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BifocalError(f"--lengths must be comma-separated integers, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise BifocalError(f"--lengths needs positive integers, got {text!r}")
    return lengths


def haystack_tokens(model_path: str | Path, data: str | None, tok: TextTokenizer) -> tuple[np.ndarray, str]:
    """(filler token stream, where it came from): the documents of `data` (a prepared directory's
    validation split or raw text files) or, by default, of the run's own validation split,
    concatenated without their end-of-document tokens, at most MAX_HAYSTACK tokens."""
    docs, where = resolve_documents(Path(model_path), data, tok)
    parts, total = [], 0
    for doc in docs(0) if callable(docs) else docs:
        parts.append(np.asarray(doc, dtype=np.int64))
        total += len(doc)
        if total >= MAX_HAYSTACK:
            break
    if total == 0:
        raise BifocalError(f"{where}: no filler text (the documents are empty)")
    return np.concatenate(parts)[:MAX_HAYSTACK], where


def run_trials(model: GPT, tok: TextTokenizer, lengths: list[int], trials: int, seed: int,
               haystack: np.ndarray) -> list[Trial]:
    """All trials; the samples depend only on (seed, length, tokenizer, haystack), not on the model."""
    out = []
    with logs.progress(total=len(lengths) * trials, desc="passkey", unit="trials", log=log, mininterval=1.0) as bar:
        for length in lengths:
            rng = random.Random(f"passkey:{seed}:{length}")
            for u in stratified_depths(trials, rng):
                sample = make_passkey_prompt(length, tok.encode, haystack, rng, depth=u)
                # The answer's tokens and one more (does the number end?): the last one is predicted
                # from position length - 1, never fed, so the trial reads exactly `length` positions.
                gen = generate(model, torch.tensor([sample.ids]), len(sample.answer) + 1, greedy=True)
                out.append(Trial(length, sample, tok.decode(gen[0, len(sample.ids):].tolist())))
                bar.update()
    return out


def rows_of(trials: list[Trial], train: int | None = None) -> list[dict[str, Any]]:
    rows = []
    for length in dict.fromkeys(t.length for t in trials):
        mine = [t for t in trials if t.length == length]
        rows.append({"length": length, "trials": len(mine), "accuracy": sum(t.correct for t in mine) / len(mine),
                     "chance": CHANCE, "in_distribution": train is not None and length <= train,
                     "filler_tokens": sum(t.sample.n_filler for t in mine) / len(mine)})
    return rows


def format_table(rows: list[dict[str, Any]], train: int | None) -> str:
    lines = [f"{'length':>7} {'filler':>7} {'trials':>6} {'accuracy':>8}"]
    for r in rows:
        star = "*" if train is not None and r["length"] > train else " "
        lines.append(f"{r['length']:>6}{star} {r['filler_tokens']:>7.0f} {r['trials']:>6} {r['accuracy']:>8.2f}")
    lines.append(f"chance (a uniform {KEY_DIGITS}-digit key): {CHANCE:.2g}")
    if train is not None:
        lines.append(f"* longer than the training length ({train}); up to it: the in-distribution control")
    return "\n".join(lines)


def run(model_path: str | Path, lengths: list[int] | None = None, trials: int = 10, seed: int = 0,
        rope_scaling: str | None = None, factor: float | None = None, device: str | None = None,
        out: str | Path | None = None, data: str | None = None, model_label: str | None = None):
    """Evaluate at `lengths` (default: DEFAULT_MULTIPLES of the training length) with filler from
    `data` (default: the run's validation split); write and return the result. `model_label` names
    the report row (default: the run directory's name): runs of one scheme with different seeds that
    share it are averaged over their training seeds, which a run's config.yaml supplies."""
    from .loading import load_model
    from .results import EvalResult

    if trials < 1:
        raise BifocalError(f"--trials must be >= 1, got {trials}")
    model, tok = load_model(model_path, device=device)
    train = train_len(model)
    lengths = lengths or [m * train for m in DEFAULT_MULTIPLES]
    haystack, where = haystack_tokens(model_path, data, tok)
    used = apply_scaling(model, rope_scaling, factor, lengths)
    results = run_trials(model, tok, lengths, trials, seed, haystack)
    variant = rope_scaling or "none"
    result = EvalResult(kind="passkey", model=model_label or model_name(model_path), scheme=model_scheme(model),
                        rows=rows_of(results, train), variant=variant, factor=used, train_len=train,
                        extra={"seed": seed, "chance": CHANCE, "key_digits": KEY_DIGITS, "needle": NEEDLE,
                               "question": QUESTION, "filler": where})
    config = Path(model_path) / "config.yaml"
    if config.is_file():
        from bifocal.run.config import load_config

        result.extra["train_seed"] = load_config(config).train.seed
    name = "passkey.json" if rope_scaling is None else f"passkey-{rope_scaling}.json"
    path = Path(out) if out else default_out(model_path, name)
    result.save(path)
    return result, path


def main(args: argparse.Namespace) -> int:
    from bifocal.core.settings import resolve_arguments

    from .settings import PasskeySettings

    args = resolve_arguments(PasskeySettings, args, "eval passkey")
    lengths = None if args.lengths is None else parse_lengths(args.lengths)
    result, path = run(args.model, lengths, trials=args.trials, seed=args.seed, rope_scaling=args.rope_scaling,
                       factor=args.factor, device=args.device, out=args.out, data=args.data, model_label=args.label)
    scaling = "" if result.variant == "none" else f", {result.variant} x{result.factor:g}"
    print(f"passkey: {result.model} ({result.scheme}{scaling}), filler from {result.extra['filler']}")
    print(format_table(result.rows, result.train_len))
    print(f"wrote {path}")
    return 0
