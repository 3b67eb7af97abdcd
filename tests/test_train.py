"""Training under real DeepSpeed engines on CPU (gloo): one process, two ranks with ZeRO 1-3,
two "nodes", exact resume, kill -9, bad configs and NaN losses."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bifocal.run import checkpoint
from bifocal.run.config import load_config
from bifocal.core.errors import BifocalError

from conftest import cli_env, free_port, run_cli


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> training loss; a step logged twice (killed, then resumed) keeps its last value."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def train(cfg: Path, cwd: Path, name: str, *sets: str, ranks: int = 1, extra: list[str] | None = None):
    args = ["--config", str(cfg), "--set", f"train.run_name={name}", *[a for s in sets for a in ("--set", s)], *(extra or [])]
    if ranks == 1:
        return run_cli(["train", *args], cwd)
    return run_cli(["launch", "--num_gpus", str(ranks), "--master_port", str(free_port()), "--", *args], cwd)


@pytest.fixture(scope="module")
def reference(tiny_config, tmp_path_factory):
    """One process, micro-batch 4: the run the others are compared with."""
    cwd = tmp_path_factory.mktemp("ref")
    proc = train(tiny_config, cwd, "ref")
    return cwd / "runs" / "ref", proc


def test_one_process_run_is_complete(reference):
    run_dir, proc = reference
    ls = losses(run_dir)
    assert sorted(ls) == list(range(1, 9))
    assert ls[8] < ls[1] - 0.1
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json", "tokenizer"):
        assert (run_dir / name).exists(), name
    assert [s for s, _ in checkpoint.complete_checkpoints(run_dir)] == [4, 8]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_rss_mb"} <= set(records[0])
    assert records[0]["mfu"] is None and records[0]["peak_rss_mb"] > 0  # a CPU has no known peak FLOP/s
    assert any("val_loss" in r for r in records)
    assert "run directory" in proc.stdout and str(run_dir.resolve()) in proc.stdout
    # TensorBoard events are readable and hold the scalars and the spectral histograms.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"histograms": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "train/loss" in tags["scalars"] and "val/val_loss" in tags["scalars"]
    assert len(acc.Scalars("train/loss")) == 8
    assert any("omega" in t for t in tags["histograms"]) and any("phase" in t for t in tags["histograms"])
    assert "spectral/frequencies_vs_rope" in tags["images"]
    # The run's hyperparameters (HPARAMS tab) with its final numbers.
    assert acc.PluginTagToContent("hparams") and "hparam/val_loss" in tags["scalars"]
    # No terminal (captured output): a plain training line every log_every (1 here) steps, in the log.
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("bifocal: step ") and "tokens/s" in ln]
    assert [ln.split(":")[1] for ln in lines] == [f" step {s}/8" for s in range(1, 9)]
    assert re.fullmatch(r"bifocal: step 8/8: loss \d+\.\d{4}, lr [\d.e-]+, [\d,]+ tokens/s, ETA 0m00s", lines[-1])
    assert "\r" not in proc.stderr and "\x1b[" not in proc.stderr  # no bar drawn into the log


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="the wandb extra is not installed")
def test_wandb_logging_offline(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny_config, tmp_path, "wb", "train.max_steps=2", "train.eval_every=2", "train.wandb_project=bifocal-test")
    [offline] = (tmp_path / "runs" / "wb" / "wandb").glob("offline-run-*-wb")
    [records] = offline.glob("run-wb.wandb")  # what `wandb sync` uploads: config, history, summary
    data = records.read_bytes()
    for needle in (b"bifocal-test", b"max_steps", b"train/loss", b"train/tokens_per_s", b"val/val_loss"):
        assert needle in data, needle


def test_wandb_missing_is_one_line(tiny_config, tmp_path):
    script = ("import sys; sys.modules['wandb'] = None\n"
              "from bifocal.launcher.cli import main\n"
              f"sys.exit(main(['train', '--config', {str(tiny_config)!r}, '--set', 'train.wandb_project=p']))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("bifocal: error: train.wandb_project='p' needs wandb: "
                                                    "pip install 'bifocal[wandb]'")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_match_one_process(reference, tiny_config, tmp_path, stage):
    """Two ranks with micro-batch 2 see exactly the batches one process sees with micro-batch 4."""
    run_cli_out = train(tiny_config, tmp_path, f"z{stage}", f"deepspeed.zero_stage={stage}", "train.micro_batch=2",
                        "train.save_every=8", ranks=2)
    ref = losses(reference[0])
    got = losses(tmp_path / "runs" / f"z{stage}")
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=2e-5, abs=2e-5), (step, run_cli_out.stdout[-500:])
    meta = json.loads((tmp_path / "runs" / f"z{stage}" / "checkpoints" / "step_00000008" / "complete.json").read_text())
    assert meta["world_size"] == 2


@pytest.mark.slow  # inductor compiles the model's kernels: about a minute on 2 cores
@pytest.mark.parametrize("stage", [0, 3])
def test_compile_and_activation_checkpointing_train_like_the_reference(reference, tiny_config, tmp_path, stage):
    sets = [f"train.run_name=fast{stage}", "train.compile=true", "train.activation_checkpointing=1",
            f"deepspeed.zero_stage={stage}", "train.eval_every=0", "train.save_every=8"]
    run_cli(["train", "--config", str(tiny_config), *[a for s in sets for a in ("--set", s)]], tmp_path, timeout=1200)
    ref, got = losses(reference[0]), losses(tmp_path / "runs" / f"fast{stage}")
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4), step


def test_resume_is_bitwise_identical(reference, tiny_config, tmp_path):
    run_dir = tmp_path / "runs" / "half"
    train(tiny_config, tmp_path, "half", "train.max_steps=8")
    # Simulate a run that stopped after step 4: drop the final checkpoint and the later records,
    # and leave a half-written newer checkpoint (killed during a save) that must be ignored.
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step_00000008")
    (run_dir / "checkpoints" / "step_00000007").mkdir()
    (run_dir / "checkpoints" / "step_00000007" / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    proc = run_cli(["train", "--resume", "--run-dir", str(run_dir)], tmp_path)
    assert "resumed from" in proc.stderr and "step_00000004" in proc.stderr
    ref, got = losses(reference[0]), losses(run_dir)
    assert [got[s] for s in range(5, 9)] == [ref[s] for s in range(5, 9)]  # bitwise on CPU fp32


def test_kill_9_then_resume_two_ranks(tiny_config, tmp_path):
    """Killed twice (once mid-run after a checkpoint, once while a checkpoint is being written),
    resumed each time: the losses equal an uninterrupted run's bit for bit, one row per step."""
    sets = ["deepspeed.zero_stage=2", "train.micro_batch=2", "train.max_steps=40", "train.save_every=4",
            "train.eval_every=0", "train.keep_last=3"]
    train(tiny_config, tmp_path, "full", *sets, ranks=2)
    run_dir = tmp_path / "runs" / "killed"
    first = ["--config", str(tiny_config), "--set", "train.run_name=killed", *[a for s in sets for a in ("--set", s)]]
    resume = ["--resume", "--run-dir", str(run_dir)]

    def kill_when(args: list[str], moment) -> None:
        cmd = [sys.executable, "-m", "bifocal.launcher.cli", "launch", "--num_gpus", "2", "--master_port",
               str(free_port()), "--", *args]
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 240
        while not moment():
            assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    ckpt = run_dir / "checkpoints"
    kill_when(first, lambda: (ckpt / "step_00000008" / "complete.json").exists())
    assert max(losses(run_dir)) < 40, "the run finished before the kill"
    # Inside a save: DeepSpeed has started writing step 20, its marker is not there yet.
    kill_when(resume, lambda: (ckpt / "step_00000020").is_dir())
    assert max(losses(run_dir)) < 40, "the run finished before the second kill"
    run_cli(["launch", "--num_gpus", "2", "--master_port", str(free_port()), "--", *resume], tmp_path)
    ref, got = losses(tmp_path / "runs" / "full"), losses(run_dir)
    assert sorted(got) == list(range(1, 41))
    assert got == ref
    logged = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert logged == list(range(1, 41))  # the killed attempts' rows after their checkpoints were dropped


