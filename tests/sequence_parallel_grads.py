"""One training micro-batch through bifocal's own setup (config, sampler, model, DeepSpeed engine,
sequence-parallel groups when train.sequence_parallel > 1) and its backward; rank 0 saves the
loss of the micro-batch's sequences and every parameter's full gradient, read with DeepSpeed's
public `safe_get_full_grad` (any ZeRO stage; a collective under ZeRO-3), before any update, and
the widths of the queries and keys that DistributedAttention exchanged.
Started once per rank, as torchrun or srun start `bifocal train`:

    python tests/sequence_parallel_grads.py OUT.pt --config CFG --run-dir DIR [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys

import torch
from deepspeed.utils import safe_get_full_grad

from bifocal.launcher.setup import resolve_run, setup
from bifocal.run import distributed as dist


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--config")
    parser.add_argument("--run-dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    args.resume, args.init_from, args.init_from_hf, args.step = False, None, None, None
    cfg, run_dir = resolve_run(args)
    dist.setup_environment(cfg.train.threads)
    with dist.process_group("cpu"):
        state = setup(args, cfg, run_dir, "cpu")
        widths = set()  # the last dimension of the queries and keys DeepSpeed's all-to-all moved
        for module in state.engine.module.modules():
            if type(module).__name__ == "DistributedAttention":
                module.register_forward_pre_hook(lambda m, a: widths.update((a[0].shape[-1], a[1].shape[-1])))
        batch = state.sampler.sample()
        _, loss = state.engine(batch.inputs, batch.labels, return_logits=False, **batch.model_kwargs())
        state.engine.backward(loss)
        grads = {name: safe_get_full_grad(p).clone() for name, p in state.engine.module.named_parameters()}
        # Each rank's loss is its share of its sequences' mean; the shares of a sequence add up.
        total = dist.all_reduce_sum([float(loss)])[0] / dist.data_parallel_size()
        if dist.rank() == 0:
            torch.save({"loss": total, "grads": grads, "shard": tuple(batch.inputs.shape), "widths": widths}, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
