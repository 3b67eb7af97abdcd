"""Every shipped config loads under strict validation and builds the model it promises."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bifocal.core.errors import BifocalError
from bifocal.run.config import CONFIG_DIR, deepspeed_config, load_config

RUN_CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.parent.name in ("configs", "gpu", "tasks"))
SIZES = {"125m": 125e6, "350m": 350e6, "760m": 760e6, "1.3b": 1.3e9}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_run_config_loads(path: Path):
    cfg = load_config(path)
    for src in cfg.data.sources:
        if src.path:
            assert Path(src.path).is_absolute()
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch


@pytest.mark.parametrize("name", sorted(SIZES))
def test_gpu_presets_have_their_size(name):
    import torch

    cfg = load_config(CONFIG_DIR / "gpu" / f"{name}.yaml", ["model.vocab_size=32000"])
    with torch.device("meta"):
        from bifocal.model import GPT

        n = GPT(cfg.model).num_params(non_embedding=False)
    assert abs(n - SIZES[name]) / SIZES[name] < 0.2, n
    assert cfg.deepspeed.precision == "bf16"


@pytest.mark.parametrize("scheme", ["rope", "spectral", "bifocal", "pope", "nope"])
def test_scheme_is_a_one_line_switch(scheme):
    cfg = load_config(CONFIG_DIR / "gpu" / "125m.yaml", [f"model.position.scheme={scheme}"])
    assert cfg.model.position.scheme == scheme


def test_every_config_key_has_a_one_line_description():
    from bifocal.run.config import config_keys

    rows = config_keys()
    assert {"train.max_steps", "model.position.scheme", "data.sources[].hf_dataset", "optim.lr"} <= {r[0] for r in rows}
    assert [key for key, _, text in rows if not text] == []
    assert dict((k, d) for k, d, _ in rows)["train.max_steps"] == "300"


def test_config_listing_print_config_and_several_sets(tmp_path):
    from conftest import run_cli

    listing = run_cli(["config", "train."], cwd=tmp_path).stdout.splitlines()
    assert listing and all(line.startswith("train.") for line in listing)
    assert any(line.split()[:2] == ["train.log_every", "10"] and "training line" in line for line in listing)
    bad = run_cli(["config", "trian"], cwd=tmp_path, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "sections: data" in bad.stderr

    proc = run_cli(["train", "--print-config", "--config", "gpu/125m", "--set", "train.max_steps=7", "optim.lr=0.01",
                    "--set", "model.position.scheme=rope"], cwd=tmp_path)
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["train"]["max_steps"] == 7 and cfg["optim"]["lr"] == 0.01 and cfg["model"]["position"]["scheme"] == "rope"
    assert cfg["model"]["d_model"] == 768  # the bundled preset, found by name
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written


@pytest.mark.parametrize("old,needle", [
    ("train:\n  seq_len: 128\n", "config key `train.seq_len` was removed: the training context length is model.max_seq_len"),
    ("eval:\n  lengths: [128, 256]\n", "config section `eval` was removed: evaluation settings are options of `bifocal eval`"),
])
def test_a_removed_key_in_an_old_config_says_what_replaced_it(tmp_path, old, needle):
    path = tmp_path / "old.yaml"
    path.write_text(old)
    with pytest.raises(BifocalError) as err:
        load_config(path)
    assert str(err.value).startswith(needle) and "\n" not in str(err.value)


def test_the_training_length_is_one_key():
    # The sampler's windows, the model's reported length and the FLOPs all read model.max_seq_len.
    cfg = load_config(None, ["model.max_seq_len=48"])
    assert cfg.model.max_seq_len == 48 and not hasattr(cfg.train, "seq_len")
    assert "seq_len" not in cfg.to_dict()["train"] and "eval" not in cfg.to_dict()


@pytest.mark.parametrize("command,declared", [
    (["bench"], "bifocal.launcher.settings:BenchSettings"),
    (["eval", "ppl"], "bifocal.eval.settings:PplSettings"),
    (["eval", "report"], "bifocal.eval.settings:ReportSettings"),
    (["eval", "passkey"], "bifocal.eval.settings:PasskeySettings"),
    (["eval", "spectrum"], "bifocal.eval.settings:SpectrumSettings"),
    (["eval", "tasks"], "bifocal.eval.settings:TasksSettings"),
])
def test_command_flags_and_help_come_from_the_declarations(command, declared):
    """Each field is one flag whose help is the field's description, and nothing else is a flag."""
    import dataclasses
    import importlib

    from bifocal.core.settings import description
    from bifocal.launcher.cli import build_parser

    module, name = declared.split(":")
    cls = getattr(importlib.import_module(module), name)
    parser = build_parser()
    for word in command:
        parser = next(a for a in parser._actions if a.dest in ("command", "eval_command")).choices[word]
    flags = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    command_own = {"config", "overrides"} if command == ["bench"] else set()  # the run config it times
    assert set(flags) - command_own == fields
    for field in fields:
        assert description(cls, field) in flags[field].help, field


def test_eval_values_are_validated_by_the_declaration(tmp_path):
    from conftest import run_cli

    for args, needle in ((["ppl", "x", "--stride", "0"], "eval ppl.stride=0 is invalid: must be a positive integer"),
                         (["ppl", "x", "--rope-scaling", "yarm"], "rope_scaling='yarm' is invalid: one of pi"),
                         (["passkey", "x", "--trials", "two"], "eval passkey.trials='two' is invalid"),
                         (["tasks", "x", "--task", "sort"], "eval tasks.task='sort' is invalid: one of dyck")):
        proc = run_cli(["eval", *args], tmp_path, check=False)
        assert proc.returncode == 2 and needle in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
