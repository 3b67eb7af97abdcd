"""Across-seed statistics for the report: one label (model + scaling variant) trained with several
seeds gives, per context length, a mean and a sample standard deviation, the extrapolation ratio
(perplexity over the same seed's perplexity at its training length), and which differences
between labels lie outside the seed spread.

A result's training seed is `extra["train_seed"]`; results without one count as a single seed,
later files overriding earlier ones at the same length (as a re-evaluation should).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from .results import EvalResult


def train_seed(r: EvalResult) -> Any:
    return r.extra.get("train_seed")


def per_seed(group: list[EvalResult], value: str) -> dict[int, dict[Any, float]]:
    """length -> {seed: value} over the results of one label."""
    out: dict[int, dict[Any, float]] = {}
    for r in group:
        for row in r.rows:
            v = row.get(value)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(int(row["length"]), {})[train_seed(r)] = float(v)
    return out


def relative_to_train_len(group: list[EvalResult], value: str, train_len: int | None) -> dict[int, dict[Any, float]]:
    """length -> {seed: value / the same seed's value at the training length}: the extrapolation
    curve itself, free of how well each seed learned in distribution. Empty when the training
    length was not evaluated."""
    values = per_seed(group, value)
    at_train = values.get(train_len) if train_len is not None else None
    if not at_train:
        return {}
    return {n: {s: v / at_train[s] for s, v in seeds.items() if at_train.get(s)}
            for n, seeds in values.items()}


def mean_std(values: dict[Any, float]) -> tuple[float | None, float | None, int]:
    """(mean, sample std or 0 for one seed, number of seeds); (None, None, 0) when empty."""
    xs = [v for v in values.values() if math.isfinite(v)]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def separated(a: dict[Any, float], b: dict[Any, float]) -> str:
    """'lower' / 'higher' when every seed of `a` is below / above every seed of `b` (both with at
    least two seeds), else '' (within the seed spread). With n seeds each, two identically
    distributed labels separate by chance with probability 2 / C(2n, n) (0.1 for n = 3)."""
    xa, xb = list(a.values()), list(b.values())
    if len(xa) < 2 or len(xb) < 2:
        return ""
    if max(xa) < min(xb):
        return "lower"
    if min(xa) > max(xb):
        return "higher"
    return ""


def chance_of_separation(n_a: int, n_b: int) -> float:
    """Probability that all of n_a draws fall below all of n_b draws or above them, for two labels
    with the same distribution: 2 / C(n_a + n_b, n_a)."""
    return 2.0 / math.comb(n_a + n_b, n_a)
