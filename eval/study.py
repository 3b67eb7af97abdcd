"""`bifocal study extrapolation`: train several position schemes on the same data and budget,
evaluate each at 1x-16x its training length (RoPE also under training-free scaling), report.

A study YAML (configs/study/*.yaml) holds:

    base:                 # a run config: `include:` (relative to the study file) and/or sections
    schemes: [rope, bifocal, spectral, pope]
    seeds: 3              # N (train.seed, +1, ... +N-1) or a list of seeds; --seeds N overrides
    label: fit            # optional (or --label): result rows read `bifocal[fit]`, so an ablation
                          # study's results can be reported beside the main study's
    overrides:            # per scheme, dotted run-config keys -> values
      rope: {model.position.scheme: rope}
    eval:
      length_multiples: [1, 2, 4, 8, 16]   # of model.max_seq_len; fractions (0.25) show context use
      scaling_variants: [pi, ntk, dynamic_ntk, yarn]
      scaling_schemes: [rope, bifocal]     # fixed-frequency heads to scale
      scaling_factor: 16                   # null: the largest multiple
      dynamic_ntk_factor: 1.0              # dynamic NTK adapts per length by itself
      max_docs: 4
      max_tokens: 8192                     # scored tokens per length
      batch_size: 1

Layout: OUT/configs/<run>.yaml (the exact run config), OUT/runs/<run> (the run),
OUT/results/<run>[-variant].json, OUT/report.md, OUT/extrapolation.png, where <run> is the scheme,
or <scheme>-s<seed> when the study names seeds (report.md then gives mean ± std per length
and says which differences exceed the seed spread). A finished run and a
result whose settings are unchanged are reused, so re-running a study resumes it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bifocal import configs
from bifocal.core.config import deep_merge, nearest, nest, parse_overrides, yaml_mapping
from bifocal.core.errors import BifocalError
from bifocal.model.config import ROPE_SCALING_TYPES, SCHEMES
from bifocal.run.config import CONFIG_DIR, expand

STUDY_DIR = CONFIG_DIR / "study"
RUN_SECTIONS = ("model", "data", "train", "optim", "deepspeed")  # `--set train.x=1` means base.train.x


@dataclass
class StudyEval:
    # Of the training length. Below 1 (e.g. 0.25) scores windows shorter than training: a model
    # that uses its context has a higher perplexity there than at 1x.
    length_multiples: list[float] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    scaling_variants: list[str] = field(default_factory=lambda: list(ROPE_SCALING_TYPES))
    scaling_schemes: list[str] = field(default_factory=lambda: ["rope", "bifocal"])
    scaling_factor: float | None = None
    dynamic_ntk_factor: float = 1.0
    max_docs: int | None = 4
    max_tokens: int | None = 8192
    batch_size: int = 1
    device: str | None = None
    # Evaluate the checkpoint saved at this training step instead of the final model (e.g. the
    # midpoint of the schedule); a run that already holds it is not trained further. Results and
    # report go to OUT/step<N>/.
    step: int | None = None


@dataclass
class Study:
    path: Path
    base: dict
    schemes: list[str]
    overrides: dict[str, dict[str, Any]]
    eval: StudyEval
    seeds: list[int] = field(default_factory=list)  # empty: the base config's train.seed, one run
    label: str | None = None  # tags result rows `scheme[label]`

    def model_name(self, scheme: str) -> str:
        return f"{scheme}[{self.label}]" if self.label else scheme

    def run_config(self, scheme: str, seed: int | None = None) -> dict:
        """The full run config of one scheme: base, then its overrides, then the seed."""
        raw = deep_merge(self.base, nest(self.overrides.get(scheme) or {}))
        return raw if seed is None else deep_merge(raw, {"train": {"seed": seed}})

    def runs(self) -> list[tuple[str, int | None, str]]:
        """(scheme, seed or None, run name) for every run: `scheme-s<seed>` when the study names
        seeds (so studies over different seeds can share one OUT), else `scheme`."""
        if not self.seeds:
            return [(s, None, s) for s in self.schemes]
        return [(s, seed, f"{s}-s{seed}") for s in self.schemes for seed in self.seeds]


def _seed_list(value: Any, base: dict, where: str) -> list[int]:
    """`seeds: N` -> N seeds from the base train.seed up; a list is taken as given."""
    if value is None:
        return []
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        raise BifocalError(f"{where}: `seeds` must be a positive integer or a list of integers, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise BifocalError(f"{where}: `seeds` must be >= 1, got {value}")
        first = int((base.get("train") or {}).get("seed", 1234))
        return [first + i for i in range(value)]
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) or len(set(value)) < len(value):
        raise BifocalError(f"{where}: `seeds` must be a non-empty list of distinct integers, got {value!r}")
    return list(value)


def _preset_path(preset: str) -> Path:
    found = configs.find(preset, "study")
    if found is None:
        have = sorted(f.stem for f in STUDY_DIR.glob("*.yaml"))
        raise BifocalError(f"unknown study preset {preset!r}: one of {', '.join(have)} or a path to a study YAML")
    return found


def _base_config(base: Any, study_path: Path) -> dict:
    """The base run config; `include:` and data paths are relative to the study file, as in a
    run config."""
    if isinstance(base, str):
        base = {"include": base}
    if not isinstance(base, dict):
        raise BifocalError(f"{study_path}: `base` must be a run config mapping or a path")
    try:
        return expand(base, study_path.parent)
    except BifocalError as exc:
        raise BifocalError(f"{study_path}: base.include: {exc}") from None


def load_study(preset: str, overrides: list[str] | None = None, schemes: str | None = None,
               seeds: int | None = None, label: str | None = None) -> Study:
    """Read and validate a study (a preset name or a YAML path), `--set`, `--schemes`,
    `--seeds` and `--label` applied."""
    path = _preset_path(preset)
    raw = yaml_mapping(path, "a study mapping with base, schemes, seeds, overrides, eval")
    sets = []
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        sets.append(f"base.{item}" if key.split(".")[0] in RUN_SECTIONS else item)
    raw = deep_merge(raw, parse_overrides(sets))
    known = ("base", "schemes", "seeds", "overrides", "eval", "label")
    for key in raw:
        if key not in known:
            raise BifocalError(f"{path}: unknown study key `{key}`: {nearest(str(key), known)}")
    ev = raw.get("eval") or {}
    fields = list(StudyEval.__dataclass_fields__)
    for key in ev:
        if key not in fields:
            raise BifocalError(f"{path}: unknown key `eval.{key}`: {nearest(str(key), fields)}")
    base = _base_config(raw.get("base") or {}, path)
    study = Study(path=path, base=base, schemes=list(raw.get("schemes") or ["rope", "bifocal"]),
                  overrides=dict(raw.get("overrides") or {}), eval=StudyEval(**ev),
                  seeds=_seed_list(seeds if seeds is not None else raw.get("seeds"), base,
                                   "--seeds" if seeds is not None else str(path)))
    if schemes:
        study.schemes = [s.strip() for s in schemes.split(",") if s.strip()]
    study.label = label if label is not None else raw.get("label")
    if study.label is not None and (not isinstance(study.label, str)
                                    or not re.fullmatch(r"[A-Za-z0-9_.=,-]+", study.label)):
        raise BifocalError(f"{path}: label {study.label!r}: letters, digits and _ . = , - only")
    for s in study.schemes:
        if s not in SCHEMES:
            raise BifocalError(f"scheme {s!r}: one of {', '.join(SCHEMES)}")
    for v in study.eval.scaling_variants:
        if v not in ROPE_SCALING_TYPES:
            raise BifocalError(f"{path}: eval.scaling_variants: {v!r} is not one of {', '.join(ROPE_SCALING_TYPES)}")
    multiples = study.eval.length_multiples
    if not isinstance(multiples, list) or not multiples or any(
            isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0 for m in multiples):
        raise BifocalError(f"{path}: eval.length_multiples must be a non-empty list of positive numbers, got {multiples!r}")
    train_len = (study.base.get("model") or {}).get("max_seq_len")
    if isinstance(train_len, int):
        study_lengths(multiples, train_len, str(path))
    if study.eval.step is not None and (isinstance(study.eval.step, bool) or not isinstance(study.eval.step, int)
                                        or study.eval.step < 1):
        raise BifocalError(f"{path}: eval.step must be a positive integer (a training step with a checkpoint)")
    return study


# ---------------------------------------------------------------------------------------------
# Training


def _finished(run_dir: Path, max_steps: int) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("step") == max_steps
    except (OSError, ValueError):
        return False


def train_scheme(study: Study, scheme: str, out: Path, seed: int | None = None, name: str | None = None) -> Path:
    """Train one scheme (with one seed) with `bifocal train` in a subprocess into OUT/runs/<name>
    (skipped when finished, resumed when a checkpoint exists)."""
    from bifocal.run import checkpoint
    from bifocal.run.config import build_config

    name = name or scheme
    raw = study.run_config(scheme, seed)
    raw = deep_merge(raw, {"train": {"run_name": name}})
    try:
        cfg = build_config(raw)
    except BifocalError as exc:
        raise BifocalError(f"{study.path}: scheme {scheme}: {exc}") from None
    if cfg.model.position.scheme != scheme:
        raise BifocalError(f"{study.path}: overrides.{scheme} must set model.position.scheme: {scheme}")
    cfg_path = out / "configs" / f"{name}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_dir = out / "runs" / name
    if _finished(run_dir, cfg.train.max_steps):
        print(f"[study] {name}: finished run found in {run_dir}, reusing it", flush=True)
        return run_dir
    cmd = [sys.executable, "-m", "bifocal.launcher.cli", "train", "--config", str(cfg_path),
           "--run-dir", str(run_dir)]
    if checkpoint.complete_checkpoints(run_dir):
        cmd.append("--resume")
    elif run_dir.exists():
        shutil.rmtree(run_dir)  # a start that died before its first checkpoint holds nothing to keep
    print(f"[study] {name}: training {cfg.train.max_steps} steps -> {run_dir}", flush=True)
    t0 = time.perf_counter()
    log = out / "logs" / f"train-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not _finished(run_dir, cfg.train.max_steps):
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise BifocalError(f"training {name} failed (exit {proc.returncode}); log {log}:\n{tail}")
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"[study] {name}: trained in {time.perf_counter() - t0:.0f} s, "
          f"val loss {summary.get('val_loss', float('nan')):.4f}", flush=True)
    return run_dir


# ---------------------------------------------------------------------------------------------
# Evaluation


def study_lengths(multiples: list[float], train_len: int, where: str) -> list[int]:
    """Evaluation lengths in tokens: each multiple of the training length must give a whole
    number of tokens, at least 2 (one scored token needs a context token)."""
    lengths = []
    for m in multiples:
        n = train_len * m
        if abs(n - round(n)) > 1e-9 or round(n) < 2:
            raise BifocalError(f"{where}: eval.length_multiples: {m} x training length {train_len} = {n:g} "
                               "is not a whole number of tokens >= 2")
        lengths.append(int(round(n)))
    return sorted(set(lengths))


def evaluations(study: Study, scheme: str, lengths: list[int], train_len: int) -> list[tuple[str | None, float]]:
    """(variant or None, factor) pairs to evaluate for one scheme."""
    out: list[tuple[str | None, float]] = [(None, 1.0)]
    if scheme in study.eval.scaling_schemes:
        for v in study.eval.scaling_variants:
            if v == "dynamic_ntk":
                factor = float(study.eval.dynamic_ntk_factor)
            elif study.eval.scaling_factor is not None:
                factor = float(study.eval.scaling_factor)
            else:
                factor = max(lengths) / train_len
            out.append((v, max(1.0, factor)))
    return out


def evaluate_scheme(study: Study, scheme: str, run_dir: Path, out: Path, seed: int | None = None,
                    name: str | None = None) -> list[Path]:
    """Perplexity of one trained run at every study length, per scaling variant; reuses result
    files whose settings and checkpoint step match. The seed goes into the result's extra."""
    from bifocal.data_pipeline.loader import PreparedData, iter_documents

    from .loading import load_model
    from .perplexity import apply_scaling, evaluate_perplexity, format_table
    from .results import EvalResult, load

    ev = study.eval
    model = tokenizer = None
    step = ev.step if ev.step is not None else json.loads((run_dir / "summary.json").read_text())["step"]
    cfg_raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    train_len = int(cfg_raw["model"]["max_seq_len"])
    lengths = study_lengths(ev.length_multiples, train_len, str(run_dir))
    prepared = PreparedData(cfg_raw["data"]["prepared_dir"])
    paths = []
    for variant, factor in evaluations(study, scheme, lengths, train_len):
        run_name = name or scheme
        path = out / "results" / (f"{run_name}-{variant}.json" if variant else f"{run_name}.json")
        settings = {"eval": asdict(ev), "step": step, "lengths": lengths, "factor": factor,
                    "model": study.model_name(scheme)}
        if path.is_file():
            try:
                if load(path).extra.get("settings") == json.loads(json.dumps(settings)):
                    print(f"[study] {scheme} {variant or ''}: result {path} is current, reusing it", flush=True)
                    paths.append(path)
                    continue
            except BifocalError:
                pass
        if model is None:
            model, tokenizer = load_model(run_dir, device=ev.device, step=ev.step)
        apply_scaling(model, variant, factor, lengths)
        # Every length reads the same documents (those long enough for the longest length), so
        # the curve shows context length, not a change of text mix.
        docs = lambda n: iter_documents(prepared, "val", min_tokens=max(lengths) + 1)  # noqa: E731
        t0 = time.perf_counter()
        skipped: dict[int, str] = {}
        rows = evaluate_perplexity(model, docs, lengths, max_docs=ev.max_docs, max_tokens=ev.max_tokens,
                                   batch_size=ev.batch_size, on_skip=skipped.__setitem__)
        if not rows:
            raise BifocalError(f"{scheme}: no validation document in {prepared.path} has {max(lengths) + 1} tokens; "
                               "lower eval.length_multiples")
        shown = f"{run_name} + {variant} x{factor:g}" if variant else run_name
        print(f"[study] {shown}: evaluated in {time.perf_counter() - t0:.0f} s\n{format_table(rows, train_len)}",
              flush=True)
        for n, why in skipped.items():
            print(f"[study] warning: {shown}: length {n}: {why}", flush=True)
        extra = {"run_dir": str(run_dir), "settings": settings, "skipped": skipped,
                 "train_seed": int(cfg_raw["train"].get("seed", 1234)) if seed is None else seed}
        result = EvalResult(kind="ppl", model=study.model_name(scheme), scheme=scheme, rows=rows, variant=variant or "none",
                            factor=factor, train_len=train_len, extra=extra)
        paths.append(result.save(path))
    return paths


