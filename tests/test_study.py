"""`bifocal study extrapolation --preset smoke` end to end: two schemes trained by real `bifocal
train` subprocesses, evaluated at 1x-4x in two protocols and both scaling conventions on the same
targets, reported with the declared endpoint; a second invocation reuses everything."""

from __future__ import annotations

import time

import pytest
import yaml

from bifocal.eval.results import load
from bifocal.eval.study import evaluations, load_study, study_lengths
from bifocal.core.errors import BifocalError

from conftest import run_cli


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("study")
    t0 = time.perf_counter()
    proc = run_cli(["study", "extrapolation", "--preset", "smoke", "--out", "out"], cwd, timeout=1200)
    return cwd / "out", proc, time.perf_counter() - t0


def test_smoke_study_writes_report_plot_and_results(study):
    out, proc, _ = study
    md = (out / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    assert [c.strip() for c in header.strip("|").split("|")][-3:] == ["32", "64*", "128*"]
    for label in ("| rope |", "| rope+yarn(x4) |", "| rope+yarn(matched) |", "| bifocal |"):
        assert md.count(label) >= 2, label  # in both protocols' tables
    assert "## Perplexity by context length (context>=0.75L)" in md and "### Loss by position at length 128" in md
    assert "## Declared endpoints and tests" in md and "`extrapolation`: lengths 2, 4 x the training length" in md
    for name in ("extrapolation.png", "by_position.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    names = sorted(p.name for p in (out / "results").glob("*.json"))
    assert names == sorted(f"{run}{protocol}.json" for run in ("bifocal", "rope", "rope-yarn-x4", "rope-yarn-matched")
                           for protocol in ("", "-context0.75L"))
    digests = set()
    for name in names:
        result = load(out / "results" / name)
        assert [r["length"] for r in result.rows] == [32, 64, 128]
        assert all(r["tokens"] == 256 and r["docs"] == 2 for r in result.rows)  # 2 documents x 128 targets
        assert result.extra["same_targets"] is True
        digests |= {r["targets"] for r in result.rows}
    assert len(digests) == 1  # every protocol, length and model: the same targets
    assert load(out / "results" / "rope-yarn-x4.json").factor == 4.0
    matched = load(out / "results" / "rope-yarn-matched-context0.75L.json")
    assert matched.convention == "matched" and [r["factor"] for r in matched.rows] == [1.0, 2.0, 4.0]
    assert [r["min_context"] for r in matched.rows] == [24, 48, 96]
    for scheme in ("rope", "bifocal"):
        assert (out / "runs" / scheme / "summary.json").is_file()
    assert str((out / "report.md").resolve()) in proc.stdout


def test_second_run_reuses_finished_runs_and_results(study):
    out, _, first = study
    stamp = (out / "runs" / "rope" / "summary.json").stat().st_mtime
    t0 = time.perf_counter()
    proc = run_cli(["study", "extrapolation", "--preset", "smoke", "--out", "out"], out.parent)
    second = time.perf_counter() - t0
    assert proc.stderr.count("finished run found") == 2
    assert proc.stderr.count("is current, reusing it") == 8
    assert (out / "runs" / "rope" / "summary.json").stat().st_mtime == stamp
    assert second < first


def test_study_file_validation(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: {include: " + str(tmp_path / "nope.yaml") + "}\nschemes: [rope]\nevals: {}\n")
    with pytest.raises(BifocalError, match="did you mean `eval`"):
        load_study(str(bad))
    with pytest.raises(BifocalError, match="unknown study preset"):
        load_study("no-such-preset")
    with pytest.raises(BifocalError, match="schemes=.*alibi"):
        load_study("smoke", schemes="rope,alibi")
    s = load_study("cpu", ["train.max_steps=7", "eval.max_tokens=99"], "rope")
    assert s.base["train"]["max_steps"] == 7 and s.eval.max_tokens == 99 and s.schemes == ["rope"]
    assert s.run_config("rope")["model"]["position"]["scheme"] == "rope"
    # rope gets every variant in both conventions: factor 16 at every length, and matched to each length
    assert evaluations(s, "rope", [128, 2048], 128) == [
        (None, 1.0), ("pi", 16.0), ("pi", "matched"), ("ntk", 16.0), ("ntk", "matched"),
        ("dynamic_ntk", 16.0), ("dynamic_ntk", "matched"), ("yarn", 16.0), ("yarn", "matched")]
    assert evaluations(s, "pope", [128, 2048], 128) == [(None, 1.0)]
    # fractions of the training length score shorter windows (context use); they must give whole tokens
    assert study_lengths([0.25, 0.5, 1, 16], 32, "x") == [8, 16, 32, 512]
    assert load_study("smoke", label="fit").model_name("bifocal") == "bifocal[fit]"
    assert load_study("smoke").model_name("bifocal") == "bifocal"
    with pytest.raises(BifocalError, match="label"):
        load_study("smoke", label="a b|c")
    for bad in ([0.3], [1 / 32], [0], [-1], ["2"], [True]):
        with pytest.raises(BifocalError, match="length_multiples"):
            load_study("cpu", [f"eval.length_multiples={bad!r}"])


def test_seeded_study_trains_each_seed_and_reports_the_spread(tmp_path):
    args = ["study", "extrapolation", "--preset", "smoke", "--out", "out", "--schemes", "rope", "--seeds", "2",
            "--set", "eval.scaling_variants=[]", "--set", "train.save_every=3", "--set", "train.keep_last=2",
            "--set", "eval.length_multiples=[0.25, 1, 2]", "--set", "analysis.endpoints.extrapolation.multiples=[2]"]
    proc = run_cli(args, tmp_path, timeout=1200)
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["rope-s1234", "rope-s1235"]
    results = [load(out / "results" / f"rope-s{s}.json") for s in (1234, 1235)]
    assert [r.extra["train_seed"] for r in results] == [1234, 1235]
    assert [row["length"] for row in results[0].rows] == [8, 32, 64]
    assert results[0].rows[0]["ppl"] != results[1].rows[0]["ppl"]  # different seeds, different models
    md = (out / "report.md").read_text()
    assert "| rope | rope | 2 | 32 |" in md and "±" in md
    assert "| 8 | 32 | 64* |" in md  # only lengths past the training length are marked
    assert "own perplexity at its training length" in md
    assert "seeds 1234, 1235" in proc.stderr
    # eval.step: the step-3 checkpoints of the same runs, evaluated without training, into out/step3
    mid = run_cli(args + ["--set", "eval.step=3", "--label", "step3"], tmp_path, timeout=1200)
    assert "training" not in mid.stderr
    early = load(out / "step3" / "results" / "rope-s1234.json")
    assert early.extra["settings"]["step"] == 3 and early.rows[0]["ppl"] != results[0].rows[0]["ppl"]
    assert early.model == "rope[step3]" and early.scheme == "rope"  # --label tags the rows
    assert (out / "step3" / "report.md").is_file()


def test_a_run_trained_with_other_settings_is_refused_not_reused(tmp_path):
    """A study pointed at an OUT whose run of the same name was trained from another config (an
    ablation's --set aimed at the main study's directory) stops with one line instead of reporting
    that run under the new settings; a speed-only setting (train.threads) is not a difference."""
    from bifocal.eval.study import write_run_config

    raw = {"model": {"position": {"scheme": "rope"}}, "data": {"positions": "continue"}, "train": {"seed": 1}}
    write_run_config(tmp_path, "rope-s1", raw)
    (tmp_path / "runs" / "rope-s1").mkdir(parents=True)
    write_run_config(tmp_path, "rope-s1", {**raw, "train": {"seed": 1, "threads": 1}})  # same run
    with pytest.raises(BifocalError, match=r"rope-s1 was trained with other settings \(data.positions: 'continue' there, "
                                           r"'reset' now\)"):
        write_run_config(tmp_path, "rope-s1", {**raw, "data": {"positions": "reset"}})
    assert yaml.safe_load((tmp_path / "configs" / "rope-s1.yaml").read_text())["data"]["positions"] == "continue"


def test_comparisons_may_name_labelled_ablations_but_not_misspelt_schemes(tmp_path):
    study = load_study("cpu-ablations")  # rows of --label'd ablation studies, compared in one report
    assert ("bifocal[omega-only]", "bifocal") in study.analysis.comparisons
    from bifocal.eval.report import load_analysis  # `bifocal eval report --analysis`: the same, include applied

    declared = load_analysis("cpu-ablations")
    assert declared.comparisons == study.analysis.comparisons and [e.name for e in declared.endpoints] == \
        ["extrapolation", "training_length"]  # the endpoints come from the included cpu.yaml
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"include: {study.path}\nanalysis:\n  comparisons: [['bifocl[omega-only]', bifocal]]\n")
    with pytest.raises(BifocalError, match="'bifocl\\[omega-only\\]' is not a label this study can produce"):
        load_study(str(bad))


def test_the_command_line_wins_over_a_schemes_override():
    """`--set model.position.spectral_heads=1` reached the base config, which the preset's
    `bifocal: {model.position.spectral_heads: 2}` override then replaced: an ablation of the number
    of spectral heads trained the default model under its label. The command line now wins."""
    study = load_study("cpu", ["model.position.spectral_heads=1", "optim.lr=0.001"], "bifocal,rope", 3, "heads1")
    assert study.run_config("bifocal", 1234)["model"]["position"]["spectral_heads"] == 1
    assert study.run_config("rope")["optim"]["lr"] == 0.001
    assert load_study("cpu").run_config("bifocal")["model"]["position"]["spectral_heads"] == 2  # the preset's own
    with pytest.raises(BifocalError, match="--schemes"):
        load_study("cpu", ["model.position.scheme=rope"])
