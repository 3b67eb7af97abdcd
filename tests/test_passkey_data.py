"""Passkey samples on a real tokenizer and real validation text: exact length (the training length
of the CPU preset included), token-exact and uniform depths, reproducibility, bad input."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from bifocal.core.errors import BifocalError
from bifocal.data_pipeline.loader import PreparedData, iter_documents
from bifocal.data_pipeline.tokenizer import load_tokenizer
from bifocal.eval.passkey_data import (CHANCE, NEEDLE, QUESTION, insertion_point, is_correct, make_passkey_prompt,
                                       stratified_depths)


@pytest.fixture(scope="module")
def tok_and_hay(tiny_config):
    """The tiny config's 512-token BPE (prose and code, like the CPU preset's) and its validation text."""
    import yaml

    prepared = yaml.safe_load(tiny_config.read_text())["data"]["prepared_dir"]
    hay = np.concatenate(list(iter_documents(PreparedData(prepared), "val")))
    return load_tokenizer(prepared), hay


def _split(tok, s):
    """(haystack part, needle, question) of a sample, from its ids and offset."""
    needle, question = tok.encode(NEEDLE.format(key=s.key)), tok.encode(QUESTION)
    assert s.ids[s.offset:s.offset + len(needle)] == needle and s.ids[len(s.ids) - len(question):] == question
    return s.ids[:s.offset] + s.ids[s.offset + len(needle):len(s.ids) - len(question)], needle, question


def _is_window(hay: np.ndarray, part: list[int]) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(hay, len(part)) if part else None
    return not part or bool((windows == np.asarray(part)).all(axis=1).any())


@pytest.mark.parametrize("length", [32, 33, 64, 200, 512])
def test_prompt_plus_answer_is_exactly_the_length(tok_and_hay, length):
    tok, hay = tok_and_hay
    for seed in range(5):
        s = make_passkey_prompt(length, tok.encode, hay, random.Random(seed))
        assert s.n_tokens == len(s.ids) + len(s.answer) == length
        assert s.answer == tok.encode(" " + s.key) and len(s.key) == 5 and s.key[0] != "0"
        part, _, _ = _split(tok, s)
        assert len(part) == s.n_filler and _is_window(hay, part)  # a contiguous window of validation text


def test_the_training_length_of_the_cpu_preset_holds_a_haystack(tok_and_hay):
    # The old prompt (instruction + repeated English filler) had 133 tokens at its shortest, over
    # 4x the preset's 32-token training length; now a 32-token trial has filler around the key.
    tok, hay = tok_and_hay
    samples = [make_passkey_prompt(32, tok.encode, hay, random.Random(i)) for i in range(20)]
    assert all(s.n_tokens == 32 and s.n_filler >= 4 for s in samples)
    with pytest.raises(BifocalError, match="too small"):
        make_passkey_prompt(12, tok.encode, hay, random.Random(0))


@pytest.mark.parametrize("u", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_key_line_sits_at_the_token_exact_depth(tok_and_hay, u):
    tok, hay = tok_and_hay
    s = make_passkey_prompt(300, tok.encode, hay, random.Random(7), depth=u)
    assert s.offset == insertion_point(u, s.n_filler) == min(int(u * (s.n_filler + 1)), s.n_filler)
    assert s.depth == s.offset / s.n_filler
    _split(tok, s)  # the needle starts exactly at `offset`


def test_depths_are_uniform_over_every_token_position(tok_and_hay):
    tok, hay = tok_and_hay
    # Stratified over as many trials as insertion places: every place exactly once.
    probe = make_passkey_prompt(64, tok.encode, hay, random.Random(0))
    places = probe.n_filler + 1
    rng = random.Random(1)
    offsets = [insertion_point(u, probe.n_filler) for u in stratified_depths(places, rng)]
    assert offsets == list(range(places))
    # Drawn depths: each place about equally often (the old prompts put the key only between whole
    # 20-odd-token filler sentences).
    n = 40 * places
    counts = Counter(make_passkey_prompt(64, tok.encode, hay, random.Random(i)).offset for i in range(n))
    assert sorted(counts) == list(range(places))
    assert max(counts.values()) < 2 * min(counts.values()), counts


def test_stratified_depths_cover_each_stratum_once():
    u = stratified_depths(10, random.Random(3))
    assert [int(x * 10) for x in u] == list(range(10))
    assert u != stratified_depths(10, random.Random(4))


def test_reproducible_for_a_seed_and_varies_across_seeds(tok_and_hay):
    tok, hay = tok_and_hay
    a = make_passkey_prompt(128, tok.encode, hay, random.Random(42))
    assert a == make_passkey_prompt(128, tok.encode, hay, random.Random(42))
    samples = [make_passkey_prompt(128, tok.encode, hay, random.Random(i)) for i in range(20)]
    assert len({s.key for s in samples}) > 15 and len({tuple(s.ids[:5]) for s in samples}) > 10


def test_bad_arguments_raise(tok_and_hay):
    tok, hay = tok_and_hay
    with pytest.raises(BifocalError, match="depth"):
        make_passkey_prompt(100, tok.encode, hay, random.Random(0), depth=1.5)
    with pytest.raises(BifocalError, match="filler text has 10 tokens"):
        make_passkey_prompt(100, tok.encode, hay[:10], random.Random(0))


def test_is_correct_reads_the_leading_number(tok_and_hay):
    tok, hay = tok_and_hay
    s = make_passkey_prompt(64, tok.encode, hay, random.Random(3))
    assert is_correct(s, f" {s.key}. pass")
    assert not is_correct(s, f" {s.key}9")
    assert not is_correct(s, f" the key is {s.key}")
    assert CHANCE == 1 / 90000
