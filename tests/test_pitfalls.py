"""Known pitfalls of LLM pretraining, by kind (issue 21): document text stays data, any corpus
prepares in linear time, one bad record never loses a file, logs describe their own step."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from bifocal.data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from bifocal.data_pipeline.loader import PreparedData
from bifocal.data_pipeline.prepare import prepare

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def austen_paragraphs(n: int) -> list[str]:
    with gzip.open(DATA / "nl_small_austen.jsonl.gz", "rt", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"]
    paras = [p for p in text.split("\n\n") if len(p) > 200]
    return paras[:n]


def decoded(data: PreparedData, source: str, split: str) -> list[str]:
    """The texts of a source's documents in a split (BOS and end-of-document dropped)."""
    tok = data.tokenizer()
    toks, offs = np.asarray(data.tokens(source, split)), data.offsets(source, split)
    first = 0 if tok.bos_id is None else 1
    return [tok.decode(toks[a + first:b - 1]) for a, b in zip(offs[:-1], offs[1:])]


# ---------------------------------------------------------------------------------------------
# 1. Document text is data: control tokens' spellings in text never become control ids

CONTROL = "<|endoftext|>", "<s>", "</s>", "<|begin_of_text|>", "<|end_of_text|>", "<unk>", "<|eot_id|>"


@pytest.fixture(scope="module")
def control_corpus(tmp_path_factory) -> Path:
    """40 documents of real prose, 10 of which mention control tokens' spellings mid-text."""
    docs = []
    for i, para in enumerate(austen_paragraphs(40)):
        if i % 4 == 0:
            para = f"{para[:100]} the string {CONTROL[i % len(CONTROL)]} and {' '.join(CONTROL)} {para[100:]}"
        docs.append({"source": f"doc{i}", "text": para})
    return write_jsonl(tmp_path_factory.mktemp("control") / "docs.jsonl", docs)


def llama_like_json(corpus: Path, out: Path, bos: str, eos: str, eos_special: bool) -> Path:
    """A Llama-style tokenizer.json built locally: byte-level BPE, `bos` prepended by the
    post-processor (as Llama's `<s>` / `<|begin_of_text|>`), `eos` an added token (Llama 2's `</s>`
    is special; `eos_special=False` lists it as a plain added token, as some files do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=[bos, "<unk>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    (tok.add_special_tokens if eos_special else tok.add_tokens)([eos])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(out))
    return out


def sentencepiece_with_bos(corpus: Path, out: Path) -> Path:
    """A SentencePiece model with Llama 2's layout: <unk>=0, <s>=1 (BOS), </s>=2 (EOS)."""
    import sentencepiece as spm

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(out.with_suffix("")),
                                   vocab_size=400, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)
    return out


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece_unigram", "llama3_json", "llama2_json", "sentencepiece_bos"])
def test_only_inserted_control_ids_reach_the_shards(control_corpus, tmp_path, kind):
    """Count of end-of-document ids == count of documents (and of BOS ids, where there is one),
    and every document decodes to its text, the control strings included, for every tokenizer kind."""
    tok = {"type": kind} if kind in ("bpe", "sentencepiece_unigram") else {}
    if kind == "llama3_json":
        tok["path"] = str(llama_like_json(control_corpus, tmp_path / "tokenizer.json", "<|begin_of_text|>",
                                          "<|end_of_text|>", eos_special=True))
    elif kind == "llama2_json":
        tok["path"] = str(llama_like_json(control_corpus, tmp_path / "tokenizer.json", "<s>", "</s>", eos_special=False))
    elif kind == "sentencepiece_bos":
        tok["path"] = str(sentencepiece_with_bos(control_corpus, tmp_path / "sp.model"))
    cfg = DataConfig(sources=[SourceConfig(name="docs", path=str(control_corpus))],
                     tokenizer=TokenizerConfig(**{"vocab_size": 400, **tok}), val_fraction=0.1)
    data = PreparedData(prepare(cfg, tmp_path / "out"))
    tokenizer = data.tokenizer()
    expect_bos = kind in ("llama3_json", "llama2_json", "sentencepiece_bos")
    assert (tokenizer.bos_id is not None) == expect_bos
    originals = sorted(json.loads(line)["text"] for line in control_corpus.read_text().splitlines())
    decoded = []
    for split in ("train", "val"):
        toks, offs = np.asarray(data.tokens("docs", split)), data.offsets("docs", split)
        n_docs = len(offs) - 1
        assert int((toks == data.eod_id).sum()) == n_docs
        assert (toks[offs[1:] - 1] == data.eod_id).all()
        if expect_bos:
            assert int((toks == tokenizer.bos_id).sum()) == n_docs and (toks[offs[:-1]] == tokenizer.bos_id).all()
        first = 1 if expect_bos else 0
        decoded += [tokenizer.decode(toks[a + first:b - 1]) for a, b in zip(offs[:-1], offs[1:])]
    assert sorted(decoded) == originals
    # The tokenizer used later (training, evaluation, generation) encodes the strings as text too.
    for s in CONTROL:
        ids = tokenizer.encode(f"a {s} b")
        assert tokenizer.eod_id not in ids and tokenizer.bos_id not in ids and tokenizer.decode(ids) == f"a {s} b"


