"""Decoding with the native GPT: cache equivalence per scheme, sampling, and the CLI."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from bifocal.core.settings import build
from bifocal.data_pipeline.config import TokenizerConfig
from bifocal.data_pipeline.tokenizer import train_tokenizer
from bifocal.eval.generate import filter_logits, generate
from bifocal.model.hf.hf_io import save_hf
from bifocal.launcher.cli import main as cli
from bifocal.model import GPT, GPTConfig
from conftest import perturb_position_params

SCHEMES = ["rope", "spectral", "bifocal", "pope", "nope"]
AUSTEN = Path(__file__).resolve().parent.parent / "data" / "nl_small_austen.jsonl.gz"


def tiny(scheme: str, vocab: int = 64, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    # Untied, with a large init: random tiny models then continue with varied tokens.
    model = GPT(build(GPTConfig, dict(vocab_size=vocab, n_layer=2, n_head=4, d_model=32, max_seq_len=32,
                                         tie_embeddings=False, init_std=0.3, position={"scheme": scheme}, **kw), "model")).eval()
    perturb_position_params(model)
    return model


def prompt(B: int = 2, T: int = 7) -> torch.Tensor:
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("n_kv_head", [None, 2])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cached_and_uncached_greedy_agree(scheme, n_kv_head):
    model = tiny(scheme, n_kv_head=n_kv_head)
    x = prompt()
    cached = generate(model, x, 40, greedy=True)  # past the training length 32
    assert cached.shape == (2, 47) and torch.equal(cached[:, :7], x)
    assert torch.equal(cached, generate(model, x, 40, greedy=True, use_cache=False))
    assert len(set(cached[0, 7:].tolist())) > 1  # not a trivially constant continuation


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model, x = tiny("bifocal"), prompt()
    a = generate(model, x, 20, temperature=1.5, seed=11)
    assert torch.equal(a, generate(model, x, 20, temperature=1.5, seed=11))
    assert not torch.equal(a, generate(model, x, 20, temperature=1.5, seed=12))
    greedy = generate(model, x, 20, greedy=True)
    assert not torch.equal(a, greedy)
    assert torch.equal(generate(model, x, 20, top_k=1, seed=5), greedy)
    assert torch.equal(generate(model, x, 20, top_p=1e-9, seed=5), greedy)
    # Sampling with and without the cache draws the same tokens for the same seed.
    assert torch.equal(generate(model, x, 20, top_k=8, seed=7), generate(model, x, 20, top_k=8, seed=7, use_cache=False))


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(filter_logits(logits, top_k=10, top_p=1.0)).any()
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isinf(filter_logits(shuffled, top_p=0.7)).tolist() == [[True, False, True, False]]


def test_eos_stops_and_pads():
    model, x = tiny("rope"), prompt()
    free = generate(model, x, 12, greedy=True)
    eos = int(free[0, 10])  # a token row 0 emits at step 3
    out = generate(model, x, 12, greedy=True, eos_id=eos)
    first = (out[0, 7:] == eos).nonzero()[0].item()
    assert (out[0, 7 + first:] == eos).all()
    assert torch.equal(out[0, :7 + first], free[0, :7 + first])


def test_bad_arguments():
    model, x = tiny("rope"), prompt()
    for kwargs in ({"temperature": 0.0}, {"top_k": 0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            generate(model, x, 3, **kwargs)
    with pytest.raises(ValueError, match="shape"):
        generate(model, x[0], 3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    with gzip.open(AUSTEN, "rt", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"][:20_000]
    tok = train_tokenizer([text], TokenizerConfig(type="bpe", vocab_size=300, train_chars=20_000), root / "tok")
    dirs = {}
    for scheme in ("rope", "bifocal"):
        dirs[scheme] = save_hf(tiny(scheme, vocab=tok.vocab_size), tok, root / scheme)
    return dirs


@pytest.mark.parametrize("scheme", ["rope", "bifocal"])
def test_cli_prints_a_completion(scheme, exported, capsys):
    args = ["generate", str(exported[scheme]), "--prompt", "It is a truth universally", "--max-new-tokens", "12",
            "--device", "cpu"]
    assert cli(args + ["--greedy"]) == 0
    cached = capsys.readouterr().out
    assert cached.startswith("It is a truth universally") and len(cached.strip()) > len("It is a truth universally")
    assert cli(args + ["--greedy", "--no-cache"]) == 0
    assert capsys.readouterr().out == cached
    assert cli(args + ["--seed", "1", "--top-k", "20"]) == 0
    sampled = capsys.readouterr().out
    assert cli(args + ["--seed", "1", "--top-k", "20"]) == 0
    assert capsys.readouterr().out == sampled


def test_cli_reports_a_missing_model(tmp_path, capsys):
    assert cli(["generate", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "nowhere" in capsys.readouterr().err
