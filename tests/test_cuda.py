"""The GPU path: bf16 training steps for every scheme, compile and activation checkpointing equal
to the plain model, KV-cache generation. Skipped where no CUDA device is visible."""

from __future__ import annotations

import pytest
import torch

from bifocal.model import GPT, GPTConfig, KVCache
from bifocal.model.schemes import SCHEMES as REGISTRY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SCHEMES = tuple(REGISTRY)  # every registered scheme


def model(scheme: str, seed: int = 0, dtype=torch.bfloat16) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=1000, n_layer=4, n_head=8, n_kv_head=4, d_model=256, max_seq_len=256,
                    position={"scheme": scheme})
    return GPT(cfg).cuda().to(dtype)


def batch(T: int = 256, B: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 1000, (B, T + 1), generator=g).cuda()
    return x[:, :-1], x[:, 1:]


def loss_and_grads(m: GPT, x: torch.Tensor, y: torch.Tensor):
    m.zero_grad(set_to_none=True)
    _, loss = m(x, y, return_logits=False)
    loss.backward()
    return float(loss), {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}


def assert_close(a, b, rtol: float):
    assert a[0] == pytest.approx(b[0], rel=rtol)
    for name in a[1]:
        ref = b[1][name]
        err = (a[1][name] - ref).norm() / ref.norm().clamp(min=1e-12)
        assert err < rtol * 10, f"{name}: relative gradient error {float(err):.2e}"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_bf16_training_steps_lower_the_loss(scheme):
    m = model(scheme, dtype=torch.float32)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x, y = batch()
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = m(x, y, return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("scheme", SCHEMES)
def test_chunked_loss_matches_full_logits_in_bf16(scheme):
    m = model(scheme)
    x, y = batch()
    _, full = m(x, y)
    _, chunked = m(x, y, return_logits=False)
    assert float(chunked) == pytest.approx(float(full), rel=1e-3)


@pytest.mark.parametrize("scheme", ["rope", "bifocal", "pope"])
def test_compile_gives_the_same_loss_and_gradients(scheme):
    eager, compiled = model(scheme, dtype=torch.float32), model(scheme, dtype=torch.float32)
    compiled.compile()
    x, y = batch()
    assert_close(loss_and_grads(compiled, x, y), loss_and_grads(eager, x, y), rtol=1e-3)


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(every):
    plain, ac = model("bifocal", dtype=torch.float32), model("bifocal", dtype=torch.float32)
    ac.set_activation_checkpointing(every)
    x, y = batch()
    assert_close(loss_and_grads(ac, x, y), loss_and_grads(plain, x, y), rtol=1e-5)


def test_activation_checkpointing_lowers_peak_memory():
    x, y = batch(T=256, B=8)
    peaks = []
    for every in (0, 1):
        m = model("bifocal")
        m.set_activation_checkpointing(every)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss_and_grads(m, x, y)
        peaks.append(torch.cuda.max_memory_allocated())
        del m
    assert peaks[1] < peaks[0]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_kv_cache_generation_matches_the_full_forward(scheme):
    m = model(scheme).eval()
    x, _ = batch(T=40, B=2)
    with torch.no_grad():
        full, _ = m(x)
        cache = KVCache()
        logits, _ = m(x[:, :24], cache=cache)
        steps = [logits[:, -1]]
        for t in range(24, 40):
            logits, _ = m(x[:, t:t + 1], cache=cache)
            steps.append(logits[:, -1])
    incremental = torch.stack(steps[:-1], dim=1).float()
    torch.testing.assert_close(incremental, full[:, 23:39].float(), rtol=5e-2, atol=5e-2)
