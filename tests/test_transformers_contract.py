"""Every transformers internal the exported and surgery modeling code relies on, checked directly,
so the day a release changes one this fails with its name (the behaviour tests in
test_hf_generation.py and test_hf_downstream.py would fail too, less legibly)."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast,
                                           SequenceClassifierOutputWithPast)

from bifocal.model.hf import compat
from bifocal.model.hf.compat import cache_field, one_cache


def test_output_classes_carry_the_cache_under_a_name_we_read():
    want = "cache" if Version(transformers.__version__) >= Version("5.24.0") else "past_key_values"
    for cls in (BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutputWithPast):
        assert cache_field(cls) == want
    with pytest.raises(TypeError, match="no cache field"):
        from transformers.modeling_outputs import MaskedLMOutput

        cache_field(MaskedLMOutput)
    marker = object()
    assert one_cache(marker, None) is marker and one_cache(None, marker) is marker
    with pytest.raises(ValueError, match="not both"):
        one_cache(object(), object())


def test_generate_hands_the_cache_to_forward_under_a_name_we_accept():
    """Llama's forward names the cache the way this release's generate passes it; ours takes both."""
    names = set(inspect.signature(LlamaForCausalLM.forward).parameters)
    from bifocal.model.hf.modeling_bifocal import BifocalForCausalLM, BifocalModel

    assert names & {"cache", "past_key_values"}
    for cls in (BifocalModel, BifocalForCausalLM):
        assert {"cache", "past_key_values"} <= set(inspect.signature(cls.forward).parameters)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_what_surgery_reads_from_a_llama_family_attention(family):
    """spectral_attention.SpectralAttention copies these attributes and calls these functions."""
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    eager = getattr(module, "eager_attention_forward")
    params = inspect.signature(eager).parameters
    assert list(params)[:5] == ["module", "query", "key", "value", "attention_mask"]
    assert {"scaling", "dropout"} <= set(params)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert callable(ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", eager))
    config_cls = getattr(module, f"{'Qwen2' if family == 'qwen2' else family.capitalize()}Config")
    model_cls = getattr(module, f"{'Qwen2' if family == 'qwen2' else family.capitalize()}ForCausalLM")
    model = model_cls(config_cls(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1))
    attn = model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "scaling", "head_dim",
                 "num_key_value_groups", "attention_dropout", "config"):
        assert hasattr(attn, name), f"{family} attention lost `{name}`"
    assert isinstance(model.config._attn_implementation, str)
    # The decoder layer passes positions and the cache to self_attn by keyword.
    src = inspect.getsource(type(model.model.layers[0]).forward)
    assert "position_ids=position_ids" in src and ("cache=cache" in src or "past_key_values=past_key_values" in src)


def test_gradient_checkpointing_sets_the_flag_and_function_on_our_module():
    """BifocalModel carries `gradient_checkpointing`; transformers sets it and hands over
    `_gradient_checkpointing_func` (the documented way a custom model opts in)."""
    from bifocal.model.hf.configuration_bifocal import BifocalConfig
    from bifocal.model.hf.modeling_bifocal import BifocalForCausalLM

    model = BifocalForCausalLM(BifocalConfig(bifocal={"vocab_size": 16, "n_layer": 1, "n_head": 2, "d_model": 8}))
    compat.set_checkpointing(model, True)
    assert model.model.gradient_checkpointing is True and callable(model.model._gradient_checkpointing_func)
    compat.set_checkpointing(model, False)
    assert model.model.gradient_checkpointing is False


def test_loss_function_is_transformers_causal_lm_loss_with_num_items_in_batch():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    logits, labels = torch.randn(2, 5, 16), torch.randint(0, 16, (2, 5))
    mean = model.loss_function(logits=logits, labels=labels, vocab_size=16)
    summed = model.loss_function(logits=logits, labels=labels, vocab_size=16, num_items_in_batch=4)
    assert summed.item() == pytest.approx(mean.item() * 8 / 4, rel=1e-6)


def test_required_version_is_what_pyproject_declares():
    """One fact, two places that must agree: the exported code's floor and pyproject's."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    floors = {str(s.version) for r in reqs if r.name == "transformers" for s in r.specifier if s.operator == ">="}
    assert floors == {compat.MIN_TRANSFORMERS}
    assert Version(transformers.__version__) >= Version(compat.MIN_TRANSFORMERS)
