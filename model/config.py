"""Model settings: plain dataclasses, each field's type, default and description (the attribute
docstring under it) declared once; their checks run on construction.

Read from YAML or `--set` they are validated by pydantic (`bifocal.core.settings.build`: unknown
keys, types, one-line errors); built in Python (or from an export's config.json, which must load
without bifocal and without pydantic) they take nested sections as mappings too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from bifocal.core.config import SETTINGS, check

from .schemes import SCALINGS, SCHEMES, scheme as scheme_entry

SPECTRAL_PARAMETERS = ("omega", "amplitude", "phase")
SPECTRAL_INITS = ("rope", "fit")


@dataclass
class RopeScaling:
    """Context extension for fixed-frequency (RoPE) heads: training-free at evaluation (`bifocal eval
    ppl --rope-scaling`), or set in a run's config to fine-tune with it (PI and YaRN fine-tuning as
    in the YaRN paper, arXiv 2309.00071 section 4; `bifocal train --init-from RUN`).

    pi: positions divided by `factor`. ntk: base * factor^(d/(d-2)). dynamic_ntk: the NTK base
    recomputed from the current length, only beyond `original_max_len`. yarn: NTK-by-parts
    interpolation, ramped linearly over the pair index between the correction dims of
    `beta_fast`/`beta_slow` rotations, and attention temperature (0.1 ln s + 1)^2 on the logits.
    All four equal transformers' definitions (`linear`, `dynamic`, `yarn`); sources in
    model/schemes.py's SCALINGS and model/position/rope.py. Checks raise BifocalError.
    """

    __pydantic_config__ = SETTINGS
    type: str = "yarn"
    """pi | ntk | dynamic_ntk | yarn"""
    factor: float = 2.0
    """Context extension factor s (>= 1)."""
    original_max_len: int = 256
    """The length the model was trained at."""
    beta_fast: float = 32.0
    """yarn: rotations above which a pair keeps its frequency."""
    beta_slow: float = 1.0
    """yarn: rotations below which a pair is fully interpolated."""

    def __post_init__(self) -> None:
        check(self.type in SCALINGS, "type", self.type, f"one of {', '.join(SCALINGS)}")
        check(self.factor >= 1.0, "factor", self.factor, "must be >= 1")
        check(self.original_max_len > 0, "original_max_len", self.original_max_len, "must be > 0")


@dataclass
class PositionConfig:
    """`model.position`: the position scheme (model/schemes.py) and its settings. Checks on
    construction raise BifocalError naming the field; `rope_scaling` may be given as a mapping."""

    __pydantic_config__ = SETTINGS
    scheme: str = "bifocal"
    """rope | bifocal | spectral | pope | nope (model/schemes.py)."""
    rope_base: float = 10000.0
    """RoPE base: theta_i = rope_base^(-2i/d)."""
    spectral_heads: int | None = None
    """bifocal: spectral heads per layer, the last ones (null: half)."""
    phase_init_std: float = 1e-3
    """Std of the spectral heads' initial phase Phi."""
    spectral_lr_mult: float = 1.0
    """Learning-rate multiplier of the position parameters (spectral heads' Omega, A, Phi; PoPE's delta)."""
    omega_param: str = "offset"
    """How Omega is learned: offset (Omega = theta + d: Adam moves every pair by similar absolute
    amounts, so low frequencies change by large factors) | log (Omega = theta * e^s: relative)."""
    learn: list[str] = field(default_factory=lambda: list(SPECTRAL_PARAMETERS))
    """Which of omega, amplitude, phase train; the rest stay at their init ([] with phase_init_std 0
    is RoPE exactly)."""
    spectral_init: str = "rope"
    """Omega's start: rope (theta_i of spectral_rope_base) | fit (log-spaced from 1 rad/token down
    to 2 pi / max_seq_len: every wavelength fits in the training length)."""
    spectral_rope_base: float | None = None
    """spectral_init rope: the base of Omega's start (null: rope_base)."""
    rope_scaling: RopeScaling | None = None
    """Extension of the fixed-frequency heads: {type, factor, original_max_len, ...}; in a run's config
    it is used in training too (context extension), else set at evaluation."""

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
            self.rope_scaling = RopeScaling(**self.rope_scaling)


@dataclass
class GPTConfig:
    """`model`: the GPT's sizes and settings. Construction fills the nulls (n_kv_head, d_ff,
    position.spectral_heads) and raises BifocalError naming the first field that is invalid or
    inconsistent (head_dim odd, n_kv_head not dividing n_head, ...); `position` may be a mapping."""

    __pydantic_config__ = SETTINGS
    vocab_size: int = 8192
    """Vocabulary size (default: the tokenizer's)."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Query heads per layer."""
    n_kv_head: int | None = None
    """Key/value heads per layer, grouped-query attention (null: n_head)."""
    d_model: int = 256
    """Residual width."""
    d_ff: int | None = None
    """SwiGLU hidden size (null: 8/3 d_model rounded up to a multiple of 32)."""
    max_seq_len: int = 256
    """The training context length: tokens per training window, rope_scaling's default original length."""
    dropout: float = 0.0
    """Dropout on the residual stream and attention."""
    tie_embeddings: bool = True
    """Share the input embedding and the output head."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal weight init (residual outputs: / sqrt(2 n_layer))."""
    position: PositionConfig = field(default_factory=PositionConfig)
    """The position scheme and its settings."""

    def __post_init__(self) -> None:
        if isinstance(self.position, Mapping):
            self.position = PositionConfig(**self.position)
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
        if scheme_entry(pos.scheme).spectral == "some":
            if pos.spectral_heads is None:
                pos.spectral_heads = self.n_head // 2
            check(0 <= pos.spectral_heads <= self.n_head, "position.spectral_heads", pos.spectral_heads,
                  f"must be in [0, n_head={self.n_head}]")
            group = self.n_head // self.n_kv_head
            check(pos.spectral_heads % group == 0, "position.spectral_heads", pos.spectral_heads,
                  f"must be a multiple of the GQA group size n_head/n_kv_head={group}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head, d_model / n_head."""
        return self.d_model // self.n_head

    @property
    def n_spectral_heads(self) -> int:
        """Spectral (learned-frequency) query heads per layer."""
        spectral = scheme_entry(self.position.scheme).spectral
        return self.n_head if spectral == "all" else int(self.position.spectral_heads or 0) if spectral == "some" else 0

    @property
    def n_fixed_heads(self) -> int:
        """Query heads per layer that rotate by RoPE's fixed frequencies (what rope_scaling scales)."""
        return self.n_head - self.n_spectral_heads if scheme_entry(self.position.scheme).fixed else 0

    def to_dict(self) -> dict[str, Any]:
        """The settings as nested plain dicts (`dataclasses.asdict`)."""
        return dataclasses.asdict(self)
