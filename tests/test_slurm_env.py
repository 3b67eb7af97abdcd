"""`srun bifocal train`: Slurm's task variables become torch.distributed's (the end-to-end run is
tests/system/test_multinode.py; this covers the cases one machine cannot: several nodes)."""

from __future__ import annotations

from bifocal.run.slurm import BASE_PORT, rank_environment, tasks_per_node


def step(**over: str) -> dict[str, str]:
    """Task 11 of a 2-node, 8-tasks-per-node srun step (what srun sets in its environment)."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "11", "SLURM_LOCALID": "3",
           "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_STEP_NODELIST": "gpu[03-04]",
           "MASTER_ADDR": "gpu03"}
    return {**env, **over}


def test_a_task_of_a_multi_node_step_gets_its_rank():
    assert rank_environment(step()) == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
                                        "MASTER_ADDR": "gpu03", "MASTER_PORT": str(BASE_PORT + 242)}


def test_every_task_of_a_job_agrees_on_the_port_and_an_exported_one_wins():
    ports = {rank_environment(step(SLURM_PROCID=str(r)))["MASTER_PORT"] for r in range(16)}
    assert len(ports) == 1
    assert rank_environment(step(MASTER_PORT="6000"))["MASTER_PORT"] == "6000"


def test_uneven_nodes_give_each_task_its_own_node_size():
    env = step(SLURM_STEP_TASKS_PER_NODE="8,4(x2)", SLURM_NODEID="2", SLURM_STEP_NUM_TASKS="16")
    assert rank_environment(env)["LOCAL_WORLD_SIZE"] == "4"
    assert tasks_per_node("8(x2),4") == [8, 8, 4]


def test_batch_script_and_one_task_steps_stay_one_process():
    batch = {k: v for k, v in step().items() if not k.startswith("SLURM_STEP")}  # sbatch sets no step variables
    assert rank_environment(batch) is None
    assert rank_environment(step(SLURM_STEP_NUM_TASKS="1")) is None
    assert rank_environment({}) is None
