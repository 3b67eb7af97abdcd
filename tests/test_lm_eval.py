"""An exported bifocal model under lm-evaluation-harness's `hf` model type, on a local task:
its per-sample log-likelihoods equal the native model's."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"context": "It is a truth universally acknowledged, that a single man in possession of a good",
     "continuation": " fortune"},
    {"context": "def __init__(self, name", "continuation": "):\n        self.name = name"},
]


def test_lm_eval_loglikelihood_matches_native(tiny_config, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from bifocal.data_pipeline.loader import PreparedData
    from bifocal.model.hf.hf_io import save_hf
    from bifocal.core.settings import build
    from bifocal.model import GPT, GPTConfig

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = PreparedData(yaml.safe_load(tiny_config.read_text())["data"]["prepared_dir"]).tokenizer()
    torch.manual_seed(0)
    model = GPT(build(GPTConfig, {"vocab_size": tok.vocab_size, "n_layer": 2, "n_head": 4, "d_model": 32,
                                     "position": {"scheme": "bifocal", "spectral_heads": 2}}, "model")).eval()
    export = save_hf(model, tok, tmp_path / "export")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "local_ll.yaml").write_text(yaml.safe_dump({
        "task": "bifocal_local_ll", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "data.jsonl")}}, "test_split": "test",
        "output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{continuation}}",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}],
    }))
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export},trust_remote_code=True",
                                  tasks=["bifocal_local_ll"], task_manager=TaskManager(include_path=str(tmp_path)),
                                  batch_size=1, device="cpu", log_samples=True)
    samples = out["samples"]["bifocal_local_ll"]
    assert len(samples) == len(DOCS)
    for sample in samples:
        doc = sample["doc"]
        ctx, whole = tok.encode(doc["context"]), tok.encode(doc["context"] + doc["continuation"])
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = model(ids)[0].log_softmax(-1)[0, len(ctx) - 1:-1].gather(-1, ids[0, len(ctx):, None]).sum().item()
        assert sample["resps"][0][0][0] == pytest.approx(logp, abs=1e-4)


def test_lm_eval_max_length_is_the_declared_context(tiny_config, tmp_path):
    """lm-eval reads max_position_embeddings: the export's intended context, not the training length."""
    from lm_eval.models.huggingface import HFLM

    from bifocal.data_pipeline.loader import PreparedData
    from bifocal.model.hf.hf_io import load_exported, save_hf
    from bifocal.core.settings import build
    from bifocal.model import GPT, GPTConfig

    tok = PreparedData(yaml.safe_load(tiny_config.read_text())["data"]["prepared_dir"]).tokenizer()
    for scheme, scaling, context, expected in (("bifocal", None, 512, 512), ("rope", None, None, 64),
                                               ("rope", {"type": "pi", "factor": 4.0, "original_max_len": 64}, None, 256),
                                               ("rope", None, 1024, 1024)):
        model = GPT(build(GPTConfig, {"vocab_size": tok.vocab_size, "n_layer": 1, "n_head": 2, "d_model": 16,
                                         "max_seq_len": 64,
                                         "position": {"scheme": scheme, "rope_scaling": scaling}}, "model")).eval()
        export = save_hf(model, tok, tmp_path / f"{scheme}-{context}-{bool(scaling)}", context=context)
        lm = HFLM(pretrained=str(export), trust_remote_code=scheme != "rope", device="cpu", batch_size=1)
        assert lm.max_length == expected == lm.tokenizer.model_max_length
        assert load_exported(export)[1].to_dict() == model.cfg.to_dict()  # the training length survives


def test_lm_eval_generate_until_in_batches_matches_native_greedy(tiny_config, tmp_path, monkeypatch):
    """generate_until at batch size 3 (lm-eval pads the prompts on the left) gives, for each prompt,
    the native model's own greedy continuation."""
    from lm_eval.tasks import TaskManager

    from bifocal.data_pipeline.loader import PreparedData
    from bifocal.eval.generate import generate
    from bifocal.core.settings import build
    from bifocal.model import GPT, GPTConfig
    from bifocal.model.hf.hf_io import save_hf

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = PreparedData(yaml.safe_load(tiny_config.read_text())["data"]["prepared_dir"]).tokenizer()
    torch.manual_seed(0)
    model = GPT(build(GPTConfig, {"vocab_size": tok.vocab_size, "n_layer": 2, "n_head": 4, "d_model": 32,
                                     "position": {"scheme": "pope"}}, "model")).eval()
    export = save_hf(model, tok, tmp_path / "export")
    prompts = ["It is a truth universally", "def f(x):\n    return", "Mr. Darcy", "import os\nimport sys\n\ndef main("]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (tmp_path / "local_gen.yaml").write_text(yaml.safe_dump({
        "task": "bifocal_local_gen", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "gen.jsonl")}}, "test_split": "test",
        "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "",
        "generation_kwargs": {"until": ["<|never|>"], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }))
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export},trust_remote_code=True",
                                  tasks=["bifocal_local_gen"], task_manager=TaskManager(include_path=str(tmp_path)),
                                  batch_size=3, device="cpu", log_samples=True)
    samples = out["samples"]["bifocal_local_gen"]
    assert len(samples) == len(prompts)
    for sample in samples:
        ids = tok.encode(sample["doc"]["prompt"])
        native = generate(model, torch.tensor([ids]), 6, greedy=True)[0, len(ids):].tolist()
        assert sample["resps"][0][0] == tok.decode(native)
