"""Training FLOPs per token, the numerator of MFU.

    flops/token = 6 * N_matmul + 6 * n_layer * seq_len * (d_qk + d_v)

N_matmul counts the weights that take part in a matmul: every linear layer including the lm_head
(the input embedding is a lookup, not a matmul; with tied embeddings the shared matrix is counted
once, as the lm_head). Each weight costs 2 FLOPs per token in the forward and 4 in the backward.
The second term is attention's QK^T and AV, 2*seq*(d_qk + d_v) per token and layer in the
forward, 3x that with the backward, over the full (not causally halved) square, as PaLM's
appendix B (Chowdhery et al. 2022, arXiv 2204.02311: 6N + 12 L H Q T) and nanoGPT's
`estimate_mfu` count it. With d_qk = d_v = d_model it is the usual 12 * n_layer * seq *
d_model; PoPE's keys and queries are twice as wide (d_qk = 2 * d_model), so it pays 18 * ....
Position tables and rotations are elementwise and not counted (they are not tensor-core work).
"""

from __future__ import annotations

from .config import GPTConfig
from .schemes import scheme


def matmul_params(cfg: GPTConfig) -> int:
    """N_matmul: weights that take part in a matmul per token (attention, MLP and the lm_head; the
    input embedding is a lookup)."""
    d, hd = cfg.d_model, cfg.head_dim
    attention = 2 * d * cfg.n_head * hd + 2 * d * cfg.n_kv_head * hd   # q, o and k, v
    mlp = 3 * d * cfg.d_ff                                              # gate, up, down
    return cfg.n_layer * (attention + mlp) + cfg.vocab_size * d


def attention_width(cfg: GPTConfig) -> tuple[int, int]:
    """(d_qk, d_v): the width of the q.k dot products and of the value mix, summed over the query
    heads (PoPE's d_qk is 2 * d_v: `Scheme.qk_width`)."""
    d_v = cfg.n_head * cfg.head_dim
    return scheme(cfg.position.scheme).qk_width * d_v, d_v


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token at sequence length `seq_len` (tokens): 6 N_matmul
    + 6 n_layer seq_len (d_qk + d_v) (see the module doc)."""
    d_qk, d_v = attention_width(cfg)
    return 6.0 * matmul_params(cfg) + 6.0 * cfg.n_layer * seq_len * (d_qk + d_v)
