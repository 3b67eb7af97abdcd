"""Small CLI handlers that only glue the config loader to a library call."""

from __future__ import annotations

import argparse

from bifocal.core.errors import BifocalError
from bifocal.run.config import load_config


def prepare(args: argparse.Namespace) -> int:
    """`bifocal prepare CONFIG --out DIR`: tokenize the config's data sources into shards."""
    from bifocal.data_pipeline.prepare import prepare as run_prepare

    cfg = load_config(args.config, args.overrides)
    out = run_prepare(cfg.data, args.out, workers=args.workers)
    print(f"bifocal: prepared data in {out}")
    return 0


def list_config_keys(args: argparse.Namespace) -> int:
    """`bifocal config [PREFIX]`: every config key with its default and one-line description."""
    from bifocal.run.config import config_keys

    rows = [r for r in config_keys() if r[0].startswith(args.prefix)]
    if not rows:
        sections = sorted({r[0].split(".")[0] for r in config_keys()})
        raise BifocalError(f"no config key starts with {args.prefix!r} (sections: {', '.join(sections)})")
    width = max(len(r[0]) for r in rows)
    default_width = min(24, max(len(r[1]) for r in rows))
    for key, default, text in rows:
        print(f"{key:<{width}}  {default:<{default_width}}  {text}".rstrip())
    return 0


# What `bifocal env` reports, in this order; the libraries whose behaviour bifocal depends on.
ENV_PACKAGES = ("torch", "deepspeed", "transformers", "datasets", "tokenizers", "sentencepiece", "safetensors",
                "huggingface_hub", "accelerate", "lm_eval", "peft", "trl", "numpy", "pydantic")


def env_report() -> list[tuple[str, str]]:
    """(name, value) rows: bifocal, Python and platform, each of ENV_PACKAGES ("not installed" when
    absent), and the device: CUDA, cuDNN and NCCL versions and the GPUs, or the CPU's cores."""
    import importlib.metadata as metadata
    import os
    import platform

    from bifocal import __version__

    rows = [("bifocal", __version__), ("python", f"{platform.python_version()} ({platform.platform()})")]
    for name in ENV_PACKAGES:
        try:
            rows.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            rows.append((name, "not installed"))
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else "none"
        rows += [("device", f"cuda: {len(names)} x {', '.join(sorted(set(names)))}"), ("cuda", str(torch.version.cuda)),
                 ("cudnn", str(torch.backends.cudnn.version())), ("nccl", nccl)]
    else:
        rows += [("device", f"cpu ({os.cpu_count()} cores; no CUDA device visible)"),
                 ("cuda", f"{torch.version.cuda or 'none'} (torch build)")]
    return rows


def env(args: argparse.Namespace) -> int:
    """`bifocal env`: one `name: version` line each, for bug reports."""
    rows = env_report()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name + ':':<{width + 1}} {value}")
    return 0
