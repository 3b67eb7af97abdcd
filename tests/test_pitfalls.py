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
