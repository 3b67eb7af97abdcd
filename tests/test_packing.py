"""Packed documents in training windows: data.positions (continue | reset) and data.attention
(causal | document). The sampler marks each token's document from the shards' own document index,
a packed window computes for every document what it computes alone, and a run trains, checkpoints
and resumes exactly in every mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from bifocal.data_pipeline.loader import PreparedData, WindowSampler, reset_positions, window_documents
from bifocal.model import GPT, GPTConfig
from bifocal.model.schemes import SCHEMES as REGISTRY

from conftest import run_cli

SCHEMES = tuple(REGISTRY)  # every registered scheme


def prepared(tiny_config) -> PreparedData:
    return PreparedData(yaml.safe_load(tiny_config.read_text())["data"]["prepared_dir"])


def test_documents_follow_the_end_of_document_tokens(tiny_config):
    data = prepared(tiny_config)
    sampler = WindowSampler(data, "train", 48, micro_batch=16, seed=3, positions="reset", attention="document")
    seen_boundary = False
    for _ in range(4):
        batch = sampler.sample()
        x, docs, pos = batch.inputs.numpy(), batch.documents.numpy(), batch.positions.numpy()
        for row, d, p in zip(x, docs, pos):
            # A new document starts right after each end-of-document token, and nowhere else.
            after_eod = np.concatenate([[False], row[:-1] == data.eod_id])
            assert (np.diff(d, prepend=d[0]) == after_eod).all()
            assert (p[after_eod] == 0).all() and p[0] == 0 and (np.diff(p)[~after_eod[1:]] == 1).all()
            seen_boundary |= bool(after_eod.any())
    assert seen_boundary  # the check above was not vacuous
    plain = WindowSampler(data, "train", 48, micro_batch=16, seed=3).sample()
    assert plain.positions is None and plain.documents is None
    assert torch.equal(plain.inputs, WindowSampler(data, "train", 48, micro_batch=16, seed=3,
                                                   attention="document").sample().inputs)  # same windows


def test_window_helpers():
    offsets = np.array([0, 5, 9, 10, 20])
    docs = window_documents(offsets, 3, 10)
    assert docs.tolist() == [0, 0, 1, 1, 1, 1, 2, 3, 3, 3]
    assert reset_positions(docs).tolist() == [0, 1, 0, 1, 2, 3, 0, 0, 1, 2]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_sampled_packed_window_equals_each_document_alone(tiny_config, scheme):
    data = prepared(tiny_config)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=data.vocab_size, n_layer=2, n_head=4, d_model=32, max_seq_len=64,
                          position={"scheme": scheme})).eval()
    sampler = WindowSampler(data, "train", 64, micro_batch=8, seed=5, positions="reset", attention="document")
    batch = next(b for b in iter(sampler.sample, None) if (b.documents[:, -1] > 0).any())
    row = int((batch.documents[:, -1] > 0).nonzero()[0])
    x, docs = batch.inputs[row:row + 1], batch.documents[row]
    weights = torch.randn(x.shape[1], data.vocab_size)  # any function of the logits: its gradients too

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return [g.clone() for g in torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])]

    packed = model(x, **{k: v[row:row + 1] for k, v in batch.model_kwargs().items()})[0][0]
    packed_grads = grads((packed * weights).sum())
    alone_loss = 0.0
    for d in docs.unique():
        part = docs == d
        alone = model(x[:, part])[0][0]
        torch.testing.assert_close(packed[part], alone, atol=2e-5, rtol=1e-5)
        alone_loss = alone_loss + (alone * weights[part]).sum()
    for got, want in zip(packed_grads, grads(alone_loss)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("positions,attention", [("reset", "causal"), ("continue", "document"), ("reset", "document")])
def test_packed_runs_train_checkpoint_and_resume_exactly(tiny_config, tmp_path, positions, attention):
    sets = ["--set", f"data.positions={positions}", "--set", f"data.attention={attention}", "--set",
            "train.save_every=2", "--set", "train.eval_every=2"]
    run_cli(["train", "--config", str(tiny_config), "--run-dir", str(tmp_path / "full"),
             "--set", "train.max_steps=4", *sets], tmp_path)
    run_cli(["train", "--config", str(tiny_config), "--run-dir", str(tmp_path / "cut"),
             "--set", "train.max_steps=2", *sets], tmp_path)
    run_cli(["train", "--config", str(tiny_config), "--run-dir", str(tmp_path / "cut"), "--resume",
             "--set", "train.max_steps=4", *sets], tmp_path)

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    assert losses("full") == losses("cut") and len(losses("full")) == 4
    cfg = yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())
    assert cfg["data"]["positions"] == positions and cfg["data"]["attention"] == attention


def test_packed_training_step_compiles_without_graph_breaks(tiny_config):
    data = prepared(tiny_config)
    model = GPT(GPTConfig(vocab_size=data.vocab_size, n_layer=2, n_head=4, d_model=32, max_seq_len=32,
                          position={"scheme": "bifocal"}))
    batch = WindowSampler(data, "train", 32, micro_batch=4, seed=1, positions="reset", attention="document").sample()
    explained = torch._dynamo.explain(model)(batch.inputs, batch.labels, return_logits=False, **batch.model_kwargs())
    assert explained.graph_break_count == 0, explained.break_reasons
