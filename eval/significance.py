"""Statistics for claims fixed before a run: endpoints, tests that fit the design, bootstrap
intervals over seeds and documents, and Holm's correction for the number of tests.

An endpoint is the mean log-perplexity (mean token loss, nats) over declared lengths, given as
multiples of the training length, in one windowing protocol; a model gets one value per training
seed: the mean over those lengths of (summed loss / scored tokens) at each length.

A comparison "A vs B" on an endpoint uses
  * a paired t-test over seeds (scipy.stats.ttest_rel) when A and B are the same trained weights
    (one `model` and `scheme`: a training-free scaling against its own base, or two scalings),
    on the seeds both have;
  * Welch's t-test (scipy.stats.ttest_ind, equal_var=False) otherwise: independent trainings;
  * a percentile bootstrap interval (Efron & Tibshirani, An Introduction to the Bootstrap, 1993,
    ch. 13) of the difference, resampling seeds (the same draw for both when paired, separate
    draws otherwise) and documents (the same draw for A and B, which scored the same documents);
    without per-document losses in the results, seeds only (the report says so).
All p-values of a report are adjusted together by Holm's step-down method (Holm, Scand. J.
Statist. 6:65-70, 1979), which holds the family-wise error rate at `alpha`. The verdict is
"lower" / "higher" when the adjusted p is below alpha, else "no difference detected": not a
claim that the two are equal.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bifocal.core.errors import BifocalError

from .protocol import parse_protocol
from .results import EvalResult
from .seeds import train_seed


@dataclass(frozen=True)
class Endpoint:
    name: str
    multiples: tuple[float, ...]  # of the training length
    protocol: str = "windows"  # perplexity.protocol_name


@dataclass
class Analysis:
    endpoints: list[Endpoint]
    comparisons: list[tuple[str, str]] | None = None  # None: every label against `baseline`
    baseline: str = "rope"
    alpha: float = 0.05
    bootstrap: int = 2000  # resamples
    seed: int = 0  # of the bootstrap's random draws

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ANALYSIS_KEYS = ("endpoints", "comparisons", "baseline", "alpha", "bootstrap", "seed")


def parse_analysis(raw: Any, where: str) -> Analysis:
    """An `analysis:` mapping of a study YAML::

        endpoints:                   # name -> lengths (multiples of the training length) and protocol
          extrapolation: {multiples: [2, 4, 8, 16], protocol: "context>=0.75L"}
        comparisons: [[bifocal, rope], [pope, bifocal]]   # optional; default: each label vs baseline
        baseline: rope
        alpha: 0.05
        bootstrap: 2000

    Raises BifocalError naming `where` and the offending key."""
    def bad(msg: str) -> BifocalError:
        return BifocalError(f"{where}: analysis: {msg}")

    if not isinstance(raw, dict):
        raise bad(f"expected a mapping with {', '.join(ANALYSIS_KEYS)}, got {raw!r}")
    for key in raw:
        if key not in ANALYSIS_KEYS:
            raise bad(f"unknown key {key!r} (one of {', '.join(ANALYSIS_KEYS)})")
    eps = raw.get("endpoints")
    if not isinstance(eps, dict) or not eps:
        raise bad("`endpoints` must map names to {multiples: [...], protocol: ...}")
    endpoints = []
    for name, spec in eps.items():
        spec = {"multiples": spec} if isinstance(spec, list) else spec
        if not isinstance(spec, dict) or set(spec) - {"multiples", "protocol"}:
            raise bad(f"endpoint {name!r}: expected {{multiples: [...], protocol: ...}}, got {spec!r}")
        mult = spec.get("multiples")
        if not isinstance(mult, list) or not mult or any(
                isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0 for m in mult):
            raise bad(f"endpoint {name!r}: multiples must be a non-empty list of positive numbers, got {mult!r}")
        protocol = str(spec.get("protocol", "windows"))
        try:
            parse_protocol(protocol)
        except ValueError as exc:
            raise bad(f"endpoint {name!r}: {exc}") from None
        endpoints.append(Endpoint(str(name), tuple(float(m) for m in mult), protocol))
    comparisons = raw.get("comparisons")
    if comparisons is not None:
        if not isinstance(comparisons, list) or not all(
                isinstance(c, list) and len(c) == 2 and all(isinstance(x, str) for x in c) and c[0] != c[1]
                for c in comparisons):
            raise bad(f"`comparisons` must be a list of [A, B] label pairs, got {comparisons!r}")
        comparisons = [(a, b) for a, b in comparisons]
    analysis = Analysis(endpoints, comparisons, **{k: raw[k] for k in ("baseline", "alpha", "bootstrap", "seed")
                                                   if k in raw})
    if not (isinstance(analysis.alpha, float) and 0 < analysis.alpha < 1):
        raise bad(f"alpha must be a number in (0, 1), got {analysis.alpha!r}")
    if isinstance(analysis.bootstrap, bool) or not isinstance(analysis.bootstrap, int) or analysis.bootstrap < 100:
        raise bad(f"bootstrap must be an integer >= 100 (resamples), got {analysis.bootstrap!r}")
    return analysis


# ---------------------------------------------------------------------------------------------
# Per-seed data of one label


@dataclass
class Samples:
    """One label's data for one endpoint: seeds x lengths x documents of summed loss and tokens
    (documents axis of size 1 when the results hold only totals)."""
    seeds: list[Any]
    lengths: list[int]
    loss: np.ndarray  # (seeds, lengths, docs) summed token loss, nats
    tokens: np.ndarray  # (seeds, lengths, docs)
    doc_ids: list[str] | None  # None: totals only

    def values(self) -> np.ndarray:
        """(seeds,) endpoint per seed: mean over lengths of the mean token loss."""
        return (self.loss.sum(-1) / self.tokens.sum(-1)).mean(-1)

    def take(self, seeds: list[Any]) -> "Samples":
        idx = [self.seeds.index(s) for s in seeds]
        return Samples(list(seeds), self.lengths, self.loss[idx], self.tokens[idx], self.doc_ids)

    def totals(self) -> "Samples":
        return Samples(self.seeds, self.lengths, self.loss.sum(-1, keepdims=True),
                       self.tokens.sum(-1, keepdims=True), None)


def endpoint_lengths(endpoint: Endpoint, train_len: int) -> list[int]:
    return sorted({int(round(m * train_len)) for m in endpoint.multiples})


def samples(group: list[EvalResult], endpoint: Endpoint, train_len: int) -> Samples | str:
    """The label's Samples, or a reason why there are none. Seeds lacking a length are left out;
    later results override earlier ones at the same seed and length."""
    lengths = endpoint_lengths(endpoint, train_len)
    by_seed: dict[Any, dict[int, dict]] = {}
    for r in group:
        for row in r.rows:
            by_seed.setdefault(train_seed(r), {})[int(row["length"])] = row
    complete = {s: rows for s, rows in by_seed.items() if all(n in rows for n in lengths)}
    if not complete:
        return f"no seed evaluated at every length of {', '.join(map(str, lengths))}"
    seeds = sorted(complete, key=lambda s: (s is None, s if s is not None else 0))
    rows = [complete[s][n] for s in seeds for n in lengths]
    ids = rows[0].get("doc_ids")
    if ids and all(r.get("doc_ids") == ids for r in rows):
        loss = np.array([r["doc_loss"] for r in rows], dtype=float)
        tokens = np.array([r["doc_tokens"] for r in rows], dtype=float)
    else:
        ids = None
        loss = np.array([[r["loss"] * r["tokens"]] for r in rows], dtype=float)
        tokens = np.array([[r["tokens"]] for r in rows], dtype=float)
    shape = (len(seeds), len(lengths), loss.shape[-1])
    return Samples(seeds, lengths, loss.reshape(shape), tokens.reshape(shape), ids)


# ---------------------------------------------------------------------------------------------
# Bootstrap, tests, Holm


def _boot(s: Samples, seed_idx: np.ndarray, doc_weights: np.ndarray | None) -> np.ndarray:
    """(B,) endpoint of each resample: seeds seed_idx (B, k), documents counted doc_weights (B, D)."""
    if doc_weights is None:
        per_seed = (s.loss.sum(-1) / s.tokens.sum(-1)).mean(-1)  # (S,)
        return per_seed[seed_idx].mean(-1)
    num = np.einsum("bd,sld->bsl", doc_weights, s.loss)
    den = np.einsum("bd,sld->bsl", doc_weights, s.tokens)
    per_seed = (num / den).mean(-1)  # (B, S)
    return np.take_along_axis(per_seed, seed_idx, axis=1).mean(-1)


def _doc_weights(rng: np.random.Generator, n_docs: int, n_boot: int) -> np.ndarray:
    return rng.multinomial(n_docs, np.full(n_docs, 1.0 / n_docs), size=n_boot).astype(float)


def _interval(draws: np.ndarray, alpha: float) -> list[float]:
    return [float(np.quantile(draws, alpha / 2)), float(np.quantile(draws, 1 - alpha / 2))]


def label_interval(s: Samples, alpha: float, n_boot: int, rng: np.random.Generator) -> list[float]:
    """Percentile interval (level 1 - alpha) of the label's endpoint (mean over seeds)."""
    seed_idx = rng.integers(0, len(s.seeds), size=(n_boot, len(s.seeds)))
    w = _doc_weights(rng, len(s.doc_ids), n_boot) if s.doc_ids else None
    return _interval(_boot(s, seed_idx, w), alpha)


