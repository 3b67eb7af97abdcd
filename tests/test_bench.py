"""`bifocal bench` end to end on CPU: every runner timed, ratios, MFU with a given peak, files."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli


def test_bench_times_each_scheme_and_the_plain_loop(tiny_config, tmp_path):
    out = tmp_path / "bench"
    proc = run_cli(["bench", "--config", str(tiny_config), "--data", str(tiny_config),
                    "--schemes", "rope,bifocal,pope", "--plain", "bifocal", "--packing", "reset/document",
                    "--steps", "2", "--block", "1",
                    "--warmup", "1", "--set", "train.peak_tflops=0.5", "--out", str(out)], tmp_path)
    result = json.loads((out / "bench.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["rope", "bifocal", "pope", "rope reset/document", "bifocal reset/document",
                          "pope reset/document", "bifocal (plain torch)"]
    for name, row in rows.items():
        assert name in proc.stdout
        assert row["tokens_per_s"] > 0 and len(row["step_ms_rounds"]) == 2
        assert 0 < row["mfu"] < 1  # 0.5 TFLOP/s given: a tiny model on a CPU is far below it
        assert row["peak_mem_mb"] is None  # per-scheme memory is a CUDA figure
    assert rows["rope"]["tokens_per_s_vs_rope"] == 1.0
    per_round = [r / b for r, b in zip(rows["rope"]["step_ms_rounds"], rows["bifocal"]["step_ms_rounds"])]
    assert rows["bifocal"]["tokens_per_s_vs_rope"] == pytest.approx(sum(per_round) / 2)  # median of two rounds
    assert rows["pope"]["flops_per_token"] > rows["rope"]["flops_per_token"] == rows["bifocal"]["flops_per_token"]
    assert rows["bifocal"]["framework_overhead"] is not None
    # Packed documents: each scheme again, timed against itself in the config's mode in the same rounds.
    packed = rows["bifocal reset/document"]
    assert packed["mode"] == "reset/document" and packed["framework_overhead"] is None
    per_round = [r / p for r, p in zip(rows["bifocal"]["step_ms_rounds"], packed["step_ms_rounds"])]
    assert packed["tokens_per_s_vs_own_mode"] == pytest.approx(sum(per_round) / 2)
    assert rows["bifocal"]["tokens_per_s_vs_own_mode"] is None
    assert (out / "bench.png").stat().st_size > 0
    assert "peak RSS" in proc.stdout


def test_bench_rejects_bad_input_with_one_line_and_writes_nothing(tiny_config, tmp_path):
    for args, needle in ((["--schemes", "rope,alibi"], "unknown scheme 'alibi'"),
                         (["--config", "nope.yaml"], "config file not found: nope.yaml"),
                         (["--steps", "0"], "bench.steps=0"),
                         (["--set", "train.micro_batch=0"], "train.micro_batch=0"),
                         (["--plain", "rope", "--set", "deepspeed.precision=fp16"], "--plain supports fp32 and bf16"),
                         (["--packing", "reset/flash"], "--packing: unknown mode 'reset/flash'")):
        proc = run_cli(["bench", "--data", str(tiny_config), "--out", str(tmp_path / "b"), *args], tmp_path,
                       check=False)
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("bifocal: error:")]
        assert len(errors) == 1 and needle in errors[0] and "Traceback" not in proc.stderr
        assert not (tmp_path / "b").exists()
