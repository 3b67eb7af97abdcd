"""`bifocal eval passkey`: the command end to end on a tiny model, the scoring path on real
prompts, and dynamic NTK leaving short contexts untouched."""

from __future__ import annotations

import random

import pytest
import torch

from bifocal.eval import passkey, results
from bifocal.eval.loading import load_model
from bifocal.eval.passkey_data import FILLER, INTRO, KEY_LINE, QUESTION, make_passkey_prompt

from conftest import run_cli
from tiny_models import export, random_model, text_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("passkey")
    rng = random.Random(0)
    texts = [" ".join([INTRO, FILLER * 3, KEY_LINE.format(key=rng.randint(10000, 99999)), QUESTION])
             for _ in range(200)]
    tok = text_tokenizer(texts, root / "tok", vocab_size=320)
    # bifocal: geometric heads feel the RoPE scaling, spectral heads do not.
    return export(random_model(tok.vocab_size, "bifocal", max_seq_len=256), tok, root / "model")


def test_cli_writes_a_row_per_length(model_dir, tmp_path):
    proc = run_cli(["eval", "passkey", str(model_dir), "--lengths", "160,384", "--trials", "3"], cwd=tmp_path)
    result = results.load(model_dir / "eval" / "passkey.json")
    assert result.kind == "passkey" and result.scheme == "bifocal" and result.train_len == 256
    assert [(r["length"], r["trials"]) for r in result.rows] == [(160, 3), (384, 3)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in result.rows)
    assert "384*" in proc.stdout  # beyond the training length, marked


def test_score_on_real_prompts(model_dir):
    _, tok = load_model(model_dir)
    rng = random.Random(1)
    for _ in range(5):
        s = make_passkey_prompt(200, tok.encode, rng)
        assert passkey.score(s, f" {s.key}. Remember")
        assert passkey.score(s, f"{s.key}")
        assert not passkey.score(s, f" {s.key}1")          # a longer number is not the key
        assert not passkey.score(s, f" {int(s.key) + 1}")
        assert not passkey.score(s, " The pass key is")
        assert not passkey.score(s, "")


def test_trial_scoring_matches_generated_text(model_dir):
    model, tok = load_model(model_dir)
    trials = passkey.run_trials(model, tok, [150], trials=4, seed=0)
    rows = passkey.rows_of(trials)
    want = sum(t.generated.lstrip().startswith(t.sample.key) and not t.generated.lstrip()[5:6].isdigit()
               for t in trials) / 4
    assert rows[0]["accuracy"] == want
    depths = [t.sample.depth for t in trials]
    assert len(set(depths)) == 4 and all(0 <= d <= 1 for d in depths)  # seeded, uniform per trial
    again = passkey.run_trials(model, tok, [150], trials=4, seed=0)
    assert [t.sample.key for t in again] == [t.sample.key for t in trials]


@torch.no_grad()
def test_dynamic_ntk_changes_nothing_within_the_training_length(model_dir):
    model, tok = load_model(model_dir)
    short = 200  # prompt + 8 new tokens stay within the 256 training tokens
    plain = passkey.run_trials(model, tok, [short], trials=3, seed=0)
    ids = torch.tensor([tok.encode(plain[0].sample.prompt)])
    logits_plain, _ = model(ids)
    long_ids = torch.randint(0, tok.vocab_size, (1, 400), generator=torch.Generator().manual_seed(0))
    long_plain, _ = model(long_ids)
    passkey.apply_scaling(model, "dynamic_ntk", None, [1024])
    scaled = passkey.run_trials(model, tok, [short], trials=3, seed=0)
    assert [t.generated for t in scaled] == [t.generated for t in plain]
    torch.testing.assert_close(model(ids)[0], logits_plain, rtol=0, atol=0)
    # Beyond the training length it does act (so the comparison above can fail).
    assert not torch.allclose(model(long_ids)[0][:, 300:], long_plain[:, 300:])
