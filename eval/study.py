"""`bifocal study extrapolation`: train several position schemes on the same data and budget,
evaluate each at 1x-16x its training length (RoPE also under training-free scaling), report.

A study YAML (configs/study/*.yaml) holds:

    include: cpu.yaml     # optional: another study file (relative to this one), this file's keys over it
    base:                 # a run config: `include:` (relative to the study file) and/or sections
    schemes: [rope, bifocal, spectral, pope]
    seeds: 3              # N (train.seed, +1, ... +N-1) or a list of seeds; --seeds N overrides
    label: fit            # optional (or --label): result rows read `bifocal[fit]`, so an ablation
                          # study's results can be reported beside the main study's
    overrides:            # per scheme, dotted run-config keys -> values
      rope: {model.position.scheme: rope}
    eval:
      length_multiples: [1, 2, 4, 8, 16]   # of model.max_seq_len; fractions (0.25) show context use
      protocols: [windows, "context>=0.75L"]  # perplexity protocols (protocol.py), each at every length
      scaling_variants: [pi, ntk, dynamic_ntk, yarn]
      scaling_schemes: [rope, bifocal]     # fixed-frequency heads to scale
      scaling_conventions: [fixed, matched]  # one factor at every length, and s = L / L_train per length
      scaling_factor: 16                   # the fixed factor; null: the largest multiple
      first_target: null                   # null: the largest min context, so every protocol and length
      targets_per_doc: 512                 #   scores the same targets (tokens P .. P+N-1 of each document)
      max_docs: null                       # null: every validation document long enough
      max_tokens: null                     # a cap on scored tokens per length (breaks "same targets")
      batch_size: null                     # windows per batch (null: about 16k tokens a batch)
    analysis:             # fixed before the run: the claims the report tests (significance.py)
      endpoints: {extrapolation: {multiples: [2, 4, 8, 16], protocol: "context>=0.75L"}}
      comparisons: [[bifocal, rope]]       # default: every label against rope

Layout: OUT/configs/<run>.yaml (the exact run config), OUT/runs/<run> (the run),
OUT/results/<run>[-variant-xS|-variant-matched][-protocol].json, OUT/report.md, OUT/report.json,
OUT/extrapolation.png, OUT/by_position.png, where <run> is the scheme, or <scheme>-s<seed> when the
study names seeds (report.md then gives mean ± std per length and tests the declared analysis). A
finished run and a result whose settings are unchanged are reused, so re-running a study resumes it.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import StrictFloat, StrictInt

from bifocal import configs
from bifocal.core.config import SETTINGS, check, deep_merge, flatten, nest, parse_overrides, yaml_mapping
from bifocal.core import logs
from bifocal.core.errors import BifocalError
from bifocal.core.settings import build
from bifocal.model.config import GPTConfig
from bifocal.model.schemes import SCALINGS, SCHEMES, studied, with_fixed_heads
from bifocal.run.config import CONFIG_DIR, SECTIONS, expand

from .protocol import context_tokens, parse_protocol, protocol_slug
from .significance import Analysis, parse_analysis

STUDY_DIR = CONFIG_DIR / "study"

log = logs.get_logger(__name__)


@dataclass
class StudyEval:
    __pydantic_config__ = SETTINGS
    length_multiples: list[StrictInt | StrictFloat] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """Evaluation lengths, in multiples of the training length; below 1 (e.g. 0.25) scores windows
    shorter than training, where a model that uses its context has a higher perplexity."""
    protocols: list[str] = field(default_factory=lambda: ["windows"])
    """Perplexity protocols (eval/protocol.py), each at every length: windows (non-overlapping),
    "context>=0.75L" (every target with 3L/4 .. L tokens of context), ..."""
    scaling_variants: list[str] = field(default_factory=lambda: list(SCALINGS))
    """Training-free RoPE scalings evaluated on the fixed-frequency heads (model/schemes.py)."""
    scaling_schemes: list[str] = field(default_factory=with_fixed_heads)
    """Schemes whose fixed-frequency heads are also evaluated under each scaling."""
    scaling_conventions: list[str] = field(default_factory=lambda: ["fixed", "matched"])
    """fixed: one factor (scaling_factor) at every length; matched: s = max(1, L / L_train) at each
    length L (dynamic NTK: factor 1, with which it computes that s itself)."""
    scaling_factor: float | None = None
    """The fixed convention's factor (null: the largest length multiple)."""
    first_target: int | None = None
    """The first scored token of every document (null: the largest min context over the protocols
    at the longest length, so every protocol and length scores the same targets)."""
    targets_per_doc: int | None = None
    """Targets scored per document (null: to the end of each document)."""
    max_docs: int | None = None
    """Documents per length at most (null: every validation document long enough)."""
    max_tokens: int | None = None
    """A cap on scored tokens per length (the scored targets then differ between lengths)."""
    batch_size: int | None = None
    """Windows per batch (null: about 16k tokens a batch)."""
    device: str | None = None
    """Where evaluation runs (null: cuda if present, else cpu)."""
    step: int | None = None
    """Evaluate the checkpoint of this training step instead of the final model (e.g. the schedule's
    midpoint); a run that holds it is not trained further. Results and report go to OUT/step<N>/."""

    def __post_init__(self) -> None:
        check(bool(self.length_multiples) and all(m > 0 for m in self.length_multiples), "length_multiples",
              self.length_multiples, "a non-empty list of positive numbers")
        check(bool(self.protocols), "protocols", self.protocols, "name at least one protocol, e.g. [windows]")
        for name in self.protocols:
            try:
                parse_protocol(str(name))
            except ValueError as exc:
                raise BifocalError(f"protocols: {exc}") from None
        bad = [v for v in self.scaling_variants if v not in SCALINGS]
        check(not bad, "scaling_variants", bad, f"each one of {', '.join(SCALINGS)}")
        bad = [c for c in self.scaling_conventions if c not in ("fixed", "matched")]
        check(not bad, "scaling_conventions", bad, "each fixed or matched")
        for key in ("first_target", "targets_per_doc", "max_docs", "max_tokens", "step"):
            value = getattr(self, key)
            check(value is None or value >= 1, key, value, "must be a positive integer or null")


