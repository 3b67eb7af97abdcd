"""Property-based fuzzing of what bifocal reads from users' files: the config loader over random
YAML, random bytes and random `--set` overrides, and the prepared-data reader over damaged
meta.json, shard and index files. The only outcomes allowed are success or the project's own
one-line error (which the CLI prints with exit 2); never another exception."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from bifocal.core.errors import BifocalError
from bifocal.data_pipeline.loader import PreparedData, WindowSampler, iter_documents
from bifocal.run.config import SECTIONS, RunConfig, load_config
from bifocal.model.config import PositionConfig

from tiny_models import prepared_task_data

# The number of examples and whether they are random come from the profile conftest.py loads.
FUZZ = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
FUZZ_HALF = settings(FUZZ, max_examples=max(1, settings().max_examples // 2))

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
           | st.text(max_size=12) | st.sampled_from(["1e-3", "rope", "bifocal", "cpu", "[1, 2]", "x.yaml"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=10)


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# Real section and key names, so the fuzz reaches the validators and not only "unknown key".
SECTION_KEYS = {name: _fields(type(getattr(RunConfig(), name))) for name in SECTIONS}

def section(name: str):
    keys = st.sampled_from(SECTION_KEYS[name] + ["bogus"])
    nested = st.fixed_dictionaries({}, optional={"position": st.dictionaries(st.sampled_from(_fields(PositionConfig)),
                                                                             values, max_size=3)})
    body = st.dictionaries(keys, values, max_size=4)
    return (st.tuples(body, nested).map(lambda t: {**t[0], **t[1]}) if name == "model" else body) | values


configs = st.fixed_dictionaries({}, optional={**{name: section(name) for name in SECTIONS},
                                              "include": values, "bogus": values})


def loads_or_one_line_error(path: Path, overrides: list[str] | None = None) -> None:
    try:
        cfg = load_config(path, overrides)
    except BifocalError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    assert isinstance(cfg, RunConfig)


@FUZZ
@given(doc=configs)
def test_config_loader_over_random_yaml(tmp_path, doc):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc))
    loads_or_one_line_error(path)


@pytest.mark.parametrize("doc", [{"model": {"\n": None}}, {"train": {"max_steps\r": 1}}, {"\u2028": {}},
                                 {"data": {"sources": [{"name": "a\nb", "path": "x\ny.jsonl"}]}}])
def test_keys_and_values_with_line_breaks_give_one_line(tmp_path, doc):
    """Found by the fuzz test in CI: a key holding a newline made a two-line error."""
    path = tmp_path / "odd.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(BifocalError) as exc:
        load_config(path)
    assert str(exc.value).isprintable()


@pytest.mark.parametrize("override", ["model.position=", "model.position=null", "data.tokenizer="])
def test_a_null_section_is_refused_with_one_line(override):
    """Found by the fuzz test: `--set model.position=` (null) reached the model as None."""
    with pytest.raises(BifocalError, match="must be a mapping, got null"):
        load_config(None, [override])
    assert load_config(None, ["model.position.rope_scaling="]).model.position.rope_scaling is None  # optional: fine


def test_cli_error_with_a_newline_in_the_input_is_one_line(tmp_path):
    from conftest import run_cli

    proc = run_cli(["train", "--print-config", "--set", "model.\nbad=1"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "model.\\nbad" in proc.stderr


@FUZZ
@given(data=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_config_loader_over_random_bytes(tmp_path, data):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    loads_or_one_line_error(path)


dotted_keys = st.sampled_from([f"{s}.{k}" for s, ks in SECTION_KEYS.items() for k in ks]
                              + ["model.position.scheme", "model.position.rope_scaling", "train", "x.y", "model..n"])


@FUZZ
@given(sets=st.lists(st.tuples(dotted_keys, st.text(max_size=10) | values.map(json.dumps))
                     .map(lambda kv: f"{kv[0]}={kv[1]}") | st.text(max_size=15), max_size=4))
def test_set_overrides_over_random_values(sets):
    loads_or_one_line_error(None, sets)


# ---------------------------------------------------------------------------------------------
# Prepared data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepared_task_data(tmp_path_factory.mktemp("fuzzdata") / "prepared", n_documents=60)


def reads_or_one_line_error(path: Path) -> None:
    """Open, sample a few batches of both splits and walk every validation document."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = PreparedData(path)
            for split in data.splits:
                sampler = WindowSampler(data, split, seq_len=8, micro_batch=2, seed=0)
                for _ in range(3):
                    sampler.next_batch()
            for _ in iter_documents(data, "val"):
                pass
    except BifocalError as exc:
        assert "\n" not in str(exc) and str(exc)


def damaged_copy(prepared: Path, tmp: Path) -> Path:
    copy = tmp / "copy"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(prepared, copy)
    return copy


def _paths(node, prefix=()):
    """Every key path of a JSON document."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@FUZZ
@given(choice=st.integers(0, 10**6), new=values | st.binary(max_size=40).map(bytes.hex))
def test_reader_over_mutated_meta_json(prepared, tmp_path_factory, choice, new):
    copy = damaged_copy(prepared, tmp_path_factory.getbasetemp())
    meta = json.loads((copy / "meta.json").read_text())
    paths = [p for p in _paths(meta) if p]
    target = paths[choice % len(paths)]
    node = meta
    for k in target[:-1]:
        node = node[k]
    node[target[-1]] = new
    (copy / "meta.json").write_text(json.dumps(meta))
    reads_or_one_line_error(copy)


@FUZZ
@given(name=st.sampled_from(["meta.json", "modular.train.bin", "modular.train.idx", "modular.val.bin",
                             "modular.val.idx"]),
       data=st.binary(max_size=400), keep=st.integers(0, 64), same_size=st.booleans())
def test_reader_over_random_bytes_in_each_file(prepared, tmp_path_factory, name, data, keep, same_size):
    copy = damaged_copy(prepared, tmp_path_factory.getbasetemp())
    target = copy / name
    old = target.read_bytes()
    new = old[:keep] + data  # keep part of the header sometimes, so later checks are reached
    if same_size:  # damage in place: sizes and headers still agree with meta.json
        new = (old[:16] + data * (len(old) // max(1, len(data)) + 1))[:len(old)] if data else old
    target.write_bytes(new)
    reads_or_one_line_error(copy)


# ---------------------------------------------------------------------------------------------
# Raw corpus files


json_lines = st.lists(values.map(json.dumps) | st.text(max_size=30), max_size=5).map(lambda ls: "\n".join(ls).encode())


@FUZZ_HALF
@given(ext=st.sampled_from(["jsonl", "txt", "jsonl.gz", "jsonl.zst", "parquet"]),
       data=st.binary(max_size=300) | json_lines, field=st.sampled_from([None, "text", "content"]))
def test_source_reader_over_random_bytes(tmp_path, ext, data, field):
    from bifocal.data_pipeline.config import SourceConfig
    from bifocal.data_pipeline.sources import read_source

    path = tmp_path / f"fuzz.{ext}"
    path.write_bytes(data)
    try:
        src = SourceConfig(name="fuzz", path=str(path), **({"text_field": field} if field else {}))
        for doc in read_source(src):
            assert isinstance(doc.text, str)
    except BifocalError as exc:
        assert "\n" not in str(exc) and str(exc)