# ---------------------------------------------------------------------------------------------
# 4. Every scalar logged for step k describes step k

RECORD_OPTIMIZER = """
import json, sys, torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from bifocal.launcher.cli import main

used = []

def record(optimizer, args, kwargs):  # what each optimizer step applies, read as it runs
    squares = [float(p.grad.double().square().sum()) for g in optimizer.param_groups for p in g["params"]
               if p.grad is not None]
    used.append({"lr": [g["lr"] for g in optimizer.param_groups], "grad_sq": sum(squares)})

register_optimizer_step_pre_hook(record)
code = main(sys.argv[2:])
open(sys.argv[1], "w").write(json.dumps(used))
sys.exit(code)
"""


@pytest.mark.parametrize("stage", [0, 2])
def test_logged_lr_and_grad_norm_are_those_the_optimizer_used_at_that_step(tiny_config, tmp_path, stage):
    """Three param groups (position parameters at 3x), warmup 3 of 6 steps: for each step k the
    metrics row (and TensorBoard) holds the lr of every group and the gradient norm that the torch
    optimizer stepped with at step k, not those of step k+1."""
    import subprocess
    import sys

    from conftest import cli_env

    run_dir, used_path = tmp_path / "run", tmp_path / "used.json"
    args = ["train", "--config", str(tiny_config), "--run-dir", str(run_dir), "--set", "train.max_steps=6",
            "optim.warmup_steps=3", "optim.lr=0.01", "optim.grad_clip=0", "train.eval_every=0",
            "train.save_every=0", f"deepspeed.zero_stage={stage}"]
    proc = subprocess.run([sys.executable, "-c", RECORD_OPTIMIZER, str(used_path), *args], cwd=tmp_path,
                          env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = json.loads(used_path.read_text())
    # ZeRO 1/2 step the torch optimizer once per param group (one group at a time): join the calls.
    per_step = len(calls) // 6
    assert len(calls) == 6 * per_step
    used = [{"lr": [lr for c in calls[i:i + per_step] for lr in c["lr"]],
             "grad_norm": sum(c["grad_sq"] for c in calls[i:i + per_step]) ** 0.5}
            for i in range(0, len(calls), per_step)]
    rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert len(used[0]["lr"]) == 3 and used[0]["lr"][2] == pytest.approx(3 * used[0]["lr"][0])
    # warmup as the issue gives it: 0.00333, 0.00667, 0.01 at steps 1-3
    assert [u["lr"][0] for u in used[:3]] == pytest.approx([0.01 / 3, 0.02 / 3, 0.01])
    for row, applied in zip(rows, used):
        assert row["lr"] == pytest.approx(applied["lr"][0], rel=1e-12)
        assert [row[f"lr_group{i}"] for i in range(3)] == pytest.approx(applied["lr"], rel=1e-12)
        assert row["grad_norm"] == pytest.approx(applied["grad_norm"], rel=1e-4)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("train/lr_group2")
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in events] == pytest.approx([u["lr"][2] for u in used], rel=1e-6)  # float32


