"""The per-rank training loop around a DeepSpeed engine (one process or many).

`bifocal train` runs this in every rank: build the model, the torch AdamW (param groups with
their own learning-rate multipliers) and the warmup+cosine schedule, hand them to
`deepspeed.initialize`, then step through counter-based batches so a resumed run, or a run on a
different number of ranks with the same global batch, sees exactly the same data.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bifocal.core.errors import BifocalError

from bifocal.run import checkpoint, distributed as dist
from bifocal.run.config import RunConfig, deepspeed_config, load_config, save_config
from bifocal.run.metrics import MetricsLogger, drop_rows_after, plot_loss, require_wandb, spectral_snapshot, train_line
from bifocal.run.run_lock import RunLock

from . import preflight


def lr_lambda(cfg: RunConfig):
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps (multiplies each
    group's own initial lr, so the spectral multiplier survives the schedule)."""
    o, total = cfg.optim, cfg.train.max_steps

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


HYPERPARAMETERS = ("initial_lr", "betas", "eps", "weight_decay")


def apply_hyperparameters(optimizer, scheduler, fresh: list[dict]) -> None:
    """After a resume: the checkpoint restored the old run's lr, betas, eps and weight decay into
    every param group; put back those of this run's config (`fresh`, captured when the optimizer
    was built) and recompute the current lr from the (possibly changed) schedule."""
    for group, want, factor in zip(optimizer.param_groups, fresh, scheduler.lr_lambdas):
        group.update({k: want[k] for k in HYPERPARAMETERS})
        group["lr"] = want["initial_lr"] * factor(scheduler.last_epoch)
    scheduler.base_lrs = [want["initial_lr"] for want in fresh]
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def lock_run_dir(run_dir: Path) -> RunLock:
    """Collective: rank 0 takes the run directory's lock and every rank learns whether it did."""
    lock, refused = RunLock(run_dir), None
    if dist.rank() == 0:
        try:
            lock.acquire()
        except BifocalError as exc:
            refused = exc
    if dist.all_reduce_sum([1.0 if refused else 0.0])[0]:
        raise refused or BifocalError(f"run directory {run_dir} is in use (rank 0 could not lock it)")
    return lock


def build_optimizer(model: torch.nn.Module, cfg: RunConfig):
    groups = model.param_groups(cfg.optim.weight_decay)
    for g in groups:
        g["lr"] = cfg.optim.lr * g.pop("lr_mult")
        g.pop("name", None)
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    return opt, sched


@dataclass
class StopFlag:
    """SIGTERM/SIGINT ask for a checkpoint at the end of the current step, agreed across ranks."""

    requested: bool = False
    signals: list[int] = field(default_factory=list)

    def install(self) -> None:
        def handler(signum, frame):
            self.requested = True
            self.signals.append(signum)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def resolve_run(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """Config and run directory. `--resume` without `--config` reuses the run's own config."""
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.train.out_dir) / cfg.train.run_name
    if args.resume and not args.config and (run_dir / "config.yaml").is_file():
        cfg = load_config(run_dir / "config.yaml", args.overrides)
    return cfg, run_dir


def check_run_dir(run_dir: Path, resume: bool) -> None:
    has_ckpt = bool(checkpoint.complete_checkpoints(run_dir))
    if not resume and (has_ckpt or (run_dir / "metrics.jsonl").exists()):
        raise BifocalError(f"run directory {run_dir} already holds a run; pass --resume to continue it, "
                           f"or choose another train.run_name / --run-dir (nothing was overwritten)")
    if resume and not has_ckpt and (run_dir / "metrics.jsonl").exists():
        raise BifocalError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")


def prepare_data(cfg: RunConfig):
    """Rank 0 prepares the data when missing; the others wait. Returns the opened PreparedData."""
    from bifocal.data_pipeline.loader import PreparedData
    from bifocal.data_pipeline.prepare import prepare

    out = Path(cfg.data.prepared_dir)
    if dist.rank() == 0:
        # A finished directory with the same data settings is used without the raw corpora (copied
        # shards train on their own); otherwise prepare() builds it, or refuses one made from
        # another config, so a changed data section never trains on stale shards.
        prepare(cfg.data, out, trust_complete=True)
    dist.barrier()
    return PreparedData(out)


