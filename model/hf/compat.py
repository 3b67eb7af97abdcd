"""What the exported modeling code needs of transformers, in one place.

`MIN_TRANSFORMERS` is the oldest release the project supports and tests (CI's `oldest` lane;
tests/test_dependencies.py checks it equals pyproject.toml's floor). Exported code calls
`require_transformers()` first, so an older transformers refuses with one line instead of loading
a model that computes something else.

transformers 5.24 renamed the KV cache from `past_key_values` to `cache`, in forward's keyword
arguments and in the output classes; `cache_field` reads which name an output class uses, and the
models accept both names (`one_cache`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

MIN_TRANSFORMERS = "5.11.0"  # the first release that copies a local export's nested imports (5.0-5.10 do not)


def require_transformers() -> None:
    """Raise ImportError (one line) when the installed transformers is older than MIN_TRANSFORMERS."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise ImportError(f"this bifocal model needs transformers>={MIN_TRANSFORMERS}, found {transformers.__version__}: "
                          f"pip install -U 'transformers>={MIN_TRANSFORMERS}'")


def cache_field(output_cls: type) -> str:
    """The field under which `output_cls` (a transformers ModelOutput dataclass) carries the KV
    cache: `cache` from transformers 5.24 on, `past_key_values` before; TypeError if it has neither."""
    names = {f.name for f in dataclasses.fields(output_cls)}
    if "cache" in names:
        return "cache"
    if "past_key_values" in names:
        return "past_key_values"
    raise TypeError(f"{output_cls.__name__} has no cache field (neither `cache` nor `past_key_values`)")


def one_cache(cache: Any, past_key_values: Any) -> Any:
    """The KV cache passed under either name (generate uses `cache` from 5.24 on); ValueError when
    two different caches are given."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def set_checkpointing(model: Any, enable: bool) -> None:
    """Switch a transformers model's activation (gradient) checkpointing on or off, non-reentrant,
    through the public method this version has: `activation_checkpointing_enable` from 5.24 on,
    where `gradient_checkpointing_enable` is its deprecated alias."""
    if enable:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
