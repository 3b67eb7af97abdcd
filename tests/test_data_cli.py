"""`bifocal prepare` end to end through the real CLI: relative paths, reuse, one-line errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from bifocal.data_pipeline.loader import PreparedData

cli = pytest.importorskip("bifocal.launcher.cli")

TEXT = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition.\n" * 30


def write_config(root: Path, corpus: str) -> Path:
    (root / "cfg").mkdir(exist_ok=True)
    path = root / "cfg" / "data.yaml"
    path.write_text(
        "data:\n"
        "  sources:\n"
        f"    - {{name: prose, path: ../{corpus}}}\n"  # relative to the YAML's folder
        "  tokenizer: {vocab_size: 300, train_chars: 50000}\n"
        "  val_fraction: 0.3\n"
        "  dedup: false\n")  # the documents differ only in their first word: near duplicates
    return path


def test_cli_prepare_then_reuse(tmp_path, capsys):
    with gzip.open(tmp_path / "prose.jsonl.gz", "wt") as f:
        for i in range(4):
            f.write(json.dumps({"source": f"d{i}", "text": f"{i} " + TEXT}) + "\n")
    cfg, out = write_config(tmp_path, "prose.jsonl.gz"), tmp_path / "out"
    assert cli.main(["prepare", str(cfg), "--out", str(out), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "MB/s" in captured.err  # the log line of prepare()
    data = PreparedData(out)
    assert data.meta["splits"]["train"]["documents"] + data.meta["splits"]["val"]["documents"] == 4
    assert cli.main(["prepare", str(cfg), "--out", str(out)]) == 0
    assert "reusing" in capsys.readouterr().err


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, capsys):
    cfg = write_config(tmp_path, "missing.jsonl.gz")
    assert cli.main(["prepare", str(cfg), "--out", str(tmp_path / "out")]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bifocal: error")]
    assert len(err) == 1 and "source 'prose': file not found" in err[0] and "missing.jsonl.gz" in err[0]
    assert not (tmp_path / "out").exists()
