"""Position schemes: rope, spectral, bifocal, pope, nope (see base.PositionEncoding)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import GPTConfig
from ..schemes import scheme
from .base import PositionContext, PositionEncoding
from .fixed import FixedRotary, NoPosition
from .pope import PolarPosition
from .rope import apply_rotary, fixed_table, rope_inv_freq, scaled_inv_freq
from .spectral import SpectralRotary, spectral_init_freq

__all__ = [
    "PositionContext", "PositionEncoding", "FixedRotary", "NoPosition", "PolarPosition",
    "SpectralRotary", "build_position", "make_context", "position_parameters", "apply_rotary", "fixed_table",
    "rope_inv_freq", "scaled_inv_freq", "spectral_init_freq",
]


# The classes registry entries name (model/schemes.py `Scheme.module`).
MODULES: dict[str, type[PositionEncoding]] = {c.__name__: c for c in (FixedRotary, SpectralRotary, PolarPosition,
                                                                      NoPosition)}


def build_position(cfg: GPTConfig) -> PositionEncoding:
    """The per-layer position module: SpectralRotary when the layer has spectral heads (bifocal's
    fixed heads share its table), FixedRotary when every head is fixed RoPE, otherwise the class
    the scheme's registry entry names."""
    if cfg.n_spectral_heads:
        return SpectralRotary(cfg)
    if cfg.n_fixed_heads:
        return FixedRotary()
    return MODULES[scheme(cfg.position.scheme).module](cfg)


def make_context(cfg: GPTConfig, positions: torch.Tensor) -> PositionContext:
    """Per-forward tables shared by all layers: the fixed RoPE table when some head needs it.

    `positions`: (T,) or (B, T) integer positions of the tokens; (T,) means the same for every row.
    The context holds them as (B, T) and the table as (B, 1, T, head_dim), broadcast over heads."""
    ctx = PositionContext(positions=positions)
    if cfg.n_fixed_heads:
        cos, sin = fixed_table(ctx.positions, cfg.head_dim, cfg.position.rope_base, cfg.position.rope_scaling)
        ctx.cos, ctx.sin = cos[:, None], sin[:, None]
    return ctx


def position_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The learned parameters of every position module inside `module`, by full name: Omega, A and
    Phi of spectral heads, PoPE's delta. They get no weight decay and their own learning rate
    (GPT.param_groups), and training snapshots them (bifocal.run.metrics.spectral_snapshot).
    Works on a GPT and on a spectralized Hugging Face model alike."""
    found: dict[str, nn.Parameter] = {}
    for name, sub in module.named_modules():
        if isinstance(sub, PositionEncoding):
            found.update(sub.named_parameters(prefix=name))
    return found
