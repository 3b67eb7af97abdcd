"""transformers' generation contract for every export and every surgery family, with the
transformers installed (the KV cache is `past_key_values` up to 5.23 and `cache` from 5.24):
greedy generate with the cache == without it == the argmax of one full forward, every step's
logits to 1e-5; a left-padded batch generates what each prompt generates alone; beam search and
sampling agree with and without the cache."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from bifocal.model.hf.hf_io import save_hf
from bifocal.model.surgery import CausalLMAdapter, spectralize

from test_hf_export import austen, bpe, tiny  # noqa: F401  (bpe is a fixture)
from test_surgery import FAMILIES, build

TOL = 1e-5
NEW = 6
SCHEMES = {"rope": ("rope", {}), "bifocal": ("bifocal", {}), "bifocal-gqa": ("bifocal", {"n_kv_head": 2,
           "tie_embeddings": False, "position": {"spectral_heads": 2}}), "spectral": ("spectral", {}),
           "pope": ("pope", {}), "nope": ("nope", {})}


def _generate(model, ids, mask=None, **kw):
    return model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                          max_new_tokens=NEW, eos_token_id=None, pad_token_id=0, output_logits=True,
                          return_dict_in_generate=True, **kw)


def check_generation_contract(model, prompts: list[list[int]], pad_id: int) -> None:
    model.eval()
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            cached = _generate(model, ids, do_sample=False, use_cache=True)
            uncached = _generate(model, ids, do_sample=False, use_cache=False)
            full = model(input_ids=cached.sequences, use_cache=False).logits[0]
        assert cached.sequences.tolist() == uncached.sequences.tolist()
        for step, (a, b) in enumerate(zip(cached.logits, uncached.logits)):
            at = len(prompt) - 1 + step
            assert (a[0] - full[at]).abs().max().item() <= TOL, f"cached step {step}"
            assert (b[0] - full[at]).abs().max().item() <= TOL, f"uncached step {step}"
            assert cached.sequences[0, at + 1].item() == full[at].argmax().item()

    # A left-padded batch generates, step by step, what each prompt generates alone.
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        together = _generate(model, ids, mask, do_sample=False)
        for row, prompt in enumerate(prompts):
            alone = _generate(model, torch.tensor([prompt]), do_sample=False)
            assert together.sequences[row, width:].tolist() == alone.sequences[0, len(prompt):].tolist()
            for a, b in zip(together.logits, alone.logits):
                assert (a[row] - b[0]).abs().max().item() <= TOL

    # Beam search and (seeded) sampling: the same with and without the cache.
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        beams = [model.generate(ids, max_new_tokens=NEW, num_beams=3, do_sample=False, eos_token_id=None,
                                pad_token_id=0, use_cache=c).tolist() for c in (True, False)]
        samples = []
        for c in (True, False):
            torch.manual_seed(7)
            samples.append(model.generate(ids, max_new_tokens=NEW, do_sample=True, top_k=20, eos_token_id=None,
                                          pad_token_id=0, use_cache=c).tolist())
    assert beams[0] == beams[1] and samples[0] == samples[1]


@pytest.mark.parametrize("case", list(SCHEMES))
def test_every_export_follows_the_generation_contract(case, bpe, tmp_path):  # noqa: F811
    scheme, kw = SCHEMES[case]
    out = save_hf(tiny(scheme, bpe.vocab_size, **kw), bpe, tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=scheme != "rope")
    text = austen(50_000, 400)
    prompts = [bpe.encode(text)[:n] for n in (11, 4, 17)]
    check_generation_contract(hf, prompts, bpe.eod_id)


def _spectralized(family: str):
    model = spectralize(build(family), phase_init_std=0.3)
    with torch.no_grad():  # learned-looking Omega and A, so a dropped parameter would show
        for name, p in model.named_parameters():
            if ".position." in name and not name.endswith("phase"):
                p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_surgery_family_follows_the_generation_contract(family, tmp_path):
    prompts = [torch.randint(1, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 3, 14)]
    model = _spectralized(family)
    check_generation_contract(model, prompts, pad_id=0)  # in process
    out = CausalLMAdapter(model).save_hf(tmp_path / family)
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)  # the shipped remote code
    check_generation_contract(reloaded, prompts, pad_id=0)
