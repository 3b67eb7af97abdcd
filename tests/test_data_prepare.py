"""prepare + loader end to end on small slices of the bundled corpora (real files, real tokenizers)."""

from __future__ import annotations

import collections
import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bifocal.data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from bifocal.core.errors import BifocalError
from bifocal.data_pipeline.loader import PreparedData, WindowSampler, iter_documents
from bifocal.data_pipeline.prepare import is_prepared, prepare
from bifocal.data_pipeline.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


def write_jsonl_gz(path: Path, docs: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    return path


def slice_corpus(src: Path, n_docs: int, chars: int) -> list[dict]:
    out = []
    with gzip.open(src, "rt", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            out.append({"source": d["source"], "text": d["text"][:chars]})
            if len(out) == n_docs:
                break
    return out


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, list[dict]]:
    root = tmp_path_factory.mktemp("corpora")
    docs = {"austen": slice_corpus(DATA / "nl_small_austen.jsonl.gz", 6, 30_000),
            "code": slice_corpus(DATA / "code_small_pystdlib.jsonl.gz", 40, 5_000)}
    for name, d in docs.items():
        write_jsonl_gz(root / f"{name}.jsonl.gz", d)
    return {"root": root, **docs}


def small_cfg(corpora, **tok) -> DataConfig:
    root = corpora["root"]
    return DataConfig(
        sources=[SourceConfig(name="austen", path=str(root / "austen.jsonl.gz")),
                 SourceConfig(name="code", path=str(root / "code.jsonl.gz"), weight=1.0)],
        tokenizer=TokenizerConfig(**{"vocab_size": 512, "train_chars": 300_000, **tok}),
        val_fraction=0.1,
    )


@pytest.fixture(scope="module")
def prepared(corpora, tmp_path_factory) -> PreparedData:
    out = prepare(small_cfg(corpora), tmp_path_factory.mktemp("prep") / "data")
    return PreparedData(out)


def decoded_docs(data: PreparedData, source: str, split: str) -> list[str]:
    tok = data.tokenizer()
    toks, offs = data.tokens(source, split), data.offsets(source, split)
    out = []
    for a, b in zip(offs[:-1], offs[1:]):
        assert toks[b - 1] == data.eod_id  # every document ends in EOD
        out.append(tok.decode(toks[a:b - 1]))
    return out


def test_prepare_writes_meta_shards_and_tokenizer(prepared):
    meta = prepared.meta
    assert is_prepared(prepared.path)
    assert meta["tokenizer"]["kind"] == "bpe" and prepared.vocab_size == 512
    assert meta["dtype"] == "uint16"
    assert [s["name"] for s in meta["sources"]] == ["austen", "code"]
    for s in meta["sources"]:
        assert s["splits"]["train"]["documents"] >= 1 and s["splits"]["val"]["documents"] >= 1
    # 46 documents, one of them a copy (CPython's _sysconfigdata under two names): dropped
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 45
    assert meta["duplicates"] == {"exact": 1, "near": 0} and meta["sources"][1]["duplicates"]["exact"] == 1
    assert meta["repaired_documents"] == 0 and meta["mb_per_s"] > 0
    assert (prepared.path / "tokenizer.json").is_file()
    assert prepared.tokenizer().hash == prepared.tokenizer_hash
    assert not list(prepared.path.parent.glob("*.tmp-*"))


def test_round_trip_and_split_disjoint(prepared, corpora):
    for name in ("austen", "code"):
        train, val = decoded_docs(prepared, name, "train"), decoded_docs(prepared, name, "val")
        inputs = [d["text"] for d in corpora[name]]
        # decode(encode(doc)) is exact, and every distinct input document lands in exactly one split
        assert collections.Counter(train + val) == collections.Counter(set(inputs))
        assert not set(train) & set(val)


def test_same_inputs_give_identical_shards(prepared, corpora, tmp_path):
    other = PreparedData(prepare(small_cfg(corpora), tmp_path / "again"))
    for a, b in zip(prepared.meta["sources"], other.meta["sources"]):
        assert a["splits"] == b["splits"]  # names, counts and sha256 of every shard
    assert other.tokenizer_hash == prepared.tokenizer_hash


def test_second_run_reuses_directory(prepared, corpora, capsys):
    before = (prepared.path / "meta.json").stat().st_mtime_ns
    assert prepare(small_cfg(corpora), prepared.path) == prepared.path
    assert "reusing" in capsys.readouterr().err
    assert (prepared.path / "meta.json").stat().st_mtime_ns == before


def test_different_config_refuses_existing_dir_untouched(prepared, corpora):
    snapshot = {p.name: p.read_bytes() for p in prepared.path.iterdir()}
    cfg = small_cfg(corpora)
    cfg.val_fraction = 0.3
    with pytest.raises(BifocalError, match="exists and was prepared from a different config"):
        prepare(cfg, prepared.path)
    assert {p.name: p.read_bytes() for p in prepared.path.iterdir()} == snapshot


def test_batches_are_shifted_windows_of_the_sources(prepared):
    s = WindowSampler(prepared, "train", seq_len=32, micro_batch=5, seed=3)
    src, starts = s.draw(0)
    x, y = s.next_batch()
    assert x.shape == y.shape == (5, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row, (i, t) in enumerate(zip(src, starts)):
        window = np.asarray(prepared.tokens(s.sources[i], "train")[t:t + 33], dtype=np.int64)
        assert torch.equal(x[row], torch.from_numpy(window[:-1])) and torch.equal(y[row], torch.from_numpy(window[1:]))


def test_mixture_proportions(prepared):
    s = WindowSampler(prepared, "train", seq_len=16, micro_batch=64, seed=0, weights={"austen": 1.0, "code": 3.0})
    src = np.concatenate([s.draw(c)[0] for c in range(100)])
    frac_code = np.mean(np.asarray(s.sources)[src] == "code")
    assert abs(frac_code - 0.75) < 0.03
    only = WindowSampler(prepared, "train", seq_len=16, micro_batch=8, weights={"code": 0.0})
    assert only.sources == ["austen"]


def test_ranks_disjoint_and_union_equals_double_micro_batch(prepared):
    kw = dict(data=prepared, split="train", seq_len=24, seed=7)
    ranks = [WindowSampler(micro_batch=3, rank=r, world_size=2, **kw) for r in range(2)]
    single = WindowSampler(micro_batch=6, **kw)
    for _ in range(4):
        (x0, y0), (x1, y1), (x, y) = ranks[0].next_batch(), ranks[1].next_batch(), single.next_batch()
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        assert not any(torch.equal(a, b) for a in x0 for b in x1)


def test_resume_gives_identical_next_batches(prepared):
    a = WindowSampler(prepared, "train", seq_len=20, micro_batch=4, seed=11)
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint round trip
    expected = [a.next_batch() for _ in range(2)]
    b = WindowSampler(str(prepared.path), "train", seq_len=20, micro_batch=4, seed=11)
    b.load_state_dict(state)
    for (xe, ye), (xb, yb) in zip(expected, [b.next_batch() for _ in range(2)]):
        assert torch.equal(xe, xb) and torch.equal(ye, yb)
    with pytest.raises(BifocalError, match="seed"):
        WindowSampler(prepared, "train", seq_len=20, micro_batch=4, seed=12).load_state_dict(state)


def test_iter_documents_whole_docs_above_min_tokens(prepared):
    tok = prepared.tokenizer()
    lengths = [len(d) for d in iter_documents(prepared, "train", min_tokens=0)]
    n_train = sum(s["splits"]["train"]["documents"] for s in prepared.meta["sources"])
    assert len(lengths) == n_train
    cut = sorted(lengths)[len(lengths) // 2]
    long_docs = list(iter_documents(prepared, "train", min_tokens=cut))
    assert len(long_docs) == sum(n >= cut for n in lengths) and all(len(d) >= cut for d in long_docs)
    all_texts = set(decoded_docs(prepared, "austen", "train") + decoded_docs(prepared, "code", "train"))
    assert all(tok.eod_id not in d and tok.decode(d) in all_texts for d in long_docs)


def test_tokenizer_mismatch(prepared, corpora, tmp_path):
    prepared.check_tokenizer(prepared.tokenizer_hash)
    other = prepare(small_cfg(corpora, vocab_size=600), tmp_path / "v600")
    with pytest.raises(BifocalError, match=r"was prepared with tokenizer \w+, the run uses \w+"):
        prepared.check_tokenizer(load_tokenizer(other).hash)


def test_truncated_shard(prepared, tmp_path):
    bad = Path(shutil.copytree(prepared.path, tmp_path / "copy"))
    shard = bad / "austen.train.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(BifocalError, match=r"austen\.train\.bin: truncated shard"):
        PreparedData(bad)
    (bad / "code.val.idx").unlink()
    shard.unlink()
    with pytest.raises(BifocalError, match="shard missing"):
        PreparedData(bad)


def test_foreign_shard(prepared, corpora, tmp_path):
    twin = prepare(small_cfg(corpora), tmp_path / "twin")  # same content, different run id
    bad = Path(shutil.copytree(prepared.path, tmp_path / "copy"))
    shutil.copy(twin / "code.train.bin", bad / "code.train.bin")
    with pytest.raises(BifocalError, match=r"code\.train\.bin: foreign shard"):
        PreparedData(bad)


@pytest.mark.parametrize("kind", ["sentencepiece_unigram", "sentencepiece_bpe"])
def test_sentencepiece_round_trip(corpora, tmp_path, kind):
    data = PreparedData(prepare(small_cfg(corpora, type=kind), tmp_path / kind))
    assert data.meta["tokenizer"]["kind"] == "sentencepiece" and (data.path / "tokenizer.model").is_file()
    for name in ("austen", "code"):
        got = decoded_docs(data, name, "train") + decoded_docs(data, name, "val")
        assert collections.Counter(got) == collections.Counter({d["text"] for d in corpora[name]})
    x, _ = WindowSampler(data, "val", seq_len=16, micro_batch=2).next_batch()
    assert int(x.max()) < data.vocab_size


def test_existing_tokenizer_is_reused(prepared, corpora, tmp_path):
    cfg = small_cfg(corpora, path=str(prepared.path / "tokenizer.json"))
    data = PreparedData(prepare(cfg, tmp_path / "reuse"))
    data.check_tokenizer(prepared.tokenizer_hash)
    assert data.meta["splits"] == prepared.meta["splits"]


def test_val_guaranteed_for_sources_with_two_documents(tmp_path):
    path = write_jsonl_gz(tmp_path / "two.jsonl.gz", [{"source": "a", "text": "first document " * 50},
                                                      {"source": "b", "text": "second document " * 50}])
    cfg = DataConfig(sources=[SourceConfig(name="two", path=str(path))],
                     tokenizer=TokenizerConfig(vocab_size=300), val_fraction=0.001)
    meta = PreparedData(prepare(cfg, tmp_path / "out")).meta
    assert meta["splits"]["train"]["documents"] == 1 and meta["splits"]["val"]["documents"] == 1


def test_configs_load_with_the_strict_loader():
    from bifocal.run.config import load_config

    for name, vocab in (("demo", 4096), ("large", 16384)):
        strict = load_config(REPO / "configs" / "data" / f"{name}.yaml").data
        assert strict.tokenizer.vocab_size == vocab and strict.prepared_dir == f"runs/data/{name}"
        assert len(strict.sources) == 2
    demo = load_config(REPO / "configs" / "data" / "demo.yaml").data
    assert [Path(s.path) for s in demo.sources] == [Path(s.path) for s in DataConfig().sources]
    assert all(Path(s.path).is_file() for s in demo.sources)


def test_prepared_data_is_portable_and_fingerprinted_by_content(prepared, corpora, tmp_path, capsys):
    # The same corpora elsewhere, touched: content decides, so the directory is reused.
    moved = tmp_path / "moved"
    shutil.copytree(corpora["root"], moved)
    for f in moved.iterdir():
        os.utime(f, (1, 1))
    cfg = small_cfg({"root": moved})
    assert prepare(cfg, prepared.path) == prepared.path
    assert "reusing" in capsys.readouterr().err
    # Shards copied to a machine without the raw corpus: training (trust_complete) uses them.
    cluster = tmp_path / "cluster" / "data"
    shutil.copytree(prepared.path, cluster)
    shutil.rmtree(moved)
    assert prepare(cfg, cluster, trust_complete=True) == cluster
    assert PreparedData(cluster).num_tokens("train") == prepared.num_tokens("train")
    with pytest.raises(BifocalError, match="file not found"):  # an explicit prepare still needs inputs
        prepare(cfg, cluster)
    changed = small_cfg({"root": moved})
    changed.val_fraction = 0.3  # other settings are never trusted
    with pytest.raises(BifocalError, match="different config"):
        prepare(changed, cluster, trust_complete=True)
    # Changed content (same name, size, time) is a different fingerprint.
    edited = tmp_path / "edited"
    shutil.copytree(corpora["root"], edited)
    docs = [dict(d) for d in corpora["code"]]
    docs[0]["text"] = docs[0]["text"].upper()
    write_jsonl_gz(edited / "code.jsonl.gz", docs)
    with pytest.raises(BifocalError, match="different config"):
        prepare(small_cfg({"root": edited}), prepared.path)


def test_tokenizer_with_a_bos_token_starts_every_document_with_it(prepared, corpora, tmp_path):
    """A Llama-style tokenizer.json (its post-processor prepends <s>) vs bifocal's own (nothing)."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(prepared.path / "tokenizer.json"))
    tok.add_special_tokens(["<s>", "</s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path / "tokenizer.json").bos_id == bos
    assert prepared.tokenizer().bos_id is None and prepared.meta["tokenizer"]["bos_id"] is None

    data = PreparedData(prepare(small_cfg(corpora, path=str(tmp_path / "tokenizer.json")), tmp_path / "llama"))
    assert data.meta["tokenizer"]["bos_id"] == bos
    for name in ("austen", "code"):
        toks, offs = data.tokens(name, "train"), data.offsets(name, "train")
        starts, ends = toks[offs[:-1]], toks[offs[1:] - 1]
        assert (starts == bos).all() and (ends == data.eod_id).all()
        assert (toks == bos).sum() == len(offs) - 1  # only at document starts
