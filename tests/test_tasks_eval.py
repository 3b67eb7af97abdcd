"""`bifocal eval tasks` scoring and loss on real generator output, and a smoke `study tasks`."""

from __future__ import annotations

import pytest
import torch

from bifocal.data_pipeline.synthetic import eval_settings, generate_examples
from bifocal.data_pipeline.tokenizer import load_tokenizer
from bifocal.eval import results, tasks_eval

from conftest import run_cli
from tiny_models import export, prepared_task_data, random_model

TASKS = ("dyck", "modular", "rotation")


def _wrong(task: str, answer: str) -> str:
    sym = answer.split()
    if task == "modular":
        return f" {(int(sym[0]) + 1) % 7}"
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
    _, _, path = modular
    result, out = tasks_eval.run(path, "modular", n=4, seed=1, out=tmp_path / "r.json")
    loaded = results.load(out)
    settings = eval_settings("modular")
    assert [(r["split"], r["setting"]) for r in loaded.rows] == [(s, label) for s, label, _ in settings]
    assert loaded.extra["task"] == "modular" and loaded.scheme == "bifocal"
    for r in loaded.rows:
        assert r["n"] == 4 and 0.0 <= r["exact_match"] <= 1.0 and r["loss"] > 0


def test_study_tasks_smoke_with_seeds(tmp_path):
    # Two training seeds of one scheme: the report must average them in one row, not list two runs.
    args = ["study", "tasks", "--task", "modular", "--schemes", "bifocal", "--seeds", "2", "--steps", "3",
            "--n", "4", "--out", str(tmp_path / "study"),
            "--set", "data.sources=[{name: modular, synthetic: {task: modular, n_documents: 150, seed: 0}}]",
            "--set", "train.eval_every=0", "--set", "train.eval_batches=1", "--set", "model.max_seq_len=64",
            "--set", "train.micro_batch=4", "--set", "train.seed=7"]
    run_cli(args, cwd=tmp_path)
    study = tmp_path / "study"
    report = (study / "report.md").read_text()
    assert "## Task: modular" in report and "| model | seeds |" in report
    task_table = report.split("## Learned frequencies")[0]
    rows = [line for line in task_table.splitlines() if line.startswith("| bifocal")]
    assert len(rows) == 1 and rows[0].startswith("| bifocal | 2 |") and "±" in rows[0]
    assert "k*2pi/7" in report  # the bifocal runs' frequencies against 2*pi/p
    assert (study / "tasks.png").stat().st_size > 0
    for seed in (7, 8):
        r = results.load(study / "results" / f"bifocal-s{seed}.json")
        assert (r.model, r.scheme, r.extra["train_seed"]) == ("bifocal", "bifocal", seed)
    again = run_cli(args, cwd=tmp_path)  # finished runs are not retrained
    assert again.stdout.count("skipped") == 2
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
