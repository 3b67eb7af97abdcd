"""Fixed-frequency rotary embeddings (RoPE) and their training-free eval-time extensions.

RoPE: Su et al., RoFormer, arXiv 2104.09864 (frequencies §3.2.2, the cos/sin form of the rotation
§3.4). Convention: the rotary pair `i` is the dimensions (i, i + d/2) ("rotate_half", as in
GPT-NeoX and Llama) rather than the paper's (2i, 2i+1), so a rope model's weights load unchanged
into `transformers`' LlamaForCausalLM. The scalings equal `transformers.modeling_rope_utils`'
`_compute_linear_scaling_rope_parameters`, `_compute_dynamic_ntk_parameters` and
`_compute_yarn_parameters`; ntk is default RoPE with a larger theta (`LlamaRotaryEmbedding.
compute_default_rope_parameters`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import RopeScaling


def rope_inv_freq(head_dim: int, base: float, device: torch.device | None = None) -> Tensor:
    """theta_i = base^(-2i/d) for i in [0, d/2), d = head_dim: the RoPE frequencies (arXiv
    2104.09864 §3.2.2), (d/2,) float32, radians per token."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (base ** exponent)


def rotate_half(x: Tensor) -> Tensor:
    """(..., d) -> (..., d): [-x2, x1] for the halves x1, x2 of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (i, i+d/2) of `x` (..., T, d) by the angles whose cos/sin (..., T, d) are given
    (rotate_half layout, broadcast): x cos + rotate_half(x) sin (arXiv 2104.09864 §3.4)."""
    return x * cos + rotate_half(x) * sin


def angles_to_table(angles: Tensor) -> tuple[Tensor, Tensor]:
    """(..., T, d/2) angles in radians -> (..., T, d) cos and sin tables in rotate_half layout."""
    full = torch.cat((angles, angles), dim=-1)
    return full.cos(), full.sin()


def yarn_correction_range(head_dim: int, base: float, original_max_len: int, beta_fast: float,
                          beta_slow: float) -> tuple[float, float]:
    """The pair indices (low, high) between which YaRN's ramp runs, as in transformers/vLLM and the
    YaRN reference code: pair i makes r_i = L / lambda_i rotations within the original context,
    i(r) = d ln(L / (2 pi r)) / (2 ln base) inverts that, and the bounds are i(beta_fast) floored
    and i(beta_slow) ceiled, clipped to [0, d - 1] (arXiv 2309.00071, "NTK-by-parts";
    transformers' `find_correction_range` in `_compute_yarn_parameters`, truncate=True). L:
    `original_max_len` in tokens."""
    def pair_of(rotations: float) -> float:
        return head_dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = math.floor(pair_of(beta_fast)), math.ceil(pair_of(beta_slow))
    return float(max(low, 0)), float(min(high, head_dim - 1))


def yarn_ramp(head_dim: int, base: float, original_max_len: int, beta_fast: float, beta_slow: float,
              device: torch.device | None = None) -> Tensor:
    """YaRN's per-pair weight gamma in [0, 1]: 1 keeps theta_i (pairs before `low`: many rotations
    within the original context), 0 interpolates fully (theta_i / s, pairs after `high`); linear in
    the pair index between the two. (head_dim/2,) float32 (transformers' `linear_ramp_factor`)."""
    low, high = yarn_correction_range(head_dim, base, original_max_len, beta_fast, beta_slow)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    index = torch.arange(head_dim // 2, dtype=torch.float32, device=device)
    return 1.0 - ((index - low) / (high - low)).clamp(0.0, 1.0)


def yarn_mscale(factor: float) -> float:
    """sqrt(1/t) = 0.1 ln(s) + 1 for factor s > 1, else 1 (arXiv 2309.00071's attention scaling;
    transformers' `get_mscale` in `_compute_yarn_parameters`), applied to both q and k (the cos/sin
    tables) so the logits scale by its square."""
    return 1.0 if factor <= 1.0 else 0.1 * math.log(factor) + 1.0


def scaled_inv_freq(head_dim: int, base: float, scaling: RopeScaling | None, seq_len: int,
                    device: torch.device | None = None) -> tuple[Tensor, float]:
    """(inv_freq (d/2,) float32 in radians per token, q/k magnitude scale) for a RoPE head under
    `scaling` at length `seq_len` (tokens, L; read by dynamic_ntk only). L0 = original_max_len.

    pi:          theta_i / s                        (Chen et al. 2023, arXiv 2306.15595)
    ntk:         base' = base * s^(d/(d-2))          ("NTK-aware", bloc97 2023; arXiv 2309.00071)
    dynamic_ntk: as ntk with s' = s*L/L0 - (s-1), only when L > L0 (unchanged within L0)
    yarn:        (1-gamma_i) theta_i/s + gamma_i theta_i, gamma linear in i between the correction
                 dims of beta_fast/beta_slow; q and k * (0.1 ln s + 1) (Peng et al. 2023, arXiv 2309.00071)
    Each equals transformers' `linear`, `dynamic` and `yarn` (tests/test_rope_scaling.py). Raises
    ValueError for an unknown scaling type.
    """
    if scaling is None:
        return rope_inv_freq(head_dim, base, device), 1.0
    s = float(scaling.factor)
    if scaling.type == "pi":
        return rope_inv_freq(head_dim, base, device) / s, 1.0
    if scaling.type == "ntk":
        return rope_inv_freq(head_dim, base * s ** (head_dim / (head_dim - 2)), device), 1.0
    if scaling.type == "dynamic_ntk":
        if seq_len <= scaling.original_max_len:
            return rope_inv_freq(head_dim, base, device), 1.0
        s_dyn = s * seq_len / scaling.original_max_len - (s - 1)
        return rope_inv_freq(head_dim, base * s_dyn ** (head_dim / (head_dim - 2)), device), 1.0
    if scaling.type == "yarn":
        inv_freq = rope_inv_freq(head_dim, base, device)
        gamma = yarn_ramp(head_dim, base, scaling.original_max_len, scaling.beta_fast, scaling.beta_slow, device)
        return (1 - gamma) * inv_freq / s + gamma * inv_freq, yarn_mscale(s)
    raise ValueError(f"unknown rope_scaling type {scaling.type!r}")


def fixed_table(positions: Tensor, head_dim: int, base: float, scaling: RopeScaling | None) -> tuple[Tensor, Tensor]:
    """(..., T, d) float32 cos/sin for fixed RoPE heads at integer `positions` (..., T), any length,
    scaling applied (yarn's magnitude scale included). Dynamic NTK takes the current length as the largest position + 1 (transformers'
    `dynamic` takes the longest sequence seen, which is the same for one forward)."""
    # Only dynamic NTK depends on the current length; reading it syncs a GPU, so only then.
    dynamic = scaling is not None and scaling.type == "dynamic_ntk" and positions.numel() > 0
    seq_len = int(positions.max().item()) + 1 if dynamic else 0
    inv_freq, mscale = scaled_inv_freq(head_dim, base, scaling, seq_len, positions.device)
    cos, sin = angles_to_table(positions.to(torch.float32)[..., None] * inv_freq)
    if mscale != 1.0:
        cos, sin = cos * mscale, sin * mscale
    return cos, sin
