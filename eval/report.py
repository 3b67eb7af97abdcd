"""`bifocal eval report`: result files -> report.md, report.json and PNG plots.

Rows are model + RoPE-scaling variant: ``rope``, ``bifocal``, ``rope+yarn(x16)`` (one factor, 16,
at every length: a deployment setting) and ``rope+yarn(matched)`` (the factor matched to each
length, s = max(1, L / L_train)); results with the same label are merged, so lengths evaluated in
separate runs land in one row. Perplexity is reported per windowing protocol (protocol.py), with
the loss by position and a statement of whether every length scored the same targets. Lengths
beyond the training length are starred. Table cells describe (mean ± std over seeds); claims are
tested only for the endpoints and comparisons of an analysis declared before the run
(significance.py: `--analysis`, or a study's `analysis:`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from .protocol import describe_protocol
from bifocal.model.schemes import SCHEMES as SCHEMES_REGISTRY

from .results import CONVENTIONS, SCHEMES, VARIANTS, EvalResult, collect
from .seeds import mean_std, per_seed, relative_to_train_len, train_seed
from .significance import Analysis, analyse

MISSING = "—"


# ---------------------------------------------------------------------------------------------
# Grouping


def label(r: EvalResult) -> str:
    """`model`, `model+variant(xS)` (one factor S at every length) or `model+variant(matched)`."""
    if r.variant == "none":
        return r.model
    return f"{r.model}+{r.variant}(" + ("matched" if r.convention == "matched" else f"x{r.factor:g}") + ")"


def _sort_key(r: EvalResult) -> tuple:
    return (SCHEMES.index(r.scheme), r.model, VARIANTS.index(r.variant), CONVENTIONS.index(r.convention), r.factor)


def _by_label(results: list[EvalResult], kind: str) -> dict[str, list[EvalResult]]:
    groups: dict[str, list[EvalResult]] = {}
    for r in sorted((r for r in results if r.kind == kind), key=_sort_key):
        groups.setdefault(label(r), []).append(r)
    return groups


def _by_protocol(results: list[EvalResult]) -> dict[str, dict[str, list[EvalResult]]]:
    """ppl results: protocol -> label -> results; "windows" first, then by name."""
    protocols = sorted({r.protocol for r in results if r.kind == "ppl"}, key=lambda p: (p != "windows", p))
    return {p: _by_label([r for r in results if r.kind == "ppl" and r.protocol == p], "ppl") for p in protocols}


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
        out += ["Cells: mean ± sample standard deviation over the seeds (a description, not a test).", ""]
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


def _targets(groups: dict[str, list[EvalResult]]) -> dict[str, Any]:
    """What the rows of one protocol scored: whether every length (and every model) scored the same
    (document, target) pairs, by the rows' `targets` digests; documents and targets per length."""
    rows = [row for g in groups.values() for r in g for row in r.rows]
    digests = {row.get("targets") for row in rows}
    per_result = [(label(r), {row.get("targets") for row in r.rows}) for g in groups.values() for r in g]
    ids = [row["doc_ids"] for row in rows if row.get("doc_ids")]
    return {"recorded": None not in digests,
            "same_everywhere": None not in digests and len(digests) == 1,
            "same_per_model": None not in digests and all(len(d) == 1 for _, d in per_result),
            "differ": sorted({name for name, d in per_result if len(d) > 1}),
            "docs": sorted({row.get("docs") for row in rows if row.get("docs") is not None}),
            "tokens": sorted({row["tokens"] for row in rows}),
            "duplicate_docs": max((len(d) - len(set(d)) for d in ids), default=0)}


def _targets_note(t: dict[str, Any]) -> list[str]:
    docs = "/".join(map(str, t["docs"])) or "?"
    if not t["recorded"]:
        note = ("Which targets were scored is not recorded in these results (written before target digests), "
                "so whether every length scored the same text cannot be checked.")
    elif t["same_everywhere"]:
        note = (f"Every length and every model scored the same {t['tokens'][0]} targets in {docs} documents "
                "(equal target digests): a curve shows the effect of context, not a change of text.")
    elif t["same_per_model"]:
        note = ("Each model scored the same targets at every length, but not every model the same targets "
                f"({docs} documents).")
    else:
        note = (f"The scored targets differ between lengths for {', '.join(t['differ'])} (documents shorter than "
                "the longest length, or a token cap): those curves mix a change of text with the change of context.")
    out = [note, ""]
    if t["duplicate_docs"]:
        out += [f"{t['duplicate_docs']} scored document(s) are token-for-token copies of another scored document.", ""]
    return out


