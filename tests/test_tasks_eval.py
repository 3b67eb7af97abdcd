"""`bifocal eval tasks` scoring and loss on real generator output, and a smoke `study tasks`."""

from __future__ import annotations

import json

import pytest
import torch

from bifocal.core.errors import BifocalError
from bifocal.data_pipeline.prepare import prepare
from bifocal.data_pipeline.synthetic import HELD_OUT_FRACTION, TASKS, eval_settings, generate_examples, side_of
from bifocal.data_pipeline.tokenizer import load_tokenizer
from bifocal.eval import results, tasks_eval
from bifocal.eval.study_tasks import task_config
from bifocal.run.config import load_config

from conftest import run_cli
from tiny_models import export, prepared_task_data, random_model



def _wrong(task: str, answer: str) -> str:
    sym = answer.split()
    if task in ("modular", "count"):
        return f" {(int(sym[0]) + 1) % 5}"  # both draw p = 5 here (count's default; modular's is 7)
    if task == "dyck":
        return " " + " ".join(sym + [")"])  # one closer too many
    return " " + " ".join(sym[1:] + sym[:1])  # rotated once more (may equal the answer: then skipped)


@pytest.mark.parametrize("task", TASKS)
def test_score_counts_correct_one_and_wrong_zero(task):
    for ex in generate_examples(task, 20, seed=3):
        assert tasks_eval.score(task, ex.prompt, ex.answer)
        # What greedy decoding returns: the answer, a newline, then the model keeps going.
        assert tasks_eval.score(task, ex.prompt, ex.answer + "\n" + ex.prompt)
        assert tasks_eval.score(task, ex.prompt, ex.answer + "<|endoftext|>mod", "<|endoftext|>")
        wrong = _wrong(task, ex.answer)
        if wrong.split() != ex.answer.split():
            assert not tasks_eval.score(task, ex.prompt, wrong + "\n")
        assert not tasks_eval.score(task, ex.prompt, "\n" + ex.answer)  # nothing before the newline
        if len(ex.answer.split()) > 1:  # symbols must stay space-separated
            assert not tasks_eval.score(task, ex.prompt, ex.answer.replace(" ", ""))


