"""`bifocal export` from real DeepSpeed checkpoints, reloaded with transformers; continued
pretraining of a Hugging Face Llama model with `--init-from-hf` and export back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from bifocal.run.checkpoint import consolidated_state_dict, latest_checkpoint, load_run_model

from conftest import free_port, run_cli

transformers = pytest.importorskip("transformers")
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


def text_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(TEXT)])


def test_zero3_two_rank_bifocal_run_exports_with_matching_logits(tiny_config, tmp_path):
    run_cli(["launch", "--num_gpus", "2", "--master_port", str(free_port()), "--", "--config", str(tiny_config),
             "--set", "deepspeed.zero_stage=3", "--set", "train.micro_batch=2", "--set", "train.max_steps=4",
             "--run-dir", str(tmp_path / "z3")], tmp_path)
    out = tmp_path / "export"
    proc = run_cli(["export", str(tmp_path / "z3"), "--out", str(out)], tmp_path)
    assert "exported" in proc.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "bifocal" and "auto_map" in cfg
    card = (out / "README.md").read_text()
    assert "bifocal" in card and "val_loss" in card
    native, tok = load_run_model(tmp_path / "z3")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = text_ids(tok)
    with torch.no_grad():
        assert (hf(ids).logits - native(ids)[0]).abs().max().item() <= 1e-5
    # A second export to the same place refuses and leaves the first untouched.
    again = run_cli(["export", str(tmp_path / "z3"), "--out", str(out)], tmp_path, check=False)
    assert again.returncode == 2 and "not empty" in again.stderr
    assert (out / "model.safetensors").is_file()
    # Generation from the run directory and from the export give the same greedy text.
    a = run_cli(["generate", str(tmp_path / "z3"), "--prompt", "It is", "--greedy", "--max-new-tokens", "8"], tmp_path)
    b = run_cli(["generate", str(out), "--prompt", "It is", "--greedy", "--max-new-tokens", "8"], tmp_path)
    assert a.stdout == b.stdout and a.stdout.startswith("It is")


def test_rope_run_exports_as_plain_llama(tiny_config, tmp_path):
    run_cli(["train", "--config", str(tiny_config), "--set", "model.position.scheme=rope", "--set", "train.max_steps=3",
             "--run-dir", str(tmp_path / "rope")], tmp_path)
    out = tmp_path / "llama"
    run_cli(["export", str(tmp_path / "rope"), "--out", str(out), "--dtype", "fp32"], tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    assert not list(out.glob("*.py"))  # no custom code
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    native, tok = load_run_model(tmp_path / "rope")
    ids = text_ids(tok)
    with torch.no_grad():
        assert (hf(ids).logits - native(ids)[0]).abs().max().item() <= 1e-5
    # Downstream evaluation interface (what lm-evaluation-harness's `hf` model computes): the
    # log-likelihood of a continuation, via AutoTokenizer + AutoModelForCausalLM on the export.
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    context, continuation = "It is a truth universally", " acknowledged, that a single man"
    whole = hf_tok(context + continuation, return_tensors="pt").input_ids
    n_ctx = len(hf_tok(context).input_ids)
    assert whole[0].tolist() == tok.encode(context + continuation)
    with torch.no_grad():
        def loglik(logits):
            return logits.log_softmax(-1)[0, n_ctx - 1:-1].gather(-1, whole[0, n_ctx:, None]).sum().item()

        assert loglik(hf(whole).logits) == pytest.approx(loglik(native(whole)[0]), abs=1e-4)


def test_every_result_names_the_model_after_its_run(tiny_config, tmp_path):
    """One naming rule: eval ppl, passkey and spectrum on a run and on its export (whatever the
    export's folder is called) all name the model after the training run."""
    run = tmp_path / "my-run"
    run_cli(["train", "--config", str(tiny_config), "--set", "train.max_steps=2", "--run-dir", str(run)], tmp_path)
    export = tmp_path / "somewhere" / "export-v2"
    run_cli(["export", str(run), "--out", str(export)], tmp_path)
    assert json.loads((export / "config.json").read_text())["bifocal_run"] == "my-run"
    data = yaml.safe_load(tiny_config.read_text())["data"]["prepared_dir"]
    names = []
    for model in (run, export):
        ppl, pk = tmp_path / f"ppl-{model.name}.json", tmp_path / f"pk-{model.name}.json"
        run_cli(["eval", "ppl", str(model), "--data", data, "--lengths", "16", "--max-docs", "1", "--out", str(ppl)],
                tmp_path)
        run_cli(["eval", "passkey", str(model), "--data", data, "--lengths", "32", "--trials", "1", "--out", str(pk)],
                tmp_path)
        names += [json.loads(ppl.read_text())["model"], json.loads(pk.read_text())["model"]]
    assert names == ["my-run"] * 4


def test_continued_pretraining_of_a_hf_llama(tiny_config, tmp_path):
    """--init-from-hf: spectralize a local Llama (random weights, our tokenizer's vocabulary),
    train it under DeepSpeed, export, reload."""
    from bifocal.data_pipeline.loader import PreparedData
    from bifocal.model.surgery import load_spectralized

    import yaml

    prepared = yaml.safe_load(tiny_config.read_text())["data"]["prepared_dir"]
    vocab = PreparedData(prepared).vocab_size
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    src = tmp_path / "llama-src"
    llama.save_pretrained(src)
    run_dir = tmp_path / "cpt"
    run_cli(["train", "--config", str(tiny_config), "--init-from-hf", str(src), "--set", "train.max_steps=3",
             "--set", "model.position.spectral_heads=2", "--run-dir", str(run_dir)], tmp_path)
    assert json.loads((run_dir / "init_from_hf.json").read_text())["spectral_heads"] == 2
    out = tmp_path / "cpt-export"
    run_cli(["export", str(run_dir), "--out", str(out)], tmp_path)
    trained = load_spectralized(src, spectral_heads=2, phase_init_std=0.0)
    trained.load_state_dict(consolidated_state_dict(latest_checkpoint(run_dir)[1]))
    reloaded = load_spectralized(out)
    ids = torch.randint(0, vocab, (1, 24))
    with torch.no_grad():
        assert (reloaded(ids)[0] - trained(ids)[0]).abs().max().item() <= 1e-5
        remote = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        assert (remote(ids).logits - trained(ids)[0]).abs().max().item() <= 1e-5
    # The spectral parameters moved during training (they were trainable and got gradients).
    fresh = load_spectralized(src, spectral_heads=2, phase_init_std=0.0)
    moved = [n for (n, p), (_, q) in zip(trained.named_parameters(), fresh.named_parameters())
             if ".position." in n and not torch.equal(p, q)]
    assert moved


def test_export_without_transformers_names_the_extra(tmp_path):
    """transformers made unimportable (a None entry in sys.modules, as if not installed)."""
    script = ("import sys; sys.modules['transformers'] = None\n"
              "from bifocal.launcher.cli import main\n"
              f"sys.exit(main(['export', {str(tmp_path / 'run')!r}, '--out', {str(tmp_path / 'out')!r}]))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "bifocal: error: bifocal export needs transformers: pip install 'bifocal[hf]'"
    assert not (tmp_path / "out").exists()
