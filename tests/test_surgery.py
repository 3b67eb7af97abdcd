"""Spectralizing transformers Llama / Mistral / Qwen2 models built from configs (random weights)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from bifocal.core.errors import BifocalError
from bifocal.model.gpt import param_groups
from bifocal.model.surgery import CausalLMAdapter, load_spectralized, spectralize

SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
TOL = 1e-5


def build(family: str, seed: int = 0, **kw):
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**SIZES, **kw})).eval()
    with torch.no_grad():  # Qwen2's q/k/v biases start at 0; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    return model


def ids(B: int = 2, T: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SIZES["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_identity_at_init_and_active_afterwards(family):
    model, x = build(family), ids()
    before = logits(model, x)
    spectralize(model, phase_init_std=0.0)
    assert (logits(model, x) - before).abs().max().item() <= TOL
    names = [n for n, _ in model.named_parameters() if ".position." in n]
    assert len(names) == 3 * SIZES["num_hidden_layers"]
    pos = model.model.layers[0].self_attn.position
    # Default: half the 4 query heads spectral = 1 of the 2 kv heads (GQA group 2).
    assert pos.amplitude.shape == (2, 8) and pos.omega_delta.shape == (1, 8)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".position." in n)
    with torch.no_grad():
        pos.phase.fill_(0.5)
    assert (logits(model, x) - before).abs().max().item() > 1e-3  # the spectral rotation is in use


def test_spectral_heads_respect_gqa_groups():
    with pytest.raises(BifocalError, match="GQA group"):
        spectralize(build("llama"), spectral_heads=1)
    model = spectralize(build("llama", num_key_value_heads=1), phase_init_std=0.0)
    assert model.model.layers[0].self_attn.position.amplitude.shape[0] == 4  # one whole group of 4
    with pytest.raises(ValueError, match="already spectralized"):
        spectralize(model)


def test_scaled_rope_is_refused():
    model = build("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="linear"):
        spectralize(model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_trains_the_spectral_parameters(family):
    adapter = CausalLMAdapter(spectralize(build(family), spectral_lr_mult=4.0))
    x = ids(T=33)
    inputs, aligned = x[:, :-1], x[:, 1:]
    # Aligned labels are transformers' labels shifted by one: with the last target ignored
    # (transformers has none for the last position) the losses agree.
    _, loss = adapter(inputs, aligned)
    with torch.no_grad():
        hf_loss = adapter.model(input_ids=inputs, labels=inputs).loss
    _, loss_but_last = adapter(inputs, F.pad(aligned[:, :-1], (0, 1), value=-100))
    assert abs(loss_but_last.item() - hf_loss.item()) <= TOL

    groups = {g["name"]: g for g in adapter.param_groups(0.1)}
    assert groups["position"]["lr_mult"] == 4.0 and groups["position"]["weight_decay"] == 0.0
    assert {id(p) for p in groups["position"]["params"]} == {id(p) for p in adapter.position_parameters().values()}
    if family == "qwen2":  # biases are vectors: no weight decay
        bias = adapter.model.model.layers[0].self_attn.q_proj.bias
        assert any(p is bias for p in groups["no_decay"]["params"])

    loss.backward()
    for p in adapter.position_parameters().values():
        assert p.grad is not None and p.grad.abs().max() > 0
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in adapter.param_groups(0.0)], lr=1e-2)
    start = [p.detach().clone() for p in adapter.position_parameters().values()]
    adapter.train()
    losses = []
    for _ in range(4):
        opt.zero_grad()
        _, loss = adapter(inputs, aligned)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(a, p) for a, p in zip(start, adapter.position_parameters().values()))


def _train_a_little(adapter, steps: int = 2):
    opt = torch.optim.AdamW(adapter.position_parameters().values(), lr=5e-2)
    x = ids(T=17)
    for _ in range(steps):
        opt.zero_grad()
        adapter(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()
    return adapter.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_and_reload_keeps_the_learned_parameters(family, tmp_path):
    plain = build(family)
    plain.save_pretrained(tmp_path / "plain")
    adapter = _train_a_little(load_spectralized(tmp_path / "plain", phase_init_std=0.05))
    x = ids()
    ref = logits(adapter.model, x)
    out = adapter.save_hf(tmp_path / "spectral")

    back = load_spectralized(out)  # no remote code: stock class + surgery + saved parameters
    assert (logits(back.model, x) - ref).abs().max().item() <= TOL
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(remote).__name__ == "Spectral" + type(plain).__name__
    assert (logits(remote, x) - ref).abs().max().item() <= TOL

    # Cached decoding keeps rotated keys: same tokens as recomputing the prefix.
    cached = remote.generate(x[:1, :6], max_new_tokens=10, do_sample=False)
    uncached = remote.generate(x[:1, :6], max_new_tokens=10, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["bifocal_surgery"]["spectral_heads"] == 2
    code = {p.name: p.read_text() for p in out.glob("*.py")}
    assert {"modeling_spectralized.py", "spectral_attention.py", "bifocal_position_spectral.py"} <= set(code)
    assert not any(re.search(r"^\s*(import|from)\s+bifocal\b", src, re.M) for src in code.values())
    assert "auto_map" not in adapter.model.config.to_dict()  # the live config stays stock


def test_plain_dir_is_spectralized_on_load(tmp_path):
    plain = build("qwen2")
    plain.save_pretrained(tmp_path / "plain")
    adapter = load_spectralized(tmp_path / "plain", phase_init_std=0.0)
    x = ids()
    assert (logits(adapter.model, x) - logits(plain, x)).abs().max().item() <= TOL
    assert adapter.cfg.n_spectral_heads == 2 and adapter.cfg.vocab_size == SIZES["vocab_size"]


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_spectralized(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no config.json"):
        load_spectralized(tmp_path / "empty")
    with pytest.raises(ValueError, match="spectralize"):
        CausalLMAdapter(build("llama"))
    groups = param_groups(spectralize(build("mistral")), 0.1, position_lr_mult=2.0)
    assert [g["name"] for g in groups] == ["decay", "no_decay", "position"] and groups[2]["lr_mult"] == 2.0


def test_adapter_activation_checkpointing_keeps_loss_and_gradients():
    """train.activation_checkpointing on an --init-from-hf model: transformers' own
    checkpointing of every layer, same loss and gradients; every k-th layer is refused."""
    x = ids()

    def loss_and_grads(every: int):
        model = spectralize(build("llama"), phase_init_std=0.1)
        adapter = CausalLMAdapter(model).train()
        adapter.set_activation_checkpointing(every)
        _, loss = adapter(x, labels=x)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in adapter.named_parameters() if p.grad is not None}

    (loss0, g0), (loss1, g1) = loss_and_grads(0), loss_and_grads(1)
    assert torch.equal(loss0, loss1) and g0.keys() == g1.keys()
    assert all(torch.allclose(g0[n], g1[n], atol=1e-6) for n in g0)
    adapter = CausalLMAdapter(spectralize(build("llama")))
    adapter.set_activation_checkpointing(1)
    assert adapter.model.is_gradient_checkpointing
    with pytest.raises(BifocalError, match="every block or none"):
        adapter.set_activation_checkpointing(2)
