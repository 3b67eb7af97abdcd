"""`bifocal train` with the loss of one training micro-batch made NaN on one rank: the fault a
diverging step produces, placed where a test wants it. Started once per rank, as torchrun or srun
start `bifocal train` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment):

    BIFOCAL_TEST_NAN=RANK:INDEX python tests/inject_nan.py [train options]

multiplies the loss of the INDEX-th (0-based) training-mode forward of rank RANK by NaN, so its
backward fills every gradient with NaN, as an overflow would. It is a forward hook on the model
(torch's public `register_module_forward_hook`); DeepSpeed and bifocal run unchanged.
"""

from __future__ import annotations

import os
import sys

import torch

from bifocal.launcher.cli import main
from bifocal.model import GPT

TARGET_RANK, TARGET_INDEX = map(int, os.environ["BIFOCAL_TEST_NAN"].split(":"))
seen = 0


def poison(module: torch.nn.Module, args, output):
    global seen
    if not isinstance(module, GPT) or not module.training:
        return None
    index, seen = seen, seen + 1
    if int(os.environ["RANK"]) != TARGET_RANK or index != TARGET_INDEX:
        return None
    logits, loss = output
    return logits, loss * float("nan")


if __name__ == "__main__":
    torch.nn.modules.module.register_module_forward_hook(poison)
    sys.exit(main(["train", *sys.argv[1:]]))
