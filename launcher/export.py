"""`bifocal export RUN --out DIR`: consolidate a DeepSpeed checkpoint (any ZeRO stage, with
DeepSpeed's own consolidation) into a Hugging Face directory with safetensors weights, the
tokenizer, generation config and a model card. Written to a temporary name and renamed, so an
interrupted export never leaves a directory that looks complete."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from bifocal.core.errors import BifocalError
from bifocal.run import checkpoint
from bifocal.run.metrics import read_metrics


def card_extras(run_dir: Path, step: int) -> dict[str, Any]:
    rows = read_metrics(run_dir)
    final = {k: v for r in rows if r.get("step", 0) <= step for k, v in r.items()}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    return {"training_config": yaml.safe_load((run_dir / "config.yaml").read_text()),
            "final_metrics": {"step": step, **{k: final[k] for k in ("loss", "val_loss", "val_ppl", "tokens") if k in final},
                              **({"summary": summary} if summary else {})}}


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None, dtype: str = "fp32",
               max_shard_size: str = "2GB", context: int | None = None) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise BifocalError(f"{out} already exists and is not empty; choose another --out (nothing was overwritten)")
    found = checkpoint.latest_checkpoint(run_dir, step)
    if found is None:
        raise BifocalError(f"no complete checkpoint{'' if step is None else f' at step {step}'} in {run_dir}")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if (run_dir / "init_from_hf.json").is_file():
            _export_spectralized(run_dir, found[1], tmp, dtype)
        else:
            from bifocal.model.hf.hf_io import save_hf

            model, _ = checkpoint.load_run_model(run_dir, step=found[0])
            save_hf(model, run_dir / "tokenizer", tmp, dtype=dtype, max_shard_size=max_shard_size,
                    extra_card=card_extras(run_dir, found[0]), context=context, run_name=run_dir.resolve().name)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _export_spectralized(run_dir: Path, ckpt: Path, out: Path, dtype: str) -> None:
    """A continued-pretraining run of a Hugging Face model: rebuild the spectralized model, load
    the consolidated weights, and save it back in Hugging Face format."""
    import torch

    from bifocal.model.hf.hf_tokenizer import write_tokenizer
    from bifocal.model.surgery import load_spectralized

    info = json.loads((run_dir / "init_from_hf.json").read_text())
    adapter = load_spectralized(info["path"], spectral_heads=info["spectral_heads"],
                                phase_init_std=info["phase_init_std"])
    adapter.load_state_dict(checkpoint.consolidated_state_dict(ckpt), strict=True)
    if dtype != "fp32":
        adapter = adapter.to({"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    adapter.save_hf(out)
    write_tokenizer(run_dir / "tokenizer", out)


def require_transformers() -> None:
    """Exports are written with transformers' config classes: name the extra if it is missing."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise BifocalError("bifocal export needs transformers: pip install 'bifocal[hf]'") from None


def main(args: argparse.Namespace) -> int:
    require_transformers()
    if args.context is not None and args.context < 1:
        raise BifocalError(f"--context {args.context}: must be a positive integer")
    out = export_run(args.run, args.out, step=args.step, dtype=args.dtype, max_shard_size=args.max_shard_size,
                     context=args.context)
    print(f"bifocal: exported {args.run} to {out}")
    return 0
