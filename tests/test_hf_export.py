"""Export to Hugging Face directories and back: real transformers models, real tokenizers, files."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
import site
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from bifocal.core.settings import build
from bifocal.data_pipeline.config import TokenizerConfig
from bifocal.data_pipeline.tokenizer import train_tokenizer
from bifocal.eval.generate import generate
from bifocal.model.hf.hf_io import load_exported, save_hf
from bifocal.model.hf.hf_tokenizer import load_tokenizer
from bifocal.model.hf.names import hf_state_dict
from bifocal.model import GPT, GPTConfig
from conftest import perturb_position_params

AUSTEN = Path(__file__).resolve().parent.parent / "data" / "nl_small_austen.jsonl.gz"
TOL = 1e-5


def austen(start: int, n: int) -> str:
    with gzip.open(AUSTEN, "rt", encoding="utf-8") as f:
        return json.loads(f.readline())["text"][start:start + n]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    return train_tokenizer([austen(0, 30_000)], TokenizerConfig(type="bpe", vocab_size=320, train_chars=30_000), out)


@pytest.fixture(scope="module")
def text() -> str:
    return austen(40_000, 600)  # text the tokenizer was not trained on


def tiny(scheme: str, vocab: int, seed: int = 0, **kw) -> GPT:
    """A tiny random model whose position parameters are moved off their initialisation, so an
    export that dropped or reset them would show in the logits."""
    pos = {"scheme": scheme, **kw.pop("position", {})}
    torch.manual_seed(seed)
    model = GPT(build(GPTConfig, dict(vocab_size=vocab, n_layer=2, n_head=4, d_model=32, max_seq_len=64,
                                         position=pos, **kw), "model")).eval()
    perturb_position_params(model)
    return model


CASES = {
    "rope": ("rope", {}),
    "rope-gqa-untied": ("rope", {"n_kv_head": 2, "tie_embeddings": False}),
    "bifocal": ("bifocal", {}),
    "bifocal-gqa-untied": ("bifocal", {"n_kv_head": 2, "tie_embeddings": False, "position": {"spectral_heads": 2}}),
    "spectral": ("spectral", {}),
    "pope": ("pope", {}),
    "nope": ("nope", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_transformers_with_identical_logits(case, bpe, text, tmp_path):
    scheme, kw = CASES[case]
    model = tiny(scheme, bpe.vocab_size, **kw)
    out = save_hf(model, bpe.save(tmp_path / "tok")[0], tmp_path / "export",
                  extra_card={"training_config": {"lr": 3e-4, "scheme": scheme}, "final_metrics": {"val_loss": 3.21}})
    ids = torch.tensor([bpe.encode(text)[:48]])
    native_logits, native_loss = model(ids, torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100))

    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=scheme != "rope").eval()
    assert type(hf).__name__ == ("LlamaForCausalLM" if scheme == "rope" else "BifocalForCausalLM")
    with torch.no_grad():
        res = hf(ids, labels=ids)  # transformers shifts labels itself
    assert (res.logits - native_logits).abs().max().item() <= TOL
    assert abs(res.loss.item() - native_loss.item()) <= TOL

    # transformers' generate (its own cache and loop) agrees with ours, cached and not.
    prompt = ids[:, :8]
    ours = generate(model, prompt, 12, greedy=True)
    for use_cache in (True, False):
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=use_cache, eos_token_id=None)
        assert theirs.tolist() == ours.tolist()

    # The exported tokenizer encodes the same ids through AutoTokenizer.
    for tok in (AutoTokenizer.from_pretrained(out, trust_remote_code=scheme != "rope"), load_tokenizer(out)):
        assert tok(text, add_special_tokens=False)["input_ids"] == bpe.encode(text)
        assert tok.eos_token == "<|endoftext|>"

    back, cfg = load_exported(out)
    assert cfg.to_dict() == model.cfg.to_dict()
    assert torch.equal(back(ids)[0], native_logits)

    card = (out / "README.md").read_text()
    assert scheme in card and "3.21" in card and "Final metrics" in card
    assert ("trust_remote_code=True" in card) == (scheme != "rope")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == bpe.eod_id
    if scheme != "rope":
        code = {p.name: p.read_text() for p in out.glob("*.py")}
        assert {"modeling_bifocal.py", "configuration_bifocal.py", "bifocal_gpt.py",
                "bifocal_position_spectral.py"} <= set(code)
        assert not any(re.search(r"^\s*(import|from)\s+bifocal\b", src, re.M) for src in code.values())
    else:
        assert not list(out.glob("*.py"))
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == "llama" and "auto_map" not in config
        assert config["rope_parameters"]["rope_theta"] == 10000.0
        assert config["tie_word_embeddings"] == model.cfg.tie_embeddings


def test_exported_code_runs_without_bifocal_installed(bpe, text, tmp_path):
    """A fresh interpreter without site's .pth processing (so no editable-install finder) and
    without the repo on sys.path: only torch/transformers from site-packages."""
    model = tiny("bifocal", bpe.vocab_size, n_kv_head=2, position={"spectral_heads": 2})
    out = save_hf(model, bpe, tmp_path / "export")
    ids = bpe.encode(text)[:32]
    script = f"""
