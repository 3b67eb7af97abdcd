"""Model configuration: dataclasses validated on construction, strict when read from YAML."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from bifocal.core.config import check, from_dict

SCHEMES = ("rope", "spectral", "bifocal", "pope", "nope")
SPECTRAL_PARAMETERS = ("omega", "amplitude", "phase")
SPECTRAL_INITS = ("rope", "fit")
ROPE_SCALING_TYPES = ("pi", "ntk", "dynamic_ntk", "yarn")


@dataclass
class RopeScaling:
    """Training-free context extension for fixed-frequency (RoPE) heads, applied at evaluation.

    pi: positions divided by `factor`. ntk: base * factor^(d/(d-2)). dynamic_ntk: the NTK base
    recomputed from the current length, only beyond `original_max_len`. yarn: NTK-by-parts
    interpolation, ramped linearly over the pair index between the correction dims of
    `beta_fast`/`beta_slow` rotations, and attention temperature (0.1 ln s + 1)^2 on the logits.
    All four equal transformers' definitions (`linear`, `dynamic`, `yarn`).
    """

    type: str = "yarn"  # pi | ntk | dynamic_ntk | yarn
    factor: float = 2.0  # context extension factor s (>= 1)
    original_max_len: int = 256  # the length the model was trained at
    beta_fast: float = 32.0  # yarn: rotations above which a pair keeps its frequency
    beta_slow: float = 1.0  # yarn: rotations below which a pair is fully interpolated

    def __post_init__(self) -> None:
        check(self.type in ROPE_SCALING_TYPES, "type", self.type, f"one of {', '.join(ROPE_SCALING_TYPES)}")
        check(self.factor >= 1.0, "factor", self.factor, "must be >= 1")
        check(self.original_max_len > 0, "original_max_len", self.original_max_len, "must be > 0")


@dataclass
class PositionConfig:
    scheme: str = "bifocal"  # rope | spectral | bifocal | pope | nope
    rope_base: float = 10000.0  # RoPE base: theta_i = rope_base^(-2i/d)
    # bifocal: how many heads per layer are spectral (the last ones); None means half.
    spectral_heads: int | None = None  # bifocal: spectral heads per layer, the last ones (null: half)
    phase_init_std: float = 1e-3  # std of the spectral heads' initial phase Phi
    spectral_lr_mult: float = 1.0  # learning-rate multiplier of the position parameters
    # How Omega is learned: "offset" (Omega = theta + d, Adam moves every pair by similar absolute
    # amounts, so low frequencies change by large factors) or "log" (Omega = theta * e^s: relative).
    omega_param: str = "offset"  # offset (Omega = theta + d) | log (Omega = theta * e^s)
    # Ablations of the spectral heads. `learn`: which of Omega, A, Phi train (the rest stay at
    # their init; [] with phase_init_std 0 is RoPE exactly). `spectral_init`: Omega's start, "rope"
    # (theta_i = spectral_rope_base^(-2i/d), the base defaulting to rope_base) or "fit" (log-spaced
    # from 1 rad/token down to 2 pi / max_seq_len, so every wavelength fits in the training length
    # and no pair meets an angle beyond it that it never saw in training).
    learn: list[str] = field(default_factory=lambda: list(SPECTRAL_PARAMETERS))  # which of Omega, A, Phi train
    spectral_init: str = "rope"  # Omega's start: rope (theta) | fit (wavelengths within max_seq_len)
    spectral_rope_base: float | None = None  # spectral_init rope: base of Omega's start (null: rope_base)
    rope_scaling: RopeScaling | None = None  # eval-time extension of fixed heads: {type, factor, ...}

    __nested__ = {"rope_scaling": RopeScaling}

    def __post_init__(self) -> None:
        check(self.scheme in SCHEMES, "scheme", self.scheme, f"one of {', '.join(SCHEMES)}")
        check(self.rope_base > 1.0, "rope_base", self.rope_base, "must be > 1")
        check(self.phase_init_std >= 0, "phase_init_std", self.phase_init_std, "must be >= 0")
        check(self.spectral_lr_mult > 0, "spectral_lr_mult", self.spectral_lr_mult, "must be > 0")
        check(self.omega_param in ("offset", "log"), "omega_param", self.omega_param, "one of offset, log")
        check(isinstance(self.learn, (list, tuple)) and all(x in SPECTRAL_PARAMETERS for x in self.learn)
              and len(set(self.learn)) == len(self.learn), "learn", self.learn,
              f"a list of distinct names from {', '.join(SPECTRAL_PARAMETERS)} (may be empty)")
        self.learn = list(self.learn)
        check(self.spectral_init in SPECTRAL_INITS, "spectral_init", self.spectral_init, f"one of {', '.join(SPECTRAL_INITS)}")
        if self.spectral_rope_base is not None:
            check(self.spectral_rope_base > 1.0, "spectral_rope_base", self.spectral_rope_base, "must be > 1")
            check(self.spectral_init == "rope", "spectral_rope_base", self.spectral_rope_base,
                  f"only applies to spectral_init: rope (got spectral_init: {self.spectral_init})")
        if isinstance(self.rope_scaling, Mapping):
            self.rope_scaling = from_dict(RopeScaling, self.rope_scaling, "rope_scaling")


@dataclass
class GPTConfig:
    vocab_size: int = 8192  # vocabulary size (default: the tokenizer's)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads per layer
    n_kv_head: int | None = None  # grouped-query attention; None means n_head
    d_model: int = 256  # residual width
    d_ff: int | None = None  # SwiGLU hidden size; None means 8/3 d_model rounded up to 32
    max_seq_len: int = 256  # the training context length: tokens per training window, rope_scaling's default original length
    dropout: float = 0.0  # dropout on the residual stream and attention
    tie_embeddings: bool = True  # share the input embedding and the output head
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float = 0.02  # std of the normal weight init (residual outputs / sqrt(2 n_layer))
    position: PositionConfig = field(default_factory=PositionConfig)

    __nested__ = {"position": PositionConfig}

    def __post_init__(self) -> None:
        if isinstance(self.position, Mapping):
            self.position = from_dict(PositionConfig, self.position, "position")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None:
            self.d_ff = 32 * math.ceil(8 * self.d_model / 3 / 32)
        for key in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_seq_len"):
            check(int(getattr(self, key)) > 0, key, getattr(self, key), "must be a positive integer")
        check(self.d_model % self.n_head == 0, "n_head", self.n_head, f"must divide d_model={self.d_model}")
        check(self.head_dim % 2 == 0, "d_model", self.d_model, f"d_model/n_head={self.head_dim} must be even for rotary pairs")
        check(self.n_head % self.n_kv_head == 0, "n_kv_head", self.n_kv_head, f"must divide n_head={self.n_head}")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        pos = self.position
        if pos.scheme == "bifocal":
            if pos.spectral_heads is None:
                pos.spectral_heads = self.n_head // 2
            check(0 <= pos.spectral_heads <= self.n_head, "position.spectral_heads", pos.spectral_heads,
                  f"must be in [0, n_head={self.n_head}]")
            group = self.n_head // self.n_kv_head
            check(pos.spectral_heads % group == 0, "position.spectral_heads", pos.spectral_heads,
                  f"must be a multiple of the GQA group size n_head/n_kv_head={group}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def n_fixed_heads(self) -> int:
        """Query heads per layer that rotate by RoPE's fixed frequencies (what rope_scaling scales)."""
        return self.n_head - self.n_spectral_heads if self.position.scheme in ("rope", "bifocal") else 0

    @property
    def n_spectral_heads(self) -> int:
        """Spectral (learned-frequency) query heads per layer."""
        scheme = self.position.scheme
        if scheme == "spectral":
            return self.n_head
        if scheme == "bifocal":
            return int(self.position.spectral_heads or 0)
        return 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "GPTConfig":
        return from_dict(cls, data, "model")
