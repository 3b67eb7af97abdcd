"""What the host syncs of the old training loop cost: one sync per micro-batch against one per step.

    python benchmarks/bench_host_sync.py --set train.grad_accum=8 --steps 24 --block 2
    python benchmarks/bench_host_sync.py --config gpu/125m --set deepspeed.precision=bf16 model.max_seq_len=1024 \
        train.micro_batch=8 train.grad_accum=8

Takes `bifocal bench` options. Two engines of the same scheme alternate in blocks of steps:
"per micro-batch" is the loop before launcher/step.py (float(loss) and an all-reduce of
(loss, non-finite) after every forward, one more all-reduce for the stop flag every step),
"per step" is `train_step` (losses summed on the device, one all-reduce read once per step).
"""

from __future__ import annotations

import math
import statistics
import sys

from bifocal.run import distributed as dist
from bifocal.launcher.bench import Runner, bench_config, build_engine, measure, parse_schemes
from bifocal.core.settings import from_arguments
from bifocal.launcher.cli import build_parser
from bifocal.launcher.settings import BenchSettings
from bifocal.launcher.step import train_step
from bifocal.launcher.setup import prepare_data


def sync_per_micro_batch(engine, sampler, device: str, grad_accum: int) -> None:
    """The loop as it was: a host sync and a collective per micro-batch, another per step."""
    for _ in range(grad_accum):
        x, y = sampler.next_batch()
        _, loss = engine(x.to(device), y.to(device), return_logits=False)
        value = float(loss.detach())
        _, nonfinite = dist.all_reduce_sum([value, 0.0 if math.isfinite(value) else 1.0])
        if nonfinite:
            raise RuntimeError("non-finite loss in the benchmark")
        engine.backward(loss)
        engine.step()
    dist.all_reduce_sum([0.0])  # the per-step stop flag


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(["bench", *argv])
    settings = from_arguments(BenchSettings, args, "bench")
    cfg = bench_config(args.config, args.overrides, settings)
    scheme = parse_schemes(settings.schemes, "--schemes")[0] if settings.schemes != "all" else "bifocal"
    dist.setup_environment(cfg.train.threads)
    device = dist.resolve_device(cfg.train.device)
    dist.init_distributed(device)
    data = prepare_data(cfg)
    accum = cfg.train.grad_accum

    def old() -> Runner:
        engine, sampler = build_engine(cfg, scheme, data)
        return Runner("sync per micro-batch", scheme, engine.module.cfg,
                      lambda: sync_per_micro_batch(engine, sampler, device, accum))

    def new() -> Runner:
        engine, sampler = build_engine(cfg, scheme, data)
        return Runner("sync per step", scheme, engine.module.cfg, lambda: train_step(engine, sampler, device, accum))

    runners: list[Runner] = []
    timing = measure(runners, [old, new], device, settings.warmup, max(1, settings.steps // settings.block),
                     settings.block)
    old_rounds, new_rounds = timing["sync per micro-batch"]["step_s_all"], timing["sync per step"]["step_s_all"]
    base = timing["sync per micro-batch"]["step_s"]
    print(f"\n{scheme}, {device}, grad_accum={accum}, seq {cfg.model.max_seq_len} x micro-batch {cfg.train.micro_batch}, "
          f"{cfg.deepspeed.precision}, ZeRO-{cfg.deepspeed.zero_stage}")
    for name, t in timing.items():
        print(f"  {name:<22} {1e3 * t['step_s']:9.1f} ms/step  ({t['step_s'] / base:.3f}x)   "
              f"rounds: {', '.join(f'{1e3 * s:.0f}' for s in t['step_s_all'])}")
    paired = statistics.median(n / o for n, o in zip(new_rounds, old_rounds))
    print(f"  per-step sync / per-micro-batch sync step time, median of per-round ratios: {paired:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
