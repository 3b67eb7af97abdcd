"""Algorithmic tasks as plain text: Dyck-3, modular sum/product, cyclic rotation, counting mod p.

Every instance is one line, ``<prompt> = <answer>\\n``, with symbols separated by spaces so any
tokenizer splits them the same way. Training documents are several lines concatenated, so they
flow through the ordinary prepare/pack pipeline. ``meta`` records the quantities that
in/out-of-distribution splits are defined on (length, depth). Exact formats: docs/tasks.md.

Held-out instances: `held_out(prompt)`, a hash of the prompt text, puts every instance on one side
for good. Training documents (`generate_documents`, what `bifocal prepare` writes) draw only
training-side instances, test sets (`generate_examples(..., side="test")`, what `bifocal eval
tasks` draws) only held-out ones, so the two are disjoint whatever the seeds and sizes.
"""

from __future__ import annotations

import hashlib
import random
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

TASKS = ("dyck", "modular", "rotation", "count")

OPEN = "([{"
CLOSE = ")]}"
_MATCH = dict(zip(CLOSE, OPEN))
_CLOSER = dict(zip(OPEN, CLOSE))
ALPHABET = "abcdefghijklmnopqrstuvwxyz"

# Defaults are the "train" (short) distribution; longer/deeper test sets pass larger values.
DEFAULTS: dict[str, dict[str, Any]] = {
    "dyck": {"mode": "complete", "min_len": 4, "max_len": 16, "max_depth": 4, "min_depth": 1},
    "modular": {"p": 7, "op": "sum", "min_len": 4, "max_len": 16},
    "rotation": {"alphabet_size": 8, "min_len": 4, "max_len": 16, "shift": None},
    "count": {"p": 5, "alphabet_size": 26, "min_len": 1, "max_len": 16},
}
DYCK_MODES = ("complete", "validity")
MODULAR_OPS = ("sum", "product")
SIDES = ("train", "test")
HELD_OUT_FRACTION = 0.2  # of the instances (by prompt), never in training documents
MAX_DRAWS = 10_000       # draws per instance before a side is declared empty


@dataclass
class Example:
    """One task instance; ``text`` is what a training document contains."""

    prompt: str
    answer: str
    meta: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The instance's line in a training document: prompt, answer, newline."""
        return self.prompt + self.answer + "\n"


# ---------------------------------------------------------------------------------------------
# Parameter validation


def _int_param(params: dict, name: str, lo: int, hi: int | None = None) -> int:
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _resolve_params(task: str, params: dict) -> dict:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    unknown = sorted(set(params) - set(DEFAULTS[task]))
    if unknown:
        raise ValueError(f"unknown parameter(s) for task {task!r}: {', '.join(unknown)} "
                         f"(allowed: {', '.join(DEFAULTS[task])})")
    out = {**DEFAULTS[task], **params}
    if task == "dyck" and out["mode"] not in DYCK_MODES:
        raise ValueError(f"mode must be one of {DYCK_MODES}, got {out['mode']!r}")
    if task in ("modular", "count"):
        _int_param(out, "p", 2)
    if task == "modular" and out["op"] not in MODULAR_OPS:
        raise ValueError(f"op must be one of {MODULAR_OPS}, got {out['op']!r}")
    if task in ("rotation", "count"):
        _int_param(out, "alphabet_size", 2, len(ALPHABET))
        if out.get("shift") is not None:
            _int_param(out, "shift", 0)
    if task == "dyck":
        _int_param(out, "max_depth", 1)
        _int_param(out, "min_depth", 1, out["max_depth"])
    _int_param(out, "min_len", 2 if task == "dyck" and out["mode"] == "validity" else 1)
    _int_param(out, "max_len", out["min_len"])
    return out


# ---------------------------------------------------------------------------------------------
# Dyck-3: depth paths are sampled uniformly among all valid ones by counting completions (DP),
# so no rejection loop can stall at long lengths; bracket types are then drawn independently.


# (max_depth, min_depth, balanced) -> table[k][d][r]: number of ways to finish with k steps left
# from depth d, r = whether min_depth has been reached. Indexed by steps *remaining*, so one
# growing table serves every length.
_COUNT_TABLES: dict[tuple[int, int, bool], list[list[list[int]]]] = {}
_COUNT_LOCK = threading.Lock()  # growing a table from two threads would interleave levels


