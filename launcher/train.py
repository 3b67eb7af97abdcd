"""The per-rank training loop around a DeepSpeed engine (one process or many).

`run` only orchestrates, as torchtitan's `Trainer.train` does; each component owns its cadence:

    state = setup(...)                        # setup.py: data, model, engine, resume
    while state.step < train.max_steps:
        progress.before_step(state)           # the lr and loss scale the coming step uses
        result = train_step(state, ...)       # one optimizer step; a non-finite loss is handled here
        progress.after_step(state, result)    # metrics every train.log_every steps
        validation.after_step(state)          # validation loss every train.eval_every steps
        checkpoints.after_step(state, ...)    # a checkpoint every train.save_every steps, or on a signal
    finish(...)                               # summary.json, loss curve, what to run next

Batches are counter-based, so a resumed run, or a run on a different number of ranks with the
same global batch, sees exactly the same data.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bifocal.core import logs
from bifocal.core.errors import BifocalError
from bifocal.data_pipeline.loader import WindowSampler
from bifocal.model.flops import flops_per_token
from bifocal.model.position import spectral_init_freq
from bifocal.run import checkpoint, distributed as dist
from bifocal.run.metrics import MetricsLogger, plot_loss, spectral_snapshot, train_line

from . import step as engine_step
from .setup import TrainState, lock_run_dir, resolve_run, setup
from .step import StepResult
from .throughput import mfu, peak_flops, peak_memory_mb, reset_peak_memory

log = logs.get_logger(__name__)


def train_step(state: TrainState, stop_requested: bool, want_grad_norm: bool) -> StepResult:
    """One optimizer step over `train.grad_accum` micro-batches (collective; see step.py for the
    single host sync), then the policy for a non-finite loss on any rank: with `train.on_nan=stop`
    the run stops and the newest checkpoint stays as it is; with `skip` the step's gradients are
    dropped and the step still counts."""
    t = state.cfg.train
    result = engine_step.train_step(state.engine, state.sampler, state.device, t.grad_accum,
                                    stop_requested=stop_requested, want_grad_norm=want_grad_norm)
    state.step += 1
    if not result.finite:
        if t.on_nan == "stop":
            last = checkpoint.latest_checkpoint(state.run_dir)
            where = f"last good checkpoint: {last[1]}" if last else "no checkpoint was written"
            raise BifocalError(f"loss is not finite (nan/inf) at step {state.step}; stopping ({where}; "
                               f"it was not overwritten). Lower optim.lr or set train.on_nan=skip")
        log.warning(f"non-finite loss at step {state.step}, step skipped")
    return result


class Progress:
    """Training metrics every `train.log_every` steps and at the last; a progress bar on a terminal,
    else a `step N/M: loss ...` line at the same steps (logs.progress). Throughput counts training
    time only: the clock restarts after validation and saving."""

    def __init__(self, state: TrainState, metrics: MetricsLogger) -> None:
        self.metrics, self.every, self.max_steps = metrics, state.cfg.train.log_every, state.cfg.train.max_steps
        self.loss_sum, self.steps, self.clock = 0.0, 0, time.perf_counter()
        cfg = state.cfg
        self.flops_per_token = flops_per_token(state.engine.module.cfg, cfg.model.max_seq_len)
        self.peak = peak_flops(state.device, cfg.deepspeed.precision, cfg.train.peak_tflops)
        reset_peak_memory(state.device)
        self.lrs, self.loss_scale = [float("nan")], None
        self.bar = logs.progress(total=self.max_steps, initial=state.step, desc=f"train {state.run_dir.name}",
                                 unit="step", lines=0, log=log, dynamic_ncols=True)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.max_steps

    def before_step(self, state: TrainState) -> None:
        """What the coming step uses, read before it runs: the engine steps the scheduler (and an
        fp16 loss scaler) at the end of the step, so reading them afterwards gives the next step's.
        The lr of every param group, from the torch optimizer the engine steps."""
        self.lrs = [float(g["lr"]) for g in state.scheduler.optimizer.param_groups]
        engine = state.engine
        # every DeepSpeed fp16 optimizer (fused, unfused, ZeRO 1-3) has the `loss_scale` property
        self.loss_scale = float(engine.optimizer.loss_scale) if engine.fp16_enabled() else None

    def after_step(self, state: TrainState, result: StepResult) -> None:
        if result.finite:
            self.loss_sum += result.loss
            self.steps += 1
        else:
            self.metrics.log({"step": state.step, "skipped_nonfinite": 1})
        self.bar.update(1)
        if self.steps and self.due(state.step):
            dt = time.perf_counter() - self.clock
            tokens_per_s = state.tokens_per_step * self.steps / max(dt, 1e-9)
            record = {"step": state.step, "loss": self.loss_sum / self.steps, "lr": self.lrs[0],
                      # every group, in the model's order (param_groups: decay, no_decay, position)
                      **{f"lr_group{i}": lr for i, lr in enumerate(self.lrs)},
                      **({} if self.loss_scale is None else {"loss_scale": self.loss_scale}),
                      "grad_norm": result.grad_norm or 0.0, "tokens_per_s": tokens_per_s,
                      "tokens": state.step * state.tokens_per_step,
                      "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak, dist.world_size()),
                      **dict([peak_memory_mb(state.device)])}  # since the previous record (CUDA)
            reset_peak_memory(state.device)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if self.bar.plain:  # no terminal (a batch job): a line instead of the bar
                log.info(train_line(record, self.max_steps, dt / self.steps))
            self.metrics.log(record)
            self.loss_sum, self.steps = 0.0, 0

    def restart_clock(self) -> None:
        """After validation and saving; a window still accumulating steps keeps its start."""
        if self.steps == 0:
            self.clock = time.perf_counter()

    def close(self) -> None:
        self.bar.close()


class Validation:
    """Validation loss over the same `train.eval_batches` windows every `train.eval_every` steps
    and at the last (never with data.val_fraction=0), and a snapshot of the position parameters."""

    def __init__(self, state: TrainState, metrics: MetricsLogger) -> None:
        self.metrics, self.enabled = metrics, state.validate
        self.every, self.max_steps = state.cfg.train.eval_every, state.cfg.train.max_steps
        self.last_loss: float | None = None

    def due(self, step: int) -> bool:
        return self.enabled and (bool(self.every and step % self.every == 0) or step == self.max_steps)

    def after_step(self, state: TrainState) -> None:
        if not self.due(state.step):
            return
        loss = self.last_loss = evaluate(state)
        self.metrics.log({"step": state.step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50))})
        log.info(f"step {state.step}/{self.max_steps}: validation loss {loss:.4f}")
        model = state.cfg.model
        snapshot = spectral_snapshot(state.engine.module, state.engine.zero_optimization_stage() == 3)
        self.metrics.spectral(state.step, snapshot, spectral_init_freq(model).numpy(), model.n_head)


def evaluate(state: TrainState) -> float:
    """Mean validation loss over the same `eval_batches` windows every time (collective)."""
    cfg, engine = state.cfg, state.engine
    sampler = WindowSampler(state.data, "val", cfg.model.max_seq_len, cfg.train.micro_batch, seed=cfg.train.seed + 1,
                            rank=dist.data_parallel_rank(), world_size=dist.data_parallel_size(),
                            positions=cfg.data.positions, attention=cfg.data.attention,
                            shard=(dist.sequence_parallel_rank(), dist.sequence_parallel_size()))
    engine.eval()
    total = 0.0
    with torch.no_grad():
        for _ in range(cfg.train.eval_batches):
            batch = sampler.sample().to(state.device)
            _, loss = engine(batch.inputs, batch.labels, return_logits=False, **batch.model_kwargs())
            total += float(loss)
    engine.train()
    # Under sequence parallelism the ranks of a sequence each hold a share of its loss.
    return dist.all_reduce_sum([total])[0] / (cfg.train.eval_batches * dist.data_parallel_size())


class Checkpoints:
    """A checkpoint every `train.save_every` steps, at the last step, and when a signal asks to stop."""

    def __init__(self, state: TrainState) -> None:
        t = state.cfg.train
        self.every, self.max_steps, self.keep_last = t.save_every, t.max_steps, t.keep_last
        self.last: Path | None = None

    def after_step(self, state: TrainState, stopping: bool) -> None:
        step = state.step
        if bool(self.every and step % self.every == 0) or step == self.max_steps or stopping:
            self.last = checkpoint.save(state.engine, state.run_dir, step, state.client_state(), self.keep_last,
                                        info={"tokenizer_hash": state.data.tokenizer_hash})


@dataclass
class StopFlag:
    """SIGTERM/SIGINT ask for a checkpoint at the end of the current step, agreed across ranks
    (the flag travels in the step's all-reduce)."""

    requested: bool = False
    signals: list[int] = field(default_factory=list)

    def install(self) -> None:
        def handler(signum, frame):
            self.requested = True
            self.signals.append(signum)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def train(state: TrainState) -> float | None:
    """Step until train.max_steps or a signal; returns the last validation loss."""
    cfg = state.cfg
    metrics = MetricsLogger(state.run_dir, enabled=state.is_main, config=cfg.to_dict(),
                            wandb_project=cfg.train.wandb_project, resume=state.resume)
    progress, validation, checkpoints = Progress(state, metrics), Validation(state, metrics), Checkpoints(state)
    stop = StopFlag()
    stop.install()
    failing = True
    try:
        while state.step < state.cfg.train.max_steps:
            progress.before_step(state)
            result = train_step(state, stop.requested, want_grad_norm=progress.due(state.step + 1))
            progress.after_step(state, result)
            validation.after_step(state)
            checkpoints.after_step(state, stopping=result.stop)
            progress.restart_clock()
            if result.stop:
                log.warning(f"stopped by signal at step {state.step}; checkpoint {checkpoints.last} "
                            f"(continue with --resume)")
                break
        failing = False
    finally:
        progress.close()
        metrics.close(quiet=failing)  # a run failing with its own error line gets no more lines
    return validation.last_loss


def run(args: argparse.Namespace) -> Path:
    cfg, run_dir = resolve_run(args)
    dist.setup_environment(cfg.train.threads)
    device = dist.resolve_device(cfg.train.device)
    with dist.process_group(device):
        lock = lock_run_dir(run_dir)
        state = None
        try:
            state = setup(args, cfg, run_dir, device)
            val_loss = train(state)
            if state.is_main:
                finish(run_dir, state.step, val_loss, cfg.model.max_seq_len)
        finally:
            lock.release()
            # The engine and the process groups it holds (sequence-parallel ones included) go
            # before the process group is destroyed, not at interpreter exit, where a group torn
            # down late can abort a finished rank ("terminate called without an active exception").
            del state
    return run_dir


def finish(run_dir: Path, step: int, val_loss: float | None, seq_len: int) -> None:
    """Rank 0: summary.json, the loss curve, and where everything is. The checkpoints are
    complete by now: a file here that cannot be written is a warning, not a failed run."""
    summary = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(val_loss) if val_loss is not None else None}
    png = None
    try:
        png = plot_loss(run_dir)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    except OSError as exc:
        log.warning(f"{exc.filename or run_dir}: cannot be written ({exc.strerror}); the checkpoints are complete")
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
