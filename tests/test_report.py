"""Result files and `bifocal eval report`: schema round trip, collection, tables, plots, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest

from bifocal.eval.results import EvalResult, collect, load
from bifocal.launcher.cli import main as cli

LENGTHS = [256, 512, 1024, 2048]


def _ppl(model: str, scheme: str, ppls: list[float], variant: str = "none",
         factor: float = 1.0) -> EvalResult:
    rows = [{"length": n, "tokens": 4096, "loss": math.log(p), "ppl": p} for n, p in zip(LENGTHS, ppls)]
    return EvalResult(kind="ppl", model=model, scheme=scheme, rows=rows, variant=variant,
                      factor=factor, train_len=256)


@pytest.fixture
def results_dir(tmp_path):
    d = tmp_path / "runs"
    _ppl("rope", "rope", [20.0, 40.0, 120.0, 400.0]).save(d / "rope" / "ppl.json")
    _ppl("rope", "rope", [20.5, 22.0, 25.0, 31.0], "yarn", 4.0).save(d / "rope" / "ppl_yarn.json")
    _ppl("bifocal", "bifocal", [19.0, 21.0, 23.0, 26.0]).save(d / "bifocal" / "ppl.json")
    EvalResult(kind="passkey", model="bifocal", scheme="bifocal", train_len=256,
               rows=[{"length": n, "trials": 10, "accuracy": a}
                     for n, a in zip(LENGTHS, [1.0, 0.9, 0.5, 0.2])]).save(d / "bifocal" / "passkey.json")
    EvalResult(kind="tasks", model="bifocal", scheme="bifocal", extra={"task": "dyck"},
               rows=[{"split": "in", "setting": "len 4-16", "n": 200, "loss": 0.12, "exact_match": 0.95},
                     {"split": "out", "setting": "len 17-32", "n": 200, "loss": 0.9, "exact_match": 0.4}]
               ).save(d / "bifocal" / "tasks_dyck.json")
    (d / "rope" / "config.json").write_text(json.dumps({"model": {"d_model": 64}}))  # unrelated
    (d / "rope" / "broken.json").write_text("{not json")
    return d


def test_save_load_round_trip(tmp_path):
    r = _ppl("rope", "rope", [1.5, 2.5, 3.5, 4.5], "ntk", 2.0)
    r.extra["seed"] = 3
    assert load(r.save(tmp_path / "a" / "r.json")) == r
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("drop, field", [("kind", "kind"), ("model", "model"), ("rows", "rows")])
def test_load_names_file_and_missing_field(tmp_path, drop, field):
    data = _ppl("rope", "rope", [1, 2, 3, 4]).to_dict()
    del data[drop]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"bad\.json.*{field}"):
        load(path)


def test_load_names_missing_row_field_and_bad_values(tmp_path):
    data = _ppl("rope", "rope", [1, 2, 3, 4]).to_dict()
    del data["rows"][1]["ppl"]
    (tmp_path / "row.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"row\.json.*rows\[1\].*ppl"):
        load(tmp_path / "row.json")
    data = _ppl("rope", "rope", [1, 2, 3, 4]).to_dict() | {"variant": "linear"}
    (tmp_path / "var.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"var\.json.*variant"):
        load(tmp_path / "var.json")


def test_collect_skips_unrelated_json_and_dedupes(results_dir):
    found = collect([str(results_dir), str(results_dir / "rope" / "ppl.json")])
    assert sorted((r.kind, r.model, r.variant) for r in found) == [
        ("passkey", "bifocal", "none"), ("ppl", "bifocal", "none"), ("ppl", "rope", "none"),
        ("ppl", "rope", "yarn"), ("tasks", "bifocal", "none")]
    with pytest.raises(ValueError, match="config.json"):
        collect([str(results_dir / "rope" / "config.json")])  # named explicitly: must be a result


def _table(md: str, heading: str) -> dict[str, list[str]]:
    """First markdown table after ``heading`` as {first cell: cells}; the header is "__header__"."""
    block: list[list[str]] = []
    for line in md.split(heading, 1)[1].splitlines()[1:]:
        if line.startswith("|"):
            if not line.startswith("| ---"):
                block.append([c.strip() for c in line.strip("|").split("|")])
        elif block:
            break
    return {"__header__": block[0], **{r[0]: r[1:] for r in block[1:]}}


def test_report_via_cli(results_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli(["eval", "report", str(results_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert md.strip() in printed and f"wrote {out / 'report.md'}" in printed

    ppl = _table(md, "## Perplexity by context length")
    assert ppl["__header__"] == ["model", "scheme", "train len", "256", "512*", "1024*", "2048*"]
    assert ppl["rope"] == ["rope", "256", "20.00", "40.00", "120.00", "400.00"]
    assert ppl["rope+yarn(x4)"][3:] == ["22.00", "25.00", "31.00"]
    assert ppl["bifocal"][-1] == "26.00"
    assert "`*` = longer than the training length (256 tokens)" in md

    ratio = _table(md, "### Perplexity relative to `rope`")
    assert ratio["rope"] == ["1.00"] * 4
    assert ratio["bifocal"] == ["0.95", "0.53", "0.19", "0.07"]

    passkey = _table(md, "## Passkey retrieval accuracy")
    assert passkey["bifocal"][2:] == ["1.00", "0.90", "0.50", "0.20"]
    tasks = _table(md, "## Task: dyck")
    assert tasks["__header__"] == ["model", "in: len 4-16", "out: len 17-32"]
    assert tasks["bifocal"] == ["0.95 / 0.120", "0.40 / 0.900"]

    for name in ("extrapolation.png", "passkey.png", "tasks.png"):
        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img.std() > 0.01  # something was drawn

    flat = json.loads((out / "report.json").read_text())
    assert "kind" not in flat  # a report dir is never collected as a result
    assert len(flat["ppl"]) == 12 and len(flat["passkey"]) == 4 and len(flat["tasks"]) == 2
    yarn_2048 = next(r for r in flat["ppl"] if r["label"] == "rope+yarn(x4)" and r["length"] == 2048)
    assert yarn_2048["extrapolated"] and yarn_2048["ratio_to_rope"] == pytest.approx(31 / 400)

    # Re-running into the same directory refuses and leaves it alone; with --overwrite it re-collects
    # the tree that now holds the report and finds the same results.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli(["eval", "report", str(tmp_path), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert cli(["eval", "report", str(tmp_path), "--out", str(out), "--overwrite"]) == 0
    assert (out / "report.json").read_text() == before["report.json"].decode()


def test_results_split_across_files_merge_into_one_row(tmp_path, capsys):
    full = _ppl("bifocal", "bifocal", [19.0, 21.0, 23.0, 26.0])
    EvalResult(**{**full.to_dict(), "rows": full.rows[:2]}).save(tmp_path / "a.json")
    EvalResult(**{**full.to_dict(), "rows": full.rows[2:]}).save(tmp_path / "b.json")
    assert cli(["eval", "report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert _table(md, "## Perplexity")["bifocal"][2:] == ["19.00", "21.00", "23.00", "26.00"]
    assert "relative to" not in md  # no plain RoPE row, no ratio table
    assert not (tmp_path / "rep" / "passkey.png").exists()


def test_task_columns_sort_numbers_as_numbers(tmp_path):
    # Rows deliberately out of order; a string sort would put "len 17-32" before "len 9-16".
    settings = [("out", "len 17-32"), ("out", "depth 4-6"), ("in", "len 2-8"), ("out", "len 9-16")]
    EvalResult(kind="tasks", model="rope", scheme="rope", extra={"task": "dyck"},
               rows=[{"split": s, "setting": t, "n": 10, "loss": 0.5, "exact_match": 0.5} for s, t in settings]
               ).save(tmp_path / "r.json")
    assert cli(["eval", "report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    header = _table((tmp_path / "rep" / "report.md").read_text(), "## Task: dyck")["__header__"]
    assert header == ["model", "in: len 2-8", "out: depth 4-6", "out: len 9-16", "out: len 17-32"]


def test_empty_directory_is_a_user_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "other.json").write_text("[1, 2]")
    assert cli(["eval", "report", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no result files found in" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_invalid_result_file_is_a_user_error(tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps({"kind": "ppl", "model": "m", "scheme": "rope",
                                                 "rows": [{"length": 8}]}))
    assert cli(["eval", "report", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "r.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Results of real evaluations: both scaling conventions, two protocols, target digests, positions


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Result files of tiny random-weight GPTs evaluated for real: rope (plain, YaRN x4 and YaRN
    matched) and bifocal, 3 seeds each, in the windows and context>=0.75L protocols."""
    import numpy as np

    from bifocal.eval.perplexity import MATCHED, evaluate_scaled
    from tiny_models import random_model

    d = tmp_path_factory.mktemp("evaluated")
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 64, n) for n in (120, 130, 140, 150)]
    for scheme in ("rope", "bifocal"):
        for seed in (1, 2, 3):
            model = random_model(64, scheme, seed=seed, max_seq_len=16, init_std=0.2)
            runs = [(None, None)] + ([("yarn", 4.0), ("yarn", MATCHED)] if scheme == "rope" else [])
            for protocol, min_context in (("windows", None), ("context>=0.75L", "0.75L")):
                for variant, factor in runs:
                    rows = evaluate_scaled(model, docs, [8, 16, 32, 64], variant, factor, min_context=min_context,
                                           first_target=48, targets_per_doc=64, progress=False)  # as a study does
                    EvalResult(kind="ppl", model=scheme, scheme=scheme, rows=rows, variant=variant or "none",
                               factor=max(r.get("factor", 1.0) for r in rows), train_len=16,
                               convention="matched" if factor == MATCHED else "fixed",
                               extra={"train_seed": seed, "protocol": protocol}
                               ).save(d / f"{scheme}-{seed}-{variant}-{factor}-{protocol}.json")
    return d


