"""Everything before the first training step, in order: config and run directory, process group
and the run-directory lock, data (prepared by rank 0 when missing), the checks a resume must pass,
the model (native, or a spectralized Hugging Face model), AdamW with per-group learning-rate
multipliers and warmup+cosine, the DeepSpeed engine, and the resumed state. Every check comes
before the first write into the run directory, so a refused start changes nothing.

`setup` returns the small `TrainState` that the loop in train.py steps forward.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bifocal.core import logs
from bifocal.core.errors import BifocalError
from bifocal.data_pipeline.loader import PreparedData, WindowSampler
from bifocal.run import checkpoint, distributed as dist
from bifocal.run.config import RunConfig, check_sequence_parallel, deepspeed_config, load_config, save_config
from bifocal.run.metrics import drop_rows_after, require_wandb
from bifocal.run.run_lock import RunLock

from . import preflight

log = logs.get_logger(__name__)


@dataclass
class TrainState:
    """What the loop reads and advances: the engine, its data stream and the step count."""

    cfg: RunConfig
    run_dir: Path
    device: str
    engine: Any  # deepspeed.DeepSpeedEngine
    scheduler: torch.optim.lr_scheduler.LambdaLR  # also stepped by the engine; read for the logged lr
    data: PreparedData
    sampler: WindowSampler
    validate: bool  # False when data.val_fraction=0
    resume: bool  # started with --resume
    param_names: list[list[list[str]]]  # optimizer group -> parameter -> its names (see group_parameter_names)
    step: int = 0

    @property
    def is_main(self) -> bool:
        return dist.rank() == 0

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch * t.grad_accum * dist.data_parallel_size() * self.cfg.model.max_seq_len

    def client_state(self) -> dict[str, Any]:
        """What a checkpoint stores beside DeepSpeed's own state, so a resume sees the same data."""
        return {"step": self.step, "sampler": self.sampler.state_dict(), "tokenizer_hash": self.data.tokenizer_hash,
                "world_size": dist.world_size(), "param_group_names": self.param_names}


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


def unshare_step_counters(optimizer: torch.optim.Optimizer) -> None:
    """Give each parameter's optimizer state its own `step` tensor. DeepSpeed's ZeRO-3 universal
    load stores one tensor object as the step of every group, and torch's Adam increments it in
    place, so with three groups it would advance three times per step: the norms' bias correction
    one step ahead, the position parameters' two (up to 2e-3 off after the first update)."""
    seen: set[int] = set()
    for param_state in optimizer.state.values():
        step = param_state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                param_state["step"] = step.clone()
            seen.add(id(step))


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


def group_parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[list[str]]]:
    """Each optimizer group's parameters by name, a tied parameter by all of its names; taken
    before DeepSpeed wraps the optimizer. Saved with every checkpoint, because without ZeRO
    DeepSpeed saves bf16/fp16 training's fp32 master weights group by group without names
    (checkpoint.consolidated_state_dict reads them back)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def build_optimizer(model: torch.nn.Module, cfg: RunConfig):
    groups = model.param_groups(cfg.optim.weight_decay)
    for g in groups:
        g["lr"] = cfg.optim.lr * g.pop("lr_mult")
        g.pop("name", None)
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    return opt, sched


def resolve_run(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """Config and run directory. `--resume` without `--config` reuses the run's own config;
    `--init-from RUN --step N` are train.init_from / train.init_step."""
    overrides = list(args.overrides)
    if getattr(args, "step", None) is not None and not getattr(args, "init_from", None):
        raise BifocalError("--step: only with --init-from RUN (the parent run's checkpoint to start from)")
    if getattr(args, "init_from", None):
        if getattr(args, "init_from_hf", None):
            raise BifocalError("--init-from and --init-from-hf: one or the other")
        overrides += [f"train.init_from={Path(args.init_from).resolve()}"]
        overrides += [f"train.init_step={args.step}"] if args.step is not None else []
    args.overrides = overrides
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


def prepare_data(cfg: RunConfig) -> PreparedData:
    """Rank 0 prepares the data when missing; the others wait. Returns the opened PreparedData."""
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


def build_model(cfg: RunConfig, data: PreparedData, hf: dict | None) -> torch.nn.Module:
    """The model, initialised from `train.seed` alone, so every rank builds the same one (ZeRO-3
    partitions each rank's own copy; the spectralized model's phases are drawn too)."""
    torch.manual_seed(cfg.train.seed)
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
    return GPT(cfg.model)


def init_from_parent(model: torch.nn.Module, cfg: RunConfig, parent: tuple[int, Path]) -> None:
    """Put the parent run's weights (fp32 masters, any ZeRO stage and rank count: see
    checkpoint.consolidated_state_dict) into the freshly built model, before DeepSpeed wraps it;
    records the step taken in cfg.train.init_step."""
    step, path = parent
    state = checkpoint.consolidated_state_dict(path)
    model.load_state_dict(state, strict=True)  # shapes were checked by preflight.check_init_from
    cfg.train.init_step = step
    log.info(f"initialised from {cfg.train.init_from} at step {step} (its weights; a fresh optimizer and schedule)")


def seed_rank(seed: int, rank: int) -> None:
    """After the model is built: this rank's own torch generators (CPU and CUDA), for what must
    differ between ranks, the dropout masks; two ranks drawing the same masks would correlate the
    halves of the global batch. The seed is (seed, rank) through numpy's SeedSequence, so runs with
    neighbouring seeds share no stream. Initialisation (`build_model`) and the data order
    (loader.py) stay shared; a resume restores each rank's saved generator state instead."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


