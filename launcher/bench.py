"""`bifocal bench`: training throughput, MFU and peak memory of every position scheme, side by side.

Each scheme gets the training step `bifocal train` runs (a DeepSpeed engine from the same config
code, the same optimizer, the real window sampler over prepared shards, `launcher.step.train_step`)
and, with `--plain`, the same model in a plain PyTorch loop (same batch, dtype and compile) to show
what the framework costs. All runners live in one process and take turns in blocks of `--block`
steps, round after round, so drift in machine load hits every scheme alike; the figure reported is
the median over rounds. See docs/performance.md for the MFU formula and the peak FLOP/s assumed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from bifocal.core import logs
from bifocal.core.config import deep_merge, parse_overrides
from bifocal.core.errors import BifocalError
from bifocal.core.settings import from_arguments
from bifocal.model.config import GPTConfig
from bifocal.model.schemes import SCHEMES
from bifocal.model.flops import flops_per_token
from bifocal.run import distributed as dist
from bifocal.run.config import (CONFIG_DIR, RunConfig, build_config, check_sequence_parallel, config_path,
                                deepspeed_config, read_yaml)

from .settings import BenchSettings
from .throughput import mfu, peak_flops, peak_memory_mb, reset_peak_memory

DEMO_DATA = CONFIG_DIR / "data" / "demo.yaml"
log = logs.get_logger(__name__)


def bench_config(config: str | None, overrides: list[str], settings: BenchSettings) -> RunConfig:
    """The run config (`--config`, a path or a bundled preset name; default the demo) with its data
    section replaced by the bench's (the bundled demo corpora unless `data` names a YAML), then
    the `--set` overrides."""
    raw = read_yaml(config_path(config))
    raw["data"] = read_yaml(settings.data or DEMO_DATA)["data"]
    return build_config(deep_merge(raw, parse_overrides(overrides)))


def parse_schemes(text: str, what: str) -> list[str]:
    schemes = [s.strip() for s in text.split(",") if s.strip()]
    if text == "all":
        return list(SCHEMES)
    bad = [s for s in schemes if s not in SCHEMES]
    if bad:
        raise BifocalError(f"{what}: unknown scheme {bad[0]!r}; one of {', '.join(SCHEMES)} (or all)")
    return schemes


MODES = ("continue/causal", "reset/causal", "continue/document", "reset/document")


def parse_modes(text: str, cfg: RunConfig) -> list[str]:
    """`--packing`: the modes to time besides the config's own (all: every other one)."""
    own = f"{cfg.data.positions}/{cfg.data.attention}"
    modes = [m for m in MODES if m != own] if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise BifocalError(f"--packing: unknown mode {bad[0]!r}; positions/attention, one of {', '.join(MODES)} (or all)")
    return [m for m in modes if m != own]


def with_mode(cfg: RunConfig, mode: str) -> RunConfig:
    positions, attention = mode.split("/")
    return replace(cfg, data=replace(cfg.data, positions=positions, attention=attention))


def scheme_model_config(cfg: RunConfig, scheme: str):
    pos = replace(cfg.model.position, scheme=scheme,
                  spectral_heads=cfg.model.position.spectral_heads if scheme == "bifocal" else None)
    return replace(cfg.model, position=pos)


@dataclass
class Runner:
    """One way of training one scheme: `step()` runs one optimizer step."""

    name: str
    scheme: str
    model_cfg: GPTConfig
    step: Callable[[], object]
    resident_mb: float = 0.0  # memory it holds between steps (CUDA): weights, optimizer states
    mode: str = ""  # a packed-document mode other than the config's (`positions/attention`), or ""


def build_model(cfg: RunConfig, scheme: str, vocab: int):
    from bifocal.model import GPT

    mcfg = scheme_model_config(cfg, scheme)
    mcfg = replace(mcfg, vocab_size=vocab if cfg.vocab_from_data else max(mcfg.vocab_size, vocab))
    torch.manual_seed(cfg.train.seed)
    model = GPT(mcfg)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    return model


