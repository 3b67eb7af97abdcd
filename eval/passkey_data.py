"""Passkey-retrieval samples, built in token space: a key line hidden at a token-exact depth in a
haystack drawn from the model's own domain.

The task is Mohtashami & Jaggi's (2023, arXiv 2305.16300): a 5-digit key stated once inside
irrelevant text, and a cue the model completes with the key. Two departures make it fit small
base models trained on short contexts:

- no instruction text (a base model does not follow it, and it alone took 78 tokens of a
  code-trained 512-token BPE, over twice a 32-token training length), and the key line is the cue
  plus the key, so retrieval is copying what followed the cue earlier;
- the haystack is a contiguous slice of a token stream the caller gives (`bifocal eval passkey`
  uses the model's validation split), not a fixed English sentence, so a model trained on code
  is tested on code.

A sample of length L is exactly L tokens of context counting the answer::

    haystack[:offset] + NEEDLE(key) + haystack[offset:] + QUESTION   -> answer " <key>"

so greedy decoding of the answer's tokens, plus one token to see that the number ends, reads
positions 0 .. L-1 only: at L = the training length the whole trial is in distribution.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from bifocal.core.errors import BifocalError

NEEDLE = " pass key is {key}."
QUESTION = " pass key is"
KEY_DIGITS = 5
# Keys are uniform over the 9 * 10^4 five-digit numbers (no leading zero): the probability that a
# guess independent of the prompt is the key.
CHANCE = 1 / (9 * 10 ** (KEY_DIGITS - 1))


@dataclass
class PasskeySample:
    ids: list[int]      # the prompt's tokens (haystack with the needle, then the question)
    key: str            # KEY_DIGITS digits, no leading zero
    answer: list[int]   # the reference answer's tokens, encode(" " + key)
    offset: int         # token index of the needle's first token (= haystack tokens before it)
    n_filler: int       # haystack tokens in the prompt
    depth: float        # offset / n_filler: 0 = first, 1 = right before the question (0 if no haystack)

    @property
    def n_tokens(self) -> int:
        """Context length of the trial: prompt plus answer tokens."""
        return len(self.ids) + len(self.answer)


def insertion_point(u: float, n_filler: int) -> int:
    """The needle's offset among the n_filler + 1 places between haystack tokens, for u in [0, 1]:
    floor(u * (n_filler + 1)), capped at n_filler. A uniform u gives every place probability
    1 / (n_filler + 1): depths are uniform to the token, not rounded to a unit of text."""
    if not 0.0 <= u <= 1.0:
        raise BifocalError(f"depth must be in [0, 1], got {u!r}")
    return min(math.floor(u * (n_filler + 1)), n_filler)


def stratified_depths(trials: int, rng: random.Random) -> list[float]:
    """One u uniform in each of the `trials` equal strata of [0, 1): the trials of one length cover
    every depth band evenly, and each u is still marginally uniform."""
    return [(i + rng.random()) / trials for i in range(trials)]


def make_passkey_prompt(length: int, encode: Callable[[str], list[int]], haystack: Sequence[int],
                        rng: random.Random, depth: float | None = None) -> PasskeySample:
    """A sample whose prompt plus answer is exactly `length` tokens.

    `haystack`: token ids to slice the filler from (a window at a uniform start); `depth`: u in
    [0, 1] for `insertion_point` (drawn uniformly from `rng` when None). Draws the key, then u,
    then the window start from `rng`, so a seed reproduces the sample for the same length,
    tokenizer and haystack. Raises BifocalError when `length` cannot hold the needle, question and
    answer, or the haystack is shorter than the filler needed.
    """
    key = str(rng.randint(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS - 1))
    u = rng.random() if depth is None else depth
    needle, question, answer = encode(NEEDLE.format(key=key)), encode(QUESTION), encode(" " + key)
    n_filler = length - len(needle) - len(question) - len(answer)
    if n_filler < 0:
        raise BifocalError(f"passkey length {length} is too small: the key line, question and answer alone "
                           f"take {length - n_filler} tokens")
    if len(haystack) < n_filler:
        raise BifocalError(f"the filler text has {len(haystack)} tokens; a passkey prompt of {length} tokens "
                           f"needs {n_filler}")
    offset = insertion_point(u, n_filler)
    start = rng.randrange(len(haystack) - n_filler + 1)
    hay = [int(t) for t in haystack[start:start + n_filler]]
    ids = hay[:offset] + needle + hay[offset:] + question
    return PasskeySample(ids=ids, key=key, answer=answer, offset=offset, n_filler=n_filler,
                         depth=offset / n_filler if n_filler else 0.0)


def is_correct(sample: PasskeySample, generated: str) -> bool:
    """Whether the model's continuation of the prompt starts with the key (and the number ends there)."""
    match = re.match(r"\s*(\d+)", generated)
    return match is not None and match.group(1) == sample.key