def initialize_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, ds_config: dict,
                      mpu=None):
    """`deepspeed.initialize`, without the optimizer step DeepSpeed's fp16/bf16 wrappers for ZeRO-0
    take on zero gradients to create the optimizer state (`initialize_optimizer_states` of
    FP16_UnfusedOptimizer and FP16_Optimizer, DeepSpeed 0.19.8). With AdamW that step counts: every
    later bias correction comes one step late (the first update is 0.735 of the learning rate; with
    betas 0.9/0.95 the lag fades over some 30 steps) and the matrices are decayed once. Weight decay
    is held at 0 through it (a zero-gradient Adam step then moves nothing) and the state it created
    is dropped, so the first real step is Adam's step 1, as under ZeRO 1-3 and fp32. `mpu`: the
    sequence-parallel groups (distributed.init_sequence_parallel), or None."""
    import deepspeed

    decay = [g["weight_decay"] for g in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
                                          mpu=mpu)
    for group, value in zip(optimizer.param_groups, decay):
        group["weight_decay"] = value
    optimizer.state.clear()
    return engine


def universal_checkpoint(path: Path, world: int) -> Path:
    """A ZeRO checkpoint saved on another number of ranks loads through DeepSpeed's universal format."""
    if dist.rank() == 0:
        log.info(f"{path.name} was saved on {checkpoint.saved_world_size(path)} ranks, resuming on {world}: "
                 "converting to a universal checkpoint")
        checkpoint.to_universal(path)
    dist.barrier()
    return path.parent / "universal" / path.name


def refuse_universal_sequence_parallel(run_dir: Path, path: Path) -> None:
    """A ZeRO checkpoint of a sequence-parallel run resumes on its own rank count only: DeepSpeed
    0.19.8 records its sequence-parallel degree as the tensor-parallel degree (parallel_state_sp's
    model-parallel aliases), and its universal converter then looks for that many model-state files."""
    saved = load_config(run_dir / "config.yaml").train.sequence_parallel
    if saved > 1:
        ranks = checkpoint.saved_world_size(path)
        raise BifocalError(f"--resume: {path.name} of a train.sequence_parallel={saved} run under ZeRO resumes on its "
                           f"{ranks} ranks only (DeepSpeed cannot convert it to a universal checkpoint); nothing was "
                           f"written")


def resume(state: TrainState, path: Path, changes: list[tuple[str, Any, Any]], optimizer: torch.optim.Optimizer,
           fresh: list[dict]) -> None:
    """Load engine, optimizer, schedule, RNG and the sampler position from a checkpoint; then put
    back the hyperparameters the resumed config changed (`fresh`: this config's, per group)."""
    client = checkpoint.load(state.engine, state.run_dir, path)
    data = state.data
    if client.get("tokenizer_hash") not in (None, data.tokenizer_hash):
        raise BifocalError(f"{data.path} was prepared with another tokenizer than the run {state.run_dir} "
                           f"(hash {data.tokenizer_hash[:12]} != {client['tokenizer_hash'][:12]})")
    state.sampler.load_state_dict(client["sampler"])
    state.step = int(client["step"])
    # Always, not only when the config changed: DeepSpeed's ZeRO-3 universal load gives every group
    # the hyperparameters of group 0 (lr, weight decay); this run's config is the truth either way.
    apply_hyperparameters(optimizer, state.scheduler, fresh)
    unshare_step_counters(optimizer)
    log.info(f"resumed from {path} at step {state.step}")
    for key, before, after in changes:
        log.info(f"resume applies {key}: {before!r} -> {after!r}")
    if state.is_main:
        drop_rows_after(state.run_dir, state.step)  # the steps after the checkpoint are trained again


