"""The model and its position schemes: equivalences, invariances, gradients, formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bifocal.core.settings import build
from bifocal.core.errors import BifocalError
from bifocal.model import GPT, GPTConfig, RopeScaling
from bifocal.model.position import PositionContext, make_context, scaled_inv_freq
from bifocal.model.position.pope import PolarPosition, pope_freqs
from bifocal.model.schemes import SCHEMES as REGISTRY

SCHEMES = tuple(REGISTRY)  # every registered scheme


def tiny(scheme: str, **kw) -> GPTConfig:
    base = dict(vocab_size=64, n_layer=2, n_head=4, d_model=32, max_seq_len=32, position={"scheme": scheme})
    pos = kw.pop("position", {})
    base["position"].update(pos)
    base.update(kw)
    return build(GPTConfig, base, "model")


def model(scheme: str, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(scheme, **kw)).eval()


def same_weights(src: GPT, dst: GPT) -> GPT:
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected and all(".position." in k for k in missing)
    return dst


def ids(T: int = 24, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


# -- equivalences at initialisation ----------------------------------------------------------

@pytest.mark.parametrize("gqa", [None, 2])
@pytest.mark.parametrize("scheme,extra", [("spectral", {}), ("bifocal", {"spectral_heads": 2})])
def test_spectral_and_bifocal_with_zero_phase_reproduce_rope(scheme, extra, gqa):
    rope = model("rope", n_kv_head=gqa)
    other = same_weights(rope, model(scheme, n_kv_head=gqa, position={"phase_init_std": 0.0, **extra}))
    x = ids()
    diff = (rope(x)[0] - other(x)[0]).abs().max().item()
    assert diff <= 1e-6


def test_bifocal_extremes_are_rope_and_spectral():
    x = ids()
    rope = model("rope")
    zero = same_weights(rope, model("bifocal", position={"spectral_heads": 0}))
    assert torch.equal(rope(x)[0], zero(x)[0])
    spectral = model("spectral", seed=3, position={"phase_init_std": 0.1})
    full = model("bifocal", position={"spectral_heads": 4})
    full.load_state_dict(spectral.state_dict())  # identical parameter names and shapes
    assert torch.equal(spectral(x)[0], full(x)[0])


def test_phase_init_is_small_and_nonzero():
    m = model("spectral")
    phase = m.blocks[0].attn.position.phase
    assert 0 < phase.abs().max().item() < 1e-2
    assert torch.all(m.blocks[0].attn.position.amplitude == 1)


# -- invariances ----------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
def test_scores_depend_only_on_relative_position(scheme):
    """Shifting every position by k leaves the attention scores (hence logits) unchanged."""
    m = model(scheme, position={"phase_init_std": 0.3} if scheme in ("spectral", "bifocal") else {})
    # Perturb the learnable parameters away from init so the check is not trivial.
    with torch.no_grad():
        for p in m.position_parameters().values():
            p.uniform_(-2 * math.pi, 0) if scheme == "pope" else p.add_(0.01 * torch.randn_like(p))
    pos_module = m.blocks[0].attn.position
    q, k = torch.randn(1, 4, 16, 8), torch.randn(1, 4, 16, 8)
    scores = []
    for shift in (0, 37, 1000):
        ctx = make_context(m.cfg, torch.arange(shift, shift + 16))
        qr, kr = pos_module(q, k, ctx)
        scores.append(qr @ kr.transpose(-1, -2))
    assert torch.allclose(scores[0], scores[1], atol=1e-4)
    assert torch.allclose(scores[0], scores[2], atol=2e-3)  # fp32 angles at position 1000
    x = ids()
    assert torch.allclose(m(x)[0], m(x, positions=torch.arange(37, 37 + x.shape[1]))[0], atol=1e-4)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_causality(scheme):
    m = model(scheme)
    x = ids(T=20, B=1)
    y = x.clone()
    y[0, 12] = (y[0, 12] + 1) % 64
    a, b = m(x)[0], m(y)[0]
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


# -- parameters and gradients ---------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["spectral", "bifocal", "pope"])
def test_every_position_parameter_gets_gradient_and_changes_scores(scheme):
    m = model(scheme).train()
    x = ids()
    _, loss = m(x, x.roll(-1, dims=1))
    loss.backward()
    names = [n for n, _ in m.named_parameters() if ".position." in n]
    expected = {"pope": {"delta"}}.get(scheme, {"omega_delta", "amplitude", "phase"})
    assert {n.rsplit(".", 1)[-1] for n in names} == expected
    for name, p in m.named_parameters():
        if ".position." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Each one really moves the attention scores (no cancellation between the q and k sides).
    pos = m.blocks[0].attn.position
    q, k = torch.randn(1, 4, 12, 8), torch.randn(1, 4, 12, 8)
    ctx = make_context(m.cfg, torch.arange(12))

    def scores():
        qr, kr = pos(q, k, ctx)
        return qr @ kr.transpose(-1, -2)

    with torch.no_grad():
        base = scores()
        for name, p in pos.named_parameters():
            old = p.clone()
            p.sub_(0.1)  # pope's delta stays in [-2pi, 0]
            moved = (scores() - base).abs().max().item()
            p.copy_(old)
            assert moved > 1e-2, name


def test_geometric_frequencies_are_not_parameters():
    m = model("bifocal", position={"spectral_heads": 2})
    pos = m.blocks[0].attn.position
    # Only the 2 spectral heads carry learnable frequency rows.
    assert pos.omega_delta.shape == (2, 4)
    assert pos.amplitude.shape == (2, 4) and pos.phase.shape == (2, 4)
    assert all(".position." not in n for n in dict(model("rope").named_parameters()))
    assert not list(model("rope").blocks[0].attn.position.parameters())


@pytest.mark.parametrize("scheme,spectral,fixed,params", [
    ("rope", 0, 4, set()), ("spectral", 4, 0, {"omega_delta", "amplitude", "phase"}),
    ("bifocal", 2, 2, {"omega_delta", "amplitude", "phase"}), ("pope", 0, 0, {"delta"}), ("nope", 0, 0, set())])
def test_the_model_answers_what_its_position_scheme_is(scheme, spectral, fixed, params):
    # One place decides which heads rotate by fixed or learned frequencies and which parameters
    # are position parameters; the layers, the tables and the optimizer groups all follow it.
    m = model(scheme)
    assert (m.cfg.n_spectral_heads, m.cfg.n_fixed_heads) == (spectral, fixed)
    named = m.position_parameters()
    assert {n.rsplit(".", 1)[1] for n in named} == params
    assert all(n.startswith("blocks.") and ".attn.position." in n for n in named)
    ctx = make_context(m.cfg, torch.arange(8))
    assert (ctx.cos is not None) == (fixed > 0)  # the fixed RoPE table only when some head reads it


def test_param_groups_give_position_parameters_their_own_lr_and_no_decay():
    m = model("bifocal", position={"spectral_lr_mult": 10.0})
    groups = {g["name"]: g for g in m.param_groups(weight_decay=0.1)}
    assert groups["position"]["lr_mult"] == 10.0 and groups["position"]["weight_decay"] == 0.0
    assert len(groups["position"]["params"]) == 3 * m.cfg.n_layer
    n = sum(len(g["params"]) for g in groups.values())
    assert n == len(list(m.parameters()))  # every parameter exactly once (tied weights once)


def test_spectral_frequencies_survive_bf16():
    """Omega is theta (recomputed in fp32) plus a learned offset, so a bf16 cast keeps it exact."""
    m = model("spectral").to(torch.bfloat16)
    theta = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    assert torch.equal(m.blocks[0].attn.position.omega[0], theta)


# -- PoPE ----------------------------------------------------------------------------------

def test_pope_matches_naive_complex_reference():
    cfg = tiny("pope", n_kv_head=2)
    pope = PolarPosition(cfg)
    with torch.no_grad():
        pope.delta.uniform_(-2 * math.pi, 0)
    T, d = 10, cfg.head_dim
    q, k = torch.randn(1, 4, T, d), torch.randn(1, 2, T, d)
    qr, kr = pope(q, k, PositionContext(positions=torch.arange(3, 3 + T)))
    fast = (qr @ kr.repeat_interleave(2, dim=1).transpose(-1, -2)) / math.sqrt(d)
    theta = pope_freqs(d, 10000.0).double()
    ref = torch.zeros(1, 4, T, T, dtype=torch.float64)
    for h in range(4):
        for m_ in range(T):
            for n in range(T):
                qc = F.softplus(q[0, h, m_].double()) * torch.exp(1j * (m_ + 3) * theta)
                kc = F.softplus(k[0, h // 2, n].double()) * torch.exp(1j * ((n + 3) * theta + pope.delta[h // 2].double()))
                ref[0, h, m_, n] = (qc * kc.conj()).sum().real / math.sqrt(d)
    assert torch.allclose(fast.double(), ref, atol=1e-5)


def test_pope_delta_is_clamped():
    m = model("pope")
    x = ids()
    base = m(x)[0]
    with torch.no_grad():
        m.blocks[0].attn.position.delta.fill_(5.0)  # clamps to 0, the init
    assert torch.allclose(m(x)[0], base)


# -- RoPE scaling --------------------------------------------------------------------------

D, BASE, S, L0 = 8, 10000.0, 4.0, 64
THETA = [BASE ** (-2 * i / D) for i in range(D // 2)]


def inv(kind: str, seq_len: int = L0):
    f, mscale = scaled_inv_freq(D, BASE, RopeScaling(type=kind, factor=S, original_max_len=L0), seq_len)
    return f.tolist(), mscale


def test_pi_formula():
    f, m = inv("pi")
    assert f == pytest.approx([t / S for t in THETA], rel=1e-6) and m == 1.0


def test_ntk_formula():
    base2 = BASE * S ** (D / (D - 2))
    f, _ = inv("ntk")
    assert f == pytest.approx([base2 ** (-2 * i / D) for i in range(D // 2)], rel=1e-6)


def test_dynamic_ntk_formula_and_only_beyond_original_length():
    assert inv("dynamic_ntk", L0)[0] == pytest.approx(THETA, rel=1e-6)
    L = 3 * L0
    s_dyn = S * L / L0 - (S - 1)
    base2 = BASE * s_dyn ** (D / (D - 2))
    assert inv("dynamic_ntk", L)[0] == pytest.approx([base2 ** (-2 * i / D) for i in range(D // 2)], rel=1e-6)


@pytest.mark.parametrize("kind", ["pi", "ntk", "dynamic_ntk", "yarn"])
def test_scaling_switches_on_a_trained_model_and_touches_only_fixed_heads(kind):
    m = model("bifocal", n_layer=1)
    x = ids(T=L0 // 2, B=1)
    base = m(x)[0]
    m.set_rope_scaling({"type": kind, "factor": S, "original_max_len": L0})
    scaled = m(x)[0]
    if kind == "dynamic_ntk":  # within the original length the formula changes nothing
        assert torch.equal(base, scaled)
    else:
        assert not torch.allclose(base, scaled)
    m.set_rope_scaling(None)
    assert torch.equal(m(x)[0], base)
    spectral = model("spectral", n_layer=1)
    before = spectral(x)[0]
    spectral.set_rope_scaling({"type": kind, "factor": S, "original_max_len": L0})
    assert torch.equal(spectral(x)[0], before)  # learned frequencies are never rescaled


@pytest.mark.parametrize("scheme", SCHEMES)
def test_eval_at_8x_training_length(scheme):
    m = model(scheme, n_layer=1)
    T = 8 * m.cfg.max_seq_len
    with torch.no_grad():
        logits, _ = m(ids(T=T, B=1))
        assert torch.isfinite(logits).all() and logits.shape[1] == T
        if scheme in ("rope", "bifocal"):
            m.set_rope_scaling({"type": "yarn", "factor": 8, "original_max_len": m.cfg.max_seq_len})
            assert torch.isfinite(m(ids(T=T, B=1))[0]).all()


# -- learning ------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
def test_loss_falls_on_a_periodic_sequence(scheme):
    torch.manual_seed(0)
    cfg = build(GPTConfig, dict(vocab_size=16, n_layer=2, n_head=4, d_model=32, max_seq_len=32,
                                   position={"scheme": scheme, "spectral_lr_mult": 5.0}), "model")
    m = GPT(cfg)
    opt = torch.optim.AdamW(m.param_groups(0.0), lr=3e-3)
    period = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5])
    seq = period.repeat(8)
    first = last = None
    for step in range(200):
        starts = torch.randint(0, len(period), (8,))
        batch = torch.stack([seq[s:s + 33] for s in starts])
        _, loss = m(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    assert last < 0.3 * first, (first, last)


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("bad,needle", [
    ({"n_head": 3}, "model.n_head=3"),
    ({"position": {"scheme": "bifocal", "spectral_heads": 5}}, "model.position.spectral_heads=5"),
    ({"position": {"scheme": "bifocal", "spectral_heads": -1}}, "spectral_heads=-1"),
    ({"position": {"scheme": "alibi"}}, "one of rope, bifocal, spectral, pope, nope"),
    ({"n_haed": 4}, "did you mean `n_head`"),
    ({"position": {"rope_scaling": {"type": "linear"}}}, "model.position.rope_scaling.type='linear'"),
    ({"n_head": 4, "n_kv_head": 3}, "n_kv_head=3"),
])
def test_invalid_configs_name_key_value_and_allowed(bad, needle):
    with pytest.raises(BifocalError) as err:
        build(GPTConfig, {"d_model": 32, **bad}, "model")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_log_frequency_parametrisation():
    """omega_param=log: Omega = theta * exp(s), exact RoPE at init, trainable, bf16-safe, and a
    step in s changes every pair's frequency by the same factor (relative, unlike the offset)."""
    rope = model("rope")
    m = same_weights(rope, model("spectral", position={"phase_init_std": 0.0, "omega_param": "log"}))
    x = ids()
    assert (rope(x)[0] - m(x)[0]).abs().max().item() <= 1e-6
    pos = m.blocks[0].attn.position
    assert not hasattr(pos, "omega_delta") and pos.omega_log_scale.shape == (4, 4)
    m.train()
    m(x, x.roll(-1, dims=1))[1].backward()
    assert pos.omega_log_scale.grad.abs().sum() > 0
    theta = pos.omega.detach().clone()
    with torch.no_grad():
        pos.omega_log_scale.add_(0.1)
    assert torch.allclose(pos.omega / theta, torch.full_like(theta, math.exp(0.1)))
    assert torch.equal(model("spectral", position={"omega_param": "log"}).to(torch.bfloat16).blocks[0].attn.position.omega[0],
                       1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8))
    with pytest.raises(BifocalError, match="omega_param='exp'"):
        tiny("spectral", position={"omega_param": "exp"})
