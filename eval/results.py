"""The result-file schema shared by `bifocal eval ppl | passkey | tasks`, and its reader/writer.

One JSON object per evaluation run::

    {"kind": "ppl" | "passkey" | "tasks", "model": "<run or export name>",
     "scheme": "rope|bifocal|spectral|pope|nope", "variant": "none|pi|ntk|dynamic_ntk|yarn",
     "factor": 1.0, "convention": "fixed|matched", "train_len": 256, "rows": [...], "extra": {...}}

`convention` (absent in older files: "fixed") says how a RoPE scaling factor was chosen: one
`factor` at every length (fixed), or matched to each length, s = max(1, L / train_len) (then
`factor` is the largest used and each row holds its own).

Row fields by kind (extra fields in a row are kept):
    ppl:     {"length", "tokens", "loss", "ppl"}; `bifocal eval ppl` adds the protocol (stride,
             min_context, first_target, targets_per_doc), a digest of the scored targets, the
             loss per document (doc_ids, doc_loss, doc_tokens) and by position (by_position)
    passkey: {"length", "trials", "accuracy"}
    tasks:   {"split": "train" | "in" | "out", "setting", "n", "loss", "exact_match"}
For "tasks", put the task name in ``extra["task"]`` so the report keeps tasks apart. For "ppl",
``extra["protocol"]`` names the windowing protocol (perplexity.protocol_name); older files without
it are "windows", or "stride=S" when their rows record a sliding stride.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bifocal.core.errors import BifocalError
from bifocal.model.schemes import SCALINGS as _SCALINGS, SCHEMES as _SCHEMES

KINDS = ("ppl", "passkey", "tasks")
SCHEMES = tuple(_SCHEMES)  # the registry's order (model/schemes.py)
VARIANTS = ("none", *_SCALINGS)
CONVENTIONS = ("fixed", "matched")
ROW_FIELDS: dict[str, tuple[str, ...]] = {
    "ppl": ("length", "tokens", "loss", "ppl"),
    "passkey": ("length", "trials", "accuracy"),
    "tasks": ("split", "setting", "n", "loss", "exact_match"),
}
REQUIRED = ("kind", "model", "scheme", "rows")


@dataclass
class EvalResult:
    kind: str
    model: str
    scheme: str
    rows: list[dict[str, Any]]
    variant: str = "none"
    factor: float = 1.0
    train_len: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    convention: str = "fixed"

    @property
    def protocol(self) -> str:
        """The ppl windowing protocol (see the module docstring)."""
        if "protocol" in self.extra:
            return str(self.extra["protocol"])
        strides = {r.get("stride") for r in self.rows if r.get("stride") not in (None, r.get("length"))}
        return f"stride={min(strides)}" if strides else "windows"

    def validate(self, source: str = "result") -> "EvalResult":
        """Raise BifocalError naming ``source`` and the offending field; returns self."""
        def bad(msg: str) -> BifocalError:
            return BifocalError(f"{source}: {msg}")

        if self.kind not in KINDS:
            raise bad(f"field 'kind' must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.model, str) or not self.model:
            raise bad("field 'model' must be a non-empty string")
        if self.scheme not in SCHEMES:
            raise bad(f"field 'scheme' must be one of {SCHEMES}, got {self.scheme!r}")
        if self.variant not in VARIANTS:
            raise bad(f"field 'variant' must be one of {VARIANTS}, got {self.variant!r}")
        if self.convention not in CONVENTIONS:
            raise bad(f"field 'convention' must be one of {CONVENTIONS}, got {self.convention!r}")
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) \
                or not self.factor > 0:
            raise bad(f"field 'factor' must be a positive number, got {self.factor!r}")
        if self.train_len is not None and (isinstance(self.train_len, bool)
                                           or not isinstance(self.train_len, int)
                                           or self.train_len < 1):
            raise bad(f"field 'train_len' must be a positive integer or null, got {self.train_len!r}")
        if not isinstance(self.extra, dict):
            raise bad("field 'extra' must be an object")
        if not isinstance(self.rows, list):
            raise bad("field 'rows' must be a list")
        for i, row in enumerate(self.rows):
            if not isinstance(row, dict):
                raise bad(f"rows[{i}] must be an object")
            missing = [k for k in ROW_FIELDS[self.kind] if k not in row]
            if missing:
                raise bad(f"rows[{i}] is missing field(s) {', '.join(missing)} "
                          f"(a {self.kind} row needs {', '.join(ROW_FIELDS[self.kind])})")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Validate and write atomically (a report run concurrently never sees half a file)."""
        path = Path(path)
        self.validate(str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n")
        os.replace(tmp, path)
        return path


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars in rows
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def from_dict(data: dict[str, Any], source: str = "result") -> EvalResult:
    """Build and validate an EvalResult; unknown top-level fields go into ``extra``."""
    if not isinstance(data, dict):
        raise BifocalError(f"{source}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise BifocalError(f"{source}: missing field(s) {', '.join(missing)}")
    known = {"kind", "model", "scheme", "rows", "variant", "factor", "train_len", "extra", "convention"}
    extra = dict(data.get("extra") or {})
    extra.update({k: v for k, v in data.items() if k not in known})
    factor = data.get("factor")
    return EvalResult(kind=data["kind"], model=data["model"], scheme=data["scheme"],
                      rows=data["rows"], variant=data.get("variant") or "none",
                      factor=1.0 if factor is None else factor,
                      train_len=data.get("train_len"), extra=extra,
                      convention=data.get("convention") or "fixed").validate(source)


def load(path: str | os.PathLike) -> EvalResult:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BifocalError(f"{path}: not valid JSON ({exc})") from exc
    return from_dict(data, str(path))


def _is_result_file(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("kind") in KINDS


def collect(paths: list[str]) -> list[EvalResult]:
    """Load result files from files and directories (searched recursively for ``*.json``).

    JSON files in directories without a known "kind" (configs, report.json, ...) are skipped;
    a file named explicitly must be a result. Order: sorted path, deduplicated.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(f for f in sorted(p.rglob("*.json")) if f.is_file() and _is_result_file(f))
        elif p.is_file():
            files.append(p)
        else:
            raise BifocalError(f"{p}: no such file or directory")
    seen: set[Path] = set()
    results = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            results.append(load(f))
    return results
