"""The README's headline tables, generated from a study's report.json: per model, mean ± std
perplexity at every length and the rise from the training length to the longest length (mean
over seeds of each seed's own ratio), in one protocol; and, when the study declared an analysis,
its endpoints with bootstrap intervals and its comparisons with Holm-adjusted p-values.

    python -m bifocal.eval.headline docs/study-cpu/report.json [--labels rope,rope+yarn(x16),...] [--protocol P]

With several reports (one study per corpus, the same declared analysis), a section per corpus and
then one table of every declared comparison side by side, with whether its verdict is the same on
every corpus: a README sentence may only state what holds on every corpus it was measured on.

    python -m bifocal.eval.headline docs/study-cpu/report.json docs/study-prose/report.json --names code,prose
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bifocal.model.schemes import SCHEMES

from .protocol import describe_protocol

BASELINE_SCALINGS = ("yarn", "ntk")
"""The training-free scalings (model/schemes.py SCALINGS) whose RoPE rows the headline shows
beside RoPE's own: the field's usual long-context baselines."""


def default_labels(present: Iterable[str]) -> list[str]:
    """The headline's rows among the labels `present` (in their order): every scheme's own row in
    the registry's order (model/schemes.py), and after RoPE's its BASELINE_SCALINGS rows (each
    factor the study ran, e.g. `rope+yarn(x16)`, `rope+yarn(matched)`)."""
    present = list(dict.fromkeys(present))
    out = []
    for name in (n for n in SCHEMES if n in present):
        out.append(name)
        if name == "rope":
            out += [x for s in BASELINE_SCALINGS for x in present if x.startswith(f"rope+{s}(")]
    return out


def _cell(mean: float | None, std: float | None, seeds: int, digits: int = 1) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def default_protocol(report: dict[str, Any]) -> str | None:
    """The protocol of the first declared endpoint, else the first in the summary (None: files
    written before protocols were recorded)."""
    analysis = report.get("analysis") or {}
    endpoints = (analysis.get("declared") or {}).get("endpoints") or []
    if endpoints:
        return endpoints[0]["protocol"]
    return next((r.get("protocol") for r in report.get("ppl_summary", [])), None)


def length_table(summary: list[dict[str, Any]], labels: list[str], protocol: str | None = None) -> str:
    """Markdown table: one row per label present in `summary` (rows of `protocol`), in the order of `labels`."""
    rows = [r for r in summary if r["label"] in labels and r.get("protocol") == protocol]
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


def analysis_tables(analysis: dict[str, Any] | None, labels: list[str]) -> str:
    """The declared endpoints per label (perplexity with its interval) and every comparison."""
    if not analysis:
        return ""
    level = f"{100 * (1 - analysis['declared']['alpha']):g}%"
    names = [e["name"] for e in analysis["declared"]["endpoints"]]
    values = {(e["endpoint"], e["label"]): e for e in analysis["labels"]}
    out = ["| model | seeds | " + " | ".join(f"{n} [{level} CI]" for n in names) + " |",
           "|---|---:|" + "---:|" * len(names)]
    for label in labels:
        mine = [values.get((n, label)) for n in names]
        if any(mine):
            seeds = max(e["seeds"] for e in mine if e)
            out.append(f"| {label} | {seeds} | " + " | ".join(
                f"{e['ppl']:.1f} [{e['ppl_ci'][0]:.1f}, {e['ppl_ci'][1]:.1f}]" if e else "—" for e in mine) + " |")
    if analysis["comparisons"]:
        out += ["", "| endpoint | A vs B | test | ppl ratio A / B [CI] | p (Holm) | verdict |",
                "|---|---|---|---:|---:|---|"]
        for c in analysis["comparisons"]:
            p = "—" if c["p_holm"] is None else f"{c['p_holm']:.2g}"
            out.append(f"| {c['endpoint']} | {c['a']} vs {c['b']} | {c['design']} | {c['ratio']:.3f} "
                       f"[{c['ratio_ci'][0]:.3f}, {c['ratio_ci'][1]:.3f}] | {p} | {c['verdict']} |")
    return "\n".join(out) + "\n"


def headline(report: dict[str, Any], labels: list[str] | None = None, protocol: str | None = None) -> str:
    """The length table of `protocol` (default: default_protocol), then the analysis tables if any;
    rows in the order of `labels` (None: default_labels)."""
    protocol = protocol if protocol is not None else default_protocol(report)
    labels = default_labels(r["label"] for r in report["ppl_summary"]) if labels is None else labels
    table = length_table(report["ppl_summary"], labels, protocol)
    if protocol is not None and table:  # reports written before protocols were recorded: the table alone
        shown = [x for x in labels if f"| {x} |" in table]
        notes = [f"Protocol `{protocol}`: {describe_protocol(protocol)}."]
        if any("(matched)" in x for x in shown):
            notes.append("`(matched)`: RoPE scaling factor s = L / L_train at each length L.")
        if any(re.search(r"\(x[0-9.]+\)$", x) for x in shown):
            notes.append("`(xS)`: one factor S at every length.")
        table = " ".join(notes) + "\n\n" + table
    tests = analysis_tables(report.get("analysis"), labels)
    return table + ("\n" + tests if tests else "")


def across_corpora(reports: dict[str, dict[str, Any]]) -> str:
    """Markdown: every comparison any report declared, one column per corpus (ppl ratio A / B with
    its interval and the Holm-adjusted verdict), and whether the verdict agrees on every corpus
    ("—" where a corpus lacks the comparison)."""
    names = list(reports)
    found: dict[tuple[str, str, str], dict[str, dict]] = {}
    for name, report in reports.items():
        for c in (report.get("analysis") or {}).get("comparisons") or []:
            found.setdefault((c["endpoint"], c["a"], c["b"]), {})[name] = c
    if not found:
        return "No report declared an analysis: nothing was tested.\n"
    seeds = {n: max((c.get("seeds_a", 0) for c in (r.get("analysis") or {}).get("comparisons") or []), default=0)
             for n, r in reports.items()}
    out = ["A verdict is the Holm-adjusted test's (p shown), not the interval's: with few seeds an interval "
           "can exclude 1 while the corrected test does not reject. A `no` in the last column can come "
           "from the corpora or from their power (seeds per model: " + ", ".join(f"{n} {seeds[n]}" for n in names)
           + ").", "",
           "| endpoint | A vs B | " + " | ".join(f"{n}: ratio [CI], p (Holm), verdict" for n in names)
           + " | same on every corpus |",
           "|---|---|" + "---|" * (len(names) + 1)]
    for (endpoint, a, b), by in found.items():
        cells = [f"{by[n]['ratio']:.3f} [{by[n]['ratio_ci'][0]:.3f}, {by[n]['ratio_ci'][1]:.3f}], "
                 f"{'—' if by[n].get('p_holm') is None else format(by[n]['p_holm'], '.2g')}, {by[n]['verdict']}"
                 if n in by else "—" for n in names]
        verdicts = {by[n]["verdict"] for n in names if n in by}
        same = "yes" if len(by) == len(names) and len(verdicts) == 1 else "no"
        out.append(f"| {endpoint} | {a} vs {b} | " + " | ".join(cells) + f" | {same} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", metavar="report",
                   help="report.json written by `bifocal study extrapolation` or `bifocal eval report` (one per corpus)")
    p.add_argument("--names", default=None, help="comma-separated corpus names, one per report (default: each "
                                                 "report's directory name)")
    p.add_argument("--labels", default=None, help="comma-separated row labels, in order (default: every "
                                                  "scheme's own row in the registry's order, RoPE's followed by "
                                                  "its " + " and ".join(BASELINE_SCALINGS) + " rows)")
    p.add_argument("--protocol", default=None, help="the protocol of the length table (default: the first "
                                                    "endpoint's, else the first in the report)")
    args = p.parse_args(argv)
    names = [x.strip() for x in args.names.split(",")] if args.names else [Path(r).parent.name for r in args.reports]
    if len(names) != len(args.reports) or len(set(names)) != len(names):
        print(f"bifocal: error: --names: {len(args.reports)} distinct names needed, got {names}", file=sys.stderr)
        return 2
    reports = {}
    for name, path in zip(names, args.reports):
        try:
            report = json.loads(Path(path).read_text())
            report["ppl_summary"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"bifocal: error: {path}: no ppl_summary in a readable report.json ({exc})", file=sys.stderr)
            return 2
        reports[name] = report
    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    if len(reports) == 1:
        print(headline(next(iter(reports.values())), labels, args.protocol), end="")
        return 0
    for name, report in reports.items():
        print(f"#### {name}\n\n" + headline(report, labels, args.protocol))
    print("#### Every declared comparison on every corpus\n\n" + across_corpora(reports), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