def build_engine(cfg: RunConfig, scheme: str, data):
    """(engine, train sampler) for `scheme`, built as `bifocal train` builds them."""
    from bifocal.data_pipeline.loader import WindowSampler

    from .setup import build_optimizer, initialize_engine

    model = build_model(cfg, scheme, data.vocab_size)
    optimizer, scheduler = build_optimizer(model, cfg)
    if cfg.train.sequence_parallel > 1:
        model.set_sequence_parallel(dist.sequence_parallel_group())
    engine = initialize_engine(model, optimizer, scheduler, deepspeed_config(cfg, dist.world_size()),
                               dist.sequence_parallel_mpu())
    if cfg.train.compile:
        engine.compile()
    sampler = WindowSampler(data, "train", cfg.model.max_seq_len, cfg.train.micro_batch, seed=cfg.train.seed,
                            rank=dist.data_parallel_rank(), world_size=dist.data_parallel_size(),
                            grad_accum=cfg.train.grad_accum, positions=cfg.data.positions,
                            attention=cfg.data.attention,
                            shard=(dist.sequence_parallel_rank(), dist.sequence_parallel_size()))
    return engine, sampler


def engine_runner(cfg: RunConfig, scheme: str, data, device: str, mode: str = "") -> Runner:
    from .step import train_step

    if mode:
        cfg = with_mode(cfg, mode)
    engine, sampler = build_engine(cfg, scheme, data)
    return Runner(f"{scheme} {mode}" if mode else scheme, scheme, engine.module.cfg,
                  lambda: train_step(engine, sampler, device, cfg.train.grad_accum), mode=mode)


