"""The one registry of position schemes and training-free RoPE scalings: names, order, labels,
colours, which heads they have, their FLOPs rule and how they export. Configs, CLI choices,
results, reports, studies, the bench and the exporter all read these two tables.

Adding a scheme: one new file in model/position/ (a `PositionEncoding`), one `Scheme` entry here,
and its class in model/position/__init__.py's `MODULES`; see the README's "Adding a scheme".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scheme:
    """One position scheme's registry entry (see SCHEMES)."""

    name: str
    """The config value (`model.position.scheme`) and the name in results."""
    label: str
    """How reports and plots name it."""
    color: str
    """Its colour in every plot (matplotlib)."""
    spectral: str
    """Which query heads learn Spectral-RoPE: "none", "all", or "some" (`position.spectral_heads`)."""
    fixed: bool
    """Whether its other heads rotate by RoPE's fixed frequencies (what `rope_scaling` scales)."""
    module: str
    """The `PositionEncoding` class of a layer without spectral or fixed heads (model/position/)."""
    qk_width: int
    """Width of q and k per head in units of head_dim (PoPE's are twice as wide): the FLOPs rule."""
    llama: bool
    """How it exports: as a plain `LlamaForCausalLM` (no custom code; when its scaling, if any, is
    one transformers computes identically), or with bifocal's modeling code."""
    control: bool
    """A control (NoPE): studies leave it out unless asked for."""
    about: str
    """One sentence for model cards."""


@dataclass(frozen=True)
class Scaling:
    """One training-free RoPE scaling's registry entry (see SCALINGS)."""

    name: str
    """The config value (`rope_scaling.type`, `--rope-scaling`) and the variant name in results."""
    transformers: str | None
    """The transformers rope_type that computes it identically (a rope model then exports as Llama),
    or None (it keeps bifocal's code)."""
    source: str
    """Where its formula is defined."""


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("rope", "RoPE", "tab:blue", "none", True, "FixedRotary", 1, True, False, "every head uses fixed RoPE"),
    Scheme("bifocal", "bifocal", "tab:red", "some", True, "SpectralRotary", 1, False, False,
           "per layer, some heads use fixed RoPE and the others learnable Spectral-RoPE (Omega, A, Phi)"),
    Scheme("spectral", "Spectral-RoPE", "tab:green", "all", False, "SpectralRotary", 1, False, False,
           "every head uses learnable Spectral-RoPE (frequency Omega, amplitude A, phase Phi)"),
    Scheme("pope", "PoPE", "tab:purple", "none", False, "PolarPosition", 2, False, False,
           "PoPE polar position embeddings with learnable key phase offsets"),
    Scheme("nope", "NoPE", "tab:gray", "none", False, "NoPosition", 1, False, True,
           "no position encoding (the causal mask alone carries order)"),
)}

SCALINGS: dict[str, Scaling] = {s.name: s for s in (
    Scaling("pi", "linear", "position interpolation, Chen et al. 2023 (arXiv 2306.15595)"),
    Scaling("ntk", "default", "NTK-aware scaling, bloc97 (2023): a larger base; transformers' default rope with that theta"),
    Scaling("dynamic_ntk", None, "dynamic NTK, transformers' `dynamic` (its frequencies follow the longest input seen)"),
    Scaling("yarn", "yarn", "YaRN, Peng et al. 2023 (arXiv 2309.00071), transformers' `yarn`"),
)}


def studied() -> list[str]:
    """The schemes a study compares by default: all but the controls, in registry order."""
    return [name for name, s in SCHEMES.items() if not s.control]


def with_fixed_heads() -> list[str]:
    """The schemes whose fixed-frequency heads training-free RoPE scaling applies to."""
    return [name for name, s in SCHEMES.items() if s.fixed]


def scheme(name: str) -> Scheme:
    """The registry entry of `name`; ValueError naming the known schemes otherwise."""
    if name not in SCHEMES:
        raise ValueError(f"unknown position scheme {name!r}: one of {', '.join(SCHEMES)}")
    return SCHEMES[name]
