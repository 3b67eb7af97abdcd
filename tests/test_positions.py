"""Explicit per-token positions and document masks: the default reproduces the model as it was
bit for bit, any offset per row gives the same scores, and a packed window with positions that
restart at each document and document attention computes for each document what it computes alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bifocal.model import GPT, GPTConfig
from bifocal.model.schemes import SCHEMES as REGISTRY

sys.path.insert(0, str(Path(__file__).parent / "data"))
import make_gpt_reference as ref  # noqa: E402

SCHEMES = tuple(REGISTRY)  # every registered scheme
REFERENCE = Path(__file__).parent / "data" / "gpt_reference_f15196d.safetensors"


@pytest.mark.parametrize("how", ["default", "explicit (T,)", "explicit (B, T)"])
def test_default_positions_reproduce_the_model_before_them_bit_for_bit(how):
    def forward(model, x, y):
        T = x.shape[1]
        if how == "default":
            return model(x, y)
        positions = torch.arange(T) if how == "explicit (T,)" else torch.arange(T).expand(x.shape[0], T)
        return model(x, y, positions=positions)

    want = load_file(str(REFERENCE))
    got = ref.outputs(forward)
    assert got.keys() == want.keys()
    if how == "explicit (B, T)":  # per-row tables: the same values, gradients summed in another order
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
        return
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, differ[:5]


def tiny(scheme: str, **kw) -> GPT:
    torch.manual_seed(0)
    pos = {"scheme": scheme, **({"spectral_heads": 2} if scheme == "bifocal" else {})}
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=16,
                          position=pos, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("position.delta"):
                p.uniform_(-6.0, 0.0)
            elif ".position." in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_row_may_start_anywhere(scheme):
    """Rows with different position offsets compute what each computes alone at offset 0."""
    model = tiny(scheme)
    x = torch.randint(0, 50, (3, 12))
    offsets = torch.tensor([0, 7, 300])
    positions = offsets[:, None] + torch.arange(12)
    together = model(x, positions=positions)[0]
    for row in range(3):
        alone = model(x[row:row + 1])[0][0]
        torch.testing.assert_close(together[row], alone, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_packed_window_with_reset_positions_and_document_attention_equals_each_document_alone(scheme):
    model = tiny(scheme)
    torch.manual_seed(3)
    docs = [torch.randint(0, 50, (n,)) for n in (5, 9, 2)]
    x = torch.cat(docs)[None]
    y = torch.roll(x, -1, 1)
    documents = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    y = y.masked_fill(torch.roll(documents, -1, 1) != documents, -100)  # no target across a boundary
    y[0, -1] = -100

    model.zero_grad()
    logits, loss = model(x, y, positions=positions, documents=documents)
    (loss * (y != -100).sum()).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    start, total = 0, 0.0
    for d in docs:
        n = len(d)
        yd = y[:, start:start + n]
        alone, loss_d = model(d[None], yd)
        torch.testing.assert_close(logits[0, start:start + n], alone[0], atol=1e-5, rtol=1e-5)
        if (yd != -100).any():
            total = total + loss_d * (yd != -100).sum()
        start += n
    total.backward()
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_documents_without_boundaries_equal_plain_causal_attention():
    model = tiny("bifocal")
    x = torch.randint(0, 50, (2, 10))
    plain = model(x)[0]
    one_doc = model(x, documents=torch.zeros(2, 10, dtype=torch.long))[0]
    torch.testing.assert_close(plain, one_doc, atol=1e-6, rtol=1e-6)


def test_spectral_rotary_without_spectral_heads_is_rope_bit_for_bit():
    """The surgery path may build SpectralRotary with no spectral heads: it must rotate as RoPE."""
    from bifocal.model.position import FixedRotary, SpectralRotary, make_context

    cfg = GPTConfig(vocab_size=10, n_layer=1, n_head=4, n_kv_head=2, d_model=32,
                    position={"scheme": "bifocal", "spectral_heads": 0})
    q, k = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8)
    ctx = make_context(cfg, torch.arange(3, 10))
    for got, want in zip(SpectralRotary(cfg)(q, k, ctx), FixedRotary()(q, k, ctx)):
        assert torch.equal(got, want)