def _dyck_counts(steps: int, max_depth: int, min_depth: int, balanced: bool) -> list:
    """Completion counts for up to ``steps`` remaining steps. A complete-mode prefix must end
    with at least one bracket open; a validity-mode string must end balanced."""
    with _COUNT_LOCK:
        table = _COUNT_TABLES.setdefault((max_depth, min_depth, balanced), [])
        if not table:
            table.append([[0, int(d == 0) if balanced else int(d >= 1)]
                          for d in range(max_depth + 1)])
        while len(table) <= steps:
            nxt = table[-1]
            table.append([[(nxt[d + 1][int(r or d + 1 >= min_depth)] if d < max_depth else 0)
                           + (nxt[d - 1][r] if d > 0 else 0) for r in (0, 1)]
                          for d in range(max_depth + 1)])
        return table


def _dyck_feasible(length: int, max_depth: int, min_depth: int, balanced: bool) -> bool:
    """Closed form of "counts[length][0][0] > 0", so choosing a length builds no tables."""
    if balanced:
        return length % 2 == 0 and length >= 2 * min_depth
    # Climb to min_depth, then oscillate inside [1, max_depth]; with max_depth == 1 the depth
    # alternates 1, 0, 1, ... so only odd lengths end with a bracket open.
    return length >= min_depth and (max_depth >= 2 or length % 2 == 1)


def _sample_dyck(rng: random.Random, length: int, max_depth: int, min_depth: int,
                 balanced: bool) -> list[str]:
    counts = _dyck_counts(length, max_depth, min_depth, balanced)
    symbols: list[str] = []
    stack: list[str] = []
    reached = 0
    for i in range(length):
        d = len(stack)
        nxt = counts[length - i - 1]
        up = nxt[d + 1][int(reached or d + 1 >= min_depth)] if d < max_depth else 0
        down = nxt[d - 1][reached] if d > 0 else 0
        if rng.randrange(up + down) < up:
            sym = OPEN[rng.randrange(3)]
            stack.append(sym)
            reached = int(reached or len(stack) >= min_depth)
        else:
            sym = _CLOSER[stack.pop()]
        symbols.append(sym)
    return symbols


def _dyck_scan(symbols: list[str]) -> tuple[list[str] | None, int]:
    """(open stack, or None if a close mismatches; maximum depth seen)."""
    stack: list[str] = []
    depth = 0
    for sym in symbols:
        if sym in OPEN:
            stack.append(sym)
            depth = max(depth, len(stack))
        elif not stack or stack.pop() != _MATCH[sym]:
            return None, depth
    return stack, depth


def _dyck_closing(stack: list[str]) -> list[str]:
    return [_CLOSER[s] for s in reversed(stack)]


def _choose_length(rng: random.Random, p: dict, feasible) -> int:
    lengths = [n for n in range(p["min_len"], p["max_len"] + 1) if feasible(n)]
    if not lengths:
        raise ValueError(f"no length in min_len..max_len = {p['min_len']}..{p['max_len']} admits "
                         f"the requested depths (min_depth={p.get('min_depth')}, "
                         f"max_depth={p.get('max_depth')}, mode={p.get('mode')})")
    return lengths[rng.randrange(len(lengths))]


def _make_dyck(rng: random.Random, p: dict) -> Example:
    balanced = p["mode"] == "validity"
    length = _choose_length(
        rng, p, lambda n: _dyck_feasible(n, p["max_depth"], p["min_depth"], balanced))
    symbols = _sample_dyck(rng, length, p["max_depth"], p["min_depth"], balanced)
    stack, depth = _dyck_scan(symbols)
    meta = {"task": "dyck", "mode": p["mode"], "length": length, "depth": depth}
    if not balanced:
        closing = _dyck_closing(stack)
        meta["open"] = len(closing)
        return Example(f"dyck: {' '.join(symbols)} =", " " + " ".join(closing), meta)
    # Negatives substitute one symbol of a balanced string: any single substitution breaks it
    # (type change -> mismatch, open<->close -> unbalanced) and keeps length and parity, so
    # neither gives the label away.
    valid = rng.random() < 0.5
    if not valid:
        i = rng.randrange(length)
        symbols[i] = rng.choice([s for s in OPEN + CLOSE if s != symbols[i]])
    meta["valid"] = valid
    return Example(f"dyck valid: {' '.join(symbols)} =", " yes" if valid else " no", meta)


# ---------------------------------------------------------------------------------------------
# Modular running sum / product (answer: the final value only).


