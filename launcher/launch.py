"""`bifocal launch [deepspeed launcher options] -- [train options]`.

Runs `bifocal train` (or `bifocal bench`, named first after `--`) in every rank through
DeepSpeed's own launcher, so everything it supports works: several GPUs on one machine
(`--num_gpus 8`), several nodes over ssh (`--hostfile`, `--num_nodes`, `--master_addr`), or one
launcher per node started by something else (`--no_ssh --node_rank N` with the same hostfile on
every node). Under Slurm no launcher is needed:
`srun bifocal train` starts the ranks itself (configs/slurm/train.sbatch, run/slurm.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from bifocal.core import logs
from bifocal.core.errors import BifocalError

log = logs.get_logger(__name__)


def build_command(launcher_args: list[str]) -> list[str]:
    """deepspeed runner argv: its options, then this package's CLI as a module with `train`, or
    `bench` when named (and this command's log settings, which reach the ranks on every node)."""
    args = list(launcher_args)
    if "--" in args:
        split = args.index("--")
        ds_args, train_args = args[:split], args[split + 1:]
    else:
        ds_args, train_args = args, []
    command = train_args.pop(0) if train_args and train_args[0] in ("train", "bench") else "train"
    if "--module" in ds_args:
        raise BifocalError("bifocal launch adds --module itself; pass only launcher options before `--`")
    return [sys.executable, "-u", "-m", "deepspeed.launcher.runner", *ds_args, "--module",
            "bifocal.launcher.cli", *logs.forward_args(), command, *train_args]


def main(args: argparse.Namespace) -> int:
    cmd = build_command(args.launcher_args)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    log.info(" ".join(cmd[2:]))
    return subprocess.call(cmd, env=env)