def _conventions_note(results: list[EvalResult]) -> list[str]:
    scaled = [r for r in results if r.kind == "ppl" and r.variant != "none"]
    if not scaled:
        return []
    factors = sorted({r.factor for r in scaled if r.convention == "fixed"})
    parts = []
    if factors:
        parts.append(f"`(x{factors[0]:g})`: one scaling factor at every length, as a model deployed for one target "
                     "context is configured" + (" (likewise for the other factors)" if len(factors) > 1 else ""))
    if any(r.convention == "matched" for r in scaled):
        parts.append("`(matched)`: the factor matched to each length L, s = max(1, L / L_train), 1 at or below "
                     "the training length (dynamic NTK: factor 1, with which it computes s = L / L_train itself)")
    return ["Training-free RoPE scaling (fixed-frequency heads only): " + "; ".join(parts) + ".", ""]


def _position_bins(train: int | None, length: int) -> list[tuple[int, int]]:
    edges = sorted({0, length, *(1 << k for k in range(length.bit_length()) if 1 << k < length)}
                   | ({train} if train and train < length else set()))
    return list(zip(edges[:-1], edges[1:]))


def _position_losses(group: list[EvalResult], length: int, bins: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """bin -> mean over seeds of each seed's mean loss in that bin (positions a .. b-1) at `length`."""
    per_bin: dict[tuple[int, int], dict[Any, float]] = {}
    for r in group:
        for row in r.rows:
            pos = row.get("by_position")
            if row["length"] != length or not pos:
                continue
            for a, b in bins:
                sel = [i for i, s in enumerate(pos["start"]) if a <= s < b]
                n = sum(pos["tokens"][i] for i in sel)
                if n:
                    per_bin.setdefault((a, b), {})[train_seed(r)] = sum(pos["loss"][i] * pos["tokens"][i]
                                                                         for i in sel) / n
    return {k: mean_std(v)[0] for k, v in per_bin.items()}


def _longest_with_positions(groups: dict[str, list[EvalResult]]) -> int | None:
    return max((row["length"] for g in groups.values() for r in g for row in r.rows if row.get("by_position")),
               default=None)


def _position_table(groups: dict[str, list[EvalResult]]) -> list[str]:
    length = _longest_with_positions(groups)
    if length is None:
        return []
    known = [t for t in (_train_len(g) for g in groups.values()) if t is not None]
    train = min(known) if known else None
    bins = _position_bins(train, length)
    rows = []
    for name, g in groups.items():
        losses = _position_losses(g, length, bins)
        if losses:
            rows.append([name] + [_fmt(losses.get(b), 3) for b in bins])
    head = [(f"{a}" if b == a + 1 else f"{a}-{b - 1}") + ("*" if train is not None and a >= train else "")
            for a, b in bins]
    return [f"### Loss by position at length {length}", "",
            "Mean loss (nats per token, mean over seeds) of the targets predicted at each position range of the "
            f"window (position p has p + 1 tokens of context); `*` = positions never reached in training.", "",
            *_table(["model"] + head, rows, 1), ""]


def _analysis_section(outcome: dict[str, Any]) -> list[str]:
    declared = outcome["declared"]
    alpha = declared["alpha"]
    level = f"{100 * (1 - alpha):g}%"
    out = ["## Declared endpoints and tests", "",
           "Fixed before the run; the only claims this report tests. An endpoint is the mean log-perplexity "
           "(mean token loss) over its lengths, one value per training seed; shown as its exponential (a "
           "geometric-mean perplexity).", ""]
    for ep in declared["endpoints"]:
        mult = ", ".join(f"{m:g}" for m in ep["multiples"])
        out.append(f"- `{ep['name']}`: lengths {mult} x the training length; protocol `{ep['protocol']}` "
                   f"({describe_protocol(ep['protocol'])}).")
    out += ["", f"### Endpoint values ({level} bootstrap intervals over seeds and documents)", ""]
    rows = [[e["endpoint"], e["label"], str(e["seeds"]), str(e["docs"] or "totals only"),
             f"{e['ppl']:.2f} [{e['ppl_ci'][0]:.2f}, {e['ppl_ci'][1]:.2f}]"] for e in outcome["labels"]]
    out += [*_table(["endpoint", "model", "seeds", "documents", f"perplexity [{level} CI]"], rows, 2), ""]
    if outcome["comparisons"]:
        rows = [[c["endpoint"], f"{c['a']} vs {c['b']}", c["design"], f"{c['seeds_a']} / {c['seeds_b']}",
                 f"{c['ratio']:.3f} [{c['ratio_ci'][0]:.3f}, {c['ratio_ci'][1]:.3f}]", _p(c["p"]), _p(c["p_holm"]),
                 c["verdict"] + (f" ({c['note']})" if c["note"] else "")] for c in outcome["comparisons"]]
        out += ["### Comparisons", "",
                f"A vs B: the perplexity ratio A / B of the endpoint with its {level} bootstrap interval (seeds "
                "resampled, jointly when paired; documents resampled jointly for A and B); `welch`: Welch's t-test "
                "across seeds (independent trainings); `paired`: paired t-test by seed (the same weights under "
                f"different training-free scalings). p (Holm): adjusted over all {outcome['tests']} tests of this "
                f"report. Verdict at alpha = {alpha:g}: `lower` / `higher` (A than B), else `no difference "
                "detected`, which is not evidence that the two are equal.", "",
                *_table(["endpoint", "comparison", "design", "seeds", "ratio [CI]", "p", "p (Holm)", "verdict"],
                        rows, 3), ""]
    if outcome["missing"]:
        out += ["Not evaluated: " + "; ".join(outcome["missing"]) + ".", ""]
    return out


def _p(p: float | None) -> str:
    return MISSING if p is None else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


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


def render_markdown(results: list[EvalResult], outcome: dict[str, Any] | None = None) -> str:
    """The report; `outcome`: significance.analyse's result for the declared analysis, if any."""
    lines = ["# Evaluation report", ""]
    for protocol, groups in _by_protocol(results).items():
        lines += _length_tables(groups, "ppl", f"Perplexity by context length ({protocol})", "Perplexity relative to")
        lines += [f"Protocol `{protocol}`: {describe_protocol(protocol)}.", ""]
        lines += _targets_note(_targets(groups))
        lines += _position_table(groups)
    lines += _conventions_note(results)
    if outcome is not None:
        lines += _analysis_section(outcome)
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


BULKY = ("doc_ids", "doc_loss", "doc_tokens", "by_position")  # per-document and per-position data stay in results


def _flat_rows(results: list[EvalResult], outcome: dict[str, Any] | None = None) -> dict[str, Any]:
    by_protocol = _by_protocol(results)
    out: dict[str, Any] = {"ppl": [], "passkey": [], "tasks": []}
    base_series = {p: _series(g[base], "ppl") for p, g in by_protocol.items() if (base := _baseline(g))}
    for r in sorted(results, key=_sort_key):
        head = {"label": label(r), "model": r.model, "scheme": r.scheme, "variant": r.variant,
                "factor": r.factor, "convention": r.convention, "train_len": r.train_len}
        if r.kind == "tasks":
            head["task"] = _task_name(r)
        if r.kind == "ppl":
            head["protocol"] = r.protocol
        for row in r.rows:
            flat = {**head, **{k: v for k, v in row.items() if k not in BULKY}}
            if "length" in row and r.train_len is not None:
                flat["extrapolated"] = row["length"] > r.train_len
            if r.kind == "ppl" and r.protocol in base_series:
                flat["ratio_to_rope"] = _ratio(row["ppl"], base_series[r.protocol].get(int(row["length"])))
            out[r.kind].append(flat)
    out["ppl_summary"] = [row for p, g in by_protocol.items() for row in _summary_rows(g, p)]
    out["targets"] = {p: _targets(g) for p, g in by_protocol.items()}
    out["by_position"] = [row for p, g in by_protocol.items() for row in _position_rows(g, p)]
    out["analysis"] = outcome
    return out


def _summary_rows(groups: dict[str, list[EvalResult]], protocol: str) -> list[dict[str, Any]]:
    """Per label and length: seeds, mean and std of ppl and of ppl over the training-length ppl."""
    rows = []
    for name, group in groups.items():
        values, rel = per_seed(group, "ppl"), relative_to_train_len(group, "ppl", _train_len(group))
        for n in sorted(values):
            mean, std, k = mean_std(values[n])
            rel_mean, rel_std, _ = mean_std(rel.get(n, {}))
            rows.append({"label": name, "scheme": group[0].scheme, "variant": group[0].variant,
                         "convention": group[0].convention, "protocol": protocol,
                         "length": n, "train_len": _train_len(group), "seeds": k, "ppl_mean": mean,
                         "ppl_std": std, "rel_train_len_mean": rel_mean, "rel_train_len_std": rel_std})
    return rows


def _position_curve(group: list[EvalResult], length: int) -> list[tuple[int, int, float]]:
    """(start, end, mean over seeds of the loss) per position bin of the rows at `length`."""
    per_bin: dict[tuple[int, int], dict[Any, float]] = {}
    for r in group:
        for row in r.rows:
            pos = row.get("by_position")
            if row["length"] == length and pos:
                for a, b, loss in zip(pos["start"], pos["end"], pos["loss"]):
                    per_bin.setdefault((a, b), {})[train_seed(r)] = loss
    return [(a, b, mean_std(v)[0]) for (a, b), v in sorted(per_bin.items())]


def _position_rows(groups: dict[str, list[EvalResult]], protocol: str) -> list[dict[str, Any]]:
    length = _longest_with_positions(groups)
    rows = []
    for name, group in groups.items():
        curve = _position_curve(group, length) if length else []
        if curve:
            rows.append({"label": name, "protocol": protocol, "length": length, "start": [c[0] for c in curve],
                         "end": [c[1] for c in curve], "loss_mean": [c[2] for c in curve]})
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
VARIANT_STYLES = {"none": ("-", "o"), "pi": ("--", "s"), "ntk": (":", "^"), "dynamic_ntk": ("-.", "v"),
                  "yarn": ((0, (5, 1, 1, 1, 1, 1)), "D")}


def _line_style(result: EvalResult) -> dict:
    """Colour: scheme; line style and marker: scaling variant; hollow markers: the matched convention."""
    linestyle, marker = VARIANT_STYLES.get(result.variant, ("-", "o"))
    style = {"linestyle": linestyle, "marker": marker, "markersize": 4}
    if result.scheme in SCHEMES_REGISTRY:
        style["color"] = SCHEMES_REGISTRY[result.scheme].color
    if result.convention == "matched":
        style.update(markerfacecolor="white", markersize=5, linewidth=1.0)
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


def _plot_lengths(panels: dict[str, dict[str, list[EvalResult]]], value: str, ylabel: str, title: str,
                  path: Path, log_y: bool) -> Path:
    """Values against context length, one row of panels per protocol (its name in the title); for
    perplexity (log_y) a second panel shows each model's perplexity over its own training-length
    perplexity. Bands: +- one std over seeds."""
    fig = _figure()
    cols = 2 if log_y else 1
    for i, (name, groups) in enumerate(panels.items()):
        ax = fig.add_subplot(len(panels), cols, cols * i + 1)
        heading = f"{title} ({name})" if name else title
        _draw_lengths(ax, groups, {n: per_seed(g, value) for n, g in groups.items()}, ylabel, heading, log_y)
        if not log_y:
            ax.set_ylim(-0.05, 1.05)
        else:
            rel = {n: relative_to_train_len(g, value, _train_len(g)) for n, g in groups.items()}
            if any(rel.values()):
                ax2 = fig.add_subplot(len(panels), cols, cols * i + 2)
                _draw_lengths(ax2, {n: g for n, g in groups.items() if rel[n]}, rel,
                              f"{ylabel} / own {ylabel} at training length", f"Extrapolation, relative ({name})"
                              if name else "Extrapolation (relative)", False)
                ax2.axhline(1.0, color="black", linewidth=0.8)
                ax = ax2
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.set_size_inches(15 if log_y else 9, 4.8 * len(panels))
    fig.tight_layout()
    fig.savefig(path)
    return path


def _plot_positions(by_protocol: dict[str, dict[str, list[EvalResult]]], path: Path) -> Path | None:
    """Loss against position at each protocol's longest length, one line per label (mean over
    seeds), x = tokens of context (position + 1) on a log axis, the training length marked."""
    panels = {p: g for p, g in by_protocol.items() if _longest_with_positions(g)}
    if not panels:
        return None
    fig = _figure()
    for i, (protocol, groups) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        length = _longest_with_positions(groups)
        for name, group in groups.items():
            curve = _position_curve(group, length)
            if curve:
                xs = [math.sqrt((a + 1) * b) for a, b, _ in curve]  # geometric middle of contexts a+1 .. b
                style = _line_style(group[0]) | {"marker": None}
                ax.plot(xs, [c[2] for c in curve], label=name, **style)
        for t in sorted({_train_len(g) for g in groups.values()} - {None}):
            ax.axvline(t, color="grey", linestyle="--", linewidth=1, label="training length")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens of context (position + 1)")
        ax.set_ylabel("loss (nats per token)")
        ax.set_title(f"Loss by position at length {length} ({protocol})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.set_size_inches(8 * len(panels), 4.8)
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


def write_report(results: list[EvalResult], out_dir: str | Path, analysis: Analysis | None = None) -> dict[str, Path]:
    """Write report.md, report.json and the plots that have data (extrapolation.png,
    by_position.png, passkey.png, tasks.png); returns name -> path. `analysis`: the endpoints and
    comparisons declared before the run, tested in the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_protocol = _by_protocol(results)
    outcome = analyse(by_protocol, analysis) if analysis is not None and by_protocol else None
    paths = {"markdown": out / "report.md", "json": out / "report.json"}
    paths["markdown"].write_text(render_markdown(results, outcome))
    # No top-level "kind": a report directory re-collected later is not mistaken for results.
    paths["json"].write_text(json.dumps(_flat_rows(results, outcome), indent=2) + "\n")
    if by_protocol:
        panels = by_protocol if len(by_protocol) > 1 or "windows" not in by_protocol else {"": by_protocol["windows"]}
        paths["extrapolation"] = _plot_lengths(panels, "ppl", "perplexity", "Perplexity vs context length",
                                               out / "extrapolation.png", log_y=True)
        positions = _plot_positions(by_protocol, out / "by_position.png")
        if positions:
            paths["by_position"] = positions
    passkey = _by_label(results, "passkey")
    if passkey:
        paths["passkey"] = _plot_lengths({"": passkey}, "accuracy", "passkey accuracy",
                                         "Passkey retrieval vs context length",
                                         out / "passkey.png", log_y=False)
    if any(r.kind == "tasks" for r in results):
        paths["tasks"] = _plot_tasks(results, out / "tasks.png")
    return paths


def load_analysis(source: str) -> Analysis:
    """The `analysis:` of a study YAML (a path or a preset name), or of a YAML holding just it."""
    from bifocal import configs
    from bifocal.core.errors import BifocalError

    from .significance import parse_analysis

    path = configs.find(source, "study")
    if path is None:
        raise BifocalError(f"--analysis {source!r}: no such file or study preset")
    from .study import study_mapping

    raw = study_mapping(Path(path))  # a study's `include:` applied, as the study itself reads it
    return parse_analysis(raw.get("analysis", raw), str(path))


def main(args: argparse.Namespace) -> int:
    from bifocal.core.settings import resolve_arguments

    from .settings import ReportSettings

    args = resolve_arguments(ReportSettings, args, "eval report")
    from bifocal.core.errors import BifocalError

    analysis = load_analysis(args.analysis) if getattr(args, "analysis", None) else None
    results = collect(list(args.results))
    if not results:
        raise BifocalError(f"no result files found in {', '.join(map(str, args.results))}")
    out = Path(args.out)
    earlier = [p.name for p in (out / "report.md", out / "report.json") if p.exists()]
    if earlier and not getattr(args, "overwrite", False):
        raise BifocalError(f"{out} already holds a report ({', '.join(earlier)}); pass --overwrite to replace it, "
                           "or choose another --out (nothing was written)")
    paths = write_report(results, args.out, analysis)
    print(paths["markdown"].read_text())
    for path in paths.values():
        print(f"wrote {path}")
    return 0