def _modular_value(op: str, p: int, values: list[int]) -> int:
    acc = 0 if op == "sum" else 1
    for v in values:
        acc = (acc + v) % p if op == "sum" else (acc * v) % p
    return acc


def _make_modular(rng: random.Random, p: dict) -> Example:
    mod, op = p["p"], p["op"]
    length = rng.randint(p["min_len"], p["max_len"])
    lo = 0 if op == "sum" else 1  # 0 would absorb a product and make the answer trivial
    values = [rng.randrange(lo, mod) for _ in range(length)]
    answer = _modular_value(op, mod, values)
    meta = {"task": "modular", "op": op, "p": mod, "length": length}
    return Example(f"mod {mod} {op}: {' '.join(map(str, values))} =", f" {answer}", meta)


# ---------------------------------------------------------------------------------------------
# Cyclic rotation: the first k symbols move to the end.


def _rotate(symbols: list[str], k: int) -> list[str]:
    k %= len(symbols)
    return symbols[k:] + symbols[:k]


def _make_rotation(rng: random.Random, p: dict) -> Example:
    length = rng.randint(p["min_len"], p["max_len"])
    symbols = [ALPHABET[rng.randrange(p["alphabet_size"])] for _ in range(length)]
    k = p["shift"] if p["shift"] is not None else (rng.randrange(1, length) if length > 1 else 0)
    meta = {"task": "rotation", "length": length, "shift": k}
    return Example(f"rot {k}: {' '.join(symbols)} =", " " + " ".join(_rotate(symbols, k)), meta)


# ---------------------------------------------------------------------------------------------
# Counting mod p: the answer is the number of symbols after the colon, mod p. It depends only on
# where "=" sits relative to ":" (their distance mod p), not on which symbols stand between, so it
# is periodic in relative position with period p: a head rotating at k*2*pi/p (k = 1..p-1) sees the
# same phase at every distance with the same residue, and would count beyond any trained length.
# Random letters keep a tokenizer from merging runs of one symbol into fewer tokens.


def _make_count(rng: random.Random, p: dict) -> Example:
    mod = p["p"]
    length = rng.randint(p["min_len"], p["max_len"])
    symbols = [ALPHABET[rng.randrange(p["alphabet_size"])] for _ in range(length)]
    meta = {"task": "count", "p": mod, "length": length}
    return Example(f"count mod {mod}: {' '.join(symbols)} =", f" {length % mod}", meta)


_MAKERS = {"dyck": _make_dyck, "modular": _make_modular, "rotation": _make_rotation, "count": _make_count}


# ---------------------------------------------------------------------------------------------
# Public API


def held_out(prompt: str) -> bool:
    """Whether the instance with this prompt is held out of training (a test instance).

    The first 8 bytes of blake2b(prompt) as an integer below HELD_OUT_FRACTION * 2^64: a fixed,
    seed-free rule, so the training generator and the evaluation agree on every instance.
    """
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < HELD_OUT_FRACTION * 2 ** 64


def make_example(task: str, rng: random.Random, side: str | None = None, **params: Any) -> Example:
    """One instance of ``task``; ``params`` override DEFAULTS[task] (unknown names rejected).

    ``side``: None (any instance), "train" (not `held_out`) or "test" (`held_out`), drawn by
    rejection; ValueError when MAX_DRAWS draws find none (the input space is too small to have
    that side).
    """
    resolved = _resolve_params(task, params)  # rejects unknown tasks and parameters
    if side is None:
        return _MAKERS[task](rng, resolved)
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES} or None, got {side!r}")
    for _ in range(MAX_DRAWS):
        ex = _MAKERS[task](rng, resolved)
        if held_out(ex.prompt) == (side == "test"):
            return ex
    raise ValueError(f"no {side}-side instance of {task!r} in {MAX_DRAWS} draws with {params}: the input "
                     f"space is too small to hold out test instances; widen it (more or longer values)")


