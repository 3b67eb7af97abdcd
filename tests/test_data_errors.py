"""Bad input gives one clear BifocalError line (or a counted warning), never a half-written directory."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from bifocal.data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from bifocal.core.errors import BifocalError
from bifocal.data_pipeline.loader import PreparedData, iter_documents
from bifocal.data_pipeline.prepare import prepare
from bifocal.data_pipeline.shards import DataWarning
from bifocal.data_pipeline.sources import _clean

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 20


def jsonl_gz(path: Path, lines: list[bytes]) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))
    return path


def doc(text: str, source: str) -> bytes:
    return json.dumps({"source": source, "text": text}).encode()


def cfg_for(*paths: Path, **kw) -> DataConfig:
    return DataConfig(sources=[SourceConfig(name=f"s{i}", path=str(p), **kw) for i, p in enumerate(paths)],
                      tokenizer=TokenizerConfig(vocab_size=300, train_chars=100_000), val_fraction=0.2)


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f"{out.name}.tmp-*"))


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(BifocalError) as exc:
        prepare(cfg_for(tmp_path / "nope.jsonl.gz"), tmp_path / "out")
    assert "source 's0': file not found" in one_line(exc) and "nope.jsonl.gz" in one_line(exc)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("lines", [[], [b'{"source": "a", "text": ""}', b'{"source": "b", "text": "  \\n "}']],
                         ids=["no-lines", "blank-texts"])
def test_empty_source(tmp_path, lines):
    good = jsonl_gz(tmp_path / "good.jsonl.gz", [doc(TEXT, "x"), doc(TEXT[::-1], "y")])
    empty = jsonl_gz(tmp_path / "empty.jsonl.gz", lines)
    with pytest.raises(BifocalError) as exc:
        prepare(cfg_for(good, empty), tmp_path / "out")
    assert "source 's1': no documents with text in" in one_line(exc) and "empty.jsonl.gz" in one_line(exc)
    assert_nothing_written(tmp_path / "out")


def test_missing_text_field(tmp_path):
    path = jsonl_gz(tmp_path / "f.jsonl.gz", [b'{"source": "a", "content": "hello"}'])
    with pytest.raises(BifocalError) as exc:
        prepare(cfg_for(path), tmp_path / "out")
    msg = one_line(exc)
    assert "f.jsonl.gz" in msg and "no field 'text'" in msg and "content" in msg
    assert_nothing_written(tmp_path / "out")


def test_failure_in_a_later_source_leaves_no_directory(tmp_path):
    good = jsonl_gz(tmp_path / "good.jsonl.gz", [doc(TEXT, "x"), doc(TEXT[::-1], "y")])
    # the bad row comes after a good one, so tokenizing has started when it fails
    bad = jsonl_gz(tmp_path / "bad.jsonl.gz", [doc(TEXT, "z"), b'{"source": "w", "text": 5}'])
    with pytest.raises(BifocalError, match=r"bad\.jsonl\.gz: line 2 has a non-string \(int\) value"):
        prepare(cfg_for(good, bad), tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(gzip.compress(doc(TEXT, "a") + b"\n" * 3)[:-20])
    with pytest.raises(BifocalError, match=r"broken\.jsonl\.gz: cannot read line \d+ \(EOFError"):
        prepare(cfg_for(path), tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    bad_line = b'{"source": "b", "text": "caf\xc3\xa9 ok, then bad \xff\xfe bytes ' + TEXT.encode() + b'"}'
    path = jsonl_gz(tmp_path / "u.jsonl.gz", [doc(TEXT, "a"), bad_line, doc(TEXT.upper(), "c")])
    with pytest.warns(DataWarning, match=r"source 's0': 1 document\(s\) were not valid Unicode: kept"):
        out = prepare(cfg_for(path), tmp_path / "out")
    data = PreparedData(out)
    assert data.meta["repaired_documents"] == 1 and data.meta["sources"][0]["repaired_documents"] == 1
    tok = data.tokenizer()
    texts = {tok.decode(d) for split in ("train", "val") for d in iter_documents(data, split)}
    assert "café ok, then bad \ufffd\ufffd bytes " + TEXT in texts and TEXT in texts and TEXT.upper() in texts


def test_not_a_prepared_directory(tmp_path):
    with pytest.raises(BifocalError, match="not a prepared data directory, no meta.json"):
        PreparedData(tmp_path)


@pytest.mark.parametrize("make, match", [
    (lambda: SourceConfig(name="a", path="x.jsonl", hf_dataset="y"), "set exactly one of path, hf_dataset, synthetic"),
    (lambda: SourceConfig(name="a"), "set exactly one of path, hf_dataset, synthetic"),
    (lambda: SourceConfig(name="a b", path="x"), "name='a b' is invalid"),
    (lambda: SourceConfig(name="a", path="x", weight=-1), "weight=-1 is invalid"),
    (lambda: SourceConfig(name="a", synthetic={"task": "sort", "n_documents": 3}), "synthetic.task='sort' is invalid"),
    (lambda: TokenizerConfig(type="wordpiece"), "tokenizer.type='wordpiece' is invalid: one of bpe"),
    (lambda: DataConfig(val_fraction=1.0), r"val_fraction=1.0 is invalid: must be in \[0, 1\)"),
    (lambda: DataConfig(sources=[SourceConfig(name="a", path="x"), SourceConfig(name="a", path="y")]), "unique"),
])
def test_config_validation(make, match):
    with pytest.raises(BifocalError, match=match):
        make()


def test_clean_repairs_each_lone_surrogate_once():
    # text from JSON escapes, synthetic tasks or `datasets` may hold lone surrogates: one U+FFFD each
    assert _clean("a\ud800b") == ("a\ufffdb", True, 5)
    assert _clean("\udc00\ud800") == ("\ufffd\ufffd", True, 6) and _clean("fine") == ("fine", False, 4)


def test_missing_tokenizer_path(tmp_path):
    good = jsonl_gz(tmp_path / "good.jsonl.gz", [doc(TEXT, "x")])
    cfg = cfg_for(good)
    cfg.tokenizer.path = str(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(BifocalError, match="tokenizer.path: tokenizer file not found: .*nope/tokenizer.json"):
        prepare(cfg, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_existing_non_data_directory_is_refused_untouched(tmp_path):
    good = jsonl_gz(tmp_path / "good.jsonl.gz", [doc(TEXT, "x"), doc(TEXT[::-1], "y")])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BifocalError, match="exists and is not a prepared data directory"):
        prepare(cfg_for(good), out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()  # an empty folder is filled
    assert PreparedData(prepare(cfg_for(good), out)).meta["splits"]["train"]["documents"] >= 1