def test_two_nodes_through_bifocal_launch(tiny_config, tmp_path):
    """The launcher's per-node mode (`--no_ssh --node_rank`, for nodes without ssh between them), on localhost."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "bifocal.launcher.cli", "launch", "--hostfile", str(hostfile),
                               "--no_ssh", "--node_rank", str(r), "--master_addr", "127.0.0.1", "--master_port", port,
                               "--", "--config", str(tiny_config), "--set", "train.run_name=nodes",
                               "--set", "train.max_steps=4", "--set", "train.micro_batch=2"],
                              cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    meta = json.loads((tmp_path / "runs" / "nodes" / "checkpoints" / "step_00000004" / "complete.json").read_text())
    assert meta["world_size"] == 2


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_config, tmp_path):
    proc = run_cli(["train", "--config", str(tiny_config), "--set", "train.run_name=nan", "--set", "optim.lr=1e30",
                    "--set", "optim.warmup_steps=0", "--set", "train.save_every=1", "--set", "train.max_steps=20",
                    "--set", "train.eval_every=0"], tmp_path, check=False)
    assert proc.returncode == 2
    line = [x for x in proc.stderr.splitlines() if x.startswith("bifocal: error:")]
    assert len(line) == 1 and "not finite" in line[0] and "last good checkpoint" in line[0]
    run_dir = tmp_path / "runs" / "nan"
    done = checkpoint.complete_checkpoints(run_dir)
    assert done and max(losses(run_dir)) == done[-1][0]  # nothing after the last good step was saved
    # A second start without --resume refuses to touch the existing run.
    again = run_cli(["train", "--config", str(tiny_config), "--set", "train.run_name=nan"], tmp_path, check=False)
    assert again.returncode == 2 and "--resume" in again.stderr
    assert checkpoint.complete_checkpoints(run_dir) == done


def test_nan_skip_mode_continues(tiny_config, tmp_path):
    proc = run_cli(["train", "--config", str(tiny_config), "--set", "train.run_name=skip", "--set", "optim.lr=1e30",
                    "--set", "optim.warmup_steps=0", "--set", "train.on_nan=skip", "--set", "train.max_steps=6",
                    "--set", "train.eval_every=0"], tmp_path)
    assert "step skipped" in proc.stderr
    assert checkpoint.latest_checkpoint(tmp_path / "runs" / "skip")[0] == 6


@pytest.mark.parametrize("stage", [0, 2])
def test_skipped_steps_with_accumulation_leave_weights_untouched(tiny_config, tmp_path, stage):
    """lr=1e18: step 1 leaves finite weights near 1e18, then every attention score overflows. With
    two micro-batches per step the first one's backward has run before the step is found bad; its
    gradients must go, not the weights."""
    run_cli(["train", "--config", str(tiny_config), "--set", "train.run_name=acc", "--set", "optim.lr=1e18",
             "--set", "optim.warmup_steps=0", "--set", "train.on_nan=skip", "--set", "train.max_steps=5",
             "--set", "train.grad_accum=2", "--set", "train.micro_batch=2", "--set", "train.save_every=1",
             "--set", "train.keep_last=5", "--set", "train.eval_every=0", "--set", f"deepspeed.zero_stage={stage}"],
            tmp_path)
    run_dir = tmp_path / "runs" / "acc"
    trained = sorted(losses(run_dir))
    assert trained and trained == list(range(1, len(trained) + 1)) and trained[-1] < 5  # then only skips
    good = checkpoint.consolidated_state_dict(checkpoint.latest_checkpoint(run_dir, trained[-1])[1])
    last = checkpoint.consolidated_state_dict(checkpoint.latest_checkpoint(run_dir, 5)[1])
    for name, value in good.items():
        assert torch.isfinite(value).all() and torch.equal(value, last[name]), name


@pytest.mark.parametrize("override,needle", [
    ("train.max_step=5", "did you mean `max_steps`"),
    ("optim.lr=fast", "optim.lr='fast' is invalid"),
    ("model.position.scheme=alibi", "one of rope, bifocal, spectral, pope, nope"),
    ("deepspeed.zero_stage=4", "zero_stage=4"),
    ("data.tokenizer.type=wordpiece", "tokenizer.type='wordpiece'"),
])
def test_bad_config_values_are_one_clear_error(override, needle):
    with pytest.raises(BifocalError) as err:
        load_config(None, [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bad_config_exits_nonzero_with_one_line(tmp_path):
    proc = run_cli(["train", "--set", "trian.max_steps=3"], tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "bifocal: error: unknown config section `trian`: did you mean `train`?"
    missing = run_cli(["train", "--config", str(tmp_path / "nope.yaml")], tmp_path, check=False)
    assert missing.returncode == 2 and "config file not found" in missing.stderr
    assert not (tmp_path / "runs").exists()


def test_resume_on_a_different_number_of_ranks(reference, tiny_config, tmp_path):
    """A 2-rank ZeRO-2 checkpoint resumes on 1 rank through DeepSpeed's universal checkpoint; with
    micro-batch 4 the single rank draws the same global batches, so losses match the reference."""
    import shutil

    run_dir = tmp_path / "runs" / "uni"
    train(tiny_config, tmp_path, "uni", "deepspeed.zero_stage=2", "train.micro_batch=2", ranks=2)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000008")
    proc = run_cli(["train", "--resume", "--run-dir", str(run_dir), "--set", "train.micro_batch=4"], tmp_path)
    assert "universal checkpoint" in proc.stderr and "resumed from" in proc.stderr
    ref, got = losses(reference[0]), losses(run_dir)
    for step in range(5, 9):
        assert got[step] == pytest.approx(ref[step], rel=2e-5, abs=2e-5), step


def test_sigterm_saves_a_checkpoint_and_resume_continues(tiny_config, tmp_path):
    run_dir = tmp_path / "runs" / "term"
    args = [sys.executable, "-m", "bifocal.launcher.cli", "train", "--config", str(tiny_config), "--run-dir", str(run_dir),
            "--set", "train.max_steps=400", "--set", "train.save_every=4", "--set", "train.eval_every=0"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "step_00000004" / "complete.json").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    assert "stopped by signal" in out
    stopped_at = max(losses(run_dir))
    assert stopped_at < 400 and checkpoint.latest_checkpoint(run_dir)[0] == stopped_at
    resumed = run_cli(["train", "--resume", "--run-dir", str(run_dir), "--set", f"train.max_steps={stopped_at + 2}"], tmp_path)
    assert f"at step {stopped_at}" in resumed.stderr
    assert checkpoint.latest_checkpoint(run_dir)[0] == stopped_at + 2
