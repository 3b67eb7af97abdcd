"""Settings declared once, validated by pydantic.

Every command's settings are plain dataclasses declared beside their owner (`model/config.py`,
`data_pipeline/config.py`, `run/config.py`, the eval and bench settings): each field carries its
type, its default and its description, an attribute docstring right under it, and the class's own
checks run in `__post_init__`. Each class sets `__pydantic_config__ = SETTINGS` (a plain dict, so
the model layer, which ships inside exports, needs no pydantic), and pydantic does the rest here:

- `build(cls, mapping, where)` validates a YAML section or `--set` overrides against the
  declaration (types coerced as YAML needs: `1e-3` is a string to YAML), refuses an unknown key
  naming the nearest valid one, and turns any failure into one `BifocalError` naming the dotted key;
- `describe(cls)` lists every key with its default and description (`bifocal config`), and
  `add_arguments` / `from_arguments` make a command's flags and `--help` from a declaration.

The descriptions are read by pydantic (`use_attribute_docstrings`) from the class source, so a
field's explanation is written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from typing import Any, Mapping, TypeVar

import yaml
from pydantic import TypeAdapter, ValidationError

from .config import SETTINGS, nearest
from .errors import BifocalError

T = TypeVar("T")
__all__ = ["SETTINGS", "build", "describe", "description", "add_arguments", "from_arguments"]


@functools.lru_cache(maxsize=None)
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def build(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """A `cls` settings object from a mapping (None: the defaults), validated against its
    declaration; raises BifocalError with the dotted key (`where` is the section's own path)."""
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise BifocalError(f"`{where or cls.__name__}` must be a mapping, got {type(data).__name__}")
    try:
        return _adapter(cls).validate_python(dict(data))
    except ValidationError as exc:
        raise _one_line(exc, cls, where) from None


def _one_line(exc: ValidationError, cls: type, where: str) -> BifocalError:
    """The first of pydantic's errors as bifocal's one line: `a.b.c=value is invalid: reason`,
    `unknown config key a.b: did you mean c?`, or a dataclass check's own message with its path."""
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"]]
    path = _dotted(where, err["loc"])
    kind = err["type"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        owner = _class_at(cls, err["loc"][:-1])
        valid = [f.name for f in dataclasses.fields(owner) if f.init] if owner else []
        return BifocalError(f"unknown config key `{path}`: {nearest(loc[-1], valid)}")
    if kind == "value_error":  # a dataclass's own check: its message already names the field
        cause = err.get("ctx", {}).get("error")
        message = str(cause) if cause is not None else err["msg"]
        prefix = path
        return BifocalError(f"{prefix}.{message}" if prefix and not message.startswith(prefix) else message)
    if kind == "dataclass_type":
        return BifocalError(f"`{path}` must be a mapping, got {_yaml(err['input'])}")
    return BifocalError(f"{path}={_yaml(err['input'])} is invalid: {err['msg'][0].lower()}{err['msg'][1:]}")


def _dotted(where: str, loc: tuple) -> str:
    """`data.sources[0].path` from the section and pydantic's location (names and list indices)."""
    out = where
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    return repr(value)


def _class_at(cls: type, loc: tuple) -> type | None:
    """The dataclass that the path `loc` (field names and list indices) reaches inside `cls`."""
    for part in loc:
        if isinstance(part, int):
            continue
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = _dataclass_in(hints[part])
        if cls is None:
            return None
    return cls


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field's annotation holds (itself, in a list, or optional)."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


@functools.lru_cache(maxsize=None)
def _descriptions(cls: type) -> dict[str, str]:
    props = _adapter(cls).json_schema(mode="serialization").get("properties", {})
    return {name: " ".join(p.get("description", "").split()) for name, p in props.items()}


def description(cls: type, name: str) -> str:
    """A field's description, as pydantic reads it from the attribute docstring under the field."""
    return _descriptions(cls).get(name, "")


def default(f: dataclasses.Field) -> Any:
    """A dataclass field's default (its `default_factory` called), or `dataclasses.MISSING`."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default as YAML, description) of every field, nested sections expanded (a
    list of sections as `key[].field`)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        sub = _dataclass_in(hints[f.name])
        key = f"{prefix}{f.name}"
        if sub is not None and typing.get_origin(hints[f.name]) is list:
            rows.append((key, "[...]", description(cls, f.name)))
            rows += describe(sub, f"{key}[].")
        elif sub is not None and default(f) is not None:
            rows += describe(sub, f"{key}.")
        else:
            value = default(f)
            text = "(required)" if value is dataclasses.MISSING else _flow(value)
            rows.append((key, text, description(cls, f.name)))
    return rows


def _flow(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


# -- command-line flags from a declaration ------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` flag per field of `cls` (except `skip`), its help the field's description
    and default; values are read as YAML (numbers, lists, null) and validated by `from_arguments`."""
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        value = default(f)
        text = description(cls, f.name)
        shown = "required" if value is dataclasses.MISSING else f"default: {_flow(value)}"
        help_text = text if "default" in text else f"{text} ({shown})"
        flag = "--" + f.name.replace("_", "-")
        hint = typing.get_type_hints(cls)[f.name]
        if hint is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            # A text setting keeps what was typed (a label "1", lengths "32"); others read as YAML.
            text_only = hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                                        and set(typing.get_args(hint)) == {str, type(None)})
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                                type=str if text_only else _yaml_value, required=value is dataclasses.MISSING,
                                help=help_text)


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        return text


def from_arguments(cls: type[T], args: argparse.Namespace, where: str = "") -> T:
    """The `cls` settings given on the command line (flags not given keep the declared default);
    raises BifocalError for a value the declaration refuses."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
             if f.init and getattr(args, f.name, None) is not None}
    return build(cls, given, where)


def resolve_arguments(cls: type, args: argparse.Namespace, where: str = "") -> argparse.Namespace:
    """`args` with the fields of `cls` replaced by the validated settings (declared defaults for the
    flags not given); other attributes (positional arguments, the handler) kept. Raises
    BifocalError for a value the declaration refuses."""
    settings = from_arguments(cls, args, where)
    return argparse.Namespace(**{**vars(args), **{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)}})

