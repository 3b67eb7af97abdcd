"""Distributed training that stays correct in DeepSpeed's corners (issue 26): real DeepSpeed
engines, 2 ranks on CPU (gloo), each compared with a run that must give the same numbers.

- a step skipped for a NaN loss leaves no trace at any ZeRO stage (ZeRO-2 kept the gradients of its
  earlier micro-batches and added them to the next step);
- a ZeRO-3 run resumes on fewer ranks exactly, optimizer state of every group included (DeepSpeed's
  universal load shared one step counter between the groups), and a resume that splits the global
  batch differently continues the same data, while one that changes it is refused;
- every consumer of a bf16 checkpoint reads the fp32 master weights (consolidation missed ZeRO-1/2's
  `bf16_zero_pp_rank_*` files and ZeRO-0's masters), and bf16 without ZeRO takes the same first
  Adam step as with it (DeepSpeed's wrapper counted an extra step at construction);
- dropout masks differ between ranks, initialisation does not;
- a finished two-rank run exits 0, every time.

Ranks are started the way torchrun and srun start them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
environment): the same `bifocal train` per rank as under `bifocal launch`, without the launcher's
own two Python processes, and with each rank's exit status in hand.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bifocal.run import checkpoint
from bifocal.run.config import load_config

from conftest import cli_env, free_port, run_cli, start

INJECT_NAN = Path(__file__).with_name("inject_nan.py")


def launch(args: list[str], cwd: Path, ranks: int = 2, env: dict[str, str] | None = None,
           script: Path | None = None, timeout: float = 300) -> list[tuple[int, str]]:
    """`bifocal train ARGS` (or `python SCRIPT ARGS`) on `ranks` ranks; (exit status, output) per rank."""
    port, procs = str(free_port()), []
    argv = [str(script)] if script else ["-m", "bifocal.launcher.cli", "train"]
    for rank in range(ranks):
        rank_env = {**cli_env(), **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                    "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        log = cwd / f"rank{rank}-{port}.log"  # a file, not a pipe: a full pipe would stall a collective
        procs.append((start([*argv, *args], cwd, rank_env, log), log))
    results = []
    try:
        for proc, log in procs:
            code = proc.wait(timeout=timeout)
            results.append((code, log.read_text()))
    finally:
        for proc, _ in procs:  # a rank left waiting for a peer that timed out would run on
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def train(cfg: Path, cwd: Path, run_dir: Path, *sets: str, ranks: int = 2, resume: bool = False, **kw) -> None:
    args = ["--resume", "--run-dir", str(run_dir)] if resume else ["--config", str(cfg), "--run-dir", str(run_dir)]
    results = launch([*args, *[a for s in sets for a in ("--set", s)]], cwd, ranks=ranks, **kw)
    assert [code for code, _ in results] == [0] * ranks, "\n".join(out[-3000:] for _, out in results)


def records(run_dir: Path) -> dict[int, dict]:
    """Step -> its training record (loss, grad_norm, tokens...), or {"skipped_nonfinite": 1}."""
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec or "skipped_nonfinite" in rec:
            out[rec["step"]] = rec
    return out


def consolidated(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return checkpoint.consolidated_state_dict(checkpoint.latest_checkpoint(run_dir, step)[1])


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], part: str = "") -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if part in k)


# -- 1. a skipped step leaves no trace --------------------------------------------------------------

NAN_RUN = ["train.max_steps=4", "train.grad_accum=2", "train.micro_batch=2", "train.on_nan=skip",
           "train.eval_every=0", "train.save_every=0", "train.log_every=1"]


@pytest.fixture(scope="module")
def nan_runs(tiny_config, tmp_path_factory):
    """The loss of one micro-batch of step 2 on rank 1 is NaN: the first of the step's two (it was
    back-propagated before the step was found bad) or the last. ZeRO-0 is the reference: there the
    gradients live in param.grad alone, so the position of the bad micro-batch cannot matter."""
    cwd = tmp_path_factory.mktemp("nan")
    runs = {}
    for stage, index in ((0, 2), (2, 2), (2, 3), (3, 2)):
        run_dir = cwd / f"z{stage}-{index}"
        train(tiny_config, cwd, run_dir, *NAN_RUN, f"deepspeed.zero_stage={stage}", script=INJECT_NAN,
              env={"BIFOCAL_TEST_NAN": f"1:{index}"})
        runs[stage, index] = records(run_dir)
    return runs


@pytest.mark.parametrize("stage,index", [(2, 2), (2, 3), (3, 2)])
def test_a_skipped_step_leaves_no_trace(nan_runs, stage, index):
    ref, got = nan_runs[0, 2], nan_runs[stage, index]
    assert ref[2] == got[2] == {"step": 2, "skipped_nonfinite": 1}
    for step in (3, 4):
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-5), (step, got[step], ref[step])
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-6), (step, got[step], ref[step])


# -- 2. resume on another number of ranks, or another split of the global batch ---------------------

@pytest.fixture(scope="module")
def zero3_two_ranks(tiny_config, tmp_path_factory):
    """An uninterrupted 2-rank ZeRO-3 run, micro-batch 2, checkpoints at steps 4 and 8."""
    cwd = tmp_path_factory.mktemp("z3")
    run_dir = cwd / "full"
    train(tiny_config, cwd, run_dir, "deepspeed.zero_stage=3", "train.micro_batch=2", "train.eval_every=0")
    return cwd, run_dir


def stopped_at_step_4(run_dir: Path, name: str) -> Path:
    """A copy of the run as if it had stopped after its step-4 checkpoint."""
    copy = run_dir.with_name(name)
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000008")
    return copy


@pytest.mark.parametrize("split", [("train.micro_batch=4",), ("train.micro_batch=2", "train.grad_accum=2")],
                         ids=["micro4", "micro2x2"])
def test_zero3_resumes_on_one_rank_as_the_uninterrupted_run(zero3_two_ranks, split):
    """2 ranks x 2 -> 1 rank x 4, or 1 rank x 2 x 2 accumulated: the same 4 windows a step, so the
    losses, the token count and the weights (the small position and norm groups included) continue
    as on 2 ranks; micro2x2 also needs the per-step draws of the sampler."""
    cwd, full = zero3_two_ranks
    run_dir = stopped_at_step_4(full, "one-" + "-".join(split))
    train(None, cwd, run_dir, *split, ranks=1, resume=True)
    ref, got = records(full), records(run_dir)
    assert sorted(got) == list(range(1, 9))
    for step in range(5, 9):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=2e-5, abs=2e-5), step
    assert got[8]["tokens"] == ref[8]["tokens"] == 8 * 4 * 32
    want, have = consolidated(full, 8), consolidated(run_dir, 8)
    assert max_diff(have, want, ".position.") < 2e-5  # 2e-3 with the shared step counter
    assert max_diff(have, want, "norm") < 2e-5


def test_zero0_resumes_on_fewer_ranks(tiny_config, tmp_path):
    """ZeRO-0 saves whole states that load on any rank count (the resume went through DeepSpeed's
    universal loader, which it never needed, and crashed with a traceback)."""
    full = tmp_path / "full"
    train(tiny_config, tmp_path, full, "train.micro_batch=2", "train.eval_every=0")
    run_dir = stopped_at_step_4(full, "one")
    train(None, tmp_path, run_dir, "train.micro_batch=4", ranks=1, resume=True)
    ref, got = records(full), records(run_dir)
    for step in range(5, 9):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=2e-5, abs=2e-5), step


def test_bf16_pope_zero3_resumes_on_more_ranks(tiny_config, tmp_path):
    """1 rank x micro-batch 4 -> 2 ranks x 2 in bf16, PoPE (one small position tensor a layer): the
    weights and the optimizer state come back exactly (step 5 equal); after it bf16 gradients are
    reduced over two ranks, so the losses stay within the gap between uninterrupted 1- and 2-rank
    runs (4e-4) rather than drift off on a wrong Adam state (the shared step counter: 4e-3)."""
    sets = ["model.position.scheme=pope", "deepspeed.precision=bf16", "deepspeed.zero_stage=3", "train.eval_every=0"]
    full = tmp_path / "full"
    train(tiny_config, tmp_path, full, *sets, "train.micro_batch=4", ranks=1)
    run_dir = stopped_at_step_4(full, "two")
    train(None, tmp_path, run_dir, "train.micro_batch=2", resume=True)
    ref, got = records(full), records(run_dir)
    assert got[5]["loss"] == pytest.approx(ref[5]["loss"], rel=1e-5)
    for step in (6, 7, 8):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], abs=5e-4), step


def test_every_split_of_the_global_batch_draws_the_same_windows(tiny_config):
    """Ranks x micro_batch x grad_accum = 4 in four ways: the same windows at every step, and a
    state saved under one split continues under another; another global batch is refused."""
    from bifocal.core.errors import BifocalError
    from bifocal.data_pipeline.loader import WindowSampler

    data = load_config(tiny_config).data.prepared_dir

    def steps(micro: int, ranks: int, accum: int, start: dict | None = None, n: int = 3) -> list[torch.Tensor]:
        samplers = [WindowSampler(data, "train", 32, micro, seed=5, rank=r, world_size=ranks, grad_accum=accum)
                    for r in range(ranks)]
        for s in samplers:
            if start:
                s.load_state_dict(start)
        # Global order within a step: micro-batch by micro-batch, rank by rank (what the loss averages).
        return [torch.cat([s.next_batch()[0] for _ in range(accum) for s in samplers]) for _ in range(n)]

    one = steps(4, 1, 1)
    for split in ((2, 2, 1), (2, 1, 2), (1, 2, 2)):
        assert all(torch.equal(a, b) for a, b in zip(one, steps(*split))), split
    saved = WindowSampler(data, "train", 32, 2, seed=5, world_size=2)  # rank 0 of 2, after one step
    saved.next_batch()
    state = saved.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(one[1:], steps(2, 1, 2, start=state, n=2)))
    with pytest.raises(BifocalError, match="draws 4 windows a step"):
        WindowSampler(data, "train", 32, 2, seed=5).load_state_dict(state)


def test_resume_that_changes_the_global_batch_is_refused(zero3_two_ranks):
    cwd, full = zero3_two_ranks
    run_dir = stopped_at_step_4(full, "refused")
    before = {p: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "metrics.jsonl")}
    code, out = launch(["--resume", "--run-dir", str(run_dir), "--set", "train.micro_batch=2"], cwd, ranks=1)[0]
    assert code == 2
    errors = [line for line in out.splitlines() if line.startswith("bifocal: error:")]
    assert len(errors) == 1 and "cannot change the global batch" in errors[0] and "2 x 1 x 2 = 4" in errors[0], out[-2000:]
    assert "e.g. train.micro_batch=4 on 1 rank " in errors[0]
    assert {p: p.read_bytes() for p in before} == before
    assert not (run_dir / "checkpoints" / "universal").exists()


# -- 3 and 6. bf16: the fp32 master weights, and the same first step at every stage ------------------

@pytest.fixture(scope="module")
def bf16_runs(tiny_config, tmp_path_factory):
    """Two bf16 steps at each ZeRO stage on 2 ranks, the same data and initialisation."""
    cwd = tmp_path_factory.mktemp("bf16")
    for stage in (0, 1, 2, 3):
        train(tiny_config, cwd, cwd / f"z{stage}", "deepspeed.precision=bf16", f"deepspeed.zero_stage={stage}",
              "train.micro_batch=2", "train.max_steps=2", "train.eval_every=0")
    return cwd


def test_bf16_checkpoints_consolidate_to_the_fp32_masters(bf16_runs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights = {stage: consolidated(bf16_runs / f"z{stage}", 2) for stage in (0, 1, 2, 3)}
    for stage in (1, 2, 3):  # exactly DeepSpeed's own consolidation
        path = checkpoint.latest_checkpoint(bf16_runs / f"z{stage}", 2)[1]
        ds = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        assert all(torch.equal(weights[stage][k], ds[k].float()) for k in ds), stage
    amplitude = weights[3]["blocks.0.attn.position.amplitude"]
    assert not torch.equal(amplitude, amplitude.bfloat16().float())  # fp32 values, not bf16-rounded ones
    for stage in (0, 1, 2):  # the same masters at every stage (up to bf16 gradients reduced otherwise)
        assert max_diff(weights[stage], weights[3]) < 1e-4, stage  # 4e-3 from bf16 rounding or the extra Adam step
    # Evaluation and generation load through load_run_model, export through it too.
    model, _ = checkpoint.load_run_model(bf16_runs / "z1")
    assert all(torch.equal(p.float(), weights[1][k]) for k, p in model.state_dict().items())


def test_bf16_without_zero_takes_adams_first_step(bf16_runs):
    """Step 1 moves the norm weights (init 1) by the learning rate times sign-like Adam ratios; with
    DeepSpeed's extra construction step it moved 0.735 of that. ZeRO-0 and ZeRO-1 agree."""
    z0, z1 = consolidated(bf16_runs / "z0", 2), consolidated(bf16_runs / "z1", 2)
    assert max_diff(z0, z1, ".position.") < 1e-5
    assert max_diff(z0, z1, "norm") < 1e-5


