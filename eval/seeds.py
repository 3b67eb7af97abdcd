"""Across-seed descriptions for the report: one label (model + scaling variant) trained with several
seeds gives, per context length, a mean and a sample standard deviation, and the extrapolation
ratio (perplexity over the same seed's perplexity at its training length). Tests and intervals
are significance.py's, on endpoints declared before the run.

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
