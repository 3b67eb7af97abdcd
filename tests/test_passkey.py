"""`bifocal eval passkey` on a briefly trained run: default lengths from the training length (the
in-distribution control), chance level in the result and the report, filler from the run's own
validation split, trials that read exactly their length, and dynamic NTK leaving the control alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from bifocal.data_pipeline.loader import PreparedData, iter_documents
from bifocal.eval import passkey, results
from bifocal.eval.loading import load_model
from bifocal.eval.passkey_data import CHANCE, NEEDLE, QUESTION

from conftest import run_cli
from tiny_models import export


def _data_dir(run_dir) -> str:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["prepared_dir"]


@pytest.fixture(scope="module")
def run_dir(tiny_config, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("passkey")
    run_cli(["train", "--config", str(tiny_config), "--set", "train.run_name=pk", "train.max_steps=2",
             "train.save_every=2", "train.eval_every=0"], cwd)
    return cwd / "runs" / "pk"


def test_cli_default_lengths_control_and_chance_in_result_and_report(run_dir, tmp_path):
    proc = run_cli(["eval", "passkey", str(run_dir), "--trials", "2", "--label", "bifocal-x"], cwd=tmp_path)
    result = results.load(run_dir / "eval" / "passkey.json")
    assert result.kind == "passkey" and result.scheme == "bifocal" and result.train_len == 32
    # A seeded study's runs share a label and are averaged over the training seed their config gives.
    assert result.model == "bifocal-x" and result.extra["train_seed"] == yaml.safe_load(
        (run_dir / "config.yaml").read_text())["train"]["seed"]
    assert [r["length"] for r in result.rows] == [32, 64, 128, 256, 512]  # 1-16x the training length
    assert [r["in_distribution"] for r in result.rows] == [True, False, False, False, False]
    assert all(r["chance"] == CHANCE == result.extra["chance"] and r["trials"] == 2 for r in result.rows)
    assert result.rows[0]["filler_tokens"] > 0 and result.extra["filler"].endswith("(val)")
    assert "64*" in proc.stdout and "chance" in proc.stdout and "in-distribution control" in proc.stdout
    run_cli(["eval", "report", str(run_dir / "eval" / "passkey.json"), "--out", str(tmp_path / "rep")], cwd=tmp_path)
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "## Passkey retrieval accuracy" in report and "Chance level" in report and f"{CHANCE:.2g}" in report


def test_filler_is_the_runs_validation_text(run_dir):
    model, tok = load_model(run_dir)
    hay, where = passkey.haystack_tokens(run_dir, None, tok)
    assert where == f"{_data_dir(run_dir)} (val)"
    val = np.concatenate(list(iter_documents(PreparedData(_data_dir(run_dir)), "val")))
    np.testing.assert_array_equal(hay, val[:len(hay)])
    trials = passkey.run_trials(model, tok, [64], trials=3, seed=0, haystack=hay)
    windows = np.lib.stride_tricks.sliding_window_view(val, trials[0].sample.n_filler)
    for t in trials:
        s = t.sample
        needle, question = tok.encode(NEEDLE.format(key=s.key)), tok.encode(QUESTION)
        part = s.ids[:s.offset] + s.ids[s.offset + len(needle):len(s.ids) - len(question)]
        assert (windows == np.asarray(part)).all(axis=1).any()


def test_a_trial_reads_exactly_its_length(run_dir):
    # Greedy decoding of the answer plus one token feeds prompt + answer tokens: at the training
    # length no position beyond it is read.
    model, tok = load_model(run_dir)
    hay, _ = passkey.haystack_tokens(run_dir, None, tok)
    fed: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: fed.append(args[0].shape[1]))
    try:
        for length in (32, 48):
            fed.clear()
            (trial,) = passkey.run_trials(model, tok, [length], trials=1, seed=5, haystack=hay)
            assert sum(fed) == length == trial.sample.n_tokens
    finally:
        handle.remove()


def test_trial_scoring_matches_generated_text(run_dir):
    model, tok = load_model(run_dir)
    hay, _ = passkey.haystack_tokens(run_dir, None, tok)
    trials = passkey.run_trials(model, tok, [64], trials=4, seed=0, haystack=hay)
    rows = passkey.rows_of(trials, 32)
    want = sum(t.generated.lstrip().startswith(t.sample.key) and not t.generated.lstrip()[5:6].isdigit()
               for t in trials) / 4
    assert rows[0]["accuracy"] == want and rows[0]["in_distribution"] is False
    offsets = [t.sample.offset for t in trials]
    assert offsets == sorted(set(offsets))  # one depth per quarter of [0, 1], in order
    again = passkey.run_trials(model, tok, [64], trials=4, seed=0, haystack=hay)
    assert [t.sample.ids for t in again] == [t.sample.ids for t in trials]


def test_an_export_needs_filler_data(run_dir, tmp_path):
    model, tok = load_model(run_dir)
    path = export(model, tok, tmp_path / "export")
    proc = run_cli(["eval", "passkey", str(path), "--trials", "1"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "pass --data" in proc.stderr and "Traceback" not in proc.stderr
    run_cli(["eval", "passkey", str(path), "--trials", "1", "--lengths", "32", "--data", _data_dir(run_dir)],
            cwd=tmp_path)
    assert results.load(path / "eval" / "passkey.json").rows[0]["length"] == 32


@torch.no_grad()
def test_dynamic_ntk_changes_nothing_at_the_training_length(run_dir):
    model, tok = load_model(run_dir)
    hay, _ = passkey.haystack_tokens(run_dir, None, tok)
    plain = passkey.run_trials(model, tok, [32], trials=3, seed=0, haystack=hay)
    ids = torch.tensor([plain[0].sample.ids])
    logits_plain, _ = model(ids)
    long_ids = torch.randint(0, tok.vocab_size, (1, 200), generator=torch.Generator().manual_seed(0))
    long_plain, _ = model(long_ids)
    passkey.apply_scaling(model, "dynamic_ntk", None, [512])
    scaled = passkey.run_trials(model, tok, [32], trials=3, seed=0, haystack=hay)
    assert [t.generated for t in scaled] == [t.generated for t in plain]
    torch.testing.assert_close(model(ids)[0], logits_plain, rtol=0, atol=0)
    # Beyond the training length it does act (so the comparison above can fail).
    assert not torch.allclose(model(long_ids)[0][:, 100:], long_plain[:, 100:])
