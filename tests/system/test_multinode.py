"""Multi-node launches for real, on this one machine: `bifocal launch --hostfile` through
DeepSpeed's pdsh runner and a real sshd, and the Slurm script submitted with sbatch to a real
one-node Slurm. Each trains 2 ranks, checkpoints, and resumes; its losses must equal one process
doing the same (2 ranks x micro-batch 2 see what 1 x 4 sees). The commands are the README's.

The daemons need Debian packages (tests/system/install-packages.sh, which .ci/run calls); where
they cannot start, the tests skip and say why."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bifocal.run import checkpoint
from conftest import REPO, cli_env, free_port, run_cli
from local_daemons import Unavailable, slurm, sshd

SBATCH = REPO / "configs" / "slurm" / "train.sbatch"
# Both runs: 4 steps, then resumed to 8 with the same command (the cosine schedule follows max_steps,
# so the one-process reference is stopped and resumed at the same step).
FIRST, RESUMED = ["--set", "train.max_steps=4"], ["--set", "train.max_steps=8"]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.fixture(scope="module")
def reference(tiny_config, tmp_path_factory) -> dict[int, float]:
    """One process, micro-batch 4: 4 steps, then --resume to 8."""
    cwd = tmp_path_factory.mktemp("ref")
    args = ["train", "--config", str(tiny_config), "--run-dir", "runs/ref", "--set", "train.micro_batch=4"]
    run_cli([*args, *FIRST], cwd)
    run_cli([*args, "--resume", *RESUMED], cwd)
    return losses(cwd / "runs" / "ref")


def check_two_rank_run(run_dir: Path, reference: dict[int, float], log: str) -> None:
    assert re.search(r"resumed from \S*step_00000004 at step 4", log), log[-3000:]
    assert [s for s, _ in checkpoint.complete_checkpoints(run_dir)] == [4, 8]
    assert checkpoint.saved_world_size(run_dir / "checkpoints" / "step_00000008") == 2
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 9))
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=2e-5, abs=2e-5), (step, log[-3000:])


@pytest.fixture(scope="module")
def ssh_nodes(tmp_path_factory):
    try:
        with sshd(tmp_path_factory.mktemp("sshd")) as cluster:
            yield cluster
    except Unavailable as err:
        pytest.skip(f"sshd cannot run here: {err}")


@pytest.mark.slow
def test_hostfile_over_ssh_trains_checkpoints_and_resumes(ssh_nodes, tiny_config, reference, tmp_path):
    (tmp_path / "hostfile").write_text("node1 slots=1\nnode2 slots=1\n")
    # DeepSpeed exports these to every node's ranks (its documented .deepspeed_env).
    (tmp_path / ".deepspeed_env").write_text("OMP_NUM_THREADS=1\nTOKENIZERS_PARALLELISM=false\n")
    env = ssh_nodes.env(cli_env())
    log = ""
    for extra in ([*FIRST], ["--resume", *RESUMED]):
        cmd = [sys.executable, "-m", "bifocal.launcher.cli", "launch", "--hostfile", "hostfile", "--num_nodes", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "--", "--config", str(tiny_config), "--run-dir", "runs/ssh", "--set", "train.micro_batch=2", *extra]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        assert "pdsh" in log and "node1" in log and "node2" in log  # went through the ssh runner
    check_two_rank_run(tmp_path / "runs" / "ssh", reference, log)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    try:
        with slurm(tmp_path_factory.mktemp("slurm")) as cluster:
            yield cluster
    except Unavailable as err:
        pytest.skip(f"Slurm cannot run here: {err}")


@pytest.mark.slow
def test_sbatch_script_trains_checkpoints_and_resumes(slurm_cluster, tiny_config, reference, tmp_path):
    env = slurm_cluster.env(cli_env())
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # `bifocal` as an activated venv has it
    log = ""
    for extra in (FIRST, RESUMED):
        state, job = slurm_cluster.run_job(["--nodes=1", "--ntasks-per-node=2", f"--chdir={tmp_path}", str(SBATCH),
                                            "--config", str(tiny_config), "--run-dir", "runs/slurm",
                                            "--set", "train.micro_batch=2", *extra], env)
        out = tmp_path / f"bifocal-{job}.out"  # the script's --output=%x-%j.out
        log = out.read_text() if out.exists() else f"no {out}"
        assert state == "COMPLETED", (state, log[-4000:])
    check_two_rank_run(tmp_path / "runs" / "slurm", reference, log)


def test_readme_shows_the_tested_slurm_script():
    """The README's Slurm section is the script these tests submit, verbatim."""
    assert SBATCH.read_text() in (REPO / "README.md").read_text()