def write_run_files(cfg: RunConfig, run_dir: Path, data: PreparedData, hf: dict | None) -> None:
    """Rank 0: what evaluation and export read back besides checkpoints. config.yaml says what
    runs, including the changes a resume applied."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    data.tokenizer().save(run_dir / "tokenizer")
    if hf:
        (run_dir / "init_from_hf.json").write_text(json.dumps(hf, indent=1))


def setup(args: argparse.Namespace, cfg: RunConfig, run_dir: Path, device: str) -> TrainState:
    """Collective, while this process holds the run directory: every rank builds the same engine;
    returns the state at the first step to run."""
    rank, world = dist.rank(), dist.world_size()
    sp = cfg.train.sequence_parallel
    check_sequence_parallel(sp, cfg.model, world)
    check_run_dir(run_dir, args.resume)
    require_wandb(cfg.train.wandb_project)

    data = prepare_data(cfg)
    hf = hf_source(args, run_dir, cfg)
    if cfg.train.init_from and hf:
        raise BifocalError("train.init_from and --init-from-hf: one or the other")
    if hf and sp > 1:
        raise BifocalError(f"train.sequence_parallel={sp}: bifocal's own model only, not --init-from-hf")
    changes = preflight.check_resume(run_dir, cfg, data, from_hf=bool(hf), world=world) if args.resume else []
    resume_from = checkpoint.latest_checkpoint(run_dir) if args.resume else None
    # A resumed extension continues from its own checkpoint; the parent is read only at the start.
    parent = preflight.check_init_from(cfg, data) if cfg.train.init_from and resume_from is None else None
    validate = preflight.check_validation(cfg, data, rank, world)
    model = build_model(cfg, data, hf)
    if parent is not None:
        init_from_parent(model, cfg, parent)
    seed_rank(cfg.train.seed, rank)
    if hf:
        cfg.model = model.cfg  # the Hugging Face model's own shape, for logging and evaluation
    optimizer, scheduler = build_optimizer(model, cfg)
    fresh = [{k: g[k] for k in HYPERPARAMETERS} for g in optimizer.param_groups]
    param_names = group_parameter_names(model, optimizer)
    ds_config = deepspeed_config(cfg, world)
    log.debug(f"rank {rank} of {world} on {device}, {torch.get_num_threads()} threads; DeepSpeed config "
              f"{json.dumps(ds_config)}")
    if resume_from is not None and checkpoint.saved_world_size(resume_from[1]) != world and cfg.deepspeed.zero_stage:
        # ZeRO's partitions follow the rank count; ZeRO-0 keeps everything whole, loadable on any.
        refuse_universal_sequence_parallel(run_dir, resume_from[1])
        resume_from = (resume_from[0], universal_checkpoint(resume_from[1], world))
        ds_config["checkpoint"] = {"load_universal": True}
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    mpu = dist.init_sequence_parallel(sp)
    if mpu is not None:
        model.set_sequence_parallel(dist.sequence_parallel_group())
    engine = initialize_engine(model, optimizer, scheduler, ds_config, mpu)
    if cfg.train.compile:
        engine.compile()  # the module in place: checkpoint keys stay the same

    sampler = WindowSampler(data, "train", cfg.model.max_seq_len, cfg.train.micro_batch, seed=cfg.train.seed,
                            rank=dist.data_parallel_rank(), world_size=dist.data_parallel_size(),
                            grad_accum=cfg.train.grad_accum, positions=cfg.data.positions, attention=cfg.data.attention,
                            shard=(dist.sequence_parallel_rank(), sp))
    state = TrainState(cfg=cfg, run_dir=run_dir, device=device, engine=engine, scheduler=scheduler, data=data,
                       sampler=sampler, validate=validate, resume=args.resume, param_names=param_names)
    if resume_from is not None:
        resume(state, resume_from[1], changes, optimizer, fresh)
    if rank == 0:
        write_run_files(cfg, run_dir, data, hf)
    return state
