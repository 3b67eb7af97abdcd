"""Statistics on declared endpoints: per-seed endpoint values from result rows, the test that fits
the design (Welch between trainings, paired by seed for scalings of the same weights) against
scipy on the same numbers, Holm's adjustment by its definition, bootstrap intervals over seeds
and documents against a plain loop, verdict wording, and the validation of declarations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from bifocal.core.errors import BifocalError
from bifocal.eval.results import EvalResult
from bifocal.eval.significance import (Endpoint, analyse, holm, label_interval, parse_analysis, samples,
                                       shares_weights)
from bifocal.eval.study import load_study

TRAIN = 16
LENGTHS = [16, 32, 64]
DOCS = ["d0", "d1", "d2", "d3"]


def result(model: str, scheme: str, seed: int, doc_losses: dict[int, list[float]], variant: str = "none",
           convention: str = "fixed", tokens: list[int] = (10, 20, 30, 40)) -> EvalResult:
    """A ppl result whose rows hold per-document summed losses (doc_losses[length] = mean loss per doc)."""
    rows = []
    for n, per_doc in doc_losses.items():
        loss = [m * t for m, t in zip(per_doc, tokens)]
        rows.append({"length": n, "tokens": sum(tokens), "loss": sum(loss) / sum(tokens),
                     "ppl": math.exp(sum(loss) / sum(tokens)), "doc_ids": DOCS, "doc_loss": loss,
                     "doc_tokens": list(tokens), "targets": "same"})
    return EvalResult(kind="ppl", model=model, scheme=scheme, rows=rows, variant=variant, convention=convention,
                      factor=4.0, train_len=TRAIN, extra={"train_seed": seed, "protocol": "windows"})


def curve(level: float, rise: float, seed: int) -> dict[int, list[float]]:
    """Mean loss per document and length: a seed-level offset (the spread between trainings), a
    rise with length, document difficulty and noise."""
    rng = np.random.default_rng(seed)
    offset = rng.normal(0, 0.2)
    return {n: list(level + offset + rise * k + rng.normal(0, 0.05, len(DOCS)) + np.linspace(-0.3, 0.3, len(DOCS)))
            for k, n in enumerate(LENGTHS)}


@pytest.fixture(scope="module")
def groups() -> dict[str, list[EvalResult]]:
    rope = [result("rope", "rope", s, curve(3.0, 0.4, s)) for s in (1, 2, 3, 4, 5)]
    # yarn on the same weights: 0.1 nats better per doubling beyond the training length, every seed
    noise = np.random.default_rng(0).normal(0, 0.02, (6, len(LENGTHS)))
    yarn = [result("rope", "rope", s, {n: [x - 0.1 * k + noise[s, k] for x in v]
                                       for k, (n, v) in enumerate(curve(3.0, 0.4, s).items())}, "yarn", "matched")
            for s in (1, 2, 3, 4, 5)]
    bifocal = [result("bifocal", "bifocal", s, curve(3.0, 0.1, 100 + s)) for s in (11, 12, 13, 14)]
    spectral = [result("spectral", "spectral", s, curve(3.0, 0.4, 200 + s)) for s in (21, 22, 23)]
    return {"rope": rope, "rope+yarn(matched)": yarn, "bifocal": bifocal, "spectral": spectral}


def per_seed_endpoint(group: list[EvalResult], lengths: list[int]) -> list[float]:
    """By hand: per seed, the mean over lengths of (summed loss / tokens)."""
    return [float(np.mean([sum(r["doc_loss"]) / sum(r["doc_tokens"]) for r in res.rows if r["length"] in lengths]))
            for res in group]


def test_endpoint_values_per_seed(groups):
    ep = Endpoint("ext", (2.0, 4.0))
    s = samples(groups["bifocal"], ep, TRAIN)
    assert s.seeds == [11, 12, 13, 14] and s.lengths == [32, 64] and s.doc_ids == DOCS
    assert s.values() == pytest.approx(per_seed_endpoint(groups["bifocal"], [32, 64]))
    assert samples(groups["bifocal"], Endpoint("x", (8.0,)), TRAIN).startswith("no seed evaluated")


def test_tests_fit_the_design_and_match_scipy(groups):
    analysis = parse_analysis({"endpoints": {"ext": [2, 4]},
                               "comparisons": [["bifocal", "rope"], ["rope+yarn(matched)", "rope"],
                                               ["spectral", "rope"]]}, "t")
    out = analyse({"windows": groups}, analysis)
    by = {(c["a"], c["b"]): c for c in out["comparisons"]}
    rope, bif, yarn, spec = (per_seed_endpoint(groups[k], [32, 64]) for k in ("rope", "bifocal", "rope+yarn(matched)",
                                                                             "spectral"))
    welch = by[("bifocal", "rope")]
    assert welch["design"] == "welch" and welch["seeds_a"] == 4 and welch["seeds_b"] == 5
    assert welch["p"] == pytest.approx(stats.ttest_ind(bif, rope, equal_var=False).pvalue, rel=1e-9)
    assert welch["ratio"] == pytest.approx(math.exp(np.mean(bif) - np.mean(rope)))
    paired = by[("rope+yarn(matched)", "rope")]
    assert paired["design"] == "paired" and shares_weights(groups["rope+yarn(matched)"], groups["rope"])
    assert paired["p"] == pytest.approx(stats.ttest_rel(yarn, rope).pvalue, rel=1e-9)
    # the paired test sees the consistent gain that Welch, blind to the pairing, loses in the seed spread
    assert paired["p"] < 1e-6 < stats.ttest_ind(yarn, rope, equal_var=False).pvalue
    assert out["tests"] == 3
    p = [c["p"] for c in out["comparisons"]]
    assert [c["p_holm"] for c in out["comparisons"]] == pytest.approx(holm(p))
    assert by[("bifocal", "rope")]["verdict"] == "lower" and paired["verdict"] == "lower"
    assert by[("spectral", "rope")]["verdict"] == "no difference detected"  # same distribution as rope
    assert all(c["ci"][0] <= c["diff"] <= c["ci"][1] for c in out["comparisons"])


def test_holm_by_its_definition():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> max so far 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, None, 0.9]) == [pytest.approx(1.0), None, pytest.approx(1.0)]
    assert holm([]) == []


def test_bootstrap_interval_equals_a_plain_loop(groups):
    s = samples(groups["rope"], Endpoint("ext", (2.0, 4.0)), TRAIN)
    got = label_interval(s, 0.05, 500, np.random.default_rng(7))
    rng = np.random.default_rng(7)  # the same draws, in the same order, computed one resample at a time
    seed_idx = rng.integers(0, len(s.seeds), size=(500, len(s.seeds)))
    weights = rng.multinomial(len(DOCS), np.full(len(DOCS), 1 / len(DOCS)), size=500)
    draws = []
    for b in range(500):
        per_seed = []
        for i in seed_idx[b]:
            per_len = [sum(w * x for w, x in zip(weights[b], s.loss[i, k])) /
                       sum(w * x for w, x in zip(weights[b], s.tokens[i, k])) for k in range(len(s.lengths))]
            per_seed.append(np.mean(per_len))
        draws.append(np.mean(per_seed))
    assert got == pytest.approx([np.quantile(draws, 0.025), np.quantile(draws, 0.975)], rel=1e-12)
    # documents matter: one seed alone still gets an interval from resampling its documents
    one = samples(groups["rope"][:1], Endpoint("ext", (2.0, 4.0)), TRAIN)
    lo, hi = label_interval(one, 0.05, 500, np.random.default_rng(0))
    assert lo < one.values()[0] < hi


def test_results_without_per_document_losses_use_seeds_only(groups):
    bare = [EvalResult(**{**r.to_dict(), "rows": [{k: v for k, v in row.items() if not k.startswith("doc_")}
                                                  for row in r.rows]}) for r in groups["bifocal"]]
    out = analyse({"windows": {"bifocal": bare, "rope": groups["rope"]}},
                  parse_analysis({"endpoints": {"ext": [2, 4]}}, "t"))
    assert out["labels"][0]["docs"] is None
    c = out["comparisons"][0]
    assert c["docs"] is None and "seeds only" in c["note"]
    assert c["p"] == pytest.approx(stats.ttest_ind(per_seed_endpoint(groups["bifocal"], [32, 64]),
                                                   per_seed_endpoint(groups["rope"], [32, 64]), equal_var=False).pvalue)


def test_one_seed_is_not_tested_and_missing_labels_are_listed(groups):
    declared = parse_analysis({"endpoints": {"ext": [2]}, "comparisons": [["bifocal", "rope"], ["pope", "rope"]]}, "t")
    out = analyse({"windows": {"rope": groups["rope"][:1], "bifocal": groups["bifocal"][:1]}}, declared)
    assert out["comparisons"][0]["verdict"] == "not tested" and out["tests"] == 0
    assert out["missing"] == ["ext: pope vs rope: no data for pope"]


@pytest.mark.parametrize("raw, match", [
    ({"endpoints": {}}, "endpoints"),
    ({"endpoints": {"e": [2]}, "alpah": 0.1}, "unknown key 'alpah'"),
    ({"endpoints": {"e": {"multiples": [0]}}}, "multiples"),
    ({"endpoints": {"e": {"multiples": [2], "protocol": "sliding"}}}, "protocol 'sliding'"),
    ({"endpoints": {"e": [2]}, "comparisons": [["rope"]]}, "comparisons"),
    ({"endpoints": {"e": [2]}, "alpha": 1.5}, "alpha"),
    ({"endpoints": {"e": [2]}, "bootstrap": 10}, "bootstrap"),
])
def test_bad_declarations_are_one_line_errors(raw, match):
    with pytest.raises(BifocalError, match=match) as exc:
        parse_analysis(raw, "study.yaml")
    assert str(exc.value).startswith("study.yaml: analysis:") and "\n" not in str(exc.value)


def test_study_checks_its_declaration_before_training(tmp_path):
    cpu = load_study("cpu")
    assert [e.name for e in cpu.analysis.endpoints] == ["extrapolation", "training_length"]
    assert cpu.seeds == [1234, 1235, 1236, 1237, 1238]  # 5 seeds in the CPU preset
    assert all(a in cpu.labels() and b in cpu.labels() for a, b in cpu.analysis.comparisons)
    # a subset of schemes still loads (the report lists what it could not compare) ...
    assert load_study("cpu", schemes="rope,pope").analysis is not None
    # ... a --label tags the declared comparisons like the rows
    assert ("bifocal[x]", "rope[x]") in load_study("cpu", label="x").analysis.comparisons
    # ... but a misspelt label, an endpoint outside the lengths or protocols, is refused
    for sets, match in ((["analysis.comparisons=[[bifocal, rope+yarn(x8)]]"], "rope\\+yarn\\(x8\\)"),
                        (["analysis.endpoints.extrapolation.multiples=[32]"], "not all in eval.length_multiples"),
                        (["eval.protocols=[windows]"], "not in eval.protocols"),
                        (["eval.dynamic_ntk_factor=1"], "dynamic_ntk_factor` was removed")):
        with pytest.raises(BifocalError, match=match):
            load_study("cpu", sets)
