"""Remote code for spectralized Llama-family models: the stock transformers class, with bifocal
attention re-applied in `__init__` from `config.bifocal_surgery` before the weights (learned
Omega/A/Phi included) are loaded. Shipped by `CausalLMAdapter.save_hf` with the flattened
sources of `spectral_attention.py` and the position modules it uses.
"""

from __future__ import annotations

from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from .compat import require_transformers
from .spectral_attention import SURGERY_KEY, apply_surgery

require_transformers()


def _spectralize_from_config(model) -> None:
    apply_surgery(model, **getattr(model.config, SURGERY_KEY))


class SpectralLlamaForCausalLM(LlamaForCausalLM):
    """`LlamaForCausalLM` with bifocal attention applied from `config.bifocal_surgery`."""

    def __init__(self, config) -> None:
        super().__init__(config)
        _spectralize_from_config(self)


class SpectralMistralForCausalLM(MistralForCausalLM):
    """`MistralForCausalLM` with bifocal attention applied from `config.bifocal_surgery`."""

    def __init__(self, config) -> None:
        super().__init__(config)
        _spectralize_from_config(self)


class SpectralQwen2ForCausalLM(Qwen2ForCausalLM):
    """`Qwen2ForCausalLM` with bifocal attention applied from `config.bifocal_surgery`."""

    def __init__(self, config) -> None:
        super().__init__(config)
        _spectralize_from_config(self)


# transformers base class name -> the class above (what `auto_map` points to)
CLASSES = {"LlamaForCausalLM": "SpectralLlamaForCausalLM", "MistralForCausalLM": "SpectralMistralForCausalLM",
           "Qwen2ForCausalLM": "SpectralQwen2ForCausalLM"}