# What a --label may hold: it tags result rows `scheme[label]`, which comparisons name.
LABEL = r"[A-Za-z0-9_.=,-]+"


@dataclass
class StudyFile:
    """A study YAML, as declared (configs/study/*.yaml; see the module docstring)."""

    __pydantic_config__ = SETTINGS
    base: dict[str, Any] | str = field(default_factory=dict)
    """The base run config: sections and/or `include:` (relative to the study file), or a path."""
    schemes: list[str] = field(default_factory=studied)
    """The schemes compared (default: every scheme but the controls, model/schemes.py)."""
    seeds: int | list[int] | None = None
    """N (train.seed, +1, ... +N-1) or a list of seeds; runs are then named <scheme>-s<seed>."""
    label: str | None = None
    """Tags the result rows `scheme[label]`, so an ablation is reported beside the main study."""
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per scheme, dotted run-config keys -> values (at least model.position.scheme)."""
    eval: StudyEval = field(default_factory=StudyEval)
    """What each trained run is evaluated on."""
    analysis: dict[str, Any] | None = None
    """Fixed before the run: the endpoints and comparisons the report tests (eval/significance.py)."""
    extension: dict[str, Any] | None = None
    """`bifocal study extension`: extend each base run to a longer context (eval/study_extension.py)."""

    def __post_init__(self) -> None:
        bad = [s for s in self.schemes if s not in SCHEMES]
        check(bool(self.schemes) and not bad, "schemes", bad or self.schemes, f"each one of {', '.join(SCHEMES)}")
        check(self.label is None or bool(re.fullmatch(LABEL, self.label)), "label", self.label,
              "letters, digits and _ . = , - only")


@dataclass
class Study:
    path: Path
    base: dict
    schemes: list[str]
    overrides: dict[str, dict[str, Any]]
    eval: StudyEval
    seeds: list[int] = field(default_factory=list)  # empty: the base config's train.seed, one run
    label: str | None = None  # tags result rows `scheme[label]`
    analysis: Analysis | None = None  # endpoints and comparisons declared before the run
    extension: dict[str, Any] | None = None  # the extension study's section (eval/study_extension.py)
    sets: dict[str, Any] = field(default_factory=dict)  # the command line's run keys (--set), nested

    def model_name(self, scheme: str) -> str:
        return f"{scheme}[{self.label}]" if self.label else scheme

    def run_config(self, scheme: str, seed: int | None = None) -> dict:
        """The full run config of one scheme: base, then its overrides, then the command line's
        `--set` run keys (they win over a scheme's override of the same key, e.g.
        `--set model.position.spectral_heads=1` over the preset's `bifocal:` override), then the seed."""
        raw = deep_merge(deep_merge(self.base, nest(self.overrides.get(scheme) or {})), self.sets)
        return raw if seed is None else deep_merge(raw, {"train": {"seed": seed}})

    def labels(self, schemes: list[str] | None = None) -> list[str]:
        """Every row label the study's results carry (report.label), for `schemes` (default: its own)."""
        train_len = int((self.base.get("model") or {}).get("max_seq_len", GPTConfig.max_seq_len))
        lengths = study_lengths(self.eval.length_multiples, train_len, str(self.path))
        out = []
        for scheme in schemes or self.schemes:
            out += [self.model_name(scheme) + (f"+{v}({_factor_tag(f)})" if v else "")
                    for v, f in evaluations(self, scheme, lengths, train_len)]
        return out

    def runs(self) -> list[tuple[str, int | None, str]]:
        """(scheme, seed or None, run name) for every run (see run_names)."""
        return run_names(self.schemes, self.seeds)


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


def study_mapping(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A study YAML with its `include:` applied: another study (relative to this file, itself
    possibly including one), whose keys this file's override. Raises BifocalError for a missing
    include, an include cycle or a file that is not a YAML mapping."""
    raw = yaml_mapping(path, "a study mapping with base, schemes, seeds, overrides, eval")
    if "include" in raw:
        parent = path.parent / str(raw.pop("include"))
        if not parent.is_file():
            raise BifocalError(f"{path}: include: {parent} not found")
        chain = (*chain, path.resolve())
        if parent.resolve() in chain:
            raise BifocalError(f"include cycle: {' -> '.join(p.name for p in (*chain, parent))}")
        included = study_mapping(parent, chain)
        # Its base's paths are read relative to itself, as when it runs alone.
        included["base"] = _base_config(included.get("base") or {}, parent)
        raw = deep_merge(included, raw)
    return raw


def load_study(preset: str, overrides: list[str] | None = None, schemes: str | None = None,
               seeds: int | None = None, label: str | None = None) -> Study:
    """Read and validate a study (a preset name or a YAML path) against `StudyFile`, with `--set`
    (run-config keys go to `base`), `--schemes`, `--seeds` and `--label` applied."""
    path = _preset_path(preset)
    raw = study_mapping(path)
    sets, run_sets = [], []
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        run_key = key.split(".")[0] in SECTIONS
        sets.append(f"base.{item}" if run_key else item)
        if run_key:
            if key == "model.position.scheme":
                raise BifocalError(f"--set {item}: a study sets each run's scheme; choose them with --schemes")
            run_sets.append(item)
    raw = deep_merge(raw, parse_overrides(sets))
    if schemes:
        raw["schemes"] = [s.strip() for s in schemes.split(",") if s.strip()]
    if label is not None:
        raw["label"] = label
    for key in (raw.get("eval") or {}) if isinstance(raw.get("eval"), dict) else ():
        if key in REMOVED_EVAL_KEYS:
            raise BifocalError(f"{path}: `eval.{key}` was removed: {REMOVED_EVAL_KEYS[key]}")
    try:
        declared = build(StudyFile, raw)
    except BifocalError as exc:
        raise BifocalError(f"{path}: {exc}") from None
    base = _base_config(declared.base, path)
    study = Study(path=path, base=base, schemes=declared.schemes, overrides=declared.overrides, eval=declared.eval,
                  sets=parse_overrides(run_sets),
                  seeds=_seed_list(seeds if seeds is not None else declared.seeds, base,
                                   "--seeds" if seeds is not None else str(path)), label=declared.label,
                  extension=declared.extension)
    train_len = (study.base.get("model") or {}).get("max_seq_len")
    if isinstance(train_len, int):
        study_lengths(study.eval.length_multiples, train_len, str(path))
    if declared.analysis is not None:
        study.analysis = parse_analysis(declared.analysis, str(path))
        if study.label:  # the study's rows read `scheme[label]...`: so do its declared comparisons
            tag = lambda name: re.sub(r"^([a-z]+)", lambda m: study.model_name(m.group(1)), name)  # noqa: E731
            a = study.analysis
            a.baseline = tag(a.baseline)
            a.comparisons = None if a.comparisons is None else [(tag(x), tag(y)) for x, y in a.comparisons]
        _check_analysis(study, str(path))
    return study


REMOVED_EVAL_KEYS = {"dynamic_ntk_factor": "dynamic NTK follows eval.scaling_conventions like the other variants "
                                           "(fixed: scaling_factor; matched: factor 1, i.e. s = L / L_train)"}


def _check_analysis(study: Study, where: str) -> None:
    """Endpoints name protocols the study evaluates; comparisons name labels it produces."""
    a = study.analysis
    for ep in a.endpoints:
        if ep.protocol not in study.eval.protocols:
            raise BifocalError(f"{where}: analysis endpoint {ep.name!r}: protocol {ep.protocol!r} is not in "
                               f"eval.protocols ({', '.join(study.eval.protocols)})")
        train_len = (study.base.get("model") or {}).get("max_seq_len")
        if isinstance(train_len, int):
            have = set(study_lengths(study.eval.length_multiples, train_len, where))
            want = {int(round(m * train_len)) for m in ep.multiples}
            if not want <= have:
                raise BifocalError(f"{where}: analysis endpoint {ep.name!r}: multiples {list(ep.multiples)} are not "
                                   f"all in eval.length_multiples {study.eval.length_multiples}")
    # Against the labels of every scheme, so `--schemes rope,pope` runs a subset (the report lists the
    # comparisons it could not make) while a misspelt label is refused before anything is trained.
    # A `[tag]` (a --label'd ablation, reported beside the study) names the same scheme and variant.
    untag = lambda name: re.sub(rf"\[{LABEL}\]", "", name)  # noqa: E731
    labels = {untag(name) for name in study.labels(list(SCHEMES))}
    for pair in a.comparisons or []:
        for name in pair:
            if untag(name) not in labels:
                raise BifocalError(f"{where}: analysis comparison {list(pair)}: {name!r} is not a label this study "
                                   f"can produce (e.g. {', '.join(study.labels())})")


# ---------------------------------------------------------------------------------------------
# Training


def run_names(schemes: list[str], seeds: list[int]) -> list[tuple[str, int | None, str]]:
    """(scheme, seed or None, run name) of every run of a study, for extrapolation and task studies
    alike: `scheme-s<seed>` when the study names seeds (so studies over different seeds can share
    one OUT), else `scheme` with the config's own seed."""
    if not seeds:
        return [(s, None, s) for s in schemes]
    return [(s, seed, f"{s}-s{seed}") for s in schemes for seed in seeds]


def train_run(config: Path, out: Path, name: str, max_steps: int, sets: list[str] | tuple[str, ...] = ()) -> Path:
    """Train OUT/runs/<name> from `config` (+ `--set` overrides) in a child process (the one way a
    study trains: bifocal.run.train_process), logging to OUT/logs/train-<name>.log; a finished run
    is reused, a checkpointed one resumed."""
    from bifocal.run import train_process

    run_dir = out / "runs" / name
    log_path = out / "logs" / f"train-{name}.log"
    t0 = time.perf_counter()
    log.info(f"{name}: training {max_steps} steps -> {run_dir} (log {log_path})")
    if not train_process.train(config, run_dir, max_steps, log_path, sets):
        log.info(f"{name}: finished run found in {run_dir}, reusing it")
        return run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    log.info(f"{name}: trained in {time.perf_counter() - t0:.0f} s, "
             f"val loss {summary.get('val_loss') or float('nan'):.4f}")
    return run_dir


def train_scheme(study: Study, scheme: str, out: Path, seed: int | None = None, name: str | None = None) -> Path:
    """Train one scheme (with one seed) into OUT/runs/<name> from the exact run config written to
    OUT/configs/<name>.yaml."""
    from bifocal.run.config import build_config

    name = name or scheme
    raw = deep_merge(study.run_config(scheme, seed), {"train": {"run_name": name}})
    try:
        cfg = build_config(raw)
    except BifocalError as exc:
        raise BifocalError(f"{study.path}: scheme {scheme}: {exc}") from None
    if cfg.model.position.scheme != scheme:
        raise BifocalError(f"{study.path}: overrides.{scheme} must set model.position.scheme: {scheme}")
    cfg_path = write_run_config(out, name, raw)
    return train_run(cfg_path, out, name, cfg.train.max_steps)


# Settings that change how fast a run trains, not what it learns: a run trained with other values
# is still the same run (e.g. the halves of a study run side by side with one thread each).
NOT_IDENTITY = ("train.threads",)


def write_run_config(out: Path, name: str, raw: dict) -> Path:
    """Write the run config of OUT/runs/<name> to OUT/configs/<name>.yaml and return its path.

    Raises BifocalError when OUT/runs/<name> exists and was started from a config that differs in
    anything but NOT_IDENTITY: reusing it would report another experiment under this one's name
    (e.g. an ablation's `--set data.positions=reset` pointed at the main study's OUT)."""
    cfg_path = out / "configs" / f"{name}.yaml"
    if (out / "runs" / name).exists() and cfg_path.is_file():
        old, new = flatten(yaml.safe_load(cfg_path.read_text()) or {}), flatten(raw)
        diff = [f"{k}: {old.get(k, '(unset)')!r} there, {new.get(k, '(unset)')!r} now"
                for k in sorted(set(old) | set(new)) if k not in NOT_IDENTITY and old.get(k) != new.get(k)]
        if diff:
            raise BifocalError(f"{out / 'runs' / name} was trained with other settings ({'; '.join(diff[:3])}"
                               f"{'; ...' if len(diff) > 3 else ''}); use another --out, or remove that run")
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return cfg_path


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


def evaluations(study: Study, scheme: str, lengths: list[int], train_len: int) -> list[tuple[str | None, float | str]]:
    """(variant or None, factor) pairs to evaluate for one scheme: the factor is a number (one at
    every length) or MATCHED (s = max(1, L / L_train) at each length)."""
    from .perplexity import MATCHED

    fixed = study.eval.scaling_factor if study.eval.scaling_factor is not None else max(lengths) / train_len
    out: list[tuple[str | None, float | str]] = [(None, 1.0)]
    if scheme in study.eval.scaling_schemes:
        for v in study.eval.scaling_variants:
            out += [(v, max(1.0, float(fixed)) if c == "fixed" else MATCHED) for c in study.eval.scaling_conventions]
    return out


def _factor_tag(factor: float | str) -> str:
    return factor if isinstance(factor, str) else f"x{factor:g}"


def first_target(ev: StudyEval, lengths: list[int]) -> int:
    """The first scored token of every document: the largest min context any protocol needs at
    the longest length, so every protocol and length scores the same targets."""
    if ev.first_target is not None:
        return ev.first_target
    return max(context_tokens(parse_protocol(p)[0], max(lengths)) for p in ev.protocols)


def evaluate_scheme(study: Study, scheme: str, run_dir: Path, out: Path, seed: int | None = None,
                    name: str | None = None) -> list[Path]:
    """Perplexity of one trained run at every study length, per protocol and scaling variant;
    reuses result files whose settings and checkpoint step match. The seed goes into the result's
    extra. Raises BifocalError when a result scored different targets at different lengths."""
    from bifocal.data_pipeline.loader import PreparedData, iter_documents

    from .loading import load_model
    from .perplexity import MATCHED, evaluate_scaled, format_table, same_targets
    from .results import EvalResult, load

    ev = study.eval
    model = tokenizer = None
    step = ev.step if ev.step is not None else json.loads((run_dir / "summary.json").read_text())["step"]
    cfg_raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    train_len = int(cfg_raw["model"]["max_seq_len"])
    lengths = study_lengths(ev.length_multiples, train_len, str(run_dir))
    first = first_target(ev, lengths)
    # Every length reads the same documents (each with a full window at the longest length and, given
    # targets_per_doc, all its targets), so a curve shows context length, not a change of text.
    need = max(max(lengths) + 1, first + (ev.targets_per_doc or 1))
    prepared = PreparedData(cfg_raw["data"]["prepared_dir"])
    run_name = name or scheme
    paths = []
    for protocol in ev.protocols:
        min_context, stride = parse_protocol(protocol)
        for variant, factor in evaluations(study, scheme, lengths, train_len):
            tag = f"-{variant}-{_factor_tag(factor)}" if variant else ""
            path = out / "results" / f"{run_name}{tag}{protocol_slug(protocol)}.json"
            settings = {"eval": asdict(ev), "step": step, "lengths": lengths, "factor": factor,
                        "protocol": protocol, "first_target": first, "model": study.model_name(scheme)}
            if path.is_file():
                try:
                    if load(path).extra.get("settings") == json.loads(json.dumps(settings)):
                        log.info(f"{path.stem}: result is current, reusing it")
                        paths.append(path)
                        continue
                except BifocalError:
                    pass
            if model is None:
                model, tokenizer = load_model(run_dir, device=ev.device, step=ev.step)
            docs = lambda n: iter_documents(prepared, "val", min_tokens=need)  # noqa: E731
            t0 = time.perf_counter()
            skipped: dict[int, str] = {}
            rows = evaluate_scaled(model, docs, lengths, variant, factor, max_docs=ev.max_docs,
                                   max_tokens=ev.max_tokens, batch_size=ev.batch_size, on_skip=skipped.__setitem__,
                                   min_context=min_context, stride=stride, first_target=first,
                                   targets_per_doc=ev.targets_per_doc, progress=False)
            if not rows:
                raise BifocalError(f"{scheme}: no validation document in {prepared.path} has {need} tokens; "
                                   "lower eval.length_multiples or eval.targets_per_doc")
            same = same_targets(rows)
            if ev.max_tokens is None and not same:
                raise BifocalError(f"{path.stem}: the scored targets differ between lengths "
                                   f"({sorted({r['targets'] for r in rows})}); the report would compare different text")
            log.info(f"{path.stem}: evaluated in {time.perf_counter() - t0:.0f} s\n"
                     f"{format_table(rows, train_len)}")
            for n, why in skipped.items():
                log.warning(f"{path.stem}: length {n}: {why}")
            extra = {"run_dir": str(run_dir), "settings": settings, "skipped": skipped, "protocol": protocol,
                     "same_targets": same,
                     "train_seed": int(cfg_raw["train"].get("seed", 1234)) if seed is None else seed}
            result = EvalResult(kind="ppl", model=study.model_name(scheme), scheme=scheme, rows=rows,
                                variant=variant or "none", factor=max(r.get("factor", 1.0) for r in rows),
                                convention="matched" if factor == MATCHED else "fixed", train_len=train_len,
                                extra=extra)
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
    log.info(f"{study.path.name}: schemes {', '.join(study.schemes)}{seeds} -> {out}")
    result_paths: list[Path] = []
    report_dir = out if study.eval.step is None else out / f"step{study.eval.step}"
    for scheme, seed, name in study.runs():
        run_dir = out / "runs" / name
        if study.eval.step is None or study.eval.step not in dict(checkpoint.complete_checkpoints(run_dir)):
            run_dir = train_scheme(study, scheme, out, seed, name)
        result_paths += evaluate_scheme(study, scheme, run_dir, report_dir, seed, name)
    paths = write_report([load(p) for p in result_paths], report_dir, study.analysis)
    elapsed = time.perf_counter() - t0
    (out / "study.json").write_text(json.dumps({"preset": str(study.path), "schemes": study.schemes,
                                                "seeds": study.seeds, "wall_s": round(elapsed, 1),
                                                "analysis": study.analysis.to_dict() if study.analysis else None},
                                               indent=1) + "\n")
    log.info(f"done in {elapsed / 60:.1f} min")
    print(f"[study] report  {paths['markdown'].resolve()}")
    for key in ("extrapolation", "by_position"):
        if key in paths:
            print(f"[study] plot    {paths[key].resolve()}")
    return paths


def main(args: argparse.Namespace) -> int:
    if args.seeds is not None and args.seeds < 1:
        raise BifocalError(f"--seeds must be >= 1, got {args.seeds}")
    study = load_study(args.preset, args.overrides, args.schemes, args.seeds, args.label)
    run_study(study, args.out)
    return 0
