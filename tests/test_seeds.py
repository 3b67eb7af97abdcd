"""Seeds in reports: mean ± std per length, the extrapolation ratio per seed, tests only on declared
endpoints (no "every seed below every seed" rule), and the README headline generated from a
report, from real result files through `write_report`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest

from bifocal.eval.report import write_report
from bifocal.eval.results import EvalResult
from bifocal.eval.seeds import mean_std, relative_to_train_len
from bifocal.eval.significance import parse_analysis
from bifocal.eval.study import load_study

LENGTHS = [64, 128, 256]


def ppl(scheme: str, seed: int, values: list[float]) -> EvalResult:
    rows = [{"length": n, "tokens": 100, "loss": math.log(v), "ppl": v} for n, v in zip(LENGTHS, values)]
    return EvalResult(kind="ppl", model=scheme, scheme=scheme, rows=rows, train_len=64, extra={"train_seed": seed})


RESULTS = [
    ppl("rope", 1, [20.0, 30.0, 60.0]), ppl("rope", 2, [22.0, 35.0, 80.0]), ppl("rope", 3, [21.0, 32.0, 70.0]),
    # bifocal: the same in distribution (overlapping seeds), clearly flatter beyond it
    ppl("bifocal", 1, [21.5, 23.0, 25.0]), ppl("bifocal", 2, [20.5, 22.0, 23.0]), ppl("bifocal", 3, [21.0, 22.5, 24.0]),
]


def test_mean_std_and_relative_curve_per_seed():
    rope = RESULTS[:3]
    assert mean_std({1: 20.0, 2: 22.0, 3: 21.0}) == (21.0, 1.0, 3)
    assert mean_std({None: 5.0}) == (5.0, 0.0, 1)
    rel = relative_to_train_len(rope, "ppl", 64)
    assert rel[64] == {1: 1.0, 2: 1.0, 3: 1.0}
    assert rel[256] == pytest.approx({1: 3.0, 2: 80 / 22, 3: 70 / 21})
    assert relative_to_train_len(rope, "ppl", 32) == {}  # training length not evaluated


ANALYSIS = parse_analysis({"endpoints": {"extrapolation": [2, 4], "training_length": [1]}}, "test")


def test_report_with_seeds(tmp_path):
    paths = write_report(RESULTS, tmp_path, ANALYSIS)
    md = paths["markdown"].read_text()
    assert "| rope | rope | 3 | 64 | 21.00 ± 1.00 | 32.33 ± 2.52 | 70.00 ± 10.00 |" in md
    assert "a description, not a test" in md
    assert "seed spread" not in md and "every seed" not in md and "no worse" not in md  # the old rule is gone
    tests = md[md.index("### Comparisons"):]
    # bifocal vs rope, Welch over 3 seeds each, Holm over the 2 tests: lower beyond the training length,
    # no difference detected at it
    assert "| extrapolation | bifocal vs rope | welch | 3 / 3 |" in tests
    rows = {line.split("|")[1].strip(): line for line in tests.splitlines() if "bifocal vs rope" in line}
    assert rows["extrapolation"].rstrip(" |").endswith("lower")
    assert rows["training_length"].rstrip(" |").endswith("no difference detected")
    assert "adjusted over all 2 tests" in tests
    own = md[md.index("own perplexity at its training length"):]
    assert "| rope | 1.000 ± 0.000 | 1.538 ± 0.047 | 3.323 ± 0.318 |" in own
    summary = json.loads(paths["json"].read_text())["ppl_summary"]
    row = next(r for r in summary if r["label"] == "bifocal" and r["length"] == 256)
    assert row["seeds"] == 3 and row["ppl_mean"] == pytest.approx(24.0) and row["ppl_std"] == pytest.approx(1.0)
    assert row["rel_train_len_mean"] == pytest.approx((25 / 21.5 + 23 / 20.5 + 24 / 21) / 3)
    image = matplotlib.image.imread(paths["extrapolation"])
    assert image.shape[1] > 1.5 * image.shape[0]  # two panels side by side: absolute and relative


def test_single_seed_report_has_no_spread_claims(tmp_path):
    md = write_report([RESULTS[0], RESULTS[3]], tmp_path, ANALYSIS)["markdown"].read_text()
    assert "±" not in md and "| lower" not in md and "not tested" in md
    assert "own perplexity at its training length" in md


def test_seeds_in_the_study_file_and_on_the_command_line(tmp_path):
    assert load_study("smoke").runs() == [("rope", None, "rope"), ("bifocal", None, "bifocal")]
    study = load_study("smoke", ["train.seed=7"], "rope", seeds=3)
    assert study.seeds == [7, 8, 9]
    assert [r[2] for r in study.runs()] == ["rope-s7", "rope-s8", "rope-s9"]
    assert study.run_config("rope", 8)["train"]["seed"] == 8
    assert load_study("smoke", ["seeds=[5]"], "rope").runs() == [("rope", 5, "rope-s5")]
    f = tmp_path / "s.yaml"
    f.write_text("base: {train: {seed: 1}}\nschemes: [rope]\nseeds: [5, 11]\n")
    assert [r[1] for r in load_study(str(f)).runs()] == [5, 11]
    from bifocal.core.errors import BifocalError
    for bad in ("0", "[1, 1]", "two"):
        f.write_text(f"schemes: [rope]\nseeds: {bad}\n")
        with pytest.raises(BifocalError, match="seeds"):
            load_study(str(f))


def test_headline_table_from_report_json(tmp_path, capsys):
    from bifocal.eval.headline import headline, main

    paths = write_report(RESULTS, tmp_path, ANALYSIS)
    report = json.loads(paths["json"].read_text())
    lines = headline(report, ["bifocal", "rope", "pope"]).splitlines()
    assert lines[0].startswith("Protocol `windows`: non-overlapping windows")  # which protocol the table uses
    assert lines[2] == "| model | seeds | 64 | 128* | 256* | ppl(256) / ppl(64) |"
    assert lines[4] == "| bifocal | 3 | 21.0 ± 0.5 | 22.5 ± 0.5 | 24.0 ± 1.0 | 1.143 ± 0.020 |"
    assert lines[5].startswith("| rope | 3 | 21.0 ± 1.0 |") and lines[6] == ""  # no pope results: no row
    assert lines[7] == "| model | seeds | extrapolation [95% CI] | training_length [95% CI] |"
    assert any(line.startswith("| extrapolation | bifocal vs rope | welch |") and line.endswith("| lower |")
               for line in lines)
    assert main([str(paths["json"]), "--labels", "bifocal,rope,pope"]) == 0
    assert capsys.readouterr().out == headline(report, ["bifocal", "rope", "pope"])
    assert main([str(tmp_path / "missing.json")]) == 2


def test_headline_rows_follow_the_scheme_registry():
    """Without --labels: every scheme's own row in the registry's order, RoPE's followed by its
    baseline scalings' rows (each factor run); no scheme list of its own to drift."""
    from bifocal.eval.headline import BASELINE_SCALINGS, default_labels
    from bifocal.model.schemes import SCALINGS, SCHEMES

    assert set(BASELINE_SCALINGS) <= set(SCALINGS)
    present = ["pope", "rope+pi(x16)", "rope+yarn(matched)", "bifocal", "rope", "rope+yarn(x16)", "nope",
               "bifocal+yarn(x16)", "spectral", "rope+ntk(x16)", "pope"]
    assert default_labels(present) == [
        "rope", "rope+yarn(matched)", "rope+yarn(x16)", "rope+ntk(x16)", "bifocal", "spectral", "pope", "nope"]
    assert [x for x in default_labels(present) if "+" not in x] == [n for n in SCHEMES if n in present]
    assert default_labels(["pope", "bifocal"]) == ["bifocal", "pope"]


