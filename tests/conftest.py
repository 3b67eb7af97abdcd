"""Shared fixtures: a tiny real corpus slice, a tiny run config, and a CLI runner for
multi-process tests (real DeepSpeed engines on CPU with gloo)."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import settings

# Fuzz tests (tests/test_fuzz.py): CI runs a fixed set of examples (derandomized, so a red run is
# reproducible and never random); BIFOCAL_FUZZ=random draws 20x more, new ones each run, by hand.
settings.register_profile("ci", derandomize=True, max_examples=120, deadline=None, print_blob=True)
settings.register_profile("random", derandomize=False, max_examples=2400, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("BIFOCAL_FUZZ", "ci"))

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """`bifocal ARGS` in a fresh process, as a user would run it."""
    proc = subprocess.run([sys.executable, "-m", "bifocal.launcher.cli", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"bifocal {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _slice(src: Path, dst: Path, n_docs: int, chars: int) -> None:
    with gzip.open(src, "rt", encoding="utf-8") as f, gzip.open(dst, "wt", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i == n_docs:
                break
            doc = json.loads(line)
            out.write(json.dumps({"source": doc["source"], "text": doc["text"][:chars]}) + "\n")


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    """A YAML run config: a 2-layer bifocal model on slices of the bundled corpora, data
    prepared once for the session."""
    root = tmp_path_factory.mktemp("tiny")
    _slice(DATA / "nl_small_austen.jsonl.gz", root / "austen.jsonl.gz", 6, 40_000)
    _slice(DATA / "code_small_pystdlib.jsonl.gz", root / "code.jsonl.gz", 40, 6_000)
    cfg = {
        "model": {"n_layer": 2, "n_head": 4, "d_model": 32, "max_seq_len": 32,
                  "position": {"scheme": "bifocal", "spectral_heads": 2, "spectral_lr_mult": 3.0}},
        "data": {"sources": [{"name": "austen", "path": "austen.jsonl.gz"}, {"name": "code", "path": "code.jsonl.gz"}],
                 "tokenizer": {"type": "bpe", "vocab_size": 512, "train_chars": 200_000},
                 "val_fraction": 0.1, "prepared_dir": str(root / "prepared")},
        "train": {"run_name": "tiny", "micro_batch": 4, "max_steps": 8, "log_every": 1,
                  "eval_every": 4, "eval_batches": 2, "save_every": 4, "keep_last": 2},
        "optim": {"lr": 1.0e-2, "warmup_steps": 2},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_cli(["prepare", str(path)], cwd=root)
    return path


def perturb_position_params(model) -> None:
    """Move position parameters off their initialisation (delta into [-2pi, 0]), so anything that
    dropped or reset them would change the logits."""
    import math

    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("position.delta"):
                p.uniform_(-2 * math.pi, 0)
            elif ".position." in name:
                p.add_(0.05 * torch.randn_like(p))
