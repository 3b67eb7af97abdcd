"""Read torch pickle files (DeepSpeed checkpoints, RNG states) without running code from them.

A `.pt` file is a pickle, and unpickling can call any function the file names. DeepSpeed reads
its own files with `torch.load(weights_only=False)`, so a replaced file would run its payload on
`--resume`, `eval`, `generate` or `export`. Here every file is first loaded with
`weights_only=True` and an explicit allowlist of the few classes DeepSpeed really stores (found
with `torch.serialization.get_unsafe_globals_in_checkpoint` on ZeRO 0-3 checkpoints in fp32 and
bf16, and in DeepSpeed's fp16 loss-scaler code); anything else is refused with one line naming
the file. DeepSpeed's own loads then run with `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1` under the same
allowlist, so they are restricted too.

`python -m bifocal.run.safe_load MODULE ARGS...` runs a DeepSpeed tool (the universal
checkpoint converter) under the same restrictions.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import runpy
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from bifocal.core.errors import BifocalError

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def allowed_globals() -> list[type]:
    """The non-tensor classes DeepSpeed pickles into its checkpoints (nothing else is accepted)."""
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed narrates on import; stdout is for results
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _reason(exc: BaseException) -> str:
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"but got <class '([\w.]+)'>", text)
    if found:
        return f"it names `{found.group(1)}`, which a checkpoint never holds (possibly malicious; nothing was run)"
    if isinstance(exc, pickle.UnpicklingError):
        return "its pickle is not a plain checkpoint (nothing was run)"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"unreadable ({first[:160]}); truncated or not a torch checkpoint"


def load(path: str | Path, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` with the DeepSpeed allowlist, on the CPU; any
    problem becomes a BifocalError naming the file."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise BifocalError(f"{path}: checkpoint file missing") from None
    except Exception as exc:  # torch raises many types for damaged files; each is one line here
        raise BifocalError(f"{path}: refused to load: {_reason(exc)}") from None


def verify(paths: Iterable[str | Path]) -> None:
    """Load every file restricted (memory-mapped: tensor data is not read) before anything else
    may unpickle it; raises BifocalError naming the first file that is missing or refused."""
    for path in paths:
        load(path, mmap=True)


def checkpoint_files(directory: str | Path) -> list[Path]:
    """Every pickle file DeepSpeed may read from a checkpoint directory (universal ones nest)."""
    return sorted(p for p in Path(directory).rglob("*.pt") if p.is_file())


@contextlib.contextmanager
def restricted_loads() -> Iterator[None]:
    """Make every torch.load inside, DeepSpeed's included, weights-only with the allowlist."""
    before = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = before


def run_module_restricted(module: str, argv: list[str]) -> None:
    """Run `python -m module argv...` with restricted loads (process-wide, so forked workers
    inherit it)."""
    os.environ[FORCE_ENV] = "1"
    torch.serialization.add_safe_globals(allowed_globals())
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    run_module_restricted(sys.argv[1], sys.argv[2:])
