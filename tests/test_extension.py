"""Context extension: `bifocal train --init-from RUN [--step N]` starts a new run from another run's
weights (any ZeRO stage, any rank count) with its own, longer context; a fresh optimizer and
schedule; the parent and step recorded in config.yaml; one line for a parent it cannot start from."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from bifocal.run.checkpoint import consolidated_state_dict, latest_checkpoint

from conftest import run_cli
from test_distributed_corners import train


@pytest.fixture(scope="module")
def parent(tiny_config, tmp_path_factory):
    """A 2-rank ZeRO-3 bifocal run at the tiny config's 32 tokens, checkpoints at steps 4 and 8."""
    cwd = tmp_path_factory.mktemp("parent")
    run_dir = cwd / "parent"
    train(tiny_config, cwd, run_dir, "deepspeed.zero_stage=3", "train.micro_batch=2", "train.eval_every=0")
    return run_dir


def child(tiny_config, tmp_path, parent, *args: str, check: bool = True):
    return run_cli(["train", "--config", str(tiny_config), "--run-dir", str(tmp_path / "child"),
                    "--init-from", str(parent), *args], tmp_path, check=check)


def test_extension_starts_from_the_parents_weights_with_a_fresh_optimizer(tiny_config, tmp_path, parent):
    # One step at a negligible learning rate: the child's weights are still the parent's step-4 ones.
    child(tiny_config, tmp_path, parent, "--step", "4", "--set", "model.max_seq_len=64", "train.max_steps=1",
          "optim.lr=1e-12", "optim.warmup_steps=0", "train.eval_every=0",
          "model.position.rope_scaling.type=yarn", "model.position.rope_scaling.factor=2",
          "model.position.rope_scaling.original_max_len=32")
    run = tmp_path / "child"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["init_from"] == str(parent.resolve()) and cfg["train"]["init_step"] == 4
    assert cfg["model"]["max_seq_len"] == 64 and cfg["model"]["position"]["rope_scaling"]["type"] == "yarn"
    want = consolidated_state_dict(latest_checkpoint(parent, 4)[1])
    got = consolidated_state_dict(latest_checkpoint(run)[1])  # ZeRO-0 on one rank, from ZeRO-3 on two
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-9, rtol=0, msg=name)
    assert any((got[n] - latest).abs().max() > 0 for n, latest in
               consolidated_state_dict(latest_checkpoint(parent)[1]).items())  # step 4, not the newest
    # A fresh optimizer: Adam's first step of the child (the parent's ran 8), and its own schedule.
    states = torch.load(next((latest_checkpoint(run)[1]).glob("*model_states.pt")), weights_only=False)
    steps = {int(s["step"]) for s in states["optimizer"]["state"].values()}  # ZeRO-0: torch's AdamW state
    assert steps == {1}, steps
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1]
    # Evaluation keeps the scaling the run was fine-tuned with; a training-free one replaces it for a while.
    from bifocal.eval.perplexity import apply_scaling
    from bifocal.run.checkpoint import load_run_model

    model, _ = load_run_model(run)
    assert model.cfg.position.rope_scaling.type == "yarn"
    assert apply_scaling(model, None, None, [128]) == 1.0 and model.cfg.position.rope_scaling.type == "yarn"
    apply_scaling(model, "pi", 2.0, [128])
    assert model.cfg.position.rope_scaling.type == "pi"
    apply_scaling(model, None, None, [128])
    assert model.cfg.position.rope_scaling.type == "yarn" and model.cfg.position.rope_scaling.factor == 2
    # The extended run resumes from its own checkpoint (not from the parent again).
    proc = run_cli(["train", "--run-dir", str(run), "--resume", "--set", "train.max_steps=2"], tmp_path)
    assert "initialised from" not in proc.stderr and "resumed from" in proc.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["init_step"] == 4


@pytest.mark.parametrize("args,needle", [
    (["--set", "model.position.scheme=rope"], "a bifocal run; this run's scheme is rope"),
    (["--set", "model.d_model=64"], "other model settings (model.d_ff: 96 -> 192; model.d_model: 32 -> 64)"),
    (["--set", "model.position.spectral_heads=1"], "model.position.spectral_heads: 2 -> 1"),
    (["--step", "6"], "no complete checkpoint at step 6 (complete: 4, 8)"),
])
def test_an_incompatible_parent_is_refused_with_one_line(tiny_config, tmp_path, parent, args, needle):
    proc = child(tiny_config, tmp_path, parent, *args, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bifocal: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "child").exists()


def test_a_parent_on_another_tokenizer_or_no_run_is_refused(tiny_config, tmp_path, parent):
    other = tmp_path / "other"
    shutil.copytree(parent, other)
    marker = latest_checkpoint(other)[1] / "complete.json"
    info = json.loads(marker.read_text())
    marker.write_text(json.dumps({**info, "tokenizer_hash": "0" * 64}))
    for source, needle in ((other, "trained with another tokenizer (hash 000000000000)"),
                           (tmp_path, "not a bifocal run directory")):
        proc = child(tiny_config, tmp_path, source, check=False)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    proc = run_cli(["train", "--config", str(tiny_config), "--step", "4"], tmp_path, check=False)
    assert proc.returncode == 2 and "--step: only with --init-from" in proc.stderr
