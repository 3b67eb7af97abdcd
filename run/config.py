"""Run configuration: YAML sections model/data/train/optim/deepspeed, `--set` overrides, strict
keys (an unknown key names the nearest valid one, a removed key says what replaced it), and
DeepSpeed config generation. Every section is a settings dataclass validated by pydantic
(bifocal.core.settings); each field's attribute docstring is its description (`bifocal config`)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from bifocal import configs
from bifocal.core import config as core
from bifocal.core.config import SETTINGS, check, check_key, deep_merge, parse_overrides, positive_ints
from bifocal.core.errors import BifocalError
from bifocal.core.settings import build, describe
from bifocal.data_pipeline.config import DataConfig, resolve_input_paths
from bifocal.model.config import GPTConfig

CONFIG_DIR = configs.ROOT
DEMO_CONFIG = configs.DEMO
# Sections older configs may hold: a clear message instead of "unknown section".
REMOVED_SECTIONS = {"eval": "evaluation settings are options of `bifocal eval` (see `bifocal eval ppl --help`); "
                            "delete the section"}


# Keys older configs may hold: a clear message instead of "unknown key".
REMOVED_KEYS = {
    # The training length was also model.max_seq_len, and code read one or the other.
    "train.seq_len": "the training context length is model.max_seq_len (one key for one fact); move the value there",
}


@dataclass
class TrainConfig:
    """`train`: the run's name and place, batch, steps, cadences and devices. Checks raise BifocalError."""

    __pydantic_config__ = SETTINGS
    out_dir: str = "runs"
    """Runs are written to out_dir/run_name."""
    run_name: str = "demo"
    """The run directory's name."""
    micro_batch: int = 8
    """Sequences per micro-batch on each rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 300
    """Optimizer steps."""
    seed: int = 1234
    """Seed of the model init and the data order."""
    log_every: int = 10
    """A training line and metrics every N steps."""
    eval_every: int = 100
    """Validation loss every N steps (0: only at the end)."""
    eval_batches: int = 8
    """Micro-batches per validation."""
    save_every: int = 100
    """A checkpoint every N steps (0: only at the end)."""
    keep_last: int = 3
    """Complete checkpoints kept."""
    on_nan: str = "stop"
    """A non-finite loss: stop (the newest checkpoint stays) | skip (the step is dropped)."""
    device: str = "auto"
    """auto | cpu | cuda"""
    threads: int | None = None
    """Torch intra-op threads per rank on CPU (null: cores / ranks)."""
    wandb_project: str | None = None
    """Also log to Weights & Biases in this project (needs the wandb extra)."""
    compile: bool = False
    """torch.compile the model (engine.compile(); inductor, any ZeRO stage)."""
    activation_checkpointing: int = 0
    """Recompute every k-th block in the backward (0: off, 1: every block)."""
    peak_tflops: float | None = None
    """The device's peak TFLOP/s for MFU where the CUDA name table has none."""
    init_from: str | None = None
    """Start from this run directory's weights (`bifocal train --init-from RUN`): context extension
    with a longer model.max_seq_len, optionally model.position.rope_scaling to fine-tune the
    fixed-frequency heads with PI or YaRN; the optimizer and schedule start fresh."""
    init_step: int | None = None
    """With init_from: the parent's checkpoint at this step (null: its newest; the run records the step)."""
    sequence_parallel: int = 1
    """Ranks that share each sequence (DeepSpeed-Ulysses): each holds a contiguous 1/N of every
    sequence, attention swaps sequence shards for head shards; N divides the ranks, n_head,
    n_kv_head and model.max_seq_len (1: off)."""

    def __post_init__(self) -> None:
        check(isinstance(self.activation_checkpointing, int) and self.activation_checkpointing >= 0,
              "activation_checkpointing", self.activation_checkpointing, "0 (off), 1 (every block) or k (every k-th block)")
        positive_ints(self, "micro_batch", "grad_accum", "max_steps", "log_every", "eval_batches", "keep_last",
                      "sequence_parallel")
        check(self.on_nan in ("stop", "skip"), "on_nan", self.on_nan, "one of stop, skip")
        check(self.device in ("auto", "cpu", "cuda"), "device", self.device, "one of auto, cpu, cuda")


