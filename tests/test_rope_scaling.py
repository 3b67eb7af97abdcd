"""RoPE's training-free scalings against the field's reference: transformers' ROPE_INIT_FUNCTIONS
(`linear` = PI, `dynamic` = dynamic NTK, `yarn`), frequencies and attention factor, over several
head dims, bases, original lengths, factors and evaluation lengths."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from bifocal.model.config import RopeScaling
from bifocal.model.position import fixed_table, scaled_inv_freq
from bifocal.model.position.rope import yarn_correction_range

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

HEAD_DIMS = (8, 32, 64, 128)
BASES = (10000.0, 500000.0)
ORIGINAL_LENS = (64, 128, 2048, 4096)
FACTORS = (2.0, 4.0, 16.0, 32.0)
CASES = list(itertools.product(HEAD_DIMS, BASES, ORIGINAL_LENS, FACTORS))


def hf(rope_type: str, head_dim: int, base: float, original: int, factor: float, seq_len: int | None = None):
    params = {"rope_type": rope_type, "rope_theta": base, "factor": factor}
    if rope_type == "yarn":
        params["original_max_position_embeddings"] = original
    cfg = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                   max_position_embeddings=original, rope_parameters=params)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len=seq_len)
    return inv_freq, float(attention_factor)


def ours(kind: str, head_dim: int, base: float, original: int, factor: float, seq_len: int = 0):
    return scaled_inv_freq(head_dim, base, RopeScaling(type=kind, factor=factor, original_max_len=original), seq_len)


@pytest.mark.parametrize("head_dim,base,original,factor", CASES)
def test_yarn_equals_transformers(head_dim, base, original, factor):
    ref, ref_attention = hf("yarn", head_dim, base, original, factor)
    got, mscale = ours("yarn", head_dim, base, original, factor)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    assert mscale == pytest.approx(ref_attention, rel=1e-12)


@pytest.mark.parametrize("head_dim,base,original,factor", CASES)
def test_pi_equals_transformers_linear(head_dim, base, original, factor):
    ref, ref_attention = hf("linear", head_dim, base, original, factor)
    got, mscale = ours("pi", head_dim, base, original, factor)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    assert mscale == ref_attention == 1.0


@pytest.mark.parametrize("head_dim,base,original,factor", CASES[::3])
@pytest.mark.parametrize("multiple", (1, 2, 5, 16))
def test_dynamic_ntk_equals_transformers_dynamic(head_dim, base, original, factor, multiple):
    seq_len = original * multiple
    ref, _ = hf("dynamic", head_dim, base, original, factor, seq_len=seq_len)
    got, mscale = ours("dynamic_ntk", head_dim, base, original, factor, seq_len=seq_len)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    assert mscale == 1.0


def test_yarn_ramp_is_linear_in_the_pair_index_between_correction_dims():
    """d=64, base 1e4, L=128: pair i makes 128 * 1e4^(-i/32) / 2pi rotations; 32 rotations falls
    at i ~ -1.6 and 1 rotation at i ~ 10.5, so the bounds are 0 and 11: pair 0 keeps theta, pairs
    >= 11 are divided by s, and pairs in between mix linearly in i (not in the rotation count)."""
    d, base, L, s = 64, 10000.0, 128, 8.0
    assert yarn_correction_range(d, base, L, 32, 1) == (0.0, 11.0)
    theta = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    got, _ = ours("yarn", d, base, L, s)
    gamma = (1 - torch.arange(d // 2, dtype=torch.float32) / 11).clamp(0, 1)
    torch.testing.assert_close(got, (1 - gamma) * theta / s + gamma * theta)
    assert got[0] == theta[0] and torch.equal(got[11:], theta[11:] / s)


def test_yarn_attention_factor_scales_the_fixed_table():
    """transformers multiplies cos and sin by attention_factor: q and k both, logits by its square."""
    s = 16.0
    cos, sin = fixed_table(torch.arange(4), 32, 10000.0, RopeScaling(type="yarn", factor=s, original_max_len=64))
    assert cos[0].tolist() == pytest.approx([0.1 * math.log(s) + 1] * 32)
    assert torch.all(cos.pow(2) + sin.pow(2) - (0.1 * math.log(s) + 1) ** 2 < 1e-5)