def test_both_conventions_both_protocols_and_the_same_targets(evaluated, tmp_path, capsys):
    out = tmp_path / "rep"
    assert cli(["eval", "report", str(evaluated), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    for protocol in ("windows", "context>=0.75L"):
        table = _table(md, f"## Perplexity by context length ({protocol})")
        assert set(table) == {"__header__", "rope", "rope+yarn(x4)", "rope+yarn(matched)", "bifocal"}
        assert table["__header__"][-4:] == ["8", "16", "32*", "64*"]
        # matched: s = 1 up to the training length, so it equals plain rope there and x4 beyond it
        assert table["rope+yarn(matched)"][3:5] == table["rope"][3:5] != table["rope+yarn(x4)"][3:5]
        assert table["rope+yarn(matched)"][-1] == table["rope+yarn(x4)"][-1]
    assert "`(x4)`: one scaling factor at every length" in md and "`(matched)`: the factor matched to each length" in md
    assert md.count("Every length and every model scored the same 256 targets in 4 documents") == 2
    positions = _table(md, "### Loss by position at length 64")
    assert positions["__header__"] == ["model", "0", "1", "2-3", "4-7", "8-15", "16-31*", "32-63*"]
    assert all(c != "—" for c in positions["rope"])  # windows: every position scored
    flat = json.loads((out / "report.json").read_text())
    assert {r["protocol"] for r in flat["ppl_summary"]} == {"windows", "context>=0.75L"}
    assert {r["convention"] for r in flat["ppl"] if r["variant"] == "yarn"} == {"fixed", "matched"}
    assert all("doc_loss" not in r and "by_position" not in r for r in flat["ppl"])  # bulky data stays in results
    assert flat["targets"]["windows"]["same_everywhere"] is True
    assert {r["label"] for r in flat["by_position"]} == {"rope", "rope+yarn(x4)", "rope+yarn(matched)", "bifocal"}
    for name in ("extrapolation.png", "by_position.png"):
        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.std() > 0.01
    assert matplotlib.image.imread(out / "extrapolation.png").shape[0] > 1000  # one row of panels per protocol


def test_the_report_does_not_claim_the_same_targets_when_they_differ(evaluated, tmp_path):
    from bifocal.eval.results import load

    source = next(evaluated.glob("bifocal-1-None-None-windows.json"))
    r = load(source)
    r.rows[-1]["targets"] = "0123456789abcdef"  # as if the longest length had scored other text
    from bifocal.eval.report import write_report

    md = write_report([r], tmp_path / "md")["markdown"].read_text()
    assert "model scored the same" not in md and "The scored targets differ between lengths for bifocal" in md
    r.rows[0]["doc_ids"] = [r.rows[0]["doc_ids"][0]] * len(r.rows[0]["doc_ids"])
    md = write_report([r], tmp_path / "md2")["markdown"].read_text()
    assert "are token-for-token copies" in md
    old = _ppl("rope", "rope", [20.0, 40.0, 120.0, 400.0])  # written before digests
    md = write_report([old], tmp_path / "md3")["markdown"].read_text()
    assert "not recorded in these results" in md and "model scored the same" not in md


def test_declared_analysis_through_the_command_line(evaluated, tmp_path, capsys):
    analysis = tmp_path / "analysis.yaml"
    analysis.write_text("analysis:\n  endpoints:\n    extrapolation: {multiples: [2, 4], protocol: 'context>=0.75L'}\n"
                        "  comparisons: [[bifocal, rope], [rope+yarn(matched), rope],\n"
                        "                [rope+yarn(matched), rope+yarn(x4)]]\n")
    out = tmp_path / "rep"
    assert cli(["eval", "report", str(evaluated), "--out", str(out), "--analysis", str(analysis)]) == 0
    md = (out / "report.md").read_text()
    assert "| extrapolation | bifocal vs rope | welch | 3 / 3 |" in md
    assert "| extrapolation | rope+yarn(matched) vs rope | paired | 3 / 3 |" in md
    flat = json.loads((out / "report.json").read_text())["analysis"]
    designs = {(c["a"], c["b"]): c["design"] for c in flat["comparisons"]}
    assert designs == {("bifocal", "rope"): "welch", ("rope+yarn(matched)", "rope"): "paired",
                       ("rope+yarn(matched)", "rope+yarn(x4)"): "paired"}
    assert all(c["docs"] == 4 for c in flat["comparisons"]) and flat["tests"] == 3
    assert all(c["p"] is not None and c["p_holm"] >= c["p"] for c in flat["comparisons"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("analysis: {endpoints: {e: {multiples: [2], protocol: sliding}}}\n")
    assert cli(["eval", "report", str(evaluated), "--out", str(tmp_path / "x"), "--analysis", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "protocol 'sliding'" in err and len(err.splitlines()) == 1 and not (tmp_path / "x").exists()


def test_old_result_files_still_load_and_report():
    """Files written before conventions, protocols and digests: read as fixed / windows."""
    data = _ppl("rope", "rope", [1, 2, 3, 4], "yarn", 16.0).to_dict()
    del data["convention"]
    from bifocal.eval.results import from_dict

    r = from_dict(data)
    assert r.convention == "fixed" and r.protocol == "windows"
    data["rows"][0]["stride"] = 64
    assert from_dict(data).protocol == "stride=64"


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("results", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*/**/results")))
def test_committed_result_files_still_report(results, tmp_path):
    assert cli(["eval", "report", str(ROOT / results), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.startswith("# Evaluation report") and "## Task:" in md