@dataclass
class OptimConfig:
    """`optim`: AdamW (torch's) with linear warmup and cosine decay. Checks raise BifocalError."""

    __pydantic_config__ = SETTINGS
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio."""
    warmup_steps: int = 30
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay of the matrices."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Gradient norm clipping."""

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", self.lr, "must be > 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(len(self.betas) == 2, "betas", self.betas, "two numbers")


@dataclass
class DeepSpeedSection:
    """`deepspeed`: ZeRO stage, precision, offload, or a whole DeepSpeed config file. Checks raise
    BifocalError."""

    __pydantic_config__ = SETTINGS
    zero_stage: int = 0
    """ZeRO stage 0 | 1 | 2 | 3"""
    precision: str = "fp32"
    """fp32 | bf16 | fp16"""
    offload_optimizer: bool = False
    """ZeRO-Offload of the optimizer states to CPU (stage >= 1)."""
    offload_params: bool = False
    """Parameter offload to CPU (stage 3)."""
    config_file: str | None = None
    """A whole DeepSpeed JSON config, used as given."""
    overrides: dict = field(default_factory=dict)
    """Merged into the generated DeepSpeed config."""

    def __post_init__(self) -> None:
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", self.zero_stage, "one of 0, 1, 2, 3")
        check(self.precision in ("fp32", "bf16", "fp16"), "precision", self.precision, "one of fp32, bf16, fp16")
        check(not self.offload_params or self.zero_stage == 3, "offload_params", self.offload_params,
              "parameter offload needs zero_stage 3")


@dataclass
class RunConfig:
    """A whole run config, one field a section (`build_config` validates it)."""

    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    # Whether model.vocab_size was given; if not, the tokenizer decides it.
    vocab_from_data: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The sections as nested plain dicts, as config.yaml stores them."""
        out = dataclasses.asdict(self)
        out.pop("vocab_from_data")
        return out


# The sections of a run config and the class each is validated against.
SECTION_TYPES = {"model": GPTConfig, "data": DataConfig, "train": TrainConfig, "optim": OptimConfig,
                 "deepspeed": DeepSpeedSection}
SECTIONS = tuple(SECTION_TYPES)
_WHAT = f"a mapping with sections {', '.join(SECTIONS)}"


def _relocate_inputs(raw: dict, base_dir: Path) -> None:
    """Input paths in a config file are relative to that file (outputs stay relative to cwd)."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for src in data.get("sources") or []:
        if isinstance(src, dict):
            resolve_input_paths(src, base_dir)
    tok = data.get("tokenizer")
    if isinstance(tok, dict) and tok.get("path") and not Path(tok["path"]).is_absolute():
        tok["path"] = str((base_dir / tok["path"]).resolve())


def read_yaml(path: str | Path) -> dict:
    """A run config file with its `include:`s applied and the data section's inputs made absolute;
    raises BifocalError as `bifocal.core.config.read_yaml` does."""
    return core.read_yaml(path, _relocate_inputs, _WHAT)


def expand(raw: Mapping[str, Any], base_dir: Path) -> dict:
    """`include:` (relative to `base_dir`) applied to `raw`, data inputs made absolute."""
    return core.expand(raw, base_dir, _relocate_inputs, _WHAT)


