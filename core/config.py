"""Torch-free config plumbing: YAML files with `include:`, `--set KEY=VALUE` overrides, the
nearest-key suggestion, and `check`, the one validation helper every settings dataclass uses in
`__post_init__`. Validating a mapping against a declaration is `bifocal.core.settings` (pydantic);
this module needs neither pydantic nor torch, since the model's settings (shipped inside exports)
import it.

The declarations live with their owners (`bifocal.model.config`, `bifocal.data_pipeline.config`,
`bifocal.run.config`); this module knows none of them.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from bifocal.core.errors import BifocalError


# What every settings dataclass sets as `__pydantic_config__` (bifocal.core.settings validates them):
# unknown keys are errors, field descriptions are the attribute docstrings. A plain dict, so the
# model's settings (shipped inside exports) need no pydantic.
SETTINGS = {"extra": "forbid", "use_attribute_docstrings": True}


def check(cond: bool, key: str, value: Any, allowed: str) -> None:
    """Raise BifocalError `key=value is invalid: allowed` unless `cond`; `settings.build` prefixes
    the section path."""
    if not cond:
        raise BifocalError(f"{key}={value!r} is invalid: {allowed}")


def positive_ints(obj: Any, *keys: str) -> None:
    """Check that each named field of `obj` is an int > 0 (bool is not an int here); raises
    BifocalError naming the first that is not."""
    for key in keys:
        value = getattr(obj, key)
        check(isinstance(value, int) and not isinstance(value, bool) and value > 0, key, value,
              "must be a positive integer")


def nearest(name: str, valid: list[str] | tuple[str, ...]) -> str:
    """'did you mean `x`?' for the closest valid name, or a list of what is allowed."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    if close:
        return f"did you mean `{close[0]}`?"
    return "valid keys: " + ", ".join(sorted(valid))


def check_key(key: str, path: str, valid: Iterable[str], removed: Mapping[str, str],
              kind: str = "config key") -> None:
    """Raise BifocalError for a `key` (shown as its dotted `path`) not in `valid`, naming the
    nearest valid one, or in `removed`, saying what replaced it."""
    if key in removed:
        raise BifocalError(f"{kind} `{path}` was removed: {removed[key]}")
    if key not in valid:
        raise BifocalError(f"unknown {kind} `{path}`: {nearest(key, list(valid))}")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"model": {"position": {"scheme": "rope"}}} -> {"model.position.scheme": "rope"}: the inverse of
    `nest`. An empty mapping is a leaf, so two trees differ in `flatten` exactly where they differ."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def nest(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """{"model.position.scheme": "rope"} -> {"model": {"position": {"scheme": "rope"}}}. Raises
    BifocalError when a key is given both a value and sub-keys."""
    tree: dict[str, Any] = {}
    for key, value in dotted.items():
        node = tree
        parts = str(key).strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise BifocalError(f"--set {key}: `{part}` was given a value and keys at once")
        node[parts[-1]] = value
    return tree


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=c` strings into a nested dict; values parsed as YAML (numbers, bools, lists). Raises
    BifocalError for an item without `=` or a value that is not valid YAML."""
    dotted: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise BifocalError(f"--set {item!r} is invalid: expected KEY=VALUE, e.g. train.max_steps=100")
        key, raw = item.split("=", 1)
        try:
            dotted[key] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise BifocalError(f"--set {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
    return nest(dotted)


def deep_merge(base: dict, update: Mapping) -> dict:
    """`update` over `base`, recursively for mappings; neither input is modified."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# Called with each file's mapping and its directory, so inputs named relative to a file resolve
# against that file even when it is included from elsewhere.
Relocate = Callable[[dict, Path], None]


def yaml_mapping(path: str | Path, what: str = "a mapping") -> dict:
    """The mapping a YAML file holds (empty for an empty file), as it is, `include:` not applied.
    Raises BifocalError if the file is missing, is not valid YAML, or holds no mapping (`what`
    names what it must hold)."""
    path = Path(path)
    if not path.is_file():
        raise BifocalError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_bytes()) or {}  # bytes: YAML reports bad encodings itself
    except yaml.YAMLError as exc:
        raise BifocalError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise BifocalError(f"{path} is not valid YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise BifocalError(f"{path} must hold {what}")
    return raw


def read_yaml(path: str | Path, relocate: Relocate | None = None, what: str = "a mapping",
              _including: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping from `path` with its `include:`s applied (see `expand`); raises BifocalError
    as `yaml_mapping` and `expand` do."""
    path = Path(path)
    return expand(yaml_mapping(path, what), path.parent, relocate, what, (*_including, path.resolve()))


def expand(raw: Mapping[str, Any], base_dir: Path, relocate: Relocate | None = None,
           what: str = "a mapping", _including: tuple[Path, ...] = ()) -> dict:
    """Apply `include:` (a file or a list, relative to `base_dir`; later files win and `raw` wins
    over all), then `relocate` the inputs `raw` names relative to `base_dir`. `_including`: the
    files being read, outermost first, so a cycle is named instead of recursing forever. Raises
    BifocalError for an `include:` that is not a file name or list of them, or an include cycle."""
    raw = dict(raw)
    include = raw.pop("include", None) or []
    includes = [include] if isinstance(include, str) else include
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise BifocalError(f"include={include!r} is invalid: a file name or a list of file names")
    base: dict = {}
    for inc in includes:
        target = (base_dir / inc).resolve()
        if target in _including:
            chain = " -> ".join(p.name for p in (*_including, target))
            raise BifocalError(f"include cycle: {chain}")
        base = deep_merge(base, read_yaml(base_dir / inc, relocate, what, _including))
    raw = deep_merge(base, raw)
    if relocate is not None:
        relocate(raw, base_dir)
    return raw
