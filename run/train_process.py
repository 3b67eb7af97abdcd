"""The one way a study starts a training run: `bifocal train` in a child process.

Studies (bifocal.eval) sit beside training (bifocal.launcher), not above it, so they never import
it: a run is trained by the `bifocal` command in its own process, as a user would start it, and
read back from its run directory. tests/test_architecture.py holds every module outside launcher/
to that (no `bifocal.launcher` import, not even as a command-line string).

A run counts as finished when its summary.json (written at the end of `bifocal train`) records a
step of at least the config's train.max_steps; a finished run is reused, one with a complete
checkpoint is resumed, and one that died before its first checkpoint is started afresh.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from bifocal.core.errors import BifocalError

from . import checkpoint


def finished_step(run_dir: Path) -> int | None:
    """The step a run directory's summary.json records (None: not finished, or no summary)."""
    try:
        return int(json.loads((Path(run_dir) / "summary.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_finished(run_dir: Path, max_steps: int) -> bool:
    """Whether the run's summary.json records a step >= `max_steps`."""
    step = finished_step(run_dir)
    return step is not None and step >= max_steps


def train(config: Path, run_dir: Path, max_steps: int, log: Path, sets: list[str] | tuple[str, ...] = ()) -> bool:
    """Train `config` (with `--set` overrides `sets`) into `run_dir` up to `max_steps` with
    `bifocal train` in a child process writing to `log`. Returns False when the run was already
    finished (nothing ran); raises BifocalError quoting the log's last lines when it fails."""
    run_dir, log = Path(run_dir), Path(log)
    if is_finished(run_dir, max_steps):
        return False
    cmd = [sys.executable, "-m", "bifocal", "train", "--config", str(config), "--run-dir", str(run_dir),
           *[arg for s in sets for arg in ("--set", s)]]
    if checkpoint.complete_checkpoints(run_dir):
        cmd.append("--resume")
    elif run_dir.exists():
        shutil.rmtree(run_dir)  # a start that died before its first checkpoint holds nothing to keep
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not is_finished(run_dir, max_steps):
        tail = " | ".join(line.strip() for line in log.read_text(errors="replace").strip().splitlines()[-3:])
        raise BifocalError(f"training {run_dir.name} failed (exit {proc.returncode}, log {log}): {tail}")
    return True
