"""The settings of launcher commands that are not run settings, declared once (types, defaults,
descriptions); their flags and `--help` are made from these (bifocal.core.settings.add_arguments).
Torch-free, so `bifocal --help` stays instant."""

from __future__ import annotations

from dataclasses import dataclass

from bifocal.core.config import SETTINGS, positive_ints


@dataclass
class BenchSettings:
    """What `bifocal bench` itself is asked; the run it times is a run config (`--config`, `--set`),
    as for `bifocal train`."""

    __pydantic_config__ = SETTINGS
    schemes: str = "all"
    """Comma-separated schemes to time, each with the config's settings (all: every registered scheme)."""
    plain: str = ""
    """Also time these schemes in a plain PyTorch loop without DeepSpeed: the framework's overhead."""
    packing: str = ""
    """Also time each scheme with these packed-document modes, comma-separated `positions/attention`
    pairs (`reset/causal`, `continue/document`, `reset/document`; all: the three), beside the
    config's own mode (data.positions, data.attention): the step-time cost of packing."""
    steps: int = 20
    """Timed steps per runner."""
    block: int = 5
    """Steps per turn: the runners take turns every block, so machine drift hits each alike."""
    warmup: int = 3
    """Untimed steps per runner first (compilation happens here)."""
    data: str | None = None
    """A YAML whose data section to use (default: the bundled demo corpora, whatever the config's)."""
    out: str = "runs/bench"
    """Where bench.json and bench.png go."""
    overwrite: bool = False
    """Replace the results in a non-empty --out."""

    def __post_init__(self) -> None:
        positive_ints(self, "steps", "block", "warmup")
