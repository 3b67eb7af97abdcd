"""`bifocal eval report`: result files -> report.md, report.json and PNG plots.

Rows are model + RoPE-scaling variant (``rope``, ``rope+yarn(x4)``, ``bifocal``); results with the
same label are merged, so lengths evaluated in separate runs land in one row. Lengths beyond the
training length are starred: that is where the extrapolation claims are tested.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from .results import SCHEMES, VARIANTS, EvalResult, collect

MISSING = "—"


# ---------------------------------------------------------------------------------------------
# Grouping


def label(r: EvalResult) -> str:
    return r.model if r.variant == "none" else f"{r.model}+{r.variant}(x{r.factor:g})"


def _sort_key(r: EvalResult) -> tuple:
    return (SCHEMES.index(r.scheme), r.model, VARIANTS.index(r.variant), r.factor)


def _by_label(results: list[EvalResult], kind: str) -> dict[str, list[EvalResult]]:
    groups: dict[str, list[EvalResult]] = {}
    for r in sorted((r for r in results if r.kind == kind), key=_sort_key):
        groups.setdefault(label(r), []).append(r)
    return groups


def _series(group: list[EvalResult], value: str) -> dict[int, float]:
    """length -> value, later files overriding earlier ones for the same length."""
    return {int(row["length"]): row[value] for r in group for row in r.rows}


def _train_len(group: list[EvalResult]) -> int | None:
    lens = [r.train_len for r in group if r.train_len is not None]
    return min(lens) if lens else None


def _baseline(groups: dict[str, list[EvalResult]]) -> str | None:
    """The plain RoPE row that ratios are taken against (first in sort order)."""
    for name, group in groups.items():
        if group[0].scheme == "rope" and group[0].variant == "none":
            return name
    return None


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return None
    if b == 0 or not math.isfinite(b):
        return None
    return a / b


# ---------------------------------------------------------------------------------------------
# Markdown


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return MISSING
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else str(x)


def _table(header: list[str], rows: list[list[str]], numeric_from: int) -> list[str]:
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(cells) + " |" for cells in [header, align, *rows]]


def _length_header(lengths: list[int], train: int | None) -> list[str]:
    return [f"{n}*" if train is not None and n > train else str(n) for n in lengths]


def _length_tables(groups: dict[str, list[EvalResult]], value: str, title: str,
                   ratio_title: str | None = None) -> list[str]:
    series = {name: _series(g, value) for name, g in groups.items()}
    lengths = sorted({n for s in series.values() for n in s})
    trains = {name: _train_len(g) for name, g in groups.items()}
    known = [t for t in trains.values() if t is not None]
    train = min(known) if known else None
    header = ["model", "scheme", "train len"] + _length_header(lengths, train)
    rows = [[name, groups[name][0].scheme, _fmt(trains[name], 0)]
            + [_fmt(series[name].get(n)) for n in lengths] for name in groups]
    out = [f"## {title}", "", *_table(header, rows, 2), ""]
    if train is not None:
        note = f"`*` = longer than the training length ({train} tokens): extrapolation."
        if len(set(known)) > 1:
            note += " Training lengths differ between rows; see the `train len` column."
        out += [note, ""]
    base = _baseline(groups) if ratio_title else None
    if base is not None:
        rows = [[name] + [_fmt(_ratio(series[name].get(n), series[base].get(n))) for n in lengths]
                for name in groups]
        out += [f"### {ratio_title} `{base}`", "",
                *_table(["model"] + _length_header(lengths, train), rows, 1), ""]
    return out


def _task_name(r: EvalResult) -> str:
    return str(r.extra.get("task", "tasks"))


def _tasks_tables(results: list[EvalResult]) -> list[str]:
    out: list[str] = []
    by_task: dict[str, list[EvalResult]] = defaultdict(list)
    for r in results:
        if r.kind == "tasks":
            by_task[_task_name(r)].append(r)
    for task, task_results in sorted(by_task.items()):
        groups = _by_label(task_results, "tasks")
        cells = {name: {(row["split"], row["setting"]): row for r in g for row in r.rows}
                 for name, g in groups.items()}
        cols = sorted({c for cs in cells.values() for c in cs}, key=lambda c: (c[0] != "in", c))
        header = ["model"] + [f"{split}: {setting}" for split, setting in cols]
        rows = [[name] + [f"{_fmt(cs[c]['exact_match'])} / {_fmt(cs[c]['loss'], 3)}"
                          if c in cs else MISSING for c in cols] for name, cs in cells.items()]
        out += [f"## Task: {task}", "", *_table(header, rows, 1), "",
                "Cells: exact match / loss. `in` = training distribution, `out` = longer or "
                "deeper than training.", ""]
    return out


def render_markdown(results: list[EvalResult]) -> str:
    lines = ["# Evaluation report", ""]
    ppl = _by_label(results, "ppl")
    if ppl:
        lines += _length_tables(ppl, "ppl", "Perplexity by context length",
                                "Perplexity relative to")
    passkey = _by_label(results, "passkey")
    if passkey:
        lines += _length_tables(passkey, "accuracy", "Passkey retrieval accuracy")
    lines += _tasks_tables(results)
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# JSON (flat rows, one per result row, ready for a dataframe)


def _flat_rows(results: list[EvalResult]) -> dict[str, list[dict[str, Any]]]:
    ppl_groups = _by_label(results, "ppl")
    base = _baseline(ppl_groups)
    base_series = _series(ppl_groups[base], "ppl") if base else {}
    out: dict[str, list[dict[str, Any]]] = {"ppl": [], "passkey": [], "tasks": []}
    for r in sorted(results, key=_sort_key):
        head = {"label": label(r), "model": r.model, "scheme": r.scheme, "variant": r.variant,
                "factor": r.factor, "train_len": r.train_len}
        if r.kind == "tasks":
            head["task"] = _task_name(r)
        for row in r.rows:
            flat = {**head, **row}
            if "length" in row and r.train_len is not None:
                flat["extrapolated"] = row["length"] > r.train_len
            if r.kind == "ppl" and base:
                flat["ratio_to_rope"] = _ratio(row["ppl"], base_series.get(int(row["length"])))
            out[r.kind].append(flat)
    return out


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no global backend switch, no display)


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    return fig


# Colour says which model (scheme), line style which training-free scaling variant, so a dozen
# lines stay tellable apart.
SCHEME_COLOURS = {"rope": "tab:blue", "bifocal": "tab:red", "spectral": "tab:green", "pope": "tab:purple",
                  "nope": "tab:gray"}
VARIANT_STYLES = {"none": ("-", "o"), "pi": ("--", "s"), "ntk": (":", "^"), "dynamic_ntk": ("-.", "v"),
                  "yarn": ((0, (5, 1, 1, 1, 1, 1)), "D")}


def _line_style(result: EvalResult) -> dict:
    linestyle, marker = VARIANT_STYLES.get(result.variant, ("-", "o"))
    style = {"linestyle": linestyle, "marker": marker, "markersize": 4}
    if result.scheme in SCHEME_COLOURS:
        style["color"] = SCHEME_COLOURS[result.scheme]
    return style


def _plot_lengths(groups: dict[str, list[EvalResult]], value: str, ylabel: str, title: str,
                  path: Path, log_y: bool) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    lengths: set[int] = set()
    for name, group in groups.items():
        pts = sorted((n, v) for n, v in _series(group, value).items()
                     if isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not log_y))
        lengths.update(n for n, _ in pts)
        if pts:
            ax.plot(*zip(*pts), label=name, **_line_style(group[0]))
    for i, t in enumerate(sorted({_train_len(g) for g in groups.values()} - {None})):
        ax.axvline(t, color="grey", linestyle="--", linewidth=1,
                   label="training length" if i == 0 else None)
    ax.set_xscale("log", base=2)
    if log_y:
        from matplotlib.ticker import FuncFormatter, LogFormatter

        ax.set_yscale("log")
        # Plain numbers (40 rather than 4x10^1); minor ticks labelled only on short ranges.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
    else:
        ax.set_ylim(-0.05, 1.05)
    if lengths:
        ax.set_xticks(sorted(lengths), [str(n) for n in sorted(lengths)])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.set_size_inches(9, 4.5)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _plot_tasks(results: list[EvalResult], path: Path) -> Path:
    by_task: dict[str, list[EvalResult]] = defaultdict(list)
    for r in results:
        if r.kind == "tasks":
            by_task[_task_name(r)].append(r)
    fig = _figure()
    fig.set_size_inches(max(7, 4.5 * len(by_task)), 4.5)
    for i, (task, task_results) in enumerate(sorted(by_task.items())):
        ax = fig.add_subplot(1, len(by_task), i + 1)
        groups = _by_label(task_results, "tasks")
        cells = {name: {(row["split"], row["setting"]): row["exact_match"] for r in g for row in r.rows}
                 for name, g in groups.items()}
        cols = sorted({c for cs in cells.values() for c in cs}, key=lambda c: (c[0] != "in", c))
        width = 0.8 / max(len(cells), 1)
        for j, (name, cs) in enumerate(cells.items()):
            xs = [k + j * width for k, c in enumerate(cols) if c in cs]
            ax.bar(xs, [cs[c] for c in cols if c in cs], width=width, label=name)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cols))],
                      [f"{s}\n{setting}" for s, setting in cols], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("exact match")
        ax.set_title(task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


# ---------------------------------------------------------------------------------------------
# Entry points


def write_report(results: list[EvalResult], out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.json and the plots that have data; returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "report.md", "json": out / "report.json"}
    paths["markdown"].write_text(render_markdown(results))
    # No top-level "kind": a report directory re-collected later is not mistaken for results.
    paths["json"].write_text(json.dumps(_flat_rows(results), indent=2) + "\n")
    ppl = _by_label(results, "ppl")
    if ppl:
        paths["extrapolation"] = _plot_lengths(ppl, "ppl", "perplexity", "Perplexity vs context length",
                                               out / "extrapolation.png", log_y=True)
    passkey = _by_label(results, "passkey")
    if passkey:
        paths["passkey"] = _plot_lengths(passkey, "accuracy", "passkey accuracy",
                                         "Passkey retrieval vs context length",
                                         out / "passkey.png", log_y=False)
    if any(r.kind == "tasks" for r in results):
        paths["tasks"] = _plot_tasks(results, out / "tasks.png")
    return paths


def main(args: argparse.Namespace) -> int:
    from bifocal.launcher.cli import UserError

    try:
        results = collect(list(args.results))
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if not results:
        raise UserError(f"no result files found in {', '.join(map(str, args.results))}")
    paths = write_report(results, args.out)
    print(render_markdown(results))
    for path in paths.values():
        print(f"wrote {path}")
    return 0
