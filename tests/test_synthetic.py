"""Algorithmic task generators: validity of prompts, verifier, determinism, parameter bounds."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bifocal.data_pipeline import synthetic as syn

SETTINGS = settings(max_examples=60, deadline=None)
seeds = st.integers(0, 2**32 - 1)


def _symbols(prompt: str) -> list[str]:
    return prompt.split(":", 1)[1].rstrip("=").split()


def _dyck_stack(symbols: list[str]) -> list[str] | None:
    """Independent reference: the open stack, or None when some close mismatches."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for s in symbols:
        if s in "([{":
            stack.append(s)
        elif not stack or stack.pop() != pairs[s]:
            return None
    return stack


def _max_depth(symbols: list[str]) -> int:
    depth = best = 0
    for s in symbols:
        depth += 1 if s in "([{" else -1
        best = max(best, depth)
    return best


# -- Dyck ------------------------------------------------------------------------------------


@SETTINGS
@given(seed=seeds, lo=st.integers(1, 20), span=st.integers(0, 20), max_depth=st.integers(1, 6),
       data=st.data())
def test_dyck_complete_prefix_is_valid_and_answer_closes_it(seed, lo, span, max_depth, data):
    min_depth = data.draw(st.integers(1, max_depth))
    params = dict(min_len=max(lo, min_depth), max_len=max(lo, min_depth) + span + 1,
                  max_depth=max_depth, min_depth=min_depth)
    ex = syn.make_example("dyck", random.Random(seed), **params)
    symbols = _symbols(ex.prompt)
    stack = _dyck_stack(symbols)
    assert stack, "prefix must be valid and leave at least one bracket open"
    assert params["min_len"] <= len(symbols) <= params["max_len"]
    assert min_depth <= _max_depth(symbols) <= max_depth
    assert ex.meta == {"task": "dyck", "mode": "complete", "length": len(symbols),
                       "depth": _max_depth(symbols), "open": len(stack)}
    # Appending the answer must yield a balanced string.
    assert _dyck_stack(symbols + ex.answer.split()) == []
    assert ex.text == ex.prompt + ex.answer + "\n"
    assert syn.check_answer("dyck", ex.prompt, ex.answer)


@SETTINGS
@given(seed=seeds, data=st.data())
def test_dyck_corrupted_completion_is_rejected(seed, data):
    ex = syn.make_example("dyck", random.Random(seed), max_len=24, max_depth=5)
    closing = ex.answer.split()
    kind = data.draw(st.sampled_from(["drop", "extra", "substitute"]))
    if kind == "drop":
        closing.pop(data.draw(st.integers(0, len(closing) - 1)))
    elif kind == "extra":
        closing.append(data.draw(st.sampled_from(list(")]}"))))
    else:
        i = data.draw(st.integers(0, len(closing) - 1))
        closing[i] = data.draw(st.sampled_from([c for c in ")]}(" if c != closing[i]]))
    assert not syn.check_answer("dyck", ex.prompt, " " + " ".join(closing))


@SETTINGS
@given(seed=seeds, lo=st.integers(1, 15), span=st.integers(0, 16), max_depth=st.integers(1, 6))
def test_dyck_validity_labels_are_true(seed, lo, span, max_depth):
    params = dict(mode="validity", min_len=2 * lo, max_len=2 * lo + span, max_depth=max_depth)
    ex = syn.make_example("dyck", random.Random(seed), **params)
    symbols = _symbols(ex.prompt)
    assert ex.prompt.startswith("dyck valid: ")
    assert len(symbols) % 2 == 0 and params["min_len"] <= len(symbols) <= params["max_len"]
    assert ex.answer == (" yes" if _dyck_stack(symbols) == [] else " no")
    assert ex.meta["valid"] == (ex.answer == " yes")
    assert syn.check_answer("dyck", ex.prompt, ex.answer)
    assert not syn.check_answer("dyck", ex.prompt, " no" if ex.answer == " yes" else " yes")


def test_dyck_validity_classes_are_balanced():
    labels = [e.answer for e in syn.generate_examples("dyck", 2000, seed=3, mode="validity")]
    assert 0.45 < labels.count(" yes") / len(labels) < 0.55


