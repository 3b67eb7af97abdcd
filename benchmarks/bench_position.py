"""Cost of each position scheme relative to RoPE, measured side by side in one run.

    python benchmarks/bench_position.py --lengths 256,1024 --d-model 256 --n-layer 4
    python benchmarks/bench_position.py --device cuda --dtype bf16 --lengths 1024,4096,16384 --d-model 768 --n-layer 12

Prints training-step time (forward + backward) and, on CUDA, peak memory for every scheme and
length, with ratios to rope at the same length. Schemes alternate within each repetition so
drift in machine load hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bifocal.core.settings import build
from bifocal.model.schemes import SCHEMES
from bifocal.model import GPT, GPTConfig



def step_time(model: GPT, x: torch.Tensor, device: str) -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    t = time.perf_counter()
    _, loss = model(x, x)
    loss.backward()
    sync()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="256,1024")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    models = {}
    for scheme in SCHEMES:
        cfg = build(GPTConfig, dict(vocab_size=8192, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                                       position={"scheme": scheme}), "model")
        models[scheme] = GPT(cfg).to(args.device, dtype)
    print(f"device={args.device} dtype={args.dtype} d_model={args.d_model} n_layer={args.n_layer} batch={args.batch}")
    print(f"{'length':>7} {'scheme':>9} {'ms/step':>9} {'x rope':>7} {'peak MiB':>9} {'x rope':>7}")
    for T in [int(v) for v in args.lengths.split(",")]:
        x = torch.randint(0, 8192, (args.batch, T), device=args.device)
        times: dict[str, list[float]] = {s: [] for s in SCHEMES}
        peaks: dict[str, float] = {}
        for rep in range(args.reps + 1):
            for scheme, model in models.items():
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                dt = step_time(model, x, args.device)
                model.zero_grad(set_to_none=True)
                if rep:  # the first repetition warms up
                    times[scheme].append(dt)
                if args.device == "cuda":
                    peaks[scheme] = torch.cuda.max_memory_allocated() / 2**20
        base_t = statistics.median(times["rope"])
        for scheme in SCHEMES:
            t = statistics.median(times[scheme])
            peak = f"{peaks[scheme]:9.0f} {peaks[scheme] / peaks['rope']:7.2f}" if peaks else f"{'n/a':>9} {'':>7}"
            print(f"{T:7d} {scheme:>9} {t * 1e3:9.1f} {t / base_t:7.2f} {peak}")


if __name__ == "__main__":
    main()
