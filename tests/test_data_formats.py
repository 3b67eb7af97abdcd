"""Every input kind reads through `datasets`: .txt, .parquet, .jsonl.zst, code trees, hub-style folders."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from bifocal.data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from bifocal.core.errors import BifocalError
from bifocal.data_pipeline.loader import PreparedData
from bifocal.data_pipeline.sources import read_source

PROSE = ["The quick brown fox jumps over the lazy dog.\n" * 30, "Call me Ishmael. Some years ago...\n\n" * 25,
         "It was the best of times, it was the worst of times,\n" * 20]
CODE = ["def add(a, b):\n    return a + b\n" * 10, "class A:\n\tpass\n\n\nx = [A() for _ in range(3)]\n" * 8,
        "import os\nprint(os.getcwd())  # ünïcode ✓\n" * 12]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    txt = root / "txt"
    txt.mkdir()
    for i, t in enumerate(PROSE):
        (txt / f"book{i}.txt").write_text(t, encoding="utf-8")
    pq.write_table(pa.table({"id": [1, 2, 3], "content": PROSE}), root / "prose.parquet")
    lines = "".join(json.dumps({"source": f"c{i}", "text": t}) + "\n" for i, t in enumerate(CODE))
    (root / "code.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    tree = root / "tree"
    for i, t in enumerate(CODE):
        (tree / "pkg" / f"sub{i}").mkdir(parents=True)
        (tree / "pkg" / f"sub{i}" / f"mod{i}.py").write_text(t, encoding="utf-8")
    (tree / "README.txt").write_text("not python\n")
    hub = root / "hubfolder"
    hub.mkdir()
    (hub / "train.jsonl").write_text(lines)
    return {"txt": txt, "parquet": root / "prose.parquet", "zst": root / "code.jsonl.zst", "tree": tree, "hub": hub}


def texts(src: SourceConfig) -> collections.Counter:
    return collections.Counter(d.text for d in read_source(src))


def test_txt_folder_one_document_per_file(inputs):
    assert texts(SourceConfig(name="t", path=str(inputs["txt"]))) == collections.Counter(PROSE)
    assert texts(SourceConfig(name="t", path=str(inputs["txt"] / "*.txt"))) == collections.Counter(PROSE)


def test_parquet_with_text_field(inputs):
    assert texts(SourceConfig(name="p", path=str(inputs["parquet"]), text_field="content")) == collections.Counter(PROSE)
    with pytest.raises(BifocalError, match=r"prose\.parquet: no field 'text' \(fields: id, content\)"):
        texts(SourceConfig(name="p", path=str(inputs["parquet"])))


def test_jsonl_zst(inputs):
    docs = list(read_source(SourceConfig(name="z", path=str(inputs["zst"]))))
    assert [d.text for d in docs] == CODE and [d.key for d in docs] == ["c0", "c1", "c2"]


def test_code_tree_glob_and_max_documents(inputs):
    src = SourceConfig(name="tree", path=str(inputs["tree"]), glob="**/*.py")
    assert texts(src) == collections.Counter(CODE)  # README.txt is not matched
    assert len(list(read_source(SourceConfig(name="tree", path=str(inputs["tree"]), glob="**/*.py",
                                             max_documents=2)))) == 2
    with pytest.raises(BifocalError, match=r"no files match glob '\*\*/\*\.rs'"):
        texts(SourceConfig(name="tree", path=str(inputs["tree"]), glob="**/*.rs"))


def test_hub_streaming_path_with_a_local_dataset_folder(inputs):
    # hf_dataset goes through load_dataset(name, config, split=..., streaming=True), as for the hub
    assert texts(SourceConfig(name="h", hf_dataset=str(inputs["hub"]))) == collections.Counter(CODE)
    with pytest.raises(BifocalError, match=r"source 'h': dataset .*: cannot open"):
        texts(SourceConfig(name="h", hf_dataset=str(inputs["hub"]), split="nosuchsplit"))


def test_prepare_mixing_all_local_formats(inputs, tmp_path):
    from bifocal.data_pipeline.prepare import prepare

    cfg = DataConfig(
        sources=[SourceConfig(name="txt", path=str(inputs["txt"])),
                 SourceConfig(name="parquet", path=str(inputs["parquet"]), text_field="content"),
                 SourceConfig(name="zst", path=str(inputs["zst"])),
                 SourceConfig(name="tree", path=str(inputs["tree"]), glob="**/*.py")],
        tokenizer=TokenizerConfig(vocab_size=400, train_chars=50_000), val_fraction=0.3,
        dedup=False)  # the formats hold the same documents: keep every copy
    data = PreparedData(prepare(cfg, tmp_path / "out", workers=1))
    tok = data.tokenizer()
    for s, expected in (("txt", PROSE), ("parquet", PROSE), ("zst", CODE), ("tree", CODE)):
        got = []
        for split in ("train", "val"):
            toks, offs = data.tokens(s, split), data.offsets(s, split)
            got += [tok.decode(toks[a:b - 1]) for a, b in zip(offs[:-1], offs[1:])]
        assert collections.Counter(got) == collections.Counter(expected)
        assert data.meta["sources"][[m["name"] for m in data.meta["sources"]].index(s)]["splits"]["val"]["documents"] >= 1


def test_synthetic_source(tmp_path):
    pytest.importorskip("bifocal.data_pipeline.synthetic")
    src = SourceConfig(name="dyck", synthetic={"task": "dyck", "n_documents": 5, "seed": 3})
    a, b = list(read_source(src)), list(read_source(src))
    assert len(a) == 5 and all(isinstance(d.text, str) and d.text for d in a)
    assert [d.text for d in a] == [d.text for d in b]  # seeded: deterministic


def test_hub_options_data_files_data_dir_and_saved_datasets(inputs, tmp_path, monkeypatch):
    from datasets import Dataset, DatasetDict

    hub = tmp_path / "hub"
    (hub / "more").mkdir(parents=True)
    (hub / "train.jsonl").write_text((inputs["hub"] / "train.jsonl").read_text())
    (hub / "more" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in PROSE))
    # data_dir picks a folder of the repository; data_files picks files; revision is passed through.
    assert texts(SourceConfig(name="h", hf_dataset=str(hub), data_dir="more")) == collections.Counter(PROSE)
    assert texts(SourceConfig(name="h", hf_dataset="json", data_files=[str(hub / "more" / "train.jsonl")],
                              revision="main")) == collections.Counter(PROSE)
    # A file-format builder reads only its data_files, never the working directory's files.
    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"text": ["a stray shard in the cwd"]}), tmp_path / "stray.parquet")
    src = SourceConfig(name="p", hf_dataset="parquet", data_files=str(inputs["parquet"]), text_field="content")
    assert texts(src) == collections.Counter(PROSE)
    with pytest.raises(BifocalError, match="hf_dataset='parquet' is a file-format builder: set data_files"):
        SourceConfig(name="p", hf_dataset="parquet")
    with pytest.raises(BifocalError, match="data_files=.* only applies to an hf_dataset source"):
        SourceConfig(name="p", path=str(inputs["parquet"]), data_files="x.parquet")
    # save_to_disk folders (a Dataset, and a DatasetDict by split) read with load_from_disk.
    Dataset.from_dict({"text": CODE}).save_to_disk(tmp_path / "saved")
    assert texts(SourceConfig(name="s", hf_dataset=str(tmp_path / "saved"))) == collections.Counter(CODE)
    DatasetDict({"train": Dataset.from_dict({"text": PROSE}), "test": Dataset.from_dict({"text": CODE})}).save_to_disk(
        tmp_path / "dict")
    assert texts(SourceConfig(name="s", hf_dataset=str(tmp_path / "dict"), split="test")) == collections.Counter(CODE)
    with pytest.raises(BifocalError, match="no split 'dev' \\(splits: train, test\\)"):
        texts(SourceConfig(name="s", hf_dataset=str(tmp_path / "dict"), split="dev"))


def test_hub_input_paths_are_relative_to_the_config_file(inputs, tmp_path, monkeypatch):
    from bifocal.run.config import load_config

    cfg_dir = inputs["hub"].parent
    (cfg_dir / "data.yaml").write_text(json.dumps({"data": {"sources": [
        {"name": "h", "hf_dataset": "hubfolder", "data_dir": "more"},
        {"name": "p", "hf_dataset": "parquet", "data_files": ["prose.parquet"], "text_field": "content"}]}}))
    monkeypatch.chdir(tmp_path)
    h, p = load_config(cfg_dir / "data.yaml").data.sources
    assert h.hf_dataset == str(inputs["hub"]) and h.data_dir == "more"  # inside the dataset's folder
    assert p.data_files == [str(inputs["parquet"])]