def hf_source(args: argparse.Namespace, run_dir: Path, cfg: RunConfig) -> dict | None:
    """The Hugging Face model a run continues (`--init-from-hf`, or recorded by an earlier start)."""
    recorded = run_dir / "init_from_hf.json"
    if args.resume and recorded.is_file():
        return json.loads(recorded.read_text())
    if not getattr(args, "init_from_hf", None):
        return None
    path = Path(args.init_from_hf)
    if not (path / "config.json").is_file():
        raise BifocalError(f"--init-from-hf: {path} is not a Hugging Face model directory (no config.json)")
    pos = cfg.model.position
    heads = pos.spectral_heads if pos.scheme == "bifocal" else None
    return {"path": str(path.resolve()), "spectral_heads": heads, "phase_init_std": pos.phase_init_std}


def build_model(cfg: RunConfig, data, hf: dict | None):
    if hf:
        from bifocal.model.surgery import load_spectralized

        try:
            model = load_spectralized(hf["path"], spectral_heads=hf["spectral_heads"],
                                      phase_init_std=hf["phase_init_std"],
                                      spectral_lr_mult=cfg.model.position.spectral_lr_mult)
        except (OSError, ValueError) as exc:  # no safetensors weights, a config transformers rejects...
            raise BifocalError(f"--init-from-hf {hf['path']}: {str(exc).strip().splitlines()[0]}") from None
        if model.cfg.vocab_size < data.vocab_size:
            raise BifocalError(f"{hf['path']} has {model.cfg.vocab_size} tokens but the data in {data.path} was "
                               f"prepared with a {data.vocab_size}-token tokenizer; set data.tokenizer.path to the "
                               f"model's tokenizer")
        return model
    from dataclasses import replace

    from bifocal.model import GPT

    if cfg.vocab_from_data:
        cfg.model = replace(cfg.model, vocab_size=data.vocab_size)
    elif cfg.model.vocab_size < data.vocab_size:
        raise BifocalError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                           f"{data.vocab_size} tokens in {data.path}")
    torch.manual_seed(cfg.train.seed)
    return GPT(cfg.model)


def universal_checkpoint(path: Path, cfg: RunConfig, world: int) -> Path:
    """A checkpoint saved on another number of ranks loads through DeepSpeed's universal format."""
    if cfg.deepspeed.zero_stage == 0:
        return path  # full model and optimizer states in one file: any rank count loads them
    if dist.rank() == 0:
        print(f"bifocal: {path.name} was saved on {checkpoint.saved_world_size(path)} ranks, resuming on "
              f"{world}: converting to a universal checkpoint", flush=True)
        checkpoint.to_universal(path)
    dist.barrier()
    return path.parent / "universal" / path.name


def grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is not None:
        return float(norm)
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))) if grads else 0.0


def evaluate(engine, data, cfg: RunConfig, device: str) -> float:
    """Mean validation loss over the same `eval_batches` windows every time."""
    from bifocal.data_pipeline.loader import WindowSampler

    sampler = WindowSampler(data, "val", cfg.train.seq_len, cfg.train.micro_batch, seed=cfg.train.seed + 1,
                            rank=dist.rank(), world_size=dist.world_size())
    engine.eval()
    total = 0.0
    with torch.no_grad():
        for _ in range(cfg.train.eval_batches):
            x, y = sampler.next_batch()
            _, loss = engine(x.to(device), y.to(device))
            total += float(loss)
    engine.train()
    s, n = dist.all_reduce_sum([total, cfg.train.eval_batches])
    return s / n


def run(args: argparse.Namespace) -> Path:
    cfg, run_dir = resolve_run(args)
    dist.setup_environment(cfg.train.threads)
    device = dist.resolve_device(cfg.train.device)
    dist.init_distributed(device)
    lock = lock_run_dir(run_dir)
    try:
        return train_locked(args, cfg, run_dir, device)
    finally:
        lock.release()