def generate_examples(task: str, n: int, seed: int, side: str | None = None, **params: Any) -> list[Example]:
    """``n`` instances (of ``side``, see `make_example`), identical for the same arguments."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _resolve_params(task, params)  # validate even when n == 0
    rng = random.Random(f"{task}:{seed}")
    return [make_example(task, rng, side, **params) for _ in range(n)]


def generate_documents(task: str, n: int, seed: int, per_doc: int = 8,
                       **params: Any) -> Iterator[str]:
    """``n`` training documents of ``per_doc`` newline-terminated training-side examples each:
    no held-out instance (`held_out`) is ever written."""
    if isinstance(per_doc, bool) or not isinstance(per_doc, int) or per_doc < 1:
        raise ValueError(f"per_doc must be an integer >= 1, got {per_doc!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _resolve_params(task, params)
    rng = random.Random(f"{task}:docs:{seed}")
    for _ in range(n):
        yield "".join(make_example(task, rng, "train", **params).text for _ in range(per_doc))


def prompt_of(line: str) -> str | None:
    """The prompt of one instance line (``<prompt> = <answer>``, up to and including "="), or None
    for a line without one: how evaluation finds the instances of prepared training documents."""
    head, sep, _ = line.partition("=")
    return head + sep if sep else None


def solve(task: str, prompt: str) -> str:
    """The correct answer for ``prompt``, recomputed from the prompt text alone.

    Raises ValueError when the prompt is not in the task's format.
    """
    body = prompt.strip()
    if not body.endswith("="):
        raise ValueError(f"prompt must end with '=': {prompt!r}")
    head, sep, rest = body[:-1].partition(":")
    if not sep:
        raise ValueError(f"prompt has no ':' after the task header: {prompt!r}")
    tokens, head_words = rest.split(), head.split()
    if task == "dyck":
        if any(t not in OPEN + CLOSE for t in tokens) or head_words not in (["dyck"], ["dyck", "valid"]):
            raise ValueError(f"not a dyck prompt: {prompt!r}")
        stack, _ = _dyck_scan(tokens)
        if head_words == ["dyck", "valid"]:
            return " yes" if stack == [] else " no"
        if not stack:
            raise ValueError(f"dyck prefix is invalid or already balanced: {prompt!r}")
        return " " + " ".join(_dyck_closing(stack))
    if task == "modular":
        if len(head_words) != 3 or head_words[0] != "mod" or not head_words[1].isdigit() \
                or int(head_words[1]) < 1 or head_words[2] not in MODULAR_OPS \
                or not all(t.isdigit() for t in tokens):
            raise ValueError(f"not a modular prompt: {prompt!r}")
        return f" {_modular_value(head_words[2], int(head_words[1]), [int(t) for t in tokens])}"
    if task == "rotation":
        if len(head_words) != 2 or head_words[0] != "rot" or not head_words[1].isdigit() \
                or not tokens:
            raise ValueError(f"not a rotation prompt: {prompt!r}")
        return " " + " ".join(_rotate(tokens, int(head_words[1])))
    if task == "count":
        if len(head_words) != 3 or head_words[:2] != ["count", "mod"] or not head_words[2].isdigit() \
                or int(head_words[2]) < 1 or not tokens:
            raise ValueError(f"not a count prompt: {prompt!r}")
        return f" {len(tokens) % int(head_words[2])}"
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def check_answer(task: str, prompt: str, answer: str) -> bool:
    """Whether ``answer`` is correct for ``prompt``; whitespace differences are ignored."""
    return answer.split() == solve(task, prompt).split()


def eval_settings(task: str, params: dict | None = None) -> list[tuple[str, str, dict]]:
    """(split, setting label, params) grid around a training distribution (`params`, default
    DEFAULTS). "train" draws training-side instances of that distribution (the recall control),
    "in" held-out ones (generalisation within the distribution), "out" held-out ones that are
    longer (max_len+1 .. 2*max_len, 2*max_len+1 .. 4*max_len) or, for Dyck, deeper at the training
    lengths. Every setting keeps the other training parameters (modulus, alphabet, mode); draw its
    instances with ``side=side_of(split)``."""
    train = dict(params or {})
    base = _resolve_params(task, train)
    lo, hi = base["min_len"], base["max_len"]
    settings = [("train", f"len {lo}-{hi}", train), ("in", f"len {lo}-{hi}", train)]
    for a, b in ((hi + 1, 2 * hi), (2 * hi + 1, 4 * hi)):
        settings.append(("out", f"len {a}-{b}", {**train, "min_len": a, "max_len": b}))
    if task == "dyck":
        d = base["max_depth"]
        # Same lengths as training, so only depth is out of distribution.
        settings.append(("out", f"depth {d + 1}-{2 * d}", {**train, "min_depth": d + 1, "max_depth": 2 * d}))
    return settings


def side_of(split: str) -> str:
    """The side an evaluation split draws from: "train" for the recall control, else "test"."""
    return "train" if split == "train" else "test"
