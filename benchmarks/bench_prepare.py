"""Measure `prepare` throughput (MB/s of UTF-8 text) on a data config.

    python benchmarks/bench_prepare.py configs/data/large.yaml [--workers N] [--out DIR] [--keep]

Prepares into a fresh temporary directory (so nothing is reused) and prints the wall time including
tokenizer training, the tokenizing-phase throughput, and token counts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bifocal.data_pipeline.config import load_data_config
from bifocal.core.errors import BifocalError
from bifocal.data_pipeline.prepare import prepare


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/data/large.yaml")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary output")
    args = ap.parse_args(argv)
    try:
        cfg = load_data_config(args.config)
        tmp = None if args.out else Path(tempfile.mkdtemp(prefix="bench_prepare_"))
        out = Path(args.out) if args.out else tmp / "data"
        t0, cpu0 = time.perf_counter(), _cpu()
        prepare(cfg, out, workers=args.workers)
        wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    except BifocalError as exc:
        print(f"bench_prepare: error: {exc}", file=sys.stderr)
        return 2
    meta = json.loads((out / "meta.json").read_text())
    mb = meta["text_bytes"] / 1e6
    result = {
        "config": args.config,
        "text_mb": round(mb, 2),
        "tokenize_seconds": meta["seconds"],
        "tokenize_mb_per_s": meta["mb_per_s"],
        "wall_seconds_incl_tokenizer_training": round(wall, 2),
        "wall_mb_per_s": round(mb / wall, 3),
        # CPU seconds over all threads: on a shared machine, MB per CPU-second is the stable number
        "cpu_seconds": round(cpu, 1),
        "mb_per_cpu_second": round(mb / cpu, 3),
        "cores": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "tokens": {sp: v["tokens"] for sp, v in meta["splits"].items()},
        "documents": {sp: v["documents"] for sp, v in meta["splits"].items()},
        "vocab_size": meta["tokenizer"]["vocab_size"],
        "bytes_per_token": round(meta["text_bytes"] / max(1, sum(v["tokens"] for v in meta["splits"].values())), 3),
    }
    print(json.dumps(result, indent=2))
    if tmp is not None and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
