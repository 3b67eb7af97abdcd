"""Model configuration: dataclasses validated on construction, strict when read from YAML."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

SCHEMES = ("rope", "spectral", "bifocal", "pope", "nope")
SPECTRAL_PARAMETERS = ("omega", "amplitude", "phase")
SPECTRAL_INITS = ("rope", "fit")
ROPE_SCALING_TYPES = ("pi", "ntk", "dynamic_ntk", "yarn")


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key, the value and what is allowed."""


T = TypeVar("T")


def nearest(name: str, valid: list[str] | tuple[str, ...]) -> str:
    """' (did you mean `x`?)' for the closest valid name, or a list of what is allowed."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    if close:
        return f"did you mean `{close[0]}`?"
    return "valid keys: " + ", ".join(sorted(valid))


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with the nearest valid one.

    A class declares nested dataclass fields in `__nested__` ({"field": Cls} or {"field": [Cls]}
    for a list); they are built recursively, so `where` grows into a dotted path (e.g.
    `model.position.scheme`) for error messages.
    """
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"`{where or cls.__name__}` must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key `{path}`: {nearest(str(key), list(fields))}")
        sub = getattr(cls, "__nested__", {}).get(key)
        if isinstance(sub, list) and value is not None:  # `[Cls]` declares a list of Cls
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"`{path}` must be a list, got {type(value).__name__}")
            value = [from_dict(sub[0], item, f"{path}[{i}]") for i, item in enumerate(value)]
        elif sub is not None and value is not None:
            value = from_dict(sub, value, path)
        else:
            value = _coerce(value, hints.get(key), path)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if where and not str(exc).startswith(where):
            raise ConfigError(f"{where}.{exc}") from None
        raise
    except (TypeError, ValueError, OverflowError) as exc:  # a check met a value of a type it did not expect
        raise ConfigError(f"`{where or cls.__name__}` is invalid: {str(exc).splitlines()[0]}") from None


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check a scalar against its annotation; YAML reads `1e-3` as a string, so numbers given
    as strings are converted when they parse."""
    if hint is None or value is None:
        return value
    if typing.get_origin(hint) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} is invalid: must be a list, e.g. [{value!r}]")
        (item,) = typing.get_args(hint) or (None,)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is dict or typing.get_origin(hint) is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}={value!r} is invalid: must be a mapping")
        return value
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    scalars = [t for t in options if t in (bool, int, float, str)]
    if not scalars or any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in scalars):
        if float in scalars and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    for t in scalars:
        if t in (int, float) and isinstance(value, str):
            try:
                return t(float(value)) if t is float else int(value)
            except ValueError:
                continue
    if float in scalars and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    allowed = " or ".join(t.__name__ for t in scalars)
    raise ConfigError(f"{path}={value!r} is invalid: must be {allowed}")


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


@dataclass
class RopeScaling:
    """Training-free context extension for fixed-frequency (RoPE) heads, applied at evaluation.

    pi: positions divided by `factor`. ntk: base * factor^(d/(d-2)). dynamic_ntk: the NTK base
    recomputed from the current length, only beyond `original_max_len`. yarn: NTK-by-parts
    interpolation, ramped linearly over the pair index between the correction dims of
    `beta_fast`/`beta_slow` rotations, and attention temperature (0.1 ln s + 1)^2 on the logits.
    All four equal transformers' definitions (`linear`, `dynamic`, `yarn`).
    """

    type: str = "yarn"
    factor: float = 2.0
    original_max_len: int = 256
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self) -> None:
        _check(self.type in ROPE_SCALING_TYPES, "type", self.type, f"one of {', '.join(ROPE_SCALING_TYPES)}")
        _check(self.factor >= 1.0, "factor", self.factor, "must be >= 1")
        _check(self.original_max_len > 0, "original_max_len", self.original_max_len, "must be > 0")


@dataclass
class PositionConfig:
    scheme: str = "bifocal"
    rope_base: float = 10000.0
    # bifocal: how many heads per layer are spectral (the last ones); None means half.
    spectral_heads: int | None = None
    phase_init_std: float = 1e-3
    spectral_lr_mult: float = 1.0
    # How Omega is learned: "offset" (Omega = theta + d, Adam moves every pair by similar absolute
    # amounts, so low frequencies change by large factors) or "log" (Omega = theta * e^s: relative).
    omega_param: str = "offset"
    # Ablations of the spectral heads. `learn`: which of Omega, A, Phi train (the rest stay at
    # their init; [] with phase_init_std 0 is RoPE exactly). `spectral_init`: Omega's start, "rope"
    # (theta_i = spectral_rope_base^(-2i/d), the base defaulting to rope_base) or "fit" (log-spaced
    # from 1 rad/token down to 2 pi / max_seq_len, so every wavelength fits in the training length
    # and no pair meets an angle beyond it that it never saw in training).
    learn: list[str] = field(default_factory=lambda: list(SPECTRAL_PARAMETERS))
    spectral_init: str = "rope"
    spectral_rope_base: float | None = None
    rope_scaling: RopeScaling | None = None

    __nested__ = {"rope_scaling": RopeScaling}

    def __post_init__(self) -> None:
        _check(self.scheme in SCHEMES, "scheme", self.scheme, f"one of {', '.join(SCHEMES)}")
        _check(self.rope_base > 1.0, "rope_base", self.rope_base, "must be > 1")
        _check(self.phase_init_std >= 0, "phase_init_std", self.phase_init_std, "must be >= 0")
        _check(self.spectral_lr_mult > 0, "spectral_lr_mult", self.spectral_lr_mult, "must be > 0")
        _check(self.omega_param in ("offset", "log"), "omega_param", self.omega_param, "one of offset, log")
        _check(isinstance(self.learn, (list, tuple)) and all(x in SPECTRAL_PARAMETERS for x in self.learn)
               and len(set(self.learn)) == len(self.learn), "learn", self.learn,
               f"a list of distinct names from {', '.join(SPECTRAL_PARAMETERS)} (may be empty)")
        self.learn = list(self.learn)
        _check(self.spectral_init in SPECTRAL_INITS, "spectral_init", self.spectral_init, f"one of {', '.join(SPECTRAL_INITS)}")
        if self.spectral_rope_base is not None:
            _check(self.spectral_rope_base > 1.0, "spectral_rope_base", self.spectral_rope_base, "must be > 1")
            _check(self.spectral_init == "rope", "spectral_rope_base", self.spectral_rope_base,
                   f"only applies to spectral_init: rope (got spectral_init: {self.spectral_init})")
        if isinstance(self.rope_scaling, Mapping):
            self.rope_scaling = from_dict(RopeScaling, self.rope_scaling, "rope_scaling")


@dataclass
class GPTConfig:
    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention; None means n_head
    d_model: int = 256
    d_ff: int | None = None  # SwiGLU hidden size; None means 8/3 d_model rounded up to 32
    max_seq_len: int = 256  # the training length (for reporting and rope_scaling defaults)
    dropout: float = 0.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
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
            _check(int(getattr(self, key)) > 0, key, getattr(self, key), "must be a positive integer")
        _check(self.d_model % self.n_head == 0, "n_head", self.n_head, f"must divide d_model={self.d_model}")
        _check(self.head_dim % 2 == 0, "d_model", self.d_model, f"d_model/n_head={self.head_dim} must be even for rotary pairs")
        _check(self.n_head % self.n_kv_head == 0, "n_kv_head", self.n_kv_head, f"must divide n_head={self.n_head}")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        pos = self.position
        if pos.scheme == "bifocal":
            if pos.spectral_heads is None:
                pos.spectral_heads = self.n_head // 2
            _check(0 <= pos.spectral_heads <= self.n_head, "position.spectral_heads", pos.spectral_heads,
                   f"must be in [0, n_head={self.n_head}]")
            group = self.n_head // self.n_kv_head
            _check(pos.spectral_heads % group == 0, "position.spectral_heads", pos.spectral_heads,
                   f"must be a multiple of the GQA group size n_head/n_kv_head={group}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

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