def test_dyck_depths_reach_their_bounds():
    """Uniform sampling over depth paths still visits the extremes of the allowed range."""
    ex = syn.generate_examples("dyck", 500, seed=0, min_len=9, max_len=9, max_depth=4)
    assert {e.meta["depth"] for e in ex} == {1, 2, 3, 4}
    deep = syn.generate_examples("dyck", 50, seed=0, min_len=10, max_len=12, min_depth=6, max_depth=6)
    assert all(e.meta["depth"] == 6 for e in deep)


@pytest.mark.parametrize("balanced", [False, True])
def test_dyck_closed_form_feasibility_matches_counting(balanced):
    for max_depth in range(1, 5):
        for min_depth in range(1, max_depth + 1):
            table = syn._dyck_counts(14, max_depth, min_depth, balanced)
            for n in range(15):
                assert syn._dyck_feasible(n, max_depth, min_depth, balanced) == (table[n][0][0] > 0)


def test_dyck_infeasible_lengths_raise():
    with pytest.raises(ValueError, match="min_len"):
        syn.make_example("dyck", random.Random(0), min_len=2, max_len=2, max_depth=1)
    with pytest.raises(ValueError, match="min_depth"):
        syn.make_example("dyck", random.Random(0), mode="validity", min_len=2, max_len=6, min_depth=4)


# -- Modular and rotation ----------------------------------------------------------------------


@SETTINGS
@given(seed=seeds, p=st.integers(2, 23), op=st.sampled_from(["sum", "product"]),
       lo=st.integers(1, 30), span=st.integers(0, 30), data=st.data())
def test_modular_answer_and_corruption(seed, p, op, lo, span, data):
    ex = syn.make_example("modular", random.Random(seed), p=p, op=op, min_len=lo, max_len=lo + span)
    values = [int(v) for v in _symbols(ex.prompt)]
    assert ex.prompt.startswith(f"mod {p} {op}: ")
    assert lo <= len(values) <= lo + span and ex.meta["length"] == len(values)
    assert all((0 if op == "sum" else 1) <= v < p for v in values)
    truth = sum(values) % p
    if op == "product":
        truth = 1
        for v in values:
            truth = truth * v % p
    assert ex.answer == f" {truth}"
    assert syn.check_answer("modular", ex.prompt, ex.answer)
    wrong = data.draw(st.integers(0, 2 * p).filter(lambda w: w != truth))
    assert not syn.check_answer("modular", ex.prompt, f" {wrong}")


@SETTINGS
@given(seed=seeds, size=st.integers(2, 26), lo=st.integers(1, 30), span=st.integers(0, 30),
       shift=st.one_of(st.none(), st.integers(0, 70)), data=st.data())
def test_rotation_answer_and_corruption(seed, size, lo, span, shift, data):
    ex = syn.make_example("rotation", random.Random(seed), alphabet_size=size, min_len=lo,
                          max_len=lo + span, shift=shift)
    symbols = _symbols(ex.prompt)
    k = int(ex.prompt.split(":")[0].split()[1])
    assert lo <= len(symbols) <= lo + span and ex.meta == {"task": "rotation", "length": len(symbols), "shift": k}
    assert set(symbols) <= set("abcdefghijklmnopqrstuvwxyz"[:size])
    assert k == shift if shift is not None else (len(symbols) == 1 or 1 <= k < len(symbols))
    answer = ex.answer.split()
    assert answer == [symbols[(i + k) % len(symbols)] for i in range(len(symbols))]
    assert syn.check_answer("rotation", ex.prompt, ex.answer)
    i = data.draw(st.integers(0, len(answer) - 1))
    answer[i] = data.draw(st.sampled_from([c for c in "abcdefghijklmnopqrstuvwxyz"[:size] if c != answer[i]]))
    assert not syn.check_answer("rotation", ex.prompt, " " + " ".join(answer))
    assert not syn.check_answer("rotation", ex.prompt, ex.answer + " a")


@SETTINGS
@given(seed=seeds, p=st.integers(2, 23), size=st.integers(2, 26), lo=st.integers(1, 40), span=st.integers(0, 40),
       data=st.data())