# ---------------------------------------------------------------------------------------------
# Entry point


def run_study(study: Study, out: str | Path) -> dict[str, Path]:
    """Train, evaluate and report; returns write_report's paths."""
    from bifocal.run import checkpoint

    from .report import write_report
    from .results import load

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seeds = f", seeds {', '.join(map(str, study.seeds))}" if len(study.seeds) > 1 else ""
    print(f"[study] {study.path.name}: schemes {', '.join(study.schemes)}{seeds} -> {out}", flush=True)
    result_paths: list[Path] = []
    report_dir = out if study.eval.step is None else out / f"step{study.eval.step}"
    for scheme, seed, name in study.runs():
        run_dir = out / "runs" / name
        if study.eval.step is None or study.eval.step not in dict(checkpoint.complete_checkpoints(run_dir)):
            run_dir = train_scheme(study, scheme, out, seed, name)
        result_paths += evaluate_scheme(study, scheme, run_dir, report_dir, seed, name)
    paths = write_report([load(p) for p in result_paths], report_dir)
    elapsed = time.perf_counter() - t0
    (out / "study.json").write_text(json.dumps({"preset": str(study.path), "schemes": study.schemes,
                                                "seeds": study.seeds, "wall_s": round(elapsed, 1)}, indent=1) + "\n")
    print(f"[study] done in {elapsed / 60:.1f} min", flush=True)
    print(f"[study] report  {paths['markdown'].resolve()}")
    if "extrapolation" in paths:
        print(f"[study] plot    {paths['extrapolation'].resolve()}")
    return paths


def main(args: argparse.Namespace) -> int:
    if args.seeds is not None and args.seeds < 1:
        raise BifocalError(f"--seeds must be >= 1, got {args.seeds}")
    study = load_study(args.preset, args.overrides, args.schemes, args.seeds, args.label)
    run_study(study, args.out)
    return 0