def _p_value(result, diff: float) -> float | None:
    p = float(result.pvalue)
    if math.isnan(p):  # no variance at all: identical values (p = 1) or a constant offset
        return 1.0 if diff == 0 else None
    return p


def compare(a: Samples, b: Samples, paired: bool, alpha: float, n_boot: int, rng: np.random.Generator) -> dict:
    """Test and interval of A - B (endpoint difference in nats; exp of it is the perplexity ratio)."""
    from scipy import stats

    note = []
    if paired:
        common = [s for s in a.seeds if s in b.seeds]
        a, b = a.take(common), b.take(common)
    if a.doc_ids is None or b.doc_ids is None or a.doc_ids != b.doc_ids:
        if a.doc_ids is not None or b.doc_ids is not None:
            note.append("documents differ or are not recorded: interval over seeds only")
        a, b = a.totals(), b.totals()
    va, vb = a.values(), b.values()
    diff = float(va.mean() - vb.mean())
    enough = len(va) >= 2 and len(vb) >= 2
    p = t = None
    if enough:
        with warnings.catch_warnings():  # identical seeds (a scaling that is the identity there) warn of
            warnings.simplefilter("ignore", RuntimeWarning)  # "catastrophic cancellation"; p is handled below
            res = stats.ttest_rel(va, vb) if paired else stats.ttest_ind(va, vb, equal_var=False)
        p, t = _p_value(res, diff), float(res.statistic)
    else:
        note.append("fewer than 2 seeds: not tested")
    w = _doc_weights(rng, len(a.doc_ids), n_boot) if a.doc_ids else None
    ia = rng.integers(0, len(va), size=(n_boot, len(va)))
    ib = ia if paired else rng.integers(0, len(vb), size=(n_boot, len(vb)))
    ci = _interval(_boot(a, ia, w) - _boot(b, ib, w), alpha)
    return {"design": "paired" if paired else "welch", "seeds_a": len(va), "seeds_b": len(vb),
            "docs": len(a.doc_ids) if a.doc_ids else None, "diff": diff, "ci": ci,
            "ratio": math.exp(diff), "ratio_ci": [math.exp(x) for x in ci],
            "t": t if t is None or math.isfinite(t) else None, "p": p, "note": "; ".join(note)}


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm-adjusted p-values (None stays None): the i-th smallest of m becomes
    max over j <= i of min(1, (m - j + 1) p_(j))."""
    order = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[i]))  # type: ignore[operator]
        out[i] = running
    return out


def verdict(diff: float, p_holm: float | None, alpha: float) -> str:
    if p_holm is None:
        return "not tested"
    if p_holm < alpha:
        return "lower" if diff < 0 else "higher"
    return "no difference detected"


# ---------------------------------------------------------------------------------------------
# A whole analysis


def _train_len(group: list[EvalResult]) -> int | None:
    lens = [r.train_len for r in group if r.train_len is not None]
    return min(lens) if lens else None


def shares_weights(a: list[EvalResult], b: list[EvalResult]) -> bool:
    """Whether two labels are the same trained runs under different training-free scalings."""
    return a[0].model == b[0].model and a[0].scheme == b[0].scheme


@dataclass
class Outcome:
    labels: list[dict] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def analyse(by_protocol: dict[str, dict[str, list[EvalResult]]], analysis: Analysis) -> dict[str, Any]:
    """Every label's endpoint values with intervals, and every declared comparison with its test,
    interval and Holm-adjusted p-value. `by_protocol`: protocol -> label -> results."""
    rng = np.random.default_rng(analysis.seed)
    out = Outcome()
    for ep in analysis.endpoints:
        groups = by_protocol.get(ep.protocol, {})
        data: dict[str, Samples] = {}
        for name, group in groups.items():
            train = _train_len(group)
            got = samples(group, ep, train) if train else "no training length in the results"
            if isinstance(got, str):
                out.missing.append(f"{ep.name}: {name}: {got}")
                continue
            data[name] = got
            v = got.values()
            ci = label_interval(got, analysis.alpha, analysis.bootstrap, rng)
            out.labels.append({"endpoint": ep.name, "label": name, "seeds": len(v),
                               "docs": len(got.doc_ids) if got.doc_ids else None, "lengths": got.lengths,
                               "log_ppl": float(v.mean()), "log_ppl_ci": ci, "ppl": math.exp(v.mean()),
                               "ppl_ci": [math.exp(x) for x in ci]})
        pairs = analysis.comparisons if analysis.comparisons is not None else [
            (name, analysis.baseline) for name in groups if name != analysis.baseline]
        for a, b in pairs:
            if a not in data or b not in data:
                gone = [x for x in (a, b) if x not in data]
                out.missing.append(f"{ep.name}: {a} vs {b}: no data for {', '.join(gone)}")
                continue
            paired = shares_weights(groups[a], groups[b])
            out.comparisons.append({"endpoint": ep.name, "a": a, "b": b,
                                    **compare(data[a], data[b], paired, analysis.alpha, analysis.bootstrap, rng)})
    adjusted = holm([c["p"] for c in out.comparisons])
    for c, p in zip(out.comparisons, adjusted):
        c["p_holm"] = p
        c["verdict"] = verdict(c["diff"], p, analysis.alpha)
    return {"declared": analysis.to_dict(), "tests": sum(p is not None for p in adjusted),
            "labels": out.labels, "comparisons": out.comparisons, "missing": out.missing}
