"""DeepSpeed checkpoints with an atomic notion of "complete", keep-last-K, and consolidation.

A checkpoint is `RUN/checkpoints/step_XXXXXXXX/` as written by `engine.save_checkpoint`. It counts
only once every rank has finished writing and rank 0 has renamed a `complete.json` marker into
it, so a run killed mid-save resumes from the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bifocal.core import logs
from bifocal.core.errors import BifocalError

from . import distributed as dist, safe_load

log = logs.get_logger(__name__)

MARKER = "complete.json"


def checkpoint_dir(run_dir: str | Path) -> Path:
    """RUN/checkpoints, where every step's checkpoint directory lives."""
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    """The checkpoint directory name (DeepSpeed's tag) of an optimizer step: `step_00000042`."""
    return f"step_{step:08d}"


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first; raises BifocalError for a damaged
    marker (see `marker_info`)."""
    root = checkpoint_dir(run_dir)
    found = []
    for path in root.glob("step_*"):
        marker = path / MARKER
        if marker.is_file():
            found.append((marker_info(path)["step"], path))
    return sorted(found)


def marker_info(path: Path) -> dict[str, Any]:
    """The complete.json of a checkpoint (written atomically, so a damaged one was tampered with):
    `step`, `world_size` and what `save` was given as `info`. Raises BifocalError when damaged."""
    marker = path / MARKER
    try:
        info = json.loads(marker.read_text())
        int(info["step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise BifocalError(f"{marker}: damaged checkpoint marker (not the JSON bifocal writes); "
                           f"delete that checkpoint directory to fall back to an older one") from None
    return info


def latest_checkpoint(run_dir: str | Path, step: int | None = None) -> tuple[int, Path] | None:
    """(step, path) of the newest complete checkpoint, or of the one at `step`; None if there is
    none. Raises BifocalError as `complete_checkpoints` does."""
    ckpts = complete_checkpoints(run_dir)
    if step is not None:
        ckpts = [c for c in ckpts if c[0] == step]
    return ckpts[-1] if ckpts else None


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors, ints and tuples only, so it loads with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the torch, CUDA (when available and saved), numpy and Python generators from
    `rng_state()`'s output."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def save(engine, run_dir: str | Path, step: int, client_state: dict[str, Any], keep_last: int,
         info: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. Writes RUN/checkpoints/step_XXXXXXXX (DeepSpeed's states,
    each rank's RNG state, then the marker with `step`, `world_size` and `info`), then keeps the
    newest `keep_last` complete checkpoints. Returns the checkpoint path.

    An I/O failure on any rank (no space, a quota, a read-only, vanished or unwritable run
    directory) removes the partial checkpoint and raises one BifocalError on every rank naming the
    path, what failed and the newest complete checkpoint, which stays as it was. The ranks agree
    after each stage (directory, DeepSpeed's states, marker) with one all-reduce; a rank that fails
    inside DeepSpeed's `save_checkpoint` first meets the others at its closing barrier."""
    root = checkpoint_dir(run_dir)
    path = root / tag_for(step)
    # Each rank's RNG state travels in its own client state (DeepSpeed writes rank 0's into the
    # model file), so keep them per rank in a side file as well.
    # DeepSpeed's universal-checkpoint converter requires this metadata to be present.
    client_state = {**client_state, "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}

    def directory() -> None:  # every rank, before DeepSpeed starts (it would make a new, bare run directory)
        if not (Path(run_dir) / "config.yaml").is_file():
            raise FileNotFoundError(errno.ENOENT, "the run directory vanished (its config.yaml is gone)", str(run_dir))
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass

    def states() -> None:
        try:
            engine.save_checkpoint(str(root), tag=path.name, client_state=client_state, save_latest=True)
        except (OSError, RuntimeError):
            dist.barrier()  # the ranks that got through wait in DeepSpeed's closing barrier: meet them there
            raise
        torch.save(rng_state(), path / f"rng_rank{dist.rank():05d}.pt")

    def marker() -> None:
        if dist.rank() == 0:
            tmp = path / (MARKER + ".tmp")
            tmp.write_text(json.dumps({"step": step, "world_size": dist.world_size(), **(info or {})}, indent=1))
            os.replace(tmp, path / MARKER)

    _write_or_fail(directory, run_dir, path, "creating its directory")
    _write_or_fail(states, run_dir, path, "writing the model and optimizer states")
    _write_or_fail(marker, run_dir, path, f"writing its {MARKER} marker")
    if dist.rank() == 0:
        _prune(run_dir, keep_last)
    dist.barrier()
    return path


def _write_or_fail(write, run_dir: str | Path, path: Path, what: str) -> None:
    """Run `write` on every rank and agree (one all-reduce) whether any rank failed; if one did,
    rank 0 removes the partial checkpoint and every rank raises the same kind of one-line error.
    torch and DeepSpeed report a full disk as a RuntimeError of their stream writer."""
    try:
        write()
        failure = None
    except (OSError, RuntimeError) as exc:
        failure = exc
    if not dist.all_reduce_sum([float(failure is not None)])[0]:
        return
    if failure is None:
        reason = "another rank failed"
    elif isinstance(failure, OSError) and failure.strerror:
        reason = f"{failure.strerror}: {failure.filename}" if failure.filename else failure.strerror
    else:  # DeepSpeed and torch's writer hide the OS's reason: ask the OS where the checkpoint goes
        reason = _unwritable(path) or f"{type(failure).__name__}: {(str(failure).strip().splitlines() or [''])[0][:200]}"
    if dist.rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        if not (Path(run_dir) / "config.yaml").exists():  # the run directory vanished mid-save: leave
            for folder in (path.parent, Path(run_dir)):     # none of the (empty) folders the save made
                try:
                    folder.rmdir()
                except OSError:
                    pass
    dist.barrier()
    try:
        free = f"; {shutil.disk_usage(path.parent if path.parent.exists() else run_dir).free:,} bytes free there"
    except OSError:
        free = ""
    try:
        latest = latest_checkpoint(run_dir)
    except (BifocalError, OSError):
        latest = None
    raise BifocalError(f"checkpoint {path} not saved: {what} failed ({reason}{free}); the partial checkpoint "
                       f"was removed; newest complete checkpoint: {latest[1] if latest else 'none'}"
                       f"{' (fix the cause, then continue from it with --resume)' if latest else ''}")


def _unwritable(path: Path) -> str | None:
    """Why no file can be created where `path` is (its nearest existing folder), as the OS says it
    (a read-only filesystem, a permission); None if one can (then it is rather a full disk)."""
    where = path
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        with tempfile.TemporaryFile(dir=where):
            return None
    except OSError as exc:
        return f"{exc.strerror}: {where}"


def _prune(run_dir: str | Path, keep_last: int) -> None:
    ckpts = complete_checkpoints(run_dir)
    newest = ckpts[-1][0] if ckpts else -1
    for step, path in ckpts[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    # Leftovers of interrupted saves older than the newest complete one are dead weight.
    for path in checkpoint_dir(run_dir).glob("step_*"):
        if not (path / MARKER).exists() and int(path.name.split("_")[1]) < newest:
            shutil.rmtree(path, ignore_errors=True)


def saved_world_size(path: Path) -> int:
    """The number of ranks that wrote the checkpoint at `path` (1 for markers that do not say)."""
    return int(json.loads((path / MARKER).read_text()).get("world_size", 1))


def to_universal(path: Path) -> Path:
    """Convert a ZeRO checkpoint into DeepSpeed's universal format (once), which loads on any
    number of ranks; returns its directory, `checkpoints/universal/step_XXXXXXXX`. Rank 0 only;
    the caller holds the others at a barrier. Raises RuntimeError when DeepSpeed's converter fails,
    BifocalError when a file fails the restricted load."""
    out = path.parent / "universal" / path.name
    if (out / MARKER).is_file():
        return out
    safe_load.verify(safe_load.checkpoint_files(path))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bifocal.run.safe_load", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"converting {path} to a universal checkpoint failed: {tail[0]}")
    for name in [MARKER, *(f.name for f in path.glob("rng_rank*.pt"))]:  # each rank's generators resume too
        shutil.copy(path / name, tmp / name)
    os.replace(tmp, out)
    return out


def load(engine, run_dir: str | Path, path: Path) -> dict[str, Any]:
    """Collective: load model, optimizer, scheduler and this rank's RNG state; return client state.
    Every file is checked by a restricted (weights-only) load first, and DeepSpeed's loads run
    restricted as well (see safe_load). Raises BifocalError when a file fails that check or
    DeepSpeed cannot load the checkpoint."""
    safe_load.verify(safe_load.checkpoint_files(path))
    with safe_load.restricted_loads():
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name,
                                                 load_optimizer_states=True, load_lr_scheduler_states=True)
    if client_state is None:
        raise BifocalError(f"DeepSpeed could not load the checkpoint at {path}")
    rng_path = path / f"rng_rank{dist.rank():05d}.pt"
    if rng_path.is_file():
        set_rng_state(safe_load.load(rng_path))
    return client_state


def consolidated_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Full weights of one checkpoint directory, in fp32, from the optimizer's fp32 master weights
    wherever the checkpoint holds them, so `eval`, `export` and `generate` read the same numbers
    whatever the ZeRO stage and precision. ZeRO 1-3 (fp32, bf16, fp16): DeepSpeed's own
    consolidation, `get_fp32_state_dict_from_zero_checkpoint`. Without ZeRO: the module's weights
    (in fp32 training they are the masters), with the masters of DeepSpeed's bf16/fp16 optimizer
    wrapper put over them (`fp32_masters`). Raises BifocalError when the directory holds no
    DeepSpeed model states or a file fails the restricted load."""
    path = Path(path)
    safe_load.verify(safe_load.checkpoint_files(path))
    files = sorted(path.glob("*model_states.pt"))
    if not files:
        raise BifocalError(f"no DeepSpeed model states in {path}")
    states = safe_load.load(files[0], mmap=True)
    zero = (states.get("ds_config") or {}).get("zero_optimization") or {}
    if int(zero.get("stage", 0)) > 0:
        # DeepSpeed narrates on stdout; keep stdout for what our commands print (e.g. generated text).
        with contextlib.redirect_stdout(sys.stderr), safe_load.restricted_loads():
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        state = {**states["module"], **fp32_masters(states, path)}
    return {k: v.detach().float() if v.is_floating_point() else v for k, v in state.items()}


def fp32_masters(states: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights in a ZeRO-0 model-states file, by name: DeepSpeed's bf16/fp16
    wrapper (FP16_UnfusedOptimizer) saves them as `optimizer["fp32_groups"]`, lists in optimizer
    group order without names; the `param_group_names` the run saved beside them name each
    (a tied parameter under all of its names). Empty for fp32 training (no wrapper)."""
    optimizer = states.get("optimizer")
    groups = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    if not groups:
        return {}
    names = states.get("param_group_names")
    if not names or [len(g) for g in names] != [len(g) for g in groups]:
        log.warning(f"{path}: its fp32 master weights are not named (a checkpoint of an older bifocal); "
                    f"reading the module's {states['module'][next(iter(states['module']))].dtype} weights")
        return {}
    return {name: tensor for group_names, group in zip(names, groups)
            for aliases, tensor in zip(group_names, group) for name in aliases}


def load_run_model(run_dir: str | Path, step: int | None = None, device: str = "cpu"):
    """(GPT in eval mode on `device`, fp32 weights; its TextTokenizer) from a run directory's newest
    (or `step`) complete checkpoint. Raises BifocalError when the directory is not a run, has no
    such checkpoint, continued a Hugging Face model, or its weights do not fit its config."""
    from bifocal.data_pipeline.tokenizer import load_tokenizer
    from bifocal.model import GPT

    from .config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise BifocalError(f"{run_dir} is not a bifocal run directory (no config.yaml)")
    found = latest_checkpoint(run_dir, step)
    if found is None:
        which = f"at step {step}" if step is not None else "at all"
        raise BifocalError(f"no complete checkpoint {which} in {checkpoint_dir(run_dir)}")
    try:
        cfg = load_config(run_dir / "config.yaml")
    except BifocalError as exc:
        raise BifocalError(f"{run_dir / 'config.yaml'}: {exc}") from None
    if (run_dir / "init_from_hf.json").is_file():
        raise BifocalError(f"{run_dir} continued a Hugging Face model: use `bifocal export` and load the export")
    model = GPT(cfg.model)
    state = consolidated_state_dict(found[1])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise BifocalError(f"{found[1]}: weights do not fit {run_dir / 'config.yaml'} ({first})") from None
    return model.to(device).eval(), load_tokenizer(run_dir / "tokenizer")