# ---------------------------------------------------------------------------------------------
# 3. One bad record never loses a file: invalid Unicode is repaired once, counted, and kept

def test_lone_surrogate_in_jsonl_is_repaired_once_and_the_file_kept(tmp_path):
    """The issue's file: 3 lines, the middle one a valid JSON escape of a lone surrogate."""
    import warnings

    from bifocal.data_pipeline.loader import iter_documents

    good = austen_paragraphs(2)
    path = tmp_path / "s.jsonl"
    path.write_bytes((json.dumps({"text": good[0]}) + '\n{"text": "bad \\ud800 escape, then good text"}\n'
                      + json.dumps({"text": good[1]}) + "\n").encode())
    cfg = DataConfig(sources=[SourceConfig(name="s", path=str(path))], tokenizer=TokenizerConfig(vocab_size=300),
                     val_fraction=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = PreparedData(prepare(cfg, tmp_path / "out"))
    assert any("1 document(s) were not valid Unicode" in str(w.message) for w in caught)
    tok = data.tokenizer()
    texts = sorted(tok.decode(d) for d in iter_documents(data, "train"))
    assert texts == sorted([good[0], "bad \ufffd escape, then good text", good[1]])
    assert data.meta["sources"][0]["repaired_documents"] == 1 and data.meta["repaired_documents"] == 1


def _bad_bytes_inputs(root: Path, good: list[str]) -> dict[str, tuple[dict, str]]:
    """One input per local format, each with good documents around one whose bytes are not UTF-8:
    \\xff\\xfe (two invalid bytes: two U+FFFD) and \\xe2\\x82 (a cut 3-byte sequence: one U+FFFD)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    bad = b"caf\xc3\xa9 \xff\xfe and \xe2\x82 end"
    fixed = "café \ufffd\ufffd and \ufffd end"
    lines = [json.dumps({"text": good[0]}).encode(), b'{"text": "' + bad + b'"}', json.dumps({"text": good[1]}).encode()]
    blob = b"\n".join(lines) + b"\n"
    (root / "a.jsonl.gz").write_bytes(gzip.compress(blob))
    (root / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(blob))
    (root / "a.txt").write_bytes(good[0].encode() + b"\n" + bad)
    tree = root / "tree"
    tree.mkdir()
    (tree / "good.py").write_text(good[1])
    (tree / "bad.py").write_bytes(b"# " + bad + b"\n")
    values = pa.array([good[0].encode(), bad, good[1].encode()], type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": values}), root / "a.parquet")
    return {
        "jsonl_gz": ({"path": str(root / "a.jsonl.gz")}, [good[0], fixed, good[1]]),
        "jsonl_zst": ({"path": str(root / "a.jsonl.zst")}, [good[0], fixed, good[1]]),
        "txt": ({"path": str(root / "a.txt")}, [good[0] + "\n" + fixed]),
        "glob": ({"path": str(tree), "glob": "*.py"}, ["# " + fixed + "\n", good[1]]),
        "parquet": ({"path": str(root / "a.parquet")}, [good[0], fixed, good[1]]),
    }


def test_invalid_utf8_is_repaired_once_in_every_local_format(tmp_path):
    """Every format keeps the good documents of the file, repairs the bad one with one U+FFFD per
    maximal invalid sequence, and meta.json counts the repaired documents per source."""
    import warnings

    inputs = _bad_bytes_inputs(tmp_path, austen_paragraphs(2))
    # the sources share their documents: no deduplication, so each keeps its own
    cfg = DataConfig(sources=[SourceConfig(name=name, **where) for name, (where, _) in inputs.items()],
                     tokenizer=TokenizerConfig(vocab_size=300), val_fraction=0.0, dedup=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = PreparedData(prepare(cfg, tmp_path / "out"))
    by_source = {s["name"]: s for s in data.meta["sources"]}
    for name, (_, expected) in inputs.items():
        assert sorted(decoded(data, name, "train")) == sorted(expected), name
        assert by_source[name]["repaired_documents"] == 1, name
    assert data.meta["repaired_documents"] == len(inputs)


def test_errors_name_the_file_and_the_row(tmp_path):
    """A bad record past the first read-ahead batch (256 rows) is named by its own line / row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bifocal.core.errors import BifocalError
    from bifocal.data_pipeline.sources import read_source

    rows = [json.dumps({"text": f"document {i}"}) for i in range(400)]
    rows[299] = '{"text": "unterminated'
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(BifocalError, match=r"m\.jsonl: line 300: not valid JSON"):
        list(read_source(SourceConfig(name="m", path=str(tmp_path / "m.jsonl"))))
    values = [f"document {i}" for i in range(400)]
    pq.write_table(pa.table({"text": pa.array(values[:299] + [None] + values[300:])}), tmp_path / "n.parquet")
    with pytest.raises(BifocalError, match=r"n\.parquet: row 299 has no value for field 'text'"):
        list(read_source(SourceConfig(name="n", path=str(tmp_path / "n.parquet"))))
    # a .json file holding one array of objects is read too, its elements named by index
    (tmp_path / "a.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}, {"content": "three"}], indent=1))
    with pytest.raises(BifocalError, match=r"a\.json: element 2 has no field 'text' \(fields: content\)"):
        list(read_source(SourceConfig(name="a", path=str(tmp_path / "a.json"))))
    assert [d.text for d in read_source(SourceConfig(name="a", path=str(tmp_path / "a.json"), max_documents=2))] == [
        "one", "two"]


# ---------------------------------------------------------------------------------------------
# Issue 27: content deduplication before the split, on the bundled corpus's real files

SYSCONFIG = "# system configuration generated and used by the sysconfig module"
SRE_SHIM = 'import warnings\nwarnings.warn(f"module {__name__!r} is deprecated"'


@pytest.mark.parametrize("dedup", [True, False])
def test_bundled_python_corpus_is_deduplicated_before_the_split(tmp_path, dedup):
    """CPython's _sysconfigdata under two names (one generated file: exact) and the three sre_*
    shims that differ in one word (near) are each kept once; the validation split holds no two
    copies of anything. `data.dedup: false` keeps every copy."""
    cfg = DataConfig(sources=[SourceConfig(name="pystdlib", path=str(DATA / "code_small_pystdlib.jsonl.gz"))],
                     tokenizer=TokenizerConfig(vocab_size=512, train_chars=1_000_000), val_fraction=0.05,
                     dedup=dedup)
    data = PreparedData(prepare(cfg, tmp_path / "out"))
    train, val = decoded(data, "pystdlib", "train"), decoded(data, "pystdlib", "val")
    texts = train + val
    copies = {"exact": 1, "near": 2} if dedup else {"exact": 0, "near": 0}
    assert data.meta["sources"][0]["duplicates"] == copies and data.meta["duplicates"] == copies
    assert len(texts) == 171 - sum(copies.values())
    assert sum(t.startswith(SYSCONFIG) for t in texts) == (1 if dedup else 2)
    assert sum(t.startswith(SRE_SHIM) for t in texts) == (1 if dedup else 3)
    if dedup:
        normalised = [" ".join(t.split()) for t in texts]
        assert len(set(normalised)) == len(normalised) and len(set(val)) == len(val) >= 2


def test_near_duplicate_of_a_real_file_is_dropped_and_distinct_files_kept(tmp_path):
    """A real module with a few edited lines is a near duplicate; the real modules that share its
    licence header and idioms are not. Each source counts its own drops, across sources too."""
    with gzip.open(DATA / "code_small_pystdlib.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [d for d in map(json.loads, f) if not d["text"].startswith((SYSCONFIG, SRE_SHIM))][:30]
    original = max(docs, key=lambda d: len(d["text"]) if len(d["text"]) < 60_000 else 0)["text"]
    lines = original.splitlines(keepends=True)
    for i in range(0, len(lines), 40):  # edit one line in 40 (about 2.5% of the lines)
        lines[i] = "# edited\n"
    edited = "".join(lines)
    write_jsonl(tmp_path / "a.jsonl", docs)
    write_jsonl(tmp_path / "b.jsonl", [{"source": "edited.py", "text": edited},
                                      {"source": "new.py", "text": "def fresh():\n    return 42\n" * 20}])
    cfg = DataConfig(sources=[SourceConfig(name="a", path=str(tmp_path / "a.jsonl")),
                              SourceConfig(name="b", path=str(tmp_path / "b.jsonl"))],
                     tokenizer=TokenizerConfig(vocab_size=512, train_chars=500_000), val_fraction=0.1)
    data = PreparedData(prepare(cfg, tmp_path / "out"))
    by_name = {s["name"]: s for s in data.meta["sources"]}
    assert by_name["a"]["duplicates"] == {"exact": 0, "near": 0}
    assert by_name["b"]["duplicates"] == {"exact": 0, "near": 1}
    texts = decoded(data, "b", "train") + decoded(data, "b", "val")
    assert texts == ["def fresh():\n    return 42\n" * 20]


# ---------------------------------------------------------------------------------------------
# 2. Preparation time is linear in the corpus, whatever its documents look like

def test_cut_long_runs_keeps_the_text_and_bounds_every_run():
    from bifocal.data_pipeline.tokenizer import _BPE_MAX_RUN, _cut_long_runs

    texts = ["plain words only", "a " + "x" * 1000 + " b\n" + " " * 600 + "c", "y" * (3 * _BPE_MAX_RUN), ""]
    for text in texts:
        pieces = list(_cut_long_runs(text))
        assert "".join(pieces) == text
        for piece in pieces:
            runs = piece.split() + [r for r in piece.replace("\t", "x").split("x") if r.isspace()]
            assert max(map(len, runs), default=0) <= _BPE_MAX_RUN + 1


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece_unigram"])
def test_a_3mb_line_without_whitespace_prepares_in_linear_time(tmp_path, kind):
    """The issue's corpus: 300 ordinary sentences and one 3 MB run of `x`. Byte-level BPE training
    was quadratic in the run (9.4 s at 160k characters, unfinished after 10 minutes at 3 MB); now
    it takes about a second, so a 120 s bound fails only on the old code, never on a slow machine."""
    import yaml

    from conftest import run_cli

    rows = [{"text": f"It is a truth universally acknowledged, that a single man {i} must be in want of a wife."}
            for i in range(300)] + [{"text": "x" * 3_000_000}]
    write_jsonl(tmp_path / "run.jsonl", rows)
    cfg = {"data": {"sources": [{"name": "s", "path": "run.jsonl"}], "val_fraction": 0.0, "dedup": False,
                    "tokenizer": {"type": kind, "vocab_size": 290}, "prepared_dir": str(tmp_path / "out")}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run_cli(["prepare", str(tmp_path / "cfg.yaml")], tmp_path, timeout=120)
    data = PreparedData(tmp_path / "out")
    texts = decoded(data, "s", "train")
    assert len(texts) == 301 and "x" * 3_000_000 in texts


def test_synthetic_task_documents_are_not_deduplicated(tmp_path):
    """A synthetic task repeats its few instances by design (sums mod 5 of one digit: 5 instances),
    so its documents are nearly alike; deduplication leaves them alone."""
    syn = {"task": "modular", "n_documents": 200, "seed": 0, "p": 5, "min_len": 1, "max_len": 1}
    cfg = DataConfig(sources=[SourceConfig(name="mod", synthetic=syn)], tokenizer=TokenizerConfig(vocab_size=300),
                     val_fraction=0.1)
    data = PreparedData(prepare(cfg, tmp_path / "out"))
    assert data.meta["duplicates"] == {"exact": 0, "near": 0}
    assert sum(data.meta["splits"][sp]["documents"] for sp in ("train", "val")) == 200