def train_locked(args: argparse.Namespace, cfg: RunConfig, run_dir: Path, device: str) -> Path:
    """The run itself, while this process holds the run directory. Every check comes before the
    first write into it (config.yaml, tokenizer/, metrics), so a refused start changes nothing."""
    import deepspeed

    from bifocal.data_pipeline.loader import WindowSampler

    rank, world = dist.rank(), dist.world_size()
    is_main = rank == 0
    check_run_dir(run_dir, args.resume)
    require_wandb(cfg.train.wandb_project)

    data = prepare_data(cfg)
    hf = hf_source(args, run_dir, cfg)
    changes = preflight.check_resume(run_dir, cfg, data, from_hf=bool(hf)) if args.resume else []
    validate = preflight.check_validation(cfg, data, rank, world)
    model = build_model(cfg, data, hf)
    if hf:
        cfg.model = model.cfg  # the Hugging Face model's own shape, for logging and evaluation
    optimizer, scheduler = build_optimizer(model, cfg)
    fresh = [{k: g[k] for k in HYPERPARAMETERS} for g in optimizer.param_groups]
    ds_config = deepspeed_config(cfg, world)
    resume_from = checkpoint.latest_checkpoint(run_dir) if args.resume else None
    if resume_from is not None and checkpoint.saved_world_size(resume_from[1]) != world:
        resume_from = (resume_from[0], universal_checkpoint(resume_from[1], cfg, world))
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    zero3 = engine.zero_optimization_stage() == 3

    sampler = WindowSampler(data, "train", cfg.train.seq_len, cfg.train.micro_batch, seed=cfg.train.seed,
                            rank=rank, world_size=world)
    step = 0
    if resume_from is not None:
        latest = resume_from
        if latest is not None:
            state = checkpoint.load(engine, run_dir, latest[1])
            if state.get("tokenizer_hash") not in (None, data.tokenizer_hash):
                raise BifocalError(f"{data.path} was prepared with another tokenizer than the run "
                                   f"{run_dir} (hash {data.tokenizer_hash[:12]} != {state['tokenizer_hash'][:12]})")
            sampler.load_state_dict(state["sampler"])
            step = int(state["step"])
            if changes:
                apply_hyperparameters(optimizer, scheduler, fresh)
            if is_main:
                print(f"bifocal: resumed from {latest[1]} at step {step}", flush=True)
                for key, before, after in changes:
                    print(f"bifocal: resume applies {key}: {before!r} -> {after!r}", flush=True)
                drop_rows_after(run_dir, step)  # the steps after the checkpoint are trained again
    if is_main:  # config.yaml says what runs, including the changes a resume applied
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        data.tokenizer().save(run_dir / "tokenizer")
        if hf:
            (run_dir / "init_from_hf.json").write_text(json.dumps(hf, indent=1))

    logger = MetricsLogger(run_dir, enabled=is_main, config=cfg.to_dict(), wandb_project=cfg.train.wandb_project,
                           resume=args.resume)
    stop = StopFlag()
    stop.install()
    tokens_per_step = cfg.train.micro_batch * cfg.train.grad_accum * world * cfg.train.seq_len
    pos = cfg.model.position

    def save_now(at: int) -> Path:
        state = {"step": at, "sampler": sampler.state_dict(), "tokenizer_hash": data.tokenizer_hash,
                 "world_size": world}
        return checkpoint.save(engine, run_dir, at, state, cfg.train.keep_last,
                               info={"tokenizer_hash": data.tokenizer_hash})

    bar = None
    if is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=step, desc=f"train {run_dir.name}", unit="step",
                   dynamic_ncols=True, file=sys.stdout, disable=None)
    last_ckpt = checkpoint.latest_checkpoint(run_dir)
    t_last, steps_since = time.perf_counter(), 0
    loss_acc, val_loss = 0.0, None
    try:
        while step < cfg.train.max_steps:
            step_loss, bad, norm = 0.0, 0.0, 0.0
            for micro in range(cfg.train.grad_accum):
                x, y = sampler.next_batch()
                _, loss = engine(x.to(device), y.to(device))
                value = float(loss.detach())
                # Every rank must agree before any collective inside backward/step.
                s, nonfinite = dist.all_reduce_sum([value, 0.0 if math.isfinite(value) else 1.0])
                if nonfinite:
                    bad = 1.0
                    break
                step_loss += s / world
                engine.backward(loss)
                if micro == cfg.train.grad_accum - 1 and engine.zero_optimization_stage() == 0:
                    norm = grad_norm(engine)
                engine.step()
            step += 1
            if bad:
                where = f"last good checkpoint: {last_ckpt[1]}" if last_ckpt else "no checkpoint was written"
                if cfg.train.on_nan == "stop":
                    raise BifocalError(f"loss is not finite (nan/inf) at step {step}; stopping ({where}; "
                                       f"it was not overwritten). Lower optim.lr or set train.on_nan=skip")
                engine.zero_grad()
                if is_main:
                    print(f"bifocal: warning: non-finite loss at step {step}, step skipped", flush=True)
                logger.log({"step": step, "skipped_nonfinite": 1})
            else:
                if engine.zero_optimization_stage() > 0:
                    norm = grad_norm(engine)
                loss_acc += step_loss / cfg.train.grad_accum
                steps_since += 1
            if bar is not None:
                bar.update(1)
            if steps_since and (step % cfg.train.log_every == 0 or step == cfg.train.max_steps):
                dt = time.perf_counter() - t_last
                record = {"step": step, "loss": loss_acc / steps_since, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": norm, "tokens_per_s": tokens_per_step * steps_since / max(dt, 1e-9),
                          "tokens": step * tokens_per_step}
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    if bar.disable:  # no terminal (a batch job): a plain line instead of the bar
                        print(train_line(record, cfg.train.max_steps, dt / steps_since), flush=True)
                logger.log(record)
                loss_acc, steps_since = 0.0, 0
            if validate and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.max_steps):
                val_loss = evaluate(engine, data, cfg, device)
                logger.log({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
                if is_main:  # also in logs, where the progress bar is off
                    from tqdm import tqdm

                    tqdm.write(f"step {step}/{cfg.train.max_steps}: validation loss {val_loss:.4f}", file=sys.stdout)
                logger.spectral(step, spectral_snapshot(engine.module, zero3), cfg.model.head_dim, pos.rope_base,
                                cfg.model.n_head)
            stop_now = dist.all_reduce_sum([1.0 if stop.requested else 0.0])[0] > 0
            if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == cfg.train.max_steps or stop_now:
                last_ckpt = (step, save_now(step))
            if steps_since == 0:  # throughput counts training steps only, not eval or saving
                t_last = time.perf_counter()
            if stop_now:
                if is_main:
                    print(f"\nbifocal: stopped by signal at step {step}; checkpoint {last_ckpt[1]} "
                          f"(continue with --resume)", flush=True)
                break
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    if is_main:
        summarize(run_dir, step, val_loss, cfg.train.seq_len)
    return run_dir


def summarize(run_dir: Path, step: int, val_loss: float | None, seq_len: int) -> None:
    png = plot_loss(run_dir)
    summary = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(val_loss) if val_loss is not None else None}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    latest = checkpoint.latest_checkpoint(run_dir)
    ppl = f"{summary['val_ppl']:.2f}" if val_loss is not None else "n/a"
    print(f"\nbifocal: finished at step {step}: validation loss {val_loss if val_loss is None else round(val_loss, 4)}, "
          f"perplexity {ppl}")
    print(f"  run directory   {run_dir.resolve()}")
    print(f"  metrics         {(run_dir / 'metrics.jsonl').resolve()}")
    print(f"  loss curve      {png.resolve() if png else 'n/a'}")
    print(f"  tensorboard     tensorboard --logdir {(run_dir / 'tensorboard').resolve()}")
    print(f"  checkpoint      {latest[1].resolve() if latest else 'n/a'}")
    T = seq_len
    print(f"  next            bifocal eval ppl {run_dir} --lengths {T},{2 * T},{4 * T},{8 * T}   |   "
          f"bifocal export {run_dir} --out {run_dir}/export")


def print_config(args: argparse.Namespace) -> None:
    """`bifocal train --print-config`: the resolved config as YAML, nothing written or trained."""
    import yaml

    cfg, _ = resolve_run(args)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


def main(args: argparse.Namespace) -> int:
    if getattr(args, "print_config", False):
        print_config(args)
    else:
        run(args)
    return 0
