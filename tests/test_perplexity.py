"""`bifocal eval ppl`: perplexity against an explicit per-target reference, the window plan (every
target once, with the stated context), sliding windows, the same targets at every length, per-document
and per-position losses, RoPE scaling in both conventions, and the command line on a real trained
tiny run."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bifocal.eval.perplexity import (MATCHED, PerplexityWarning, apply_scaling, evaluate_perplexity, evaluate_scaled,
                                     main, plan_windows)
from bifocal.eval.protocol import context_tokens, parse_protocol, protocol_name
from bifocal.eval.results import load
from bifocal.launcher import cli
from bifocal.core.errors import BifocalError
from bifocal.model import GPT
from bifocal.model.config import GPTConfig

from conftest import run_cli

TRAIN_LEN = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: intra-op threads only add synchronisation, which on a shared, loaded
    machine costs far more than the work itself."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(scheme: str, seed: int = 0) -> GPT:
    """Random weights with a large init so attention (and so position) matters to the loss."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=64, n_layer=2, n_head=4, d_model=32, max_seq_len=TRAIN_LEN, init_std=0.2,
                    position={"scheme": scheme, "spectral_heads": 2 if scheme == "bifocal" else None})
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def docs() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 64, n) for n in (150, 97, 40, 12)]


def context_start(t: int, n: int, length: int, stride: int, min_context: int, first: int) -> int:
    """Closed form of the window that scores target t of a document of n tokens (the planner builds
    windows one by one): the first window s0 = max(0, P - C) + j * stride whose last target
    s + L reaches t, moved back to end at the document's last token if it would run past it."""
    s0 = max(0, first - min_context)
    j = max(0, -(-(t - length - s0) // stride))
    return min(s0 + j * stride, n - 1 - length)


def reference(model: GPT, docs, length: int, stride: int | None = None, min_context: int = 1,
              first: int | None = None, per_doc: int | None = None) -> dict:
    """Independent reference: each target's loss from its own forward pass over exactly its context
    (tokens s .. t-1), summed per document and per position; also the context lengths used."""
    stride = stride or length - min_context + 1
    first = max(first or min_context, min_context)
    doc_loss, doc_tokens, pos_loss, pos_tokens, contexts = {}, {}, np.zeros(length), np.zeros(length), set()
    with torch.no_grad():
        for d, doc in enumerate(docs):
            n = len(doc)
            last = n - 1 if per_doc is None else min(n - 1, first + per_doc - 1)
            if n < length + 1:
                continue
            for t in range(first, last + 1):
                s = context_start(t, n, length, stride, min_context, first)
                logits, _ = model(torch.tensor(doc[s:t])[None])
                nll = F.cross_entropy(logits[0, -1:], torch.tensor(doc[t:t + 1])).item()
                doc_loss[d] = doc_loss.get(d, 0.0) + nll
                doc_tokens[d] = doc_tokens.get(d, 0) + 1
                pos_loss[t - s - 1] += nll
                pos_tokens[t - s - 1] += 1
                contexts.add(t - s)
    tokens = sum(doc_tokens.values())
    return {"loss": sum(doc_loss.values()) / tokens, "tokens": tokens, "doc_loss": doc_loss, "doc_tokens": doc_tokens,
            "pos_loss": pos_loss, "pos_tokens": pos_tokens, "contexts": contexts}


def check_row(row: dict, ref: dict) -> None:
    assert row["tokens"] == ref["tokens"] == sum(row["doc_tokens"])
    assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert row["ppl"] == pytest.approx(math.exp(ref["loss"]), rel=1e-5)
    assert row["doc_tokens"] == [ref["doc_tokens"][d] for d in sorted(ref["doc_tokens"])]
    assert row["doc_loss"] == pytest.approx([ref["doc_loss"][d] for d in sorted(ref["doc_loss"])], rel=1e-5)
    pos = row["by_position"]
    for a, b, loss, n in zip(pos["start"], pos["end"], pos["loss"], pos["tokens"]):
        assert n == ref["pos_tokens"][a:b].sum() > 0
        assert loss == pytest.approx(ref["pos_loss"][a:b].sum() / n, rel=1e-5)
    assert sum(pos["tokens"]) == row["tokens"]


def test_ppl_is_exp_of_mean_token_loss(docs):
    model = make_model("rope")
    rows = evaluate_perplexity(model, docs, [8, 16, 32], progress=False)
    assert [r["length"] for r in rows] == [8, 16, 32]
    for r in rows:
        ref = reference(model, docs, r["length"])
        check_row(r, ref)
        # non-overlapping: every context 1 .. L occurs, nothing longer
        assert ref["contexts"] == set(range(1, r["length"] + 1))
        assert r["min_context"] == 1 and r["stride"] == r["length"] and r["first_target"] == 1
    # every target from token 1 to the end of each long-enough document, the tail included
    assert rows[0]["tokens"] == sum(len(d) - 1 for d in docs if len(d) >= 9)
    # model(x, y)'s own mean loss over one window agrees as well
    x, y = torch.tensor(docs[0][:16])[None], torch.tensor(docs[0][1:17])[None]
    with torch.no_grad():
        _, loss = model(x, y)
    one = evaluate_perplexity(model, [docs[0][:17]], [16], progress=False)[0]
    assert one["tokens"] == 16 and one["loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_stride_equal_to_window_is_non_overlapping(docs):
    model = make_model("rope")
    a = evaluate_perplexity(model, docs, [16, 32], progress=False)
    b = evaluate_perplexity(model, docs, [16, 32], stride=10_000, progress=False)  # capped at L
    c = evaluate_perplexity(model, docs, [16], stride=16, batch_size=3, progress=False)
    assert a == b
    assert c[0]["tokens"] == a[0]["tokens"] and c[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-6)


def test_sliding_window_scores_each_token_once_with_long_context(docs):
    model = make_model("rope")
    L, S = 32, 8
    row = evaluate_perplexity(model, docs, [L], stride=S, batch_size=4, progress=False)[0]
    ref = reference(model, docs, L, S)
    check_row(row, ref)
    assert row["tokens"] == (150 - 1) + (97 - 1) + (40 - 1)  # every target of each document with a window
    assert min(ref["contexts"]) == 1  # the PI/YaRN sliding window: its first window starts from nothing
    non_overlap = evaluate_perplexity(model, docs, [L], progress=False)[0]
    assert row["loss"] != pytest.approx(non_overlap["loss"], rel=1e-4)


@pytest.mark.parametrize("length, min_context, stride", [(32, 24, None), (32, 24, 5), (16, 16, None), (8, 1, 3)])
def test_min_context_gives_every_target_that_much_context(docs, length, min_context, stride):
    model = make_model("bifocal")
    row = evaluate_perplexity(model, docs, [length], stride=stride, min_context=min_context, batch_size=3,
                              progress=False)[0]
    ref = reference(model, docs, length, stride, min_context)
    check_row(row, ref)
    assert min(ref["contexts"]) == min_context and max(ref["contexts"]) <= length
    assert min(row["by_position"]["end"]) >= min_context  # no bin holds a position below C - 1
    assert row["min_context"] == min_context and row["first_target"] == min_context
    assert row["stride"] == (stride or length - min_context + 1)


def test_plan_scores_every_target_once_within_the_stated_context():
    """Property check of the planner against the closed form, over many random shapes."""
    rng = np.random.default_rng(1)
    for _ in range(2000):
        L = int(rng.integers(1, 40))
        C = int(rng.integers(1, L + 1))
        S = int(rng.integers(1, L - C + 2))
        P = int(rng.integers(1, 60))
        N = None if rng.random() < 0.5 else int(rng.integers(1, 80))
        lengths = [int(x) for x in rng.integers(1, 150, size=rng.integers(1, 4))]
        seen = {}
        for w in plan_windows(lengths, L, S, None, C, P, N):
            assert 0 <= w.lo < w.hi <= L and 0 <= w.start <= lengths[w.doc] - 1 - L
            for j in range(w.lo, w.hi):
                t = w.start + j + 1
                assert (w.doc, t) not in seen and C <= j + 1 <= L
                assert w.start == context_start(t, lengths[w.doc], L, S, C, max(P, C))
                seen[(w.doc, t)] = True
        first = max(P, C)
        expected = {(d, t) for d, n in enumerate(lengths) if n >= L + 1
                    for t in range(first, (n - 1 if N is None else min(n - 1, first + N - 1)) + 1)}
        assert set(seen) == expected


def test_the_same_targets_at_every_length_and_a_digest_that_says_so(docs):
    model = make_model("rope")
    long_docs = [d for d in docs if len(d) >= 97]  # a full window at 64 in every document
    rows = evaluate_perplexity(model, long_docs, [8, 16, 32, 64], min_context="0.75L", progress=False)
    assert {r["first_target"] for r in rows} == {48}  # 3/4 of the longest length, for every length
    assert len({r["targets"] for r in rows}) == 1 and len({r["tokens"] for r in rows}) == 1
    assert [r["min_context"] for r in rows] == [6, 12, 24, 48]
    assert rows[0]["doc_ids"] == rows[-1]["doc_ids"] and len(set(rows[0]["doc_ids"])) == 2
    # a document too short for the longest length changes the targets there; the digest shows it
    mixed = evaluate_perplexity(model, docs, [8, 64], progress=False)
    assert mixed[0]["targets"] != mixed[1]["targets"] and mixed[0]["docs"] == 4 and mixed[1]["docs"] == 2
    # the same documents in another order: the same digest
    again = evaluate_perplexity(model, long_docs[::-1], [8], min_context="0.75L", first_target=48, progress=False)
    assert again[0]["targets"] == rows[0]["targets"]
    # targets_per_doc caps each document at the same tokens for every length
    capped = evaluate_perplexity(model, long_docs, [16, 64], targets_per_doc=20, progress=False)
    assert [r["tokens"] for r in capped] == [40, 40] and capped[0]["targets"] == capped[1]["targets"]


def test_protocol_names_round_trip():
    assert protocol_name() == "windows" and parse_protocol("windows") == (None, None)
    assert protocol_name("0.75L") == "context>=0.75L" and parse_protocol("context>=0.75L") == ("0.75L", None)
    assert protocol_name(24, 8) == "context>=24,stride=8" and parse_protocol("context>=24,stride=8") == (24, 8)
    assert protocol_name(None, 16) == "stride=16" and parse_protocol("stride=16") == (None, 16)
    assert [context_tokens("0.75L", n) for n in (8, 32, 33, 512)] == [6, 24, 25, 384]
    assert context_tokens("1L", 32) == 32 and context_tokens(5, 32) == 5 and context_tokens(None, 9) == 1
    for bad in ("0.75", "1.5L", "xL", "context>=0", "stride=-1", "window"):
        with pytest.raises(ValueError):
            parse_protocol(bad) if not bad.endswith(("L", "5")) else context_tokens(bad, 8)


def test_max_tokens_round_robin_and_max_docs(docs):
    plan = plan_windows([len(d) for d in docs], 16, None, max_tokens=70)
    # a capped window keeps its last targets (the longest context): positions 10 .. 15
    assert [(w.doc, w.start, w.lo, w.hi) for w in plan] == [(0, 0, 0, 16), (1, 0, 0, 16), (2, 0, 0, 16),
                                                            (0, 16, 0, 16), (1, 16, 10, 16)]
    model = make_model("rope")
    row = evaluate_perplexity(model, docs, [16], max_tokens=70, max_docs=2, progress=False)[0]
    assert row["tokens"] == 70 and row["docs"] == 2


def test_length_without_documents_is_skipped(docs):
    model = make_model("rope")
    with pytest.warns(PerplexityWarning, match="length 1000"):
        rows = evaluate_perplexity(model, docs, [16, 1000], progress=False)
    assert [r["length"] for r in rows] == [16]


def _losses(model: GPT, docs, variant: str | None, lengths=(8, 16, 32, 64)) -> list[float]:
    apply_scaling(model, variant, 4.0, list(lengths))
    return [r["loss"] for r in evaluate_perplexity(model, docs, list(lengths), progress=False)]


def test_matched_factor_is_the_fixed_factor_of_each_length(docs):
    """s = L / L_train per length equals evaluating each length alone at that fixed factor; at or
    below the training length it is plain RoPE; dynamic NTK at factor 1 is NTK matched to L."""
    lengths = [8, 16, 32, 64]
    for variant in ("pi", "ntk", "yarn"):
        model = make_model("rope")
        matched = evaluate_scaled(model, docs, lengths, variant, MATCHED, progress=False)
        assert [r["factor"] for r in matched] == [1.0, 1.0, 2.0, 4.0]
        for row in matched:
            alone = evaluate_scaled(model, docs, [row["length"]], variant, row["factor"], progress=False)[0]
            assert row["loss"] == pytest.approx(alone["loss"], rel=1e-6) and row["targets"] == alone["targets"]
        plain = evaluate_scaled(model, docs, lengths[:2], None, None, progress=False)
        assert [r["loss"] for r in matched[:2]] == pytest.approx([r["loss"] for r in plain], rel=1e-6)
        fixed = evaluate_scaled(model, docs, lengths, variant, 4.0, progress=False)
        assert matched[0]["loss"] != pytest.approx(fixed[0]["loss"], rel=1e-6)  # s = 4 at 8 tokens is not s = 1
        assert matched[3]["loss"] == pytest.approx(fixed[3]["loss"], rel=1e-6)  # both s = 4 at 64
    model = make_model("rope")
    dyn = evaluate_scaled(model, docs, lengths, "dynamic_ntk", MATCHED, progress=False)
    ntk = evaluate_scaled(model, docs, lengths, "ntk", MATCHED, progress=False)
    assert [r["factor"] for r in dyn] == [1.0] * 4
    assert [r["loss"] for r in dyn] == pytest.approx([r["loss"] for r in ntk], rel=1e-6)


def test_scaling_variants_change_results_where_the_formula_says(docs):
    rope = make_model("rope")
    base = _losses(rope, docs, None)
    dyn = _losses(rope, docs, "dynamic_ntk")
    assert dyn[:2] == base[:2]  # lengths 8, 16 <= training length: the plain RoPE table
    assert all(d != pytest.approx(b, rel=1e-6) for d, b in zip(dyn[2:], base[2:]))
    for variant in ("pi", "ntk", "yarn"):
        got = _losses(rope, docs, variant)
        assert all(g != pytest.approx(b, rel=1e-6) for g, b in zip(got, base)), variant
    bifocal = make_model("bifocal")  # geometric heads scale, spectral heads do not
    assert _losses(bifocal, docs, "yarn") != pytest.approx(_losses(bifocal, docs, None), rel=1e-6)
    spectral = make_model("spectral")
    plain = _losses(spectral, docs, None)
    for variant in ("pi", "ntk", "dynamic_ntk", "yarn"):
        assert _losses(spectral, docs, variant) == plain, variant


# ---------------------------------------------------------------------------------------------
# Command line on a real (briefly) trained run


@pytest.fixture(scope="module")
def run_dir(tiny_config, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ppl")
    run_cli(["train", "--config", str(tiny_config), "--set", "train.run_name=ppl", "--set", "train.max_steps=4",
             "--set", "train.save_every=4", "--set", "train.eval_every=4"], cwd)
    return cwd / "runs" / "ppl"


def test_cli_writes_a_readable_result(run_dir, tmp_path):
    proc = run_cli(["eval", "ppl", str(run_dir), "--lengths", "32,64,1000000", "--stride", "16",
                    "--max-tokens", "300"], tmp_path)  # data: the run's own prepared validation split
    assert "warning: length 1000000" in proc.stderr
    out = run_dir / "eval" / "ppl-stride16.json"
    result = load(out)
    assert result.kind == "ppl" and result.scheme == "bifocal" and result.variant == "none"
    assert result.protocol == "stride=16" and result.convention == "fixed"
    assert result.train_len == 32 and [r["length"] for r in result.rows] == [32, 64]
    assert all(r["tokens"] == 300 and r["ppl"] == pytest.approx(math.exp(r["loss"])) for r in result.rows)
    assert "64*" in proc.stdout  # the table stars lengths beyond training
    assert str(out) in proc.stdout


def test_cli_min_context_same_targets_and_per_document_losses(run_dir, tmp_path):
    proc = run_cli(["eval", "ppl", str(run_dir), "--lengths", "16,32,64", "--min-context", "0.75L",
                    "--targets-per-doc", "40", "--out", "ctx.json"], tmp_path)
    result = load(tmp_path / "ctx.json")
    assert result.protocol == "context>=0.75L" and result.extra["same_targets"] is True
    assert "the same targets at every length" in proc.stdout and "48-64" in proc.stdout  # the context column
    assert [r["min_context"] for r in result.rows] == [12, 24, 48] and {r["first_target"] for r in result.rows} == {48}
    assert len({r["targets"] for r in result.rows}) == 1
    for r in result.rows:
        assert sum(r["doc_tokens"]) == r["tokens"] == 40 * r["docs"] and len(r["doc_ids"]) == r["docs"]
        assert sum(r["doc_loss"]) / r["tokens"] == pytest.approx(r["loss"])
        assert min(r["by_position"]["end"]) >= r["min_context"]


def test_cli_matched_factor(run_dir, tmp_path):
    out = tmp_path / "matched.json"
    assert cli.main(["eval", "ppl", str(run_dir), "--lengths", "16,32,64,128", "--rope-scaling", "yarn",
                     "--factor", "matched", "--out", str(out)]) == 0
    result = load(out)
    assert result.convention == "matched" and result.factor == 4.0
    assert [r["factor"] for r in result.rows] == [1.0, 1.0, 2.0, 4.0]


def test_cli_scaling_and_raw_text(run_dir, tmp_path, capsys):
    text = tmp_path / "doc.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune "
                    "must be in want of a wife. " * 40)
    out = tmp_path / "yarn.json"
    assert cli.main(["eval", "ppl", str(run_dir), "--data", str(text), "--lengths", "32,64",
                     "--rope-scaling", "yarn", "--out", str(out)]) == 0
    result = load(out)
    assert result.variant == "yarn" and result.factor == 2.0  # default: 64 / 32
    plain = tmp_path / "plain.json"
    assert cli.main(["eval", "ppl", str(run_dir), "--data", str(text), "--lengths", "32,64",
                     "--out", str(plain)]) == 0
    assert [r["loss"] for r in load(plain).rows] != [r["loss"] for r in result.rows]


def test_cli_errors_are_one_line(run_dir, tmp_path, capsys):
    assert cli.main(["eval", "ppl", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bifocal: error:") and "missing" in err and len(err.splitlines()) == 1
    args = argparse.Namespace(model=str(run_dir), data=None, lengths="100000,200000", stride=None,
                              rope_scaling=None, factor=None, max_docs=None, max_tokens=None, batch_size=1,
                              device="cpu", out=str(tmp_path / "x.json"), min_context=None, first_target=None,
                              targets_per_doc=None)
    with pytest.raises(BifocalError, match="no length"):
        main(args)
    capsys.readouterr()
    for flags, what in ((["--min-context", "three quarters"], "--min-context"), (["--min-context", "1.5L"], "1.5L"),
                        (["--rope-scaling", "yarn", "--factor", "big"], "--factor 'big'"),
                        (["--rope-scaling", "yarn", "--factor", "0.5"], "must be >= 1"),
                        (["--factor", "matched"], "--factor needs --rope-scaling")):
        args = ["eval", "ppl", str(run_dir), "--lengths", "32", "--out", str(tmp_path / "y.json"), *flags]
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert what in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "y.json").exists()


def test_default_batch_matches_batch_one_and_logs_progress_without_a_terminal(docs, capsys):
    from bifocal.eval.perplexity import default_batch_size

    assert default_batch_size(128) == 64 and default_batch_size(1024) == 16 and default_batch_size(10**6) == 1
    model = make_model("bifocal")
    one = evaluate_perplexity(model, docs, [8, 16], batch_size=1, progress=False)
    auto = evaluate_perplexity(model, docs, [8, 16])  # pytest's stderr is no terminal: plain lines
    for a, b in zip(one, auto):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("bifocal: ppl L=")]
    assert lines and lines[-1] == f"bifocal: ppl L=16: {auto[1]['windows']}/{auto[1]['windows']} windows, batch 64"
