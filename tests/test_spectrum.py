"""`bifocal eval spectrum`: learned-parameter dump, 2*pi/p comparison, attention statistics
checked against an independent explicit computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bifocal.data_pipeline.tokenizer import load_tokenizer
from bifocal.eval import spectrum
from bifocal.eval.attention_stats import BUCKETS, attention_probs, distance_mass, entropy
from bifocal.eval.loading import load_model

from conftest import run_cli
from tiny_models import export, prepared_task_data, random_model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_task_data(tmp_path_factory.mktemp("spec") / "data")


@pytest.fixture(scope="module")
def bifocal_export(data_dir, tmp_path_factory):
    tok = load_tokenizer(data_dir)
    # GQA (2 kv heads for 4 query heads): Omega per kv head, A and Phi per query head.
    model = random_model(tok.vocab_size, "bifocal", n_kv_head=2)
    return export(model, tok, tmp_path_factory.mktemp("spec") / "bifocal")


def test_files_and_one_entry_per_spectral_head(bifocal_export, data_dir, tmp_path):
    result, out = spectrum.run(bifocal_export, out=tmp_path / "s", data=data_dir, modulus=7, windows=4)
    for name in ("spectrum.json", "frequencies.png", "amplitude_phase.png", "attention_entropy.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "spectrum.json").read_text())
    model, _ = load_model(bifocal_export)
    cfg = model.cfg
    heads = saved["spectral_heads"]
    assert [(h["layer"], h["head"]) for h in heads] == [(l, h) for l in range(2) for h in (2, 3)]
    for h in heads:
        pos = model.blocks[h["layer"]].attn.position
        assert len(h["omega"]) == len(h["amplitude"]) == len(h["phase"]) == cfg.head_dim // 2
        np.testing.assert_allclose(h["omega"], pos.omega[h["kv_head"] - 1].detach().numpy(), rtol=1e-6)
        np.testing.assert_allclose(h["amplitude"], pos.amplitude[h["head"] - 2].detach().numpy(), rtol=1e-6)
    assert len(saved["modulus"]["heads"]) == len(heads)
    attn = saved["attention"]
    assert set(attn["groups"]) == {"geometric", "spectral"}
    assert attn["windows"] == 4 and len(attn["per_head"]) == cfg.n_layer * cfg.n_head
    for h in attn["per_head"]:  # the buckets partition all distances: masses sum to 1
        assert sum(h["mass"]) == pytest.approx(1.0, abs=1e-4)
        assert 0 < h["entropy"] < math.log(cfg.max_seq_len)


def test_rope_model_has_no_spectral_heads_but_entropy(data_dir, tmp_path):
    tok = load_tokenizer(data_dir)
    path = export(random_model(tok.vocab_size, "rope"), tok, tmp_path / "rope")
    proc = run_cli(["eval", "spectrum", str(path), "--data", str(data_dir), "--modulus", "7", "--windows", "2"],
                   cwd=tmp_path)
    assert "no spectral heads (scheme rope)" in proc.stdout
    out = path / "spectrum"
    saved = json.loads((out / "spectrum.json").read_text())
    assert saved["spectral_heads"] == [] and saved["modulus"] is None
    assert set(saved["attention"]["groups"]) == {"geometric"}
    assert (out / "attention_entropy.png").is_file()
    assert not (out / "frequencies.png").exists() and not (out / "amplitude_phase.png").exists()


def _explicit_spectral_probs(model, ids, head: int) -> torch.Tensor:
    """Layer 0, one spectral head, from the definition: score(m, n) = sum_i A_i Re(q_i conj(k_i)
    e^{i((m-n) Omega_i + Phi_i)}) / sqrt(d), q_i = x_i + j x_{i+d/2}, causal softmax."""
    attn = model.blocks[0].attn
    pos = attn.position
    d, half = attn.head_dim, attn.head_dim // 2
    h = model.blocks[0].attn_norm(model.embed(ids))[0]                 # (T, d_model)
    kv = head // (attn.n_head // attn.n_kv_head)
    q = attn.q_proj(h).view(-1, attn.n_head, d)[:, head]
    k = attn.k_proj(h).view(-1, attn.n_kv_head, d)[:, kv]
    qc = torch.complex(q[:, :half].double(), q[:, half:].double())
    kc = torch.complex(k[:, :half].double(), k[:, half:].double())
    s = head - (attn.n_head - pos.n_spectral)
    omega = pos.omega[kv - (attn.n_kv_head - pos.n_spectral_kv)].double()
    amp, phase = pos.amplitude[s].double(), pos.phase[s].double()
    T = ids.shape[1]
    scores = torch.full((T, T), float("-inf"), dtype=torch.float64)
    for m in range(T):
        for n in range(m + 1):
            rot = torch.exp(1j * ((m - n) * omega + phase))
            scores[m, n] = (amp * (qc[m] * kc[n].conj() * rot).real).sum() / math.sqrt(d)
    return scores.softmax(-1)


@torch.no_grad()
def test_entropy_matches_explicit_computation(bifocal_export):
    model, _ = load_model(bifocal_export)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    head = model.cfg.n_head - 1
    got = attention_probs(model, ids)[0][0, head]
    want = _explicit_spectral_probs(model, ids, head)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    p = want.clamp_min(1e-300)
    want_entropy = -(want * p.log()).nan_to_num().sum(-1)
    torch.testing.assert_close(entropy(got[None])[0].double(), want_entropy, atol=1e-4, rtol=1e-4)


def test_distance_mass_of_known_pattern():
    T = 8
    probs = torch.zeros(1, 1, T, T)
    probs[0, 0, torch.arange(T), torch.arange(T)] = 1.0  # all mass on the token itself
    probs[0, 0, 6] = 0.0
    probs[0, 0, 6, 1] = 1.0                               # query 6 looks 5 tokens back
    mass = distance_mass(probs)[0]
    labels = [b for b in BUCKETS]
    # queries 4..7 (second half): three at distance 0, one at distance 5 (bucket 5-16)
    assert mass[labels.index((0, 0))] == pytest.approx(0.75)
    assert mass[labels.index((5, 16))] == pytest.approx(0.25)


def test_nearest_to_modulus_is_circular():
    target = 2 * math.pi / 7
    got = spectrum.nearest_to_modulus(np.array([0.1, target + 0.01, 3.0]), 7)
    assert (got["pair"], got["k"]) == (1, 1) and got["distance"] == pytest.approx(0.01, abs=1e-9)
    wrapped = spectrum.nearest_to_modulus(np.array([2 * math.pi + 3 * target, 0.05]), 7)
    assert (wrapped["pair"], wrapped["k"]) == (0, 3) and wrapped["distance"] == pytest.approx(0.0, abs=1e-9)


def test_frequency_figure_labels_every_spectral_head():
    import matplotlib.pyplot as plt

    from bifocal.model.position import spectral_init_freq
    from bifocal.run.metrics import frequency_figure, spectral_snapshot

    model = random_model(64, "bifocal")  # 2 layers, heads 2 and 3 spectral
    fig = frequency_figure(spectral_snapshot(model, zero3=False), spectral_init_freq(model.cfg).numpy(),
                           model.cfg.n_head)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    plt.close(fig)
    assert labels == ["Omega at init", "L0 h2", "L0 h3", "L1 h2", "L1 h3"]