def test_bf16_export_carries_the_fp32_masters(bf16_runs, tmp_path):
    from safetensors.torch import load_file

    run_cli(["export", str(bf16_runs / "z2"), "--out", str(tmp_path / "hf")], tmp_path)
    exported = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        exported.update(load_file(f))
    masters = consolidated(bf16_runs / "z2", 2)
    amplitude = [v for k, v in exported.items() if k.endswith("amplitude")]
    assert amplitude and all(v.dtype == torch.float32 for v in amplitude)
    assert any(torch.equal(v, masters["blocks.0.attn.position.amplitude"]) for v in amplitude)


# -- 4. randomness per rank where it should differ, shared where it must agree ----------------------

def test_dropout_masks_differ_between_ranks_initialisation_does_not(tiny_config, tmp_path):
    """ZeRO-3 partitions each rank's own copy of the model, so an initialisation that differed
    between ranks would show in the consolidated weights; a learning rate of 1e-30 leaves them at
    their initialisation after the step."""
    run_dir = tmp_path / "drop"
    train(tiny_config, tmp_path, run_dir, "model.dropout=0.1", "deepspeed.zero_stage=3", "train.micro_batch=2",
          "train.max_steps=1", "train.eval_every=0", "optim.lr=1e-30")
    path = checkpoint.latest_checkpoint(run_dir)[1]
    masks = []
    for rank in (0, 1):
        torch.set_rng_state(torch.load(path / f"rng_rank{rank:05d}.pt", weights_only=True)["torch"])
        masks.append(torch.nn.functional.dropout(torch.ones(4096), 0.1))
    assert not torch.equal(masks[0], masks[1])  # the same masks on every rank before
    from bifocal.model import GPT

    cfg = load_config(run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    init = GPT(cfg.model).state_dict()
    weights = consolidated(run_dir, 1)
    for name, value in init.items():
        assert torch.allclose(weights[name], value, rtol=0, atol=1e-12), name


# -- 5. a finished run exits 0 ----------------------------------------------------------------------

def test_finished_two_rank_runs_exit_cleanly_every_time(tiny_config, tmp_path):
    """About 1 in 15 finished two-rank runs aborted at interpreter exit ("terminate called without
    an active exception", exit 250 through the launcher) while the process group was alive. The
    cheapest whole run: one layer, one step of one sequence per rank, then its checkpoint and files."""
    start, failures = time.perf_counter(), []
    for i in range(20):
        results = launch(["--config", str(tiny_config), "--run-dir", str(tmp_path / f"r{i}"), "--set", "model.n_layer=1",
                          "train.max_steps=1", "train.micro_batch=1", "train.eval_every=0"], tmp_path)
        failures += [(i, code, out[-500:]) for code, out in results if code != 0 or "terminate called" in out]
    print(f"20 two-rank runs in {time.perf_counter() - start:.0f} s")
    assert not failures, failures


# -- 6. nothing is left in /dev/shm ------------------------------------------------------------------

def test_deepspeed_shared_memory_is_released(tiny_config, tmp_path):
    """DeepSpeed's CPU all-reduce keeps ~69 MB per rank in /dev/shm and never unlinks it; a day of
    test runs filled the machine's memory. Each rank releases its buffer once all ranks mapped it,
    and says so (no line: DeepSpeed renamed its buffer, see run/distributed.shm_buffer)."""
    from bifocal.run.distributed import SHM_DIR

    # LOCAL_SIZE: what the deepspeed launcher sets, and what makes DeepSpeed use shared memory.
    env = {"LOCAL_SIZE": "2", "BIFOCAL_LOG_LEVEL": "debug", "BIFOCAL_LOG_RANKS": "all"}
    results = launch(["--config", str(tiny_config), "--run-dir", str(tmp_path / "run"), "--set", "model.n_layer=1",
                      "train.max_steps=2", "train.micro_batch=1", "train.eval_every=0"], tmp_path, env=env)
    assert [code for code, _ in results] == [0, 0], "\n".join(out[-3000:] for _, out in results)
    for rank, (_, out) in enumerate(results):
        # The buffer this rank released, by name: other runs (parallel test workers) may hold theirs.
        line = re.search(rf"\[rank{rank}\]: bifocal: debug: released DeepSpeed's shared-memory buffer (\S+)", out)
        assert line, out[-3000:]
        assert Path(line[1]).parent == SHM_DIR and not Path(line[1]).exists()


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tiny_config, tmp_path):
    """A process killed while torch held its JIT build lock left `lock` behind, and every later run
    waited on it forever (a CI lane hung). One older than any build is removed, with a warning;
    a young one (a build under way elsewhere) is left to torch."""
    import os

    from bifocal.run.distributed import STALE_BUILD_S, clear_stale_build_locks, extensions_dir

    ops = tmp_path / "ops"
    built = extensions_dir() / "deepspeed_shm_comm"
    shutil.copytree(built, ops / "deepspeed_shm_comm") if built.is_dir() else (ops / "deepspeed_shm_comm").mkdir(parents=True)
    lock = ops / "deepspeed_shm_comm" / "lock"
    lock.touch()
    assert clear_stale_build_locks(ops) == [] and lock.exists()  # just taken: a build may be running
    old = time.time() - STALE_BUILD_S - 60
    os.utime(lock, (old, old))
    env = {**cli_env(), "TORCH_EXTENSIONS_DIR": str(ops)}
    proc = subprocess.run([sys.executable, "-m", "bifocal.launcher.cli", "train", "--config", str(tiny_config),
                           "--run-dir", str(tmp_path / "run"), "--set", "model.n_layer=1", "train.max_steps=1",
                           "train.eval_every=0"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"bifocal: warning: removed {lock}: a build lock left by a killed process" in proc.stderr
    assert not lock.exists()
