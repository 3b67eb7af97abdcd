"""Every shipped config loads under strict validation and builds the model it promises."""

from __future__ import annotations

from pathlib import Path

import pytest

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
