"""Hostile files and faults: no command runs code from a file it reads, a failing command writes
nothing, one writer per run directory, and damaged inputs give one line and exit 2."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_payload(path: Path, marker: Path, form: str) -> None:
    if form == "torch":
        torch.save({"module": Payload(marker)}, path)  # the zip format torch and DeepSpeed write
    else:
        path.write_bytes(pickle.dumps(Payload(marker), protocol=2))  # a bare pickle


def one_error_line(proc) -> str:
    """The run failed with exit 2 and a single `bifocal: error:` line, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("bifocal: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root (and the set of directories), to prove nothing changed."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def zero1_run(tiny_config, tmp_path_factory) -> Path:
    """A finished one-process ZeRO-1 run with one checkpoint (model states, optimizer shard, RNG)."""
    cwd = tmp_path_factory.mktemp("z1")
    run_dir = cwd / "run"
    run_cli(["train", "--config", str(tiny_config), "--run-dir", str(run_dir), "--set", "deepspeed.zero_stage=1",
             "--set", "train.max_steps=2", "--set", "train.save_every=2", "--set", "train.eval_every=0"], cwd)
    return run_dir


def poisoned_copy(run_dir: Path, tmp_path: Path, pattern: str, form: str) -> tuple[Path, Path]:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    target = next((copy / "checkpoints" / "step_00000002").glob(pattern))
    marker = tmp_path / "PWNED"
    write_payload(target, marker, form)
    return copy, marker


@pytest.mark.parametrize("command", ["eval", "generate", "export", "resume"])
def test_poisoned_model_states_never_run(zero1_run, tmp_path, command):
    run_dir, marker = poisoned_copy(zero1_run, tmp_path, "mp_rank_00_model_states.pt",
                                    "torch" if command in ("eval", "resume") else "pickle")
    args = {"eval": ["eval", "ppl", str(run_dir), "--lengths", "32", "--max-docs", "1"],
            "generate": ["generate", str(run_dir), "--prompt", "It is", "--max-new-tokens", "2"],
            "export": ["export", str(run_dir), "--out", str(tmp_path / "export")],
            "resume": ["train", "--resume", "--run-dir", str(run_dir), "--set", "train.max_steps=3"]}[command]
    line = one_error_line(run_cli(args, tmp_path, check=False))
    assert not marker.exists()
    assert "mp_rank_00_model_states.pt" in line and "refused" in line
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("pattern", ["*optim_states.pt", "rng_rank00000.pt"])
def test_poisoned_optimizer_or_rng_file_never_runs_on_resume(zero1_run, tmp_path, pattern):
    run_dir, marker = poisoned_copy(zero1_run, tmp_path, pattern, "torch")
    line = one_error_line(run_cli(["train", "--resume", "--run-dir", str(run_dir), "--set", "train.max_steps=3"],
                                  tmp_path, check=False))
    assert not marker.exists() and "refused" in line and pattern.strip("*") in line


def test_truncated_checkpoint_file_is_one_line(zero1_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(zero1_run, copy)
    states = copy / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    line = one_error_line(run_cli(["generate", str(copy), "--prompt", "It", "--max-new-tokens", "2"], tmp_path, check=False))
    assert "mp_rank_00_model_states.pt" in line and "truncated" in line


def test_safe_load_refuses_payload_in_process(tmp_path):
    """The restricted loader itself: a payload is refused before any code of it runs, while a real
    DeepSpeed-free state dict loads."""
    from bifocal.launcher import safe_load
    from bifocal.launcher.errors import UserError

    marker = tmp_path / "PWNED"
    for form in ("torch", "pickle"):
        bad = tmp_path / f"bad-{form}.pt"
        write_payload(bad, marker, form)
        with pytest.raises(UserError, match="refused"):
            safe_load.load(bad)
        with pytest.raises(UserError, match="refused"):
            safe_load.verify([bad])
    assert not marker.exists()
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(3.0), "n": 1, "t": ("MT19937", torch.zeros(2, dtype=torch.int64))}, good)
    assert torch.equal(safe_load.load(good)["w"], torch.arange(3.0))