def test_count_answer_is_the_number_of_symbols_mod_p(seed, p, size, lo, span, data):
    ex = syn.make_example("count", random.Random(seed), p=p, alphabet_size=size, min_len=lo, max_len=lo + span)
    symbols = _symbols(ex.prompt)
    assert ex.prompt.startswith(f"count mod {p}: ") and lo <= len(symbols) <= lo + span
    assert set(symbols) <= set(syn.ALPHABET[:size]) and ex.meta == {"task": "count", "p": p, "length": len(symbols)}
    assert ex.answer == f" {len(symbols) % p}" and syn.check_answer("count", ex.prompt, ex.answer)
    wrong = data.draw(st.integers(0, 2 * p).filter(lambda w: w != len(symbols) % p))
    assert not syn.check_answer("count", ex.prompt, f" {wrong}")


def test_count_worked_example():
    assert syn.check_answer("count", "count mod 3: q w e r t y u =", " 1")  # 7 symbols
    assert not syn.check_answer("count", "count mod 3: q w e r t y u =", " 7")


def test_rotation_worked_example():
    assert syn.check_answer("rotation", "rot 2: a b c d e =", " c d e a b")
    assert not syn.check_answer("rotation", "rot 2: a b c d e =", " d e a b c")


# -- Shared API --------------------------------------------------------------------------------


@pytest.mark.parametrize("task", syn.TASKS)
def test_generation_is_deterministic_per_seed(task):
    a = syn.generate_examples(task, 20, seed=5)
    assert a == syn.generate_examples(task, 20, seed=5)
    assert [e.text for e in a] != [e.text for e in syn.generate_examples(task, 20, seed=6)]
    docs = list(syn.generate_documents(task, 4, seed=5, per_doc=3))
    assert docs == list(syn.generate_documents(task, 4, seed=5, per_doc=3))
    assert len(docs) == 4 and len(set(docs)) == 4
    for doc in docs:
        lines = doc.splitlines()
        assert doc.endswith("\n") and len(lines) == 3
        for line in lines:
            prompt, answer = line.split("=")
            assert syn.check_answer(task, prompt + "=", answer)


@pytest.mark.parametrize("task", syn.TASKS)
def test_eval_settings_separate_in_from_out(task):
    grid = syn.eval_settings(task)
    assert [split for split, _, _ in grid[:2]] == ["train", "in"] and all(split == "out" for split, _, _ in grid[2:])
    assert grid[0][1:] == grid[1][1:]  # the recall control draws the training distribution too
    train_max = syn.DEFAULTS[task]["max_len"]
    for split, _, params in grid:
        ex = syn.generate_examples(task, 20, seed=0, **params)
        if "min_len" in params:
            assert all(e.meta["length"] > train_max for e in ex)
        if "min_depth" in params:
            assert all(e.meta["depth"] > syn.DEFAULTS["dyck"]["max_depth"] for e in ex)


@pytest.mark.parametrize("task, params, name", [
    ("dyck", {"max_len": 2, "min_len": 5}, "max_len"),
    ("dyck", {"max_depth": 0}, "max_depth"),
    ("dyck", {"min_depth": 9, "max_depth": 3}, "min_depth"),
    ("dyck", {"mode": "balanced"}, "mode"),
    ("dyck", {"mode": "validity", "min_len": 1}, "min_len"),
    ("modular", {"p": 1}, "p"),
    ("modular", {"op": "xor"}, "op"),
    ("modular", {"min_len": 0}, "min_len"),
    ("modular", {"min_len": 2.5}, "min_len"),
    ("rotation", {"alphabet_size": 27}, "alphabet_size"),
    ("rotation", {"shift": -1}, "shift"),
    ("rotation", {"depth": 3}, "depth"),
    ("count", {"p": 1}, "p"),
    ("count", {"alphabet_size": 1}, "alphabet_size"),
    ("count", {"shift": 1}, "shift"),
    ("sorting", {}, "task"),
])
def test_bad_params_name_the_parameter(task, params, name):
    with pytest.raises(ValueError, match=name):
        syn.make_example(task, random.Random(0), **params)
    with pytest.raises(ValueError, match=name):
        syn.generate_examples(task, 0, seed=0, **params)


def test_generate_documents_validates_per_doc():
    with pytest.raises(ValueError, match="per_doc"):
        list(syn.generate_documents("modular", 1, seed=0, per_doc=0))


@pytest.mark.parametrize("task, prompt", [
    ("dyck", "dyck: ( ] ="), ("dyck", "dyck: ( )"), ("dyck", "dyck: ( ) ="),
    ("modular", "mod x sum: 1 2 ="), ("modular", "mod 7 sum: 1 a ="),
    ("rotation", "rot 1: ="), ("rotation", "dyck: ( ="),
    ("count", "count mod 5: ="), ("count", "count 5: a ="), ("count", "mod 5 sum: 1 ="),
])
def test_malformed_prompts_raise(task, prompt):
    with pytest.raises(ValueError):
        syn.check_answer(task, prompt, " x")


