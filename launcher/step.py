"""One optimizer step on a DeepSpeed engine, with one host sync and one collective in all.

Reading a GPU scalar (`float(loss)`) blocks the host until the GPU has finished everything queued
so far, so doing it per micro-batch keeps the GPU idle while the host prepares the next one. Here
the losses of the micro-batches are summed on the device, and a single all-reduce of
(loss sum, non-finite flag, stop flag) is read back before the last micro-batch's backward, the
one that reaches the optimizer: a non-finite loss anywhere in the step, on any rank, still keeps
the step from touching the weights and the optimizer state, and a signal on any rank still stops
every rank at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bifocal.run import distributed as dist


@dataclass
class StepResult:
    loss: float                # mean training loss over micro-batches and sequences (nan/inf if bad)
    finite: bool               # False: the step was not applied
    stop: bool                 # some rank asked to stop (SIGTERM/SIGINT)
    grad_norm: float | None    # only when asked for (it costs a host sync of its own)


def grad_norm(engine) -> float:
    """The step's global gradient norm before clipping. ZeRO reports its own after `step()`.
    Without ZeRO the gradients are whole on every rank once backward has all-reduced them, so they
    are read before `step()` clears them (bf16's wrapper would report the previous step's norm)."""
    if engine.zero_optimization():
        return float(engine.get_global_grad_norm())
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))) if grads else 0.0


def agree(values: torch.Tensor) -> list[float]:
    """Sum a small device tensor over ranks and read it back: the step's one host sync."""
    if dist.world_size() > 1:
        torch.distributed.all_reduce(values)
    return values.tolist()


def skip_step(engine, loss: torch.Tensor) -> None:
    """Collective: drop everything the step's micro-batches accumulated, on every rank, without an
    update, and without advancing the learning-rate schedule (as DeepSpeed's own overflow skips).

    DeepSpeed keeps what the micro-batches of an accumulation window contributed where its ZeRO
    stage wants it (`param.grad`; ZeRO-2's reduced partitions, which its `zero_grad` inside a window
    leaves in place, so the next step added them to its own) and clears it all when a step consumes
    the window. So the bad step runs to its end like any other, last backward and `engine.step()`,
    with only the update taken out: DeepSpeed's overflow check skips it where it has one (ZeRO 1-3
    in 0.19.8, the bf16/fp16 wrappers), and our own optimizer's `step` does nothing meanwhile for
    where it has none (fp32 without ZeRO; ZeRO 1-3 before 0.19.8 check only fp16).
    """
    scheduler = engine.lr_scheduler  # ours: deepspeed.initialize(lr_scheduler=...); .optimizer is our AdamW
    optimizer = scheduler.optimizer
    schedule, lrs = scheduler.state_dict(), [group["lr"] for group in optimizer.param_groups]
    optimizer.step = lambda *args, **kwargs: None  # shadows the class's step for this one call
    try:
        engine.backward(loss)
        engine.step()
    finally:
        del optimizer.step
    scheduler.load_state_dict(schedule)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


def train_step(engine, sampler, device: str, grad_accum: int, stop_requested: bool = False,
               want_grad_norm: bool = False) -> StepResult:
    """Forward/backward over `grad_accum` micro-batches, then the optimizer step unless a loss was
    not finite on some rank (the step is then skipped, see `skip_step`, and the caller decides)."""
    zero = engine.zero_optimization()
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for micro in range(grad_accum):
        last = micro == grad_accum - 1
        if grad_accum > 1:
            # Explicit boundaries: a skipped step must not shift DeepSpeed's micro-step counter.
            engine.set_gradient_accumulation_boundary(last)
        batch = sampler.sample().to(device)
        _, loss = engine(batch.inputs, batch.labels, return_logits=False, **batch.model_kwargs())
        loss_sum = loss_sum + loss.detach().float()
        if not last:
            engine.backward(loss)
            engine.step()
    flags = torch.stack([loss_sum, (~torch.isfinite(loss_sum)).float(),
                         torch.tensor(float(stop_requested), device=device)])
    total, nonfinite, stop = agree(flags)
    # Under sequence parallelism each rank's loss is its share of its sequences' mean: count sequences.
    result = StepResult(loss=total / (dist.data_parallel_size() * grad_accum), finite=not nonfinite, stop=stop > 0,
                        grad_norm=None)
    if nonfinite:
        skip_step(engine, loss)
        return result
    engine.backward(loss)
    if want_grad_norm and not zero:
        result.grad_norm = grad_norm(engine)  # without ZeRO, step() clears the gradients
    engine.step()
    if want_grad_norm and zero:
        result.grad_norm = grad_norm(engine)
    return result