import json, sys
sys.path.extend({site.getsitepackages()!r})
try:
    import bifocal
    raise SystemExit("bifocal is importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    print(json.dumps(m(torch.tensor([{ids!r}])).logits.tolist()))
"""
    env = {"PATH": "/usr/bin:/bin", "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    logits = torch.tensor(json.loads(res.stdout.strip().splitlines()[-1]))
    assert (logits - model(torch.tensor([ids]))[0]).abs().max().item() <= TOL


def test_bf16_export_halves_the_weights(bpe, text, tmp_path):
    model = tiny("bifocal", bpe.vocab_size)
    fp32 = save_hf(model, bpe, tmp_path / "fp32")
    bf16 = save_hf(model, bpe, tmp_path / "bf16", dtype="bf16")
    ratio = (bf16 / "model.safetensors").stat().st_size / (fp32 / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55
    back, _ = load_exported(bf16, dtype=torch.bfloat16)
    assert back.embed.weight.dtype == torch.bfloat16
    ids = torch.tensor([bpe.encode(text)[:32]])
    ref = model(ids)[0]
    assert (back(ids)[0].float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_sharded_export_round_trips(bpe, text, tmp_path):
    model = tiny("pope", bpe.vocab_size)
    out = save_hf(model, bpe, tmp_path / "export", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids = torch.tensor([bpe.encode(text)[:32]])
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max().item() <= TOL
    assert torch.equal(load_exported(out)[0](ids)[0], model(ids)[0])
    # Re-exporting unsharded into the same directory leaves no stale shards behind.
    save_hf(model, bpe, out)
    assert not (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) == 1


@pytest.mark.parametrize("kind", ["sentencepiece_bpe", "sentencepiece_unigram"])
def test_sentencepiece_tokenizer_exports_for_autotokenizer(kind, tmp_path, text):
    sp = train_tokenizer([austen(0, 30_000)], TokenizerConfig(type=kind, vocab_size=400, train_chars=30_000),
                         tmp_path / "sp")
    model = tiny("rope", sp.vocab_size)
    out = save_hf(model, tmp_path / "sp" / "tokenizer.model", tmp_path / "export")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert tok.decode(sp.encode(text)) == text
    assert tok.eos_token_id == sp.eod_id


def test_native_weights_load_into_a_transformers_model(bpe, text, tmp_path):
    """The weight-name map alone puts every native weight where Llama expects it (strict load)."""
    model = tiny("rope", bpe.vocab_size, n_kv_head=2, tie_embeddings=False)
    out = save_hf(model, bpe, tmp_path / "export")
    torch.manual_seed(5)
    hf = LlamaForCausalLM(LlamaConfig.from_pretrained(out)).eval()  # random weights
    ids = torch.tensor([bpe.encode(text)[:32]])
    hf.load_state_dict(hf_state_dict(model), strict=True)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max().item() <= TOL


def test_bad_inputs_name_the_path(bpe, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_exported(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no config.json"):
        load_exported(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        save_hf(tiny("rope", bpe.vocab_size), tmp_path / "missing.json", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="empty: no tokenizer"):
        save_hf(tiny("rope", bpe.vocab_size), tmp_path / "empty", tmp_path / "out")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        load_exported(tmp_path / "gpt2")
    out = save_hf(tiny("bifocal", bpe.vocab_size), bpe, tmp_path / "noweights")
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_exported(out)
    shutil.rmtree(out)


@pytest.mark.parametrize("kind", ["pi", "ntk", "yarn", "dynamic_ntk"])
def test_rope_evaluated_with_scaling_exports_llama_when_transformers_matches(kind, bpe, text, tmp_path):
    model = tiny("rope", bpe.vocab_size)
    model.set_rope_scaling({"type": kind, "factor": 4.0, "original_max_len": 64})
    out = save_hf(model, bpe, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    ids = torch.tensor([bpe.encode(austen(70_000, 2000))[:200]])  # beyond the 64 trained positions
    native = model(ids)[0]
    if kind != "dynamic_ntk":
        assert config["model_type"] == "llama" and config["max_position_embeddings"] == 256
        assert config["rope_parameters"]["rope_type"] == {"pi": "linear", "ntk": "default", "yarn": "yarn"}[kind]
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(hf).__name__ == "LlamaForCausalLM"
        with torch.no_grad():
            assert (hf(ids).logits - native).abs().max().item() <= TOL
    else:  # transformers' dynamic keeps the longest length seen: keep bifocal's own code
        assert config["model_type"] == "bifocal"
    assert (load_exported(out)[0](ids)[0] - native).abs().max().item() <= TOL
