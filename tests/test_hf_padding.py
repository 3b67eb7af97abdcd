"""Padding (left and right) in the native model and in exports: a padded batch computes what each
sequence computes alone, so batched generate, pipelines and lm-eval batches work."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from bifocal.model.hf.hf_io import save_hf

from test_hf_export import austen, bpe, tiny  # noqa: F401  (bpe is a fixture)

TOL = 1e-5
SCHEMES = ["bifocal", "spectral", "pope", "rope"]


def _batch(seqs: list[list[int]], pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids, mask = [], []
    for s in seqs:
        fill = [pad] * (width - len(s))
        ids.append(fill + s if side == "left" else s + fill)
        mask.append([0] * len(fill) + [1] * len(s) if side == "left" else [1] * len(s) + [0] * len(fill))
    return torch.tensor(ids), torch.tensor(mask)


def _real(logits: torch.Tensor, mask: torch.Tensor, row: int) -> torch.Tensor:
    return logits[row][mask[row].bool()]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(scheme, side, bpe, tmp_path):  # noqa: F811
    model = tiny(scheme, bpe.vocab_size)
    text = austen(50_000, 400)
    seqs = [bpe.encode(text)[:n] for n in (20, 7, 13)]
    ids, mask = _batch(seqs, bpe.eod_id, side)
    alone = [model(torch.tensor([s]))[0][0] for s in seqs]
    with torch.no_grad():
        native = model(ids, attention_mask=mask)[0]
        hf = AutoModelForCausalLM.from_pretrained(save_hf(model, bpe, tmp_path / "x"),
                                                  trust_remote_code=scheme != "rope").eval()
        exported = hf(input_ids=ids, attention_mask=mask).logits
    for i, ref in enumerate(alone):
        assert (_real(native, mask, i) - ref).abs().max().item() <= TOL
        assert (_real(exported, mask, i) - ref).abs().max().item() <= TOL
    assert torch.isfinite(native).all() and torch.isfinite(exported).all()  # padded rows too


@pytest.mark.parametrize("scheme", ["bifocal", "pope"])
def test_batched_generate_and_pipeline_with_left_padding(scheme, bpe, tmp_path):  # noqa: F811
    out = save_hf(tiny(scheme, bpe.vocab_size), bpe, tmp_path / "x")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left" and tok.model_max_length == 64
    prompts = [austen(60_000, 90), austen(61_000, 15), austen(62_000, 40)]
    alone = [hf.generate(**tok(p, return_tensors="pt"), max_new_tokens=6, do_sample=False)[0].tolist()
             for p in prompts]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"].min() == 0  # really padded
    together = hf.generate(**batch, max_new_tokens=6, do_sample=False)
    for row, ref in zip(together.tolist(), alone):
        assert row[len(row) - len(ref):] == ref

    pipe = pipeline("text-generation", model=hf, tokenizer=tok)
    single = [pipe(p, max_new_tokens=5, do_sample=False)[0]["generated_text"] for p in prompts]
    batched = [r[0]["generated_text"] for r in pipe(prompts, max_new_tokens=5, do_sample=False, batch_size=3)]
    assert batched == single
