"""Attention probabilities recomputed from a model's own q/k, and what they say about focus:
entropy per head and attention mass by token distance.

The probabilities are rebuilt from the output of each layer's `attn.position` module (the rotated,
or for PoPE widened, queries and keys that go into SDPA), so every position scheme is measured by
the same code and `model/` stays untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bifocal.core import logs
from bifocal.model import GPT

log = logs.get_logger(__name__)
# Distance buckets (inclusive): 0 is the token itself.
BUCKETS: tuple[tuple[int, float], ...] = ((0, 0), (1, 1), (2, 4), (5, 16), (17, 64), (65, math.inf))


def bucket_label(lo: int, hi: float) -> str:
    return str(lo) if lo == hi else (f"{lo}+" if math.isinf(hi) else f"{lo}-{int(hi)}")


@torch.no_grad()
def attention_probs(model: GPT, ids: Tensor) -> list[Tensor]:
    """Per layer, (B, n_head, T, T) float32 causal attention probabilities for `ids` (B, T)."""
    captured: list[tuple[Tensor, Tensor]] = []
    hooks = [block.attn.position.register_forward_hook(lambda _m, _i, out: captured.append(out))
             for block in model.blocks]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    probs = []
    for block, (q, k) in zip(model.blocks, captured):
        attn = block.attn
        k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)  # GQA: one key head per group
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(attn.head_dim)  # the SDPA scale
        T = scores.shape[-1]
        causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
        probs.append(scores.masked_fill(~causal, float("-inf")).softmax(-1))
    return probs


def entropy(probs: Tensor) -> Tensor:
    """Entropy (nats) of each attention row: (..., T, T) -> (..., T); 0 log 0 counts as 0."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def distance_mass(probs: Tensor) -> Tensor:
    """(B, H, T, T) -> (H, len(BUCKETS)): attention mass per distance bucket, averaged over the
    queries in the second half of each window (so every bucket up to T/2 is reachable there)."""
    T = probs.shape[-1]
    q_pos = torch.arange(T, device=probs.device)[:, None]
    dist = q_pos - torch.arange(T, device=probs.device)[None, :]
    rows = probs[:, :, T // 2:, :]
    out = []
    for lo, hi in BUCKETS:
        sel = ((dist >= lo) & (dist <= hi))[T // 2:].to(probs.dtype)
        out.append((rows * sel).sum(-1).mean(dim=(0, 2)))
    return torch.stack(out, dim=-1)


def head_groups(model: GPT) -> list[str]:
    """Per head of a layer: geometric (fixed RoPE), spectral (learned), or the scheme's name."""
    cfg = model.cfg
    if cfg.n_fixed_heads or cfg.n_spectral_heads:  # fixed heads first, as the position module lays them out
        return ["geometric"] * cfg.n_fixed_heads + ["spectral"] * cfg.n_spectral_heads
    return [cfg.position.scheme] * cfg.n_head


@dataclass
class AttentionSummary:
    """Running sums over windows; `finish` gives per-head and per-group means."""

    n_layer: int
    n_head: int
    groups: list[str]
    windows: int = 0
    entropy_sum: Tensor | None = None  # (L, H)
    mass_sum: Tensor | None = None     # (L, H, buckets)
    per_head: list[dict] = field(default_factory=list)

    def add(self, probs: list[Tensor]) -> None:
        # Query 0 sees one key (entropy 0 by construction): left out of the mean.
        ent = torch.stack([entropy(p)[:, :, 1:].mean(dim=(0, 2)) for p in probs]) * probs[0].shape[0]
        mass = torch.stack([distance_mass(p) for p in probs]) * probs[0].shape[0]
        self.entropy_sum = ent if self.entropy_sum is None else self.entropy_sum + ent
        self.mass_sum = mass if self.mass_sum is None else self.mass_sum + mass
        self.windows += probs[0].shape[0]

    def finish(self) -> dict:
        ent = (self.entropy_sum / self.windows).tolist()
        mass = (self.mass_sum / self.windows).tolist()
        per_head = [{"layer": l, "head": h, "group": self.groups[h], "entropy": ent[l][h], "mass": mass[l][h]}
                    for l in range(self.n_layer) for h in range(self.n_head)]
        by_group: dict[str, dict] = {}
        for g in dict.fromkeys(self.groups):
            rows = [r for r in per_head if r["group"] == g]
            by_group[g] = {"heads": len(rows), "entropy": sum(r["entropy"] for r in rows) / len(rows),
                           "mass": [sum(r["mass"][b] for r in rows) / len(rows) for b in range(len(BUCKETS))]}
        return {"buckets": [bucket_label(lo, hi) for lo, hi in BUCKETS], "windows": self.windows,
                "per_head": per_head, "groups": by_group}


def summarize_attention(model: GPT, windows: list[Tensor], batch: int = 4) -> dict:
    """Entropy and distance mass of every head over `windows` (each (T,) token ids)."""
    summary = AttentionSummary(model.cfg.n_layer, model.cfg.n_head, head_groups(model))
    device = next(model.parameters()).device
    for i in logs.progress(range(0, len(windows), batch), desc="attention", unit="batches", lines=1, log=log,
                           leave=False, mininterval=1.0):
        ids = torch.stack(windows[i:i + batch]).to(device)
        summary.add(attention_probs(model, ids))
    return summary.finish()
