"""Ranks from Slurm: `srun bifocal train` starts one task per rank, and each task finds its rank,
the world size and rank 0's address in what srun sets, not in torch.distributed's variables.

Only tasks of a job step (srun) are ranks: a batch script has SLURM_NTASKS and SLURM_PROCID too,
but no SLURM_STEP_NUM_TASKS, so `bifocal train` run there stays one process.
"""

from __future__ import annotations

import subprocess
from typing import Mapping

from bifocal.core.errors import BifocalError

# Outside Linux's ephemeral range (32768-60999), so it cannot collide with a port in use by a client.
BASE_PORT = 29500


def tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's compressed per-node task counts: "8(x2),4" -> [8, 8, 4]."""
    counts: list[int] = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("gpu[03-06,09]" -> "gpu03"), as Slurm itself expands it
    (`scontrol show hostnames`); raises BifocalError when scontrol cannot."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as err:
        raise BifocalError(f"cannot expand the Slurm node list {nodelist!r} with scontrol ({err}); "
                        f"export MASTER_ADDR before srun") from None
    return out[0]


def rank_environment(env: Mapping[str, str]) -> dict[str, str] | None:
    """torch.distributed's variables for a task of a multi-task srun step, None outside one.

    MASTER_ADDR / MASTER_PORT already in the environment win; otherwise rank 0 is the step's
    first node and the port is derived from the job id, so every task agrees without talking."""
    if "SLURM_STEP_NUM_TASKS" not in env or int(env["SLURM_STEP_NUM_TASKS"]) < 2:
        return None
    node = int(env.get("SLURM_NODEID", "0"))
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "LOCAL_WORLD_SIZE": str(tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"])[node]),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env["SLURM_STEP_NODELIST"]),
        "MASTER_PORT": env.get("MASTER_PORT") or str(BASE_PORT + int(env["SLURM_JOB_ID"]) % 1000),
    }
