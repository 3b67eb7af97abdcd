"""Spectral-RoPE and bifocal attention as one rotation with a per-head frequency table.

Geometric heads (the first `n_head - spectral_heads`) use the fixed RoPE table; spectral heads
(the rest) rotate by a learnable frequency Omega (init theta, or see `position.spectral_init`), with a learnable amplitude A
(init 1) and phase Phi (init N(0, phase_init_std)).

Where A and Phi live matters. Rotating q by m*Omega + Phi and k by n*Omega + Phi gives
q.k ~ cos((m-n)*Omega): the phase cancels. Scaling both by A gives A^2, a per-pair gain.
So A and Phi act on the query side only: score_i = A_i * Re(q_i conj(k_i) e^{i((m-n)Omega_i + Phi_i)}),
which keeps every parameter in the score and the score a function of m - n alone. Omega must be
the same for q and k (relative position), so with grouped-query attention it lives per kv head
while A and Phi live per query head. The rotation itself is RoPE's (Su et al., arXiv 2104.09864
§3.4) with these tables; the rest is derived here (README, "The idea").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import GPTConfig
from .base import PositionContext, PositionEncoding
from .rope import angles_to_table, apply_rotary, rope_inv_freq


def spectral_init_freq(cfg: GPTConfig, device: torch.device | None = None) -> Tensor:
    """The frequencies the spectral heads start from, (d/2,) float32 in radians per token, per
    `position.spectral_init`: "rope" = theta_i for spectral_rope_base (or rope_base); "fit" =
    log-spaced from 1 rad/token down to 2 pi / max_seq_len (every wavelength <= training length)."""
    pos, half = cfg.position, cfg.head_dim // 2
    if pos.spectral_init == "fit":
        slowest = 2 * math.pi / cfg.max_seq_len
        exponent = torch.arange(half, dtype=torch.float32, device=device) / max(half - 1, 1)
        return slowest ** exponent
    base = pos.rope_base if pos.spectral_rope_base is None else pos.spectral_rope_base
    return rope_inv_freq(cfg.head_dim, base, device)


class SpectralRotary(PositionEncoding):
    """Per-layer rotation: fixed rows for geometric heads, learned rows for spectral heads.

    scheme `spectral` is the case spectral_heads == n_head; `rope` is spectral_heads == 0
    (GPT builds a plain `FixedRotary` for that, but this module gives the same numbers).
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.group = cfg.n_head // cfg.n_kv_head
        self.n_spectral = cfg.n_spectral_heads
        self.n_spectral_kv = self.n_spectral // self.group
        half = cfg.head_dim // 2
        self.cfg = cfg
        # Omega = theta + omega_delta (or theta * exp(omega_log_scale)). theta is recomputed in fp32
        # each forward; storing Omega itself would let a bf16 engine round it by ~0.2% (radians of
        # error at long range), while a small offset or log-scale survives bf16 well. The offset's
        # gradient is exactly dL/dOmega; the log-scale makes Adam's steps relative to theta.
        self.log_omega = cfg.position.omega_param == "log"
        name = "omega_log_scale" if self.log_omega else "omega_delta"
        self.register_parameter(name, nn.Parameter(torch.zeros(self.n_spectral_kv, half)))
        self.amplitude = nn.Parameter(torch.ones(self.n_spectral, half))
        self.phase = nn.Parameter(torch.randn(self.n_spectral, half) * cfg.position.phase_init_std)
        learn = set(cfg.position.learn)
        for kind, param in (("omega", getattr(self, name)), ("amplitude", self.amplitude), ("phase", self.phase)):
            param.requires_grad_(kind in learn)  # frozen ones stay at their init (no optimizer group)

    def omega_init(self, device: torch.device | None = None) -> Tensor:
        """Omega at initialisation, (d/2,) float32, radians per token (see spectral_init_freq)."""
        return spectral_init_freq(self.cfg, device)

    @property
    def omega(self) -> Tensor:
        """The learned frequencies Omega, (spectral kv heads, d/2) float32, radians per token."""
        if self.log_omega:
            s = self.omega_log_scale.float()
            return self.omega_init(s.device)[None, :] * torch.exp(s)
        d = self.omega_delta.float()
        return self.omega_init(d.device)[None, :] + d

    def forward(self, q: Tensor, k: Tensor, ctx: PositionContext) -> tuple[Tensor, Tensor]:
        """q (B, n_head, T, d), k (B, n_kv_head, T, d) at ctx.positions (B or 1, T) -> rotated q, k,
        same shapes and dtypes (tables computed in float32)."""
        pos = ctx.positions.to(torch.float32)
        omega = self.omega
        k_angles = pos[:, None, :, None] * omega[None, :, None, :]              # (B, Hs_kv, T, d/2)
        q_angles = k_angles.repeat_interleave(self.group, dim=1) + self.phase.float()[None, :, None, :]
        k_cos, k_sin = angles_to_table(k_angles)
        q_cos, q_sin = angles_to_table(q_angles)
        amp = torch.cat((self.amplitude, self.amplitude), dim=-1).float()[None, :, None, :]
        q_cos, q_sin = q_cos * amp, q_sin * amp
        n_geo, n_geo_kv = self.n_head - self.n_spectral, self.n_kv_head - self.n_spectral_kv
        q_cos, q_sin = self._with_fixed(ctx, q_cos, q_sin, n_geo)
        k_cos, k_sin = self._with_fixed(ctx, k_cos, k_sin, n_geo_kv)
        return apply_rotary(q, q_cos.to(q.dtype), q_sin.to(q.dtype)), apply_rotary(k, k_cos.to(k.dtype), k_sin.to(k.dtype))

    @staticmethod
    def _with_fixed(ctx: PositionContext, cos: Tensor, sin: Tensor, n_fixed: int) -> tuple[Tensor, Tensor]:
        """Prepend the shared fixed table for the geometric heads: one (B, H, T, d) table in all."""
        if n_fixed == 0:
            return cos, sin
        shape = (cos.shape[0], n_fixed, *ctx.cos.shape[2:])
        return torch.cat((ctx.cos.expand(shape), cos), dim=1), torch.cat((ctx.sin.expand(shape), sin), dim=1)
