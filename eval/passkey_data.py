"""Passkey-retrieval prompts: a 5-digit key hidden at a chosen depth inside repeated filler.

The standard layout (Mohtashami & Jaggi, 2023): instruction, filler repeated to fill the context,
the key line inserted between filler units, and a question the model completes with the key.
The filler is repeated as often as fits ``n_tokens_target`` under the caller's tokenizer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from bifocal.core.errors import BifocalError

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
         "them. I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeySample:
    prompt: str
    key: str              # 5 digits, no leading zero
    depth: float          # requested relative position of the key line among the filler units
    key_char_offset: int  # index in ``prompt`` of the key's first digit (first occurrence)
    n_filler: int = 0     # filler units in the prompt
    n_tokens: int = 0     # len(tokenizer_encode(prompt))


def _build(key: str, depth: float, n_filler: int) -> tuple[str, int]:
    """Prompt with ``n_filler`` units, the key line after round(depth * n_filler) of them."""
    before = round(depth * n_filler)
    head = " ".join([INTRO] + [FILLER] * before + [""])
    line = KEY_LINE.format(key=key)
    prompt = head + " ".join([line] + [FILLER] * (n_filler - before) + [QUESTION])
    return prompt, len(head) + line.index(key)


def make_passkey_prompt(n_tokens_target: int, tokenizer_encode: Callable[[str], list[int]],
                        rng: random.Random, depth: float | None = None) -> PasskeySample:
    """The longest passkey prompt whose encoding has at most ``n_tokens_target`` tokens.

    ``depth`` (0 = key right after the instruction, 1 = right before the question) is drawn
    uniformly from [0, 1] when None. Draws from ``rng`` in a fixed order, so a seed reproduces
    the sample for the same target and tokenizer.
    """
    if depth is None:
        depth = rng.random()
    if not 0.0 <= depth <= 1.0:
        raise BifocalError(f"depth must be in [0, 1], got {depth}")
    key = str(rng.randint(10000, 99999))

    cache: dict[int, int] = {}

    def n_tokens(n_filler: int) -> int:
        if n_filler not in cache:
            cache[n_filler] = len(tokenizer_encode(_build(key, depth, n_filler)[0]))
        return cache[n_filler]

    if n_tokens(0) > n_tokens_target:
        raise BifocalError(f"n_tokens_target={n_tokens_target} is too small: the prompt without any "
                         f"filler already has {n_tokens(0)} tokens")
    # Token count grows with the filler count (exactly for byte-level, near enough for BPE), so
    # an exponential then a binary search needs O(log n) encodes of the long prompt.
    lo, hi = 0, 1
    while n_tokens(hi) <= n_tokens_target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if n_tokens(mid) <= n_tokens_target else (lo, mid)
    prompt, offset = _build(key, depth, lo)
    return PasskeySample(prompt=prompt, key=key, depth=depth, key_char_offset=offset,
                         n_filler=lo, n_tokens=n_tokens(lo))


def is_correct(sample: PasskeySample, generated: str) -> bool:
    """Whether the model's continuation of ``sample.prompt`` starts with the key."""
    match = re.match(r"\s*(\d+)", generated)
    return match is not None and match.group(1) == sample.key
