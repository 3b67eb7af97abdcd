"""Measure `prepare` throughput (MB/s of UTF-8 text) on a data config, or on pathological shapes.

    python benchmarks/bench_prepare.py configs/data/large.yaml [--workers N] [--out DIR] [--keep]
    python benchmarks/bench_prepare.py --shapes [--mb 2,4] [--tokenizers bpe,sentencepiece_unigram]

A config is prepared into a fresh temporary directory (so nothing is reused) and the wall time
including tokenizer training, the tokenizing-phase throughput and token counts are printed.

`--shapes` writes corpora of each shape at each size (MB) and prepares them with each tokenizer
kind, printing MB/s (wall, tokenizer training included) beside those of normal text: preparation
is linear in the corpus size when a shape's MB/s stays level as its size doubles. Shapes:
normal (the bundled prose and Python), long_run (half normal, half one run of `x` without
whitespace), base64 (lines of base64 with no whitespace, as in data blobs), minified (one line of
dense code without spaces), whitespace_run (half normal, half one run of spaces), huge_document
(all of it one document), tiny_documents (documents of about 40 characters).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bifocal.core.errors import BifocalError
from bifocal.data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from bifocal.run.config import load_config
from bifocal.data_pipeline.prepare import prepare

DATA = Path(__file__).resolve().parents[1] / "data"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _normal(nbytes: int) -> list[str]:
    """Real documents (Austen's prose and CPython's modules, alternating) up to `nbytes`."""
    streams = [gzip.open(DATA / name, "rt", encoding="utf-8")
               for name in ("nl_small_austen.jsonl.gz", "code_small_pystdlib.jsonl.gz")]
    docs, size, i = [], 0, 0
    while size < nbytes:
        line = streams[i % 2].readline() or (streams[i % 2].seek(0), streams[i % 2].readline())[1]
        text = json.loads(line)["text"][:min(200_000, nbytes - size)]
        docs.append(text)
        size += len(text.encode())
        i += 1
    return docs


def shape_documents(shape: str, nbytes: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    if shape == "normal":
        return _normal(nbytes)
    if shape == "long_run":
        return _normal(nbytes // 2) + ["the run: " + "x" * (nbytes // 2)]
    if shape == "whitespace_run":
        return _normal(nbytes // 2) + ["spaces:" + " " * (nbytes // 2) + "end"]
    if shape == "base64":
        line = 76 * 1024  # long lines, no whitespace inside
        return [base64.b64encode(rng.randbytes(line * 3 // 4)).decode() for _ in range(max(1, nbytes // line))]
    if shape == "minified":
        names = ["a", "b", "c", "fn", "x1", "y2", "el", "i", "n", "t"]
        parts, size = [], 0
        while size < nbytes:
            p = f"var {rng.choice(names)}={rng.randrange(10**6)};function {rng.choice(names)}(e){{return e+{rng.choice(names)}}};"
            parts.append(p)
            size += len(p)
        return ["".join(parts)]
    if shape == "huge_document":
        return ["\n\n".join(_normal(nbytes))]
    if shape == "tiny_documents":
        words = " ".join(_normal(min(nbytes, 4_000_000))).split()
        docs, size = [], 0
        while size < nbytes:
            d = f"{len(docs)}: " + " ".join(rng.choice(words) for _ in range(5))
            docs.append(d)
            size += len(d)
        return docs
    raise ValueError(f"unknown shape {shape!r}")


SHAPES = ("normal", "long_run", "base64", "minified", "whitespace_run", "huge_document", "tiny_documents")


def _prepare(cfg: DataConfig, out: Path, workers: int | None) -> tuple[dict, float, float]:
    t0, cpu0 = time.perf_counter(), _cpu()
    prepare(cfg, out, workers=workers)
    return json.loads((out / "meta.json").read_text()), time.perf_counter() - t0, _cpu() - cpu0


def run_shapes(sizes_mb: list[float], tokenizers: list[str], shapes: list[str], workers: int | None) -> list[dict]:
    rows = []
    root = Path(tempfile.mkdtemp(prefix="bench_shapes_"))
    try:
        for shape in shapes:
            for mb in sizes_mb:
                corpus = root / f"{shape}-{mb}.jsonl"
                with open(corpus, "w", encoding="utf-8") as f:
                    for i, text in enumerate(shape_documents(shape, int(mb * 1e6))):
                        f.write(json.dumps({"source": f"d{i}", "text": text}) + "\n")
                for kind in tokenizers:
                    cfg = DataConfig(sources=[SourceConfig(name="s", path=str(corpus))],
                                     tokenizer=TokenizerConfig(type=kind, vocab_size=4096), val_fraction=0.0)
                    out = root / f"out-{shape}-{mb}-{kind}"
                    meta, wall, cpu = _prepare(cfg, out, workers)
                    row = {"shape": shape, "tokenizer": kind, "text_mb": round(meta["text_bytes"] / 1e6, 2),
                           "wall_s": round(wall, 2), "wall_mb_per_s": round(meta["text_bytes"] / 1e6 / wall, 3),
                           "tokenize_mb_per_s": meta["mb_per_s"], "cpu_s": round(cpu, 1),
                           # on a shared machine, MB per CPU-second is the stable figure
                           "mb_per_cpu_s": round(meta["text_bytes"] / 1e6 / max(cpu, 1e-9), 3),
                           "load_average_1m": round(os.getloadavg()[0], 2)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/data/large.yaml")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary output")
    ap.add_argument("--shapes", nargs="?", const=",".join(SHAPES), default=None,
                    help=f"pathological shapes instead of a config (comma-separated; default all: {', '.join(SHAPES)})")
    ap.add_argument("--mb", default="2,4", help="with --shapes: corpus sizes in MB (comma-separated)")
    ap.add_argument("--tokenizers", default="bpe,sentencepiece_unigram", help="with --shapes: tokenizer types")
    args = ap.parse_args(argv)
    if args.shapes is not None:
        run_shapes([float(x) for x in args.mb.split(",")], args.tokenizers.split(","), args.shapes.split(","),
                   args.workers)
        return 0
    try:
        cfg = load_config(args.config).data
        tmp = None if args.out else Path(tempfile.mkdtemp(prefix="bench_prepare_"))
        out = Path(args.out) if args.out else tmp / "data"
        meta, wall, cpu = _prepare(cfg, out, args.workers)
    except BifocalError as exc:
        print(f"bench_prepare: error: {exc}", file=sys.stderr)
        return 2
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