def config_path(name: str | Path | None) -> Path:
    """A `--config` value as a file: a path on disk, else a bundled preset (`gpu/125m`); None: the
    demo preset. Raises BifocalError when it is neither."""
    if name is None:
        return DEMO_CONFIG
    found = configs.find(name)
    if found is None:
        raise BifocalError(f"config file not found: {name} (bundled presets: {', '.join(configs.bundled())})")
    return found


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (default: the embedded demo), apply `--set` overrides, validate strictly; raises
    BifocalError naming the file, key or value at fault."""
    raw = read_yaml(config_path(path))
    raw = deep_merge(raw, parse_overrides(overrides or []))
    return build_config(raw)


def build_config(raw: Mapping[str, Any]) -> RunConfig:
    """A RunConfig from a mapping of sections, each validated against its declaration; raises
    BifocalError for an unknown or removed section or key, or an invalid value."""
    for key in raw:
        check_key(str(key), str(key), SECTIONS, REMOVED_SECTIONS, "config section")
        section = raw[key]
        if section is not None and not isinstance(section, Mapping):
            raise BifocalError(f"`{key}` must be a mapping of keys, got {type(section).__name__}")
        for sub in section or {}:
            if f"{key}.{sub}" in REMOVED_KEYS:
                raise BifocalError(f"config key `{key}.{sub}` was removed: {REMOVED_KEYS[f'{key}.{sub}']}")
    sections = {name: build(cls, raw.get(name), name) for name, cls in SECTION_TYPES.items()}
    check_sequence_parallel(sections["train"].sequence_parallel, sections["model"])
    return RunConfig(**sections, vocab_from_data="vocab_size" not in (raw.get("model") or {}))


def check_sequence_parallel(n: int, model: GPTConfig, world: int | None = None) -> None:
    """What DeepSpeed-Ulysses needs to split a run's sequences over `n` ranks: whole heads and key/value
    heads per rank after the all-to-all, equal sequence shards, whole sequence-parallel groups in
    `world` ranks (when given), and RoPE frequencies that do not depend on the sequence's length
    (dynamic NTK reads the largest position, which a shard does not see). Raises BifocalError."""
    if n == 1:
        return
    for key, value in (("n_head", model.n_head), ("n_kv_head", model.n_kv_head), ("max_seq_len", model.max_seq_len)):
        if value % n:
            raise BifocalError(f"train.sequence_parallel={n} must divide model.{key}={value}")
    scaling = model.position.rope_scaling
    if scaling is not None and scaling.type == "dynamic_ntk":
        raise BifocalError(f"train.sequence_parallel={n} cannot train with rope_scaling dynamic_ntk: its frequencies "
                           "follow the whole sequence's length, which no shard sees")
    if world is not None and world % n:
        raise BifocalError(f"train.sequence_parallel={n} must divide the number of ranks, {world}")


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the run's config as YAML to `path` with its output paths made absolute, so commands
    that read it (`bifocal eval ppl RUN`) work from any directory."""
    out = cfg.to_dict()
    out["data"]["prepared_dir"] = str(Path(cfg.data.prepared_dir).resolve())
    out["train"]["out_dir"] = str(Path(cfg.train.out_dir).resolve())
    Path(path).write_text(yaml.safe_dump(out, sort_keys=False))


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for this run: generated, or the user's file with the run's batch
    sizes filled in where it has none; `deepspeed.overrides` merged over either. Raises
    BifocalError for a missing deepspeed.config_file."""
    t, ds = cfg.train, cfg.deepspeed
    if ds.config_file:
        path = Path(ds.config_file)
        if not path.is_file():
            raise BifocalError(f"deepspeed.config_file not found: {path}")
        conf = json.loads(path.read_text())
        conf.setdefault("train_micro_batch_size_per_gpu", t.micro_batch)
        conf.setdefault("gradient_accumulation_steps", t.grad_accum)
        conf.pop("train_batch_size", None)  # derived from the two above and the world size
        return sequence_parallel_reduction(deep_merge(conf, ds.overrides), t.sequence_parallel)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1 and ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # The optimizer is a torch AdamW built by us (param groups with their own lr multipliers);
        # DeepSpeed's own optimizers would compile fused ops on CPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.precision == "bf16":
        conf["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        conf["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 500}
    return sequence_parallel_reduction(deep_merge(conf, ds.overrides), t.sequence_parallel)


def sequence_parallel_reduction(conf: dict[str, Any], n: int) -> dict[str, Any]:
    """`conf` with `reduce_scatter: false` for ZeRO-3 under sequence parallelism (n > 1), so that it
    reduces gradients by all-reduce: its reduce-scatter path
    averages them over every rank, the sequence-parallel ones included (DeepSpeed 0.19.8
    `__avg_scatter_grads`; deepspeedai/DeepSpeed#6841), so they came out 1/N too small, while its
    all-reduce path divides by the data-parallel ranks only (tests/test_sequence_parallel.py)."""
    zero = conf.get("zero_optimization") or {}
    if n > 1 and zero.get("stage") == 3:
        conf["zero_optimization"] = {**zero, "reduce_scatter": False}
    return conf


def config_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default as YAML, description) of every run config key (`bifocal config`)."""
    return [row for name, cls in SECTION_TYPES.items() for row in describe(cls, f"{name}.")]
