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
