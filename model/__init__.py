"""bifocal.model: the GPT with bifocal attention and its position schemes. Imports nothing of the
project but `bifocal.core`. `GPT` and `KVCache` load torch on first use, so the registry
(`bifocal.model.schemes`) and the settings (`bifocal.model.config`) stay cheap to import."""

from .config import GPTConfig, PositionConfig, RopeScaling

__all__ = ["GPT", "GPTConfig", "PositionConfig", "RopeScaling", "KVCache"]


def __getattr__(name: str):
    if name in ("GPT", "KVCache"):
        from . import gpt

        return getattr(gpt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
