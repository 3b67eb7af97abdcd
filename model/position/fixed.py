"""`rope` and `nope`: the schemes with no parameters."""

from __future__ import annotations

from torch import Tensor

from .base import PositionContext, PositionEncoding
from .rope import apply_rotary


class FixedRotary(PositionEncoding):
    """Standard RoPE on every head (Su et al., arXiv 2104.09864, §3.4), from the shared fixed table
    (eval-time scaling included)."""

    def forward(self, q: Tensor, k: Tensor, ctx: PositionContext) -> tuple[Tensor, Tensor]:
        """q (B, n_head, T, d), k (B, n_kv_head, T, d) rotated by `ctx.cos`/`ctx.sin`; shapes and
        dtypes unchanged."""
        cos, sin = ctx.cos.to(q.dtype), ctx.sin.to(q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class NoPosition(PositionEncoding):
    """NoPE: the causal mask alone carries order. A control."""

    def __init__(self, cfg: object = None) -> None:
        super().__init__()

    def forward(self, q: Tensor, k: Tensor, ctx: PositionContext) -> tuple[Tensor, Tensor]:
        """q and k unchanged."""
        return q, k
