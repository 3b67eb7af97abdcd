"""The README's headline table, generated from a study's report.json (its `ppl_summary` rows):
per model, mean ± std perplexity at every length and the rise from the training length to the
longest length (mean over seeds of each seed's own ratio).

    python -m bifocal.eval.headline docs/study-cpu/report.json [--labels rope,rope+yarn(x16),...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_LABELS = ("rope", "rope+yarn(x16)", "rope+ntk(x16)", "bifocal", "spectral", "pope")


def _cell(mean: float | None, std: float | None, seeds: int, digits: int = 1) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def headline(summary: list[dict[str, Any]], labels: list[str] | tuple[str, ...] = DEFAULT_LABELS) -> str:
    """Markdown table: one row per label present in `summary`, in the order of `labels`."""
    rows = [r for r in summary if r["label"] in labels]
    lengths = sorted({r["length"] for r in rows})
    if not lengths:
        return ""
    train = min((r["train_len"] for r in rows if r.get("train_len")), default=None)
    head = [f"{n}*" if train and n > train else str(n) for n in lengths]
    out = ["| model | seeds | " + " | ".join(head) + f" | ppl({lengths[-1]}) / ppl({train}) |",
           "|---|---:|" + "---:|" * (len(lengths) + 1)]
    for label in labels:
        mine = {r["length"]: r for r in rows if r["label"] == label}
        if not mine:
            continue
        last = mine.get(lengths[-1], {})
        seeds = max(r["seeds"] for r in mine.values())
        cells = [_cell(mine[n]["ppl_mean"], mine[n]["ppl_std"], seeds) if n in mine else "—" for n in lengths]
        rise = _cell(last.get("rel_train_len_mean"), last.get("rel_train_len_std"), seeds, 3)
        out.append(f"| {label} | {seeds} | " + " | ".join(cells) + f" | {rise} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", help="report.json written by `bifocal study extrapolation` or `bifocal eval report`")
    p.add_argument("--labels", default=",".join(DEFAULT_LABELS), help="comma-separated row labels, in order")
    args = p.parse_args(argv)
    try:
        summary = json.loads(Path(args.report).read_text())["ppl_summary"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"bifocal: error: {args.report}: no ppl_summary in a readable report.json ({exc})")
        return 2
    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    print(headline(summary, labels), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
