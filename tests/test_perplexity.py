"""`bifocal eval ppl`: perplexity against an explicit window loop, sliding windows, the scored-token
count, RoPE scaling variants, and the command line on a real trained tiny run."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bifocal.eval.perplexity import (PerplexityWarning, apply_scaling, evaluate_perplexity, main,
                                     plan_windows)
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


def loop_loss(model: GPT, docs: list[np.ndarray], length: int, stride: int) -> tuple[float, int]:
    """Independent reference: every full window, model(x, y) with context-only targets masked."""
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            for k, s in enumerate(range(0, len(doc) - length, stride)):
                x = torch.tensor(doc[s:s + length])[None]
                y = torch.tensor(doc[s + 1:s + length + 1])[None]
                n = length if k == 0 else stride
                logits, _ = model(x)
                total += F.cross_entropy(logits[0, -n:], y[0, -n:], reduction="sum").item()
                count += n
    return total / count, count


def test_ppl_is_exp_of_mean_token_loss(docs):
    model = make_model("rope")
    rows = evaluate_perplexity(model, docs, [8, 16, 32], progress=False)
    assert [r["length"] for r in rows] == [8, 16, 32]
    for r in rows:
        ref, n = loop_loss(model, docs, r["length"], r["length"])
        assert r["tokens"] == n
        assert r["loss"] == pytest.approx(ref, rel=1e-5)
        assert r["ppl"] == pytest.approx(math.exp(ref), rel=1e-5)
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
    # k = (n - 1 - L) // S + 1 windows per document of n tokens; L + (k - 1) * S scored tokens
    expected = sum(L + ((len(d) - 1 - L) // S) * S for d in docs if len(d) >= L + 1)
    assert row["tokens"] == expected == (32 + 14 * 8) + (32 + 8 * 8) + 32
    ref, n = loop_loss(model, docs, L, S)
    assert n == expected and row["loss"] == pytest.approx(ref, rel=1e-5)
    non_overlap = evaluate_perplexity(model, docs, [L], progress=False)[0]
    assert row["loss"] != pytest.approx(non_overlap["loss"], rel=1e-4)


def test_max_tokens_round_robin_and_max_docs(docs):
    plan = plan_windows([len(d) for d in docs], 16, None, max_tokens=70)
    assert [(w.doc, w.start, w.score) for w in plan] == [(0, 0, 16), (1, 0, 16), (2, 0, 16), (0, 16, 16), (1, 16, 6)]
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
    out = run_dir / "eval" / "ppl.json"
    result = load(out)
    assert result.kind == "ppl" and result.scheme == "bifocal" and result.variant == "none"
    assert result.train_len == 32 and [r["length"] for r in result.rows] == [32, 64]
    assert all(r["tokens"] == 300 and r["ppl"] == pytest.approx(math.exp(r["loss"])) for r in result.rows)
    assert "64*" in proc.stdout  # the table stars lengths beyond training
    assert str(out) in proc.stdout


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
                              device="cpu", out=str(tmp_path / "x.json"))
    with pytest.raises(BifocalError, match="no length"):
        main(args)


def test_default_batch_matches_batch_one_and_logs_progress_without_a_terminal(docs, capsys):
    from bifocal.eval.perplexity import default_batch_size

    assert default_batch_size(128) == 64 and default_batch_size(1024) == 16 and default_batch_size(10**6) == 1
    model = make_model("bifocal")
    one = evaluate_perplexity(model, docs, [8, 16], batch_size=1, progress=False)
    auto = evaluate_perplexity(model, docs, [8, 16])  # pytest's stderr is no terminal: plain lines
    for a, b in zip(one, auto):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ppl L=")]
    assert lines and lines[-1] == f"ppl L=16: {auto[1]['windows']}/{auto[1]['windows']} windows, batch 64"
