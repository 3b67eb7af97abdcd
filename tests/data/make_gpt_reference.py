"""Reference outputs of the GPT as it was before explicit per-token positions (commit f15196d):
logits, loss, every gradient and cached decoding for each scheme, rope and bifocal under eval-time
scalings, fixed seeds. tests/test_positions.py checks today's model against them bit for bit.

Regenerate only if the numbers are meant to change, with the commit whose numbers are the
reference importable as `bifocal`: python tests/data/make_gpt_reference.py OUT.safetensors
"""

from __future__ import annotations

import sys

import torch

CASES = [(s, None) for s in ("rope", "bifocal", "spectral", "pope", "nope")] + [
    ("rope", {"type": t, "factor": 4.0, "original_max_len": 16}) for t in ("pi", "ntk", "dynamic_ntk", "yarn")] + [
    ("bifocal", {"type": "yarn", "factor": 4.0, "original_max_len": 16})]


def case_name(scheme: str, scaling: dict | None) -> str:
    return scheme + ("" if scaling is None else "-" + scaling["type"])


def build(scheme: str, scaling: dict | None = None):
    """A 2-layer GQA model with its position parameters moved off their initialisation."""
    from bifocal.model import GPT, GPTConfig

    torch.manual_seed(0)
    pos = {"scheme": scheme, **({"spectral_heads": 2} if scheme == "bifocal" else {})}
    m = GPT(GPTConfig(vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=16, position=pos))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "position" in n:
                p.add_(0.05 * torch.randn_like(p))
    if scaling:
        m.set_rope_scaling(scaling)
    return m


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randint(0, 61, (2, 40))
    return x, torch.roll(x, -1, 1)


# CPU kernels split their reductions by the number of intra-op threads, so the bits depend on it: the
# reference was recorded with 2 (any count above 1 gives the same bits here, 1 does not), and every
# call uses 2 whatever the machine or the test worker has set.
THREADS = 2


def outputs(forward=None) -> dict[str, torch.Tensor]:
    """Every case's tensors; `forward(model, x, y)` -> (logits, loss) replaces the plain call."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return _outputs(forward)
    finally:
        torch.set_num_threads(before)


def _outputs(forward) -> dict[str, torch.Tensor]:
    from bifocal.model import KVCache

    out = {}
    for scheme, scaling in CASES:
        name = case_name(scheme, scaling)
        m = build(scheme, scaling)
        x, y = batch()
        logits, loss = forward(m, x, y) if forward else m(x, y)
        loss.backward()
        out[f"{name}/logits"] = logits.detach()
        out[f"{name}/loss"] = loss.detach().reshape(1)
        for n, p in m.named_parameters():
            out[f"{name}/grad/{n}"] = p.grad.detach().clone()
        with torch.no_grad():  # cached decoding: a 30-token prefill, then one token at a time
            cache = KVCache()
            steps = [m(x[:, :30], cache=cache)[0]] + [m(x[:, t:t + 1], cache=cache)[0] for t in range(30, 40)]
        out[f"{name}/cached"] = torch.cat(steps, dim=1)
    return out


if __name__ == "__main__":
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in outputs().items()}, sys.argv[1])
