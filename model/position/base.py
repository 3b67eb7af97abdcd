"""The one interface every position scheme implements.

A scheme turns per-head queries (B, n_head, T, d) and keys (B, n_kv_head, T, d) at integer
positions (B, T), given per token by the caller (torchtitan's and OLMo-core's convention: packed
documents may restart at 0, a sequence-parallel shard starts at its offset, a cache continues from
its length), into the tensors that go straight into `scaled_dot_product_attention`. Tables that do
not depend on the layer (the fixed RoPE cos/sin) are built once per forward in a PositionContext
shared by all layers, from positions computed on the fly: any length works, nothing is cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn


@dataclass
class PositionContext:
    """What every layer's position module reads in one forward (built by `make_context`); positions
    given as (T,) become (1, T)."""

    positions: Tensor          # (B, T) int64 position of every token (B may be 1: shared by all rows)
    cos: Tensor | None = None  # (B, 1, T, d) fixed RoPE table, float32, eval-time scaling applied
    sin: Tensor | None = None
    # Sequence parallel, for schemes that rotate after the all-to-all (`widens`): the whole sequence's
    # positions (B, N*T), and this rank's share of the key/value heads.
    sequence_positions: Tensor | None = None
    kv_heads: slice = field(default_factory=lambda: slice(None))

    def __post_init__(self) -> None:
        if self.positions.dim() == 1:  # (T,): the same positions for every row
            self.positions = self.positions[None]


class PositionEncoding(nn.Module):
    """A position scheme: forward(q, k, ctx) -> (q, k) ready for `scaled_dot_product_attention`.
    Keys may come out wider than values (PoPE); that is fine."""

    # True when q and k come out wider than they go in (PoPE: 2d): under sequence parallelism such a
    # scheme rotates after the all-to-all, which then moves d-wide q and k instead of 2d-wide ones.
    widens = False

    def rotate_heads(self, q: Tensor, k: Tensor, ctx: PositionContext) -> tuple[Tensor, Tensor]:
        """Rotate the whole sequence of a head shard: q (B, n_head/N, N*T, d), k (B, n_kv_head/N,
        N*T, d), the heads of `ctx.kv_heads`, at `ctx.sequence_positions`. Only `widens` schemes;
        the others raise NotImplementedError."""
        raise NotImplementedError

    def forward(self, q: Tensor, k: Tensor, ctx: PositionContext) -> tuple[Tensor, Tensor]:
        """q (B, n_head, T, d), k (B, n_kv_head, T, d) at `ctx.positions` (B or 1, T) -> the q and k
        that go into attention, in q's and k's dtypes (width d, or 2d for `widens` schemes).
        Every scheme overrides it."""
        raise NotImplementedError
