"""Small CLI handlers that only glue the config loader to a library call."""

from __future__ import annotations

import argparse

from bifocal.run.config import load_config


def prepare(args: argparse.Namespace) -> int:
    """`bifocal prepare CONFIG --out DIR`: tokenize the config's data sources into shards."""
    from bifocal.data_pipeline.prepare import prepare as run_prepare

    cfg = load_config(args.config, args.overrides)
    out = run_prepare(cfg.data, args.out, workers=args.workers)
    print(f"bifocal: prepared data in {out}")
    return 0
