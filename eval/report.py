"""`bifocal eval report`: result files -> report.md, report.json and PNG plots.

Rows are model + RoPE-scaling variant (``rope``, ``rope+yarn(x4)``, ``bifocal``); results with the
same label are merged, so lengths evaluated in separate runs land in one row. Lengths beyond the
training length are starred: that is where the extrapolation claims are tested.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from .results import SCHEMES, VARIANTS, EvalResult, collect
from .seeds import chance_of_separation, mean_std, per_seed, relative_to_train_len, separated, train_seed

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
    """length -> value (the mean over seeds), later files overriding earlier ones for the same
    length and seed."""
    return {n: mean_std(seeds)[0] for n, seeds in per_seed(group, value).items()}


def _n_seeds(groups: dict[str, list[EvalResult]], value: str) -> int:
    return max((len(seeds) for g in groups.values() for seeds in per_seed(g, value).values()), default=0)


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


def _cell(values: dict[Any, float] | None, spread: bool, digits: int = 2) -> str:
    """The mean, with `± std` when several seeds are shown."""
    mean, std, n = mean_std(values or {})
    if mean is None:
        return MISSING
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if spread and n > 1 else _fmt(mean, digits)


def _length_tables(groups: dict[str, list[EvalResult]], value: str, title: str,
                   ratio_title: str | None = None) -> list[str]:
    series = {name: _series(g, value) for name, g in groups.items()}
    lengths = sorted({n for s in series.values() for n in s})
    trains = {name: _train_len(g) for name, g in groups.items()}
    known = [t for t in trains.values() if t is not None]
    train = min(known) if known else None
    seeded = _n_seeds(groups, value) > 1
    values = {name: per_seed(g, value) for name, g in groups.items()}
    header = ["model", "scheme"] + (["seeds"] if seeded else []) + ["train len"] + _length_header(lengths, train)
    rows = [[name, groups[name][0].scheme]
            + ([str(max((len(v) for v in values[name].values()), default=0))] if seeded else [])
            + [_fmt(trains[name], 0)] + [_cell(values[name].get(n), seeded) for n in lengths] for name in groups]
    out = [f"## {title}", "", *_table(header, rows, 2), ""]
    if seeded:
        out += ["Cells: mean ± sample standard deviation over the seeds.", ""]
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
    if ratio_title:
        out += _own_train_len_table(groups, value, lengths, train, seeded)
    if seeded and base is not None:
        out += _spread_tables(groups, value, lengths, train, base)
    return out


def _own_train_len_table(groups: dict[str, list[EvalResult]], value: str, lengths: list[int],
                         train: int | None, seeded: bool) -> list[str]:
    """Each model's values over its own value at its training length, per seed then averaged."""
    rel = {name: relative_to_train_len(g, value, _train_len(g)) for name, g in groups.items()}
    if not any(rel.values()):
        return []
    rows = [[name] + [_cell(rel[name].get(n), seeded, 3) for n in lengths] for name in groups]
    return ["### Relative to each model's own perplexity at its training length", "",
            "The extrapolation curve itself: 1.00 at the training length; above 1 the model gets worse "
            "with more context.", "", *_table(["model"] + _length_header(lengths, train), rows, 1), ""]


def _spread_tables(groups: dict[str, list[EvalResult]], value: str, lengths: list[int],
                   train: int | None, base: str) -> list[str]:
    """Which differences from the baseline lie outside the seed spread: absolute values and the
    extrapolation ratios."""
    absolute = {name: per_seed(g, value) for name, g in groups.items()}
    relative = {name: relative_to_train_len(g, value, _train_len(g)) for name, g in groups.items()}
    rows = []
    for name in groups:
        if name == base:
            continue
        cells = []
        for n in lengths:
            a = separated(absolute[name].get(n, {}), absolute[base].get(n, {})) or "~"
            r = separated(relative[name].get(n, {}), relative[base].get(n, {})) or "~"
            cells.append(f"{a} / {r}" if relative[name] else a)
        rows.append([name] + cells)
    sizes = sorted({len(v) for g in absolute.values() for v in g.values() if len(v) > 1})
    chance = ", ".join(f"{chance_of_separation(k, k):.2f} for {k} seeds each" for k in sizes)
    return [f"### Differences from `{base}` beyond the seed spread", "",
            "`lower` / `higher`: every seed of the row is below / above every seed of "
            f"`{base}`; `~`: the seed ranges overlap (no claim). First the {value} itself, then its "
            f"ratio to the model's own training-length value. Chance of a separation between two "
            f"identically distributed models: {chance}.", "",
            *_table(["model"] + _length_header(lengths, train), rows, 1), ""]