@pytest.fixture(scope="module")
def modular(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    data = prepared_task_data(root / "data", "modular")
    tok = load_tokenizer(data)
    model = random_model(tok.vocab_size, "bifocal")
    return model, tok, export(model, tok, root / "model")


def test_prompt_and_answer_tokens_concatenate_to_the_line(modular):
    _, tok, _ = modular
    for ex in generate_examples("modular", 30, seed=0):
        enc = tasks_eval.encode(tok, ex)
        assert enc.prompt[1:] + enc.answer == tok.encode(ex.prompt + ex.answer)
        assert enc.prompt[0] == tok.eod_id


@torch.no_grad()
def test_answer_loss_equals_the_models_own_masked_loss(modular):
    model, tok, _ = modular
    ex = generate_examples("modular", 1, seed=5, min_len=10, max_len=10)[0]
    enc = tasks_eval.encode(tok, ex)
    total, n = tasks_eval.answer_nll(model, enc)
    ids = torch.tensor([enc.prompt + enc.answer])
    labels = torch.full_like(ids, -100)
    labels[0, len(enc.prompt) - 1:-1] = ids[0, len(enc.prompt):]
    _, loss = model(ids, labels=labels)
    assert n == len(enc.answer)
    assert total / n == pytest.approx(float(loss), rel=1e-5)


def test_eval_tasks_writes_a_row_per_setting(modular, tmp_path):
    _, tok, path = modular
    result, out = tasks_eval.run(path, "modular", n=4, seed=1, out=tmp_path / "r.json")
    loaded = results.load(out)
    settings = eval_settings("modular") + [tasks_eval.beyond_setting("modular", {}, tok, 64)]
    assert [(r["split"], r["setting"]) for r in loaded.rows] == [(s, label) for s, label, _ in settings]
    assert [r["split"] for r in loaded.rows] == ["train", "in", "out", "out", "out"]
    assert loaded.extra["task"] == "modular" and loaded.scheme == "bifocal"
    assert loaded.extra["held_out_fraction"] == HELD_OUT_FRACTION and loaded.extra["training_data"] is None
    for r in loaded.rows:
        assert r["n"] == 4 and 0.0 <= r["exact_match"] <= 1.0 and r["loss"] > 0 and 1 <= r["distinct"] <= 4
        assert r["train_overlap"] is None  # an export has no run config: nothing to check against
    beyond = loaded.rows[-1]
    assert beyond["setting"].endswith("> 64 tokens") and beyond["min_tokens"] > 64 == loaded.train_len


@pytest.mark.parametrize("task", TASKS)
def test_prepared_preset_documents_hold_no_evaluation_prompt(task, tmp_path):
    # The task preset's own training distribution, prepared by the real pipeline (fewer documents):
    # no held-out evaluation prompt, the beyond-the-training-length setting included, occurs in the
    # decoded training documents, while the old draw of the training distribution mostly did.
    cfg = load_config(task_config(task))
    syn = cfg.data.sources[0].synthetic
    syn["n_documents"] = 1000
    data = prepare(cfg.data, tmp_path / "data", workers=1)
    tok = load_tokenizer(data)
    seen = tasks_eval.prepared_prompts(data, tok)
    params = tasks_eval.training_params_of(syn)
    settings = eval_settings(task, params) + [tasks_eval.beyond_setting(task, params, tok, cfg.model.max_seq_len)]
    for split, setting, p in settings:
        drawn = generate_examples(task, 100, seed=1, side=side_of(split), **p)
        overlap = sum(ex.prompt in seen for ex in drawn)
        if split == "train":
            assert overlap > 0, setting  # the count finds what the documents hold
        else:
            assert overlap == 0, (split, setting)
            assert len({ex.prompt for ex in drawn}) >= 20  # held-out instances exist, and enough differ
    old = generate_examples(task, 100, seed=1, **params)  # what evaluation drew before
    assert sum(ex.prompt in seen for ex in old) > (50 if task not in ("rotation", "count") else 0)


def test_a_held_out_prompt_in_the_training_data_is_an_error(modular):
    model, tok, _ = modular
    leaked = {ex.prompt for ex in generate_examples("modular", 3, 1, side="test")}  # the `in` setting's first draws
    with pytest.raises(BifocalError, match="3 of 3 held-out prompts of modular in: len 4-16 occur in the training "
                                           "data:"):
        tasks_eval.evaluate_task(model, tok, "modular", 3, 1, {}, leaked)
    rows = tasks_eval.evaluate_task(model, tok, "modular", 3, 1, {}, set())
    assert [r["train_overlap"] for r in rows] == [0] * 5


def test_study_tasks_smoke_with_seeds(tmp_path):
    # Two training seeds of one scheme: the report must average them in one row, not list two runs.
    args = ["study", "tasks", "--task", "modular", "--schemes", "bifocal", "--seeds", "2", "--steps", "3",
            "--n", "4", "--out", str(tmp_path / "study"),
            "--set", "data.sources=[{name: modular, synthetic: {task: modular, n_documents: 150, seed: 0, p: 4, "
            "min_len: 1, max_len: 3}}]",
            "--set", "train.eval_every=0", "--set", "train.eval_batches=1", "--set", "model.max_seq_len=64",
            "--set", "train.micro_batch=4", "--set", "train.seed=7"]
    run_cli(args, cwd=tmp_path)
    study = tmp_path / "study"
    report = (study / "report.md").read_text()
    assert "## Task: modular" in report and "| model | seeds |" in report
    task_table = report.split("## Learned frequencies")[0]
    rows = [line for line in task_table.splitlines() if line.startswith("| bifocal")]
    assert len(rows) == 1 and rows[0].startswith("| bifocal | 2 |") and "±" in rows[0]
    assert "k*2pi/4" in report  # the bifocal runs' frequencies against 2*pi/p
    assert "| 4 (the task) | 3 |" in report and "| 7 | 6 |" in report  # and against moduli never used
    # Held-out prompts are checked against the run's prepared documents: none found, while the
    # training-side control (84 instances, 1,200 training lines) finds its prompts there.
    assert "Held-out prompts found in the training data: 0 of 32 (8 of 8 cells checked)" in report
    assert (study / "tasks.png").stat().st_size > 0
    for seed in (7, 8):
        r = results.load(study / "results" / f"bifocal-s{seed}.json")
        assert (r.model, r.scheme, r.extra["train_seed"]) == ("bifocal", "bifocal", seed)
        assert r.extra["training_prompts"] > 0 and r.extra["training_data"] == str((study / "data").resolve())
        assert [row["train_overlap"] for row in r.rows][1:] == [0, 0, 0, 0] and r.rows[0]["train_overlap"] == 4
        assert r.rows[-1]["min_tokens"] > r.train_len == 64
    # A result from before held-out test instances is evaluated again; finished runs are not retrained.
    old = study / "results" / "bifocal-s7.json"
    data = json.loads(old.read_text())
    del data["extra"]["held_out_fraction"], data["extra"]["settings"]
    old.write_text(json.dumps(data))
    again = run_cli(args, cwd=tmp_path)
    assert again.stderr.count("finished run found") == 2 and again.stderr.count("evaluating") == 1
    assert again.stderr.count("result is current") == 1
    assert "held_out_fraction" in results.load(old).extra
    # A single-seed study records its training seed too, so separate studies combine in one report.
    single = [a for a in args if a not in ("--seeds", "2")][:-1] + ["train.seed=9"]
    run_cli(single, cwd=tmp_path)
    assert results.load(study / "results" / "bifocal.json").extra["train_seed"] == 9


def test_training_params_are_read_from_the_runs_config(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "data:\n  sources:\n    - name: m\n      synthetic: {task: modular, n_documents: 10, seed: 0, p: 5, max_len: 6}\n")
    assert tasks_eval.training_params(tmp_path, "modular") == {"p": 5, "max_len": 6}
    assert tasks_eval.training_params(tmp_path, "dyck") == {}
    assert tasks_eval.training_params(tmp_path / "missing", "modular") == {}
