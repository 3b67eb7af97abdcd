"""`bifocal study extension`: how each position scheme adapts when a trained model is extended to a
longer context (issue 23). A study YAML with an `extension:` section:

    base: ...; schemes: [...]; seeds: 3; overrides: ...; eval: ...   # the base study, as for extrapolation
    extension:
      multiple: 4           # the extended training length: 4 x the base's model.max_seq_len (L)
      steps: 0.1            # its budget: a fraction of the base's train.max_steps (or a number of steps)
      arms:                 # more ways to extend a scheme: name -> scheme and run-config keys
        pi: {scheme: rope, set: {model.position.rope_scaling: {type: pi}}}
        yarn: {scheme: rope, set: {model.position.rope_scaling: {type: yarn}}}

The base runs are trained (or reused) as the extrapolation study trains them, into OUT/runs/<run>.
Every scheme is then extended plainly (arm `ext`) and by each arm naming it, with
`bifocal train --init-from OUT/runs/<run>` at multiple x L for the budget: a fresh optimizer and
schedule (warmup a tenth of the budget), everything else as the base run. An arm's rope_scaling
gets `factor: multiple` and `original_max_len: L` unless it says otherwise (PI and YaRN
fine-tuning as in the YaRN paper, arXiv 2309.00071 section 4). Every model, base and extended, is
evaluated at the same token lengths: the study's eval.length_multiples of L (e.g. L/4 .. 32L), with
the training-free scalings on the base models only. Result rows read `rope` (base), `rope[ext]`,
`rope[pi]`, ...; one report and plot with mean ± std over seeds, as the extrapolation study's.
Runs: OUT/runs/<run> (base) and OUT/runs/<arm>-<run>; results, report and plot: OUT/extension/, so
an extrapolation study's OUT can host the extension without either overwriting the other's results
(they score other lengths).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from bifocal.core import logs
from bifocal.core.config import SETTINGS, check, deep_merge, nest
from bifocal.core.errors import BifocalError
from bifocal.core.settings import build
from bifocal.model.schemes import SCHEMES

from .study import Study, evaluate_scheme, load_study, train_run, train_scheme, write_run_config

log = logs.get_logger(__name__)
PLAIN = "ext"  # the arm every scheme is extended by: no change but the length and the budget


@dataclass
class ExtensionArm:
    __pydantic_config__ = SETTINGS
    scheme: str
    """The scheme this arm extends (one of the study's schemes)."""
    set: dict[str, Any] = field(default_factory=dict)
    """Run-config keys (dotted) set on the extension run, e.g. model.position.rope_scaling."""


@dataclass
class ExtensionSettings:
    """A study YAML's `extension:` section (see the module docstring)."""

    __pydantic_config__ = SETTINGS
    multiple: int = 4
    """The extended training length, in multiples of the base's model.max_seq_len."""
    steps: float = 0.1
    """The extension's budget: below 1 a fraction of the base's train.max_steps, else a number of steps."""
    arms: dict[str, ExtensionArm] = field(default_factory=dict)
    """More ways to extend a scheme, by name (the result rows read `scheme[name]`)."""

    def __post_init__(self) -> None:
        check(self.multiple >= 2, "multiple", self.multiple, "must be an integer >= 2")
        check(self.steps > 0, "steps", self.steps, "a fraction of the base's steps (< 1) or a number of steps")
        check(PLAIN not in self.arms, "arms", PLAIN, f"`{PLAIN}` is the plain extension every scheme gets")


def arms(study: Study, ext: ExtensionSettings) -> list[tuple[str, str, dict]]:
    """(arm, scheme, run-config keys) of every extension, plain ones first."""
    out = [(PLAIN, scheme, {}) for scheme in study.schemes]
    return out + [(name, arm.scheme, arm.set) for name, arm in ext.arms.items() if arm.scheme in study.schemes]


def extension_config(study: Study, ext: ExtensionSettings, scheme: str, seed: int | None, sets: dict,
                     parent: Path, name: str) -> tuple[dict, int]:
    """The run config of one extension and its steps: the base run's config at multiple x L from
    the parent's weights, then the arm's keys."""
    raw = study.run_config(scheme, seed)
    base_len = int((raw.get("model") or {}).get("max_seq_len", 256))
    base_steps = int((raw.get("train") or {}).get("max_steps", 300))
    steps = max(1, round(ext.steps * base_steps) if ext.steps < 1 else int(ext.steps))
    raw = deep_merge(raw, {"model": {"max_seq_len": ext.multiple * base_len},
                           "train": {"run_name": name, "max_steps": steps, "init_from": str(parent.resolve()),
                                     "init_step": None, "eval_every": steps, "save_every": steps},
                           "optim": {"warmup_steps": max(1, steps // 10)}})
    raw = deep_merge(raw, nest(sets))
    scaling = (raw["model"].get("position") or {}).get("rope_scaling")
    if isinstance(scaling, dict):  # PI / YaRN fine-tuning: scaled by the extension, from the base length
        scaling.setdefault("factor", float(ext.multiple))
        scaling.setdefault("original_max_len", base_len)
    return raw, steps


def check_extension(study: Study, ext: ExtensionSettings) -> None:
    """Every arm's run config is valid before anything trains (one line naming the arm)."""
    from bifocal.run.config import build_config

    for name, arm in ext.arms.items():
        if arm.scheme not in SCHEMES:
            raise BifocalError(f"{study.path}: extension.arms.{name}.scheme {arm.scheme!r}: one of {', '.join(SCHEMES)}")
    for arm, scheme, sets in arms(study, ext):
        raw, _ = extension_config(study, ext, scheme, None, sets, Path("parent"), f"{arm}-{scheme}")
        try:
            build_config(raw)
        except BifocalError as exc:
            raise BifocalError(f"{study.path}: extension arm {arm} ({scheme}): {exc}") from None


def run_extension(study: Study, ext: ExtensionSettings, out: str | Path) -> dict[str, Path]:
    """Train (or reuse) the base runs and their extensions, evaluate all at the same lengths,
    report; returns write_report's paths."""
    from .report import write_report
    from .results import load

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report_dir = out / "extension"
    t0 = time.perf_counter()
    results: list[Path] = []
    for scheme, seed, name in study.runs():
        run_dir = train_scheme(study, scheme, out, seed, name)
        results += evaluate_scheme(study, scheme, run_dir, report_dir, seed, name)
    # The extended models are scored at the same token lengths: multiples of their own length / multiple.
    ext_eval = dataclasses.replace(study.eval, scaling_schemes=[],
                                   length_multiples=[m / ext.multiple for m in study.eval.length_multiples])
    for arm, scheme, sets in arms(study, ext):
        arm_study = dataclasses.replace(study, label=arm, eval=ext_eval, analysis=None)
        for _, seed, name in [r for r in study.runs() if r[0] == scheme]:
            ext_name = f"{arm}-{name}"
            raw, steps = extension_config(study, ext, scheme, seed, sets, out / "runs" / name, ext_name)
            cfg_path = write_run_config(out, ext_name, raw)
            run_dir = train_run(cfg_path, out, ext_name, steps)
            results += evaluate_scheme(arm_study, scheme, run_dir, report_dir, seed, ext_name)
    paths = write_report([load(p) for p in results], report_dir, None)
    elapsed = time.perf_counter() - t0
    (report_dir / "study.json").write_text(json.dumps({"preset": str(study.path), "kind": "extension",
                                                "schemes": study.schemes, "seeds": study.seeds,
                                                "extension": dataclasses.asdict(ext), "wall_s": round(elapsed, 1)},
                                               indent=1) + "\n")
    log.info(f"done in {elapsed / 60:.1f} min")
    print(f"[study] report  {paths['markdown'].resolve()}")
    if "extrapolation" in paths:
        print(f"[study] plot    {paths['extrapolation'].resolve()}")
    return paths


def main(args: argparse.Namespace) -> int:
    if args.seeds is not None and args.seeds < 1:
        raise BifocalError(f"--seeds must be >= 1, got {args.seeds}")
    study = load_study(args.preset, args.overrides, args.schemes, args.seeds)
    if study.extension is None:
        raise BifocalError(f"{study.path}: no `extension:` section (multiple, steps, arms); e.g. --preset cpu-extension")
    try:
        ext = build(ExtensionSettings, study.extension, "extension")
    except BifocalError as exc:
        raise BifocalError(f"{study.path}: {exc}") from None
    check_extension(study, ext)
    run_extension(study, ext, args.out)
    return 0