def _task_name(r: EvalResult) -> str:
    return str(r.extra.get("task", "tasks"))


def task_column_key(column: tuple[str, str]) -> tuple:
    """(split, setting) order: `in` first, then settings with their numbers compared as numbers,
    so "len 9-16" comes before "len 17-32" (a string sort puts "17" before "9")."""
    split, setting = column
    parts = re.split(r"(\d+)", setting)
    order = {"train": 0, "in": 1}.get(split, 2)  # the recall control, then held-out instances
    return (order, split, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts))


def _tasks_tables(results: list[EvalResult]) -> list[str]:
    out: list[str] = []
    by_task: dict[str, list[EvalResult]] = defaultdict(list)
    for r in results:
        if r.kind == "tasks":
            by_task[_task_name(r)].append(r)
    for task, task_results in sorted(by_task.items()):
        groups = _by_label(task_results, "tasks")
        cells = {name: _task_cells(g) for name, g in groups.items()}
        cols = sorted({c for cs in cells.values() for c in cs}, key=task_column_key)
        seeded = any(len(seeds) > 1 for cs in cells.values() for seeds in cs.values())
        header = ["model"] + (["seeds"] if seeded else []) + [f"{split}: {setting}" for split, setting in cols]
        rows = []
        for name, cs in cells.items():
            n_seeds = max((len(v) for v in cs.values()), default=0)
            rows.append([name] + ([str(n_seeds)] if seeded else []) + [
                f"{_cell({k: row['exact_match'] for k, row in cs[c].items()}, seeded)} / "
                f"{_cell({k: row['loss'] for k, row in cs[c].items()}, False, 3)}" if c in cs else MISSING
                for c in cols])
        what = "exact match (mean ± std over seeds) / loss (mean)" if seeded else "exact match / loss"
        held = [row for r in task_results for row in r.rows if row["split"] != "train"]
        checked = [row["train_overlap"] for row in held if row.get("train_overlap") is not None]
        out += [f"## Task: {task}", "", *_table(header, rows, 1), "",
                f"Cells: {what}. `train` = instances of the training side (recall control), `in` = instances of "
                "the training distribution held out of training, `out` = held-out instances longer or deeper "
                "than training (`> N tokens`: prompts longer than the training context).", ""]
        if checked:
            out += [f"Held-out prompts found in the training data: {sum(checked)} of {sum(r['n'] for r in held)} "
                    f"({len(checked)} of {len(held)} cells checked).", ""]
    return out


def _task_cells(group: list[EvalResult]) -> dict[tuple[str, str], dict[Any, dict]]:
    """(split, setting) -> {training seed: row} over the results of one label."""
    cells: dict[tuple[str, str], dict[Any, dict]] = {}
    for r in group:
        for row in r.rows:
            cells.setdefault((row["split"], row["setting"]), {})[train_seed(r)] = row
    return cells


def render_markdown(results: list[EvalResult]) -> str:
    lines = ["# Evaluation report", ""]
    ppl = _by_label(results, "ppl")
    if ppl:
        lines += _length_tables(ppl, "ppl", "Perplexity by context length",
                                "Perplexity relative to")
    passkey = _by_label(results, "passkey")
    if passkey:
        lines += _length_tables(passkey, "accuracy", "Passkey retrieval accuracy")
        chance = sorted({row["chance"] for g in passkey.values() for r in g for row in r.rows if "chance" in row})
        if chance:  # rows of `bifocal eval passkey` carry it; lengths up to the training length are the control
            lines += [f"Chance level (a guess independent of the prompt): {', '.join(f'{c:.2g}' for c in chance)}. "
                      "Lengths up to the training length are the in-distribution control.", ""]
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
    out["ppl_summary"] = _summary_rows(ppl_groups)
    return out


