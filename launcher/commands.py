"""Small CLI handlers that only glue the config loader to a library call."""

from __future__ import annotations

import argparse

from bifocal.data_pipeline.errors import DataError
from bifocal.model.config import ConfigError

from .errors import UserError
from .config import load_config


def prepare(args: argparse.Namespace) -> int:
    """`bifocal prepare CONFIG --out DIR`: tokenize the config's data sources into shards."""
    from bifocal.data_pipeline.prepare import prepare as run_prepare

    try:
        cfg = load_config(args.config, args.overrides)
        out = run_prepare(cfg.data, args.out, workers=args.workers)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    print(f"bifocal: prepared data in {out}")
    return 0
