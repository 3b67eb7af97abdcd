"""bifocal.model: the GPT with bifocal attention and its position schemes. Imports nothing of the
project but `bifocal.core`."""

from .config import GPTConfig, PositionConfig, RopeScaling
from .gpt import GPT, KVCache

__all__ = ["GPT", "GPTConfig", "PositionConfig", "RopeScaling", "KVCache"]
