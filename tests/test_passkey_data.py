"""Passkey prompts: layout, key position, token budget, reproducibility, depth distribution."""

from __future__ import annotations

import random

import pytest

from bifocal.eval.passkey_data import FILLER, INTRO, QUESTION, is_correct, make_passkey_prompt


def byte_encode(s: str) -> list[int]:
    return list(s.encode())


def word_encode(s: str) -> list[int]:
    return [len(w) for w in s.split()]


@pytest.mark.parametrize("target", [300, 1000, 4096, 20000])
def test_prompt_fills_but_never_exceeds_the_target(target):
    s = make_passkey_prompt(target, byte_encode, random.Random(0))
    n = len(byte_encode(s.prompt))
    assert n == s.n_tokens <= target
    assert target - n < len(byte_encode(" " + FILLER))  # one more unit would not fit
    assert s.prompt.startswith(INTRO + " ") and s.prompt.endswith(" " + QUESTION)
    assert s.n_filler == s.prompt.count(FILLER)


def test_word_level_encoder_is_respected():
    s = make_passkey_prompt(3000, word_encode, random.Random(1))
    assert 3000 - len(FILLER.split()) < len(s.prompt.split()) <= 3000


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_key_sits_at_the_stated_depth(depth):
    s = make_passkey_prompt(8000, byte_encode, random.Random(7), depth=depth)
    assert len(s.key) == 5 and s.key.isdigit()
    assert s.depth == depth
    assert s.prompt[s.key_char_offset:s.key_char_offset + 5] == s.key
    line = f"The pass key is {s.key}. Remember it. {s.key} is the pass key."
    before, after = s.prompt.split(line)
    assert before.endswith(" ") and s.prompt.index(line) + len("The pass key is ") == s.key_char_offset
    units_before = before.count(FILLER)
    assert units_before + after.count(FILLER) == s.n_filler > 50
    assert abs(units_before / s.n_filler - depth) <= 1 / s.n_filler  # within one filler unit


def test_reproducible_for_a_seed_and_varies_across_seeds():
    a = make_passkey_prompt(2000, byte_encode, random.Random(42))
    assert a == make_passkey_prompt(2000, byte_encode, random.Random(42))
    keys = {make_passkey_prompt(2000, byte_encode, random.Random(i)).key for i in range(20)}
    assert len(keys) > 15


def test_random_depth_is_roughly_uniform():
    depths = [make_passkey_prompt(600, byte_encode, random.Random(i)).depth for i in range(400)]
    counts = [sum(q / 4 <= d < (q + 1) / 4 for d in depths) for q in range(4)]
    assert all(70 <= c <= 130 for c in counts), counts  # expected 100 each


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="n_tokens_target"):
        make_passkey_prompt(50, byte_encode, random.Random(0))
    with pytest.raises(ValueError, match="depth"):
        make_passkey_prompt(1000, byte_encode, random.Random(0), depth=1.5)


def test_is_correct_reads_the_leading_number():
    s = make_passkey_prompt(500, byte_encode, random.Random(3))
    assert is_correct(s, f" {s.key}. Remember it.")
    assert not is_correct(s, f" {s.key}9")
    assert not is_correct(s, f" the key is {s.key}")