def test_headline_across_corpora_says_where_a_verdict_holds_on_every_corpus(tmp_path, capsys):
    from bifocal.eval.headline import main

    code = write_report(RESULTS, tmp_path / "code", ANALYSIS)["json"]
    report = json.loads(code.read_text())
    first = report["analysis"]["comparisons"][0]
    first["verdict"] = "no difference detected" if first["verdict"] != "no difference detected" else "lower"
    prose = tmp_path / "prose" / "report.json"
    prose.parent.mkdir()
    prose.write_text(json.dumps(report))
    assert main([str(code), str(prose), "--labels", "bifocal,rope"]) == 0
    out = capsys.readouterr().out
    assert "#### code\n" in out and "#### prose\n" in out  # a section per corpus, named by its directory
    assert "seeds per model: code 3, prose 3" in out  # a verdict that differs may be power, said beside the table
    rows = [line for line in out.split("#### Every declared comparison")[1].splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(report["analysis"]["comparisons"])
    assert rows[0].endswith("| no |") and all(r.endswith("| yes |") for r in rows[1:])
    assert main([str(code), str(prose), "--names", "a,a"]) == 2


def test_readme_headline_table_is_generated_from_the_committed_study(capsys):
    """The README's tables must be what `python -m bifocal.eval.headline docs/study-cpu/report.json
    docs/study-prose/report.json --names code,prose` prints today, so a re-run study cannot leave
    stale numbers in the README."""
    from bifocal.eval.headline import main

    root = Path(__file__).resolve().parents[1]
    assert main([str(root / "docs/study-cpu/report.json"), str(root / "docs/study-prose/report.json"),
                 "--names", "code,prose"]) == 0
    tables = capsys.readouterr().out.strip()
    assert "#### code" in tables and "#### prose" in tables and tables in (root / "README.md").read_text()
