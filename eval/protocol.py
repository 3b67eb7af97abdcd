"""Perplexity protocols by name: how windows are laid out and how much context each scored
target has. Torch-free, so reports and studies can read and validate them cheaply.

A protocol is "windows" (non-overlapping: positions 0 .. L-1, contexts 1 .. L mixed), "stride=S"
(the sliding window of the Position Interpolation and YaRN papers), "context>=C" (every target
with at least C tokens of context: C tokens, or a fraction of the length such as 0.75L), or
"context>=C,stride=S". perplexity.py documents the window layout.
"""

from __future__ import annotations

import math
import re

MinContext = int | str | None  # tokens, or "<fraction>L"

_FRACTION = re.compile(r"^\s*(0?\.\d+|1(\.0*)?)\s*L\s*$")


def context_tokens(min_context: MinContext, length: int) -> int:
    """Minimum context in tokens at `length`: an int, or "fL" = ceil(f * length) for 0 < f <= 1."""
    if min_context is None:
        return 1
    if isinstance(min_context, str):
        m = _FRACTION.match(min_context)
        if m is None:
            if not min_context.strip().isdigit():
                raise ValueError(f"min context {min_context!r}: a number of tokens (24) or a fraction of "
                                 "the length (0.75L)")
            min_context = int(min_context)
        else:
            return max(1, math.ceil(float(m.group(1)) * length - 1e-9))
    if isinstance(min_context, bool) or not isinstance(min_context, int) or min_context < 1:
        raise ValueError(f"min context {min_context!r}: a positive number of tokens or a fraction like 0.75L")
    return min_context


def protocol_name(min_context: MinContext = None, stride: int | None = None) -> str:
    """The protocol's name as results and reports use it: "windows" (non-overlapping), "stride=S",
    "context>=C" (C tokens or "0.75L"), or "context>=C,stride=S"."""
    parts = []
    if min_context is not None and context_tokens(min_context, 1 << 20) > 1:
        parts.append(f"context>={str(min_context).replace(' ', '')}")
    if stride is not None:
        parts.append(f"stride={stride}")
    return ",".join(parts) or "windows"


def parse_protocol(name: str) -> tuple[MinContext, int | None]:
    """(min_context, stride) of a protocol name (protocol_name's inverse); ValueError if malformed."""
    min_context: MinContext = None
    stride = None
    if name.strip() != "windows":
        for part in name.split(","):
            key, _, value = part.partition(">=" if ">=" in part else "=")
            key = key.strip()
            if key == "context":
                context_tokens(value, 1)  # validates
                min_context = int(value) if value.strip().isdigit() else value.strip()
            elif key == "stride" and value.strip().isdigit() and int(value) > 0:
                stride = int(value)
            else:
                raise ValueError(f"protocol {name!r}: expected windows, context>=C (C tokens or a fraction "
                                 "like 0.75L), stride=S, or context>=C,stride=S")
    return min_context, stride


def describe_protocol(name: str) -> str:
    """One sentence for reports."""
    min_context, stride = parse_protocol(name)
    if min_context is None and stride is None:
        return "non-overlapping windows: positions 0 .. L-1, so contexts of 1 to L tokens are mixed"
    if min_context is None:
        return (f"sliding windows, stride {stride}: the first window of a document scores all L targets, "
                f"later ones their last {stride} (context L - {stride - 1} .. L)")
    c = f"{min_context} tokens" if isinstance(min_context, int) else min_context.replace("L", " L")
    s = f", stride {stride}" if stride else ""
    return f"sliding windows{s}: every target scored with at least {c} of context (and at most L)"


def protocol_slug(name: str) -> str:
    """A file-name fragment for a protocol: "" for windows, e.g. "-context0.75L" otherwise."""
    return "" if name == "windows" else "-" + re.sub(r"[^A-Za-z0-9.]+", "", name.replace(",", "-").replace("=", "-"))
