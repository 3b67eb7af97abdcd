"""The spectral heads' ablation switches each change exactly what they say: `position.learn`
(which of Omega, A, Phi train), `position.spectral_init` and `position.spectral_rope_base`."""

from __future__ import annotations

import math

import pytest
import torch

from bifocal.core import settings
from bifocal.core.errors import BifocalError
from bifocal.model import GPT, GPTConfig
from bifocal.model.position import make_context, rope_inv_freq
from bifocal.model.position.spectral import SpectralRotary

OMEGA = {"offset": "omega_delta", "log": "omega_log_scale"}


def build(scheme: str = "bifocal", seed: int = 0, **position) -> GPT:
    torch.manual_seed(seed)
    cfg = settings.build(GPTConfig, {"vocab_size": 64, "n_layer": 1, "n_head": 4, "d_model": 32, "max_seq_len": 32,
                               "position": {"scheme": scheme, **position}}, "model")  # training length 32
    return GPT(cfg)


def spectral_module(m: GPT) -> SpectralRotary:
    return m.blocks[0].attn.position


def ids(T: int = 24) -> torch.Tensor:
    return torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))


def train_steps(m: GPT, n: int = 3) -> None:
    groups = m.param_groups(0.0)
    for g in groups:
        g.pop("lr_mult"), g.pop("name")
    opt = torch.optim.AdamW(groups, lr=1e-2)
    for _ in range(n):
        x = ids()
        logits, _ = m(x)
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), x[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("omega_param", ["offset", "log"])
@pytest.mark.parametrize("learn", [[], ["omega"], ["amplitude", "phase"], ["omega", "amplitude", "phase"]])
def test_learn_trains_exactly_the_listed_parameters(learn, omega_param):
    m = build(learn=learn, omega_param=omega_param)
    pos = spectral_module(m)
    names = {"omega": OMEGA[omega_param], "amplitude": "amplitude", "phase": "phase"}
    before = {k: getattr(pos, n).detach().clone() for k, n in names.items()}
    other = m.tok_emb.weight.detach().clone() if hasattr(m, "tok_emb") else next(m.parameters()).detach().clone()
    spectral_group = [g for g in m.param_groups(0.0) if g["name"] == "position"]
    assert sum(p.numel() for g in spectral_group for p in g["params"]) == sum(before[k].numel() for k in learn)
    train_steps(m)
    for kind, value in before.items():
        changed = not torch.equal(getattr(pos, names[kind]), value)
        assert changed == (kind in learn), f"{kind}: changed={changed}, learn={learn}"
    assert not torch.equal(next(m.parameters()), other)  # the rest of the model still trains


def test_frozen_spectral_heads_are_rope():
    """learn: [] with zero phase: a spectral model stays RoPE through training (the sanity check)."""
    torch.manual_seed(0)
    rope = build("rope")
    frozen = build("spectral", learn=[], phase_init_std=0.0)
    frozen.load_state_dict(rope.state_dict(), strict=False)
    train_steps(rope)
    train_steps(frozen)
    x = ids()
    assert (rope(x)[0] - frozen(x)[0]).abs().max().item() < 1e-4


def test_spectral_init_fit_puts_every_wavelength_within_the_training_length():
    m = build("spectral", spectral_init="fit")
    omega = spectral_module(m).omega[0]
    half = 4
    expected = [(2 * math.pi / 32) ** (i / (half - 1)) for i in range(half)]
    assert omega.tolist() == pytest.approx(expected, rel=1e-6)
    assert omega[0].item() == pytest.approx(1.0) and (2 * math.pi / omega).max().item() == pytest.approx(32.0, rel=1e-5)
    rope_init = spectral_module(build("spectral")).omega[0]
    assert torch.equal(rope_init, rope_inv_freq(8, 10000.0))  # the default is unchanged


@pytest.mark.parametrize("switch", [{"spectral_init": "fit"}, {"spectral_rope_base": 500.0}])
def test_spectral_init_switches_change_only_the_spectral_heads(switch):
    plain, switched = build(), build(**switch)
    pos = torch.arange(24)
    ctx_plain, ctx_switched = make_context(plain.cfg, pos), make_context(switched.cfg, pos)
    assert torch.equal(ctx_plain.cos, ctx_switched.cos)  # the geometric heads' fixed table
    assert not torch.allclose(spectral_module(plain).omega, spectral_module(switched).omega)
    if "spectral_rope_base" in switch:
        assert torch.equal(spectral_module(switched).omega[0], rope_inv_freq(8, 500.0))
    switched.load_state_dict(plain.state_dict())  # same parameters: only the init differs
    for name in ("amplitude", "phase"):
        assert torch.equal(getattr(spectral_module(switched), name), getattr(spectral_module(plain), name))


@pytest.mark.parametrize("position,message", [
    ({"learn": ["omega", "gain"]}, "position.learn"),
    ({"learn": ["omega", "omega"]}, "position.learn"),
    ({"learn": "omega"}, "position.learn"),
    ({"spectral_init": "uniform"}, "position.spectral_init"),
    ({"spectral_rope_base": 1.0}, "position.spectral_rope_base"),
    ({"spectral_init": "fit", "spectral_rope_base": 500.0}, "position.spectral_rope_base"),
])
def test_invalid_ablation_keys_name_the_key(position, message):
    with pytest.raises(BifocalError, match=message.replace(".", r"\.")):
        settings.build(GPTConfig, {"position": {"scheme": "bifocal", **position}}, "model")
