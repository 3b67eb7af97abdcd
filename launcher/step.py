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
    loss: float                # mean training loss over micro-batches and ranks (nan/inf if bad)
    finite: bool               # False: the step was not applied
    stop: bool                 # some rank asked to stop (SIGTERM/SIGINT)
    grad_norm: float | None    # only when asked for (it costs a host sync of its own)


def grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is not None:
        return float(norm)
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))) if grads else 0.0


def agree(values: torch.Tensor) -> list[float]:
    """Sum a small device tensor over ranks and read it back: the step's one host sync."""
    if dist.world_size() > 1:
        torch.distributed.all_reduce(values)
    return values.tolist()


def discard_gradients(engine) -> None:
    """Drop what the step's earlier micro-batches accumulated, without an optimizer step."""
    engine.zero_grad()
    zero_grad = getattr(engine.optimizer, "zero_grad", None)
    if zero_grad is not None:
        zero_grad(set_to_none=True)


def train_step(engine, sampler, device: str, grad_accum: int, stop_requested: bool = False,
               want_grad_norm: bool = False) -> StepResult:
    """Forward/backward over `grad_accum` micro-batches, then the optimizer step unless a loss was
    not finite on some rank (the gradients are then discarded and the caller decides)."""
    zero_stage = engine.zero_optimization_stage()
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for micro in range(grad_accum):
        last = micro == grad_accum - 1
        if grad_accum > 1:
            # Explicit boundaries: a skipped step must not shift DeepSpeed's micro-step counter.
            engine.set_gradient_accumulation_boundary(last)
        x, y = sampler.next_batch()
        _, loss = engine(x.to(device, non_blocking=True), y.to(device, non_blocking=True), return_logits=False)
        loss_sum = loss_sum + loss.detach().float()
        if not last:
            engine.backward(loss)
            engine.step()
    flags = torch.stack([loss_sum, (~torch.isfinite(loss_sum)).float(),
                         torch.tensor(float(stop_requested), device=device)])
    total, nonfinite, stop = agree(flags)
    world = dist.world_size()
    result = StepResult(loss=total / (world * grad_accum), finite=not nonfinite, stop=stop > 0, grad_norm=None)
    if nonfinite:
        discard_gradients(engine)
        return result
    engine.backward(loss)
    if want_grad_norm and zero_stage == 0:
        result.grad_norm = grad_norm(engine)  # stage 0 clears the gradients in step()
    engine.step()
    if want_grad_norm and zero_stage > 0:
        result.grad_norm = grad_norm(engine)
    return result
