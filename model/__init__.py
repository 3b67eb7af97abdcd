"""bifocal.model: the GPT with bifocal attention and its position schemes. Imports nothing else
of the project."""

from .config import ConfigError, GPTConfig, PositionConfig, RopeScaling, from_dict
from .gpt import GPT, KVCache

__all__ = ["GPT", "GPTConfig", "PositionConfig", "RopeScaling", "KVCache", "ConfigError", "from_dict"]
