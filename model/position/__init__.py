"""Position schemes: rope, spectral, bifocal, pope, nope (see base.PositionEncoding)."""

from __future__ import annotations

import torch

from ..config import GPTConfig
from .base import PositionContext, PositionEncoding
from .fixed import FixedRotary, NoPosition
from .pope import PolarPosition
from .rope import apply_rotary, fixed_table, rope_inv_freq, scaled_inv_freq
from .spectral import SpectralRotary

__all__ = [
    "PositionContext", "PositionEncoding", "FixedRotary", "NoPosition", "PolarPosition",
    "SpectralRotary", "build_position", "make_context", "apply_rotary", "fixed_table",
    "rope_inv_freq", "scaled_inv_freq",
]


def build_position(cfg: GPTConfig) -> PositionEncoding:
    """The per-layer position module for `cfg.position.scheme`."""
    scheme = cfg.position.scheme
    if scheme == "rope" or (scheme == "bifocal" and cfg.n_spectral_heads == 0):
        return FixedRotary()
    if scheme in ("spectral", "bifocal"):
        return SpectralRotary(cfg)
    if scheme == "pope":
        return PolarPosition(cfg)
    return NoPosition()


def make_context(cfg: GPTConfig, positions: torch.Tensor) -> PositionContext:
    """Per-forward tables shared by all layers: the fixed RoPE table when some head needs it."""
    ctx = PositionContext(positions=positions)
    if cfg.position.scheme == "rope" or (cfg.position.scheme == "bifocal" and cfg.n_spectral_heads < cfg.n_head):
        ctx.cos, ctx.sin = fixed_table(positions, cfg.head_dim, cfg.position.rope_base, cfg.position.rope_scaling)
    return ctx
