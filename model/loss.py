"""Next-token cross-entropy, with or without the full logits.

`cross_entropy(logits, labels)` is the reference: fp32 softmax over a (B, T, V) logits tensor that
the caller wants anyway (evaluation, Hugging Face forward).

`linear_cross_entropy(hidden, weight, labels)` is what training uses: the lm_head matmul and the
loss run in chunks of rows, and each chunk's gradient with respect to `hidden` and `weight` is
computed right there, in the forward (as Liger's fused linear cross-entropy does). So at most one
chunk of fp32 logits (`chunk_rows` x V) exists at a time, instead of B*T*V in the forward plus as
much again for their gradient; a 50k vocabulary at 16 x 2048 tokens would otherwise hold 6.6 GB
of fp32 logits alone. The backward is then only a scale by the incoming gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
# fp32 logits per chunk: 2^26 values = 256 MiB, well below a GPU's memory, large enough that each
# chunk's matmul still keeps the GPU busy (1342 rows for a 50k vocabulary).
CHUNK_ELEMENTS = 2**26


def cross_entropy(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits (..., V) against labels (...) over labels != -100, softmax in fp32:
    a float32 scalar in nats, the mean (nan when every label is ignored, as torch's) or, with
    `reduction="sum"`, the total for evaluation. The one loss of the project: training, evaluation
    and the Hugging Face surgery adapter all call it."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk of `linear_cross_entropy`: 2^26 fp32 logits (256 MiB) / vocab_size, at least 1."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss of softmax(hidden @ weight.T) against labels; gradients computed in the forward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_rows: int, want_grad: bool) -> Tensor:
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1).to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows]                          # (n, D)
            y = labels[start:start + chunk_rows]
            keep = valid[start:start + chunk_rows]
            logits = (h @ weight.t()).float()                            # (n, V), the only fp32 copy
            lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, y.clamp(min=0)[:, None])[:, 0]
            total = total + torch.where(keep, lse - target, 0.0).sum()
            if want_grad:
                # d loss_sum / d logits = softmax - onehot, on kept rows only.
                g = torch.exp(logits - lse[:, None])
                g.scatter_add_(1, y.clamp(min=0)[:, None], torch.full_like(g[:, :1], -1.0))
                g = (g * keep[:, None]).to(hidden.dtype)
                grad_hidden[start:start + chunk_rows] = g @ weight
                grad_weight += (g.t() @ h).float()
        if want_grad:
            ctx.weight_dtype = weight.dtype
            ctx.save_for_backward(grad_hidden, grad_weight, count)
        # F.cross_entropy gives nan when every label is ignored; so do we (0/0).
        return total / valid.sum().to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_out / count
        return grad_hidden * scale.to(grad_hidden.dtype), (grad_weight * scale).to(ctx.weight_dtype), None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_rows: int | None = None) -> Tensor:
    """cross_entropy(hidden @ weight.T, labels) without materialising the logits at once.

    hidden (..., D), weight (V, D), labels (...) -> the mean over labels != -100, a float32 scalar
    (nan when all are ignored). Same loss and gradients as the reference to fp32 rounding;
    chunk_rows defaults to 2^26 / V rows."""
    rows = chunk_rows or default_chunk_rows(weight.shape[0])
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), rows, want_grad)
