"""Sequence parallelism on DeepSpeed-Ulysses (issue 24): `train.sequence_parallel: 2` on 2 CPU ranks
(gloo) against 1 process with the whole sequences, real DeepSpeed engines throughout.

- one micro-batch: each rank holds half of every sequence (positions and document masks of the
  whole sequence), and the loss and every gradient, position parameters included, equal the
  unsharded model's, for rope, bifocal (with grouped-query attention) and pope (with packed
  documents and GQA; rotated after the all-to-all, which moves d-wide q/k) under ZeRO 0, 2 and 3
  (ZeRO-3's reduce-scatter averaged over every rank: half the gradients);
- 2 sequence-parallel ranks train (gradient accumulation, activation checkpointing) with the
  losses of the 1-process run; under `bifocal launch` a run killed after a checkpoint resumes to
  the uninterrupted run's losses, and its checkpoint evaluates and exports as any other;
- `bifocal launch -- bench --set train.sequence_parallel=2` times it;
- configurations Ulysses cannot run are refused with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from bifocal.core.errors import BifocalError
from bifocal.run.config import load_config

from conftest import cli_env, free_port, run_cli
from test_distributed_corners import consolidated, launch, max_diff, records, train

GRADS = Path(__file__).with_name("sequence_parallel_grads.py")
SCHEMES = {  # each also exercises a second thing the all-to-all must get right
    "rope": [],
    "bifocal": ["model.n_kv_head=2"],  # query heads must land on the rank holding their key/value head
    # the mask needs every shard's documents; PoPE rotates after the all-to-all, each rank its key/value heads
    "pope": ["data.attention=document", "data.positions=reset", "model.n_kv_head=2"],
}


def gradients(cfg: Path, cwd: Path, name: str, ranks: int, *sets: str) -> dict:
    out = cwd / f"{name}.pt"
    args = [str(out), "--config", str(cfg), "--run-dir", str(cwd / name), *[a for s in sets for a in ("--set", s)]]
    results = launch(args, cwd, ranks=ranks, script=GRADS)
    assert [code for code, _ in results] == [0] * ranks, "\n".join(out[-3000:] for _, out in results)
    return torch.load(out)


@pytest.fixture(scope="module")
def unsharded(tiny_config, tmp_path_factory):
    """scheme -> loss and gradients of one process holding the whole sequences (ZeRO-0)."""
    cwd = tmp_path_factory.mktemp("sp-ref")
    return {scheme: gradients(tiny_config, cwd, scheme, 1, f"model.position.scheme={scheme}", *sets)
            for scheme, sets in SCHEMES.items()}


@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_loss_and_every_gradient_equal_the_unsharded_model(unsharded, tiny_config, tmp_path, scheme, stage):
    ref = unsharded[scheme]
    got = gradients(tiny_config, tmp_path, "sp", 2, f"model.position.scheme={scheme}", *SCHEMES[scheme],
                    "train.sequence_parallel=2", f"deepspeed.zero_stage={stage}")
    assert ref["shard"] == (4, 32) and got["shard"] == (4, 16)  # each rank held half of every sequence
    assert ref["widths"] == set() and got["widths"] == {8}  # head_dim: PoPE's 2d-wide q/k are made after the exchange
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert got["grads"].keys() == ref["grads"].keys()
    position = [name for name in ref["grads"] if ".position." in name]
    assert bool(position) == (scheme != "rope")  # Omega, A, Phi; PoPE's delta
    for name, want in ref["grads"].items():
        assert float(want.abs().max()) > 0, name
        err = float((got["grads"][name] - want).abs().max() / want.abs().max())
        assert err < 1e-5, (name, err)


def test_compiled_model_has_the_unsharded_gradients(unsharded, tiny_config, tmp_path):
    """train.compile: torch.compile traces DeepSpeed's all-to-all (an autograd.Function) into the
    graph; its backward must still carry the gradients (a traced collective can lose them)."""
    ref = unsharded["rope"]
    got = gradients(tiny_config, tmp_path, "sp", 2, "model.position.scheme=rope", "train.sequence_parallel=2",
                    "train.compile=true")
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    for name, want in ref["grads"].items():
        assert float((got["grads"][name] - want).abs().max() / want.abs().max()) < 1e-5, name


# -- training through `bifocal launch`: the same losses, kill and resume, eval and export ------------

RUN = ["model.position.scheme=pope", "deepspeed.zero_stage=2", "train.max_steps=16", "train.save_every=4",
       "train.eval_every=8", "train.keep_last=4", "train.micro_batch=2", "train.grad_accum=2",
       "train.activation_checkpointing=1"]
SP2 = [*RUN, "train.sequence_parallel=2"]


def sets(values: list[str]) -> list[str]:
    return [a for s in values for a in ("--set", s)]


@pytest.fixture(scope="module")
def runs(tiny_config, tmp_path_factory):
    """The same 16 steps (2 micro-batches of 2 accumulated, every block recomputed in the backward)
    by 1 process with the whole sequences and by 2 sequence-parallel ranks."""
    cwd = tmp_path_factory.mktemp("sp-train")
    train(tiny_config, cwd, cwd / "one", *RUN, ranks=1)
    train(tiny_config, cwd, cwd / "sp", *SP2)
    return cwd


def test_training_losses_equal_one_process(runs):
    ref, got = records(runs / "one"), records(runs / "sp")
    assert sorted(got) == list(range(1, 17))
    for step in got:
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4), step
    assert got[16]["tokens"] == ref[16]["tokens"] == 16 * 4 * 32  # a sequence counted once, not per rank
    val = [[json.loads(x)["val_loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
           for run in (runs / "one", runs / "sp")]
    assert len(val[0]) == 2 and val[1] == pytest.approx(val[0], rel=1e-5)
    assert max_diff(consolidated(runs / "sp", 16), consolidated(runs / "one", 16)) < 1e-4


def test_a_zero_checkpoint_resumes_on_its_own_rank_count_only(runs):
    """DeepSpeed records the sequence-parallel degree of a checkpoint as its tensor-parallel degree,
    and its universal converter then fails ("model-state file count 1 does not match pp_degree=1 *
    tp_degree=2"): resuming the 2-rank ZeRO-2 run on 1 rank is refused with one line, before any write."""
    run_dir = runs / "one-rank"
    shutil.copytree(runs / "sp", run_dir)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    proc = run_cli(["train", "--resume", "--run-dir", str(run_dir), "--set", "train.sequence_parallel=1"], runs,
                   check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "train.sequence_parallel=2 run under ZeRO resumes on its 2 ranks only" in proc.stderr
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_killed_and_resumed_through_bifocal_launch_equals_the_uninterrupted_run(runs, tiny_config):
    """SIGKILL to the whole `bifocal launch` once the step-4 checkpoint is complete, then
    `bifocal launch -- --resume`; then eval ppl and export read its checkpoint like any other."""
    cwd, run_dir = runs, runs / "killed"
    launcher = [sys.executable, "-m", "bifocal.launcher.cli", "launch", "--num_gpus", "2", "--master_port"]
    proc = subprocess.Popen([*launcher, str(free_port()), "--", "--config", str(tiny_config), "--run-dir", str(run_dir),
                             *sets(SP2)], cwd=cwd, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "step_00000004" / "complete.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "checkpoints" / "step_00000016").exists(), "the run finished before the kill"
    run_cli(["launch", "--num_gpus", "2", "--master_port", str(free_port()), "--", "--resume", "--run-dir",
             str(run_dir)], cwd)
    ref, got = records(runs / "sp"), records(run_dir)
    assert sorted(got) == list(range(1, 17))
    assert {s: got[s]["loss"] for s in got} == pytest.approx({s: ref[s]["loss"] for s in ref}, rel=1e-6)
    assert max_diff(consolidated(run_dir, 16), consolidated(runs / "sp", 16)) < 1e-6

    data = yaml.safe_load(tiny_config.read_text())["data"]["prepared_dir"]
    run_cli(["export", str(run_dir), "--out", str(cwd / "export")], cwd)
    ppl = {}
    for name, model in (("one", runs / "one"), ("sp", run_dir), ("export", cwd / "export")):
        out = cwd / f"ppl-{name}.json"
        run_cli(["eval", "ppl", str(model), "--data", data, "--lengths", "32", "--max-docs", "1", "--out", str(out)],
                cwd)
        ppl[name] = json.loads(out.read_text())
    values = {name: [row["ppl"] for row in result["rows"]] for name, result in ppl.items()}
    assert values["sp"] == pytest.approx(values["one"], rel=1e-4)
    assert values["export"] == pytest.approx(values["sp"], rel=1e-4)


# -- what Ulysses cannot run -------------------------------------------------------------------------

@pytest.mark.parametrize("sets_,needle", [
    (["train.sequence_parallel=3"], "train.sequence_parallel=3 must divide model.n_head=4"),
    (["train.sequence_parallel=2", "model.n_head=6", "model.n_kv_head=3", "model.d_model=48"],
     "train.sequence_parallel=2 must divide model.n_kv_head=3"),
    (["train.sequence_parallel=4", "model.max_seq_len=30"],
     "train.sequence_parallel=4 must divide model.max_seq_len=30"),
    (["train.sequence_parallel=2", "model.position.scheme=rope", "model.position.rope_scaling.type=dynamic_ntk",
      "model.position.rope_scaling.factor=2"], "cannot train with rope_scaling dynamic_ntk"),
    (["train.sequence_parallel=0"], "sequence_parallel=0 is invalid"),
], ids=["heads", "kv_heads", "length", "dynamic_ntk", "zero"])
def test_configurations_ulysses_cannot_run_are_refused(tiny_config, sets_, needle):
    with pytest.raises(BifocalError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        load_config(tiny_config, sets_)


def test_refusals_are_one_line_and_write_nothing(tiny_config, tmp_path):
    for sets_, needle in ((["train.sequence_parallel=3"], "must divide model.n_head=4"),
                          (["train.sequence_parallel=2"], "must divide the number of ranks, 1")):  # 1 process
        proc = run_cli(["train", "--config", str(tiny_config), "--run-dir", str(tmp_path / "run"), *sets(sets_)],
                       tmp_path, check=False)
        assert proc.returncode == 2 and needle in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert not (tmp_path / "run").exists()


def test_bench_under_bifocal_launch(tiny_config, tmp_path):
    """`bifocal launch -- bench --set train.sequence_parallel=2`: both ranks time the same steps and
    tokens/s counts each sequence once (4 windows of 32 tokens a step, not 4 per rank)."""
    out = tmp_path / "bench"
    run_cli(["launch", "--num_gpus", "2", "--master_port", str(free_port()), "--", "bench", "--config", str(tiny_config),
             "--data", str(tiny_config), "--schemes", "rope,pope", "--steps", "2", "--block", "1", "--warmup", "1",
             "--set", "train.sequence_parallel=2", "--out", str(out)], tmp_path)
    result = json.loads((out / "bench.json").read_text())
    assert "x2 (sequence parallel 2)" in result["title"]
    assert [row["name"] for row in result["rows"]] == ["rope", "pope"]
    for row in result["rows"]:
        assert row["tokens_per_s"] == pytest.approx(4 * 32 / (row["step_ms"] / 1e3))