def test_eval_settings_follow_the_training_distribution():
    grid = syn.eval_settings("modular", {"p": 5, "min_len": 2, "max_len": 6})
    assert [(split, label) for split, label, _ in grid] == [
        ("train", "len 2-6"), ("in", "len 2-6"), ("out", "len 7-12"), ("out", "len 13-24")]
    assert [syn.side_of(split) for split, _, _ in grid] == ["train", "test", "test", "test"]
    for _, _, params in grid:
        assert all(int(e.answer) < 5 for e in syn.generate_examples("modular", 20, seed=0, **params))
    dyck = syn.eval_settings("dyck", {"max_len": 8, "max_depth": 2})
    assert dyck[-1][1] == "depth 3-4" and dyck[-1][2]["max_len"] == 8


# -- Held-out instances --------------------------------------------------------------------------

PRESETS = {  # the training distributions of configs/tasks/*.yaml
    "dyck": {"min_len": 2, "max_len": 8, "max_depth": 3},
    "modular": {"p": 5, "min_len": 1, "max_len": 3},
    "rotation": {"alphabet_size": 26, "min_len": 3, "max_len": 6, "shift": 1},
    "count": {"p": 5, "alphabet_size": 26, "min_len": 1, "max_len": 16},
}


def _prompts(docs) -> list[str]:
    return [syn.prompt_of(line) for doc in docs for line in doc.splitlines()]


@pytest.mark.parametrize("task", syn.TASKS)
def test_training_documents_and_test_instances_are_disjoint(task):
    train = set(_prompts(syn.generate_documents(task, 500, seed=0, **PRESETS[task])))
    assert train and not any(syn.held_out(p) for p in train)
    for split, _, params in syn.eval_settings(task, PRESETS[task]):
        drawn = syn.generate_examples(task, 200, seed=1, side=syn.side_of(split), **params)
        assert all(syn.held_out(e.prompt) == (split != "train") for e in drawn)
        if split != "train":
            assert not train & {e.prompt for e in drawn}
    # The old draw (no side) of the training distribution: mostly prompts the documents hold.
    old = syn.generate_examples(task, 200, seed=1, **PRESETS[task])
    assert sum(e.prompt in train for e in old) > (100 if task not in ("rotation", "count") else 0)


def test_held_out_is_a_fixed_fifth_of_the_instances():
    prompts = [f"mod 5 sum: {a} {b} {c} {d} =" for a in range(5) for b in range(5) for c in range(5) for d in range(5)]
    share = sum(map(syn.held_out, prompts)) / len(prompts)
    assert abs(share - syn.HELD_OUT_FRACTION) < 0.04  # 625 instances: 3 standard errors
    assert [syn.held_out(p) for p in prompts] == [syn.held_out(p) for p in prompts]  # no seed, no state


def test_preset_input_spaces_have_held_out_instances():
    # Sum mod 5 of 1-3 digits: 155 instances, 24 held out; the former preset (1-2 digits) had 30
    # instances, every one in the training data.
    space = [f"mod 5 sum: {' '.join(v)} =" for n in (1, 2, 3) for v in itertools.product("01234", repeat=n)]
    assert len(space) == 155 and sum(map(syn.held_out, space)) >= 20
    drawn = syn.generate_examples("modular", 300, seed=1, side="test", **PRESETS["modular"])
    assert len({e.prompt for e in drawn}) >= 20


def test_a_space_without_held_out_instances_is_an_error():
    assert not any(syn.held_out(f"mod 5 sum: {v} =") for v in range(5))  # the 5 one-digit instances
    with pytest.raises(ValueError, match="too small to hold out"):
        syn.generate_examples("modular", 1, seed=0, side="test", p=5, min_len=1, max_len=1)
    with pytest.raises(ValueError, match="side"):
        syn.generate_examples("modular", 1, seed=0, side="val")


def test_prompt_of_reads_an_instance_line():
    ex = syn.generate_examples("rotation", 1, seed=0)[0]
    assert syn.prompt_of(ex.text.rstrip("\n")) == ex.prompt and syn.prompt_of("no instance") is None
