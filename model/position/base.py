"""The one interface every position scheme implements.

A scheme turns per-head queries (B, n_head, T, d) and keys (B, n_kv_head, T, d) at integer
positions into the tensors that go straight into `scaled_dot_product_attention`. Tables that do
not depend on the layer (the fixed RoPE cos/sin) are built once per forward in a PositionContext
shared by all layers, from positions computed on the fly: any length works, nothing is cached.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class PositionContext:
    positions: Tensor          # (T,) int64 absolute positions of the tokens in this forward
    cos: Tensor | None = None  # (T, d) fixed RoPE table, float32, eval-time scaling applied
    sin: Tensor | None = None


class PositionEncoding(nn.Module):
    """rotate(q, k, ctx) -> (q, k). Keys may come out wider than values (PoPE); that is fine."""

    def forward(self, q: Tensor, k: Tensor, ctx: PositionContext) -> tuple[Tensor, Tensor]:
        raise NotImplementedError
