"""PoPE: Polar Coordinate Position Embeddings (Gopalakrishnan et al., arXiv 2509.10534).

Each of the d components c of a head becomes a complex number with magnitude softplus(x_c) and
phase position * theta_c (d frequencies, theta_c = base^(-c/d)); keys add a learnable phase bias
delta_c in [-2pi, 0]. The attention logit is Re sum_c mu_q mu_k e^{i((m-n) theta_c - delta_c)}.
Its real part is one dot product of 2d-wide real vectors [mu cos, mu sin], so SDPA still serves;
the caller passes the softmax scale 1/sqrt(d) explicitly since the width doubled.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import GPTConfig
from .base import PositionContext, PositionEncoding


def pope_freqs(head_dim: int, base: float, device: torch.device | None = None) -> Tensor:
    """PoPE's frequencies theta_c = base^(-c/d) for c in [0, d), d = head_dim: (d,) float32,
    radians per token (one per component, where RoPE has one per pair)."""
    return 1.0 / (base ** (torch.arange(head_dim, dtype=torch.float32, device=device) / head_dim))


class PolarPosition(PositionEncoding):
    """PoPE (arXiv 2509.10534; see the module doc): q and k of width d become 2d-wide [mu cos, mu sin]
    vectors; the learnable key phase bias `delta` is (n_kv_head, d), clamped to [-2 pi, 0]."""

    widens = True

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.head_dim, self.base = cfg.head_dim, cfg.position.rope_base
        self.delta = nn.Parameter(torch.zeros(cfg.n_kv_head, cfg.head_dim))

    def forward(self, q: Tensor, k: Tensor, ctx: PositionContext) -> tuple[Tensor, Tensor]:
        """q (B, n_head, T, d), k (B, n_kv_head, T, d) at `ctx.positions` -> q (B, n_head, T, 2d),
        k (B, n_kv_head, T, 2d), in q's and k's dtypes (computed in float32)."""
        return self._rotate(q, k, ctx.positions, self.delta)

    def rotate_heads(self, q: Tensor, k: Tensor, ctx: PositionContext) -> tuple[Tensor, Tensor]:
        """`forward` for a head shard under sequence parallelism (see `PositionEncoding.rotate_heads`):
        the whole sequence's positions and this rank's `ctx.kv_heads` rows of delta; widths double."""
        # Each rank's delta slice gets its part of the gradient; DeepSpeed sums them over the group.
        return self._rotate(q, k, ctx.sequence_positions, self.delta[ctx.kv_heads])

    def _rotate(self, q: Tensor, k: Tensor, positions: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        theta = pope_freqs(self.head_dim, self.base, q.device)
        angles = positions.to(torch.float32)[:, None, :, None] * theta                 # (B, 1, T, d)
        delta = delta.float().clamp(-2 * math.pi, 0.0)[None, :, None, :]               # (1, Hkv, 1, d)
        k_angles = angles + delta
        q = self._polar(q, angles.cos(), angles.sin())
        k = self._polar(k, k_angles.cos(), k_angles.sin())
        return q, k

    @staticmethod
    def _polar(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        mu = F.softplus(x.float())
        return torch.cat((mu * cos, mu * sin), dim=-1).to(x.dtype)