def _summary_rows(groups: dict[str, list[EvalResult]]) -> list[dict[str, Any]]:
    """Per label and length: seeds, mean and std of ppl and of ppl over the training-length ppl."""
    rows = []
    for name, group in groups.items():
        values, rel = per_seed(group, "ppl"), relative_to_train_len(group, "ppl", _train_len(group))
        for n in sorted(values):
            mean, std, k = mean_std(values[n])
            rel_mean, rel_std, _ = mean_std(rel.get(n, {}))
            rows.append({"label": name, "scheme": group[0].scheme, "variant": group[0].variant,
                         "length": n, "train_len": _train_len(group), "seeds": k, "ppl_mean": mean,
                         "ppl_std": std, "rel_train_len_mean": rel_mean, "rel_train_len_std": rel_std})
    return rows


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


def _draw_lengths(ax, groups: dict[str, list[EvalResult]], per_label: dict[str, dict[int, dict[Any, float]]],
                  ylabel: str, title: str, log_y: bool) -> None:
    """One line per label (the mean over seeds) with a band of +- one standard deviation."""
    lengths: set[int] = set()
    for name, group in groups.items():
        stats = sorted((n, *mean_std(v)[:2]) for n, v in per_label[name].items())
        pts = [(n, m, sd) for n, m, sd in stats if m is not None and math.isfinite(m) and (m > 0 or not log_y)]
        lengths.update(n for n, _, _ in pts)
        if not pts:
            continue
        style = _line_style(group[0])
        xs, means, stds = zip(*pts)
        ax.plot(xs, means, label=name, **style)
        if any(sd > 0 for sd in stds):
            lo = [max(m - sd, m * 0.5) if log_y else m - sd for m, sd in zip(means, stds)]
            ax.fill_between(xs, lo, [m + sd for m, sd in zip(means, stds)], color=style.get("color"),
                            alpha=0.15, linewidth=0)
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
    if lengths:
        ax.set_xticks(sorted(lengths), [str(n) for n in sorted(lengths)])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def _plot_lengths(groups: dict[str, list[EvalResult]], value: str, ylabel: str, title: str,
                  path: Path, log_y: bool) -> Path:
    """Values against context length; for perplexity (log_y) a second panel shows each model's
    perplexity over its own training-length perplexity. Bands: +- one std over seeds."""
    fig = _figure()
    ax = fig.add_subplot(1, 2 if log_y else 1, 1)
    _draw_lengths(ax, groups, {n: per_seed(g, value) for n, g in groups.items()}, ylabel, title, log_y)
    if not log_y:
        ax.set_ylim(-0.05, 1.05)
    else:
        rel = {n: relative_to_train_len(g, value, _train_len(g)) for n, g in groups.items()}
        if any(rel.values()):
            ax2 = fig.add_subplot(1, 2, 2)
            _draw_lengths(ax2, {n: g for n, g in groups.items() if rel[n]}, rel,
                          f"{ylabel} / own {ylabel} at training length", "Extrapolation (relative)", False)
            ax2.axhline(1.0, color="black", linewidth=0.8)
            ax = ax2
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.set_size_inches(14 if log_y else 9, 4.8)
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
        cells = {name: {c: mean_std({k: row["exact_match"] for k, row in seeds.items()})[:2]
                        for c, seeds in _task_cells(g).items()} for name, g in groups.items()}
        cols = sorted({c for cs in cells.values() for c in cs}, key=task_column_key)
        width = 0.8 / max(len(cells), 1)
        for j, (name, cs) in enumerate(cells.items()):
            xs = [k + j * width for k, c in enumerate(cols) if c in cs]
            ax.bar(xs, [cs[c][0] for c in cols if c in cs], width=width, label=name,
                   yerr=[cs[c][1] for c in cols if c in cs], capsize=2)
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
    from bifocal.core.errors import BifocalError

    results = collect(list(args.results))
    if not results:
        raise BifocalError(f"no result files found in {', '.join(map(str, args.results))}")
    out = Path(args.out)
    earlier = [p.name for p in (out / "report.md", out / "report.json") if p.exists()]
    if earlier and not getattr(args, "overwrite", False):
        raise BifocalError(f"{out} already holds a report ({', '.join(earlier)}); pass --overwrite to replace it, "
                           "or choose another --out (nothing was written)")
    paths = write_report(results, args.out)
    print(render_markdown(results))
    for path in paths.values():
        print(f"wrote {path}")
    return 0
