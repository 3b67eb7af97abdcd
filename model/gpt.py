"""A decoder-only GPT: pre-norm RMSNorm, SwiGLU MLP, no biases, optional GQA and tied embeddings.

Position information enters only through the per-layer `position` module (model/position/),
which rotates (or, for PoPE, widens) q and k before one fused scaled_dot_product_attention call.
The layout (q/k/v/o, gate/up/down, RMSNorm) mirrors Llama so rope models export to it as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import GPTConfig, RopeScaling
from .loss import IGNORE_INDEX, cross_entropy, linear_cross_entropy
from .position import PositionContext, build_position, make_context, position_parameters


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension (Zhang & Sennrich 2019, arXiv
    1910.07467; no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """(..., dim) -> (..., dim) in x's dtype (the weight's, if wider)."""
        # Normalise in fp32 (as Llama does) so bf16 activations keep their precision here.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer 2020, arXiv 2002.05202), d_model -> d_ff
    -> d_model, no biases."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.down_proj._residual_out = True

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, d_model) -> (B, T, d_model)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class KVCache:
    """Keys (after rotation) and values per layer, for incremental decoding: each (B, n_kv_head,
    tokens, d), d = head_dim (2 * head_dim for PoPE's keys); None for a layer not reached yet."""

    keys: list[Tensor | None] = field(default_factory=list)
    values: list[Tensor | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Tokens cached (layer 0's count); valid between forward calls only (see layer_length)."""
        return self.layer_length(0)

    def layer_length(self, layer: int) -> int:
        """Tokens cached for `layer`. Attention must read its own layer's length: during a forward
        the earlier layers already hold the new tokens, so `length` is only valid between calls."""
        return 0 if layer >= len(self.keys) or self.keys[layer] is None else self.keys[layer].shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new k, v (B, n_kv_head, T, d) to `layer`'s cache; returns all of them so far,
        (B, n_kv_head, cached+T, d)."""
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads (n_kv_head divides n_head; Ainslie et al.
    2023, arXiv 2305.13245): q/k/v projections, the layer's position scheme on q and k, one fused
    `scaled_dot_product_attention` with scale 1/sqrt(head_dim), the o projection."""

    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.o_proj._residual_out = True
        self.position = build_position(cfg)
        self.dropout = cfg.dropout
        self.ulysses = None  # DeepSpeed's DistributedAttention when sequence parallel (set_sequence_parallel)

    def forward(self, x: Tensor, ctx: PositionContext, cache: KVCache | None = None,
                mask: Tensor | None = None, attentions: list[Tensor] | None = None) -> Tensor:
        """x (B, T, d_model) -> (B, T, d_model); under sequence parallelism T is this rank's shard.
        `ctx`: the positions and shared tables (model/position/base.py). `cache`: appended to, and
        attended over. `mask` (B, 1, T, past+T) bool, True where a query may attend; None: causal.
        `attentions`: given, this layer's probabilities (B, n_head, T, past+T) are appended to it."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        late = self.ulysses is not None and self.position.widens  # rotate after the all-to-all (PoPE)
        if not late:
            q, k = self.position(q, k, ctx)
        past = 0
        if cache is not None:
            past = cache.layer_length(self.layer)
            k, v = cache.update(self.layer, k, v)
        if mask is None and past and T > 1:
            mask = _cached_mask(T, past, x.device)
        scale = 1.0 / math.sqrt(self.head_dim)  # explicit: PoPE's keys are 2d wide
        dropout = self.dropout if self.training else 0.0
        if self.ulysses is not None:
            # Sequence parallel: (B, T/N, heads, d) shards of the sequence are exchanged (all-to-all) for
            # the whole sequence of heads/N, attended, and exchanged back: y (B, n_head, T/N, d).
            rotate = partial(self.position.rotate_heads, ctx=ctx) if late else None
            y = self.ulysses(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, mask, scale,
                             dropout, rotate).transpose(1, 2)
        elif attentions is not None:  # the probabilities are wanted: the same attention, unfused
            y, probs = _attention_probs(q, k, v, mask, past, scale, dropout)
            attentions.append(probs)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout,
                is_causal=mask is None and past == 0,  # fused causal kernels; one new token sees the whole cache
                scale=scale, enable_gqa=self.n_kv_head != self.n_head,
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def _head_shard_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, dropout: float,
                          rotate=None) -> Tensor:
    """DistributedAttention's local attention: q (B, T, h, d), k and v (B, T, h_kv, d), the whole
    sequence of this rank's heads -> (B, T, h, d); `rotate(q, k)` first, given (schemes that widen)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if rotate is not None:
        q, k = rotate(q, k)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                       scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return y.transpose(1, 2)


def _gather_sequence(x: Tensor, group) -> Tensor:
    """(B, T/N) shards of the sequence-parallel group -> (B, T), in rank order (no gradient)."""
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _sequence_share(loss: Tensor, labels: Tensor, group) -> Tensor:
    """A shard's mean loss (over its own labels) -> its share of the mean over the whole sequence:
    shard sum / all shards' token count. The shares add up to the unsharded loss, and DeepSpeed sums
    gradients over the sequence-parallel ranks, so every gradient is the unsharded model's."""
    count = (labels != IGNORE_INDEX).sum()
    total = count.clone()
    torch.distributed.all_reduce(total, group=group)
    return torch.where(count > 0, loss * (count / total.clamp(min=1)), 0.0)  # a shard of padding adds 0, not nan


def _attention_probs(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, past: int, scale: float,
                     dropout: float) -> tuple[Tensor, Tensor]:
    """What `scaled_dot_product_attention` computes, with its probabilities (B, H, T, past+T):
    softmax(q k^T scale + mask) v, softmax in fp32 (as transformers' eager attention)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    T = q.shape[2]
    allowed = mask if mask is not None else _cached_mask(T, past, q.device)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
    return F.dropout(probs, dropout) @ v, probs


def _cached_mask(T: int, past: int, device: torch.device) -> Tensor:
    """Causal mask for T new tokens after `past` cached ones (chunked prefill only)."""
    rows = torch.arange(T, device=device)[:, None] + past
    return torch.arange(past + T, device=device)[None, :] <= rows


def build_mask(T: int, past: int, valid: Tensor | None = None, documents: Tensor | None = None) -> Tensor | None:
    """(B, 1, T, past+T) bool mask for T new tokens after `past` cached ones, True where a query may
    attend, or None for plain causal attention (the fused causal kernels).

    `valid` (B, past+T): 1 for real tokens, 0 for padding (left or right); real tokens never
    attend to padding, and every token also sees itself so padded query rows stay finite.
    `documents` (B, past+T): a document index per token; a token attends only within its own
    document (packed windows, as Llama 3 and OLMo train)."""
    if valid is not None and bool(valid.bool().all()):
        valid = None  # nothing padded: keep the fused causal path
    if valid is None and documents is None:
        return None
    ref = valid if valid is not None else documents
    allowed = _cached_mask(T, past, ref.device)[None]
    if documents is not None:
        allowed = allowed & (documents[:, past:, None] == documents[:, None, :])
    if valid is not None:
        allowed = allowed & valid.bool()[:, None, :]
        rows = torch.arange(T, device=ref.device)
        allowed[:, rows, rows + past] = True
    return allowed[:, None]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, ctx: PositionContext, cache: KVCache | None = None,
                mask: Tensor | None = None, attentions: list[Tensor] | None = None) -> Tensor:
        """(B, T, d_model) -> (B, T, d_model); the other arguments as in `Attention.forward`."""
        x = x + self.drop(self.attn(self.attn_norm(x), ctx, cache, mask, attentions))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class LMHead(nn.Linear):
    """The output projection. Given labels it returns the loss without building the full logits
    (model/loss.py); it does so inside its own forward so ZeRO-3 has gathered the weight."""

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """x (B, T, d_model) -> logits (B, T, vocab); given `labels` (B, T), the mean cross-entropy
        over the labels that are not -100 instead, a scalar float32."""
        return super().forward(x) if labels is None else linear_cross_entropy(x, self.weight, labels)


class Decoder(nn.Module):
    """Token embedding, the blocks and the final norm: ids (B, T) -> hidden states (B, T, d_model).
    GPT adds the output head; the Hugging Face export's base model wraps this class as it is."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.trained_rope_scaling = cfg.position.rope_scaling  # the scaling it is built (trained) with
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # Recompute every k-th block's activations in the backward (0: keep all); see
        # set_activation_checkpointing. `checkpoint_fn` is torch's, or the one transformers hands in.
        self.checkpoint_every = 0
        self.checkpoint_fn = partial(checkpoint, use_reentrant=False)
        self.sequence_group = None  # see set_sequence_parallel

    def forward(self, input_ids: Tensor | None = None, *, inputs_embeds: Tensor | None = None,
                positions: Tensor | None = None, cache: KVCache | None = None, attention_mask: Tensor | None = None,
                documents: Tensor | None = None, hidden_states: list[Tensor] | None = None,
                attentions: list[Tensor] | None = None) -> Tensor:
        """Final normed hidden states (B, T, d_model) of `input_ids` (B, T) or `inputs_embeds` (B, T, d_model).

        `positions` (B, T) or (T,): each token's position, what every scheme rotates by; default
        0..T-1, continuing from the cache's length. `attention_mask` (B, cached+T), 0 at padding:
        padded keys are hidden (positions may count the padding: every scheme depends on m - n
        only, and padding sits outside each row's contiguous real tokens). `documents` (B, cached+T):
        a document index per token; attention stays within a document. `hidden_states`, given,
        receives the input of every block and the final normed state (n_layer + 1 tensors, as
        transformers' output_hidden_states); `attentions` every layer's probabilities. Under
        sequence parallelism (set_sequence_parallel) every tensor is this rank's (B, T/N) shard,
        positions default to the shard's offset onward, and cache, padding mask, hidden states and
        attentions are refused (ValueError)."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        T = x.shape[1]
        past = cache.length if cache is not None else 0
        T_attn, first = T, past  # the queries attention sees; the default position of the first token
        if self.sequence_group is not None:
            if cache is not None or attention_mask is not None or hidden_states is not None or attentions is not None:
                raise ValueError("sequence parallelism trains: no cache, padding mask, hidden states or attentions")
            T_attn = T * torch.distributed.get_world_size(self.sequence_group)
            first = T * torch.distributed.get_rank(self.sequence_group)
            if documents is not None:
                documents = _gather_sequence(documents, self.sequence_group)
        if positions is None:
            positions = torch.arange(first, first + T, device=x.device)
        ctx = make_context(self.cfg, positions)
        if self.sequence_group is not None and any(b.attn.position.widens for b in self.blocks):
            group = self.sequence_group
            ctx.sequence_positions = _gather_sequence(ctx.positions, group)
            per_rank = self.cfg.n_kv_head // torch.distributed.get_world_size(group)
            rank = torch.distributed.get_rank(group)
            ctx.kv_heads = slice(rank * per_rank, (rank + 1) * per_rank)  # DistributedAttention's even split
        mask = build_mask(T_attn, past, attention_mask, documents)
        x = self.drop(x)
        recompute = (self.checkpoint_every > 0 and self.training and torch.is_grad_enabled() and cache is None
                     and attentions is None)
        for i, block in enumerate(self.blocks):
            if hidden_states is not None:
                hidden_states.append(x)
            if recompute and i % self.checkpoint_every == 0:
                x = self.checkpoint_fn(block, x, ctx, None, mask)
            else:
                x = block(x, ctx, cache, mask, attentions)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x

    def set_sequence_parallel(self, group) -> None:
        """Shard every sequence over the ranks of `group` (DeepSpeed-Ulysses, Jacobs et al. 2023,
        arXiv 2309.14509): each rank gets a contiguous (B, T/N) slice with its global `positions`
        (Batch.shard), rotates its queries and keys there, and deepspeed.sequence.layer's
        DistributedAttention all-to-all turns the (B, T/N, heads, d) shards into the whole sequence of
        heads/N for attention and back. The loss is each shard's share of the sequence's mean.
        n_head and n_kv_head must divide by N (run.config.check_sequence_parallel)."""
        from deepspeed.sequence.layer import DistributedAttention

        self.sequence_group = group
        for block in self.blocks:
            # scatter the heads (dim 2), gather the sequence (dim 1) of batch-first tensors
            block.attn.ulysses = DistributedAttention(_head_shard_attention, group, scatter_idx=2, gather_idx=1)

    def set_activation_checkpointing(self, every: int) -> None:
        """Recompute blocks 0, k, 2k, ... in the backward instead of keeping their activations
        (every=1: all blocks, 0: none). Selective checkpointing trades memory for less recompute.
        Raises ValueError for every < 0."""
        if every < 0:
            raise ValueError(f"activation checkpointing interval must be >= 0, got {every}")
        self.checkpoint_every = every


class GPT(Decoder):
    """The decoder with its output head: next-token logits and the training loss."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__(cfg)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # Residual-stream outputs get std / sqrt(2 * n_layer) (GPT-2, GPT-NeoX, nanoGPT) so the
        # residual variance stays O(1) with depth.
        if isinstance(module, nn.Linear):
            std = self.cfg.init_std
            if getattr(module, "_residual_out", False):
                std /= math.sqrt(2 * self.cfg.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, *, positions: Tensor | None = None,
                cache: KVCache | None = None, return_logits: bool = True, attention_mask: Tensor | None = None,
                documents: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """Logits (B, T, vocab) and, given `labels` (B, T) aligned with `input_ids` (labels[t] is
        the token after input_ids[t]; -100 is ignored), the mean next-token cross-entropy.

        `positions`, `cache`, `attention_mask` and `documents` as in `Decoder.forward`.
        `return_logits=False` (training) returns (None, loss) and never holds the B*T*V logits.
        The loss is a float32 scalar in nats per token; None without labels."""
        x = super().forward(input_ids, positions=positions, cache=cache, attention_mask=attention_mask,
                            documents=documents)
        if labels is not None and not return_logits:
            return None, self._share(self.lm_head(x, labels), labels)
        logits = self.lm_head(x)
        return logits, self._share(cross_entropy(logits, labels), labels) if labels is not None else None

    def _share(self, loss: Tensor, labels: Tensor) -> Tensor:
        return loss if self.sequence_group is None else _sequence_share(loss, labels, self.sequence_group)

    # -- training helpers -------------------------------------------------------------------

    def position_parameters(self) -> dict[str, nn.Parameter]:
        """Omega, A, Phi of spectral heads and PoPE's delta, by name (see position_parameters)."""
        return position_parameters(self)

    def param_groups(self, weight_decay: float, spectral_lr_mult: float | None = None) -> list[dict]:
        """Optimizer groups (see `param_groups`); the position parameters' learning-rate multiplier
        defaults to position.spectral_lr_mult."""
        mult = self.cfg.position.spectral_lr_mult if spectral_lr_mult is None else spectral_lr_mult
        return param_groups(self, weight_decay, mult)

    def set_rope_scaling(self, scaling: RopeScaling | dict | None) -> None:
        """Switch training-free RoPE scaling for the fixed-frequency heads; no retraining. None puts
        back the scaling the model was built with: none, or the one a context extension trained
        with (`bifocal train --init-from` with model.position.rope_scaling)."""
        if isinstance(scaling, dict):
            scaling = RopeScaling(**scaling)
        self.cfg.position.rope_scaling = scaling if scaling is not None else self.trained_rope_scaling

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, each shared one once; `non_embedding` leaves out the token embedding (with tied
        embeddings that is the output head too)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n


def param_groups(module: nn.Module, weight_decay: float, position_lr_mult: float) -> list[dict]:
    """Optimizer groups of a GPT or a spectralized Hugging Face model: matrices with weight decay;
    norms and biases without; position parameters without decay and with their own learning-rate
    multiplier (`lr_mult`, read by the scheduler). Frozen parameters get no group."""
    position = {id(p) for p in position_parameters(module).values()}
    decay, no_decay, pos = [], [], []
    for p in module.parameters():  # each shared (tied) parameter once
        if p.requires_grad:
            (pos if id(p) in position else decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0, "name": "no_decay"},
        {"params": pos, "weight_decay": 0.0, "lr_mult": position_lr_mult, "name": "position"},
    ]
    return [g for g in groups if g["params"]]
