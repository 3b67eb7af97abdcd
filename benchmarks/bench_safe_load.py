"""What the restricted checkpoint check costs: `safe_load.verify` (a weights-only, memory-mapped
load of every file before DeepSpeed may read it) against loading the same file fully.

    python benchmarks/bench_safe_load.py [--params 125e6] [--files 2]

Writes a model-states-like file (one fp32 tensor per layer, plus a DeepSpeed-style optimizer
shard with a ZeroStageEnum and a LossScaler) of the given size into a temporary directory and
prints the wall time of each step; the file is read from the page cache (written just before).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bifocal.run import safe_load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=125e6, help="parameters in the model file")
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    per = int(args.params) // args.layers
    module = {f"blocks.{i}.weight": torch.randn(per) for i in range(args.layers)}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "mp_rank_00_model_states.pt"
        optim = Path(tmp) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        torch.save({"module": module, "global_steps": 10, "lr_scheduler": {"base_lrs": [1e-3]}}, model)
        torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
                                             "state": {k: {"exp_avg": v.clone()} for k, v in module.items()}}},
                   optim)
        gib = (model.stat().st_size + optim.stat().st_size) / 2**30
        for name, fn in (("verify (weights-only, mmap)", lambda: safe_load.verify([model, optim])),
                         ("restricted full load", lambda: [safe_load.load(p) for p in (model, optim)]),
                         # The baseline DeepSpeed pays; safe here only because this script wrote both files itself.
                         ("unrestricted full load", lambda: [torch.load(p, weights_only=False) for p in (model, optim)])):
            fn()  # warm: page cache and imports
            t0 = time.perf_counter()
            fn()
            print(f"{name:30s} {time.perf_counter() - t0:8.3f} s   ({gib:.2f} GiB in 2 files)")


if __name__ == "__main__":
    main()