def plain_runner(cfg: RunConfig, scheme: str, data, device: str) -> Runner:
    """The same model, batch and dtype in a bare PyTorch loop: autocast for bf16, AdamW, clipping."""
    from bifocal.data_pipeline.loader import WindowSampler

    from .setup import build_optimizer

    model = build_model(cfg, scheme, data.vocab_size).to(device)
    optimizer, scheduler = build_optimizer(model, cfg)
    if cfg.train.compile:
        model.compile()
    sampler = WindowSampler(data, "train", cfg.model.max_seq_len, cfg.train.micro_batch, seed=cfg.train.seed,
                            positions=cfg.data.positions, attention=cfg.data.attention)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision)

    def step() -> None:
        for _ in range(cfg.train.grad_accum):
            batch = sampler.sample().to(device)
            with torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None):
                _, loss = model(batch.inputs, batch.labels, return_logits=False, **batch.model_kwargs())
            (loss / cfg.train.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return Runner(f"{scheme} (plain torch)", scheme, model.cfg, step)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def allocated_mb(device: str) -> float:
    return torch.cuda.memory_allocated() / 2**20 if device == "cuda" else 0.0


def measure(runners: list[Runner], builders: list[Callable[[], Runner]], device: str, warmup: int,
            rounds: int, block: int) -> dict[str, dict]:
    """Build and warm each runner (its resident memory measured alone), then time blocks in turn.

    Peak memory of a runner = its resident memory + the most its steps allocate above everything
    resident, so the other runners' weights do not count against it."""
    building = logs.progress(builders, desc="build + warm up", unit="runner", lines=0, log=log)
    for build in building:
        before = allocated_mb(device)
        r = build()
        for _ in range(warmup):
            r.step()
        sync(device)
        r.resident_mb = allocated_mb(device) - before
        runners.append(r)
        if building.plain:  # the bar's place in logs
            log.info(f"built and warmed up {r.name}")
    times = {r.name: [] for r in runners}
    peaks = {r.name: 0.0 for r in runners}
    bar = logs.progress(total=rounds * len(runners), desc="measure", unit="block", lines=0, log=log)
    for _ in range(rounds):
        for r in runners:
            sync(device)
            reset_peak_memory(device)
            base = allocated_mb(device)
            t = time.perf_counter()
            for _ in range(block):
                r.step()
            sync(device)
            times[r.name].append((time.perf_counter() - t) / block)
            if device == "cuda":
                peaks[r.name] = max(peaks[r.name], r.resident_mb + peak_memory_mb(device)[1] - base)
            bar.update(1)
        if bar.plain:
            log.info(f"round {len(times[runners[0].name])}/{rounds}: " +
                     ", ".join(f"{r.name} {1e3 * times[r.name][-1]:.0f} ms" for r in runners))
    bar.close()
    return {r.name: {"step_s": statistics.median(times[r.name]), "step_s_all": times[r.name],
                     "peak_mem_mb": peaks[r.name] if device == "cuda" else None} for r in runners}


def paired_ratio(ref: dict, row: dict) -> float:
    """tokens/s of `row` over `ref`, as the median of the ratios within each round: the two ran
    back to back there, so a slow patch of the machine cancels out instead of landing on one."""
    return statistics.median(r / t for r, t in zip(ref["step_ms_rounds"], row["step_ms_rounds"]))


def summarise(runners: list[Runner], timing: dict[str, dict], cfg: RunConfig, device: str, peak: float | None) -> list[dict]:
    world = dist.world_size()
    # The ranks of a sequence-parallel group share their sequences: count each once.
    tokens = cfg.train.micro_batch * cfg.train.grad_accum * cfg.model.max_seq_len * dist.data_parallel_size()
    rows = []
    for r in runners:
        t = timing[r.name]
        tok_s = tokens / t["step_s"]
        fpt = flops_per_token(r.model_cfg, cfg.model.max_seq_len)
        rows.append({"name": r.name, "scheme": r.scheme, "mode": r.mode, "plain": r.name.endswith("(plain torch)"),
                     "step_ms": 1e3 * t["step_s"],
                     "tokens_per_s": tok_s, "flops_per_token": fpt, "mfu": mfu(tok_s, fpt, peak, world),
                     "peak_mem_mb": t["peak_mem_mb"], "step_ms_rounds": [1e3 * s for s in t["step_s_all"]]})
    rope = {row["plain"]: row for row in rows if row["scheme"] == "rope" and not row["mode"]}
    for row in rows:
        ref = rope.get(row["plain"])
        own = next((o for o in rows if o["scheme"] == row["scheme"] and not o["mode"] and not o["plain"]), None)
        # A packed mode against the same scheme in the config's mode, timed in the same rounds.
        row["tokens_per_s_vs_own_mode"] = paired_ratio(own, row) if row["mode"] and own else None
        row["tokens_per_s_vs_rope"] = paired_ratio(ref, row) if ref else None
        row["peak_mem_vs_rope"] = (row["peak_mem_mb"] / ref["peak_mem_mb"]
                                   if ref and row["peak_mem_mb"] and ref["peak_mem_mb"] else None)
        twin = next((o for o in rows if o["scheme"] == row["scheme"] and o["plain"] != row["plain"]
                     and not o["mode"]), None)
        row["framework_overhead"] = paired_ratio(row, twin) - 1 if twin and not row["plain"] and not row["mode"] else None
    return rows


def fmt(value, spec: str, na: str = "n/a") -> str:
    return na if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    head = (f"{'scheme':<26} {'step ms':>9} {'tokens/s':>11} {'vs rope':>8} {'vs own mode':>11} {'MFU':>7} {'peak MiB':>9} "
            f"{'mem vs rope':>11} {'overhead':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<26} {r['step_ms']:>9.1f} {r['tokens_per_s']:>11,.0f} "
                     f"{fmt(r['tokens_per_s_vs_rope'], '.3f'):>8} {fmt(r['tokens_per_s_vs_own_mode'], '.3f', '-'):>11} "
                     f"{fmt(r['mfu'] and 100 * r['mfu'], '.1f'):>6}% "
                     f"{fmt(r['peak_mem_mb'], '.0f'):>9} {fmt(r['peak_mem_vs_rope'], '.3f'):>11} "
                     f"{fmt(r['framework_overhead'] and 100 * r['framework_overhead'], '+.1f', '-'):>8}%")
    return "\n".join(lines).replace("n/a%", "n/a ").replace("-%", "- ")


def plot(rows: list[dict], title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem = [r for r in rows if r["peak_mem_mb"]]
    fig, axes = plt.subplots(1, 2 if mem else 1, figsize=(11 if mem else 6.5, 4), squeeze=False)
    ax = axes[0][0]
    names = [r["name"] for r in rows]
    colors = ["tab:gray" if r["plain"] else "tab:blue" for r in rows]
    bars = ax.barh(names, [r["tokens_per_s"] for r in rows], color=colors)
    for b, r in zip(bars, rows):
        label = f" {r['tokens_per_s_vs_rope']:.3f}x rope" if r["tokens_per_s_vs_rope"] else ""
        if r["mfu"]:
            label += f", MFU {100 * r['mfu']:.1f}%"
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, label, va="center", fontsize=8)
    ax.set_xlabel("training tokens / s (bars: median over rounds; labels: median per-round ratio)")
    ax.invert_yaxis()
    ax.margins(x=0.35)
    if mem:
        ax2 = axes[0][1]
        ax2.barh([r["name"] for r in mem], [r["peak_mem_mb"] for r in mem], color="tab:orange")
        ax2.set_xlabel("peak memory (MiB)")
        ax2.invert_yaxis()
    fig.suptitle(textwrap.fill(title, 95), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def describe(cfg: RunConfig, device: str, peak: float | None) -> str:
    t, m = cfg.train, cfg.model
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    sp = f" (sequence parallel {t.sequence_parallel})" if t.sequence_parallel > 1 else ""
    return (f"{name} x{dist.world_size()}{sp} | d_model={m.d_model} n_layer={m.n_layer} n_head={m.n_head} "
            f"vocab={m.vocab_size} | seq {m.max_seq_len} x micro-batch {t.micro_batch} x accum {t.grad_accum} | "
            f"{cfg.deepspeed.precision} ZeRO-{cfg.deepspeed.zero_stage} compile={t.compile} "
            f"AC={t.activation_checkpointing} | peak {fmt(peak and peak / 1e12, '.0f')} TFLOP/s per device")


def main(args: argparse.Namespace) -> int:
    settings = from_arguments(BenchSettings, args, "bench")
    cfg = bench_config(args.config, args.overrides, settings)
    schemes = parse_schemes(settings.schemes, "--schemes")
    plain = parse_schemes(settings.plain, "--plain") if settings.plain else []
    modes = parse_modes(settings.packing, cfg) if settings.packing else []
    if plain and cfg.deepspeed.precision == "fp16":
        raise BifocalError("--plain supports fp32 and bf16 (fp16 needs a loss scaler); use --set deepspeed.precision=bf16")
    if plain and dist.world_size() > 1:
        raise BifocalError("--plain runs in one process; start `bifocal bench` without a launcher")
    out = Path(settings.out)
    if out.exists() and any(out.iterdir()) and not settings.overwrite:
        raise BifocalError(f"--out {out} is not empty; pass --overwrite or choose another directory (nothing was written)")
    dist.setup_environment(cfg.train.threads)
    device = dist.resolve_device(cfg.train.device)
    peak = peak_flops(device, cfg.deepspeed.precision, cfg.train.peak_tflops)
    # The process group goes once the runners (their engines and groups) have: a group torn down at
    # interpreter exit can abort a finished rank ("terminate called without an active exception").
    with dist.process_group(device):
        runners: list[Runner] = []
        try:
            check_sequence_parallel(cfg.train.sequence_parallel, cfg.model, dist.world_size())
            dist.init_sequence_parallel(cfg.train.sequence_parallel)  # one set of groups for every runner
            from .setup import prepare_data

            data = prepare_data(cfg)
            builders = [lambda s=s: engine_runner(cfg, s, data, device) for s in schemes]
            builders += [lambda s=s, m=m: engine_runner(cfg, s, data, device, m) for s in schemes for m in modes]
            builders += [lambda s=s: plain_runner(cfg, s, data, device) for s in plain]
            rounds = max(1, settings.steps // settings.block)
            timing = measure(runners, builders, device, settings.warmup, rounds, settings.block)
            rows = summarise(runners, timing, cfg, device, peak)
            title = describe(cfg, device, peak)
            if dist.rank() == 0:
                print(f"\n{title}\n{rounds} rounds x {settings.block} steps per runner, medians\n")
                print(table(rows))
                if device != "cuda":
                    print(f"\npeak memory per scheme: n/a on CPU (one process holds every runner); "
                          f"process peak RSS {peak_memory_mb(device)[1]:.0f} MiB")
                if peak is None:
                    print("MFU: n/a (no peak FLOP/s known for this device; --set train.peak_tflops=...)")
                out.mkdir(parents=True, exist_ok=True)
                result = {"title": title, "device": device, "rounds": rounds, "block": settings.block, "warmup": settings.warmup,
                          "peak_flops": peak, "config": cfg.to_dict(), "rows": rows}
                (out / "bench.json").write_text(json.dumps(result, indent=1))
                png = plot(rows, title, out / "bench.png")
                print(f"\nbifocal: wrote {out / 'bench.json'} and {png}")
        finally:
            runners.clear()
    return 0
