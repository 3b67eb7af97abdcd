"""The training fast path on CPU: chunked loss, activation checkpointing, torch.compile and the
FLOPs count behind MFU, each checked against the plain computation."""

from __future__ import annotations

import pytest
import torch

from bifocal.launcher.throughput import mfu, peak_flops
from bifocal.model import GPT, GPTConfig
from bifocal.model.flops import flops_per_token, matmul_params
from bifocal.model.loss import cross_entropy, linear_cross_entropy
from bifocal.model.schemes import SCHEMES as REGISTRY

SCHEMES = tuple(REGISTRY)  # every registered scheme


def tiny(scheme: str = "bifocal", seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, n_layer=3, n_head=4, d_model=32, max_seq_len=16, position={"scheme": scheme})
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def loss_and_grads(model: GPT, x: torch.Tensor, y: torch.Tensor, **kw) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    _, loss = model(x, y, **kw)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    assert a[0] == pytest.approx(b[0], rel=rtol, abs=atol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_matches_full_logits(dtype, tol, chunk):
    torch.manual_seed(1)
    hidden = torch.randn(3, 21, 16, dtype=dtype, requires_grad=True)
    weight = (0.3 * torch.randn(50, 16)).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (3, 21))
    labels[0, :4] = -100  # ignored positions count neither in the sum nor in the mean
    ref = cross_entropy(hidden @ weight.t(), labels)
    ref.backward()
    want = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    got = linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk)
    (2.0 * got).backward()  # a non-unit incoming gradient must scale both gradients
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    torch.testing.assert_close(hidden.grad, 2 * want[0], rtol=tol, atol=tol * want[0].abs().max().item())
    torch.testing.assert_close(weight.grad, 2 * want[1], rtol=tol, atol=tol * want[1].abs().max().item())


def test_chunked_loss_with_every_label_ignored_is_nan_like_the_reference():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    labels = torch.full((4,), -100)
    assert torch.isnan(linear_cross_entropy(hidden, weight, labels)) and torch.isnan(cross_entropy(hidden @ weight.t(), labels))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_training_forward_without_logits_matches_the_logits_path(scheme):
    model = tiny(scheme, n_kv_head=2)
    x = torch.randint(0, 97, (2, 16))
    y = x.roll(-1, dims=1)
    logits, _ = model(x, y, return_logits=False)
    assert logits is None
    assert_same(loss_and_grads(model, x, y, return_logits=False), loss_and_grads(model, x, y))
    with torch.no_grad():  # evaluation through the same path needs no gradient buffers
        assert float(model(x, y, return_logits=False)[1]) == pytest.approx(float(model(x, y)[1]), rel=1e-6)


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(every):
    model = tiny("bifocal", dropout=0.1)  # dropout: the recompute must replay the same masks
    x = torch.randint(0, 97, (2, 16))
    torch.manual_seed(5)
    plain = loss_and_grads(model, x, x, return_logits=False)
    model.set_activation_checkpointing(every)
    torch.manual_seed(5)
    assert_same(loss_and_grads(model, x, x, return_logits=False), plain)


def test_activation_checkpointing_recomputes_the_chosen_blocks(monkeypatch):
    from bifocal.model.gpt import Block

    model = tiny("rope")
    calls, forward = [], Block.forward

    def counted(self, *args, **kwargs):
        calls.append(list(model.blocks).index(self))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Block, "forward", counted)  # module hooks do not fire in the recompute
    model.set_activation_checkpointing(2)
    x = torch.randint(0, 97, (1, 8))
    _, loss = model(x, x, return_logits=False)
    assert calls == [0, 1, 2]
    calls.clear()
    loss.backward()
    assert calls == [2, 0]  # blocks 0 and 2 run again in the backward, block 1 kept its activations
    with pytest.raises(ValueError, match=">= 0"):
        model.set_activation_checkpointing(-1)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_training_forward_compiles_without_graph_breaks(scheme):
    model = tiny(scheme)
    model.set_activation_checkpointing(1)
    x = torch.randint(0, 97, (2, 16))
    explained = torch._dynamo.explain(model)(x, x, return_logits=False)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.slow  # inductor compiles C++ kernels: ~30 s on 2 cores
def test_compiled_model_trains_like_the_eager_one():
    eager, compiled = tiny("bifocal"), tiny("bifocal")
    compiled.compile()
    x = torch.randint(0, 97, (2, 16))
    assert_same(loss_and_grads(compiled, x, x, return_logits=False), loss_and_grads(eager, x, x, return_logits=False),
                rtol=1e-4, atol=1e-5)


def test_matmul_params_counts_every_linear_weight():
    for tie in (True, False):
        model = tiny("bifocal", n_kv_head=2, tie_embeddings=tie)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert matmul_params(model.cfg) == linear


def test_flops_per_token_formula():
    cfg = GPTConfig(vocab_size=50304, n_layer=12, n_head=12, d_model=768, max_seq_len=1024,
                    position={"scheme": "rope"})
    n = matmul_params(cfg)
    assert flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 1024 * 768
    pope = GPTConfig(**{**cfg.to_dict(), "position": {"scheme": "pope"}})
    assert flops_per_token(pope, 1024) - flops_per_token(cfg, 1024) == 6 * 12 * 1024 * 768  # wider q.k


def test_mfu_needs_a_known_peak():
    assert peak_flops("cpu", "bf16") is None and mfu(1e5, 1e9, None) is None
    assert peak_flops("cpu", "bf16", override_tflops=2.0) == 2e12
    assert mfu(1e3, 1e9, 2e12) == pytest.approx(0.5)
    assert mfu(1e3, 1e9, 1e12, devices=4) == pytest.approx(0.25)
