"""The settings of the `bifocal eval` commands, declared once (types, defaults, descriptions): their
flags and `--help` are made from these (bifocal.core.settings.add_arguments) and the values given
are validated against them before a command runs. The model or result paths stay positional
arguments. Torch-free, so `bifocal --help` stays instant."""

from __future__ import annotations

from dataclasses import dataclass

from bifocal.core.config import SETTINGS, check
from bifocal.data_pipeline.synthetic import TASKS
from bifocal.model.schemes import SCALINGS


def _positive_or_none(obj, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        check(value is None or value >= 1, key, value, "must be a positive integer")


def _scaling(obj) -> None:
    check(obj.rope_scaling is None or obj.rope_scaling in SCALINGS, "rope_scaling", obj.rope_scaling,
          f"one of {', '.join(SCALINGS)}")


@dataclass
class PplSettings:
    """`bifocal eval ppl MODEL`: perplexity at several context lengths (eval/perplexity.py)."""

    __pydantic_config__ = SETTINGS
    data: str | None = None
    """Prepared data directory (its validation split) or raw files (default: the run's own validation split)."""
    lengths: str = "512,1024,2048"
    """Comma-separated context lengths in tokens."""
    stride: int | None = None
    """Sliding-window stride (default: length - min context + 1; non-overlapping without min_context)."""
    min_context: str | None = None
    """Score every target with at least C tokens of context: tokens (24) or a fraction of the length (0.75L)."""
    first_target: int | None = None
    """Score each document from token P on (default: the largest min context, so every length scores the same targets)."""
    targets_per_doc: int | None = None
    """Score at most N targets per document (default: to its end)."""
    rope_scaling: str | None = None
    """Training-free scaling of the fixed-frequency heads: pi | ntk | dynamic_ntk | yarn (model/schemes.py)."""
    factor: float | str | None = None
    """The scaling factor at every length (default: max length / training length), or `matched`: s = length / training length at each length."""
    max_docs: int | None = None
    """Documents per length at most (default: all)."""
    max_tokens: int | None = None
    """Tokens scored per length at most."""
    batch_size: int | None = None
    """Windows per batch (default: about 16k tokens a batch, halved on out-of-memory)."""
    device: str | None = None
    """cpu | cuda (default: cuda if present)."""
    out: str | None = None
    """The JSON result's path (default: MODEL/eval/ppl*.json)."""
    overwrite: bool = False
    """Replace an existing --out file."""

    def __post_init__(self) -> None:
        _positive_or_none(self, "stride", "first_target", "targets_per_doc", "max_docs", "max_tokens", "batch_size")
        _scaling(self)
        if self.min_context is not None:
            self.min_context = str(self.min_context)


@dataclass
class ReportSettings:
    """`bifocal eval report RESULTS...`: results collected into report.md and its plots (eval/report.py)."""

    __pydantic_config__ = SETTINGS
    out: str = "report"
    """Output directory."""
    overwrite: bool = False
    """Replace a report already in --out."""
    analysis: str | None = None
    """Test the endpoints and comparisons declared in this study YAML's analysis: section (a path or a preset name, e.g. cpu)."""


@dataclass
class PasskeySettings:
    """`bifocal eval passkey MODEL`: passkey retrieval accuracy against context length (eval/passkey.py)."""

    __pydantic_config__ = SETTINGS
    lengths: str | None = None
    """Comma-separated context lengths, answer included (default: 1,2,4,8,16 x the training length)."""
    data: str | None = None
    """Filler text: a prepared directory (validation split) or raw files (default: the run's own validation split)."""
    trials: int = 10
    """Passkeys per length."""
    label: str | None = None
    """The report row's name (default: the run's name); runs of one scheme sharing it are averaged over training seeds."""
    seed: int = 0
    """Seed of the passkeys and their depths."""
    rope_scaling: str | None = None
    """Training-free scaling of the fixed-frequency heads: pi | ntk | dynamic_ntk | yarn."""
    factor: float | None = None
    """The scaling factor (default: max length / training length)."""
    device: str | None = None
    """cpu | cuda (default: cuda if present)."""
    out: str | None = None
    """The JSON result's path (default: MODEL/eval/passkey*.json)."""

    def __post_init__(self) -> None:
        _positive_or_none(self, "trials")
        _scaling(self)
        if self.lengths is not None:
            self.lengths = str(self.lengths)


@dataclass
class SpectrumSettings:
    """`bifocal eval spectrum MODEL`: learned Omega, A, Phi against the RoPE initialisation (eval/spectrum.py)."""

    __pydantic_config__ = SETTINGS
    out: str | None = None
    """Output directory (default: MODEL/spectrum)."""
    data: str | None = None
    """Data for the attention-entropy measurement (default: none, no attention statistics)."""
    modulus: int | None = None
    """Compare the frequencies with 2 pi / p (modular arithmetic runs)."""
    windows: int = 8
    """Validation windows for the attention statistics."""
    device: str | None = None
    """cpu | cuda (default: cuda if present)."""

    def __post_init__(self) -> None:
        _positive_or_none(self, "modulus", "windows")


@dataclass
class TasksSettings:
    """`bifocal eval tasks MODEL --task T`: algorithmic tasks, loss and exact match in and out of distribution (eval/tasks_eval.py)."""

    __pydantic_config__ = SETTINGS
    task: str
    """The task: one of data_pipeline/synthetic.py's TASKS."""
    n: int = 200
    """Examples per setting."""
    seed: int = 1
    """Seed of the examples."""
    device: str | None = None
    """cpu | cuda (default: cuda if present)."""
    out: str | None = None
    """The JSON result's path (default: MODEL/eval/tasks-TASK.json)."""

    def __post_init__(self) -> None:
        check(self.task in TASKS, "task", self.task, f"one of {', '.join(TASKS)}")
        _positive_or_none(self, "n")
